"""FW-LoRA: a Fisher-weighted penalty on the LoRA updates.

1. Warm-up, optimizer steps ``t ≤ K``: per module ``F_m ← α F_m + (1 − α) ‖∇W_m‖²_F`` with
   ``∇W_m = Gᵀ X`` the gradient the frozen weight would get (never materialised as ``W.grad``):
   ``estimator="exact"`` forms ``GᵀX`` in the backward hook; ``estimator="sketch"`` keeps
   ``Gᵀ (X Ω)`` for k shared Gaussian probes and uses ``‖GᵀXΩ‖²_F / k`` (unbiased, relative
   error ≤ √(2/k)). Both sum over the micro-batches of a step (and over processes) before squaring.
2. After step K: ``I_m = F_m / Σ_k F_k`` (``normalize="max"``: ``F_m / max_k F_k``), frozen;
   the hooks are removed, so the rest of training pays nothing for them.
3. ``penalty = λ Σ_m (1 − I_m) ‖ΔW_m‖²_F`` with ``I_m = 0`` during warm-up (the paper's
   Algorithm 1), where ``ΔW = s (B A − B₀ A₀)`` is the update from the *pretrained* weight and
   ``A₀, B₀`` are the factors the adapter held when the penalty was created. With a plain LoRA
   init ``B₀ = 0`` and this is the paper's ``‖s B A‖²_F``; after a residual init (FILet, or any
   ``W_res = W − s B₀ A₀``) the pretrained weight is ``W_res + s B₀ A₀``, so penalising
   ``‖s B A‖²`` would pull the model toward ``W_res`` instead. From r×r work only:

       ‖B A − B₀ A₀‖²_F = tr((A Aᵀ)(Bᵀ B)) − 2 tr((A₀ Aᵀ)(Bᵀ B₀)) + tr((A₀ A₀ᵀ)(B₀ᵀ B₀))

   (the last term a constant, so the penalty is exactly zero right after such an init).
   ``mode="decay"`` is the paper's one-liner: no loss term; each module's A and B get their own
   AdamW group whose decoupled weight decay is the optimizer's ``weight_decay · (1 − I_m)``
   (``weight_decay`` itself during warm-up). Decoupled decay shrinks A and B toward zero, which
   is toward the pretrained weight only when ``B₀ = 0``: after a residual init it is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fisherlora.adapters import lora_layers
from fisherlora.capture import check_finite, register_io_hooks
from fisherlora.errors import ConfigError
from fisherlora.figures import Figure, ModuleValues
from fisherlora.methods.base import AdapterMethod
from fisherlora.stats import all_reduce_mean

ESTIMATORS = ("sketch", "exact")
NORMALIZE = ("sum", "max")
MODES = ("loss", "decay")


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
        decay: float = 0.98,
        lam: float = 1e-4,
        estimator: str = "sketch",
        probes: int = 8,
        normalize: str = "sum",
        mode: str = "loss",
        seed: int = 0,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        for label, value, choices in (
            ("estimator", estimator, ESTIMATORS),
            ("normalize", normalize, NORMALIZE),
            ("mode", mode, MODES),
        ):
            if value not in choices:
                raise ConfigError(
                    f"unknown FW-LoRA {label} {value!r}; choose one of {list(choices)}"
                )
        if warmup_steps < 0 or probes < 1 or not 0.0 <= decay < 1.0 or lam < 0:
            raise ConfigError(
                f"FW-LoRA needs warmup_steps >= 0, probes >= 1, 0 <= decay < 1 and lam >= 0; got "
                f"warmup_steps={warmup_steps}, probes={probes}, decay={decay}, lam={lam}"
            )
        self.adapter, self.layers = lora_layers(model)
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
        self._pending: dict[str, torch.Tensor] = {}
        self._probe_cache: dict[tuple[int, str], torch.Tensor] = {}
        self._groups: list[dict] = []
        self._base_decay = 0.0  # the optimizer's weight decay that mode="decay" scales
        self._coefficients: torch.Tensor | None = None
        self._segments: torch.Tensor | None = None  # module index of each flat product entry
        shapes: dict[tuple, list[int]] = {}
        for i, layer in enumerate(self.layers.values()):
            shapes.setdefault(
                tuple(layer.lora_A[self.adapter].weight.shape)
                + tuple(layer.lora_B[self.adapter].weight.shape),
                [],
            ).append(i)
        layers = list(self.layers.values())
        self._by_shape = [
            (
                torch.tensor(indices),
                [layers[i].lora_A[self.adapter].weight for i in indices],
                [layers[i].lora_B[self.adapter].weight for i in indices],
                self._initial_factors([layers[i] for i in indices]),
            )
            for indices in shapes.values()
        ]
        self.residual_init = any(initial is not None for *_, initial in self._by_shape)
        if self.residual_init and mode == "decay":
            raise ConfigError(
                "FW-LoRA mode='decay' after an init with B0 != 0 (FILet or another residual "
                "init): weight decay pulls A and B toward zero, i.e. the model toward W - s B0 A0 "
                "instead of the pretrained weight; use mode='loss', which penalises s (B A - B0 A0)"
            )
        self._handles = (
            register_io_hooks(
                self.layers, self._accumulate, [None], self._keep_input, shared_input=True
            )
            if warmup_steps > 0
            else []
        )

    def _initial_factors(
        self, layers: list
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(A₀, B₀, ‖B₀ A₀‖²_F)`` stacked over layers of one shape (float32, detached), or None
        when every ``B₀`` is zero (then ``ΔW = s B A`` and only the first trace is needed)."""
        b0 = torch.stack([layer.lora_B[self.adapter].weight.detach().float() for layer in layers])
        if not b0.any():
            return None
        a0 = torch.stack([layer.lora_A[self.adapter].weight.detach().float() for layer in layers])
        constant = ((a0 @ a0.mT).double() * (b0.mT @ b0).double()).sum(dim=(1, 2))
        return a0.clone(), b0.clone(), constant.float()

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

    def _keep_input(self, name: str, x: torch.Tensor, mask: Any) -> torch.Tensor:
        # The sketch needs only (X Ω)ᵀ = Ωᵀ Xᵀ ([k, tokens]) in backward, not x itself. Formed
        # with k as the short output side: on CPU BLAS that is ~3x faster than X @ Ω.
        x = x.reshape(-1, x.shape[-1])
        if self.estimator == "exact":
            return x
        return self._probe_matrix_t(x.shape[-1], x.device) @ x.mT

    def _accumulate(self, name: str, kept: torch.Tensor, g: torch.Tensor, mask: Any) -> None:
        # Padded tokens carry g = 0, so Xᵀ G is the true weight gradient (transposed) without
        # any mask; the sketch forms (X Ω)ᵀ G = (Gᵀ X Ω)ᵀ, of the same norm.
        g = g.reshape(-1, g.shape[-1])
        term = kept.mT @ g if self.estimator == "exact" else kept @ g  # [n or k, m]
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            if self._loss_scale is None:  # read once per step (a device sync on GPU)
                self._loss_scale = float(self.grad_scaler.get_scale())
            term = term / self._loss_scale
        pending = self._pending.get(name)
        if pending is None:
            self._pending[name] = term
        else:
            pending += term

    def step(self) -> None:
        """Advance the schedule by one optimizer step (call after ``optimizer.step()``)."""
        if self.warming_up:
            proxy = self._frozen_grad_sq_norms().cpu()  # one device sync per step
            finite = bool(torch.isfinite(proxy).all())
            if not finite and not (self.grad_scaler and self.grad_scaler.is_enabled()):
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

        All modules' products travel in one flat buffer: one all-reduce per step (the frozen
        weight's gradient under DDP is the mean over processes, taken before squaring), then one
        segmented sum of squares, instead of a collective and four kernels per module. Every
        process reduces every module, also one its batches did not reach (zeros).
        """
        parts = []
        for name, layer in self.layers.items():
            local = self._pending.get(name)
            if local is None:
                width = self.probes if self.estimator == "sketch" else layer.in_features
                weight = layer.get_base_layer().weight
                local = torch.zeros(width, layer.out_features, device=weight.device)
            parts.append(local.reshape(-1))
        flat = all_reduce_mean(torch.cat(parts))
        if self.estimator == "exact":
            # W-sized products (10.8 M floats on MiniLM): a float64 copy of the whole buffer and
            # an int64 segment index would add ~250 MiB; one module at a time stays small.
            pieces = flat.split([part.numel() for part in parts])
            return torch.stack([piece.double().square().sum() for piece in pieces])
        if self._segments is None or self._segments.device != flat.device:
            sizes = torch.tensor([part.numel() for part in parts], device=flat.device)
            self._segments = torch.repeat_interleave(
                torch.arange(len(parts), device=flat.device), sizes
            )
        squared = torch.zeros(len(parts), dtype=torch.float64, device=flat.device)
        squared.index_add_(0, self._segments, flat.double().square())
        return squared / self.probes

    def _freeze(self) -> None:
        reference = self.fisher.sum() if self.normalize == "sum" else self.fisher.max()
        if not reference > 0:
            raise ConfigError(
                "FW-LoRA saw no gradient signal during warm-up (all frozen-weight gradient norms "
                "are zero); check that the penalty's step() runs after backward passes"
            )
        self.importance_ = self.fisher / reference
        self._coefficients = None
        self.remove_hooks()
        self._apply_decay()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- the penalty ---------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """``λ Σ_m (1 − I_m) s_m² ‖B A − B₀ A₀‖²_F`` from r×r traces (module docstring); zero in
        ``mode="decay"``."""
        first = next(iter(self.layers.values())).lora_A[self.adapter].weight
        total = torch.zeros((), device=first.device, dtype=torch.float32)
        if self.mode == "decay" or self.lam == 0:
            return total
        if self._coefficients is None:  # λ (1 − I_m) s_m², refreshed when I changes
            scaling = torch.tensor(
                [layer.scaling[self.adapter] for layer in self.layers.values()], dtype=torch.float64
            )
            self._coefficients = (
                (self.lam * (1 - self.importance_) * scaling**2).float().to(first.device)
            )
        # Modules of one shape are stacked: a few batched r×r products instead of one per module
        # keeps the per-step cost (and the autograd graph) small.
        for indices, a_list, b_list, initial in self._by_shape:
            a = torch.stack([w.float() for w in a_list])  # [G, r, n]
            b = torch.stack([w.float() for w in b_list])  # [G, m, r]
            traces = ((a @ a.mT) * (b.mT @ b)).sum(dim=(1, 2))
            if initial is not None:
                a0, b0, constant = initial
                # ⟨B A, B₀ A₀⟩_F = tr((A₀ Aᵀ)(Bᵀ B₀)) = Σ (A₀ Aᵀ) ⊙ (B₀ᵀ B)
                cross = ((a0 @ a.mT) * (b0.mT @ b)).sum(dim=(1, 2))
                traces = traces - 2 * cross + constant
            total = total + (self._coefficients[indices] * traces).sum()
        return total

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
            # the starting point B₀ A₀ of every shape group (None where B₀ = 0), so a penalty
            # created on a model that already trained still measures from the pretrained weight
            "initial": [initial for *_, initial in self._by_shape],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names or state["warmup_steps"] != self.warmup_steps:
            raise ConfigError(
                "this FW-LoRA state belongs to other modules or another warm-up length"
            )
        self.step_count = int(state["step"])
        self.fisher = state["fisher"].clone().to(torch.float64)
        self.importance_ = state["importance"].clone().to(torch.float64)
        if "initial" in state:
            self._by_shape = [
                (*group[:3], initial)
                for group, initial in zip(self._by_shape, state["initial"], strict=True)
            ]
        self._coefficients = None
        self._pending.clear()
        if not self.warming_up:
            self.remove_hooks()
            self._apply_decay()


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

    def loss(self, model: PeftModel, step: int) -> torch.Tensor | None:
        if self.penalty is None or self.penalty.mode == "decay":
            return None
        return self.penalty.penalty()

    def after_backward(self, model: PeftModel, step: int) -> None:
        self.penalty.step()

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
