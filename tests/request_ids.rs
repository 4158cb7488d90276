//! Request ids on one shard's core (`Gateway`), without sockets: an id is never issued again
//! to a later socket of the same slot, so a runner's late message for a closed socket (an ack
//! its actor sent after the close) cannot touch the socket that took the slot.

mod common;

use std::collections::HashSet;
use std::time::Instant;

use bytes::Bytes;
use torpor::config::Config;
use torpor::gateway::{ConnId, ConnKind, Gateway, RequestKey, ShardMsg, TunnelIn};
use torpor::metrics::{Counter, Metrics};
use torpor::tunnel::TunnelSocket;

struct Rig {
    gw: Gateway,
    metrics: Metrics,
    t0: Instant,
}

fn rig() -> Rig {
    let t0 = Instant::now();
    let (gw, metrics, _) = common::core::core_with_runner(Config::default(), t0);
    Rig { gw, metrics, t0 }
}

impl Rig {
    /// A hibernatable client socket of `actor`, open, that sent `n` messages.
    fn client(&mut self, n: usize) -> (ConnId, [u8; 4]) {
        let socket = TunnelSocket::new(self.gw.limits());
        let id = self.gw.insert_client("actor".into(), 0, 1, socket);
        self.gw.client_opened(id, true, self.t0);
        for i in 0..n {
            let data = Bytes::from(vec![i as u8; 10]);
            self.gw.client_message(id, data, true, self.t0);
        }
        let req = self.gw.request_id(id).expect("a client has a request id");
        assert_eq!(self.gw.conn_of_request(req), Some(id));
        (id, req)
    }

    fn pending(&self, id: ConnId) -> usize {
        match self.gw.kind(id) {
            Some(ConnKind::Client(cc)) => cc.socket.pending_len(),
            _ => panic!("{id:?} is not a client"),
        }
    }
}

#[test]
fn a_late_ack_for_a_closed_socket_does_not_reach_the_socket_in_its_slot() {
    let mut r = rig();
    let (a, a_req) = r.client(4);
    r.gw.client_ended(a, r.t0);
    assert_eq!(
        r.gw.conn_of_request(a_req),
        None,
        "a freed id routes nowhere"
    );

    let (b, b_req) = r.client(4);
    assert_eq!(b.slot, a.slot, "the slab gives the slot again");
    assert_ne!(b_req, a_req, "but not the request id");
    assert_eq!(r.pending(b), 4);

    // The actor acknowledges what it processed of the closed socket, late.
    let late = r.metrics.counter(Counter::LateTunnelMessages);
    r.gw.handle_shard_msg(
        ShardMsg::Tunnel {
            key: RequestKey::decode(a_req),
            msg: TunnelIn::Ack(4),
            from: Some(0),
        },
        r.t0,
    );
    assert_eq!(r.pending(b), 4, "the new socket keeps its window");
    assert_eq!(r.metrics.counter(Counter::LateTunnelMessages), late + 1);

    // Its own ack still works.
    r.gw.handle_shard_msg(
        ShardMsg::Tunnel {
            key: RequestKey::decode(b_req),
            msg: TunnelIn::Ack(4),
            from: Some(0),
        },
        r.t0,
    );
    assert_eq!(r.pending(b), 0);
    r.gw.verify().unwrap();
}

#[test]
fn a_slot_used_many_times_never_gives_an_id_twice() {
    let mut r = rig();
    let mut seen = HashSet::new();
    let mut live = Vec::new();
    for round in 0..20_000usize {
        let (id, req) = r.client(0);
        assert!(
            seen.insert(req),
            "request id {req:?} issued twice (round {round})"
        );
        live.push(id);
        // Keep between one and 300 sockets open so slots are reused in varied orders.
        if live.len() > 1 + round % 300 {
            let gone = live.swap_remove(round * 7919 % live.len());
            r.gw.client_ended(gone, r.t0);
        }
    }
    r.gw.verify().unwrap();
}
