# Sourced by perf/scenario.sh and perf/profile.sh: builds the release binaries, prints the
# machine, runs torpor-load with every command shown, records each run's JSON line, and
# summarises rounds into per-round tables and median ratios.
#
# Load generator contract (the scripts are written against it):
#   torpor-load --addr HOST:PORT [--path P | --actor ID | --create-actor]
#     --mode closed|pipeline|rate|idle|flood -c N -s BYTES -n COUNT | -d SECS --warmup-secs S
#     --depth K --rate R --sources K --hold SECS --pid PID --threads T --json-only
# An older torpor-load without `--mode` only has a closed loop with a per-connection count;
# closed runs are translated for it (LEGACY_N round trips per connection) and other modes are
# skipped with a note.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=perf/peers.sh
source perf/peers.sh
peers_raise_nofile

LOAD=${PERF_LOAD:-./target/release/torpor-load}
LOAD_CPU=${LOAD_CPU:-1}
RESULTS="$PEERS_TMP/results.jsonl"
: >"$RESULTS"

perf_build() {
  peers_show cargo build --release --bins --locked
  cargo build --release --bins --locked >"$PEERS_TMP/build.log" 2>&1 || {
    cat "$PEERS_TMP/build.log" >&2
    return 1
  }
  # The fastwebsockets echo server: a crate of its own (not torpor's dependency), pinned by
  # its own Cargo.lock.
  peers_show cargo build --release --locked --manifest-path perf/fws-echo/Cargo.toml
  cargo build --release --locked --manifest-path perf/fws-echo/Cargo.toml \
    >>"$PEERS_TMP/build.log" 2>&1 || {
    cat "$PEERS_TMP/build.log" >&2
    return 1
  }
}

perf_machine() {
  echo "machine: nproc=$(nproc) cpu=\"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')\" kernel=$(uname -r)"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "torpor: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)'); $(command -v nginx >/dev/null && nginx -v 2>&1 || echo 'nginx not installed yet')"
  echo "torpor-load: $(load_is_new && echo 'mode-capable' || echo "legacy closed-loop only (LEGACY_N=${LEGACY_N:-400} per connection)")"
  echo "date: $(date -u +%FT%TZ)"
}

load_is_new() { "$LOAD" --help 2>/dev/null | grep -q -- '--mode'; }

# CPU seconds (user+system, all threads) of a process, from /proc.
proc_cpu_s() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# run_load CASE PEER ROUND PID -- ARGS...: runs torpor-load pinned to LOAD_CPU with the
# contract's ARGS (plus --threads 1 --json-only), records its final JSON line with
# case/peer/round and cpu_wrap_s (CPU seconds of PID over the whole invocation, a
# cross-check of --pid) in $RESULTS, and prints one summary line. PID may be "-".
# Returns 2 when the load generator cannot run this mode.
run_load() {
  local case=$1 peer=$2 round=$3 pid=$4
  shift 5
  local args=("$@") cmd out json c0=0 c1=0 mode=closed i
  for ((i = 0; i < ${#args[@]}; i++)); do
    [[ ${args[$i]} == --mode ]] && mode=${args[$((i + 1))]}
  done
  if load_is_new; then
    cmd=(taskset -c "$LOAD_CPU" "$LOAD" "${args[@]}" --threads 1 --json-only)
  else
    if [[ $mode != closed ]]; then
      echo "SKIP $case $peer round $round: needs the new torpor-load (--mode $mode)" >&2
      return 2
    fi
    # Legacy translation: drop what it lacks, count round trips per connection instead.
    local legacy=() skip=0 a
    for a in "${args[@]}"; do
      if ((skip)); then skip=0; continue; fi
      case $a in
        --mode | --path | -d | --warmup-secs | --pid | --threads | -n) skip=1 ;;
        --json-only) ;;
        *) legacy+=("$a") ;;
      esac
    done
    cmd=(taskset -c "$LOAD_CPU" "$LOAD" "${legacy[@]}" -n "${LEGACY_N:-400}" --warmup "${LEGACY_WARMUP:-20}")
  fi
  peers_show "${cmd[@]}"
  [[ $pid != - ]] && c0=$(proc_cpu_s "$pid")
  if ! out=$("${cmd[@]}" 2>"$PEERS_TMP/load.err"); then
    echo "torpor-load failed ($case $peer round $round):" >&2
    tail -5 "$PEERS_TMP/load.err" >&2
    return 1
  fi
  [[ $pid != - ]] && c1=$(proc_cpu_s "$pid")
  json=$(printf '%s\n' "$out" | grep '^{' | tail -1)
  [[ -n $json ]] || {
    echo "torpor-load printed no JSON line ($case $peer round $round)" >&2
    return 1
  }
  python3 - "$RESULTS" "$case" "$peer" "$round" "$c0" "$c1" "$json" <<'EOF'
import json, sys
path, case, peer, rnd, c0, c1, line = sys.argv[1:8]
r = json.loads(line)
r.update(case=case, peer=peer, round=int(rnd), cpu_wrap_s=float(c1) - float(c0))
size = r.get("size") or 0
# Legacy output lacks some keys: derive what can be derived.
if "messages" not in r and "count" in r:
    r["messages"] = r["count"] * r.get("connections", 1)
if "mb_per_sec" not in r and "msgs_per_sec" in r:
    r["mb_per_sec"] = r["msgs_per_sec"] * size / 1e6
cpu = r.get("pid_cpu_s")
if cpu is None:
    cpu = r["cpu_wrap_s"]
if r.get("messages"):
    r["cpu_s_per_M"] = cpu / r["messages"] * 1e6
with open(path, "a") as f:
    f.write(json.dumps(r) + "\n")
def g(k, fmt="{:.0f}"):
    v = r.get(k)
    return "-" if v is None else fmt.format(v)
print("  %-14s %-8s round %d: %s msg/s %s MB/s p50 %s us p99 %s us errors %s late %s cpu %s/%s s" % (
    case, peer, r["round"], g("msgs_per_sec"), g("mb_per_sec", "{:.1f}"), g("p50_us"),
    g("p99_us"), g("errors"), g("late"), g("pid_cpu_s", "{:.2f}"), g("cpu_wrap_s", "{:.2f}")))
EOF
}

# summarize SCENARIO SPEC...: per case, a table of rounds x peers for the spec's metric, the
# medians, and the median over rounds of each per-round ratio; then one RESULT line.
# SPEC = CASE:METRIC:NUM/DEN:OP:TARGET[:LABEL] with OP one of >= <= (the target direction),
# `info` (in the RESULT line, no target) or `table` (table only). NUM alone (no /DEN) takes
# the median of NUM's metric itself rather than a ratio.
summarize() {
  python3 - "$RESULTS" "$@" <<'EOF'
import json, statistics, sys
path, scen, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = [json.loads(l) for l in open(path) if l.strip()]
def val(case, peer, rnd, metric):
    for r in rows:
        if r["case"] == case and r["peer"] == peer and r["round"] == rnd:
            return r.get(metric)
    return None
parts, verdicts, shown = [], [], set()
def cell(v):
    if v is None:
        return f"{'-':>14}"
    return f"{v:>14,.0f}" if abs(v) >= 100 else f"{v:>14.3g}"
for spec in specs:
    f = spec.split(":")
    case, metric, ratio, op, target = f[:5]
    label = f[5] if len(f) > 5 else ""
    num, _, den = ratio.partition("/")
    rounds = sorted({r["round"] for r in rows if r["case"] == case})
    peers = []
    for r in rows:
        if r["case"] == case and r["peer"] not in peers:
            peers.append(r["peer"])
    if (case, metric) not in shown:
        shown.add((case, metric))
        print(f"\n{case}  [{metric}]")
        print("round  " + "".join(f"{p:>14}" for p in peers))
        for rd in rounds:
            cells = [val(case, p, rd, metric) for p in peers]
            print(f"{rd:<7}" + "".join(cell(c) for c in cells))
        med = []
        for p in peers:
            v = [x for x in (val(case, p, rd, metric) for rd in rounds) if x is not None]
            med.append(statistics.median(v) if v else None)
        print("median " + "".join(cell(c) for c in med))
    if op == "table":
        continue
    ratios = []
    for rd in rounds:
        a = val(case, num, rd, metric)
        b = val(case, den, rd, metric) if den else 1.0
        if a is not None and b:
            ratios.append(a / b)
    name = (label + " " if label else "") + (f"{num}/{den}" if den else f"{num}_{metric}")
    if not ratios:
        parts.append(f"{name}=n/a")
        verdicts.append(f"{name} no data")
        continue
    m = statistics.median(ratios)
    goal = "" if op == "info" else f"  (target {op}{target})"
    print(f"{name} per round: " + " ".join(f"{x:.4g}" for x in ratios) + f"  median {m:.4g}{goal}")
    parts.append(f"{name}={m:.2f}" if den else f"{name}={m:.0f}")
    if op != "info":
        ok = m >= float(target) if op == ">=" else m <= float(target)
        verdicts.append(f"{name} {op}{target} {'met' if ok else 'MISSED'}")
print()
print(f"RESULT {scen} " + " ".join(parts) + "   [" + ("; ".join(verdicts) or "no target") + "]")
EOF
}

# median_of CASE PEER METRIC: the median of a metric over the recorded rounds.
median_of() {
  python3 - "$RESULTS" "$@" <<'EOF'
import json, statistics, sys
path, case, peer, metric = sys.argv[1:5]
v = [r[metric] for r in map(json.loads, open(path)) if r["case"] == case and r["peer"] == peer and r.get(metric) is not None]
print(statistics.median(v) if v else 0)
EOF
}
