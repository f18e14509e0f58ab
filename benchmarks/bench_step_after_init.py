"""Does a method's init make the *training steps* after it slower? LoRA-, FILet- and
FIM-LoRA-initialised MiniLM models train on the same batches, one step each in turn (interleaved,
so machine drift hits all alike), with and without ``torch.set_flush_denormal``; median step time
and the ratio to LoRA's.

Why: the quick comparison's table showed median steps of 0.56 s (filet) and 0.49 s (fim-lora)
against LoRA's 0.43 s, measured run after run (not interleaved). Tiny adapter entries could make
CPU arithmetic slow (denormals), or the ranks could; this separates both from machine drift.

    python benchmarks/bench_step_after_init.py --out benchmarks/results/step_after_init.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from common import default_setup, write_results

from fisherlora.methods import get_method

METHODS = ("lora", "filet", "fim-lora")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/step_after_init.json")
    args = parser.parse_args()
    base, config, batches = default_setup(args.batches, rank=8)
    runs = {}
    for name in METHODS:
        method = get_method(name, {"calib_batches": 8, "progress": False})
        model = method.build(copy.deepcopy(base), config, batches[:8])
        method.prepare(model, batches[:8])
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = (model, torch.optim.AdamW(params, lr=5e-4))
    results = []
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.reps):
            for batch in batches:
                for name, (model, optimizer) in runs.items():
                    start = time.perf_counter()
                    model(**batch).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) for name, t in times.items()}
        row = {
            "flush_denormal": flush,
            "median_step_s": medians,
            "over_lora": {name: t / medians["lora"] for name, t in medians.items()},
        }
        print(row)
        results.append(row)
    smallest = {}
    for name, (model, _) in runs.items():
        values = torch.cat(
            [p.detach().abs().flatten() for p in model.parameters() if p.requires_grad]
        )
        smallest[name] = values[values > 0].min().item()
    setup = {"model": "minilm", "batches": args.batches, "reps": args.reps, "rank": 8}
    write_results(args.out, setup | {"smallest_trainable_abs": smallest}, results)


if __name__ == "__main__":
    main()
