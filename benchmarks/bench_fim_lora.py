"""FIM-LoRA cost against plain LoRA training steps, on the embedded default (MiniLM, Rotten Tomatoes).

Measured, each as the median of ``--reps`` repetitions, on the same ``n_batches`` training batches:

- time of ``n_batches`` plain LoRA training steps (forward, backward, clip, AdamW step);
- FIM-LoRA calibration time (``estimator="batch"`` and ``"per_example"``) and its ratio to that;
- allocation + resize time as a share of the calibration time;
- peak resident memory of a process that loads the model and then runs the LoRA steps, against
  one that loads the model and runs the calibration (separate processes, since a process's peak
  memory only ever grows); on ``--device cuda`` the GPU's peak allocation, and the LoRA steps
  are synchronised (the calibration time is the library's own, which ends reading its results).

    python benchmarks/bench_fim_lora.py --reps 5 --out benchmarks/results/fim_lora.json
    python benchmarks/bench_fim_lora.py --device cuda --out benchmarks/results/fim_lora-cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import (
    add_device_argument,
    check_device,
    child_peak_memory,
    default_setup,
    peak_memory_mb,
    reset_peak_memory,
    run_setting,
    sync,
    training_steps,
)
from peft import get_peft_model

from fisherlora.methods.fim_lora import allocate_ranks


def memory_child(mode: str, n_batches: int, batch_size: int, rank: int, device: str) -> None:
    base, config, batches = default_setup(n_batches, batch_size, rank, device=device)
    model = get_peft_model(base, config)
    loaded = peak_memory_mb(device)
    reset_peak_memory(device)  # CUDA: the model stays in the peak, loading transients do not
    if mode == "lora":
        training_steps(model, batches)
    else:
        allocate_ranks(model, batches, n_batches=n_batches, estimator=mode, progress=False)
    print(json.dumps({"mode": mode, "after_load_mb": loaded, "peak_mb": peak_memory_mb(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--n-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--memory-reps", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/fim_lora.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    setting = run_setting(args)  # now: when the run started, and the load average then
    check_device(args.device)
    if args.child:
        memory_child(args.child, args.n_batches, args.batch_size, args.rank, args.device)
        return

    base, config, batches = default_setup(
        args.n_batches, args.batch_size, args.rank, device=args.device
    )
    lora_model = get_peft_model(base, config)
    training_steps(lora_model, batches[:2])  # warm-up: first-call allocations and kernels
    base = lora_model.unload()
    times: dict[str, list[float]] = {
        "lora_steps": [],
        "batch": [],
        "per_example": [],
        "allocation": [],
    }
    for rep in range(args.reps):
        for mode in ("lora_steps", "batch", "per_example"):  # interleaved: drift hits all alike
            torch.manual_seed(rep)
            model = get_peft_model(base, config)
            if mode == "lora_steps":
                times[mode].append(sum(training_steps(model, batches)))
            else:
                sync(args.device)
                plan = allocate_ranks(
                    model, batches, n_batches=args.n_batches, estimator=mode, progress=False
                )
                times[mode].append(plan.calibration_s)
                if mode == "batch":
                    times["allocation"].append(plan.allocation_s)
            base = model.unload()
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)

    peak = child_peak_memory(
        __file__,
        ["lora", "batch", "per_example"],
        args.memory_reps,
        [
            "--n-batches",
            str(args.n_batches),
            "--batch-size",
            str(args.batch_size),
            "--rank",
            str(args.rank),
            "--device",
            args.device,
        ],
    )
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "setting": setting,
        "times_s": times,
        "median_s": median,
        "ratios": {
            "calibration_batch_over_lora_steps": median["batch"] / median["lora_steps"],
            "calibration_per_example_over_lora_steps": median["per_example"] / median["lora_steps"],
            "per_example_over_batch": median["per_example"] / median["batch"],
            "allocation_over_calibration": median["allocation"] / median["batch"],
            "peak_memory_batch_over_lora": peak["batch"] / peak["lora"],
            "peak_memory_per_example_over_lora": peak["per_example"] / peak["lora"],
        },
        "peak_memory_mb": peak,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {"median_s": median, "ratios": result["ratios"], "peak_memory_mb": peak}, indent=2
        )
    )


if __name__ == "__main__":
    main()
