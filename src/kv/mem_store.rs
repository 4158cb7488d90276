//! An in-memory actor KV backend: the same key layout and semantics as the redb backend, kept
//! in `BTreeMap`s. For tests, and for setups that want no durability at all.
//!
//! Per-actor usage (SPEC §1.6 quota, see the `kv` module doc) is kept in a map next to the data
//! and updated by every write, under the same undo log, so it behaves exactly like the redb
//! backend's usage table.
//!
//! A write batch records an undo log and rolls it back when the batch fails, so a failed batch
//! leaves nothing behind — exactly like an aborted redb transaction. A shared flag can make
//! commits fail, to test that a failed commit acknowledges nothing.
//!
//! This module must never be mistaken for durable storage: nothing survives the process.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::{
    decode_value, encode_key, encode_list_range, encode_value, entry_bytes, over_quota,
    usage_after_put, BatchFn, KvBackend, KvBatch, KvEntries, KvError, KvStore, ListRange,
    MetaRecord, PutOutcome, VALUE_HEADER,
};
use crate::protocol::{KvKey, KvMetadata, KvValue};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

enum Undo {
    Kv(Vec<u8>, Option<Vec<u8>>),
    Meta(Vec<u8>, Option<Vec<u8>>),
    Usage(String, Option<u64>),
}

/// Usage bytes of a stored entry whose table key is `table_key_len` bytes with an actor prefix
/// of `prefix_len` bytes.
fn stored_bytes(table_key_len: usize, prefix_len: usize, stored: &[u8]) -> u64 {
    entry_bytes(
        table_key_len.saturating_sub(prefix_len),
        stored.len().saturating_sub(VALUE_HEADER),
    )
}

/// The in-memory backend.
#[derive(Default)]
pub struct MemBackend {
    kv: Map,
    meta: Map,
    /// Usage of every actor that has keys.
    usage: BTreeMap<String, u64>,
    put_seq: u64,
    fail_commits: Option<Arc<AtomicBool>>,
}

impl MemBackend {
    /// An empty store.
    pub fn new() -> MemBackend {
        MemBackend::default()
    }

    /// An empty store whose commits fail (and roll back) while `flag` is set.
    pub fn with_commit_failures(flag: Arc<AtomicBool>) -> MemBackend {
        MemBackend {
            fail_commits: Some(flag),
            ..MemBackend::default()
        }
    }

    /// Number of actor KV entries of every actor.
    pub fn kv_len(&self) -> usize {
        self.kv.len()
    }

    fn run(&mut self, writable: bool, f: &mut BatchFn<'_>) -> Result<(), KvError> {
        let mut undo = Vec::new();
        let mut seq = self.put_seq;
        let mut view = MemView {
            kv: &mut self.kv,
            meta: &mut self.meta,
            usage: &mut self.usage,
            seq: &mut seq,
            undo: &mut undo,
            writable,
            scratch: Vec::new(),
        };
        let mut result = f(&mut view);
        if result.is_ok()
            && writable
            && self
                .fail_commits
                .as_ref()
                .is_some_and(|f| f.load(Ordering::SeqCst))
        {
            result = Err(KvError::Storage("commit failed (injected)".to_string()));
        }
        match result {
            Ok(()) => {
                self.put_seq = seq;
                Ok(())
            }
            Err(e) => {
                for u in undo.into_iter().rev() {
                    let (map, key, old) = match u {
                        Undo::Kv(k, old) => (&mut self.kv, k, old),
                        Undo::Meta(k, old) => (&mut self.meta, k, old),
                        Undo::Usage(actor, old) => {
                            match old {
                                Some(v) => self.usage.insert(actor, v),
                                None => self.usage.remove(&actor),
                            };
                            continue;
                        }
                    };
                    match old {
                        Some(v) => map.insert(key, v),
                        None => map.remove(&key),
                    };
                }
                Err(e)
            }
        }
    }
}

impl KvBackend for MemBackend {
    fn write_batch(&mut self, f: &mut BatchFn<'_>) -> Result<(), KvError> {
        self.run(true, f)
    }

    fn read_batch(&mut self, f: &mut BatchFn<'_>) -> Result<(), KvError> {
        self.run(false, f)
    }
}

struct MemView<'a> {
    kv: &'a mut Map,
    meta: &'a mut Map,
    usage: &'a mut BTreeMap<String, u64>,
    seq: &'a mut u64,
    undo: &'a mut Vec<Undo>,
    writable: bool,
    scratch: Vec<u8>,
}

impl MemView<'_> {
    fn check_writable(&self) -> Result<(), KvError> {
        if self.writable {
            Ok(())
        } else {
            Err(KvError::Storage("write in a read transaction".to_string()))
        }
    }

    fn usage_of(&self, actor: &str) -> u64 {
        self.usage.get(actor).copied().unwrap_or(0)
    }

    /// Sets the actor's usage (an actor without keys has no entry), with undo.
    fn set_usage(&mut self, actor: &str, bytes: u64) {
        let old = if bytes == 0 {
            self.usage.remove(actor)
        } else {
            self.usage.insert(actor.to_string(), bytes)
        };
        if old != Some(bytes) {
            self.undo.push(Undo::Usage(actor.to_string(), old));
        }
    }

    /// Removes one table key; the usage bytes it held (0 when missing).
    fn remove_kv(&mut self, key: Vec<u8>, prefix_len: usize) -> u64 {
        match self.kv.remove(&key) {
            Some(old) => {
                let bytes = stored_bytes(key.len(), prefix_len, &old);
                self.undo.push(Undo::Kv(key, Some(old)));
                bytes
            }
            None => 0,
        }
    }

    /// Removes the keys of `range` of `actor`; returns the usage bytes they held.
    fn remove_encoded_range(&mut self, range: &ListRange<'_>, actor: &str) -> Result<u64, KvError> {
        let Some(enc) = encode_list_range(actor, range)? else {
            return Ok(0);
        };
        let keys: Vec<Vec<u8>> = self
            .kv
            .range::<[u8], _>(enc.bounds())
            .map(|(k, _)| k.clone())
            .collect();
        let mut freed: u64 = 0;
        for k in keys {
            freed = freed.saturating_add(self.remove_kv(k, enc.prefix_len));
        }
        Ok(freed)
    }

    /// Lowers the actor's usage by `freed` bytes.
    fn free(&mut self, actor: &str, freed: u64) {
        if freed > 0 {
            self.set_usage(actor, self.usage_of(actor).saturating_sub(freed));
        }
    }
}

impl KvStore for MemView<'_> {
    fn get(&mut self, actor: &str, key: &[u8]) -> Result<Option<(KvValue, KvMetadata)>, KvError> {
        encode_key(actor, key, &mut self.scratch)?;
        match self.kv.get(self.scratch.as_slice()) {
            None => Ok(None),
            Some(stored) => {
                let (meta, value) = decode_value(stored)?;
                Ok(Some((value.to_vec(), meta)))
            }
        }
    }

    fn list(
        &mut self,
        actor: &str,
        range: &ListRange<'_>,
        reverse: bool,
        limit: usize,
        out: &mut KvEntries,
    ) -> Result<(), KvError> {
        let Some(enc) = encode_list_range(actor, range)? else {
            return Ok(());
        };
        let iter = self.kv.range::<[u8], _>(enc.bounds());
        let mut push = |(k, v): (&Vec<u8>, &Vec<u8>)| -> Result<(), KvError> {
            let user_key = k.get(enc.prefix_len..).ok_or_else(|| {
                KvError::Corrupt(format!(
                    "table key of {} bytes in an actor's range",
                    k.len()
                ))
            })?;
            let (meta, value) = decode_value(v)?;
            out.push(user_key.to_vec(), value.to_vec(), meta);
            Ok(())
        };
        if reverse {
            iter.rev().take(limit).try_for_each(&mut push)
        } else {
            iter.take(limit).try_for_each(&mut push)
        }
    }

    fn usage(&mut self, actor: &str) -> Result<u64, KvError> {
        Ok(self.usage_of(actor))
    }

    fn put(
        &mut self,
        actor: &str,
        keys: &[KvKey],
        values: &[KvValue],
        now_unix_ms: i64,
        max_usage: u64,
    ) -> Result<PutOutcome, KvError> {
        self.check_writable()?;
        if keys.len() != values.len() {
            return Err(KvError::Storage(format!(
                "put of {} keys with {} values",
                keys.len(),
                values.len()
            )));
        }
        let usage = self.usage_of(actor);
        let after = {
            let kv = &*self.kv;
            let scratch = &mut self.scratch;
            usage_after_put(usage, keys, values, |key| {
                encode_key(actor, key, scratch)?;
                Ok(kv.get(scratch.as_slice()).map(|stored| {
                    entry_bytes(key.len(), stored.len().saturating_sub(VALUE_HEADER))
                }))
            })?
        };
        if over_quota(usage, after, max_usage) {
            return Ok(PutOutcome::OverQuota { usage, after });
        }
        for (key, value) in keys.iter().zip(values) {
            let mut k = Vec::new();
            encode_key(actor, key, &mut k)?;
            let version = self
                .seq
                .checked_add(1)
                .ok_or_else(|| KvError::Storage("the put sequence is exhausted".to_string()))?;
            let old = self
                .kv
                .insert(k.clone(), encode_value(version, now_unix_ms, value));
            self.undo.push(Undo::Kv(k, old));
            *self.seq = version;
        }
        self.set_usage(actor, after);
        Ok(PutOutcome::Stored)
    }

    fn delete(&mut self, actor: &str, keys: &[KvKey]) -> Result<(), KvError> {
        self.check_writable()?;
        let mut freed: u64 = 0;
        for key in keys {
            let mut k = Vec::new();
            encode_key(actor, key, &mut k)?;
            let prefix_len = k.len() - key.len();
            freed = freed.saturating_add(self.remove_kv(k, prefix_len));
        }
        self.free(actor, freed);
        Ok(())
    }

    fn delete_range(&mut self, actor: &str, start: &[u8], end: &[u8]) -> Result<(), KvError> {
        self.check_writable()?;
        let range = ListRange::Range(super::KeyRange {
            start: std::ops::Bound::Included(start),
            end: std::ops::Bound::Excluded(end),
        });
        let freed = self.remove_encoded_range(&range, actor)?;
        self.free(actor, freed);
        Ok(())
    }

    fn drop_actor(&mut self, actor: &str) -> Result<(), KvError> {
        self.check_writable()?;
        self.remove_encoded_range(&ListRange::All, actor)?;
        self.set_usage(actor, 0);
        Ok(())
    }
}

impl KvBatch for MemView<'_> {
    fn put_meta(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.check_writable()?;
        let old = self.meta.insert(key.to_vec(), value.to_vec());
        self.undo.push(Undo::Meta(key.to_vec(), old));
        Ok(())
    }

    fn delete_meta(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.check_writable()?;
        if let Some(old) = self.meta.remove(key) {
            self.undo.push(Undo::Meta(key.to_vec(), Some(old)));
        }
        Ok(())
    }

    fn load_meta(&mut self) -> Result<Vec<MetaRecord>, KvError> {
        Ok(self
            .meta
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn get_meta(&mut self, keys: &[Vec<u8>]) -> Result<Vec<MetaRecord>, KvError> {
        Ok(keys
            .iter()
            .filter_map(|k| Some((k.clone(), self.meta.get(k)?.clone())))
            .collect())
    }
}
