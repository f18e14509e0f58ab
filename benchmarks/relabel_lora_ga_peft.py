"""Relabel finished ``lora-ga`` runs of a comparison folder as ``lora-ga-peft`` (2026-12-03).

Until 2026-12-03 the method ``lora-ga`` ran PEFT 0.21's ``lora_ga`` initialisation, which puts
the gradient's singular values into B₀ (so B₀ starts near zero) and scales only B₀; the paper's
Algorithm 1 scales both factors by m^¼/√γ and uses no singular values. ``lora-ga`` now runs the
paper's init, and PEFT's is the named variant ``lora-ga-peft``, whose initialisation is bit for
bit the one those runs had with float32 weights, as the suite's are (same gradients, same PEFT
call; tests/test_peers.py pins it). So the finished
runs are kept under the name of what they ran:

    python benchmarks/relabel_lora_ga_peft.py benchmarks/results/suite-cpu/*/

For each comparison folder: ``rN/lora-ga`` → ``rN/lora-ga-peft`` (its runs' ``config.json`` and
``metrics.json`` say the new name and path), ``picked_lr.json``'s pick is relabelled (so the new
``lora-ga`` is tuned afresh) and ``compare.json`` lists both methods. Rerun the comparison (or the
suite) to run the paper's ``lora-ga`` and rewrite the report. Idempotent: a folder without a
``lora-ga`` run directory is left as it is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OLD, NEW = "lora-ga", "lora-ga-peft"


def _rewrite_run(run: Path, old_dir: str, new_dir: str) -> None:
    for name in ("config.json", "metrics.json"):
        path = run / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        holder = data.get("settings", data)  # config.json nests the run's settings
        if holder.get("method") == OLD:
            holder["method"] = NEW
        if isinstance(holder.get("out"), str):
            holder["out"] = holder["out"].replace(old_dir, new_dir)
        if isinstance(data.get("run_dir"), str):
            data["run_dir"] = data["run_dir"].replace(old_dir, new_dir)
        path.write_text(json.dumps(data, indent=2))


def relabel(folder: Path) -> int:
    """Relabel one comparison folder; returns the number of run directories moved."""
    moved = 0
    for method_dir in sorted(folder.glob(f"r*/{OLD}")):
        target = method_dir.with_name(NEW)
        if target.exists():
            raise SystemExit(f"{target} exists already: relabel by hand")
        runs = [p.parent for p in method_dir.rglob("metrics.json")]
        method_dir.rename(target)
        for run in runs:
            new_run = target / run.relative_to(method_dir)
            _rewrite_run(new_run, f"/{OLD}/", f"/{NEW}/")
            moved += 1
    picked = folder / "picked_lr.json"
    if moved and picked.exists():
        data = json.loads(picked.read_text())
        for row in data["picked"]:
            if row["method"] == OLD:
                row["method"] = NEW
        picked.write_text(json.dumps(data, indent=2))
    pinned = folder / "compare.json"
    if moved and pinned.exists():
        data = json.loads(pinned.read_text())
        methods = data["methods"]
        if OLD in methods and NEW not in methods:
            methods.insert(methods.index(OLD) + 1, NEW)
        pinned.write_text(json.dumps(data, indent=2))
    return moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="comparison folders (OUT of compare)")
    for folder in parser.parse_args().folders:
        print(f"{folder}: {relabel(folder)} runs relabelled {OLD} -> {NEW}")


if __name__ == "__main__":
    main()
