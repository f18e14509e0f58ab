"""Hugging Face ``Trainer`` integration: our methods inside ``Trainer.train()``.

:class:`FisherTrainerMixin` holds the whole integration and composes with any
``transformers.Trainer`` subclass; :class:`FisherTrainer` is that mixin on a plain ``Trainer``,
:func:`fisher_trainer_class` puts it on any other (``fisher_trainer_class(SFTTrainer)``), and
``FisherSFTTrainer`` is the one for TRL's ``SFTTrainer`` (importable when ``trl`` is installed:
``pip install "fisherlora[trl]"``). Either way the method runs at the points of the Method
protocol:

- ``prepare`` (FIM-LoRA rank allocation, FILet initialisation, FW-LoRA's hooks) at the start of
  ``train()``, before the Trainer creates its optimizer, on calibration batches drawn from the
  (prepared, e.g. SFT-tokenised) training set in a fixed order seeded by ``args.seed`` and put
  together by the trainer's own data collator, so that the loss masks of training (a
  completion-only loss) hold for calibration too, and a resumed run re-derives the very same
  ranks and initialisation (the ranks are checked against those saved in the checkpoint);
- ``loss`` (FW-LoRA's penalty) added to the task loss of every training micro-batch in
  ``compute_loss``, once per optimizer step in all (a share of it per micro-batch where the
  trainer scales the task loss for gradient accumulation itself); not to evaluation losses;
- ``after_backward`` (FW-LoRA's schedule) once per optimizer step, from the
  ``on_optimizer_step`` callback;
- ``param_groups`` where the method shapes them (FW-LoRA ``fw_mode="decay"``);
- ``state_dict`` saved into every checkpoint (``fisherlora_state.pt``) and restored by
  ``train(resume_from_checkpoint=...)``.

Every override calls ``super()``, so the mixin goes *first* among the bases:
``class MyTrainer(FisherTrainerMixin, SomeTrainer)``.

Usage::

    model = get_peft_model(base_model, LoraConfig(r=8, lora_alpha=16, target_modules=[...]))
    trainer = FisherTrainer(
        model=model, args=TrainingArguments(...), train_dataset=..., data_collator=...,
        fisher_method="fim-lora+filet+fw-lora", fisher_options={"calib_batches": 8},
    )
    trainer.train()                                # or train(resume_from_checkpoint=True)
    trainer.fisher.export(trainer.model, "adapter/")   # a stock PEFT adapter
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from fisherlora.adapters import lora_layers, raw_adapter_saves
from fisherlora.errors import ConfigError
from fisherlora.methods import get_method
from fisherlora.methods.base import AdapterMethod, Method

STATE_FILE = "fisherlora_state.pt"
RANKS_FILE = "fisherlora_ranks.json"
BASE_FILE = "fisherlora_base.json"  # a fingerprint of the adapted layers' frozen base weights
METHOD_FILE = "fisherlora_method.json"  # the name of the method that wrote the checkpoint
TRL_HINT = 'pip install "fisherlora[trl]" (in a checkout: pip install -e ".[trl]")'


class _AfterOptimizerStep(TrainerCallback):
    """Calls the method's ``after_backward`` after each optimizer step, before the gradients are
    zeroed (the Trainer's ``on_optimizer_step``)."""

    def __init__(self, trainer: FisherTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        # after a resume has loaded the optimizer's state (and replaced its group dicts)
        ready = getattr(self.trainer.fisher, "optimizer_ready", None)  # a Method of one's own
        if optimizer is not None and ready is not None:
            ready(optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.fisher.after_backward(self.trainer.model, state.global_step + 1)


# what the Trainer calls on a Method object of one's own (AdapterMethod gives them all)
METHOD_STEPS = (
    "prepare",
    "loss",
    "after_backward",
    "param_groups",
    "state_dict",
    "load_state_dict",
)


def _check_method_object(method: Any, fisher_options: dict[str, Any] | None) -> None:
    """A ``fisher_method`` given as an object: it must have the Method steps the Trainer calls,
    and it was made with its own options (``fisher_options`` would be dropped without a word,
    and with them the Trainer's steps, seed and GradScaler)."""
    missing = [step for step in METHOD_STEPS if not callable(getattr(method, step, None))]
    if missing:
        raise ConfigError(
            f"fisher_method should be a method name or a Method object; {type(method).__name__} "
            f"has no {missing} (subclass fisherlora.methods.AdapterMethod for the plain steps)"
        )
    if fisher_options:
        raise ConfigError(
            "fisher_options apply to a fisher_method given by name; this Method object was made "
            f"with its own options, and {sorted(fisher_options)} would be ignored: pass the name "
            "(e.g. fisher_method='fim-lora+filet+fw-lora') with the options, or make the object "
            "with them (get_method(name, options), with 'steps' and 'seed' as the Trainer's)"
        )


class FisherTrainerMixin:
    """Runs a fisherlora method inside any ``transformers.Trainer`` subclass (see the module
    docstring); put it first among the bases, e.g. ``class T(FisherTrainerMixin, SFTTrainer)``,
    or let :func:`fisher_trainer_class` do it.

    Args:
        fisher_method: a method name as for ``fisherlora train --method`` (``"fim-lora"``,
            ``"filet"``, ``"fw-lora"``, ``"fim-lora+filet+fw-lora"``, ...) or a Method object.
        fisher_options: the method's settings (``calib_batches``, ``r_min``, ``fw_lambda``,
            ``fw_warmup_steps``, ...; the names of ``fisherlora train``'s flags). ``steps``
            defaults to the Trainer's ``max_steps`` when that is set, ``seed`` to ``args.seed``.
        calibration_dataloader: the calibration batches; default: the trainer's training set
            (as the trainer prepared it: TRL's SFTTrainer tokenises it in ``__init__``) with the
            columns the model does not take removed as the trainer removes them, in an order
            drawn from ``args.seed``, batches of ``per_device_train_batch_size``, the trainer's
            data collator.
        Everything else goes to the trainer class the mixin is combined with. After its
        ``__init__`` the model must be a ``PeftModel`` with one LoRA adapter (built by you, or
        by TRL from its ``peft_config``); no optimizer and no ``model_init`` may be passed in
        (the method changes the adapters before the optimizer may exist).
    """

    def __init__(
        self,
        *args: Any,
        fisher_method: str | Method = "fim-lora",
        fisher_options: dict[str, Any] | None = None,
        calibration_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(self, Trainer):
            raise ConfigError(
                f"{type(self).__name__}: FisherTrainerMixin must be combined with a "
                "transformers.Trainer subclass, listed after the mixin "
                "(class MyTrainer(FisherTrainerMixin, SFTTrainer))"
            )
        if kwargs.get("model_init") is not None:
            raise ConfigError(
                f"{type(self).__name__} does not take model_init: the Trainer would build a new "
                "model inside train(), after the method changed the adapters; pass model="
            )
        own_optimizer = ConfigError(
            f"{type(self).__name__} creates the optimizer itself: the method changes the "
            "adapters (ranks, initial values, parameter groups) before the optimizer may exist"
        )
        if (kwargs.get("optimizers") or (None, None))[0] is not None:
            raise own_optimizer  # before a trainer's __init__ does its work (SFT tokenises)
        super().__init__(*args, **kwargs)
        if self.optimizer is not None:
            raise own_optimizer
        lora_layers(self.model)  # a clear error now for a model without LoRA layers
        sharded = [
            name
            for name, on in (
                ("FSDP", getattr(self, "is_fsdp_enabled", False)),
                ("DeepSpeed", getattr(self, "is_deepspeed_enabled", False)),
            )
            if on
        ]
        if sharded:  # not tested, and likely wrong in silence: refused by name
            raise ConfigError(
                f"{type(self).__name__} does not support {sharded[0]}: the methods hold the "
                "adapter parameters they were given before the model is wrapped (a sharded "
                "parameter would be read empty, and DeepSpeed's own optimizer would bypass "
                "FW-LoRA's groups); use DDP (torchrun / accelerate launch) or one device"
            )
        options = dict(fisher_options or {})
        steps = self._planned_steps()
        if steps is not None:  # FW-LoRA's default warm-up is a share of the run
            options.setdefault("steps", steps)
        options.setdefault("seed", self.args.seed)
        # under fp16 the backward passes FW-LoRA's hooks see are scaled by accelerate's
        # GradScaler (none on a CPU): the penalty divides by its scale and skips the steps it
        # skips, as it does in the runner
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None:
            options.setdefault("grad_scaler", scaler)
        options.setdefault("progress", not self.args.disable_tqdm)
        if not isinstance(fisher_method, str):
            _check_method_object(fisher_method, fisher_options)
        self.fisher: Method = (
            get_method(fisher_method, options) if isinstance(fisher_method, str) else fisher_method
        )
        members = getattr(self.fisher, "members", [self.fisher])
        built = [  # a Method of one's own that is no AdapterMethod is taken as it is
            m.name
            for m in members
            if isinstance(m, AdapterMethod) and type(m).build is not AdapterMethod.build
        ]
        if built:  # the Trainer gets a PeftModel that is already built: build would not run
            raise ConfigError(
                f"{type(self).__name__} runs fisherlora's methods, which act on a built "
                f"PeftModel; {built} initialise in build (PEFT's own init or adapter type) and "
                "would silently train plain LoRA here: build the model with PEFT's option "
                "(e.g. LoraConfig(init_lora_weights='pissa'), use_dora=True) instead"
            )
        decays = [
            m.name for m in members if getattr(m, "options", {}).get("mode") == "decay"
        ]  # FW-LoRA's decay form scales the optimizer's weight decay: refused before calibrating
        if decays and not self.args.weight_decay > 0:
            raise ConfigError(
                f"{decays[0]}: FW-LoRA's decay form multiplies the optimizer's weight decay by "
                "(1 - I_m), and TrainingArguments(weight_decay=...) is 0: set it > 0, or use "
                "the loss form (fw_mode='loss')"
            )
        self.calibration_dataloader = calibration_dataloader
        self.fisher_info: dict[str, Any] | None = None
        self.add_callback(_AfterOptimizerStep(self))

    def _planned_steps(self) -> int | None:
        """The optimizer steps this trainer will take: ``max_steps`` where set, else the epochs
        times the steps of one epoch as the Trainer counts them (batches per process divided by
        the accumulation steps, at least one); None for a training set without a length."""
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        dataset = self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__"):
            return None
        per_step = self.args.per_device_train_batch_size * max(self.args.world_size, 1)
        rounding = math.floor if self.args.dataloader_drop_last else math.ceil
        batches = rounding(len(dataset) / per_step)
        # the Trainer's count: a last, partial accumulation is a step too
        per_epoch = max(math.ceil(batches / self.args.gradient_accumulation_steps), 1)
        return max(1, math.ceil(self.args.num_train_epochs * per_epoch))

    # -- before the optimizer ------------------------------------------------------------------
    def calibration_batches(self) -> Any:
        """The batches ``prepare`` calibrates on: ``calibration_dataloader`` where one was given,
        else the training set in the order ``torch.randperm(len(train_dataset))`` draws from a
        generator seeded with ``args.seed`` (a stream: its own order), put together as described
        in the class docstring; the method reads as many batches as its ``calib_batches`` asks
        for."""
        if self.calibration_dataloader is not None:
            return self.calibration_dataloader
        dataset = self.train_dataset
        if dataset is None:
            raise ConfigError(
                f"{type(self).__name__} needs a train_dataset (or a calibration_dataloader)"
            )
        if getattr(self, "padding_free", False):
            raise ConfigError(
                "padding-free batches (padding_free=True, or packing with the 'bfd' strategies) "
                "put every example of a batch in one row, and the calibration needs a row per "
                "example: set padding_free=False and packing=False, or pass a "
                "calibration_dataloader of padded batches"
            )
        collator = self.data_collator
        hf_datasets = sys.modules.get("datasets")  # imported wherever a datasets.Dataset exists
        if hf_datasets is not None and isinstance(dataset, hf_datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="calibration")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="calibration")
        # the DataLoader draws its workers' base seed from `generator`, not the global RNG
        generator = torch.Generator().manual_seed(self.args.seed)
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            order = None  # a stream: its first batches, in its own order
        else:
            order = torch.randperm(len(dataset), generator=generator).tolist()
            # under torch.distributed each process calibrates on its own share of one order
            # (the methods all-reduce their statistics as over the union, as in the runner)
            rank, world = self.args.process_index, max(self.args.world_size, 1)
            # equal shares (the last len % world examples left out), so that every process holds
            # the same batches count and sizes: FILet and the batch estimator refuse unequal ones
            order = order[: len(order) - len(order) % world][rank::world]
        return DataLoader(
            dataset,
            batch_size=self.args.per_device_train_batch_size,
            sampler=order,
            generator=generator,
            collate_fn=collator,
        )

    def _ranks(self) -> dict[str, int]:
        adapter, layers = lora_layers(self.model)
        return {name: int(layer.r[adapter]) for name, layer in layers.items()}

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """``Trainer.train``, after the method's ``prepare`` (once per trainer); on resume the
        method state saved in the checkpoint is restored before the trainer's loop starts. The
        method's ``start_training`` and ``end_training`` frame the loop, so FW-LoRA's warm-up
        hooks leave the model when a call ends inside the warm-up (and come back with the next
        call)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ConfigError(f"no checkpoint to resume from in {self.args.output_dir}")
        if resume_from_checkpoint:  # before the method changes the model: its files, its name
            self._check_checkpoint(Path(resume_from_checkpoint))
        if self.fisher_info is None:  # once per trainer: the adapters change only here
            self.model.train()
            self.fisher_info = self.fisher.prepare(self.model, self.calibration_batches())
        if resume_from_checkpoint:
            try:
                self._restore_method_state(Path(resume_from_checkpoint))
            except ConfigError:  # the re-derived init differs: FW-LoRA's hooks go with it
                for member in getattr(self.fisher, "members", [self.fisher]):
                    penalty = getattr(member, "penalty", None)
                    if penalty is not None:
                        penalty.remove_hooks()
                raise
        # what acts only while training (FW-LoRA's warm-up hooks) is on the model for this
        # call only, also where it stops early or raises: Methods of one's own may lack the steps
        start, end = (getattr(self.fisher, f"{when}_training", None) for when in ("start", "end"))
        if start is not None:
            start(self.model)
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            if end is not None:
                end(self.model)

    def create_optimizer(self, model=None):
        """The trainer's optimizer, over the method's parameter groups where it shapes them."""
        shaped = type(self.fisher).param_groups is not AdapterMethod.param_groups
        groups = (
            self.fisher.param_groups(self.model, self.args.weight_decay)
            if self.optimizer is None and shaped
            else []
        )
        # one group is the plain one (FW-LoRA in loss mode, a composition without the decay
        # form): the Trainer's own optimizer then, which keeps biases and norms undecayed
        if len(groups) > 1:
            groups = self._undecay_biases_and_norms(groups)
            chosen = getattr(self, "optimizer_cls_and_kwargs", None)
            optimizer_cls, optimizer_kwargs = chosen or self.get_optimizer_cls_and_kwargs(
                self.args, self.model
            )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    def _undecay_biases_and_norms(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The method's groups, with those it does not shape (FW-LoRA's "rest": the head, any
        other trainable parameter) split by the Trainer's own rule, so biases and norms stay
        undecayed as they do under the Trainer's optimizer."""
        decayed = set(self.get_decay_parameter_names(self.model))
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        shaped, split = [], []
        for group in groups:
            if "fisher_module" in group:
                shaped.append(group)
                continue
            for keep in (True, False):
                params = [p for p in group["params"] if (name_of.get(id(p)) in decayed) == keep]
                if params:
                    wd = group["weight_decay"] if keep else 0.0
                    split.append({**group, "params": params, "weight_decay": wd})
        return [*shaped, *split]

    # -- during training -----------------------------------------------------------------------
    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Whether ``training_step`` leaves this micro-batch's loss undivided by the number of
        accumulation steps (the trainer's own rule: the loss was normalised by the token count
        of the whole accumulated batch)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool(accepts and num_items_in_batch is not None) or (
            getattr(self, "compute_loss_func", None) is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The trainer's task loss, plus the method's term while training."""
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not self.model.training:  # an evaluation: the task loss alone
            return result
        extra = self.fisher.loss(self.model, self.state.global_step + 1)
        if extra is None:
            return result
        if self._loss_scaled_for_accumulation(num_items_in_batch):
            # the trainer will not divide this micro-batch's loss: the penalty's share, so that
            # an optimizer step sees the penalty once, as with one micro-batch
            steps = getattr(
                self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
            )
            extra = extra / max(1, int(steps))
        if return_outputs:
            loss, outputs = result
            return loss + extra, outputs
        return result + extra

    # -- checkpoints ---------------------------------------------------------------------------
    def _base_fingerprint(self) -> dict[str, list[float]]:
        """Per adapted layer, the sum and the sum of squares of its frozen base weight (float64):
        after a residual init (FILet) that weight is W − s B₀ A₀, so a resume that re-derives
        another init (other data, seed or settings) is told apart from the one checkpointed."""
        _, layers = lora_layers(self.model)
        out = {}
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight.detach().double()
            out[name] = [weight.sum().item(), weight.square().sum().item()]
        return out

    def _save_checkpoint(self, model, trial) -> None:
        # The method's files first: the Trainer's own save ends by pushing the folder to the hub
        # (push_to_hub), and every process that saves (each node's first with
        # save_on_each_node) writes them, so that no checkpoint lacks them.
        if self.args.should_save:
            run_dir = Path(self._get_output_dir(trial=trial))
            folder = run_dir / f"checkpoint-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.fisher.state_dict(), folder / STATE_FILE)
            (folder / RANKS_FILE).write_text(json.dumps(self._ranks(), indent=1))
            (folder / BASE_FILE).write_text(json.dumps(self._base_fingerprint(), indent=1))
            (folder / METHOD_FILE).write_text(json.dumps({"method": self._method_name()}))
        # A checkpoint is loaded back into this very model on resume, so it holds PEFT's own
        # adapter even after a residual init (whose save_pretrained writes the export for the
        # original base weights, which a resume could not load at rank r).
        with raw_adapter_saves(self.model):
            super()._save_checkpoint(model, trial)

    def _method_name(self) -> str:
        """The method's name as a checkpoint records it: a composition by its members in phase
        order (``fw-lora+filet+fim-lora`` and ``fim-lora+filet+fw-lora`` are one method)."""
        members = getattr(self.fisher, "members", None)
        if members:
            return "+".join(str(m.name) for m in members)
        return str(getattr(self.fisher, "name", type(self.fisher).__name__))

    def _check_checkpoint(self, checkpoint: Path) -> None:
        """What a resume can be refused for before the method changes the model: a folder that
        is not there, lacks the method's files, or was written by another method."""
        if not checkpoint.is_dir():
            raise ConfigError(f"no checkpoint folder at {checkpoint} to resume from")
        missing = [f for f in (RANKS_FILE, STATE_FILE) if not (checkpoint / f).exists()]
        if missing:  # resuming without them would redo FW-LoRA's warm-up, silently
            raise ConfigError(
                f"{checkpoint} lacks {missing}, which a {type(self).__name__} writes into every "
                "checkpoint: it was not written by one, or not completely"
            )
        method_file = checkpoint / METHOD_FILE
        if method_file.exists():  # checkpoints written before 2026-12-02 lack it
            saved = json.loads(method_file.read_text())["method"]
            if saved != self._method_name():
                raise ConfigError(
                    f"{checkpoint} was written by a run of {saved!r}, and this trainer runs "
                    f"{self._method_name()!r}: resume with the same fisher_method (its saved state "
                    "would otherwise be dropped or its warm-up redone)"
                )

    def _restore_method_state(self, checkpoint: Path) -> None:
        ranks_file, state_file = checkpoint / RANKS_FILE, checkpoint / STATE_FILE
        if json.loads(ranks_file.read_text()) != self._ranks():
            raise ConfigError(
                f"the ranks re-derived for resuming differ from those saved in {checkpoint}: the "
                "calibration data or settings changed since the checkpoint was written"
            )
        base_file = checkpoint / BASE_FILE
        if base_file.exists():  # checkpoints written before 2026-12-02 lack it
            saved, now = json.loads(base_file.read_text()), self._base_fingerprint()
            differ = [
                n
                for n in now
                if n not in saved
                or not all(
                    math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
                    for a, b in zip(saved[n], now[n], strict=True)
                )
            ]
            if differ:
                raise ConfigError(
                    f"the initialisation re-derived for resuming differs from the one in "
                    f"{checkpoint} (base weights of {differ[:3]}): the calibration data, seed or "
                    "settings changed since the checkpoint was written"
                )
        self.fisher.load_state_dict(torch.load(state_file, weights_only=False))


class FisherTrainer(FisherTrainerMixin, Trainer):
    """A ``transformers.Trainer`` that runs a fisherlora method: :class:`FisherTrainerMixin` on
    the plain ``Trainer`` (its arguments are the mixin's and the Trainer's)."""


_TRAINER_CLASSES: dict[type, type] = {Trainer: FisherTrainer}


def fisher_trainer_class(base: type[Trainer]) -> type[Trainer]:
    """The class ``Fisher<Base>(FisherTrainerMixin, base)``: ``base`` (any ``transformers.Trainer``
    subclass, e.g. ``trl.SFTTrainer``) running a fisherlora method. One class per ``base``
    (the same object on every call); ``base`` itself where it already has the mixin.

    Args:
        base: the trainer class to extend.

    Returns:
        The trainer class, taking ``base``'s arguments and the mixin's (``fisher_method``,
        ``fisher_options``, ``calibration_dataloader``).
    """
    if not (isinstance(base, type) and issubclass(base, Trainer)):
        raise ConfigError(f"expected a transformers.Trainer subclass, got {base!r}")
    if issubclass(base, FisherTrainerMixin):
        return base
    if base not in _TRAINER_CLASSES:
        _TRAINER_CLASSES[base] = type(
            f"Fisher{base.__name__}",
            (FisherTrainerMixin, base),
            {
                "__module__": __name__,
                "__doc__": f"``{base.__module__}.{base.__qualname__}`` running a fisherlora "
                "method (see :class:`FisherTrainerMixin`).",
            },
        )
    return _TRAINER_CLASSES[base]


def __getattr__(name: str) -> Any:
    # FisherSFTTrainer: made on first use, so that this module does not need trl
    if name == "FisherSFTTrainer":
        try:
            from trl import SFTTrainer
        except ImportError as err:
            raise ImportError(
                f"fisherlora.integrations.FisherSFTTrainer needs TRL: {TRL_HINT}"
            ) from err
        return fisher_trainer_class(SFTTrainer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FisherTrainer", "FisherTrainerMixin", "fisher_trainer_class"]
