//! Model-based tests: `PendingWindow` and `TunnelSocket` against a naive model that keeps
//! 64-bit sequence numbers, driven across several wraps of the 16-bit index, with a simulated
//! runner that accepts messages the way a real one does (drop index ≤ last, fail on a gap).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

const TIMEOUT_MS: u64 = 30_000;

/// Shared payload storage: every message is a slice of it (distinct offsets make payloads
/// distinguishable by pointer without allocating per message).
fn big_buffer(max_size: usize) -> Bytes {
    Bytes::from((0..max_size + 4096).map(|i| i as u8).collect::<Vec<u8>>())
}

#[derive(Debug, Clone)]
struct MEntry {
    seq: u64,
    data: Bytes,
    binary: bool,
    sent_ms: u64,
}

/// The naive model of one socket plus its runner.
struct Model {
    hib: bool,
    limits: WindowLimits,
    next_seq: u64,
    pending: VecDeque<MEntry>,
    bytes: usize,
    parked: Option<(Bytes, bool)>,
    attached: bool,
    closed: bool,
    other_used: u64,
    // simulated runner
    runner_last_seq: u64,
    runner_last_index: u16,
    in_flight: VecDeque<(u16, Bytes, bool)>,
    /// (pointer, len, binary) of every message given an index, by sequence number.
    log: Vec<(usize, usize, bool)>,
    log_base: u64,
    // counters
    ignored_future: u64,
    ignored_stale: u64,
    pauses: u64,
    replays: u64,
    max_len_seen: usize,
}

impl Model {
    fn first_seq(&self) -> u64 {
        self.pending.front().map_or(self.next_seq, |e| e.seq)
    }

    fn fits(&self, len: usize) -> bool {
        self.pending.is_empty()
            || (self.pending.len() < self.limits.max_messages
                && self.bytes + len <= self.limits.max_bytes)
    }

    fn record(&mut self, seq: u64, data: &Bytes, binary: bool) {
        assert_eq!(
            seq,
            self.log_base + self.log.len() as u64,
            "sequence gap in log"
        );
        self.log.push((data.as_ptr() as usize, data.len(), binary));
    }

    /// The runner reads one message from its connection.
    fn runner_receive(&mut self, index: u16, data: &Bytes, binary: bool) {
        if !after(index, self.runner_last_index) {
            return; // duplicate (replay of something already processed)
        }
        assert_eq!(
            index,
            self.runner_last_index.wrapping_add(1),
            "gap: runner at {} got {}",
            self.runner_last_index,
            index
        );
        self.runner_last_index = index;
        self.runner_last_seq += 1;
        let k = (self.runner_last_seq - self.log_base) as usize;
        let want = self.log[k];
        assert_eq!(
            (data.as_ptr() as usize, data.len(), binary),
            want,
            "runner got the wrong payload for seq {}",
            self.runner_last_seq
        );
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// The client sends up to `count` messages (the shell stops when paused).
    Send {
        count: u16,
        mode: u8,
        seed: u32,
    },
    /// The runner reads up to `n` in-flight messages.
    Deliver(u16),
    /// The runner acks its last processed message minus `lag` (clamped to the valid range).
    Ack(u16),
    /// An ack for a message never sent, `d` after the last one sent.
    AckFuture(u16),
    /// An ack older than the window, `d` before the last acknowledged one.
    AckStale(u16),
    Detach(u8),
    Attach,
    Tick(u32),
    Gc,
}

struct Harness {
    sock: TunnelSocket,
    budget: Budget,
    m: Model,
    now_ms: u64,
    base: Instant,
    buf: Bytes,
    max_size: usize,
}

fn xorshift(mut s: u64) -> u64 {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    s
}

impl Harness {
    fn new(hib: bool, limits: WindowLimits, start_seq: u64, other_used: u64, cap: u64) -> Self {
        let max_size = limits.max_bytes + limits.max_bytes / 4 + 16;
        let mut sock = TunnelSocket::starting_at(limits, start_seq);
        assert!(sock.on_runner_open(hib));
        let start_seq = start_seq.max(1);
        Harness {
            sock,
            budget: Budget {
                used: other_used,
                cap,
            },
            m: Model {
                hib,
                limits,
                next_seq: start_seq,
                pending: VecDeque::new(),
                bytes: 0,
                parked: None,
                attached: true,
                closed: false,
                other_used,
                runner_last_seq: start_seq - 1,
                runner_last_index: index::index_of(start_seq - 1),
                in_flight: VecDeque::new(),
                log: Vec::new(),
                log_base: start_seq,
                ignored_future: 0,
                ignored_stale: 0,
                pauses: 0,
                replays: 0,
                max_len_seen: 0,
            },
            now_ms: 0,
            base: Instant::now(),
            buf: big_buffer(max_size),
            max_size,
        }
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.now_ms)
    }

    fn size(&self, mode: u8, r: u64) -> usize {
        let cap = self.m.limits.max_bytes;
        let s = match mode % 4 {
            0 => (r % 9) as usize,
            1 => (r % (cap as u64 + cap as u64 / 4 + 1)) as usize,
            2 => (cap + (r % 17) as usize).saturating_sub(8),
            _ => cap / (1 + (r % 8) as usize),
        };
        s.min(self.max_size)
    }

    fn payload(&self, seq: u64, size: usize) -> Bytes {
        let off = (seq.wrapping_mul(7) % 4096) as usize;
        self.buf.slice(off..off + size)
    }

    fn client_message(&mut self, size: usize, binary: bool) -> bool {
        let now = self.now();
        let data = self.payload(self.m.next_seq + self.m.log.len() as u64, size);
        let got = self
            .sock
            .on_client_message(data.clone(), binary, now, &mut self.budget);
        let m = &mut self.m;
        if m.closed {
            assert_eq!(got, ClientMsg::Dropped);
            return false;
        }
        if m.parked.is_some() {
            assert!(matches!(got, ClientMsg::NotReady { .. }), "{got:?}");
            return false;
        }
        if !m.hib {
            let index = index::index_of(m.next_seq);
            let seq = m.next_seq;
            m.record(seq, &data, binary);
            m.next_seq += 1;
            assert_eq!(
                got,
                ClientMsg::Send {
                    index,
                    data: data.clone(),
                    binary
                }
            );
            m.in_flight.push_back((index, data, binary));
            return true;
        }
        if !m.fits(size) {
            assert_eq!(got, ClientMsg::Paused);
            m.parked = Some((data, binary));
            m.pauses += 1;
            return false;
        }
        self.expect_admitted(got, data, binary);
        !self.m.closed
    }

    /// The model's side of admitting a message that fits the window.
    fn expect_admitted(&mut self, got: ClientMsg, data: Bytes, binary: bool) {
        let m = &mut self.m;
        if m.other_used + (m.bytes + data.len()) as u64 > self.budget.cap {
            assert_eq!(got, ClientMsg::Close(CloseReason::PENDING_LIMIT));
            m.closed = true;
            m.pending.clear();
            m.bytes = 0;
            m.parked = None;
            return;
        }
        let seq = m.next_seq;
        let index = index::index_of(seq);
        m.record(seq, &data, binary);
        m.next_seq += 1;
        m.bytes += data.len();
        m.pending.push_back(MEntry {
            seq,
            data: data.clone(),
            binary,
            sent_ms: self.now_ms,
        });
        m.max_len_seen = m.max_len_seen.max(m.pending.len());
        if m.attached {
            match got {
                ClientMsg::Send {
                    index: i,
                    data: d,
                    binary: b,
                } => {
                    assert_eq!((i, b), (index, binary));
                    assert_eq!(d.as_ptr(), data.as_ptr(), "payload copied");
                    m.in_flight.push_back((i, d, b));
                }
                other => panic!("expected Send {index}, got {other:?}"),
            }
        } else {
            assert_eq!(got, ClientMsg::Held { index });
        }
    }

    fn ack_index(&mut self, index: u16) {
        let now = self.now();
        let got = self.sock.on_ack(index, now, &mut self.budget);
        let m = &mut self.m;
        if m.closed || !m.hib {
            assert_eq!(got.ignored, Some(IgnoredAck::NoWindow));
            assert_eq!((got.freed_messages, got.resumed), (0, None));
            return;
        }
        // Model: which u64 sequence in [first - 1, last] carries this index, if any.
        let last = m.next_seq - 1;
        let lo = m.first_seq() - 1;
        let back = u64::from(index::index_of(last).wrapping_sub(index));
        if back > last - lo {
            let why = if after(index, index::index_of(last)) {
                m.ignored_future += 1;
                IgnoredAck::Future
            } else {
                m.ignored_stale += 1;
                IgnoredAck::Stale
            };
            assert_eq!(got.ignored, Some(why), "ack {index} last {last} lo {lo}");
            assert_eq!(got.freed_messages, 0);
        } else {
            let target = last - back;
            let mut n = 0;
            let mut bytes = 0;
            while m.pending.front().is_some_and(|e| e.seq <= target) {
                let e = m.pending.pop_front().unwrap();
                n += 1;
                bytes += e.data.len();
            }
            m.bytes -= bytes;
            assert_eq!(
                (got.freed_messages, got.freed_bytes, got.ignored),
                (n, bytes, None)
            );
        }
        // The parked message, if room freed up.
        match self.m.parked.take() {
            Some((data, binary)) if self.m.fits(data.len()) => {
                let resumed = got.resumed.clone().expect("parked message should resume");
                let closes = matches!(resumed, ClientMsg::Close(_));
                assert_eq!(got.resume_reading, !closes);
                self.expect_admitted(resumed, data, binary);
            }
            parked => {
                assert_eq!((got.resumed, got.resume_reading), (None, false));
                self.m.parked = parked;
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Send { count, mode, seed } => {
                let mut r = u64::from(seed) | 1;
                for _ in 0..count {
                    r = xorshift(r);
                    let size = self.size(mode, r);
                    if !self.client_message(size, r & 0x100 != 0) {
                        break;
                    }
                }
            }
            Op::Deliver(n) => {
                for _ in 0..n {
                    let Some((i, d, b)) = self.m.in_flight.pop_front() else {
                        break;
                    };
                    self.m.runner_receive(i, &d, b);
                }
            }
            Op::Ack(lag) => {
                if self.m.closed || !self.m.hib {
                    let i = self.m.runner_last_index;
                    self.ack_index(i);
                    return;
                }
                // Valid acks name a processed message no older than the last ack.
                let lo = self.m.first_seq() - 1;
                let hi = self.m.runner_last_seq;
                assert!(hi >= lo, "runner processed less than was acked");
                let target = hi - u64::from(lag).min(hi - lo);
                self.ack_index(index::index_of(target));
            }
            Op::AckFuture(d) => {
                let d = d.clamp(1, 32767);
                let last = index::index_of(self.m.next_seq - 1);
                self.ack_index(last.wrapping_add(d));
            }
            Op::AckStale(d) => {
                let len = self.m.pending.len() as u16;
                let d = d.clamp(1, 32768 - len);
                let before = index::index_of(self.m.first_seq() - 1);
                self.ack_index(before.wrapping_sub(d));
            }
            Op::Detach(c) => {
                let cause = match c % 3 {
                    0 => DetachCause::RunnerLost,
                    1 => DetachCause::ActorStopped,
                    _ => DetachCause::HibernateRequested,
                };
                let got = self.sock.on_runner_detached(cause, &mut self.budget);
                let m = &mut self.m;
                // The connection is gone: whatever was in flight is lost.
                m.in_flight.clear();
                if m.closed {
                    assert_eq!(got, Detach::AlreadyClosed);
                } else if m.hib {
                    assert_eq!(got, Detach::Keep);
                    m.attached = false;
                } else {
                    let want = match cause {
                        DetachCause::RunnerLost => CloseReason::RUNNER_DISCONNECTED,
                        DetachCause::ActorStopped => CloseReason::ACTOR_STOPPED,
                        DetachCause::HibernateRequested => CloseReason::CLOSED,
                    };
                    assert_eq!(got, Detach::Close(want));
                    m.closed = true;
                }
            }
            Op::Attach => {
                let now = self.now();
                let replay: Vec<(u16, Bytes, bool)> = self
                    .sock
                    .on_runner_attached(now)
                    .map(|e| (e.index, e.data.clone(), e.binary))
                    .collect();
                let now_ms = self.now_ms;
                let m = &mut self.m;
                if m.closed || !m.hib {
                    assert!(replay.is_empty());
                    return;
                }
                // A replay goes out on a fresh connection: drop the old one's in-flight data.
                m.in_flight.clear();
                m.attached = true;
                m.replays += 1;
                assert_eq!(replay.len(), m.pending.len());
                for (e, (i, d, b)) in m.pending.iter_mut().zip(replay) {
                    assert_eq!(i, index::index_of(e.seq), "replay index");
                    assert_eq!(
                        (d.as_ptr(), d.len(), b),
                        (e.data.as_ptr(), e.data.len(), e.binary)
                    );
                    e.sent_ms = now_ms;
                    m.in_flight.push_back((i, d, b));
                }
            }
            Op::Tick(ms) => self.now_ms += u64::from(ms),
            Op::Gc => {
                let expired = self.model_expired();
                let now = self.now();
                let got = self.sock.expire_if_not_acked(
                    now,
                    Duration::from_millis(TIMEOUT_MS),
                    &mut self.budget,
                );
                if expired {
                    assert_eq!(got, Some(CloseReason::NOT_ACKED));
                    let m = &mut self.m;
                    m.closed = true;
                    m.pending.clear();
                    m.bytes = 0;
                    m.parked = None;
                } else {
                    assert_eq!(got, None);
                }
            }
        }
    }

    fn model_expired(&self) -> bool {
        let m = &self.m;
        !m.closed
            && m.attached
            && m.pending
                .front()
                .is_some_and(|e| self.now_ms - e.sent_ms > TIMEOUT_MS)
    }

    /// Full comparison of the socket with the model (O(window)).
    fn check(&self) {
        let m = &self.m;
        self.sock.check_invariants(&self.budget).unwrap();
        assert_eq!(
            self.budget.used,
            m.other_used + m.bytes as u64,
            "budget drift"
        );
        assert_eq!(self.sock.pending_len(), m.pending.len());
        assert_eq!(self.sock.pending_bytes(), m.bytes);
        assert_eq!(self.sock.is_paused(), m.parked.is_some());
        assert_eq!(self.sock.next_index(), index::index_of(m.next_seq));
        let state = match (m.closed, m.attached) {
            (true, _) => SocketState::Closed,
            (false, true) => SocketState::Open,
            (false, false) => SocketState::Detached,
        };
        assert_eq!(self.sock.state(), state);
        for (e, s) in m.pending.iter().zip(self.sock.pending()) {
            assert_eq!(s.index, index::index_of(e.seq));
            assert_eq!(s.data.as_ptr(), e.data.as_ptr());
            assert_eq!(s.sent_at, self.base + Duration::from_millis(e.sent_ms));
        }
        self.check_light();
    }

    /// O(1) comparison, done after every operation.
    fn check_light(&self) {
        let now = self.now();
        let t = Duration::from_millis(TIMEOUT_MS);
        assert_eq!(self.sock.ack_expired(now, t), self.model_expired());
        assert_eq!(self.sock.pending_len(), self.m.pending.len());
        assert_eq!(self.budget.used, self.m.other_used + self.m.bytes as u64);
        // Everything the runner processed was given an index, in order, exactly once.
        assert!(self.m.runner_last_seq < self.m.next_seq);
    }

    fn run(&mut self, ops: &[Op], full_check_every: usize) {
        for (k, op) in ops.iter().enumerate() {
            self.apply(op);
            if full_check_every != 0 && k % full_check_every == 0 {
                self.check();
            } else {
                self.check_light();
            }
        }
        self.check();
    }

    fn messages(&self) -> u64 {
        self.m.next_seq - self.m.log_base
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u16..400, any::<u8>(), any::<u32>())
            .prop_map(|(count, mode, seed)| Op::Send { count, mode, seed }),
        3 => (0u16..500).prop_map(Op::Deliver),
        3 => prop_oneof![Just(0u16), 0u16..8, 0u16..400, 32760u16..=32767].prop_map(Op::Ack),
        1 => prop_oneof![Just(1u16), 1u16..100, 32700u16..=32767].prop_map(Op::AckFuture),
        1 => prop_oneof![Just(1u16), 1u16..100, 32700u16..=32768].prop_map(Op::AckStale),
        1 => any::<u8>().prop_map(Op::Detach),
        1 => Just(Op::Attach),
        1 => prop_oneof![0u32..1000, 10_000u32..40_000].prop_map(Op::Tick),
        1 => Just(Op::Gc),
    ]
}

fn limits_strategy() -> impl Strategy<Value = WindowLimits> {
    prop_oneof![
        (1usize..5000, 1usize..64).prop_map(|(b, n)| WindowLimits {
            max_bytes: b,
            max_messages: n
        }),
        (0usize..200, 1usize..8).prop_map(|(b, n)| WindowLimits {
            max_bytes: b,
            max_messages: n
        }),
        (1000usize..70_000).prop_map(|b| WindowLimits {
            max_bytes: b,
            max_messages: 32767
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// The socket behaves exactly like the u64 model, starting near (and crossing) wraps.
    #[test]
    fn socket_matches_model(
        hib in prop_oneof![4 => Just(true), 1 => Just(false)],
        limits in limits_strategy(),
        start in prop_oneof![Just(1u64), 65_000u64..65_537, 196_000u64..196_608, 1u64..1_000_000],
        other_used in prop_oneof![Just(0u64), 0u64..100_000],
        headroom in prop_oneof![3 => Just(u64::MAX / 2), 1 => 0u64..20_000],
        ops in prop::collection::vec(op_strategy(), 1..120),
    ) {
        let cap = other_used.saturating_add(headroom);
        let mut h = Harness::new(hib, limits, start, other_used, cap);
        h.run(&ops, 1);
    }

    /// Arbitrary 16-bit acks against a window: classification and freeing follow the model.
    #[test]
    fn window_ack_classification(
        start in prop_oneof![Just(1u64), 65_500u64..65_600, 0u64..1_000_000],
        sizes in prop::collection::vec(0usize..50, 0..200),
        acks in prop::collection::vec(any::<u16>(), 1..50),
    ) {
        let now = Instant::now();
        let mut b = Budget::new(u64::MAX);
        let mut w = PendingWindow::new(WindowLimits::default(), start);
        let mut model: VecDeque<(u64, usize)> = VecDeque::new();
        for (k, &s) in sizes.iter().enumerate() {
            prop_assert_eq!(w.push(Bytes::from(vec![0; s]), true, now, &mut b).unwrap(),
                index::index_of(start + k as u64));
            model.push_back((start + k as u64, s));
        }
        let end = start + sizes.len() as u64;
        for a in acks {
            let lo = model.front().map_or(end, |e| e.0).wrapping_sub(1);
            let last = end.wrapping_sub(1);
            // The one sequence in [lo, last] whose low bits are `a`, if any.
            let hit = (0..=last.wrapping_sub(lo))
                .map(|d| last.wrapping_sub(d))
                .find(|&s| index::index_of(s) == a);
            let got = w.ack(a, &mut b);
            match hit {
                Some(t) => {
                    let mut n = 0;
                    let mut by = 0;
                    while model.front().is_some_and(|e| e.0 <= t) {
                        by += model.pop_front().unwrap().1;
                        n += 1;
                    }
                    prop_assert_eq!(got, WindowAck { freed_messages: n, freed_bytes: by, ignored: None });
                }
                None => {
                    let why = if after(a, index::index_of(last)) { IgnoredAck::Future } else { IgnoredAck::Stale };
                    prop_assert_eq!(got, WindowAck { ignored: Some(why), ..WindowAck::default() });
                }
            }
            prop_assert_eq!(b.used, model.iter().map(|e| e.1 as u64).sum::<u64>());
            w.check_invariants().unwrap();
        }
    }
}

/// A deterministic generator of long operation sequences (xorshift; no wall clock).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = xorshift(self.0);
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// More than three wraps of the index with the message cap binding: windows filled to 32767,
/// acks lagging by up to 32767, detaches and replays, bogus acks, timeouts.
#[test]
fn deterministic_three_wraps_with_full_windows() {
    let limits = WindowLimits {
        max_bytes: 1 << 20,
        max_messages: 32767,
    };
    let mut h = Harness::new(true, limits, 1, 12_345, u64::MAX / 2);
    let mut g = Gen(0x9E37_79B9_7F4A_7C15);
    let mut steps = 0usize;
    while h.messages() < 250_000 {
        let op = match g.below(16) {
            0..=3 => Op::Send {
                count: 1000 + g.below(6000) as u16,
                mode: 0,
                seed: g.next() as u32,
            },
            4..=6 => Op::Deliver(g.below(40_000) as u16),
            7..=9 => Op::Ack(match g.below(5) {
                0 => 0,
                1 => g.below(10) as u16,
                2 => 32767 - g.below(4) as u16,
                3 => (h.m.runner_last_seq - (h.m.first_seq() - 1)).saturating_sub(1) as u16,
                _ => g.below(20_000) as u16,
            }),
            10 => Op::AckFuture(if g.below(2) == 0 {
                32767
            } else {
                1 + g.below(10) as u16
            }),
            11 => Op::AckStale(if g.below(2) == 0 {
                32768
            } else {
                1 + g.below(10) as u16
            }),
            12 => Op::Detach(0),
            13 => Op::Attach,
            14 => Op::Tick(g.below(2000) as u32),
            _ => Op::Gc,
        };
        h.apply(&op);
        h.check_light();
        if steps % 8 == 0 {
            h.check();
        }
        steps += 1;
        assert!(!h.m.closed, "the runner keeps up: nothing should close");
        assert!(steps < 1_000_000, "no progress");
    }
    h.check();
    assert!(h.m.next_seq > 3 * 65536, "three wraps");
    assert_eq!(h.m.max_len_seen, 32767, "window reached the message cap");
    assert!(h.m.pauses > 0 && h.m.replays > 0);
    assert!(h.m.ignored_future > 0 && h.m.ignored_stale > 0);
    // Drain: the runner reads and acks everything; nothing is lost.
    h.apply(&Op::Attach);
    h.apply(&Op::Deliver(u16::MAX));
    h.apply(&Op::Deliver(u16::MAX));
    h.apply(&Op::Ack(0));
    while h.m.parked.is_some() || !h.m.pending.is_empty() {
        h.apply(&Op::Deliver(u16::MAX));
        h.apply(&Op::Ack(0));
    }
    h.check();
    assert_eq!(
        h.m.runner_last_seq,
        h.m.next_seq - 1,
        "runner got every message"
    );
    assert_eq!(h.budget.used, 12_345);
}

/// The byte cap binding instead: sizes near the cap, oversized singles, global cap headroom
/// just large enough, timeouts firing on a stalled runner.
#[test]
fn deterministic_byte_cap_wraps() {
    let limits = WindowLimits {
        max_bytes: 4096,
        max_messages: 32767,
    };
    let mut h = Harness::new(true, limits, 65_000, 0, 4096 + 4096 / 4 + 16);
    let mut g = Gen(0xDEAD_BEEF_CAFE_F00D);
    let mut steps = 0usize;
    while h.messages() < 200_000 {
        let op = match g.below(10) {
            0..=2 => Op::Send {
                count: 1 + g.below(50) as u16,
                mode: 1 + g.below(3) as u8,
                seed: g.next() as u32,
            },
            3..=4 => Op::Deliver(g.below(60) as u16),
            5..=7 => Op::Ack(g.below(4) as u16),
            8 => {
                if g.below(2) == 0 {
                    Op::Detach(0)
                } else {
                    Op::Attach
                }
            }
            _ => Op::Tick(g.below(100) as u32),
        };
        h.apply(&op);
        h.check_light();
        if steps % 4 == 0 {
            h.check();
        }
        steps += 1;
        assert!(!h.m.closed);
        assert!(steps < 5_000_000, "no progress");
    }
    h.check();
    assert!(
        h.m.next_seq > 65_000 + 3 * 65536 - 65_000,
        "crossed three wraps"
    );
    assert!(h.m.pauses > 0);
}

/// A stalled runner is closed by the GC exactly when the oldest message expires.
#[test]
fn deterministic_timeout_only_when_stalled() {
    let mut h = Harness::new(true, WindowLimits::default(), 1, 0, u64::MAX / 2);
    let ops = [
        Op::Send {
            count: 5,
            mode: 0,
            seed: 1,
        },
        Op::Tick(29_999),
        Op::Gc,
        Op::Deliver(5),
        Op::Ack(2),
        Op::Tick(1),
        Op::Gc, // exactly 30 s: still live
        Op::Detach(0),
        Op::Tick(60_000),
        Op::Gc, // detached: never expires
        Op::Attach,
        Op::Tick(30_000),
        Op::Gc, // fresh deadline after the replay
        Op::Tick(1),
        Op::Gc, // now expired
    ];
    h.run(&ops, 1);
    assert!(h.m.closed);
    assert_eq!(h.budget.used, 0);
}
