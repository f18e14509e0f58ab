"""FIM-LoRA claim (seeds 001, 002): "value projections and early-to-middle layers get more rank".

Reads FIM-LoRA rank plans that were already computed (no calibration here) and summarises where
the rank goes: the mean rank per module type, and per depth third of the stack (early, middle,
late; the pooler or other modules outside the numbered layers apart), each against the uniform
rank r that the plan's budget matches.

A plan is either a run's ``ranks.json`` (``fisherlora train --method fim-lora`` writes it) or a
``claims_fim_saturation.py`` result file (its T = 64 reference plan and its r_min = 1 plan, per
rank). Give each as ``LABEL=PATH``:

    python benchmarks/claims_fim_layers.py \\
        --plan minilm-rt=benchmarks/results/claims/fim_saturation.json \\
        --plan smollm2-rt-gen-r8=runs/smol-fim-r8/ranks.json \\
        --out benchmarks/results/claims/fim_layers.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from common import write_results

LAYER = re.compile(r"layers?\.(\d+)\.(.+)$")
# Wrapper names that say nothing about a module's role (BERT's and Llama's)
NOISE = re.compile(r"^(attention\.self\.|self_attn\.|mlp\.)|\.dense$")


def module_type(rest: str) -> str:
    """``attention.self.value`` → ``value``; ``mlp.down_proj`` → ``down_proj``."""
    return NOISE.sub("", NOISE.sub("", rest)) or rest


def summarise(ranks: dict[str, int], rank: int) -> dict:
    """Mean rank per module type and per depth third, and each as a multiple of ``rank``."""
    by_type: dict[str, list[int]] = defaultdict(list)
    by_layer: dict[int, list[int]] = defaultdict(list)
    outside: list[int] = []
    for name, r in ranks.items():
        match = LAYER.search(name)
        if match is None:
            outside.append(r)
            continue
        by_layer[int(match.group(1))].append(r)
        by_type[module_type(match.group(2))].append(r)
    depth = len(by_layer)
    thirds: dict[str, list[int]] = defaultdict(list)
    for index, values in by_layer.items():
        thirds[("early", "middle", "late")[min(2, 3 * index // depth)]] += values

    def mean(values: list[int]) -> float:
        return sum(values) / len(values)

    return {
        "rank": rank,
        "modules": len(ranks),
        "layers": depth,
        "mean_rank_by_type": {t: mean(v) for t, v in by_type.items()},
        "mean_rank_by_third": {t: mean(thirds[t]) for t in ("early", "middle", "late")},
        "mean_rank_by_layer": {i: mean(by_layer[i]) for i in sorted(by_layer)},
        "mean_rank_outside_layers": mean(outside) if outside else None,
    }


def plans_in(label: str, path: Path) -> list[tuple[str, dict[str, int], int]]:
    data = json.loads(path.read_text())
    if "ranks" in data:  # a run's ranks.json: r = the budget's uniform rank
        old = data["old_ranks"]
        return [(label, data["ranks"], round(sum(old.values()) / len(old)))]
    plans = []
    for result in data["results"]:  # a claims_fim_saturation.py result
        r = result["rank"]
        plans.append(
            (f"{label} r={r} T={result['reference_batches']}", result["reference"]["ranks"], r)
        )
        plans.append((f"{label} r={r} T=8 r_min=1", result["floors"]["r_min=1"]["ranks"], r))
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plan", action="append", required=True, help="LABEL=PATH")
    parser.add_argument("--out", default="benchmarks/results/claims/fim_layers.json")
    args = parser.parse_args()
    results = []
    for item in args.plan:
        label, _, path = item.partition("=")
        for name, ranks, rank in plans_in(label, Path(path)):
            summary = {"plan": name, "source": path} | summarise(ranks, rank)
            results.append(summary)
            types = ", ".join(f"{t} {v:.1f}" for t, v in summary["mean_rank_by_type"].items())
            thirds = ", ".join(f"{t} {v:.1f}" for t, v in summary["mean_rank_by_third"].items())
            print(f"{name} (r = {rank}): {types} | {thirds}", flush=True)
    write_results(args.out, {"note": "rank plans summarised; no calibration run here"}, results)


if __name__ == "__main__":
    main()
