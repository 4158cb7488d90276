#!/usr/bin/env bash
# Scenario S3 (see perf/scenario.sh and perf/README.md). usage: bash perf/s3.sh [rounds]
exec bash "$(dirname "$0")/scenario.sh" S3 "$@"
