"""What the two kinds on a causal LM share: prompt → completion pairs (``GenerationTask``), the
loss on the completion's tokens only, and a causal LM with its tokenizer."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fisherlora.experiments.batching import PromptCompletionTexts
from fisherlora.experiments.causal_models import load_causal_lm
from fisherlora.experiments.generation_tasks import GenerationTask
from fisherlora.experiments.task_kinds.text import TextTask


class CausalLMTask(TextTask[GenerationTask]):
    """A ``GenerationTask`` on a causal LM; a subclass evaluates it."""

    peft_task_type = "CAUSAL_LM"
    append_eos = False  # end each training completion with EOS (the model learns where to stop)

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
