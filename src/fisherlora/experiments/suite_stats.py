"""A suite's statistics: per-cell paired differences to LoRA and their pooling over cells."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from fisherlora.experiments.suite_file import BASELINE

# Outcomes compared with LoRA: column -> (label, whether higher is better)
OUTCOMES: dict[str, tuple[str, bool]] = {
    "accuracy": ("accuracy", True),
    "macro_f1": ("macro-F1", True),
    "mcc": ("MCC", True),
    "nll": ("NLL (lower is better)", False),
    "val_auc": ("validation AUC", True),
}
CONFIDENCE = 0.95
# a cell's verdict with fewer than 2 pairs, and with 2 to ZERO_SPREAD_MIN_PAIRS − 1 pairs that
# all differ by the same amount (report.PairedDifference.verdict's words): neither enters the
# pooled Δ and interval, and pooled_differences counts both as no_interval
NO_INTERVAL = "no interval"
NO_SPREAD = "cannot tell: {pairs} seeds, all the same difference"


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
    *tie* when it contains 0, *cannot tell* (:data:`NO_SPREAD`, the compare report's words) when
    every pair gave the same difference from fewer than ``ZERO_SPREAD_MIN_PAIRS`` pairs
    (``PairedDifference.no_spread``: a zero-width interval that is no evidence), and *no interval*
    with fewer than 2 pairs. Outcomes the results lack (or hold only NaN for) are skipped.
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
                    verdict = NO_INTERVAL
                elif diff.no_spread:
                    verdict = NO_SPREAD.format(pairs=diff.pairs)
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
    confidence: float = CONFIDENCE,
    planned: Mapping[str, Iterable[str]] | None = None,
) -> pd.DataFrame:
    """Per method ≠ LoRA and outcome, the difference to LoRA pooled over cells and seeds.

    ``results``: one row per run with ``cell``, ``rank``, ``method``, ``seed`` and the outcome
    columns (``phase`` too, where tuning runs are mixed in: only final runs count). A cell with
    several ranks counts as one cell per rank (a *stratum* c).

    - Δ = method − LoRA for every outcome (so Δ > 0 is better for accuracy and validation AUC,
      Δ < 0 is better for NLL, where lower is better).
    - Per stratum c with n_c paired seeds, differences d_{c,s}, mean Δ_c and variance s_c²;
      pooled ``Δ = (1/C) Σ_c Δ_c`` over the C strata where both ran (every cell weighs the same,
      whatever its number of seeds).
    - CI: ``Δ ± t(1 − α/2, ν) · SE`` with ``SE² = (1/C²) Σ_c s_c²/n_c`` and Welch–Satterthwaite
      degrees of freedom ``ν = (Σ_c v_c)² / Σ_c v_c²/(n_c − 1)``, ``v_c = s_c²/n_c``. With one
      stratum this is that cell's paired t interval. The cells are fixed: the interval covers the
      spread over seeds, not a population of cells, and not the test sets' sampling.
    - Where every stratum's differences agree (no spread: each from ``ZERO_SPREAD_MIN_PAIRS`` or
      more pairs, as the others are left out) the interval is the point.
    - A stratum with one paired seed has no variance and is left out of Δ and the CI
      (``no_interval`` counts it), and so is one whose 2 to ``ZERO_SPREAD_MIN_PAIRS − 1`` pairs
      all differ by the same amount (``PairedDifference.no_spread``: its zero variance would
      shrink the pooled interval with what is no evidence); a method with no other stratum has
      no row.
    - ``cell_names``: the strata pooled (methods need not share cells); ``unpaired``: seeds
      where one arm has the outcome and the other has not (a failed run, an infinite NLL), which
      the pairs leave out, in the cells that plan the method (``planned``: cell → its methods;
      without it, every cell where either arm ran: LoRA's seeds in a cell that leaves the
      method out by design would then count too); ``wins``/``ties``/``losses``/``no_interval``:
      the cells' verdicts from :func:`cell_differences`.
    """
    from scipy import stats as scipy_stats

    per_cell = cell_differences(results, outcomes, confidence)
    columns = [
        "method",
        "outcome",
        "label",
        "cells",
        "cell_names",
        "pairs",
        "min_pairs",
        "unpaired",
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
    for method in _methods_in_order(finals):
        for outcome, (label, _) in outcomes.items():
            cells = per_cell[(per_cell["method"] == method) & (per_cell["outcome"] == outcome)]
            if cells.empty:
                continue
            # every (cell, rank) where either arm ran: a method that failed every seed of a
            # cell has no pair there, and its seeds still count as unpaired
            unpaired = 0
            for (cell, _), group in finals.groupby(["cell", "rank"], sort=False):
                if planned is not None and method not in set(planned.get(cell, ())):
                    continue  # left out of this cell by design, not failed
                if outcome in group and {method, BASELINE} & set(group["method"]):
                    ours, base = (_seeds_with(group, m, outcome) for m in (method, BASELINE))
                    unpaired += len(ours ^ base)
            strata, names = [], []
            for _, row in cells.iterrows():
                group = finals[(finals["cell"] == row["cell"]) & (finals["rank"] == row["rank"])]
                d, _ = _paired(group, method, outcome)
                # one pair has no variance, and too few pairs that all agree have a variance of
                # 0 that is no evidence (report.no_spread): both left out, and counted
                if row["verdict"] != NO_INTERVAL and not _no_spread(row["verdict"]):
                    strata.append(d)
                    several_ranks = finals[finals["cell"] == row["cell"]]["rank"].nunique() > 1
                    names.append(f"{row['cell']} r{row['rank']}" if several_ranks else row["cell"])
            verdicts = cells["verdict"].value_counts()
            if not strata:
                continue
            delta = float(np.mean([d.mean() for d in strata]))
            v = np.array([d.var(ddof=1) / len(d) for d in strata])
            se = float(np.sqrt(v.sum())) / len(strata)
            if se > 0:
                dof = v.sum() ** 2 / sum(
                    vc**2 / (len(d) - 1) for vc, d in zip(v, strata, strict=True)
                )
                half = float(scipy_stats.t.ppf(1 - (1 - confidence) / 2, dof)) * se
            else:  # every stratum left agrees from ZERO_SPREAD_MIN_PAIRS or more pairs
                half = 0.0  # the interval is the point
            rows.append(
                {
                    "method": method,
                    "outcome": outcome,
                    "label": label,
                    "cells": len(strata),
                    "cell_names": ", ".join(names),
                    "pairs": int(sum(len(d) for d in strata)),
                    "min_pairs": int(min(len(d) for d in strata)),
                    "unpaired": int(unpaired),
                    "delta": delta,
                    "ci_low": delta - half,
                    "ci_high": delta + half,
                    "wins": int(verdicts.get("win", 0)),
                    "ties": int(verdicts.get("tie", 0)),
                    "losses": int(verdicts.get("loss", 0)),
                    "no_interval": int(
                        sum(n for v, n in verdicts.items() if v == NO_INTERVAL or _no_spread(v))
                    ),
                }
            )
    return pd.DataFrame(rows, columns=columns)


def _no_spread(verdict: str) -> bool:
    """Whether a cell's verdict is :data:`NO_SPREAD` (whatever its number of pairs)."""
    return verdict.startswith(NO_SPREAD.split("{", 1)[0])


def _seeds_with(group: pd.DataFrame, method: str, outcome: str) -> set[int]:
    """The seeds of ``method``'s runs in ``group`` that have a finite ``outcome``."""
    values = pd.to_numeric(
        group[group["method"] == method].set_index("seed")[outcome], errors="coerce"
    )
    return set(values[np.isfinite(values)].index)
