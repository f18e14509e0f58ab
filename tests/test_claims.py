"""benchmarks/claims_runs.py and claims_table.py: every experiment is the reference cell with only
its stated changes, and the table pairs runs by seed and judges claims by the stated rules."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def claims():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import claims_runs
        import claims_table

        yield claims_runs, claims_table
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_experiments_change_only_what_they_state(claims, tmp_path, monkeypatch):
    runs, _ = claims
    reference = runs.reference_config()
    picks = {"fw-lora": 0.003, "fim-lora": 0.001, "filet": 0.001}
    monkeypatch.setattr(runs, "picked_rates", lambda: picks)
    names = [e.name for e in runs.EXPERIMENTS]
    assert len(names) == len(set(names))
    ref_settings = dataclasses.asdict(reference.base)
    for experiment in runs.EXPERIMENTS:
        config = runs.experiment_config(experiment, reference, tmp_path)
        settings = dataclasses.asdict(config.base)
        changed = {k for k in settings if settings[k] != ref_settings[k]}
        allowed = set(experiment.settings) | ({"lr"} if experiment.lr != "tune" else set())
        assert changed <= allowed, (experiment.name, changed - allowed)
        # and what it states did change: its settings, methods and rank reach the config
        assert all(settings[k] == v for k, v in experiment.settings.items()), experiment.name
        assert config.methods == experiment.methods
        assert config.seeds == reference.seeds
        assert config.ranks == [experiment.rank or reference.ranks[0]]
        if experiment.lr == "picked":
            assert config.lr_grid is None and config.base.lr in picks.values()
        elif experiment.lr != "tune":  # a stated rate, no tuning
            assert config.lr_grid is None and config.tune_seeds == []
            assert config.base.lr == experiment.lr
        else:
            assert config.lr_grid == reference.lr_grid
            assert config.tune_seeds == reference.tune_seeds
        assert Path(config.out) == tmp_path / experiment.name


def _write_run(root: Path, method: str, seed: int, accuracy: float, rank: int = 8, **extra) -> Path:
    run = root / f"r{rank}" / method / f"seed{seed}"
    run.mkdir(parents=True)
    metrics = {
        "method": method,
        "seed": seed,
        "lr": 1e-3,
        "accuracy": accuracy,
        "nll": 1 - accuracy,
        "trainable_params": 100,
        "timings": {"init_s": 1.0},
    } | extra
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_table_pairs_by_seed_and_applies_the_verdict_rules(claims, tmp_path):
    _, table = claims
    ref = tmp_path / "ref"
    # fw-lora beats its control on every seed; fim-lora vs random-rank: no clear sign
    for seed, (fw, uniform, fim, rand) in enumerate(
        [(0.80, 0.78, 0.75, 0.76), (0.81, 0.785, 0.77, 0.75), (0.79, 0.77, 0.76, 0.76)]
    ):
        _write_run(ref, "fw-lora", seed, fw)
        _write_run(ref, "fim-lora", seed, fim)
        _write_run(ref, "random-rank", seed, rand)
        _write_run(tmp_path / "ablations-r8", "fw-lora-uniform", seed, uniform, lr=3e-3)
        # the kept subspace: FILet's from its own report (older runs), LoRA's from metrics.json
        run = _write_run(ref, "filet", seed, 0.8)
        (run / "filet_training.json").write_text(json.dumps({"subspace_overlap_mean": 0.9}))
        _write_run(tmp_path / "ablations-r8", "lora", seed, 0.8, a_row_space_kept=0.5 + seed / 100)
        # filet-svd's reference at another rate than filet-svd's: the kept share reads the rate
        _write_run(ref, "filet-svd", seed, 0.8, lr=3e-3, a_row_space_kept=0.9)
        _write_run(tmp_path / "lora-lr-0.003", "lora", seed, 0.8, a_row_space_kept=0.5 + seed / 50)
    _write_run(tmp_path / "ablations-r8", "fw-lora-uniform", 7, 0.0, lr=3e-3)  # no partner
    sources = {
        "ref": table.final_runs(ref),
        "ablations-r8": table.final_runs(tmp_path / "ablations-r8"),
        "lora-lr-0.003": table.final_runs(tmp_path / "lora-lr-0.003"),
    }
    result = table.claims_table(sources).set_index(["A", "B"])
    control = result.loc[("fw-lora (rt-low-data, r=8)", "fw-lora-uniform (ablations-r8, r=8)")]
    assert control["seeds"] == 3
    assert control["accuracy_delta"] == pytest.approx(0.065 / 3)
    assert control["verdict"] == "holds"  # +2.0, +2.5, +2.0 pp
    assert control["lr A / B"] == "0.001 / 0.003" and "rates differ" in control["notes"]
    random = result.loc[("fim-lora (rt-low-data, r=8)", "random-rank (rt-low-data, r=8)")]
    assert random["seeds"] == 3 and random["verdict"] == "cannot tell at this size"
    assert "rates differ" not in random["notes"]  # both at 1e-3
    kept = result.loc[("filet (rt-low-data, r=8)", "lora (ablations-r8, r=8)")]
    assert kept["a_row_space_kept_delta"] == pytest.approx(0.39)
    assert kept["verdict"] == "holds" and kept["other outcome"].startswith("a_row_space_kept")
    other_rate = result.loc[("filet-svd (rt-low-data, r=8)", "lora (lora-lr-0.003, r=8)")]
    assert other_rate["a_row_space_kept_delta"] > 0.3
    assert other_rate["verdict"] == "cannot tell: the arms ran at different rates"
    missing = result.loc[("fim-lora (ranks-r2, r=2)", "random-rank (ranks-r2, r=2)")]
    assert missing["seeds"] == 0 and missing["verdict"] == "pending"
    table.plot_forest(table.claims_table(sources), tmp_path / "forest.png")
    assert (tmp_path / "forest.png").stat().st_size > 1000
    for seed, (accuracy, nll) in enumerate([(0.81, 0.10), (0.80, 0.08), (0.80, 0.12)]):
        # the λ sweep: accuracy within a point of the cell's λ = 1e-4 either way, NLL 0.1 lower
        run = dict(val_accuracy=0.72, nll=nll)
        _write_run(tmp_path / "fw-lambda-0.01", "fw-lora", seed, accuracy, **run)
        # the same against the cell at another rate: its Δ NLL is the rate's, not named
        _write_run(tmp_path / "ablations-r8", "fw-lora-max", seed, accuracy, lr=3e-3, nll=nll)
    for name in ("fw-lambda-0.01", "ablations-r8"):
        sources[name] = table.final_runs(tmp_path / name)
    swept = table.claims_table(sources).set_index(["A", "B"])
    lam = swept.loc[("fw-lora (fw-lambda-0.01, r=8)", "fw-lora (rt-low-data, r=8)")]
    assert lam["nll_ci_high"] < 0
    assert lam["verdict"] == "measured: no difference seen; NLL lower for A"
    other_rate = swept.loc[("fw-lora-max (ablations-r8, r=8)", "fw-lora (rt-low-data, r=8)")]
    assert other_rate["nll_ci_high"] < 0 and "NLL" not in other_rate["verdict"]
    table.plot_lambda_sweep(sources, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_identical_means_every_seed_identical_and_non_finite_outcomes_are_no_pairs(
    claims, tmp_path
):
    _, table = claims
    ref, rerun = tmp_path / "ref", tmp_path / "ablations-r8"
    for seed in range(4):
        _write_run(ref, "lora", seed, 0.8)
        # one seed of the rerun differs by 1e-4: the runs do not reproduce, whatever the CI
        _write_run(rerun, "lora", seed, 0.8 + (1e-4 if seed == 2 else 0.0))
        _write_run(ref, "fim-lora", seed, 0.8)
        _write_run(ref, "random-rank", seed, float("nan") if seed else 0.8)
    sources = {"ref": table.final_runs(ref), "ablations-r8": table.final_runs(rerun)}
    result = table.claims_table(sources).set_index(["A", "B"])
    same = result.loc[("lora (ablations-r8, r=8)", "lora (rt-low-data, r=8)")]
    assert same["verdict"] == "does not hold (1 of 4 seeds differ)"
    # three of random-rank's accuracies are NaN: one pair, no interval (not "cannot tell")
    nan = result.loc[("fim-lora (rt-low-data, r=8)", "random-rank (rt-low-data, r=8)")]
    assert nan["seeds"] == 1 and nan["verdict"] == "no interval"


def test_verdict_rules(claims):
    _, table = claims
    arm = table.Arm("ref", "x")
    beats = table.Claim("P", "c", "n", arm, arm, effect=0.0023)
    assert table.verdict(beats, 0.001, 0.01, 5) == "holds"
    # the direction holds, the paper's size (+0.23 pp) does not: both said
    assert table.verdict(beats, 0.0005, 0.002, 5) == "holds, but smaller than the paper's +0.23 pp"
    assert table.verdict(beats, -0.01, -0.001, 5) == "does not hold (reversed)"
    # the direction undecided, the size ruled out: not the harsher "does not hold"
    assert table.verdict(beats, -0.01, 0.002, 5) == (
        "the paper's +0.23 pp is ruled out; the direction cannot be told"
    )
    assert table.verdict(beats, -0.01, 0.01, 5) == "cannot tell at this size"
    within = table.Claim("P", "c", "n", arm, arm, kind="within", band=0.001)
    assert table.verdict(within, -0.0005, 0.0008, 5) == "holds"
    assert table.verdict(within, 0.002, 0.01, 5) == "does not hold"
    assert table.verdict(within, -0.01, 0.01, 5) == "cannot tell at this size"
    assert table.verdict(within, -0.01, 0.01, 1) == "no interval"
    # equal differences on a few seeds (accuracy moves in steps of one example): no evidence
    assert table.verdict(beats, 0.01, 0.01, 3).startswith("cannot tell: the 3 seeds'")
    assert table.verdict(within, 0.0, 0.0, 2).startswith("cannot tell")
    assert table.verdict(beats, 0.01, 0.01, 5) == "holds"


def test_insensitivity_claims_read_the_band_not_measured(claims):
    # T = 1 against 8 (FIM-LoRA) and FILet's calibration sizes claim that small calibration
    # suffices: a wide interval is "cannot tell", not "measured: no difference seen"
    _, table = claims
    rows = [
        c
        for c in table.CLAIMS
        if c.a.source in ("calib-1-fim-lora", "calib-16-fim-lora")
        or c.claim.startswith("calibration size")
    ]
    assert len(rows) == 4
    for claim in rows:
        assert (claim.kind, claim.band) == ("within", 0.001), claim.claim
        assert table.verdict(claim, -0.0048, 0.0134, 5) == "cannot tell at this size"
        assert table.verdict(claim, -0.0005, 0.0008, 5) == "holds"


def test_the_rank_floor_row_is_scored_two_sided(claims):
    # "the floor matters": a difference either way holds it; an interval around 0 cannot tell
    _, table = claims
    (floor,) = [c for c in table.CLAIMS if c.b.method == "fim-lora-rmin1"]
    assert floor.kind == "differs"
    assert table.verdict(floor, 0.001, 0.01, 5) == "holds (A > B)"
    assert table.verdict(floor, -0.01, -0.001, 5) == "holds (A < B)"
    assert table.verdict(floor, -0.01, 0.01, 5) == "cannot tell at this size"
    assert table.verdict(floor, -0.01, -0.01, 3).startswith("cannot tell: the 3 seeds'")


@pytest.mark.parametrize(
    ("seeds", "expected"),
    [
        (2, "cannot tell: 2 of 2 seeds identical, fewer than 5"),
        (5, "holds (5 of 5 seeds identical)"),
    ],
)
def test_identical_needs_enough_seeds_to_hold(claims, tmp_path, seeds, expected):
    _, table = claims
    ref, rerun = tmp_path / "ref", tmp_path / "ablations-r8"
    for seed in range(seeds):
        _write_run(ref, "lora", seed, 0.8 + seed / 100)
        _write_run(rerun, "lora", seed, 0.8 + seed / 100)
    sources = {"ref": table.final_runs(ref), "ablations-r8": table.final_runs(rerun)}
    result = table.claims_table(sources).set_index(["A", "B"])
    same = result.loc[("lora (ablations-r8, r=8)", "lora (rt-low-data, r=8)")]
    assert same["seeds"] == seeds and same["verdict"] == expected


def test_cost_table_sums_each_experiments_runs_with_their_median_step_times(
    claims, tmp_path, monkeypatch
):
    _, table = claims
    monkeypatch.setattr(table, "CLAIMS_DIR", tmp_path)
    # a calibration-only summary: every repeat counts, not their median
    rows = [{"prepare_s": 2.0, "prepare_s_all": [1.0, 2.0, 6.0]}, {"prepare_s": 3.0}]
    (tmp_path / "filet_calibration.json").write_text(json.dumps({"results": rows}))
    runs = tmp_path / "runs"
    timings = {"median_step_s": 0.5, "train_s": 500.0, "total_s": 560.0}  # paused for 450 s
    for seed in range(2):
        run = _write_run(runs / "fw-k-10", "fw-lora", seed, 0.8, timings=timings, phase="final")
        (run / "config.json").write_text(json.dumps({"settings": {"steps": 100}}))
    tune = _write_run(runs / "fw-k-10", "fw-lora", 100, 0.8, timings=timings, phase="tune")
    (tune / "config.json").write_text(json.dumps({"settings": {"steps": 100}}))
    cost = table.cost_table(runs).set_index("experiment")
    # per run: 0.5 s × 100 steps + the 60 s outside training = 110 s
    assert cost.loc["fw-k-10", "final runs"] == 2 and cost.loc["fw-k-10", "tuning runs"] == 1
    assert cost.loc["fw-k-10", "hours"] == pytest.approx(3 * 110 / 3600)
    calibration = cost.loc["claims_filet_calibration.py (calibration only, recorded timings)"]
    assert calibration["hours"] == pytest.approx((1 + 2 + 6 + 3) / 3600)
    total = cost.loc["total (the claims' own runs)"]
    reference = [e for e in cost.index if "not in the total" in e]
    assert len(reference) == 1  # the suite's cell, listed after the total and outside it
    assert total["hours"] == pytest.approx(cost["hours"].iloc[:-2].sum())
    assert list(cost.index[-2:]) == [total.name, reference[0]]


def test_calibration_only_claims_read_their_rules(claims, tmp_path, monkeypatch):
    _, table = claims
    monkeypatch.setattr(table, "CLAIMS_DIR", tmp_path)

    def point(batches, spearman, l1, diff):
        keys = ("batches", "score_spearman", "rank_l1", "max_rank_diff")
        return dict(zip(keys, (batches, spearman, l1, diff), strict=True))

    saturation = [
        {
            "rank": 8,
            "saturation": [point(1, 0.95, 12, 3), point(8, 0.995, 2, 1)],
            "floors": {"r_min=1": {"histogram": {"1": 10, "4": 3, "16": 8}}},
        }
    ]
    layers = [
        {
            "plan": "m r=8",
            "mean_rank_by_type": {"query": 4.0, "value": 12.0},
            "mean_rank_by_third": {"early": 5.0, "middle": 6.0, "late": 11.0},
        },
        {"plan": "m r=8 r_min=1", "mean_rank_by_type": {}, "mean_rank_by_third": {}},
    ]
    for name, results in (("fim_saturation", saturation), ("fim_layers", layers)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"results": results}))
    rows = table.calibration_rows().set_index("claim")["verdict"]
    assert rows.str.startswith("holds").sum() == 3 and len(rows) == 4  # r_min=1 plan skipped
    assert rows[rows.index.str.startswith("early-to-middle")].iloc[0].startswith("does not hold")
    saturation[0]["saturation"][1] = point(8, 0.98, 6, 2)  # not saturated at T = 8
    (tmp_path / "fim_saturation.json").write_text(json.dumps({"results": saturation}))
    rows = table.calibration_rows().set_index("claim")["verdict"]
    assert rows[rows.index.str.startswith("the signal")].iloc[0].startswith("does not hold")


def test_the_weighting_row_spans_every_run_and_module(claims, tmp_path, monkeypatch):
    _, table = claims
    monkeypatch.setattr(table, "CLAIMS_DIR", tmp_path)

    def span(lo, mid, hi):
        return {"min": lo, "median": mid, "max": hi}

    results = [
        {"modules": 37, "sum": span(0.88, 0.98, 0.99), "max": span(0.0, 0.89, 0.99)},
        {"modules": 37, "sum": span(0.75, 0.97, 1.0), "max": span(0.1, 0.93, 0.98)},
    ]
    (tmp_path / "fw_weighting.json").write_text(json.dumps({"results": results}))
    row = table.calibration_rows().iloc[0]
    # the extremes over every run, the median of the runs' medians
    assert "normalise by sum: min 0.750, median 0.975, max 1.000" in row["measured"]
    assert "normalise by max: min 0.000, median 0.910, max 0.990" in row["measured"]
    assert "(2 runs × 37 modules)" in row["measured"] and row["verdict"] == "measured"


def test_the_readme_block_is_replaced_between_its_markers_only(claims, tmp_path):
    _, table = claims
    ref = tmp_path / "ref"
    for seed in range(3):
        _write_run(ref, "fim-lora", seed, 0.75 + seed / 100)
        _write_run(ref, "random-rank", seed, 0.76)
    rows = table.claims_table({"ref": table.final_runs(ref)})
    block = table.compact_markdown(rows, table.pd.DataFrame())
    assert block.count("\n") == len(table.CLAIMS) + 2  # header, rule, one line per claim
    line = next(x for x in block.splitlines() if "random-rank (rt-low-data, r=8) (" in x)
    assert "fim-lora (rt-low-data, r=8) − random-rank (rt-low-data, r=8) (0.001 / 0.001)" in line
    assert "| 3 |" in line and "cannot tell" in line
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.README_START}\nold rows\n{table.README_END}\nafter\n")
    table.update_readme(readme, block)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{table.README_END}\nafter\n")
    assert "old rows" not in text and block in text
    table.update_readme(readme, block)  # idempotent on its own output
    assert readme.read_text() == text
    table.update_readme(readme, "new\n")  # a new block replaces the old one
    assert readme.read_text() == f"intro\n{table.README_START}\nnew\n{table.README_END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="claims-table markers"):
        table.update_readme(readme, block)
