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

    python benchmarks/bench_fw_lora.py --reps 5 --out benchmarks/results/fw_lora.json
    python benchmarks/bench_fw_lora.py --device cuda --out benchmarks/results/fw_lora-cuda.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
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
    sync,
)
from peft import get_peft_model

from fisherlora.methods.fw_lora import FisherPenalty

# "lora-again" is a second, identical plain-LoRA model: its ratio to "lora" (an A/A test) is the
# resolution of this measurement on this machine, against which the targets are read.
MODES = ("lora", "lora-again", "warmup-sketch", "warmup-exact", "after-warmup")


def make_stepper(mode: str, base, config, first_batch) -> Callable[[dict], float]:
    """A fresh model for ``mode`` and a function that runs one timed AdamW step on a batch."""
    model = get_peft_model(copy.deepcopy(base), config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    penalty = None
    if not mode.startswith("lora"):
        warmup = 1 if mode == "after-warmup" else 10**9
        penalty = FisherPenalty(
            model,
            warmup_steps=warmup,
            estimator=mode.split("-")[-1] if mode.startswith("warmup") else "sketch",
        )

    device = first_batch["input_ids"].device

    def step(batch: dict) -> float:
        sync(device)
        start = time.perf_counter()
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
        return time.perf_counter() - start

    step(first_batch)  # first-call allocations; for after-warmup this step ends the warm-up
    return step


def run_mode(mode: str, base, config, batches) -> list[float]:
    step = make_stepper(mode, base, config, batches[0])
    return [step(batch) for batch in batches]


def memory_child(mode: str, n_batches: int, device: str) -> None:
    base, config, batches = default_setup(n_batches, device=device)
    run_mode(mode, base, config, batches)
    print(json.dumps({"mode": mode, "peak_mb": peak_memory_mb(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--memory-reps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/fw_lora.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    check_device(args.device)
    if args.child:
        memory_child(args.child, args.steps, args.device)
        return

    base, config, batches = default_setup(args.steps, device=args.device)
    # Step-level interleaving: every batch is run by every mode back to back (in a rotating
    # order), so drift of the machine's speed hits all modes alike; ratios are per batch.
    steppers = {mode: make_stepper(mode, base, config, batches[0]) for mode in MODES}
    step_times: dict[str, list[float]] = {mode: [] for mode in MODES}
    ratios: dict[str, list[float]] = {mode: [] for mode in MODES if mode != "lora"}
    for rep in range(args.reps):
        for i, batch in enumerate(batches):
            order = MODES[i % len(MODES) :] + MODES[: i % len(MODES)]
            times = {mode: steppers[mode](batch) for mode in order}
            for mode in MODES:
                step_times[mode].append(times[mode])
                if mode != "lora":
                    ratios[mode].append(times[mode] / times["lora"])
        print(
            f"rep {rep}: "
            + ", ".join(f"{m} {statistics.median(v):.3f}s" for m, v in step_times.items()),
            flush=True,
        )
    median = {mode: statistics.median(v) for mode, v in step_times.items()}
    memory_modes = [m for m in MODES if m != "lora-again"]
    peak = child_peak_memory(
        __file__, memory_modes, args.memory_reps, ["--steps", "8", "--device", args.device]
    )
    result = {
        "setting": vars(args)
        | {
            "model": "minilm",
            "task": "rotten-tomatoes",
            "batch_size": 32,
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "threads": torch.get_num_threads(),
        },
        "step_times_s": step_times,
        "median_step_s": median,
        "step_time_over_lora": {m: median[m] / median["lora"] for m in MODES if m != "lora"},
        # the ratio on the same batch, back to back, then its median: robust to drift
        "median_of_per_batch_ratios": {m: statistics.median(v) for m, v in ratios.items()},
        "peak_memory_mb": peak,
        "peak_memory_over_lora": {m: peak[m] / peak["lora"] for m in memory_modes if m != "lora"},
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
