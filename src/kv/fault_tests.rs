//! Failures of the store itself: a backend that fails like redb after an I/O error (every
//! operation refused until it is reopened, reopening refused while the cause lasts) or that
//! panics; redb's reopen; the start-up checks of a damaged or emptied store file.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::mem_store::MemBackend;
use super::*;
use crate::protocol::{KvGetRequest, KvPutRequest, KvRequestData, KvResponseData};

/// What the faulty backend does on its next write.
const OK: u8 = 0;
const FAIL_IO: u8 = 1;
const PANIC_ONCE: u8 = 2;

/// A [`MemBackend`] that fails like redb: while `mode` is `FAIL_IO` a write fails with a
/// store-down error and poisons the backend; a poisoned backend refuses everything until
/// `reopen`, which itself fails while `mode` is `FAIL_IO`.
struct Faulty {
    inner: MemBackend,
    mode: Arc<AtomicU8>,
    poisoned: bool,
    verified: Arc<AtomicBool>,
}

impl Faulty {
    fn new(mode: Arc<AtomicU8>, verified: Arc<AtomicBool>) -> Faulty {
        Faulty {
            inner: MemBackend::new(),
            mode,
            poisoned: false,
            verified,
        }
    }
}

impl KvBackend for Faulty {
    fn write_batch(&mut self, f: &mut BatchFn<'_>) -> Result<(), KvError> {
        if self.poisoned {
            return Err(KvError::StoreDown("Previous I/O error occurred".into()));
        }
        match self.mode.load(Ordering::SeqCst) {
            FAIL_IO => {
                self.poisoned = true;
                Err(KvError::StoreDown("No space left on device".into()))
            }
            PANIC_ONCE => {
                self.mode.store(OK, Ordering::SeqCst);
                panic!("injected panic inside the backend")
            }
            _ => self.inner.write_batch(f),
        }
    }

    fn read_batch(&mut self, f: &mut BatchFn<'_>) -> Result<(), KvError> {
        if self.poisoned {
            return Err(KvError::StoreDown("Previous I/O error occurred".into()));
        }
        self.inner.read_batch(f)
    }

    fn reopen(&mut self, verify: bool) -> Result<(), KvError> {
        if self.mode.load(Ordering::SeqCst) == FAIL_IO {
            return Err(KvError::StoreDown("reopening failed: no space".into()));
        }
        if verify {
            self.verified.store(true, Ordering::SeqCst);
        }
        self.poisoned = false;
        Ok(())
    }
}

fn put(key: &[u8], value: &[u8]) -> KvRequestData {
    KvRequestData::Put(KvPutRequest {
        keys: vec![key.to_vec()],
        values: vec![value.to_vec()],
    })
}

fn get(key: &[u8]) -> KvRequestData {
    KvRequestData::Get(KvGetRequest {
        keys: vec![key.to_vec()],
    })
}

fn message(r: &KvResponseData) -> String {
    match r {
        KvResponseData::Error(e) => e.message.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn faulty() -> (KvHandle, Arc<AtomicU8>, Arc<AtomicBool>) {
    let mode = Arc::new(AtomicU8::new(OK));
    let verified = Arc::new(AtomicBool::new(false));
    let h = spawn_backend(
        Faulty::new(mode.clone(), verified.clone()),
        KvLimits::default(),
    )
    .unwrap();
    (h, mode, verified)
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_failed_store_refuses_with_store_unavailable_then_heals_on_the_next_batch() {
    let (h, mode, _) = faulty();
    assert_eq!(h.kv_blocking("a", put(b"k", b"1")), KvResponseData::Put);
    assert!(h.is_up());
    mode.store(FAIL_IO, Ordering::SeqCst);
    let r = h.kv_blocking("a", put(b"k", b"2"));
    assert!(message(&r).starts_with("store.unavailable: "), "{r:?}");
    assert!(!h.is_up());
    assert!(h.down_reason().unwrap().contains("store.unavailable"));
    // Reads are refused too (nothing can be read from a closed store), and a flush fails.
    assert!(message(&h.kv_blocking("a", get(b"k"))).starts_with("store.unavailable"));
    assert!(matches!(h.flush_blocking(), Err(KvError::StoreDown(_))));
    let s = h.stats();
    assert!(!s.store_up);
    assert!(s.commit_failures >= 1 && s.failed >= 3, "{s:?}");
    assert!(s.reopen_failures >= 1, "{s:?}");
    // The cause is gone: the very next batch reopens and commits.
    mode.store(OK, Ordering::SeqCst);
    assert_eq!(h.kv_blocking("a", put(b"k", b"3")), KvResponseData::Put);
    assert!(h.is_up());
    assert!(h.down_reason().is_none());
    match h.kv_blocking("a", get(b"k")) {
        KvResponseData::Get(g) => assert_eq!(g.values, vec![b"3".to_vec()]),
        other => panic!("{other:?}"),
    }
    let s = h.stats();
    assert!(s.store_up && s.reopens >= 1, "{s:?}");
    h.shutdown();
}

#[test]
fn records_of_failed_batches_are_kept_and_written_once_the_store_is_back() {
    let (h, mode, _) = faulty();
    h.put_meta_blocking(b"actor/a", b"v1").unwrap();
    mode.store(FAIL_IO, Ordering::SeqCst);
    // Fire-and-forget records (the engine's) in the failing batch, then a flush: refused.
    for (k, v) in [(&b"actor/b"[..], &b"v1"[..]), (b"actor/a", b"v2")] {
        h.submit(Job::PutMeta {
            key: k.to_vec(),
            value: v.to_vec(),
            done: None,
        })
        .unwrap();
    }
    h.submit(Job::DeleteMeta {
        key: b"actor/b".to_vec(),
        done: None,
    })
    .unwrap();
    h.submit(Job::PutMeta {
        key: b"actor/c".to_vec(),
        value: b"v1".to_vec(),
        done: None,
    })
    .unwrap();
    assert!(h.flush_blocking().is_err());
    // A write whose submitter is told it failed is not kept.
    assert!(h.put_meta_blocking(b"actor/told", b"x").is_err());
    mode.store(OK, Ordering::SeqCst);
    // The flush after the store is back commits the kept records first.
    h.flush_blocking().unwrap();
    assert_eq!(
        h.load_meta_blocking().unwrap(),
        vec![
            (b"actor/a".to_vec(), b"v2".to_vec()),
            (b"actor/c".to_vec(), b"v1".to_vec()),
        ]
    );
    h.shutdown();
}

#[test]
fn the_store_recovers_in_the_background_without_traffic() {
    let (h, mode, _) = faulty();
    mode.store(FAIL_IO, Ordering::SeqCst);
    assert!(h.flush_blocking().is_ok(), "a flush with nothing to write");
    h.submit(Job::PutMeta {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        done: None,
    })
    .unwrap();
    wait_until("the store is down", || !h.is_up());
    mode.store(OK, Ordering::SeqCst);
    wait_until("the store is up again", || h.is_up());
    assert_eq!(
        h.load_meta_blocking().unwrap(),
        vec![(b"k".to_vec(), b"v".to_vec())]
    );
    h.shutdown();
}

#[test]
fn a_panic_in_the_backend_is_contained_counted_and_the_store_reopened_with_a_check() {
    let (h, mode, verified) = faulty();
    mode.store(PANIC_ONCE, Ordering::SeqCst);
    let r = h.kv_blocking("a", put(b"k", b"1"));
    let m = message(&r);
    assert!(
        m.starts_with("store.unavailable: ") && m.contains("panicked"),
        "{m}"
    );
    assert!(!h.is_up());
    assert_eq!(h.stats().panics, 1);
    // The worker thread lives on: the next batch reopens (with a full check) and works.
    assert_eq!(h.kv_blocking("a", put(b"k", b"2")), KvResponseData::Put);
    assert!(verified.load(Ordering::SeqCst));
    assert!(h.is_up());
    h.shutdown();
}

// ---------------------------------------------------------------------------------------------
// redb: reopen, start-up checks
// ---------------------------------------------------------------------------------------------

struct Dir(std::path::PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!(
            "torpor-kv-fault-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    fn store(&self) -> std::path::PathBuf {
        self.0.join("torpor.redb")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn redb_reopen_keeps_data_and_the_put_sequence() {
    let d = Dir::new("reopen");
    let mut s = RedbStore::open_checked(&d.store(), 1 << 20).unwrap();
    let put_one = |s: &mut RedbStore, v: &[u8]| {
        s.write_batch(&mut |b| {
            apply(b, &KvLimits::default(), "a", put(b"k", v), 1)?;
            Ok(())
        })
        .unwrap();
    };
    put_one(&mut s, b"1");
    s.reopen(true).unwrap();
    put_one(&mut s, b"2");
    let mut got = None;
    s.read_batch(&mut |b| {
        got = b.get("a", b"k")?;
        Ok(())
    })
    .unwrap();
    let (value, meta) = got.unwrap();
    assert_eq!(value, b"2".to_vec());
    assert_eq!(meta.version, 2u64.to_be_bytes().to_vec());
}

#[test]
fn start_up_writes_the_marker_and_refuses_a_store_that_lost_its_data() {
    let d = Dir::new("marker");
    let path = d.store();
    let marker = redb_store::marker_path(&path);
    assert_eq!(marker, d.0.join("torpor.id"));
    // Fresh: created, marker written.
    let s = RedbStore::open_checked(&path, 1 << 20).unwrap();
    drop(s);
    assert!(marker.exists());
    // Reopened fine.
    drop(RedbStore::open_checked(&path, 1 << 20).unwrap());
    // Emptied: refused, the file left as it is.
    std::fs::write(&path, b"").unwrap();
    let e = RedbStore::open_checked(&path, 1 << 20).unwrap_err();
    assert!(matches!(e, KvOpenError::MissingData { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("is empty (0 bytes)") && text.contains("torpor.id"),
        "{text}"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    // Deleted: refused too.
    std::fs::remove_file(&path).unwrap();
    let e = RedbStore::open_checked(&path, 1 << 20).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    // Without the marker it is a fresh start again.
    std::fs::remove_file(&marker).unwrap();
    drop(RedbStore::open_checked(&path, 1 << 20).unwrap());
    assert!(marker.exists());
}

#[test]
fn a_store_from_before_the_marker_gets_one() {
    let d = Dir::new("legacy");
    let path = d.store();
    {
        let mut s = RedbStore::open(&path).unwrap();
        s.put_meta(b"m", b"v").unwrap();
    }
    assert!(!redb_store::marker_path(&path).exists());
    let mut s = RedbStore::open_checked(&path, 1 << 20).unwrap();
    assert!(redb_store::marker_path(&path).exists());
    assert_eq!(s.load_meta().unwrap(), vec![(b"m".to_vec(), b"v".to_vec())]);
}

/// A store with some data, closed cleanly; returns its bytes.
fn populated(path: &std::path::Path) -> Vec<u8> {
    let mut s = RedbStore::open_checked(path, 1 << 20).unwrap();
    for i in 0..200u32 {
        let key = format!("key-{i}");
        s.write_batch(&mut |b| {
            apply(
                b,
                &KvLimits::default(),
                &format!("actor-{}", i % 7),
                put(key.as_bytes(), &[i as u8; 300]),
                1,
            )?;
            b.put_meta(key.as_bytes(), &[7u8; 100])
        })
        .unwrap();
    }
    drop(s);
    std::fs::read(path).unwrap()
}

#[test]
fn a_truncated_store_is_refused_as_damaged_without_a_panic() {
    let d = Dir::new("trunc");
    let path = d.store();
    let bytes = populated(&path);
    for len in [4096, bytes.len() / 2, 100] {
        std::fs::write(&path, &bytes[..len]).unwrap();
        match RedbStore::open_checked(&path, 1 << 20) {
            Err(e @ KvOpenError::Damaged { .. }) => {
                assert!(e.to_string().contains("is damaged"), "{e}")
            }
            Err(e) => panic!("truncated to {len}: not reported as damage: {e}"),
            Ok(mut s) => {
                // Only acceptable if everything it holds reads back.
                s.load_meta().unwrap();
            }
        }
    }
}

#[test]
fn random_bytes_in_the_store_are_refused_or_every_record_reads_back() {
    let d = Dir::new("random");
    let path = d.store();
    let bytes = populated(&path);
    let mut refused = 0;
    // The first pages (header, roots) and pages spread over the rest of the file.
    let pages = bytes.len() / 4096;
    let mut offsets: Vec<usize> = (0..4.min(pages)).collect();
    offsets.extend((1..=12).map(|i| i * pages / 13));
    offsets.dedup();
    for page in offsets {
        let offset = page * 4096;
        let mut damaged = bytes.clone();
        let end = (offset + 4096).min(damaged.len());
        for (i, b) in damaged[offset..end].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(151).wrapping_add(offset as u8) ^ 0x5a;
        }
        std::fs::write(&path, &damaged).unwrap();
        match RedbStore::open_checked(&path, 1 << 20) {
            Err(KvOpenError::Damaged { .. }) => refused += 1,
            Err(e) => panic!("damage at {offset}: {e}"),
            Ok(mut s) => {
                // Accepted: the damage hit nothing live, so everything reads back.
                s.load_meta().unwrap();
            }
        }
    }
    assert!(refused > 0, "no damage was detected at all");
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: the server stops under the worker and comes back
// ---------------------------------------------------------------------------------------------

#[test]
fn pg_server_stop_takes_the_store_down_and_its_return_heals_it() {
    let cluster = super::pg_cluster::PgCluster::start().expect("start a cluster");
    let mut settings = PgSettings::new(cluster.url("torpor"));
    settings.connect_timeout = Duration::from_secs(2);
    settings.probe_timeout = Duration::from_secs(2);
    let h = super::pg_store::spawn(settings, KvLimits::default()).unwrap();
    assert_eq!(h.kv_blocking("a", put(b"k", b"1")), KvResponseData::Put);
    h.put_meta_blocking(b"actor/a", b"v1").unwrap();
    assert!(h.is_up());

    cluster.stop();
    // Every request is answered with the store-down error, and the store reports down.
    let r = h.kv_blocking("a", put(b"k", b"2"));
    assert!(message(&r).starts_with("store.unavailable: "), "{r:?}");
    assert!(!h.is_up());
    assert!(message(&h.kv_blocking("a", get(b"k"))).starts_with("store.unavailable"));
    assert!(matches!(
        h.put_meta_blocking(b"actor/b", b"x"),
        Err(KvError::StoreDown(_))
    ));
    // A fire-and-forget record while down is kept and written once the server is back.
    h.submit(Job::PutMeta {
        key: b"actor/c".to_vec(),
        value: b"v1".to_vec(),
        done: None,
    })
    .unwrap();
    assert!(!h.is_up());

    cluster.start_server().expect("restart the server");
    // The worker recovers by itself (probe, reconnect, commit of the kept record).
    wait_until("the store is up again", || h.is_up());
    assert_eq!(h.kv_blocking("a", put(b"k", b"3")), KvResponseData::Put);
    match h.kv_blocking("a", get(b"k")) {
        KvResponseData::Get(g) => assert_eq!(g.values, vec![b"3".to_vec()]),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        h.load_meta_blocking().unwrap(),
        vec![
            (b"actor/a".to_vec(), b"v1".to_vec()),
            (b"actor/c".to_vec(), b"v1".to_vec()),
        ]
    );
    let s = h.stats();
    assert!(s.store_up && s.reopens >= 1, "{s:?}");
    h.shutdown();
}

#[test]
fn pg_server_killed_under_the_worker_is_survived_too() {
    let cluster = super::pg_cluster::PgCluster::start().expect("start a cluster");
    let h = super::pg_store::spawn(PgSettings::new(cluster.url("torpor")), KvLimits::default())
        .unwrap();
    assert_eq!(h.kv_blocking("a", put(b"k", b"1")), KvResponseData::Put);
    cluster.kill();
    // The backend serving the worker's connection may run on until it notices that its
    // postmaster is gone: puts may still commit meanwhile. The first refused one is answered
    // with the store-down error.
    let mut last_stored = b"1".to_vec();
    let mut refused = Vec::new();
    let mut n = 1u64;
    wait_until("a put is refused", || {
        n += 1;
        let v = n.to_string().into_bytes();
        match h.kv_blocking("a", put(b"k", &v)) {
            KvResponseData::Put => {
                last_stored = v;
                false
            }
            r => {
                assert!(message(&r).starts_with("store.unavailable: "), "{r:?}");
                refused = v;
                true
            }
        }
    });
    assert!(!h.is_up());
    cluster.start_server().expect("restart the server");
    wait_until("the store is up again", || h.is_up());
    // Every acknowledged put is there; the refused one may have committed before the
    // connection broke (its outcome was unknown, and it was not acknowledged).
    match h.kv_blocking("a", get(b"k")) {
        KvResponseData::Get(g) => assert!(
            g.values == vec![last_stored.clone()] || g.values == vec![refused.clone()],
            "{g:?}"
        ),
        other => panic!("{other:?}"),
    }
    h.shutdown();
}

#[test]
fn pg_probe_and_reopen_are_bounded_when_the_server_never_answers() {
    let cluster = super::pg_cluster::PgCluster::start().expect("start a cluster");
    let mut settings = PgSettings::new(cluster.url("torpor"));
    settings.connect_timeout = Duration::from_millis(500);
    settings.statement_timeout = Duration::from_millis(500);
    settings.probe_timeout = Duration::from_millis(500);
    let mut store = PgStore::open(settings).unwrap();
    store.probe().unwrap();
    cluster.freeze();
    // The kernel accepts the connection; the frozen postmaster never answers it. Both calls
    // return (with the store-down error) instead of holding the store thread.
    let e = store.probe().unwrap_err();
    assert!(e.is_store_down(), "{e}");
    let e = store.reopen(false).unwrap_err();
    assert!(e.is_store_down(), "{e}");
    cluster.thaw();
    wait_until("the probe succeeds", || store.probe().is_ok());
    store.reopen(false).unwrap();
    store.put_meta(b"k", b"v").unwrap();
    assert_eq!(
        store.load_meta().unwrap(),
        vec![(b"k".to_vec(), b"v".to_vec())]
    );
}
