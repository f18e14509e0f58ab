"""Two CPU processes (gloo), each holding half of every batch, must compute what one process computes
on the whole batches: Fisher scores and rank plans, FILet energies and inits, FW-LoRA importances."""

import pickle

import pytest
import torch
from conftest import (
    assert_unchanged,
    gloo_group,
    random_batches,
    run_processes,
    snapshot,
    tiny_peft_model,
)

from fisherlora.adapters import lora_layers
from fisherlora.errors import CalibrationError
from fisherlora.methods import get_method
from fisherlora.methods.filet import filet_init
from fisherlora.methods.fim_lora import allocate_ranks, fisher_of_b
from fisherlora.methods.fw_lora import FisherPenalty

pytestmark = pytest.mark.filterwarnings("ignore:the calibration loader ran out")
WORLD = 2


def halves(batches, rank):
    """This process's share: rows rank*k .. (rank+1)*k of every batch."""
    out = []
    for batch in batches:
        k = batch["labels"].shape[0] // WORLD
        out.append({key: value[rank * k : (rank + 1) * k] for key, value in batch.items()})
    return out


def compute(batches):
    """Every statistic under test, for the given (local or whole) batches."""
    torch.manual_seed(0)
    results = {}
    for estimator in ("batch", "per_example"):
        fisher, _ = fisher_of_b(
            tiny_peft_model("llama"), batches, estimator=estimator, progress=False
        )
        results[f"fisher_{estimator}"] = fisher
    model = tiny_peft_model("llama")
    results["ranks"] = allocate_ranks(model, batches, progress=False).ranks
    model = tiny_peft_model("llama")
    report = filet_init(model, batches, basis="gram", progress=False)
    results["filet_energies"] = {n: torch.tensor(e) for n, e in report.energies.items()}
    adapter, layers = lora_layers(model)
    results["filet_A"] = {
        n: layer.lora_A[adapter].weight.detach().clone() for n, layer in layers.items()
    }
    model = tiny_peft_model("llama")
    for estimator in ("exact", "sketch"):
        penalty = FisherPenalty(model, warmup_steps=len(batches), estimator=estimator)
        for batch in batches:
            model(**batch).loss.backward()
            model.zero_grad()
            penalty.step()
        results[f"importance_{estimator}"] = penalty.importance()
        results[f"proxy_{estimator}"] = penalty.last_proxy
    return results


def worker(rank, port, queue):
    with gloo_group(rank, port, WORLD):
        result = compute(halves(random_batches(3, batch_size=4, seed=7), rank))
        queue.put((rank, pickle.dumps(result)))  # bytes: no shared-memory tensors to outlive us


def assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}/{key}")
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-10, msg=path)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-12), path
    else:
        assert a == b, path


def test_two_processes_match_one_process_on_the_union_of_their_data():
    results = {rank: pickle.loads(data) for rank, data in run_processes(worker, WORLD).items()}
    single = compute(random_batches(3, batch_size=4, seed=7))
    assert_same(results[0], results[1], "rank0 vs rank1")
    assert_same(results[0], single, "distributed vs single")


UNEQUAL_CALLS = {
    "fim-lora-batch": lambda m, b: fisher_of_b(m, b, estimator="batch", progress=False),
    "filet": lambda m, b: filet_init(m, b, progress=False),
    "fim-lora+filet": lambda m, b: get_method("fim-lora+filet", {"progress": False}).prepare(m, b),
}


def same_snapshot(before, after) -> bool:
    try:
        assert_unchanged(before, after)
    except AssertionError:
        return False
    return True


def unequal_worker(rank, port, queue):
    with gloo_group(rank, port, WORLD):
        batches = halves(random_batches(3 - rank, batch_size=4, seed=7), rank)  # 3 and 2
        messages = {}
        for name, call in UNEQUAL_CALLS.items():
            model = tiny_peft_model("llama")
            before = snapshot(model)
            try:
                call(model, batches)
                messages[name] = "no error"
            except CalibrationError as err:
                messages[name] = str(err)
            messages[name + " unchanged"] = same_snapshot(before, snapshot(model))
        queue.put((rank, messages))


def test_unequal_batch_counts_are_refused_on_every_process_where_a_statistic_needs_them_equal():
    # the batch estimator all-reduces every batch (before: a crash or a hang); FILet's q takes
    # each batch's g as 1/world of the global batch's, so a batch one process alone holds was
    # weighed a quarter too low (before: a silently wrong init, another on each process)
    messages = run_processes(unequal_worker, WORLD)
    for rank in range(WORLD):
        for name in UNEQUAL_CALLS:
            assert "hold 2 to 3 calibration batches" in messages[rank][name], messages
            assert messages[rank][name + " unchanged"], (rank, name)
