import json

import pandas as pd
import pytest
import torch
from peft import PeftModel

from fisherlora.experiments.models import load_model
from fisherlora.experiments.train import TrainConfig, train


def tiny_config(tmp_path=None, **overrides) -> TrainConfig:
    settings = dict(
        model="tiny-bert",
        steps=60,
        batch_size=16,
        lr=1e-2,
        eval_every=30,
        max_length=16,
        warmup_ratio=0.0,
        seed=0,
        device="cpu",
    )
    if tmp_path is not None:
        settings["out"] = str(tmp_path)
    return TrainConfig(**(settings | overrides))


def test_loop_learns_a_learnable_task(keyword_task):
    result = train(tiny_config(steps=120), task=keyword_task, progress=False)
    # 0.914 accuracy / 0.28 NLL on CPU, 0.891 accuracy on an H100 (other kernels, other rounding):
    # accuracy on 128 examples moves in steps of 0.008, so the bar leaves a few examples' room and
    # the smoother NLL (0.693 at chance) holds the rest
    assert result.metrics["accuracy"] >= 0.85
    assert result.metrics["nll"] < 0.45
    assert result.curve["train_loss"].iloc[-1] < 0.5 * result.curve["train_loss"].iloc[0] + 0.1
    assert list(result.curve["step"]) == [30, 60, 90, 120]


def test_same_seed_reproduces_the_run_and_another_seed_does_not(keyword_task):
    first = train(tiny_config(steps=20, eval_every=10), task=keyword_task, progress=False)
    second = train(tiny_config(steps=20, eval_every=10), task=keyword_task, progress=False)
    other = train(tiny_config(steps=20, eval_every=10, seed=1), task=keyword_task, progress=False)
    pd.testing.assert_frame_equal(
        first.curve.drop(columns="wall_time_s"), second.curve.drop(columns="wall_time_s")
    )
    for (name, a), (_, b) in zip(
        first.model.named_parameters(), second.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    assert not first.curve["train_loss"].equals(other.curve["train_loss"])


def test_run_directory_holds_every_artifact_and_the_adapter_reloads(tmp_path, keyword_task):
    result = train(tiny_config(tmp_path, steps=10, eval_every=5), task=keyword_task, progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json",
        "metrics.json",
        "curve.csv",
        "adapter",
    }
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["settings"]["rank"] == 8 and config["settings"]["targets"] == [
        "query",
        "key",
        "value",
        "dense",
    ]
    assert {"torch", "transformers", "peft"} <= set(config["versions"])
    assert {"fisherlora_commit", "fisherlora_dirty"} <= set(config["versions"])  # provenance
    assert config["task"]["train"] == len(keyword_task.train_texts)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    timings = metrics["timings"]
    parts = ("build_s", "init_s", "train_s", "eval_s")  # disjoint parts of the run, in order
    assert timings.keys() == {*parts, "median_step_s", "total_s", "peak_memory_mb"}
    assert 0 < timings["median_step_s"] <= timings["train_s"]  # ten steps timed
    assert timings["eval_s"] > 0  # two evaluations, timed apart from training
    assert timings["total_s"] >= sum(timings[key] for key in parts)
    assert timings["peak_memory_mb"] > 0
    assert sum(map(sum, metrics["confusion_matrix"])) == len(keyword_task.test_texts)
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert list(curve.columns) == [
        "step",
        "train_loss",
        "extra_loss",
        "split",
        "accuracy",
        "macro_f1",
        "mcc",
        "nll",
        "wall_time_s",
    ]
    assert set(curve["split"]) == {"test"}  # no validation split: the evaluations read test

    # Stock PEFT on a fresh copy of the base model reproduces the trained model's logits.
    base, tokenizer = load_model("tiny-bert", 2, seed=0)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    trained = result.model.eval()
    batch = tokenizer(keyword_task.test_texts[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batch).logits, trained(**batch).logits, rtol=0, atol=1e-6
        )


def test_gradient_accumulation_matches_one_big_batch(keyword_task):
    # tiny-bert has no dropout and the plain loader draws one permutation per pass, so two
    # accumulated micro-batches of 8 see exactly the examples of one batch of 16.
    config = dict(steps=3, eval_every=1, dropout=0.0, group_by_length=False)
    whole = train(
        tiny_config(batch_size=16, grad_accum=1, **config), task=keyword_task, progress=False
    )
    split = train(
        tiny_config(batch_size=8, grad_accum=2, **config), task=keyword_task, progress=False
    )
    assert whole.metrics["trainable_params"] > whole.metrics["adapter_params"] > 0
    torch.testing.assert_close(
        torch.tensor(split.curve["train_loss"].values),
        torch.tensor(whole.curve["train_loss"].values),
        rtol=1e-4,
        atol=1e-5,
    )


def test_llama_style_model_trains(keyword_task):
    result = train(
        tiny_config(model="tiny-llama", steps=5, eval_every=0), task=keyword_task, progress=False
    )
    assert result.metrics["method"] == "lora"
    assert result.curve["train_loss"].notna().all()
    # B starts at zero: a B that is not zero everywhere was updated by the optimizer
    b_factors = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert b_factors and all(p.abs().sum() > 0 for p in b_factors)
    lora_modules = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1]
        for n, _ in result.model.named_parameters()
        if "lora_A" in n
    }
    assert lora_modules == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_non_finite_loss_stops_the_run_with_a_clear_error(keyword_task):
    with pytest.raises(FloatingPointError, match="lower --lr"):
        train(
            tiny_config(steps=5, lr=1e30, eval_every=0, max_grad_norm=0.0),
            task=keyword_task,
            progress=False,
        )


def test_every_run_reports_how_much_of_its_initial_input_subspace_it_kept(
    keyword_task, monkeypatch
):
    from fisherlora.adapters import input_factors, row_space_kept
    from fisherlora.experiments import train as train_module

    untouched, _ = load_model("tiny-bert", num_labels=2, seed=0)
    assert input_factors(untouched) is None  # not a PeftModel: nothing to measure
    taken = []  # the copies of A the runner takes after the init

    def recording(model):
        factors = input_factors(model)
        taken.append(factors)
        return factors

    monkeypatch.setattr(train_module, "input_factors", recording)
    short = train(tiny_config(steps=2, lr=1e-5), task=keyword_task, progress=False)
    longer = train(tiny_config(steps=40), task=keyword_task, progress=False)
    assert len(taken) == 2
    for result, initial in zip((short, longer), taken, strict=True):
        # the figure is the mean over layers of row_space_kept from A after the init to A now
        kept = row_space_kept(initial, result.model)
        assert len(kept) == len(initial) > 0
        assert result.metrics["a_row_space_kept"] == pytest.approx(
            sum(kept.values()) / len(kept), rel=1e-6
        )
    # hardly trained: A still reads its initial directions; trained at a large rate: less so
    assert short.metrics["a_row_space_kept"] > 0.99
    assert longer.metrics["a_row_space_kept"] < short.metrics["a_row_space_kept"]
    adalora = train(tiny_config(steps=4, method="adalora"), task=keyword_task, progress=False)
    assert "a_row_space_kept" not in adalora.metrics  # AdaLoRA's SVD form has no plain A


def test_source_revision_records_the_commit_and_is_none_outside_a_checkout(tmp_path, monkeypatch):
    import shutil
    import subprocess

    from fisherlora.experiments import train as train_module
    from fisherlora.experiments.train import library_versions, source_revision

    unknown = {"fisherlora_commit": None, "fisherlora_dirty": None}
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no checkout above tmp_path
    assert source_revision(plain) == unknown
    assert source_revision(tmp_path / "missing") == unknown
    assert set(unknown) <= set(library_versions())  # config.json's versions carry both keys
    if shutil.which("git"):
        repo = tmp_path / "repo"
        (repo / "pkg").mkdir(parents=True)
        (repo / "pkg" / "code.py").write_text("x = 1\n")
        (repo / "ignored").mkdir()  # like a virtual environment inside a checkout
        (repo / "ignored" / "site.py").write_text("")

        def git(*args):
            return subprocess.run(
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                cwd=repo,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()

        git("init", "-q")
        git("add", "pkg")
        git("commit", "-q", "-m", "one")
        head = git("rev-parse", "HEAD")
        assert source_revision(repo / "pkg") == {
            "fisherlora_commit": head,
            "fisherlora_dirty": False,
        }
        (repo / "pkg" / "code.py").write_text("x = 2\n")
        assert source_revision(repo / "pkg")["fisherlora_dirty"] is True
        assert source_revision(repo / "ignored") == unknown  # not the checkout's files

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(train_module.subprocess, "run", no_git)
    assert source_revision() == unknown

    def hangs(*args, **kwargs):
        raise subprocess.TimeoutExpired("git", train_module.GIT_TIMEOUT_S)

    monkeypatch.setattr(train_module.subprocess, "run", hangs)
    assert source_revision() == unknown
