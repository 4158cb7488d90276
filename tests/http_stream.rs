//! HTTP through the tunnel, streamed both ways, against the real daemon and an actor on the
//! Rust runner library (in this process): server-sent events reach the client one by one, a
//! client that stops reading is cut off alone (its bound, counted) while another request on
//! the same runner completes, and 100 MiB go up and down with the daemon's memory bounded.
//!
//! No timing: the actor sends the next event, or the next slice of a download, only when the
//! test asks for it with another request, after it has read what came before.

mod common;

use bytes::Bytes;
use common::{http, Daemon, WAIT};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use torpor::runner::{
    Actor, ActorCx, ActorInfo, HttpRequest, HttpResponse, RequestKey, Runner, RunnerConfig, WsOpen,
    WsOpenReply,
};

/// The download's slice per request of the client (below the 1 MiB bound: the actor sends a
/// slice only once the client has read the one before).
const SLICE: usize = 512 * 1024;
const MIB: usize = 1024 * 1024;

/// What the streaming actor is doing, shared by its generation's callbacks.
#[derive(Default)]
struct State {
    sse: Option<(RequestKey, u32)>,
    download: Option<(RequestKey, usize)>,
    uploads: HashMap<RequestKey, (u64, u64)>,
}

struct Streamer {
    state: Arc<Mutex<State>>,
}

fn event(n: u32) -> Bytes {
    Bytes::from(format!("id: {n}\ndata: event {n}\n\n"))
}

fn slice(offset: usize, len: usize) -> Bytes {
    Bytes::from(
        (offset..offset + len)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

impl Actor for Streamer {
    fn on_websocket_open(&mut self, _cx: &mut ActorCx<'_>, _open: &WsOpen<'_>) -> WsOpenReply {
        WsOpenReply::Accept {
            can_hibernate: false,
        }
    }

    fn on_websocket_message(
        &mut self,
        _cx: &mut ActorCx<'_>,
        _key: RequestKey,
        _index: u16,
        _data: Bytes,
        _binary: bool,
    ) {
    }

    fn on_http_request(&mut self, cx: &mut ActorCx<'_>, req: HttpRequest) -> HttpResponse {
        let mut st = self.state.lock().unwrap();
        let path = req.path.split('?').next().unwrap_or_default().to_string();
        match path.as_str() {
            "/sse" => {
                // The head now, the first event right after it; the rest on demand.
                st.sse = Some((req.key, 1));
                cx.handle().http_chunk(req.key, event(1), false);
                HttpResponse::stream(200).header("content-type", "text/event-stream")
            }
            "/next" => {
                let Some((key, n)) = st.sse.as_mut() else {
                    return HttpResponse::new(409, "no stream");
                };
                *n += 1;
                let last = *n == 3;
                let ok = cx.http_chunk(*key, event(*n), last);
                HttpResponse::new(if ok { 200 } else { 410 }, "")
            }
            "/download" => {
                st.download = Some((req.key, SLICE));
                cx.handle().http_chunk(req.key, slice(0, SLICE), false);
                HttpResponse::stream(200)
                    .header("content-length", (100 * MIB).to_string())
                    .header("content-type", "application/octet-stream")
            }
            "/more" => {
                let Some((key, sent)) = st.download.as_mut() else {
                    return HttpResponse::new(409, "no download");
                };
                let len = SLICE.min(100 * MIB - *sent);
                let ok = cx.http_chunk(*key, slice(*sent, len), *sent + len == 100 * MIB);
                *sent += len;
                HttpResponse::new(if ok { 200 } else { 410 }, "")
            }
            "/flood" => {
                // 64 MiB at once, far more than the gateway holds for a client that does
                // not read (plus what the sockets' buffers take).
                let h = cx.handle();
                for i in 0..1024 {
                    h.http_chunk(req.key, slice(i * 65536, 65536), i == 1023);
                }
                HttpResponse::stream(200)
            }
            _ => HttpResponse::new(200, "plain"),
        }
    }

    fn streams_requests(&self) -> bool {
        true
    }

    fn on_http_stream_start(
        &mut self,
        _cx: &mut ActorCx<'_>,
        req: HttpRequest,
    ) -> Option<HttpResponse> {
        let mut st = self.state.lock().unwrap();
        let e = st.uploads.entry(req.key).or_default();
        add(e, &req.body);
        None
    }

    fn on_http_body(
        &mut self,
        _cx: &mut ActorCx<'_>,
        key: RequestKey,
        data: Bytes,
        finish: bool,
    ) -> Option<HttpResponse> {
        let mut st = self.state.lock().unwrap();
        let e = st.uploads.entry(key).or_default();
        add(e, &data);
        if !finish {
            return None;
        }
        let (n, sum) = st.uploads.remove(&key).unwrap_or_default();
        Some(HttpResponse::new(200, format!("{n} {sum}")))
    }
}

/// Byte count and a position-independent checksum (sum of bytes).
fn add(e: &mut (u64, u64), data: &[u8]) {
    e.0 += data.len() as u64;
    e.1 += data.iter().map(|&b| b as u64).sum::<u64>();
}

/// The daemon, an actor on a runner-library runner in a background runtime, and its id.
struct Rig {
    daemon: Daemon,
    actor: String,
    _rt: tokio::runtime::Runtime,
}

fn rig(env: &[(&str, &str)]) -> Rig {
    let daemon = Daemon::start(2, env);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let endpoint = daemon.endpoint();
    rt.block_on(async {
        let cfg = RunnerConfig::new(endpoint, "default");
        let h = Runner::start(cfg, |_: &ActorInfo| -> Box<dyn Actor> {
            Box::new(Streamer {
                state: Arc::default(),
            })
        })
        .unwrap();
        tokio::time::timeout(WAIT, h.wait_connected())
            .await
            .expect("runner connects")
            .unwrap();
    });
    let actor = daemon.create_actor("streamer", None);
    // The first request wakes the actor; later ones find it running.
    let (status, _, body) = http(
        daemon.addr,
        "GET",
        &format!("/gateway/{actor}/plain"),
        &[],
        b"",
    );
    assert_eq!((status, &body[..]), (200, &b"plain"[..]));
    Rig {
        daemon,
        actor,
        _rt: rt,
    }
}

/// A client connection that sent one request and reads its answer bit by bit.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn get(addr: SocketAddr, path: &str) -> Conn {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        Conn { s, buf: Vec::new() }
    }

    /// Reads until `buf` holds `needle` (panics at EOF).
    fn read_until(&mut self, needle: &[u8]) {
        let mut tmp = [0u8; 65536];
        while !self.buf.windows(needle.len()).any(|w| w == needle) {
            let n = self.s.read(&mut tmp).expect("read");
            assert!(
                n > 0,
                "connection ended before {:?}: {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    /// Reads until `buf` holds `len` bytes (no more).
    fn read_to_len(&mut self, len: usize) {
        let mut tmp = vec![0u8; 256 * 1024];
        while self.buf.len() < len {
            let want = (len - self.buf.len()).min(tmp.len());
            let n = self.s.read(&mut tmp[..want]).expect("read");
            assert!(n > 0, "connection ended at {} of {len}", self.buf.len());
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

/// The daemon's peak resident set size (`VmHWM`), in bytes.
fn hwm(d: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.proc.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

fn head_end(buf: &[u8]) -> usize {
    buf.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4
}

#[test]
fn server_sent_events_arrive_one_by_one_in_order() {
    let r = rig(&[]);
    let mut c = Conn::get(r.daemon.addr, &format!("/gateway/{}/sse", r.actor));
    // The first event arrives while the stream is open (the actor has not sent the second:
    // it waits for `/next`, which is sent only now).
    c.read_until(b"data: event 1\n\n");
    let head = String::from_utf8_lossy(&c.buf[..head_end(&c.buf)]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(!c.buf.windows(14).any(|w| w == b"data: event 2\n"));
    for n in 2..=3 {
        let (status, _, _) = http(
            r.daemon.addr,
            "POST",
            &format!("/gateway/{}/next", r.actor),
            &[],
            b"",
        );
        assert_eq!(status, 200);
        c.read_until(format!("data: event {n}\n\n").as_bytes());
    }
    // The third was the last: the terminating chunk follows.
    c.read_until(b"\r\n0\r\n\r\n");
    let body = decode_chunked(&c.buf[head_end(&c.buf)..]);
    let want: Vec<u8> = (1..=3).flat_map(|n| event(n).to_vec()).collect();
    assert_eq!(body, want, "every event, once, in order");
    assert!(r.daemon.metric("torpor_http_streamed_responses_total") >= 1.0);
}

/// The data of a complete chunked body.
fn decode_chunked(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = b.windows(2).position(|w| w == b"\r\n").expect("size line");
        let size = usize::from_str_radix(std::str::from_utf8(&b[..line]).unwrap(), 16).unwrap();
        b = &b[line + 2..];
        if size == 0 {
            assert_eq!(b, b"\r\n", "nothing after the last chunk");
            return out;
        }
        out.extend_from_slice(&b[..size]);
        assert_eq!(&b[size..size + 2], b"\r\n");
        b = &b[size + 2..];
    }
}

#[test]
fn a_client_that_stops_reading_is_cut_off_alone() {
    let r = rig(&[]);
    let addr = r.daemon.addr;
    // The flood's client reads nothing.
    let mut flood = Conn::get(addr, &format!("/gateway/{}/flood", r.actor));
    // Another request on the same runner completes meanwhile.
    let (status, _, body) = http(
        addr,
        "GET",
        &format!("/gateway/{}/plain", r.actor),
        &[],
        b"",
    );
    assert_eq!((status, &body[..]), (200, &b"plain"[..]));
    r.daemon
        .wait_metric("torpor_http_stream_aborts_total", |v| v >= 1.0);
    let code = "torpor_errors_total{code=\"guard.http_client_too_slow\"}";
    assert!(r.daemon.metric(code) >= 1.0);
    // What reaches the client now is a truncated body: no last chunk, then the end.
    let mut rest = Vec::new();
    let _ = flood.s.read_to_end(&mut rest);
    flood.buf.extend_from_slice(&rest);
    assert!(flood.buf.len() < 64 * MIB, "the whole flood got through");
    assert!(
        !flood.buf.ends_with(b"0\r\n\r\n"),
        "a truncated body ends without the last chunk"
    );
    // The runner is still fine.
    let (status, _, _) = http(
        addr,
        "GET",
        &format!("/gateway/{}/plain", r.actor),
        &[],
        b"",
    );
    assert_eq!(status, 200);
}

#[test]
fn a_hundred_mib_up_and_down_with_bounded_memory() {
    let r = rig(&[]);
    let addr = r.daemon.addr;
    let before = hwm(&r.daemon);

    // Upload: 100 MiB with a content-length, sent as fast as the gateway reads it.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "POST /gateway/{}/upload HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        r.actor,
        100 * MIB
    )
    .unwrap();
    let mut sum = 0u64;
    for i in 0..(100 * MIB / SLICE) {
        let part = slice(i * SLICE, SLICE);
        sum += part.iter().map(|&b| b as u64).sum::<u64>();
        s.write_all(&part).unwrap();
    }
    let (status, _, body) = common::read_response(s);
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        format!("{} {sum}", 100 * MIB)
    );
    assert!(r.daemon.metric("torpor_http_streamed_requests_total") >= 1.0);
    let after_upload = hwm(&r.daemon);

    // Download: 100 MiB, a slice per `/more` once the one before was read.
    let mut c = Conn::get(addr, &format!("/gateway/{}/download", r.actor));
    c.read_until(b"\r\n\r\n");
    let start = head_end(&c.buf);
    let head = String::from_utf8_lossy(&c.buf[..start]).to_ascii_lowercase();
    assert!(
        head.contains(&format!("content-length: {}", 100 * MIB)),
        "{head}"
    );
    let mut got = 0usize;
    let check = |bytes: &[u8], at: usize| {
        for (i, &b) in bytes.iter().enumerate() {
            assert_eq!(b, ((at + i) % 251) as u8, "byte {}", at + i);
        }
    };
    while got < 100 * MIB {
        c.read_to_len(start + SLICE);
        check(&c.buf[start..start + SLICE], got);
        got += SLICE;
        c.buf.truncate(start);
        if got < 100 * MIB {
            let (status, _, _) = http(
                addr,
                "POST",
                &format!("/gateway/{}/more", r.actor),
                &[],
                b"",
            );
            assert_eq!(status, 200);
        }
    }
    let after_download = hwm(&r.daemon);
    let growth = after_download.saturating_sub(before);
    eprintln!("daemon peak RSS: {before} before, {after_upload} after the upload, {after_download} after the download");
    assert!(
        growth < 64 * MIB as u64,
        "daemon peak RSS grew by {growth} bytes (before {before}, after the upload {after_upload}, after the download {after_download})"
    );
    // The connection is still usable: the body was complete.
    write!(
        c.s,
        "GET /gateway/{}/plain HTTP/1.1\r\nhost: x\r\n\r\n",
        r.actor
    )
    .unwrap();
    c.read_until(b"plain");
}

#[test]
fn a_chunked_upload_streams_to_the_actor_piece_by_piece() {
    let r = rig(&[]);
    let mut s = TcpStream::connect(r.daemon.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "POST /gateway/{}/upload HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n",
        r.actor
    )
    .unwrap();
    let (mut n, mut sum) = (0u64, 0u64);
    for i in 0..40 {
        let part = slice(i * 100_003, 100_003);
        n += part.len() as u64;
        sum += part.iter().map(|&b| b as u64).sum::<u64>();
        write!(s, "{:x}\r\n", part.len()).unwrap();
        s.write_all(&part).unwrap();
        s.write_all(b"\r\n").unwrap();
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let (status, _, body) = common::read_response(s);
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8(body).unwrap(), format!("{n} {sum}"));
    assert_eq!(r.daemon.metric("torpor_http_streamed_requests_total"), 1.0);
}

/// Writes a request head announcing `Expect: 100-continue` and reads the first answer's
/// status line: the interim `100 Continue` of an accepted request, or the final answer.
fn expect_continue(addr: SocketAddr, method: &str, path: &str, len: usize) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nexpect: 100-continue\r\ncontent-length: {len}\r\n\r\n"
    )
    .unwrap();
    // Nothing of the body is sent before an answer comes, as curl does.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        assert_eq!(s.read(&mut b).expect("an answer before the body"), 1);
        line.push(b[0]);
    }
    (s, String::from_utf8(line).unwrap())
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let r = rig(&[]);
    let addr = r.daemon.addr;

    // A body streamed to the actor.
    let body = slice(0, 200_000);
    let (mut s, line) = expect_continue(addr, "POST", &format!("/gateway/{}/up", r.actor), 200_000);
    assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
    let mut blank = [0u8; 2];
    s.read_exact(&mut blank).unwrap();
    assert_eq!(&blank, b"\r\n");
    s.write_all(&body).unwrap();
    let (status, _, answer) = common::read_response(s);
    assert_eq!(status, 200);
    let sum: u64 = body.iter().map(|&b| b as u64).sum();
    assert_eq!(String::from_utf8(answer).unwrap(), format!("200000 {sum}"));

    // A small body, buffered before it goes to the actor.
    let (mut s, line) = expect_continue(addr, "POST", &format!("/gateway/{}/x", r.actor), 5);
    assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
    s.read_exact(&mut blank).unwrap();
    s.write_all(b"hello").unwrap();
    let (status, _, answer) = common::read_response(s);
    assert_eq!((status, &answer[..]), (200, &b"plain"[..]));

    // A request refused before its body is read gets the final answer at once, no `100`.
    let (_s, line) = expect_continue(addr, "POST", "/gateway/nosuchactor/x", 5);
    assert!(line.starts_with("HTTP/1.1 404"), "{line}");

    // The engine API answers the expectation too.
    let create = br#"{"name":"streamer","key":"expect","runner_name_selector":"default","crash_policy":"sleep"}"#;
    let (mut s, line) = expect_continue(addr, "POST", "/actors?namespace=default", create.len());
    assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
    s.read_exact(&mut blank).unwrap();
    s.write_all(create).unwrap();
    let (status, _, answer) = common::read_response(s);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
}
