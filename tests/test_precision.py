"""The runner's precision (#17): weights load in float32 whatever dtype a checkpoint was saved in,
``--precision bf16|fp16`` trains under autocast with float32 master weights (fp16 with a
GradScaler, also on CPU), a bad value is refused, and a non-finite loss names the precision."""

import dataclasses
import json

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from fisherlora.cli import main
from fisherlora.errors import ConfigError
from fisherlora.experiments.models import load_model
from fisherlora.experiments.precision import check_precision, nonfinite_loss_message
from fisherlora.experiments.train import TrainConfig, train
from fisherlora.methods import fw_lora
from fisherlora.methods.base import AdapterMethod

CHEAP = ["--steps", "4", "--batch-size", "8", "--max-length", "16", "--eval-every", "2"]


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    """A tiny BERT classifier saved in float16 with a tokenizer: what ``--model <folder>`` reads
    (as MiniLM's weights are stored in some installs)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fisherlora.experiments.models import minilm_path

    folder = tmp_path_factory.mktemp("fp16-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
    )
    BertForSequenceClassification(config).half().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with safe_open(folder / "model.safetensors", "pt") as stored:
        assert {stored.get_tensor(k).dtype for k in stored.keys()} == {torch.float16}  # noqa: SIM118
    return folder


def cli_train(args, capsys):
    code = main(["train", *CHEAP, "--device", "cpu", "--no-progress", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def losses(run_dir) -> pd.Series:
    return pd.read_csv(run_dir / "curve.csv")["train_loss"]


def test_an_fp16_checkpoint_loads_in_float32(fp16_folder):
    model, _ = load_model(str(fp16_folder), 2)
    dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
    assert dtypes == {torch.float32}


def test_an_fp16_checkpoint_trains_at_the_default_precision(
    fp16_folder, small_csv, tmp_path, capsys
):
    out = tmp_path / "run"
    code, stdout, err = cli_train(
        ["--model", str(fp16_folder), "--data", str(small_csv), "--out", str(out)], capsys
    )
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["method"] == "lora"
    assert losses(out).notna().all() and (losses(out).abs() < 100).all()
    assert json.loads((out / "config.json").read_text())["settings"]["precision"] == "fp32"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_trains_on_cpu_with_float32_master_weights(
    precision, small_csv, keyword_task, monkeypatch
):
    config = TrainConfig(
        model="tiny-bert",
        method="fw-lora",
        steps=6,
        batch_size=16,
        lr=1e-2,
        eval_every=3,
        max_length=16,
        fw_warmup_steps=3,  # warm-up statistics under autocast, then the penalty
        device="cpu",
        precision="fp32",
    )
    reference = train(config, task=keyword_task, progress=False)
    scalers = []
    penalty_init = fw_lora.FisherPenalty.__init__
    # what every LoRA layer's forward pass ran under: (autocast on, its dtype, the output dtype).
    # A run that ignored --precision would match the fp32 reference exactly and pass the
    # tolerance checks below; these hooks see that it did not.
    autocasts = []

    def record_autocast(module, inputs, output):
        autocasts.append(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), output.dtype)
        )

    def recording_init(self, *args, **kwargs):
        scalers.append(kwargs.get("grad_scaler"))
        penalty_init(self, *args, **kwargs)
        for layer in self.layers.values():
            layer.register_forward_hook(record_autocast)

    monkeypatch.setattr(fw_lora.FisherPenalty, "__init__", recording_init)
    steps = []
    scaler_step = torch.amp.GradScaler.step
    monkeypatch.setattr(
        torch.amp.GradScaler,
        "step",
        lambda self, *a, **k: steps.append(self.get_scale()) or scaler_step(self, *a, **k),
    )
    config = dataclasses.replace(config, precision=precision)
    result = train(config, task=keyword_task, progress=False)
    # the same run as at fp32 up to half-precision rounding (measured: within 3e-5)
    assert result.curve["train_loss"].notna().all()
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert len(autocasts) >= config.steps  # training and evaluation forward passes
    assert set(autocasts) == {(True, half, half)}
    for key in ("train_loss", "nll"):
        assert result.curve[key].tolist() == pytest.approx(reference.curve[key].tolist(), abs=2e-3)
    assert result.metrics["nll"] == pytest.approx(reference.metrics["nll"], abs=2e-3)
    trainable = [p for p in result.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    if precision == "fp16":  # loss scaling, and FW-LoRA divides by the scale it used
        assert len(steps) == config.steps and scalers and scalers[0] is not None
    else:
        assert steps == [] and scalers == [None]


def test_bf16_through_the_cli(small_csv, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli_train(
        [
            "--model",
            "tiny-bert",
            "--data",
            str(small_csv),
            "--precision",
            "bf16",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    assert losses(out).notna().all()
    assert json.loads((out / "config.json").read_text())["settings"]["precision"] == "bf16"


def test_a_bad_precision_is_refused(small_csv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "tiny-bert", "--data", str(small_csv), "--precision", "fp8"])
    assert exit_info.value.code == 2
    assert "--precision" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="precision must be one of"):
        TrainConfig(precision="half")
    with pytest.raises(ConfigError, match="precision must be one of"):
        check_precision("int8", torch.device("cpu"))


def test_a_nan_loss_names_the_precision(small_csv, capsys, monkeypatch):
    def nan_from_step_2(self, model, step):
        return torch.tensor(float("nan")) if step >= 2 else None

    monkeypatch.setattr(AdapterMethod, "loss", nan_from_step_2)
    code, _, err = cli_train(
        ["--model", "tiny-bert", "--data", str(small_csv), "--precision", "bf16"], capsys
    )
    assert code == 2
    assert "at step 2 under bf16 autocast; try --precision fp32, or a lower --lr" in err
    assert "--precision bf16 or fp32" in nonfinite_loss_message(float("inf"), 5, "fp16")
    # at fp32 the message is what it was: the learning rate is the likely cause
    assert nonfinite_loss_message(float("nan"), 2, "fp32") == (
        "the training loss became nan at step 2; try a lower --lr"
    )


def test_a_comparison_pinned_before_precision_existed_still_resumes(tmp_path):
    from fisherlora.experiments.compare import CompareConfig, check_out_dir

    def comparison(precision: str) -> CompareConfig:
        base = TrainConfig(model="tiny-bert", device="cpu", precision=precision)
        return CompareConfig(methods=["lora"], seeds=[0], ranks=[4], out=str(tmp_path), base=base)

    check_out_dir(comparison("fp32"))
    pinned = tmp_path / "compare.json"
    older = json.loads(pinned.read_text())
    assert older["settings"].pop("precision") == "fp32"
    pinned.write_text(json.dumps(older))  # as a comparison from before --precision wrote it
    check_out_dir(comparison("fp32"))
    pinned.write_text(json.dumps(older))
    with pytest.raises(ConfigError, match="precision"):
        check_out_dir(comparison("bf16"))


def test_steps_the_fp16_scaler_skips_are_counted_and_warned_about(
    keyword_task, monkeypatch, capsys
):
    # a scale so large that every scaled gradient overflows: every optimizer step is skipped,
    # which before left no trace (the collapse warning then blamed the steps or the rate)
    import fisherlora.experiments.train as train_module

    monkeypatch.setattr(
        train_module,
        "grad_scaler",
        lambda precision, device: torch.amp.GradScaler(device.type, init_scale=2.0**127),
    )
    config = TrainConfig(
        model="tiny-bert",
        method="lora",
        steps=6,
        batch_size=16,
        eval_every=3,
        max_length=16,
        device="cpu",
        precision="fp16",
    )
    result = train(config, task=keyword_task, progress=False)
    assert result.metrics["skipped_steps"] == 6
    assert "skipped 6 of 6 optimizer steps" in capsys.readouterr().err
    fp32 = train(dataclasses.replace(config, precision="fp32"), task=keyword_task, progress=False)
    assert fp32.metrics["skipped_steps"] == 0
