//! The pending window's limits through the real binaries (SPEC §2.5, §2.8): backpressure under
//! slow acks (no loss, no reordering, caps respected), the ack timeout against a runner that
//! never acks, and the process-wide pending cap.
//!
//! Timeouts are configured short through `TORPOR_*` variables; every wait is a bounded wait
//! for a condition (a frame, a counter), so verdicts never depend on timing.

mod common;

use common::{create_actor, ws_connect, ws_expect_close, ws_recv, Daemon, Rng, Runner, Ws};
use std::net::TcpStream;
use tungstenite::Message;

/// Message `i` of a seeded stream: binary or text, `min..=max` bytes. Both the sending thread
/// and the checking reader regenerate the same sequence from the seed.
fn stream_message(rng: &mut Rng, i: usize, min: usize, max: usize) -> Message {
    let size = min + rng.below((max - min + 1) as u64) as usize;
    if i % 4 == 0 {
        let s: String = (0..size)
            .map(|_| (b'a' + rng.below(26) as u8) as char)
            .collect();
        Message::text(s)
    } else {
        Message::binary(rng.bytes(size))
    }
}

/// A second WebSocket over the same TCP connection, used only to write (client role, masked
/// frames), so that sending never waits for the test to read echoes.
fn writer_half(ws: &Ws) -> Ws {
    let stream: TcpStream = ws.get_ref().try_clone().unwrap();
    tungstenite::WebSocket::from_raw_socket(stream, tungstenite::protocol::Role::Client, None)
}

struct StreamResult {
    largest: usize,
}

/// Streams `n` messages of `min..=max` bytes from a separate thread while this thread checks
/// that every echo arrives identical and in order.
fn stream_and_check(ws: &mut Ws, n: usize, min: usize, max: usize, seed: u64) -> StreamResult {
    let mut writer = writer_half(ws);
    let sender = std::thread::spawn(move || {
        let mut rng = Rng(seed);
        for i in 0..n {
            let m = stream_message(&mut rng, i, min, max);
            writer
                .send(m)
                .unwrap_or_else(|e| panic!("send message {i}: {e}"));
        }
        // Keep the writer alive (dropping it does not close the shared socket anyway).
        writer
    });
    let mut rng = Rng(seed);
    let mut largest = 0;
    for i in 0..n {
        let want = stream_message(&mut rng, i, min, max);
        largest = largest.max(want.len());
        let got = ws_recv(ws);
        assert_eq!(got.is_binary(), want.is_binary(), "message type at {i}");
        assert!(
            got.into_data() == want.into_data(),
            "payload differs at {i}"
        );
    }
    let _writer = sender.join().expect("sender thread");
    StreamResult { largest }
}

fn close_cleanly(mut ws: Ws) {
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
}

/// Runs the slow-ack scenario with the given caps and checks the window's bounds. With
/// `cross_shard`, two shards with per-shard ports: the runner is on shard 0 and the client on
/// shard 1, so every message, echo and ack crosses shards.
fn slow_acks(max_bytes: usize, max_messages: usize, n: usize, seed: u64, cross_shard: bool) {
    let bytes = max_bytes.to_string();
    let msgs = max_messages.to_string();
    let base = free_port_pair().to_string();
    let mut env = vec![
        ("TORPOR_LIMITS__PENDING_BYTES_PER_SOCKET", bytes.as_str()),
        ("TORPOR_LIMITS__PENDING_MESSAGES_PER_SOCKET", msgs.as_str()),
    ];
    if cross_shard {
        env.push(("TORPOR_SHARD_PORT_BASE", base.as_str()));
    }
    let daemon = Daemon::start(if cross_shard { 2 } else { 1 }, &env);
    let (runner_endpoint, client_addr) = if cross_shard {
        let base: u16 = base.parse().unwrap();
        (
            format!("http://127.0.0.1:{base}"),
            format!("127.0.0.1:{}", base + 1).parse().unwrap(),
        )
    } else {
        (daemon.endpoint(), daemon.addr)
    };
    let _runner = Runner::start(&runner_endpoint, &["--ack", "delay-ms=20"]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut ws = ws_connect(client_addr, &actor, "/slow");
    let r = stream_and_check(&mut ws, n, 1024, 8 * 1024, seed);

    let pauses = daemon.metric("torpor_tunnel_backpressure_pauses_total");
    assert!(
        pauses > 0.0,
        "the window never filled: no backpressure pause"
    );
    let max_b = daemon.metric("torpor_tunnel_socket_pending_bytes_max") as usize;
    let max_m = daemon.metric("torpor_tunnel_socket_pending_messages_max") as usize;
    // Every message is smaller than the byte cap, so the admission rule keeps the window
    // within the cap itself (the spec's bound is cap + one message).
    assert!(r.largest < max_bytes);
    assert!(
        max_b <= max_bytes,
        "pending bytes reached {max_b}, cap {max_bytes}"
    );
    assert!(max_b <= max_bytes + r.largest);
    assert!(
        max_m <= max_messages,
        "pending messages reached {max_m}, cap {max_messages}"
    );
    assert!(max_m > 0 && max_b > 0, "the window was never used");
    assert!(daemon.metric("torpor_tunnel_messages_to_runner_total") >= n as f64);
    assert!(daemon.metric("torpor_tunnel_messages_to_client_total") >= n as f64);

    // Every message gets acknowledged in the end: the window drains, nothing stays paused.
    daemon.wait_metric("torpor_tunnel_pending_bytes", |v| v == 0.0);
    daemon.wait_metric("torpor_tunnel_pending_messages", |v| v == 0.0);
    daemon.wait_metric("torpor_client_websockets_paused", |v| v == 0.0);
    assert_eq!(
        daemon
            .metric("torpor_websocket_closes_total{reason=\"guard.websocket_message_not_acked\"}"),
        0.0
    );
    close_cleanly(ws);
}

/// 64 KiB byte cap, messages of 1–8 KiB, runner acking each message 20 ms late.
#[test]
fn slow_acks_byte_cap_backpressure_without_loss() {
    slow_acks(64 * 1024, 32767, 2_000, 0x11a1_0001, false);
}

/// The byte-cap scenario with the runner and the client on different shards.
#[test]
fn slow_acks_byte_cap_across_shards() {
    slow_acks(64 * 1024, 32767, 2_000, 0x11a1_0005, true);
}

/// A message cap of 8 (the byte cap is out of reach).
#[test]
fn slow_acks_message_cap_backpressure_without_loss() {
    slow_acks(1 << 20, 8, 2_000, 0x11a1_0002, false);
}

/// A runner that never acks: once the oldest pending message is older than the ack timeout,
/// the client is closed with 1011 `guard.websocket_message_not_acked`, and counted.
#[test]
fn never_acked_message_closes_the_client() {
    let daemon = Daemon::start(
        1,
        &[
            // Long enough that the second socket's echo below never races the timeout on a
            // loaded machine; the first socket's verdict does not depend on its echo at all.
            ("TORPOR_TIMEOUTS__ACK_TIMEOUT_MS", "3000"),
            ("TORPOR_TIMEOUTS__GC_INTERVAL_MS", "50"),
        ],
    );
    let _runner = Runner::start(&daemon.endpoint(), &["--ack", "none"]);
    let actor = create_actor(daemon.addr, "echo", None);
    let mut ws = ws_connect(daemon.addr, &actor, "/never");
    ws.send(Message::text("hello")).unwrap();
    // The echo may or may not arrive before the close; ws_expect_close skips data frames.
    let (code, reason) = ws_expect_close(&mut ws);
    assert_eq!(
        (code, reason.as_str()),
        (1011, "guard.websocket_message_not_acked")
    );
    let closes = daemon
        .metric("torpor_websocket_closes_total{reason=\"guard.websocket_message_not_acked\"}");
    assert!(closes >= 1.0, "close not counted");
    while ws.read().is_ok() {} // finish the close handshake
                               // The request is freed: nothing pending, no open socket left.
    daemon.wait_metric("torpor_tunnel_pending_bytes", |v| v == 0.0);
    daemon.wait_metric("torpor_tunnel_pending_messages", |v| v == 0.0);
    daemon.wait_metric("torpor_client_websockets_open", |v| v == 0.0);

    // The runner is not blamed for it: a new socket on the same actor echoes again.
    let mut ws2 = ws_connect(daemon.addr, &actor, "/again");
    ws2.send(Message::binary(vec![7u8; 10])).unwrap();
    assert_eq!(ws_recv(&mut ws2), Message::binary(vec![7u8; 10]));
}

/// The process-wide pending cap (100000 bytes, one shard) with a runner that never acks: the
/// client that would exceed it is closed with 1011 `guard.websocket_pending_limit_reached`
/// (counted); its bytes go back to the budget, so a second client on the same runner echoes.
#[test]
fn global_pending_cap_closes_the_offender_only() {
    const CAP: usize = 100_000;
    const SIZE: usize = 8 * 1024;
    let cap = CAP.to_string();
    let daemon = Daemon::start(1, &[("TORPOR_LIMITS__PENDING_BYTES_GLOBAL", cap.as_str())]);
    let _runner = Runner::start(&daemon.endpoint(), &["--ack", "none"]);
    let actor = create_actor(daemon.addr, "echo", None);

    let mut ws = ws_connect(daemon.addr, &actor, "/greedy");
    let admitted = CAP / SIZE; // 12 messages fit, the 13th does not
    let mut rng = Rng(0x11a1_0003);
    let sent: Vec<Vec<u8>> = (0..admitted + 8).map(|_| rng.bytes(SIZE)).collect();
    for m in &sent {
        ws.send(Message::binary(m.clone())).unwrap();
    }
    // Echoes of admitted messages may or may not precede the close; those that come are
    // intact and in order, and none comes for a refused message.
    let mut echoed = 0;
    let (code, reason) = loop {
        match ws.read() {
            Ok(Message::Binary(b)) => {
                assert!(echoed < admitted, "echo of a message over the cap");
                assert!(b[..] == sent[echoed][..], "echo {echoed} differs");
                echoed += 1;
            }
            Ok(Message::Close(Some(f))) => break (u16::from(f.code), f.reason.to_string()),
            Ok(Message::Close(None)) => break (1005, String::new()),
            Ok(_) => continue,
            Err(e) => panic!("expected a close frame, got error {e}"),
        }
    };
    assert_eq!(
        (code, reason.as_str()),
        (1011, "guard.websocket_pending_limit_reached")
    );
    assert!(
        daemon.metric(
            "torpor_websocket_closes_total{reason=\"guard.websocket_pending_limit_reached\"}"
        ) >= 1.0,
        "close not counted"
    );
    while ws.read().is_ok() {}
    daemon.wait_metric("torpor_tunnel_pending_bytes", |v| v == 0.0);

    // A second client on the same runner (and actor) still echoes; its messages stay pending
    // (nobody acks) and are accounted exactly.
    let mut ws2 = ws_connect(daemon.addr, &actor, "/modest");
    let mut rng = Rng(0x11a1_0004);
    for i in 0..5 {
        let m = rng.bytes(SIZE);
        ws2.send(Message::binary(m.clone())).unwrap();
        let got = ws_recv(&mut ws2);
        assert!(
            got.into_data()[..] == m[..],
            "second client echo {i} differs"
        );
    }
    daemon.wait_metric("torpor_tunnel_pending_bytes", |v| v == (5 * SIZE) as f64);
    assert_eq!(
        daemon.metric(
            "torpor_websocket_closes_total{reason=\"guard.websocket_pending_limit_reached\"}"
        ),
        1.0
    );
    close_cleanly(ws2);
}

/// Two consecutive free ports (bound and released; the daemon binds them right after).
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two consecutive free ports");
}
