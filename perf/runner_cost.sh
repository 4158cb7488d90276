#!/usr/bin/env bash
# CPU cost of the Rust runner library: instructions per echoed message of the echo runner
# (src/bin/echo_runner.rs, the backend of every torpor benchmark) under callgrind.
#
#   bash perf/runner_cost.sh [messages=20000] [sizes="1024 16384"]
#   env: RUNNER_BIN  the echo runner to measure (default ./target/release/echo-runner), e.g.
#                    a copy built from another commit, for a before/after comparison
#        TAG         names the output files (default: the runner's directory name)
#        NO_BUILD=1  skip `cargo build --release --bins`
#        MODE=native no valgrind: the runner runs natively and a timed closed loop (DUR
#                    seconds, 10; CONNS clients, 100) reports the runner's CPU seconds per
#                    million echoed messages (from /proc, via torpor-load --pid)
#
# Per size: torpor `--shards 1` runs natively on CPU 0; the echo runner runs under
# `valgrind --tool=callgrind` on CPU 1; once the actor is up its counters are zeroed, a
# closed loop of 10 clients (torpor-load, CPU 1) echoes `messages` messages in all, and the
# counters are dumped. Each echoed message crosses the runner twice (received from the
# gateway, sent back). Output: instructions per echoed message and the top functions by self
# instructions; dumps land in target/perf-runner/.
set -euo pipefail
msgs=${1:-20000}
sizes=${2:-"1024 16384"}
source "$(dirname "$0")/lib.sh"
out=target/perf-runner
mkdir -p "$out"
if [[ -z ${NO_BUILD:-} ]]; then
  peers_show cargo build --release --bins --locked
  cargo build --release --bins --locked >"$PEERS_TMP/build.log" 2>&1 || {
    cat "$PEERS_TMP/build.log" >&2
    exit 1
  }
fi
runner=${RUNNER_BIN:-./target/release/echo-runner}
tag=${TAG:-$(basename "$(dirname "$runner")")}
perf_machine
echo "runner: $runner"

measure() {
  local size=$1 port data tpid vpid actor dump ir
  port=$(peers_free_port)
  data="$PEERS_TMP/rc-$size-data"
  mkdir -p "$data"
  peers_show taskset -c 0 ./target/release/torpor serve --listen "127.0.0.1:$port" --shards 1 --data-dir "$data"
  taskset -c 0 ./target/release/torpor serve --listen "127.0.0.1:$port" --shards 1 \
    --data-dir "$data" >"$PEERS_TMP/rc-$size-torpor.log" 2>&1 &
  tpid=$!
  PEERS_PIDS+=("$tpid")
  for _ in $(seq 1200); do curl -sf "http://127.0.0.1:$port/livez" >/dev/null && break; sleep 0.05; done
  if [[ ${MODE:-} == native ]]; then
    native "$size" "$port" "$tpid"
    return
  fi
  rm -f "$out"/callgrind.out.*
  peers_show taskset -c 1 valgrind --tool=callgrind "--callgrind-out-file=$out/callgrind.out.%p" \
    "$runner" --endpoint "http://127.0.0.1:$port"
  taskset -c 1 valgrind --tool=callgrind "--callgrind-out-file=$PWD/$out/callgrind.out.%p" \
    "$runner" --endpoint "http://127.0.0.1:$port" >"$PEERS_TMP/rc-$size-runner.log" 2>&1 &
  vpid=$!
  PEERS_PIDS+=("$vpid")
  for _ in $(seq 2400); do
    curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^torpor_runners_connected 1' && break
    sleep 0.05
  done
  actor=$(curl -sf -X POST "http://127.0.0.1:$port/actors?namespace=default" \
    -H 'content-type: application/json' \
    -d '{"name":"load","runner_name_selector":"default","crash_policy":"sleep"}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["actor"]["actor_id"])')
  # One echo first, so the actor is running before the counters are zeroed.
  LEGACY_N=1 LEGACY_WARMUP=0 run_load warm-$size echo-runner 1 - -- \
    --addr "127.0.0.1:$port" --actor "$actor" --mode closed -c 1 -s "$size" -n 1 --warmup-secs 0 >/dev/null
  peers_show callgrind_control -z "$vpid"
  callgrind_control -z "$vpid" >/dev/null 2>&1
  LEGACY_N=$((msgs / 10)) LEGACY_WARMUP=0 run_load "runner-$size" echo-runner 1 "$vpid" -- \
    --addr "127.0.0.1:$port" --actor "$actor" --mode closed -c 10 -s "$size" -n "$((msgs / 10))" --warmup-secs 0
  peers_show callgrind_control -d "$vpid"
  callgrind_control -d "$vpid" >/dev/null 2>&1
  sleep 1
  dump=$(ls -t "$out"/callgrind.out."$vpid".* 2>/dev/null | head -1)
  [[ -n $dump ]] || {
    echo "no callgrind dump in $out" >&2
    return 1
  }
  ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
  callgrind_annotate --inclusive=no --threshold=100 --auto=no "$dump" >"$out/annotate-$tag-$size.txt" 2>&1 || true
  mv "$dump" "$out/callgrind-$tag-$size.out"
  python3 - "$RESULTS" "$ir" "$out/annotate-$tag-$size.txt" "$size" "$tag" <<'EOF'
import json, re, sys
r = [json.loads(l) for l in open(sys.argv[1])][-1]
ir, size = int(sys.argv[2]), int(sys.argv[4])
m = r.get("messages") or 0
print(f"{size} B: {ir:,} instructions (user space) over {m:,} echoed messages")
if not m:
    sys.exit(0)
print("top functions by self instructions per echoed message (inlined pieces summed):")
cost = {}
for line in open(sys.argv[3]):
    g = re.match(r"^\s*([\d,]+) \(\s*([\d.]+)%\)\s+(.*)$", line)
    if not g or "PROGRAM TOTALS" in line:
        continue
    c = int(g[1].replace(",", ""))
    # entry points (main, the runtime's block_on) carry the whole program: not self cost
    if c >= ir * 0.99:
        continue
    name = re.sub(r"\s*\[[^]]*\]$", "", g[3]).split(":", 1)[-1]
    cost[name] = cost.get(name, 0) + c
for name, c in sorted(cost.items(), key=lambda kv: -kv[1])[:10]:
    print(f"  {c / m:>8,.0f}  {100 * c / ir:>5.1f}%  {name[:110]}")
print(f"RESULT runner_cost {sys.argv[5]} size={size} instructions_per_echoed_message={ir / m:,.0f}")
EOF
  stop_peer "$vpid" "$tpid"
}

native() {
  local size=$1 port=$2 tpid=$3 rpid actor
  peers_show taskset -c 1 "$runner" --endpoint "http://127.0.0.1:$port"
  taskset -c 1 "$runner" --endpoint "http://127.0.0.1:$port" >"$PEERS_TMP/rc-$size-runner.log" 2>&1 &
  rpid=$!
  PEERS_PIDS+=("$rpid")
  for _ in $(seq 1200); do
    curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^torpor_runners_connected 1' && break
    sleep 0.05
  done
  actor=$(curl -sf -X POST "http://127.0.0.1:$port/actors?namespace=default" \
    -H 'content-type: application/json' \
    -d '{"name":"load","runner_name_selector":"default","crash_policy":"sleep"}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["actor"]["actor_id"])')
  run_load "native-$size" echo-runner 1 "$rpid" -- --addr "127.0.0.1:$port" --actor "$actor" \
    --mode closed -c "${CONNS:-100}" -s "$size" -d "${DUR:-10}" --warmup-secs 2 --pid "$rpid"
  python3 - "$RESULTS" "$size" "$tag" <<'EOF'
import json, sys
r = [json.loads(l) for l in open(sys.argv[1])][-1]
print(f"RESULT runner_cost_native {sys.argv[3]} size={sys.argv[2]} runner_cpu_s_per_M={r.get('cpu_s_per_M', 0):.2f} msgs_per_sec={r.get('msgs_per_sec', 0):.0f}")
EOF
  stop_peer "$rpid" "$tpid"
}

for s in $sizes; do
  measure "$s"
done
echo "callgrind dumps and annotations: $out/"
