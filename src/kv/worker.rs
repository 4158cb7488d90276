//! The KV store's own OS thread, with group commit.
//!
//! Shards (and the control plane) [`KvHandle::submit`] [`Job`]s over an unbounded crossbeam
//! channel and never block on the store. The worker takes everything queued (up to
//! [`MAX_BATCH_JOBS`] jobs and about [`MAX_BATCH_BYTES`] of put payload), runs all of it in
//! submission order inside ONE transaction, commits once with immediate durability, and only
//! then runs the reply callbacks. So reads in a batch see the writes queued before them (per
//! actor order is kept, in fact global submission order is), no reply leaves before the data
//! is on disk, and when the commit fails every job of the batch is answered with an error.
//! A batch with no write uses a read transaction and commits nothing.
//!
//! Every job carries [`Reply`]s that are answered exactly once: by the worker, or — when a job
//! is dropped unanswered (store shut down, thread gone) — with a `kv.unavailable` error from
//! the reply's `Drop`. Callbacks run on the worker thread (or on the thread that drops the
//! job): they must be short and must not block (hand the result to a mailbox and return).
//!
//! Failures of the store itself. A batch that fails with [`KvError::StoreDown`] (an I/O error
//! such as a full disk, damage, a poisoned engine) or that panics inside the backend (the panic
//! is caught per batch, counted, and never kills the thread) marks the store *down*: the
//! backend is closed and reopened ([`KvBackend::reopen`], verified after a panic) before the
//! next batch, and again in the background with a back-off from [`RETRY_MIN`] doubling to
//! [`RETRY_MAX`] while nothing arrives; a store that is down is used again only once
//! [`KvBackend::probe`] sees the cause gone (free space). A backend on a server
//! ([`KvBackend::health_every`]) is also checked while idle, so that a server that went away
//! marks the store down before a request finds out. While down, every job is answered with a
//! `store.unavailable: …` error, [`KvHandle::is_up`] is false (the daemon's `/readyz` answers
//! 503 and `torpor_store_up` reads 0), and every batch is a write transaction, so that the store
//! is up again only once a commit succeeded. The first batch after the cause is gone (space
//! freed) reopens and commits.
//!
//! Durability rule for control-plane records. Fire-and-forget meta writes (`PutMeta` /
//! `DeleteMeta` without `done`) come from the engine, whose memory already holds the change.
//! When their batch fails they are not dropped: the latest value per key is kept and written
//! first in every following write transaction until one commits, so that the file converges to
//! the engine's memory once the store is back (a newer write of the same key replaces the kept
//! one). Whoever needs to know that a change is durable submits a `Flush` after it: the flush
//! succeeds only when everything before it, kept records included, is committed. A process
//! killed while records are kept loses them; what it acknowledged (after a successful flush)
//! is on disk. Writes with a `done` reply and runner KV requests are answered with the error
//! and not retried: their submitter knows they failed.
//!
//! Fenced writes. A backend whose writes are conditional on the placement lease (PostgreSQL
//! with [`super::pg_store::Fence`]) fails a batch with [`KvError::Fenced`] when this node is no
//! longer the leader. That is not a store failure: the store stays up (no reopen, readiness
//! unchanged), every job of the batch is answered with the `kv.fenced: …` error, and the kept
//! fire-and-forget records are dropped rather than retried — they are the deposed leader's
//! view, which the new leader replaces by restoring from the committed records. Whoever gets
//! `kv.fenced` must step down (stop placing) at once; the node's lease machine does the same
//! when its renew fails.
//!
//! This module must never answer a write before its commit returned, never lose a reply, and
//! never block a submitter.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::{
    apply, is_quota_refusal, is_read_only, KvBackend, KvBatch, KvError, KvLimits, KvOpenError,
    MetaRecord, RedbStore,
};
use crate::protocol::{KvErrorResponse, KvGetRequest, KvRequestData, KvResponseData};

/// Most jobs in one batch (one transaction).
pub const MAX_BATCH_JOBS: usize = 1024;
/// Put payload (keys + values) after which a batch takes no further job.
pub const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;
/// First wait before a background recovery attempt of a store that is down.
pub const RETRY_MIN: Duration = Duration::from_millis(20);
/// Longest wait between background recovery attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(1);
/// The error code that starts every answer given while the store cannot commit.
pub const STORE_UNAVAILABLE: &str = "store.unavailable";

/// What a reply carries when its job was dropped without an answer.
pub trait Unanswered {
    fn unanswered() -> Self;
}

const DROPPED: &str = "the kv store stopped before answering";

impl Unanswered for KvResponseData {
    fn unanswered() -> Self {
        KvResponseData::Error(KvErrorResponse {
            message: KvError::Unavailable(DROPPED.to_string()).to_string(),
        })
    }
}

impl<T> Unanswered for Result<T, KvError> {
    fn unanswered() -> Self {
        Err(KvError::Unavailable(DROPPED.to_string()))
    }
}

/// A callback that is called exactly once: with the answer, or — if it is dropped first —
/// with `T::unanswered()`.
pub struct Reply<T: Unanswered + 'static> {
    f: Option<Box<dyn FnOnce(T) + Send>>,
}

impl<T: Unanswered + 'static> Reply<T> {
    /// Wraps a callback.
    pub fn new(f: impl FnOnce(T) + Send + 'static) -> Reply<T> {
        Reply {
            f: Some(Box::new(f)),
        }
    }

    /// Calls the callback with `value`.
    pub fn send(mut self, value: T) {
        if let Some(f) = self.f.take() {
            f(value);
        }
    }
}

impl<T: Unanswered + 'static> Drop for Reply<T> {
    fn drop(&mut self) {
        if let Some(f) = self.f.take() {
            f(T::unanswered());
        }
    }
}

impl<T: Unanswered + 'static> std::fmt::Debug for Reply<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}

/// Completion of a meta write or flush: `Ok` once committed durably.
pub type Done = Reply<Result<(), KvError>>;

/// One unit of work for the store.
#[derive(Debug)]
pub enum Job {
    /// A runner's KV request for one actor.
    Kv {
        actor_id: String,
        req: KvRequestData,
        reply: Reply<KvResponseData>,
    },
    /// Store a control-plane record.
    PutMeta {
        key: Vec<u8>,
        value: Vec<u8>,
        done: Option<Done>,
    },
    /// Remove a control-plane record.
    DeleteMeta { key: Vec<u8>, done: Option<Done> },
    /// Answered once everything submitted before it is committed.
    Flush(Done),
    /// Every control-plane record, as committed by everything submitted before it.
    LoadMeta(Reply<Result<Vec<MetaRecord>, KvError>>),
    /// The control-plane records of these keys that exist (same ordering guarantee).
    GetMeta {
        keys: Vec<Vec<u8>>,
        reply: Reply<Result<Vec<MetaRecord>, KvError>>,
    },
}

impl Job {
    /// A KV request whose response goes to `reply`.
    pub fn kv(
        actor_id: impl Into<String>,
        req: KvRequestData,
        reply: impl FnOnce(KvResponseData) + Send + 'static,
    ) -> Job {
        Job::Kv {
            actor_id: actor_id.into(),
            req,
            reply: Reply::new(reply),
        }
    }

    /// Put payload bytes, for batch sizing.
    fn weight(&self) -> usize {
        match self {
            Job::Kv {
                req: KvRequestData::Put(p),
                ..
            } => p
                .keys
                .iter()
                .chain(&p.values)
                .fold(0usize, |a, b| a.saturating_add(b.len())),
            Job::PutMeta { key, value, .. } => key.len().saturating_add(value.len()),
            _ => 0,
        }
    }

    fn writes(&self) -> bool {
        match self {
            Job::Kv { req, .. } => !is_read_only(req),
            Job::PutMeta { .. } | Job::DeleteMeta { .. } => true,
            Job::Flush(_) | Job::LoadMeta(_) | Job::GetMeta { .. } => false,
        }
    }
}

/// Counters of the worker (monotonic).
#[derive(Debug, Default)]
pub struct KvStats {
    pub gets: AtomicU64,
    pub lists: AtomicU64,
    pub puts: AtomicU64,
    pub deletes: AtomicU64,
    pub delete_ranges: AtomicU64,
    pub drops: AtomicU64,
    pub meta_puts: AtomicU64,
    pub meta_deletes: AtomicU64,
    pub flushes: AtomicU64,
    pub meta_loads: AtomicU64,
    /// KV requests refused by a limit (the per-actor quota included).
    pub refused: AtomicU64,
    /// Puts refused by the per-actor quota (`limits.kv_bytes_per_actor`); also in `refused`.
    pub quota_refused: AtomicU64,
    /// Jobs answered with a storage error (failed op or failed commit).
    pub failed: AtomicU64,
    /// Batches run (read or write).
    pub batches: AtomicU64,
    /// Write transactions committed.
    pub commits: AtomicU64,
    /// Write transactions that failed (nothing of them acknowledged).
    pub commit_failures: AtomicU64,
    /// Total time spent in write transactions (apply + commit), nanoseconds.
    pub commit_nanos: AtomicU64,
    /// Jobs in the largest batch so far.
    pub max_batch_jobs: AtomicU64,
    /// Panics of the backend caught by the worker (each one marks the store down).
    pub panics: AtomicU64,
    /// Successful reopens of the backend after a failure.
    pub reopens: AtomicU64,
    /// Failed attempts to reopen the backend.
    pub reopen_failures: AtomicU64,
    /// Set while the store cannot commit (see the module doc); a gauge, not a counter.
    pub down: AtomicBool,
}

/// A copy of [`KvStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvStatsSnapshot {
    pub gets: u64,
    pub lists: u64,
    pub puts: u64,
    pub deletes: u64,
    pub delete_ranges: u64,
    pub drops: u64,
    pub meta_puts: u64,
    pub meta_deletes: u64,
    pub flushes: u64,
    pub meta_loads: u64,
    pub refused: u64,
    pub quota_refused: u64,
    pub failed: u64,
    pub batches: u64,
    pub commits: u64,
    pub commit_failures: u64,
    pub commit_nanos: u64,
    pub max_batch_jobs: u64,
    pub panics: u64,
    pub reopens: u64,
    pub reopen_failures: u64,
    /// False while the store cannot commit.
    pub store_up: bool,
}

impl KvStats {
    /// A copy of every counter.
    pub fn snapshot(&self) -> KvStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        KvStatsSnapshot {
            gets: l(&self.gets),
            lists: l(&self.lists),
            puts: l(&self.puts),
            deletes: l(&self.deletes),
            delete_ranges: l(&self.delete_ranges),
            drops: l(&self.drops),
            meta_puts: l(&self.meta_puts),
            meta_deletes: l(&self.meta_deletes),
            flushes: l(&self.flushes),
            meta_loads: l(&self.meta_loads),
            refused: l(&self.refused),
            quota_refused: l(&self.quota_refused),
            failed: l(&self.failed),
            batches: l(&self.batches),
            commits: l(&self.commits),
            commit_failures: l(&self.commit_failures),
            commit_nanos: l(&self.commit_nanos),
            max_batch_jobs: l(&self.max_batch_jobs),
            panics: l(&self.panics),
            reopens: l(&self.reopens),
            reopen_failures: l(&self.reopen_failures),
            store_up: !self.down.load(Ordering::Relaxed),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

enum Msg {
    Job(Job),
    /// Fence every later write with the placement lease's epoch (`None`: no fence), after
    /// every job sent before it ([`KvBackend::set_fence`]).
    Fence(Option<u64>),
    Shutdown,
}

struct Shared {
    stats: Arc<KvStats>,
    /// Why the store is down (the last error), while it is.
    reason: Arc<Mutex<String>>,
    limits: KvLimits,
    join: Mutex<Option<JoinHandle<()>>>,
    worker: ThreadId,
}

impl Shared {
    fn join(&self) {
        if std::thread::current().id() == self.worker {
            // Called from a reply callback on the worker itself: it exits on its own.
            return;
        }
        let handle = match self.join.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("kv worker thread panicked");
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Every sender is gone by now (each handle drops its sender before its `Arc<Shared>`),
        // so the worker drains what is queued, commits and exits.
        self.join();
    }
}

/// The store was shut down; the job was answered with a `kv.unavailable` error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("kv.unavailable: the kv store is shut down")]
pub struct Closed;

/// A cheap, cloneable handle to the store's worker. The worker stops when [`KvHandle::shutdown`]
/// is called or the last handle is dropped; both drain and commit everything queued first.
#[derive(Clone)]
pub struct KvHandle {
    // Declared before `shared`: dropped first, so that the last handle's `Shared::drop` joins
    // a worker whose channel has no sender left.
    tx: Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KvHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvHandle")
            .field("queued", &self.tx.len())
            .finish()
    }
}

impl KvHandle {
    /// Queues `job`; never blocks. When the store is shut down the job is answered at once
    /// (on this thread) with a `kv.unavailable` error and `Err(Closed)` is returned.
    pub fn submit(&self, job: Job) -> Result<(), Closed> {
        // On failure the returned message is dropped here, which answers its replies.
        self.tx.send(Msg::Job(job)).map_err(|_| Closed)
    }

    /// Fences every write submitted after this call with the placement lease's `epoch`, or
    /// lifts the fence (`None`). Jobs submitted before it run as they were.
    pub fn set_fence(&self, epoch: Option<u64>) -> Result<(), Closed> {
        self.tx.send(Msg::Fence(epoch)).map_err(|_| Closed)
    }

    /// Queues a KV request of `actor_id`; `reply` gets its response.
    pub fn kv(
        &self,
        actor_id: impl Into<String>,
        req: KvRequestData,
        reply: impl FnOnce(KvResponseData) + Send + 'static,
    ) -> Result<(), Closed> {
        self.submit(Job::kv(actor_id, req, reply))
    }

    /// Runs a KV request and waits for its response (for tests and tools, not the data path).
    pub fn kv_blocking(&self, actor_id: impl Into<String>, req: KvRequestData) -> KvResponseData {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.kv(actor_id, req, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or_else(|_| KvResponseData::unanswered())
    }

    /// Stores a meta record; waits until it is committed.
    pub fn put_meta_blocking(&self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.wait(|done| Job::PutMeta {
            key: key.to_vec(),
            value: value.to_vec(),
            done: Some(done),
        })
    }

    /// Removes a meta record; waits until it is committed.
    pub fn delete_meta_blocking(&self, key: &[u8]) -> Result<(), KvError> {
        self.wait(|done| Job::DeleteMeta {
            key: key.to_vec(),
            done: Some(done),
        })
    }

    /// Waits until everything submitted before is committed.
    pub fn flush_blocking(&self) -> Result<(), KvError> {
        self.wait(Job::Flush)
    }

    /// Every meta record (as of everything submitted before), ordered by key.
    pub fn load_meta_blocking(&self) -> Result<Vec<MetaRecord>, KvError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.submit(Job::LoadMeta(Reply::new(move |r| {
            let _ = tx.send(r);
        })));
        rx.recv()
            .unwrap_or_else(|_| Err(KvError::Unavailable(DROPPED.to_string())))
    }

    fn wait(&self, job: impl FnOnce(Done) -> Job) -> Result<(), KvError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let _ = self.submit(job(Reply::new(move |r| {
            let _ = tx.send(r);
        })));
        rx.recv()
            .unwrap_or_else(|_| Err(KvError::Unavailable(DROPPED.to_string())))
    }

    /// A copy of the worker's counters.
    pub fn stats(&self) -> KvStatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// False while the store cannot commit (after an I/O error, damage or a panic, until a
    /// reopen and a commit succeed).
    pub fn is_up(&self) -> bool {
        !self.shared.stats.down.load(Ordering::Acquire)
    }

    /// Why the store is down (`None` while it is up).
    pub fn down_reason(&self) -> Option<String> {
        if self.is_up() {
            return None;
        }
        let reason = match self.shared.reason.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        Some(reason)
    }

    /// The limits requests are checked against.
    pub fn limits(&self) -> &KvLimits {
        &self.shared.limits
    }

    /// Jobs queued and not yet taken by the worker.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// Stops the worker: everything queued before is run and committed, then the thread is
    /// joined. Later submissions are answered with `kv.unavailable`. Idempotent; from a reply
    /// callback (on the worker thread) it only asks the worker to stop.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown);
        self.shared.join();
    }
}

/// Opens the redb store at `path` as the daemon does at start-up
/// ([`RedbStore::open_checked`]: damaged or emptied stores are refused) and starts its worker
/// thread.
pub fn spawn(path: &Path, limits: KvLimits) -> Result<KvHandle, KvOpenError> {
    let store = RedbStore::open_checked(path, limits.cache_bytes)?;
    spawn_backend(store, limits).map_err(|source| KvOpenError::Thread {
        path: path.to_path_buf(),
        source,
    })
}

/// Starts a worker thread that owns `backend`.
pub fn spawn_backend<B: KvBackend>(backend: B, limits: KvLimits) -> std::io::Result<KvHandle> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let stats = Arc::new(KvStats::default());
    let reason = Arc::new(Mutex::new(String::new()));
    let worker = Worker {
        backend,
        limits: limits.clone(),
        stats: stats.clone(),
        reason: reason.clone(),
        pending: BTreeMap::new(),
        needs_reopen: false,
        verify_on_reopen: false,
        backoff: RETRY_MIN,
        attempts: 0,
    };
    let join = std::thread::Builder::new()
        .name("torpor-kv".to_string())
        .spawn(move || worker.run(rx))?;
    let worker_id = join.thread().id();
    Ok(KvHandle {
        tx,
        shared: Arc::new(Shared {
            stats,
            reason,
            limits,
            join: Mutex::new(Some(join)),
            worker: worker_id,
        }),
    })
}

struct Worker<B> {
    backend: B,
    limits: KvLimits,
    stats: Arc<KvStats>,
    reason: Arc<Mutex<String>>,
    /// Fire-and-forget meta writes of failed batches, latest value per key (`None`: delete),
    /// written first in every write transaction until one commits (see the module doc).
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The backend failed in a way that needs a reopen before the next batch.
    needs_reopen: bool,
    /// The next reopen checks the whole file (after a panic or damage).
    verify_on_reopen: bool,
    /// Wait before the next background recovery attempt.
    backoff: Duration,
    /// Failed attempts since the store went down (for the log).
    attempts: u64,
}

/// A job's outcome inside a transaction, delivered after the commit.
enum Outcome {
    Kv(KvResponseData),
    Done,
    Meta(Vec<MetaRecord>),
    /// A failed read-only op: answered with this error whatever the commit does.
    Failed(KvError),
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

enum Next {
    Msg(Msg),
    Retry,
    /// Idle for the backend's health interval while up.
    Health,
    Closed,
}

impl<B: KvBackend> Worker<B> {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut carry: Option<Job> = None;
        let mut stopping = false;
        loop {
            let mut batch = Vec::new();
            if let Some(job) = carry.take() {
                batch.push(job);
            } else {
                let next = if stopping {
                    rx.try_recv().map_or(Next::Closed, Next::Msg)
                } else if self.troubled() {
                    match rx.recv_timeout(self.backoff) {
                        Ok(m) => Next::Msg(m),
                        Err(RecvTimeoutError::Timeout) => Next::Retry,
                        Err(RecvTimeoutError::Disconnected) => Next::Closed,
                    }
                } else if let Some(every) = self.backend.health_every() {
                    match rx.recv_timeout(every) {
                        Ok(m) => Next::Msg(m),
                        Err(RecvTimeoutError::Timeout) => Next::Health,
                        Err(RecvTimeoutError::Disconnected) => Next::Closed,
                    }
                } else {
                    rx.recv().map_or(Next::Closed, Next::Msg)
                };
                match next {
                    Next::Msg(Msg::Job(job)) => batch.push(job),
                    Next::Msg(Msg::Fence(epoch)) => {
                        self.backend.set_fence(epoch);
                        continue;
                    }
                    Next::Msg(Msg::Shutdown) => {
                        stopping = true;
                        continue;
                    }
                    Next::Retry => {
                        // Nothing arrived: try to recover in the background (an empty batch
                        // reopens if needed and commits the kept records, or probes).
                        self.run_batch(Vec::new());
                        self.backoff = if self.troubled() {
                            (self.backoff * 2).min(RETRY_MAX)
                        } else {
                            RETRY_MIN
                        };
                        continue;
                    }
                    Next::Health => {
                        self.health_check();
                        continue;
                    }
                    Next::Closed => break,
                }
            }
            let mut bytes: usize = batch.iter().map(Job::weight).sum();
            let mut fence = None;
            while batch.len() < MAX_BATCH_JOBS && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(Msg::Fence(epoch)) => {
                        // The batch so far runs under the fence it was sent under.
                        fence = Some(epoch);
                        break;
                    }
                    Ok(Msg::Job(job)) => {
                        let w = job.weight();
                        if bytes.saturating_add(w) > MAX_BATCH_BYTES {
                            carry = Some(job);
                            break;
                        }
                        bytes += w;
                        batch.push(job);
                    }
                    Ok(Msg::Shutdown) => stopping = true,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.run_batch(batch);
            if let Some(epoch) = fence {
                self.backend.set_fence(epoch);
            }
            if !self.troubled() {
                self.backoff = RETRY_MIN;
            }
        }
        if !self.pending.is_empty() {
            tracing::error!(
                records = self.pending.len(),
                "kv store stopped while it could not commit: control-plane records changed \
                 since the last commit are lost (nothing of them was acknowledged)"
            );
        }
        // Anything sent after this point is dropped with the receiver, which answers it.
    }

    /// True while the store needs recovery work: down, or holding records to write.
    fn troubled(&self) -> bool {
        self.needs_reopen || !self.pending.is_empty() || self.stats.down.load(Ordering::Relaxed)
    }

    /// The idle check of a store that is up ([`KvBackend::health`]): a failure marks it down
    /// (readiness 503) and it is reopened like after a failed batch.
    fn health_check(&mut self) {
        let backend = &mut self.backend;
        let checked = super::panics::contain(|| backend.health()).unwrap_or_else(|panic| {
            Err(KvError::StoreDown(format!(
                "health check panicked: {panic}"
            )))
        });
        if let Err(e) = checked {
            if e.is_store_down() {
                self.needs_reopen = true;
                self.mark_down(&e);
            }
        }
    }

    fn mark_down(&mut self, e: &KvError) {
        match self.reason.lock() {
            Ok(mut g) => *g = e.to_string(),
            Err(p) => *p.into_inner() = e.to_string(),
        }
        self.attempts += 1;
        if !self.stats.down.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %e, "kv store is down: writes are refused with store.unavailable until it is reopened and commits again");
        } else if self.attempts.is_power_of_two() {
            tracing::warn!(error = %e, attempts = self.attempts, "kv store still down");
        }
    }

    fn mark_up(&mut self) {
        if self.stats.down.swap(false, Ordering::AcqRel) {
            tracing::info!(
                failed_attempts = self.attempts,
                "kv store recovered: commits succeed again"
            );
        }
        self.attempts = 0;
    }

    /// Closes and reopens the backend; a panic inside counts and keeps it down.
    fn reopen(&mut self) -> Result<(), KvError> {
        let verify = self.verify_on_reopen;
        let backend = &mut self.backend;
        let result = match super::panics::contain(|| backend.reopen(verify)) {
            Ok(r) => r,
            Err(panic) => {
                bump(&self.stats.panics);
                Err(KvError::StoreDown(format!(
                    "the storage engine panicked while reopening ({panic})"
                )))
            }
        };
        match &result {
            Ok(()) => {
                bump(&self.stats.reopens);
                self.needs_reopen = false;
                self.verify_on_reopen = false;
                tracing::info!("kv store reopened");
            }
            Err(_) => bump(&self.stats.reopen_failures),
        }
        result
    }

    /// Answers a batch that cannot run because the store is down.
    fn refuse(&mut self, batch: Vec<Job>, e: KvError, writes: bool) {
        if writes {
            bump(&self.stats.commit_failures);
        }
        self.mark_down(&e);
        self.keep_records(&batch);
        for job in batch {
            deliver(&self.stats, job, Err(e.clone()));
        }
    }

    /// Keeps the fire-and-forget meta writes of a failed batch (see the module doc).
    fn keep_records(&mut self, batch: &[Job]) {
        for job in batch {
            match job {
                Job::PutMeta {
                    key,
                    value,
                    done: None,
                } => {
                    self.pending.insert(key.clone(), Some(value.clone()));
                }
                Job::DeleteMeta { key, done: None } => {
                    self.pending.insert(key.clone(), None);
                }
                _ => {}
            }
        }
    }

    fn run_batch(&mut self, mut batch: Vec<Job>) {
        bump(&self.stats.batches);
        self.stats
            .max_batch_jobs
            .fetch_max(batch.len() as u64, Ordering::Relaxed);
        // While down, every batch is a write: the store is up again only once a commit works.
        let writes = batch.iter().any(Job::writes)
            || !self.pending.is_empty()
            || self.stats.down.load(Ordering::Relaxed);
        if self.needs_reopen {
            if let Err(e) = self.reopen() {
                self.refuse(batch, e, writes);
                return;
            }
        }
        if self.stats.down.load(Ordering::Relaxed) {
            let backend = &mut self.backend;
            let probed = super::panics::contain(|| backend.probe()).unwrap_or_else(|panic| {
                Err(KvError::StoreDown(format!("probe panicked: {panic}")))
            });
            if let Err(e) = probed {
                self.refuse(batch, e, writes);
                return;
            }
        }
        let now = unix_ms();
        let limits = &self.limits;
        let stats = &*self.stats;
        let pending = &self.pending;
        let backend = &mut self.backend;
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(batch.len());
        let started = Instant::now();
        let mut f = |view: &mut dyn KvBatch| -> Result<(), KvError> {
            outcomes.clear();
            if writes {
                for (key, value) in pending {
                    match value {
                        Some(v) => view.put_meta(key, v)?,
                        None => view.delete_meta(key)?,
                    }
                }
            }
            for job in batch.iter_mut() {
                outcomes.push(exec(view, limits, stats, job, now)?);
            }
            Ok(())
        };
        // A panic inside the backend (redb on a damaged page) or inside the batch is contained:
        // the batch is answered with an error and the store is reopened and checked.
        let result = match super::panics::contain(|| {
            if writes {
                backend.write_batch(&mut f)
            } else {
                backend.read_batch(&mut f)
            }
        }) {
            Ok(r) => r,
            Err(panic) => {
                bump(&stats.panics);
                self.verify_on_reopen = true;
                tracing::error!(%panic, jobs = batch.len(), "the storage engine panicked in a batch; nothing of it is acknowledged");
                Err(KvError::StoreDown(format!(
                    "the storage engine panicked ({panic})"
                )))
            }
        };
        if writes {
            let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            stats.commit_nanos.fetch_add(nanos, Ordering::Relaxed);
            match &result {
                Ok(()) => bump(&stats.commits),
                Err(e) => {
                    bump(&stats.commit_failures);
                    if e.is_fenced() {
                        tracing::warn!(error = %e, jobs = batch.len(), "kv batch refused by the lease fence: this node no longer leads; nothing of it is kept");
                    } else if !e.is_store_down() {
                        tracing::error!(error = %e, jobs = batch.len(), "kv batch failed; nothing of it is acknowledged");
                    }
                }
            }
        }
        match result {
            Ok(()) => {
                if writes {
                    self.pending.clear();
                    self.mark_up();
                }
                for (job, outcome) in batch.into_iter().zip(outcomes) {
                    deliver(&self.stats, job, Ok(outcome));
                }
            }
            Err(e) => {
                if e.is_store_down() {
                    self.needs_reopen = true;
                    self.mark_down(&e);
                }
                if e.is_fenced() {
                    // A deposed leader's records are not retried (see the module doc).
                    self.pending.clear();
                } else {
                    self.keep_records(&batch);
                }
                for job in batch {
                    deliver(&self.stats, job, Err(e.clone()));
                }
            }
        }
    }
}

/// Runs one job inside the transaction. The request is taken out of the job (the job keeps
/// its reply); `Err` abandons the whole transaction.
fn exec(
    view: &mut dyn KvBatch,
    limits: &KvLimits,
    stats: &KvStats,
    job: &mut Job,
    now: i64,
) -> Result<Outcome, KvError> {
    match job {
        Job::Kv { actor_id, req, .. } => {
            let counter = match req {
                KvRequestData::Get(_) => &stats.gets,
                KvRequestData::List(_) => &stats.lists,
                KvRequestData::Put(_) => &stats.puts,
                KvRequestData::Delete(_) => &stats.deletes,
                KvRequestData::DeleteRange(_) => &stats.delete_ranges,
                KvRequestData::Drop => &stats.drops,
            };
            bump(counter);
            let read_only = is_read_only(req);
            // Take the request out (its keys move into the response); leave a harmless empty
            // get behind.
            let req = std::mem::replace(req, KvRequestData::Get(KvGetRequest { keys: Vec::new() }));
            match apply(view, limits, actor_id, req, now) {
                Ok(resp) => {
                    if matches!(resp, KvResponseData::Error(_)) {
                        bump(&stats.refused);
                        if is_quota_refusal(&resp) {
                            bump(&stats.quota_refused);
                        }
                    }
                    Ok(Outcome::Kv(resp))
                }
                // A failed read wrote nothing: answer it alone and keep the batch (unless the
                // store itself failed: then the batch fails and the store is reopened).
                Err(e) if read_only && !e.is_store_down() => Ok(Outcome::Failed(e)),
                Err(e) => Err(e),
            }
        }
        Job::PutMeta { key, value, .. } => {
            bump(&stats.meta_puts);
            view.put_meta(key, value)?;
            Ok(Outcome::Done)
        }
        Job::DeleteMeta { key, .. } => {
            bump(&stats.meta_deletes);
            view.delete_meta(key)?;
            Ok(Outcome::Done)
        }
        Job::Flush(_) => {
            bump(&stats.flushes);
            Ok(Outcome::Done)
        }
        Job::LoadMeta(_) => {
            bump(&stats.meta_loads);
            match view.load_meta() {
                Ok(m) => Ok(Outcome::Meta(m)),
                Err(e) if e.is_store_down() => Err(e),
                Err(e) => Ok(Outcome::Failed(e)),
            }
        }
        Job::GetMeta { keys, .. } => {
            bump(&stats.meta_loads);
            match view.get_meta(keys) {
                Ok(m) => Ok(Outcome::Meta(m)),
                Err(e) if e.is_store_down() => Err(e),
                Err(e) => Ok(Outcome::Failed(e)),
            }
        }
    }
}

fn deliver(stats: &KvStats, job: Job, outcome: Result<Outcome, KvError>) {
    let outcome = match outcome {
        Ok(Outcome::Failed(e)) | Err(e) => {
            bump(&stats.failed);
            Err(e)
        }
        Ok(o) => Ok(o),
    };
    match (job, outcome) {
        (Job::Kv { reply, .. }, Ok(Outcome::Kv(resp))) => reply.send(resp),
        (Job::Kv { reply, .. }, Err(e)) => reply.send(KvResponseData::Error(KvErrorResponse {
            message: e.to_string(),
        })),
        (Job::PutMeta { done, .. } | Job::DeleteMeta { done, .. }, r) => {
            if let Some(done) = done {
                done.send(r.map(|_| ()));
            }
        }
        (Job::Flush(done), r) => done.send(r.map(|_| ())),
        (Job::LoadMeta(reply) | Job::GetMeta { reply, .. }, Ok(Outcome::Meta(m))) => {
            reply.send(Ok(m))
        }
        (Job::LoadMeta(reply) | Job::GetMeta { reply, .. }, Err(e)) => reply.send(Err(e)),
        // Outcomes are produced per job kind above; a mismatch cannot happen, and would be
        // answered by the reply's drop rather than lost.
        (Job::Kv { .. } | Job::LoadMeta(_) | Job::GetMeta { .. }, Ok(_)) => {
            tracing::error!("kv worker: outcome does not match its job");
        }
    }
}
