"""Held-out evaluation of a causal LM on a :class:`GenerationTask`.

- ``classify`` (:func:`evaluate_choices`): each class's completion c is scored as
  ``log p(c | prompt) = Σ_t log p(c_t | prompt, c_<t)``; the prediction is the best-scoring
  class. Accuracy, macro-F1, MCC and the confusion matrix follow as for a classifier, and
  ``nll`` is the true completion's ``−log p(c_y | prompt)`` averaged over examples.
- ``lm`` (:func:`evaluate_completions`): the completion tokens' mean negative log-likelihood
  ``NLL = −(1/T) Σ log p(y_t | y_<t)`` over all T held-out completion tokens, and
  ``perplexity = exp(NLL)``.

Under torch.distributed each process scores its share; the sums are all-reduced (``stats.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

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
from fisherlora.experiments.metrics import classification_metrics, summed_confusion_matrix
from fisherlora.experiments.tasks import held_out_subset
from fisherlora.logit_window import logits_at_last_token
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


def evaluate_choices(
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
) -> tuple[dict[str, float], np.ndarray]:
    """Scores and confusion matrix of ``model`` on a ``classify`` task's test prompts (``limit``
    of them, a fixed random subset, if given): each class's completion scored, the best one
    predicted."""
    subset = held_out_subset(len(task.test_prompts), limit)
    prompts = [task.test_prompts[i] for i in subset]
    labels = [task.test_labels[i] for i in subset]
    with _evaluating(model):
        scores = _choice_scores(
            model,
            task.choices,
            tokenizer,
            prompts,
            max_length,
            batch_size,
            device,
            rank,
            world_size,
        )
    shard = _shard(len(prompts), batch_size, rank, world_size)
    mine = [labels[i] for batch in shard for i in batch]
    predictions = scores.argmax(dim=1).tolist()
    confusion = summed_confusion_matrix(mine, predictions, task.num_labels, device)
    # the completion NLL of the true class, −log p(c_y | prompt), averaged over examples
    true_scores = scores[torch.arange(len(mine)), torch.tensor(mine, dtype=torch.long)]
    sums = torch.tensor([-true_scores.double().sum().item(), len(mine)], dtype=torch.float64)
    nll_sum, count = all_reduce_sum(sums.to(device)).tolist()
    return classification_metrics(confusion) | {"nll": nll_sum / max(count, 1.0)}, confusion


def evaluate_completions(
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
) -> tuple[dict[str, float], None]:
    """The NLL and perplexity of ``model`` on an ``lm`` task's test completions (``limit`` of
    them, a fixed random subset, if given); no confusion matrix."""
    subset = held_out_subset(len(task.test_prompts), limit)
    prompts = [task.test_prompts[i] for i in subset]
    completions = [task.test_completions[i] for i in subset]
    with _evaluating(model):
        return _evaluate_lm(
            model,
            tokenizer,
            prompts,
            completions,
            max_length,
            batch_size,
            device,
            rank,
            world_size,
        )


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode (dropout off) inside, back in its own mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _shard(n: int, batch_size: int, rank: int, world_size: int) -> ShardedBatches:
    """This process's batches of example indices, in order (predictions and labels both follow
    it, so that they pair up)."""
    batches = BatchSampler(SequentialSampler(range(n)), batch_size, drop_last=False)
    return ShardedBatches(batches, rank, world_size)


def _evaluate_lm(
    model, tokenizer, prompts, completions, max_length, batch_size, device, rank, world_size
) -> tuple[dict[str, float], None]:
    texts = PromptCompletionTexts(prompts, completions, tokenizer, max_length, append_eos=True)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # Σ log p, tokens
    pad = tokenizer.pad_token_id
    for batch in eval_loader(texts, pad, batch_size, rank=rank, world_size=world_size):
        log_p, tokens = completion_log_probs(model, _to(batch, device))
        sums += torch.stack([log_p.sum().double(), tokens.sum().double()])
    log_p_sum, tokens = all_reduce_sum(sums).tolist()
    nll = -log_p_sum / max(tokens, 1.0)
    return {"nll": nll, "perplexity": math.exp(min(nll, 700.0))}, None


@torch.no_grad()
def _choice_scores(
    model, choices, tokenizer, prompts, max_length, batch_size, device, rank, world_size
) -> torch.Tensor:
    """``log p(choice | prompt)`` of each choice (columns) for each of this process's prompts
    (rows, in :func:`_shard` order); the prediction is the best-scoring choice.

    Where every choice is one token, one forward pass of the prompt suffices: the scores are the
    log-probabilities of those tokens at the prompt's last position. Otherwise each choice is
    scored as a completion, one forward pass per choice."""
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    single_token = all(len(ids) == 1 for ids in choice_ids)
    # every choice reads the same prompt: cut to leave room for the longest choice
    longest = min(max(len(ids) for ids in choice_ids), max_length - 1)
    per_choice = [
        PromptCompletionTexts(
            prompts,
            [choice] * len(prompts),
            tokenizer,
            max_length,
            max_prompt_length=max_length - longest,
        )
        for choice in (choices[:1] if single_token else choices)
    ]
    collate = PadPromptCompletion(tokenizer.pad_token_id)
    mine = [i for batch in _shard(len(prompts), batch_size, rank, world_size) for i in batch]
    # batched longest prompt first, so that a batch is padded to about its own prompts' length
    # (in prompt order a batch of SmolLM2's Rotten Tomatoes prompts is 1.65x padding); the rows
    # go back to this process's order
    lengths = per_choice[0].prompt_lengths
    by_length = sorted(range(len(mine)), key=lambda row: -lengths[mine[row]])
    scores = torch.zeros(len(mine), len(choices))
    for start in range(0, len(by_length), batch_size):
        rows = by_length[start : start + batch_size]
        indices = [mine[row] for row in rows]
        if single_token:
            # prompt i's ids are its pair's ids without the one completion token
            items = [(per_choice[0][i][0][:-1], 0) for i in indices]
            at_last = logits_at_last_token(model, _to(collate(items), device)).float()
            scores[rows] = at_last.log_softmax(dim=-1)[:, [ids[0] for ids in choice_ids]].cpu()
        else:
            per_batch = [
                completion_log_probs(model, _to(collate([t[i] for i in indices]), device))[0]
                for t in per_choice
            ]
            scores[rows] = torch.stack(per_batch, dim=1).float().cpu()
    return scores


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
