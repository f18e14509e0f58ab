"""FW-LoRA step cost against plain LoRA training steps, on the embedded default.

``--steps`` MiniLM batches of 32, each run ``--reps`` times by every mode back to back (one
AdamW step each, modes in rotating order, so machine drift hits all alike):
plain LoRA (twice, as two identical models: the A/A ratio is the noise floor); FW-LoRA during
warm-up with the sketch (k = 8) and with the exact estimator (hooks on,
penalty in the loss, ``step()`` after each optimizer step); FW-LoRA after warm-up (hooks removed,
only the r×r-trace penalty). Reported: median step time of each, ratios to LoRA (of the medians,
and the median of the per-batch ratios), and peak memory
(VmHWM of a fresh process per mode, median of ``--memory-reps``; on ``--device cuda`` the GPU's
peak allocation, and every timed step is synchronised).

``--seq-len L`` makes every batch exactly L tokens long (the real batches cut to L, or padded to
L with masked pad tokens), ``--batch-size`` sets the sentences per batch: at short sequences the
model's work is small and FW-LoRA's fixed per-module cost shows. ``--modes`` picks the modes
timed in the rotation (``lora,warmup-sketch,after-warmup``: the rotated triples of issue 18);
``--memory-reps 0`` skips the memory children. ``--threads`` sets torch's threads and
``--clock cpu`` times each step by this process's CPU time instead of the wall clock: on a shared
machine other processes then disturb the ratios far less (with ``--threads 1`` it is the work
each step did; with several threads it also counts their spinning).

    python benchmarks/bench_fw_lora.py --reps 5 --out benchmarks/results/fw_lora.json
    python benchmarks/bench_fw_lora.py --seq-len 32 --batch-size 32 --steps 12 --reps 10 \
        --modes lora,warmup-sketch,after-warmup --memory-reps 0 --out /tmp/fw_lora-short.json
    python benchmarks/bench_fw_lora.py --device cuda --out benchmarks/results/fw_lora-cuda.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import (
    add_device_argument,
    check_device,
    child_peak_memory,
    default_setup,
    peak_memory_mb,
    run_setting,
    sync,
)
from peft import get_peft_model

from fisherlora.methods.fw_lora import FisherPenalty

# The clock of every timed step: wall time, or with --clock cpu this process's CPU time.
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]

# "lora-again" is a second, identical plain-LoRA model: its ratio to "lora" (an A/A test) is the
# resolution of this measurement on this machine, against which the targets are read.
MODES = ("lora", "lora-again", "warmup-sketch", "warmup-exact", "after-warmup")


def make_stepper(
    mode: str, base, config, first_batch, penalty_class: type = FisherPenalty
) -> Callable[[dict], float]:
    """A fresh model for ``mode`` and a function that runs one timed AdamW step on a batch."""
    model = get_peft_model(copy.deepcopy(base), config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    penalty = None
    if not mode.startswith("lora"):
        warmup = 1 if mode == "after-warmup" else 10**9
        penalty = penalty_class(
            model,
            warmup_steps=warmup,
            estimator=mode.split("-")[-1] if mode.startswith("warmup") else "sketch",
        )

    device = first_batch["input_ids"].device

    def step(batch: dict) -> float:
        sync(device)
        start = clock()
        loss = model(**batch).loss
        if penalty is not None:
            loss = loss + penalty.penalty()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if penalty is not None:
            penalty.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return clock() - start

    step(first_batch)  # first-call allocations; for after-warmup this step ends the warm-up
    return step


def baseline_class(path: str) -> type:
    """``FisherPenalty`` of another version of ``fw_lora.py`` (``git show REV:src/fisherlora/
    methods/fw_lora.py > old.py``), to time it in the same rotation as this one."""
    spec = importlib.util.spec_from_file_location("fw_lora_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.FisherPenalty


def run_mode(mode: str, base, config, batches) -> list[float]:
    step = make_stepper(mode, base, config, batches[0])
    return [step(batch) for batch in batches]


def fixed_length(batch: dict, seq_len: int, pad_id: int = 0) -> dict:
    """``batch`` with every token-shaped tensor cut or padded to exactly ``seq_len`` tokens
    (padding: ``pad_id`` in ``input_ids``, 0 in ``attention_mask`` and ``token_type_ids``)."""
    length = batch["input_ids"].shape[1]
    out = {}
    for key, value in batch.items():
        if value.dim() != 2 or value.shape[1] != length:  # labels [batch]
            out[key] = value
        elif length >= seq_len:
            out[key] = value[:, :seq_len].contiguous()
        else:
            fill = pad_id if key == "input_ids" else 0
            pad = value.new_full((value.shape[0], seq_len - length), fill)
            out[key] = torch.cat([value, pad], dim=1)
    return out


def setup(args: argparse.Namespace):
    base, config, batches = default_setup(
        args.steps, batch_size=args.batch_size, device=args.device
    )
    if args.seq_len:
        pad_id = base.config.pad_token_id or 0
        batches = [fixed_length(b, args.seq_len, pad_id) for b in batches]
    return base, config, batches


def memory_child(mode: str, args: argparse.Namespace) -> None:
    base, config, batches = setup(args)
    run_mode(mode, base, config, batches)
    print(json.dumps({"mode": mode, "peak_mb": peak_memory_mb(args.device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--memory-reps", type=int, default=3, help="0: no memory measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--seq-len", type=int, default=None, help="cut or pad every batch to exactly this length"
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated modes to time, 'lora' among them (of {', '.join(MODES)})",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCK),
        default="wall",
        help="cpu: this process's CPU time per step, which other processes on a busy machine "
        "disturb far less than the wall time (with --threads 1, the work the step did)",
    )
    parser.add_argument(
        "--baseline",
        metavar="FILE",
        help="another version of fw_lora.py: its FW modes are timed too, in the same rotation, "
        "as MODE@baseline (before/after on the same batches and the same machine state)",
    )
    parser.add_argument("--out", default="benchmarks/results/fw_lora.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    setting = run_setting(args)  # now: when the run started, and the load average then
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu measures CPU work; on --device cuda time the wall clock")
    global clock
    clock = CLOCK[args.clock]
    if args.child:
        memory_child(args.child, args)
        return
    modes = tuple(args.modes.split(","))
    if "lora" not in modes or not set(modes) <= set(MODES):
        parser.error(f"--modes must name 'lora' and only modes of {list(MODES)}")

    base, config, batches = setup(args)
    # Step-level interleaving: every batch is run by every mode back to back (in a rotating
    # order), so drift of the machine's speed hits all modes alike; ratios are per batch.
    steppers = {mode: make_stepper(mode, base, config, batches[0]) for mode in modes}
    if args.baseline:
        old = baseline_class(args.baseline)
        for mode in [m for m in modes if not m.startswith("lora")]:
            steppers[f"{mode}@baseline"] = make_stepper(mode, base, config, batches[0], old)
        modes = tuple(steppers)
    step_times: dict[str, list[float]] = {mode: [] for mode in modes}
    ratios: dict[str, list[float]] = {mode: [] for mode in modes if mode != "lora"}
    for rep in range(args.reps):
        for i, batch in enumerate(batches):
            turn = (rep * len(batches) + i) % len(modes)
            order = modes[turn:] + modes[:turn]
            times = {mode: steppers[mode](batch) for mode in order}
            for mode in modes:
                step_times[mode].append(times[mode])
                if mode != "lora":
                    ratios[mode].append(times[mode] / times["lora"])
        print(
            f"rep {rep}: "
            + ", ".join(f"{m} {statistics.median(v):.3f}s" for m, v in step_times.items()),
            flush=True,
        )
    median = {mode: statistics.median(v) for mode, v in step_times.items()}
    memory_modes = [m for m in modes if m != "lora-again" and "@" not in m]
    child_args = ["--steps", "8", "--device", args.device, "--batch-size", str(args.batch_size)]
    if args.seq_len:
        child_args += ["--seq-len", str(args.seq_len)]
    peak = (
        child_peak_memory(__file__, memory_modes, args.memory_reps, child_args)
        if args.memory_reps > 0
        else {}
    )
    result = {
        "setting": setting | {"tokens_per_batch": [int(b["input_ids"].numel()) for b in batches]},
        "step_times_s": step_times,
        "median_step_s": median,
        "step_time_over_lora": {m: median[m] / median["lora"] for m in modes if m != "lora"},
        # the ratio on the same batch, back to back, then its median: robust to drift
        "median_of_per_batch_ratios": {m: statistics.median(v) for m, v in ratios.items()},
        "peak_memory_mb": peak,
        "peak_memory_over_lora": {m: peak[m] / peak["lora"] for m in peak if m != "lora"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "median_step_s",
                    "step_time_over_lora",
                    "median_of_per_batch_ratios",
                    "peak_memory_over_lora",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
