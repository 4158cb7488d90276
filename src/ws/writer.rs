//! Server-side WebSocket frames, ready for a vectored write.
//!
//! What it is for: building `[header][payload]` pairs for data, ping, pong and close frames
//! sent by the gateway. The payload stays the caller's `Bytes` (no copy); the header is a
//! small inline array.
//! What it must never do: mask a server frame, or produce a control frame over 125 bytes or a
//! close frame with an invalid code or a reason that is not UTF-8.

use bytes::{BufMut, Bytes, BytesMut};

use super::close::{is_valid_close_code, INTERNAL_ERROR};
use super::frame::{encode_header, HeaderBuf, OpCode, MAX_CONTROL_PAYLOAD};

/// Payload of a close frame: the code (big-endian) followed by `reason`, truncated at a
/// character boundary so the whole payload fits in 125 bytes. A code that may not be sent
/// (1005, 1006, 1015, unassigned) is replaced by 1011.
pub fn close_payload(code: u16, reason: &str) -> Bytes {
    let code = if is_valid_close_code(code) {
        code
    } else {
        INTERNAL_ERROR
    };
    let max_reason = MAX_CONTROL_PAYLOAD as usize - 2;
    let mut end = reason.len().min(max_reason);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut b = BytesMut::with_capacity(2 + end);
    b.put_u16(code);
    b.extend_from_slice(&reason.as_bytes()[..end]);
    b.freeze()
}

/// Header of an unmasked, unfragmented server frame.
#[inline]
pub fn server_header(opcode: OpCode, payload_len: usize) -> HeaderBuf {
    encode_header(true, opcode, payload_len as u64, None)
}

/// A complete server frame: write `header` then `payload` (e.g. with `writev`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerFrame {
    /// Encoded frame header (2–10 bytes, never masked).
    pub header: HeaderBuf,
    /// Frame payload, shared with whoever produced it.
    pub payload: Bytes,
}

impl ServerFrame {
    /// A frame with the given opcode; control payloads over 125 bytes are truncated to 125 so
    /// that the frame stays valid (the gateway only sends short control payloads).
    pub fn new(opcode: OpCode, mut payload: Bytes) -> Self {
        if opcode.is_control() && payload.len() > MAX_CONTROL_PAYLOAD as usize {
            payload.truncate(MAX_CONTROL_PAYLOAD as usize);
        }
        ServerFrame {
            header: server_header(opcode, payload.len()),
            payload,
        }
    }

    /// A text message; `payload` must be UTF-8 (as it is when it came from a text frame).
    pub fn text(payload: Bytes) -> Self {
        Self::new(OpCode::Text, payload)
    }

    /// A binary message.
    pub fn binary(payload: Bytes) -> Self {
        Self::new(OpCode::Binary, payload)
    }

    /// A ping.
    pub fn ping(payload: Bytes) -> Self {
        Self::new(OpCode::Ping, payload)
    }

    /// A pong; answer a received ping with its own payload.
    pub fn pong(payload: Bytes) -> Self {
        Self::new(OpCode::Pong, payload)
    }

    /// A close frame with a code and reason (see [`close_payload`]).
    pub fn close(code: u16, reason: &str) -> Self {
        Self::new(OpCode::Close, close_payload(code, reason))
    }

    /// A close frame without a payload (echoing a peer's empty close).
    pub fn close_empty() -> Self {
        Self::new(OpCode::Close, Bytes::new())
    }

    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        self.header.len() + self.payload.len()
    }

    /// Header and payload in one buffer (tests and cold paths; copies the payload).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.wire_len());
        v.extend_from_slice(&self.header);
        v.extend_from_slice(&self.payload);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::super::reader::{Role, WsEvent, WsReader, WsReaderConfig};
    use super::*;

    fn client_reader() -> WsReader {
        WsReader::new(WsReaderConfig {
            role: Role::Client,
            ..Default::default()
        })
    }

    #[test]
    fn close_payload_forms() {
        assert_eq!(&close_payload(1000, "")[..], &[0x03, 0xE8]);
        assert_eq!(
            &close_payload(1002, "ws.protocol_error")[..2],
            &[0x03, 0xEA]
        );
        assert_eq!(
            &close_payload(1002, "ws.protocol_error")[2..],
            b"ws.protocol_error"
        );
        // reserved codes are never sent
        assert_eq!(&close_payload(1005, "")[..], &1011u16.to_be_bytes());
        // long reason cut at a char boundary within 125 bytes
        let long = "é".repeat(100);
        let p = close_payload(1000, &long);
        assert!(p.len() <= 125);
        assert!(std::str::from_utf8(&p[2..]).is_ok());
        assert_eq!(p.len(), 2 + 122);
    }

    #[test]
    fn server_frames_are_unmasked_and_parse_back() {
        let frames = [
            ServerFrame::text(Bytes::from_static(b"hello")),
            ServerFrame::binary(Bytes::from(vec![1u8; 70000])),
            ServerFrame::ping(Bytes::from_static(b"p")),
            ServerFrame::pong(Bytes::from(vec![2u8; 300])),
            ServerFrame::close(1001, "bye"),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            assert_eq!(f.header[1] & 0x80, 0, "server frames are never masked");
            wire.extend(f.to_vec());
        }
        let mut r = client_reader();
        let mut buf = BytesMut::from(&wire[..]);
        let mut evs = Vec::new();
        while let Some(e) = r.next(&mut buf).unwrap() {
            evs.push(e);
        }
        assert_eq!(
            evs,
            vec![
                WsEvent::Message {
                    text: true,
                    data: Bytes::from_static(b"hello")
                },
                WsEvent::Message {
                    text: false,
                    data: Bytes::from(vec![1u8; 70000])
                },
                WsEvent::Ping(Bytes::from_static(b"p")),
                WsEvent::Pong(Bytes::from(vec![2u8; 125])),
                WsEvent::Close {
                    code: Some(1001),
                    reason: Bytes::from_static(b"bye")
                },
            ]
        );
        assert_eq!(ServerFrame::close_empty().to_vec(), vec![0x88, 0]);
    }
}
