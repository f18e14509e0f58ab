"""Calibration passes and the hooks that see a layer's input ``x`` and output gradient ``g``.

Everything here is a context manager or a generator that restores the model however it exits:
hooks are removed, train/eval mode, ``requires_grad`` flags and ``.grad`` are put back, and no
attribute is left on any module.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from fisherlora.errors import CalibrationError, ConfigError
from fisherlora.logit_window import scored_window
from fisherlora.stats import min_and_max

# (module name, what was kept of the input x, output gradient g, token mask or None)
IOCallback = Callable[[str, Any, torch.Tensor, "torch.Tensor | None"], None]
# (module name, input x, token mask or None) -> what the backward callback needs of x
InputTransform = Callable[[str, torch.Tensor, "torch.Tensor | None"], Any]


def predicts_next_token(model: nn.Module) -> bool:
    """True for a causal LM (its loss reads the output at position t for the label at t + 1)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False  # a seq2seq decoder's output at t predicts labels[t]: no shift
    can_generate = getattr(base, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def padding_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """``[batch, seq]`` float mask of the positions a hidden layer's statistics run over: every
    position the attention mask keeps (padding out), whatever its label. ``None`` without an
    attention mask.

    A label of ``-100`` does not remove a position from a hidden layer: the weight gradient
    ``∇W = Σ_t g_t x_tᵀ`` sums over every position, and a prompt token's ``g_t`` is not zero when
    a scored token attends to it. Only the loss's own terms are counted by label
    (:func:`token_mask`)."""
    mask = batch.get("attention_mask")
    return None if mask is None else mask.to(torch.float32)


def token_mask(batch: Mapping[str, torch.Tensor], next_token: bool = False) -> torch.Tensor | None:
    """``[batch, seq]`` mask of the *scored* tokens: the terms of the loss (to count them, as
    :func:`example_loss_scale` does), not the positions a hidden layer's statistics run over
    (those are :func:`padding_mask`'s).

    The attention mask, and for token-level labels also the positions whose label the loss does
    not ignore (``-100``). With ``next_token`` (a causal LM, which shifts the labels inside its
    loss) position t counts when ``labels[t + 1] != -100``: its output predicts that label, so a
    prompt's last token counts and the completion's last does not. ``None`` without an
    attention mask."""
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if labels is not None and mask is not None and labels.shape == mask.shape:
        mask = mask * scored_labels(labels, next_token)
    return None if mask is None else mask.to(torch.float32)


def scored_labels(labels: torch.Tensor, next_token: bool = False) -> torch.Tensor:
    """Where token-level ``labels`` count in the loss (``!= -100``), shifted one position left
    for a causal LM (position t predicts ``labels[t + 1]``)."""
    scored = labels != -100
    if next_token:
        scored = torch.cat([scored[:, 1:], torch.zeros_like(scored[:, :1])], dim=1)
    return scored


def example_loss_scale(batch: Mapping[str, torch.Tensor], next_token: bool = False) -> torch.Tensor:
    """``c_i`` with ``∇ℓ_i = c_i · ∇_i L`` for each example i: ``L`` is the batch loss the model
    returns (a mean), ``ℓ_i`` the example's own mean loss and ``∇_i L`` its share of ``∇L``.

    Labels per example (one class, or a multi-label vector): ``c_i = N`` (the batch size). Token
    labels (shaped like ``input_ids``): the model averages over all ``T`` scored tokens of the
    batch, so ``c_i = T / T_i`` (``T_i`` the example's scored tokens; 0 for an example with none,
    which contributes nothing)."""
    labels = batch["labels"]
    tokens = batch.get("input_ids", batch.get("attention_mask"))
    if tokens is None or labels.shape != tokens.shape:
        return torch.full((labels.shape[0],), float(labels.shape[0]), device=labels.device)
    mask = token_mask(batch, next_token)
    scored = mask if mask is not None else scored_labels(labels, next_token).float()
    per_example = scored.sum(dim=1)
    total = per_example.sum()
    return torch.where(per_example > 0, total / per_example.clamp(min=1), 0.0)


def apply_mask(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the rows of padded tokens in a ``[batch, seq, features]`` tensor; other shapes (a
    pooler's ``[batch, features]``) pass unchanged."""
    if mask is None or t.dim() != 3 or t.shape[:2] != mask.shape:
        return t
    return t * mask.unsqueeze(-1).to(t.dtype)


def _no_autocast(device_type: str):
    """A block in which autocast is off on ``device_type`` (nothing to do where it is not on)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


class LastInput:
    """What was kept of the last input tensor a forward hook saw, for the next module called on
    the very same input (query/key/value, gate/up) to reuse. Held by a weak reference, so that a
    freed tensor whose id() is reused is never mistaken for it, and with its version counter, so
    that the same tensor refilled in place (a static buffer, the next step's data) is not
    either."""

    __slots__ = ("_ref", "_version", "kept")

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._version = -1
        self.kept: Any = None

    def holds(self, raw: torch.Tensor) -> bool:
        return self._ref is not None and self._ref() is raw and self._version == raw._version

    def keep(self, raw: torch.Tensor, kept: Any) -> None:
        self._ref, self._version, self.kept = weakref.ref(raw), raw._version, kept


def register_io_hooks(
    modules: Mapping[str, nn.Module],
    callback: IOCallback,
    mask_ref: list,
    keep_input: InputTransform | None = None,
    shared_input: bool = False,
) -> list:
    """Make ``callback(name, kept, g, mask)`` run in the backward pass of every module in ``modules``.

    ``g = ∂L/∂y`` is the gradient of the module's output (detached, float32). ``kept`` is what the
    backward pass needs of the module's (first) input ``x``: ``x`` itself, or, with
    ``keep_input``, ``keep_input(name, x, mask)`` computed in the forward pass, so that a
    statistic that needs only a small function of ``x`` (a sketch ``X Ω``, or nothing at all
    when the x-side statistic is accumulated right there) does not hold ``x`` until backward.
    ``shared_input=True`` declares that ``keep_input`` does not depend on the module: modules
    called one after another on the very same input tensor (query/key/value, gate/up) then
    compute it once. ``mask_ref[0]`` holds the current batch's token mask (set by the caller
    before each forward pass; ``None`` where no masking applies). Forward passes that build no
    graph (``torch.no_grad``, evaluation) are ignored. Returns the forward-hook handles; the
    per-output tensor hooks die with the autograd graph.
    """
    last = LastInput()

    def make_hook(name: str):
        def forward_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            mask = mask_ref[0]
            raw = inputs[0]
            if shared_input and last.holds(raw):
                kept = last.kept
            else:
                x = raw.detach().float()
                # float32 also under a training loop's autocast (bf16/fp16), which would run
                # keep_input's products in half precision (and hand backward a half tensor)
                with _no_autocast(raw.device.type):
                    kept = x if keep_input is None else keep_input(name, x, mask)
                if shared_input:
                    last.keep(raw, kept)
            output.register_hook(lambda g: backward_hook(name, kept, g, mask))

        return forward_hook

    def backward_hook(name: str, kept: Any, g: torch.Tensor, mask: Any) -> None:
        with _no_autocast(g.device.type):  # a backward() called inside an autocast block
            callback(name, kept, g.detach().float(), mask)

    return [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]


@contextmanager
def capture_io(
    modules: Mapping[str, nn.Module],
    callback: IOCallback,
    mask_ref: list,
    keep_input: InputTransform | None = None,
) -> Iterator[None]:
    """:func:`register_io_hooks` for the duration of a ``with`` block; removed on exit, also on error."""
    handles = []
    try:
        handles = register_io_hooks(modules, callback, mask_ref, keep_input)
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def calibration_mode(
    model: nn.Module, trainable: Iterable[nn.Parameter], dropout: bool = False
) -> Iterator[None]:
    """Eval mode (dropout off) unless ``dropout``; only ``trainable`` parameters get gradients.

    On exit every parameter's ``requires_grad`` is restored, every ``.grad`` is cleared (there
    is no optimizer step in a calibration) and the model's train/eval modes are restored.
    """
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    keep = {id(p) for p in trainable}
    try:
        model.train(dropout)
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
            p.grad = None
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        for m, training in modes.items():
            m.training = training


BATCH_FORMAT = (
    "a mapping (dict) of tensors with 'input_ids' [batch, seq], 'attention_mask' [batch, seq] "
    "and 'labels' ([batch] class ids, or [batch, seq] token labels with -100 where not scored), "
    "as a transformers data collator such as DataCollatorWithPadding gives"
)
# Keys a calibration batch passes to the model that must be tensors when present.
TENSOR_KEYS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "inputs_embeds",
    "pixel_values",
    "labels",
)


def check_batch(batch: Any, index: int, *, labels: bool = True, next_token: bool = False) -> None:
    """Refuse a calibration batch that is not :data:`BATCH_FORMAT`, naming what it is instead.

    A plain list or a default-collated tuple ``(input_ids, attention_mask, labels)`` would
    otherwise fail deep inside torch (``Boolean value of Tensor with more than one value is
    ambiguous``). Raises :class:`CalibrationError` (``labels=False``: labels are not required;
    ``next_token``: the model is a causal LM, whose labels are token ids shaped like input_ids).
    """
    if not isinstance(batch, Mapping):
        shape = (
            f"a {type(batch).__name__} of {len(batch)} items"
            if isinstance(batch, (list, tuple))
            else f"a {type(batch).__name__}"
        )
        raise CalibrationError(
            f"calibration batch {index} is {shape}; expected {BATCH_FORMAT}. A DataLoader "
            "without such a collate_fn yields lists/tuples: pass collate_fn=DataCollatorWithPadding"
            "(tokenizer), or turn a batch into dict(input_ids=..., attention_mask=..., labels=...)"
        )
    if labels and "labels" not in batch:
        raise CalibrationError(
            f"calibration batch {index} has no 'labels' (keys: {sorted(batch)}); the Fisher "
            f"statistics need the task loss. Expected {BATCH_FORMAT}"
        )
    loose = {k: type(batch[k]).__name__ for k in TENSOR_KEYS if k in batch}
    loose = {k: kind for k, kind in loose.items() if not torch.is_tensor(batch[k])}
    if loose:
        raise CalibrationError(
            f"calibration batch {index}: {loose} should be torch tensors; expected {BATCH_FORMAT} "
            "(a tokenizer gives tensors with return_tensors='pt')"
        )
    _check_token_shapes(batch, index, next_token)


def _check_token_shapes(batch: Mapping[str, Any], index: int, next_token: bool = False) -> None:
    """Token batches: integer ``input_ids`` ``[batch, (choices,) seq]``, a padding mask of the
    same shape with at least one token, labels with a row per example. A mismatched mask would
    otherwise be skipped by the masking (padding counted in the statistics) without an error. A
    mask of another rank (a custom 4-D ``[batch, 1, seq, seq]`` attention mask) is no padding
    mask and is left to the model. A causal LM (``next_token``) needs a label per token: class
    ids from a classification loader would reach the loss as a batch-size mismatch."""
    ids = batch.get("input_ids")
    if ids is None:
        return
    if ids.ndim < 2 or ids.is_floating_point():
        raise CalibrationError(
            f"calibration batch {index}: input_ids should be integer token ids of shape "
            f"[batch, seq], not {ids.dtype} of shape {list(ids.shape)}"
        )
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != ids.ndim:
        mask = None
    elif mask.shape != ids.shape:
        raise CalibrationError(
            f"calibration batch {index}: attention_mask has shape {list(mask.shape)}, input_ids "
            f"{list(ids.shape)}; they should be the same"
        )
    if mask is not None and not bool(mask.any()):
        raise CalibrationError(
            f"calibration batch {index} is all padding (its attention_mask is zero everywhere)"
        )
    labels = batch.get("labels")
    if labels is not None and (labels.ndim == 0 or labels.shape[0] != ids.shape[0]):
        raise CalibrationError(
            f"calibration batch {index}: labels of shape {list(labels.shape)} for "
            f"{ids.shape[0]} sequences; expected one label (or label row) per sequence"
        )
    if next_token and labels is not None and labels.shape != ids.shape:
        raise CalibrationError(
            f"calibration batch {index}: labels of shape {list(labels.shape)} for input_ids of "
            f"shape {list(ids.shape)}; a causal LM's labels are token ids of the same shape "
            "(-100 where a position is not scored), not class ids"
        )


def first_batches(
    loader: Iterable[Any], n_batches: int, *, labels: bool = True, next_token: bool = False
) -> list[Mapping[str, torch.Tensor]]:
    """The first ``n_batches`` batches of ``loader``, read once and each checked
    (:func:`check_batch`), before a method changes anything: a method that passes over the
    same batches several times (grouped layers) keeps this list, since a loader may reshuffle
    when it is iterated again. Raises ``ConfigError`` for an ``n_batches`` that is not a whole
    number ≥ 1, ``CalibrationError`` for an empty loader or a malformed batch."""
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ConfigError(f"n_batches must be a whole number >= 1, got {n_batches!r}")
    batches = list(itertools.islice(iter(loader), n_batches))
    if not batches:
        raise CalibrationError("the calibration loader yielded no batch")
    for index, batch in enumerate(batches):
        check_batch(batch, index, labels=labels, next_token=next_token)
    return batches


def refuse_unequal_batch_counts(count: int, device: torch.device, why: str) -> None:
    """Under torch.distributed, refuse on every process alike (one collective, so none is left
    waiting) calibration shards with different numbers of batches. ``why``: what needs them
    equal. A statistic that treats each batch's gradient as ``1/world`` of the global batch's
    would otherwise weigh a batch only one process holds wrongly, or a per-batch collective
    would hang."""
    fewest, most = min_and_max(count, device)
    if fewest != most:
        raise CalibrationError(
            f"the processes hold {fewest} to {most} calibration batches; {why} needs the same "
            "number on every process (give each process the same count of batches)"
        )


def calibration_batches(
    loader: Iterable[Mapping[str, torch.Tensor]],
    n_batches: int,
    device: torch.device,
    *,
    progress: bool = True,
    desc: str = "calibration",
) -> Iterator[dict[str, torch.Tensor]]:
    """Up to ``n_batches`` batches from ``loader`` on ``device``, each checked to carry labels.

    Raises :class:`CalibrationError` for an empty loader or a batch without ``labels``; warns,
    naming the count used, when the loader runs out before ``n_batches``.
    """
    if n_batches < 1:
        raise CalibrationError(f"n_batches must be at least 1, got {n_batches}")
    used = 0
    bar = tqdm(total=n_batches, desc=desc, disable=not progress, unit="batch", leave=False)
    try:
        for batch in loader:
            check_batch(batch, used)
            yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            used += 1
            bar.update(1)
            if used == n_batches:
                break
    finally:
        bar.close()
    if used == 0:
        raise CalibrationError("the calibration loader yielded no batch")
    if used < n_batches:
        warnings.warn(
            f"the calibration loader ran out after {used} of the {n_batches} batches asked for; "
            f"the statistics use {used}",
            stacklevel=3,  # the method that called run_passes
        )


class PassStatistic(Protocol):
    """What a set of calibration passes accumulates for one method. Several statistics can share
    the same passes (:func:`run_passes`): a forward/backward pass computes the same ``x`` and ``g``
    at every layer whichever hooks read them, so each gets exactly what passes of its own would
    give it on the same batches."""

    def hooks(self) -> AbstractContextManager:
        """Its hooks, registered for the duration of the passes (removed on exit, also on error)."""
        ...

    def start_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Before the forward pass of ``batch`` (already on the model's device)."""
        ...

    def end_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        """After the backward pass of ``batch``, before the next one."""
        ...


def run_passes(
    model: nn.Module,
    trainable: Iterable[nn.Parameter],
    batches: Iterable[Mapping[str, torch.Tensor]],
    n_batches: int,
    device: torch.device,
    statistics: Sequence[PassStatistic],
    *,
    dropout: bool = False,
    progress: bool = True,
    desc: str = "calibration",
) -> int:
    """Calibration passes: one forward/backward pass of the task loss per batch (up to
    ``n_batches``), in :func:`calibration_mode` with only ``trainable`` taking gradients, and every
    statistic's hooks in place (a causal LM's head runs on the scored window only,
    :func:`fisherlora.logit_window.scored_window`). Returns the number of batches used."""
    used = 0
    # a causal LM's vocabulary head over the scored positions only: the same loss and gradients
    # as the full pass (logit_window.py) without most of the head's work; not where the head is
    # itself adapted, whose statistics' hooks must see every position the batch's masks cover
    full_head = _head_is_adapted(model)
    with calibration_mode(model, trainable, dropout=dropout), ExitStack() as hooks:
        for statistic in statistics:
            hooks.enter_context(statistic.hooks())
        for batch in calibration_batches(batches, n_batches, device, progress=progress, desc=desc):
            for statistic in statistics:
                statistic.start_batch(batch)
            model(**(batch if full_head else scored_window(model, batch))).loss.backward()
            for statistic in statistics:
                statistic.end_batch(batch)
            used += 1
    return used


def _head_is_adapted(model: nn.Module) -> bool:
    """Whether the model's output head (a causal LM's ``lm_head``) carries a LoRA adapter."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return head is not None and hasattr(head, "lora_A")


def check_finite(name: str, tensor: torch.Tensor, what: str = "gradient") -> None:
    if not torch.isfinite(tensor).all():
        raise CalibrationError(
            f"non-finite {what} (NaN or inf) in module {name!r} during calibration; check the data "
            "and the model's dtype (fp16 overflows easily)"
        )


def check_all_finite(tensors: Mapping[str, torch.Tensor], what: str = "gradient") -> None:
    """:func:`check_finite` for many modules with one device-to-host transfer: the flags are
    reduced on the device and read once (on a GPU, one sync per call instead of one per module).
    The error names the first module (in ``tensors``' order) that is not finite."""
    if not tensors:
        return
    flags = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).cpu()
    if bool(flags.all()):
        return
    name = list(tensors)[int((~flags).nonzero()[0])]
    check_finite(name, tensors[name], what)


def layer_groups(names: list[str], layers_per_pass: int | None) -> list[list[str]]:
    """Consecutive groups of ``layers_per_pass`` module names (one group of all when None)."""
    if layers_per_pass is None:
        return [names]
    whole = isinstance(layers_per_pass, int) and not isinstance(layers_per_pass, bool)
    if not whole or layers_per_pass < 1:
        raise ConfigError(f"layers_per_pass must be a whole number >= 1, got {layers_per_pass!r}")
    return [names[i : i + layers_per_pass] for i in range(0, len(names), layers_per_pass)]
