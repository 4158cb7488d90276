#!/usr/bin/env bash
# Scenario S4 (see perf/scenario.sh and perf/README.md). usage: bash perf/s4.sh [rounds]
exec bash "$(dirname "$0")/scenario.sh" S4 "$@"
