//! The control plane's sans-IO step between the shards and the [`Engine`]: what a shard's
//! message does to the engine, and where each engine action goes (one shard, or every
//! shard). The control thread (`shard::control`) and the simulation both run it, so the
//! mapping exists once. Messages that need the store (KV requests, the engine API, a
//! get-or-create that must be durable before it is answered) are handed back to the caller.

use crate::engine::{self, Action, ConnRef, Engine, InitReport, Resolve};
use crate::gateway::{ConnId, ControlMsg, Reason, Reply, ResolveError, Routed, ShardMsg};
use crate::protocol::{self, ToServer};
use crate::ws::frame::{encode_header, OpCode};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Where a shard message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    Shard(u16),
    All,
}

/// What [`step`] did with a message.
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

/// Applies one message from a shard to the engine; the shard messages it causes are
/// appended to `out`, in order.
pub fn step(
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
        other => return Stepped::Caller(other),
    };
    deliver(actions, out);
    stepped
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

/// Any answer to the shard that asked (the shard is the waiter id's high half).
pub fn answer(waiter: u64, reply: Reply) -> (To, ShardMsg) {
    let msg = ShardMsg::Reply {
        waiter: waiter as u32,
        reply,
    };
    (To::Shard((waiter >> 32) as u16), msg)
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

/// Where each engine action goes, in order.
pub fn deliver(actions: Vec<Action>, out: &mut Vec<(To, ShardMsg)>) {
    for a in actions {
        let m = match a {
            Action::Send { conn, msg } => (
                To::Shard(conn.shard),
                ShardMsg::ToRunner {
                    conn: conn_id(conn),
                    frames: frames(&msg),
                },
            ),
            Action::CloseRunner { conn, code, reason } => (
                To::Shard(conn.shard),
                ShardMsg::CloseConn {
                    conn: conn_id(conn),
                    code,
                    reason: engine_close(code, reason),
                },
            ),
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
            Action::ActorStopped { actor_id } => (
                To::All,
                ShardMsg::ActorStopped {
                    actor_id: Arc::from(actor_id),
                    destroyed: false,
                },
            ),
            Action::ActorDestroyed { actor_id } => (
                To::All,
                ShardMsg::ActorStopped {
                    actor_id: Arc::from(actor_id),
                    destroyed: true,
                },
            ),
            Action::Resolved { waiter, result } => {
                let result = result.map_err(|e| match e {
                    engine::ResolveError::Timeout => ResolveError::Timeout,
                    engine::ResolveError::Destroyed => ResolveError::NotFound,
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
        } => ShardMsg::ActorStopped {
            actor_id: actor_id.clone(),
            destroyed: *destroyed,
        },
        ShardMsg::Shutdown => ShardMsg::Shutdown,
        _ => unreachable!("only control events are broadcast"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's runner closes become the gateway's reasons with the engine's codes.
    #[test]
    fn engine_closes_map_to_reasons() {
        let conn = ConnRef {
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
            deliver(vec![Action::CloseRunner { conn, code, reason }], &mut out);
            let [(
                To::Shard(1),
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
