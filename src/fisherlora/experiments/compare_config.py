"""A comparison's settings (``CompareConfig``): what ``compare.py`` runs and ``report.py`` reads.

In a module of its own so that imports run one way: ``compare.py`` (which runs the comparison
and then writes its report) imports ``report.py``, and both import this; ``report.py`` never
imports ``compare.py``. ``fisherlora.experiments.compare`` re-exports these names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fisherlora.errors import ConfigError
from fisherlora.experiments.train import TrainConfig
from fisherlora.methods import method_names

# Settings that vary inside a comparison (everything else must match across its runs).
VARYING = ("method", "seed", "rank", "alpha", "out", "phase")
# The default seed of the tuning runs: none of the usual final seeds, so the final runs' test
# numbers come from runs that took no part in the selection.
TUNE_SEED = 100


SELECTIONS = ("accuracy", "nll")


@dataclass
class CompareConfig:
    """A comparison: ``methods`` x ``seeds`` x ``ranks`` runs of ``base`` (all else shared)."""

    methods: list[str]
    seeds: list[int]
    ranks: list[int]
    out: str
    base: TrainConfig = field(default_factory=TrainConfig)
    # α = alpha_ratio · r at every rank (s = α/r constant across the sweep) unless alpha is given
    alpha_ratio: float = 2.0
    alpha: float | None = None
    # learning rates tried per (rank, method) on validation before the final seeds (None: the
    # base's lr for every method), and the seeds of those tuning runs
    lr_grid: list[float] | None = None
    tune_seeds: list[int] = field(default_factory=lambda: [TUNE_SEED])
    # the validation score the grid picks by: "accuracy" (ties: the lower NLL) or "nll"; None:
    # NLL for a language-modelling task (-lm, which has no accuracy), accuracy otherwise
    select_by: str | None = None

    def __post_init__(self) -> None:
        method_names(",".join(self.methods))  # unknown methods / impossible combinations
        if not self.seeds or not self.ranks:
            raise ConfigError("a comparison needs at least one seed and one rank")
        if self.lr_grid is not None:
            if not self.lr_grid or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in self.lr_grid
            ):
                raise ConfigError(f"the lr grid must hold positive numbers, got {self.lr_grid}")
            if self.base.val_fraction <= 0:
                raise ConfigError(
                    "an lr grid picks rates on a validation split: set val_fraction > 0 "
                    "(--val-fraction)"
                )
            if not self.tune_seeds:
                raise ConfigError("an lr grid needs at least one tuning seed")
        if self.alpha_ratio <= 0 or (self.alpha is not None and self.alpha <= 0):
            raise ConfigError("alpha and alpha_ratio must be positive")
        if self.select_by not in (None, *SELECTIONS):
            raise ConfigError(
                f"select_by must be one of {', '.join(SELECTIONS)}, got {self.select_by!r}"
            )
        if self.base.task.endswith("-lm") and self.select_by == "accuracy":
            raise ConfigError(
                "a language-modelling task (-lm) has no accuracy to pick learning rates by; "
                "use select_by 'nll' (the default for -lm tasks)"
            )
        # every run's own settings (a method that needs one the base lacks, e.g. fw-lora-decay
        # without weight decay): refused now, not as each run's error.txt hours in
        for rank in self.ranks:
            for method in self.methods:
                self.run_config(rank, method, self.seeds[0])

    @property
    def selection(self) -> str:
        """The validation score the lr grid picks by (``select_by``, or the task's default)."""
        if self.select_by is not None:
            return self.select_by
        return "nll" if self.base.task.endswith("-lm") else "accuracy"

    def run_dir(self, rank: int, method: str, seed: int) -> Path:
        return Path(self.out) / f"r{rank}" / method / f"seed{seed}"

    def tune_dir(self, rank: int, method: str, lr: float, seed: int) -> Path:
        return Path(self.out) / f"r{rank}" / method / "tune" / f"lr{lr:g}-seed{seed}"

    def run_config(
        self, rank: int, method: str, seed: int, lr: float | None = None, phase: str = "final"
    ) -> TrainConfig:
        alpha = self.alpha if self.alpha is not None else self.alpha_ratio * rank
        lr = self.base.lr if lr is None else lr
        out = self.tune_dir(rank, method, lr, seed) if phase == "tune" else None
        return dataclasses.replace(
            self.base,
            method=method,
            seed=seed,
            rank=rank,
            alpha=alpha,
            lr=lr,
            phase=phase,
            out=str(out or self.run_dir(rank, method, seed)),
        )

    def tuning_runs(self) -> list[tuple[int, str, float, int]]:
        """Every (rank, method, lr, seed) tuning run (none without a grid)."""
        return [
            (rank, method, lr, seed)
            for seed in self.tune_seeds
            for rank in self.ranks
            for method in self.methods
            for lr in self.lr_grid or []
        ]

    def shared_settings(self) -> dict[str, Any]:
        varying = VARYING + (("lr",) if self.lr_grid else ())
        settings = {k: v for k, v in dataclasses.asdict(self.base).items() if k not in varying}
        settings |= {"alpha": self.alpha, "alpha_ratio": self.alpha_ratio}
        if self.lr_grid:
            settings |= {"lr_grid": list(self.lr_grid), "tune_seeds": list(self.tune_seeds)}
            settings["select_by"] = self.selection
        return settings
