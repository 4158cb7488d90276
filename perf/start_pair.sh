# Sourced by the perf scripts: builds the release binaries, starts torpor (`--shards 1`,
# pinned to CPU 0, fresh data dir) and an echo runner (CPU 1, extra flags from
# $ECHO_RUNNER_ARGS), waits until the runner is connected, and stops both on exit.
# Sets $port.
cargo build --release --bins --locked >/dev/null
port=$((20000 + RANDOM % 20000))
data=$(mktemp -d)
taskset -c 0 ./target/release/torpor serve --listen 127.0.0.1:$port --shards 1 --data-dir "$data" >/dev/null 2>&1 &
gw=$!
trap 'kill $gw $runner 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/livez" >/dev/null && break; sleep 0.05; done
# shellcheck disable=SC2086
taskset -c 1 ./target/release/echo-runner --endpoint "http://127.0.0.1:$port" ${ECHO_RUNNER_ARGS:-} >/dev/null 2>&1 &
runner=$!
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^torpor_runners_connected 1' && break; sleep 0.05
done
