//! Protected mode and the admin token, seen from a peer that is not on loopback.
//!
//! The test makes its own network namespace (`ip netns add`) joined to the root namespace by a
//! veth pair on a private /30 in 10.213.0.0/16 (root side `.1`, namespace side `.2`); torpor
//! listens on `0.0.0.0:<port>` in the root namespace and the client runs in the namespace (a
//! thread that `setns`es into it, so it is this test's own HTTP/WebSocket client; the echo
//! runner is started with `ip netns exec`). Traffic goes only to the addresses made here.
//!
//! * No token (protected mode): from the namespace the engine API is 401 `api.unauthorized`
//!   naming `auth.admin_token`, a runner connection is 401 `runner.unauthorized`, and the
//!   gateway (`/gateway/…`, HTTP and WebSocket) still reaches the actor; from loopback the API
//!   answers 200.
//! * With `auth.admin_token`: from the namespace the API needs `Authorization: Bearer <token>`
//!   (200 with it, 401 without or with another), a runner needs `rivet_token.<token>`, and an
//!   echo runner inside the namespace with the token hosts an actor reached through the gateway.
//!
//! The namespace and the veth pair are removed by a Drop guard, also on panic. Skipped (with the
//! reason printed) when not root or without `ip`; as root, failing to create the namespace
//! fails the test under `CI=true` and skips it otherwise.

mod common;

use common::{http, json_body, Daemon, Proc, WAIT};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

// ---- the namespace ----------------------------------------------------------------------------

/// A network namespace with a veth pair to the root namespace; removed on drop.
struct NetNs {
    name: String,
    host_if: String,
    /// The root namespace's end (where torpor is reached from inside the namespace).
    host_ip: Ipv4Addr,
    /// The namespace's end (the peer address torpor sees).
    ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether some interface already has an address in 10.213.`a`.`b`/30.
fn subnet_in_use(a: u8, b: u8) -> bool {
    let out = Command::new("ip")
        .args([
            "-4",
            "-o",
            "addr",
            "show",
            "to",
            &format!("10.213.{a}.{b}/30"),
        ])
        .output();
    out.map(|o| !o.stdout.is_empty()).unwrap_or(true)
}

impl NetNs {
    /// Creates the namespace, or `None` (skip, reason printed) where that is impossible.
    fn create() -> Option<NetNs> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: creating a network namespace needs root");
            return None;
        }
        if Command::new("ip")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!("skipping: no `ip` command (iproute2)");
            return None;
        }
        let tag = format!("{:06x}", common::rand_u64() & 0xff_ffff);
        let mut ns = NetNs {
            name: format!("torpor-test-{}-{tag}", std::process::id()),
            host_if: format!("tp{tag}h"),
            host_ip: Ipv4Addr::UNSPECIFIED,
            ns_ip: Ipv4Addr::UNSPECIFIED,
        };
        match ns.setup() {
            Ok(()) => Some(ns),
            Err(e) => {
                // `ns` is dropped here: whatever was made is removed.
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("cannot create a network namespace as root under CI: {e}");
                }
                eprintln!("skipping: cannot create a network namespace: {e}");
                None
            }
        }
    }

    fn setup(&mut self) -> Result<(), String> {
        // A free /30 of 10.213.0.0/16 (chosen at random, so parallel runs do not meet).
        let mut tries = 0;
        let (a, b) = loop {
            let seed = common::rand_u64();
            let a = (seed & 0xff) as u8;
            let b = (((seed >> 8) & 0x3f) * 4) as u8;
            if !subnet_in_use(a, b) {
                break (a, b);
            }
            tries += 1;
            if tries == 64 {
                return Err("no free /30 in 10.213.0.0/16 after 64 tries".into());
            }
        };
        self.host_ip = Ipv4Addr::new(10, 213, a, b + 1);
        self.ns_ip = Ipv4Addr::new(10, 213, a, b + 2);
        let peer_if = format!("{}n", &self.host_if[..self.host_if.len() - 1]);
        ip(&["netns", "add", &self.name])?;
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
        ])?;
        ip(&["link", "set", &peer_if, "netns", &self.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.host_ip),
            "dev",
            &self.host_if,
        ])?;
        ip(&["link", "set", &self.host_if, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &self.name, "ip"];
            full.extend_from_slice(args);
            ip(&full)
        };
        in_ns(&[
            "addr",
            "add",
            &format!("{}/30", self.ns_ip),
            "dev",
            &peer_if,
        ])?;
        in_ns(&["link", "set", &peer_if, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it opens live there).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            use std::os::fd::AsRawFd;
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// `port` on the root namespace's end, as the namespace sees it.
    fn host(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.host_ip, port))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end, and with it the pair; the explicit
        // `link del` covers a pair whose peer never got moved into the namespace.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

// ---- clients ----------------------------------------------------------------------------------

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A runner's WebSocket upgrade to `/runners/connect`, offering `protocols`; returns the status
/// and headers of the answer (only the head is read: a 101 keeps the connection open).
fn runner_upgrade(addr: SocketAddr, protocols: &str) -> (u16, Vec<(String, String)>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let req = format!(
        "GET /runners/connect?protocol_version=7&namespace=default&runner_key=k HTTP/1.1\r\n\
         host: {addr}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\
         sec-websocket-protocol: {protocols}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            other => panic!(
                "runner upgrade: no complete answer head ({other:?}): {:?}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let headers = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    (status, headers)
}

/// One echo over a client WebSocket to `/gateway/{actor}/ws`.
fn gateway_ws_echo(addr: SocketAddr, actor: &str, text: &str) -> String {
    let mut ws = common::ws_connect(addr, actor, "/ws");
    ws.send(tungstenite::Message::text(text)).unwrap();
    let got = match common::ws_recv(&mut ws) {
        tungstenite::Message::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    };
    let _ = ws.close(None);
    got
}

/// `torpor_unauthorized_total`, asked from loopback (with the token when there is one).
fn unauthorized_total(loopback: SocketAddr, token: Option<&str>) -> f64 {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    let (status, _, body) = http(loopback, "GET", "/metrics", &headers, b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("torpor_unauthorized_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("torpor_unauthorized_total")
}

/// Creates an echo actor through the engine API at `addr` (with `auth` headers).
fn create_echo(addr: SocketAddr, auth: &[(&str, &str)], key: &str) -> (u16, serde_json::Value) {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(auth);
    let body = serde_json::json!({
        "name": "echo", "key": key, "runner_name_selector": "default", "crash_policy": "sleep",
    });
    let (status, _, resp) = http(
        addr,
        "POST",
        "/actors?namespace=default",
        &headers,
        body.to_string().as_bytes(),
    );
    let v = serde_json::from_slice(&resp).unwrap_or(serde_json::Value::Null);
    (status, v)
}

fn start_daemon(env: &[(&str, &str)]) -> (Daemon, u16) {
    let d = Daemon::start_at("0.0.0.0:0", &common::temp_dir("protected"), 1, env, &[]);
    let port = d.addr.port();
    (d, port)
}

const API: &str = "/actors/names?namespace=default";

// ---- tests ------------------------------------------------------------------------------------

#[test]
fn protected_mode_refuses_the_api_and_runners_from_other_hosts_but_not_the_gateway() {
    let Some(ns) = NetNs::create() else { return };
    let started = Instant::now();
    let (_d, port) = start_daemon(&[]);
    let loopback = SocketAddr::from(([127, 0, 0, 1], port));
    let remote = ns.host(port);
    let _runner = common::Runner::start(&format!("http://{loopback}"), &[]);
    let actor = common::create_actor(loopback, "echo", Some("protected"));
    let refused_before = unauthorized_total(loopback, None);

    // From loopback: the engine API answers.
    let (status, _, body) = http(loopback, "GET", API, &[], b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    let (api, runner, gw_http, gw_ws) = ns.run(move || {
        (
            http(remote, "GET", API, &[], b""),
            runner_upgrade(remote, "rivet"),
            http(
                remote,
                "POST",
                &format!("/gateway/{actor}/from/ns"),
                &[],
                b"hi",
            ),
            gateway_ws_echo(remote, &actor, "ws from the namespace"),
        )
    });

    // The engine API from another host: 401 that says how to open it up.
    let (status, headers, body) = api;
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&headers, "x-rivet-error"), Some("api.unauthorized"));
    let v = json_body(&body);
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("auth.admin_token"),
        "{v}"
    );
    // A runner from another host: 401 before any runner state.
    let (status, headers) = runner;
    assert_eq!(status, 401, "{headers:?}");
    assert_eq!(
        header(&headers, "x-rivet-error"),
        Some("runner.unauthorized")
    );
    // The gateway is open to any peer: the actor answered over HTTP and WebSocket.
    let (status, headers, body) = gw_http;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, b"hi");
    assert_eq!(header(&headers, "x-echo-path"), Some("/from/ns"));
    assert_eq!(gw_ws, "ws from the namespace");

    assert!(unauthorized_total(loopback, None) >= refused_before + 2.0);
    // The refusals named the namespace's address as the peer (not loopback): a second call
    // from loopback is still accepted.
    let (status, _, _) = http(loopback, "GET", API, &[], b"");
    assert_eq!(status, 200);
    eprintln!(
        "protected mode from {} done in {:?}",
        ns.ns_ip,
        started.elapsed()
    );
}

#[test]
fn with_a_token_other_hosts_are_accepted_with_it_and_only_with_it() {
    let Some(ns) = NetNs::create() else { return };
    let started = Instant::now();
    let token = format!("tok-{:x}", common::rand_u64());
    let (_d, port) = start_daemon(&[("TORPOR_AUTH__ADMIN_TOKEN", &token)]);
    let loopback = SocketAddr::from(([127, 0, 0, 1], port));
    let remote = ns.host(port);

    let t = token.clone();
    let (no_token, wrong, right, runner_bad, runner_good) = ns.run(move || {
        let bearer = format!("Bearer {t}");
        (
            http(remote, "GET", API, &[], b""),
            http(
                remote,
                "GET",
                API,
                &[("authorization", "Bearer not-the-token")],
                b"",
            ),
            http(remote, "GET", API, &[("authorization", &bearer)], b""),
            runner_upgrade(remote, "rivet, rivet_token.not-the-token"),
            runner_upgrade(remote, &format!("rivet, rivet_token.{t}")),
        )
    });
    assert_eq!(no_token.0, 401, "{}", String::from_utf8_lossy(&no_token.2));
    assert_eq!(
        header(&no_token.1, "x-rivet-error"),
        Some("api.unauthorized")
    );
    assert_eq!(wrong.0, 401, "{}", String::from_utf8_lossy(&wrong.2));
    assert_eq!(header(&wrong.1, "x-rivet-error"), Some("api.unauthorized"));
    assert_eq!(right.0, 200, "{}", String::from_utf8_lossy(&right.2));
    assert!(json_body(&right.2)["names"].is_object());
    assert_eq!(runner_bad.0, 401, "{:?}", runner_bad.1);
    assert_eq!(
        header(&runner_bad.1, "x-rivet-error"),
        Some("runner.unauthorized")
    );
    assert_eq!(runner_good.0, 101, "{:?}", runner_good.1);
    // A token never appears in an answer.
    for (_, v) in no_token.1.iter().chain(&wrong.1).chain(&runner_bad.1) {
        assert!(!v.contains(&token), "token leaked in a header");
    }
    // The token is required from loopback too.
    let (status, _, _) = http(loopback, "GET", API, &[], b"");
    assert_eq!(status, 401);
    assert!(unauthorized_total(loopback, Some(&token)) >= 4.0);

    // End to end from the other host: an echo runner inside the namespace with the token, an
    // actor created from the namespace with the bearer token, reached through the gateway.
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_echo-runner")])
        .arg("--endpoint")
        .arg(format!("http://{remote}"))
        .arg("--token")
        .arg(&token)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("spawn echo-runner in the namespace");
    let out = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("[echo-runner@ns] {line}");
            let _ = tx.send(line);
        }
    });
    let runner = Proc {
        child,
        lines,
        name: "echo-runner in the namespace",
    };
    runner.wait_line("READY");

    let t = token.clone();
    let (created, gw_http, gw_ws) = ns.run(move || {
        let bearer = format!("Bearer {t}");
        let (status, v) = create_echo(remote, &[("authorization", &bearer)], "from-ns");
        assert_eq!(status, 200, "create from the namespace: {v}");
        let actor = v["actor"]["actor_id"]
            .as_str()
            .expect("actor id")
            .to_string();
        let gw = http(remote, "POST", &format!("/gateway/{actor}/x"), &[], b"tok");
        let ws = gateway_ws_echo(remote, &actor, "hello");
        (actor, gw, ws)
    });
    assert!(!created.is_empty());
    assert_eq!(gw_http.0, 200, "{}", String::from_utf8_lossy(&gw_http.2));
    assert_eq!(gw_http.2, b"tok");
    assert_eq!(gw_ws, "hello");
    drop(runner);
    eprintln!(
        "token mode from {} done in {:?}",
        ns.ns_ip,
        started.elapsed()
    );
}
