"""Exceptions for problems a user can act on; the command-line tool prints them without a traceback."""

from __future__ import annotations

from collections.abc import Sequence


class FisherLoraError(ValueError):
    """Base class: the message names the offending value and, where there is one, the fix."""


class ConfigError(FisherLoraError):
    """A setting, file, model or data set that cannot be used as given (bad names, numbers,
    files, columns, target modules, infeasible budgets). Where there is a fixed set of valid
    choices, the message lists them."""


class CalibrationError(FisherLoraError):
    """Calibration data that cannot be used: an empty loader, a batch without labels, or
    non-finite gradients or statistics (the message names the module)."""


def check_choices(method: str, options: Sequence[tuple[str, object, Sequence[str]]]) -> None:
    """Raise :class:`ConfigError` for the first ``(label, value, choices)`` whose value is not
    one of its choices, naming the method, the option and the choices."""
    for label, value, choices in options:
        if value not in choices:
            raise ConfigError(f"unknown {method} {label} {value!r}; choose one of {list(choices)}")
