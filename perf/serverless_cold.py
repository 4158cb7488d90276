#!/usr/bin/env python3
"""Cold starts through a serverless runner pool: time from a rivetkit client's first action on
a new actor (getOrCreate + action) to its answer, when no runner of the pool is up, so that
every start includes torpor calling the app's `/start`, the app connecting a runner back, the
actor starting and the action. Prints each time and p50 / p90 / p99 / max.

    python3 perf/serverless_cold.py [starts=50]

Uses the release `torpor` (built here), the unmodified rivetkit@2.2.1 app of the interop
tests in serverless mode (tests/interop/rivetkit_app/serverless.mjs) and their client
(tests/interop/rivetkit_client.mjs); Node and the npm packages come from
tests/interop/node_modules (run the interop tests once, or `bash tests/interop/setup.sh`).

The pool has one slot per runner. After each measured start the actor is destroyed and the
script waits until torpor has stopped that runner (`torpor_serverless_stops_total`), so the
next actor finds no runner and starts cold. Nothing here is asserted: it is a measurement.
"""

import json
import os
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTEROP = os.path.join(ROOT, "tests", "interop")
WAIT_S = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_bin():
    local = os.path.join(INTEROP, "node_modules", ".bin", "node")
    return os.environ.get("TORPOR_NODE") or (local if os.path.exists(local) else "node")


class Proc:
    """A child whose stdout lines arrive on a queue; stdin takes command lines."""

    def __init__(self, name, args, env=None, log=None):
        self.name = name
        self.p = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log or subprocess.DEVNULL,
            text=True,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait(self, prefix):
        deadline = time.monotonic() + WAIT_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                sys.exit(f"{self.name}: no line starting with {prefix!r} within {WAIT_S} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                sys.exit(f"{self.name} exited while waiting for {prefix!r}")
            if line.startswith("FATAL"):
                sys.exit(f"{self.name}: {line}")
            if line.startswith(prefix):
                return line

    def send(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def http(base, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    with urllib.request.urlopen(req, timeout=WAIT_S) as r:
        return r.read().decode()


def metric(base, name):
    for line in http(base, "GET", "/metrics").splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_metric(base, name, at_least):
    deadline = time.monotonic() + WAIT_S
    while metric(base, name) < at_least:
        if time.monotonic() > deadline:
            sys.exit(f"{name} did not reach {at_least} within {WAIT_S} s")
        time.sleep(0.05)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    starts = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "torpor"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="torpor-cold.")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs = []
    try:
        log = open(os.path.join(tmp, "torpor.log"), "w")
        gw = Proc(
            "torpor",
            [os.path.join(ROOT, "target", "release", "torpor"), "serve", "--listen",
             f"127.0.0.1:{port}", "--data-dir", os.path.join(tmp, "data")],
            env={"TORPOR_SERVERLESS__PUBLIC_URL": base, "TORPOR_SERVERLESS__DRAIN_GRACE_MS": "1000"},
            log=log,
        )
        procs.append(gw)
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                http(base, "GET", "/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("torpor did not come up")
                time.sleep(0.05)
        app = Proc("app", [node_bin(), os.path.join(INTEROP, "rivetkit_app", "serverless.mjs")],
                   env={"RIVET_ENDPOINT": base}, log=open(os.path.join(tmp, "app.log"), "w"))
        procs.append(app)
        app_port = app.wait("LISTENING ").split("port=")[1]
        http(base, "PUT", "/runner-configs/default?namespace=default", {"datacenters": {"default": {
            "serverless": {"url": f"http://127.0.0.1:{app_port}/api/rivet", "headers": {},
                           "request_lifespan": 3600, "slots_per_runner": 1, "min_runners": 0,
                           "max_runners": 4, "runners_margin": 0}}}})
        client = Proc("client", [node_bin(), os.path.join(INTEROP, "rivetkit_client.mjs"), base],
                      log=open(os.path.join(tmp, "client.log"), "w"))
        procs.append(client)
        client.wait("READY")
        times = []
        for i in range(1, starts + 1):
            t0 = time.monotonic()
            client.send(f"c{i} action cold-{i} increment [1]")
            res = client.wait(f"RES c{i} ")
            ms = (time.monotonic() - t0) * 1000
            if not res.startswith(f"RES c{i} ok"):
                sys.exit(f"start {i}: {res}")
            times.append(ms)
            # A cold start is one more runner started by torpor for this actor.
            started = metric(base, "torpor_serverless_started_total")
            print(f"start {i:3}: {ms:7.1f} ms (runners started so far: {started:.0f})", flush=True)
            client.send(f"r{i} resolve cold-{i}")
            actor = json.loads(client.wait(f"RES r{i} ").split(" ok ", 1)[1])
            http(base, "DELETE", f"/actors/{actor}?namespace=default")
            # The runner of that actor drains and stops: the next start is cold again.
            wait_metric(base, "torpor_serverless_stops_total", i)
        print(f"RESULT serverless cold start (getOrCreate + first action, no runner up), "
              f"{len(times)} starts: p50 {pct(times, 50):.0f} ms, p90 {pct(times, 90):.0f} ms, "
              f"p99 {pct(times, 99):.0f} ms, max {max(times):.0f} ms")
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
