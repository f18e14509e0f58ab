"""FisherTrainer: our methods inside ``transformers.Trainer.train()``, with checkpoints."""

import sys

import pytest
import torch
from conftest import tiny_peft_model
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from fisherlora import integrations
from fisherlora.adapters import lora_layers
from fisherlora.errors import ConfigError
from fisherlora.experiments.models import load_model
from fisherlora.integrations import (
    BASE_FILE,
    STATE_FILE,
    FisherTrainer,
    FisherTrainerMixin,
    fisher_trainer_class,
)


class KeywordDataset(torch.utils.data.Dataset):
    def __init__(self, task, tokenizer, n=256):
        self.items = [
            {**tokenizer(text, truncation=True, max_length=16), "labels": label}
            for text, label in zip(task.train_texts[:n], task.train_labels[:n], strict=True)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_trainer(tmp_path, keyword_task, method="fim-lora+filet+fw-lora", **args):
    base, tokenizer = load_model("tiny-bert", num_labels=2, seed=0)  # no dropout: deterministic
    model = get_peft_model(
        base,
        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]),
    )
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=4,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
    )
    return FisherTrainer(
        model=model,
        args=TrainingArguments(**(settings | args)),
        train_dataset=KeywordDataset(keyword_task, tokenizer),
        data_collator=DataCollatorWithPadding(tokenizer),
        fisher_method=method,
        fisher_options={"calib_batches": 2, "fw_warmup_steps": 3},
    )


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_trainer_runs_allocation_init_and_penalty(tmp_path, keyword_task):
    trainer = make_trainer(tmp_path, keyword_task)
    trainer.train()
    adapter, layers = lora_layers(trainer.model)
    ranks = [layer.r[adapter] for layer in layers.values()]
    assert sum(ranks) == 4 * len(layers) and len(set(ranks)) > 1  # FIM-LoRA acted, budget kept
    fw = trainer.fisher.members[2].penalty
    assert fw.step_count == 8  # after_backward once per optimizer step
    assert sum(fw.importance().values()) == pytest.approx(1.0) and fw._handles == []
    assert (tmp_path / "checkpoint-4" / STATE_FILE).exists()
    assert len(losses(trainer)) == 8


def test_resume_from_checkpoint_continues_the_same_run(tmp_path, keyword_task):
    whole = make_trainer(tmp_path / "a", keyword_task)
    whole.train()
    interrupted = make_trainer(tmp_path / "b", keyword_task)
    interrupted.add_callback(StopAfter(4))  # killed after its checkpoint at step 4
    interrupted.train()
    assert interrupted.state.global_step == 4
    second = make_trainer(tmp_path / "b", keyword_task)
    second.train(resume_from_checkpoint=True)
    first_run, second_run = losses(whole), losses(second)  # the resumed history has steps 1-4 too
    assert sorted(second_run) == list(range(1, 9))
    for step in second_run:
        assert second_run[step] == pytest.approx(first_run[step], rel=1e-4, abs=1e-6), step
    importance = whole.fisher.members[2].penalty.importance()
    resumed_importance = second.fisher.members[2].penalty.importance()
    assert resumed_importance == pytest.approx(importance)
    # the penalty is ~1e-5 of the loss: the losses alone would not see a resume without it
    trained = {n: p for n, p in whole.model.named_parameters() if p.requires_grad}
    for name, parameter in second.model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter, trained[name], rtol=0, atol=1e-6, msg=name)


def test_a_resume_without_the_methods_files_or_with_another_init_is_refused(tmp_path, keyword_task):
    method = "filet+fw-lora"  # the ranks stay r: only the init can differ
    interrupted = make_trainer(tmp_path, keyword_task, method=method)
    interrupted.add_callback(StopAfter(4))
    interrupted.train()
    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / BASE_FILE).exists()
    # FILet's init re-derived from other calibration batches: other residual base weights
    other = make_trainer(tmp_path, keyword_task, method=method)
    other.calibration_dataloader = DataLoader(
        other.train_dataset,
        batch_size=16,
        sampler=list(range(255, -1, -1)),
        collate_fn=other.data_collator,
    )
    with pytest.raises(ConfigError, match="initialisation re-derived for resuming differs"):
        other.train(resume_from_checkpoint=str(checkpoint))
    assert sum(len(m._forward_hooks) for m in other.model.modules()) == 0  # FW-LoRA's went too
    # refused before the method changes the model: another method, a folder not there, a
    # checkpoint without the method's state (its warm-up would be redone, silently)
    for name, folder, message in [
        ("filet+fw-lora-max", checkpoint, "written by a run of 'filet\\+fw-lora'"),
        (method, tmp_path / "checkpoint-99", "no checkpoint folder at"),
    ]:
        refused = make_trainer(tmp_path, keyword_task, method=name)
        before = {n: p.detach().clone() for n, p in refused.model.named_parameters()}
        with pytest.raises(ConfigError, match=message):
            refused.train(resume_from_checkpoint=str(folder))
        for n, p in refused.model.named_parameters():
            assert torch.equal(p, before[n]), n
        assert refused.fisher_info is None  # nothing calibrated
    (checkpoint / STATE_FILE).unlink()
    with pytest.raises(ConfigError, match=r"lacks \['fisherlora_state.pt'\]"):
        make_trainer(tmp_path, keyword_task, method=method).train(
            resume_from_checkpoint=str(checkpoint)
        )


def test_a_method_object_needs_the_method_steps_and_brings_its_own_options(tmp_path):
    from fisherlora.methods import get_method

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ConfigError, match=r"int has no \['prepare'"):
        FisherTrainer(model=tiny_peft_model(), args=args, fisher_method=42)
    method = get_method("fw-lora", {"fw_warmup_steps": 2})
    with pytest.raises(ConfigError, match=r"\['fw_lambda'\] would be ignored"):
        FisherTrainer(
            model=tiny_peft_model(),
            args=args,
            fisher_method=method,
            fisher_options={"fw_lambda": 1.0},
        )
    trainer = FisherTrainer(model=tiny_peft_model(), args=args, fisher_method=method)
    assert trainer.fisher is method
    # a checkpoint records a composition by its members in phase order: one name per method
    spelled = FisherTrainer(model=tiny_peft_model(), args=args, fisher_method="fw-lora + filet")
    assert spelled._method_name() == "filet+fw-lora"


def test_the_decay_form_without_weight_decay_is_refused_before_calibrating(tmp_path, keyword_task):
    with pytest.raises(ConfigError, match=r"TrainingArguments\(weight_decay=...\) is 0"):
        make_trainer(tmp_path, keyword_task, method="fw-lora-decay")


def test_decay_mode_resumed_during_warm_up_sets_the_decays_in_the_resumed_optimizer(
    tmp_path, keyword_task
):
    options = {"method": "fw-lora-decay", "weight_decay": 0.01, "save_steps": 2}
    interrupted = make_trainer(tmp_path, keyword_task, **options)
    interrupted.add_callback(StopAfter(2))  # a checkpoint at step 2, inside the 3-step warm-up
    interrupted.train()
    resumed = make_trainer(tmp_path, keyword_task, **options)
    resumed.train(resume_from_checkpoint=True)  # loading the optimizer replaces its group dicts
    importance = resumed.fisher.penalty.importance()
    decays = {
        g["fisher_module"]: g["weight_decay"]
        for g in resumed.optimizer.param_groups
        if "fisher_module" in g
    }
    assert decays.keys() == importance.keys() and len(set(importance.values())) > 1
    for name, decay in decays.items():  # wd · (1 − I_m), set at the end of warm-up
        assert decay == pytest.approx(0.01 * (1 - importance[name])), name


def test_optimizer_passed_in_or_no_lora_is_refused(tmp_path, keyword_task):
    model = tiny_peft_model()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match="creates the optimizer itself"):
        FisherTrainer(
            model=model,
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
            optimizers=(optimizer, None),
        )
    with pytest.raises(ConfigError, match=r"expected a peft\.PeftModel with a LoRA adapter"):
        FisherTrainer(
            model=tiny_peft_model().unload(),
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
        )


def test_the_mixin_goes_on_any_trainer_class_and_only_on_one(tmp_path):
    class CustomTrainer(Trainer):
        pass

    combined = fisher_trainer_class(CustomTrainer)
    assert combined.__name__ == "FisherCustomTrainer"
    assert combined.__mro__[1:3] == (FisherTrainerMixin, CustomTrainer)
    assert fisher_trainer_class(CustomTrainer) is combined  # one class per base
    assert fisher_trainer_class(combined) is combined
    assert fisher_trainer_class(Trainer) is FisherTrainer
    with pytest.raises(ConfigError, match="Trainer subclass"):
        fisher_trainer_class(dict)

    class NotATrainer(FisherTrainerMixin):
        pass

    with pytest.raises(ConfigError, match=r"must be combined with a transformers\.Trainer"):
        NotATrainer()
    with pytest.raises(ConfigError, match="does not take model_init"):
        combined(
            model_init=tiny_peft_model,
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
        )


def test_without_trl_the_sft_trainer_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # as if trl were not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[trl\]"'):
        _ = integrations.FisherSFTTrainer
    with pytest.raises(AttributeError):
        _ = integrations.NoSuchTrainer


@pytest.mark.parametrize("peer", ["pissa", "dora", "adalora", "fim-lora+filet"])
def test_methods_that_initialise_in_build_are_refused_by_the_trainer(tmp_path, keyword_task, peer):
    if "+" in peer:  # our methods act on the built model: accepted
        assert make_trainer(tmp_path, keyword_task, method=peer).fisher.name == peer
        return
    with pytest.raises(ConfigError, match=rf"\['{peer}'\] initialise in build"):
        make_trainer(tmp_path, keyword_task, method=peer)


def test_an_epoch_based_run_gives_fw_lora_its_real_length(tmp_path, keyword_task, monkeypatch):
    # max_steps unset: 256 examples / batch 16 = 16 batches, 2 accumulated: 8 steps an epoch
    given = {}
    real_get_method = integrations.get_method
    monkeypatch.setattr(
        integrations,
        "get_method",
        lambda name, options: given.update(options) or real_get_method(name, options),
    )
    trainer = make_trainer(
        tmp_path,
        keyword_task,
        method="fw-lora",
        max_steps=-1,
        num_train_epochs=3,
        gradient_accumulation_steps=2,
    )
    assert trainer._planned_steps() == 24 and given["steps"] == 24  # not FW-LoRA's 300
    trainer.args.gradient_accumulation_steps = 3  # 16 batches: 5 full steps and a partial one
    assert trainer._planned_steps() == 3 * 6


@pytest.mark.parametrize("method", ["fim-lora+filet+fw-lora", "fw-lora-decay"])
def test_biases_and_norms_stay_undecayed_in_either_form(tmp_path, keyword_task, method):
    # the loss form has one plain group: the Trainer's own optimizer; the decay form shapes
    # the LoRA groups and must split the rest (the head) by the Trainer's rule
    trainer = make_trainer(tmp_path, keyword_task, method=method, weight_decay=0.01)
    trainer.train()
    named = {id(p): n for n, p in trainer.model.named_parameters()}
    undecayed = {
        named[id(p)]
        for g in trainer.optimizer.param_groups
        if g["weight_decay"] == 0
        for p in g["params"]
    }
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    decayed = set(trainer.get_decay_parameter_names(trainer.model)) & trained
    assert undecayed and undecayed == trained - decayed
    assert all("bias" in n or "LayerNorm" in n for n in undecayed)
    seen = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(trained)  # each trained parameter once


def test_fw_lora_gets_the_accelerators_grad_scaler(tmp_path, keyword_task, monkeypatch):
    # accelerate makes a GradScaler for fp16 on a GPU (none on a CPU): FW-LoRA must see it
    scaler = torch.amp.GradScaler("cpu")
    original = FisherTrainer.create_accelerator_and_postprocess

    def with_scaler(self):
        original(self)
        self.accelerator.scaler = scaler

    monkeypatch.setattr(FisherTrainer, "create_accelerator_and_postprocess", with_scaler)
    trainer = make_trainer(tmp_path, keyword_task, method="fim-lora+fw-lora")
    assert trainer.fisher.members[1].grad_scaler is scaler


def test_under_ddp_each_process_calibrates_on_its_own_share(tmp_path, keyword_task, monkeypatch):
    # the methods all-reduce their statistics as over the union of the processes' batches: every
    # process reading the same batches counted them world-size times (FILet's |B| halved at 2)
    trainer = make_trainer(tmp_path, keyword_task)
    whole = list(trainer.calibration_batches().sampler)
    shares = []
    for rank in range(2):
        monkeypatch.setattr(TrainingArguments, "process_index", property(lambda self, r=rank: r))
        monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
        shares.append(list(trainer.calibration_batches().sampler))
    assert shares == [whole[0::2], whole[1::2]]
    assert sorted(shares[0] + shares[1]) == sorted(whole) == list(range(len(whole)))
    # an odd dataset: equal shares (one example left out), so equal batch counts and sizes
    trainer.train_dataset = torch.utils.data.Subset(trainer.train_dataset, range(9))
    loaders = []
    for rank in range(2):
        monkeypatch.setattr(TrainingArguments, "process_index", property(lambda self, r=rank: r))
        loaders.append(trainer.calibration_batches())
    assert [len(list(loader.sampler)) for loader in loaders] == [4, 4]
    assert set(loaders[0].sampler).isdisjoint(loaders[1].sampler)


@pytest.mark.parametrize("plugin", ["fsdp", "deepspeed"])
def test_fsdp_and_deepspeed_are_refused_by_name(tmp_path, keyword_task, monkeypatch, plugin):
    real_init = Trainer.__init__

    def sharded_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        setattr(self, f"is_{plugin}_enabled", True)  # as accelerate's plugin would set it

    monkeypatch.setattr(Trainer, "__init__", sharded_init)
    name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[plugin]
    with pytest.raises(ConfigError, match=f"does not support {name}"):
        make_trainer(tmp_path, keyword_task)


class HooksDuringSteps(TrainerCallback):
    """Counts the forward hooks on the model at each step of a train() call."""

    def __init__(self, model):
        self.model, self.counts = model, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.counts.append(sum(len(m._forward_hooks) for m in self.model.modules()))


def test_a_run_that_ends_inside_fw_loras_warm_up_leaves_no_hook_on_the_model(
    tmp_path, keyword_task
):
    def hooks(model):
        return sum(len(m._forward_hooks) for m in model.modules())

    with pytest.warns(UserWarning, match="not shorter than the run"):
        trainer = make_trainer(tmp_path, keyword_task, method="fw-lora", max_steps=2)
    seen = HooksDuringSteps(trainer.model)
    trainer.add_callback(seen)
    trainer.train()  # 2 steps of a 3-step warm-up
    penalty = trainer.fisher.penalty
    assert penalty.warming_up and penalty.step_count == 2
    assert min(seen.counts) > 0 and hooks(trainer.model) == 0
    fisher = penalty.fisher.clone()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model(**batch).loss.backward()  # the user's own pass after training: not counted
    assert not penalty._pending
    torch.testing.assert_close(penalty.fisher, fisher, rtol=0, atol=0)
    trainer.model.zero_grad()
    seen.counts.clear()
    trainer.train()  # a second call goes on with the warm-up (its last step), hooks back on
    assert seen.counts[0] > 0 and not penalty.warming_up and hooks(trainer.model) == 0
