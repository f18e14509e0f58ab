"""FILet: Fisher-guided LoRA initialisation ("Learning in the Fisher Subspace", ICML).

For a target layer ``y = W x`` (``W ∈ R^{m×n}``) with LoRA update ``s B A``:

1. Candidate directions from the frozen weight:
   ``basis="gram"`` (the paper): ``V̂ = normalize_columns(WᵀW)``, ``Û = normalize_columns(W V̂)``
   (unit-norm, not orthogonal, at most ``min(m, n)`` independent);
   ``basis="svd"``: the orthonormal singular vectors of ``W = U Σ Vᵀ``.
   Candidates with ``σ_i = ‖W v̂_i‖ ≈ 0`` are dropped.
2. A calibration pass projects each token's input x and output gradient g ``= ∂L/∂y`` onto the
   candidates, ``p_i = E[(v̂_iᵀ x)²]``, ``q_i = E[(û_iᵀ g)²]`` over every position the attention
   mask keeps, whatever its label (``∇W = Σ_t g_t x_tᵀ`` runs over all of them; a prompt token
   labelled -100 still has ``g ≠ 0`` when a scored token attends to it): the diagonals of
   ``V̂ᵀ S_X V̂`` and ``Ûᵀ S_Y Û`` without ever storing ``S_X`` (n×n) or ``S_Y`` (m×m).
3. Fisher energy (K-FAC): ``e_i = p_i q_i``.
4. ``r`` candidates by ``select="min"`` (the paper), ``"max"`` or ``"random"`` (FILet-M/P/R).
5. Magnitudes ``d_i``, then ``A = diag(√(d/s)) V̂_selᵀ``, ``B = Û_sel diag(√(d/s))``, so
   ``s B A = Σ_{i∈sel} d_i û_i v̂_iᵀ``:

   - ``scale="fisher-norm"`` (default): ``d_i = c · e_i`` with ONE scale ``c`` per layer, chosen
     so that ``‖s B A‖₂ = ‖Σ_sel d_i û_i v̂_iᵀ‖₂ = max_{i∈sel} σ_i`` (the largest gain of W along
     a selected direction). ``‖Σ_sel e_i û_i v̂_iᵀ‖₂`` comes from r×r work
     (:func:`lowrank_spectral_norm`), never an m×n SVD.
   - ``scale="fisher"``: the raw energies, ``d_i = e_i`` (the paper, literally).
   - ``scale="singular"``: ``d_i = σ_i`` (the FILet-SVD ablation; with ``basis="svd"`` only,
     since ``‖W v̂_i‖`` is a singular value only for a singular vector).

   Why a scale at all: the raw energies' absolute size is a convention of the loss, not a
   property of the data (a *mean* loss's gradients shrink with the batch size and the token
   count; a summed loss's grow), and at the usual mean losses it is ~1e-12: ``A ≈ B ≈ 0``, a
   numerical no-op init at the saddle where neither factor gets gradient. Why one ``c`` per
   layer: it is the smallest change that fixes the size and keeps everything the paper's
   energies say, the selected directions and their relative weights ``e_i / e_j``. Why this
   target: ``max σ_sel`` is the size of what the init takes out of W along the selected
   directions (PiSSA's magnitude with the svd basis), and it bounds the init by
   ``‖s B A‖₂ ≤ max σ_sel ≤ ‖W‖₂`` with any basis. With the orthonormal svd basis
   ``‖Σ d_i u_i v_iᵀ‖₂ = max d_i``, so ``c = max σ_sel / max e_sel``; the gram candidates are
   unit-norm but near-colinear, and that formula made ``‖s B A‖₂`` up to 4.3× ``‖W‖₂`` there.
6. ``W_res = W − s B A`` in float32, cast once: right after init the model computes exactly
   what the base model computed (up to float rounding).
7. :func:`fisherlora.adapters.export_lora` writes ``[A; A₀]``, ``[B, −B₀]`` at rank 2r, a stock
   adapter for the original base weights; after ``filet_init`` the model's own
   ``save_pretrained`` writes that adapter too (PEFT's would fit only the residual base).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fisherlora.adapters import has_residual, lora_layers, record_residual
from fisherlora.capture import (
    calibration_batches,
    calibration_mode,
    capture_io,
    check_batch,
    check_finite,
    layer_groups,
    padding_mask,
)
from fisherlora.errors import CalibrationError, ConfigError
from fisherlora.figures import EnergySpectrum, Figure
from fisherlora.methods.base import AdapterMethod
from fisherlora.stats import all_reduce_sum, world_size

BASES = ("gram", "svd")
SELECTS = ("min", "max", "random")
SCALES = ("fisher", "fisher-norm", "singular")
DEGENERATE = 1e-6  # a candidate with σ_i below this fraction of the layer's largest is dropped


@dataclass
class FiletReport:
    """Per-module candidate energies and singular values, the selected candidates, timings."""

    energies: dict[str, list[float]]
    singular_values: dict[str, list[float]]  # σ_i = ‖W v̂_i‖ of each candidate
    selected: dict[str, list[int]]
    basis: str
    select: str
    scale: str
    calibration_batches: int
    calibration_s: float
    init_s: float
    # ‖s B A‖₂ / max_i σ_i over all candidates: ‖s B A‖₂ / ‖W‖₂ with the svd basis, an upper
    # bound of it with the gram basis (max ‖W v̂_i‖ ≤ ‖W‖₂; no m×n SVD is computed for it)
    delta_norm_ratio: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        ratios = list(self.delta_norm_ratio.values())
        return {
            "basis": self.basis,
            "select": self.select,
            "scale": self.scale,
            "calibration_batches": self.calibration_batches,
            "calibration_s": self.calibration_s,
            "init_s": self.init_s,
            "max_delta_norm_ratio": max(ratios) if ratios else 0.0,
        }

    def save(self, out_dir: str | Path) -> None:
        """``filet.json`` (the runner draws ``energy_spectrum.png`` from :meth:`figure`)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "filet.json").write_text(json.dumps(asdict(self), indent=1))

    def figure(self) -> EnergySpectrum:
        """``energy_spectrum.png`` as data: energies per module type, the selected marked."""
        return EnergySpectrum(
            file="energy_spectrum.png",
            title=f"FILet energies (basis={self.basis}, select={self.select})",
            energies=self.energies,
            selected=self.selected,
        )


def candidate_directions(
    weight: torch.Tensor, basis: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right directions ``V̂`` [n, k], left directions ``Û`` [m, k] and ``σ_i = ‖W v̂_i‖`` [k]."""
    w = weight.detach().float()
    if basis == "svd":
        u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
        v = vh.T
    else:
        gram = w.T @ w
        v = gram / torch.linalg.vector_norm(gram, dim=0).clamp_min(torch.finfo(w.dtype).tiny)
        wv = w @ v
        sigma = torch.linalg.vector_norm(wv, dim=0)
        u = wv / sigma.clamp_min(torch.finfo(w.dtype).tiny)
    keep = sigma > DEGENERATE * sigma.max()
    return v[:, keep].contiguous(), u[:, keep].contiguous(), sigma[keep]


def lowrank_spectral_norm(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``‖B A‖₂`` from r×r work: with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``, ``‖B A‖₂ = ‖R_B R_Aᵀ‖₂``."""
    r_b = torch.linalg.qr(b).R
    r_a = torch.linalg.qr(a.T).R
    return torch.linalg.matrix_norm(r_b @ r_a.T, ord=2)


def _select(energy: torch.Tensor, r: int, how: str, generator: torch.Generator) -> torch.Tensor:
    if how == "random":
        return torch.randperm(energy.numel(), generator=generator)[:r].sort().values
    order = torch.argsort(energy, descending=how == "max", stable=True)
    return order[:r]


def _fisher_norm(
    e_sel: torch.Tensor, v_sel: torch.Tensor, u_sel: torch.Tensor, sigma_sel: torch.Tensor
) -> torch.Tensor:
    """``d = c · e_sel`` with the one ``c`` that makes ``‖Σ_i d_i û_i v̂_iᵀ‖₂ = max σ_sel`` (see the
    module docstring, step 5). The energies are divided by their largest first, so that energies
    of ~1e-20 do not underflow in the norm; all-zero energies give ``d = 0``."""
    top = e_sel.max()
    if top <= 0:
        return torch.zeros_like(e_sel)
    relative = e_sel / top
    norm = lowrank_spectral_norm(u_sel * relative[None, :], v_sel.T)
    return relative * (sigma_sel.max() / norm.clamp_min(torch.finfo(norm.dtype).tiny))


def _check_options(basis: str, select: str, scale: str) -> None:
    for label, value, choices in (
        ("basis", basis, BASES),
        ("select", select, SELECTS),
        ("scale", scale, SCALES),
    ):
        if value not in choices:
            raise ConfigError(f"unknown FILet {label} {value!r}; choose one of {list(choices)}")
    if scale == "singular" and basis != "svd":
        raise ConfigError(
            f"FILet scale='singular' needs basis='svd', not basis={basis!r}: ‖W v̂‖ of a "
            f"{basis} candidate is not a singular value; use basis='svd' (or another scale)"
        )


def _project_statistics(
    model: PeftModel,
    adapter: str,
    layers: Mapping[str, LoraLayer],
    candidates: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    batches: list,
    n_batches: int,
    device: torch.device,
    *,
    dropout: bool,
    progress: bool,
) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor], int]:
    """Calibration passes with hooks on ``layers`` only: per candidate, the summed
    ``(v̂ᵢᵀ x)²`` and ``(ûᵢᵀ g)²`` over the non-padding positions, and their counts."""
    sums = {
        name: [torch.zeros(c[2].numel(), device=device) for _ in range(2)]
        for name, c in candidates.items()
    }
    tokens = {name: torch.zeros((), device=device) for name in candidates}

    def keep(x: torch.Tensor, mask) -> torch.Tensor:
        """The non-padding rows (all rows for 2-D inputs such as a pooler's)."""
        x = x.reshape(-1, x.shape[-1])
        return x if mask is None or mask.numel() != x.shape[0] else x[mask.reshape(-1) > 0]

    def project_input(name: str, x: torch.Tensor, mask) -> None:
        # p is accumulated in the forward pass, so x need not live until backward.
        x = keep(x, mask)
        sums[name][0] += (x @ candidates[name][0]).square().sum(dim=0)
        tokens[name] += x.shape[0]

    def project_grad(name: str, _: None, g: torch.Tensor, mask) -> None:
        sums[name][1] += (keep(g, mask) @ candidates[name][1]).square().sum(dim=0)

    mask_ref: list = [None]
    b_weights = [layer.lora_B[adapter].weight for layer in layers.values()]
    used = 0
    with (
        calibration_mode(model, b_weights, dropout=dropout),
        capture_io(layers, project_grad, mask_ref, project_input),
    ):
        for batch in calibration_batches(
            batches, n_batches, device, progress=progress, desc="FILet calibration"
        ):
            # Every non-padding position counts, whatever its label (module docstring, step 2).
            mask_ref[0] = padding_mask(batch)
            model(**batch).loss.backward()
            used += 1
    return sums, tokens, used


def filet_init(
    model: PeftModel,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    n_batches: int = 8,
    basis: str = "gram",
    select: str = "min",
    scale: str = "fisher-norm",
    seed: int = 0,
    dropout: bool = False,
    progress: bool = True,
    layers_per_pass: int | None = None,
) -> FiletReport:
    """FILet: initialise every LoRA adapter of ``model`` in its layer's Fisher subspace (see the
    module docstring for the equations). Changes A, B and the base weights in place, and routes
    the model's ``save_pretrained`` through :func:`fisherlora.adapters.export_lora`: the adapter it
    writes, loaded on the untouched pretrained base, reproduces the model (PEFT's own would
    apply only to the residual base weights). Called twice on one model it is refused.

    Args:
        model: a ``PeftModel`` with one LoRA adapter on ``nn.Linear`` layers; each module keeps
            its current rank (so rank allocation may run first).
        dataloader: training batches with ``labels``.
        n_batches: calibration forward/backward passes.
        basis: ``"gram"`` (the paper's non-orthogonal basis, default) or ``"svd"`` (orthonormal;
            the ``filet-svd`` variant).
        select: ``"min"`` (the paper), ``"max"`` or ``"random"`` energies.
        scale: ``"fisher-norm"`` (default: the energies times one scale per layer, so that
            ``‖s B A‖₂ = max σ_sel``), ``"fisher"`` (raw energies; numerically a no-op init at
            typical loss scales) or ``"singular"`` (``basis="svd"`` only).
        seed: for ``select="random"``.
        dropout, progress: dropout during calibration (off by default); a progress bar.
        layers_per_pass: memory-bounded calibration for large models: the target layers are
            processed in consecutive groups of this many, each with its own ``n_batches``
            passes over the same batches (same result, ``groups`` times the passes). Peak extra
            memory: ``max over groups Σ_{m∈group} (n_m + m_m)(min(n_m, m_m) + 2)`` floats for the
            candidate bases and statistics, plus ``Σ_m r_m (n_m + m_m)`` for the new factors;
            ungrouped (None) the first sum runs over every layer.

    Raises ``ConfigError`` (bad options, unsupported layers, a rank above the number of usable
    candidates) or ``CalibrationError`` (empty loader, no labels, NaN/inf statistics), always
    before any weight is changed.
    """
    _check_options(basis, select, scale)
    adapter, layers = lora_layers(model)
    if has_residual(model):
        # W is already W − s B₀ A₀: a second residual would change the outputs, and the export
        # (which undoes one recorded B₀ A₀ per layer) would no longer reproduce the model
        raise ConfigError(
            "this model's adapters were already initialised by FILet (its base weights are "
            "residuals); initialise a fresh PeftModel instead of calling filet_init twice"
        )
    started = time.perf_counter()
    for name, layer in layers.items():  # cheap checks of every layer before any work
        weight = layer.get_base_layer().weight
        if not weight.is_floating_point():
            raise ConfigError(
                f"FILet needs a floating-point base weight; {name!r} is {weight.dtype} (quantised?)"
            )
    device = next(iter(layers.values())).get_base_layer().weight.device
    # The same batches for every group of layers (a loader may reshuffle when iterated again).
    batches = list(itertools.islice(iter(dataloader), n_batches))
    for index, batch in enumerate(batches):  # the format, before any SVD of a base weight
        check_batch(batch, index)
    generator = torch.Generator().manual_seed(seed)
    energies, selected, ratios, sigmas, factors = {}, {}, {}, {}, {}
    calibration_s, used = 0.0, 0
    for group in layer_groups(list(layers), layers_per_pass):
        # Bases of this group only: the n×n and m×m candidates are the memory that grows with
        # the model; what is kept across groups is r (n + m) numbers per layer.
        candidates = {}
        for name in group:
            layer = layers[name]
            v, u, sigma = candidate_directions(layer.get_base_layer().weight, basis)
            if layer.r[adapter] > sigma.numel():
                raise ConfigError(
                    f"rank {layer.r[adapter]} of {name!r} exceeds its {sigma.numel()} usable "
                    f"{basis} candidates"
                )
            candidates[name] = (v, u, sigma)
        calibration_start = time.perf_counter()
        sums, tokens, used = _project_statistics(
            model,
            adapter,
            {n: layers[n] for n in group},
            candidates,
            batches,
            n_batches,
            device,
            dropout=dropout,
            progress=progress,
        )
        calibration_s += time.perf_counter() - calibration_start
        for name in group:
            layer = layers[name]
            v, u, sigma = candidates[name]
            p_sum, q_sum = (all_reduce_sum(t) for t in sums[name])
            q_sum = q_sum / world_size() ** 2  # g of the global batch loss = local g / world size
            count = all_reduce_sum(tokens[name]).clamp_min(1)
            energy = (p_sum / count) * (q_sum / count)
            check_finite(name, energy, "Fisher statistics")
            if not energy.any():
                raise CalibrationError(
                    f"all Fisher energies of {name!r} are zero; does the loss depend on it?"
                )
            idx = _select(energy.cpu(), layer.r[adapter], select, generator).to(device)
            if scale == "singular":
                magnitude = sigma[idx]
            elif scale == "fisher":
                magnitude = energy[idx]
            else:
                magnitude = _fisher_norm(energy[idx], v[:, idx], u[:, idx], sigma[idx])
            s = layer.scaling[adapter]
            root = (magnitude / s).sqrt()
            a = root[:, None] * v[:, idx].T
            b = u[:, idx] * root[None, :]
            factors[name] = (a, b)
            energies[name], selected[name], sigmas[name] = energy, idx, sigma
            ratios[name] = (lowrank_spectral_norm(b, a) * s / sigma.max()).item()
        del candidates

    with torch.no_grad():  # nothing has changed so far; from here on every layer is rewritten
        for name, layer in layers.items():
            a, b = factors[name]
            s = layer.scaling[adapter]
            base = layer.get_base_layer().weight
            base.copy_((base.float() - s * (b @ a)).to(base.dtype))
            layer.lora_A[adapter].weight.copy_(a.to(layer.lora_A[adapter].weight.dtype))
            layer.lora_B[adapter].weight.copy_(b.to(layer.lora_B[adapter].weight.dtype))
            record_residual(model, name, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)

    return FiletReport(
        energies={n: e.tolist() for n, e in energies.items()},
        singular_values={n: sigma.tolist() for n, sigma in sigmas.items()},
        selected={n: i.tolist() for n, i in selected.items()},
        basis=basis,
        select=select,
        scale=scale,
        calibration_batches=used,
        calibration_s=calibration_s,
        init_s=time.perf_counter() - started,
        delta_norm_ratio=ratios,
    )


def subspace_overlap(a_initial: torch.Tensor, a_final: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of two A matrices
    (1: the final adapter still reads exactly the initial input directions; r/n: chance)."""
    q0 = torch.linalg.qr(a_initial.detach().float().T).Q
    q1 = torch.linalg.qr(a_final.detach().float().T).Q
    return torch.linalg.svdvals(q0.T @ q1).square().mean().item()


def adapter_grad_norms(model: PeftModel, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """‖∂L/∂A‖ and ‖∂L/∂B‖ over all adapters on one batch (dropout off), leaving no gradients:
    how much signal the adapters get at the point training starts from."""
    params = {n: p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n}
    device = next(iter(params.values())).device
    with calibration_mode(model, params.values()):
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        norms = {
            kind: torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for n, p in params.items() if kind in n])
            ).item()
            for kind in ("lora_A", "lora_B")
        }
    return norms


class Filet(AdapterMethod):
    """Runner method ``filet``: :func:`filet_init` before the optimizer exists, plus diagnostics:
    the adapter gradient norms at the initial point, and after training how much of the initial
    row space of A survives (principal angles)."""

    name = "filet"

    def __init__(
        self,
        calib_batches: int = 8,
        basis: str = "gram",
        select: str = "min",
        scale: str = "fisher-norm",
        seed: int = 0,
        progress: bool = True,
        layers_per_pass: int | None = None,
    ) -> None:
        _check_options(basis, select, scale)
        self.options = dict(
            n_batches=calib_batches,
            basis=basis,
            select=select,
            scale=scale,
            seed=seed,
            progress=progress,
            layers_per_pass=layers_per_pass,
        )
        self.report: FiletReport | None = None
        self.model: PeftModel | None = None
        self.initial_a: dict[str, torch.Tensor] = {}
        self.step0_grad_norm: dict[str, float] = {}

    def prepare(self, model: PeftModel, calibration_loader) -> dict[str, Any]:
        self.report = filet_init(model, calibration_loader, **self.options)
        self.model = model
        adapter, layers = lora_layers(model)
        self.initial_a = {
            n: layer.lora_A[adapter].weight.detach().clone() for n, layer in layers.items()
        }
        batch = next(iter(calibration_loader))
        self.step0_grad_norm = adapter_grad_norms(model, batch)
        return {"filet": self.report.summary(), "step0_grad_norm": self.step0_grad_norm}

    def diagnostics(self) -> dict[str, Any]:
        if self.model is None:
            return {}
        adapter, layers = lora_layers(self.model)
        overlaps = {
            n: subspace_overlap(self.initial_a[n], layer.lora_A[adapter].weight)
            for n, layer in layers.items()
        }
        return {
            "step0_grad_norm": self.step0_grad_norm,
            "subspace_overlap_mean": sum(overlaps.values()) / len(overlaps),
            "subspace_overlap": overlaps,
        }

    def save_report(self, out_dir: str | Path) -> None:
        if self.report is not None:
            self.report.save(out_dir)
            (Path(out_dir) / "filet_training.json").write_text(
                json.dumps(self.diagnostics(), indent=1)
            )

    def figures(self) -> list[Figure]:
        return [] if self.report is None else [self.report.figure()]
