"""``fisherlora suite --dry-run``: a suite's runs and an estimate of the hours they take.

The estimate starts from step times measured on a 2-core CPU (:data:`STEP_TIMES`), scaled by
tokens per example (:data:`TASK_TOKENS`) and each method's calibration (:data:`INIT_STEPS`);
on a resumed suite it is rescaled by the finished runs' measured times (a cell not started
yet by those of the whole suite).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fisherlora.experiments.suite_file import BASELINE, Suite


@dataclass(frozen=True)
class StepTime:
    """One LoRA optimizer step (forward + backward + AdamW) of ``model``, measured at
    ``batch_size`` on ``task`` truncated to ``max_length`` tokens. Other shapes scale linearly
    with batch_size x mean tokens per example (:func:`mean_tokens`), evaluation per example
    with ``eval_factor`` x a training example's cost; ``load_s`` is each run's fixed overhead
    (loading the model, building the adapters, writing the run directory)."""

    seconds: float
    batch_size: int
    task: str
    max_length: int
    eval_factor: float
    load_s: float
    source: str


# Measured on this project's 2-core CPU (no GPU); adjust here to calibrate --dry-run.
STEP_TIMES: dict[str, StepTime] = {
    # benchmarks/results/compare-rt (300 steps, batch 32, max_length 128, r = 2 and 8): LoRA's
    # median step 0.40-0.72 s over seeds (0.44-0.46 s in the least loaded runs); the fim-lora,
    # filet and random-rank re-runs took 0.8-1.8 s per step because two runs shared the two cores.
    # Evaluation: eval_s / (3 evaluations x 1,994 test texts) is 0.45 x a training example.
    # Per-run overhead beyond train + eval + init: 1-5 s (model load included).
    "minilm": StepTime(
        0.50, 32, "rotten-tomatoes", 128, 0.45, 3.0, "benchmarks/results/compare-rt, LoRA r=2,8"
    ),
    # docs/cli.md (causal LM section): 60 steps of batch 8 at max_length 64, r = 8 on all seven
    # projections, 1.59 s per step, 169 s for the whole command with 400 test prompts. The eval
    # factor and load time are ASSUMPTIONS fitted to that one total (no smollm2 run is stored
    # under benchmarks/results).
    "smollm2-135m": StepTime(
        1.59, 8, "rotten-tomatoes-gen", 64, 0.6, 20.0, "README, one LoRA run (partly assumed)"
    ),
    # the random hidden-32 test models: an ASSUMPTION (they take milliseconds per step)
    "tiny-bert": StepTime(0.02, 16, "rotten-tomatoes", 16, 0.45, 1.0, "assumption"),
    "tiny-llama": StepTime(0.02, 16, "rotten-tomatoes", 16, 0.45, 1.0, "assumption"),
}

# Tokens per training text (MiniLM's WordPiece, [CLS] and [SEP] included): the midpoints of the
# ten deciles of each built-in task's training split (measured on every third text). With
# length-grouped batches a batch is padded to about its own texts' length, so a step costs about
# batch x mean(min(tokens, max_length)).
TASK_TOKENS: dict[str, tuple[int, ...]] = {
    "rotten-tomatoes": (10, 15, 19, 22, 25, 28, 31, 35, 39, 47),
    "imdb": (86, 150, 169, 189, 218, 254, 305, 381, 504, 801),
}
# A -gen task's prompt template and class-name completion add about this many tokens (assumption).
GEN_EXTRA_TOKENS = 8
# (train, test) sizes of the built-in tasks' hash splits (tasks.py)
TASK_SIZES: dict[str, tuple[int, int]] = {"rotten-tomatoes": (6536, 1994), "imdb": (19092, 5812)}

# Calibration / initialisation before training, in training steps of the same run (from
# benchmarks/results/compare-rt: (build_s + init_s) / median_step_s, medians over seeds; the
# fim-lora-batch value is an assumption: 8 plain backward passes). A composition adds its parts.
INIT_STEPS: dict[str, float] = {
    "fim-lora": 12.0,
    "fim-lora-batch": 9.0,
    "random-rank": 0.0,
    "filet": 19.0,
    "filet-svd": 19.0,
    "fw-lora": 0.0,
    "eva": 40.0,
    "pissa": 2.0,
    "lora-ga": 11.0,
    "lora-ga-peft": 11.0,
    "corda": 47.0,
    "adalora": 0.0,
    "dora": 0.0,
    "lora": 0.0,
}
# A training step relative to LoRA's (DoRA's magnitude vectors: 1.1-1.3 x in compare-rt; the
# FW-LoRA sketch hooks during warm-up: a few per cent). A composition takes its slowest part.
STEP_FACTOR: dict[str, float] = {"dora": 1.25, "fw-lora": 1.05}


def mean_tokens(task: str, max_length: int) -> float | None:
    """Mean tokens per example after truncation to ``max_length`` (None: unknown task)."""
    base = task.removesuffix("-gen")
    if base not in TASK_TOKENS:
        return None
    extra = GEN_EXTRA_TOKENS if task.endswith("-gen") else 0
    return float(np.mean([min(t + extra, max_length) for t in TASK_TOKENS[base]]))


def _method_parts(method: str) -> list[str]:
    return [p.strip() for p in method.split("+")]


def estimate_run_seconds(settings: Mapping[str, Any], method: str, phase: str) -> float | None:
    """Seconds one run of ``method`` takes with ``settings`` (a cell's), on the CPU the
    :data:`STEP_TIMES` were measured on; None where the model or task was never measured.

    ``load_s + init_steps·step + steps·step + evaluations``, where ``step`` is the reference step
    scaled by batch·grad_accum·tokens and the method's step factor; every evaluation point reads
    the validation split (or test, without one), and a final run with a validation split reads
    test once more at the end (at most ``max_test`` examples)."""
    ref = STEP_TIMES.get(str(settings.get("model")))
    task = str(settings.get("task"))
    if ref is None or task.removesuffix("-gen") not in TASK_SIZES:
        return None
    ref_tokens = mean_tokens(ref.task, ref.max_length)
    tokens = mean_tokens(task, int(settings["max_length"]))
    if ref_tokens is None or tokens is None:
        return None
    per_example = ref.seconds / (ref.batch_size * ref_tokens) * tokens  # s per training example
    step = per_example * int(settings["batch_size"]) * int(settings.get("grad_accum", 1))
    step *= max(STEP_FACTOR.get(p, 1.0) for p in _method_parts(method))
    init = sum(INIT_STEPS.get(p, 10.0) for p in _method_parts(method)) * step
    steps = int(settings["steps"])
    every = int(settings.get("eval_every") or 0)
    points = (steps // every + (1 if steps % every else 0)) if every else 1
    train_n, test_n = TASK_SIZES[task.removesuffix("-gen")]
    max_test = settings.get("max_test")
    test_n = min(test_n, int(max_test)) if max_test else test_n
    val_n = round(float(settings.get("val_fraction") or 0.0) * train_n)
    eval_example = per_example * ref.eval_factor
    # with a validation split: every point reads it, and a final run reads test once at the end
    test_reads = (1 if phase == "final" else 0) if val_n else points
    evaluated = points * val_n + test_reads * test_n
    return ref.load_s + init + steps * step + evaluated * eval_example


def pause_robust_seconds(timings: Mapping[str, Any], settings: Mapping[str, Any]) -> float:
    """A finished run's seconds with its training time taken as ``median_step_s × steps``: a
    run that was paused or shared the CPU for a while (a suspended suite, a test run beside it)
    keeps a typical median step, while its wall-clock ``train_s`` and ``total_s`` do not. The
    rest (loading, calibration, evaluation) is taken as measured. ``total_s`` where the
    timings lack a part (or hold NaN there: a results.csv row that does not carry it)."""
    try:
        steps = int(settings["steps"])
        typical = float(timings["median_step_s"]) * steps
        rest = float(timings["total_s"]) - float(timings["train_s"])
    except (KeyError, TypeError, ValueError):
        return float(timings["total_s"])
    if not (math.isfinite(typical) and math.isfinite(rest)):
        return float(timings["total_s"])
    return typical + max(rest, 0.0)


def _finished_runs(cell_dir: Path) -> list[dict[str, Any]]:
    """Method, phase and measured seconds of every finished run under ``cell_dir``."""
    runs = []
    for metrics_file in sorted(cell_dir.rglob("metrics.json")):
        try:
            metrics = json.loads(metrics_file.read_text())
            config = metrics_file.with_name("config.json")
            settings = json.loads(config.read_text()).get("settings", {}) if config.exists() else {}
            runs.append(
                {
                    "method": metrics.get("method", settings.get("method", BASELINE)),
                    "phase": metrics.get("phase", settings.get("phase", "final")),
                    "total_s": pause_robust_seconds(metrics["timings"], settings),
                }
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a file from something else, or written by an older version
    return runs


def estimate_suite(suite: Suite, out: str | Path | None = None) -> pd.DataFrame:
    """One row per cell: its shape, its tuning and final runs, and the estimated hours.

    ``est_hours`` is the sum of :func:`estimate_run_seconds` over the cell's runs; with ``out``
    the runs already finished in ``OUT/<cell>/`` are counted (``done``), their estimates taken
    off, and the rest scaled by measured / estimated seconds of the finished ones (so a resumed
    suite's estimate follows this machine and its load); a cell with no finished run yet is
    scaled by that ratio over all the suite's finished runs. ``est_hours`` is NaN where a model or
    task was never measured (see :data:`STEP_TIMES`, :data:`TASK_TOKENS`)."""
    rows = []
    # per started cell: (estimated, measured) seconds of its finished runs
    progress: dict[str, tuple[float, float]] = {}
    for cell in suite.cells:
        s = cell.settings
        tune, final = cell.run_counts()
        per_phase = {
            phase: {m: estimate_run_seconds(s, m, phase) for m in cell.methods}
            for phase in ("tune", "final")
        }
        known = all(v is not None for p in per_phase.values() for v in p.values())
        tune_per = len(cell.ranks) * len(cell.lr_grid or []) * len(cell.tune_seeds)
        final_per = len(cell.ranks) * len(cell.seeds)
        seconds = math.nan
        done = 0
        if known:
            seconds = sum(
                tune_per * per_phase["tune"][m] + final_per * per_phase["final"][m]
                for m in cell.methods
            )
        if out is not None and (Path(out) / cell.name).is_dir():
            finished = _finished_runs(Path(out) / cell.name)
            done = len(finished)
            if known and finished:
                estimated = sum(
                    per_phase["tune" if r["phase"] == "tune" else "final"].get(r["method"]) or 0.0
                    for r in finished
                )
                measured = sum(r["total_s"] for r in finished)
                progress[cell.name] = (estimated, measured)
                scale = measured / estimated if estimated > 0 else 1.0
                seconds = max(0.0, seconds - estimated) * scale
        rows.append(
            {
                "cell": cell.name,
                "task": s["task"],
                "model": s["model"],
                "ranks": ",".join(map(str, cell.ranks)),
                "methods": len(cell.methods),
                "seeds": len(cell.seeds),
                "lr_grid": ",".join(f"{v:g}" for v in cell.lr_grid) if cell.lr_grid else "-",
                "steps": int(s["steps"]),
                "train_size": s.get("train_size") or "all",
                "tune_runs": tune,
                "final_runs": final,
                "runs": tune + final,
                "done": done,
                "est_hours": seconds / 3600,
            }
        )
    estimated = sum(e for e, _ in progress.values())
    if estimated > 0:  # cells not started yet: at the speed the finished runs went
        scale = sum(m for _, m in progress.values()) / estimated
        for row in rows:
            if row["cell"] not in progress:
                row["est_hours"] *= scale
    return pd.DataFrame(rows)


def format_dry_run(suite: Suite, table: pd.DataFrame) -> str:
    """The dry run's printout: the suite, one line per cell, the total."""
    lines = [f"suite {suite.name} ({suite.source})"]
    if suite.description:
        lines.append(suite.description)
    shown = table.copy()
    shown["est_hours"] = [("?" if math.isnan(h) else f"{h:.1f}") for h in shown["est_hours"]]
    shown["runs"] = [
        f"{t}+{f}={t + f}" for t, f in zip(shown["tune_runs"], shown["final_runs"], strict=True)
    ]
    shown = shown.drop(columns=["tune_runs", "final_runs"])
    lines += ["", shown.to_string(index=False), ""]
    tune, final = suite.run_counts()
    hours = table["est_hours"]
    unknown = table.loc[hours.isna(), "cell"].tolist()
    total = f"about {hours.sum():.1f} h" if not unknown else "unknown"
    lines.append(
        f"total: {tune + final} runs ({tune} tuning + {final} final), "
        f"{int(table['done'].sum())} finished; time left: {total}"
    )
    lines.append(
        "runs: tuning + final; est_hours: from step times measured on a 2-core CPU "
        "(fisherlora.experiments.suite_estimate.STEP_TIMES), scaled by the finished runs' measured times"
    )
    if unknown:
        others = (
            f" (the other cells: about {hours.dropna().sum():.1f} h on that CPU)"
            if len(unknown) < len(table)
            else ""
        )
        lines.append(
            f"no step time measured for the model or task of: {', '.join(unknown)}{others}"
        )
    return "\n".join(lines)
