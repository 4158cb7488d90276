//! Time and the network's pace: advancing the clock from deadline to deadline (the gateway
//! cores', the engine's, the runner cores'), delivering what the network holds too long,
//! and settling everything in flight.

use std::time::{Duration, Instant};

use super::clients::Phase;
use super::world::World;
use crate::gateway::ConnKind;

/// Delivery rounds after which a settle that still moves messages is a livelock.
const SETTLE_ROUNDS: usize = 1000;

/// Longest time a message spends on a live connection.
const MAX_LATENCY: Duration = Duration::from_secs(2);

/// The gateway's pong timeout: it notices a dead runner connection within this (SPEC §1.4.4).
const PING_TIMEOUT: Duration = Duration::from_secs(15);

impl World {
    /// Advances simulated time to `now + dt`, stopping at every deadline on the way (in
    /// order) to run it. If an attached socket's ack deadline (or an opening socket's open
    /// deadline) falls inside the jump, the network is settled first: a runner that is
    /// connected and healthy gets the chance to process and acknowledge, so an expiry after
    /// that means the runner truly cannot make progress (a lost or unreplayed message).
    pub fn advance(&mut self, dt: Duration) {
        let until = self.now + dt;
        if self.deadline_within(until) {
            self.settle(false);
        }
        loop {
            let mut next = until;
            for g in self.gw.iter_mut() {
                if let Some(t) = g.poll_timeout() {
                    next = next.min(t);
                }
            }
            if let Some(t) = self
                .engine
                .next_deadline()
                .filter(|_| self.cluster.placing())
            {
                next = next.min(t);
            }
            if let Some(t) = self.cluster.deadline() {
                next = next.min(t);
            }
            let next = next.max(self.now);
            self.bound_latency(next);
            self.now = next;
            for s in 0..self.gw.len() {
                if self.gw[s].poll_timeout().is_some_and(|t| t <= next) {
                    self.call(s, |g, now| g.handle_timeout(now));
                }
            }
            self.cluster_timers();
            self.engine_tick();
            for no in 0..self.runners.len() {
                self.runners[no].core.poll(self.now);
                self.runner_flush(no);
            }
            if next >= until {
                return;
            }
        }
    }

    /// Whether an open socket's ack deadline or an opening socket's open deadline comes
    /// before `until`.
    fn deadline_within(&self, until: Instant) -> bool {
        let ack = self.cfg.ack_timeout;
        self.clients.values().any(|c| match c.phase {
            Phase::Opening { since, .. } => since + self.cfg.open_timeout <= until,
            Phase::Open { conn } => match self.gw[c.shard].kind(conn) {
                Some(ConnKind::Client(cc)) => {
                    cc.socket.ack_deadline(ack).is_some_and(|d| d <= until)
                }
                _ => false,
            },
            _ => false,
        })
    }

    /// The network is slow, not frozen: before time reaches `until`, every message written
    /// more than [`MAX_LATENCY`] earlier arrives, and the gateway notices a connection the
    /// runner lost within its ping timeout. Without this bound a live connection could hold
    /// a `CommandStopActor` past `actor_stop_threshold`, and the old and the new generation of
    /// an actor would run at once — a network the gateway's pings would have declared dead.
    fn bound_latency(&mut self, until: Instant) {
        let deadline = until.checked_sub(MAX_LATENCY).unwrap_or(self.t0);
        for _ in 0..200 {
            let mut moved = false;
            let gens: Vec<u32> = self.conns.keys().copied().collect();
            for g in gens {
                let old = |q: Option<&Instant>| q.is_some_and(|t| *t <= deadline);
                let (a, b) = match self.conns.get(&g) {
                    Some(c) => (
                        old(c.g2r.front().map(|(t, _)| t)),
                        old(c.r2g.front().map(|(t, _)| t)),
                    ),
                    None => (false, false),
                };
                if a {
                    moved = true;
                    self.deliver_g2r(g, 1);
                }
                if b {
                    moved = true;
                    self.deliver_r2g(g, 1);
                }
            }
            moved |= self.deliver_control_until(Some(deadline));
            let bus = until
                .checked_sub(super::nodes::BUS_LATENCY)
                .unwrap_or(self.t0);
            moved |= self.bus_deliver_until(Some(bus));
            if !moved {
                break;
            }
        }
        let ping_deadline = until.checked_sub(PING_TIMEOUT).unwrap_or(self.t0);
        let late: Vec<u32> = self
            .pending_notices
            .iter()
            .filter(|(_, t)| *t <= ping_deadline)
            .map(|(c, _)| *c)
            .collect();
        for c in late {
            self.gateway_notice(c);
        }
    }

    /// Delivers everything in flight (both directions, every connection, including the
    /// gateway noticing closed connections) and lets actors acknowledge, until nothing moves.
    /// Does not reconnect runners. With `reconnect`, disconnected runners come back too.
    pub fn settle(&mut self, reconnect: bool) {
        for _ in 0..SETTLE_ROUNDS {
            let notices = std::mem::take(&mut self.pending_notices);
            for (c, _) in notices {
                self.gateway_notice(c);
            }
            if reconnect {
                for no in 0..self.runners.len() {
                    self.runner_connect(no);
                }
            }
            let gens: Vec<u32> = self.conns.keys().copied().collect();
            let mut moved = false;
            for g in gens {
                let (a, b) = match self.conns.get(&g) {
                    Some(c) => (c.g2r.len(), c.r2g.len()),
                    None => (0, 0),
                };
                if a > 0 {
                    moved = true;
                    self.deliver_g2r(g, a);
                }
                if b > 0 {
                    moved = true;
                    self.deliver_r2g(g, b);
                }
            }
            moved |= self.deliver_control_until(None);
            moved |= self.bus_deliver_until(None);
            moved |= self.bus_resend_now();
            self.ack_all();
            let in_flight = self
                .conns
                .values()
                .any(|c| !c.g2r.is_empty() || !c.r2g.is_empty())
                || self.control_mail.iter().any(|q| !q.is_empty())
                || !self.cluster.idle();
            if !moved && !in_flight && self.pending_notices.is_empty() {
                return;
            }
        }
        self.fail(format!(
            "the network did not settle within {SETTLE_ROUNDS} rounds"
        ));
    }
}
