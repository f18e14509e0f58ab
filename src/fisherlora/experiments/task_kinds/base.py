"""What the training loop asks of a task, whatever its kind.

A task kind is one object that owns a run's data (its train, validation and test splits), loads
the model that suits it, turns the training split into batches, and evaluates a model on a
held-out split. ``train()`` calls these few members and nothing else, so it never asks which kind
it holds. A new kind is one new module in this package: a class with the members of
:class:`TaskKind` and the two class methods of :class:`KindClass`, added to ``KINDS`` in
``__init__.py`` (whose ``load_data`` loads a data set by the name a run gives).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

Split = Literal["validation", "test"]
Batch = dict[str, torch.Tensor]
# A run's settings: a ``TrainConfig``, of which a kind reads the fields it needs. Not imported
# (train.py imports this package, and imports run one way).
Settings = Any


class Evaluation(NamedTuple):
    """Scores of one evaluation (``accuracy``, ``nll``, ...: the columns of ``curve.csv``) and
    the confusion matrix of a kind that predicts classes (``None`` otherwise)."""

    scores: dict[str, float]
    confusion: np.ndarray | None


@runtime_checkable
class TaskKind(Protocol):
    """The members ``train()`` uses. Batches are dicts of tensors that the loaded model takes as
    keyword arguments, ``labels`` among them, so that ``model(**batch).loss`` is the training
    loss. Under ``torch.distributed`` each process reads its share (``rank`` of ``world_size``)
    of batches and of held-out examples; an evaluation sums the shares.

    Optional: ``modules_to_save`` (a list of module names trained whole beside LoRA, e.g. a new
    head that no PEFT task type covers; ``images.py`` has one); absent means None."""

    name: str  # the task's name in config.json and metrics.json
    class_names: list[str]  # the classes, in label-id order
    peft_task_type: str | None  # ``LoraConfig.task_type`` for the model of :meth:`load_model`

    def sizes(self) -> dict[str, int]:
        """The number of examples in each split (``train``, ``test``, ``validation``)."""
        ...

    def load_model(self, name: str, *, seed: int) -> torch.nn.Module:
        """The base model ``name`` (registry name, folder or hub name) for this task, its new
        weights drawn from ``seed``; whatever batching needs of it (a tokenizer) is kept."""
        ...

    def train_batches(
        self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterable[Batch]:
        """Shuffled training batches in an order drawn from ``seed``. Iterable again and again:
        each pass is an epoch that goes on drawing from the same random stream."""
        ...

    def evaluator(
        self,
        split: Split,
        *,
        limit: int | None,
        batch_size: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> Callable[[torch.nn.Module], Evaluation]:
        """A function that scores a model on ``split`` (``limit`` examples of it, a fixed random
        subset, or all). The held-out data is prepared once, here, and scored at every call."""
        ...


class KindClass(Protocol):
    """How ``task_kind()`` (``__init__.py``) picks and builds the kind for a run's data."""

    @classmethod
    def handles(cls, data: Any) -> bool:
        """Whether ``data`` (a loaded data set: ``tasks.Task``, ...) is of this kind."""
        ...

    @classmethod
    def from_config(cls, data: Any, config: Settings) -> TaskKind:
        """This kind over ``data``, with the settings of ``config`` that it reads."""
        ...


class LabelledSplits:
    """What every kind over a labelled data set (``tasks.Task`` and its kin: ``sizes()``,
    ``validation_view()``, ``test_*``) shares: its name, classes and sizes, and the split an
    evaluator reads (the validation split in the place of test, or test itself)."""

    data: Any

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    def sizes(self) -> dict[str, int]:
        return self.data.sizes()

    def _split(self, split: str) -> Any:
        """The data with ``split``'s examples in the place of test (what evaluation reads)."""
        if split == "validation":
            return self.data.validation_view()
        if split == "test":
            return self.data
        raise ValueError(f"unknown split {split!r}; use 'validation' or 'test'")
