"""benchmarks/bench_scaling.py: the power-law fit and one tiny cell measurement (no timing claims)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_scaling

        yield bench_scaling
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("k", [0.5, 1.0, 2.0, 3.0])
def test_fit_recovers_an_exact_power_law(bench, k):
    xs = [384, 576, 1024, 2048, 4096]
    fit = bench.fit_power(xs, [0.37 * x**k for x in xs])
    assert fit["k"] == pytest.approx(k, abs=1e-9)
    assert fit["c"] == pytest.approx(0.37, rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0)
    assert bench.predict(fit, 8192) == pytest.approx(0.37 * 8192**k, rel=1e-9)


def test_fit_leaves_out_non_positive_values_and_needs_two_widths(bench):
    fit = bench.fit_power([64, 128, 256], [-1.0, 2.0, 8.0])
    assert fit["n"] == 2 and fit["k"] == pytest.approx(2.0)
    assert bench.fit_power([64, 128], [None, 3.0]) is None
    assert bench.fit_power([64, 64], [1.0, 2.0]) is None


def test_llama_shapes(bench):
    assert bench.intermediate_size(4096) == 11008  # Llama-7B's MLP width
    assert bench.intermediate_size(384) == 1024
    base = bench.synthetic_llama(64, 1, 50, 16, seed=0)
    expected = bench.model_params(64, 1, 50)
    assert sum(p.numel() for p in base.parameters()) == expected


def test_projected_max_width_is_monotone_in_the_budget(bench):
    fit = {"k": 2.0, "c": 1e-4, "r2": 1.0, "n": 3}
    small = bench.projected_max_width(fit, 2, 1000, 4, 400.0, 2_000.0)
    large = bench.projected_max_width(fit, 2, 1000, 4, 400.0, 20_000.0)
    assert small % 64 == 0 and large % 64 == 0 and 0 < small < large
    assert bench.projected_max_width(None, 2, 1000, 4, 400.0, 2_000.0) is None


@pytest.mark.parametrize("method", ["lora", "pissa", "fw-lora-after"])
def test_one_tiny_cell(bench, method):
    spec = {
        "width": 64,
        "layers": 1,
        "method": method,
        "rep": 0,
        "batch_size": 2,
        "seq": 16,
        "calib_batches": 2,
        "steps": 2,
        "rank": 4,
        "vocab": 50,
        "dtype": "float32",
        "seed": 0,
        "device": "cpu",
        "threads": 1,
    }
    threads = torch.get_num_threads()
    try:
        record = bench.measure_cell(spec)  # in this process: the child's work, without the child
    finally:
        torch.set_num_threads(threads)
    for key in (
        "init_s",
        "lora_step_s",
        "time_ratio",
        "method_cpu_s",
        "window_start_mb",
        "peak_mb",
        "extra_mb",
        "runtime_mb",
        "model_built_mb",
        "params",
    ):
        assert key in record
    assert record["status"] == "ok" and record["method"] == method
    assert record["init_s"] > 0 and record["lora_step_s"] > 0
    assert math.isclose(record["time_ratio"], record["init_s"] / record["lora_step_s"])
    assert len(record["lora_steps_s"]) == 2


def test_summary_of_synthetic_records(bench):
    def record(width, method, init_s, extra_mb, lora_step_s):
        return {
            "width": width,
            "layers": 2,
            "method": method,
            "rep": 0,
            "status": "ok",
            "init_s": init_s,
            "lora_step_s": lora_step_s,
            "time_ratio": init_s / lora_step_s,
            "method_cpu_s": init_s,
            "extra_mb": extra_mb,
            "peak_mb": 1.0,
            "runtime_mb": 400.0,
        }

    records = []
    for width in (64, 128, 256):
        step = 1e-5 * width**2 * 2
        records.append(record(width, "lora", step, 1e-2 * width * 2, step))
        records.append(record(width, "pissa", 1e-6 * width**3 * 2, 1e-3 * width**2 * 2, step))
        records.append(record(width, "filet", 1e-4 * width**2 * 2, 1e-2 * width * 2, step))
    records.append(
        {"width": 512, "layers": 2, "method": "pissa", "rep": 0, "status": "oom", "reason": "x"}
    )
    setup = {"device": "cpu", "dtype": "float32", "layers": 2, "vocab": 1000, "mem_limit_gb": 4}
    summary = bench.summarize(records, setup)
    pissa = summary["methods"]["pissa"]
    assert pissa["fits"]["time_s"]["k"] == pytest.approx(3.0)
    assert pissa["fits"]["extra_mb"]["k"] == pytest.approx(2.0)
    assert pissa["fits"]["time_ratio"]["k"] == pytest.approx(1.0)  # h^3 / h^2
    assert pissa["fits"]["memory_ratio"]["k"] == pytest.approx(1.0)  # h^2 / h
    assert summary["methods"]["filet"]["fits"]["memory_ratio"]["k"] == pytest.approx(0.0, abs=1e-9)
    assert summary["methods"]["lora"]["fits"]["time_s"]["k"] == pytest.approx(2.0)
    assert summary["methods"]["lora"]["fits"]["time_ratio"] is None
    assert pissa["largest_measured_ok"] == 256
    assert pissa["first_failed"]["width"] == 512 and pissa["first_failed"]["status"] == "oom"
    seven_b = pissa["extrapolated"]["llama-7b"]
    assert seven_b["seconds_per_layer"] == pytest.approx(1e-6 * 4096**3)
    assert seven_b["seconds_model"] == pytest.approx(32 * 1e-6 * 4096**3)
    assert summary["fit_range"] == [64, 256]
    assert "EXTRAPOLATED" in summary["extrapolation_note"]
    setup |= {"batch_size": 4, "seq": 128, "calib_batches": 4, "rank": 8, "layers_at": {}}
    text = bench.markdown(summary, setup | {"reps": 1})
    assert "| pissa | 512 | 2 |" in text and "oom" in text
