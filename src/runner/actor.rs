//! The actor side of the runner library: the [`Actor`] trait a user implements, the
//! [`ActorFactory`] that creates actors on `CommandStartActor`, the synchronous context
//! ([`ActorCx`]) handed to every callback, and the [`ActorHandle`] for work done elsewhere
//! (another task acking after it persisted, a timer that puts the actor to sleep).
//!
//! Callbacks run on the runner's task and must not block: long work belongs in a spawned task
//! that reports back through an [`ActorHandle`]. Nothing here touches a socket.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedSender;

use super::core::{ActorMeta, Ctl, Io};

/// Identifies one tunnelled request (HTTP request or WebSocket) on the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    /// The gateway that owns the client connection.
    pub gateway_id: [u8; 4],
    /// The request, unique among that gateway's in-flight requests.
    pub request_id: [u8; 4],
}

impl std::fmt::Display for RequestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.gateway_id.iter().chain(self.request_id.iter()) {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What the gateway told the runner about an actor it starts.
#[derive(Debug, Clone)]
pub struct ActorInfo {
    pub actor_id: String,
    pub generation: u32,
    pub name: String,
    pub key: Option<String>,
    pub create_ts: i64,
    pub input: Option<Bytes>,
}

/// A WebSocket the gateway opens to an actor.
#[derive(Debug)]
pub struct WsOpen<'a> {
    pub key: RequestKey,
    /// The path the client asked for (as the actor sees it).
    pub path: &'a str,
    /// The client's upgrade request headers (unique keys).
    pub headers: &'a [(String, String)],
}

/// The actor's answer to a WebSocket open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsOpenReply {
    /// Accept the socket; `can_hibernate` tells the gateway to keep it open (and keep the
    /// unacknowledged messages) while the actor sleeps or the runner is away.
    Accept { can_hibernate: bool },
    /// Refuse the socket; the gateway refuses the client's upgrade.
    Reject { code: u16, reason: String },
}

/// The actor's answer when a hibernating socket is handed back on start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsRestore {
    /// Take the socket back. `last_index` is the index of the last gateway message the actor
    /// processed (what it persisted); older replays are dropped as duplicates. `None` accepts
    /// the first message that arrives as the baseline.
    Resume { last_index: Option<u16> },
    /// The actor does not know this socket: close it (1000 `ws.meta_not_found_during_restore`).
    Close,
}

/// When the gateway's WebSocket messages are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckPolicy {
    /// Right after `on_websocket_message` returns (acks are coalesced per flush).
    Immediate,
    /// Only when the actor calls [`ActorCx::ack`] / [`ActorHandle::ack`] (after it persisted).
    Manual,
}

/// An HTTP request tunnelled to an actor (the whole body, streamed requests are collected).
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub key: RequestKey,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// An actor's HTTP response (sent as one non-streaming `ResponseStart`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl HttpResponse {
    /// A response with a status, no headers and a body.
    pub fn new(status: u16, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// An actor hosted by the runner. All callbacks run on the runner task; none may block.
pub trait Actor: Send + 'static {
    /// Called once after the actor was created and reported `Running`, before restored sockets.
    fn on_start(&mut self, _cx: &mut ActorCx<'_>) {}

    /// Called when the actor stops (command, runner lost, new runner id, shutdown), after its
    /// non-hibernatable sockets got `on_websocket_close` and before `Stopped` is reported.
    fn on_stop(&mut self, _cx: &mut ActorCx<'_>) {}

    /// How this actor acknowledges WebSocket messages (asked once, at start).
    fn ack_policy(&self) -> AckPolicy {
        AckPolicy::Immediate
    }

    /// A client WebSocket opens. Sending on `open.key` from here is allowed (the messages go
    /// out after the open answer).
    fn on_websocket_open(&mut self, cx: &mut ActorCx<'_>, open: &WsOpen<'_>) -> WsOpenReply;

    /// A hibernating socket is handed back by `CommandStartActor`. `remembered` is the last
    /// index this runner process delivered on it before, if it remembers one.
    fn on_websocket_restore(
        &mut self,
        _cx: &mut ActorCx<'_>,
        _key: RequestKey,
        remembered: Option<u16>,
    ) -> WsRestore {
        WsRestore::Resume {
            last_index: remembered,
        }
    }

    /// A message in sequence (duplicates and gaps never reach the actor).
    fn on_websocket_message(
        &mut self,
        cx: &mut ActorCx<'_>,
        key: RequestKey,
        index: u16,
        data: Bytes,
        binary: bool,
    );

    /// The socket is gone (client close, gap, actor stop, runner disconnect). Not called for
    /// closes the actor asked for itself.
    fn on_websocket_close(
        &mut self,
        _cx: &mut ActorCx<'_>,
        _key: RequestKey,
        _code: Option<u16>,
        _reason: Option<&str>,
    ) {
    }

    /// An HTTP request. The default answers 501.
    fn on_http_request(&mut self, _cx: &mut ActorCx<'_>, _req: HttpRequest) -> HttpResponse {
        HttpResponse::new(501, "Not Implemented")
    }
}

/// Creates actors when the gateway starts them.
pub trait ActorFactory: Send + 'static {
    fn create(&mut self, info: &ActorInfo) -> Box<dyn Actor>;
}

impl<F> ActorFactory for F
where
    F: FnMut(&ActorInfo) -> Box<dyn Actor> + Send + 'static,
{
    fn create(&mut self, info: &ActorInfo) -> Box<dyn Actor> {
        self(info)
    }
}

/// The context of one callback: acts immediately on the runner's state (no channel hop).
pub struct ActorCx<'a> {
    pub(crate) io: &'a mut Io,
    pub(crate) meta: &'a mut ActorMeta,
}

impl ActorCx<'_> {
    /// This actor's id.
    pub fn actor_id(&self) -> &str {
        &self.meta.actor_id
    }

    /// This actor's generation.
    pub fn generation(&self) -> u32 {
        self.meta.generation
    }

    /// Sends a WebSocket message to the client of `key`. Returns false when the socket is not
    /// (or no longer) this actor's.
    pub fn send(&mut self, key: RequestKey, data: impl Into<Bytes>, binary: bool) -> bool {
        self.io.ws_send(self.meta, key, data.into(), binary)
    }

    /// Closes the client's socket (`hibernate: false`). No `on_websocket_close` follows.
    pub fn close(&mut self, key: RequestKey, code: Option<u16>, reason: Option<&str>) -> bool {
        self.io.ws_close(self.meta, key, code, reason, false)
    }

    /// Hands a hibernatable socket to the gateway to hold while the actor does not need it
    /// (`WebSocketClose { hibernate: true }`). Returns false for non-hibernatable sockets.
    pub fn hibernate(&mut self, key: RequestKey) -> bool {
        self.io.ws_close(self.meta, key, None, None, true)
    }

    /// Acknowledges every gateway message up to `index` on `key` (cumulative).
    pub fn ack(&mut self, key: RequestKey, index: u16) -> bool {
        self.io.ws_ack(self.meta, key, index)
    }

    /// Asks the gateway to put this actor to sleep (`EventActorIntent { Sleep }`).
    pub fn sleep(&mut self) {
        self.io.intent(self.meta, false);
    }

    /// Asks the gateway to stop (destroy) this actor (`EventActorIntent { Stop }`).
    pub fn stop(&mut self) {
        self.io.intent(self.meta, true);
    }

    /// Sets (or clears) the actor's alarm, a Unix timestamp in milliseconds.
    pub fn set_alarm(&mut self, alarm_ts: Option<i64>) {
        self.io.set_alarm(self.meta, alarm_ts);
    }

    /// A handle usable from other tasks.
    pub fn handle(&self) -> ActorHandle {
        ActorHandle {
            ctl: self.io.ctl_tx.clone(),
            actor_id: self.meta.actor_id.clone(),
            generation: self.meta.generation,
        }
    }
}

/// Operations a handle asks the runner task to perform on behalf of one actor generation.
#[derive(Debug)]
pub(crate) enum ActorOp {
    Send {
        key: RequestKey,
        data: Bytes,
        binary: bool,
    },
    Close {
        key: RequestKey,
        code: Option<u16>,
        reason: Option<String>,
    },
    Hibernate(RequestKey),
    Ack(RequestKey, u16),
    Sleep,
    Stop,
    SetAlarm(Option<i64>),
}

/// A cloneable, `Send` handle to one actor generation. Operations are applied in order on the
/// runner task; they are ignored once that generation has stopped.
#[derive(Debug, Clone)]
pub struct ActorHandle {
    ctl: UnboundedSender<Ctl>,
    actor_id: Arc<str>,
    generation: u32,
}

impl ActorHandle {
    /// This actor's id.
    pub fn actor_id(&self) -> &str {
        &self.actor_id
    }

    /// This actor's generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    fn op(&self, op: ActorOp) -> bool {
        self.ctl
            .send(Ctl::Actor {
                actor_id: self.actor_id.clone(),
                generation: self.generation,
                op,
            })
            .is_ok()
    }

    /// See [`ActorCx::send`]. Returns false only when the runner has gone.
    pub fn send(&self, key: RequestKey, data: impl Into<Bytes>, binary: bool) -> bool {
        self.op(ActorOp::Send {
            key,
            data: data.into(),
            binary,
        })
    }

    /// See [`ActorCx::close`].
    pub fn close(&self, key: RequestKey, code: Option<u16>, reason: Option<String>) -> bool {
        self.op(ActorOp::Close { key, code, reason })
    }

    /// See [`ActorCx::hibernate`].
    pub fn hibernate(&self, key: RequestKey) -> bool {
        self.op(ActorOp::Hibernate(key))
    }

    /// See [`ActorCx::ack`].
    pub fn ack(&self, key: RequestKey, index: u16) -> bool {
        self.op(ActorOp::Ack(key, index))
    }

    /// See [`ActorCx::sleep`].
    pub fn sleep(&self) -> bool {
        self.op(ActorOp::Sleep)
    }

    /// See [`ActorCx::stop`].
    pub fn stop(&self) -> bool {
        self.op(ActorOp::Stop)
    }

    /// See [`ActorCx::set_alarm`].
    pub fn set_alarm(&self, alarm_ts: Option<i64>) -> bool {
        self.op(ActorOp::SetAlarm(alarm_ts))
    }
}
