//! Interop: a serverless runner pool started by torpor. The unmodified `rivetkit@2.2.1` app
//! (`tests/interop/rivetkit_app/serverless.mjs`: `registry.handler()` under
//! `@hono/node-server`) serves `/api/rivet/start` on loopback; a runner config is put with
//! `PUT /runner-configs/default`; the rivetkit client's `getOrCreate` makes torpor call `/start`
//! with the `x-rivet-*` headers, the app connects a runner back and the action works. One test
//! lets the app put its own config instead (rivetkit's `configureRunnerPool`, as
//! `@rivetkit/next-js` does in development).
//!
//! torpor listens on an ephemeral port, so the URL it gives started runners
//! (`serverless.public_url`) is a forwarder the test binds first (port 0) and points at torpor
//! once it runs: the URL is known before torpor starts, as in a real deployment behind a proxy.
//!
//! Requirements as `interop_rivetkit.rs`: `tests/interop/node_modules` and Node >= 22
//! (`TORPOR_NODE`, `tests/interop/node_modules/.bin/node`, or `node` on PATH);
//! `TORPOR_SKIP_NODE=1` skips. No verdict depends on timing: every wait is bounded (`WAIT`) and
//! waits for a line or an answer.

mod common;

use common::{http, json_body, wait_port_free, Daemon, Proc, WAIT};
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Instant;

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

fn node() -> Option<PathBuf> {
    if std::env::var("TORPOR_SKIP_NODE").as_deref() == Ok("1") {
        eprintln!("TORPOR_SKIP_NODE=1: skipping the serverless interop test");
        return None;
    }
    let dir = interop_dir();
    let pkg = dir.join("node_modules/rivetkit/package.json");
    let text = std::fs::read_to_string(&pkg).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): run `npm install --prefix tests/interop` (or set TORPOR_SKIP_NODE=1)",
            pkg.display()
        )
    });
    assert_eq!(json_body(text.as_bytes())["version"], "2.2.1");
    let local = dir.join("node_modules/.bin/node");
    Some(match std::env::var_os("TORPOR_NODE") {
        Some(p) => PathBuf::from(p),
        None if local.exists() => local,
        None => PathBuf::from("node"),
    })
}

/// Forwards every connection accepted on `listener` to the address set in `to`.
fn forwarder(listener: TcpListener, to: Arc<OnceLock<SocketAddr>>) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(a) = conn else { continue };
            let Some(&target) = to.get() else { continue };
            let Ok(b) = TcpStream::connect(target) else {
                continue;
            };
            let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            std::thread::spawn(move || pipe(a, b2));
            std::thread::spawn(move || pipe(b, a2));
        }
    });
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A node process driven by stdin lines, its stdout lines on a channel.
struct NodeProc {
    proc: Proc,
    stdin: ChildStdin,
}

impl NodeProc {
    fn spawn(name: &'static str, mut cmd: Command) -> NodeProc {
        cmd.current_dir(interop_dir())
            .env(
                "RIVET_LOG_LEVEL",
                std::env::var("RIVET_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                let _ = tx.send(line);
            }
        });
        NodeProc {
            proc: Proc { child, lines, name },
            stdin,
        }
    }

    fn line(&mut self, text: &str) {
        writeln!(self.stdin, "{text}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits for one line starting with each of `prefixes`, in any order (events of two
    /// processes, e.g. a replacement's start and the drained actor's sleep, have no fixed
    /// order); returns them in the order of `prefixes`. Other lines are skipped.
    fn wait_each(&self, prefixes: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut found: Vec<Option<String>> = vec![None; prefixes.len()];
        while found.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.proc.lines.recv_timeout(left) {
                Ok(l) if l.starts_with("FATAL ") => panic!("{}: {l}", self.proc.name),
                Ok(l) => {
                    if let Some(i) = (0..prefixes.len())
                        .find(|&i| found[i].is_none() && l.starts_with(prefixes[i]))
                    {
                        found[i] = Some(l);
                    }
                }
                Err(_) => panic!(
                    "{}: no line starting with each of {prefixes:?} (found {found:?})",
                    self.proc.name
                ),
            }
        }
        found.into_iter().flatten().collect()
    }

    /// Waits for a line starting with `prefix` (FATAL lines fail the test).
    fn wait(&self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.proc.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(l) if l.starts_with("FATAL ") => panic!("{}: {l}", self.proc.name),
                Ok(_) => continue,
                Err(_) => panic!("{}: no line starting with {prefix:?}", self.proc.name),
            }
        }
    }
}

/// The value of `key=` in a `START …` line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// torpor (its public URL a forwarder to it), the serverless app and the rivetkit client.
struct Setup {
    gw: Daemon,
    public: String,
    app: NodeProc,
    app_port: u16,
    app_url: String,
    client: NodeProc,
}

/// Starts the serverless app (`APP_PORT` among `app_env` picks its port); returns it and the
/// port it listens on.
fn spawn_app(node: &PathBuf, public: &str, app_env: &[(&str, &str)]) -> (NodeProc, u16) {
    let mut app_cmd = Command::new(node);
    app_cmd
        .arg(interop_dir().join("rivetkit_app/serverless.mjs"))
        .env("RIVET_ENDPOINT", public)
        .envs(app_env.iter().copied());
    let app = NodeProc::spawn("serverless-app", app_cmd);
    let port: u16 = field(&app.wait("LISTENING "), "port").parse().unwrap();
    (app, port)
}

/// `env`: torpor's extra settings; `app_env`: the app's.
fn setup(node: &PathBuf, env: &[(&str, &str)], app_env: &[(&str, &str)]) -> Setup {
    // The public URL torpor gives started runners: a forwarder bound before torpor starts.
    let fwd = TcpListener::bind("127.0.0.1:0").unwrap();
    let public = format!("http://{}", fwd.local_addr().unwrap());
    let target = Arc::new(OnceLock::new());
    forwarder(fwd, target.clone());
    let mut all = vec![("TORPOR_SERVERLESS__PUBLIC_URL", public.as_str())];
    all.extend_from_slice(env);
    let gw = Daemon::start(2, &all);
    target.set(gw.addr).unwrap();

    let (app, app_port) = spawn_app(node, &public, app_env);
    let app_url = format!("http://127.0.0.1:{app_port}/api/rivet");

    let mut client_cmd = Command::new(node);
    client_cmd
        .arg(interop_dir().join("rivetkit_client.mjs"))
        .arg(format!("http://{}", gw.addr));
    let client = NodeProc::spawn("rivetkit-client", client_cmd);
    client.wait("READY");
    Setup {
        gw,
        public,
        app,
        app_port,
        app_url,
        client,
    }
}

/// `PUT /runner-configs/default` pointing at the app.
fn put_pool(s: &Setup, lifespan_s: u32) {
    put_pool_with(s, lifespan_s, 0, 4);
}

fn put_pool_with(s: &Setup, lifespan_s: u32, min_runners: u32, max_runners: u32) {
    let body = json!({"datacenters": {"default": {"serverless": {
        "url": s.app_url,
        "headers": {},
        "request_lifespan": lifespan_s,
        "slots_per_runner": 10,
        "min_runners": min_runners,
        "max_runners": max_runners,
        "runners_margin": 0
    }}}});
    let (st, _, resp) = http(
        s.gw.addr,
        "PUT",
        "/runner-configs/default?namespace=default",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(json_body(&resp)["endpoint_config_changed"], true);
}

impl NodeProc {
    /// Sends every command of `cmds` (`(tag, rest)`) at once and waits for all their answers
    /// (the client runs commands concurrently; answers come in any order). Returns each
    /// answer's text after `RES <tag> `, by tag.
    fn all(&mut self, cmds: &[(String, String)]) -> HashMap<String, String> {
        for (tag, rest) in cmds {
            self.line(&format!("{tag} {rest}"));
        }
        let mut out = HashMap::new();
        while out.len() < cmds.len() {
            let line = self.wait("RES ");
            let rest = line.strip_prefix("RES ").unwrap();
            let (tag, answer) = rest.split_once(' ').unwrap();
            assert!(
                cmds.iter().any(|(t, _)| t == tag),
                "unexpected answer {line:?}"
            );
            out.insert(tag.to_string(), answer.to_string());
        }
        out
    }
}

#[test]
fn a_serverless_pool_starts_a_rivetkit_runner_on_demand() {
    let Some(node) = node() else { return };
    let mut s = setup(&node, &[], &[]);
    put_pool(&s, 300);
    s.client.line("t1 action pool-a increment [5]");

    // torpor asks the app for a runner, with the headers rivetkit reads.
    let start = s.app.wait("START ");
    assert_eq!(field(&start, "endpoint"), s.public);
    assert_eq!(field(&start, "slots"), "10");
    assert_eq!(field(&start, "runner"), "default");
    assert_eq!(field(&start, "namespace"), "default");
    assert_eq!(field(&start, "token"), "no");
    assert_eq!(field(&start, "answer"), "rivetkit");

    assert_eq!(s.client.wait("RES t1 "), "RES t1 ok 5");
    s.client.line("t2 action pool-a increment [2]");
    assert_eq!(s.client.wait("RES t2 "), "RES t2 ok 7");
    assert_eq!(s.gw.metric("torpor_serverless_started_total"), 1.0);
}

#[test]
fn a_failing_app_is_backed_off_and_shown_on_the_actor() {
    let Some(node) = node() else { return };
    let mut s = setup(&node, &[], &[]);
    s.app.line("fail 500");
    s.app.wait("CMD fail 500");
    put_pool(&s, 300);
    s.client.line("t1 resolve pool-b");
    let line = s.client.wait("RES t1 ");
    let id: String = serde_json::from_str(line.strip_prefix("RES t1 ok ").expect("an actor id"))
        .expect("a JSON string");
    let start = s.app.wait("START ");
    assert_eq!(field(&start, "answer"), "500");
    // The failure reaches the engine in the step that counts it; the API call that follows is
    // answered after it.
    s.gw.wait_metric("torpor_serverless_failures_total", |v| v >= 1.0);
    let (st, _, resp) = http(
        s.gw.addr,
        "GET",
        &format!("/actors/{id}?namespace=default"),
        &[],
        b"",
    );
    assert_eq!(st, 200);
    let v = json_body(&resp);
    assert_eq!(
        v["actor"]["error"]["runner_pool_error"]["serverless_http_error"]["status_code"], 500,
        "{v}"
    );
    // A request for the actor is answered at once with `guard.actor_runner_failed`, not after
    // the wake timeout (no runner is up; the next start is seconds away), and rivetkit's
    // client reads it as a scheduling error: it asks for the actor's `error` and reports it.
    s.client.line("t2 action pool-b increment [1]");
    let line = s.client.wait("RES t2 ");
    assert!(
        line.starts_with("RES t2 err guard.actor_runner_failed "),
        "{line}"
    );
    assert!(
        line.contains("Actor failed to start") && line.contains("serverless_http_error"),
        "rivetkit's ActorSchedulingError with the pool's error: {line}"
    );

    // The app recovers: the next start after the back-off brings a runner up.
    s.app.line("ok");
    s.app.wait("CMD ok");
    // (A retry already on its way may still have met the refusal.)
    while field(&s.app.wait("START "), "answer") != "rivetkit" {}
    s.gw.wait_metric("torpor_serverless_started_total", |v| v >= 1.0);
    s.client.line("t3 action pool-b increment [1]");
    assert_eq!(s.client.wait("RES t3 "), "RES t3 ok 1");
}

#[test]
fn a_runner_drained_at_its_lifespan_is_replaced_and_the_state_survives() {
    let Some(node) = node() else { return };
    // A 10 s lifespan with a 2 s grace: the runner drains 8 s after its start. The actor does
    // not go idle meanwhile (a long sleep timeout), so the pool keeps wanting a runner.
    let mut s = setup(
        &node,
        &[("TORPOR_SERVERLESS__DRAIN_GRACE_MS", "2000")],
        &[("APP_SLEEP_TIMEOUT_MS", "600000")],
    );
    put_pool(&s, 10);
    s.client.line("t1 action pool-c increment [5]");
    assert_eq!(field(&s.app.wait("START "), "answer"), "rivetkit");
    assert_eq!(s.client.wait("RES t1 "), "RES t1 ok 5");
    // The drain stops the actor (it sleeps, saving its state) and requests a replacement at
    // once; torpor closes the old stream at the end of the grace.
    let lines = s.app.wait_each(&["ACTOR_SLEEP ", "START ", "START_END"]);
    assert_eq!(field(&lines[1], "answer"), "rivetkit");
    s.gw.wait_metric("torpor_serverless_stops_total", |v| v >= 1.0);
    // The actor wakes on the new runner with its state.
    s.client.line("t2 action pool-c increment [2]");
    assert_eq!(s.client.wait("RES t2 "), "RES t2 ok 7");
}

#[test]
fn an_app_that_configures_its_own_pool_serves_actors() {
    let Some(node) = node() else { return };
    // rivetkit's `configureRunnerPool` (what `@rivetkit/next-js` does in development): the
    // app puts its own runner config on the registry's first request; the test puts none.
    let mut s = setup(&node, &[], &[("APP_CONFIGURE_POOL", "1")]);
    assert_eq!(s.app.wait("POOL_PUT "), "POOL_PUT status=200");

    let (st, _, resp) = http(
        s.gw.addr,
        "GET",
        "/runner-configs?namespace=default",
        &[],
        b"",
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&resp));
    let v = json_body(&resp);
    let cfg = &v["runner_configs"]["default"]["datacenters"]["default"]["serverless"];
    assert_eq!(cfg["url"], s.app_url.as_str(), "{v}");
    assert_eq!(cfg["slots_per_runner"], 10, "{v}");
    assert_eq!(cfg["max_runners"], 4, "{v}");
    // rivetkit's default lifespan (15 minutes).
    assert_eq!(cfg["request_lifespan"], 900, "{v}");

    s.client.line("t1 action pool-d increment [3]");
    let start = s.app.wait("START ");
    assert_eq!(field(&start, "endpoint"), s.public);
    assert_eq!(field(&start, "runner"), "default");
    assert_eq!(field(&start, "answer"), "rivetkit");
    assert_eq!(s.client.wait("RES t1 "), "RES t1 ok 3");
    s.client.line("t2 action pool-d increment [4]");
    assert_eq!(s.client.wait("RES t2 "), "RES t2 ok 7");
}

#[test]
fn a_pool_scales_with_its_actors_and_drains_the_surplus() {
    let Some(node) = node() else { return };
    // 30 actors, 10 slots per runner: 3 runners. The actors do not sleep meanwhile (a long
    // sleep timeout); a short grace keeps the drains quick.
    let mut s = setup(
        &node,
        &[("TORPOR_SERVERLESS__DRAIN_GRACE_MS", "500")],
        &[("APP_SLEEP_TIMEOUT_MS", "600000")],
    );
    put_pool_with(&s, 300, 0, 5);
    let keys: Vec<String> = (0..30).map(|i| format!("scale-{i}")).collect();
    let actions: Vec<(String, String)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("a{i}"), format!("action {k} increment [{i}]")))
        .collect();
    let answers = s.client.all(&actions);
    for i in 0..keys.len() {
        assert_eq!(answers[&format!("a{i}")], format!("ok {i}"));
    }
    // Every actor runs, 10 to a runner: the pool started exactly 3.
    assert_eq!(s.gw.metric("torpor_serverless_started_total"), 3.0);
    let pool = |state: &str| {
        format!(
            "torpor_serverless_pool_runners{{namespace=\"default\",pool=\"default\",state=\"{state}\"}}"
        )
    };
    s.gw.wait_metric(&pool("running"), |v| v == 3.0);

    let resolves: Vec<(String, String)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("r{i}"), format!("resolve {k}")))
        .collect();
    let ids = s.client.all(&resolves);
    for (tag, answer) in &ids {
        let id: String = serde_json::from_str(
            answer
                .strip_prefix("ok ")
                .unwrap_or_else(|| panic!("{tag}: {answer}")),
        )
        .unwrap();
        let (st, _, resp) = http(
            s.gw.addr,
            "DELETE",
            &format!("/actors/{id}?namespace=default"),
            &[],
            b"",
        );
        assert_eq!(st, 200, "{}", String::from_utf8_lossy(&resp));
    }
    // No actor left: every runner is surplus and drains; torpor closes the 3 streams.
    s.gw.wait_metric("torpor_serverless_stops_total", |v| v >= 3.0);
    for _ in 0..3 {
        s.app.wait("START_END");
    }
    assert_eq!(s.gw.metric("torpor_serverless_stops_total"), 3.0);
    assert_eq!(s.gw.metric("torpor_serverless_started_total"), 3.0);
    for state in ["starting", "running", "backoff", "draining"] {
        s.gw.wait_metric(&pool(state), |v| v == 0.0);
    }
}

#[test]
fn an_app_killed_and_restarted_keeps_its_actors_state() {
    let Some(node) = node() else { return };
    // `min_runners = 1`: the pool wants a runner whatever its actors do, so once the app is
    // back a runner is up before the next request (a request meeting a failing pool with no
    // runner up is refused at once). Short back-offs and loss threshold keep the test quick.
    let mut s = setup(
        &node,
        &[
            ("TORPOR_SERVERLESS__RETRY_BASE_MS", "200"),
            ("TORPOR_SERVERLESS__RETRY_MAX_EXPONENT", "2"),
            ("TORPOR_TIMEOUTS__RUNNER_LOST_THRESHOLD_MS", "1000"),
        ],
        &[("APP_SLEEP_TIMEOUT_MS", "600000")],
    );
    put_pool_with(&s, 300, 1, 4);
    assert_eq!(field(&s.app.wait("START "), "answer"), "rivetkit");
    s.client.line("t1 action pool-e increment [5]");
    assert_eq!(s.client.wait("RES t1 "), "RES t1 ok 5");
    s.gw.wait_metric("torpor_serverless_started_total", |v| v >= 1.0);

    // SIGKILL: the app's runner and its stream die with it.
    s.app.proc.child.kill().unwrap();
    s.app.proc.child.wait().unwrap();
    // torpor sees the stream end (and requests again; while the app is away that fails).
    s.gw.wait_metric("torpor_serverless_failures_total", |v| v >= 1.0);

    // The same app again, on the same port: the pool's url is unchanged.
    wait_port_free(format!("127.0.0.1:{}", s.app_port).parse().unwrap());
    let port = s.app_port.to_string();
    let (app, port2) = spawn_app(
        &node,
        &s.public,
        &[("APP_SLEEP_TIMEOUT_MS", "600000"), ("APP_PORT", &port)],
    );
    assert_eq!(port2, s.app_port);
    s.app = app;
    // A start that reaches the new app brings a runner up.
    while field(&s.app.wait("START "), "answer") != "rivetkit" {}
    s.gw.wait_metric("torpor_serverless_started_total", |v| v >= 2.0);

    // The actor (lost with the old runner) wakes on the new one with its state from torpor's KV.
    s.client.line("t2 action pool-e increment [2]");
    assert_eq!(s.client.wait("RES t2 "), "RES t2 ok 7");
    let wake = s.app.wait("ACTOR_WAKE ");
    assert_eq!(field(&wake, "count"), "5", "{wake}");
}
