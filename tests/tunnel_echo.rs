//! Echo through a runner: client → torpor → echo runner → torpor → client, over real
//! loopback sockets with the real binaries. Every message comes back identical and in order,
//! on one shard and across shards.

mod common;

use common::{create_actor, ws_connect, ws_recv, Daemon, Rng, Runner};
use tungstenite::Message;

/// Mixed sizes from 1 B to 1 MiB, mostly small (as real traffic), text and binary.
fn message(rng: &mut Rng, i: usize) -> Message {
    let size = match rng.below(100) {
        0 => 1 << 20,                                        // exactly 1 MiB now and then
        1..=2 => 64 * 1024 + rng.below(960 * 1024) as usize, // large
        3..=12 => 1024 + rng.below(63 * 1024) as usize,      // medium
        _ => 1 + rng.below(1024) as usize,                   // small
    };
    if i % 3 == 0 {
        // Text: printable ASCII plus some multi-byte UTF-8.
        let mut s = String::with_capacity(size);
        while s.len() < size {
            match rng.below(20) {
                0 => s.push('é'),
                1 => s.push('🦀'),
                _ => s.push((b'a' + rng.below(26) as u8) as char),
            }
        }
        Message::text(s)
    } else {
        Message::binary(rng.bytes(size))
    }
}

fn echo_roundtrips(daemon: &Daemon, client_addr: std::net::SocketAddr, n: usize, seed: u64) {
    let actor = create_actor(daemon.addr, "echo", None);
    let mut ws = ws_connect(client_addr, &actor, "/echo");
    let mut rng = Rng(seed);
    // Pipelined: keep up to 16 messages in flight, check echoes in order.
    let mut sent = std::collections::VecDeque::new();
    let mut i = 0;
    while i < n || !sent.is_empty() {
        while i < n && sent.len() < 16 {
            let m = message(&mut rng, i);
            ws.send(m.clone()).unwrap();
            sent.push_back(m);
            i += 1;
        }
        let got = ws_recv(&mut ws);
        let want = sent.pop_front().unwrap();
        assert_eq!(
            got.is_binary(),
            want.is_binary(),
            "message type at {}",
            i - sent.len() - 1
        );
        assert!(
            got.into_data() == want.into_data(),
            "payload differs at {}",
            i - sent.len() - 1
        );
    }
    ws.close(None).unwrap();
    // Finish the close handshake.
    while ws.read().is_ok() {}
}

#[test]
fn echo_10k_mixed_messages_single_shard() {
    let daemon = Daemon::start(1, &[]);
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    echo_roundtrips(&daemon, daemon.addr, 10_000, 0x5eed_0001);
    assert!(daemon.metric("torpor_tunnel_messages_to_runner_total") >= 10_000.0);
    assert!(daemon.metric("torpor_tunnel_messages_to_client_total") >= 10_000.0);
    assert!(daemon.metric("torpor_tunnel_acks_total") > 0.0);
}

/// `--shards 2` with per-shard ports: the runner connects to shard 0's port, the client to
/// shard 1's, so every message crosses shards in both directions (deterministically).
#[test]
fn echo_across_shards() {
    let base = free_port_pair();
    let base_s = base.to_string();
    let daemon = Daemon::start(2, &[("TORPOR_SHARD_PORT_BASE", base_s.as_str())]);
    let shard0 = format!("http://127.0.0.1:{base}");
    let _runner = Runner::start(&shard0, &[]);
    let client_addr: std::net::SocketAddr = format!("127.0.0.1:{}", base + 1).parse().unwrap();
    echo_roundtrips(&daemon, client_addr, 2_000, 0x5eed_0002);
    assert!(daemon.metric("torpor_tunnel_messages_to_client_total") >= 2_000.0);
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
