//! Messages between threads, as values: what a shard receives from other shards and the
//! control plane ([`ShardMsg`]), what it asks of the control plane ([`ControlMsg`]), and the
//! runner → request traffic after decoding ([`TunnelIn`]).
//!
//! Types only: how they travel between threads is the shell's business.

use super::ids::{ConnId, RequestKey};
use super::reason::Reason;
use crate::engine::ConnRef;
use crate::protocol::{self, ToServer, ToServerInit};
use bytes::Bytes;
use std::sync::Arc;

/// Messages between shards and from the control plane to a shard.
pub enum ShardMsg {
    /// Complete WebSocket frames to write on a runner connection owned by this shard.
    ToRunner { conn: ConnId, frames: Vec<Bytes> },
    /// The three chunks of one tunnelled message for a runner connection owned by this
    /// shard, moved inline (no list to allocate per message).
    ToRunnerInline { conn: ConnId, frames: [Bytes; 3] },
    /// A streamed request body's chunk for a runner connection owned by this shard; the
    /// receipt goes back once it is written.
    Upload {
        conn: ConnId,
        frames: Vec<Bytes>,
        receipt: super::out::Receipt,
    },
    /// A streamed request body's chunk was written to its runner (see [`super::out::Receipt`]).
    UploadWritten { id: ConnId, bytes: u32 },
    /// A runner connection (on any shard) takes streamed request bodies (it said so in its
    /// `Init`), or no longer exists (`on: false`).
    RunnerStreams { conn: ConnRef, on: bool },
    /// A tunnel message from a runner (`from`: its runner index, once attached) for a request
    /// owned by this shard.
    Tunnel {
        key: RequestKey,
        msg: TunnelIn,
        from: Option<u32>,
    },
    /// Close a connection owned by this shard (the engine's `CloseRunner`: its code, and its
    /// reason as the gateway's).
    CloseConn {
        conn: ConnId,
        code: u16,
        reason: Reason,
    },
    /// The runner `runner_idx` is now reachable at `conn` (after Init).
    RunnerAttached { runner_idx: u32, conn: ConnRef },
    /// The runner's current connection is gone; it may come back unless `lost`.
    RunnerDetached { runner_idx: u32, lost: bool },
    /// The actor stopped: hibernatable sockets hibernate, others close (`actor.stopped`).
    /// A destroyed actor's sockets all close (`actor.destroyed`). The shard answers
    /// [`ControlMsg::StopApplied`] with `barrier` once it applied it.
    ActorStopped {
        actor_id: Arc<str>,
        destroyed: bool,
        barrier: u64,
    },
    /// The actor reported `Running` (generation `generation`, on runner `runner_idx`):
    /// hibernating sockets of an earlier generation reattach and replay.
    ActorRunning {
        actor_id: Arc<str>,
        generation: u32,
        runner_idx: u32,
    },
    /// Answer to a question this shard asked the control plane.
    Reply { waiter: u32, reply: Reply },
    /// The graceful stop (SIGTERM): [`super::Gateway::begin_drain`].
    Shutdown,
    /// Several nodes: what the leader knew of this node's runners is gone (the leader
    /// changed, or it counted this node out): this shard closes its runner connections with
    /// the reason (they connect again and are placed anew) and treats every runner as lost
    /// (see [`super::Gateway::reset_runners`]).
    ResetRunners(Reason),
}

/// Runner → request traffic, already decoded.
#[derive(Debug)]
pub enum TunnelIn {
    Open {
        can_hibernate: bool,
    },
    Message {
        data: Bytes,
        binary: bool,
    },
    Ack(u16),
    Close {
        code: Option<u16>,
        reason: Option<String>,
        hibernate: bool,
    },
    /// HTTP response kinds.
    Other(protocol::ToServerTunnelMessageKind),
}

/// Answers from the control plane.
#[derive(Debug)]
pub enum Reply {
    Resolve(Result<Routed, ResolveError>),
    Api { status: u16, body: String },
}

/// Where a routable actor lives now.
#[derive(Debug, Clone)]
pub struct Routed {
    pub actor_id: Arc<str>,
    pub generation: u32,
    pub runner_idx: u32,
    pub conn: ConnRef,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError {
    NotFound,
    Timeout,
    Unavailable,
    /// The actor's serverless runner pool fails to start runners.
    RunnerFailed,
}

/// Messages from shards to the control plane.
pub enum ControlMsg {
    RunnerInit {
        conn: ConnRef,
        /// The runner's address (for the log lines of evictions and refusals).
        peer: std::net::SocketAddr,
        namespace: String,
        runner_key: String,
        init: ToServerInit,
    },
    RunnerMsg {
        conn: ConnRef,
        msg: ToServer,
    },
    RunnerClosed {
        conn: ConnRef,
    },
    /// Route a request to an actor by id (waking it if needed).
    Resolve {
        actor_id: String,
        waiter: u64,
    },
    /// Route a request to an actor by name and key (`rvt-method=get|getOrCreate`).
    ResolveNamed {
        namespace: String,
        name: String,
        key: Option<String>,
        get_or_create: bool,
        waiter: u64,
    },
    /// This shard applied `ActorStopped` with this barrier: it forwards nothing more of the
    /// actor's sockets to the stopped generation (see `plane::Plane`).
    StopApplied {
        barrier: u64,
    },
    /// Start a sleeping actor because a hibernating socket needs it.
    Wake {
        actor_id: String,
    },
    /// Record (`keep`) or forget a hibernating client socket of `actor_id`.
    Hibernating {
        actor_id: Arc<str>,
        req: protocol::HibernatingRequest,
        keep: bool,
    },
    /// Refresh the records of these hibernatable sockets (actor id, request).
    HibernatingRefresh(Vec<(Arc<str>, protocol::HibernatingRequest)>),
    /// Every hibernatable socket of shard `shard` of the node `gateway_id` (sent when the
    /// placement leader changed): records of that shard not listed are forgotten.
    HibernatingSync {
        gateway_id: [u8; 4],
        shard: u16,
        records: Vec<(Arc<str>, protocol::HibernatingRequest)>,
    },
    /// An engine API request (`/actors`, `/metadata`, …).
    Api(ApiRequest),
    /// An engine API request held while the store was down, let through once a probe commit
    /// succeeded (sent by the control plane to itself).
    ApiChecked(ApiRequest),
    /// The store's answer to a read of an actor's input.
    InputLoaded {
        actor_id: String,
        input: Option<Vec<u8>>,
    },
    Shutdown,
}

/// An engine API request as the shard sent it.
pub struct ApiRequest {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Bytes,
    pub waiter: u64,
}
