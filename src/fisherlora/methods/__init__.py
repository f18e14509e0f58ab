"""Methods by name. Each is a small object with the steps of :class:`~fisherlora.methods.base.Method`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from fisherlora.errors import ConfigError
from fisherlora.methods.base import AdapterMethod, Method
from fisherlora.methods.filet import Filet
from fisherlora.methods.fim_lora import FimLoRA, RandomRank
from fisherlora.methods.fw_lora import FwLoRA
from fisherlora.methods.peers import LoRA

METHODS: dict[str, Callable[..., Method]] = {
    "lora": LoRA,
    "fim-lora": FimLoRA,
    "random-rank": RandomRank,
    "filet": Filet,
    "fw-lora": FwLoRA,
}


def get_method(name: str, options: Mapping[str, Any] | None = None) -> Method:
    """A fresh method object for ``name``, built from the ``options`` its constructor accepts
    (the runner passes all of its method settings; each method takes the ones it knows)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available methods are {sorted(METHODS)}")
    factory = METHODS[name]
    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in (options or {}).items() if k in accepted})


__all__ = ["METHODS", "AdapterMethod", "Method", "get_method"]
