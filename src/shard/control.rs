//! The control-plane thread: owns the sans-IO [`Engine`] and turns its actions into shard
//! messages. It is off the data path: steady-state message forwarding never passes here, only
//! runner sessions (Init, events, command acks), actor lookups and the engine HTTP API.

use super::Shared;
use crate::cluster::bus::{hex, Kind, NodeId};
use crate::cluster::node::{ClusterIn, Node};
use crate::cluster::wire::{NodeMsg, ALL_SHARDS};
use crate::engine::{self, Action, ConnRef, Engine, EngineConfig, InitReport, Resolve, StoreOp};
use crate::gateway::{
    ApiRequest, ControlMsg, Reason, Reply, ResolveError as ShardResolveError, ShardMsg,
};
use crate::kv::worker::Done;
use crate::kv::{Job, KvError, KvHandle, MetaRecord, Reply as KvReply};
use crate::metrics::Counter;
use crate::plane::{self, Plane, Stepped, To};
use crate::protocol::{self, ToServer};
use crate::serverless::{self, Hooks, Outbound};
use crossbeam_channel::Receiver;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn engine_config(shared: &Shared) -> EngineConfig {
    let t = &shared.config.timeouts;
    let l = &shared.config.limits;
    let d = Duration::from_millis;
    EngineConfig {
        runner_lost_threshold: d(t.runner_lost_threshold_ms),
        actor_stop_threshold: d(t.actor_stop_threshold_ms),
        wake_timeout: d(t.actor_wake_ms),
        hibernation_eligible: d(t.hibernation_eligible_ms),
        public_url: format!("http://{}", shared.config.listen),
        actors_per_namespace: l.actors_per_namespace,
        max_input_bytes: l.actor_input_bytes,
        max_name_bytes: l.actor_name_bytes,
        max_key_bytes: l.actor_key_bytes,
        runner_max_slots: l.runner_max_slots,
        runner_name_bytes: l.runner_name_bytes,
        runner_actor_names: l.runner_actor_names,
        runner_actor_metadata_bytes: l.runner_actor_metadata_bytes,
        runner_configs: shared.config.runner_config_limits(),
        pools: shared.config.serverless.pools(shared.config.admin_token()),
        ..EngineConfig::default()
    }
}

fn unix_ms() -> i64 {
    super::unix_ms()
}

/// Runs until `Shutdown` or until every sender is gone. `records` are the engine's durable
/// records as the store holds them (restored before anything else happens); every later
/// change goes to `kv`.
///
/// With several nodes (`cluster`: what the node's threads report), the engine runs only
/// while this node holds the placement lease, restored from the records each time it starts
/// leading; otherwise the shards' messages are forwarded to the leader ([`follow`]).
pub fn run_control(
    shared: Shared,
    rx: Receiver<ControlMsg>,
    kv: KvHandle,
    records: Vec<(Vec<u8>, Vec<u8>)>,
    cluster: Option<Receiver<ClusterIn>>,
) {
    let Some(crx) = cluster else {
        let gauge = &shared.metrics.leading_epoch;
        gauge.store(1, std::sync::atomic::Ordering::Relaxed);
        let known = &shared.metrics.known_epoch;
        known.store(1, std::sync::atomic::Ordering::Relaxed);
        lead(&shared, &rx, &kv, records, None, &mut Vec::new());
        return;
    };
    let mut carried: Vec<ControlMsg> = Vec::new();
    // The last epoch this node followed or led (0: none yet).
    let mut last_epoch = 0;
    loop {
        let epoch = match follow(&shared, &rx, &crx, &kv, &mut carried, &mut last_epoch) {
            Followed::Shutdown => return,
            Followed::Lead(epoch) => epoch,
        };
        if last_epoch != 0 {
            // Runners attached under another leader connect again to be known by this one.
            leader_changed(&shared);
        }
        last_epoch = epoch;
        let known = &shared.metrics.known_epoch;
        known.store(epoch as i64, std::sync::atomic::Ordering::Relaxed);
        // Every write from here on is conditional on this epoch; a write of an earlier term
        // still queued runs under the earlier fence (refused if that term is over).
        let _ = kv.set_fence(Some(epoch));
        let records = match kv.load_meta_blocking() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, epoch, "cannot read the records to lead; waiting for the lease to pass on");
                continue;
            }
        };
        for msg in carried.drain(..) {
            let _ = shared.control.send(msg);
        }
        let gauge = &shared.metrics.leading_epoch;
        gauge.store(epoch as i64, std::sync::atomic::Ordering::Relaxed);
        let led = lead(
            &shared,
            &rx,
            &kv,
            records,
            Some((&crx, epoch)),
            &mut carried,
        );
        gauge.store(0, std::sync::atomic::Ordering::Relaxed);
        match led {
            Led::Shutdown => return,
            Led::SteppedDown => {
                tracing::warn!(epoch, "stopped placing: the lease passed on");
                leader_changed(&shared);
            }
        }
    }
}

/// Tells this node's shards that the placement leader changed (see
/// [`crate::gateway::Gateway::reset_runners`]).
fn leader_changed(shared: &Shared) {
    for mb in shared.shards.iter() {
        mb.send(ShardMsg::ResetRunners(Reason::ClusterLeaderChanged));
    }
}

/// How a term as the leader ended.
enum Led {
    Shutdown,
    SteppedDown,
}

/// How following ended.
enum Followed {
    Shutdown,
    Lead(u64),
}

/// Most control messages a follower keeps while it knows no leader.
const FOLLOWER_QUEUE: usize = 65_536;

/// Forwards the shards' control messages to the leader (kept, up to [`FOLLOWER_QUEUE`],
/// while no leader is known) and tells it every `cluster.heartbeat_ms` that this node is
/// alive, until this node leads or stops. Messages kept when it starts to lead are left in
/// `carried`.
fn follow(
    shared: &Shared,
    rx: &Receiver<ControlMsg>,
    crx: &Receiver<ClusterIn>,
    kv: &KvHandle,
    carried: &mut Vec<ControlMsg>,
    last_epoch: &mut u64,
) -> Followed {
    let node = shared.node.as_ref().expect("a cluster node has a bus");
    let every = Duration::from_millis(shared.config.cluster.heartbeat_ms);
    let shards = shared.shards.len() as u16;
    let mut leader: Option<(NodeId, u64)> = None;
    let mut queue: VecDeque<ControlMsg> = carried.drain(..).collect();
    let mut next_beat = Instant::now();
    // Questions forwarded to the current leader (they may never be answered if it dies).
    let mut asked: VecDeque<Asked> = VecDeque::new();
    let forward = |l: NodeId, msg: ControlMsg, asked: &mut VecDeque<Asked>| {
        let now = Instant::now();
        while asked
            .front()
            .is_some_and(|a| now.saturating_duration_since(a.at) > ASK_MAX)
        {
            asked.pop_front();
        }
        match &msg {
            ControlMsg::Resolve { waiter, .. } | ControlMsg::ResolveNamed { waiter, .. } => asked
                .push_back(Asked {
                    waiter: *waiter,
                    api: false,
                    at: now,
                }),
            ControlMsg::Api(r) => asked.push_back(Asked {
                waiter: r.waiter,
                api: true,
                at: now,
            }),
            _ => {}
        }
        node.send(l, Kind::Ctl, &NodeMsg::Control(msg));
    };
    loop {
        let now = Instant::now();
        if now >= next_beat {
            if let Some((l, epoch)) = leader {
                node.send(l, Kind::Ctl, &NodeMsg::Heartbeat { shards, epoch });
            }
            next_beat = now + every;
        }
        let wait = next_beat.saturating_duration_since(now);
        crossbeam_channel::select! {
            recv(rx) -> m => match m {
                Ok(ControlMsg::Shutdown) | Err(_) => return Followed::Shutdown,
                Ok(msg) if !kv.is_up() && refuse_while_down(shared, kv, &msg) => {}
                Ok(msg) => match leader {
                    Some((l, _)) => forward(l, msg, &mut asked),
                    None if queue.len() < FOLLOWER_QUEUE => queue.push_back(msg),
                    None => {
                        shared.metrics.control.inc(Counter::ClusterDropped);
                    }
                },
            },
            recv(crx) -> c => match c {
                Err(_) => return Followed::Shutdown,
                Ok(ClusterIn::BecameLeader { epoch }) => {
                    fail_asked(shared, &mut asked);
                    carried.extend(queue);
                    return Followed::Lead(epoch);
                }
                Ok(ClusterIn::LeaderIs { node: l, epoch } | ClusterIn::Leader { from: l, epoch }) => {
                    if epoch > *last_epoch && l != node.id {
                        tracing::info!(leader = %hex(l), epoch, "following the placement leader");
                        if *last_epoch != 0 {
                            leader_changed(shared);
                        }
                        fail_asked(shared, &mut asked);
                        *last_epoch = epoch;
                        let known = &shared.metrics.known_epoch;
                        known.store(epoch as i64, std::sync::atomic::Ordering::Relaxed);
                        leader = Some((l, epoch));
                        // The heartbeat first: the leader's broadcasts reach this node's
                        // shards from then on, before any runner of it is attached.
                        node.send(l, Kind::Ctl, &NodeMsg::Heartbeat { shards, epoch });
                        next_beat = Instant::now() + every;
                        for msg in queue.drain(..) {
                            forward(l, msg, &mut asked);
                        }
                    }
                }
                Ok(ClusterIn::PeerGone(n)) => {
                    if leader.is_some_and(|(l, _)| l == n) {
                        tracing::warn!(leader = %hex(n), "the placement leader restarted; waiting for the next");
                        leader = None;
                        fail_asked(shared, &mut asked);
                    }
                }
                Ok(ClusterIn::Control { .. }) => {
                    // For a leader; this node does not lead (the sender learns who does).
                    shared.metrics.control.inc(Counter::ClusterDropped);
                }
                Ok(_) => {}
            },
            default(wait) => {}
        }
    }
}

/// While this node's store cannot commit, neither can the leader's (they share one
/// PostgreSQL): an engine API call that changes actors is answered 503
/// `store.unavailable` and a runner's KV request gets the same error at once, as a leader's
/// store would answer, instead of waiting for a leader that may not be there (its lease cannot be renewed
/// either). Returns whether `msg` was answered.
fn refuse_while_down(shared: &Shared, kv: &KvHandle, msg: &ControlMsg) -> bool {
    let why = KvError::StoreDown(kv.down_reason().unwrap_or_default());
    match msg {
        ControlMsg::Api(req) if writes_actors(&req.method) => {
            send_reply(shared, req.waiter, store_unavailable(&why));
            true
        }
        ControlMsg::RunnerMsg {
            conn,
            msg: ToServer::KvRequest(req),
        } => {
            let data = protocol::KvResponseData::Error(protocol::KvErrorResponse {
                message: why.to_string(),
            });
            let msg = protocol::ToClient::KvResponse(protocol::ToClientKvResponse {
                request_id: req.request_id,
                data,
            });
            let to_runner = ShardMsg::ToRunner {
                conn: plane::conn_id(*conn),
                frames: plane::frames(&msg),
            };
            send(
                shared,
                &mut vec![(To::Node(conn.node, conn.shard), to_runner)],
            );
            true
        }
        _ => false,
    }
}

/// A question of a shard forwarded to the leader.
struct Asked {
    waiter: u64,
    /// An engine API call (else a routing question).
    api: bool,
    at: Instant,
}

/// Longest a shard waits for an answer of the control plane (the engine API's wait).
const ASK_MAX: Duration = Duration::from_secs(60);

/// The leader that was asked is gone or deposed: its answers may never come, so each
/// question gets "unavailable" now (an API change it made may have been committed: a 503
/// means "unknown, retry", as when the store fails). An answer that did come already makes
/// the shard ignore this one.
fn fail_asked(shared: &Shared, asked: &mut VecDeque<Asked>) {
    let mut out = Vec::with_capacity(asked.len());
    for a in asked.drain(..) {
        let reply = if a.api {
            let body = serde_json::json!({
                "group": "cluster",
                "code": "leader_changed",
                "message": "the placement leader changed while this request was with it; \
                            whether it took effect is unknown: retry (a retried create is \
                            safe with PUT /actors, get-or-create)",
            });
            Reply::Api {
                status: 503,
                body: body.to_string(),
            }
        } else {
            Reply::Resolve(Err(ShardResolveError::Unavailable))
        };
        out.push(plane::answer(a.waiter, reply));
    }
    send(shared, &mut out);
}

/// The leader's view of the other nodes: when each was last heard from, and those it
/// counted out.
struct Members {
    seen: HashMap<NodeId, Instant>,
    lost: HashSet<NodeId>,
    timeout: Duration,
}

/// A control message of another node's shard, its waiter id given that node's peer number
/// (`None`: a message that never comes from another node).
fn from_peer(node: &Node, from: NodeId, msg: ControlMsg) -> Option<ControlMsg> {
    plane::from_peer(msg, node.peer_number(from)?)
}

/// One term of running the engine: until `Shutdown`, or (several nodes) until this node no
/// longer leads; then the shards' messages it took and did not handle are left in
/// `carried` (the follower forwards them to the next leader).
fn lead(
    shared: &Shared,
    rx: &Receiver<ControlMsg>,
    kv: &KvHandle,
    records: Vec<(Vec<u8>, Vec<u8>)>,
    cluster: Option<(&Receiver<ClusterIn>, u64)>,
    carried: &mut Vec<ControlMsg>,
) -> Led {
    let never = crossbeam_channel::never();
    let (crx, my_epoch) = match cluster {
        Some((crx, epoch)) => (crx, epoch),
        None => (&never, 0),
    };
    let mut members = Members {
        seen: HashMap::new(),
        lost: HashSet::new(),
        timeout: Duration::from_millis(shared.config.cluster.node_timeout_ms),
    };
    let mut cluster_in: Vec<ClusterIn> = Vec::new();
    // A new leader waits `cluster.node_timeout_ms` before it places anything: every live
    // node learns the new epoch meanwhile (the lease row, or this node's answer to its
    // heartbeat) and closes the runner connections of the old term, so no actor the old
    // leader placed is still running when this one places it again. What arrives meanwhile
    // is kept, in order.
    let mut held: Vec<ControlMsg> = Vec::new();
    if cluster.is_some() {
        let quiet_until = Instant::now() + members.timeout;
        loop {
            let now = Instant::now();
            if now >= quiet_until {
                break;
            }
            crossbeam_channel::select! {
                recv(rx) -> m => match m {
                    Ok(ControlMsg::Shutdown) | Err(_) => return Led::Shutdown,
                    Ok(m) => held.push(m),
                },
                recv(crx) -> c => match c {
                    Ok(ClusterIn::StepDown { .. }) => {
                        carried.append(&mut held);
                        return Led::SteppedDown;
                    }
                    Ok(c) => cluster_in.push(c),
                    Err(_) => return Led::Shutdown,
                },
                default(quiet_until - now) => {}
            }
        }
    }
    let mut engine = Engine::new(
        engine_config(shared),
        rand::random(),
        Instant::now(),
        unix_ms(),
    );
    let report = engine.restore(records, Instant::now());
    tracing::info!(?report, "control plane restored its actors");
    if cluster.is_some() && my_epoch > 1 {
        // A runner whose connection was down when the nodes fenced theirs still runs what
        // the old leader placed, until `runner_lost_threshold` after its loss (at the latest
        // the end of the quiet period): nothing is placed before that. Epoch 1 is the first
        // leader of the database: nothing was placed before it.
        let threshold = crate::config::ms(shared.config.timeouts.runner_lost_threshold_ms);
        engine.hold_placement_until(Instant::now() + threshold);
    }
    // The TCP peer of each runner connection that sent an accepted Init (for log lines).
    let mut peers: HashMap<ConnRef, SocketAddr> = HashMap::new();
    // Actors whose stored input this round of messages needs (read in one job per round).
    let mut loads: Vec<String> = Vec::new();
    let mut out: Vec<(To, ShardMsg)> = Vec::new();
    let mut plane = Plane::new(shared.shards.len());
    if cluster.is_some() {
        tracing::info!(epoch = my_epoch, ?report, "leading placement");
    }
    // The outbound client of the serverless pools: the engine's requests go to it, its
    // events come back to the engine.
    let (outbound, mut outbound_events) = match Outbound::spawn(
        shared.config.serverless.outbound(),
        Hooks::default(),
    ) {
        Ok((o, events)) => (Some(o), events),
        Err(err) => {
            tracing::error!(%err, "the serverless outbound client could not start; no pool runner will be started");
            (None, crossbeam_channel::never())
        }
    };
    let mut pool_events: Vec<serverless::Event> = Vec::new();
    loop {
        // Wait for a message, an outbound event or the engine's next deadline; the gauges
        // are refreshed at least every ACTOR_COUNTS_MAX_AGE.
        let now = Instant::now();
        let wake = engine
            .next_deadline()
            .map_or(ACTOR_COUNTS_MAX_AGE, |t| t.saturating_duration_since(now))
            .min(ACTOR_COUNTS_MAX_AGE);
        let mut outbound_gone = false;
        let first = crossbeam_channel::select! {
            recv(rx) -> m => match m {
                Ok(m) => Some(m),
                Err(_) => return Led::Shutdown,
            },
            recv(crx) -> c => match c {
                Ok(c) => {
                    cluster_in.push(c);
                    None
                }
                Err(_) => return Led::Shutdown,
            },
            recv(outbound_events) -> ev => {
                match ev {
                    Ok(ev) => pool_events.push(ev),
                    Err(_) => outbound_gone = true,
                }
                None
            },
            default(wake) => None,
        };
        if cluster.is_some()
            && shared
                .node
                .as_ref()
                .is_some_and(|n| !n.may_place(Instant::now()))
        {
            // The lease ran out (paused, or renewals failed) before the lease thread said
            // so: nothing more is placed or answered in this term; what this node's shards
            // asked goes to the next leader.
            carried.append(&mut held);
            carried.extend(first);
            carried.extend(rx.try_iter());
            return Led::SteppedDown;
        }
        if outbound_gone {
            tracing::error!(
                "the serverless outbound client stopped; no pool runner will be started"
            );
            outbound_events = crossbeam_channel::never();
        }
        pool_events.extend(outbound_events.try_iter());
        for ev in pool_events.drain(..) {
            log_pool_event(shared, &ev);
            let actions = engine.pool_event(ev, Instant::now());
            plane.deliver(actions, &mut out);
            persist(&mut engine, kv);
            send(shared, &mut out);
        }
        let mut batch: Vec<ControlMsg> = std::mem::take(&mut held);
        batch.extend(first);
        batch.extend(rx.try_iter());
        if let Some(node) = shared.node.as_deref().filter(|_| cluster.is_some()) {
            cluster_in.extend(crx.try_iter());
            let now = Instant::now();
            // Other nodes' messages (their waiters carry this leader's peer numbers, so they
            // are never carried over to a next leader).
            let mut from_remote = Vec::new();
            for c in cluster_in.drain(..) {
                match c {
                    ClusterIn::Control {
                        from,
                        msg: ControlMsg::StopApplied { barrier },
                    } => plane.remote_applied(from, barrier, &mut engine, &mut out),
                    ClusterIn::Control { from, msg } => {
                        members.seen.entry(from).or_insert(now);
                        from_remote.extend(from_peer(node, from, msg));
                    }
                    ClusterIn::Heartbeat {
                        from,
                        shards,
                        epoch,
                    } => {
                        if epoch != my_epoch {
                            node.send(from, Kind::Ctl, &NodeMsg::Leader { epoch: my_epoch });
                        }
                        if members.lost.remove(&from) {
                            // Its runners were forgotten when it was counted out: they
                            // connect again (through its shards) to be known anew.
                            tracing::warn!(node = %hex(from), "a node counted out is back; its runners connect again");
                            let reset = ShardMsg::ResetRunners(Reason::ClusterNodeRejoined);
                            node.send_shard_ctl(from, ALL_SHARDS, reset);
                        }
                        if members.seen.insert(from, now).is_none() {
                            tracing::info!(node = %hex(from), shards, "a node joined");
                        }
                        plane.set_remote(from, shards as usize, &engine, &mut out);
                    }
                    ClusterIn::StepDown { .. } => {
                        carried.append(&mut batch);
                        return Led::SteppedDown;
                    }
                    ClusterIn::Leader { epoch, .. } | ClusterIn::LeaderIs { epoch, .. }
                        if epoch > my_epoch =>
                    {
                        carried.append(&mut batch);
                        return Led::SteppedDown;
                    }
                    ClusterIn::PeerGone(n) => node_lost(
                        shared,
                        n,
                        &mut members,
                        &mut plane,
                        &mut engine,
                        &peers,
                        &mut out,
                    ),
                    _ => {}
                }
            }
            let lost: Vec<NodeId> = members
                .seen
                .iter()
                .filter(|(_, at)| now.saturating_duration_since(**at) > members.timeout)
                .map(|(n, _)| *n)
                .collect();
            for n in lost {
                node_lost(
                    shared,
                    n,
                    &mut members,
                    &mut plane,
                    &mut engine,
                    &peers,
                    &mut out,
                );
            }
            node.set_members(plane.remotes().collect());
            batch.append(&mut from_remote);
            persist(&mut engine, kv);
            send(shared, &mut out);
        }
        for msg in batch {
            let now = Instant::now();
            match plane.step(&mut engine, msg, now, &mut out) {
                Stepped::Done => {}
                Stepped::Init {
                    conn,
                    peer,
                    namespace,
                    name,
                    runner_key,
                    report,
                } => {
                    let who = RunnerWho {
                        namespace: &namespace,
                        name: &name,
                        key: &runner_key,
                        peer,
                    };
                    log_init(shared, &mut peers, conn, who, report);
                }
                Stepped::Closed(conn) => {
                    peers.remove(&conn);
                }
                Stepped::Caller(msg) => {
                    if !caller_msg(shared, &mut plane, &mut engine, kv, msg, now, &mut out) {
                        return Led::Shutdown;
                    }
                }
            }
            persist(&mut engine, kv);
            loads.append(&mut engine.take_input_loads());
            send(shared, &mut out);
        }
        let now = Instant::now();
        if engine.next_deadline().is_some_and(|t| t <= now) {
            let actions = engine.tick(now);
            plane.deliver(actions, &mut out);
            persist(&mut engine, kv);
            loads.append(&mut engine.take_input_loads());
            send(shared, &mut out);
        }
        if !loads.is_empty() {
            load_inputs(shared, kv, std::mem::take(&mut loads));
        }
        for cmd in engine.take_outbound() {
            let m = &shared.metrics.control;
            match &cmd {
                serverless::Command::Start { .. } => m.inc(Counter::ServerlessStarts),
                serverless::Command::Stop { .. } => m.inc(Counter::ServerlessStops),
                _ => {}
            }
            if let Some(o) = &outbound {
                o.send(cmd);
            }
        }
        publish_gauges(shared, &engine);
    }
}

/// Node `n` is gone (restarted, or silent past `cluster.node_timeout_ms`): its runner
/// connections are closed as far as the engine is concerned, and no stop waits for its
/// shards.
fn node_lost(
    shared: &Shared,
    n: NodeId,
    members: &mut Members,
    plane: &mut Plane,
    engine: &mut Engine,
    peers: &HashMap<ConnRef, SocketAddr>,
    out: &mut Vec<(To, ShardMsg)>,
) {
    members.seen.remove(&n);
    if members.lost.len() >= 4_096 {
        // Bounded: a node id is one process's; ids of long-dead nodes never come back.
        members.lost.clear();
    }
    members.lost.insert(n);
    shared.metrics.control.inc(Counter::ClusterNodesLost);
    tracing::warn!(node = %hex(n), "a node is lost: its runners are treated as disconnected");
    plane.remote_lost(n, engine, out);
    let forgotten = engine.forget_gateway(n);
    if forgotten > 0 {
        tracing::info!(node = %hex(n), sockets = forgotten, "forgot the hibernating sockets of a lost node");
    }
    let now = Instant::now();
    let mut conns: Vec<ConnRef> = peers.keys().filter(|c| c.node == n).copied().collect();
    conns.sort_unstable();
    for conn in conns {
        let actions = engine.runner_closed(conn, now);
        plane.deliver(actions, out);
    }
}

/// Logs what a pool's outbound request reported (never its headers: they may hold secrets).
fn log_pool_event(shared: &Shared, ev: &serverless::Event) {
    let m = &shared.metrics.control;
    match ev {
        serverless::Event::Started { id, runner_id, .. } => {
            m.inc(Counter::ServerlessStarted);
            tracing::debug!(stream = id, runner_id, "serverless runner started")
        }
        serverless::Event::Failed { id, failure } => {
            m.inc(Counter::ServerlessFailures);
            tracing::info!(stream = id, %failure, "serverless start request failed")
        }
        serverless::Event::Metadata {
            id,
            result: Err(failure),
        } => tracing::info!(request = id, %failure, "serverless metadata request failed"),
        _ => {}
    }
}

/// The messages the plane's step hands back: KV requests, names that may create an actor
/// (answered once durable), the engine API. Returns false on `Shutdown`.
fn caller_msg(
    shared: &Shared,
    plane: &mut Plane,
    engine: &mut Engine,
    kv: &KvHandle,
    msg: ControlMsg,
    now: Instant,
    out: &mut Vec<(To, ShardMsg)>,
) -> bool {
    match msg {
        ControlMsg::Shutdown => return false,
        ControlMsg::RunnerMsg {
            conn,
            msg: ToServer::KvRequest(req),
        } => kv_request(shared, engine, kv, conn, req),
        ControlMsg::ResolveNamed {
            namespace,
            name,
            key,
            get_or_create,
            waiter,
        } => {
            let key = key.unwrap_or_default();
            // While the store cannot commit, a get-or-create only finds existing actors: a
            // created one could not be made durable.
            let create = get_or_create && kv.is_up();
            let (r, actions) =
                engine.resolve_by_name(&namespace, &name, &key, create, None, waiter, now);
            if get_or_create && !create && matches!(r, Resolve::NotFound) {
                out.push(plane::reply_err(waiter, ShardResolveError::Unavailable));
            } else if persist(engine, kv) && matches!(r, Resolve::Ready(_)) {
                // It created the actor: answer once its record is durable.
                let shared = shared.clone();
                let _ = kv.submit(Job::Flush(Done::new(move |res| {
                    let reply = match res {
                        Ok(()) => plane::answer_now(waiter, r),
                        Err(_) => Some(plane::reply_err(waiter, ShardResolveError::Unavailable)),
                    };
                    send(&shared, &mut reply.into_iter().collect());
                })));
            } else if let Some(reply) = plane::answer_now(waiter, r) {
                out.push(reply);
            }
            plane.deliver(actions, out);
        }
        ControlMsg::Api(req) => {
            if writes_actors(&req.method) && !kv.is_up() {
                probe_then_api(shared, kv, req);
            } else {
                let actions = api_request(shared, engine, kv, req, now);
                plane.deliver(actions, out);
            }
        }
        ControlMsg::ApiChecked(req) => {
            let actions = api_request(shared, engine, kv, req, now);
            plane.deliver(actions, out);
        }
        // Every other message is the plane's.
        _ => {}
    }
    true
}

/// Sends the shard messages in `out` (in order) to their shards, and empties it.
fn send(shared: &Shared, out: &mut Vec<(To, ShardMsg)>) {
    for (to, msg) in out.drain(..) {
        match to {
            To::Shard(s) => {
                if let Some(mb) = shared.shards.get(s as usize) {
                    mb.send(msg);
                }
            }
            To::Node(node, s) if node == shared.gateway_id => {
                if let Some(mb) = shared.shards.get(s as usize) {
                    mb.send(msg);
                }
            }
            To::Node(to, s) => match &shared.node {
                Some(node) => {
                    node.send_shard_ctl(to, s, msg);
                }
                None => tracing::warn!("a message for another node, but this node runs alone"),
            },
            To::Peer(p, s) => match shared.node.as_ref().and_then(|n| Some((n, n.peer(p)?))) {
                Some((node, to)) => {
                    node.send_shard_ctl(to, s, msg);
                }
                None => tracing::warn!(peer = p, "an answer for a node this node does not know"),
            },
            To::All => {
                if let Some(node) = &shared.node {
                    for to in node.members() {
                        node.send_shard_ctl(to, ALL_SHARDS, plane::copy_for_broadcast(&msg));
                    }
                }
                for mb in shared.shards.iter() {
                    mb.send(plane::copy_for_broadcast(&msg));
                }
            }
        }
    }
}

/// Methods of the engine API that may change actors (create, get-or-create, destroy).
fn writes_actors(method: &str) -> bool {
    !matches!(method, "GET" | "HEAD" | "OPTIONS")
}

/// The answer to an engine API call while the store cannot commit.
fn store_unavailable(err: &KvError) -> Reply {
    let body = serde_json::json!({
        "group": "store",
        "code": "unavailable",
        "message": format!(
            "the store cannot commit, so this change is not acknowledged ({err}); retry later \
             (a retried create is safe with PUT /actors, get-or-create)"
        ),
    });
    Reply::Api {
        status: 503,
        body: body.to_string(),
    }
}

/// The store is down: before the engine sees a request that changes actors, a flush asks the
/// store to reopen and commit (the first request after the cause is gone gets through). On
/// success the request comes back as `ApiChecked`; on failure it is answered 503
/// `store.unavailable` and the engine never saw it (nothing created, nothing destroyed).
fn probe_then_api(shared: &Shared, kv: &KvHandle, req: ApiRequest) {
    let shared = shared.clone();
    let _ = kv.submit(Job::Flush(Done::new(move |res| match res {
        Ok(()) => {
            let waiter = req.waiter;
            let msg = ControlMsg::ApiChecked(req);
            if shared.control.send(msg).is_err() {
                send_reply(
                    &shared,
                    waiter,
                    store_unavailable(&KvError::Unavailable("the control plane stopped".into())),
                );
            }
        }
        Err(e) => send_reply(&shared, req.waiter, store_unavailable(&e)),
    })));
}

/// Runs an engine API request. `GET /health` says 503 while the store cannot commit.
///
/// Durability rule: an answer to a request that may change actors (create, get-or-create,
/// destroy; any method but GET) is sent only after a flush that covers everything queued
/// before it succeeded, so a 200 (or a 404 for an actor destroyed earlier) is durable. If that
/// flush fails, the answer is 503 `{"group":"store","code":"unavailable"}` and the change is
/// NOT acknowledged. The engine's memory already holds it, though, and the store keeps the
/// records and writes them once it commits again (see `kv::worker`): a 503 means "unknown,
/// retry". A client retrying a create with PUT /actors (get-or-create) gets the one actor
/// (never two with the same key); a retried POST may answer 400 `actor.duplicate_key` when the
/// first attempt's actor was kept; a retried DELETE answers 200 or 404 once durable. If the
/// process dies before the store commits again, the unacknowledged change is gone. While the
/// store is known to be down, requests that change actors do not reach the engine at all
/// (`probe_then_api`), so this window is only the batch in which the store failed.
fn api_request(
    shared: &Shared,
    engine: &mut Engine,
    kv: &KvHandle,
    req: ApiRequest,
    now: Instant,
) -> Vec<Action> {
    let waiter = req.waiter;
    if req.method == "GET" && req.path.trim_matches('/') == "health" {
        if let Some(why) = kv.down_reason() {
            send_reply(shared, waiter, store_unavailable(&KvError::StoreDown(why)));
            return Vec::new();
        }
    }
    let reply = engine::api::handle(engine, &req.method, &req.path, &req.query, &req.body, now);
    let answer = Reply::Api {
        status: reply.status,
        body: reply.body,
    };
    if persist(engine, kv) || writes_actors(&req.method) {
        // Answer once the change (and anything kept from a failed commit) is durable.
        let shared = shared.clone();
        let _ = kv.submit(Job::Flush(Done::new(move |res| match res {
            Ok(()) => send_reply(&shared, waiter, answer),
            Err(e) => {
                tracing::warn!(error = %e, "engine API change not acknowledged: the store could not commit it");
                send_reply(&shared, waiter, store_unavailable(&e))
            }
        })));
    } else {
        send_reply(shared, waiter, answer);
    }
    reply.actions
}

/// A runner as its log lines name it.
struct RunnerWho<'a> {
    namespace: &'a str,
    name: &'a str,
    key: &'a str,
    peer: SocketAddr,
}

/// At most 64 characters of a name taken from a runner (a refused one may be huge).
fn short(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Logs and counts what a runner's `Init` did: refused, slots clamped, an older connection
/// evicted (a takeover: both peers are logged). Keeps the peer of an accepted connection.
fn log_init(
    shared: &Shared,
    peers: &mut HashMap<ConnRef, SocketAddr>,
    conn: ConnRef,
    who: RunnerWho<'_>,
    report: InitReport,
) {
    let m = &shared.metrics.control;
    let (namespace, name, key, peer) = (
        short(who.namespace),
        short(who.name),
        short(who.key),
        who.peer,
    );
    if let Some(why) = report.refused {
        m.inc(Counter::RunnersRefused);
        tracing::info!(%peer, namespace, runner = name, runner_key = key, %why,
            "runner refused: its Init is above a limit (closed with runner.init_too_large)");
        return;
    }
    peers.insert(conn, peer);
    if let Some(asked) = report.slots_clamped_from {
        m.inc(Counter::RunnerSlotsClamped);
        let max = shared.config.limits.runner_max_slots;
        tracing::info!(%peer, namespace, runner = name, runner_key = key, asked, max,
            "runner totalSlots clamped to limits.runner_max_slots");
    }
    if let Some(old) = report.evicted {
        m.inc(Counter::RunnerEvictions);
        let old_peer = peers.get(&old).map(|p| p.to_string());
        let old_peer = old_peer.as_deref().unwrap_or("unknown");
        tracing::info!(new_peer = %peer, old_peer, namespace, runner = name, runner_key = key,
            "runner connection taken over by a newer one with the same key (ws.eviction)");
    }
}

/// Reads the stored inputs of `ids` and hands each to the engine as `InputLoaded`.
///
/// A read job rather than a blocking read: the control plane keeps serving while the store
/// works, and the job runs after every write queued before it (so it sees the input of a
/// create from an earlier round). One job reads the inputs asked for in a round. A failed
/// read is not answered: the start waits, is stopped at `actor_start_threshold`, and the next
/// wake reads again (starting without the input would lose it for good).
fn load_inputs(shared: &Shared, kv: &KvHandle, ids: Vec<String>) {
    let shared = shared.clone();
    let keys: Vec<Vec<u8>> = ids.iter().map(|id| engine::input_key(id)).collect();
    let job = Job::GetMeta {
        keys: keys.clone(),
        reply: KvReply::new(move |res: Result<Vec<MetaRecord>, KvError>| {
            let records = match res {
                Ok(r) => r,
                Err(err) => {
                    tracing::error!(%err, actors = ids.len(), "reading actor inputs failed");
                    return;
                }
            };
            let mut wanted: HashSet<Vec<u8>> = keys.into_iter().collect();
            for (key, value) in records {
                if wanted.remove(&key) {
                    let actor_id = String::from_utf8_lossy(&key[engine::INPUT_KEY_PREFIX.len()..]);
                    let _ = shared.control.send(ControlMsg::InputLoaded {
                        actor_id: actor_id.into_owned(),
                        input: Some(value),
                    });
                }
            }
            // Not in the store: the actor starts without its input.
            for key in wanted {
                let actor_id = String::from_utf8_lossy(&key[engine::INPUT_KEY_PREFIX.len()..]);
                tracing::warn!(actor_id = %actor_id, "an actor's input is missing from the store");
                let _ = shared.control.send(ControlMsg::InputLoaded {
                    actor_id: actor_id.into_owned(),
                    input: None,
                });
            }
        }),
    };
    if kv.submit(job).is_err() {
        tracing::error!("the store is gone; actor inputs cannot be read");
    }
}

/// Queues the engine's record changes to the store, in order. Returns whether there were
/// any. The commands that follow are not held for the commit: a crash in between at most
/// repeats a generation number, which a restarted process never shows to the same runnerId.
fn persist(engine: &mut Engine, kv: &KvHandle) -> bool {
    let ops = engine.take_store_ops();
    let any = !ops.is_empty();
    for op in ops {
        let job = match op {
            StoreOp::Put { key, value } => Job::PutMeta {
                key,
                value,
                done: None,
            },
            StoreOp::Delete { key } => Job::DeleteMeta { key, done: None },
        };
        if kv.submit(job).is_err() {
            tracing::error!("the store is gone; actor records are no longer saved");
            break;
        }
    }
    any
}

/// A runner's KV request: only for an actor placed on that runner; the store answers on its
/// own thread, after the commit for writes, straight to the runner's shard.
fn kv_request(
    shared: &Shared,
    engine: &Engine,
    kv: &KvHandle,
    conn: ConnRef,
    req: protocol::ToServerKvRequest,
) {
    let request_id = req.request_id;
    let answer = {
        let shared = shared.clone();
        move |data: protocol::KvResponseData| {
            let msg =
                protocol::ToClient::KvResponse(protocol::ToClientKvResponse { request_id, data });
            let to_runner = ShardMsg::ToRunner {
                conn: plane::conn_id(conn),
                frames: plane::frames(&msg),
            };
            send(
                &shared,
                &mut vec![(To::Node(conn.node, conn.shard), to_runner)],
            );
        }
    };
    if !engine.actor_placed_on(&req.actor_id, conn) {
        answer(protocol::KvResponseData::Error(protocol::KvErrorResponse {
            message: "kv.actor_not_found: the actor is not running on this runner".into(),
        }));
        return;
    }
    // A refused submit drops the job, whose reply then answers `kv.unavailable`.
    let _ = kv.submit(Job::kv(req.actor_id, req.data, answer));
}

fn send_reply(shared: &Shared, waiter: u64, reply: Reply) {
    send(shared, &mut vec![plane::answer(waiter, reply)]);
}

/// Publishes the control plane's gauges after a batch: runners known (O(1)) every time, and
/// actors by state. Counting actors by state reads every actor, so it is done at most every
/// [`ACTOR_COUNTS_EVERY`] and only when the live count or the runners changed since, or
/// after [`ACTOR_COUNTS_MAX_AGE`] (a start or a stop changes no cheap total), never once per
/// batch under load. The loop wakes at least every tick, so a change shows within
/// `ACTOR_COUNTS_MAX_AGE` + one tick.
fn publish_gauges(shared: &Shared, engine: &Engine) {
    use std::cell::Cell;
    thread_local! {
        /// (when counted, live actors and runners known then).
        static LAST: Cell<Option<(Instant, usize, usize)>> = const { Cell::new(None) };
    }
    let m = &shared.metrics;
    let (live, runners) = (engine.live_actors(), engine.runners_known());
    m.set_runners_known(runners as i64);
    let now = Instant::now();
    let due = LAST.get().is_none_or(|(at, l, r)| {
        let age = now.saturating_duration_since(at);
        age >= ACTOR_COUNTS_MAX_AGE || (age >= ACTOR_COUNTS_EVERY && (l, r) != (live, runners))
    });
    if due {
        let c = engine.actor_counts();
        m.set_actor_counts([c.sleeping, c.starting, c.running, c.stopping].map(|n| n as i64));
        m.set_pools(engine.pool_statuses());
        LAST.set(Some((now, live, runners)));
    }
}

/// Least time between two counts of the actors by state.
const ACTOR_COUNTS_EVERY: Duration = Duration::from_millis(100);
/// Most time between two counts of the actors by state.
const ACTOR_COUNTS_MAX_AGE: Duration = Duration::from_millis(500);
