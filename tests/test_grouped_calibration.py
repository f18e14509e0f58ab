"""Memory-bounded calibration: target layers in groups (layers_per_pass) give the same result."""

import pytest
import torch
from conftest import random_batches, tiny_peft_model

from fisherlora.adapters import lora_layers
from fisherlora.errors import ConfigError
from fisherlora.methods.filet import filet_init
from fisherlora.methods.fim_lora import allocate_ranks, fisher_of_b


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fim_lora_grouped_equals_ungrouped(arch, estimator):
    batches = random_batches(3, seed=4)
    whole, _ = fisher_of_b(tiny_peft_model(arch), batches, estimator=estimator, progress=False)
    for per_pass in (1, 3):
        grouped, used = fisher_of_b(
            tiny_peft_model(arch),
            batches,
            estimator=estimator,
            progress=False,
            layers_per_pass=per_pass,
        )
        assert used == 3 and grouped.keys() == whole.keys()
        for name in whole:
            torch.testing.assert_close(grouped[name], whole[name], rtol=1e-5, atol=0)
    plans = [
        allocate_ranks(tiny_peft_model(arch), batches, progress=False, layers_per_pass=p).ranks
        for p in (None, 2)
    ]
    assert plans[0] == plans[1]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_filet_grouped_equals_ungrouped(arch):
    batches = random_batches(3, seed=5)
    models = {p: tiny_peft_model(arch, seed=1) for p in (None, 4)}
    reports = {
        p: filet_init(m, batches, progress=False, layers_per_pass=p) for p, m in models.items()
    }
    assert reports[None].selected == reports[4].selected
    for name, energy in reports[None].energies.items():
        assert reports[4].energies[name] == pytest.approx(energy, rel=1e-5)
    params = [dict(m.named_parameters()) for m in models.values()]
    for name, value in params[0].items():
        torch.testing.assert_close(params[1][name], value, rtol=1e-5, atol=1e-7)


def test_bad_group_size_is_refused_before_anything_changes():
    model = tiny_peft_model()
    a_before = {
        n: layer.lora_A["default"].weight.clone() for n, layer in lora_layers(model)[1].items()
    }
    with pytest.raises(ConfigError, match="layers_per_pass must be a whole number >= 1"):
        filet_init(model, random_batches(1), progress=False, layers_per_pass=0)
    with pytest.raises(ConfigError, match="layers_per_pass must be a whole number >= 1"):
        allocate_ranks(model, random_batches(1), progress=False, layers_per_pass=0)
    for n, layer in lora_layers(model)[1].items():
        assert torch.equal(layer.lora_A["default"].weight, a_before[n])
