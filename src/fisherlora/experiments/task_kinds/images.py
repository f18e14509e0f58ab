"""Image classification: an ``AutoModelForImageClassification`` (ViT-style) with a new head and
its image processor, scored as text classification is (accuracy, macro-F1, MCC, held-out NLL,
confusion matrix)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from fisherlora.errors import ConfigError
from fisherlora.experiments.batching import ShardedBatches
from fisherlora.experiments.image_models import load_image_model
from fisherlora.experiments.images import ImageTask
from fisherlora.experiments.task_kinds.base import Evaluation, LabelledSplits, Settings, Split
from fisherlora.experiments.task_kinds.classification import evaluate
from fisherlora.experiments.tasks import held_out_subset


class LabelledImages(Dataset):
    """``(key, label)`` pairs; :class:`ProcessImages` decodes and processes a batch of them."""

    def __init__(self, keys: list[str], labels: list[int]) -> None:
        self.keys, self.labels = keys, labels

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.keys[index], self.labels[index]


class ProcessImages:
    """Collate ``(key, label)`` pairs into ``pixel_values`` (the model's image processor: resize,
    rescale, normalise) and ``labels``."""

    def __init__(self, task: ImageTask, processor: Any) -> None:
        self.task, self.processor = task, processor

    def __call__(self, items: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        images = [self.task.image(key) for key, _ in items]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return {"pixel_values": pixels.float(), "labels": labels}


class ImageClassification(LabelledSplits):
    """A labelled image task (:class:`fisherlora.experiments.images.ImageTask`) on an image
    classifier. PEFT has no image task type: the new head is trained whole through
    ``modules_to_save``."""

    peft_task_type = None

    def __init__(self, data: ImageTask) -> None:
        self.data = data
        self.modules_to_save = ["classifier"]  # ViT's (and most image classifiers') head
        self._processor: Any = None

    @classmethod
    def handles(cls, data: Any) -> bool:
        return isinstance(data, ImageTask)

    @classmethod
    def from_config(cls, data: ImageTask, config: Settings) -> ImageClassification:
        return cls(data)

    @property
    def processor(self) -> Any:
        if self._processor is None:
            raise RuntimeError("load_model() first: the image processor comes with the model")
        return self._processor

    def load_model(self, name: str, *, seed: int) -> torch.nn.Module:
        model, self._processor = load_image_model(name, self.data.num_labels, seed=seed)
        heads = [n for n in self.modules_to_save if not hasattr(model, n)]
        if heads:  # PEFT would train no head, without a word
            raise ConfigError(
                f"{name!r} has no module named {heads[0]!r}, the classification head this runner "
                "trains (ViT's and most image classifiers'); a model whose head is named "
                "otherwise is not supported"
            )
        return model

    def train_batches(
        self, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> DataLoader:
        data = LabelledImages(self.data.train_texts, self.data.train_labels)
        generator = torch.Generator().manual_seed(seed)
        batches = BatchSampler(
            RandomSampler(data, generator=generator), batch_size, drop_last=len(data) > batch_size
        )
        return DataLoader(
            data,
            batch_sampler=ShardedBatches(batches, rank, world_size, drop_last=True),
            collate_fn=ProcessImages(self.data, self.processor),
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
        subset = held_out_subset(len(held_out.test_texts), limit)
        data = LabelledImages(
            [held_out.test_texts[i] for i in subset], [held_out.test_labels[i] for i in subset]
        )
        batches = BatchSampler(SequentialSampler(data), batch_size, drop_last=False)
        loader = DataLoader(
            data,
            batch_sampler=ShardedBatches(batches, rank, world_size),
            collate_fn=ProcessImages(held_out, self.processor),
        )
        num_labels = self.data.num_labels
        return lambda model: evaluate(model, loader, num_labels, device)
