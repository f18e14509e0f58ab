"""What the two kinds on a causal LM share: prompt → completion pairs (``GenerationTask``), the
loss on the completion's tokens only, a causal LM with its tokenizer, and an evaluator that hands
the held-out split to the subclass's scoring function."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fisherlora.experiments.batching import PromptCompletionTexts
from fisherlora.experiments.causal_models import load_causal_lm
from fisherlora.experiments.generation_tasks import GenerationTask
from fisherlora.experiments.task_kinds.base import Evaluation, Split
from fisherlora.experiments.task_kinds.text import TextTask


class CausalLMTask(TextTask[GenerationTask]):
    """A ``GenerationTask`` of kind :attr:`data_kind` on a causal LM; a subclass scores it
    (:meth:`_score`)."""

    peft_task_type = "CAUSAL_LM"
    data_kind = ""  # the GenerationTask.kind this class runs
    append_eos = False  # end each training completion with EOS (the model learns where to stop)

    @classmethod
    def handles(cls, data: Any) -> bool:
        return isinstance(data, GenerationTask) and data.kind == cls.data_kind

    def _load_pretrained(
        self, name: str, seed: int
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return load_causal_lm(name, seed=seed)

    def _tokenize_train(self) -> PromptCompletionTexts:
        return PromptCompletionTexts(
            self.data.train_prompts,
            self.data.train_completions,
            self.tokenizer,
            self.max_length,
            append_eos=self.append_eos,
        )

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
        return lambda model: self._score(
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

    def _score(
        self, model: torch.nn.Module, held_out: GenerationTask, *args, **kwargs
    ) -> Evaluation:
        raise NotImplementedError
