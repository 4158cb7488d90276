#!/usr/bin/env bash
# Every Autobahn case of groups 1-7, 9 and 10 (including all of the performance group 9,
# which CI runs only in part, see tests/autobahn/ci-cases.txt) against the real daemon and
# echo runner, checked against tests/autobahn/expected.json. Reports land in
# target/tmp/autobahn-report (index.html). Add AUTOBAHN_WRITE_EXPECTED=1 to record a run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/autobahn-venv
if [ ! -x "$venv/bin/kosoku" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes \
    -r tests/autobahn/requirements.txt
fi
export AUTOBAHN_KOSOKU="$PWD/$venv/bin/kosoku"
export AUTOBAHN_CASES="1.* 2.* 3.* 4.* 5.* 6.* 7.* 9.* 10.*"
exec cargo test --release --test autobahn -- --nocapture
