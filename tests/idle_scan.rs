//! The shard's idle scan of client WebSockets (`Gateway::idle_scan`), driven with made-up
//! clocks: one scan per shard decides which silent client is pinged, which is closed for not
//! answering, and which is reset for not reading. No sockets, no sleeping.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use torpor::config::Config;
use torpor::gateway::{ConnId, Gateway, WriterTurn};
use torpor::metrics::{Counter, Metrics};
use torpor::tunnel::TunnelSocket;
use torpor::ws::OpCode;

const IDLE: Duration = Duration::from_millis(1_000);
const PONG: Duration = Duration::from_millis(400);

struct Rig {
    st: Gateway,
    metrics: Metrics,
    client: ConnId,
    t0: Instant,
}

fn rig(idle_ms: u64) -> Rig {
    let mut cfg = Config::default();
    cfg.timeouts.client_idle_ping_ms = idle_ms;
    cfg.timeouts.client_pong_timeout_ms = PONG.as_millis() as u64;
    cfg.limits.client_outbound_bytes = 1024;
    let t0 = Instant::now();
    let (mut st, metrics, _) = common::core::core_with_runner(cfg, t0);
    let socket = TunnelSocket::new(st.limits());
    let client = st.insert_client("actor".into(), 0, 1, socket);
    st.client_opened(client, false, t0);
    Rig {
        st,
        metrics,
        client,
        t0,
    }
}

impl Rig {
    fn scan(&mut self, after: Duration) {
        self.st.idle_scan(self.t0 + after);
    }

    /// Everything queued to the client so far, as one byte string.
    fn queued(&mut self) -> Vec<u8> {
        let out = self.st.out_queue(self.client).expect("client");
        out.chunks().flat_map(|b| b.iter().copied()).collect()
    }

    fn pings(&self) -> u64 {
        self.metrics.counter(Counter::ClientIdlePings)
    }

    fn read(&mut self) {
        assert!(self.st.client_read(self.client));
    }

    fn closing(&mut self) -> (bool, bool) {
        let out = self.st.out_queue(self.client).expect("client");
        (out.is_closing(), out.is_aborted())
    }

    /// Queues `n` payload bytes to the client that it has not read.
    fn unread(&mut self, n: usize) {
        let frames = self.st.ws_frame(OpCode::Binary, Bytes::from(vec![0u8; n]));
        self.st.write_local(self.client, frames);
    }
}

const PING: [u8; 2] = [0x89, 0x00];

fn has_close(bytes: &[u8], reason: &str) -> bool {
    bytes.first() == Some(&0x88) && bytes.windows(reason.len()).any(|w| w == reason.as_bytes())
}

#[test]
fn a_silent_client_is_pinged_then_closed() {
    let mut r = rig(IDLE.as_millis() as u64);
    r.scan(IDLE - Duration::from_millis(1));
    assert!(r.queued().is_empty(), "nothing before the idle period");
    r.scan(IDLE);
    assert_eq!(r.queued(), PING);
    assert_eq!(r.pings(), 1);
    // Within the pong timeout nothing more happens, however often the scan runs.
    r.scan(IDLE + PONG - Duration::from_millis(1));
    assert_eq!(r.queued(), PING);
    assert_eq!(r.closing(), (false, false));
    r.scan(IDLE + PONG);
    let q = r.queued();
    assert!(has_close(&q[2..], "guard.client_idle_timeout"), "{q:?}");
    assert_eq!(&q[4..6], &1011u16.to_be_bytes(), "close code 1011");
    assert_eq!(r.closing(), (true, false));
    // A closing socket is no longer watched.
    let before = r.queued().len();
    r.scan(IDLE * 10);
    assert_eq!(r.queued().len(), before);
    assert_eq!(r.pings(), 1);
}

#[test]
fn any_bytes_from_the_client_count_as_life() {
    let mut r = rig(IDLE.as_millis() as u64);
    // Reads during the first period: no ping, a new period starts at the scan.
    r.read();
    r.scan(IDLE);
    assert!(r.queued().is_empty());
    r.scan(IDLE * 2);
    assert_eq!(r.queued(), PING, "silent for a whole period since");
    // Answered (any read) before the pong timeout: not closed, and the next ping comes a
    // whole idle period after the scan that saw the answer.
    r.read();
    r.scan(IDLE * 2 + PONG);
    assert_eq!(r.closing(), (false, false));
    r.scan(IDLE * 3 + PONG - Duration::from_millis(1));
    assert_eq!(r.pings(), 1);
    r.scan(IDLE * 3 + PONG);
    assert_eq!(r.pings(), 2);
    assert_eq!(r.queued(), [PING, PING].concat());
}

#[test]
fn a_client_that_takes_nothing_of_its_queue_is_reset() {
    let mut r = rig(IDLE.as_millis() as u64);
    r.unread(600); // more than half of the 1024-byte outbound limit
    r.scan(IDLE);
    assert_eq!(r.closing(), (true, true), "reset, not pinged");
    assert_eq!(r.pings(), 0);
    assert_eq!(r.metrics.closes("guard.client_too_slow"), 1);
}

#[test]
fn a_slow_client_that_makes_progress_stays() {
    let mut r = rig(IDLE.as_millis() as u64);
    r.unread(600);
    // The writer got some of it out during the period.
    r.st.out_queue(r.client).expect("client").written += 100;
    r.scan(IDLE);
    assert_eq!(r.closing(), (false, false));
    // Nothing more during the next period: reset.
    r.scan(IDLE * 2);
    assert_eq!(r.closing(), (true, true));
}

/// The writer took the whole queue into one write that the kernel never completes (the
/// client reads nothing): the client is still behind, so its reader stays paused, and the
/// scan resets it as too slow. Counting only what is still queued, it looked caught up the
/// moment the writer took its batch: nothing woke its paused reader (only the writer's
/// progress does), and the scan pinged it and then closed it as idle, with a close frame
/// stuck behind everything it never read.
#[test]
fn a_client_whose_whole_queue_is_in_a_stuck_write_is_reset() {
    let mut r = rig(IDLE.as_millis() as u64);
    r.unread(600);
    assert!(r.st.client_out_full(r.client), "behind: its reader pauses");
    let mut batch = Vec::new();
    let turn = r.st.writer_turn(r.client, &mut batch, 1024);
    assert!(matches!(turn, WriterTurn::Write { .. }), "{turn:?}");
    assert!(r.queued().is_empty(), "the writer holds it all");
    assert!(
        r.st.client_out_full(r.client),
        "still unread while the write is not done"
    );
    r.scan(IDLE);
    assert_eq!(r.closing(), (true, true), "reset, not pinged");
    assert_eq!(r.pings(), 0);
    assert_eq!(r.metrics.closes("guard.client_too_slow"), 1);
}

/// Once the writer reports the write done, the client is caught up: it is read again and
/// its silence is only idleness.
#[test]
fn a_completed_write_ends_the_pause() {
    let mut r = rig(IDLE.as_millis() as u64);
    r.unread(600);
    let mut batch = Vec::new();
    let WriterTurn::Write { bytes } = r.st.writer_turn(r.client, &mut batch, 1024) else {
        panic!("a write");
    };
    assert!(r.st.client_out_full(r.client));
    batch.clear();
    assert_eq!(
        r.st.writer_next(r.client, bytes, &mut batch, 1024),
        WriterTurn::Idle
    );
    assert!(!r.st.client_out_full(r.client), "caught up");
    r.scan(IDLE);
    assert_eq!(r.closing(), (false, false));
    assert_eq!(r.pings(), 1, "took its queue, then silent: pinged");
}

#[test]
fn off_when_the_idle_timeout_is_zero() {
    let mut r = rig(0);
    assert_eq!(r.st.idle_scan_period(), None);
    r.scan(IDLE * 100);
    assert!(r.queued().is_empty());
}

#[test]
fn the_scan_period_is_a_quarter_of_the_shorter_timeout() {
    let r = rig(IDLE.as_millis() as u64);
    assert_eq!(r.st.idle_scan_period(), Some(PONG / 4));
    // Bounded: never above 1 s (defaults are 30 s) nor below 5 ms.
    let d = rig(30_000);
    assert!(d.st.idle_scan_period().unwrap() <= Duration::from_secs(1));
    let tiny = rig(4);
    assert_eq!(tiny.st.idle_scan_period(), Some(Duration::from_millis(5)));
}
