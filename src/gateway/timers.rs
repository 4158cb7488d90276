//! Time in the gateway core: every deadline is named ([`Timer`]) and kept in one heap, plus
//! the two periodic scans (ack expiry with the hibernation pass, and the idle watch of client
//! WebSockets). The shell sleeps until [`Gateway::poll_timeout`] with one timer per shard and
//! calls [`Gateway::handle_timeout`]; an earlier deadline set meanwhile is announced with
//! [`Output::Rearm`].
//!
//! A deadline is checked when it fires, not cancelled when it stops mattering: a connection
//! that answered in time leaves its entry behind until then (at most a few per connection,
//! each gone within its timeout).

use super::conns::{ConnKind, OpenPhase, RequestPhase};
use super::{ConnId, Gateway, Notice, Reason, Refusal};
use crate::config::{ms, Config};
use crate::metrics::Counter;
use crate::protocol::{self, ToClient};
use rand::Rng;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// A named deadline of one connection or question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// A runner must send `Init` by then (`timeouts.runner_init_ms`).
    Init(ConnId),
    /// Time to ping a runner, and to check that it answered the last ping.
    Ping(ConnId),
    /// A client WebSocket's `WebSocketOpen` must be answered by then.
    Open(ConnId),
    /// A tunnelled HTTP request's response must start by then.
    Response(ConnId),
    /// A connection's peer must finish the close handshake by then, or it is reset.
    CloseHandshake(ConnId),
    /// A streamed HTTP response's idle check (`timeouts.http_stream_idle_ms`).
    StreamIdle(ConnId),
    /// A question to the control plane times out.
    Waiter(u32),
    /// The drain's current phase ends ([`Gateway::begin_drain`]).
    Drain,
}

pub(super) struct Timers {
    pub(super) heap: BinaryHeap<Reverse<(Instant, Timer)>>,
    gc_period: Duration,
    next_gc: Instant,
    idle_period: Option<Duration>,
    next_idle: Option<Instant>,
    /// The deadline last reported to the shell.
    reported: Option<Instant>,
}

impl Timers {
    pub(super) fn new(config: &Config, now: Instant) -> Timers {
        let t = &config.timeouts;
        // Check at least as often as the ack timeout so expiry is noticed promptly.
        let gc_period = ms(t.gc_interval_ms.min(t.ack_timeout_ms.max(10)));
        let idle_period = idle_scan_period(config);
        Timers {
            heap: BinaryHeap::new(),
            gc_period,
            next_gc: now + gc_period,
            idle_period,
            next_idle: idle_period.map(|p| now + p),
            reported: None,
        }
    }
}

/// How often the idle scan runs: a quarter of the shorter of the idle and pong timeouts,
/// between 5 ms and 1 s, so a ping or close comes at most that late. `None` when idle pings
/// are off.
pub fn idle_scan_period(config: &Config) -> Option<Duration> {
    let t = &config.timeouts;
    (t.client_idle_ping_ms > 0).then(|| {
        let quarter = t.client_idle_ping_ms.min(t.client_pong_timeout_ms) / 4;
        ms(quarter.clamp(5, 1000))
    })
}

impl Gateway {
    /// Sets a deadline.
    pub(super) fn arm(&mut self, at: Instant, timer: Timer) {
        self.timers.heap.push(Reverse((at, timer)));
        if self.timers.reported.is_none_or(|r| at < r) {
            self.timers.reported = Some(at);
            self.notice(Notice::Rearm);
        }
    }

    /// The earliest deadline: the shell's timer sleeps until then.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let t = &self.timers;
        let mut next = t.next_gc;
        if let Some(Reverse((at, _))) = t.heap.peek() {
            next = next.min(*at);
        }
        if let Some(at) = t.next_idle {
            next = next.min(at);
        }
        self.timers.reported = Some(next);
        Some(next)
    }

    /// Runs every deadline due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(Reverse((at, timer))) = self.timers.heap.peek().copied() {
            if at > now {
                break;
            }
            self.timers.heap.pop();
            self.fire(timer, now);
        }
        if now >= self.timers.next_gc {
            self.gc(now);
            self.timers.next_gc = now + self.timers.gc_period;
        }
        if let (Some(at), Some(period)) = (self.timers.next_idle, self.timers.idle_period) {
            if now >= at {
                self.idle_scan(now);
                self.timers.next_idle = Some(now + period);
            }
        }
        self.timers.reported = None;
        self.check_invariants();
    }

    /// How often [`Gateway::idle_scan`] runs (see [`idle_scan_period`]).
    pub fn idle_scan_period(&self) -> Option<Duration> {
        idle_scan_period(&self.config)
    }

    fn fire(&mut self, timer: Timer, now: Instant) {
        match timer {
            Timer::Init(id) => {
                let waiting = matches!(
                    self.conn(id),
                    Some(c) if !c.out.closing
                        && matches!(&c.kind, ConnKind::Runner(r) if !r.initialised)
                );
                if waiting {
                    self.close_conn(id, Reason::WsTimedOutWaitingForInit, now);
                }
            }
            Timer::Ping(id) => self.ping_runner(id, now),
            Timer::Open(id) => {
                let opening = matches!(
                    self.conn(id).map(|c| &c.kind),
                    Some(ConnKind::Client(cc)) if cc.opening()
                );
                if opening {
                    // Tell the runner we gave up (it may still answer later).
                    self.close_client(id, Reason::OpenTimeout, now);
                    self.refuse_open(id, Refusal::OPEN_TIMEOUT);
                }
            }
            Timer::Response(id) => {
                // The deadline is the response's start (a streamed response has its idle
                // bound); a streamed request body moved it on as it came.
                let deadline = match self.conn(id).map(|c| &c.kind) {
                    Some(ConnKind::Request(r)) if matches!(r.phase, RequestPhase::Waiting) => {
                        r.deadline
                    }
                    _ => return,
                };
                if deadline > now {
                    self.arm(deadline, Timer::Response(id));
                    return;
                }
                // No answer in time: tell the runner to drop it (the request's next index).
                self.abort_to_runner(id);
                self.answer_request(id, super::HttpOutcome::Failed(Refusal::RESPONSE_TIMEOUT));
            }
            Timer::CloseHandshake(id) => {
                if self.contains(id) {
                    self.metrics().inc(Counter::CloseHandshakeTimeouts);
                    self.reset(id);
                }
            }
            Timer::StreamIdle(id) => self.stream_idle_check(id, now),
            Timer::Waiter(w) => self.answer(w, None),
            Timer::Drain => self.drain_step(now),
        }
    }

    /// A runner's ping deadline: close it when its last pong is older than the ping timeout,
    /// else send `Ping { ts }` and set the next one (interval + 0–128 ms of jitter).
    fn ping_runner(&mut self, id: ConnId, now: Instant) {
        let t = &self.config.timeouts;
        let (interval, timeout) = (ms(t.ping_interval_ms), ms(t.ping_timeout_ms));
        let Some(c) = self.conn(id) else {
            return;
        };
        if c.out.closing {
            return;
        }
        let ConnKind::Runner(r) = &c.kind else {
            return;
        };
        if now.saturating_duration_since(r.last_pong) > timeout {
            self.close_conn(id, Reason::WsPingTimeout, now);
            return;
        }
        let ts = self.unix_ms(now);
        let frames = self.runner_frame(&ToClient::Ping(protocol::ToClientPing { ts }));
        self.write_local(id, frames);
        self.arm_ping(id, now, interval);
    }

    pub(super) fn arm_ping(&mut self, id: ConnId, now: Instant, interval: Duration) {
        let jitter = Duration::from_millis(self.rng.random_range(0..=128));
        self.arm(now + interval + jitter, Timer::Ping(id));
    }

    /// Wall-clock milliseconds at `now`.
    pub(super) fn unix_ms(&self, now: Instant) -> i64 {
        let (base, base_ms) = self.clock_base;
        base_ms + now.saturating_duration_since(base).as_millis() as i64
    }

    /// The open exchange ends in a refusal; the shell answers the client with it.
    pub(super) fn refuse_open(&mut self, id: ConnId, r: Refusal) {
        if let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) {
            if cc.opening() {
                cc.open = OpenPhase::Refused(r);
                self.notice(Notice::Wake(id));
            }
        }
    }
}
