"""Shared pieces of the benchmarks: the default model and batches, LoRA steps, peak memory."""

from __future__ import annotations

import json
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


def default_setup(n_batches: int, batch_size: int = 32, rank: int = 8, seed: int = 0):
    """MiniLM with a fresh head, its LoRA config (query/key/value/dense) and ``n_batches``
    length-grouped Rotten Tomatoes training batches, exactly as the runner builds them."""
    task = load_task("rotten-tomatoes")
    base, tokenizer = load_model("minilm", task.num_labels, seed=seed)
    data = TokenizedTexts(task.train_texts, task.train_labels, tokenizer, max_length=128)
    loader = train_loader(data, tokenizer.pad_token_id, batch_size, seed=seed)
    batches = [b for _, b in zip(range(n_batches), loader, strict=False)]
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
    for batch in batches:
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
    """Median peak RSS of ``script --child MODE`` runs, each in a fresh process (a process's
    peak only grows, so every measurement needs its own)."""
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
