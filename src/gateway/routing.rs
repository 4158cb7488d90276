//! Where traffic goes: frames to a runner's current connection (on this shard or through
//! another shard's mailbox), a runner's tunnel messages to the request they name (one array
//! index: the request id names shard and slot), and the shard's table of runner connections,
//! kept by the control plane's `RunnerAttached` / `RunnerDetached` broadcasts.

use super::conns::ConnKind;
use super::msg::{ControlMsg, ShardMsg, TunnelIn};
use super::out::Frames;
use super::{ConnId, Gateway, Output, Reason, RequestKey};
use crate::engine::ConnRef;
use crate::metrics::Counter;
use crate::tunnel::{Detach, DetachCause, SocketState};
use bytes::Bytes;
use std::time::Instant;

/// The runner id of the `ToClientInit` that fences a runner of an old placement term (see
/// [`Gateway::reset_runners`]); no engine issues it.
pub const FENCED_RUNNER_ID: &str = "torpor.fenced";

impl Gateway {
    /// Sends frames to the runner's current connection, wherever it lives.
    pub(super) fn send_to_runner(&mut self, runner_idx: u32, frames: impl Into<Frames>) -> bool {
        let Some(Some(conn)) = self.runners.get(runner_idx as usize).copied() else {
            return false;
        };
        self.send_to_conn(conn, frames)
    }

    /// Sends frames to a connection of any shard; a tunnelled message crosses to another
    /// shard inline, without a list allocated for it.
    pub fn send_to_conn(&mut self, conn: ConnRef, frames: impl Into<Frames>) -> bool {
        let frames = frames.into();
        let id = ConnId {
            slot: conn.slot,
            gen: conn.gen,
        };
        if conn.shard == self.id && conn.node == self.gateway_id {
            return self.write_local(id, frames);
        }
        let msg = match frames {
            Frames::Three(frames) => ShardMsg::ToRunnerInline { conn: id, frames },
            Frames::List(frames) => ShardMsg::ToRunner { conn: id, frames },
        };
        if conn.node != self.gateway_id {
            self.out(Output::ToNode(conn.node, conn.shard, msg));
            return true;
        }
        self.mail(conn.shard, msg);
        true
    }

    /// Learns where a runner is reachable (from a routing answer) unless already known.
    pub(super) fn learn_runner(&mut self, runner_idx: u32, conn: ConnRef) {
        let i = runner_idx as usize;
        if self.runners.len() <= i {
            self.runners.resize(i + 1, None);
        }
        self.runners[i].get_or_insert(conn);
    }

    /// Routes a runner's tunnel message to the request it names. `from` is the sending
    /// runner's index (`None` in the instant between its `Init` and its attachment).
    /// The gateway id `gw` the runner echoes names the node of the request when several
    /// nodes share runners; alone, it is not looked at.
    pub(super) fn route_tunnel(
        &mut self,
        gw: [u8; 4],
        req: [u8; 4],
        msg: TunnelIn,
        from: Option<u32>,
        now: Instant,
    ) {
        let key = RequestKey::decode(req);
        if self.clustered && gw != self.gateway_id {
            self.out(Output::ToNode(
                gw,
                key.shard,
                ShardMsg::Tunnel { key, msg, from },
            ));
        } else if key.shard == self.id {
            self.tunnel_in(key, msg, from, now);
        } else if (key.shard as usize) < self.shards {
            self.mail(key.shard, ShardMsg::Tunnel { key, msg, from });
        } else {
            self.metrics().inc(Counter::UnroutableTunnelMessages);
        }
    }

    /// Applies runner → gateway traffic to a local request. Only the runner that hosts the
    /// request may touch it; anything else is ignored and counted.
    fn tunnel_in(&mut self, key: RequestKey, msg: TunnelIn, from: Option<u32>, now: Instant) {
        let owner = |idx: u32| from.is_none_or(|f| f == idx);
        let Some(id) = self.conn_of_key(key) else {
            self.count_stray(key, now);
            return;
        };
        match &self.conns[id.slot as usize].kind {
            ConnKind::Request(r) => {
                if owner(r.runner_idx) {
                    self.request_in(id, msg, now);
                } else {
                    self.metrics().inc(Counter::UnroutableTunnelMessages);
                }
            }
            ConnKind::Client(_) => self.client_in(id, msg, from, now),
            ConnKind::Runner(_) => self.count_stray(key, now),
        }
    }

    /// Counts a runner message for a request this shard does not have: late when its client
    /// WebSocket closed lately (the runner's answer to the close, last acks), else unroutable.
    fn count_stray(&mut self, key: RequestKey, now: Instant) {
        let c = if self.recently_closed.contains(key.encode(), now) {
            Counter::LateTunnelMessages
        } else {
            Counter::UnroutableTunnelMessages
        };
        self.metrics().inc(c);
    }

    /// Messages from other shards and the control plane.
    pub fn handle_shard_msg(&mut self, msg: ShardMsg, now: Instant) {
        match msg {
            ShardMsg::ToRunner { conn, frames } => {
                self.write_local(conn, frames);
                return;
            }
            ShardMsg::ToRunnerInline { conn, frames } => {
                self.write_local(conn, frames);
                return;
            }
            ShardMsg::Upload {
                conn,
                frames,
                receipt,
            } => {
                self.write_with_receipt(conn, frames, receipt);
                return;
            }
            ShardMsg::UploadWritten { id, bytes } => {
                self.upload_written(id, bytes);
                return;
            }
            ShardMsg::RunnerStreams { conn, on } => {
                self.stream_runners.retain(|c| *c != conn);
                if on {
                    self.stream_runners.push(conn);
                }
                return;
            }
            ShardMsg::Tunnel { key, msg, from } => {
                self.tunnel_in(key, msg, from, now);
                return;
            }
            ShardMsg::CloseConn { conn, code, reason } => {
                self.close_conn_code(conn, code, reason, now)
            }
            ShardMsg::RunnerAttached { runner_idx, conn } => {
                self.runner_attached(runner_idx, conn, now)
            }
            ShardMsg::RunnerDetached { runner_idx, lost } => {
                self.runner_detached(runner_idx, now);
                if lost {
                    // A lost runner's record is gone (its index may be reused): nothing is
                    // owed to it any more, and its sockets hibernate.
                    self.owed_closes.retain(|(idx, _)| *idx != runner_idx);
                    self.runner_lost(runner_idx, now);
                }
            }
            ShardMsg::ActorStopped {
                actor_id,
                destroyed,
                barrier,
            } => {
                if destroyed {
                    self.actor_destroyed(&actor_id, now);
                } else {
                    self.actor_stopped(&actor_id, now);
                }
                self.control(ControlMsg::StopApplied { barrier });
            }
            ShardMsg::ActorRunning {
                actor_id,
                generation,
                runner_idx,
            } => self.actor_running(&actor_id, generation, runner_idx, now),
            ShardMsg::Reply { waiter, reply } => self.answer(waiter, Some(reply)),
            ShardMsg::Shutdown => self.begin_drain(now),
            ShardMsg::ResetRunners(reason) => self.reset_runners(reason, now),
        }
        self.check_invariants();
    }

    /// Closes any connection (runner or client) with the gateway's close frame: `reason`
    /// with its code.
    pub(super) fn close_conn(&mut self, id: ConnId, reason: Reason, now: Instant) {
        self.close_conn_code(id, reason.code(), reason, now);
    }

    /// [`Self::close_conn`] with another code than the reason's own: the answer to a runner's
    /// close echoes its code, and the engine's closes carry theirs.
    pub(super) fn close_conn_code(&mut self, id: ConnId, code: u16, reason: Reason, now: Instant) {
        let Some(conn) = self.conn(id) else {
            return;
        };
        match conn.kind {
            ConnKind::Client(_) => self.close_client_code(id, code, reason, now),
            _ => {
                if self.queue_close(id, code, reason.as_str(), now) {
                    self.metrics().close_as(reason.label());
                }
            }
        }
    }

    fn runner_attached(&mut self, runner_idx: u32, conn: ConnRef, now: Instant) {
        let i = runner_idx as usize;
        if self.runners.len() <= i {
            self.runners.resize(i + 1, None);
        }
        // A new connection replaced one this shard still routes to: the engine evicted it on
        // the reconnect's Init without a RunnerDetached (the old socket looked alive). What
        // was written to it may be lost, so detach first and the sockets replay below.
        if self.runners[i].is_some_and(|old| old != conn) {
            self.runner_detached(runner_idx, now);
        }
        self.runners[i] = Some(conn);
        // Local connections of this runner other than `conn` are stale from now on.
        let current = (conn.shard == self.id && conn.node == self.gateway_id)
            .then_some((conn.slot, conn.gen));
        for (slot, c) in self.conns.iter_mut() {
            if let ConnKind::Runner(r) = &mut c.kind {
                if current == Some((slot as u32, c.gen)) {
                    r.runner_idx = Some(runner_idx);
                } else if r.runner_idx == Some(runner_idx) {
                    r.superseded = true;
                }
            }
        }
        let owed: Vec<Vec<Bytes>> = {
            let (owed, keep) = std::mem::take(&mut self.owed_closes)
                .into_iter()
                .partition(|(idx, _)| *idx == runner_idx);
            self.owed_closes = keep;
            owed.into_iter().map(|(_, f)| f).collect()
        };
        for frames in owed {
            self.send_to_conn(conn, frames);
        }
        // Replay every detached socket of this runner, in order, original indices.
        // Hibernating sockets wait for their actor's next generation instead.
        let ids = self.clients_where(|cc| {
            cc.runner_idx == runner_idx
                && cc.hibernation.is_none()
                && cc.socket.state() == SocketState::Detached
        });
        for id in ids {
            self.replay(id, conn, now);
        }
    }

    /// What the placement leader knew of runners is gone (several nodes: the leader changed,
    /// or it counted this node out): runner indices it gave mean nothing any more. Every
    /// runner is lost (HTTP requests fail, sockets that can hibernate do, the others close;
    /// hibernating sockets wait for their actor's next start), and this shard's runner
    /// connections close with `reason`, so their runners connect again and are known anew.
    ///
    /// Hibernating sockets with messages ask for their wake again, and the shard sends the
    /// complete list of its socket records (`ControlMsg::HibernatingSync`): what was sent to
    /// the old leader may be lost with it.
    ///
    /// Before the close, each runner gets a `ToClientInit` naming it [`FENCED_RUNNER_ID`]:
    /// a runner stops every actor it hosts when its runner id changes (the Rivet runner
    /// libraries and torpor's alike), where a close alone leaves them running until the
    /// runner connects again or its `runnerLostThreshold` passes. The next leader may place
    /// those actors anew once it waited out its quiet period; without the fence the old and
    /// the new instance of an actor could run at once.
    pub fn reset_runners(&mut self, reason: Reason, now: Instant) {
        // Every index in use, also of runners this shard no longer knows (a socket keeps
        // the index of a runner that disconnected until it is lost): the next leader gives
        // indices anew, and a socket left with an old one would be replayed to whichever
        // runner gets it.
        let mut indices: Vec<u32> = (0..self.runners.len() as u32)
            .filter(|i| self.runners[*i as usize].is_some())
            .collect();
        for c in self.conns.iter().map(|(_, c)| &c.kind) {
            match c {
                ConnKind::Client(cc) if cc.hibernation.is_none() => indices.push(cc.runner_idx),
                ConnKind::Request(r) => indices.push(r.runner_idx),
                _ => {}
            }
        }
        indices.sort_unstable();
        indices.dedup();
        for idx in indices {
            self.runner_detached(idx, now);
            self.runner_lost(idx, now);
        }
        // A wake asked of the old leader may be lost with it: hibernating sockets with
        // messages ask the next one.
        let rewake = self.forget_wakes(|_| true);
        for id in rewake {
            self.wake_for(id);
        }
        // The records of this shard's sockets as they are: a record change sent to the old
        // leader may be lost with it (and the next one restored the records it had).
        let gw = self.gateway_id;
        let records: Vec<_> = self
            .conns
            .iter()
            .filter_map(|(_, c)| match &c.kind {
                ConnKind::Client(cc) if cc.record_refresh_at.is_some() => Some((
                    cc.actor_id.clone(),
                    super::hibernation::hibernating_request(gw, cc.req),
                )),
                _ => None,
            })
            .collect();
        self.control(ControlMsg::HibernatingSync {
            gateway_id: gw,
            shard: self.id,
            records,
        });
        self.runners.clear();
        self.owed_closes.clear();
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(&c.kind, ConnKind::Runner(r) if r.initialised))
            .map(|(slot, c)| ConnId {
                slot: slot as u32,
                gen: c.gen,
            })
            .collect();
        let t = &self.config.timeouts;
        let fence = crate::protocol::ToClient::Init(crate::protocol::ToClientInit {
            runner_id: FENCED_RUNNER_ID.to_string(),
            metadata: crate::protocol::ProtocolMetadata {
                runner_lost_threshold: t.runner_lost_threshold_ms.min(i64::MAX as u64) as i64,
                actor_stop_threshold: t.actor_stop_threshold_ms.min(i64::MAX as u64) as i64,
                serverless_drain_grace_period: None,
            },
        });
        for id in ids {
            let frames = self.runner_frame(&fence);
            self.write_local(id, frames);
            self.metrics().inc(Counter::RunnersFenced);
            self.close_conn(id, reason, now);
        }
    }

    fn runner_detached(&mut self, runner_idx: u32, now: Instant) {
        if let Some(r) = self.runners.get_mut(runner_idx as usize) {
            *r = None;
        }
        // An HTTP request has no replay: whatever the runner had of it is gone.
        self.fail_requests("request.runner_disconnected", |r| {
            r.runner_idx == runner_idx
        });
        let affected =
            self.clients_where(|cc| cc.runner_idx == runner_idx && cc.hibernation.is_none());
        for id in affected {
            let Some(cc) = super::client_of(&mut self.conns, id) else {
                continue;
            };
            if cc.opening() {
                // Still opening: refuse it.
                self.refuse_open(id, super::Refusal::OPEN_REFUSED);
                continue;
            }
            let (pb, pm) = (cc.socket.pending_bytes(), cc.socket.pending_len());
            match cc
                .socket
                .on_runner_detached(DetachCause::RunnerLost, &mut self.budget)
            {
                Detach::Keep | Detach::AlreadyClosed => {}
                Detach::Close(r) => {
                    cc.runner_closed = true;
                    self.pending_gauges_down(pb, pm);
                    self.close_client(id, r.into(), now);
                }
            }
        }
    }
}
