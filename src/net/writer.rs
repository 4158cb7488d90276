//! The writer half of a connection: waits for its [`OutQueue`] to fill, then flushes every
//! queued chunk with vectored writes (one `writev` submission per turn for as many chunks as
//! fit in an iovec array), so all frames produced for a socket in one turn of the shard loop
//! leave in one system call.
//!
//! It never decides what to write; it only moves bytes, and half-closes the socket after a
//! queued close frame has been flushed.

use crate::shard::ShardState;
use bytes::Bytes;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use tokio_uring::net::TcpStream;

/// Max iovecs per `writev` (the kernel's IOV_MAX).
const MAX_IOV: usize = 1024;

/// Runs until the connection's slab entry is gone or the socket fails.
pub async fn writer_task(
    state: Rc<RefCell<ShardState>>,
    stream: Rc<TcpStream>,
    slot: u32,
    gen: u32,
) {
    let notify = match state.borrow_mut().get(slot, gen) {
        Some(c) => c.out.notify.clone(),
        None => return,
    };
    loop {
        notify.notified().await;
        loop {
            let (batch, closing) = {
                let mut st = state.borrow_mut();
                let Some(conn) = st.get(slot, gen) else {
                    return;
                };
                let n = conn.out.chunks.len().min(MAX_IOV);
                let batch: Vec<Bytes> = conn.out.chunks.drain(..n).collect();
                let bytes: usize = batch.iter().map(|b| b.len()).sum();
                conn.out.bytes -= bytes;
                (batch, conn.out.closing && conn.out.chunks.is_empty())
            };
            if batch.is_empty() {
                if closing {
                    half_close(&state, &stream, slot, gen);
                    return;
                }
                break;
            }
            if write_all_vectored(&stream, batch).await.is_err() {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    }
}

/// After the close frame: send FIN, and end the reader if the peer does not finish the close
/// handshake within a short grace period.
fn half_close(state: &Rc<RefCell<ShardState>>, stream: &Rc<TcpStream>, slot: u32, gen: u32) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let stream = stream.clone();
    let state = state.clone();
    tokio_uring::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if state.borrow_mut().get(slot, gen).is_some() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    });
}

/// Writes every byte of `chunks`, resubmitting what a short write left.
pub async fn write_all_vectored(stream: &TcpStream, mut chunks: Vec<Bytes>) -> std::io::Result<()> {
    while !chunks.is_empty() {
        let (res, back) = stream.writev(chunks).await;
        chunks = back;
        let mut n = res?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        // Drop the chunks fully written; slice the first partially written one.
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
    Ok(())
}
