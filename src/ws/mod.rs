//! Client-facing WebSocket (RFC 6455), sans-IO.
//!
//! What it is for: frame header parsing and encoding, in-place unmasking, message assembly
//! with incremental UTF-8 validation, close-code rules, and the opening handshake, all as
//! plain synchronous functions over byte buffers. The shell owns the socket: it reads bytes
//! into a `BytesMut`, calls [`WsReader::next`] until it returns `Ok(None)`, and writes
//! `[header][payload]` pairs built with [`writer`].
//!
//! What it must never do: touch a socket, a clock or a thread; panic on any input; copy a
//! single-frame payload; allocate for a frame or message before its size has been checked
//! against the configured limits.

pub mod close;
pub mod frame;
pub mod handshake;
pub mod reader;
mod utf8;
pub mod writer;

pub use close::{is_valid_close_code, WsClose};
pub use frame::{apply_mask, encode_header, parse_header, FrameHeader, HeaderBuf, OpCode, WsError};
pub use handshake::{
    accept_key, is_upgrade_request, offered_protocols, response_101, validate_upgrade,
    HandshakeError,
};
pub use reader::{Role, WsEvent, WsReader, WsReaderConfig};
pub use writer::{close_payload, ServerFrame};
