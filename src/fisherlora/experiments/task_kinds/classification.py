"""Text classification: a sequence classifier with a new head, scored by accuracy, macro-F1, MCC,
the held-out NLL and the confusion matrix."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fisherlora.experiments.batching import TokenizedTexts, eval_loader
from fisherlora.experiments.metrics import classification_metrics, summed_confusion_matrix
from fisherlora.experiments.models import load_model
from fisherlora.experiments.task_kinds.base import Batch, Evaluation, Split
from fisherlora.experiments.task_kinds.text import TextTask
from fisherlora.experiments.tasks import Task, held_out_subset
from fisherlora.stats import all_reduce_sum


class Classification(TextTask[Task]):
    """A labelled text task (``tasks.Task``) on a sequence classifier."""

    peft_task_type = "SEQ_CLS"

    @classmethod
    def handles(cls, data: Any) -> bool:
        return isinstance(data, Task)

    def _load_pretrained(
        self, name: str, seed: int
    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return load_model(name, self.data.num_labels, seed=seed)

    def _tokenize_train(self) -> TokenizedTexts:
        return TokenizedTexts(
            self.data.train_texts, self.data.train_labels, self.tokenizer, self.max_length
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
        examples = TokenizedTexts(
            [held_out.test_texts[i] for i in subset],
            [held_out.test_labels[i] for i in subset],
            self.tokenizer,
            self.max_length,
        )
        pad_id = self.tokenizer.pad_token_id
        loader = eval_loader(examples, pad_id, batch_size, rank=rank, world_size=world_size)
        num_labels = self.data.num_labels
        # `evaluate` is looked up at each call, so that a test can wrap it
        return lambda model: evaluate(model, loader, num_labels, device)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: Iterable[Batch], num_labels: int, device: torch.device
) -> Evaluation:
    """Accuracy, macro-F1, MCC, the held-out NLL and the confusion matrix of ``model`` on
    ``loader``; under torch.distributed ``loader`` is this process's share and the confusion
    matrices and NLL sums are summed.

    ``nll = −(1/N) Σ_i log softmax(z_i)[y_i]``: the cross-entropy of the true class, a far more
    sensitive paired outcome than accuracy (it moves with every example's confidence)."""
    was_training = model.training
    model.eval()
    labels, predictions = [], []
    nll_sum = torch.zeros(2, dtype=torch.float64, device=device)  # Σ −log p(y), examples
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # token ids, or pixel values
        logits = model(**inputs).logits
        predictions.append(logits.argmax(dim=-1).cpu())
        labels.append(batch["labels"].cpu())
        nll = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        nll_sum += torch.stack([nll.double(), nll_sum.new_tensor(len(batch["labels"]))])
    model.train(was_training)
    confusion = summed_confusion_matrix(
        torch.cat(labels).tolist() if labels else [],
        torch.cat(predictions).tolist() if predictions else [],
        num_labels,
        device,
    )
    total, count = all_reduce_sum(nll_sum).tolist()
    return Evaluation(
        classification_metrics(confusion) | {"nll": total / max(count, 1.0)}, confusion
    )
