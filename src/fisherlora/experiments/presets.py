"""The comparison presets, in a module that imports nothing heavy.

``fisherlora --help`` shows them, and the command line must answer ``--help`` and argument
errors without loading torch, transformers or peft (seconds on a small machine);
``fisherlora.experiments.compare`` re-exports them.
"""

from __future__ import annotations

from typing import Any

ALL_METHODS = (
    "lora,fim-lora,filet,filet-svd,fw-lora,fim-lora+filet+fw-lora,random-rank,"
    "eva,pissa,adalora,lora-ga,corda,dora"
)

# The README's main command: our methods and LoRA, one seed, half the steps; <= 10 min on 2 CPUs.
QUICK: dict[str, Any] = {
    "methods": "lora,fim-lora,filet,fw-lora,fim-lora+filet+fw-lora",
    "seeds": "0",
    "steps": 150,
    "eval_every": 75,
}
