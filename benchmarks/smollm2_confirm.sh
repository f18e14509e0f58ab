#!/usr/bin/env bash
# The SmolLM2 confirmation (benchmarks/suites/smollm2_confirm.toml) in two one-thread lanes, one
# cell each; resumable: rerun the same command after an interruption.
#
#   nohup bash benchmarks/smollm2_confirm.sh > /tmp/confirm.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/smollm2-confirm
[ -d "$out" ] && find "$out" -type d -name 'seed*' | while read -r run; do
  [ -f "$run/metrics.json" ] || rm -rf "$run"
done
export OMP_NUM_THREADS=1
suite=(fisherlora suite benchmarks/suites/smollm2_confirm.toml --out "$out" --no-progress)
"${suite[@]}" --cells at-3e-4 > /tmp/confirm-3e-4.log 2>&1 &
lane1=$!
"${suite[@]}" --cells at-1e-3 > /tmp/confirm-1e-3.log 2>&1 &
lane2=$!
wait "$lane1" || echo "lane at-3e-4 ended with an error: see /tmp/confirm-3e-4.log"
wait "$lane2" || echo "lane at-1e-3 ended with an error: see /tmp/confirm-1e-3.log"
"${suite[@]}" --report-only
