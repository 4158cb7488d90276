//! Per-client-WebSocket tunnel state (SPEC §2.4–§2.6): the message index, attachment to a
//! runner, the pending window of hibernatable sockets, backpressure (one parked message),
//! the global pending cap, the ack timeout and replay.
//!
//! Sans-IO: events in (client message, runner open/ack/detach/attach, `now`), decisions out
//! (send this index, hold, pause reading, close with this reason). It must never reset the
//! index, never reorder or drop an admitted message before it is acknowledged, never forward
//! a message while older ones are parked, and never panic on anything a client or runner sends.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::index::{index_of, OPEN_INDEX};
use super::window::{Admission, Budget, Entry, IgnoredAck, PendingWindow, WindowLimits};

/// A WebSocket close code and its `{group}.{code}` reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseReason {
    /// RFC 6455 close code.
    pub code: u16,
    /// `{group}.{code}` reason string.
    pub reason: &'static str,
}

impl CloseReason {
    /// The runner did not acknowledge the oldest pending message within the ack timeout.
    pub const NOT_ACKED: CloseReason = CloseReason {
        code: 1011,
        reason: "guard.websocket_message_not_acked",
    };
    /// The process-wide pending-bytes cap would be exceeded.
    pub const PENDING_LIMIT: CloseReason = CloseReason {
        code: 1011,
        reason: "guard.websocket_pending_limit_reached",
    };
    /// The runner connection dropped under a socket that cannot hibernate.
    pub const RUNNER_DISCONNECTED: CloseReason = CloseReason {
        code: 1011,
        reason: "ws.runner_disconnected",
    };
    /// The actor stopped under a socket that cannot hibernate.
    pub const ACTOR_STOPPED: CloseReason = CloseReason {
        code: 1000,
        reason: "actor.stopped",
    };
    /// Normal close (runner close without a code).
    pub const CLOSED: CloseReason = CloseReason {
        code: 1000,
        reason: "ws.closed",
    };
    /// The runner did not answer `WebSocketOpen` in time.
    pub const OPEN_TIMEOUT: CloseReason = CloseReason {
        code: 1011,
        reason: "guard.websocket_open_timeout",
    };
    /// A hibernating socket outlived its limits.
    pub const HIBERNATION_TIMEOUT: CloseReason = CloseReason {
        code: 1011,
        reason: "guard.hibernation_timeout",
    };
}

/// Where the socket stands with respect to its runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketState {
    /// `WebSocketOpen` sent, runner's answer awaited; the client upgrade is not complete.
    Opening,
    /// Attached to a live runner connection with the actor running.
    Open,
    /// Hibernatable socket whose runner is gone or whose actor sleeps; messages are held.
    Detached,
    /// Finished; everything is freed.
    Closed,
}

/// Why the runner side went away (selects the close reason of a non-hibernatable socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachCause {
    /// The runner connection dropped (→ 1011 `ws.runner_disconnected`).
    RunnerLost,
    /// The actor stopped or went to sleep (→ 1000 `actor.stopped`).
    ActorStopped,
    /// The runner sent `WebSocketClose { hibernate: true }` (→ 1000 `ws.closed` if the socket
    /// cannot hibernate; the shell may substitute the runner's own code and reason).
    HibernateRequested,
}

impl DetachCause {
    /// How a socket that cannot hibernate is closed for this cause.
    pub fn close_reason(self) -> CloseReason {
        match self {
            DetachCause::RunnerLost => CloseReason::RUNNER_DISCONNECTED,
            DetachCause::ActorStopped => CloseReason::ACTOR_STOPPED,
            DetachCause::HibernateRequested => CloseReason::CLOSED,
        }
    }
}

/// What to do with a client data message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    /// Forward to the runner as `WebSocketMessage { index, data, binary }`.
    Send {
        /// Tunnel message index.
        index: u16,
        /// Payload (a handle shared with the pending window, not a copy).
        data: Bytes,
        /// `false` for text.
        binary: bool,
    },
    /// Detached: the message joined the pending window under `index` and will be sent by the
    /// next replay. The shell should wake the actor.
    Held {
        /// Tunnel message index it will be replayed with.
        index: u16,
    },
    /// The window is full: the message is parked inside the socket. The shell must stop
    /// reading this client until an ack returns `resume_reading`.
    Paused,
    /// The socket is closed and freed; close the client with this reason.
    Close(CloseReason),
    /// The socket cannot take a message now (still opening, or already paused): nothing was
    /// consumed and no index taken; the shell keeps the message and offers it again later.
    /// Only a shell that ignores `Paused` or reads before the open completes sees this.
    NotReady {
        /// The payload, handed back.
        data: Bytes,
        /// `false` for text.
        binary: bool,
    },
    /// The socket is closed; the message is discarded.
    Dropped,
}

/// What an ack from the runner did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AckResult {
    /// Messages removed from the pending window.
    pub freed_messages: usize,
    /// Payload bytes removed from the pending window and the budget.
    pub freed_bytes: usize,
    /// `Some` when the ack was ignored (count it).
    pub ignored: Option<IgnoredAck>,
    /// The parked message, when the freed room admitted it (or the global cap refused it):
    /// [`ClientMsg::Send`], [`ClientMsg::Held`] or [`ClientMsg::Close`].
    pub resumed: Option<ClientMsg>,
    /// The socket is no longer paused: the shell resumes reading the client.
    pub resume_reading: bool,
}

/// Outcome of the runner side going away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detach {
    /// Hibernatable: the client socket stays open and keeps its window.
    Keep,
    /// The socket is closed and freed; close the client with this reason.
    Close(CloseReason),
    /// The socket was already closed; nothing to do.
    AlreadyClosed,
}

/// The pending messages to resend after a runner reattaches, oldest first, with their
/// original indices. Borrowing iterator: no allocation.
#[derive(Debug, Clone)]
pub struct Replay<'a> {
    inner: Option<std::collections::vec_deque::Iter<'a, Entry>>,
}

impl<'a> Iterator for Replay<'a> {
    type Item = &'a Entry;

    #[inline]
    fn next(&mut self) -> Option<&'a Entry> {
        self.inner.as_mut()?.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner
            .as_ref()
            .map_or((0, Some(0)), |it| it.size_hint())
    }
}

impl ExactSizeIterator for Replay<'_> {}

#[derive(Debug, Clone)]
struct Parked {
    data: Bytes,
    binary: bool,
}

/// Tunnel state of one client WebSocket.
#[derive(Debug, Clone)]
pub struct TunnelSocket {
    limits: WindowLimits,
    /// Sequence of the next `WebSocketMessage` (the wire index is its low 16 bits). Open took
    /// sequence 0. Never reset. Equals `window.next_seq()` when there is a window.
    next_seq: u64,
    state: SocketState,
    hibernatable: bool,
    /// Present only for hibernatable sockets.
    window: Option<PendingWindow>,
    /// The client message that did not fit; at most one (the shell stops reading).
    parked: Option<Parked>,
}

impl TunnelSocket {
    /// A socket about to send `WebSocketOpen` (index 0).
    pub fn new(limits: WindowLimits) -> Self {
        Self::starting_at(limits, u64::from(OPEN_INDEX) + 1)
    }

    /// A socket whose first `WebSocketMessage` gets sequence `next_seq` instead of 1. Only
    /// for tests, fuzzing and simulation (to start near the 16-bit wrap).
    #[doc(hidden)]
    pub fn starting_at(limits: WindowLimits, next_seq: u64) -> Self {
        TunnelSocket {
            limits: limits.sanitized(),
            next_seq,
            state: SocketState::Opening,
            hibernatable: false,
            window: None,
            parked: None,
        }
    }

    /// The index of `WebSocketOpen`: always 0.
    pub fn take_open_index(&self) -> u16 {
        OPEN_INDEX
    }

    /// Current state.
    pub fn state(&self) -> SocketState {
        self.state
    }

    /// Whether the runner answered `canHibernate: true`.
    pub fn is_hibernatable(&self) -> bool {
        self.hibernatable
    }

    /// Index the next client message will get.
    pub fn next_index(&self) -> u16 {
        index_of(self.next_seq)
    }

    /// Whether a message is parked (the shell is not reading this client).
    pub fn is_paused(&self) -> bool {
        self.parked.is_some()
    }

    /// Number of pending (unacknowledged) messages.
    pub fn pending_len(&self) -> usize {
        self.window.as_ref().map_or(0, PendingWindow::len)
    }

    /// Pending payload bytes (excluding the parked message, which is not pending yet).
    pub fn pending_bytes(&self) -> usize {
        self.window.as_ref().map_or(0, PendingWindow::bytes)
    }

    /// The pending messages, oldest first (empty when there is no window).
    pub fn pending(&self) -> Replay<'_> {
        Replay {
            inner: self.window.as_ref().map(PendingWindow::iter),
        }
    }

    /// The runner answered `WebSocketOpen { canHibernate }`: the client upgrade may complete.
    /// Returns `false` (and changes nothing) unless the socket was opening.
    pub fn on_runner_open(&mut self, can_hibernate: bool) -> bool {
        if self.state != SocketState::Opening {
            return false;
        }
        self.state = SocketState::Open;
        self.hibernatable = can_hibernate;
        if can_hibernate {
            self.window = Some(PendingWindow::new(self.limits, self.next_seq));
        }
        true
    }

    /// A complete client data message (text frames: `binary == false`).
    pub fn on_client_message(
        &mut self,
        data: Bytes,
        binary: bool,
        now: Instant,
        budget: &mut Budget,
    ) -> ClientMsg {
        match self.state {
            SocketState::Closed => return ClientMsg::Dropped,
            SocketState::Opening => return ClientMsg::NotReady { data, binary },
            SocketState::Open | SocketState::Detached => {}
        }
        if self.parked.is_some() {
            return ClientMsg::NotReady { data, binary };
        }
        if self.window.is_none() {
            // Not hibernatable: no window, nothing to replay; the index still advances.
            let index = index_of(self.next_seq);
            self.next_seq += 1;
            return ClientMsg::Send {
                index,
                data,
                binary,
            };
        }
        match self.admit(data, binary, now, budget) {
            Ok(msg) => msg,
            Err(parked) => {
                self.parked = Some(parked);
                ClientMsg::Paused
            }
        }
    }

    /// Pushes into the window; `Err` hands the message back when the window is full.
    fn admit(
        &mut self,
        data: Bytes,
        binary: bool,
        now: Instant,
        budget: &mut Budget,
    ) -> Result<ClientMsg, Parked> {
        let attached = self.state == SocketState::Open;
        let Some(window) = self.window.as_mut() else {
            return Ok(ClientMsg::Dropped);
        };
        match window.admission(data.len(), budget) {
            Admission::Fits => {}
            Admission::WindowFull => return Err(Parked { data, binary }),
            Admission::OverGlobalCap => {
                self.close(budget);
                return Ok(ClientMsg::Close(CloseReason::PENDING_LIMIT));
            }
        }
        let sent = if attached { Some(data.clone()) } else { None };
        match window.push(data, binary, now, budget) {
            Ok(index) => {
                self.next_seq = window.next_seq();
                Ok(match sent {
                    Some(data) => ClientMsg::Send {
                        index,
                        data,
                        binary,
                    },
                    None => ClientMsg::Held { index },
                })
            }
            // Unreachable after a `Fits` admission; treated as backpressure to stay total.
            Err(r) => Err(Parked {
                data: r.data,
                binary,
            }),
        }
    }

    /// `WebSocketMessageAck { index }` from the runner. Frees acknowledged messages and, when
    /// room frees up, admits the parked message.
    pub fn on_ack(&mut self, index: u16, now: Instant, budget: &mut Budget) -> AckResult {
        let live = matches!(self.state, SocketState::Open | SocketState::Detached);
        let Some(window) = self.window.as_mut().filter(|_| live) else {
            return AckResult {
                ignored: Some(IgnoredAck::NoWindow),
                ..AckResult::default()
            };
        };
        let a = window.ack(index, budget);
        let mut result = AckResult {
            freed_messages: a.freed_messages,
            freed_bytes: a.freed_bytes,
            ignored: a.ignored,
            resumed: None,
            resume_reading: false,
        };
        if let Some(p) = self.parked.take() {
            match self.admit(p.data, p.binary, now, budget) {
                Ok(msg) => {
                    result.resume_reading = !matches!(msg, ClientMsg::Close(_));
                    result.resumed = Some(msg);
                }
                Err(p) => self.parked = Some(p),
            }
        }
        result
    }

    /// The runner connection dropped, the actor stopped, or the runner asked to hibernate.
    /// Hibernatable sockets stay open and keep their window; others are closed and freed.
    pub fn on_runner_detached(&mut self, cause: DetachCause, budget: &mut Budget) -> Detach {
        match self.state {
            SocketState::Closed => Detach::AlreadyClosed,
            SocketState::Detached => Detach::Keep,
            SocketState::Open if self.hibernatable => {
                self.state = SocketState::Detached;
                if let Some(w) = self.window.as_mut() {
                    w.shrink_if_idle();
                }
                Detach::Keep
            }
            SocketState::Open | SocketState::Opening => {
                self.close(budget);
                Detach::Close(cause.close_reason())
            }
        }
    }

    /// A runner hosts the actor again (same runner reconnected, or the actor restarted after
    /// hibernation). Returns every pending message, oldest first, with its original index;
    /// the shell sends them before anything newer. Their ack deadlines restart at `now`
    /// (see [`PendingWindow::mark_resent`]). The parked message stays parked until an ack
    /// frees room. Also valid while already attached (resends the window; the runner drops
    /// duplicates). Opening, closed and non-hibernatable sockets replay nothing.
    pub fn on_runner_attached(&mut self, now: Instant) -> Replay<'_> {
        if matches!(self.state, SocketState::Detached | SocketState::Open) && self.hibernatable {
            self.state = SocketState::Open;
            if let Some(w) = self.window.as_mut() {
                w.mark_resent(now);
                return Replay {
                    inner: Some(w.iter()),
                };
            }
        }
        Replay { inner: None }
    }

    /// When the oldest pending message's ack deadline passes (attached sockets only).
    pub fn ack_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.state != SocketState::Open {
            return None;
        }
        let oldest = self.window.as_ref()?.oldest_sent_at()?;
        oldest.checked_add(timeout)
    }

    /// `true` when attached and the oldest pending message is older than `timeout` at `now`:
    /// the runner is not making progress. Live sockets (nothing pending, or the oldest message
    /// younger than or exactly `timeout`), detached and non-hibernatable sockets are never
    /// expired.
    pub fn ack_expired(&self, now: Instant, timeout: Duration) -> bool {
        if self.state != SocketState::Open {
            return false;
        }
        match self.window.as_ref().and_then(PendingWindow::oldest_sent_at) {
            Some(oldest) => now.saturating_duration_since(oldest) > timeout,
            None => false,
        }
    }

    /// [`ack_expired`](Self::ack_expired), and if so closes the socket and returns
    /// [`CloseReason::NOT_ACKED`].
    pub fn expire_if_not_acked(
        &mut self,
        now: Instant,
        timeout: Duration,
        budget: &mut Budget,
    ) -> Option<CloseReason> {
        if self.ack_expired(now, timeout) {
            self.close(budget);
            Some(CloseReason::NOT_ACKED)
        } else {
            None
        }
    }

    /// Closes the socket and frees everything (pending bytes go back to the budget). The
    /// index is kept. Idempotent.
    pub fn close(&mut self, budget: &mut Budget) {
        self.state = SocketState::Closed;
        self.parked = None;
        if let Some(w) = self.window.as_mut() {
            w.clear(budget);
        }
    }

    /// Checks the socket's invariants against the budget of its shard (`budget.used` must
    /// cover this socket's pending bytes and stay under the cap).
    pub fn check_invariants(&self, budget: &Budget) -> Result<(), String> {
        if let Some(w) = &self.window {
            w.check_invariants()?;
            if w.next_seq() != self.next_seq {
                return Err(format!(
                    "window next seq {} != socket next seq {}",
                    w.next_seq(),
                    self.next_seq
                ));
            }
            if !self.hibernatable {
                return Err("window on a non-hibernatable socket".into());
            }
        } else if self.hibernatable {
            return Err("hibernatable socket without window".into());
        }
        if self.next_seq == 0 {
            return Err("message sequence overlaps the open index".into());
        }
        if budget.used < self.pending_bytes() as u64 {
            return Err(format!(
                "budget used {} < pending bytes {}",
                budget.used,
                self.pending_bytes()
            ));
        }
        if budget.used > budget.cap {
            return Err(format!(
                "budget used {} over cap {}",
                budget.used, budget.cap
            ));
        }
        match self.state {
            SocketState::Closed | SocketState::Opening => {
                if self.parked.is_some() || self.pending_len() != 0 {
                    return Err(format!("{:?} socket holds messages", self.state));
                }
            }
            SocketState::Detached if !self.hibernatable => {
                return Err("detached socket that cannot hibernate".into());
            }
            SocketState::Open | SocketState::Detached => {}
        }
        if let (Some(p), Some(w)) = (&self.parked, &self.window) {
            if w.admission(p.data.len(), &Budget::new(u64::MAX)) != Admission::WindowFull {
                return Err("parked message would fit the window".into());
            }
        } else if self.parked.is_some() {
            return Err("parked message without a window".into());
        }
        Ok(())
    }
}
