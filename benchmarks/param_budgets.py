"""Trainable parameters of the rank-allocating methods against LoRA's at the same rank r.

On the embedded default (MiniLM, Rotten Tomatoes, LoRA on the default targets), each method is
built and prepared exactly as ``fisherlora train`` / ``fisherlora compare`` do with their
defaults (seed 0 model and LoRA init, the runner's calibration batches, ``budget="params"``), and
its parameters are counted as in ``metrics.json``: ``adapter_params`` (every trainable
``lora_*`` tensor), ``trainable_params`` (adapters + the classifier head) and
``effective_adapter_params``. For ``random-rank`` every seed of ``--random-seeds``.

AdaLoRA's count right after ``build`` is its ``init_r = ⌈1.5 r⌉`` parameters; what it keeps after
pruning (``effective_adapter_params``) exists only after training, so it is read from the
``metrics.json`` of finished ``fisherlora train --method adalora`` runs in
``--adalora-runs DIR/r{r}/`` when given (their ranks kept per module type are read from
``DIR/r{r}/adapter/adapter_config.json`` when the adapter records a rank pattern).

    for r in 8 2; do fisherlora train --method adalora --rank $r --alpha $((2*r)) --steps 300 \\
        --eval-every 0 --max-test 200 --seed 0 --out runs/adalora-params/r$r; done
    python benchmarks/param_budgets.py --ranks 8,2 --adalora-runs runs/adalora-params \\
        --out benchmarks/results/param_budgets.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import write_results
from fim_estimator_agreement import calibration_batches, runner_model

from fisherlora.experiments.tasks import load_task
from fisherlora.experiments.train import (
    TrainConfig,
    count_parameters,
    method_options,
)
from fisherlora.methods import get_method


def measure(config: TrainConfig, task) -> dict:
    """Build and prepare ``config.method`` as the runner does (no training); its counts."""
    method = get_method(config.method, method_options(config, progress=False))
    model, tokenizer = runner_model(config, task.num_labels, method)
    batches = calibration_batches(config, task, tokenizer)
    info = method.prepare(model, batches)
    counts = count_parameters(model)
    plan = info.get("rank_plan")
    if plan is not None:
        counts["ranks"] = sorted(plan["ranks"].values())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", default="8,2")
    parser.add_argument("--random-seeds", default="0,1,2,3,4")
    parser.add_argument("--adalora-runs", help="DIR with r{r}/metrics.json of adalora runs")
    parser.add_argument("--out", default="benchmarks/results/param_budgets.json")
    args = parser.parse_args()

    task = load_task("rotten-tomatoes")
    results = []
    for rank in [int(r) for r in args.ranks.split(",")]:
        runs = [("lora", 0), ("fim-lora", 0), ("adalora", 0)]
        runs += [("random-rank", int(s)) for s in args.random_seeds.split(",")]
        for method, seed in runs:
            config = TrainConfig(method=method, rank=rank, alpha=2.0 * rank, seed=seed)
            row = {"rank": rank, "method": method, "seed": seed, **measure(config, task)}
            if method == "adalora":
                row["when"] = "after build (init_r ranks, before pruning)"
            results.append(row)
            print({k: v for k, v in row.items() if k != "ranks"}, flush=True)
        if args.adalora_runs:
            metrics = json.loads(
                (Path(args.adalora_runs) / f"r{rank}" / "metrics.json").read_text()
            )
            row = {
                "rank": rank,
                "method": "adalora",
                "seed": metrics["seed"],
                "when": "after training (rank_pattern of the final allocation)",
                **{k: metrics[k] for k in ("trainable_params", "adapter_params", "total_params")},
                "effective_adapter_params": metrics["effective_adapter_params"],
                "accuracy": metrics.get("accuracy"),
            }
            results.append(row)
            print(row, flush=True)

    for row in results:
        lora = next(r for r in results if r["rank"] == row["rank"] and r["method"] == "lora")
        for key in ("adapter_params", "trainable_params", "effective_adapter_params"):
            row[f"{key}_over_lora"] = row[key] / lora[key]
        # what the adapters act with, plus the head, against LoRA's trainable parameters
        effective = (
            row["trainable_params"] - row["adapter_params"] + row["effective_adapter_params"]
        )
        row["effective_trainable_over_lora"] = effective / lora["trainable_params"]

    write_results(
        args.out,
        {
            "model": "minilm",
            "task": "rotten-tomatoes",
            "targets": "default",
            "defaults": "the runner's (budget=params, estimator=per_example)",
        },
        results,
    )


if __name__ == "__main__":
    main()
