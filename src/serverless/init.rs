//! The first event of a serverless runner's `/start` stream: which runner the app connected.
//!
//! rivetkit (`@rivetkit/engine-runner@2.2.1`, `Runner.getServerlessInitPacket`) sends one SSE
//! `message` event whose data is standard base64 (with padding) of
//!
//! ```text
//! u16 little-endian embedded version (7)
//! BARE ToServerlessServer union: tag 0 = ToServerlessServerInit {
//!     runnerId: string (uvarint length + UTF-8),
//!     runnerProtocolVersion: u16 (little-endian),
//! }
//! ```
//!
//! The version prefix is written by the runner itself (`buffer.writeUInt16LE(PROTOCOL_VERSION)`),
//! not by the codec. The Rivet engine decodes prefixes 1–7 (1–3 without
//! `runnerProtocolVersion`); torpor speaks runner protocol v7 only, so it accepts prefix 7 only.
//! The body is decoded with torpor's strict BARE decoder (canonical uvarints, valid UTF-8,
//! known tag, no trailing bytes), which accepts what the npm codec's `decodeToServerlessServer`
//! accepts.
//!
//! Sans-IO; must never panic on input.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::protocol::codec;
use crate::protocol::ProtocolError;

/// The embedded version torpor accepts (runner protocol v7).
pub const INIT_VERSION: u16 = 7;

/// Longest runner id accepted (torpor's runner ids are far shorter).
pub const MAX_RUNNER_ID_BYTES: usize = 256;

/// The decoded init event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerlessInit {
    /// The runner id torpor gave the runner the app connected.
    pub runner_id: String,
    /// The runner protocol version that runner speaks.
    pub runner_protocol_version: u16,
}

/// Why an init payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitError {
    #[error("init payload is not valid base64")]
    Base64,
    #[error("init payload is shorter than its 2-byte version prefix")]
    Truncated,
    #[error("init payload has version {0}, torpor accepts {INIT_VERSION}")]
    Version(u16),
    #[error("init payload is not a valid ToServerlessServer message: {0}")]
    Bare(ProtocolError),
    #[error("init payload has an empty runner id")]
    EmptyRunnerId,
    #[error("init payload's runner id is longer than {MAX_RUNNER_ID_BYTES} bytes")]
    RunnerIdTooLong,
}

#[derive(Serialize, Deserialize)]
enum ToServerlessServer {
    ToServerlessServerInit(ToServerlessServerInit),
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToServerlessServerInit {
    runner_id: String,
    runner_protocol_version: u16,
}

/// Decode the data of the stream's `message` event.
pub fn decode_init(data: &str) -> Result<ServerlessInit, InitError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| InitError::Base64)?;
    decode_init_bytes(&bytes)
}

/// Decode the payload after base64: version prefix and BARE body.
pub fn decode_init_bytes(bytes: &[u8]) -> Result<ServerlessInit, InitError> {
    let (prefix, body) = bytes.split_first_chunk::<2>().ok_or(InitError::Truncated)?;
    let version = u16::from_le_bytes(*prefix);
    if version != INIT_VERSION {
        return Err(InitError::Version(version));
    }
    let ToServerlessServer::ToServerlessServerInit(init) =
        codec::from_slice::<ToServerlessServer>(body).map_err(InitError::Bare)?;
    if init.runner_id.is_empty() {
        return Err(InitError::EmptyRunnerId);
    }
    if init.runner_id.len() > MAX_RUNNER_ID_BYTES {
        return Err(InitError::RunnerIdTooLong);
    }
    Ok(ServerlessInit {
        runner_id: init.runner_id,
        runner_protocol_version: init.runner_protocol_version,
    })
}

/// Encode an init event's data as rivetkit does (for tests and test servers).
pub fn encode_init(init: &ServerlessInit) -> String {
    let msg = ToServerlessServer::ToServerlessServerInit(ToServerlessServerInit {
        runner_id: init.runner_id.clone(),
        runner_protocol_version: init.runner_protocol_version,
    });
    let mut bytes = INIT_VERSION.to_le_bytes().to_vec();
    bytes.extend(codec::to_vec(&msg).unwrap_or_default());
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Produced by `@rivetkit/engine-runner-protocol@2.2.1`'s `encodeToServerlessServer` with the
    // 2-byte prefix written as `Runner.getServerlessInitPacket` writes it.
    const NPM_EXAMPLE: &str = "BwAAGjAxSjBSVU5ORVJJREVYQU1QTEUwMDAwMDAwBwA=";
    const NPM_EXAMPLE_BYTES: [u8; 32] = [
        0x07, 0x00, 0x00, 0x1a, 0x30, 0x31, 0x4a, 0x30, 0x52, 0x55, 0x4e, 0x4e, 0x45, 0x52, 0x49,
        0x44, 0x45, 0x58, 0x41, 0x4d, 0x50, 0x4c, 0x45, 0x30, 0x30, 0x30, 0x30, 0x30, 0x30, 0x30,
        0x07, 0x00,
    ];
    /// runnerId "ünï", runnerProtocolVersion 65535.
    const NPM_UTF8_MAX: &str = "BwAABcO8bsOv//8=";
    /// runnerId "", runnerProtocolVersion 7.
    const NPM_EMPTY_ID: &str = "BwAAAAcA";
    /// runnerId "r" × 200 (a two-byte length), runnerProtocolVersion 7.
    const NPM_LONG_PREFIX: &[u8] = &[0x07, 0x00, 0x00, 0xc8, 0x01];

    #[test]
    fn decodes_npm_bytes() {
        let init = decode_init(NPM_EXAMPLE).unwrap();
        assert_eq!(init.runner_id, "01J0RUNNERIDEXAMPLE0000000");
        assert_eq!(init.runner_protocol_version, 7);
        assert_eq!(decode_init_bytes(&NPM_EXAMPLE_BYTES), Ok(init.clone()));
        assert_eq!(encode_init(&init), NPM_EXAMPLE);

        let init = decode_init(NPM_UTF8_MAX).unwrap();
        assert_eq!(init.runner_id, "ünï");
        assert_eq!(init.runner_protocol_version, u16::MAX);
        assert_eq!(encode_init(&init), NPM_UTF8_MAX);

        let mut long = NPM_LONG_PREFIX.to_vec();
        long.extend([b'r'; 200]);
        long.extend([0x07, 0x00]);
        let init = decode_init_bytes(&long).unwrap();
        assert_eq!(init.runner_id, "r".repeat(200));
    }

    #[test]
    fn refuses_bad_payloads() {
        assert_eq!(decode_init("not base64!"), Err(InitError::Base64));
        // Unpadded base64 is refused, as the engine's STANDARD engine refuses it.
        assert_eq!(decode_init("BwAAAAc"), Err(InitError::Base64));
        assert_eq!(decode_init_bytes(&[0x07]), Err(InitError::Truncated));
        assert_eq!(decode_init(NPM_EMPTY_ID), Err(InitError::EmptyRunnerId));

        let mut wrong_version = NPM_EXAMPLE_BYTES;
        wrong_version[0] = 6;
        assert_eq!(
            decode_init_bytes(&wrong_version),
            Err(InitError::Version(6))
        );

        let mut tag = NPM_EXAMPLE_BYTES;
        tag[2] = 1;
        assert!(matches!(
            decode_init_bytes(&tag),
            Err(InitError::Bare(ProtocolError::InvalidTag { .. }))
        ));

        let mut trailing = NPM_EXAMPLE_BYTES.to_vec();
        trailing.push(0);
        assert!(matches!(
            decode_init_bytes(&trailing),
            Err(InitError::Bare(ProtocolError::TrailingBytes { .. }))
        ));

        let truncated = &NPM_EXAMPLE_BYTES[..NPM_EXAMPLE_BYTES.len() - 1];
        assert!(matches!(
            decode_init_bytes(truncated),
            Err(InitError::Bare(_))
        ));

        let mut bad_utf8 = NPM_EXAMPLE_BYTES;
        bad_utf8[4] = 0xFF;
        assert!(matches!(
            decode_init_bytes(&bad_utf8),
            Err(InitError::Bare(ProtocolError::InvalidUtf8 { .. }))
        ));

        let too_long = encode_init(&ServerlessInit {
            runner_id: "r".repeat(MAX_RUNNER_ID_BYTES + 1),
            runner_protocol_version: 7,
        });
        assert_eq!(decode_init(&too_long), Err(InitError::RunnerIdTooLong));
    }
}
