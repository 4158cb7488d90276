//! The plain values of the actor API: what names a tunnelled request ([`RequestKey`]), what
//! the gateway tells an actor (its start, a WebSocket open, an HTTP request) and what the
//! actor answers, and how it acknowledges messages ([`AckPolicy`]).
//!
//! Data only, at the bottom of the runner library: it must never hold runner state nor use
//! another runner module.

use bytes::Bytes;

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
    /// Only when the actor calls [`ActorCx::ack`](super::ActorCx::ack) /
    /// [`ActorHandle::ack`](super::ActorHandle::ack) (after it persisted).
    Manual,
}

/// An HTTP request tunnelled to an actor: the whole body, or (for an actor whose
/// [`Actor::streams_requests`](super::Actor::streams_requests) is true and a request the
/// gateway streams) the body sent so far, the rest coming to
/// [`Actor::on_http_body`](super::Actor::on_http_body).
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub key: RequestKey,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// An actor's HTTP response: sent whole as one `ResponseStart { stream: false }`, or, made
/// with [`HttpResponse::stream`], as the head (`ResponseStart { stream: true }`, with `body`
/// as the first piece if any) whose body the actor then sends with
/// [`ActorCx::http_chunk`](super::ActorCx::http_chunk) /
/// [`ActorHandle::http_chunk`](super::ActorHandle::http_chunk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub stream: bool,
}

impl HttpResponse {
    /// A response with a status, no headers and a body.
    pub fn new(status: u16, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
            stream: false,
        }
    }

    /// The head of a streamed response; its body follows with `http_chunk` (the last one
    /// with `finish`). Without a `content-length` header the client gets it chunked.
    pub fn stream(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            stream: true,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}
