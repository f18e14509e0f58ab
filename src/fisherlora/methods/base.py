"""The shape every method has, so the runner and a user's own loop treat all methods alike.

A method acts at up to five points of a fine-tuning run and does nothing at the others:

1. ``build``          inject the adapters into the base model (PEFT's ``get_peft_model``); it
                      also gets the calibration batches, for the peers whose PEFT
                      implementation reads data before the adapters exist (LoRA-GA, CorDA);
2. ``prepare``        before the optimizer exists: calibration passes, rank allocation, inits;
3. ``loss``           an extra term added to the task loss at every micro-batch;
4. ``after_backward`` once per optimizer step, after ``optimizer.step()``, before the gradients
                      are zeroed (where AdaLoRA's allocator and Fisher accumulators act);
5. ``export``         write a stock PEFT adapter that ``PeftModel.from_pretrained`` loads.

A method may also shape the optimizer's parameter groups (``param_groups``, e.g. FW-LoRA's
per-module weight decay), and has ``save_report(out_dir)``, which the runner calls at the end of
a run to write the method's own data files (``ranks.json``, ``filet.json``) into the run
directory, ``figures()``, the plots of that data it asks for (a rank map, an energy spectrum:
``fisherlora.figures`` records, drawn by the experiments layer, so a method never imports
matplotlib or the runner), and ``state_dict`` / ``load_state_dict`` for checkpoints (the HF
Trainer integration).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from fisherlora.adapters import export_lora
from fisherlora.figures import Figure


@runtime_checkable
class Method(Protocol):
    name: str

    def build(
        self,
        base_model: PreTrainedModel,
        lora_config: LoraConfig,
        calibration_loader: Iterable[dict[str, torch.Tensor]] | None = None,
    ) -> PeftModel: ...

    def prepare(
        self, model: PeftModel, calibration_loader: Iterable[dict[str, torch.Tensor]]
    ) -> dict[str, Any]: ...

    def loss(self, model: PeftModel, step: int) -> torch.Tensor | None: ...

    def after_backward(self, model: PeftModel, step: int) -> None: ...

    def export(self, model: PeftModel, out_dir: str | Path) -> None: ...

    # The runner and the Trainer integration also call these; AdapterMethod gives every method
    # the plain versions.
    def param_groups(self, model: PeftModel, weight_decay: float) -> list[dict[str, Any]]: ...

    def optimizer_ready(self, optimizer: torch.optim.Optimizer) -> None: ...

    def start_training(self, model: PeftModel) -> None: ...

    def end_training(self, model: PeftModel) -> None: ...

    def save_report(self, out_dir: str | Path) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AdapterMethod:
    """Plain LoRA behaviour at every step; a method overrides only the steps where it differs."""

    name = "lora"
    # The name of the method that was run, where this one is a member of a composition
    # (``fim-lora+filet+fw-lora``): what its report files are titled with. None: ``name``.
    run_name: str | None = None
    # Under torch.distributed each process may calibrate on its own share of the batches: our
    # methods all-reduce their statistics (stats.py), so every process ends with the statistics
    # of the union. PEFT's calibrated peers do not, and read every batch on every process.
    shards_calibration = True

    def build(
        self,
        base_model: PreTrainedModel,
        lora_config: LoraConfig,
        calibration_loader: Iterable[dict[str, torch.Tensor]] | None = None,
    ) -> PeftModel:
        return get_peft_model(base_model, lora_config)

    def prepare(
        self, model: PeftModel, calibration_loader: Iterable[dict[str, torch.Tensor]]
    ) -> dict[str, Any]:
        return {}

    def param_groups(self, model: PeftModel, weight_decay: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: by default every trainable parameter, one decay."""
        return [
            {
                "params": [p for p in model.parameters() if p.requires_grad],
                "weight_decay": weight_decay,
            }
        ]

    def optimizer_ready(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the optimizer holds its state for training (a resumed Trainer has loaded
        it: ``load_state_dict`` replaces the group dicts that :meth:`param_groups` returned)."""
        return None

    def loss(self, model: PeftModel, step: int) -> torch.Tensor | None:
        return None

    def after_backward(self, model: PeftModel, step: int) -> None:
        return None

    def start_training(self, model: PeftModel) -> None:
        """Called as a training run (a ``Trainer.train()`` call) begins, after ``prepare``."""
        return None

    def end_training(self, model: PeftModel) -> None:
        """Called when a training run ends, also one stopped early: what acts only during
        training (FW-LoRA's warm-up hooks, where the run ended inside the warm-up) comes off
        the model here, and ``start_training`` puts it back for a run that goes on."""
        return None

    def export(self, model: PeftModel, out_dir: str | Path) -> None:
        export_lora(model, out_dir)

    def save_report(self, out_dir: str | Path) -> None:
        return None

    def figures(self) -> list[Figure]:
        """The plots this method's report asks for, as data (drawn by the experiments layer:
        ``fisherlora.experiments.method_plots``); none for plain LoRA and the peers."""
        return []

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold of the method's training-time state (FW-LoRA's F, I and
        step); methods that act only before training have none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
