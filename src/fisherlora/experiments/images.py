"""Image-classification data: the built-in ``digits``, an image folder, or a CSV of image paths.

An :class:`ImageTask` is a :class:`fisherlora.experiments.tasks.Task` whose "texts" are image
keys: a path relative to the data's root for files, ``digits/0042`` for the built-in set. So
everything a text task does, an image task does the same way: the train/test split by a stable
hash of the key (the same on every machine, wherever the folder lies), the validation split
carved from train, the low-data subsets, the fixed pseudo-random order. Images are decoded when
a batch is made (:meth:`ImageTask.image`), not held in memory.

Sources (:func:`load_image_task`):

- ``digits``: scikit-learn's 1,797 handwritten digits (8×8 grey levels 0–16, ten classes; shipped
  inside the ``scikit-learn`` package, offline), as RGB images.
- ``--data DIR``: one sub-folder per class, its image files the class's examples
  (``DIR/cat/001.png``).
- ``--data FILE.csv`` with a column ``image`` (a path, relative to the CSV's folder) and a label
  column (``--label-column``, default ``label``).

A separate ``--test-data`` (a folder or CSV of the same form) replaces the hash split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fisherlora.errors import ConfigError
from fisherlora.experiments.tasks import (
    DEFAULT_TEST_FRACTION,
    MAX_DROPPED_FRACTION,
    Task,
    _columns,
    _label_ids,
    _read_table,
    in_hash_order,
    split_by_hash,
    usable_rows,
    without_test_texts,
)

IMAGE_TASKS = ("digits",)
IMAGE_COLUMN = "image"  # the path column of an image CSV
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageTask(Task):
    """A :class:`Task` over image keys (module docstring); :meth:`image` decodes one."""

    root: Path | None = None  # files: the keys are paths relative to it
    arrays: Mapping[str, np.ndarray] | None = None  # built-in: key -> [H, W, 3] uint8

    def image(self, key: str) -> Any:
        """The RGB ``PIL.Image`` of ``key``."""
        from PIL import Image

        if self.arrays is not None:
            return Image.fromarray(self.arrays[key])
        try:
            with Image.open(self.root / key) as image:
                return image.convert("RGB")
        except OSError as err:
            raise ConfigError(f"cannot read image {self.root / key}: {err}") from err


def is_image_data(task: str, data: str | Path | None) -> bool:
    """Whether a run's ``--task`` / ``--data`` name image data (a built-in image task, a folder,
    or a CSV with an ``image`` column)."""
    if data is None:
        return task in IMAGE_TASKS
    path = Path(data)
    if path.is_dir():
        return True
    if path.suffix.lower() == ".csv" and path.is_file():
        import pandas as pd

        try:
            return IMAGE_COLUMN in pd.read_csv(path, nrows=0).columns
        except pd.errors.EmptyDataError:  # an empty file: the text loader names the problem
            return False
    return False


def load_image_task(
    name: str = "digits",
    *,
    data: str | Path | None = None,
    test_data: str | Path | None = None,
    label_column: str = "label",
    test_fraction: float = DEFAULT_TEST_FRACTION,
    max_dropped_fraction: float | None = MAX_DROPPED_FRACTION,
) -> ImageTask:
    """The image task of ``data`` (a folder or CSV) or the built-in ``name`` (module docstring)."""
    if data is None:
        if test_data is not None:
            raise ConfigError("--test-data needs --data (a training folder or CSV) as well")
        if name != "digits":
            raise ConfigError(f"unknown image task {name!r}; built-in: {list(IMAGE_TASKS)}")
        keys, labels, arrays = _digits()
        root, where = None, "digits"
    else:
        root = Path(data) if Path(data).is_dir() else Path(data).parent
        keys, labels = _labelled_images(Path(data), label_column, max_dropped_fraction)
        arrays, where, name = None, str(data), Path(data).stem or Path(data).name
    if test_data is None:
        train_k, train_l, test_k, test_l = split_by_hash(keys, labels, test_fraction)
    else:
        test_k, test_l = _labelled_images(Path(test_data), label_column, max_dropped_fraction)
        test_root = Path(test_data) if Path(test_data).is_dir() else Path(test_data).parent
        # one root for both: the test keys become relative to the training data's root
        test_k = [_relative(test_root / k, root) for k in test_k]
        # an image in both: trained on, then scored as held out
        train_k, train_l = without_test_texts(keys, labels, test_k, where)
    if not train_k or not test_k:
        raise ConfigError(
            f"{where}: {len(train_k)} training and {len(test_k)} test images; both splits need "
            "at least one"
        )
    train_ids, test_ids, class_names = _label_ids(train_l, test_l, where)
    return ImageTask(
        name,
        *in_hash_order(train_k, train_ids),
        *in_hash_order(test_k, test_ids),
        class_names,
        root=root,
        arrays=arrays,
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()  # elsewhere: an absolute key (root / abs == abs)


def _digits() -> tuple[list[str], list[int], dict[str, np.ndarray]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ConfigError(
            "task 'digits' needs scikit-learn: pip install 'fisherlora[images]'"
        ) from err
    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    keys = [f"digits/{i:04d}" for i in range(len(grey))]
    arrays = {k: np.repeat(g[:, :, None], 3, axis=2) for k, g in zip(keys, grey, strict=True)}
    return keys, [int(y) for y in digits.target], arrays


def _labelled_images(
    path: Path, label_column: str, max_dropped_fraction: float | None
) -> tuple[list[str], list]:
    """(keys relative to the data's root, raw labels) of a folder or an image CSV."""
    if path.is_dir():
        return _folder(path)
    if not path.is_file():
        raise ConfigError(f"image data {path} is neither a folder nor a file")
    images, labels = _columns(_read_table(path), path, IMAGE_COLUMN, label_column)
    # one key per file however the CSV writes its path (a.png, ./a.png, an absolute path), so
    # that a file listed twice is a repeat, and the split does not depend on where the folder is
    images = [
        _relative(path.parent / str(k), path.parent) if isinstance(k, str) and k.strip() else k
        for k in images
    ]
    keys, labels = usable_rows(images, labels, str(path), max_dropped_fraction=max_dropped_fraction)
    missing = [k for k in keys if not (path.parent / k).is_file()]
    if missing:
        raise ConfigError(
            f"{path}: {len(missing)} of {len(keys)} image paths do not exist (relative to "
            f"{path.parent}), e.g. {missing[:3]}"
        )
    _check_readable(path.parent, keys)
    return keys, labels


def _check_readable(root: Path, keys: list[str]) -> None:
    """Every image opened once (its header checked) before training, and every one that cannot
    be read named together, rather than the first one failing a run when its batch comes up."""
    from PIL import Image

    bad = []
    for key in keys:
        try:
            with Image.open(root / key) as image:
                image.verify()
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            bad.append(f"{key} ({type(err).__name__})")
    if bad:
        raise ConfigError(f"{root}: {len(bad)} image(s) cannot be read: {', '.join(bad[:5])}")


def _folder(root: Path) -> tuple[list[str], list[str]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    keys, labels = [], []
    for folder in classes:
        for file in sorted(folder.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                keys.append(file.relative_to(root).as_posix())
                labels.append(folder.name)
    if not keys:
        raise ConfigError(
            f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in class sub-folders; expected "
            f"{root}/CLASS/IMAGE, one sub-folder per class"
        )
    empty = [folder.name for folder in classes if folder.name not in set(labels)]
    if empty:  # a class without examples would silently leave the label set
        raise ConfigError(
            f"{root}: class folder(s) {empty} hold no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    _check_readable(root, keys)
    return keys, labels
