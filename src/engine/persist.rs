//! Durable actors: the records the engine writes to the store (one per actor, plus one per
//! actor input), the ordered [`StoreOp`]s the shell applies, and [`Engine::restore`], which
//! rebuilds the actors from those records after a restart.
//!
//! # Keys and values
//!
//! * `engine/actor/{actor id}` → an [`ActorRecord`] as JSON (`"v": 1`).
//! * `engine/input/{actor id}` → the actor's raw `input` bytes. Written once, before the first
//!   actor record that names it; deleted after the destroyed record. The input (up to
//!   `max_input_bytes`) lives apart so that the frequent actor record rewrites (each allocation,
//!   alarm) stay small. The engine keeps only whether an actor has one; each start reads it
//!   (see [`Engine::take_input_loads`]), and [`Engine::restore`] does not keep the bytes.
//! * `engine/hib/{actor id}/{gateway id}{request id}` (the two ids as 4 raw bytes each) → the
//!   socket's last-seen time, Unix ms as 8 bytes little-endian. One key per hibernatable
//!   socket, so opening, refreshing or closing one socket writes a few bytes whatever the
//!   number of sockets of the actor (an actor with 50,000 sockets must not rewrite a list of
//!   50,000 on every open). Records written by an earlier version inside the actor record
//!   (`hibernating`) are still read.
//!
//! * `engine/runner-config/…` → a runner config (see `runner_configs`), restored here too.
//!
//! JSON rather than BARE: records are written on lifecycle changes, not per message, so size
//! and speed hardly matter, while a self-describing format lets a later version add fields
//! (missing ones take defaults, unknown ones are ignored) and lets an operator read the store.
//!
//! # Coalescing and order
//!
//! Changes mark the actor dirty; [`Engine::take_store_ops`] serialises every dirty actor once,
//! in the order they were first dirtied: input puts, then actor records, then deletes. The
//! shell applies the ops in that order, ideally before it executes the actions of the same
//! engine call (so a generation is durable before its `CommandStartActor` leaves).
//!
//! Must never panic on a stored record (corrupt or from another version: skipped and
//! counted), never delete a record it could not parse, and never restore an actor as placed:
//! after a restart no runner holds any actor (runners get new runnerIds and stop theirs).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::actor::{mark, Actor, ActorStatus, CrashPolicy};
use super::store_keys::{
    actor_key, hib_key, hib_put, input_key, parse_hib_key, StoreOp, ACTOR_KEY_PREFIX,
    HIB_KEY_PREFIX, INPUT_KEY_PREFIX, KEY_PREFIX, RUNNER_CONFIG_KEY_PREFIX,
};
use super::Engine;
use crate::protocol::HibernatingRequest;

/// Current [`ActorRecord::v`].
pub const RECORD_VERSION: u32 = 1;

/// A hibernating client socket of the actor, last seen at `last_seen_ms` (Unix ms). Written
/// by earlier versions inside the actor record; now each has a key of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HibernatingRecord {
    pub gateway_id: [u8; 4],
    pub request_id: [u8; 4],
    pub last_seen_ms: i64,
}

/// Everything needed to rebuild an actor after a restart. Timestamps are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActorRecord {
    /// Format version ([`RECORD_VERSION`]); a record of another version is skipped.
    pub v: u32,
    pub id: String,
    /// Creation sequence (listing order and pagination cursor).
    pub seq: u64,
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub key: Option<String>,
    pub runner_name: String,
    /// `sleep`, `destroy` or `restart`.
    pub crash_policy: String,
    pub create_ts: i64,
    /// The input is stored under `engine/input/{id}`.
    #[serde(default)]
    pub input: bool,
    /// Last generation handed out; meaningful only when `allocated`.
    #[serde(default)]
    pub generation: u32,
    /// Ever allocated: the next allocation uses `generation + 1` (else `generation`).
    #[serde(default)]
    pub allocated: bool,
    /// Destroy was asked for while the actor was still on a runner.
    #[serde(default)]
    pub destroy_requested: bool,
    #[serde(default)]
    pub alarm_ts: Option<i64>,
    #[serde(default)]
    pub start_ts: Option<i64>,
    #[serde(default)]
    pub pending_allocation_ts: Option<i64>,
    #[serde(default)]
    pub sleep_ts: Option<i64>,
    /// Set once destroyed.
    #[serde(default)]
    pub destroy_ts: Option<i64>,
    /// Read for records of earlier versions; never written (see `engine/hib/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hibernating: Vec<HibernatingRecord>,
}

impl ActorRecord {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain strings, integers and vectors into memory cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<ActorRecord, RecordError> {
        let r: ActorRecord = serde_json::from_slice(bytes).map_err(|_| RecordError::Malformed)?;
        if r.v != RECORD_VERSION {
            return Err(RecordError::Version(r.v));
        }
        if r.id.is_empty() || r.name.is_empty() || r.namespace.is_empty() {
            return Err(RecordError::Malformed);
        }
        if CrashPolicy::parse(&r.crash_policy).is_none() {
            return Err(RecordError::Malformed);
        }
        Ok(r)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("malformed actor record")]
    Malformed,
    #[error("actor record of unknown version {0}")]
    Version(u32),
}

/// What [`Engine::restore`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Live actors restored (sleeping).
    pub live: usize,
    /// Destroyed actors restored for the rest of their retention period.
    pub destroyed: usize,
    /// Destroyed actors past retention: not restored, their records deleted.
    pub expired: usize,
    /// Records skipped: unparsable, of another version, inconsistent, or a duplicate id or
    /// key. They are left in the store untouched.
    pub skipped: usize,
    /// Live actors whose input record was missing (restored without input).
    pub missing_input: usize,
    /// Entries outside the engine's key prefix (ignored).
    pub foreign: usize,
    /// Runner configs restored.
    pub runner_configs: usize,
}

impl Engine {
    /// The store writes caused since the last call, in the order to apply them. At most one
    /// put per actor record; call after every engine entry point (or batch of them).
    pub fn take_store_ops(&mut self) -> Vec<StoreOp> {
        let dirty = std::mem::take(&mut self.dirty);
        let later = std::mem::take(&mut self.store_deletes);
        // Inputs of this call's creates go to the store and leave memory.
        let mut fresh = std::mem::take(&mut self.fresh_inputs);
        let mut inputs = Vec::new();
        let mut records = Vec::new();
        let mut deletes = Vec::new();
        for id in dirty {
            let Some(a) = self.actors.get_mut(&id) else {
                continue;
            };
            a.dirty = false;
            let fresh = fresh.remove(&id);
            match (a.has_input, a.input_stored, fresh) {
                (true, false, Some(input)) => {
                    inputs.push(StoreOp::Put {
                        key: input_key(&id),
                        value: input,
                    });
                    a.input_stored = true;
                }
                (false, true, _) => {
                    deletes.push(StoreOp::Delete {
                        key: input_key(&id),
                    });
                    a.input_stored = false;
                }
                _ => {}
            }
            let rec = self.record_of(&id);
            if let Some(rec) = rec {
                records.push(StoreOp::Put {
                    key: actor_key(&id),
                    value: rec.encode(),
                });
            }
        }
        deletes.extend(later.into_iter().map(|key| StoreOp::Delete { key }));
        inputs.extend(records);
        inputs.append(&mut self.hib_ops);
        inputs.extend(deletes);
        inputs.extend(self.runner_configs.take_ops());
        inputs
    }

    /// The durable record of an actor as it stands now.
    pub fn actor_record(&self, actor_id: &str) -> Option<ActorRecord> {
        self.record_of(actor_id)
    }

    fn record_of(&self, actor_id: &str) -> Option<ActorRecord> {
        let a = self.actors.get(actor_id)?;
        Some(ActorRecord {
            v: RECORD_VERSION,
            id: a.id.clone(),
            seq: a.seq,
            namespace: a.namespace.clone(),
            name: a.name.clone(),
            key: a.key.clone(),
            runner_name: a.runner_name.clone(),
            crash_policy: a.crash_policy.as_str().to_string(),
            create_ts: a.create_ts,
            input: a.has_input,
            generation: a.generation,
            allocated: a.allocated,
            destroy_requested: a.destroy_requested && a.status != ActorStatus::Destroyed,
            alarm_ts: a.alarm_ts,
            start_ts: a.start_ts,
            pending_allocation_ts: a.pending_allocation_ts,
            sleep_ts: a.sleep_ts,
            destroy_ts: a.destroy_ts,
            hibernating: Vec::new(),
        })
    }

    /// Rebuild actors from the store's entries (`load_meta()`), on a fresh engine before any
    /// runner connects. Entries outside `engine/` are ignored. Every live actor comes back
    /// sleeping with its generation (the next allocation is + 1), key, alarm (one already due
    /// fires at the next [`Engine::tick`]) and its hibernating records that are still within
    /// `hibernation_eligible` of their last-seen time. A destroy that was asked for but not
    /// finished is finished now. Destroyed actors stay visible for the rest of
    /// `destroyed_retention`; older ones are deleted (see [`Engine::take_store_ops`]).
    /// Unusable records are skipped, counted, and left in the store.
    pub fn restore<I>(&mut self, entries: I, now: Instant) -> RestoreReport
    where
        I: IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    {
        let mut report = RestoreReport::default();
        // Ids with a stored input: the bytes stay in the store until a start reads them.
        let mut inputs: HashSet<String> = HashSet::new();
        let mut records: Vec<ActorRecord> = Vec::new();
        // Ids that have an actor entry, parsable or not (their inputs are not orphans).
        let mut actor_ids: HashSet<String> = HashSet::new();
        // Hibernating records by actor: (socket, last seen ms).
        let mut hib: HashMap<String, Vec<(HibernatingRequest, i64)>> = HashMap::new();
        for (k, v) in entries {
            if let Some(rest) = k.strip_prefix(HIB_KEY_PREFIX) {
                let seen = <[u8; 8]>::try_from(v.as_slice()).map(i64::from_le_bytes);
                match (parse_hib_key(rest), seen) {
                    (Some((id, h)), Ok(ms)) => hib.entry(id.to_string()).or_default().push((h, ms)),
                    _ => report.skipped += 1,
                }
                continue;
            }
            if let Some(id) = k.strip_prefix(ACTOR_KEY_PREFIX) {
                let Ok(id) = std::str::from_utf8(id) else {
                    report.skipped += 1;
                    continue;
                };
                actor_ids.insert(id.to_string());
                match ActorRecord::decode(&v) {
                    Ok(rec) if rec.id == id => records.push(rec),
                    _ => report.skipped += 1,
                }
            } else if let Some(id) = k.strip_prefix(INPUT_KEY_PREFIX) {
                match std::str::from_utf8(id) {
                    Ok(id) => {
                        inputs.insert(id.to_string());
                    }
                    Err(_) => report.skipped += 1,
                }
            } else if k.starts_with(RUNNER_CONFIG_KEY_PREFIX) {
                if self.runner_configs.restore_entry(&k, &v) {
                    report.runner_configs += 1;
                } else {
                    report.skipped += 1;
                }
            } else if k.starts_with(KEY_PREFIX) {
                report.skipped += 1;
            } else {
                report.foreign += 1;
            }
        }
        records.sort_by_key(|r| r.seq);

        let now_ms = self.unix_ms(now);
        let retention_ms =
            i64::try_from(self.cfg.destroyed_retention.as_millis()).unwrap_or(i64::MAX);
        let eligible_ms =
            i64::try_from(self.cfg.hibernation_eligible.as_millis()).unwrap_or(i64::MAX);
        let mut finish_destroy: Vec<String> = Vec::new();
        let mut expired_ids: HashSet<String> = HashSet::new();
        for rec in records {
            if self.actors.contains_key(&rec.id) {
                report.skipped += 1;
                continue;
            }
            let Some(crash_policy) = CrashPolicy::parse(&rec.crash_policy) else {
                report.skipped += 1;
                continue;
            };
            if let Some(destroy_ts) = rec.destroy_ts {
                let forget_ms = destroy_ts.saturating_add(retention_ms);
                if forget_ms <= now_ms {
                    report.expired += 1;
                    expired_ids.insert(rec.id.clone());
                    if inputs.remove(&rec.id) {
                        self.store_deletes.push(input_key(&rec.id));
                    }
                    self.store_deletes.push(actor_key(&rec.id));
                    continue;
                }
                // A destroy_ts in the future (the wall clock went back) counts as now.
                let left = Duration::from_millis(forget_ms.saturating_sub(now_ms) as u64)
                    .min(self.cfg.destroyed_retention);
                let forget_at = now + left;
                let input_stored = inputs.remove(&rec.id);
                let id = rec.id.clone();
                self.insert_restored(rec, crash_policy, false, input_stored, HashMap::new());
                if let Some(a) = self.actors.get_mut(&id) {
                    a.status = ActorStatus::Destroyed;
                    if input_stored {
                        // A destroyed actor has no input: delete the leftover.
                        mark(&mut self.dirty, a);
                    }
                }
                self.destroyed_gc.insert((forget_at, id));
                report.destroyed += 1;
                continue;
            }
            if let Some(key) = &rec.key {
                let k = (rec.namespace.clone(), rec.name.clone(), key.clone());
                if self.actor_by_key.contains_key(&k) {
                    report.skipped += 1;
                    continue;
                }
            }
            let has_input = rec.input && inputs.remove(&rec.id);
            if rec.input && !has_input {
                report.missing_input += 1;
            }
            let legacy = rec.hibernating.iter().map(|h| {
                let req = HibernatingRequest {
                    gateway_id: h.gateway_id,
                    request_id: h.request_id,
                };
                (req, h.last_seen_ms, true)
            });
            let own = hib.remove(&rec.id).unwrap_or_default();
            let own = own.into_iter().map(|(h, ms)| (h, ms, false));
            let mut hibernating: HashMap<HibernatingRequest, Instant> = HashMap::new();
            // A socket with a key of its own is not taken again from an earlier record.
            for (h, last_seen_ms, legacy) in own.chain(legacy) {
                if legacy && hibernating.contains_key(&h) {
                    continue;
                }
                let age = now_ms.saturating_sub(last_seen_ms).max(0);
                let seen = (age <= eligible_ms)
                    .then(|| now.checked_sub(Duration::from_millis(age as u64)))
                    .flatten();
                match seen {
                    Some(seen) => {
                        let e = hibernating.entry(h).or_insert(seen);
                        *e = (*e).max(seen);
                        if legacy {
                            // From a record of an earlier version: to a key of its own.
                            self.hib_ops.push(hib_put(&rec.id, h, last_seen_ms));
                        }
                    }
                    // Too old to be listed again: forget it.
                    None => self.store_deletes.push(hib_key(&rec.id, h)),
                }
            }
            let rewrite = !rec.hibernating.is_empty();
            let id = rec.id.clone();
            let destroy_requested = rec.destroy_requested;
            let namespace = rec.namespace.clone();
            self.insert_restored(rec, crash_policy, has_input, has_input, hibernating);
            if let Some(a) = self.actors.get_mut(&id) {
                if rewrite {
                    // Rewrite a record of an earlier version without its sockets.
                    mark(&mut self.dirty, a);
                }
                if a.sleep_ts.is_none() && a.allocated {
                    // It was on a runner when the previous process ended: asleep since now.
                    a.sleep_ts = Some(now_ms);
                }
                if let Some(ts) = a.alarm_ts {
                    self.alarms.insert((ts, id.clone()));
                }
                if let Some(key) = &a.key {
                    self.actor_by_key.insert(
                        (a.namespace.clone(), a.name.clone(), key.clone()),
                        id.clone(),
                    );
                }
            }
            self.count_live(&namespace, true);
            if destroy_requested {
                finish_destroy.push(id);
            } else {
                report.live += 1;
            }
        }
        // Hibernating records left over belong to actors that are gone, destroyed or expired
        // (deleted), or whose record was skipped (left alone with it).
        for (id, socks) in hib {
            let destroyed = self
                .actors
                .get(&id)
                .is_some_and(|a| a.status == ActorStatus::Destroyed);
            if destroyed || expired_ids.contains(&id) || !actor_ids.contains(&id) {
                for (h, _) in socks {
                    self.store_deletes.push(hib_key(&id, h));
                }
            }
        }
        // Inputs whose actor has no entry at all were written just before a create that never
        // reached the store.
        for id in inputs {
            if !actor_ids.contains(&id) {
                self.store_deletes.push(input_key(&id));
            }
        }
        for id in finish_destroy {
            self.destroy(&id, now);
            report.destroyed += 1;
        }
        // Nobody waits for restored actors: the actions of a finished destroy concern no shard.
        self.out.clear();
        // The pools of the serverless configs found come up at the next tick.
        if !self.runner_configs.serverless_keys().is_empty() {
            self.pools_changed();
        }
        report
    }

    fn insert_restored(
        &mut self,
        rec: ActorRecord,
        crash_policy: CrashPolicy,
        has_input: bool,
        input_stored: bool,
        hibernating: HashMap<HibernatingRequest, Instant>,
    ) {
        let seq = rec.seq.max(self.next_actor_seq);
        self.next_actor_seq = seq.saturating_add(1);
        let actor = Actor {
            id: rec.id.clone(),
            seq,
            namespace: rec.namespace,
            name: rec.name,
            key: rec.key,
            runner_name: rec.runner_name,
            crash_policy,
            create_ts: rec.create_ts,
            has_input,
            generation: rec.generation,
            allocated: rec.allocated,
            status: ActorStatus::Sleeping,
            runner: None,
            next_cmd_idx: 0,
            last_event_idx: -1,
            destroy_requested: rec.destroy_requested,
            wake_after_stop: false,
            pending: false,
            alarm_ts: if rec.destroy_ts.is_some() {
                None
            } else {
                rec.alarm_ts
            },
            deadline: None,
            waiters: Vec::new(),
            hibernating,
            start_ts: rec.start_ts,
            pending_allocation_ts: rec.pending_allocation_ts,
            connectable_ts: None,
            sleep_ts: rec.sleep_ts,
            destroy_ts: rec.destroy_ts,
            dirty: false,
            input_stored,
        };
        self.actor_order.insert(seq, rec.id.clone());
        self.actors.insert(rec.id, actor);
    }
}
