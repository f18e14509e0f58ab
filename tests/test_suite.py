"""``fisherlora suite``: the suite file, the dry run, the pooled statistics and the report."""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fisherlora.cli import main
from fisherlora.errors import ConfigError
from fisherlora.experiments.suite import run_suite
from fisherlora.experiments.suite_estimate import (
    STEP_TIMES,
    estimate_run_seconds,
    estimate_suite,
    pause_robust_seconds,
)
from fisherlora.experiments.suite_file import Suite, load_suite, parse_suite
from fisherlora.experiments.suite_report import write_suite_report
from fisherlora.experiments.suite_stats import cell_differences, pooled_differences
from fisherlora.experiments.train import TrainConfig

TINY_SUITE = """
[suite]
name = "tiny"
description = "two cells"

[defaults]
model = "tiny-bert"
methods = ["lora", "fim-lora"]
seeds = [0, 1]
steps = 6
batch_size = 16
max_length = 16
calib_batches = 2
eval_every = 3
lr = 0.01
device = "cpu"

[[cell]]
name = "grid"
task = "rotten-tomatoes"
rank = 4
lr_grid = [0.01, 0.03]
tune_seeds = [100]

[[cell]]
name = "plain"
task = "rotten-tomatoes"
ranks = [2]
methods = "lora,fim-lora"
"""


def write(tmp_path, text: str, name: str = "suite.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def cell_toml(**keys) -> str:
    """A suite of one cell (named "c" unless ``name`` is given) on the tiny model."""
    keys = {"name": "c"} | keys
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keys.items())
    return f'[defaults]\nmodel = "tiny-bert"\n\n[[cell]]\n{body}\n'


# --- the suite file ---------------------------------------------------------------------------


def test_cells_are_the_defaults_with_their_own_keys_over_them(tmp_path):
    suite = load_suite(str(write(tmp_path, TINY_SUITE)))
    assert suite.name == "tiny" and suite.description == "two cells"
    grid, plain = suite.cells
    assert (grid.name, plain.name) == ("grid", "plain")
    assert grid.settings["steps"] == 6 and grid.settings["model"] == "tiny-bert"
    assert grid.ranks == [4] and plain.ranks == [2]
    assert grid.methods == plain.methods == ["lora", "fim-lora"]  # list or comma string
    assert grid.lr_grid == [0.01, 0.03] and plain.lr_grid is None
    # the suite's validation share, and TrainConfig's defaults for what nobody set
    assert grid.settings["val_fraction"] == 0.1
    assert grid.settings["warmup_ratio"] == TrainConfig().warmup_ratio
    # tuning runs: 2 methods x 2 rates x 1 seed; final: 2 methods x 2 seeds
    assert grid.run_counts() == (4, 4) and plain.run_counts() == (0, 4)
    assert suite.run_counts() == (4, 8)
    config = grid.compare_config(tmp_path / "out" / "grid")
    assert config.base.steps == 6 and config.base.val_fraction == 0.1
    assert config.ranks == [4] and config.seeds == [0, 1]
    assert config.lr_grid == [0.01, 0.03] and config.tune_seeds == [100]


def test_unknown_keys_are_refused_naming_them_and_the_file(tmp_path):
    path = write(
        tmp_path, TINY_SUITE.replace("rank = 4\n", "rank = 4\nstepz = 3\nlearning_rate = 1\n")
    )
    with pytest.raises(ConfigError) as err:
        load_suite(str(path))
    message = str(err.value)
    assert str(path) in message and "cell 'grid'" in message
    assert "learning_rate, stepz" in message and "known keys are" in message


@pytest.mark.parametrize(
    "text, named",
    [
        ('[defaults]\nmodle = "x"\n[[cell]]\nname = "c"\n', "[defaults]: unknown key modle"),
        ('[suite]\ntitle = "x"\n[[cell]]\nname = "c"\n', "[suite]: unknown key title"),
        ('[cells]\nname = "c"\n', "unknown top-level key cells"),
    ],
)
def test_unknown_keys_are_refused_in_every_table(tmp_path, text, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_suite(str(write(tmp_path, text)))


def test_a_language_modelling_task_picks_by_nll_and_is_refused_where_a_cell_ranks_by_accuracy():
    lm = {"task": "rotten-tomatoes-lm", "model": "smollm2-135m", "lr_grid": [1e-3, 3e-3]}
    with pytest.raises(ConfigError, match=r"cell 'c'.*rotten-tomatoes-lm.*by accuracy"):
        parse_suite(cell_toml(**lm, select_by="accuracy"), "s.toml")
    (cell,) = parse_suite(cell_toml(**lm), "s.toml").cells
    assert cell.compare_config("out").selection == "nll"
    with pytest.raises(ConfigError, match="select_by must be one of accuracy, nll"):
        parse_suite(cell_toml(select_by="f1"), "s.toml").cells[0].compare_config("out")


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"method": "lora"}, "does not set method"),
        ({"seed": 3}, "does not set seed"),
        ({"steps": "100"}, "steps must be int, got str"),
        ({"rslora": 1}, "rslora must be bool"),
        ({"lr": True}, "lr must be"),
        ({"rank": 2, "ranks": [2, 4]}, "rank or ranks, not both"),
        ({"methods": ["fim-lora", "filet"]}, "must include 'lora'"),
        ({"methods": ["lora", "nope"]}, "unknown method 'nope'"),
        ({"seeds": [0, 0]}, "lists a value twice"),
        ({"lr_grid": [1e-3, -1.0]}, "rates must be positive"),
        ({"lr_grid": [1e-3], "val_fraction": 0.0}, "val_fraction must be in (0, 0.5]"),
        ({"val_fraction": 0.0}, "val_fraction must be in (0, 0.5]"),  # no grid: still refused
        ({"val_fraction": 0.6}, "val_fraction must be in (0, 0.5]"),
        ({"val_fraction": "0.1"}, "val_fraction must be"),
        ({"steps": 0}, "steps must be a positive number"),  # TrainConfig's own check
        ({"name": "a/b"}, "a cell name is a directory name"),
        ({"name": "suite.json"}, "starting with 'suite' are the suite's own files"),
        ({"name": "Suite_plots"}, "starting with 'suite' are the suite's own files"),
        ({"methods": []}, "methods names nothing"),  # was: every method, silently
    ],
)
def test_bad_cells_are_refused_naming_the_cell(keys, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_suite(cell_toml(**keys), "s.toml")


def test_two_cells_with_one_name_and_a_suite_without_cells_are_refused():
    with pytest.raises(ConfigError, match="two cells are named 'c'"):
        parse_suite('[[cell]]\nname = "c"\n[[cell]]\nname = "c"\n', "s.toml")
    with pytest.raises(ConfigError, match=r"two cells are named 'C' \(case ignored\)"):
        parse_suite('[[cell]]\nname = "c"\n[[cell]]\nname = "C"\n', "s.toml")
    with pytest.raises(ConfigError, match="no \\[\\[cell\\]\\] entries"):
        parse_suite("[defaults]\nsteps = 3\n", "s.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_suite("[[cell]\n", "s.toml")


def test_an_unknown_suite_is_refused(tmp_path, capsys):
    assert main(["suite", str(tmp_path / "missing.toml"), "--dry-run"]) == 2
    assert "not a built-in suite (cpu, gpu) and no such file" in capsys.readouterr().err


# --- the built-in suites and the dry run --------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_built_in_suites_parse_and_dry_run_without_training(name, tmp_path, capsys):
    suite = load_suite(name)
    assert suite.cells and all(s.settings["lr_grid"] for s in suite.cells)
    assert main(["suite", name, "--dry-run", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    for cell in suite.cells:
        assert cell.name in printed
    tune, final = suite.run_counts()
    assert f"total: {tune + final} runs ({tune} tuning + {final} final)" in printed
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_the_cpu_suite_fits_about_twelve_hours_on_the_measured_cpu():
    suite = load_suite("cpu")
    table = estimate_suite(suite)
    assert table["est_hours"].notna().all()
    # about 12 h: 12.7 h since the paper's LoRA-GA joined beside PEFT's (2026-12-03, 26 runs)
    assert 6 <= table["est_hours"].sum() <= 13.0
    methods = {m for c in suite.cells for m in c.methods}
    assert {"lora", "fim-lora", "filet", "fw-lora", "fim-lora+filet+fw-lora"} <= methods
    assert any(c.settings["model"] == "smollm2-135m" for c in suite.cells)
    assert all(len(c.seeds) == 5 for c in suite.cells)
    for c in suite.cells:  # rt-r1's grid was widened after its picks sat at the top rate
        assert c.lr_grid[:3] == [3e-4, 1e-3, 3e-3] and c.tune_seeds == [100], c.name
    assert [c.lr_grid[3:] for c in suite.cells if c.name == "rt-r1"] == [[1e-2]]


def test_the_gpu_suite_has_no_cpu_estimate_but_counts_its_runs(capsys):
    table = estimate_suite(load_suite("gpu"))
    assert table["est_hours"].isna().all() and (table["runs"] > 0).all()


def test_the_estimate_is_the_measured_step_time_times_the_steps():
    ref = STEP_TIMES["minilm"]
    settings = TrainConfig(model="minilm", task="rotten-tomatoes", eval_every=0).__dict__.copy()
    settings |= {"val_fraction": 0.0, "max_length": ref.max_length, "batch_size": ref.batch_size}
    short = estimate_run_seconds(settings | {"steps": 100}, "lora", "final")
    long = estimate_run_seconds(settings | {"steps": 300}, "lora", "final")
    assert long - short == pytest.approx(200 * ref.seconds)
    # a batch twice as large costs twice as much per step; DoRA's steps cost more than LoRA's
    double = estimate_run_seconds(
        settings | {"steps": 300, "batch_size": 2 * ref.batch_size}, "lora", "final"
    )
    assert double - long == pytest.approx(300 * ref.seconds)
    assert estimate_run_seconds(settings | {"steps": 300}, "dora", "final") > long
    # calibration methods pay their calibration; an unmeasured model has no estimate
    assert estimate_run_seconds(settings | {"steps": 300}, "corda", "final") > long
    assert estimate_run_seconds(settings | {"model": "roberta-base"}, "lora", "final") is None


def test_the_dry_run_counts_finished_runs_and_scales_every_cell_by_their_measured_time(tmp_path):
    suite = load_suite(str(write(tmp_path, TINY_SUITE)))
    before = estimate_suite(suite, tmp_path / "out").set_index("cell")
    run = tmp_path / "out" / "plain" / "r2" / "lora" / "seed0"
    run.mkdir(parents=True)
    estimate = estimate_run_seconds(suite.cells[1].settings, "lora", "final")
    (run / "metrics.json").write_text(
        json.dumps({"method": "lora", "timings": {"total_s": 10 * estimate}})
    )
    after = estimate_suite(suite, tmp_path / "out").set_index("cell")
    assert after.loc["plain", "done"] == 1 and after.loc["grid", "done"] == 0
    left = before.loc["plain", "est_hours"] - estimate / 3600
    assert after.loc["plain", "est_hours"] == pytest.approx(10 * left)
    # a cell not started goes at the speed the finished runs went (the suite's runs share a CPU)
    assert after.loc["grid", "est_hours"] == pytest.approx(10 * before.loc["grid", "est_hours"])


def test_a_paused_run_counts_its_typical_steps_not_its_wall_clock():

    # 100 steps of a median 0.5 s, 30 s of loading / calibration / evaluation; the run was
    # suspended for an hour, which its train_s and total_s carry
    timings = {"median_step_s": 0.5, "train_s": 3650.0, "total_s": 3680.0}
    assert pause_robust_seconds(timings, {"steps": 100}) == pytest.approx(80.0)
    assert pause_robust_seconds({"total_s": 12.0}, {"steps": 100}) == 12.0  # older runs


# --- pooled statistics ------------------------------------------------------------------------


def synthetic_results(offsets: dict[str, dict[str, list[float]]], cells=("a", "b", "c"), seeds=5):
    """Final runs: LoRA's outcomes drawn per (cell, seed); every other method's are LoRA's plus
    ``offsets[method][outcome][seed]``."""
    rng = np.random.default_rng(1)
    rows = []
    for cell in cells:
        for seed in range(seeds):
            base = {
                "accuracy": 0.8 + 0.02 * rng.standard_normal(),
                "nll": 0.45 + 0.05 * rng.standard_normal(),
                "val_auc": 0.78 + 0.02 * rng.standard_normal(),
            }
            rows.append({"cell": cell, "rank": 8, "method": "lora", "seed": seed} | base)
            for method, by_outcome in offsets.items():
                values = {k: v + by_outcome.get(k, [0.0] * seeds)[seed] for k, v in base.items()}
                rows.append({"cell": cell, "rank": 8, "method": method, "seed": seed} | values)
    frame = pd.DataFrame(rows)
    frame["phase"] = "final"
    return frame


def pooled_row(pooled: pd.DataFrame, method: str, outcome: str) -> pd.Series:
    return pooled[(pooled["method"] == method) & (pooled["outcome"] == outcome)].iloc[0]


def test_a_constant_advantage_pools_to_itself_with_a_ci_that_excludes_zero_and_wins_everywhere():
    results = synthetic_results(
        {"better": {"accuracy": [0.01] * 5, "nll": [-0.02] * 5, "val_auc": [0.01] * 5}}
    )
    pooled = pooled_differences(results)
    acc = pooled_row(pooled, "better", "accuracy")
    assert acc["delta"] == pytest.approx(0.01)
    assert acc["ci_low"] > 0 and acc["ci_low"] == pytest.approx(0.01)
    assert (acc["cells"], acc["pairs"]) == (3, 15)
    assert (acc["wins"], acc["ties"], acc["losses"]) == (3, 0, 0)
    # NLL: Δ = method − LoRA, negative is better, and that is a win
    nll = pooled_row(pooled, "better", "nll")
    assert nll["delta"] == pytest.approx(-0.02) and nll["ci_high"] < 0
    assert (nll["wins"], nll["losses"]) == (3, 0) and "lower is better" in nll["label"]


def test_a_method_equal_to_lora_gets_a_ci_containing_zero_and_ties():
    noise = [0.01, -0.01, 0.02, -0.02, 0.0]  # mean 0 in every cell
    results = synthetic_results(
        {
            "same": {"accuracy": [0.0] * 5, "nll": [0.0] * 5},
            "noisy": {"accuracy": noise, "nll": noise, "val_auc": noise},
        }
    )
    pooled = pooled_differences(results)
    for method in ("same", "noisy"):
        for outcome in ("accuracy", "nll"):
            row = pooled_row(pooled, method, outcome)
            assert row["delta"] == pytest.approx(0.0, abs=1e-12)
            assert row["ci_low"] <= 0 <= row["ci_high"]
            assert (row["wins"], row["ties"], row["losses"]) == (0, 3, 0)
    assert pooled_row(pooled, "noisy", "accuracy")["ci_high"] > 0.001  # a real interval


def test_equal_differences_from_too_few_seeds_cannot_tell_and_do_not_pool():
    # 2 seeds in 1 cell, each one example better: no spread, no evidence (the compare report's
    # words for it), and like a one-seed cell it gives nothing to pool
    results = synthetic_results({"lucky": {"accuracy": [0.0005] * 2}}, cells=("a",), seeds=2)
    per_cell = cell_differences(results)
    row = per_cell[(per_cell["method"] == "lucky") & (per_cell["outcome"] == "accuracy")]
    assert list(row["verdict"]) == ["cannot tell: 2 seeds, all the same difference"]
    assert pooled_differences(results).empty
    # from 5 seeds the same agreement is a win with the point as its interval
    results = synthetic_results({"lucky": {"accuracy": [0.0005] * 5}}, cells=("a",), seeds=5)
    pooled = pooled_row(pooled_differences(results), "lucky", "accuracy")
    assert pooled["ci_low"] == pytest.approx(0.0005) and pooled["wins"] == 1


def test_a_no_spread_cell_from_too_few_seeds_is_left_out_of_the_pooled_interval():
    # cell a: 2 seeds, both +2.0 pp (no spread: no evidence); cell b: 5 seeds, +0.10 pp with a
    # real spread. Pooling a's zero variance in gave +1.05 pp [+0.89, +1.21], "better".
    outcomes = {"accuracy": ("acc", True)}
    d_b = np.array([0.004, -0.003, 0.002, -0.001, 0.003])
    results = paired_rows({"a": np.array([0.02, 0.02]), "b": d_b})
    row = pooled_differences(results, outcomes).iloc[0]
    alone = pooled_differences(paired_rows({"b": d_b}), outcomes).iloc[0]
    assert (row["cells"], row["cell_names"], row["pairs"]) == (1, "b", 5)
    for column in ("delta", "ci_low", "ci_high"):  # as if cell a were not there
        assert row[column] == pytest.approx(alone[column])
    assert row["ci_low"] < 0 < row["ci_high"]
    assert (row["wins"], row["ties"], row["losses"], row["no_interval"]) == (0, 1, 0, 1)
    verdicts = cell_differences(results, outcomes).set_index("cell")["verdict"]
    assert verdicts["a"] == "cannot tell: 2 seeds, all the same difference"
    assert verdicts["b"] == "tie"


def test_cells_of_too_few_equal_differences_do_not_add_up_to_evidence():
    # three cells of 2 seeds, each pair +0.2 pp: 6 pairs in all, but no cell is evidence, so
    # there is no pooled interval (it was [+0.002, +0.002], "better", from 0 wins / 3 ties)
    outcomes = {"accuracy": ("acc", True)}
    results = paired_rows({c: np.array([0.002, 0.002]) for c in ("a", "b", "c")})
    assert set(cell_differences(results, outcomes)["verdict"]) == {
        "cannot tell: 2 seeds, all the same difference"
    }
    assert pooled_differences(results, outcomes).empty
    # beside a cell with an interval they are counted without one, and the rest pools alone
    d_d = np.array([0.01, 0.02, 0.03])
    cells = {**{c: np.array([0.002, 0.002]) for c in "abc"}, "d": d_d}
    row = pooled_differences(paired_rows(cells), outcomes).iloc[0]
    alone = pooled_differences(paired_rows({"d": d_d}), outcomes).iloc[0]
    assert (row["cells"], row["cell_names"], row["no_interval"]) == (1, "d", 3)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((alone["ci_low"], alone["ci_high"]))
    # from 5 seeds the same agreement is evidence, and pools as the point
    row = pooled_differences(paired_rows({"a": np.array([0.002] * 5)}), outcomes).iloc[0]
    assert (row["ci_low"], row["ci_high"], row["wins"]) == pytest.approx((0.002, 0.002, 1))


def test_worse_accuracy_and_higher_nll_are_losses():
    results = synthetic_results({"worse": {"accuracy": [-0.03] * 5, "nll": [0.1] * 5}})
    per_cell = cell_differences(results)
    rows = per_cell[per_cell["method"] == "worse"].set_index(["cell", "outcome"])
    assert set(rows["verdict"].xs("accuracy", level="outcome")) == {"loss"}
    assert set(rows["verdict"].xs("nll", level="outcome")) == {"loss"}
    assert rows.loc[("a", "nll"), "delta"] == pytest.approx(0.1)


def test_every_cell_weighs_the_same_whatever_its_seeds_and_tuning_runs_do_not_count():
    from scipy import stats

    rows = []
    for cell, deltas in (("a", [0.09, 0.11]), ("b", [0.0] * 5)):
        for seed, delta in enumerate(deltas):
            rows.append({"cell": cell, "rank": 4, "method": "lora", "seed": seed, "accuracy": 0.7})
            rows.append(
                {"cell": cell, "rank": 4, "method": "m", "seed": seed, "accuracy": 0.7 + delta}
            )
    results = pd.DataFrame(rows).assign(phase="final")
    tuning = results.assign(phase="tune", accuracy=0.0)  # would pull everything to 0
    pooled = pooled_differences(pd.concat([results, tuning]), outcomes={"accuracy": ("acc", True)})
    row = pooled.iloc[0]
    assert row["delta"] == pytest.approx(0.05)  # (0.1 + 0) / 2, not 0.2 / 7
    assert (row["cells"], row["pairs"], row["min_pairs"]) == (2, 7, 2)
    # cell b's 5 differences are all 0 (evidence: no variance); cell a's spread is the interval's
    half = stats.t.ppf(0.975, 1) * (np.std([0.09, 0.11], ddof=1) / math.sqrt(2)) / 2
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.05 - half, 0.05 + half))


def paired_rows(diffs_by_cell: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for cell, diffs in diffs_by_cell.items():
        for seed, d in enumerate(diffs):
            rows.append({"cell": cell, "rank": 8, "method": "lora", "seed": seed, "accuracy": 0.5})
            rows.append({"cell": cell, "rank": 8, "method": "m", "seed": seed, "accuracy": 0.5 + d})
    return pd.DataFrame(rows)


def test_the_pooled_interval_is_welch_t_over_the_cells_and_one_cell_gives_its_own_interval():
    from scipy import stats

    d_a, d_b = np.array([0.0, 0.02, 0.04]), np.array([0.01, -0.01, 0.03, 0.05])
    outcomes = {"accuracy": ("acc", True)}
    row = pooled_differences(paired_rows({"a": d_a, "b": d_b}), outcomes).iloc[0]
    v = np.array([d_a.var(ddof=1) / 3, d_b.var(ddof=1) / 4])  # by hand
    se = math.sqrt(v.sum()) / 2
    dof = v.sum() ** 2 / (v[0] ** 2 / 2 + v[1] ** 2 / 3)
    delta = (d_a.mean() + d_b.mean()) / 2
    half = stats.t.ppf(0.975, dof) * se
    assert row["delta"] == pytest.approx(delta)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((delta - half, delta + half))
    assert row["cell_names"] == "a, b" and row["unpaired"] == 0
    # one cell: exactly that cell's paired t interval (and so its verdict)
    alone = pooled_differences(paired_rows({"b": d_b}), outcomes).iloc[0]
    cell = cell_differences(paired_rows({"b": d_b}), outcomes).iloc[0]
    assert (alone["ci_low"], alone["ci_high"]) == pytest.approx((cell["ci_low"], cell["ci_high"]))


def test_a_cell_where_a_method_failed_every_seed_counts_its_seeds_unpaired():
    both = paired_rows({"a": np.array([0.01, 0.02, 0.03])})
    lost = paired_rows({"b": np.array([0.0, 0.0])})
    lost = lost[lost["method"] == "lora"]  # m failed on every seed of cell b
    row = pooled_differences(pd.concat([both, lost]), {"accuracy": ("acc", True)}).iloc[0]
    assert (row["cells"], row["cell_names"], row["unpaired"]) == (1, "a", 2)


def test_a_cell_that_leaves_a_method_out_by_design_adds_no_unpaired_seeds():
    both = paired_rows({"a": np.array([0.01, 0.02, 0.03])})
    only_lora = paired_rows({"b": np.array([0.0, 0.0])})
    only_lora = only_lora[only_lora["method"] == "lora"]  # cell b does not plan m
    results = pd.concat([both, only_lora])
    outcomes = {"accuracy": ("acc", True)}
    planned = {"a": ["lora", "m"], "b": ["lora"]}
    row = pooled_differences(results, outcomes, planned=planned).iloc[0]
    assert row["unpaired"] == 0
    # where b plans m and m has no run there, its two seeds are unpaired (it failed)
    row = pooled_differences(results, outcomes, planned=planned | {"b": ["lora", "m"]}).iloc[0]
    assert row["unpaired"] == 2


def test_a_failed_run_is_counted_as_an_unpaired_seed():
    results = paired_rows({"a": np.array([0.01, 0.02, 0.03, 0.0])})
    results = results[~((results["method"] == "m") & (results["seed"] == 3))]  # its run failed
    row = pooled_differences(results, {"accuracy": ("acc", True)}).iloc[0]
    assert (row["pairs"], row["unpaired"]) == (3, 1)


def test_one_seed_has_no_interval_and_missing_outcomes_are_skipped():
    results = synthetic_results({"m": {"accuracy": [0.01]}}, seeds=1).drop(columns=["val_auc"])
    results["nll"] = math.nan
    per_cell = cell_differences(results)
    assert set(per_cell["outcome"]) == {"accuracy"}
    assert set(per_cell["verdict"]) == {"no interval"}
    assert pooled_differences(results).empty  # one seed per cell: nothing to resample


def test_a_cell_with_one_paired_seed_is_left_out_of_the_pooled_interval():
    many = synthetic_results({"m": {"accuracy": [0.01, 0.02, 0.03]}}, cells=("a", "b"), seeds=3)
    one = synthetic_results({"m": {"accuracy": [0.5]}}, cells=("c",), seeds=1)
    pooled = pooled_row(pooled_differences(pd.concat([many, one])), "m", "accuracy")
    alone = pooled_row(pooled_differences(many), "m", "accuracy")
    assert pooled["cells"] == 2 and pooled["no_interval"] == 1
    for column in ("delta", "ci_low", "ci_high"):  # as if cell c were not there
        assert pooled[column] == pytest.approx(alone[column])


# --- the report -------------------------------------------------------------------------------


def fake_cell(out, cell: str, frame: pd.DataFrame, picked: dict[str, float] | None = None):
    """A cell directory as compare leaves it: results.csv (tuning and final rows), picked_lr.csv."""
    cell_dir = out / cell
    cell_dir.mkdir(parents=True)
    rows = frame[frame["cell"] == cell].drop(columns=["cell"]).copy()
    rows["lr"] = [picked.get(m, 5e-4) if picked else 5e-4 for m in rows["method"]]
    rows["trainable_params"] = 12_345
    rows["run_dir"] = "somewhere"
    tune = rows.assign(phase="tune", accuracy=math.nan, nll=math.nan, seed=100)
    pd.concat([tune, rows]).to_csv(cell_dir / "results.csv", index=False)
    if picked:
        pd.DataFrame(
            [
                {"rank": 8, "method": m, "lr": lr, "val_accuracy": 0.8, "val_nll": 0.4}
                for m, lr in picked.items()
            ]
        ).to_csv(cell_dir / "picked_lr.csv", index=False)


SUITE_FOR_REPORT = """
[suite]
name = "report-test"

[defaults]
model = "tiny-bert"
methods = ["lora", "fim-lora", "filet"]
seeds = [0, 1, 2, 3, 4]
rank = 8

[[cell]]
name = "a"

[[cell]]
name = "b"

[[cell]]
name = "c"

[[cell]]
name = "broken"
"""


@pytest.fixture
def report_suite(tmp_path):
    path = write(tmp_path, SUITE_FOR_REPORT)
    suite = load_suite(str(path))
    out = tmp_path / "out"
    results = synthetic_results(
        {
            "fim-lora": {"accuracy": [0.01] * 5, "nll": [-0.02] * 5, "val_auc": [0.01] * 5},
            "filet": {},
        }
    )
    fake_cell(out, "a", results, picked={"lora": 1e-3, "fim-lora": 3e-3, "filet": 1e-3})
    fake_cell(out, "b", results)
    fake_cell(out, "c", results)
    (out / "broken").mkdir()
    (out / "broken" / "suite_error.txt").write_text("RuntimeError: out of memory (simulated)\n")
    return suite, out, path


def test_the_report_writes_markdown_html_and_the_final_rows(report_suite):
    suite, out, _ = report_suite
    report = write_suite_report(suite, out, command="fisherlora suite x --out " + "d" * 300)
    text = report.read_text()
    assert "## Pooled over cells" in text and "### a" in text and "### broken" in text
    for column in ("Δ vs LoRA", "95 % CI (Welch t)", "win / tie / loss", "NLL (lower is better)"):
        assert column in text
    assert "3 / 0 / 0" in text and "0 / 3 / 0" in text
    assert "Welch–Satterthwaite" in text and "unpaired seeds" in text
    # the summary: compute per cell, picked rates, pooled Δ, the cells that differ most
    assert (
        "## Summary" in text and "summed run time" in text and "largest accuracy difference" in text
    )
    assert "fewest seeds in a cell" in text
    # per-cell tables: the picked rate, parameters, accuracy ± std, Δ with its interval
    assert "0.003 (picked)" in text and "12,345" in text and " ± " in text
    assert "+0.0100 [+0.0100, +0.0100]" in text
    assert "the comparison failed: RuntimeError: out of memory (simulated)" in text
    assert (out / "suite_plots" / "forest.png").stat().st_size > 1000
    page = (out / "suite_report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and "src='suite_plots" not in page
    assert "white-space:pre-wrap" in page and "overflow-wrap:anywhere" in page
    csv = pd.read_csv(out / "suite_results.csv")
    assert csv.columns[0] == "cell" and set(csv["cell"]) == {"a", "b", "c"}
    assert set(csv["phase"]) == {"final"} and len(csv) == 3 * 3 * 5
    pooled = pd.read_csv(out / "suite_pooled.csv")
    assert set(pooled["method"]) == {"fim-lora", "filet"}


def test_the_cells_that_differ_most_keep_every_rank_of_a_cell(report_suite):
    from fisherlora.experiments.suite_report import summary_tables

    suite, out, _ = report_suite
    # cell a at two ranks differs most at both: a cell with several ranks is one per rank
    per_cell = pd.DataFrame(
        [
            {"cell": c, "rank": r, "method": "m", "outcome": "accuracy", "delta": d}
            for c, r, d in (("a", 4, 0.05), ("a", 8, 0.04), ("a", 8, 0.035), ("b", 8, 0.01))
        ]
    ).assign(pairs=5, ci_low=0.0, ci_high=0.1, verdict="win")
    tables = dict(summary_tables(suite, out, per_cell, pd.DataFrame(), pd.DataFrame()))
    top = next(t for title, t in tables.items() if "largest accuracy difference" in title)
    assert list(top["cell"]) == ["a r4", "a r8", "b r8"]
    assert list(top["Δ acc [95 % CI]"].str.split().str[0]) == ["+0.0500", "+0.0400", "+0.0100"]


def test_the_cells_where_ours_differ_most_leave_out_peers_and_controls(report_suite):
    from fisherlora.experiments.suite_report import summary_tables

    suite, out, _ = report_suite
    rows = (
        ("a", "adalora", -0.20),
        ("b", "random-rank", 0.09),
        ("a", "filet", -0.03),
        ("b", "fim-lora+filet+fw-lora", 0.02),
        ("c", "fw-lora-uniform", 0.01),
        ("c", "fim-lora-batch", -0.015),
    )
    per_cell = pd.DataFrame(
        [{"cell": c, "rank": 8, "method": m, "outcome": "accuracy", "delta": d} for c, m, d in rows]
    ).assign(pairs=5, ci_low=-0.1, ci_high=0.1, verdict="tie")
    tables = dict(summary_tables(suite, out, per_cell, pd.DataFrame(), pd.DataFrame()))
    every = next(t for title, t in tables.items() if "largest accuracy difference" in title)
    ours = next(t for title, t in tables.items() if "one of ours" in title)
    assert list(every["method"]) == ["adalora", "random-rank", "fim-lora-batch"]
    assert list(ours["method"]) == ["filet", "fim-lora+filet+fw-lora", "fim-lora-batch"]
    assert list(ours["cell"]) == ["a r8", "b r8", "c r8"]


def test_the_report_says_cannot_tell_for_a_no_spread_cell(tmp_path):
    path = write(tmp_path, SUITE_FOR_REPORT.replace("[0, 1, 2, 3, 4]", "[0, 1]"))
    suite, out = load_suite(str(path)), tmp_path / "out"
    results = synthetic_results({"fim-lora": {"accuracy": [0.02] * 2}, "filet": {}}, seeds=2)
    for cell in ("a", "b", "c"):
        fake_cell(out, cell, results)
    text = write_suite_report(suite, out).read_text()
    assert "cannot tell: 2 seeds, all the same difference" in text
    assert "reads 'cannot tell'" in text and "fewer than 5 paired seeds" in text


def test_the_compute_table_sums_wall_clock_and_pause_robust_hours_per_cell(report_suite):
    from fisherlora.experiments.suite_report import TYPICAL_HOURS, WALL_HOURS, wall_hours

    suite, out, _ = report_suite
    steps = suite.cells[0].compare_config(out / "a").base.steps
    runs = pd.read_csv(out / "a" / "results.csv")
    # every run: 1 s a step, but the first was suspended for an hour in training
    runs["median_step_s"], runs["train_s"] = 1.0, float(steps)
    runs["total_s"] = steps + 10.0
    runs.loc[0, ["train_s", "total_s"]] = [steps + 3600.0, steps + 3610.0]
    runs.loc[1, ["median_step_s", "train_s"]] = math.nan  # a tuning row carries total_s only
    runs.to_csv(out / "a" / "results.csv", index=False)
    table = wall_hours(suite, out).set_index("cell")
    assert table.loc["a", "runs"] == len(runs)
    assert table.loc["a", WALL_HOURS] == round((len(runs) * (steps + 10) + 3600) / 3600, 2)
    assert table.loc["a", TYPICAL_HOURS] == round(len(runs) * (steps + 10) / 3600, 2)
    assert table.loc["broken", "runs"] == 0 and table.loc["broken", WALL_HOURS] == 0
    # a cell whose every run failed writes a results.csv with no columns (one newline)
    (out / "broken").mkdir(exist_ok=True)
    (out / "broken" / "results.csv").write_text("\n")
    assert wall_hours(suite, out).set_index("cell").loc["broken", "runs"] == 0


def test_report_only_from_the_command_line_trains_nothing(report_suite, monkeypatch, capsys):
    _, out, path = report_suite

    def no_training(*args, **kwargs):
        raise AssertionError("report-only must not train")

    monkeypatch.setattr("fisherlora.experiments.compare.compare", no_training)
    code = main(["suite", str(path), "--out", str(out), "--report-only", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "suite_report.md" in capsys.readouterr().out
    assert (out / "suite_report.html").exists()


def test_a_failing_cell_does_not_stop_the_others(tmp_path, monkeypatch):
    suite = load_suite(str(write(tmp_path, TINY_SUITE)))
    calls = []

    def fake_compare(config, progress=True, command=""):
        calls.append(config.out)
        if config.out.endswith("grid"):
            raise RuntimeError("simulated failure")
        return config.out

    monkeypatch.setattr("fisherlora.experiments.compare.compare", fake_compare)
    report = run_suite(suite, tmp_path / "out", progress=False)
    assert [p.rsplit("/", 1)[1] for p in calls] == ["grid", "plain"]
    assert "simulated failure" in (tmp_path / "out" / "grid" / "suite_error.txt").read_text()
    assert "the comparison failed: RuntimeError: simulated failure" in report.read_text()
    assert json.loads((tmp_path / "out" / "suite.json").read_text())["name"] == "tiny"


def test_cells_runs_only_the_named_cells_and_the_report_still_covers_the_others(
    tmp_path, monkeypatch
):
    suite = load_suite(str(write(tmp_path, TINY_SUITE)))
    calls = []
    monkeypatch.setattr(
        "fisherlora.experiments.compare.compare",
        lambda config, progress=True, command="": calls.append(config.out),
    )
    reported = []
    monkeypatch.setattr(
        "fisherlora.experiments.suite.write_suite_report",
        lambda whole, out, command="": reported.append(whole) or Path(out) / "suite_report.md",
    )
    run_suite(suite, tmp_path / "out", progress=False, cells=["plain"])
    assert [p.rsplit("/", 1)[1] for p in calls] == ["plain"]
    assert [c.name for c in reported[0].cells] == ["grid", "plain"]  # the whole suite
    recorded = json.loads((tmp_path / "out" / "suite.json").read_text())["cells"]
    assert [c["name"] for c in recorded] == ["grid", "plain"]


@pytest.mark.parametrize("cells", ["nope", "plain,plain", ""])
def test_unknown_or_repeated_cells_are_refused_before_anything_runs(
    cells, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(
        "fisherlora.experiments.compare.compare",
        lambda *a, **k: pytest.fail("nothing may run"),
    )
    path = write(tmp_path, TINY_SUITE)
    assert main(["suite", str(path), "--out", str(tmp_path / "out"), "--cells", cells]) == 2
    err = capsys.readouterr().err
    assert "--cells" in err and "'tiny' has grid, plain" in err
    assert not (tmp_path / "out").exists()


def test_a_dry_run_of_some_cells_lists_only_them(tmp_path, capsys):
    path = write(tmp_path, TINY_SUITE)
    assert main(["suite", str(path), "--dry-run", "--cells", "plain"]) == 0
    printed = capsys.readouterr().out
    rows = [line.split()[0] for line in printed.splitlines() if "rotten-tomatoes" in line]
    assert rows == ["plain"]
    assert "total: 4 runs (0 tuning + 4 final)" in printed


def test_a_cell_directory_with_other_settings_is_refused_before_anything_runs(
    tmp_path, monkeypatch
):
    suite = load_suite(str(write(tmp_path, TINY_SUITE)))
    config = suite.cells[1].compare_config(tmp_path / "out" / "plain")
    settings = config.shared_settings() | {"steps": 999}
    (tmp_path / "out" / "plain").mkdir(parents=True)
    (tmp_path / "out" / "plain" / "compare.json").write_text(json.dumps({"settings": settings}))
    monkeypatch.setattr(
        "fisherlora.experiments.compare.compare",
        lambda *a, **k: pytest.fail("nothing may run"),
    )
    with pytest.raises(ConfigError, match=r"cell 'plain'.*other settings \(steps\)"):
        run_suite(suite, tmp_path / "out", progress=False)


def test_a_train_size_the_data_cannot_give_is_refused_before_anything_runs(
    tmp_path, monkeypatch, keyword_task
):
    from fisherlora.experiments import compare as compare_module

    monkeypatch.setattr(compare_module, "load_data", lambda *a, **k: keyword_task)
    text = TINY_SUITE.replace('name = "plain"', 'name = "plain"\ntrain_size = 99999')
    suite = load_suite(str(write(tmp_path, text)))
    monkeypatch.setattr(compare_module, "compare", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(ConfigError, match=r"cell 'plain'.*99999"):
        run_suite(suite, tmp_path / "out", progress=False)


def test_the_suite_command_needs_an_out_directory_unless_dry_run(tmp_path, capsys):
    assert main(["suite", str(write(tmp_path, TINY_SUITE))]) == 2
    assert "--out DIR is required" in capsys.readouterr().err


# --- end to end ---------------------------------------------------------------------------------


def test_a_tiny_suite_runs_end_to_end_and_resumes(tmp_path, monkeypatch, keyword_task):
    from fisherlora.experiments import compare as compare_module

    monkeypatch.setattr(compare_module, "load_data", lambda *a, **k: keyword_task)
    path = write(tmp_path, TINY_SUITE)
    out = tmp_path / "out"
    code = main(["suite", str(path), "--out", str(out), "--no-progress"])
    assert code == 0
    results = pd.read_csv(out / "suite_results.csv")
    assert len(results) == 2 * 2 * 2  # cells x methods x seeds, final runs only
    assert set(results["cell"]) == {"grid", "plain"}
    assert (out / "grid" / "picked_lr.csv").exists()
    text = (out / "suite_report.md").read_text()
    assert "## Pooled over cells" in text and "fim-lora" in text
    assert (out / "suite_report.html").exists()
    # rerunning trains nothing
    trained = []
    real_train = compare_module.train
    monkeypatch.setattr(
        compare_module, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k)
    )
    assert main(["suite", str(path), "--out", str(out), "--no-progress"]) == 0
    assert trained == []
    dry = estimate_suite(Suite("tiny", "", str(path), load_suite(str(path)).cells), out)
    assert dry["done"].tolist() == [8, 4]


def test_a_non_finite_outcome_is_no_pair():
    results = synthetic_results({"m": {"nll": [0.01, 0.02, 0.03, 0.04]}}, cells=("a",), seeds=4)
    results.loc[(results["method"] == "m") & (results["seed"] == 3), "nll"] = math.inf
    nll = cell_differences(results).set_index("outcome").loc["nll"]
    assert nll["pairs"] == 3 and nll["delta"] == pytest.approx(0.02)
    pooled = pooled_row(pooled_differences(results), "m", "nll")
    assert pooled["pairs"] == 3 and math.isfinite(pooled["ci_high"])


def test_picks_at_an_end_of_a_cells_grid_are_named_in_the_summary(tmp_path):
    from fisherlora.experiments.suite_report import picked_rates, summary_tables

    suite = parse_suite(cell_toml(lr_grid=[3e-4, 1e-3, 3e-3]), "s.toml")
    out = tmp_path / "out"
    (out / "c").mkdir(parents=True)
    picks = {"lora": 1e-3, "fim-lora": 3e-3, "filet": 3e-4}
    pd.DataFrame(
        [
            {"rank": 8, "method": m, "lr": lr, "val_accuracy": 0.8, "val_nll": 0.4}
            for m, lr in picks.items()
        ]
    ).to_csv(out / "c" / "picked_lr.csv", index=False)
    picked = picked_rates(suite, out)
    assert dict(zip(picked["method"], picked["edge"], strict=True)) == {
        "lora": "",
        "fim-lora": "top",
        "filet": "bottom",
    }
    tables = dict(summary_tables(suite, out, pd.DataFrame(), pd.DataFrame(), picked))
    (grid,) = [t for title, t in tables.items() if title.startswith("Picked learning rate")]
    shown = dict(zip(grid["method"], grid.iloc[:, 1], strict=True))
    assert shown == {"lora": "0.001", "fim-lora": "0.003 (top)", "filet": "0.0003 (bottom)"}


def test_three_seeds_one_example_apart_each_read_cannot_tell_however_the_mean_rounds():
    # accuracies in steps of 1/400: a mean of three equal differences can round to a standard
    # deviation of ~1e-18 instead of 0, which had read "win" and pooled as a point interval
    lora = np.array([300, 310, 290]) / 400
    rows = [
        {"cell": "a", "rank": 8, "method": m, "seed": s, "accuracy": v, "phase": "final"}
        for m, values in (("lora", lora), ("lucky", lora + 5 / 400))
        for s, v in enumerate(values)
    ]
    results = pd.DataFrame(rows)
    outcomes = {"accuracy": ("acc", True)}
    (verdict,) = cell_differences(results, outcomes)["verdict"]
    assert verdict == "cannot tell: 3 seeds, all the same difference"
    assert pooled_differences(results, outcomes).empty
