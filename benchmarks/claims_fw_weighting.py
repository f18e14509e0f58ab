"""FW-LoRA claim check, first half: how far from uniform is the Fisher weighting at all?

The penalty is ``λ Σ_m (1 − I_m) ‖ΔW_m‖²``. If every ``1 − I_m`` is close to 1 the penalty is a
uniform L2 term and "Fisher-weighted" changes nothing; the training comparison against I ≡ 0
(issue 15) only makes sense where the weights spread. This reads the importances that FW-LoRA
runs saved (``fw_lora.json``: ``I_m = F_m / Σ_k F_k``, the default ``normalize="sum"``) and
reports, per run, the range and median of ``1 − I_m`` under ``"sum"`` and under ``"max"``
(``I_m = F_m / max_k F_k``, computed from the same F, since both are F up to a constant). No
training here.

    python benchmarks/claims_fw_weighting.py benchmarks/results/suite-cpu/*/r*/fw-lora \\
        --out benchmarks/results/claims/fw_weighting.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import write_results


def weights(importance: dict[str, float]) -> dict[str, dict[str, float]]:
    """Min, median and max of ``1 − I_m`` with ``I`` normalised by the sum and by the max."""
    values = list(importance.values())
    total, top = sum(values), max(values)
    out = {}
    for label, scale in (("sum", total), ("max", top)):
        one_minus = [1 - v / scale for v in values]
        out[label] = {
            "min": min(one_minus),
            "median": statistics.median(one_minus),
            "max": max(one_minus),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", nargs="+", help="folders searched for fw_lora.json")
    parser.add_argument("--out", default="benchmarks/results/claims/fw_weighting.json")
    args = parser.parse_args()
    results = []
    for folder in args.folders:
        for path in sorted(Path(folder).rglob("fw_lora.json")):
            saved = json.loads(path.read_text())
            row = {
                "run": str(path.parent),
                "modules": len(saved["importance"]),
                "warmup_steps": saved["warmup_steps"],
            } | weights(saved["importance"])
            results.append(row)
            s, m = row["sum"], row["max"]
            print(
                f"{path.parent}: 1−I sum [{s['min']:.3f}, {s['median']:.3f}, {s['max']:.3f}] "
                f"max [{m['min']:.3f}, {m['median']:.3f}, {m['max']:.3f}]",
                flush=True,
            )
    if not results:
        raise SystemExit("no fw_lora.json under the folders given")
    write_results(args.out, {"note": "saved importances re-normalised; no training here"}, results)


if __name__ == "__main__":
    main()
