"""Held-out evaluation of a causal LM on a :class:`GenerationTask`.

- ``classify``: each class's completion c is scored as ``log p(c | prompt) = Σ_t log p(c_t |
  prompt, c_<t)``; the prediction is the best-scoring class. Accuracy, macro-F1, MCC and the
  confusion matrix follow as for a classifier.
- ``lm``: the completion tokens' mean negative log-likelihood ``NLL = −(1/T) Σ log p(y_t | y_<t)``
  over all T held-out completion tokens, and ``perplexity = exp(NLL)``.

Under torch.distributed each process scores its share; the sums are all-reduced (``stats.py``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import BatchSampler, SequentialSampler
from transformers import PreTrainedTokenizerBase

from fisherlora.experiments.batching import (
    PadPromptCompletion,
    PromptCompletionTexts,
    ShardedBatches,
    eval_loader,
)
from fisherlora.experiments.generation_tasks import GenerationTask
from fisherlora.experiments.metrics import classification_metrics, confusion_matrix
from fisherlora.stats import all_reduce_sum

ROWS_PER_SOFTMAX = 8  # log-softmax over the vocabulary for a few rows at a time (memory)


@torch.no_grad()
def completion_log_probs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its scored (label ≠ -100) tokens, and their
    number. The output at position t predicts the label at t + 1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    scored = targets != -100
    totals = []
    for start in range(0, logits.shape[0], ROWS_PER_SOFTMAX):
        rows = slice(start, start + ROWS_PER_SOFTMAX)
        log_p = torch.log_softmax(logits[rows, :-1].float(), dim=-1)
        picked = log_p.gather(-1, targets[rows].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        totals.append((picked * scored[rows]).sum(dim=1))
    return torch.cat(totals), scored.sum(dim=1)


def evaluate_generation(
    model: torch.nn.Module,
    task: GenerationTask,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Scores of ``model`` on the first ``limit`` (all) test pairs of ``task``, and the confusion
    matrix for ``classify`` (``None`` for ``lm``)."""
    was_training = model.training
    model.eval()
    n = len(task.test_prompts) if limit is None else min(limit, len(task.test_prompts))
    prompts = task.test_prompts[:n]
    pad = tokenizer.pad_token_id
    try:
        if task.kind == "lm":
            texts = PromptCompletionTexts(
                prompts, task.test_completions[:n], tokenizer, max_length, append_eos=True
            )
            sums = torch.zeros(2, dtype=torch.float64, device=device)  # Σ log p, tokens
            for batch in eval_loader(texts, pad, batch_size, rank=rank, world_size=world_size):
                log_p, tokens = completion_log_probs(model, _to(batch, device))
                sums += torch.stack([log_p.sum().double(), tokens.sum().double()])
            log_p_sum, tokens = all_reduce_sum(sums).tolist()
            nll = -log_p_sum / max(tokens, 1.0)
            return {"nll": nll, "perplexity": math.exp(min(nll, 700.0))}, None

        per_choice = [
            PromptCompletionTexts(prompts, [choice] * n, tokenizer, max_length)
            for choice in task.choices
        ]
        collate = PadPromptCompletion(pad)
        order = ShardedBatches(
            BatchSampler(SequentialSampler(range(n)), batch_size, drop_last=False),
            rank,
            world_size,
        )
        labels, predictions = [], []
        for indices in order:
            scores = torch.stack(
                [
                    completion_log_probs(model, _to(collate([texts[i] for i in indices]), device))[
                        0
                    ]
                    for texts in per_choice
                ],
                dim=1,
            )
            predictions.append(scores.argmax(dim=1).cpu())
            labels.append(torch.tensor([task.test_labels[i] for i in indices]))
    finally:
        model.train(was_training)
    empty = torch.zeros(0, dtype=torch.long)
    confusion = confusion_matrix(
        torch.cat(labels or [empty]).numpy(),
        torch.cat(predictions or [empty]).numpy(),
        task.num_labels,
    )
    confusion = all_reduce_sum(torch.from_numpy(confusion).to(device)).cpu().numpy()
    return classification_metrics(confusion), confusion


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
