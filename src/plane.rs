//! The control plane's sans-IO step between the shards and the [`Engine`]: what a shard's
//! message does to the engine, and where each engine action goes (one shard, or every
//! shard). The control thread (`shard::control`) and the simulation both run it, so the
//! mapping exists once. Messages that need the store (KV requests, the engine API, a
//! get-or-create that must be durable before it is answered) are handed back to the caller.
//!
//! **The stop barrier.** When an actor stops, every shard hears `ActorStopped` through its
//! own mailbox, at its own pace; until a shard has applied it, that shard still forwards its
//! clients' messages to the stopped generation, and the runner drops them (the actor is
//! gone). If the next generation's start (listing those sockets to restore) reached the
//! runner first, such a message arrives after the restore with an index past a dropped one,
//! and the runner closes the socket (1008 `ws.message_index_skip`). So a start command for an
//! actor whose stop not every shard has applied yet is held, with everything after it for
//! the same runner connection, until each shard answers `StopApplied`: a shard's forwarded
//! messages are in the runner shard's mailbox before its answer, hence before the start.
//! (Found by the simulation once the control plane's messages arrived late.)
//!
//! A held start is encoded only when it goes, with its list of sockets to restore brought
//! up to date ([`Engine::refresh_start`]): a shard's answer to the stop comes after the
//! records of the sockets the stop made hibernate, and a start placed before those records
//! came would not list them (the runner would never restore them). (Found by the
//! simulation once other shards' messages arrived late too.)

use crate::cluster::wire::ALL_SHARDS;
use crate::engine::{self, Action, ConnRef, Engine, InitReport, Resolve};
use crate::gateway::{ConnId, ControlMsg, Reason, Reply, ResolveError, Routed, ShardMsg};
use crate::protocol::{self, ToServer};
use crate::ws::frame::{encode_header, OpCode};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Where a shard message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    /// A shard of this node.
    Shard(u16),
    /// A shard of the node with this gateway id (this one, or another when several nodes
    /// share runners): where a runner connection lives.
    Node([u8; 4], u16),
    /// A shard of the node that asked a question, by the peer number the leader gave it
    /// (see [`waiter_from_peer`]; never 0).
    Peer(u16, u16),
    /// Every shard (of every node).
    All,
}

/// A control message of a shard of the node the leader numbers `peer`, as the leader's plane
/// takes it: its waiter id carries the peer number (see [`waiter_from_peer`]). `None` for a
/// message that never comes from another node.
pub fn from_peer(mut msg: ControlMsg, peer: u16) -> Option<ControlMsg> {
    match &mut msg {
        ControlMsg::Resolve { waiter, .. } | ControlMsg::ResolveNamed { waiter, .. } => {
            *waiter = waiter_from_peer(*waiter, peer)
        }
        ControlMsg::Api(req) => req.waiter = waiter_from_peer(req.waiter, peer),
        ControlMsg::Shutdown | ControlMsg::ApiChecked(_) | ControlMsg::InputLoaded { .. } => {
            return None
        }
        _ => {}
    }
    Some(msg)
}

/// A waiter id of a shard of another node: the leader puts the number it gave that node
/// (1..) in the top 16 bits, which a shard's own ids (shard << 32 | waiter) leave free.
pub fn waiter_from_peer(waiter: u64, peer: u16) -> u64 {
    debug_assert!(peer != 0 && waiter >> 48 == 0);
    waiter | (peer as u64) << 48
}

/// What [`Plane::step`] did with a message.
pub enum Stepped {
    Done,
    /// A runner's `Init` went through the engine (the caller logs it).
    Init {
        conn: ConnRef,
        peer: SocketAddr,
        namespace: String,
        name: String,
        runner_key: String,
        report: InitReport,
    },
    /// A runner connection's end went through the engine.
    Closed(ConnRef),
    /// Not for this step: the caller handles it (it needs the store or the thread).
    Caller(ControlMsg),
}

/// The control plane's state between the engine and the shards: the stop barriers.
pub struct Plane {
    shards: usize,
    /// Other nodes whose shards hear the broadcasts (several nodes): id and shard count.
    remotes: Vec<([u8; 4], usize)>,
    next_barrier: u64,
    /// Open barriers: id → what has not applied the stop yet.
    barriers: HashMap<u64, Barrier>,
    /// Actors with an open barrier, and how many.
    stopping: HashMap<Arc<str>, usize>,
    /// Messages held per runner connection, in order, with the actors whose start they carry.
    held: HashMap<ConnRef, VecDeque<(Vec<String>, Held)>>,
}

/// A stop not every shard has applied yet.
struct Barrier {
    actor: Arc<str>,
    /// This node's shards that have not applied it.
    local: usize,
    /// Other nodes' shards that have not applied it.
    remote: Vec<([u8; 4], usize)>,
}

impl Barrier {
    fn done(&self) -> bool {
        self.local == 0 && self.remote.iter().all(|(_, n)| *n == 0)
    }
}

/// A message held behind a stop barrier.
enum Held {
    /// To the runner, encoded when it goes: a start it carries is brought up to date then
    /// ([`Engine::refresh_start`]), since the shards' answers to the stop bring the records
    /// of the sockets that hibernated because of it.
    Runner {
        conn: ConnRef,
        msg: protocol::ToClient,
    },
    Other(ShardMsg),
}

impl Plane {
    pub fn new(shards: usize) -> Plane {
        Plane {
            shards: shards.max(1),
            remotes: Vec::new(),
            next_barrier: 1,
            barriers: HashMap::new(),
            stopping: HashMap::new(),
            held: HashMap::new(),
        }
    }

    /// Messages held behind open stop barriers (all runner connections).
    pub fn held(&self) -> usize {
        self.held.values().map(VecDeque::len).sum()
    }

    /// Applies one message from a shard to the engine; the shard messages it causes are
    /// appended to `out`, in order.
    pub fn step(
        &mut self,
        engine: &mut Engine,
        msg: ControlMsg,
        now: Instant,
        out: &mut Vec<(To, ShardMsg)>,
    ) -> Stepped {
        let (actions, stepped) = match msg {
            ControlMsg::RunnerInit {
                conn,
                peer,
                namespace,
                runner_key,
                init,
            } => {
                let name = init.name.clone();
                let (actions, report) =
                    engine.runner_init_report(conn, &namespace, &runner_key, init, now);
                let stepped = Stepped::Init {
                    conn,
                    peer,
                    namespace,
                    name,
                    runner_key,
                    report,
                };
                (actions, stepped)
            }
            ControlMsg::RunnerMsg {
                msg: ToServer::KvRequest(_),
                ..
            } => return Stepped::Caller(msg),
            ControlMsg::RunnerMsg { conn, msg } => {
                (engine.runner_message(conn, msg, now), Stepped::Done)
            }
            ControlMsg::RunnerClosed { conn } => {
                (engine.runner_closed(conn, now), Stepped::Closed(conn))
            }
            ControlMsg::InputLoaded { actor_id, input } => {
                (engine.input_loaded(&actor_id, input, now), Stepped::Done)
            }
            ControlMsg::Resolve { actor_id, waiter } => {
                let (r, actions) = engine.resolve(&actor_id, waiter, now);
                if let Some(reply) = answer_now(waiter, r) {
                    out.push(reply);
                }
                (actions, Stepped::Done)
            }
            ControlMsg::Wake { actor_id } => (engine.wake(&actor_id, now).1, Stepped::Done),
            ControlMsg::Hibernating {
                actor_id,
                req,
                keep,
            } => {
                if keep {
                    // A destroyed actor's sockets are closed by its ActorDestroyed.
                    let _ = engine.hibernating_upsert(&actor_id, req, now);
                } else {
                    engine.hibernating_remove(&actor_id, req);
                }
                (Vec::new(), Stepped::Done)
            }
            ControlMsg::HibernatingRefresh(records) => {
                for (actor_id, req) in records {
                    let _ = engine.hibernating_upsert(&actor_id, req, now);
                }
                (Vec::new(), Stepped::Done)
            }
            ControlMsg::HibernatingSync {
                gateway_id,
                shard,
                records,
            } => {
                engine.hibernating_sync(gateway_id, shard, &records, now);
                (Vec::new(), Stepped::Done)
            }
            ControlMsg::StopApplied { barrier } => {
                self.applied(barrier, engine, out);
                (Vec::new(), Stepped::Done)
            }
            other => return Stepped::Caller(other),
        };
        self.deliver(actions, out);
        stepped
    }

    /// Node `node` with `shards` shards hears the broadcasts from now on (or its shard count
    /// changed); stops broadcast before it are not waited for on it. A node that did not
    /// hear them until now (it joined, came back, or this leader is new) first learns every
    /// runner attached now, in `out`: the broadcasts it missed. What it learns of actors
    /// comes with the routing answers to its own questions.
    pub fn set_remote(
        &mut self,
        node: [u8; 4],
        shards: usize,
        engine: &Engine,
        out: &mut Vec<(To, ShardMsg)>,
    ) {
        if let Some(r) = self.remotes.iter_mut().find(|(n, _)| *n == node) {
            r.1 = shards;
            return;
        }
        self.remotes.push((node, shards));
        for (runner_idx, conn) in engine.attached_runners() {
            let msg = ShardMsg::RunnerAttached { runner_idx, conn };
            out.push((To::Node(node, ALL_SHARDS), msg));
        }
    }

    /// The other nodes that hear the broadcasts.
    pub fn remotes(&self) -> impl Iterator<Item = [u8; 4]> + '_ {
        self.remotes.iter().map(|(n, _)| *n)
    }

    /// Node `node` is gone: no barrier waits for its shards any more.
    pub fn remote_lost(
        &mut self,
        node: [u8; 4],
        engine: &mut Engine,
        out: &mut Vec<(To, ShardMsg)>,
    ) {
        self.remotes.retain(|(n, _)| *n != node);
        let mut done = Vec::new();
        for (id, b) in self.barriers.iter_mut() {
            b.remote.retain(|(n, _)| *n != node);
            if b.done() {
                done.push(*id);
            }
        }
        done.sort_unstable();
        for id in done {
            self.release(id, engine, out);
        }
    }

    /// A shard of node `node` applied the stop of barrier `barrier`.
    pub fn remote_applied(
        &mut self,
        node: [u8; 4],
        barrier: u64,
        engine: &mut Engine,
        out: &mut Vec<(To, ShardMsg)>,
    ) {
        let Some(b) = self.barriers.get_mut(&barrier) else {
            return;
        };
        let Some(r) = b.remote.iter_mut().find(|(n, _)| *n == node) else {
            return;
        };
        r.1 = r.1.saturating_sub(1);
        if b.done() {
            self.release(barrier, engine, out);
        }
    }

    /// A shard applied the stop of barrier `barrier`; once all have, held messages go.
    fn applied(&mut self, barrier: u64, engine: &mut Engine, out: &mut Vec<(To, ShardMsg)>) {
        let Some(b) = self.barriers.get_mut(&barrier) else {
            return;
        };
        b.local = b.local.saturating_sub(1);
        if b.done() {
            self.release(barrier, engine, out);
        }
    }

    /// Every shard applied the stop of barrier `barrier`: what it held goes.
    fn release(&mut self, barrier: u64, engine: &mut Engine, out: &mut Vec<(To, ShardMsg)>) {
        let Some(b) = self.barriers.remove(&barrier) else {
            return;
        };
        let actor = b.actor;
        if let Some(n) = self.stopping.get_mut(&actor) {
            *n -= 1;
            if *n == 0 {
                self.stopping.remove(&actor);
            }
        }
        let conns: Vec<ConnRef> = self.held.keys().copied().collect();
        for conn in conns {
            let q = self.held.get_mut(&conn).expect("listed");
            while let Some((starts, _)) = q.front() {
                if starts
                    .iter()
                    .any(|a| self.stopping.contains_key(a.as_str()))
                {
                    break;
                }
                let (_, held) = q.pop_front().expect("checked");
                let msg = match held {
                    Held::Runner { conn, mut msg } => {
                        refresh_starts(engine, &mut msg);
                        ShardMsg::ToRunner {
                            conn: conn_id(conn),
                            frames: frames(&msg),
                        }
                    }
                    Held::Other(msg) => msg,
                };
                out.push((To::Node(conn.node, conn.shard), msg));
            }
            if q.is_empty() {
                self.held.remove(&conn);
            }
        }
    }

    /// Sends `msg` to runner connection `conn`, or holds it (it starts an actor whose stop is not
    /// applied everywhere yet, or something is held for `conn` already).
    fn send_or_hold(
        &mut self,
        conn: ConnRef,
        starts: Vec<String>,
        msg: Held,
        out: &mut Vec<(To, ShardMsg)>,
    ) {
        let blocked = starts
            .iter()
            .any(|a| self.stopping.contains_key(a.as_str()));
        if blocked || self.held.contains_key(&conn) {
            self.held.entry(conn).or_default().push_back((starts, msg));
        } else {
            let msg = match msg {
                Held::Runner { conn, msg } => ShardMsg::ToRunner {
                    conn: conn_id(conn),
                    frames: frames(&msg),
                },
                Held::Other(msg) => msg,
            };
            out.push((To::Node(conn.node, conn.shard), msg));
        }
    }

    /// A stop every shard must apply; returns its barrier.
    fn barrier(&mut self, actor: &Arc<str>) -> u64 {
        let id = self.next_barrier;
        self.next_barrier += 1;
        self.barriers.insert(
            id,
            Barrier {
                actor: actor.clone(),
                local: self.shards,
                remote: self.remotes.clone(),
            },
        );
        *self.stopping.entry(actor.clone()).or_insert(0) += 1;
        id
    }
}

/// The answer to a routing question when the engine has it at once (`None` while pending:
/// `Action::Resolved` answers it later).
pub fn answer_now(waiter: u64, r: Resolve) -> Option<(To, ShardMsg)> {
    match r {
        Resolve::Ready(route) => Some(reply(waiter, Ok(route))),
        Resolve::NotFound => Some(reply_err(waiter, ResolveError::NotFound)),
        Resolve::Pending { .. } => None,
    }
}

/// A failed routing question's answer.
pub fn reply_err(waiter: u64, err: ResolveError) -> (To, ShardMsg) {
    answer(waiter, Reply::Resolve(Err(err)))
}

fn reply(waiter: u64, result: Result<engine::Route, ResolveError>) -> (To, ShardMsg) {
    let result = result.map(|r| Routed {
        actor_id: r.actor_id.into(),
        generation: r.generation,
        runner_idx: r.runner_idx,
        conn: r.conn,
    });
    answer(waiter, Reply::Resolve(result))
}

/// Any answer to the shard that asked (the shard is the waiter id's high half, and the
/// asking node's peer number above it, see [`waiter_from_peer`]).
pub fn answer(waiter: u64, reply: Reply) -> (To, ShardMsg) {
    let msg = ShardMsg::Reply {
        waiter: waiter as u32,
        reply,
    };
    let (peer, shard) = ((waiter >> 48) as u16, (waiter >> 32) as u16);
    if peer == 0 {
        (To::Shard(shard), msg)
    } else {
        (To::Peer(peer, shard), msg)
    }
}

/// A whole runner-protocol message as one WebSocket frame's chunks.
pub fn frames(msg: &protocol::ToClient) -> Vec<Bytes> {
    let body = Bytes::from(protocol::encode_to_client(msg));
    let h = encode_header(true, OpCode::Binary, body.len() as u64, None);
    vec![Bytes::copy_from_slice(h.as_slice()), body]
}

/// A connection of a shard, named within that shard.
pub fn conn_id(conn: ConnRef) -> ConnId {
    ConnId {
        slot: conn.slot,
        gen: conn.gen,
    }
}

impl Plane {
    /// Where each engine action goes, in order (starts may wait behind a stop barrier).
    pub fn deliver(&mut self, actions: Vec<Action>, out: &mut Vec<(To, ShardMsg)>) {
        for a in actions {
            let m = match a {
                Action::Send { conn, msg } => {
                    let starts = started_actors(&msg);
                    self.send_or_hold(conn, starts, Held::Runner { conn, msg }, out);
                    continue;
                }
                Action::CloseRunner { conn, code, reason } => {
                    let m = ShardMsg::CloseConn {
                        conn: conn_id(conn),
                        code,
                        reason: engine_close(code, reason),
                    };
                    self.send_or_hold(conn, Vec::new(), Held::Other(m), out);
                    continue;
                }
                Action::RunnerAttached { runner_idx, conn } => {
                    (To::All, ShardMsg::RunnerAttached { runner_idx, conn })
                }
                Action::RunnerDetached { runner_idx } => (
                    To::All,
                    ShardMsg::RunnerDetached {
                        runner_idx,
                        lost: false,
                    },
                ),
                Action::RunnerLost { runner_idx } => (
                    To::All,
                    ShardMsg::RunnerDetached {
                        runner_idx,
                        lost: true,
                    },
                ),
                Action::ActorRunning {
                    actor_id,
                    generation,
                    runner_idx,
                } => (
                    To::All,
                    ShardMsg::ActorRunning {
                        actor_id: Arc::from(actor_id),
                        generation,
                        runner_idx,
                    },
                ),
                Action::ActorStopped { actor_id } => {
                    let actor_id: Arc<str> = Arc::from(actor_id);
                    let barrier = self.barrier(&actor_id);
                    (
                        To::All,
                        ShardMsg::ActorStopped {
                            actor_id,
                            destroyed: false,
                            barrier,
                        },
                    )
                }
                Action::ActorDestroyed { actor_id } => {
                    let actor_id: Arc<str> = Arc::from(actor_id);
                    let barrier = self.barrier(&actor_id);
                    (
                        To::All,
                        ShardMsg::ActorStopped {
                            actor_id,
                            destroyed: true,
                            barrier,
                        },
                    )
                }
                Action::Resolved { waiter, result } => {
                    let result = result.map_err(|e| match e {
                        engine::ResolveError::Timeout => ResolveError::Timeout,
                        engine::ResolveError::Destroyed => ResolveError::NotFound,
                        engine::ResolveError::RunnerFailed => ResolveError::RunnerFailed,
                    });
                    match result {
                        Ok(route) => reply(waiter, Ok(route)),
                        Err(e) => reply_err(waiter, e),
                    }
                }
            };
            out.push(m);
        }
    }
}

/// The actors a runner message starts (`CommandStartActor`s in a `Commands`).
/// Brings the socket lists of the starts in a held message up to date.
fn refresh_starts(engine: &mut Engine, msg: &mut protocol::ToClient) {
    let protocol::ToClient::Commands(cmds) = msg else {
        return;
    };
    for c in cmds {
        if let protocol::Command::StartActor(start) = &mut c.inner {
            let (actor, generation) = (&c.checkpoint.actor_id, c.checkpoint.generation);
            if let Some(list) = engine.refresh_start(actor, generation) {
                start.hibernating_requests = list;
            }
        }
    }
}

fn started_actors(msg: &protocol::ToClient) -> Vec<String> {
    match msg {
        protocol::ToClient::Commands(cmds) => cmds
            .iter()
            .filter(|c| matches!(c.inner, protocol::Command::StartActor(_)))
            .map(|c| c.checkpoint.actor_id.clone())
            .collect(),
        _ => Vec::new(),
    }
}

/// The gateway's [`Reason`] for an engine's runner close (`code` only for the log): the
/// engine names its reasons as strings, and this is where they become the gateway's.
pub fn engine_close(code: u16, reason: &'static str) -> Reason {
    match reason {
        "ws.eviction" => Reason::WsEviction,
        "runner.init_too_large" => Reason::RunnerInitTooLarge,
        "engine.too_many_runners" => Reason::EngineTooManyRunners,
        other => Reason::unmapped("engine", code, other, Reason::WsClosed),
    }
}

/// Copies a message for every shard (`ShardMsg` is not `Clone`: payload frames never are
/// broadcast, only control events).
pub fn copy_for_broadcast(msg: &ShardMsg) -> ShardMsg {
    match msg {
        ShardMsg::RunnerAttached { runner_idx, conn } => ShardMsg::RunnerAttached {
            runner_idx: *runner_idx,
            conn: *conn,
        },
        ShardMsg::RunnerDetached { runner_idx, lost } => ShardMsg::RunnerDetached {
            runner_idx: *runner_idx,
            lost: *lost,
        },
        ShardMsg::ActorRunning {
            actor_id,
            generation,
            runner_idx,
        } => ShardMsg::ActorRunning {
            actor_id: actor_id.clone(),
            generation: *generation,
            runner_idx: *runner_idx,
        },
        ShardMsg::ActorStopped {
            actor_id,
            destroyed,
            barrier,
        } => ShardMsg::ActorStopped {
            actor_id: actor_id.clone(),
            destroyed: *destroyed,
            barrier: *barrier,
        },
        ShardMsg::Shutdown => ShardMsg::Shutdown,
        ShardMsg::ResetRunners(r) => ShardMsg::ResetRunners(*r),
        _ => unreachable!("only control events are broadcast"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(actor: &str, generation: u32) -> protocol::ToClient {
        protocol::ToClient::Commands(vec![protocol::CommandWrapper {
            checkpoint: protocol::ActorCheckpoint {
                actor_id: actor.into(),
                generation,
                index: 0,
            },
            inner: protocol::Command::StartActor(protocol::CommandStartActor {
                config: protocol::ActorConfig {
                    name: "n".into(),
                    key: None,
                    create_ts: 0,
                    input: None,
                },
                hibernating_requests: Vec::new(),
            }),
        }])
    }

    fn ping() -> protocol::ToClient {
        protocol::ToClient::Ping(protocol::ToClientPing { ts: -1 })
    }

    fn is_runner_msg(m: &(To, ShardMsg)) -> bool {
        matches!(m, (To::Node(_, 1), ShardMsg::ToRunner { .. }))
    }

    /// A start of an actor whose stop a shard has not applied yet waits (and what follows it
    /// on that runner connection waits behind it) until every shard answered; other
    /// connections and other actors are not held.
    #[test]
    fn a_start_waits_until_every_shard_applied_the_stop() {
        let conn = ConnRef {
            node: [0; 4],
            shard: 1,
            slot: 0,
            gen: 1,
        };
        let other = ConnRef { slot: 5, ..conn };
        let mut plane = Plane::new(2);
        let mut engine = Engine::new(
            engine::EngineConfig::default(),
            7,
            Instant::now(),
            1_700_000_000_000,
        );
        let mut out = Vec::new();
        let actions = vec![
            Action::ActorStopped {
                actor_id: "a".into(),
            },
            Action::Send {
                conn,
                msg: start("a", 2),
            },
            Action::Send { conn, msg: ping() },
            Action::Send {
                conn: other,
                msg: start("b", 1),
            },
        ];
        plane.deliver(actions, &mut out);
        let barrier = match &out[0] {
            (To::All, ShardMsg::ActorStopped { barrier, .. }) => *barrier,
            _ => panic!("the stop goes to every shard first"),
        };
        assert_eq!(
            out.len(),
            2,
            "the start of a and the ping behind it are held"
        );
        assert!(
            is_runner_msg(&out[1]),
            "another actor's start on another connection goes"
        );
        assert_eq!(plane.held(), 2);
        out.clear();
        plane.applied(barrier, &mut engine, &mut out);
        assert!(
            out.is_empty(),
            "one of two shards applied the stop: still held"
        );
        plane.applied(barrier, &mut engine, &mut out);
        assert_eq!(
            out.len(),
            2,
            "both shards applied it: start, then ping, in order"
        );
        assert!(out.iter().all(is_runner_msg));
        assert_eq!(plane.held(), 0);
        // Nothing open: a start goes at once.
        out.clear();
        let actions = vec![Action::Send {
            conn,
            msg: start("a", 3),
        }];
        plane.deliver(actions, &mut out);
        assert_eq!(out.len(), 1);
    }

    /// A node the leader starts broadcasting to first hears every runner attached now (the
    /// `RunnerAttached` broadcasts it missed), for all its shards; a node already heard from
    /// hears nothing again, and a detached runner is not announced.
    #[test]
    fn a_new_remote_first_learns_the_attached_runners() {
        let t0 = Instant::now();
        let mut engine = Engine::new(engine::EngineConfig::default(), 7, t0, 1_700_000_000_000);
        let conn = |slot| ConnRef {
            node: [0; 4],
            shard: 0,
            slot,
            gen: 1,
        };
        let init = || protocol::ToServerInit {
            name: "default".into(),
            version: 1,
            total_slots: 4,
            prepopulate_actor_names: None,
            metadata: None,
        };
        for (slot, key) in [(1, "k1"), (2, "k2"), (3, "k3")] {
            engine.runner_init(conn(slot), "default", key, init(), t0);
        }
        engine.runner_closed(conn(2), t0);
        let mut plane = Plane::new(2);
        let mut out = Vec::new();
        let node = [9, 9, 9, 9];
        plane.set_remote(node, 3, &engine, &mut out);
        let heard: Vec<(u32, ConnRef)> = out
            .iter()
            .map(|m| match m {
                (To::Node(n, ALL_SHARDS), ShardMsg::RunnerAttached { runner_idx, conn })
                    if *n == node =>
                {
                    (*runner_idx, *conn)
                }
                (to, _) => panic!("only RunnerAttached to every shard of the node, not {to:?}"),
            })
            .collect();
        assert_eq!(heard, vec![(0, conn(1)), (2, conn(3))]);
        out.clear();
        plane.set_remote(node, 4, &engine, &mut out);
        assert!(out.is_empty(), "a known node is not told again");
        assert_eq!(plane.remotes().collect::<Vec<_>>(), vec![node]);
        plane.remote_lost(node, &mut engine, &mut out);
        plane.set_remote(node, 4, &engine, &mut out);
        assert_eq!(
            out.len(),
            2,
            "a node that was lost and came back is told again"
        );
    }

    /// The engine's runner closes become the gateway's reasons with the engine's codes.
    #[test]
    fn engine_closes_map_to_reasons() {
        let conn = ConnRef {
            node: [0; 4],
            shard: 1,
            slot: 2,
            gen: 3,
        };
        for (code, reason, want) in [
            (1000, "ws.eviction", Reason::WsEviction),
            (1011, "runner.init_too_large", Reason::RunnerInitTooLarge),
            (
                1011,
                "engine.too_many_runners",
                Reason::EngineTooManyRunners,
            ),
        ] {
            let mut out = Vec::new();
            Plane::new(1).deliver(vec![Action::CloseRunner { conn, code, reason }], &mut out);
            let [(
                To::Node(_, 1),
                ShardMsg::CloseConn {
                    conn: id,
                    code: c,
                    reason: got,
                },
            )] = &out[..]
            else {
                panic!("{reason}: not one CloseConn to shard 1");
            };
            assert_eq!((*id, *c, *got), (conn_id(conn), code, want));
            assert_eq!((got.code(), got.as_str()), (code, reason));
        }
    }
}
