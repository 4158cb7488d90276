//! The gateway core of one shard, sans-IO: its connection table, the routing of tunnel
//! traffic between client sockets and runner connections (on this shard or another), the
//! client data plane, the HTTP tunnel, the runner session, hibernation and every deadline.
//!
//! Inputs are calls (`handle_client_frame`, `handle_runner_frame`, `handle_shard_msg`,
//! `handle_timeout`, and the open/close calls of the connection lifecycle), each given `now`;
//! outputs are values the shell drains with [`Gateway::poll_output`] (a connection has
//! bytes to write, a reader may go on, a connection is to be reset, a message for another
//! shard or the control plane, an answer to a question) and [`Gateway::poll_timeout`] (the
//! next deadline). It never touches a socket, a clock, a thread or a global RNG: time comes
//! in as `now`, randomness from a seeded generator given at construction.
//!
//! Files by concern:
//! - [`ids`]: connection ids, request ids that route, waiter ids.
//! - [`msg`]: messages between threads.
//! - [`conns`]: the table's entries and their phases.
//! - [`out`]: per-connection outbound queues.
//! - `framing`: WebSocket and runner-protocol frames, carved from a shard scratch buffer.
//! - `routing`: where a runner's traffic goes, runners attaching and detaching.
//! - `client`: the client data plane (window, acks, backpressure, closes, idle watch).
//! - `hibernation`: sockets whose actor sleeps, wakes and reattachment.
//! - `http`: the HTTP tunnel's phases.
//! - `runner`: the runner session (accept rules, Init, pings, fences, superseded links).
//! - [`route`]: the client upgrade and routing rules (targets, headers, subprotocol).
//! - `timers`: named deadlines, `poll_timeout` and `handle_timeout`.
//! - [`reason`]: the refusals and the close reasons, each named once.

mod client;
pub mod conns;
mod framing;
mod hibernation;
mod http;
pub mod ids;
pub mod msg;
pub mod out;
pub mod reason;
pub mod route;
mod routing;
mod runner;
mod timers;

pub use client::ClientRead;
pub use conns::{ClientConn, ConnKind, HttpOutcome, OpenPhase, RunnerConn};
pub use http::StreamTurn;
pub use http::UploadRoom;
pub use ids::{ConnId, RequestKey, MAX_SLOTS};
pub use msg::{ApiRequest, ControlMsg, Reply, ResolveError, Routed, ShardMsg, TunnelIn};
pub use out::{Frames, OutQueue, Pause, Receipt, WriterTurn};
pub use reason::{Peer, Reason, Refusal};
pub use runner::{accept_runner, streams_requests, RunnerAccept, STREAM_REQUESTS_KEY};
pub use timers::Timer;

use crate::config::Config;
use crate::engine::ConnRef;
use crate::metrics::{Metrics, RecentlyClosed, ShardMetrics};
use crate::tunnel::{Budget, WindowLimits};
use bytes::{Bytes, BytesMut};
use conns::Conn;
use rand::rngs::StdRng;
use rand::SeedableRng;
use slab::Slab;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// What a shard's core is given at start.
#[derive(Clone)]
pub struct Settings {
    pub shard: u16,
    pub shards: usize,
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub gateway_id: [u8; 4],
    /// This node is one of several (`[cluster]`): runner messages are routed by the
    /// gateway id they echo, and connections of other nodes are reached through
    /// [`Output::ToNode`]. Alone, the gateway id of a runner message is not looked at.
    pub clustered: bool,
}

/// What the core asks of the shell.
pub enum Output {
    /// The connection's outbound queue has work for its writer.
    Flush(ConnId),
    /// Something the connection's reader (or its HTTP task) waits for changed: a pause
    /// ended, the open exchange or the response came.
    Wake(ConnId),
    /// Reset the connection now (RST, no close handshake).
    Reset(ConnId),
    ToShard(u16, ShardMsg),
    /// A message for a shard of another node (its gateway id, the shard): tunnel traffic
    /// to a runner connected there, or a runner's traffic for a request of that node.
    ToNode([u8; 4], u16, ShardMsg),
    /// Boxed: control messages are rare and large, and the output queue moves every entry.
    ToControl(Box<ControlMsg>),
    /// The answer to a question asked with [`Gateway::ask`] (`None`: it timed out).
    Reply(u32, Option<Reply>),
    /// A deadline earlier than the one last reported by [`Gateway::poll_timeout`] was set.
    Rearm,
    /// The shard's drain is over (see [`Gateway::begin_drain`]).
    Drained,
}

/// The outputs that carry no message (a few bytes each), queued apart from the messages so
/// the hot path (a frame queued, its writer to wake) never moves a whole [`Output`]. Each
/// is the [`Output`] of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Flush(ConnId),
    Wake(ConnId),
    Reset(ConnId),
    Rearm,
    Drained,
}

/// Where a shard's graceful stop stands (SIGTERM; see [`Gateway::begin_drain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainPhase {
    Serving,
    /// In-flight HTTP requests, control-plane answers and queued writes may finish until
    /// then.
    Finishing(Instant),
    /// Every WebSocket was sent a 1001 close; their close handshakes may end until then.
    Closing(Instant),
    /// Nothing is left, or the deadlines passed.
    Drained,
}

/// What the shell's reader of a connection does after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Go on reading.
    Continue,
    /// Stop parsing; read (and discard) until the peer ends the connection.
    Stop,
    /// The close handshake is complete: end the connection now.
    Done,
}

pub struct Gateway {
    id: u16,
    shards: usize,
    config: Arc<Config>,
    metrics: Metrics,
    gateway_id: [u8; 4],
    clustered: bool,
    conns: Slab<Conn>,
    next_gen: u32,
    /// Live request ids (serial → slot) of this shard's client sockets and HTTP requests.
    request_ids: ids::RequestIds,
    /// runner_idx → where that runner's current connection lives.
    runners: Vec<Option<ConnRef>>,
    /// Runner connections (of any shard) that take streamed request bodies.
    stream_runners: Vec<ConnRef>,
    /// Questions to the control plane awaiting an answer: the waiter's generation.
    waiters: Slab<u32>,
    next_waiter_gen: u32,
    budget: Budget,
    limits: WindowLimits,
    scratch: BytesMut,
    /// The idle scan's list of sockets to act on, kept between scans.
    idle_todo: Vec<(ConnId, client::IdleAction)>,
    /// `WebSocketClose` frames for runners that were away when their client closed; sent
    /// when the runner reattaches so it does not keep the request forever.
    owed_closes: Vec<(u32, Vec<Bytes>)>,
    /// Client WebSockets closed lately: the runner's late messages for them are expected
    /// (`torpor_tunnel_late_messages_total`), not unroutable.
    recently_closed: RecentlyClosed,
    outputs: VecDeque<Output>,
    /// Messages for other shards, in the order made (see [`Self::poll_mail`]).
    mail: VecDeque<(u16, ShardMsg)>,
    /// Wake-ups not yet polled: `notices[notice_head..]` (a list read from the front and
    /// cleared once read, cheaper than a ring for the one or two a call makes).
    notices: Vec<Notice>,
    notice_head: usize,
    drain: DrainPhase,
    rng: StdRng,
    timers: timers::Timers,
    /// Wall-clock milliseconds at `clock_base.0` (ping timestamps).
    clock_base: (Instant, i64),
}

impl Gateway {
    /// A shard's core. `seed` drives its jitter; `now` and `unix_ms` anchor its clocks.
    pub fn new(s: Settings, seed: u64, now: Instant, unix_ms: i64) -> Gateway {
        let n = s.shards.max(1) as u64;
        let cfg = &s.config.limits;
        Gateway {
            id: s.shard,
            shards: s.shards,
            budget: Budget::new(cfg.pending_bytes_global / n),
            limits: WindowLimits {
                max_bytes: cfg.pending_bytes_per_socket,
                max_messages: cfg.pending_messages_per_socket,
            },
            timers: timers::Timers::new(&s.config, now),
            config: s.config,
            metrics: s.metrics,
            gateway_id: s.gateway_id,
            clustered: s.clustered,
            conns: Slab::new(),
            next_gen: 0,
            request_ids: ids::RequestIds::default(),
            runners: Vec::new(),
            stream_runners: Vec::new(),
            waiters: Slab::new(),
            next_waiter_gen: 0,
            scratch: BytesMut::with_capacity(64 * 1024),
            idle_todo: Vec::new(),
            owed_closes: Vec::new(),
            recently_closed: RecentlyClosed::default(),
            outputs: VecDeque::new(),
            mail: VecDeque::new(),
            notices: Vec::new(),
            notice_head: 0,
            drain: DrainPhase::Serving,
            rng: StdRng::seed_from_u64(seed),
            clock_base: (now, unix_ms),
        }
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn metrics(&self) -> &ShardMetrics {
        &self.metrics.shards[self.id as usize]
    }

    pub fn limits(&self) -> WindowLimits {
        self.limits
    }

    /// The next thing the shell must do: the messages for other shards, then the other
    /// messages (to the control plane, answers), each in the order the core made them, then
    /// the wake-ups and resets in theirs. The kinds are independent: a message never waits
    /// for a wake-up, nor the reverse, and a shard's mail may overtake a message to the
    /// control plane (it could anyway: the control plane's answer to that message takes
    /// longer to reach a shard than mail sent after it). The shell carries out all of them
    /// before it runs any task.
    ///
    /// The shell itself polls the three kinds apart ([`Self::poll_mail`],
    /// [`Self::poll_message`], [`Self::poll_notice`]), so that no wake-up and no mail is
    /// wrapped in an [`Output`]; this is the same sequence in one.
    #[inline]
    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some((to, msg)) = self.poll_mail() {
            return Some(Output::ToShard(to, msg));
        }
        if let Some(o) = self.poll_message() {
            return Some(o);
        }
        Some(match self.poll_notice()? {
            Notice::Flush(id) => Output::Flush(id),
            Notice::Wake(id) => Output::Wake(id),
            Notice::Reset(id) => Output::Reset(id),
            Notice::Rearm => Output::Rearm,
            Notice::Drained => Output::Drained,
        })
    }

    /// The next message for another shard: (shard, message).
    #[inline]
    pub fn poll_mail(&mut self) -> Option<(u16, ShardMsg)> {
        self.mail.pop_front()
    }

    /// The next message for the control plane or answer to a waiter
    /// ([`Output::ToControl`], [`Output::Reply`]).
    #[inline]
    pub fn poll_message(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next wake-up or reset.
    #[inline]
    pub fn poll_notice(&mut self) -> Option<Notice> {
        let Some(&n) = self.notices.get(self.notice_head) else {
            if self.notice_head != 0 {
                self.notices.clear();
                self.notice_head = 0;
            }
            return None;
        };
        self.notice_head += 1;
        Some(n)
    }

    /// Queues a message for another shard.
    #[inline]
    fn mail(&mut self, to: u16, msg: ShardMsg) {
        self.mail.push_back((to, msg));
    }

    /// Queues a message output (see [`Notice`] for the wake-ups).
    fn out(&mut self, o: Output) {
        debug_assert!(matches!(
            o,
            Output::ToControl(_) | Output::Reply(..) | Output::ToNode(..)
        ));
        self.outputs.push_back(o);
    }

    #[inline]
    fn notice(&mut self, n: Notice) {
        self.notices.push(n);
    }

    // ---- the connection table --------------------------------------------------------------

    fn insert(&mut self, kind: ConnKind) -> ConnId {
        assert!(
            self.conns.vacant_key() < MAX_SLOTS,
            "a shard holds at most {MAX_SLOTS} connections (the connection cap keeps it below)"
        );
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen;
        let slot = self.conns.insert(Conn {
            gen,
            out: OutQueue::default(),
            kind,
        }) as u32;
        ConnId { slot, gen }
    }

    #[inline]
    fn conn(&self, id: ConnId) -> Option<&Conn> {
        self.conns.get(id.slot as usize).filter(|c| c.gen == id.gen)
    }

    #[inline]
    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns
            .get_mut(id.slot as usize)
            .filter(|c| c.gen == id.gen)
    }

    /// Whether the connection is still in the table.
    pub fn contains(&self, id: ConnId) -> bool {
        self.conn(id).is_some()
    }

    /// The connection's outbound queue (tests and benches look at it).
    pub fn out_queue(&mut self, id: ConnId) -> Option<&mut OutQueue> {
        self.conn_mut(id).map(|c| &mut c.out)
    }

    /// The connection's entry (tests look at it).
    pub fn kind(&self, id: ConnId) -> Option<&ConnKind> {
        self.conn(id).map(|c| &c.kind)
    }

    pub fn conn_ref(&self, id: ConnId) -> ConnRef {
        ConnRef {
            node: self.gateway_id,
            shard: self.id,
            slot: id.slot,
            gen: id.gen,
        }
    }

    /// A new request id for the client socket or HTTP request in `id`'s slot.
    fn issue_request_id(&mut self, id: ConnId) -> [u8; 4] {
        RequestKey {
            shard: self.id,
            serial: self.request_ids.issue(id.slot),
        }
        .encode()
    }

    /// The connection a request id of this shard names, while it lives.
    #[inline]
    pub fn conn_of_request(&self, req: [u8; 4]) -> Option<ConnId> {
        self.conn_of_key(RequestKey::decode(req))
    }

    #[inline]
    fn conn_of_key(&self, key: RequestKey) -> Option<ConnId> {
        if key.shard != self.id {
            return None;
        }
        let slot = self.request_ids.slot(key.serial)?;
        let c = self.conns.get(slot as usize)?;
        Some(ConnId { slot, gen: c.gen })
    }

    /// Removes a connection's entry once its socket (or its HTTP exchange) ended, and frees
    /// its request id.
    pub fn remove(&mut self, id: ConnId) {
        if self.contains(id) {
            let c = self.conns.remove(id.slot as usize);
            match c.kind {
                ConnKind::Client(cc) => self.request_ids.free(RequestKey::decode(cc.req).serial),
                ConnKind::Request(r) => self.request_ids.free(RequestKey::decode(r.req).serial),
                ConnKind::Runner(_) => {}
            }
        }
    }

    /// Writes frames to a connection of this shard; returns whether it is there.
    pub fn write_local(&mut self, id: ConnId, frames: impl IntoIterator<Item = Bytes>) -> bool {
        let Some(c) = self.conn_mut(id) else {
            return false;
        };
        if c.out.push_all(frames) {
            self.notice(Notice::Flush(id));
        }
        true
    }

    /// Queues a close frame on any connection (once); returns whether it was queued. It
    /// counts nothing: the close paths do ([`Self::close_conn`], [`Self::close_client`] and,
    /// for a peer's own words, [`Self::close_client_peer`]).
    fn queue_close(&mut self, id: ConnId, code: u16, text: &str, now: Instant) -> bool {
        let Some(c) = self.conn_mut(id) else {
            return false;
        };
        if c.out.closing {
            return false;
        }
        if c.out.push_close(code, text) {
            self.notice(Notice::Flush(id));
        }
        let at = now + crate::config::ms(self.config.timeouts.close_handshake_ms);
        self.arm(at, Timer::CloseHandshake(id));
        true
    }

    /// The connection's peer does not read: no close handshake, reset it.
    fn reset(&mut self, id: ConnId) {
        if let Some(c) = self.conn_mut(id) {
            c.out.abort = true;
            self.notice(Notice::Reset(id));
        }
    }

    /// One turn of a connection's writer: moves what is queued into `batch`.
    #[inline]
    pub fn writer_turn(&mut self, id: ConnId, batch: &mut Vec<Bytes>, max: usize) -> WriterTurn {
        let Some(c) = self.conn_mut(id) else {
            return WriterTurn::Gone;
        };
        if c.out.abort {
            return WriterTurn::Reset;
        }
        let bytes = c.out.take_batch(batch, max);
        if !batch.is_empty() {
            WriterTurn::Write { bytes }
        } else if c.out.closing {
            WriterTurn::Shutdown
        } else {
            WriterTurn::Idle
        }
    }

    /// The writer handed `bytes` to the kernel: progress for a reader that waits for its
    /// client to read.
    /// [`Self::written`] for the batch just written (`0`: none), then the next
    /// [`Self::writer_turn`]: one call per write.
    pub fn writer_next(
        &mut self,
        id: ConnId,
        written: usize,
        batch: &mut Vec<Bytes>,
        max: usize,
    ) -> WriterTurn {
        if written > 0 {
            self.written(id, written);
        }
        self.writer_turn(id, batch, max)
    }

    pub fn written(&mut self, id: ConnId, bytes: usize) {
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        c.out.wrote(bytes);
        let written = c.out.written;
        // Only a runner connection carrying a streamed request body has receipts.
        let due = c.out.receipts.front().is_some_and(|&(at, _)| at <= written);
        if let ConnKind::Client(cc) = &mut c.kind {
            if std::mem::take(&mut cc.reader_parked) {
                self.notice(Notice::Wake(id));
            }
        }
        if due {
            self.receipts_due(id, written);
        }
    }

    /// Hands out the receipts of a runner connection's queue written up to `written`.
    fn receipts_due(&mut self, id: ConnId, written: u64) {
        loop {
            let Some(c) = self.conn_mut(id) else {
                return;
            };
            match c.out.receipts.front() {
                Some(&(at, r)) if at <= written => {
                    c.out.receipts.pop_front();
                    if r.shard == self.id {
                        self.upload_written(r.id, r.bytes);
                    } else {
                        self.mail(
                            r.shard,
                            ShardMsg::UploadWritten {
                                id: r.id,
                                bytes: r.bytes,
                            },
                        );
                    }
                }
                _ => return,
            }
        }
    }

    // ---- questions to the control plane ----------------------------------------------------

    /// Asks the control plane; the answer comes as [`Output::Reply`] with the returned
    /// waiter id, or `None` there once `timeout` passed.
    pub fn ask(
        &mut self,
        make: impl FnOnce(u64) -> ControlMsg,
        timeout: std::time::Duration,
        now: Instant,
    ) -> u32 {
        self.next_waiter_gen = (self.next_waiter_gen + 1) & 0xFFF;
        let gen = self.next_waiter_gen;
        let slot = self.waiters.insert(gen);
        let id = ids::waiter_id(slot, gen);
        let full = ((self.id as u64) << 32) | id as u64;
        self.out(Output::ToControl(Box::new(make(full))));
        self.arm(now + timeout, Timer::Waiter(id));
        id
    }

    fn answer(&mut self, waiter: u32, reply: Option<Reply>) {
        let (slot, gen) = ids::waiter_slot(waiter);
        if self.waiters.get(slot) == Some(&gen) {
            self.waiters.remove(slot);
            self.out(Output::Reply(waiter, reply));
        }
    }

    fn control(&mut self, msg: ControlMsg) {
        self.out(Output::ToControl(Box::new(msg)));
    }

    // ---- the drain -------------------------------------------------------------------------

    /// Starts the shard's part of a graceful stop (SIGTERM), as Envoy and Pingora drain (the
    /// listener is already shut, so no new connection arrives): in-flight HTTP requests and
    /// queued messages get up to `timeouts.drain_ms` to finish ([`Self::drain_idle`]); then
    /// every client WebSocket and runner connection gets a 1001 close (requests still
    /// waiting fail with `guard.draining`), and the shard waits for the peers' close
    /// replies, which `timeouts.close_handshake_ms` bounds (each connection is reset at its
    /// close deadline). Then [`Output::Drained`].
    ///
    /// While [`Self::draining`], the shell calls [`Self::drain_step`] after every call, so
    /// the drain moves on as soon as what it waits for happened.
    pub fn begin_drain(&mut self, now: Instant) {
        if self.drain != DrainPhase::Serving {
            return;
        }
        let until = now + crate::config::ms(self.config.timeouts.drain_ms);
        self.drain = DrainPhase::Finishing(until);
        self.arm(until, Timer::Drain);
        self.drain_step(now);
    }

    /// Whether a drain is under way and not over.
    #[inline]
    pub fn draining(&self) -> bool {
        matches!(
            self.drain,
            DrainPhase::Finishing(_) | DrainPhase::Closing(_)
        )
    }

    pub fn drain_phase(&self) -> DrainPhase {
        self.drain
    }

    /// Moves the drain on when what its phase waits for happened or its deadline passed.
    pub fn drain_step(&mut self, now: Instant) {
        if let DrainPhase::Finishing(until) = self.drain {
            if now >= until || self.drain_idle() {
                self.shutdown(now);
                // Each connection's close deadline starts when its close frame is queued;
                // a little more lets the resets at those deadlines be reaped.
                let close = crate::config::ms(self.config.timeouts.close_handshake_ms);
                let until = now + close + std::time::Duration::from_millis(200);
                self.drain = DrainPhase::Closing(until);
                self.arm(until, Timer::Drain);
            }
        }
        if let DrainPhase::Closing(until) = self.drain {
            if now >= until || !self.has_open_websockets() {
                self.drain = DrainPhase::Drained;
                self.notice(Notice::Drained);
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
        let all: Vec<(ConnId, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| !matches!(c.kind, ConnKind::Request(_)))
            .map(|(s, c)| {
                let id = ConnId {
                    slot: s as u32,
                    gen: c.gen,
                };
                (id, matches!(c.kind, ConnKind::Client(_)))
            })
            .collect();
        for (id, client) in all {
            if let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) {
                // Hibernatable sockets keep their records: a restart can still list them.
                cc.record_refresh_at = None;
            }
            if client {
                self.close_client(id, Reason::WsGoingAway, now);
            } else {
                self.close_conn(id, Reason::WsGoingAway, now);
            }
        }
        self.check_invariants();
    }

    // ---- invariants ------------------------------------------------------------------------

    /// Checks what must hold between calls (debug builds run it after the rare handlers;
    /// the per-message handlers check the connection they touched): see [`Self::verify`].
    pub fn check_invariants(&self) {
        if cfg!(debug_assertions) {
            if let Err(e) = self.verify() {
                panic!("gateway invariant broken: {e}");
            }
        }
    }

    /// What must hold between calls: the pending budget equals the windows' bytes and stays
    /// under its cap, every socket keeps its own invariants, every request id names its
    /// entry and no other id is live, a hibernating socket owes its runner nothing, a queue's byte count
    /// matches its chunks, every waiter has a deadline.
    pub fn verify(&self) -> Result<(), String> {
        let mut pending = 0usize;
        let mut requests = 0usize;
        for (slot, c) in self.conns.iter() {
            match &c.kind {
                ConnKind::Client(cc) => {
                    if self.conn_of_request(cc.req).map(|c| c.slot) != Some(slot as u32) {
                        return Err(format!("client in slot {slot} has request id {:?}", cc.req));
                    }
                    requests += 1;
                    pending += cc.socket.pending_bytes();
                    cc.socket
                        .check_invariants(&self.budget)
                        .map_err(|e| format!("client in slot {slot}: {e}"))?;
                    if cc.hibernation.is_some() && !cc.runner_closed {
                        return Err(format!("hibernating client in slot {slot} owes its runner"));
                    }
                }
                ConnKind::Request(r) => {
                    if self.conn_of_request(r.req).map(|c| c.slot) != Some(slot as u32) {
                        return Err(format!("request in slot {slot} has another request id"));
                    }
                    requests += 1;
                }
                ConnKind::Runner(_) => {}
            }
            let queued: usize = c.out.chunks.iter().map(|b| b.len()).sum();
            if queued != c.out.bytes {
                return Err(format!(
                    "slot {slot}: queue says {} bytes, holds {queued}",
                    c.out.bytes
                ));
            }
        }
        if requests != self.request_ids.live() {
            return Err(format!(
                "{} live request ids for {requests} requests",
                self.request_ids.live()
            ));
        }
        if pending as u64 != self.budget.used {
            return Err(format!(
                "budget used {} != the windows' {pending} bytes",
                self.budget.used
            ));
        }
        if self.budget.used > self.budget.cap {
            return Err(format!(
                "budget used {} over its cap {}",
                self.budget.used, self.budget.cap
            ));
        }
        if self.waiters.len() > self.timers.heap.len() {
            return Err("a waiter without a deadline".into());
        }
        Ok(())
    }

    /// The shard's pending budget.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Questions to the control plane still awaiting an answer.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// `WebSocketClose` messages owed to runners that are away.
    pub fn owed_closes(&self) -> usize {
        self.owed_closes.len()
    }

    /// Client sockets in the table, with their ids.
    pub fn clients(&self) -> impl Iterator<Item = (ConnId, &conns::ClientConn)> {
        self.conns.iter().filter_map(|(s, c)| match &c.kind {
            ConnKind::Client(cc) => Some((
                ConnId {
                    slot: s as u32,
                    gen: c.gen,
                },
                cc,
            )),
            _ => None,
        })
    }
}

/// The client socket `id` names in `conns` (a free function, so the caller can borrow the
/// shard's budget beside it).
fn client_of(conns: &mut Slab<Conn>, id: ConnId) -> Option<&mut conns::ClientConn> {
    match &mut conns
        .get_mut(id.slot as usize)
        .filter(|c| c.gen == id.gen)?
        .kind
    {
        ConnKind::Client(cc) => Some(cc),
        _ => None,
    }
}
