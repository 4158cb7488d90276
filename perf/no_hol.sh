#!/usr/bin/env bash
# No head-of-line blocking: a well-behaved closed-loop client must keep its throughput while
# a hostile client floods the SAME actor with large messages and never reads (torpor stops
# reading it once half of limits.client_outbound_bytes is queued to it, so its flood stalls in
# its own TCP window; it is closed with guard.client_too_slow and reset when the queue passes
# the limit or makes no progress for timeouts.client_idle_ping_ms; the flooder then
# reconnects and floods again). Rounds interleave (A) the closed-loop client alone and (B) the same client
# during the flood; the ratio B/A per round and its median are printed (target >= 0.90).
# torpor runs pinned on CPU 0 with one shard; the echo runner and both load generators share
# CPU 1, so the per-phase CPU use of torpor and the runner is printed too.
#   usage: bash perf/no_hol.sh [rounds] [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-3}
source perf/start_pair.sh

actor=$(curl -sf -X POST "http://127.0.0.1:$port/actors?namespace=default" \
  -H 'content-type: application/json' \
  -d '{"name":"no-hol","runner_name_selector":"default","crash_policy":"sleep"}' |
  sed -n 's/.*"actor_id":"\([^"]*\)".*/\1/p')
[ -n "$actor" ] || { echo "no_hol: creating the actor failed" >&2; exit 1; }

load() { taskset -c 1 ./target/release/torpor-load --addr "127.0.0.1:$port" --actor "$actor" "$@"; }
# A numeric field of a torpor-load JSON line.
field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p" <<<"$2"; }
# utime+stime of a process in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
too_slow() { curl -sf "http://127.0.0.1:$port/metrics" | awk '/client_too_slow/ {print $2}'; }
hz=$(getconf CLK_TCK)

# The measured client: 10 connections, 1 KiB messages, one in flight each.
closed() { load -c 10 -s 1024 -d "$secs" --warmup-secs 1 --pid "$gw" --json-only | tail -1 || true; }

ratios=()
printf '%-6s %12s %12s %7s   %s\n' round "A msg/s" "B msg/s" "B/A" \
  "cpu% torpor A/B  runner A/B   flood: MB/s cpu% reconnects  too_slow closes"
for r in $(seq "$rounds"); do
  r0=$(ticks "$runner")
  a=$(closed)
  r1=$(ticks "$runner")
  slow0=$(too_slow)
  load --mode flood -c 2 -s 65536 -d "$((secs + 3))" --json-only >"$data/flood.json" 2>/dev/null &
  flood=$!
  sleep 1
  r2=$(ticks "$runner")
  b=$(closed)
  r3=$(ticks "$runner")
  wait "$flood" || true
  slow1=$(too_slow)
  f=$(tail -1 "$data/flood.json")
  ra=$(field msgs_per_sec "$a")
  rb=$(field msgs_per_sec "$b")
  ratio=$(awk -v a="$ra" -v b="$rb" 'BEGIN { printf "%.3f", (a > 0 ? b / a : 0) }')
  ratios+=("$ratio")
  # Window lengths (warm-up + measure) for the runner's CPU share.
  win=$(awk -v s="$secs" 'BEGIN { print s + 1 }')
  printf '%-6s %12.0f %12.0f %7s   %5.0f/%-5.0f %5.0f/%-5.0f   %10.0f %4.0f %4s %8s\n' \
    "$r" "$ra" "$rb" "$ratio" \
    "$(awk -v c="$(field pid_cpu_s "$a")" -v s="$secs" 'BEGIN { print 100 * c / s }')" \
    "$(awk -v c="$(field pid_cpu_s "$b")" -v s="$secs" 'BEGIN { print 100 * c / s }')" \
    "$(awk -v t=$((r1 - r0)) -v h="$hz" -v w="$win" 'BEGIN { print 100 * t / h / w }')" \
    "$(awk -v t=$((r3 - r2)) -v h="$hz" -v w="$win" 'BEGIN { print 100 * t / h / w }')" \
    "$(field mb_per_sec "$f")" \
    "$(awk -v c="$(field loadgen_cpu_s "$f")" -v s="$(field seconds "$f")" 'BEGIN { print 100 * c / s }')" \
    "$(field reconnects "$f")" "$((slow1 - slow0))"
  echo "  A: p50=$(field p50_us "$a")us p99=$(field p99_us "$a")us errors=$(field errors "$a")" \
    " B: p50=$(field p50_us "$b")us p99=$(field p99_us "$b")us errors=$(field errors "$b")"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END {
  print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }')
echo "median B/A = $median (target >= 0.90)"
curl -sf "http://127.0.0.1:$port/metrics" | grep too_slow
