//! Hibernation (SPEC §2.6): client WebSockets that stay open while their actor sleeps or its
//! runner is gone. A hibernatable socket keeps its window, asks the control plane to wake
//! the actor when its client speaks, and reattaches to the actor's next generation, replaying
//! what is pending with the original indices. The engine holds a record of every
//! hibernatable socket from its open to its close (refreshed here), so whatever starts the
//! actor lists it.

use super::conns::{ClientConn, ConnKind, Hibernation};
use super::msg::{ControlMsg, TunnelIn};
use super::{ConnId, Gateway, Reason};
use crate::engine::ConnRef;
use crate::metrics::{Counter, Gauge};
use crate::protocol;
use crate::tunnel::{Detach, DetachCause};
use bytes::Bytes;
use rand::Rng;
use std::time::Instant;

pub(super) fn hibernating_request(
    gateway_id: [u8; 4],
    req: [u8; 4],
) -> protocol::HibernatingRequest {
    protocol::HibernatingRequest {
        gateway_id,
        request_id: req,
    }
}

impl Gateway {
    /// Refreshes the engine's records of hibernatable sockets (every `hibernation_refresh_ms`
    /// plus jitter, in one message) and closes the sockets that hibernated longer than
    /// `hibernation_max_ms`.
    pub(super) fn hibernation_pass(&mut self, now: Instant) {
        let t = &self.config.timeouts;
        let max = (t.hibernation_max_ms > 0).then(|| crate::config::ms(t.hibernation_max_ms));
        let gw = self.gateway_id;
        let mut refresh = Vec::new();
        let mut expired = Vec::new();
        for (slot, c) in self.conns.iter() {
            let ConnKind::Client(cc) = &c.kind else {
                continue;
            };
            if c.out.closing {
                continue;
            }
            let id = ConnId {
                slot: slot as u32,
                gen: c.gen,
            };
            if let Some(h) = cc.hibernation {
                if max.is_some_and(|max| now.saturating_duration_since(h.since) > max) {
                    expired.push(id);
                    continue;
                }
            }
            if cc.record_refresh_at.is_some_and(|at| now >= at) {
                refresh.push(id);
            }
        }
        let mut records = Vec::with_capacity(refresh.len());
        for id in refresh {
            let next = now + self.refresh_interval();
            if let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) {
                cc.record_refresh_at = Some(next);
                records.push((cc.actor_id.clone(), hibernating_request(gw, cc.req)));
            }
        }
        if !records.is_empty() {
            self.control(ControlMsg::HibernatingRefresh(records));
        }
        for id in expired {
            self.close_client(id, Reason::HibernationTimeout, now);
        }
    }

    pub(super) fn refresh_interval(&mut self) -> std::time::Duration {
        let base = self.config.timeouts.hibernation_refresh_ms;
        crate::config::ms(base + self.rng.random_range(0..=base / 8))
    }

    /// The socket hibernates: it waits for a later generation of its actor, and a non-empty
    /// window wakes the actor at once. The socket must already be detached (its window
    /// kept). Idempotent.
    fn enter_hibernation(&mut self, id: ConnId, now: Instant) {
        let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return;
        };
        if cc.hibernation.is_some() {
            return;
        }
        cc.hibernation = Some(Hibernation {
            since: now,
            waking: false,
        });
        // The actor no longer holds the request: nothing is owed to it while it hibernates.
        cc.runner_closed = true;
        let pending = cc.socket.pending_len() > 0;
        let m = self.metrics();
        m.inc(Counter::Hibernations);
        m.gauge_add(Gauge::HibernatingWebSockets, 1);
        if pending {
            self.wake_for(id);
        }
    }

    /// Asks the control plane to start the actor of a hibernating socket (once per sleep).
    pub(super) fn wake_for(&mut self, id: ConnId) {
        let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return;
        };
        let Some(h) = cc.hibernation.as_mut() else {
            return;
        };
        if h.waking {
            return;
        }
        h.waking = true;
        let msg = ControlMsg::Wake {
            actor_id: cc.actor_id.to_string(),
        };
        self.control(msg);
        self.metrics().inc(Counter::WakeRequests);
    }

    /// Hibernating sockets that `pick` selects (and that are not closing) may ask for a wake
    /// again; returns those with messages waiting (to ask now).
    pub(super) fn forget_wakes(&mut self, pick: impl Fn(&ClientConn) -> bool) -> Vec<ConnId> {
        self.conns
            .iter_mut()
            .filter_map(|(s, c)| match &mut c.kind {
                ConnKind::Client(cc) if pick(cc) && !c.out.closing => {
                    let h = cc.hibernation.as_mut()?;
                    h.waking = false;
                    (cc.socket.pending_len() > 0).then_some(ConnId {
                        slot: s as u32,
                        gen: c.gen,
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// The socket stops hibernating (reattached or closed).
    pub(super) fn leave_hibernation(&mut self, id: ConnId) {
        let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return;
        };
        if cc.hibernation.take().is_some() {
            self.metrics().gauge_add(Gauge::HibernatingWebSockets, -1);
        }
    }

    /// The socket closed: the engine forgets its record.
    pub(super) fn forget_record(&mut self, id: ConnId) {
        let gw = self.gateway_id;
        let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return;
        };
        if cc.record_refresh_at.take().is_some() {
            let msg = ControlMsg::Hibernating {
                actor_id: cc.actor_id.clone(),
                req: hibernating_request(gw, cc.req),
                keep: false,
            };
            self.control(msg);
        }
    }

    /// The actor runs again: its hibernating sockets of earlier generations reattach to the
    /// runner (no second `WebSocketOpen`: the start command listed them) and replay their
    /// windows with the original indices.
    pub(super) fn actor_running(
        &mut self,
        actor_id: &str,
        generation: u32,
        runner_idx: u32,
        now: Instant,
    ) {
        let Some(Some(conn)) = self.runners.get(runner_idx as usize).copied() else {
            return;
        };
        let ids = self.clients_where(|cc| {
            &*cc.actor_id == actor_id && cc.hibernation.is_some() && generation > cc.generation
        });
        for id in ids {
            self.leave_hibernation(id);
            let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) else {
                continue;
            };
            cc.runner_idx = runner_idx;
            cc.generation = generation;
            cc.runner_closed = false;
            let early = std::mem::take(&mut cc.early);
            cc.early_bytes = 0;
            self.metrics().inc(Counter::HibernationWakes);
            self.replay(id, conn, now);
            for (from, data, binary) in early {
                self.client_in(id, TunnelIn::Message { data, binary }, from, now);
            }
        }
    }

    /// Sends a socket's whole pending window, oldest first, original indices.
    pub(super) fn replay(&mut self, id: ConnId, conn: ConnRef, now: Instant) {
        let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return;
        };
        let req = cc.req;
        let replay: Vec<(u16, Bytes, bool)> = cc
            .socket
            .on_runner_attached(now)
            .map(|e| (e.index, e.data.clone(), e.binary))
            .collect();
        // A reattachment with nothing pending re-sends nothing: not a replay. (A runner that
        // reconnects reattaches its sockets at once; after a restart the fence then finds the
        // actors gone, the sockets hibernate and replay again when the actor's next
        // generation runs: counting both doubled the count per restart.)
        if !replay.is_empty() {
            let m = self.metrics();
            m.inc(Counter::Replays);
            m.add(Counter::ReplayedMessages, replay.len() as u64);
        }
        let mut frames = Vec::with_capacity(replay.len() * 3);
        for (index, data, binary) in replay {
            frames.extend(self.ws_message_frames(req, index, data, binary));
        }
        if !frames.is_empty() {
            self.send_to_conn(conn, frames);
        }
    }

    pub(super) fn actor_stopped(&mut self, actor_id: &str, now: Instant) {
        self.fail_requests("actor.stopped", |r| &*r.actor_id == actor_id);
        // Sockets that hibernated while the actor still ran (it handed them back) and asked
        // for a wake then: the actor is down now, so a wake starts it.
        let held = self.forget_wakes(|cc| &*cc.actor_id == actor_id);
        let affected =
            self.clients_where(|cc| &*cc.actor_id == actor_id && cc.hibernation.is_none());
        for id in affected {
            self.detach_for_hibernation(id, DetachCause::ActorStopped, now);
        }
        for id in held {
            self.wake_for(id);
        }
    }

    /// The actor is gone for good: every socket and request of it ends.
    pub(super) fn actor_destroyed(&mut self, actor_id: &str, now: Instant) {
        self.fail_requests("actor.destroyed", |r| &*r.actor_id == actor_id);
        let affected = self.clients_where(|cc| &*cc.actor_id == actor_id);
        for id in affected {
            let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) else {
                continue;
            };
            cc.runner_closed = true;
            if cc.opening() {
                self.refuse_open(id, super::Refusal::OPEN_REFUSED);
                continue;
            }
            self.close_client(id, Reason::ActorDestroyed, now);
        }
    }

    /// The runner is lost: its attached or detached sockets hibernate (or close).
    pub(super) fn runner_lost(&mut self, runner_idx: u32, now: Instant) {
        let affected =
            self.clients_where(|cc| cc.runner_idx == runner_idx && cc.hibernation.is_none());
        for id in affected {
            self.detach_for_hibernation(id, DetachCause::RunnerLost, now);
        }
    }

    /// The actor is gone from under a socket: a hibernatable one hibernates, an opening one
    /// is refused, any other closes with the cause's reason.
    pub(super) fn detach_for_hibernation(&mut self, id: ConnId, cause: DetachCause, now: Instant) {
        let Some(cc) = super::client_of(&mut self.conns, id) else {
            return;
        };
        if cc.opening() {
            cc.runner_closed = true;
            self.refuse_open(id, super::Refusal::OPEN_REFUSED);
            return;
        }
        let (pb, pm) = (cc.socket.pending_bytes(), cc.socket.pending_len());
        match cc.socket.on_runner_detached(cause, &mut self.budget) {
            Detach::Keep => self.enter_hibernation(id, now),
            Detach::AlreadyClosed => {}
            Detach::Close(r) => {
                cc.runner_closed = cause != DetachCause::HibernateRequested;
                self.pending_gauges_down(pb, pm);
                self.close_client(id, r.into(), now);
            }
        }
    }
}
