//! Cross-shard mailboxes: one crossbeam channel per shard plus an `eventfd` that wakes the
//! receiving shard's io_uring loop.
//!
//! A sender pushes, then writes the eventfd only if the receiver has not been signalled since
//! it last drained (one atomic swap), so a burst of messages costs one wake-up. The receiver
//! reads the eventfd with io_uring, clears the flag, then drains the whole channel. Never
//! blocks a sender: channels are unbounded here and bounded by the callers' own limits.

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The sending side of a shard's mailbox; cheap to clone, shared by every thread.
pub struct Mailbox<T> {
    tx: Sender<T>,
    signalled: Arc<AtomicBool>,
    efd: Arc<OwnedFd>,
}

impl<T> Clone for Mailbox<T> {
    fn clone(&self) -> Self {
        Mailbox {
            tx: self.tx.clone(),
            signalled: self.signalled.clone(),
            efd: self.efd.clone(),
        }
    }
}

/// The receiving side, owned by the shard thread.
pub struct Inbox<T> {
    rx: Receiver<T>,
    signalled: Arc<AtomicBool>,
    efd: Arc<OwnedFd>,
}

pub fn mailbox<T>() -> std::io::Result<(Mailbox<T>, Inbox<T>)> {
    // SAFETY: eventfd returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let efd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let (tx, rx) = crossbeam_channel::unbounded();
    let signalled = Arc::new(AtomicBool::new(false));
    Ok((
        Mailbox {
            tx,
            signalled: signalled.clone(),
            efd: efd.clone(),
        },
        Inbox { rx, signalled, efd },
    ))
}

impl<T> Mailbox<T> {
    /// Queues a message and wakes the receiver if it has not been woken yet.
    pub fn send(&self, msg: T) {
        if self.push(msg) {
            self.wake();
        }
    }

    /// Queues a message without waking the receiver: a sender with several messages for
    /// one receiver pushes them all, then calls [`Self::wake`] once. Returns false when the
    /// receiver is gone (the shard is shutting down).
    #[inline]
    pub fn push(&self, msg: T) -> bool {
        self.tx.send(msg).is_ok()
    }

    /// Wakes the receiver for what was pushed, unless it was woken and has not yet taken
    /// its messages (it takes everything pushed before this call).
    #[inline]
    pub fn wake(&self) {
        if !self.signalled.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe {
                libc::write(
                    self.efd.as_raw_fd(),
                    &one as *const u64 as *const libc::c_void,
                    8,
                );
            }
        }
    }
}

impl<T> Inbox<T> {
    /// Duplicates the eventfd so the shard can read it through io_uring.
    pub fn wake_fd(&self) -> std::io::Result<OwnedFd> {
        self.efd.try_clone()
    }

    /// Clears the wake flag; call after the eventfd read completed, before draining.
    pub fn rearm(&self) {
        self.signalled.store(false, Ordering::Release);
    }

    pub fn try_recv(&self) -> Option<T> {
        match self.rx.try_recv() {
            Ok(m) => Some(m),
            Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_signals_once_and_drains_all() {
        let (tx, rx) = mailbox::<u32>().unwrap();
        for i in 0..10 {
            tx.send(i);
        }
        let fd = rx.wake_fd().unwrap();
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64.
        let n = unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        assert_eq!(n, 8);
        assert_eq!(v, 1, "ten sends, one wake-up");
        rx.rearm();
        let got: Vec<u32> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        tx.send(99);
        let n = unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        assert_eq!((n, v), (8, 1), "a send after rearm wakes again");
    }
}
