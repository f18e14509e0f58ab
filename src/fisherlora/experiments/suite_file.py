"""A suite's file: the TOML format, its checks, and the cells it defines.

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
``tune_seeds``, ``select_by`` (the validation score the grid picks by: ``accuracy`` or ``nll``;
``nll`` for a ``-lm`` task). A suite's ``val_fraction`` defaults to 0.1 (the validation split the
learning-rate grid and ``val_auc`` need); everything else defaults as in ``fisherlora compare``.
Unknown keys, wrong types, a ``-lm`` task picked by accuracy, a cell without ``lora`` (the
baseline of the pooled view) and every setting a comparison would refuse are refused, naming
the file and cell, before anything runs (:func:`parse_suite` builds every cell's comparison).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fisherlora.errors import ConfigError

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
    "select_by",
)
# TrainConfig fields a comparison sets per run: a suite may not set them (and what to use instead)
MANAGED_KEYS = {
    "method": "methods",
    "seed": "seeds",
    "out": "the suite's --out (each cell runs in OUT/<name>/)",
    "phase": "lr_grid / tune_seeds (the comparison makes the tuning and final runs)",
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
    "select_by": None,  # None: NLL for an -lm task, accuracy otherwise
}
CELL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _train_fields() -> dict[str, dataclasses.Field]:
    from fisherlora.experiments.train import TrainConfig

    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def train_keys() -> list[str]:
    """The run settings a cell may set: TrainConfig's fields except those the comparison sets
    per run and ``rank``/``alpha`` (the comparison's)."""
    return [n for n in _train_fields() if n not in MANAGED_KEYS and n not in ("rank", "alpha")]


def train_defaults() -> dict[str, Any]:
    """TrainConfig's default for every key of :func:`train_keys`."""
    defaults: dict[str, Any] = {}
    fields = _train_fields()
    for name in train_keys():
        f = fields[name]
        if f.default is not dataclasses.MISSING:
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
        "select_by": (str,),
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

    def compare_config(self, out: str | Path) -> CompareConfig:
        """The cell's comparison into ``out`` (validated by TrainConfig and CompareConfig)."""
        from fisherlora.experiments.compare import CompareConfig
        from fisherlora.experiments.train import TrainConfig

        base = self.train_settings()
        base["rank"] = self.ranks[0]  # each run sets its own; keeps TrainConfig's checks honest
        try:
            config = TrainConfig(**base)
            # without a grid the tuning seeds stay CompareConfig's default (as a resumed
            # comparison's pinned settings recorded them)
            extra: dict[str, Any] = {"tune_seeds": self.tune_seeds} if self.lr_grid else {}
            return CompareConfig(
                lr_grid=list(self.lr_grid) if self.lr_grid else None,
                methods=self.methods,
                seeds=self.seeds,
                ranks=self.ranks,
                out=str(out),
                base=config,
                alpha_ratio=float(self.settings["alpha_ratio"]),
                alpha=self.settings["alpha"],
                select_by=self.settings.get("select_by"),
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
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"suite file {path}: not UTF-8 text ({err.reason} at byte {err.start})"
        ) from err


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
        if name.lower().startswith("suite"):  # OUT/suite.json, suite_report.*, suite_plots/
            raise ConfigError(
                f"{where}: cell names starting with 'suite' are the suite's own files in OUT"
            )
        if name.lower() in seen:  # one folder on a case-insensitive file system
            raise ConfigError(f"{source}: two cells are named {name!r} (case ignored)")
        seen.add(name.lower())
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
    if task.endswith("-lm") and merged.get("select_by") == "accuracy":
        raise ConfigError(
            f"{where}: task {task!r} is language modelling (-lm), which has no accuracy; this "
            "cell picks learning rates by accuracy. Leave select_by out (-lm picks by NLL)"
        )
    try:
        methods = merged["methods"]
        if isinstance(methods, list):
            if not all(isinstance(m, str) for m in methods):
                raise ConfigError(f"methods must be names, got {methods!r}")
            methods = ",".join(methods)
        if methods is not None and not methods.strip():  # not "every method", silently
            raise ConfigError("methods names nothing; leave it out to run every method")
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
        fraction = merged.get("val_fraction")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise ConfigError(f"val_fraction must be a number in (0, 0.5], got {fraction!r}")
        if not 0 < fraction <= 0.5:
            # a suite selects on validation and reads test once per final run: no way to
            # turn validation off (evaluations would read test), unlike `fisherlora train`
            raise ConfigError(f"val_fraction must be in (0, 0.5], got {fraction!r}")
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
