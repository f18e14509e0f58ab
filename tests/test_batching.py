import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from fisherlora.experiments.batching import LengthGroupedBatches, PadToLongest, ShardedBatches


def test_pad_to_longest_pads_right_and_masks_padding():
    batch = PadToLongest(pad_token_id=0)([([5, 6, 7], 1), ([8], 0)])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_length_grouped_batches_cover_the_data_once_per_pass_and_are_seeded():
    lengths = [(i * 37) % 50 + 1 for i in range(1000)]
    sampler = LengthGroupedBatches(
        lengths, batch_size=32, generator=torch.Generator().manual_seed(3), window_batches=4
    )
    first_pass, second_pass = list(sampler), list(sampler)
    for batches in (first_pass, second_pass):
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) == 1000 // 32 * 32 == len(sampler) * 32
        assert all(len(b) == 32 for b in batches)
    assert first_pass != second_pass  # each pass draws a new order
    again = LengthGroupedBatches(lengths, 32, torch.Generator().manual_seed(3), window_batches=4)
    assert list(again) == first_pass

    def mean_spread(batches):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(
            batches
        )

    # A window of one batch is no grouping at all: grouping must pad far less than that.
    ungrouped = LengthGroupedBatches(
        lengths, 32, torch.Generator().manual_seed(3), window_batches=1
    )
    assert mean_spread(first_pass) < 0.5 * mean_spread(list(ungrouped))


def test_single_short_batch_is_kept():
    sampler = LengthGroupedBatches(
        [3, 1, 2], batch_size=8, generator=torch.Generator().manual_seed(0)
    )
    assert [sorted(b) for b in sampler] == [[0, 1, 2]] and len(sampler) == 1


PUBLIC_API = {  # name: the module that defines it
    "ConfigError": "fisherlora.errors",
    "CalibrationError": "fisherlora.errors",
    "FisherLoraError": "fisherlora.errors",
    "water_fill": "fisherlora.allocate",
    "allocate_ranks": "fisherlora.methods.fim_lora",
    "random_ranks": "fisherlora.methods.fim_lora",
    "RankPlan": "fisherlora.methods.fim_lora",
    "filet_init": "fisherlora.methods.filet",
    "FiletReport": "fisherlora.methods.filet",
    "export_lora": "fisherlora.adapters",
    "FisherPenalty": "fisherlora.methods.fw_lora",
    "METHODS": "fisherlora.methods",
    "Method": "fisherlora.methods",
    "get_method": "fisherlora.methods",
    "TrainConfig": "fisherlora.experiments.train",
    "train": "fisherlora.experiments.train",
}


def test_every_public_name_resolves():
    import importlib

    import fisherlora

    assert sorted(fisherlora.__all__) == sorted(["__version__", *PUBLIC_API])
    assert isinstance(fisherlora.__version__, str)
    for name, home in PUBLIC_API.items():  # the very object its module defines
        assert getattr(fisherlora, name) is getattr(importlib.import_module(home), name), name


@pytest.mark.parametrize("n_batches", [6, 7, 8])
def test_shares_interleave_the_one_process_sequence(n_batches):
    """Shares of 3 processes: batches p, p + 3, ... of the single-process sequence; with
    drop_last every share has the same length (equal numbers of backward passes and
    collectives), without it the shares cover every batch (evaluation)."""
    batches = BatchSampler(SequentialSampler(range(4 * n_batches)), 4, drop_last=False)
    whole = list(batches)
    for drop_last in (False, True):
        shares = [list(ShardedBatches(batches, p, 3, drop_last=drop_last)) for p in range(3)]
        assert [len(share) for share in shares] == [
            len(ShardedBatches(batches, p, 3, drop_last=drop_last)) for p in range(3)
        ]
        for p, share in enumerate(shares):
            assert share == whole[p::3][: len(share)]
        covered = sorted(tuple(b) for share in shares for b in share)
        if drop_last:
            assert len({len(share) for share in shares}) == 1
            assert covered == [tuple(b) for b in whole[: n_batches // 3 * 3]]
        else:
            assert covered == [tuple(b) for b in whole]
    with pytest.raises(ValueError, match="outside a world"):
        ShardedBatches(batches, 3, 3)
