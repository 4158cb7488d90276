#!/usr/bin/env bash
# Profiles of torpor under the S1 load (100 clients x 20 B closed loop, torpor `--shards 1` on
# CPU 0, echo runner and load on CPU 1).
#
#   bash perf/profile.sh flame [seconds=10]
#       `perf record -e cpu-clock` of torpor while the load runs, then a flamegraph SVG
#       (inferno, installed with `cargo install inferno --locked --root target/inferno` on
#       first use unless NO_INFERNO=1) and, always, the top symbols of `perf report --stdio`.
#       PERF_CALLGRAPH=fp|dwarf (default dwarf: the release build has no frame pointers).
#   bash perf/profile.sh callgrind [messages=20000]
#       torpor under `valgrind --tool=callgrind`; counters are zeroed once the runner and
#       the actor are up, a closed loop of 10 clients x 20 B runs a fixed number of echoes,
#       the counters are dumped, and instructions per echoed message (each crossing torpor
#       twice) are printed with the top functions. Connection handshakes of the 10 clients
#       are included in the count.
# PROFILE_SIZE=<bytes> changes the message size of both (default 20).
# Output files land in target/perf-profile/.
set -euo pipefail
what=${1:-flame}
source "$(dirname "$0")/lib.sh"
out=target/perf-profile
mkdir -p "$out"
perf_build
perf_machine

flame() {
  local secs=${1:-10} prec cg=()
  case ${PERF_CALLGRAPH:-dwarf} in
    fp) cg=(-g) ;;
    *) cg=(--call-graph dwarf,16384 -F 499) ;;
  esac
  start_torpor T 1 0 1
  peers_show perf record -e cpu-clock "${cg[@]}" -p "$T_PID" -o "$out/perf.data"
  perf record -e cpu-clock "${cg[@]}" -p "$T_PID" -o "$out/perf.data" 2>"$out/perf-record.log" &
  prec=$!
  sleep 0.5
  PEERS_PIDS+=("$prec")
  LEGACY_N=${LEGACY_N:-$((secs * 80))} run_load flame torpor 1 "$T_PID" -- \
    --addr "127.0.0.1:$T_PORT" --actor "$T_ACTOR" --mode closed -c 100 -s "${PROFILE_SIZE:-20}" -d "$secs" --warmup-secs 1
  kill -INT "$prec"
  wait "$prec" || true
  peers_show "perf script -i $out/perf.data > $out/perf.script"
  perf script -i "$out/perf.data" >"$out/perf.script" 2>/dev/null
  local bin=target/inferno/bin
  if [[ ! -x $bin/inferno-flamegraph && -z ${NO_INFERNO:-} ]]; then
    peers_show cargo install inferno --locked --root target/inferno
    cargo install inferno --locked --root target/inferno >"$out/inferno-install.log" 2>&1 ||
      echo "inferno could not be installed (see $out/inferno-install.log); top symbols only" >&2
  fi
  if [[ -x $bin/inferno-flamegraph ]]; then
    peers_show "$bin/inferno-collapse-perf < $out/perf.script | $bin/inferno-flamegraph > $out/torpor-s1.svg"
    "$bin/inferno-collapse-perf" <"$out/perf.script" >"$out/torpor-s1.folded"
    "$bin/inferno-flamegraph" --title "torpor, S1 load" <"$out/torpor-s1.folded" >"$out/torpor-s1.svg"
    echo "flamegraph: $out/torpor-s1.svg (folded stacks: $out/torpor-s1.folded)"
  fi
  echo "top symbols (self time):"
  perf report -i "$out/perf.data" --stdio --no-children --sort dso,symbol -g none \
    --percent-limit 0.7 </dev/null 2>"$out/perf-report.log" | tee "$out/perf-report.txt" | grep -E "^ +[0-9]" | sed 's/ *- *- *$//' | head -40 || true
}

callgrind() {
  local msgs=${1:-20000} size=${PROFILE_SIZE:-20} vpid dump ir
  rm -f "$out"/callgrind.out.*
  PERF_TORPOR_WRAP="valgrind --tool=callgrind --callgrind-out-file=$PWD/$out/callgrind.out.%p" \
    start_torpor T 1 0 1
  vpid=$T_PID
  peers_show callgrind_control -z "$vpid"
  callgrind_control -z "$vpid" >/dev/null 2>&1
  # Exactly msgs echoes: no warm-up; the legacy tool counts round trips per connection.
  LEGACY_N=$((msgs / 10)) LEGACY_WARMUP=0 run_load callgrind torpor 1 "$vpid" -- \
    --addr "127.0.0.1:$T_PORT" --actor "$T_ACTOR" --mode closed -c 10 -s "$size" -n "$msgs" --warmup-secs 0
  peers_show callgrind_control -d "$vpid"
  callgrind_control -d "$vpid" >/dev/null 2>&1
  sleep 1
  dump=$(ls -t "$out"/callgrind.out."$vpid".* 2>/dev/null | head -1)
  [[ -n $dump ]] || {
    echo "no callgrind dump in $out" >&2
    return 1
  }
  ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
  callgrind_annotate --inclusive=no --threshold=100 --auto=no "$dump" >"$out/callgrind-annotate.txt" 2>&1 || true
  python3 - "$RESULTS" "$ir" "$out/callgrind-annotate.txt" <<'EOF'
import json, re, sys
r = [json.loads(l) for l in open(sys.argv[1])][-1]
ir = int(sys.argv[2])
m = r.get("messages") or 0
print(f"instructions (user space only): {ir:,} over {m:,} echoed messages")
if not m:
    sys.exit(0)
print("top functions by self instructions per echoed message:")
n = 0
for line in open(sys.argv[3]):
    g = re.match(r"^\s*([\d,]+) \(\s*([\d.]+)%\)\s+(.*)$", line)
    if not g or "PROGRAM TOTALS" in line or float(g[2]) > 50:
        continue  # thread entry points carry everything under them: not self cost
    name = re.sub(r"\s*\[[^]]*\]$", "", g[3]).split(":", 1)[-1]
    print(f"  {int(g[1].replace(',', '')) / m:>8,.0f}  {g[2]:>5}%  {name[:110]}")
    n += 1
    if n == 25:
        break
print(f"RESULT callgrind instructions_per_echoed_message={ir / m:,.0f} (per crossing of torpor: {ir / m / 2:,.0f})")
EOF
  echo "callgrind dump: $dump (callgrind_annotate or kcachegrind for more)"
}

case $what in
  flame) flame "${2:-10}" ;;
  callgrind) callgrind "${2:-20000}" ;;
  *)
    echo "usage: bash perf/profile.sh flame [seconds] | callgrind [messages]" >&2
    exit 2
    ;;
esac
