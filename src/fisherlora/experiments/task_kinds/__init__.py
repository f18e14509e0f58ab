"""The kinds of task a run trains on, each one object behind :class:`base.TaskKind`.

- ``classification.py``: text classification on a sequence classifier (``rotten-tomatoes``).
- ``generation.py``: classification by generation on a causal LM (``rotten-tomatoes-gen``).
- ``language_modelling.py``: language modelling on a causal LM (``rotten-tomatoes-lm``).
- ``images.py``: image classification on an image classifier (``digits``, an image folder).

A new kind is one new module with a class like these, added to ``KINDS``.
"""

from __future__ import annotations

from typing import Any

from fisherlora.errors import ConfigError
from fisherlora.experiments.generation_tasks import (
    GenerationTask,
    is_generation_task,
    load_generation_task,
)
from fisherlora.experiments.images import ImageTask, is_image_data, load_image_task
from fisherlora.experiments.task_kinds.base import (
    Evaluation,
    KindClass,
    Settings,
    Split,
    TaskKind,
)
from fisherlora.experiments.task_kinds.classification import Classification
from fisherlora.experiments.task_kinds.generation import ClassificationByGeneration
from fisherlora.experiments.task_kinds.images import ImageClassification
from fisherlora.experiments.task_kinds.language_modelling import LanguageModelling
from fisherlora.experiments.tasks import Task, load_task

__all__ = [
    "KINDS",
    "Classification",
    "ClassificationByGeneration",
    "Evaluation",
    "ImageClassification",
    "KindClass",
    "LanguageModelling",
    "Settings",
    "Split",
    "TaskKind",
    "load_data",
    "task_kind",
]

# the first kind whose ``handles(data)`` is true runs a data set
# (an ImageTask is a Task over image keys: images first)
KINDS: tuple[type[KindClass], ...] = (
    ImageClassification,
    Classification,
    ClassificationByGeneration,
    LanguageModelling,
)


def load_data(config: Settings) -> Task | GenerationTask | ImageTask:
    """The data set ``config.task`` names (a generation task by its ``-gen``/``-lm`` suffix, an
    image task by name), or ``config.data``'s file (a folder, or a CSV with an ``image`` column:
    images)."""
    if is_image_data(config.task, config.data):
        return load_image_task(
            config.task,
            data=config.data,
            test_data=config.test_data,
            label_column=config.label_column,
            max_dropped_fraction=config.max_dropped_fraction,
        )
    load = load_generation_task if is_generation_task(config.task) else load_task
    return load(
        config.task,
        data=config.data,
        test_data=config.test_data,
        text_column=config.text_column,
        label_column=config.label_column,
        max_dropped_fraction=config.max_dropped_fraction,
    )


def task_kind(data: Any, config: Settings) -> TaskKind:
    """The kind of task that ``data`` is, over ``data``, with ``config``'s settings."""
    for kind in KINDS:
        if kind.handles(data):
            return kind.from_config(data, config)
    known = ", ".join(kind.__name__ for kind in KINDS)
    raise ConfigError(f"no kind of task takes {type(data).__name__} data (kinds: {known})")
