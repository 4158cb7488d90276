//! The client WebSocket driver: routes the upgrade to an actor, opens the tunnel
//! (`WebSocketOpen`, index 0), completes the client's handshake once the runner answered, and
//! then pumps frames: client data → the shard's window logic → the runner; runner traffic
//! arrives through `ShardState::tunnel_in`.
//!
//! It owns the socket's lifetime: when its read loop ends it frees the slab entry, the
//! window's bytes, and tells the runner if that is still owed.

use super::{
    closing, next_chunk, read_more, read_some, refuse, remove_conn, write_response, writer,
    READ_CHUNK, WS_CHUNKS, WS_READ_CHUNK,
};
use crate::http::parse::{parse_query, RequestHead};
use crate::metrics::{CloseLabel, Counter, Gauge};
use crate::protocol::{self, StrMap, ToClientTunnelMessageKind};
use crate::shard::state::{ConnKind, Pause, ShardState, TunnelIn};
use crate::tunnel::TunnelSocket;
use crate::ws::frame::OpCode;
use crate::ws::reader::{Role, WsEvent, WsReader, WsReaderConfig};
use bytes::{Bytes, BytesMut};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_uring::net::TcpStream;

/// Where a gateway request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    /// `/gateway/{actorId}[@token]/…` or the header/subprotocol form.
    Actor { actor_id: String, path: String },
    /// `/gateway/{name}/…?rvt-method=get|getOrCreate&rvt-key=…`.
    Named {
        namespace: String,
        name: String,
        key: Option<String>,
        get_or_create: bool,
        path: String,
    },
}

/// Parses the gateway target from the path, query and headers (SPEC §2.1). `None` = not a
/// gateway request.
pub fn parse_target(head: &RequestHead, path: &str, query: &str) -> Option<Target> {
    // Only origin-form targets (`/…`) are routed; anything else (`*`, absolute-form, or a
    // bare word) would hand the actor a path that is not a path.
    if !path.starts_with('/') {
        return None;
    }
    let params = parse_query(query);
    let kept: Vec<String> = query
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("rvt-"))
        .map(str::to_string)
        .collect();
    let with_query = |p: &str| {
        let p = if p.is_empty() { "/" } else { p };
        if kept.is_empty() {
            p.to_string()
        } else {
            format!("{p}?{}", kept.join("&"))
        }
    };
    if let Some(rest) = path.strip_prefix("/gateway/") {
        let (first, tail) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let first = crate::http::parse::percent_decode(first)?;
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if let Some(method) = param("rvt-method") {
            return Some(Target::Named {
                namespace: param("rvt-namespace").unwrap_or_else(|| "default".into()),
                name: first,
                key: param("rvt-key"),
                get_or_create: method.eq_ignore_ascii_case("getOrCreate"),
                path: with_query(tail),
            });
        }
        let actor_id = match first.split_once('@') {
            Some((id, _token)) => id.to_string(),
            None => first,
        };
        if actor_id.is_empty() {
            return None;
        }
        return Some(Target::Actor {
            actor_id,
            path: with_query(tail),
        });
    }
    // Header form (HTTP) and subprotocol form (WebSocket).
    if head.header("x-rivet-target").is_some_and(|t| t == "actor") {
        if let Some(id) = head.header("x-rivet-actor") {
            return Some(Target::Actor {
                actor_id: id.to_string(),
                path: with_query(path),
            });
        }
    }
    let protos: Vec<&str> = crate::ws::handshake::offered_protocols(head).collect();
    if protos.contains(&"rivet_target.actor") {
        if let Some(id) = protos.iter().find_map(|p| p.strip_prefix("rivet_actor.")) {
            return Some(Target::Actor {
                actor_id: id.to_string(),
                path: with_query(path),
            });
        }
    }
    None
}

/// The upgrade headers as a map with unique keys (repeated headers joined with ", ").
pub fn header_map(head: &RequestHead) -> StrMap {
    let mut out: Vec<(String, String)> = Vec::with_capacity(head.headers.len());
    for (k, v) in &head.headers {
        match out.iter_mut().find(|(ek, _)| ek == k) {
            Some((_, ev)) => {
                ev.push_str(", ");
                ev.push_str(v);
            }
            None => out.push((k.clone(), v.clone())),
        }
    }
    StrMap(out)
}

pub async fn serve(
    state: Rc<RefCell<ShardState>>,
    stream: Rc<TcpStream>,
    head: RequestHead,
    buf: BytesMut,
    path: &str,
    query: &str,
    guard: super::ConnGuard,
) {
    let key = match crate::ws::handshake::validate_upgrade(&head) {
        Ok(k) => k,
        Err(e) => {
            let code = if e.status() == 426 {
                "request.unsupported_version"
            } else {
                "request.bad_request"
            };
            state.borrow().metrics().error(code);
            write_response(&stream, &closing(e.to_response())).await;
            return;
        }
    };
    let Some(target) = parse_target(&head, path, query) else {
        refuse(&state, &stream, 404, "request.not_found", "no such route").await;
        return;
    };
    let (timeouts, max_frame, max_message, out_limit) = {
        let st = state.borrow();
        let c = &st.shared.config;
        (
            c.timeouts.clone(),
            c.limits.ws_max_frame_bytes,
            c.limits.ws_max_message_bytes,
            c.limits.client_outbound_bytes,
        )
    };
    let routed = match super::gateway::resolve(&state, target).await {
        Ok(r) => r,
        Err((status, code, msg)) => {
            refuse(&state, &stream, status, code, msg).await;
            return;
        }
    };
    let (actor_id, generation, runner_idx, runner_conn, actor_path) = (
        routed.actor_id,
        routed.generation,
        routed.runner_idx,
        routed.conn,
        routed.path,
    );

    // Register the request and open the tunnel.
    let (open_tx, open_rx) = oneshot::channel();
    let (slot, gen, req) = {
        let mut st = state.borrow_mut();
        let limits = st.limits;
        let socket = TunnelSocket::new(limits);
        let open_index = socket.take_open_index();
        let (slot, gen, req) = st.insert_client(
            actor_id.clone(),
            runner_idx,
            generation,
            socket,
            Some(open_tx),
        );
        if st.runners.len() <= runner_idx as usize {
            st.runners.resize(runner_idx as usize + 1, None);
        }
        st.runners[runner_idx as usize].get_or_insert(runner_conn);
        let frames = st.tunnel_frames(
            req,
            open_index,
            ToClientTunnelMessageKind::WebSocketOpen(protocol::ToClientWebSocketOpen {
                actor_id: actor_id.to_string(),
                path: actor_path,
                headers: header_map(&head),
            }),
        );
        st.send_to_runner(runner_idx, frames);
        (slot, gen, req)
    };
    let _ = req;
    let open =
        tokio::time::timeout(Duration::from_millis(timeouts.websocket_open_ms), open_rx).await;
    let can_hibernate = match open {
        Ok(Ok(TunnelIn::Open { can_hibernate })) => can_hibernate,
        Ok(Ok(TunnelIn::Close { .. })) | Ok(Ok(_)) | Ok(Err(_)) => {
            mark_runner_closed(&state, slot, gen);
            remove_conn(&state, slot, gen);
            refuse(
                &state,
                &stream,
                503,
                "guard.websocket_open_refused",
                "the actor refused the WebSocket",
            )
            .await;
            return;
        }
        Err(_) => {
            // Tell the runner we gave up (it may still answer later).
            {
                let mut st = state.borrow_mut();
                st.close_client(
                    slot,
                    gen,
                    1011,
                    "guard.websocket_open_timeout",
                    Instant::now(),
                );
            }
            remove_conn(&state, slot, gen);
            refuse(
                &state,
                &stream,
                503,
                "guard.websocket_open_timeout",
                "the actor did not accept the WebSocket in time",
            )
            .await;
            return;
        }
    };
    {
        let mut st = state.borrow_mut();
        st.client_opened(slot, gen, can_hibernate, Instant::now());
        let m = st.metrics();
        m.inc(Counter::ClientWebSockets);
        m.gauge_add(Gauge::OpenClientWebSockets, 1);
    }
    let protocol = pick_protocol(&head);
    let accept = crate::ws::handshake::accept_key(key);
    let resp = Bytes::from(crate::ws::handshake::response_101(
        &accept,
        protocol.as_deref(),
    ));
    if writer::write_all_vectored(&stream, vec![resp])
        .await
        .is_err()
    {
        finish(&state, slot, gen);
        return;
    }
    tokio_uring::spawn(writer::writer_task(
        state.clone(),
        stream.clone(),
        slot,
        gen,
    ));
    // The WebSocket's life runs in a task of its own, so the handshake's state (the whole
    // routing and open exchange) is freed now instead of living as long as the socket.
    tokio_uring::spawn(ws_loop(
        state,
        stream,
        slot,
        gen,
        buf,
        (max_frame as usize, max_message as usize, out_limit),
        guard,
    ));
}

/// Reads the client's frames until the socket ends, then frees the slab entry.
async fn ws_loop(
    state: Rc<RefCell<ShardState>>,
    stream: Rc<TcpStream>,
    slot: u32,
    gen: u32,
    mut buf: BytesMut,
    (max_frame, max_message, out_limit): (usize, usize, usize),
    // The connection's place under the shard's cap, given back when the socket's reads end.
    _guard: super::ConnGuard,
) {
    let mut reader = WsReader::new(WsReaderConfig {
        role: Role::Server,
        max_frame,
        // A tunnelled message must fit in one runner message (the runner's decoder refuses
        // more than protocol::MAX_MESSAGE_LEN), so larger client messages get 1009.
        max_message: max_message.min(protocol::MAX_MESSAGE_LEN - 64),
    });
    let mut chunk = WS_READ_CHUNK;
    if buf.is_empty() {
        // The handshake's buffer is not kept: the first read takes one of `chunk` bytes.
        buf = BytesMut::new();
    }
    'outer: loop {
        loop {
            let paused = state.borrow().client_paused(slot, gen);
            if let Some((resume, why)) = paused {
                if why == Pause::Unread {
                    state.borrow().metrics().inc(Counter::ClientReadPauses);
                    // Woken after every write; stays paused until the client caught up.
                    while state.borrow().client_out_full(slot, gen) {
                        resume.notified().await;
                    }
                } else {
                    resume.notified().await;
                }
                continue;
            }
            let ev = reader.next(&mut buf);
            let now = Instant::now();
            match ev {
                Ok(Some(WsEvent::Message { text, data })) => {
                    state
                        .borrow_mut()
                        .client_message(slot, gen, data, !text, now);
                }
                Ok(Some(WsEvent::Ping(p))) => {
                    let mut st = state.borrow_mut();
                    // Pongs pile up for a client that pings without reading: the same
                    // outbound limit as for its actor's messages applies.
                    let queued = st.get(slot, gen).map_or(0, |c| c.out.bytes);
                    if queued > out_limit {
                        st.abort_client(slot, gen, "guard.client_too_slow", now);
                    } else {
                        let frames = st.ws_frame(OpCode::Pong, p);
                        st.write_local(slot, gen, frames);
                    }
                }
                Ok(Some(WsEvent::Pong(_))) => {}
                Ok(Some(WsEvent::Close { code, reason })) => {
                    let mut st = state.borrow_mut();
                    if st.get(slot, gen).is_some_and(|c| c.out.closing) {
                        // The answer to our close: the handshake is complete and the server
                        // ends the TCP connection (RFC 6455 §7.1.1); the peer waits for it.
                        break 'outer;
                    }
                    // Counted as `client.closed` whatever reason text the client sent.
                    let reason = String::from_utf8_lossy(&reason).into_owned();
                    let code = code.unwrap_or(1000);
                    st.close_client_as(slot, gen, code, reason, CloseLabel::ClientClosed, now);
                }
                Ok(None) => break,
                Err(e) => {
                    state
                        .borrow_mut()
                        .close_client(slot, gen, e.code, e.reason, now);
                    // Stop parsing; wait for the socket to end.
                    buf.clear();
                    while read_more(&stream, &mut buf, READ_CHUNK).await {
                        buf.clear();
                    }
                    break 'outer;
                }
            }
        }
        let need = read_size(&reader, &buf);
        let Some((n, offered)) = read_some(&stream, &mut buf, need, chunk).await else {
            break;
        };
        chunk = next_chunk(chunk, n, offered, WS_CHUNKS);
        if !state.borrow_mut().client_read(slot, gen) {
            break;
        }
    }
    finish(&state, slot, gen);
}

/// Room to ask for before the next read: what the reader wants (the rest of the frame), but
/// never more than the bytes already buffered (at least [`GROW_FLOOR`]), so a header that
/// announces a large frame and then stalls costs little memory; the buffer still grows
/// geometrically while the payload keeps coming.
fn read_size(reader: &WsReader, buf: &BytesMut) -> usize {
    let want = reader.bytes_wanted(buf).saturating_sub(buf.len());
    want.min(buf.len().max(GROW_FLOOR)).max(1)
}

/// Smallest growth step of a client's read buffer for a large frame.
const GROW_FLOOR: usize = 64 * 1024;

fn mark_runner_closed(state: &Rc<RefCell<ShardState>>, slot: u32, gen: u32) {
    if let Some(c) = state.borrow_mut().get(slot, gen) {
        if let ConnKind::Client(cc) = &mut c.kind {
            cc.runner_closed = true;
        }
    }
}

/// The socket ended: tell the runner if still owed, free the window and the slot.
fn finish(state: &Rc<RefCell<ShardState>>, slot: u32, gen: u32) {
    {
        let mut st = state.borrow_mut();
        if st.get(slot, gen).is_none() {
            return;
        }
        // close_client is a no-op if a close was already queued; it tells the runner.
        st.close_client(slot, gen, 1000, "ws.closed", Instant::now());
        st.release_window(slot);
        st.metrics().gauge_add(Gauge::OpenClientWebSockets, -1);
    }
    remove_conn(state, slot, gen);
}

/// The subprotocol the gateway answers: `rivet` if offered, else the first offered.
fn pick_protocol(head: &RequestHead) -> Option<String> {
    let offered: Vec<&str> = crate::ws::handshake::offered_protocols(head).collect();
    if offered.contains(&"rivet") {
        return Some("rivet".into());
    }
    offered.first().map(|s| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::encode_header;

    #[test]
    fn read_size_follows_received_bytes_not_announced_length() {
        let mut r = WsReader::new(WsReaderConfig::default());
        // Nothing buffered: the smallest header.
        assert_eq!(read_size(&r, &BytesMut::new()), 2);
        // A header announcing a 16 MiB frame and nothing else: a small step, not 16 MiB.
        let h = encode_header(true, OpCode::Binary, 16 << 20, Some([1, 2, 3, 4]));
        let mut buf = BytesMut::from(&h[..]);
        assert_eq!(read_size(&r, &buf), GROW_FLOOR);
        assert_eq!(r.next(&mut buf), Ok(None));
        assert!(buf.is_empty(), "header consumed");
        assert_eq!(read_size(&r, &buf), GROW_FLOOR);
        // 1 MiB of payload received: at most as much again.
        buf.extend_from_slice(&vec![0u8; 1 << 20]);
        assert_eq!(r.next(&mut buf), Ok(None));
        assert_eq!(read_size(&r, &buf), 1 << 20);
        // Near the end of the frame: exactly the rest.
        buf.extend_from_slice(&vec![0u8; (15 << 20) - 10]);
        assert_eq!(r.next(&mut buf), Ok(None));
        assert_eq!(read_size(&r, &buf), 10);
        // A small frame: its rest.
        let h = encode_header(true, OpCode::Binary, 100, Some([1, 2, 3, 4]));
        let r = WsReader::new(WsReaderConfig::default());
        assert_eq!(read_size(&r, &BytesMut::from(&h[..])), 100);
    }

    #[test]
    fn read_chunk_grows_with_full_reads_and_shrinks_when_idle() {
        let mut c = WS_READ_CHUNK;
        for _ in 0..20 {
            c = next_chunk(c, c, c, WS_CHUNKS);
        }
        assert_eq!(c, WS_CHUNKS.1);
        // Half-used reads keep it; nearly empty ones halve it down to the floor.
        assert_eq!(next_chunk(c, c / 2, c, WS_CHUNKS), c);
        for _ in 0..20 {
            c = next_chunk(c, 26, c, WS_CHUNKS);
        }
        assert_eq!(c, WS_READ_CHUNK);
        // A runner connection's reads grow to 128 KiB and never drop below 16 KiB.
        let mut r = crate::net::RUNNER_CHUNKS.0;
        for _ in 0..20 {
            r = next_chunk(r, r, r, crate::net::RUNNER_CHUNKS);
        }
        assert_eq!(r, 128 * 1024);
        for _ in 0..20 {
            r = next_chunk(r, 26, r, crate::net::RUNNER_CHUNKS);
        }
        assert_eq!(r, 16 * 1024);
    }
}
