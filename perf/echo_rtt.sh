#!/usr/bin/env bash
# Echo round trip through torpor: client → torpor → echo runner → torpor → client.
# torpor runs pinned on CPU 0 with one shard; the echo runner and the load generator share
# CPU 1. Prints torpor-load's text and JSON lines for each case.
#   usage: bash perf/echo_rtt.sh [count]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
cargo build --release --bins --locked >/dev/null
port=$((20000 + RANDOM % 20000))
data=$(mktemp -d)
taskset -c 0 ./target/release/torpor serve --listen 127.0.0.1:$port --shards 1 --data-dir "$data" >/dev/null 2>&1 &
gw=$!
trap 'kill $gw $runner 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/livez" >/dev/null && break; sleep 0.05; done
taskset -c 1 ./target/release/echo-runner --endpoint "http://127.0.0.1:$port" >/dev/null 2>&1 &
runner=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^torpor_runners_connected 1' && break; sleep 0.05
done
load() { taskset -c 1 ./target/release/torpor-load --addr 127.0.0.1:$port --create-actor "$@"; }
load -c 1 -s 20 -n "$n"
load -c 10 -s 20 -n $((n / 4))
load -c 1 -s 16384 -n $((n / 4))
echo "torpor CPU seconds: $(ps -o time= -p $gw)"
