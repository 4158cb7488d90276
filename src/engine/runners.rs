//! Runner registry: identity → runnerId, the live connection of each runner (eviction, stale
//! connections), loss after `runner_lost_threshold`, graceful drain, and each runner's command
//! outbox with the delivery rules described in the parent module.
//!
//! Must never act on a message from a connection that is not the runner's current one, and
//! never send a command twice unless a fence proved the first copy was not received.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Instant;

use super::{Action, ActorStatus, ConnRef, Engine, RunnerIdx};
use crate::protocol::{
    ActorCheckpoint, Command, CommandWrapper, ProtocolMetadata, ToClient, ToClientInit,
    ToClientPing, ToServerInit,
};

/// (namespace, runner name, runner_key).
pub(super) type Identity = (String, String, String);

/// Where a command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CmdState {
    /// Never written to any connection.
    Unsent,
    /// Written on `conn` in batch number `seq`; no proof of receipt yet.
    Sent { conn: ConnRef, seq: u64 },
    /// Sent on a connection that went away without proof: waits for the fence.
    Held,
    /// A start whose input is being read from the store (`Engine::input_loaded`); like
    /// `Held`, it holds back the later commands of its actor.
    NeedsInput,
}

#[derive(Debug, Clone)]
pub(super) struct OutCmd {
    pub cmd: CommandWrapper,
    pub state: CmdState,
}

/// A ping whose pong proves that every batch sent on `conn` before batch `seq` was received.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fence {
    pub ts: i64,
    pub conn: ConnRef,
    pub seq: u64,
}

/// The runners that announced one actor name (`prepopulateActorNames`), oldest first, each
/// with the metadata JSON it sent. The name shows the latest announcer's metadata; identical
/// texts share one allocation (every runner of an app usually sends the same).
#[derive(Debug, Default)]
pub(super) struct NameHolders(Vec<(usize, Arc<str>)>);

impl NameHolders {
    pub fn metadata(&self) -> &str {
        self.0.last().map(|(_, m)| &**m).unwrap_or("{}")
    }
}

/// What [`Engine::runner_init_report`] did besides its actions, for the shell's logs and
/// counters (the engine knows no peer addresses).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitReport {
    /// The connection was refused (closed with 1011 `runner.init_too_large`): which limit.
    pub refused: Option<String>,
    /// The `totalSlots` the runner asked for, when it was above `runner_max_slots`.
    pub slots_clamped_from: Option<u32>,
    /// The older live connection of the same runner that this one evicted (`ws.eviction`).
    pub evicted: Option<ConnRef>,
}

#[derive(Debug)]
pub(super) struct Runner {
    pub runner_id: String,
    pub namespace: String,
    pub name: String,
    pub key: String,
    pub version: u32,
    pub total_slots: u32,
    pub metadata: Option<String>,
    /// The actor names this runner announced (see `Engine::actor_names`).
    pub actor_names: Vec<String>,
    pub conn: Option<ConnRef>,
    pub disconnected_at: Option<Instant>,
    /// The runner said `Stopping` on its current session: nothing new is placed here. Every
    /// `Init` clears it (a runner that reconnects wants work).
    pub stopping: bool,
    /// Actors placed here (starting, running or stopping); each takes one slot.
    pub actors: BTreeSet<String>,
    /// Commands not yet proven received, in the order they were issued.
    pub outbox: Vec<OutCmd>,
    pub send_seq: u64,
    pub fence: Option<Fence>,
    /// While a reconnect's fence is out: the (actor, generation)s whose events came back on
    /// the new connection. The engine withholds the acknowledgement of each placed actor's
    /// latest event, so a runner that still hosts an actor re-sends that event right after
    /// `Init`; at the pong, an actor that ran here (it sent an event) with no event back is
    /// not hosted there any more (a new process that reuses the runner key).
    pub proof: Option<BTreeSet<(String, u32)>>,
}

impl Runner {
    /// May traffic for generation `generation` of `actor_id` (placed here) go to this
    /// runner's connection? Not while a reconnect's possession check is out and the actor has
    /// sent nothing back on the new connection: a new process behind the same key does not
    /// host it (it would answer `actor_not_found`), and the pong settles it either way.
    pub fn proven(&self, actor_id: &str, generation: u32) -> bool {
        self.proof
            .as_ref()
            .is_none_or(|p| p.contains(&(actor_id.to_string(), generation)))
    }

    pub fn free_slots(&self) -> u32 {
        let used = u32::try_from(self.actors.len()).unwrap_or(u32::MAX);
        self.total_slots.saturating_sub(used)
    }

    /// Connected, not draining, with room.
    pub fn placeable(&self) -> bool {
        self.conn.is_some() && !self.stopping && self.free_slots() > 0
    }

    /// Drop commands of `actor_id` issued for generations up to and including `generation`.
    pub fn prune_actor(&mut self, actor_id: &str, generation: u32) {
        self.outbox.retain(|c| {
            !(c.cmd.checkpoint.actor_id == actor_id && c.cmd.checkpoint.generation <= generation)
        });
    }

    /// Drop the start command of (actor, generation): an event of that generation proves it.
    pub fn prune_start(&mut self, actor_id: &str, generation: u32) {
        self.outbox.retain(|c| {
            let cp = &c.cmd.checkpoint;
            !(cp.actor_id == actor_id
                && (cp.generation < generation || (cp.generation == generation && cp.index == 0)))
        });
    }
}

impl Engine {
    /// A runner connection sent `Init`. `namespace` and `runner_key` come from the connect
    /// query. Answers `Init`, evicts an older live connection of the same identity, re-sends
    /// what the runner has not received, and attaches the connection.
    pub fn runner_init(
        &mut self,
        conn: ConnRef,
        namespace: &str,
        runner_key: &str,
        init: ToServerInit,
        now: Instant,
    ) -> Vec<Action> {
        self.runner_init_report(conn, namespace, runner_key, init, now)
            .0
    }

    /// [`Engine::runner_init`], also telling what the shell should log and count: a refused
    /// `Init` (a name, key, namespace, name list or metadata above its limit: the connection
    /// is closed with 1011 `runner.init_too_large` and the runner gets no state), a clamped
    /// `totalSlots`, an evicted older connection.
    pub fn runner_init_report(
        &mut self,
        conn: ConnRef,
        namespace: &str,
        runner_key: &str,
        mut init: ToServerInit,
        now: Instant,
    ) -> (Vec<Action>, InitReport) {
        let mut report = InitReport::default();
        if self.runner_by_conn.contains_key(&conn) {
            // A second Init on a live connection changes nothing.
            return (Vec::new(), report);
        }
        if let Some(why) = self.init_refusal(namespace, runner_key, &init) {
            report.refused = Some(why);
            self.out.push(Action::CloseRunner {
                conn,
                code: 1011,
                reason: "runner.init_too_large",
            });
            return (self.take_out(), report);
        }
        if init.total_slots > self.cfg.runner_max_slots {
            report.slots_clamped_from = Some(init.total_slots);
            init.total_slots = self.cfg.runner_max_slots;
        }
        let names: Vec<(String, String)> = init
            .prepopulate_actor_names
            .take()
            .map(|m| m.0.into_iter().map(|(n, a)| (n, a.metadata)).collect())
            .unwrap_or_default();
        // As the Rivet engine decides it: a runner whose name has a serverless config is a
        // pool's, and its `Init` carries the drain grace.
        let serverless = self.is_pool_runner(namespace, &init.name);
        let identity: Identity = (
            namespace.to_string(),
            init.name.clone(),
            runner_key.to_string(),
        );
        let idx = match self.runner_by_identity.get(&identity) {
            Some(&idx) => {
                let r = &mut self.runners[idx];
                if let Some(old) = r.conn.take() {
                    self.runner_by_conn.remove(&old);
                    report.evicted = Some(old);
                    self.out.push(Action::CloseRunner {
                        conn: old,
                        code: 1000,
                        reason: "ws.eviction",
                    });
                }
                r.total_slots = init.total_slots;
                r.version = init.version;
                r.metadata = init.metadata;
                // A runner that said `Stopping` and connects again is a new process that
                // wants work (or one that changed its mind): the drain belonged to the old
                // session. The actors it was stopping stay placed until the possession fence
                // below settles them.
                r.stopping = false;
                idx
            }
            None => {
                let runner_id = self.random_uuid();
                let idx = self.runners.insert(Runner {
                    runner_id,
                    namespace: namespace.to_string(),
                    name: init.name,
                    key: runner_key.to_string(),
                    version: init.version,
                    total_slots: init.total_slots,
                    metadata: init.metadata,
                    actor_names: Vec::new(),
                    conn: None,
                    disconnected_at: None,
                    stopping: false,
                    actors: BTreeSet::new(),
                    outbox: Vec::new(),
                    send_seq: 0,
                    fence: None,
                    proof: None,
                });
                self.runner_by_identity.insert(identity, idx);
                idx
            }
        };
        // A pool's runner that its pool drains stays draining across a reconnect.
        if serverless && self.pool_draining(&self.runners[idx].runner_id) {
            self.runners[idx].stopping = true;
        }
        // A reconnect replaces the names of the runner's previous connection.
        self.withdraw_names(idx);
        self.announce_names(idx, names);
        let Ok(runner_idx) = RunnerIdx::try_from(idx) else {
            // Only reachable with more than 2^32 runner records.
            self.out.push(Action::CloseRunner {
                conn,
                code: 1011,
                reason: "engine.too_many_runners",
            });
            return (self.take_out(), report);
        };
        self.runner_by_conn.insert(conn, idx);
        let metadata = ProtocolMetadata {
            runner_lost_threshold: ms_i64(self.cfg.runner_lost_threshold),
            actor_stop_threshold: ms_i64(self.cfg.actor_stop_threshold),
            serverless_drain_grace_period: serverless.then(|| ms_i64(self.cfg.pools.drain_grace)),
        };
        let fence_ts = -self.next_fence;
        let r = &mut self.runners[idx];
        r.conn = Some(conn);
        r.disconnected_at = None;
        self.out.push(Action::Send {
            conn,
            msg: ToClient::Init(ToClientInit {
                runner_id: r.runner_id.clone(),
                metadata,
            }),
        });
        // Whatever went out on an earlier connection without proof is in doubt.
        let mut in_doubt = false;
        for c in &mut r.outbox {
            match c.state {
                CmdState::Sent { .. } | CmdState::Held => {
                    c.state = CmdState::Held;
                    in_doubt = true;
                }
                CmdState::Unsent | CmdState::NeedsInput => {}
            }
        }
        // A reconnect of a runner that hosts actors proves which it still holds (see `proof`).
        let check_hosted = !r.actors.is_empty();
        r.proof = check_hosted.then(BTreeSet::new);
        r.fence = if in_doubt || check_hosted {
            self.next_fence += 1;
            Some(Fence {
                ts: fence_ts,
                conn,
                seq: 0,
            })
        } else {
            None
        };
        self.flush(idx);
        // New placements (actors waiting for room) go out with the re-sent commands; the fence
        // ping follows every batch of this connection so far.
        self.place_pending(now);
        let r = &mut self.runners[idx];
        if let Some(f) = &mut r.fence {
            f.seq = r.send_seq;
            self.out.push(Action::Send {
                conn,
                msg: ToClient::Ping(ToClientPing { ts: f.ts }),
            });
        }
        self.out.push(Action::RunnerAttached { runner_idx, conn });
        self.answer_runner_waiters(idx);
        (self.take_out(), report)
    }

    /// Why an `Init` is refused, if it is: a field above its configured limit.
    fn init_refusal(
        &self,
        namespace: &str,
        runner_key: &str,
        init: &ToServerInit,
    ) -> Option<String> {
        let name_max = self.cfg.runner_name_bytes;
        let meta_max = self.cfg.runner_actor_metadata_bytes;
        let over = |what: &str, len: usize, max: usize, limit: &str| {
            (len > max).then(|| format!("{what} is {len} bytes, limits.{limit} is {max}"))
        };
        if let Some(why) = over("namespace", namespace.len(), name_max, "runner_name_bytes")
            .or_else(|| {
                over(
                    "runner name",
                    init.name.len(),
                    name_max,
                    "runner_name_bytes",
                )
            })
            .or_else(|| {
                over(
                    "runner key",
                    runner_key.len(),
                    name_max,
                    "runner_name_bytes",
                )
            })
        {
            return Some(why);
        }
        if let Some(m) = &init.metadata {
            if let Some(why) = over(
                "Init metadata",
                m.len(),
                meta_max,
                "runner_actor_metadata_bytes",
            ) {
                return Some(why);
            }
        }
        let names = init
            .prepopulate_actor_names
            .as_ref()
            .map(|m| m.0.as_slice());
        let names = names.unwrap_or_default();
        if names.len() > self.cfg.runner_actor_names {
            return Some(format!(
                "prepopulateActorNames has {} entries, limits.runner_actor_names is {}",
                names.len(),
                self.cfg.runner_actor_names
            ));
        }
        names.iter().find_map(|(name, an)| {
            over(
                "an actor name",
                name.len(),
                self.cfg.max_name_bytes,
                "actor_name_bytes",
            )
            .or_else(|| {
                over(
                    &format!("the metadata of actor name {name:?}"),
                    an.metadata.len(),
                    meta_max,
                    "runner_actor_metadata_bytes",
                )
            })
        })
    }

    /// Record the actor names runner `idx` announced (a repeated name: the last one wins).
    fn announce_names(&mut self, idx: usize, names: Vec<(String, String)>) {
        let Some(r) = self.runners.get_mut(idx) else {
            return;
        };
        let ns = self.actor_names.entry(r.namespace.clone()).or_default();
        let mut mine = Vec::with_capacity(names.len());
        for (name, metadata) in names {
            let holders = ns.entry(name.clone()).or_default();
            holders.0.retain(|(i, _)| *i != idx);
            let shared = holders.0.iter().find(|(_, m)| **m == *metadata);
            let metadata = match shared {
                Some((_, m)) => m.clone(),
                None => Arc::from(metadata),
            };
            holders.0.push((idx, metadata));
            mine.push(name);
        }
        r.actor_names = mine;
    }

    /// Forget the actor names runner `idx` announced (it is lost, or announces anew).
    pub(super) fn withdraw_names(&mut self, idx: usize) {
        let Some(r) = self.runners.get_mut(idx) else {
            return;
        };
        let names = std::mem::take(&mut r.actor_names);
        let Some(ns) = self.actor_names.get_mut(&r.namespace) else {
            return;
        };
        for name in names {
            if let Some(holders) = ns.get_mut(&name) {
                holders.0.retain(|(i, _)| *i != idx);
                if holders.0.is_empty() {
                    ns.remove(&name);
                }
            }
        }
        if ns.is_empty() {
            self.actor_names.remove(&r.namespace);
        }
    }

    /// A runner connection closed. Ignored unless it is its runner's current connection.
    pub fn runner_closed(&mut self, conn: ConnRef, now: Instant) -> Vec<Action> {
        let Some(idx) = self.runner_by_conn.remove(&conn) else {
            return Vec::new();
        };
        let r = &mut self.runners[idx];
        if r.conn != Some(conn) {
            return Vec::new();
        }
        r.conn = None;
        r.disconnected_at = Some(now);
        // The fence and the possession check belonged to this connection; the next `Init`
        // starts both anew.
        r.fence = None;
        r.proof = None;
        if let Ok(runner_idx) = RunnerIdx::try_from(idx) {
            self.out.push(Action::RunnerDetached { runner_idx });
        }
        self.take_out()
    }

    /// `ToServer::AckCommands`: the runner has these commands; forget them.
    pub fn runner_ack_commands(
        &mut self,
        conn: ConnRef,
        checkpoints: &[ActorCheckpoint],
        _now: Instant,
    ) -> Vec<Action> {
        let Some(&idx) = self.runner_by_conn.get(&conn) else {
            return Vec::new();
        };
        let r = &mut self.runners[idx];
        for cp in checkpoints {
            r.outbox.retain(|c| {
                let k = &c.cmd.checkpoint;
                !(k.actor_id == cp.actor_id
                    && (k.generation < cp.generation
                        || (k.generation == cp.generation && k.index <= cp.index)))
            });
        }
        self.flush(idx);
        self.take_out()
    }

    /// `ToServer::Stopping`: drain. No new placements here; stop every actor placed here.
    pub fn runner_stopping(&mut self, conn: ConnRef, now: Instant) -> Vec<Action> {
        let Some(&idx) = self.runner_by_conn.get(&conn) else {
            return Vec::new();
        };
        let r = &mut self.runners[idx];
        r.stopping = true;
        let ids: Vec<String> = r.actors.iter().cloned().collect();
        for id in ids {
            self.request_stop(&id, false, now);
        }
        self.take_out()
    }

    /// `ToServer::Pong`. Only pongs of the engine's own fence pings (`ts < 0`) matter here.
    pub fn runner_pong(&mut self, conn: ConnRef, ts: i64, now: Instant) -> Vec<Action> {
        let Some(&idx) = self.runner_by_conn.get(&conn) else {
            return Vec::new();
        };
        let r = &mut self.runners[idx];
        let fence = match r.fence {
            Some(f) if f.ts == ts && f.conn == conn => f,
            _ => return Vec::new(),
        };
        r.fence = None;
        let proof = r.proof.take();
        r.outbox.retain(|c| {
            !matches!(c.state, CmdState::Sent { conn: c2, seq } if c2 == conn && seq < fence.seq)
        });
        // A start still in doubt now was not received, or was received and the instance is
        // already gone (stopped, its events lost with the socket): had the runner held the
        // instance, its unacknowledged `Running` would have come back before this pong. Either
        // way that generation is over; it is never started twice.
        let vanished: Vec<(String, u32)> = r
            .outbox
            .iter()
            .filter(|c| c.state == CmdState::Held && matches!(c.cmd.inner, Command::StartActor(_)))
            .map(|c| {
                (
                    c.cmd.checkpoint.actor_id.clone(),
                    c.cmd.checkpoint.generation,
                )
            })
            .collect();
        for (actor_id, generation) in &vanished {
            r.prune_actor(actor_id, *generation);
        }
        // Actors that ran here (the runner sent an event of their generation) and sent
        // nothing back before the pong: a new process behind the same runner key does not
        // host them. One that never sent an event proves nothing either way: its start may
        // have gone out after the fence ping (placed on this connection, then stopped by a
        // drain before its `Running`), so the runner may host it still. Those are left to
        // the in-doubt rule above and the start and stop deadlines.
        let mut gone: Vec<(String, u32)> = Vec::new();
        if let Some(proof) = proof {
            for id in &r.actors {
                let Some(a) = self.actors.get(id) else {
                    continue;
                };
                let key = (id.clone(), a.generation);
                let ran = matches!(a.status, ActorStatus::Running | ActorStatus::Stopping)
                    && a.last_event_idx >= 0;
                if ran && !proof.contains(&key) && !vanished.contains(&key) {
                    gone.push(key);
                }
            }
        }
        let r = &mut self.runners[idx];
        // Stops written now, again (in doubt) or for the first time (queued while the runner
        // was away or fenced): the runner has `actor_stop_threshold` from now to report them.
        let stops_sent: Vec<(String, u32)> = r
            .outbox
            .iter()
            .filter(|c| matches!(c.state, CmdState::Held | CmdState::Unsent))
            .filter(|c| matches!(c.cmd.inner, Command::StopActor))
            .map(|c| {
                let cp = &c.cmd.checkpoint;
                (cp.actor_id.clone(), cp.generation)
            })
            .collect();
        // Stops in doubt are sent again: stopping an absent instance is a no-op for the runner.
        for c in &mut r.outbox {
            if c.state == CmdState::Held {
                c.state = CmdState::Unsent;
            }
        }
        for (actor_id, generation) in vanished.into_iter().chain(gone) {
            self.placement_vanished(&actor_id, generation, idx, now);
        }
        // What is still placed here is hosted here: stops wait for their `Stopped` again
        // (a deadline that passed while the runner was away or fenced did nothing; a stop
        // written now gets its whole threshold), and the lookups that waited for the proof
        // get their route.
        self.rearm_stop_deadlines(idx, &stops_sent, now);
        self.flush(idx);
        self.answer_runner_waiters(idx);
        self.place_pending(now);
        self.take_out()
    }

    /// The runnerId a runner record currently has (tests, metrics, logs).
    pub fn runner_id(&self, runner_idx: RunnerIdx) -> Option<&str> {
        self.runners
            .get(runner_idx as usize)
            .map(|r| r.runner_id.as_str())
    }

    /// Every runner with a connection now, and that connection: what a node that starts
    /// hearing the broadcasts must learn first (the `RunnerAttached` it missed).
    pub fn attached_runners(&self) -> impl Iterator<Item = (RunnerIdx, ConnRef)> + '_ {
        self.runners
            .iter()
            .filter_map(|(idx, r)| Some((RunnerIdx::try_from(idx).ok()?, r.conn?)))
    }

    /// Number of runner records (connected or waiting to reconnect).
    pub fn runner_count(&self) -> usize {
        self.runners.len()
    }

    /// Send every command that may go out now, as one `Commands` message.
    pub(super) fn flush(&mut self, idx: usize) {
        let Some(r) = self.runners.get_mut(idx) else {
            return;
        };
        let Some(conn) = r.conn else {
            return;
        };
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut batch = Vec::new();
        let seq = r.send_seq;
        for c in r.outbox.iter_mut() {
            match c.state {
                CmdState::Held | CmdState::NeedsInput => {
                    blocked.insert(c.cmd.checkpoint.actor_id.as_str());
                }
                CmdState::Unsent => {
                    if !blocked.contains(c.cmd.checkpoint.actor_id.as_str()) {
                        batch.push(c.cmd.clone());
                        c.state = CmdState::Sent { conn, seq };
                    }
                }
                CmdState::Sent { .. } => {}
            }
        }
        if !batch.is_empty() {
            r.send_seq += 1;
            self.out.push(Action::Send {
                conn,
                msg: ToClient::Commands(batch),
            });
        }
    }

    /// Runners disconnected longer than the threshold are lost.
    pub(super) fn expire_runners(&mut self, now: Instant) {
        let lost: Vec<usize> = self
            .runners
            .iter()
            .filter(|(_, r)| {
                r.disconnected_at.is_some_and(|t| {
                    now.saturating_duration_since(t) >= self.cfg.runner_lost_threshold
                })
            })
            .map(|(i, _)| i)
            .collect();
        if lost.is_empty() {
            return;
        }
        for idx in lost {
            self.withdraw_names(idx);
            let r = self.runners.remove(idx);
            self.runner_by_identity
                .remove(&(r.namespace.clone(), r.name.clone(), r.key.clone()));
            for id in &r.actors {
                self.actor_down(id, None, now);
            }
            if let Ok(runner_idx) = RunnerIdx::try_from(idx) {
                self.out.push(Action::RunnerLost { runner_idx });
            }
        }
        self.place_pending(now);
    }
}

fn ms_i64(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
