//! The node-to-node wire codec: what one bus message between torpor nodes carries
//! ([`NodeMsg`]), as bytes ([`encode`], [`decode`]).
//!
//! Every message starts with a version byte ([`VERSION`]) and a kind byte, so a node of
//! another version refuses a message rather than misreading it. Integers of the fixed headers
//! are little-endian.
//!
//! | kind | message | after the kind byte |
//! | --- | --- | --- |
//! | 0 | `Shard` with `ShardMsg::ToRunner`/`ToRunnerInline` | shard u16, conn slot u32, conn gen u32, then the frames' bytes |
//! | 1 | `Shard` with `ShardMsg::Tunnel` of a `TunnelIn::Message` | shard u16, key shard u16, key serial u32, flags u8 (bit 0 binary, bit 1 `from` present), from u32 (0 when absent), then the payload |
//! | 2 | any other `Shard` | shard u16, then the BARE encoding of a private mirror of `ShardMsg` |
//! | 3 | `Control` | the BARE encoding of a private mirror of `ControlMsg` |
//! | 4 | `Heartbeat` | shards u16, epoch u64 |
//! | 5 | `Leader` | epoch u64 |
//!
//! Kinds 0 and 1 are the hot cross-node path: one copy of the bytes into the output when
//! encoding, none when decoding (the frames and the payload are slices of the received
//! [`Bytes`]). The frames of a `ToRunner`/`ToRunnerInline` arrive as one `ToRunner` frame
//! (their concatenation; none when it is empty), which writes the same bytes to the runner.
//!
//! The other kinds go through the protocol's strict BARE codec ([`crate::protocol::codec`])
//! with mirror types; a [`Reason`] travels as its index in [`Reason::ALL`]. Decoding is strict:
//! an unknown version, kind or tag, a short buffer, trailing bytes, bad UTF-8, an unknown
//! reason index or flag bit are a [`WireError`], never a panic. A BARE part above
//! [`protocol::MAX_MESSAGE_LEN`] is refused by both sides.
//!
//! What never crosses nodes is refused by [`encode`] ([`Unsupported`]): `ShardMsg::{Upload,
//! UploadWritten, RunnerStreams, Shutdown}` and `ControlMsg::{ApiChecked, InputLoaded,
//! Shutdown}`.

use crate::engine::ConnRef;
use crate::gateway::{
    ApiRequest, ConnId, ControlMsg, Reason, Reply, RequestKey, ResolveError, Routed, ShardMsg,
    TunnelIn,
};
use crate::protocol::{
    self, HibernatingRequest, ToServer, ToServerInit, ToServerTunnelMessageKind,
};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;

/// The version byte that starts every message.
pub const VERSION: u8 = 1;

/// `NodeMsg::Shard { shard: ALL_SHARDS, .. }`: a copy for every shard of the receiving node.
pub const ALL_SHARDS: u16 = u16::MAX;

/// What one bus message between nodes carries.
pub enum NodeMsg {
    /// For shard `shard` of the receiving node; `shard == ALL_SHARDS` (u16::MAX): a copy for
    /// every shard.
    Shard { shard: u16, msg: ShardMsg },
    /// For the control plane of the receiving node (the leader).
    Control(ControlMsg),
    /// A node tells the leader it is alive, how many shards it has, and the lease epoch it
    /// follows.
    Heartbeat { shards: u16, epoch: u64 },
    /// The leader tells a node its epoch (the node answers with a Heartbeat).
    Leader { epoch: u64 },
}

/// A message [`encode`] refuses: it never crosses nodes (it names the variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsupported(pub &'static str);

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} does not cross nodes", self.0)
    }
}

impl std::error::Error for Unsupported {}

/// Bytes [`decode`] refuses, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad node message: {0}")]
pub struct WireError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, WireError> {
    Err(WireError(msg.into()))
}

const KIND_TO_RUNNER: u8 = 0;
const KIND_TUNNEL_MESSAGE: u8 = 1;
const KIND_SHARD: u8 = 2;
const KIND_CONTROL: u8 = 3;
const KIND_HEARTBEAT: u8 = 4;
const KIND_LEADER: u8 = 5;

/// Version, kind, shard, conn slot, conn gen.
const TO_RUNNER_HEADER: usize = 2 + 2 + 4 + 4;
/// Version, kind, shard, key shard, key serial, flags, from.
const TUNNEL_HEADER: usize = 2 + 2 + 2 + 4 + 1 + 4;
const FLAG_BINARY: u8 = 1;
const FLAG_FROM: u8 = 2;

/// Append `msg` to `out`. On an error `out` is left as it was.
pub fn encode(msg: &NodeMsg, out: &mut BytesMut) -> Result<(), Unsupported> {
    let start = out.len();
    let r = encode_inner(msg, out);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

fn encode_inner(msg: &NodeMsg, out: &mut BytesMut) -> Result<(), Unsupported> {
    match msg {
        NodeMsg::Shard { shard, msg } => match msg {
            ShardMsg::ToRunner { conn, frames } => {
                put_to_runner(out, *shard, *conn, frames);
                Ok(())
            }
            ShardMsg::ToRunnerInline { conn, frames } => {
                put_to_runner(out, *shard, *conn, frames);
                Ok(())
            }
            ShardMsg::Tunnel {
                key,
                msg: TunnelIn::Message { data, binary },
                from,
            } => {
                out.reserve(TUNNEL_HEADER + data.len());
                out.put_u8(VERSION);
                out.put_u8(KIND_TUNNEL_MESSAGE);
                out.put_u16_le(*shard);
                out.put_u16_le(key.shard);
                out.put_u32_le(key.serial);
                let flags = if *binary { FLAG_BINARY } else { 0 }
                    | if from.is_some() { FLAG_FROM } else { 0 };
                out.put_u8(flags);
                out.put_u32_le(from.unwrap_or(0));
                out.extend_from_slice(data);
                Ok(())
            }
            other => {
                let wire = WShard::from_msg(other)?;
                out.put_u8(VERSION);
                out.put_u8(KIND_SHARD);
                out.put_u16_le(*shard);
                put_bare(out, &wire)
            }
        },
        NodeMsg::Control(msg) => {
            let wire = WControl::from_msg(msg)?;
            out.put_u8(VERSION);
            out.put_u8(KIND_CONTROL);
            put_bare(out, &wire)
        }
        NodeMsg::Heartbeat { shards, epoch } => {
            out.put_u8(VERSION);
            out.put_u8(KIND_HEARTBEAT);
            out.put_u16_le(*shards);
            out.put_u64_le(*epoch);
            Ok(())
        }
        NodeMsg::Leader { epoch } => {
            out.put_u8(VERSION);
            out.put_u8(KIND_LEADER);
            out.put_u64_le(*epoch);
            Ok(())
        }
    }
}

fn put_to_runner(out: &mut BytesMut, shard: u16, conn: ConnId, frames: &[Bytes]) {
    let len: usize = frames.iter().map(Bytes::len).sum();
    out.reserve(TO_RUNNER_HEADER + len);
    out.put_u8(VERSION);
    out.put_u8(KIND_TO_RUNNER);
    out.put_u16_le(shard);
    out.put_u32_le(conn.slot);
    out.put_u32_le(conn.gen);
    for f in frames {
        out.extend_from_slice(f);
    }
}

fn put_bare<T: Serialize>(out: &mut BytesMut, v: &T) -> Result<(), Unsupported> {
    let mut buf = Vec::with_capacity(64);
    // The mirror types only use what the BARE serializer supports; should one not, the
    // message is refused rather than sent half-encoded.
    protocol::codec::to_writer(&mut buf, v)
        .map_err(|_| Unsupported("a value the BARE serializer refuses"))?;
    // The receiving side's BARE decoder refuses more.
    if buf.len() > protocol::MAX_MESSAGE_LEN {
        return Err(Unsupported("a message above protocol::MAX_MESSAGE_LEN"));
    }
    out.extend_from_slice(&buf);
    Ok(())
}

/// Little-endian reads over the received bytes, each checking the length.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        match self.buf.get(self.pos..self.pos + N) {
            Some(s) => {
                self.pos += N;
                let mut a = [0; N];
                a.copy_from_slice(s);
                Ok(a)
            }
            None => err(format!(
                "{} bytes end before byte {}",
                self.buf.len(),
                self.pos + N
            )),
        }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.take::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.take().map(u64::from_le_bytes)
    }
    fn end(&self) -> Result<(), WireError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            err(format!(
                "{} trailing bytes after byte {}",
                self.buf.len() - self.pos,
                self.pos
            ))
        }
    }
}

/// Read one message; the frames of a `ToRunner` and the payload of a tunnel `Message` are
/// slices of `data`.
pub fn decode(data: Bytes) -> Result<NodeMsg, WireError> {
    let mut r = Reader { buf: &data, pos: 0 };
    let version = r.u8()?;
    if version != VERSION {
        return err(format!("version {version}, this node speaks {VERSION}"));
    }
    match r.u8()? {
        KIND_TO_RUNNER => {
            let shard = r.u16()?;
            let conn = ConnId {
                slot: r.u32()?,
                gen: r.u32()?,
            };
            let frames = if data.len() > TO_RUNNER_HEADER {
                vec![data.slice(TO_RUNNER_HEADER..)]
            } else {
                Vec::new()
            };
            Ok(NodeMsg::Shard {
                shard,
                msg: ShardMsg::ToRunner { conn, frames },
            })
        }
        KIND_TUNNEL_MESSAGE => {
            let shard = r.u16()?;
            let key = RequestKey {
                shard: r.u16()?,
                serial: r.u32()?,
            };
            let flags = r.u8()?;
            if flags & !(FLAG_BINARY | FLAG_FROM) != 0 {
                return err(format!("unknown tunnel message flags {flags:#x}"));
            }
            let from = r.u32()?;
            let from = if flags & FLAG_FROM != 0 {
                Some(from)
            } else if from == 0 {
                None
            } else {
                return err(format!("runner index {from} without its flag"));
            };
            Ok(NodeMsg::Shard {
                shard,
                msg: ShardMsg::Tunnel {
                    key,
                    msg: TunnelIn::Message {
                        data: data.slice(TUNNEL_HEADER..),
                        binary: flags & FLAG_BINARY != 0,
                    },
                    from,
                },
            })
        }
        KIND_SHARD => {
            let shard = r.u16()?;
            let wire: WShard = bare(&data[r.pos..])?;
            Ok(NodeMsg::Shard {
                shard,
                msg: wire.into_msg()?,
            })
        }
        KIND_CONTROL => {
            let wire: WControl = bare(&data[r.pos..])?;
            Ok(NodeMsg::Control(wire.into_msg()))
        }
        KIND_HEARTBEAT => {
            let shards = r.u16()?;
            let epoch = r.u64()?;
            r.end()?;
            Ok(NodeMsg::Heartbeat { shards, epoch })
        }
        KIND_LEADER => {
            let epoch = r.u64()?;
            r.end()?;
            Ok(NodeMsg::Leader { epoch })
        }
        kind => err(format!("unknown kind {kind}")),
    }
}

fn bare<'de, T: Deserialize<'de>>(buf: &'de [u8]) -> Result<T, WireError> {
    protocol::codec::from_slice(buf).map_err(|e| WireError(e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Mirror types: the BARE shape of what is not on the hot path. Encoding borrows (`Cow`),
// decoding owns.
// ---------------------------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct WConnRef {
    node: [u8; 4],
    shard: u16,
    slot: u32,
    gen: u32,
}

impl From<ConnRef> for WConnRef {
    fn from(c: ConnRef) -> Self {
        WConnRef {
            node: c.node,
            shard: c.shard,
            slot: c.slot,
            gen: c.gen,
        }
    }
}

impl From<WConnRef> for ConnRef {
    fn from(c: WConnRef) -> Self {
        ConnRef {
            node: c.node,
            shard: c.shard,
            slot: c.slot,
            gen: c.gen,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct WConnId {
    slot: u32,
    gen: u32,
}

#[derive(Serialize, Deserialize)]
struct WKey {
    shard: u16,
    serial: u32,
}

/// `TunnelIn` but `Message` (which takes the hot path).
#[derive(Serialize, Deserialize)]
enum WTunnelIn<'a> {
    Open {
        can_hibernate: bool,
    },
    Ack(u16),
    Close {
        code: Option<u16>,
        reason: Option<Cow<'a, str>>,
        hibernate: bool,
    },
    Other(Cow<'a, ToServerTunnelMessageKind>),
}

#[derive(Serialize, Deserialize)]
enum WResolveError {
    NotFound,
    Timeout,
    Unavailable,
    RunnerFailed,
}

#[derive(Serialize, Deserialize)]
struct WRouted<'a> {
    actor_id: Cow<'a, str>,
    generation: u32,
    runner_idx: u32,
    conn: WConnRef,
}

#[derive(Serialize, Deserialize)]
enum WResolve<'a> {
    Ok(WRouted<'a>),
    Err(WResolveError),
}

#[derive(Serialize, Deserialize)]
enum WReply<'a> {
    Resolve(WResolve<'a>),
    Api { status: u16, body: Cow<'a, str> },
}

/// `ShardMsg` but the hot variants and what never crosses nodes.
#[derive(Serialize, Deserialize)]
enum WShard<'a> {
    Tunnel {
        key: WKey,
        msg: WTunnelIn<'a>,
        from: Option<u32>,
    },
    CloseConn {
        conn: WConnId,
        code: u16,
        /// Its index in `Reason::ALL`.
        reason: u8,
    },
    RunnerAttached {
        runner_idx: u32,
        conn: WConnRef,
    },
    RunnerDetached {
        runner_idx: u32,
        lost: bool,
    },
    ActorStopped {
        actor_id: Cow<'a, str>,
        destroyed: bool,
        barrier: u64,
    },
    ActorRunning {
        actor_id: Cow<'a, str>,
        generation: u32,
        runner_idx: u32,
    },
    Reply {
        waiter: u32,
        reply: WReply<'a>,
    },
    /// Its reason's index in `Reason::ALL`.
    ResetRunners(u8),
}

/// The index of `r` in [`Reason::ALL`] (which lists every variant, in declaration order).
fn reason_index(r: Reason) -> u8 {
    const _: () = assert!(Reason::ALL.len() <= 256);
    r as u8
}

fn reason_at(i: u8) -> Result<Reason, WireError> {
    match Reason::ALL.get(usize::from(i)) {
        Some(&r) => Ok(r),
        None => err(format!("unknown reason index {i}")),
    }
}

impl<'a> WShard<'a> {
    fn from_msg(msg: &'a ShardMsg) -> Result<Self, Unsupported> {
        Ok(match msg {
            ShardMsg::Tunnel { key, msg, from } => WShard::Tunnel {
                key: WKey {
                    shard: key.shard,
                    serial: key.serial,
                },
                msg: match msg {
                    TunnelIn::Open { can_hibernate } => WTunnelIn::Open {
                        can_hibernate: *can_hibernate,
                    },
                    TunnelIn::Ack(i) => WTunnelIn::Ack(*i),
                    TunnelIn::Close {
                        code,
                        reason,
                        hibernate,
                    } => WTunnelIn::Close {
                        code: *code,
                        reason: reason.as_deref().map(Cow::Borrowed),
                        hibernate: *hibernate,
                    },
                    TunnelIn::Other(k) => WTunnelIn::Other(Cow::Borrowed(k)),
                    // `encode` sends it on the hot path.
                    TunnelIn::Message { .. } => return Err(Unsupported("TunnelIn::Message")),
                },
                from: *from,
            },
            ShardMsg::CloseConn { conn, code, reason } => WShard::CloseConn {
                conn: WConnId {
                    slot: conn.slot,
                    gen: conn.gen,
                },
                code: *code,
                reason: reason_index(*reason),
            },
            ShardMsg::RunnerAttached { runner_idx, conn } => WShard::RunnerAttached {
                runner_idx: *runner_idx,
                conn: (*conn).into(),
            },
            ShardMsg::RunnerDetached { runner_idx, lost } => WShard::RunnerDetached {
                runner_idx: *runner_idx,
                lost: *lost,
            },
            ShardMsg::ActorStopped {
                actor_id,
                destroyed,
                barrier,
            } => WShard::ActorStopped {
                actor_id: Cow::Borrowed(actor_id),
                destroyed: *destroyed,
                barrier: *barrier,
            },
            ShardMsg::ActorRunning {
                actor_id,
                generation,
                runner_idx,
            } => WShard::ActorRunning {
                actor_id: Cow::Borrowed(actor_id),
                generation: *generation,
                runner_idx: *runner_idx,
            },
            ShardMsg::Reply { waiter, reply } => WShard::Reply {
                waiter: *waiter,
                reply: match reply {
                    Reply::Resolve(Ok(r)) => WReply::Resolve(WResolve::Ok(WRouted {
                        actor_id: Cow::Borrowed(&r.actor_id),
                        generation: r.generation,
                        runner_idx: r.runner_idx,
                        conn: r.conn.into(),
                    })),
                    Reply::Resolve(Err(e)) => WReply::Resolve(WResolve::Err(match e {
                        ResolveError::NotFound => WResolveError::NotFound,
                        ResolveError::Timeout => WResolveError::Timeout,
                        ResolveError::Unavailable => WResolveError::Unavailable,
                        ResolveError::RunnerFailed => WResolveError::RunnerFailed,
                    })),
                    Reply::Api { status, body } => WReply::Api {
                        status: *status,
                        body: Cow::Borrowed(body),
                    },
                },
            },
            // `encode` sends them on the hot path.
            ShardMsg::ToRunner { .. } => return Err(Unsupported("ShardMsg::ToRunner")),
            ShardMsg::ToRunnerInline { .. } => return Err(Unsupported("ShardMsg::ToRunnerInline")),
            ShardMsg::Upload { .. } => return Err(Unsupported("ShardMsg::Upload")),
            ShardMsg::UploadWritten { .. } => return Err(Unsupported("ShardMsg::UploadWritten")),
            ShardMsg::RunnerStreams { .. } => return Err(Unsupported("ShardMsg::RunnerStreams")),
            ShardMsg::Shutdown => return Err(Unsupported("ShardMsg::Shutdown")),
            ShardMsg::ResetRunners(r) => WShard::ResetRunners(reason_index(*r)),
        })
    }

    fn into_msg(self) -> Result<ShardMsg, WireError> {
        Ok(match self {
            WShard::Tunnel { key, msg, from } => ShardMsg::Tunnel {
                key: RequestKey {
                    shard: key.shard,
                    serial: key.serial,
                },
                msg: match msg {
                    WTunnelIn::Open { can_hibernate } => TunnelIn::Open { can_hibernate },
                    WTunnelIn::Ack(i) => TunnelIn::Ack(i),
                    WTunnelIn::Close {
                        code,
                        reason,
                        hibernate,
                    } => TunnelIn::Close {
                        code,
                        reason: reason.map(Cow::into_owned),
                        hibernate,
                    },
                    WTunnelIn::Other(k) => TunnelIn::Other(k.into_owned()),
                },
                from,
            },
            WShard::ResetRunners(r) => ShardMsg::ResetRunners(reason_at(r)?),
            WShard::CloseConn { conn, code, reason } => ShardMsg::CloseConn {
                conn: ConnId {
                    slot: conn.slot,
                    gen: conn.gen,
                },
                code,
                reason: reason_at(reason)?,
            },
            WShard::RunnerAttached { runner_idx, conn } => ShardMsg::RunnerAttached {
                runner_idx,
                conn: conn.into(),
            },
            WShard::RunnerDetached { runner_idx, lost } => {
                ShardMsg::RunnerDetached { runner_idx, lost }
            }
            WShard::ActorStopped {
                actor_id,
                destroyed,
                barrier,
            } => ShardMsg::ActorStopped {
                actor_id: Arc::from(actor_id),
                destroyed,
                barrier,
            },
            WShard::ActorRunning {
                actor_id,
                generation,
                runner_idx,
            } => ShardMsg::ActorRunning {
                actor_id: Arc::from(actor_id),
                generation,
                runner_idx,
            },
            WShard::Reply { waiter, reply } => ShardMsg::Reply {
                waiter,
                reply: match reply {
                    WReply::Resolve(WResolve::Ok(r)) => Reply::Resolve(Ok(Routed {
                        actor_id: Arc::from(r.actor_id),
                        generation: r.generation,
                        runner_idx: r.runner_idx,
                        conn: r.conn.into(),
                    })),
                    WReply::Resolve(WResolve::Err(e)) => Reply::Resolve(Err(match e {
                        WResolveError::NotFound => ResolveError::NotFound,
                        WResolveError::Timeout => ResolveError::Timeout,
                        WResolveError::Unavailable => ResolveError::Unavailable,
                        WResolveError::RunnerFailed => ResolveError::RunnerFailed,
                    })),
                    WReply::Api { status, body } => Reply::Api {
                        status,
                        body: body.into_owned(),
                    },
                },
            },
        })
    }
}

/// A `SocketAddr` with every field (serde's own drops a v6 address's flow info and scope).
#[derive(Serialize, Deserialize)]
enum WAddr {
    V4([u8; 4], u16),
    V6([u8; 16], u16, u32, u32),
}

impl From<SocketAddr> for WAddr {
    fn from(a: SocketAddr) -> Self {
        match a {
            SocketAddr::V4(a) => WAddr::V4(a.ip().octets(), a.port()),
            SocketAddr::V6(a) => WAddr::V6(a.ip().octets(), a.port(), a.flowinfo(), a.scope_id()),
        }
    }
}

impl From<WAddr> for SocketAddr {
    fn from(a: WAddr) -> Self {
        match a {
            WAddr::V4(ip, port) => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)),
            WAddr::V6(ip, port, flow, scope) => {
                SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, flow, scope))
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct WApi<'a> {
    method: Cow<'a, str>,
    path: Cow<'a, str>,
    query: Cow<'a, [(String, String)]>,
    body: Cow<'a, serde_bytes::Bytes>,
    waiter: u64,
}

/// `ControlMsg` but what never crosses nodes.
#[derive(Serialize, Deserialize)]
enum WControl<'a> {
    RunnerInit {
        conn: WConnRef,
        peer: WAddr,
        namespace: Cow<'a, str>,
        runner_key: Cow<'a, str>,
        init: Cow<'a, ToServerInit>,
    },
    RunnerMsg {
        conn: WConnRef,
        msg: Cow<'a, ToServer>,
    },
    RunnerClosed {
        conn: WConnRef,
    },
    Resolve {
        actor_id: Cow<'a, str>,
        waiter: u64,
    },
    ResolveNamed {
        namespace: Cow<'a, str>,
        name: Cow<'a, str>,
        key: Option<Cow<'a, str>>,
        get_or_create: bool,
        waiter: u64,
    },
    StopApplied {
        barrier: u64,
    },
    Wake {
        actor_id: Cow<'a, str>,
    },
    Hibernating {
        actor_id: Cow<'a, str>,
        req: HibernatingRequest,
        keep: bool,
    },
    HibernatingRefresh(Vec<(Cow<'a, str>, HibernatingRequest)>),
    Api(WApi<'a>),
    HibernatingSync {
        gateway_id: [u8; 4],
        shard: u16,
        records: Vec<(Cow<'a, str>, HibernatingRequest)>,
    },
}

impl<'a> WControl<'a> {
    fn from_msg(msg: &'a ControlMsg) -> Result<Self, Unsupported> {
        Ok(match msg {
            ControlMsg::RunnerInit {
                conn,
                peer,
                namespace,
                runner_key,
                init,
            } => WControl::RunnerInit {
                conn: (*conn).into(),
                peer: (*peer).into(),
                namespace: Cow::Borrowed(namespace),
                runner_key: Cow::Borrowed(runner_key),
                init: Cow::Borrowed(init),
            },
            ControlMsg::RunnerMsg { conn, msg } => WControl::RunnerMsg {
                conn: (*conn).into(),
                msg: Cow::Borrowed(msg),
            },
            ControlMsg::RunnerClosed { conn } => WControl::RunnerClosed {
                conn: (*conn).into(),
            },
            ControlMsg::Resolve { actor_id, waiter } => WControl::Resolve {
                actor_id: Cow::Borrowed(actor_id),
                waiter: *waiter,
            },
            ControlMsg::ResolveNamed {
                namespace,
                name,
                key,
                get_or_create,
                waiter,
            } => WControl::ResolveNamed {
                namespace: Cow::Borrowed(namespace),
                name: Cow::Borrowed(name),
                key: key.as_deref().map(Cow::Borrowed),
                get_or_create: *get_or_create,
                waiter: *waiter,
            },
            ControlMsg::StopApplied { barrier } => WControl::StopApplied { barrier: *barrier },
            ControlMsg::Wake { actor_id } => WControl::Wake {
                actor_id: Cow::Borrowed(actor_id),
            },
            ControlMsg::Hibernating {
                actor_id,
                req,
                keep,
            } => WControl::Hibernating {
                actor_id: Cow::Borrowed(actor_id),
                req: *req,
                keep: *keep,
            },
            ControlMsg::HibernatingRefresh(list) => WControl::HibernatingRefresh(
                list.iter()
                    .map(|(a, r)| (Cow::Borrowed(&**a), *r))
                    .collect(),
            ),
            ControlMsg::HibernatingSync {
                gateway_id,
                shard,
                records,
            } => WControl::HibernatingSync {
                gateway_id: *gateway_id,
                shard: *shard,
                records: records
                    .iter()
                    .map(|(a, r)| (Cow::Borrowed(&**a), *r))
                    .collect(),
            },
            ControlMsg::Api(a) => WControl::Api(WApi {
                method: Cow::Borrowed(&a.method),
                path: Cow::Borrowed(&a.path),
                query: Cow::Borrowed(&a.query),
                body: Cow::Borrowed(serde_bytes::Bytes::new(&a.body)),
                waiter: a.waiter,
            }),
            ControlMsg::ApiChecked(_) => return Err(Unsupported("ControlMsg::ApiChecked")),
            ControlMsg::InputLoaded { .. } => return Err(Unsupported("ControlMsg::InputLoaded")),
            ControlMsg::Shutdown => return Err(Unsupported("ControlMsg::Shutdown")),
        })
    }

    fn into_msg(self) -> ControlMsg {
        match self {
            WControl::RunnerInit {
                conn,
                peer,
                namespace,
                runner_key,
                init,
            } => ControlMsg::RunnerInit {
                conn: conn.into(),
                peer: peer.into(),
                namespace: namespace.into_owned(),
                runner_key: runner_key.into_owned(),
                init: init.into_owned(),
            },
            WControl::RunnerMsg { conn, msg } => ControlMsg::RunnerMsg {
                conn: conn.into(),
                msg: msg.into_owned(),
            },
            WControl::RunnerClosed { conn } => ControlMsg::RunnerClosed { conn: conn.into() },
            WControl::Resolve { actor_id, waiter } => ControlMsg::Resolve {
                actor_id: actor_id.into_owned(),
                waiter,
            },
            WControl::ResolveNamed {
                namespace,
                name,
                key,
                get_or_create,
                waiter,
            } => ControlMsg::ResolveNamed {
                namespace: namespace.into_owned(),
                name: name.into_owned(),
                key: key.map(Cow::into_owned),
                get_or_create,
                waiter,
            },
            WControl::StopApplied { barrier } => ControlMsg::StopApplied { barrier },
            WControl::Wake { actor_id } => ControlMsg::Wake {
                actor_id: actor_id.into_owned(),
            },
            WControl::Hibernating {
                actor_id,
                req,
                keep,
            } => ControlMsg::Hibernating {
                actor_id: Arc::from(actor_id),
                req,
                keep,
            },
            WControl::HibernatingRefresh(list) => ControlMsg::HibernatingRefresh(
                list.into_iter().map(|(a, r)| (Arc::from(a), r)).collect(),
            ),
            WControl::HibernatingSync {
                gateway_id,
                shard,
                records,
            } => ControlMsg::HibernatingSync {
                gateway_id,
                shard,
                records: records
                    .into_iter()
                    .map(|(a, r)| (Arc::from(a), r))
                    .collect(),
            },
            WControl::Api(a) => ControlMsg::Api(ApiRequest {
                method: a.method.into_owned(),
                path: a.path.into_owned(),
                query: a.query.into_owned(),
                body: Bytes::from(a.body.into_owned().into_vec()),
                waiter: a.waiter,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::Receipt;
    use crate::protocol::{
        ActorCheckpoint, ActorName, ActorNameMap, ActorState, ActorStateStopped, Event,
        EventActorStateUpdate, EventWrapper, KvListQuery, KvListRequest, KvRequestData, MessageId,
        StopCode, StrMap, ToServerKvRequest, ToServerResponseStart, ToServerTunnelMessage,
        ToServerWebSocketClose, ToServerWebSocketMessage,
    };
    use proptest::prelude::*;

    // The gateway's messages have no `Debug`: these spell every field.

    fn show_shard(m: &ShardMsg) -> String {
        match m {
            ShardMsg::ToRunner { conn, frames } => format!("ToRunner {conn:?} {frames:?}"),
            ShardMsg::ToRunnerInline { conn, frames } => {
                format!("ToRunnerInline {conn:?} {frames:?}")
            }
            ShardMsg::Upload {
                conn,
                frames,
                receipt,
            } => format!("Upload {conn:?} {frames:?} {receipt:?}"),
            ShardMsg::UploadWritten { id, bytes } => format!("UploadWritten {id:?} {bytes}"),
            ShardMsg::RunnerStreams { conn, on } => format!("RunnerStreams {conn:?} {on}"),
            ShardMsg::Tunnel { key, msg, from } => format!("Tunnel {key:?} {msg:?} {from:?}"),
            ShardMsg::CloseConn { conn, code, reason } => {
                format!("CloseConn {conn:?} {code} {reason:?}")
            }
            ShardMsg::RunnerAttached { runner_idx, conn } => {
                format!("RunnerAttached {runner_idx} {conn:?}")
            }
            ShardMsg::RunnerDetached { runner_idx, lost } => {
                format!("RunnerDetached {runner_idx} {lost}")
            }
            ShardMsg::ActorStopped {
                actor_id,
                destroyed,
                barrier,
            } => format!("ActorStopped {actor_id:?} {destroyed} {barrier}"),
            ShardMsg::ActorRunning {
                actor_id,
                generation,
                runner_idx,
            } => format!("ActorRunning {actor_id:?} {generation} {runner_idx}"),
            ShardMsg::Reply { waiter, reply } => format!("Reply {waiter} {reply:?}"),
            ShardMsg::Shutdown => "Shutdown".into(),
            ShardMsg::ResetRunners(r) => format!("ResetRunners {r:?}"),
        }
    }

    fn show_api(a: &ApiRequest) -> String {
        format!(
            "{:?} {:?} {:?} {:?} {}",
            a.method, a.path, a.query, a.body, a.waiter
        )
    }

    fn show_control(m: &ControlMsg) -> String {
        match m {
            ControlMsg::RunnerInit {
                conn,
                peer,
                namespace,
                runner_key,
                init,
            } => format!(
                "RunnerInit {conn:?} {peer:?} {:?} {namespace:?} {runner_key:?} {init:?}",
                match peer {
                    SocketAddr::V4(_) => (0, 0),
                    SocketAddr::V6(a) => (a.flowinfo(), a.scope_id()),
                }
            ),
            ControlMsg::RunnerMsg { conn, msg } => format!("RunnerMsg {conn:?} {msg:?}"),
            ControlMsg::RunnerClosed { conn } => format!("RunnerClosed {conn:?}"),
            ControlMsg::Resolve { actor_id, waiter } => format!("Resolve {actor_id:?} {waiter}"),
            ControlMsg::ResolveNamed {
                namespace,
                name,
                key,
                get_or_create,
                waiter,
            } => format!("ResolveNamed {namespace:?} {name:?} {key:?} {get_or_create} {waiter}"),
            ControlMsg::StopApplied { barrier } => format!("StopApplied {barrier}"),
            ControlMsg::Wake { actor_id } => format!("Wake {actor_id:?}"),
            ControlMsg::Hibernating {
                actor_id,
                req,
                keep,
            } => format!("Hibernating {actor_id:?} {req:?} {keep}"),
            ControlMsg::HibernatingRefresh(l) => format!("HibernatingRefresh {l:?}"),
            ControlMsg::HibernatingSync {
                gateway_id,
                shard,
                records,
            } => format!("HibernatingSync {gateway_id:?} {shard} {records:?}"),
            ControlMsg::Api(a) => format!("Api {}", show_api(a)),
            ControlMsg::ApiChecked(a) => format!("ApiChecked {}", show_api(a)),
            ControlMsg::InputLoaded { actor_id, input } => {
                format!("InputLoaded {actor_id:?} {input:?}")
            }
            ControlMsg::Shutdown => "Shutdown".into(),
        }
    }

    fn show(m: &NodeMsg) -> String {
        match m {
            NodeMsg::Shard { shard, msg } => format!("Shard {shard} {}", show_shard(msg)),
            NodeMsg::Control(msg) => format!("Control {}", show_control(msg)),
            NodeMsg::Heartbeat { shards, epoch } => format!("Heartbeat {shards} {epoch}"),
            NodeMsg::Leader { epoch } => format!("Leader {epoch}"),
        }
    }

    fn to_bytes(m: &NodeMsg) -> Bytes {
        let mut out = BytesMut::new();
        encode(m, &mut out).unwrap_or_else(|e| panic!("{}: {e}", show(m)));
        out.freeze()
    }

    /// Encodes, decodes and compares every field; returns the encoding.
    fn round_trip(m: &NodeMsg) -> Bytes {
        let bytes = to_bytes(m);
        let back = decode(bytes.clone()).unwrap_or_else(|e| panic!("{}: {e}", show(m)));
        assert_eq!(show(&back), show(m));
        bytes
    }

    fn conn_ref() -> ConnRef {
        ConnRef {
            node: [0xde, 0xad, 0xbe, 0xef],
            shard: 7,
            slot: 0x0102_0304,
            gen: u32::MAX,
        }
    }

    fn key() -> RequestKey {
        RequestKey {
            shard: 3,
            serial: 0x00ab_cdef,
        }
    }

    fn req(n: u8) -> HibernatingRequest {
        HibernatingRequest {
            gateway_id: [n, 1, 2, 3],
            request_id: [4, 5, 6, n],
        }
    }

    fn init() -> ToServerInit {
        ToServerInit {
            name: "default".into(),
            version: 7,
            total_slots: 100,
            prepopulate_actor_names: Some(ActorNameMap(vec![(
                "counter".into(),
                ActorName {
                    metadata: "{}".into(),
                },
            )])),
            metadata: Some("{\"a\":1}".into()),
        }
    }

    /// Every `TunnelIn` but `Message` (the hot path has its own tests).
    fn tunnel_ins() -> Vec<TunnelIn> {
        vec![
            TunnelIn::Open {
                can_hibernate: true,
            },
            TunnelIn::Open {
                can_hibernate: false,
            },
            TunnelIn::Ack(u16::MAX),
            TunnelIn::Close {
                code: Some(1000),
                reason: Some("bye ✓".into()),
                hibernate: true,
            },
            TunnelIn::Close {
                code: None,
                reason: None,
                hibernate: false,
            },
            TunnelIn::Other(ToServerTunnelMessageKind::ResponseStart(
                ToServerResponseStart {
                    status: 201,
                    headers: StrMap(vec![("content-type".into(), "text/plain".into())]),
                    body: Some(b"hello".to_vec()),
                    stream: false,
                },
            )),
            TunnelIn::Other(ToServerTunnelMessageKind::ResponseAbort),
            TunnelIn::Other(ToServerTunnelMessageKind::WebSocketClose(
                ToServerWebSocketClose {
                    code: Some(4000),
                    reason: Some("x".into()),
                    hibernate: false,
                },
            )),
        ]
    }

    fn shard_msgs() -> Vec<ShardMsg> {
        let mut v: Vec<ShardMsg> = tunnel_ins()
            .into_iter()
            .enumerate()
            .map(|(i, msg)| ShardMsg::Tunnel {
                key: key(),
                msg,
                from: (i % 2 == 0).then_some(i as u32 + 40),
            })
            .collect();
        v.extend([
            ShardMsg::ResetRunners(Reason::ClusterNodeRejoined),
            ShardMsg::CloseConn {
                conn: ConnId { slot: 9, gen: 2 },
                code: 1011,
                reason: Reason::MessageNotAcked,
            },
            ShardMsg::RunnerAttached {
                runner_idx: 5,
                conn: conn_ref(),
            },
            ShardMsg::RunnerDetached {
                runner_idx: 5,
                lost: true,
            },
            ShardMsg::RunnerDetached {
                runner_idx: 0,
                lost: false,
            },
            ShardMsg::ActorStopped {
                actor_id: Arc::from("actor-1"),
                destroyed: true,
                barrier: u64::MAX,
            },
            ShardMsg::ActorRunning {
                actor_id: Arc::from("actor-2"),
                generation: 3,
                runner_idx: 4,
            },
            ShardMsg::Reply {
                waiter: 11,
                reply: Reply::Resolve(Ok(Routed {
                    actor_id: Arc::from("actor-3"),
                    generation: 1,
                    runner_idx: 2,
                    conn: conn_ref(),
                })),
            },
            ShardMsg::Reply {
                waiter: 12,
                reply: Reply::Api {
                    status: 404,
                    body: "{\"error\":\"nope\"}".into(),
                },
            },
        ]);
        for e in [
            ResolveError::NotFound,
            ResolveError::Timeout,
            ResolveError::Unavailable,
            ResolveError::RunnerFailed,
        ] {
            v.push(ShardMsg::Reply {
                waiter: 13,
                reply: Reply::Resolve(Err(e)),
            });
        }
        v
    }

    fn control_msgs() -> Vec<ControlMsg> {
        vec![
            ControlMsg::RunnerInit {
                conn: conn_ref(),
                peer: "192.0.2.1:40000".parse().unwrap(),
                namespace: "default".into(),
                runner_key: "key-1".into(),
                init: init(),
            },
            ControlMsg::RunnerInit {
                conn: conn_ref(),
                peer: SocketAddr::V6(SocketAddrV6::new(
                    "2001:db8::1".parse().unwrap(),
                    443,
                    0x12345,
                    7,
                )),
                namespace: String::new(),
                runner_key: "k".into(),
                init: ToServerInit {
                    prepopulate_actor_names: None,
                    metadata: None,
                    ..init()
                },
            },
            ControlMsg::RunnerMsg {
                conn: conn_ref(),
                msg: ToServer::Init(init()),
            },
            ControlMsg::RunnerMsg {
                conn: conn_ref(),
                msg: ToServer::Events(vec![EventWrapper {
                    checkpoint: ActorCheckpoint {
                        actor_id: "a".into(),
                        generation: 2,
                        index: -1,
                    },
                    inner: Event::ActorStateUpdate(EventActorStateUpdate {
                        state: ActorState::Stopped(ActorStateStopped {
                            code: StopCode::Error,
                            message: Some("boom".into()),
                        }),
                    }),
                }]),
            },
            ControlMsg::RunnerMsg {
                conn: conn_ref(),
                msg: ToServer::Stopping,
            },
            ControlMsg::RunnerMsg {
                conn: conn_ref(),
                msg: ToServer::KvRequest(ToServerKvRequest {
                    actor_id: "a".into(),
                    request_id: 9,
                    data: KvRequestData::List(KvListRequest {
                        query: KvListQuery::All,
                        reverse: Some(true),
                        limit: None,
                    }),
                }),
            },
            ControlMsg::RunnerMsg {
                conn: conn_ref(),
                msg: ToServer::TunnelMessage(ToServerTunnelMessage {
                    message_id: MessageId {
                        gateway_id: [1, 2, 3, 4],
                        request_id: [5, 6, 7, 8],
                        message_index: 9,
                    },
                    message_kind: ToServerTunnelMessageKind::WebSocketMessage(
                        ToServerWebSocketMessage {
                            data: vec![0, 1, 2],
                            binary: true,
                        },
                    ),
                }),
            },
            ControlMsg::RunnerClosed { conn: conn_ref() },
            ControlMsg::Resolve {
                actor_id: "actor-1".into(),
                waiter: u64::MAX,
            },
            ControlMsg::ResolveNamed {
                namespace: "ns".into(),
                name: "counter".into(),
                key: Some("k1".into()),
                get_or_create: true,
                waiter: 1,
            },
            ControlMsg::ResolveNamed {
                namespace: "ns".into(),
                name: "counter".into(),
                key: None,
                get_or_create: false,
                waiter: 2,
            },
            ControlMsg::StopApplied { barrier: 77 },
            ControlMsg::Wake {
                actor_id: "actor-4".into(),
            },
            ControlMsg::Hibernating {
                actor_id: Arc::from("actor-5"),
                req: req(1),
                keep: true,
            },
            ControlMsg::Hibernating {
                actor_id: Arc::from("actor-5"),
                req: req(2),
                keep: false,
            },
            ControlMsg::HibernatingRefresh(vec![]),
            ControlMsg::HibernatingSync {
                gateway_id: [9, 8, 7, 6],
                shard: 1,
                records: vec![(
                    "actor-2".into(),
                    HibernatingRequest {
                        gateway_id: [9, 8, 7, 6],
                        request_id: [1, 0, 0, 7],
                    },
                )],
            },
            ControlMsg::HibernatingRefresh(vec![
                (Arc::from("a"), req(3)),
                (Arc::from("b"), req(4)),
            ]),
            ControlMsg::Api(ApiRequest {
                method: "POST".into(),
                path: "/actors".into(),
                query: vec![
                    ("namespace".into(), "default".into()),
                    ("x".into(), "".into()),
                ],
                body: Bytes::from_static(b"{\"name\":\"counter\"}"),
                waiter: 99,
            }),
            ControlMsg::Api(ApiRequest {
                method: "GET".into(),
                path: "/metadata".into(),
                query: vec![],
                body: Bytes::new(),
                waiter: 0,
            }),
        ]
    }

    #[test]
    fn every_shard_variant_round_trips() {
        for shard in [0, 3, ALL_SHARDS] {
            for msg in shard_msgs() {
                round_trip(&NodeMsg::Shard { shard, msg });
            }
        }
    }

    #[test]
    fn every_control_variant_round_trips() {
        for msg in control_msgs() {
            round_trip(&NodeMsg::Control(msg));
        }
    }

    #[test]
    fn heartbeat_and_leader_round_trip() {
        for (shards, epoch) in [(0, 0), (4, 17), (u16::MAX, u64::MAX)] {
            let b = round_trip(&NodeMsg::Heartbeat { shards, epoch });
            assert_eq!(b.len(), 12);
            let b = round_trip(&NodeMsg::Leader { epoch });
            assert_eq!(b.len(), 10);
        }
    }

    /// `Reason::ALL` lists every variant in declaration order, so `as u8` is the index; every
    /// reason (and `unmapped`'s fallbacks, which are reasons) survives.
    #[test]
    fn every_reason_round_trips() {
        for (i, &reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(reason as usize, i, "{reason:?}");
            round_trip(&NodeMsg::Shard {
                shard: 1,
                msg: ShardMsg::CloseConn {
                    conn: ConnId { slot: 1, gen: 1 },
                    code: reason.code(),
                    reason,
                },
            });
        }
    }

    fn inside(outer: &Bytes, inner: &Bytes) -> bool {
        let o = outer.as_ptr() as usize;
        let i = inner.as_ptr() as usize;
        i >= o && i + inner.len() <= o + outer.len()
    }

    #[test]
    fn to_runner_frames_are_slices_of_the_input() {
        let conn = ConnId {
            slot: 42,
            gen: 0x0a0b_0c0d,
        };
        let chunk = |n: usize, b: u8| Bytes::from(vec![b; n]);
        let frames = [chunk(10, 1), chunk(1024, 2), chunk(4, 3)];
        let whole: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
        let inline = NodeMsg::Shard {
            shard: 2,
            msg: ShardMsg::ToRunnerInline {
                conn,
                frames: frames.clone(),
            },
        };
        let list = NodeMsg::Shard {
            shard: 2,
            msg: ShardMsg::ToRunner {
                conn,
                frames: frames.to_vec(),
            },
        };
        for m in [inline, list] {
            let bytes = to_bytes(&m);
            assert_eq!(bytes.len(), TO_RUNNER_HEADER + whole.len());
            match decode(bytes.clone()).unwrap() {
                NodeMsg::Shard {
                    shard: 2,
                    msg: ShardMsg::ToRunner { conn: c, frames },
                } => {
                    assert_eq!(c, conn);
                    assert_eq!(frames.len(), 1);
                    assert_eq!(frames[0][..], whole[..]);
                    assert!(inside(&bytes, &frames[0]), "the frame was copied");
                }
                other => panic!("{}", show(&other)),
            }
        }
        // Nothing to write: no frame at all.
        let empty = NodeMsg::Shard {
            shard: 0,
            msg: ShardMsg::ToRunner {
                conn,
                frames: vec![Bytes::new()],
            },
        };
        match decode(to_bytes(&empty)).unwrap() {
            NodeMsg::Shard {
                msg: ShardMsg::ToRunner { frames, .. },
                ..
            } => assert!(frames.is_empty()),
            other => panic!("{}", show(&other)),
        }
        round_trip(&NodeMsg::Shard {
            shard: ALL_SHARDS,
            msg: ShardMsg::ToRunner {
                conn,
                frames: vec![chunk(3, 9)],
            },
        });
    }

    #[test]
    fn tunnel_payloads_are_slices_of_the_input() {
        for (binary, from, len) in [
            (true, Some(7), 1024),
            (false, None, 5),
            (true, None, 0),
            (false, Some(u32::MAX), 1),
            (false, Some(0), 2),
        ] {
            let m = NodeMsg::Shard {
                shard: 9,
                msg: ShardMsg::Tunnel {
                    key: key(),
                    msg: TunnelIn::Message {
                        data: Bytes::from(vec![0x5a; len]),
                        binary,
                    },
                    from,
                },
            };
            let bytes = round_trip(&m);
            assert_eq!(bytes.len(), TUNNEL_HEADER + len);
            match decode(bytes.clone()).unwrap() {
                NodeMsg::Shard {
                    msg:
                        ShardMsg::Tunnel {
                            msg: TunnelIn::Message { data, .. },
                            ..
                        },
                    ..
                } => assert!(inside(&bytes, &data), "the payload was copied"),
                other => panic!("{}", show(&other)),
            }
        }
    }

    #[test]
    fn what_never_crosses_nodes_is_refused() {
        let conn = ConnId { slot: 1, gen: 1 };
        let api = || ApiRequest {
            method: "GET".into(),
            path: "/".into(),
            query: vec![],
            body: Bytes::new(),
            waiter: 1,
        };
        let shard = [
            (
                ShardMsg::Upload {
                    conn,
                    frames: vec![],
                    receipt: Receipt {
                        shard: 0,
                        id: conn,
                        bytes: 1,
                    },
                },
                "ShardMsg::Upload",
            ),
            (
                ShardMsg::UploadWritten { id: conn, bytes: 1 },
                "ShardMsg::UploadWritten",
            ),
            (
                ShardMsg::RunnerStreams {
                    conn: conn_ref(),
                    on: true,
                },
                "ShardMsg::RunnerStreams",
            ),
            (ShardMsg::Shutdown, "ShardMsg::Shutdown"),
        ]
        .map(|(msg, name)| (NodeMsg::Shard { shard: 0, msg }, name));
        let control = [
            (ControlMsg::ApiChecked(api()), "ControlMsg::ApiChecked"),
            (
                ControlMsg::InputLoaded {
                    actor_id: "a".into(),
                    input: None,
                },
                "ControlMsg::InputLoaded",
            ),
            (ControlMsg::Shutdown, "ControlMsg::Shutdown"),
        ]
        .map(|(msg, name)| (NodeMsg::Control(msg), name));
        for (m, name) in shard.into_iter().chain(control) {
            let mut out = BytesMut::from(&b"kept"[..]);
            let e = encode(&m, &mut out).unwrap_err();
            assert_eq!(e, Unsupported(name));
            assert!(e.to_string().contains(name), "{e}");
            assert_eq!(&out[..], b"kept", "{name} left bytes behind");
        }
    }

    /// Every sample in every kind; the hot kinds' tails are payload, the others' are checked.
    fn samples() -> Vec<NodeMsg> {
        let mut v: Vec<NodeMsg> = shard_msgs()
            .into_iter()
            .map(|msg| NodeMsg::Shard { shard: 1, msg })
            .chain(control_msgs().into_iter().map(NodeMsg::Control))
            .collect();
        v.push(NodeMsg::Heartbeat {
            shards: 2,
            epoch: 3,
        });
        v.push(NodeMsg::Leader { epoch: 3 });
        v
    }

    /// The BARE decoder refuses more than `MAX_MESSAGE_LEN`: so does `encode`.
    #[test]
    fn oversized_control_messages_are_refused() {
        let m = NodeMsg::Control(ControlMsg::Api(ApiRequest {
            method: "PUT".into(),
            path: "/".into(),
            query: vec![],
            body: Bytes::from(vec![0; protocol::MAX_MESSAGE_LEN]),
            waiter: 1,
        }));
        let mut out = BytesMut::new();
        assert!(encode(&m, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn short_or_long_buffers_are_refused() {
        for m in samples() {
            let bytes = to_bytes(&m);
            for n in 0..bytes.len() {
                assert!(
                    decode(bytes.slice(..n)).is_err(),
                    "{} decoded from {n} of {} bytes",
                    show(&m),
                    bytes.len()
                );
            }
            let mut long = bytes.to_vec();
            long.push(0);
            let e = decode(Bytes::from(long)).err();
            assert!(e.is_some(), "{} decoded with a trailing byte", show(&m));
        }
        // The hot kinds: only a short header.
        let hot = to_bytes(&NodeMsg::Shard {
            shard: 1,
            msg: ShardMsg::ToRunner {
                conn: ConnId { slot: 1, gen: 1 },
                frames: vec![],
            },
        });
        for n in 0..TO_RUNNER_HEADER {
            assert!(decode(hot.slice(..n)).is_err());
        }
    }

    #[test]
    fn bad_version_kind_flags_reason_and_utf8_are_refused() {
        // The error's message, or "decoded".
        let msg = |b: &[u8]| match decode(Bytes::copy_from_slice(b)) {
            Ok(_) => WireError("decoded".into()),
            Err(e) => e,
        };
        let leader = to_bytes(&NodeMsg::Leader { epoch: 1 });
        let mut v2 = leader.to_vec();
        v2[0] = 2;
        assert!(msg(&v2).0.contains("version 2"));
        let mut kind = leader.to_vec();
        kind[1] = 6;
        assert!(msg(&kind).0.contains("unknown kind 6"));

        let tunnel = to_bytes(&NodeMsg::Shard {
            shard: 1,
            msg: ShardMsg::Tunnel {
                key: key(),
                msg: TunnelIn::Message {
                    data: Bytes::from_static(b"x"),
                    binary: false,
                },
                from: None,
            },
        });
        let mut flags = tunnel.to_vec();
        flags[10] = 4;
        assert!(msg(&flags).0.contains("flags"));
        let mut from = tunnel.to_vec();
        from[11] = 1;
        assert!(msg(&from).0.contains("without its flag"));

        let close = to_bytes(&NodeMsg::Shard {
            shard: 1,
            msg: ShardMsg::CloseConn {
                conn: ConnId { slot: 1, gen: 1 },
                code: 1000,
                reason: Reason::WsClosed,
            },
        });
        let mut reason = close.to_vec();
        *reason.last_mut().unwrap() = Reason::ALL.len() as u8;
        assert!(msg(&reason).0.contains("unknown reason index"));
        let mut tag = close.to_vec();
        tag[4] = 7;
        assert_ne!(msg(&tag).0, "decoded");

        let wake = to_bytes(&NodeMsg::Control(ControlMsg::Wake {
            actor_id: "ab".into(),
        }));
        let mut utf8 = wake.to_vec();
        *utf8.last_mut().unwrap() = 0xff;
        assert!(msg(&utf8).0.to_lowercase().contains("utf-8"));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(Bytes::from(data));
        }

        /// Past the version and kind bytes, into every decoder.
        #[test]
        fn random_bodies_never_panic(
            kind in 0u8..7,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut data = vec![VERSION, kind];
            data.extend(body);
            let _ = decode(Bytes::from(data));
        }

        /// A valid message with one byte changed decodes or is refused, never panics.
        #[test]
        fn mutated_messages_never_panic(i in 0usize..1000, at in any::<prop::sample::Index>(), b in any::<u8>()) {
            let all = samples();
            let mut bytes = to_bytes(&all[i % all.len()]).to_vec();
            let at = at.index(bytes.len());
            bytes[at] = b;
            let _ = decode(Bytes::from(bytes));
        }
    }

    /// Not a check: prints the cost of the hot paths. Run with
    /// `cargo test --release --lib cluster::wire::tests::measure -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_hot_paths() {
        use std::hint::black_box;
        use std::time::Instant;
        const N: u32 = 1_000_000;
        let frames = [
            Bytes::from(vec![0x82u8, 126, 4, 0]),
            Bytes::from(vec![1u8; 1024 - 8]),
            Bytes::from(vec![2u8; 4]),
        ];
        let inline = NodeMsg::Shard {
            shard: 1,
            msg: ShardMsg::ToRunnerInline {
                conn: ConnId { slot: 5, gen: 6 },
                frames,
            },
        };
        let tunnel = NodeMsg::Shard {
            shard: 1,
            msg: ShardMsg::Tunnel {
                key: key(),
                msg: TunnelIn::Message {
                    data: Bytes::from(vec![3u8; 1024]),
                    binary: true,
                },
                from: Some(4),
            },
        };
        for (name, m) in [("ToRunnerInline 1 KiB", &inline), ("Tunnel 1 KiB", &tunnel)] {
            let mut out = BytesMut::with_capacity(4096);
            let start = Instant::now();
            for _ in 0..N {
                encode(black_box(m), &mut out).unwrap();
                let b = out.split().freeze();
                black_box(decode(b).unwrap());
            }
            let ns = start.elapsed().as_nanos() as f64 / f64::from(N);
            println!("{name}: encode+decode {ns:.1} ns");
        }
    }
}
