//! engine: the control plane. Runner sessions (identity, eviction, loss), actors (records,
//! generations, placement on runners with free slots), the command/event exchange with runners
//! (indices, de-duplication, acknowledgements, re-delivery after a reconnect), routing lookups
//! for the data path (with wake-on-demand and waiter timeouts), alarms, hibernating-request
//! records, and the engine HTTP API that rivetkit's client calls (`api`).
//!
//! Sans-IO: plain synchronous state. Time comes in as `now: Instant` (plus one wall-clock
//! anchor given at construction, for the millisecond timestamps the protocol and the API carry);
//! randomness comes from a seeded rng owned by the engine; outputs are [`Action`]s that the shell
//! executes in order. It must never touch a socket, a clock or a thread, never panic on input
//! from the network, and never act on a message from a connection that is not its runner's
//! current one.
//!
//! # Command delivery across reconnects
//!
//! The runner (`@rivetkit/engine-runner@2.2.1`) does not de-duplicate commands: a second
//! `CommandStartActor` for the same actor replaces the running instance and starts it again. It
//! acknowledges commands only every 5 minutes (`AckCommands`), and only start commands; it
//! keeps each actor's unacknowledged events and re-sends them right after every `Init`, but
//! forgets them when it removes the actor. So "received" is decided from proof, never from "it
//! was written to a socket":
//!
//! * a command is *delivered* when (a) an `AckCommands` checkpoint covers it, or (b) the runner
//!   sent any event for that (actor, generation) — it emits `Running` synchronously when it
//!   handles a start; for a stop, `Stopped` makes the command moot — or (c) a *fence*
//!   answered: the engine sent `Ping { ts < 0 }` on a connection after the command and the
//!   matching `Pong` came back on that connection (the runner handles messages in order).
//! * commands sent on a connection that went away without proof are *in doubt*. When the same
//!   runnerId reconnects, the engine answers `Init`, sends a fence ping, and holds every
//!   in-doubt command (and every later command of the same actors) until the pong.
//! * at the pong, a start still in doubt means the runner does not hold that instance: had it
//!   held it, its unacknowledged `Running` would have come back before the pong. It either
//!   never got the start, or got it and already removed the instance (its events lost with the
//!   socket). So the start is **never sent again**: that generation is over (`ActorStopped`),
//!   and an actor that should run is allocated anew with generation + 1. Stops still in doubt
//!   are sent again (stopping an absent instance is a no-op for the runner).
//! * a `Stopped` lost with a socket is never re-sent by the runner; the engine takes an actor
//!   as stopped `actor_stop_threshold` after `CommandStopActor` (and stops an actor that has
//!   not reported `Running` `actor_start_threshold` after its start).
//!
//! # Durability
//!
//! Actors are durable: identity, key, input, generation, alarm, destroy state and hibernating
//! records. Every change marks the actor dirty; [`Engine::take_store_ops`] turns the dirty set
//! into ordered [`StoreOp`]s (one record per actor per call) that the shell writes to the
//! store, ideally before executing the actions of the same call. An actor's `input` is held
//! only until that write: a start reads it back ([`Engine::take_input_loads`], answered with
//! [`Engine::input_loaded`]) and its start command waits for it, so actors that wait for a
//! runner hold no input, and once the start is proven received no copy is left. Runners,
//! placements, commands and waiters are not durable: [`Engine::restore`] brings every live actor back
//! asleep, and a runner that reconnects to a restarted gateway gets a new runnerId (so it
//! stops whatever it still runs) — the record format is described in `persist`.
//!
//! Runner configs (the settings of serverless runner pools, `runner_configs`) are durable too:
//! one record each, written through the same [`Engine::take_store_ops`] and restored by
//! [`Engine::restore`]. The serverless ones are run as pools (`pools`): the engine decides
//! which `GET {url}/start` requests to make ([`Engine::take_outbound`]) and hears how they
//! went ([`Engine::pool_event`]).
//!
//! The shard must pass a connection's `Events`, `AckCommands`, `Stopping` and every `Pong` with
//! `ts < 0` to the engine in arrival order (and leave those pongs out of RTT measurements).

mod actor;
pub mod api;
mod events;
mod persist;
mod placement;
mod pools;
mod registry;
mod routing;
pub mod runner_configs;
mod runners;
mod stopping;
mod store_keys;
#[cfg(test)]
mod tests;
mod timers;
mod waiters;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use slab::Slab;

use crate::protocol::{Command, HibernatingRequest, ToClient, ToServer};

pub use actor::{ActorInfo, ActorStatus, CrashPolicy, CreateActor, CreateError};
pub use persist::{ActorRecord, HibernatingRecord, RecordError, RestoreReport, RECORD_VERSION};
pub use pools::{PoolSettings, PoolStatus};
pub use runner_configs::{
    desired_runners, RunnerConfig, RunnerConfigError, RunnerConfigKind, RunnerConfigLimits,
    ServerlessConfig,
};
pub use runners::InitReport;
pub use store_keys::{
    actor_key, hib_key, input_key, StoreOp, ACTOR_KEY_PREFIX, HIB_KEY_PREFIX, INPUT_KEY_PREFIX,
    KEY_PREFIX, RUNNER_CONFIG_KEY_PREFIX,
};

/// One runner WebSocket connection, as the shards name it: the node it is connected to (its
/// gateway id; one node when torpor runs alone), owning shard, slab slot, and the slot's
/// generation (so that a reused slot is a different connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnRef {
    pub node: [u8; 4],
    pub shard: u16,
    pub slot: u32,
    pub gen: u32,
}

/// Stable small integer naming a runner record (a slab key) for the data path's routing table.
/// Valid from `RunnerAttached` until `RunnerLost`; reused afterwards.
pub type RunnerIdx = u32;

/// Where a routable actor lives right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub actor_id: String,
    pub generation: u32,
    pub runner_idx: RunnerIdx,
    pub conn: ConnRef,
}

/// Why a waiting lookup failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError {
    /// The actor did not become routable within `wake_timeout`.
    Timeout,
    /// The actor was destroyed while the waiter waited.
    Destroyed,
    /// The actor's serverless pool fails to start runners (`guard.actor_runner_failed`).
    RunnerFailed,
}

/// Immediate answer to a routing lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolve {
    /// Routable now.
    Ready(Route),
    /// Waking (or waiting for its runner): answered later by [`Action::Resolved`].
    Pending { actor_id: String },
    /// No such actor (or destroyed, or another namespace).
    NotFound,
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Encode and send this message on the runner connection.
    Send { conn: ConnRef, msg: ToClient },
    /// Close the runner connection (WebSocket close code and `{group}.{code}` reason).
    CloseRunner {
        conn: ConnRef,
        code: u16,
        reason: &'static str,
    },
    /// `conn` is now the live connection of runner `runner_idx` (after `Init` and commands).
    RunnerAttached {
        runner_idx: RunnerIdx,
        conn: ConnRef,
    },
    /// Runner `runner_idx` has no live connection (it may come back until it is lost).
    RunnerDetached { runner_idx: RunnerIdx },
    /// Runner `runner_idx` is lost and its record gone; the index may be reused later.
    RunnerLost { runner_idx: RunnerIdx },
    /// The actor reported `Running`: route its traffic to `runner_idx`.
    ActorRunning {
        actor_id: String,
        generation: u32,
        runner_idx: RunnerIdx,
    },
    /// The actor is down (stopped, slept, or its runner was lost).
    ActorStopped { actor_id: String },
    /// The actor is destroyed for good.
    ActorDestroyed { actor_id: String },
    /// Late answer to a [`Resolve::Pending`].
    Resolved {
        waiter: u64,
        result: Result<Route, ResolveError>,
    },
}

/// Control-plane settings. Durations are what the protocol carries in milliseconds.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A runner disconnected longer than this is lost (`ProtocolMetadata.runnerLostThreshold`).
    pub runner_lost_threshold: Duration,
    /// `ProtocolMetadata.actorStopThreshold`; rivetkit sleeps after this minus 1 s. Also how
    /// long the engine waits for `Stopped` after `CommandStopActor` before it considers the
    /// actor stopped (the runner forgets an actor's unacknowledged events when it removes it,
    /// so a `Stopped` lost with a socket is never re-sent).
    pub actor_stop_threshold: Duration,
    /// How long the engine waits for `Running` after `CommandStartActor`; then it stops the
    /// actor (and frees the slot once stopped or after `actor_stop_threshold`).
    pub actor_start_threshold: Duration,
    /// Serverless runner pools: torpor's public URL for started runners, the token they are
    /// given, the drain grace (`ProtocolMetadata.serverlessDrainGracePeriod` of their runners)
    /// and the back-off of failed starts.
    pub pools: PoolSettings,
    /// How long a routing lookup waits for an actor to become routable.
    pub wake_timeout: Duration,
    /// Hibernating-request records older than this are not restored on wake.
    pub hibernation_eligible: Duration,
    /// How long a destroyed actor stays visible to `GET /actors?actor_ids=`.
    pub destroyed_retention: Duration,
    /// Live (not destroyed) actors at most; creation beyond is refused.
    pub max_actors: usize,
    /// Live actors of one namespace at most (`limits.actors_per_namespace`).
    pub actors_per_namespace: usize,
    /// Largest decoded `input` accepted on create (`limits.actor_input_bytes`).
    pub max_input_bytes: usize,
    /// Largest actor name / key, in bytes (`limits.actor_name_bytes`, `actor_key_bytes`).
    pub max_name_bytes: usize,
    pub max_key_bytes: usize,
    /// Largest `totalSlots` of a runner; more is clamped (`limits.runner_max_slots`).
    pub runner_max_slots: u32,
    /// Largest namespace, runner name, runner key and `runner_name_selector`, in bytes
    /// (`limits.runner_name_bytes`).
    pub runner_name_bytes: usize,
    /// Most `prepopulateActorNames` entries in one runner `Init`.
    pub runner_actor_names: usize,
    /// Largest metadata JSON of one announced actor name, and of the `Init` metadata.
    pub runner_actor_metadata_bytes: usize,
    /// Runner name used when a create request does not name one.
    pub default_runner_name: String,
    /// Datacenter name reported by `/datacenters` and on actors.
    pub datacenter: String,
    /// Public URL of this gateway reported by `/datacenters`.
    pub public_url: String,
    /// Version string reported by `/metadata` and `/health`.
    pub version: String,
    /// Bounds of runner configs (`limits.runner_config*`).
    pub runner_configs: RunnerConfigLimits,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            runner_lost_threshold: Duration::from_millis(15_000),
            actor_stop_threshold: Duration::from_millis(30_000),
            actor_start_threshold: Duration::from_millis(30_000),
            pools: PoolSettings::default(),
            wake_timeout: Duration::from_secs(30),
            hibernation_eligible: Duration::from_secs(90),
            destroyed_retention: Duration::from_secs(600),
            max_actors: 1_000_000,
            actors_per_namespace: 100_000,
            max_input_bytes: 4 * 1024 * 1024,
            max_name_bytes: 256,
            max_key_bytes: 1024,
            runner_max_slots: 100_000,
            runner_name_bytes: 256,
            runner_actor_names: 1000,
            runner_actor_metadata_bytes: 16 * 1024,
            default_runner_name: "default".to_string(),
            datacenter: "default".to_string(),
            public_url: "http://127.0.0.1:6420".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            runner_configs: RunnerConfigLimits::DEFAULT,
        }
    }
}

/// Live actors by state (metrics). Destroyed actors kept for `destroyed_retention` are in
/// none of these: they no longer exist for any caller but `GET /actors?actor_ids=`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActorCounts {
    pub sleeping: usize,
    pub starting: usize,
    pub running: usize,
    pub stopping: usize,
}

/// A routing lookup waiting for its actor.
#[derive(Debug)]
struct Waiter {
    actor_id: String,
    deadline: Instant,
}

/// The control plane. One instance, driven by one thread.
pub struct Engine {
    cfg: EngineConfig,
    rng: StdRng,
    /// Wall-clock anchor: `anchor_ms` (Unix ms) was the time at `anchor`.
    anchor: Instant,
    anchor_ms: i64,

    runners: Slab<runners::Runner>,
    runner_by_identity: HashMap<runners::Identity, usize>,
    runner_by_conn: HashMap<ConnRef, usize>,
    next_fence: i64,

    actors: HashMap<String, actor::Actor>,
    /// (namespace, name, key) → live actor id.
    actor_by_key: HashMap<(String, String, String), String>,
    /// Creation order (for listing): sequence → actor id.
    actor_order: BTreeMap<u64, String>,
    next_actor_seq: u64,
    live_actors: usize,
    /// Live actors per namespace (for `actors_per_namespace`); no entry at 0.
    live_by_namespace: HashMap<String, usize>,
    /// Actors that want a runner and found none with room, oldest first.
    pending: VecDeque<String>,
    /// (alarm Unix ms, actor id).
    alarms: BTreeSet<(i64, String)>,
    /// Start/stop deadlines of starting and stopping actors: (deadline, actor id).
    actor_deadlines: BTreeSet<(Instant, String)>,
    /// Destroyed actors to forget: (forget at, actor id).
    destroyed_gc: BTreeSet<(Instant, String)>,
    /// No actor is placed before this moment (see [`Engine::hold_placement_until`]).
    placement_hold: Option<Instant>,
    /// Actor names announced by the runners currently known, by namespace (see
    /// `runners::NameHolders`). A runner's names leave with the runner.
    actor_names: HashMap<String, BTreeMap<String, runners::NameHolders>>,
    /// Inputs of created actors not yet handed to the store by `take_store_ops` (the only
    /// time the engine holds an input apart from a start command on its way to a runner).
    fresh_inputs: HashMap<String, Vec<u8>>,
    /// Actors whose stored input must be read for a start command (`take_input_loads`).
    input_loads: Vec<String>,

    waiters: HashMap<u64, Waiter>,
    waiter_deadlines: BTreeSet<(Instant, u64)>,

    out: Vec<Action>,
    /// Actors whose durable record changed since the last `take_store_ops`, first-dirtied
    /// first (each at most once: see `Actor::dirty`).
    dirty: Vec<String>,
    /// Store keys to delete at the next `take_store_ops` (forgotten actors).
    store_deletes: Vec<Vec<u8>>,
    /// Writes of hibernating records (one key per socket), in order.
    hib_ops: Vec<StoreOp>,
    /// Runner configs (serverless pools' settings) and their store writes not yet taken.
    runner_configs: runner_configs::RunnerConfigs,
    /// Serverless runner pools: their slots and the outbound requests not yet taken.
    pools: pools::Pools,
}

impl Engine {
    /// `now` and `now_unix_ms` are the same moment: the monotonic clock and the wall clock.
    pub fn new(cfg: EngineConfig, seed: u64, now: Instant, now_unix_ms: i64) -> Self {
        Engine {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            anchor: now,
            anchor_ms: now_unix_ms,
            runners: Slab::new(),
            runner_by_identity: HashMap::new(),
            runner_by_conn: HashMap::new(),
            next_fence: 1,
            actors: HashMap::new(),
            actor_by_key: HashMap::new(),
            actor_order: BTreeMap::new(),
            next_actor_seq: 0,
            live_actors: 0,
            live_by_namespace: HashMap::new(),
            pending: VecDeque::new(),
            alarms: BTreeSet::new(),
            actor_deadlines: BTreeSet::new(),
            destroyed_gc: BTreeSet::new(),
            placement_hold: None,
            actor_names: HashMap::new(),
            fresh_inputs: HashMap::new(),
            input_loads: Vec::new(),
            waiters: HashMap::new(),
            waiter_deadlines: BTreeSet::new(),
            out: Vec::new(),
            dirty: Vec::new(),
            store_deletes: Vec::new(),
            hib_ops: Vec::new(),
            runner_configs: runner_configs::RunnerConfigs::default(),
            pools: pools::Pools::default(),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Live actors by state. Reads every actor (O(actors)): callers that publish it often
    /// throttle it (the shell does so at most every few hundred milliseconds).
    pub fn actor_counts(&self) -> ActorCounts {
        let mut c = ActorCounts::default();
        for a in self.actors.values() {
            match a.status {
                ActorStatus::Sleeping => c.sleeping += 1,
                ActorStatus::Starting => c.starting += 1,
                ActorStatus::Running => c.running += 1,
                ActorStatus::Stopping => c.stopping += 1,
                ActorStatus::Destroyed => {}
            }
        }
        c
    }

    /// Live (not destroyed) actors, O(1): the sum of [`Engine::actor_counts`].
    pub fn live_actors(&self) -> usize {
        self.live_actors
    }

    /// Runner records the control plane holds, O(1): connected runners and disconnected ones
    /// not yet lost (`runner_lost_threshold`).
    pub fn runners_known(&self) -> usize {
        self.runners.len()
    }

    /// Wall-clock milliseconds at `now`.
    pub fn unix_ms(&self, now: Instant) -> i64 {
        let since = now.saturating_duration_since(self.anchor).as_millis();
        self.anchor_ms
            .saturating_add(i64::try_from(since).unwrap_or(i64::MAX))
    }

    /// Dispatch one decoded runner message. `Init` goes to [`Engine::runner_init`] instead (it
    /// needs the connect query); KV and tunnel messages are not the control plane's and are
    /// ignored here.
    pub fn runner_message(&mut self, conn: ConnRef, msg: ToServer, now: Instant) -> Vec<Action> {
        match msg {
            ToServer::Events(events) => self.runner_events(conn, events, now),
            ToServer::AckCommands(ack) => {
                self.runner_ack_commands(conn, &ack.last_command_checkpoints, now)
            }
            ToServer::Stopping => self.runner_stopping(conn, now),
            ToServer::Pong(p) => self.runner_pong(conn, p.ts, now),
            ToServer::Init(_) | ToServer::KvRequest(_) | ToServer::TunnelMessage(_) => Vec::new(),
        }
    }

    /// Time-driven work: lost runners, start/stop deadlines, waiter timeouts, alarms,
    /// forgetting destroyed actors.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        // A hold that ran out is forgotten here (its deadline must not come back).
        self.placement_held(now);
        self.expire_runners(now);
        self.expire_actor_deadlines(now);
        self.expire_waiters(now);
        self.fire_alarms(now);
        self.gc_destroyed(now);
        self.tick_pools(now);
        self.take_out()
    }

    /// The earliest moment at which [`Engine::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut best: Option<Instant> = None;
        let mut consider = |t: Instant| {
            best = Some(match best {
                Some(b) if b <= t => b,
                _ => t,
            })
        };
        for (_, r) in self.runners.iter() {
            if let Some(since) = r.disconnected_at {
                consider(since + self.cfg.runner_lost_threshold);
            }
        }
        if let Some((t, _)) = self.waiter_deadlines.first() {
            consider(*t);
        }
        if let Some(t) = self.placement_hold {
            consider(t);
        }
        if let Some((t, _)) = self.actor_deadlines.first() {
            consider(*t);
        }
        if let Some((ms, _)) = self.alarms.first() {
            consider(self.instant_of_ms(*ms));
        }
        if let Some((t, _)) = self.destroyed_gc.first() {
            consider(*t);
        }
        if let Some(t) = self.pools_deadline() {
            consider(t);
        }
        best
    }

    /// Record that a hibernating client socket of `actor_id` exists, last seen `now` (refresh
    /// it every so often; records older than `hibernation_eligible` are not sent in
    /// `CommandStartActor` and are dropped at the next allocation). The record is durable.
    /// `false` when there is no such live actor (the socket has nothing to wake).
    pub fn hibernating_upsert(
        &mut self,
        actor_id: &str,
        req: HibernatingRequest,
        now: Instant,
    ) -> bool {
        let Some(a) = self.actors.get_mut(actor_id) else {
            return false;
        };
        if a.status == ActorStatus::Destroyed {
            return false;
        }
        a.hibernating.insert(req, now);
        let ms = self.unix_ms(now);
        self.hib_ops.push(store_keys::hib_put(actor_id, req, ms));
        true
    }

    /// Forget a hibernating client socket (it closed, or it is no longer hibernating).
    pub fn hibernating_remove(&mut self, actor_id: &str, req: HibernatingRequest) {
        if let Some(a) = self.actors.get_mut(actor_id) {
            if a.hibernating.remove(&req).is_some() {
                self.hib_ops.push(store_keys::hib_delete(actor_id, req));
            }
        }
    }

    /// The complete list of the hibernatable sockets of shard `shard` of the node with gateway
    /// id `gateway` (several nodes: each shard sends it when the placement leader changed).
    /// Records of that shard that are not listed are forgotten (their removal may have been
    /// lost with the old leader), listed ones are recorded (their record may have been).
    /// The shard of a record is the first byte of its request id. Returns how many were
    /// forgotten.
    pub fn hibernating_sync(
        &mut self,
        gateway: crate::protocol::GatewayId,
        shard: u16,
        listed: &[(std::sync::Arc<str>, HibernatingRequest)],
        now: Instant,
    ) -> usize {
        let keep: std::collections::HashSet<(&str, HibernatingRequest)> =
            listed.iter().map(|(a, r)| (&**a, *r)).collect();
        let n = self.forget_records(|id, h| {
            h.gateway_id == gateway
                && u16::from(h.request_id[0]) == shard
                && !keep.contains(&(id, *h))
        });
        for (actor_id, req) in listed {
            let _ = self.hibernating_upsert(actor_id, *req, now);
        }
        n
    }

    /// Forgets every hibernating-socket record of the node with gateway id `gateway` (several
    /// nodes: the node is gone, so are its client sockets). Returns how many. A node that was
    /// only cut off for a while records its sockets again with its next refresh
    /// (`timeouts.hibernation_refresh_ms`).
    pub fn forget_gateway(&mut self, gateway: crate::protocol::GatewayId) -> usize {
        self.forget_records(|_, h| h.gateway_id == gateway)
    }

    /// Forgets the hibernating-socket records `(actor id, record)` that `gone` picks, in
    /// memory and in the store. Returns how many.
    fn forget_records(&mut self, gone: impl Fn(&str, &HibernatingRequest) -> bool) -> usize {
        let mut n = 0;
        for (id, a) in self.actors.iter_mut() {
            let before = a.hibernating.len();
            a.hibernating.retain(|h, _| {
                let forget = gone(id, h);
                if forget {
                    self.hib_ops.push(store_keys::hib_delete(id, *h));
                }
                !forget
            });
            n += before - a.hibernating.len();
        }
        n
    }

    /// The sockets a start of `actor_id` g`generation` lists, brought up to date with the
    /// actor's records as they are now; the start kept for resending is updated too. `None`
    /// when no such start waits for its acknowledgement.
    ///
    /// A start placed while shards were still applying the actor's stop can miss sockets that
    /// hibernated because of that stop (their records come with the shards' answers); the
    /// control plane holds such a start until every shard answered, then refreshes it here.
    pub fn refresh_start(
        &mut self,
        actor_id: &str,
        generation: u32,
    ) -> Option<Vec<HibernatingRequest>> {
        let a = self.actors.get(actor_id)?;
        if a.generation != generation || a.status == ActorStatus::Destroyed {
            return None;
        }
        let list: Vec<HibernatingRequest> = actor::sorted_hibernating(&a.hibernating)
            .into_iter()
            .map(|(h, _)| h)
            .collect();
        let r = self.runners.get_mut(a.runner?)?;
        let c = r.outbox.iter_mut().find(|c| {
            c.cmd.checkpoint.actor_id == actor_id
                && c.cmd.checkpoint.generation == generation
                && matches!(c.cmd.inner, Command::StartActor(_))
        })?;
        if let Command::StartActor(start) = &mut c.cmd.inner {
            start.hibernating_requests = list.clone();
        }
        Some(list)
    }

    /// The hibernating records of an actor with their last-seen time (tests, metrics).
    pub fn hibernating(&self, actor_id: &str) -> Vec<(HibernatingRequest, Instant)> {
        self.actors
            .get(actor_id)
            .map(|a| actor::sorted_hibernating(&a.hibernating))
            .unwrap_or_default()
    }

    // -----------------------------------------------------------------------------------------
    // internals shared by the sub-modules

    /// Actors whose stored input (`engine/input/{id}`) the shell must read and hand to
    /// [`Engine::input_loaded`]: their start command waits for it. Call after every entry
    /// point, after [`Engine::take_store_ops`] (whose writes the reads must follow).
    pub fn take_input_loads(&mut self) -> Vec<String> {
        std::mem::take(&mut self.input_loads)
    }

    fn take_out(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }

    fn instant_of_ms(&self, ms: i64) -> Instant {
        let delta = ms.saturating_sub(self.anchor_ms);
        if delta <= 0 {
            self.anchor
        } else {
            self.anchor + Duration::from_millis(delta as u64)
        }
    }

    fn random_hex(&mut self, bytes: usize) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(bytes * 2);
        for _ in 0..bytes {
            let b: u8 = self.rng.random();
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }

    /// A random RFC 4122 version-4 style id (`8-4-4-4-12` hex).
    fn random_uuid(&mut self) -> String {
        let mut b = [0u8; 16];
        self.rng.fill(&mut b);
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    }
}
