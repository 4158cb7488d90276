//! Several nodes: each with its own gateway shards (`Settings.clustered`, its own gateway
//! id), joined by a simulated bus that loses, duplicates and reorders frames, and one of them
//! leading placement (the real [`crate::engine::Engine`] behind the real [`Plane`]) under a
//! lease that can be lost.
//!
//! What crosses nodes is the real wire ([`wire::encode`] / [`wire::decode`]); how a shard's
//! message crosses is the real [`node::kind_of`]: `Ctl` through a real [`LinkTx`] /
//! [`LinkRx`] pair per ordered pair of nodes (acks back over the same bus, the resend timer
//! driven by simulated time), `Tun` as a single datagram (at most once). A follower forwards
//! its shards' control messages to the leader it knows (kept while it knows none, questions
//! failed when the leader changes, as `shard::control::follow`), and heartbeats it once it
//! learns the leader; the leader takes other nodes' messages through [`plane::from_peer`]
//! (its peer number for node `k` is `k + 1`), their `StopApplied` through
//! [`Plane::remote_applied`], their heartbeats through [`Plane::set_remote`], and sends its
//! `To::Node` / `To::Peer` / `To::All` messages back over the bus.
//!
//! The lease: when the leader loses it, it stops placing at once (its engine and plane are
//! dropped, its shards reset their runners); a standby node takes the lease (the epoch goes
//! up), resets its shards' runners, and waits the quiet period (`node_timeout_ms`) before it
//! places, holding what arrives meanwhile. Every other node learns the new leader (the lease
//! row) at a random moment within the quiet period, resets its runners and heartbeats the new
//! leader. When the quiet period ends, the new leader's engine is restored from the records
//! the old one wrote (the durable map its store operations built) and placement goes on.
//!
//! Not modelled: a node dying or being counted out (`node_lost`), periodic heartbeats, the
//! store being down, the engine API.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::Rng;

use super::world::{World, T0_MS};
use crate::cluster::bus::{Kind, TUN_HELD_BYTES, TUN_HELD_MSGS};
use crate::cluster::link::{Frame, LinkConfig, LinkRx, LinkTx, TunGate};
use crate::cluster::node;
use crate::cluster::wire::{self, NodeMsg, ALL_SHARDS};
use crate::engine::{Engine, EngineConfig, StoreOp};
use crate::gateway::{ControlMsg, Reason, Reply, ResolveError, ShardMsg};
use crate::plane::{self, Plane, To};

/// Longest time a frame spends on the bus (it is delivered, or it was lost).
pub(super) const BUS_LATENCY: Duration = Duration::from_secs(1);

/// What one bus frame carries.
#[derive(Debug, Clone)]
enum Wire {
    /// A frame of the control link from `from` to `to` (data or tail).
    Ctl(Frame<Bytes>),
    /// An acknowledgement of the control link from `to` back to `from`'s sender.
    Ack(Frame<Bytes>),
    /// A tunnel datagram (at most once), sent after the first `after` messages of the
    /// sender's control link `session` (for the receiver's [`TunGate`]).
    Tun {
        session: u64,
        after: u64,
        data: Bytes,
    },
}

/// A frame on the bus.
#[derive(Debug, Clone)]
struct Flight {
    at: Instant,
    from: usize,
    to: usize,
    wire: Wire,
}

/// The cluster's state: nodes, the bus, the lease.
pub(crate) struct Cluster {
    /// The node that holds the lease (placing, or waiting its quiet period).
    pub leader: usize,
    pub epoch: u64,
    /// The leader waits until then before it places (its engine does not exist yet).
    pub quiet_until: Option<Instant>,
    /// What reached the leader during its quiet period: (from node, message), in order.
    held: Vec<(usize, ControlMsg)>,
    /// Per node: the leader it follows and the epoch (none: it knows no leader now).
    known: Vec<Option<(usize, u64)>>,
    /// Per node: the last epoch it followed or led.
    last_epoch: Vec<u64>,
    /// Per node: the moment it learns the current leader (the lease row), if it has not.
    learn_at: Vec<Option<Instant>>,
    /// Per node: control messages kept while it knows no leader.
    queue: Vec<VecDeque<ControlMsg>>,
    /// Per node: questions forwarded to the leader (waiter ids), failed when it changes.
    asked: Vec<Vec<u64>>,
    /// `tx[from][to]` and `rx[to][from]`: the control links.
    tx: Vec<Vec<LinkTx<Bytes>>>,
    rx: Vec<Vec<LinkRx<Bytes>>>,
    /// `gate[to][from]`: tunnel messages held until the control messages sent before them
    /// arrived.
    gate: Vec<Vec<TunGate<Bytes>>>,
    flight: Vec<Flight>,
    /// The durable records the engines wrote (the store).
    pub records: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Lease losses so far.
    pub losses: u64,
    /// Frames lost, duplicated on the bus (counters).
    pub dropped: u64,
    pub duplicated: u64,
}

/// Loss and duplication (of control-link frames) on the bus.
const DROP: f64 = 0.1;
const DUPLICATE: f64 = 0.05;

impl Cluster {
    pub fn new(nodes: usize, seed: u64) -> Cluster {
        let cfg = LinkConfig::default();
        let tx = (0..nodes)
            .map(|from| {
                (0..nodes)
                    .map(|to| LinkTx::new(cfg, seed.rotate_left(7) ^ ((from * 64 + to) as u64 + 1)))
                    .collect()
            })
            .collect();
        let rx = (0..nodes)
            .map(|_| (0..nodes).map(|_| LinkRx::new(cfg)).collect())
            .collect();
        let gate = (0..nodes)
            .map(|_| {
                (0..nodes)
                    .map(|_| TunGate::new(TUN_HELD_MSGS, TUN_HELD_BYTES))
                    .collect()
            })
            .collect();
        Cluster {
            gate,
            leader: 0,
            epoch: 1,
            quiet_until: None,
            held: Vec::new(),
            known: (0..nodes).map(|_| None).collect(),
            last_epoch: vec![0; nodes],
            learn_at: vec![None; nodes],
            queue: (0..nodes).map(|_| VecDeque::new()).collect(),
            asked: vec![Vec::new(); nodes],
            tx,
            rx,
            flight: Vec::new(),
            records: BTreeMap::new(),
            losses: 0,
            dropped: 0,
            duplicated: 0,
        }
    }

    /// The leader places now (it holds the lease and its quiet period is over).
    pub fn placing(&self) -> bool {
        self.quiet_until.is_none()
    }

    /// Nothing on the bus and nothing unacknowledged.
    pub fn idle(&self) -> bool {
        self.flight.is_empty() && self.tx.iter().flatten().all(|t| t.unacked() == 0)
    }

    /// The next moment something here has to happen.
    pub fn deadline(&self) -> Option<Instant> {
        let links = self.tx.iter().flatten().filter_map(LinkTx::deadline);
        let learn = self.learn_at.iter().flatten().copied();
        links.chain(learn).chain(self.quiet_until).min()
    }
}

impl World {
    /// The node a (global) shard index belongs to.
    pub(super) fn node_of(&self, s: usize) -> usize {
        s / self.cfg.shards
    }

    /// The global index of shard `shard` of node `node`.
    pub(super) fn shard_at(&self, node: usize, shard: u16) -> usize {
        node * self.cfg.shards + shard as usize
    }

    fn node_index(&self, id: [u8; 4]) -> Option<usize> {
        (0..self.cfg.nodes).find(|n| super::actor::gateway_id(*n) == id)
    }

    /// Keeps what the engine wrote in the durable map (the store's commit).
    pub(super) fn persist(&mut self) {
        for op in self.engine.take_store_ops() {
            match op {
                StoreOp::Put { key, value } => {
                    self.cluster.records.insert(key, value);
                }
                StoreOp::Delete { key } => {
                    self.cluster.records.remove(&key);
                }
            }
        }
        for actor_id in self.engine.take_input_loads() {
            let key = crate::engine::input_key(&actor_id);
            let input = self.cluster.records.get(&key).cloned();
            let actions = self.engine.input_loaded(&actor_id, input, self.now);
            let mut out = Vec::new();
            self.plane.deliver(actions, &mut out);
            self.post(out);
        }
    }

    /// A control message of a shard of node `node`: the leader's plane takes it, a follower
    /// forwards it to the leader it knows (or keeps it).
    pub(super) fn control_from(&mut self, node: usize, msg: ControlMsg) {
        let c = &mut self.cluster;
        if node == c.leader {
            if c.placing() {
                self.control(msg);
            } else {
                c.held.push((node, msg));
            }
            return;
        }
        match c.known[node] {
            Some((l, _)) => self.forward(node, l, msg),
            None => c.queue[node].push_back(msg),
        }
    }

    fn forward(&mut self, node: usize, leader: usize, msg: ControlMsg) {
        match &msg {
            ControlMsg::Resolve { waiter, .. } | ControlMsg::ResolveNamed { waiter, .. } => {
                self.cluster.asked[node].push(*waiter)
            }
            ControlMsg::Api(r) => self.cluster.asked[node].push(r.waiter),
            _ => {}
        }
        self.bus_send(node, leader, Kind::Ctl, NodeMsg::Control(msg));
    }

    /// The questions node `node` forwarded to a leader that is gone get "unavailable".
    fn fail_asked(&mut self, node: usize) {
        let now = self.now;
        for waiter in std::mem::take(&mut self.cluster.asked[node]) {
            let (to, msg) = plane::answer(waiter, Reply::Resolve(Err(ResolveError::Unavailable)));
            let To::Shard(s) = to else {
                continue;
            };
            let g = self.shard_at(node, s);
            self.control_mail[g].push_back((now, msg));
        }
    }

    /// The control plane's message for its destination (the leader is the sender).
    pub(super) fn post_one(&mut self, to: To, msg: ShardMsg) {
        let now = self.now;
        let leader = self.cluster.leader;
        match to {
            To::Shard(s) => {
                let g = self.shard_at(leader, s);
                self.control_mail[g].push_back((now, msg));
            }
            To::Node(id, s) => match self.node_index(id) {
                Some(n) if n == leader => {
                    let g = self.shard_at(n, s);
                    self.control_mail[g].push_back((now, msg));
                }
                Some(n) => {
                    let m = NodeMsg::Shard { shard: s, msg };
                    self.bus_send(leader, n, Kind::Ctl, m);
                }
                None => self.fail(format!("the leader sent to an unknown node {id:?}")),
            },
            To::Peer(p, s) => {
                let n = p as usize - 1;
                if n == leader || n >= self.cfg.nodes {
                    self.fail(format!("the leader answered peer {p}, not another node"));
                    return;
                }
                self.bus_send(leader, n, Kind::Ctl, NodeMsg::Shard { shard: s, msg });
            }
            To::All => {
                let remotes: Vec<[u8; 4]> = self.plane.remotes().collect();
                for id in remotes {
                    if let Some(n) = self.node_index(id) {
                        let copy = plane::copy_for_broadcast(&msg);
                        let m = NodeMsg::Shard {
                            shard: ALL_SHARDS,
                            msg: copy,
                        };
                        self.bus_send(leader, n, Kind::Ctl, m);
                    }
                }
                for s in 0..self.cfg.shards {
                    let g = self.shard_at(leader, s as u16);
                    let copy = plane::copy_for_broadcast(&msg);
                    self.control_mail[g].push_back((now, copy));
                }
            }
        }
    }

    /// A shard's message for shard `shard` of the node with gateway id `id` (`ToNode`).
    pub(super) fn send_to_node(
        &mut self,
        from_shard: usize,
        id: [u8; 4],
        shard: u16,
        msg: ShardMsg,
    ) {
        let from = self.node_of(from_shard);
        let Some(to) = self.node_index(id) else {
            self.fail(format!("a shard sent to an unknown node {id:?}"));
            return;
        };
        if to == from {
            self.fail("ToNode for the shard's own node".to_string());
            return;
        }
        let kind = node::kind_of(&msg);
        self.bus_send(from, to, kind, NodeMsg::Shard { shard, msg });
    }

    /// Encodes `msg` (the real wire) and puts it on the bus.
    fn bus_send(&mut self, from: usize, to: usize, kind: Kind, msg: NodeMsg) {
        let mut buf = BytesMut::new();
        if let Err(e) = wire::encode(&msg, &mut buf) {
            self.fail(format!("a message cannot cross nodes: {e}"));
            return;
        }
        let data = buf.freeze();
        let now = self.now;
        let wire = match kind {
            Kind::Tun => {
                let tx = &self.cluster.tx[from][to];
                Wire::Tun {
                    session: tx.session(),
                    after: tx.next_seq(),
                    data,
                }
            }
            Kind::Ctl => match self.cluster.tx[from][to].send(data, now) {
                Ok(f) => Wire::Ctl(f),
                Err(_) => {
                    self.fail("a control link's window is full".to_string());
                    return;
                }
            },
        };
        self.cluster.flight.push(Flight {
            at: now,
            from,
            to,
            wire,
        });
    }

    /// Frames on the bus (for the random step).
    pub(super) fn bus_busy(&self) -> bool {
        !self.cluster.flight.is_empty()
    }

    /// The bus delivers (or loses, or duplicates) up to `n` random frames.
    pub(super) fn bus_deliver_random(&mut self, n: usize) {
        for _ in 0..n {
            if self.cluster.flight.is_empty() {
                return;
            }
            let mut i = self.rng.random_range(0..self.cluster.flight.len());
            // Core NATS keeps each publisher's order and never delivers one publish twice:
            // tunnel datagrams between two nodes arrive in order (or not at all); the link's
            // frames are reordered and come twice (its resends do anyway).
            let tun = matches!(self.cluster.flight[i].wire, Wire::Tun { .. });
            if tun {
                let (from, to) = (self.cluster.flight[i].from, self.cluster.flight[i].to);
                i = self
                    .cluster
                    .flight
                    .iter()
                    .position(|f| {
                        f.from == from && f.to == to && matches!(f.wire, Wire::Tun { .. })
                    })
                    .unwrap_or(i);
            }
            let f = if !tun && self.rng.random_bool(DUPLICATE) {
                self.cluster.duplicated += 1;
                self.cluster.flight[i].clone()
            } else {
                self.cluster.flight.remove(i)
            };
            if self.rng.random_bool(DROP) {
                self.cluster.dropped += 1;
                continue;
            }
            self.bus_arrive(f);
        }
    }

    /// Every frame sent at or before `until` arrives (all with `None`); lost ones come again
    /// with the links' resends. Returns whether anything arrived.
    pub(super) fn bus_deliver_until(&mut self, until: Option<Instant>) -> bool {
        let mut moved = false;
        loop {
            let i = self
                .cluster
                .flight
                .iter()
                .position(|f| until.is_none_or(|u| f.at <= u));
            let Some(i) = i else {
                return moved;
            };
            let f = self.cluster.flight.remove(i);
            moved = true;
            self.bus_arrive(f);
        }
    }

    /// While settling, the links' resend timers fire at once (the bus is fast then): what is
    /// unacknowledged goes again. Returns whether anything was sent.
    pub(super) fn bus_resend_now(&mut self) -> bool {
        let mut any = false;
        for from in 0..self.cfg.nodes {
            for to in 0..self.cfg.nodes {
                let tx = &mut self.cluster.tx[from][to];
                if tx.unacked() == 0 {
                    continue;
                }
                let at = tx.deadline().unwrap_or(self.now).max(self.now);
                let now = self.now;
                for f in tx.poll(at) {
                    any = true;
                    self.cluster.flight.push(Flight {
                        at: now,
                        from,
                        to,
                        wire: Wire::Ctl(f),
                    });
                }
            }
        }
        any
    }

    /// The links' resend timers and the lease's moments due at `now`.
    pub(super) fn cluster_timers(&mut self) {
        let now = self.now;
        for from in 0..self.cfg.nodes {
            for to in 0..self.cfg.nodes {
                for f in self.cluster.tx[from][to].poll(now) {
                    self.cluster.flight.push(Flight {
                        at: now,
                        from,
                        to,
                        wire: Wire::Ctl(f),
                    });
                }
            }
        }
        for n in 0..self.cfg.nodes {
            if self.cluster.learn_at[n].is_some_and(|t| t <= now) {
                self.learn_leader(n);
            }
        }
        if self.cluster.quiet_until.is_some_and(|t| t <= now) {
            self.start_placing();
        }
    }

    fn bus_arrive(&mut self, f: Flight) {
        let now = self.now;
        match f.wire {
            Wire::Ack(Frame::Ack { session, upto }) => {
                // At the sender of the link `to -> from`... acks travel from the receiver
                // (`from` here) to the sender (`to`).
                self.cluster.tx[f.to][f.from].on_ack(session, upto, now);
            }
            Wire::Ack(_) => {}
            Wire::Ctl(frame) => {
                let r = self.cluster.rx[f.to][f.from].on_frame(frame);
                if let Some(ack) = r.ack {
                    self.cluster.flight.push(Flight {
                        at: now,
                        from: f.to,
                        to: f.from,
                        wire: Wire::Ack(ack),
                    });
                }
                if r.new_session {
                    self.fail("a control link started a new session (no node restarts)");
                }
                for data in r.delivered {
                    self.node_receive(f.to, f.from, data);
                }
                let released = {
                    let c = &mut self.cluster;
                    c.gate[f.to][f.from].release(&c.rx[f.to][f.from])
                };
                for data in released {
                    self.node_receive(f.to, f.from, data);
                }
            }
            Wire::Tun {
                session,
                after,
                data,
            } => {
                let data = if self.cfg.no_tun_gate {
                    Some(data)
                } else {
                    let c = &mut self.cluster;
                    c.gate[f.to][f.from].offer(&c.rx[f.to][f.from], session, after, data)
                };
                if let Some(data) = data {
                    self.node_receive(f.to, f.from, data);
                }
            }
        }
        self.pump();
    }

    /// Node `at` receives a message of node `from` (the bridge, then the control thread).
    fn node_receive(&mut self, at: usize, from: usize, data: Bytes) {
        let msg = match wire::decode(data) {
            Ok(m) => m,
            Err(e) => {
                self.fail(format!("a message between nodes did not decode: {e}"));
                return;
            }
        };
        let now = self.now;
        match msg {
            NodeMsg::Shard { shard, msg } => {
                if shard == ALL_SHARDS {
                    for s in 0..self.cfg.shards {
                        let g = self.shard_at(at, s as u16);
                        self.control_mail[g].push_back((now, plane::copy_for_broadcast(&msg)));
                    }
                } else if (shard as usize) < self.cfg.shards {
                    let g = self.shard_at(at, shard);
                    self.control_mail[g].push_back((now, msg));
                } else {
                    self.fail(format!("a message for shard {shard}, which does not exist"));
                }
            }
            NodeMsg::Control(msg) => self.leader_takes(at, from, Some(msg), None),
            NodeMsg::Heartbeat { shards, epoch } => {
                self.leader_takes(at, from, None, Some((shards, epoch)))
            }
            NodeMsg::Leader { epoch } => {
                // The leader's answer to a heartbeat of an older epoch: the node learns it.
                if epoch == self.cluster.epoch && from == self.cluster.leader {
                    self.learn_leader(at);
                }
            }
        }
    }

    /// What the leader's control thread does with a message of another node (a follower
    /// drops control messages: it does not lead).
    fn leader_takes(
        &mut self,
        at: usize,
        from: usize,
        msg: Option<ControlMsg>,
        beat: Option<(u16, u64)>,
    ) {
        if at != self.cluster.leader {
            return;
        }
        if !self.cluster.placing() {
            if let Some(msg) = msg {
                self.cluster.held.push((from, msg));
            } else if let Some((shards, epoch)) = beat {
                self.heartbeat(from, shards, epoch);
            }
            return;
        }
        if let Some((shards, epoch)) = beat {
            self.heartbeat(from, shards, epoch);
        }
        let Some(msg) = msg else {
            return;
        };
        let id = super::actor::gateway_id(from);
        let mut out = Vec::new();
        if let ControlMsg::StopApplied { barrier } = msg {
            self.plane
                .remote_applied(id, barrier, &mut self.engine, &mut out);
            self.post(out);
            return;
        }
        match plane::from_peer(msg, from as u16 + 1) {
            Some(m) => self.control(m),
            None => self.fail("a message that never comes from another node".to_string()),
        }
    }

    fn heartbeat(&mut self, from: usize, shards: u16, epoch: u64) {
        let leader = self.cluster.leader;
        if epoch != self.cluster.epoch {
            let e = self.cluster.epoch;
            self.bus_send(leader, from, Kind::Ctl, NodeMsg::Leader { epoch: e });
        }
        if !self.cluster.placing() {
            // As `lead()` does: heartbeats of the quiet period are applied to the plane
            // that places (see `start_placing`).
            return;
        }
        let mut out = Vec::new();
        let id = super::actor::gateway_id(from);
        self.plane
            .set_remote(id, shards as usize, &self.engine, &mut out);
        self.post(out);
    }

    /// Node `n`'s shards: the placement leader changed (`leader_changed`).
    fn reset_node(&mut self, n: usize) {
        let now = self.now;
        for s in 0..self.cfg.shards {
            let g = self.shard_at(n, s as u16);
            let msg = ShardMsg::ResetRunners(Reason::ClusterLeaderChanged);
            self.control_mail[g].push_back((now, msg));
        }
    }

    /// Node `n` learns from the lease row who leads now (`follow`: `LeaderIs`).
    fn learn_leader(&mut self, n: usize) {
        self.cluster.learn_at[n] = None;
        let (leader, epoch) = (self.cluster.leader, self.cluster.epoch);
        if n == leader || epoch <= self.cluster.last_epoch[n] {
            return;
        }
        self.log(|| format!("node {n} follows node {leader} (epoch {epoch})"));
        if self.cluster.last_epoch[n] != 0 {
            self.reset_node(n);
        }
        self.fail_asked(n);
        self.cluster.last_epoch[n] = epoch;
        self.cluster.known[n] = Some((leader, epoch));
        let shards = self.cfg.shards as u16;
        self.bus_send(n, leader, Kind::Ctl, NodeMsg::Heartbeat { shards, epoch });
        let queued: Vec<ControlMsg> = self.cluster.queue[n].drain(..).collect();
        for msg in queued {
            self.forward(n, leader, msg);
        }
        self.pump();
    }

    /// The first leader: node 0, placing from the start; the others learn it at once and
    /// their first heartbeats reach it before any runner connects (unless `late_join`: then
    /// they cross the lossy bus while runners attach, see `a_node_joining_late_learns_the_runners`).
    pub(super) fn cluster_start(&mut self) {
        self.cluster.last_epoch[0] = self.cluster.epoch;
        for n in 1..self.cfg.nodes {
            self.learn_leader(n);
        }
        if !self.cfg.late_join {
            while self.bus_deliver_until(None) {}
        }
    }

    /// The leader loses its lease: it stops placing at once, and a standby takes over.
    pub(super) fn lose_lease(&mut self) {
        if !self.cluster.placing() || self.cfg.nodes < 2 {
            return;
        }
        self.persist();
        let old = self.cluster.leader;
        let mut next = self.rng.random_range(0..self.cfg.nodes - 1);
        if next >= old {
            next += 1;
        }
        self.cluster.losses += 1;
        self.log(|| format!("node {old} loses the lease; node {next} takes it"));
        // The old leader: its engine is gone (a placeholder until the next one is restored),
        // its shards reset their runners, and it follows nobody until it learns the next.
        self.engine = Engine::new(EngineConfig::default(), 0, self.t0, T0_MS);
        self.plane = Plane::new(self.cfg.shards);
        self.reset_node(old);
        self.cluster.known[old] = None;
        // The standby leads with the next epoch after its quiet period.
        self.cluster.epoch += 1;
        self.cluster.leader = next;
        self.cluster.known[next] = None;
        self.fail_asked(next);
        let carried: Vec<ControlMsg> = self.cluster.queue[next].drain(..).collect();
        self.cluster.held = carried.into_iter().map(|m| (next, m)).collect();
        if self.cluster.last_epoch[next] != 0 {
            self.reset_node(next);
        }
        self.cluster.last_epoch[next] = self.cluster.epoch;
        // `SIM_QUIET_MS` overrides the quiet period (`cluster.node_timeout_ms`) to try others.
        let quiet_ms = std::env::var("SIM_QUIET_MS")
            .ok()
            .and_then(|v| v.parse().ok());
        let ms = quiet_ms.unwrap_or(self.cfg.gateway_config().cluster.node_timeout_ms);
        let timeout = Duration::from_millis(ms);
        let quiet = self.now + timeout;
        self.cluster.quiet_until = Some(quiet);
        // Every other node reads the lease row within the quiet period.
        for n in 0..self.cfg.nodes {
            if n != next {
                let ms = self.rng.random_range(0..timeout.as_millis() as u64);
                self.cluster.learn_at[n] = Some(self.now + Duration::from_millis(ms));
            }
        }
        self.pump();
    }

    /// The quiet period is over: the new leader restores its engine from the records and
    /// places, taking what it held, in order.
    fn start_placing(&mut self) {
        for n in 0..self.cfg.nodes {
            if self.cluster.learn_at[n].is_some() {
                self.learn_leader(n);
            }
        }
        self.cluster.quiet_until = None;
        let seed = self.seed ^ self.cluster.epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let ms = T0_MS + self.ms() as i64;
        let mut engine = Engine::new(EngineConfig::default(), seed, self.now, ms);
        let records: Vec<(Vec<u8>, Vec<u8>)> = self
            .cluster
            .records
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        engine.restore(records, self.now);
        // As `lead()` does after a leader change: no placement for `runner_lost_threshold`.
        if self.cfg.placement_hold {
            let hold = EngineConfig::default().runner_lost_threshold;
            engine.hold_placement_until(self.now + hold);
        }
        self.engine = engine;
        self.plane = Plane::new(self.cfg.shards);
        self.log(|| {
            format!(
                "node {} places (epoch {})",
                self.cluster.leader, self.cluster.epoch
            )
        });
        // Heartbeats that came during the quiet period were applied to the plane that is
        // replaced now: the nodes that follow this leader are its remotes.
        for n in 0..self.cfg.nodes {
            if self.cluster.known[n]
                .is_some_and(|(l, e)| l == self.cluster.leader && e == self.cluster.epoch)
            {
                let mut out = Vec::new();
                let id = super::actor::gateway_id(n);
                self.plane
                    .set_remote(id, self.cfg.shards, &self.engine, &mut out);
                self.post(out);
            }
        }
        self.persist();
        let leader = self.cluster.leader;
        let held = std::mem::take(&mut self.cluster.held);
        for (from, msg) in held {
            if from == leader {
                self.control(msg);
            } else {
                self.leader_takes(leader, from, Some(msg), None);
            }
        }
        self.pump();
    }
}
