"""The comparison report: per-run results → a summary per (rank, method) → files and plots.

Writes into the comparison directory:

- ``results.csv``: one row per finished run; ``results.json``: the runs, the summary, the
  settings, the harness workarounds and the failed runs;
- ``report.md`` (PNGs beside it in ``plots/``) and ``report.html`` (the same, PNGs embedded, one
  self-contained file).

Uncertainty, honestly: accuracy is given as mean ± std over seeds; each method's difference to
LoRA is the mean of the per-seed differences (same seed = same data order and head init), with
a two-sided paired t-test across seeds. A difference is marked "within noise" when p >= 0.05 or
when it is smaller than the standard error of a single run's accuracy, sqrt(acc (1 - acc) / n).
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from fisherlora.experiments.plots import (
    plot_bars,
    plot_confusion_matrices,
    plot_learning_curves,
    plot_module_values,
    plot_runtime_bars,
)
from fisherlora.methods import RANK_ALLOCATING
from fisherlora.methods.peers import WORKAROUNDS

if TYPE_CHECKING:
    from fisherlora.experiments.compare import CompareConfig

BASELINE = "lora"


def collect_runs(config: CompareConfig) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """One row per finished run (``metrics.json`` present); and the failed runs' errors."""
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
                        "accuracy": m["accuracy"],
                        "macro_f1": m["macro_f1"],
                        "mcc": m["mcc"],
                        # examples evaluated (a --max-test subset, not the whole test split)
                        "n_test": sum(map(sum, m["confusion_matrix"])),
                        "trainable_params": m["trainable_params"],
                        "adapter_params": m["adapter_params"],
                        "init_s": t["build_s"] + t["init_s"],
                        "median_step_s": t["median_step_s"],
                        "train_s": t["train_s"],
                        "eval_s": t["eval_s"],
                        "peak_memory_mb": t["peak_memory_mb"],
                        "total_s": t["total_s"],
                        "run_dir": str(run_dir),
                    }
                )
    return pd.DataFrame(rows), failed


def paired_difference(
    runs: pd.DataFrame, method: str, rank: int, metric: str = "accuracy"
) -> tuple[float, float, int]:
    """Mean of ``metric(method) − metric(LoRA)`` over the seeds both finished, the two-sided
    paired t-test's p-value (NaN with < 2 pairs or no spread) and the number of pairs."""
    at_rank = runs[runs["rank"] == rank]
    ours = at_rank[at_rank["method"] == method].set_index("seed")[metric]
    base = at_rank[at_rank["method"] == BASELINE].set_index("seed")[metric]
    seeds = sorted(set(ours.index) & set(base.index))
    if not seeds:
        return math.nan, math.nan, 0
    diff = ours.loc[seeds].to_numpy() - base.loc[seeds].to_numpy()
    if len(seeds) < 2 or np.allclose(diff, diff[0]):
        return float(diff.mean()), math.nan, len(seeds)
    p = scipy_stats.ttest_rel(ours.loc[seeds], base.loc[seeds]).pvalue
    return float(diff.mean()), float(p), len(seeds)


def summarize(runs: pd.DataFrame, config: CompareConfig, n_test: int) -> pd.DataFrame:
    """One row per (rank, method), in the order the comparison lists them."""
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
            }
            for metric in ("accuracy", "mcc", "macro_f1"):
                row[f"{metric}_mean"] = float(group[metric].mean())
                row[f"{metric}_std"] = (
                    float(group[metric].std(ddof=1)) if len(group) > 1 else math.nan
                )
            delta, p, pairs = (
                (math.nan, math.nan, 0)
                if method == BASELINE
                else paired_difference(runs, method, rank)
            )
            one_run_se = math.sqrt(acc.mean() * (1 - acc.mean()) / n_test)
            row |= {"delta_vs_lora": delta, "p_value": p, "pairs": pairs}
            direction = "better than LoRA" if delta > 0 else "worse than LoRA"
            if method == BASELINE or pairs == 0:
                row["note"] = "baseline" if method == BASELINE else "no LoRA run to pair with"
            elif pairs < 2:
                # one pair, no test: the difference of two runs has a standard error of √2·se
                clear = abs(delta) > 2 * math.sqrt(2) * one_run_se
                row["note"] = (
                    f"one seed: {direction} (> 2 SE)" if clear else "one seed: within noise"
                )
            elif abs(delta) < one_run_se or not (p < 0.05):
                row["note"] = "within noise"
            else:
                row["note"] = direction
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
            class_names = m["class_names"]
            matrix = np.asarray(m["confusion_matrix"])
            total = matrix if total is None else total + matrix
        if total is not None:
            matrices[method] = total
    return matrices, class_names


def _rank_map(method: str, run_dir: Path, target: Path, rank: int) -> bool:
    """A rank map for a rank-allocating method's first finished run, if it has one."""
    if (run_dir / "rank_map.png").exists():  # fim-lora, random-rank and their compositions
        shutil.copyfile(run_dir / "rank_map.png", target)
        return True
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ranks = (metrics.get("prepare") or {}).get("eva_ranks")  # EVA's redistribution
    if ranks:
        plot_module_values(
            ranks,
            target,
            title=f"{method} ranks (base r={rank})",
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
        path = plots / f"confusion_r{rank}.png"
        plot_confusion_matrices(
            matrices, class_names, path, f"Confusion matrices summed over seeds, r = {rank}"
        )
        figures.append(
            (f"Confusion matrices (row shares, counts summed over seeds), r = {rank}", path)
        )
        for method in labels:
            if not any(part in RANK_ALLOCATING for part in method.split("+")):
                continue
            first = runs[(runs["rank"] == rank) & (runs["method"] == method)]["run_dir"].iloc[0]
            path = plots / f"rank_map_r{rank}_{method}.png"
            if _rank_map(method, Path(first), path, rank):
                figures.append((f"Rank map of {method}, r = {rank} (first seed)", path))
    return figures


# --- tables and documents ------------------------------------------------------------------------


def _pm(mean: float, std: float, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The report's table: formatted strings, one row per (rank, method)."""
    rows = []
    for _, r in summary.iterrows():
        is_base = r["method"] == BASELINE
        rows.append(
            {
                "rank": int(r["rank"]),
                "method": r["method"],
                "trainable params": f"{int(r['trainable_params']):,}",
                "accuracy": _pm(r["accuracy_mean"], r["accuracy_std"]),
                "MCC": _pm(r["mcc_mean"], r["mcc_std"]),
                "macro-F1": _pm(r["macro_f1_mean"], r["macro_f1_std"]),
                "Δ acc vs LoRA": "–"
                if is_base or math.isnan(r["delta_vs_lora"])
                else f"{r['delta_vs_lora']:+.4f}",
                "p (paired)": "–" if math.isnan(r["p_value"]) else f"{r['p_value']:.3f}",
                "seeds": int(r["seeds"]),
                "init s": f"{r['init_s']:.1f}",
                "median step s": f"{r['median_step_s']:.3f}",
                "peak MB": f"{r['peak_memory_mb']:.0f}",
                "total s": f"{r['total_s']:.0f}",
                "note": r["note"],
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
    if not summary.empty:
        acc = float(summary["accuracy_mean"].mean())
        se = math.sqrt(acc * (1 - acc) / n_test)
        notes.append(
            f"One run's accuracy on {n_test:,} held-out examples has a standard error of about "
            f"{se:.4f}. Δ is the mean of per-seed differences to LoRA at the same seed; p is a "
            "two-sided paired t-test across seeds (– where fewer than 2 pairs). 'within noise' "
            "marks |Δ| below one run's standard error or p >= 0.05: such a difference is not "
            "evidence that the method helps or hurts. With one seed there is no test; a "
            "difference is called clear only beyond 2 standard errors of a difference of two "
            "runs (2·√2·se)."
        )
    for _, row in summary.iterrows():
        if row["method"] != BASELINE and "within noise" in row["note"] and row["delta_vs_lora"] > 0:
            notes.append(
                f"r = {int(row['rank'])}: {row['method']} does not beat LoRA beyond noise "
                f"(Δ {row['delta_vs_lora']:+.4f}, p = {row['p_value']:.3f})."
                if not math.isnan(row["p_value"])
                else f"r = {int(row['rank'])}: {row['method']} vs LoRA: Δ "
                f"{row['delta_vs_lora']:+.4f} from a single seed, not evidence either way."
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


def write_report(config: CompareConfig, command: str = "") -> Path:
    """Collect the finished runs of ``config`` and write results, plots and the report."""
    out = Path(config.out)
    runs, failed = collect_runs(config)
    n_test = _test_size(runs)
    summary = summarize(runs, config, n_test) if not runs.empty else pd.DataFrame()
    runs.to_csv(out / "results.csv", index=False)
    (out / "results.json").write_text(
        json.dumps(
            {
                "settings": config.shared_settings(),
                "methods": config.methods,
                "seeds": config.seeds,
                "ranks": config.ranks,
                "command": command,
                "runs": runs.to_dict(orient="records"),
                "summary": json.loads(summary.to_json(orient="records")),
                "failed": failed,
                "workarounds": WORKAROUNDS,
            },
            indent=1,
        )
    )
    figures = make_plots(config, runs, summary, out / "plots") if not summary.empty else []
    table = display_table(summary) if not summary.empty else pd.DataFrame()
    notes = _notes(config, summary, failed, n_test)
    settings = config.shared_settings()
    header = (
        f"task {settings['data'] or settings['task']}, model {settings['model']}, "
        f"{settings['steps']} steps of batch "
        f"{settings['batch_size']}, lr {settings['lr']}, targets "
        f"{','.join(settings['targets'] or ['(architecture default)'])}, α = "
        f"{settings['alpha'] if settings['alpha'] else str(settings['alpha_ratio']) + ' r'}; "
        f"seeds {','.join(map(str, config.seeds))}; ranks {','.join(map(str, config.ranks))}; "
        f"{len(runs)} finished runs"
    )
    _write_markdown(out, command, header, table, notes, figures)
    _write_html(out, command, header, table, notes, figures)
    return out / "report.md"


def _test_size(runs: pd.DataFrame) -> int:
    """Held-out examples behind one run's accuracy (the fewest, should runs differ)."""
    return 1 if runs.empty else int(runs["n_test"].min())


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
        "img{max-width:100%}code,pre{background:#f4f4f4}</style></head><body>",
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
    for caption, path in figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f"<h3>{html.escape(caption)}</h3>"
            f"<img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
        )
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))
