#!/usr/bin/env bash
# Scenario S5 (see perf/scenario.sh and perf/README.md). usage: bash perf/s5.sh [rounds]
exec bash "$(dirname "$0")/scenario.sh" S5 "$@"
