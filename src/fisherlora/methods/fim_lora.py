"""FIM-LoRA: task-informative rank allocation from calibration-time Fisher information.

1. LoRA is injected at base rank r on every target module (A random, B = 0).
2. ``n_batches`` forward/backward passes on training data (dropout off, no optimizer step)
   accumulate the diagonal empirical Fisher of each module's B:

       per_example:  F_m = (1/N) Σ_i (∂ℓ_i/∂B_m)²                 (ℓ_i the loss of example i)
       batch:        F_m = (1/T) Σ_t (∂L_t/∂B_m)²                 (L_t the loss of batch t)

   ``per_example`` is the paper's Eq. 1 (the empirical Fisher of the per-example loss) and the
   default; ``batch`` (the squared gradient of each mini-batch loss) is the named variant
   ``fim-lora-batch``.

   B's gradient is read because A's is exactly zero while B = 0 (∂L/∂A = s Bᵀ g xᵀ = 0).
3. A module's score is ``mean(F_m)`` (or ``max``, or the norm ``‖F_m‖₂``).
4. Integer ranks in proportion to the scores, ``r_min ≤ r_m ≤ r_max``, summing exactly to the
   budget ``Σ_m r`` (or, counted in parameters, to a total ``Σ_m r_m (n_m + m_m)`` not above
   ``Σ_m r (n_m + m_m)`` to which no module can add one rank):
   :func:`fisherlora.allocate.water_fill`. The library function :func:`allocate_ranks` counts
   ranks by default; the runner methods (``fim-lora``, ``random-rank``) count parameters, so
   that a comparison matches LoRA's trainable parameters (ranks moved to wide modules cost more
   than ranks moved to narrow ones).
5. Every adapter is resized in place and keeps its scaling ``s`` (``α_m = s · r_m``; with rsLoRA
   ``α_m = s · √r_m``), written to
   the config's ``rank_pattern`` / ``alpha_pattern`` so that stock PEFT reloads the adapter.

``random-rank`` is the control: the same allocator fed seeded uniform random scores.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fisherlora.adapters import apply_ranks, check_rank_fits, lora_layers, max_useful_rank
from fisherlora.allocate import DEFAULT_ROUNDING, ROUNDINGS, water_fill
from fisherlora.capture import (
    PassStatistic,
    apply_mask,
    capture_io,
    check_all_finite,
    example_loss_scale,
    first_batches,
    layer_groups,
    predicts_next_token,
    refuse_unequal_batch_counts,
    run_passes,
    token_mask,
)
from fisherlora.errors import CalibrationError, ConfigError, check_choices
from fisherlora.figures import Figure, ModuleValues, module_grid
from fisherlora.methods.base import AdapterMethod
from fisherlora.stats import (
    all_reduce_mean,
    all_reduce_sum,
    per_example_sq_grad,
    reduce_score,
)

if TYPE_CHECKING:
    import pandas as pd

BUDGETS = ("ranks", "params")
SCORES = ("mean", "max", "l2")
ESTIMATORS = ("batch", "per_example")


@dataclass
class RankPlan:
    """The outcome of a rank allocation: per-module scores, old and new ranks, and the budget."""

    scores: dict[str, float]
    old_ranks: dict[str, int]
    ranks: dict[str, int]
    alphas: dict[str, float]
    costs: dict[str, int]  # parameters per rank unit: n_m + m_m
    budget: int  # in ranks or in parameters, see budget_mode
    budget_mode: str
    r_min: int
    r_max: int
    score: str
    estimator: str
    calibration_batches: int
    calibration_s: float
    allocation_s: float
    rounding: str = DEFAULT_ROUNDING  # how the units left after flooring went out (water_fill)

    @property
    def base_rank(self) -> int:
        return max(set(self.old_ranks.values()), key=list(self.old_ranks.values()).count)

    def spent(self) -> int:
        """What the allocation uses of the budget, in the budget's unit."""
        if self.budget_mode == "ranks":
            return sum(self.ranks.values())
        return sum(self.ranks[m] * self.costs[m] for m in self.ranks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"spent": self.spent()}

    def rank_table(self) -> pd.DataFrame:
        """Ranks as a ``pandas.DataFrame``: one row per layer, one column per module type."""
        return module_grid(self.ranks)

    def figure(self, title: str = "FIM-LoRA rank map") -> ModuleValues:
        """The rank map ``rank_map.png`` as data: layer × module type, annotated, colours
        diverging around the base rank (``fisherlora.experiments.method_plots.draw_figure``
        draws it)."""
        return ModuleValues(
            file="rank_map.png",
            title=title,
            values=dict(self.ranks),
            label=f"rank (base {self.base_rank})",
            center=self.base_rank,
            integers=True,
        )

    def save(self, out_dir: str | Path) -> None:
        """Write ``ranks.json`` into ``out_dir`` (the runner draws ``rank_map.png`` from
        :meth:`figure`)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ranks.json").write_text(json.dumps(self.to_dict(), indent=2))


def _check_options(budget: str, score: str, estimator: str, rounding: str) -> None:
    check_choices(
        "FIM-LoRA",
        (
            ("budget", budget, BUDGETS),
            ("score", score, SCORES),
            ("estimator", estimator, ESTIMATORS),
            ("rounding", rounding, ROUNDINGS),
        ),
    )


def _allocation_problem(
    model: PeftModel, budget: str, r_min: int | None, r_max: int | None
) -> tuple[dict[str, int], dict[str, int], int, dict[str, int] | None, int, int]:
    """Current ranks, per-rank costs ``n_m + m_m``, the budget (in ranks or parameters), the
    costs to pass to the allocator (``None`` in ranks mode) and the rank bounds."""
    adapter, layers = lora_layers(model)
    old = {name: layer.r[adapter] for name, layer in layers.items()}
    costs = {name: layer.in_features + layer.out_features for name, layer in layers.items()}
    r = model.peft_config[adapter].r
    low = max(1, r // 2) if r_min is None else r_min
    # A rank above min(in, out) of a module adds nothing (max_useful_rank), and the bound is one
    # for all modules: the default 2 r stops at the smallest module's limit (but never below r,
    # which the model already has), and an explicit r_max above that limit is refused.
    if r_max is None:
        limit = min(max_useful_rank(layer) for layer in layers.values())
        high = min(2 * r, max(r, limit))
    else:
        check_rank_fits(layers, r_max, what="r_max")
        high = r_max
    if budget == "ranks":
        return old, costs, sum(old.values()), None, low, high
    return old, costs, sum(old[m] * costs[m] for m in old), costs, low, high


def rank_bounds(
    model: PeftModel, *, budget: str = "ranks", r_min: int | None = None, r_max: int | None = None
) -> tuple[int, int]:
    """The (r_min, r_max) an allocation of ``model`` runs under, defaults resolved."""
    *_, low, high = _allocation_problem(model, budget, r_min, r_max)
    return low, high


def check_budget(
    model: PeftModel, *, budget: str = "ranks", r_min: int | None = None, r_max: int | None = None
) -> None:
    """Raise ``ConfigError`` naming the numbers when the budget and bounds are infeasible."""
    old, _, total, unit_costs, low, high = _allocation_problem(model, budget, r_min, r_max)
    water_fill(dict.fromkeys(old, 1.0), total, low, high, unit_costs)


def plan_ranks(
    model: PeftModel,
    scores: Mapping[str, float],
    *,
    r_min: int | None = None,
    r_max: int | None = None,
    budget: str = "ranks",
    keep_scaling: bool = True,
    rounding: str = DEFAULT_ROUNDING,
) -> RankPlan:
    """Allocate ranks in proportion to ``scores`` and resize ``model`` in place (steps 4-5)."""
    started = time.perf_counter()
    old, costs, total, unit_costs, low, high = _allocation_problem(model, budget, r_min, r_max)
    allocated = water_fill(dict(scores), total, low, high, unit_costs, rounding=rounding)
    ranks = {name: allocated[name] for name in old}  # in the model's module order
    alphas = apply_ranks(model, ranks, keep_scaling=keep_scaling)
    return RankPlan(
        scores=dict(scores),
        old_ranks=old,
        ranks=ranks,
        alphas=alphas,
        costs=costs,
        budget=total,
        budget_mode=budget,
        r_min=low,
        r_max=high,
        score="",
        estimator="",
        calibration_batches=0,
        calibration_s=0.0,
        allocation_s=time.perf_counter() - started,
        rounding=rounding,
    )


def fisher_of_b(
    model: PeftModel,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    n_batches: int = 8,
    estimator: str = "per_example",
    dropout: bool = False,
    progress: bool = True,
    layers_per_pass: int | None = None,
    also_collect: Sequence[PassStatistic] = (),
) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal empirical Fisher of every LoRA B (float32, ``[out, r]``) and the batches used.

    ``layers_per_pass``: the B matrices take gradients (and have accumulators) in consecutive
    groups of this many modules, each group with its own passes over the same batches (same
    result; extra memory ``Σ_{m∈group} m_m r_m`` floats of gradients and accumulators, plus the
    per-example estimator's transient ``batch · m_m · r_m`` per module).

    ``also_collect``: statistics of another method (:class:`fisherlora.capture.PassStatistic`) to
    accumulate in these same passes, e.g. FILet's candidate energies in ``fim-lora+filet``; only
    without ``layers_per_pass`` (in grouped passes not every layer sees its output gradient).

    Raises ``CalibrationError`` naming the module on a NaN/inf gradient, for an empty loader or a
    batch without labels. Only B gets gradients during the passes; all flags, modes and grads are
    restored afterwards.
    """
    adapter, layers = lora_layers(model)
    all_b = {name: layer.lora_B[adapter].weight for name, layer in layers.items()}
    device = next(iter(all_b.values())).device
    # the same batches for every group
    batches = first_batches(dataloader, n_batches, next_token=predicts_next_token(model))
    if estimator == "batch":
        # it all-reduces every batch's gradient: a process with fewer batches would leave the
        # others waiting in a collective (a hang or a crash)
        refuse_unequal_batch_counts(
            len(batches), device, "the batch estimator (or use the per-example one)"
        )
    elif also_collect:
        # FILet's q takes each batch's g as 1/world of the global batch's
        refuse_unequal_batch_counts(len(batches), device, "FILet's statistics")
    groups = layer_groups(list(layers), layers_per_pass)
    if also_collect and len(groups) > 1:
        raise ConfigError("statistics of another method ride on ungrouped passes only")
    fisher: dict[str, torch.Tensor] = {}
    used = 0
    for group in groups:
        statistic = BFisher(
            model,
            {name: layers[name].lora_B[adapter] for name in group},
            {name: all_b[name] for name in group},
            estimator,
        )
        used = run_passes(
            model,
            statistic.b_weights.values(),
            batches,
            n_batches,
            device,
            [statistic, *also_collect],
            dropout=dropout,
            progress=progress,
            desc="FIM-LoRA calibration",
        )
        fisher.update(statistic.result())
    return fisher, used


class BFisher:
    """The Fisher diagonal of the B matrices ``b_weights`` over calibration passes
    (:class:`fisherlora.capture.PassStatistic`): ``(∂ℓ_i/∂B)²`` per example from hooks on the B
    modules (``per_example``), or ``(∂L_t/∂B)²`` of each batch loss from ``B.grad``
    (``batch``). The passes must give exactly these B gradients (and no others)."""

    def __init__(
        self,
        model: PeftModel,
        b_modules: Mapping[str, torch.nn.Module],
        b_weights: Mapping[str, torch.Tensor],
        estimator: str,
    ) -> None:
        self.b_modules, self.b_weights, self.estimator = b_modules, b_weights, estimator
        self.fisher = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in b_weights.items()}
        device = next(iter(b_weights.values())).device
        self.examples = torch.zeros((), dtype=torch.float64, device=device)
        self.batches = 0
        self.mask_ref: list = [None]
        self.loss_scale: torch.Tensor | None = None
        self.next_token = predicts_next_token(model)
        self.calls: dict[str, int] = {}  # per B module, in the current batch

    def _accumulate_per_example(self, name: str, u: torch.Tensor, g: torch.Tensor, mask) -> None:
        # ∂ℓ_i/∂B = c_i · G_i: c_i = N for a loss averaged over the N examples of the batch,
        # T / T_i for one averaged over T scored tokens (capture.example_loss_scale).
        # Checked for NaN/inf once per batch (end_batch), not here: one host sync per batch.
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] > 1:
            # a layer shared across depth (ALBERT): an example's gradient is the sum over the
            # calls, whose square is not the sum of each call's square
            raise CalibrationError(
                f"{name!r} runs more than once in one forward pass (a layer shared across depth), "
                "so its per-example Fisher would miss the cross terms between the calls; use "
                "estimator='batch' (the gradient of each batch loss)"
            )
        self.fisher[name] += per_example_sq_grad(apply_mask(u, mask), g, self.loss_scale)

    def hooks(self) -> AbstractContextManager[None]:
        per_example = self.estimator == "per_example"
        return capture_io(
            self.b_modules if per_example else {}, self._accumulate_per_example, self.mask_ref
        )

    def start_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        # Only padding is masked: a per-example gradient sums over every token (a prompt
        # token's g is not zero when later scored tokens attend to it).
        self.mask_ref[0] = token_mask({"attention_mask": batch.get("attention_mask")})
        self.loss_scale = example_loss_scale(batch, self.next_token)
        self.calls = {}

    def end_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        if self.estimator == "batch":
            for name, weight in self.b_weights.items():
                # a module the loss does not reach has no gradient: F = 0 for it, as the
                # per-example estimator gives (and every process reduces every module)
                grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
                self.fisher[name] += all_reduce_mean(grad.float()).square()
        # A NaN or inf gradient leaves its module's sums non-finite: one check for all modules.
        check_all_finite(self.fisher)
        for weight in self.b_weights.values():
            weight.grad = None
        self.examples += batch["labels"].shape[0]
        self.batches += 1

    def result(self) -> dict[str, torch.Tensor]:
        """``F_m``: the per-example squares over all examples (of all processes), or the batch
        squares over the batches."""
        per_example = self.estimator == "per_example"
        count = all_reduce_sum(self.examples) if per_example else torch.tensor(float(self.batches))
        for name in self.fisher:
            if per_example:
                all_reduce_sum(self.fisher[name])
            self.fisher[name] /= count.to(torch.float32)
        return self.fisher


def _check_fresh(model: PeftModel, caller: str) -> dict[str, LoraLayer]:
    """The LoRA layers of ``model``, refused unless every B is zero: resizing keeps the first
    rows of A and columns of B, so a trained or data-initialised adapter (or FILet's residual
    base) would silently compute something else afterwards."""
    adapter, layers = lora_layers(model)
    trained = [n for n, layer in layers.items() if layer.lora_B[adapter].weight.detach().any()]
    if trained:
        raise ConfigError(
            f"{caller} needs freshly initialised adapters (B = 0); B is non-zero in {trained[:3]}"
        )
    return layers


def allocate_ranks(
    model: PeftModel,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    n_batches: int = 8,
    r_min: int | None = None,
    r_max: int | None = None,
    budget: str = "ranks",
    score: str = "mean",
    estimator: str = "per_example",
    keep_scaling: bool = True,
    dropout: bool = False,
    progress: bool = True,
    layers_per_pass: int | None = None,
    also_collect: Sequence[PassStatistic] = (),
    rounding: str = DEFAULT_ROUNDING,
) -> RankPlan:
    """FIM-LoRA: re-allocate the LoRA ranks of ``model`` by calibration-time Fisher information.

    Args:
        model: a ``PeftModel`` with one freshly initialised LoRA adapter (B = 0) at base rank r.
            Changed in place: adapter shapes, ``rank_pattern``, ``alpha_pattern``; nothing else.
        dataloader: batches of training data with ``labels`` (calibration never sees test data).
        n_batches: forward/backward passes; fewer available gives a warning naming the count used.
        r_min, r_max: rank bounds, default ``max(1, r // 2)`` and ``min(2 r, max(r, k))``, k the
            smallest ``min(in, out)`` among the targets (a rank above it adds nothing).
        budget: ``"ranks"`` (Σ r_m = M r exactly) or ``"params"`` (Σ_m r_m (n_m + m_m) ≤
            Σ_m r (n_m + m_m), and no module can take one more rank). The runner's ``fim-lora`` uses
            ``"params"``, so that it trains no more adapter parameters than LoRA at rank r.
        score: ``"mean"``, ``"max"`` or ``"l2"`` reduction of each module's Fisher diagonal.
        estimator: ``"per_example"`` (the paper's Eq. 1: mean of per-example squared gradients,
            from hooks) or ``"batch"`` (squared gradient of each mini-batch loss; the named
            variant ``fim-lora-batch``).
        keep_scaling: keep each module's scaling s of rank r (``α_m = s r_m``; rsLoRA: ``s √r_m``);
            else ``s_m = α/r_m`` (rsLoRA: ``α/√r_m``).
        dropout: keep dropout on during calibration (off by default).
        progress: show a progress bar.
        layers_per_pass: calibrate the modules in groups of this many (memory-bounded; same
            result, more passes); None: all at once.
        also_collect: statistics of another method to accumulate in the same passes (see
            :func:`fisher_of_b`; ``fim-lora+filet`` collects FILet's energies this way).
        rounding: ``"largest"`` (default) or ``"maximal"``: how the units left after flooring
            the targets go out under a parameter budget (:func:`fisherlora.allocate.water_fill`;
            ``"largest"`` spends the most of the budget that any such rounding can,
            ``"maximal"`` stops when no module fits one more rank).

    Returns:
        The :class:`RankPlan`. Raises ``ConfigError`` (bad options, infeasible bounds, no LoRA
        layers, B ≠ 0) or ``CalibrationError`` (empty loader, no labels, NaN/inf gradients),
        in every case before the model is changed.
    """
    _check_options(budget, score, estimator, rounding)
    _check_fresh(model, "allocate_ranks")
    check_budget(model, budget=budget, r_min=r_min, r_max=r_max)
    started = time.perf_counter()
    fisher, used = fisher_of_b(
        model,
        dataloader,
        n_batches=n_batches,
        estimator=estimator,
        dropout=dropout,
        progress=progress,
        layers_per_pass=layers_per_pass,
        also_collect=also_collect,
    )
    calibration_s = time.perf_counter() - started
    scores = {name: reduce_score(f, score) for name, f in fisher.items()}
    if not any(scores.values()):
        # nothing to rank by: an allocation would be the uniform one, silently
        raise CalibrationError(
            "every module's Fisher score is zero: the loss does not depend on any LoRA B "
            "(a scaling alpha / r of 0? labels that score no token?); the model is unchanged"
        )
    plan = plan_ranks(
        model,
        scores,
        r_min=r_min,
        r_max=r_max,
        budget=budget,
        keep_scaling=keep_scaling,
        rounding=rounding,
    )
    plan.score, plan.estimator = score, estimator
    plan.calibration_batches, plan.calibration_s = used, calibration_s
    return plan


def random_ranks(
    model: PeftModel,
    *,
    seed: int = 0,
    r_min: int | None = None,
    r_max: int | None = None,
    budget: str = "ranks",
    keep_scaling: bool = True,
    rounding: str = DEFAULT_ROUNDING,
) -> RankPlan:
    """The random-rank control: :func:`allocate_ranks` with seeded uniform scores, no calibration."""
    _check_options(budget, "mean", "batch", rounding)
    layers = _check_fresh(model, "random_ranks")
    if isinstance(seed, bool) or not isinstance(seed, int):  # random.Random(None) is unseeded
        raise ConfigError(f"random_ranks needs a whole-number seed, got {seed!r}")
    rng = random.Random(seed)
    scores = {name: rng.random() for name in sorted(layers)}
    plan = plan_ranks(
        model,
        scores,
        r_min=r_min,
        r_max=r_max,
        budget=budget,
        keep_scaling=keep_scaling,
        rounding=rounding,
    )
    plan.score, plan.estimator = "uniform-random", f"seed {seed}"
    return plan


class FimLoRA(AdapterMethod):
    """Runner method ``fim-lora``: :func:`allocate_ranks` before the optimizer exists, with the
    paper's per-example estimator and a budget in parameters (matched to LoRA's at rank r)."""

    name = "fim-lora"
    calibrates = True  # runs calibration passes (which a composition may share with FILet)

    def __init__(
        self,
        calib_batches: int = 8,
        r_min: int | None = None,
        r_max: int | None = None,
        budget: str = "params",
        score: str = "mean",
        estimator: str = "per_example",
        keep_scaling: bool = True,
        progress: bool = True,
        layers_per_pass: int | None = None,
        rounding: str = DEFAULT_ROUNDING,
    ) -> None:
        _check_options(budget, score, estimator, rounding)
        options = dict(
            n_batches=calib_batches,
            r_min=r_min,
            r_max=r_max,
            budget=budget,
            score=score,
            estimator=estimator,
            keep_scaling=keep_scaling,
            progress=progress,
            layers_per_pass=layers_per_pass,
            rounding=rounding,
        )
        self.options = options  # what allocate_ranks will be called with
        self._allocate = lambda model, loader, **more: allocate_ranks(
            model, loader, **options, **more
        )
        self.plan: RankPlan | None = None

    def prepare(
        self,
        model: PeftModel,
        calibration_loader: Iterable[dict[str, torch.Tensor]],
        also_collect: Sequence[PassStatistic] = (),
    ) -> dict[str, Any]:
        """``also_collect``: statistics of another method to accumulate in the same passes (a
        composition's one calibration; see :mod:`fisherlora.methods.compose`)."""
        more = {"also_collect": also_collect} if also_collect else {}
        self.plan = self._allocate(model, calibration_loader, **more)
        return {"rank_plan": self.plan.to_dict()}

    def save_report(self, out_dir: str | Path) -> None:
        if self.plan is not None:
            self.plan.save(out_dir)

    def figures(self) -> list[Figure]:
        if self.plan is None:
            return []
        return [self.plan.figure(title=f"{self.run_name or self.name} rank map")]


class RandomRank(FimLoRA):
    """Runner method ``random-rank``: the allocator fed seeded uniform random scores (budget in
    parameters, as ``fim-lora``)."""

    name = "random-rank"
    calibrates = False

    def __init__(
        self,
        seed: int = 0,
        r_min: int | None = None,
        r_max: int | None = None,
        budget: str = "params",
        keep_scaling: bool = True,
        rounding: str = DEFAULT_ROUNDING,
    ) -> None:
        _check_options(budget, "mean", "batch", rounding)
        options = dict(
            seed=seed,
            r_min=r_min,
            r_max=r_max,
            budget=budget,
            keep_scaling=keep_scaling,
            rounding=rounding,
        )
        self.options = options
        self._allocate = lambda model, loader: random_ranks(model, **options)
        self.plan = None
