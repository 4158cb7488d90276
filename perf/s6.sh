#!/usr/bin/env bash
# Scenario S6 (see perf/scenario.sh and perf/README.md). usage: bash perf/s6.sh [rounds] [connections]
exec bash "$(dirname "$0")/scenario.sh" S6 "$@"
