"""FILet: Fisher-guided LoRA initialisation ("Learning in the Fisher Subspace", ICML).

For a target layer ``y = W x`` (``W ∈ R^{m×n}``) with LoRA update ``s B A``:

1. Candidate directions from the frozen weight (:mod:`fisherlora.directions`):
   ``basis="gram"`` (the paper): ``V̂ = normalize_columns(WᵀW)``, ``Û = normalize_columns(W V̂)``
   (unit-norm, not orthogonal, at most ``min(m, n)`` independent);
   ``basis="svd"``: the orthonormal singular vectors of ``W = U Σ Vᵀ`` (from the
   eigendecomposition of the smaller Gram matrix, ``WᵀW`` or ``WWᵀ``, in float64, where W is at
   least twice as long as wide: there that is cheaper than an SVD of W).
   Candidates with ``σ_i = ‖W v̂_i‖ ≈ 0`` are dropped. The candidates of a weight already seen in
   this process come from ``directions.DECOMPOSITIONS`` (a bounded cache keyed by a hash of the
   weight).
2. A calibration pass projects each token's input x and output gradient g ``= ∂L/∂y`` onto the
   candidates, ``p_i = E[(v̂_iᵀ x)²]``, ``q_i = E[(û_iᵀ g)²]`` over every position the attention
   mask keeps, whatever its label (``∇W = Σ_t g_t x_tᵀ`` runs over all of them; a prompt token
   labelled -100 still has ``g ≠ 0`` when a scored token attends to it): the diagonals of
   ``V̂ᵀ S_X V̂`` and ``Ûᵀ S_Y Û``. Each side in the cheaper exact form (per token, k candidates):
   projecting, ``Σ_t (v̂_iᵀ x_t)²`` (n·k work), or, where fewer than k numbers carry the
   statistic, a small second moment whose quadratic forms are the same sums: ``q_i = û_iᵀ S_Y û_i``
   with ``S_Y = Σ_t g_t g_tᵀ`` where ``m < k`` (m² work), and, for the gram candidates of a layer
   with ``m (m + n) < n²``, ``v̂_i = Wᵀ c_i`` (``c_i = W e_i / ‖WᵀW e_i‖``) so
   ``p_i = c_iᵀ S_{Wx} c_i`` with ``S_{Wx} = Σ_t (W x_t)(W x_t)ᵀ`` (m² work: ``W x_t = y_t − b``
   is read off the frozen base layer's float32 output; the n×n ``V̂`` is never formed). A stored
   second moment is never larger than the candidates it replaces, and ``S_X`` (n×n) is never
   stored. The rows of the padding are dropped once per batch, not once per layer.
3. Fisher energy (K-FAC): ``e_i = p_i q_i``.
4. ``r`` candidates by ``select="min"`` (the paper), ``"max"`` or ``"random"`` (FILet-M/P/R).
5. Magnitudes ``d_i``, then ``A = diag(√(d/s)) V̂_selᵀ``, ``B = Û_sel diag(√(d/s))``, so
   ``s B A = Σ_{i∈sel} d_i û_i v̂_iᵀ``:

   - ``scale="fisher-norm"`` (default): ``d_i = c · e_i`` with ONE scale ``c`` per layer, chosen
     so that ``‖s B A‖₂ = ‖Σ_sel d_i û_i v̂_iᵀ‖₂ = max_{i∈sel} σ_i`` (the largest gain of W along
     a selected direction). ``‖Σ_sel e_i û_i v̂_iᵀ‖₂`` comes from r×r work
     (:func:`lowrank_spectral_norm`), never an m×n SVD.
   - ``scale="fisher"``: the raw energies, ``d_i = e_i`` (the paper's magnitudes; its
     ``A = diag(√e) V̂ᵀ``, ``B = Û diag(√e)`` would make the update ``s Σ e_i û_i v̂_iᵀ``: here,
     as everywhere in this module, the factors carry ``√(d/s)`` so that the update is
     ``Σ d_i û_i v̂_iᵀ`` whatever α is, as PiSSA's is).
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

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fisherlora.adapters import (
    has_residual,
    input_factors,
    lora_layers,
    parameter_owners,
    record_residual,
    row_space_kept,
)
from fisherlora.capture import (
    calibration_mode,
    capture_io,
    check_all_finite,
    first_batches,
    layer_groups,
    padding_mask,
    predicts_next_token,
    refuse_unequal_batch_counts,
    run_passes,
)
from fisherlora.directions import (
    DECOMPOSITIONS,
    Candidates,
    many_layer_candidates,
)
from fisherlora.errors import CalibrationError, ConfigError, check_choices
from fisherlora.figures import EnergySpectrum, Figure
from fisherlora.logit_window import scored_window
from fisherlora.methods.base import AdapterMethod
from fisherlora.stats import ProjectedSquares, SecondMoment, all_reduce_sum, world_size

BASES = ("gram", "svd")
SELECTS = ("min", "max", "random")
SCALES = ("fisher", "fisher-norm", "singular")
# A tall layer's q_i are read off Wᵀg (the gradient of its input) only where every candidate's
# σ_i is at least this fraction of the largest: the error of that form is σ_max / σ_i times the
# direct projection's (≤ 10×; on MiniLM's gram candidates the energies moved by 1e-6 relative at most).
INPUT_GRAD_MIN_GAIN = 0.1


def _float32_digits(value: Any) -> Any:
    """``value`` with every float rounded to 9 significant digits (exact for float32 values)."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: _float32_digits(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_float32_digits(v) for v in value]
    return value


def compact_json(report: dict[str, Any]) -> str:
    """A report dict as JSON with one top-level field per line and no spaces inside a field."""
    rounded = _float32_digits(report)
    fields = (f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in rounded.items())
    return "{\n" + ",\n".join(fields) + "\n}\n"


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
    # The method whose calibration passes also collected these statistics (a composition's one
    # calibration: calibration_s is then the time of those shared passes), or "" for FILet's own.
    calibration_shared_with: str = ""

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
        """``filet.json`` (the runner draws ``energy_spectrum.png`` from :meth:`figure`): one
        line per field, numbers to 9 significant digits, which round-trips the float32 energies
        and singular values exactly (a run's file is ~0.4 MB on MiniLM instead of ~1 MB)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "filet.json").write_text(compact_json(asdict(self)))

    def figure(self) -> EnergySpectrum:
        """``energy_spectrum.png`` as data: energies per module type, the selected marked."""
        return EnergySpectrum(
            file="energy_spectrum.png",
            title=f"FILet energies (basis={self.basis}, select={self.select})",
            energies=self.energies,
            selected=self.selected,
        )


def lowrank_spectral_norm(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``‖B A‖₂`` from r×r work: with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``, ``‖B A‖₂ = ‖R_B R_Aᵀ‖₂``."""
    r_b = torch.linalg.qr(b).R
    r_a = torch.linalg.qr(a.T).R
    return torch.linalg.matrix_norm(r_b @ r_a.T, ord=2)


def _on_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` (float32) on the CPU with one device-to-host transfer (as they are on a CPU)."""
    if all(t.device.type == "cpu" for t in tensors):
        return list(tensors)
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors]).cpu()
    parts = flat.split([t.numel() for t in tensors])
    return [part.view(t.shape) for part, t in zip(parts, tensors, strict=True)]


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
    check_choices(
        "FILet", (("basis", basis, BASES), ("select", select, SELECTS), ("scale", scale, SCALES))
    )
    if scale == "singular" and basis != "svd":
        raise ConfigError(
            f"FILet scale='singular' needs basis='svd', not basis={basis!r}: ‖W v̂‖ of a "
            f"{basis} candidate is not a singular value; use basis='svd' (or another scale)"
        )


@dataclass(frozen=True)
class _KeptRows:
    """A batch's non-padding token rows, found once per batch (not once per layer and side):
    ``index`` of the kept rows among ``total`` (None: every row is kept)."""

    index: torch.Tensor | None
    total: int

    @staticmethod
    def of(mask: torch.Tensor | None) -> _KeptRows | None:
        if mask is None:
            return None
        flat = mask.reshape(-1) > 0
        return _KeptRows(None if flat.all() else flat.nonzero().squeeze(1), flat.numel())


def _reads_input_grads(weight: torch.Tensor, c: Candidates) -> bool:
    """Whether a layer's ``q_i`` come from ``Wᵀ g``: for a float32 tall layer (m > n: projecting
    the n numbers of ``Wᵀ g`` onto ``v̂_i`` is m / n times cheaper than projecting g onto ``û_i``)
    whose candidates' gains stay within :data:`INPUT_GRAD_MIN_GAIN` of the largest (the float32
    error of ``v̂_iᵀ (Wᵀ g)`` grows as ``σ_max / σ_i``)."""
    m, n = weight.shape
    return (
        c.v is not None
        and m > n
        and weight.dtype == torch.float32
        and bool(c.sigma.min() >= INPUT_GRAD_MIN_GAIN * c.sigma.max())
    )


def _moments_cheaper(dim: int, k: int, tokens: int | None) -> bool:
    """Whether the sums over ``tokens`` vectors of ``dim`` numbers for ``k`` candidates cost less
    as a float64 second moment (T·dim² to accumulate and dim²·k once, each at half the float32
    rate) than as float32 projections (T·dim·k): ``2 dim (T + k) < T k``. Without a token count,
    whenever ``dim < k``. MiniLM's wide layer (dim 384, k 1536) at 8 batches of 32 sentences:
    moments; a 2048-wide Llama's down projection (dim 2048, k 5632) at 2,048 tokens: projections."""
    if dim >= k:
        return False
    return tokens is None or 2 * dim * (tokens + k) < tokens * k


def _calibration_tokens(batches: Sequence[Mapping[str, torch.Tensor]]) -> int | None:
    """The non-padding tokens of ``batches`` (None where a batch has no attention mask, or is
    no mapping: the passes then name what is wrong with it)."""
    if not batches or not all(
        isinstance(b, Mapping) and torch.is_tensor(b.get("attention_mask")) for b in batches
    ):
        return None
    return int(sum(int(b["attention_mask"].sum()) for b in batches))


class CandidateEnergies:
    """FILet's calibration statistics (module docstring, step 2) for ``layers``, a
    :class:`fisherlora.capture.PassStatistic`: per candidate the sums of ``(v̂_iᵀ x)²`` and
    ``(û_iᵀ g)²`` over the non-padding positions, and their counts. It collects in FILet's own
    passes or in another method's over the same batches (``fim-lora+filet``: one calibration)."""

    def __init__(
        self,
        layers: Mapping[str, LoraLayer],
        candidates: Mapping[str, Candidates | tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        basis: str = "",
        tokens: int | None = None,
    ) -> None:
        """``tokens``: the calibration's non-padding token count where known beforehand; it
        picks, per side, the cheaper of projections and second moments (:func:`_moments_cheaper`)."""
        self.layers, self.basis = dict(layers), basis
        self.decomposition_s = self.calibration_s = 0.0  # for the report of a shared calibration
        self.candidates = {
            name: c if isinstance(c, Candidates) else Candidates(v=c[0], u=c[1], sigma=c[2])
            for name, c in candidates.items()
        }
        self.sides: dict[
            str, tuple[ProjectedSquares | SecondMoment, ProjectedSquares | SecondMoment]
        ] = {}
        # Tall layers' Σ (v̂_iᵀ Wᵀg)², from the gradient of the base layer's input (module
        # docstring, step 2); divided by σ_i² and added to the g side's sums.
        self.input_grad_sides: dict[str, ProjectedSquares] = {}
        for name, c in self.candidates.items():
            m, k = c.u.shape
            weight = self.layers[name].get_base_layer().weight.detach().float()
            # The float64 second moments where float64 GEMMs are fast (CPU); on a GPU (whose
            # float64 rate is 1/2 to 1/64 of float32) the float32 projections.
            moments = weight.device.type == "cpu"
            if c.v is not None:
                x_side = ProjectedSquares(c.v)
            elif moments and _moments_cheaper(m, k, tokens):
                x_side = SecondMoment(c.c, lift=weight)
            else:
                x_side = ProjectedSquares(c.c, lift=weight)
            g_side = (
                SecondMoment(c.u)
                if moments and _moments_cheaper(m, k, tokens)
                else ProjectedSquares(c.u)
            )
            self.sides[name] = (x_side, g_side)
            if _reads_input_grads(self.layers[name].get_base_layer().weight, c):
                self.input_grad_sides[name] = ProjectedSquares(c.v)
        device = next(iter(self.candidates.values())).u.device
        self.tokens = {name: torch.zeros((), device=device) for name in self.candidates}
        self.mask_ref: list = [None]
        self.batches = 0
        # A lifted side's W x is what the frozen base layer has just computed (its output less
        # its bias): taken from there, the lift product is not computed a second time.
        self._base_outputs: dict[str, torch.Tensor] = {}
        self._reading_input_grad: dict[str, bool] = {}

    @staticmethod
    def _keep(t: torch.Tensor, rows: _KeptRows | None) -> torch.Tensor:
        """The non-padding rows (all rows for 2-D inputs such as a pooler's)."""
        t = t.reshape(-1, t.shape[-1])
        if rows is None or rows.index is None or rows.total != t.shape[0]:
            return t
        return t.index_select(0, rows.index)

    def _add_input(self, name: str, x: torch.Tensor, rows: _KeptRows | None) -> bool:
        """The x side of one forward call; returns whether this call's q_i come from the base
        layer's input gradient (then the output gradient is not projected)."""
        # p is accumulated in the forward pass, so x need not live until backward.
        wx = self._base_outputs.pop(name, None)
        z = self._keep(x if wx is None else wx, rows)
        self.sides[name][0].add(z, lifted=wx is not None)
        self.tokens[name] += z.shape[0]
        return self._reading_input_grad.pop(name, False)

    def _input_grad_hook(self, name: str) -> Callable:
        """A forward pre-hook of a tall layer's base layer: it hands the base layer an alias of
        x of its own, whose gradient is exactly ``Wᵀ g`` (whatever the adapter and the rest of
        the network do with x), and projects that gradient onto ``v̂_i``."""

        def hook(base: torch.nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            full_precision = x.dtype == torch.float32 and not torch.is_autocast_enabled(
                x.device.type
            )
            if not (x.requires_grad and torch.is_grad_enabled() and full_precision):
                return None  # the output gradient is projected (no gradient reaches x, or half)
            rows, side = self.mask_ref[0], self.input_grad_sides[name]
            alias = x.view_as(x)
            alias.register_hook(lambda grad: side.add(self._keep(grad.detach(), rows)))
            self._reading_input_grad[name] = True
            return (alias, *args[1:])

        return hook

    def _keep_base_output(self, name: str, base: torch.nn.Module, output: torch.Tensor) -> None:
        """``W x = y − b`` of a lifted layer's float32 base output (in a half-precision or
        autocast run the float32 lift from x is kept: a half y would lose the small p_i)."""
        if output.dtype != torch.float32 or base.weight.dtype != torch.float32:
            return
        wx = output.detach()
        self._base_outputs[name] = wx if base.bias is None else wx - base.bias.detach()

    def _base_output_hook(self, name: str) -> Callable:
        def hook(base: torch.nn.Module, _: tuple, output: torch.Tensor) -> None:
            self._keep_base_output(name, base, output)  # returns None: the output is unchanged

        return hook

    @contextmanager
    def _base_output_hooks(self):
        handles = []
        try:
            for name, (side, _) in self.sides.items():
                base = self.layers[name].get_base_layer()
                if getattr(side, "lift", None) is not None:
                    handles.append(base.register_forward_hook(self._base_output_hook(name)))
                if name in self.input_grad_sides:
                    handles.append(base.register_forward_pre_hook(self._input_grad_hook(name)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._base_outputs.clear()
            self._reading_input_grad.clear()

    def _add_grad(
        self, name: str, from_input_grad: bool, g: torch.Tensor, rows: _KeptRows | None
    ) -> None:
        if not from_input_grad:
            self.sides[name][1].add(self._keep(g, rows))

    @contextmanager
    def hooks(self) -> Iterator[None]:
        with (
            self._base_output_hooks(),
            capture_io(self.layers, self._add_grad, self.mask_ref, self._add_input),
        ):
            yield

    def start_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        # Every non-padding position counts, whatever its label (module docstring, step 2).
        self.mask_ref[0] = _KeptRows.of(padding_mask(batch))

    def end_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        self.batches += 1

    def sums(self) -> dict[str, list[torch.Tensor]]:
        """Per layer the local ``[Σ (v̂_iᵀ x)², Σ (û_iᵀ g)²]`` (not yet all-reduced)."""
        out = {name: [side.result() for side in sides] for name, sides in self.sides.items()}
        for name, side in self.input_grad_sides.items():
            # û_iᵀ g = (W v̂_i)ᵀ g / σ_i = v̂_iᵀ (Wᵀ g) / σ_i
            out[name][1] = out[name][1] + side.result() / self.candidates[name].sigma.square()
        return out

    def energies(self) -> dict[str, torch.Tensor]:
        """``e_i = p_i q_i`` per layer over all processes (call once: it all-reduces in place)."""
        energies = {}
        for name, (p_sum, q_sum) in self.sums().items():
            p_sum, q_sum = all_reduce_sum(p_sum), all_reduce_sum(q_sum)
            q_sum = q_sum / world_size() ** 2  # g of the global batch loss = local g / world size
            count = all_reduce_sum(self.tokens[name]).clamp_min(1)
            energies[name] = (p_sum / count) * (q_sum / count)
        return energies


def _project_statistics(
    model: PeftModel,
    adapter: str,
    layers: Mapping[str, LoraLayer],
    candidates: Mapping[str, Candidates | tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    batches: list,
    n_batches: int,
    device: torch.device,
    *,
    dropout: bool,
    progress: bool,
    basis: str = "",
) -> tuple[CandidateEnergies, int]:
    """FILet's own calibration passes with hooks on ``layers`` only (only their B take
    gradients): the collected :class:`CandidateEnergies` and the number of batches used."""
    tokens = _calibration_tokens(batches[:n_batches])
    statistic = CandidateEnergies(layers, candidates, basis, tokens)
    used = run_passes(
        model,
        [layer.lora_B[adapter].weight for layer in layers.values()],
        batches,
        n_batches,
        device,
        [statistic],
        dropout=dropout,
        progress=progress,
        desc="FILet calibration",
    )
    return statistic, used


def _check_model(model: PeftModel, adapter: str, layers: Mapping[str, LoraLayer]) -> None:
    """What FILet refuses before any work: a second init, adapters that already hold an update
    (B ≠ 0: FILet would drop it), a scaling s ≤ 0 (``√(d/s)`` is not real), non-float or
    non-finite base weights, and a base weight shared with another module (tied embeddings: writing the
    residual W − sBA would change that module too, and the outputs with it)."""
    if has_residual(model):
        # W is already W − s B₀ A₀: a second residual would change the outputs, and the export
        # (which undoes one recorded B₀ A₀ per layer) would no longer reproduce the model
        raise ConfigError(
            "this model's adapters were already initialised by FILet (its base weights are "
            "residuals); initialise a fresh PeftModel instead of calling filet_init twice"
        )
    trained = [n for n, layer in layers.items() if layer.lora_B[adapter].weight.detach().any()]
    if trained:
        raise ConfigError(
            "FILet initialises fresh adapters (B = 0); B is non-zero in "
            f"{trained[:3]} (trained, or initialised by another method), and FILet would drop "
            "that update"
        )
    owners = parameter_owners(model)
    for name, layer in layers.items():  # cheap checks of every layer before any work
        weight = layer.get_base_layer().weight
        if len(owners.get(id(weight), [])) > 1:
            raise ConfigError(
                f"FILet rewrites the base weight of {name!r} as a residual, but that weight is "
                f"shared ({owners[id(weight)]}: tied weights), so the other module would change "
                "too; leave that module out of the targets, or untie the weights first"
            )
        if not weight.is_floating_point():
            raise ConfigError(
                f"FILet needs a floating-point base weight; {name!r} is {weight.dtype} (quantised?)"
            )
        if not layer.scaling[adapter] > 0:
            raise ConfigError(
                f"FILet needs a positive LoRA scaling s = alpha / r; {name!r} has "
                f"s = {layer.scaling[adapter]} (set lora_alpha > 0)"
            )
        if not bool(torch.isfinite(weight).all()):  # its decomposition would be NaN or fail
            raise ConfigError(f"the base weight of {name!r} holds NaN or inf values")


def _candidate_bytes(layers: Mapping[str, LoraLayer], basis: str) -> int:
    """An upper bound of the bytes of the float32 candidates of ``layers`` (none dropped)."""
    total = 0
    for layer in layers.values():
        m, n = layer.get_base_layer().weight.shape
        if basis == "svd":
            total += (m + n + 1) * min(m, n)
        else:
            total += (2 * m * n if m * (m + n) < n * n else n * n + m * n) + n
    return 4 * total


def _use_cache(cache: bool, layers: Mapping[str, LoraLayer], basis: str) -> bool:
    """The cache serves a model all of whose candidates fit in it (no hashing, no thrashing
    otherwise)."""
    return cache and 0 < _candidate_bytes(layers, basis) <= DECOMPOSITIONS.max_bytes


def _candidates_of(
    layers: Mapping[str, LoraLayer], basis: str, cache: bool
) -> dict[str, Candidates]:
    """Every layer's candidates: from the cache where it holds them, the others decomposed
    together (:func:`many_layer_candidates`: batched over same-shape layers on a GPU)."""
    weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
    cache = cache and DECOMPOSITIONS.max_bytes > 0
    keys = {name: DECOMPOSITIONS.key(w, basis) for name, w in weights.items()} if cache else {}
    out: dict[str, Candidates] = {}
    for name, key in keys.items():
        hit = DECOMPOSITIONS.lookup(key, weights[name].device)
        if hit is not None:
            out[name] = hit
    missing = [name for name in weights if name not in out]
    computed = many_layer_candidates([weights[name] for name in missing], basis)
    for name, candidates in zip(missing, computed, strict=True):
        if cache:
            DECOMPOSITIONS.put(keys[name], candidates)
        out[name] = candidates
    return {name: out[name] for name in weights}


def _check_ranks(adapter: str, layers: Mapping[str, LoraLayer], candidates, basis: str) -> None:
    for name, c in candidates.items():
        if layers[name].r[adapter] > c.sigma.numel():
            raise ConfigError(
                f"rank {layers[name].r[adapter]} of {name!r} exceeds its {c.sigma.numel()} "
                f"usable {basis} candidates"
            )


def filet_statistic(
    model: PeftModel, *, basis: str = "gram", cache: bool = True, tokens: int | None = None
) -> CandidateEnergies:
    """FILet's calibration statistics for every LoRA layer of ``model``, to collect in another
    method's passes (``fim-lora+filet``: FIM-LoRA runs its passes at B = 0, where the model
    computes the base model's function, so every layer sees the x and g FILet's own passes would
    see on the same batches). Pass the result to :func:`filet_init` as ``collected``. The
    candidates of every layer are held until then (the ungrouped memory of ``filet_init``)."""
    _check_options(basis, "min", "fisher-norm")
    adapter, layers = lora_layers(model)
    _check_model(model, adapter, layers)
    started = time.perf_counter()
    candidates = _candidates_of(layers, basis, _use_cache(cache, layers, basis))
    statistic = CandidateEnergies(layers, candidates, basis, tokens)
    statistic.decomposition_s = time.perf_counter() - started
    return statistic


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
    cache: bool = True,
    collected: CandidateEnergies | None = None,
    collected_by: str = "",
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
        cache: take the candidates of a weight already decomposed from :data:`DECOMPOSITIONS`
            (and keep new ones there) where all of the model's fit; False decomposes afresh and
            keeps nothing.
        collected: the statistics of :func:`filet_statistic`, already collected in another
            method's passes over the calibration batches; then FILet runs no passes of its own
            (``dataloader``, ``n_batches``, ``dropout``, ``layers_per_pass`` are not used).
        collected_by: the name of that method, for the report.

    Raises ``ConfigError`` (bad options, unsupported layers, a rank above the number of usable
    candidates) or ``CalibrationError`` (empty loader, no labels, NaN/inf statistics), always
    before any weight is changed.
    """
    _check_options(basis, select, scale)
    adapter, layers = lora_layers(model)
    _check_model(model, adapter, layers)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    energies, selected, ratios, sigmas, factors = {}, {}, {}, {}, {}
    calibration_s, used = 0.0, 0
    if collected is not None:
        if set(collected.layers) != set(layers) or collected.basis != basis:
            raise ConfigError(
                "the collected FILet statistics are not this model's layers with "
                f"basis={basis!r}; collect them with filet_statistic(model, basis={basis!r})"
            )
        _check_ranks(adapter, layers, collected.candidates, basis)
        calibration_s, used = collected.calibration_s, collected.batches
        rounds = [(list(layers), collected)]
    else:
        device = next(iter(layers.values())).get_base_layer().weight.device
        # the same for every group of layers
        batches = first_batches(dataloader, n_batches, next_token=predicts_next_token(model))
        # q takes each batch's g as 1/world of the global batch's: a batch only one process
        # holds would be weighed wrongly
        refuse_unequal_batch_counts(len(batches), device, "FILet's statistics")
        rounds = ((group, None) for group in layer_groups(list(layers), layers_per_pass))
        cache = _use_cache(cache, layers, basis)
    for group, statistic in rounds:
        if statistic is None:
            # Bases of this group only: the n×n and m×m candidates are the memory that grows
            # with the model; what is kept across groups is r (n + m) numbers per layer.
            group_layers = {name: layers[name] for name in group}
            candidates = _candidates_of(group_layers, basis, cache)
            _check_ranks(adapter, group_layers, candidates, basis)
            calibration_start = time.perf_counter()
            statistic, used = _project_statistics(
                model,
                adapter,
                group_layers,
                candidates,
                batches,
                n_batches,
                device,
                dropout=dropout,
                progress=progress,
                basis=basis,
            )
            calibration_s += time.perf_counter() - calibration_start
        group_energies = statistic.energies()
        check_all_finite({name: group_energies[name] for name in group}, "Fisher statistics")
        # Selection and factors run on the host: per layer they are r-column gathers and r×r
        # decompositions (QR, a 2-norm), which on a GPU cost more in small-kernel and solver
        # latency than moving the selected r (m + n) numbers; one transfer per group and layer.
        host_energies = _on_host([group_energies[name] for name in group])
        for name, energy in zip(group, host_energies, strict=True):
            layer = layers[name]
            c = statistic.candidates[name]
            if not energy.any():
                raise CalibrationError(
                    f"all Fisher energies of {name!r} are zero; does the loss depend on it?"
                )
            idx = _select(energy, layer.r[adapter], select, generator)
            on_device = idx.to(c.u.device)
            v_sel, u_sel, sigma = _on_host(
                [c.right(layer.get_base_layer().weight, on_device), c.u[:, on_device], c.sigma]
            )
            if scale == "singular":
                magnitude = sigma[idx]
            elif scale == "fisher":
                magnitude = energy[idx]
            else:
                magnitude = _fisher_norm(energy[idx], v_sel, u_sel, sigma[idx])
            s = layer.scaling[adapter]
            root = (magnitude / s).sqrt()
            a = root[:, None] * v_sel.T
            b = u_sel * root[None, :]
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):  # before any write
                raise CalibrationError(
                    f"FILet's factors of {name!r} are not finite (magnitudes {magnitude.tolist()[:4]}"
                    f"...); the model is unchanged"
                )
            factors[name] = (a.to(c.u.device), b.to(c.u.device))
            energies[name], selected[name], sigmas[name] = energy, idx, sigma
            ratios[name] = (lowrank_spectral_norm(b, a) * s / sigma.max()).item()
        del statistic

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
        # with collected statistics: also the decomposition and the passes done before the call
        init_s=time.perf_counter()
        - started
        + (collected.decomposition_s + calibration_s if collected is not None else 0.0),
        delta_norm_ratio=ratios,
        calibration_shared_with=collected_by if collected is not None else "",
    )


def adapter_grad_norms(model: PeftModel, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """‖∂L/∂A‖ and ‖∂L/∂B‖ over all adapters on one batch (dropout off), leaving no gradients:
    how much signal the adapters get at the point training starts from."""
    params = {n: p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n}
    device = next(iter(params.values())).device
    with calibration_mode(model, params.values()):
        on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        model(**scored_window(model, on_device)).loss.backward()
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

    def calibration_statistic(
        self, model: PeftModel, calibration_loader: Iterable[Mapping[str, torch.Tensor]] = ()
    ) -> CandidateEnergies | None:
        """FILet's statistics to collect in another method's passes (:func:`filet_statistic`)
        over the first ``n_batches`` of ``calibration_loader``, or None where FILet calibrates in
        groups of layers (``layers_per_pass``) and so cannot. A list of batches gives the token
        count that picks the statistics' cheaper form, as in FILet's own passes."""
        if self.options["layers_per_pass"] is not None:
            return None
        tokens = None
        if isinstance(calibration_loader, Sequence):
            tokens = _calibration_tokens(calibration_loader[: self.options["n_batches"]])
        return filet_statistic(model, basis=self.options["basis"], tokens=tokens)

    def prepare(
        self,
        model: PeftModel,
        calibration_loader: Iterable[dict[str, torch.Tensor]],
        collected: CandidateEnergies | None = None,
        collected_by: str = "",
    ) -> dict[str, Any]:
        """``collected``: :meth:`calibration_statistic`'s statistics, collected in the passes of
        ``collected_by`` over the same batches; FILet then runs no passes of its own."""
        self.report = filet_init(
            model,
            calibration_loader,
            **self.options,
            collected=collected,
            collected_by=collected_by,
        )
        self.model = model
        self.initial_a = input_factors(model) or {}
        # a diagnostic after the init: a one-shot iterator FILet used up gives none (no error)
        batch = next(iter(calibration_loader), None)
        self.step0_grad_norm = {} if batch is None else adapter_grad_norms(model, batch)
        return {"filet": self.report.summary(), "step0_grad_norm": self.step0_grad_norm}

    def diagnostics(self) -> dict[str, Any]:
        if self.model is None:
            return {}
        overlaps = row_space_kept(self.initial_a, self.model)
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
