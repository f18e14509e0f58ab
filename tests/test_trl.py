"""FisherSFTTrainer: the Fisher methods inside TRL's SFTTrainer, on a tiny random Llama with a
prompt/completion data set (completion-only loss), with checkpoints and the stock-PEFT export."""

from pathlib import Path

import pytest
import torch
from conftest import keyword_texts
from huggingface_hub import constants
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import TrainerCallback

from fisherlora import integrations
from fisherlora.adapters import lora_layers
from fisherlora.errors import ConfigError
from fisherlora.experiments.causal_models import load_causal_lm
from fisherlora.experiments.generation_tasks import CLASSIFY_PROMPT
from fisherlora.integrations import RANKS_FILE, STATE_FILE, FisherTrainerMixin, fisher_trainer_class
from fisherlora.methods import get_method

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
FisherSFTTrainer = integrations.FisherSFTTrainer  # made on first use, where trl is installed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHOD = "fim-lora+filet+fw-lora"
OPTIONS = {"calib_batches": 2, "fw_warmup_steps": 2}
STEPS, BATCH = 4, 8


@pytest.fixture(scope="module", autouse=True)
def no_telemetry():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield


def tiny_lm(lora: bool = True):
    """The random hidden-32 Llama (seed 0) with MiniLM's tokenizer ([SEP] as its EOS)."""
    base, tokenizer = load_causal_lm("tiny-llama-lm", seed=0)
    tokenizer.eos_token = "[SEP]"
    if not lora:
        return base, tokenizer
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS)
    return get_peft_model(base, config), tokenizer


def reviews(n: int = 64):
    """Prompt/completion pairs: ``Review: ...\\nSentiment:`` → `` positive`` / `` negative``."""
    texts, labels = keyword_texts(n, seed=0)
    return datasets.Dataset.from_dict(
        {
            "prompt": [CLASSIFY_PROMPT.format(text=t) for t in texts],
            "completion": [" positive" if y else " negative" for y in labels],
        }
    )


def sft_args(out, **extra):
    settings = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        max_length=48,
        logging_steps=1,
        save_steps=2,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        # SFTConfig's defaults are bf16 autocast (on a CPU too) and gradient checkpointing: off
        # here, for float32 outputs to compare and for speed (the resume test passes with both)
        bf16=False,
        gradient_checkpointing=False,
    )
    return trl.SFTConfig(**(settings | extra))


def make_trainer(out, **extra):
    model, tokenizer = tiny_lm()
    return FisherSFTTrainer(
        model=model,
        args=sft_args(out, **extra),
        train_dataset=reviews(),
        processing_class=tokenizer,
        fisher_method=METHOD,
        fisher_options=OPTIONS,
    )


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def ranks(model):
    adapter, layers = lora_layers(model)
    return {name: int(layer.r[adapter]) for name, layer in layers.items()}


def adapter_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run: 4 steps, checkpoints at steps 2 and 4."""
    trainer = make_trainer(tmp_path_factory.mktemp("whole"))
    trainer.train()
    return trainer


def test_the_class_is_sft_trainer_with_the_mixin_first():
    assert FisherSFTTrainer is fisher_trainer_class(trl.SFTTrainer)
    assert FisherSFTTrainer.__mro__[1:3] == (FisherTrainerMixin, trl.SFTTrainer)
    assert fisher_trainer_class(FisherSFTTrainer) is FisherSFTTrainer


def test_calibration_is_the_seeded_completion_only_batches_and_ranks_match_prepare(whole):
    dataset, pad = whole.train_dataset, whole.processing_class.pad_token_id
    # the seeded order of the prepared (tokenised) training set, padded here by hand
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    expected = []
    for start in (0, BATCH):
        rows = [dataset[i] for i in order[start : start + BATCH]]
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((BATCH, width), pad)
        labels = torch.full((BATCH, width), -100)
        for j, row in enumerate(rows):
            ids[j, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            if "labels" not in row:  # older TRL (1.0): a completion mask the collator applies
                mask = row["completion_mask"]
                row["labels"] = [
                    i if m else -100 for i, m in zip(row["input_ids"], mask, strict=True)
                ]
            labels[j, : len(row["labels"])] = torch.tensor(row["labels"])
        expected.append({"input_ids": ids, "labels": labels, "attention_mask": (ids != pad) * 1})
    calibration = iter(whole.calibration_batches())
    for reference in expected:
        batch = next(calibration)
        assert batch.keys() == reference.keys()  # the text columns were removed
        for key, value in reference.items():
            assert torch.equal(batch[key], value), key
        for row_ids, row_labels in zip(batch["input_ids"], batch["labels"], strict=True):
            scored = row_labels != -100  # completion-only: the answer and EOS, not the prompt
            assert not scored[0] and scored.any()
            # (MiniLM's tokenizer ends the pair with [SEP], TRL appends EOS = [SEP] again)
            answer = whole.processing_class.decode(row_ids[scored]).replace("[SEP]", "").strip()
            assert "review" not in answer and "sentiment" not in answer, answer
            if "labels" in dataset.column_names:
                # TRL 1.0 (a completion_mask column) puts the mask one token late with a
                # tokenizer that ends the prompt alone with [SEP]; later TRL gets it right
                assert answer in ("positive", "negative"), answer
    # the same method run by hand on the same model and batches allocates the same ranks
    reference_model, _ = tiny_lm()
    options = {**OPTIONS, "steps": STEPS, "seed": 0, "progress": False}
    get_method(METHOD, options).prepare(reference_model.train(), expected)
    allocated = ranks(whole.model)
    assert allocated == ranks(reference_model)
    assert len(set(allocated.values())) > 1
    # fim-lora's budget is in parameters: Σ r_m (n_m + m_m) at most LoRA's at r = 4, and close
    _, layers = lora_layers(whole.model)
    cost = {name: layer.in_features + layer.out_features for name, layer in layers.items()}
    used, budget = sum(allocated[n] * c for n, c in cost.items()), 4 * sum(cost.values())
    assert 0.95 * budget <= used <= budget
    fw = whole.fisher.members[2].penalty
    assert fw.step_count == STEPS and sum(fw.importance().values()) == pytest.approx(1.0)
    history = losses(whole)
    assert sorted(history) == list(range(1, STEPS + 1))
    assert all(0 < loss < 20 for loss in history.values())
    checkpoint = Path(whole.args.output_dir, "checkpoint-2")
    for name in (STATE_FILE, RANKS_FILE, "adapter_model.safetensors", "optimizer.pt"):
        assert (checkpoint / name).exists(), name


def test_resume_from_a_checkpoint_ends_with_the_same_adapter(whole, tmp_path):
    interrupted = make_trainer(tmp_path)
    interrupted.add_callback(StopAfter(2))  # killed after its checkpoint at step 2
    interrupted.train()
    assert interrupted.state.global_step == 2
    resumed = make_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == STEPS
    final, expected = adapter_weights(resumed.model), adapter_weights(whole.model)
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert losses(resumed)[STEPS] == pytest.approx(losses(whole)[STEPS], rel=1e-4)
    importance = resumed.fisher.members[2].penalty.importance()
    assert importance == pytest.approx(whole.fisher.members[2].penalty.importance())


def test_the_export_reloads_with_stock_peft_on_the_untouched_base(whole, tmp_path):
    whole.fisher.export(whole.model, tmp_path / "adapter")
    fresh, _ = tiny_lm(lora=False)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    batch = next(iter(whole.calibration_batches()))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    whole.model.eval()
    with torch.no_grad():
        trained = whole.model(**inputs).logits
        gap = (trained - reloaded(**inputs).logits).abs().max().item()
        with reloaded.disable_adapter():
            moved = (trained - reloaded(**inputs).logits).abs().max().item()
    assert gap < 1e-4 and moved > 100 * gap  # the adapter matters and reloads exactly


def test_an_optimizer_a_model_without_lora_or_padding_free_batches_are_refused(tmp_path):
    model, tokenizer = tiny_lm()
    common = dict(train_dataset=reviews(16), processing_class=tokenizer)
    with pytest.raises(ConfigError, match="creates the optimizer itself"):
        FisherSFTTrainer(
            model=model,
            args=sft_args(tmp_path),
            optimizers=(torch.optim.AdamW(model.parameters()), None),
            **common,
        )
    base, _ = tiny_lm(lora=False)
    with pytest.raises(ConfigError, match=r"expected a peft\.PeftModel with a LoRA adapter"):
        FisherSFTTrainer(model=base, args=sft_args(tmp_path), **common)
    with pytest.raises(ConfigError, match="exactly one LoRA adapter"):
        FisherSFTTrainer(
            model=base,
            args=sft_args(tmp_path),
            peft_config=IA3Config(target_modules=TARGETS),
            **common,
        )
    # TRL's own peft_config with a LoRA config: SFTTrainer builds the PeftModel, the method runs
    built = FisherSFTTrainer(
        model=tiny_lm(lora=False)[0],
        args=sft_args(tmp_path),
        peft_config=LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS),
        **common,
    )
    assert isinstance(built.model, PeftModel) and set(ranks(built.model).values()) == {4}
    padding_free = FisherSFTTrainer(
        model=tiny_lm()[0], args=sft_args(tmp_path, padding_free=True, max_length=None), **common
    )
    with pytest.raises(ConfigError, match="padding-free"):
        padding_free.train()


def test_the_penalty_counts_once_per_optimizer_step_and_not_in_evaluation(whole, monkeypatch):
    """SFTTrainer divides its loss by the tokens of the whole accumulated batch, so the trainer
    does not divide a micro-batch's loss by the accumulation steps: the penalty's share is."""
    monkeypatch.setattr(whole.fisher, "loss", lambda model, step: torch.tensor(1.0))
    monkeypatch.setattr(whole, "current_gradient_accumulation_steps", 2, raising=False)
    batch = next(iter(whole.calibration_batches()))
    tokens = torch.tensor(2 * int((batch["labels"][:, 1:] != -100).sum()))

    def extra(training: bool) -> float:
        whole.model.train(training)
        with torch.no_grad():
            both = whole.compute_loss(whole.model, dict(batch), num_items_in_batch=tokens)
            task = trl.SFTTrainer.compute_loss(
                whole, whole.model, dict(batch), num_items_in_batch=tokens
            )
        return (both - task).item()

    assert extra(training=True) == pytest.approx(0.5)
    assert extra(training=False) == 0.0
    whole.model.eval()
