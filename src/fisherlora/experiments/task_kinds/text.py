"""What the kinds that read text share: a tokenizer that comes with the model, the training split
tokenised once, and batches of similar length (``batching.py``)."""

from __future__ import annotations

from typing import Generic, TypeVar

from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fisherlora.experiments.batching import Texts, train_loader
from fisherlora.experiments.generation_tasks import GenerationTask
from fisherlora.experiments.limits import check_max_length
from fisherlora.experiments.task_kinds.base import LabelledSplits, Settings
from fisherlora.experiments.tasks import Task

Data = TypeVar("Data", Task, GenerationTask)


class TextTask(LabelledSplits, Generic[Data]):
    """The common half of a text kind. A subclass says which model it loads
    (:meth:`_load_pretrained`), how a split becomes token ids (:meth:`_tokenize_train`) and how
    it is evaluated (``evaluator``)."""

    peft_task_type: str | None = None
    modules_to_save: list[str] | None = None  # the task type's head is trained whole by PEFT

    def __init__(self, data: Data, *, max_length: int, group_by_length: bool = True) -> None:
        self.data = data
        self.max_length = max_length  # tokens per text after truncation
        self.group_by_length = group_by_length
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._train_set: Texts | None = None

    @classmethod
    def from_config(cls, data: Data, config: Settings) -> TextTask[Data]:
        return cls(data, max_length=config.max_length, group_by_length=config.group_by_length)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise RuntimeError("load_model() first: the tokenizer comes with the model")
        return self._tokenizer

    def load_model(self, name: str, *, seed: int) -> PreTrainedModel:
        model, self._tokenizer = self._load_pretrained(name, seed)
        # now, not mid-forward after config.json is written: a text longer than the model's
        # position table fails deep inside the forward pass
        check_max_length(model, self.max_length, name)
        self._train_set = None  # token ids belong to the tokenizer they came from
        return model

    def train_batches(
        self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> DataLoader:
        if self._train_set is None:  # once: training and calibration batches share it
            self._train_set = self._tokenize_train()
        return train_loader(
            self._train_set,
            self.tokenizer.pad_token_id,
            batch_size,
            seed=seed,
            group_by_length=self.group_by_length,
            rank=rank,
            world_size=world_size,
        )

    def _load_pretrained(
        self, name: str, seed: int
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        raise NotImplementedError

    def _tokenize_train(self) -> Texts:
        raise NotImplementedError
