"""Per-method learning rates: tuning runs read validation only, the pick is the best validation
accuracy, the final seeds run at it, and results.csv / the report say which rate was used."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from fisherlora.cli import main
from fisherlora.errors import ConfigError
from fisherlora.experiments import compare as compare_module
from fisherlora.experiments.compare import (
    CompareConfig,
    check_out_dir,
    compare,
    parse_floats,
    pick_learning_rates,
)
from fisherlora.experiments.train import TrainConfig


def grid_comparison(out, **overrides) -> CompareConfig:
    base = TrainConfig(
        model="tiny-bert",
        steps=8,
        batch_size=16,
        eval_every=4,
        max_length=16,
        calib_batches=2,
        device="cpu",
        val_fraction=0.2,
        train_size=128,
    )
    settings = dict(
        methods=["lora", "fw-lora"],
        seeds=[0, 1],
        ranks=[2],
        out=str(out),
        base=base,
        lr_grid=[1e-3, 3e-2],
        tune_seeds=[7],
    )
    return CompareConfig(**(settings | overrides))


@pytest.fixture
def patched_task(monkeypatch, keyword_task):
    monkeypatch.setattr(compare_module, "load_data", lambda *a, **k: keyword_task)


def record_runs(monkeypatch) -> list[TrainConfig]:
    calls: list[TrainConfig] = []
    real_train = compare_module.train

    def recording_train(config, **kwargs):
        calls.append(config)
        return real_train(config, **kwargs)

    monkeypatch.setattr(compare_module, "train", recording_train)
    return calls


def test_tuning_runs_come_first_and_the_finals_run_at_the_picked_rate(
    tmp_path, patched_task, monkeypatch
):
    calls = record_runs(monkeypatch)
    config = grid_comparison(tmp_path)
    compare(config, progress=False)
    tuning = [c for c in calls if c.phase == "tune"]
    finals = [c for c in calls if c.phase == "final"]
    assert len(tuning) == 2 * 2 and len(finals) == 2 * 2
    assert calls[: len(tuning)] == tuning  # every tuning run before any final run
    assert {(c.method, c.lr, c.seed) for c in tuning} == {
        (m, lr, 7) for m in ("lora", "fw-lora") for lr in (1e-3, 3e-2)
    }
    picked = json.loads((tmp_path / "picked_lr.json").read_text())["picked"]
    rates = {p["method"]: p["lr"] for p in picked}
    for c in finals:
        assert c.lr == rates[c.method]
    # the pick is the rate with the best validation accuracy (ties: the lower NLL)
    for method in ("lora", "fw-lora"):
        scores = {}
        for lr in (1e-3, 3e-2):
            m = json.loads((config.tune_dir(2, method, lr, 7) / "metrics.json").read_text())
            assert "accuracy" not in m  # tuning runs carry no test metrics
            scores[lr] = (m["val_accuracy"], -m["val_nll"])
        assert rates[method] == max(scores, key=scores.__getitem__)

    results = pd.read_csv(tmp_path / "results.csv")
    assert {"phase", "lr", "val_accuracy", "val_nll", "nll", "val_auc"} <= set(results.columns)
    assert set(results["phase"]) == {"tune", "final"}
    assert results[results["phase"] == "tune"]["accuracy"].isna().all()
    # what they cost, for a suite's compute table (wall clock and pause-robust)
    timing = ["total_s", "train_s", "median_step_s"]
    assert (results[results["phase"] == "tune"][timing] > 0).all().all()
    assert results[results["phase"] == "final"]["accuracy"].notna().all()
    text = (tmp_path / "report.md").read_text()
    assert "Learning rates were picked" in text and "Δ NLL" in text and "val AUC" in text
    assert (tmp_path / "plots" / "lr_grid_r2.png").exists()
    assert (tmp_path / "picked_lr.csv").exists()


def test_a_resumed_grid_keeps_its_picks_and_reruns_nothing(tmp_path, patched_task, monkeypatch):
    config = grid_comparison(tmp_path, methods=["lora"], seeds=[0])
    compare(config, progress=False)
    pinned = (tmp_path / "picked_lr.json").read_text()
    calls = record_runs(monkeypatch)
    compare(config, progress=False)
    assert calls == []
    assert (tmp_path / "picked_lr.json").read_text() == pinned
    assert pick_learning_rates(config) == {
        (p["rank"], p["method"]): p["lr"] for p in json.loads(pinned)["picked"]
    }


def test_a_method_added_after_the_picks_were_pinned_gets_its_own(
    tmp_path, patched_task, monkeypatch
):
    # before: the pinned file was the whole answer, so the new method had "no rate" and its
    # final seeds were skipped without a word
    compare(grid_comparison(tmp_path, methods=["lora"], seeds=[0]), progress=False)
    before = json.loads((tmp_path / "picked_lr.json").read_text())["picked"]
    calls = record_runs(monkeypatch)
    wider = grid_comparison(tmp_path, methods=["lora", "fw-lora"], seeds=[0])
    compare(wider, progress=False)
    assert {(c.method, c.phase) for c in calls} == {("fw-lora", "tune"), ("fw-lora", "final")}
    picks = pick_learning_rates(wider)
    assert picks[(2, "lora")] == before[0]["lr"] and (2, "fw-lora") in picks
    final = next(c for c in calls if c.phase == "final")
    assert final.lr == picks[(2, "fw-lora")]
    after = json.loads((tmp_path / "picked_lr.json").read_text())["picked"]
    assert after[0] == before[0] and [p["method"] for p in after] == ["lora", "fw-lora"]


def test_a_grid_widens_before_any_final_run_and_not_after(tmp_path):
    def fake_tuning(config, accuracy_by_lr):
        for lr, accuracy in accuracy_by_lr.items():
            run_dir = config.tune_dir(2, "lora", lr, 7)
            run_dir.mkdir(parents=True, exist_ok=True)
            metrics = {"val_accuracy": accuracy, "val_nll": 0.5}
            (run_dir / "metrics.json").write_text(json.dumps(metrics))

    narrow = grid_comparison(tmp_path, methods=["lora"], seeds=[0], lr_grid=[1e-3, 3e-3])
    check_out_dir(narrow)
    fake_tuning(narrow, {1e-3: 0.6, 3e-3: 0.7})  # the pick sits at the top edge
    assert pick_learning_rates(narrow) == {(2, "lora"): 3e-3}
    wide = grid_comparison(tmp_path, methods=["lora"], seeds=[0], lr_grid=[1e-3, 3e-3, 1e-2])
    check_out_dir(wide)  # a superset, no final run yet: accepted, the pinned pick dropped
    assert not (tmp_path / "picked_lr.json").exists()
    fake_tuning(wide, {1e-2: 0.8})
    assert pick_learning_rates(wide) == {(2, "lora"): 1e-2}
    for grid in ([1e-3, 1e-2], [3e-4, 3e-3]):  # a rate left out: its tuning runs would not count
        with pytest.raises(ConfigError, match="lr_grid"):
            check_out_dir(grid_comparison(tmp_path, methods=["lora"], seeds=[0], lr_grid=grid))
    wide.run_dir(2, "lora", 0).mkdir(parents=True)
    (wide.run_dir(2, "lora", 0) / "metrics.json").write_text("{}")  # a final run has finished
    wider = grid_comparison(tmp_path, methods=["lora"], seeds=[0], lr_grid=[1e-3, 3e-3, 1e-2, 3e-2])
    with pytest.raises(ConfigError, match="lr_grid"):
        check_out_dir(wider)


def test_a_diverged_tuning_run_rules_its_rate_out(tmp_path):
    config = grid_comparison(tmp_path, methods=["lora"], seeds=[0])
    for lr, outcome in ((1e-3, {"val_accuracy": 0.6, "val_nll": 0.7}), (3e-2, None)):
        run_dir = config.tune_dir(2, "lora", lr, 7)
        run_dir.mkdir(parents=True)
        if outcome is None:
            (run_dir / "error.txt").write_text("FloatingPointError: the loss became nan\n")
        else:
            (run_dir / "metrics.json").write_text(json.dumps(outcome))
    assert pick_learning_rates(config) == {(2, "lora"): 1e-3}


def test_a_tuning_run_with_a_non_finite_score_rules_its_rate_out(tmp_path):
    config = grid_comparison(tmp_path, methods=["lora"], seeds=[0])
    # NaN NLL (an overflow at evaluation) at the rate that comes first: every comparison with
    # NaN is False, so without the rule the pick would hang on the grid's order
    for lr, nll in ((1e-3, float("nan")), (3e-2, 0.7)):
        run_dir = config.tune_dir(2, "lora", lr, 7)
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps({"val_accuracy": 0.8, "val_nll": nll}))
    assert pick_learning_rates(config) == {(2, "lora"): 3e-2}


def test_tied_mean_accuracies_are_tied_whatever_the_float_rounding():
    from fisherlora.experiments.compare import _grid_score

    n = 872  # counts / n summed in two orders: the same 2,107 correct, floats 1 ulp apart
    three = [(602 / n, 0.5), (602 / n, 0.5), (605 / n, 0.5)]
    other = [(602 / n, 0.4), (603 / n, 0.4), (604 / n, 0.4)]
    assert sum(a for a, _ in three) / 3 != sum(a for a, _ in other) / 3  # the float noise
    assert _grid_score(three)[0] == _grid_score(other)[0]
    assert max([three, other], key=_grid_score) is other  # the tie goes to the lower NLL


def test_ties_in_accuracy_go_to_the_lower_nll(tmp_path):
    config = grid_comparison(tmp_path, methods=["lora"], seeds=[0])
    for lr, nll in ((1e-3, 0.5), (3e-2, 0.4)):
        run_dir = config.tune_dir(2, "lora", lr, 7)
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.json").write_text(json.dumps({"val_accuracy": 0.8, "val_nll": nll}))
    assert pick_learning_rates(config) == {(2, "lora"): 3e-2}


@pytest.mark.parametrize(
    "spec, message",
    [("1e-3,abc", "comma-separated numbers"), ("1e-3,-1e-4", "positive"), ("", "names nothing")],
)
def test_lr_grids_that_do_not_parse_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_floats(spec, "--lr-grid")


def test_a_grid_without_a_validation_split_is_refused(tmp_path):
    config = grid_comparison(tmp_path)
    with pytest.raises(ConfigError, match="validation split"):
        dataclasses.replace(config, base=dataclasses.replace(config.base, val_fraction=0.0))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr-grid", "1e-3,0"], "positive"),
        (["--val-fraction", "0.7"], "val_fraction"),
        (["--train-size", "4"], "at least one batch"),
        (["--quick", "--lr-grid", "1e-3"], "--quick"),
    ],
)
def test_cli_refuses_bad_protocol_flags_before_anything_runs(flags, message, tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path / "c"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_train_size_the_data_cannot_give_is_refused_before_any_run(
    tmp_path, patched_task, monkeypatch
):
    calls = record_runs(monkeypatch)
    config = grid_comparison(
        tmp_path, base=dataclasses.replace(grid_comparison(tmp_path).base, train_size=5000)
    )
    with pytest.raises(ConfigError, match="larger than the training split"):
        compare(config, progress=False)
    assert calls == []


def test_an_older_comparison_without_the_new_settings_still_resumes(tmp_path):
    """compare.json written before val_fraction / train_size / lr_grid existed matches the
    values those comparisons ran with."""
    config = grid_comparison(tmp_path, lr_grid=None)
    config = dataclasses.replace(
        config,
        base=dataclasses.replace(
            config.base, val_fraction=0.0, train_size=None, rounding="maximal"
        ),
    )
    check_out_dir(config)
    pinned = json.loads((tmp_path / "compare.json").read_text())
    for key in ("val_fraction", "train_size", "lr_grid", "tune_seeds"):
        pinned["settings"].pop(key, None)
    (tmp_path / "compare.json").write_text(json.dumps(pinned))
    check_out_dir(config)  # no error: the legacy values match
    changed = dataclasses.replace(config, base=dataclasses.replace(config.base, val_fraction=0.1))
    with pytest.raises(ConfigError, match="val_fraction"):
        check_out_dir(changed)
    # rank plans from before rounding existed went out as "maximal" does
    pinned = json.loads((tmp_path / "compare.json").read_text())
    assert pinned["settings"]["rounding"] == "maximal"
    pinned["settings"].pop("rounding")
    (tmp_path / "compare.json").write_text(json.dumps(pinned))
    check_out_dir(config)
    largest = dataclasses.replace(config, base=dataclasses.replace(config.base, rounding="largest"))
    with pytest.raises(ConfigError, match="rounding"):
        check_out_dir(largest)


def test_picks_at_an_end_of_the_grid_are_named():
    from fisherlora.experiments.report import edge_picks

    picked = pd.DataFrame(
        {"rank": [1, 1, 1], "method": ["lora", "pissa", "corda"], "lr": [3e-3, 1e-3, 3e-4]}
    )
    assert edge_picks([3e-4, 1e-3, 3e-3], picked) == [
        (1, "lora", "highest"),
        (1, "corda", "lowest"),
    ]
    assert edge_picks([1e-3, 3e-3], picked) == []  # with two rates every pick is an end


def test_a_language_modelling_comparison_picks_rates_by_validation_nll(tmp_path):
    base = TrainConfig(
        model="tiny-llama-lm",
        task="rotten-tomatoes-lm",
        steps=2,
        batch_size=8,
        eval_every=2,
        max_length=24,
        device="cpu",
        val_fraction=0.2,
        train_size=32,
        max_test=8,
    )
    with pytest.raises(ConfigError, match="no accuracy"):
        CompareConfig(["lora"], [0], [2], str(tmp_path), base, lr_grid=[1e-3], select_by="accuracy")
    config = CompareConfig(["lora", "fw-lora"], [0], [2], str(tmp_path), base, lr_grid=[1e-3, 3e-2])
    assert config.selection == "nll" and config.shared_settings()["select_by"] == "nll"
    compare(config, progress=False)
    pinned = json.loads((tmp_path / "picked_lr.json").read_text())
    nll = {
        lr: json.loads((config.tune_dir(2, "lora", lr, 100) / "metrics.json").read_text())[
            "val_nll"
        ]
        for lr in (1e-3, 3e-2)
    }
    assert pinned["rule"] == "min mean val_nll"
    assert pinned["picked"][0]["lr"] == min(nll, key=nll.get)
    text = (tmp_path / "report.md").read_text()
    assert "lowest mean validation NLL" in text
    assert "NLL: 1 seed: no interval" in text  # fw-lora's verdict reads NLL, not accuracy
    results = pd.read_csv(tmp_path / "results.csv")
    assert results["accuracy"].isna().all() and results["nll"].notna().any()
