"""A suite's statistics: per-cell paired differences to LoRA and their pooling over cells."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from fisherlora.experiments.suite_file import BASELINE

# Outcomes compared with LoRA: column -> (label, whether higher is better)
OUTCOMES: dict[str, tuple[str, bool]] = {
    "accuracy": ("accuracy", True),
    "nll": ("NLL (lower is better)", False),
    "val_auc": ("validation AUC", True),
}
N_BOOTSTRAP = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def final_runs(results: pd.DataFrame) -> pd.DataFrame:
    """The final runs (``phase == "final"``; every row where there is no phase column)."""
    if "phase" not in results:
        return results
    return results[results["phase"].fillna("final") == "final"]


def _paired(group: pd.DataFrame, method: str, outcome: str) -> tuple[np.ndarray, list[int]]:
    """Per-seed differences ``outcome(method) − outcome(LoRA)`` over the seeds both have."""
    ours = group[group["method"] == method].set_index("seed")[outcome]
    base = group[group["method"] == BASELINE].set_index("seed")[outcome]
    ours = pd.to_numeric(ours, errors="coerce").dropna()
    base = pd.to_numeric(base, errors="coerce").dropna()
    seeds = sorted(set(ours.index) & set(base.index))
    d = ours.loc[seeds].to_numpy(dtype=float) - base.loc[seeds].to_numpy(dtype=float)
    # metrics agreeing to 12 decimals are equal (as report.paired_t treats them); a
    # non-finite difference (an infinite NLL) is no pair, as in report.paired_t
    finite = np.isfinite(d)
    return np.round(d[finite], 12), [s for s, keep in zip(seeds, finite, strict=True) if keep]


def _methods_in_order(results: pd.DataFrame) -> list[str]:
    return [m for m in dict.fromkeys(results["method"]) if m != BASELINE]


def cell_differences(
    results: pd.DataFrame,
    outcomes: Mapping[str, tuple[str, bool]] = OUTCOMES,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """Per cell (and rank), per method ≠ LoRA and outcome: the paired per-seed differences.

    For the seeds s both finished (final runs, same cell, same rank), ``d_s = x_method(s) −
    x_LoRA(s)``; ``delta`` is their mean and ``ci_low``/``ci_high`` the paired t interval
    ``delta ± t(1 − α/2, n − 1)·sd(d)/√n`` (``report.paired_t``). The cell's ``verdict``: *win*
    when the interval excludes 0 on the method's better side (above 0 for accuracy and validation
    AUC, below 0 for NLL, where lower is better), *loss* when it excludes 0 on the other side,
    *tie* when it contains 0, and *no interval* with fewer than 2 pairs. Outcomes the results
    lack (or hold only NaN for) are skipped.
    """
    from fisherlora.experiments.report import paired_t

    results = final_runs(results)
    columns = ["cell", "rank", "method", "outcome", "pairs", "delta", "ci_low", "ci_high"]
    rows = []
    if results.empty:
        return pd.DataFrame(columns=[*columns, "verdict"])
    for (cell, rank), group in results.groupby(["cell", "rank"], sort=False):
        for method in _methods_in_order(group):
            for outcome, (_, higher_better) in outcomes.items():
                if outcome not in group or group[outcome].isna().all():
                    continue
                d, _ = _paired(group, method, outcome)
                if len(d) == 0:
                    continue
                diff = paired_t(d, confidence)
                if diff.pairs < 2:
                    verdict = "no interval"
                elif not diff.significant:
                    verdict = "tie"
                else:
                    verdict = "win" if (diff.delta > 0) == higher_better else "loss"
                rows.append(
                    {
                        "cell": cell,
                        "rank": int(rank),
                        "method": method,
                        "outcome": outcome,
                        "pairs": diff.pairs,
                        "delta": diff.delta,
                        "ci_low": diff.ci_low,
                        "ci_high": diff.ci_high,
                        "verdict": verdict,
                    }
                )
    return pd.DataFrame(rows, columns=[*columns, "verdict"])


def pooled_differences(
    results: pd.DataFrame,
    outcomes: Mapping[str, tuple[str, bool]] = OUTCOMES,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """Per method ≠ LoRA and outcome, the difference to LoRA pooled over cells and seeds.

    ``results``: one row per run with ``cell``, ``rank``, ``method``, ``seed`` and the outcome
    columns (``phase`` too, where tuning runs are mixed in: only final runs count). A cell with
    several ranks counts as one cell per rank (a *stratum* c).

    - Δ = method − LoRA for every outcome (so Δ > 0 is better for accuracy and validation AUC,
      Δ < 0 is better for NLL, where lower is better).
    - Per stratum c with n_c paired seeds: ``Δ_c = (1/n_c) Σ_s d_{c,s}`` (see
      :func:`cell_differences`); pooled ``Δ = (1/C) Σ_c Δ_c`` over the C strata where both ran:
      every cell weighs the same, whatever its number of seeds.
    - CI: a stratified bootstrap. Each of ``n_bootstrap`` resamples draws n_c seeds' differences
      with replacement within every stratum and recomputes the pooled Δ; the interval is the
      (α/2, 1 − α/2) percentiles of those. The generator is seeded (``seed``) anew for every
      (method, outcome) row, so a row does not change when other methods are added. It covers
      the spread over seeds only (not the test set's sampling) and is a point where every seed
      agrees. With few seeds it is too narrow: a resampled mean's variance is (n_c − 1)/n_c of
      sd²/n_c, and n_c = 5 seeds allow only 126 distinct resamples (2 seeds: 3); ``min_pairs``
      gives the fewest paired seeds of a stratum. A stratum with one paired seed has no spread
      to resample and is left out of Δ and the CI (``no_interval`` counts it); a method with no
      stratum of two or more pairs has no pooled row.
    - ``wins``/``ties``/``losses``/``no_interval``: the cells' verdicts from
      :func:`cell_differences`.
    """
    per_cell = cell_differences(results, outcomes, confidence)
    columns = [
        "method",
        "outcome",
        "label",
        "cells",
        "pairs",
        "min_pairs",
        "delta",
        "ci_low",
        "ci_high",
        "wins",
        "ties",
        "losses",
        "no_interval",
    ]
    finals = final_runs(results)
    rows = []
    if per_cell.empty:
        return pd.DataFrame(columns=columns)
    tail = (1 - confidence) / 2 * 100
    for method in _methods_in_order(finals):
        for outcome, (label, _) in outcomes.items():
            cells = per_cell[(per_cell["method"] == method) & (per_cell["outcome"] == outcome)]
            if cells.empty:
                continue
            strata = []
            for _, row in cells.iterrows():
                group = finals[(finals["cell"] == row["cell"]) & (finals["rank"] == row["rank"])]
                strata.append(_paired(group, method, outcome)[0])
            # a stratum of one paired seed has no spread to resample: in the bootstrap it
            # would be a constant and narrow the interval, so it is left out (and counted)
            strata = [d for d in strata if len(d) >= 2]
            verdicts = cells["verdict"].value_counts()
            if not strata:
                continue
            rng = np.random.default_rng(seed)
            boot = np.zeros(n_bootstrap)
            for d in strata:
                picks = rng.integers(0, len(d), size=(n_bootstrap, len(d)))
                boot += d[picks].mean(axis=1)
            boot /= len(strata)
            delta = float(np.mean([d.mean() for d in strata]))
            low, high = np.percentile(boot, [tail, 100 - tail])
            rows.append(
                {
                    "method": method,
                    "outcome": outcome,
                    "label": label,
                    "cells": len(strata),
                    "pairs": int(sum(len(d) for d in strata)),
                    "min_pairs": int(min(len(d) for d in strata)),
                    "delta": delta,
                    # a percentile of identical values can differ from their mean by rounding
                    "ci_low": min(float(low), delta),
                    "ci_high": max(float(high), delta),
                    "wins": int(verdicts.get("win", 0)),
                    "ties": int(verdicts.get("tie", 0)),
                    "losses": int(verdicts.get("loss", 0)),
                    "no_interval": int(verdicts.get("no interval", 0)),
                }
            )
    return pd.DataFrame(rows, columns=columns)
