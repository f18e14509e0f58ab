import copy
import json
import math

import pytest
import torch
from conftest import random_batches, run_tiny, tiny_peft_model

from fisherlora.adapters import lora_layers
from fisherlora.errors import ConfigError
from fisherlora.methods.fw_lora import FisherPenalty


def reference_grad_sq_norms(model, batches):
    """‖∇W‖²_F per LoRA layer the slow way: requires_grad on a copy's frozen weights, read W.grad."""
    ref = copy.deepcopy(model)
    _, layers = lora_layers(ref)
    weights = {n: layer.get_base_layer().weight for n, layer in layers.items()}
    for w in weights.values():
        w.requires_grad_(True)
    ref.train()
    for batch in batches:
        ref(**batch).loss.backward()
    return {n: w.grad.double().square().sum().item() for n, w in weights.items()}


def no_dropout_model(arch="llama", seed=0):
    return tiny_peft_model(arch, seed=seed)  # the tiny Llama has no dropout: runs are deterministic


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_exact_estimator_matches_the_requires_grad_reference(micro_batches):
    model = no_dropout_model()
    batches = random_batches(micro_batches, seed=3)
    penalty = FisherPenalty(model, warmup_steps=5, estimator="exact")
    for batch in batches:  # micro-batches of one optimizer step
        model(**batch).loss.backward()
    penalty.step()
    reference = reference_grad_sq_norms(model, batches)
    for name, value in reference.items():
        assert penalty.last_proxy[name] == pytest.approx(value, rel=1e-5), name
    _, layers = lora_layers(model)
    for layer in layers.values():  # the frozen weights were never touched
        weight = layer.get_base_layer().weight
        assert weight.grad is None and not weight.requires_grad


def test_sketch_is_unbiased_and_its_spread_is_within_sqrt_2_over_k():
    torch.manual_seed(0)
    x, g = torch.randn(50, 24), torch.randn(50, 16)
    exact = (g.T @ x).square().sum().item()
    k, draws = 8, 2000
    generator = torch.Generator().manual_seed(1)
    estimates = torch.tensor(
        [
            (g.T @ (x @ torch.randn(24, k, generator=generator))).square().sum().item() / k
            for _ in range(draws)
        ]
    )
    bound = math.sqrt(2 / k)
    assert abs(estimates.mean().item() / exact - 1) < 4 * bound / math.sqrt(draws)
    assert estimates.std().item() / exact <= bound


def test_sketch_in_the_training_hooks_agrees_with_exact_on_average():
    model = no_dropout_model()
    batches = random_batches(1, seed=3)
    reference = reference_grad_sq_norms(model, batches)
    ratios = []
    for seed in range(40):
        penalty = FisherPenalty(model, warmup_steps=5, estimator="sketch", probes=8, seed=seed)
        model(**batches[0]).loss.backward()
        penalty.step()
        penalty.remove_hooks()
        model.zero_grad()
        ratios.append(sum(penalty.last_proxy.values()) / sum(reference.values()))
    mean = sum(ratios) / len(ratios)
    assert abs(mean - 1) < 4 * math.sqrt(2 / 8) / math.sqrt(len(ratios))


def test_penalty_equals_the_dense_formula_and_importance_sums_to_one():
    model = no_dropout_model()
    _, layers = lora_layers(model)
    adapter = "default"
    with torch.no_grad():  # B = 0 at init would make the penalty trivially zero
        for layer in layers.values():
            layer.lora_B[adapter].weight.normal_()
    penalty = FisherPenalty(model, warmup_steps=2, lam=0.3)

    def dense(importance):
        total = 0.0
        for i, layer in enumerate(layers.values()):
            delta = (
                layer.scaling[adapter] * layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight
            )
            total += 0.3 * (1 - importance[i]) * delta.double().square().sum().item()
        return total

    assert penalty.penalty().item() == pytest.approx(
        dense([0.0] * len(layers)), rel=1e-5
    )  # warm-up: I = 0
    assert set(penalty.importance().values()) == {0.0}
    for batch in random_batches(2, seed=4):
        model(**batch).loss.backward()
        model.zero_grad()
        penalty.step()
    importance = list(penalty.importance().values())
    assert sum(importance) == pytest.approx(1.0)
    assert penalty.penalty().item() == pytest.approx(dense(importance), rel=1e-5)
    spread = penalty.spread()
    assert spread["max_over_min_importance"] >= 1
    assert spread["min_one_minus_importance"] == pytest.approx(1 - max(importance))


def test_hooks_are_removed_after_warm_up_and_max_normalisation():
    model = no_dropout_model()
    penalty = FisherPenalty(model, warmup_steps=2, normalize="max")
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert hooks == len(lora_layers(model)[1])
    for batch in random_batches(2):
        model(**batch).loss.backward()
        model.zero_grad()
        penalty.step()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert max(penalty.importance().values()) == pytest.approx(1.0)


def test_decay_mode_scales_each_modules_weight_decay_after_warm_up():
    model = no_dropout_model()
    penalty = FisherPenalty(model, warmup_steps=2, lam=0.01, mode="decay")
    optimizer = torch.optim.AdamW(penalty.param_groups(), lr=1e-3)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.01}
    assert penalty.penalty().item() == 0.0
    for batch in random_batches(2):
        model(**batch).loss.backward()
        optimizer.step()
        penalty.step()
        optimizer.zero_grad()
    importance = penalty.importance()
    for group in optimizer.param_groups:
        assert group["weight_decay"] == pytest.approx(
            0.01 * (1 - importance[group["fisher_module"]])
        )


def run(model, penalty, optimizer, batches):
    losses = []
    for batch in batches:
        loss = model(**batch).loss + penalty.penalty()
        loss.backward()
        optimizer.step()
        penalty.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_resume_after_warm_up_continues_the_same_schedule():
    batches = random_batches(7, seed=8)

    def fresh():
        model = no_dropout_model(seed=2)
        penalty = FisherPenalty(model, warmup_steps=3, lam=0.05, estimator="sketch")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, penalty, optimizer

    model, penalty, optimizer = fresh()
    uninterrupted = run(model, penalty, optimizer, batches)
    importance = penalty.importance()

    model, penalty, optimizer = fresh()
    first = run(model, penalty, optimizer, batches[:4])
    checkpoint = copy.deepcopy(
        {
            "model": {
                n: p
                for n, p in model.state_dict().items()
                if "lora_" in n or "modules_to_save" in n
            },
            "optimizer": optimizer.state_dict(),
            "penalty": penalty.state_dict(),
        }
    )
    model, penalty, optimizer = fresh()
    model.load_state_dict(checkpoint["model"], strict=False)
    optimizer.load_state_dict(checkpoint["optimizer"])
    penalty.load_state_dict(checkpoint["penalty"])
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # past warm-up: no hooks
    resumed = run(model, penalty, optimizer, batches[4:])
    assert penalty.importance() == importance
    assert first + resumed == uninterrupted


def test_bad_options_and_models_are_rejected():
    model = no_dropout_model()
    with pytest.raises(ConfigError, match="unknown FW-LoRA estimator"):
        FisherPenalty(model, estimator="dense")
    with pytest.raises(ConfigError, match="probes >= 1"):
        FisherPenalty(model, probes=0)
    with pytest.raises(ConfigError, match="PeftModel"):
        FisherPenalty(model.unload())
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # nothing registered


def test_runner_reports_importance_spread_and_penalty_share(tmp_path, small_csv, capsys):
    csv = small_csv
    out = tmp_path / "run"
    code = run_tiny(
        csv,
        out,
        "--method",
        "fw-lora",
        "--steps",
        "6",
        "--fw-warmup-steps",
        "2",
        "--fw-lambda",
        "0.1",
        "--eval-every",
        "3",
    )
    capsys.readouterr()
    assert code == 0
    report = json.loads((out / "fw_lora.json").read_text())
    assert sum(report["importance"].values()) == pytest.approx(1.0)
    assert report["spread"]["max_one_minus_importance"] <= 1.0
    assert (out / "importance.png").stat().st_size > 1000
    curve = (out / "curve.csv").read_text().splitlines()
    assert curve[0].split(",")[:3] == ["step", "train_loss", "extra_loss"]
    assert all(float(row.split(",")[2]) > 0 for row in curve[1:])  # the penalty is in the loss


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_shared_input_computes_the_kept_input_once_per_input_tensor(arch):
    from fisherlora.capture import register_io_hooks

    model = tiny_peft_model(arch, seed=1).eval()  # no dropout: both passes see the same inputs
    _, layers = lora_layers(model)
    batch = random_batches(1, seed=2)[0]
    seen = {}
    for shared in (False, True):
        calls, kept_by_name = [], {}

        def keep(name, x, mask, calls=calls):
            calls.append(name)
            return x.reshape(-1, x.shape[-1]) @ torch.ones(x.shape[-1], 2)

        def callback(name, kept, g, mask, kept_by_name=kept_by_name):
            kept_by_name[name] = kept

        handles = register_io_hooks(layers, callback, [None], keep, shared_input=shared)
        try:
            model(**batch).loss.backward()
        finally:
            for handle in handles:
                handle.remove()
        seen[shared] = (calls, kept_by_name)
    (all_calls, unshared), (few_calls, shared_kept) = seen[False], seen[True]
    assert len(all_calls) == len(layers)
    # per layer 4 distinct inputs: bert q/k/v, attention output, FFN in, FFN out (+ the pooler);
    # llama q/k/v_proj, o_proj, gate/up_proj, down_proj
    assert len(few_calls) == 4 * 2 + (1 if arch == "bert" else 0)
    assert unshared.keys() == shared_kept.keys()
    for name in unshared:
        torch.testing.assert_close(shared_kept[name], unshared[name])
