//! The client WebSocket driver: routes the upgrade to an actor, lets the gateway core open
//! the tunnel, completes the client's handshake once the runner answered, and then pumps
//! frames: read → core → (the writer) write. Every rule is the core's
//! ([`crate::gateway`]); this file only reads, waits and writes.

use super::shell::Shard;
use super::{closing, next_chunk, read_more, read_some, refuse, write_response, writer};
use super::{READ_CHUNK, WS_CHUNKS, WS_READ_CHUNK};
use crate::gateway::route::{header_map, parse_target, pick_protocol};
use crate::gateway::{ClientRead, ConnId, OpenPhase, Pause, Refusal};
use crate::http::parse::RequestHead;
use crate::protocol;
use crate::ws::reader::{Role, WsReader, WsReaderConfig};
use bytes::{Bytes, BytesMut};
use std::rc::Rc;
use tokio::sync::Notify;
use tokio_uring::net::TcpStream;

pub async fn serve(
    shard: Rc<Shard>,
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
            shard.metrics().error(code);
            write_response(&stream, &closing(e.to_response())).await;
            return;
        }
    };
    let Some(target) = parse_target(&head, path, query) else {
        refuse(&shard, &stream, Refusal::NOT_FOUND_ROUTE).await;
        return;
    };
    let limits = {
        let l = &shard.shared.config.limits;
        (
            l.ws_max_frame_bytes as usize,
            l.ws_max_message_bytes as usize,
        )
    };
    let (routed, actor_path) = match super::gateway::resolve(&shard, target).await {
        Ok(r) => r,
        Err(r) => {
            refuse(&shard, &stream, r).await;
            return;
        }
    };
    // Open the tunnel and wait for the runner's answer (the core's open deadline bounds it).
    let headers = header_map(&head);
    let id = shard.with(|c, now| c.open_client(&routed, actor_path, headers, now));
    let (wake, _) = shard.register(id, Some(&stream));
    loop {
        match shard.peek(|c| c.open_phase(id)) {
            Some(OpenPhase::Waiting) => wake.notified().await,
            Some(OpenPhase::Accepted) => break,
            Some(OpenPhase::Refused(r)) => {
                shard.call(|c| c.client_refused(id));
                shard.unregister(id);
                refuse(&shard, &stream, r).await;
                return;
            }
            Some(OpenPhase::Open) | None => {
                shard.unregister(id);
                return;
            }
        }
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
        finish(&shard, id);
        return;
    }
    shard.call(|c| c.client_upgraded(id));
    tokio_uring::spawn(writer::writer_task(shard.clone(), stream.clone(), id));
    // The WebSocket's life runs in a task of its own, so the handshake's state (the whole
    // routing and open exchange) is freed now instead of living as long as the socket.
    tokio_uring::spawn(ws_loop(shard, stream, id, wake, buf, limits, guard));
}

/// Reads the client's frames until the socket ends, then frees the entry.
async fn ws_loop(
    shard: Rc<Shard>,
    stream: Rc<TcpStream>,
    id: ConnId,
    wake: Rc<Notify>,
    mut buf: BytesMut,
    (max_frame, max_message): (usize, usize),
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
    let mut read = false;
    loop {
        let next = shard.with(|c, now| c.handle_client_bytes(id, read, &mut reader, &mut buf, now));
        read = false;
        match next {
            ClientRead::More => {}
            // Woken after every write; stays paused until the client caught up.
            ClientRead::Paused(Pause::Unread) => {
                while shard.call(|c| c.client_out_full(id)) {
                    wake.notified().await;
                }
                continue;
            }
            ClientRead::Paused(Pause::Window) => {
                wake.notified().await;
                continue;
            }
            ClientRead::Done => break,
            ClientRead::Stop => {
                // Stop parsing; wait for the socket to end.
                buf.clear();
                while read_more(&stream, &mut buf, READ_CHUNK).await {
                    buf.clear();
                }
                break;
            }
        }
        let need = read_size(&reader, &buf);
        let Some((n, offered)) = read_some(&stream, &mut buf, need, chunk).await else {
            break;
        };
        chunk = next_chunk(chunk, n, offered, WS_CHUNKS);
        read = true;
    }
    finish(&shard, id);
}

/// The socket ended: the core tells the runner if still owed and frees the entry.
fn finish(shard: &Shard, id: ConnId) {
    shard.with(|c, now| c.client_ended(id, now));
    shard.unregister(id);
}

/// Room to ask for before the next read: what the reader wants (the rest of the frame), but
/// never more than the bytes already buffered (at least [`GROW_FLOOR`]), so a header that
/// announces a large frame and then stalls costs little memory; the buffer still grows
/// geometrically while the payload keeps coming.
///
/// Before a new frame (nothing buffered), room for one like the last, up to
/// [`EXPECT_CAP`]: without it a read that starts a frame in what is left of the buffer
/// ends inside the frame, and the partial frame is copied to the next buffer (at 16 KiB
/// messages that copy was a third of torpor's user-space instructions).
fn read_size(reader: &WsReader, buf: &BytesMut) -> usize {
    let want = reader.bytes_wanted(buf).saturating_sub(buf.len());
    let size = want.min(buf.len().max(GROW_FLOOR)).max(1);
    if buf.is_empty() {
        size.max(reader.last_frame_len().min(EXPECT_CAP))
    } else {
        size
    }
}

/// Most room kept for the next frame of a client: a 64 KiB message and its header (so an
/// idle socket holds no more than the largest read chunk).
const EXPECT_CAP: usize = WS_CHUNKS.1 + crate::ws::frame::MAX_HEADER_LEN;

/// Smallest growth step of a client's read buffer for a large frame.
const GROW_FLOOR: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::{encode_header, OpCode};

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
    fn read_size_keeps_room_for_a_frame_like_the_last() {
        let mut r = WsReader::new(WsReaderConfig::default());
        let frame = |len: usize| {
            let mut b = BytesMut::from(
                &encode_header(true, OpCode::Binary, len as u64, Some([1, 2, 3, 4]))[..],
            );
            b.extend_from_slice(&vec![0u8; len]);
            b
        };
        let mut buf = frame(16 * 1024);
        assert!(matches!(r.next(&mut buf), Ok(Some(_))));
        assert!(buf.is_empty());
        // Room for the next 16 KiB frame (and its 8-byte header) before anything came.
        assert_eq!(read_size(&r, &buf), 16 * 1024 + 8);
        // A partial header: only what the reader wants.
        assert_eq!(read_size(&r, &BytesMut::from(&[0x82u8][..])), 1);
        // A 1 MiB frame: the room kept is capped.
        let mut buf = frame(1 << 20);
        assert!(matches!(r.next(&mut buf), Ok(Some(_))));
        assert_eq!(read_size(&r, &buf), EXPECT_CAP);
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
        // A runner connection's reads grow to 1 MiB and never drop below 16 KiB.
        let mut r = crate::net::RUNNER_CHUNKS.0;
        for _ in 0..20 {
            r = next_chunk(r, r, r, crate::net::RUNNER_CHUNKS);
        }
        assert_eq!(r, 1024 * 1024);
        for _ in 0..20 {
            r = next_chunk(r, 26, r, crate::net::RUNNER_CHUNKS);
        }
        assert_eq!(r, 16 * 1024);
    }
}
