#!/usr/bin/env bash
# Echo round trip through torpor: client → torpor → echo runner → torpor → client.
# torpor runs pinned on CPU 0 with one shard; the echo runner and the load generator share
# CPU 1. Prints torpor-load's text and JSON lines for each case.
#   usage: bash perf/echo_rtt.sh [count]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
source perf/start_pair.sh
load() { taskset -c 1 ./target/release/torpor-load --addr 127.0.0.1:$port --create-actor "$@"; }
load -c 1 -s 20 -n "$n"
load -c 10 -s 20 -n $((n / 4))
load -c 1 -s 16384 -n $((n / 4))
echo "torpor CPU seconds: $(ps -o time= -p $gw)"
