//! Frames the gateway writes: WebSocket frames to clients and runners, whole runner-protocol
//! messages, and the hot path's tunnelled message as three chunks. Small headers are carved
//! from the shard's scratch buffer, so a forwarded message allocates nothing.

use super::Gateway;
use crate::protocol::{self, ToClient, ToClientTunnelMessage, ToClientTunnelMessageKind};
use crate::ws::frame::{encode_header, OpCode};
use bytes::{Bytes, BytesMut};

pub const TRUE_BYTE: Bytes = Bytes::from_static(&[1]);
pub const FALSE_BYTE: Bytes = Bytes::from_static(&[0]);

/// The two-byte headers of final, unmasked text and binary frames of up to 125 bytes:
/// `[text 0..=125, binary 0..=125]`. A short message's header is a static chunk, with no
/// reference count to touch when it is queued and dropped.
static SHORT_HEADERS: [[u8; 2]; 252] = short_headers();

const fn short_headers() -> [[u8; 2]; 252] {
    let mut t = [[0u8; 2]; 252];
    let mut len = 0;
    while len < 126 {
        t[len] = [0x80 | OpCode::Text as u8, len as u8];
        t[126 + len] = [0x80 | OpCode::Binary as u8, len as u8];
        len += 1;
    }
    t
}

/// A small header chunk carved from the shard's scratch buffer (no allocation per message
/// in steady state).
fn small(scratch: &mut BytesMut, parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if scratch.capacity() - scratch.len() < len {
        scratch.reserve(64 * 1024);
    }
    for p in parts {
        scratch.extend_from_slice(p);
    }
    scratch.split().freeze()
}

/// Server frame carrying `payload` (header chunk + the payload itself, not copied). Takes
/// the scratch buffer rather than the core so that a caller may hold a connection while it
/// frames.
#[inline]
pub(super) fn server_frame(scratch: &mut BytesMut, op: OpCode, payload: Bytes) -> [Bytes; 2] {
    let len = payload.len();
    let head = match op {
        OpCode::Text if len < 126 => Bytes::from_static(&SHORT_HEADERS[len]),
        OpCode::Binary if len < 126 => Bytes::from_static(&SHORT_HEADERS[126 + len]),
        _ => small(
            scratch,
            &[encode_header(true, op, len as u64, None).as_slice()],
        ),
    };
    [head, payload]
}

impl Gateway {
    /// Server frame carrying `payload` (header chunk + the payload itself, not copied).
    pub fn ws_frame(&mut self, op: OpCode, payload: Bytes) -> [Bytes; 2] {
        server_frame(&mut self.scratch, op, payload)
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
            protocol::hot::encode_ws_message_prefix(self.gateway_id, req, index, data.len());
        let total = prefix.as_bytes().len() + data.len() + 1;
        let h = encode_header(true, OpCode::Binary, total as u64, None);
        let head = small(&mut self.scratch, &[h.as_slice(), prefix.as_bytes()]);
        [head, data, if binary { TRUE_BYTE } else { FALSE_BYTE }]
    }

    pub(super) fn tunnel_frames(
        &mut self,
        req: [u8; 4],
        index: u16,
        kind: ToClientTunnelMessageKind,
    ) -> Vec<Bytes> {
        let msg = ToClient::TunnelMessage(ToClientTunnelMessage {
            message_id: protocol::MessageId {
                gateway_id: self.gateway_id,
                request_id: req,
                message_index: index,
            },
            message_kind: kind,
        });
        self.runner_frame(&msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_frames_have_the_encoded_header_at_every_length() {
        let mut scratch = BytesMut::new();
        for op in [OpCode::Text, OpCode::Binary, OpCode::Ping, OpCode::Pong] {
            for len in [0usize, 1, 20, 124, 125, 126, 127, 1024, 65_535, 65_536] {
                if op as u8 >= 0x8 && len > 125 {
                    continue;
                }
                let payload = Bytes::from(vec![7u8; len]);
                let [head, body] = server_frame(&mut scratch, op, payload.clone());
                let want = encode_header(true, op, len as u64, None);
                assert_eq!(&head[..], want.as_slice(), "{op:?} {len}");
                assert_eq!(body, payload);
            }
        }
    }
}
