//! One shard's state: its slab of connections, the runner routing table it learned from the
//! control plane, its share of the pending budget, and the routing of tunnel traffic.
//!
//! Everything here runs on the shard's own thread inside `Rc<RefCell<…>>`; a borrow is never
//! held across an `.await`. Decisions about a client socket's window are delegated to
//! [`crate::tunnel::TunnelSocket`]; this file only applies the actions it returns.

use super::control::ControlMsg;
use super::{RequestKey, Shared};
use crate::engine::ConnRef;
use crate::metrics::{CloseLabel, Counter, Gauge, RecentlyClosed, ShardMetrics};
use crate::protocol::{self, ToClient, ToClientTunnelMessage, ToClientTunnelMessageKind};
use crate::tunnel::{
    AckResult, ClientMsg, CloseReason, Detach, DetachCause, SocketState, TunnelSocket, WindowLimits,
};
use crate::ws::frame::{encode_header, OpCode};
use bytes::{Bytes, BytesMut};
use slab::Slab;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{oneshot, Notify};

/// Messages between shards and from the control plane to a shard.
pub enum ShardMsg {
    /// Complete WebSocket frames to write on a runner connection owned by this shard.
    ToRunner {
        slot: u32,
        gen: u32,
        frames: Vec<Bytes>,
    },
    /// The three chunks of one tunnelled message for a runner connection owned by this
    /// shard, moved inline (no list to allocate per message).
    ToRunnerInline {
        slot: u32,
        gen: u32,
        frames: [Bytes; 3],
    },
    /// A tunnel message from a runner (`from`: its runner index, once attached) for a request
    /// owned by this shard.
    Tunnel {
        key: RequestKey,
        msg: TunnelIn,
        from: Option<u32>,
    },
    /// Close a connection owned by this shard.
    CloseConn {
        slot: u32,
        gen: u32,
        code: u16,
        reason: Cow<'static, str>,
    },
    /// The runner `runner_idx` is now reachable at `conn` (after Init).
    RunnerAttached { runner_idx: u32, conn: ConnRef },
    /// The runner's current connection is gone; it may come back unless `lost`.
    RunnerDetached { runner_idx: u32, lost: bool },
    /// The actor stopped: hibernatable sockets hibernate, others close (`actor.stopped`).
    /// A destroyed actor's sockets all close (`actor.destroyed`).
    ActorStopped { actor_id: Arc<str>, destroyed: bool },
    /// The actor reported `Running` (generation `generation`, on runner `runner_idx`):
    /// hibernating sockets of an earlier generation reattach and replay.
    ActorRunning {
        actor_id: Arc<str>,
        generation: u32,
        runner_idx: u32,
    },
    /// Answer to a request this shard made to the control plane.
    Reply { waiter: u32, reply: Reply },
    /// Stop accepting and close everything (SIGTERM).
    Shutdown,
}

/// Runner → request traffic, already decoded.
#[derive(Debug)]
pub enum TunnelIn {
    Open {
        can_hibernate: bool,
    },
    Message {
        data: Bytes,
        binary: bool,
    },
    Ack(u16),
    Close {
        code: Option<u16>,
        reason: Option<String>,
        hibernate: bool,
    },
    /// HTTP response kinds and anything else this shard does not tunnel yet.
    Other(protocol::ToServerTunnelMessageKind),
}

/// Answers from the control plane.
#[derive(Debug)]
pub enum Reply {
    Resolve(Result<Routed, ResolveError>),
    Api { status: u16, body: String },
}

/// Where a routable actor lives now.
#[derive(Debug, Clone)]
pub struct Routed {
    pub actor_id: Arc<str>,
    pub generation: u32,
    pub runner_idx: u32,
    pub conn: ConnRef,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError {
    NotFound,
    Timeout,
    Unavailable,
}

/// Chunks bound for one connection: the three of a tunnelled message inline (the hot path,
/// no allocation), or any list (control-plane and rare messages).
pub enum Frames {
    Three([Bytes; 3]),
    List(Vec<Bytes>),
}

impl From<[Bytes; 3]> for Frames {
    fn from(f: [Bytes; 3]) -> Frames {
        Frames::Three(f)
    }
}

impl From<[Bytes; 2]> for Frames {
    fn from([a, b]: [Bytes; 2]) -> Frames {
        // An empty chunk is never queued.
        Frames::Three([a, b, Bytes::new()])
    }
}

impl From<Vec<Bytes>> for Frames {
    fn from(f: Vec<Bytes>) -> Frames {
        Frames::List(f)
    }
}

/// The chunks of [`Frames`], in order.
pub enum FramesIter {
    Three(std::array::IntoIter<Bytes, 3>),
    List(std::vec::IntoIter<Bytes>),
}

impl Iterator for FramesIter {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        match self {
            FramesIter::Three(i) => i.next(),
            FramesIter::List(i) => i.next(),
        }
    }
}

impl IntoIterator for Frames {
    type Item = Bytes;
    type IntoIter = FramesIter;

    fn into_iter(self) -> FramesIter {
        match self {
            Frames::Three(f) => FramesIter::Three(f.into_iter()),
            Frames::List(f) => FramesIter::List(f.into_iter()),
        }
    }
}

/// Bytes waiting to be written on one socket, flushed by its writer task with one vectored
/// write per turn.
pub struct OutQueue {
    pub chunks: VecDeque<Bytes>,
    pub bytes: usize,
    pub notify: Rc<Notify>,
    /// Set once a close frame is queued: the writer half-closes after flushing.
    pub closing: bool,
    /// The peer does not read, so no close handshake can happen: the writer resets the
    /// connection instead of flushing.
    pub abort: bool,
    /// Bytes the writer has handed to the kernel so far (progress of a slow reader).
    pub written: u64,
}

impl OutQueue {
    fn new() -> OutQueue {
        OutQueue {
            chunks: VecDeque::new(),
            bytes: 0,
            notify: Rc::new(Notify::new()),
            closing: false,
            abort: false,
            written: 0,
        }
    }

    pub fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() || self.closing {
            return;
        }
        self.bytes += chunk.len();
        self.chunks.push_back(chunk);
    }

    /// Queues a close frame; nothing is queued after it and the writer half-closes once it
    /// is flushed.
    pub fn push_close(&mut self, code: u16, reason: &str) {
        let payload = crate::ws::writer::close_payload(code, reason);
        let h = encode_header(true, OpCode::Close, payload.len() as u64, None);
        self.push_all([Bytes::copy_from_slice(h.as_slice()), payload]);
        self.closing = true;
    }

    pub fn push_all(&mut self, frames: impl IntoIterator<Item = Bytes>) {
        for f in frames {
            self.push(f);
        }
        self.notify.notify_one();
    }

    /// Moves up to `max` queued chunks, oldest first, onto the end of `batch` (one vectored
    /// write) and returns their total length. The writer passes the same `batch` every turn,
    /// so once it has grown no turn allocates.
    /// More than `half` bytes queued and no close frame among them: the peer is behind on
    /// reading (see [`Pause::Unread`]).
    fn behind(&self, half: usize) -> bool {
        self.bytes > half && !self.closing
    }

    pub fn take_batch(&mut self, batch: &mut Vec<Bytes>, max: usize) -> usize {
        let n = self.chunks.len().min(max);
        let mut bytes = 0;
        for c in self.chunks.drain(..n) {
            bytes += c.len();
            batch.push(c);
        }
        self.bytes -= bytes;
        bytes
    }
}

/// Why a client socket's reader stops reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// The pending window is full: the runner has not acknowledged enough (woken by acks).
    Window,
    /// More than half of `client_outbound_bytes` is queued to the client: it does not read
    /// what it is sent, so its own input (an echo flood) must stall in its TCP window
    /// instead of costing the shard (woken as its writer makes progress).
    Unread,
}

/// A client WebSocket tunnelled to an actor.
pub struct ClientConn {
    pub actor_id: Arc<str>,
    pub runner_idx: u32,
    pub req: [u8; 4],
    pub socket: TunnelSocket,
    /// Waiting for the runner's `WebSocketOpen` answer.
    pub open_tx: Option<oneshot::Sender<TunnelIn>>,
    /// Woken when a paused socket may be read again.
    pub resume: Rc<Notify>,
    /// The runner was told the socket closed (or owes nothing).
    pub runner_closed: bool,
    /// The actor generation this socket was last attached to.
    pub generation: u32,
    /// Set while the socket hibernates (SPEC §2.6).
    pub hibernation: Option<Hibernation>,
    /// The engine holds a hibernating-request record of this socket, refreshed at this time
    /// next. Every hibernatable socket has one from its open to its close, so whatever starts
    /// the actor lists it (a record made only when the socket hibernates could reach the
    /// control plane after the wake it races with).
    pub record_refresh_at: Option<Instant>,
    /// Runner messages that arrived while hibernating (sender, payload, binary), delivered
    /// once the socket reattaches to that runner.
    pub early: Vec<(Option<u32>, Bytes, bool)>,
    pub early_bytes: usize,
    /// The idle watch of this socket (`timeouts.client_idle_ping_ms`), run by
    /// [`ShardState::idle_scan`]; off until the WebSocket is open.
    pub idle: IdleWatch,
}

/// What the shard's idle scan knows of one client WebSocket: its reads so far, and the
/// period being watched (since when, the reads and written bytes at its start, and whether
/// the client was pinged in it). One scan per shard replaces a timer task per socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdleWatch {
    /// Reads that brought bytes (bumped by the reader, wrapping).
    pub reads: u32,
    /// `reads` at the start of the period.
    seen_reads: u32,
    /// The socket's written bytes at the start of the period.
    seen_written: u64,
    /// Start of the period; `None` while the socket is not watched.
    since: Option<Instant>,
    /// The client was pinged at `since` and owes a sign of life.
    pinged: bool,
}

impl IdleWatch {
    fn restart(&mut self, now: Instant, written: u64) {
        self.since = Some(now);
        self.seen_reads = self.reads;
        self.seen_written = written;
        self.pinged = false;
    }
}

/// What the idle scan does to one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdleAction {
    Ping,
    /// Silent since the ping: 1011 `guard.client_idle_timeout`.
    Close,
    /// Took nothing of its queue for a whole period: reset, `guard.client_too_slow`.
    Abort,
}

impl ClientConn {
    /// A client socket of `actor_id` (generation `generation`) tunnelled to runner
    /// `runner_idx` as request `req`; `open_tx` waits for the runner's `WebSocketOpen`.
    pub fn new(
        actor_id: Arc<str>,
        runner_idx: u32,
        req: [u8; 4],
        socket: TunnelSocket,
        generation: u32,
        open_tx: Option<oneshot::Sender<TunnelIn>>,
    ) -> ClientConn {
        ClientConn {
            actor_id,
            runner_idx,
            req,
            socket,
            open_tx,
            resume: Rc::new(Notify::new()),
            runner_closed: false,
            generation,
            hibernation: None,
            record_refresh_at: None,
            early: Vec::new(),
            early_bytes: 0,
            idle: IdleWatch::default(),
        }
    }
}

/// A hibernating client socket: its actor is down (or handed the socket back), the client
/// stays connected, and the socket reattaches to a later generation of the actor.
#[derive(Debug, Clone, Copy)]
pub struct Hibernation {
    pub since: Instant,
    /// A wake was asked for and the actor has not run since.
    pub waking: bool,
}

pub struct RunnerConn {
    pub last_pong: Instant,
    /// Set when the control plane attached another connection for the same runner: this
    /// one is stale, and its late tunnel messages must not touch the requests (SPEC §1.4).
    pub superseded: bool,
    /// The control plane's index of this runner, once attached.
    pub runner_idx: Option<u32>,
}

/// An HTTP request tunnelled to an actor (SPEC §2.3), waiting for its response.
pub struct RequestConn {
    pub actor_id: Arc<str>,
    pub runner_idx: u32,
    pub req: [u8; 4],
    /// Head of a streamed response (`ResponseStart { stream: true }`) and its body so far.
    pub streamed: Option<(u16, protocol::StrMap, BytesMut)>,
    /// Where the outcome goes; taken once answered.
    pub done: Option<oneshot::Sender<HttpOutcome>>,
}

/// How a tunnelled HTTP request ended.
#[derive(Debug)]
pub enum HttpOutcome {
    Response {
        status: u16,
        headers: protocol::StrMap,
        body: Bytes,
    },
    /// Refused by the gateway: status and `{group}.{code}`.
    Failed { status: u16, code: &'static str },
}

pub enum ConnKind {
    Http,
    Runner(RunnerConn),
    Client(ClientConn),
    Request(RequestConn),
}

pub struct Conn {
    pub gen: u32,
    pub out: OutQueue,
    pub kind: ConnKind,
    /// Shuts the socket down from outside its reader (set by the net layer).
    pub kill: Rc<Notify>,
}

pub struct ShardState {
    pub id: u16,
    pub shared: Shared,
    pub conns: Slab<Conn>,
    next_gen: u32,
    /// runner_idx → where that runner's current connection lives.
    pub runners: Vec<Option<ConnRef>>,
    pub waiters: Slab<oneshot::Sender<Reply>>,
    pub budget: crate::tunnel::Budget,
    pub limits: WindowLimits,
    scratch: BytesMut,
    /// The idle scan's list of sockets to act on, kept between scans.
    idle_todo: Vec<(u32, u32, IdleAction)>,
    /// `WebSocketClose` frames for runners that were away when their client closed; sent
    /// when the runner reattaches so it does not keep the request forever.
    owed_closes: Vec<(u32, Vec<Bytes>)>,
    /// Client WebSockets closed lately: the runner's late messages for them are expected
    /// (`torpor_tunnel_late_messages_total`), not unroutable.
    recently_closed: RecentlyClosed,
}

pub const TRUE_BYTE: Bytes = Bytes::from_static(&[1]);
pub const FALSE_BYTE: Bytes = Bytes::from_static(&[0]);

impl ShardState {
    pub fn new(id: u16, shared: Shared) -> ShardState {
        let n = shared.shards.len().max(1) as u64;
        let cfg = &shared.config.limits;
        ShardState {
            id,
            budget: crate::tunnel::Budget::new(cfg.pending_bytes_global / n),
            limits: WindowLimits {
                max_bytes: cfg.pending_bytes_per_socket,
                max_messages: cfg.pending_messages_per_socket,
            },
            shared,
            conns: Slab::new(),
            next_gen: 0,
            runners: Vec::new(),
            waiters: Slab::new(),
            scratch: BytesMut::with_capacity(64 * 1024),
            idle_todo: Vec::new(),
            owed_closes: Vec::new(),
            recently_closed: RecentlyClosed::default(),
        }
    }

    pub fn metrics(&self) -> &ShardMetrics {
        &self.shared.metrics.shards[self.id as usize]
    }

    pub fn insert(&mut self, kind: ConnKind) -> (u32, u32) {
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen;
        let slot = self.conns.insert(Conn {
            gen,
            out: OutQueue::new(),
            kind,
            kill: Rc::new(Notify::new()),
        }) as u32;
        (slot, gen)
    }

    /// Registers a client WebSocket of `actor_id` (generation `generation`) tunnelled to
    /// runner `runner_idx`: a slab entry whose request id names it. `open_tx` waits for the
    /// runner's `WebSocketOpen`. Returns (slot, gen, request id).
    pub fn insert_client(
        &mut self,
        actor_id: Arc<str>,
        runner_idx: u32,
        generation: u32,
        socket: TunnelSocket,
        open_tx: Option<oneshot::Sender<TunnelIn>>,
    ) -> (u32, u32, [u8; 4]) {
        let (slot, gen) = self.insert(ConnKind::Http);
        let req = self.request_key(slot, gen).encode();
        self.conns[slot as usize].kind = ConnKind::Client(ClientConn::new(
            actor_id, runner_idx, req, socket, generation, open_tx,
        ));
        (slot, gen, req)
    }

    pub fn conn_ref(&self, slot: u32, gen: u32) -> ConnRef {
        ConnRef {
            shard: self.id,
            slot,
            gen,
        }
    }

    pub fn get(&mut self, slot: u32, gen: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot as usize).filter(|c| c.gen == gen)
    }

    pub fn request_key(&self, slot: u32, gen: u32) -> RequestKey {
        RequestKey {
            shard: self.id,
            slot,
            gen,
        }
    }

    /// Finds the client conn a request id names, checking its generation bits.
    fn client_by_key(&mut self, key: RequestKey) -> Option<(u32, u32)> {
        let c = self.conns.get(key.slot as usize)?;
        match &c.kind {
            ConnKind::Client(cc) if RequestKey::decode(cc.req) == key => Some((key.slot, c.gen)),
            _ => None,
        }
    }

    pub fn wait(&mut self) -> (u32, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        (self.waiters.insert(tx) as u32, rx)
    }

    pub fn waiter_id(&self, waiter: u32) -> u64 {
        ((self.id as u64) << 32) | waiter as u64
    }

    pub fn control(&self, msg: ControlMsg) {
        let _ = self.shared.control.send(msg);
    }

    // ---- framing -------------------------------------------------------------------------

    /// A small header chunk carved from the shard's scratch buffer (no allocation per
    /// message in steady state).
    fn small(&mut self, parts: &[&[u8]]) -> Bytes {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if self.scratch.capacity() - self.scratch.len() < len {
            self.scratch.reserve(64 * 1024);
        }
        for p in parts {
            self.scratch.extend_from_slice(p);
        }
        self.scratch.split().freeze()
    }

    /// Server frame carrying `payload` (header chunk + the payload itself, not copied).
    pub fn ws_frame(&mut self, op: OpCode, payload: Bytes) -> [Bytes; 2] {
        let h = encode_header(true, op, payload.len() as u64, None);
        [self.small(&[h.as_slice()]), payload]
    }

    /// A whole `ToClient` message as one binary frame (control-plane and rare messages).
    pub fn runner_frame(&mut self, msg: &ToClient) -> Vec<Bytes> {
        let body = Bytes::from(protocol::encode_to_client(msg));
        self.ws_frame(OpCode::Binary, body).to_vec()
    }

    /// The hot path: `TunnelMessage(WebSocketMessage)` framed as
    /// [ws header + protocol prefix][payload][binary flag] — the payload is not copied, and
    /// nothing is allocated (the header comes from the scratch buffer, the flag is static).
    pub fn ws_message_frames(
        &mut self,
        req: [u8; 4],
        index: u16,
        data: Bytes,
        binary: bool,
    ) -> [Bytes; 3] {
        let prefix =
            protocol::hot::encode_ws_message_prefix(self.shared.gateway_id, req, index, data.len());
        let total = prefix.as_bytes().len() + data.len() + 1;
        let h = encode_header(true, OpCode::Binary, total as u64, None);
        let head = self.small(&[h.as_slice(), prefix.as_bytes()]);
        [head, data, if binary { TRUE_BYTE } else { FALSE_BYTE }]
    }

    pub fn tunnel_frames(
        &mut self,
        req: [u8; 4],
        index: u16,
        kind: ToClientTunnelMessageKind,
    ) -> Vec<Bytes> {
        let msg = ToClient::TunnelMessage(ToClientTunnelMessage {
            message_id: protocol::MessageId {
                gateway_id: self.shared.gateway_id,
                request_id: req,
                message_index: index,
            },
            message_kind: kind,
        });
        self.runner_frame(&msg)
    }

    // ---- routing -------------------------------------------------------------------------

    /// Writes frames to a connection of this shard.
    pub fn write_local(
        &mut self,
        slot: u32,
        gen: u32,
        frames: impl IntoIterator<Item = Bytes>,
    ) -> bool {
        match self.get(slot, gen) {
            Some(c) => {
                c.out.push_all(frames);
                true
            }
            None => false,
        }
    }

    /// Sends frames to the runner's current connection, wherever it lives.
    pub fn send_to_runner(&mut self, runner_idx: u32, frames: impl Into<Frames>) -> bool {
        let Some(Some(conn)) = self.runners.get(runner_idx as usize).copied() else {
            return false;
        };
        self.send_to_conn(conn, frames)
    }

    /// Sends frames to a connection of any shard; a tunnelled message crosses to another
    /// shard inline, without a list allocated for it.
    pub fn send_to_conn(&mut self, conn: ConnRef, frames: impl Into<Frames>) -> bool {
        let frames = frames.into();
        if conn.shard == self.id {
            return self.write_local(conn.slot, conn.gen, frames);
        }
        let (slot, gen) = (conn.slot, conn.gen);
        self.shared.shards[conn.shard as usize].send(match frames {
            Frames::Three(frames) => ShardMsg::ToRunnerInline { slot, gen, frames },
            Frames::List(frames) => ShardMsg::ToRunner { slot, gen, frames },
        });
        true
    }

    /// Routes a runner's tunnel message to the request it names. `from` is the sending
    /// runner's index (`None` in the instant between its `Init` and its attachment).
    pub fn route_tunnel(&mut self, req: [u8; 4], msg: TunnelIn, from: Option<u32>, now: Instant) {
        let key = RequestKey::decode(req);
        if key.shard == self.id {
            self.tunnel_in(key, msg, from, now);
        } else if let Some(mb) = self.shared.shards.get(key.shard as usize) {
            mb.send(ShardMsg::Tunnel { key, msg, from });
        } else {
            self.metrics().inc(Counter::UnroutableTunnelMessages);
        }
    }

    /// Applies runner → client traffic to a local client socket. Only the runner that hosts
    /// the request may touch it; anything else is ignored and counted.
    pub fn tunnel_in(&mut self, key: RequestKey, msg: TunnelIn, from: Option<u32>, now: Instant) {
        let owner = |idx: u32| from.is_none_or(|f| f == idx);
        if let Some(c) = self.conns.get(key.slot as usize) {
            if let ConnKind::Request(r) = &c.kind {
                if RequestKey::decode(r.req) == key && owner(r.runner_idx) {
                    let gen = c.gen;
                    self.request_in(key.slot, gen, msg);
                } else if RequestKey::decode(r.req) == key {
                    self.metrics().inc(Counter::UnroutableTunnelMessages);
                } else {
                    self.count_stray(key, now);
                }
                return;
            }
        }
        let Some((slot, gen)) = self.client_by_key(key) else {
            self.count_stray(key, now);
            return;
        };
        if let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind {
            if cc.hibernation.is_some() {
                // A restored socket's first messages can overtake the `Running` that
                // reattaches it (they come straight from the runner's shard): keep them until
                // then, bounded. Acks and the rest are about the old attachment.
                let limit = self.shared.config.limits.client_outbound_bytes;
                match msg {
                    TunnelIn::Message { data, binary } if cc.early_bytes + data.len() <= limit => {
                        cc.early_bytes += data.len();
                        cc.early.push((from, data, binary));
                    }
                    // Acks and closes of the attachment that ended: expected, late.
                    _ => self.metrics().inc(Counter::LateTunnelMessages),
                }
                return;
            }
            if !owner(cc.runner_idx) {
                self.metrics().inc(Counter::UnroutableTunnelMessages);
                return;
            }
        }
        match msg {
            TunnelIn::Message { data, binary } => {
                let len = data.len();
                let op = if binary { OpCode::Binary } else { OpCode::Text };
                let frames = self.ws_frame(op, data);
                let limit = self.shared.config.limits.client_outbound_bytes;
                let m = self.metrics();
                m.inc(Counter::MessagesToClient);
                m.add(Counter::BytesToClient, len as u64);
                let conn = self.get(slot, gen).expect("checked above");
                // Too slow = had more than the limit unread before this message (one message
                // larger than the limit alone is not the client's fault).
                let too_slow = conn.out.bytes > limit;
                conn.out.push_all(frames);
                if too_slow {
                    self.abort_client(slot, gen, "guard.client_too_slow", now);
                }
            }
            TunnelIn::Ack(index) => self.on_ack(slot, gen, index, now),
            TunnelIn::Open { .. } | TunnelIn::Close { .. } | TunnelIn::Other(_) => {
                let conn = self.get(slot, gen).expect("checked above");
                let closing = conn.out.closing;
                let ConnKind::Client(cc) = &mut conn.kind else {
                    return;
                };
                if let Some(tx) = cc.open_tx.take() {
                    let _ = tx.send(msg);
                    return;
                }
                match msg {
                    TunnelIn::Close {
                        hibernate: true, ..
                    } if cc.socket.is_hibernatable() && cc.hibernation.is_none() => {
                        // The actor hands the socket to the gateway; it comes back with a
                        // later generation of the actor (CommandStartActor lists it).
                        self.detach_for_hibernation(
                            slot,
                            gen,
                            DetachCause::HibernateRequested,
                            now,
                        );
                    }
                    // The runner's answer to the gateway's close (its request is closed).
                    TunnelIn::Close { .. } if closing => {
                        self.metrics().inc(Counter::LateTunnelMessages);
                    }
                    TunnelIn::Close { code, reason, .. } => {
                        cc.runner_closed = true;
                        let reason = reason.unwrap_or_else(|| "ws.closed".to_string());
                        let code = code.unwrap_or(1000);
                        self.close_client_as(slot, gen, code, reason, CloseLabel::ActorClosed, now);
                    }
                    _ => self.metrics().inc(Counter::UnroutableTunnelMessages),
                }
            }
        }
    }

    /// Runner → gateway traffic of a tunnelled HTTP request: the response head (and body),
    /// body chunks of a streamed response, or an abort.
    fn request_in(&mut self, slot: u32, gen: u32, msg: TunnelIn) {
        let body_limit = self.shared.config.limits.http_body_bytes;
        let Some(Conn {
            kind: ConnKind::Request(rc),
            ..
        }) = self.conns.get_mut(slot as usize).filter(|c| c.gen == gen)
        else {
            return;
        };
        let outcome = match msg {
            TunnelIn::Other(protocol::ToServerTunnelMessageKind::ResponseStart(r))
                if rc.streamed.is_none() =>
            {
                let body = r.body.unwrap_or_default();
                if r.stream {
                    rc.streamed = Some((r.status, r.headers, BytesMut::from(&body[..])));
                    None
                } else {
                    Some(HttpOutcome::Response {
                        status: r.status,
                        headers: r.headers,
                        body: Bytes::from(body),
                    })
                }
            }
            TunnelIn::Other(protocol::ToServerTunnelMessageKind::ResponseChunk(c))
                if rc.streamed.is_some() =>
            {
                let (_, _, buf) = rc.streamed.as_mut().expect("checked");
                if buf.len() + c.body.len() > body_limit {
                    rc.streamed = None;
                    Some(HttpOutcome::Failed {
                        status: 502,
                        code: "request.response_too_large",
                    })
                } else {
                    buf.extend_from_slice(&c.body);
                    if c.finish {
                        let (status, headers, buf) = rc.streamed.take().expect("checked");
                        Some(HttpOutcome::Response {
                            status,
                            headers,
                            body: buf.freeze(),
                        })
                    } else {
                        None
                    }
                }
            }
            TunnelIn::Other(protocol::ToServerTunnelMessageKind::ResponseAbort) => {
                Some(HttpOutcome::Failed {
                    status: 503,
                    code: "request.aborted",
                })
            }
            _ => {
                self.metrics().inc(Counter::UnroutableTunnelMessages);
                return;
            }
        };
        if let Some(o) = outcome {
            self.finish_request(slot, gen, o);
        }
    }

    /// Answers a tunnelled HTTP request (once); its task removes the slab entry.
    pub fn finish_request(&mut self, slot: u32, gen: u32, outcome: HttpOutcome) {
        if let Some(Conn {
            kind: ConnKind::Request(rc),
            ..
        }) = self.conns.get_mut(slot as usize).filter(|c| c.gen == gen)
        {
            if let Some(tx) = rc.done.take() {
                let _ = tx.send(outcome);
            }
        }
    }

    /// Fails every tunnelled HTTP request that matches `pred` (its runner or actor is gone).
    fn fail_requests(&mut self, code: &'static str, pred: impl Fn(&RequestConn) -> bool) {
        let hit: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter_map(|(s, c)| match &c.kind {
                ConnKind::Request(r) if r.done.is_some() && pred(r) => Some((s as u32, c.gen)),
                _ => None,
            })
            .collect();
        for (slot, gen) in hit {
            self.finish_request(slot, gen, HttpOutcome::Failed { status: 503, code });
        }
    }

    fn on_ack(&mut self, slot: u32, gen: u32, index: u16, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot as usize).filter(|c| c.gen == gen) else {
            return;
        };
        let ConnKind::Client(cc) = &mut conn.kind else {
            return;
        };
        // Gauges follow the window's own totals before and after: a resumed message may be
        // admitted, held, or refused by the global cap (which clears the whole window).
        let before = (cc.socket.pending_bytes(), cc.socket.pending_len());
        let was_paused = cc.socket.is_paused();
        let AckResult {
            freed_messages,
            freed_bytes: _,
            ignored,
            resumed,
            resume_reading,
        } = cc.socket.on_ack(index, now, &mut self.budget);
        let after = (cc.socket.pending_bytes(), cc.socket.pending_len());
        let unpaused = was_paused && !cc.socket.is_paused();
        let runner_idx = cc.runner_idx;
        let req = cc.req;
        if resume_reading {
            cc.resume.notify_one();
        }
        let m = &self.shared.metrics.shards[self.id as usize];
        m.inc(Counter::Acks);
        if ignored.is_some() {
            m.inc(Counter::AcksIgnored);
        }
        m.add(Counter::AckedMessages, freed_messages as u64);
        window_gauges(m, before, after);
        if unpaused {
            m.gauge_add(Gauge::PausedClientWebSockets, -1);
        }
        match resumed {
            Some(ClientMsg::Send {
                index,
                data,
                binary,
            }) => {
                let len = data.len();
                m.inc(Counter::MessagesToRunner);
                m.add(Counter::BytesToRunner, len as u64);
                let frames = self.ws_message_frames(req, index, data, binary);
                self.send_to_runner(runner_idx, frames);
            }
            Some(ClientMsg::Close(r)) => self.close_client(slot, gen, r.code, r.reason, now),
            _ => {}
        }
    }

    /// A data frame from a client: the window decides, this applies.
    pub fn client_message(&mut self, slot: u32, gen: u32, data: Bytes, binary: bool, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot as usize).filter(|c| c.gen == gen) else {
            return;
        };
        let ConnKind::Client(cc) = &mut conn.kind else {
            return;
        };
        let len = data.len();
        let before = (cc.socket.pending_bytes(), cc.socket.pending_len());
        let outcome = cc
            .socket
            .on_client_message(data, binary, now, &mut self.budget);
        // A refusal by the global cap clears the whole window inside the socket, so the
        // gauges follow the window's totals, not the outcome.
        let after = (cc.socket.pending_bytes(), cc.socket.pending_len());
        let runner_idx = cc.runner_idx;
        let req = cc.req;
        let m = &self.shared.metrics.shards[self.id as usize];
        window_gauges(m, before, after);
        match outcome {
            ClientMsg::Send {
                index,
                data,
                binary,
            } => {
                m.inc(Counter::MessagesToRunner);
                m.add(Counter::BytesToRunner, len as u64);
                let frames = self.ws_message_frames(req, index, data, binary);
                self.send_to_runner(runner_idx, frames);
            }
            ClientMsg::Held { .. } => self.wake_for(slot),
            ClientMsg::Paused => {
                m.inc(Counter::BackpressurePauses);
                m.gauge_add(Gauge::PausedClientWebSockets, 1);
            }
            ClientMsg::Close(reason) => {
                self.close_client(slot, gen, reason.code, reason.reason, now);
            }
            // The reader never offers a message while paused or opening; a closed socket
            // discards.
            ClientMsg::NotReady { .. } | ClientMsg::Dropped => {}
        }
    }

    /// Live (not closing) client sockets matching `pred`, as (slot, gen).
    fn clients_where(&self, pred: impl Fn(&ClientConn) -> bool) -> Vec<(u32, u32)> {
        self.conns
            .iter()
            .filter_map(|(s, c)| match &c.kind {
                ConnKind::Client(cc) if !c.out.closing && pred(cc) => Some((s as u32, c.gen)),
                _ => None,
            })
            .collect()
    }

    /// Is this client socket's reader to stop, and why? It waits on the returned `resume`
    /// and asks again when woken.
    pub fn client_paused(&self, slot: u32, gen: u32) -> Option<(Rc<Notify>, Pause)> {
        let c = self.conns.get(slot as usize).filter(|c| c.gen == gen)?;
        let ConnKind::Client(cc) = &c.kind else {
            return None;
        };
        let pause = if cc.socket.is_paused() {
            Pause::Window
        } else if self.unread(&c.out) {
            Pause::Unread
        } else {
            return None;
        };
        Some((cc.resume.clone(), pause))
    }

    /// Is this client behind on reading what it was sent (see [`Pause::Unread`])?
    pub fn client_out_full(&self, slot: u32, gen: u32) -> bool {
        self.conns
            .get(slot as usize)
            .filter(|c| c.gen == gen && matches!(c.kind, ConnKind::Client(_)))
            .is_some_and(|c| self.unread(&c.out))
    }

    fn unread(&self, out: &OutQueue) -> bool {
        out.behind(self.shared.config.limits.client_outbound_bytes / 2)
    }

    /// Closes a client that does not read: like [`Self::close_client`] (the runner is told,
    /// the metric counts `reason`), but the connection is reset at once, since a close frame
    /// queued behind what the client never read would not reach it.
    pub fn abort_client(&mut self, slot: u32, gen: u32, reason: &'static str, now: Instant) {
        self.close_client(slot, gen, 1011, reason, now);
        if let Some(c) = self.get(slot, gen) {
            c.out.abort = true;
            c.out.notify.notify_one();
        }
    }

    /// Queues a close frame to a client, tells the runner, and frees the window. The reader
    /// task removes the slab entry when the socket ends.
    ///
    /// The metric counts `reason` when it is one of the gateway's own reasons; any other text
    /// is the client's own close frame (the reader passes it on), counted as `client.closed`.
    pub fn close_client(
        &mut self,
        slot: u32,
        gen: u32,
        code: u16,
        reason: impl Into<Cow<'static, str>>,
        now: Instant,
    ) {
        let reason = reason.into();
        let label = CloseLabel::of(&reason).unwrap_or(CloseLabel::ClientClosed);
        self.close_client_as(slot, gen, code, reason, label, now);
    }

    /// [`Self::close_client`], counted under `label`.
    pub fn close_client_as(
        &mut self,
        slot: u32,
        gen: u32,
        code: u16,
        reason: impl Into<Cow<'static, str>>,
        label: CloseLabel,
        now: Instant,
    ) {
        let reason = reason.into();
        let Some(conn) = self.conns.get_mut(slot as usize).filter(|c| c.gen == gen) else {
            return;
        };
        if conn.out.closing {
            return;
        }
        let m = &self.shared.metrics.shards[self.id as usize];
        m.close_as(label);
        if let ConnKind::Client(cc) = &conn.kind {
            self.recently_closed.insert(cc.req, now);
        }
        conn.out.push_close(code, &reason);
        let is_client = matches!(conn.kind, ConnKind::Client(_));
        let mut tell_runner = None;
        if is_client {
            self.release_window(slot);
            self.leave_hibernation(slot);
            self.forget_record(slot);
            if let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind {
                if !cc.runner_closed {
                    cc.runner_closed = true;
                    tell_runner =
                        Some((cc.runner_idx, cc.req, cc.socket.next_index(), code, reason));
                }
            }
        }
        if let Some((runner_idx, req, index, code, reason)) = tell_runner {
            let frames = self.tunnel_frames(
                req,
                index,
                ToClientTunnelMessageKind::WebSocketClose(protocol::ToClientWebSocketClose {
                    code: Some(code),
                    reason: Some(reason.into_owned()),
                }),
            );
            if !self.send_to_runner(runner_idx, frames.clone()) {
                self.owed_closes.push((runner_idx, frames));
            }
        }
    }

    /// Counts a runner message for a request this shard does not have: late when its client
    /// WebSocket closed lately (the runner's answer to the close, last acks), else unroutable.
    fn count_stray(&mut self, key: RequestKey, now: Instant) {
        let c = if self.recently_closed.contains(key.encode(), now) {
            Counter::LateTunnelMessages
        } else {
            Counter::UnroutableTunnelMessages
        };
        self.metrics().inc(c);
    }

    /// Frees a client's pending window (bytes back to the shard budget, gauges down).
    pub fn release_window(&mut self, slot: u32) {
        let Some(conn) = self.conns.get_mut(slot as usize) else {
            return;
        };
        let ConnKind::Client(cc) = &mut conn.kind else {
            return;
        };
        let (pb, pm) = (cc.socket.pending_bytes(), cc.socket.pending_len());
        let was_paused = cc.socket.is_paused();
        cc.socket.close(&mut self.budget);
        cc.resume.notify_one();
        let m = &self.shared.metrics.shards[self.id as usize];
        m.gauge_add(Gauge::PendingBytes, -(pb as i64));
        m.gauge_add(Gauge::PendingMessages, -(pm as i64));
        if was_paused {
            m.gauge_add(Gauge::PausedClientWebSockets, -1);
        }
    }

    /// Ack-timeout pass: closes the sockets whose oldest pending message is too old.
    pub fn gc(&mut self, now: Instant) {
        let timeout = crate::config::ms(self.shared.config.timeouts.ack_timeout_ms);
        let expired: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter_map(|(slot, c)| match &c.kind {
                ConnKind::Client(cc) if !c.out.closing && cc.socket.ack_expired(now, timeout) => {
                    Some((slot as u32, c.gen))
                }
                _ => None,
            })
            .collect();
        for (slot, gen) in expired {
            let r = CloseReason::NOT_ACKED;
            self.close_client(slot, gen, r.code, r.reason, now);
        }
        self.hibernation_pass(now);
    }

    /// A read brought bytes from this client (the idle scan counts them). Returns whether the
    /// connection is still there.
    pub fn client_read(&mut self, slot: u32, gen: u32) -> bool {
        let Some(c) = self.get(slot, gen) else {
            return false;
        };
        if let ConnKind::Client(cc) = &mut c.kind {
            cc.idle.reads = cc.idle.reads.wrapping_add(1);
        }
        true
    }

    /// The idle watch of every open client WebSocket, run every [`Self::idle_scan_period`]. A
    /// socket whose client sent nothing for `timeouts.client_idle_ping_ms` is pinged; if it
    /// still sends nothing for `timeouts.client_pong_timeout_ms` it is closed with 1011
    /// `guard.client_idle_timeout`. Any bytes count, not only the pong. A socket paused by
    /// its window is not read, so its silence is not the client's: its period starts again.
    /// One behind on reading (see [`Pause::Unread`]) is alive only if it took some of its
    /// queue during the period; otherwise it is reset (`guard.client_too_slow`), since a
    /// ping would only queue behind the rest.
    pub fn idle_scan(&mut self, now: Instant) {
        let t = &self.shared.config.timeouts;
        if t.client_idle_ping_ms == 0 {
            return;
        }
        let (idle, pong) = (
            crate::config::ms(t.client_idle_ping_ms),
            crate::config::ms(t.client_pong_timeout_ms),
        );
        let half = self.shared.config.limits.client_outbound_bytes / 2;
        let mut todo = std::mem::take(&mut self.idle_todo);
        for (slot, c) in self.conns.iter_mut() {
            let ConnKind::Client(cc) = &mut c.kind else {
                continue;
            };
            let w = &mut cc.idle;
            let Some(since) = w.since else {
                continue;
            };
            let out = &c.out;
            if out.closing {
                w.since = None;
                continue;
            }
            let due = since + if w.pinged { pong } else { idle };
            if now < due {
                continue;
            }
            let action = if !w.pinged && out.behind(half) {
                // Not read by us because it does not read.
                (out.written == w.seen_written).then_some(IdleAction::Abort)
            } else if cc.socket.is_paused() || w.reads != w.seen_reads {
                None
            } else if w.pinged {
                Some(IdleAction::Close)
            } else {
                Some(IdleAction::Ping)
            };
            match action {
                Some(IdleAction::Ping) => {
                    w.since = Some(now);
                    w.pinged = true;
                }
                Some(_) => w.since = None,
                None => w.restart(now, out.written),
            }
            if let Some(a) = action {
                todo.push((slot as u32, c.gen, a));
            }
        }
        for (slot, gen, action) in todo.drain(..) {
            match action {
                IdleAction::Ping => {
                    self.metrics().inc(Counter::ClientIdlePings);
                    let frames = self.ws_frame(OpCode::Ping, Bytes::new());
                    self.write_local(slot, gen, frames);
                }
                IdleAction::Close => self.close_client(
                    slot,
                    gen,
                    crate::ws::close::INTERNAL_ERROR,
                    "guard.client_idle_timeout",
                    now,
                ),
                IdleAction::Abort => self.abort_client(slot, gen, "guard.client_too_slow", now),
            }
        }
        self.idle_todo = todo;
    }

    /// How often [`Self::idle_scan`] runs: a quarter of the shorter of the idle and pong
    /// timeouts, between 5 ms and 1 s, so a ping or close comes at most that late. `None`
    /// when idle pings are off.
    pub fn idle_scan_period(&self) -> Option<std::time::Duration> {
        let t = &self.shared.config.timeouts;
        (t.client_idle_ping_ms > 0).then(|| {
            let quarter = t.client_idle_ping_ms.min(t.client_pong_timeout_ms) / 4;
            crate::config::ms(quarter.clamp(5, 1000))
        })
    }

    /// Refreshes the engine's records of hibernatable sockets (every `hibernation_refresh_ms`
    /// plus jitter, in one message) and closes the sockets that hibernated longer than
    /// `hibernation_max_ms`.
    fn hibernation_pass(&mut self, now: Instant) {
        let t = &self.shared.config.timeouts;
        let max = (t.hibernation_max_ms > 0).then(|| crate::config::ms(t.hibernation_max_ms));
        let gw = self.shared.gateway_id;
        let mut refresh = Vec::new();
        let mut expired = Vec::new();
        for (slot, c) in self.conns.iter() {
            let ConnKind::Client(cc) = &c.kind else {
                continue;
            };
            if c.out.closing {
                continue;
            }
            if let Some(h) = cc.hibernation {
                if max.is_some_and(|max| now.saturating_duration_since(h.since) > max) {
                    expired.push((slot as u32, c.gen));
                    continue;
                }
            }
            if cc.record_refresh_at.is_some_and(|at| now >= at) {
                refresh.push(slot as u32);
            }
        }
        let mut records = Vec::with_capacity(refresh.len());
        for slot in refresh {
            let next = now + self.refresh_interval();
            if let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind {
                cc.record_refresh_at = Some(next);
                records.push((cc.actor_id.clone(), hibernating_request(gw, cc.req)));
            }
        }
        if !records.is_empty() {
            self.control(ControlMsg::HibernatingRefresh(records));
        }
        for (slot, gen) in expired {
            let r = CloseReason::HIBERNATION_TIMEOUT;
            self.close_client(slot, gen, r.code, r.reason, now);
        }
    }

    fn refresh_interval(&self) -> std::time::Duration {
        let base = self.shared.config.timeouts.hibernation_refresh_ms;
        crate::config::ms(base + rand::random::<u64>() % (base / 8 + 1))
    }

    /// The runner accepted the client's socket (`WebSocketOpen { canHibernate }`); a
    /// hibernatable one gets its engine record now.
    pub fn client_opened(&mut self, slot: u32, gen: u32, can_hibernate: bool, now: Instant) {
        let next = now + self.refresh_interval();
        let gw = self.shared.gateway_id;
        let Some(Conn {
            kind: ConnKind::Client(cc),
            out,
            ..
        }) = self.conns.get_mut(slot as usize).filter(|c| c.gen == gen)
        else {
            return;
        };
        cc.socket.on_runner_open(can_hibernate);
        cc.idle.restart(now, out.written);
        if can_hibernate {
            cc.record_refresh_at = Some(next);
            let msg = ControlMsg::Hibernating {
                actor_id: cc.actor_id.clone(),
                req: hibernating_request(gw, cc.req),
                keep: true,
            };
            self.control(msg);
        }
    }

    /// The socket hibernates (SPEC §2.6): it waits for a later generation of its actor, and a
    /// non-empty window wakes the actor at once. The socket must already be detached (its
    /// window kept). Idempotent.
    fn enter_hibernation(&mut self, slot: u32, now: Instant) {
        let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind else {
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
            self.wake_for(slot);
        }
    }

    /// Asks the control plane to start the actor of a hibernating socket (once per sleep).
    fn wake_for(&mut self, slot: u32) {
        let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind else {
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

    /// The socket stops hibernating (reattached or closed).
    fn leave_hibernation(&mut self, slot: u32) {
        let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind else {
            return;
        };
        if cc.hibernation.take().is_some() {
            self.metrics().gauge_add(Gauge::HibernatingWebSockets, -1);
        }
    }

    /// The socket closed: the engine forgets its record.
    fn forget_record(&mut self, slot: u32) {
        let gw = self.shared.gateway_id;
        let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind else {
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
    fn actor_running(&mut self, actor_id: &str, generation: u32, runner_idx: u32, now: Instant) {
        let Some(Some(conn)) = self.runners.get(runner_idx as usize).copied() else {
            return;
        };
        let slots: Vec<u32> = self
            .conns
            .iter()
            .filter_map(|(s, c)| match &c.kind {
                ConnKind::Client(cc)
                    if &*cc.actor_id == actor_id
                        && !c.out.closing
                        && cc.hibernation.is_some()
                        && generation > cc.generation =>
                {
                    Some(s as u32)
                }
                _ => None,
            })
            .collect();
        for slot in slots {
            self.leave_hibernation(slot);
            let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind else {
                continue;
            };
            cc.runner_idx = runner_idx;
            cc.generation = generation;
            cc.runner_closed = false;
            let early = std::mem::take(&mut cc.early);
            cc.early_bytes = 0;
            self.metrics().inc(Counter::HibernationWakes);
            self.replay(slot, conn, now);
            let key = RequestKey::decode(self.request_of(slot));
            for (from, data, binary) in early {
                self.tunnel_in(key, TunnelIn::Message { data, binary }, from, now);
            }
        }
    }

    fn request_of(&self, slot: u32) -> [u8; 4] {
        match &self.conns[slot as usize].kind {
            ConnKind::Client(cc) => cc.req,
            _ => [0; 4],
        }
    }

    /// Sends a socket's whole pending window, oldest first, original indices.
    fn replay(&mut self, slot: u32, conn: ConnRef, now: Instant) {
        let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind else {
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
            let m = &self.shared.metrics.shards[self.id as usize];
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

    /// Messages from other shards and the control plane.
    pub fn on_msg(&mut self, msg: ShardMsg, now: Instant) {
        match msg {
            ShardMsg::ToRunner { slot, gen, frames } => {
                self.write_local(slot, gen, frames);
            }
            ShardMsg::ToRunnerInline { slot, gen, frames } => {
                self.write_local(slot, gen, frames);
            }
            ShardMsg::Tunnel { key, msg, from } => self.tunnel_in(key, msg, from, now),
            ShardMsg::CloseConn {
                slot,
                gen,
                code,
                reason,
            } => self.close_conn(slot, gen, code, reason),
            ShardMsg::RunnerAttached { runner_idx, conn } => {
                self.runner_attached(runner_idx, conn, now)
            }
            ShardMsg::RunnerDetached { runner_idx, lost } => {
                self.runner_detached(runner_idx, now);
                if lost {
                    // A lost runner's record is gone (its index may be reused): nothing is
                    // owed to it any more, and its sockets hibernate.
                    self.owed_closes.retain(|(idx, _)| *idx != runner_idx);
                    self.runner_lost(runner_idx, now);
                }
            }
            ShardMsg::ActorStopped {
                actor_id,
                destroyed: false,
            } => self.actor_stopped(&actor_id, now),
            ShardMsg::ActorStopped {
                actor_id,
                destroyed: true,
            } => self.actor_destroyed(&actor_id, now),
            ShardMsg::ActorRunning {
                actor_id,
                generation,
                runner_idx,
            } => self.actor_running(&actor_id, generation, runner_idx, now),
            ShardMsg::Reply { waiter, reply } => {
                if self.waiters.contains(waiter as usize) {
                    let _ = self.waiters.remove(waiter as usize).send(reply);
                }
            }
            ShardMsg::Shutdown => self.shutdown(now),
        }
    }

    /// Closes any connection (runner or client) with a close frame.
    pub fn close_conn(&mut self, slot: u32, gen: u32, code: u16, reason: Cow<'static, str>) {
        let now = Instant::now();
        let Some(conn) = self.get(slot, gen) else {
            return;
        };
        match conn.kind {
            ConnKind::Client(_) => self.close_client(slot, gen, code, reason, now),
            _ => {
                if conn.out.closing {
                    return;
                }
                conn.out.push_close(code, &reason);
                self.shared.metrics.shards[self.id as usize].close(code, &reason);
            }
        }
    }

    fn runner_attached(&mut self, runner_idx: u32, conn: ConnRef, now: Instant) {
        let i = runner_idx as usize;
        if self.runners.len() <= i {
            self.runners.resize(i + 1, None);
        }
        // A new connection replaced one this shard still routes to: the engine evicted it on
        // the reconnect's Init without a RunnerDetached (the old socket looked alive). What
        // was written to it may be lost, so detach first and the sockets replay below.
        if self.runners[i].is_some_and(|old| old != conn) {
            self.runner_detached(runner_idx, now);
        }
        self.runners[i] = Some(conn);
        // Local connections of this runner other than `conn` are stale from now on.
        for (slot, c) in self.conns.iter_mut() {
            if let ConnKind::Runner(r) = &mut c.kind {
                if r.runner_idx == Some(runner_idx) && (slot as u32, c.gen) != (conn.slot, conn.gen)
                {
                    r.superseded = true;
                }
            }
        }
        if conn.shard == self.id {
            if let Some(Conn {
                kind: ConnKind::Runner(r),
                ..
            }) = self
                .conns
                .get_mut(conn.slot as usize)
                .filter(|c| c.gen == conn.gen)
            {
                r.runner_idx = Some(runner_idx);
            }
        }
        let owed: Vec<Vec<Bytes>> = {
            let (owed, keep) = std::mem::take(&mut self.owed_closes)
                .into_iter()
                .partition(|(idx, _)| *idx == runner_idx);
            self.owed_closes = keep;
            owed.into_iter().map(|(_, f)| f).collect()
        };
        for frames in owed {
            self.send_to_conn(conn, frames);
        }
        // Replay every detached socket of this runner, in order, original indices.
        // Hibernating sockets wait for their actor's next generation instead.
        let slots: Vec<u32> = self
            .conns
            .iter()
            .filter_map(|(s, c)| match &c.kind {
                ConnKind::Client(cc)
                    if cc.runner_idx == runner_idx
                        && !c.out.closing
                        && cc.hibernation.is_none()
                        && cc.socket.state() == SocketState::Detached =>
                {
                    Some(s as u32)
                }
                _ => None,
            })
            .collect();
        for slot in slots {
            self.replay(slot, conn, now);
        }
    }

    fn runner_detached(&mut self, runner_idx: u32, now: Instant) {
        if let Some(r) = self.runners.get_mut(runner_idx as usize) {
            *r = None;
        }
        // An HTTP request has no replay: whatever the runner had of it is gone.
        self.fail_requests("request.runner_disconnected", |r| {
            r.runner_idx == runner_idx
        });
        let affected =
            self.clients_where(|cc| cc.runner_idx == runner_idx && cc.hibernation.is_none());
        for (slot, gen) in affected {
            let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind else {
                continue;
            };
            if let Some(tx) = cc.open_tx.take() {
                // Still opening: refuse it.
                let _ = tx.send(TunnelIn::Close {
                    code: Some(1011),
                    reason: Some("ws.runner_disconnected".into()),
                    hibernate: false,
                });
                continue;
            }
            let (pb, pm) = (cc.socket.pending_bytes(), cc.socket.pending_len());
            match cc
                .socket
                .on_runner_detached(DetachCause::RunnerLost, &mut self.budget)
            {
                Detach::Keep | Detach::AlreadyClosed => {}
                Detach::Close(r) => {
                    cc.runner_closed = true;
                    let m = &self.shared.metrics.shards[self.id as usize];
                    m.gauge_add(Gauge::PendingBytes, -(pb as i64));
                    m.gauge_add(Gauge::PendingMessages, -(pm as i64));
                    self.close_client(slot, gen, r.code, r.reason, now);
                }
            }
        }
    }

    fn actor_stopped(&mut self, actor_id: &str, now: Instant) {
        self.fail_requests("actor.stopped", |r| &*r.actor_id == actor_id);
        // Sockets that hibernated while the actor still ran (it handed them back) and asked
        // for a wake then: the actor is down now, so a wake starts it.
        let held: Vec<u32> = self
            .conns
            .iter_mut()
            .filter_map(|(s, c)| match &mut c.kind {
                ConnKind::Client(cc) if &*cc.actor_id == actor_id && !c.out.closing => {
                    let h = cc.hibernation.as_mut()?;
                    h.waking = false;
                    (cc.socket.pending_len() > 0).then_some(s as u32)
                }
                _ => None,
            })
            .collect();
        let affected =
            self.clients_where(|cc| &*cc.actor_id == actor_id && cc.hibernation.is_none());
        for (slot, gen) in affected {
            self.detach_for_hibernation(slot, gen, DetachCause::ActorStopped, now);
        }
        for slot in held {
            self.wake_for(slot);
        }
    }

    /// The actor is gone for good: every socket and request of it ends.
    fn actor_destroyed(&mut self, actor_id: &str, now: Instant) {
        self.fail_requests("actor.destroyed", |r| &*r.actor_id == actor_id);
        let affected = self.clients_where(|cc| &*cc.actor_id == actor_id);
        for (slot, gen) in affected {
            let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind else {
                continue;
            };
            cc.runner_closed = true;
            if let Some(tx) = cc.open_tx.take() {
                let _ = tx.send(TunnelIn::Close {
                    code: Some(1000),
                    reason: Some("actor.destroyed".into()),
                    hibernate: false,
                });
                continue;
            }
            self.close_client(slot, gen, 1000, "actor.destroyed", now);
        }
    }

    /// The runner is lost: its attached or detached sockets hibernate (or close).
    fn runner_lost(&mut self, runner_idx: u32, now: Instant) {
        let affected =
            self.clients_where(|cc| cc.runner_idx == runner_idx && cc.hibernation.is_none());
        for (slot, gen) in affected {
            self.detach_for_hibernation(slot, gen, DetachCause::RunnerLost, now);
        }
    }

    /// The actor is gone from under a socket: a hibernatable one hibernates, an opening one
    /// is refused, any other closes with the cause's reason.
    fn detach_for_hibernation(&mut self, slot: u32, gen: u32, cause: DetachCause, now: Instant) {
        let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind else {
            return;
        };
        if let Some(tx) = cc.open_tx.take() {
            cc.runner_closed = true;
            let r = cause.close_reason();
            let _ = tx.send(TunnelIn::Close {
                code: Some(r.code),
                reason: Some(r.reason.into()),
                hibernate: false,
            });
            return;
        }
        let (pb, pm) = (cc.socket.pending_bytes(), cc.socket.pending_len());
        match cc.socket.on_runner_detached(cause, &mut self.budget) {
            Detach::Keep => self.enter_hibernation(slot, now),
            Detach::AlreadyClosed => {}
            Detach::Close(r) => {
                cc.runner_closed = cause != DetachCause::HibernateRequested;
                let m = &self.shared.metrics.shards[self.id as usize];
                m.gauge_add(Gauge::PendingBytes, -(pb as i64));
                m.gauge_add(Gauge::PendingMessages, -(pm as i64));
                self.close_client(slot, gen, r.code, r.reason, now);
            }
        }
    }

    /// Nothing left to let finish before the drain closes the WebSockets: no HTTP request
    /// waiting for its actor's answer, no routing or API answer awaited from the control
    /// plane, and every connection's outbound queue written.
    pub fn drain_idle(&self) -> bool {
        self.waiters.is_empty()
            && self
                .conns
                .iter()
                .all(|(_, c)| !matches!(c.kind, ConnKind::Request(_)) && c.out.chunks.is_empty())
    }

    /// Whether a client WebSocket or a runner connection is still open (the drain waits for
    /// their close handshakes).
    pub fn has_open_websockets(&self) -> bool {
        self.conns
            .iter()
            .any(|(_, c)| matches!(c.kind, ConnKind::Client(_) | ConnKind::Runner(_)))
    }

    /// The drain's last step: HTTP requests still waiting fail with `guard.draining`, and every
    /// client WebSocket and runner connection gets a 1001 close.
    pub fn shutdown(&mut self, now: Instant) {
        self.fail_requests("guard.draining", |_| true);
        let all: Vec<(u32, u32, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| !matches!(c.kind, ConnKind::Request(_)))
            .map(|(s, c)| (s as u32, c.gen, matches!(c.kind, ConnKind::Client(_))))
            .collect();
        for (slot, gen, client) in all {
            if let ConnKind::Client(cc) = &mut self.conns[slot as usize].kind {
                // Hibernatable sockets keep their records: a restart can still list them.
                cc.record_refresh_at = None;
            }
            if client {
                self.close_client(slot, gen, 1001, "ws.going_away", now);
            } else {
                self.close_conn(slot, gen, 1001, "ws.going_away".into());
            }
        }
    }
}

fn hibernating_request(gateway_id: [u8; 4], req: [u8; 4]) -> protocol::HibernatingRequest {
    protocol::HibernatingRequest {
        gateway_id,
        request_id: req,
    }
}

/// Moves the pending gauges by a window's change from `before` to `after` (bytes, messages)
/// and raises the per-socket high-water marks.
fn window_gauges(m: &ShardMetrics, before: (usize, usize), after: (usize, usize)) {
    m.gauge_add(Gauge::PendingBytes, after.0 as i64 - before.0 as i64);
    m.gauge_add(Gauge::PendingMessages, after.1 as i64 - before.1 as i64);
    m.gauge_max(Gauge::MaxSocketPendingBytes, after.0 as i64);
    m.gauge_max(Gauge::MaxSocketPendingMessages, after.1 as i64);
}
