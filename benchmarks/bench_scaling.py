"""How the cost of every init grows with the model's width: synthetic Llama stacks, random weights.

Each model is a ``LlamaForCausalLM`` built from a ``LlamaConfig`` (random weights: this measures
cost, not quality) at hidden size h, with head_dim 64 (h/64 heads, as many KV heads), the MLP
width Llama's code gives (8h/3 rounded up to a multiple of 256: 11008 at h = 4096, as in
Llama-7B), ``--layers`` decoder layers (``--layers-at 4096=1``: one layer alone at that width)
and a small vocabulary (``--vocab``, 1000) so that the embeddings do not dominate. LoRA rank
``--rank`` (8, α = 2r) on q/k/v/o/gate/up/down. Every batch has exactly ``--batch-size`` ×
``--seq`` tokens (4 × 128 = 512; random ids, no padding, labels = the inputs).

A *cell* is one (width, method) pair; each repetition of a cell runs in a fresh process, which
builds the model, runs one tiny LoRA step (1 × 16 tokens, then LoRA is unloaded again: the
runtime's first-call allocations happen here, outside any window), and then:

- method ``lora`` (the reference, one process per width and repetition): plain LoRA, one
  untimed and ``--steps`` timed AdamW steps (forward, backward, clip, step); the median of the
  timed ones is **one LoRA step**, and the *extra memory* of a LoRA step is the peak over all
  the steps minus the memory before the first;
- every other method: its init timed as a whole — ``build`` (``get_peft_model``, and LoRA-GA's
  and CorDA's PEFT preprocessing) plus ``prepare`` (the calibration), each calibrating method on
  the first ``--calib-batches`` (4) batches — and its *extra memory*, the peak during the init
  minus the memory before it; then its adapters are unloaded, plain LoRA is put on the same
  model and one untimed plus ``--steps`` timed LoRA steps give this process's LoRA step time.

**Time ratio** = init time / the LoRA step time of the same process (same model, same batches,
same machine state). **Memory ratio** = init extra memory / the LoRA step's extra memory at
that width (median of the reference processes). Both extras are "peak minus the memory of a
fresh process with the model built", each the first work its process measures (a process's
freed memory stays in the heap for later reuse, so a second window would be understated).
Memory is the process's resident set on CPU (VmRSS; the peak VmHWM is started afresh through
``/proc/self/clear_refs``, Linux only) and ``torch.cuda.memory_allocated`` /
``max_memory_allocated`` on CUDA. Per cell, the median over ``--reps`` processes.

Methods: FIM-LoRA with the batch and the per-example estimator (``fim-lora-batch``,
``fim-lora``); FILet with the gram and the svd basis (``filet``, ``filet-svd``; ``filet_init``
with the runner's options, without the runner's step-0 gradient-norm diagnostic); FW-LoRA, which
has no init but a per-step cost: the median of ``--steps`` training steps with the penalty
during warm-up (sketch estimator, hooks on) and after warm-up (hooks off, only the penalty),
over a LoRA step; PiSSA with PEFT's full SVD and with ``pissa_niter_4`` (randomised SVD, 4
subspace iterations); LoRA-GA, EVA (runs until its SVDs converge, cycling over its batches) and
CorDA, as ``fisherlora compare`` runs them (``fisherlora.methods.peers``).

Then per method a least-squares line through log(value) against log(width): the exponent k of
``value ≈ c · width^k`` for the init seconds per decoder layer, the extra memory per decoder layer,
and both ratios. The fit is extrapolated to the layer shapes of Llama-7B (h 4096, MLP 11008, 32
layers) and Llama-70B (h 8192, MLP 28672, 80 layers, 8 KV heads) — labelled as extrapolation
from the fitted width range on this device, not measurement. "Largest width that fits": per
method the largest width that ran, the first that did not (out of memory under the
``--mem-limit-gb`` guard, an address-space limit set with ``setrlimit(RLIMIT_AS)`` in the child,
killed, or timed out), and the width at which the memory fit reaches the machine's memory
(projected). A method that failed at one width is not run at wider ones.

Results are resumable: cells already in ``<out>/scaling.json`` are skipped. Outputs:
``scaling.json``, ``scaling.md`` (the tables, also printed) and ``scaling.png``.

    python benchmarks/bench_scaling.py --out benchmarks/results/scaling
    # smoke test: tiny widths in one process (quick; its memory numbers mean nothing)
    python benchmarks/bench_scaling.py --widths 64,128 --layers 1 --reps 2 --threads 1 \
        --in-process --out /tmp/scaling-dev
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import add_device_argument, check_device, sync, training_steps
from peft import LoraConfig, get_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEAD_DIM = 64

# name -> what it measures (the table's label)
METHODS: dict[str, str] = {
    "lora": "one plain LoRA training step (the reference)",
    "fim-lora-batch": "FIM-LoRA, batch estimator",
    "fim-lora": "FIM-LoRA, per-example estimator",
    "filet": "FILet, gram basis",
    "filet-svd": "FILet, svd basis",
    "fw-lora-warmup": "FW-LoRA, one warm-up step (sketch)",
    "fw-lora-after": "FW-LoRA, one step after warm-up",
    "pissa": "PiSSA, full SVD",
    "pissa-niter4": "PiSSA, pissa_niter_4",
    "lora-ga": "LoRA-GA, the paper's init (PEFT's in results before 2026-12-03)",
    "lora-ga-peft": "LoRA-GA, PEFT's init",
    "eva": "EVA",
    "corda": "CorDA",
}
# Measured per training step (a ratio to one LoRA step), not once before training.
STEP_METHODS = ("fw-lora-warmup", "fw-lora-after")

# The layer shapes the fits are extrapolated to.
SHAPES: dict[str, dict[str, int]] = {
    "llama-7b": {"hidden": 4096, "intermediate": 11008, "layers": 32, "kv_heads": 32},
    "llama-70b": {"hidden": 8192, "intermediate": 28672, "layers": 80, "kv_heads": 8},
}

# What must match for a resumed run to add to the cells already in the JSON.
SETUP_KEYS = (
    "batch_size",
    "seq",
    "calib_batches",
    "steps",
    "rank",
    "vocab",
    "device",
    "dtype",
    "seed",
    "layers",
    "layers_at",
)


# ---------------------------------------------------------------------------------------------
# model, batches, shapes


def intermediate_size(hidden: int, multiple_of: int = 256) -> int:
    """Llama's MLP width: 8h/3 rounded up to a multiple of 256 (11008 at h = 4096)."""
    return multiple_of * math.ceil(8 * hidden / 3 / multiple_of)


def layer_params(hidden: int, intermediate: int, kv_heads: int | None = None) -> int:
    """Parameters of one Llama decoder layer (the 7 linears and the two RMSNorms)."""
    kv = hidden if kv_heads is None else kv_heads * HEAD_DIM
    return 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden


def model_params(hidden: int, layers: int, vocab: int) -> int:
    """Parameters of the synthetic model: embeddings, untied LM head, layers, final norm."""
    return 2 * vocab * hidden + layers * layer_params(hidden, intermediate_size(hidden)) + hidden


def synthetic_llama(hidden: int, layers: int, vocab: int, seq: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % HEAD_DIM:
        raise SystemExit(f"width {hidden} is not a multiple of the head size {HEAD_DIM}")
    heads = hidden // HEAD_DIM
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate_size(hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def token_batches(
    n: int, batch_size: int, seq: int, vocab: int, seed: int, device: str
) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of exactly ``batch_size`` × ``seq`` tokens: random ids, no padding."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (batch_size, seq), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


def lora_config(rank: int) -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS
    )


# ---------------------------------------------------------------------------------------------
# memory windows


class MemoryWindow:
    """The memory of the process now and its peak since :meth:`reset`, in MiB: the resident set
    on CPU (``/proc/self/status``; the peak is reset through ``/proc/self/clear_refs``), the
    allocated CUDA memory on a GPU."""

    def __init__(self, device: str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.device = device

    @staticmethod
    def _status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {key} in /proc/self/status")

    def current(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) / 2**20
        return self._status("VmRSS:")

    def peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self._status("VmHWM:")

    def reset(self) -> float:
        """Collect garbage, start a new peak window; the memory at its start."""
        gc.collect()
        if self.cuda:
            sync(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return self.current()


# ---------------------------------------------------------------------------------------------
# one cell


def run_init(name: str, base, config: LoraConfig, batches: list[dict]) -> torch.nn.Module:
    """Build ``name``'s adapters on ``base`` and run its init/calibration; the PEFT model."""
    from fisherlora.methods import get_method
    from fisherlora.methods.filet import filet_init

    n = len(batches)
    if name == "pissa-niter4":
        config = dataclasses.replace(copy.deepcopy(config), init_lora_weights="pissa_niter_4")
        return get_peft_model(base, config)
    method = get_method(name, {"calib_batches": n, "progress": False})
    model = method.build(base, config, batches)
    if name in ("filet", "filet-svd"):
        # what Filet.prepare runs, without its step-0 gradient-norm diagnostic
        filet_init(model, batches, **method.options)
    else:
        method.prepare(model, batches)
    return model


def fw_step_times(
    name: str, base, config: LoraConfig, batch: dict, steps: int
) -> tuple[list[float], Any]:
    """FW-LoRA steps on one batch: an untimed first step (for ``fw-lora-after`` it ends the
    warm-up), then ``steps`` timed ones; (their times, the base model with FW-LoRA removed)."""
    from fisherlora.methods.fw_lora import FisherPenalty

    model = get_peft_model(base, config).train()
    penalty = FisherPenalty(model, warmup_steps=1 if name == "fw-lora-after" else 10**9)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    device = batch["input_ids"].device

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        loss = model(**batch).loss + penalty.penalty()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        penalty.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start

    step()
    if name == "fw-lora-after" and penalty.warming_up:
        raise RuntimeError("FW-LoRA is still warming up after its warm-up step")
    times = [step() for _ in range(steps)]
    penalty.remove_hooks()
    return times, model.unload()


def lora_step_times(base, config: LoraConfig, batch: dict, steps: int) -> tuple[list[float], Any]:
    """One untimed and ``steps`` timed plain-LoRA steps; (the timed ones, the base model)."""
    lora = get_peft_model(base, config)
    times = training_steps(lora, [batch] * (steps + 1))[1:]
    return times, lora.unload()


def measure_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """One repetition of one cell in this process (see the module docstring); a flat record."""
    device, method = spec["device"], spec["method"]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    steps = spec["steps"]
    memory = MemoryWindow(device)
    runtime_mb = memory.current()
    dtype = getattr(torch, spec["dtype"])
    base = synthetic_llama(spec["width"], spec["layers"], spec["vocab"], spec["seq"], spec["seed"])
    base.to(device=device, dtype=dtype)
    batches = token_batches(
        max(spec["calib_batches"], 1),
        spec["batch_size"],
        spec["seq"],
        spec["vocab"],
        spec["seed"] + 1,
        device,
    )
    config = lora_config(spec["rank"])
    tiny = token_batches(1, 1, 16, spec["vocab"], spec["seed"] + 2, device)[0]
    _, base = lora_step_times(base, config, tiny, 1)  # first-call allocations, outside windows
    model_mb = memory.current()

    start = memory.reset()
    cpu = time.process_time()
    if method == "lora":
        lora = get_peft_model(base, config)
        all_times = training_steps(lora, batches[:1] * (steps + 1))
        peak = memory.peak()
        lora_times = times = all_times[1:]
        init_s = statistics.median(times)
        method_cpu = (time.process_time() - cpu) / (steps + 1)
    elif method in STEP_METHODS:
        times, base = fw_step_times(method, base, config, batches[0], steps)
        peak = memory.peak()
        init_s = statistics.median(times)
        method_cpu = (time.process_time() - cpu) / (steps + 1)
    else:
        torch.manual_seed(spec["seed"] + spec.get("rep", 0))
        sync(device)
        t0 = time.perf_counter()
        model = run_init(method, base, config, batches[: spec["calib_batches"]])
        sync(device)
        init_s = time.perf_counter() - t0
        peak = memory.peak()
        method_cpu = time.process_time() - cpu
        times = [init_s]
        base = model.unload()
        del model
    if method != "lora":  # this process's LoRA step, after the measured window
        lora_times, base = lora_step_times(base, config, batches[0], steps)

    lora_step_s = statistics.median(lora_times)
    return {
        "width": spec["width"],
        "layers": spec["layers"],
        "method": method,
        "rep": spec.get("rep", 0),
        "status": "ok",
        "init_s": init_s,
        "method_times_s": times,
        "lora_step_s": lora_step_s,
        "lora_steps_s": lora_times,
        "time_ratio": init_s / lora_step_s,
        # CPU seconds of this process, all threads (per step for LoRA and FW-LoRA): the work,
        # where a loaded machine makes wall times unreliable
        "method_cpu_s": method_cpu,
        "runtime_mb": runtime_mb,
        "model_built_mb": model_mb,
        "window_start_mb": start,
        "peak_mb": peak,
        "extra_mb": peak - start,
        "params": model_params(spec["width"], spec["layers"], spec["vocab"]),
        "threads": torch.get_num_threads(),
    }


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory", "cannot allocate"))


def child_main(spec: dict[str, Any]) -> None:
    """The child process: set the address-space guard, measure, print one JSON line."""
    limit_gb = spec.get("mem_limit_gb")
    if limit_gb:
        limit = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        record = measure_cell(spec)
    except Exception as error:  # an OOM under the guard is a result, not a crash
        if not _is_oom(error):
            raise
        record = {
            "width": spec["width"],
            "layers": spec["layers"],
            "method": spec["method"],
            "rep": spec.get("rep", 0),
            "status": "oom",
            "reason": f"{type(error).__name__}: {str(error)[:300]}",
        }
    print(json.dumps(record), flush=True)


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``measure_cell`` in a fresh process; a failure as a record with its status and reason."""
    failed = {k: spec[k] for k in ("width", "layers", "method", "rep")}
    command = [sys.executable, str(Path(__file__).resolve()), "--child-cell", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return failed | {"status": "timeout", "reason": f"over --cell-timeout {timeout:.0f} s"}
    if done.returncode < 0:  # killed by a signal: the kernel's OOM killer sends SIGKILL
        return failed | {"status": "killed", "reason": f"signal {-done.returncode}"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-3:]
        return failed | {"status": "error", "reason": " | ".join(tail)[:500]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# fits and summaries


def fit_power(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float] | None:
    """Least squares of log y on log x: ``y ≈ c · x^k``; {k, c, r2, n}. Points with y ≤ 0 are
    left out (a log needs y > 0); None with fewer than two distinct x left."""
    points = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and y > 0 and x > 0]
    if len({x for x, _ in points}) < 2:
        return None
    lx = [math.log(x) for x, _ in points]
    ly = [math.log(y) for _, y in points]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    k = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sxx
    log_c = my - k * mx
    residual = sum((b - (log_c + k * a)) ** 2 for a, b in zip(lx, ly, strict=True))
    total = sum((b - my) ** 2 for b in ly)
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return {"k": k, "c": math.exp(log_c), "r2": r2, "n": len(points)}


def predict(fit: dict[str, float] | None, x: float) -> float | None:
    return None if fit is None else fit["c"] * x ** fit["k"]


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def cell_table(records: list[dict]) -> list[dict[str, Any]]:
    """Per (width, layers, method): medians over the repetitions that ran, or the failure. The
    memory ratio divides by the median extra memory of the ``lora`` processes at that shape."""
    reference = {}
    for r in records:
        if r["method"] == "lora" and r["status"] == "ok":
            reference.setdefault((r["width"], r["layers"]), []).append(r["extra_mb"])
    order = {m: i for i, m in enumerate(METHODS)}
    keys = sorted(
        {(r["width"], r["layers"], r["method"]) for r in records},
        key=lambda key: (order.get(key[2], len(order)), key[0], key[1]),
    )
    rows = []
    for width, layers, method in keys:
        reps = [
            r for r in records if (r["width"], r["layers"], r["method"]) == (width, layers, method)
        ]
        ok = [r for r in reps if r["status"] == "ok"]
        failed = [r for r in reps if r["status"] != "ok"]
        row: dict[str, Any] = {"width": width, "layers": layers, "method": method}
        if not ok:
            row |= {"status": failed[0]["status"], "reason": failed[0].get("reason", "")}
            rows.append(row)
            continue
        extra = _median([r["extra_mb"] for r in ok])
        lora_extra = _median(reference.get((width, layers), []))
        row |= {
            "status": "ok",
            "reps": len(ok),
            "init_s": _median([r["init_s"] for r in ok]),
            "lora_step_s": _median([r["lora_step_s"] for r in ok]),
            "time_ratio": _median([r["time_ratio"] for r in ok]),
            "method_cpu_s": _median([r.get("method_cpu_s") for r in ok]),
            "extra_mb": extra,
            "lora_extra_mb": lora_extra,
            "memory_ratio": extra / lora_extra if lora_extra and lora_extra > 0 else None,
            "peak_mb": _median([r["peak_mb"] for r in ok]),
            "runtime_mb": _median([r["runtime_mb"] for r in ok]),
        }
        rows.append(row)
    return rows


def memory_total_mb(device: str) -> float:
    """The machine's memory for the projection: the GPU's on CUDA, MemTotal on CPU."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 2**20
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def projected_max_width(
    extra_fit: dict | None,
    layers: int,
    vocab: int,
    bytes_per_param: int,
    runtime_mb: float,
    budget_mb: float,
) -> int | None:
    """The widest h (a multiple of 64) at which runtime + model + the fitted extra memory per
    layer × ``layers`` stays within ``budget_mb``; None without a fit."""
    if extra_fit is None:
        return None

    def need(h: int) -> float:
        model = model_params(h, layers, vocab) * bytes_per_param / 2**20
        return runtime_mb + model + predict(extra_fit, h) * layers

    low, high = 1, 4096  # in units of 64
    if need(64 * low) > budget_mb:
        return 0
    while need(64 * high) <= budget_mb and high < 2**20:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if need(64 * mid) <= budget_mb else (low, mid)
    return 64 * low


def summarize(records: list[dict], setup: dict[str, Any]) -> dict[str, Any]:
    """Fits per method (exponents), extrapolations to Llama-7B / 70B shapes, widest that fits."""
    rows = cell_table(records)
    ok = [r for r in rows if r["status"] == "ok"]
    budget_mb = memory_total_mb(setup["device"])
    if setup.get("mem_limit_gb"):
        budget_mb = min(budget_mb, setup["mem_limit_gb"] * 1024)
    bytes_per_param = torch.finfo(getattr(torch, setup["dtype"])).bits // 8
    runtime_mb = _median([r["runtime_mb"] for r in ok]) or 0.0
    if torch.device(setup["device"]).type == "cuda":
        runtime_mb = 0.0  # allocated CUDA memory starts at zero

    series: dict[str, dict[str, list]] = {}
    for r in ok:  # per decoder layer, so a width run with fewer layers lines up
        s = series.setdefault(r["method"], {k: [] for k in ("w", "s", "mb", "tr", "mr")})
        s["w"].append(r["width"])
        s["s"].append(r["init_s"] / r["layers"])
        s["mb"].append(None if r["extra_mb"] is None else r["extra_mb"] / r["layers"])
        s["tr"].append(r["time_ratio"])
        s["mr"].append(r["memory_ratio"])

    def extrapolate(fits: dict, per_step: bool) -> dict[str, Any]:
        out = {}
        for shape, dims in SHAPES.items():
            h, layers = dims["hidden"], dims["layers"]
            per_layer_s, per_layer_mb = predict(fits["time_s"], h), predict(fits["extra_mb"], h)
            out[shape] = {
                "seconds_per_layer": per_layer_s,
                "seconds_model": None if per_layer_s is None else per_layer_s * layers,
                "extra_mb_per_layer": per_layer_mb,
                "extra_mb_model": None if per_layer_mb is None else per_layer_mb * layers,
                "time_ratio": predict(fits.get("time_ratio"), h),
                "memory_ratio": predict(fits.get("memory_ratio"), h),
                "seconds_are": "per training step" if per_step else "once, before training",
            }
        return out

    widths = sorted({r["width"] for r in ok})
    fit_range = [widths[0], widths[-1]] if widths else None
    methods: dict[str, Any] = {}
    for method in [m for m in METHODS if m in {r["method"] for r in rows}]:
        s = series.get(method, {k: [] for k in ("w", "s", "mb", "tr", "mr")})
        fits = {
            "time_s": fit_power(s["w"], s["s"]),
            "extra_mb": fit_power(s["w"], s["mb"]),
            # the reference's ratios are 1 by definition
            "time_ratio": None if method == "lora" else fit_power(s["w"], s["tr"]),
            "memory_ratio": None if method == "lora" else fit_power(s["w"], s["mr"]),
        }
        methods[method] = {
            "label": METHODS[method],
            "fits": fits,
            "extrapolated": extrapolate(fits, per_step=method in (*STEP_METHODS, "lora")),
            **_fits_widths(
                rows, method, fits["extra_mb"], setup, bytes_per_param, runtime_mb, budget_mb
            ),
        }
    return {
        "cells": rows,
        "methods": methods,
        "fit_range": fit_range,
        "memory_budget_mb": budget_mb,
        "memory_budget_is": (
            f"min(machine memory, --mem-limit-gb {setup['mem_limit_gb']})"
            if setup.get("mem_limit_gb")
            else "the machine's memory"
        ),
        "extrapolation_note": (
            f"EXTRAPOLATED from a power-law fit over widths {fit_range} on {setup['device']} "
            "(seconds and extra memory per decoder layer, times the layer count; the MLP widths "
            "of the fit are Llama's 8h/3 rounded to 256, equal to Llama-7B's 11008 at 4096, "
            "while Llama-70B's 28672 is 3.5 h and its attention has 8 KV heads; same tokens "
            "per batch as measured). Not measured."
        ),
    }


def _fits_widths(
    rows: list[dict],
    method: str,
    extra_fit: dict | None,
    setup: dict,
    bytes_per_param: int,
    runtime_mb: float,
    budget_mb: float,
) -> dict[str, Any]:
    """Largest width that ran, the first that did not, and the projection from the fit."""
    mine = [r for r in rows if r["method"] == method]
    ran = sorted(r["width"] for r in mine if r["status"] == "ok")
    failed = sorted((r for r in mine if r["status"] != "ok"), key=lambda r: r["width"])
    layers = setup["layers"]
    return {
        "largest_measured_ok": ran[-1] if ran else None,
        "first_failed": (
            {k: failed[0].get(k) for k in ("width", "layers", "status", "reason")}
            if failed
            else None
        ),
        "projected_max_width": projected_max_width(
            extra_fit, layers, setup["vocab"], bytes_per_param, runtime_mb, budget_mb
        ),
        "projected_for_layers": layers,
    }


# ---------------------------------------------------------------------------------------------
# report


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-2):
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown(summary: dict[str, Any], setup: dict[str, Any]) -> str:
    hardware = setup.get("gpu") or f"{setup.get('threads')} threads"
    lines = [
        f"Device {setup['device']} ({hardware}), "
        f"{setup['dtype']}; batches of {setup['batch_size']} × {setup['seq']} tokens, "
        f"{setup['calib_batches']} calibration batches, LoRA r = {setup['rank']}, "
        f"{setup['layers']} decoder layers"
        + "".join(f", {layers} at width {w}" for w, layers in setup["layers_at"].items())
        + ", "
        f"median of {setup['reps']} processes per cell.",
        "",
        "| method | width | layers | init (step) s | LoRA step s | time ratio | CPU s "
        "| extra MiB | LoRA extra MiB | memory ratio | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["cells"]:
        if r["status"] != "ok":
            lines.append(
                f"| {r['method']} | {r['width']} | {r['layers']} | | | | | | | | "
                f"{r['status']}: {r.get('reason', '')[:80]} |"
            )
            continue
        lines.append(
            f"| {r['method']} | {r['width']} | {r['layers']} | {_fmt(r['init_s'])} | "
            f"{_fmt(r['lora_step_s'])} | {_fmt(r['time_ratio'])} | {_fmt(r['method_cpu_s'])} | "
            f"{_fmt(r['extra_mb'])} | {_fmt(r['lora_extra_mb'])} | {_fmt(r['memory_ratio'])} | "
            f"ok ({r['reps']}) |"
        )
    lines += [
        "",
        "CPU s: the process's CPU seconds for the init (per step for lora and FW-LoRA), all "
        "threads. Exponents k of value ≈ c · width^k (least squares in log-log; R² in "
        "brackets); time and memory per decoder layer; the ratios are to one LoRA step.",
        "",
        "| method | time k | memory k | time-ratio k | memory-ratio k | largest ok | first failed "
        f"| projected max width ({setup['layers']} layers) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def k(fit):
        return "–" if fit is None else f"{fit['k']:.2f} ({fit['r2']:.2f})"

    for name, m in summary["methods"].items():
        f = m["fits"]
        failed = m["first_failed"]
        first = "–" if not failed else f"{failed['width']} ({failed['status']})"
        lines.append(
            f"| {name} | {k(f['time_s'])} | {k(f['extra_mb'])} | {k(f.get('time_ratio'))} | "
            f"{k(f.get('memory_ratio'))} | {_fmt(m['largest_measured_ok'])} | "
            f"{first} | "
            f"{_fmt(m['projected_max_width'])} |"
        )
    lines += [
        "",
        f"**{summary['extrapolation_note']}** Projected max width: where runtime + model + "
        f"the fitted extra memory reaches {summary['memory_budget_is']} "
        f"({summary['memory_budget_mb'] / 1024:.1f} GiB).",
        "",
        "| method | 7B: s per layer | 7B: s (32 layers) | 7B: extra GiB | 7B: time ratio | "
        "70B: s per layer | 70B: s (80 layers) | 70B: extra GiB | 70B: time ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["methods"].items():
        cells = []
        for shape in SHAPES:
            e = m["extrapolated"][shape]
            gib = None if e["extra_mb_model"] is None else e["extra_mb_model"] / 1024
            cells += [
                _fmt(e["seconds_per_layer"]),
                _fmt(e["seconds_model"]),
                _fmt(gib),
                _fmt(e["time_ratio"]),
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "FW-LoRA rows: seconds of one training step with the penalty (not a one-off init); "
        "lora: one plain LoRA step (with its optimizer state)."
    )
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("time_s", "init (or FW step) seconds per layer", "s"),
        ("extra_mb", "extra memory per layer (MiB)", "mb"),
        ("time_ratio", "time / one LoRA step", "tr"),
        ("memory_ratio", "extra memory / LoRA step's", "mr"),
    ]
    ok = [r for r in summary["cells"] if r["status"] == "ok"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    colors = plt.get_cmap("tab20")
    for index, (name, m) in enumerate(summary["methods"].items()):
        mine = [r for r in ok if r["method"] == name]
        values = {
            "s": [r["init_s"] / r["layers"] for r in mine],
            "mb": [None if r["extra_mb"] is None else r["extra_mb"] / r["layers"] for r in mine],
            "tr": [r["time_ratio"] for r in mine],
            "mr": [r["memory_ratio"] for r in mine],
        }
        widths = [r["width"] for r in mine]
        for ax, (key, title, short) in zip(axes.flat, panels, strict=True):
            if name == "lora" and short in ("tr", "mr"):
                continue  # 1 by definition
            color = "black" if name == "lora" else colors(index % 20)
            points = [(w, v) for w, v in zip(widths, values[short], strict=True) if v and v > 0]
            if points:
                ax.scatter(*zip(*points, strict=True), color=color, s=18)
            fit = m["fits"].get(key)
            if fit is not None and widths:
                xs = [min(widths), max(widths)]
                label = f"{name} (k={fit['k']:.2f})"
                style = "--" if name == "lora" else "-"
                ax.plot(xs, [predict(fit, x) for x in xs], style, color=color, label=label)
            ax.set_title(title)
    measured = sorted({r["width"] for r in ok})
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(measured, [str(w) for w in measured])
        ax.minorticks_off()
        ax.set_xlabel("hidden size")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(
        "fisherlora init cost vs width (synthetic Llama, random weights); fits over "
        f"{summary['fit_range']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# driver


def _parse_layers_at(text: str) -> dict[int, int]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        width, _, layers = item.partition("=")
        out[int(width)] = int(layers)
    return out


def load_results(path: Path, setup: dict[str, Any], force: bool) -> list[dict]:
    if not path.exists():
        return []
    payload = json.loads(path.read_text())
    old = payload.get("setup", {})
    changed = {k: (old.get(k), setup[k]) for k in SETUP_KEYS if old.get(k) != setup[k]}
    if changed and not force:
        raise SystemExit(
            f"{path} was measured with a different setup {changed}; use another --out "
            "(or --force to mix them)"
        )
    return payload.get("records", [])


def save(path: Path, setup: dict, records: list[dict], summary: dict | None = None) -> None:
    from fisherlora.experiments.train import library_versions

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"setup": setup, "versions": library_versions(), "records": records}
    if summary is not None:
        payload["summary"] = summary
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def report(out: Path, setup: dict, records: list[dict]) -> dict:
    summary = summarize(records, setup)
    save(out / "scaling.json", setup, records, summary)
    text = markdown(summary, setup)
    (out / "scaling.md").write_text(text + "\n")
    print(text)
    if any(r["status"] == "ok" for r in summary["cells"]):
        plot(summary, out / "scaling.png")
        print(f"wrote {out / 'scaling.json'}, {out / 'scaling.md'}, {out / 'scaling.png'}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", default="384,576,1024,2048,4096")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers per model")
    parser.add_argument(
        "--layers-at", default="4096=1", help="widths with another layer count: 'W=L,...'"
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="cells to run; 'lora' is the reference the memory ratios divide by",
    )
    parser.add_argument("--reps", type=int, default=3, help="processes per cell (median)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed LoRA / FW-LoRA steps")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="address-space limit of each child (setrlimit RLIMIT_AS); default 80%% of MemTotal "
        "on CPU, none on CUDA; 0: none",
    )
    parser.add_argument("--cell-timeout", type=float, default=3600.0, help="seconds per process")
    parser.add_argument("--out", default="benchmarks/results/scaling")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process, not a fresh one per cell (a quick smoke test: the memory "
        "windows then share one process, and there is no --mem-limit-gb guard or timeout)",
    )
    parser.add_argument("--summarize-only", action="store_true", help="no measuring: report")
    parser.add_argument("--retry-failed", action="store_true", help="run failed cells again")
    parser.add_argument("--force", action="store_true", help="resume despite a changed setup")
    parser.add_argument("--child-cell", help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.child_cell:
        child_main(json.loads(args.child_cell))
        return
    check_device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.mem_limit_gb is None and args.device == "cpu":
        args.mem_limit_gb = round(0.8 * memory_total_mb("cpu") / 1024, 1)
    widths = [int(w) for w in args.widths.split(",")]
    layers_at = _parse_layers_at(args.layers_at)
    setup = {
        "widths": widths,
        "methods": methods,
        "layers": args.layers,
        "layers_at": {str(k): v for k, v in layers_at.items()},
        "reps": args.reps,
        "batch_size": args.batch_size,
        "seq": args.seq,
        "tokens_per_batch": args.batch_size * args.seq,
        "calib_batches": args.calib_batches,
        "steps": args.steps,
        "rank": args.rank,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "seed": args.seed,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "threads": args.threads or torch.get_num_threads(),
        "mem_limit_gb": args.mem_limit_gb or None,
        "in_process": args.in_process,
        "targets": TARGETS,
    }
    out = Path(args.out)
    path = out / "scaling.json"
    records = load_results(path, setup, args.force)
    if args.summarize_only:
        report(out, setup, records)
        return

    def reps_of(width: int, layers: int, method: str) -> list[dict]:
        return [
            r for r in records if (r["width"], r["layers"], r["method"]) == (width, layers, method)
        ]

    if args.retry_failed:
        records[:] = [r for r in records if r["status"] == "ok"]
    failed_at: dict[str, int] = {}
    for r in records:
        if r["status"] != "ok":
            failed_at[r["method"]] = min(failed_at.get(r["method"], 10**9), r["width"])
    base_spec = {k: setup[k] for k in ("batch_size", "seq", "calib_batches", "steps", "rank")}
    base_spec |= {
        "vocab": args.vocab,
        "dtype": args.dtype,
        "seed": args.seed,
        "device": args.device,
        "threads": args.threads,
        "mem_limit_gb": setup["mem_limit_gb"],
    }
    for width in widths:
        layers = layers_at.get(width, args.layers)
        for rep in range(args.reps):
            for method in methods:
                if failed_at.get(method, 10**9) <= width:
                    continue  # it failed here or at a narrower width
                if any(r["rep"] == rep for r in reps_of(width, layers, method)):
                    continue  # resumable: this repetition is in the JSON
                spec = base_spec | {"width": width, "layers": layers, "method": method, "rep": rep}
                start = time.perf_counter()
                record = (
                    measure_cell(spec) if args.in_process else run_child(spec, args.cell_timeout)
                )
                record["wall_s"] = time.perf_counter() - start
                records.append(record)
                if record["status"] != "ok":
                    failed_at[method] = width
                    print(
                        f"{width}x{layers} {method} rep {rep}: {record['status']} "
                        f"({record.get('reason', '')[:200]})",
                        flush=True,
                    )
                else:
                    print(
                        f"{width}x{layers} {method} rep {rep}: {record['init_s']:.3f} s "
                        f"= {record['time_ratio']:.2f} LoRA steps, extra "
                        f"{record['extra_mb']:.0f} MiB "
                        f"({record['wall_s']:.0f} s wall)",
                        flush=True,
                    )
                save(path, setup, records)
    report(out, setup, records)


if __name__ == "__main__":
    main()
