//! The actor side of the runner library: the [`Actor`] trait a user implements, the
//! [`ActorFactory`] that creates actors on `CommandStartActor`, the synchronous context
//! ([`ActorCx`]) handed to every callback, and the [`ActorHandle`] for work done elsewhere
//! (another task acking after it persisted, a timer that puts the actor to sleep). The values
//! they exchange are in [`super::types`].
//!
//! Callbacks run on the runner's task and must not block: long work belongs in a spawned task
//! that reports back through an [`ActorHandle`]. Nothing here touches a socket.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc::UnboundedSender;

use super::ctl::{ActorOp, Ctl};
use super::io::{ActorMeta, Io};
use super::types::{
    AckPolicy, ActorInfo, HttpRequest, HttpResponse, RequestKey, WsOpen, WsOpenReply, WsRestore,
};

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

    /// An HTTP request. The default answers 501. A response made with
    /// [`HttpResponse::stream`] sends its head now and its body with
    /// [`ActorCx::http_chunk`] / [`ActorHandle::http_chunk`].
    fn on_http_request(&mut self, _cx: &mut ActorCx<'_>, _req: HttpRequest) -> HttpResponse {
        HttpResponse::new(501, "Not Implemented")
    }

    /// Whether this actor takes streamed request bodies piece by piece
    /// ([`Self::on_http_stream_start`], [`Self::on_http_body`]). When false (the default),
    /// a streamed body is collected (up to 20 MiB) and handed to [`Self::on_http_request`].
    fn streams_requests(&self) -> bool {
        false
    }

    /// A streamed request's head (`req.body`: what came with it). Answer now (`Some`), or
    /// from a later [`Self::on_http_body`].
    fn on_http_stream_start(
        &mut self,
        _cx: &mut ActorCx<'_>,
        _req: HttpRequest,
    ) -> Option<HttpResponse> {
        Some(HttpResponse::new(501, "Not Implemented"))
    }

    /// The next piece of a streamed request's body (`finish`: the last). Returns the answer
    /// if not given yet (later answers are ignored).
    fn on_http_body(
        &mut self,
        _cx: &mut ActorCx<'_>,
        _key: RequestKey,
        _data: Bytes,
        _finish: bool,
    ) -> Option<HttpResponse> {
        None
    }

    /// The gateway dropped a request (its client went away, was too slow, or a deadline
    /// passed): its streamed body and response end here; `http_chunk` on it returns false.
    fn on_http_abort(&mut self, _cx: &mut ActorCx<'_>, _key: RequestKey) {}
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

    /// Sends the next piece of a streamed response (`ResponseChunk`; `finish`: the last).
    /// Returns false when `key` has no streamed response of this actor open (never started,
    /// finished, or aborted by the gateway). Inside `on_http_request` for `key` itself the
    /// response has not started yet (it starts when the handler returns
    /// [`HttpResponse::stream`]), so this returns false there; send a first chunk from the
    /// handler with `cx.handle().http_chunk(..)`, which is queued behind the start.
    pub fn http_chunk(&mut self, key: RequestKey, data: impl Into<Bytes>, finish: bool) -> bool {
        self.io.http_chunk(self.meta, key, data.into(), finish)
    }

    /// Ends a streamed response without completing it (`ResponseAbort`): the client sees a
    /// truncated body.
    pub fn http_abort(&mut self, key: RequestKey) -> bool {
        self.io.http_abort(self.meta, key)
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

    /// See [`ActorCx::http_chunk`]. Returns false only when the runner has gone.
    pub fn http_chunk(&self, key: RequestKey, data: impl Into<Bytes>, finish: bool) -> bool {
        self.op(ActorOp::HttpChunk {
            key,
            data: data.into(),
            finish,
        })
    }

    /// See [`ActorCx::http_abort`].
    pub fn http_abort(&self, key: RequestKey) -> bool {
        self.op(ActorOp::HttpAbort(key))
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
