//! Several torpor nodes (`[cluster] enabled`) on one throwaway PostgreSQL cluster and one
//! throwaway `nats-server`, all on loopback: the real daemon binaries, the real echo runner.
//!
//! The harness (`common::cluster`) shortens the lease timings so that failovers are quick;
//! no verdict depends on them being met in time.

mod common;

use common::cluster::Backends;
use common::{create_actor, ws_connect, ws_recv, Rng, Runner};
use tungstenite::Message;

/// Mixed sizes from 1 B to 256 KiB, mostly small, text and binary.
fn message(rng: &mut Rng, i: usize) -> Message {
    let size = match rng.below(100) {
        0..=1 => 64 * 1024 + rng.below(192 * 1024) as usize,
        2..=11 => 1024 + rng.below(63 * 1024) as usize,
        _ => 1 + rng.below(1024) as usize,
    };
    if i % 3 == 0 {
        let mut s = String::with_capacity(size);
        while s.len() < size {
            match rng.below(20) {
                0 => s.push('é'),
                _ => s.push((b'a' + rng.below(26) as u8) as char),
            }
        }
        Message::text(s)
    } else {
        Message::binary(rng.bytes(size))
    }
}

/// A client on node 1, the runner on node 2, the leader on node 3: 10,000 messages echo in
/// order and byte-identical through the cross-node hop in both directions.
#[test]
fn echo_10k_client_on_one_node_runner_on_another_leader_on_a_third() {
    let backends = Backends::start();
    let [n1, n2, n3] = backends.three_nodes(&[]);
    let _runner = Runner::start(&n2.endpoint(), &[]);
    let actor = create_actor(n1.addr, "echo", None);
    let mut ws = ws_connect(n1.addr, &actor, "/echo");
    let mut rng = Rng(0x5eed_00c1);
    let n = 10_000;
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
        let at = i - sent.len() - 1;
        assert_eq!(got.is_binary(), want.is_binary(), "message type at {at}");
        assert!(
            got.into_data() == want.into_data(),
            "payload differs at {at}"
        );
    }
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    // The traffic crossed nodes: node 1 forwarded to the runner on node 2, which forwarded
    // the echoes back; the leader saw none of it.
    assert!(n1.metric("torpor_tunnel_messages_to_runner_total") >= n as f64);
    assert!(n1.metric("torpor_tunnel_messages_to_client_total") >= n as f64);
    assert_eq!(n3.metric("torpor_tunnel_messages_to_runner_total"), 0.0);
    assert_eq!(n1.metric("torpor_cluster_leading_epoch"), 0.0);
    assert_eq!(n2.metric("torpor_cluster_leading_epoch"), 0.0);
}
