//! Actors: records, creation and destruction, placement on runners (generation + 1 per
//! allocation, command indices from 0 per generation), the runner's events (de-duplicated by
//! index, acknowledged per batch), sleep/stop intents, alarms, routing lookups and their
//! waiters.
//!
//! Must never act on an event whose (actor, generation) is not currently placed on the sending
//! runner, and never acknowledge such an event (the runner matches acknowledgements by actor id
//! only, so acknowledging an old generation would drop the new generation's history).

use std::collections::HashMap;
use std::time::Instant;

use super::persist::mark;
use super::runners::{CmdState, OutCmd};
use super::{Action, ConnRef, Engine, Resolve, ResolveError, Route, RunnerIdx, Waiter};
use crate::protocol::{
    ActorCheckpoint, ActorConfig, ActorIntent, ActorState, Command, CommandStartActor,
    CommandWrapper, Event, EventWrapper, HibernatingRequest, StopCode, ToClient, ToClientAckEvents,
};

/// Lifecycle of an actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorStatus {
    /// No runner (possibly waiting for one with room).
    Sleeping,
    /// `CommandStartActor` issued, `Running` not yet reported.
    Starting,
    Running,
    /// `CommandStopActor` issued, `Stopped` not yet reported.
    Stopping,
    Destroyed,
}

impl ActorStatus {
    fn placed(self) -> bool {
        matches!(
            self,
            ActorStatus::Starting | ActorStatus::Running | ActorStatus::Stopping
        )
    }
}

/// What happens when an actor stops with `StopCode::Error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPolicy {
    /// Sleep; woken by the next request (what rivetkit asks for).
    Sleep,
    /// Destroy.
    Destroy,
    /// Start again at once.
    Restart,
}

impl CrashPolicy {
    pub fn parse(s: &str) -> Option<CrashPolicy> {
        match s {
            "sleep" => Some(CrashPolicy::Sleep),
            "destroy" => Some(CrashPolicy::Destroy),
            "restart" => Some(CrashPolicy::Restart),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CrashPolicy::Sleep => "sleep",
            CrashPolicy::Destroy => "destroy",
            CrashPolicy::Restart => "restart",
        }
    }
}

/// A create request.
#[derive(Debug, Clone)]
pub struct CreateActor {
    pub namespace: String,
    pub name: String,
    pub key: Option<String>,
    /// Runner name to place on; `None` → `EngineConfig::default_runner_name`.
    pub runner_name: Option<String>,
    pub input: Option<Vec<u8>>,
    pub crash_policy: CrashPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreateError {
    #[error("an actor with this name and key already exists")]
    DuplicateKey,
    #[error("too many actors")]
    TooManyActors,
    #[error("invalid actor name")]
    InvalidName,
    #[error("actor key too long")]
    KeyTooLong,
    #[error("actor input too large")]
    InputTooLarge,
    #[error("runner name selector too long")]
    RunnerNameTooLong,
    #[error("namespace name too long")]
    NamespaceTooLong,
    #[error("too many actors in the namespace")]
    NamespaceQuota,
}

/// Read-only view of an actor (API responses, tests, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorInfo {
    pub actor_id: String,
    pub namespace: String,
    pub name: String,
    pub key: Option<String>,
    pub runner_name: String,
    pub crash_policy: CrashPolicy,
    pub status: ActorStatus,
    pub generation: u32,
    pub runner_idx: Option<RunnerIdx>,
    pub create_ts: i64,
    pub start_ts: Option<i64>,
    pub pending_allocation_ts: Option<i64>,
    pub connectable_ts: Option<i64>,
    pub sleep_ts: Option<i64>,
    pub destroy_ts: Option<i64>,
}

#[derive(Debug)]
pub(super) struct Actor {
    pub id: String,
    pub seq: u64,
    pub namespace: String,
    pub name: String,
    pub key: Option<String>,
    pub runner_name: String,
    pub crash_policy: CrashPolicy,
    pub create_ts: i64,
    /// The actor has an `input`. Its bytes are in the store (`engine/input/{id}`, or in
    /// `Engine::fresh_inputs` until written) and are read again for each start, so that an
    /// actor that waits for a runner holds none of it.
    pub has_input: bool,
    pub generation: u32,
    pub allocated: bool,
    pub status: ActorStatus,
    pub runner: Option<usize>,
    pub next_cmd_idx: i64,
    pub last_event_idx: i64,
    pub destroy_requested: bool,
    /// Start again as soon as the current stop completes.
    pub wake_after_stop: bool,
    /// In the pending queue, waiting for a runner with room.
    pub pending: bool,
    pub alarm_ts: Option<i64>,
    /// While starting or stopping: when to give up waiting for the runner.
    pub deadline: Option<Instant>,
    pub waiters: Vec<u64>,
    pub hibernating: HashMap<HibernatingRequest, Instant>,
    pub start_ts: Option<i64>,
    pub pending_allocation_ts: Option<i64>,
    pub connectable_ts: Option<i64>,
    pub sleep_ts: Option<i64>,
    pub destroy_ts: Option<i64>,
    /// Queued in `Engine::dirty`: its durable record changed since the last store flush.
    pub dirty: bool,
    /// `engine/input/{id}` exists in the store (or is about to be written).
    pub input_stored: bool,
}

impl Actor {
    fn info(&self) -> ActorInfo {
        ActorInfo {
            actor_id: self.id.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            key: self.key.clone(),
            runner_name: self.runner_name.clone(),
            crash_policy: self.crash_policy,
            status: self.status,
            generation: self.generation,
            runner_idx: self.runner.and_then(|i| RunnerIdx::try_from(i).ok()),
            create_ts: self.create_ts,
            start_ts: self.start_ts,
            pending_allocation_ts: self.pending_allocation_ts,
            connectable_ts: self.connectable_ts,
            sleep_ts: self.sleep_ts,
            destroy_ts: self.destroy_ts,
        }
    }
}

impl Engine {
    // -----------------------------------------------------------------------------------------
    // Queries

    pub fn actor(&self, actor_id: &str) -> Option<ActorInfo> {
        self.actors.get(actor_id).map(Actor::info)
    }

    /// The live actor with this (namespace, name, key).
    pub fn actor_by_key(&self, namespace: &str, name: &str, key: &str) -> Option<ActorInfo> {
        let id =
            self.actor_by_key
                .get(&(namespace.to_string(), name.to_string(), key.to_string()))?;
        self.actors.get(id).map(Actor::info)
    }

    /// Actors of a namespace in creation order, optionally of one name, starting after the
    /// cursor `after` (a creation sequence). Returns at most `limit` and the next cursor.
    pub fn list_actors(
        &self,
        namespace: &str,
        name: Option<&str>,
        include_destroyed: bool,
        after: Option<u64>,
        limit: usize,
    ) -> (Vec<ActorInfo>, Option<u64>) {
        let start = match after {
            Some(s) => std::ops::Bound::Excluded(s),
            None => std::ops::Bound::Unbounded,
        };
        let mut out = Vec::new();
        let mut last = 0u64;
        for (&seq, id) in self.actor_order.range((start, std::ops::Bound::Unbounded)) {
            let Some(a) = self.actors.get(id) else {
                continue;
            };
            if a.namespace != namespace
                || name.is_some_and(|n| n != a.name)
                || (!include_destroyed && a.status == ActorStatus::Destroyed)
            {
                continue;
            }
            if out.len() == limit {
                return (out, Some(last));
            }
            last = seq;
            out.push(a.info());
        }
        (out, None)
    }

    /// One page of the actor names announced by the runners of a namespace that are known
    /// now (connected or not yet lost), in name order after `after`: at most `limit` names
    /// with their metadata JSON text.
    pub fn actor_names(
        &self,
        namespace: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<(String, String)> {
        use std::ops::Bound;
        let Some(ns) = self.actor_names.get(namespace) else {
            return Vec::new();
        };
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        ns.range::<str, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|(name, holders)| (name.clone(), holders.metadata().to_string()))
            .collect()
    }

    /// Live (not destroyed) actors of a namespace.
    pub fn live_actors_in(&self, namespace: &str) -> usize {
        self.live_by_namespace.get(namespace).copied().unwrap_or(0)
    }

    /// Count one live actor more (`up`) or less in its namespace.
    pub(super) fn count_live(&mut self, namespace: &str, up: bool) {
        if up {
            self.live_actors += 1;
            *self
                .live_by_namespace
                .entry(namespace.to_string())
                .or_default() += 1;
            return;
        }
        self.live_actors = self.live_actors.saturating_sub(1);
        if let Some(n) = self.live_by_namespace.get_mut(namespace) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.live_by_namespace.remove(namespace);
            }
        }
    }

    /// The stored input of `actor_id` was read (see [`Engine::take_input_loads`]): its start
    /// command, held until now, goes out. `None` when the store had none (the actor starts
    /// without input).
    pub fn input_loaded(
        &mut self,
        actor_id: &str,
        input: Option<Vec<u8>>,
        _now: Instant,
    ) -> Vec<Action> {
        let Some(idx) = self.actors.get(actor_id).and_then(|a| a.runner) else {
            return Vec::new();
        };
        let Some(r) = self.runners.get_mut(idx) else {
            return Vec::new();
        };
        let mut any = false;
        for c in r.outbox.iter_mut() {
            if c.state != CmdState::NeedsInput || c.cmd.checkpoint.actor_id != actor_id {
                continue;
            }
            if let Command::StartActor(start) = &mut c.cmd.inner {
                start.config.input = input.clone();
            }
            c.state = CmdState::Unsent;
            any = true;
        }
        if any {
            self.flush(idx);
        }
        self.take_out()
    }

    // -----------------------------------------------------------------------------------------
    // Create / destroy

    /// Create an actor and start it (it stays pending if no runner has room).
    pub fn create_actor(
        &mut self,
        req: CreateActor,
        now: Instant,
    ) -> Result<(ActorInfo, Vec<Action>), CreateError> {
        self.validate_create(&req)?;
        if let Some(key) = &req.key {
            let k = (req.namespace.clone(), req.name.clone(), key.clone());
            if self.actor_by_key.contains_key(&k) {
                return Err(CreateError::DuplicateKey);
            }
        }
        let id = self.insert_actor(req, now);
        self.want_running(&id, now);
        let info = self.actors[&id].info();
        Ok((info, self.take_out()))
    }

    /// The live actor with (namespace, name, key), or a new one (then `created` is true).
    pub fn get_or_create_actor(
        &mut self,
        req: CreateActor,
        now: Instant,
    ) -> Result<(ActorInfo, bool, Vec<Action>), CreateError> {
        if let Some(key) = &req.key {
            if let Some(info) = self.actor_by_key(&req.namespace, &req.name, key) {
                return Ok((info, false, Vec::new()));
            }
        }
        let (info, actions) = self.create_actor(req, now)?;
        Ok((info, true, actions))
    }

    /// Destroy an actor of `namespace`. `None` if there is no such actor. Destroying a destroyed
    /// actor is a no-op.
    pub fn destroy_actor(
        &mut self,
        namespace: &str,
        actor_id: &str,
        now: Instant,
    ) -> Option<Vec<Action>> {
        let a = self.actors.get(actor_id)?;
        if a.namespace != namespace {
            return None;
        }
        match a.status {
            ActorStatus::Destroyed => {}
            ActorStatus::Sleeping => self.destroy(actor_id, now),
            ActorStatus::Starting | ActorStatus::Running | ActorStatus::Stopping => {
                self.request_stop(actor_id, true, now)
            }
        }
        Some(self.take_out())
    }

    fn validate_create(&self, req: &CreateActor) -> Result<(), CreateError> {
        if req.name.is_empty() || req.name.len() > self.cfg.max_name_bytes {
            return Err(CreateError::InvalidName);
        }
        if req
            .key
            .as_ref()
            .is_some_and(|k| k.len() > self.cfg.max_key_bytes)
        {
            return Err(CreateError::KeyTooLong);
        }
        if req
            .input
            .as_ref()
            .is_some_and(|i| i.len() > self.cfg.max_input_bytes)
        {
            return Err(CreateError::InputTooLarge);
        }
        if req
            .runner_name
            .as_ref()
            .is_some_and(|n| n.len() > self.cfg.runner_name_bytes)
        {
            return Err(CreateError::RunnerNameTooLong);
        }
        if req.namespace.len() > self.cfg.runner_name_bytes {
            return Err(CreateError::NamespaceTooLong);
        }
        if self.live_actors >= self.cfg.max_actors {
            return Err(CreateError::TooManyActors);
        }
        if self.live_actors_in(&req.namespace) >= self.cfg.actors_per_namespace {
            return Err(CreateError::NamespaceQuota);
        }
        Ok(())
    }

    fn insert_actor(&mut self, req: CreateActor, now: Instant) -> String {
        let mut id = self.random_hex(15);
        while self.actors.contains_key(&id) {
            id = self.random_hex(15);
        }
        let seq = self.next_actor_seq;
        self.next_actor_seq += 1;
        if let Some(key) = &req.key {
            self.actor_by_key.insert(
                (req.namespace.clone(), req.name.clone(), key.clone()),
                id.clone(),
            );
        }
        let runner_name = req
            .runner_name
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| self.cfg.default_runner_name.clone());
        let actor = Actor {
            id: id.clone(),
            seq,
            namespace: req.namespace,
            name: req.name,
            key: req.key,
            runner_name,
            crash_policy: req.crash_policy,
            create_ts: self.unix_ms(now),
            has_input: req.input.is_some(),
            generation: 0,
            allocated: false,
            status: ActorStatus::Sleeping,
            runner: None,
            next_cmd_idx: 0,
            last_event_idx: -1,
            destroy_requested: false,
            wake_after_stop: false,
            pending: false,
            alarm_ts: None,
            deadline: None,
            waiters: Vec::new(),
            hibernating: HashMap::new(),
            start_ts: None,
            pending_allocation_ts: None,
            connectable_ts: None,
            sleep_ts: None,
            destroy_ts: None,
            dirty: false,
            input_stored: false,
        };
        let namespace = actor.namespace.clone();
        self.actors.insert(id.clone(), actor);
        if let Some(a) = self.actors.get_mut(&id) {
            mark(&mut self.dirty, a);
        }
        if let Some(input) = req.input {
            self.fresh_inputs.insert(id.clone(), input);
        }
        self.actor_order.insert(seq, id.clone());
        self.count_live(&namespace, true);
        id
    }

    // -----------------------------------------------------------------------------------------
    // Routing lookups

    /// Where to send traffic for `actor_id`. A sleeping actor is woken; while it is not
    /// routable the lookup is `Pending` and answered later with `Action::Resolved { waiter }`
    /// (at the latest after `wake_timeout`). `waiter` is chosen by the caller and unique among
    /// its outstanding lookups.
    pub fn resolve(&mut self, actor_id: &str, waiter: u64, now: Instant) -> (Resolve, Vec<Action>) {
        let Some(a) = self.actors.get(actor_id) else {
            return (Resolve::NotFound, Vec::new());
        };
        if a.status == ActorStatus::Destroyed {
            return (Resolve::NotFound, Vec::new());
        }
        if let Some(route) = self.route_of(a) {
            return (Resolve::Ready(route), Vec::new());
        }
        self.cancel_waiter(waiter);
        let deadline = now + self.cfg.wake_timeout;
        self.waiters.insert(
            waiter,
            Waiter {
                actor_id: actor_id.to_string(),
                deadline,
            },
        );
        self.waiter_deadlines.insert((deadline, waiter));
        if let Some(a) = self.actors.get_mut(actor_id) {
            a.waiters.push(waiter);
        }
        self.want_running(actor_id, now);
        let out = self.take_out();
        // A wake never yields a route at once (only the runner's `Running` does).
        (
            Resolve::Pending {
                actor_id: actor_id.to_string(),
            },
            out,
        )
    }

    /// Lookup by name and key (the `/gateway/{name}/…?rvt-method=get|getOrCreate` form). With
    /// `get_or_create`, a missing actor is created on runners named `runner_name`.
    #[allow(clippy::too_many_arguments)]
    pub fn resolve_by_name(
        &mut self,
        namespace: &str,
        name: &str,
        key: &str,
        get_or_create: bool,
        runner_name: Option<&str>,
        waiter: u64,
        now: Instant,
    ) -> (Resolve, Vec<Action>) {
        let id = match self.actor_by_key(namespace, name, key) {
            Some(info) => info.actor_id,
            None if get_or_create => {
                let req = CreateActor {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    key: Some(key.to_string()),
                    runner_name: runner_name.map(str::to_string),
                    input: None,
                    crash_policy: CrashPolicy::Sleep,
                };
                match self.create_actor(req, now) {
                    Ok((info, actions)) => {
                        self.out.extend(actions);
                        info.actor_id
                    }
                    Err(_) => return (Resolve::NotFound, Vec::new()),
                }
            }
            None => return (Resolve::NotFound, Vec::new()),
        };
        let pre = self.take_out();
        let (res, mut actions) = self.resolve(&id, waiter, now);
        let mut all = pre;
        all.append(&mut actions);
        (res, all)
    }

    /// Forget a waiter (its client went away). No `Resolved` will be emitted for it.
    pub fn cancel_waiter(&mut self, waiter: u64) {
        if let Some(w) = self.waiters.remove(&waiter) {
            self.waiter_deadlines.remove(&(w.deadline, waiter));
            if let Some(a) = self.actors.get_mut(&w.actor_id) {
                a.waiters.retain(|x| *x != waiter);
            }
        }
    }

    /// Is `actor_id` placed (starting, running or stopping) on the runner whose current
    /// connection is `conn`? Gates the actor KV store: a runner reaches only its own actors.
    pub fn actor_placed_on(&self, actor_id: &str, conn: ConnRef) -> bool {
        let Some(&idx) = self.runner_by_conn.get(&conn) else {
            return false;
        };
        self.actors
            .get(actor_id)
            .is_some_and(|a| a.status.placed() && a.runner == Some(idx))
    }

    fn route_of(&self, a: &Actor) -> Option<Route> {
        if a.status != ActorStatus::Running {
            return None;
        }
        let idx = a.runner?;
        let r = self.runners.get(idx)?;
        if !r.proven(&a.id, a.generation) {
            return None;
        }
        let conn: ConnRef = r.conn?;
        Some(Route {
            actor_id: a.id.clone(),
            generation: a.generation,
            runner_idx: RunnerIdx::try_from(idx).ok()?,
            conn,
        })
    }

    /// Answer every waiter of a routable actor.
    fn answer_waiters(&mut self, actor_id: &str) {
        let Some(a) = self.actors.get(actor_id) else {
            return;
        };
        if a.waiters.is_empty() {
            return;
        }
        let Some(route) = self.route_of(a) else {
            return;
        };
        let waiters = match self.actors.get_mut(actor_id) {
            Some(a) => std::mem::take(&mut a.waiters),
            None => return,
        };
        for w in waiters {
            if let Some(wt) = self.waiters.remove(&w) {
                self.waiter_deadlines.remove(&(wt.deadline, w));
            }
            self.out.push(Action::Resolved {
                waiter: w,
                result: Ok(route.clone()),
            });
        }
    }

    fn fail_waiters(&mut self, actor_id: &str, err: ResolveError) {
        let waiters = match self.actors.get_mut(actor_id) {
            Some(a) => std::mem::take(&mut a.waiters),
            None => return,
        };
        for w in waiters {
            if let Some(wt) = self.waiters.remove(&w) {
                self.waiter_deadlines.remove(&(wt.deadline, w));
            }
            self.out.push(Action::Resolved {
                waiter: w,
                result: Err(err),
            });
        }
    }

    /// After a runner (re)attached: its running actors are routable again.
    pub(super) fn answer_runner_waiters(&mut self, idx: usize) {
        let Some(r) = self.runners.get(idx) else {
            return;
        };
        let ids: Vec<String> = r.actors.iter().cloned().collect();
        for id in ids {
            self.answer_waiters(&id);
        }
    }

    pub(super) fn expire_waiters(&mut self, now: Instant) {
        while let Some(&(deadline, w)) = self.waiter_deadlines.first() {
            if deadline > now {
                break;
            }
            self.waiter_deadlines.pop_first();
            if let Some(wt) = self.waiters.remove(&w) {
                if let Some(a) = self.actors.get_mut(&wt.actor_id) {
                    a.waiters.retain(|x| *x != w);
                }
                self.out.push(Action::Resolved {
                    waiter: w,
                    result: Err(ResolveError::Timeout),
                });
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Placement

    /// Wake an actor without a routing waiter (a hibernating client socket wants it, or the
    /// shell wants it running for another reason). `Ready` when it is routable now; `Pending`
    /// when it is being started (or waits for a runner with room, or for its current stop to
    /// finish): [`Action::ActorRunning`] follows once it runs (no `Resolved`, and no
    /// timeout: the caller decides how long to wait). `NotFound` for a missing or destroyed
    /// actor.
    pub fn wake(&mut self, actor_id: &str, now: Instant) -> (Resolve, Vec<Action>) {
        let Some(a) = self.actors.get(actor_id) else {
            return (Resolve::NotFound, Vec::new());
        };
        if a.status == ActorStatus::Destroyed {
            return (Resolve::NotFound, Vec::new());
        }
        if let Some(route) = self.route_of(a) {
            return (Resolve::Ready(route), Vec::new());
        }
        self.want_running(actor_id, now);
        (
            Resolve::Pending {
                actor_id: actor_id.to_string(),
            },
            self.take_out(),
        )
    }

    /// Make the actor run: place a sleeping actor, or restart a stopping one once stopped.
    pub(super) fn want_running(&mut self, actor_id: &str, now: Instant) {
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        match a.status {
            ActorStatus::Sleeping => {
                if a.pending {
                    return;
                }
                match self.find_runner(actor_id) {
                    Some(idx) => self.place_on(actor_id, idx, now),
                    None => {
                        let now_ms = self.unix_ms(now);
                        if let Some(a) = self.actors.get_mut(actor_id) {
                            a.pending = true;
                            a.pending_allocation_ts = Some(now_ms);
                            mark(&mut self.dirty, a);
                        }
                        self.pending.push_back(actor_id.to_string());
                    }
                }
            }
            ActorStatus::Stopping => a.wake_after_stop = true,
            ActorStatus::Starting | ActorStatus::Running | ActorStatus::Destroyed => {}
        }
    }

    /// The connected, non-draining runner of the actor's namespace and runner name with the
    /// most free slots (lowest index on ties).
    fn find_runner(&self, actor_id: &str) -> Option<usize> {
        let a = self.actors.get(actor_id)?;
        let mut best: Option<(usize, u32)> = None;
        for (idx, r) in self.runners.iter() {
            if r.namespace != a.namespace || r.name != a.runner_name || !r.placeable() {
                continue;
            }
            let free = r.free_slots();
            if best.is_none_or(|(_, f)| free > f) {
                best = Some((idx, free));
            }
        }
        best.map(|(i, _)| i)
    }

    /// Place pending actors on runners that have room, oldest first.
    pub(super) fn place_pending(&mut self, now: Instant) {
        if self.pending.is_empty() || !self.runners.iter().any(|(_, r)| r.placeable()) {
            return;
        }
        let queue = std::mem::take(&mut self.pending);
        for id in queue {
            let wants = self
                .actors
                .get(&id)
                .is_some_and(|a| a.pending && a.status == ActorStatus::Sleeping);
            if !wants {
                continue;
            }
            match self.find_runner(&id) {
                Some(idx) => {
                    if let Some(a) = self.actors.get_mut(&id) {
                        a.pending = false;
                    }
                    self.place_on(&id, idx, now);
                }
                None => self.pending.push_back(id),
            }
        }
    }

    fn place_on(&mut self, actor_id: &str, idx: usize, now: Instant) {
        let now_ms = self.unix_ms(now);
        let eligible = self.cfg.hibernation_eligible;
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        let Some(r) = self.runners.get_mut(idx) else {
            return;
        };
        if a.allocated {
            a.generation = a.generation.wrapping_add(1);
        }
        a.allocated = true;
        mark(&mut self.dirty, a);
        a.pending = false;
        a.status = ActorStatus::Starting;
        a.runner = Some(idx);
        a.next_cmd_idx = 0;
        a.last_event_idx = -1;
        a.start_ts = Some(now_ms);
        a.wake_after_stop = false;
        let hib_ops = &mut self.hib_ops;
        a.hibernating.retain(|h, seen| {
            let fresh = now.saturating_duration_since(*seen) <= eligible;
            if !fresh {
                hib_ops.push(super::persist::hib_delete(&a.id, *h));
            }
            fresh
        });
        let hibernating_requests = super::persist::sorted_hibernating(&a.hibernating)
            .into_iter()
            .map(|(h, _)| h)
            .collect();
        // The input comes from the store (`input_loaded`) unless the create that wrote it is
        // still in this engine call; the start command waits for it.
        let (input, state) = match (a.has_input, self.fresh_inputs.get(&a.id)) {
            (false, _) => (None, CmdState::Unsent),
            (true, Some(fresh)) => (Some(fresh.clone()), CmdState::Unsent),
            (true, None) => {
                self.input_loads.push(a.id.clone());
                (None, CmdState::NeedsInput)
            }
        };
        let cmd = Command::StartActor(CommandStartActor {
            config: ActorConfig {
                name: a.name.clone(),
                key: a.key.clone(),
                create_ts: a.create_ts,
                input,
            },
            hibernating_requests,
        });
        r.actors.insert(a.id.clone());
        push_command(a, r, cmd, state);
        let deadline = now + self.cfg.actor_start_threshold;
        set_deadline(&mut self.actor_deadlines, a, Some(deadline));
        self.flush(idx);
    }

    /// Ask the runner to stop the actor (sleep, or destroy when `destroy`).
    pub(super) fn request_stop(&mut self, actor_id: &str, destroy: bool, now: Instant) {
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        if destroy && !a.destroy_requested && a.status != ActorStatus::Destroyed {
            a.destroy_requested = true;
            mark(&mut self.dirty, a);
        }
        match a.status {
            ActorStatus::Starting | ActorStatus::Running => {
                let Some(idx) = a.runner else {
                    return;
                };
                let Some(r) = self.runners.get_mut(idx) else {
                    return;
                };
                a.status = ActorStatus::Stopping;
                push_command(a, r, Command::StopActor, CmdState::Unsent);
                let deadline = now + self.cfg.actor_stop_threshold;
                set_deadline(&mut self.actor_deadlines, a, Some(deadline));
                self.flush(idx);
            }
            ActorStatus::Sleeping if destroy => self.destroy(actor_id, now),
            ActorStatus::Sleeping | ActorStatus::Stopping | ActorStatus::Destroyed => {}
        }
    }

    /// The actor is no longer on a runner (it stopped, or its runner was lost). `from` is the
    /// runner it was on, if that runner record still exists.
    pub(super) fn actor_down(
        &mut self,
        actor_id: &str,
        from: Option<(usize, StopCode)>,
        now: Instant,
    ) {
        let now_ms = self.unix_ms(now);
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        if let Some((idx, _)) = from {
            if let Some(r) = self.runners.get_mut(idx) {
                r.actors.remove(actor_id);
                r.prune_actor(actor_id, a.generation);
            }
        }
        let crashed = matches!(from, Some((_, StopCode::Error)));
        set_deadline(&mut self.actor_deadlines, a, None);
        a.runner = None;
        a.status = ActorStatus::Sleeping;
        a.sleep_ts = Some(now_ms);
        a.connectable_ts = None;
        mark(&mut self.dirty, a);
        self.out.push(Action::ActorStopped {
            actor_id: actor_id.to_string(),
        });
        let destroy = a.destroy_requested || (crashed && a.crash_policy == CrashPolicy::Destroy);
        let wake = a.wake_after_stop
            || !a.waiters.is_empty()
            || (crashed && a.crash_policy == CrashPolicy::Restart);
        a.wake_after_stop = false;
        if destroy {
            self.destroy(actor_id, now);
        } else if wake {
            self.want_running(actor_id, now);
        }
    }

    /// The runner does not hold generation `generation` of the actor although it was placed
    /// there (see `runner_pong`): the placement is over. An actor that was meant to run gets a
    /// new generation; one that was stopping is stopped.
    pub(super) fn placement_vanished(
        &mut self,
        actor_id: &str,
        generation: u32,
        idx: usize,
        now: Instant,
    ) {
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        if a.runner != Some(idx) || a.generation != generation || !a.status.placed() {
            return;
        }
        if a.status == ActorStatus::Starting {
            a.wake_after_stop = true;
        }
        self.actor_down(actor_id, Some((idx, StopCode::Ok)), now);
    }

    /// Final: the actor is destroyed.
    pub(super) fn destroy(&mut self, actor_id: &str, now: Instant) {
        let now_ms = self.unix_ms(now);
        let retention = self.cfg.destroyed_retention;
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        if a.status == ActorStatus::Destroyed {
            return;
        }
        if let Some(idx) = a.runner.take() {
            if let Some(r) = self.runners.get_mut(idx) {
                r.actors.remove(actor_id);
                r.prune_actor(actor_id, a.generation);
            }
        }
        set_deadline(&mut self.actor_deadlines, a, None);
        a.status = ActorStatus::Destroyed;
        a.destroy_ts = Some(now_ms);
        mark(&mut self.dirty, a);
        a.has_input = false;
        for (h, _) in a.hibernating.drain() {
            self.hib_ops.push(super::persist::hib_delete(actor_id, h));
        }
        a.pending = false;
        if let Some(ts) = a.alarm_ts.take() {
            self.alarms.remove(&(ts, actor_id.to_string()));
        }
        if let Some(key) = &a.key {
            let k = (a.namespace.clone(), a.name.clone(), key.clone());
            if self.actor_by_key.get(&k).is_some_and(|v| v == actor_id) {
                self.actor_by_key.remove(&k);
            }
        }
        let namespace = a.namespace.clone();
        self.count_live(&namespace, false);
        self.destroyed_gc
            .insert((now + retention, actor_id.to_string()));
        self.out.push(Action::ActorDestroyed {
            actor_id: actor_id.to_string(),
        });
        self.fail_waiters(actor_id, ResolveError::Destroyed);
    }

    // -----------------------------------------------------------------------------------------
    // Runner events

    /// `ToServer::Events` from a runner connection.
    pub fn runner_events(
        &mut self,
        conn: ConnRef,
        events: Vec<EventWrapper>,
        now: Instant,
    ) -> Vec<Action> {
        let Some(&idx) = self.runner_by_conn.get(&conn) else {
            return Vec::new();
        };
        let mut acks: Vec<ActorCheckpoint> = Vec::new();
        let mut ack_pos: HashMap<String, usize> = HashMap::new();
        // Follow-up actions go after the AckEvents, so that an ack for generation g reaches
        // the runner before a start of generation g + 1 of the same actor.
        let before = std::mem::take(&mut self.out);
        // Running actors whose event proved, during a reconnect's possession check, that this
        // connection hosts them: their waiting lookups are answered after the batch.
        let mut proven: Vec<String> = Vec::new();
        for ev in events {
            let cp = ev.checkpoint;
            let Some(a) = self.actors.get_mut(&cp.actor_id) else {
                continue;
            };
            if a.runner != Some(idx) || a.generation != cp.generation || !a.status.placed() {
                continue;
            }
            if let Some(proof) = self.runners.get_mut(idx).and_then(|r| r.proof.as_mut()) {
                if proof.insert((cp.actor_id.clone(), cp.generation)) && !a.waiters.is_empty() {
                    proven.push(cp.actor_id.clone());
                }
            }
            // The latest event of a live instance stays unacknowledged: the runner re-sends
            // it after every Init, which proves it still hosts the actor (see
            // `Runner::proof`). `Stopped` ends the instance and is acknowledged in full.
            let terminal = matches!(
                ev.inner,
                Event::ActorStateUpdate(ref u) if matches!(u.state, ActorState::Stopped(_))
            );
            let ack = if terminal { cp.index } else { cp.index - 1 };
            match ack_pos.get(&cp.actor_id) {
                Some(&p) => {
                    if acks[p].index < ack {
                        acks[p].index = ack;
                    }
                }
                None => {
                    ack_pos.insert(cp.actor_id.clone(), acks.len());
                    let mut c = cp.clone();
                    c.index = ack;
                    acks.push(c);
                }
            }
            if cp.index <= a.last_event_idx {
                continue;
            }
            a.last_event_idx = cp.index;
            if let Some(r) = self.runners.get_mut(idx) {
                r.prune_start(&cp.actor_id, cp.generation);
            }
            self.apply_event(idx, &cp.actor_id, ev.inner, now);
        }
        for id in proven {
            self.answer_waiters(&id);
        }
        let follow = std::mem::replace(&mut self.out, before);
        acks.retain(|c| c.index >= 0);
        if !acks.is_empty() {
            self.out.push(Action::Send {
                conn,
                msg: ToClient::AckEvents(ToClientAckEvents {
                    last_event_checkpoints: acks,
                }),
            });
        }
        self.out.extend(follow);
        self.flush(idx);
        self.place_pending(now);
        self.take_out()
    }

    fn apply_event(&mut self, idx: usize, actor_id: &str, ev: Event, now: Instant) {
        match ev {
            Event::ActorStateUpdate(u) => match u.state {
                ActorState::Running => {
                    let now_ms = self.unix_ms(now);
                    let Some(a) = self.actors.get_mut(actor_id) else {
                        return;
                    };
                    if a.status != ActorStatus::Starting {
                        return;
                    }
                    a.status = ActorStatus::Running;
                    set_deadline(&mut self.actor_deadlines, a, None);
                    a.connectable_ts = Some(now_ms);
                    a.sleep_ts = None;
                    a.pending_allocation_ts = None;
                    let generation = a.generation;
                    if let Ok(runner_idx) = RunnerIdx::try_from(idx) {
                        self.out.push(Action::ActorRunning {
                            actor_id: actor_id.to_string(),
                            generation,
                            runner_idx,
                        });
                    }
                    self.answer_waiters(actor_id);
                }
                ActorState::Stopped(s) => self.actor_down(actor_id, Some((idx, s.code)), now),
            },
            Event::ActorIntent(i) => match i.intent {
                ActorIntent::Sleep => self.request_stop(actor_id, false, now),
                ActorIntent::Stop => self.request_stop(actor_id, true, now),
            },
            Event::ActorSetAlarm(s) => self.set_alarm(actor_id, s.alarm_ts),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Alarms and housekeeping

    fn set_alarm(&mut self, actor_id: &str, ts: Option<i64>) {
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        if a.alarm_ts == ts {
            return;
        }
        if let Some(old) = a.alarm_ts.take() {
            self.alarms.remove(&(old, actor_id.to_string()));
        }
        if let Some(ts) = ts {
            a.alarm_ts = Some(ts);
            self.alarms.insert((ts, actor_id.to_string()));
        }
        mark(&mut self.dirty, a);
    }

    pub(super) fn fire_alarms(&mut self, now: Instant) {
        let now_ms = self.unix_ms(now);
        while let Some((ts, _)) = self.alarms.first() {
            if *ts > now_ms {
                break;
            }
            let Some((_, id)) = self.alarms.pop_first() else {
                break;
            };
            if let Some(a) = self.actors.get_mut(&id) {
                a.alarm_ts = None;
                mark(&mut self.dirty, a);
            }
            self.want_running(&id, now);
        }
    }

    /// A start that never reported `Running` is stopped; a stop that never reported `Stopped`
    /// is taken as done (with `StopCode::Error`, so the crash policy applies).
    pub(super) fn expire_actor_deadlines(&mut self, now: Instant) {
        while let Some((t, _)) = self.actor_deadlines.first() {
            if *t > now {
                break;
            }
            let Some((t, id)) = self.actor_deadlines.pop_first() else {
                break;
            };
            let Some(a) = self.actors.get_mut(&id) else {
                continue;
            };
            if a.deadline != Some(t) {
                continue;
            }
            a.deadline = None;
            match (a.status, a.runner) {
                (ActorStatus::Starting, _) => self.request_stop(&id, false, now),
                // A runner that still hosts the actor re-sends its unacknowledged latest event
                // after every reconnect, so a `Stopped` lost with a socket is settled at the
                // reconnect's fence (see `Runner::proof`), and a runner that never comes back
                // is lost after `runner_lost_threshold`. Only a stop that a connected runner
                // ignores ends here.
                (ActorStatus::Stopping, Some(idx))
                    if self
                        .runners
                        .get(idx)
                        .is_some_and(|r| r.conn.is_some() && r.fence.is_none()) =>
                {
                    self.actor_down(&id, Some((idx, StopCode::Error)), now)
                }
                _ => {}
            }
        }
        self.place_pending(now);
    }

    /// Give every stopping actor placed on runner `idx` that has no stop deadline a fresh
    /// one (its deadline passed while the runner was disconnected or fenced, when it cannot
    /// end the stop: see `expire_actor_deadlines`).
    pub(super) fn rearm_stop_deadlines(&mut self, idx: usize, now: Instant) {
        let Some(r) = self.runners.get(idx) else {
            return;
        };
        let deadline = now + self.cfg.actor_stop_threshold;
        for id in &r.actors {
            if let Some(a) = self.actors.get_mut(id) {
                if a.status == ActorStatus::Stopping && a.deadline.is_none() {
                    set_deadline(&mut self.actor_deadlines, a, Some(deadline));
                }
            }
        }
    }

    pub(super) fn gc_destroyed(&mut self, now: Instant) {
        while let Some((at, _)) = self.destroyed_gc.first() {
            if *at > now {
                break;
            }
            let Some((_, id)) = self.destroyed_gc.pop_first() else {
                break;
            };
            if let Some(a) = self.actors.get(&id) {
                if a.status == ActorStatus::Destroyed {
                    let seq = a.seq;
                    let input_stored = a.input_stored;
                    self.actors.remove(&id);
                    self.actor_order.remove(&seq);
                    if input_stored {
                        self.store_deletes.push(super::persist::input_key(&id));
                    }
                    self.store_deletes.push(super::persist::actor_key(&id));
                }
            }
        }
    }
}

/// Replace the actor's start/stop deadline, keeping the index in step.
fn set_deadline(
    index: &mut std::collections::BTreeSet<(Instant, String)>,
    a: &mut Actor,
    deadline: Option<Instant>,
) {
    if let Some(old) = a.deadline.take() {
        index.remove(&(old, a.id.clone()));
    }
    if let Some(d) = deadline {
        index.insert((d, a.id.clone()));
        a.deadline = Some(d);
    }
}

/// Queue the next command of the actor's current generation on its runner.
fn push_command(a: &mut Actor, r: &mut super::runners::Runner, inner: Command, state: CmdState) {
    let index = a.next_cmd_idx;
    a.next_cmd_idx += 1;
    r.outbox.push(OutCmd {
        cmd: CommandWrapper {
            checkpoint: ActorCheckpoint {
                actor_id: a.id.clone(),
                generation: a.generation,
                index,
            },
            inner,
        },
        state,
    });
}
