//! Gateway requests in the shell: asks the control plane where the actor a request names
//! lives (waking it if it sleeps), and carries an HTTP request through the core's HTTP
//! tunnel: its body buffered or streamed to the runner, the actor's answer written whole or
//! streamed to the client as it comes. The rules (what a routing answer means, the headers
//! either way, buffered or streamed, the framing of a streamed body, the tunnel's phases,
//! bounds and deadlines) are the core's ([`crate::gateway`]); this only moves bytes.

use super::shell::Shard;
use super::writer::{write_all_vectored, write_vectored, MAX_IOV};
use super::{closing, read_body, read_some, write_response, BODY_READ_CHUNK};
use crate::gateway::route::{request_headers, resolve_question, resolved, response_from, Target};
use crate::gateway::{ConnId, HttpOutcome, Refusal, Routed, StreamTurn, UploadRoom};
use crate::http::access;
use crate::http::parse::{body_kind, BodyKind, ChunkedDecoder, RequestHead};
use crate::http::response::{BodyFraming, Response};
use bytes::{Bytes, BytesMut};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_uring::net::TcpStream;

/// Request bodies up to this size are buffered and sent in `RequestStart` even to runners
/// that take streamed bodies (one message instead of three).
pub const STREAM_BODIES_ABOVE: u64 = 64 * 1024;

/// Largest piece of a streamed request body sent as one `RequestChunk`.
const UPLOAD_CHUNK: usize = 64 * 1024;

/// Finds (and wakes, if needed) the actor `target` names: where it lives and the path it
/// sees.
pub async fn resolve(shard: &Shard, target: Target) -> Result<(Routed, String), Refusal> {
    let wake = Duration::from_millis(shard.shared.config.timeouts.actor_wake_ms);
    let (path, make) = resolve_question(target);
    let reply = shard.ask(make, wake + Duration::from_secs(1)).await;
    resolved(reply).map(|r| (r, path))
}

fn failure(shard: &Shard, r: Refusal) -> Response {
    shard.metrics().error(r.code);
    r.response()
}

/// Serves one HTTP request to an actor on `stream` (the head is read; `buf` holds what
/// followed it): routes it, sends it with its body (buffered, or streamed when the body is
/// large or chunked and the runner takes streamed bodies), and writes the actor's answer.
/// Returns whether the connection may serve another request.
pub async fn serve(
    shard: &Shard,
    stream: &Rc<TcpStream>,
    head: &RequestHead,
    target: Target,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
) -> bool {
    let body_limit = shard.shared.config.limits.http_body_bytes;
    // Framing errors before anything is woken; the size limit of a buffered body later (a
    // streamed body has none).
    let kind = match body_kind(head, u64::MAX) {
        Ok(k) => k,
        Err(e) => {
            shard.metrics().error(e.code());
            write_response(stream, &closing(e.to_response())).await;
            return false;
        }
    };
    let (routed, path) = match resolve(shard, target).await {
        Ok(r) => r,
        Err(r) => {
            // An unread body ends the connection.
            let resp = failure(shard, r);
            return finish(shard, stream, head, resp, kind == BodyKind::None).await;
        }
    };
    let large = match kind {
        BodyKind::None => false,
        BodyKind::Length(n) => n > STREAM_BODIES_ABOVE,
        BodyKind::Chunked => true,
    };
    let streamed = large && shard.peek(|c| c.runner_streams_requests(&routed));
    let method = head.method.clone();
    let http10 = head.version_minor == 0;
    let id = if streamed {
        let mut headers = request_headers(head, 0);
        if let BodyKind::Length(n) = kind {
            headers.0.push(("content-length".into(), n.to_string()));
        }
        shard.with(|c, now| c.start_request_with(&routed, method, path, headers, None, http10, now))
    } else {
        let body = match read_body(stream, head, buf, body_limit, deadline).await {
            Ok(b) => b,
            Err(resp) => {
                if let Some(code) = resp.header("x-rivet-error") {
                    shard.metrics().error(code);
                }
                write_response(stream, &closing(resp)).await;
                return false;
            }
        };
        let headers = request_headers(head, body.len());
        shard.with(|c, now| {
            c.start_request_with(&routed, method, path, headers, Some(body), http10, now)
        })
    };
    let (wake, writer) = shard.register(id, Some(stream));
    let mut body_read = true;
    if streamed {
        match upload(shard, stream, head, id, kind, buf, &wake).await {
            Upload::Sent => {}
            // Answered before the whole body came: the rest stays unread.
            Upload::Ended => body_read = false,
            Upload::ClientGone => {
                shard.with(|c, now| c.end_request(id, now));
                shard.unregister(id);
                return false;
            }
        }
    }
    let outcome = loop {
        if let Some(o) = shard.call(|c| c.take_http_outcome(id)) {
            break o;
        }
        if !shard.peek(|c| c.contains(id)) {
            break HttpOutcome::Failed(Refusal::RESPONSE_TIMEOUT);
        }
        wake.notified().await;
    };
    let keep = body_read;
    let again = match outcome {
        HttpOutcome::Response {
            status,
            headers,
            body,
        } => {
            finish(
                shard,
                stream,
                head,
                response_from(status, headers, body),
                keep,
            )
            .await
        }
        HttpOutcome::Failed(r) => finish(shard, stream, head, failure(shard, r), keep).await,
        HttpOutcome::Stream {
            status,
            headers,
            framing,
        } => {
            let resp = response_from(status, headers, Bytes::new());
            stream_out(shard, stream, head, id, resp, framing, keep, &writer).await
        }
    };
    shard.with(|c, now| c.end_request(id, now));
    shard.unregister(id);
    again
}

/// The CORS headers of a gateway answer, and whether the connection stays open (it does not
/// while draining, or when the client or the exchange says otherwise).
fn prepare(shard: &Shard, head: &RequestHead, resp: &mut Response, keep: bool) -> bool {
    if head.header("origin").is_some() {
        access::gateway_cors(head, resp);
    }
    let keep = keep && head.keep_alive() && !shard.shared.draining.load(Ordering::Relaxed);
    if !keep {
        resp.set_close();
    }
    keep
}

/// Writes a whole answer; returns whether the connection may serve another request.
async fn finish(
    shard: &Shard,
    stream: &TcpStream,
    head: &RequestHead,
    mut resp: Response,
    keep: bool,
) -> bool {
    let keep = prepare(shard, head, &mut resp, keep);
    write_response(stream, &resp).await && keep
}

/// Writes a streamed answer: its head at once, then the body as the core queues it, until
/// it is complete (`true` if the connection may go on) or cut short (the connection ends
/// without the last chunk, so the client sees a truncated body).
#[allow(clippy::too_many_arguments)]
async fn stream_out(
    shard: &Shard,
    stream: &TcpStream,
    head: &RequestHead,
    id: ConnId,
    mut resp: Response,
    framing: BodyFraming,
    keep: bool,
    writer: &Notify,
) -> bool {
    let keep = prepare(shard, head, &mut resp, keep);
    let bytes = Bytes::from(resp.encode_head_framed(framing));
    if write_all_vectored(stream, vec![bytes]).await.is_err() {
        return false;
    }
    let mut batch: Vec<Bytes> = Vec::new();
    let mut written = 0;
    loop {
        batch.clear();
        let w = std::mem::take(&mut written);
        match shard.call(|c| c.stream_next(id, w, &mut batch, MAX_IOV)) {
            StreamTurn::Write { bytes } => {
                let (res, back) = write_vectored(stream, std::mem::take(&mut batch)).await;
                if res.is_err() {
                    return false;
                }
                batch = back;
                written = bytes;
            }
            StreamTurn::Idle => writer.notified().await,
            StreamTurn::Done => return keep,
            StreamTurn::Closed | StreamTurn::Reset => return false,
        }
    }
}

enum Upload {
    /// The whole body went to the runner.
    Sent,
    /// The request ended first (answered, failed, cut short).
    Ended,
    /// The client's connection failed or stalled past `timeouts.handshake_ms`.
    ClientGone,
}

/// Sends a streamed request body to the runner as the client sends it, reading the client
/// only while the core has room for it.
async fn upload(
    shard: &Shard,
    stream: &TcpStream,
    head: &RequestHead,
    id: ConnId,
    kind: BodyKind,
    buf: &mut BytesMut,
    wake: &Notify,
) -> Upload {
    let idle = Duration::from_millis(shard.shared.config.timeouts.handshake_ms);
    let mut chunked = (kind == BodyKind::Chunked).then(|| ChunkedDecoder::new(u64::MAX));
    let mut left = match kind {
        BodyKind::Length(n) => n,
        _ => 0,
    };
    if !super::send_continue(stream, head, kind, buf).await {
        return Upload::ClientGone;
    }
    loop {
        match shard.call(|c| c.upload_room(id)) {
            UploadRoom::Ended => return Upload::Ended,
            UploadRoom::Wait => {
                wake.notified().await;
                continue;
            }
            UploadRoom::Room => {}
        }
        let (data, last) = match &mut chunked {
            None => {
                if buf.is_empty() {
                    let want = (left as usize).min(UPLOAD_CHUNK);
                    let read = read_some(stream, buf, want.min(BODY_READ_CHUNK), UPLOAD_CHUNK);
                    if !matches!(tokio::time::timeout(idle, read).await, Ok(Some(_))) {
                        return Upload::ClientGone;
                    }
                }
                let n = (buf.len() as u64).min(left).min(UPLOAD_CHUNK as u64) as usize;
                left -= n as u64;
                (buf.split_to(n).freeze(), left == 0)
            }
            Some(dec) => {
                let mut out = BytesMut::new();
                let done = match dec.decode(buf, &mut out) {
                    Ok(d) => d,
                    Err(_) => return Upload::ClientGone,
                };
                if out.is_empty() && !done {
                    let read = read_some(stream, buf, BODY_READ_CHUNK, UPLOAD_CHUNK);
                    if !matches!(tokio::time::timeout(idle, read).await, Ok(Some(_))) {
                        return Upload::ClientGone;
                    }
                    continue;
                }
                (out.freeze(), done)
            }
        };
        if !shard.with(|c, now| c.request_body(id, data, last, now)) {
            return Upload::Ended;
        }
        if last {
            return Upload::Sent;
        }
    }
}
