"""fisherlora: data-aware LoRA fine-tuning with Fisher information, on top of PEFT.

Names are imported lazily so that torch-free parts (``fisherlora.allocate``) load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "fisherlora.errors",
    "water_fill": "fisherlora.allocate",
    "allocate_ranks": "fisherlora.methods.fim_lora",
    "random_ranks": "fisherlora.methods.fim_lora",
    "RankPlan": "fisherlora.methods.fim_lora",
    "filet_init": "fisherlora.methods.filet",
    "FiletReport": "fisherlora.methods.filet",
    "export_lora": "fisherlora.adapters",
    "FisherPenalty": "fisherlora.methods.fw_lora",
    "CalibrationError": "fisherlora.errors",
    "FisherLoraError": "fisherlora.errors",
    "METHODS": "fisherlora.methods",
    "Method": "fisherlora.methods",
    "get_method": "fisherlora.methods",
    "TrainConfig": "fisherlora.experiments.train",
    "train": "fisherlora.experiments.train",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fisherlora' has no attribute {name!r}")
