//! The unmodified `rivetkit@2.2.1` app (`tests/interop/rivetkit_app/`) across three torpor
//! nodes sharing one PostgreSQL and one NATS server: the app's runner connects to node 2, the
//! rivetkit client (`tests/interop/rivetkit_client.mjs`) talks to node 1, node 3 leads
//! placement. Every action, connection and wake crosses from node 1 to node 2 and back.
//!
//! Requirements are those of `tests/interop_rivetkit.rs` (its helpers are copied here, trimmed):
//! `tests/interop/node_modules` with Node >= 22, PostgreSQL and `nats-server` installed.
//! `TORPOR_SKIP_NODE=1` skips these tests.
//!
//! No verdict depends on timing: every wait is bounded (`common::WAIT`) and waits for a line of
//! a Node process, an answer of the engine API or a metric value.

mod common;

use common::cluster::Backends;
use common::{http, json_body, Daemon, WAIT};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

// ---- prerequisites ---------------------------------------------------------------------------

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// The Node binary, or `None` when the tests are skipped by `TORPOR_SKIP_NODE=1`.
fn node() -> Option<PathBuf> {
    if std::env::var("TORPOR_SKIP_NODE").as_deref() == Ok("1") {
        eprintln!("TORPOR_SKIP_NODE=1: skipping the rivetkit cluster test");
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
        assert_eq!(json_body(text.as_bytes())["version"], want, "{pkg}");
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
        "{} is Node {version}; rivetkit 2.2.1 needs Node >= 22 (see tests/interop/rivetkit_notes.md)",
        bin.display()
    );
    Some(bin)
}

fn log_level() -> String {
    std::env::var("RIVET_LOG_LEVEL").unwrap_or_else(|_| "warn".into())
}

fn kill9(child: &mut Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
}

// ---- stdout lines of a child ------------------------------------------------------------------

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

    fn count(&mut self, pred: impl Fn(&str) -> bool) -> usize {
        self.drain();
        self.all.iter().filter(|l| pred(l)).count()
    }
}

// ---- the nodes ----------------------------------------------------------------------------------

/// A metric of a node, 0 when the node does not print the series (yet).
fn metric(d: &Daemon, series: &str) -> f64 {
    d.metrics()
        .into_iter()
        .find(|(k, _)| k == series)
        .map_or(0.0, |(_, v)| v)
}

/// The engine API's view of one actor, asked of `d`.
fn actor(d: &Daemon, actor_id: &str) -> Option<Value> {
    let (status, _, body) = http(
        d.addr,
        "GET",
        &format!("/actors?actor_ids={actor_id}&namespace=default"),
        &[],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    json_body(&body)["actors"].get(0).cloned()
}

/// Waits until the engine API of `d` reports the actor asleep (`sleep_ts` set, not connectable).
fn wait_asleep(d: &Daemon, actor_id: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let a = actor(d, actor_id);
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

// ---- the rivetkit app (runner process) ----------------------------------------------------------

struct App {
    child: Child,
    lines: Lines,
}

/// The app's idle sleep timeout: short, to keep the tests quick (no verdict depends on it).
const SLEEP_TIMEOUT_MS: &str = "1500";

impl App {
    /// Starts `rivetkit_app/runner.mjs` as a runner of `on`; waits until `on` counts it.
    fn start(node: &Path, on: &Daemon) -> App {
        let dir = interop_dir().join("rivetkit_app");
        let mut child = Command::new(node)
            .arg(dir.join("runner.mjs"))
            .current_dir(&dir)
            .env("RIVET_ENDPOINT", on.endpoint())
            .env("RIVET_NAMESPACE", "default")
            .env("RIVET_RUNNER", "default")
            .env("RIVET_TOTAL_SLOTS", "100")
            .env("APP_SLEEP_TIMEOUT_MS", SLEEP_TIMEOUT_MS)
            .env("RIVET_LOG_LEVEL", log_level())
            .env_remove("APP_RUNNER_KEY")
            .env_remove("RIVET_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node runner.mjs");
        let out = child.stdout.take().expect("piped stdout");
        let mut lines = Lines::new("rivetkit-app", out);
        lines.wait("starting with \"STARTED \"", |l| l.starts_with("STARTED "));
        on.wait_metric("torpor_runners_connected", |v| v >= 1.0);
        App { child, lines }
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
        let prefix = format!("{event} {actor_id} ");
        self.lines
            .count(|l| l.starts_with(&prefix) && l.contains(part))
    }
}

impl Drop for App {
    fn drop(&mut self) {
        kill9(&mut self.child);
    }
}

// ---- the rivetkit client (driver process) -------------------------------------------------------

/// `rivetkit_client.mjs`: one command per stdin line, one `RES` line each.
struct Client {
    child: Child,
    stdin: ChildStdin,
    lines: Lines,
    next: u64,
}

impl Client {
    fn start(node: &Path, on: &Daemon) -> Client {
        let dir = interop_dir();
        let mut child = Command::new(node)
            .arg(dir.join("rivetkit_client.mjs"))
            .arg(on.endpoint())
            .current_dir(&dir)
            .env("RIVET_LOG_LEVEL", log_level())
            .env_remove("RIVET_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node rivetkit_client.mjs");
        let stdin = child.stdin.take().expect("piped stdin");
        let out = child.stdout.take().expect("piped stdout");
        let mut lines = Lines::new("rivetkit-client", out);
        lines.wait("READY", |l| l.starts_with("READY"));
        Client {
            child,
            stdin,
            lines,
            next: 0,
        }
    }

    /// Sends a command and waits for its answer: `Ok(value)` or `Err("group.code message")`.
    fn call(&mut self, command: &str) -> Result<Value, String> {
        self.next += 1;
        let tag = format!("t{}", self.next);
        writeln!(self.stdin, "{tag} {command}").expect("write to the client driver");
        self.stdin.flush().expect("flush the client driver");
        let prefix = format!("RES {tag} ");
        let line = self
            .lines
            .wait(&format!("{prefix:?}"), |l| l.starts_with(&prefix));
        let rest = &line[prefix.len()..];
        match rest.strip_prefix("ok ") {
            Some(v) => {
                Ok(serde_json::from_str(v).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}")))
            }
            None => Err(rest.strip_prefix("err ").unwrap_or(rest).to_string()),
        }
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

// ---- helpers ----------------------------------------------------------------------------------

/// A fresh actor key per test run.
fn key(tag: &str) -> String {
    format!("{tag}-{:x}", common::rand_u64())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap_or_else(|| panic!("not a string: {x}")))
        .map(str::to_string)
        .collect()
}

fn names(prefix: &str, range: std::ops::RangeInclusive<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

/// The runner is on n2 only: n1 and n3 host no runner connection.
fn assert_runner_only_on_n2([n1, n2, n3]: &[Daemon; 3]) {
    assert_eq!(metric(n1, "torpor_runners_connected"), 0.0, "n1 runners");
    assert_eq!(metric(n2, "torpor_runners_connected"), 1.0, "n2 runners");
    assert_eq!(metric(n3, "torpor_runners_connected"), 0.0, "n3 runners");
}

// ---- scenarios --------------------------------------------------------------------------------

/// Stateless actions over HTTP: the client's `POST /gateway/{id}/action/…` reach node 1, whose
/// gateway tunnels them to the runner on node 2.
#[test]
fn rivetkit_actions_client_on_n1_runner_on_n2() {
    let Some(node) = node() else { return };
    let backends = Backends::start();
    let nodes = backends.three_nodes(&[]);
    let [n1, n2, n3] = &nodes;
    let mut app = App::start(&node, n2);
    let mut client = Client::start(&node, n1);
    assert_runner_only_on_n2(&nodes);

    let k = key("http");
    let id = client.ok(&format!("resolve {k}"));
    let id = id.as_str().expect("actor id").to_string();
    // Every node's engine API knows the actor (one shared store).
    for n in &nodes {
        let a = actor(n, &id).expect("the engine API knows the actor");
        assert_eq!(a["name"], "counter", "{a}");
        assert_eq!(a["key"], k.as_str(), "{a}");
    }

    assert_eq!(client.ok(&format!("action {k} increment [1]")), json!(1));
    assert_eq!(client.ok(&format!("action {k} increment [2]")), json!(3));
    assert_eq!(client.ok(&format!("action {k} get []")), json!(3));
    let other = key("http-other");
    assert_eq!(
        client.ok(&format!("action {other} increment [10]")),
        json!(10)
    );
    assert_eq!(client.ok(&format!("action {k} get []")), json!(3));
    assert_eq!(client.ok(&format!("action {other} get []")), json!(10));
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
    let err = client
        .call(&format!("action {k} noSuchAction []"))
        .expect_err("unknown action");
    assert!(err.starts_with("action."), "{err}");
    app.expect("ACTOR_WAKE", &id);

    // The state survives a sleep and a wake on node 2, woken by a request to node 1.
    app.expect_with("ACTOR_SLEEP", &id, "count=3 log=5");
    wait_asleep(n1, &id);
    assert_eq!(client.ok(&format!("action {k} get []")), json!(3));
    app.expect_with("ACTOR_WAKE", &id, "count=3 log=5");

    // The traffic crossed nodes: node 1's gateway tunnelled the requests (at least the 13
    // actions above), nodes 2 and 3 tunnelled none; the runner is still on node 2 only.
    let tunnelled = metric(n1, "torpor_http_tunnel_requests_total");
    assert!(tunnelled >= 13.0, "n1 tunnelled {tunnelled} requests");
    assert_eq!(metric(n2, "torpor_http_tunnel_requests_total"), 0.0);
    assert_eq!(metric(n3, "torpor_http_tunnel_requests_total"), 0.0);
    assert_runner_only_on_n2(&nodes);
    assert!(metric(n3, "torpor_cluster_leading_epoch") > 0.0);
    assert_eq!(metric(n1, "torpor_cluster_leading_epoch"), 0.0);
    assert_eq!(metric(n2, "torpor_cluster_leading_epoch"), 0.0);
}

/// A hibernatable connection (rivetkit's WebSocket) opened on node 1 to an actor on node 2's
/// runner stays open while the actor sleeps; messages sent meanwhile wake it on node 2, are
/// delivered once and in order, and are answered on the same socket.
#[test]
fn rivetkit_hibernatable_connection_across_nodes_survives_sleep_and_wake() {
    let Some(node) = node() else { return };
    let backends = Backends::start();
    let nodes = backends.three_nodes(&[]);
    let [n1, n2, n3] = &nodes;
    let mut app = App::start(&node, n2);
    let mut client = Client::start(&node, n1);
    assert_runner_only_on_n2(&nodes);

    let k = key("hws");
    let id = client.ok(&format!("resolve {k}"));
    let id = id.as_str().expect("actor id").to_string();
    client.ok(&format!("connect c1 {k}"));
    for i in 1..=3 {
        assert_eq!(
            client.ok(&format!("conn_action c1 append [\"a{i}\"]")),
            json!(i)
        );
    }
    app.expect_with("CONN_CONNECT", &id, "hibernatable=true");

    let same_socket = |client: &mut Client| {
        let st = client.ok("conn_status c1");
        assert_eq!(st["status"], "connected", "{st}");
        assert_eq!(st["opens"], 1, "the socket was reopened: {st}");
        assert_eq!(st["closes"], 0, "the socket closed: {st}");
    };

    // The open connection keeps the actor awake; it asks to sleep (c.sleep()).
    assert_eq!(client.ok("conn_action c1 goToSleep []"), json!(true));
    app.expect("ACTOR_SLEEP", &id);
    wait_asleep(n1, &id);
    same_socket(&mut client);

    // Sent while the actor sleeps: they wake it, exactly once each, in order.
    let items = names("m", 1..=20);
    let calls: Vec<Value> = items.iter().map(|s| json!([s])).collect();
    let results = client.ok(&format!("conn_batch c1 append {}", Value::Array(calls)));
    let want: Vec<Value> = (4..=23).map(|n| json!(n)).collect();
    assert_eq!(results, Value::Array(want));
    app.expect_with("ACTOR_WAKE", &id, "log=3");

    let mut want = names("a", 1..=3);
    want.extend(items);
    assert_eq!(strings(&client.ok("conn_action c1 log []")), want);
    same_socket(&mut client);
    let h = "hibernatable=true";
    assert_eq!(app.count("CONN_CONNECT", &id, h), 1, "a new connection");
    assert_eq!(app.count("CONN_DISCONNECT", &id, h), 0);

    // A second round.
    assert_eq!(client.ok("conn_action c1 goToSleep []"), json!(true));
    app.expect("ACTOR_SLEEP", &id);
    wait_asleep(n1, &id);
    assert_eq!(client.ok("conn_action c1 append [\"z\"]"), json!(24));
    same_socket(&mut client);

    // The WebSocket messages crossed nodes: node 1's gateway forwarded the client's 27 actions
    // to the runner on node 2, live or replayed after a wake (the ones sent while the actor
    // slept are held and replayed, two replays at least), and the 27 answers and 21 events
    // back; nodes 2 and 3 forwarded none.
    let to_runner = metric(n1, "torpor_tunnel_messages_to_runner_total");
    let replayed = metric(n1, "torpor_tunnel_replayed_messages_total");
    let to_client = metric(n1, "torpor_tunnel_messages_to_client_total");
    assert!(
        to_runner + replayed >= 27.0,
        "n1 forwarded {to_runner} and replayed {replayed} to the runner"
    );
    assert!(metric(n1, "torpor_tunnel_replays_total") >= 2.0);
    assert!(to_client >= 48.0, "n1 forwarded {to_client} to the client");
    for (name, n) in [("n2", n2), ("n3", n3)] {
        for s in [
            "torpor_tunnel_messages_to_runner_total",
            "torpor_tunnel_replayed_messages_total",
            "torpor_tunnel_messages_to_client_total",
        ] {
            assert_eq!(metric(n, s), 0.0, "{name} {s}");
        }
    }
    assert_runner_only_on_n2(&nodes);
}
