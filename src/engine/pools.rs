//! Serverless runner pools: the autoscaler and the life of each started runner, as the Rivet
//! engine runs them at the `rivetkit@2.2.1` release (`pegboard/src/workflows/runner_pool.rs`,
//! `serverless/conn.rs`, `runner_pool_error_tracker.rs`, `runner_pool_metadata_poller.rs`).
//!
//! A pool exists per serverless runner config (namespace, runner name). It holds *slots*: each
//! is one outbound request to the app's `GET {url}/start` (a server-sent event stream) that
//! keeps one runner alive; when its stream ends the slot requests again. The autoscaler keeps
//! `desired_runners(cfg, slots)` slots that are not draining, where `slots` counts the pool's
//! actors that are placed or wait for placement.
//!
//! * **Drain** — a slot drains when the pool has too many, when the config's url or headers
//!   changed (`endpoint_config_changed`: all of them), when the config is deleted (all), when
//!   the app's runner version rose and the config says `drain_on_version_upgrade`, or at
//!   `request_lifespan − drain grace`. A draining slot no longer counts, so the autoscaler starts
//!   its replacement at once. Its runner gets no new actors and a stop (sleep) for each of its
//!   actors (they wake elsewhere on the next demand); the engine then waits up to the grace for
//!   the stream to end, and finally closes the runner (1000 `ws.eviction`) and stops the stream.
//!   A slot with no runner yet (requesting, or backing off) just stops its stream.
//! * **Failures** — a stream that ends by itself after its init event is requested again at
//!   once (as the engine's loop does) unless it lived less than `retry_base`. A refused answer (status, content type, bad payload,
//!   connection, timeouts), or a stream that ends before its init event (the engine requests
//!   that one again at once too: a busy loop against a broken app), backs off:
//!   `retry_base × 2^min(n, retry_max_exponent)` plus up to `retry_jitter` from the engine's
//!   seeded rng, `n` counting the slot's failures (reset after `retry_reset` without one). A
//!   failure also sets the pool's *error* (the Rivet engine's `RunnerPoolError`, shown on its
//!   actors by `GET /actors` as `error.runner_pool_error`; `error_clear_successes` successful
//!   starts in a row clear it). While it is set and no runner of the pool is up, a lookup of
//!   one of its actors that is not running fails at once with [`ResolveError::RunnerFailed`]
//!   (the Rivet engine's `guard.actor_runner_failed`; the gateway answers it with its
//!   wake-timeout refusal for now) instead of waiting.
//! * **Metadata** — `GET {url}/metadata` when the pool appears or its endpoint changes, then
//!   every `metadata_poll_interval` (the config's, clamped to at least `metadata_poll_min`).
//!
//! Outbound requests leave as [`serverless::Command`]s ([`Engine::take_outbound`]); the
//! outbound client's [`serverless::Event`]s come back through [`Engine::pool_event`]. Every
//! decision happens in [`Engine::tick`] (scaling, drain deadlines, back-off ends, polls) or in
//! `pool_event`; a change of demand asks for a tick at once through `next_deadline`.
//!
//! Sans-IO: no sockets, no clock, no global rng.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};

use super::actor::ActorStatus;
use super::runner_configs::{desired_runners, ServerlessConfig};
use super::{Action, Engine, ResolveError};
use crate::serverless::{self, start_headers, Failure, Headers, StartHeaders};

/// Most time between two looks at a pool's demand (a rise asks for one at once).
const SCALE_EVERY: Duration = Duration::from_secs(1);

/// Settings of the pools (the `[serverless]` section of the daemon's config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// torpor's public URL, where started runners connect (`x-rivet-endpoint`).
    pub endpoint: String,
    /// The admin token, sent as `x-rivet-token` when authentication is on.
    pub token: Option<String>,
    /// How long before the end of a request's lifespan its runner drains, and how long the
    /// drain may last (`ProtocolMetadata.serverlessDrainGracePeriod`).
    pub drain_grace: Duration,
    /// First back-off after a failed start.
    pub retry_base: Duration,
    /// Largest exponent of the back-off (`retry_base × 2^n`).
    pub retry_max_exponent: u32,
    /// Random extra delay of each back-off, at most.
    pub retry_jitter: Duration,
    /// A slot with no failure for this long starts its back-off from `retry_base` again.
    pub retry_reset: Duration,
    /// Metadata poll interval when the config has none.
    pub metadata_poll_default: Duration,
    /// Shortest metadata poll interval (a config asking for less gets this).
    pub metadata_poll_min: Duration,
    /// Successful starts in a row that clear a pool's error.
    pub error_clear_successes: u32,
}

impl Default for PoolSettings {
    /// The Rivet engine's defaults (`config/src/config/pegboard.rs`).
    fn default() -> Self {
        PoolSettings {
            endpoint: "http://127.0.0.1:6420".into(),
            token: None,
            drain_grace: Duration::from_secs(10),
            retry_base: Duration::from_secs(2),
            retry_max_exponent: 8,
            retry_jitter: Duration::from_millis(500),
            retry_reset: Duration::from_secs(600),
            metadata_poll_default: Duration::from_secs(10),
            metadata_poll_min: Duration::from_secs(5),
            error_clear_successes: 3,
        }
    }
}

/// (namespace, runner name).
pub(super) type PoolKey = (String, String);

/// One pool's runners by state (`torpor_serverless_pool_runners`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStatus {
    pub namespace: String,
    pub pool: String,
    /// `/start` sent, the init event not yet come.
    pub starting: usize,
    /// The init event named the runner.
    pub running: usize,
    /// Waiting to request again after a failure.
    pub backoff: usize,
    /// Draining (lifespan, surplus, a changed or deleted config).
    pub draining: usize,
    /// The pool has an error and no runner up: waiting clients get
    /// `guard.actor_runner_failed`.
    pub failing: bool,
}

/// Where one slot stands.
#[derive(Debug, Clone, PartialEq)]
enum SlotState {
    /// `/start` sent as stream `stream`; `runner_id` once its init event named the runner.
    Live {
        stream: u64,
        runner_id: Option<String>,
        /// When to drain (`request_lifespan − drain grace` after the request).
        drain_at: Instant,
        /// When `/start` was sent.
        since: Instant,
    },
    /// The last request failed; request again at `until`.
    Backoff { until: Instant },
    /// Draining: no longer counted; the stream is stopped and the runner closed at `until`
    /// unless the stream ends first.
    Draining {
        stream: u64,
        runner_id: Option<String>,
        until: Instant,
    },
}

#[derive(Debug)]
struct Slot {
    /// The pool's endpoint generation when the slot was made (a change of url or headers
    /// drains every older slot).
    endpoint_gen: u64,
    state: SlotState,
    failures: u32,
    last_failure: Option<Instant>,
}

impl Slot {
    fn counted(&self) -> bool {
        !matches!(self.state, SlotState::Draining { .. })
    }
}

#[derive(Debug, Default)]
struct Pool {
    endpoint_gen: u64,
    slots: Vec<Slot>,
    /// The last failure, as the Rivet engine's `RunnerPoolError` JSON; cleared by
    /// `error_clear_successes` successes in a row.
    error: Option<Value>,
    successes: u32,
    /// The app's runner version from its metadata.
    runner_version: Option<u32>,
    /// Next metadata poll; `None` while one is in flight.
    poll_at: Option<Instant>,
    metadata_inflight: Option<u64>,
    /// The config is gone: the pool ends once its slots have drained.
    deleted: bool,
}

impl Pool {
    /// Has an error and no runner up: its waiting clients are told at once. (The error itself
    /// stays, shown on the actors, until `error_clear_successes` successes.)
    fn failing(&self) -> bool {
        self.error.is_some()
            && !self.slots.iter().any(|s| {
                matches!(
                    &s.state,
                    SlotState::Live {
                        runner_id: Some(_),
                        ..
                    }
                )
            })
    }
}

/// What an outbound request id belongs to.
#[derive(Debug, Clone)]
enum Req {
    Stream(PoolKey),
    Metadata(PoolKey),
}

/// The pools and the outbound commands not yet taken.
#[derive(Debug, Default)]
pub(super) struct Pools {
    pools: BTreeMap<PoolKey, Pool>,
    requests: HashMap<u64, Req>,
    next_id: u64,
    out: Vec<serverless::Command>,
    /// A tick is wanted now (demand or a config changed).
    scale_due: Option<Instant>,
}

impl Pools {
    fn id(&mut self, req: Req) -> u64 {
        self.next_id += 1;
        self.requests.insert(self.next_id, req);
        self.next_id
    }
}

/// A failure as the Rivet engine's `RunnerPoolError` (`types/src/actor/error.rs`, snake case).
fn pool_error_json(f: &Failure) -> Value {
    match f {
        Failure::Status { status, body } => {
            json!({"serverless_http_error": {"status_code": status, "body": body}})
        }
        Failure::StreamEnded { started: false, .. } => json!("serverless_stream_ended_early"),
        Failure::Payload(e) => {
            json!({"serverless_invalid_sse_payload": {"message": e.to_string(), "raw_payload": null}})
        }
        Failure::ContentType(v) => json!({"serverless_connection_error": {"message": format!(
            "expected Content-Type header to be text/event-stream, received {v:?}"
        )}}),
        other => json!({"serverless_connection_error": {"message": other.to_string()}}),
    }
}

impl Engine {
    /// Outbound requests to hand to the outbound client, in order. Call after every entry
    /// point (`tick` and `pool_event` make them).
    pub fn take_outbound(&mut self) -> Vec<serverless::Command> {
        std::mem::take(&mut self.pools.out)
    }

    /// The pool's error as the Rivet engine shows it (`RunnerPoolError` JSON), if it has one.
    pub fn pool_error(&self, namespace: &str, runner_name: &str) -> Option<&Value> {
        self.pools
            .pools
            .get(&(namespace.to_string(), runner_name.to_string()))?
            .error
            .as_ref()
    }

    /// Slots of a pool that count (not draining), and all of them (tests, metrics).
    pub fn pool_slots(&self, namespace: &str, runner_name: &str) -> (usize, usize) {
        self.pools
            .pools
            .get(&(namespace.to_string(), runner_name.to_string()))
            .map_or((0, 0), |p| {
                (
                    p.slots.iter().filter(|s| s.counted()).count(),
                    p.slots.len(),
                )
            })
    }

    /// Every pool's runners by state, for the metrics (one entry per pool, in key order).
    pub fn pool_statuses(&self) -> Vec<PoolStatus> {
        self.pools
            .pools
            .iter()
            .map(|((namespace, pool), p)| {
                let mut st = PoolStatus {
                    namespace: namespace.clone(),
                    pool: pool.clone(),
                    failing: p.failing(),
                    ..PoolStatus::default()
                };
                for slot in &p.slots {
                    match &slot.state {
                        SlotState::Live {
                            runner_id: None, ..
                        } => st.starting += 1,
                        SlotState::Live { .. } => st.running += 1,
                        SlotState::Backoff { .. } => st.backoff += 1,
                        SlotState::Draining { .. } => st.draining += 1,
                    }
                }
                st
            })
            .collect()
    }

    /// Does runner name `name` of `namespace` have a serverless config (its runners are a
    /// pool's: their `Init` carries the drain grace, as the Rivet engine decides it)?
    pub(super) fn is_pool_runner(&self, namespace: &str, name: &str) -> bool {
        self.runner_configs
            .get(namespace, name)
            .is_some_and(|c| c.serverless().is_some())
    }

    /// Is runner `runner_id` one whose pool slot is draining?
    pub(super) fn pool_draining(&self, runner_id: &str) -> bool {
        self.pools.pools.values().any(|p| {
            p.slots.iter().any(|s| {
                matches!(&s.state, SlotState::Draining { runner_id: Some(r), .. } if r == runner_id)
            })
        })
    }

    /// Are there pools (serverless configs, or slots of deleted ones still draining)?
    pub(super) fn has_pools(&self) -> bool {
        !self.pools.pools.is_empty()
    }

    /// Ask for a tick now (demand or a config changed): the deadline is the engine's anchor,
    /// which every `now` has passed.
    pub(super) fn pools_changed(&mut self) {
        self.pools.scale_due = Some(self.anchor);
    }

    /// A runner config was written or deleted. A serverless config whose url or headers
    /// changed (`endpoint_changed`) drains every slot of the old endpoint and polls the
    /// metadata again; the next tick brings the pools in line with the configs.
    pub(super) fn pool_config_written(&mut self, key: PoolKey, endpoint_changed: bool) {
        if let Some(pool) = self.pools.pools.get_mut(&key) {
            if endpoint_changed {
                pool.endpoint_gen += 1;
                pool.poll_at = Some(self.anchor);
                pool.error = None;
                pool.successes = 0;
            }
        }
        self.pools_changed();
    }

    /// Pools for every serverless config, marked deleted for the configs that are gone.
    fn sync_pools(&mut self) {
        let anchor = self.anchor;
        for (key, pool) in self.pools.pools.iter_mut() {
            let serverless = self
                .runner_configs
                .get(&key.0, &key.1)
                .is_some_and(|c| c.serverless().is_some());
            if !serverless && !pool.deleted {
                pool.deleted = true;
                pool.poll_at = None;
                pool.error = None;
            } else if serverless && pool.deleted {
                pool.deleted = false;
                pool.endpoint_gen += 1;
                pool.poll_at = Some(anchor);
            }
        }
        for key in self.runner_configs.serverless_keys() {
            self.pools.pools.entry(key).or_insert_with(|| Pool {
                poll_at: Some(anchor),
                ..Pool::default()
            });
        }
    }

    /// The earliest moment a pool has something to do.
    pub(super) fn pools_deadline(&self) -> Option<Instant> {
        let mut best = self.pools.scale_due;
        let mut consider = |t: Instant| {
            if best.is_none_or(|b| t < b) {
                best = Some(t);
            }
        };
        for p in self.pools.pools.values() {
            if let Some(t) = p.poll_at {
                consider(t);
            }
            for s in &p.slots {
                match &s.state {
                    SlotState::Live { drain_at, .. } => consider(*drain_at),
                    SlotState::Backoff { until } | SlotState::Draining { until, .. } => {
                        consider(*until)
                    }
                }
            }
        }
        best
    }

    /// Actor slots in demand per pool: actors placed (starting, running, stopping) or waiting
    /// for placement, by (namespace, runner name). O(actors); runs only when pools exist.
    fn pool_demand(&self) -> HashMap<PoolKey, u64> {
        let mut d: HashMap<PoolKey, u64> = HashMap::new();
        for a in self.actors.values() {
            let wants = a.status.placed() || (a.status == ActorStatus::Sleeping && a.pending);
            if !wants {
                continue;
            }
            let key = (a.namespace.clone(), a.runner_name.clone());
            if self.pools.pools.contains_key(&key) {
                *d.entry(key).or_default() += 1;
            }
        }
        d
    }

    /// Time-driven pool work (part of [`Engine::tick`]).
    pub(super) fn tick_pools(&mut self, now: Instant) {
        if self.pools.scale_due.is_some_and(|t| t <= now) {
            self.pools.scale_due = None;
        }
        self.sync_pools();
        if self.pools.pools.is_empty() {
            return;
        }
        // Demand that falls is seen at the latest one interval later.
        self.pools.scale_due = Some(now + SCALE_EVERY);
        let demand = self.pool_demand();
        let keys: Vec<PoolKey> = self.pools.pools.keys().cloned().collect();
        for key in keys {
            self.tick_pool(&key, demand.get(&key).copied().unwrap_or(0), now);
        }
    }

    fn tick_pool(&mut self, key: &PoolKey, demand: u64, now: Instant) {
        let cfg: Option<ServerlessConfig> = self
            .runner_config(&key.0, &key.1)
            .and_then(|c| c.serverless().cloned());
        let drain_on_upgrade = self
            .runner_config(&key.0, &key.1)
            .is_some_and(|c| c.drain_on_version_upgrade);
        let Some(pool) = self.pools.pools.get(key) else {
            return;
        };
        // 1. Deadlines of the slots: drains at lifespan, drains over, back-offs over.
        let gen = pool.endpoint_gen;
        let deleted = pool.deleted || cfg.is_none();
        let mut to_drain: Vec<usize> = Vec::new();
        let mut finished: Vec<usize> = Vec::new();
        let mut retry: Vec<usize> = Vec::new();
        for (i, s) in pool.slots.iter().enumerate() {
            match &s.state {
                SlotState::Live { drain_at, .. } => {
                    if *drain_at <= now || deleted || s.endpoint_gen != gen {
                        to_drain.push(i);
                    }
                }
                SlotState::Backoff { until } => {
                    if deleted || s.endpoint_gen != gen {
                        finished.push(i);
                    } else if *until <= now {
                        retry.push(i);
                    }
                }
                SlotState::Draining { until, .. } => {
                    if *until <= now {
                        finished.push(i);
                    }
                }
            }
        }
        // Runners of an older version than the app's, when the config asks for it.
        if drain_on_upgrade {
            if let Some(v) = pool.runner_version {
                for (i, s) in pool.slots.iter().enumerate() {
                    if let SlotState::Live {
                        runner_id: Some(rid),
                        ..
                    } = &s.state
                    {
                        let older = self
                            .runners
                            .iter()
                            .any(|(_, r)| r.runner_id == *rid && r.version < v);
                        if older && !to_drain.contains(&i) {
                            to_drain.push(i);
                        }
                    }
                }
            }
        }
        for i in to_drain {
            self.drain_slot(key, i, now);
        }
        for i in retry {
            if let Some(cfg) = &cfg {
                self.request_slot(key, i, cfg, now);
            }
        }
        self.end_slots(key, finished);
        // 2. Scale: keep `desired` counted slots.
        let Some(cfg) = cfg.filter(|_| !deleted) else {
            let pool = &self.pools.pools[key];
            if pool.slots.is_empty() {
                self.pools.pools.remove(key);
            }
            return;
        };
        let desired = desired_runners(&cfg, demand) as usize;
        let counted: Vec<usize> = self.pools.pools[key]
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.counted())
            .map(|(i, _)| i)
            .collect();
        if counted.len() > desired {
            // Drain the surplus: slots without a runner first, then the newest.
            let pool = &self.pools.pools[key];
            let mut order = counted.clone();
            order.sort_by_key(|&i| {
                let has_runner = matches!(
                    &pool.slots[i].state,
                    SlotState::Live {
                        runner_id: Some(_),
                        ..
                    }
                );
                (has_runner, std::cmp::Reverse(i))
            });
            let surplus: Vec<usize> = order.into_iter().take(counted.len() - desired).collect();
            let mut ended = Vec::new();
            for i in surplus {
                if matches!(
                    self.pools.pools[key].slots[i].state,
                    SlotState::Backoff { .. }
                ) {
                    ended.push(i);
                } else {
                    self.drain_slot(key, i, now);
                }
            }
            self.end_slots(key, ended);
        } else {
            for _ in counted.len()..desired {
                let pool = self.pools.pools.get_mut(key).expect("pool");
                pool.slots.push(Slot {
                    endpoint_gen: gen,
                    state: SlotState::Backoff { until: now },
                    failures: 0,
                    last_failure: None,
                });
                let i = pool.slots.len() - 1;
                self.request_slot(key, i, &cfg, now);
            }
        }
        // 3. Metadata.
        let pool = self.pools.pools.get_mut(key).expect("pool");
        if pool.poll_at.is_some_and(|t| t <= now) && pool.metadata_inflight.is_none() {
            pool.poll_at = None;
            let id = self.pools.id(Req::Metadata(key.clone()));
            let pool = self.pools.pools.get_mut(key).expect("pool");
            pool.metadata_inflight = Some(id);
            let headers = Headers(
                cfg.headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
            let headers = Headers(
                headers
                    .0
                    .into_iter()
                    .filter(|(n, _)| !serverless::headers::is_dropped_header(n))
                    .collect(),
            );
            self.pools.out.push(serverless::Command::Metadata {
                id,
                url: cfg.url.clone(),
                headers,
            });
        }
    }

    /// Send `/start` for slot `i` (a new stream id).
    fn request_slot(&mut self, key: &PoolKey, i: usize, cfg: &ServerlessConfig, now: Instant) {
        let id = self.pools.id(Req::Stream(key.clone()));
        let lifespan = Duration::from_secs(u64::from(cfg.request_lifespan));
        // At `lifespan − grace`, but never in the first half of the lifespan (a grace as long
        // as the lifespan would restart runners in a loop).
        let drain_at = now
            + lifespan
                .saturating_sub(self.cfg.pools.drain_grace)
                .max(lifespan / 2);
        let configured = Headers(
            cfg.headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
        let headers = start_headers(
            &configured,
            &StartHeaders {
                endpoint: &self.cfg.pools.endpoint,
                total_slots: cfg.slots_per_runner,
                runner_name: &key.1,
                namespace_name: &key.0,
                token: self.cfg.pools.token.as_deref(),
            },
        );
        self.pools.out.push(serverless::Command::Start {
            id,
            url: cfg.url.clone(),
            headers,
            lifespan,
        });
        if let Some(s) = self
            .pools
            .pools
            .get_mut(key)
            .and_then(|p| p.slots.get_mut(i))
        {
            s.state = SlotState::Live {
                stream: id,
                runner_id: None,
                drain_at,
                since: now,
            };
        }
    }

    /// Drain slot `i`: a slot with a runner stops its actors and waits up to the grace; one
    /// without stops its stream at once (ended at the next tick).
    fn drain_slot(&mut self, key: &PoolKey, i: usize, now: Instant) {
        let grace = self.cfg.pools.drain_grace;
        let Some(s) = self
            .pools
            .pools
            .get_mut(key)
            .and_then(|p| p.slots.get_mut(i))
        else {
            return;
        };
        let (stream, runner_id) = match &s.state {
            SlotState::Live {
                stream, runner_id, ..
            } => (*stream, runner_id.clone()),
            SlotState::Backoff { .. } => {
                s.state = SlotState::Draining {
                    stream: 0,
                    runner_id: None,
                    until: now,
                };
                return;
            }
            SlotState::Draining { .. } => return,
        };
        let until = if runner_id.is_some() {
            now + grace
        } else {
            now
        };
        s.state = SlotState::Draining {
            stream,
            runner_id: runner_id.clone(),
            until,
        };
        if let Some(rid) = runner_id {
            self.drain_runner(&rid, now);
        }
    }

    /// The runner gets no new actors and a stop (sleep) for each of its actors.
    fn drain_runner(&mut self, runner_id: &str, now: Instant) {
        let Some(idx) = self
            .runners
            .iter()
            .find(|(_, r)| r.runner_id == runner_id)
            .map(|(i, _)| i)
        else {
            return;
        };
        let r = &mut self.runners[idx];
        r.stopping = true;
        let ids: Vec<String> = r.actors.iter().cloned().collect();
        for id in ids {
            self.request_stop(&id, false, now);
        }
    }

    /// Remove slots (indices of one pool): stop their streams, close their runners
    /// (`ws.eviction`) if still connected.
    fn end_slots(&mut self, key: &PoolKey, mut idx: Vec<usize>) {
        idx.sort_unstable();
        idx.dedup();
        for i in idx.into_iter().rev() {
            let Some(pool) = self.pools.pools.get_mut(key) else {
                return;
            };
            if i >= pool.slots.len() {
                continue;
            }
            let slot = pool.slots.remove(i);
            let (stream, runner_id) = match slot.state {
                SlotState::Live {
                    stream, runner_id, ..
                }
                | SlotState::Draining {
                    stream, runner_id, ..
                } => (stream, runner_id),
                SlotState::Backoff { .. } => (0, None),
            };
            if stream != 0 && self.pools.requests.remove(&stream).is_some() {
                self.pools
                    .out
                    .push(serverless::Command::Stop { id: stream });
            }
            if let Some(rid) = runner_id {
                let conn = self
                    .runners
                    .iter()
                    .find(|(_, r)| r.runner_id == rid)
                    .and_then(|(_, r)| r.conn);
                if let Some(conn) = conn {
                    self.out.push(Action::CloseRunner {
                        conn,
                        code: 1000,
                        reason: "ws.eviction",
                    });
                }
            }
        }
    }

    /// Where stream `id` is: (pool, slot index).
    fn slot_of_stream(&self, id: u64) -> Option<(PoolKey, usize)> {
        let Some(Req::Stream(key)) = self.pools.requests.get(&id) else {
            return None;
        };
        let pool = self.pools.pools.get(key)?;
        let i = pool.slots.iter().position(|s| match &s.state {
            SlotState::Live { stream, .. } | SlotState::Draining { stream, .. } => *stream == id,
            SlotState::Backoff { .. } => false,
        })?;
        Some((key.clone(), i))
    }

    /// An event of the outbound client.
    pub fn pool_event(&mut self, ev: serverless::Event, now: Instant) -> Vec<Action> {
        match ev {
            serverless::Event::Started { id, runner_id, .. } => {
                self.stream_started(id, runner_id, now)
            }
            serverless::Event::Ping { .. } => {}
            serverless::Event::Ended { id, .. } => self.stream_over(id, None, now),
            serverless::Event::Failed { id, failure } => self.stream_over(id, Some(failure), now),
            serverless::Event::Metadata { id, result } => {
                let Some(Req::Metadata(key)) = self.pools.requests.remove(&id) else {
                    return self.take_out();
                };
                let interval = self
                    .runner_config(&key.0, &key.1)
                    .and_then(|c| c.serverless())
                    .map(|s| {
                        s.metadata_poll_interval
                            .map_or(self.cfg.pools.metadata_poll_default, Duration::from_millis)
                            .max(self.cfg.pools.metadata_poll_min)
                    });
                let mut newer = false;
                if let Some(pool) = self.pools.pools.get_mut(&key) {
                    pool.metadata_inflight = None;
                    if !pool.deleted {
                        pool.poll_at = interval.map(|d| now + d);
                    }
                    if let Ok(md) = result {
                        if md.runner_version.is_some() && md.runner_version != pool.runner_version {
                            pool.runner_version = md.runner_version;
                            newer = true;
                        }
                    }
                }
                if newer {
                    // Runners of an older version may drain (`drain_on_version_upgrade`).
                    self.pools_changed();
                }
            }
        }
        self.take_out()
    }

    fn stream_started(&mut self, id: u64, runner_id: String, now: Instant) {
        let Some((key, i)) = self.slot_of_stream(id) else {
            return;
        };
        let clear = self.cfg.pools.error_clear_successes;
        let pool = self.pools.pools.get_mut(&key).expect("pool");
        pool.successes = pool.successes.saturating_add(1);
        if pool.successes >= clear {
            pool.error = None;
        }
        let draining = match &mut pool.slots[i].state {
            SlotState::Live { runner_id: r, .. } => {
                *r = Some(runner_id.clone());
                false
            }
            SlotState::Draining {
                runner_id: r,
                until,
                ..
            } => {
                // A runner named while its slot drains drains too, for the grace.
                *r = Some(runner_id.clone());
                *until = now + self.cfg.pools.drain_grace;
                true
            }
            SlotState::Backoff { .. } => false,
        };
        if draining {
            self.drain_runner(&runner_id, now);
        }
    }

    /// Stream `id` ended (`failure` is `None` when torpor closed it).
    fn stream_over(&mut self, id: u64, failure: Option<Failure>, now: Instant) {
        let found = self.slot_of_stream(id);
        self.pools.requests.remove(&id);
        let Some((key, i)) = found else {
            return;
        };
        let cfg = self
            .runner_config(&key.0, &key.1)
            .and_then(|c| c.serverless().cloned());
        let retry_reset = self.cfg.pools.retry_reset;
        let pool = self.pools.pools.get_mut(&key).expect("pool");
        let lived = match pool.slots[i].state {
            SlotState::Draining { .. } => {
                // The drain is over: the stream ended within the grace.
                pool.slots.remove(i);
                return;
            }
            SlotState::Live { since, .. } => now.saturating_duration_since(since),
            SlotState::Backoff { .. } => Duration::MAX,
        };
        let backoff = match &failure {
            // Ended by itself after its init event (or at the lifespan): request again at
            // once, as the engine's loop does, unless it lived less than the first back-off
            // (an app that ends every stream at once would otherwise be called in a loop).
            None | Some(Failure::StreamEnded { started: true, .. })
                if lived >= self.cfg.pools.retry_base =>
            {
                false
            }
            None | Some(Failure::StreamEnded { started: true, .. }) => true,
            // Refused, broken, or ended before naming a runner (which, requested again at
            // once, would be a busy loop against a broken app): back off.
            Some(f) => {
                pool.error = Some(pool_error_json(f));
                pool.successes = 0;
                true
            }
        };
        if backoff {
            let s = &mut pool.slots[i];
            if s.last_failure
                .is_some_and(|t| now.saturating_duration_since(t) >= retry_reset)
            {
                s.failures = 0;
            }
            let exp = s.failures.min(self.cfg.pools.retry_max_exponent).min(30);
            s.failures = s.failures.saturating_add(1);
            s.last_failure = Some(now);
            let base = self.cfg.pools.retry_base.saturating_mul(1u32 << exp);
            let jitter_ms = u64::try_from(self.cfg.pools.retry_jitter.as_millis()).unwrap_or(0);
            let jitter = if jitter_ms == 0 {
                0
            } else {
                self.rng.random_range(0..jitter_ms)
            };
            let until = now + base + Duration::from_millis(jitter);
            let pool = self.pools.pools.get_mut(&key).expect("pool");
            pool.slots[i].state = SlotState::Backoff { until };
            self.fail_pool_waiters(&key);
        } else {
            let failing = pool.error.is_some();
            match cfg {
                Some(cfg) => self.request_slot(&key, i, &cfg, now),
                None => {
                    if let Some(pool) = self.pools.pools.get_mut(&key) {
                        pool.slots.remove(i);
                    }
                }
            }
            if failing {
                self.fail_pool_waiters(&key);
            }
        }
    }

    /// While the pool has an error, the waiting lookups of its actors fail at once.
    fn fail_pool_waiters(&mut self, key: &PoolKey) {
        if !self.pools.pools.get(key).is_some_and(Pool::failing) {
            return;
        }
        let ids: Vec<String> = self
            .actors
            .values()
            .filter(|a| {
                !a.waiters.is_empty()
                    && a.status != ActorStatus::Running
                    && a.namespace == key.0
                    && a.runner_name == key.1
            })
            .map(|a| a.id.clone())
            .collect();
        for id in ids {
            self.fail_waiters(&id, ResolveError::RunnerFailed);
        }
    }

    /// A new lookup of an actor that is not routable: fails at once while its pool has an
    /// error and no runner up (the actor is still asked to run, so the pool keeps trying).
    pub(super) fn pool_failing_for(&self, actor_id: &str) -> bool {
        let Some(a) = self.actors.get(actor_id) else {
            return false;
        };
        let key = (a.namespace.clone(), a.runner_name.clone());
        self.pools.pools.get(&key).is_some_and(Pool::failing)
    }
}
