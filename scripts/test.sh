#!/usr/bin/env bash
# The test command (README "Test"): installs what the tests need from pinned lockfiles,
# then runs lints and every test against the real binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

# Node packages for the wire-compatibility and interop tests (pinned by package-lock.json).
if ! command -v node >/dev/null 2>&1; then
  echo "node is required for the interop tests (apt-get install nodejs npm)" >&2
  exit 1
fi
if [ ! -d tests/interop/node_modules/@rivetkit/engine-runner ] || \
   [ tests/interop/package-lock.json -nt tests/interop/node_modules/.package-lock.json ]; then
  # `npm install` honours package-lock.json (exact versions); `npm ci` is not used because
  # npm 11 refuses this lockfile's platform-specific optional dependencies.
  npm install --prefix tests/interop --no-audit --no-fund --loglevel=error
fi

# Autobahn conformance client for tests/autobahn.rs (pinned with hashes), in a venv under
# target/ so that nothing is installed system-wide.
if ! command -v python3 >/dev/null 2>&1; then
  echo "python3 is required for the Autobahn tests (apt-get install python3 python3-venv)" >&2
  exit 1
fi
venv=target/autobahn-venv
if [ ! -x "$venv/bin/kosoku" ] || [ tests/autobahn/requirements.txt -nt "$venv/.installed" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes \
    -r tests/autobahn/requirements.txt
  touch "$venv/.installed"
fi
export AUTOBAHN_KOSOKU="$PWD/$venv/bin/kosoku"

# Headless Chromium for tests/browser.rs (Debian's package), installed only when missing.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
  else
    echo "chromium is missing and cannot be installed here (needs root and apt-get): tests/browser.rs will fail under CI" >&2
  fi
fi

# PostgreSQL for the PgStore tests (throwaway clusters, src/kv/pg_cluster.rs), Debian's package,
# installed only when initdb is neither on PATH nor under /usr/lib/postgresql/*/bin.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15
  else
    echo "PostgreSQL (initdb) is missing and cannot be installed here (needs root and apt-get): the PgStore tests will fail under CI" >&2
  fi
fi

# nats-server for the node bus tests (throwaway servers, src/cluster/nats_server.rs), Debian's
# package, installed only when nats-server is neither on PATH nor at /usr/sbin/nats-server.
if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nats-server
  else
    echo "nats-server is missing and cannot be installed here (needs root and apt-get): the node bus tests will fail under CI" >&2
  fi
fi

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-fail-fast: a failing test binary must not hide the ones after it.
status=0
cargo test --locked --all-targets --no-fail-fast 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, also when it failed (the last lines above are the
# benches' smoke runs).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
