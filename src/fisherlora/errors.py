"""Exceptions for problems a user can act on; the command-line tool prints them without a traceback."""


class FisherLoraError(ValueError):
    """Base class: the message names the offending value and, where there is one, the fix."""


class ConfigError(FisherLoraError):
    """A setting, file, model or data set that cannot be used as given (bad names, numbers,
    files, columns, target modules, infeasible budgets). Where there is a fixed set of valid
    choices, the message lists them."""


class CalibrationError(FisherLoraError):
    """Calibration data that cannot be used: an empty loader, a batch without labels, or
    non-finite gradients or statistics (the message names the module)."""
