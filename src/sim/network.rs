//! The network and the shell of the simulated world: runner processes and their connections
//! (one pair of FIFO queues per connection, lost when it drops), and what a shard's shell
//! does around its gateway core: carry out its outputs (flush a connection's queue onto the
//! network or to its client, wake a waiting client, reset, deliver to another shard's
//! mailbox, hand a message to the control plane, answer a question) until nothing is left.
//! The control plane is the shipped step ([`crate::plane`]) in front of the real engine.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rand::Rng;

use super::actor::{lock, SimRunner};
use super::world::World;
use crate::gateway::{ConnId, ControlMsg, Gateway, Next, Output, RunnerAccept, ShardMsg};
use crate::plane::{Stepped, To};
use crate::protocol::{Command, ToClient, ToServer};
use crate::ws::reader::{Role, WsEvent, WsReader, WsReaderConfig};

/// What a gateway connection is on the simulated side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    /// A runner connection (the simulation's connection number).
    Runner(u32),
    /// A client WebSocket (the client's id).
    Client(u32),
}

/// One runner WebSocket connection: both directions, in order.
pub(crate) struct Conn {
    pub runner: usize,
    /// The runner still holds this socket.
    pub runner_open: bool,
    /// The gateway has not yet processed its end.
    pub gw_open: bool,
    /// The gateway shard holding it, and its id there.
    pub shard: usize,
    pub gw: ConnId,
    /// In flight, with the moment each message was written.
    pub g2r: VecDeque<(Instant, ToClient)>,
    pub r2g: VecDeque<(Instant, ToServer)>,
    /// The runner's reader of the gateway's frames.
    reader: WsReader,
    buf: BytesMut,
}

/// A WebSocket reader for frames the gateway sends (unmasked).
pub(super) fn client_reader() -> WsReader {
    WsReader::new(WsReaderConfig {
        role: Role::Client,
        ..WsReaderConfig::default()
    })
}

impl World {
    // -----------------------------------------------------------------------------------------
    // The shell around the gateway cores

    /// Calls shard `s`'s core with the time now, then does what it asked.
    pub(super) fn call<R>(&mut self, s: usize, f: impl FnOnce(&mut Gateway, Instant) -> R) -> R {
        let r = f(&mut self.gw[s], self.now);
        self.pump();
        r
    }

    /// Carries out every core's outputs and delivers every mailbox until nothing moves. A
    /// call made while pumping leaves its outputs to the pump under way.
    pub(super) fn pump(&mut self) {
        if std::mem::replace(&mut self.pumping, true) {
            return;
        }
        self.pump_all();
        self.pumping = false;
    }

    fn pump_all(&mut self) {
        loop {
            for s in 0..self.gw.len() {
                while let Some(o) = self.gw[s].poll_output() {
                    self.outputs.push_back((s, o));
                }
            }
            let Some((s, o)) = self.outputs.pop_front() else {
                return;
            };
            self.apply_output(s, o);
        }
    }

    fn apply_output(&mut self, s: usize, o: Output) {
        match o {
            Output::Flush(id) => match self.peers.get(&(s, id)).copied() {
                Some(Peer::Runner(gen)) => self.flush_runner(gen),
                Some(Peer::Client(c)) => self.flush_client(c),
                None => {}
            },
            Output::Wake(id) => {
                if let Some(Peer::Client(c)) = self.peers.get(&(s, id)).copied() {
                    self.client_woken(c);
                }
            }
            Output::Reset(id) => match self.peers.get(&(s, id)).copied() {
                Some(Peer::Runner(gen)) => self.gateway_closed_runner(gen),
                Some(Peer::Client(c)) => self.client_reset(c),
                None => {}
            },
            // Into the same mailbox as the control plane's messages, in sending order, read
            // later (as a shard's one crossbeam channel is).
            Output::ToShard(to, msg) => {
                let now = self.now;
                let g = self.shard_at(self.node_of(s), to);
                self.control_mail[g].push_back((now, msg));
            }
            Output::ToNode(node, shard, msg) => self.send_to_node(s, node, shard, msg),
            Output::ToControl(msg) => self.control_from(self.node_of(s), *msg),
            Output::Reply(waiter, reply) => self.answered(s, waiter, reply),
            // The clock is read at every step of `advance`.
            Output::Rearm | Output::Drained => {}
        }
    }

    /// The control plane's handling of a shard's message (on the leader, placing).
    pub(super) fn control(&mut self, msg: ControlMsg) {
        if let ControlMsg::Hibernating {
            actor_id,
            req,
            keep,
        } = &msg
        {
            self.log(|| format!("record {actor_id} {:?} keep {keep}", req.request_id));
        }
        if self.cfg.naive_records {
            if let ControlMsg::Hibernating { keep: true, .. } | ControlMsg::HibernatingRefresh(_) =
                msg
            {
                // Held back: the naive shell registers records only at hibernation.
                return;
            }
        }
        let mut out = Vec::new();
        match self.plane.step(&mut self.engine, msg, self.now, &mut out) {
            Stepped::Done | Stepped::Init { .. } | Stepped::Closed(_) => {}
            Stepped::Caller(other) => match other {
                ControlMsg::RunnerMsg { msg, .. } => {
                    self.fail(format!("unexpected runner message for the store: {msg:?}"))
                }
                _ => self.fail("unexpected control message for the store".to_string()),
            },
        }
        self.post(out);
    }

    /// Sends the control plane's messages to their shards' mailboxes (delivered later), over
    /// the bus for other nodes' shards; what the engine wrote goes to the records.
    pub(super) fn post(&mut self, out: Vec<(To, ShardMsg)>) {
        for (to, msg) in out {
            if let ShardMsg::RunnerDetached { lost: true, .. } = msg {
                self.stats.runners_lost += 1;
            }
            self.log(|| format!("control -> {to:?}: {}", brief_shard_msg(&msg)));
            self.post_one(to, msg);
        }
        self.persist();
    }

    /// Shard `s` reads up to `n` of the control plane's messages.
    pub(super) fn deliver_control(&mut self, s: usize, n: usize) {
        for _ in 0..n {
            let Some((_, msg)) = self.control_mail[s].pop_front() else {
                return;
            };
            if let ShardMsg::ActorRunning {
                actor_id,
                generation,
                ..
            } = &msg
            {
                self.check_restores(s, actor_id, *generation);
            }
            self.call(s, |g, now| g.handle_shard_msg(msg, now));
        }
    }

    /// Delivers every control-plane message sent at or before `until` (all with `None`).
    pub(super) fn deliver_control_until(&mut self, until: Option<Instant>) -> bool {
        let mut moved = false;
        for s in 0..self.control_mail.len() {
            while self.control_mail[s]
                .front()
                .is_some_and(|(t, _)| until.is_none_or(|u| *t <= u))
            {
                self.deliver_control(s, 1);
                moved = true;
            }
        }
        moved
    }

    /// Every socket hibernating when `actor` g`generation` runs must have been listed in its
    /// start command (the shards reattach them; the runner restores only what was listed).
    fn check_restores(&mut self, shard: usize, actor: &str, generation: u32) {
        let listed = self
            .start_lists
            .get(&(actor.to_string(), generation))
            .cloned()
            .unwrap_or_default();
        let mut missing = Vec::new();
        for (id, c) in self.clients.iter().filter(|(_, c)| c.shard == shard) {
            let Some(conn) = c.conn() else {
                continue;
            };
            if let Some(crate::gateway::ConnKind::Client(cc)) = self.gw[c.shard].kind(conn) {
                let hibernating = cc.hibernation.is_some() && generation > cc.generation;
                if &*cc.actor_id == actor && hibernating && !listed.contains(id) {
                    missing.push(*id);
                }
            }
        }
        for id in missing {
            self.fail(format!(
                "socket {id} is hibernating when {actor} g{generation} becomes running, but \
                 the start did not list it (listed {listed:?})"
            ));
        }
    }

    /// Runs the engine's deadlines due now.
    pub(super) fn engine_tick(&mut self) {
        if self.cluster.placing() && self.engine.next_deadline().is_some_and(|t| t <= self.now) {
            let mut out = Vec::new();
            let actions = self.engine.tick(self.now);
            self.plane.deliver(actions, &mut out);
            self.post(out);
            self.pump();
        }
    }

    // -----------------------------------------------------------------------------------------
    // Runner processes and their connections

    /// Moves everything the runner produced onto its connection.
    pub fn runner_flush(&mut self, no: usize) {
        let r = &mut self.runners[no];
        r.drain_ctl();
        let mut out = Vec::new();
        r.core.take_out(&mut out);
        if out.is_empty() {
            return;
        }
        let msgs: Vec<ToServer> = out.into_iter().map(|m| m.into_to_server()).collect();
        // Note the sockets the actors closed themselves (before the message may be lost).
        for m in &msgs {
            if let ToServer::TunnelMessage(t) = m {
                if let crate::protocol::ToServerTunnelMessageKind::WebSocketClose(c) =
                    &t.message_kind
                {
                    if c.reason.as_deref() == Some(super::actor::ACTOR_CLOSE_REASON) {
                        let mut store = lock(&self.shared);
                        let id = &t.message_id;
                        let holder = store.reqs.get(&(id.gateway_id, id.request_id));
                        if let Some(id) = holder.and_then(|h| h.last()).copied() {
                            if let Some(d) = store.socks.get_mut(&id) {
                                d.actor_closed = true;
                            }
                        }
                    }
                }
            }
        }
        let Some(gen) = self.runners[no].conn else {
            return;
        };
        if let Some(c) = self.conns.get_mut(&gen) {
            if c.runner_open {
                let now = self.now;
                c.r2g.extend(msgs.into_iter().map(|m| (now, m)));
            }
        }
    }

    /// A runner process connects to a gateway shard of its choosing.
    pub fn runner_connect(&mut self, no: usize) {
        if self.runners[no].conn.is_some() {
            return;
        }
        let gen = self.next_conn;
        self.next_conn += 1;
        let shard = self.rng.random_range(0..self.gw.len());
        let accept = RunnerAccept {
            namespace: "default".into(),
            runner_key: self.runners[no].key.clone(),
            accept: String::new(),
        };
        let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 10_000 + no as u16));
        let id = self.gw[shard].runner_connected(accept, peer, self.now);
        self.peers.insert((shard, id), Peer::Runner(gen));
        self.conns.insert(
            gen,
            Conn {
                runner: no,
                runner_open: true,
                gw_open: true,
                shard,
                gw: id,
                g2r: VecDeque::new(),
                r2g: VecDeque::new(),
                reader: client_reader(),
                buf: BytesMut::new(),
            },
        );
        self.pump();
        self.runners[no].conn = Some(gen);
        self.runners[no].core.connection_opened();
        self.runner_flush(no);
    }

    /// The runner loses its connection; the gateway notices now or later.
    pub fn runner_drop(&mut self, no: usize, notice_now: bool) {
        let Some(gen) = self.runners[no].conn.take() else {
            return;
        };
        self.stats.runner_drops += 1;
        if let Some(c) = self.conns.get_mut(&gen) {
            c.runner_open = false;
            c.g2r.clear();
            c.r2g.clear();
        }
        self.runners[no].core.connection_lost(self.now);
        self.runner_flush(no);
        if notice_now {
            self.gateway_notice(gen);
        } else {
            self.pending_notices.push((gen, self.now));
        }
    }

    /// The runner process dies and a new one (a new runner key: a new identity) takes its
    /// place, disconnected. The old identity is lost after the threshold.
    pub fn runner_restart(&mut self, no: usize, notice_now: bool) {
        self.runner_drop(no, notice_now);
        self.incarnations += 1;
        let policy = self.runners[no].policy;
        self.runners[no] = SimRunner::new(
            no,
            self.incarnations,
            self.cfg.slots,
            policy,
            self.cfg.ack_on_restore,
            self.cfg.trust_runner_memory,
            &self.shared,
        );
        // Its actor instances died with it.
        let mut store = lock(&self.shared);
        store.handles.retain(|_, (r, _, _)| *r != no);
        for set in store.instances.values_mut() {
            set.retain(|(r, _)| *r != no);
        }
    }

    /// The gateway's reader of a runner connection sees it end.
    pub fn gateway_notice(&mut self, gen: u32) {
        self.pending_notices.retain(|(g, _)| *g != gen);
        let Some(c) = self.conns.get_mut(&gen) else {
            return;
        };
        if !std::mem::replace(&mut c.gw_open, false) {
            return;
        }
        let (shard, id, runner_open) = (c.shard, c.gw, c.runner_open);
        if !runner_open {
            self.conns.remove(&gen);
        }
        self.peers.remove(&(shard, id));
        self.call(shard, |g, _| g.runner_ended(id));
    }

    /// The gateway closed (or reset) a runner connection: the runner loses it, and the
    /// gateway's reader sees it end.
    fn gateway_closed_runner(&mut self, gen: u32) {
        let holder = self.conns.get(&gen).map(|c| (c.runner, c.runner_open));
        if let Some((no, true)) = holder {
            self.stats.runner_closes += 1;
            self.log(|| format!("the gateway closed runner {no}'s conn {gen}"));
            if self.runners[no].conn == Some(gen) {
                self.runners[no].conn = None;
                self.runners[no].core.connection_lost(self.now);
            }
            if let Some(c) = self.conns.get_mut(&gen) {
                c.runner_open = false;
                c.g2r.clear();
                c.r2g.clear();
            }
            self.runner_flush(no);
        }
        self.gateway_notice(gen);
    }

    /// The writer of a runner connection: what the core queued goes onto the network as
    /// runner-protocol messages; a close frame ends the connection.
    fn flush_runner(&mut self, gen: u32) {
        let Some(c) = self.conns.get_mut(&gen) else {
            return;
        };
        let (shard, id) = (c.shard, c.gw);
        let mut batch = Vec::new();
        let turn = self.gw[shard].writer_turn(id, &mut batch, usize::MAX);
        let bytes: usize = batch.iter().map(Bytes::len).sum();
        let c = self.conns.get_mut(&gen).expect("checked");
        for b in &batch {
            c.buf.extend_from_slice(b);
        }
        let mut msgs = Vec::new();
        let mut closed = false;
        let mut wrong = None;
        loop {
            match c.reader.next(&mut c.buf) {
                Ok(Some(WsEvent::Message { text: false, data })) => msgs.push(data),
                Ok(Some(WsEvent::Close { .. })) => closed = true,
                // Pings of the runner protocol are messages, never WebSocket frames.
                Ok(Some(other)) => wrong = Some(format!("{other:?}")),
                Ok(None) => break,
                Err(e) => {
                    wrong = Some(format!("{e:?}"));
                    break;
                }
            }
        }
        if let Some(w) = wrong {
            self.fail(format!("gateway sent a runner an unexpected frame: {w}"));
        }
        let now = self.now;
        for data in msgs {
            let Ok(msg) = crate::protocol::decode_to_client(&data) else {
                self.fail("gateway sent a runner an undecodable message");
                continue;
            };
            self.note_to_runner(gen, &msg);
            let c = self.conns.get_mut(&gen).expect("checked");
            if c.runner_open && c.gw_open {
                c.g2r.push_back((now, msg));
            }
        }
        if bytes > 0 {
            self.gw[shard].written(id, bytes);
        }
        if closed || matches!(turn, crate::gateway::WriterTurn::Shutdown) {
            if closed && !self.cfg.drop_before_close {
                // A close frame follows what was written before it: the runner reads up to
                // it (a fencing `Init` before a leader change's close, say).
                let n = self.conns.get(&gen).map_or(0, |c| c.g2r.len());
                self.deliver_g2r(gen, n);
            }
            self.gateway_closed_runner(gen);
        }
        self.pump();
    }

    /// What the gateway tells a runner, as the checks see it: the hibernating lists of its
    /// start commands (by client id, as the request ids name them now).
    fn note_to_runner(&mut self, gen: u32, msg: &ToClient) {
        self.log(|| format!("gateway -> conn {gen}: {}", brief_to_client(msg)));
        let ToClient::Commands(cmds) = msg else {
            return;
        };
        for c in cmds {
            let Command::StartActor(s) = &c.inner else {
                continue;
            };
            let ids: Vec<u32> = {
                let store = lock(&self.shared);
                s.hibernating_requests
                    .iter()
                    .filter_map(|h| {
                        store
                            .reqs
                            .get(&(h.gateway_id, h.request_id))?
                            .last()
                            .copied()
                    })
                    .collect()
            };
            for id in &ids {
                let owner = self.clients.get(id).map(|s| s.actor.clone());
                if owner.as_deref() != Some(c.checkpoint.actor_id.as_str()) {
                    self.fail(format!(
                        "start of {} g{} lists socket {id} of {owner:?}",
                        c.checkpoint.actor_id, c.checkpoint.generation
                    ));
                }
            }
            self.log(|| {
                format!(
                    "start of {} g{} lists sockets {ids:?}",
                    c.checkpoint.actor_id, c.checkpoint.generation
                )
            });
            self.start_lists.insert(
                (c.checkpoint.actor_id.clone(), c.checkpoint.generation),
                ids,
            );
        }
    }

    pub fn deliver_g2r(&mut self, gen: u32, n: usize) {
        for _ in 0..n {
            let Some(c) = self.conns.get_mut(&gen) else {
                return;
            };
            let Some((_, msg)) = c.g2r.pop_front() else {
                return;
            };
            let no = c.runner;
            if let ToClient::Commands(cmds) = &msg {
                let rid = self.runners[no].core.runner_id().unwrap_or("").to_string();
                for c in cmds {
                    if matches!(c.inner, Command::StartActor(_)) {
                        let k = (
                            rid.clone(),
                            c.checkpoint.actor_id.clone(),
                            c.checkpoint.generation,
                        );
                        if !self.starts_delivered.insert(k) {
                            self.fail(format!(
                                "CommandStartActor for {} g{} delivered twice to runner {rid} \
                                 (SPEC 1.4.3: the runner does not de-duplicate)",
                                c.checkpoint.actor_id, c.checkpoint.generation
                            ));
                        }
                    }
                }
            }
            self.log(|| format!("runner {no} <- conn {gen}: {}", brief_to_client(&msg)));
            self.runners[no].core.handle(msg);
            self.runner_flush(no);
        }
    }

    pub fn deliver_r2g(&mut self, gen: u32, n: usize) {
        for _ in 0..n {
            let Some(c) = self.conns.get_mut(&gen) else {
                return;
            };
            let Some((_, msg)) = c.r2g.pop_front() else {
                return;
            };
            if !c.gw_open {
                continue;
            }
            let (shard, id) = (c.shard, c.gw);
            if is_ack(&msg) && self.rng.random_bool(0.1) {
                // Delivered again later: a late, repeated acknowledgement.
                let now = self.now;
                if let Some(c) = self.conns.get_mut(&gen) {
                    c.r2g.push_back((now, msg.clone()));
                }
            }
            self.log(|| format!("gateway <- conn {gen}: {}", brief_to_server(&msg)));
            let data = Bytes::from(crate::protocol::encode_to_server(&msg));
            let ev = WsEvent::Message { text: false, data };
            let next = self.call(shard, |g, now| g.handle_runner_frame(id, ev, now));
            if next != Next::Continue {
                self.fail(format!(
                    "the gateway stopped reading runner conn {gen} ({next:?}) on {}",
                    brief_to_server(&msg)
                ));
            }
        }
    }
}

fn brief_shard_msg(m: &ShardMsg) -> String {
    match m {
        ShardMsg::ToRunner { conn, .. } => format!("to runner conn {conn:?}"),
        ShardMsg::ToRunnerInline { conn, .. } => format!("to runner conn {conn:?} (inline)"),
        ShardMsg::Upload { conn, .. } => format!("upload chunk to runner conn {conn:?}"),
        ShardMsg::UploadWritten { id, bytes } => format!("upload of {id:?}: {bytes} written"),
        ShardMsg::RunnerStreams { conn, on } => format!("runner conn {conn:?} streams: {on}"),
        ShardMsg::Tunnel { key, msg, .. } => format!("tunnel {key:?} {msg:?}"),
        ShardMsg::CloseConn { conn, .. } => format!("close {conn:?}"),
        ShardMsg::RunnerAttached { runner_idx, conn } => {
            format!("runner {runner_idx} attached at {conn:?}")
        }
        ShardMsg::RunnerDetached { runner_idx, lost } => {
            format!("runner {runner_idx} detached (lost {lost})")
        }
        ShardMsg::ActorStopped {
            actor_id,
            destroyed,
            barrier,
        } => format!("actor {actor_id} stopped (destroyed {destroyed}, barrier {barrier})"),
        ShardMsg::ActorRunning {
            actor_id,
            generation,
            runner_idx,
        } => format!("actor {actor_id} g{generation} running on runner {runner_idx}"),
        ShardMsg::Reply { waiter, reply } => format!("reply to {waiter}: {reply:?}"),
        ShardMsg::Shutdown => "shutdown".into(),
        ShardMsg::ResetRunners(r) => format!("reset runners ({r})"),
    }
}

pub(super) fn brief_to_client(m: &ToClient) -> String {
    match m {
        ToClient::TunnelMessage(t) => format!(
            "tunnel req {:?} idx {} {}",
            t.message_id.request_id,
            t.message_id.message_index,
            match &t.message_kind {
                crate::protocol::ToClientTunnelMessageKind::WebSocketMessage(w) => {
                    format!("msg {}B", w.data.len())
                }
                k => format!("{k:?}"),
            }
        ),
        other => format!("{other:?}"),
    }
}

pub(super) fn brief_to_server(m: &ToServer) -> String {
    match m {
        ToServer::TunnelMessage(t) => format!(
            "tunnel req {:?} idx {} {:?}",
            t.message_id.request_id, t.message_id.message_index, t.message_kind
        ),
        other => format!("{other:?}"),
    }
}

fn is_ack(m: &ToServer) -> bool {
    matches!(
        m,
        ToServer::TunnelMessage(t)
            if matches!(t.message_kind, crate::protocol::ToServerTunnelMessageKind::WebSocketMessageAck(_))
    )
}
