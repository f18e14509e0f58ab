"""`fisherlora train` data-parallel: two CPU processes (gloo) with batch b each must calibrate and
train as one process with batch 2b (the union of their shares is its batch, without length
grouping: the same examples, the same statistics, the same gradient), and leave one run directory
written by rank 0. And the CLI under `torchrun` and `accelerate launch`."""

import json
import os
import pickle
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, gloo_group, keyword_texts, run_processes

from fisherlora.cli import main
from fisherlora.experiments.tasks import Task
from fisherlora.experiments.train import TrainConfig, train

pytestmark = pytest.mark.filterwarnings("ignore:the calibration loader ran out")
WORLD = 2
# our three methods (sharded calibration, all-reduced statistics, FW-LoRA's collective per
# step) and a PEFT peer (every process calibrates on all batches; DDP broadcasts rank 0's init)
METHODS = ("fim-lora+filet+fw-lora", "lora-ga")


def task() -> Task:
    train_texts, train_labels = keyword_texts(256, seed=0)
    test_texts, test_labels = keyword_texts(50, seed=1)  # 50: the shares are unequal
    return Task("keywords", train_texts, train_labels, test_texts, test_labels, ["neg", "pos"])


def config(method: str, processes: int, out: str | None = None) -> TrainConfig:
    """A global batch of 16 (8 per process for two); two calibration (global) batches."""
    return TrainConfig(
        model="tiny-bert",
        method=method,
        steps=6,
        batch_size=16 // processes,
        group_by_length=False,
        calib_batches=2,
        lr=1e-2,
        eval_every=3,
        max_length=16,
        warmup_ratio=0.0,
        dropout=0.0,
        seed=0,
        device="cpu",
        out=out,
        fw_warmup_steps=3,
    )


def summary(result) -> dict:
    return {
        "adapter": {
            name: value.detach().clone()
            for name, value in result.model.named_parameters()
            if value.requires_grad
        },
        "accuracy": result.metrics["accuracy"],
        "confusion": result.metrics["confusion_matrix"],
        "losses": result.curve["train_loss"].tolist(),
    }


# One intra-op thread in the workers and in the one-process reference alike: LoRA-GA's init
# (both variants) turns the last-bit differences of another thread count's reductions into a
# visibly different run (up to 0.6 in the adapter after 6 steps, measured), while plain LoRA's
# stay at 3e-7.
THREADS = 1


def worker(rank: int, port: int, out: str, queue) -> None:
    torch.set_num_threads(THREADS)
    with gloo_group(rank, port, WORLD):
        results = {
            method: summary(
                train(config(method, WORLD, os.path.join(out, method)), task=task(), progress=False)
            )
            for method in METHODS
        }
        queue.put((rank, pickle.dumps(results)))


def test_two_processes_train_what_one_process_trains_on_their_union(tmp_path):
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = free_port()
    workers = [
        context.Process(target=worker, args=(rank, port, str(tmp_path), queue))
        for rank in range(WORLD)
    ]
    for process in workers:
        process.start()
    results = {rank: pickle.loads(data) for rank, data in (queue.get() for _ in range(WORLD))}
    for process in workers:
        process.join(timeout=300)
        assert process.exitcode == 0

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        singles = {m: summary(train(config(m, 1), task=task(), progress=False)) for m in METHODS}
    finally:
        torch.set_num_threads(threads)
    for method in METHODS:
        single = singles[method]
        for rank in range(WORLD):
            got = results[rank][method]
            assert got["adapter"].keys() == single["adapter"].keys()
            for name, value in single["adapter"].items():
                torch.testing.assert_close(
                    got["adapter"][name], value, rtol=1e-4, atol=1e-5, msg=f"{method} {name}"
                )
            # evaluation: the shares' confusion matrices sum to the whole test set's
            assert got["confusion"] == single["confusion"], method
            assert sum(map(sum, got["confusion"])) == 50
            assert got["losses"] == pytest.approx(single["losses"], rel=1e-4), method
        # rank 0 alone wrote the run directory, and it records the world size
        run = tmp_path / method
        assert (run / "metrics.json").exists() and (run / "adapter").is_dir()
        assert json.loads((run / "config.json").read_text())["world_size"] == WORLD


LAUNCHERS = {
    "torchrun": ["torch.distributed.run", "--nproc-per-node", str(WORLD)],
    # accelerate's multi-process launcher is torchrun underneath; on CPU it needs --multi_gpu
    "accelerate": [
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(WORLD),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ],
}


def launch(launcher: str, flags: list[str]) -> subprocess.CompletedProcess:
    """``fisherlora FLAGS`` started by ``launcher`` with WORLD processes (one thread each)."""
    port = ["--master-port" if launcher == "torchrun" else "--main_process_port", str(free_port())]
    command = [sys.executable, "-m", *LAUNCHERS[launcher], *port, "-m", "fisherlora.cli", *flags]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_the_cli_runs_under_a_launcher_and_prints_once(launcher, small_csv, tmp_path):
    flags = [
        "train",
        "--model",
        "tiny-bert",
        "--method",
        "fim-lora",
        "--data",
        str(small_csv),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--calib-batches",
        "2",
        "--max-length",
        "16",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "run"),
    ]
    done = launch(launcher, flags)
    summaries = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, done.stdout  # printed by rank 0 only
    assert json.loads(summaries[0])["method"] == "fim-lora"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == WORLD
    assert (tmp_path / "run" / "metrics.json").exists()


def test_compare_runs_under_torchrun_and_pins_the_world_size(small_csv, tmp_path, capsys):
    out = tmp_path / "cmp"
    flags = [
        "compare",
        "--model",
        "tiny-bert",
        "--data",
        str(small_csv),
        "--methods",
        "lora,fim-lora",
        "--seeds",
        "0",
        "--rank",
        "4",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--calib-batches",
        "2",
        "--max-length",
        "16",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    done = launch("torchrun", flags)
    assert done.stdout.count("report: ") == 1  # rank 0 only
    assert (out / "report.md").exists() and (out / "results.csv").exists()
    assert len(pd.read_csv(out / "results.csv")) == 2
    assert json.loads((out / "compare.json").read_text())["settings"]["world_size"] == WORLD
    # one process cannot resume a two-process comparison: its batches would differ
    assert main(flags) == 2
    assert "world_size" in capsys.readouterr().err


def nan_worker(rank: int, port: int, queue) -> None:
    with gloo_group(rank, port, WORLD):
        from fisherlora.methods.base import AdapterMethod

        if rank == 1:  # a non-finite loss on one process's share only, from step 2 on
            AdapterMethod.loss = lambda self, model, step: (
                torch.tensor(float("nan")) if step >= 2 else None
            )
        try:
            train(config("lora", WORLD), task=task(), progress=False)
            queue.put((rank, "finished"))
        except FloatingPointError as err:
            queue.put((rank, str(err)))


def test_a_nan_loss_on_one_process_stops_every_process_at_the_same_step():
    # before: that process raised alone, and the other waited in DDP's gradient all-reduce
    # (a crash when its partner exited, a hang until the timeout otherwise)
    messages = run_processes(nan_worker, WORLD)
    assert "the training loss became nan at step 2" in messages[1]
    assert "became nan at step 2" in messages[0] and "in another process" in messages[0]
