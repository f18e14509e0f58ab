"""Classification by generation (``NAME-gen``): a causal LM completes a prompt with a class name;
each class name is scored as a completion and the best one is the prediction (accuracy,
macro-F1, MCC, the true completion's NLL and the confusion matrix, as for a classifier)."""

from __future__ import annotations

from fisherlora.experiments.generation_eval import evaluate_choices
from fisherlora.experiments.task_kinds.base import Evaluation
from fisherlora.experiments.task_kinds.causal import CausalLMTask


class ClassificationByGeneration(CausalLMTask):
    """A ``GenerationTask`` of kind ``classify``."""

    data_kind = "classify"

    def _score(self, *args, **kwargs) -> Evaluation:
        # `evaluate_choices` is looked up at each call, so that a test can wrap it
        return evaluate_choices(*args, **kwargs)
