//! The embedded, durable actor KV backend on redb (one file, copy-on-write B-trees, crash safe).
//!
//! Tables: `kv` (table key and value layout in the module doc of `kv`), `meta` (the control
//! plane's opaque records) and `sys` (the store-wide put sequence that supplies metadata
//! versions). Every write transaction commits with `Durability::Immediate`: when
//! [`KvBackend::write_batch`] returns `Ok`, the data is on disk.
//!
//! This module must never acknowledge a write before its commit returned, never panic on any
//! stored or requested bytes, and never be used from the data path directly (the worker owns
//! it on its own thread).

use std::ops::Bound;
use std::path::{Path, PathBuf};

use redb::{
    Database, DatabaseError, Durability, ReadableTable, ReadableTableMetadata, TableDefinition,
};

use super::{
    decode_value, encode_key, encode_list_range, encode_value_into, BatchFn, KvBackend, KvBatch,
    KvEntries, KvError, KvStore, ListRange, MetaRecord, VALUE_HEADER,
};
use crate::protocol::{KvKey, KvMetadata, KvValue};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");
const SYS: TableDefinition<&str, u64> = TableDefinition::new("sys");
const PUT_SEQ: &str = "put_seq";

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum KvOpenError {
    /// Another store (in this or another process) holds the file.
    #[error("kv store {} is already open (another torpor process, or a second store in this one, holds its lock)", path.display())]
    AlreadyOpen { path: PathBuf },
    #[error("kv store {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kv store {}: {message}", path.display())]
    Storage { path: PathBuf, message: String },
    #[error("kv store {}: cannot start its thread: {source}", path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn storage<E: std::fmt::Display>(e: E) -> KvError {
    KvError::Storage(e.to_string())
}

/// The redb-backed store. `Send`: open it on one thread, hand it to the worker.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    /// Last put sequence number committed (0: none yet).
    put_seq: u64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .field("put_seq", &self.put_seq)
            .finish()
    }
}

impl RedbStore {
    /// Opens (creating when missing, parent directories included) the store file at `path`.
    /// A file already held by another open store is refused with [`KvOpenError::AlreadyOpen`].
    pub fn open(path: &Path) -> Result<RedbStore, KvOpenError> {
        Self::open_with_cache(path, crate::config::DEFAULT_STORE_CACHE_BYTES)
    }

    /// [`RedbStore::open`] with a page cache of `cache_bytes` (redb keeps 9/10 of it for pages
    /// read and written, 1/10 for pages waiting to be written).
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<RedbStore, KvOpenError> {
        let path_buf = path.to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| KvOpenError::Io {
                path: path_buf.clone(),
                source,
            })?;
        }
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => KvOpenError::AlreadyOpen {
                    path: path_buf.clone(),
                },
                DatabaseError::Storage(redb::StorageError::Io(source)) => KvOpenError::Io {
                    path: path_buf.clone(),
                    source,
                },
                other => KvOpenError::Storage {
                    path: path_buf.clone(),
                    message: other.to_string(),
                },
            })?;
        let fail = |e: &dyn std::fmt::Display| KvOpenError::Storage {
            path: path_buf.clone(),
            message: e.to_string(),
        };
        // Create the tables so that read transactions find them, and load the put sequence.
        let mut txn = db.begin_write().map_err(|e| fail(&e))?;
        txn.set_durability(Durability::Immediate);
        let put_seq = {
            txn.open_table(KV).map_err(|e| fail(&e))?;
            txn.open_table(META).map_err(|e| fail(&e))?;
            let sys = txn.open_table(SYS).map_err(|e| fail(&e))?;
            let seq = sys.get(PUT_SEQ).map_err(|e| fail(&e))?;
            seq.map(|g| g.value()).unwrap_or(0)
        };
        txn.commit().map_err(|e| fail(&e))?;
        Ok(RedbStore {
            db,
            path: path_buf,
            put_seq,
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores one meta record and commits durably.
    pub fn put_meta(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.write_batch(&mut |b| b.put_meta(key, value))
    }

    /// Removes one meta record (missing is fine) and commits durably.
    pub fn delete_meta(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.write_batch(&mut |b| b.delete_meta(key))
    }

    /// Every meta record, ordered by key.
    pub fn load_meta(&mut self) -> Result<Vec<MetaRecord>, KvError> {
        let mut out = Vec::new();
        self.read_batch(&mut |b| {
            out = b.load_meta()?;
            Ok(())
        })?;
        Ok(out)
    }

    /// Number of actor KV entries of every actor (for tests and diagnostics).
    pub fn kv_len(&self) -> Result<u64, KvError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(KV).map_err(storage)?;
        t.len().map_err(storage)
    }
}

impl KvBackend for RedbStore {
    fn write_batch(&mut self, f: &mut BatchFn<'_>) -> Result<(), KvError> {
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate);
        let mut seq = self.put_seq;
        let result = (|| {
            let mut view = WriteView {
                kv: txn.open_table(KV).map_err(storage)?,
                meta: txn.open_table(META).map_err(storage)?,
                seq: &mut seq,
                scratch: Vec::new(),
            };
            f(&mut view)?;
            drop(view);
            if seq != self.put_seq {
                let mut sys = txn.open_table(SYS).map_err(storage)?;
                sys.insert(PUT_SEQ, seq).map_err(storage)?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                txn.commit().map_err(storage)?;
                self.put_seq = seq;
                Ok(())
            }
            Err(e) => {
                // Nothing of the transaction is kept; an abort failure changes nothing for the
                // caller, who already answers with `e`.
                let _ = txn.abort();
                Err(e)
            }
        }
    }

    fn read_batch(&mut self, f: &mut BatchFn<'_>) -> Result<(), KvError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let mut view = ReadView {
            kv: txn.open_table(KV).map_err(storage)?,
            meta: txn.open_table(META).map_err(storage)?,
            scratch: Vec::new(),
        };
        f(&mut view)
    }
}

type Bytes<'a> = &'a [u8];

fn get_in<T: ReadableTable<Bytes<'static>, Bytes<'static>>>(
    t: &T,
    scratch: &mut Vec<u8>,
    actor: &str,
    key: &[u8],
) -> Result<Option<(KvValue, KvMetadata)>, KvError> {
    encode_key(actor, key, scratch)?;
    let Some(guard) = t.get(scratch.as_slice()).map_err(storage)? else {
        return Ok(None);
    };
    let (meta, value) = decode_value(guard.value())?;
    Ok(Some((value.to_vec(), meta)))
}

fn list_in<T: ReadableTable<Bytes<'static>, Bytes<'static>>>(
    t: &T,
    actor: &str,
    range: &ListRange<'_>,
    reverse: bool,
    limit: usize,
    out: &mut KvEntries,
) -> Result<(), KvError> {
    let Some(enc) = encode_list_range(actor, range)? else {
        return Ok(());
    };
    let prefix_len = enc.prefix_len;
    let iter = t.range::<&[u8]>(enc.bounds()).map_err(storage)?;
    let mut push = |item: Result<
        (
            redb::AccessGuard<'_, Bytes<'static>>,
            redb::AccessGuard<'_, Bytes<'static>>,
        ),
        redb::StorageError,
    >|
     -> Result<(), KvError> {
        let (k, v) = item.map_err(storage)?;
        let k = k.value();
        let user_key = k.get(prefix_len..).ok_or_else(|| {
            KvError::Corrupt(format!(
                "table key of {} bytes in an actor's range",
                k.len()
            ))
        })?;
        let (meta, value) = decode_value(v.value())?;
        out.push(user_key.to_vec(), value.to_vec(), meta);
        Ok(())
    };
    if reverse {
        for item in iter.rev().take(limit) {
            push(item)?;
        }
    } else {
        for item in iter.take(limit) {
            push(item)?;
        }
    }
    Ok(())
}

fn load_meta_in<T: ReadableTable<Bytes<'static>, Bytes<'static>>>(
    t: &T,
) -> Result<Vec<MetaRecord>, KvError> {
    let mut out = Vec::new();
    for item in t.iter().map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        out.push((k.value().to_vec(), v.value().to_vec()));
    }
    Ok(out)
}

struct WriteView<'t, 's> {
    kv: redb::Table<'t, Bytes<'static>, Bytes<'static>>,
    meta: redb::Table<'t, Bytes<'static>, Bytes<'static>>,
    seq: &'s mut u64,
    scratch: Vec<u8>,
}

impl WriteView<'_, '_> {
    fn remove_range(&mut self, start: Bound<&[u8]>, end: Bound<&[u8]>) -> Result<(), KvError> {
        self.kv
            .retain_in::<&[u8], _>((start, end), |_, _| false)
            .map_err(storage)
    }
}

impl KvStore for WriteView<'_, '_> {
    fn get(&mut self, actor: &str, key: &[u8]) -> Result<Option<(KvValue, KvMetadata)>, KvError> {
        get_in(&self.kv, &mut self.scratch, actor, key)
    }

    fn list(
        &mut self,
        actor: &str,
        range: &ListRange<'_>,
        reverse: bool,
        limit: usize,
        out: &mut KvEntries,
    ) -> Result<(), KvError> {
        list_in(&self.kv, actor, range, reverse, limit, out)
    }

    fn put(
        &mut self,
        actor: &str,
        keys: &[KvKey],
        values: &[KvValue],
        now_unix_ms: i64,
    ) -> Result<(), KvError> {
        if keys.len() != values.len() {
            return Err(KvError::Storage(format!(
                "put of {} keys with {} values",
                keys.len(),
                values.len()
            )));
        }
        for (key, value) in keys.iter().zip(values) {
            encode_key(actor, key, &mut self.scratch)?;
            let len = u32::try_from(VALUE_HEADER + value.len())
                .map_err(|_| KvError::Storage(format!("value of {} bytes", value.len())))?;
            let version = self
                .seq
                .checked_add(1)
                .ok_or_else(|| KvError::Storage("the put sequence is exhausted".to_string()))?;
            let mut slot = self
                .kv
                .insert_reserve(self.scratch.as_slice(), len)
                .map_err(storage)?;
            encode_value_into(version, now_unix_ms, value, slot.as_mut());
            *self.seq = version;
        }
        Ok(())
    }

    fn delete(&mut self, actor: &str, keys: &[KvKey]) -> Result<(), KvError> {
        for key in keys {
            encode_key(actor, key, &mut self.scratch)?;
            self.kv.remove(self.scratch.as_slice()).map_err(storage)?;
        }
        Ok(())
    }

    fn delete_range(&mut self, actor: &str, start: &[u8], end: &[u8]) -> Result<(), KvError> {
        if start >= end {
            return Ok(());
        }
        let mut lo = Vec::new();
        encode_key(actor, start, &mut lo)?;
        encode_key(actor, end, &mut self.scratch)?;
        let hi = std::mem::take(&mut self.scratch);
        let r = self.remove_range(Bound::Included(&lo), Bound::Excluded(&hi));
        self.scratch = hi;
        r
    }

    fn drop_actor(&mut self, actor: &str) -> Result<(), KvError> {
        let Some(enc) = encode_list_range(actor, &ListRange::All)? else {
            return Ok(());
        };
        let (start, end) = enc.bounds();
        self.remove_range(start, end)
    }
}

impl KvBatch for WriteView<'_, '_> {
    fn put_meta(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.meta.insert(key, value).map_err(storage)?;
        Ok(())
    }

    fn delete_meta(&mut self, key: &[u8]) -> Result<(), KvError> {
        self.meta.remove(key).map_err(storage)?;
        Ok(())
    }

    fn load_meta(&mut self) -> Result<Vec<MetaRecord>, KvError> {
        load_meta_in(&self.meta)
    }
}

struct ReadView {
    kv: redb::ReadOnlyTable<Bytes<'static>, Bytes<'static>>,
    meta: redb::ReadOnlyTable<Bytes<'static>, Bytes<'static>>,
    scratch: Vec<u8>,
}

fn read_only() -> KvError {
    KvError::Storage("write in a read transaction".to_string())
}

impl KvStore for ReadView {
    fn get(&mut self, actor: &str, key: &[u8]) -> Result<Option<(KvValue, KvMetadata)>, KvError> {
        get_in(&self.kv, &mut self.scratch, actor, key)
    }

    fn list(
        &mut self,
        actor: &str,
        range: &ListRange<'_>,
        reverse: bool,
        limit: usize,
        out: &mut KvEntries,
    ) -> Result<(), KvError> {
        list_in(&self.kv, actor, range, reverse, limit, out)
    }

    fn put(&mut self, _: &str, _: &[KvKey], _: &[KvValue], _: i64) -> Result<(), KvError> {
        Err(read_only())
    }

    fn delete(&mut self, _: &str, _: &[KvKey]) -> Result<(), KvError> {
        Err(read_only())
    }

    fn delete_range(&mut self, _: &str, _: &[u8], _: &[u8]) -> Result<(), KvError> {
        Err(read_only())
    }

    fn drop_actor(&mut self, _: &str) -> Result<(), KvError> {
        Err(read_only())
    }
}

impl KvBatch for ReadView {
    fn put_meta(&mut self, _: &[u8], _: &[u8]) -> Result<(), KvError> {
        Err(read_only())
    }

    fn delete_meta(&mut self, _: &[u8]) -> Result<(), KvError> {
        Err(read_only())
    }

    fn load_meta(&mut self) -> Result<Vec<MetaRecord>, KvError> {
        load_meta_in(&self.meta)
    }
}
