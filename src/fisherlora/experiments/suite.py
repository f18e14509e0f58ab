"""``fisherlora suite``: one comparison per cell of a grid, then a pooled report across cells.

A *suite* is a TOML file (or a built-in name: ``cpu``, ``gpu``; see ``fisherlora/suites/``)::

    [suite]
    name = "my-suite"
    description = "what it is for"

    [defaults]            # every cell starts from these
    model = "minilm"
    methods = ["lora", "fim-lora", "filet"]
    seeds = [0, 1, 2, 3, 4]
    lr_grid = [3e-4, 1e-3, 3e-3]
    tune_seeds = [100]

    [[cell]]              # one comparison; its keys override the defaults
    name = "rt-r1"        # the cell's directory: OUT/rt-r1/
    task = "rotten-tomatoes"
    rank = 1
    steps = 150

A cell's keys are ``fisherlora compare``'s settings: every field of ``TrainConfig`` (``task``,
``model``, ``steps``, ``batch_size``, ``max_length``, ``lr``, ``train_size``, ``val_fraction``,
``eval_every``, ``max_test``, ``targets``, ``weight_decay``, ...) except those a comparison sets
per run (``method``, ``seed``, ``out``, ``phase``), plus the comparison's own: ``methods`` (list or
comma string), ``seeds``, ``rank`` or ``ranks``, ``alpha``, ``alpha_ratio``, ``lr_grid``,
``tune_seeds``. A suite's ``val_fraction`` defaults to 0.1 (the validation split the learning-rate
grid and ``val_auc`` need); everything else defaults as in ``fisherlora compare``. Unknown keys,
wrong types, a ``-lm`` task (a comparison ranks by accuracy), a cell without ``lora`` (the
baseline of the pooled view) and every setting a comparison would refuse are refused, naming
the file and cell, before anything runs.

Running: every cell is a resumable ``compare`` into ``OUT/<cell>/`` (rerunning the same command
skips finished runs); a cell that fails is recorded (``OUT/<cell>/suite_error.txt``) and the
others go on. Then ``OUT/suite_report.md``, ``OUT/suite_report.html`` (self-contained) and
``OUT/suite_results.csv`` (every cell's final runs, with a ``cell`` column) are written.

The pooled statistics (:func:`cell_differences`, :func:`pooled_differences`) are documented
where they are computed; ``--dry-run`` (:func:`estimate_suite`) prints the cells, their runs and
an estimate of the hours from step times measured on a 2-core CPU (:data:`STEP_TIMES`).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import math
import re
import shlex
import sys
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fisherlora.errors import ConfigError, FisherLoraError

if TYPE_CHECKING:
    from fisherlora.experiments.compare import CompareConfig

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]

BASELINE = "lora"
BUILTIN_SUITES = ("cpu", "gpu")

# --- the suite file -----------------------------------------------------------------------------

TOP_LEVEL_KEYS = ("suite", "defaults", "cell")
SUITE_KEYS = ("name", "description")
# keys of a cell that are neither TrainConfig's nor the comparison's
CELL_ONLY_KEYS = ("name", "description")
# the comparison's own settings
COMPARE_KEYS = (
    "methods",
    "seeds",
    "rank",
    "ranks",
    "alpha",
    "alpha_ratio",
    "lr_grid",
    "tune_seeds",
)
# TrainConfig fields a comparison sets per run: a suite may not set them (and what to use instead)
MANAGED_KEYS = {
    "method": "methods",
    "seed": "seeds",
    "out": "the suite's --out (each cell runs in OUT/<name>/)",
    "phase": "lr_grid / tune_seeds (the comparison makes the tuning and final runs)",
}
# Settings of the run that newer TrainConfigs have; a suite file may use them before the installed
# one has them (parsing and --dry-run work; running refuses, naming them).
FUTURE_TRAIN_KEYS: dict[str, tuple[type, ...]] = {
    "val_fraction": (int, float),
    "train_size": (int,),
}
# a suite's defaults on top of TrainConfig's and the comparison's
SUITE_DEFAULTS: dict[str, Any] = {
    "val_fraction": 0.1,
    "methods": None,  # None: every method (compare.ALL_METHODS)
    "seeds": [0, 1, 2],
    "tune_seeds": [100],
    "lr_grid": None,
    "alpha_ratio": 2.0,
    "alpha": None,
}
CELL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _train_fields() -> dict[str, dataclasses.Field]:
    from fisherlora.experiments.train import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _compare_fields() -> set[str]:
    from fisherlora.experiments.compare import CompareConfig

    return {f.name for f in dataclasses.fields(CompareConfig)}


def train_keys() -> list[str]:
    """The run settings a cell may set: TrainConfig's fields (and :data:`FUTURE_TRAIN_KEYS`)
    except those the comparison sets per run and ``rank``/``alpha`` (the comparison's)."""
    names = [n for n in _train_fields() if n not in MANAGED_KEYS and n not in ("rank", "alpha")]
    return names + [n for n in FUTURE_TRAIN_KEYS if n not in names]


def train_defaults() -> dict[str, Any]:
    """TrainConfig's default for every key of :func:`train_keys` (None for a future key)."""
    defaults: dict[str, Any] = {}
    fields = _train_fields()
    for name in train_keys():
        f = fields.get(name)
        if f is None:
            defaults[name] = None
        elif f.default is not dataclasses.MISSING:
            defaults[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[name] = f.default_factory()
    return defaults


def known_keys() -> list[str]:
    return [*CELL_ONLY_KEYS, *COMPARE_KEYS, *train_keys()]


_ANNOTATION_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "list[str]": (list, str),  # a list, or one comma-separated string
    "None": (),
}


def _expected_types(key: str) -> tuple[type, ...] | None:
    """The TOML value types ``key`` accepts; None: not checked here (TrainConfig checks it)."""
    special: dict[str, tuple[type, ...]] = {
        "name": (str,),
        "description": (str,),
        "methods": (list, str),
        "seeds": (list, int, str),
        "tune_seeds": (list, int, str),
        "rank": (int,),
        "ranks": (list, int, str),
        "alpha": (int, float),
        "alpha_ratio": (int, float),
        "lr_grid": (list,),
        **FUTURE_TRAIN_KEYS,
    }
    if key in special:
        return special[key]
    annotation = _train_fields()[key].type
    parts = [p.strip() for p in str(annotation).split("|")]
    if any(p not in _ANNOTATION_TYPES for p in parts):
        return None
    return tuple(t for p in parts for t in _ANNOTATION_TYPES[p])


def _check_types(table: Mapping[str, Any], where: str) -> None:
    for key, value in table.items():
        expected = _expected_types(key)
        if expected is None:
            continue
        # TOML's true/false must not pass for a number (bool is an int in Python)
        ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
        if not ok:
            names = sorted({t.__name__ for t in expected})
            raise ConfigError(
                f"{where}: {key} must be {' or '.join(names)}, got {type(value).__name__} {value!r}"
            )


def _check_keys(table: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    managed = sorted(k for k in table if k in MANAGED_KEYS)
    if managed:
        raise ConfigError(
            f"{where}: a suite does not set {', '.join(managed)} (the comparison sets them per "
            "run); use " + "; ".join(f"{k}: {MANAGED_KEYS[k]}" for k in managed)
        )
    unknown = sorted(k for k in table if k not in allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"known keys are {', '.join(sorted(allowed))}"
        )


def _int_list(value: Any, what: str, minimum: int) -> list[int]:
    from fisherlora.experiments.compare import parse_ints

    if isinstance(value, list):
        if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ConfigError(f"{what} must be whole numbers, got {value!r}")
        value = ",".join(map(str, value))
    return parse_ints(str(value), what, minimum=minimum)


@dataclass(frozen=True)
class Cell:
    """One comparison of a suite: its name and its settings (the defaults with its own keys over
    them), normalised: ``methods``, ``seeds``, ``ranks``, ``tune_seeds`` are lists, ``lr_grid``
    a list of floats or None, ``targets`` a list or None."""

    name: str
    settings: dict[str, Any]
    description: str = ""
    source: str = ""

    @property
    def where(self) -> str:
        return f"{self.source}: cell {self.name!r}"

    @property
    def methods(self) -> list[str]:
        return list(self.settings["methods"])

    @property
    def seeds(self) -> list[int]:
        return list(self.settings["seeds"])

    @property
    def ranks(self) -> list[int]:
        return list(self.settings["ranks"])

    @property
    def lr_grid(self) -> list[float] | None:
        return self.settings["lr_grid"]

    @property
    def tune_seeds(self) -> list[int]:
        return list(self.settings["tune_seeds"]) if self.lr_grid else []

    def run_counts(self) -> tuple[int, int]:
        """(tuning runs, final runs): every (rank, method) at every grid rate and tuning seed,
        then at every final seed."""
        per_point = len(self.ranks) * len(self.methods)
        tune = per_point * len(self.lr_grid or []) * len(self.tune_seeds)
        return tune, per_point * len(self.seeds)

    def train_settings(self) -> dict[str, Any]:
        keys = set(train_keys())
        return {k: v for k, v in self.settings.items() if k in keys}

    def unsupported(self) -> list[str]:
        """Settings this cell uses that the installed TrainConfig / CompareConfig lack."""
        train_fields, compare_fields = _train_fields(), _compare_fields()
        missing = [
            k
            for k in FUTURE_TRAIN_KEYS
            if k not in train_fields and self.settings.get(k) not in (None, 0)
        ]
        if self.lr_grid and "lr_grid" not in compare_fields:
            missing += ["lr_grid", "tune_seeds"]
        return missing

    def compare_config(self, out: str | Path) -> CompareConfig:
        """The cell's comparison into ``out`` (validated by TrainConfig and CompareConfig).

        Settings the installed configs lack (:meth:`unsupported`) are left out, so that a suite
        parses and dry-runs everywhere; :func:`run_suite` refuses to run such a cell."""
        from fisherlora.experiments.compare import CompareConfig
        from fisherlora.experiments.train import TrainConfig

        train_fields, compare_fields = _train_fields(), _compare_fields()
        base = {k: v for k, v in self.train_settings().items() if k in train_fields}
        base["rank"] = self.ranks[0]  # each run sets its own; keeps TrainConfig's checks honest
        try:
            config = TrainConfig(**base)
            extra: dict[str, Any] = {}
            if "lr_grid" in compare_fields:
                extra["lr_grid"] = list(self.lr_grid) if self.lr_grid else None
            if "tune_seeds" in compare_fields and self.lr_grid:
                extra["tune_seeds"] = self.tune_seeds
            return CompareConfig(
                methods=self.methods,
                seeds=self.seeds,
                ranks=self.ranks,
                out=str(out),
                base=config,
                alpha_ratio=float(self.settings["alpha_ratio"]),
                alpha=self.settings["alpha"],
                **extra,
            )
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{self.where}: {err}") from err


@dataclass(frozen=True)
class Suite:
    """A named list of cells, read from ``source``."""

    name: str
    description: str
    source: str
    cells: list[Cell] = field(default_factory=list)

    def run_counts(self) -> tuple[int, int]:
        counts = [c.run_counts() for c in self.cells]
        return sum(t for t, _ in counts), sum(f for _, f in counts)


def builtin_suite_path(name: str) -> Path:
    return Path(str(resources.files("fisherlora") / "suites" / f"{name}.toml"))


def resolve_suite(spec: str) -> tuple[str, str]:
    """(TOML text, where it came from) for a built-in name or a file path."""
    if spec in BUILTIN_SUITES:
        path = builtin_suite_path(spec)
        return path.read_text(encoding="utf-8"), f"built-in suite {spec!r}"
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(
            f"unknown suite {spec!r}: not a built-in suite ({', '.join(BUILTIN_SUITES)}) and "
            "no such file"
        )
    return path.read_text(encoding="utf-8"), str(path)


def load_suite(spec: str) -> Suite:
    """Read and check a suite (built-in name or TOML file); every cell is validated by building
    its comparison, so bad input is refused here, before anything runs."""
    text, source = resolve_suite(spec)
    return parse_suite(text, source)


def parse_suite(text: str, source: str = "suite") -> Suite:
    """A suite from TOML text (see the module docstring for the format)."""
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise ConfigError("reading a suite file needs Python >= 3.11 or the 'tomli' package")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from err
    unknown = sorted(k for k in data if k not in TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)}; a suite has [suite], [defaults] and [[cell]] entries"
        )
    header = data.get("suite", {})
    defaults = data.get("defaults", {})
    cells = data.get("cell", [])
    if not isinstance(header, dict) or not isinstance(defaults, dict):
        raise ConfigError(f"{source}: [suite] and [defaults] must be tables")
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise ConfigError(f"{source}: cells must be [[cell]] tables")
    _check_keys(header, SUITE_KEYS, f"{source}: [suite]")
    _check_types(header, f"{source}: [suite]")
    allowed = known_keys()
    _check_keys(defaults, [k for k in allowed if k != "name"], f"{source}: [defaults]")
    _check_types(defaults, f"{source}: [defaults]")
    if not cells:
        raise ConfigError(f"{source}: no [[cell]] entries")
    built, seen = [], set()
    for i, table in enumerate(cells):
        where = f"{source}: cell {table.get('name', f'#{i + 1}')!r}"
        _check_keys(table, allowed, where)
        _check_types(table, where)
        name = table.get("name")
        if name is None:
            raise ConfigError(f"{source}: cell #{i + 1} has no name (it names OUT/<name>/)")
        if not CELL_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: a cell name is a directory name: letters, digits, '.', '_', '-'"
            )
        if name in seen:
            raise ConfigError(f"{source}: two cells are named {name!r}")
        seen.add(name)
        built.append(_build_cell(name, defaults, table, source))
    suite = Suite(
        name=header.get("name", Path(source).stem),
        description=header.get("description", ""),
        source=source,
        cells=built,
    )
    for cell in suite.cells:
        cell.compare_config(Path("suite-check") / cell.name)  # raises ConfigError naming the cell
    return suite


def _build_cell(
    name: str, defaults: Mapping[str, Any], table: Mapping[str, Any], source: str
) -> Cell:
    from fisherlora.experiments.presets import ALL_METHODS
    from fisherlora.methods import method_names

    where = f"{source}: cell {name!r}"
    for layer, label in ((defaults, "[defaults]"), (table, where)):
        if "rank" in layer and "ranks" in layer:
            raise ConfigError(f"{label}: give rank or ranks, not both")
    merged: dict[str, Any] = train_defaults() | SUITE_DEFAULTS
    merged |= {k: v for k, v in defaults.items() if k != "description"}
    if "rank" in table or "ranks" in table:  # the cell's rank replaces the defaults' ranks
        merged.pop("rank", None)
        merged.pop("ranks", None)
    merged |= {k: v for k, v in table.items() if k not in CELL_ONLY_KEYS}
    task = str(merged["task"])
    if task.endswith("-lm"):
        raise ConfigError(
            f"{where}: task {task!r} is language modelling (-lm), which has no accuracy; a suite "
            "compares methods by accuracy. Use a classification task or its -gen form"
        )
    try:
        methods = merged["methods"]
        if isinstance(methods, list):
            if not all(isinstance(m, str) for m in methods):
                raise ConfigError(f"methods must be names, got {methods!r}")
            methods = ",".join(methods)
        merged["methods"] = method_names(methods or ALL_METHODS)
        merged["seeds"] = _int_list(merged["seeds"], "seeds", minimum=0)
        merged["tune_seeds"] = _int_list(merged["tune_seeds"], "tune_seeds", minimum=0)
        if "ranks" in merged:
            merged["ranks"] = _int_list(merged.pop("ranks"), "ranks", minimum=1)
        else:
            merged["ranks"] = [int(merged.pop("rank", _train_fields()["rank"].default))]
        if merged["ranks"][0] < 1:
            raise ConfigError(f"rank must be >= 1, got {merged['ranks'][0]}")
        grid = merged["lr_grid"]
        if grid is not None:
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in grid):
                raise ConfigError(f"lr_grid must be numbers, got {grid!r}")
            if any(not (math.isfinite(v) and v > 0) for v in grid):
                raise ConfigError(f"lr_grid rates must be positive, got {grid!r}")
            if len(set(grid)) != len(grid):
                raise ConfigError(f"lr_grid lists a rate twice: {grid!r}")
            merged["lr_grid"] = [float(v) for v in grid] or None  # [] turns the grid off
        if merged["lr_grid"] and not merged.get("val_fraction"):
            raise ConfigError(
                "an lr_grid is tuned on a validation split: set val_fraction > 0 (e.g. 0.1)"
            )
        targets = merged.get("targets")
        if isinstance(targets, str):
            merged["targets"] = [t.strip() for t in targets.split(",") if t.strip()]
        elif isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"targets must be module names, got {targets!r}")
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from err
    if BASELINE not in merged["methods"]:
        raise ConfigError(
            f"{where}: methods must include {BASELINE!r}, the baseline every other method is "
            f"compared with; got {','.join(merged['methods'])}"
        )
    return Cell(name, merged, str(table.get("description", "")), source)


# --- the dry run: runs and an estimate of the hours ----------------------------------------------


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
    timings lack a part."""
    try:
        steps = int(settings["steps"])
        typical = float(timings["median_step_s"]) * steps
        rest = float(timings["total_s"]) - float(timings["train_s"])
    except (KeyError, TypeError, ValueError):
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
    suite's estimate follows this machine). ``est_hours`` is NaN where a model or task was never
    measured (see :data:`STEP_TIMES`, :data:`TASK_TOKENS`)."""
    rows = []
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
        "(fisherlora.experiments.suite.STEP_TIMES), scaled by the finished runs' measured times"
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


# --- running ---------------------------------------------------------------------------------


def check_resumable(suite: Suite, out: str | Path) -> None:
    """Refuse, before anything runs, a cell this installation cannot run (settings its
    TrainConfig / CompareConfig lack) or one whose directory holds a comparison with other
    settings (``compare`` would refuse it after the earlier cells had run)."""
    from fisherlora.experiments import compare as compare_module

    for cell in suite.cells:
        missing = cell.unsupported()
        if missing:
            raise ConfigError(
                f"{cell.where}: this installation's comparison does not support "
                f"{', '.join(missing)} yet; update fisherlora or remove them from the cell"
            )
        config = cell.compare_config(Path(out) / cell.name)
        pinned = Path(out) / cell.name / "compare.json"
        if pinned.exists():
            # settings that older comparisons did not record, at the values they ran with
            legacy = getattr(compare_module, "LEGACY_SETTINGS", {})
            before = legacy | json.loads(pinned.read_text()).get("settings", {})
            settings = legacy | config.shared_settings()
            changed = sorted(
                k
                for k in settings.keys() | before.keys()
                if k != "world_size" and settings.get(k) != before.get(k)
            )
            if changed:
                raise ConfigError(
                    f"{cell.where}: {pinned.parent} holds a comparison with other settings "
                    f"({', '.join(changed)}); use a new --out, or the suite as it was to resume"
                )


def run_suite(
    suite: Suite,
    out: str | Path,
    *,
    progress: bool = True,
    command: str = "",
    report_only: bool = False,
) -> Path:
    """Run (or resume) every cell's comparison into ``OUT/<cell>/``, then write the suite
    report; returns ``suite_report.md``.

    A cell that fails (an error its comparison raises) leaves ``OUT/<cell>/suite_error.txt`` and
    the next cell runs; Ctrl-C stops at once and rerunning resumes. ``report_only`` trains nothing:
    it rewrites each started cell's comparison report from its finished runs, then the suite's.
    """
    from fisherlora.experiments import compare as compare_module
    from fisherlora.experiments.distributed import is_main_process
    from fisherlora.experiments.report import write_report

    out = Path(out)
    check_resumable(suite, out)
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
    for i, cell in enumerate(suite.cells):
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
            print(f"[{i + 1}/{len(suite.cells)}] cell {cell.name}: {tune + final} runs")
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


# --- pooled statistics ---------------------------------------------------------------------------

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
    # metrics agreeing to 12 decimals are equal (as report.paired_t treats them)
    return np.round(d, 12), seeds


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
      gives the fewest paired seeds of a stratum.
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
            rng = np.random.default_rng(seed)
            boot = np.zeros(n_bootstrap)
            for d in strata:
                picks = rng.integers(0, len(d), size=(n_bootstrap, len(d)))
                boot += d[picks].mean(axis=1)
            boot /= len(strata)
            delta = float(np.mean([d.mean() for d in strata]))
            low, high = np.percentile(boot, [tail, 100 - tail])
            verdicts = cells["verdict"].value_counts()
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


# --- the suite report ----------------------------------------------------------------------------


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
        csv = cell_dir / "results.csv"
        runs = pd.DataFrame()
        if csv.exists() and csv.stat().st_size > 0:
            try:
                runs = pd.read_csv(csv)
            except pd.errors.EmptyDataError:
                runs = pd.DataFrame()
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


def picked_rates(suite: Suite, out: str | Path) -> pd.DataFrame:
    """The learning rate each (cell, rank, method) was run at after tuning (``picked_lr.csv``)."""
    frames = []
    for cell in suite.cells:
        path = Path(out) / cell.name / "picked_lr.csv"
        if path.exists():
            frame = pd.read_csv(path)
            frame.insert(0, "cell", cell.name)
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
                "Δ acc [95 % CI]": "baseline"
                if method == BASELINE
                else _delta_ci(diffs.loc["accuracy"] if "accuracy" in diffs.index else None),
                "Δ NLL [95 % CI]": "baseline"
                if method == BASELINE
                else _delta_ci(diffs.loc["nll"] if "nll" in diffs.index else None),
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
                "95 % CI (bootstrap)": _ci(r["ci_low"], r["ci_high"]),
                "cells": int(r["cells"]),
                "pairs": int(r["pairs"]),
                "fewest seeds in a cell": int(r["min_pairs"]),
                "win / tie / loss": f"{r['wins']} / {r['ties']} / {r['losses']}"
                + (f" ({r['no_interval']} without interval)" if r["no_interval"] else ""),
            }
        )
    return pd.DataFrame(rows)


STATISTICS_NOTE = (
    "Δ = method − LoRA, from the final runs only (tuning runs read validation, never test), "
    "paired by seed within a cell and rank (same seed: same data order and head init; the "
    "validation split and a train_size subset are the same for every run of a cell). NLL is "
    "the held-out cross-entropy (lower is better: Δ < 0 favours the method); "
    "validation AUC is the mean validation accuracy over the evaluation points (the normalised "
    "area under the validation curve; higher is better). Pooled Δ = the mean over cells of each "
    "cell's mean per-seed difference (every cell weighs the same; a cell with several ranks "
    "counts once per rank). Its 95 % CI is a stratified bootstrap: 10,000 resamples of the "
    "seeds with replacement within each cell, fixed generator seed, 2.5/97.5 percentiles; it "
    "covers the spread over seeds, not the sampling of the test sets, and with few seeds per "
    "cell it is narrower than it should be (a resampled mean's variance is (n − 1)/n of sd²/n, and "
    "5 seeds allow only 126 distinct resamples). Win / tie / loss counts the cells whose "
    "paired 95 % t interval (Δ ± t(0.975, n − 1)·sd/√n) excludes 0 in the method's favour / "
    "contains 0 / excludes 0 against it; a cell with one paired seed has no interval."
)


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
        pooled = pooled_differences(results)
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
    _write_suite_markdown(out, suite, command, header, pooled_view, sections, figures)
    _write_suite_html(out, suite, command, header, pooled_view, sections, figures)
    return out / "suite_report.md"


def _markdown_table(table: pd.DataFrame) -> str:
    from fisherlora.experiments.report import _markdown_table as markdown

    return markdown(table)


def _write_suite_markdown(out, suite, command, header, pooled, sections, figures) -> None:
    lines = [f"# fisherlora suite: {suite.name}", ""]
    if suite.description:
        lines += [suite.description, ""]
    lines += [header, ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += ["## Pooled over cells", ""]
    lines += [_markdown_table(pooled) if not pooled.empty else "No paired results yet.", ""]
    lines += [STATISTICS_NOTE, ""]
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


def _write_suite_html(out, suite, command, header, pooled, sections, figures) -> None:
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
    parts.append("<h2>Pooled over cells</h2>")
    parts.append(table_html(pooled, "No paired results yet."))
    parts.append(f"<p>{html.escape(STATISTICS_NOTE)}</p>")
    parts += [embedded_figure(caption, path) for caption, path in figures]
    parts.append("<h2>Cells</h2>")
    for name, shape, table, notes in sections:
        parts.append(f"<h3>{html.escape(name)}</h3><p>{html.escape(shape)}</p>")
        parts.append(table_html(table, "No finished runs yet."))
        if notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    (out / "suite_report.html").write_text("\n".join(parts))


# --- the command ---------------------------------------------------------------------------------


def suite_command(args: argparse.Namespace, argv: Iterable[str] | None = None) -> str:
    """``fisherlora suite``: load and check the suite, then dry-run, report or run it; returns
    what to print. Bad input raises :class:`ConfigError` before anything runs."""
    suite = load_suite(args.suite)
    if args.dry_run:
        return format_dry_run(suite, estimate_suite(suite, args.out))
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
    )
    return (
        f"suite report: {report}, {report.with_suffix('.html')} and "
        f"{report.with_name('suite_results.csv')}"
    )
