"""The training runs of the claims experiments (issue #15), beside the `cpu` suite's cell
``rt-low-data`` (MiniLM, Rotten Tomatoes, 512 training sentences, r = 8, 100 steps, 10 %
validation, seeds 0-4), with exactly that cell's settings except what an experiment changes, so
that every run pairs by seed with the cell's runs (same data subset, validation split, data
order and head init).

Each experiment is one ``fisherlora compare`` into ``OUT/<experiment>/`` (resumable: rerun the
same command). Its learning rate is either

- ``tune``: picked per method on validation from the cell's grid (3e-4, 1e-3, 3e-3, tuning
  seed 100), exactly as the suite does: for variants that compete with their method; or
- ``picked``: the rate the suite picked on validation for the method's base method in
  ``rt-low-data`` (``picked_lr.json``): for sensitivity sweeps (λ, K, calibration size), which
  ask what one setting does with everything else fixed.

The test split is read once per final run, never for a choice. `benchmarks/claims_table.py`
turns the runs into the claims table.

    python benchmarks/claims_runs.py --dry-run          # experiments, runs, hours left
    nohup python benchmarks/claims_runs.py > /tmp/claims.log 2>&1 &
    python benchmarks/claims_runs.py --only fw-lambda-0.01
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fisherlora.experiments.compare import CompareConfig, compare
from fisherlora.experiments.suite_estimate import pause_robust_seconds
from fisherlora.experiments.suite_file import load_suite
from fisherlora.methods import base_method

SUITE_OUT = Path("benchmarks/results/suite-cpu")
REFERENCE_CELL = "rt-low-data"
OUT = Path("benchmarks/results/claims/runs")


@dataclass(frozen=True)
class Experiment:
    """One comparison beside the reference cell: ``methods`` with ``settings`` changed."""

    name: str
    methods: list[str]
    question: str
    # "tune" (the cell's grid, on validation), "picked" (the base method's pick in the cell) or
    # a rate (a reference run at another arm's picked rate)
    lr: str | float = "tune"
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields to change
    rank: int | None = None  # None: the cell's


# the cell's fw-lora runs are λ = 1e-4; 5e-5 and 5e-4 bound the paper's range (its
# insensitivity claim), the others show where the penalty starts to matter
FW_LAMBDAS = (1e-5, 1e-3, 1e-2, 1e-1, 5e-5, 5e-4)

EXPERIMENTS: list[Experiment] = [
    Experiment(
        "ablations-r8",
        [
            "lora",  # LoRA again: its A's kept subspace (the runner records it since 2026-11-24)
            "fw-lora-uniform",
            "fw-lora-max",
            "fim-lora-rmin1",
            "fim-lora-max",
            "fim-lora-l2",
            "filet-max",
            "filet-random",
            "filet-svd-max",
            "filet-svd-random",
            "filet-svd-singular",
        ],
        "each paper's ablations against its method (the cell's fw-lora, fim-lora, filet, "
        "filet-svd): I ≡ 0 and max-normalised I; r_min = 1 and the max / l2 scores; FILet-P/R "
        "on both bases and singular-value magnitudes; LoRA rerun as the reference of the "
        "kept-subspace figure (and a check that the cell's LoRA runs reproduce)",
    ),
    *[
        Experiment(
            f"fw-lambda-{lam:g}",
            ["fw-lora", "fw-lora-uniform"] if lam >= 1e-2 else ["fw-lora"],
            "FW-LoRA's λ sweep at fw-lora's picked rate (with the unweighted control where the "
            "penalty is large enough to matter)",
            lr="picked",
            settings={"fw_lambda": lam},
        )
        for lam in FW_LAMBDAS
    ],
    *[
        Experiment(
            f"fw-k-{k}",
            ["fw-lora"],
            "FW-LoRA's warm-up K (the cell's runs: K = steps // 5 = 20)",
            lr="picked",
            settings={"fw_warmup_steps": k},
        )
        for k in (10, 50)
    ],
    *[
        # one experiment per method: each runs at its own pick in the reference cell
        Experiment(
            f"calib-{t}-{method}",
            [method],
            f"calibration size: {t} batch(es) of 32 (the cell's runs: 8)",
            lr="picked",
            settings={"calib_batches": t},
        )
        for t in (1, 16)
        for method in ("fim-lora", "filet")
    ],
    *[
        Experiment(
            f"ranks-r{r}",
            ["lora", "fw-lora", "fim-lora", "random-rank"]
            + (["filet", "filet-max"] if r == 4 else []),
            f"rank {r}: FIM-LoRA against random ranks and FW-LoRA against LoRA at a small budget"
            + ("; FILet's min- against max-energy directions on a second cell" if r == 4 else ""),
            rank=r,
        )
        for r in (2, 4)
    ],
    *[
        # the kept share of A's row space falls with the rate, so FILet's runs picked at 3e-3
        # (filet-svd) and 3e-4 (filet-max) are set against LoRA at the same rate
        Experiment(
            f"lora-lr-{lr:g}",
            ["lora"],
            f"LoRA at {lr:g}: the kept-subspace reference at the rate a FILet arm was picked at",
            lr=lr,
        )
        for lr in (3e-4, 3e-3)
    ],
    Experiment(
        "budget-r1",
        ["lora", "fw-lora"],
        "FW-LoRA's tiny budget: r = 1 on every default target (0.18 % of the parameters)",
        rank=1,
    ),
    Experiment(
        "budget-qv-r2",
        ["lora", "fw-lora"],
        "FW-LoRA's tiny budget: r = 2 on query and value only (0.08 % of the parameters)",
        rank=2,
        settings={"targets": ["query", "value"]},
    ),
    Experiment(
        "fw-decay",
        ["fw-lora-decay"],
        "FW-LoRA's weight-decay form (AdamW weight decay 0.01 × (1 − I_m)) against its loss form",
        settings={"weight_decay": 0.01},
    ),
]


def reference_config() -> CompareConfig:
    """The reference cell's comparison, from the installed `cpu` suite."""
    cell = {c.name: c for c in load_suite("cpu").cells}[REFERENCE_CELL]
    return cell.compare_config(SUITE_OUT / REFERENCE_CELL)


def picked_rates() -> dict[str, float]:
    """The reference cell's picked learning rate per method (rank 8)."""
    path = SUITE_OUT / REFERENCE_CELL / "picked_lr.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: the suite has not tuned {REFERENCE_CELL} yet")
    return {p["method"]: float(p["lr"]) for p in json.loads(path.read_text())["picked"]}


def experiment_config(experiment: Experiment, reference: CompareConfig, out: Path) -> CompareConfig:
    """``reference`` with the experiment's methods, rank, settings and learning-rate rule."""
    base = dataclasses.replace(reference.base, **experiment.settings)
    grid = reference.lr_grid
    if experiment.lr == "picked":
        picks = picked_rates()
        missing = sorted({base_method(m) for m in experiment.methods} - picks.keys())
        if missing:  # every tuning run of that method failed: nothing was picked
            raise SystemExit(f"{experiment.name}: {REFERENCE_CELL} picked no rate for {missing}")
        rates = {picks[base_method(m)] for m in experiment.methods}
        if len(rates) != 1:
            raise SystemExit(
                f"{experiment.name}: its methods were picked at different rates {sorted(rates)}; "
                "split it into one experiment per rate"
            )
        base = dataclasses.replace(base, lr=rates.pop())
        grid = None
    elif experiment.lr != "tune":  # a stated rate
        base = dataclasses.replace(base, lr=float(experiment.lr))
        grid = None
    return dataclasses.replace(
        reference,
        methods=list(experiment.methods),
        ranks=[experiment.rank or reference.ranks[0]],
        out=str(out / experiment.name),
        base=base,
        lr_grid=grid,
        tune_seeds=list(reference.tune_seeds) if grid else [],
    )


def _run_seconds(root: Path) -> dict[str, list[float]]:
    """Pause-robust seconds (``suite_estimate.pause_robust_seconds``) of every finished run under
    ``root``, by method."""
    runs: dict[str, list[float]] = {}
    for path in root.rglob("metrics.json"):
        metrics = json.loads(path.read_text())
        settings = json.loads(path.with_name("config.json").read_text()).get("settings", {})
        runs.setdefault(metrics["method"], []).append(
            pause_robust_seconds(metrics["timings"], settings)
        )
    return runs


def measured_seconds() -> dict[str, float]:
    """Median seconds of one finished run of each method in the reference cell."""
    return {m: statistics.median(v) for m, v in _run_seconds(SUITE_OUT / REFERENCE_CELL).items()}


def _typical(seconds: dict[str, float], method: str) -> float:
    """The reference cell's median run of ``method`` (or of the method it varies; 120 s when
    neither ran there)."""
    return seconds.get(method, seconds.get(base_method(method), 120.0))


def dry_run(configs: list[tuple[Experiment, CompareConfig]]) -> None:
    """Runs, finished runs and hours left per experiment: the reference cell's median run per
    method, scaled by how long the claims runs that finished took against that median (they
    share the CPU with the suite; the reference cell's runs partly did not)."""
    seconds = measured_seconds()
    expected = measured = 0.0
    for _, config in configs:
        for method, times in _run_seconds(Path(config.out)).items():
            expected += len(times) * _typical(seconds, method)
            measured += sum(times)
    load = measured / expected if expected > 0 else 1.0
    total_left = 0.0
    print(f"{'experiment':<16} {'methods':>7} {'lr':>7} {'runs':>5} {'done':>5} {'hours left':>10}")
    for experiment, config in configs:
        runs = len(config.tuning_runs()) + len(config.methods) * len(config.seeds)
        done = len(list(Path(config.out).rglob("metrics.json")))
        per_run = statistics.mean(_typical(seconds, m) for m in config.methods) * load
        left = max(runs - done, 0) * per_run / 3600
        total_left += left
        lr = "tune" if config.lr_grid else f"{config.base.lr:g}"
        print(
            f"{experiment.name:<16} {len(config.methods):>7} {lr:>7} {runs:>5} {done:>5} "
            f"{left:>10.1f}"
        )
    print(
        f"about {total_left:.1f} h left (the reference cell's median run per method x {load:.2f}, "
        "the finished claims runs' measured / that median)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", help="comma-separated experiment names")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    chosen = EXPERIMENTS
    if args.only:
        names = {n.strip() for n in args.only.split(",")}
        unknown = names - {e.name for e in EXPERIMENTS}
        if unknown:
            raise SystemExit(f"unknown experiments {sorted(unknown)}")
        chosen = [e for e in EXPERIMENTS if e.name in names]
    reference = reference_config()
    # the experiments that run at the reference cell's picks wait until it has pinned them
    # (after the cell is re-tuned, e.g. when a method's runs were redone)
    pinned = (SUITE_OUT / REFERENCE_CELL / "picked_lr.json").exists()
    waiting = [e.name for e in chosen if e.lr == "picked" and not pinned]
    if waiting:
        print(f"waiting for {REFERENCE_CELL}'s picked rates: {', '.join(waiting)}", flush=True)
    chosen = [e for e in chosen if e.name not in waiting]
    configs = []
    for experiment in chosen:  # one that cannot be set up is reported, the others still run
        try:
            configs.append((experiment, experiment_config(experiment, reference, args.out)))
        except SystemExit as err:
            print(f"skipped {experiment.name}: {err}", flush=True)
    if args.dry_run:
        dry_run(configs)
        return
    failed = []
    for experiment, config in configs:
        print(f"== {experiment.name}: {experiment.question}", flush=True)
        try:  # one experiment's failure (its comparison's own error) must not stop the rest
            compare(
                config, progress=not args.no_progress, command="python benchmarks/claims_runs.py"
            )
        except Exception as err:  # reported; the exit code says so
            print(f"{experiment.name} failed: {type(err).__name__}: {err}", flush=True)
            failed.append(experiment.name)
    if failed:
        raise SystemExit(f"experiments that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
