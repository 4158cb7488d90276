#!/usr/bin/env bash
# Scenario S2 (see perf/scenario.sh and perf/README.md). usage: bash perf/s2.sh [rounds]
exec bash "$(dirname "$0")/scenario.sh" S2 "$@"
