#!/usr/bin/env bash
# The long CPU jobs of issues #14 and #15, one at a time and each resumable: the `cpu` suite,
# then the claims runs beside its reference cell, then the claims table. Restart it after any
# interruption (a new session) with the same command:
#
#   nohup bash benchmarks/long_runs.sh > /tmp/long_runs.log 2>&1 &
#
# Nothing else should share the CPU while it runs if its timing columns are to mean anything.
set -euo pipefail
cd "$(dirname "$0")/.."
fisherlora suite cpu --out benchmarks/results/suite-cpu --no-progress
python benchmarks/claims_runs.py --no-progress
python benchmarks/claims_table.py
