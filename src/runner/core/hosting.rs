//! Hosting actors: starting one on `CommandStartActor` (a repeated start is ignored, a new
//! generation replaces the old one; restored hibernating sockets get their remembered
//! indices), stopping one (its sockets closed or remembered, `on_stop`, `Stopped`), stopping
//! all, and applying the operations of an actor's handle.
//!
//! Must never let an operation or a callback reach another generation of the actor than the
//! one it was made for.

use std::sync::Arc;

use bytes::Bytes;

use super::{ActorSlot, Core};
use crate::protocol::{
    ActorCheckpoint, ActorState, ActorStateStopped, CommandStartActor, Event,
    EventActorStateUpdate, StopCode, ToServerTunnelMessageKind, ToServerWebSocketClose,
};
use crate::runner::actor::ActorCx;
use crate::runner::ctl::ActorOp;
use crate::runner::index::InboundIndex;
use crate::runner::io::{ActorMeta, Req, WsReq};
use crate::runner::types::{ActorInfo, RequestKey, WsRestore};

impl Core {
    /// Applies an operation from an [`ActorHandle`](crate::runner::ActorHandle).
    pub(crate) fn handle_actor_op(&mut self, actor_id: &str, generation: u32, op: ActorOp) {
        let Some(slot) = self.actors.get_mut(actor_id) else {
            return;
        };
        if slot.meta.generation != generation {
            return;
        }
        let mut cx = ActorCx {
            io: &mut self.io,
            meta: &mut slot.meta,
        };
        match op {
            ActorOp::Send { key, data, binary } => {
                cx.send(key, data, binary);
            }
            ActorOp::Close { key, code, reason } => {
                cx.close(key, code, reason.as_deref());
            }
            ActorOp::Hibernate(key) => {
                cx.hibernate(key);
            }
            ActorOp::Ack(key, index) => {
                cx.ack(key, index);
            }
            ActorOp::HttpChunk { key, data, finish } => {
                cx.http_chunk(key, data, finish);
            }
            ActorOp::HttpAbort(key) => {
                cx.http_abort(key);
            }
            ActorOp::Sleep => cx.sleep(),
            ActorOp::Stop => cx.stop(),
            ActorOp::SetAlarm(ts) => cx.set_alarm(ts),
        }
    }

    pub(super) fn start_actor(&mut self, cp: ActorCheckpoint, start: CommandStartActor) {
        if let Some(existing) = self.actors.get_mut(cp.actor_id.as_str()) {
            if existing.meta.generation == cp.generation {
                if cp.index > existing.meta.last_command {
                    existing.meta.last_command = cp.index;
                }
                tracing::debug!(actor_id = %cp.actor_id, "ignoring repeated start command");
                return;
            }
            tracing::warn!(actor_id = %cp.actor_id, "replacing an actor with a new generation");
            self.stop_actor_inner(&cp.actor_id, None);
        }
        let info = ActorInfo {
            actor_id: cp.actor_id.clone(),
            generation: cp.generation,
            name: start.config.name,
            key: start.config.key,
            create_ts: start.config.create_ts,
            input: start.config.input.map(Bytes::from),
        };
        let actor = self.factory.create(&info);
        let actor_id: Arc<str> = Arc::from(cp.actor_id.as_str());
        let meta = ActorMeta {
            actor_id: actor_id.clone(),
            generation: cp.generation,
            next_event: 0,
            last_command: cp.index,
            ack_policy: actor.ack_policy(),
        };
        let slot = self
            .actors
            .entry(actor_id.clone())
            .insert_entry(ActorSlot { meta, actor })
            .into_mut();
        self.io.emit_event(
            &mut slot.meta,
            Event::ActorStateUpdate(EventActorStateUpdate {
                state: ActorState::Running,
            }),
        );
        let mut cx = ActorCx {
            io: &mut self.io,
            meta: &mut slot.meta,
        };
        slot.actor.on_start(&mut cx);

        let mut remembered = self.io.take_remembered(&actor_id, cp.generation);
        for hr in start.hibernating_requests {
            let key = RequestKey {
                gateway_id: hr.gateway_id,
                request_id: hr.request_id,
            };
            let rem = remembered.remove(&key);
            self.io.requests.insert(
                key,
                Req::Ws(WsReq {
                    actor_id: actor_id.clone(),
                    generation: cp.generation,
                    hibernatable: true,
                    inbound: InboundIndex::restored(rem.and_then(|r| r.last_in)),
                    next_out: rem.map_or(0, |r| r.next_out),
                    ack_to: None,
                    acked: None,
                }),
            );
            let mut cx = ActorCx {
                io: &mut self.io,
                meta: &mut slot.meta,
            };
            let decision =
                slot.actor
                    .on_websocket_restore(&mut cx, key, rem.and_then(|r| r.last_in));
            match decision {
                WsRestore::Resume { last_index } => {
                    if let Some(Req::Ws(ws)) = self.io.requests.get_mut(&key) {
                        ws.inbound = InboundIndex::restored(last_index);
                        // The actor has processed `last_index`; its ack may have been lost with
                        // an earlier connection, so replays up to it must re-acknowledge it.
                        ws.acked = last_index;
                    }
                }
                WsRestore::Close => {
                    self.io.push_ws(
                        key,
                        ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                            code: Some(1000),
                            reason: Some("ws.meta_not_found_during_restore".into()),
                            hibernate: false,
                        }),
                    );
                    self.io.requests.remove(&key);
                }
            }
        }
    }

    pub(super) fn stop_all(&mut self, code: StopCode) {
        let mut ids: Vec<Arc<str>> = self.actors.keys().cloned().collect();
        ids.sort_unstable();
        for id in ids {
            self.stop_actor(&id, code);
        }
    }

    pub(super) fn stop_actor(&mut self, actor_id: &str, code: StopCode) {
        self.stop_actor_inner(actor_id, Some(code));
    }

    /// Removes an actor: closes its non-hibernatable sockets (callback only, the gateway does
    /// its own side), remembers its hibernatable ones, calls `on_stop`, and reports `Stopped`
    /// when `code` is given.
    fn stop_actor_inner(&mut self, actor_id: &str, code: Option<StopCode>) {
        let Some(mut slot) = self.actors.remove(actor_id) else {
            return;
        };
        // Acks owed for processed messages go out before the sockets hibernate.
        self.io.flush_acks();
        // Its streamed responses end with it (the gateway cuts them when the actor stops).
        let generation = slot.meta.generation;
        self.io
            .http_out
            .retain(|_, h| !(&*h.actor_id == actor_id && h.generation == generation));
        for key in self.io.keys_of(actor_id, slot.meta.generation) {
            match self.io.requests.remove(&key) {
                Some(Req::Ws(ws)) if ws.hibernatable => self.io.remember(key, &ws),
                Some(Req::Ws(_)) => {
                    let mut cx = ActorCx {
                        io: &mut self.io,
                        meta: &mut slot.meta,
                    };
                    slot.actor
                        .on_websocket_close(&mut cx, key, Some(1000), Some("actor.stopped"));
                }
                _ => {}
            }
        }
        let mut cx = ActorCx {
            io: &mut self.io,
            meta: &mut slot.meta,
        };
        slot.actor.on_stop(&mut cx);
        if let Some(code) = code {
            self.io.emit_event(
                &mut slot.meta,
                Event::ActorStateUpdate(EventActorStateUpdate {
                    state: ActorState::Stopped(ActorStateStopped {
                        code,
                        message: None,
                    }),
                }),
            );
        }
    }

    /// Calls `on_websocket_close` on the actor that owns `ws`, if it is still running.
    pub(super) fn call_close(
        &mut self,
        ws: &WsReq,
        key: RequestKey,
        code: Option<u16>,
        reason: Option<&str>,
    ) {
        if let Some(slot) = self.actors.get_mut(&ws.actor_id) {
            if slot.meta.generation == ws.generation {
                let mut cx = ActorCx {
                    io: &mut self.io,
                    meta: &mut slot.meta,
                };
                slot.actor.on_websocket_close(&mut cx, key, code, reason);
            }
        }
    }

    /// Stops every actor locally (shutdown without a gateway to tell).
    pub(crate) fn stop_all_local(&mut self) {
        self.stop_all(if self.draining {
            StopCode::Ok
        } else {
            StopCode::Error
        });
    }
}
