//! Reliable, ordered delivery of messages from one node to another over a bus that may lose,
//! duplicate and reorder them. Core NATS keeps each publisher's order but loses messages
//! when a connection drops or a subscriber falls behind; the simulation's bus also reorders
//! and duplicates. The control events between nodes (a runner attached on node B, an actor
//! stopped, the leader's commands for B's runners) must arrive exactly once and in order, so
//! they go through a [`LinkTx`] on the sending node and a [`LinkRx`] on the receiving one.
//!
//! Sans-IO. The sender numbers each message (`seq`, from 0 in a *session*: a random id the
//! sender picks at start, so a restarted sender is never mistaken for the old one); the
//! receiver delivers messages in `seq` order, holds a bounded number that came early, drops
//! duplicates (and every frame of a session until its message 0 came, and of the sessions it
//! replaced), and acknowledges cumulatively (`Ack { upto }`: every `seq < upto` arrived).
//! The sender keeps what is not acknowledged and sends it again, oldest first, when no
//! acknowledgement came for `resend_after`; a [`Frame::Tail`] sent with each resend tells a
//! receiver that missed the last messages how far the sender got, so it asks again.
//!
//! Bounds: the sender keeps at most `max_unacked` messages; past that [`LinkTx::send`]
//! refuses (the caller treats the peer as unreachable: a node that acknowledges nothing for
//! that long is lost). The receiver holds at most `max_early` messages that came ahead of a
//! gap; later ones are dropped and come again with the resend.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// What goes on the bus between the two ends of one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<T> {
    /// Message `seq` of the sender's `session`.
    Data { session: u64, seq: u64, msg: T },
    /// From the receiver: every message of `session` before `upto` arrived.
    Ack { session: u64, upto: u64 },
    /// From the sender: it has sent every message of `session` before `next`.
    Tail { session: u64, next: u64 },
}

/// Limits and timing of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// Most messages kept unacknowledged by the sender.
    pub max_unacked: usize,
    /// Most messages held by the receiver ahead of a gap.
    pub max_early: usize,
    /// Time without progress after which unacknowledged messages are sent again.
    pub resend_after: Duration,
    /// Most messages sent again per resend (the rest follow at the next).
    pub resend_batch: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            max_unacked: 65_536,
            max_early: 1_024,
            resend_after: Duration::from_millis(200),
            resend_batch: 256,
        }
    }
}

/// [`LinkTx::send`] refused: `max_unacked` messages wait for an acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFull;

/// The sending end of a link.
#[derive(Debug)]
pub struct LinkTx<T> {
    cfg: LinkConfig,
    session: u64,
    next: u64,
    /// `(seq, msg)` not yet acknowledged, in order; the first has seq `acked`.
    unacked: VecDeque<T>,
    acked: u64,
    /// When the oldest unacknowledged message is due to be sent again.
    resend_at: Option<Instant>,
}

impl<T: Clone> LinkTx<T> {
    /// A sender for a new session (`session`: random, different at every start).
    pub fn new(cfg: LinkConfig, session: u64) -> Self {
        LinkTx {
            cfg,
            session,
            next: 0,
            unacked: VecDeque::new(),
            acked: 0,
            resend_at: None,
        }
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    /// How many messages this session has sent: a message sent after them carries this
    /// number to say which control messages must be delivered before it (see [`TunGate`]).
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// Messages sent and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// Numbers `msg` and returns the frame to publish, or refuses when the window is full.
    pub fn send(&mut self, msg: T, now: Instant) -> Result<Frame<T>, LinkFull> {
        if self.unacked.len() >= self.cfg.max_unacked {
            return Err(LinkFull);
        }
        let seq = self.next;
        self.next += 1;
        self.unacked.push_back(msg.clone());
        self.resend_at.get_or_insert(now + self.cfg.resend_after);
        Ok(Frame::Data {
            session: self.session,
            seq,
            msg,
        })
    }

    /// An acknowledgement from the receiver. Frames of other sessions (an older run of this
    /// node) are ignored; an ack past what was sent is ignored too (a confused peer).
    pub fn on_ack(&mut self, session: u64, upto: u64, now: Instant) {
        if session != self.session || upto <= self.acked || upto > self.next {
            return;
        }
        let n = (upto - self.acked) as usize;
        self.unacked.drain(..n);
        self.acked = upto;
        // Progress: the next resend is a full interval away.
        self.resend_at = (!self.unacked.is_empty()).then(|| now + self.cfg.resend_after);
    }

    /// When [`poll`](Self::poll) has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        self.resend_at
    }

    /// Frames to send again once `resend_after` passed without progress: the oldest
    /// unacknowledged messages (up to `resend_batch`), then a [`Frame::Tail`].
    pub fn poll(&mut self, now: Instant) -> Vec<Frame<T>> {
        match self.resend_at {
            Some(t) if t <= now => {}
            _ => return Vec::new(),
        }
        self.resend_at = Some(now + self.cfg.resend_after);
        let mut out: Vec<Frame<T>> = self
            .unacked
            .iter()
            .take(self.cfg.resend_batch)
            .enumerate()
            .map(|(i, msg)| Frame::Data {
                session: self.session,
                seq: self.acked + i as u64,
                msg: msg.clone(),
            })
            .collect();
        out.push(Frame::Tail {
            session: self.session,
            next: self.next,
        });
        out
    }
}

/// What [`LinkRx::on_frame`] produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Received<T> {
    /// Messages now delivered, in order.
    pub delivered: Vec<T>,
    /// The acknowledgement to send back, if any.
    pub ack: Option<Frame<T>>,
    /// The sender started a new session (it restarted): what the old one sent and was not
    /// delivered is gone, and the caller must treat the peer as new.
    pub new_session: bool,
}

/// The receiving end of a link.
#[derive(Debug)]
pub struct LinkRx<T> {
    cfg: LinkConfig,
    session: Option<u64>,
    /// Every message before `next` was delivered.
    next: u64,
    early: BTreeMap<u64, T>,
    /// Sessions replaced by a newer one (the last [`RETIRED`]): their late frames are
    /// ignored.
    retired: VecDeque<u64>,
}

/// Replaced sessions a receiver remembers.
const RETIRED: usize = 16;

impl<T> LinkRx<T> {
    pub fn new(cfg: LinkConfig) -> Self {
        LinkRx {
            cfg,
            session: None,
            next: 0,
            early: BTreeMap::new(),
            retired: VecDeque::new(),
        }
    }

    /// Messages held ahead of a gap.
    pub fn early(&self) -> usize {
        self.early.len()
    }

    /// The session being received and how many of its messages were delivered (`None`
    /// before the first session started).
    pub fn position(&self) -> Option<(u64, u64)> {
        self.session.map(|s| (s, self.next))
    }

    /// `session` was replaced by a newer one: nothing of it is delivered any more.
    pub fn is_retired(&self, session: u64) -> bool {
        self.retired.contains(&session)
    }

    /// A data or tail frame from the sender (acks are for the sender's end: ignored here).
    pub fn on_frame(&mut self, frame: Frame<T>) -> Received<T> {
        let mut out = Received {
            delivered: Vec::new(),
            ack: None,
            new_session: false,
        };
        let (session, seq, msg) = match frame {
            Frame::Data { session, seq, msg } => (session, seq, Some(msg)),
            Frame::Tail { session, next } => (session, next, None),
            Frame::Ack { .. } => return out,
        };
        if self.session != Some(session) {
            // A sender that started anew numbers from 0: only its message 0 starts the new
            // session (it is sent again until acknowledged). A late frame of a session
            // already replaced must not bring that one back.
            if seq != 0 || msg.is_none() || self.retired.contains(&session) {
                return out;
            }
            if let Some(old) = self.session.replace(session) {
                out.new_session = true;
                if self.retired.len() == RETIRED {
                    self.retired.pop_front();
                }
                self.retired.push_back(old);
            }
            self.next = 0;
            self.early.clear();
        }
        match msg {
            Some(msg) if seq == self.next => {
                out.delivered.push(msg);
                self.next += 1;
                while let Some(m) = self.early.remove(&self.next) {
                    out.delivered.push(m);
                    self.next += 1;
                }
            }
            Some(msg)
                if seq > self.next
                    && (self.early.len() < self.cfg.max_early || self.early.contains_key(&seq)) =>
            {
                self.early.insert(seq, msg);
            }
            // A duplicate, one past the early bound, or a tail: answer with where this end is, so that a lost ack or
            // lost last messages are repaired.
            _ => {}
        }
        out.ack = Some(Frame::Ack {
            session,
            upto: self.next,
        });
        out
    }
}

/// Keeps the unreliable messages of a peer behind the reliable ones sent before them.
///
/// Tunnel messages travel outside the link (at most once, no resend), but some must not
/// arrive before a control message the same sender sent earlier: a runner's first message
/// on a WebSocket must not reach the client's node before the socket's `Open` did. Each
/// such message carries the sender's link session and [`LinkTx::next_seq`] at the moment it
/// was sent (`after`); the receiver delivers it once its [`LinkRx`] has delivered `after`
/// messages of that session, holds it until then (bounded: `max_msgs` and `max_bytes`,
/// past which it is dropped, as the bus may drop it anyway), and drops it when the session
/// was replaced (the sender restarted: what it sent before is void). Over a bus that keeps
/// each publisher's order (core NATS) nothing is held unless a control frame was lost and
/// waits for its resend.
#[derive(Debug)]
pub struct TunGate<T> {
    held: VecDeque<(u64, u64, T)>,
    held_bytes: usize,
    max_msgs: usize,
    max_bytes: usize,
    /// Messages dropped: over the bounds, or of a replaced session.
    pub dropped: u64,
}

impl<T: AsRef<[u8]>> TunGate<T> {
    pub fn new(max_msgs: usize, max_bytes: usize) -> Self {
        TunGate {
            held: VecDeque::new(),
            held_bytes: 0,
            max_msgs,
            max_bytes,
            dropped: 0,
        }
    }

    /// Messages held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn ready<U>(rx: &LinkRx<U>, session: u64, after: u64) -> Option<bool> {
        if after == 0 {
            return Some(true);
        }
        if rx.is_retired(session) {
            return None;
        }
        Some(
            rx.position()
                .is_some_and(|(s, next)| s == session && next >= after),
        )
    }

    /// A message sent after the first `after` control messages of `session`: returned when
    /// it can be delivered now, else held (or dropped).
    pub fn offer<U>(&mut self, rx: &LinkRx<U>, session: u64, after: u64, msg: T) -> Option<T> {
        match Self::ready(rx, session, after) {
            Some(true) if self.held.is_empty() => Some(msg),
            None => {
                self.dropped += 1;
                None
            }
            _ => {
                let len = msg.as_ref().len();
                if self.held.len() >= self.max_msgs
                    || self.held_bytes.saturating_add(len) > self.max_bytes
                {
                    self.dropped += 1;
                } else {
                    self.held_bytes += len;
                    self.held.push_back((session, after, msg));
                }
                None
            }
        }
    }

    /// Held messages that can be delivered now (call after the receiver took control
    /// frames), in the order they came; messages of replaced sessions are dropped.
    pub fn release<U>(&mut self, rx: &LinkRx<U>) -> Vec<T> {
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.held.len());
        for (session, after, msg) in self.held.drain(..) {
            match Self::ready(rx, session, after) {
                // Once one waits, the later ones wait too: they stay in arrival order.
                Some(true) if keep.is_empty() => {
                    self.held_bytes -= msg.as_ref().len();
                    out.push(msg);
                }
                None => {
                    self.held_bytes -= msg.as_ref().len();
                    self.dropped += 1;
                }
                _ => keep.push_back((session, after, msg)),
            }
        }
        self.held = keep;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn cfg() -> LinkConfig {
        LinkConfig {
            max_unacked: 64,
            max_early: 8,
            resend_after: Duration::from_millis(100),
            resend_batch: 16,
        }
    }

    fn acks<T>(r: &Received<T>) -> (u64, u64) {
        match r.ack {
            Some(Frame::Ack { session, upto }) => (session, upto),
            _ => panic!("no ack"),
        }
    }

    #[test]
    fn in_order_delivery_and_cumulative_acks() {
        let t = Instant::now();
        let mut tx = LinkTx::new(cfg(), 7);
        let mut rx = LinkRx::new(cfg());
        let f0 = tx.send("a", t).unwrap();
        let f1 = tx.send("b", t).unwrap();
        let f2 = tx.send("c", t).unwrap();
        let f3 = tx.send("d", t).unwrap();
        let r = rx.on_frame(f0);
        assert_eq!(r.delivered, vec!["a"]);
        assert_eq!(acks(&r), (7, 1));
        // Reordered: 3 and 2 are held, 1 releases all.
        assert!(rx.on_frame(f3).delivered.is_empty());
        assert!(rx.on_frame(f2.clone()).delivered.is_empty());
        assert_eq!(rx.early(), 2);
        let r = rx.on_frame(f1);
        assert_eq!(r.delivered, vec!["b", "c", "d"]);
        assert_eq!(acks(&r), (7, 4));
        // A duplicate delivers nothing and acks again.
        let r = rx.on_frame(f2);
        assert!(r.delivered.is_empty());
        assert_eq!(acks(&r), (7, 4));
        tx.on_ack(7, 4, t);
        assert_eq!(tx.unacked(), 0);
        assert_eq!(tx.deadline(), None);
    }

    #[test]
    fn lost_messages_and_acks_are_sent_again() {
        let t = Instant::now();
        let mut tx = LinkTx::new(cfg(), 1);
        let mut rx = LinkRx::new(cfg());
        let _lost = tx.send(1, t).unwrap();
        let f = tx.send(2, t).unwrap();
        assert!(rx.on_frame(f).delivered.is_empty(), "held behind the gap");
        assert!(tx.poll(t + Duration::from_millis(99)).is_empty());
        let again = tx.poll(t + Duration::from_millis(100));
        assert_eq!(again.len(), 3, "both messages and a tail");
        let mut got = Vec::new();
        for f in again {
            got.extend(rx.on_frame(f).delivered);
        }
        assert_eq!(got, vec![1, 2]);
        // The acks are lost; the next resend brings a tail that gets one again.
        let again = tx.poll(t + Duration::from_millis(200));
        let r: Vec<_> = again.into_iter().map(|f| rx.on_frame(f)).collect();
        assert!(r.iter().all(|r| r.delivered.is_empty()));
        let (s, upto) = acks(r.last().unwrap());
        tx.on_ack(s, upto, t + Duration::from_millis(201));
        assert_eq!(tx.unacked(), 0);
    }

    #[test]
    fn a_restarted_sender_starts_a_new_session() {
        let t = Instant::now();
        let mut rx = LinkRx::new(cfg());
        let mut old = LinkTx::new(cfg(), 1);
        let f0 = old.send("old0", t).unwrap();
        let f1 = old.send("old1", t).unwrap();
        assert_eq!(rx.on_frame(f0).delivered, vec!["old0"]);
        let mut new = LinkTx::new(cfg(), 2);
        let n1 = {
            let _ = new.send("new0", t).unwrap();
            new.send("new1", t).unwrap()
        };
        // Not seq 0: cannot start the session; the old one goes on.
        assert!(rx.on_frame(n1).delivered.is_empty());
        let n0 = new.poll(t + Duration::from_secs(1)).remove(0);
        let r = rx.on_frame(n0);
        assert!(r.new_session);
        assert_eq!(r.delivered, vec!["new0"]);
        // Late frames of the old session are ignored, its message 0 too.
        assert!(rx.on_frame(f1).delivered.is_empty());
        let r = rx.on_frame(Frame::Data {
            session: 1,
            seq: 0,
            msg: "old0",
        });
        assert!(r.delivered.is_empty() && !r.new_session);
        let n2 = new.send("new2", t).unwrap();
        let n1 = new.poll(t + Duration::from_secs(2)).remove(1);
        assert_eq!(rx.on_frame(n1).delivered, vec!["new1"]);
        assert_eq!(rx.on_frame(n2).delivered, vec!["new2"]);
        // An ack of another session leaves the sender alone.
        new.on_ack(1, 2, t);
        assert_eq!(new.unacked(), 3);
    }

    #[test]
    fn the_sender_refuses_past_its_window() {
        let t = Instant::now();
        let mut tx = LinkTx::new(cfg(), 1);
        for i in 0..64 {
            tx.send(i, t).unwrap();
        }
        assert_eq!(tx.send(64, t), Err(LinkFull));
        tx.on_ack(1, 10, t);
        assert!(tx.send(64, t).is_ok());
        // An ack past what was sent is ignored.
        tx.on_ack(1, 1_000, t);
        assert_eq!(tx.unacked(), 55);
    }

    #[test]
    fn the_receiver_holds_a_bounded_number_of_early_messages() {
        let t = Instant::now();
        let mut tx = LinkTx::new(cfg(), 1);
        let mut rx = LinkRx::new(cfg());
        let f0 = tx.send(0, t).unwrap();
        let _lost = tx.send(1, t).unwrap();
        for i in 2..40 {
            let f = tx.send(i, t).unwrap();
            rx.on_frame(f);
        }
        assert_eq!(rx.early(), 0, "no session before its message 0");
        let mut got = rx.on_frame(f0).delivered;
        for i in 2..40 {
            rx.on_frame(Frame::Data {
                session: 1,
                seq: i,
                msg: i as usize,
            });
        }
        assert_eq!(rx.early(), 8);
        // The resends fill the gap; everything arrives in order in the end.
        let mut now = t;
        while got.len() < 40 {
            now += Duration::from_millis(100);
            for f in tx.poll(now) {
                let r = rx.on_frame(f);
                got.extend(r.delivered);
                if let Some(Frame::Ack { session, upto }) = r.ack {
                    tx.on_ack(session, upto, now);
                }
            }
        }
        assert_eq!(got, (0..40).collect::<Vec<_>>());
    }

    proptest! {
        /// Over a bus that loses, duplicates and reorders both ways, every message arrives
        /// exactly once and in order once the bus heals; the sender's window then empties.
        #[test]
        fn exactly_once_in_order_over_a_bad_bus(seed in any::<u64>(), n in 1usize..200) {
            let mut rng = StdRng::seed_from_u64(seed);
            let t0 = Instant::now();
            let mut tx = LinkTx::new(cfg(), seed | 1);
            let mut rx = LinkRx::new(cfg());
            let mut to_rx: Vec<Frame<usize>> = Vec::new();
            let mut to_tx: Vec<Frame<usize>> = Vec::new();
            let mut got = Vec::new();
            let mut sent = 0;
            let mut step = 0u64;
            while (got.len() < n || tx.unacked() > 0) && step < 20_000 {
                step += 1;
                let now = t0 + Duration::from_millis(step * 10);
                let healed = step > 2_000;
                let lossy = |rng: &mut StdRng| !healed && rng.random_bool(0.3);
                if sent < n {
                    if let Ok(f) = tx.send(sent, now) {
                        sent += 1;
                        if !lossy(&mut rng) {
                            to_rx.push(f);
                        }
                    }
                }
                to_rx.extend(tx.poll(now).into_iter().filter(|_| !lossy(&mut rng)));
                // Deliver a random subset, in random order, sometimes twice.
                let k = rng.random_range(0..=to_rx.len());
                for _ in 0..k {
                    let i = rng.random_range(0..to_rx.len());
                    let f = if !healed && rng.random_bool(0.1) {
                        to_rx[i].clone()
                    } else {
                        to_rx.swap_remove(i)
                    };
                    let r = rx.on_frame(f);
                    prop_assert!(!r.new_session);
                    got.extend(r.delivered);
                    if let Some(a) = r.ack {
                        if !lossy(&mut rng) {
                            to_tx.push(a);
                        }
                    }
                }
                while let Some(a) = to_tx.pop() {
                    if let Frame::Ack { session, upto } = a {
                        tx.on_ack(session, upto, now);
                    }
                }
            }
            prop_assert_eq!(got, (0..n).collect::<Vec<_>>());
            prop_assert_eq!(tx.unacked(), 0);
        }
    }

    #[test]
    fn tunnel_messages_wait_for_the_control_messages_sent_before_them() {
        let t = Instant::now();
        let mut tx: LinkTx<&str> = LinkTx::new(cfg(), 5);
        let mut rx: LinkRx<&str> = LinkRx::new(cfg());
        let mut gate: TunGate<&str> = TunGate::new(4, 1 << 20);
        // Nothing sent on the link yet: a tunnel message goes through.
        assert_eq!(
            gate.offer(&rx, tx.session(), tx.next_seq(), "t0"),
            Some("t0")
        );
        let open = tx.send("open", t).unwrap();
        let after = tx.next_seq();
        // The tunnel message overtakes the control message: held, and so is a later one.
        assert_eq!(gate.offer(&rx, 5, after, "t1"), None);
        assert_eq!(gate.offer(&rx, 5, after, "t2"), None);
        assert_eq!(gate.held(), 2);
        assert!(gate.release(&rx).is_empty());
        assert_eq!(rx.on_frame(open).delivered, vec!["open"]);
        assert_eq!(gate.release(&rx), vec!["t1", "t2"]);
        assert_eq!(gate.held(), 0);
        // Caught up: straight through.
        assert_eq!(gate.offer(&rx, 5, after, "t3"), Some("t3"));
        assert_eq!(gate.dropped, 0);
    }

    #[test]
    fn the_gate_is_bounded_and_drops_what_a_replaced_session_sent() {
        let t = Instant::now();
        let mut old: LinkTx<&str> = LinkTx::new(cfg(), 1);
        let mut rx: LinkRx<&str> = LinkRx::new(cfg());
        let mut gate: TunGate<&str> = TunGate::new(2, 5);
        rx.on_frame(old.send("a", t).unwrap());
        // Message 1 is lost on the way.
        let _ = old.send("b", t).unwrap();
        let after = old.next_seq();
        assert_eq!(gate.offer(&rx, 1, after, "xx"), None);
        assert_eq!(gate.offer(&rx, 1, after, "yy"), None);
        // Over the message bound, then over the byte bound (2 + 2 + 3 > 5).
        assert_eq!(gate.offer(&rx, 1, after, "z"), None);
        assert_eq!(gate.dropped, 1);
        // The sender restarts: its new session replaces the old one, whose held messages
        // are dropped, as are late ones.
        let mut new: LinkTx<&str> = LinkTx::new(cfg(), 2);
        assert!(rx.on_frame(new.send("c", t).unwrap()).new_session);
        assert!(gate.release(&rx).is_empty());
        assert_eq!(gate.held(), 0);
        assert_eq!(gate.dropped, 3);
        assert_eq!(gate.offer(&rx, 1, after, "late"), None);
        assert_eq!(gate.dropped, 4);
        assert_eq!(gate.offer(&rx, 2, new.next_seq(), "ok"), Some("ok"));
        let mut small: TunGate<&str> = TunGate::new(8, 5);
        assert_eq!(small.offer(&rx, 2, 9, "abc"), None);
        assert_eq!(small.offer(&rx, 2, 9, "abc"), None);
        assert_eq!((small.held(), small.dropped), (1, 1));
    }
}
