#!/usr/bin/env bash
# Wake latency of a hibernating WebSocket: the echo actor is put to sleep (its socket stays
# open in torpor, hibernating), then one client message wakes it (CommandStartActor with the
# socket listed, Running, replay) and the time until its echo arrives is measured.
# torpor runs pinned on CPU 0 with one shard; the echo runner and the client share CPU 1.
#   usage: bash perf/wake_latency.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-300}
ECHO_RUNNER_ARGS="--control-messages"
source perf/start_pair.sh
taskset -c 1 ./target/release/torpor-load --addr 127.0.0.1:$port --create-actor --wake "$n" -s 20
