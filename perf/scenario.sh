#!/usr/bin/env bash
# Side-by-side scenarios: torpor vs nginx (Debian, one worker) proxying to ws-echo vs ws-echo
# directly. Peers run interleaved (A B C, A B C, ...) so that drift on a shared machine hits
# all of them alike; each scenario prints per-round numbers, the median of the per-round
# ratios, and one `RESULT Sx ...` line.
#
#   usage: bash perf/scenario.sh S1|S2|S3|S4|S5|S6|S7 [rounds=3] [S6: connections=50000]
#   env:   DUR (seconds per run, 10), WARMUP (seconds, 2), RATE (S4, 50000),
#          CAL_DUR (S5 calibration seconds, 5), HOLD (S6 seconds, 10), SOURCES (S6, 8),
#          NGINX_IDLE (S6 connections through nginx, 5000; 0 skips), LEGACY_N (see lib.sh)
#
# Layout: the system under test (torpor `--shards 1`, or nginx's one worker) on CPU 0; the
# load generator and the backend (echo runner, or ws-echo) on CPU 1. S7 runs torpor
# `--shards 2` unpinned beside `--shards 1`.
set -euo pipefail
scen=${1:?usage: bash perf/scenario.sh S1..S7 [rounds] [connections]}
ROUNDS=${2:-3}
source "$(dirname "$0")/lib.sh"
DUR=${DUR:-10}
WARMUP=${WARMUP:-2}
((ROUNDS >= 1)) || { echo "rounds must be >= 1" >&2; exit 2; }

declare -A TARGET PID
SKIPPED=0

# The peers of S1-S6: two echo backends on CPU 1, ws-echo (tokio-tungstenite) and fws-echo
# (fastwebsockets), each behind its own nginx (one worker, CPU 0) and each also measured
# directly; torpor + its echo runner. Only the peer under load runs; the others sit idle.
start_side_by_side() {
  start_wsecho E 1
  start_fwsecho F 1
  start_nginx N "$E_PORT" 0 "${1:-0}"
  local n_conf=$N_CONF
  start_nginx NF "$F_PORT" 0 "${1:-0}"
  start_torpor T 1 0 1
  TARGET[torpor]="--addr 127.0.0.1:$T_PORT --actor $T_ACTOR"
  TARGET[nginx]="--addr 127.0.0.1:$N_PORT --path /"
  TARGET[nginx-fws]="--addr 127.0.0.1:$NF_PORT --path /"
  TARGET[direct]="--addr 127.0.0.1:$E_PORT --path /"
  TARGET[direct-fws]="--addr 127.0.0.1:$F_PORT --path /"
  PID[torpor]=$T_PID
  PID[nginx]=$N_PID
  PID[nginx-fws]=$NF_PID
  PID[direct]=$E_PID
  PID[direct-fws]=$F_PID
  echo "nginx.conf ($n_conf; nginx-fws differs only in its ports):"
  sed 's/^/    /' "$n_conf"
}

# run_case CASE PEER ROUND ARGS...: one load run against PEER; a mode the load generator
# lacks is noted once and skipped.
run_case() {
  local case=$1 peer=$2 round=$3 rc=0
  shift 3
  # shellcheck disable=SC2086
  run_load "$case" "$peer" "$round" "${PID[$peer]}" -- ${TARGET[$peer]} "$@" || rc=$?
  if ((rc == 2)); then
    SKIPPED=1
  elif ((rc != 0)); then
    exit "$rc"
  fi
}

header() {
  echo "== $scen: $1"
  echo "rounds=$ROUNDS duration=${DUR}s warmup=${WARMUP}s; peers interleaved in the order listed"
}

perf_build
perf_machine

case $scen in
  S1)
    header "100 clients x 20 B closed loop: torpor vs nginx vs the backends direct"
    echo "layout: torpor/nginx on CPU 0; load + backend on CPU 1 (direct: the backend and load share CPU 1)"
    start_side_by_side
    for r in $(seq "$ROUNDS"); do
      for p in torpor nginx nginx-fws direct direct-fws; do
        run_case S1 "$p" "$r" --mode closed -c 100 -s 20 -d "$DUR" --warmup-secs "$WARMUP"
      done
    done
    summarize S1 S1:p99_us:torpor/nginx:table:0 S1:cpu_s_per_M:torpor/nginx:table:0 \
      S1:msgs_per_sec:torpor/nginx:'>=':1.3 S1:msgs_per_sec:torpor/nginx-fws:'>=':1.3 \
      S1:msgs_per_sec:torpor/direct:'>=':0.6 S1:msgs_per_sec:torpor/direct-fws:info:0
    ;;
  S2)
    header "closed loop, 500 x 1 KiB, 200 x 16 KiB and 100 x 64 KiB: torpor vs nginx (both backends)"
    start_side_by_side
    for r in $(seq "$ROUNDS"); do
      for p in torpor nginx nginx-fws; do
        run_case S2-500x1KiB "$p" "$r" --mode closed -c 500 -s 1024 -d "$DUR" --warmup-secs "$WARMUP"
      done
      for p in torpor nginx nginx-fws; do
        run_case S2-200x16KiB "$p" "$r" --mode closed -c 200 -s 16384 -d "$DUR" --warmup-secs "$WARMUP"
      done
      for p in torpor nginx nginx-fws; do
        run_case S2-100x64KiB "$p" "$r" --mode closed -c 100 -s 65536 -d "$DUR" --warmup-secs "$WARMUP"
      done
    done
    summarize S2 S2-500x1KiB:cpu_s_per_M:torpor/nginx:table:0 S2-200x16KiB:cpu_s_per_M:torpor/nginx:table:0 \
      S2-100x64KiB:cpu_s_per_M:torpor/nginx:table:0 \
      S2-500x1KiB:msgs_per_sec:torpor/nginx:'>=':1.3:1KiB \
      S2-500x1KiB:msgs_per_sec:torpor/nginx-fws:'>=':1.3:1KiB \
      S2-200x16KiB:msgs_per_sec:torpor/nginx:'>=':1.3:16KiB \
      S2-200x16KiB:msgs_per_sec:torpor/nginx-fws:'>=':1.3:16KiB \
      S2-100x64KiB:msgs_per_sec:torpor/nginx-fws:'>=':1.3:64KiB \
      S2-200x16KiB:cpu_s_per_M:torpor/nginx-fws:'<=':0.7:16KiB-cpu \
      S2-100x64KiB:cpu_s_per_M:torpor/nginx-fws:'<=':0.7:64KiB-cpu
    ;;
  S3)
    header "pipelined flood, 10 clients, depth 64, 64 B and 1 KiB: MB/s torpor vs nginx"
    start_side_by_side
    for r in $(seq "$ROUNDS"); do
      for s in 64 1024; do
        for p in torpor nginx; do
          run_case "S3-${s}B" "$p" "$r" --mode pipeline -c 10 --depth 64 -s "$s" -d "$DUR" --warmup-secs "$WARMUP"
        done
      done
    done
    summarize S3 S3-64B:cpu_s_per_M:torpor/nginx:table:0 S3-1024B:cpu_s_per_M:torpor/nginx:table:0 \
      S3-64B:mb_per_sec:torpor/nginx:'>=':1.0:64B \
      S3-1024B:mb_per_sec:torpor/nginx:'>=':1.0:1KiB
    ;;
  S4)
    rate=${RATE:-50000}
    header "open loop at $rate msg/s (100 connections, 20 B): proxy CPU seconds per million echoed messages"
    echo "cpu_s_per_M = --pid CPU seconds of the proxy (torpor, or nginx's worker) / echoed messages x 1e6;"
    echo "each echoed message crosses the proxy twice (client->backend, backend->client)"
    start_side_by_side
    for r in $(seq "$ROUNDS"); do
      for p in torpor nginx; do
        run_case S4 "$p" "$r" --mode rate --rate "$rate" -c 100 -s 20 -d "$DUR" --warmup-secs "$WARMUP" --pid "${PID[$p]}"
      done
    done
    summarize S4 S4:msgs_per_sec:torpor/nginx:table:0 S4:p99_us:torpor/nginx:table:0 \
      S4:cpu_s_per_M:torpor/nginx:'<=':0.7
    ;;
  S5)
    header "p99 at 50% of nginx's closed-loop maximum (100 clients, 20 B), rate mode"
    start_side_by_side
    cal=${CAL_DUR:-5}
    for r in 1 2 3; do
      run_case S5-calibrate nginx "$r" --mode closed -c 100 -s 20 -d "$cal" --warmup-secs 1
    done
    max=$(median_of S5-calibrate nginx msgs_per_sec)
    rate=$(python3 -c "print(max(1, int(float('$max') * 0.5)))")
    echo "nginx closed-loop maximum (median of 3): ${max%.*} msg/s -> rate $rate msg/s"
    for r in $(seq "$ROUNDS"); do
      for p in torpor nginx; do
        run_case S5 "$p" "$r" --mode rate --rate "$rate" -c 100 -s 20 -d "$DUR" --warmup-secs "$WARMUP" --pid "${PID[$p]}"
      done
    done
    summarize S5 S5:msgs_per_sec:torpor/nginx:table:0 S5:p50_us:torpor/nginx:table:0 \
      S5:p999_us:torpor/nginx:table:0 S5:p99_us:torpor/nginx:'<=':1.0
    ;;
  S6)
    conns=${3:-50000}
    hold=${HOLD:-10}
    sources=${SOURCES:-8}
    nconns=${NGINX_IDLE:-5000}
    # One process holds every connection (torpor; nginx holds two descriptors per
    # connection): clamp to the open-file limit this shell could get, and say so.
    lim=$(ulimit -n)
    if ((conns + 1024 > lim)); then
      echo "WARNING: open-file limit is $lim (raising it was not permitted here); $conns connections clamped to $((lim - 1024))"
      conns=$((lim - 1024))
    fi
    if ((nconns > 0 && 2 * nconns + 1024 > lim)); then
      echo "WARNING: nginx connections clamped from $nconns to $(((lim - 1024) / 2)) by the open-file limit"
      nconns=$(((lim - 1024) / 2))
    fi
    header "idle: $conns connections through torpor held ${hold}s, RSS per connection above baseline"
    echo "nginx for comparison: $nconns connections (its upstream connections spread over 4 source addresses)"
    start_side_by_side 1
    for r in $(seq "$ROUNDS"); do
      if ((r > 1)); then
        # A fresh torpor each round: memory freed by the previous round's connections would
        # otherwise be reused and the growth above the baseline understated.
        stop_peer "$T_PID" "$T_RUNNER"
        start_torpor T 1 0 1
        TARGET[torpor]="--addr 127.0.0.1:$T_PORT --actor $T_ACTOR"
        PID[torpor]=$T_PID
      fi
      run_case S6 torpor "$r" --mode idle -c "$conns" -s 20 --sources "$sources" --hold "$hold" --pid "${PID[torpor]}"
      sleep 2
      if ((nconns > 0)); then
        run_case S6-nginx nginx "$r" --mode idle -c "$nconns" -s 20 --sources "$sources" --hold "$hold" --pid "${PID[nginx]}"
        sleep 2
      fi
    done
    specs=(S6:connected:torpor:info:0 S6:rss_per_conn_bytes:torpor:'<=':4096)
    ((nconns > 0)) && specs+=(S6-nginx:rss_per_conn_bytes:nginx:info:0)
    summarize S6 "${specs[@]}"
    ;;
  S7)
    header "torpor --shards 2 (unpinned) vs --shards 1 (CPU 0), closed loop 200 x 1 KiB"
    echo "note: with --shards 2 torpor's shard threads pin themselves to CPUs 0 and 1, so shard 1,"
    echo "      the load generator and the echo runner share CPU 1 on a 2-core machine"
    start_torpor T1 1 0 1
    start_torpor T2 2 "" 1
    TARGET[shards1]="--addr 127.0.0.1:$T1_PORT --actor $T1_ACTOR"
    TARGET[shards2]="--addr 127.0.0.1:$T2_PORT --actor $T2_ACTOR"
    PID[shards1]=$T1_PID
    PID[shards2]=$T2_PID
    for r in $(seq "$ROUNDS"); do
      for p in shards2 shards1; do
        run_case S7 "$p" "$r" --mode closed -c 200 -s 1024 -d "$DUR" --warmup-secs "$WARMUP"
      done
    done
    summarize S7 S7:msgs_per_sec:shards2/shards1:info:0
    ;;
  *)
    echo "unknown scenario $scen (S1..S7)" >&2
    exit 2
    ;;
esac
if ((SKIPPED)); then
  echo "note: some runs were skipped: this torpor-load lacks the modes they need"
fi
