//! The writer half of a connection: waits for its [`OutQueue`] to fill, then flushes every
//! queued chunk with vectored writes (one `writev` submission per turn for as many chunks as
//! fit in an iovec array), so all frames produced for a socket in one turn of the shard loop
//! leave in one system call. The chunk list handed to `writev` comes back with its result
//! and is reused, so a turn allocates nothing of its own.
//!
//! It never decides what to write; it only moves bytes and half-closes the socket after a
//! queued close frame has been flushed. The close-handshake deadline is the core's: when it
//! passes, the core asks the shell to reset the connection, which also ends a write stuck
//! behind a peer that does not read.
//!
//! [`OutQueue`]: crate::gateway::OutQueue

use super::shell::Shard;
use crate::gateway::{ConnId, WriterTurn};
use bytes::Bytes;
use std::rc::Rc;
use std::time::Duration;
use tokio_uring::net::TcpStream;

/// Max iovecs per `writev` (the kernel's IOV_MAX).
pub const MAX_IOV: usize = 1024;

/// Chunk-list capacity a writer keeps while its queue is idle (2 KiB): a turn of up to this
/// many chunks (21 tunnelled messages) never allocates; a larger list is released once the
/// queue drains so an idle connection does not hold a burst's worth of memory.
const IDLE_IOVS: usize = 64;

/// Runs until the connection's entry is gone or the socket fails.
pub async fn writer_task(shard: Rc<Shard>, stream: Rc<TcpStream>, id: ConnId) {
    let Some((_, notify)) = shard.wakers(id) else {
        return;
    };
    // The chunk list handed to `writev`; it comes back with the result and is reused.
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        notify.notified().await;
        // Bytes of the last write, reported with the next turn.
        let mut written = 0;
        loop {
            batch.clear();
            match shard.call(|c| c.writer_next(id, written, &mut batch, MAX_IOV)) {
                // Gone, or reset by the core (the shell already reset the socket).
                WriterTurn::Gone | WriterTurn::Reset => return,
                WriterTurn::Shutdown => {
                    // The close frame is out: send FIN; the reader waits for the peer's end.
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                    return;
                }
                WriterTurn::Idle => {
                    if batch.capacity() > IDLE_IOVS {
                        batch = Vec::new();
                    }
                    break;
                }
                WriterTurn::Write { bytes } => {
                    let (res, back) = write_vectored(&stream, std::mem::take(&mut batch)).await;
                    if res.is_err() {
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    batch = back;
                    written = bytes;
                }
            }
        }
    }
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
