//! The gateway glue of the simulation: what the shell does between the engine's [`Action`]s,
//! the runner's tunnel messages and each client's [`TunnelSocket`], written from SPEC
//! §2.4–§2.6 (including the hibernation rules the shell does not have yet).
//!
//! Per client socket it keeps a [`Link`]: how the socket is reached right now. The rules:
//! - open: resolve the actor (waking it), send `WebSocketOpen` (index 0) once, upgrade the
//!   client when the runner answers; refuse on a runner close, a runner/actor loss, a timeout;
//! - runner connection drops: hibernatable sockets keep their window (`Disconnected`), others
//!   close; the same runner reattaches: replay with the original indices;
//! - the actor stops, the runner asks to hibernate, or the runner is lost: `Hibernating`;
//!   a held message or a non-empty window wakes the actor; at `Running` every hibernating
//!   socket of the actor is attached and replayed — never opened again;
//! - a socket's hibernating record is registered as soon as it is hibernatable (not only when
//!   it starts hibernating: the engine may allocate the next generation inside the very call
//!   that reports the stop, before the glue sees `ActorStopped`), refreshed, removed at close.
//!
//! It must never send a message of a socket on a connection that is not the socket's runner's
//! current one, and never act on a tunnel message from a stale connection.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::actor::{lock, sock_of, ACTOR_CLOSE_REASON, GATEWAY_ID};
use super::world::World;
use crate::engine::{Action, ConnRef, Resolve, ResolveError, Route, RunnerIdx};
use crate::protocol::{
    Command, HibernatingRequest, MessageId, StrMap, ToClient, ToClientTunnelMessage,
    ToClientTunnelMessageKind, ToClientWebSocketClose, ToClientWebSocketMessage,
    ToClientWebSocketOpen, ToServerTunnelMessage, ToServerTunnelMessageKind,
};
use crate::tunnel::{ClientMsg, CloseReason, Detach, DetachCause, SocketState, TunnelSocket};

/// How a client socket is reached right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    /// Waiting for the actor to become routable before sending `WebSocketOpen`.
    Resolving {
        waiter: u64,
    },
    /// `WebSocketOpen` sent on `conn`; the client upgrade waits for the answer.
    Opening {
        runner_idx: RunnerIdx,
        conn: ConnRef,
        since: Instant,
    },
    /// Open on the runner's current connection.
    Attached {
        runner_idx: RunnerIdx,
    },
    /// The runner connection dropped; the actor is still placed there.
    Disconnected {
        runner_idx: RunnerIdx,
    },
    /// No runner hosts the socket (actor stopped, runner lost, or the runner handed it back);
    /// `waiter` while a wake is under way.
    Hibernating {
        waiter: Option<u64>,
    },
    Closed,
}

/// What an engine waiter was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitFor {
    Open(u32),
    Wake(u32),
    Dummy,
}

/// One client WebSocket: the gateway's state and the client behind it.
pub(crate) struct GwSock {
    pub id: u32,
    pub actor: String,
    pub req: [u8; 4],
    pub socket: TunnelSocket,
    pub link: Link,
    pub open_sent: bool,
    /// The client's upgrade completed.
    pub upgraded: bool,
    /// Next client sequence number to generate.
    pub next_seq: u32,
    /// Messages the client has not handed to the gateway yet (it stops while paused).
    pub queue: VecDeque<(u32, Bytes)>,
    /// Highest sequence number the gateway consumed (sent, held or parked).
    pub offered: u32,
    /// The message parked inside the socket: (seq, len).
    pub parked: Option<(u32, usize)>,
    pub closed: Option<String>,
}

impl GwSock {
    pub fn is_closed(&self) -> bool {
        self.link == Link::Closed
    }

    /// Nothing left to do for this socket.
    pub fn is_quiet(&self) -> bool {
        match self.link {
            Link::Closed => true,
            Link::Resolving { .. } | Link::Opening { .. } | Link::Disconnected { .. } => false,
            Link::Attached { .. } | Link::Hibernating { .. } => {
                self.queue.is_empty() && self.parked.is_none() && self.socket.pending_len() == 0
            }
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "#{} actor {} {:?} state {:?} hib {} pending {}/{}B parked {:?} queued {} offered {} \
             closed {:?}",
            self.id,
            self.actor,
            self.link,
            self.socket.state(),
            self.socket.is_hibernatable(),
            self.socket.pending_len(),
            self.socket.pending_bytes(),
            self.parked,
            self.queue.len(),
            self.offered,
            self.closed
        )
    }

    /// The glue's view agrees with the socket's own state.
    pub fn consistent(&self) -> Result<(), String> {
        let st = self.socket.state();
        let ok = match self.link {
            Link::Closed => st == SocketState::Closed,
            Link::Resolving { .. } | Link::Opening { .. } => st == SocketState::Opening,
            Link::Attached { .. } => st == SocketState::Open,
            Link::Disconnected { .. } | Link::Hibernating { .. } => {
                st == SocketState::Detached && self.socket.is_hibernatable()
            }
        };
        if !ok {
            return Err(format!(
                "glue link {:?} disagrees with socket state {st:?}",
                self.link
            ));
        }
        if self.socket.is_paused() != self.parked.is_some() {
            return Err(format!(
                "paused {} but the glue thinks parked {:?}",
                self.socket.is_paused(),
                self.parked
            ));
        }
        Ok(())
    }

    fn hib_req(&self) -> HibernatingRequest {
        HibernatingRequest {
            gateway_id: GATEWAY_ID,
            request_id: self.req,
        }
    }
}

fn tunnel(req: [u8; 4], index: u16, kind: ToClientTunnelMessageKind) -> ToClient {
    ToClient::TunnelMessage(ToClientTunnelMessage {
        message_id: MessageId {
            gateway_id: GATEWAY_ID,
            request_id: req,
            message_index: index,
        },
        message_kind: kind,
    })
}

impl World {
    // -----------------------------------------------------------------------------------------
    // Clients

    /// A client asks to open a WebSocket to actor number `a`.
    pub fn client_open(&mut self, a: usize, want_hib: bool) {
        let id = self.next_sock;
        self.next_sock += 1;
        self.stats.sockets += 1;
        let actor = self.actor_ids[a].clone();
        lock(&self.shared).socks.insert(
            id,
            super::actor::Durable {
                actor: actor.clone(),
                want_hib,
                opened: false,
                last_seq: 0,
                last_index: 0,
                gw_closed: false,
                actor_closed: false,
                acked_by: None,
            },
        );
        let w = self.next_waiter;
        self.next_waiter += 1;
        self.socks.insert(
            id,
            GwSock {
                id,
                actor: actor.clone(),
                req: super::actor::req_of(id),
                socket: TunnelSocket::new(self.cfg.limits),
                link: Link::Resolving { waiter: w },
                open_sent: false,
                upgraded: false,
                next_seq: 1,
                queue: VecDeque::new(),
                offered: 0,
                parked: None,
                closed: None,
            },
        );
        self.waiters.insert(w, WaitFor::Open(id));
        let (res, actions) = self.engine.resolve(&actor, w, self.now);
        match res {
            Resolve::Ready(route) => {
                self.waiters.remove(&w);
                self.send_open(id, route);
            }
            Resolve::Pending { .. } => {}
            Resolve::NotFound => {
                self.waiters.remove(&w);
                self.refuse(id, "actor not found");
            }
        }
        self.run_actions(actions);
    }

    /// The client produces one more message (sent by [`World::pump`]).
    pub fn client_enqueue(&mut self, id: u32, pad: usize) {
        let Some(s) = self.socks.get_mut(&id) else {
            return;
        };
        let seq = s.next_seq;
        s.next_seq += 1;
        let data = super::actor::payload(id, seq, pad);
        if let Some(s) = self.socks.get_mut(&id) {
            s.queue.push_back((seq, data));
        }
        self.stats.messages_offered += 1;
    }

    /// Hands the client's queued messages to the gateway until the socket pauses.
    pub fn pump(&mut self, id: u32) {
        let (trace, step, ms) = (self.trace, self.step, self.now.duration_since(self.t0));
        loop {
            let Some(s) = self.socks.get_mut(&id) else {
                return;
            };
            if s.is_closed() || !s.upgraded || s.socket.is_paused() {
                return;
            }
            let Some((seq, data)) = s.queue.pop_front() else {
                return;
            };
            let len = data.len();
            let fits_global = self.budget.fits(len as u64);
            let out = s
                .socket
                .on_client_message(data, true, self.now, &mut self.budget);
            if trace {
                let o = match &out {
                    ClientMsg::Send { index, .. } => format!("Send index {index}"),
                    other => format!("{other:?}"),
                };
                eprintln!("[{step} t={ms:?}] socket {id} seq {seq} ({len}B): {o}");
            }
            match out {
                ClientMsg::Send { index, data, .. } => {
                    s.offered = seq;
                    self.check_index(id, seq, index);
                    self.send_ws(id, index, data);
                }
                ClientMsg::Held { index } => {
                    s.offered = seq;
                    self.check_index(id, seq, index);
                    self.maybe_wake(id);
                }
                ClientMsg::Paused => {
                    s.offered = seq;
                    s.parked = Some((seq, len));
                    self.stats.pauses += 1;
                    return;
                }
                ClientMsg::Close(r) => {
                    let legit = r == CloseReason::PENDING_LIMIT && !fits_global;
                    self.close_sock(id, format!("gateway refused seq {seq}: {r:?}"), legit);
                    return;
                }
                ClientMsg::NotReady { .. } => {
                    self.fail(format!(
                        "socket {id}: NotReady although the glue never offers while paused"
                    ));
                    return;
                }
                ClientMsg::Dropped => {
                    self.fail(format!("socket {id}: message dropped by a live socket"));
                    return;
                }
            }
        }
    }

    fn check_index(&mut self, id: u32, seq: u32, index: u16) {
        if index != seq as u16 {
            self.fail(format!(
                "socket {id}: seq {seq} got index {index} (indices must follow the client order)"
            ));
        }
    }

    /// The client closes its socket (SPEC §2.4.6, §2.6).
    pub fn client_close(&mut self, id: u32) {
        let Some(s) = self.socks.get(&id) else {
            return;
        };
        let close = tunnel(
            s.req,
            s.socket.next_index(),
            ToClientTunnelMessageKind::WebSocketClose(ToClientWebSocketClose {
                code: Some(1000),
                reason: Some("sim.client_close".into()),
            }),
        );
        match s.link {
            Link::Closed => return,
            Link::Opening { conn, .. } => {
                self.send_to_conn(conn, close);
            }
            Link::Attached { runner_idx } => {
                if let Some(conn) = self.gw_runners.get(&runner_idx).copied() {
                    self.send_to_conn(conn, close);
                }
            }
            Link::Disconnected { runner_idx } => self.owed_closes.push((runner_idx, close)),
            // Nothing is owed to a runner that does not host the socket.
            Link::Resolving { .. } | Link::Hibernating { .. } => {}
        }
        self.close_sock(id, "client closed".into(), true);
    }

    /// Frees everything of a socket. An illegitimate close is a failure.
    pub fn close_sock(&mut self, id: u32, why: String, legit: bool) {
        let Some(s) = self.socks.get_mut(&id) else {
            return;
        };
        if s.is_closed() {
            return;
        }
        let waiter = match s.link {
            Link::Resolving { waiter }
            | Link::Hibernating {
                waiter: Some(waiter),
            } => Some(waiter),
            _ => None,
        };
        s.socket.close(&mut self.budget);
        s.link = Link::Closed;
        s.queue.clear();
        s.parked = None;
        s.closed = Some(why.clone());
        let (actor, req) = (s.actor.clone(), s.hib_req());
        let desc = s.describe();
        if let Some(w) = waiter {
            self.engine.cancel_waiter(w);
            self.waiters.remove(&w);
        }
        self.engine.hibernating_remove(&actor, req);
        let actor_closed = {
            let mut st = lock(&self.shared);
            match st.socks.get_mut(&id) {
                Some(d) => {
                    d.gw_closed = true;
                    d.actor_closed
                }
                None => false,
            }
        };
        // Whatever ends a socket the actor closed is fine (its close may have been lost).
        let legit = legit || actor_closed;
        self.log(|| format!("close socket {id}: {why} (legit {legit})"));
        if legit {
            self.stats.legit_closes += 1;
        } else {
            self.fail(format!("socket {id} closed illegitimately: {why} [{desc}]"));
        }
    }

    fn refuse(&mut self, id: u32, why: &str) {
        self.stats.refusals += 1;
        self.close_sock(id, format!("refused: {why}"), true);
    }

    /// A wake for a resolve with no socket behind it (an HTTP request, an alarm check).
    pub fn dummy_resolve(&mut self, actor: &str) {
        let w = self.next_waiter;
        self.next_waiter += 1;
        self.waiters.insert(w, WaitFor::Dummy);
        let (res, actions) = self.engine.resolve(actor, w, self.now);
        if !matches!(res, Resolve::Pending { .. }) {
            self.waiters.remove(&w);
        }
        self.run_actions(actions);
    }

    // -----------------------------------------------------------------------------------------
    // Toward the runner

    fn send_open(&mut self, id: u32, route: Route) {
        let Some(s) = self.socks.get_mut(&id) else {
            return;
        };
        if s.open_sent {
            self.fail(format!("socket {id}: the gateway sent WebSocketOpen twice"));
            return;
        }
        s.open_sent = true;
        s.link = Link::Opening {
            runner_idx: route.runner_idx,
            conn: route.conn,
            since: self.now,
        };
        let open = tunnel(
            s.req,
            s.socket.take_open_index(),
            ToClientTunnelMessageKind::WebSocketOpen(ToClientWebSocketOpen {
                actor_id: route.actor_id.clone(),
                path: "/sim".into(),
                headers: StrMap(vec![("sec-websocket-protocol".into(), "rivet".into())]),
            }),
        );
        self.send_to_conn(route.conn, open);
    }

    fn send_ws(&mut self, id: u32, index: u16, data: Bytes) {
        let Some(s) = self.socks.get(&id) else {
            return;
        };
        let Link::Attached { runner_idx } = s.link else {
            let l = s.link;
            self.fail(format!("socket {id}: Send outcome while {l:?}"));
            return;
        };
        let Some(conn) = self.gw_runners.get(&runner_idx).copied() else {
            self.fail(format!(
                "socket {id}: attached to runner {runner_idx} that has no connection"
            ));
            return;
        };
        let msg = tunnel(
            s.req,
            index,
            ToClientTunnelMessageKind::WebSocketMessage(ToClientWebSocketMessage {
                data: data.to_vec(),
                binary: true,
            }),
        );
        self.send_to_conn(conn, msg);
    }

    /// Sends the window again, oldest first, original indices (SPEC §2.5 Replay).
    fn replay(&mut self, id: u32, runner_idx: RunnerIdx) {
        let Some(conn) = self.gw_runners.get(&runner_idx).copied() else {
            self.fail(format!(
                "socket {id}: replay to runner {runner_idx} that has no connection"
            ));
            return;
        };
        let now = self.now;
        let Some(s) = self.socks.get_mut(&id) else {
            return;
        };
        let entries: Vec<(u16, Bytes)> = s
            .socket
            .on_runner_attached(now)
            .map(|e| (e.index, e.data.clone()))
            .collect();
        s.link = Link::Attached { runner_idx };
        let req = s.req;
        self.log(|| {
            format!(
                "replay socket {id} to runner {runner_idx}: {} messages",
                entries.len()
            )
        });
        self.stats.replays += 1;
        self.stats.replayed_messages += entries.len() as u64;
        self.mix((id, entries.len()));
        for (index, data) in entries {
            let msg = tunnel(
                req,
                index,
                ToClientTunnelMessageKind::WebSocketMessage(ToClientWebSocketMessage {
                    data: data.to_vec(),
                    binary: true,
                }),
            );
            self.send_to_conn(conn, msg);
        }
    }

    fn upsert_record(&mut self, id: u32) {
        if let Some(s) = self.socks.get(&id) {
            let (actor, req) = (s.actor.clone(), s.hib_req());
            self.engine.hibernating_upsert(&actor, req, self.now);
        }
    }

    fn enter_hibernation(&mut self, id: u32) {
        if let Some(s) = self.socks.get_mut(&id) {
            s.link = Link::Hibernating { waiter: None };
        }
        self.stats.hibernations += 1;
        if self.cfg.naive_records {
            self.upsert_record(id);
        }
        self.maybe_wake(id);
    }

    /// A hibernating socket with something to deliver wakes its actor (SPEC §2.6).
    fn maybe_wake(&mut self, id: u32) {
        let Some(s) = self.socks.get(&id) else {
            return;
        };
        let has_data = s.socket.pending_len() > 0 || s.socket.is_paused();
        if s.link != (Link::Hibernating { waiter: None }) || !has_data {
            return;
        }
        let actor = s.actor.clone();
        let w = self.next_waiter;
        self.next_waiter += 1;
        self.waiters.insert(w, WaitFor::Wake(id));
        let (res, actions) = self.engine.resolve(&actor, w, self.now);
        match res {
            Resolve::Pending { .. } => {
                if let Some(s) = self.socks.get_mut(&id) {
                    s.link = Link::Hibernating { waiter: Some(w) };
                }
            }
            // Running without this socket: the runner handed it back and its stop follows;
            // the wake happens at `ActorStopped`.
            Resolve::Ready(_) => {
                self.waiters.remove(&w);
            }
            Resolve::NotFound => {
                self.waiters.remove(&w);
                self.fail(format!("socket {id}: its actor vanished"));
            }
        }
        self.run_actions(actions);
    }

    fn on_ack(&mut self, id: u32, index: u16) {
        let cap = self.budget.cap;
        let used_before = self.budget.used;
        let Some(s) = self.socks.get_mut(&id) else {
            return;
        };
        if s.is_closed() {
            return;
        }
        let parked = s.parked;
        let r = s.socket.on_ack(index, self.now, &mut self.budget);
        if r.ignored.is_some() {
            self.stats.acks_ignored += 1;
        }
        match r.resumed {
            None => {}
            Some(ClientMsg::Send { index, data, .. }) => {
                s.parked = None;
                let seq = parked.map_or(0, |p| p.0);
                self.check_index(id, seq, index);
                self.send_ws(id, index, data);
            }
            Some(ClientMsg::Held { index }) => {
                s.parked = None;
                let seq = parked.map_or(0, |p| p.0);
                self.check_index(id, seq, index);
                self.maybe_wake(id);
            }
            Some(ClientMsg::Close(reason)) => {
                let len = parked.map_or(0, |p| p.1) as u64;
                let at_admission = used_before.saturating_sub(r.freed_bytes as u64);
                let legit =
                    reason == CloseReason::PENDING_LIMIT && at_admission.saturating_add(len) > cap;
                self.close_sock(id, format!("parked message refused: {reason:?}"), legit);
                return;
            }
            Some(other) => {
                self.fail(format!("socket {id}: unexpected resumed outcome {other:?}"));
                return;
            }
        }
        if r.resume_reading {
            self.pump(id);
        }
    }

    // -----------------------------------------------------------------------------------------
    // From the runner

    /// A tunnel message from runner connection `cref`.
    pub fn tunnel_from_runner(&mut self, cref: ConnRef, t: ToServerTunnelMessage) {
        let key = crate::runner::RequestKey {
            gateway_id: t.message_id.gateway_id,
            request_id: t.message_id.request_id,
        };
        let Some(id) = sock_of(&key) else {
            return;
        };
        // Only the runner's current connection speaks (SPEC §1.4.2).
        let Some(idx) = self
            .gw_runners
            .iter()
            .find(|(_, c)| **c == cref)
            .map(|(i, _)| *i)
        else {
            return;
        };
        let Some(s) = self.socks.get_mut(&id) else {
            return;
        };
        if s.is_closed() {
            return;
        }
        match t.message_kind {
            ToServerTunnelMessageKind::WebSocketOpen(o) => {
                let Link::Opening {
                    runner_idx, conn, ..
                } = s.link
                else {
                    return;
                };
                if conn != cref {
                    return;
                }
                s.socket.on_runner_open(o.can_hibernate);
                s.upgraded = true;
                s.link = Link::Attached { runner_idx };
                let want = lock(&self.shared).socks.get(&id).map(|d| d.want_hib);
                if want != Some(o.can_hibernate) {
                    self.fail(format!(
                        "socket {id}: runner answered canHibernate {} but the actor chose {want:?}",
                        o.can_hibernate
                    ));
                }
                if o.can_hibernate && !self.cfg.naive_records {
                    self.upsert_record(id);
                }
            }
            ToServerTunnelMessageKind::WebSocketMessageAck(a) => self.on_ack(id, a.index),
            ToServerTunnelMessageKind::WebSocketClose(c) => match s.link {
                Link::Opening { conn, .. } if conn == cref => {
                    let why = format!("runner closed while opening: {:?} {:?}", c.code, c.reason);
                    self.refuse(id, &why);
                }
                Link::Attached { runner_idx } if runner_idx == idx => {
                    if c.hibernate && s.socket.is_hibernatable() {
                        match s
                            .socket
                            .on_runner_detached(DetachCause::HibernateRequested, &mut self.budget)
                        {
                            Detach::Keep => self.enter_hibernation(id),
                            other => self.fail(format!(
                                "socket {id}: hibernatable socket answered {other:?} to hibernate"
                            )),
                        }
                    } else {
                        let legit = c.reason.as_deref() == Some(ACTOR_CLOSE_REASON);
                        let why = format!("runner closed it: {:?} {:?}", c.code, c.reason);
                        self.close_sock(id, why, legit);
                    }
                }
                _ => {}
            },
            // Data for the client, HTTP kinds: nothing to check here.
            _ => {}
        }
    }

    // -----------------------------------------------------------------------------------------
    // Engine actions

    /// Applies engine actions in order (actions produced while applying go to the back).
    pub fn run_actions(&mut self, actions: Vec<Action>) {
        self.actions.extend(actions);
        if self.applying {
            return;
        }
        self.applying = true;
        while let Some(a) = self.actions.pop_front() {
            self.apply_action(a);
        }
        self.applying = false;
    }

    fn apply_action(&mut self, a: Action) {
        self.log(|| match &a {
            Action::Send { conn, msg } => format!("engine -> conn {}: {msg:?}", conn.gen),
            other => format!("engine: {other:?}"),
        });
        match a {
            Action::Send { conn, msg } => {
                if let ToClient::Commands(cmds) = &msg {
                    self.record_starts(cmds);
                }
                self.send_to_conn(conn, msg);
            }
            Action::CloseRunner { conn, .. } => self.gateway_close_runner(conn),
            Action::RunnerAttached { runner_idx, conn } => self.runner_attached(runner_idx, conn),
            Action::RunnerDetached { runner_idx } => self.runner_detached(runner_idx),
            Action::RunnerLost { runner_idx } => {
                self.stats.runners_lost += 1;
                self.gw_runners.remove(&runner_idx);
                self.owed_closes.retain(|(i, _)| *i != runner_idx);
                let stuck: Vec<u32> = self
                    .socks
                    .iter()
                    .filter(|(_, s)| s.link == Link::Disconnected { runner_idx })
                    .map(|(i, _)| *i)
                    .collect();
                for id in stuck {
                    self.fail(format!(
                        "socket {id}: still on runner {runner_idx} when it was lost (no \
                         ActorStopped for its actor)"
                    ));
                    self.enter_hibernation(id);
                }
            }
            Action::ActorRunning {
                actor_id,
                generation,
                runner_idx,
            } => self.actor_running(&actor_id, generation, runner_idx),
            Action::ActorStopped { actor_id } => self.actor_stopped(&actor_id),
            Action::ActorDestroyed { actor_id } => {
                self.fail(format!(
                    "actor {actor_id} destroyed, the simulation never asks"
                ));
            }
            Action::Resolved { waiter, result } => self.resolved(waiter, result),
        }
    }

    fn record_starts(&mut self, cmds: &[crate::protocol::CommandWrapper]) {
        for c in cmds {
            let Command::StartActor(s) = &c.inner else {
                continue;
            };
            let ids: Vec<u32> = s
                .hibernating_requests
                .iter()
                .filter(|h| h.gateway_id == GATEWAY_ID)
                .map(|h| u32::from_le_bytes(h.request_id))
                .collect();
            for id in &ids {
                let owner = self.socks.get(id).map(|s| s.actor.clone());
                if owner.as_deref() != Some(c.checkpoint.actor_id.as_str()) {
                    self.fail(format!(
                        "start of {} g{} lists socket {id} of {owner:?}",
                        c.checkpoint.actor_id, c.checkpoint.generation
                    ));
                }
            }
            self.start_lists.insert(
                (c.checkpoint.actor_id.clone(), c.checkpoint.generation),
                ids,
            );
        }
    }

    fn socks_where(&self, f: impl Fn(&GwSock) -> bool) -> Vec<u32> {
        self.socks
            .iter()
            .filter(|(_, s)| f(s))
            .map(|(i, _)| *i)
            .collect()
    }

    fn runner_attached(&mut self, runner_idx: RunnerIdx, conn: ConnRef) {
        // An eviction replaces the connection without a detach first: what went to the old
        // one may be lost, so treat it as a drop and replay below.
        if self
            .gw_runners
            .get(&runner_idx)
            .is_some_and(|old| *old != conn)
        {
            self.runner_detached(runner_idx);
        }
        self.gw_runners.insert(runner_idx, conn);
        let (owed, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.owed_closes)
            .into_iter()
            .partition(|(i, _)| *i == runner_idx);
        self.owed_closes = keep;
        for (_, msg) in owed {
            self.send_to_conn(conn, msg);
        }
        for id in self.socks_where(|s| s.link == Link::Disconnected { runner_idx }) {
            self.replay(id, runner_idx);
        }
    }

    fn runner_detached(&mut self, runner_idx: RunnerIdx) {
        self.gw_runners.remove(&runner_idx);
        let ids = self.socks_where(|s| match s.link {
            Link::Attached { runner_idx: r } | Link::Opening { runner_idx: r, .. } => {
                r == runner_idx
            }
            _ => false,
        });
        for id in ids {
            let Some(s) = self.socks.get_mut(&id) else {
                continue;
            };
            if matches!(s.link, Link::Opening { .. }) {
                self.refuse(id, "runner disconnected while opening");
                continue;
            }
            match s
                .socket
                .on_runner_detached(DetachCause::RunnerLost, &mut self.budget)
            {
                Detach::Keep => s.link = Link::Disconnected { runner_idx },
                Detach::Close(r) => self.close_sock(id, format!("runner detached: {r:?}"), true),
                Detach::AlreadyClosed => self.fail(format!("socket {id}: closed but attached")),
            }
        }
    }

    fn actor_running(&mut self, actor: &str, generation: u32, runner_idx: RunnerIdx) {
        let listed = self
            .start_lists
            .get(&(actor.to_string(), generation))
            .cloned()
            .unwrap_or_default();
        let ids =
            self.socks_where(|s| s.actor == actor && matches!(s.link, Link::Hibernating { .. }));
        for id in ids {
            if !listed.contains(&id) {
                let d = self.socks[&id].describe();
                self.fail(format!(
                    "socket {id} is hibernating when {actor} g{generation} becomes running, but \
                     the start did not list it (listed {listed:?}) [{d}]"
                ));
                continue;
            }
            if let Link::Hibernating { waiter: Some(w) } = self.socks[&id].link {
                self.engine.cancel_waiter(w);
                self.waiters.remove(&w);
            }
            // Restored by the runner from the start command: no second WebSocketOpen.
            self.replay(id, runner_idx);
        }
    }

    fn actor_stopped(&mut self, actor: &str) {
        for id in self.socks_where(|s| s.actor == actor && !s.is_closed()) {
            let Some(s) = self.socks.get_mut(&id) else {
                continue;
            };
            match s.link {
                Link::Closed | Link::Resolving { .. } => {}
                Link::Opening { .. } => self.refuse(id, "actor stopped while opening"),
                Link::Attached { .. } | Link::Disconnected { .. } => {
                    match s
                        .socket
                        .on_runner_detached(DetachCause::ActorStopped, &mut self.budget)
                    {
                        Detach::Keep => self.enter_hibernation(id),
                        Detach::Close(r) => {
                            self.close_sock(id, format!("actor stopped: {r:?}"), true)
                        }
                        Detach::AlreadyClosed => {
                            self.fail(format!("socket {id}: closed but attached"))
                        }
                    }
                }
                Link::Hibernating { .. } => self.maybe_wake(id),
            }
        }
    }

    fn resolved(&mut self, waiter: u64, result: Result<Route, ResolveError>) {
        let Some(wf) = self.waiters.remove(&waiter) else {
            return;
        };
        match wf {
            WaitFor::Open(id) => {
                let resolving = self
                    .socks
                    .get(&id)
                    .is_some_and(|s| s.link == Link::Resolving { waiter });
                if !resolving {
                    return;
                }
                match result {
                    Ok(route) => self.send_open(id, route),
                    Err(e) => self.refuse(id, &format!("resolve failed: {e:?}")),
                }
            }
            WaitFor::Wake(id) => {
                if let Some(s) = self.socks.get_mut(&id) {
                    if s.link
                        == (Link::Hibernating {
                            waiter: Some(waiter),
                        })
                    {
                        // Attached at `ActorRunning` if it was restored; otherwise the actor
                        // runs without it (it was handed back) and the wake follows its stop.
                        // After a timeout, wait again at once.
                        s.link = Link::Hibernating { waiter: None };
                        if result.is_err() {
                            self.maybe_wake(id);
                        }
                    }
                }
            }
            WaitFor::Dummy => {}
        }
    }

    // -----------------------------------------------------------------------------------------
    // Timers

    pub fn gateway_timers(&mut self) {
        let now = self.now;
        // Ack timeout: a healthy runner was given the chance to acknowledge (see `advance`).
        for id in self.socks_where(|s| !s.is_closed()) {
            let timeout = self.cfg.ack_timeout;
            let Some(s) = self.socks.get_mut(&id) else {
                continue;
            };
            if let Some(r) = s.socket.expire_if_not_acked(now, timeout, &mut self.budget) {
                self.close_sock(id, format!("{r:?}"), false);
            }
        }
        let open_timeout = self.cfg.open_timeout;
        for id in self.socks_where(
            |s| matches!(s.link, Link::Opening { since, .. } if since + open_timeout <= now),
        ) {
            self.refuse(id, "open timeout");
        }
        if now.duration_since(self.last_refresh) >= self.cfg.refresh_every {
            self.last_refresh = now;
            let naive = self.cfg.naive_records;
            for id in self.socks_where(|s| {
                !s.is_closed()
                    && s.socket.is_hibernatable()
                    && (!naive || matches!(s.link, Link::Hibernating { .. }))
            }) {
                self.upsert_record(id);
            }
        }
        for id in self.socks_where(|s| s.link == Link::Hibernating { waiter: None }) {
            self.maybe_wake(id);
        }
    }
}
