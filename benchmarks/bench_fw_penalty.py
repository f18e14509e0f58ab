"""FW-LoRA's penalty alone: the forward and backward of ``λ Σ_m (1 − I_m) s_m² ‖B A − B₀ A₀‖²_F``
on MiniLM's 37 LoRA modules, with uniform ranks (plain LoRA) and with the heterogeneous ranks a
FIM-LoRA allocation leaves (``fim-lora+filet+fw-lora``), against another version of
``fw_lora.py`` in the same rotation.

The penalty's share of a training step is small; this isolates it. Heterogeneous ranks are a
seeded random draw from {2, 4, …, 16} per module, B drawn non-zero so that the value and the
gradients are not trivially zero. Median over ``--reps`` rounds of ``--calls`` timed calls each,
the two versions alternating round by round.

    git show REV:src/fisherlora/methods/fw_lora.py > /tmp/fw_lora_old.py
    python benchmarks/bench_fw_penalty.py --baseline /tmp/fw_lora_old.py \\
        --out benchmarks/results/fw_penalty.json
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from bench_fw_lora import baseline_class
from common import default_setup, write_results
from peft import LoraConfig, get_peft_model

from fisherlora.adapters import lora_layers
from fisherlora.methods.fw_lora import FisherPenalty

RANKS = (2, 4, 6, 8, 10, 12, 16)


def peft_model(base, config: LoraConfig, heterogeneous: bool, seed: int):
    names = list(lora_layers(get_peft_model(copy.deepcopy(base), config))[1])
    if heterogeneous:
        draw = random.Random(seed)
        pattern = {name.removeprefix("base_model.model."): draw.choice(RANKS) for name in names}
        config = copy.deepcopy(config)
        config.rank_pattern = pattern
    model = get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=generator))
    return model


def time_calls(penalty, model, calls: int) -> float:
    """Median seconds of one ``penalty().backward()``."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        penalty.penalty().backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", required=True, help="another version of fw_lora.py")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/fw_penalty.json")
    args = parser.parse_args()
    versions = {"this": FisherPenalty, "baseline": baseline_class(args.baseline)}
    base, config, _ = default_setup(1)
    results = []
    for heterogeneous in (False, True):
        model = peft_model(base, config, heterogeneous, args.seed)
        penalties = {v: cls(model, warmup_steps=0, lam=1e-3) for v, cls in versions.items()}
        for penalty in penalties.values():  # first calls allocate
            time_calls(penalty, model, 3)
        times: dict[str, list[float]] = {v: [] for v in versions}
        for rep in range(args.reps):
            order = list(versions) if rep % 2 == 0 else list(reversed(versions))
            for version in order:
                times[version].append(time_calls(penalties[version], model, args.calls))
        medians = {v: statistics.median(t) for v, t in times.items()}
        row = {
            "ranks": "heterogeneous" if heterogeneous else "uniform",
            "median_ms": {v: 1e3 * t for v, t in medians.items()},
            "this_over_baseline": medians["this"] / medians["baseline"],
        }
        print(row)
        results.append(row)
    setup = {"model": "minilm", "modules": 37, "reps": args.reps, "calls": args.calls}
    write_results(args.out, setup | {"rank_draw": list(RANKS), "seed": args.seed}, results)


if __name__ == "__main__":
    main()
