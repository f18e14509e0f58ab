"""The comparison report: per-run results → a summary per (rank, method) → files and plots.

Writes into the comparison directory:

- ``results.csv``: one row per finished run (``phase`` "final", and "tune" for the tuning runs
  of a learning-rate grid, which carry validation scores only); ``results.json``: the runs, the
  summary, the picked learning rates, the settings, the harness workarounds and the failed runs
  (strict JSON: a value not recorded is ``null``, an infinite one ``"inf"``);
- ``report.md`` (PNGs beside it in ``plots/``) and ``report.html`` (the same, PNGs embedded, one
  self-contained file).

Uncertainty, honestly: accuracy is given as mean ± std over seeds; each method's difference to
LoRA (accuracy, MCC and macro-F1) is the mean Δ of the per-seed differences (same seed = same
data order and head init), with its paired 95 % confidence interval, Δ ± t(0.975, n−1)·sd/√n
over the n seeds both finished, and the two-sided paired t-test's p from the same t statistic.
The verdict is "significant" exactly when the interval excludes 0 (then p < 0.05), except that
fewer than ``ZERO_SPREAD_MIN_PAIRS`` seeds that all differ by the same amount (a zero-width
interval) are no evidence ("cannot tell"); one seed has no interval. The same paired interval is
given for the held-out NLL (the cross-entropy of the true class: lower is better, so "better"
means Δ < 0) and, where the runs evaluated a validation split during training, for the area
under the validation accuracy curve (the mean over its evaluation points: faster convergence
scores higher). Separately, the report says whether |Δ accuracy| is below the standard error of
one run's accuracy, sqrt(acc (1 − acc) / n_test): the interval covers the seeds' spread on this
one test set, not the sampling of the test set itself.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from fisherlora.experiments.plots import (
    plot_bars,
    plot_confusion_matrices,
    plot_learning_curves,
    plot_lr_grid,
    plot_module_values,
    plot_runtime_bars,
)
from fisherlora.methods import RANK_ALLOCATING, base_method
from fisherlora.methods.peers import WORKAROUNDS

if TYPE_CHECKING:  # compare.py imports this module, never the other way (issue #19)
    from fisherlora.experiments.compare_config import CompareConfig

BASELINE = "lora"


# Fractions of a run near which the validation accuracy is reported (convergence).
CURVE_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def validation_curve(run_dir: Path) -> pd.DataFrame:
    """The run's evaluations on its validation split (step, accuracy, ...); empty for runs that
    had none (their evaluations read test)."""
    path = run_dir / "curve.csv"
    curve = pd.read_csv(path) if path.exists() else pd.DataFrame()
    if curve.empty or "split" not in curve:
        return pd.DataFrame()
    return curve[curve["split"] == "validation"].reset_index(drop=True)


def accuracy_at_fractions(curve: pd.DataFrame, steps: int) -> dict[str, float]:
    """Validation accuracy at the evaluation nearest each of :data:`CURVE_FRACTIONS` of
    ``steps`` (the earlier one on a tie), keyed by that evaluation's own share of the run:
    ``val_acc_at_20pct`` is the evaluation at step 20 of 100, whichever fraction asked for it.
    Evaluations are where the run scheduled them, so the columns say where they really were."""
    if curve.empty or steps <= 0 or "accuracy" not in curve:  # an -lm task has no accuracy
        return {}
    values = {}
    evaluated = curve.sort_values("step")
    for fraction in CURVE_FRACTIONS:
        nearest = (evaluated["step"] - fraction * steps).abs().idxmin()
        step = int(evaluated.loc[nearest, "step"])
        values[f"val_acc_at_{round(100 * step / steps)}pct"] = float(
            evaluated.loc[nearest, "accuracy"]
        )
    return values


def _metrics_row(m: dict[str, Any], steps: int, run_dir: Path) -> dict[str, Any]:
    """The outcome columns of one run's metrics.json (NaN where a run did not record one)."""
    curve = validation_curve(run_dir)
    return {
        "lr": m.get("lr"),
        "accuracy": m.get("accuracy", math.nan),
        "macro_f1": m.get("macro_f1", math.nan),
        "mcc": m.get("mcc", math.nan),
        "nll": m.get("nll", math.nan),  # absent from runs made before it was recorded
        "val_accuracy": m.get("val_accuracy", math.nan),
        "val_nll": m.get("val_nll", math.nan),
        "val_auc": m.get("val_auc", math.nan),
        **accuracy_at_fractions(curve, steps),
    }


def collect_tuning(config: CompareConfig) -> pd.DataFrame:
    """One row per finished tuning run (validation scores only; the test columns stay empty)."""
    rows = []
    for rank, method, lr, seed in config.tuning_runs():
        run_dir = config.tune_dir(rank, method, lr, seed)
        if (run_dir / "metrics.json").exists():
            m = json.loads((run_dir / "metrics.json").read_text())
            rows.append(
                {"rank": rank, "method": method, "seed": seed, "phase": "tune"}
                | _metrics_row(m, config.base.steps, run_dir)
                | {"lr": lr, "run_dir": str(run_dir)}
                # the compute it cost (a suite's summary adds it up, also pause-robust)
                | {
                    k: m.get("timings", {}).get(k, math.nan)
                    for k in ("total_s", "train_s", "median_step_s")
                }
            )
    return pd.DataFrame(rows)


def collect_runs(config: CompareConfig) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """One row per finished final run (``metrics.json`` present); and the failed runs' errors."""
    rows, failed = [], []
    for rank in config.ranks:
        for method in config.methods:
            for seed in config.seeds:
                run_dir = config.run_dir(rank, method, seed)
                metrics_file = run_dir / "metrics.json"
                if not metrics_file.exists():
                    error = run_dir / "error.txt"
                    if error.exists():
                        first = error.read_text().splitlines()[0]
                        failed.append(
                            {"rank": rank, "method": method, "seed": seed, "error": first}
                        )
                    continue
                m = json.loads(metrics_file.read_text())
                t = m["timings"]
                rows.append(
                    {
                        "rank": rank,
                        "method": method,
                        "seed": seed,
                        "phase": "final",
                        **_metrics_row(m, config.base.steps, run_dir),
                        # runs made before the rate was recorded ran at the shared one
                        "lr": m.get("lr", config.base.lr),
                        # examples evaluated (a --max-test subset, not the whole test split)
                        # (an -lm task has no confusion matrix: NaN)
                        "n_test": sum(map(sum, m["confusion_matrix"]))
                        if m.get("confusion_matrix")
                        else math.nan,
                        "trainable_params": m["trainable_params"],
                        "adapter_params": m["adapter_params"],
                        # what acts after AdaLoRA's pruning (= adapter_params for the others);
                        # absent from runs made before it was recorded
                        "effective_adapter_params": m.get("effective_adapter_params"),
                        "init_s": t["build_s"] + t["init_s"],
                        "median_step_s": t["median_step_s"],
                        "train_s": t["train_s"],
                        "eval_s": t["eval_s"],
                        "peak_memory_mb": t["peak_memory_mb"],
                        "total_s": t["total_s"],
                        "run_dir": str(run_dir),
                    }
                )
    runs = pd.DataFrame(rows)
    if not runs.empty:
        runs["steps_to_lora_final"] = steps_to_lora_final(runs)
    return runs, failed


def steps_to_lora_final(runs: pd.DataFrame) -> list[float]:
    """Per run: the first evaluation step at which its validation accuracy reaches the final
    validation accuracy of LoRA at the same rank and seed; ``inf`` when it never does (so that
    a median over seeds counts those seeds), NaN when there is no such LoRA run or no
    validation curve."""
    steps = []
    for _, row in runs.iterrows():
        lora = runs[
            (runs["method"] == BASELINE)
            & (runs["rank"] == row["rank"])
            & (runs["seed"] == row["seed"])
        ]
        target = float(lora["val_accuracy"].iloc[0]) if len(lora) else math.nan
        curve = validation_curve(Path(row["run_dir"]))
        if curve.empty or math.isnan(target):
            steps.append(math.nan)
            continue
        reached = curve[curve["accuracy"] >= target]
        steps.append(float(reached["step"].iloc[0]) if not reached.empty else math.inf)
    return steps


# The confidence of the paired interval; "significant" means the interval excludes 0.
CONFIDENCE = 0.95
# below this many pairs, differences that are all equal (an interval of zero width: accuracy
# moves in steps of one test example, so two seeds can agree exactly by chance) are no evidence
# for or against anything; every report (compare, suite, claims table) reads them so
ZERO_SPREAD_MIN_PAIRS = 5
# Each outcome compared with LoRA, and the prefix of its columns in the summary (accuracy's keep
# the historical names: delta_vs_lora, ci_low, ci_high, p_value, verdict).
OUTCOMES = {
    "accuracy": "",
    "mcc": "mcc_",
    "macro_f1": "macro_f1_",
    "nll": "nll_",
    "val_auc": "val_auc_",
}
# Outcomes where a smaller value is the better one.
LOWER_IS_BETTER = {"nll"}


@dataclass(frozen=True)
class PairedDifference:
    """``metric(method) − metric(LoRA)`` paired by seed.

    ``delta`` is the mean of the per-seed differences; ``ci_low``/``ci_high`` its two-sided
    t interval, ``delta ± t(1 − (1 − confidence)/2, n − 1) · sd / √n``; ``p_value`` the
    two-sided paired t-test from the same t statistic, so ``p < 1 − confidence`` exactly when the
    interval excludes 0. Interval and p are NaN with fewer than 2 pairs.
    """

    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    pairs: int
    lower_is_better: bool = False

    @property
    def no_spread(self) -> bool:
        """Every pair gave the same difference, from fewer than ``ZERO_SPREAD_MIN_PAIRS`` pairs:
        a zero-width interval that says nothing."""
        return bool(self.ci_low == self.ci_high and 2 <= self.pairs < ZERO_SPREAD_MIN_PAIRS)

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (never with fewer than 2 pairs, nor with no spread)."""
        return bool((self.ci_low > 0 or self.ci_high < 0) and not self.no_spread)

    @property
    def verdict(self) -> str:
        if self.pairs == 0:
            return "no LoRA run to pair with"
        if self.pairs == 1:
            return "1 seed: no interval"
        if self.no_spread:
            return f"cannot tell: {self.pairs} seeds, all the same difference"
        if self.significant:
            better = self.delta < 0 if self.lower_is_better else self.delta > 0
            return "significant: " + ("better" if better else "worse") + " than LoRA"
        return "not significant"


def _steps_to_lora(r: pd.Series) -> str:
    """The median step at which a method reached LoRA's final validation accuracy, over the
    seeds paired with LoRA (a seed that never did counts as ∞), and how many did."""
    paired, reached = int(r.get("paired_for_steps", 0) or 0), int(r["reached_lora_final"])
    if paired == 0:
        return "–"
    counts = f"({reached}/{paired})"
    if math.isinf(r["steps_to_lora_final"]):
        return "never" if reached == 0 else f"never for half or more {counts}"
    return f"{r['steps_to_lora_final']:.0f} {counts}"


def paired_t(differences: Any, confidence: float = CONFIDENCE) -> PairedDifference:
    """The paired t interval and test of per-seed differences (see :class:`PairedDifference`).
    Non-finite differences (an outcome a run did not record) are not pairs and are dropped."""
    # accuracies are counts / n, so differences that agree to 12 decimals are equal: rounding
    # keeps float noise (~1e-17) from passing for a spread or for a difference
    d = np.round(np.asarray(differences, dtype=float), 12)
    d = d[np.isfinite(d)]
    n = len(d)
    if n == 0:
        return PairedDifference(math.nan, math.nan, math.nan, math.nan, 0)
    delta = float(d.mean())
    if n == 1:
        return PairedDifference(delta, math.nan, math.nan, math.nan, 1)
    if (d == d[0]).all():  # no spread, exactly: a mean of equal values can round to std > 0
        delta, se = float(d[0]), 0.0
    else:
        se = float(d.std(ddof=1)) / math.sqrt(n)
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    # every seed giving the same difference (se = 0) makes the interval that point
    p = float(2 * scipy_stats.t.sf(abs(delta) / se, n - 1)) if se > 0 else float(delta == 0)
    return PairedDifference(delta, delta - half, delta + half, p, n)


def paired_difference(
    runs: pd.DataFrame, method: str, rank: int, metric: str = "accuracy"
) -> PairedDifference:
    """``metric(method) − metric(LoRA)`` over the seeds both finished (and recorded it) at
    ``rank``."""
    at_rank = runs[runs["rank"] == rank]
    ours = at_rank[at_rank["method"] == method].set_index("seed")[metric].dropna()
    base = at_rank[at_rank["method"] == BASELINE].set_index("seed")[metric].dropna()
    seeds = sorted(set(ours.index) & set(base.index))
    diff = paired_t(ours.loc[seeds].to_numpy(dtype=float) - base.loc[seeds].to_numpy(dtype=float))
    return dataclasses.replace(diff, lower_is_better=metric in LOWER_IS_BETTER)


def summarize(runs: pd.DataFrame, config: CompareConfig, n_test: int) -> pd.DataFrame:
    """One row per (rank, method), in the order the comparison lists them."""
    # runs made before an outcome was recorded lack its column: NaN, shown as absent
    runs = runs.assign(
        **{c: math.nan for c in (*OUTCOMES, "steps_to_lora_final") if c not in runs},
        **(
            {"lr": getattr(getattr(config, "base", None), "lr", math.nan)}
            if "lr" not in runs
            else {}
        ),
    )
    rows = []
    for rank in config.ranks:
        for method in config.methods:
            group = runs[(runs["rank"] == rank) & (runs["method"] == method)]
            if group.empty:
                continue
            acc = group["accuracy"]
            row: dict[str, Any] = {
                "rank": rank,
                "method": method,
                "seeds": len(group),
                "trainable_params": int(group["trainable_params"].median()),
                "adapter_params": int(group["adapter_params"].median()),
                # what acts after AdaLoRA's pruning; NaN for runs that predate its recording
                "effective_adapter_params": _median_or_nan(group, "effective_adapter_params"),
            }
            for metric in OUTCOMES:
                values = pd.to_numeric(group[metric], errors="coerce").dropna()
                row[f"{metric}_mean"] = float(values.mean()) if len(values) else math.nan
                row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            row["lr"] = float(group["lr"].iloc[0])
            for column in [c for c in group.columns if c.startswith("val_acc_at_")]:
                row[column] = float(pd.to_numeric(group[column], errors="coerce").mean())
            # over the seeds paired with a LoRA run; one that never got there counts as ∞
            paired = pd.to_numeric(group["steps_to_lora_final"], errors="coerce").dropna()
            row["steps_to_lora_final"] = float(paired.median()) if len(paired) else math.nan
            row["reached_lora_final"] = int(np.isfinite(paired).sum())
            row["paired_for_steps"] = len(paired)
            # the standard error of one run's accuracy on the n_test examples evaluated
            one_run_se = math.sqrt(acc.mean() * (1 - acc.mean()) / n_test)
            row["one_run_se"] = one_run_se
            for metric, prefix in OUTCOMES.items():
                if method == BASELINE:
                    diff = PairedDifference(math.nan, math.nan, math.nan, math.nan, 0)
                else:
                    diff = paired_difference(runs, method, rank, metric)
                row |= {
                    f"{prefix}delta_vs_lora": diff.delta,
                    f"{prefix}ci_low": diff.ci_low,
                    f"{prefix}ci_high": diff.ci_high,
                    f"{prefix}p_value": diff.p_value,
                    f"{prefix}verdict": "baseline" if method == BASELINE else diff.verdict,
                }
                if metric == "accuracy":
                    row["pairs"] = diff.pairs
                    # stated beside the verdict, never folded into it
                    row["below_one_run_se"] = (
                        None if diff.pairs == 0 else bool(abs(diff.delta) < one_run_se)
                    )
            for column in (
                "init_s",
                "median_step_s",
                "train_s",
                "eval_s",
                "peak_memory_mb",
                "total_s",
            ):
                row[column] = float(group[column].median())
            rows.append(row)
    return pd.DataFrame(rows)


# --- plots -------------------------------------------------------------------------------------


def _curves(config: CompareConfig, runs: pd.DataFrame, rank: int) -> dict[str, list[pd.DataFrame]]:
    curves: dict[str, list[pd.DataFrame]] = {}
    for method in config.methods:
        dirs = runs[(runs["rank"] == rank) & (runs["method"] == method)]["run_dir"]
        curves[method] = [pd.read_csv(Path(d) / "curve.csv") for d in dirs]
    return curves


def _confusions(config: CompareConfig, runs: pd.DataFrame, rank: int):
    matrices, class_names = {}, []
    for method in config.methods:
        dirs = runs[(runs["rank"] == rank) & (runs["method"] == method)]["run_dir"]
        total = None
        for d in dirs:
            m = json.loads((Path(d) / "metrics.json").read_text())
            if m.get("confusion_matrix") is None:  # an -lm task: no classes
                continue
            class_names = m["class_names"]
            matrix = np.asarray(m["confusion_matrix"])
            total = matrix if total is None else total + matrix
        if total is not None:
            matrices[method] = total
    return matrices, class_names


def _rank_map(method: str, run_dir: Path, target: Path, rank: int) -> bool:
    """A rank map for a rank-allocating method's first finished run, if it has one.

    The run's own ``rank_map.png`` where it is there; otherwise it is drawn again from the
    run's ``ranks.json`` (per-run figures are not committed with the results, so a report
    rewritten in a fresh clone would otherwise lose its rank maps) or EVA's ranks."""
    if (run_dir / "rank_map.png").exists():  # fim-lora, random-rank and their compositions
        shutil.copyfile(run_dir / "rank_map.png", target)
        return True
    if (run_dir / "ranks.json").exists():
        ranks = json.loads((run_dir / "ranks.json").read_text())["ranks"]
        title = f"{method} rank map"
    else:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        ranks = (metrics.get("prepare") or {}).get("eva_ranks")  # EVA's redistribution
        title = f"{method} ranks (base r={rank})"
    if ranks:
        plot_module_values(
            ranks,
            target,
            title=title,
            label="rank",
            center=rank,
            integers=True,
        )
        return True
    return False


def make_plots(
    config: CompareConfig, runs: pd.DataFrame, summary: pd.DataFrame, plots: Path
) -> list[tuple[str, Path]]:
    """Every figure of the report, as (caption, path)."""
    plots.mkdir(parents=True, exist_ok=True)
    figures = []
    for rank in config.ranks:
        rows = summary[summary["rank"] == rank]
        if rows.empty:
            continue
        labels = rows["method"].tolist()
        path = plots / f"learning_curves_r{rank}.png"
        plot_learning_curves(_curves(config, runs, rank), path, f"Learning curves, r = {rank}")
        figures.append((f"Learning curves (mean over seeds, band ±1 std), r = {rank}", path))
        path = plots / f"accuracy_r{rank}.png"
        base = rows[rows["method"] == BASELINE]["accuracy_mean"]
        plot_bars(
            labels,
            rows["accuracy_mean"].tolist(),
            rows["accuracy_std"].fillna(0).tolist(),
            path,
            f"Held-out accuracy, r = {rank}",
            "accuracy (mean ± std)",
            reference=float(base.iloc[0]) if len(base) else None,
        )
        figures.append((f"Accuracy with ±1 std over seeds, r = {rank}", path))
        path = plots / f"runtime_r{rank}.png"
        plot_runtime_bars(
            labels,
            {
                "calibration / init": rows["init_s"].tolist(),
                "training": rows["train_s"].tolist(),
                "evaluation": rows["eval_s"].tolist(),
            },
            path,
            f"Where the time goes, r = {rank}",
        )
        figures.append((f"Run time per method (median over seeds), r = {rank}", path))
        path = plots / f"memory_r{rank}.png"
        plot_bars(
            labels,
            rows["peak_memory_mb"].tolist(),
            None,
            path,
            f"Peak memory, r = {rank}",
            "MB (median over seeds)",
        )
        figures.append((f"Peak memory per run (median over seeds), r = {rank}", path))
        matrices, class_names = _confusions(config, runs, rank)
        if matrices:
            path = plots / f"confusion_r{rank}.png"
            plot_confusion_matrices(
                matrices, class_names, path, f"Confusion matrices summed over seeds, r = {rank}"
            )
            figures.append(
                (f"Confusion matrices (row shares, counts summed over seeds), r = {rank}", path)
            )
        for method in labels:
            if not any(base_method(part) in RANK_ALLOCATING for part in method.split("+")):
                continue
            first = runs[(runs["rank"] == rank) & (runs["method"] == method)]["run_dir"].iloc[0]
            path = plots / f"rank_map_r{rank}_{method}.png"
            if _rank_map(method, Path(first), path, rank):
                figures.append((f"Rank map of {method}, r = {rank} (first seed)", path))
    return figures


# --- tables and documents ------------------------------------------------------------------------


def _pm(mean: float, std: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _interval(low: float, high: float) -> str:
    return "–" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]"


def _p(p: float) -> str:
    return "–" if math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _median_or_nan(group: pd.DataFrame, column: str) -> float:
    """The median of a column that older runs may lack (or hold as None)."""
    if column not in group:
        return math.nan
    return float(pd.to_numeric(group[column], errors="coerce").median())


def _adapter_params(row: pd.Series) -> str:
    """The adapter parameters, and those still in effect where pruning (AdaLoRA) masked some."""
    text = f"{int(row['adapter_params']):,}"
    effective = row.get("effective_adapter_params")
    if effective is not None and not pd.isna(effective) and effective != row["adapter_params"]:
        text += f" ({int(effective):,} in effect)"
    return text


def _delta(r: pd.Series, prefix: str) -> str:
    """``Δ [95 % CI]`` of one outcome's paired difference to LoRA ("–" for LoRA / no pairs)."""
    delta = r[f"{prefix}delta_vs_lora"]
    if r["method"] == BASELINE or pd.isna(delta):
        return "–"
    return f"{delta:+.4f} {_interval(r[f'{prefix}ci_low'], r[f'{prefix}ci_high'])}"


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The report's table: formatted strings, one row per (rank, method). The NLL, validation
    and learning-rate columns appear when the runs recorded them (runs from before they existed
    did not)."""
    has_nll = bool(summary["nll_mean"].notna().any())
    has_val = bool(summary["val_auc_mean"].notna().any())
    several_lrs = summary["lr"].nunique() > 1
    rows = []
    for _, r in summary.iterrows():
        is_base = r["method"] == BASELINE
        extra: dict[str, str] = {}
        if several_lrs:
            extra["lr"] = f"{r['lr']:g}"
        if has_nll:
            extra["NLL"] = _pm(r["nll_mean"], r["nll_std"])
            extra["Δ NLL [95 % CI] (lower is better)"] = _delta(r, "nll_")
        if has_val:
            extra["val AUC"] = _pm(r["val_auc_mean"], r["val_auc_std"])
            extra["Δ val AUC [95 % CI]"] = _delta(r, "val_auc_")
            extra["steps to LoRA's final val acc"] = _steps_to_lora(r) if not is_base else "–"
        rows.append(
            {
                "rank": int(r["rank"]),
                "method": r["method"],
                **({"lr": extra.pop("lr")} if "lr" in extra else {}),
                "trainable params": f"{int(r['trainable_params']):,}",
                "adapter params": _adapter_params(r),
                "accuracy": _pm(r["accuracy_mean"], r["accuracy_std"]),
                "MCC": _pm(r["mcc_mean"], r["mcc_std"]),
                "macro-F1": _pm(r["macro_f1_mean"], r["macro_f1_std"]),
                "Δ acc vs LoRA": "–"
                if is_base or math.isnan(r["delta_vs_lora"])
                else f"{r['delta_vs_lora']:+.4f}",
                "95 % CI of Δ": _interval(r["ci_low"], r["ci_high"]),
                "p (paired)": _p(r["p_value"]),
                # a task without accuracy (-lm) is judged by its NLL
                "verdict": r["verdict"]
                if is_base or not math.isnan(r["accuracy_mean"])
                else f"NLL: {r['nll_verdict']}",
                "Δ below one run's SE": "–"
                if r["below_one_run_se"] is None or pd.isna(r["below_one_run_se"])
                else ("yes" if r["below_one_run_se"] else "no"),
                **extra,
                "seeds": int(r["seeds"]),
                "init s": f"{r['init_s']:.1f}",
                "median step s": f"{r['median_step_s']:.3f}",
                "peak MB": f"{r['peak_memory_mb']:.0f}",
                "total s": f"{r['total_s']:.0f}",
            }
        )
    return pd.DataFrame(rows)


def _markdown_table(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _notes(config: CompareConfig, summary: pd.DataFrame, failed: list, n_test: int) -> list[str]:
    notes = []
    acc = float(summary["accuracy_mean"].mean()) if not summary.empty else math.nan
    if not math.isnan(acc):  # none for a task without accuracy (-lm)
        se = math.sqrt(acc * (1 - acc) / n_test)
        notes.append(
            f"One run's accuracy on {n_test:,} held-out examples has a standard error (SE) of "
            f"about {se:.4f}, √(acc (1 − acc) / n). Δ is the mean of the per-seed differences to "
            "LoRA at the same seed; its 95 % CI is Δ ± t(0.975, n − 1)·sd/√n over the n paired "
            "seeds, and p is the two-sided paired t-test from the same t statistic, so p < 0.05 "
            "exactly when the interval excludes 0 (– where fewer than 2 pairs). The verdict is "
            "'significant' when the interval excludes 0 and 'not significant' when it contains "
            f"0; one seed has no interval ('1 seed: no interval'), and fewer than {ZERO_SPREAD_MIN_PAIRS} "
            "seeds that all differ by the same amount (a zero-width interval: accuracy moves in steps of "
            "one example) read 'cannot tell'. Whether |Δ| is below one run's SE (from that row's mean "
            "accuracy) is stated separately: the interval measures the spread over seeds on this one test "
            "set, not the sampling of the test set, and a Δ below one run's SE is small against that "
            "sampling error, significant or not."
        )
    labels = {"mcc": "MCC", "macro_f1": "macro-F1"}
    disagreements = 0
    for _, row in summary.iterrows():
        if row["method"] == BASELINE or row["pairs"] == 0:
            continue
        where, delta = f"r = {int(row['rank'])}: {row['method']}", row["delta_vs_lora"]
        ci = f"95 % CI {_interval(row['ci_low'], row['ci_high'])}"
        if row["pairs"] == 1:
            if delta > 0:
                notes.append(
                    f"{where} vs LoRA: Δ {delta:+.4f} from a single seed: no interval, not "
                    "evidence either way."
                )
        elif row["verdict"] == "not significant":
            if delta > 0:
                notes.append(
                    f"{where} does not beat LoRA significantly (Δ {delta:+.4f}, {ci}, "
                    f"p = {_p(row['p_value'])})."
                )
        elif row["below_one_run_se"]:
            notes.append(
                f"{where} is significantly {row['verdict'].removeprefix('significant: ')} "
                f"(Δ {delta:+.4f}, {ci}, p = {_p(row['p_value'])}), by less than one run's SE "
                f"({row['one_run_se']:.4f}): consistent across seeds, small against the test "
                "set's sampling error."
            )
        if row["pairs"] < 2:
            continue
        for metric, label in labels.items():
            prefix = OUTCOMES[metric]
            if row[f"{prefix}verdict"] != row["verdict"]:
                disagreements += 1
                notes.append(
                    f"{where}: the {label} difference "
                    f"({row[f'{prefix}delta_vs_lora']:+.4f}, 95 % CI "
                    f"{_interval(row[f'{prefix}ci_low'], row[f'{prefix}ci_high'])}) is "
                    f"{row[f'{prefix}verdict']}, accuracy's {row['verdict']}."
                )
    if not summary.empty and not disagreements and (summary["pairs"] >= 2).any():
        notes.append(
            "MCC and macro-F1 differences to LoRA, by the same paired interval (results.json: "
            "mcc_* and macro_f1_* columns), give accuracy's verdict in every row."
        )
    used = {part for m in config.methods for part in m.split("+")}
    for method, text in WORKAROUNDS.items():
        if method in used:
            notes.append(f"{method}: {text}")
    notes.append(
        "Every method gets the same LoraConfig (rank, α, targets, dropout), the same training "
        "batches for a seed and the same calibration batches; trainable parameters include the "
        "classifier head. Peak memory is the peak resident set size of the run on CPU (reset "
        "between runs) and the peak allocated memory on a GPU."
    )
    for f in failed:
        notes.append(f"FAILED r = {f['rank']} {f['method']} seed {f['seed']}: {f['error']}")
    return notes


def json_safe(value: Any) -> Any:
    """``value`` with its floats made strict JSON: NaN (not recorded) becomes ``null`` and ±∞
    (e.g. a step LoRA's final accuracy was never reached at) the strings ``"inf"``/``"-inf"``,
    so that the two stay apart and any JSON parser reads the file."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_report(config: CompareConfig, command: str = "") -> Path:
    """Collect the finished runs of ``config`` and write results, plots and the report."""
    out = Path(config.out)
    runs, failed = collect_runs(config)
    tuning = collect_tuning(config)
    picked = picked_table(config, tuning)
    n_test = _test_size(runs)
    summary = summarize(runs, config, n_test) if not runs.empty else pd.DataFrame()
    pd.concat([runs, tuning], ignore_index=True).to_csv(out / "results.csv", index=False)
    if not picked.empty:
        picked.to_csv(out / "picked_lr.csv", index=False)
    (out / "results.json").write_text(
        json.dumps(
            {
                "settings": config.shared_settings(),
                "methods": config.methods,
                "seeds": config.seeds,
                "ranks": config.ranks,
                "command": command,
                "runs": json_safe(runs.to_dict(orient="records")),
                "summary": json_safe(summary.to_dict(orient="records")),
                "tuning": json_safe(tuning.to_dict(orient="records")),
                "picked_lr": json_safe(picked.to_dict(orient="records")),
                "failed": failed,
                "workarounds": WORKAROUNDS,
            },
            indent=1,
            allow_nan=False,
        )
    )
    figures = make_plots(config, runs, summary, out / "plots") if not summary.empty else []
    if not tuning.empty:
        for rank in config.ranks:
            path = out / "plots" / f"lr_grid_r{rank}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            what = "accuracy" if config.selection == "accuracy" else "NLL"
            if plot_lr_grid(
                tuning[tuning["rank"] == rank],
                picked,
                path,
                f"Validation {what} over the lr grid, r = {rank}",
                by=config.selection,
            ):
                figures.insert(
                    0, (f"Validation accuracy per learning rate (tuning seeds), r = {rank}", path)
                )
    table = display_table(summary) if not summary.empty else pd.DataFrame()
    notes = _notes(config, summary, failed, n_test)
    if config.lr_grid:
        notes.insert(0, _selection_note(config, picked))
    settings = config.shared_settings()
    lr_text = (
        f"lr picked per method on validation from {','.join(f'{v:g}' for v in config.lr_grid)}"
        if config.lr_grid
        else f"lr {settings['lr']}"
    )
    splits = (
        f"validation {settings['val_fraction']:g} of train"
        + (f", {settings['train_size']} training examples" if settings.get("train_size") else "")
        + "; "
        if settings.get("val_fraction")
        else ""
    )
    header = (
        f"task {settings['data'] or settings['task']}, model {settings['model']}, "
        f"{settings['steps']} steps of batch "
        f"{settings['batch_size']}, {splits}{lr_text}, targets "
        f"{','.join(settings['targets'] or ['(architecture default)'])}, α = "
        f"{settings['alpha'] if settings['alpha'] else str(settings['alpha_ratio']) + ' r'}; "
        f"seeds {','.join(map(str, config.seeds))}; ranks {','.join(map(str, config.ranks))}; "
        f"{len(runs)} finished runs"
    )
    _write_markdown(out, command, header, table, notes, figures)
    _write_html(out, command, header, table, notes, figures)
    return out / "report.md"


def picked_table(config: CompareConfig, tuning: pd.DataFrame) -> pd.DataFrame:
    """Per (rank, method): the picked rate (``OUT/picked_lr.json``, written once every tuning
    run ended) with its mean validation scores; empty without a grid or before the picks."""
    pinned = Path(config.out) / "picked_lr.json"
    if not config.lr_grid or not pinned.exists():
        return pd.DataFrame()
    return pd.DataFrame(json.loads(pinned.read_text())["picked"])


def _selection_note(config: CompareConfig, picked: pd.DataFrame) -> str:
    seeds = ",".join(map(str, config.tune_seeds))
    by = (
        "the mean validation accuracy of tuning seed(s) {seeds} (ties: the lower validation NLL; "
        if config.selection == "accuracy"
        else "the lowest mean validation NLL of tuning seed(s) {seeds} ("
    ).format(seeds=seeds)
    text = (
        f"Learning rates were picked per (rank, method) from the grid "
        f"{', '.join(f'{v:g}' for v in config.lr_grid or [])} by {by}a diverged run rules its "
        "rate out). The validation split is carved out of the training data; tuning runs never read "
        "the test split, and each final run reads it once, after its last step."
    )
    if picked.empty:
        return text + " The tuning runs have not all ended yet: no rate is picked."
    chosen = "; ".join(
        f"r = {int(r['rank'])} {r['method']}: {r['lr']:g}" for _, r in picked.iterrows()
    )
    edges = edge_picks(config.lr_grid or [], picked)
    if edges:
        chosen += ". At an edge of the grid (the best rate may lie beyond it): " + "; ".join(
            f"r = {r} {m} ({side})" for r, m, side in edges
        )
    return f"{text} Picked: {chosen}."


def edge_picks(grid: list[float], picked: pd.DataFrame) -> list[tuple[int, str, str]]:
    """(rank, method, "lowest"/"highest") for each pick at an end of a grid of 3 rates or more:
    the grid did not bracket that method's best rate."""
    if len(grid) < 3 or picked.empty:
        return []
    ends = {min(grid): "lowest", max(grid): "highest"}
    return [
        (int(r["rank"]), r["method"], ends[r["lr"]])
        for _, r in picked.iterrows()
        if r["lr"] in ends
    ]


def _test_size(runs: pd.DataFrame) -> int:
    """Held-out examples behind one run's accuracy (the fewest, should runs differ; 1 where no
    run has a confusion matrix, e.g. an -lm task)."""
    if runs.empty or runs["n_test"].isna().all():
        return 1
    return int(runs["n_test"].min())


def _write_markdown(out: Path, command, header, table, notes, figures) -> None:
    lines = ["# fisherlora comparison", "", header, ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [_markdown_table(table) if not table.empty else "No finished runs yet.", ""]
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    for caption, path in figures:
        lines += [f"### {caption}", "", f"![{caption}]({path.relative_to(out)})", ""]
    (out / "report.md").write_text("\n".join(lines))


def _write_html(out: Path, command, header, table, notes, figures) -> None:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fisherlora comparison</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 6px;text-align:right}td:nth-child(2),th{text-align:left}"
        "img{max-width:100%}code,pre{background:#f4f4f4}"
        # a long command line wraps inside the page instead of widening it
        "pre{white-space:pre-wrap;overflow-wrap:anywhere}</style></head><body>",
        "<h1>fisherlora comparison</h1>",
        f"<p>{html.escape(header)}</p>",
    ]
    if command:
        parts.append(f"<pre>{html.escape(command)}</pre>")
    if table.empty:
        parts.append("<p>No finished runs yet.</p>")
    else:
        parts.append(table.to_html(index=False, escape=True, border=0))
    parts.append("<h2>Notes</h2><ul>")
    parts += [f"<li>{html.escape(n)}</li>" for n in notes]
    parts.append("</ul>")
    parts += [embedded_figure(caption, path) for caption, path in figures]
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))


def embedded_figure(caption: str, path: Path) -> str:
    """A captioned PNG inside the HTML itself (base64), so that the report is one file."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f"<h3>{html.escape(caption)}</h3>"
        f"<img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
    )
