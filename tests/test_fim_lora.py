import inspect
import json
import warnings

import pytest
import torch
from conftest import assert_unchanged, logits, random_batches, run_tiny, snapshot, tiny_peft_model
from peft import PeftModel

from fisherlora.adapters import lora_layers
from fisherlora.allocate import water_fill
from fisherlora.errors import CalibrationError, ConfigError
from fisherlora.experiments.train import TrainConfig, count_parameters, method_options
from fisherlora.methods import base_method, get_method, method_names
from fisherlora.methods.fim_lora import (
    FimLoRA,
    RandomRank,
    allocate_ranks,
    fisher_of_b,
    plan_ranks,
    random_ranks,
)

# Most tests calibrate on fewer than the default 8 batches on purpose; one test checks the warning.
pytestmark = pytest.mark.filterwarnings("ignore:the calibration loader ran out")


def test_a_gradient_is_exactly_zero_at_init_which_is_why_b_is_read():
    model = tiny_peft_model()
    batch = random_batches(1)[0]
    model(**batch).loss.backward()
    a_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    b_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert all(torch.count_nonzero(g) == 0 for g in a_grads)
    assert all(torch.count_nonzero(g) > 0 for g in b_grads)


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_ranks_sum_to_the_budget_and_outputs_are_unchanged(arch, estimator):
    model = tiny_peft_model(arch)
    probe = random_batches(2, seed=9)
    before = logits(model, probe)
    plan = allocate_ranks(model, random_batches(4), estimator=estimator, progress=False)
    adapter, layers = lora_layers(model)
    assert sum(plan.ranks.values()) == plan.budget == 8 * len(layers)
    assert all(4 <= r <= 16 for r in plan.ranks.values())
    assert len(set(plan.ranks.values())) > 1  # the scores did move ranks
    for name, layer in layers.items():
        rank = plan.ranks[name]
        assert layer.lora_A[adapter].weight.shape == (rank, layer.in_features)
        assert layer.lora_B[adapter].weight.shape == (layer.out_features, rank)
        assert layer.scaling[adapter] == pytest.approx(2.0)  # alpha/r of the base rank, kept
    config = model.peft_config[adapter]
    assert config.rank_pattern == plan.ranks
    torch.testing.assert_close(logits(model, probe), before, rtol=0, atol=0)


def test_calibration_changes_nothing_but_adapter_shapes():
    model = tiny_peft_model()
    model.train()
    model.base_model.model.bert.encoder.layer[0].eval()  # a mixed mode must come back as it was
    before = snapshot(model)
    allocate_ranks(model, random_batches(3), estimator="per_example", progress=False)
    after = snapshot(model)
    lora = {n for n in before["params"] if "lora_" in n}
    for name, tensor in before["params"].items():
        if name not in lora or tensor.shape == after["params"][name].shape:
            assert torch.equal(tensor, after["params"][name]), name
    for key in ("requires_grad", "training", "grads", "hooks", "attributes"):
        assert before[key] == after[key], key


def test_resize_keeps_existing_rows_and_zero_extends_b():
    model = tiny_peft_model()
    adapter, layers = lora_layers(model)
    old_a = {n: layer.lora_A[adapter].weight.detach().clone() for n, layer in layers.items()}
    plan = allocate_ranks(model, random_batches(3), progress=False)
    for name, layer in layers.items():
        keep = min(8, plan.ranks[name])
        assert torch.equal(layer.lora_A[adapter].weight[:keep], old_a[name][:keep])
        assert torch.count_nonzero(layer.lora_B[adapter].weight) == 0
        if plan.ranks[name] > 8:  # new rows are fresh draws, not copies or zeros
            assert torch.count_nonzero(layer.lora_A[adapter].weight[8:]) > 0


def test_allocation_is_deterministic_for_a_seed():
    models = [tiny_peft_model(seed=3) for _ in range(2)]
    plans = []
    for model in models:  # each seeded anew, as tiny_peft_model(seed=3) seeds torch
        torch.manual_seed(3)
        plans.append(allocate_ranks(model, random_batches(3, seed=1), progress=False))
    assert plans[0].ranks == plans[1].ranks and plans[0].scores == plans[1].scores
    # some module grew: its new rows of A were drawn (from torch's global generator), and drawn
    # the same in both runs, so the two models are the same, parameter for parameter
    assert max(plans[0].ranks.values()) > 8
    params = [dict(model.named_parameters()) for model in models]
    assert params[0].keys() == params[1].keys()
    for name, tensor in params[0].items():
        assert torch.equal(tensor, params[1][name]), name


def test_per_example_equals_batch_estimator_for_single_example_batches_and_dominates_otherwise():
    model = tiny_peft_model()
    singles = random_batches(3, batch_size=1)
    batch_f, _ = fisher_of_b(model, singles, estimator="batch", progress=False)
    example_f, _ = fisher_of_b(model, singles, estimator="per_example", progress=False)
    for name in batch_f:
        torch.testing.assert_close(example_f[name], batch_f[name], rtol=1e-4, atol=1e-12)
    # For one batch of N: mean_i (N G_i)^2 >= (Σ_i G_i)^2 elementwise (Jensen).
    one = random_batches(1, batch_size=6)
    batch_f, _ = fisher_of_b(model, one, estimator="batch", progress=False)
    example_f, _ = fisher_of_b(model, one, estimator="per_example", progress=False)
    for name in batch_f:
        assert (example_f[name] >= batch_f[name] * (1 - 1e-5) - 1e-12).all(), name


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_padding_does_not_change_the_statistics(estimator):
    model = tiny_peft_model("llama")
    narrow = random_batches(2, seq=10, seed=4)
    wide = []
    for b in narrow:
        extra = 7
        wide.append(
            {
                "input_ids": torch.nn.functional.pad(b["input_ids"], (0, extra), value=0),
                "attention_mask": torch.nn.functional.pad(b["attention_mask"], (0, extra), value=0),
                "labels": b["labels"],
            }
        )
    f_narrow, _ = fisher_of_b(model, narrow, estimator=estimator, progress=False)
    f_wide, _ = fisher_of_b(model, wide, estimator=estimator, progress=False)
    for name in f_narrow:
        torch.testing.assert_close(f_wide[name], f_narrow[name], rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_trained_adapter_reloads_in_stock_peft_with_allocated_shapes_and_outputs(arch, tmp_path):
    model = tiny_peft_model(arch, seed=1)
    plan = allocate_ranks(model, random_batches(3), progress=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in random_batches(3, seed=5):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter, layers = lora_layers(model)
    assert all(torch.count_nonzero(layer.lora_B[adapter].weight) > 0 for layer in layers.values())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == plan.ranks

    reloaded = PeftModel.from_pretrained(_plain_base(arch), tmp_path)
    _, reloaded_layers = lora_layers(reloaded)
    for name, layer in reloaded_layers.items():
        assert layer.r[adapter] == plan.ranks[name]
        assert layer.lora_A[adapter].weight.shape[0] == plan.ranks[name]
    probe = random_batches(2, seed=11)
    torch.testing.assert_close(logits(reloaded, probe), logits(model, probe), rtol=0, atol=1e-6)


def _plain_base(arch):
    """The untouched base model that tiny_peft_model(arch, seed=1) wraps."""
    return tiny_peft_model(arch, seed=1).unload()


def test_rslora_and_plain_alpha_scaling():
    model = tiny_peft_model(rslora=True)
    adapter, layers = lora_layers(model)
    scaling = {n: layer.scaling[adapter] for n, layer in layers.items()}
    plan = allocate_ranks(model, random_batches(2), progress=False)
    for name, layer in layers.items():
        assert layer.scaling[adapter] == pytest.approx(scaling[name], rel=1e-12)
        assert plan.alphas[name] == pytest.approx(scaling[name] * plan.ranks[name] ** 0.5)
    model = tiny_peft_model()
    plan = allocate_ranks(model, random_batches(2), keep_scaling=False, progress=False)
    for name, layer in lora_layers(model)[1].items():
        assert layer.scaling[adapter] == pytest.approx(16 / plan.ranks[name])


def test_parameter_budget_is_respected_and_maximal():
    model = tiny_peft_model()
    plan = allocate_ranks(model, random_batches(3), budget="params", progress=False)
    assert plan.spent() <= plan.budget == sum(8 * c for c in plan.costs.values())
    assert all(
        plan.ranks[m] == plan.r_max or plan.spent() + plan.costs[m] > plan.budget
        for m in plan.ranks
    )


def test_random_rank_control_is_seeded_and_exact():
    ranks = [random_ranks(tiny_peft_model(), seed=s).ranks for s in (0, 0, 1)]
    assert ranks[0] == ranks[1] != ranks[2]
    assert sum(ranks[2].values()) == 8 * len(ranks[2])


def test_fim_lora_runs_the_paper_estimator_and_the_batch_one_is_a_named_variant():
    assert get_method("fim-lora").options["estimator"] == "per_example"
    assert TrainConfig().estimator == "per_example"
    assert inspect.signature(allocate_ranks).parameters["estimator"].default == "per_example"
    assert base_method("fim-lora-batch") == "fim-lora"
    # the variant's fixed option wins over the runner's setting
    variant = get_method("fim-lora-batch", {"estimator": "per_example", "progress": False})
    assert variant.name == "fim-lora-batch" and variant.options["estimator"] == "batch"
    assert method_names("fim-lora-batch+filet,fim-lora") == ["fim-lora-batch+filet", "fim-lora"]
    with pytest.raises(ConfigError, match="one rank allocator"):
        get_method("fim-lora+fim-lora-batch")

    composed = get_method("filet+fim-lora-batch", {"calib_batches": 2, "progress": False})
    assert [m.name for m in composed.members] == ["fim-lora-batch", "filet"]
    model = tiny_peft_model(rank=4)
    batches = random_batches(2)
    before = logits(model, batches)
    info = composed.prepare(model, batches)
    plan = info["fim-lora-batch"]["rank_plan"]
    assert plan["estimator"] == "batch" and plan["budget_mode"] == "params"
    adapter, layers = lora_layers(model)
    assert {n: layer.r[adapter] for n, layer in layers.items()} == plan["ranks"]
    torch.testing.assert_close(logits(model, batches), before, atol=1e-5, rtol=0)  # FILet init


@pytest.mark.parametrize("rank", [4, 8])
def test_runner_allocators_match_lora_adapter_parameters_within_one_percent(rank):
    """With the runner's defaults (budget in parameters) fim-lora and random-rank train at most
    LoRA's adapter parameters at the same r, and less by under 1 % (ranks moved between
    modules of different widths would otherwise change the count)."""
    options = method_options(TrainConfig(rank=rank, calib_batches=2), progress=False)
    lora = count_parameters(tiny_peft_model(rank=rank))["adapter_params"]
    for name, seed in [("fim-lora", 0), *(("random-rank", s) for s in range(5))]:
        model = tiny_peft_model(rank=rank)
        get_method(name, options | {"seed": seed}).prepare(model, random_batches(2))
        adapter, layers = lora_layers(model)
        assert len({layer.r[adapter] for layer in layers.values()}) > 1, name  # ranks did move
        counted = count_parameters(model)
        assert 0.99 * lora <= counted["adapter_params"] <= lora, (name, seed)
        assert counted["effective_adapter_params"] == counted["adapter_params"]
    in_ranks = []  # why params is the default: a budget in ranks drifts in parameters
    for seed in range(5):
        model = tiny_peft_model(rank=rank)
        get_method("random-rank", options | {"budget": "ranks", "seed": seed}).prepare(model, [])
        in_ranks.append(count_parameters(model)["adapter_params"])
    assert any(n != lora for n in in_ranks)


def test_infeasible_bounds_raise_and_leave_the_model_unchanged():
    model = tiny_peft_model()
    before = snapshot(model)
    with pytest.raises(
        ConfigError, match=r"rank budget 104 is infeasible for 13 modules with r_min=9"
    ):
        allocate_ranks(model, random_batches(2), r_min=9, progress=False)
    with pytest.raises(ConfigError, match="unknown FIM-LoRA estimator"):
        allocate_ranks(model, random_batches(2), estimator="exact", progress=False)
    assert_unchanged(before, snapshot(model))


def test_bad_calibration_data_raises_and_leaves_the_model_unchanged():
    model = tiny_peft_model()
    before = snapshot(model)
    with pytest.raises(CalibrationError, match="yielded no batch"):
        allocate_ranks(model, [], progress=False)
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in random_batches(1)]
    with pytest.raises(CalibrationError, match="no 'labels'"):
        allocate_ranks(model, no_labels, progress=False)
    assert_unchanged(before, snapshot(model))


def test_fewer_batches_than_asked_warns_with_the_count_used():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = allocate_ranks(tiny_peft_model(), random_batches(3), n_batches=8, progress=False)
    assert plan.calibration_batches == 3
    assert any("after 3 of the 8 batches" in str(w.message) for w in caught)


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_nan_gradient_names_the_module_and_changes_nothing(estimator):
    model = tiny_peft_model()
    before = snapshot(model)
    classifier = model.base_model.model.classifier
    handle = classifier.register_forward_hook(lambda m, i, out: out * float("nan"))
    try:
        with pytest.raises(CalibrationError, match=r"non-finite gradient .* module 'bert\."):
            allocate_ranks(model, random_batches(2), estimator=estimator, progress=False)
    finally:
        handle.remove()
    assert_unchanged(before, snapshot(model))


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_finiteness_is_read_once_per_batch_for_all_modules(estimator, monkeypatch):
    # One device-to-host read per batch (on a GPU a sync per module per batch would stall the
    # passes); the check covers every module's sums.
    from fisherlora.methods import fim_lora

    calls = []
    real = fim_lora.check_all_finite
    monkeypatch.setattr(
        fim_lora, "check_all_finite", lambda t, *a: calls.append(set(t)) or real(t, *a)
    )
    model = tiny_peft_model()
    _, layers = lora_layers(model)
    allocate_ranks(model, random_batches(3), n_batches=3, estimator=estimator, progress=False)
    assert calls == [set(layers)] * 3


def test_check_all_finite_names_the_first_bad_module_in_order():
    from fisherlora.capture import check_all_finite

    good, bad = torch.ones(2, 2), torch.tensor([1.0, float("inf")])
    check_all_finite({"a": good, "b": good})  # nothing raised
    check_all_finite({})
    with pytest.raises(CalibrationError, match=r"non-finite energy .* module 'b'"):
        check_all_finite({"a": good, "b": bad, "c": bad * float("nan")}, "energy")


def test_hooks_are_removed_when_the_forward_pass_raises():
    model = tiny_peft_model()
    before = snapshot(model)
    bad = random_batches(1)
    bad[0]["input_ids"] = bad[0]["input_ids"] + 1000  # out of the vocabulary: embedding raises
    with pytest.raises(IndexError):
        allocate_ranks(model, bad, estimator="per_example", progress=False)
    assert_unchanged(before, snapshot(model))


def test_model_without_lora_or_with_trained_b_is_rejected():
    with pytest.raises(ConfigError, match="PeftModel"):
        allocate_ranks(tiny_peft_model().unload(), random_batches(1), progress=False)
    model = tiny_peft_model()
    adapter, layers = lora_layers(model)
    with torch.no_grad():
        next(iter(layers.values())).lora_B[adapter].weight.fill_(0.1)
    with pytest.raises(ConfigError, match="B = 0"):
        allocate_ranks(model, random_batches(1), progress=False)


def test_runner_writes_rank_plan_and_rank_map(tmp_path, small_csv, capsys):
    csv = small_csv
    out = tmp_path / "run"
    code = run_tiny(
        csv,
        out,
        "--method",
        "fim-lora",
        "--calib-batches",
        "2",
        "--r-min",
        "2",
        "--r-max",
        "12",
        "--steps",
        "2",
    )
    capsys.readouterr()
    assert code == 0
    ranks = json.loads((out / "ranks.json").read_text())
    # the runner's defaults: the paper's estimator, a budget in parameters (LoRA's, at most)
    assert (ranks["estimator"], ranks["budget_mode"]) == ("per_example", "params")
    assert ranks["spent"] <= ranks["budget"] and ranks["calibration_batches"] == 2
    assert all(2 <= r <= 12 for r in ranks["ranks"].values())
    assert (out / "rank_map.png").stat().st_size > 1000
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["timings"]["init_s"] > 0
    assert metrics["adapter_params"] == metrics["effective_adapter_params"] == ranks["spent"]
    assert metrics["prepare"]["rank_plan"]["ranks"] == ranks["ranks"]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == ranks["ranks"]


def test_every_entry_point_rounds_to_the_largest_total_by_default():
    for function in (water_fill, plan_ranks, allocate_ranks, random_ranks, FimLoRA, RandomRank):
        assert inspect.signature(function).parameters["rounding"].default == "largest"
    assert TrainConfig().rounding == "largest"
    plans = [
        random_ranks(tiny_peft_model(), seed=3, budget="params", **extra)
        for extra in ({}, {"rounding": "largest"})
    ]
    assert plans[0].rounding == "largest" and plans[0].ranks == plans[1].ranks


def test_largest_rounding_reaches_the_allocators_and_spends_at_least_as_much():
    plans = {
        rounding: random_ranks(tiny_peft_model(), seed=3, budget="params", rounding=rounding)
        for rounding in ("maximal", "largest")
    }
    assert plans["largest"].rounding == "largest" and plans["maximal"].rounding == "maximal"
    assert plans["maximal"].spent() <= plans["largest"].spent() <= plans["largest"].budget
    assert json.loads(json.dumps(plans["largest"].to_dict()))["rounding"] == "largest"
    model = tiny_peft_model()
    plan = allocate_ranks(model, random_batches(3), budget="params", rounding="largest")
    assert plan.rounding == "largest" and plan.spent() <= plan.budget
    method = get_method("fim-lora", {"rounding": "largest"})
    assert method.options["rounding"] == "largest"
    assert get_method("random-rank", {"rounding": "largest"}).options["rounding"] == "largest"
    with pytest.raises(ConfigError, match="rounding"):
        get_method("fim-lora", {"rounding": "nearest"})
    config = TrainConfig(method="fim-lora", rounding="largest")
    assert method_options(config)["rounding"] == "largest"
