#!/usr/bin/env bash
# The long CPU jobs of issues #14 and #15, each resumable: the `cpu` suite and the claims runs
# beside its reference cell, side by side with one thread each (on the 2-core machine two
# one-thread processes give about the throughput of one two-thread process, and the claims runs
# need only the reference cell, which has finished); then the claims table. Restart it after any
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
OMP_NUM_THREADS=1 fisherlora suite cpu --out benchmarks/results/suite-cpu --no-progress > /tmp/suite.log 2>&1 &
suite=$!
OMP_NUM_THREADS=1 python benchmarks/claims_runs.py --no-progress > /tmp/claims.log 2>&1 &
claims=$!
# one job failing must not stop the other's second pass or the table
wait "$suite" || echo "the suite ended with an error: see /tmp/suite.log"
wait "$claims" || echo "the claims runs ended with an error: see /tmp/claims.log"
# experiments that waited for the reference cell's picked rates (a re-tuned cell) run now
OMP_NUM_THREADS=1 python benchmarks/claims_runs.py --no-progress >> /tmp/claims.log 2>&1 ||
  echo "the second claims pass ended with an error: see /tmp/claims.log"
python benchmarks/claims_table.py --readme
