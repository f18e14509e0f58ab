"""Methods by name. Each is a small object with the steps of :class:`~fisherlora.methods.base.Method`."""

from __future__ import annotations

from collections.abc import Callable

from fisherlora.errors import ConfigError
from fisherlora.methods.base import AdapterMethod, Method
from fisherlora.methods.peers import LoRA

METHODS: dict[str, Callable[[], Method]] = {
    "lora": LoRA,
}


def get_method(name: str) -> Method:
    """A fresh method object for ``name``; unknown names list the valid ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available methods are {sorted(METHODS)}")
    return METHODS[name]()


__all__ = ["METHODS", "AdapterMethod", "Method", "get_method"]
