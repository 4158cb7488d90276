//! The actor registry's entry points: queries (by id, by key, listings in creation order,
//! the names announced by runners, live actors per namespace) and the creation and
//! destruction of actors.
//!
//! Must never create an actor that breaks a limit (name, key, input, runner name, total and
//! per-namespace counts), nor a second live actor with the same (namespace, name, key).

use std::collections::HashMap;
use std::time::Instant;

use super::actor::{mark, Actor, ActorInfo, ActorStatus, CreateActor, CreateError};
use super::{Action, Engine};

impl Engine {
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
}
