"""One fine-tuning run: data → method.build → method.prepare → the training loop → evaluation → files.

The loop is plain PyTorch a reader can follow top to bottom: AdamW, a linear schedule with
warm-up, gradient clipping, optional gradient accumulation, evaluation on the held-out split at
intervals. Methods act only through the five steps of the ``Method`` protocol, and tasks only
through their kind (``task_kinds``: the model, the batches, the evaluation), so the loop is the
same for every kind of task.

Under ``torchrun --nproc-per-node N`` (or ``accelerate launch``) the same loop runs data-parallel:
each process reads its share of the batches (every N-th, so a step sees the examples of N
consecutive single-process batches; ``batch_size`` is per process), the model is wrapped in
``DistributedDataParallel`` for training, our methods calibrate on their shares and all-reduce
their statistics, evaluation sums the shares' confusion matrices, and rank 0 alone prints and
writes the run directory.

A run directory holds ``config.json`` (written first), ``curve.csv``, ``adapter/`` and
``metrics.json`` (written last, so its presence marks a finished run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from peft import LoraConfig, PeftModel
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from fisherlora.adapters import input_factors, resolve_targets, row_space_kept
from fisherlora.allocate import DEFAULT_ROUNDING
from fisherlora.errors import ConfigError
from fisherlora.experiments.batching import forever
from fisherlora.experiments.distributed import Process, barrier, init_distributed
from fisherlora.experiments.generation_tasks import GenerationTask
from fisherlora.experiments.method_plots import save_method_report
from fisherlora.experiments.metrics import collapse_warning, predictions_collapsed
from fisherlora.experiments.models import default_targets
from fisherlora.experiments.precision import (
    PRECISIONS,
    autocast,
    check_precision,
    grad_scaler,
    nonfinite_loss_message,
)
from fisherlora.experiments.task_kinds import Evaluation, Split, TaskKind, load_data, task_kind
from fisherlora.experiments.tasks import MAX_DROPPED_FRACTION, Task
from fisherlora.logit_window import scored_window
from fisherlora.methods import VARIANTS, get_method
from fisherlora.stats import all_reduce_mean, all_reduce_sum


@dataclass
class TrainConfig:
    """Every setting of a run (all of it is written to ``config.json``)."""

    task: str = "rotten-tomatoes"
    data: str | None = None  # a CSV/TSV/JSONL/JSON file instead of a named task
    test_data: str | None = None  # a separate test file for ``data``
    text_column: str = "text"
    label_column: str = "label"
    # a data file (or hub split) may lose this share of its rows (empty texts, missing labels,
    # repeated texts) before it is refused; see tasks.usable_rows
    max_dropped_fraction: float = MAX_DROPPED_FRACTION
    model: str = "minilm"
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # LoRA dropout
    rslora: bool = False  # scale by α/√r instead of α/r
    targets: list[str] | None = (
        None  # None: the architecture's default (see models.DEFAULT_TARGETS)
    )
    steps: int = 300  # optimizer steps
    batch_size: int = 32  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06  # share of the steps with a linearly rising learning rate
    max_grad_norm: float = 1.0  # clipping; 0 turns it off
    max_length: int = 128  # tokens per text after truncation
    max_test: int | None = None  # evaluate on N test examples (a fixed random subset); None: all
    group_by_length: bool = True  # batches of similar length (less padding, faster steps)
    calib_batches: int = 8  # calibration passes of data-driven methods (fim-lora, ...)
    layers_per_pass: int | None = None  # calibrate target layers in groups (fim-lora, filet)
    r_min: int | None = None  # rank bounds of rank-allocating methods; None: max(1, r // 2)
    r_max: int | None = None  # None: 2 r
    # budget of fim-lora / random-rank: "params" (within one module's rank cost of LoRA's adapter
    # parameters at rank r, never above) or "ranks" (Σ r_m = M r; parameters then drift)
    budget: str = "params"
    # how fim-lora / random-rank hand out the units left after flooring (allocate.water_fill):
    # "largest" (the largest parameter total not above) or "maximal" (no module can grow)
    rounding: str = DEFAULT_ROUNDING
    score: str = "mean"  # FIM-LoRA score reduction: mean, max, l2
    estimator: str = "per_example"  # FIM-LoRA Fisher: per_example (the paper's Eq. 1), batch
    basis: str = "gram"  # FILet candidate directions: gram (the paper), svd
    select: str = "min"  # FILet selection: min, max, random
    scale: str = "fisher-norm"  # FILet magnitudes: fisher-norm, fisher, singular
    fw_warmup_steps: int | None = None  # FW-LoRA warm-up K; None: 500, or steps // 5 for short runs
    fw_lambda: float = 1e-4  # FW-LoRA λ
    fw_estimator: str = "sketch"  # FW-LoRA frozen-gradient norm: sketch, exact
    fw_probes: int = 8  # FW-LoRA sketch probes k
    fw_normalize: str = "sum"  # FW-LoRA importance normalisation: sum, max
    fw_mode: str = "loss"  # FW-LoRA: penalty in the loss, or per-module weight decay
    eval_every: int = 100  # steps between evaluations; 0: only at the end
    # share of the training split carved out as validation (a salted text hash, tasks.py); with
    # one, the evaluations during training read validation and the test split is read once at
    # the end of a "final" run. 0: no validation split (the evaluations then read test)
    val_fraction: float = 0.0
    train_size: int | None = None  # a fixed subset of the training split (low-data cells)
    phase: str = "final"  # "final": test read once at the end; "tune": validation only
    eval_batch_size: int = 128
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # fp32; or bf16 / fp16: forward passes and losses under autocast, float32 master weights
    # (fp16 with a GradScaler); see precision.py
    precision: str = "fp32"
    out: str | None = None  # run directory; None writes nothing

    def __post_init__(self) -> None:
        positive = {
            "rank": self.rank,
            "alpha": self.alpha,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "lr": self.lr,
            "max_length": self.max_length,
            "eval_batch_size": self.eval_batch_size,
            "calib_batches": self.calib_batches,
        }
        if self.max_test is not None:
            positive["max_test"] = self.max_test
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for name in (
            "rank",
            "steps",
            "batch_size",
            "grad_accum",
            "max_length",
            "eval_batch_size",
            "calib_batches",
        ):
            if int(getattr(self, name)) != getattr(self, name):
                raise ConfigError(f"{name} must be a whole number, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (self.weight_decay >= 0 and self.max_grad_norm >= 0 and self.eval_every >= 0):
            raise ConfigError(  # `>= 0` is False for NaN too
                "weight_decay, max_grad_norm and eval_every must be numbers >= 0; got "
                f"{self.weight_decay}, {self.max_grad_norm} and {self.eval_every}"
            )
        for name in ("r_min", "r_max", "layers_per_pass"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 1):
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.r_min is not None and self.r_max is not None and self.r_min > self.r_max:
            raise ConfigError(f"r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        if "decay" in self._fw_modes() and not self.weight_decay > 0:
            raise ConfigError(
                f"{self.method}: FW-LoRA's decay form (--fw-mode decay, or the fw-lora-decay "
                "variant) multiplies the optimizer's weight decay by (1 - I_m); with "
                "weight_decay 0 it does nothing. Set --weight-decay, or use the loss form"
            )
        if self.targets is not None and not self.targets:
            raise ConfigError("targets must name at least one module")
        if not (self.val_fraction == 0 or 0 < self.val_fraction <= 0.5):
            raise ConfigError(f"val_fraction must be 0 or in (0, 0.5], got {self.val_fraction}")
        if self.phase not in ("final", "tune"):
            raise ConfigError(f"phase must be 'final' or 'tune', got {self.phase!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}"
            )
        if self.phase == "tune" and self.val_fraction == 0:
            raise ConfigError("a tuning run reads validation only: it needs val_fraction > 0")
        if self.train_size is not None and (
            int(self.train_size) != self.train_size or self.train_size < self.batch_size
        ):
            raise ConfigError(
                f"train_size must be a whole number of at least one batch ({self.batch_size}), "
                f"got {self.train_size!r}"
            )

    def _fw_modes(self) -> list[str]:
        """The FW-LoRA form each FW-LoRA member of ``method`` runs (a variant fixes its own)."""
        modes = []
        for part in self.method.split("+"):
            base, fixed = VARIANTS.get(part, (part, {}))
            if base == "fw-lora":
                modes.append(fixed.get("fw_mode", self.fw_mode))
        return modes


@dataclass
class RunResult:
    """What a run measured; ``metrics`` is also written to ``metrics.json``."""

    metrics: dict[str, Any]
    curve: pd.DataFrame
    model: PeftModel = field(repr=False)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA "
            f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window, so that runs made one after another in one process
    (``fisherlora compare``) each report their own peak. On Linux the resident-set peak is reset
    through ``/proc/self/clear_refs``; where that is not possible the peak stays process-wide."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; otherwise the peak resident set size since the last
    :func:`reset_peak_memory` (Linux), or of the whole process (elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` so that the file is either absent or complete (a completion
    marker must never be half-written by an interrupt)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# the longest a provenance query to git may take (a run never waits longer, nor fails on it)
GIT_TIMEOUT_S = 5.0


def source_revision(directory: str | Path | None = None) -> dict[str, str | bool | None]:
    """The git commit of the source tree ``directory`` (default: fisherlora's own package
    directory) comes from, and whether its tracked files there differ from that commit:
    ``{"fisherlora_commit": sha, "fisherlora_dirty": bool}``. Both ``None`` where it is not a
    git checkout (an installed wheel; a directory git does not track, such as a virtual
    environment inside a checkout), git is missing, or git fails or takes over
    :data:`GIT_TIMEOUT_S`: provenance never fails a run."""
    unknown: dict[str, str | bool | None] = {"fisherlora_commit": None, "fisherlora_dirty": None}
    where = Path(directory) if directory is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--verify", "HEAD")
        # the directory's files must be the checkout's own (an ignored site-packages inside a
        # checkout would otherwise report the checkout's commit)
        git("ls-files", "--error-unmatch", "--", ".")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    except Exception:  # no git, not a checkout, a timeout: unknown, never an error
        return unknown
    return {"fisherlora_commit": commit or None, "fisherlora_dirty": dirty if commit else None}


def library_versions() -> dict[str, str | bool | None]:
    import peft
    import transformers

    from fisherlora import __version__

    return {
        "fisherlora": __version__,
        **source_revision(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters (adapters + classifier head), adapter parameters (every trainable
    ``lora_*`` tensor), the adapter parameters still in effect (see
    :func:`effective_adapter_params`) and all parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapter = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n
    )
    return {
        "trainable_params": trainable,
        "adapter_params": adapter,
        "effective_adapter_params": effective_adapter_params(model, adapter),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def effective_adapter_params(model: torch.nn.Module, adapter_params: int) -> int:
    """The adapter parameters that act in the model as it is now.

    AdaLoRA (PEFT) keeps P, Λ and Q at ``init_r`` ranks as parameters and prunes by masking
    triplets of Λ to zero; its budget counts ranks (``target_r`` × modules), not parameters.
    A module that keeps ``k_m`` triplets (PEFT's ``rank_pattern``, written at each masking step
    and fixed at the final one) acts like ``k_m (n_m + m_m + 1)`` parameters (``k_m`` rows of P,
    columns of Q and entries of Λ). Before any pruning every triplet counts. Every other method:
    ``adapter_params``."""
    from peft.tuners.adalora import AdaLoraLayer

    pruned = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, AdaLoraLayer):
            continue
        for adapter, values in layer.lora_E.items():
            config = getattr(model, "peft_config", {}).get(adapter)
            pattern = getattr(config, "rank_pattern", None) or {}
            # keyed by E's name inside the wrapped model, with or without the adapter name
            masks = [
                mask
                for key, mask in pattern.items()
                if f".{name}".endswith("." + key.split(".lora_E")[0])
            ]
            if values.requires_grad and masks:
                dropped = len(masks[0]) - sum(masks[0])
                pruned += dropped * (layer.in_features + layer.out_features + 1)
    return adapter_params - pruned


def method_options(config: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """The settings a method may take (each method's constructor picks the ones it knows)."""
    names = (
        "calib_batches",
        "layers_per_pass",
        "r_min",
        "r_max",
        "budget",
        "rounding",
        "score",
        "estimator",
        "basis",
        "select",
        "scale",
        "seed",
        "steps",
        "fw_warmup_steps",
        "fw_lambda",
        "fw_estimator",
        "fw_probes",
        "fw_normalize",
        "fw_mode",
    )
    return {name: getattr(config, name) for name in names} | {"progress": progress}


def train(
    config: TrainConfig,
    *,
    task: Task | GenerationTask | TaskKind | None = None,
    progress: bool = True,
) -> RunResult:
    """Fine-tune ``config.model`` on ``config.task`` with ``config.method`` and evaluate it.

    ``task`` is the data (default: ``config.task``, loaded); its kind (``task_kinds``) loads the
    model, makes the batches and evaluates: a classification task trains a sequence classifier,
    a generation task (``NAME-gen``, ``NAME-lm``) a causal LM with the loss on the completion
    tokens only. A :class:`TaskKind` given as ``task`` is used as it is (its splits as they are)."""
    run_start = time.perf_counter()
    process, device = init_distributed(resolve_device(config.device))
    check_precision(config.precision, device)
    progress = progress and process.is_main
    reset_peak_memory(device)
    # forward passes and losses of training and evaluation run in ``autocasting()``; the weights,
    # the method terms, calibration and the optimizer stay float32 (a no-op context at fp32)
    autocasting = autocast(config.precision, device)
    scaler = grad_scaler(config.precision, device)  # fp16 only
    options = method_options(config, progress)
    if scaler is not None:  # FW-LoRA divides its warm-up statistics by the loss scale
        options["grad_scaler"] = scaler
    method = get_method(config.method, options)
    if not isinstance(task, TaskKind):
        task = task_kind(carve_splits(task or load_data(config), config), config)
    set_seed(config.seed)
    base_model = task.load_model(config.model, seed=config.seed)
    targets = list(config.targets) if config.targets else default_targets(base_model)
    # before anything is allocated or written: an impossible rank would otherwise fail only
    # later (after gigabytes of adapters)
    resolve_targets(base_model, targets, rank=config.rank)
    lora_config = LoraConfig(
        task_type=task.peft_task_type,
        # a head that PEFT's task type does not cover (images); optional in the protocol
        modules_to_save=getattr(task, "modules_to_save", None),
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        use_rslora=config.rslora,
    )
    has_val = config.val_fraction > 0
    evaluate_during, evaluate_test = held_out_evaluators(task, config, device, process)
    batches = forever(
        task.train_batches(
            config.batch_size, seed=config.seed, rank=process.rank, world_size=process.world_size
        )
    )
    calibration_loader = calibration_batches(task, method, config, process)

    base_model.to(device)
    started = time.perf_counter()
    model = method.build(base_model, lora_config, calibration_loader)
    build_time = time.perf_counter() - started
    started = time.perf_counter()
    prepare_info = method.prepare(model, calibration_loader)
    prepare_time = time.perf_counter() - started
    # only now: a method's refusal (rank bounds, calibration data) leaves a finished run in
    # config.out as it was, and a new folder unwritten
    out = start_run_directory(config, task, targets, device, process)
    # the input directions each adapter starts from (A after any init), to report at the end how
    # much of them training kept: FILet's "stays in the Fisher subspace" needs LoRA's figure
    # beside it to mean anything. None where the adapters are not plain LoRA (AdaLoRA).
    initial_a = input_factors(model)

    # Re-seed so that training noise (dropout) does not depend on how much randomness the
    # method's initialisation consumed (and differs between processes).
    set_seed(config.seed + 1_000_003 * process.rank)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    forward = wrap_data_parallel(model, process, device)
    optimizer, scheduler = make_optimizer(model, method, config)

    curve_rows: list[dict[str, Any]] = []
    step_times: list[float] = []
    losses_since_eval: list[tuple[float, float]] = []  # (loss, method term) per step
    eval_time = 0.0
    skipped_steps = 0  # fp16: optimizer steps the GradScaler skipped (a gradient overflowed)
    loop_start = time.perf_counter()
    bar = tqdm(
        range(1, config.steps + 1),
        desc=f"{method.name} train",
        disable=not progress,
        unit="step",
        leave=False,
    )
    for step in bar:
        step_start = time.perf_counter()
        step_loss, step_extra = accumulate_gradients(
            forward, model, method, batches, step, config, scaler, autocasting, device
        )
        if scaler is not None:
            # the true gradients, for clipping and for after_backward (AdaLoRA's sensitivities)
            scaler.unscale_(optimizer)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        if scaler is None:
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skipped where a gradient overflowed
        scheduler.step()
        method.after_backward(model, step)
        if scaler is not None:
            scaler.update()  # after after_backward: FW-LoRA reads this step's scale
            skipped_steps += scaler.get_scale() < scale  # the scale backs off after a skip
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - step_start)
        losses_since_eval.append((step_loss, step_extra))
        bar.set_postfix(loss=f"{step_loss:.4f}")

        if step == config.steps or (config.eval_every and step % config.eval_every == 0):
            eval_start = time.perf_counter()
            with autocasting():
                scores, confusion = evaluate_during(model)
            eval_time += time.perf_counter() - eval_start
            # the loss optimised (task + method term) and the method's term alone, averaged over
            # the steps since the last evaluation and over processes
            train_loss, extra_loss = all_reduce_mean(
                torch.tensor(losses_since_eval, dtype=torch.float64, device=device).mean(dim=0)
            ).tolist()
            curve_rows.append(
                {
                    "step": step,
                    "train_loss": train_loss,
                    "extra_loss": extra_loss,
                    "split": "validation" if has_val else "test",
                    **scores,
                    "wall_time_s": time.perf_counter() - loop_start,
                }
            )
            losses_since_eval = []
            if process.is_main:
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    bar.close()
    method.end_training(model)  # FW-LoRA: warm-up hooks off, where it outlasted the run
    curve = pd.DataFrame(curve_rows)
    held_out: dict[str, Any] = {}
    last_confusion = confusion  # the last evaluation's (validation's, where there is one)
    if has_val:
        held_out = {f"val_{k}": v for k, v in scores.items()}
        if "accuracy" in curve:
            held_out["val_auc"] = validation_auc(curve["step"], curve["accuracy"])
        scores, confusion = {}, None
        if evaluate_test is not None:
            eval_start = time.perf_counter()
            with autocasting():
                scores, confusion = evaluate_test(model)
            eval_time += time.perf_counter() - eval_start
            if process.is_main:
                bar.write("test: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    train_time = time.perf_counter() - loop_start - eval_time
    metrics = {
        "task": task.name,
        "model": config.model,
        "method": method.name,
        "seed": config.seed,
        "phase": config.phase,
        "lr": config.lr,
        **scores,
        **held_out,
        "confusion_matrix": None if confusion is None else confusion.tolist(),
        "class_names": task.class_names,
        **count_parameters(model),
        "timings": {
            "median_step_s": statistics.median(step_times),
            "train_s": train_time,
            "eval_s": eval_time,
            "build_s": build_time,
            "init_s": prepare_time,  # calibration / data-driven initialisation
            "total_s": time.perf_counter() - run_start,
            "peak_memory_mb": peak_memory_mb(device),
        },
        "prepare": prepare_info,
        "skipped_steps": skipped_steps,
    }
    if initial_a is not None:
        kept = row_space_kept(initial_a, model)
        # mean over layers of ‖Q₀ᵀQ₁‖²_F / r (adapters.subspace_overlap): 1 = A's row space
        # unchanged, about r/n for unrelated directions
        metrics["a_row_space_kept"] = sum(kept.values()) / len(kept)
    # every held-out prediction in one class: the run learned nothing (warned about at the end)
    # (judged on test in a final run, on validation in a tuning run, which never reads test)
    collapse_seen = confusion if confusion is not None else last_confusion
    metrics["collapsed"] = predictions_collapsed(collapse_seen)
    if out is not None:
        curve.to_csv(out / "curve.csv", index=False)
        method.export(model, out / "adapter")
        save_method_report(method, out)  # its JSON files and the figures it asks for
        metrics["timings"]["total_s"] = time.perf_counter() - run_start
        write_json_atomic(out / "metrics.json", metrics)
    barrier()  # every process sees the finished run directory before it goes on
    if skipped_steps > config.steps // 4 and process.is_main:  # scale warm-up skips a few
        print(
            f"fisherlora: warning: fp16's gradient scaler skipped {skipped_steps} of "
            f"{config.steps} optimizer steps (a gradient overflowed); the run trained on the "
            "others only. Try --precision bf16 (same speed where supported) or fp32",
            file=sys.stderr,
        )
    if metrics["collapsed"] and process.is_main:
        print(
            collapse_warning(collapse_seen, task.class_names, steps=config.steps, lr=config.lr),
            file=sys.stderr,
        )
    return RunResult(metrics=metrics, curve=curve, model=model)


def validation_auc(steps: Sequence[float], accuracy: Sequence[float]) -> float:
    """The normalised area under the validation-accuracy curve, as a Riemann sum over the
    evaluations: ``Σ_k a_k (t_k − t_{k−1}) / t_K`` with ``t_0 = 0``, each evaluation standing for
    the steps since the one before. With evaluations every ``eval_every`` steps this is their mean;
    a last evaluation after a shorter interval (``eval_every`` not dividing the steps) weighs
    only that interval."""
    ends = [float(t) for t in steps]
    widths = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
    return sum(a * w for a, w in zip(accuracy, widths, strict=True)) / ends[-1]


def make_optimizer(
    model: PeftModel, method: Any, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the method's parameter groups, and a linear schedule with warm-up."""
    optimizer = torch.optim.AdamW(method.param_groups(model, config.weight_decay), lr=config.lr)
    scheduler = get_linear_schedule_with_warmup(
        optimizer,
        num_warmup_steps=round(config.warmup_ratio * config.steps),
        num_training_steps=config.steps,
    )
    return optimizer, scheduler


def accumulate_gradients(
    forward: torch.nn.Module,
    model: PeftModel,
    method: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    step: int,
    config: TrainConfig,
    scaler: torch.amp.GradScaler | None,
    autocasting: Callable[[], contextlib.AbstractContextManager],
    device: torch.device,
) -> tuple[float, float]:
    """The forward and backward passes of one optimizer step (``config.grad_accum`` micro-batches
    of ``batches``) through ``forward`` (``model`` or its DDP view); the gradients accumulate in
    ``model``. Returns the step's loss (task + method term) and the method's term alone."""
    step_loss = step_extra = 0.0
    for micro in range(config.grad_accum):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        # DDP all-reduces the gradients in the last micro-batch's backward only
        last = micro == config.grad_accum - 1
        sync = contextlib.nullcontext() if last or forward is model else forward.no_sync()
        with sync:
            with autocasting():
                # a causal LM's head over the scored positions only (the same loss)
                loss = forward(**scored_window(model, batch)).loss
            # the method's term in float32, outside autocast (FW-LoRA's r×r traces)
            extra = method.loss(model, step)
            if extra is not None:
                loss = loss + extra
                step_extra += extra.item() / config.grad_accum
            # one flag over every process: a process whose loss turned NaN must not raise
            # alone while the others wait for it in DDP's gradient all-reduce
            nonfinite = all_reduce_sum((~torch.isfinite(loss.detach())).float())
            if nonfinite.item() > 0:
                here = not bool(torch.isfinite(loss))
                raise FloatingPointError(
                    nonfinite_loss_message(
                        loss.item() if here else math.nan, step, config.precision
                    )
                    + ("" if here else " (in another process)")
                )
            loss_share = loss / config.grad_accum
            (loss_share if scaler is None else scaler.scale(loss_share)).backward()
        step_loss += loss.item() / config.grad_accum
    return step_loss, step_extra


def start_run_directory(
    config: TrainConfig,
    task: TaskKind,
    targets: list[str],
    device: torch.device,
    process: Process,
) -> Path | None:
    """``config.out`` with ``config.json`` written and no ``metrics.json`` (a rerun is unfinished
    until it ends), on rank 0; ``None`` elsewhere, and where the run writes nothing."""
    if not config.out or not process.is_main:
        return None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)
    settings = dataclasses.asdict(config) | {"targets": targets}
    (out / "config.json").write_text(
        json.dumps(
            {
                "settings": settings,
                "task": {"name": task.name, **task.sizes(), "class_names": task.class_names},
                "versions": library_versions(),
                "device": str(device),
                "world_size": process.world_size,
            },
            indent=2,
        )
    )
    return out


def held_out_evaluators(
    task: TaskKind, config: TrainConfig, device: torch.device, process: Process
) -> tuple[Callable[[torch.nn.Module], Evaluation], Callable[[torch.nn.Module], Evaluation] | None]:
    """The evaluation run during training, and the one run once after the last step (or
    ``None``).

    With a validation split the evaluations during training read it, and the test split is read
    once, after the last step, in a final run only (a tuning run never reads it). Without one
    (val_fraction 0, the CLI's `train` default) the evaluations read test, as they always did."""

    def on(split: Split, limit: int | None) -> Callable[[torch.nn.Module], Evaluation]:
        return task.evaluator(
            split,
            limit=limit,
            batch_size=config.eval_batch_size,
            device=device,
            rank=process.rank,
            world_size=process.world_size,
        )

    if config.val_fraction == 0:
        return on("test", config.max_test), None
    final = on("test", config.max_test) if config.phase == "final" else None
    return on("validation", None), final


def calibration_batches(
    task: TaskKind, method: Any, config: TrainConfig, process: Process
) -> Iterable[dict[str, torch.Tensor]]:
    """The batches data-driven methods calibrate on. They read training data only, in an order
    of their own, so that the training batches are the same whichever method runs. Under
    torch.distributed our methods read their shares of the global batches and all-reduce; a
    peer reads the global batches whole."""
    seed = config.seed + 1
    if getattr(method, "shards_calibration", False):
        return task.train_batches(
            config.batch_size, seed=seed, rank=process.rank, world_size=process.world_size
        )
    return task.train_batches(config.batch_size * process.world_size, seed=seed)


def carve_splits(task: Task | GenerationTask, config: TrainConfig) -> Task | GenerationTask:
    """``task`` with ``config.val_fraction`` of its training split carved out as validation, and
    then ``config.train_size`` of the rest kept (so the validation split is the same whatever the
    train size). A task that already has a validation split is used as it is."""
    has_val = bool(task.val_texts if isinstance(task, Task) else task.val_prompts)
    if config.val_fraction > 0 and not has_val:
        task = task.carve_validation(config.val_fraction)
    if config.train_size is not None:
        task = task.subsample_train(config.train_size, min_size=config.batch_size)
    return task


def wrap_data_parallel(model: PeftModel, process: Process, device: torch.device) -> torch.nn.Module:
    """``model`` itself for one process; otherwise a ``DistributedDataParallel`` view of it for the
    training forward passes (its construction broadcasts rank 0's parameters, so even a peer
    whose initialisation is not deterministic starts equal everywhere). Evaluation, methods and
    export keep using ``model``."""
    if not process.distributed:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
