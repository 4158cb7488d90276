//! A real browser against torpor: headless Chromium (Debian's `chromium`) loads a page served
//! by this test from another loopback origin (`http://127.0.0.1:<page port>`,
//! `tests/interop/browser_page.html`). The page calls torpor's engine API cross-origin (POST and
//! PUT `/actors` with JSON, which the browser preflights; a plain GET) and an actor through the
//! gateway (an HTTP request that needs a preflight, and a WebSocket), on the real `echo-runner`,
//! and writes what it got into the DOM, which `chromium --dump-dom` prints.
//!
//! * Default configuration (protected mode, no token): loopback origins may use the engine API,
//!   so every call works and the browser could read every answer.
//! * `cors.allowed_origins = ["http://example.invalid"]`: the page's origin is not allowed, so
//!   the browser cannot read any engine API answer and the JSON POST never reaches torpor (its
//!   preflight is refused: no actor is created); the gateway still answers any origin.
//!
//! No verdict depends on timing: the page's `load` event waits for an image that the test's
//! server answers only after the page reported its results (bounded: `common::WAIT`), so the DOM
//! is printed only once the script is done. Chromium missing: the test fails when `CI=true`,
//! else it prints why and skips (`scripts/test.sh` installs it).

mod common;

use common::{create_actor, http, json_body, temp_dir, Daemon, Runner, WAIT};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The Chromium binary, or `None` (skip) when it is missing outside CI.
fn chromium() -> Option<PathBuf> {
    let candidates = ["chromium", "chromium-browser"];
    for c in candidates {
        let ok = Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(PathBuf::from(c));
        }
    }
    let why = "chromium is not installed (apt-get install -y --no-install-recommends chromium; scripts/test.sh does it)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}");
    }
    eprintln!("skipping the browser test: {why}");
    None
}

// ---- the page's origin: a tiny HTTP server ----------------------------------------------------

/// What the page reported through `POST /result`.
#[derive(Default)]
struct Reported {
    result: Mutex<Option<String>>,
    cond: Condvar,
}

impl Reported {
    /// Waits (bounded) for the page's report; `None` when it never came.
    fn wait(&self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        let mut g = self.result.lock().unwrap();
        while g.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = self.cond.wait_timeout(g, left).unwrap().0;
        }
        g.clone()
    }
}

/// Serves the page on `127.0.0.1:<port>`, one thread per connection: `GET /page.html`,
/// `POST /result` (the page's report) and `GET /gate.gif` (answered once the report is in).
struct PageServer {
    addr: SocketAddr,
    reported: Arc<Reported>,
}

impl PageServer {
    fn start(page: String) -> PageServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reported = Arc::new(Reported::default());
        let page = Arc::new(page);
        let r = reported.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (page, r) = (page.clone(), r.clone());
                std::thread::spawn(move || serve(conn, &page, &r));
            }
        });
        PageServer { addr, reported }
    }

    fn url(&self) -> String {
        format!("http://{}/page.html", self.addr)
    }
}

/// One HTTP/1.1 connection (keep-alive: Chromium reuses connections).
fn serve(conn: TcpStream, page: &str, reported: &Reported) {
    let _ = conn.set_read_timeout(Some(WAIT));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (status, ctype, out): (&str, &str, Vec<u8>) = match (method.as_str(), path.as_str()) {
            ("GET", "/page.html") => ("200 OK", "text/html; charset=utf-8", page.into()),
            ("POST", "/result") => {
                *reported.result.lock().unwrap() = Some(String::from_utf8_lossy(&body).into());
                reported.cond.notify_all();
                ("204 No Content", "text/plain", Vec::new())
            }
            ("GET", "/gate.gif") => {
                // Holds the page's load event until the script reported (bounded).
                let _ = reported.wait(WAIT);
                ("404 Not Found", "text/plain", Vec::new())
            }
            _ => ("404 Not Found", "text/plain", Vec::new()),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\ncache-control: no-store\r\n\r\n",
            out.len()
        );
        if w.write_all(head.as_bytes()).is_err() || w.write_all(&out).is_err() {
            return;
        }
    }
}

// ---- Chromium ---------------------------------------------------------------------------------

/// Loads `url` in headless Chromium and returns the DOM it printed after the load event.
fn dump_dom(chromium: &Path, url: &str) -> String {
    let profile = temp_dir("chromium-profile");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", chromium.display()));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // Bounded wait for the exit: the page's gate answers within WAIT, Chromium then exits.
    let deadline = Instant::now() + WAIT + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dom = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    match status {
        Some(s) if s.success() => dom,
        other => panic!("chromium did not finish ({other:?}); stderr:\n{stderr}\nstdout:\n{dom}"),
    }
}

/// The JSON the page wrote into `<pre id="result">`.
fn page_result(dom: &str) -> Value {
    let start = dom
        .find("<pre id=\"result\">")
        .unwrap_or_else(|| panic!("no result element in the DOM:\n{dom}"))
        + "<pre id=\"result\">".len();
    let end = start + dom[start..].find("</pre>").expect("</pre>");
    let text = dom[start..end]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("the page did not write its results ({e}): {text:?}"))
}

/// Serves the page for `api` and loads it; returns (what the DOM says, the page's origin).
fn run_page(chromium: &Path, api: &str, key: &str, preset_actor: &str) -> (Value, String) {
    let template = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/browser_page.html"),
    )
    .expect("tests/interop/browser_page.html");
    let page = template
        .replace("__API__", api)
        .replace("__KEY__", key)
        .replace("__ACTOR__", preset_actor);
    let server = PageServer::start(page);
    let dom = dump_dom(chromium, &server.url());
    let v = page_result(&dom);
    // The same results also reached the page's own origin.
    let reported = server
        .reported
        .wait(Duration::ZERO)
        .expect("the page reported its results");
    assert_eq!(json_body(reported.as_bytes()), v);
    (v, format!("http://{}", server.addr))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Checks the gateway results: a preflighted HTTP request and a WebSocket reached the echo actor.
fn assert_gateway_worked(v: &Value) {
    let g = &v["gateway_http"];
    assert_eq!(g["status"], 200, "gateway HTTP from the browser: {v}");
    assert_eq!(g["body"], "hello from the browser", "{v}");
    assert_eq!(g["echo_method"], "POST", "{v}");
    assert_eq!(g["echo_path"], "/from/browser?x=1", "{v}");
    assert_eq!(
        v["gateway_ws"]["echo"], "ping from the browser",
        "gateway WebSocket from the browser: {v}"
    );
}

#[test]
fn browser_on_a_loopback_origin_uses_the_api_and_the_gateway() {
    let Some(chromium) = chromium() else { return };
    let d = Daemon::start(1, &[]);
    let _runner = Runner::start(&d.endpoint(), &[]);
    d.wait_metric("torpor_runners_connected", |v| v == 1.0);
    let key = format!("browser-{:x}", common::rand_u64());
    let started = Instant::now();
    let (v, origin) = run_page(&chromium, &d.endpoint(), &key, "none");
    eprintln!("browser page done in {:?}: {v}", started.elapsed());

    // POST /actors (preflighted JSON): created, and the browser could read the answer.
    assert_eq!(v["create"]["status"], 200, "{v}");
    let id = v["create"]["body"]["actor"]["actor_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no actor id: {v}"))
        .to_string();
    assert_eq!(v["create"]["body"]["actor"]["key"], key.as_str(), "{v}");
    // PUT /actors (get or create): the same actor.
    assert_eq!(v["get_or_create"]["status"], 200, "{v}");
    assert_eq!(
        v["get_or_create"]["body"]["actor"]["actor_id"],
        id.as_str(),
        "{v}"
    );
    // A simple GET (no preflight).
    assert_eq!(v["list"]["status"], 200, "{v}");
    assert_eq!(
        v["list"]["body"]["actors"][0]["actor_id"],
        id.as_str(),
        "{v}"
    );
    // The gateway: the actor the page created answered over HTTP and over a WebSocket.
    assert_eq!(v["gateway_actor"], id.as_str());
    assert_gateway_worked(&v);

    // What the browser relied on, seen on the wire: the preflight is answered for this origin.
    let (status, headers, _) = http(
        d.addr,
        "OPTIONS",
        "/actors?namespace=default",
        &[
            ("origin", &origin),
            ("access-control-request-method", "PUT"),
            ("access-control-request-headers", "content-type"),
        ],
        b"",
    );
    assert_eq!(status, 204, "{headers:?}");
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some(origin.as_str())
    );
}

#[test]
fn browser_on_a_disallowed_origin_cannot_read_the_api() {
    let Some(chromium) = chromium() else { return };
    let dir = temp_dir("browser-config");
    let config = dir.join("torpor.toml");
    std::fs::write(
        &config,
        "[cors]\nallowed_origins = [\"http://example.invalid\"]\n",
    )
    .unwrap();
    let d = Daemon::start_with(1, &[], &["--config", config.to_str().unwrap()]);
    let _runner = Runner::start(&d.endpoint(), &[]);
    d.wait_metric("torpor_runners_connected", |v| v == 1.0);
    // The gateway calls go to an actor the test created (the page cannot create one).
    let preset = create_actor(
        d.addr,
        "echo",
        Some(&format!("preset-{:x}", common::rand_u64())),
    );
    let key = format!("browser-denied-{:x}", common::rand_u64());
    let started = Instant::now();
    let (v, origin) = run_page(&chromium, &d.endpoint(), &key, &preset);
    eprintln!("browser page done in {:?}: {v}", started.elapsed());

    // Every engine API call failed in the browser: the answers are not readable by this page.
    for step in ["create", "get_or_create", "list"] {
        let err = v[step]["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{step} should have failed in the browser: {v}"));
        assert!(err.starts_with("TypeError"), "{step}: {err}");
    }
    // The JSON POST and PUT were preflighted and refused, so they never reached torpor: the
    // page's actor does not exist.
    let (status, _, body) = http(
        d.addr,
        "GET",
        &format!("/actors?namespace=default&name=echo&key={key}"),
        &[],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        json_body(&body)["actors"],
        serde_json::json!([]),
        "the page created an actor"
    );

    // The gateway stays open to any origin.
    assert_eq!(v["gateway_actor"], preset.as_str());
    assert_gateway_worked(&v);

    // On the wire: this origin gets 403 api.forbidden_origin and no allow-origin header.
    let (status, headers, _) = http(
        d.addr,
        "GET",
        "/actors?namespace=default&name=echo&key=x",
        &[("origin", &origin)],
        b"",
    );
    assert_eq!(status, 403, "{headers:?}");
    assert_eq!(
        header(&headers, "x-rivet-error"),
        Some("api.forbidden_origin")
    );
    assert_eq!(header(&headers, "access-control-allow-origin"), None);
    let _ = std::fs::remove_dir_all(&dir);
}
