import copy
import json
import math
import warnings

import pytest
import torch
from conftest import random_batches, run_tiny, tiny_peft_model

from fisherlora.adapters import lora_layers
from fisherlora.errors import ConfigError
from fisherlora.methods.fw_lora import FisherPenalty, FwLoRA


def reference_grad_sq_norms(model, batches):
    """‖∇W‖²_F per LoRA layer the slow way (:func:`reference_grads`)."""
    return {n: g.square().sum().item() for n, g in reference_grads(model, batches).items()}


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


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_sketch_in_the_training_hooks_is_unbiased_with_the_stated_spread(micro_batches):
    # Over probe seeds the library's sketch of every module's ‖Σ_micro GᵀX‖²_F averages to the
    # exact value and spreads by at most √(2/k) (relative). Squaring each micro-batch's product
    # apart, or drawing other probes per micro-batch, would bias the two-micro-batch case.
    model = no_dropout_model()
    batches = random_batches(micro_batches, seed=3)
    reference = reference_grad_sq_norms(model, batches)
    probes, draws = 8, 60
    estimates = {name: [] for name in reference}
    for seed in range(draws):
        penalty = FisherPenalty(model, warmup_steps=5, estimator="sketch", probes=probes, seed=seed)
        for batch in batches:
            model(**batch).loss.backward()
        penalty.step()
        penalty.remove_hooks()
        model.zero_grad()
        for name, value in penalty.last_proxy.items():
            estimates[name].append(value / reference[name])
    bound = math.sqrt(2 / probes)
    ratios = torch.tensor(list(estimates.values()), dtype=torch.float64)  # [modules, draws]
    weights = torch.tensor(list(reference.values()), dtype=torch.float64)[:, None]
    total = (ratios * weights).sum(0) / weights.sum()
    assert abs(total.mean().item() - 1) < 4 * bound / math.sqrt(draws)
    for name, row in zip(estimates, ratios, strict=True):
        assert abs(row.mean().item() - 1) < 4 * bound / math.sqrt(draws), name
    # relative spread ≤ √(2/k) (the rank-1 worst case), pooled over modules and draws; 1.2 allows
    # for the sampling error of a std from a skewed (chi-square) distribution
    assert (ratios - 1).square().mean().sqrt().item() <= 1.2 * bound


def reference_grads(model, batches):
    """∇W = Σ_micro Gᵀ X per LoRA layer (float64) the slow way: requires_grad on a copy's frozen
    weights, read W.grad."""
    ref = copy.deepcopy(model)
    _, layers = lora_layers(ref)
    weights = {n: layer.get_base_layer().weight for n, layer in layers.items()}
    for w in weights.values():
        w.requires_grad_(True)
    ref.train()
    for batch in batches:
        ref(**batch).loss.backward()
    return {n: w.grad.double() for n, w in weights.items()}


def test_sketch_equals_the_probe_formula_on_the_codes_own_probes():
    # Deterministic: rebuild Ω exactly as FisherPenalty draws it (one generator seeded from
    # (seed, step, input width), standard normal [n, k]) and check that the recorded proxy is
    # ‖∇W Ω‖²_F / k with ∇W from the requires_grad reference, step by step. The statistical test
    # above cannot see a small bias (dividing by k - 1 instead of k passes it); this can.
    model = no_dropout_model()
    probes, seed = 8, 11
    steps = [random_batches(2, seed=3), random_batches(1, seed=4)]  # micro-batches per step
    # before the penalty exists: a deep copy made later would carry its hooks along
    references = [reference_grads(model, batches) for batches in steps]
    penalty = FisherPenalty(model, warmup_steps=5, estimator="sketch", probes=probes, seed=seed)
    for step, (batches, grads) in enumerate(zip(steps, references, strict=True)):
        for batch in batches:
            model(**batch).loss.backward()
        model.zero_grad()
        penalty.step()
        assert penalty.last_proxy.keys() == grads.keys()
        for name, grad in grads.items():
            n = grad.shape[1]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 7_919 + n)
            omega = torch.randn(n, probes, generator=generator).double()
            expected = (grad @ omega).square().sum().item() / probes
            assert penalty.last_proxy[name] == pytest.approx(expected, rel=1e-5), (step, name)
    penalty.remove_hooks()


def test_penalty_equals_the_dense_formula_and_importance_sums_to_one():
    model = no_dropout_model()
    _, layers = lora_layers(model)
    adapter = "default"
    penalty = FisherPenalty(model, warmup_steps=2, lam=0.3)  # B₀ = 0: ΔW = s B A
    assert not penalty.residual_init
    with torch.no_grad():  # as training would move B away from zero
        for layer in layers.values():
            layer.lora_B[adapter].weight.normal_()

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
    assert spread["max_over_min_importance"] == pytest.approx(max(importance) / min(importance))
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


def test_decay_mode_scales_the_optimizers_weight_decay_by_one_minus_importance():
    model = no_dropout_model()
    penalty = FisherPenalty(model, warmup_steps=2, lam=0.5, mode="decay")
    optimizer = torch.optim.AdamW(penalty.param_groups(0.01), lr=1e-3)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.01}  # warm-up: I = 0
    assert penalty.penalty().item() == 0.0
    for batch in random_batches(2):
        model(**batch).loss.backward()
        optimizer.step()
        penalty.step()
        optimizer.zero_grad()
    importance = penalty.importance()
    assert len({round(v, 12) for v in importance.values()}) > 1
    for group in optimizer.param_groups:  # the optimizer's decay x (1 - I_m); lam plays no part
        assert group["weight_decay"] == pytest.approx(
            0.01 * (1 - importance[group["fisher_module"]])
        )
    with pytest.raises(ConfigError, match=r"weight_decay=0\.0 it does nothing"):
        FisherPenalty(no_dropout_model(), warmup_steps=2, mode="decay").param_groups(0.0)


def residual_init(model, seed=5):
    """A residual init as FILet makes it: random A₀, B₀ ≠ 0 and W_res = W − s B₀ A₀."""
    generator = torch.Generator().manual_seed(seed)
    adapter, layers = lora_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            a.copy_(torch.randn(a.shape, generator=generator) * 0.3)
            b.copy_(torch.randn(b.shape, generator=generator) * 0.3)
            base = layer.get_base_layer().weight
            base -= layer.scaling[adapter] * b @ a
    return {
        n: (
            layer.lora_A[adapter].weight.detach().clone(),
            layer.lora_B[adapter].weight.detach().clone(),
        )
        for n, layer in layers.items()
    }


def dense_update_penalty(model, initial, importance, lam):
    """λ Σ (1 − I_m) ‖s (B A − B₀ A₀)‖²_F with the m×n products formed (the reference)."""
    adapter, layers = lora_layers(model)
    total = 0.0
    for i, (name, layer) in enumerate(layers.items()):
        a0, b0 = initial[name]
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        delta = layer.scaling[adapter] * (b @ a - b0 @ a0)
        total = total + lam * (1 - importance[i]) * delta.square().sum()
    return total


def test_after_a_residual_init_the_penalty_measures_the_update_from_the_pretrained_weight():
    model = no_dropout_model()
    initial = residual_init(model)
    penalty = FisherPenalty(model, warmup_steps=2, lam=0.3)
    assert penalty.residual_init
    # zero at the starting point, where the old ‖s B A‖² was large
    zero_start = {n: (a, torch.zeros_like(b)) for n, (a, b) in initial.items()}
    old_penalty = dense_update_penalty(model, zero_start, [0.0] * len(initial), 0.3).item()
    assert old_penalty > 1
    assert abs(penalty.penalty().item()) <= 1e-6 * old_penalty
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in random_batches(4, seed=4):
        (model(**batch).loss + penalty.penalty()).backward()
        optimizer.step()
        penalty.step()
        optimizer.zero_grad()
    importance = list(penalty.importance().values())
    expected = dense_update_penalty(model, initial, importance, 0.3)
    assert expected.item() > 0
    assert penalty.penalty().item() == pytest.approx(expected.item(), rel=1e-4)
    # its gradient is the dense formula's gradient
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    got = torch.autograd.grad(penalty.penalty(), params)
    want = torch.autograd.grad(dense_update_penalty(model, initial, importance, 0.3), params)
    for g, w in zip(got, want, strict=True):  # both in float32: compared by norm
        assert (g - w).norm() <= 1e-4 * w.norm()
    # the starting point travels in the state: a penalty made on the trained model (whose
    # factors are no longer B₀, A₀) measures from the right place once the state is loaded
    later = FisherPenalty(model, warmup_steps=2, lam=0.3)
    later.load_state_dict(penalty.state_dict())
    assert later.penalty().item() == pytest.approx(expected.item(), rel=1e-4)


def test_decay_mode_is_refused_after_a_residual_init_and_changes_nothing():
    model = no_dropout_model()
    residual_init(model)
    with pytest.raises(ConfigError, match="mode='decay' after an init with B0 != 0"):
        FisherPenalty(model, warmup_steps=2, mode="decay")
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


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
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # nothing registered
    # a model without LoRA layers (its own copy: unload strips the layers, hooks and all)
    with pytest.raises(ConfigError, match="PeftModel"):
        FisherPenalty(no_dropout_model().unload())


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
    assert report["spread"]["max_one_minus_importance"] == pytest.approx(
        1 - min(report["importance"].values())
    )
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


def test_an_input_buffer_refilled_in_place_is_kept_again_not_served_from_the_cache():
    # one static input buffer, refilled with the next step's data: the same tensor object, so
    # the shared-input cache (keyed by identity) reused step 1's kept input before
    from peft import LoraConfig, get_peft_model

    from fisherlora.capture import register_io_hooks

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    _, layers = lora_layers(model)
    kept_sums = []
    handles = register_io_hooks(
        layers,
        lambda name, kept, g, mask: kept_sums.append(kept.sum().item()),
        [None],
        lambda name, x, mask: x.clone(),
        shared_input=True,
    )
    buffer = torch.zeros(4, 8)
    try:
        for fill in (1.0, 5.0):
            buffer.fill_(fill)
            model(buffer).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    assert kept_sums == [4 * 8 * 1.0, 4 * 8 * 5.0]


def test_the_penalty_sketch_reads_a_buffer_refilled_in_place_as_new_data():
    # FW-LoRA's own hooks cache the kept input by tensor identity too: a static buffer refilled
    # with step 2's (10x larger) data was served step 1's sketch (proxy 1.6e2 against 1.8e4)
    from peft import LoraConfig, get_peft_model

    proxies = {}
    for estimator in ("exact", "sketch"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
        model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
        penalty = FisherPenalty(model, warmup_steps=5, estimator=estimator, probes=4096)
        buffer = torch.zeros(64, 32)
        data = torch.Generator().manual_seed(1)
        for step in range(2):
            buffer.copy_(torch.randn(64, 32, generator=data) * (1 + 9 * step))
            model(buffer).square().sum().backward()
            model.zero_grad()
            penalty.step()
        penalty.remove_hooks()
        proxies[estimator] = next(iter(penalty.last_proxy.values()))
    # k = 4096 probes: relative standard deviation ≤ √(2/k) ≈ 2.2 %, so rel=0.1 is 4.5 sigma
    # (step 1's stale sketch was off by a factor of ~100; a sketch biased by 14 % fails too)
    assert proxies["sketch"] == pytest.approx(proxies["exact"], rel=0.1)


def test_a_second_penalty_on_a_model_removes_the_warm_up_hooks_of_the_first():
    model = tiny_peft_model("bert")

    def hooks():
        return sum(len(m._forward_hooks) for m in model.modules())

    first = FisherPenalty(model, warmup_steps=5)
    one_penalty = hooks()
    assert one_penalty > 0
    with pytest.warns(UserWarning, match="earlier FisherPenalty was still in its warm-up"):
        second = FisherPenalty(model, warmup_steps=5)
    assert hooks() == one_penalty and first._handles == [] and second._handles
    for batch in random_batches(5):  # the second finishes its warm-up: no hook is left
        model(**batch).loss.backward()
        model.zero_grad()
        second.step()
    assert hooks() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left to remove: no warning
        FisherPenalty(model, warmup_steps=5).remove_hooks()


def test_runner_refuses_decay_mode_without_a_weight_decay_before_any_work(
    tmp_path, small_csv, capsys
):
    out = tmp_path / "run"
    code = run_tiny(small_csv, out, "--method", "fw-lora", "--fw-mode", "decay", "--steps", "2")
    assert code == 2
    assert "multiplies the optimizer's weight decay" in capsys.readouterr().err
    assert not out.exists()
    code = run_tiny(
        small_csv,
        out,
        "--method",
        "fw-lora",
        "--fw-mode",
        "decay",
        "--weight-decay",
        "0.1",
        "--steps",
        "3",
        "--fw-warmup-steps",
        "2",
    )
    assert code == 0


# -- the penalty's single autograd node (UpdatePenalty) --------------------------------------
MIXED_RANKS = dict(
    rank_pattern={"layers.0.self_attn.q_proj": 3, "gate_proj": 5, "layers.1.mlp.down_proj": 2},
    alpha_pattern={"k_proj": 4, "layers.1.mlp.up_proj": 32},
)


def mixed_rank_model(dtype=torch.float64):
    """The tiny Llama with ranks and scalings that differ within modules of one width (as after
    a FIM-LoRA allocation), in ``dtype``."""
    return tiny_peft_model("llama", seed=4, **MIXED_RANKS).to(dtype)


def naive_penalty(model, initial, importance, lam):
    """λ Σ (1 − I_m) ‖s (B A − B₀ A₀)‖²_F with every m×n product formed (``initial[name]``
    None: B₀ = 0), differentiable by autograd."""
    adapter, layers = lora_layers(model)
    total = 0.0
    for i, (name, layer) in enumerate(layers.items()):
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        delta = b @ a if initial[name] is None else b @ a - initial[name][1] @ initial[name][0]
        total = total + lam * (1 - importance[i]) * (layer.scaling[adapter] * delta).square().sum()
    return total


@pytest.mark.parametrize("start", ["b0-zero", "residual"])
def test_update_penalty_value_and_gradients_equal_the_dense_formula_in_float64(start):
    model = mixed_rank_model()
    adapter, layers = lora_layers(model)
    initial = residual_init(model) if start == "residual" else dict.fromkeys(layers)
    penalty = FisherPenalty(model, warmup_steps=2, lam=0.3)
    assert penalty.residual_init == (start == "residual")
    ranks = {layer.lora_A[adapter].weight.shape[0] for layer in layers.values()}
    assert ranks == {2, 3, 5, 8}
    assert any(not group.uniform for group in penalty._plan)  # zero-padded ranks are exercised
    assert len({layer.scaling[adapter] for layer in layers.values()}) > 1
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():  # as training would move A and B away from where they started
        for layer in layers.values():
            for w in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                w += 0.2 * torch.randn(w.shape, generator=generator, dtype=w.dtype)
    importance = torch.rand(len(layers), generator=generator, dtype=torch.float64)
    penalty.importance_ = importance / importance.sum()
    penalty._coefficients = None
    importance = penalty.importance_.tolist()

    params = [p for n, p in model.named_parameters() if "lora_" in n]
    value = penalty.penalty()
    assert value.dtype == torch.float64
    want = naive_penalty(model, initial, importance, 0.3)
    assert value.item() == pytest.approx(want.item(), rel=1e-12)
    got = torch.autograd.grad(value, params)
    expected = torch.autograd.grad(want, params)
    for g, w in zip(got, expected, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)

    # Under gradient accumulation and a loss scale (the runner's (loss / accum) · scale over
    # micro-batches) the gradients add into .grad like any other term's.
    for _ in range(2):
        (penalty.penalty() * 1024.0 / 2).backward()
    for p, w in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, 1024.0 * w, rtol=1e-10, atol=1e-9)

    # Without a graph (the logged value) it is the same number
    with torch.no_grad():
        assert penalty.penalty().item() == pytest.approx(want.item(), rel=1e-12)


def test_update_penalty_passes_gradcheck():
    from fisherlora.methods.fw_lora import ModuleGroup, UpdatePenalty

    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    # two modules 5 -> 4 of ranks 2 and 3 (zero-padded to 3) from a residual start, one 3 -> 6
    # of rank 2 from B₀ = 0
    a0 = torch.zeros(2, 3, 5, dtype=torch.float64)
    b0 = torch.zeros(2, 4, 3, dtype=torch.float64)
    a0[0, :2], a0[1] = randn(2, 5), randn(3, 5)
    b0[0, :, :2], b0[1] = randn(4, 2), randn(4, 3)
    constant = ((a0 @ a0.mT) * (b0.mT @ b0)).sum(dim=(1, 2))
    cpu = torch.device("cpu")
    plan = [
        ModuleGroup([0, 1], 0, [2, 3], cpu, torch.float64, (a0, b0, constant)),
        ModuleGroup([2], 4, [2], cpu, torch.float64),
    ]
    plan[0].coefficients = torch.tensor([0.7, 1.3], dtype=torch.float64)
    plan[1].coefficients = torch.tensor([0.4], dtype=torch.float64)
    factors = [randn(2, 5), randn(3, 5), randn(4, 2), randn(4, 3), randn(2, 3), randn(6, 2)]
    for f in factors:
        f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *f: UpdatePenalty.apply(plan, *f), factors)


def test_penalty_state_round_trips_and_reads_the_older_format(tmp_path):
    model = mixed_rank_model()  # float64: the comparisons are not about rounding
    initial = residual_init(model)
    penalty = FisherPenalty(model, warmup_steps=2, lam=0.3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run(model, penalty, optimizer, random_batches(3, seed=4))  # past warm-up: I ≠ 0
    importance = list(penalty.importance().values())
    expected = naive_penalty(model, initial, importance, 0.3).item()
    assert expected > 0
    assert penalty.penalty().item() == pytest.approx(expected, rel=1e-10)
    torch.save(penalty.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)

    # a penalty made on the trained model (whose factors are no longer B₀, A₀) measures from the
    # right place once the state is loaded
    later = FisherPenalty(model, warmup_steps=2, lam=0.3)
    assert later.penalty().item() == pytest.approx(0.0, abs=1e-10)
    later.load_state_dict(state)
    assert later.importance() == penalty.importance()
    assert later.penalty().item() == pytest.approx(expected, rel=1e-10)

    # the format of earlier versions: per group of equal A and B shapes, stacked (A₀, B₀, ‖B₀A₀‖²)
    adapter, layers = lora_layers(model)
    by_shape = {}
    for name, layer in layers.items():
        shape = (*layer.lora_A[adapter].weight.shape, *layer.lora_B[adapter].weight.shape)
        by_shape.setdefault(shape, []).append(name)
    legacy = {k: v for k, v in state.items() if k != "initial_factors"}
    legacy["initial"] = [
        (
            torch.stack([initial[n][0] for n in names]),
            torch.stack([initial[n][1] for n in names]),
            torch.zeros(len(names), dtype=torch.float64),  # recomputed on load
        )
        for names in by_shape.values()
    ]
    older = FisherPenalty(model, warmup_steps=2, lam=0.3)
    older.load_state_dict(legacy)
    assert older.penalty().item() == pytest.approx(expected, rel=1e-10)


def test_warm_up_buffer_ignores_what_an_overflowed_step_left():
    # The first product of a step overwrites the module's view of the buffer (beta = 0): a
    # step whose gradients overflowed (inf) must not leak into the next one.
    model = no_dropout_model()
    batches = random_batches(1, seed=3)
    penalty = FisherPenalty(model, warmup_steps=5, estimator="exact")
    model(**batches[0]).loss.backward()
    penalty._buffer.fill_(float("nan"))
    penalty._pending.clear()  # as step() leaves it
    model.zero_grad()
    model(**batches[0]).loss.backward()
    penalty.step()
    reference = reference_grad_sq_norms(model, batches)
    for name, value in reference.items():
        assert penalty.last_proxy[name] == pytest.approx(value, rel=1e-5), name


def test_a_warm_up_not_shorter_than_the_run_is_warned_about():
    with pytest.warns(UserWarning, match=r"warm-up \(100 steps\) is not shorter than the run"):
        FwLoRA(steps=100, fw_warmup_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FwLoRA(steps=100)  # the default warm-up: a fifth of the run


def test_a_state_restored_into_the_warm_up_puts_the_hooks_back():
    model = no_dropout_model()
    penalty = FisherPenalty(model, warmup_steps=2)
    batches = random_batches(3)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    model(**batches[0]).loss.backward()
    penalty.step()
    inside = copy.deepcopy(penalty.state_dict())  # after step 1 of 2
    model(**batches[1]).loss.backward()
    penalty.step()  # the warm-up ends: hooks removed
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    penalty.load_state_dict(inside)  # e.g. the same trainer resumed from an earlier checkpoint
    assert penalty.warming_up
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks > 0
    model.zero_grad()
    model(**batches[1]).loss.backward()
    penalty.step()
    assert not penalty.warming_up
    assert min(penalty.last_proxy.values()) > 0  # the hooks saw this step's gradients


def test_a_paused_warm_up_takes_its_hooks_off_and_counts_nothing_until_resumed():
    model = no_dropout_model()
    method = FwLoRA(steps=10, fw_warmup_steps=4)
    method.prepare(model, [])
    penalty = method.penalty
    batches = random_batches(3)

    def hooks():
        return sum(len(m._forward_hooks) for m in model.modules())

    on = hooks()
    model(**batches[0]).loss.backward()
    penalty.step()
    fisher, steps = penalty.fisher.clone(), penalty.step_count
    method.end_training(model)  # a run that ended inside its warm-up
    assert hooks() == 0 and penalty.warming_up
    model.zero_grad()
    model(**batches[1]).loss.backward()  # a backward pass outside training: not seen
    assert not penalty._pending
    torch.testing.assert_close(penalty.fisher, fisher, rtol=0, atol=0)
    assert penalty.step_count == steps
    method.start_training(model)  # the next run goes on with the warm-up
    assert hooks() == on > 0
    model.zero_grad()
    model(**batches[2]).loss.backward()
    penalty.step()
    assert penalty.step_count == steps + 1 and min(penalty.last_proxy.values()) > 0
    for _ in range(2):  # the warm-up ends: start_training after it puts nothing back
        model(**batches[2]).loss.backward()
        penalty.step()
    assert not penalty.warming_up and hooks() == 0
    method.start_training(model)
    assert hooks() == 0


def test_a_paused_warm_up_cannot_resume_beside_a_newer_penalty_on_the_model():
    model = no_dropout_model()
    first = FisherPenalty(model, warmup_steps=3)
    first.pause_warmup()
    second = FisherPenalty(model, warmup_steps=3)  # no warning: the first holds no hooks
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    with pytest.raises(ConfigError, match="newer FisherPenalty was made on this model"):
        first.resume_warmup()
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks and second._handles
