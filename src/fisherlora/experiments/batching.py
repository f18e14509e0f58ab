"""Tokenise once, then batch with dynamic padding (each batch is padded to its longest sequence)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler
from transformers import PreTrainedTokenizerBase


class TokenizedTexts(Dataset):
    """Token ids of each text (truncated to ``max_length``) with its label id."""

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[int],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
    ) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.input_ids: list[list[int]] = encoded["input_ids"]
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.input_ids[index], self.labels[index]

    def collator(self, pad_token_id: int) -> PadToLongest:
        return PadToLongest(pad_token_id)


class PromptCompletionTexts(Dataset):
    """Prompt + completion token ids of each pair, with label ids ``-100`` on the prompt, so that a
    causal LM's loss is on the completion's tokens only.

    A pair longer than ``max_length`` keeps the last ``min(len(prompt), max_length // 2)`` (at
    least one) of its prompt's tokens, which hold the conditioning (a label, an instruction), and
    cuts the completion's end to fit; the prompt's start goes only where the completion leaves
    more room. So a long prompt with a short completion (classification by generation) loses the
    start of its prompt and a short prompt with a long completion (language modelling a review)
    keeps its prompt whole and loses the end of the completion. ``append_eos`` ends each
    completion with the EOS token (language modelling: the model learns where a text stops).
    ``max_prompt_length`` also keeps at most that many of a prompt's last tokens: scoring several
    completions of one prompt, each then reads the same prompt whatever its own length.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        append_eos: bool = False,
        max_prompt_length: int | None = None,
    ) -> None:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for a prompt token, got {max_length}")
        prompt_ids = tokenizer(list(prompts))["input_ids"]
        completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
        self.input_ids: list[list[int]] = []
        self.prompt_lengths: list[int] = []
        for prompt, completion in zip(prompt_ids, completion_ids, strict=True):
            if append_eos and tokenizer.eos_token_id is not None:
                completion = [*completion, tokenizer.eos_token_id]
            if not completion:
                raise ValueError("a completion has no tokens; nothing would be scored")
            # the prompt's end is the conditioning: never cut below half the length for the
            # completion's sake (before, a long review left an -lm pair one prompt token: ":")
            completion = completion[: max_length - max(1, min(len(prompt), max_length // 2))]
            prompt = prompt[max(0, len(prompt) + len(completion) - max_length) :]
            if max_prompt_length is not None:
                prompt = prompt[max(0, len(prompt) - max_prompt_length) :]
            self.input_ids.append(prompt + completion)
            self.prompt_lengths.append(len(prompt))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.input_ids[index], self.prompt_lengths[index]

    def collator(self, pad_token_id: int) -> PadPromptCompletion:
        return PadPromptCompletion(pad_token_id)


class PadToLongest:
    """Collate ``(ids, label)`` pairs into right-padded ``input_ids``/``attention_mask``/``labels``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PadPromptCompletion:
    """Collate ``(ids, prompt length)`` pairs into right-padded ``input_ids`` / ``attention_mask``
    and ``labels`` that repeat the ids on the completion and are ``-100`` elsewhere (the model
    shifts them: the output at t is scored against the label at t + 1)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        labels = torch.full((len(items), longest), -100, dtype=torch.long)
        for row, (ids, prompt_length) in enumerate(items):
            ids_t = torch.tensor(ids, dtype=torch.long)
            input_ids[row, : len(ids)] = ids_t
            attention_mask[row, : len(ids)] = 1
            labels[row, prompt_length : len(ids)] = ids_t[prompt_length:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LongestFirst(Sampler[int]):
    """Indices by decreasing length: evaluation batches then carry little padding."""

    def __init__(self, dataset: Texts) -> None:
        self.order = sorted(range(len(dataset)), key=lambda i: -len(dataset.input_ids[i]))

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class LengthGroupedBatches(Sampler[list[int]]):
    """Random batches of similar length, so dynamic padding pads little.

    Each pass draws a random permutation, cuts it into windows of ``batch_size * window_batches``
    examples, sorts each window by length, cuts it into batches and shuffles the batch order (the
    ``group_by_length`` scheme of the HF Trainer). A trailing short batch is dropped when the data
    has more than one batch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        generator: torch.Generator,
        window_batches: int = 50,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.window = batch_size * window_batches

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start : start + self.window], key=lambda i: -self.lengths[i])
            batches += [
                window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)
            ]
        if len(batches) > 1:
            batches = [b for b in batches if len(b) == self.batch_size]
        for index in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[index]

    def __len__(self) -> int:
        full = len(self.lengths) // self.batch_size
        return full if full else int(len(self.lengths) > 0)


class ShardedBatches(Sampler[list[int]]):
    """Process ``rank``'s share of a batch sampler under ``torch.distributed``: batches ``rank``,
    ``rank + world_size``, ``rank + 2·world_size``, … of the one sequence that a single process
    would read. A step of ``world_size`` processes therefore sees the same examples as one step
    of one process accumulating ``world_size`` consecutive batches. Only index lists are skipped,
    so no process collates a batch it does not use.

    ``drop_last`` cuts the sequence to a multiple of ``world_size`` batches, so that every share
    has the same length: training and calibration need it (every process must make the same
    number of backward passes and collectives, and epoch k + 1 must start on every process at
    once); evaluation does not (the shares' sums cover every batch)."""

    def __init__(
        self, batches: Sampler[list[int]], rank: int, world_size: int, drop_last: bool = False
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"process rank {rank} is outside a world of size {world_size}")
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.drop_last = drop_last

    def _length(self) -> int:
        """How many batches of the whole sequence are shared out."""
        n = len(self.batches)
        return n - n % self.world_size if self.drop_last else n

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.rank, self._length(), self.world_size)

    def __len__(self) -> int:
        return max(0, -(-(self._length() - self.rank) // self.world_size))


Texts = TokenizedTexts | PromptCompletionTexts


def train_loader(
    dataset: Texts,
    pad_token_id: int,
    batch_size: int,
    seed: int,
    group_by_length: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Shuffled training batches; each pass draws its order from a generator seeded once. With
    ``world_size > 1``, process ``rank``'s share of them (:class:`ShardedBatches`), the same number
    of batches on every process (a trailing ``len % world_size`` batches of each pass are dropped)."""
    generator = torch.Generator().manual_seed(seed)
    if group_by_length:
        lengths = [len(ids) for ids in dataset.input_ids]
        batches: Sampler[list[int]] = LengthGroupedBatches(lengths, batch_size, generator)
    else:
        batches = BatchSampler(
            RandomSampler(dataset, generator=generator),
            batch_size,
            drop_last=len(dataset) > batch_size,
        )
    return DataLoader(
        dataset,
        batch_sampler=ShardedBatches(batches, rank, world_size, drop_last=True),
        collate_fn=dataset.collator(pad_token_id),
    )


def eval_loader(
    dataset: Texts,
    pad_token_id: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """Evaluation batches, longest first; with ``world_size > 1`` process ``rank``'s share (the
    shares' confusion matrices sum to the whole test set's)."""
    batches = BatchSampler(LongestFirst(dataset), batch_size, drop_last=False)
    return DataLoader(
        dataset,
        batch_sampler=ShardedBatches(batches, rank, world_size),
        collate_fn=dataset.collator(pad_token_id),
    )


def forever(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from ``loader``, epoch after epoch."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the training loader yielded no batch")
