//! Frames the gateway writes: WebSocket frames to clients and runners, whole runner-protocol
//! messages, and the hot path's tunnelled message as three chunks. Small headers are carved
//! from the shard's scratch buffer, so a forwarded message allocates nothing.

use super::Gateway;
use crate::protocol::{self, ToClient, ToClientTunnelMessage, ToClientTunnelMessageKind};
use crate::ws::frame::{encode_header, OpCode};
use bytes::Bytes;

pub const TRUE_BYTE: Bytes = Bytes::from_static(&[1]);
pub const FALSE_BYTE: Bytes = Bytes::from_static(&[0]);

impl Gateway {
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
            protocol::hot::encode_ws_message_prefix(self.gateway_id, req, index, data.len());
        let total = prefix.as_bytes().len() + data.len() + 1;
        let h = encode_header(true, OpCode::Binary, total as u64, None);
        let head = self.small(&[h.as_slice(), prefix.as_bytes()]);
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
