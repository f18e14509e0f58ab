"""Language modelling (``NAME-lm``): a causal LM writes a text after a prompt; scored by the
held-out completion tokens' mean NLL and perplexity (no classes, no confusion matrix)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fisherlora.experiments.generation_eval import evaluate_completions
from fisherlora.experiments.generation_tasks import GenerationTask
from fisherlora.experiments.task_kinds.base import Evaluation, Split
from fisherlora.experiments.task_kinds.causal import CausalLMTask


class LanguageModelling(CausalLMTask):
    """A ``GenerationTask`` of kind ``lm``."""

    append_eos = True

    @classmethod
    def handles(cls, data: Any) -> bool:
        return isinstance(data, GenerationTask) and data.kind == "lm"

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
        return lambda model: evaluate_completions(
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
