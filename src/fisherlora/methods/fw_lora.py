"""FW-LoRA: a Fisher-weighted penalty on the LoRA updates.

1. Warm-up, optimizer steps ``t ≤ K``: per module ``F_m ← α F_m + (1 − α) ‖∇W_m‖²_F`` with
   ``∇W_m = Gᵀ X`` the gradient the frozen weight would get (never materialised as ``W.grad``):
   ``estimator="exact"`` forms ``GᵀX`` in the backward hook; ``estimator="sketch"`` keeps
   ``Gᵀ (X Ω)`` for k shared Gaussian probes and uses ``‖GᵀXΩ‖²_F / k`` (unbiased, relative
   standard deviation ≤ √(2/k); one draw can be off by more). Both sum over the micro-batches
   of a step (and over processes) before squaring.
2. After step K: ``I_m = F_m / Σ_k F_k`` (``normalize="max"``: ``F_m / max_k F_k``), frozen;
   the hooks are removed, so the rest of training pays nothing for them.
3. ``penalty = λ Σ_m (1 − I_m) ‖ΔW_m‖²_F`` with ``I_m = 0`` during warm-up (the paper's
   Algorithm 1), where ``ΔW = s (B A − B₀ A₀)`` is the update from the *pretrained* weight and
   ``A₀, B₀`` are the factors the adapter held when the penalty was created. With a plain LoRA
   init ``B₀ = 0`` and this is the paper's ``‖s B A‖²_F``; after a residual init (FILet, or any
   ``W_res = W − s B₀ A₀``) the pretrained weight is ``W_res + s B₀ A₀``, so penalising
   ``‖s B A‖²`` would pull the model toward ``W_res`` instead. From r×r work only:

       ‖B A − B₀ A₀‖²_F = tr((A Aᵀ)(Bᵀ B)) − 2 tr((A₀ Aᵀ)(Bᵀ B₀)) + tr((A₀ A₀ᵀ)(B₀ᵀ B₀))

   (the last term a constant, so the penalty is exactly zero right after such an init). Its
   gradient, with ``c_m = λ (1 − I_m) s_m²``, is also r×r work on top of one product with A or B:

       ∂/∂A = 2 c_m Bᵀ(B A − B₀ A₀) = 2 c_m ((Bᵀ B) A − (Bᵀ B₀) A₀)
       ∂/∂B = 2 c_m (B A − B₀ A₀) Aᵀ = 2 c_m (B (A Aᵀ) − B₀ (A₀ Aᵀ))

   Both are evaluated by one autograd node for all modules (:class:`UpdatePenalty`, batched
   over modules of one width) instead of a graph of stacks and small products, so the penalty
   is still an ordinary scalar in the loss. The runner adds it at every micro-batch, divided
   by the accumulation steps and multiplied by a GradScaler's scale with the task loss; its
   gradient reaches ``.grad`` in that same backward pass, i.e. before ``unscale_``, clipping
   and the optimizer step, exactly where the autograd graph of the traces put it.
   ``mode="decay"`` is the paper's one-liner: no loss term; each module's A and B get their own
   AdamW group whose decoupled weight decay is the optimizer's ``weight_decay · (1 − I_m)``
   (``weight_decay`` itself during warm-up). Decoupled decay shrinks A and B toward zero, which
   is toward the pretrained weight only when ``B₀ = 0``: after a residual init it is refused.
"""

from __future__ import annotations

import json
import math
import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import pad_sequence

from fisherlora.adapters import has_residual, lora_layers
from fisherlora.capture import LastInput, check_finite
from fisherlora.errors import ConfigError, check_choices
from fisherlora.figures import Figure, ModuleValues
from fisherlora.methods.base import AdapterMethod
from fisherlora.stats import all_reduce_mean

ESTIMATORS = ("sketch", "exact")
NORMALIZE = ("sum", "max")
MODES = ("loss", "decay")
DEFAULT_DECAY = 0.98  # the EMA factor β of the warm-up Fisher estimate


def check_options(
    *,
    warmup_steps: int,
    decay: float,
    lam: float,
    estimator: str,
    probes: int,
    normalize: str,
    mode: str,
    seed: int = 0,
) -> None:
    """Raise ``ConfigError`` for FW-LoRA options that cannot run, naming them (before a model is
    touched: :class:`FwLoRA` checks them when it is made, ahead of a composition's other inits)."""
    check_choices(
        "FW-LoRA",
        (
            ("estimator", estimator, ESTIMATORS),
            ("normalize", normalize, NORMALIZE),
            ("mode", mode, MODES),
        ),
    )
    whole = [
        f"{label}={value!r}"
        for label, value in (("warmup_steps", warmup_steps), ("probes", probes), ("seed", seed))
        if isinstance(value, bool) or not isinstance(value, int)
    ]
    if whole:  # a fractional warm-up would never end (the step count never equals it)
        raise ConfigError(f"FW-LoRA needs whole numbers for {', '.join(whole)}")
    if not (warmup_steps >= 0 and probes >= 1 and 0.0 <= decay < 1.0 and 0.0 <= lam < math.inf):
        raise ConfigError(
            "FW-LoRA needs warmup_steps >= 0, probes >= 1, 0 <= decay < 1 and a finite lam >= 0; "
            f"got warmup_steps={warmup_steps}, probes={probes}, decay={decay}, lam={lam}"
        )


@dataclass(eq=False)
class ModuleGroup:
    """LoRA modules of one input and output width on one device, stacked for batched r×r work.

    Ranks may differ within a group (after a rank allocation): A is zero-padded to ``[R, n]``
    and B to ``[m, R]`` with ``R`` the largest rank, which changes no trace and no gradient
    of the real entries."""

    indices: list[int]  # the modules' positions in FisherPenalty.names
    start: int  # where the group's A factors begin in the flat factor list (then its B factors)
    ranks: list[int]
    device: torch.device
    dtype: torch.dtype  # of the r×r work: float32, or float64 for a float64 model
    # (A₀ [G, R, n], B₀ [G, m, R], ‖B₀ A₀‖²_F [G]); None where every B₀ is zero
    initial: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    coefficients: torch.Tensor | None = None  # c_m = λ (1 − I_m) s_m², [G]

    @property
    def size(self) -> int:
        return len(self.indices)

    @property
    def uniform(self) -> bool:
        return min(self.ranks) == max(self.ranks)

    def stack(self, factors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's A and B factors as ``[G, R, n]`` and ``[G, m, R]`` (half precision as
        float32)."""
        a_list = factors[self.start : self.start + self.size]
        b_list = factors[self.start + self.size : self.start + 2 * self.size]
        if self.uniform:
            a, b = torch.stack(a_list), torch.stack(b_list)
        else:
            a = pad_sequence(list(a_list), batch_first=True)
            b = pad_sequence([w.mT for w in b_list], batch_first=True).mT
        dtype = torch.promote_types(a.dtype, torch.float32)
        return a.to(dtype), b.to(dtype)

    def unstack(
        self, ga: torch.Tensor, gb: torch.Tensor, factors: tuple[torch.Tensor, ...]
    ) -> list[torch.Tensor]:
        """Per-module gradients (A's then B's, in the dtype of each factor) from the stacked ones."""
        dtype = factors[self.start].dtype
        ga, gb = ga.to(dtype), gb.to(dtype)
        if self.uniform:
            return [*ga.unbind(0), *gb.unbind(0)]
        return [ga[i, :r] for i, r in enumerate(self.ranks)] + [
            gb[i, :, :r] for i, r in enumerate(self.ranks)
        ]


class UpdatePenalty(torch.autograd.Function):
    """``Σ_m c_m ‖B_m A_m − B₀_m A₀_m‖²_F`` over every group, one autograd node in all.

    ``forward(groups, *factors)``: ``factors`` are each group's A factors then its B factors
    (``ModuleGroup.start`` says where); the value is formed from the r×r products
    ``P = A Aᵀ``, ``Q = Bᵀ B``, ``C_A = A A₀ᵀ``, ``C_B = Bᵀ B₀`` as
    ``⟨P, Q⟩ − 2 ⟨C_A, C_B⟩ + ‖B₀ A₀‖²``. ``backward`` returns the analytic gradients
    ``∂/∂A = 2c (Q A − C_B A₀)`` and ``∂/∂B = 2c (B P − B₀ C_Aᵀ)``, a few batched products per
    group, instead of differentiating through a graph of stacks and small products.
    """

    @staticmethod
    def forward(ctx, groups: list[ModuleGroup], *factors: torch.Tensor) -> torch.Tensor:
        total = None
        saved = []
        for group in groups:
            a, b = group.stack(factors)
            p, q = a @ a.mT, b.mT @ b  # [G, R, R]
            squares = (p * q).sum(dim=(1, 2))
            ca = cb = initial = None
            if group.initial is not None:  # no copies unless the model changed dtype
                initial = tuple(t.to(a.dtype) for t in group.initial)
                a0, b0, constant = initial
                ca, cb = a @ a0.mT, b.mT @ b0
                squares = squares - 2 * (ca * cb).sum(dim=(1, 2)) + constant
            coefficients = group.coefficients.to(a.dtype)
            value = coefficients @ squares
            total = value if total is None else total + value.to(total.device)
            # what backward needs, as of this forward (also should the group change meanwhile)
            saved.append((group, a, b, p, q, ca, cb, coefficients, initial))
        ctx.saved, ctx.factors = saved, factors
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grads: list[torch.Tensor] = []
        for group, a, b, p, q, ca, cb, coefficients, initial in ctx.saved:
            weight = (2 * grad.to(a.device) * coefficients)[:, None, None]  # 2c, [G, 1, 1]
            ga = (weight * q) @ a  # 2c Bᵀ B A
            gb = b @ (weight * p)  # 2c B A Aᵀ
            if initial is not None:
                a0, b0, _ = initial
                ga = ga.baddbmm_(weight * cb, a0, alpha=-1)  # − 2c Bᵀ B₀ A₀
                gb = gb.baddbmm_(b0, (weight * ca).mT, alpha=-1)  # − 2c B₀ A₀ Aᵀ
            grads += group.unstack(ga, gb, ctx.factors)
        return (None, *grads)


# the FisherPenalty last made on each model (weakly held on both sides)
_PENALTIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FisherPenalty:
    """FW-LoRA's penalty for any training loop (see the module docstring for the equations).

    Create it *after* any initialisation of the adapters (FILet, PiSSA-style residual inits):
    the factors it finds then, ``A₀`` and ``B₀``, are taken as the starting point, i.e. the
    pretrained weight is ``W_res + s B₀ A₀``, and the penalty measures the update from there.

    Usage, once per optimizer step::

        penalty = FisherPenalty(model, warmup_steps=500)
        for batch in batches:                                   # micro-batches of one step
            (model(**batch).loss + penalty.penalty()).backward()
        optimizer.step(); penalty.step(); optimizer.zero_grad()

    Args:
        model: a ``PeftModel`` with one LoRA adapter on ``nn.Linear`` layers.
        warmup_steps: K, the optimizer steps over which F is estimated (0: I stays 0).
        decay: α of the moving average.
        lam: λ, the penalty weight (unused in ``mode="decay"``, which scales the optimizer's
            own weight decay).
        estimator: ``"sketch"`` (default) or ``"exact"`` (memory: one ``W``-sized sum per module
            during warm-up).
        probes: k, the number of Gaussian probes of the sketch.
        normalize: ``"sum"`` (the paper) or ``"max"``.
        mode: ``"loss"`` (default, exact penalty) or ``"decay"`` (use :meth:`param_groups`;
            refused when the adapters start from ``B₀ ≠ 0``).
        seed: the probes of step t are drawn from ``(seed, t)``, the same on every process.
        grad_scaler: the ``torch.amp.GradScaler`` of an fp16 run. The hooks then see gradients
            of the *scaled* loss; each step's products are divided by the scale that step's
            backward used, so F does not depend on the loss scale, and a step whose gradients
            overflowed (the scaler skips its optimizer step) leaves F unchanged.
    """

    def __init__(
        self,
        model: PeftModel,
        *,
        warmup_steps: int = 500,
        decay: float = DEFAULT_DECAY,
        lam: float = 1e-4,
        estimator: str = "sketch",
        probes: int = 8,
        normalize: str = "sum",
        mode: str = "loss",
        seed: int = 0,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        check_options(
            warmup_steps=warmup_steps,
            decay=decay,
            lam=lam,
            estimator=estimator,
            probes=probes,
            normalize=normalize,
            mode=mode,
            seed=seed,
        )
        self.adapter, self.layers = lora_layers(model)
        self._model = weakref.ref(model)  # to notice an init that comes after the penalty
        self.names = list(self.layers)
        self.warmup_steps, self.decay, self.lam = warmup_steps, decay, lam
        self.estimator, self.probes, self.normalize, self.mode, self.seed = (
            estimator,
            probes,
            normalize,
            mode,
            seed,
        )
        self.grad_scaler = grad_scaler
        self._loss_scale: float | None = None  # the scale of this step's backward passes
        self.skipped_steps = 0
        self.step_count = 0
        self.fisher = torch.zeros(len(self.names), dtype=torch.float64)
        self.importance_ = torch.zeros(len(self.names), dtype=torch.float64)
        self.last_proxy: dict[str, float] = {}
        # This step's summed products, per module a view into one flat buffer that the backward
        # hooks fill in place; only the modules this step's batches reached are listed.
        self._pending: dict[str, torch.Tensor] = {}
        self._buffer: torch.Tensor | None = None
        self._views: dict[str, torch.Tensor] = {}
        self._probe_cache: dict[tuple[int, str], torch.Tensor] = {}
        self._groups: list[dict] = []
        self._base_decay = 0.0  # the optimizer's weight decay that mode="decay" scales
        self._coefficients: torch.Tensor | None = None  # c_m = λ (1 − I_m) s_m², [modules]
        layers = list(self.layers.values())
        self._a = [layer.lora_A[self.adapter].weight for layer in layers]
        self._b = [layer.lora_B[self.adapter].weight for layer in layers]
        # where the model keeps each layer's factor modules (to notice one replaced later)
        self._slots = [(layer.lora_A._modules, layer.lora_B._modules) for layer in layers]
        self._plan, self._factors = self._make_plan()
        self._set_initial(
            {
                i: (a.detach().clone(), b.detach().clone())
                for i, (a, b) in enumerate(zip(self._a, self._b, strict=True))
                if b.detach().any()
            }
        )
        if self.residual_init and mode == "decay":
            raise ConfigError(
                "FW-LoRA mode='decay' after an init with B0 != 0 (FILet or another residual "
                "init): weight decay pulls A and B toward zero, i.e. the model toward W - s B0 A0 "
                "instead of the pretrained weight; use mode='loss', which penalises s (B A - B0 A0)"
            )
        # one penalty per model: the hooks of an earlier one still in its warm-up (a training run
        # that stopped early, a second penalty made by mistake) would go on accumulating into it
        # at every step, since its hooks keep it alive
        earlier = _PENALTIES.get(model)
        earlier = earlier() if earlier is not None else None
        if earlier is not None and earlier._handles:
            earlier.remove_hooks()
            warnings.warn(
                "this model's earlier FisherPenalty was still in its warm-up: its hooks were "
                "removed (one penalty per model)",
                stacklevel=2,
            )
        _PENALTIES[model] = weakref.ref(self)
        self._handles = self._register_hooks() if warmup_steps > 0 else []

    def _make_plan(self) -> tuple[list[ModuleGroup], list[torch.Tensor]]:
        """Modules grouped by (input width, output width, device), and the flat factor list
        :class:`UpdatePenalty` takes (each group's A factors, then its B factors)."""
        by_width: dict[tuple, list[int]] = {}
        for i, (a, b) in enumerate(zip(self._a, self._b, strict=True)):
            by_width.setdefault((a.shape[1], b.shape[0], a.device), []).append(i)
        plan, factors = [], []
        for (*_, device), indices in by_width.items():
            plan.append(
                ModuleGroup(
                    indices=indices,
                    start=len(factors),
                    ranks=[self._a[i].shape[0] for i in indices],
                    device=device,
                    dtype=torch.promote_types(self._a[indices[0]].dtype, torch.float32),
                )
            )
            factors += [self._a[i] for i in indices] + [self._b[i] for i in indices]
        return plan, factors

    def _set_initial(self, initial: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Take ``{module index: (A₀, B₀)}`` as the starting point (modules not in it start
        from ``B₀ = 0``), stacked per group as :class:`UpdatePenalty` reads it."""
        self.residual_init = bool(initial)
        for group in self._plan:
            members = [(j, i) for j, i in enumerate(group.indices) if i in initial]
            if not members:
                group.initial = None
                continue
            first = group.indices[0]
            rank, n, m = max(group.ranks), self._a[first].shape[1], self._b[first].shape[0]
            a0 = torch.zeros(group.size, rank, n, device=group.device, dtype=group.dtype)
            b0 = torch.zeros(group.size, m, rank, device=group.device, dtype=group.dtype)
            for j, i in members:
                a, b = initial[i]
                a0[j, : a.shape[0]] = a.to(a0)
                b0[j, :, : b.shape[1]] = b.to(b0)
            constant = ((a0 @ a0.mT).double() * (b0.mT @ b0).double()).sum(dim=(1, 2))
            group.initial = (a0, b0, constant.to(group.dtype))

    def _initial_by_module(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (A₀, B₀)}`` of the modules that start from ``B₀ ≠ 0``."""
        out = {}
        for group in self._plan:
            if group.initial is None:
                continue
            a0, b0, _ = group.initial
            for j, (i, r) in enumerate(zip(group.indices, group.ranks, strict=True)):
                if b0[j].any():
                    out[self.names[i]] = (a0[j, :r].clone(), b0[j, :, :r].clone())
        return out

    def _legacy_initial(self, stacked: list) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The per-module starting points in a state saved while modules were grouped by the
        shapes of A and B (a list over those groups, in order of first appearance, of stacked
        ``(A₀, B₀, constant)`` or None)."""
        by_shape: dict[tuple, list[int]] = {}
        for i, (a, b) in enumerate(zip(self._a, self._b, strict=True)):
            by_shape.setdefault(tuple(a.shape) + tuple(b.shape), []).append(i)
        out = {}
        for indices, initial in zip(by_shape.values(), stacked, strict=True):
            if initial is not None:
                a0, b0, _ = initial
                out |= {i: (a0[j], b0[j]) for j, i in enumerate(indices) if b0[j].any()}
        return out

    # -- warm-up -------------------------------------------------------------------------------
    @property
    def warming_up(self) -> bool:
        return self.step_count < self.warmup_steps

    def _probe_matrix_t(self, n: int, device: torch.device) -> torch.Tensor:
        """Ωᵀ ([k, n], contiguous) of this step for inputs of width n, shared by all such layers."""
        key = (n, device)
        if key not in self._probe_cache:
            generator = torch.Generator().manual_seed(
                self.seed * 1_000_003 + self.step_count * 7_919 + n
            )
            omega = torch.randn(n, self.probes, generator=generator)
            self._probe_cache[key] = omega.T.contiguous().to(device)
        return self._probe_cache[key]

    def _register_hooks(self) -> list:
        """A forward hook on every LoRA layer that keeps ``(X Ω)ᵀ`` and hooks the gradient of
        the layer's output, where :meth:`_accumulate` adds ``(X Ω)ᵀ G`` to the step's buffer.

        What ``capture.register_io_hooks(..., shared_input=True)`` does, pared down to the
        per-module work this runs at every training step of the warm-up: layers called one after
        another on the very same input tensor (query/key/value, gate/up) share one ``(X Ω)ᵀ``
        (``capture.LastInput``);
        forward passes that build no graph are ignored; the gradient hook is a bound
        ``partial``; autocast is switched off only where it is on.
        """
        last = LastInput()

        def make_hook(name: str):
            def forward_hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor):
                if not output.requires_grad:
                    return
                raw = inputs[0]
                if last.holds(raw):
                    kept = last.kept
                else:
                    kept = self._keep_input(raw)
                    last.keep(raw, kept)
                output.register_hook(partial(self._accumulate, name, kept))

            return forward_hook

        return [module.register_forward_hook(make_hook(n)) for n, module in self.layers.items()]

    def _keep_input(self, raw: torch.Tensor) -> torch.Tensor:
        # The sketch needs only (X Ω)ᵀ = Ωᵀ Xᵀ ([k, tokens]) in backward, not x itself. Formed
        # with k as the short output side: on CPU BLAS that is ~3x faster than X @ Ω. Float32
        # also under a training loop's autocast (bf16/fp16), which would run it in half
        # precision.
        x = raw.detach().reshape(-1, raw.shape[-1])
        if x.dtype != torch.float32:
            x = x.float()
        if self.estimator == "exact":
            return x
        probes = self._probe_matrix_t(x.shape[-1], x.device)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return probes @ x.mT
        return probes @ x.mT

    def _accumulate(self, name: str, kept: torch.Tensor, g: torch.Tensor) -> None:
        # Padded tokens carry g = 0, so Xᵀ G is the true weight gradient (transposed) without
        # any mask; the sketch forms (X Ω)ᵀ G = (Gᵀ X Ω)ᵀ, of the same norm. Summed in place
        # into the module's view of the step's buffer: no temporaries, no per-step allocation
        # (an in-place addmm_ is not autocast, so it runs in float32 also inside autocast).
        g = g.detach().reshape(-1, g.shape[-1])
        if g.dtype != torch.float32:
            g = g.float()
        left = kept.mT if self.estimator == "exact" else kept  # [n or k, tokens]
        alpha = 1.0
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            if self._loss_scale is None:  # read once per step (a device sync on GPU)
                self._loss_scale = float(self.grad_scaler.get_scale())
            alpha = 1.0 / self._loss_scale
        pending = self._pending.get(name)
        if pending is None:  # the step's first product overwrites what the buffer held
            if self._buffer is None:
                self._allocate()
            pending = self._pending[name] = self._views[name]
            pending.addmm_(left, g, beta=0, alpha=alpha)
        else:
            pending.addmm_(left, g, alpha=alpha)

    def _allocate(self) -> None:
        """The flat buffer of every module's product ([k, out], or [in, out] for the exact
        estimator), laid out in blocks of equal shape so that the sketch's norms are a few
        batched reductions; one all-reduce per step sends all of it."""
        blocks: dict[tuple[int, int], list[int]] = {}
        for i, layer in enumerate(self.layers.values()):
            rows = self.probes if self.estimator == "sketch" else layer.in_features
            blocks.setdefault((rows, layer.out_features), []).append(i)
        total = sum(rows * m * len(indices) for (rows, m), indices in blocks.items())
        self._buffer = torch.zeros(total, device=self._a[0].device)
        self._blocks, order, offset = [], [], 0
        for (rows, m), indices in blocks.items():
            self._blocks.append((offset, len(indices), rows * m))
            for i in indices:
                self._views[self.names[i]] = self._buffer[offset : offset + rows * m].view(rows, m)
                offset += rows * m
            order += indices
        # position in buffer order of each module (in self.names order)
        self._inverse = torch.argsort(torch.tensor(order)).to(self._buffer.device)

    def _check_factors_current(self) -> None:
        """Refuse to go on with factors that are no longer the model's: the penalty holds the A, B
        (and A₀, B₀) it was made with, so a rank allocation or another init that replaces the
        factor modules (FIM-LoRA, EVA, PEFT's ``update_layer``), or a FILet init (B₀ ≠ 0,
        residual base weights), after it would leave it penalising stale tensors. Plain dict
        lookups, about 1 µs per module (``nn.Module.__getattr__`` would cost ten times that)."""
        adapter = self.adapter
        replaced = [
            name
            for name, (a_slots, b_slots), a, b in zip(
                self.names, self._slots, self._a, self._b, strict=True
            )
            if a_slots[adapter]._parameters["weight"] is not a
            or b_slots[adapter]._parameters["weight"] is not b
        ]
        model = self._model()
        residual_after = model is not None and has_residual(model) and not self.residual_init
        if replaced or residual_after:
            what = (
                f"the LoRA factors of {replaced[:3]} were replaced"
                if replaced
                else "FILet rewrote the adapters as a residual init"
            )
            raise ConfigError(
                f"{what} after this FisherPenalty was made; make the penalty after every "
                "initialisation (rank allocation, FILet), as the methods' prepare does"
            )

    def step(self) -> None:
        """Advance the schedule by one optimizer step (call after ``optimizer.step()``)."""
        self._check_factors_current()
        if self.warming_up:
            proxy = self._frozen_grad_sq_norms().cpu()  # one device sync per step
            finite = bool(torch.isfinite(proxy).all())
            if not finite and not (self.grad_scaler and self.grad_scaler.is_enabled()):
                # refused: this step's products go, so that the next step starts clean (the
                # schedule, F and the hooks stay as they were)
                self._loss_scale = None
                self._pending.clear()
                self._probe_cache.clear()
                bad = int((~torch.isfinite(proxy)).nonzero()[0])
                check_finite(self.names[bad], proxy[bad], "frozen-weight gradient norm")
            self.last_proxy = dict(zip(self.names, proxy.tolist(), strict=True))
            if finite:
                self.fisher = self.decay * self.fisher + (1 - self.decay) * proxy
            else:  # fp16 overflow: the scaler skips this optimizer step, and F skips it too
                self.skipped_steps += 1
            self._loss_scale = None
            self._pending.clear()
            self._probe_cache.clear()
        self.step_count += 1
        if self.step_count == self.warmup_steps:
            self._freeze()

    def _frozen_grad_sq_norms(self) -> torch.Tensor:
        """``‖∇W_m‖²_F`` of every module (float64, ``[modules]``) from this step's summed products.

        All modules' products live in one flat buffer: one all-reduce per step (the frozen
        weight's gradient under DDP is the mean over processes, taken before squaring), then
        one batched sum of squares per block of equal shape, instead of a collective and four
        kernels per module. Every process reduces every module, also one its batches did not
        reach (zeros).
        """
        if self._buffer is None:
            self._allocate()
        if len(self._pending) < len(self.names):
            for name, view in self._views.items():
                if name not in self._pending:
                    view.zero_()
        flat = all_reduce_mean(self._buffer)
        if self.estimator == "exact":
            # W-sized products (10.8 M floats on MiniLM): a float64 copy of the whole buffer
            # would add ~80 MiB; one module at a time stays small.
            return torch.stack([self._views[n].double().square().sum() for n in self.names])
        squared = torch.cat(
            [
                flat[start : start + count * size].view(count, size).double().square().sum(1)
                for start, count, size in self._blocks
            ]
        )
        return squared.index_select(0, self._inverse) / self.probes

    def _freeze(self) -> None:
        self.remove_hooks()  # the warm-up is over, whether or not it saw a signal
        reference = self.fisher.sum() if self.normalize == "sum" else self.fisher.max()
        if not reference > 0:
            skipped = (
                f"; all {self.skipped_steps} warm-up steps overflowed in fp16 and were skipped"
                if self.skipped_steps == self.warmup_steps
                else "; check that the penalty's step() runs after backward passes"
            )
            raise ConfigError(
                "FW-LoRA saw no gradient signal during warm-up (all frozen-weight gradient norms "
                f"are zero){skipped}"
            )
        self.importance_ = self.fisher / reference
        self._coefficients = None
        self._buffer, self._views = None, {}
        self._apply_decay()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def pause_warmup(self) -> None:
        """Take the warm-up's hooks off while no training runs (a run that ended inside its
        warm-up, e.g. ``warmup_steps`` ≥ the run's steps): backward passes outside training
        must not count towards F, and the model should not carry the hooks. F, the step count
        and the schedule stay as they are; :meth:`resume_warmup` puts the hooks back."""
        self.remove_hooks()
        self._loss_scale = None
        self._pending.clear()
        self._probe_cache.clear()

    def resume_warmup(self) -> None:
        """Hooks back on for a warm-up that goes on (after :meth:`pause_warmup`, or a state
        loaded from inside the warm-up); nothing to do after it. Refused (``ConfigError``) where
        a newer penalty was made on the model since: one penalty per model."""
        if not self.warming_up or self._handles:
            return
        model = self._model()
        current = _PENALTIES.get(model) if model is not None else None
        if current is not None and current() is not self:
            raise ConfigError(
                "a newer FisherPenalty was made on this model since this one's warm-up paused: "
                "one penalty per model, so this one's warm-up cannot go on"
            )
        self._handles = self._register_hooks()

    # -- the penalty ---------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """``λ Σ_m (1 − I_m) s_m² ‖B A − B₀ A₀‖²_F`` (module docstring); zero in ``mode="decay"``.

        One :class:`UpdatePenalty` node: its value from r×r products, its gradient (added to A
        and B by the backward pass like any other term of the loss) from the analytic formula,
        a few batched products per group of modules of one width."""
        self._check_factors_current()
        if self.mode == "decay" or self.lam == 0:
            return torch.zeros((), device=self._a[0].device, dtype=torch.float32)
        if self._coefficients is None:  # λ (1 − I_m) s_m², refreshed when I changes
            scaling = torch.tensor(
                [layer.scaling[self.adapter] for layer in self.layers.values()], dtype=torch.float64
            )
            self._coefficients = self.lam * (1 - self.importance_) * scaling**2
            for group in self._plan:
                group.coefficients = self._coefficients[group.indices].to(group.device, group.dtype)
        device_type = self._a[0].device.type
        if torch.is_autocast_enabled(device_type):  # a Trainer's compute_loss runs in autocast
            with torch.autocast(device_type, enabled=False):  # the r×r products in float32
                return UpdatePenalty.apply(self._plan, *self._factors)
        return UpdatePenalty.apply(self._plan, *self._factors)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups for ``mode="decay"`` (the paper's one-liner): one per module
        with its A and B and the decay ``weight_decay · (1 − I_m)`` (``weight_decay`` during
        warm-up; add a group for any other trainable parameters yourself). The optimizer keeps
        these very dicts, so :meth:`step` updates the decays in place."""
        if not weight_decay > 0:
            raise ConfigError(
                "FW-LoRA mode='decay' multiplies the optimizer's weight decay by (1 - I_m); with "
                f"weight_decay={weight_decay} it does nothing. Set a positive weight decay "
                "(--weight-decay), or use mode='loss'"
            )
        self._base_decay = weight_decay
        self._groups = [
            {
                "params": [layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight],
                "weight_decay": weight_decay,
                "fisher_module": name,
            }
            for name, layer in self.layers.items()
        ]
        self._apply_decay()
        return self._groups

    def bind(self, optimizer_groups: list[dict]) -> None:
        """Use the optimizer's own group dicts from now on (matched by ``fisher_module``): a
        resumed optimizer's ``load_state_dict`` replaced those :meth:`param_groups` returned,
        and the decays set at the end of warm-up must reach the optimizer."""
        by_module = {g["fisher_module"]: g for g in optimizer_groups if "fisher_module" in g}
        if self._groups and set(by_module) != {g["fisher_module"] for g in self._groups}:
            raise ConfigError(
                "the optimizer's FW-LoRA decay groups are not this penalty's modules; was it "
                "made from param_groups() of another model?"
            )
        self._groups = [by_module[name] for name in self.layers if name in by_module]
        if self._groups:
            self._apply_decay()

    def _apply_decay(self) -> None:
        for i, group in enumerate(self._groups):
            group["weight_decay"] = self._base_decay * (1 - float(self.importance_[i]))

    # -- reporting and checkpoints ---------------------------------------------------------------
    def importance(self) -> dict[str, float]:
        """``I_m`` per module (all zero during warm-up)."""
        return dict(zip(self.names, self.importance_.tolist(), strict=True))

    def spread(self) -> dict[str, float]:
        """How uneven the weighting is: ``max I / min I`` and the range of ``1 − I_m``."""
        i = self.importance_
        return {
            "max_over_min_importance": float(i.max() / i.min()) if i.min() > 0 else float("inf"),
            "min_one_minus_importance": float((1 - i).min()),
            "max_one_minus_importance": float((1 - i).max()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step_count,
            "fisher": self.fisher.clone(),
            "importance": self.importance_.clone(),
            "names": list(self.names),
            "warmup_steps": self.warmup_steps,
            # the starting point (A₀, B₀) of every module with B₀ ≠ 0, so a penalty created on a
            # model that already trained still measures from the pretrained weight
            "initial_factors": self._initial_by_module(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names or state["warmup_steps"] != self.warmup_steps:
            raise ConfigError(
                "this FW-LoRA state belongs to other modules or another warm-up length"
            )
        self.step_count = int(state["step"])
        self.fisher = state["fisher"].clone().to(torch.float64)
        self.importance_ = state["importance"].clone().to(torch.float64)
        if "initial_factors" in state:
            index = {name: i for i, name in enumerate(self.names)}
            self._set_initial({index[n]: f for n, f in state["initial_factors"].items()})
        elif "initial" in state:  # saved by a version that grouped modules by factor shapes
            self._set_initial(self._legacy_initial(state["initial"]))
        self._coefficients = None
        self._pending.clear()
        if not self.warming_up:
            self.remove_hooks()
            self._buffer, self._views = None, {}
            self._apply_decay()
        else:  # back into the warm-up after it had ended here: hooks again
            self.resume_warmup()


class FwLoRA(AdapterMethod):
    """Runner method ``fw-lora``: a :class:`FisherPenalty` added to the loss (or as weight decay)."""

    name = "fw-lora"

    def __init__(
        self,
        steps: int = 300,
        fw_warmup_steps: int | None = None,
        fw_lambda: float = 1e-4,
        fw_estimator: str = "sketch",
        fw_probes: int = 8,
        fw_normalize: str = "sum",
        fw_mode: str = "loss",
        seed: int = 0,
        grad_scaler: torch.amp.GradScaler | None = None,  # the runner's, under --precision fp16
    ) -> None:
        warmup = default_warmup(steps) if fw_warmup_steps is None else fw_warmup_steps
        if isinstance(warmup, int) and warmup >= steps > 0:
            warnings.warn(
                f"FW-LoRA's warm-up ({warmup} steps) is not shorter than the run ({steps} steps): "
                "the Fisher weights are never used, and the whole run has the unweighted penalty "
                "of the warm-up (I = 0)",
                stacklevel=2,
            )
        self.grad_scaler = grad_scaler
        self.options = dict(
            warmup_steps=warmup,
            lam=fw_lambda,
            estimator=fw_estimator,
            probes=fw_probes,
            normalize=fw_normalize,
            mode=fw_mode,
            seed=seed,
        )
        # refused here, before a composition's earlier members have changed the model
        check_options(decay=DEFAULT_DECAY, **self.options)
        self.penalty: FisherPenalty | None = None
        self.penalty_history: list[float] = []

    def prepare(self, model: PeftModel, calibration_loader: Iterable) -> dict[str, Any]:
        self.penalty = FisherPenalty(model, **self.options, grad_scaler=self.grad_scaler)
        return {"fw_lora": {k: v for k, v in self.options.items()}}

    def param_groups(self, model: PeftModel, weight_decay: float) -> list[dict]:
        if self.penalty is None or self.penalty.mode != "decay":
            return super().param_groups(model, weight_decay)
        groups = self.penalty.param_groups(weight_decay)
        grouped = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in grouped]
        return [*groups, {"params": rest, "weight_decay": weight_decay}]

    def optimizer_ready(self, optimizer: torch.optim.Optimizer) -> None:
        if self.penalty is not None and self.penalty.mode == "decay":
            self.penalty.bind(optimizer.param_groups)

    def loss(self, model: PeftModel, step: int) -> torch.Tensor | None:
        if self.penalty is None or self.penalty.mode == "decay":
            return None
        return self.penalty.penalty()

    def after_backward(self, model: PeftModel, step: int) -> None:
        self.penalty.step()

    def start_training(self, model: PeftModel) -> None:
        if self.penalty is not None:
            self.penalty.resume_warmup()

    def end_training(self, model: PeftModel) -> None:
        if self.penalty is not None:
            self.penalty.pause_warmup()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.penalty is None else self.penalty.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.penalty is not None:
            self.penalty.load_state_dict(state)

    def save_report(self, out_dir: str | Path) -> None:
        if self.penalty is None:
            return
        out = Path(out_dir)
        report = {
            "importance": self.penalty.importance(),
            "spread": self.penalty.spread(),
            "warmup_steps": self.penalty.warmup_steps,
            "steps_seen": self.penalty.step_count,
        }
        (out / "fw_lora.json").write_text(json.dumps(report, indent=1))

    def figures(self) -> list[Figure]:
        if self.penalty is None:
            return []
        return [
            ModuleValues(
                file="importance.png",
                title=f"{self.run_name or self.name}: FW-LoRA importance $I_m$",
                values=self.penalty.importance(),
                label="$I_m$",
            )
        ]


def default_warmup(steps: int) -> int:
    """The paper's K = 500 where the run is long enough, else a fifth of the run."""
    return 500 if steps >= 2500 else max(1, steps // 5)
