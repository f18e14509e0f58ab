"""The peers run through PEFT's own implementations on BERT- and Llama-style models: outputs are
unchanged at init, the export reloads on the untouched base, and the harness workarounds hold."""

import copy

import pytest
import torch
from conftest import (
    assert_unchanged,
    logits,
    random_batches,
    snapshot,
    tiny_base,
    tiny_lora_config,
)
from peft import LoraGAConfig, PeftModel, get_peft_model
from peft.tuners.adalora import AdaLoraLayer

from fisherlora.errors import CalibrationError, ConfigError
from fisherlora.experiments.train import TrainConfig, count_parameters, train
from fisherlora.methods import get_method, peers
from fisherlora.methods.peers import eva_batches

PEERS = ["dora", "pissa", "eva", "lora-ga", "lora-ga-peft", "corda", "adalora"]


def build_and_prepare(name: str, arch: str, rank: int = 4):
    base, targets = tiny_base(arch, seed=3)
    base.eval()
    original = copy.deepcopy(base)
    batches = random_batches(8, batch_size=4, seq=12, seed=5)
    method = get_method(name, {"calib_batches": 8, "steps": 20})
    model = method.build(base, tiny_lora_config(targets, rank), batches)
    method.prepare(model, batches)
    return original, model, method, batches


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("name", PEERS)
def test_outputs_equal_the_base_model_right_after_init(name, arch):
    original, model, _, batches = build_and_prepare(name, arch)
    torch.testing.assert_close(logits(model, batches), logits(original, batches), atol=1e-5, rtol=0)
    # the peer did initialise something other than LoRA's B = 0 where it should
    if name in ("pissa", "lora-ga", "lora-ga-peft", "corda"):
        b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert all(p.abs().sum() > 0 for p in b)


@pytest.mark.parametrize("name", PEERS)
def test_exported_adapter_reloads_on_the_untouched_base(name, tmp_path):
    original, model, method, batches = build_and_prepare(name, "bert")
    torch.manual_seed(0)
    with torch.no_grad():  # stand-in for training: move every adapter parameter
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    trained = logits(model, batches)
    method.export(model, tmp_path)
    reloaded = PeftModel.from_pretrained(original, tmp_path)
    torch.testing.assert_close(logits(reloaded, batches), trained, atol=1e-4, rtol=0)


def test_corda_workaround_covers_the_2d_pooler_and_leaves_no_hook():
    base, targets = tiny_base("bert", seed=3)
    batches = random_batches(8, batch_size=4, seed=5)
    method = get_method("corda", {"calib_batches": 8})
    model = method.build(base, tiny_lora_config(targets, 4), batches)
    pooler = model.base_model.model.bert.pooler.dense
    assert pooler.lora_B["default"].weight.abs().sum() > 0  # CorDA initialised the pooler too
    base_layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base_layers)
    assert not any(hasattr(m, "eigens") or hasattr(m, "covariance_matrix") for m in base_layers)


def test_eva_batches_drop_labels_and_merge_to_enough_rows():
    batches = random_batches(5, batch_size=4, seq=10, seed=1)
    merged = eva_batches(batches, min_rows=8)
    assert [b["input_ids"].shape[0] for b in merged] == [8, 12]
    assert all("labels" not in b for b in merged)
    assert sum(int(b["attention_mask"].sum()) for b in merged) == sum(
        int(b["attention_mask"].sum()) for b in batches
    )
    with pytest.raises(CalibrationError, match="at least 64 calibration sequences"):
        eva_batches(batches, min_rows=64)


def test_eva_reads_a_loader_without_length_up_to_its_cap(monkeypatch):
    # a generator has no end PEFT could see: EVA reads at most EVA_ENDLESS_BATCHES of it
    monkeypatch.setattr(peers, "EVA_ENDLESS_BATCHES", 6)
    batches = random_batches(6, batch_size=4, seq=12, seed=5)
    read = []

    def endless():
        while True:
            batch = batches[len(read) % len(batches)]
            read.append(1)
            yield batch

    base, targets = tiny_base("bert", seed=3)
    method = get_method("eva", {"calib_batches": 8})
    model = method.build(base, tiny_lora_config(targets, 4), batches)
    info = method.prepare(model, endless())
    assert len(read) == 6 and sum(info["eva_ranks"].values()) == 4 * len(info["eva_ranks"])
    assert peers._eva_batch_count(batches) == 6 and peers._eva_batch_count(batches[:2]) == 2


@pytest.mark.parametrize("name", ["lora-ga", "corda", "eva"])
def test_data_driven_peers_reject_missing_or_empty_calibration_data(name):
    base, targets = tiny_base("bert")
    method = get_method(name, {"calib_batches": 2})
    with pytest.raises(CalibrationError, match=r"yielded no batch|needs calibration data"):
        model = method.build(base, tiny_lora_config(targets, 4), [])
        method.prepare(model, [])


def test_adalora_prunes_to_the_matched_budget(keyword_task):
    config = TrainConfig(
        model="tiny-bert",
        method="adalora",
        rank=4,
        alpha=8,
        steps=30,
        batch_size=16,
        lr=1e-2,
        eval_every=0,
        max_length=16,
        device="cpu",
    )
    result = train(config, task=keyword_task, progress=False)
    model = result.model
    adapter = model.active_adapter
    kept = model.peft_config[adapter].rank_pattern  # module -> mask of kept ranks
    assert kept, "update_and_allocate never fixed the final ranks"
    assert sum(sum(mask) for mask in kept.values()) == 4 * len(kept)
    assert any(sum(mask) != 4 for mask in kept.values())  # the budget was redistributed

    # P, Λ, Q stay at init_r = 6 ranks as parameters; the kept triplets are what acts
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLayer)}
    width = {n: m.in_features + m.out_features + 1 for n, m in layers.items()}
    assert result.metrics["adapter_params"] == sum(6 * w for w in width.values())
    effective = sum(
        sum(mask) * width[f"base_model.model.{key.split('.lora_E')[0]}"]
        for key, mask in kept.items()
    )
    assert result.metrics["effective_adapter_params"] == effective
    assert effective < result.metrics["adapter_params"]
    # other methods: every adapter parameter acts
    base, targets = tiny_base("bert")
    lora = count_parameters(get_peft_model(base, tiny_lora_config(targets, 4)))
    assert lora["effective_adapter_params"] == lora["adapter_params"]


def test_adalora_adapter_with_modules_pruned_to_rank_zero_reloads(tmp_path):
    """At r = 1 (init_r = 2) the final budget leaves some modules with no rank at all; stock
    PEFT's reload resizes every module by the saved rank pattern, rank 0 included."""
    original, model, method, batches = build_and_prepare("adalora", "bert", rank=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, 21):  # the runner's order: backward, step, then AdaLoRA's allocation
        model(**batches[(step - 1) % len(batches)]).loss.backward()
        optimizer.step()
        method.after_backward(model, step)
        optimizer.zero_grad()
    kept = {k: sum(mask) for k, mask in model.peft_config["default"].rank_pattern.items()}
    assert 0 in kept.values() and sum(kept.values()) == len(kept)
    trained = logits(model, batches)
    method.export(model, tmp_path)
    reloaded = PeftModel.from_pretrained(original, tmp_path)
    torch.testing.assert_close(logits(reloaded, batches), trained, atol=1e-5, rtol=0)


def _mean_gradients_by_plain_autograd(base, batches):
    """G = (1/T) Σ_t ∂L_t/∂W for every linear weight, with nothing but loss.backward()."""
    model = copy.deepcopy(base).train()
    for batch in batches:
        model(**batch).loss.backward()
    return {
        n.removesuffix(".weight"): p.grad / len(batches)
        for n, p in model.named_parameters()
        if n.endswith("proj.weight")
    }


@pytest.mark.parametrize("name", ["lora-ga", "lora-ga-peft"])
def test_lora_ga_factors_follow_the_gradient_svd(name):
    # Llama: no dropout, so training mode gives the same gradient as an independent backward
    base, targets = tiny_base("llama", seed=3)
    batches = random_batches(4, batch_size=4, seq=12, seed=5)
    grads = _mean_gradients_by_plain_autograd(base, batches)
    r, gamma = 4, 16
    model = get_method(name, {"calib_batches": 4}).build(
        base, tiny_lora_config(targets, r), batches
    )
    _, layers = peers.lora_layers(model)
    for module_name, layer in layers.items():
        a0, b0 = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        u, s, vh = torch.linalg.svd(grads[module_name], full_matrices=False)
        zeta = a0.new_tensor(b0.shape[0] ** 0.25 / gamma**0.5)
        if name == "lora-ga":  # A₀ = ζ V[:, :r]ᵀ, B₀ = ζ U[:, r:2r]: projectors, sign-free
            top_v, next_u = vh[:r].T @ vh[:r], u[:, r : 2 * r] @ u[:, r : 2 * r].T
            torch.testing.assert_close(a0.T @ a0, zeta**2 * top_v, atol=1e-4, rtol=0)
            torch.testing.assert_close(b0 @ b0.T, zeta**2 * next_u, atol=1e-4, rtol=0)
        else:  # PEFT: A₀ = V[:, :r]ᵀ (unit rows), B₀ = U[:, r:2r] diag(S[r:2r]) ζ
            torch.testing.assert_close(a0.norm(dim=1), torch.ones(r), atol=1e-4, rtol=0)
            torch.testing.assert_close(b0.norm(dim=0), zeta * s[r : 2 * r], atol=0, rtol=1e-2)


def _failing_lora_ga_inputs(kind: str, base, targets):
    """(lora config, batches) that lora-ga must refuse before it changes the model."""
    batches = random_batches(2, batch_size=4, seq=12, seed=5)
    lora = tiny_lora_config(targets, 4)
    if kind == "label out of range":
        batches[1]["labels"] = torch.tensor([0, 1, 7, 0])
    elif kind == "rank above half the width":
        lora = tiny_lora_config(targets, 20)  # 2r = 40 directions of a 32-wide gradient
    elif kind == "another direction":
        lora = tiny_lora_config(
            targets, 4, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(direction="ArBr")
        )
    return lora, batches


@pytest.mark.parametrize(
    "kind", ["label out of range", "rank above half the width", "another direction", "nan"]
)
def test_lora_ga_refusals_leave_the_base_model_unchanged(kind):
    base, targets = tiny_base("bert", seed=3)
    lora, batches = _failing_lora_ga_inputs(kind, base, targets)
    if kind == "nan":  # a NaN activation in one layer: every gradient below it is NaN
        base.bert.encoder.layer[0].output.dense.register_forward_hook(lambda m, i, o: o * torch.nan)
    before = snapshot(base)
    errors = {
        "label out of range": (IndexError, "out of bounds|out of range"),
        "rank above half the width": (ConfigError, r"2r singular directions.*r = 20, width 32"),
        "another direction": (ConfigError, "lora-ga-peft"),
        "nan": (CalibrationError, "not finite"),
    }
    error, message = errors[kind]
    with pytest.raises(error, match=message):
        get_method("lora-ga", {"calib_batches": 2}).build(base, lora, batches)
    assert_unchanged(before, snapshot(base))


def test_lora_ga_takes_the_targets_peft_matches_a_regex_included():
    base, _ = tiny_base("llama", seed=3)
    batches = random_batches(2, batch_size=4, seq=12, seed=5)
    lora = tiny_lora_config([], 4)
    lora.target_modules = r".*\.(q_proj|down_proj)"
    model = get_method("lora-ga", {"calib_batches": 2}).build(base, lora, batches)
    names = sorted(peers.lora_layers(model)[1])
    assert names and all(n.endswith(("q_proj", "down_proj")) for n in names)
    assert all(
        layer.lora_B["default"].weight.abs().sum() > 0
        for layer in peers.lora_layers(model)[1].values()
    )


def test_eva_batches_keep_token_labels_padded_with_the_ignore_index():
    # a causal LM's token labels stay, so EVA's label mask can leave the prompt's tokens out
    short, long = random_batches(1, seq=6, seed=1)[0], random_batches(1, seq=10, seed=2)[0]
    for batch in (short, long):
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    (merged,) = eva_batches([short, long], min_rows=8)
    assert merged["labels"].shape == merged["input_ids"].shape == (8, 10)
    assert (merged["labels"][:4, 6:] == -100).all() and (merged["input_ids"][:4, 6:] == 0).all()
    torch.testing.assert_close(merged["labels"][4:], long["labels"])


def test_a_failed_corda_calibration_leaves_the_base_model_unchanged():
    base, targets = tiny_base("bert", seed=3)
    # NaN activations: CorDA's covariance hook raises inside PEFT's preprocessing
    base.bert.embeddings.register_forward_hook(lambda m, i, o: o * torch.nan)
    before = snapshot(base)
    with pytest.raises(ValueError, match="Invalid value found in input"):
        get_method("corda", {"calib_batches": 2}).build(
            base, tiny_lora_config(targets, 4), random_batches(2, seed=5)
        )
    assert_unchanged(before, snapshot(base))


def test_corda_takes_a_regex_of_targets_the_pooler_included():
    base, _ = tiny_base("bert", seed=3)
    lora = tiny_lora_config([], 4)
    lora.target_modules = r".*(query|pooler\.dense)"
    model = get_method("corda", {"calib_batches": 2}).build(base, lora, random_batches(2, seed=5))
    names = sorted(peers.lora_layers(model)[1])
    assert "bert.pooler.dense" in names and all(n.endswith(("query", "dense")) for n in names)


def test_lora_ga_reads_each_layers_rank_from_the_rank_pattern():
    base, targets = tiny_base("llama", seed=3)
    batches = random_batches(2, batch_size=4, seq=12, seed=5)
    too_wide = tiny_lora_config(targets, 4, rank_pattern={"o_proj": 20})
    before = snapshot(base)
    with pytest.raises(ConfigError, match=r"o_proj \(r = 20, width 32\)"):
        get_method("lora-ga", {"calib_batches": 2}).build(base, too_wide, batches)
    assert_unchanged(before, snapshot(base))
    # r = 10 everywhere but k/v: 2r = 20 fits the 32-wide layers, 2 x 4 the 16-wide k/v
    original = copy.deepcopy(base).eval()
    fits = tiny_lora_config(targets, 10, rank_pattern={"k_proj": 4, "v_proj": 4})
    model = get_method("lora-ga", {"calib_batches": 2}).build(base, fits, batches)
    ranks = {n: layer.r["default"] for n, layer in peers.lora_layers(model)[1].items()}
    assert {r for n, r in ranks.items() if n.endswith(("k_proj", "v_proj"))} == {4}
    assert {r for n, r in ranks.items() if not n.endswith(("k_proj", "v_proj"))} == {10}
    torch.testing.assert_close(logits(model, batches), logits(original, batches), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["lora-ga", "pissa", "corda"])
def test_a_residual_init_refuses_a_tied_weight_before_any_change(name):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    base = LlamaForCausalLM(config)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    batches = random_batches(2, batch_size=4, seq=12, seed=5)
    for batch in batches:  # token labels: the causal LM's own loss
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    from peft import LoraConfig

    lora = LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["lm_head"])
    before = snapshot(base)
    with pytest.raises(ConfigError, match=r"lm_head's weight is tied to model.embed_tokens"):
        get_method(name, {"calib_batches": 2}).build(base, lora, batches)
    assert_unchanged(before, snapshot(base))


def test_lora_ga_peft_is_peft_own_preprocess_and_init_bit_for_bit():
    # the variant's gradients come from our pass; with float32 weights they are PEFT's exactly
    from peft import preprocess_loraga

    batches = random_batches(3, batch_size=4, seq=12, seed=5)
    states = []
    for variant in ("ours", "peft"):
        torch.manual_seed(0)
        base, targets = tiny_base("bert", seed=3)
        config = tiny_lora_config(targets, 4)
        if variant == "ours":
            model = get_method("lora-ga-peft", {"calib_batches": 3}).build(base, config, batches)
        else:
            config = tiny_lora_config(
                targets, 4, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig()
            )

            def train_step(model=base):
                for batch in batches:
                    model(**batch).loss.backward()

            preprocess_loraga(base, config, train_step)
            model = get_peft_model(base, config)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_eva_on_a_causal_lm_needs_no_more_sequences_than_it_has():
    # every Llama input has a token axis: 2 sequences of 12 tokens are 24 rows, plenty for
    # r · ρ = 8 components (the pooler's rule, 8 sequences per batch, had refused this)
    base, targets = tiny_base("causal", seed=0)
    base.eval()
    original = copy.deepcopy(base)
    batches = random_batches(2, batch_size=2, seq=12, seed=5)
    for batch in batches:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    from peft import LoraConfig

    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets)
    method = get_method("eva", {"calib_batches": 2})
    model = method.build(base, lora, batches)
    info = method.prepare(model, batches)
    assert sum(info["eva_ranks"].values()) == 4 * len(info["eva_ranks"])
    model.eval()
    inputs = {k: batches[0][k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs).logits, original(**inputs).logits, atol=1e-5, rtol=0
        )
