#!/usr/bin/env bash
# The long CPU jobs of issues #14 and #15, each resumable, in two lanes of one thread each (on
# the 2-core machine two one-thread processes give about the throughput of one two-thread
# process):
#
#   lane 1: the claims runs beside the suite's reference cell (which has finished), then the
#           suite's first three cells (rt-low-data, rt-r1, imdb-r4);
#   lane 2: the suite's SmolLM2 cell (`--cells`: each cell is trained by one lane only);
#
# then the claims runs' second pass, the claims table and the suite report. Restart it after any
# interruption (a new session) with the same command:
#
#   nohup bash benchmarks/long_runs.sh > /tmp/long_runs.log 2>&1 &
#
# Run directories without metrics.json are runs cut off mid-way: they are removed first so that
# they run again from the start. Nothing else should share the CPU while this runs if its timing
# columns are to mean anything.
set -euo pipefail
cd "$(dirname "$0")/.."
for results in benchmarks/results/suite-cpu benchmarks/results/claims/runs; do
  [ -d "$results" ] || continue
  find "$results" -type d \( -name 'seed*' -o -name 'lr*-seed*' \) | while read -r run; do
    [ -f "$run/metrics.json" ] || rm -rf "$run"
  done
done
export OMP_NUM_THREADS=1
suite=(fisherlora suite cpu --out benchmarks/results/suite-cpu --no-progress)
(
  python benchmarks/claims_runs.py --no-progress > /tmp/claims.log 2>&1 ||
    echo "the claims runs ended with an error: see /tmp/claims.log"
  "${suite[@]}" --cells rt-low-data,rt-r1,imdb-r4 > /tmp/suite.log 2>&1 ||
    echo "the suite's lane 1 ended with an error: see /tmp/suite.log"
) &
lane1=$!
"${suite[@]}" --cells smollm2-rt-gen > /tmp/suite-smollm2.log 2>&1 &
lane2=$!
# one lane failing must not stop the other, the second pass or the reports
wait "$lane1" || true
wait "$lane2" || echo "the suite's lane 2 ended with an error: see /tmp/suite-smollm2.log"
# experiments that waited for the reference cell's picked rates (a re-tuned cell) run now
python benchmarks/claims_runs.py --no-progress >> /tmp/claims.log 2>&1 ||
  echo "the second claims pass ended with an error: see /tmp/claims.log"
python benchmarks/claims_table.py --readme
"${suite[@]}" --report-only
