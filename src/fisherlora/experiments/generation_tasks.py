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

from dataclasses import dataclass, field, replace

from fisherlora.errors import ConfigError
from fisherlora.experiments.tasks import Task, load_task, train_subset, validation_mask

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
    # carved out of train by :meth:`carve_validation`; labels for "classify" only
    val_prompts: list[str] = field(default_factory=list)
    val_completions: list[str] = field(default_factory=list)
    val_labels: list[int] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    def sizes(self) -> dict[str, int]:
        sizes = {"train": len(self.train_prompts), "test": len(self.test_prompts)}
        return sizes | ({"validation": len(self.val_prompts)} if self.val_prompts else {})

    def carve_validation(self, fraction: float) -> GenerationTask:
        """Move the training pairs with ``hash(prompt, completion) < fraction`` to validation
        (see ``tasks.validation_mask``)."""
        keys = [
            p + "\n" + c for p, c in zip(self.train_prompts, self.train_completions, strict=True)
        ]
        held = validation_mask(keys, fraction, self.name)
        pairs = list(zip(self.train_prompts, self.train_completions, strict=True))
        kept = [pair for pair, h in zip(pairs, held, strict=True) if not h]
        moved = [pair for pair, h in zip(pairs, held, strict=True) if h]
        return replace(
            self,
            train_prompts=[p for p, _ in kept],
            train_completions=[c for _, c in kept],
            val_prompts=[p for p, _ in moved],
            val_completions=[c for _, c in moved],
            val_labels=[self.choices.index(c) for _, c in moved] if self.kind == "classify" else [],
        )

    def subsample_train(self, size: int, min_size: int = 1) -> GenerationTask:
        """Keep ``size`` training pairs (``tasks.train_subset``); the other splits stay."""
        keep = train_subset(len(self.train_prompts), size, min_size)
        return replace(
            self,
            train_prompts=[self.train_prompts[i] for i in keep],
            train_completions=[self.train_completions[i] for i in keep],
        )

    def validation_view(self) -> GenerationTask:
        """This task with its validation pairs in the place of test (see ``Task``)."""
        if not self.val_prompts:
            raise ConfigError(f"task {self.name!r} has no validation split")
        return replace(
            self,
            test_prompts=self.val_prompts,
            test_completions=self.val_completions,
            test_labels=self.val_labels,
        )


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
