//! The simulated world: gateway shards (the shipped gateway cores), the control plane (the
//! real [`Engine`] behind the shipped [`crate::plane`] step), runner processes (the real runner
//! core hosting simulated actors), clients, the network between them and simulated time (a
//! fixed base `Instant` plus an offset).
//!
//! Files: `network.rs` (runner processes, their connections, and the shell around the
//! gateway cores: outputs, mailboxes, the control plane), `clients.rs` (client WebSockets),
//! `time.rs` (advancing the clock, settling the network), `checks.rs` (the invariants after
//! every step and at the end).
//!
//! A run is a sequence of seeded random steps; after every step the invariant checker runs.
//! At the end the world is quiesced (runners reconnected, everything delivered and
//! acknowledged) and checked for completeness and leaks. Nothing here sleeps, spawns or
//! touches a socket.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::actor::{lock, Shared, SimRunner, Store};
use super::clients::Client;
use super::config::{Failure, SimConfig, Stats};
use super::network::{Conn, Peer};
use crate::engine::{CrashPolicy, CreateActor, Engine, EngineConfig};
use crate::gateway::{ConnId, Gateway, Output, Settings, ShardMsg};
use crate::metrics::Metrics;

/// Unix milliseconds at the simulated epoch.
pub(super) const T0_MS: i64 = 1_700_000_000_000;

pub(crate) struct World {
    pub cfg: SimConfig,
    pub seed: u64,
    pub rng: StdRng,
    pub t0: Instant,
    pub now: Instant,
    pub step: u64,
    pub engine: Engine,
    /// The control plane's state (stop barriers) in front of the engine.
    pub plane: crate::plane::Plane,
    /// The gateway shards' cores of every node, by global index (node × shards + shard).
    pub gw: Vec<Gateway>,
    /// Each node's metrics.
    pub metrics: Vec<Metrics>,
    /// The nodes, the bus between them and the placement lease.
    pub cluster: super::nodes::Cluster,
    /// Each shard's mailbox (its one channel in the daemon): the control plane's messages
    /// and other shards' (tunnel traffic, frames for a runner), with the moment each was
    /// sent. Senders are other threads, so these arrive late and in any order relative to
    /// the shard's own traffic, but in sending order among themselves.
    pub control_mail: Vec<VecDeque<(Instant, ShardMsg)>>,
    /// What the cores asked of their shells and the shells have not done yet.
    pub outputs: VecDeque<(usize, Output)>,
    /// The shell is carrying out outputs (a nested call leaves its own to that loop).
    pub pumping: bool,
    pub shared: Shared,
    pub runners: Vec<SimRunner>,
    /// Runner connections by the simulation's connection number.
    pub conns: BTreeMap<u32, Conn>,
    pub next_conn: u32,
    /// What each gateway connection is on the other side.
    pub peers: BTreeMap<(usize, ConnId), Peer>,
    /// Connections the runner lost whose close the gateway has not noticed yet.
    /// With the moment the runner lost them (the gateway's ping timeout bounds the delay).
    pub pending_notices: Vec<(u32, Instant)>,
    pub actor_ids: Vec<String>,
    /// Runner processes started so far (names new runner keys).
    pub incarnations: u32,
    pub clients: BTreeMap<u32, Client>,
    pub next_client: u32,
    /// Routing questions in flight: (shard, waiter) → the client that waits (none: a wake
    /// without a socket, as an HTTP request's).
    pub waiters: BTreeMap<(usize, u32), Option<u32>>,
    /// `CommandStartActor.hibernatingRequests` per (actor, generation), as client ids.
    pub start_lists: BTreeMap<(String, u32), Vec<u32>>,
    /// Start commands a runner received: (runnerId, actor, generation).
    pub starts_delivered: BTreeSet<(String, String, u32)>,
    /// With `naive_records`: clients whose record the shell registered late.
    pub late_records: BTreeSet<u32>,
    pub failures: Vec<String>,
    pub stats: Stats,
    pub digest: std::collections::hash_map::DefaultHasher,
    /// Print every step and action (`SIM_TRACE=1`).
    pub trace: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Ev {
    Open,
    Send,
    Deliver,
    Ack,
    TimeSmall,
    TimeBig,
    Drop,
    Reconnect,
    Notice,
    Sleep,
    Wake,
    ClientClose,
    ActorClose,
    Drain,
    Crash,
    LeaseLoss,
}

const EVENTS: &[(u32, Ev)] = &[
    (6, Ev::Open),
    (22, Ev::Send),
    (34, Ev::Deliver),
    (10, Ev::Ack),
    (8, Ev::TimeSmall),
    (1, Ev::TimeBig),
    (2, Ev::Drop),
    (4, Ev::Reconnect),
    (3, Ev::Notice),
    (3, Ev::Sleep),
    (2, Ev::Wake),
    (2, Ev::ClientClose),
    (1, Ev::ActorClose),
    (1, Ev::Drain),
    (1, Ev::Crash),
    (1, Ev::LeaseLoss),
];

impl World {
    pub fn new(seed: u64, cfg: SimConfig) -> World {
        let t0 = Instant::now();
        let shared: Shared = Arc::new(std::sync::Mutex::new(Store {
            single_instance: cfg.single_instance,
            actor_sends: cfg.actor_sends,
            ..Store::default()
        }));
        let mut engine = Engine::new(EngineConfig::default(), seed, t0, T0_MS);
        let mut actor_ids = Vec::new();
        for i in 0..cfg.actors {
            let created = engine.create_actor(
                CreateActor {
                    namespace: "default".into(),
                    name: "sim".into(),
                    key: Some(format!("a{i}")),
                    runner_name: None,
                    input: None,
                    crash_policy: CrashPolicy::Sleep,
                },
                t0,
            );
            if let Ok((info, _no_runner_yet)) = created {
                actor_ids.push(info.actor_id);
            }
        }
        let runners = (0..cfg.runners)
            .map(|no| {
                let policy = if cfg.immediate_acks {
                    crate::runner::AckPolicy::Immediate
                } else {
                    crate::runner::AckPolicy::Manual
                };
                SimRunner::new(
                    no,
                    0,
                    cfg.slots,
                    policy,
                    cfg.ack_on_restore,
                    cfg.trust_runner_memory,
                    &shared,
                )
            })
            .collect();
        let metrics: Vec<Metrics> = (0..cfg.nodes).map(|_| Metrics::new(cfg.shards)).collect();
        let config = Arc::new(cfg.gateway_config());
        let gw = (0..cfg.nodes * cfg.shards)
            .map(|g| {
                let (node, s) = (g / cfg.shards, g % cfg.shards);
                let settings = Settings {
                    shard: s as u16,
                    shards: cfg.shards,
                    config: config.clone(),
                    metrics: metrics[node].clone(),
                    gateway_id: super::actor::gateway_id(node),
                    clustered: cfg.nodes > 1,
                };
                Gateway::new(settings, seed ^ g as u64, t0, T0_MS)
            })
            .collect();
        let mut cluster = super::nodes::Cluster::new(cfg.nodes, seed);
        for op in engine.take_store_ops() {
            if let crate::engine::StoreOp::Put { key, value } = op {
                cluster.records.insert(key, value);
            }
        }
        World {
            rng: StdRng::seed_from_u64(seed),
            seed,
            t0,
            now: t0,
            step: 0,
            engine,
            plane: crate::plane::Plane::new(cfg.shards),
            gw,
            metrics,
            cluster,
            control_mail: (0..cfg.nodes * cfg.shards)
                .map(|_| VecDeque::new())
                .collect(),
            outputs: VecDeque::new(),
            pumping: false,
            shared,
            runners,
            conns: BTreeMap::new(),
            next_conn: 1,
            peers: BTreeMap::new(),
            pending_notices: Vec::new(),
            actor_ids,
            incarnations: 0,
            clients: BTreeMap::new(),
            next_client: 1,
            waiters: BTreeMap::new(),
            start_lists: BTreeMap::new(),
            starts_delivered: BTreeSet::new(),
            late_records: BTreeSet::new(),
            failures: Vec::new(),
            stats: Stats::default(),
            digest: Default::default(),
            trace: std::env::var("SIM_TRACE").is_ok_and(|v| v == "1"),
            cfg,
        }
    }

    /// Prints a trace line when tracing (the closure is not run otherwise).
    pub fn log(&self, f: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{} t={}ms] {}", self.step, self.ms(), f());
        }
    }

    pub fn fail(&mut self, msg: impl Into<String>) {
        self.failures.push(msg.into());
    }

    pub(super) fn failure(&self) -> Option<Failure> {
        let store = lock(&self.shared);
        // Actor-side findings happen first in causal order (a bad delivery, then the timeout
        // it leads to), so they lead.
        let all: Vec<&String> = store.failures.iter().chain(self.failures.iter()).collect();
        if all.is_empty() {
            return None;
        }
        let mut message = all[0].clone();
        for more in all.iter().skip(1).take(4) {
            message.push_str("\n  then: ");
            message.push_str(more);
        }
        Some(Failure {
            seed: self.seed,
            step: self.step,
            message,
        })
    }

    pub(super) fn ms(&self) -> u64 {
        self.now.duration_since(self.t0).as_millis() as u64
    }

    // -----------------------------------------------------------------------------------------
    // The run

    /// Runs the whole scenario; `Err` on the first violated invariant.
    pub fn run(mut self) -> Result<(Stats, u64), Failure> {
        self.cluster_start();
        // Runners come up first.
        for no in 0..self.runners.len() {
            self.runner_connect(no);
        }
        self.check()?;
        for _ in 0..self.cfg.steps {
            self.step += 1;
            self.random_step();
            self.check()?;
        }
        self.step += 1;
        self.quiesce_and_check()?;
        self.stats.steps = self.step;
        {
            let store = lock(&self.shared);
            self.stats.messages_delivered = store.delivered;
            self.stats.restores = store.restores;
            self.stats.stale_remembered = store.stale_remembered;
            self.stats.stale_starts = store.stale_starts;
            self.stats.longest_socket = store
                .socks
                .values()
                .map(|d| u64::from(d.last_seq))
                .max()
                .unwrap_or(0);
        }
        use crate::metrics::Counter;
        let count = |c: Counter| self.metrics.iter().map(|m| m.counter(c)).sum::<u64>();
        self.stats.replays = count(Counter::Replays);
        self.stats.replayed_messages = count(Counter::ReplayedMessages);
        self.stats.hibernations = count(Counter::Hibernations);
        self.stats.acks_ignored = count(Counter::AcksIgnored);
        self.stats.lease_losses = self.cluster.losses;
        self.stats.multi_node = u64::from(self.cfg.nodes > 1);
        self.stats.bus_dropped = self.cluster.dropped;
        Ok((self.stats, self.digest.finish()))
    }

    fn random_step(&mut self) {
        // A lease is lost only in runs that model it (the others draw as before).
        let lease = self.cfg.lease_loss;
        let events = EVENTS.iter().filter(|(_, e)| lease || *e != Ev::LeaseLoss);
        let total: u32 = events.clone().map(|(w, _)| w).sum();
        let mut pick = self.rng.random_range(0..total);
        let mut ev = Ev::Deliver;
        for (w, e) in events {
            if pick < *w {
                ev = *e;
                break;
            }
            pick -= w;
        }
        ev.hash(&mut self.digest);
        self.log(|| format!("event {ev:?}"));
        match ev {
            Ev::Open => {
                let live = self.clients.values().filter(|c| !c.is_closed()).count();
                if live < self.cfg.max_sockets && !self.actor_ids.is_empty() {
                    let a = self.rng.random_range(0..self.actor_ids.len());
                    let hib = self.rng.random_bool(self.cfg.hib_probability);
                    self.client_open(a, hib);
                }
            }
            Ev::Send => {
                // A client has at most a few messages in hand (its socket buffer is small).
                let cap = self.cfg.client_queue;
                if let Some(id) = self.pick_client(|c| c.is_open() && c.queue.len() < cap) {
                    let n = self.rng.random_range(1..=self.cfg.send_burst.max(1));
                    for _ in 0..n {
                        let pad = if self.rng.random_bool(0.1) {
                            self.rng.random_range(0..=self.cfg.limits.max_bytes + 40)
                        } else {
                            self.rng.random_range(0..=24)
                        };
                        self.client_enqueue(id, pad);
                    }
                    self.client_send(id);
                }
            }
            Ev::Deliver => {
                // Runner connections (either way) and the control plane's mailboxes.
                let mut busy: Vec<(u32, u8)> = self
                    .conns
                    .iter()
                    .flat_map(|(g, c)| {
                        let mut v = Vec::new();
                        if !c.g2r.is_empty() {
                            v.push((*g, 0));
                        }
                        if !c.r2g.is_empty() {
                            v.push((*g, 1));
                        }
                        v
                    })
                    .collect();
                for (s, q) in self.control_mail.iter().enumerate() {
                    if !q.is_empty() {
                        busy.push((s as u32, 2));
                    }
                }
                if self.bus_busy() {
                    busy.push((0, 3));
                }
                if !busy.is_empty() {
                    let (g, way) = busy[self.rng.random_range(0..busy.len())];
                    let n = self.rng.random_range(1..=4);
                    match way {
                        0 => self.deliver_g2r(g, n),
                        1 => self.deliver_r2g(g, n),
                        2 => self.deliver_control(g as usize, n),
                        _ => self.bus_deliver_random(n),
                    }
                }
            }
            Ev::Ack => self.random_ack(),
            Ev::TimeSmall => {
                let dt = Duration::from_millis(self.rng.random_range(50..=3000));
                self.advance(dt);
            }
            Ev::TimeBig => {
                let dt = Duration::from_millis(self.rng.random_range(8_000..=20_000));
                self.advance(dt);
            }
            Ev::Drop => {
                let up: Vec<usize> = (0..self.runners.len())
                    .filter(|&n| self.runners[n].conn.is_some())
                    .collect();
                if !up.is_empty() {
                    let no = up[self.rng.random_range(0..up.len())];
                    let notice_now = self.rng.random_bool(0.5);
                    self.runner_drop(no, notice_now);
                }
            }
            Ev::Reconnect => {
                let down: Vec<usize> = (0..self.runners.len())
                    .filter(|&n| self.runners[n].conn.is_none())
                    .collect();
                if !down.is_empty() {
                    let no = down[self.rng.random_range(0..down.len())];
                    self.runner_connect(no);
                }
            }
            Ev::Notice => {
                if !self.pending_notices.is_empty() {
                    let i = self.rng.random_range(0..self.pending_notices.len());
                    let (c, _) = self.pending_notices.remove(i);
                    self.gateway_notice(c);
                }
            }
            Ev::Sleep => self.random_sleep(),
            Ev::Wake => {
                if !self.actor_ids.is_empty() {
                    let a = self.rng.random_range(0..self.actor_ids.len());
                    let id = self.actor_ids[a].clone();
                    self.dummy_resolve(&id);
                }
            }
            Ev::ClientClose => {
                if !self.cfg.random_closes {
                    return;
                }
                if let Some(id) = self.pick_client(|c| c.may_close()) {
                    self.client_close(id);
                }
            }
            Ev::ActorClose => {
                if self.cfg.random_closes {
                    self.random_actor_close();
                }
            }
            Ev::Drain => {
                let up: Vec<usize> = (0..self.runners.len())
                    .filter(|&n| self.runners[n].conn.is_some() && !self.runners[n].draining)
                    .collect();
                if !up.is_empty() {
                    let no = up[self.rng.random_range(0..up.len())];
                    self.runners[no].draining = true;
                    let hosting = lock(&self.shared)
                        .instances
                        .values()
                        .any(|s| s.iter().any(|(r, _)| *r == no));
                    if hosting {
                        self.stats.drains_hosting += 1;
                    }
                    self.runners[no].core.begin_shutdown();
                    self.runner_flush(no);
                }
            }
            Ev::LeaseLoss => {
                if self.rng.random_bool(0.3) {
                    self.lose_lease();
                }
            }
            Ev::Crash => {
                if !self.runners.is_empty() {
                    let no = self.rng.random_range(0..self.runners.len());
                    let notice_now = self.rng.random_bool(0.5);
                    self.runner_restart(no, notice_now);
                }
            }
        }
    }

    fn pick_client(&mut self, f: impl Fn(&Client) -> bool) -> Option<u32> {
        let ids: Vec<u32> = self
            .clients
            .iter()
            .filter(|(_, c)| f(c))
            .map(|(i, _)| *i)
            .collect();
        if ids.is_empty() {
            None
        } else {
            Some(ids[self.rng.random_range(0..ids.len())])
        }
    }

    // -----------------------------------------------------------------------------------------
    // Actor-side events

    fn running_actors(&self) -> Vec<(String, usize, u32)> {
        lock(&self.shared)
            .handles
            .iter()
            .map(|(a, (r, g, _))| (a.clone(), *r, *g))
            .collect()
    }

    /// The actor acknowledges on one of its sockets: usually everything it processed,
    /// sometimes an older index (late), sometimes the same again.
    fn random_ack(&mut self) {
        let running = self.running_actors();
        if running.is_empty() {
            return;
        }
        let (actor, no, _) = running[self.rng.random_range(0..running.len())].clone();
        let socks: Vec<(u32, u16)> = lock(&self.shared)
            .socks
            .iter()
            .filter(|(_, d)| d.actor == actor && d.want_hib && d.last_seq > 0)
            .map(|(i, d)| (*i, d.last_index))
            .collect();
        if socks.is_empty() {
            return;
        }
        let (id, last) = socks[self.rng.random_range(0..socks.len())];
        // Usually everything processed (possibly the same index again); with
        // `late_actor_acks`, sometimes an older index after a newer one.
        let index = if self.cfg.late_actor_acks && self.rng.random_bool(0.1) {
            last.wrapping_sub(self.rng.random_range(1..=3))
        } else {
            last
        };
        self.actor_ack(no, &actor, id, index);
    }

    fn actor_ack(&mut self, no: usize, actor: &str, id: u32, index: u16) {
        let h = lock(&self.shared)
            .handles
            .get(actor)
            .map(|(_, _, h)| h.clone());
        if let Some(h) = h {
            h.ack(key_of(&self.shared, id), index);
            self.runner_flush(no);
        }
    }

    /// Every running actor instance acknowledges what it processed and has not acknowledged
    /// yet (an actor acknowledging on its own schedule does so eventually). Actors with the
    /// immediate policy were acknowledged by the runner already.
    pub fn ack_all(&mut self) {
        if self.cfg.immediate_acks {
            return;
        }
        let todo: Vec<(usize, String, u32, u16)> = {
            let mut g = lock(&self.shared);
            let s = &mut *g;
            let mut v = Vec::new();
            for (i, d) in s.socks.iter_mut() {
                if !d.want_hib || d.last_seq == 0 || d.gw_closed {
                    continue;
                }
                let Some((r, gen, _)) = s.handles.get(&d.actor) else {
                    continue;
                };
                let mark = Some((*r, *gen, d.last_index));
                if d.acked_by != mark {
                    d.acked_by = mark;
                    v.push((*r, d.actor.clone(), *i, d.last_index));
                }
            }
            v
        };
        for (no, actor, id, index) in todo {
            self.actor_ack(no, &actor, id, index);
        }
    }

    /// An actor goes to sleep: sometimes it first hands some hibernatable sockets back
    /// (`WebSocketClose { hibernate: true }`), sometimes it sets an alarm.
    fn random_sleep(&mut self) {
        let running = self.running_actors();
        if running.is_empty() {
            return;
        }
        let (actor, no, _) = running[self.rng.random_range(0..running.len())].clone();
        let hibernate_first = self.rng.random_bool(0.4);
        let alarm = self.rng.random_bool(0.2);
        let h = lock(&self.shared)
            .handles
            .get(&actor)
            .map(|(_, _, h)| h.clone());
        let Some(h) = h else {
            return;
        };
        if hibernate_first {
            let ids: Vec<u32> = lock(&self.shared)
                .socks
                .iter()
                .filter(|(_, d)| d.actor == actor && d.want_hib && !d.gw_closed)
                .map(|(i, _)| *i)
                .collect();
            for id in ids {
                if self.rng.random_bool(0.7) {
                    h.hibernate(key_of(&self.shared, id));
                }
            }
        }
        if alarm {
            let at = T0_MS + self.ms() as i64 + self.rng.random_range(1_000..=20_000);
            h.set_alarm(Some(at));
        }
        h.sleep();
        self.runner_flush(no);
    }

    /// An actor closes one of its sockets itself.
    fn random_actor_close(&mut self) {
        let running = self.running_actors();
        if running.is_empty() {
            return;
        }
        let (actor, no, _) = running[self.rng.random_range(0..running.len())].clone();
        let ids: Vec<u32> = lock(&self.shared)
            .socks
            .iter()
            .filter(|(_, d)| d.actor == actor && d.opened && !d.gw_closed)
            .map(|(i, _)| *i)
            .collect();
        if ids.is_empty() {
            return;
        }
        let id = ids[self.rng.random_range(0..ids.len())];
        let h = lock(&self.shared)
            .handles
            .get(&actor)
            .map(|(_, _, h)| h.clone());
        if let Some(h) = h {
            h.close(
                key_of(&self.shared, id),
                Some(1000),
                Some(super::actor::ACTOR_CLOSE_REASON.to_string()),
            );
            self.runner_flush(no);
        }
    }
}

/// The runner library's name for the request of client `id` (as the gateway numbered it).
pub(super) fn key_of(shared: &Shared, id: u32) -> crate::runner::RequestKey {
    let (gw, req) = lock(shared)
        .socks
        .get(&id)
        .map_or((super::actor::GATEWAY_ID, [0; 4]), |d| (d.gw, d.req));
    crate::runner::RequestKey {
        gateway_id: gw,
        request_id: req,
    }
}
