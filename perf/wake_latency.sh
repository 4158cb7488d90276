#!/usr/bin/env bash
# Wake latency of a hibernating WebSocket: the echo actor is put to sleep (its socket stays
# open in torpor, hibernating), then one client message wakes it (CommandStartActor with the
# socket listed, Running, replay) and the time until its echo arrives is measured.
# torpor runs pinned on CPU 0 with one shard; the echo runner and the client share CPU 1.
#   usage: bash perf/wake_latency.sh [rounds]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-300}
cargo build --release --bins --locked >/dev/null
port=$((20000 + RANDOM % 20000))
data=$(mktemp -d)
taskset -c 0 ./target/release/torpor serve --listen 127.0.0.1:$port --shards 1 --data-dir "$data" >/dev/null 2>&1 &
gw=$!
trap 'kill $gw $runner 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/livez" >/dev/null && break; sleep 0.05; done
taskset -c 1 ./target/release/echo-runner --endpoint "http://127.0.0.1:$port" --control-messages >/dev/null 2>&1 &
runner=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^torpor_runners_connected 1' && break; sleep 0.05
done
taskset -c 1 ./target/release/torpor-load --addr 127.0.0.1:$port --create-actor --wake "$n" -s 20
