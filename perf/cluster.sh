#!/usr/bin/env bash
# One node against three: the closed-loop echo through torpor alone, and through a cluster
# of three nodes where the client's node (n1) is not the runner's (n2) — every message and
# every echo crosses nodes over NATS (n3 leads placement and sees no traffic). Interleaved
# rounds; per round: msg/s, latency p50/p99, and CPU per echoed message of the torpor
# processes (+ nats-server for the cluster), from /proc.
#
#   usage: bash perf/cluster.sh [rounds=3]
#   env:   DUR (seconds per run, 5), WARMUP (1), CONNS (100), SIZE (1024)
#
# Layout on two cores: every torpor process (the one node; n1, n2, n3) on CPU 0; the load
# generator, the echo runner and nats-server on CPU 1. Same-machine numbers: NATS, both
# nodes and the runner share two cores, so the cluster's throughput says what the hop costs
# in CPU, not what three machines would carry.
set -euo pipefail
ROUNDS=${1:-3}
source "$(dirname "$0")/lib.sh"
DUR=${DUR:-5}
WARMUP=${WARMUP:-1}
CONNS=${CONNS:-100}
SIZE=${SIZE:-1024}

perf_build
perf_machine

# A throwaway PostgreSQL cluster (initdb in the temp dir, as the postgres user when root) and
# a throwaway nats-server, on free loopback ports.
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[[ -x $PG_BIN/initdb ]] || { echo "PostgreSQL is not installed (bash scripts/test.sh installs it)" >&2; exit 1; }
command -v nats-server >/dev/null || { echo "nats-server is not installed (bash scripts/test.sh installs it)" >&2; exit 1; }
PG_DIR="$PEERS_TMP/pg"
PG_PORT=$(peers_free_port)
as_pg=()
if [[ $(id -u) == 0 ]]; then
  as_pg=(runuser -u postgres --)
  mkdir -p "$PG_DIR" && chown postgres "$PG_DIR" "$PEERS_TMP"
fi
peers_show "${as_pg[@]}" "$PG_BIN/initdb" -D "$PG_DIR" -U torpor --auth=trust
"${as_pg[@]}" "$PG_BIN/initdb" -D "$PG_DIR" -U torpor --auth=trust >"$PEERS_TMP/initdb.log" 2>&1
peers_show "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR" -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off" start
"${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/log" -w \
  -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
stop_pg() { "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR" -m immediate stop >/dev/null 2>&1 || true; }
trap 'stop_pg; peers_cleanup' EXIT
"${as_pg[@]}" "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U torpor torpor
NATS_PORT=$(peers_free_port)
peers_show taskset -c 1 nats-server -a 127.0.0.1 -p "$NATS_PORT"
taskset -c 1 nats-server -a 127.0.0.1 -p "$NATS_PORT" >"$PEERS_TMP/nats.log" 2>&1 &
NATS_PID=$!
PEERS_PIDS+=("$NATS_PID")
peers_wait_port "$NATS_PORT"

# start_node NAME: one cluster node on CPU 0; sets ${NAME}_PORT and ${NAME}_PID.
start_node() {
  local name=$1 port pid
  port=$(peers_free_port)
  mkdir -p "$PEERS_TMP/$name"
  peers_show taskset -c 0 ./target/release/torpor serve --listen "127.0.0.1:$port" --shards 1 "(cluster node $name)"
  TORPOR_STORE__BACKEND=postgres TORPOR_STORE__POSTGRES_URL="postgres://torpor@127.0.0.1:$PG_PORT/torpor" \
    TORPOR_CLUSTER__ENABLED=true TORPOR_CLUSTER__NATS_URL="nats://127.0.0.1:$NATS_PORT" \
    taskset -c 0 ./target/release/torpor serve --listen "127.0.0.1:$port" --shards 1 \
    --data-dir "$PEERS_TMP/$name" >"$PEERS_TMP/$name.log" 2>&1 &
  pid=$!
  PEERS_PIDS+=("$pid")
  for _ in $(seq 1200); do curl -sf "http://127.0.0.1:$port/livez" >/dev/null && break; sleep 0.05; done
  printf -v "${name}_PORT" %s "$port"
  printf -v "${name}_PID" %s "$pid"
}

start_node N3
for _ in $(seq 1200); do
  curl -sf "http://127.0.0.1:$N3_PORT/metrics" | grep -q '^torpor_cluster_leading_epoch [1-9]' && break
  sleep 0.05
done
start_node N1
start_node N2
peers_show taskset -c 1 ./target/release/echo-runner --endpoint "http://127.0.0.1:$N2_PORT"
taskset -c 1 ./target/release/echo-runner --endpoint "http://127.0.0.1:$N2_PORT" >"$PEERS_TMP/c-runner.log" 2>&1 &
PEERS_PIDS+=("$!")
C_ACTOR=""
for _ in $(seq 1200); do
  C_ACTOR=$(curl -sf -X POST "http://127.0.0.1:$N1_PORT/actors?namespace=default" \
    -H 'content-type: application/json' \
    -d '{"name":"load","runner_name_selector":"default","crash_policy":"sleep"}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["actor"]["actor_id"])' 2>/dev/null) && break
  sleep 0.05
done
[[ -n $C_ACTOR ]] || { echo "could not create an actor on the cluster" >&2; cat "$PEERS_TMP"/N*.log >&2; exit 1; }
start_torpor T 1 0 1

cpu_of() { # pids... -> summed CPU seconds
  local s=0 p
  for p in "$@"; do s=$(python3 -c "print($s + $(proc_cpu_s "$p"))"); done
  echo "$s"
}

echo "== one node vs three: $CONNS clients x $SIZE B closed loop, client on node 1, runner on node 2"
echo "rounds=$ROUNDS duration=${DUR}s warmup=${WARMUP}s"
for r in $(seq "$ROUNDS"); do
  for peer in one three; do
    if [[ $peer == one ]]; then
      target=(--addr "127.0.0.1:$T_PORT" --actor "$T_ACTOR")
      pids=("$T_PID")
    else
      target=(--addr "127.0.0.1:$N1_PORT" --actor "$C_ACTOR")
      pids=("$N1_PID" "$N2_PID" "$N3_PID" "$NATS_PID")
    fi
    c0=$(cpu_of "${pids[@]}")
    each0=(); for p in "${pids[@]}"; do each0+=("$(proc_cpu_s "$p")"); done
    run_load hop "$peer" "$r" - -- "${target[@]}" --mode closed -c "$CONNS" -s "$SIZE" \
      -d "$DUR" --warmup-secs "$WARMUP"
    c1=$(cpu_of "${pids[@]}")
    if [[ $peer == three ]]; then
      # Where the cluster's CPU went: each process's share of the run.
      split=""; i=0
      for name in n1 n2 n3 nats; do
        split+="$name=$(python3 -c "print(round($(proc_cpu_s "${pids[$i]}") - ${each0[$i]}, 2))")s "
        i=$((i + 1))
      done
      echo "    CPU by process over the run: $split"
    fi
    # The CPU of the proxies (and NATS) over the run, per echoed message.
    python3 - "$RESULTS" "$c0" "$c1" <<'EOF'
import json, sys
path, c0, c1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
lines = open(path).read().splitlines()
r = json.loads(lines[-1])
r["proxy_cpu_us"] = (c1 - c0) / r["messages"] * 1e6 if r.get("messages") else None
lines[-1] = json.dumps(r)
open(path, "w").write("\n".join(lines) + "\n")
print("    proxy CPU (torpor processes%s): %.1f us per echoed message (over the whole run)"
      % (" + nats-server" if r["peer"] == "three" else "", r["proxy_cpu_us"] or 0))
EOF
  done
done
# How many frames each NATS message carried (the bus publishes one message per node and round).
for n in N1 N2; do
  port_var="${n}_PORT"
  curl -sf "http://127.0.0.1:${!port_var}/metrics" |
    awk -v n="$n" '/^torpor_cluster_bus_messages_out_total/ { m = $2 } /^torpor_cluster_bus_frames_out_total/ { f = $2 }
      END { if (m > 0) printf "  %s: %d NATS messages out, %.2f frames each\n", n, m, f / m }'
done
python3 - "$RESULTS" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def med(peer, k):
    v = [r[k] for r in rows if r["peer"] == peer and r.get(k) is not None]
    return statistics.median(v) if v else float("nan")
print("| | one node | three nodes (cross-node hop) | three / one |")
print("| --- | --- | --- | --- |")
for k, label in [("msgs_per_sec", "msg/s"), ("p50_us", "p50 us"), ("p99_us", "p99 us"),
                 ("proxy_cpu_us", "CPU us per echo (torpor + NATS)")]:
    a, b = med("one", k), med("three", k)
    print(f"| {label} | {a:,.1f} | {b:,.1f} | {b / a:.2f} |")
print("RESULT cluster hop_cpu_us_per_echo=%.1f throughput_ratio=%.2f"
      % (med("three", "proxy_cpu_us") - med("one", "proxy_cpu_us"),
         med("three", "msgs_per_sec") / med("one", "msgs_per_sec")))
EOF
