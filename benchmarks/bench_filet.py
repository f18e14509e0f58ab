"""FILet init cost against PEFT's PiSSA (full SVD), EVA, LoRA-GA and CorDA inits, on the default.

Each init starts from a fresh copy of MiniLM and includes ``get_peft_model``; the data-driven ones
get the same ``n_batches`` Rotten Tomatoes training batches of 32. The peers run exactly as
``fisherlora compare`` runs them (``fisherlora.methods.peers``: build, then prepare). Times are
medians of ``--reps`` interleaved repetitions, also as "training-step equivalents" (the median
time of one plain LoRA training step in the same run). Peak memory: VmHWM of a fresh process per
init, median of ``--memory-reps``, against one running 8 LoRA training steps (on ``--device
cuda``: the GPU's peak allocation, and every timed init is synchronised).

    python benchmarks/bench_filet.py --reps 5 --out benchmarks/results/filet_init.json
    python benchmarks/bench_filet.py --device cuda --out benchmarks/results/filet_init-cuda.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from common import (
    add_device_argument,
    check_device,
    child_peak_memory,
    default_setup,
    peak_memory_mb,
    sync,
    training_steps,
)
from peft import get_peft_model

from fisherlora.methods import get_method
from fisherlora.methods.filet import filet_init


def _peer(name: str):
    def init(base, config, batches):
        method = get_method(name, {"calib_batches": len(batches)})
        model = method.build(base, config, batches)
        method.prepare(model, batches)
        return model

    return init


INITS = {
    "filet-svd": lambda base, config, batches: _filet(base, config, batches, "svd"),
    "filet-gram": lambda base, config, batches: _filet(base, config, batches, "gram"),
    "pissa": _peer("pissa"),
    "eva": _peer("eva"),
    "lora-ga": _peer("lora-ga"),
    "corda": _peer("corda"),
}


def _filet(base, config, batches, basis):
    model = get_peft_model(base, config)
    filet_init(model, batches, n_batches=len(batches), basis=basis, progress=False)
    return model


def memory_child(mode: str, n_batches: int, device: str) -> None:
    base, config, batches = default_setup(n_batches, device=device)
    if mode == "lora":
        training_steps(get_peft_model(base, config), batches)
    else:
        INITS[mode](base, config, batches)
    print(json.dumps({"mode": mode, "peak_mb": peak_memory_mb(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--n-batches", type=int, default=8)
    parser.add_argument("--memory-reps", type=int, default=3)
    parser.add_argument("--inits", default=",".join(INITS))
    parser.add_argument("--out", default="benchmarks/results/filet_init.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    check_device(args.device)
    if args.child:
        memory_child(args.child, args.n_batches, args.device)
        return

    base, config, batches = default_setup(args.n_batches, device=args.device)
    inits = args.inits.split(",")
    times: dict[str, list[float]] = {name: [] for name in ["lora_step", *inits]}
    training_steps(get_peft_model(copy.deepcopy(base), config), batches[:2])  # warm-up
    for rep in range(args.reps):
        times["lora_step"].append(
            statistics.median(training_steps(get_peft_model(copy.deepcopy(base), config), batches))
        )
        for name in inits:
            fresh = copy.deepcopy(base)
            torch.manual_seed(rep)
            sync(args.device)
            start = time.perf_counter()
            INITS[name](fresh, config, batches)
            sync(args.device)
            times[name].append(time.perf_counter() - start)
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    peak = child_peak_memory(
        __file__,
        ["lora", *inits],
        args.memory_reps,
        ["--n-batches", str(args.n_batches), "--device", args.device],
    )
    median = {k: statistics.median(v) for k, v in times.items()}
    step = median["lora_step"]
    result = {
        "setting": vars(args)
        | {
            "model": "minilm",
            "task": "rotten-tomatoes",
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "threads": torch.get_num_threads(),
        },
        "times_s": times,
        "median_s": median,
        "training_step_equivalents": {k: v / step for k, v in median.items() if k != "lora_step"},
        "peak_memory_mb": peak,
        "peak_memory_over_lora_steps": {
            k: v / peak["lora"] for k, v in peak.items() if k != "lora"
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("median_s", "training_step_equivalents", "peak_memory_over_lora_steps")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
