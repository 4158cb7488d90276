//! The runner's protocol state machine, without I/O: it takes decoded `ToClient` messages,
//! connection events, handle operations and `now`, calls the actors, and queues `ToServer`
//! messages for the shell ([`super::client`]) to write.
//!
//! It owns: the actors and their per-(actor, generation) event numbering and unacknowledged
//! event history, the per-request tunnel state (inbound index for duplicate/gap handling,
//! outbound message index, pending ack), the queue of tunnel messages waiting for a connection,
//! and the runner-lost deadline. It must never touch a socket, sleep, or read a clock.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::protocol::{
    ActorCheckpoint, ActorIntent, ActorNameMap, ActorState, ActorStateStopped, Command,
    CommandStartActor, CommandWrapper, Event, EventActorIntent, EventActorSetAlarm,
    EventActorStateUpdate, EventWrapper, MessageId, ProtocolMetadata, StopCode, StrMap, ToClient,
    ToClientInit, ToClientRequestStart, ToClientTunnelMessage, ToClientTunnelMessageKind,
    ToClientWebSocketOpen, ToServer, ToServerAckCommands, ToServerInit, ToServerPong,
    ToServerResponseStart, ToServerTunnelMessage, ToServerTunnelMessageKind,
    ToServerWebSocketClose, ToServerWebSocketMessageAck, ToServerWebSocketOpen,
};

use crate::protocol::encode_to_server;
use crate::protocol::hot::{
    decode_to_client_hot, encode_ws_message_prefix_to_server, ws_message_trailer, ToClientHot,
};

use super::actor::{
    AckPolicy, Actor, ActorCx, ActorFactory, ActorInfo, ActorOp, HttpRequest, HttpResponse,
    RequestKey, WsOpen, WsOpenReply, WsRestore,
};
use super::counters::Counters;
use super::index::{after, InboundIndex, Verdict};

/// Largest request body collected from a streamed request (as the TS runner's payload cap).
pub(crate) const MAX_BODY: usize = 20 * 1024 * 1024;
/// How many hibernated sockets' indices the runner remembers for a later restore.
const MAX_REMEMBERED: usize = 65_536;

/// Close reason the TS runner uses when an inbound index skips ahead.
pub const GAP_CLOSE_CODE: u16 = 1008;
pub const GAP_CLOSE_REASON: &str = "ws.message_index_skip";

/// Messages from handles to the runner task.
#[derive(Debug)]
pub(crate) enum Ctl {
    Actor {
        actor_id: Arc<str>,
        generation: u32,
        op: ActorOp,
    },
    DropConnection,
    Shutdown(oneshot::Sender<()>),
}

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

/// Per-actor bookkeeping that callbacks may update through [`ActorCx`].
#[derive(Debug)]
pub(crate) struct ActorMeta {
    pub(crate) actor_id: Arc<str>,
    pub(crate) generation: u32,
    next_event: i64,
    last_command: i64,
    ack_policy: AckPolicy,
}

struct ActorSlot {
    meta: ActorMeta,
    actor: Box<dyn Actor>,
}

#[derive(Debug)]
struct WsReq {
    actor_id: Arc<str>,
    generation: u32,
    hibernatable: bool,
    inbound: InboundIndex,
    next_out: u16,
    ack_to: Option<u16>,
    /// The newest index acknowledged to the gateway (re-sent when a replay shows it was lost).
    acked: Option<u16>,
}

#[derive(Debug)]
struct HttpReq {
    actor_id: Arc<str>,
    generation: u32,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

#[derive(Debug)]
enum Req {
    Ws(WsReq),
    Http(HttpReq),
}

#[derive(Debug, Clone, Copy)]
struct Remembered {
    /// The actor generation that last ran the socket here.
    generation: u32,
    last_in: Option<u16>,
    next_out: u16,
}

/// The state callbacks can reach: requests, queues, events. Split from the actor map so an
/// actor can be borrowed mutably next to it.
pub(crate) struct Io {
    phase: Phase,
    requests: HashMap<RequestKey, Req>,
    /// Messages ready for the socket, in order.
    out: VecDeque<Outgoing>,
    /// Tunnel messages produced while not connected, sent after the next `Init`.
    backlog: VecDeque<Outgoing>,
    /// Unacknowledged events per (actor, generation), resent after every `Init`.
    events: HashMap<(Arc<str>, u32), VecDeque<EventWrapper>>,
    pending_acks: Vec<RequestKey>,
    /// Indices of hibernated sockets, per actor, for a restore in this process.
    remembered: HashMap<Arc<str>, HashMap<RequestKey, Remembered>>,
    remembered_len: usize,
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
    fn is_tunnel(&self) -> bool {
        matches!(
            self,
            Outgoing::WsData { .. } | Outgoing::Msg(ToServer::TunnelMessage(_))
        )
    }

    /// The BARE encoding of this `ToServer` message.
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

/// Runner identity sent in `Init`.
#[derive(Debug, Clone)]
pub(crate) struct InitInfo {
    pub name: String,
    pub version: u32,
    pub total_slots: u32,
    pub metadata: Option<String>,
}

/// The runner state machine.
pub(crate) struct Core {
    pub(crate) io: Io,
    actors: HashMap<Arc<str>, ActorSlot>,
    factory: Box<dyn ActorFactory>,
    init: InitInfo,
    runner_id: Option<String>,
    metadata: Option<ProtocolMetadata>,
    lost_deadline: Option<Instant>,
    draining: bool,
}

fn msg_id(key: RequestKey, index: u16) -> MessageId {
    MessageId {
        gateway_id: key.gateway_id,
        request_id: key.request_id,
        message_index: index,
    }
}

fn key_of(id: &MessageId) -> RequestKey {
    RequestKey {
        gateway_id: id.gateway_id,
        request_id: id.request_id,
    }
}

/// Lower-cases names and joins repeated ones with ", " so the map has unique keys.
fn header_map(headers: Vec<(String, String)>) -> StrMap {
    let mut out: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        let k = k.to_ascii_lowercase();
        if let Some((_, existing)) = out.iter_mut().find(|(ek, _)| *ek == k) {
            existing.push_str(", ");
            existing.push_str(&v);
        } else {
            out.push((k, v));
        }
    }
    StrMap(out)
}

fn response_start(resp: HttpResponse) -> ToServerTunnelMessageKind {
    let mut headers = header_map(resp.headers);
    let body = if resp.body.is_empty() {
        None
    } else {
        if headers.get("content-length").is_none() {
            headers
                .0
                .push(("content-length".into(), resp.body.len().to_string()));
        }
        Some(Vec::from(resp.body))
    };
    ToServerTunnelMessageKind::ResponseStart(ToServerResponseStart {
        status: resp.status,
        headers,
        body,
        stream: false,
    })
}

impl Io {
    fn new(counters: Arc<Counters>, ctl_tx: UnboundedSender<Ctl>) -> Self {
        Self {
            phase: Phase::Disconnected,
            requests: HashMap::new(),
            out: VecDeque::new(),
            backlog: VecDeque::new(),
            events: HashMap::new(),
            pending_acks: Vec::new(),
            remembered: HashMap::new(),
            remembered_len: 0,
            counters,
            ctl_tx,
        }
    }

    fn set_queued(&self) {
        self.counters.queued.store(
            self.backlog.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Queues a control message; dropped while no socket is open (it is recomputed later).
    fn push_control(&mut self, msg: ToServer) {
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
    fn push_tunnel(&mut self, key: RequestKey, index: u16, kind: ToServerTunnelMessageKind) {
        self.push_out(Outgoing::Msg(ToServer::TunnelMessage(
            ToServerTunnelMessage {
                message_id: msg_id(key, index),
                message_kind: kind,
            },
        )));
    }

    /// Queues a tunnel message on a known WebSocket, numbering it with the socket's counter.
    fn push_ws(&mut self, key: RequestKey, kind: ToServerTunnelMessageKind) -> bool {
        let Some(Req::Ws(ws)) = self.requests.get_mut(&key) else {
            return false;
        };
        let index = ws.next_out;
        ws.next_out = ws.next_out.wrapping_add(1);
        self.push_tunnel(key, index, kind);
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

    fn set_ack(&mut self, key: RequestKey, index: u16) {
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
    fn flush_acks(&mut self) {
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

    fn remember(&mut self, key: RequestKey, ws: &WsReq) {
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
    fn take_remembered(
        &mut self,
        actor_id: &str,
        generation: u32,
    ) -> HashMap<RequestKey, Remembered> {
        let mut map = self.remembered.remove(actor_id).unwrap_or_default();
        self.remembered_len -= map.len();
        map.retain(|_, r| r.generation == generation || r.generation.wrapping_add(1) == generation);
        map
    }

    fn emit_event(&mut self, meta: &mut ActorMeta, inner: Event) {
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
    fn keys_of(&self, actor_id: &str, generation: u32) -> Vec<RequestKey> {
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

impl Core {
    pub(crate) fn new(
        init: InitInfo,
        factory: Box<dyn ActorFactory>,
        counters: Arc<Counters>,
        ctl_tx: UnboundedSender<Ctl>,
    ) -> Self {
        Self {
            io: Io::new(counters, ctl_tx),
            actors: HashMap::new(),
            factory,
            init,
            runner_id: None,
            metadata: None,
            lost_deadline: None,
            draining: false,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.io.phase
    }

    pub(crate) fn runner_id(&self) -> Option<&str> {
        self.runner_id.as_deref()
    }

    pub(crate) fn actor_count(&self) -> usize {
        self.actors.len()
    }

    pub(crate) fn lost_deadline(&self) -> Option<Instant> {
        self.lost_deadline
    }

    /// Number of tunnel messages waiting for a connection.
    #[cfg(test)]
    pub(crate) fn backlog_len(&self) -> usize {
        self.io.backlog.len()
    }

    /// Drains everything ready to be written, in order.
    pub(crate) fn take_out(&mut self, buf: &mut Vec<Outgoing>) {
        self.io.flush_acks();
        buf.extend(self.io.out.drain(..));
    }

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

    /// Stops every actor locally (shutdown without a gateway to tell).
    pub(crate) fn stop_all_local(&mut self) {
        self.stop_all(if self.draining {
            StopCode::Ok
        } else {
            StopCode::Error
        });
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

    /// Applies an operation from an [`super::actor::ActorHandle`].
    pub(crate) fn handle_actor_op(&mut self, actor_id: &str, generation: u32, op: ActorOp) {
        let Some(slot) = self.actors.get_mut(actor_id) else {
            return;
        };
        if slot.meta.generation != generation {
            return;
        }
        let mut cx = ActorCx {
            io: &mut self.io,
            meta: &mut slot.meta,
        };
        match op {
            ActorOp::Send { key, data, binary } => {
                cx.send(key, data, binary);
            }
            ActorOp::Close { key, code, reason } => {
                cx.close(key, code, reason.as_deref());
            }
            ActorOp::Hibernate(key) => {
                cx.hibernate(key);
            }
            ActorOp::Ack(key, index) => {
                cx.ack(key, index);
            }
            ActorOp::Sleep => cx.sleep(),
            ActorOp::Stop => cx.stop(),
            ActorOp::SetAlarm(ts) => cx.set_alarm(ts),
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

    fn start_actor(&mut self, cp: ActorCheckpoint, start: CommandStartActor) {
        if let Some(existing) = self.actors.get_mut(cp.actor_id.as_str()) {
            if existing.meta.generation == cp.generation {
                if cp.index > existing.meta.last_command {
                    existing.meta.last_command = cp.index;
                }
                tracing::debug!(actor_id = %cp.actor_id, "ignoring repeated start command");
                return;
            }
            tracing::warn!(actor_id = %cp.actor_id, "replacing an actor with a new generation");
            self.stop_actor_inner(&cp.actor_id, None);
        }
        let info = ActorInfo {
            actor_id: cp.actor_id.clone(),
            generation: cp.generation,
            name: start.config.name,
            key: start.config.key,
            create_ts: start.config.create_ts,
            input: start.config.input.map(Bytes::from),
        };
        let actor = self.factory.create(&info);
        let actor_id: Arc<str> = Arc::from(cp.actor_id.as_str());
        let meta = ActorMeta {
            actor_id: actor_id.clone(),
            generation: cp.generation,
            next_event: 0,
            last_command: cp.index,
            ack_policy: actor.ack_policy(),
        };
        let slot = self
            .actors
            .entry(actor_id.clone())
            .insert_entry(ActorSlot { meta, actor })
            .into_mut();
        self.io.emit_event(
            &mut slot.meta,
            Event::ActorStateUpdate(EventActorStateUpdate {
                state: ActorState::Running,
            }),
        );
        let mut cx = ActorCx {
            io: &mut self.io,
            meta: &mut slot.meta,
        };
        slot.actor.on_start(&mut cx);

        let mut remembered = self.io.take_remembered(&actor_id, cp.generation);
        for hr in start.hibernating_requests {
            let key = RequestKey {
                gateway_id: hr.gateway_id,
                request_id: hr.request_id,
            };
            let rem = remembered.remove(&key);
            self.io.requests.insert(
                key,
                Req::Ws(WsReq {
                    actor_id: actor_id.clone(),
                    generation: cp.generation,
                    hibernatable: true,
                    inbound: InboundIndex::restored(rem.and_then(|r| r.last_in)),
                    next_out: rem.map_or(0, |r| r.next_out),
                    ack_to: None,
                    acked: None,
                }),
            );
            let mut cx = ActorCx {
                io: &mut self.io,
                meta: &mut slot.meta,
            };
            let decision =
                slot.actor
                    .on_websocket_restore(&mut cx, key, rem.and_then(|r| r.last_in));
            match decision {
                WsRestore::Resume { last_index } => {
                    if let Some(Req::Ws(ws)) = self.io.requests.get_mut(&key) {
                        ws.inbound = InboundIndex::restored(last_index);
                        // The actor has processed `last_index`; its ack may have been lost with
                        // an earlier connection, so replays up to it must re-acknowledge it.
                        ws.acked = last_index;
                    }
                }
                WsRestore::Close => {
                    self.io.push_ws(
                        key,
                        ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                            code: Some(1000),
                            reason: Some("ws.meta_not_found_during_restore".into()),
                            hibernate: false,
                        }),
                    );
                    self.io.requests.remove(&key);
                }
            }
        }
    }

    fn stop_all(&mut self, code: StopCode) {
        let mut ids: Vec<Arc<str>> = self.actors.keys().cloned().collect();
        ids.sort_unstable();
        for id in ids {
            self.stop_actor(&id, code);
        }
    }

    fn stop_actor(&mut self, actor_id: &str, code: StopCode) {
        self.stop_actor_inner(actor_id, Some(code));
    }

    /// Removes an actor: closes its non-hibernatable sockets (callback only, the gateway does
    /// its own side), remembers its hibernatable ones, calls `on_stop`, and reports `Stopped`
    /// when `code` is given.
    fn stop_actor_inner(&mut self, actor_id: &str, code: Option<StopCode>) {
        let Some(mut slot) = self.actors.remove(actor_id) else {
            return;
        };
        // Acks owed for processed messages go out before the sockets hibernate.
        self.io.flush_acks();
        for key in self.io.keys_of(actor_id, slot.meta.generation) {
            match self.io.requests.remove(&key) {
                Some(Req::Ws(ws)) if ws.hibernatable => self.io.remember(key, &ws),
                Some(Req::Ws(_)) => {
                    let mut cx = ActorCx {
                        io: &mut self.io,
                        meta: &mut slot.meta,
                    };
                    slot.actor
                        .on_websocket_close(&mut cx, key, Some(1000), Some("actor.stopped"));
                }
                _ => {}
            }
        }
        let mut cx = ActorCx {
            io: &mut self.io,
            meta: &mut slot.meta,
        };
        slot.actor.on_stop(&mut cx);
        if let Some(code) = code {
            self.io.emit_event(
                &mut slot.meta,
                Event::ActorStateUpdate(EventActorStateUpdate {
                    state: ActorState::Stopped(ActorStateStopped {
                        code,
                        message: None,
                    }),
                }),
            );
        }
    }

    /// Calls `on_websocket_close` on the actor that owns `ws`, if it is still running.
    fn call_close(&mut self, ws: &WsReq, key: RequestKey, code: Option<u16>, reason: Option<&str>) {
        if let Some(slot) = self.actors.get_mut(&ws.actor_id) {
            if slot.meta.generation == ws.generation {
                let mut cx = ActorCx {
                    io: &mut self.io,
                    meta: &mut slot.meta,
                };
                slot.actor.on_websocket_close(&mut cx, key, code, reason);
            }
        }
    }

    fn on_tunnel(&mut self, t: ToClientTunnelMessage) {
        let key = key_of(&t.message_id);
        let index = t.message_id.message_index;
        match t.message_kind {
            ToClientTunnelMessageKind::RequestStart(start) => self.on_request_start(key, start),
            ToClientTunnelMessageKind::RequestChunk(chunk) => {
                let Some(Req::Http(h)) = self.io.requests.get_mut(&key) else {
                    return;
                };
                if h.body.len() + chunk.body.len() > MAX_BODY {
                    self.io.requests.remove(&key);
                    self.io.push_tunnel(
                        key,
                        0,
                        response_start(HttpResponse::new(413, "Payload Too Large")),
                    );
                    return;
                }
                h.body.extend_from_slice(&chunk.body);
                if chunk.finish {
                    if let Some(Req::Http(h)) = self.io.requests.remove(&key) {
                        let req = HttpRequest {
                            key,
                            method: h.method,
                            path: h.path,
                            headers: h.headers,
                            body: Bytes::from(h.body),
                        };
                        self.dispatch_http(&h.actor_id, h.generation, req);
                    }
                }
            }
            ToClientTunnelMessageKind::RequestAbort => {
                if matches!(self.io.requests.get(&key), Some(Req::Http(_))) {
                    self.io.requests.remove(&key);
                }
            }
            ToClientTunnelMessageKind::WebSocketOpen(open) => self.on_ws_open(key, open),
            ToClientTunnelMessageKind::WebSocketMessage(m) => {
                self.on_ws_message(key, index, Bytes::from(m.data), m.binary)
            }
            ToClientTunnelMessageKind::WebSocketClose(c) => {
                let Some(Req::Ws(_)) = self.io.requests.get(&key) else {
                    return;
                };
                // The TS runner answers the gateway's close with a close of its own.
                self.io.push_ws(
                    key,
                    ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                        code: c.code,
                        reason: c.reason.clone(),
                        hibernate: false,
                    }),
                );
                if let Some(Req::Ws(ws)) = self.io.requests.remove(&key) {
                    self.call_close(&ws, key, c.code, c.reason.as_deref());
                }
            }
        }
    }

    fn on_request_start(&mut self, key: RequestKey, start: ToClientRequestStart) {
        let Some(slot) = self.actors.get(start.actor_id.as_str()) else {
            self.io.push_tunnel(
                key,
                0,
                response_start(
                    HttpResponse::new(503, "Actor not found")
                        .header("x-rivet-error", "runner.actor_not_found"),
                ),
            );
            return;
        };
        let actor_id = slot.meta.actor_id.clone();
        let generation = slot.meta.generation;
        let body = start.body.unwrap_or_default();
        if start.stream {
            self.io.requests.insert(
                key,
                Req::Http(HttpReq {
                    actor_id,
                    generation,
                    method: start.method,
                    path: start.path,
                    headers: start.headers.0,
                    body,
                }),
            );
            return;
        }
        let req = HttpRequest {
            key,
            method: start.method,
            path: start.path,
            headers: start.headers.0,
            body: Bytes::from(body),
        };
        self.dispatch_http(&actor_id, generation, req);
    }

    fn dispatch_http(&mut self, actor_id: &str, generation: u32, req: HttpRequest) {
        let key = req.key;
        let resp = match self.actors.get_mut(actor_id) {
            Some(slot) if slot.meta.generation == generation => {
                let mut cx = ActorCx {
                    io: &mut self.io,
                    meta: &mut slot.meta,
                };
                Counters::bump(&cx.io.counters.http_requests);
                slot.actor.on_http_request(&mut cx, req)
            }
            _ => HttpResponse::new(503, "Actor not found")
                .header("x-rivet-error", "runner.actor_not_found"),
        };
        self.io.push_tunnel(key, 0, response_start(resp));
    }

    fn on_ws_open(&mut self, key: RequestKey, open: ToClientWebSocketOpen) {
        if self.io.requests.contains_key(&key) {
            // A second open for the same request replaces the first (TS: ws.duplicate_open).
            if let Some(Req::Ws(old)) = self.io.requests.remove(&key) {
                self.call_close(&old, key, Some(1000), Some("ws.duplicate_open"));
            }
        }
        let Some(slot) = self.actors.get_mut(open.actor_id.as_str()) else {
            self.io.push_tunnel(
                key,
                0,
                ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                    code: Some(1011),
                    reason: Some("Actor not found".into()),
                    hibernate: false,
                }),
            );
            return;
        };
        // Register first (index 0 reserved for the open answer) so the actor may send from
        // inside the callback; the answer is then inserted ahead of those messages.
        self.io.requests.insert(
            key,
            Req::Ws(WsReq {
                actor_id: slot.meta.actor_id.clone(),
                generation: slot.meta.generation,
                hibernatable: false,
                inbound: InboundIndex::opened(),
                next_out: 1,
                ack_to: None,
                acked: None,
            }),
        );
        let connected = self.io.phase == Phase::Connected;
        let mark = if connected {
            self.io.out.len()
        } else {
            self.io.backlog.len()
        };
        let mut cx = ActorCx {
            io: &mut self.io,
            meta: &mut slot.meta,
        };
        let reply = slot.actor.on_websocket_open(
            &mut cx,
            &WsOpen {
                key,
                path: &open.path,
                headers: &open.headers.0,
            },
        );
        let kind = match reply {
            WsOpenReply::Accept { can_hibernate } => {
                if let Some(Req::Ws(ws)) = self.io.requests.get_mut(&key) {
                    ws.hibernatable = can_hibernate;
                }
                ToServerTunnelMessageKind::WebSocketOpen(ToServerWebSocketOpen { can_hibernate })
            }
            WsOpenReply::Reject { code, reason } => {
                self.io.requests.remove(&key);
                ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                    code: Some(code),
                    reason: Some(reason),
                    hibernate: false,
                })
            }
        };
        let msg = Outgoing::Msg(ToServer::TunnelMessage(ToServerTunnelMessage {
            message_id: msg_id(key, 0),
            message_kind: kind,
        }));
        if connected {
            self.io.out.insert(mark, msg);
        } else {
            self.io.backlog.insert(mark, msg);
            self.io.set_queued();
        }
    }

    fn on_ws_message(&mut self, key: RequestKey, index: u16, data: Bytes, binary: bool) {
        let Some(Req::Ws(ws)) = self.io.requests.get_mut(&key) else {
            tracing::debug!(%key, index, "message for an unknown websocket");
            return;
        };
        // Like the TS runner, only hibernatable sockets are checked: they are the ones the
        // gateway replays.
        if ws.hibernatable {
            match ws.inbound.check(index) {
                Verdict::Deliver => {}
                Verdict::Duplicate => {
                    Counters::bump(&self.io.counters.duplicates_dropped);
                    // The gateway replays only what it still holds, so an ack that covered
                    // this index was lost with a connection. Send the newest one again (acks
                    // are cumulative): nothing else would, and the gateway would keep the
                    // messages until its ack timeout closes the client.
                    if let Some(acked) = ws.acked.filter(|&a| !after(index, a)) {
                        self.io.set_ack(key, acked);
                    }
                    return;
                }
                Verdict::Gap { expected, got } => {
                    Counters::bump(&self.io.counters.gaps);
                    tracing::warn!(%key, expected, got, "websocket message index skipped, closing");
                    self.io.push_ws(
                        key,
                        ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                            code: Some(GAP_CLOSE_CODE),
                            reason: Some(GAP_CLOSE_REASON.into()),
                            hibernate: false,
                        }),
                    );
                    if let Some(Req::Ws(ws)) = self.io.requests.remove(&key) {
                        self.call_close(&ws, key, Some(GAP_CLOSE_CODE), Some(GAP_CLOSE_REASON));
                    }
                    return;
                }
            }
        }
        let hibernatable = ws.hibernatable;
        let (actor_id, generation) = (ws.actor_id.clone(), ws.generation);
        let Some(slot) = self
            .actors
            .get_mut(&actor_id)
            .filter(|s| s.meta.generation == generation)
        else {
            self.io.requests.remove(&key);
            return;
        };
        Counters::bump(&self.io.counters.messages);
        let mut cx = ActorCx {
            io: &mut self.io,
            meta: &mut slot.meta,
        };
        slot.actor
            .on_websocket_message(&mut cx, key, index, data, binary);
        if hibernatable && slot.meta.ack_policy == AckPolicy::Immediate {
            self.io.set_ack(key, index);
        }
    }
}
