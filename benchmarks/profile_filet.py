"""Where one FILet init spends its time on a synthetic Llama layer of a given width (cProfile).

The same model and batches as ``bench_scaling.py`` (random weights, batches of 4 × 128 tokens,
LoRA r = 8 on q/k/v/o/gate/up/down), one ``filet_init`` under cProfile, its time split into the
parts of the algorithm (module docstring of ``fisherlora.methods.filet``):

- candidates: ``many_layer_candidates`` (the gram or svd basis of every weight, O(m·n·min(m, n)));
- statistics: the hooks' projections and second moments (``ProjectedSquares`` / ``SecondMoment``
  ``add``), and the second moments' quadratic forms at the end (``result``);
- passes: ``run_passes`` (forward and backward of the model) less the statistics in its hooks;
- the rest: selection, factors, residual weights.

    python benchmarks/profile_filet.py --width 2048 --basis gram --threads 2

Shares, not benchmarks: a profiler's overhead is small here (a few hundred Python calls), but
take absolute seconds only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from bench_scaling import lora_config, synthetic_llama, token_batches

from fisherlora.methods.filet import filet_init

# part -> (file suffix, function names) whose cumulative time it is
PARTS = {
    "candidates": ("directions.py", ("many_layer_candidates",)),
    "statistics in the hooks": ("stats.py", ("add",)),
    "statistics at the end": ("stats.py", ("result",)),
    "run_passes": ("capture.py", ("run_passes",)),
}


def part_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Cumulative seconds of each part (summed over the functions it names)."""
    out = dict.fromkeys(PARTS, 0.0)
    for (file, _, name), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for part, (suffix, names) in PARTS.items():
            if file.endswith(suffix) and name in names:
                out[part] += cumulative
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--basis", choices=("gram", "svd"), default="gram")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches of 4 × 128")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    parser.add_argument("--top", type=int, default=0, help="also print the top N entries")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = get_peft_model(synthetic_llama(args.width, args.layers, 1000, 128, 0), lora_config(8))
    batches = token_batches(args.batches, 4, 128, 1000, 0, "cpu")
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    filet_init(
        model, batches, n_batches=args.batches, basis=args.basis, progress=False, cache=False
    )
    profile.disable()
    total = time.perf_counter() - start
    stats = pstats.Stats(profile)
    parts = part_seconds(stats)
    # The hooks' statistics run inside the passes; the passes are the rest of them.
    passes = parts["run_passes"] - parts["statistics in the hooks"]
    rest = total - parts["candidates"] - parts["run_passes"] - parts["statistics at the end"]
    print(
        f"width {args.width}, {args.layers} layer(s), basis {args.basis}, "
        f"{args.batches} batches of 4 x 128 tokens, {torch.get_num_threads()} thread(s)"
    )
    for name, seconds in [
        ("candidates", parts["candidates"]),
        ("statistics in the hooks", parts["statistics in the hooks"]),
        ("statistics at the end", parts["statistics at the end"]),
        ("passes (less statistics)", passes),
        ("rest", rest),
        ("total", total),
    ]:
        print(f"{name:>26}: {seconds:7.2f} s  {seconds / total:6.1%}")
    if args.top:
        stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
