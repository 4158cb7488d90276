//! The runner's WebSocket to the gateway, on torpor's own sans-IO [`crate::ws`] code.
//!
//! What it is for: the opening handshake (`ws://` only), reading frames in place, and
//! writing masked client frames. Reads go into the spare capacity of one `BytesMut` (never
//! zero-filled); a complete single-frame message is handed on as a `Bytes` slice of it, no
//! copy. When a frame header announces more than the buffer has room for, room for the whole
//! frame is reserved at once, so its bytes arrive in place instead of being moved on every
//! read. Outgoing protocol messages are encoded straight into one write buffer after their
//! frame header and masked in place there; a flush writes the whole batch with one
//! `write_all`.
//!
//! What it must never do: send an unmasked frame; copy a single-frame payload it received;
//! grow its buffers past the configured frame limit plus one read chunk.

use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tungstenite::error::{Error as WsLibError, ProtocolError, SubProtocolError, UrlError};

use super::super::core::Outgoing;
use super::super::RunnerError;
use crate::protocol::hot::{encode_ws_message_prefix_to_server, ws_message_trailer};
use crate::ws::frame::{apply_mask, encode_header, rotate_mask, OpCode};
use crate::ws::handshake::{client_key, client_request, parse_response, ClientHandshakeError};
use crate::ws::{close_payload, Role, WsClose, WsEvent, WsReader, WsReaderConfig};

/// Spare room a read asks for at least; also the step the read buffer grows by.
const READ_CHUNK: usize = 64 * 1024;
/// Below this much spare room the buffer is topped up before the next read.
const MIN_SPARE: usize = 4 * 1024;
/// A write buffer larger than this after a flush is given back (a huge message passed).
const KEEP_WRITE_CAP: usize = 1 << 20;
/// Largest upgrade response head accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Header room left in front of a message whose length is known only once it is encoded:
/// enough for a masked frame under 126 bytes (most control messages); longer ones move.
const SMALL_HEADER: usize = 2 + 4;

/// Incoming side: the frame reader and the buffer it parses in place.
pub(crate) struct ClientReader {
    reader: WsReader,
    buf: BytesMut,
}

impl ClientReader {
    /// A reader for frames of up to `max` bytes (and messages of up to `max`).
    pub(crate) fn new(max: usize) -> Self {
        ClientReader {
            reader: WsReader::new(WsReaderConfig {
                role: Role::Client,
                max_frame: max,
                max_message: max,
            }),
            buf: BytesMut::new(),
        }
    }

    /// The next event from what has been read; `Ok(None)` when more bytes are needed.
    pub(crate) fn next(&mut self) -> Result<Option<WsEvent>, WsClose> {
        self.reader.next(&mut self.buf)
    }

    /// Whether the peer's close frame has been received.
    pub(crate) fn is_closed(&self) -> bool {
        self.reader.is_closed()
    }

    /// Makes room for the next read: when room runs low, or is short of the rest of the
    /// frame being received, for that rest plus [`READ_CHUNK`]. Bytes already read are moved (or copied
    /// into a new allocation if slices of it are still held) only here, once per refill.
    pub(crate) fn prepare(&mut self) -> &mut BytesMut {
        let missing = self
            .reader
            .bytes_wanted(&self.buf)
            .saturating_sub(self.buf.len());
        let spare = self.buf.capacity() - self.buf.len();
        if spare < missing.max(MIN_SPARE) {
            // the whole frame plus a chunk: room does not run low again before it is in
            self.buf.reserve(missing.saturating_add(READ_CHUNK));
        }
        &mut self.buf
    }

    /// Appends bytes read elsewhere (the handshake's leftover).
    fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    #[cfg(test)]
    pub(crate) fn buffer(&self) -> &BytesMut {
        &self.buf
    }
}

/// Outgoing side: masked client frames, back to back in one buffer.
#[derive(Default)]
pub(crate) struct FrameWriter {
    buf: Vec<u8>,
}

impl FrameWriter {
    /// Bytes waiting to be written.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Forgets what was written; gives back a buffer that a huge message grew.
    pub(crate) fn written(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > KEEP_WRITE_CAP {
            self.buf.shrink_to(READ_CHUNK);
        }
    }

    /// One frame with the caller's payload, copied in and masked in place.
    pub(crate) fn frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let mask: [u8; 4] = rand::random();
        let h = encode_header(true, opcode, payload.len() as u64, Some(mask));
        self.buf.reserve(h.len() + payload.len());
        self.buf.extend_from_slice(&h);
        let start = self.buf.len();
        self.buf.extend_from_slice(payload);
        apply_mask(&mut self.buf[start..], mask, 0);
    }

    /// A pong answering a ping (its payload is at most 125 bytes: the reader checked).
    pub(crate) fn pong(&mut self, payload: &[u8]) {
        self.frame(OpCode::Pong, payload);
    }

    /// A close frame with a code and reason (see [`close_payload`]).
    pub(crate) fn close(&mut self, code: u16, reason: &str) {
        self.frame(OpCode::Close, &close_payload(code, reason));
    }

    /// A close frame without a payload.
    pub(crate) fn close_empty(&mut self) {
        self.frame(OpCode::Close, &[]);
    }

    /// One runner protocol message as a binary frame, encoded in place.
    pub(crate) fn message(&mut self, msg: &Outgoing) {
        match msg {
            Outgoing::WsData { id, data, binary } => {
                let prefix = encode_ws_message_prefix_to_server(
                    id.gateway_id,
                    id.request_id,
                    id.message_index,
                    data.len(),
                );
                let trailer = ws_message_trailer(*binary);
                let len = prefix.len() + data.len() + trailer.len();
                let mask: [u8; 4] = rand::random();
                let h = encode_header(true, OpCode::Binary, len as u64, Some(mask));
                self.buf.reserve(h.len() + len);
                self.buf.extend_from_slice(&h);
                // copied and masked in one pass
                let p = prefix.as_bytes();
                extend_masked(&mut self.buf, p, mask, 0);
                extend_masked(&mut self.buf, data, mask, p.len());
                extend_masked(&mut self.buf, &trailer, mask, p.len() + data.len());
            }
            Outgoing::Msg(m) => {
                let head = self.buf.len();
                self.buf.extend_from_slice(&[0; SMALL_HEADER]);
                let start = self.buf.len();
                // The protocol types never fail to serialize; an empty payload is what the
                // allocating encoder sends in that case too.
                if crate::protocol::codec::to_writer(&mut self.buf, m).is_err() {
                    self.buf.truncate(start);
                }
                self.finish_binary(head, start);
            }
        }
    }

    /// Writes the header of the binary frame whose payload was encoded at `start..`, with
    /// [`SMALL_HEADER`] bytes of room reserved at `head`, and masks the payload.
    fn finish_binary(&mut self, head: usize, start: usize) {
        let len = self.buf.len() - start;
        let mask: [u8; 4] = rand::random();
        let h = encode_header(true, OpCode::Binary, len as u64, Some(mask));
        let mut start = start;
        if h.len() > SMALL_HEADER {
            let extra = h.len() - SMALL_HEADER;
            self.buf.resize(self.buf.len() + extra, 0);
            self.buf.copy_within(start..start + len, start + extra);
            start += extra;
        }
        self.buf[head..start].copy_from_slice(&h);
        apply_mask(&mut self.buf[start..], mask, 0);
    }
}

/// Appends `src` XOR-ed with `mask` to `buf`: a copy and the masking in one pass over the
/// bytes, written straight into the spare capacity (never zero-filled first). `offset` is the
/// position of `src[0]` in the frame payload, as for [`apply_mask`].
pub(crate) fn extend_masked(buf: &mut Vec<u8>, src: &[u8], mask: [u8; 4], offset: usize) {
    let m = rotate_mask(mask, offset);
    let m64 = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    buf.reserve(src.len());
    let spare = &mut buf.spare_capacity_mut()[..src.len()];
    let mut dst_words = spare.chunks_exact_mut(8);
    let mut src_words = src.chunks_exact(8);
    for (d, s) in (&mut dst_words).zip(&mut src_words) {
        let mut w = [0u8; 8];
        w.copy_from_slice(s);
        let w = (u64::from_ne_bytes(w) ^ m64).to_ne_bytes();
        for (o, b) in d.iter_mut().zip(w) {
            o.write(b);
        }
    }
    // every word above is a multiple of 4 bytes long: the tail starts at mask phase 0 again
    let tail = src_words.remainder();
    for (i, (o, b)) in dst_words.into_remainder().iter_mut().zip(tail).enumerate() {
        o.write(b ^ m[i & 3]);
    }
    let len = buf.len() + src.len();
    // SAFETY: `reserve` made room for `src.len()` more bytes, and every one of the first
    // `src.len()` bytes of the spare capacity was written above (8-byte words, then the
    // tail; `chunks_exact` over equal lengths covers the same positions on both sides).
    unsafe { buf.set_len(len) };
}

/// Why a handshake failed, in the error type the runner reports (kept from the days of
/// tokio-tungstenite, so that `RunnerError` is unchanged).
fn handshake_error(e: ClientHandshakeError) -> WsLibError {
    match e {
        ClientHandshakeError::Malformed => {
            WsLibError::Protocol(ProtocolError::HttparseError(httparse::Error::Status))
        }
        ClientHandshakeError::TooLarge => WsLibError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            "upgrade response head too large",
        )),
        ClientHandshakeError::Status(s) => {
            let mut r = tungstenite::http::Response::new(None);
            if let Ok(s) = tungstenite::http::StatusCode::from_u16(s) {
                *r.status_mut() = s;
            }
            WsLibError::Http(r)
        }
        ClientHandshakeError::NoUpgrade => {
            WsLibError::Protocol(ProtocolError::MissingUpgradeWebSocketHeader)
        }
        ClientHandshakeError::NoConnectionUpgrade => {
            WsLibError::Protocol(ProtocolError::MissingConnectionUpgradeHeader)
        }
        ClientHandshakeError::AcceptMismatch => {
            WsLibError::Protocol(ProtocolError::SecWebSocketAcceptKeyMismatch)
        }
        ClientHandshakeError::NoSubProtocol => WsLibError::Protocol(
            ProtocolError::SecWebSocketSubProtocolError(SubProtocolError::NoSubProtocol),
        ),
        ClientHandshakeError::SubProtocolNotOffered => {
            WsLibError::Protocol(ProtocolError::SecWebSocketSubProtocolError(
                SubProtocolError::ServerSentSubProtocolNoneRequested,
            ))
        }
        ClientHandshakeError::InvalidSubProtocol => WsLibError::Protocol(
            ProtocolError::SecWebSocketSubProtocolError(SubProtocolError::InvalidSubProtocol),
        ),
    }
}

/// Host (for `connect`), port, `Host` header value and path-and-query of a `ws://` URL.
struct Target {
    host: String,
    port: u16,
    authority: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, RunnerError> {
    let uri: tungstenite::http::Uri = url
        .parse()
        .map_err(|e: tungstenite::http::uri::InvalidUri| WsLibError::HttpFormat(e.into()))?;
    match uri.scheme_str() {
        Some("ws") => {}
        Some("wss") => return Err(WsLibError::Url(UrlError::TlsFeatureNotEnabled).into()),
        _ => return Err(WsLibError::Url(UrlError::UnsupportedUrlScheme).into()),
    }
    let authority = uri
        .authority()
        .ok_or(WsLibError::Url(UrlError::NoHostName))?
        .as_str();
    let authority = authority
        .rsplit('@')
        .next()
        .unwrap_or(authority)
        .to_string();
    let host = uri.host().unwrap_or("");
    if host.is_empty() {
        return Err(WsLibError::Url(UrlError::EmptyHostName).into());
    }
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("/")
        .to_string();
    Ok(Target {
        host,
        port: uri.port_u16().unwrap_or(80),
        authority,
        path,
    })
}

/// An open WebSocket to the gateway.
pub(crate) struct Conn<S = TcpStream> {
    stream: S,
    pub(crate) rd: ClientReader,
    pub(crate) wr: FrameWriter,
    close_sent: bool,
}

impl Conn<TcpStream> {
    /// Dials `url` (`ws://` only) and performs the opening handshake, offering `protocols`
    /// (a `Sec-WebSocket-Protocol` value the caller has checked). `max` bounds frames and
    /// messages received.
    pub(crate) async fn connect(
        url: &str,
        protocols: &str,
        max: usize,
    ) -> Result<Self, RunnerError> {
        let t = parse_url(url)?;
        let stream = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(WsLibError::from)?;
        Self::handshake(stream, &t.authority, &t.path, protocols, max).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// A connection over `stream` whose handshake is already done.
    pub(crate) fn new(stream: S, max: usize) -> Self {
        Conn {
            stream,
            rd: ClientReader::new(max),
            wr: FrameWriter::default(),
            close_sent: false,
        }
    }

    /// The client's opening handshake on `stream`.
    pub(crate) async fn handshake(
        mut stream: S,
        authority: &str,
        path: &str,
        protocols: &str,
        max: usize,
    ) -> Result<Self, RunnerError> {
        let key = client_key(rand::random());
        let offered = (!protocols.is_empty()).then_some(protocols);
        let req = client_request(authority, path, &key, offered);
        stream.write_all(&req).await.map_err(WsLibError::from)?;
        let mut buf = BytesMut::with_capacity(1024);
        let hs = loop {
            if let Some(hs) =
                parse_response(&buf, &key, offered, MAX_RESPONSE_HEAD).map_err(handshake_error)?
            {
                break hs;
            }
            if stream.read_buf(&mut buf).await.map_err(WsLibError::from)? == 0 {
                return Err(WsLibError::Protocol(ProtocolError::HandshakeIncomplete).into());
            }
        };
        let mut conn = Conn::new(stream, max);
        conn.rd.extend(&buf[hs.head_len..]);
        Ok(conn)
    }

    /// Reads more bytes into the read buffer; `Ok(0)` at end of stream. Cancel-safe.
    pub(crate) async fn read_more(&mut self) -> io::Result<usize> {
        let buf = self.rd.prepare();
        self.stream.read_buf(buf).await
    }

    /// Writes everything queued in [`FrameWriter`] with one `write_all`.
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        if self.wr.pending().is_empty() {
            return Ok(());
        }
        self.stream.write_all(self.wr.pending()).await?;
        self.wr.written();
        Ok(())
    }

    /// Whether a close frame (ours or the reply to the peer's) is queued or sent.
    pub(crate) fn close_sent(&self) -> bool {
        self.close_sent
    }

    /// Queues our close frame unless one was sent already (a reply to the peer's counts).
    pub(crate) fn queue_close(&mut self, code: u16, reason: &str) {
        if !self.close_sent {
            self.close_sent = true;
            self.wr.close(code, reason);
        }
    }

    /// Queues the reply to the peer's close frame: the same code and reason, or an empty
    /// close for an empty one.
    pub(crate) fn queue_close_reply(&mut self, code: Option<u16>, reason: &str) {
        if !self.close_sent {
            self.close_sent = true;
            match code {
                Some(c) => self.wr.close(c, reason),
                None => self.wr.close_empty(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::protocol::{
        MessageId, ToServer, ToServerPong, ToServerTunnelMessage, ToServerTunnelMessageKind,
        ToServerWebSocketMessageAck,
    };
    use crate::ws::{ServerFrame, WsReader};

    const MAX: usize = 16 << 20;

    /// A server frame with explicit FIN and opcode.
    fn server_frame(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut v = encode_header(fin, op, payload.len() as u64, None).to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Writes `wire` to a connection in pieces of the given sizes (cycled) and collects the
    /// events until `want` have arrived.
    fn read_events(wire: Vec<u8>, sizes: &[usize], want: usize) -> Vec<WsEvent> {
        let sizes = sizes.to_vec();
        rt().block_on(async move {
            let (a, mut b) = tokio::io::duplex(1 << 20);
            let writer = tokio::spawn(async move {
                let mut pos = 0;
                let mut i = 0;
                while pos < wire.len() {
                    let n = sizes[i % sizes.len()].min(wire.len() - pos);
                    b.write_all(&wire[pos..pos + n]).await.unwrap();
                    b.flush().await.unwrap();
                    pos += n;
                    i += 1;
                    tokio::task::yield_now().await;
                }
                b
            });
            let mut conn = Conn::new(a, MAX);
            let mut evs = Vec::new();
            while evs.len() < want {
                match conn.rd.next().unwrap() {
                    Some(e) => evs.push(e),
                    None => assert!(conn.read_more().await.unwrap() > 0, "early eof"),
                }
            }
            drop(writer.await.unwrap());
            evs
        })
    }

    fn binary(data: &[u8]) -> WsEvent {
        WsEvent::Message {
            text: false,
            data: Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn fragmented_message_is_assembled() {
        let mut wire = server_frame(false, OpCode::Binary, b"hel");
        wire.extend(server_frame(false, OpCode::Continuation, b"lo "));
        wire.extend(server_frame(true, OpCode::Continuation, b"world"));
        wire.extend(server_frame(true, OpCode::Binary, b"next"));
        for sizes in [&[usize::MAX][..], &[1], &[3, 7]] {
            assert_eq!(
                read_events(wire.clone(), sizes, 2),
                vec![binary(b"hello world"), binary(b"next")]
            );
        }
    }

    #[test]
    fn frame_split_across_many_reads() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = server_frame(true, OpCode::Binary, &payload);
        wire.extend(server_frame(true, OpCode::Binary, b"tail"));
        for sizes in [&[1][..], &[2, 3, 5, 7, 11], &[1000]] {
            assert_eq!(
                read_events(wire.clone(), sizes, 2),
                vec![binary(&payload), binary(b"tail")]
            );
        }
    }

    #[test]
    fn ping_during_a_fragmented_message_is_answered_in_between() {
        let mut wire = server_frame(false, OpCode::Binary, b"ab");
        wire.extend(ServerFrame::ping(Bytes::from_static(b"p1")).to_vec());
        wire.extend(server_frame(true, OpCode::Continuation, b"cd"));
        let evs = read_events(wire, &[2], 2);
        assert_eq!(
            evs,
            vec![WsEvent::Ping(Bytes::from_static(b"p1")), binary(b"abcd")]
        );
        // the pong goes out masked with the ping's payload
        let mut w = FrameWriter::default();
        w.pong(b"p1");
        assert_eq!(
            server_side(w.pending()),
            vec![WsEvent::Pong(Bytes::from_static(b"p1"))]
        );
    }

    #[test]
    fn close_frame_and_nothing_after_it() {
        let mut wire = ServerFrame::close(1000, "ws.eviction#x").to_vec();
        wire.extend(server_frame(true, OpCode::Binary, b"ignored"));
        let evs = read_events(wire, &[usize::MAX], 1);
        assert_eq!(
            evs,
            vec![WsEvent::Close {
                code: Some(1000),
                reason: Bytes::from_static(b"ws.eviction#x")
            }]
        );
    }

    /// A large frame is received in place: once its header is seen, room for all of it is
    /// reserved, and the message is a slice of the read buffer (no copy, no move).
    #[test]
    fn large_frame_lands_in_place() {
        let payload: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 256) as u8).collect();
        let wire = server_frame(true, OpCode::Binary, &payload);
        rt().block_on(async move {
            let (a, mut b) = tokio::io::duplex(1 << 20);
            let mut conn = Conn::new(a, MAX);
            // the header and a little of the payload first
            b.write_all(&wire[..100]).await.unwrap();
            while conn.rd.buffer().len() < 100 {
                conn.read_more().await.unwrap();
            }
            assert_eq!(conn.rd.next().unwrap(), None);
            // the reader took the header off; now room for the whole rest is made once
            let buf = conn.rd.prepare();
            assert!(buf.capacity() >= payload.len());
            let base = buf.as_ptr();
            b.write_all(&wire[100..]).await.unwrap();
            let ev = loop {
                if let Some(e) = conn.rd.next().unwrap() {
                    break e;
                }
                assert!(conn.read_more().await.unwrap() > 0);
            };
            match ev {
                WsEvent::Message { text: false, data } => {
                    assert_eq!(&data[..], &payload[..]);
                    assert_eq!(data.as_ptr(), base, "payload read in place");
                }
                e => panic!("unexpected {e:?}"),
            }
        });
    }

    /// Everything the writer produces, read back by the gateway's reader.
    fn server_side(wire: &[u8]) -> Vec<WsEvent> {
        let mut r = WsReader::new(WsReaderConfig {
            role: Role::Server,
            max_frame: MAX,
            max_message: MAX,
        });
        let mut buf = BytesMut::from(wire);
        let mut evs = Vec::new();
        while let Some(e) = r.next(&mut buf).unwrap() {
            evs.push(e);
        }
        assert!(buf.is_empty());
        evs
    }

    #[test]
    fn written_frames_are_masked_and_parse_back() {
        let id = MessageId {
            gateway_id: [1, 2, 3, 4],
            request_id: [5, 6, 7, 8],
            message_index: 9,
        };
        let big = Bytes::from((0..70000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let ack = ToServer::TunnelMessage(ToServerTunnelMessage {
            message_id: id,
            message_kind: ToServerTunnelMessageKind::WebSocketMessageAck(
                ToServerWebSocketMessageAck { index: 3 },
            ),
        });
        let ping = ToServer::Pong(ToServerPong { ts: 42 });
        let msgs = vec![
            Outgoing::WsData {
                id,
                data: Bytes::from_static(b"hi"),
                binary: false,
            },
            Outgoing::Msg(ack),
            Outgoing::WsData {
                id,
                data: big.clone(),
                binary: true,
            },
            Outgoing::Msg(ping),
            Outgoing::WsData {
                id,
                data: big.slice(..300),
                binary: true,
            },
            // payloads around the 126 and 65536 header boundaries, encoded in place
            Outgoing::Msg(ToServer::TunnelMessage(ToServerTunnelMessage {
                message_id: id,
                message_kind: ToServerTunnelMessageKind::WebSocketMessage(
                    crate::protocol::ToServerWebSocketMessage {
                        data: vec![7; 200],
                        binary: true,
                    },
                ),
            })),
            Outgoing::Msg(ToServer::TunnelMessage(ToServerTunnelMessage {
                message_id: id,
                message_kind: ToServerTunnelMessageKind::WebSocketMessage(
                    crate::protocol::ToServerWebSocketMessage {
                        data: vec![8; 70000],
                        binary: false,
                    },
                ),
            })),
        ];
        let mut w = FrameWriter::default();
        for m in &msgs {
            w.message(m);
        }
        w.close(1000, "pegboard.runner_shutdown");
        // every frame is masked (checked by the server-role reader) and decodes to the
        // message's BARE encoding
        let evs = server_side(w.pending());
        assert_eq!(evs.len(), msgs.len() + 1);
        for (m, e) in msgs.iter().zip(&evs) {
            assert_eq!(e, &binary(&m.encode()));
        }
        assert_eq!(
            evs[msgs.len()],
            WsEvent::Close {
                code: Some(1000),
                reason: Bytes::from_static(b"pegboard.runner_shutdown")
            }
        );
        w.written();
        assert!(w.pending().is_empty());
        w.close_empty();
        assert_eq!(
            server_side(w.pending()),
            vec![WsEvent::Close {
                code: None,
                reason: Bytes::new()
            }]
        );
    }

    #[test]
    fn extend_masked_is_copy_then_mask() {
        let src: Vec<u8> = (0..100u8).collect();
        let mask = [0xA1, 0x02, 0xF3, 0x44];
        for len in [0, 1, 3, 7, 8, 9, 31, 32, 33, 100] {
            for offset in 0..8 {
                let mut want = vec![9u8, 9];
                want.extend_from_slice(&src[..len]);
                apply_mask(&mut want[2..], mask, offset);
                let mut got = vec![9u8, 9];
                extend_masked(&mut got, &src[..len], mask, offset);
                assert_eq!(got, want, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn handshake_against_a_server() {
        rt().block_on(async {
            let (a, mut b) = tokio::io::duplex(1 << 16);
            let server = tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let head = loop {
                    b.read_buf(&mut buf).await.unwrap();
                    if let Some((h, n)) =
                        crate::http::parse::parse_request_head(&buf, 16 * 1024).unwrap()
                    {
                        break (h, n);
                    }
                };
                let key = crate::ws::validate_upgrade(&head.0).unwrap().to_string();
                let protos: Vec<String> = crate::ws::offered_protocols(&head.0)
                    .map(String::from)
                    .collect();
                assert_eq!(protos, ["rivet", "rivet_token.secret"]);
                assert_eq!(head.0.header("host"), Some("gw:6420"));
                let mut resp = crate::ws::response_101(&crate::ws::accept_key(&key), Some("rivet"));
                // a frame right behind the head
                resp.extend(server_frame(true, OpCode::Binary, b"first"));
                b.write_all(&resp).await.unwrap();
                b
            });
            let mut conn = Conn::handshake(
                a,
                "gw:6420",
                "/runners/connect?protocol_version=7",
                "rivet, rivet_token.secret",
                MAX,
            )
            .await
            .unwrap();
            let _b = server.await.unwrap();
            assert_eq!(conn.rd.next().unwrap(), Some(binary(b"first")));
        });
    }

    #[test]
    fn urls() {
        let t = parse_url("ws://user@127.0.0.1:6420/runners/connect?a=1").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.authority.as_str(),
                t.path.as_str()
            ),
            ("127.0.0.1", 6420, "127.0.0.1:6420", "/runners/connect?a=1")
        );
        let t = parse_url("ws://[::1]/x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 80));
        assert!(matches!(
            parse_url("wss://h/x"),
            Err(RunnerError::WebSocket(e)) if matches!(*e, WsLibError::Url(UrlError::TlsFeatureNotEnabled))
        ));
        assert!(parse_url("ftp://h/x").is_err());
    }
}
