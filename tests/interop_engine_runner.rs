//! Interop: the unmodified npm package `@rivetkit/engine-runner@2.2.1`, driven by Node through
//! `tests/interop/engine_runner_echo.mjs`, connects to a real torpor daemon as a runner, is
//! given an actor through the engine API, and serves that actor's client WebSockets and HTTP
//! requests through the tunnel.
//!
//! Requires `node` on PATH and `tests/interop/node_modules` (`npm ci` in tests/interop); the
//! tests fail with a clear message when either is missing, unless `TORPOR_SKIP_NODE=1`.
//! `ENGINE_RUNNER_LOG=debug` shows the package's own log on stderr.
//!
//! No verdict depends on timing: every wait is a bounded wait for a stdout line of the runner
//! script, a WebSocket frame, or a metric reaching a value.

mod common;

use common::{create_actor, http, json_body, ws_connect, ws_recv, Daemon, Proc, Rng, Ws};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;

/// Client messages kept in flight before reading their echoes (pipelining without relying on
/// unbounded socket buffers in the test itself).
const IN_FLIGHT: usize = 16;

fn interop_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// Checks the Node prerequisites; `false` when the tests are skipped by `TORPOR_SKIP_NODE=1`.
fn node_available() -> bool {
    if std::env::var("TORPOR_SKIP_NODE").as_deref() == Ok("1") {
        eprintln!("TORPOR_SKIP_NODE=1: skipping the @rivetkit/engine-runner interop test");
        return false;
    }
    let dir = interop_dir();
    let script = dir.join("engine_runner_echo.mjs");
    assert!(script.is_file(), "missing {}", script.display());
    let pkg = dir.join("node_modules/@rivetkit/engine-runner/package.json");
    let text = std::fs::read_to_string(&pkg).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): run `npm ci` in tests/interop (or set TORPOR_SKIP_NODE=1 to skip)",
            pkg.display()
        )
    });
    let version = json_body(text.as_bytes())["version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        version, "2.2.1",
        "tests/interop/node_modules holds @rivetkit/engine-runner {version}, expected 2.2.1: run `npm ci` in tests/interop"
    );
    let node_ok = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        node_ok,
        "`node` is not on PATH; install Node >= 20 (or set TORPOR_SKIP_NODE=1 to skip)"
    );
    true
}

/// The engine-runner echo script, running against `endpoint`, with its stdout lines on a channel.
struct EngineRunner {
    proc: Proc,
}

impl EngineRunner {
    /// Spawns the script and waits until the package has received `ToClient::Init`.
    fn start(endpoint: &str) -> EngineRunner {
        let dir = interop_dir();
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("engine_runner_echo.mjs"))
            .arg(endpoint)
            .current_dir(&dir)
            .env(
                "ENGINE_RUNNER_LOG",
                std::env::var("ENGINE_RUNNER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn node engine_runner_echo.mjs: {e}"));
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("[engine-runner] {line}");
                // keep draining after the receiver is gone so the child never blocks
                let _ = tx.send(line);
            }
        });
        let proc = Proc {
            child,
            lines,
            name: "engine-runner",
        };
        let ready = proc.wait_line("READY ");
        assert!(
            !field(&ready, "runner_id=").is_empty(),
            "READY line without a runner id: {ready}"
        );
        EngineRunner { proc }
    }

    /// Waits for the next `<EVENT> <actorId> …` line of `event` and checks its actor.
    fn expect(&self, event: &str, actor_id: &str) -> String {
        let line = self.proc.wait_line(&format!("{event} "));
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(actor_id),
            "{event} for another actor: {line}"
        );
        line
    }

    /// Sends SIGTERM and waits for a clean exit.
    fn stop(mut self) {
        self.proc.signal(libc::SIGTERM);
        let status = self.proc.child.wait().expect("wait for node");
        assert!(status.success(), "engine runner exited with {status}");
    }
}

/// The value after `key` in a whitespace-separated line (`""` when absent).
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_default()
}

/// A daemon with the engine runner connected, and one actor started on it.
struct Setup {
    daemon: Daemon,
    runner: EngineRunner,
    actor_id: String,
}

fn setup(tag: &str) -> Option<Setup> {
    if !node_available() {
        return None;
    }
    let daemon = Daemon::start(1, &[]);
    let runner = EngineRunner::start(&daemon.endpoint());
    daemon.wait_metric("torpor_runners_connected", |v| v == 1.0);
    let key = format!("{tag}-{}", common::rand_u64());
    let actor_id = create_actor(daemon.addr, "echo", Some(&key));
    let started = runner.expect("ACTOR_STARTED", &actor_id);
    assert!(
        field(&started, "generation=").parse::<u32>().is_ok(),
        "{started}"
    );
    Some(Setup {
        daemon,
        runner,
        actor_id,
    })
}

/// Text of exactly `n` bytes mixing 1-, 2-, 3- and 4-byte characters.
fn text_of_len(rng: &mut Rng, n: usize) -> String {
    const PIECES: [&str; 9] = ["a", "q", "Z", "0", " ", "é", "ß", "€", "😀"];
    let mut s = String::with_capacity(n);
    while s.len() < n {
        let p = PIECES[rng.below(PIECES.len() as u64) as usize];
        if s.len() + p.len() <= n {
            s.push_str(p);
        } else {
            s.push('x');
        }
    }
    s
}

/// 200 messages, text and binary, 1 B – 64 KiB: the frame-length boundaries in both types,
/// then sizes spread evenly over the powers of two.
fn messages(rng: &mut Rng) -> Vec<Message> {
    const BOUNDARIES: [usize; 10] = [1, 2, 125, 126, 127, 128, 4096, 65534, 65535, 65536];
    let mut out = Vec::with_capacity(200);
    for &n in &BOUNDARIES {
        out.push(Message::Text(text_of_len(rng, n).into()));
        out.push(Message::Binary(rng.bytes(n).into()));
    }
    while out.len() < 200 {
        let exp = rng.below(17) as u32; // 2^0 ..= 2^16
        let n = 1 + rng.below(1u64 << exp) as usize;
        if rng.below(2) == 0 {
            out.push(Message::Text(text_of_len(rng, n).into()));
        } else {
            out.push(Message::Binary(rng.bytes(n).into()));
        }
    }
    out
}

fn describe(m: &Message) -> String {
    match m {
        Message::Text(t) => format!("text({} B)", t.len()),
        Message::Binary(b) => format!("binary({} B)", b.len()),
        other => format!("{other:?}"),
    }
}

/// Sends every message with up to `IN_FLIGHT` unanswered, checking each echo in order.
fn echo_all(ws: &mut Ws, msgs: &[Message]) {
    let mut waiting: VecDeque<(usize, &Message)> = VecDeque::new();
    fn check(ws: &mut Ws, (i, want): (usize, &Message)) {
        let got = ws_recv(ws);
        assert!(
            got == *want,
            "echo #{i}: sent {}, got {}",
            describe(want),
            describe(&got)
        );
    }
    for (i, m) in msgs.iter().enumerate() {
        ws.send(m.clone())
            .unwrap_or_else(|e| panic!("send #{i} {}: {e}", describe(m)));
        waiting.push_back((i, m));
        if waiting.len() >= IN_FLIGHT {
            check(ws, waiting.pop_front().unwrap());
        }
    }
    while let Some(w) = waiting.pop_front() {
        check(ws, w);
    }
}

/// Closes from the client side and reads until the close handshake is complete; returns the
/// server's close code and reason.
fn client_close(ws: &mut Ws, code: u16, reason: &str) -> (u16, String) {
    ws.close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }))
    .expect("send close");
    let mut answer = None;
    loop {
        match ws.read() {
            Ok(Message::Close(f)) => {
                answer = Some(f.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                }))
            }
            Ok(m) => panic!("data after close: {}", describe(&m)),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close handshake: {e}"),
        }
    }
    answer.expect("the server answered the close frame")
}

fn metric(daemon: &Daemon, series: &str) -> f64 {
    daemon.metric(series)
}

#[test]
fn engine_runner_echoes_websocket_messages_in_order() {
    let Some(s) = setup("ws") else { return };
    let mut ws = ws_connect(s.daemon.addr, &s.actor_id, "/echo?interop=1");
    let open = s.runner.expect("WS_OPEN", &s.actor_id);
    assert_eq!(field(&open, "hibernatable="), "true", "{open}");
    assert_eq!(field(&open, "path="), "/echo?interop=1", "{open}");

    let mut rng = Rng(0x5eed_1e55_c0ff_ee01);
    let msgs = messages(&mut rng);
    assert_eq!(msgs.len(), 200);
    echo_all(&mut ws, &msgs);

    // The package acknowledged every message (the script acks each one after echoing it), so
    // the pending window drains completely.
    let d = &s.daemon;
    d.wait_metric("torpor_tunnel_acks_total", |v| v > 0.0);
    d.wait_metric("torpor_tunnel_acked_messages_total", |v| v >= 200.0);
    d.wait_metric("torpor_tunnel_pending_messages", |v| v == 0.0);
    d.wait_metric("torpor_tunnel_pending_bytes", |v| v == 0.0);
    assert!(metric(d, "torpor_tunnel_messages_to_runner_total") >= 200.0);
    assert!(metric(d, "torpor_tunnel_messages_to_client_total") >= 200.0);
    assert_eq!(metric(d, "torpor_tunnel_acks_ignored_total"), 0.0);
    assert_eq!(metric(d, "torpor_runner_protocol_errors_total"), 0.0);

    let (code, reason) = client_close(&mut ws, 1000, "bye");
    assert_eq!(code, 1000, "server close reason {reason:?}");
    let closed = s.runner.expect("WS_CLOSE", &s.actor_id);
    assert_eq!(
        closed.split_whitespace().nth(2),
        Some("1000"),
        "the runner saw another close code: {closed}"
    );
    assert_eq!(closed.split_whitespace().nth(3), Some("bye"), "{closed}");
    d.wait_metric("torpor_client_websockets_open", |v| v == 0.0);
    s.runner.stop();
}

#[test]
fn engine_runner_closes_a_non_hibernatable_socket_with_its_code() {
    let Some(s) = setup("close") else { return };
    let mut ws = ws_connect(s.daemon.addr, &s.actor_id, "/plain?hibernatable=0");
    let open = s.runner.expect("WS_OPEN", &s.actor_id);
    assert_eq!(field(&open, "hibernatable="), "false", "{open}");

    let mut rng = Rng(0xc105_e000_0000_0002);
    let msgs: Vec<Message> = (0..20)
        .map(|i| {
            if i % 2 == 0 {
                Message::Text(text_of_len(&mut rng, 1 + i * 37).into())
            } else {
                Message::Binary(rng.bytes(1 + i * 3001).into())
            }
        })
        .collect();
    echo_all(&mut ws, &msgs);

    // The actor closes the socket itself: the client gets the actor's code and reason.
    ws.send(Message::Text("__close__ 4001 done here".into()))
        .expect("send close command");
    let (code, reason) = common::ws_expect_close(&mut ws);
    assert_eq!((code, reason.as_str()), (4001, "done here"));
    let closed = s.runner.expect("WS_CLOSE", &s.actor_id);
    assert_eq!(closed.split_whitespace().nth(2), Some("4001"), "{closed}");
    s.daemon
        .wait_metric("torpor_client_websockets_open", |v| v == 0.0);
    assert_eq!(
        metric(&s.daemon, "torpor_runner_protocol_errors_total"),
        0.0
    );
    s.runner.stop();
}

#[test]
fn engine_runner_answers_http_through_the_tunnel() {
    let Some(s) = setup("http") else { return };
    let body = "hello through the tunnel é€";
    let (status, headers, resp) = http(
        s.daemon.addr,
        "POST",
        &format!("/gateway/{}/fetch/here?x=1&y=two", s.actor_id),
        &[("content-type", "text/plain"), ("x-interop", "yes")],
        body.as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.starts_with("application/json")),
        "headers: {headers:?}"
    );
    let v = json_body(&resp);
    assert_eq!(v["actorId"], s.actor_id.as_str());
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/fetch/here?x=1&y=two");
    assert_eq!(v["body"], body);
    assert_eq!(v["bodyLength"], body.len());
    assert_eq!(v["headers"]["x-interop"], "yes");

    // A second request on the same actor, without a body.
    let (status, _, resp) = http(
        s.daemon.addr,
        "GET",
        &format!("/gateway/{}/", s.actor_id),
        &[],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let v = json_body(&resp);
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/");
    assert_eq!(v["bodyLength"], 0);
    assert_eq!(
        metric(&s.daemon, "torpor_runner_protocol_errors_total"),
        0.0
    );
    s.runner.stop();
}

/// `@rivetkit/engine-runner@2.2.1` does not announce `torpor_stream_requests` in its `Init`
/// (its `#handleRequestChunk` drops a chunk decoded before `#handleRequestStart` registered
/// the request), so a large body reaches it buffered, whole, in `RequestStart`; and it answers
/// with one non-streamed `ResponseStart`.
#[test]
fn engine_runner_gets_large_bodies_buffered() {
    let Some(s) = setup("http-large") else { return };
    let body: String = (0..4 * 1024 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let (status, _, resp) = http(
        s.daemon.addr,
        "POST",
        &format!("/gateway/{}/large", s.actor_id),
        &[("content-type", "text/plain")],
        body.as_bytes(),
    );
    assert_eq!(
        status,
        200,
        "{}",
        String::from_utf8_lossy(&resp[..resp.len().min(300)])
    );
    let v = json_body(&resp);
    assert_eq!(v["bodyLength"], body.len());
    assert!(
        v["body"] == body.as_str(),
        "the body arrived whole and in order"
    );
    assert_eq!(
        metric(&s.daemon, "torpor_http_streamed_requests_total"),
        0.0
    );
    assert_eq!(
        metric(&s.daemon, "torpor_http_streamed_responses_total"),
        0.0
    );
    s.runner.stop();
}

/// One KV operation through the actor (the package's own KV client): `Ok(result)` or the
/// gateway's refusal message.
fn kv(d: &Daemon, actor_id: &str, call: serde_json::Value) -> Result<serde_json::Value, String> {
    let (status, _, body) = http(
        d.addr,
        "POST",
        &format!("/gateway/{actor_id}/kv"),
        &[("content-type", "application/json")],
        call.to_string().as_bytes(),
    );
    let v = json_body(&body);
    match status {
        200 => Ok(v["result"].clone()),
        500 => Err(v["error"].as_str().unwrap_or_default().to_string()),
        s => panic!("kv call answered {s}: {v}"),
    }
}

fn hex(s: &[u8]) -> String {
    s.iter().map(|b| format!("{b:02x}")).collect()
}

fn pairs(v: &serde_json::Value) -> Vec<(String, String)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn engine_runner_actor_kv_every_operation() {
    let Some(s) = setup("kv") else { return };
    let d = &s.daemon;
    let a = &s.actor_id;
    let put = |entries: &[(&[u8], &[u8])]| {
        let e: Vec<[String; 2]> = entries.iter().map(|(k, v)| [hex(k), hex(v)]).collect();
        kv(d, a, serde_json::json!({"op": "put", "entries": e}))
    };
    put(&[
        (b"a", b"1"),
        (b"b/1", b"2"),
        (b"b/2", b"3"),
        (b"b\xff", b"4"),
        (b"c", b"5"),
        (b"\x00", b"0"),
    ])
    .unwrap();
    // Get answers only the keys that exist.
    let got = kv(
        d,
        a,
        serde_json::json!({"op": "get", "keys": [hex(b"a"), hex(b"zz"), hex(b"c")]}),
    )
    .unwrap();
    assert_eq!(got, serde_json::json!([hex(b"1"), null, hex(b"5")]));
    // Raw byte order, reverse and limit.
    let all = pairs(&kv(d, a, serde_json::json!({"op": "list_all"})).unwrap());
    let keys: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
    let want = [
        hex(b"\x00"),
        hex(b"a"),
        hex(b"b/1"),
        hex(b"b/2"),
        hex(b"b\xff"),
        hex(b"c"),
    ];
    assert_eq!(keys, want.iter().map(String::as_str).collect::<Vec<_>>());
    let rev = pairs(
        &kv(
            d,
            a,
            serde_json::json!({"op": "list_all", "reverse": true, "limit": 2}),
        )
        .unwrap(),
    );
    assert_eq!(
        rev,
        vec![(hex(b"c"), hex(b"5")), (hex(b"b\xff"), hex(b"4"))]
    );
    // Prefix.
    let p = pairs(
        &kv(
            d,
            a,
            serde_json::json!({"op": "list_prefix", "prefix": hex(b"b/")}),
        )
        .unwrap(),
    );
    assert_eq!(p, vec![(hex(b"b/1"), hex(b"2")), (hex(b"b/2"), hex(b"3"))]);
    // Range, inclusive and exclusive end.
    let r = |exclusive: bool| {
        pairs(
            &kv(
                d,
                a,
                serde_json::json!({"op": "list_range", "start": hex(b"a"), "end": hex(b"b/2"), "exclusive": exclusive}),
            )
            .unwrap(),
        )
        .len()
    };
    assert_eq!((r(false), r(true)), (3, 2));
    // Delete, delete-range [start, end).
    kv(
        d,
        a,
        serde_json::json!({"op": "delete", "keys": [hex(b"a")]}),
    )
    .unwrap();
    kv(
        d,
        a,
        serde_json::json!({"op": "delete_range", "start": hex(b"b"), "end": hex(b"c")}),
    )
    .unwrap();
    let left = pairs(&kv(d, a, serde_json::json!({"op": "list_all"})).unwrap());
    assert_eq!(
        left,
        vec![(hex(b"\x00"), hex(b"0")), (hex(b"c"), hex(b"5"))]
    );
    // Limits are refused by name, and nothing of the refused call is written.
    let big_key = vec![b'k'; 2049];
    let err = put(&[(b"ok", b"1"), (&big_key, b"x")]).unwrap_err();
    assert!(err.contains("key"), "{err}");
    let big_value = vec![0u8; 128 * 1024 + 1];
    let err = put(&[(b"v", &big_value)]).unwrap_err();
    assert!(err.contains("value"), "{err}");
    let got = kv(d, a, serde_json::json!({"op": "get", "keys": [hex(b"ok")]})).unwrap();
    assert_eq!(got, serde_json::json!([null]));
    // Drop empties this actor's space.
    kv(d, a, serde_json::json!({"op": "drop"})).unwrap();
    assert_eq!(
        kv(d, a, serde_json::json!({"op": "list_all"})).unwrap(),
        serde_json::json!([])
    );
    assert!(metric(d, "torpor_kv_commits_total") >= 4.0);
    assert!(metric(d, "torpor_kv_refused_total") >= 2.0);
    s.runner.stop();
}

#[test]
fn engine_runner_actor_kv_survives_kill_9() {
    let Some(s) = setup("durable") else { return };
    let Setup {
        daemon,
        runner,
        actor_id,
    } = s;
    let value = hex(b"acknowledged before the crash");
    kv(
        &daemon,
        &actor_id,
        serde_json::json!({"op": "put", "entries": [[hex(b"state"), value]]}),
    )
    .unwrap();
    // The put was answered: it is on disk. SIGKILL, then a new process on the same data.
    let daemon = daemon.kill_and_restart(1, &[]);
    // The runner reconnects by itself; the actor record came back from the store.
    daemon.wait_metric("torpor_runners_connected", |v| v == 1.0);
    // The restarted torpor gives the runner a new runner id, so the package stops the actor
    // it still runs. Wait for that stop before waking the actor again: in
    // @rivetkit/engine-runner 2.2.1 the stop (`#stopAllActors` → `forceStopActor(actorId)`,
    // no generation) removes whatever generation of the actor is in its map when its
    // `onActorStop` returns, so a start of the next generation that arrives meanwhile is
    // dropped and its requests leak ("actor does not exist in handleRequestStart").
    runner.expect("ACTOR_STOPPED", &actor_id);
    let got = kv(
        &daemon,
        &actor_id,
        serde_json::json!({"op": "get", "keys": [hex(b"state")]}),
    )
    .unwrap();
    assert_eq!(got, serde_json::json!([value]));
    runner.stop();
}

// ---- the admin token (auth.admin_token) -------------------------------------------------------

/// Spawns the engine-runner script with `ENGINE_RUNNER_TOKEN` (the package's `token` option)
/// set to `token`, or unset; does not wait for anything.
fn spawn_engine_runner(endpoint: &str, token: Option<&str>, name: &'static str) -> Proc {
    let dir = interop_dir();
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("engine_runner_echo.mjs"))
        .arg(endpoint)
        .current_dir(&dir)
        .env(
            "ENGINE_RUNNER_LOG",
            std::env::var("ENGINE_RUNNER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env_remove("ENGINE_RUNNER_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(t) = token {
        cmd.env("ENGINE_RUNNER_TOKEN", t);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn node engine_runner_echo.mjs: {e}"));
    let out = child.stdout.take().expect("piped stdout");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("[{name}] {line}");
            let _ = tx.send(line);
        }
    });
    Proc { child, lines, name }
}

/// `http` with `Authorization: Bearer <token>` added.
fn http_bearer(
    addr: std::net::SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let bearer = format!("Bearer {token}");
    let mut h = vec![("authorization", bearer.as_str())];
    h.extend_from_slice(headers);
    http(addr, method, path, &h, body)
}

/// One metric series read with the token (0 when absent).
fn metric_bearer(d: &Daemon, token: &str, series: &str) -> f64 {
    let (status, _, body) = http_bearer(d.addr, token, "GET", "/metrics", &[], b"");
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

/// Waits (bounded) until a metric read with the token satisfies `pred`.
fn wait_metric_bearer(d: &Daemon, token: &str, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let v = metric_bearer(d, token, series);
        if pred(v) {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metric {series} stuck at {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Creates an echo actor with the token; returns its id.
fn create_actor_bearer(d: &Daemon, token: &str, key: &str) -> String {
    let body = serde_json::json!({
        "name": "echo", "key": key, "runner_name_selector": "default", "crash_policy": "sleep",
    });
    let (status, _, resp) = http_bearer(
        d.addr,
        token,
        "POST",
        "/actors?namespace=default",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "create: {}", String::from_utf8_lossy(&resp));
    json_body(&resp)["actor"]["actor_id"]
        .as_str()
        .expect("actor.actor_id")
        .to_string()
}

fn error_header(headers: &[(String, String)]) -> Option<&str> {
    headers
        .iter()
        .find(|(k, _)| k == "x-rivet-error")
        .map(|(_, v)| v.as_str())
}

/// With `auth.admin_token` set, the package's `token` option is all a runner needs: the actor
/// starts on it, and a WebSocket, HTTP and KV work through the gateway (which clients reach
/// without the token); the engine API refuses calls without the token.
#[test]
fn engine_runner_with_the_admin_token_works_end_to_end() {
    if !node_available() {
        return;
    }
    let token = format!("er-token-{:x}", common::rand_u64());
    let d = Daemon::start(1, &[("TORPOR_AUTH__ADMIN_TOKEN", &token)]);
    let runner = EngineRunner {
        proc: spawn_engine_runner(&d.endpoint(), Some(&token), "engine-runner+token"),
    };
    runner.proc.wait_line("READY ");
    wait_metric_bearer(&d, &token, "torpor_runners_connected", |v| v == 1.0);

    // The engine API without the token (or with another) is refused.
    let (status, headers, _) = http(d.addr, "GET", "/actors/names?namespace=default", &[], b"");
    assert_eq!(
        (status, error_header(&headers)),
        (401, Some("api.unauthorized"))
    );
    let (status, headers, _) = http_bearer(
        d.addr,
        "wrong",
        "GET",
        "/actors/names?namespace=default",
        &[],
        b"",
    );
    assert_eq!(
        (status, error_header(&headers)),
        (401, Some("api.unauthorized"))
    );

    let actor_id = create_actor_bearer(&d, &token, &format!("token-{:x}", common::rand_u64()));
    runner.expect("ACTOR_STARTED", &actor_id);

    // A WebSocket through the gateway.
    let mut ws = ws_connect(d.addr, &actor_id, "/echo?token=1");
    runner.expect("WS_OPEN", &actor_id);
    let mut rng = Rng(0x70c3_e000_0000_0001);
    let msgs: Vec<Message> = (0..20)
        .map(|i| {
            if i % 2 == 0 {
                Message::Text(text_of_len(&mut rng, 1 + i * 101).into())
            } else {
                Message::Binary(rng.bytes(1 + i * 997).into())
            }
        })
        .collect();
    echo_all(&mut ws, &msgs);
    let (code, _) = client_close(&mut ws, 1000, "bye");
    assert_eq!(code, 1000);

    // HTTP through the gateway.
    let (status, _, resp) = http(
        d.addr,
        "POST",
        &format!("/gateway/{actor_id}/with/token"),
        &[("content-type", "text/plain")],
        b"payload",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let v = json_body(&resp);
    assert_eq!(v["path"], "/with/token");
    assert_eq!(v["body"], "payload");

    // KV through the package's own KV client.
    kv(
        &d,
        &actor_id,
        serde_json::json!({"op": "put", "entries": [[hex(b"k"), hex(b"v")]]}),
    )
    .unwrap();
    let got = kv(
        &d,
        &actor_id,
        serde_json::json!({"op": "get", "keys": [hex(b"k")]}),
    )
    .unwrap();
    assert_eq!(got, serde_json::json!([hex(b"v")]));

    assert_eq!(
        metric_bearer(
            &d,
            &token,
            "torpor_errors_total{code=\"runner.unauthorized\"}"
        ),
        0.0
    );
    assert_eq!(
        metric_bearer(&d, &token, "torpor_runner_protocol_errors_total"),
        0.0
    );
    runner.stop();
}

/// A runner with a wrong token, or none, is refused at the upgrade and never gets an actor:
/// an actor created with the token stays unplaced and a gateway request ends in
/// `guard.actor_ready_timeout`.
#[test]
fn engine_runner_without_the_right_token_is_refused_and_gets_no_actor() {
    if !node_available() {
        return;
    }
    let token = format!("er-token-{:x}", common::rand_u64());
    let d = Daemon::start(
        1,
        &[
            ("TORPOR_AUTH__ADMIN_TOKEN", &token),
            ("TORPOR_TIMEOUTS__ACTOR_WAKE_MS", "1500"),
        ],
    );
    let refused = "torpor_errors_total{code=\"runner.unauthorized\"}";
    let before = metric_bearer(&d, &token, "torpor_unauthorized_total");

    // An actor created with the token, before any runner is there.
    let actor_id = create_actor_bearer(&d, &token, &format!("orphan-{:x}", common::rand_u64()));

    // A wrong token: refused (the package retries; every attempt is refused).
    let wrong = spawn_engine_runner(&d.endpoint(), Some("not-the-token"), "engine-runner-wrong");
    let n = wait_metric_bearer(&d, &token, refused, |v| v >= 1.0);
    let mut seen: Vec<String> = wrong.lines.try_iter().collect();
    drop(wrong);
    // No token at all: refused too.
    let none = spawn_engine_runner(&d.endpoint(), None, "engine-runner-none");
    wait_metric_bearer(&d, &token, refused, |v| v > n);
    assert!(metric_bearer(&d, &token, "torpor_unauthorized_total") >= before + 2.0);
    assert_eq!(metric_bearer(&d, &token, "torpor_runners_connected"), 0.0);

    // The actor has nowhere to run: a gateway request waits for it and times out.
    let (status, headers, body) = http(d.addr, "GET", &format!("/gateway/{actor_id}/"), &[], b"");
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(error_header(&headers), Some("guard.actor_ready_timeout"));
    assert_eq!(metric_bearer(&d, &token, "torpor_runners_connected"), 0.0);
    // Neither refused runner ever saw an Init nor an actor.
    seen.extend(none.lines.try_iter());
    assert!(
        !seen
            .iter()
            .any(|l| l.starts_with("READY") || l.starts_with("ACTOR_STARTED")),
        "a refused runner got somewhere: {seen:?}"
    );
}
