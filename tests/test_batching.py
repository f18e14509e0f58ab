import torch

from fisherlora.experiments.batching import LengthGroupedBatches, PadToLongest


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


def test_every_public_name_resolves():
    import fisherlora

    for name in fisherlora.__all__:
        assert getattr(fisherlora, name) is not None, name
