"""The methods we compare against, each through PEFT's own implementation."""

from __future__ import annotations

from fisherlora.methods.base import AdapterMethod


class LoRA(AdapterMethod):
    """Standard LoRA (Hu et al., 2021): ``h = W x + s · B A x``, ``s = α / r`` (``α / √r`` with
    rsLoRA), A Kaiming-uniform, B = 0, so the model starts as the base model."""

    name = "lora"
