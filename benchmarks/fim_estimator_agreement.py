"""FIM-LoRA rank plans from the per-example estimator (the paper's Eq. 1) against the batch one.

On the embedded default (MiniLM, Rotten Tomatoes, LoRA on the default targets), with exactly
the model, head, LoRA init and calibration batches that ``fisherlora train --method fim-lora``
uses at ``--seed SEED`` (the runner's calibration loader: its own order, seed + 1, batches of
``--batch-size``, length-grouped), for each rank r:

- both estimators' module scores, rank plans and calibration times;
- the share of modules given the same rank, the L1 distance of the rank vectors, and the
  Spearman correlation of the scores (over the modules).

    python benchmarks/fim_estimator_agreement.py --ranks 8,2 --time-reps 2 \
        --out benchmarks/results/fim_estimator_agreement.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from common import write_results
from peft import LoraConfig
from scipy.stats import spearmanr

from fisherlora.experiments.batching import TokenizedTexts, train_loader
from fisherlora.experiments.models import default_targets, load_model
from fisherlora.experiments.tasks import load_task
from fisherlora.experiments.train import TrainConfig, set_seed
from fisherlora.methods import AdapterMethod, Method, get_method
from fisherlora.methods.fim_lora import fisher_of_b

ESTIMATORS = ("per_example", "batch")


def runner_model(config: TrainConfig, num_labels: int, method: Method | None = None):
    """The PEFT model ``train(config)`` builds (``method.build``, plain LoRA by default), before
    the method's ``prepare``: same seed, head and adapter init (nothing between loading and
    ``build`` draws from torch's RNG)."""
    set_seed(config.seed)
    base, tokenizer = load_model(config.model, num_labels, seed=config.seed)
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=default_targets(base),
        use_rslora=config.rslora,
    )
    return (method or AdapterMethod()).build(base, lora), tokenizer


def calibration_batches(config: TrainConfig, task, tokenizer) -> list[dict[str, torch.Tensor]]:
    """The first ``calib_batches`` batches of the runner's calibration loader (one process)."""
    data = TokenizedTexts(task.train_texts, task.train_labels, tokenizer, config.max_length)
    loader = train_loader(
        data,
        tokenizer.pad_token_id,
        config.batch_size,
        seed=config.seed + 1,
        group_by_length=config.group_by_length,
    )
    return [b for _, b in zip(range(config.calib_batches), loader, strict=False)]


def agreement(a: dict, b: dict) -> dict:
    names = list(a["ranks"])
    ra = [a["ranks"][m] for m in names]
    rb = [b["ranks"][m] for m in names]
    rho = spearmanr([a["scores"][m] for m in names], [b["scores"][m] for m in names])
    return {
        "modules": len(names),
        "same_rank_share": sum(x == y for x, y in zip(ra, rb, strict=True)) / len(names),
        "rank_l1": sum(abs(x - y) for x, y in zip(ra, rb, strict=True)),
        "max_rank_diff": max(abs(x - y) for x, y in zip(ra, rb, strict=True)),
        "score_spearman": float(rho.statistic),
        "score_spearman_p": float(rho.pvalue),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", default="8,2", help="comma-separated LoRA ranks r")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", default="params", choices=["params", "ranks"])
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--time-reps",
        type=int,
        default=0,
        help="also time each estimator's calibration this many more times, interleaved (medians)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="benchmarks/results/fim_estimator_agreement.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    task = load_task("rotten-tomatoes")
    results = []
    for rank in [int(r) for r in args.ranks.split(",")]:
        config = TrainConfig(
            rank=rank,
            alpha=2.0 * rank,  # as `fisherlora compare` (alpha = 2 r)
            seed=args.seed,
            budget=args.budget,
            calib_batches=args.calib_batches,
            batch_size=args.batch_size,
        )
        plans = {}
        for estimator in ESTIMATORS:
            model, tokenizer = runner_model(config, task.num_labels)
            batches = calibration_batches(config, task, tokenizer)
            method = get_method(
                "fim-lora",
                {
                    "calib_batches": config.calib_batches,
                    "budget": config.budget,
                    "estimator": estimator,
                    "progress": False,
                },
            )
            started = time.perf_counter()
            method.prepare(model, batches)
            plan = method.plan
            plans[estimator] = {
                "scores": plan.scores,
                "ranks": plan.ranks,
                "budget": plan.budget,
                "spent": plan.spent(),
                "calibration_s": plan.calibration_s,
                "prepare_s": time.perf_counter() - started,
                "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
            }
            print(
                f"r={rank} {estimator}: calibration {plan.calibration_s:.1f}s, "
                f"ranks {sorted(plan.ranks.values())}",
                flush=True,
            )
        times = {e: [plans[e]["calibration_s"]] for e in ESTIMATORS}
        for _ in range(args.time_reps):
            for estimator in ESTIMATORS:
                model, tokenizer = runner_model(config, task.num_labels)
                started = time.perf_counter()
                fisher_of_b(
                    model, batches, n_batches=len(batches), estimator=estimator, progress=False
                )
                times[estimator].append(time.perf_counter() - started)
        for estimator in ESTIMATORS:
            plans[estimator]["calibration_times_s"] = times[estimator]
            plans[estimator]["calibration_median_s"] = statistics.median(times[estimator])
        summary = agreement(plans["per_example"], plans["batch"])
        summary["calibration_median_s"] = {e: plans[e]["calibration_median_s"] for e in ESTIMATORS}
        print(f"r={rank}: {summary}", flush=True)
        results.append({"rank": rank, "agreement": summary, "plans": plans})

    write_results(
        args.out,
        {
            "model": "minilm",
            "task": "rotten-tomatoes",
            "targets": "default",
            "seed": args.seed,
            "budget": args.budget,
            "calib_batches": args.calib_batches,
            "batch_size": args.batch_size,
            "calibration_loader": "the runner's (seed + 1, length-grouped)",
            "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "note": "timings taken on a 2-core CPU shared with other work (under load)",
        },
        results,
    )


if __name__ == "__main__":
    main()
