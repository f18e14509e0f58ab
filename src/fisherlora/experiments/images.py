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

An image of a user's folder or CSV is one image by its bytes (a BLAKE2b hash of the file, read
once when the data loads): a file whose bytes repeat an earlier one's, under any name, is dropped
and counted like a repeated text, and a training image whose bytes are also in ``--test-data``
leaves training. 16-bit grey images (``I;16`` modes) are scaled to 8 bits (value / 257) before
the RGB conversion; 32-bit integer (``I``) and floating-point (``F``) images are refused.
"""

from __future__ import annotations

import hashlib
import io
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fisherlora.errors import ConfigError
from fisherlora.experiments.tasks import (
    DEFAULT_TEST_FRACTION,
    IMAGE_SUFFIXES,
    MAX_DROPPED_FRACTION,
    Task,
    _columns,
    _label_ids,
    _read_table,
    in_hash_order,
    split_by_hash,
    stripped_labels,
    usable_rows,
    without_test_texts,
)

IMAGE_TASKS = ("digits",)
IMAGE_COLUMN = "image"  # the path column of an image CSV
# 16-bit grey: scaled to 8 bits (value / 257) before the RGB conversion, which would clip them
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
# 32-bit integer and floating-point grey: no standard 8-bit scale, refused when the data loads
REFUSED_MODES = ("I", "F")


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
                return to_rgb(image)
        except OSError as err:
            raise ConfigError(f"cannot read image {self.root / key}: {err}") from err


def to_rgb(image: Any) -> Any:
    """``image`` as RGB; a 16-bit grey one scaled to 8 bits first (``round(value / 257)``:
    0 -> 0, 65535 -> 255), where ``convert("RGB")`` alone would clip every value above 255 to
    white."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.round(grey / 257.0).astype(np.uint8))
    return image.convert("RGB")


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
        keys, labels, digests = _labelled_images(Path(data), label_column, max_dropped_fraction)
        arrays, where, name = None, str(data), Path(data).stem or Path(data).name
    if test_data is None:
        # a user's images are distinct by their bytes here, so no image is in both splits
        train_k, train_l, test_k, test_l = split_by_hash(keys, labels, test_fraction)
    else:
        test_k, test_l, test_digests = _labelled_images(
            Path(test_data), label_column, max_dropped_fraction
        )
        test_root = Path(test_data) if Path(test_data).is_dir() else Path(test_data).parent
        # one root for both: the test keys become relative to the training data's root
        test_k = [_relative(test_root / k, root) for k in test_k]
        # an image in both (the same bytes, under any name): trained on, then scored as held out
        _, kept = without_test_texts(
            digests, list(zip(keys, labels, strict=True)), test_digests, where
        )
        train_k, train_l = [k for k, _ in kept], [y for _, y in kept]
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
) -> tuple[list[str], list, list[str]]:
    """(keys relative to the data's root, raw labels, the hash of each file's bytes) of a folder
    or an image CSV, each image once by its bytes (:func:`_distinct_images`)."""
    if path.is_dir():
        keys, labels = _folder(path)
        digests = _check_readable(path, keys)
        return _distinct_images(keys, labels, digests, str(path), len(keys), max_dropped_fraction)
    if not path.is_file():
        raise ConfigError(f"image data {path} is neither a folder nor a file")
    images, labels = _columns(_read_table(path), path, IMAGE_COLUMN, label_column, images=True)
    labels = stripped_labels(labels)
    rows = len(images)
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
    digests = _check_readable(path.parent, keys)
    return _distinct_images(keys, labels, digests, str(path), rows, max_dropped_fraction)


def _check_readable(root: Path, keys: list[str]) -> list[str]:
    """Every image read once (its header checked) before training, and every one that cannot be
    read, or whose pixel mode has no 8-bit scale (:data:`REFUSED_MODES`), named together,
    rather than the first one failing a run when its batch comes up. Returns a hash of each
    file's bytes, from that one read."""
    from PIL import Image

    bad, refused, digests = [], [], []
    for key in keys:
        try:
            data = (root / key).read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                if image.mode in REFUSED_MODES:
                    refused.append(f"{root / key} (mode {image.mode!r})")
                image.verify()
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            bad.append(f"{key} ({type(err).__name__})")
            continue
        digests.append(hashlib.blake2b(data, digest_size=16).hexdigest())
    if bad:
        raise ConfigError(f"{root}: {len(bad)} image(s) cannot be read: {', '.join(bad[:5])}")
    if refused:
        raise ConfigError(
            f"{root}: {len(refused)} image(s) are 32-bit integer ('I') or floating-point ('F') "
            f"images, which have no standard scale to 8-bit RGB: {', '.join(refused[:5])}; save "
            "them as 8-bit (or 16-bit grey) images"
        )
    return digests


def _distinct_images(
    keys: list[str],
    labels: list,
    digests: list[str],
    where: str,
    rows: int,
    max_dropped_fraction: float | None,
) -> tuple[list[str], list, list[str]]:
    """Each image once by its bytes (the first file wins, as the first of repeated texts does):
    a copy under another name would otherwise be two examples, and could land in train and in
    test. The copies dropped are counted on stderr; with the rows the data lost before
    (``rows - len(keys)``: a CSV's empty, unlabelled or repeated rows) they count against
    ``max_dropped_fraction`` of the ``rows``."""
    first: dict[str, int] = {}
    keep, copies = [], []
    for i, digest in enumerate(digests):
        if digest in first:
            copies.append((i, first[digest]))
        else:
            first[digest] = i
            keep.append(i)
    if not copies:
        return keys, labels, digests
    relabelled = sum(labels[i] != labels[j] for i, j in copies)
    copy, original = copies[0]
    message = (
        f"{where}: dropped {len(copies)} of {len(keys)} images whose bytes repeat an earlier "
        f"image's, e.g. {keys[copy]} (= {keys[original]}); the first is kept"
    )
    if relabelled:
        message += f", and {relabelled} of the copies had another label than the image they repeat"
    share = (rows - len(keys) + len(copies)) / max(rows, 1)
    if max_dropped_fraction is not None and share > max_dropped_fraction:
        raise ConfigError(
            f"{message}; {share:.0%} of the {rows} images or rows are lost in all, more than "
            f"the {max_dropped_fraction:.0%} allowed. Remove the copies, or accept the loss "
            f"with --max-dropped-fraction {math.ceil(share * 100) / 100:g} "
            "(max_dropped_fraction in Python)"
        )
    lost = sorted({str(y) for y in labels} - {str(labels[i]) for i in keep})
    if lost:  # a class would silently leave the label set
        raise ConfigError(f"{message}; class(es) {lost} would keep no image: each one is a copy")
    print(f"fisherlora: {message}", file=sys.stderr)
    return [keys[i] for i in keep], [labels[i] for i in keep], [digests[i] for i in keep]


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
    return keys, labels
