//! The connection table's entries: what a shard knows of each connection it holds (a runner
//! connection, a client WebSocket tunnelled to an actor, an HTTP request tunnelled to an
//! actor), and the phases each goes through.

use super::out::OutQueue;
use super::reason::Refusal;
use crate::http::response::BodyFraming;
use crate::protocol;
use crate::tunnel::TunnelSocket;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;

pub struct Conn {
    pub gen: u32,
    pub out: OutQueue,
    pub kind: ConnKind,
}

// Client sockets are nearly every entry of a busy table: boxing them would cost an
// allocation per socket to save a few bytes on the rare runner and request entries.
#[allow(clippy::large_enum_variant)]
pub enum ConnKind {
    Runner(RunnerConn),
    Client(ClientConn),
    Request(RequestConn),
}

/// A runner's connection (`/runners/connect`).
pub struct RunnerConn {
    pub last_pong: Instant,
    /// Set when the control plane attached another connection for the same runner: this
    /// one is stale, and its late tunnel messages must not touch the requests (SPEC §1.4).
    pub superseded: bool,
    /// The control plane's index of this runner, once attached.
    pub runner_idx: Option<u32>,
    /// The runner sent its `Init` (before it, only an `Init` is accepted).
    pub initialised: bool,
    /// Who connected (kept for the control plane's `RunnerInit`).
    pub peer: std::net::SocketAddr,
    pub namespace: String,
    pub runner_key: String,
}

/// Where a client WebSocket's open exchange stands (SPEC §2.4): the runner was sent
/// `WebSocketOpen` and the client's upgrade waits for its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenPhase {
    /// No answer yet (the open deadline runs).
    Waiting,
    /// The runner accepted; the client gets its 101.
    Accepted,
    /// Refused (by the runner, its loss, the actor's, or the deadline): the client gets this
    /// error response.
    Refused(Refusal),
    /// The 101 went out: the socket is open.
    Open,
}

/// A client WebSocket tunnelled to an actor.
pub struct ClientConn {
    pub actor_id: Arc<str>,
    pub runner_idx: u32,
    pub req: [u8; 4],
    pub socket: TunnelSocket,
    pub open: OpenPhase,
    /// The reader waits to be told it may read again (set when it asked and was paused).
    pub reader_parked: bool,
    /// The runner was told the socket closed (or owes nothing).
    pub runner_closed: bool,
    /// The actor generation this socket was last attached to.
    pub generation: u32,
    /// Set while the socket hibernates (SPEC §2.6).
    pub hibernation: Option<Hibernation>,
    /// The engine holds a hibernating-request record of this socket, refreshed at this time
    /// next. Every hibernatable socket has one from its open to its close, so whatever starts
    /// the actor lists it (a record made only when the socket hibernates could reach the
    /// control plane after the wake it races with).
    pub record_refresh_at: Option<Instant>,
    /// Runner messages that arrived while hibernating (sender, payload, binary), delivered
    /// once the socket reattaches to that runner.
    pub early: Vec<(Option<u32>, Bytes, bool)>,
    pub early_bytes: usize,
    /// The idle watch of this socket (`timeouts.client_idle_ping_ms`), run by the shard's
    /// idle scan; off until the WebSocket is open.
    pub idle: IdleWatch,
}

impl ClientConn {
    pub fn new(
        actor_id: Arc<str>,
        runner_idx: u32,
        req: [u8; 4],
        socket: TunnelSocket,
        generation: u32,
    ) -> ClientConn {
        ClientConn {
            actor_id,
            runner_idx,
            req,
            socket,
            open: OpenPhase::Waiting,
            reader_parked: false,
            runner_closed: false,
            generation,
            hibernation: None,
            record_refresh_at: None,
            early: Vec::new(),
            early_bytes: 0,
            idle: IdleWatch::default(),
        }
    }

    pub fn opening(&self) -> bool {
        self.open == OpenPhase::Waiting
    }
}

/// What the shard's idle scan knows of one client WebSocket: its reads so far, and the
/// period being watched (since when, the reads and written bytes at its start, and whether
/// the client was pinged in it). One scan per shard replaces a timer per socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdleWatch {
    /// Reads that brought bytes (bumped by the reader, wrapping).
    pub reads: u32,
    /// `reads` at the start of the period.
    pub(crate) seen_reads: u32,
    /// The socket's written bytes at the start of the period.
    pub(crate) seen_written: u64,
    /// Start of the period; `None` while the socket is not watched.
    pub(crate) since: Option<Instant>,
    /// The client was pinged at `since` and owes a sign of life.
    pub(crate) pinged: bool,
}

impl IdleWatch {
    pub(crate) fn restart(&mut self, now: Instant, written: u64) {
        self.since = Some(now);
        self.seen_reads = self.reads;
        self.seen_written = written;
        self.pinged = false;
    }
}

/// A hibernating client socket: its actor is down (or handed the socket back), the client
/// stays connected, and the socket reattaches to a later generation of the actor.
#[derive(Debug, Clone, Copy)]
pub struct Hibernation {
    pub since: Instant,
    /// A wake was asked for and the actor has not run since.
    pub waking: bool,
}

/// An HTTP request tunnelled to an actor (SPEC §2.3).
pub struct RequestConn {
    pub actor_id: Arc<str>,
    pub runner_idx: u32,
    pub req: [u8; 4],
    pub phase: RequestPhase,
    /// The index of the next gateway → runner message (`RequestStart` has 0).
    pub next_index: u16,
    /// How a streamed response body would be framed for this client (from its method and
    /// HTTP version).
    pub head_only: bool,
    pub http10: bool,
    /// A request body streamed to the runner (`RequestStart { stream: true }`).
    pub upload: Option<Upload>,
    /// When the response must have started: `timeouts.response_start_ms` after the request
    /// was sent, or after the last piece of a streamed body so far.
    pub deadline: Instant,
}

/// A request body on its way to the runner as `RequestChunk`s: bytes handed to the runner's
/// connection (`sent`) and bytes its writer has written (`written`, from receipts); the
/// shell reads the client only while the difference is below `limits.http_stream_buffer_bytes`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Upload {
    pub sent: u64,
    pub written: u64,
    /// The last chunk (`finish: true`) was sent.
    pub finished: bool,
    /// The shell waits for room (woken with [`super::Notice::Wake`]).
    pub parked: bool,
}

/// The phases of a tunnelled HTTP request.
pub enum RequestPhase {
    /// `RequestStart` sent; waiting for `ResponseStart` (the response deadline runs).
    Waiting,
    /// `ResponseStart { stream: true }` came: the body goes to the client as it arrives.
    Streaming(StreamOut),
    /// Answered: the outcome, until the shell takes it.
    Answered(Option<HttpOutcome>),
}

/// A response streamed to the client: its head until the shell takes it, then body chunks
/// queued on the request's [`super::OutQueue`] (bounded by `limits.http_stream_buffer_bytes`).
pub struct StreamOut {
    /// The head, until the shell takes it ([`super::Gateway::take_http_outcome`]).
    pub head: Option<(u16, protocol::StrMap)>,
    pub framing: BodyFraming,
    /// Body bytes queued so far.
    pub sent: u64,
    /// Complete: the last chunk (or the declared length) is queued.
    pub done: bool,
    /// Cut short: the client connection ends after what is queued, with no last chunk.
    pub aborted: bool,
    /// Chunks from the runner so far, and (chunks, client bytes written) at the last idle
    /// check (`timeouts.http_stream_idle_ms`).
    pub chunks: u64,
    pub idle_seen: (u64, u64),
}

/// How a tunnelled HTTP request ended.
#[derive(Debug)]
pub enum HttpOutcome {
    Response {
        status: u16,
        headers: protocol::StrMap,
        body: Bytes,
    },
    /// A streamed response's head: the shell writes it with this framing, then the body
    /// from the request's queue ([`super::Gateway::stream_next`]).
    Stream {
        status: u16,
        headers: protocol::StrMap,
        framing: BodyFraming,
    },
    /// Refused by the gateway.
    Failed(Refusal),
}
