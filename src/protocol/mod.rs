//! Rivet runner protocol v7: message types, the strict BARE codec, version negotiation and the
//! zero-copy hot path for tunnelled WebSocket messages.
//!
//! Sans-IO: plain functions over byte slices and values. Must never touch sockets, clocks or
//! threads, and must never panic on bytes received from the network.

pub mod codec;
pub mod hot;
pub mod types;
pub mod version;

#[cfg(test)]
mod arb;
#[cfg(test)]
mod tests;

pub use codec::{
    decode_to_client, decode_to_server, encode_to_client, encode_to_server, ProtocolError,
    MAX_MESSAGE_LEN,
};
pub use hot::{
    decode_to_client_hot, decode_to_server_hot, encode_ws_ack_to_server, encode_ws_message_prefix,
    encode_ws_message_prefix_to_server, ws_message_trailer, ToClientHot, ToServerHot, WsPrefix,
    WS_PREFIX_MAX,
};
pub use types::*;
pub use version::{negotiate, VersionError, SUPPORTED_VERSIONS};
