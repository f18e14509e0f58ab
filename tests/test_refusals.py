"""Bad input that used to get through: each is refused with an error that names it, before the
model changes (or, where the input is legitimate, handled as the method's equations say)."""

import pytest
import torch
from conftest import assert_unchanged, random_batches, snapshot, tiny_base, tiny_peft_model
from peft import LoraConfig, get_peft_model

from fisherlora.adapters import export_lora, lora_layers, resize_lora_layer
from fisherlora.capture import first_batches
from fisherlora.errors import CalibrationError, ConfigError
from fisherlora.methods import get_method
from fisherlora.methods.filet import filet_init
from fisherlora.methods.fim_lora import allocate_ranks, fisher_of_b, random_ranks
from fisherlora.methods.fw_lora import FisherPenalty, FwLoRA


def with_update(model):
    """``model`` with B ≠ 0 in every adapter, as after training or a data-driven init."""
    adapter, layers = lora_layers(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B[adapter].weight.normal_(
                0, 0.01, generator=torch.Generator().manual_seed(1)
            )
    return model


@pytest.mark.parametrize(
    ("init", "error", "message"),
    [
        (filet_init, ConfigError, "positive LoRA scaling"),  # √(d/s) is not real
        (
            allocate_ranks,
            CalibrationError,
            "every module's Fisher score is zero",
        ),  # nothing to rank
    ],
)
def test_a_scaling_of_zero_is_refused_and_changes_nothing(init, error, message):
    base, targets = tiny_base("bert")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=0, target_modules=targets))  # s = 0
    before = snapshot(model)
    with pytest.raises(error, match=message):
        init(model, random_batches(2), n_batches=2, progress=False)
    assert_unchanged(before, snapshot(model))


def test_filet_refuses_a_base_weight_tied_to_another_module_and_changes_nothing():
    # a tied lm_head shares its weight with the embedding: its residual would rewrite both
    base, targets = tiny_base("causal")
    base.config.tie_word_embeddings = True
    base.tie_weights()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[*targets, "lm_head"])
    with pytest.warns(UserWarning, match="tie_word_embeddings"):  # PEFT's own caution
        model = get_peft_model(base, config)
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"'lm_head'.*embed_tokens.*tied weights"):
        filet_init(model, random_batches(2), n_batches=2, progress=False)
    assert_unchanged(before, snapshot(model))


def test_the_per_example_fisher_refuses_a_layer_run_twice_per_forward_pass():
    # ALBERT shares one layer across depth: an example's gradient is the sum over the calls,
    # whose square the per-call squares miss (the cross terms); the batch estimator is exact
    from transformers import AlbertConfig, AlbertForSequenceClassification

    torch.manual_seed(0)
    config = AlbertConfig(
        vocab_size=100,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
    )
    model = get_peft_model(
        AlbertForSequenceClassification(config),
        LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]),
    )
    before = snapshot(model)
    with pytest.raises(
        CalibrationError, match=r"attention\.(query|value)' runs more than once.*estimator='batch'"
    ):
        fisher_of_b(model, random_batches(2), n_batches=2, progress=False)
    assert_unchanged(before, snapshot(model))
    fisher, _ = fisher_of_b(
        model, random_batches(2), n_batches=2, estimator="batch", progress=False
    )
    assert all(f.sum() > 0 for f in fisher.values())


@pytest.mark.parametrize("init", ["filet", "random-rank", "fim-lora"])
def test_inits_refuse_adapters_that_already_hold_an_update(init):
    model = with_update(tiny_peft_model(rank=4))
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"B = 0\)?.*non-zero"):
        if init == "filet":
            filet_init(model, random_batches(2), n_batches=2, progress=False)
        elif init == "random-rank":
            random_ranks(model)
        else:
            allocate_ranks(model, random_batches(2), n_batches=2, progress=False)
    assert_unchanged(before, snapshot(model))


def test_filet_followed_by_decay_is_refused_when_the_composition_is_made():
    for name in ("filet+fw-lora-decay", "fim-lora+filet+fw-lora"):
        options = {"fw_mode": "decay"} if name.endswith("fw-lora") else {}
        with pytest.raises(ConfigError, match="mode='decay' cannot follow FILet"):
            get_method(name, options)
    get_method("fim-lora+fw-lora-decay", {})  # without FILet the decay form is fine


@pytest.mark.parametrize(
    "options, message",
    [
        ({"fw_warmup_steps": 2.5}, "whole numbers for warmup_steps=2.5"),
        ({"fw_probes": 0}, "probes >= 1"),
        ({"fw_lambda": float("nan")}, "finite lam"),
        ({"fw_lambda": float("inf")}, "finite lam"),
        ({"fw_estimator": "dense"}, "unknown FW-LoRA estimator"),
    ],
)
def test_fw_lora_options_are_refused_when_the_method_is_made(options, message):
    with pytest.raises(ConfigError, match=message):
        FwLoRA(**options)
    with pytest.raises(ConfigError, match=message):  # and in a composition, before FILet runs
        get_method("filet+fw-lora", options)


def test_a_warm_up_without_signal_leaves_no_hooks_behind():
    model = tiny_peft_model()
    penalty = FisherPenalty(model, warmup_steps=1)
    assert sum(len(m._forward_hooks) for m in model.modules()) > 0
    with pytest.raises(ConfigError, match="no gradient signal"):
        penalty.step()  # no backward pass: every frozen-weight gradient norm is zero
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def _no_labels(batches):
    return [{k: v for k, v in b.items() if k != "labels"} for b in batches]


def _lora_on_an_embedding():
    base, targets = tiny_base("bert")
    return get_peft_model(base, LoraConfig(r=4, target_modules=[*targets, "word_embeddings"]))


def _lora_on_gpt2_conv1d():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=32, num_labels=2, pad_token_id=0
    )
    return get_peft_model(
        GPT2ForSequenceClassification(config),
        LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["c_attn"], fan_in_fan_out=True),
    )


UNSUPPORTED = r"only LoRA on nn\.Linear layers is supported; unsupported layers: \["
CALIBRATE = {"n_batches": 2, "progress": False}


@pytest.mark.parametrize(
    ("make_model", "call", "error", "message"),
    [
        pytest.param(
            tiny_peft_model,
            lambda m: filet_init(m, _no_labels(random_batches(2)), **CALIBRATE),
            CalibrationError,
            r"calibration batch 0 has no 'labels'.*need the task loss",
            id="filet-batch-without-labels",
        ),
        pytest.param(
            tiny_peft_model,
            lambda m: get_method(
                "fim-lora+filet+fw-lora", {"calib_batches": 2, "progress": False}
            ).prepare(m, _no_labels(random_batches(2))),
            CalibrationError,
            r"calibration batch 0 has no 'labels'",
            id="composition-batch-without-labels",
        ),
        pytest.param(
            lambda: tiny_base("bert")[0],
            lambda m: filet_init(m, random_batches(2), **CALIBRATE),
            ConfigError,
            r"expected a peft\.PeftModel with a LoRA adapter, got BertForSequenceClassification",
            id="filet-not-a-peft-model",
        ),
        pytest.param(
            _lora_on_an_embedding,
            lambda m: allocate_ranks(m, random_batches(2), **CALIBRATE),
            ConfigError,
            UNSUPPORTED + r"'bert\.embeddings\.word_embeddings \(Embedding\)'",
            id="allocate-ranks-embedding",
        ),
        pytest.param(
            _lora_on_an_embedding,
            lambda m: FisherPenalty(m, warmup_steps=2),
            ConfigError,
            UNSUPPORTED + r"'bert\.embeddings\.word_embeddings \(Embedding\)'",
            id="fisher-penalty-embedding",
        ),
        pytest.param(
            _lora_on_gpt2_conv1d,
            lambda m: allocate_ranks(m, random_batches(2), **CALIBRATE),
            ConfigError,
            UNSUPPORTED + r"'transformer\.h\.0\.attn\.c_attn \(Conv1D\)'",
            id="allocate-ranks-conv1d",
        ),
        pytest.param(
            _lora_on_gpt2_conv1d,
            lambda m: FisherPenalty(m, warmup_steps=2),
            ConfigError,
            UNSUPPORTED + r"'transformer\.h\.0\.attn\.c_attn \(Conv1D\)'",
            id="fisher-penalty-conv1d",
        ),
        pytest.param(
            lambda: tiny_peft_model(rank=8),
            lambda m: random_ranks(m, r_min=9),
            ConfigError,
            r"rank budget 104 is infeasible for 13 modules with r_min=9, r_max=16",
            id="random-rank-infeasible-bounds",
        ),
    ],
)
def test_bad_input_is_refused_by_name_and_changes_nothing(make_model, call, error, message):
    model = make_model()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        call(model)
    assert_unchanged(before, snapshot(model))


def test_lora_on_an_embedding_is_refused_by_name_not_left_out():
    base, targets = tiny_base("bert")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=[*targets, "word_embeddings"]))
    with pytest.raises(ConfigError, match=r"word_embeddings \(Embedding\)"):
        lora_layers(model)


@pytest.mark.parametrize("n_batches", [0, -1, 2.5, True])
def test_n_batches_must_be_a_whole_number_of_at_least_one(n_batches):
    model = tiny_peft_model()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="n_batches must be a whole number >= 1"):
        first_batches(random_batches(2), n_batches)
    for init in (filet_init, allocate_ranks):
        with pytest.raises(ConfigError, match="n_batches must be"):
            init(model, random_batches(2), n_batches=n_batches, progress=False)
    assert_unchanged(before, snapshot(model))


class WithUnusedLayer(torch.nn.Module):
    """A classifier with one linear layer its loss never reaches."""

    def __init__(self, base):
        super().__init__()
        self.base, self.config = base, base.config
        self.unused = torch.nn.Linear(8, 8)

    def forward(self, **batch):
        return self.base(**batch)


@pytest.mark.parametrize("estimator", ["batch", "per_example"])
def test_a_layer_the_loss_does_not_reach_has_zero_fisher_with_either_estimator(estimator):
    base, _ = tiny_base("bert")
    model = get_peft_model(
        WithUnusedLayer(base), LoraConfig(r=4, target_modules=["query", "unused"])
    )
    fisher, _ = fisher_of_b(
        model, random_batches(2), n_batches=2, estimator=estimator, progress=False
    )
    assert fisher["unused"].abs().sum() == 0
    assert all(f.abs().sum() > 0 for name, f in fisher.items() if name != "unused")


def test_filet_on_a_one_shot_iterator_initialises_and_skips_its_step0_probe():
    model = tiny_peft_model()
    method = get_method("filet", {"calib_batches": 2, "progress": False})
    info = method.prepare(model, iter(random_batches(2)))  # used up by the calibration
    assert info["step0_grad_norm"] == {} and info["filet"]["calibration_batches"] == 2
    probed = get_method("filet", {"calib_batches": 2, "progress": False})
    norms = probed.prepare(tiny_peft_model(), random_batches(2))["step0_grad_norm"]
    assert norms["lora_A"] > 0 and norms["lora_B"] > 0  # a loader read again gives the probe


def test_corda_refuses_token_batches_without_a_mask_before_peft_hooks_the_model():
    base, targets = tiny_base("bert")
    before = snapshot(base)
    batches = [{k: v for k, v in b.items() if k != "attention_mask"} for b in random_batches(2)]
    method = get_method("corda", {"calib_batches": 2})
    with pytest.raises(CalibrationError, match="no 'attention_mask'"):
        method.build(base, LoraConfig(r=4, target_modules=targets), batches)
    assert_unchanged(before, snapshot(base))


def test_adalora_skips_its_update_on_a_step_with_overflowed_gradients(monkeypatch):
    base, targets = tiny_base("bert")
    method = get_method("adalora", {"steps": 10})
    model = method.build(base, LoraConfig(r=4, target_modules=targets))
    calls = []
    monkeypatch.setattr(model.base_model, "update_and_allocate", lambda step: calls.append(step))
    model(**random_batches(1)[0]).loss.backward()
    method.after_backward(model, 1)
    assert calls == [0]  # finite gradients: PEFT's update runs (it counts from 0)
    next(p for p in model.parameters() if p.requires_grad).grad.fill_(float("inf"))
    method.after_backward(model, 2)  # what an fp16 GradScaler skips, AdaLoRA skips too
    assert calls == [0]
    method.after_backward(model, 9)  # from the final pruning on (step 8 of 10, tfinal 2) PEFT
    assert calls == [0, 8]  # reads no gradient: it masks to the final budget all the same


def test_a_composition_refuses_ranks_its_filet_candidates_cannot_cover_before_allocating():
    model = tiny_peft_model(rank=4)
    _, layers = lora_layers(model)
    name, layer = next(iter(layers.items()))
    with torch.no_grad():  # two non-zero input columns: two usable gram candidates (< r_max 8)
        layer.get_base_layer().weight[:, 2:] = 0
    before = snapshot(model)
    method = get_method("fim-lora+filet", {"calib_batches": 2, "progress": False})
    with pytest.raises(ConfigError, match=rf"{name} has 2 usable FILet candidates"):
        method.prepare(model, random_batches(2))
    assert_unchanged(before, snapshot(model))


def _rank_deficient_model():
    """A tiny BERT whose first LoRA layer's base weight has rank 2 (FILet: 2 usable candidates)."""
    model = tiny_peft_model(rank=4)
    _, layers = lora_layers(model)
    with torch.no_grad():
        next(iter(layers.values())).get_base_layer().weight[:, 2:] = 0
    return model


def _model_with_an_unreached_layer():
    """LoRA on a layer the loss never reaches: zero Fisher energies, which FILet refuses."""
    base, _ = tiny_base("bert")
    return get_peft_model(
        WithUnusedLayer(base), LoraConfig(r=4, target_modules=["query", "unused"])
    )


@pytest.mark.parametrize(
    ("name", "options", "make_model", "error"),
    [
        ("random-rank+filet", {}, _rank_deficient_model, ConfigError),
        ("fim-lora+filet", {"layers_per_pass": 1, "r_min": 3}, _rank_deficient_model, ConfigError),
        ("fim-lora+filet+fw-lora", {}, _model_with_an_unreached_layer, CalibrationError),
        ("random-rank+filet", {}, _model_with_an_unreached_layer, CalibrationError),
    ],
)
def test_a_composition_whose_filet_refuses_puts_the_allocators_sizes_back(
    name, options, make_model, error
):
    model = make_model()
    adapter, layers = lora_layers(model)
    before = snapshot(model)
    ranks = {n: layer.r[adapter] for n, layer in layers.items()}
    config = model.peft_config[adapter]
    patterns = (dict(config.rank_pattern), dict(config.alpha_pattern))
    method = get_method(name, {"calib_batches": 2, "progress": False, **options})
    with pytest.raises(error):
        method.prepare(model, random_batches(2))
    assert_unchanged(before, snapshot(model))  # shapes and values of every parameter
    assert {n: layer.r[adapter] for n, layer in lora_layers(model)[1].items()} == ranks
    assert (config.rank_pattern, config.alpha_pattern) == patterns


def test_misspelt_method_options_are_refused_with_the_likely_name():
    with pytest.raises(ConfigError, match=r"'r_mni' \(did you mean 'r_min'\?\)"):
        get_method("fim-lora", {"r_mni": 2})
    with pytest.raises(ConfigError, match=r"'fw_lamda' \(did you mean 'fw_lambda'\?\)"):
        get_method("fim-lora+fw-lora", {"fw_lamda": 5.0})
    assert get_method("fim-lora", {"r_min": 2}).options["r_min"] == 2


@pytest.mark.parametrize("basis", ["gram", "svd"])
def test_filet_names_a_non_finite_base_weight(basis):
    model = tiny_peft_model()
    _, layers = lora_layers(model)
    name, layer = list(layers.items())[-1]
    with torch.no_grad():
        layer.get_base_layer().weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ConfigError, match=rf"base weight of '{name}' holds NaN or inf"):
        filet_init(model, random_batches(2), basis=basis, progress=False)
    before["params"] = {k: v.nan_to_num(7.0) for k, v in before["params"].items()}
    after = snapshot(model)
    after["params"] = {k: v.nan_to_num(7.0) for k, v in after["params"].items()}
    assert_unchanged(before, after)


def _with(change):
    batches = random_batches(2)
    for batch in batches:
        change(batch)
    return batches


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.update(attention_mask=b["attention_mask"][:, :5]), "attention_mask has shape"),
        (lambda b: b["attention_mask"].zero_(), "all padding"),
        (lambda b: b.update(labels=b["labels"][:2]), "labels of shape"),
        (lambda b: b.update(input_ids=b["input_ids"].float()), "integer token ids"),
        (lambda b: b.update(input_ids=b["input_ids"][0]), "integer token ids"),
    ],
)
@pytest.mark.parametrize("method", ["fim-lora", "filet"])
def test_malformed_token_batches_are_refused_by_name_before_any_change(change, message, method):
    model = tiny_peft_model()
    before = snapshot(model)
    with pytest.raises(CalibrationError, match=rf"calibration batch 0.*{message}"):
        get_method(method, {"calib_batches": 2, "progress": False}).prepare(model, _with(change))
    assert_unchanged(before, snapshot(model))


def test_option_types_that_would_fail_later_or_silently_are_refused_up_front(tmp_path):
    model = tiny_peft_model()
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"layers_per_pass must be a whole number >= 1, got 2\.5"):
        allocate_ranks(model, random_batches(1), layers_per_pass=2.5, progress=False)
    with pytest.raises(ConfigError, match=r"layers_per_pass must be a whole number >= 1, got 1\.5"):
        filet_init(model, random_batches(1), layers_per_pass=1.5, progress=False)
    with pytest.raises(ConfigError, match="whole numbers for seed='a'"):
        FisherPenalty(model, seed="a")  # else a raw TypeError at the first warm-up backward
    with pytest.raises(ConfigError, match=r"whole numbers for seed=1\.5"):
        FwLoRA(seed=1.5)
    with pytest.raises(ConfigError, match="whole-number seed, got None"):
        random_ranks(model, seed=None)  # unseeded: not reproducible
    assert_unchanged(before, snapshot(model))
    base, _ = tiny_base("bert")
    with pytest.raises(ConfigError, match=r"expected a peft\.PeftModel, got BertFor"):
        export_lora(base, tmp_path / "adapter")  # would write the whole model as a checkpoint
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("init", ["allocate_ranks", "resize_lora_layer", "filet_init"])
def test_a_penalty_made_before_an_init_refuses_to_penalise_stale_factors(init):
    model = tiny_peft_model(rank=4)
    penalty = FisherPenalty(model, warmup_steps=0, lam=1.0)
    assert penalty.penalty().item() == 0.0  # B = 0: nothing to penalise yet
    match = "the LoRA factors of .* were replaced after this FisherPenalty was made"
    if init == "allocate_ranks":  # new factor modules of the allocated ranks
        allocate_ranks(model, random_batches(2), n_batches=2, progress=False)
    elif init == "resize_lora_layer":  # one module replaced outside fisherlora's inits
        adapter, layers = lora_layers(model)
        resize_lora_layer(next(iter(layers.values())), adapter, 4, 8.0)
    else:  # the same modules, rewritten as a residual init (B0 != 0)
        filet_init(model, random_batches(2), n_batches=2, progress=False)
        match = "FILet rewrote the adapters as a residual init after this FisherPenalty"
    with pytest.raises(ConfigError, match=match):
        penalty.penalty()
    with pytest.raises(ConfigError, match=match):
        penalty.step()
    made_after = FisherPenalty(model, warmup_steps=0, lam=1.0)
    assert made_after.penalty().item() == pytest.approx(0.0, abs=1e-6)  # ΔW from this init: 0


def test_token_batches_of_other_valid_shapes_pass_the_batch_check():
    from fisherlora.capture import check_batch

    ids = torch.ones(4, 3, 12, dtype=torch.long)  # multiple choice: [batch, choices, seq]
    check_batch(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0, 0]}, 0
    )
    flat = torch.ones(4, 12, dtype=torch.long)  # a custom 4-D attention mask is no padding mask
    check_batch({"input_ids": flat, "attention_mask": torch.ones(4, 1, 12, 12), "labels": flat}, 0)
    with pytest.raises(CalibrationError, match="attention_mask has shape"):
        check_batch(
            {"input_ids": ids, "attention_mask": torch.ones(4, 3, 5), "labels": flat[:, 0]}, 0
        )
