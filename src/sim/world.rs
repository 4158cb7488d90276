//! The simulated world: one gateway (the engine plus the glue in [`super::gateway`]), runner
//! processes (the real runner core), the network between them (one pair of FIFO queues per
//! runner connection, lost when the connection drops), clients, and simulated time (a fixed
//! base `Instant` plus an offset).
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
use super::gateway::{GwSock, Link, WaitFor};
use crate::engine::{Action, ConnRef, CrashPolicy, CreateActor, Engine, EngineConfig, RunnerIdx};
use crate::protocol::{Command, ToClient, ToServer};
use crate::tunnel::{Budget, WindowLimits};

/// Unix milliseconds at the simulated epoch.
const T0_MS: i64 = 1_700_000_000_000;

/// Delivery rounds after which a settle that still moves messages is a livelock.
const SETTLE_ROUNDS: usize = 1000;

/// Longest time a message spends on a live connection.
const MAX_LATENCY: Duration = Duration::from_secs(2);

/// The gateway's pong timeout: it notices a dead runner connection within this (SPEC §1.4.4).
const PING_TIMEOUT: Duration = Duration::from_secs(15);

/// Knobs of one run, drawn from its seed.
#[derive(Debug, Clone)]
pub(crate) struct SimConfig {
    pub runners: usize,
    pub slots: u32,
    pub actors: usize,
    pub max_sockets: usize,
    pub steps: usize,
    pub limits: WindowLimits,
    pub global_cap: u64,
    pub hib_probability: f64,
    /// Actors acknowledge each message as they process it (the runner coalesces), instead
    /// of acknowledging on their own schedule.
    pub immediate_acks: bool,
    /// Actors acknowledge their persisted index when a socket is restored. Without it, a
    /// restored socket whose acknowledgement was lost with a connection is never acknowledged
    /// by an immediate-ack actor (see the ignored test in `mod.rs`).
    pub ack_on_restore: bool,
    /// Actors restore a socket from the runner's remembered index when it has one (the
    /// library's default `on_websocket_restore`) instead of from what they persisted.
    pub trust_runner_memory: bool,
    /// Actors sometimes acknowledge an older index after a newer one (out-of-order
    /// completions). Off by default: the runner core then forgets the newer acknowledgement
    /// (see the ignored test in `mod.rs`). Late and repeated acks still reach the gateway
    /// through the network (a delivered ack is sometimes delivered again later).
    pub late_actor_acks: bool,
    /// Most messages a client produces at once.
    pub send_burst: usize,
    /// Most messages a client holds before the gateway takes them (its socket buffer).
    pub client_queue: usize,
    /// Clients and actors close sockets at random.
    pub random_closes: bool,
    pub ack_timeout: Duration,
    pub open_timeout: Duration,
    pub refresh_every: Duration,
    /// Register a socket's hibernating record only when it enters hibernation (the literal
    /// reading of SPEC §2.6) instead of as soon as it is hibernatable. Only for the test that
    /// shows why the eager rule is needed.
    pub naive_records: bool,
}

impl SimConfig {
    pub fn from_seed(seed: u64) -> SimConfig {
        let mut r = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        SimConfig {
            runners: r.random_range(1..=3),
            slots: r.random_range(1..=4),
            actors: r.random_range(1..=4),
            max_sockets: r.random_range(1..=8),
            steps: r.random_range(100..=400),
            limits: WindowLimits {
                max_bytes: r.random_range(40..=400),
                max_messages: r.random_range(1..=12),
            },
            global_cap: if r.random_bool(0.7) {
                Budget::DEFAULT_PROCESS_CAP
            } else {
                r.random_range(60..=1500)
            },
            hib_probability: if r.random_bool(0.8) { 0.85 } else { 0.3 },
            immediate_acks: r.random_bool(0.5),
            ack_on_restore: true,
            trust_runner_memory: false,
            late_actor_acks: false,
            send_burst: 3,
            client_queue: 12,
            random_closes: true,
            ack_timeout: Duration::from_secs(30),
            open_timeout: Duration::from_secs(15),
            refresh_every: Duration::from_secs(45),
            naive_records: false,
        }
    }
}

/// Counts over a run (reported by the tests).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stats {
    pub steps: u64,
    pub sockets: u64,
    pub messages_offered: u64,
    pub messages_delivered: u64,
    pub pauses: u64,
    pub replays: u64,
    pub replayed_messages: u64,
    pub hibernations: u64,
    pub restores: u64,
    pub stale_remembered: u64,
    pub runner_drops: u64,
    pub runners_lost: u64,
    pub legit_closes: u64,
    pub refusals: u64,
    pub acks_ignored: u64,
    /// Most messages delivered on one socket.
    pub longest_socket: u64,
}

/// A violated invariant, with what is needed to reproduce it.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub seed: u64,
    pub step: u64,
    pub message: String,
}

/// One runner WebSocket connection: both directions, in order.
pub(super) struct Conn {
    pub runner: usize,
    /// The runner still holds this socket.
    pub runner_open: bool,
    /// The gateway has not yet processed its close.
    pub gw_open: bool,
    /// The gateway received `Init` on it.
    pub inited: bool,
    /// In flight, with the moment each message was written.
    pub g2r: VecDeque<(Instant, ToClient)>,
    pub r2g: VecDeque<(Instant, ToServer)>,
}

pub(crate) struct World {
    pub cfg: SimConfig,
    pub seed: u64,
    pub rng: StdRng,
    pub t0: Instant,
    pub now: Instant,
    pub step: u64,
    pub engine: Engine,
    pub shared: Shared,
    pub runners: Vec<SimRunner>,
    pub conns: BTreeMap<u32, Conn>,
    pub next_conn: u32,
    /// Connections the runner lost whose close the gateway has not noticed yet.
    /// With the moment the runner lost them (the gateway's ping timeout bounds the delay).
    pub pending_notices: Vec<(ConnRef, Instant)>,
    pub actor_ids: Vec<String>,
    /// Runner processes started so far (names new runner keys).
    pub incarnations: u32,
    // ---- gateway glue state (see gateway.rs)
    pub budget: Budget,
    pub socks: BTreeMap<u32, GwSock>,
    pub next_sock: u32,
    pub gw_runners: BTreeMap<RunnerIdx, ConnRef>,
    pub owed_closes: Vec<(RunnerIdx, ToClient)>,
    pub waiters: BTreeMap<u64, WaitFor>,
    pub next_waiter: u64,
    /// `CommandStartActor.hibernatingRequests` per (actor, generation), as socket ids.
    pub start_lists: BTreeMap<(String, u32), Vec<u32>>,
    /// Start commands a runner received: (runnerId, actor, generation).
    pub starts_delivered: BTreeSet<(String, String, u32)>,
    pub actions: VecDeque<Action>,
    pub applying: bool,
    pub last_refresh: Instant,
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
];

impl World {
    pub fn new(seed: u64, cfg: SimConfig) -> World {
        let t0 = Instant::now();
        let shared: Shared = Arc::new(std::sync::Mutex::new(Store::default()));
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
        World {
            budget: Budget::new(cfg.global_cap),
            rng: StdRng::seed_from_u64(seed),
            seed,
            t0,
            now: t0,
            step: 0,
            engine,
            shared,
            runners,
            conns: BTreeMap::new(),
            next_conn: 1,
            pending_notices: Vec::new(),
            actor_ids,
            incarnations: 0,
            socks: BTreeMap::new(),
            next_sock: 1,
            gw_runners: BTreeMap::new(),
            owed_closes: Vec::new(),
            waiters: BTreeMap::new(),
            next_waiter: 1,
            start_lists: BTreeMap::new(),
            starts_delivered: BTreeSet::new(),
            actions: VecDeque::new(),
            applying: false,
            last_refresh: t0,
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

    fn failure(&self) -> Option<Failure> {
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

    fn ms(&self) -> u64 {
        self.now.duration_since(self.t0).as_millis() as u64
    }

    // -----------------------------------------------------------------------------------------
    // The run

    /// Runs the whole scenario; `Err` on the first violated invariant.
    pub fn run(mut self) -> Result<(Stats, u64), Failure> {
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
        self.stats.messages_delivered = lock(&self.shared).delivered;
        self.stats.restores = lock(&self.shared).restores;
        self.stats.stale_remembered = lock(&self.shared).stale_remembered;
        self.stats.longest_socket = lock(&self.shared)
            .socks
            .values()
            .map(|d| u64::from(d.last_seq))
            .max()
            .unwrap_or(0);
        Ok((self.stats, self.digest.finish()))
    }

    fn random_step(&mut self) {
        let total: u32 = EVENTS.iter().map(|(w, _)| w).sum();
        let mut pick = self.rng.random_range(0..total);
        let mut ev = Ev::Deliver;
        for (w, e) in EVENTS {
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
                let live = self.socks.values().filter(|s| !s.is_closed()).count();
                if live < self.cfg.max_sockets && !self.actor_ids.is_empty() {
                    let a = self.rng.random_range(0..self.actor_ids.len());
                    let hib = self.rng.random_bool(self.cfg.hib_probability);
                    self.client_open(a, hib);
                }
            }
            Ev::Send => {
                // A client has at most a few messages in hand (its socket buffer is small).
                let cap = self.cfg.client_queue;
                if let Some(id) =
                    self.pick_sock(|s| s.upgraded && !s.is_closed() && s.queue.len() < cap)
                {
                    let n = self.rng.random_range(1..=self.cfg.send_burst.max(1));
                    for _ in 0..n {
                        let pad = if self.rng.random_bool(0.1) {
                            self.rng.random_range(0..=self.cfg.limits.max_bytes + 40)
                        } else {
                            self.rng.random_range(0..=24)
                        };
                        self.client_enqueue(id, pad);
                    }
                    self.pump(id);
                }
            }
            Ev::Deliver => {
                let busy: Vec<(u32, bool)> = self
                    .conns
                    .iter()
                    .flat_map(|(g, c)| {
                        let mut v = Vec::new();
                        if !c.g2r.is_empty() {
                            v.push((*g, true));
                        }
                        if !c.r2g.is_empty() {
                            v.push((*g, false));
                        }
                        v
                    })
                    .collect();
                if !busy.is_empty() {
                    let (g, to_runner) = busy[self.rng.random_range(0..busy.len())];
                    let n = self.rng.random_range(1..=4);
                    if to_runner {
                        self.deliver_g2r(g, n);
                    } else {
                        self.deliver_r2g(g, n);
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
                if let Some(id) = self.pick_sock(|s| !s.is_closed()) {
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
                    self.runners[no].core.begin_shutdown();
                    self.runner_flush(no);
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

    fn pick_sock(&mut self, f: impl Fn(&GwSock) -> bool) -> Option<u32> {
        let ids: Vec<u32> = self
            .socks
            .iter()
            .filter(|(_, s)| f(s))
            .map(|(i, _)| *i)
            .collect();
        if ids.is_empty() {
            None
        } else {
            Some(ids[self.rng.random_range(0..ids.len())])
        }
    }

    // -----------------------------------------------------------------------------------------
    // Runner processes and the network

    fn conn_ref(&self, gen: u32) -> Option<ConnRef> {
        self.conns.get(&gen).map(|c| ConnRef {
            shard: 0,
            slot: c.runner as u32,
            gen,
        })
    }

    /// Moves everything the runner produced onto its connection.
    pub fn runner_flush(&mut self, no: usize) {
        let r = &mut self.runners[no];
        r.drain_ctl();
        let mut out = Vec::new();
        r.core.take_out(&mut out);
        if out.is_empty() {
            return;
        }
        let msgs: Vec<ToServer> = out.into_iter().map(|m| m.into_to_server()).collect();
        // Note the sockets the actors closed themselves (before the message may be lost).
        for m in &msgs {
            if let ToServer::TunnelMessage(t) = m {
                if let crate::protocol::ToServerTunnelMessageKind::WebSocketClose(c) =
                    &t.message_kind
                {
                    if c.reason.as_deref() == Some(super::actor::ACTOR_CLOSE_REASON) {
                        let id = u32::from_le_bytes(t.message_id.request_id);
                        if let Some(d) = lock(&self.shared).socks.get_mut(&id) {
                            d.actor_closed = true;
                        }
                    }
                }
            }
        }
        let Some(gen) = self.runners[no].conn else {
            return;
        };
        if let Some(c) = self.conns.get_mut(&gen) {
            if c.runner_open {
                let now = self.now;
                c.r2g.extend(msgs.into_iter().map(|m| (now, m)));
            }
        }
    }

    pub fn runner_connect(&mut self, no: usize) {
        if self.runners[no].conn.is_some() {
            return;
        }
        let gen = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            gen,
            Conn {
                runner: no,
                runner_open: true,
                gw_open: true,
                inited: false,
                g2r: VecDeque::new(),
                r2g: VecDeque::new(),
            },
        );
        self.runners[no].conn = Some(gen);
        self.runners[no].core.connection_opened();
        self.runner_flush(no);
    }

    /// The runner loses its connection; the gateway notices now or later.
    pub fn runner_drop(&mut self, no: usize, notice_now: bool) {
        let Some(gen) = self.runners[no].conn.take() else {
            return;
        };
        self.stats.runner_drops += 1;
        let cref = self.conn_ref(gen);
        if let Some(c) = self.conns.get_mut(&gen) {
            c.runner_open = false;
            c.g2r.clear();
            c.r2g.clear();
        }
        self.runners[no].core.connection_lost(self.now);
        self.runner_flush(no);
        if let Some(cref) = cref {
            if notice_now {
                self.gateway_notice(cref);
            } else {
                self.pending_notices.push((cref, self.now));
            }
        }
    }

    /// The runner process dies and a new one (a new runner key: a new identity) takes its
    /// place, disconnected. The old identity is lost after the threshold.
    pub fn runner_restart(&mut self, no: usize, notice_now: bool) {
        self.runner_drop(no, notice_now);
        self.incarnations += 1;
        let policy = self.runners[no].policy;
        self.runners[no] = SimRunner::new(
            no,
            self.incarnations,
            self.cfg.slots,
            policy,
            self.cfg.ack_on_restore,
            self.cfg.trust_runner_memory,
            &self.shared,
        );
        // Its actor instances died with it.
        lock(&self.shared).handles.retain(|_, (r, _, _)| *r != no);
    }

    /// The gateway learns that a runner connection closed.
    pub fn gateway_notice(&mut self, cref: ConnRef) {
        self.pending_notices.retain(|(c, _)| *c != cref);
        let was_open = match self.conns.get_mut(&cref.gen) {
            Some(c) => std::mem::replace(&mut c.gw_open, false),
            None => false,
        };
        if let Some(c) = self.conns.get(&cref.gen) {
            if !c.runner_open {
                self.conns.remove(&cref.gen);
            }
        }
        if was_open {
            let a = self.engine.runner_closed(cref, self.now);
            self.run_actions(a);
        }
    }

    /// The gateway closes a runner connection (eviction or error).
    pub fn gateway_close_runner(&mut self, cref: ConnRef) {
        let holder = self.conns.get(&cref.gen).map(|c| (c.runner, c.runner_open));
        if let Some((no, true)) = holder {
            if self.runners[no].conn == Some(cref.gen) {
                self.runners[no].conn = None;
                self.runners[no].core.connection_lost(self.now);
            }
            if let Some(c) = self.conns.get_mut(&cref.gen) {
                c.runner_open = false;
                c.g2r.clear();
                c.r2g.clear();
            }
            self.runner_flush(no);
        }
        self.gateway_notice(cref);
    }

    /// Queues a gateway→runner message on a connection (lost if the connection is gone).
    pub fn send_to_conn(&mut self, cref: ConnRef, msg: ToClient) -> bool {
        match self.conns.get_mut(&cref.gen) {
            Some(c) if c.runner_open && c.gw_open => {
                c.g2r.push_back((self.now, msg));
                true
            }
            _ => false,
        }
    }

    pub fn deliver_g2r(&mut self, gen: u32, n: usize) {
        for _ in 0..n {
            let Some(c) = self.conns.get_mut(&gen) else {
                return;
            };
            let Some((_, msg)) = c.g2r.pop_front() else {
                return;
            };
            let no = c.runner;
            if let ToClient::Commands(cmds) = &msg {
                let rid = self.runners[no].core.runner_id().unwrap_or("").to_string();
                for c in cmds {
                    if matches!(c.inner, Command::StartActor(_)) {
                        let k = (
                            rid.clone(),
                            c.checkpoint.actor_id.clone(),
                            c.checkpoint.generation,
                        );
                        if !self.starts_delivered.insert(k) {
                            self.fail(format!(
                                "CommandStartActor for {} g{} delivered twice to runner {rid} \
                                 (SPEC 1.4.3: the runner does not de-duplicate)",
                                c.checkpoint.actor_id, c.checkpoint.generation
                            ));
                        }
                    }
                }
            }
            self.log(|| format!("runner {no} <- conn {gen}: {}", brief_to_client(&msg)));
            self.runners[no].core.handle(msg);
            self.runner_flush(no);
        }
    }

    pub fn deliver_r2g(&mut self, gen: u32, n: usize) {
        for _ in 0..n {
            let Some(c) = self.conns.get_mut(&gen) else {
                return;
            };
            let Some((_, msg)) = c.r2g.pop_front() else {
                return;
            };
            let Some(cref) = self.conn_ref(gen) else {
                return;
            };
            if is_ack(&msg) && self.rng.random_bool(0.1) {
                // Delivered again later: a late, repeated acknowledgement.
                let now = self.now;
                if let Some(c) = self.conns.get_mut(&gen) {
                    c.r2g.push_back((now, msg.clone()));
                }
            }
            self.log(|| format!("gateway <- conn {gen}: {}", brief_to_server(&msg)));
            self.gateway_receive(cref, msg);
        }
    }

    /// The gateway's handling of one runner message (the shard's dispatch).
    fn gateway_receive(&mut self, cref: ConnRef, msg: ToServer) {
        let Some(c) = self.conns.get_mut(&cref.gen) else {
            return;
        };
        if !c.gw_open {
            return;
        }
        match msg {
            ToServer::Init(init) => {
                if c.inited {
                    return;
                }
                c.inited = true;
                let key = self.runners[c.runner].key.clone();
                let a = self
                    .engine
                    .runner_init(cref, "default", &key, init, self.now);
                self.run_actions(a);
            }
            ToServer::TunnelMessage(t) => {
                if c.inited {
                    self.tunnel_from_runner(cref, t);
                }
            }
            other => {
                let a = self.engine.runner_message(cref, other, self.now);
                self.run_actions(a);
            }
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
            h.ack(key_of(id), index);
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
                    h.hibernate(key_of(id));
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
                key_of(id),
                Some(1000),
                Some(super::actor::ACTOR_CLOSE_REASON.to_string()),
            );
            self.runner_flush(no);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Time

    /// Advances simulated time. If an attached socket's ack deadline (or an opening socket's
    /// open deadline) falls inside the jump, the network is settled first: a runner that is
    /// connected and healthy gets the chance to process and acknowledge, so an expiry after
    /// that means the runner truly cannot make progress (a lost or unreplayed message).
    pub fn advance(&mut self, dt: Duration) {
        let until = self.now + dt;
        let due = self.socks.values().any(|s| match s.link {
            Link::Opening { since, .. } => since + self.cfg.open_timeout <= until,
            _ => s
                .socket
                .ack_deadline(self.cfg.ack_timeout)
                .is_some_and(|d| d <= until),
        });
        if due {
            self.settle(false);
        }
        self.bound_latency(until);
        self.now = until;
        for no in 0..self.runners.len() {
            self.runners[no].core.poll(self.now);
            self.runner_flush(no);
        }
        let a = self.engine.tick(self.now);
        self.run_actions(a);
        self.gateway_timers();
    }

    /// The network is slow, not frozen: before time reaches `until`, every message written
    /// more than [`MAX_LATENCY`] earlier arrives, and the gateway notices a connection the
    /// runner lost within its ping timeout. Without this bound a live connection could hold
    /// a `CommandStopActor` past `actor_stop_threshold`, and the old and the new generation of
    /// an actor would run at once — a network the gateway's pings would have declared dead.
    fn bound_latency(&mut self, until: Instant) {
        let deadline = until.checked_sub(MAX_LATENCY).unwrap_or(self.t0);
        for _ in 0..200 {
            let mut moved = false;
            let gens: Vec<u32> = self.conns.keys().copied().collect();
            for g in gens {
                let old = |q: Option<&Instant>| q.is_some_and(|t| *t <= deadline);
                let (a, b) = match self.conns.get(&g) {
                    Some(c) => (
                        old(c.g2r.front().map(|(t, _)| t)),
                        old(c.r2g.front().map(|(t, _)| t)),
                    ),
                    None => (false, false),
                };
                if a {
                    moved = true;
                    self.deliver_g2r(g, 1);
                }
                if b {
                    moved = true;
                    self.deliver_r2g(g, 1);
                }
            }
            if !moved {
                break;
            }
        }
        let ping_deadline = until.checked_sub(PING_TIMEOUT).unwrap_or(self.t0);
        let late: Vec<ConnRef> = self
            .pending_notices
            .iter()
            .filter(|(_, t)| *t <= ping_deadline)
            .map(|(c, _)| *c)
            .collect();
        for c in late {
            self.gateway_notice(c);
        }
    }

    /// Delivers everything in flight (both directions, every connection, including the
    /// gateway noticing closed connections) and lets actors acknowledge, until nothing moves.
    /// Does not reconnect runners. With `reconnect`, disconnected runners come back too.
    pub fn settle(&mut self, reconnect: bool) {
        for _ in 0..SETTLE_ROUNDS {
            let notices = std::mem::take(&mut self.pending_notices);
            for (c, _) in notices {
                self.gateway_notice(c);
            }
            if reconnect {
                for no in 0..self.runners.len() {
                    self.runner_connect(no);
                }
            }
            let gens: Vec<u32> = self.conns.keys().copied().collect();
            let mut moved = false;
            for g in gens {
                let (a, b) = match self.conns.get(&g) {
                    Some(c) => (c.g2r.len(), c.r2g.len()),
                    None => (0, 0),
                };
                if a > 0 {
                    moved = true;
                    self.deliver_g2r(g, a);
                }
                if b > 0 {
                    moved = true;
                    self.deliver_r2g(g, b);
                }
            }
            self.ack_all();
            let in_flight = self
                .conns
                .values()
                .any(|c| !c.g2r.is_empty() || !c.r2g.is_empty());
            if !moved && !in_flight && self.pending_notices.is_empty() {
                return;
            }
        }
        self.fail(format!(
            "the network did not settle within {SETTLE_ROUNDS} rounds"
        ));
    }

    // -----------------------------------------------------------------------------------------
    // End of run

    fn quiesce_and_check(&mut self) -> Result<(), Failure> {
        // Draining runners finish exiting and come back as new processes; everyone
        // reconnects; deliver, acknowledge, wake, and let timers run until stable.
        for no in 0..self.runners.len() {
            if self.runners[no].draining {
                self.runner_restart(no, true);
            }
        }
        for _ in 0..120 {
            self.settle(true);
            let ids: Vec<u32> = self.socks.keys().copied().collect();
            for id in ids {
                self.pump(id);
            }
            self.settle(true);
            self.check()?;
            if self.is_quiet() {
                break;
            }
            self.sleep_idle_if_contended();
            self.advance(Duration::from_secs(1));
            self.check()?;
        }
        if !self.is_quiet() {
            let busy: Vec<String> = self
                .socks
                .values()
                .filter(|s| !s.is_quiet())
                .map(|s| s.describe())
                .collect();
            self.fail(format!("not quiescent after reconnecting: {busy:?}"));
            self.check()?;
        }
        self.check_all_delivered()?;

        // Every actor sleeps and wakes once: the wake must list exactly its live hibernatable
        // sockets, and they must all come back attached.
        self.sleep_wake_round(false)?;
        self.check_all_delivered()?;

        // Clients leave; afterwards nothing may remain: no pending bytes, no records (a wake
        // lists nobody), no waiters.
        let ids: Vec<u32> = self.socks.keys().copied().collect();
        for id in ids {
            if !self.socks[&id].is_closed() {
                self.client_close(id);
            }
        }
        self.settle(true);
        // Identities of crashed runner processes get declared lost (their owed closes go).
        self.advance(Duration::from_secs(16));
        self.settle(true);
        self.check()?;
        self.sleep_wake_round(true)?;
        if self.budget.used != 0 {
            self.fail(format!(
                "{} pending bytes remain after every client closed",
                self.budget.used
            ));
        }
        let open_waiters: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, w)| !matches!(w, WaitFor::Dummy))
            .map(|(k, _)| *k)
            .collect();
        if !open_waiters.is_empty() {
            self.fail(format!(
                "waiters leak after every client closed: {open_waiters:?}"
            ));
        }
        if !self.owed_closes.is_empty() && !self.runners.is_empty() {
            self.fail(format!(
                "{} closes still owed to runners after reconnecting",
                self.owed_closes.len()
            ));
        }
        self.check()
    }

    /// When a socket waits for its actor to be placed and actors occupy the slots, the idle
    /// ones go to sleep (as idle actors do), so that the waiting one gets a slot.
    fn sleep_idle_if_contended(&mut self) {
        let running = |w: &World, a: &str| {
            w.engine
                .actor(a)
                .is_some_and(|i| i.status == crate::engine::ActorStatus::Running)
        };
        let waiting = self
            .socks
            .values()
            .any(|s| !s.is_quiet() && !running(self, &s.actor));
        if !waiting {
            return;
        }
        let idle: Vec<(usize, crate::runner::ActorHandle)> = lock(&self.shared)
            .handles
            .iter()
            .filter(|(a, _)| self.socks.values().all(|s| s.actor != **a || s.is_quiet()))
            .map(|(_, (n, _, h))| (*n, h.clone()))
            .collect();
        for (no, h) in idle {
            h.sleep();
            self.runner_flush(no);
        }
    }

    fn is_quiet(&self) -> bool {
        self.socks.values().all(GwSock::is_quiet)
            && self
                .conns
                .values()
                .all(|c| c.g2r.is_empty() && c.r2g.is_empty())
            && self.pending_notices.is_empty()
    }

    fn check_all_delivered(&mut self) -> Result<(), Failure> {
        let s = lock(&self.shared);
        let mut errs = Vec::new();
        for (id, g) in &self.socks {
            if g.is_closed() {
                continue;
            }
            let d = s.socks.get(id);
            if d.is_some_and(|d| d.actor_closed) {
                continue;
            }
            let got = d.map_or(0, |d| d.last_seq);
            if got != g.offered {
                errs.push(format!(
                    "socket {id}: client sent {} messages, actor processed {got} ({})",
                    g.offered,
                    g.describe()
                ));
            }
        }
        drop(s);
        for e in errs {
            self.fail(e);
        }
        self.check()
    }

    /// One actor at a time: put every actor to sleep, wake this one, check the hibernating
    /// list of its start command against its live sockets.
    fn sleep_wake_round(&mut self, expect_empty: bool) -> Result<(), Failure> {
        let actors = self.actor_ids.clone();
        for actor in actors {
            self.sleep_all_and_settle(None);
            self.check()?;
            let before = self.engine.actor(&actor).map(|i| i.generation);
            self.dummy_resolve(&actor);
            for _ in 0..40 {
                self.settle(true);
                let running = self
                    .engine
                    .actor(&actor)
                    .is_some_and(|i| i.status == crate::engine::ActorStatus::Running);
                if running {
                    break;
                }
                // Alarms may have woken others into the slots this one needs.
                self.sleep_all_and_settle(Some(&actor));
                self.advance(Duration::from_secs(1));
            }
            self.check()?;
            let Some(info) = self.engine.actor(&actor) else {
                continue;
            };
            if info.status != crate::engine::ActorStatus::Running {
                self.fail(format!(
                    "actor {actor} did not run again after a wake ({:?})",
                    info.status
                ));
                return self.check();
            }
            if Some(info.generation) == before {
                continue;
            }
            let actor_closed: BTreeSet<u32> = lock(&self.shared)
                .socks
                .iter()
                .filter(|(_, d)| d.actor_closed)
                .map(|(i, _)| *i)
                .collect();
            let listed: BTreeSet<u32> = self
                .start_lists
                .get(&(actor.clone(), info.generation))
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default();
            let listed: BTreeSet<u32> = listed.difference(&actor_closed).copied().collect();
            let live: BTreeSet<u32> = self
                .socks
                .iter()
                .filter(|(_, s)| s.actor == actor && !s.is_closed() && s.socket.is_hibernatable())
                .map(|(i, _)| *i)
                .collect();
            if expect_empty && !listed.is_empty() {
                self.fail(format!(
                    "actor {actor}: hibernating records leak after every client closed: \
                     start lists {listed:?}"
                ));
            } else if listed != live {
                self.fail(format!(
                    "actor {actor} g{}: start listed {listed:?}, live hibernatable sockets \
                     are {live:?}",
                    info.generation
                ));
            }
            for id in &live {
                if !matches!(self.socks[id].link, Link::Attached { .. }) {
                    let d = self.socks[id].describe();
                    self.fail(format!("socket {id} not attached after the wake: {d}"));
                }
            }
            self.check()?;
        }
        self.sleep_all_and_settle(None);
        self.check()
    }

    /// Puts every running actor (but `except`) to sleep and waits until they all sleep.
    fn sleep_all_and_settle(&mut self, except: Option<&str>) {
        for _ in 0..40 {
            let running: Vec<(usize, crate::runner::ActorHandle)> = lock(&self.shared)
                .handles
                .iter()
                .filter(|(a, _)| Some(a.as_str()) != except)
                .map(|(_, (n, _, h))| (*n, h.clone()))
                .collect();
            for (no, h) in running {
                h.sleep();
                self.runner_flush(no);
            }
            self.settle(true);
            let awake: Vec<String> = self
                .actor_ids
                .iter()
                .filter(|a| Some(a.as_str()) != except)
                .filter(|a| {
                    self.engine
                        .actor(a)
                        .is_some_and(|i| i.status != crate::engine::ActorStatus::Sleeping)
                })
                .cloned()
                .collect();
            if awake.is_empty() {
                return;
            }
            self.advance(Duration::from_secs(1));
        }
        self.fail("actors did not go to sleep");
    }

    // -----------------------------------------------------------------------------------------
    // Invariants after every step

    pub fn check(&mut self) -> Result<(), Failure> {
        if let Some(f) = self.failure() {
            return Err(f);
        }
        let mut errs: Vec<String> = Vec::new();
        let mut pending_total: u64 = 0;
        let lim = self.cfg.limits;
        {
            let store = lock(&self.shared);
            for (id, s) in &self.socks {
                if let Err(e) = s.socket.check_invariants(&self.budget) {
                    errs.push(format!("socket {id}: TunnelSocket invariant: {e}"));
                }
                pending_total += s.socket.pending_bytes() as u64;
                let (n, b) = (s.socket.pending_len(), s.socket.pending_bytes());
                if n > lim.max_messages {
                    errs.push(format!(
                        "socket {id}: {n} pending messages over the cap {}",
                        lim.max_messages
                    ));
                }
                if b > lim.max_bytes && n > 1 {
                    errs.push(format!(
                        "socket {id}: {b} pending bytes over the cap {} with {n} messages",
                        lim.max_bytes
                    ));
                }
                if let Err(e) = s.consistent() {
                    errs.push(format!("socket {id}: {e}"));
                }
                let has_data = s.socket.pending_len() > 0 || s.socket.is_paused();
                if s.link == (Link::Hibernating { waiter: None }) && has_data {
                    // Only while the actor still runs (or is stopping) without this socket,
                    // which the runner handed back: the wake follows its `ActorStopped`.
                    let placed = self.engine.actor(&s.actor).is_some_and(|i| {
                        matches!(
                            i.status,
                            crate::engine::ActorStatus::Running
                                | crate::engine::ActorStatus::Stopping
                        )
                    });
                    if !placed {
                        errs.push(format!(
                            "socket {id}: hibernating with messages but no wake under way \
                             (SPEC 2.6: wake immediately)"
                        ));
                    }
                }
                let got = store.socks.get(id).map_or(0, |d| d.last_seq);
                if got > s.offered {
                    errs.push(format!(
                        "socket {id}: actor processed seq {got}, client offered only {}",
                        s.offered
                    ));
                }
            }
        }
        if pending_total != self.budget.used {
            errs.push(format!(
                "budget used {} != sum of pending bytes {pending_total}",
                self.budget.used
            ));
        }
        if self.budget.used > self.budget.cap {
            errs.push(format!(
                "budget used {} over its cap {}",
                self.budget.used, self.budget.cap
            ));
        }
        for e in errs {
            self.fail(e);
        }
        match self.failure() {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    pub fn mix(&mut self, v: impl Hash) {
        v.hash(&mut self.digest);
    }
}

pub(super) fn key_of(id: u32) -> crate::runner::RequestKey {
    crate::runner::RequestKey {
        gateway_id: super::actor::GATEWAY_ID,
        request_id: super::actor::req_of(id),
    }
}

fn brief_to_client(m: &ToClient) -> String {
    match m {
        ToClient::TunnelMessage(t) => format!(
            "tunnel sock {} idx {} {}",
            u32::from_le_bytes(t.message_id.request_id),
            t.message_id.message_index,
            match &t.message_kind {
                crate::protocol::ToClientTunnelMessageKind::WebSocketMessage(w) => {
                    format!("msg {}B", w.data.len())
                }
                k => format!("{k:?}"),
            }
        ),
        other => format!("{other:?}"),
    }
}

fn brief_to_server(m: &ToServer) -> String {
    match m {
        ToServer::TunnelMessage(t) => format!(
            "tunnel sock {} idx {} {:?}",
            u32::from_le_bytes(t.message_id.request_id),
            t.message_id.message_index,
            t.message_kind
        ),
        other => format!("{other:?}"),
    }
}

fn is_ack(m: &ToServer) -> bool {
    matches!(
        m,
        ToServer::TunnelMessage(t)
            if matches!(t.message_kind, crate::protocol::ToServerTunnelMessageKind::WebSocketMessageAck(_))
    )
}
