//! The actor key-value store (SPEC §1.6): every actor owns an ordered key space (keys ordered
//! by raw bytes) that the runner reads and writes with `KvRequest`s.
//!
//! Layers:
//! - [`apply`] is the sans-IO semantics: it validates one `KvRequestData` against [`KvLimits`]
//!   and runs it on a [`KvStore`], returning the `KvResponseData` to send. It takes the time as
//!   an argument and never touches a clock, a file or a thread.
//! - [`KvStore`] is the per-actor ordered map that `apply` needs (get, list, put batch, delete
//!   batch, delete range, drop actor). [`KvBatch`] adds the control plane's generic "meta"
//!   records, and a [`KvBackend`] runs a closure inside one transaction over a `KvBatch` view
//!   and commits it durably. Another storage engine replaces redb by implementing these three.
//! - [`redb_store::RedbStore`] is the embedded, durable backend (the default);
//!   [`pg_store::PgStore`] keeps the same tables in PostgreSQL, for several nodes sharing one
//!   store; [`mem_store::MemBackend`] is an in-memory one for tests and ephemeral setups.
//! - [`worker`] runs a backend on its own OS thread with group commit, so that the data path
//!   never waits on a disk.
//!
//! Key layout shared by the backends: one ordered table whose key is
//! `u32 big-endian length of the actor id ‖ actor id bytes ‖ user key` ([`encode_key`]). The
//! length prefix makes the actor part self-delimiting, so two actors never share a key (actor
//! `"a"` + key `"bc"` and actor `"ab"` + key `"c"` differ in their first four bytes), and every
//! key of one actor lies in one contiguous run of the table ordered exactly like the raw user
//! keys — so list, delete-range and drop are single range scans. The stored value is
//! `u64 BE version ‖ i64 BE updateTs ‖ value bytes` ([`encode_value`]).
//!
//! Usage quota: an actor's usage is the sum over its keys of (key length + value length), user
//! bytes only (no prefix, no metadata header). Every backend keeps it per actor, exact, updated
//! inside the same transaction as the data (see [`KvStore::usage`]), so a put is checked against
//! [`KvLimits::max_actor_bytes`] with one usage lookup and one lookup per key — never a scan of
//! the actor's keys.
//!
//! Metadata (`KvMetadata { version, updateTs }`, SPEC §1.3): `version` is the 8-byte big-endian
//! store-wide put sequence number of the write that stored the value (it strictly increases with
//! every put of any key and is never reused, also not after a delete and re-put); `updateTs` is
//! the unix time in milliseconds of that put, so an overwrite updates both (the wire field is an
//! update time, not a creation time). The TypeScript runner 2.2.1 ignores metadata entirely.
//!
//! This module must never panic on request input, never write anything for a refused request,
//! and never mix keys of different actors.

pub mod mem_store;
mod panics;
#[doc(hidden)]
pub mod pg_cluster;
pub mod pg_store;
pub mod redb_store;
pub mod worker;

#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod tests;

use std::ops::Bound;

use crate::protocol::{
    KvErrorResponse, KvGetResponse, KvKey, KvListQuery, KvListResponse, KvMetadata, KvRequestData,
    KvResponseData, KvValue,
};

pub use pg_store::{PgOpenError, PgSettings, PgStore};
pub use redb_store::{KvOpenError, RedbStore};
pub use worker::{
    spawn, spawn_backend, Closed, Job, KvHandle, KvStats, KvStatsSnapshot, Reply, STORE_UNAVAILABLE,
};

/// Default of `limits.store_cache_bytes`. redb's own default (1 GiB) lets the cache keep a
/// copy of every page written, so memory grows with each hibernating socket's record
/// (2.6 KiB per socket measured with 10,000 sockets).
pub const DEFAULT_STORE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Limits applied to every request (SPEC §1.6; all configurable). Each refusal is answered with
/// a `KvErrorResponse` whose message names the limit's field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLimits {
    /// Largest key in bytes (default 2 KiB).
    pub max_key_size: usize,
    /// Largest value in bytes (default 128 KiB).
    pub max_value_size: usize,
    /// Most keys in one get, put or delete (default 128).
    pub max_keys_per_call: usize,
    /// Largest sum of key and value bytes in one put (default 976 KiB).
    pub max_put_payload: usize,
    /// Entries returned by a list without a `limit` (default 16384).
    pub default_list_limit: u64,
    /// Upper bound on a requested list `limit`; larger requests are clamped (default 16384), so
    /// that one reply stays bounded.
    pub max_list_limit: u64,
    /// Largest actor id in bytes (default 1 KiB); not a wire limit, a guard on key size.
    pub max_actor_id_size: usize,
    /// Page cache of the embedded store in bytes (`limits.store_cache_bytes`, default 32 MiB).
    pub cache_bytes: usize,
    /// Most KV bytes (keys plus values) one actor may store (`limits.kv_bytes_per_actor`,
    /// default 1 GiB). A put that would raise the actor's usage above it is refused whole; a
    /// put that does not raise the usage (an overwrite with smaller values) is always allowed,
    /// so an actor above a lowered quota can still shrink.
    pub max_actor_bytes: u64,
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits {
            max_key_size: 2 * 1024,
            max_value_size: 128 * 1024,
            max_keys_per_call: 128,
            max_put_payload: 976 * 1024,
            default_list_limit: 16384,
            max_list_limit: 16384,
            max_actor_id_size: 1024,
            cache_bytes: DEFAULT_STORE_CACHE_BYTES,
            max_actor_bytes: 1 << 30,
        }
    }
}

/// A failure of the storage itself (not a refused request). When a backend returns one while
/// writing, the whole transaction is abandoned and nothing of it is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// The storage engine failed (I/O, commit, ...).
    #[error("kv.storage: {0}")]
    Storage(String),
    /// A stored record does not have the expected shape.
    #[error("kv.corrupt: {0}")]
    Corrupt(String),
    /// The store is not running (shut down, or the request was dropped unanswered).
    #[error("kv.unavailable: {0}")]
    Unavailable(String),
    /// The storage engine cannot be used until it is reopened: an I/O error (a full disk, a
    /// failing device), damage found in the file, or a panic inside the engine. The worker
    /// reopens the backend (see [`KvBackend::reopen`]) and answers with this error until a
    /// commit succeeds again.
    #[error("store.unavailable: {0}")]
    StoreDown(String),
    /// A write fenced with the placement lease's `epoch` was refused because the lease now has
    /// epoch `current` (`None`: no lease row) or has expired in the database's clock: this node
    /// is no longer the leader and must step down. Nothing of the transaction is kept. Not a
    /// store failure: the store is up (see [`worker`] for how the worker answers it).
    #[error("kv.fenced: write of leader epoch {epoch} refused, the lease is at epoch {current:?} or expired; this node no longer leads")]
    Fenced { epoch: u64, current: Option<u64> },
}

impl KvError {
    /// True when the error means the whole store is unusable until it is reopened (as opposed
    /// to one bad record or one refused operation).
    pub fn is_store_down(&self) -> bool {
        matches!(self, KvError::StoreDown(_))
    }

    /// True when a fenced write was refused: the node lost the placement lease.
    pub fn is_fenced(&self) -> bool {
        matches!(self, KvError::Fenced { .. })
    }
}

/// One control-plane record of the meta table: opaque key and value bytes.
pub type MetaRecord = (Vec<u8>, Vec<u8>);

/// Entries found by a get or list, in the shape of `KvGetResponse` / `KvListResponse`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvEntries {
    pub keys: Vec<KvKey>,
    pub values: Vec<KvValue>,
    pub metadata: Vec<KvMetadata>,
}

impl KvEntries {
    /// Appends one entry.
    pub fn push(&mut self, key: KvKey, value: KvValue, meta: KvMetadata) {
        self.keys.push(key);
        self.values.push(value);
        self.metadata.push(meta);
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when there is no entry.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A range of one actor's user keys. `apply` only builds well-formed ranges, but a store must
/// treat an empty or inverted range (see [`KeyRange::is_empty`]) as selecting nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRange<'a> {
    pub start: Bound<&'a [u8]>,
    pub end: Bound<&'a [u8]>,
}

impl KeyRange<'_> {
    /// True when the range selects no key at all by construction (start above end, or equal
    /// bounds with one excluded).
    pub fn is_empty(&self) -> bool {
        match (self.start, self.end) {
            (Bound::Unbounded, _) | (_, Bound::Unbounded) => false,
            (Bound::Included(s), Bound::Included(e)) => s > e,
            (Bound::Included(s), Bound::Excluded(e))
            | (Bound::Excluded(s), Bound::Included(e))
            | (Bound::Excluded(s), Bound::Excluded(e)) => s >= e,
        }
    }
}

/// The per-actor ordered key-value operations that [`apply`] needs. Implementations are a view
/// inside one transaction: when a method returns `Err`, the caller abandons the transaction
/// (a put or delete batch may then be half applied in the view, never in the store).
pub trait KvStore {
    /// The value and metadata of `key`, if it exists.
    fn get(&mut self, actor: &str, key: &[u8]) -> Result<Option<(KvValue, KvMetadata)>, KvError>;
    /// Appends to `out` at most `limit` entries of `range` in key order (descending when
    /// `reverse`).
    fn list(
        &mut self,
        actor: &str,
        range: &ListRange<'_>,
        reverse: bool,
        limit: usize,
        out: &mut KvEntries,
    ) -> Result<(), KvError>;
    /// The actor's usage: the sum over its keys of key length + value length (0 for an actor
    /// without keys). Exact: every write method keeps it up to date in the same transaction.
    fn usage(&mut self, actor: &str) -> Result<u64, KvError>;
    /// Stores every `keys[i] = values[i]` (later duplicates win), stamping `now_unix_ms` as
    /// `updateTs` and a fresh version on each, and updates the actor's usage — unless the put
    /// would raise the usage above `max_usage`: then nothing is written and
    /// [`PutOutcome::OverQuota`] is returned. (See [`usage_after_put`] for the arithmetic.)
    fn put(
        &mut self,
        actor: &str,
        keys: &[KvKey],
        values: &[KvValue],
        now_unix_ms: i64,
        max_usage: u64,
    ) -> Result<PutOutcome, KvError>;
    /// Removes every key of `keys` (missing keys are fine).
    fn delete(&mut self, actor: &str, keys: &[KvKey]) -> Result<(), KvError>;
    /// Removes every key `k` with `start <= k < end`.
    fn delete_range(&mut self, actor: &str, start: &[u8], end: &[u8]) -> Result<(), KvError>;
    /// Removes every key of the actor.
    fn drop_actor(&mut self, actor: &str) -> Result<(), KvError>;
}

/// What [`KvStore::put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Every pair is stored.
    Stored,
    /// Refused by the quota; nothing was written. `usage` is the actor's usage, `after` what
    /// it would have been.
    OverQuota { usage: u64, after: u64 },
}

/// Usage bytes of one entry: key length + value length.
pub fn entry_bytes(key_len: usize, value_len: usize) -> u64 {
    (key_len as u64).saturating_add(value_len as u64)
}

/// The usage of an actor whose usage is `usage` once `keys[i] = values[i]` are stored (later
/// duplicates win: only the last occurrence of a key counts). `stored(key)` gives the usage
/// bytes of `key`'s current entry, `None` when it has none; it is called once per distinct key.
/// Shared by the backends so that they count exactly alike.
pub fn usage_after_put(
    usage: u64,
    keys: &[KvKey],
    values: &[KvValue],
    mut stored: impl FnMut(&[u8]) -> Result<Option<u64>, KvError>,
) -> Result<u64, KvError> {
    let mut freed: u64 = 0;
    let mut added: u64 = 0;
    let mut count = |key: &KvKey, value: &KvValue| -> Result<(), KvError> {
        freed = freed.saturating_add(stored(key)?.unwrap_or(0));
        added = added.saturating_add(entry_bytes(key.len(), value.len()));
        Ok(())
    };
    if keys.len() <= 1 {
        // The common case needs no duplicate detection (and no allocation).
        keys.iter().zip(values).try_for_each(|(k, v)| count(k, v))?;
    } else {
        let mut seen: std::collections::HashSet<&[u8]> =
            std::collections::HashSet::with_capacity(keys.len());
        for (k, v) in keys.iter().zip(values).rev() {
            if seen.insert(k.as_slice()) {
                count(k, v)?;
            }
        }
    }
    // `freed` never exceeds `usage` in a consistent store; saturate rather than panic if it
    // does (the usage is then wrong either way).
    Ok(usage.saturating_sub(freed).saturating_add(added))
}

/// True when a put taking the usage from `usage` to `after` is refused by `max_usage`: it
/// raises the usage, above the quota.
pub fn over_quota(usage: u64, after: u64, max_usage: u64) -> bool {
    after > usage && after > max_usage
}

/// A transaction view: actor KV plus the control plane's meta records (opaque bytes the engine
/// stores, e.g. serialized actor records).
pub trait KvBatch: KvStore {
    fn put_meta(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError>;
    fn delete_meta(&mut self, key: &[u8]) -> Result<(), KvError>;
    /// Every meta record, ordered by key.
    fn load_meta(&mut self) -> Result<Vec<MetaRecord>, KvError>;
    /// The meta records of `keys` that exist, in the order asked.
    fn get_meta(&mut self, keys: &[Vec<u8>]) -> Result<Vec<MetaRecord>, KvError>;
}

/// Closure run inside one transaction.
pub type BatchFn<'a> = dyn FnMut(&mut dyn KvBatch) -> Result<(), KvError> + 'a;

/// A storage engine: runs closures inside transactions.
pub trait KvBackend: Send + 'static {
    /// Runs `f` in one write transaction and commits it durably (the data survives a crash
    /// once this returns `Ok`). When `f` fails or the commit fails, nothing of the transaction
    /// is kept and the error is returned.
    fn write_batch(&mut self, f: &mut BatchFn<'_>) -> Result<(), KvError>;
    /// Runs `f` in a read transaction; its write methods fail.
    fn read_batch(&mut self, f: &mut BatchFn<'_>) -> Result<(), KvError>;
    /// Closes and reopens the storage after a [`KvError::StoreDown`] error or a panic inside
    /// the backend; `verify` asks for a full integrity check of what is reopened (after a panic
    /// or damage, the file is not trusted until checked). `Ok` when the backend can be used
    /// again; until then every batch fails. A backend without anything to reopen keeps the
    /// default.
    fn reopen(&mut self, verify: bool) -> Result<(), KvError> {
        let _ = verify;
        Ok(())
    }
    /// Checks, before a store that is down is used again, that the cause of the failure is
    /// gone as far as it can be seen from outside (e.g. there is free space again). A full
    /// disk lets redb reopen and commit small transactions in pages it already holds while
    /// any growth fails; without this check the store would flap between up and down.
    fn probe(&mut self) -> Result<(), KvError> {
        Ok(())
    }
    /// How often an idle worker checks that a store which is up still answers: a database
    /// server can go away between requests, and readiness should say so before a request
    /// finds out. `None` (the default, a local file) never checks.
    fn health_every(&self) -> Option<std::time::Duration> {
        None
    }
    /// That check: bounded in time; `Err(StoreDown)` marks the store down.
    fn health(&mut self) -> Result<(), KvError> {
        Ok(())
    }
    /// Makes every later write transaction conditional on the placement lease's `epoch`
    /// (refused with [`KvError::Fenced`] otherwise), or stops doing so (`None`). A backend
    /// that no other node shares has nothing to fence (the default).
    fn set_fence(&mut self, epoch: Option<u64>) {
        let _ = epoch;
    }
}

/// The selection of a list request in user-key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListRange<'a> {
    /// Every key of the actor.
    All,
    /// Keys starting with the (non-empty) prefix.
    Prefix(&'a [u8]),
    /// Keys between the bounds.
    Range(KeyRange<'a>),
}

impl ListRange<'_> {
    /// True when nothing can match.
    pub fn is_empty(&self) -> bool {
        match self {
            ListRange::All | ListRange::Prefix(_) => false,
            ListRange::Range(r) => r.is_empty(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Key and value encoding shared by the backends
// ---------------------------------------------------------------------------------------------

/// Bytes of the stored value header (`u64 BE version ‖ i64 BE updateTs`).
pub const VALUE_HEADER: usize = 16;

/// Writes the actor prefix (`u32 BE len ‖ actor`) into `out` (cleared first).
pub fn encode_actor_prefix(actor: &str, out: &mut Vec<u8>) -> Result<(), KvError> {
    let len = u32::try_from(actor.len())
        .map_err(|_| KvError::Storage(format!("actor id of {} bytes", actor.len())))?;
    out.clear();
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(actor.as_bytes());
    Ok(())
}

/// Writes the table key of (`actor`, `key`) into `out` (cleared first).
pub fn encode_key(actor: &str, key: &[u8], out: &mut Vec<u8>) -> Result<(), KvError> {
    encode_actor_prefix(actor, out)?;
    out.extend_from_slice(key);
    Ok(())
}

/// The smallest byte string greater than every string starting with `bytes`: trailing 0xFF
/// bytes dropped, the last remaining byte incremented. `None` when `bytes` is empty or all 0xFF.
pub fn prefix_successor(bytes: &[u8]) -> Option<Vec<u8>> {
    let n = bytes.iter().rposition(|&b| b != 0xFF)? + 1;
    let mut v = bytes[..n].to_vec();
    v[n - 1] += 1;
    Some(v)
}

/// Table-key bounds of a list selection of one actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRange {
    pub start: Bound<Vec<u8>>,
    pub end: Bound<Vec<u8>>,
    /// Length of the actor prefix: a table key's user key starts at this offset.
    pub prefix_len: usize,
}

impl EncodedRange {
    /// The bounds as borrowed slices.
    pub fn bounds(&self) -> (Bound<&[u8]>, Bound<&[u8]>) {
        fn r(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
            match b {
                Bound::Included(v) => Bound::Included(v.as_slice()),
                Bound::Excluded(v) => Bound::Excluded(v.as_slice()),
                Bound::Unbounded => Bound::Unbounded,
            }
        }
        (r(&self.start), r(&self.end))
    }
}

/// Table-key bounds of a list selection of `actor`; `None` when nothing can match. The bounds
/// never reach outside the actor's run of the table.
pub fn encode_list_range(
    actor: &str,
    range: &ListRange<'_>,
) -> Result<Option<EncodedRange>, KvError> {
    if range.is_empty() {
        return Ok(None);
    }
    let mut prefix = Vec::new();
    encode_actor_prefix(actor, &mut prefix)?;
    let prefix_len = prefix.len();
    let with = |k: &[u8]| {
        let mut v = Vec::with_capacity(prefix_len + k.len());
        v.extend_from_slice(&prefix);
        v.extend_from_slice(k);
        v
    };
    let actor_end = match prefix_successor(&prefix) {
        Some(s) => Bound::Excluded(s),
        None => Bound::Unbounded,
    };
    let (start, end) = match range {
        ListRange::All => (Bound::Included(prefix.clone()), actor_end),
        ListRange::Prefix(p) => {
            let full = with(p);
            // The successor of `actor prefix ‖ p` stays inside the actor's run unless `p` is
            // all 0xFF bytes; then every key of the actor at or above `p` starts with `p`.
            let end = match prefix_successor(p) {
                Some(_) => prefix_successor(&full).map_or(Bound::Unbounded, Bound::Excluded),
                None => actor_end,
            };
            (Bound::Included(full), end)
        }
        ListRange::Range(r) => {
            let start = match r.start {
                Bound::Included(k) => Bound::Included(with(k)),
                Bound::Excluded(k) => Bound::Excluded(with(k)),
                Bound::Unbounded => Bound::Included(prefix.clone()),
            };
            let end = match r.end {
                Bound::Included(k) => Bound::Included(with(k)),
                Bound::Excluded(k) => Bound::Excluded(with(k)),
                Bound::Unbounded => actor_end,
            };
            (start, end)
        }
    };
    Ok(Some(EncodedRange {
        start,
        end,
        prefix_len,
    }))
}

/// Writes the stored form of a value into `out` (which must be `VALUE_HEADER + value.len()`
/// bytes long).
pub fn encode_value_into(version: u64, update_ts: i64, value: &[u8], out: &mut [u8]) {
    out[..8].copy_from_slice(&version.to_be_bytes());
    out[8..16].copy_from_slice(&update_ts.to_be_bytes());
    out[16..].copy_from_slice(value);
}

/// The stored form of a value.
pub fn encode_value(version: u64, update_ts: i64, value: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; VALUE_HEADER + value.len()];
    encode_value_into(version, update_ts, value, &mut out);
    out
}

/// Splits a stored value into its metadata and value bytes.
pub fn decode_value(stored: &[u8]) -> Result<(KvMetadata, &[u8]), KvError> {
    if stored.len() < VALUE_HEADER {
        return Err(KvError::Corrupt(format!(
            "stored value of {} bytes is shorter than its {VALUE_HEADER}-byte header",
            stored.len()
        )));
    }
    let mut version = [0u8; 8];
    version.copy_from_slice(&stored[..8]);
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&stored[8..16]);
    Ok((
        KvMetadata {
            version: version.to_vec(),
            update_ts: i64::from_be_bytes(ts),
        },
        &stored[VALUE_HEADER..],
    ))
}

// ---------------------------------------------------------------------------------------------
// Request semantics
// ---------------------------------------------------------------------------------------------

/// The code that starts the message of a put refused by the per-actor quota.
pub const QUOTA_EXCEEDED: &str = "kv.quota_exceeded";

/// True when `resp` is the refusal of a put by the per-actor quota.
pub fn is_quota_refusal(resp: &KvResponseData) -> bool {
    matches!(resp, KvResponseData::Error(e) if e.message.starts_with(QUOTA_EXCEEDED))
}

fn refuse(message: String) -> KvResponseData {
    KvResponseData::Error(KvErrorResponse { message })
}

fn check_key(limits: &KvLimits, key: &[u8]) -> Result<(), String> {
    if key.len() > limits.max_key_size {
        return Err(format!(
            "kv.key_too_large: key of {} bytes exceeds max_key_size ({} bytes)",
            key.len(),
            limits.max_key_size
        ));
    }
    Ok(())
}

fn check_keys(limits: &KvLimits, keys: &[KvKey]) -> Result<(), String> {
    if keys.len() > limits.max_keys_per_call {
        return Err(format!(
            "kv.too_many_keys: {} keys exceed max_keys_per_call ({})",
            keys.len(),
            limits.max_keys_per_call
        ));
    }
    keys.iter().try_for_each(|k| check_key(limits, k))
}

/// Checks `req` of `actor_id` against `limits` without touching any store. The error is the
/// message of the `KvErrorResponse` to send; it names the limit.
pub fn validate(limits: &KvLimits, actor_id: &str, req: &KvRequestData) -> Result<(), String> {
    if actor_id.len() > limits.max_actor_id_size {
        return Err(format!(
            "kv.actor_id_too_large: actor id of {} bytes exceeds max_actor_id_size ({} bytes)",
            actor_id.len(),
            limits.max_actor_id_size
        ));
    }
    match req {
        KvRequestData::Get(r) => check_keys(limits, &r.keys),
        KvRequestData::Delete(r) => check_keys(limits, &r.keys),
        KvRequestData::Put(r) => {
            if r.keys.len() != r.values.len() {
                return Err(format!(
                    "kv.invalid_request: put has {} keys but {} values",
                    r.keys.len(),
                    r.values.len()
                ));
            }
            check_keys(limits, &r.keys)?;
            let mut total: usize = 0;
            for (k, v) in r.keys.iter().zip(&r.values) {
                if v.len() > limits.max_value_size {
                    return Err(format!(
                        "kv.value_too_large: value of {} bytes exceeds max_value_size ({} bytes)",
                        v.len(),
                        limits.max_value_size
                    ));
                }
                total = total.saturating_add(k.len()).saturating_add(v.len());
            }
            if total > limits.max_put_payload {
                return Err(format!(
                    "kv.payload_too_large: put payload of {total} bytes exceeds \
                     max_put_payload ({} bytes)",
                    limits.max_put_payload
                ));
            }
            Ok(())
        }
        KvRequestData::List(r) => match &r.query {
            KvListQuery::All => Ok(()),
            KvListQuery::Prefix(p) => check_key(limits, &p.key),
            KvListQuery::Range(q) => {
                check_key(limits, &q.start)?;
                check_key(limits, &q.end)
            }
        },
        KvRequestData::DeleteRange(r) => {
            check_key(limits, &r.start)?;
            check_key(limits, &r.end)
        }
        KvRequestData::Drop => Ok(()),
    }
}

/// True for requests that never write.
pub fn is_read_only(req: &KvRequestData) -> bool {
    matches!(req, KvRequestData::Get(_) | KvRequestData::List(_))
}

/// Runs one request of `actor_id` on `store` (SPEC §1.6). A request that breaks a limit is
/// answered `Ok(KvResponseData::Error(..))` naming the limit, and nothing is written. `Err` is a
/// storage failure: the caller must abandon the transaction and answer with an error.
///
/// Semantics: Get answers only existing keys, in request order (duplicates answered as often
/// as asked); List answers in raw-byte key order (descending with `reverse`), at most `limit`
/// entries (default `default_list_limit`, clamped to `max_list_limit`), an empty prefix lists
/// everything, `exclusive` excludes the range end; Put writes all pairs or none (none when it
/// would raise the actor's usage above `max_actor_bytes`); DeleteRange
/// removes `[start, end)` and is answered with `Delete`; Drop removes every key of the actor.
pub fn apply<S: KvStore + ?Sized>(
    store: &mut S,
    limits: &KvLimits,
    actor_id: &str,
    req: KvRequestData,
    now_unix_ms: i64,
) -> Result<KvResponseData, KvError> {
    if let Err(message) = validate(limits, actor_id, &req) {
        return Ok(refuse(message));
    }
    match req {
        KvRequestData::Get(r) => {
            let mut out = KvGetResponse {
                keys: Vec::new(),
                values: Vec::new(),
                metadata: Vec::new(),
            };
            for key in r.keys {
                if let Some((value, meta)) = store.get(actor_id, &key)? {
                    out.keys.push(key);
                    out.values.push(value);
                    out.metadata.push(meta);
                }
            }
            Ok(KvResponseData::Get(out))
        }
        KvRequestData::List(r) => {
            let limit = r
                .limit
                .unwrap_or(limits.default_list_limit)
                .min(limits.max_list_limit);
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let range = match &r.query {
                KvListQuery::All => ListRange::All,
                KvListQuery::Prefix(p) if p.key.is_empty() => ListRange::All,
                KvListQuery::Prefix(p) => ListRange::Prefix(&p.key),
                KvListQuery::Range(q) => ListRange::Range(KeyRange {
                    start: Bound::Included(&q.start),
                    end: if q.exclusive {
                        Bound::Excluded(&q.end)
                    } else {
                        Bound::Included(&q.end)
                    },
                }),
            };
            let mut out = KvEntries::default();
            if limit > 0 && !range.is_empty() {
                store.list(
                    actor_id,
                    &range,
                    r.reverse.unwrap_or(false),
                    limit,
                    &mut out,
                )?;
            }
            Ok(KvResponseData::List(KvListResponse {
                keys: out.keys,
                values: out.values,
                metadata: out.metadata,
            }))
        }
        KvRequestData::Put(r) => {
            match store.put(
                actor_id,
                &r.keys,
                &r.values,
                now_unix_ms,
                limits.max_actor_bytes,
            )? {
                PutOutcome::Stored => Ok(KvResponseData::Put),
                PutOutcome::OverQuota { usage, after } => Ok(refuse(format!(
                    "{QUOTA_EXCEEDED}: put would raise the actor's kv usage from {usage} to \
                     {after} bytes, above max_actor_bytes (limits.kv_bytes_per_actor, {} bytes)",
                    limits.max_actor_bytes
                ))),
            }
        }
        KvRequestData::Delete(r) => {
            store.delete(actor_id, &r.keys)?;
            Ok(KvResponseData::Delete)
        }
        KvRequestData::DeleteRange(r) => {
            if r.start < r.end {
                store.delete_range(actor_id, &r.start, &r.end)?;
            }
            Ok(KvResponseData::Delete)
        }
        KvRequestData::Drop => {
            store.drop_actor(actor_id)?;
            Ok(KvResponseData::Drop)
        }
    }
}
