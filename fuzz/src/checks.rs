//! Properties the fuzz targets check, shared by the libFuzzer targets (`fuzz/fuzz_targets`)
//! and the stable corpus replay test (`tests/fuzz_corpus.rs`), which include this file by path.
//!
//! Each function takes arbitrary bytes and panics only when torpor breaks a property: a
//! parser panicking on hostile input, two decoders disagreeing, a tunnel socket breaking
//! its invariants, or a gateway core breaking what it promises its shell (`gateway_core.rs`).
//! It must never panic on input that torpor handles correctly.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use torpor::http::parse::{body_kind, parse_request_head, BodyKind, ChunkedDecoder};
use torpor::protocol::{decode_to_server, hot::decode_to_server_hot};
use torpor::tunnel::{Budget, ClientMsg, DetachCause, SocketState, TunnelSocket, WindowLimits};
use torpor::ws::{Role, WsEvent, WsReader, WsReaderConfig};

#[path = "gateway_core.rs"]
mod gateway_core;
#[allow(unused_imports)]
pub use gateway_core::op as gateway_op;

/// Tiny deterministic generator for chunk sizes, seeded from the input.
struct Splitter(u32);

impl Splitter {
    fn next_len(&mut self, max: usize) -> usize {
        self.0 = self.0.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        1 + (self.0 >> 16) as usize % max.max(1)
    }
}

/// Splits `data` into a seed (first two bytes) and the rest.
fn seed_and_rest(data: &[u8]) -> (u32, &[u8]) {
    match data {
        [a, b, rest @ ..] => (u32::from(*a) << 8 | u32::from(*b), rest),
        _ => (0, data),
    }
}

pub const WS_MAX_FRAME: usize = 64;
pub const WS_MAX_MESSAGE: usize = 256;

/// Runs a server-role reader over `chunks`, returning every event and the final error.
fn ws_run<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> (Vec<WsEvent>, Option<u16>) {
    let mut reader = WsReader::new(WsReaderConfig {
        role: Role::Server,
        max_frame: WS_MAX_FRAME,
        max_message: WS_MAX_MESSAGE,
    });
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match reader.next(&mut buf) {
                Ok(Some(ev)) => {
                    match &ev {
                        WsEvent::Message { text, data } => {
                            assert!(data.len() <= WS_MAX_MESSAGE, "message over the limit");
                            if *text {
                                assert!(
                                    std::str::from_utf8(data).is_ok(),
                                    "text message is not UTF-8"
                                );
                            }
                        }
                        WsEvent::Ping(p) | WsEvent::Pong(p) => {
                            assert!(p.len() <= 125, "control payload over 125 bytes")
                        }
                        WsEvent::Close { reason, .. } => {
                            assert!(
                                std::str::from_utf8(reason).is_ok(),
                                "close reason not UTF-8"
                            );
                            assert!(reader.is_closed(), "reader open after a close frame");
                        }
                    }
                    events.push(ev);
                }
                Ok(None) => break,
                Err(close) => return (events, Some(close.code)),
            }
        }
    }
    (events, None)
}

/// WebSocket reader: no panic, limits and UTF-8 hold, and the result does not depend on how
/// the bytes were split into reads.
pub fn ws_reader(data: &[u8]) {
    let (seed, rest) = seed_and_rest(data);
    let mut split = Splitter(seed);
    let max_chunk = (seed as usize % 17) + 1;
    let mut chunks = Vec::new();
    let mut at = 0;
    while at < rest.len() {
        let n = split.next_len(max_chunk).min(rest.len() - at);
        chunks.push(&rest[at..at + n]);
        at += n;
    }
    let split_run = ws_run(chunks.into_iter());
    let whole_run = ws_run(std::iter::once(rest));
    assert_eq!(split_run, whole_run, "result depends on read boundaries");
}

pub const HTTP_MAX_HEAD: usize = 1024;
pub const HTTP_MAX_BODY: u64 = 512;

/// Runs a chunked decoder over `chunks`; returns (result, decoded body, bytes left over).
fn chunked_run<'a>(
    chunks: impl Iterator<Item = &'a [u8]>,
) -> (Result<bool, u16>, Vec<u8>, Vec<u8>) {
    let mut dec = ChunkedDecoder::new(HTTP_MAX_BODY);
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut res = Ok(false);
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        res = dec.decode(&mut buf, &mut out).map_err(|e| e.status());
        assert!(
            dec.body_len() <= HTTP_MAX_BODY,
            "chunked body over the limit"
        );
        // body_len counts a chunk's bytes once its size line is read, before the data.
        assert!(out.len() as u64 <= dec.body_len(), "output past body_len");
        match res {
            Ok(true) => {
                assert!(dec.is_done());
                assert_eq!(
                    dec.body_len(),
                    out.len() as u64,
                    "body_len != body when done"
                );
                break;
            }
            Ok(false) => {}
            Err(_) => break,
        }
    }
    (res, out.to_vec(), buf.to_vec())
}

/// HTTP head parser, body framing and chunked decoder: no panic, bounds hold, and the chunked
/// decoder's result does not depend on read boundaries.
pub fn http_head(data: &[u8]) {
    let (seed, rest) = seed_and_rest(data);
    if let Ok(Some((head, n))) = parse_request_head(rest, HTTP_MAX_HEAD) {
        assert!(
            n <= rest.len().min(HTTP_MAX_HEAD),
            "head length past the input"
        );
        let _ = head.keep_alive();
        route_check(&head);
        if let Ok(kind) = body_kind(&head, HTTP_MAX_BODY) {
            if let BodyKind::Length(len) = kind {
                assert!(
                    len <= HTTP_MAX_BODY,
                    "declared length over the limit accepted"
                );
            }
            if kind == BodyKind::Chunked {
                chunked_check(seed, &rest[n..]);
            }
        }
    }
    // The decoder also gets the raw bytes, so fuzzing reaches it without a valid head.
    chunked_check(seed, rest);
}

/// The router and the upgrade checks on any parsed head: no panic, the actor's path is
/// absolute and never carries an `rvt-*` parameter, and the headers handed to an actor have
/// unique keys and no hop-by-hop entries.
fn route_check(head: &torpor::http::parse::RequestHead) {
    let (path, query) = torpor::http::parse::split_path_query(&head.path);
    let _ = torpor::http::parse::parse_query(query);
    let _ = torpor::ws::handshake::validate_upgrade(head);
    let _ = torpor::ws::handshake::offered_protocols(head).count();
    if let Some(target) = torpor::gateway::route::parse_target(head, path, query) {
        let actor_path = match &target {
            torpor::gateway::route::Target::Actor { path, .. } => path,
            torpor::gateway::route::Target::Named { path, .. } => path,
        };
        assert!(actor_path.starts_with('/'), "actor path {actor_path:?}");
        if let Some((_, q)) = actor_path.split_once('?') {
            assert!(
                q.split('&').all(|kv| !kv.starts_with("rvt-")),
                "rvt-* parameter reached the actor: {actor_path:?}"
            );
        }
    }
    let headers = torpor::gateway::route::request_headers(head, 3);
    let mut keys: Vec<&str> = headers.0.iter().map(|(k, _)| k.as_str()).collect();
    let n = keys.len();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), n, "duplicate header keys for the actor");
    assert!(
        keys.iter()
            .all(|k| !matches!(*k, "connection" | "transfer-encoding" | "upgrade")),
        "hop-by-hop header forwarded"
    );
}

fn chunked_check(seed: u32, body: &[u8]) {
    let mut split = Splitter(seed);
    let max_chunk = (seed as usize % 13) + 1;
    let mut chunks = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let n = split.next_len(max_chunk).min(body.len() - at);
        chunks.push(&body[at..at + n]);
        at += n;
    }
    let split_run = chunked_run(chunks.into_iter());
    let whole_run = chunked_run(std::iter::once(body));
    // With a split, decoding stops at the first chunk that completes the body, so leftover
    // bytes can differ; the outcome and the body cannot.
    assert_eq!(
        split_run.0, whole_run.0,
        "chunked result depends on read boundaries"
    );
    assert_eq!(
        split_run.1, whole_run.1,
        "chunked body depends on read boundaries"
    );
}

/// The strict decoder and the zero-copy hot path agree on every input.
pub fn protocol_to_server(data: &[u8]) {
    let strict = decode_to_server(data);
    let hot = decode_to_server_hot(&Bytes::copy_from_slice(data));
    match (strict, hot) {
        (Err(_), Err(_)) => {}
        (Ok(a), Ok(b)) => assert_eq!(a, b.into_to_server(), "decoders disagree on the value"),
        (a, b) => panic!("decoders disagree: strict {a:?}, hot {b:?}"),
    }
}

pub const TUNNEL_MAX_BYTES: usize = 64;
pub const TUNNEL_MAX_MESSAGES: usize = 4;
pub const TUNNEL_BUDGET: u64 = 160;
pub const TUNNEL_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Checks that `indices` are contiguous and in order.
fn assert_contiguous(indices: &[u16], what: &str) {
    for w in indices.windows(2) {
        assert_eq!(
            w[1],
            w[0].wrapping_add(1),
            "{what} out of order: {indices:?}"
        );
    }
}

/// Tunnel socket driven by a byte-coded event sequence: invariants hold after every step,
/// indices are handed out in order without gaps, and replays are contiguous and in order.
pub fn tunnel_socket(data: &[u8]) {
    static PAYLOAD: [u8; 256] = [0x5a; 256];
    let mut bytes = data.iter().copied();
    let flags = bytes.next().unwrap_or(0);
    let limits = WindowLimits {
        max_bytes: TUNNEL_MAX_BYTES,
        max_messages: TUNNEL_MAX_MESSAGES,
    };
    let mut sock = if flags & 2 != 0 {
        // Start near the 16-bit wrap of the index.
        TunnelSocket::starting_at(limits, 65_536 - 3)
    } else {
        TunnelSocket::new(limits)
    };
    let mut budget = Budget::new(TUNNEL_BUDGET);
    let start = Instant::now();
    let mut now = start;
    let mut expected_index = sock.next_index();
    let check = |sock: &TunnelSocket, budget: &Budget, step: usize| {
        if let Err(e) = sock.check_invariants(budget) {
            panic!("invariant broken after step {step}: {e}");
        }
        assert_eq!(
            budget.used,
            sock.pending_bytes() as u64,
            "budget leak (one socket)"
        );
        let pending: Vec<u16> = sock.pending().map(|e| e.index).collect();
        assert_contiguous(&pending, "pending window");
        if let Some(last) = pending.last() {
            assert_eq!(
                last.wrapping_add(1),
                sock.next_index(),
                "window end != next index"
            );
        }
        if sock.state() == SocketState::Closed {
            assert_eq!(sock.pending_len(), 0, "closed socket holds messages");
        }
    };
    // Records an index handed out by the socket; they must come in order without gaps.
    let take = |msg: &ClientMsg, expected: &mut u16| match msg {
        ClientMsg::Send { index, .. } | ClientMsg::Held { index } => {
            assert_eq!(*index, *expected, "index handed out out of order");
            *expected = expected.wrapping_add(1);
        }
        _ => {}
    };
    if flags & 1 != 0 {
        sock.on_runner_open(flags & 4 != 0);
    }
    check(&sock, &budget, 0);
    let mut step = 0;
    while let Some(op) = bytes.next() {
        step += 1;
        let arg = bytes.next().unwrap_or(0);
        match op % 8 {
            0 | 1 => {
                let n = arg as usize % (TUNNEL_MAX_BYTES + 16);
                let data = Bytes::from_static(&PAYLOAD[..n]);
                let msg = sock.on_client_message(data, op & 8 != 0, now, &mut budget);
                take(&msg, &mut expected_index);
                if let ClientMsg::Close(_) = msg {
                    assert_eq!(sock.state(), SocketState::Closed);
                }
            }
            2 => {
                // Ack relative to the oldest pending index (or the next index).
                let base = sock.pending().next().map_or(sock.next_index(), |e| e.index);
                let index = base.wrapping_add((arg as i8) as i16 as u16);
                let before = sock.pending_len();
                let r = sock.on_ack(index, now, &mut budget);
                assert!(r.freed_messages <= before, "ack freed more than pending");
                if let Some(m) = &r.resumed {
                    take(m, &mut expected_index);
                }
            }
            3 => {
                let cause = match arg % 3 {
                    0 => DetachCause::RunnerLost,
                    1 => DetachCause::ActorStopped,
                    _ => DetachCause::HibernateRequested,
                };
                sock.on_runner_detached(cause, &mut budget);
            }
            4 => {
                let pending: Vec<u16> = sock.pending().map(|e| e.index).collect();
                let replayed: Vec<u16> = sock.on_runner_attached(now).map(|e| e.index).collect();
                assert_contiguous(&replayed, "replay");
                if !replayed.is_empty() {
                    assert_eq!(replayed, pending, "replay is not the pending window");
                    for e in sock.pending() {
                        assert_eq!(e.sent_at, now, "replayed message not marked resent");
                    }
                }
            }
            5 => {
                now += Duration::from_millis(u64::from(arg) * 20);
                let expired = sock.ack_expired(now, TUNNEL_ACK_TIMEOUT);
                let closed = sock.expire_if_not_acked(now, TUNNEL_ACK_TIMEOUT, &mut budget);
                assert_eq!(expired, closed.is_some());
                if closed.is_some() {
                    assert_eq!(sock.state(), SocketState::Closed);
                }
            }
            6 => {
                sock.close(&mut budget);
                assert_eq!(sock.state(), SocketState::Closed);
            }
            _ => {
                let was_opening = sock.state() == SocketState::Opening;
                let opened = sock.on_runner_open(arg & 1 != 0);
                assert_eq!(opened, was_opening, "open accepted outside Opening");
            }
        }
        check(&sock, &budget, step);
    }
}

/// Gateway cores (one or two shards) driven by a byte-coded interleaving of the shell's calls,
/// the runners' and clients' frames, the shards' messages and a forward-only clock: no panic,
/// `check_invariants` after every step, and the shell-facing promises listed in
/// `gateway_core.rs` (outputs, deadlines, wake-ups, wire format, gauges, final liveness).
pub fn gateway_core(data: &[u8]) {
    gateway_core::run(data, true);
}

/// [`gateway_core`] (kept for the regression test of the bug it once tolerated: a client
/// closed during its open exchange, then accepted, kept an engine record forever).
pub fn gateway_core_strict(data: &[u8]) {
    gateway_core::run(data, true);
}
