"""``fisherlora suite``: one comparison per cell of a grid, then a pooled report across cells.

The parts: the suite file and its checks (:mod:`~fisherlora.experiments.suite_file`), the dry
run's estimate (:mod:`~fisherlora.experiments.suite_estimate`), the statistics
(:mod:`~fisherlora.experiments.suite_stats`) and the report
(:mod:`~fisherlora.experiments.suite_report`). Here: running and the command.

Running: every cell is a resumable ``compare`` into ``OUT/<cell>/`` (rerunning the same command
skips finished runs); a cell that fails is recorded (``OUT/<cell>/suite_error.txt``) and the
others go on. Then ``OUT/suite_report.md``, ``OUT/suite_report.html`` (self-contained) and
``OUT/suite_results.csv`` (every cell's final runs, with a ``cell`` column) are written.

``--cells a,b`` runs only those cells, so that one suite can be shared out over processes or
machines (each a ``--cells`` of its own, all into one ``OUT``); the report still covers every
cell with finished runs. Two processes must not share a cell: they would train its runs twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path

from fisherlora.errors import ConfigError, FisherLoraError
from fisherlora.experiments.suite_estimate import estimate_suite, format_dry_run
from fisherlora.experiments.suite_file import Suite, load_suite
from fisherlora.experiments.suite_report import write_suite_report


def check_resumable(suite: Suite, out: str | Path) -> None:
    """Refuse, before anything runs, a cell whose directory holds a comparison with other
    settings (``compare`` would refuse it after the earlier cells had run)."""
    from fisherlora.experiments.compare import LEGACY_SETTINGS, grid_extension_allowed

    for cell in suite.cells:
        config = cell.compare_config(Path(out) / cell.name)
        pinned = Path(out) / cell.name / "compare.json"
        if pinned.exists():
            # settings that older comparisons did not record, at the values they ran with
            before = LEGACY_SETTINGS | json.loads(pinned.read_text()).get("settings", {})
            settings = LEGACY_SETTINGS | config.shared_settings()
            changed = sorted(
                k
                for k in settings.keys() | before.keys()
                if k != "world_size" and settings.get(k) != before.get(k)
            )
            if changed == ["lr_grid"] and grid_extension_allowed(config, before):
                continue
            if changed:
                raise ConfigError(
                    f"{cell.where}: {pinned.parent} holds a comparison with other settings "
                    f"({', '.join(changed)}); use a new --out, or the suite as it was to resume"
                )


def check_cell_data(suite: Suite, out: str | Path) -> None:
    """Load every cell's data and model before the first run (``compare.check_runs_can_start``),
    so that a train size or validation share a cell's data cannot give, or a model, targets or
    rank it cannot take, is refused now, not hours in when that cell starts."""
    from fisherlora.experiments import compare as compare_module  # its checks, as it runs them

    for cell in suite.cells:
        config = cell.compare_config(Path(out) / cell.name)
        try:
            compare_module.check_runs_can_start(config, compare_module.load_data(config.base))
        except (FisherLoraError, OSError, ValueError) as err:  # a file it cannot read, too
            raise ConfigError(f"{cell.where}: {err}") from err


def chosen_cells(suite: Suite, names: Iterable[str] | None) -> Suite:
    """The suite with only the cells ``names`` (all of them for None), in the suite's order;
    an unknown or repeated name is refused, naming it and the suite's cells."""
    if names is None:
        return suite
    names = [n.strip() for n in names]
    known = [cell.name for cell in suite.cells]
    unknown = [n for n in names if n not in known]
    if unknown or not names or len(set(names)) < len(names):
        problem = f"unknown cells {unknown}" if unknown else "each cell once, at least one"
        raise ConfigError(f"--cells: {problem}; {suite.name!r} has {', '.join(known)}")
    return dataclasses.replace(suite, cells=[c for c in suite.cells if c.name in names])


def run_suite(
    suite: Suite,
    out: str | Path,
    *,
    progress: bool = True,
    command: str = "",
    report_only: bool = False,
    cells: Iterable[str] | None = None,
) -> Path:
    """Run (or resume) every cell's comparison into ``OUT/<cell>/``, then write the suite
    report; returns ``suite_report.md``.

    A cell that fails (an error its comparison raises) leaves ``OUT/<cell>/suite_error.txt`` and
    the next cell runs; Ctrl-C stops at once and rerunning resumes. ``report_only`` trains nothing:
    it rewrites each started cell's comparison report from its finished runs, then the suite's.
    ``cells`` (names) runs or reports only those cells; the suite report covers them all.
    """
    from fisherlora.experiments import compare as compare_module
    from fisherlora.experiments.distributed import is_main_process
    from fisherlora.experiments.report import write_report

    out = Path(out)
    running = chosen_cells(suite, cells)
    ran = [out / "suite.json", *(out / cell.name for cell in running.cells)]
    if report_only and not any(path.exists() for path in ran):
        raise ConfigError(f"--report-only: no suite in {out} to report on")
    check_resumable(running, out)
    if not report_only:
        check_cell_data(running, out)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        (out / "suite.json").write_text(
            json.dumps(
                {
                    "name": suite.name,
                    "description": suite.description,
                    "source": suite.source,
                    "command": command,
                    "cells": [{"name": c.name, "settings": c.settings} for c in suite.cells],
                },
                indent=1,
            )
        )
    for i, cell in enumerate(running.cells):
        config = cell.compare_config(out / cell.name)
        cell_command = f"{command}  # cell {cell.name}" if command else f"cell {cell.name}"
        error_file = out / cell.name / "suite_error.txt"
        if report_only:
            if (out / cell.name / "compare.json").exists():
                try:
                    write_report(config, command=cell_command)
                except (FisherLoraError, OSError, KeyError) as err:
                    print(f"cell {cell.name}: report not rewritten: {err}", file=sys.stderr)
            continue
        if progress and is_main_process():
            tune, final = cell.run_counts()
            print(f"[{i + 1}/{len(running.cells)}] cell {cell.name}: {tune + final} runs")
        try:
            compare_module.compare(config, progress=progress, command=cell_command)
            error_file.unlink(missing_ok=True)
        except Exception as err:  # any failure of one cell (Ctrl-C is no Exception: it stops all)
            error_file.parent.mkdir(parents=True, exist_ok=True)
            error_file.write_text(
                f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}", encoding="utf-8"
            )
            print(f"cell {cell.name} failed: {type(err).__name__}: {err}", file=sys.stderr)
    report = out / "suite_report.md"
    if is_main_process():
        report = write_suite_report(suite, out, command=command)
    return report


def suite_command(args: argparse.Namespace, argv: Iterable[str] | None = None) -> str:
    """``fisherlora suite``: load and check the suite, then dry-run, report or run it; returns
    what to print. Bad input raises :class:`ConfigError` before anything runs."""
    suite = load_suite(args.suite)
    cells = args.cells.split(",") if args.cells is not None else None
    if args.dry_run:
        chosen = chosen_cells(suite, cells)
        # estimated over the whole suite: a cell not yet started is scaled by every finished run
        table = estimate_suite(suite, args.out)
        names = [cell.name for cell in chosen.cells]
        return format_dry_run(chosen, table[table["cell"].isin(names)].reset_index(drop=True))
    if not args.out:
        raise ConfigError("--out DIR is required (the suite's directory; rerun it to resume)")
    given = [a for a in (list(argv) if argv is not None else sys.argv[1:]) if a != "--report-only"]
    command = "fisherlora " + " ".join(shlex.quote(a) for a in given)
    report = run_suite(
        suite,
        args.out,
        progress=not args.no_progress,
        command=command,
        report_only=args.report_only,
        cells=cells,
    )
    return (
        f"suite report: {report}, {report.with_suffix('.html')} and "
        f"{report.with_name('suite_results.csv')}"
    )
