"""fim-lora+filet runs one calibration: FILet's statistics ride on FIM-LoRA's passes, with the
results of running the two apart on the same batches."""

import pytest
import torch
from conftest import logits, random_batches, tiny_peft_model

from fisherlora.adapters import lora_layers
from fisherlora.methods import get_method

pytestmark = pytest.mark.filterwarnings("ignore:the calibration loader ran out")


def count_passes(model) -> list[int]:
    """A counter of the model's forward passes (a hook removed with the model)."""
    calls = [0]
    model.get_base_model().register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def prepared(name, arch, batches, options):
    model = tiny_peft_model(arch, rank=4, seed=2)
    calls = count_passes(model)
    methods = [get_method(part, options) for part in name.split(",")]
    for method in methods:
        method.prepare(model, batches)
    return model, methods, calls[0]


def assert_same_model(model, reference):
    adapter, layers = lora_layers(model)
    _, reference_layers = lora_layers(reference)
    for name, layer in layers.items():
        other = reference_layers[name]
        assert layer.r[adapter] == other.r[adapter], name
        assert layer.scaling[adapter] == other.scaling[adapter], name
    params = dict(reference.named_parameters())
    for name, value in model.named_parameters():  # A, B and the residual base weights
        torch.testing.assert_close(value, params[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize(
    ("allocator", "basis"), [("fim-lora", "gram"), ("fim-lora", "svd"), ("fim-lora-batch", "gram")]
)
def test_one_calibration_equals_fim_lora_then_filet_apart(arch, allocator, basis):
    batches = random_batches(3, seed=3)
    options = {"calib_batches": 3, "basis": basis, "progress": False}
    apart, (fim, filet), apart_passes = prepared(f"{allocator},filet", arch, batches, options)
    shared, (composed,), shared_passes = prepared(f"{allocator}+filet", arch, batches, options)

    # one calibration (3 passes) instead of two, plus FILet's one step-0 gradient probe each
    assert (apart_passes, shared_passes) == (3 + 3 + 1, 3 + 1)
    shared_fim, shared_filet = composed.members
    assert shared_fim.plan.ranks == fim.plan.ranks
    assert len(set(fim.plan.ranks.values())) > 1  # the ranks were moved
    assert shared_fim.plan.scores == pytest.approx(fim.plan.scores, rel=1e-6)
    assert shared_filet.report.selected == filet.report.selected
    for name, energy in filet.report.energies.items():
        assert shared_filet.report.energies[name] == pytest.approx(energy, rel=1e-6, abs=0)
    assert shared_filet.report.calibration_shared_with == allocator
    assert shared_filet.report.calibration_batches == 3
    assert_same_model(shared, apart)
    probe = random_batches(2, seed=9)
    torch.testing.assert_close(logits(shared, probe), logits(apart, probe), rtol=0, atol=1e-6)


# grouped calibration (each method runs its own passes), or sharing turned off on the object
@pytest.mark.parametrize("grouped", [True, False])
def test_without_one_calibration_each_runs_its_own_passes_with_the_same_result(grouped):
    batches = random_batches(3, seed=4)
    common = {"calib_batches": 3, "progress": False}
    options = {"layers_per_pass": 4} if grouped else {}
    apart, _, _ = prepared("fim-lora,filet", "bert", batches, common | options)
    model = tiny_peft_model("bert", rank=4, seed=2)
    calls = count_passes(model)
    composed = get_method("fim-lora+filet", common | options)
    if not grouped:
        composed.share_calibration = False
    composed.prepare(model, batches)
    groups = -(-len(lora_layers(model)[1]) // 4) if grouped else 1  # ceil(layers / 4)
    assert calls[0] == 2 * 3 * groups + 1
    assert composed.members[1].report.calibration_shared_with == ""
    assert_same_model(model, apart)


def test_random_rank_with_filet_calibrates_filet_only():
    batches = random_batches(3, seed=5)
    model = tiny_peft_model("bert", rank=4, seed=2)
    calls = count_passes(model)
    method = get_method("random-rank+filet", {"calib_batches": 3, "progress": False})
    method.prepare(model, batches)
    assert calls[0] == 3 + 1
    assert method.members[1].report.calibration_shared_with == ""
