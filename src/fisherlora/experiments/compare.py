"""``fisherlora compare``: every (rank, seed, method) run of a comparison, then the report.

Runs are laid out as ``OUT/r{rank}/{method}/seed{seed}/`` (each a ``fisherlora train`` run
directory). A run is finished when its ``metrics.json`` exists: the runner writes it last and
atomically, so rerunning the same command skips finished runs and redoes only unfinished ones;
an interrupt never leaves a finished-looking run behind. ``OUT/compare.json`` pins the shared
settings, so a rerun with different settings cannot mix incomparable runs in one report.

The loop is seed-major (every method at every rank for seed 0, then for seed 1, ...), so a
comparison cut short still has paired runs of every method at every rank.

Under ``torchrun`` / ``accelerate launch`` every run is data-parallel (see ``train``); rank 0
writes ``compare.json`` and the report, and the number of processes is pinned with the other
settings (a process's batch is ``batch_size``, so other world sizes train differently).
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fisherlora.errors import ConfigError, FisherLoraError
from fisherlora.experiments.distributed import Process, barrier, init_distributed
from fisherlora.experiments.generation_tasks import is_generation_task, load_generation_task
from fisherlora.experiments.report import write_report
from fisherlora.experiments.tasks import load_task
from fisherlora.experiments.train import TrainConfig, resolve_device, train, write_json_atomic
from fisherlora.methods import method_names

ALL_METHODS = (
    "lora,fim-lora,filet,filet-svd,fw-lora,fim-lora+filet+fw-lora,random-rank,"
    "eva,pissa,adalora,lora-ga,corda,dora"
)

# The README's main command: our methods and LoRA, one seed, half the steps; <= 10 min on 2 CPUs.
QUICK = {
    "methods": "lora,fim-lora,filet,fw-lora,fim-lora+filet+fw-lora",
    "seeds": "0",
    "steps": 150,
    "eval_every": 75,
}

# Settings that vary inside a comparison (everything else must match across its runs).
VARYING = ("method", "seed", "rank", "alpha", "out")


def parse_ints(spec: str, what: str, minimum: int) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; a clear error for anything that is not such a list."""
    items = [s.strip() for s in str(spec).split(",") if s.strip()]
    try:
        values = [int(s) for s in items]
    except ValueError as err:
        raise ConfigError(f"{what} must be comma-separated whole numbers, got {spec!r}") from err
    if not values:
        raise ConfigError(f"{what} names nothing: {spec!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{what} lists a value twice: {spec!r}")
    if min(values) < minimum:
        raise ConfigError(f"{what} must be >= {minimum}, got {spec!r}")
    return values


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

    def __post_init__(self) -> None:
        method_names(",".join(self.methods))  # unknown methods / impossible combinations
        if not self.seeds or not self.ranks:
            raise ConfigError("a comparison needs at least one seed and one rank")
        if self.alpha_ratio <= 0 or (self.alpha is not None and self.alpha <= 0):
            raise ConfigError("alpha and alpha_ratio must be positive")
        if self.base.task.endswith("-lm"):
            raise ConfigError(
                "compare ranks methods by accuracy; a language-modelling task (-lm) has none. "
                "Use a classification task or its -gen form, or `fisherlora train` per method"
            )

    def run_dir(self, rank: int, method: str, seed: int) -> Path:
        return Path(self.out) / f"r{rank}" / method / f"seed{seed}"

    def run_config(self, rank: int, method: str, seed: int) -> TrainConfig:
        alpha = self.alpha if self.alpha is not None else self.alpha_ratio * rank
        return dataclasses.replace(
            self.base,
            method=method,
            seed=seed,
            rank=rank,
            alpha=alpha,
            out=str(self.run_dir(rank, method, seed)),
        )

    def shared_settings(self) -> dict[str, Any]:
        settings = {k: v for k, v in dataclasses.asdict(self.base).items() if k not in VARYING}
        return settings | {"alpha": self.alpha, "alpha_ratio": self.alpha_ratio}


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
        before = json.loads(pinned.read_text())["settings"]
        changed = {k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k)}
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


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").exists()


def compare(config: CompareConfig, *, progress: bool = True, command: str = "") -> Path:
    """Run every unfinished run of ``config``, then write the report; returns ``report.md``.

    A run that fails records ``error.txt`` in its directory and the comparison goes on; the
    report lists it (under torch.distributed a failure stops every process instead, since the
    others would wait for it in a collective). Interrupting (Ctrl-C) stops at once; rerunning
    resumes.
    """
    process, _ = init_distributed(resolve_device(config.base.device))
    progress = progress and process.is_main
    check_out_dir(config, process)
    barrier()  # no process looks for finished runs before compare.json is checked
    base = config.base
    load = load_generation_task if is_generation_task(base.task) else load_task
    task = load(
        base.task,
        data=base.data,
        test_data=base.test_data,
        text_column=base.text_column,
        label_column=base.label_column,
    )
    runs = [
        (rank, method, seed)
        for seed in config.seeds
        for rank in config.ranks
        for method in config.methods
    ]
    todo = [r for r in runs if not is_finished(config.run_dir(*r))]
    if progress and len(todo) < len(runs):
        print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; resuming")
    bar = tqdm(todo, desc="compare", unit="run", disable=not progress)
    for rank, method, seed in bar:
        bar.set_postfix_str(f"r={rank} {method} seed {seed}")
        run_dir = config.run_dir(rank, method, seed)
        (run_dir / "error.txt").unlink(missing_ok=True)
        try:
            train(config.run_config(rank, method, seed), task=task, progress=progress)
        except (FisherLoraError, FloatingPointError, RuntimeError, ValueError) as err:
            if process.distributed:
                raise
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(
                f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}"
            )
            bar.write(f"r={rank} {method} seed {seed} failed: {err}")
    bar.close()
    report = Path(config.out) / "report.md"
    if process.is_main:
        report = write_report(config, command=command)
    barrier()
    return report
