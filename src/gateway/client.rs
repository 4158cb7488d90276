//! The client data plane: a client WebSocket tunnelled to an actor, from the open exchange to
//! its end. Client frames go through the socket's pending window ([`TunnelSocket`]) to the
//! runner; runner messages and acks come back to it; slow clients are paused or reset; idle
//! clients are pinged; closes tell the runner once.

use super::conns::{ClientConn, Conn, ConnKind, OpenPhase};
use super::msg::{ControlMsg, Routed, TunnelIn};
use super::out::Pause;
use super::{ConnId, Gateway, Next, Notice, Peer, Reason, Timer};
use crate::metrics::{CloseLabel, Counter, Gauge, ShardMetrics};
use crate::protocol::{self, StrMap, ToClientTunnelMessageKind};
use crate::tunnel::{AckResult, ClientMsg, DetachCause, TunnelSocket};
use crate::ws::frame::OpCode;
use crate::ws::reader::{WsEvent, WsReader};
use bytes::{Bytes, BytesMut};
use std::borrow::Cow;
use std::time::Instant;

/// What a client WebSocket's reader does after [`Gateway::handle_client_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRead {
    /// Every buffered frame was handled: read more.
    More,
    /// Stop reading until woken ([`super::Output::Wake`]); see [`Pause`].
    Paused(Pause),
    /// As [`Next::Stop`].
    Stop,
    /// As [`Next::Done`], or the connection is gone.
    Done,
}

/// What the idle scan does to one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IdleAction {
    Ping,
    /// Silent since the ping: 1011 `guard.client_idle_timeout`.
    Close,
    /// Took nothing of its queue for a whole period: reset, `guard.client_too_slow`.
    Abort,
}

impl Gateway {
    /// Opens the tunnel of a client WebSocket to its routed actor: a table entry whose request
    /// id names it, and `WebSocketOpen` (index 0) to the runner. The answer comes as
    /// [`Output::Wake`]; [`Gateway::open_phase`] then says what it was.
    pub fn open_client(
        &mut self,
        routed: &Routed,
        path: String,
        headers: StrMap,
        now: Instant,
    ) -> ConnId {
        let socket = TunnelSocket::new(self.limits);
        let open_index = socket.take_open_index();
        let id = self.insert_client(
            routed.actor_id.clone(),
            routed.runner_idx,
            routed.generation,
            socket,
        );
        self.learn_runner(routed.runner_idx, routed.conn);
        let req = self.request_id(id).expect("a client has a request id");
        let frames = self.tunnel_frames(
            req,
            open_index,
            ToClientTunnelMessageKind::WebSocketOpen(protocol::ToClientWebSocketOpen {
                actor_id: routed.actor_id.to_string(),
                path,
                headers,
            }),
        );
        self.send_to_runner(routed.runner_idx, frames);
        let at = now + crate::config::ms(self.config.timeouts.websocket_open_ms);
        self.arm(at, Timer::Open(id));
        id
    }

    /// A client socket's table entry, without the open exchange (tests and benches build
    /// sockets with it and then call [`Gateway::client_opened`]).
    pub fn insert_client(
        &mut self,
        actor_id: std::sync::Arc<str>,
        runner_idx: u32,
        generation: u32,
        socket: TunnelSocket,
    ) -> ConnId {
        let placeholder = ClientConn::new(actor_id, runner_idx, [0; 4], socket, generation);
        let id = self.insert(ConnKind::Client(placeholder));
        let req = self.issue_request_id(id);
        if let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) {
            cc.req = req;
        }
        id
    }

    /// The request id of a client socket or tunnelled request.
    pub fn request_id(&self, id: ConnId) -> Option<[u8; 4]> {
        match &self.conn(id)?.kind {
            ConnKind::Client(cc) => Some(cc.req),
            ConnKind::Request(r) => Some(r.req),
            ConnKind::Runner(_) => None,
        }
    }

    /// Where the open exchange of a client socket stands.
    pub fn open_phase(&self, id: ConnId) -> Option<OpenPhase> {
        match &self.conn(id)?.kind {
            ConnKind::Client(cc) => Some(cc.open.clone()),
            _ => None,
        }
    }

    /// The runner accepted the client's socket (`WebSocketOpen { canHibernate }`); a
    /// hibernatable one gets its engine record now.
    pub fn client_opened(&mut self, id: ConnId, can_hibernate: bool, now: Instant) {
        let next = now + self.refresh_interval();
        let gw = self.gateway_id;
        let Some(Conn {
            kind: ConnKind::Client(cc),
            out,
            ..
        }) = self
            .conns
            .get_mut(id.slot as usize)
            .filter(|c| c.gen == id.gen)
        else {
            return;
        };
        cc.socket.on_runner_open(can_hibernate);
        cc.idle.restart(now, out.written);
        cc.open = OpenPhase::Accepted;
        let record = can_hibernate.then(|| ControlMsg::Hibernating {
            actor_id: cc.actor_id.clone(),
            req: super::hibernation::hibernating_request(gw, cc.req),
            keep: true,
        });
        if record.is_some() {
            cc.record_refresh_at = Some(next);
        }
        if let Some(msg) = record {
            self.control(msg);
        }
        let m = self.metrics();
        m.inc(Counter::ClientWebSockets);
        m.gauge_add(Gauge::OpenClientWebSockets, 1);
        self.notice(Notice::Wake(id));
    }

    /// The client got its 101: the socket is open.
    pub fn client_upgraded(&mut self, id: ConnId) {
        if let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) {
            cc.open = OpenPhase::Open;
        }
    }

    /// Every complete frame buffered from a client, parsed with the socket's reader and
    /// handled in order, until the reader needs more bytes, the socket must pause, or it
    /// ends: one call per read. `read` says a read just brought the bytes (the idle watch
    /// counts reads). Before each frame the pause is asked ([`Self::client_paused`]), so a
    /// paused socket's frames wait in `buf`, parsed by no one.
    pub fn handle_client_bytes(
        &mut self,
        id: ConnId,
        read: bool,
        reader: &mut WsReader,
        buf: &mut BytesMut,
        now: Instant,
    ) -> ClientRead {
        if read && !self.client_read(id) {
            return ClientRead::Done;
        }
        loop {
            if let Some(p) = self.client_paused(id) {
                return ClientRead::Paused(p);
            }
            let next = match reader.next(buf) {
                Ok(Some(ev)) => self.handle_client_frame(id, ev, now),
                Ok(None) => return ClientRead::More,
                Err(e) => self.client_protocol_error(id, e.into(), now),
            };
            match next {
                Next::Continue => {}
                Next::Stop => return ClientRead::Stop,
                Next::Done => return ClientRead::Done,
            }
        }
    }

    /// One frame the client sent (parsed by the shell's reader).
    #[inline]
    pub fn handle_client_frame(&mut self, id: ConnId, ev: WsEvent, now: Instant) -> Next {
        let next = match ev {
            WsEvent::Message { text, data } => {
                self.client_message(id, data, !text, now);
                Next::Continue
            }
            WsEvent::Ping(p) => {
                // Pongs pile up for a client that pings without reading: the same outbound
                // limit as for its actor's messages applies.
                let limit = self.config.limits.client_outbound_bytes;
                let queued = self.conn(id).map_or(0, |c| c.out.bytes);
                if queued > limit {
                    self.abort_client(id, Reason::ClientTooSlow, now);
                } else {
                    let frames = self.ws_frame(OpCode::Pong, p);
                    self.write_local(id, frames);
                }
                Next::Continue
            }
            WsEvent::Pong(_) => Next::Continue,
            WsEvent::Close { code, reason } => {
                if self.conn(id).is_some_and(|c| c.out.closing) {
                    // The answer to our close: the handshake is complete and the server ends
                    // the TCP connection (RFC 6455 §7.1.1); the peer waits for it.
                    return Next::Done;
                }
                // Counted as `client.closed` whatever reason text the client sent.
                let reason = String::from_utf8_lossy(&reason).into_owned();
                let code = code.unwrap_or(crate::ws::close::NORMAL);
                self.close_client_peer(id, Peer::Client, code, reason, now);
                Next::Continue
            }
        };
        self.check_conn(id);
        next
    }

    /// The client broke the WebSocket protocol: close with the reader's reason (a
    /// [`crate::ws::close::WsClose`] converts); the shell stops parsing.
    pub fn client_protocol_error(&mut self, id: ConnId, reason: Reason, now: Instant) -> Next {
        self.close_client(id, reason, now);
        Next::Stop
    }

    /// A read brought bytes from this client (the idle scan counts them). Returns whether the
    /// connection is still there.
    pub fn client_read(&mut self, id: ConnId) -> bool {
        let Some(c) = self.conn_mut(id) else {
            return false;
        };
        if let ConnKind::Client(cc) = &mut c.kind {
            cc.idle.reads = cc.idle.reads.wrapping_add(1);
        }
        true
    }

    /// Is this client socket's reader to stop, and why? The reader waits for
    /// [`Output::Wake`] and asks again.
    pub fn client_paused(&mut self, id: ConnId) -> Option<Pause> {
        let half = self.config.limits.client_outbound_bytes / 2;
        let c = self.conn_mut(id)?;
        let behind = c.out.behind(half);
        let ConnKind::Client(cc) = &mut c.kind else {
            return None;
        };
        let pause = if cc.socket.is_paused() {
            Pause::Window
        } else if behind {
            Pause::Unread
        } else {
            return None;
        };
        cc.reader_parked = true;
        if pause == Pause::Unread {
            self.metrics().inc(Counter::ClientReadPauses);
        }
        Some(pause)
    }

    /// Is this client still behind on reading what it was sent (see [`Pause::Unread`])? A
    /// reader that waits on it again is woken by the next write ([`Output::Wake`]), as after
    /// [`Self::client_paused`].
    pub fn client_out_full(&mut self, id: ConnId) -> bool {
        let half = self.config.limits.client_outbound_bytes / 2;
        let Some(c) = self.conn_mut(id) else {
            return false;
        };
        let behind = c.out.behind(half);
        let ConnKind::Client(cc) = &mut c.kind else {
            return false;
        };
        if behind {
            cc.reader_parked = true;
        }
        behind
    }

    /// A data frame from a client: the window decides, this applies.
    pub fn client_message(&mut self, id: ConnId, data: Bytes, binary: bool, now: Instant) {
        let Some(Conn {
            kind: ConnKind::Client(cc),
            ..
        }) = self
            .conns
            .get_mut(id.slot as usize)
            .filter(|c| c.gen == id.gen)
        else {
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
        let m = &self.metrics.shards[self.id as usize];
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
            ClientMsg::Held { .. } => self.wake_for(id),
            ClientMsg::Paused => {
                m.inc(Counter::BackpressurePauses);
                m.gauge_add(Gauge::PausedClientWebSockets, 1);
            }
            ClientMsg::Close(reason) => {
                self.close_client(id, reason.into(), now);
            }
            // The reader never offers a message while paused or opening; a closed socket
            // discards.
            ClientMsg::NotReady { .. } | ClientMsg::Dropped => {}
        }
    }

    /// Runner → client traffic for a local client socket.
    pub(super) fn client_in(&mut self, id: ConnId, msg: TunnelIn, from: Option<u32>, now: Instant) {
        let owner = |idx: u32| from.is_none_or(|f| f == idx);
        let limit = self.config.limits.client_outbound_bytes;
        // One lookup serves the whole hot path: the frame is cut from the scratch buffer
        // and queued while the connection is held.
        let Some(conn) = self
            .conns
            .get_mut(id.slot as usize)
            .filter(|c| c.gen == id.gen)
        else {
            return;
        };
        let closing = conn.out.closing;
        let ConnKind::Client(cc) = &mut conn.kind else {
            return;
        };
        if cc.hibernation.is_some() {
            // A restored socket's first messages can overtake the `Running` that reattaches
            // it (they come straight from the runner's shard): keep them until then,
            // bounded. Acks and the rest are about the old attachment.
            match msg {
                TunnelIn::Message { data, binary } if cc.early_bytes + data.len() <= limit => {
                    cc.early_bytes += data.len();
                    cc.early.push((from, data, binary));
                }
                // The actor closed the socket for good: the old generation before it
                // stopped, or the new one refusing to restore it, its close overtaking the
                // `Running` that would reattach it. Nobody serves it any more: it closes
                // (found by the simulation: kept open, it was replayed to a runner that had
                // closed it and hung until the ack timeout).
                TunnelIn::Close {
                    code,
                    reason,
                    hibernate: false,
                } => {
                    let reason = reason.unwrap_or_else(|| Reason::WsClosed.as_str().to_string());
                    let code = code.unwrap_or(crate::ws::close::NORMAL);
                    self.close_client_peer(id, Peer::Actor, code, reason, now);
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
        match msg {
            TunnelIn::Message { data, binary } => {
                let len = data.len();
                let op = if binary { OpCode::Binary } else { OpCode::Text };
                let frames = super::framing::server_frame(&mut self.scratch, op, data);
                let m = &self.metrics.shards[self.id as usize];
                m.inc(Counter::MessagesToClient);
                m.add(Counter::BytesToClient, len as u64);
                // Too slow = had more than the limit unread before this message (one message
                // larger than the limit alone is not the client's fault).
                let too_slow = conn.out.bytes > limit;
                if conn.out.push_all(frames) {
                    self.notices.push(Notice::Flush(id));
                }
                if too_slow {
                    self.abort_client(id, Reason::ClientTooSlow, now);
                }
            }
            TunnelIn::Ack(index) => self.on_ack(id, index, now),
            // A client closed during its open exchange (a runner that sent it messages before
            // answering the open, too many for it) is refused, not accepted: an accepted one
            // would leave a hibernating record no close ever forgets (found by the
            // gateway_core fuzz target).
            _ if cc.opening() => match msg {
                TunnelIn::Open { can_hibernate } if !closing => {
                    self.client_opened(id, can_hibernate, now)
                }
                _ => self.refuse_open(id, super::Refusal::OPEN_REFUSED),
            },
            TunnelIn::Close {
                hibernate: true, ..
            } if cc.socket.is_hibernatable() && cc.hibernation.is_none() => {
                // The actor hands the socket to the gateway; it comes back with a later
                // generation of the actor (CommandStartActor lists it).
                self.detach_for_hibernation(id, DetachCause::HibernateRequested, now);
            }
            // The runner's answer to the gateway's close (its request is closed).
            TunnelIn::Close { .. } if closing => {
                self.metrics().inc(Counter::LateTunnelMessages);
            }
            TunnelIn::Close { code, reason, .. } => {
                cc.runner_closed = true;
                // Counted as `actor.closed` whatever reason text the actor sent.
                let reason = reason.unwrap_or_else(|| Reason::WsClosed.as_str().to_string());
                let code = code.unwrap_or(crate::ws::close::NORMAL);
                self.close_client_peer(id, Peer::Actor, code, reason, now);
            }
            _ => self.metrics().inc(Counter::UnroutableTunnelMessages),
        }
        self.check_conn(id);
    }

    fn on_ack(&mut self, id: ConnId, index: u16, now: Instant) {
        let Some(cc) = super::client_of(&mut self.conns, id) else {
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
        let wake = resume_reading && std::mem::take(&mut cc.reader_parked);
        if wake {
            self.notice(Notice::Wake(id));
        }
        let m = &self.metrics.shards[self.id as usize];
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
            Some(ClientMsg::Close(r)) => self.close_client(id, r.into(), now),
            _ => {}
        }
    }

    /// Live (not closing) client sockets matching `pred`.
    pub(super) fn clients_where(&self, pred: impl Fn(&ClientConn) -> bool) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter_map(|(s, c)| match &c.kind {
                ConnKind::Client(cc) if !c.out.closing && pred(cc) => Some(ConnId {
                    slot: s as u32,
                    gen: c.gen,
                }),
                _ => None,
            })
            .collect()
    }

    /// Closes a client that does not read: like [`Self::close_client`] (the runner is told,
    /// the metric counts `reason`), but the connection is reset at once, since a close frame
    /// queued behind what the client never read would not reach it.
    pub(super) fn abort_client(&mut self, id: ConnId, reason: Reason, now: Instant) {
        self.close_client(id, reason, now);
        self.reset(id);
    }

    /// Queues the gateway's close frame to a client (`reason` with its code), tells the
    /// runner, and frees the window; the metric counts `reason`. The shell removes the entry
    /// when the socket ends ([`Gateway::client_ended`]).
    pub(super) fn close_client(&mut self, id: ConnId, reason: Reason, now: Instant) {
        self.close_client_code(id, reason.code(), reason, now);
    }

    /// [`Self::close_client`] with another code than the reason's own.
    pub(super) fn close_client_code(
        &mut self,
        id: ConnId,
        code: u16,
        reason: Reason,
        now: Instant,
    ) {
        let text = Cow::Borrowed(reason.as_str());
        self.close_client_as(id, code, text, reason.label(), now);
    }

    /// [`Self::close_client`] passing on a peer's own words: the client's close frame (its
    /// code and reason go to the runner) or the actor's `WebSocketClose` (they go to the
    /// client). Counted by whose they are, never by their text.
    pub(super) fn close_client_peer(
        &mut self,
        id: ConnId,
        peer: Peer,
        code: u16,
        text: String,
        now: Instant,
    ) {
        self.close_client_as(id, code, Cow::Owned(text), peer.label(), now);
    }

    /// The close of a client, under both paths: `code` and `reason` in the close frame and
    /// the runner's `WebSocketClose`, counted under `label`.
    fn close_client_as(
        &mut self,
        id: ConnId,
        code: u16,
        reason: Cow<'static, str>,
        label: CloseLabel,
        now: Instant,
    ) {
        let Some(conn) = self.conn(id) else {
            return;
        };
        if conn.out.closing {
            return;
        }
        let req = match &conn.kind {
            ConnKind::Client(cc) => Some(cc.req),
            _ => None,
        };
        self.metrics().close_as(label);
        if let Some(req) = req {
            self.recently_closed.insert(req, now);
        }
        self.queue_close(id, code, &reason, now);
        let Some(req) = req else {
            return;
        };
        self.release_window(id);
        self.leave_hibernation(id);
        self.forget_record(id);
        let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return;
        };
        if cc.runner_closed {
            return;
        }
        cc.runner_closed = true;
        let (runner_idx, index) = (cc.runner_idx, cc.socket.next_index());
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

    /// Frees a client's pending window (bytes back to the shard budget, gauges down).
    fn release_window(&mut self, id: ConnId) {
        let Some(cc) = super::client_of(&mut self.conns, id) else {
            return;
        };
        let (pb, pm) = (cc.socket.pending_bytes(), cc.socket.pending_len());
        let was_paused = cc.socket.is_paused();
        cc.socket.close(&mut self.budget);
        let wake = std::mem::take(&mut cc.reader_parked);
        if wake {
            self.notice(Notice::Wake(id));
        }
        self.pending_gauges_down(pb, pm);
        if was_paused {
            self.metrics().gauge_add(Gauge::PausedClientWebSockets, -1);
        }
    }

    pub(super) fn pending_gauges_down(&self, bytes: usize, messages: usize) {
        let m = self.metrics();
        m.gauge_add(Gauge::PendingBytes, -(bytes as i64));
        m.gauge_add(Gauge::PendingMessages, -(messages as i64));
    }

    /// The client socket ended (its reads ended): tell the runner if still owed, free the
    /// window and the entry.
    pub fn client_ended(&mut self, id: ConnId, now: Instant) {
        if !self.contains(id) {
            return;
        }
        let open = matches!(
            self.open_phase(id),
            Some(OpenPhase::Accepted | OpenPhase::Open)
        );
        // close_client is a no-op if a close was already queued; it tells the runner.
        self.close_client(id, Reason::WsClosed, now);
        self.release_window(id);
        if open {
            self.metrics().gauge_add(Gauge::OpenClientWebSockets, -1);
        }
        self.remove(id);
    }

    /// A client whose open exchange failed: the runner owes and is owed nothing; the entry
    /// goes (the shell answers the client with the refusal).
    pub fn client_refused(&mut self, id: ConnId) {
        if let Some(ConnKind::Client(cc)) = self.conn_mut(id).map(|c| &mut c.kind) {
            cc.runner_closed = true;
        }
        self.release_window(id);
        self.remove(id);
    }

    /// Ack-timeout pass: closes the sockets whose oldest pending message is too old.
    pub(super) fn gc(&mut self, now: Instant) {
        let timeout = crate::config::ms(self.config.timeouts.ack_timeout_ms);
        let expired = self.clients_where(|cc| cc.socket.ack_expired(now, timeout));
        for id in expired {
            self.close_client(id, Reason::MessageNotAcked, now);
        }
        self.hibernation_pass(now);
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
        let t = &self.config.timeouts;
        if t.client_idle_ping_ms == 0 {
            return;
        }
        let (idle, pong) = (
            crate::config::ms(t.client_idle_ping_ms),
            crate::config::ms(t.client_pong_timeout_ms),
        );
        let half = self.config.limits.client_outbound_bytes / 2;
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
                let id = ConnId {
                    slot: slot as u32,
                    gen: c.gen,
                };
                todo.push((id, a));
            }
        }
        for (id, action) in todo.drain(..) {
            match action {
                IdleAction::Ping => {
                    self.metrics().inc(Counter::ClientIdlePings);
                    let frames = self.ws_frame(OpCode::Ping, Bytes::new());
                    self.write_local(id, frames);
                }
                IdleAction::Close => self.close_client(id, Reason::ClientIdleTimeout, now),
                IdleAction::Abort => self.abort_client(id, Reason::ClientTooSlow, now),
            }
        }
        self.idle_todo = todo;
    }

    /// Debug builds: what must hold of one connection after a handler touched it.
    pub(super) fn check_conn(&self, id: ConnId) {
        if !cfg!(debug_assertions) {
            return;
        }
        let Some(c) = self.conn(id) else {
            return;
        };
        if let ConnKind::Client(cc) = &c.kind {
            // O(1) checks only: this runs per message (the whole window is checked by
            // `check_invariants` on the rare events).
            assert!(
                cc.socket.pending_bytes() as u64 <= self.budget.used,
                "the budget covers the socket's window"
            );
            if cc.hibernation.is_some() {
                assert!(
                    cc.runner_closed,
                    "a hibernating socket owes its runner nothing"
                );
            }
        }
        assert!(
            self.budget.used <= self.budget.cap,
            "the budget stays under its cap"
        );
        assert!(
            c.out.bytes == 0 || !c.out.chunks.is_empty(),
            "queued bytes are in chunks"
        );
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
