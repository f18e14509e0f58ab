"""A suite's report: ``suite_report.md``, a self-contained ``suite_report.html``,
``suite_results.csv`` and ``suite_pooled.csv``, from the cells' finished runs."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pandas as pd

from fisherlora.experiments.suite_estimate import pause_robust_seconds
from fisherlora.experiments.suite_file import BASELINE, Suite
from fisherlora.experiments.suite_stats import (
    OUTCOMES,
    cell_differences,
    final_runs,
    pooled_differences,
)


def collect_suite_results(
    suite: Suite, out: str | Path
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Every cell's final runs (from ``OUT/<cell>/results.csv``) with a ``cell`` column, and
    per cell the problems to report (a failed cell, failed runs, no results yet)."""
    out = Path(out)
    frames, problems = [], {}
    for cell in suite.cells:
        cell_dir = out / cell.name
        notes = []
        error = cell_dir / "suite_error.txt"
        if error.exists():
            notes.append(f"the comparison failed: {error.read_text().splitlines()[0]}")
        details = cell_dir / "results.json"
        if details.exists():
            try:
                failed = json.loads(details.read_text()).get("failed", [])
            except ValueError:
                failed = []
            for f in failed:
                notes.append(
                    f"run r = {f.get('rank')} {f.get('method')} seed {f.get('seed')} failed: "
                    f"{f.get('error')}"
                )
        runs = read_results(cell_dir / "results.csv")
        if runs.empty:
            notes.append("no finished runs yet")
        else:
            runs = final_runs(runs).copy()
            runs.insert(0, "cell", cell.name)
            frames.append(runs)
        if notes:
            problems[cell.name] = notes
    results = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return results, problems


def read_results(csv: Path) -> pd.DataFrame:
    """A cell's ``results.csv``; empty where there is none yet, or it holds no row (a cell
    whose every run failed writes a file with no columns)."""
    if not csv.exists():
        return pd.DataFrame()
    try:
        return pd.read_csv(csv)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def picked_rates(suite: Suite, out: str | Path) -> pd.DataFrame:
    """The learning rate each (cell, rank, method) was run at after tuning (``picked_lr.csv``),
    and ``edge``: "top" or "bottom" where that is an end of the cell's grid (the best rate may
    lie beyond it), else ""."""
    frames = []
    for cell in suite.cells:
        path = Path(out) / cell.name / "picked_lr.csv"
        if path.exists():
            frame = pd.read_csv(path)
            frame.insert(0, "cell", cell.name)
            grid = cell.compare_config(Path(out) / cell.name).lr_grid or []
            frame["edge"] = [
                "top" if grid and lr >= max(grid) else "bottom" if grid and lr <= min(grid) else ""
                for lr in frame["lr"]
            ]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _ci(low: float, high: float, digits: int = 4) -> str:
    if math.isnan(low):
        return "–"
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def _delta_ci(row: pd.Series | None, digits: int = 4) -> str:
    if row is None:
        return "–"
    return f"{row['delta']:+.{digits}f} {_ci(row['ci_low'], row['ci_high'], digits)}"


# the per-cell table's differences to LoRA: outcome column -> label
CELL_OUTCOMES = {"accuracy": "acc", "nll": "NLL", "mcc": "MCC", "val_auc": "val AUC"}


def cell_table(
    cell: str, results: pd.DataFrame, per_cell: pd.DataFrame, picked: pd.DataFrame
) -> pd.DataFrame:
    """A cell's summary: one row per (rank, method)."""
    rows = []
    runs = results[results["cell"] == cell]
    for (rank, method), group in runs.groupby(["rank", "method"], sort=False):
        diffs = per_cell[
            (per_cell["cell"] == cell) & (per_cell["rank"] == rank) & (per_cell["method"] == method)
        ].set_index("outcome")
        lr = "–"
        if not picked.empty:
            match = picked[
                (picked["cell"] == cell) & (picked["rank"] == rank) & (picked["method"] == method)
            ]
            if len(match):
                lr = f"{float(match['lr'].iloc[0]):g} (picked)"
        if lr == "–" and "lr" in group and group["lr"].notna().any():
            lr = ",".join(f"{v:g}" for v in sorted(group["lr"].dropna().unique()))
        acc = group["accuracy"]
        std = float(acc.std(ddof=1)) if len(acc) > 1 else math.nan
        params = pd.to_numeric(
            group["trainable_params"] if "trainable_params" in group else pd.Series([None]),
            errors="coerce",
        )
        rows.append(
            {
                "method": method,
                "rank": int(rank),
                "lr": lr,
                "trainable params": "–" if params.isna().all() else f"{int(params.median()):,}",
                "seeds": len(group),
                "accuracy": f"{acc.mean():.4f}" + ("" if math.isnan(std) else f" ± {std:.4f}"),
                **{
                    f"Δ {label} [95 % CI]": "baseline"
                    if method == BASELINE
                    else _delta_ci(diffs.loc[outcome] if outcome in diffs.index else None)
                    for outcome, label in CELL_OUTCOMES.items()
                },
                "verdict (acc)": "–"
                if method == BASELINE or "accuracy" not in diffs.index
                else diffs.loc["accuracy", "verdict"],
            }
        )
    return pd.DataFrame(rows)


def pooled_table(pooled: pd.DataFrame) -> pd.DataFrame:
    """The pooled view, formatted: one row per (method, outcome)."""
    rows = []
    for _, r in pooled.iterrows():
        rows.append(
            {
                "method": r["method"],
                "outcome": r["label"],
                "Δ vs LoRA": f"{r['delta']:+.4f}",
                "95 % CI (Welch t)": _ci(r["ci_low"], r["ci_high"]),
                "cells": f"{int(r['cells'])}: {r['cell_names']}",
                "pairs": int(r["pairs"]),
                "fewest seeds in a cell": int(r["min_pairs"]),
                "unpaired seeds": int(r["unpaired"]),
                "win / tie / loss": f"{r['wins']} / {r['ties']} / {r['losses']}"
                + (f" ({r['no_interval']} without interval)" if r["no_interval"] else ""),
            }
        )
    return pd.DataFrame(rows)


WALL_HOURS = "hours, summed wall clock"
TYPICAL_HOURS = "hours, pause-robust"


def wall_hours(suite: Suite, out: str | Path) -> pd.DataFrame:
    """Per cell: its runs (tuning and final) and their time in hours, summed over the runs, two
    ways: each run's wall clock (``total_s``: a run that was suspended, or shared the CPU with
    other work, counts that time too) and pause-robust (``suite_estimate.pause_robust_seconds``:
    training as median step × steps, the rest as measured). Runs that shared the CPU overlap in
    time, so either sum is the compute spent, not the time the clock showed."""
    rows = []
    for cell in suite.cells:
        csv = Path(out) / cell.name / "results.csv"
        runs = read_results(csv)
        steps = {"steps": cell.compare_config(Path(out) / cell.name).base.steps}
        wall = typical = 0.0
        for _, run in runs.iterrows():
            timings = {k: run.get(k) for k in ("total_s", "train_s", "median_step_s")}
            if pd.notna(timings["total_s"]):
                wall += float(timings["total_s"])
                typical += pause_robust_seconds(timings, steps)
        rows.append(
            {
                "cell": cell.name,
                "runs": len(runs),
                WALL_HOURS: round(wall / 3600, 2),
                TYPICAL_HOURS: round(typical / 3600, 2),
            }
        )
    return pd.DataFrame(rows)


def summary_tables(
    suite: Suite,
    out: str | Path,
    per_cell: pd.DataFrame,
    pooled: pd.DataFrame,
    picked: pd.DataFrame,
) -> list[tuple[str, pd.DataFrame]]:
    """The suite at a glance, as (title, table): compute per cell, the picked rates (method ×
    cell), the pooled Δ on accuracy, NLL and validation AUC, and the cells where some method
    differs most from LoRA in accuracy."""
    tables = [
        (
            "Compute: runs and summed run time per cell (wall clock: each run's own, including "
            "time suspended or sharing the CPU; pause-robust: training as median step × steps)",
            wall_hours(suite, out),
        )
    ]
    if not picked.empty:
        rates = picked.assign(
            lr=[
                f"{v:g}" + (f" ({edge})" if isinstance(edge, str) and edge else "")
                for v, edge in zip(
                    picked["lr"],
                    picked["edge"] if "edge" in picked else [""] * len(picked),
                    strict=True,
                )
            ],
            rank=picked["rank"],
        )
        rates["cell"] = rates["cell"] + " r" + rates["rank"].astype(int).astype(str)
        grid = rates.pivot_table(index="method", columns="cell", values="lr", aggfunc="first")
        grid = grid.reindex(columns=list(dict.fromkeys(rates["cell"])))
        tables.append(
            (
                "Picked learning rate per method and cell (top / bottom: an end of the cell's "
                "grid, where the best rate may lie beyond it)",
                grid.fillna("–").reset_index(),
            )
        )
    if not pooled.empty:
        main = {"accuracy": "accuracy", "nll": "NLL", "val_auc": "val AUC"}
        rows = {}
        for _, r in pooled[pooled["outcome"].isin(main)].iterrows():
            row = rows.setdefault(r["method"], {"method": r["method"]})
            row[f"Δ {main[r['outcome']]} [95 % CI]"] = _delta_ci(r)
        tables.append(("Pooled Δ vs LoRA (all cells a method ran in)", pd.DataFrame(rows.values())))
    if not per_cell.empty:
        acc = per_cell[per_cell["outcome"] == "accuracy"].copy()
        acc["size"] = acc["delta"].abs()
        from fisherlora.methods import is_ours  # here: the methods pull in torch and PEFT

        ours = acc[[is_ours(m) for m in acc["method"]]]
        for title, rows in (
            ("The three cells with the largest accuracy difference to LoRA (its method)", acc),
            (
                "The three cells where one of ours (FIM-LoRA, FILet, FW-LoRA, their variants "
                "and compositions) differs most from LoRA in accuracy (its method)",
                ours,
            ),
        ):
            if rows.empty:
                continue
            # a cell with several ranks is one cell per rank (as in the pooled view): one row
            top = rows.sort_values("size", ascending=False).drop_duplicates(["cell", "rank"])
            top = top.head(3)
            tables.append(
                (
                    title,
                    pd.DataFrame(
                        {
                            "cell": top["cell"] + " r" + top["rank"].astype(str),
                            "method": top["method"],
                            "Δ acc [95 % CI]": [_delta_ci(r) for _, r in top.iterrows()],
                            "verdict": top["verdict"],
                        }
                    ),
                )
            )
    return tables


STATISTICS_NOTE = (
    "Δ = method − LoRA, from the final runs only (tuning runs read validation, never test), "
    "paired by seed within a cell and rank (same seed: same data order and head init; the "
    "validation split and a train_size subset are the same for every run of a cell). NLL is "
    "the held-out cross-entropy (lower is better: Δ < 0 favours the method); on a -gen cell it "
    "is the true completion's −log p over the whole vocabulary, a larger number than a "
    "classifier's two-class cross-entropy, so its Δ is in the same unit (nats per example) but "
    "not on the same scale. Validation AUC is the mean validation accuracy over the evaluation "
    "points (equally spaced: the area under the validation curve as a Riemann sum, normalised; "
    "higher is better). Pooled Δ = the mean over cells of each cell's mean per-seed difference "
    "(every cell weighs the same; a cell with several ranks counts once per rank). Its 95 % CI "
    "is Δ ± t(0.975, ν)·SE with SE² = Σ_c (s_c²/n_c) / C² over the C cells and Welch–"
    "Satterthwaite ν (with one cell: that cell's paired t interval); it treats the cells as "
    "fixed and covers the spread over seeds, not the test sets' sampling. Methods need not "
    "share cells: the cells column names those pooled. Unpaired seeds: seeds where one arm has "
    "the outcome and the other has not (a failed run, an infinite NLL, a run not finished yet); "
    "the pairs leave them out. Win / tie / loss counts the cells whose paired 95 % t interval "
    "(Δ ± t(0.975, n − 1)·sd/√n) excludes 0 in the method's favour / contains 0 / excludes 0 "
    "against it; a cell with one paired seed has no interval, and one with fewer than "
    "{min_pairs} paired seeds that all differ by the same amount (a zero-width "
    "interval) reads 'cannot tell'; both are left out of the pooled Δ and its CI and counted "
    "'without interval'."
)


def statistics_note() -> str:
    """:data:`STATISTICS_NOTE` with ``report.ZERO_SPREAD_MIN_PAIRS`` in it (imported here:
    the report module pulls in matplotlib)."""
    from fisherlora.experiments.report import ZERO_SPREAD_MIN_PAIRS

    return STATISTICS_NOTE.format(min_pairs=ZERO_SPREAD_MIN_PAIRS)


def write_suite_report(suite: Suite, out: str | Path, command: str = "") -> Path:
    """``suite_results.csv``, ``suite_pooled.csv``, ``suite_report.md`` (plots in
    ``suite_plots/``) and a self-contained ``suite_report.html`` from the cells' results."""
    from fisherlora.experiments.plots import plot_forest

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results, problems = collect_suite_results(suite, out)
    results.to_csv(out / "suite_results.csv", index=False)
    if results.empty:
        per_cell, pooled = pd.DataFrame(), pd.DataFrame()
    else:
        per_cell = cell_differences(results)
        planned = {c.name: c.compare_config(out / c.name).methods for c in suite.cells}
        pooled = pooled_differences(results, planned=planned)
    pooled.to_csv(out / "suite_pooled.csv", index=False)
    picked = picked_rates(suite, out)
    figures: list[tuple[str, Path]] = []
    if not pooled.empty:
        plots = out / "suite_plots"
        plots.mkdir(exist_ok=True)
        path = plots / "forest.png"
        plot_forest(
            pooled,
            per_cell,
            {k: v[0] for k, v in OUTCOMES.items()},
            path,
            f"{suite.name}: Δ vs LoRA (method − LoRA), pooled over cells",
        )
        figures.append(
            ("Δ vs LoRA per method: cells (faint points) and pooled Δ with its 95 % CI", path)
        )
    tune, final = suite.run_counts()
    header = (
        f"suite {suite.name} ({suite.source}): {len(suite.cells)} cells, {tune + final} runs "
        f"planned ({tune} tuning + {final} final), {len(results)} final runs finished"
    )
    sections: list[tuple[str, str, pd.DataFrame, list[str]]] = []
    for cell in suite.cells:
        s = cell.settings
        shape = (
            f"task {s.get('task')}, model {s.get('model')}, ranks "
            f"{','.join(map(str, cell.ranks))}, {s.get('steps')} steps of batch "
            f"{s.get('batch_size')}, max_length {s.get('max_length')}, train size "
            f"{s.get('train_size') or 'all'}, val_fraction {s.get('val_fraction')}, "
            + (
                f"lr grid {','.join(f'{v:g}' for v in cell.lr_grid)} (tuning seeds "
                f"{','.join(map(str, cell.tune_seeds))})"
                if cell.lr_grid
                else f"lr {s.get('lr')}"
            )
            + f", seeds {','.join(map(str, cell.seeds))}"
        )
        if cell.description:
            shape += f". {cell.description}"
        table = (
            cell_table(cell.name, results, per_cell, picked)
            if not results.empty and (results["cell"] == cell.name).any()
            else pd.DataFrame()
        )
        sections.append((cell.name, shape, table, problems.get(cell.name, [])))
    pooled_view = pooled_table(pooled) if not pooled.empty else pd.DataFrame()
    summary = summary_tables(suite, out, per_cell, pooled, picked)
    _write_suite_markdown(out, suite, command, header, pooled_view, sections, figures, summary)
    _write_suite_html(out, suite, command, header, pooled_view, sections, figures, summary)
    return out / "suite_report.md"


def _markdown_table(table: pd.DataFrame) -> str:
    from fisherlora.experiments.report import _markdown_table as markdown

    return markdown(table)


def _write_suite_markdown(out, suite, command, header, pooled, sections, figures, summary) -> None:
    lines = [f"# fisherlora suite: {suite.name}", ""]
    if suite.description:
        lines += [suite.description, ""]
    lines += [header, ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += ["## Summary", ""]
    for title, table in summary:
        lines += [f"**{title}**", "", _markdown_table(table), ""]
    lines += ["## Pooled over cells", ""]
    lines += [_markdown_table(pooled) if not pooled.empty else "No paired results yet.", ""]
    lines += [statistics_note(), ""]
    for caption, path in figures:
        lines += [f"![{caption}]({path.relative_to(out)})", ""]
    lines += ["## Cells", ""]
    for name, shape, table, notes in sections:
        lines += [f"### {name}", "", shape, ""]
        lines += [_markdown_table(table) if not table.empty else "No finished runs yet.", ""]
        lines += [f"- {n}" for n in notes]
        if notes:
            lines.append("")
    (out / "suite_report.md").write_text("\n".join(lines))


def _write_suite_html(out, suite, command, header, pooled, sections, figures, summary) -> None:
    from fisherlora.experiments.report import embedded_figure

    def table_html(table: pd.DataFrame, empty: str) -> str:
        if table.empty:
            return f"<p>{html.escape(empty)}</p>"
        return table.to_html(index=False, escape=True, border=0)

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>fisherlora suite {html.escape(suite.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 6px;text-align:right}td:first-child,th{text-align:left}"
        "img{max-width:100%}code,pre{background:#f4f4f4}"
        "pre{white-space:pre-wrap;overflow-wrap:anywhere}</style></head><body>",
        f"<h1>fisherlora suite: {html.escape(suite.name)}</h1>",
    ]
    if suite.description:
        parts.append(f"<p>{html.escape(suite.description)}</p>")
    parts.append(f"<p>{html.escape(header)}</p>")
    if command:
        parts.append(f"<pre>{html.escape(command)}</pre>")
    parts.append("<h2>Summary</h2>")
    for title, table in summary:
        parts.append(f"<p><b>{html.escape(title)}</b></p>" + table_html(table, "–"))
    parts.append("<h2>Pooled over cells</h2>")
    parts.append(table_html(pooled, "No paired results yet."))
    parts.append(f"<p>{html.escape(statistics_note())}</p>")
    parts += [embedded_figure(caption, path) for caption, path in figures]
    parts.append("<h2>Cells</h2>")
    for name, shape, table, notes in sections:
        parts.append(f"<h3>{html.escape(name)}</h3><p>{html.escape(shape)}</p>")
        parts.append(table_html(table, "No finished runs yet."))
        if notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    (out / "suite_report.html").write_text("\n".join(parts))
