"""Hugging Face ``Trainer`` integration: our methods inside ``Trainer.train()``.

``FisherTrainer`` is a ``transformers.Trainer`` that runs a fisherlora method at the points of
the Method protocol:

- ``prepare`` (FIM-LoRA rank allocation, FILet initialisation, FW-LoRA's hooks) at the start of
  ``train()``, before the Trainer creates its optimizer, on calibration batches drawn from the
  training set in a fixed, seeded order (so that a resumed run re-derives the very same ranks
  and initialisation; the ranks are checked against those saved in the checkpoint);
- ``loss`` (FW-LoRA's penalty) added to the task loss of every micro-batch in ``compute_loss``;
- ``after_backward`` (FW-LoRA's schedule) once per optimizer step, from the
  ``on_optimizer_step`` callback;
- ``param_groups`` where the method shapes them (FW-LoRA ``fw_mode="decay"``);
- ``state_dict`` saved into every checkpoint (``fisherlora_state.pt``) and restored by
  ``train(resume_from_checkpoint=...)``.

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
import os
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


class _AfterOptimizerStep(TrainerCallback):
    """Calls the method's ``after_backward`` after each optimizer step, before the gradients are
    zeroed (the Trainer's ``on_optimizer_step``)."""

    def __init__(self, trainer: FisherTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.fisher.after_backward(self.trainer.model, state.global_step + 1)


class FisherTrainer(Trainer):
    """A ``transformers.Trainer`` that runs a fisherlora method (see the module docstring).

    Args:
        fisher_method: a method name as for ``fisherlora train --method`` (``"fim-lora"``,
            ``"filet"``, ``"fw-lora"``, ``"fim-lora+filet+fw-lora"``, ...) or a Method object.
        fisher_options: the method's settings (``calib_batches``, ``r_min``, ``fw_lambda``,
            ``fw_warmup_steps``, ...; the names of ``fisherlora train``'s flags). ``steps``
            defaults to the Trainer's ``max_steps`` when that is set.
        calibration_dataloader: the calibration batches; default: the training set in an order
            drawn from ``args.seed``, batches of ``per_device_train_batch_size``, the Trainer's
            data collator.
        Everything else goes to ``transformers.Trainer``; the model must be a ``PeftModel`` with
        a LoRA adapter, and no optimizer may be passed in (the method must act before it exists).
    """

    def __init__(
        self,
        *args: Any,
        fisher_method: str | Method = "fim-lora",
        fisher_options: dict[str, Any] | None = None,
        calibration_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.optimizer is not None:
            raise ConfigError(
                "FisherTrainer creates the optimizer itself: the method changes the adapters "
                "(ranks, initial values, parameter groups) before the optimizer may exist"
            )
        lora_layers(self.model)  # a clear error now for a model without LoRA layers
        options = dict(fisher_options or {})
        if self.args.max_steps and self.args.max_steps > 0:
            options.setdefault("steps", self.args.max_steps)
        options.setdefault("seed", self.args.seed)
        options.setdefault("progress", not self.args.disable_tqdm)
        self.fisher: Method = (
            get_method(fisher_method, options) if isinstance(fisher_method, str) else fisher_method
        )
        self.calibration_dataloader = calibration_dataloader
        self.fisher_info: dict[str, Any] | None = None
        self.add_callback(_AfterOptimizerStep(self))

    # -- before the optimizer ------------------------------------------------------------------
    def _calibration_batches(self):
        if self.calibration_dataloader is not None:
            return self.calibration_dataloader
        if self.train_dataset is None:
            raise ConfigError("FisherTrainer needs a train_dataset (or a calibration_dataloader)")
        generator = torch.Generator().manual_seed(self.args.seed)
        return DataLoader(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=self.data_collator,
        )

    def _ranks(self) -> dict[str, int]:
        adapter, layers = lora_layers(self.model)
        return {name: int(layer.r[adapter]) for name, layer in layers.items()}

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ConfigError(f"no checkpoint to resume from in {self.args.output_dir}")
        if self.fisher_info is None:  # once per trainer: the adapters change only here
            self.model.train()
            self.fisher_info = self.fisher.prepare(self.model, self._calibration_batches())
        if resume_from_checkpoint:
            self._restore_method_state(Path(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def create_optimizer(self, model=None):
        shaped = type(self.fisher).param_groups is not AdapterMethod.param_groups
        if self.optimizer is None and shaped:
            groups = self.fisher.param_groups(self.model, self.args.weight_decay)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(
                self.args, self.model
            )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    # -- during training -----------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        extra = self.fisher.loss(self.model, self.state.global_step + 1)
        if extra is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss + extra, outputs
        return result + extra

    # -- checkpoints ---------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        # A checkpoint is loaded back into this very model on resume, so it holds PEFT's own
        # adapter even after a residual init (whose save_pretrained writes the export for the
        # original base weights, which a resume could not load at rank r).
        with raw_adapter_saves(self.model):
            super()._save_checkpoint(model, trial)
        if not self.is_world_process_zero():
            return
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        torch.save(self.fisher.state_dict(), folder / STATE_FILE)
        (folder / RANKS_FILE).write_text(json.dumps(self._ranks(), indent=1))

    def _restore_method_state(self, checkpoint: Path) -> None:
        ranks_file = checkpoint / RANKS_FILE
        if ranks_file.exists() and json.loads(ranks_file.read_text()) != self._ranks():
            raise ConfigError(
                f"the ranks re-derived for resuming differ from those saved in {checkpoint}: the "
                "calibration data or settings changed since the checkpoint was written"
            )
        state_file = checkpoint / STATE_FILE
        if os.path.exists(state_file):
            self.fisher.load_state_dict(torch.load(state_file, weights_only=False))


__all__ = ["FisherTrainer"]
