#!/usr/bin/env bash
# A/B of torpor against an earlier revision of itself: S1 (100 x 20 B) and S2 (500 x 1 KiB,
# 200 x 16 KiB) closed loop, the two torpors side by side and interleaved (new, old, new,
# old, ...), laid out as perf/scenario.sh lays out torpor (torpor `--shards 1` on CPU 0; its
# echo runner, this tree's, and the load on CPU 1). Prints the per-round numbers and the
# median of the per-round ratios new/old.
#
#   usage: bash perf/ab.sh REV [rounds=3]        (env: DUR 10, WARMUP 2)
set -euo pipefail
rev=${1:?usage: bash perf/ab.sh REV [rounds]}
ROUNDS=${2:-3}
source "$(dirname "$0")/lib.sh"
DUR=${DUR:-10}
WARMUP=${WARMUP:-2}

perf_build
perf_machine
# A fixed place for the old tree, so a second run reuses its build.
old_src="$PWD/target/ab-old-src"
old_target="$PWD/target/ab-old"
want=$(git rev-parse "$rev^{commit}")
if [[ $(git -C "$old_src" rev-parse HEAD 2>/dev/null) != "$want" ]]; then
  git worktree remove --force "$old_src" 2>/dev/null || rm -rf "$old_src"
  git worktree add -q --detach "$old_src" "$want"
fi
peers_show build torpor at "$(git rev-parse --short "$rev")"
(cd "$old_src" && CARGO_TARGET_DIR=$old_target cargo build --release --locked --bin torpor) \
  >"$PEERS_TMP/old-build.log" 2>&1 || { cat "$PEERS_TMP/old-build.log" >&2; exit 1; }

echo "== A/B: torpor $(git rev-parse --short HEAD) (new) vs $(git rev-parse --short "$rev") (old)"
echo "rounds=$ROUNDS duration=${DUR}s warmup=${WARMUP}s; peers interleaved in the order listed"
start_torpor N 1 0 1
PERF_TORPOR_BIN="$old_target/release/torpor" start_torpor O 1 0 1
declare -A TARGET=([new]="--addr 127.0.0.1:$N_PORT --actor $N_ACTOR" [old]="--addr 127.0.0.1:$O_PORT --actor $O_ACTOR")
declare -A PID=([new]=$N_PID [old]=$O_PID)

case_ab() {
  local case=$1 r=$2 p
  shift 2
  for p in new old; do
    # shellcheck disable=SC2086
    run_load "$case" "$p" "$r" "${PID[$p]}" -- ${TARGET[$p]} "$@"
  done
}

for r in $(seq "$ROUNDS"); do
  case_ab S1 "$r" --mode closed -c 100 -s 20 -d "$DUR" --warmup-secs "$WARMUP"
  case_ab S2-500x1KiB "$r" --mode closed -c 500 -s 1024 -d "$DUR" --warmup-secs "$WARMUP"
  case_ab S2-200x16KiB "$r" --mode closed -c 200 -s 16384 -d "$DUR" --warmup-secs "$WARMUP"
done
summarize AB S1:msgs_per_sec:new/old:'>=':0.97:S1 S1:cpu_s_per_M:new/old:table:0 \
  S2-500x1KiB:msgs_per_sec:new/old:'>=':0.97:S2-1KiB S2-500x1KiB:cpu_s_per_M:new/old:table:0 \
  S2-200x16KiB:msgs_per_sec:new/old:'>=':0.97:S2-16KiB S2-200x16KiB:cpu_s_per_M:new/old:table:0
