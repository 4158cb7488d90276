//! Rivet runner protocol v7: message types, the strict BARE codec, version negotiation and the
//! zero-copy hot path for tunnelled WebSocket messages.
//!
//! Sans-IO: plain functions over byte slices and values. Must never touch sockets, clocks or
//! threads, and must never panic on bytes received from the network.

pub mod codec;
pub mod types;
pub mod version;

pub use codec::{
    decode_to_client, decode_to_server, encode_to_client, encode_to_server, ProtocolError,
};
pub use types::*;
pub use version::{negotiate, VersionError, SUPPORTED_VERSIONS};
