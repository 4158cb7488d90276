//! The drain of one shard's core (`Gateway::begin_drain`), driven with made-up clocks and no
//! sockets: it moves on as soon as what it waits for happened (queued writes out, then the
//! WebSockets' close handshakes), and at its deadlines when the peers never do their part.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use torpor::config::Config;
use torpor::gateway::{ConnId, DrainPhase, Gateway, Output, ShardMsg, WriterTurn};
use torpor::tunnel::TunnelSocket;
use torpor::ws::OpCode;

const DRAIN: Duration = Duration::from_millis(10_000);
const CLOSE: Duration = Duration::from_millis(5_000);

struct Rig {
    gw: Gateway,
    runner: ConnId,
    client: ConnId,
    t0: Instant,
}

fn rig() -> Rig {
    let mut cfg = Config::default();
    cfg.timeouts.drain_ms = DRAIN.as_millis() as u64;
    cfg.timeouts.close_handshake_ms = CLOSE.as_millis() as u64;
    let t0 = Instant::now();
    let (mut gw, _, runner) = common::core::core_with_runner(cfg, t0);
    let socket = TunnelSocket::new(gw.limits());
    let client = gw.insert_client("actor".into(), 0, 1, socket);
    gw.client_opened(client, false, t0);
    gw.client_upgraded(client);
    let mut r = Rig {
        gw,
        runner,
        client,
        t0,
    };
    r.write_all(r.runner);
    r.write_all(r.client);
    r.outputs();
    r
}

impl Rig {
    /// The writer's turns of `id` until nothing is left: the bytes it wrote.
    fn write_all(&mut self, id: ConnId) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut batch = Vec::new();
            match self.gw.writer_turn(id, &mut batch, 64) {
                WriterTurn::Write { bytes } => {
                    batch.iter().for_each(|b| out.extend_from_slice(b));
                    self.gw.written(id, bytes);
                }
                _ => return out,
            }
        }
    }

    fn outputs(&mut self) -> Vec<Output> {
        std::iter::from_fn(|| self.gw.poll_output()).collect()
    }

    fn drained(&mut self) -> bool {
        self.outputs().iter().any(|o| matches!(o, Output::Drained))
    }

    /// What the shell does after every call while the shard drains.
    fn step(&mut self, now: Instant) {
        if self.gw.draining() {
            self.gw.drain_step(now);
        }
    }
}

/// Whether the bytes hold a server close frame with code 1001.
fn close_1001(bytes: &[u8]) -> bool {
    bytes
        .windows(4)
        .any(|w| w[0] == 0x88 && w[2..4] == 1001u16.to_be_bytes())
}

#[test]
fn the_drain_moves_on_when_the_writes_and_close_handshakes_are_done() {
    let mut r = rig();
    let t = r.t0 + Duration::from_millis(10);
    // A message queued to the client and not written yet.
    let frames =
        r.gw.ws_frame(OpCode::Binary, Bytes::from_static(b"last words"));
    r.gw.write_local(r.client, frames);
    r.gw.handle_shard_msg(ShardMsg::Shutdown, t);
    assert_eq!(r.gw.drain_phase(), DrainPhase::Finishing(t + DRAIN));
    assert!(!r.drained());

    // The writer takes the message: nothing left to finish, the WebSockets get 1001.
    let wrote = r.write_all(r.client);
    assert!(wrote.ends_with(b"last words"), "{wrote:?}");
    r.step(t);
    assert!(matches!(r.gw.drain_phase(), DrainPhase::Closing(_)));
    assert!(close_1001(&r.write_all(r.client)), "client told 1001");
    assert!(close_1001(&r.write_all(r.runner)), "runner told 1001");
    assert!(!r.drained());

    // Both peers answered and their connections ended: drained, long before any deadline.
    r.gw.client_ended(r.client, t);
    r.step(t);
    assert!(!r.drained(), "the runner connection is still open");
    r.gw.runner_ended(r.runner);
    r.step(t);
    assert_eq!(r.gw.drain_phase(), DrainPhase::Drained);
    assert!(r.drained());
    assert!(!r.gw.draining());
}

#[test]
fn the_drain_ends_at_its_deadlines_when_peers_never_answer() {
    let mut r = rig();
    let frames =
        r.gw.ws_frame(OpCode::Binary, Bytes::from_static(b"never read"));
    r.gw.write_local(r.client, frames);
    r.gw.handle_shard_msg(ShardMsg::Shutdown, r.t0);
    assert!(r.gw.poll_timeout().unwrap() <= r.t0 + DRAIN);
    // Nothing happens before the drain deadline...
    r.gw.handle_timeout(r.t0 + DRAIN - Duration::from_millis(1));
    assert!(matches!(r.gw.drain_phase(), DrainPhase::Finishing(_)));
    // ...then the WebSockets are closed anyway.
    r.gw.handle_timeout(r.t0 + DRAIN);
    let closing_until = r.t0 + DRAIN + CLOSE + Duration::from_millis(200);
    assert_eq!(r.gw.drain_phase(), DrainPhase::Closing(closing_until));
    assert!(!r.drained());
    // The close handshakes never finish: their deadlines reset the connections, and the
    // drain is over at its own deadline even if a socket's end was never reported.
    r.gw.handle_timeout(closing_until - Duration::from_millis(1));
    assert!(matches!(r.gw.drain_phase(), DrainPhase::Closing(_)));
    r.gw.handle_timeout(closing_until);
    assert_eq!(r.gw.drain_phase(), DrainPhase::Drained);
    assert!(r.drained());
}

#[test]
fn a_second_shutdown_changes_nothing() {
    let mut r = rig();
    r.gw.handle_shard_msg(ShardMsg::Shutdown, r.t0);
    let phase = r.gw.drain_phase();
    r.gw.handle_shard_msg(ShardMsg::Shutdown, r.t0 + Duration::from_secs(1));
    assert_eq!(r.gw.drain_phase(), phase);
}
