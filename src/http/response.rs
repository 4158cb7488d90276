//! HTTP/1.1 responses: a small value type and its head encoding.
//!
//! What it is for: the gateway's own responses (errors, engine API JSON, metrics) and the
//! head of responses relayed from actors. The body is a `Bytes` that the shell writes after
//! the head with a vectored write.
//! What it must never do: emit a header that could split the response (CR, LF or NUL in a
//! value, a non-token name), a second framing header, or a body length that disagrees with
//! the body.

use bytes::Bytes;

/// How a streamed response's body is delimited on the client connection (the gateway core
/// decides it; [`Response::encode_head_framed`] writes the matching head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// `content-length: n` (the actor declared it): exactly n bytes follow.
    Length(u64),
    /// `transfer-encoding: chunked`, ended by the zero-length chunk.
    Chunked,
    /// No body at all (HEAD, 1xx, 204, 304).
    Empty,
    /// An HTTP/1.0 client: no length, no chunks; the body ends when the connection does.
    UntilClose,
}

/// One chunk of a `transfer-encoding: chunked` body: `[size line][data][CRLF]`.
pub fn chunk_frames(data: Bytes) -> [Bytes; 3] {
    let line = Bytes::from(format!("{:x}\r\n", data.len()));
    [line, data, Bytes::from_static(b"\r\n")]
}

/// The last chunk of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// An HTTP response.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// Status code (100–999; anything else is sent as 500).
    pub status: u16,
    /// Headers in order. `content-length` and `transfer-encoding` here are ignored: the head
    /// always carries the length of `body`.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
}

/// Reason phrase for a status code ("" for codes without a registered phrase).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

fn is_safe_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7F))
}

impl Response {
    /// An empty response with the given status.
    pub fn new(status: u16) -> Self {
        Response {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// A JSON response (`content-type: application/json`).
    pub fn json(status: u16, body: &str) -> Self {
        Response {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    /// A plain-text response (`content-type: text/plain; charset=utf-8`).
    pub fn text(status: u16, body: &str) -> Self {
        Response {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    /// An error response: header `x-rivet-error: {group}.{code}` and the JSON body
    /// `{"group":…,"code":…,"message":…}`. `group_code` is split at its first `.`; without a
    /// dot the group is `"gateway"`.
    pub fn error(status: u16, group_code: &str, message: &str) -> Self {
        let (group, code) = group_code
            .split_once('.')
            .unwrap_or(("gateway", group_code));
        let body = serde_json::json!({ "group": group, "code": code, "message": message });
        let mut r = Response::json(status, &body.to_string());
        r.headers
            .push(("x-rivet-error".into(), format!("{group}.{code}")));
        r
    }

    /// Appends a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Marks the response as the last on its connection (`connection: close`).
    pub fn set_close(&mut self) {
        if !self.closes_connection() {
            self.headers.push(("connection".into(), "close".into()));
        }
    }

    /// Whether the connection must be closed after this response (`connection: close`).
    pub fn closes_connection(&self) -> bool {
        self.headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("connection")
                && v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))
        })
    }

    /// Status line and headers, ending with the empty line. Adds `content-length` (except
    /// for 1xx, 204 and 304, which have no body), drops caller-supplied framing headers and
    /// any header whose name is not a token or whose value holds CR, LF or other controls.
    pub fn encode_head(&self) -> Vec<u8> {
        let status = if (100..=999).contains(&self.status) {
            self.status
        } else {
            500
        };
        let mut out = Vec::with_capacity(64 + self.headers.len() * 32);
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason_phrase(status).as_bytes());
        out.extend_from_slice(b"\r\n");
        for (n, v) in &self.headers {
            if n.eq_ignore_ascii_case("content-length")
                || n.eq_ignore_ascii_case("transfer-encoding")
                || !is_token(n)
                || !is_safe_value(v)
            {
                continue;
            }
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let bodyless = status < 200 || status == 204 || status == 304;
        if !bodyless {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(self.body.len().to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// The head of a streamed response: like [`encode_head`](Self::encode_head) but with
    /// the framing header `framing` asks for instead of the (empty) body's length. An
    /// [`BodyFraming::UntilClose`] head also says `connection: close`.
    pub fn encode_head_framed(&self, framing: BodyFraming) -> Vec<u8> {
        let mut r = Response {
            status: self.status,
            headers: self.headers.clone(),
            body: Bytes::new(),
        };
        if framing == BodyFraming::UntilClose {
            r.set_close();
        }
        let mut out = r.encode_head();
        // `encode_head` ended with `content-length: 0` (unless bodyless) and the blank line.
        let zero = b"content-length: 0\r\n\r\n";
        let cut = if out.ends_with(zero) { zero.len() } else { 2 };
        out.truncate(out.len() - cut);
        match framing {
            BodyFraming::Length(n) => {
                out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes())
            }
            BodyFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            BodyFraming::Empty | BodyFraming::UntilClose => {}
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// [`encode_head`](Self::encode_head), first adding `connection: close` when the
    /// request did not ask to keep the connection open.
    pub fn encode_head_for(&self, keep_alive: bool) -> Vec<u8> {
        if keep_alive || self.closes_connection() {
            self.encode_head()
        } else {
            let mut r = self.clone();
            r.set_close();
            r.encode_head()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_head() {
        let r = Response::json(200, r#"{"ok":true}"#);
        let head = String::from_utf8(r.encode_head()).unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n"
        );
    }

    #[test]
    fn error_response() {
        let r = Response::error(503, "actor.stopped", "actor \"x\" stopped");
        assert_eq!(r.status, 503);
        assert_eq!(r.header("x-rivet-error"), Some("actor.stopped"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["group"], "actor");
        assert_eq!(v["code"], "stopped");
        assert_eq!(v["message"], "actor \"x\" stopped");
        let head = String::from_utf8(r.encode_head()).unwrap();
        assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(head.contains("\r\nx-rivet-error: actor.stopped\r\n"));
        assert!(head.contains(&format!("\r\ncontent-length: {}\r\n", r.body.len())));
        let r = Response::error(500, "oops", "m");
        assert_eq!(r.header("x-rivet-error"), Some("gateway.oops"));
    }

    #[test]
    fn unsafe_and_framing_headers_dropped() {
        let r = Response::new(200)
            .with_header("x-ok", "fine\tvalue")
            .with_header("x-evil", "a\r\nset-cookie: b")
            .with_header("bad name", "v")
            .with_header("Content-Length", "999")
            .with_header("transfer-encoding", "chunked");
        let head = String::from_utf8(r.encode_head()).unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nx-ok: fine\tvalue\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn bodyless_statuses_and_odd_codes() {
        let head = String::from_utf8(Response::new(204).encode_head()).unwrap();
        assert_eq!(head, "HTTP/1.1 204 No Content\r\n\r\n");
        let head = String::from_utf8(Response::new(299).encode_head()).unwrap();
        assert_eq!(head, "HTTP/1.1 299 \r\ncontent-length: 0\r\n\r\n");
        let head = String::from_utf8(Response::new(42).encode_head()).unwrap();
        assert!(head.starts_with("HTTP/1.1 500 Internal Server Error\r\n"));
    }

    #[test]
    fn streamed_heads_carry_their_framing() {
        let r = Response::text(200, "").with_header("content-length", "9");
        let h = |f| String::from_utf8(r.encode_head_framed(f)).unwrap();
        assert_eq!(
            h(BodyFraming::Chunked),
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert!(h(BodyFraming::Length(7)).ends_with("\r\ncontent-length: 7\r\n\r\n"));
        assert!(!h(BodyFraming::Empty).contains("content-length"));
        assert!(h(BodyFraming::UntilClose).contains("\r\nconnection: close\r\n"));
        assert!(!h(BodyFraming::UntilClose).contains("content-length"));
        let nc = String::from_utf8(Response::new(204).encode_head_framed(BodyFraming::Empty));
        assert_eq!(nc.unwrap(), "HTTP/1.1 204 No Content\r\n\r\n");
        let c = chunk_frames(Bytes::from_static(b"hello world, 26 bytes long"));
        assert_eq!(&c[0][..], b"1a\r\n");
        assert_eq!(&c[2][..], b"\r\n");
    }

    #[test]
    fn connection_handling() {
        let r = Response::text(200, "hi");
        assert!(!r.closes_connection());
        let head = String::from_utf8(r.encode_head_for(false)).unwrap();
        assert!(head.contains("\r\nconnection: close\r\n"));
        let head = String::from_utf8(r.encode_head_for(true)).unwrap();
        assert!(!head.contains("connection"));
        let mut r = r;
        r.set_close();
        r.set_close();
        assert!(r.closes_connection());
        assert_eq!(
            r.headers.iter().filter(|(n, _)| n == "connection").count(),
            1
        );
    }
}
