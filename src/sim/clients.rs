//! Simulated clients: each opens a WebSocket to an actor through a gateway shard (the shell's
//! steps: ask where the actor is, open the tunnel, upgrade once the runner accepted), sends
//! numbered messages while the gateway reads it, reads what the gateway writes (answering
//! its close), and closes at random. Every close it sees is checked: only the legitimate
//! ones (its own, the actor's, a refusal before the upgrade, a non-hibernatable socket
//! losing its runner or actor, the global cap really exceeded) may happen.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::actor::{lock, ACTOR_CLOSE_REASON};
use super::network::{client_reader, Peer};
use super::world::World;
use crate::gateway::route::resolved;
use crate::gateway::{ConnId, ConnKind, ControlMsg, OpenPhase, Pause, Reply};
use crate::protocol::StrMap;
use crate::tunnel::Budget;
use crate::ws::reader::{WsEvent, WsReader};

/// Where a client's WebSocket stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for the control plane to say where its actor is.
    Resolving {
        waiter: u32,
    },
    /// The tunnel is open at the gateway; the upgrade waits for the runner's answer.
    Opening {
        conn: ConnId,
        since: Instant,
    },
    /// Upgraded.
    Open {
        conn: ConnId,
    },
    Closed,
}

pub(crate) struct Client {
    pub id: u32,
    pub actor: String,
    pub shard: usize,
    pub phase: Phase,
    /// Next sequence number to generate.
    pub next_seq: u32,
    /// Messages the client has not handed to the gateway yet (it stops while paused).
    pub queue: VecDeque<(u32, Bytes)>,
    /// Highest sequence number the gateway consumed (sent, held or parked).
    pub offered: u32,
    /// The global cap could not take the last message offered, or a parked one.
    pub over_global: bool,
    pub closed: Option<String>,
    /// The last of the actor's messages the client received (0: none).
    pub last_in: u32,
    reader: WsReader,
    buf: BytesMut,
}

impl Client {
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open { .. })
    }

    /// The client may close now (a client waiting for its upgrade is not read by the
    /// gateway, so its close would only be seen after).
    pub fn may_close(&self) -> bool {
        matches!(self.phase, Phase::Resolving { .. } | Phase::Open { .. })
    }

    pub fn conn(&self) -> Option<ConnId> {
        match self.phase {
            Phase::Opening { conn, .. } | Phase::Open { conn } => Some(conn),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "#{} actor {} shard {} {:?} queued {} offered {} closed {:?}",
            self.id,
            self.actor,
            self.shard,
            self.phase,
            self.queue.len(),
            self.offered,
            self.closed
        )
    }
}

impl World {
    /// A client asks a random shard to open a WebSocket to actor number `a`.
    pub fn client_open(&mut self, a: usize, want_hib: bool) {
        use rand::Rng;
        let id = self.next_client;
        self.next_client += 1;
        self.stats.sockets += 1;
        let actor = self.actor_ids[a].clone();
        let shard = self.rng.random_range(0..self.gw.len());
        lock(&self.shared).socks.insert(
            id,
            super::actor::Durable {
                actor: actor.clone(),
                gw: super::actor::gateway_id(shard / self.cfg.shards),
                req: [0; 4],
                want_hib,
                opened: false,
                last_seq: 0,
                last_index: 0,
                gw_closed: false,
                actor_closed: false,
                acked_by: None,
                sent: 0,
            },
        );
        let waiter = self.ask_resolve(shard, &actor, Some(id));
        self.clients.insert(
            id,
            Client {
                id,
                actor,
                shard,
                phase: Phase::Resolving { waiter },
                next_seq: 1,
                queue: VecDeque::new(),
                offered: 0,
                over_global: false,
                closed: None,
                last_in: 0,
                reader: client_reader(),
                buf: BytesMut::new(),
            },
        );
        self.pump();
    }

    /// The shell asks the control plane where `actor` is (waking it), for client `who`.
    fn ask_resolve(&mut self, shard: usize, actor: &str, who: Option<u32>) -> u32 {
        let actor_id = actor.to_string();
        let t = &self.gw[shard].config().timeouts;
        let wait = crate::config::ms(t.actor_wake_ms + 1000);
        let waiter = self.gw[shard].ask(
            |waiter| ControlMsg::Resolve { actor_id, waiter },
            wait,
            self.now,
        );
        self.waiters.insert((shard, waiter), who);
        waiter
    }

    /// A wake with no socket behind it (an HTTP request's).
    pub fn dummy_resolve(&mut self, actor: &str) {
        use rand::Rng;
        let shard = self.rng.random_range(0..self.gw.len());
        self.ask_resolve(shard, actor, None);
        self.pump();
    }

    /// The control plane's answer to a shard's question.
    pub(super) fn answered(&mut self, shard: usize, waiter: u32, reply: Option<Reply>) {
        let Some(Some(id)) = self.waiters.remove(&(shard, waiter)) else {
            return;
        };
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        if c.phase != (Phase::Resolving { waiter }) {
            return;
        }
        let routed = match resolved(reply) {
            Ok(r) => r,
            Err(r) => {
                self.refuse(id, &format!("resolve failed: {}", r.code));
                return;
            }
        };
        let headers = StrMap(vec![("sec-websocket-protocol".into(), "rivet".into())]);
        let now = self.now;
        let conn = self.gw[shard].open_client(&routed, "/sim".into(), headers, now);
        self.peers.insert((shard, conn), Peer::Client(id));
        let req = self.gw[shard].request_id(conn).expect("just opened");
        {
            let mut store = lock(&self.shared);
            let gw = super::actor::gateway_id(shard / self.cfg.shards);
            store.reqs.entry((gw, req)).or_default().push(id);
            if let Some(d) = store.socks.get_mut(&id) {
                d.req = req;
            }
        }
        if let Some(c) = self.clients.get_mut(&id) {
            c.phase = Phase::Opening { conn, since: now };
        }
        self.log(|| format!("client {id} opens on shard {shard} as request {req:?} ({conn:?})"));
        self.pump();
    }

    /// The gateway woke the client's task: its open exchange ended, or a pause did.
    pub(super) fn client_woken(&mut self, id: u32) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        let shard = c.shard;
        match c.phase {
            Phase::Opening { conn, .. } => match self.gw[shard].open_phase(conn) {
                Some(OpenPhase::Accepted) => {
                    let hib = match self.gw[shard].kind(conn) {
                        Some(ConnKind::Client(cc)) => cc.socket.is_hibernatable(),
                        _ => false,
                    };
                    let want = lock(&self.shared).socks.get(&id).map(|d| d.want_hib);
                    if want != Some(hib) {
                        self.fail(format!(
                            "socket {id}: the gateway holds canHibernate {hib} but the actor \
                             chose {want:?}"
                        ));
                    }
                    self.call(shard, |g, _| g.client_upgraded(conn));
                    if let Some(c) = self.clients.get_mut(&id) {
                        c.phase = Phase::Open { conn };
                    }
                    self.client_send(id);
                }
                Some(OpenPhase::Refused(r)) => {
                    self.call(shard, |g, _| g.client_refused(conn));
                    self.peers.remove(&(shard, conn));
                    self.refuse(id, r.code);
                }
                _ => {}
            },
            Phase::Open { .. } => self.client_send(id),
            _ => {}
        }
    }

    /// The client produces one more message (sent by [`World::client_send`]).
    pub fn client_enqueue(&mut self, id: u32, pad: usize) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let seq = c.next_seq;
        c.next_seq += 1;
        c.queue
            .push_back((seq, super::actor::payload(id, seq, pad)));
        self.stats.messages_offered += 1;
    }

    /// Hands the client's queued messages to the gateway while it reads the client.
    pub fn client_send(&mut self, id: u32) {
        loop {
            let Some(c) = self.clients.get_mut(&id) else {
                return;
            };
            let Phase::Open { conn } = c.phase else {
                return;
            };
            let shard = c.shard;
            if self.gw[shard].client_paused(conn).is_some() {
                return;
            }
            let Some(c) = self.clients.get_mut(&id) else {
                return;
            };
            let Some((seq, data)) = c.queue.pop_front() else {
                return;
            };
            let len = data.len() as u64;
            c.offered = seq;
            let budget: Budget = self.gw[shard].budget();
            let c = self.clients.get_mut(&id).expect("checked");
            c.over_global = !budget.fits(len);
            self.log(|| format!("client {id} sends seq {seq} ({len}B)"));
            let ev = WsEvent::Message { text: false, data };
            self.call(shard, |g, now| g.handle_client_frame(conn, ev, now));
            if self.gw[shard].client_paused(conn) == Some(Pause::Window) {
                self.stats.pauses += 1;
                return;
            }
        }
    }

    /// The client reads what the gateway wrote to it (from its upgrade on: before, the shell
    /// has no writer for it and what the core queued is never sent).
    pub(super) fn flush_client(&mut self, id: u32) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let Phase::Open { conn } = c.phase else {
            return;
        };
        let shard = c.shard;
        let mut batch = Vec::new();
        self.gw[shard].writer_turn(conn, &mut batch, usize::MAX);
        let bytes: usize = batch.iter().map(Bytes::len).sum();
        let c = self.clients.get_mut(&id).expect("checked");
        for b in &batch {
            c.buf.extend_from_slice(b);
        }
        let mut closes = Vec::new();
        let mut wrong = Vec::new();
        loop {
            match c.reader.next(&mut c.buf) {
                Ok(Some(WsEvent::Close { code, reason })) => closes.push((code, reason)),
                // The actor's messages: at most once, in order, only this socket's.
                Ok(Some(WsEvent::Message { data, .. })) if self.cfg.actor_sends => {
                    match super::actor::parse(&data) {
                        Some((sock, n)) if sock == id && n > c.last_in => c.last_in = n,
                        Some((sock, n)) if sock == id => wrong.push(format!(
                            "client {id}: the actor's message {n} arrived after its message {} \
                             (duplicate or reordered)",
                            c.last_in
                        )),
                        other => wrong.push(format!(
                            "client {id}: got a message of another socket {other:?} (misrouted)"
                        )),
                    }
                    self.stats.actor_messages += 1;
                }
                // Idle pings are off.
                Ok(Some(other)) => {
                    let e = format!("client {id}: unexpected frame from the gateway {other:?}");
                    self.fail(e);
                    return;
                }
                Ok(None) => break,
                Err(e) => {
                    self.fail(format!("client {id}: bad frame from the gateway: {e:?}"));
                    return;
                }
            }
        }
        for w in wrong {
            self.fail(w);
        }
        if bytes > 0 {
            self.gw[shard].written(conn, bytes);
        }
        for (code, reason) in closes {
            self.gateway_closed_client(id, conn, code, reason);
        }
    }

    /// The gateway closed the client's WebSocket: judge the reason, answer the close, and
    /// the connection ends.
    fn gateway_closed_client(&mut self, id: u32, conn: ConnId, code: Option<u16>, reason: Bytes) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        let shard = c.shard;
        if !c.is_closed() {
            let why = String::from_utf8_lossy(&reason).into_owned();
            let legit = match why.as_str() {
                ACTOR_CLOSE_REASON | "actor.stopped" | "ws.runner_disconnected" => true,
                "guard.websocket_pending_limit_reached" => {
                    c.over_global || self.cfg.global_cap < Budget::DEFAULT_PROCESS_CAP
                }
                _ => false,
            };
            self.close_client(id, format!("gateway closed it: {code:?} {why}"), legit);
        }
        // The client answers the close; the handshake is complete and the connection ends.
        let ev = WsEvent::Close {
            code,
            reason: Bytes::new(),
        };
        self.call(shard, |g, now| g.handle_client_frame(conn, ev, now));
        self.client_gone(shard, conn);
    }

    /// The gateway reset the client's connection.
    pub(super) fn client_reset(&mut self, id: u32) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        let (shard, conn) = (c.shard, c.conn());
        self.close_client(id, "the gateway reset the connection".into(), false);
        if let Some(conn) = conn {
            self.client_gone(shard, conn);
        }
    }

    /// The client's connection ended: the shell's reader tells the core.
    fn client_gone(&mut self, shard: usize, conn: ConnId) {
        if self.peers.remove(&(shard, conn)).is_some() {
            self.call(shard, |g, now| g.client_ended(conn, now));
        }
    }

    /// The client closes its WebSocket (SPEC §2.4.6, §2.6).
    pub fn client_close(&mut self, id: u32) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        let shard = c.shard;
        match c.phase {
            Phase::Open { conn } => {
                self.close_client(id, "client closed".into(), true);
                let ev = WsEvent::Close {
                    code: Some(1000),
                    reason: Bytes::from_static(b"sim.client_close"),
                };
                self.call(shard, |g, now| g.handle_client_frame(conn, ev, now));
                // The gateway's answer completes the handshake; the connection ends.
                self.client_gone(shard, conn);
            }
            // Nothing reached a runner yet: the client just goes (the answer is ignored).
            Phase::Resolving { .. } => self.close_client(id, "client closed".into(), true),
            Phase::Opening { .. } | Phase::Closed => {}
        }
    }

    fn refuse(&mut self, id: u32, why: &str) {
        self.stats.refusals += 1;
        self.close_client(id, format!("refused: {why}"), true);
    }

    /// The client's socket is over. An illegitimate end is a failure.
    fn close_client(&mut self, id: u32, why: String, legit: bool) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.is_closed() {
            return;
        }
        c.phase = Phase::Closed;
        c.queue.clear();
        c.closed = Some(why.clone());
        let desc = c.describe();
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

    /// The naive record rule (`naive_records`): the shell registers a socket's record only
    /// once the socket hibernates.
    pub(super) fn register_late_records(&mut self) {
        if !self.cfg.naive_records {
            return;
        }
        let mut todo = Vec::new();
        for (id, c) in &self.clients {
            let Some(conn) = c.conn() else {
                continue;
            };
            if self.late_records.contains(id) {
                continue;
            }
            if let Some(ConnKind::Client(cc)) = self.gw[c.shard].kind(conn) {
                if cc.hibernation.is_some() {
                    let req = crate::protocol::HibernatingRequest {
                        gateway_id: super::actor::gateway_id(c.shard / self.cfg.shards),
                        request_id: cc.req,
                    };
                    todo.push((*id, c.actor.clone(), req));
                }
            }
        }
        for (id, actor, req) in todo {
            self.late_records.insert(id);
            let _ = self.engine.hibernating_upsert(&actor, req, self.now);
        }
    }
}
