"""The runner's numeric precision: float32 weights always, autocast for the forward pass on request.

``fp32`` (the default) trains and evaluates in float32. ``bf16`` and ``fp16`` run the forward
passes and the loss of training and evaluation under ``torch.autocast`` with that dtype, while
the weights, the optimizer state and the method terms stay float32 (master weights): autocast
casts per operation, so a half-precision copy of a weight lives only inside one op. ``fp16`` adds
a ``torch.amp.GradScaler`` (loss scaling, gradients unscaled before clipping, a step skipped
when they overflowed). The Fisher statistics of our methods are float32 whatever the autocast
(``capture.py`` turns it off in its hooks), and calibration runs before training, outside it.

Model weights are loaded in float32 whatever dtype the checkpoint was saved in: ``transformers``
5 loads a checkpoint in its stored dtype, and a model stored in fp16 then trained in pure fp16
(no master weights, no loss scaling) and diverged at once.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
import transformers

from fisherlora.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Raise :class:`ConfigError` for an unknown precision or one that ``device`` cannot run."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
            "use --precision fp16 (with loss scaling) or fp32"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"--precision {precision} is supported on cpu and cuda devices, not {device.type!r}; "
            "use --precision fp32"
        )
    # An older torch turns CPU autocast off, with a warning only, for a dtype it cannot run.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    if any("not supported" in str(w.message) for w in caught):
        raise ConfigError(
            f"--precision {precision}: this torch ({torch.__version__}) has no {device.type} "
            f"autocast for {AUTOCAST_DTYPES[precision]}; use --precision fp32"
        )


def autocast(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context in which forward passes and losses run: autocast to bf16/fp16 on
    ``device``'s type, or nothing at all for ``fp32`` (the float32 path is exactly as before)."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = AUTOCAST_DTYPES[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler of an ``fp16`` run (fp16's narrow exponent underflows small gradients);
    ``None`` otherwise (bf16 has float32's exponent range and needs none)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def nonfinite_loss_message(value: float, step: int, precision: str) -> str:
    """What to say when the training loss is NaN or infinite at ``step``."""
    if precision == "fp32":
        return f"the training loss became {value} at step {step}; try a lower --lr"
    other = "bf16 or fp32" if precision == "fp16" else "fp32"
    return (
        f"the training loss became {value} at step {step} under {precision} autocast; try "
        f"--precision {other}, or a lower --lr"
    )


def float32_load_kwargs() -> dict[str, Any]:
    """``from_pretrained`` keywords that load the weights in float32 whatever the checkpoint's
    stored dtype (``dtype`` since transformers 4.56, ``torch_dtype`` before)."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: torch.float32}


def as_float32(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every floating-point parameter and buffer in float32 (a no-op where they
    are; a module a checkpoint kept in another dtype is cast)."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        model.float()
    return model
