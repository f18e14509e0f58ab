"""Tasks for causal LMs: prompt → completion pairs built from a labelled text task.

Two kinds, named by a suffix on any classification task name (``rotten-tomatoes``, ``imdb``, a
hub data set):

- ``NAME-gen``, classification by generation: the prompt is ``"Review: {text}\\nSentiment:"``
  and the completion the class name (``" positive"``). The loss is on the completion's tokens
  only; evaluation scores each class name as a completion (the sum of its tokens'
  log-probabilities) and predicts the best, so accuracy, macro-F1, MCC and the confusion matrix
  mean what they mean for a classifier.
- ``NAME-lm``, language modelling: the prompt is ``"Write a {label} movie review.\\nReview:"``
  and the completion the review itself (then EOS). The loss is on the completion's tokens only;
  evaluation reports the held-out completion tokens' mean negative log-likelihood and
  perplexity.

The train/test split is the classification task's (a stable hash of the text).
"""

from __future__ import annotations

from dataclasses import dataclass

from fisherlora.errors import ConfigError
from fisherlora.experiments.tasks import Task, load_task

KINDS = {"-gen": "classify", "-lm": "lm"}
CLASSIFY_PROMPT = "Review: {text}\nSentiment:"
LM_PROMPT = "Write a {label} movie review.\nReview:"


@dataclass(frozen=True)
class GenerationTask:
    """Prompt/completion pairs; for ``kind="classify"`` also the choices and the test labels."""

    name: str
    kind: str  # "classify" or "lm"
    train_prompts: list[str]
    train_completions: list[str]
    test_prompts: list[str]
    test_completions: list[str]
    class_names: list[str]
    choices: list[str]  # the completion of each class ("classify")
    test_labels: list[int]

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_prompts), "test": len(self.test_prompts)}


def is_generation_task(name: str) -> bool:
    return any(name.endswith(suffix) for suffix in KINDS)


def as_generation_task(task: Task, kind: str) -> GenerationTask:
    """``task``'s texts and labels as prompt/completion pairs of ``kind``."""
    if kind == "classify":
        choices = [f" {name}" for name in task.class_names]

        def pairs(texts, labels):
            return [CLASSIFY_PROMPT.format(text=t) for t in texts], [choices[y] for y in labels]

    elif kind == "lm":
        choices = []

        def pairs(texts, labels):
            prompts = [LM_PROMPT.format(label=task.class_names[y]) for y in labels]
            return prompts, [f" {t}" for t in texts]

    else:
        raise ConfigError(f"unknown generation task kind {kind!r}; use 'classify' or 'lm'")
    train_prompts, train_completions = pairs(task.train_texts, task.train_labels)
    test_prompts, test_completions = pairs(task.test_texts, task.test_labels)
    suffix = next(s for s, k in KINDS.items() if k == kind)
    return GenerationTask(
        name=task.name + suffix,
        kind=kind,
        train_prompts=train_prompts,
        train_completions=train_completions,
        test_prompts=test_prompts,
        test_completions=test_completions,
        class_names=list(task.class_names),
        choices=choices,
        test_labels=list(task.test_labels),
    )


def load_generation_task(name: str, **kwargs) -> GenerationTask:
    """``NAME-gen`` or ``NAME-lm`` (see the module docstring); ``kwargs`` go to ``load_task``."""
    suffix = next((s for s in KINDS if name.endswith(s)), None)
    if suffix is None:
        raise ConfigError(
            f"task {name!r} is not a generation task: add -gen (classification by generation) "
            "or -lm (language modelling) to a classification task's name"
        )
    return as_generation_task(load_task(name[: -len(suffix)], **kwargs), KINDS[suffix])
