//! Per-connection WebSocket frame reader and message assembler (sans-IO).
//!
//! What it is for: the shell reads socket bytes into a `BytesMut` and calls
//! [`WsReader::next`] until it returns `Ok(None)`. The reader takes whole frames off the front
//! of that buffer, unmasks them in place, and yields payloads as `Bytes` slices of the same
//! allocation: a single-frame message costs no copy. Fragmented messages are assembled into
//! one buffer bounded by the message limit. Every RFC 6455 violation becomes a [`WsClose`]
//! (1002 protocol, 1007 invalid UTF-8, 1009 too big), after which the reader stays failed.
//!
//! What it must never do: panic on any input; reserve or allocate for a frame or message
//! before its length has been checked against the limits; copy a single-frame payload; accept
//! anything after a close frame.

use bytes::{Buf, Bytes, BytesMut};

use super::close::{is_valid_close_code, WsClose};
use super::frame::{header_len_hint, parse_header, FrameHeader, OpCode};
use super::utf8::Utf8Stream;

/// Which side of the connection this reader is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The gateway: every frame from the client must be masked.
    Server,
    /// A client (tests, tools): every frame from the server must be unmasked.
    Client,
}

/// Reader limits and role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WsReaderConfig {
    /// Server requires masked frames, client requires unmasked frames.
    pub role: Role,
    /// Largest frame payload accepted (default 16 MiB); larger → 1009.
    pub max_frame: usize,
    /// Largest message (all fragments) accepted (default 64 MiB); larger → 1009.
    pub max_message: usize,
}

impl Default for WsReaderConfig {
    fn default() -> Self {
        WsReaderConfig {
            role: Role::Server,
            max_frame: 16 << 20,
            max_message: 64 << 20,
        }
    }
}

/// What the reader produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WsEvent {
    /// A complete data message. For `text: true`, `data` is valid UTF-8.
    Message { text: bool, data: Bytes },
    /// A ping; the shell answers with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close frame. `code` is `None` for an empty payload; `reason` is valid UTF-8.
    /// The reader accepts nothing after this.
    Close { code: Option<u16>, reason: Bytes },
}

/// The data message currently being received.
#[derive(Debug)]
struct Message {
    text: bool,
    /// Bytes received so far in completed fragments.
    len: usize,
    data: Assembly,
}

/// Fragments of a message received so far. One non-empty fragment is kept as is (no copy);
/// a second one moves both into a single buffer.
#[derive(Debug)]
enum Assembly {
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Assembly {
    /// Appends a fragment. `max` is the message limit, already checked against the new total;
    /// the buffer never grows past it. `last`: no more fragments follow, so room is made for
    /// exactly this one instead of growing geometrically.
    fn push(&mut self, frag: Bytes, max: usize, last: bool) {
        if frag.is_empty() {
            return;
        }
        let room = |need: usize, cap: usize| {
            if last {
                need
            } else {
                need.max(cap.saturating_mul(2).min(max))
            }
        };
        *self = match std::mem::replace(self, Assembly::Empty) {
            Assembly::Empty => Assembly::One(frag),
            Assembly::One(first) => {
                let need = first.len() + frag.len();
                let mut m = BytesMut::with_capacity(room(need, need));
                m.extend_from_slice(&first);
                m.extend_from_slice(&frag);
                Assembly::Many(m)
            }
            Assembly::Many(mut m) => {
                let need = m.len() + frag.len();
                if need > m.capacity() {
                    let mut n = BytesMut::with_capacity(room(need, m.capacity()));
                    n.extend_from_slice(&m);
                    m = n;
                }
                m.extend_from_slice(&frag);
                Assembly::Many(m)
            }
        };
    }

    /// The whole message, given its final fragment.
    fn finish(self, last: Bytes, max: usize) -> Bytes {
        match self {
            Assembly::Empty => last,
            Assembly::One(first) if last.is_empty() => first,
            mut a => {
                a.push(last, max, true);
                match a {
                    Assembly::Empty => Bytes::new(),
                    Assembly::One(b) => b,
                    Assembly::Many(m) => m.freeze(),
                }
            }
        }
    }
}

/// Sans-IO WebSocket reader for one connection. See the module docs.
#[derive(Debug)]
pub struct WsReader {
    cfg: WsReaderConfig,
    /// Header of the frame whose payload is being received (already removed from the buffer).
    cur: Option<FrameHeader>,
    /// Payload bytes of `cur` at the front of the buffer already unmasked (and validated).
    done: usize,
    /// Data message in progress (set when its first frame's header is accepted).
    msg: Option<Message>,
    utf8: Utf8Stream,
    /// A close frame was received.
    closed: bool,
    /// The connection failed; repeated on every later call.
    failed: Option<WsClose>,
    /// Wire size (header and payload) of the last whole frame taken off the buffer.
    last_frame: usize,
}

impl WsReader {
    /// A reader with the given role and limits.
    pub fn new(cfg: WsReaderConfig) -> Self {
        WsReader {
            cfg,
            cur: None,
            done: 0,
            msg: None,
            utf8: Utf8Stream::default(),
            closed: false,
            failed: None,
            last_frame: 0,
        }
    }

    /// Wire size (header and payload) of the last whole frame taken off the buffer, 0 before
    /// the first. A shell that has this much room free before it reads the next frame reads a
    /// peer that sends frames of one size without moving partial frames between buffers.
    pub fn last_frame_len(&self) -> usize {
        self.last_frame
    }

    /// The reader's configuration.
    pub fn config(&self) -> &WsReaderConfig {
        &self.cfg
    }

    /// Whether a close frame has been received.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether a data message is partly received (fragments pending).
    pub fn in_message(&self) -> bool {
        self.msg.is_some()
    }

    /// Takes the next event off the front of `buf`.
    ///
    /// `Ok(None)`: more bytes are needed (see [`bytes_wanted`](Self::bytes_wanted)).
    /// `Err(close)`: the connection must be closed with `close.code`; later calls return the
    /// same error. After a [`WsEvent::Close`], later calls discard `buf` and return `Ok(None)`.
    ///
    /// Bytes of a partly received frame stay in `buf` but are unmasked (and, for text,
    /// UTF-8-checked) in place as they arrive, so invalid text fails before the frame ends.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<WsEvent>, WsClose> {
        if let Some(c) = self.failed {
            return Err(c);
        }
        if self.closed {
            buf.clear();
            return Ok(None);
        }
        match self.step(buf) {
            Err(c) => {
                self.failed = Some(c);
                self.cur = None;
                self.msg = None;
                Err(c)
            }
            ok => ok,
        }
    }

    /// How many bytes `buf` must hold for [`next`](Self::next) to make progress: the rest of
    /// the current frame, or the next header plus its payload once the header is known (and
    /// within limits). If the answer is ≤ `buf.len()`, call `next`. The shell can reserve
    /// `bytes_wanted - buf.len()` once instead of growing the buffer in steps. Never exceeds
    /// `max(buf.len(), 14 + max_frame)`.
    pub fn bytes_wanted(&self, buf: &BytesMut) -> usize {
        if self.failed.is_some() || self.closed {
            return 0;
        }
        if let Some(h) = self.cur {
            // buf starts at the payload of `cur`; its length was checked against max_frame
            return h.payload_len as usize;
        }
        let hint = header_len_hint(buf);
        if buf.len() < hint {
            return hint;
        }
        match parse_header(buf) {
            Ok(Some(h)) => match self.check_header(&h) {
                Ok(()) => h.header_len.saturating_add(h.payload_len as usize),
                Err(_) => h.header_len,
            },
            _ => hint,
        }
    }

    fn step(&mut self, buf: &mut BytesMut) -> Result<Option<WsEvent>, WsClose> {
        loop {
            let h = match self.cur {
                Some(h) => h,
                None => {
                    let h = match parse_header(buf) {
                        Ok(Some(h)) => h,
                        Ok(None) => return Ok(None),
                        Err(_) => return Err(WsClose::PROTOCOL),
                    };
                    self.check_header(&h)?;
                    self.start_frame(&h);
                    buf.advance(h.header_len);
                    self.cur = Some(h);
                    self.done = 0;
                    h
                }
            };
            // checked against max_frame, which is a usize
            let len = h.payload_len as usize;
            let avail = buf.len().min(len);
            if avail > self.done {
                let piece = &mut buf[self.done..avail];
                if let Some(m) = h.mask {
                    super::frame::apply_mask(piece, m, self.done);
                }
                if !h.opcode.is_control() && self.msg.as_ref().is_some_and(|m| m.text) {
                    self.utf8.feed(piece).map_err(|_| WsClose::INVALID_UTF8)?;
                }
                self.done = avail;
            }
            if avail < len {
                return Ok(None);
            }
            let payload = buf.split_to(len).freeze();
            self.cur = None;
            self.done = 0;
            self.last_frame = h.header_len + len;
            match h.opcode {
                OpCode::Ping => return Ok(Some(WsEvent::Ping(payload))),
                OpCode::Pong => return Ok(Some(WsEvent::Pong(payload))),
                OpCode::Close => {
                    let ev = parse_close(payload)?;
                    self.closed = true;
                    self.msg = None;
                    buf.clear();
                    return Ok(Some(ev));
                }
                OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                    let max = self.cfg.max_message;
                    let Some(msg) = self.msg.as_mut() else {
                        // check_header guarantees a message is open for data frames
                        return Err(WsClose::PROTOCOL);
                    };
                    if h.fin {
                        if msg.text {
                            self.utf8.finish().map_err(|_| WsClose::INVALID_UTF8)?;
                        }
                        let Some(msg) = self.msg.take() else {
                            return Err(WsClose::PROTOCOL);
                        };
                        let data = msg.data.finish(payload, max);
                        return Ok(Some(WsEvent::Message {
                            text: msg.text,
                            data,
                        }));
                    }
                    msg.len += payload.len();
                    msg.data.push(payload, max, false);
                }
            }
        }
    }

    /// Checks a header against the connection's rules and limits. Nothing is changed.
    fn check_header(&self, h: &FrameHeader) -> Result<(), WsClose> {
        if h.rsv != 0 {
            return Err(WsClose::PROTOCOL);
        }
        let masked = h.mask.is_some();
        match self.cfg.role {
            Role::Server if !masked => return Err(WsClose::PROTOCOL),
            Role::Client if masked => return Err(WsClose::PROTOCOL),
            _ => {}
        }
        match h.opcode {
            OpCode::Continuation if self.msg.is_none() => return Err(WsClose::PROTOCOL),
            OpCode::Text | OpCode::Binary if self.msg.is_some() => return Err(WsClose::PROTOCOL),
            _ => {}
        }
        if h.payload_len > self.cfg.max_frame as u64 {
            return Err(WsClose::FRAME_TOO_BIG);
        }
        if !h.opcode.is_control() {
            let so_far = self.msg.as_ref().map_or(0, |m| m.len) as u64;
            if so_far.saturating_add(h.payload_len) > self.cfg.max_message as u64 {
                return Err(WsClose::MESSAGE_TOO_BIG);
            }
        }
        Ok(())
    }

    /// Opens the message state for the first frame of a data message.
    fn start_frame(&mut self, h: &FrameHeader) {
        if matches!(h.opcode, OpCode::Text | OpCode::Binary) {
            self.msg = Some(Message {
                text: h.opcode == OpCode::Text,
                len: 0,
                data: Assembly::Empty,
            });
            self.utf8.reset();
        }
    }
}

/// Validates a close frame payload: empty, or a valid code plus a UTF-8 reason.
fn parse_close(payload: Bytes) -> Result<WsEvent, WsClose> {
    match payload.len() {
        0 => Ok(WsEvent::Close {
            code: None,
            reason: Bytes::new(),
        }),
        1 => Err(WsClose::PROTOCOL),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_valid_close_code(code) {
                return Err(WsClose::PROTOCOL);
            }
            let reason = payload.slice(2..);
            if simdutf8::basic::from_utf8(&reason).is_err() {
                return Err(WsClose::INVALID_UTF8);
            }
            Ok(WsEvent::Close {
                code: Some(code),
                reason,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::{apply_mask, encode_header};
    use super::*;
    use proptest::prelude::*;

    const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

    /// A masked client frame.
    fn frame(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        raw_frame(fin, 0, op as u8, payload, Some(MASK))
    }

    fn raw_frame(fin: bool, rsv: u8, op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let h = encode_header(fin, OpCode::Binary, payload.len() as u64, mask);
        let mut v = h.to_vec();
        v[0] = (if fin { 0x80 } else { 0 }) | (rsv << 4) | op;
        let mut p = payload.to_vec();
        if let Some(m) = mask {
            apply_mask(&mut p, m, 0);
        }
        v.extend_from_slice(&p);
        v
    }

    fn server() -> WsReader {
        WsReader::new(WsReaderConfig::default())
    }

    /// Feeds everything at once and collects events up to the first error.
    fn feed_all(r: &mut WsReader, bytes: &[u8]) -> (Vec<WsEvent>, Option<WsClose>) {
        let mut buf = BytesMut::from(bytes);
        let mut evs = Vec::new();
        loop {
            match r.next(&mut buf) {
                Ok(Some(e)) => evs.push(e),
                Ok(None) => return (evs, None),
                Err(c) => return (evs, Some(c)),
            }
        }
    }

    /// Feeds in chunks of the given sizes (cycled), collecting events up to the first error.
    fn feed_chunked(
        r: &mut WsReader,
        bytes: &[u8],
        sizes: &[usize],
    ) -> (Vec<WsEvent>, Option<WsClose>) {
        let mut buf = BytesMut::new();
        let mut evs = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        loop {
            loop {
                match r.next(&mut buf) {
                    Ok(Some(e)) => evs.push(e),
                    Ok(None) => break,
                    Err(c) => return (evs, Some(c)),
                }
            }
            if pos >= bytes.len() {
                return (evs, None);
            }
            let n = sizes[i % sizes.len()].max(1).min(bytes.len() - pos);
            i += 1;
            buf.extend_from_slice(&bytes[pos..pos + n]);
            pos += n;
        }
    }

    fn one_err(bytes: &[u8]) -> WsClose {
        let (_, err) = feed_all(&mut server(), bytes);
        err.expect("expected an error")
    }

    #[test]
    fn single_frame_is_zero_copy() {
        let payload: Vec<u8> = (0..200u8).collect();
        let mut wire = frame(true, OpCode::Binary, &payload);
        wire.extend(frame(true, OpCode::Text, b"hello"));
        let mut buf = BytesMut::with_capacity(4096);
        buf.extend_from_slice(&wire);
        let start = buf.as_ptr() as usize;
        let end = start + buf.capacity();
        let mut r = server();
        let Some(WsEvent::Message { text, data }) = r.next(&mut buf).unwrap() else {
            panic!("expected a message");
        };
        assert!(!text);
        assert_eq!(&data[..], &payload[..]);
        let p = data.as_ptr() as usize;
        assert!(p >= start && p + data.len() <= end, "payload was copied");
        assert_eq!(p, start + 8, "payload is the frame's own bytes");
        let Some(WsEvent::Message { text, data }) = r.next(&mut buf).unwrap() else {
            panic!("expected a message");
        };
        assert!(text);
        assert_eq!(&data[..], b"hello");
        let p = data.as_ptr() as usize;
        assert!(p >= start && p + data.len() <= end, "payload was copied");
        assert_eq!(r.next(&mut buf), Ok(None));
        assert!(buf.is_empty());
    }

    #[test]
    fn fragmented_message_assembled() {
        let mut wire = frame(false, OpCode::Text, b"Hel");
        wire.extend(frame(false, OpCode::Continuation, b""));
        wire.extend(frame(false, OpCode::Continuation, b"lo, "));
        wire.extend(frame(true, OpCode::Continuation, "wörld".as_bytes()));
        let (evs, err) = feed_all(&mut server(), &wire);
        assert_eq!(err, None);
        assert_eq!(
            evs,
            vec![WsEvent::Message {
                text: true,
                data: Bytes::from("Hello, wörld")
            }]
        );
    }

    #[test]
    fn first_fragment_alone_is_not_copied() {
        let mut wire = frame(false, OpCode::Binary, b"abcdef");
        wire.extend(frame(true, OpCode::Continuation, b""));
        let mut buf = BytesMut::from(&wire[..]);
        let start = buf.as_ptr() as usize;
        let Some(WsEvent::Message { data, .. }) = server().next(&mut buf).unwrap() else {
            panic!("expected a message");
        };
        assert_eq!(&data[..], b"abcdef");
        assert_eq!(data.as_ptr() as usize, start + 6);
    }

    #[test]
    fn assembly_never_grows_past_limit() {
        let max = 10;
        let mut a = Assembly::Empty;
        a.push(Bytes::from_static(b"abc"), max, false);
        assert!(matches!(a, Assembly::One(_)));
        a.push(Bytes::from_static(b"def"), max, false);
        let Assembly::Many(m) = &a else {
            panic!("expected a buffer")
        };
        assert!(m.capacity() <= max);
        a.push(Bytes::from_static(b"gh"), max, false);
        let Assembly::Many(m) = &a else {
            panic!("expected a buffer")
        };
        assert!(m.capacity() <= max);
        assert_eq!(&a.finish(Bytes::from_static(b"ij"), max)[..], b"abcdefghij");
    }

    #[test]
    fn control_frames_between_fragments() {
        let mut wire = frame(false, OpCode::Binary, b"ab");
        wire.extend(frame(true, OpCode::Ping, b"p1"));
        wire.extend(frame(false, OpCode::Continuation, b"cd"));
        wire.extend(frame(true, OpCode::Pong, b""));
        wire.extend(frame(true, OpCode::Continuation, b"ef"));
        wire.extend(frame(true, OpCode::Close, &[0x03, 0xE8, b'b', b'y', b'e']));
        let (evs, err) = feed_all(&mut server(), &wire);
        assert_eq!(err, None);
        assert_eq!(
            evs,
            vec![
                WsEvent::Ping(Bytes::from_static(b"p1")),
                WsEvent::Pong(Bytes::new()),
                WsEvent::Message {
                    text: false,
                    data: Bytes::from_static(b"abcdef")
                },
                WsEvent::Close {
                    code: Some(1000),
                    reason: Bytes::from_static(b"bye")
                },
            ]
        );
    }

    #[test]
    fn close_forms() {
        let (evs, err) = feed_all(&mut server(), &frame(true, OpCode::Close, b""));
        assert_eq!(err, None);
        assert_eq!(
            evs,
            vec![WsEvent::Close {
                code: None,
                reason: Bytes::new()
            }]
        );
        for code in [
            1000u16, 1001, 1003, 1007, 1011, 1012, 1014, 3000, 3999, 4000, 4999,
        ] {
            let (evs, err) = feed_all(
                &mut server(),
                &frame(true, OpCode::Close, &code.to_be_bytes()),
            );
            assert_eq!(err, None, "{code}");
            assert_eq!(
                evs,
                vec![WsEvent::Close {
                    code: Some(code),
                    reason: Bytes::new()
                }]
            );
        }
    }

    #[test]
    fn nothing_after_close() {
        let mut wire = frame(true, OpCode::Close, &[0x03, 0xE8]);
        wire.extend(frame(true, OpCode::Text, b"late"));
        let mut r = server();
        let mut buf = BytesMut::from(&wire[..]);
        assert!(matches!(r.next(&mut buf), Ok(Some(WsEvent::Close { .. }))));
        assert_eq!(r.next(&mut buf), Ok(None));
        assert!(r.is_closed());
        assert!(buf.is_empty());
        buf.extend_from_slice(&frame(true, OpCode::Text, b"later"));
        assert_eq!(r.next(&mut buf), Ok(None));
    }

    #[test]
    fn protocol_errors_1002() {
        let p = WsClose::PROTOCOL;
        // unmasked client frame
        assert_eq!(one_err(&raw_frame(true, 0, 2, b"x", None)), p);
        // RSV bits without an extension
        for rsv in 1..8 {
            assert_eq!(one_err(&raw_frame(true, rsv, 1, b"x", Some(MASK))), p);
        }
        // reserved opcodes
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(one_err(&raw_frame(true, 0, op, b"", Some(MASK))), p);
        }
        // fragmented control frame
        assert_eq!(one_err(&raw_frame(false, 0, 9, b"", Some(MASK))), p);
        // control frame over 125 bytes
        assert_eq!(one_err(&frame(true, OpCode::Ping, &[0u8; 126])), p);
        // continuation without start
        assert_eq!(one_err(&frame(true, OpCode::Continuation, b"x")), p);
        // new data frame during a fragmented message
        let mut w = frame(false, OpCode::Text, b"a");
        w.extend(frame(true, OpCode::Text, b"b"));
        assert_eq!(one_err(&w), p);
        let mut w = frame(false, OpCode::Binary, b"a");
        w.extend(frame(true, OpCode::Binary, b"b"));
        assert_eq!(one_err(&w), p);
        // close payload of length 1
        assert_eq!(one_err(&frame(true, OpCode::Close, &[3])), p);
        // invalid close codes
        for code in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert_eq!(
                one_err(&frame(true, OpCode::Close, &code.to_be_bytes())),
                p,
                "{code}"
            );
        }
        // non-minimal length
        let mut w = vec![0x82, 0x80 | 126, 0, 5];
        w.extend(MASK);
        w.extend([0; 5]);
        assert_eq!(one_err(&w), p);
    }

    #[test]
    fn client_role_requires_unmasked() {
        let cfg = WsReaderConfig {
            role: Role::Client,
            ..Default::default()
        };
        let (evs, err) = feed_all(&mut WsReader::new(cfg), &raw_frame(true, 0, 2, b"hi", None));
        assert_eq!(err, None);
        assert_eq!(
            evs,
            vec![WsEvent::Message {
                text: false,
                data: Bytes::from_static(b"hi")
            }]
        );
        let (_, err) = feed_all(&mut WsReader::new(cfg), &frame(true, OpCode::Binary, b"hi"));
        assert_eq!(err, Some(WsClose::PROTOCOL));
    }

    #[test]
    fn invalid_utf8_1007() {
        let u = WsClose::INVALID_UTF8;
        assert_eq!(one_err(&frame(true, OpCode::Text, &[b'a', 0xFF])), u);
        // ends inside a code point
        assert_eq!(one_err(&frame(true, OpCode::Text, &[0xE2, 0x82])), u);
        let mut w = frame(false, OpCode::Text, &[0xE2]);
        w.extend(frame(true, OpCode::Continuation, &[0x82]));
        assert_eq!(one_err(&w), u);
        // close reason must be UTF-8
        assert_eq!(
            one_err(&frame(true, OpCode::Close, &[0x03, 0xE8, 0xC0, 0x80])),
            u
        );
        // binary is not checked
        let (_, err) = feed_all(&mut server(), &frame(true, OpCode::Binary, &[0xFF]));
        assert_eq!(err, None);
    }

    #[test]
    fn invalid_utf8_fails_before_message_completes() {
        // first fragment already holds a complete invalid sequence; no final fragment is sent
        let mut r = server();
        let (evs, err) = feed_all(
            &mut r,
            &frame(false, OpCode::Text, &[0xCE, 0xBA, 0xED, 0xA0, 0x80]),
        );
        assert!(evs.is_empty());
        assert_eq!(err, Some(WsClose::INVALID_UTF8));

        // inside a single frame: only the first half of the frame has arrived
        let payload = [b'h', b'i', 0xF4, 0x90, 0x80, 0x80, b'x', b'y', b'z', b'w'];
        let w = frame(true, OpCode::Text, &payload);
        let mut r = server();
        let mut buf = BytesMut::from(&w[..6 + 5]);
        assert_eq!(r.next(&mut buf), Err(WsClose::INVALID_UTF8));
        // and it stays failed
        assert_eq!(r.next(&mut buf), Err(WsClose::INVALID_UTF8));
    }

    #[test]
    fn split_code_point_across_fragments() {
        let euro = "€".as_bytes();
        let mut w = frame(false, OpCode::Text, &[b'a', euro[0]]);
        w.extend(frame(false, OpCode::Continuation, &euro[1..2]));
        w.extend(frame(true, OpCode::Ping, b""));
        w.extend(frame(true, OpCode::Continuation, &[euro[2], b'b']));
        let (evs, err) = feed_all(&mut server(), &w);
        assert_eq!(err, None);
        assert_eq!(
            evs,
            vec![
                WsEvent::Ping(Bytes::new()),
                WsEvent::Message {
                    text: true,
                    data: Bytes::from("a€b")
                }
            ]
        );
    }

    #[test]
    fn too_big_1009() {
        let cfg = WsReaderConfig {
            role: Role::Server,
            max_frame: 10,
            max_message: 15,
        };
        let (_, err) = feed_all(
            &mut WsReader::new(cfg),
            &frame(true, OpCode::Binary, &[0; 11]),
        );
        assert_eq!(err, Some(WsClose::FRAME_TOO_BIG));
        assert_eq!(WsClose::FRAME_TOO_BIG.code, 1009);
        let (_, err) = feed_all(
            &mut WsReader::new(cfg),
            &frame(true, OpCode::Binary, &[0; 10]),
        );
        assert_eq!(err, None);
        let mut w = frame(false, OpCode::Binary, &[0; 10]);
        w.extend(frame(true, OpCode::Continuation, &[0; 5]));
        let (evs, err) = feed_all(&mut WsReader::new(cfg), &w);
        assert_eq!(err, None);
        assert_eq!(evs.len(), 1);
        let mut w = frame(false, OpCode::Binary, &[0; 10]);
        w.extend(frame(false, OpCode::Continuation, &[0; 5]));
        // header only: the limit is known before the payload arrives
        w.extend(&encode_header(true, OpCode::Continuation, 1, Some(MASK))[..]);
        let (evs, err) = feed_all(&mut WsReader::new(cfg), &w);
        assert!(evs.is_empty());
        assert_eq!(err, Some(WsClose::MESSAGE_TOO_BIG));
        assert_eq!(WsClose::MESSAGE_TOO_BIG.code, 1009);
    }

    #[test]
    fn oversized_header_alone_fails_without_reserving() {
        let h = encode_header(true, OpCode::Binary, (16 << 20) + 1, Some(MASK));
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&h);
        let cap = buf.capacity();
        let mut r = server();
        assert!(
            r.bytes_wanted(&buf) <= buf.len(),
            "must not ask for the payload"
        );
        assert_eq!(r.next(&mut buf), Err(WsClose::FRAME_TOO_BIG));
        assert_eq!(buf.capacity(), cap);
        assert_eq!(r.bytes_wanted(&buf), 0);
        // exactly the limit is fine and the hint asks for all of it
        let h = encode_header(true, OpCode::Binary, 16 << 20, Some(MASK));
        let buf = BytesMut::from(&h[..]);
        assert_eq!(server().bytes_wanted(&buf), 14 + (16 << 20));
    }

    #[test]
    fn bytes_wanted_hints() {
        let r = server();
        assert_eq!(r.bytes_wanted(&BytesMut::new()), 2);
        let w = frame(true, OpCode::Binary, &[7; 300]);
        assert_eq!(r.bytes_wanted(&BytesMut::from(&w[..1])), 2);
        assert_eq!(r.bytes_wanted(&BytesMut::from(&w[..2])), 8);
        assert_eq!(r.bytes_wanted(&BytesMut::from(&w[..8])), 308);
        let mut r = server();
        let mut buf = BytesMut::from(&w[..100]);
        assert_eq!(r.next(&mut buf), Ok(None));
        // header consumed, 92 payload bytes buffered, 300 needed
        assert_eq!(buf.len(), 92);
        assert_eq!(r.bytes_wanted(&buf), 300);
        buf.extend_from_slice(&w[100..]);
        assert!(r.bytes_wanted(&buf) <= buf.len());
        assert!(matches!(
            r.next(&mut buf),
            Ok(Some(WsEvent::Message { .. }))
        ));
    }

    /// A generated client frame for the property tests.
    #[derive(Clone, Debug)]
    struct GenFrame {
        fin: bool,
        rsv: u8,
        op: u8,
        payload: Vec<u8>,
        mask: Option<[u8; 4]>,
    }

    fn gen_frame() -> impl Strategy<Value = GenFrame> {
        let payload = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..20),
            "\\PC{0,10}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 120..140),
        ];
        (
            prop_oneof![7 => Just(true), 3 => Just(false)],
            prop_oneof![50 => Just(0u8), 1 => 0u8..8],
            prop_oneof![
                4 => Just(1u8),
                4 => Just(2),
                6 => Just(0),
                2 => Just(9),
                2 => Just(10),
                1 => Just(8),
                1 => 0u8..16,
            ],
            payload,
            prop_oneof![50 => any::<[u8; 4]>().prop_map(Some), 1 => Just(None)],
        )
            .prop_map(|(fin, rsv, op, payload, mask)| GenFrame {
                fin,
                rsv,
                op,
                payload,
                mask,
            })
    }

    /// One step of a generated stream: mostly well-formed traffic, sometimes a random frame.
    #[derive(Clone, Debug)]
    enum Item {
        /// A data message split into `parts` fragments, with a ping after the first if `ping`.
        Msg {
            text: bool,
            payload: Vec<u8>,
            parts: usize,
            ping: bool,
        },
        Control(OpCode, Vec<u8>),
        Raw(GenFrame),
    }

    fn gen_item() -> impl Strategy<Value = Item> {
        let payload = prop_oneof![
            6 => "\\PC{0,40}".prop_map(String::into_bytes),
            1 => proptest::collection::vec(any::<u8>(), 0..40),
            1 => proptest::collection::vec(any::<u8>(), 100..220),
        ];
        prop_oneof![
            8 => (any::<bool>(), payload, 1usize..4, any::<bool>()).prop_map(
                |(text, payload, parts, ping)| Item::Msg { text, payload, parts, ping }
            ),
            2 => (
                prop::sample::select(vec![OpCode::Ping, OpCode::Pong]),
                proptest::collection::vec(any::<u8>(), 0..10),
            )
                .prop_map(|(op, p)| Item::Control(op, p)),
            1 => proptest::collection::vec(any::<u8>(), 0..6)
                .prop_map(|p| Item::Control(OpCode::Close, p)),
            1 => gen_frame().prop_map(Item::Raw),
        ]
    }

    fn item_wire(items: &[Item]) -> Vec<u8> {
        let mut wire = Vec::new();
        for it in items {
            match it {
                Item::Msg {
                    text,
                    payload,
                    parts,
                    ping,
                } => {
                    let step = payload.len().div_ceil(*parts).max(1);
                    let chunks: Vec<&[u8]> = if payload.is_empty() {
                        vec![&payload[..]]
                    } else {
                        payload.chunks(step).collect()
                    };
                    for (i, c) in chunks.iter().enumerate() {
                        let op = match (i, text) {
                            (0, true) => OpCode::Text,
                            (0, false) => OpCode::Binary,
                            _ => OpCode::Continuation,
                        };
                        wire.extend(frame(i + 1 == chunks.len(), op, c));
                        if i == 0 && *ping {
                            wire.extend(frame(true, OpCode::Ping, b"mid"));
                        }
                    }
                }
                Item::Control(op, p) => wire.extend(frame(true, *op, p)),
                Item::Raw(f) => wire.extend(raw_frame(f.fin, f.rsv, f.op, &f.payload, f.mask)),
            }
        }
        wire
    }

    fn small_cfg() -> WsReaderConfig {
        WsReaderConfig {
            role: Role::Server,
            max_frame: 130,
            max_message: 200,
        }
    }

    proptest! {
        #[test]
        fn chunked_feeding_matches_whole(
            items in proptest::collection::vec(gen_item(), 0..12),
            sizes in proptest::collection::vec(1usize..20, 1..6),
        ) {
            let wire = item_wire(&items);
            let whole = feed_all(&mut WsReader::new(small_cfg()), &wire);
            let bytewise = feed_chunked(&mut WsReader::new(small_cfg()), &wire, &[1]);
            let chunked = feed_chunked(&mut WsReader::new(small_cfg()), &wire, &sizes);
            prop_assert_eq!(&whole, &bytewise);
            prop_assert_eq!(&whole, &chunked);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            data in proptest::collection::vec(any::<u8>(), 0..400),
            sizes in proptest::collection::vec(1usize..50, 1..4),
            client in any::<bool>(),
        ) {
            let cfg = WsReaderConfig {
                role: if client { Role::Client } else { Role::Server },
                ..small_cfg()
            };
            let mut r = WsReader::new(cfg);
            let mut buf = BytesMut::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < data.len() {
                let n = sizes[i % sizes.len()].min(data.len() - pos);
                i += 1;
                buf.extend_from_slice(&data[pos..pos + n]);
                pos += n;
                let wanted = r.bytes_wanted(&buf);
                prop_assert!(wanted <= buf.len().max(14 + 130));
                loop {
                    match r.next(&mut buf) {
                        Ok(Some(WsEvent::Message { text: true, data })) => {
                            prop_assert!(std::str::from_utf8(&data).is_ok());
                        }
                        Ok(Some(WsEvent::Message { data, .. })) => {
                            prop_assert!(data.len() <= 200);
                        }
                        Ok(Some(WsEvent::Close { reason, code })) => {
                            prop_assert!(std::str::from_utf8(&reason).is_ok());
                            prop_assert!(code.is_none_or(is_valid_close_code));
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(c) => {
                            prop_assert!(matches!(c.code, 1002 | 1007 | 1009));
                            break;
                        }
                    }
                }
            }
        }

        #[test]
        fn valid_messages_roundtrip(
            msgs in proptest::collection::vec(
                (any::<bool>(), "\\PC{0,30}", 1usize..5), 0..6),
        ) {
            // each message split into `parts` fragments at byte positions (code points may split)
            let mut wire = Vec::new();
            let mut expect = Vec::new();
            for (text, s, parts) in &msgs {
                let b = s.as_bytes();
                let step = b.len().div_ceil(*parts).max(1);
                let chunks: Vec<&[u8]> = if b.is_empty() { vec![b] } else { b.chunks(step).collect() };
                for (i, c) in chunks.iter().enumerate() {
                    let op = if i > 0 { OpCode::Continuation } else if *text { OpCode::Text } else { OpCode::Binary };
                    wire.extend(frame(i + 1 == chunks.len(), op, c));
                }
                expect.push(WsEvent::Message { text: *text, data: Bytes::copy_from_slice(b) });
            }
            let (evs, err) = feed_chunked(&mut server(), &wire, &[3, 1, 7]);
            prop_assert_eq!(err, None);
            prop_assert_eq!(evs, expect);
        }
    }
}
