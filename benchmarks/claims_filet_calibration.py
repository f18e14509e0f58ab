"""FILet's calibration-size claim without training (seed 004, §4.5: a small calibration
minibatch suffices): how FILet's initial directions and its init time depend on the number of
calibration examples, from one batch of 32 to the whole training set.

The setting is the `cpu` suite's cell ``rt-low-data``: MiniLM, Rotten Tomatoes, 10 % of the
training split held out as validation, 512 training sentences, r = 8, α = 2r, batch 32, so 16
batches are the whole training set. The model, head, LoRA init and calibration loader are those
``fisherlora train --method filet`` uses at ``--seed SEED``. For each T calibration batches:

- the directions FILet picks: per module, the overlap of A's row space with that of the
  whole-set init (T = 16), ``‖Q_Tᵀ Q_16‖_F² / r`` with ``Q`` an orthonormal basis of Aᵀ's
  columns (1: the same subspace, r / d_in: unrelated), averaged over modules;
- the seconds of FILet's ``prepare`` (the median of ``--repeats``, in this one process, so the
  sizes compare with each other).

The validation score at T = 1, 8 and 16 comes from the training runs (``claims_runs.py``:
calib-1-filet, the cell's own runs, calib-16-filet).

    python benchmarks/claims_filet_calibration.py --out benchmarks/results/claims/filet_calibration.json
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import torch
from common import write_results
from fim_estimator_agreement import calibration_batches, runner_model

from fisherlora.adapters import lora_layers
from fisherlora.experiments.tasks import load_task
from fisherlora.experiments.train import TrainConfig, carve_splits
from fisherlora.methods import get_method

CELL = dict(val_fraction=0.1, train_size=512, rank=8, alpha=16.0, batch_size=32, max_length=64)


def filet_init(config: TrainConfig, task, batches: list[dict]) -> tuple[dict, float]:
    """FILet's initial A per module from ``batches`` on a fresh runner model, and the seconds
    its ``prepare`` took."""
    model, _ = runner_model(config, task.num_labels)
    method = get_method("filet", {"calib_batches": len(batches), "progress": False})
    started = time.perf_counter()
    method.prepare(model, batches)
    seconds = time.perf_counter() - started
    adapter, layers = lora_layers(model)
    return {
        n: layer.lora_A[adapter].weight.detach().clone() for n, layer in layers.items()
    }, seconds


def row_space_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖Q_aᵀ Q_b‖_F² / r`` for orthonormal bases of the row spaces of two r × d matrices."""
    qa = torch.linalg.qr(a.double().T).Q
    qb = torch.linalg.qr(b.double().T).Q
    return float((qa.T @ qb).pow(2).sum() / a.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--counts", default="1,2,4,8,16", help="calibration batches T")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/claims/filet_calibration.json")
    args = parser.parse_args()

    config = TrainConfig(seed=args.seed, **CELL)
    task = carve_splits(load_task("rotten-tomatoes"), config)
    counts = [int(c) for c in args.counts.split(",")]
    _, tokenizer = runner_model(config, task.num_labels)
    longest = dataclasses.replace(config, calib_batches=max(counts))
    batches = calibration_batches(longest, task, tokenizer)
    if len(batches) < max(counts):
        raise SystemExit(f"the training set gives {len(batches)} batches, fewer than {max(counts)}")
    inits = {}
    rows = []
    for count in counts:
        times = []
        for _ in range(args.repeats):
            inits[count], seconds = filet_init(config, task, batches[:count])
            times.append(seconds)
        rows.append(
            {
                "batches": count,
                "examples": sum(int(b["input_ids"].shape[0]) for b in batches[:count]),
                "prepare_s": statistics.median(times),
                "prepare_s_all": times,
            }
        )
        print(f"T={count}: {statistics.median(times):.1f} s", flush=True)
    whole = inits[max(counts)]
    for row in rows:
        init = inits[row["batches"]]
        overlaps = [row_space_overlap(init[n], whole[n]) for n in whole]
        row["overlap_with_whole_set_mean"] = statistics.mean(overlaps)
        row["overlap_with_whole_set_min"] = min(overlaps)
        print(f"T={row['batches']}: overlap {row['overlap_with_whole_set_mean']:.3f}", flush=True)
    write_results(
        args.out,
        {
            "model": "minilm",
            "task": "rotten-tomatoes: 10 % of train held out, 512 training sentences (rt-low-data)",
            "rank": CELL["rank"],
            "seed": args.seed,
            "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "note": "calibration only, no training; timings taken while the long runs shared "
            "the CPU, comparable with each other only",
        },
        rows,
    )


if __name__ == "__main__":
    main()
