"""Language modelling (``NAME-lm``): a causal LM writes a text after a prompt; scored by the
held-out completion tokens' mean NLL and perplexity (no classes, no confusion matrix)."""

from __future__ import annotations

from fisherlora.experiments.generation_eval import evaluate_completions
from fisherlora.experiments.task_kinds.base import Evaluation
from fisherlora.experiments.task_kinds.causal import CausalLMTask


class LanguageModelling(CausalLMTask):
    """A ``GenerationTask`` of kind ``lm``."""

    data_kind = "lm"
    append_eos = True

    def _score(self, *args, **kwargs) -> Evaluation:
        return evaluate_completions(*args, **kwargs)
