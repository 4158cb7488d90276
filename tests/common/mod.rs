//! Test harness: starts the real `torpor` daemon and the real `echo-runner` binary as child
//! processes on loopback, with a tiny HTTP client and a tungstenite WebSocket client.
//!
//! Waits in here are bounded waits for a condition (a line on stdout, a counter reaching a
//! value), never sleeps that a test's verdict depends on.

#![allow(dead_code)]

pub mod cluster;
pub mod core;
pub mod tmpfs;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const WAIT: Duration = Duration::from_secs(60);

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "torpor-test-{tag}-{}-{}",
        std::process::id(),
        rand_u64()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

/// A child process whose stdout lines are forwarded to a channel.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub name: &'static str,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                if tx.send(line).is_err() {
                    // keep draining so the child never blocks on a full pipe
                }
            }
        });
        Proc {
            child,
            lines: rx,
            name,
        }
    }

    /// Waits for a stdout line starting with `prefix` and returns it.
    pub fn wait_line(&self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => continue,
                Err(_) => panic!("{}: no line starting with {prefix:?}", self.name),
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Daemon {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// The admin token it was started with (`TORPOR_AUTH__ADMIN_TOKEN`), sent by `metrics`.
    pub token: Option<String>,
    keep_data_dir: bool,
}

/// Waits (bounded) until nothing listens on `addr`. After a `kill -9` the dead process's
/// listener can outlive it for a moment (its io_uring still holds an accept), and torpor
/// refuses to start on an address that another socket listens on.
pub fn wait_port_free(addr: SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let deadline = Instant::now() + WAIT;
    loop {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        if s.bind(&addr.into()).is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "{addr} stayed in use");
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Daemon {
    /// Starts `torpor serve` on an ephemeral loopback port with extra `TORPOR_*` settings.
    pub fn start(shards: usize, env: &[(&str, &str)]) -> Daemon {
        Self::start_with(shards, env, &[])
    }

    pub fn start_with(shards: usize, env: &[(&str, &str)], args: &[&str]) -> Daemon {
        Self::start_at("127.0.0.1:0", &temp_dir("data"), shards, env, args)
    }

    /// Kills this daemon (SIGKILL: nothing is flushed on the way out) and starts a new one on
    /// the same address and data directory.
    pub fn kill_and_restart(mut self, shards: usize, env: &[(&str, &str)]) -> Daemon {
        let (addr, data_dir) = (self.addr, self.data_dir.clone());
        self.keep_data_dir = true;
        drop(self);
        Self::start_at(&addr.to_string(), &data_dir, shards, env, &[])
    }

    /// Stops this daemon with SIGTERM, waits for it to exit, and keeps its data directory.
    pub fn terminate_keeping_data(mut self) -> std::process::ExitStatus {
        self.keep_data_dir = true;
        self.proc.signal(libc::SIGTERM);
        self.proc.child.wait().unwrap()
    }

    pub fn start_at(
        listen: &str,
        data_dir: &std::path::Path,
        shards: usize,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Daemon {
        let data_dir = data_dir.to_path_buf();
        if let Ok(a) = listen.parse::<SocketAddr>() {
            if a.port() != 0 {
                wait_port_free(a);
            }
        }
        let token = env
            .iter()
            .find(|(k, _)| *k == "TORPOR_AUTH__ADMIN_TOKEN")
            .map(|(_, v)| v.to_string());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_torpor"));
        cmd.args(["serve", "--listen", listen, "--shards"])
            .arg(shards.to_string())
            .arg("--data-dir")
            .arg(&data_dir)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("TORPOR_PIN_THREADS", "false");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn("torpor", cmd);
        let line = proc.wait_line("torpor listening on ");
        let addr: SocketAddr = line["torpor listening on ".len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        Daemon {
            proc,
            addr,
            data_dir,
            token,
            keep_data_dir: false,
        }
    }

    /// The daemon's resident set size in bytes (`VmRSS` from `/proc`).
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.child.id()))
            .expect("daemon status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    /// Creates an actor (with the daemon's token, if any) and returns its id.
    pub fn create_actor(&self, name: &str, key: Option<&str>) -> String {
        create_actor_auth(self.addr, self.token.as_deref(), name, key)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// GET /metrics, parsed into (series, value) pairs.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        let bearer = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("authorization", b.as_str()))
            .collect();
        let (status, _, body) = http(self.addr, "GET", "/metrics", &headers, b"");
        assert_eq!(status, 200, "GET /metrics");
        String::from_utf8(body)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    pub fn metric(&self, series: &str) -> f64 {
        self.metrics()
            .into_iter()
            .find(|(k, _)| k == series)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no metric {series}"))
    }

    /// Waits until `pred(metric)` holds (bounded).
    pub fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.metric(series);
            if pred(v) {
                return v;
            }
            assert!(Instant::now() < deadline, "metric {series} stuck at {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        if !self.keep_data_dir {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

pub struct Runner {
    pub proc: Proc,
    pub runner_id: String,
}

impl Runner {
    /// Starts the echo runner against `endpoint` and waits for its READY line.
    pub fn start(endpoint: &str, args: &[&str]) -> Runner {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_echo-runner"));
        cmd.arg("--endpoint").arg(endpoint).args(args);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        let proc = Proc::spawn("echo-runner", cmd);
        let line = proc.wait_line("READY");
        let runner_id = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("runner_id="))
            .unwrap_or_default()
            .to_string();
        Runner { proc, runner_id }
    }

    /// Starts the echo runner without waiting for it to be ready (it may never be).
    pub fn spawn_unready(endpoint: &str, args: &[&str]) -> Runner {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_echo-runner"));
        cmd.arg("--endpoint").arg(endpoint).args(args);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        Runner {
            proc: Proc::spawn("echo-runner", cmd),
            runner_id: String::new(),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }
}

/// A minimal HTTP/1.1 client: returns (status, headers, body).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_response(s)
}

/// Reads a whole response (the server closes the connection) into (status, headers, body).
pub fn read_response(mut s: TcpStream) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no response head ({read:?}): {:?}",
                String::from_utf8_lossy(&raw)
            )
        });
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    (status, headers, body)
}

pub fn json_body(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Creates an actor through the engine API and returns its id.
pub fn create_actor(addr: SocketAddr, name: &str, key: Option<&str>) -> String {
    create_actor_auth(addr, None, name, key)
}

/// `POST /actors?namespace=default` with `body` (no token): (status, headers, body).
pub fn post_actor(
    addr: SocketAddr,
    body: &serde_json::Value,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    http(
        addr,
        "POST",
        "/actors?namespace=default",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
}

/// The `actor.actor_id` of a create's answer.
pub fn created_actor_id(resp: &[u8]) -> String {
    json_body(resp)["actor"]["actor_id"]
        .as_str()
        .expect("actor.actor_id")
        .to_string()
}

/// Creates an actor, sending `token` as the bearer credential when given.
pub fn create_actor_auth(
    addr: SocketAddr,
    token: Option<&str>,
    name: &str,
    key: Option<&str>,
) -> String {
    let mut body = serde_json::json!({
        "name": name,
        "runner_name_selector": "default",
        "crash_policy": "sleep",
    });
    if let Some(k) = key {
        body["key"] = serde_json::Value::String(k.to_string());
    }
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("authorization", b.as_str()));
    }
    let (status, _, resp) = http(
        addr,
        "POST",
        "/actors?namespace=default",
        &headers,
        body.to_string().as_bytes(),
    );
    assert_eq!(
        status,
        200,
        "create actor: {}",
        String::from_utf8_lossy(&resp)
    );
    let v = json_body(&resp);
    v["actor"]["actor_id"]
        .as_str()
        .expect("actor.actor_id")
        .to_string()
}

pub type Ws = tungstenite::WebSocket<TcpStream>;

/// Opens a client WebSocket to `/gateway/{actor}/{path}` on `addr`.
pub fn ws_connect(addr: SocketAddr, actor_id: &str, path: &str) -> Ws {
    let url = format!("ws://{addr}/gateway/{actor_id}{path}");
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut cfg = tungstenite::protocol::WebSocketConfig::default();
    cfg.max_message_size = Some(64 << 20);
    cfg.max_frame_size = Some(16 << 20);
    let (ws, resp) = tungstenite::client::client_with_config(url, stream, Some(cfg))
        .unwrap_or_else(|e| panic!("ws connect: {e}"));
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

/// Reads until a data message arrives (answers pings on the way).
pub fn ws_recv(ws: &mut Ws) -> tungstenite::Message {
    loop {
        match ws.read() {
            Ok(m @ (tungstenite::Message::Text(_) | tungstenite::Message::Binary(_))) => return m,
            Ok(tungstenite::Message::Close(f)) => panic!("closed by server: {f:?}"),
            Ok(_) => continue,
            Err(e) => panic!("ws read: {e}"),
        }
    }
}

/// Reads until the server closes; returns the close code and reason.
pub fn ws_expect_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(Some(f))) => {
                return (u16::from(f.code), f.reason.to_string())
            }
            Ok(tungstenite::Message::Close(None)) => return (1005, String::new()),
            Ok(_) => continue,
            Err(e) => panic!("expected a close frame, got error {e}"),
        }
    }
}

/// Deterministic xorshift for seeded test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A runner written out by hand: connects to `/runners/connect` (namespace `default`,
/// subprotocol `rivet`) with `key` and sends `init`. It does not wait for the gateway's
/// answer (a test may expect a refusal).
pub fn raw_runner_ws(addr: SocketAddr, key: &str, init: torpor::protocol::ToServerInit) -> Ws {
    use tungstenite::client::IntoClientRequest;
    let url = format!(
        "ws://{addr}/runners/connect?protocol_version=7&namespace=default&runner_key={key}"
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "rivet".parse().unwrap());
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let (mut ws, _) = tungstenite::client::client(req, stream).expect("runner upgrade");
    let init = torpor::protocol::ToServer::Init(init);
    ws.send(tungstenite::Message::binary(
        torpor::protocol::encode_to_server(&init),
    ))
    .unwrap();
    ws
}

/// A plain `Init` for a runner named `name` with `slots` slots.
pub fn runner_init(name: &str, slots: u32) -> torpor::protocol::ToServerInit {
    torpor::protocol::ToServerInit {
        name: name.into(),
        version: 1,
        total_slots: slots,
        prepopulate_actor_names: None,
        metadata: None,
    }
}

/// Reads a hand-written runner's gateway messages until `pick` returns something (panics if
/// the gateway closes the connection first).
pub fn runner_until<T>(
    ws: &mut Ws,
    mut pick: impl FnMut(torpor::protocol::ToClient) -> Option<T>,
) -> T {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) => {
                let msg = torpor::protocol::decode_to_client(&b).expect("gateway bytes");
                if let Some(t) = pick(msg) {
                    return t;
                }
            }
            Ok(tungstenite::Message::Close(f)) => panic!("runner closed: {f:?}"),
            Ok(_) => continue,
            Err(e) => panic!("runner read: {e}"),
        }
    }
}
