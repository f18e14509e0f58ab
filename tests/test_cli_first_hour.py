"""A newcomer's first hour with the command line (issue #16): every mistake is one clear line and
exit code 2 before any work is done, Ctrl-C is one line and exit code 130, and ``--help`` answers
without loading torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_base, tiny_lora_config

from fisherlora.cli import main
from fisherlora.errors import ConfigError

TINY = [
    "--model",
    "tiny-bert",
    "--steps",
    "1",
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


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """``main(args)``: its exit code and its stderr (a KeyboardInterrupt that escapes fails)."""
    try:
        code = main(args)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the command line")
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --- start-up ---------------------------------------------------------------------------------


def test_help_and_argument_errors_do_not_import_torch(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    code = "\n".join(
        [
            "import sys",
            "from fisherlora.cli import main",
            "for argv in (['--help'], ['train', '--help'], ['compare', '--help'],",
            "             ['train', '--rank', 'x'], ['compare'],",
            f"             ['train', '--out', {str(taken)!r}], ['compare', '--out', {str(taken)!r}]):",
            "    try:",
            "        assert main(argv) == 2  # the --out errors",
            "    except SystemExit:",
            "        pass",
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))",
        ]
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"


# --- --out ------------------------------------------------------------------------------------


def test_out_that_is_an_existing_file_is_refused(small_csv, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    code, err = run_cli(["train", *TINY, "--data", str(small_csv), "--out", str(taken)], capsys)
    assert code == 2
    assert "is an existing file" in one_error_line(err)
    assert taken.read_text() == "mine"


def test_out_inside_a_file_is_refused(small_csv, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    out = taken / "run"
    code, err = run_cli(["train", *TINY, "--data", str(small_csv), "--out", str(out)], capsys)
    assert code == 2
    assert "is a file, not a directory" in one_error_line(err)


def test_compare_out_that_is_an_existing_file_is_refused(small_csv, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    args = ["compare", *TINY, "--methods", "lora", "--seeds", "0", "--data", str(small_csv)]
    code, err = run_cli([*args, "--out", str(taken)], capsys)
    assert code == 2
    assert "is an existing file" in one_error_line(err)


def test_out_where_writing_is_not_permitted_is_refused(small_csv, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # root may write anywhere, so the test denies the permission the way the OS reports it
    monkeypatch.setattr(
        os, "access", lambda path, mode: Path(path) != locked and real_access(path, mode)
    )
    out = locked / "run"
    code, err = run_cli(["train", *TINY, "--data", str(small_csv), "--out", str(out)], capsys)
    assert code == 2
    assert "permission denied" in one_error_line(err)
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_out_in_a_read_only_directory_is_refused(small_csv, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = run_cli(
            ["train", *TINY, "--data", str(small_csv), "--out", str(locked / "run")], capsys
        )
    finally:
        locked.chmod(0o700)
    assert code == 2 and "permission denied" in one_error_line(err)


# --- limits of the model ----------------------------------------------------------------------


@pytest.fixture
def long_csv(tmp_path):
    """Texts of about 700 tokens: longer than a 512-position model can read."""
    path = tmp_path / "long.csv"
    rows = [
        " ".join(["word"] * 700) + f" {i} {'good' if i % 2 else 'bad'},{i % 2}" for i in range(24)
    ]
    path.write_text("text,label\n" + "\n".join(rows))
    return path


def test_max_length_above_the_position_limit_is_refused_before_writing(long_csv, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY, "--data", str(long_csv), "--out", str(out), "--max-length", "600"]
    code, err = run_cli(args, capsys)
    assert code == 2
    line = one_error_line(err)
    assert "max_length 600" in line and "512" in line
    assert not (out / "config.json").exists()


def test_position_limits_of_common_architectures():
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2Model,
        LlamaConfig,
        LlamaModel,
        MPNetConfig,
        MPNetModel,
        RobertaConfig,
        RobertaModel,
    )

    from fisherlora.experiments.limits import check_max_length, position_limit

    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}
    small |= {"intermediate_size": 64, "vocab_size": 100}
    assert position_limit(BertModel(BertConfig(**small, max_position_embeddings=128))) == 128
    # RoBERTa and MPNet number positions after the padding index: 130 rows hold 128 tokens
    roberta = RobertaModel(RobertaConfig(**small, max_position_embeddings=130, pad_token_id=1))
    assert position_limit(roberta) == 128
    assert position_limit(MPNetModel(MPNetConfig(**small, max_position_embeddings=130))) == 128
    gpt2 = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=64, vocab_size=100))
    assert position_limit(gpt2) == 64
    llama = LlamaModel(LlamaConfig(**small, num_key_value_heads=2, max_position_embeddings=64))
    assert position_limit(llama) is None  # rotary positions: no table to run out of
    check_max_length(llama, 10_000)
    check_max_length(roberta, 128)
    with pytest.raises(ConfigError, match=r"max_length 129 .* cover 128 tokens"):
        check_max_length(roberta, 129, "roberta")


def test_rank_above_a_target_layer_s_size_is_refused_before_anything(small_csv, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY, "--data", str(small_csv), "--out", str(out), "--rank", "33"]
    code, err = run_cli(args, capsys)
    assert code == 2
    line = one_error_line(err)
    # tiny-bert's smallest targets are its 32 x 32 attention projections
    assert "rank 33" in line and "32 x 32" in line and "rank <= 32" in line
    assert "bert.encoder.layer.0.attention.self.query" in line
    assert not out.exists()


def test_resolve_targets_checks_the_rank_against_every_target():
    from fisherlora.adapters import resolve_targets

    model, targets = tiny_base("bert")
    assert resolve_targets(model, targets, rank=32)  # hidden 32: every target takes rank 32
    with pytest.raises(ConfigError, match=r"rank 100000 .*min\(out, in\) = 32"):
        resolve_targets(model, targets, rank=100_000)
    # the MLP alone is 32 x 64 and 64 x 32: still 32
    with pytest.raises(ConfigError, match="rank 40"):
        resolve_targets(model, ["intermediate.dense"], rank=40)


def test_fim_lora_s_r_max_stops_at_the_smallest_layer():
    from peft import get_peft_model

    from fisherlora.methods.fim_lora import check_budget, plan_ranks

    model, targets = tiny_base("bert")
    peft_model = get_peft_model(model, tiny_lora_config(targets, rank=24))
    with pytest.raises(ConfigError, match=r"r_max 40 .*r_max <= 32"):
        check_budget(peft_model, r_max=40)
    from fisherlora.adapters import lora_layers

    _, layers = lora_layers(peft_model)
    plan = plan_ranks(peft_model, dict.fromkeys(layers, 1.0))
    assert plan.r_max == 32  # the default 2 r = 48, clamped: no layer can use more than 32


# --- Ctrl-C -----------------------------------------------------------------------------------


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_during_calibration_is_one_line_and_exit_130(
    small_csv, tmp_path, capsys, monkeypatch
):
    from fisherlora.methods.fim_lora import FimLoRA

    monkeypatch.setattr(FimLoRA, "prepare", interrupt)
    args = ["train", *TINY, "--method", "fim-lora", "--data", str(small_csv)]
    code, err = run_cli([*args, "--out", str(tmp_path / "run")], capsys)
    assert code == 130
    line = one_error_line(err)
    assert "interrupted" in line and "train run" in line and "restarts" in line


def test_ctrl_c_during_a_comparison_says_it_resumes(small_csv, tmp_path, capsys, monkeypatch):
    import fisherlora.experiments.compare as compare_module

    monkeypatch.setattr(compare_module, "train", interrupt)
    args = ["compare", *TINY, "--methods", "lora", "--seeds", "0", "--data", str(small_csv)]
    code, err = run_cli([*args, "--out", str(tmp_path / "cmp")], capsys)
    assert code == 130
    line = one_error_line(err)
    assert "interrupted" in line and "comparison" in line and "resumes" in line


# --- model names ------------------------------------------------------------------------------


@pytest.fixture
def no_hub_loading(monkeypatch):
    """Loading through transformers fails the test: a bad name must be refused before it."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called: the name was not checked first")

    for cls in (
        transformers.AutoTokenizer,
        transformers.AutoModelForSequenceClassification,
        transformers.AutoModelForCausalLM,
    ):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


def test_an_unreachable_hub_name_is_a_config_error_naming_the_builtins(no_hub_loading, monkeypatch):
    from huggingface_hub import HfApi

    from fisherlora.experiments.causal_models import load_causal_lm
    from fisherlora.experiments.models import load_model

    def offline(self, *args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "model_info", offline)
    with pytest.raises(ConfigError, match=r"'no-such-org/no-such-model'.*minilm.*network access"):
        load_model("no-such-org/no-such-model", 2)
    with pytest.raises(ConfigError, match=r"causal LM.*smollm2-135m.*network access"):
        load_causal_lm("no-such-org/no-such-model")


def test_hub_offline_and_unknown_names_fail_without_a_request(no_hub_loading, monkeypatch):
    from huggingface_hub import HfApi, constants

    from fisherlora.experiments.models import load_model

    def no_request(self, *args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(HfApi, "model_info", no_request)
    with pytest.raises(ConfigError, match="not a hub name"):
        load_model("./no/such/folder", 2)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        load_model("no-such-org/no-such-model", 2)


def test_a_name_the_hub_does_not_have_says_so(no_hub_loading, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    from fisherlora.experiments.models import load_model

    class Response:  # the little of an HTTP response the error reads
        def __init__(self) -> None:
            self.headers: dict[str, str] = {}
            self.status_code = 404
            self.request = None

    def missing(self, *args, **kwargs):
        raise RepositoryNotFoundError("404 Client Error", response=Response())

    monkeypatch.setattr(HfApi, "model_info", missing)
    with pytest.raises(ConfigError, match="the hub has no model of that name"):
        load_model("no-such-org/no-such-model", 2)


# --- refused before anything is written (a probe of the command line) --------------------------


def test_a_refused_train_leaves_the_finished_run_in_its_folder(small_csv, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["train", *TINY, "--data", str(small_csv), "--out", str(out)], capsys)
    assert code == 0, err
    finished = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "metrics.json" in finished
    for bad in (["--r-max", "1000"], ["--r-min", "3", "--r-max", "2"]):
        code, err = run_cli(
            [
                "train",
                *TINY,
                "--data",
                str(small_csv),
                "--out",
                str(out),
                "--method",
                "fim-lora",
                *bad,
            ],
            capsys,
        )
        assert code == 2 and "r_m" in one_error_line(err)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == finished
    fresh = tmp_path / "fresh"
    code, err = run_cli(
        [
            "train",
            *TINY,
            "--data",
            str(small_csv),
            "--out",
            str(fresh),
            "--method",
            "fim-lora",
            "--r-max",
            "1000",
        ],
        capsys,
    )
    assert code == 2 and not (fresh / "config.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weight-decay", "nan"], "weight_decay, max_grad_norm and eval_every must be numbers"),
        (["--max-grad-norm", "nan"], "weight_decay, max_grad_norm and eval_every must be numbers"),
        (["--seeds", ""], "--seeds names nothing"),
        (["--methods", ""], "no method named"),
        (["--methods", "lora,fw-lora", "--fw-lambda", "nan"], "finite lam"),
        (["--methods", "lora,fim-lora", "--r-max", "1000"], "r_max 1000"),
        (["--methods", "lora,fim-lora", "--r-min", "3", "--r-max", "2"], "must not exceed r_max"),
        (["--select-by", "nll"], "--select-by apply to the --lr-grid tuning"),
        (["--tune-seeds", "5"], "--tune-seeds apply to the --lr-grid tuning"),
    ],
)
def test_compare_refuses_settings_every_run_would_fail_on_up_front(
    extra, message, small_csv, tmp_path, capsys
):
    out = tmp_path / "cmp"
    args = ["compare", *TINY, "--data", str(small_csv), "--out", str(out), "--seeds", "0"]
    code, err = run_cli(args + extra, capsys)
    assert code == 2 and message in one_error_line(err)
    assert not (out / "compare.json").exists()


def test_report_only_without_a_comparison_or_suite_is_refused(small_csv, tmp_path, capsys):
    out = tmp_path / "nothing"
    code, err = run_cli(
        ["compare", *TINY, "--data", str(small_csv), "--out", str(out), "--report-only"], capsys
    )
    assert code == 2 and "no comparison in" in one_error_line(err)
    code, err = run_cli(["suite", "cpu", "--out", str(out), "--report-only"], capsys)
    assert code == 2 and "no suite in" in one_error_line(err)
    assert not out.exists()


def test_an_empty_data_file_and_a_suite_file_not_in_utf8_are_named(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    code, err = run_cli(
        ["train", *TINY, "--data", str(empty), "--out", str(tmp_path / "r")], capsys
    )
    assert code == 2 and "empty.csv" in one_error_line(err)
    suite = tmp_path / "latin1.toml"
    suite.write_bytes(b"[suite]\nname = 'caf\xe9'\n")
    code, err = run_cli(["suite", str(suite), "--out", str(tmp_path / "s"), "--dry-run"], capsys)
    assert code == 2 and "not UTF-8" in one_error_line(err)
