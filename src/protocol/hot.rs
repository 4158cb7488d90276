//! Zero-copy fast path for tunnelled WebSocket data, the gateway's hot path.
//!
//! Encoding: a `WebSocketMessage` tunnel message is `[prefix][payload][binary flag]`, so the
//! shell writes the small prefix, the payload `Bytes` and the one-byte trailer with a vectored
//! write and never copies the payload. Decoding: runner→gateway `WebSocketMessage` and
//! `WebSocketMessageAck` are parsed by hand and the payload is returned as a slice of the
//! received `Bytes`; everything else (and anything the fast parser does not fully accept) goes
//! through the strict serde decode, so both paths accept and reject exactly the same inputs.
//!
//! Must never copy payloads, allocate per message, or panic on network input.

use bytes::Bytes;

use super::codec::{
    decode_to_client, decode_to_server, read_uvarint, ProtocolError, MAX_MESSAGE_LEN,
};
use super::types::{
    GatewayId, MessageId, MessageIndex, RequestId, ToClient, ToClientTunnelMessage,
    ToClientTunnelMessageKind, ToClientWebSocketMessage, ToServer, ToServerTunnelMessage,
    ToServerTunnelMessageKind, ToServerWebSocketMessage, ToServerWebSocketMessageAck,
};

/// `ToClient` union tag of `TunnelMessage`.
const TO_CLIENT_TUNNEL_TAG: u8 = 4;
/// `ToServer` union tag of `TunnelMessage`.
const TO_SERVER_TUNNEL_TAG: u8 = 6;
/// `WebSocketMessage` tag in both tunnel message kind unions.
const KIND_WS_MESSAGE: u8 = 4;
/// `WebSocketMessageAck` tag in `ToServerTunnelMessageKind`.
const KIND_WS_ACK: u8 = 5;
/// outer tag + gateway id + request id + message index.
const HEADER_LEN: usize = 1 + 4 + 4 + 2;

/// Largest possible prefix: header, kind tag, 10-byte uvarint length.
pub const WS_PREFIX_MAX: usize = HEADER_LEN + 1 + 10;

/// Encoded bytes preceding the payload of a tunnelled `WebSocketMessage`. Inline, no heap.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WsPrefix {
    buf: [u8; WS_PREFIX_MAX],
    len: u8,
}

impl WsPrefix {
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    #[inline]
    #[allow(clippy::len_without_is_empty)] // never empty
    pub fn len(&self) -> usize {
        self.len as usize
    }
}

impl std::fmt::Debug for WsPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WsPrefix").field(&self.as_bytes()).finish()
    }
}

#[inline]
fn ws_prefix(
    outer_tag: u8,
    gateway_id: GatewayId,
    request_id: RequestId,
    index: MessageIndex,
    payload_len: usize,
) -> WsPrefix {
    let mut buf = [0u8; WS_PREFIX_MAX];
    buf[0] = outer_tag;
    buf[1..5].copy_from_slice(&gateway_id);
    buf[5..9].copy_from_slice(&request_id);
    buf[9..11].copy_from_slice(&index.to_le_bytes());
    buf[11] = KIND_WS_MESSAGE;
    let mut v = payload_len as u64;
    let mut n = HEADER_LEN + 1;
    while v >= 0x80 {
        buf[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    buf[n] = v as u8;
    WsPrefix {
        buf,
        len: (n + 1) as u8,
    }
}

/// Prefix of a gateway→runner `ToClient::TunnelMessage { WebSocketMessage { data, binary } }`.
/// The full message is `prefix ++ payload ++ ws_message_trailer(binary)`.
#[inline]
pub fn encode_ws_message_prefix(
    gateway_id: GatewayId,
    request_id: RequestId,
    index: MessageIndex,
    payload_len: usize,
) -> WsPrefix {
    ws_prefix(
        TO_CLIENT_TUNNEL_TAG,
        gateway_id,
        request_id,
        index,
        payload_len,
    )
}

/// Prefix of a runner→gateway `ToServer::TunnelMessage { WebSocketMessage { data, binary } }`.
/// The full message is `prefix ++ payload ++ ws_message_trailer(binary)`.
#[inline]
pub fn encode_ws_message_prefix_to_server(
    gateway_id: GatewayId,
    request_id: RequestId,
    index: MessageIndex,
    payload_len: usize,
) -> WsPrefix {
    ws_prefix(
        TO_SERVER_TUNNEL_TAG,
        gateway_id,
        request_id,
        index,
        payload_len,
    )
}

/// The byte that follows the payload of a tunnelled `WebSocketMessage`.
#[inline]
pub fn ws_message_trailer(binary: bool) -> [u8; 1] {
    [binary as u8]
}

/// A complete runner→gateway `WebSocketMessageAck` (fixed 14 bytes).
#[inline]
pub fn encode_ws_ack_to_server(
    gateway_id: GatewayId,
    request_id: RequestId,
    message_index: MessageIndex,
    ack_index: MessageIndex,
) -> [u8; HEADER_LEN + 3] {
    let mut buf = [0u8; HEADER_LEN + 3];
    buf[0] = TO_SERVER_TUNNEL_TAG;
    buf[1..5].copy_from_slice(&gateway_id);
    buf[5..9].copy_from_slice(&request_id);
    buf[9..11].copy_from_slice(&message_index.to_le_bytes());
    buf[11] = KIND_WS_ACK;
    buf[12..14].copy_from_slice(&ack_index.to_le_bytes());
    buf
}

/// Runner→gateway message as seen by the gateway data path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToServerHot {
    /// `TunnelMessage { WebSocketMessage }`; `data` is a slice of the received buffer.
    WsMessage {
        gateway_id: GatewayId,
        request_id: RequestId,
        message_index: MessageIndex,
        data: Bytes,
        binary: bool,
    },
    /// `TunnelMessage { WebSocketMessageAck { index: ack_index } }`.
    WsAck {
        gateway_id: GatewayId,
        request_id: RequestId,
        message_index: MessageIndex,
        ack_index: MessageIndex,
    },
    /// Any other message, decoded by the strict serde decoder.
    Other(ToServer),
}

impl ToServerHot {
    /// The equivalent fully decoded value (copies the payload; for tests and slow paths).
    pub fn into_to_server(self) -> ToServer {
        match self {
            ToServerHot::WsMessage {
                gateway_id,
                request_id,
                message_index,
                data,
                binary,
            } => ToServer::TunnelMessage(ToServerTunnelMessage {
                message_id: MessageId {
                    gateway_id,
                    request_id,
                    message_index,
                },
                message_kind: ToServerTunnelMessageKind::WebSocketMessage(
                    ToServerWebSocketMessage {
                        data: data.to_vec(),
                        binary,
                    },
                ),
            }),
            ToServerHot::WsAck {
                gateway_id,
                request_id,
                message_index,
                ack_index,
            } => ToServer::TunnelMessage(ToServerTunnelMessage {
                message_id: MessageId {
                    gateway_id,
                    request_id,
                    message_index,
                },
                message_kind: ToServerTunnelMessageKind::WebSocketMessageAck(
                    ToServerWebSocketMessageAck { index: ack_index },
                ),
            }),
            ToServerHot::Other(m) => m,
        }
    }
}

/// Gateway→runner message as seen by a runner's data path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToClientHot {
    /// `TunnelMessage { WebSocketMessage }`; `data` is a slice of the received buffer.
    WsMessage {
        gateway_id: GatewayId,
        request_id: RequestId,
        message_index: MessageIndex,
        data: Bytes,
        binary: bool,
    },
    /// Any other message, decoded by the strict serde decoder.
    Other(ToClient),
}

impl ToClientHot {
    /// The equivalent fully decoded value (copies the payload).
    pub fn into_to_client(self) -> ToClient {
        match self {
            ToClientHot::WsMessage {
                gateway_id,
                request_id,
                message_index,
                data,
                binary,
            } => ToClient::TunnelMessage(ToClientTunnelMessage {
                message_id: MessageId {
                    gateway_id,
                    request_id,
                    message_index,
                },
                message_kind: ToClientTunnelMessageKind::WebSocketMessage(
                    ToClientWebSocketMessage {
                        data: data.to_vec(),
                        binary,
                    },
                ),
            }),
            ToClientHot::Other(m) => m,
        }
    }
}

struct Header {
    gateway_id: GatewayId,
    request_id: RequestId,
    message_index: MessageIndex,
    kind: u8,
}

#[inline]
fn header(buf: &[u8], outer_tag: u8) -> Option<Header> {
    if buf.len() < HEADER_LEN + 1 || buf.len() > MAX_MESSAGE_LEN || buf[0] != outer_tag {
        return None;
    }
    let mut gateway_id = [0u8; 4];
    gateway_id.copy_from_slice(&buf[1..5]);
    let mut request_id = [0u8; 4];
    request_id.copy_from_slice(&buf[5..9]);
    Some(Header {
        gateway_id,
        request_id,
        message_index: u16::from_le_bytes([buf[9], buf[10]]),
        kind: buf[11],
    })
}

/// Body of a `WebSocketMessage` kind starting at `HEADER_LEN + 1`: the payload range and the
/// binary flag, only if the message is complete and well formed with nothing trailing.
#[inline]
fn ws_body(buf: &[u8]) -> Option<(std::ops::Range<usize>, bool)> {
    let mut pos = HEADER_LEN + 1;
    let len = read_uvarint(buf, &mut pos).ok()?;
    let rest = buf.len() - pos;
    if rest == 0 || len != (rest - 1) as u64 {
        return None;
    }
    let end = buf.len() - 1;
    let binary = match buf[end] {
        0 => false,
        1 => true,
        _ => return None,
    };
    Some((pos..end, binary))
}

/// Decode a runner→gateway message; WebSocket data and acks without copying the payload.
/// Accepts and rejects exactly what [`decode_to_server`] does.
pub fn decode_to_server_hot(msg: &Bytes) -> Result<ToServerHot, ProtocolError> {
    if let Some(h) = header(msg, TO_SERVER_TUNNEL_TAG) {
        match h.kind {
            KIND_WS_MESSAGE => {
                if let Some((range, binary)) = ws_body(msg) {
                    return Ok(ToServerHot::WsMessage {
                        gateway_id: h.gateway_id,
                        request_id: h.request_id,
                        message_index: h.message_index,
                        data: msg.slice(range),
                        binary,
                    });
                }
            }
            KIND_WS_ACK if msg.len() == HEADER_LEN + 3 => {
                return Ok(ToServerHot::WsAck {
                    gateway_id: h.gateway_id,
                    request_id: h.request_id,
                    message_index: h.message_index,
                    ack_index: u16::from_le_bytes([msg[12], msg[13]]),
                });
            }
            _ => {}
        }
    }
    decode_to_server(msg).map(ToServerHot::Other)
}

/// Decode a gateway→runner message; WebSocket data without copying the payload.
/// Accepts and rejects exactly what [`decode_to_client`] does.
pub fn decode_to_client_hot(msg: &Bytes) -> Result<ToClientHot, ProtocolError> {
    if let Some(h) = header(msg, TO_CLIENT_TUNNEL_TAG) {
        if h.kind == KIND_WS_MESSAGE {
            if let Some((range, binary)) = ws_body(msg) {
                return Ok(ToClientHot::WsMessage {
                    gateway_id: h.gateway_id,
                    request_id: h.request_id,
                    message_index: h.message_index,
                    data: msg.slice(range),
                    binary,
                });
            }
        }
    }
    decode_to_client(msg).map(ToClientHot::Other)
}
