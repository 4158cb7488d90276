#!/usr/bin/env bash
# Scenario S7 (see perf/scenario.sh and perf/README.md). usage: bash perf/s7.sh [rounds]
exec bash "$(dirname "$0")/scenario.sh" S7 "$@"
