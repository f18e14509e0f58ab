"""Classification by generation (``NAME-gen``): a causal LM completes a prompt with a class name;
each class name is scored as a completion and the best one is the prediction (accuracy,
macro-F1, MCC, the true completion's NLL and the confusion matrix, as for a classifier)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fisherlora.experiments.generation_eval import evaluate_choices
from fisherlora.experiments.generation_tasks import GenerationTask
from fisherlora.experiments.task_kinds.base import Evaluation, Split
from fisherlora.experiments.task_kinds.causal import CausalLMTask


class ClassificationByGeneration(CausalLMTask):
    """A ``GenerationTask`` of kind ``classify``."""

    @classmethod
    def handles(cls, data: Any) -> bool:
        return isinstance(data, GenerationTask) and data.kind == "classify"

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
        held_out = self._split(split)
        # `evaluate_choices` is looked up at each call, so that a test can wrap it
        return lambda model: evaluate_choices(
            model,
            held_out,
            self.tokenizer,
            max_length=self.max_length,
            batch_size=batch_size,
            device=device,
            limit=limit,
            rank=rank,
            world_size=world_size,
        )
