"""``fisherlora compare``: the grid of runs, resuming, failures, the report and its statistics."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from fisherlora.cli import main
from fisherlora.errors import ConfigError, FisherLoraError
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
    monkeypatch.setattr(compare_module, "load_data", lambda *a, **k: keyword_task)


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
    # strict JSON: a bare NaN or Infinity would be handed to parse_constant
    results = json.loads(
        (tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c)
    )
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
        "95 % CI of Δ",
        "p (paired)",
        "verdict",
        "Δ below one run's SE",
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


def test_a_report_rewritten_without_the_per_run_figures_keeps_its_rank_maps(
    tmp_path, patched_task, monkeypatch
):
    # per-run PNGs are not committed with the results: a report rewritten in a fresh clone
    # draws the rank map again from the run's ranks.json, with the ranks the run trained with
    import fisherlora.experiments.report as report_module

    config = tiny_comparison(tmp_path, methods=("lora", "fim-lora"), seeds=(0,))
    compare(config, progress=False)
    run_dir = tmp_path / "r4/fim-lora/seed0"
    (run_dir / "rank_map.png").unlink()
    (tmp_path / "plots/rank_map_r4_fim-lora.png").unlink()
    drawn = []
    real_plot = report_module.plot_module_values
    monkeypatch.setattr(
        report_module,
        "plot_module_values",
        lambda values, path, **k: (
            drawn.append((dict(values), k["title"])) or real_plot(values, path, **k)
        ),
    )
    calls = count_training(monkeypatch)
    text = compare(config, progress=False).read_text()
    assert calls == []  # nothing trained again
    assert drawn == [
        (json.loads((run_dir / "ranks.json").read_text())["ranks"], "fim-lora rank map")
    ]
    assert (tmp_path / "plots/rank_map_r4_fim-lora.png").stat().st_size > 1000
    assert "plots/rank_map_r4_fim-lora.png" in text


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


@pytest.mark.parametrize("lr_grid", [None, [1e-3, 3e-3]])
def test_resuming_rewrites_an_unchanged_compare_json_byte_for_byte(tmp_path, lr_grid):
    config = tiny_comparison(tmp_path, seeds=(0,), methods=("lora",))
    if lr_grid:
        config.lr_grid, config.tune_seeds = lr_grid, [100]
    compare_module.check_out_dir(config)
    pinned = tmp_path / "compare.json"
    first = pinned.read_bytes()
    for _ in range(2):  # resumed twice: the keys keep the config's order, nothing is added
        compare_module.check_out_dir(config)
        assert pinned.read_bytes() == first
    assert list(json.loads(first)["settings"]) == list(config.shared_settings())
    # a file from before some settings existed still resumes (their legacy values), and is then
    # written as the config gives them
    old = json.loads(first)
    for key in ("precision", "val_fraction", "max_dropped_fraction"):
        del old["settings"][key]
    pinned.write_text(json.dumps(old, indent=2))
    compare_module.check_out_dir(config)
    assert pinned.read_bytes() == first


def test_data_or_model_a_run_cannot_use_is_refused_before_the_folder_is_pinned(
    tmp_path, patched_task, monkeypatch
):
    # before: compare.json was written first, so the corrected rerun was refused as "other
    # settings"; and an unknown model failed in every run's error.txt with exit status 0
    calls = count_training(monkeypatch)
    too_big = tiny_comparison(tmp_path, seeds=(0,), methods=("lora",))
    too_big.base.train_size = 10**6
    with pytest.raises(ConfigError, match="train size 1000000 is larger"):
        compare(too_big, progress=False)
    no_model = tiny_comparison(tmp_path, seeds=(0,), methods=("lora",))
    no_model.base.model = "tiny-bertt"
    with pytest.raises(ConfigError, match="unknown model 'tiny-bertt'"):
        compare(no_model, progress=False)
    no_target = tiny_comparison(tmp_path, seeds=(0,), methods=("lora",))
    no_target.base.targets = ["no_such_module"]
    with pytest.raises(ConfigError, match="no_such_module"):
        compare(no_target, progress=False)
    assert calls == [] and not list(tmp_path.iterdir())  # nothing written
    compare(tiny_comparison(tmp_path, seeds=(0,), methods=("lora",)), progress=False)
    assert calls == [(4, "lora", 0)]


def test_a_comparison_in_which_every_run_failed_is_an_error(tmp_path, patched_task, monkeypatch):
    def failing(cfg, **kwargs):
        raise RuntimeError("diverged (simulated)")

    monkeypatch.setattr(compare_module, "train", failing)
    config = tiny_comparison(tmp_path, seeds=(0,))
    with pytest.raises(FisherLoraError, match="no run of the comparison finished"):
        compare(config, progress=False)
    assert "FAILED r = 4 lora seed 0" in (tmp_path / "report.md").read_text()  # still reported


def test_a_variant_that_needs_a_setting_the_base_lacks_is_refused_up_front(tmp_path):
    # fw-lora-decay fixes FW-LoRA's decay form, which needs weight decay: refused when the
    # comparison is made, not in the optimizer of each run
    with pytest.raises(ConfigError, match="fw-lora-decay: FW-LoRA's decay form"):
        tiny_comparison(tmp_path, methods=("lora", "fw-lora-decay"))
    with pytest.raises(ConfigError, match="decay form"):
        TrainConfig(method="fim-lora+fw-lora-decay")
    assert TrainConfig(method="fw-lora-decay", weight_decay=0.01).weight_decay == 0.01
    assert TrainConfig(method="fw-lora", fw_mode="decay", weight_decay=0.01).fw_mode == "decay"


def per_seed_results(accuracies: dict[str, list[float]], rank: int = 8) -> pd.DataFrame:
    """Runs with the given accuracy per seed (MCC and macro-F1 set to the same value)."""
    rows = []
    for method, values in accuracies.items():
        for seed, acc in enumerate(values):
            rows.append(
                {
                    "rank": rank,
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
    return pd.DataFrame(rows)


def summary_of(accuracies: dict[str, list[float]], n_test: int = 2000) -> pd.DataFrame:
    config = SimpleNamespace(ranks=[8], methods=list(accuracies))
    return summarize(per_seed_results(accuracies), config, n_test=n_test).set_index("method")


LORA = [0.800, 0.810, 0.790, 0.805, 0.795]


def test_a_paired_interval_that_excludes_zero_is_significant_even_below_one_runs_se():
    # EVA's case at r = 8: a consistent −0.4 point difference, p < 0.05, but |Δ| < one run's
    # SE (≈ 0.009 on 2,000 examples): the old rule called it "within noise" next to p = 0.009
    diffs = [-0.004, -0.003, -0.005, -0.004, -0.0035]
    summary = summary_of({"lora": LORA, "eva": [a + d for a, d in zip(LORA, diffs, strict=True)]})
    eva = summary.loc["eva"]
    assert eva["delta_vs_lora"] == pytest.approx(sum(diffs) / 5)
    assert eva["ci_high"] < 0 and eva["p_value"] < 0.05
    assert eva["verdict"] == "significant: worse than LoRA"
    assert eva["below_one_run_se"] is True
    # every outcome gets the same treatment (here MCC and macro-F1 equal accuracy)
    assert eva["mcc_verdict"] == eva["macro_f1_verdict"] == "significant: worse than LoRA"
    assert eva["mcc_ci_high"] == pytest.approx(eva["ci_high"])
    assert summary.loc["lora", "verdict"] == "baseline"
    assert math.isnan(summary.loc["lora", "p_value"])


def test_a_paired_interval_that_contains_zero_is_not_significant():
    diffs = [0.010, -0.008, 0.012, -0.004, 0.006]
    small = [0.002, -0.001, 0.003, 0.001, 0.000]
    summary = summary_of(
        {
            "lora": LORA,
            "noisy": [a + d for a, d in zip(LORA, diffs, strict=True)],
            "small": [a + d for a, d in zip(LORA, small, strict=True)],
        }
    )
    for method in ("noisy", "small"):
        row = summary.loc[method]
        assert row["ci_low"] < 0 < row["ci_high"] and row["p_value"] >= 0.05
        assert row["verdict"] == "not significant"
    assert summary.loc["noisy", "delta_vs_lora"] == pytest.approx(0.0032)


def test_the_interval_is_mean_plus_minus_t_sd_over_root_n_and_agrees_with_the_paired_t_test():
    from scipy import stats

    from fisherlora.experiments.report import paired_t

    diffs = [0.01, 0.02, 0.03, 0.00]
    # by hand: mean 0.015; sd = √((0.005² + 0.005² + 0.015² + 0.015²) / 3) = √(0.0005 / 3);
    # t(0.975, 3) = 3.1824 (t table)
    mean, sd, t_975_3 = 0.015, math.sqrt(0.0005 / 3), 3.1824
    half = t_975_3 * sd / math.sqrt(4)
    result = paired_t(diffs)
    assert result.delta == pytest.approx(mean)
    assert result.ci_low == pytest.approx(mean - half, abs=1e-5)
    assert result.ci_high == pytest.approx(mean + half, abs=1e-5)
    assert result.pairs == 4 and not result.significant
    # the same t statistic gives the p-value: scipy's paired test on the underlying pairs
    base = [0.80, 0.81, 0.79, 0.80]
    ours = [b + d for b, d in zip(base, diffs, strict=True)]
    assert result.p_value == pytest.approx(stats.ttest_rel(ours, base).pvalue, rel=1e-6)
    # p < 0.05 exactly when the interval excludes 0, on both sides of the boundary
    for shift in (0.0, 0.0045, 0.0065, 0.05):
        moved = paired_t([d + shift for d in diffs])
        assert moved.significant == (moved.p_value < 0.05)
    assert paired_t([d + 0.0065 for d in diffs]).significant  # mean 0.0215 > half 0.0205
    assert not paired_t([d + 0.0045 for d in diffs]).significant  # mean 0.0195
    # a seed that did not record the outcome is no pair: dropped, not a p of 0
    with_gap = paired_t([*diffs, math.nan])
    assert with_gap.pairs == 4 and with_gap.p_value == pytest.approx(result.p_value)


def test_equal_differences_from_few_seeds_are_no_evidence_but_from_five_they_are():
    from fisherlora.experiments.report import ZERO_SPREAD_MIN_PAIRS, paired_t

    # two seeds each one test sentence better: a zero-width interval that excludes 0
    few = paired_t([0.0005] * 2)
    assert few.ci_low == few.ci_high == pytest.approx(0.0005)
    assert few.no_spread and not few.significant
    assert few.verdict == "cannot tell: 2 seeds, all the same difference"
    enough = paired_t([0.0005] * ZERO_SPREAD_MIN_PAIRS)
    assert not enough.no_spread and enough.significant
    assert enough.verdict == "significant: better than LoRA"
    # a spread is judged by its interval whatever the count
    assert paired_t([0.0005, 0.0010]).no_spread is False


def test_results_json_is_strict_json_and_keeps_never_reached_apart_from_not_recorded():
    from fisherlora.experiments.report import json_safe

    records = [{"steps": math.inf, "nll": math.nan, "low": -math.inf, "seed": np.int64(3)}]
    text = json.dumps(json_safe(records), allow_nan=False)
    assert json.loads(text) == [{"steps": "inf", "nll": None, "low": "-inf", "seed": 3}]


def test_one_seed_has_no_interval():
    summary = summary_of({"lora": [0.80], "other": [0.85]})
    row = summary.loc["other"]
    assert row["verdict"] == "1 seed: no interval"
    assert row["delta_vs_lora"] == pytest.approx(0.05)
    assert math.isnan(row["ci_low"]) and math.isnan(row["ci_high"]) and math.isnan(row["p_value"])
    # stated separately from the verdict: 0.05 is more than one run's SE
    assert row["below_one_run_se"] is False
    from fisherlora.experiments.report import display_table

    shown = display_table(summary.reset_index()).set_index("method").loc["other"]
    assert shown["95 % CI of Δ"] == "–" and shown["p (paired)"] == "–"
    assert shown["verdict"] == "1 seed: no interval"


def test_equal_differences_on_every_seed_make_a_point_interval():
    from fisherlora.experiments.report import ZERO_SPREAD_MIN_PAIRS, paired_t

    five = paired_t([0.002] * ZERO_SPREAD_MIN_PAIRS)
    assert five.significant and five.p_value == 0 and five.ci_low == five.ci_high
    same = paired_t([0.0] * ZERO_SPREAD_MIN_PAIRS)
    assert not same.significant and same.p_value == 1 and same.verdict == "not significant"
    # float noise in accuracies that are equal counts does not pass for a difference
    assert not paired_t([0.8 - 0.7 - 0.1, 0.0, 0.1 + 0.2 - 0.3]).significant


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
        (["--rank", "0"], "--rank must be >= 1"),
        (["--methods", "lora,fw-lora-decay"], "fw-lora-decay: FW-LoRA's decay form"),
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


def test_the_table_shows_the_adapter_parameters_still_in_effect_after_pruning():
    from fisherlora.experiments.report import display_table, summarize

    results = per_seed_results({"lora": LORA, "adalora": LORA})
    results["effective_adapter_params"] = [8] * 5 + [5] * 5  # AdaLoRA masked 3 of its 8
    config = SimpleNamespace(ranks=[8], methods=["lora", "adalora"])
    shown = display_table(summarize(results, config, n_test=2000)).set_index("method")
    assert shown.loc["adalora", "adapter params"] == "8 (5 in effect)"
    assert shown.loc["lora", "adapter params"] == "8"
    # runs that predate the count show the adapter parameters alone
    shown = display_table(
        summarize(
            per_seed_results({"lora": LORA}),
            SimpleNamespace(ranks=[8], methods=["lora"]),
            n_test=2000,
        )
    )
    assert list(shown["adapter params"]) == ["8"]


def test_steps_to_loras_final_accuracy_count_the_seeds_that_never_got_there(tmp_path):
    from fisherlora.experiments.report import display_table, steps_to_lora_final

    def runs_with_curves(curves: dict[str, list[list[float]]]) -> pd.DataFrame:
        """One run per method and seed whose validation curve (at steps 10, 20, 30, 40) is
        given; its final validation accuracy is the curve's last point."""
        runs = per_seed_results({m: [0.8] * len(c) for m, c in curves.items()})
        dirs, finals = [], []
        for method, seed in zip(runs["method"], runs["seed"], strict=True):
            curve = curves[method][seed]
            run_dir = tmp_path / f"{method}-{seed}-{len(curve)}-{sum(curve)}"
            run_dir.mkdir(exist_ok=True)
            steps = [10 * (k + 1) for k in range(len(curve))]
            frame = pd.DataFrame({"step": steps, "split": "validation", "accuracy": curve})
            # an evaluation of another split is not read
            frame.loc[len(frame)] = {"step": 10, "split": "test", "accuracy": 1.0}
            frame.to_csv(run_dir / "curve.csv", index=False)
            dirs.append(str(run_dir))
            finals.append(curve[-1])
        return runs.assign(run_dir=dirs, val_accuracy=finals, val_auc=0.7)

    def shown(runs: pd.DataFrame) -> str:
        runs = runs.assign(steps_to_lora_final=steps_to_lora_final(runs))
        config = SimpleNamespace(ranks=[8], methods=["lora", "other"])
        table = display_table(summarize(runs, config, n_test=2000)).set_index("method")
        return table.loc["other", "steps to LoRA's final val acc"]

    lora = [[0.5, 0.6, 0.7, 0.8]] * 5
    # LoRA ends at 0.8: seeds 0-2 reach it at steps 20, 40, 40; seeds 3-4 never do
    other = [
        [0.6, 0.8, 0.9, 0.9],
        [0.5, 0.6, 0.7, 0.8],
        [0.5, 0.6, 0.7, 0.85],
        [0.7, 0.7, 0.7, 0.7],
        [0.6, 0.79, 0.79, 0.79],
    ]
    runs = runs_with_curves({"lora": lora, "other": other})
    assert steps_to_lora_final(runs)[5:] == [20, 40, 40, math.inf, math.inf]
    assert steps_to_lora_final(runs)[:5] == [40] * 5  # LoRA reaches its own final at its end
    assert shown(runs) == "40 (3/5)"
    # one seed got there at step 10, four never did: not "10", which would read as fast
    early_then_never = [[0.9, 0.9, 0.9, 0.9]] + [[0.5, 0.5, 0.5, 0.5]] * 4
    assert shown(runs_with_curves({"lora": lora, "other": early_then_never})) == (
        "never for half or more (1/5)"
    )
    never = [[0.5, 0.5, 0.5, 0.5]] * 2
    assert shown(runs_with_curves({"lora": lora[:2], "other": never})) == "never"
    # no LoRA run with a validation curve for these seeds: nothing to compare with
    unpaired = runs_with_curves({"lora": lora[:2], "other": other[:2]})
    unpaired.loc[unpaired["method"] == "lora", "val_accuracy"] = math.nan
    assert shown(unpaired) == "–"
