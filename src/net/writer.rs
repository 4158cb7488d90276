//! The writer half of a connection: waits for its [`OutQueue`] to fill, then flushes every
//! queued chunk with vectored writes (one `writev` submission per turn for as many chunks as
//! fit in an iovec array), so all frames produced for a socket in one turn of the shard loop
//! leave in one system call. The chunk list handed to `writev` comes back with its result
//! and is reused, so a turn allocates nothing of its own.
//!
//! It never decides what to write; it only moves bytes, half-closes the socket after a
//! queued close frame has been flushed, and enforces the close-handshake deadline: from the
//! moment a close frame is queued (even while an earlier write is stuck behind a peer that
//! does not read), the peer has `timeouts.close_handshake_ms` to finish the handshake and
//! go away; then the TCP connection is reset. It must never hold a socket open past that
//! deadline, nor keep the socket alive itself (the deadline holds only a weak reference).
//!
//! [`OutQueue`]: crate::shard::state::OutQueue

use crate::metrics::Counter;
use crate::shard::state::ConnKind;
use crate::shard::ShardState;
use bytes::Bytes;
use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::Duration;
use tokio_uring::net::TcpStream;

/// Max iovecs per `writev` (the kernel's IOV_MAX).
pub const MAX_IOV: usize = 1024;

/// Chunk-list capacity a writer keeps while its queue is idle (2 KiB): a turn of up to this
/// many chunks (21 tunnelled messages) never allocates; a larger list is released once the
/// queue drains so an idle connection does not hold a burst's worth of memory.
const IDLE_IOVS: usize = 64;

/// Runs until the connection's slab entry is gone or the socket fails.
pub async fn writer_task(
    state: Rc<RefCell<ShardState>>,
    stream: Rc<TcpStream>,
    slot: u32,
    gen: u32,
) {
    let (notify, close_after) = {
        let mut st = state.borrow_mut();
        let close_after = Duration::from_millis(st.shared.config.timeouts.close_handshake_ms);
        match st.get(slot, gen) {
            Some(c) => (c.out.notify.clone(), close_after),
            None => return,
        }
    };
    // Set once the close deadline runs (it is started at most once).
    let mut armed = false;
    // The chunk list handed to `writev`; it comes back with the result and is reused.
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        notify.notified().await;
        loop {
            let (written, closing, flushed) = {
                let mut st = state.borrow_mut();
                let Some(conn) = st.get(slot, gen) else {
                    return;
                };
                if conn.out.abort {
                    // The peer does not read: no close handshake, reset (wakes the reader).
                    drop(st);
                    reset(&stream);
                    return;
                }
                batch.clear();
                let written = conn.out.take_batch(&mut batch, MAX_IOV);
                let closing = conn.out.closing;
                (written, closing, closing && conn.out.chunks.is_empty())
            };
            if closing && !armed {
                armed = true;
                arm_close_deadline(&state, &stream, close_after);
            }
            if batch.is_empty() {
                if flushed {
                    // The close frame is out: send FIN; the reader waits for the peer's end.
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                    return;
                }
                if batch.capacity() > IDLE_IOVS {
                    batch = Vec::new();
                }
                break;
            }
            // Keep an eye on the queue while the write is in flight: a close queued behind a
            // peer that stopped reading starts its deadline now, not once the write returns.
            let write = write_vectored(&stream, std::mem::take(&mut batch));
            tokio::pin!(write);
            let (res, back) = loop {
                tokio::select! {
                    biased;
                    r = &mut write => break r,
                    _ = notify.notified() => {
                        if is_aborted(&state, slot, gen) {
                            // The write is stuck behind a peer that does not read.
                            reset(&stream);
                        } else if !armed && is_closing(&state, slot, gen) {
                            armed = true;
                            arm_close_deadline(&state, &stream, close_after);
                        }
                    }
                }
            };
            if res.is_err() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            batch = back;
            progress(&state, slot, gen, written);
        }
    }
}

/// Whether the connection is to be reset without a close handshake.
fn is_aborted(state: &Rc<RefCell<ShardState>>, slot: u32, gen: u32) -> bool {
    state
        .borrow_mut()
        .get(slot, gen)
        .is_some_and(|c| c.out.abort)
}

/// Counts `bytes` written and wakes a client reader that waits for its peer to read.
fn progress(state: &Rc<RefCell<ShardState>>, slot: u32, gen: u32, bytes: usize) {
    let mut st = state.borrow_mut();
    if let Some(c) = st.get(slot, gen) {
        c.out.written += bytes as u64;
        if let ConnKind::Client(cc) = &c.kind {
            cc.resume.notify_one();
        }
    }
}

/// Whether the connection is gone or has a close frame queued.
fn is_closing(state: &Rc<RefCell<ShardState>>, slot: u32, gen: u32) -> bool {
    state
        .borrow_mut()
        .get(slot, gen)
        .is_none_or(|c| c.out.closing)
}

/// Starts the close-handshake deadline: if the socket is still open when it expires, the
/// connection is reset (SO_LINGER 0, so the kernel frees its buffers at once) and shut down,
/// which ends the reader and any write stuck on the peer. Holds only a weak reference, so a
/// connection that ends in time closes its socket at once.
fn arm_close_deadline(state: &Rc<RefCell<ShardState>>, stream: &Rc<TcpStream>, after: Duration) {
    let weak: Weak<TcpStream> = Rc::downgrade(stream);
    let state = state.clone();
    tokio_uring::spawn(async move {
        tokio::time::sleep(after).await;
        let Some(stream) = weak.upgrade() else {
            return;
        };
        state
            .borrow()
            .metrics()
            .inc(Counter::CloseHandshakeTimeouts);
        reset(&stream);
    });
}

/// Drops a connection: RST instead of FIN (no lingering send queue), then wakes every
/// pending operation on it.
pub fn reset(stream: &TcpStream) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the descriptor belongs to `stream`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Writes every byte of `chunks`, resubmitting what a short write left.
pub async fn write_all_vectored(stream: &TcpStream, chunks: Vec<Bytes>) -> std::io::Result<()> {
    write_vectored(stream, chunks).await.0
}

/// Writes every byte of `chunks` and hands the list back, emptied (on success) with its
/// capacity, for the next turn.
///
/// The bytes first go out with a non-blocking `sendmsg` on the spot: a socket with room in
/// its send buffer (nearly always) takes them at once, with no io_uring operation, no
/// completion to reap and no extra turn of the shard loop to reap it. Only what the kernel
/// does not take then goes through io_uring's `writev`, which waits for room.
pub async fn write_vectored(
    stream: &TcpStream,
    mut chunks: Vec<Bytes>,
) -> (std::io::Result<()>, Vec<Bytes>) {
    if let Err(e) = send_now(stream, &mut chunks) {
        return (Err(e), chunks);
    }
    while !chunks.is_empty() {
        let (res, back) = stream.writev(chunks).await;
        chunks = back;
        match res {
            Ok(0) => return (Err(std::io::ErrorKind::WriteZero.into()), chunks),
            Ok(n) => consume(&mut chunks, n),
            Err(e) => return (Err(e), chunks),
        }
    }
    (Ok(()), chunks)
}

/// iovecs per non-blocking `sendmsg` (on the stack).
const SEND_IOV: usize = 64;

/// Sends what the socket takes without waiting and removes it from `chunks`. Stops at the
/// first short write or `EAGAIN`, leaving the rest; other errors are returned.
fn send_now(stream: &TcpStream, chunks: &mut Vec<Bytes>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    while !chunks.is_empty() {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; SEND_IOV];
        let mut total = 0;
        let mut n_iov = 0;
        for (v, c) in iov.iter_mut().zip(chunks.iter()) {
            v.iov_base = c.as_ptr() as *mut libc::c_void;
            v.iov_len = c.len();
            total += c.len();
            n_iov += 1;
        }
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n_iov as _;
        // SAFETY: every iovec points into a `Bytes` of `chunks`, alive and unchanged for the
        // whole call; `fd` is the stream's open descriptor.
        let sent = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if sent < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(()),
                _ => Err(e),
            };
        }
        let sent = sent as usize;
        consume(chunks, sent);
        if sent < total {
            return Ok(());
        }
    }
    Ok(())
}

/// Drops the first `n` bytes of `chunks`: whole chunks, then a slice of a partly sent one.
fn consume(chunks: &mut Vec<Bytes>, mut n: usize) {
    let mut done = 0;
    while done < chunks.len() && n >= chunks[done].len() {
        n -= chunks[done].len();
        done += 1;
    }
    chunks.drain(..done);
    if n > 0 {
        let first = chunks[0].slice(n..);
        chunks[0] = first;
    }
}
