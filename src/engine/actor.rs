//! One actor as the engine holds it: its lifecycle states ([`ActorStatus`]), crash policy,
//! create requests and refusals, the read-only [`ActorInfo`] view, the in-memory record
//! (`Actor`), and the helpers that keep an actor's side indexes in step with it (the dirty
//! mark, the start/stop deadline, its hibernating records in a stable order).
//!
//! Plain data that every other part of the engine builds on: it must never reach the rest of
//! the engine's state (runners, waiters, the store) nor use another engine sub-module.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use super::RunnerIdx;
use crate::protocol::HibernatingRequest;

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
    pub(super) fn placed(self) -> bool {
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
    pub(super) fn info(&self) -> ActorInfo {
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

/// Set the actor's dirty flag and queue it for the next
/// [`Engine::take_store_ops`](super::Engine::take_store_ops).
pub(super) fn mark(dirty: &mut Vec<String>, a: &mut Actor) {
    if !a.dirty {
        a.dirty = true;
        dirty.push(a.id.clone());
    }
}

/// Replace the actor's start/stop deadline, keeping the index in step.
pub(super) fn set_deadline(
    index: &mut BTreeSet<(Instant, String)>,
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

/// An actor's hibernating records in a stable order (by gateway id, then request id).
pub(super) fn sorted_hibernating(
    m: &HashMap<HibernatingRequest, Instant>,
) -> Vec<(HibernatingRequest, Instant)> {
    let mut v: Vec<_> = m.iter().map(|(h, t)| (*h, *t)).collect();
    v.sort_by_key(|(h, _)| (h.gateway_id, h.request_id));
    v
}
