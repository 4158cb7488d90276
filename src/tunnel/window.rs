//! The pending window of one hibernatable client WebSocket (SPEC §2.5): the gateway→runner
//! `WebSocketMessage`s sent (or held for replay) and not yet acknowledged, in index order,
//! bounded by a byte cap and a message cap, and accounted against the shard's share of the
//! process-wide pending-bytes cap ([`Budget`]).
//!
//! It is sans-IO: no clock (callers pass `now`), no sockets, no threads, no atomics. It must
//! never copy a payload (entries hold `Bytes` handles), never let the byte total drift from the
//! sum of the held payloads, never hold 32768 or more messages (the 16-bit index comparison
//! would break), and never panic on any ack index a runner may send.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::index::{after, index_of, MAX_WINDOW_MESSAGES};

/// Per-socket caps of the pending window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimits {
    /// Cap on the sum of pending payload sizes. Default 1 MiB. A single message larger than
    /// this is still admitted into an empty window.
    pub max_bytes: usize,
    /// Cap on the number of pending messages. Default and maximum 32767; values above the
    /// maximum (or 0) are clamped by [`WindowLimits::sanitized`], which every window applies.
    pub max_messages: usize,
}

impl WindowLimits {
    /// Default per-socket byte cap: 1 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 1 << 20;
    /// Default (and largest allowed) per-socket message cap.
    pub const DEFAULT_MAX_MESSAGES: usize = MAX_WINDOW_MESSAGES;

    /// Limits with `max_messages` forced into `1..=32767`.
    pub fn sanitized(self) -> Self {
        WindowLimits {
            max_bytes: self.max_bytes,
            max_messages: self.max_messages.clamp(1, MAX_WINDOW_MESSAGES),
        }
    }

    /// `true` when the limits need no clamping (for configuration validation).
    pub fn is_valid(&self) -> bool {
        (1..=MAX_WINDOW_MESSAGES).contains(&self.max_messages)
    }
}

impl Default for WindowLimits {
    fn default() -> Self {
        WindowLimits {
            max_bytes: Self::DEFAULT_MAX_BYTES,
            max_messages: Self::DEFAULT_MAX_MESSAGES,
        }
    }
}

/// A shard's share of the process-wide pending-bytes cap (SPEC §2.5 "Global cap").
///
/// Each shard owns exactly one and passes it as `&mut Budget` to every operation that changes
/// pending bytes; no atomics are involved. `used` is the sum of the pending bytes of every
/// window of the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Pending payload bytes currently held by the shard's windows.
    pub used: u64,
    /// Cap on `used`.
    pub cap: u64,
}

impl Budget {
    /// Default process-wide cap: 1 GiB.
    pub const DEFAULT_PROCESS_CAP: u64 = 1 << 30;

    /// An empty budget with the given cap.
    pub fn new(cap: u64) -> Self {
        Budget { used: 0, cap }
    }

    /// One shard's equal share of a process-wide cap (at least 1 byte per shard is not
    /// guaranteed: a cap of 0 refuses everything).
    pub fn shard_share(process_cap: u64, shards: usize) -> Self {
        let shards = (shards as u64).max(1);
        Budget::new(process_cap / shards)
    }

    /// `true` when `n` more bytes keep `used` at or under `cap`.
    #[inline]
    pub fn fits(&self, n: u64) -> bool {
        self.used.checked_add(n).is_some_and(|t| t <= self.cap)
    }

    /// Bytes that may still be taken.
    #[inline]
    pub fn available(&self) -> u64 {
        self.cap.saturating_sub(self.used)
    }

    #[inline]
    fn take(&mut self, n: u64) {
        self.used = self.used.saturating_add(n);
    }

    #[inline]
    fn release(&mut self, n: u64) {
        debug_assert!(self.used >= n, "budget released more than it holds");
        self.used = self.used.saturating_sub(n);
    }
}

/// One pending tunnel message.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Wire index (low 16 bits of the message's sequence number).
    pub index: u16,
    /// Payload; a reference-counted handle, never a copy.
    pub data: Bytes,
    /// `false` for a text frame.
    pub binary: bool,
    /// When the message was last sent to a runner (or queued, while detached). The ack
    /// timeout runs from here.
    pub sent_at: Instant,
}

/// Why a message is not admitted right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The message may be pushed.
    Fits,
    /// The window's own caps are reached: backpressure (park the message, stop reading).
    WindowFull,
    /// The shard's share of the global cap would be exceeded: close the client with
    /// 1011 `guard.websocket_pending_limit_reached`.
    OverGlobalCap,
}

/// A refused push; the payload is handed back untouched.
#[derive(Debug, Clone)]
pub struct Refused {
    /// [`Admission::WindowFull`] or [`Admission::OverGlobalCap`].
    pub why: Admission,
    /// The payload that was not admitted.
    pub data: Bytes,
}

/// Why an ack was ignored (the shell counts these in a metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoredAck {
    /// The index is after the last message sent: it was never sent.
    Future,
    /// The index is before the last acknowledged message: older than the window.
    Stale,
    /// The socket keeps no window (not hibernatable, not open yet, or closed).
    NoWindow,
}

/// What a cumulative ack did to the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowAck {
    /// Messages removed from the window.
    pub freed_messages: usize,
    /// Payload bytes removed from the window (and released from the budget).
    pub freed_bytes: usize,
    /// `Some` when the ack was ignored. A repeated ack of the last acknowledged index is not
    /// ignored: it is valid and frees nothing.
    pub ignored: Option<IgnoredAck>,
}

/// Capacity kept by an empty window; anything above is returned to the allocator by
/// [`PendingWindow::shrink_if_idle`] so that idle sockets stay small.
const IDLE_CAPACITY: usize = 16;

/// The pending window: a ring of [`Entry`] in index order.
///
/// Internally the window knows the 64-bit sequence number of the next message (`end_seq`);
/// the front entry has sequence `end_seq - len`. The wire index is the low 16 bits.
#[derive(Debug, Clone)]
pub struct PendingWindow {
    entries: VecDeque<Entry>,
    end_seq: u64,
    bytes: usize,
    limits: WindowLimits,
}

impl PendingWindow {
    /// An empty window whose next message gets sequence `next_seq` (index `next_seq as u16`).
    /// Every message before it counts as acknowledged.
    pub fn new(limits: WindowLimits, next_seq: u64) -> Self {
        PendingWindow {
            entries: VecDeque::new(),
            end_seq: next_seq,
            bytes: 0,
            limits: limits.sanitized(),
        }
    }

    /// The (sanitized) limits in force.
    pub fn limits(&self) -> WindowLimits {
        self.limits
    }

    /// Number of pending messages.
    #[inline]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `true` when nothing is pending.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sum of the pending payload sizes.
    #[inline]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Sequence number the next pushed message will get.
    #[inline]
    pub fn next_seq(&self) -> u64 {
        self.end_seq
    }

    /// Wire index the next pushed message will get.
    #[inline]
    pub fn next_index(&self) -> u16 {
        index_of(self.end_seq)
    }

    /// The pending messages, oldest first.
    pub fn iter(&self) -> std::collections::vec_deque::Iter<'_, Entry> {
        self.entries.iter()
    }

    /// `sent_at` of the oldest pending message.
    #[inline]
    pub fn oldest_sent_at(&self) -> Option<Instant> {
        self.entries.front().map(|e| e.sent_at)
    }

    /// Whether a message of `len` bytes may be admitted now (SPEC §2.5, exact rule):
    /// admitted when the window is empty or when it fits under both per-socket caps; then it
    /// must also fit the global budget.
    pub fn admission(&self, len: usize, budget: &Budget) -> Admission {
        let fits_window = self.entries.is_empty()
            || (self.entries.len() < self.limits.max_messages
                && self
                    .bytes
                    .checked_add(len)
                    .is_some_and(|t| t <= self.limits.max_bytes));
        if !fits_window {
            Admission::WindowFull
        } else if !budget.fits(len as u64) {
            Admission::OverGlobalCap
        } else {
            Admission::Fits
        }
    }

    /// Appends a message if [`admission`](Self::admission) allows it; returns its index.
    pub fn push(
        &mut self,
        data: Bytes,
        binary: bool,
        now: Instant,
        budget: &mut Budget,
    ) -> Result<u16, Refused> {
        match self.admission(data.len(), budget) {
            Admission::Fits => {}
            why => return Err(Refused { why, data }),
        }
        let index = index_of(self.end_seq);
        self.end_seq += 1;
        self.bytes += data.len();
        budget.take(data.len() as u64);
        self.entries.push_back(Entry {
            index,
            data,
            binary,
            sent_at: now,
        });
        Ok(index)
    }

    /// Cumulative ack: drops every pending message whose index is not after `index`.
    ///
    /// Valid acks name the last acknowledged message (frees nothing) or a pending one. An
    /// index after the last message sent (never sent) or before the last acknowledged one
    /// (older than the window) is ignored and reported.
    pub fn ack(&mut self, index: u16, budget: &mut Budget) -> WindowAck {
        let last = index_of(self.end_seq.wrapping_sub(1));
        // Distance back from the last message sent; the window is < 32768 long, so every
        // valid ack is at most `len` back and the classification below is unambiguous.
        let back = usize::from(last.wrapping_sub(index));
        let len = self.entries.len();
        if back > len {
            let why = if after(index, last) {
                IgnoredAck::Future
            } else {
                IgnoredAck::Stale
            };
            return WindowAck {
                ignored: Some(why),
                ..WindowAck::default()
            };
        }
        let n = len - back;
        let mut freed_bytes = 0usize;
        for e in self.entries.drain(..n) {
            freed_bytes += e.data.len();
        }
        self.bytes -= freed_bytes;
        budget.release(freed_bytes as u64);
        WindowAck {
            freed_messages: n,
            freed_bytes,
            ignored: None,
        }
    }

    /// Releases every pending message (the socket is closing). The sequence is kept: indices
    /// are never reset.
    pub fn clear(&mut self, budget: &mut Budget) {
        budget.release(self.bytes as u64);
        self.bytes = 0;
        self.entries.clear();
        self.shrink_if_idle();
    }

    /// Restarts the ack deadline of every pending message at `now`.
    ///
    /// Used on replay: a replayed message is sent to a new runner connection (or a restarted
    /// actor), and that runner gets the full ack timeout to acknowledge it. Time spent while
    /// the runner was gone or the actor slept must not count against the new runner, or a
    /// socket that hibernated for longer than the timeout would be closed right after waking.
    pub fn mark_resent(&mut self, now: Instant) {
        for e in self.entries.iter_mut() {
            e.sent_at = now;
        }
    }

    /// Returns surplus ring capacity to the allocator when the window is empty.
    pub fn shrink_if_idle(&mut self) {
        if self.entries.is_empty() && self.entries.capacity() > IDLE_CAPACITY {
            self.entries = VecDeque::new();
        }
    }

    /// Checks the window's invariants (for tests and simulations).
    pub fn check_invariants(&self) -> Result<(), String> {
        let len = self.entries.len();
        if len > self.limits.max_messages || len > MAX_WINDOW_MESSAGES {
            return Err(format!(
                "window holds {len} messages, cap {}",
                self.limits.max_messages
            ));
        }
        let sum: usize = self.entries.iter().map(|e| e.data.len()).sum();
        if sum != self.bytes {
            return Err(format!(
                "byte total {} != sum of payloads {sum}",
                self.bytes
            ));
        }
        if self.bytes > self.limits.max_bytes && len != 1 {
            return Err(format!(
                "{} bytes over the cap {} with {len} messages",
                self.bytes, self.limits.max_bytes
            ));
        }
        if (len as u64) > self.end_seq {
            return Err("more entries than sequence numbers".into());
        }
        let first = self.end_seq - len as u64;
        for (i, e) in self.entries.iter().enumerate() {
            let want = index_of(first + i as u64);
            if e.index != want {
                return Err(format!("entry {i} has index {} expected {want}", e.index));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: usize) -> Bytes {
        Bytes::from(vec![7u8; n])
    }

    fn limits(max_bytes: usize, max_messages: usize) -> WindowLimits {
        WindowLimits {
            max_bytes,
            max_messages,
        }
    }

    #[test]
    fn defaults_match_spec() {
        let l = WindowLimits::default();
        assert_eq!(l.max_bytes, 1024 * 1024);
        assert_eq!(l.max_messages, 32767);
        assert!(l.is_valid());
        assert_eq!(Budget::DEFAULT_PROCESS_CAP, 1 << 30);
    }

    #[test]
    fn message_cap_is_clamped() {
        let w = PendingWindow::new(limits(10, 70_000), 1);
        assert_eq!(w.limits().max_messages, 32767);
        let w = PendingWindow::new(limits(10, 0), 1);
        assert_eq!(w.limits().max_messages, 1);
        assert!(!limits(10, 32768).is_valid());
    }

    #[test]
    fn push_assigns_consecutive_indices_and_counts_bytes() {
        let now = Instant::now();
        let mut b = Budget::new(u64::MAX);
        let mut w = PendingWindow::new(WindowLimits::default(), 1);
        assert_eq!(w.push(payload(3), true, now, &mut b).unwrap(), 1);
        assert_eq!(w.push(payload(5), false, now, &mut b).unwrap(), 2);
        assert_eq!((w.len(), w.bytes(), b.used), (2, 8, 8));
        let idx: Vec<u16> = w.iter().map(|e| e.index).collect();
        assert_eq!(idx, [1, 2]);
        w.check_invariants().unwrap();
    }

    #[test]
    fn byte_total_goes_down_on_ack() {
        let now = Instant::now();
        let mut b = Budget::new(u64::MAX);
        let mut w = PendingWindow::new(WindowLimits::default(), 1);
        for n in [10, 20, 30] {
            w.push(payload(n), true, now, &mut b).unwrap();
        }
        assert_eq!(w.bytes(), 60);
        let a = w.ack(2, &mut b);
        assert_eq!((a.freed_messages, a.freed_bytes, a.ignored), (2, 30, None));
        assert_eq!((w.bytes(), b.used, w.len()), (30, 30, 1));
        let a = w.ack(3, &mut b);
        assert_eq!((a.freed_messages, a.freed_bytes), (1, 30));
        assert_eq!((w.bytes(), b.used, w.len()), (0, 0, 0));
        w.check_invariants().unwrap();
    }

    #[test]
    fn ignored_acks_are_classified() {
        let now = Instant::now();
        let mut b = Budget::new(u64::MAX);
        let mut w = PendingWindow::new(WindowLimits::default(), 1);
        for _ in 0..5 {
            w.push(payload(1), true, now, &mut b).unwrap();
        }
        assert_eq!(w.ack(6, &mut b).ignored, Some(IgnoredAck::Future));
        assert_eq!(w.ack(40_000, &mut b).ignored, Some(IgnoredAck::Stale));
        assert_eq!(w.len(), 5);
        // Acking "nothing new" (the open index) is valid and frees nothing.
        assert_eq!(w.ack(0, &mut b), WindowAck::default());
        assert_eq!(w.ack(3, &mut b).freed_messages, 3);
        assert_eq!(w.ack(2, &mut b).ignored, Some(IgnoredAck::Stale));
        assert_eq!(w.ack(3, &mut b), WindowAck::default(), "repeat ack");
        assert_eq!(w.ack(5, &mut b).freed_messages, 2);
        assert_eq!(w.ack(5, &mut b), WindowAck::default());
        assert_eq!(w.ack(6, &mut b).ignored, Some(IgnoredAck::Future));
        assert_eq!(w.ack(4, &mut b).ignored, Some(IgnoredAck::Stale));
        assert_eq!(b.used, 0);
    }

    #[test]
    fn ack_across_the_wrap() {
        let now = Instant::now();
        let mut b = Budget::new(u64::MAX);
        let mut w = PendingWindow::new(WindowLimits::default(), 65534);
        for _ in 0..4 {
            w.push(payload(1), true, now, &mut b).unwrap();
        }
        let idx: Vec<u16> = w.iter().map(|e| e.index).collect();
        assert_eq!(idx, [65534, 65535, 0, 1]);
        assert_eq!(w.ack(0, &mut b).freed_messages, 3);
        assert_eq!(w.iter().next().unwrap().index, 1);
        assert_eq!(w.ack(65535, &mut b).ignored, Some(IgnoredAck::Stale));
        assert_eq!(w.ack(2, &mut b).ignored, Some(IgnoredAck::Future));
        w.check_invariants().unwrap();
    }

    #[test]
    fn oversized_message_only_into_empty_window() {
        let now = Instant::now();
        let mut b = Budget::new(u64::MAX);
        let mut w = PendingWindow::new(limits(100, 10), 1);
        assert_eq!(w.admission(500, &b), Admission::Fits);
        w.push(payload(500), true, now, &mut b).unwrap();
        w.check_invariants().unwrap();
        // Nothing more while the oversized message is pending, not even an empty one.
        assert_eq!(w.admission(0, &b), Admission::WindowFull);
        let r = w.push(payload(1), true, now, &mut b).unwrap_err();
        assert_eq!((r.why, r.data.len()), (Admission::WindowFull, 1));
        w.ack(1, &mut b);
        w.push(payload(60), true, now, &mut b).unwrap();
        assert_eq!(w.admission(40, &b), Admission::Fits);
        assert_eq!(w.admission(41, &b), Admission::WindowFull);
        assert_eq!(w.admission(500, &b), Admission::WindowFull);
        w.check_invariants().unwrap();
    }

    #[test]
    fn message_cap_applies() {
        let now = Instant::now();
        let mut b = Budget::new(u64::MAX);
        let mut w = PendingWindow::new(limits(1000, 3), 1);
        for _ in 0..3 {
            w.push(payload(0), true, now, &mut b).unwrap();
        }
        assert_eq!(w.admission(0, &b), Admission::WindowFull);
    }

    #[test]
    fn global_cap_refuses_and_keeps_budget() {
        let now = Instant::now();
        let mut b = Budget { used: 90, cap: 100 };
        let mut w = PendingWindow::new(WindowLimits::default(), 1);
        w.push(payload(10), true, now, &mut b).unwrap();
        assert_eq!(b.used, 100);
        let r = w.push(payload(1), true, now, &mut b).unwrap_err();
        assert_eq!(r.why, Admission::OverGlobalCap);
        assert_eq!((b.used, w.len()), (100, 1));
        w.clear(&mut b);
        assert_eq!((b.used, w.len(), w.bytes()), (90, 0, 0));
        assert_eq!(w.next_index(), 2, "clear never resets the index");
    }

    #[test]
    fn mark_resent_restarts_deadlines() {
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_secs(40);
        let mut b = Budget::new(u64::MAX);
        let mut w = PendingWindow::new(WindowLimits::default(), 1);
        w.push(payload(1), true, t0, &mut b).unwrap();
        assert_eq!(w.oldest_sent_at(), Some(t0));
        w.mark_resent(t1);
        assert_eq!(w.oldest_sent_at(), Some(t1));
        assert!(w.iter().all(|e| e.sent_at == t1));
    }

    #[test]
    fn shrink_if_idle_frees_capacity() {
        let now = Instant::now();
        let mut b = Budget::new(u64::MAX);
        let mut w = PendingWindow::new(WindowLimits::default(), 1);
        for _ in 0..1000 {
            w.push(payload(0), true, now, &mut b).unwrap();
        }
        w.ack(1000, &mut b);
        w.shrink_if_idle();
        assert!(w.entries.capacity() <= IDLE_CAPACITY);
    }

    #[test]
    fn payloads_are_not_copied() {
        let now = Instant::now();
        let mut b = Budget::new(u64::MAX);
        let mut w = PendingWindow::new(WindowLimits::default(), 1);
        let p = payload(64);
        w.push(p.clone(), true, now, &mut b).unwrap();
        assert_eq!(w.iter().next().unwrap().data.as_ptr(), p.as_ptr());
    }
}
