"""Causal LMs: prompt/completion batches with -100 on the prompt, statistics that respect the
label mask (and the causal shift), generation tasks end to end, and the embedded SmolLM2."""

import copy
import functools
import json
import math

import pytest
import torch
from conftest import assert_unchanged, keyword_texts, snapshot, tiny_base
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from fisherlora.adapters import lora_layers
from fisherlora.capture import example_loss_scale, predicts_next_token, token_mask
from fisherlora.directions import candidate_directions
from fisherlora.errors import CalibrationError, ConfigError
from fisherlora.experiments.batching import PadPromptCompletion, PromptCompletionTexts
from fisherlora.experiments.causal_models import load_causal_lm
from fisherlora.experiments.generation_eval import _choice_scores, completion_log_probs
from fisherlora.experiments.generation_tasks import as_generation_task, load_generation_task
from fisherlora.experiments.models import load_model, minilm_path
from fisherlora.experiments.tasks import Task, held_out_subset
from fisherlora.experiments.train import TrainConfig, train
from fisherlora.methods import get_method
from fisherlora.methods.filet import _project_statistics, filet_init
from fisherlora.methods.fim_lora import fisher_of_b
from fisherlora.methods.fw_lora import FisherPenalty


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def tiny_causal_peft(seed: int = 0):
    base, targets = tiny_base("causal", seed)
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets)
    return get_peft_model(base, lora)


def prompt_completion_batches(n: int, seed: int = 0, batch_size: int = 4):
    """Batches of random prompts and completions of different lengths, right-padded."""
    generator = torch.Generator().manual_seed(seed)
    collate = PadPromptCompletion(0)
    batches = []
    for _ in range(n):
        items = []
        for _ in range(batch_size):
            prompt = int(torch.randint(2, 6, (), generator=generator))
            completion = int(torch.randint(1, 5, (), generator=generator))
            ids = torch.randint(1, 100, (prompt + completion,), generator=generator).tolist()
            items.append((ids, prompt))
        batches.append(collate(items))
    return batches


def record_logits_to_keep(monkeypatch, model_class: type) -> list[tuple[int | None, int]]:
    """Patch ``model_class.forward`` to record each call's ``(logits_to_keep, length)``."""
    kept = []
    real_forward = model_class.forward

    @functools.wraps(real_forward)  # its signature, which says it takes logits_to_keep
    def recording(self, *args, **kwargs):
        kept.append((kwargs.get("logits_to_keep"), kwargs["input_ids"].shape[1]))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(model_class, "forward", recording)
    return kept


def keyword_generation_task(kind: str):
    train_texts, train_labels = keyword_texts(128, seed=0)
    test_texts, test_labels = keyword_texts(24, seed=1)
    task = Task("keywords", train_texts, train_labels, test_texts, test_labels, ["bad", "good"])
    return as_generation_task(task, kind)


# -- batches ------------------------------------------------------------------------------------
def test_labels_cover_the_completion_only_and_long_pairs_lose_the_prompt_start(tokenizer):
    texts = PromptCompletionTexts(
        ["Review: fine\nSentiment:", "Review: " + "very " * 40 + "long\nSentiment:"],
        [" positive", " negative"],
        tokenizer,
        max_length=16,
    )
    batch = PadPromptCompletion(tokenizer.pad_token_id)([texts[0], texts[1]])
    completion = tokenizer(" negative", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"].shape[1] == 16  # the long pair was cut to max_length
    long_ids, long_prompt = texts[1]
    assert long_ids[-len(completion) :] == completion  # ... from the start of its prompt
    assert long_ids[long_prompt:] == completion
    for row, (ids, prompt_length) in enumerate([texts[0], texts[1]]):
        labels = batch["labels"][row]
        assert (labels[:prompt_length] == -100).all()
        assert labels[prompt_length : len(ids)].tolist() == ids[prompt_length:]
        assert (labels[len(ids) :] == -100).all()  # padding
        assert batch["attention_mask"][row].sum() == len(ids)


def test_a_short_prompt_is_kept_whole_and_a_long_completion_loses_its_end(tokenizer):
    # an -lm pair: a short instruction holding the label, then a long review
    prompt = "Write a positive movie review.\nReview:"
    review = " " + " ".join(f"word{i}" for i in range(60))
    prompt_ids = tokenizer([prompt])["input_ids"][0]
    review_ids = tokenizer([review], add_special_tokens=False)["input_ids"][0]
    assert len(prompt_ids) < 16 < len(review_ids)
    ids, prompt_length = PromptCompletionTexts([prompt], [review], tokenizer, max_length=32)[0]
    assert len(ids) == 32 and prompt_length == len(prompt_ids)
    assert ids[:prompt_length] == prompt_ids  # the label survives
    assert ids[prompt_length:] == review_ids[: 32 - len(prompt_ids)]  # the review's start
    # a prompt longer than half the length keeps its last half, the rest goes to the completion
    long_prompt = " ".join(f"p{i}" for i in range(40))
    ids, prompt_length = PromptCompletionTexts([long_prompt], [review], tokenizer, 32)[0]
    assert prompt_length == 16 and len(ids) == 32
    assert ids[:16] == tokenizer([long_prompt])["input_ids"][0][-16:]


def test_the_lm_task_appends_eos_and_bad_pairs_are_refused(tokenizer):
    with_eos = copy.deepcopy(tokenizer)
    with_eos.eos_token = "[SEP]"
    texts = PromptCompletionTexts(["Write:"], [" a film"], with_eos, 32, append_eos=True)
    plain = PromptCompletionTexts(["Write:"], [" a film"], with_eos, 32)
    assert texts[0][0] == [*plain[0][0], with_eos.sep_token_id]
    with pytest.raises(ValueError, match="completion has no tokens"):
        PromptCompletionTexts(["Write:"], [""], tokenizer, 32)
    with pytest.raises(ValueError, match="prompts but"):
        PromptCompletionTexts(["a", "b"], ["c"], tokenizer, 32)


@pytest.mark.parametrize("method", ["fim-lora", "filet", "lora-ga"])
def test_class_id_labels_on_a_causal_lm_are_refused_by_name_before_any_change(method):
    # a classification loader's [batch] class ids reused for a causal LM: transformers would fail
    # with "Expected input batch_size (40) to match target batch_size (4)"
    batches = prompt_completion_batches(2)
    for batch in batches:
        batch["labels"] = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
    refused = pytest.raises(CalibrationError, match=r"batch 0: labels of shape \[4\].*class ids")
    if method == "lora-ga":  # a peer builds its adapter from the base model
        model, targets = tiny_base("causal")
        lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets)
        before = snapshot(model)
        with refused:
            get_method(method, {"calib_batches": 2}).build(model, lora, batches)
    else:
        model = tiny_causal_peft()
        before = snapshot(model)
        with refused:
            get_method(method, {"calib_batches": 2, "progress": False}).prepare(model, batches)
    assert_unchanged(before, snapshot(model))


# -- which tokens count -------------------------------------------------------------------------
def test_the_mask_of_a_causal_lm_is_shifted_to_the_positions_that_predict_a_label():
    batch = PadPromptCompletion(0)([([5, 6, 7, 8, 9], 3), ([5, 6, 7], 1)])
    # labels: [-100, -100, -100, 8, 9] and [-100, 6, 7, -100, -100]
    assert token_mask(batch).tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]]
    assert token_mask(batch, next_token=True).tolist() == [[0, 0, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert predicts_next_token(tiny_causal_peft())
    assert not predicts_next_token(load_model("tiny-bert", 2)[0])
    seq2seq = T5ForConditionalGeneration(
        T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    )
    assert seq2seq.can_generate() and not predicts_next_token(seq2seq)  # its labels are unshifted


def test_per_example_fisher_matches_one_backward_pass_per_example():
    """FIM-LoRA's per-example estimator on token labels: Σ_i (∂ℓ_i/∂B)² / N with ℓ_i the
    example's own mean loss over its completion tokens, against one backward pass each."""
    model = tiny_causal_peft().eval()
    batches = prompt_completion_batches(2, seed=1)
    fisher, _ = fisher_of_b(model, batches, estimator="per_example", progress=False)
    adapter, layers = lora_layers(model)
    reference = {name: torch.zeros_like(f) for name, f in fisher.items()}
    examples = 0
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][i].sum())
            one = {k: v[i : i + 1, :length] for k, v in batch.items()}
            for layer in layers.values():
                layer.lora_B[adapter].weight.requires_grad_(True)
            model.zero_grad()
            model(**one).loss.backward()
            for name, layer in layers.items():
                reference[name] += layer.lora_B[adapter].weight.grad.square()
            examples += 1
    for name in fisher:
        torch.testing.assert_close(fisher[name], reference[name] / examples, rtol=1e-4, atol=1e-12)


def test_example_loss_scale_counts_scored_tokens():
    batch = PadPromptCompletion(0)([([5, 6, 7, 8, 9], 3), ([5, 6, 7], 1), ([5, 6], 2)])
    # scored tokens (shifted): 2, 2 and none (a prompt without completion contributes nothing)
    batch["labels"][2] = -100
    assert example_loss_scale(batch, next_token=True).tolist() == [2.0, 2.0, 0.0]
    no_mask = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    assert example_loss_scale(no_mask, next_token=True).tolist() == [2.0, 2.0, 0.0]
    one_label = {"labels": torch.tensor([0, 1, 1]), "attention_mask": torch.ones(3, 4)}
    assert example_loss_scale(one_label).tolist() == [3.0, 3.0, 3.0]
    multi_label = {"labels": torch.ones(3, 2), "attention_mask": torch.ones(3, 4)}
    assert example_loss_scale(multi_label).tolist() == [3.0, 3.0, 3.0]


def test_filet_counts_every_non_padding_position_whatever_its_label():
    model = tiny_causal_peft()
    batches = prompt_completion_batches(3, seed=2)
    adapter, layers = lora_layers(model)
    candidates = {
        name: (
            torch.eye(layer.in_features)[:, :3],
            torch.eye(layer.out_features)[:, :3],
            torch.arange(3),
        )
        for name, layer in layers.items()
    }
    statistic, used = _project_statistics(
        model,
        adapter,
        layers,
        candidates,
        batches,
        3,
        torch.device("cpu"),
        dropout=False,
        progress=False,
    )
    # ∇W = Σ_t g_t x_tᵀ runs over every position the attention mask keeps, prompt included
    kept = sum(b["attention_mask"].sum() for b in batches)
    assert used == 3
    for name in layers:
        assert statistic.tokens[name].item() == kept.item(), name


def test_filet_energies_run_over_every_non_padding_position_of_a_prompt_completion_batch():
    """p_i, q_i from plain hooks over all non-padding positions (the prompt's, labelled -100,
    included): FILet's energies are exactly those, candidate for candidate."""
    model = tiny_causal_peft().eval()
    batches = prompt_completion_batches(3, seed=7)
    assert all((b["attention_mask"] == 0).any() for b in batches)  # some padding in each batch
    _, layers = lora_layers(model)
    candidates = {
        name: candidate_directions(layer.get_base_layer().weight, "gram")
        for name, layer in layers.items()
    }
    p = {name: 0.0 for name in layers}
    q = {name: 0.0 for name in layers}
    current: dict = {}

    def hook(name):
        def forward(module, inputs, output):
            keep = current["mask"].reshape(-1)
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])[keep]
            p[name] = p[name] + (x @ candidates[name][0]).square().sum(dim=0)

            def backward(g):
                g = g.detach().reshape(-1, g.shape[-1])[keep]
                q[name] = q[name] + (g @ candidates[name][1]).square().sum(dim=0)

            output.register_hook(backward)

        return forward

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"].bool()
            model(**batch).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    positions = sum(b["attention_mask"].sum() for b in batches).item()
    report = filet_init(model, batches, n_batches=3, scale="fisher", progress=False)
    assert report.basis == "gram"
    for name in layers:
        expected = (p[name] / positions) * (q[name] / positions)
        torch.testing.assert_close(torch.tensor(report.energies[name]), expected, rtol=1e-4, atol=0)


def test_filet_keeps_a_causal_lms_outputs_at_init():
    model = tiny_causal_peft().eval()
    batches = prompt_completion_batches(2, seed=3)
    before = model(**batches[0]).logits.detach()
    filet_init(model, batches, basis="svd", progress=False)
    torch.testing.assert_close(model(**batches[0]).logits, before, rtol=1e-4, atol=1e-5)


def test_fw_lora_exact_proxy_is_the_frozen_weights_true_gradient_on_token_labels():
    model = tiny_causal_peft()
    batches = prompt_completion_batches(2, seed=4)
    penalty = FisherPenalty(model, warmup_steps=5, estimator="exact")
    for batch in batches:
        model(**batch).loss.backward()
    penalty.step()
    reference = copy.deepcopy(model)
    _, layers = lora_layers(reference)
    weights = {n: layer.get_base_layer().weight.requires_grad_(True) for n, layer in layers.items()}
    for batch in batches:
        reference(**batch).loss.backward()
    for name, weight in weights.items():
        expected = weight.grad.double().square().sum().item()
        assert penalty.last_proxy[name] == pytest.approx(expected, rel=1e-5), name


# -- evaluation ---------------------------------------------------------------------------------
def test_completion_log_probs_agree_with_the_models_own_loss():
    model = tiny_causal_peft().eval()
    batch = prompt_completion_batches(1, seed=5)[0]
    log_p, tokens = completion_log_probs(model, batch)
    for i in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][i].sum())
        one = {k: v[i : i + 1, :length] for k, v in batch.items()}
        with torch.no_grad():
            loss = model(**one).loss.item()  # the mean over the example's scored tokens
        assert -log_p[i].item() / tokens[i].item() == pytest.approx(loss, rel=1e-5)


# -- end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["classify", "lm"])
def test_a_generation_task_trains_and_the_adapter_reloads(kind, tmp_path):
    config = TrainConfig(
        model="tiny-llama-lm",
        method="fim-lora+filet+fw-lora",
        steps=6,
        batch_size=8,
        lr=1e-2,
        eval_every=3,
        max_length=24,
        warmup_ratio=0.0,
        calib_batches=2,
        eval_batch_size=8,
        device="cpu",
        out=str(tmp_path),
    )
    result = train(config, task=keyword_generation_task(kind), progress=False)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    if kind == "classify":
        confusion = torch.tensor(metrics["confusion_matrix"])
        assert confusion.sum() == 24  # every held-out prompt scored once
        assert metrics["accuracy"] == pytest.approx(float(confusion.trace() / 24))
    else:
        assert metrics["confusion_matrix"] is None
        nll = result.curve["nll"].tolist()
        assert nll[-1] < nll[0] < math.log(30522)  # held-out NLL falls, below a uniform guess
    assert result.curve["train_loss"].notna().all()
    # the exported adapter on a fresh base reproduces the trained model
    base, tokenizer = load_causal_lm("tiny-llama-lm", seed=0)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = tokenizer(["Review: good film\nSentiment:"], return_tensors="pt")
    with torch.no_grad():
        expected = result.model.eval()(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-4, atol=1e-5)


def test_task_and_model_kinds_must_match():
    with pytest.raises(ConfigError, match="causal LM"):
        load_model("smollm2-135m", 2)
    with pytest.raises(ConfigError, match="sequence classifier"):
        load_causal_lm("minilm")
    with pytest.raises(ConfigError, match="not a generation task"):
        load_generation_task("rotten-tomatoes")


@pytest.mark.integration
def test_smollm2_is_dequantised_once_cached_and_classifies_by_generation(
    tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("FISHERLORA_CACHE", str(tmp_path))
    model, tokenizer = load_causal_lm("smollm2-135m")
    assert (tmp_path / "smollm2-135m" / "model.safetensors").exists()
    load_causal_lm("smollm2-135m")  # from the cache: transformers' own weight-loading bar is off
    assert "Loading weights" not in capfd.readouterr().err
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    again, _ = load_causal_lm("smollm2-135m")  # from the cache
    batch = tokenizer(
        ["Review: a moving, beautifully acted film.\nSentiment:"], return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits)
    task = load_generation_task("rotten-tomatoes-gen")
    assert task.choices == [" negative", " positive"]
    assert task.train_prompts[0].startswith("Review: ")


def test_a_copy_cached_by_another_process_first_is_kept(tmp_path, monkeypatch, tokenizer):
    """torchrun starts several processes that all dequantise on first use: the one that finishes
    second keeps the first one's copy (which may be in use) and leaves no partial folder."""
    import fisherlora.experiments.causal_models as causal_models

    monkeypatch.setenv("FISHERLORA_CACHE", str(tmp_path))
    target = tmp_path / "smollm2-135m"

    def other_process_finishes_first(*args, **kwargs):
        target.mkdir()
        (target / "model.safetensors").write_text("the other process's copy")
        return load_causal_lm("tiny-llama-lm")[0]

    monkeypatch.setattr(
        causal_models.AutoModelForCausalLM, "from_pretrained", other_process_finishes_first
    )
    monkeypatch.setattr(causal_models.AutoTokenizer, "from_pretrained", lambda *a, **k: tokenizer)
    assert causal_models.smollm2_path() == target
    assert (target / "model.safetensors").read_text() == "the other process's copy"
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]


def test_one_token_choices_take_one_pass_and_score_what_full_scoring_scores(tokenizer):
    model, _ = load_causal_lm("tiny-llama-lm", seed=3)
    model.eval()
    task = keyword_generation_task("classify")
    prompts = task.test_prompts[:10]
    assert all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for c in task.choices)
    fast = _choice_scores(model, task.choices, tokenizer, prompts, 24, 4, torch.device("cpu"), 0, 1)
    collate = PadPromptCompletion(tokenizer.pad_token_id)
    with torch.no_grad():
        full = torch.stack(
            [
                completion_log_probs(
                    model,
                    collate(list(PromptCompletionTexts(prompts, [c] * 10, tokenizer, 24))),
                )[0]
                for c in task.choices
            ],
            dim=1,
        )
    assert fast.shape == (10, len(task.choices))
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)


def test_prompts_batched_by_length_with_the_last_logits_only_score_as_one_at_a_time(
    tokenizer, monkeypatch
):
    import fisherlora.logit_window as logit_window

    model, _ = load_causal_lm("tiny-llama-lm", seed=3)
    model.eval()
    choices = [" good", " bad"]
    # lengths out of order, so that the longest-first batches mix the rows
    prompts = [("word " * n) + "Sentiment:" for n in (1, 9, 3, 14, 2, 7, 11)]
    kept = record_logits_to_keep(monkeypatch, type(model))
    scores = _choice_scores(model, choices, tokenizer, prompts, 32, 3, torch.device("cpu"), 0, 1)
    # fewer positions than the batch holds; one alone keeps its last position only
    assert kept and all(k is not None and k < length for k, length in kept[:-1])
    assert kept[-1][0] == 1
    monkeypatch.setattr(logit_window, "keeps_logits", lambda model: False)
    alone = torch.cat(  # one prompt per batch, no padding, every position's logits
        [
            _choice_scores(model, choices, tokenizer, [p], 32, 1, torch.device("cpu"), 0, 1)
            for p in prompts
        ]
    )
    assert kept[-1][0] is None
    torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-5)


def test_training_on_the_scored_window_gives_the_full_passs_loss_and_gradients(tokenizer):
    from fisherlora.logit_window import scored_window

    base, _ = load_causal_lm("tiny-llama-lm", seed=3)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    prompts = [("word " * n) + "Sentiment:" for n in (6, 2, 9, 4)]
    completions = [" good", " bad", " good", " not good at all"]
    pairs = PromptCompletionTexts(prompts, completions, tokenizer, 32)
    batch = PadPromptCompletion(tokenizer.pad_token_id)(list(pairs))
    window = scored_window(model, batch)
    assert 1 < window["logits_to_keep"] < batch["input_ids"].shape[1]
    assert (window["labels"] != -100).sum() == (batch["labels"] != -100).sum()
    results = []
    for inputs in (batch, window):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for windowed, full in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(windowed, full, rtol=1e-4, atol=1e-7)
    # nothing to cut: labels per sequence, or every position scored
    assert scored_window(model, batch | {"labels": torch.tensor([0, 1, 0, 1])})["labels"].dim() == 1
    every = batch | {"labels": batch["input_ids"]}
    assert scored_window(model, every) is every
    assert scored_window(tiny_base("bert", seed=0)[0], batch) is batch  # no logits_to_keep


def test_choices_of_different_lengths_are_scored_on_the_same_prompt(tokenizer, monkeypatch):
    # a long prompt cut to fit each choice on its own gave a longer choice less context
    import fisherlora.experiments.generation_eval as generation_eval

    seen = []
    real = generation_eval.PromptCompletionTexts

    def recording(*args, **kwargs):
        texts = real(*args, **kwargs)
        seen.append([ids[:n] for ids, n in texts])  # the prompt part of each pair
        return texts

    monkeypatch.setattr(generation_eval, "PromptCompletionTexts", recording)
    model, _ = load_causal_lm("tiny-llama-lm", seed=3)
    choices = [" good", " not good at all"]
    assert len({len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices}) == 2
    prompts = ["a very long review " * 20 + "Sentiment:"] * 2
    scores = _choice_scores(model, choices, tokenizer, prompts, 32, 2, torch.device("cpu"), 0, 1)
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()
    assert len(seen) == 2 and seen[0] == seen[1]  # the same prompt tokens for both choices
    longest = len(tokenizer(choices[1], add_special_tokens=False)["input_ids"])
    assert len(seen[0][0]) == 32 - longest


def test_max_test_draws_a_fixed_random_subset_not_the_first_examples():
    subset = held_out_subset(1000, 100)
    assert subset == held_out_subset(1000, 100) and len(set(subset)) == 100
    assert subset == sorted(subset) and subset[-1] > 500
    assert held_out_subset(10, None) == list(range(10)) == held_out_subset(10, 50)


@pytest.mark.parametrize("name", ["dora", "pissa", "eva", "lora-ga", "corda", "adalora"])
def test_peers_keep_a_causal_lms_outputs_at_init_on_prompt_completion_batches(name):
    base, targets = tiny_base("causal", seed=0)
    base.eval()
    original = copy.deepcopy(base)
    batches = prompt_completion_batches(8, seed=6)
    method = get_method(name, {"calib_batches": 8, "steps": 20})
    lora = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets)
    model = method.build(base, lora, batches)
    method.prepare(model, batches)
    model.eval()
    with torch.no_grad():
        for batch in batches[:2]:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
            torch.testing.assert_close(
                model(**inputs).logits, original(**inputs).logits, atol=1e-5, rtol=0
            )


def test_calibration_runs_the_head_on_the_scored_window_with_the_full_passs_statistics(
    monkeypatch,
):
    """FIM-LoRA's Fisher and FILet's energies from passes whose vocabulary head runs on the
    scored window only equal those of full passes; an adapted head gets full passes."""
    import fisherlora.logit_window as logit_window

    batches = prompt_completion_batches(3, seed=5)
    model_class = type(tiny_causal_peft().get_base_model())
    kept = record_logits_to_keep(monkeypatch, model_class)

    def statistics():
        fisher, _ = fisher_of_b(tiny_causal_peft().eval(), batches, n_batches=3, progress=False)
        report = filet_init(tiny_causal_peft().eval(), batches, n_batches=3, progress=False)
        return fisher, report.energies

    windowed = statistics()
    assert len(kept) == 6 and all(k is not None and k < length for k, length in kept)
    monkeypatch.setattr(logit_window, "keeps_logits", lambda model: False)
    kept.clear()
    full = statistics()
    assert len(kept) == 6 and all(k is None for k, _ in kept)
    for name in full[0]:
        torch.testing.assert_close(windowed[0][name], full[0][name], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(
            torch.tensor(windowed[1][name]), torch.tensor(full[1][name]), rtol=1e-4, atol=0
        )
    monkeypatch.undo()
    base, targets = tiny_base("causal", 0)
    adapted_head = get_peft_model(base, LoraConfig(r=2, target_modules=[*targets, "lm_head"]))
    kept = record_logits_to_keep(monkeypatch, type(base))
    fisher_of_b(adapted_head.eval(), batches, n_batches=3, progress=False)
    assert len(kept) == 3 and all(k is None for k, _ in kept)
