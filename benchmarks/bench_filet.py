"""FILet init cost against LoRA training steps and PeFT's PiSSA (full SVD), EVA, LoRA-GA and CorDA
inits, on the default (MiniLM, Rotten Tomatoes); and the one-calibration composition.

Each init starts from a fresh copy of MiniLM and includes ``get_peft_model``; the data-driven ones
get the same ``n_batches`` Rotten Tomatoes training batches of 32. The peers run exactly as
``fisherlora compare`` runs them (``fisherlora.methods.peers``: build, then prepare). Times are
medians of ``--reps`` interleaved repetitions, as "training-step equivalents" (the median time of
one plain LoRA training step in the same run) and as a multiple of the time of ``n_batches`` LoRA
training steps on the same batches (the target: FILet init ≤ 1.15 × its n_batches LoRA steps).

Inits: ``filet-gram`` (the runner's ``filet``), ``filet-svd`` with an empty decomposition cache
(a cold init, every weight decomposed), ``…-warm`` with the cache holding this base (a repeated
run on one base: a comparison's seeds, a suite), ``…-baseline`` the ``filet_init`` of another
version of ``filet.py`` (``--baseline old.py``; ``git show REV:src/fisherlora/methods/filet.py >
old.py``) in the same rotation; ``fim-lora``, ``filet`` (the runner's methods' ``prepare``, with
FILet's step-0 gradient probe), ``fim-lora+filet`` (one calibration) and ``fim-lora+filet-2cal``
(the same composition with two calibrations, as before the passes were shared).

``--clock cpu`` times by this process's CPU time instead of the wall clock: on a shared machine
other processes then disturb the ratios far less (with ``--threads 1`` it is the work done; with
several threads it also counts their spinning). Peak memory: VmHWM of a fresh process per init,
median of ``--memory-reps``, against one running 8 LoRA training steps (on ``--device cuda``: the
GPU's peak allocation, and every timed init is synchronised).

    python benchmarks/bench_filet.py --reps 5 --out benchmarks/results/filet_init.json
    python benchmarks/bench_filet.py --threads 1 --clock cpu --memory-reps 0 \\
        --inits filet-gram,filet-svd,lora-ga --out benchmarks/results/filet_init-cpu1.json
    python benchmarks/bench_filet.py --device cuda --out benchmarks/results/filet_init-cuda.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import (
    add_device_argument,
    check_device,
    child_peak_memory,
    default_setup,
    peak_memory_mb,
    run_setting,
    sync,
    training_steps,
)
from peft import get_peft_model

from fisherlora.directions import DECOMPOSITIONS
from fisherlora.methods import get_method
from fisherlora.methods.filet import filet_init

# The clock of every timed region: wall time, or with --clock cpu this process's CPU time.
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCK["wall"]
baseline_init = None  # filet_init of --baseline


def _peer(name: str):
    def init(base, config, batches):
        method = get_method(name, {"calib_batches": len(batches)})
        model = method.build(base, config, batches)
        method.prepare(model, batches)
        return model

    return init


def _filet(basis: str, warm: bool = False, init=None):
    def run(base, config, batches):
        if not warm:  # cold: also the baseline's own cache (a module of its own)
            DECOMPOSITIONS.clear()
            # a baseline from before the decomposition cache (9a844de) has none to clear
            baseline_cache = getattr(sys.modules.get("filet_baseline"), "DECOMPOSITIONS", None)
            if baseline_cache is not None:
                baseline_cache.clear()
        model = get_peft_model(base, config)
        (init or filet_init)(model, batches, n_batches=len(batches), basis=basis, progress=False)
        return model

    return run


def _baseline(basis: str):
    return lambda base, config, batches: _filet(basis, init=baseline_init)(base, config, batches)


def _method(name: str, share_calibration: bool = True):
    def run(base, config, batches):
        DECOMPOSITIONS.clear()
        model = get_peft_model(base, config)
        method = get_method(name, {"calib_batches": len(batches), "progress": False})
        method.share_calibration = share_calibration
        method.prepare(model, batches)
        return model

    return run


INITS = {
    "filet-gram": _filet("gram"),
    "filet-svd": _filet("svd"),
    "filet-gram-warm": _filet("gram", warm=True),
    "filet-svd-warm": _filet("svd", warm=True),
    "filet-gram-baseline": _baseline("gram"),
    "filet-svd-baseline": _baseline("svd"),
    "pissa": _peer("pissa"),
    "eva": _peer("eva"),
    "lora-ga": _peer("lora-ga"),  # the paper's init since 2026-12-03 (PEFT's before)
    "lora-ga-peft": _peer("lora-ga-peft"),
    "corda": _peer("corda"),
    "fim-lora": _method("fim-lora"),
    "filet": _method("filet"),
    "fim-lora+filet": _method("fim-lora+filet"),
    "fim-lora+filet-2cal": _method("fim-lora+filet", share_calibration=False),
}
DEFAULT_INITS = ("filet-gram", "filet-svd", "filet-gram-warm", "filet-svd-warm", "pissa", "eva")
DEFAULT_INITS += ("lora-ga", "lora-ga-peft", "corda", "fim-lora", "filet", "fim-lora+filet")
DEFAULT_INITS += ("fim-lora+filet-2cal",)


def load_baseline(path: str):
    """``filet_init`` of another version of ``filet.py``, loaded beside this one."""
    spec = importlib.util.spec_from_file_location("filet_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["filet_baseline"] = module
    spec.loader.exec_module(module)
    return module.filet_init


def timed_steps(model, batches) -> list[float]:
    """:func:`common.training_steps` timed by ``clock``: one AdamW step per batch."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    device = next(model.parameters()).device
    times = []
    for batch in batches:
        sync(device)
        start = clock()
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(clock() - start)
    return times


def memory_child(mode: str, n_batches: int, device: str, rank: int) -> None:
    base, config, batches = default_setup(n_batches, rank=rank, device=device)
    if mode == "lora":
        training_steps(get_peft_model(base, config), batches)
    else:
        if mode.endswith("-warm"):  # the decomposition cache filled by a first init
            INITS[mode](copy.deepcopy(base), config, batches)
        INITS[mode](base, config, batches)
    print(json.dumps({"mode": mode, "peak_mb": peak_memory_mb(device)}))


def main() -> None:
    global clock, baseline_init
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--n-batches", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--memory-reps", type=int, default=3)
    parser.add_argument("--inits", default=",".join(DEFAULT_INITS), help=f"of {list(INITS)}")
    parser.add_argument("--baseline", help="another filet.py for the filet-*-baseline inits")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--clock", choices=list(CLOCK), default="wall")
    parser.add_argument("--out", default="benchmarks/results/filet_init.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    setting = run_setting(args)  # now: when the run started, and the load average then
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device == "cuda":
        parser.error("--clock cpu measures CPU work; on --device cuda time the wall clock")
    clock = CLOCK[args.clock]
    inits = args.inits.split(",")
    unknown = [name for name in inits if name not in INITS]
    if unknown:
        parser.error(f"unknown inits {unknown}; choose from {list(INITS)}")
    if any(name.endswith("-baseline") for name in inits):
        if not args.baseline:
            parser.error("the filet-*-baseline inits need --baseline old_filet.py")
        baseline_init = load_baseline(args.baseline)
    if args.child:
        memory_child(args.child, args.n_batches, args.device, args.rank)
        return

    base, config, batches = default_setup(args.n_batches, rank=args.rank, device=args.device)
    times: dict[str, list[float]] = {name: [] for name in ["lora_step", "lora_steps", *inits]}
    timed_steps(get_peft_model(copy.deepcopy(base), config), batches[:2])  # warm-up
    for rep in range(args.reps):
        steps = timed_steps(get_peft_model(copy.deepcopy(base), config), batches)
        times["lora_step"].append(statistics.median(steps))
        times["lora_steps"].append(sum(steps))  # the n_batches steps on the same batches
        for name in inits:
            if name.endswith("-warm"):  # fill the cache with this base, untimed
                INITS[name](copy.deepcopy(base), config, batches)
            fresh = copy.deepcopy(base)
            torch.manual_seed(rep)
            sync(args.device)
            start = clock()
            INITS[name](fresh, config, batches)
            sync(args.device)
            times[name].append(clock() - start)
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)

    peak = (
        child_peak_memory(
            __file__,
            ["lora", *inits],
            args.memory_reps,
            ["--n-batches", str(args.n_batches), "--device", args.device, "--rank", str(args.rank)]
            + (["--baseline", args.baseline] if args.baseline else []),
        )
        if args.memory_reps > 0
        else {}
    )
    median = {k: statistics.median(v) for k, v in times.items()}
    step, steps = median["lora_step"], median["lora_steps"]
    inits_only = {k: v for k, v in median.items() if not k.startswith("lora_step")}
    result = {
        "setting": setting,
        "times_s": times,
        "median_s": median,
        # multiples of the median LoRA step, and of the n_batches steps on the same batches
        # (their summed time: the target's denominator; batches differ in length)
        "training_step_equivalents": {k: v / step for k, v in inits_only.items()},
        "over_n_batches_steps": {k: v / steps for k, v in inits_only.items()},
        "peak_memory_mb": peak,
        "peak_memory_over_lora_steps": {
            k: v / peak["lora"] for k, v in peak.items() if k != "lora"
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "median_s",
                    "over_n_batches_steps",
                    "training_step_equivalents",
                    "peak_memory_over_lora_steps",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
