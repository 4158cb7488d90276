//! WebSocket opening handshake (RFC 6455 §4.2), server side.
//!
//! What it is for: deciding whether a parsed HTTP request is a valid WebSocket upgrade,
//! computing `Sec-WebSocket-Accept`, listing the offered subprotocols, and encoding the
//! `101 Switching Protocols` response. Refusals map to an HTTP status (400, 405, 426).
//! What it must never do: accept a request that is not GET over HTTP/1.1 with
//! `Upgrade: websocket`, `Connection: upgrade`, a 16-byte base64 key and version 13; write a
//! header value that could split the response.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use sha1::{Digest, Sha1};

use crate::http::parse::RequestHead;
use crate::http::response::Response;

/// GUID appended to the client key before hashing (RFC 6455 §1.3).
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The only protocol version supported.
pub const WS_VERSION: &str = "13";

/// Why an upgrade request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// Not a GET (405).
    Method,
    /// Not HTTP/1.1 (400).
    HttpVersion,
    /// No `Upgrade: websocket` (400).
    NotWebSocket,
    /// `Connection` lacks the `upgrade` token (400).
    NoConnectionUpgrade,
    /// `Sec-WebSocket-Version` missing or not 13 (426, with `Sec-WebSocket-Version: 13`).
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` missing, repeated, or not base64 of 16 bytes (400).
    BadKey,
}

impl HandshakeError {
    /// HTTP status of the refusal.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::Method => 405,
            HandshakeError::UnsupportedVersion => 426,
            _ => 400,
        }
    }

    /// `{group}.{code}` of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            HandshakeError::Method => "ws.invalid_method",
            HandshakeError::HttpVersion => "ws.invalid_http_version",
            HandshakeError::NotWebSocket => "ws.missing_upgrade",
            HandshakeError::NoConnectionUpgrade => "ws.missing_connection_upgrade",
            HandshakeError::UnsupportedVersion => "ws.unsupported_version",
            HandshakeError::BadKey => "ws.invalid_key",
        }
    }

    fn message(&self) -> &'static str {
        match self {
            HandshakeError::Method => "websocket upgrade requires GET",
            HandshakeError::HttpVersion => "websocket upgrade requires HTTP/1.1",
            HandshakeError::NotWebSocket => "missing `upgrade: websocket`",
            HandshakeError::NoConnectionUpgrade => "missing `connection: upgrade`",
            HandshakeError::UnsupportedVersion => "sec-websocket-version must be 13",
            HandshakeError::BadKey => "sec-websocket-key must be base64 of 16 bytes",
        }
    }

    /// The refusal as a response (426 carries `sec-websocket-version: 13`, 405 `allow: GET`).
    pub fn to_response(&self) -> Response {
        let r = Response::error(self.status(), self.code(), self.message());
        match self {
            HandshakeError::UnsupportedVersion => {
                r.with_header("sec-websocket-version", WS_VERSION)
            }
            HandshakeError::Method => r.with_header("allow", "GET"),
            _ => r,
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code(), self.status(), self.message())
    }
}

impl std::error::Error for HandshakeError {}

/// Whether `head` asks for a WebSocket (`Upgrade: websocket`), valid or not. Lets a router
/// send upgrade attempts to [`validate_upgrade`] and everything else to plain HTTP.
pub fn is_upgrade_request(head: &RequestHead) -> bool {
    head.has_token("upgrade", "websocket")
}

/// Validates an upgrade request and returns its `Sec-WebSocket-Key`.
pub fn validate_upgrade(head: &RequestHead) -> Result<&str, HandshakeError> {
    if head.method != "GET" {
        return Err(HandshakeError::Method);
    }
    if head.version_minor != 1 {
        return Err(HandshakeError::HttpVersion);
    }
    if !is_upgrade_request(head) {
        return Err(HandshakeError::NotWebSocket);
    }
    if !head.has_token("connection", "upgrade") {
        return Err(HandshakeError::NoConnectionUpgrade);
    }
    let mut versions = head.header_values("sec-websocket-version");
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.trim() == WS_VERSION => {}
        _ => return Err(HandshakeError::UnsupportedVersion),
    }
    let mut keys = head.header_values("sec-websocket-key");
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k.trim(),
        _ => return Err(HandshakeError::BadKey),
    };
    // 16 bytes encode to exactly 24 characters; checking first bounds the decode
    if key.len() != 24 {
        return Err(HandshakeError::BadKey);
    }
    let mut raw = [0u8; 18];
    match STANDARD.decode_slice(key, &mut raw) {
        Ok(16) => Ok(key),
        _ => Err(HandshakeError::BadKey),
    }
}

/// `Sec-WebSocket-Accept` for a client key: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(WS_GUID.as_bytes());
    STANDARD.encode(h.finalize())
}

/// Subprotocols the client offers, in order: every `Sec-WebSocket-Protocol` header, split on
/// commas, trimmed, empty entries skipped.
pub fn offered_protocols(head: &RequestHead) -> impl Iterator<Item = &str> + '_ {
    head.header_values("sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The `101 Switching Protocols` response head. `protocol` is echoed in
/// `Sec-WebSocket-Protocol` when it is a valid token (it should be one the client offered);
/// anything else is left out rather than written.
pub fn response_101(accept: &str, protocol: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(p) = protocol.filter(|p| is_token(p)) {
        out.extend_from_slice(b"sec-websocket-protocol: ");
        out.extend_from_slice(p.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

// ---------------------------------------------------------------------------------------------
// Client side (RFC 6455 §4.1): the runner library dials the gateway.
// ---------------------------------------------------------------------------------------------

/// A `Sec-WebSocket-Key` from 16 caller-supplied random bytes (base64, 24 characters).
pub fn client_key(nonce: [u8; 16]) -> String {
    STANDARD.encode(nonce)
}

/// The client's upgrade request head: `GET {path_and_query} HTTP/1.1` with `Host`,
/// `Connection: Upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13`,
/// `Sec-WebSocket-Key` and, when given, `Sec-WebSocket-Protocol` (sent as given: the caller
/// checks that it is a valid header value).
pub fn client_request(
    host: &str,
    path_and_query: &str,
    key: &str,
    protocols: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(192 + path_and_query.len() + protocols.map_or(0, str::len));
    for part in [
        "GET ",
        path_and_query,
        " HTTP/1.1\r\nHost: ",
        host,
        "\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: ",
        WS_VERSION,
        "\r\nSec-WebSocket-Key: ",
        key,
        "\r\n",
    ] {
        out.extend_from_slice(part.as_bytes());
    }
    if let Some(p) = protocols {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Why the server's answer to an upgrade request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientHandshakeError {
    /// Not a parsable HTTP/1.x response head.
    Malformed,
    /// The head is larger than the limit given to [`parse_response`].
    TooLarge,
    /// A status other than 101.
    Status(u16),
    /// No `Upgrade: websocket`.
    NoUpgrade,
    /// `Connection` lacks the `upgrade` token.
    NoConnectionUpgrade,
    /// `Sec-WebSocket-Accept` missing or not the one for our key.
    AcceptMismatch,
    /// Subprotocols were offered but the server chose none.
    NoSubProtocol,
    /// The server chose a subprotocol although none was offered.
    SubProtocolNotOffered,
    /// The server chose a subprotocol that was not offered.
    InvalidSubProtocol,
}

impl fmt::Display for ClientHandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientHandshakeError::Malformed => f.write_str("malformed upgrade response"),
            ClientHandshakeError::TooLarge => f.write_str("upgrade response head too large"),
            ClientHandshakeError::Status(s) => write!(f, "upgrade refused with status {s}"),
            ClientHandshakeError::NoUpgrade => f.write_str("missing `upgrade: websocket`"),
            ClientHandshakeError::NoConnectionUpgrade => {
                f.write_str("missing `connection: upgrade`")
            }
            ClientHandshakeError::AcceptMismatch => {
                f.write_str("sec-websocket-accept does not match the key")
            }
            ClientHandshakeError::NoSubProtocol => f.write_str("server chose no subprotocol"),
            ClientHandshakeError::SubProtocolNotOffered => {
                f.write_str("server chose a subprotocol although none was offered")
            }
            ClientHandshakeError::InvalidSubProtocol => {
                f.write_str("server chose a subprotocol that was not offered")
            }
        }
    }
}

impl std::error::Error for ClientHandshakeError {}

/// A server's accepted upgrade.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHandshake {
    /// Bytes of `buf` taken by the response head; what follows is WebSocket frames.
    pub head_len: usize,
    /// The subprotocol the server chose, if any.
    pub protocol: Option<String>,
}

/// Checks the server's response to [`client_request`] at the start of `buf`.
///
/// `Ok(None)`: the head is not complete yet (and `buf` is within `max_head`). `key` is the
/// `Sec-WebSocket-Key` sent; `offered` the `Sec-WebSocket-Protocol` value sent (comma
/// separated), if any: the server must then choose one of them, and must not choose one
/// otherwise.
pub fn parse_response(
    buf: &[u8],
    key: &str,
    offered: Option<&str>,
    max_head: usize,
) -> Result<Option<ClientHandshake>, ClientHandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max_head => {
            return Err(ClientHandshakeError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(ClientHandshakeError::Malformed),
    };
    if head_len > max_head {
        return Err(ClientHandshakeError::TooLarge);
    }
    let status = resp.code.unwrap_or(0);
    if status != 101 {
        return Err(ClientHandshakeError::Status(status));
    }
    let values = |name: &'static str| {
        resp.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &'static str, token: &str| {
        values(name).any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") {
        return Err(ClientHandshakeError::NoUpgrade);
    }
    if !has_token("connection", "upgrade") {
        return Err(ClientHandshakeError::NoConnectionUpgrade);
    }
    let expected = accept_key(key);
    let mut accepts = values("sec-websocket-accept");
    match (accepts.next(), accepts.next()) {
        (Some(a), None) if a.trim() == expected => {}
        _ => return Err(ClientHandshakeError::AcceptMismatch),
    }
    let chosen = values("sec-websocket-protocol").next().map(str::trim);
    let protocol = match (offered, chosen) {
        (None, None) => None,
        (None, Some(_)) => return Err(ClientHandshakeError::SubProtocolNotOffered),
        (Some(_), None) => return Err(ClientHandshakeError::NoSubProtocol),
        (Some(o), Some(c)) => {
            if !o.split(',').any(|p| p.trim() == c) {
                return Err(ClientHandshakeError::InvalidSubProtocol);
            }
            Some(c.to_string())
        }
    };
    Ok(Some(ClientHandshake { head_len, protocol }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse::parse_request_head;

    const UPGRADE: &[u8] = b"GET /gateway/actor-1/ws?x=1 HTTP/1.1\r\n\
Host: server.example.com\r\n\
Upgrade: WebSocket\r\n\
Connection: keep-alive, Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Protocol: rivet, rivet_target.actor\r\n\
Sec-WebSocket-Protocol: rivet_actor.abc\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

    fn parse(req: &[u8]) -> RequestHead {
        parse_request_head(req, 16 * 1024).unwrap().unwrap().0
    }

    fn with(req: &[u8], from: &str, to: &str) -> RequestHead {
        let s = std::str::from_utf8(req).unwrap().replacen(from, to, 1);
        parse(s.as_bytes())
    }

    #[test]
    fn rfc_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn valid_upgrade() {
        let h = parse(UPGRADE);
        assert!(is_upgrade_request(&h));
        assert_eq!(validate_upgrade(&h), Ok("dGhlIHNhbXBsZSBub25jZQ=="));
        let protos: Vec<&str> = offered_protocols(&h).collect();
        assert_eq!(protos, ["rivet", "rivet_target.actor", "rivet_actor.abc"]);
    }

    #[test]
    fn refusals() {
        use HandshakeError::*;
        let cases = [
            ("GET /gateway", "POST /gateway", Method),
            ("HTTP/1.1\r\n", "HTTP/1.0\r\n", HttpVersion),
            ("Upgrade: WebSocket", "Upgrade: h2c", NotWebSocket),
            (
                "Connection: keep-alive, Upgrade",
                "Connection: keep-alive",
                NoConnectionUpgrade,
            ),
            (
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Version: 8",
                UnsupportedVersion,
            ),
            (
                "Sec-WebSocket-Version: 13",
                "X-Other: 13",
                UnsupportedVersion,
            ),
            ("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ", BadKey),
            (
                "dGhlIHNhbXBsZSBub25jZQ==",
                "dGhlIHNhbXBsZSBub25jZ===",
                BadKey,
            ),
            (
                "dGhlIHNhbXBsZSBub25jZQ==",
                "dGhlIHNhbXBsZSBub25jZXh4",
                BadKey,
            ),
            ("Sec-WebSocket-Key", "X-Key", BadKey),
        ];
        for (from, to, want) in cases {
            assert_eq!(
                validate_upgrade(&with(UPGRADE, from, to)),
                Err(want),
                "{to}"
            );
        }
        assert_eq!(UnsupportedVersion.status(), 426);
        let r = UnsupportedVersion.to_response();
        assert_eq!(r.status, 426);
        assert_eq!(r.header("sec-websocket-version"), Some("13"));
        assert_eq!(r.header("x-rivet-error"), Some("ws.unsupported_version"));
        assert_eq!(Method.to_response().status, 405);
        assert_eq!(BadKey.to_response().status, 400);
    }

    #[test]
    fn response_101_bytes() {
        let r = response_101("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", Some("rivet"));
        assert_eq!(
            std::str::from_utf8(&r).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nsec-websocket-protocol: rivet\r\n\r\n"
        );
        let r = response_101("x", None);
        assert!(!std::str::from_utf8(&r).unwrap().contains("protocol"));
        let r = response_101("x", Some("a\r\nb"));
        assert!(!std::str::from_utf8(&r).unwrap().contains("protocol"));
    }

    #[test]
    fn client_request_bytes() {
        let key = client_key([0x11; 16]);
        assert_eq!(key.len(), 24);
        let r = client_request(
            "h:1",
            "/runners/connect?x=1",
            &key,
            Some("rivet, rivet_token.t"),
        );
        let text = std::str::from_utf8(&r).unwrap();
        assert_eq!(
            text,
            format!(
                "GET /runners/connect?x=1 HTTP/1.1\r\nHost: h:1\r\nConnection: Upgrade\r\n\
Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\
Sec-WebSocket-Protocol: rivet, rivet_token.t\r\n\r\n"
            )
        );
        // what the server side accepts
        let h = parse(&r);
        assert_eq!(validate_upgrade(&h), Ok(key.as_str()));
        let protos: Vec<&str> = offered_protocols(&h).collect();
        assert_eq!(protos, ["rivet", "rivet_token.t"]);
        let r = client_request("h", "/", &key, None);
        assert!(!std::str::from_utf8(&r).unwrap().contains("Protocol"));
    }

    #[test]
    fn client_checks_the_response() {
        use ClientHandshakeError as E;
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = response_101(&accept_key(key), Some("rivet"));
        let mut buf = ok.clone();
        buf.extend_from_slice(&[0x82, 0x00]);
        let hs = parse_response(&buf, key, Some("rivet, rivet_token.x"), 4096)
            .unwrap()
            .unwrap();
        assert_eq!(hs.head_len, ok.len());
        assert_eq!(hs.protocol.as_deref(), Some("rivet"));
        // incomplete, then too large
        assert_eq!(
            parse_response(&ok[..ok.len() - 1], key, None, 4096),
            Ok(None)
        );
        assert_eq!(
            parse_response(&ok[..ok.len() - 1], key, None, 10),
            Err(E::TooLarge)
        );
        let cases: [(&[u8], Option<&str>, E); 7] = [
            (b"HTTP/1.1 403 Forbidden\r\n\r\n", None, E::Status(403)),
            (b"nonsense\r\n\r\n", None, E::Malformed),
            (
                b"HTTP/1.1 101 x\r\nconnection: upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                None,
                E::NoUpgrade,
            ),
            (
                b"HTTP/1.1 101 x\r\nupgrade: websocket\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                None,
                E::NoConnectionUpgrade,
            ),
            (
                b"HTTP/1.1 101 x\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: AAAA\r\n\r\n",
                None,
                E::AcceptMismatch,
            ),
            (&ok, None, E::SubProtocolNotOffered),
            (&ok, Some("other"), E::InvalidSubProtocol),
        ];
        for (resp, offered, want) in cases {
            assert_eq!(parse_response(resp, key, offered, 4096), Err(want));
        }
        let none = response_101(&accept_key(key), None);
        assert_eq!(
            parse_response(&none, key, Some("rivet"), 4096),
            Err(E::NoSubProtocol)
        );
        assert_eq!(
            parse_response(&none, key, None, 4096)
                .unwrap()
                .unwrap()
                .protocol,
            None
        );
    }
}
