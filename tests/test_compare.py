"""``fisherlora compare``: the grid of runs, resuming, failures, the report and its statistics."""

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest

from fisherlora.cli import main
from fisherlora.errors import ConfigError
from fisherlora.experiments import compare as compare_module
from fisherlora.experiments.compare import CompareConfig, compare, parse_ints
from fisherlora.experiments.report import summarize
from fisherlora.experiments.train import TrainConfig


def tiny_comparison(out, methods=("lora", "fim-lora"), seeds=(0, 1), ranks=(4,)) -> CompareConfig:
    base = TrainConfig(
        model="tiny-bert",
        steps=12,
        batch_size=16,
        lr=1e-2,
        eval_every=6,
        max_length=16,
        calib_batches=2,
        device="cpu",
    )
    return CompareConfig(
        methods=list(methods), seeds=list(seeds), ranks=list(ranks), out=str(out), base=base
    )


@pytest.fixture
def patched_task(monkeypatch, keyword_task):
    monkeypatch.setattr(compare_module, "load_task", lambda *a, **k: keyword_task)


def count_training(monkeypatch):
    calls = []
    real_train = compare_module.train

    def counting_train(config, **kwargs):
        calls.append((config.rank, config.method, config.seed))
        return real_train(config, **kwargs)

    monkeypatch.setattr(compare_module, "train", counting_train)
    return calls


def test_comparison_writes_results_report_and_plots(tmp_path, patched_task):
    config = tiny_comparison(tmp_path, ranks=(2, 4))
    report = compare(config, progress=False, command="fisherlora compare ...")
    runs = pd.read_csv(tmp_path / "results.csv")
    assert len(runs) == 2 * 2 * 2
    assert set(zip(runs["rank"], runs["method"], runs["seed"], strict=True)) == {
        (r, m, s) for r in (2, 4) for m in ("lora", "fim-lora") for s in (0, 1)
    }
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["summary"]) == 4 and results["failed"] == []
    # alpha follows the rank (s = 2 at every rank)
    settings = json.loads((tmp_path / "r2/lora/seed0/config.json").read_text())["settings"]
    assert settings["rank"] == 2 and settings["alpha"] == 4
    text = report.read_text()
    for column in (
        "trainable params",
        "accuracy",
        "MCC",
        "macro-F1",
        "Δ acc vs LoRA",
        "p (paired)",
        "init s",
        "median step s",
        "peak MB",
        "total s",
    ):
        assert column in text
    for png in (
        "learning_curves_r4",
        "accuracy_r4",
        "runtime_r4",
        "confusion_r4",
        "memory_r2",
        "rank_map_r2_fim-lora",
    ):
        assert (tmp_path / "plots" / f"{png}.png").stat().st_size > 1000, png
        assert f"plots/{png}.png" in text
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list((tmp_path / "plots").glob("*.png")))
    assert "src='plots/" not in page  # self-contained


def test_the_noise_note_counts_the_examples_evaluated_not_the_test_split(
    tmp_path, patched_task, keyword_task
):
    config = tiny_comparison(tmp_path, methods=("lora",), seeds=(0,))
    config.base.max_test = 10
    assert len(keyword_task.test_texts) > 10
    text = compare(config, progress=False).read_text()
    assert "One run's accuracy on 10 held-out examples" in text


def test_rerun_skips_finished_runs_and_redoes_only_unfinished_ones(
    tmp_path, patched_task, monkeypatch
):
    config = tiny_comparison(tmp_path)
    compare(config, progress=False)
    finished = tmp_path / "r4/lora/seed1/metrics.json"
    stamp = finished.stat().st_mtime_ns
    calls = count_training(monkeypatch)
    compare(config, progress=False)
    assert calls == [] and finished.stat().st_mtime_ns == stamp
    (tmp_path / "r4/fim-lora/seed0/metrics.json").unlink()  # as if interrupted in that run
    compare(config, progress=False)
    assert calls == [(4, "fim-lora", 0)]


def test_an_interrupt_leaves_finished_runs_intact_and_the_current_one_unfinished(
    tmp_path, patched_task, monkeypatch
):
    config = tiny_comparison(tmp_path)
    real_train = compare_module.train

    def interrupted(cfg, **kwargs):
        if cfg.method == "fim-lora":
            raise KeyboardInterrupt
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(compare_module, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare(config, progress=False)
    assert (tmp_path / "r4/lora/seed0/metrics.json").exists()
    assert not (tmp_path / "r4/fim-lora/seed0/metrics.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_failing_run_is_recorded_reported_and_retried(tmp_path, patched_task, monkeypatch):
    config = tiny_comparison(tmp_path, seeds=(0,))
    real_train = compare_module.train

    def failing(cfg, **kwargs):
        if cfg.method == "fim-lora":
            raise RuntimeError("out of memory (simulated)")
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(compare_module, "train", failing)
    report = compare(config, progress=False)
    assert "out of memory (simulated)" in (tmp_path / "r4/fim-lora/seed0/error.txt").read_text()
    assert "FAILED r = 4 fim-lora seed 0" in report.read_text()
    monkeypatch.setattr(compare_module, "train", real_train)  # the failure is gone
    calls = count_training(monkeypatch)
    compare(config, progress=False)
    assert calls == [(4, "fim-lora", 0)]
    assert not (tmp_path / "r4/fim-lora/seed0/error.txt").exists()


def test_changed_settings_cannot_resume_into_the_same_directory(tmp_path, patched_task):
    compare(tiny_comparison(tmp_path, seeds=(0,), methods=("lora",)), progress=False)
    changed = tiny_comparison(tmp_path, seeds=(0,), methods=("lora",))
    changed.base.steps = 13
    with pytest.raises(ConfigError, match=r"other settings \(\['steps'\]\)"):
        compare(changed, progress=False)


def test_summary_pairs_seeds_and_marks_differences_within_noise():
    rows = []
    for seed, (base, small, large) in enumerate(
        [(0.80, 0.802, 0.850), (0.81, 0.809, 0.862), (0.79, 0.793, 0.845)]
    ):
        for method, acc in (("lora", base), ("small", small), ("large", large)):
            rows.append(
                {
                    "rank": 8,
                    "method": method,
                    "seed": seed,
                    "accuracy": acc,
                    "mcc": acc,
                    "macro_f1": acc,
                    "trainable_params": 10,
                    "adapter_params": 8,
                    "init_s": 0.0,
                    "median_step_s": 0.1,
                    "train_s": 1.0,
                    "eval_s": 1.0,
                    "peak_memory_mb": 1.0,
                    "total_s": 2.0,
                }
            )
    config = SimpleNamespace(ranks=[8], methods=["lora", "small", "large"])
    summary = summarize(pd.DataFrame(rows), config, n_test=2000).set_index("method")
    assert summary.loc["small", "delta_vs_lora"] == pytest.approx((0.002 - 0.001 + 0.003) / 3)
    assert summary.loc["small", "note"] == "within noise"
    assert summary.loc["large", "delta_vs_lora"] == pytest.approx((0.05 + 0.052 + 0.055) / 3)
    assert summary.loc["large", "p_value"] < 0.01
    assert summary.loc["large", "note"] == "better than LoRA"
    assert summary.loc["lora", "note"] == "baseline" and math.isnan(summary.loc["lora", "p_value"])
    assert summary.loc["large", "accuracy_std"] == pytest.approx(
        pd.Series([0.850, 0.862, 0.845]).std()
    )


@pytest.mark.parametrize(
    "spec, message",
    [("a,b", "whole numbers"), ("", "names nothing"), ("1,1", "twice"), ("-1", ">= 0")],
)
def test_seed_lists_that_do_not_parse_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_ints(spec, "--seeds", minimum=0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--methods", "lora,nonsense"], "unknown method 'nonsense'"),
        (["--methods", "pissa+filet"], "cannot be combined"),
        (["--seeds", "0,x"], "--seeds must be comma-separated whole numbers"),
        (["--ranks", "0,2"], "--ranks must be >= 1"),
    ],
)
def test_cli_names_the_bad_flag(flags, message, tmp_path, capsys):
    code = main(["compare", "--model", "tiny-bert", "--out", str(tmp_path), *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "compare.json").exists()  # nothing started


def test_cli_quick_preset_fills_only_what_is_not_given(tmp_path):
    from fisherlora.cli import build_parser, compare_config_from_args

    args = build_parser().parse_args(["compare", "--quick", "--out", str(tmp_path)])
    config = compare_config_from_args(args)
    assert config.methods == compare_module.QUICK["methods"].split(",")
    assert config.seeds == [0] and config.ranks == [8]
    assert config.base.steps == 150 and config.base.eval_every == 75
    args = build_parser().parse_args(
        ["compare", "--quick", "--steps", "40", "--seeds", "3,4", "--out", str(tmp_path)]
    )
    config = compare_config_from_args(args)
    assert config.base.steps == 40 and config.seeds == [3, 4]
