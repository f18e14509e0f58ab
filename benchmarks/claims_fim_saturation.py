"""FIM-LoRA claims that need calibration only (no training): does the Fisher signal saturate
quickly in the number of calibration batches T, and what does the minimum-rank floor do?

On the embedded default (MiniLM, Rotten Tomatoes with 10 % of the training split held out as
validation, as `fisherlora compare` carves it; LoRA on the default targets, α = 2r), with the
model, head, LoRA init and calibration loader that ``fisherlora train --method fim-lora`` uses at
``--seed SEED``:

- **Saturation** (seed 001: "the signal saturates quickly", T ∈ {1, 2, 4, 8, 16}): the rank plan
  from the first T calibration batches against the plan from the first ``--reference`` batches
  (64): Spearman correlation of the module scores, L1 distance of the rank vectors, the share of
  modules given the same rank. The runner uses T = 8.
- **The floor** (seed 002: "the minimum-rank floor is the dominant factor"; a bimodal rank
  distribution at r_min = 1): the rank histogram at T = 8 with r_min = 1 against the default
  r_min = max(1, r // 2).

    python benchmarks/claims_fim_saturation.py --ranks 8,2 \
        --out benchmarks/results/claims/fim_saturation.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import platform
import time

import torch
from common import write_results
from fim_estimator_agreement import agreement, calibration_batches, runner_model

from fisherlora.experiments.tasks import load_task
from fisherlora.experiments.train import TrainConfig, carve_splits
from fisherlora.methods import get_method

VAL_FRACTION = 0.1  # as `fisherlora compare` carves it: calibration reads the rest only


def plan_for(config: TrainConfig, task, batches: list[dict], **options) -> dict:
    """FIM-LoRA's rank plan from ``batches`` on a fresh runner model (seed ``config.seed``)."""
    model, _ = runner_model(config, task.num_labels)
    method = get_method(
        "fim-lora",
        {"calib_batches": len(batches), "budget": config.budget, "progress": False} | options,
    )
    started = time.perf_counter()
    method.prepare(model, batches)
    plan = method.plan
    return {
        "scores": plan.scores,
        "ranks": plan.ranks,
        "spent": plan.spent(),
        "budget": plan.budget,
        "prepare_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", default="8,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--counts", default="1,2,4,8,16,32", help="calibration batches T")
    parser.add_argument("--reference", type=int, default=64, help="batches of the reference plan")
    parser.add_argument("--out", default="benchmarks/results/claims/fim_saturation.json")
    args = parser.parse_args()

    task = carve_splits(load_task("rotten-tomatoes"), TrainConfig(val_fraction=VAL_FRACTION))
    counts = [int(c) for c in args.counts.split(",")]
    results = []
    for rank in [int(r) for r in args.ranks.split(",")]:
        config = TrainConfig(rank=rank, alpha=2.0 * rank, seed=args.seed)
        _, tokenizer = runner_model(config, task.num_labels)
        # the runner's calibration loader (one epoch holds 182 batches: no batch repeats)
        longest = dataclasses.replace(config, calib_batches=max(args.reference, *counts))
        batches = calibration_batches(longest, task, tokenizer)
        reference = plan_for(config, task, batches[: args.reference])
        saturation = []
        for count in counts:
            plan = plan_for(config, task, batches[:count])
            row = {"batches": count, **agreement(plan, reference), "prepare_s": plan["prepare_s"]}
            saturation.append(row)
            print(f"r={rank} T={count}: {row}", flush=True)
        floors = {}
        for label, r_min in (("default", None), ("r_min=1", 1)):
            plan = plan_for(config, task, batches[:8], r_min=r_min)
            floors[label] = {
                "r_min": r_min if r_min is not None else max(1, rank // 2),
                "histogram": dict(sorted(collections.Counter(plan["ranks"].values()).items())),
                "ranks": plan["ranks"],
            }
            print(f"r={rank} {label}: {floors[label]['histogram']}", flush=True)
        results.append(
            {"rank": rank, "reference_batches": args.reference, "reference": reference}
            | {"saturation": saturation, "floors": floors}
        )
    write_results(
        args.out,
        {
            "model": "minilm",
            "task": f"rotten-tomatoes, {VAL_FRACTION:g} of train held out as validation",
            "estimator": "per_example (the default)",
            "budget": "params (the runner's default)",
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "note": "calibration only, no training; prepare_s: one timing each, not a benchmark",
        },
        results,
    )


if __name__ == "__main__":
    main()
