//! WebSocket close codes (RFC 6455 §7.4) and the error that makes the gateway close a socket.
//!
//! What it is for: the single place that says which close codes a peer may send and which
//! code plus `{group}.{code}` reason the gateway answers a protocol violation with.
//! What it must never do: accept a reserved code (1004, 1005, 1006, 1015) or an unassigned
//! one in a received close frame.

use std::fmt;

/// Normal closure.
pub const NORMAL: u16 = 1000;
/// Endpoint going away (server shutdown, browser navigating away).
pub const GOING_AWAY: u16 = 1001;
/// Protocol error.
pub const PROTOCOL_ERROR: u16 = 1002;
/// Data type the endpoint cannot accept.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// Reserved: no status code was present (never sent on the wire).
pub const NO_STATUS: u16 = 1005;
/// Reserved: connection closed abnormally (never sent on the wire).
pub const ABNORMAL: u16 = 1006;
/// Payload data inconsistent with the message type (invalid UTF-8 in text).
pub const INVALID_PAYLOAD: u16 = 1007;
/// Policy violation.
pub const POLICY_VIOLATION: u16 = 1008;
/// Message (or frame) too big.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// Client expected an extension the server did not negotiate.
pub const MANDATORY_EXTENSION: u16 = 1010;
/// Unexpected server condition.
pub const INTERNAL_ERROR: u16 = 1011;
/// Service restart (IANA registry).
pub const SERVICE_RESTART: u16 = 1012;
/// Try again later (IANA registry).
pub const TRY_AGAIN_LATER: u16 = 1013;
/// Bad gateway (IANA registry).
pub const BAD_GATEWAY: u16 = 1014;

/// Whether `code` may appear in a close frame received from (or sent to) a peer.
///
/// Accepted: 1000–1003, 1007–1014 (assigned by RFC 6455 and the IANA registry),
/// 3000–3999 (registered for libraries and frameworks) and 4000–4999 (private use).
/// Everything else, including the reserved 1004/1005/1006/1015, is a protocol error.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Why the gateway closes a WebSocket: the close code to send and a `{group}.{code}` reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WsClose {
    /// Close code to put in the close frame (1002, 1007 or 1009 from the reader).
    pub code: u16,
    /// Machine-readable reason, `{group}.{code}`.
    pub reason: &'static str,
}

impl WsClose {
    /// 1002: the peer broke the framing rules.
    pub const PROTOCOL: WsClose = WsClose {
        code: PROTOCOL_ERROR,
        reason: "ws.protocol_error",
    };
    /// 1007: a text message or a close reason is not valid UTF-8.
    pub const INVALID_UTF8: WsClose = WsClose {
        code: INVALID_PAYLOAD,
        reason: "ws.invalid_utf8",
    };
    /// 1009: a single frame is larger than the frame limit.
    pub const FRAME_TOO_BIG: WsClose = WsClose {
        code: MESSAGE_TOO_BIG,
        reason: "ws.frame_too_big",
    };
    /// 1009: a message (all its fragments together) is larger than the message limit.
    pub const MESSAGE_TOO_BIG: WsClose = WsClose {
        code: MESSAGE_TOO_BIG,
        reason: "ws.message_too_big",
    };
}

impl fmt::Display for WsClose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.code)
    }
}

impl std::error::Error for WsClose {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_ranges() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            assert!(is_valid_close_code(ok), "{ok} should be valid");
        }
        for bad in [
            0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!is_valid_close_code(bad), "{bad} should be invalid");
        }
    }
}
