//! The session with the gateway: a socket opening (`Init` first) and going away (tunnel
//! messages back to the backlog, non-hibernatable sockets closed, the runner-lost deadline),
//! the gateway's `Init` (re-sending unacknowledged events, the backlog and command
//! checkpoints), pings, commands and their acknowledgement, event acknowledgements, and the
//! start of a shutdown.
//!
//! Must never send a control message while no socket is open, nor drop an event the gateway
//! has not acknowledged while the runner keeps its runnerId (it is re-sent after every
//! `Init`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Core;
use crate::protocol::hot::{decode_to_client_hot, ToClientHot};
use crate::protocol::{
    ActorCheckpoint, ActorNameMap, Command, CommandWrapper, EventWrapper, StopCode, ToClient,
    ToClientInit, ToServer, ToServerAckCommands, ToServerInit, ToServerPong,
};
use crate::runner::counters::Counters;
use crate::runner::io::{Outgoing, Phase, Req};
use crate::runner::types::RequestKey;

impl Core {
    /// A socket opened: `Init` goes first.
    pub(crate) fn connection_opened(&mut self) {
        self.io.phase = Phase::AwaitingInit;
        self.io.out.clear();
        self.io
            .out
            .push_back(Outgoing::Msg(ToServer::Init(ToServerInit {
                name: self.init.name.clone(),
                version: self.init.version,
                total_slots: self.init.total_slots,
                prepopulate_actor_names: Some(ActorNameMap::default()),
                metadata: self.init.metadata.clone(),
            })));
    }

    /// The socket is gone (or was dropped). Unwritten tunnel messages return to the backlog;
    /// non-hibernatable sockets are closed (the gateway closes them on its side too).
    pub(crate) fn connection_lost(&mut self, now: Instant) {
        let was = self.io.phase;
        self.io.phase = Phase::Disconnected;
        let mut unsent: VecDeque<Outgoing> =
            self.io.out.drain(..).filter(Outgoing::is_tunnel).collect();
        unsent.append(&mut self.io.backlog);
        self.io.backlog = unsent;
        self.io.set_queued();
        if was == Phase::Disconnected {
            return;
        }
        if was == Phase::Connected {
            Counters::bump(&self.io.counters.disconnects);
        }
        let mut doomed: Vec<RequestKey> = self
            .io
            .requests
            .iter()
            .filter(|(_, r)| !matches!(r, Req::Ws(w) if w.hibernatable))
            .map(|(k, _)| *k)
            .collect();
        doomed.sort_unstable();
        for key in doomed {
            if let Some(Req::Ws(ws)) = self.io.requests.remove(&key) {
                self.call_close(&ws, key, Some(1011), Some("ws.runner_disconnected"));
            }
        }
        if self.lost_deadline.is_none() {
            if let Some(md) = &self.metadata {
                if md.runner_lost_threshold > 0 {
                    let ms = u64::try_from(md.runner_lost_threshold).unwrap_or(0);
                    self.lost_deadline = Some(now + Duration::from_millis(ms));
                }
            }
        }
    }

    /// Timers: once disconnected longer than `runnerLostThreshold`, the gateway has stopped
    /// this runner's actors, so stop them here too (as the TS runner does).
    pub(crate) fn poll(&mut self, now: Instant) {
        if let Some(deadline) = self.lost_deadline {
            if self.io.phase != Phase::Connected && now >= deadline {
                self.lost_deadline = None;
                tracing::info!("runner lost threshold passed, stopping all actors");
                self.stop_all(StopCode::Error);
            }
        }
    }

    /// Starts draining: `Stopping` tells the gateway to stop our actors.
    pub(crate) fn begin_shutdown(&mut self) {
        self.draining = true;
        self.io.push_control(ToServer::Stopping);
    }

    /// Decodes and handles one binary message from the gateway. WebSocket data reaches the
    /// actor as a slice of `buf`, without a copy.
    pub(crate) fn handle_bytes(&mut self, buf: &Bytes) {
        match decode_to_client_hot(buf) {
            Ok(ToClientHot::WsMessage {
                gateway_id,
                request_id,
                message_index,
                data,
                binary,
            }) => self.on_ws_message(
                RequestKey {
                    gateway_id,
                    request_id,
                },
                message_index,
                data,
                binary,
            ),
            Ok(ToClientHot::Other(msg)) => self.handle(msg),
            Err(e) => {
                Counters::bump(&self.io.counters.protocol_errors);
                tracing::warn!(error = %e, "undecodable message from gateway");
            }
        }
    }

    pub(crate) fn handle(&mut self, msg: ToClient) {
        match msg {
            ToClient::Init(init) => self.on_init(init),
            ToClient::Commands(cmds) => self.on_commands(cmds),
            ToClient::AckEvents(ack) => {
                for cp in ack.last_event_checkpoints {
                    let k: (Arc<str>, u32) = (Arc::from(cp.actor_id.as_str()), cp.generation);
                    if let Some(h) = self.io.events.get_mut(&k) {
                        while h.front().is_some_and(|e| e.checkpoint.index <= cp.index) {
                            h.pop_front();
                        }
                        if h.is_empty() {
                            self.io.events.remove(&k);
                        }
                    }
                }
            }
            ToClient::KvResponse(_) => {
                tracing::debug!("ignoring KV response (this runner sends no KV requests)");
            }
            ToClient::TunnelMessage(t) => self.on_tunnel(t),
            ToClient::Ping(p) => self
                .io
                .push_control(ToServer::Pong(ToServerPong { ts: p.ts })),
        }
    }

    fn on_init(&mut self, init: ToClientInit) {
        if let Some(old) = &self.runner_id {
            if *old != init.runner_id {
                tracing::info!(old = %old, new = %init.runner_id, "runner id changed, stopping all actors");
                self.stop_all(StopCode::Error);
                // The new identity knows none of the old actors or requests.
                self.io.events.clear();
                self.io.backlog.clear();
                self.io.pending_acks.clear();
                self.io.requests.clear();
                self.io.remembered.clear();
                self.io.remembered_len = 0;
                self.io.set_queued();
            }
        }
        self.runner_id = Some(init.runner_id);
        self.metadata = Some(init.metadata);
        self.lost_deadline = None;
        self.io.phase = Phase::Connected;
        Counters::bump(&self.io.counters.connections);
        if self.draining {
            // A new connection is a new session to the gateway: say again that this runner
            // is shutting down, or it would be given new actors.
            self.io.push_control(ToServer::Stopping);
        }

        // Unacknowledged events first, then the tunnel messages that waited, in order.
        let mut keys: Vec<&(Arc<str>, u32)> = self.io.events.keys().collect();
        keys.sort_unstable();
        let events: Vec<EventWrapper> = keys
            .into_iter()
            .flat_map(|k| self.io.events[k].iter().cloned())
            .collect();
        if !events.is_empty() {
            self.io
                .out
                .push_back(Outgoing::Msg(ToServer::Events(events)));
        }
        while let Some(t) = self.io.backlog.pop_front() {
            self.io.out.push_back(t);
        }
        self.io.set_queued();
        let cps = self.command_checkpoints();
        if !cps.is_empty() {
            self.io
                .out
                .push_back(Outgoing::Msg(ToServer::AckCommands(ToServerAckCommands {
                    last_command_checkpoints: cps,
                })));
        }
    }

    fn command_checkpoints(&self) -> Vec<ActorCheckpoint> {
        let mut cps: Vec<ActorCheckpoint> = self
            .actors
            .values()
            .filter(|s| s.meta.last_command >= 0)
            .map(|s| ActorCheckpoint {
                actor_id: s.meta.actor_id.to_string(),
                generation: s.meta.generation,
                index: s.meta.last_command,
            })
            .collect();
        cps.sort_unstable_by(|a, b| a.actor_id.cmp(&b.actor_id));
        cps
    }

    fn on_commands(&mut self, cmds: Vec<CommandWrapper>) {
        let mut acked: Vec<ActorCheckpoint> = Vec::new();
        for cmd in cmds {
            let cp = cmd.checkpoint.clone();
            match cmd.inner {
                Command::StartActor(start) => self.start_actor(cmd.checkpoint, start),
                Command::StopActor => {
                    let matches = self
                        .actors
                        .get(cmd.checkpoint.actor_id.as_str())
                        .is_some_and(|s| s.meta.generation == cmd.checkpoint.generation);
                    if matches {
                        self.stop_actor(&cmd.checkpoint.actor_id, StopCode::Ok);
                    }
                }
            }
            match acked.iter_mut().find(|a| a.actor_id == cp.actor_id) {
                Some(a) => *a = cp,
                None => acked.push(cp),
            }
        }
        if !acked.is_empty() {
            self.io
                .push_control(ToServer::AckCommands(ToServerAckCommands {
                    last_command_checkpoints: acked,
                }));
        }
    }
}
