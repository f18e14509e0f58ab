"""Errors instead of tracebacks: every bad input gets exit code 2 and a message naming it."""

import json
import re

import pytest
import torch

from fisherlora.cli import main
from fisherlora.errors import ConfigError
from fisherlora.experiments.train import TrainConfig

TINY = [
    "train",
    "--model",
    "tiny-bert",
    "--steps",
    "2",
    "--batch-size",
    "4",
    "--max-length",
    "16",
    "--eval-every",
    "0",
    "--no-progress",
    "--device",
    "cpu",
]


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_on_a_users_csv_prints_a_summary(small_csv, tmp_path, capsys):
    code, out, _ = run_cli(
        [*TINY, "--data", str(small_csv), "--out", str(tmp_path / "run")], capsys
    )
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    # the printed summary is the run's own metrics.json (its scores, total time to 0.1 s)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["method"] == metrics["method"] == "lora"
    assert {"accuracy", "macro_f1", "mcc", "nll"} <= summary.keys()
    assert summary == {
        **{k: metrics[k] for k in summary if k != "total_s"},
        "total_s": round(metrics["timings"]["total_s"], 1),
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "no-such-task"], "no-such-task"),
        (
            ["--method", "magic"],
            r"unknown method 'magic'.*'adalora', 'corda', 'dora', 'eva', 'filet', "
            r".*'filet-svd', .*'fim-lora'",
        ),
        (["--model", "/no/such/model"], r"unknown model '/no/such/model'.*minilm"),
        (["--targets", "query,nonexistent"], r"'nonexistent' matches no module.*query"),
        (["--targets", "LayerNorm"], "not nn.Linear"),
        (["--targets", " , "], "names no module"),
        (["--rank", "0"], "rank must be a positive"),
        (["--steps", "-3"], "steps must be a positive"),
        (["--batch-size", "0"], "batch_size must be a positive"),
        (["--lr", "0"], "lr must be a positive"),
        (["--lr", "nan"], "lr must be a positive"),
        (["--grad-accum", "0"], "grad_accum must be a positive"),
        (["--dropout", "1.5"], "dropout must be in"),
        pytest.param(
            ["--device", "cuda:7"],
            "cuda",
            # an error without CUDA and wherever torch sees fewer than 8 GPUs
            marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="cuda:7 exists here"),
        ),
    ],
)
def test_bad_input_is_an_error_not_a_traceback(extra, message, small_csv, capsys):
    args = [*TINY, *extra] if "--task" in extra else [*TINY, "--data", str(small_csv), *extra]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert err.startswith("fisherlora: error:")
    assert re.search(message, err), err


def test_missing_file_and_column_are_named(tmp_path, small_csv, capsys):
    code, _, err = run_cli([*TINY, "--data", str(tmp_path / "missing.csv")], capsys)
    assert code == 2 and "not found" in err
    code, _, err = run_cli([*TINY, "--data", str(small_csv), "--label-column", "stars"], capsys)
    assert code == 2 and "no column 'stars'" in err


def test_single_class_data_is_rejected(tmp_path, capsys):
    path = tmp_path / "one.csv"
    path.write_text("text,label\n" + "\n".join(f"t{i},pos" for i in range(20)))
    code, _, err = run_cli([*TINY, "--data", str(path)], capsys)
    assert code == 2 and "at least two" in err


def test_config_validation_rejects_fractional_counts():
    with pytest.raises(ConfigError, match="whole number"):
        TrainConfig(steps=2.5)


def test_unknown_subcommand_exits_with_usage():
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2
