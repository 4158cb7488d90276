//! What waits to be written on one connection ([`OutQueue`]) and the chunk lists that fill
//! it ([`Frames`]). The shell's writer takes a whole batch per turn (one vectored write).
//!
//! Never copies a payload: chunks are `Bytes` handles.

use crate::ws::frame::{encode_header, OpCode};
use bytes::Bytes;
use std::collections::VecDeque;

/// Chunks bound for one connection: the three of a tunnelled message inline (the hot path,
/// no allocation), or any list (control-plane and rare messages).
pub enum Frames {
    Three([Bytes; 3]),
    List(Vec<Bytes>),
}

impl From<[Bytes; 3]> for Frames {
    fn from(f: [Bytes; 3]) -> Frames {
        Frames::Three(f)
    }
}

impl From<[Bytes; 2]> for Frames {
    fn from([a, b]: [Bytes; 2]) -> Frames {
        // An empty chunk is never queued.
        Frames::Three([a, b, Bytes::new()])
    }
}

impl From<Vec<Bytes>> for Frames {
    fn from(f: Vec<Bytes>) -> Frames {
        Frames::List(f)
    }
}

/// The chunks of [`Frames`], in order.
pub enum FramesIter {
    Three(std::array::IntoIter<Bytes, 3>),
    List(std::vec::IntoIter<Bytes>),
}

impl Iterator for FramesIter {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        match self {
            FramesIter::Three(i) => i.next(),
            FramesIter::List(i) => i.next(),
        }
    }
}

impl IntoIterator for Frames {
    type Item = Bytes;
    type IntoIter = FramesIter;

    fn into_iter(self) -> FramesIter {
        match self {
            Frames::Three(f) => FramesIter::Three(f.into_iter()),
            Frames::List(f) => FramesIter::List(f.into_iter()),
        }
    }
}

/// Bytes waiting to be written on one socket, flushed by its writer with one vectored write
/// per turn.
#[derive(Default)]
pub struct OutQueue {
    pub(crate) chunks: VecDeque<Bytes>,
    pub(crate) bytes: usize,
    /// Bytes of the batch last handed to the writer whose write has not been reported
    /// ([`super::Gateway::written`]): out of the queue, but not taken by the kernel yet. A
    /// writer asks for its next batch only once its last write is over, so taking a batch
    /// replaces it.
    pub(crate) in_flight: usize,
    /// Set once a close frame is queued: the writer half-closes after flushing.
    pub(crate) closing: bool,
    /// The peer does not read, so no close handshake can happen: the connection is reset
    /// instead of flushed.
    pub(crate) abort: bool,
    /// Bytes the writer has handed to the kernel so far (progress of a slow reader).
    pub written: u64,
    /// The writer was told there is work and has not taken it yet (one wake per batch).
    pub(crate) signalled: bool,
    /// Bytes ever queued (the stream position of the queue's end).
    pub(crate) pushed: u64,
    /// Who waits to hear that the queue was written up to a position (a streamed request
    /// body's chunks, see [`Receipt`]), in position order.
    pub(crate) receipts: VecDeque<(u64, Receipt)>,
}

/// Asked for with a streamed request body's chunk: once the runner connection's writer has
/// written past it, the request (`id` on `shard`) hears that `bytes` more left the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub shard: u16,
    pub id: super::ConnId,
    pub bytes: u32,
}

impl OutQueue {
    fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() || self.closing {
            return;
        }
        self.bytes += chunk.len();
        self.pushed += chunk.len() as u64;
        self.chunks.push_back(chunk);
    }

    /// Queues chunks; returns whether the writer must be woken (first work since its last
    /// batch).
    pub(crate) fn push_all(&mut self, frames: impl IntoIterator<Item = Bytes>) -> bool {
        for f in frames {
            self.push(f);
        }
        !std::mem::replace(&mut self.signalled, true)
    }

    /// Queues a close frame; nothing is queued after it and the writer half-closes once it
    /// is flushed. Returns whether the writer must be woken.
    pub(crate) fn push_close(&mut self, code: u16, reason: &str) -> bool {
        let payload = crate::ws::writer::close_payload(code, reason);
        let h = encode_header(true, OpCode::Close, payload.len() as u64, None);
        let wake = self.push_all([Bytes::copy_from_slice(h.as_slice()), payload]);
        self.closing = true;
        wake
    }

    /// Bytes queued or in a write that has not completed: what the peer has not taken yet.
    pub fn unwritten(&self) -> usize {
        self.bytes + self.in_flight
    }

    /// More than `half` bytes not written yet (queued, or in the writer's unfinished write)
    /// and no close frame among them: the peer is behind on reading (see [`Pause::Unread`]).
    /// A batch the writer takes still counts until its write is reported, so only the
    /// writer's progress ends this (and wakes a reader that waits on it): a peer that reads
    /// nothing stays behind even once its whole queue sits in one stuck write.
    pub(crate) fn behind(&self, half: usize) -> bool {
        self.unwritten() > half && !self.closing
    }

    /// The writer reports `bytes` of its last batch written.
    pub(crate) fn wrote(&mut self, bytes: usize) {
        self.written += bytes as u64;
        self.in_flight = self.in_flight.saturating_sub(bytes);
    }

    /// Moves up to `max` queued chunks, oldest first, onto the end of `batch` (one vectored
    /// write) and returns their total length. The writer passes the same `batch` every turn,
    /// so once it has grown no turn allocates.
    pub fn take_batch(&mut self, batch: &mut Vec<Bytes>, max: usize) -> usize {
        self.signalled = false;
        let n = self.chunks.len().min(max);
        let mut bytes = 0;
        for c in self.chunks.drain(..n) {
            bytes += c.len();
            batch.push(c);
        }
        self.bytes -= bytes;
        self.in_flight = bytes;
        bytes
    }

    /// The queued chunks, oldest first.
    pub fn chunks(&self) -> impl Iterator<Item = &Bytes> {
        self.chunks.iter()
    }

    pub fn is_aborted(&self) -> bool {
        self.abort
    }

    pub fn queued_bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_closing(&self) -> bool {
        self.closing
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// Why a client socket's reader stops reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// The pending window is full: the runner has not acknowledged enough (woken by acks).
    Window,
    /// More than half of `client_outbound_bytes` is unwritten to the client (queued, or in a
    /// write the kernel has not taken yet): it does not read what it is sent, so its own
    /// input (an echo flood) must stall in its TCP window instead of costing the shard (woken
    /// as its writer makes progress).
    Unread,
}

/// What the writer of a connection does this turn.
#[derive(Debug, PartialEq, Eq)]
pub enum WriterTurn {
    /// The connection is gone: the writer ends.
    Gone,
    /// The peer does not read: reset the connection, no close handshake.
    Reset,
    /// Write the batch (`bytes` long).
    Write { bytes: usize },
    /// The close frame is out: half-close (FIN); the reader waits for the peer's end.
    Shutdown,
    /// Nothing queued: wait for the next wake.
    Idle,
}
