"""FW-LoRA step cost against plain LoRA training steps, on the embedded default.

Per repetition (interleaved), ``--steps`` AdamW steps on the same MiniLM batches of 32 for:
plain LoRA; FW-LoRA during warm-up with the sketch (k = 8) and with the exact estimator (hooks on,
penalty in the loss, ``step()`` after each optimizer step); FW-LoRA after warm-up (hooks removed,
only the r×r-trace penalty). Reported: median step time of each, ratios to LoRA, and peak memory
(VmHWM of a fresh process per mode, median of ``--memory-reps``).

    python benchmarks/bench_fw_lora.py --reps 5 --out benchmarks/results/fw_lora.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from common import child_peak_memory, default_setup, peak_rss_mb, training_steps
from peft import get_peft_model

from fisherlora.methods.fw_lora import FisherPenalty

MODES = ("lora", "warmup-sketch", "warmup-exact", "after-warmup")


def run_mode(mode: str, base, config, batches) -> list[float]:
    model = get_peft_model(copy.deepcopy(base), config)
    if mode == "lora":
        return training_steps(model, batches)
    if mode == "after-warmup":
        penalty = FisherPenalty(model, warmup_steps=1)
        training_steps(model, batches[:1], penalty.penalty, penalty.step)  # warm-up ends here
        return training_steps(model, batches, penalty.penalty, penalty.step)
    estimator = mode.split("-")[1]
    penalty = FisherPenalty(model, warmup_steps=10**9, estimator=estimator)
    return training_steps(model, batches, penalty.penalty, penalty.step)


def memory_child(mode: str, n_batches: int) -> None:
    base, config, batches = default_setup(n_batches)
    run_mode(mode, base, config, batches)
    print(json.dumps({"mode": mode, "peak_mb": peak_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--memory-reps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/fw_lora.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        memory_child(args.child, args.steps)
        return

    base, config, batches = default_setup(args.steps)
    run_mode("lora", base, config, batches[:2])  # warm-up: first-call allocations
    per_rep: dict[str, list[float]] = {mode: [] for mode in MODES}
    for rep in range(args.reps):
        for mode in MODES:
            per_rep[mode].append(statistics.median(run_mode(mode, base, config, batches)))
        print(
            f"rep {rep}: " + ", ".join(f"{m} {v[-1]:.3f}s" for m, v in per_rep.items()), flush=True
        )
    median = {mode: statistics.median(v) for mode, v in per_rep.items()}
    peak = child_peak_memory(__file__, list(MODES), args.memory_reps, ["--steps", "8"])
    result = {
        "setting": vars(args)
        | {
            "model": "minilm",
            "task": "rotten-tomatoes",
            "batch_size": 32,
            "device": "cpu",
            "threads": torch.get_num_threads(),
        },
        "median_step_s_per_rep": per_rep,
        "median_step_s": median,
        "step_time_over_lora": {m: median[m] / median["lora"] for m in MODES if m != "lora"},
        # the ratio within each repetition, then its median: robust to drift between repetitions
        "median_of_per_rep_ratios": {
            m: statistics.median(a / b for a, b in zip(per_rep[m], per_rep["lora"], strict=True))
            for m in MODES
            if m != "lora"
        },
        "peak_memory_mb": peak,
        "peak_memory_over_lora": {m: peak[m] / peak["lora"] for m in MODES if m != "lora"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("median_step_s", "step_time_over_lora", "peak_memory_over_lora")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
