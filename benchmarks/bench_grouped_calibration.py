"""Peak memory and time of FILet and FIM-LoRA calibration against the group size (layers_per_pass).

MiniLM with LoRA r = 8 on query/key/value/dense (37 modules), 8 Rotten Tomatoes batches of 32.
Each setting runs in a fresh process (a process's peak only grows); peak memory is that
process's VmHWM (on ``--device cuda``: the GPU's peak allocation), median of ``--reps``; time is
the calibration's wall time in the same process (synchronised on CUDA).
Also reported: the analytic extra memory of the FILet candidate bases per group,
``max over groups Σ (n_m + m_m) · min(n_m, m_m)`` floats.

    python benchmarks/bench_grouped_calibration.py --reps 3 --out benchmarks/results/grouped.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import add_device_argument, check_device, default_setup, peak_memory_mb, sync
from peft import get_peft_model

from fisherlora.adapters import lora_layers
from fisherlora.capture import layer_groups
from fisherlora.methods.filet import filet_init
from fisherlora.methods.fim_lora import allocate_ranks

GROUPS = ("all", "12", "4", "1")


def child(method: str, per_pass: str, n_batches: int, device: str) -> None:
    base, config, batches = default_setup(n_batches, device=device)
    model = get_peft_model(base, config)
    layers_per_pass = None if per_pass == "all" else int(per_pass)
    sync(device)
    start = time.perf_counter()
    if method == "filet":
        filet_init(
            model, batches, n_batches=n_batches, progress=False, layers_per_pass=layers_per_pass
        )
    else:
        allocate_ranks(
            model, batches, n_batches=n_batches, progress=False, layers_per_pass=layers_per_pass
        )
    sync(device)
    seconds = time.perf_counter() - start
    _, layers = lora_layers(model)
    shapes = [layer.get_base_layer().weight.shape for layer in layers.values()]
    groups = layer_groups(list(range(len(shapes))), layers_per_pass)
    basis_mb = (
        max(sum((shapes[i][0] + shapes[i][1]) * min(shapes[i]) for i in g) for g in groups)
        * 4
        / 2**20
    )
    print(json.dumps({"peak_mb": peak_memory_mb(device), "seconds": seconds, "bases_mb": basis_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n-batches", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/grouped_calibration.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    check_device(args.device)
    if args.child:
        child(*args.child, args.n_batches, args.device)
        return
    results = {}
    for method in ("filet", "fim-lora"):
        for per_pass in GROUPS:
            runs = []
            for _ in range(args.reps):
                command = [
                    sys.executable,
                    __file__,
                    "--child",
                    method,
                    per_pass,
                    "--n-batches",
                    str(args.n_batches),
                    "--device",
                    args.device,
                ]
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                runs.append(json.loads(output.strip().splitlines()[-1]))
            results[f"{method} layers_per_pass={per_pass}"] = {
                "peak_mb": statistics.median(r["peak_mb"] for r in runs),
                "seconds": statistics.median(r["seconds"] for r in runs),
                "filet_bases_mb": runs[0]["bases_mb"] if method == "filet" else None,
            }
            print(method, per_pass, results[f"{method} layers_per_pass={per_pass}"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
