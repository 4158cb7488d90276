//! The runner connection driver (`GET /runners/connect`, SPEC §1.4): asks the core whether
//! to accept the runner, answers the upgrade with subprotocol `rivet`, then reads frames and
//! hands each to the core until the connection ends. Every rule (Init first and in time,
//! pings and their timeout, fences, superseded connections, routing) is the core's.

use super::shell::Shard;
use super::{closing, next_chunk, read_more, read_some, write_response, writer};
use super::{READ_CHUNK, RUNNER_CHUNKS};
use crate::gateway::{accept_runner, Next};
use crate::http::parse::RequestHead;
use crate::metrics::Counter;
use crate::protocol;
use crate::ws::reader::{Role, WsReader, WsReaderConfig};
use bytes::{Bytes, BytesMut};
use std::rc::Rc;
use tokio_uring::net::TcpStream;

pub async fn serve(
    shard: Rc<Shard>,
    stream: Rc<TcpStream>,
    head: RequestHead,
    mut buf: BytesMut,
    query: &str,
    peer: std::net::SocketAddr,
) {
    let accepted = match accept_runner(&shard.shared.access, &head, query, peer) {
        Ok(a) => a,
        Err(r) => {
            let m = shard.metrics();
            if r.unauthorized {
                m.inc(Counter::Unauthorized);
                crate::warn_limited!(m, %peer, code = r.code.as_str(), "runner connection refused");
            }
            m.error(&r.code);
            write_response(&stream, &closing(r.response)).await;
            return;
        }
    };
    let resp = Bytes::from(crate::ws::handshake::response_101(
        &accepted.accept,
        Some("rivet"),
    ));
    if writer::write_all_vectored(&stream, vec![resp])
        .await
        .is_err()
    {
        return;
    }
    let id = shard.with(|c, now| c.runner_connected(accepted, peer, now));
    shard.register(id, Some(&stream));
    tokio_uring::spawn(writer::writer_task(shard.clone(), stream.clone(), id));

    let mut reader = WsReader::new(WsReaderConfig {
        role: Role::Server,
        // Runners send each message as one frame, up to the protocol's message limit (the
        // echo of a 16 MiB client message is a little over 16 MiB).
        max_frame: protocol::MAX_MESSAGE_LEN,
        max_message: protocol::MAX_MESSAGE_LEN,
    });
    let mut handshake_done = false;
    let mut chunk = RUNNER_CHUNKS.0;
    loop {
        match shard.with(|c, now| c.handle_runner_bytes(id, &mut reader, &mut buf, now)) {
            Next::Continue => {}
            Next::Stop => break,
            Next::Done => {
                handshake_done = true;
                break;
            }
        }
        let mut want = reader.bytes_wanted(&buf).saturating_sub(buf.len()).max(1);
        if buf.is_empty() {
            // Room for a frame like the last before the next one starts (see
            // `client::read_size`): a frame started in what is left of a buffer is copied
            // to the next one when it does not fit.
            want = want.max(reader.last_frame_len().min(RUNNER_CHUNKS.1));
        }
        let Some((n, offered)) = read_some(&stream, &mut buf, want, chunk).await else {
            break;
        };
        chunk = next_chunk(chunk, n, offered, RUNNER_CHUNKS);
    }
    // Drain until the peer goes away (the writer ends it after the close frame), unless
    // the close handshake is already complete.
    while !handshake_done && shard.peek(|c| c.contains(id)) {
        if !read_more(&stream, &mut buf, READ_CHUNK).await {
            break;
        }
        buf.clear();
    }
    shard.call(|c| c.runner_ended(id));
    shard.unregister(id);
}
