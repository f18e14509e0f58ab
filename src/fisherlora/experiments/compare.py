"""``fisherlora compare``: every (rank, seed, method) run of a comparison, then the report.

Runs are laid out as ``OUT/r{rank}/{method}/seed{seed}/`` (each a ``fisherlora train`` run
directory); with a learning-rate grid the tuning runs go to
``OUT/r{rank}/{method}/tune/lr{lr}-seed{seed}/``. A run is finished when its ``metrics.json``
exists: the runner writes it last and atomically, so rerunning the same command skips finished
runs and redoes only unfinished ones; an interrupt never leaves a finished-looking run behind.
``OUT/compare.json`` pins the shared settings, so a rerun with different settings cannot mix
incomparable runs in one report.

Learning-rate selection (``lr_grid``): every (rank, method) first trains at each rate of the
grid with the tuning seed(s), reading validation only (``phase="tune"``). The picked rate is the
one with the highest mean validation accuracy over the tuning seeds (ties: the lower validation
NLL; a diverged run ranks last), or the lowest mean validation NLL with ``select_by="nll"`` (the
default for an -lm task); the picks are pinned in ``OUT/picked_lr.json`` once every tuning run
has finished, and the final seeds run at them, reading the test split once each. A pinned grid
may be widened to a superset while no final run has finished; the picks are then made again.

The loop is seed-major (every method at every rank for seed 0, then for seed 1, ...), so a
comparison cut short still has paired runs of every method at every rank.

Under ``torchrun`` / ``accelerate launch`` every run is data-parallel (see ``train``); rank 0
writes ``compare.json`` and the report, and the number of processes is pinned with the other
settings (a process's batch is ``batch_size``, so other world sizes train differently).
"""

from __future__ import annotations

import json
import math
import traceback
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fisherlora.adapters import check_rank_fits, resolve_targets
from fisherlora.errors import ConfigError, FisherLoraError

# the settings live in their own module, which report.py imports too (report never imports
# this module); re-exported here
from fisherlora.experiments.compare_config import TUNE_SEED as TUNE_SEED
from fisherlora.experiments.compare_config import VARYING as VARYING
from fisherlora.experiments.compare_config import CompareConfig as CompareConfig
from fisherlora.experiments.distributed import (
    Process,
    barrier,
    init_distributed,
    is_main_process,
)
from fisherlora.experiments.models import default_targets

# the presets live in a torch-free module so that `fisherlora --help` can show them quickly
from fisherlora.experiments.presets import ALL_METHODS as ALL_METHODS
from fisherlora.experiments.presets import QUICK as QUICK
from fisherlora.experiments.report import write_report
from fisherlora.experiments.task_kinds import load_data, task_kind
from fisherlora.experiments.train import (
    TrainConfig,
    carve_splits,
    method_options,
    resolve_device,
    train,
    write_json_atomic,
)
from fisherlora.methods import base_method, get_method

# Settings added after comparisons were first pinned, with the value that older comparisons
# ran with: a compare.json without the key matches exactly that value (so they still resume).
LEGACY_SETTINGS = {
    "val_fraction": 0.0,
    "train_size": None,
    "lr_grid": None,
    "tune_seeds": None,
    # the refusal threshold for dropped rows of a data file (the built-in tasks drop none)
    "max_dropped_fraction": 0.2,
    # comparisons before --precision trained in float32 (with the checkpoint's stored dtype)
    "precision": "fp32",
    # lr grids before select_by picked by validation accuracy (they compared no -lm task)
    "select_by": "accuracy",
    # rank plans before rounding existed handed out the units left as "maximal" does
    "rounding": "maximal",
}


def _parse_list(spec: str, what: str, convert, kind: str) -> list:
    """``spec`` split at commas, each item converted; refused when empty, repeated or unparsable."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    try:
        values = [convert(s) for s in items]
    except ValueError as err:
        raise ConfigError(f"{what} must be comma-separated {kind}, got {spec!r}") from err
    if not values:
        raise ConfigError(f"{what} names nothing: {spec!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{what} lists a value twice: {spec!r}")
    return values


def parse_floats(spec: str, what: str) -> list[float]:
    """``"1e-4,3e-4"`` → ``[1e-4, 3e-4]``: positive, finite, no repeats; a clear error else."""
    values = _parse_list(spec, what, float, "numbers")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"{what} must hold positive numbers only, got {spec!r}")
    return values


def parse_ints(spec: str, what: str, minimum: int) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; a clear error for anything that is not such a list."""
    values = _parse_list(spec, what, int, "whole numbers")
    if min(values) < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {spec!r}")
    return values


def check_out_dir(config: CompareConfig, process: Process | None = None) -> None:
    """Pin the shared settings in ``OUT/compare.json``; refuse a rerun that changed them."""
    process = process or Process()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    pinned = out / "compare.json"
    settings = config.shared_settings()
    if process.distributed:  # absent for one process, so one-process comparisons stay resumable
        settings["world_size"] = process.world_size
    if pinned.exists():
        # compared with the legacy values filled in; written as the config gives them (its own
        # keys in its own order), so that resuming rewrites an unchanged compare.json byte for
        # byte, and a file written before a setting existed still matches its legacy value
        before = LEGACY_SETTINGS | json.loads(pinned.read_text())["settings"]
        now = LEGACY_SETTINGS | settings
        changed = {k for k in now.keys() | before.keys() if now.get(k) != before.get(k)}
        if changed == {"lr_grid"} and grid_extension_allowed(config, before):
            changed = set()
            if process.is_main:
                (out / "picked_lr.json").unlink(missing_ok=True)  # picked again over the new grid
        if changed:
            raise ConfigError(
                f"{out} holds a comparison with other settings ({sorted(changed)}); "
                "use a new --out, or the same settings to resume it"
            )
    # every process has read the old file before process 0 replaces it (atomically, so that a
    # reader never sees it half-written)
    barrier()
    if process.is_main:
        write_json_atomic(
            pinned,
            {
                "settings": settings,
                "methods": config.methods,
                "seeds": config.seeds,
                "ranks": config.ranks,
            },
        )


def check_runs_can_start(config: CompareConfig, task: Any) -> None:
    """Refuse, before anything is written, what would make every run fail: data that cannot
    give the train size or validation share (``carve_splits``), a model that cannot be loaded,
    and targets or a largest rank it cannot take. Loads the model once (seconds), so that such a
    mistake is one clear error instead of an ``error.txt`` in every run directory."""
    base = config.base
    for method in config.methods:  # their options (a NaN λ, ...), as each run would build them
        get_method(method, method_options(base, progress=False))
    kind = task_kind(carve_splits(task, base), base)
    model = kind.load_model(base.model, seed=0)
    targets = list(base.targets) if base.targets else default_targets(model, verbose=False)
    chosen = resolve_targets(model, targets, rank=max(config.ranks))
    allocators = [
        m
        for m in config.methods
        if {base_method(p.strip()) for p in m.split("+")} & {"fim-lora", "random-rank"}
    ]
    if base.r_max is not None and allocators:  # an r_max some layer could not take
        named = dict(model.named_modules())
        check_rank_fits({name: named[name] for name in chosen}, base.r_max, what="r_max")


def grid_extension_allowed(config: CompareConfig, before: dict[str, Any]) -> bool:
    """Whether ``config``'s lr grid may replace the pinned one: it holds every pinned rate (the
    finished tuning runs stay valid) and no final run has finished (none ran at a pick the wider
    grid could change). This is how a grid whose picks sit at an edge is widened."""
    old, new = before.get("lr_grid"), config.lr_grid
    if not old or not new or not set(old) <= set(new):
        return False
    finals = (
        config.run_dir(r, m, s) for r in config.ranks for m in config.methods for s in config.seeds
    )
    return not any(is_finished(d) for d in finals)


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").exists()


def _run_all(
    runs: list[tuple[TrainConfig, str]], task, process: Process, progress: bool, what: str
) -> None:
    """Train every unfinished run; a failure is recorded in the run's ``error.txt`` and the
    others go on (under torch.distributed it stops every process instead)."""
    todo = [(c, label) for c, label in runs if not is_finished(Path(c.out))]
    if progress and runs and len(todo) < len(runs):
        print(f"{what}: {len(runs) - len(todo)} of {len(runs)} runs already finished; resuming")
    bar = tqdm(todo, desc=what, unit="run", disable=not progress or not todo)
    for run_config, label in bar:
        bar.set_postfix_str(label)
        run_dir = Path(run_config.out)
        (run_dir / "error.txt").unlink(missing_ok=True)
        try:
            train(run_config, task=task, progress=progress)
        except (FisherLoraError, FloatingPointError, RuntimeError, ValueError) as err:
            if process.distributed:
                raise
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(
                f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}"
            )
            bar.write(f"{label} failed: {err}")
    bar.close()


def tuning_scores(config: CompareConfig) -> list[dict[str, Any]]:
    """One row per tuning run: rank, method, lr, seed and its validation accuracy / NLL (NaN for
    a run that failed, e.g. diverged; absent for one not run yet)."""
    rows = []
    for rank, method, lr, seed in config.tuning_runs():
        run_dir = config.tune_dir(rank, method, lr, seed)
        row = {"rank": rank, "method": method, "lr": lr, "seed": seed}
        if is_finished(run_dir):
            m = json.loads((run_dir / "metrics.json").read_text())
            # an -lm task has no accuracy
            accuracy = m.get("val_accuracy", math.nan)
            rows.append(row | {"val_accuracy": accuracy, "val_nll": m["val_nll"]})
        elif (run_dir / "error.txt").exists():
            rows.append(row | {"val_accuracy": math.nan, "val_nll": math.nan})
    return rows


def _grid_score(values: list[tuple[float, float]], by: str = "accuracy") -> tuple[float, float]:
    """One rate's tuning runs as a score where larger is better: by accuracy, (mean validation
    accuracy, −mean validation NLL); by NLL, (−mean validation NLL, 0). A failed (diverged) run,
    or one whose score is not finite, makes the rate unusable (−inf). The means are rounded to
    12 decimals, so that rates whose accuracies tie (counts / n summed in another order) go to
    the NLL, as documented, not to float noise."""
    read = (
        [(a, nll) for a, nll in values] if by == "accuracy" else [(0.0, nll) for _, nll in values]
    )
    if not all(math.isfinite(accuracy) and math.isfinite(nll) for accuracy, nll in read):
        return (-math.inf, -math.inf)
    n = len(read)
    mean_accuracy = round(sum(a for a, _ in read) / n, 12)
    neg_nll = round(-sum(nll for _, nll in read) / n, 12)
    return (mean_accuracy, neg_nll) if by == "accuracy" else (neg_nll, 0.0)


SELECTION_RULES = {
    "accuracy": "max mean val_accuracy, ties: min mean val_nll",
    "nll": "min mean val_nll",
}


def pick_learning_rates(config: CompareConfig) -> dict[tuple[int, str], float]:
    """The rate of the grid with the best mean validation accuracy over the tuning seeds, per
    (rank, method); ties go to the lower mean validation NLL, a failed run ranks below every
    finished one, and a (rank, method) whose tuning runs all failed gets no rate. With
    ``select_by="nll"`` (an -lm task's default) the rate with the lowest mean validation NLL.

    The picks are pinned in ``OUT/picked_lr.json`` as soon as every tuning run is finished or
    failed, so that a resumed comparison runs its remaining seeds at the same rates. A method
    added to the comparison afterwards gets its own pick once its tuning runs are done; the
    pinned picks stay as they are."""
    pinned = Path(config.out) / "picked_lr.json"
    saved = json.loads(pinned.read_text())["picked"] if pinned.exists() else []
    kept = {(p["rank"], p["method"]): p for p in saved}
    wanted = {(rank, method) for rank, method, _, _ in config.tuning_runs()}
    if saved and wanted <= kept.keys():
        return {key: p["lr"] for key, p in kept.items()}
    by_key: dict[tuple[int, str], dict[float, list[tuple[float, float]]]] = {}
    for row in tuning_scores(config):
        per_lr = by_key.setdefault((row["rank"], row["method"]), {})
        per_lr.setdefault(row["lr"], []).append((row["val_accuracy"], row["val_nll"]))
    picked = {key: p["lr"] for key, p in kept.items()}
    table = list(saved)
    by = config.selection
    for key, per_lr in by_key.items():
        if key in kept:  # pinned: its final runs may have run at it
            continue
        scores = {lr: _grid_score(values, by) for lr, values in per_lr.items()}
        best = max(sorted(scores), key=scores.__getitem__)
        if scores[best][0] == -math.inf:
            continue
        picked[key] = best
        accuracies, nlls = zip(*per_lr[best], strict=True)
        table.append(
            {
                "rank": key[0],
                "method": key[1],
                "lr": best,
                "val_accuracy": sum(accuracies) / len(accuracies),
                "val_nll": sum(nlls) / len(nlls),
            }
        )
    if len(tuning_scores(config)) == len(config.tuning_runs()) and is_main_process():
        write_json_atomic(pinned, {"rule": SELECTION_RULES[by], "picked": table})
    return picked


def compare(config: CompareConfig, *, progress: bool = True, command: str = "") -> Path:
    """Run every unfinished run of ``config``, then write the report; returns ``report.md``.

    A run that fails records ``error.txt`` in its directory and the comparison goes on; the
    report lists it (under torch.distributed a failure stops every process instead, since the
    others would wait for it in a collective). Interrupting (Ctrl-C) stops at once; rerunning
    resumes.
    """
    process, _ = init_distributed(resolve_device(config.base.device))
    progress = progress and process.is_main
    # the data and the model first: a mistake there must not pin OUT/compare.json with settings
    # that a corrected rerun would then be refused for
    task = load_data(config.base)  # text, generation or image data, as `fisherlora train` loads it
    check_runs_can_start(config, task)
    check_out_dir(config, process)
    barrier()  # no process looks for finished runs before compare.json is checked
    # tuning runs first (validation only), then the final seeds at the picked rates
    tuning = [
        (config.run_config(rank, m, seed, lr, "tune"), f"r={rank} {m} lr {lr:g} seed {seed} (tune)")
        for rank, m, lr, seed in config.tuning_runs()
    ]
    _run_all(tuning, task, process, progress, "tune")
    picked = pick_learning_rates(config) if config.lr_grid else {}
    finals = []
    for seed in config.seeds:
        for rank in config.ranks:
            for method in config.methods:
                lr = picked.get((rank, method), config.base.lr) if config.lr_grid else None
                if config.lr_grid and (rank, method) not in picked:
                    continue  # every tuning run of it failed: nothing to run the seeds at
                finals.append(
                    (config.run_config(rank, method, seed, lr), f"r={rank} {method} seed {seed}")
                )
    _run_all(finals, task, process, progress, "compare")
    report = Path(config.out) / "report.md"
    if process.is_main:
        report = write_report(config, command=command)
    barrier()
    if not any(is_finished(Path(c.out)) for c, _ in finals):
        # the report lists the failures; a comparison without one result is no success
        raise FisherLoraError(
            f"no run of the comparison finished: every one failed (their error.txt files under "
            f"{config.out}, listed in {report})"
        )
    return report
