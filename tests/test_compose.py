"""Our methods compose through the Method protocol; combinations that cannot work are refused."""

import pytest
import torch
from conftest import logits, random_batches, tiny_peft_model
from peft import PeftModel

from fisherlora.adapters import lora_layers
from fisherlora.errors import ConfigError
from fisherlora.methods import get_method, method_names
from fisherlora.methods.compose import Composed


def test_members_run_in_phase_order_whatever_the_spelling():
    method = get_method("fw-lora+filet+fim-lora")
    assert isinstance(method, Composed)
    assert method.name == "fw-lora+filet+fim-lora"
    assert [m.name for m in method.members] == ["fim-lora", "filet", "fw-lora"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("fim-lora+random-rank", "one rank allocator"),
        ("lora+filet", "cannot be combined"),
        ("pissa+fw-lora", "cannot be combined"),
        ("filet+filet", "named twice"),
        ("fim-lora+", "empty part"),
        ("fim-lora+magic", "unknown method 'magic'"),
        ("magic", "unknown method 'magic'"),
    ],
)
def test_impossible_combinations_are_refused(name, message):
    with pytest.raises(ConfigError, match=message):
        get_method(name)


def test_method_lists_parse_and_reject_duplicates():
    assert method_names(" lora, fim-lora+filet ,eva") == ["lora", "fim-lora+filet", "eva"]
    with pytest.raises(ConfigError, match="listed twice"):
        method_names("lora,lora")
    with pytest.raises(ConfigError, match="no method named"):
        method_names(" , ")


def test_full_composition_keeps_budget_outputs_and_exports(tmp_path):
    model = tiny_peft_model(rank=4, seed=2)
    base_copy = tiny_peft_model(rank=4, seed=2).unload()
    batches = random_batches(4, seed=3)
    before = logits(model, batches)
    method = get_method(
        "fim-lora+filet+fw-lora", {"calib_batches": 4, "steps": 10, "fw_warmup_steps": 2}
    )
    info = method.prepare(model, batches)
    assert set(info) == {"fim-lora", "filet", "fw-lora"}
    adapter, layers = lora_layers(model)
    ranks = [layer.r[adapter] for layer in layers.values()]
    costs = [layer.in_features + layer.out_features for layer in layers.values()]
    spent = sum(r * c for r, c in zip(ranks, costs, strict=True))
    assert len(set(ranks)) > 1  # allocated, to LoRA's parameter budget (within 1 %, not above)
    assert 0.99 * 4 * sum(costs) <= spent <= 4 * sum(costs)
    torch.testing.assert_close(logits(model, batches), before, atol=1e-5, rtol=0)  # FILet init

    model.train()
    optimizer = torch.optim.AdamW(method.param_groups(model, 0.0), lr=1e-2)
    penalties = []
    for step, batch in enumerate(batches * 2, start=1):
        loss = model(**batch).loss
        extra = method.loss(model, step)
        penalties.append(0.0 if extra is None else extra.item())
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        method.after_backward(model, step)
        optimizer.zero_grad(set_to_none=True)
    # FILet's B₀ != 0: the penalty measures the update s (B A − B₀ A₀) from the pretrained
    # weight, so it is zero at the first step and grows as training moves the factors; after
    # the 2 warm-up steps the importances are fixed and the hooks gone
    fw = method.members[2].penalty
    assert fw.residual_init
    assert abs(penalties[0]) < 1e-9 and all(p > 1e-9 for p in penalties[1:])
    assert sum(fw.importance().values()) == pytest.approx(1.0) and fw._handles == []
    trained = logits(model, batches)
    method.export(model, tmp_path)
    reloaded = PeftModel.from_pretrained(base_copy, tmp_path)
    torch.testing.assert_close(logits(reloaded, batches), trained, atol=1e-4, rtol=0)
    method.save_report(tmp_path)
    for name in ("ranks.json", "filet.json", "fw_lora.json"):
        assert (tmp_path / name).exists(), name
    # the plots come back as data, each titled with the composed run (the runner draws them)
    figures = method.figures()
    assert [f.file for f in figures] == ["rank_map.png", "energy_spectrum.png", "importance.png"]
    assert figures[0].title == "fim-lora+filet+fw-lora rank map"
