//! The HTTP tunnel (SPEC §2.3) as phases. A request becomes `RequestStart` (index 0) on the
//! actor's runner ([`RequestPhase::Waiting`], the response deadline runs): buffered
//! (`stream: false`, the whole body), or streamed (`stream: true`, then `RequestChunk`s with
//! indices 1, 2, … as the client sends them) when the runner said in its `Init` that it takes
//! streamed bodies. The runner's `ResponseStart { stream: false }` answers it
//! ([`RequestPhase::Answered`]); `ResponseStart { stream: true }` starts a streamed response
//! ([`RequestPhase::Streaming`]) whose head the shell writes at once and whose
//! `ResponseChunk`s are queued, framed for the client, on the request's own queue as they
//! arrive. An abort, the runner's or the actor's end, or the deadline fail it; mid-stream
//! they cut the body short (the client connection ends without the last chunk).
//!
//! Bounds (`limits.http_stream_buffer_bytes`, per request and direction): a streamed
//! response's bytes queued for a client that does not read them (past it: the runner is
//! sent `RequestAbort`, the client connection is reset, `guard.http_client_too_slow`); a
//! streamed request's bytes handed to the runner's connection and not yet written there
//! (the shell reads the client only below it; the runner's socket is never paused).
//! `timeouts.http_stream_idle_ms`: a streamed response with no chunk from the runner and no
//! byte taken by the client between two checks is aborted (`guard.http_stream_idle`).

use super::conns::{ConnKind, HttpOutcome, RequestConn, RequestPhase, StreamOut, Upload};
use super::msg::{Routed, ShardMsg, TunnelIn};
use super::out::Receipt;
use super::{ConnId, Gateway, Notice, Refusal, Timer};
use crate::http::response::{chunk_frames, BodyFraming, LAST_CHUNK};
use crate::metrics::Counter;
use crate::protocol::{self, StrMap, ToClientTunnelMessageKind, ToServerTunnelMessageKind};
use bytes::Bytes;
use std::time::Instant;

/// What the shell's writer of a streamed response does next ([`Gateway::stream_next`]).
#[derive(Debug, PartialEq, Eq)]
pub enum StreamTurn {
    /// Write the batch (`bytes` long).
    Write { bytes: usize },
    /// Nothing queued yet: wait for the writer's wake-up.
    Idle,
    /// The body is complete and written: the connection may serve another request.
    Done,
    /// The body was cut short and what was queued is written: end the connection.
    Closed,
    /// The client does not read: reset the connection.
    Reset,
}

/// May the shell read more of a streamed request body ([`Gateway::upload_room`])?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadRoom {
    Room,
    /// Wait for [`super::Output::Wake`].
    Wait,
    /// The request ended (answered, failed or gone): stop sending the body.
    Ended,
}

impl Gateway {
    /// Tunnels one buffered HTTP request to its routed actor. The outcome comes as
    /// [`super::Output::Wake`]; [`Gateway::take_http_outcome`] then hands it over.
    pub fn start_request(
        &mut self,
        routed: &Routed,
        method: String,
        path: String,
        headers: StrMap,
        body: Bytes,
        now: Instant,
    ) -> ConnId {
        self.start_request_with(routed, method, path, headers, Some(body), false, now)
    }

    /// Tunnels an HTTP request: buffered with `body`, or streamed with `None` (the body then
    /// comes through [`Gateway::request_body`]). `http10`: the client speaks HTTP/1.0 (a
    /// streamed response is then delimited by the connection's end, not chunked).
    #[allow(clippy::too_many_arguments)]
    pub fn start_request_with(
        &mut self,
        routed: &Routed,
        method: String,
        path: String,
        headers: StrMap,
        body: Option<Bytes>,
        http10: bool,
        now: Instant,
    ) -> ConnId {
        let id = self.insert(ConnKind::Request(RequestConn {
            actor_id: routed.actor_id.clone(),
            runner_idx: routed.runner_idx,
            req: [0; 4],
            phase: RequestPhase::Waiting,
            next_index: 1,
            head_only: method.eq_ignore_ascii_case("HEAD"),
            http10,
            upload: body.is_none().then(Upload::default),
            deadline: now + crate::config::ms(self.config.timeouts.response_start_ms),
        }));
        let req = self.issue_request_id(id);
        if let Some(ConnKind::Request(r)) = self.conn_mut(id).map(|c| &mut c.kind) {
            r.req = req;
        }
        self.learn_runner(routed.runner_idx, routed.conn);
        let stream = body.is_none();
        let body = body.unwrap_or_default();
        let start = ToClientTunnelMessageKind::RequestStart(protocol::ToClientRequestStart {
            actor_id: routed.actor_id.to_string(),
            method,
            path,
            headers,
            body: (!body.is_empty()).then(|| body.to_vec()),
            stream,
        });
        let frames = self.tunnel_frames(req, 0, start);
        self.metrics().inc(Counter::HttpTunnelRequests);
        if stream {
            self.metrics().inc(Counter::HttpStreamedRequests);
        }
        if self.send_to_runner(routed.runner_idx, frames) {
            let at = now + crate::config::ms(self.config.timeouts.response_start_ms);
            self.arm(at, Timer::Response(id));
        } else {
            let r = Refusal::request_failed(503, "request.runner_disconnected");
            self.answer_request(id, HttpOutcome::Failed(r));
        }
        id
    }

    /// Whether the runner connection a routing answer names takes streamed request bodies
    /// (it said so in its `Init`, see [`crate::runner`]); others get buffered requests.
    pub fn runner_streams_requests(&self, routed: &Routed) -> bool {
        let conn = self
            .runners
            .get(routed.runner_idx as usize)
            .copied()
            .flatten()
            .unwrap_or(routed.conn);
        self.stream_runners.contains(&conn)
    }

    /// Whether the shell may read more of a streamed request body now.
    pub fn upload_room(&mut self, id: ConnId) -> UploadRoom {
        let limit = self.config.limits.http_stream_buffer_bytes as u64;
        let Some(ConnKind::Request(r)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return UploadRoom::Ended;
        };
        let live = match &r.phase {
            RequestPhase::Waiting => true,
            RequestPhase::Streaming(s) => !s.aborted,
            RequestPhase::Answered(_) => false,
        };
        match &mut r.upload {
            Some(u) if live && !u.finished => {
                if u.sent - u.written < limit {
                    UploadRoom::Room
                } else {
                    u.parked = true;
                    UploadRoom::Wait
                }
            }
            _ => UploadRoom::Ended,
        }
    }

    /// The next piece of a streamed request body (`finish`: the last). Returns false when
    /// the request no longer takes its body.
    /// The response deadline runs from the last piece.
    pub fn request_body(&mut self, id: ConnId, data: Bytes, finish: bool, now: Instant) -> bool {
        let wait = crate::config::ms(self.config.timeouts.response_start_ms);
        let Some(ConnKind::Request(r)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return false;
        };
        let Some(u) = r.upload.as_mut().filter(|u| !u.finished) else {
            return false;
        };
        u.finished = finish;
        r.deadline = now + wait;
        let (req, index, runner_idx) = (r.req, r.next_index, r.runner_idx);
        r.next_index = r.next_index.wrapping_add(1);
        let chunk = ToClientTunnelMessageKind::RequestChunk(protocol::ToClientRequestChunk {
            body: data.to_vec(),
            finish,
        });
        let frames = self.tunnel_frames(req, index, chunk);
        let bytes: usize = frames.iter().map(|f| f.len()).sum();
        if let Some(ConnKind::Request(r)) = self.conn_mut(id).map(|c| &mut c.kind) {
            if let Some(u) = r.upload.as_mut() {
                u.sent += bytes as u64;
            }
        }
        let Some(Some(conn)) = self.runners.get(runner_idx as usize).copied() else {
            // The runner is away: its detach fails the request.
            return false;
        };
        let receipt = Receipt {
            shard: self.id,
            id,
            bytes: bytes as u32,
        };
        let at = ConnId {
            slot: conn.slot,
            gen: conn.gen,
        };
        // Only runners of this node stream uploads (`RunnerStreams` stays on its node).
        debug_assert_eq!(conn.node, self.gateway_id);
        if conn.shard == self.id {
            self.write_with_receipt(at, frames, receipt);
        } else {
            self.mail(
                conn.shard,
                ShardMsg::Upload {
                    conn: at,
                    frames,
                    receipt,
                },
            );
        }
        true
    }

    /// Queues a streamed request body's chunk on a runner connection of this shard, with a
    /// receipt for when it is written. A connection that is gone takes nothing (its
    /// runner's detach fails the request).
    pub(super) fn write_with_receipt(&mut self, conn: ConnId, frames: Vec<Bytes>, r: Receipt) {
        if !self.write_local(conn, frames) {
            return;
        }
        if let Some(c) = self.conn_mut(conn) {
            let at = c.out.pushed;
            c.out.receipts.push_back((at, r));
        }
        // Already written (a connection that is closing drops what is queued after it).
        let written = self.conn(conn).map(|c| c.out.written);
        if let Some(w) = written {
            self.receipts_due(conn, w);
        }
    }

    /// `bytes` more of a streamed request body were written to the runner.
    pub(super) fn upload_written(&mut self, id: ConnId, bytes: u32) {
        let Some(ConnKind::Request(r)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return;
        };
        if let Some(u) = r.upload.as_mut() {
            u.written += bytes as u64;
            if std::mem::take(&mut u.parked) {
                self.notice(Notice::Wake(id));
            }
        }
    }

    /// The outcome of a tunnelled HTTP request, once answered (taken once); for a streamed
    /// response, its head (taken once; the body follows through [`Self::stream_next`]).
    pub fn take_http_outcome(&mut self, id: ConnId) -> Option<HttpOutcome> {
        match &mut self.conn_mut(id)?.kind {
            ConnKind::Request(RequestConn {
                phase: RequestPhase::Answered(o),
                ..
            }) => o.take(),
            ConnKind::Request(RequestConn {
                phase: RequestPhase::Streaming(s),
                ..
            }) => {
                let (status, headers) = s.head.take()?;
                Some(HttpOutcome::Stream {
                    status,
                    headers,
                    framing: s.framing,
                })
            }
            _ => None,
        }
    }

    /// One turn of a streamed response's writer: [`Self::written`] for the batch just
    /// written (`0`: none), then the next batch, or how the stream ended.
    pub fn stream_next(
        &mut self,
        id: ConnId,
        written: usize,
        batch: &mut Vec<Bytes>,
        max: usize,
    ) -> StreamTurn {
        if written > 0 {
            self.written(id, written);
        }
        let Some(c) = self.conn_mut(id) else {
            return StreamTurn::Closed;
        };
        if c.out.abort {
            return StreamTurn::Reset;
        }
        let bytes = c.out.take_batch(batch, max);
        if !batch.is_empty() {
            return StreamTurn::Write { bytes };
        }
        match &c.kind {
            ConnKind::Request(RequestConn {
                phase: RequestPhase::Streaming(s),
                ..
            }) => {
                if s.aborted || (s.done && s.framing == BodyFraming::UntilClose) {
                    StreamTurn::Closed
                } else if s.done {
                    StreamTurn::Done
                } else {
                    StreamTurn::Idle
                }
            }
            _ => StreamTurn::Closed,
        }
    }

    /// The shell is done with a tunnelled request (answered, or its client went away): a
    /// runner still sending or receiving its body is told to drop it (what it sends until
    /// then counts as late, not unroutable), and the entry goes.
    pub fn end_request(&mut self, id: ConnId, now: Instant) {
        let owed = match self.kind(id) {
            Some(ConnKind::Request(r)) => match &r.phase {
                RequestPhase::Streaming(s) => (!s.done && !s.aborted, true),
                RequestPhase::Waiting => (true, true),
                RequestPhase::Answered(_) => (false, r.upload.is_some()),
            },
            _ => (false, false),
        };
        if owed.0 {
            self.abort_to_runner(id);
        }
        if owed.1 {
            if let Some(ConnKind::Request(r)) = self.kind(id) {
                let req = r.req;
                self.recently_closed.insert(req, now);
            }
        }
        self.remove(id);
    }

    /// Sends `RequestAbort` (with the request's next index) to its runner.
    pub(super) fn abort_to_runner(&mut self, id: ConnId) {
        let Some(ConnKind::Request(r)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return;
        };
        let (req, index, runner_idx) = (r.req, r.next_index, r.runner_idx);
        r.next_index = r.next_index.wrapping_add(1);
        if let Some(u) = r.upload.as_mut() {
            u.finished = true;
        }
        let frames = self.tunnel_frames(req, index, ToClientTunnelMessageKind::RequestAbort);
        self.send_to_runner(runner_idx, frames);
    }

    /// Runner → gateway traffic of a tunnelled HTTP request: the response head (and body),
    /// body chunks of a streamed response, or an abort.
    pub(super) fn request_in(&mut self, id: ConnId, msg: TunnelIn, now: Instant) {
        let Some(ConnKind::Request(rc)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return;
        };
        match (msg, &mut rc.phase) {
            (
                TunnelIn::Other(ToServerTunnelMessageKind::ResponseStart(r)),
                RequestPhase::Waiting,
            ) => {
                let body = r.body.unwrap_or_default();
                if !r.stream {
                    let o = HttpOutcome::Response {
                        status: r.status,
                        headers: r.headers,
                        body: Bytes::from(body),
                    };
                    self.answer_request(id, o);
                    self.finish_upload_early(id);
                    return;
                }
                let framing = if rc.head_only
                    || (100..200).contains(&r.status)
                    || r.status == 204
                    || r.status == 304
                {
                    BodyFraming::Empty
                } else if let Some(n) = r
                    .headers
                    .0
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                {
                    BodyFraming::Length(n)
                } else if rc.http10 {
                    BodyFraming::UntilClose
                } else {
                    BodyFraming::Chunked
                };
                rc.phase = RequestPhase::Streaming(StreamOut {
                    head: Some((r.status, r.headers)),
                    framing,
                    sent: 0,
                    done: framing == BodyFraming::Empty || framing == BodyFraming::Length(0),
                    aborted: false,
                    chunks: 0,
                    idle_seen: (0, 0),
                });
                self.metrics().inc(Counter::HttpStreamedResponses);
                self.notice(Notice::Wake(id));
                let idle = self.config.timeouts.http_stream_idle_ms;
                if idle > 0 {
                    self.arm(now + crate::config::ms(idle), Timer::StreamIdle(id));
                }
                if !body.is_empty() {
                    self.stream_chunk(id, Bytes::from(body), false);
                }
            }
            (
                TunnelIn::Other(ToServerTunnelMessageKind::ResponseChunk(c)),
                RequestPhase::Streaming(s),
            ) => {
                s.chunks += 1;
                if s.done || s.aborted {
                    // After a complete head-only or sized body, or a cut: nothing to add.
                    return;
                }
                self.stream_chunk(id, Bytes::from(c.body), c.finish);
            }
            (TunnelIn::Other(ToServerTunnelMessageKind::ResponseAbort), RequestPhase::Waiting) => {
                let r = Refusal::request_failed(503, "request.aborted");
                self.answer_request(id, HttpOutcome::Failed(r));
            }
            (
                TunnelIn::Other(ToServerTunnelMessageKind::ResponseAbort),
                RequestPhase::Streaming(s),
            ) => {
                if !s.done && !s.aborted {
                    self.abort_stream(id, "request.aborted", false, false);
                }
            }
            _ => {
                self.metrics().inc(Counter::UnroutableTunnelMessages);
            }
        }
    }

    /// Queues one piece of a streamed response body for the client, framed, under the
    /// request's bound.
    fn stream_chunk(&mut self, id: ConnId, data: Bytes, finish: bool) {
        enum Act {
            TooSlow,
            TooLong,
            Queue {
                frames: Vec<Bytes>,
                complete: bool,
                short: bool,
            },
        }
        let limit = self.config.limits.http_stream_buffer_bytes;
        let act = {
            let Some(c) = self.conn_mut(id) else {
                return;
            };
            let queued = c.out.bytes;
            let ConnKind::Request(RequestConn {
                phase: RequestPhase::Streaming(s),
                ..
            }) = &mut c.kind
            else {
                return;
            };
            let len = data.len() as u64;
            if !data.is_empty() && queued + data.len() > limit {
                Act::TooSlow
            } else {
                let mut frames: Vec<Bytes> = Vec::with_capacity(4);
                let (mut complete, mut short, mut too_long) = (false, false, false);
                match s.framing {
                    BodyFraming::Empty => {}
                    BodyFraming::Length(n) if s.sent + len > n => too_long = true,
                    BodyFraming::Length(n) => {
                        s.sent += len;
                        frames.push(data);
                        complete = s.sent == n;
                        short = finish && !complete;
                    }
                    BodyFraming::Chunked => {
                        s.sent += len;
                        if !data.is_empty() {
                            frames.extend(chunk_frames(data));
                        }
                        if finish {
                            frames.push(Bytes::from_static(LAST_CHUNK));
                            complete = true;
                        }
                    }
                    BodyFraming::UntilClose => {
                        s.sent += len;
                        frames.push(data);
                        complete = finish;
                    }
                }
                if too_long {
                    Act::TooLong
                } else {
                    s.done = complete;
                    Act::Queue {
                        frames,
                        complete,
                        short,
                    }
                }
            }
        };
        match act {
            // The client does not read what it is sent: the runner's socket must not wait
            // for it, so the request ends here.
            Act::TooSlow => self.abort_stream(id, "guard.http_client_too_slow", true, true),
            // More than the actor declared: the response cannot be completed.
            Act::TooLong => self.abort_stream(id, "request.aborted", true, false),
            Act::Queue {
                frames,
                complete,
                short,
            } => {
                self.queue_stream(id, frames);
                if short {
                    // The actor finished before its declared length.
                    self.abort_stream(id, "request.aborted", false, false);
                } else if complete {
                    self.notice(Notice::Flush(id));
                    self.finish_upload_early(id);
                }
            }
        }
    }

    fn queue_stream(&mut self, id: ConnId, frames: Vec<Bytes>) {
        if !frames.is_empty() {
            self.write_local(id, frames);
        }
    }

    /// Cuts a streamed response short: the client gets what is queued (or, when it does
    /// not read, a reset) and no last chunk; the runner is told when it did not end it.
    fn abort_stream(&mut self, id: ConnId, code: &'static str, tell_runner: bool, reset: bool) {
        let Some(ConnKind::Request(RequestConn {
            phase: RequestPhase::Streaming(s),
            ..
        })) = self.conn_mut(id).map(|c| &mut c.kind)
        else {
            return;
        };
        s.aborted = true;
        self.metrics().inc(Counter::HttpStreamAborts);
        self.metrics().error(code);
        if tell_runner {
            self.abort_to_runner(id);
        }
        if reset {
            self.reset(id);
        }
        self.notice(Notice::Flush(id));
        self.notice(Notice::Wake(id));
    }

    /// A request answered while its body was still streaming to the runner: the rest of the
    /// body is not sent, and the runner is told to drop it.
    fn finish_upload_early(&mut self, id: ConnId) {
        let unfinished = matches!(
            self.kind(id),
            Some(ConnKind::Request(r)) if r.upload.is_some_and(|u| !u.finished)
        );
        if unfinished {
            self.abort_to_runner(id);
            self.notice(Notice::Wake(id));
        }
    }

    /// The idle bound of a streamed response: without a chunk from the runner and a byte
    /// taken by the client since the last check, it is aborted; else checked again later.
    pub(super) fn stream_idle_check(&mut self, id: ConnId, now: Instant) {
        let idle = self.config.timeouts.http_stream_idle_ms;
        let Some(c) = self.conn_mut(id) else {
            return;
        };
        let written = c.out.written;
        let ConnKind::Request(RequestConn {
            phase: RequestPhase::Streaming(s),
            ..
        }) = &mut c.kind
        else {
            return;
        };
        if s.done || s.aborted {
            return;
        }
        let seen = (s.chunks, written);
        if seen != s.idle_seen {
            s.idle_seen = seen;
            self.arm(now + crate::config::ms(idle), Timer::StreamIdle(id));
        } else {
            self.abort_stream(id, "guard.http_stream_idle", true, false);
        }
    }

    /// Answers a tunnelled HTTP request (once) and wakes its task.
    pub(super) fn answer_request(&mut self, id: ConnId, outcome: HttpOutcome) {
        let Some(ConnKind::Request(rc)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return;
        };
        if matches!(rc.phase, RequestPhase::Answered(_)) {
            return;
        }
        rc.phase = RequestPhase::Answered(Some(outcome));
        self.notice(Notice::Wake(id));
    }

    /// Fails every tunnelled HTTP request that matches `pred` (its runner or actor is gone,
    /// or the shard drains): one still waiting gets a 503 with `code`, a streamed response is
    /// cut short (the runner is told only while draining: otherwise it is gone).
    pub(super) fn fail_requests(
        &mut self,
        code: &'static str,
        pred: impl Fn(&RequestConn) -> bool,
    ) {
        let hit: Vec<(ConnId, bool)> = self
            .conns
            .iter()
            .filter_map(|(s, c)| match &c.kind {
                ConnKind::Request(r) if pred(r) => {
                    let id = ConnId {
                        slot: s as u32,
                        gen: c.gen,
                    };
                    match &r.phase {
                        RequestPhase::Waiting => Some((id, false)),
                        RequestPhase::Streaming(s) if !s.done && !s.aborted => Some((id, true)),
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect();
        for (id, streaming) in hit {
            if streaming {
                self.abort_stream(id, code, code == "guard.draining", false);
            } else {
                self.answer_request(id, HttpOutcome::Failed(Refusal::request_failed(503, code)));
            }
        }
    }
}
