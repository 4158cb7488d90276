//! Minimal WebSocket client side for the load generator: connect (optionally from a chosen
//! source address), HTTP/1.1 upgrade, masked client frames built once and written as bytes,
//! and a streaming reader of server frames that counts complete data messages without
//! buffering or copying their payloads. Pings are answered (pong), a close is answered and
//! reported.
//!
//! It must never block the runtime (every socket is non-blocking and driven by `AsyncFd`
//! readiness) and never panic on what the server sends: malformed frames are `Err`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;

use base64::Engine;
use sha1::{Digest, Sha1};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::{Interest, Ready};

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// One complete masked client frame (FIN set) carrying `payload`.
pub fn client_frame(op: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | op);
    let len = payload.len();
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    f
}

/// What one call of the reader produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Complete data messages received.
    pub msgs: u32,
    /// Of those, how many had a length other than the expected one.
    pub bad_size: u32,
    /// The server sent a close frame (already answered).
    pub closed: bool,
}

/// A control frame the connection must react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Ping(Vec<u8>),
    Close,
}

/// Streaming parser of server→client frames. Data payloads are skipped as they arrive
/// (only their length matters); control frames are parsed whole (at most 125 bytes).
#[derive(Debug, Default)]
pub struct Parser {
    /// Payload bytes of the current data frame not yet seen.
    remaining: u64,
    /// The current data frame ends its message.
    frame_fin: bool,
    /// A fragmented message is open.
    in_msg: bool,
    /// Payload bytes of the current message so far.
    msg_len: u64,
}

impl Parser {
    /// Consumes what it can of `buf`; returns the number of bytes used. Complete messages
    /// are counted in `out` (`expect` is the expected length); control frames go to `ctl`.
    pub fn parse(
        &mut self,
        buf: &[u8],
        expect: u64,
        out: &mut Progress,
        ctl: &mut Vec<Control>,
    ) -> io::Result<usize> {
        let mut pos = 0;
        loop {
            if self.remaining > 0 {
                let take = self.remaining.min((buf.len() - pos) as u64);
                if take == 0 {
                    return Ok(pos);
                }
                pos += take as usize;
                self.remaining -= take;
                self.msg_len += take;
                if self.remaining == 0 && self.frame_fin {
                    self.finish(expect, out);
                }
                continue;
            }
            let rest = &buf[pos..];
            if rest.len() < 2 {
                return Ok(pos);
            }
            let fin = rest[0] & 0x80 != 0;
            let op = rest[0] & 0x0F;
            if rest[0] & 0x70 != 0 {
                return Err(proto("reserved bits set"));
            }
            let masked = rest[1] & 0x80 != 0;
            let len7 = rest[1] & 0x7F;
            let (len, mut hdr) = match len7 {
                126 => {
                    if rest.len() < 4 {
                        return Ok(pos);
                    }
                    (u16::from_be_bytes([rest[2], rest[3]]) as u64, 4)
                }
                127 => {
                    if rest.len() < 10 {
                        return Ok(pos);
                    }
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&rest[2..10]);
                    (u64::from_be_bytes(b), 10)
                }
                n => (n as u64, 2),
            };
            let mask_at = hdr;
            if masked {
                hdr += 4;
            }
            if rest.len() < hdr {
                return Ok(pos);
            }
            if op >= 0x8 {
                if !fin || len > 125 {
                    return Err(proto("bad control frame"));
                }
                let total = hdr + len as usize;
                if rest.len() < total {
                    return Ok(pos);
                }
                let mut payload = rest[hdr..total].to_vec();
                if masked {
                    let m = &rest[mask_at..mask_at + 4];
                    for (i, b) in payload.iter_mut().enumerate() {
                        *b ^= m[i & 3];
                    }
                }
                match op {
                    OP_PING => ctl.push(Control::Ping(payload)),
                    OP_CLOSE => ctl.push(Control::Close),
                    OP_PONG => {}
                    _ => return Err(proto("unknown control opcode")),
                }
                pos += total;
                continue;
            }
            match (op, self.in_msg) {
                (OP_CONT, true) | (OP_TEXT | OP_BINARY, false) => {}
                (OP_CONT, false) => return Err(proto("continuation without a message")),
                (OP_TEXT | OP_BINARY, true) => return Err(proto("new message inside a message")),
                _ => return Err(proto("unknown data opcode")),
            }
            pos += hdr;
            self.in_msg = true;
            self.frame_fin = fin;
            self.remaining = len;
            if len == 0 && fin {
                self.finish(expect, out);
            }
        }
    }

    fn finish(&mut self, expect: u64, out: &mut Progress) {
        out.msgs += 1;
        if self.msg_len != expect {
            out.bad_size += 1;
        }
        self.msg_len = 0;
        self.in_msg = false;
        self.frame_fin = false;
    }
}

fn proto(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// The `Sec-WebSocket-Accept` value for a key.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Checks a complete upgrade response head; returns its length on success, `Ok(None)` when
/// more bytes are needed.
pub fn check_upgrade_response(buf: &[u8], key: &str) -> io::Result<Option<usize>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(proto(&format!("bad upgrade response: {e}"))),
    };
    if resp.code != Some(101) {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("upgrade refused: status {:?}", resp.code),
        ));
    }
    let want = accept_key(key);
    let ok = resp
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept") && h.value == want.as_bytes());
    if !ok {
        return Err(proto("missing or wrong sec-websocket-accept"));
    }
    Ok(Some(n))
}

/// Writes the queue `wbuf[*wpos..]` until done or the socket would block (then `true`).
fn write_queue(sock: &TcpStream, wbuf: &mut Vec<u8>, wpos: &mut usize) -> io::Result<bool> {
    while *wpos < wbuf.len() {
        match (&*sock).write(&wbuf[*wpos..]) {
            Ok(n) => *wpos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    wbuf.clear();
    *wpos = 0;
    Ok(false)
}

/// One client WebSocket over a non-blocking TCP socket.
pub struct Conn {
    fd: AsyncFd<TcpStream>,
    rbuf: Vec<u8>,
    rpos: usize,
    rlen: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    parser: Parser,
    ctl: Vec<Control>,
    mask: [u8; 4],
    /// Expected length of every echoed message.
    pub expect: u64,
    closed: bool,
    /// Bytes after the upgrade response not parsed yet.
    leftover: bool,
}

impl Conn {
    /// Connects (from `source` when given, port chosen at connect time), upgrades to a
    /// WebSocket on `path`. `rbuf_size` bounds the read buffer (payloads stream through it).
    pub async fn connect(
        addr: SocketAddr,
        host: &str,
        path: &str,
        source: Option<IpAddr>,
        rbuf_size: usize,
    ) -> io::Result<Conn> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        if let Some(src) = source {
            let one: libc::c_int = 1;
            // SAFETY: a valid socket fd and a c_int option value of the right size.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            sock.bind(&SocketAddr::new(src, 0).into())?;
        }
        match sock.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        // SAFETY: the TcpStream owns its fd for the AsyncFd's whole life and never swaps it.
        let fd = unsafe { AsyncFd::register(TcpStream::from(sock)) }?;
        loop {
            let mut g = fd.writable().await?;
            if let Some(e) = fd.get_ref().take_error()? {
                return Err(e);
            }
            match fd.get_ref().peer_addr() {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => g.clear_ready(),
                Err(e) => return Err(e),
            }
        }
        let key_bytes: [u8; 16] = rand::random();
        let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
        let req = format!(
            "GET {path} HTTP/1.1\r\nhost: {host}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
             sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n\r\n"
        );
        let mut c = Conn {
            fd,
            rbuf: vec![0; rbuf_size.max(4096)],
            rpos: 0,
            rlen: 0,
            wbuf: req.into_bytes(),
            wpos: 0,
            parser: Parser::default(),
            ctl: Vec::new(),
            mask: rand::random(),
            expect: 0,
            closed: false,
            leftover: false,
        };
        while c.pending() {
            let mut g = c.fd.writable().await?;
            if write_queue(c.fd.get_ref(), &mut c.wbuf, &mut c.wpos)? {
                g.clear_ready_matching(Ready::WRITABLE);
            }
        }
        loop {
            let mut g = c.fd.readable().await?;
            let space = c.rbuf.len() - c.rlen;
            if space == 0 {
                return Err(proto("upgrade response too large"));
            }
            match c.fd.get_ref().read(&mut c.rbuf[c.rlen..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    c.rlen += n;
                    if n < space {
                        g.clear_ready_matching(Ready::READABLE);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    g.clear_ready_matching(Ready::READABLE);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Some(n) = check_upgrade_response(&c.rbuf[..c.rlen], &key)? {
                c.rpos = n;
                c.leftover = c.rpos < c.rlen;
                break;
            }
        }
        Ok(c)
    }

    /// The masking key this connection uses for its frames.
    pub fn mask(&self) -> [u8; 4] {
        self.mask
    }

    /// Bytes queued but not yet written.
    pub fn pending(&self) -> bool {
        self.wpos < self.wbuf.len()
    }

    /// Queues bytes (whole frames) for writing; `flush` or `io` writes them.
    pub fn queue(&mut self, bytes: &[u8]) {
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        }
        self.wbuf.extend_from_slice(bytes);
    }

    /// Writes a frame now if nothing else is queued, buffering what the socket does not take.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.pending() {
            self.queue(frame);
            return self.flush();
        }
        let mut off = 0;
        while off < frame.len() {
            match self.fd.get_ref().write(&frame[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if off < frame.len() {
            self.queue(&frame[off..]);
        }
        Ok(())
    }

    /// Writes what it can of the queue without waiting.
    pub fn flush(&mut self) -> io::Result<()> {
        self.write_some().map(|_| ())
    }

    /// Returns `true` when the socket would block (the queue is not empty).
    fn write_some(&mut self) -> io::Result<bool> {
        write_queue(self.fd.get_ref(), &mut self.wbuf, &mut self.wpos)
    }

    /// Waits until the socket can make progress (readable, or writable while bytes are
    /// queued), then reads, parses, answers control frames and writes. Cancel-safe: the only
    /// await is the readiness wait. End of stream is `UnexpectedEof`.
    pub async fn io(&mut self) -> io::Result<Progress> {
        let interest = if self.pending() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let mut prog = Progress::default();
        if std::mem::take(&mut self.leftover) {
            self.parse(&mut prog)?;
            if prog != Progress::default() {
                return Ok(prog);
            }
        }
        let mut g = self.fd.ready(interest).await?;
        let ready = g.ready();
        if ready.is_readable() || ready.is_read_closed() || ready.is_error() {
            if self.rpos == self.rlen {
                self.rpos = 0;
                self.rlen = 0;
            } else if self.rbuf.len() - self.rlen < 256 {
                self.rbuf.copy_within(self.rpos..self.rlen, 0);
                self.rlen -= self.rpos;
                self.rpos = 0;
            }
            let space = self.rbuf.len() - self.rlen;
            match self.fd.get_ref().read(&mut self.rbuf[self.rlen..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.rlen += n;
                    // A short read emptied the socket: no need to try again before the
                    // next readiness event.
                    if n < space {
                        g.clear_ready_matching(Ready::READABLE);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    g.clear_ready_matching(Ready::READABLE)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.wpos < self.wbuf.len()
            && write_queue(self.fd.get_ref(), &mut self.wbuf, &mut self.wpos)?
        {
            g.clear_ready_matching(Ready::WRITABLE);
        }
        drop(g);
        self.parse(&mut prog)?;
        Ok(prog)
    }

    /// Writes from `buf` (not through the queue) once the socket takes at least one byte;
    /// returns how many it took. Does not read.
    pub async fn write_from(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let mut g = self.fd.writable().await?;
            match self.fd.get_ref().write(buf) {
                Ok(n) => {
                    if n < buf.len() {
                        g.clear_ready_matching(Ready::WRITABLE);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    g.clear_ready_matching(Ready::WRITABLE)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Parses the unread bytes, answering control frames.
    fn parse(&mut self, prog: &mut Progress) -> io::Result<()> {
        let used = self.parser.parse(
            &self.rbuf[self.rpos..self.rlen],
            self.expect,
            prog,
            &mut self.ctl,
        )?;
        self.rpos += used;
        if self.ctl.is_empty() {
            return Ok(());
        }
        for c in std::mem::take(&mut self.ctl) {
            match c {
                Control::Ping(p) => {
                    let f = client_frame(OP_PONG, &p, self.mask);
                    self.queue(&f);
                }
                Control::Close if !self.closed => {
                    self.closed = true;
                    prog.closed = true;
                    let f = client_frame(OP_CLOSE, &1000u16.to_be_bytes(), self.mask);
                    self.queue(&f);
                }
                Control::Close => {}
            }
        }
        self.flush()
    }

    /// Starts a normal close (1000) without waiting for the answer.
    pub fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            let f = client_frame(OP_CLOSE, &1000u16.to_be_bytes(), self.mask);
            self.queue(&f);
            let _ = self.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | op];
        let len = payload.len();
        if len < 126 {
            f.push(len as u8);
        } else if len <= 65535 {
            f.push(126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    fn unmask(frame: &[u8]) -> (u8, Vec<u8>) {
        let len7 = frame[1] & 0x7f;
        assert!(frame[1] & 0x80 != 0, "client frames are masked");
        let (len, off) = match len7 {
            126 => (u16::from_be_bytes([frame[2], frame[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(frame[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let m = &frame[off..off + 4];
        let p = frame[off + 4..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ m[i & 3])
            .collect::<Vec<_>>();
        assert_eq!(p.len(), len);
        (frame[0], p)
    }

    #[test]
    fn client_frames_round_trip_at_every_length_class() {
        for len in [0usize, 5, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = client_frame(OP_BINARY, &payload, [1, 2, 3, 4]);
            let (b0, p) = unmask(&f);
            assert_eq!(b0, 0x80 | OP_BINARY);
            assert_eq!(p, payload, "len {len}");
        }
    }

    #[test]
    fn parser_counts_messages_fed_byte_by_byte() {
        let mut stream = server_frame(true, OP_BINARY, &[7; 300]);
        stream.extend(server_frame(true, OP_PING, b"hi"));
        stream.extend(server_frame(false, OP_TEXT, &[1; 100]));
        stream.extend(server_frame(true, OP_CONT, &[1; 200]));
        stream.extend(server_frame(true, OP_BINARY, &[2; 70000]));
        stream.extend(server_frame(true, OP_BINARY, &[]));
        let mut p = Parser::default();
        let mut prog = Progress::default();
        let mut ctl = Vec::new();
        let mut buf = Vec::new();
        for b in stream {
            buf.push(b);
            let used = p.parse(&buf, 300, &mut prog, &mut ctl).unwrap();
            buf.drain(..used);
        }
        assert!(buf.is_empty());
        assert_eq!(prog.msgs, 4);
        assert_eq!(prog.bad_size, 2, "70000 and 0 are not 300");
        assert_eq!(ctl, vec![Control::Ping(b"hi".to_vec())]);
    }

    #[test]
    fn parser_rejects_bad_framing() {
        let mut ctl = Vec::new();
        let mut prog = Progress::default();
        for bad in [
            server_frame(true, OP_CONT, b"x"),
            server_frame(false, OP_PING, b"x"),
            server_frame(true, 0x3, b"x"),
            vec![0xC2, 0x00],
        ] {
            let r = Parser::default().parse(&bad, 1, &mut prog, &mut ctl);
            assert!(r.is_err(), "{bad:?}");
        }
        let mut two = server_frame(false, OP_TEXT, b"x");
        two.extend(server_frame(true, OP_TEXT, b"y"));
        assert!(Parser::default()
            .parse(&two, 2, &mut prog, &mut ctl)
            .is_err());
    }

    #[test]
    fn parser_unmasks_control_payloads_and_sees_close() {
        let ping = client_frame(OP_PING, b"abc", [9, 8, 7, 6]);
        let close = client_frame(OP_CLOSE, &[3, 232], [1, 1, 1, 1]);
        let mut both = ping.clone();
        both.extend(close);
        let mut ctl = Vec::new();
        let mut prog = Progress::default();
        let used = Parser::default()
            .parse(&both, 0, &mut prog, &mut ctl)
            .unwrap();
        assert_eq!(used, both.len());
        assert_eq!(ctl, vec![Control::Ping(b"abc".to_vec()), Control::Close]);
    }

    #[test]
    fn upgrade_response_is_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        assert_eq!(accept_key(key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let ok =
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
                  sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x02\x00";
        let n = check_upgrade_response(ok.as_bytes(), key).unwrap().unwrap();
        assert_eq!(&ok.as_bytes()[n..], b"\x02\x00");
        assert!(check_upgrade_response(&ok.as_bytes()[..20], key)
            .unwrap()
            .is_none());
        let wrong = ok.replace("s3pP", "AAAA");
        assert!(check_upgrade_response(wrong.as_bytes(), key).is_err());
        let refused = "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        assert!(check_upgrade_response(refused.as_bytes(), key).is_err());
    }
}
