"""Shared pieces of the benchmarks: the default model and batches, LoRA steps, peak memory.

Every benchmark takes ``--device cpu|cuda`` (:func:`add_device_argument`; default cpu). On CUDA
a timed region starts and ends with :func:`sync` (kernels run asynchronously: without it a time
measures the launches, not the work), and :func:`peak_memory_mb` is
``torch.cuda.max_memory_allocated`` instead of the process's peak resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig

from fisherlora.experiments.batching import TokenizedTexts, train_loader
from fisherlora.experiments.models import default_targets, load_model
from fisherlora.experiments.tasks import load_task


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the model and batches live (cuda: synchronised timings, GPU peak memory)",
    )


def check_device(device: str) -> torch.device:
    """``device`` as a torch device; a clear exit where CUDA is asked for but absent."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return torch.device(device)


def run_setting(args: argparse.Namespace, **more: object) -> dict:
    """What a result file records of its run: the command-line options, the model and task
    (MiniLM on Rotten Tomatoes, the benchmarks' default), ``more``, the device (with the GPU's
    name), torch's CPU threads, when it started, the 1-minute load average then (a timing taken
    beside other work shows it) and the source commit (``fisherlora_commit``/``_dirty``)."""
    from fisherlora.experiments.train import source_revision

    device = getattr(args, "device", "cpu")
    return vars(args) | {
        "model": "minilm",
        "task": "rotten-tomatoes",
        **more,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        **source_revision(),
    }


def sync(device: str | torch.device) -> None:
    """Wait for the queued GPU work (nothing to wait for on CPU); call on both ends of a timing."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new GPU peak-memory window (a CPU process's peak RSS cannot be reset here)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: str | torch.device) -> float:
    """``torch.cuda.max_memory_allocated`` on CUDA; the process's peak RSS on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def default_setup(
    n_batches: int, batch_size: int = 32, rank: int = 8, seed: int = 0, device: str = "cpu"
):
    """MiniLM with a fresh head, its LoRA config (query/key/value/dense) and ``n_batches``
    length-grouped Rotten Tomatoes training batches, exactly as the runner builds them; the model
    and the batches on ``device``."""
    task = load_task("rotten-tomatoes")
    base, tokenizer = load_model("minilm", task.num_labels, seed=seed)
    data = TokenizedTexts(task.train_texts, task.train_labels, tokenizer, max_length=128)
    loader = train_loader(data, tokenizer.pad_token_id, batch_size, seed=seed)
    batches = [
        {k: v.to(device) for k, v in b.items()}
        for _, b in zip(range(n_batches), loader, strict=False)
    ]
    base.to(device)
    config = LoraConfig(
        task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, target_modules=default_targets(base)
    )
    return base, config, batches


def training_steps(model, batches, extra_loss=None, after_step=None) -> list[float]:
    """One AdamW step per batch (forward, backward, clip, step); the wall time of each step."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    times = []
    device = next(model.parameters()).device
    for batch in batches:
        sync(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        if extra_loss is not None:
            loss = loss + extra_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if after_step is not None:
            after_step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_peak_memory(
    script: str, modes: list[str], reps: int, extra_args: list[str]
) -> dict[str, float]:
    """Median peak memory of ``script --child MODE`` runs, each in a fresh process (a process's
    peak only grows, so every measurement needs its own): peak RSS, or the GPU's peak allocation
    where ``extra_args`` hold ``--device cuda`` and the child reports :func:`peak_memory_mb`."""
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(reps):
        for mode in modes:
            command = [sys.executable, script, "--child", mode, *extra_args]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(output.strip().splitlines()[-1])["peak_mb"])
    return {mode: statistics.median(values) for mode, values in runs.items()}


def write_results(out: str | Path, setup: dict, results: list) -> None:
    """``{"setup", "versions", "results"}`` as indented JSON at ``out`` (folders made)."""
    from fisherlora.experiments.train import library_versions

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"setup": setup, "versions": library_versions(), "results": results}
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
