#!/usr/bin/env bash
# The long run of the simulation: many seeds of the real gateway cores, engine and runner
# core (src/sim), in release mode, split over two test threads.
#
#   scripts/sim_long.sh [runs] [first seed]     (defaults: 200000 runs from seed 1000000)
#
# A failure prints its seed and the command that replays it; the run stops at the first one.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-200000}
first=${2:-1000000}
start=$(date +%s)
status=0
SIM_RUNS=$runs SIM_FIRST=$first cargo test --release --locked --lib sim::seeds_shard -- --nocapture \
    >"${TMPDIR:-/tmp}/sim_long.log" 2>&1 || status=$?
grep -E -A4 "sim shard|simulation failure" "${TMPDIR:-/tmp}/sim_long.log" || true
grep -E "test result" "${TMPDIR:-/tmp}/sim_long.log" || true
echo "seeds $first..$((first + runs)): $runs runs in $(( $(date +%s) - start )) s, exit $status"
exit "$status"
