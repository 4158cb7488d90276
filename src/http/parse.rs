//! HTTP/1.1 request parsing, sans-IO: request head, body framing, chunked decoding, query.
//!
//! What it is for: turning the bytes a client sent into a [`RequestHead`] (with `httparse`),
//! deciding how the body is framed ([`BodyKind`]), decoding a chunked body incrementally
//! ([`ChunkedDecoder`]) and splitting/decoding the target's path and query. Every refusal is
//! an [`HttpError`] that maps to a status and a `{group}.{code}`.
//! What it must never do: panic on any input, read past `max_head_bytes` looking for the end
//! of a head, accept an ambiguous body length (request smuggling), or grow a body past its
//! limit.

use std::fmt;

use bytes::{Buf, BytesMut};

/// Most headers a request may carry.
pub const MAX_HEADERS: usize = 128;

/// Headers parsed on the stack before retrying with room for [`MAX_HEADERS`].
const INLINE_HEADERS: usize = 32;

/// Longest chunk-size line (size, extensions) accepted by [`ChunkedDecoder`].
const MAX_CHUNK_LINE: usize = 4096;

/// Most trailer bytes accepted (and discarded) after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// A refused request. [`status`](HttpError::status) and [`code`](HttpError::code) give the
/// response to send; the connection should be closed afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// Malformed request (400). The string says what was wrong.
    BadRequest(&'static str),
    /// No complete head within the limit, or too many headers (431).
    HeadTooLarge,
    /// HTTP version other than 1.0/1.1 (505).
    UnsupportedVersion,
    /// Body over the limit (413).
    BodyTooLarge,
    /// Transfer coding other than `chunked` (501).
    UnsupportedTransferEncoding,
}

impl HttpError {
    /// HTTP status code for the response.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::UnsupportedVersion => 505,
            HttpError::BodyTooLarge => 413,
            HttpError::UnsupportedTransferEncoding => 501,
        }
    }

    /// `{group}.{code}` for the `x-rivet-error` header and the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::BadRequest(_) => "http.bad_request",
            HttpError::HeadTooLarge => "http.header_too_large",
            HttpError::UnsupportedVersion => "http.unsupported_version",
            HttpError::BodyTooLarge => "http.body_too_large",
            HttpError::UnsupportedTransferEncoding => "http.unsupported_transfer_encoding",
        }
    }

    /// Human-readable message.
    pub fn message(&self) -> &'static str {
        match self {
            HttpError::BadRequest(m) => m,
            HttpError::HeadTooLarge => "request header block too large",
            HttpError::UnsupportedVersion => "only HTTP/1.0 and HTTP/1.1 are supported",
            HttpError::BodyTooLarge => "request body too large",
            HttpError::UnsupportedTransferEncoding => "unsupported transfer-encoding",
        }
    }

    /// The error response (JSON body, `x-rivet-error` header, `connection: close`).
    pub fn to_response(&self) -> super::response::Response {
        let mut r = super::response::Response::error(self.status(), self.code(), self.message());
        r.set_close();
        r
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code(), self.status(), self.message())
    }
}

impl std::error::Error for HttpError {}

/// A parsed request line and header block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHead {
    /// Method, as sent (case-sensitive per RFC 9110).
    pub method: String,
    /// Raw request target, including the query.
    pub path: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version_minor: u8,
    /// Headers in order; names lowercased, values with surrounding whitespace trimmed.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).next()
    }

    /// All values of header `name` (case-insensitive), in order.
    pub fn header_values<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All values of header `name` joined with `", "`, or `None` if absent.
    pub fn headers_joined(&self, name: &str) -> Option<String> {
        let mut it = self.header_values(name);
        let first = it.next()?;
        let mut s = first.to_owned();
        for v in it {
            s.push_str(", ");
            s.push_str(v);
        }
        Some(s)
    }

    /// Whether any value of header `name` lists `token` (comma-separated, case-insensitive),
    /// as in `Connection: keep-alive, Upgrade`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.header_values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether the client waits for an interim `100 Continue` before it sends the body
    /// (RFC 9110 §10.1.1): HTTP/1.1, `Expect: 100-continue`, a body announced (`kind`) and
    /// none of it received yet (`received` bytes follow the head). A server that does not
    /// answer leaves such a client waiting for its own timeout (curl: 1 s) on every upload.
    pub fn expects_continue(&self, kind: BodyKind, received: usize) -> bool {
        let body = match kind {
            BodyKind::None | BodyKind::Length(0) => false,
            BodyKind::Length(_) | BodyKind::Chunked => true,
        };
        body && received == 0 && self.version_minor >= 1 && self.has_token("expect", "100-continue")
    }

    /// Whether the client wants the connection kept open after this request
    /// (HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`).
    pub fn keep_alive(&self) -> bool {
        if self.version_minor >= 1 {
            !self.has_token("connection", "close")
        } else {
            self.has_token("connection", "keep-alive")
        }
    }
}

/// Parses a request head from the start of `buf`.
///
/// `Ok(None)`: the head is incomplete and `buf` is still shorter than `max_head_bytes`.
/// `Ok(Some((head, n)))`: the head took the first `n` bytes; the body (if any) follows.
/// Only the first `max_head_bytes` of `buf` are looked at; a head that does not end within
/// them is 431, as is a head with more than [`MAX_HEADERS`] headers.
pub fn parse_request_head(
    buf: &[u8],
    max_head_bytes: usize,
) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let window = &buf[..buf.len().min(max_head_bytes)];
    let mut inline = [httparse::EMPTY_HEADER; INLINE_HEADERS];
    match parse_with(window, &mut inline) {
        Err(HttpError::HeadTooLarge) => {
            let mut many = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
            parse_with(window, &mut many)
        }
        r => r,
    }
    .and_then(|r| match r {
        None if buf.len() >= max_head_bytes => Err(HttpError::HeadTooLarge),
        r => Ok(r),
    })
}

fn parse_with<'b>(
    buf: &'b [u8],
    headers: &mut [httparse::Header<'b>],
) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let mut req = httparse::Request::new(headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(httparse::Error::Version) => return Err(HttpError::UnsupportedVersion),
        Err(httparse::Error::HeaderName) => {
            return Err(HttpError::BadRequest("invalid header name"))
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(HttpError::BadRequest("invalid header value"))
        }
        Err(_) => return Err(HttpError::BadRequest("malformed request")),
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HttpError::BadRequest("malformed request line"));
    };
    let mut out = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HttpError::BadRequest("header value is not UTF-8"))?
            .trim_matches([' ', '\t']);
        out.push((h.name.to_ascii_lowercase(), value.to_owned()));
    }
    Ok(Some((
        RequestHead {
            method: method.to_owned(),
            path: path.to_owned(),
            version_minor: version,
            headers: out,
        },
        n,
    )))
}

/// How the request body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No body.
    None,
    /// Exactly this many bytes (may be 0).
    Length(u64),
    /// `Transfer-Encoding: chunked`; decode with [`ChunkedDecoder`].
    Chunked,
}

/// Decides how the body of `head` is framed (RFC 9112 §6.3), refusing anything ambiguous:
/// both `Transfer-Encoding` and `Content-Length`, more than one `Content-Length` value, a
/// non-numeric length, a transfer coding other than a single `chunked`, or
/// `Transfer-Encoding` on HTTP/1.0. A declared length over `max_body` is 413 up front.
pub fn body_kind(head: &RequestHead, max_body: u64) -> Result<BodyKind, HttpError> {
    let mut te = head.header_values("transfer-encoding").peekable();
    let has_te = te.peek().is_some();
    let mut cl = head.header_values("content-length");
    let first_cl = cl.next();
    if has_te {
        if first_cl.is_some() {
            return Err(HttpError::BadRequest(
                "both transfer-encoding and content-length",
            ));
        }
        if head.version_minor == 0 {
            return Err(HttpError::BadRequest("transfer-encoding in HTTP/1.0"));
        }
        let mut codings = te
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        return match (codings.next(), codings.next()) {
            (Some(c), None) if c.eq_ignore_ascii_case("chunked") => Ok(BodyKind::Chunked),
            (None, _) => Err(HttpError::BadRequest("empty transfer-encoding")),
            _ => Err(HttpError::UnsupportedTransferEncoding),
        };
    }
    let Some(v) = first_cl else {
        return Ok(BodyKind::None);
    };
    if cl.next().is_some() || v.contains(',') {
        return Err(HttpError::BadRequest("duplicate content-length"));
    }
    let len = parse_decimal(v).ok_or(HttpError::BadRequest("invalid content-length"))?;
    if len > max_body {
        return Err(HttpError::BodyTooLarge);
    }
    Ok(BodyKind::Length(len))
}

/// Strict decimal: one or more ASCII digits, no sign, no overflow.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Where a [`ChunkedDecoder`] is in the chunked grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading hex digits of a chunk size.
    Size { size: u64, digits: u8 },
    /// In chunk extensions (or whitespace before them), up to CR.
    Ext { size: u64 },
    /// After CR of the size line.
    SizeLf { size: u64 },
    /// Chunk data, this many bytes left.
    Data { left: u64 },
    /// Expecting CR after chunk data.
    DataCr,
    /// Expecting LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line.
    TrailerLine,
    /// After CR of a trailer line.
    TrailerLf,
    /// After CR of the final empty line.
    EndLf,
    /// Body complete.
    Done,
}

/// Incremental decoder for a `Transfer-Encoding: chunked` body, bounded by a body limit.
///
/// Feed it the bytes after the head with [`decode`](Self::decode) as they arrive; it consumes
/// what it can from the front of the buffer and appends chunk data to `out`. Trailers are
/// read and discarded. Bytes after the end of the body are left in the buffer (the next
/// request on the connection).
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: Chunk,
    max_body: u64,
    total: u64,
    line: usize,
    trailers: usize,
}

impl ChunkedDecoder {
    /// A decoder that refuses bodies over `max_body` decoded bytes with 413.
    pub fn new(max_body: u64) -> Self {
        ChunkedDecoder {
            state: Chunk::Size { size: 0, digits: 0 },
            max_body,
            total: 0,
            line: 0,
            trailers: 0,
        }
    }

    /// Whether the whole body has been decoded.
    pub fn is_done(&self) -> bool {
        self.state == Chunk::Done
    }

    /// Body bytes announced so far: a chunk counts as soon as its size line is read (so the
    /// limit is enforced before its data arrives); equals the decoded length once done.
    pub fn body_len(&self) -> u64 {
        self.total
    }

    /// Consumes bytes from the front of `buf`, appending body data to `out`.
    /// Returns `Ok(true)` once the body is complete, `Ok(false)` if more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut, out: &mut BytesMut) -> Result<bool, HttpError> {
        const BAD: HttpError = HttpError::BadRequest("malformed chunked body");
        loop {
            if self.state == Chunk::Done {
                return Ok(true);
            }
            if let Chunk::Data { left } = self.state {
                if buf.is_empty() {
                    return Ok(false);
                }
                let n = (buf.len() as u64).min(left) as usize;
                out.extend_from_slice(&buf[..n]);
                buf.advance(n);
                let left = left - n as u64;
                self.state = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data { left }
                };
                continue;
            }
            let Some(&b) = buf.first() else {
                return Ok(false);
            };
            buf.advance(1);
            self.state = match self.state {
                Chunk::Size { size, digits } => {
                    self.count_line()?;
                    match b {
                        b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                            if digits >= 16 {
                                return Err(BAD);
                            }
                            let d = (b as char).to_digit(16).unwrap_or(0);
                            Chunk::Size {
                                size: (size << 4) | u64::from(d),
                                digits: digits + 1,
                            }
                        }
                        _ if digits == 0 => return Err(BAD),
                        b';' | b' ' | b'\t' => Chunk::Ext { size },
                        b'\r' => Chunk::SizeLf { size },
                        _ => return Err(BAD),
                    }
                }
                Chunk::Ext { size } => {
                    self.count_line()?;
                    match b {
                        b'\r' => Chunk::SizeLf { size },
                        b'\t' | 0x20..=0x7E | 0x80..=0xFF => Chunk::Ext { size },
                        _ => return Err(BAD),
                    }
                }
                Chunk::SizeLf { size } => {
                    if b != b'\n' {
                        return Err(BAD);
                    }
                    self.line = 0;
                    if size == 0 {
                        Chunk::TrailerStart
                    } else {
                        // checked before any of the chunk is buffered
                        if self.total.saturating_add(size) > self.max_body {
                            return Err(HttpError::BodyTooLarge);
                        }
                        self.total += size;
                        Chunk::Data { left: size }
                    }
                }
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::Size { size: 0, digits: 0 },
                Chunk::DataCr | Chunk::DataLf => return Err(BAD),
                Chunk::TrailerStart => {
                    self.count_trailer()?;
                    match b {
                        b'\r' => Chunk::EndLf,
                        b'\n' => return Err(BAD),
                        _ => Chunk::TrailerLine,
                    }
                }
                Chunk::TrailerLine => {
                    self.count_trailer()?;
                    match b {
                        b'\r' => Chunk::TrailerLf,
                        b'\n' => return Err(BAD),
                        _ => Chunk::TrailerLine,
                    }
                }
                Chunk::TrailerLf if b == b'\n' => Chunk::TrailerStart,
                Chunk::TrailerLf => return Err(BAD),
                Chunk::EndLf if b == b'\n' => Chunk::Done,
                Chunk::EndLf => return Err(BAD),
                Chunk::Data { .. } | Chunk::Done => self.state,
            };
        }
    }

    fn count_line(&mut self) -> Result<(), HttpError> {
        self.line += 1;
        if self.line > MAX_CHUNK_LINE {
            return Err(HttpError::BadRequest("chunk size line too long"));
        }
        Ok(())
    }

    fn count_trailer(&mut self) -> Result<(), HttpError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(HttpError::HeadTooLarge);
        }
        Ok(())
    }
}

/// Splits a request target into path and query (without the `?`); the query is empty when
/// there is none.
pub fn split_path_query(target: &str) -> (&str, &str) {
    match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    }
}

/// Parses a query string into decoded `(name, value)` pairs in order. `+` decodes to a space.
/// Empty pairs (`a=1&&b=2`) are skipped; a pair without `=` has an empty value. A component
/// whose escapes are malformed or decode to invalid UTF-8 is kept as sent.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let dec = |s: &str| decode(s, true).unwrap_or_else(|| s.to_owned());
            (dec(k), dec(v))
        })
        .collect()
}

/// Percent-decodes `s` (`%XX` escapes; `+` is left as is). `None` if an escape is malformed
/// or the result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    decode(s, false)
}

fn decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    if !b.iter().any(|&c| c == b'%' || (plus_is_space && c == b'+')) {
        return Some(s.to_owned());
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = hex_val(*b.get(i + 1)?)?;
                let lo = hex_val(*b.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REQ: &[u8] = b"GET /gateway/abc/path?x=1&y=%20z HTTP/1.1\r\n\
Host: example.com\r\n\
Connection: keep-alive, Upgrade\r\n\
X-Multi: a\r\n\
x-multi:  b \r\n\
\r\nBODY";

    #[test]
    fn parses_head() {
        let (h, n) = parse_request_head(REQ, 16 * 1024).unwrap().unwrap();
        assert_eq!(n, REQ.len() - 4);
        assert_eq!(h.method, "GET");
        assert_eq!(h.path, "/gateway/abc/path?x=1&y=%20z");
        assert_eq!(h.version_minor, 1);
        assert_eq!(h.headers[0], ("host".to_owned(), "example.com".to_owned()));
        assert_eq!(h.header("HOST"), Some("example.com"));
        assert_eq!(h.header("x-multi"), Some("a"));
        assert_eq!(h.headers_joined("x-multi").as_deref(), Some("a, b"));
        assert_eq!(h.headers_joined("missing"), None);
        assert!(h.has_token("connection", "upgrade"));
        assert!(!h.has_token("connection", "close"));
        assert!(h.keep_alive());
    }

    #[test]
    fn partial_heads_need_more() {
        let end = REQ.len() - 4;
        for cut in 0..end {
            assert_eq!(
                parse_request_head(&REQ[..cut], 16 * 1024),
                Ok(None),
                "cut {cut}"
            );
        }
        assert!(parse_request_head(&REQ[..end], 16 * 1024)
            .unwrap()
            .is_some());
    }

    #[test]
    fn head_limit_431() {
        // incomplete and already at the limit
        let mut big = b"GET / HTTP/1.1\r\nx-big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 100));
        assert_eq!(parse_request_head(&big, 64), Err(HttpError::HeadTooLarge));
        assert_eq!(parse_request_head(&big[..50], 64), Ok(None));
        // a complete head longer than the limit is refused too
        let mut full = big.clone();
        full.extend(b"\r\n\r\n");
        assert_eq!(parse_request_head(&full, 64), Err(HttpError::HeadTooLarge));
        assert!(parse_request_head(&full, 1024).unwrap().is_some());
        assert_eq!(HttpError::HeadTooLarge.status(), 431);
    }

    #[test]
    fn many_headers() {
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            req.extend(format!("h{i}: {i}\r\n").as_bytes());
        }
        req.extend(b"\r\n");
        let (h, _) = parse_request_head(&req, 1 << 20).unwrap().unwrap();
        assert_eq!(h.headers.len(), 100);
        assert_eq!(h.header("h99"), Some("99"));

        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            req.extend(format!("h{i}: {i}\r\n").as_bytes());
        }
        req.extend(b"\r\n");
        assert_eq!(
            parse_request_head(&req, 1 << 20),
            Err(HttpError::HeadTooLarge)
        );
    }

    #[test]
    fn bad_requests() {
        assert_eq!(
            parse_request_head(b"GET / HTTP/2.0\r\n\r\n", 1024),
            Err(HttpError::UnsupportedVersion)
        );
        assert_eq!(HttpError::UnsupportedVersion.status(), 505);
        assert!(matches!(
            parse_request_head(b"GET / HTTP/1.1\r\nbad header: x\r\n\r\n", 1024),
            Err(HttpError::BadRequest(_))
        ));
        assert!(matches!(
            parse_request_head(b"GET / HTTP/1.1\r\nx: a\x01b\r\n\r\n", 1024),
            Err(HttpError::BadRequest(_))
        ));
        assert!(matches!(
            parse_request_head(b"G(T / HTTP/1.1\r\n\r\n", 1024),
            Err(HttpError::BadRequest(_))
        ));
        assert!(matches!(
            parse_request_head(b"GET / HTTP/1.1\r\nx: \xff\r\n\r\n", 1024),
            Err(HttpError::BadRequest(_))
        ));
    }

    #[test]
    fn http10_keep_alive() {
        let (h, _) = parse_request_head(b"GET / HTTP/1.0\r\n\r\n", 1024)
            .unwrap()
            .unwrap();
        assert_eq!(h.version_minor, 0);
        assert!(!h.keep_alive());
        let (h, _) = parse_request_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", 1024)
            .unwrap()
            .unwrap();
        assert!(h.keep_alive());
        let (h, _) = parse_request_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 1024)
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive());
    }

    fn head(headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: "POST".into(),
            path: "/".into(),
            version_minor: 1,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn expects_continue_only_before_an_announced_body() {
        let h = head(&[("expect", "100-Continue"), ("content-length", "10")]);
        assert!(h.expects_continue(BodyKind::Length(10), 0));
        assert!(h.expects_continue(BodyKind::Chunked, 0));
        // Part of the body already came: the client did not wait.
        assert!(!h.expects_continue(BodyKind::Length(10), 3));
        // No body, nothing to continue.
        assert!(!h.expects_continue(BodyKind::Length(0), 0));
        assert!(!h.expects_continue(BodyKind::None, 0));
        // Without the expectation, or on HTTP/1.0 (which has no interim responses).
        assert!(!head(&[("content-length", "10")]).expects_continue(BodyKind::Length(10), 0));
        let mut h10 = h.clone();
        h10.version_minor = 0;
        assert!(!h10.expects_continue(BodyKind::Length(10), 0));
    }

    #[test]
    fn body_kinds() {
        let max = 1000;
        assert_eq!(body_kind(&head(&[]), max), Ok(BodyKind::None));
        assert_eq!(
            body_kind(&head(&[("content-length", "0")]), max),
            Ok(BodyKind::Length(0))
        );
        assert_eq!(
            body_kind(&head(&[("content-length", "1000")]), max),
            Ok(BodyKind::Length(1000))
        );
        assert_eq!(
            body_kind(&head(&[("content-length", "1001")]), max),
            Err(HttpError::BodyTooLarge)
        );
        for bad in [
            "",
            "-1",
            "+5",
            "1 2",
            "0x10",
            "99999999999999999999",
            "5, 5",
        ] {
            assert!(
                matches!(
                    body_kind(&head(&[("content-length", bad)]), max),
                    Err(HttpError::BadRequest(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            body_kind(
                &head(&[("content-length", "5"), ("content-length", "5")]),
                max
            ),
            Err(HttpError::BadRequest(_))
        ));
        assert_eq!(
            body_kind(&head(&[("transfer-encoding", "Chunked")]), max),
            Ok(BodyKind::Chunked)
        );
        assert!(matches!(
            body_kind(
                &head(&[("transfer-encoding", "chunked"), ("content-length", "3")]),
                max
            ),
            Err(HttpError::BadRequest(_))
        ));
        assert_eq!(
            body_kind(&head(&[("transfer-encoding", "gzip, chunked")]), max),
            Err(HttpError::UnsupportedTransferEncoding)
        );
        assert_eq!(
            body_kind(
                &head(&[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked")
                ]),
                max
            ),
            Err(HttpError::UnsupportedTransferEncoding)
        );
        assert_eq!(
            body_kind(&head(&[("transfer-encoding", "identity")]), max),
            Err(HttpError::UnsupportedTransferEncoding)
        );
        let mut h10 = head(&[("transfer-encoding", "chunked")]);
        h10.version_minor = 0;
        assert!(matches!(
            body_kind(&h10, max),
            Err(HttpError::BadRequest(_))
        ));
    }

    const CHUNKED: &[u8] =
        b"5\r\nhello\r\n7;ext=1;q=\"x\"\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";

    fn decode_in(pieces: &[&[u8]], max: u64) -> (Result<bool, HttpError>, Vec<u8>, Vec<u8>) {
        let mut d = ChunkedDecoder::new(max);
        let mut buf = BytesMut::new();
        let mut out = BytesMut::new();
        let mut r = Ok(false);
        for p in pieces {
            buf.extend_from_slice(p);
            r = d.decode(&mut buf, &mut out);
            if r != Ok(false) {
                break;
            }
        }
        (r, out.to_vec(), buf.to_vec())
    }

    #[test]
    fn chunked_whole() {
        let (r, out, rest) = decode_in(&[CHUNKED], 100);
        assert_eq!(r, Ok(true));
        assert_eq!(out, b"hello, world");
        assert_eq!(rest, b"NEXT");
    }

    #[test]
    fn chunked_byte_at_a_time() {
        let pieces: Vec<&[u8]> = CHUNKED.chunks(1).collect();
        let mut d = ChunkedDecoder::new(100);
        let mut buf = BytesMut::new();
        let mut out = BytesMut::new();
        let mut done_at = None;
        for (i, p) in pieces.iter().enumerate() {
            buf.extend_from_slice(p);
            if d.decode(&mut buf, &mut out).unwrap() {
                done_at = Some(i);
                break;
            }
        }
        assert_eq!(
            done_at,
            Some(CHUNKED.len() - 5),
            "done right after the final CRLF"
        );
        assert_eq!(&out[..], b"hello, world");
        assert!(d.is_done());
        assert_eq!(d.body_len(), 12);
    }

    #[test]
    fn chunked_limit_413_before_buffering() {
        let (r, out, _) = decode_in(&[b"5\r\nhello\r\n8\r\n"], 12);
        assert_eq!(r, Err(HttpError::BodyTooLarge));
        assert_eq!(out, b"hello");
        let (r, _, _) = decode_in(&[b"ffffffffffffffff\r\n"], 12);
        assert_eq!(r, Err(HttpError::BodyTooLarge));
        let (r, out, _) = decode_in(&[b"C\r\nhello, world\r\n0\r\n\r\n"], 12);
        assert_eq!(r, Ok(true));
        assert_eq!(out.len(), 12);
    }

    #[test]
    fn chunked_malformed() {
        for bad in [
            &b"\r\n"[..],
            b"x\r\n",
            b"5\nhello",
            b"5\r\nhelloX",
            b"5\r\nhello\rX",
            b"0\r\nx\n",
            b"0\r\n\rX",
            b"10000000000000000\r\n",
            b"5;\x01\r\n",
        ] {
            let (r, _, _) = decode_in(&[bad], 1 << 40);
            assert!(matches!(r, Err(HttpError::BadRequest(_))), "{bad:?}");
        }
        let long = vec![b'1'; 20];
        let (r, _, _) = decode_in(&[&long], 1 << 40);
        assert!(r.is_err());
    }

    #[test]
    fn query_decoding() {
        assert_eq!(split_path_query("/a/b?x=1"), ("/a/b", "x=1"));
        assert_eq!(split_path_query("/a/b"), ("/a/b", ""));
        assert_eq!(split_path_query("/a?b?c"), ("/a", "b?c"));
        assert_eq!(
            parse_query("a=1&b=hello+world&&c&d=%41%62%e2%82%ac&e=%zz&rvt-key=x%2Cy"),
            vec![
                ("a".to_owned(), "1".to_owned()),
                ("b".to_owned(), "hello world".to_owned()),
                ("c".to_owned(), "".to_owned()),
                ("d".to_owned(), "Ab€".to_owned()),
                ("e".to_owned(), "%zz".to_owned()),
                ("rvt-key".to_owned(), "x,y".to_owned()),
            ]
        );
        assert_eq!(parse_query(""), vec![]);
        assert_eq!(percent_decode("a%20b+c").as_deref(), Some("a b+c"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
    }

    proptest! {
        #[test]
        fn chunked_any_split_matches_whole(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..6),
            sizes in proptest::collection::vec(1usize..10, 1..5),
        ) {
            let mut wire = Vec::new();
            let mut expect: Vec<u8> = Vec::new();
            for c in &chunks {
                wire.extend(format!("{:x}\r\n", c.len()).as_bytes());
                wire.extend(c);
                wire.extend(b"\r\n");
                expect.extend(c);
            }
            wire.extend(b"0\r\n\r\n");
            let mut pieces = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < wire.len() {
                let n = sizes[i % sizes.len()].min(wire.len() - pos);
                pieces.push(&wire[pos..pos + n]);
                pos += n;
                i += 1;
            }
            let (r, out, rest) = decode_in(&pieces, 1 << 20);
            prop_assert_eq!(r, Ok(true));
            prop_assert_eq!(out, expect);
            prop_assert!(rest.is_empty());
        }

        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200), max in 0usize..300) {
            let _ = parse_request_head(&data, max);
            let mut d = ChunkedDecoder::new(64);
            let mut buf = BytesMut::from(&data[..]);
            let mut out = BytesMut::new();
            if d.decode(&mut buf, &mut out).is_ok() {
                prop_assert!(out.len() <= 64);
            }
            if let Ok(s) = std::str::from_utf8(&data) {
                let _ = parse_query(s);
                let _ = percent_decode(s);
            }
        }
    }
}
