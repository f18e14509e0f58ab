"""The named ablation variants (``fisherlora.methods.VARIANTS``): each runs its base method with
its options fixed whatever the runner passes, and does what its name says."""

import json

import pytest
import torch
from conftest import logits, random_batches, run_tiny, tiny_peft_model

from fisherlora.adapters import lora_layers
from fisherlora.methods import VARIANTS, base_method, get_method, method_names
from fisherlora.methods.filet import filet_init
from fisherlora.methods.fim_lora import fisher_of_b

# the option each variant fixes, as its method object stores it
STORED = {
    "fim-lora-rmin1": ("r_min", 1),
    "fim-lora-max": ("score", "max"),
    "fim-lora-l2": ("score", "l2"),
    "filet-max": ("select", "max"),
    "filet-random": ("select", "random"),
    "filet-svd-max": ("select", "max"),
    "filet-svd-random": ("select", "random"),
    "filet-svd-singular": ("scale", "singular"),
    "fw-lora-uniform": ("warmup_steps", 0),
    "fw-lora-max": ("normalize", "max"),
    "fw-lora-decay": ("mode", "decay"),
}
# what the runner passes: every option set to the paper's default (which the variant overrides)
RUNNER = {
    "r_min": None,
    "score": "mean",
    "basis": "gram",
    "select": "min",
    "scale": "fisher-norm",
    "fw_warmup_steps": 20,
    "fw_normalize": "sum",
    "fw_mode": "loss",
    "steps": 100,
    "progress": False,
}


@pytest.mark.parametrize("name", sorted(STORED))
def test_a_variant_fixes_its_option_over_the_runners(name):
    assert name in VARIANTS
    method = get_method(name, RUNNER)
    key, value = STORED[name]
    assert method.name == name and method.options[key] == value
    assert base_method(name) in ("fim-lora", "filet", "fw-lora")
    assert name.startswith(base_method(name))
    # the base method itself keeps the paper's setting
    assert get_method(base_method(name), RUNNER).options[key] != value


def test_variants_compose_like_their_methods():
    assert method_names("fim-lora-rmin1+filet-max+fw-lora-uniform,lora") == [
        "fim-lora-rmin1+filet-max+fw-lora-uniform",
        "lora",
    ]
    composed = get_method("fim-lora-max+filet-svd-singular", RUNNER)
    assert [m.name for m in composed.members] == ["fim-lora-max", "filet-svd-singular"]


@pytest.mark.parametrize("name", ["filet-max", "filet-random", "filet-svd-max", "filet-svd-random"])
def test_filet_selection_variants_equal_filet_init_with_that_selection(name):
    method = get_method(name, {**RUNNER, "calib_batches": 3, "seed": 4})
    model, same = tiny_peft_model(seed=1), tiny_peft_model(seed=1)
    batches = random_batches(3)
    before = logits(model, batches)
    info = method.prepare(model, batches)
    basis = "svd" if "svd" in name else "gram"
    select = name.rsplit("-", 1)[1]
    assert info["filet"]["basis"] == basis and info["filet"]["select"] == select
    filet_init(same, batches, basis=basis, select=select, seed=4, progress=False)
    _, layers = lora_layers(model)
    _, reference = lora_layers(same)
    for layer_name, layer in layers.items():
        torch.testing.assert_close(
            layer.lora_A["default"].weight, reference[layer_name].lora_A["default"].weight
        )
    torch.testing.assert_close(logits(model, batches), before, atol=1e-5, rtol=0)


def test_filet_max_and_filet_pick_the_extremes_of_the_same_energies():
    batches = random_batches(3)
    reports = {
        select: filet_init(tiny_peft_model(seed=1), batches, select=select, progress=False)
        for select in ("min", "max")
    }
    assert reports["min"].energies == reports["max"].energies
    for name, energies in reports["min"].energies.items():
        order = sorted(range(len(energies)), key=energies.__getitem__)
        rank = len(reports["min"].selected[name])
        chosen_min = sorted(energies[i] for i in reports["min"].selected[name])
        chosen_max = sorted(energies[i] for i in reports["max"].selected[name])
        assert chosen_min == sorted(energies[i] for i in order[:rank])
        assert chosen_max == sorted(energies[i] for i in order[-rank:])


def test_fim_lora_rmin1_allows_rank_one_and_keeps_the_budget():
    batches = random_batches(2)
    plans = {}
    for name in ("fim-lora", "fim-lora-rmin1"):
        model = tiny_peft_model(rank=4)
        plans[name] = get_method(name, {**RUNNER, "calib_batches": 2}).prepare(model, batches)[
            "rank_plan"
        ]
    assert plans["fim-lora"]["r_min"] == 2 and plans["fim-lora-rmin1"]["r_min"] == 1
    for plan in plans.values():
        # within LoRA's parameters, short of them by less than the cheapest module's rank
        assert 0 <= plan["budget"] - plan["spent"] < min(plan["costs"].values())
        assert min(plan["ranks"].values()) == plan["r_min"]  # the floor binds on this data
    assert 1 in plans["fim-lora-rmin1"]["ranks"].values()


@pytest.mark.parametrize(
    ("name", "reduce"),
    [
        ("fim-lora", torch.mean),
        ("fim-lora-max", torch.max),
        ("fim-lora-l2", torch.linalg.vector_norm),
    ],
)
def test_fim_lora_score_variants_reduce_each_modules_fisher_as_named(name, reduce):
    batches = random_batches(2)
    fisher, _ = fisher_of_b(tiny_peft_model(rank=4), batches, n_batches=2, progress=False)
    plan = get_method(name, {**RUNNER, "calib_batches": 2}).prepare(
        tiny_peft_model(rank=4), batches
    )["rank_plan"]
    assert plan["scores"].keys() == fisher.keys()
    for module, f in fisher.items():
        assert plan["scores"][module] == pytest.approx(reduce(f).item(), rel=1e-6), module


def test_fw_lora_uniform_is_the_unweighted_penalty_in_a_run(tmp_path, small_csv, capsys):
    out = tmp_path / "run"
    code = run_tiny(
        small_csv, out, "--method", "fw-lora-uniform", "--steps", "4", "--fw-lambda", "0.1"
    )
    capsys.readouterr()
    assert code == 0
    report = json.loads((out / "fw_lora.json").read_text())
    assert report["warmup_steps"] == 0
    assert set(report["importance"].values()) == {0.0}  # 1 − I_m = 1: plain L2 on ΔW
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "fw-lora-uniform"
    assert metrics["prepare"]["fw_lora"]["warmup_steps"] == 0
    # no warm-up hooks were ever registered, so no step paid for them
    model = tiny_peft_model()
    penalty = get_method("fw-lora-uniform", RUNNER)
    penalty.prepare(model, [])
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
