//! The embedded, durable actor KV backend on redb (one file, copy-on-write B-trees, crash safe).
//!
//! Tables: `kv` (table key and value layout in the module doc of `kv`), `meta` (the control
//! plane's opaque records), `usage` (actor id → the actor's KV usage in bytes, for the quota;
//! no entry for an actor without keys) and `sys` (the store-wide put sequence that supplies
//! metadata versions, and the marker that `usage` is maintained). Every write transaction
//! commits with `Durability::Immediate`: when [`KvBackend::write_batch`] returns `Ok`, the data
//! is on disk.
//!
//! Why usage is stored rather than recomputed: the alternative — sum an actor's keys when its
//! space is first touched after a start — costs a scan of up to `kv_bytes_per_actor` (1 GiB by
//! default) on the worker thread, stalling every other actor's request behind it, and needs an
//! in-memory cache that must itself roll back with failed batches. A `usage` entry written in
//! the same transaction as the data it describes is exact after any crash (kill -9 included:
//! both commit or neither does), costs one small B-tree lookup and insert per put, and group
//! commit changes nothing since each batch is one transaction. A file written before the table
//! existed has no `usage_v1` marker in `sys`: opening it computes every actor's usage with one
//! scan of `kv`, once.
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
    decode_value, encode_key, encode_list_range, encode_value_into, entry_bytes, over_quota,
    usage_after_put, BatchFn, KvBackend, KvBatch, KvEntries, KvError, KvStore, ListRange,
    MetaRecord, PutOutcome, VALUE_HEADER,
};
use crate::protocol::{KvKey, KvMetadata, KvValue};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");
const SYS: TableDefinition<&str, u64> = TableDefinition::new("sys");
const USAGE: TableDefinition<&str, u64> = TableDefinition::new("usage");
const PUT_SEQ: &str = "put_seq";
/// Free space a store that failed must find before it is used again ([`KvBackend::probe`]).
pub const PROBE_BYTES: u64 = 4 << 20;
/// Present in `sys` once `usage` holds the usage of every actor.
const USAGE_READY: &str = "usage_v1";

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
    /// The file is damaged (truncated, overwritten, failed its integrity check, or made the
    /// storage engine panic). Nothing is started on it.
    #[error("kv store {} is damaged: {message}. torpor does not start on a damaged store: restore the file from a backup, or move it away to start with an empty store (every actor and KV space in it is then lost)", path.display())]
    Damaged { path: PathBuf, message: String },
    /// The file is empty or missing while the data directory says a store was created there
    /// (the marker file, see [`RedbStore::open_checked`]).
    #[error("kv store {} {what}, but {} says a store was created in this data directory: its actors and KV data would be lost silently. Restore the store from a backup, or delete {} to start with an empty store", path.display(), marker.display(), marker.display())]
    MissingData {
        path: PathBuf,
        marker: PathBuf,
        what: &'static str,
    },
    #[error("kv store {}: cannot start its thread: {source}", path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A storage error as the worker sees it. I/O errors (a full disk), damage and a poisoned
/// engine make the whole store unusable until it is reopened ([`KvError::StoreDown`]); the rest
/// concern one operation.
fn storage<E: Into<redb::Error>>(e: E) -> KvError {
    let e: redb::Error = e.into();
    match e {
        redb::Error::Io(_)
        | redb::Error::PreviousIo
        | redb::Error::Corrupted(_)
        | redb::Error::LockPoisoned(_) => KvError::StoreDown(e.to_string()),
        other => KvError::Storage(other.to_string()),
    }
}

fn closed() -> KvError {
    KvError::StoreDown("the store file is closed after an error and not reopened yet".to_string())
}

/// The redb-backed store. `Send`: open it on one thread, hand it to the worker.
pub struct RedbStore {
    /// `None` between a failure that closed it and a successful [`KvBackend::reopen`].
    db: Option<Database>,
    path: PathBuf,
    cache_bytes: usize,
    /// Last put sequence number committed (0: none yet).
    put_seq: u64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .field("open", &self.db.is_some())
            .field("put_seq", &self.put_seq)
            .finish()
    }
}

/// The marker file of a store: next to it, same name with the extension `id`
/// (`data_dir/torpor.id` for `data_dir/torpor.redb`).
pub fn marker_path(store: &Path) -> PathBuf {
    store.with_extension("id")
}

fn open_error(path: &Path, e: DatabaseError) -> KvOpenError {
    let path = path.to_path_buf();
    match e {
        DatabaseError::DatabaseAlreadyOpen => KvOpenError::AlreadyOpen { path },
        DatabaseError::Storage(redb::StorageError::Io(source))
            if source.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            KvOpenError::Damaged {
                path,
                message: format!("the file ends before its data ({source}); it was truncated"),
            }
        }
        DatabaseError::Storage(redb::StorageError::Io(source))
            if source.kind() == std::io::ErrorKind::InvalidData =>
        {
            KvOpenError::Damaged {
                path,
                message: format!(
                    "its header is not that of a valid store ({source}): it was overwritten or \
                     is not a redb file"
                ),
            }
        }
        DatabaseError::Storage(redb::StorageError::Io(source)) => KvOpenError::Io { path, source },
        DatabaseError::Storage(redb::StorageError::Corrupted(message)) => {
            KvOpenError::Damaged { path, message }
        }
        other => KvOpenError::Storage {
            path,
            message: other.to_string(),
        },
    }
}

/// Opens (or initializes an empty or missing) file with redb; a panic of redb is an error.
fn open_db(path: &Path, cache_bytes: usize) -> Result<Database, KvOpenError> {
    match super::panics::contain(|| {
        redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
    }) {
        Ok(r) => r.map_err(|e| open_error(path, e)),
        Err(panic) => Err(KvOpenError::Damaged {
            path: path.to_path_buf(),
            message: format!(
                "the storage engine failed an internal check while opening it ({panic})"
            ),
        }),
    }
}

/// Creates the tables so that read transactions find them, computes usage if the file
/// predates it, and returns the put sequence.
fn init_tables(db: &Database, path: &Path) -> Result<u64, KvOpenError> {
    let fail = |e: &dyn std::fmt::Display| KvOpenError::Storage {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let run = || -> Result<u64, KvOpenError> {
        let mut txn = db.begin_write().map_err(|e| fail(&e))?;
        txn.set_durability(Durability::Immediate);
        let put_seq = {
            txn.open_table(KV).map_err(|e| fail(&e))?;
            txn.open_table(META).map_err(|e| fail(&e))?;
            txn.open_table(USAGE).map_err(|e| fail(&e))?;
            let mut sys = txn.open_table(SYS).map_err(|e| fail(&e))?;
            if sys.get(USAGE_READY).map_err(|e| fail(&e))?.is_none() {
                let actors = rebuild_usage(&txn).map_err(|e| fail(&e))?;
                if actors > 0 {
                    tracing::info!(path = %path.display(), actors, "kv store: computed the usage of every actor (first open since per-actor quotas)");
                }
                sys.insert(USAGE_READY, 1).map_err(|e| fail(&e))?;
            }
            let seq = sys.get(PUT_SEQ).map_err(|e| fail(&e))?;
            seq.map(|g| g.value()).unwrap_or(0)
        };
        txn.commit().map_err(|e| fail(&e))?;
        Ok(put_seq)
    };
    match super::panics::contain(run) {
        Ok(r) => r,
        Err(panic) => Err(KvOpenError::Damaged {
            path: path.to_path_buf(),
            message: format!(
                "the storage engine failed an internal check while reading it ({panic})"
            ),
        }),
    }
}

/// Checks a whole file: redb's integrity check (every page of every tree against its
/// checksum; a damaged last commit is rolled back to the one before), then a read of every
/// record of every table in the shape torpor stored it. `Err` is the damage found.
fn verify(db: &mut Database, path: &Path) -> Result<(), String> {
    let run = || -> Result<(), String> {
        match db.check_integrity() {
            Ok(true) => {}
            Ok(false) => tracing::warn!(path = %path.display(),
                "kv store: the integrity check found damage and repaired it (a damaged last \
                 transaction is rolled back to the one before it)"),
            Err(e) => return Err(format!("integrity check failed: {e}")),
        }
        let txn = db.begin_read().map_err(|e| e.to_string())?;
        let mut records: u64 = 0;
        let kv = txn.open_table(KV).map_err(|e| e.to_string())?;
        for item in kv.iter().map_err(|e| e.to_string())? {
            let (k, v) = item.map_err(|e| e.to_string())?;
            split_table_key(k.value()).map_err(|e| e.to_string())?;
            decode_value(v.value()).map_err(|e| e.to_string())?;
            records += 1;
        }
        let meta = txn.open_table(META).map_err(|e| e.to_string())?;
        for item in meta.iter().map_err(|e| e.to_string())? {
            item.map_err(|e| e.to_string())?;
            records += 1;
        }
        for t in [USAGE, SYS] {
            let t = txn.open_table(t).map_err(|e| e.to_string())?;
            for item in t.iter().map_err(|e| e.to_string())? {
                item.map_err(|e| e.to_string())?;
                records += 1;
            }
        }
        tracing::debug!(path = %path.display(), records, "kv store: every record read back");
        Ok(())
    };
    match super::panics::contain(run) {
        Ok(r) => r,
        Err(panic) => Err(format!(
            "the storage engine failed an internal check while checking it ({panic})"
        )),
    }
}

/// Writes the marker file durably (temporary file, fsync, rename, fsync of the directory).
fn write_marker(marker: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = marker.with_extension("id.tmp");
    let id: u64 = rand::random();
    let text = format!(
        "torpor store {id:016x}\n\
         This file says that a torpor store was created in this directory. torpor refuses to\n\
         start when the store file next to it is missing or empty (its data would be lost\n\
         silently). Delete this file only to start deliberately with an empty store.\n"
    );
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, marker)?;
    if let Some(dir) = marker.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl RedbStore {
    /// Opens (creating when missing, parent directories included) the store file at `path`.
    /// A file already held by another open store is refused with [`KvOpenError::AlreadyOpen`].
    pub fn open(path: &Path) -> Result<RedbStore, KvOpenError> {
        Self::open_with_cache(path, super::DEFAULT_STORE_CACHE_BYTES)
    }

    /// [`RedbStore::open`] with a page cache of `cache_bytes` (redb keeps 9/10 of it for pages
    /// read and written, 1/10 for pages waiting to be written). No integrity check and no
    /// marker file: see [`RedbStore::open_checked`] for the daemon's start-up.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<RedbStore, KvOpenError> {
        create_parent(path)?;
        let db = open_db(path, cache_bytes)?;
        let put_seq = init_tables(&db, path)?;
        Ok(RedbStore {
            db: Some(db),
            path: path.to_path_buf(),
            cache_bytes,
            put_seq,
        })
    }

    /// The daemon's start-up open: refuses a store that lost its data, checks the whole file,
    /// and marks the data directory as holding a store.
    ///
    /// The marker ([`marker_path`], `data_dir/torpor.id`) is written once the store file has
    /// been created (or first opened by a version that writes it). Rules:
    /// - no store file (or an empty one) and no marker: a fresh start, the store is created and
    ///   the marker written;
    /// - no store file, or an empty one, but a marker: refused ([`KvOpenError::MissingData`]):
    ///   the store existed and its data is gone (deleted, truncated to 0 bytes); starting empty
    ///   would make every actor disappear without a word;
    /// - a non-empty file: redb opens it (a panic of redb is contained), then [`verify`] runs
    ///   redb's integrity check and reads every record of every table; damage is refused with
    ///   [`KvOpenError::Damaged`] (the daemon exits 1 with the message). A file without the
    ///   marker (written before markers existed) gets one.
    ///
    /// The check reads the whole file: start-up time grows with the store's size.
    pub fn open_checked(path: &Path, cache_bytes: usize) -> Result<RedbStore, KvOpenError> {
        create_parent(path)?;
        let marker = marker_path(path);
        let has_marker = marker.exists();
        let len = match std::fs::metadata(path) {
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(KvOpenError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let fresh = matches!(len, None | Some(0));
        if fresh && has_marker {
            return Err(KvOpenError::MissingData {
                path: path.to_path_buf(),
                marker,
                what: if len.is_none() {
                    "does not exist"
                } else {
                    "is empty (0 bytes)"
                },
            });
        }
        let mut db = open_db(path, cache_bytes)?;
        let checked = if fresh {
            Ok(())
        } else {
            verify(&mut db, path).map_err(|message| KvOpenError::Damaged {
                path: path.to_path_buf(),
                message,
            })
        };
        let put_seq = match checked.and_then(|()| init_tables(&db, path)) {
            Ok(seq) => seq,
            Err(e) => {
                close_db(db);
                return Err(e);
            }
        };
        if !has_marker {
            write_marker(&marker).map_err(|source| KvOpenError::Io {
                path: marker.clone(),
                source,
            })?;
        }
        Ok(RedbStore {
            db: Some(db),
            path: path.to_path_buf(),
            cache_bytes,
            put_seq,
        })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> Result<&Database, KvError> {
        self.db.as_ref().ok_or_else(closed)
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

    /// Forgets the usage table and its marker, as in a file written before quotas existed
    /// (for tests of the rebuild on open).
    #[cfg(test)]
    pub(crate) fn forget_usage(&mut self) -> Result<(), KvError> {
        let txn = self.db()?.begin_write().map_err(storage)?;
        txn.delete_table(USAGE).map_err(storage)?;
        txn.open_table(SYS)
            .map_err(storage)?
            .remove(USAGE_READY)
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// Number of actor KV entries of every actor (for tests and diagnostics).
    pub fn kv_len(&self) -> Result<u64, KvError> {
        let txn = self.db()?.begin_read().map_err(storage)?;
        let t = txn.open_table(KV).map_err(storage)?;
        t.len().map_err(storage)
    }
}

/// Drops a database: redb writes its allocator state on drop, which can fail or (on a damaged
/// file) panic; the panic is contained and the file lock released either way.
fn close_db(db: Database) {
    if let Err(panic) = super::panics::contain(move || drop(db)) {
        tracing::warn!(%panic, "kv store: closing the database panicked");
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            close_db(db);
        }
    }
}

fn create_parent(path: &Path) -> Result<(), KvOpenError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| KvOpenError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

impl KvBackend for RedbStore {
    fn write_batch(&mut self, f: &mut BatchFn<'_>) -> Result<(), KvError> {
        let mut txn = self.db()?.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate);
        let mut seq = self.put_seq;
        let result = (|| {
            let mut view = WriteView {
                kv: txn.open_table(KV).map_err(storage)?,
                meta: txn.open_table(META).map_err(storage)?,
                usage: txn.open_table(USAGE).map_err(storage)?,
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
        let txn = self.db()?.begin_read().map_err(storage)?;
        let mut view = ReadView {
            kv: txn.open_table(KV).map_err(storage)?,
            meta: txn.open_table(META).map_err(storage)?,
            usage: txn.open_table(USAGE).map_err(storage)?,
            scratch: Vec::new(),
        };
        f(&mut view)
    }

    /// Reserves [`PROBE_BYTES`] in a scratch file next to the store (and removes it): a disk
    /// that cannot give that much is still full.
    fn probe(&mut self) -> Result<(), KvError> {
        use std::os::fd::AsRawFd;
        let scratch = self.path.with_extension("probe");
        let result = (|| -> std::io::Result<()> {
            let f = std::fs::File::create(&scratch)?;
            // SAFETY: posix_fallocate on a file descriptor this function owns.
            let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, PROBE_BYTES as libc::off_t) };
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(())
        })();
        let _ = std::fs::remove_file(&scratch);
        result.map_err(|e| {
            KvError::StoreDown(format!(
                "cannot reserve {} MiB next to the store ({e})",
                PROBE_BYTES >> 20
            ))
        })
    }

    /// Drops the database (its file lock with it) and opens the file again: redb refuses every
    /// operation after an I/O error ("Previous I/O error occurred") until then. Opening repairs
    /// an uncleanly closed file and keeps the last committed transaction. With `verify` the
    /// whole file is checked as at start-up ([`verify`]); damage keeps the store closed.
    fn reopen(&mut self, verify_file: bool) -> Result<(), KvError> {
        if let Some(db) = self.db.take() {
            // Dropping writes redb's allocator state; after an I/O error that may fail or
            // (after a panic inside redb) panic. Either way the lock is released.
            close_db(db);
        }
        let mut db = open_db(&self.path, self.cache_bytes)
            .map_err(|e| KvError::StoreDown(format!("reopening failed: {e}")))?;
        let checked = if verify_file {
            verify(&mut db, &self.path)
                .map_err(|m| KvError::StoreDown(format!("the store file is damaged: {m}")))
        } else {
            Ok(())
        };
        // The committed sequence: a commit that reported an error may still have reached the
        // disk, so the file, not memory, says what was used.
        let seq = checked.and_then(|()| {
            init_tables(&db, &self.path)
                .map_err(|e| KvError::StoreDown(format!("reopening failed: {e}")))
        });
        match seq {
            Ok(seq) => self.put_seq = seq,
            Err(e) => {
                close_db(db);
                return Err(e);
            }
        }
        self.db = Some(db);
        Ok(())
    }
}

type Bytes<'a> = &'a [u8];
type Str<'a> = &'a str;

/// Recomputes the `usage` table from `kv` with one scan (keys of one actor are contiguous).
/// Returns the number of actors with keys.
fn rebuild_usage(txn: &redb::WriteTransaction) -> Result<u64, KvError> {
    let kv = txn.open_table(KV).map_err(storage)?;
    let mut usage = txn.open_table(USAGE).map_err(storage)?;
    usage.retain(|_, _| false).map_err(storage)?;
    let mut current: Option<(String, u64)> = None;
    let mut actors: u64 = 0;
    let mut flush = |c: Option<(String, u64)>,
                     usage: &mut redb::Table<'_, Str<'static>, u64>|
     -> Result<(), KvError> {
        if let Some((actor, bytes)) = c {
            actors += 1;
            usage.insert(actor.as_str(), bytes).map_err(storage)?;
        }
        Ok(())
    };
    for item in kv.iter().map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        let (k, v) = (k.value(), v.value());
        let (actor, user_key_len) = split_table_key(k)?;
        let bytes = entry_bytes(user_key_len, v.len().saturating_sub(VALUE_HEADER));
        match &mut current {
            Some((a, sum)) if a.as_str() == actor => *sum = sum.saturating_add(bytes),
            _ => {
                let next = Some((actor.to_string(), bytes));
                flush(std::mem::replace(&mut current, next), &mut usage)?;
            }
        }
    }
    flush(current, &mut usage)?;
    Ok(actors)
}

/// The actor id and the user key length of a table key.
fn split_table_key(k: &[u8]) -> Result<(&str, usize), KvError> {
    let corrupt = || KvError::Corrupt(format!("table key of {} bytes without an actor", k.len()));
    let len: [u8; 4] = k
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(corrupt)?;
    let end = usize::try_from(u32::from_be_bytes(len))
        .ok()
        .and_then(|n| n.checked_add(4))
        .filter(|&end| end <= k.len())
        .ok_or_else(corrupt)?;
    let actor = std::str::from_utf8(&k[4..end]).map_err(|_| corrupt())?;
    Ok((actor, k.len() - end))
}

fn usage_in<T: ReadableTable<Str<'static>, u64>>(t: &T, actor: &str) -> Result<u64, KvError> {
    Ok(t.get(actor).map_err(storage)?.map_or(0, |g| g.value()))
}

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

fn get_meta_in<T: ReadableTable<Bytes<'static>, Bytes<'static>>>(
    t: &T,
    keys: &[Vec<u8>],
) -> Result<Vec<MetaRecord>, KvError> {
    let mut out = Vec::new();
    for k in keys {
        if let Some(v) = t.get(k.as_slice()).map_err(storage)? {
            out.push((k.clone(), v.value().to_vec()));
        }
    }
    Ok(out)
}

struct WriteView<'t, 's> {
    kv: redb::Table<'t, Bytes<'static>, Bytes<'static>>,
    meta: redb::Table<'t, Bytes<'static>, Bytes<'static>>,
    usage: redb::Table<'t, Str<'static>, u64>,
    seq: &'s mut u64,
    scratch: Vec<u8>,
}

impl WriteView<'_, '_> {
    /// Removes every table key in the bounds (keys of one actor, whose prefix is `prefix_len`
    /// bytes); returns the usage bytes they held.
    fn remove_range(
        &mut self,
        prefix_len: usize,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
    ) -> Result<u64, KvError> {
        let mut freed: u64 = 0;
        self.kv
            .retain_in::<&[u8], _>((start, end), |k, v| {
                freed = freed.saturating_add(entry_bytes(
                    k.len().saturating_sub(prefix_len),
                    v.len().saturating_sub(VALUE_HEADER),
                ));
                false
            })
            .map_err(storage)?;
        Ok(freed)
    }

    /// Lowers the actor's usage by `freed` bytes.
    fn free(&mut self, actor: &str, freed: u64) -> Result<(), KvError> {
        if freed == 0 {
            return Ok(());
        }
        let usage = usage_in(&self.usage, actor)?;
        self.set_usage(actor, usage.saturating_sub(freed))
    }

    /// Stores the actor's usage; an actor without keys has no entry.
    fn set_usage(&mut self, actor: &str, bytes: u64) -> Result<(), KvError> {
        if bytes == 0 {
            self.usage.remove(actor).map_err(storage)?;
        } else {
            self.usage.insert(actor, bytes).map_err(storage)?;
        }
        Ok(())
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

    fn usage(&mut self, actor: &str) -> Result<u64, KvError> {
        usage_in(&self.usage, actor)
    }

    fn put(
        &mut self,
        actor: &str,
        keys: &[KvKey],
        values: &[KvValue],
        now_unix_ms: i64,
        max_usage: u64,
    ) -> Result<PutOutcome, KvError> {
        if keys.len() != values.len() {
            return Err(KvError::Storage(format!(
                "put of {} keys with {} values",
                keys.len(),
                values.len()
            )));
        }
        // The sizes of the entries being replaced: one point lookup per distinct key (the
        // pages are then hot for the insert below).
        let usage = usage_in(&self.usage, actor)?;
        let after = {
            let kv = &self.kv;
            let scratch = &mut self.scratch;
            usage_after_put(usage, keys, values, |key| {
                encode_key(actor, key, scratch)?;
                Ok(kv
                    .get(scratch.as_slice())
                    .map_err(storage)?
                    .map(|g| entry_bytes(key.len(), g.value().len().saturating_sub(VALUE_HEADER))))
            })?
        };
        if over_quota(usage, after, max_usage) {
            return Ok(PutOutcome::OverQuota { usage, after });
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
        if after != usage {
            self.set_usage(actor, after)?;
        }
        Ok(PutOutcome::Stored)
    }

    fn delete(&mut self, actor: &str, keys: &[KvKey]) -> Result<(), KvError> {
        let mut freed: u64 = 0;
        for key in keys {
            encode_key(actor, key, &mut self.scratch)?;
            if let Some(old) = self.kv.remove(self.scratch.as_slice()).map_err(storage)? {
                let bytes = entry_bytes(key.len(), old.value().len().saturating_sub(VALUE_HEADER));
                freed = freed.saturating_add(bytes);
            }
        }
        self.free(actor, freed)
    }

    fn delete_range(&mut self, actor: &str, start: &[u8], end: &[u8]) -> Result<(), KvError> {
        if start >= end {
            return Ok(());
        }
        let mut lo = Vec::new();
        encode_key(actor, start, &mut lo)?;
        encode_key(actor, end, &mut self.scratch)?;
        let hi = std::mem::take(&mut self.scratch);
        let prefix_len = lo.len() - start.len();
        let r = self.remove_range(prefix_len, Bound::Included(&lo), Bound::Excluded(&hi));
        self.scratch = hi;
        self.free(actor, r?)
    }

    fn drop_actor(&mut self, actor: &str) -> Result<(), KvError> {
        let Some(enc) = encode_list_range(actor, &ListRange::All)? else {
            return Ok(());
        };
        let (start, end) = enc.bounds();
        self.remove_range(enc.prefix_len, start, end)?;
        self.set_usage(actor, 0)
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

    fn get_meta(&mut self, keys: &[Vec<u8>]) -> Result<Vec<MetaRecord>, KvError> {
        get_meta_in(&self.meta, keys)
    }
}

struct ReadView {
    kv: redb::ReadOnlyTable<Bytes<'static>, Bytes<'static>>,
    meta: redb::ReadOnlyTable<Bytes<'static>, Bytes<'static>>,
    usage: redb::ReadOnlyTable<Str<'static>, u64>,
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

    fn usage(&mut self, actor: &str) -> Result<u64, KvError> {
        usage_in(&self.usage, actor)
    }

    fn put(
        &mut self,
        _: &str,
        _: &[KvKey],
        _: &[KvValue],
        _: i64,
        _: u64,
    ) -> Result<PutOutcome, KvError> {
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

    fn get_meta(&mut self, keys: &[Vec<u8>]) -> Result<Vec<MetaRecord>, KvError> {
        get_meta_in(&self.meta, keys)
    }
}
