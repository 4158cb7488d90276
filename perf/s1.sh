#!/usr/bin/env bash
# Scenario S1 (see perf/scenario.sh and perf/README.md). usage: bash perf/s1.sh [rounds]
exec bash "$(dirname "$0")/scenario.sh" S1 "$@"
