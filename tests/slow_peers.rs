//! Hostile and slow peers against the real daemon and echo runner (SPEC §2.7, §2.8): every
//! one is cut off by its limit or deadline, the daemon gives back what it held (file
//! descriptors, memory), and a well-behaved client beside it keeps echoing.
//!
//! Deadlines are configured short to keep the run fast; no assertion depends on timing:
//! each test waits (with a generous bound) for the outcome, then checks it.

mod common;

use common::{create_actor, ws_connect, ws_expect_close, ws_recv, Daemon, Runner, Ws, WAIT};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use torpor::ws::frame::{apply_mask, encode_header, OpCode};
use tungstenite::Message;

/// Open file descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .count()
}

/// Resident set size of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Waits (bounded) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Raises this process's soft RLIMIT_NOFILE towards `want` (child processes inherit it);
/// returns the soft limit in force afterwards.
fn raise_nofile(want: u64) -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_cur < want {
            let mut new = rl;
            new.rlim_cur = want.min(rl.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0 {
                rl = new;
            }
        }
    }
    rl.rlim_cur
}

fn closes(daemon: &Daemon, reason: &str) -> f64 {
    daemon.metric(&format!(
        "torpor_websocket_closes_total{{reason=\"{reason}\"}}"
    ))
}

fn echo_once(ws: &mut Ws, tag: &str) {
    ws.send(Message::text(tag.to_string())).unwrap();
    match ws_recv(ws) {
        Message::Text(t) => assert_eq!(t.as_str(), tag),
        other => panic!("unexpected echo {other:?}"),
    }
}

/// A masked client frame with raw opcode bits.
fn client_frame(fin: bool, op: OpCode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut v = encode_header(fin, op, payload.len() as u64, Some(mask)).to_vec();
    let start = v.len();
    v.extend_from_slice(payload);
    apply_mask(&mut v[start..], mask, 0);
    v
}

/// `total` bytes of UTF-8 text (ASCII, 2- and 4-byte characters) as one message of one-byte
/// fragments: a text frame and `total - 1` continuation frames, so that every multi-byte
/// character is split across frames. Returns (wire bytes, the message).
fn one_byte_fragments(total: usize) -> (Vec<u8>, Vec<u8>) {
    let mut text = String::with_capacity(total);
    while text.len() + 7 <= total {
        text.push_str("aé🦀");
    }
    while text.len() < total {
        text.push('a');
    }
    let payload = text.into_bytes();
    let mut wire = Vec::with_capacity(total * 7);
    for (i, b) in payload.iter().enumerate() {
        let op = if i == 0 {
            OpCode::Text
        } else {
            OpCode::Continuation
        };
        let mask = (i as u32).wrapping_mul(0x9E37_79B9).to_le_bytes();
        wire.extend(client_frame(i + 1 == total, op, &[*b], mask));
    }
    (wire, payload)
}

/// Starts the well-behaved client's echo loop on a thread; stop it with the flag and get the
/// socket back from the join handle.
fn echo_loop(
    mut ws: Ws,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Ws> {
    std::thread::spawn(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            echo_once(&mut ws, &format!("beside {i}"));
            count.fetch_add(1, Ordering::Relaxed);
            i += 1;
        }
        ws
    })
}

/// 2,000 connections send their upgrade request at one byte a second: every one is closed at
/// the handshake deadline, the daemon's descriptors return to their baseline, and a client
/// beside them keeps echoing throughout.
#[test]
fn slowloris_handshakes_are_closed_at_the_deadline() {
    const WANT: usize = 2000;
    // Both this process and the daemon (which inherits the limit) hold one descriptor per
    // connection, plus their own (runtimes, pipes, listeners).
    let limit = raise_nofile(WANT as u64 + 512) as usize;
    let n = if limit >= WANT + 512 {
        WANT
    } else {
        // The hard limit does not allow 2,000 (it cannot be raised without privileges): run
        // with as many as fit rather than not at all.
        let n = limit.saturating_sub(512).max(50);
        eprintln!("RLIMIT_NOFILE {limit}: slowloris scaled down to {n} connections");
        n
    };
    let daemon = Daemon::start(1, &[("TORPOR_TIMEOUTS__HANDSHAKE_MS", "1500")]);
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut good = ws_connect(daemon.addr, &actor, "/beside");
    echo_once(&mut good, "before");
    let pid = daemon.proc.child.id();
    let baseline = fd_count(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicUsize::new(0));
    let beside = echo_loop(good, stop.clone(), echoed.clone());

    let request = format!(
        "GET /gateway/{actor}/slow HTTP/1.1\r\nhost: {}\r\nupgrade: websocket\r\n\
         connection: upgrade\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        daemon.addr
    );
    let request = request.as_bytes();
    let mut socks: Vec<Option<TcpStream>> = (0..n)
        .map(|_| {
            let s = TcpStream::connect(daemon.addr).expect("connect");
            s.set_nonblocking(true).unwrap();
            Some(s)
        })
        .collect();
    let mut sent = 0usize;
    let mut open = n;
    let mut tick = 0u64;
    let deadline = Instant::now() + WAIT;
    while open > 0 {
        assert!(
            Instant::now() < deadline,
            "{open} of {n} slow handshakes still open"
        );
        // One byte a second per socket (the request is far longer than the deadline lets
        // through, so none can complete).
        let write = tick % 10 == 0 && sent < request.len();
        for slot in socks.iter_mut() {
            let Some(s) = slot else { continue };
            let mut b = [0u8; 256];
            let closed = match s.read(&mut b) {
                Ok(0) => true,
                Ok(k) => panic!(
                    "the daemon answered an incomplete request: {:?}",
                    String::from_utf8_lossy(&b[..k])
                ),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    write && s.write(&request[sent..sent + 1]).is_err()
                }
                Err(_) => true,
            };
            if closed {
                *slot = None;
                open -= 1;
            }
        }
        if write {
            sent += 1;
        }
        tick += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        sent < request.len(),
        "closed only after the whole request was sent"
    );
    wait_until("the daemon's descriptors to return to baseline", || {
        fd_count(pid) <= baseline
    });
    stop.store(true, Ordering::Relaxed);
    let mut good = beside.join().expect("the client beside kept echoing");
    echo_once(&mut good, "after");
    assert!(echoed.load(Ordering::Relaxed) > 0);
    eprintln!(
        "slowloris: {n} connections closed; {} echoes beside them",
        echoed.load(Ordering::Relaxed)
    );
}

/// A frame header announcing 16 MiB + 1 bytes, then nothing: 1009 at once, and the daemon
/// does not set aside memory for the frame.
#[test]
fn oversized_frame_header_is_refused_without_allocating() {
    const SOCKETS: usize = 4;
    let daemon = Daemon::start(1, &[]);
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut good = ws_connect(daemon.addr, &actor, "/beside");
    echo_once(&mut good, "warm-up");
    let mut socks: Vec<Ws> = (0..SOCKETS)
        .map(|i| ws_connect(daemon.addr, &actor, &format!("/big{i}")))
        .collect();
    let pid = daemon.proc.child.id();
    let before = rss_kib(pid);
    let header = encode_header(true, OpCode::Binary, (16 << 20) + 1, Some([1, 2, 3, 4]));
    for ws in &mut socks {
        ws.get_mut().write_all(&header).unwrap();
    }
    for ws in &mut socks {
        assert_eq!(ws_expect_close(ws), (1009, "ws.frame_too_big".to_string()));
    }
    let after = rss_kib(pid);
    // One 16 MiB buffer per socket would be 64 MiB; allow 8 MiB of noise in all.
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    assert_eq!(closes(&daemon, "ws.frame_too_big"), SOCKETS as f64);
    echo_once(&mut good, "beside");
}

/// 100,000 one-byte fragments (UTF-8 split across them) make one message that comes back
/// whole, without the daemon's memory growing beyond a small multiple of the message.
#[test]
fn hundred_thousand_one_byte_fragments_echo_whole() {
    let daemon = Daemon::start(1, &[]);
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut ws = ws_connect(daemon.addr, &actor, "/fragments");
    echo_once(&mut ws, "warm-up");
    let pid = daemon.proc.child.id();
    let before = rss_kib(pid);
    let (wire, payload) = one_byte_fragments(100_000);
    ws.get_mut().write_all(&wire).unwrap();
    match ws_recv(&mut ws) {
        Message::Text(t) => assert!(t.as_bytes() == payload.as_slice(), "echo differs"),
        other => panic!("expected the text message back, got {other:?}"),
    }
    let after = rss_kib(pid);
    assert!(
        after < before + 32 * 1024,
        "RSS grew from {before} KiB to {after} KiB for a 100 KB message"
    );
    echo_once(&mut ws, "after");
}

/// With a small message limit, one-byte fragments up to the limit make a message; one more
/// fragment gets 1009 `ws.message_too_big`, and only that socket closes.
#[test]
fn one_byte_fragments_over_the_message_limit_get_1009() {
    let daemon = Daemon::start(
        1,
        &[
            ("TORPOR_LIMITS__WS_MAX_FRAME_BYTES", "1024"),
            ("TORPOR_LIMITS__WS_MAX_MESSAGE_BYTES", "50000"),
        ],
    );
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut good = ws_connect(daemon.addr, &actor, "/beside");

    let mut at_limit = ws_connect(daemon.addr, &actor, "/at-limit");
    let (wire, payload) = one_byte_fragments(50_000);
    at_limit.get_mut().write_all(&wire).unwrap();
    match ws_recv(&mut at_limit) {
        Message::Text(t) => assert!(t.as_bytes() == payload.as_slice(), "echo differs"),
        other => panic!("expected the text message back, got {other:?}"),
    }

    let pid = daemon.proc.child.id();
    let before = rss_kib(pid);
    let mut over = ws_connect(daemon.addr, &actor, "/over");
    let (wire, _) = one_byte_fragments(100_000);
    over.get_mut().write_all(&wire).unwrap();
    assert_eq!(
        ws_expect_close(&mut over),
        (1009, "ws.message_too_big".to_string())
    );
    assert!(rss_kib(pid) < before + 32 * 1024);
    assert_eq!(closes(&daemon, "ws.message_too_big"), 1.0);
    echo_once(&mut good, "beside");
    echo_once(&mut at_limit, "still open");
}

/// A client that never reads while its actor sends to it (here: echoes of what it sends)
/// stops being read once half its outbound limit is queued, and is closed as too slow, its
/// connection reset at once (a close frame behind what it never read would not reach it):
/// when its queue passes the limit, or when it took nothing of it for the idle period.
/// Another client of the same runner keeps echoing, and the daemon's descriptors return to
/// their baseline.
#[test]
fn client_that_never_reads_is_closed_alone() {
    let daemon = Daemon::start(
        1,
        &[
            ("TORPOR_LIMITS__CLIENT_OUTBOUND_BYTES", "1048576"),
            ("TORPOR_TIMEOUTS__CLIENT_IDLE_PING_MS", "1000"),
        ],
    );
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let slow_actor = create_actor(daemon.addr, "echo", None);
    let good_actor = create_actor(daemon.addr, "echo", None);
    let mut good = ws_connect(daemon.addr, &good_actor, "/beside");
    echo_once(&mut good, "before");
    let pid = daemon.proc.child.id();
    let baseline = fd_count(pid);

    let slow = ws_connect(daemon.addr, &slow_actor, "/never-reads");
    slow.get_ref().set_write_timeout(Some(WAIT)).unwrap();
    let flooder = std::thread::spawn(move || -> Result<usize, String> {
        let mut slow = slow;
        let msg = Message::binary(vec![7u8; 64 << 10]);
        let mut sent = 0usize;
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            match slow.send(msg.clone()) {
                Ok(()) => sent += 64 << 10,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    return Err(format!("a write blocked for {WAIT:?} after {sent} bytes"));
                }
                // The daemon dropped the connection.
                Err(_) => return Ok(sent),
            }
        }
        Err(format!("still connected after sending {sent} bytes"))
    });

    let series = "torpor_websocket_closes_total{reason=\"guard.client_too_slow\"}";
    let deadline = Instant::now() + WAIT;
    let mut i = 0;
    while daemon.metric(series) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the slow client was never closed"
        );
        echo_once(&mut good, &format!("during {i}"));
        i += 1;
    }
    let sent = flooder
        .join()
        .unwrap()
        .expect("the slow client's connection ends");
    echo_once(&mut good, "after");
    assert_eq!(daemon.metric(series), 1.0);
    // Reset, not left to the close-handshake deadline.
    assert_eq!(daemon.metric("torpor_websocket_close_timeouts_total"), 0.0);
    daemon.wait_metric("torpor_client_websockets_open", |v| v == 1.0);
    wait_until("the daemon's descriptors to return to baseline", || {
        fd_count(pid) <= baseline
    });
    eprintln!("slow client cut off after sending {sent} bytes; {i} echoes beside it");
}

/// A peer that gets the gateway's close frame but never answers nor closes its end is
/// dropped at the close-handshake deadline.
#[test]
fn peer_that_never_finishes_the_close_handshake_is_dropped() {
    let daemon = Daemon::start(1, &[("TORPOR_TIMEOUTS__CLOSE_HANDSHAKE_MS", "500")]);
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut good = ws_connect(daemon.addr, &actor, "/beside");
    echo_once(&mut good, "before");
    let pid = daemon.proc.child.id();
    let baseline = fd_count(pid);

    let mut bad = ws_connect(daemon.addr, &actor, "/bad");
    // An unmasked client frame: protocol error.
    bad.get_mut().write_all(&[0x82, 0x00]).unwrap();
    // Read the close frame off the raw socket (tungstenite would answer it).
    let mut got = Vec::new();
    let mut b = [0u8; 256];
    let close: &[u8] = b"\x88\x13\x03\xeaws.protocol_error";
    while got.len() < close.len() {
        match bad.get_mut().read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(k) => got.extend_from_slice(&b[..k]),
        }
    }
    assert_eq!(got, close);
    daemon.wait_metric("torpor_websocket_close_timeouts_total", |v| v >= 1.0);
    wait_until("the daemon's descriptors to return to baseline", || {
        fd_count(pid) <= baseline
    });
    assert_eq!(closes(&daemon, "ws.protocol_error"), 1.0);
    echo_once(&mut good, "after");
    drop(bad);
}

/// A client silent for the idle period is pinged; one that answers stays open, one that
/// stays silent is closed with 1011 `guard.client_idle_timeout`.
#[test]
fn silent_clients_are_pinged_then_closed() {
    let daemon = Daemon::start(
        1,
        &[
            ("TORPOR_TIMEOUTS__CLIENT_IDLE_PING_MS", "200"),
            // Generous, so that a loaded machine does not delay the live client's pong
            // past it.
            ("TORPOR_TIMEOUTS__CLIENT_PONG_TIMEOUT_MS", "3000"),
        ],
    );
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut silent = ws_connect(daemon.addr, &actor, "/silent");
    let alive = ws_connect(daemon.addr, &actor, "/alive");
    // The live client only reads (tungstenite answers each ping), with a short timeout so it
    // can be told to stop.
    alive
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut alive = alive;
        let mut pings = 0;
        while !(stop2.load(Ordering::Relaxed) && pings >= 2) {
            match alive.read() {
                Ok(Message::Ping(_)) => pings += 1,
                Ok(m) => panic!("live client got {m:?}"),
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("live client failed: {e}"),
            }
        }
        alive
    });
    let series = "torpor_websocket_closes_total{reason=\"guard.client_idle_timeout\"}";
    daemon.wait_metric(series, |v| v >= 1.0);
    stop.store(true, Ordering::Relaxed);
    let mut alive = reader.join().expect("the live client stayed open");
    alive.get_ref().set_read_timeout(Some(WAIT)).unwrap();
    echo_once(&mut alive, "still open");
    assert_eq!(daemon.metric(series), 1.0);
    assert!(daemon.metric("torpor_client_idle_pings_total") >= 3.0);
    // The silent one: a ping, then the close.
    assert_eq!(
        ws_expect_close(&mut silent),
        (1011, "guard.client_idle_timeout".to_string())
    );
}

/// A client that sends pings and never reads the pongs is closed as too slow: past half the
/// outbound limit it is no longer read, and once it took nothing of its queue for an idle
/// period it is reset. A client beside it keeps echoing. (With the default 30 s idle period
/// the reset could come as late as 60 s, the test's own deadline: hence 2 s here.)
#[test]
fn ping_flood_without_reading_is_closed() {
    let daemon = Daemon::start(
        1,
        &[
            ("TORPOR_LIMITS__CLIENT_OUTBOUND_BYTES", "262144"),
            ("TORPOR_TIMEOUTS__CLOSE_HANDSHAKE_MS", "1000"),
            ("TORPOR_TIMEOUTS__CLIENT_IDLE_PING_MS", "2000"),
        ],
    );
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut good = ws_connect(daemon.addr, &actor, "/beside");
    echo_once(&mut good, "before");
    let mut flood = ws_connect(daemon.addr, &actor, "/pings");
    flood.get_ref().set_write_timeout(Some(WAIT)).unwrap();
    // 64 pings of 125 bytes per write.
    let burst: Vec<u8> = (0..64)
        .flat_map(|i| client_frame(true, OpCode::Ping, &[i as u8; 125], [9, 8, 7, i as u8]))
        .collect();
    let end = Instant::now() + WAIT;
    let mut sent = 0usize;
    loop {
        assert!(
            Instant::now() < end,
            "still connected after {sent} bytes of pings"
        );
        match flood.get_mut().write_all(&burst) {
            Ok(()) => sent += burst.len(),
            Err(e) => {
                assert!(
                    !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                    "a write blocked for {WAIT:?}"
                );
                break;
            }
        }
    }
    assert_eq!(closes(&daemon, "guard.client_too_slow"), 1.0);
    echo_once(&mut good, "after");
    daemon.wait_metric("torpor_client_websockets_open", |v| v == 1.0);
}
