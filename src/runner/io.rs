//! The runner state an actor's callbacks can reach ([`Io`], next to each actor's own
//! [`ActorMeta`]): the connection phase, the queue for the socket and the backlog kept while
//! disconnected, each tunnelled request's state (inbound index, outbound index, coalesced
//! acks), the indices remembered for hibernated sockets, and each actor generation's
//! numbered, unacknowledged events; with the operations on them that the core and
//! [`super::ActorCx`] share.
//!
//! Sans-IO like the core: it must never touch a socket, sleep or read a clock, and never call
//! an actor (only the core does).

use std::collections::VecDeque;

use super::FastMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedSender;

use super::counters::Counters;
use super::ctl::Ctl;
use super::index::{after, InboundIndex};
use super::types::{AckPolicy, RequestKey};
use crate::protocol::encode_to_server;
use crate::protocol::hot::{encode_ws_message_prefix_to_server, ws_message_trailer};
use crate::protocol::{
    ActorCheckpoint, ActorIntent, Event, EventActorIntent, EventActorSetAlarm, EventWrapper,
    MessageId, ToServer, ToServerTunnelMessage, ToServerTunnelMessageKind, ToServerWebSocketClose,
    ToServerWebSocketMessageAck,
};

/// How many hibernated sockets' indices the runner remembers for a later restore.
const MAX_REMEMBERED: usize = 65_536;

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// No socket: tunnel messages wait in the backlog, control messages are not sent.
    Disconnected,
    /// Socket open, `Init` sent, waiting for the gateway's `Init`.
    AwaitingInit,
    /// `Init` answered: everything flows.
    Connected,
}

/// Per-actor bookkeeping that callbacks may update through [`ActorCx`](super::ActorCx).
#[derive(Debug)]
pub(crate) struct ActorMeta {
    pub(crate) actor_id: Arc<str>,
    pub(crate) generation: u32,
    pub(super) next_event: i64,
    pub(super) last_command: i64,
    pub(super) ack_policy: AckPolicy,
}

#[derive(Debug)]
pub(super) struct WsReq {
    pub(super) actor_id: Arc<str>,
    pub(super) generation: u32,
    pub(super) hibernatable: bool,
    pub(super) inbound: InboundIndex,
    pub(super) next_out: u16,
    pub(super) ack_to: Option<u16>,
    /// The newest index acknowledged to the gateway (re-sent when a replay shows it was lost).
    pub(super) acked: Option<u16>,
}

#[derive(Debug)]
pub(super) struct HttpReq {
    pub(super) actor_id: Arc<str>,
    pub(super) generation: u32,
    pub(super) method: String,
    pub(super) path: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
    /// The body goes to the actor piece by piece (`Actor::streams_requests`), not collected.
    pub(super) streaming: bool,
    /// The actor answered (a streamed request's later answers are ignored).
    pub(super) answered: bool,
}

/// A streamed response the actor is sending: whose it is and the next message index
/// (`ResponseStart` had 0).
#[derive(Debug)]
pub(crate) struct HttpOut {
    pub(crate) actor_id: Arc<str>,
    pub(crate) generation: u32,
    pub(crate) next: u16,
}

#[derive(Debug)]
pub(super) enum Req {
    Ws(WsReq),
    Http(HttpReq),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Remembered {
    /// The actor generation that last ran the socket here.
    pub(super) generation: u32,
    pub(super) last_in: Option<u16>,
    pub(super) next_out: u16,
}

/// The state callbacks can reach: requests, queues, events. Split from the actor map so an
/// actor can be borrowed mutably next to it.
pub(crate) struct Io {
    pub(super) phase: Phase,
    pub(super) requests: FastMap<RequestKey, Req>,
    /// Streamed responses being sent.
    pub(crate) http_out: FastMap<RequestKey, HttpOut>,
    /// Messages ready for the socket, in order.
    pub(super) out: VecDeque<Outgoing>,
    /// Tunnel messages produced while not connected, sent after the next `Init`.
    pub(super) backlog: VecDeque<Outgoing>,
    /// Unacknowledged events per (actor, generation), resent after every `Init`.
    pub(super) events: FastMap<(Arc<str>, u32), VecDeque<EventWrapper>>,
    pub(super) pending_acks: Vec<RequestKey>,
    /// Indices of hibernated sockets, per actor, for a restore in this process.
    pub(super) remembered: FastMap<Arc<str>, FastMap<RequestKey, Remembered>>,
    pub(super) remembered_len: usize,
    pub(crate) counters: Arc<Counters>,
    pub(crate) ctl_tx: UnboundedSender<Ctl>,
}

/// One message for the gateway. WebSocket data stays a `Bytes` (possibly a slice of the
/// received frame) until it is encoded, so it is copied once, into the outgoing frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outgoing {
    Msg(ToServer),
    WsData {
        id: MessageId,
        data: Bytes,
        binary: bool,
    },
}

impl Outgoing {
    pub(super) fn is_tunnel(&self) -> bool {
        matches!(
            self,
            Outgoing::WsData { .. } | Outgoing::Msg(ToServer::TunnelMessage(_))
        )
    }

    /// The BARE encoding of this `ToServer` message. The shell encodes in place instead
    /// (`client/conn.rs`); tests compare against this.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Outgoing::Msg(m) => encode_to_server(m),
            Outgoing::WsData { id, data, binary } => {
                let prefix = encode_ws_message_prefix_to_server(
                    id.gateway_id,
                    id.request_id,
                    id.message_index,
                    data.len(),
                );
                let mut buf = Vec::with_capacity(prefix.len() + data.len() + 1);
                buf.extend_from_slice(prefix.as_bytes());
                buf.extend_from_slice(data);
                buf.extend_from_slice(&ws_message_trailer(*binary));
                buf
            }
        }
    }

    /// The equivalent fully typed message (copies WebSocket data).
    #[cfg(test)]
    pub(crate) fn into_to_server(self) -> ToServer {
        match self {
            Outgoing::Msg(m) => m,
            Outgoing::WsData { id, data, binary } => {
                ToServer::TunnelMessage(ToServerTunnelMessage {
                    message_id: id,
                    message_kind: ToServerTunnelMessageKind::WebSocketMessage(
                        crate::protocol::ToServerWebSocketMessage {
                            data: data.to_vec(),
                            binary,
                        },
                    ),
                })
            }
        }
    }
}

pub(super) fn msg_id(key: RequestKey, index: u16) -> MessageId {
    MessageId {
        gateway_id: key.gateway_id,
        request_id: key.request_id,
        message_index: index,
    }
}

impl Io {
    pub(super) fn new(counters: Arc<Counters>, ctl_tx: UnboundedSender<Ctl>) -> Self {
        Self {
            phase: Phase::Disconnected,
            requests: FastMap::default(),
            http_out: FastMap::default(),
            out: VecDeque::new(),
            backlog: VecDeque::new(),
            events: FastMap::default(),
            pending_acks: Vec::new(),
            remembered: FastMap::default(),
            remembered_len: 0,
            counters,
            ctl_tx,
        }
    }

    pub(super) fn set_queued(&self) {
        self.counters.queued.store(
            self.backlog.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Queues a control message; dropped while no socket is open (it is recomputed later).
    pub(super) fn push_control(&mut self, msg: ToServer) {
        if self.phase != Phase::Disconnected {
            self.out.push_back(Outgoing::Msg(msg));
        }
    }

    /// Queues a tunnel message: now if connected, else in the backlog.
    fn push_out(&mut self, msg: Outgoing) {
        if self.phase == Phase::Connected {
            self.out.push_back(msg);
        } else {
            self.backlog.push_back(msg);
            self.set_queued();
        }
    }

    /// Queues a tunnel message with an explicit index: now if connected, else in the backlog.
    pub(super) fn push_tunnel(
        &mut self,
        key: RequestKey,
        index: u16,
        kind: ToServerTunnelMessageKind,
    ) {
        self.push_out(Outgoing::Msg(ToServer::TunnelMessage(
            ToServerTunnelMessage {
                message_id: msg_id(key, index),
                message_kind: kind,
            },
        )));
    }

    /// Queues a tunnel message on a known WebSocket, numbering it with the socket's counter.
    pub(super) fn push_ws(&mut self, key: RequestKey, kind: ToServerTunnelMessageKind) -> bool {
        let Some(Req::Ws(ws)) = self.requests.get_mut(&key) else {
            return false;
        };
        let index = ws.next_out;
        ws.next_out = ws.next_out.wrapping_add(1);
        self.push_tunnel(key, index, kind);
        true
    }

    /// Sends a piece of one of the actor's streamed responses.
    pub(crate) fn http_chunk(
        &mut self,
        meta: &ActorMeta,
        key: RequestKey,
        data: Bytes,
        finish: bool,
    ) -> bool {
        let Some(h) = self
            .http_out
            .get_mut(&key)
            .filter(|h| h.actor_id == meta.actor_id && h.generation == meta.generation)
        else {
            return false;
        };
        let index = h.next;
        h.next = h.next.wrapping_add(1);
        if finish {
            self.http_out.remove(&key);
        }
        let chunk = crate::protocol::ToServerResponseChunk {
            body: Vec::from(data),
            finish,
        };
        self.push_tunnel(key, index, ToServerTunnelMessageKind::ResponseChunk(chunk));
        true
    }

    /// Ends one of the actor's streamed responses without completing it.
    pub(crate) fn http_abort(&mut self, meta: &ActorMeta, key: RequestKey) -> bool {
        let owned = self
            .http_out
            .get(&key)
            .is_some_and(|h| h.actor_id == meta.actor_id && h.generation == meta.generation);
        if !owned {
            return false;
        }
        let h = self.http_out.remove(&key).expect("checked");
        self.push_tunnel(key, h.next, ToServerTunnelMessageKind::ResponseAbort);
        true
    }

    fn owns(&self, meta: &ActorMeta, key: RequestKey) -> Option<&WsReq> {
        match self.requests.get(&key) {
            Some(Req::Ws(ws))
                if ws.actor_id == meta.actor_id && ws.generation == meta.generation =>
            {
                Some(ws)
            }
            _ => None,
        }
    }

    pub(crate) fn ws_send(
        &mut self,
        meta: &ActorMeta,
        key: RequestKey,
        data: Bytes,
        binary: bool,
    ) -> bool {
        if self.owns(meta, key).is_none() {
            return false;
        }
        let Some(Req::Ws(ws)) = self.requests.get_mut(&key) else {
            return false;
        };
        let index = ws.next_out;
        ws.next_out = ws.next_out.wrapping_add(1);
        self.push_out(Outgoing::WsData {
            id: msg_id(key, index),
            data,
            binary,
        });
        true
    }

    pub(crate) fn ws_close(
        &mut self,
        meta: &ActorMeta,
        key: RequestKey,
        code: Option<u16>,
        reason: Option<&str>,
        hibernate: bool,
    ) -> bool {
        let Some(ws) = self.owns(meta, key) else {
            return false;
        };
        if hibernate && !ws.hibernatable {
            return false;
        }
        // Acks owed on this socket go out before it leaves.
        self.flush_acks();
        self.push_ws(
            key,
            ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                code,
                reason: reason.map(str::to_owned),
                hibernate,
            }),
        );
        if let Some(Req::Ws(ws)) = self.requests.remove(&key) {
            if hibernate {
                self.remember(key, &ws);
            }
        }
        true
    }

    pub(crate) fn ws_ack(&mut self, meta: &ActorMeta, key: RequestKey, index: u16) -> bool {
        if self.owns(meta, key).is_none() {
            return false;
        }
        self.set_ack(key, index);
        true
    }

    pub(super) fn set_ack(&mut self, key: RequestKey, index: u16) {
        if let Some(Req::Ws(ws)) = self.requests.get_mut(&key) {
            match ws.ack_to {
                None => {
                    ws.ack_to = Some(index);
                    self.pending_acks.push(key);
                }
                // Acks are cumulative: a late, older ack never lowers a pending newer one.
                Some(prev) if after(prev, index) => {}
                Some(_) => ws.ack_to = Some(index),
            }
        }
    }

    /// Turns pending (coalesced) acks into tunnel messages.
    pub(super) fn flush_acks(&mut self) {
        let keys = std::mem::take(&mut self.pending_acks);
        for key in &keys {
            let index = match self.requests.get_mut(key) {
                Some(Req::Ws(ws)) => {
                    let index = ws.ack_to.take();
                    // Acks are cumulative: an older one sent after a newer one (an actor acking
                    // out of order) must not lower what later duplicates re-acknowledge.
                    ws.acked = match (ws.acked, index) {
                        (Some(prev), Some(new)) if after(prev, new) => Some(prev),
                        (prev, new) => new.or(prev),
                    };
                    index
                }
                _ => None,
            };
            if let Some(index) = index {
                self.push_ws(
                    *key,
                    ToServerTunnelMessageKind::WebSocketMessageAck(ToServerWebSocketMessageAck {
                        index,
                    }),
                );
                Counters::bump(&self.counters.acks_sent);
            }
        }
        let mut keys = keys;
        keys.clear();
        if self.pending_acks.is_empty() {
            self.pending_acks = keys;
        }
    }

    pub(super) fn remember(&mut self, key: RequestKey, ws: &WsReq) {
        if self.remembered_len >= MAX_REMEMBERED {
            return;
        }
        let prev = self
            .remembered
            .entry(ws.actor_id.clone())
            .or_default()
            .insert(
                key,
                Remembered {
                    generation: ws.generation,
                    last_in: ws.inbound.last(),
                    next_out: ws.next_out,
                },
            );
        if prev.is_none() {
            self.remembered_len += 1;
        }
    }

    /// Takes what this process remembers of an actor's hibernated sockets for a start of
    /// `generation`, keeping only entries that are provably current.
    ///
    /// The memory is per process, so it misses whatever another runner (or an earlier process)
    /// delivered. The gateway allocates generations one by one (`g + 1` for each start), so an
    /// entry left by generation `g` is current only for a start of `g + 1` (no other placement
    /// came between) or of `g` itself (the same placement started again). Any later
    /// generation means at least one placement ran elsewhere, possibly delivering more
    /// messages; such entries are dropped, so the restore gets no index and (by default) the
    /// first replayed message becomes the baseline.
    pub(super) fn take_remembered(
        &mut self,
        actor_id: &str,
        generation: u32,
    ) -> FastMap<RequestKey, Remembered> {
        let mut map = self.remembered.remove(actor_id).unwrap_or_default();
        self.remembered_len -= map.len();
        map.retain(|_, r| r.generation == generation || r.generation.wrapping_add(1) == generation);
        map
    }

    pub(super) fn emit_event(&mut self, meta: &mut ActorMeta, inner: Event) {
        let ev = EventWrapper {
            checkpoint: ActorCheckpoint {
                actor_id: meta.actor_id.to_string(),
                generation: meta.generation,
                index: meta.next_event,
            },
            inner,
        };
        meta.next_event += 1;
        self.events
            .entry((meta.actor_id.clone(), meta.generation))
            .or_default()
            .push_back(ev.clone());
        if self.phase == Phase::Connected {
            // Batch consecutive events into one `Events` message.
            if let Some(Outgoing::Msg(ToServer::Events(list))) = self.out.back_mut() {
                list.push(ev);
            } else {
                self.out
                    .push_back(Outgoing::Msg(ToServer::Events(vec![ev])));
            }
        }
    }

    pub(crate) fn intent(&mut self, meta: &mut ActorMeta, stop: bool) {
        let intent = if stop {
            ActorIntent::Stop
        } else {
            ActorIntent::Sleep
        };
        self.emit_event(meta, Event::ActorIntent(EventActorIntent { intent }));
    }

    pub(crate) fn set_alarm(&mut self, meta: &mut ActorMeta, alarm_ts: Option<i64>) {
        self.emit_event(meta, Event::ActorSetAlarm(EventActorSetAlarm { alarm_ts }));
    }

    /// Keys of the requests that belong to one actor generation.
    pub(super) fn keys_of(&self, actor_id: &str, generation: u32) -> Vec<RequestKey> {
        let mut keys: Vec<RequestKey> = self
            .requests
            .iter()
            .filter(|(_, r)| match r {
                Req::Ws(w) => &*w.actor_id == actor_id && w.generation == generation,
                Req::Http(h) => &*h.actor_id == actor_id && h.generation == generation,
            })
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        keys
    }
}
