//! The per-actor KV quota across a crash: a child process writes through the store's worker
//! (every write acknowledged, so committed), then aborts without closing anything — as a
//! kill -9 would leave the file. Reopening it must give the exact usage, and the quota must
//! hold on it.

use std::path::{Path, PathBuf};
use std::process::Command;

use torpor::kv::{self, KvBackend, KvLimits, RedbStore};
use torpor::protocol::{KvDeleteRequest, KvPutRequest, KvRequestData, KvResponseData};

const CHILD_ENV: &str = "TORPOR_KV_QUOTA_CRASH_CHILD";
const QUOTA: u64 = 1000;

fn limits() -> KvLimits {
    KvLimits {
        max_actor_bytes: QUOTA,
        ..KvLimits::default()
    }
}

fn put(pairs: &[(&[u8], &[u8])]) -> KvRequestData {
    KvRequestData::Put(KvPutRequest {
        keys: pairs.iter().map(|p| p.0.to_vec()).collect(),
        values: pairs.iter().map(|p| p.1.to_vec()).collect(),
    })
}

fn usage(store: &mut RedbStore, actor: &str) -> u64 {
    let mut u = None;
    store
        .read_batch(&mut |v| {
            u = Some(v.usage(actor)?);
            Ok(())
        })
        .expect("read usage");
    u.expect("read ran")
}

/// The child's work: acknowledged writes, then an abort with the store still open.
fn child(path: &Path) -> ! {
    let h = kv::spawn(path, limits()).expect("open store");
    let ok = |r: KvResponseData, want: KvResponseData| assert_eq!(r, want);
    ok(
        h.kv_blocking("a", put(&[(b"k1", &[1; 400]), (b"k2", &[2; 400])])),
        KvResponseData::Put,
    );
    ok(
        h.kv_blocking("a", put(&[(b"k1", &[3; 100])])),
        KvResponseData::Put,
    );
    ok(
        h.kv_blocking("b", put(&[(b"x", &[4; 900])])),
        KvResponseData::Put,
    );
    ok(
        h.kv_blocking(
            "b",
            KvRequestData::Delete(KvDeleteRequest {
                keys: vec![b"x".to_vec()],
            }),
        ),
        KvResponseData::Delete,
    );
    let refused = h.kv_blocking("a", put(&[(b"k3", &[5; 500])]));
    assert!(kv::is_quota_refusal(&refused), "{refused:?}");
    // No shutdown, no drop: the worker thread and the open file die with the process.
    std::process::abort();
}

#[test]
fn usage_is_exact_after_a_crash() {
    if let Some(path) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&path));
    }
    let dir: PathBuf =
        std::env::temp_dir().join(format!("torpor-kv-quota-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("kv.redb");
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "usage_is_exact_after_a_crash", "--nocapture"])
        .env(CHILD_ENV, &path)
        .status()
        .expect("run the child");
    // SIGABRT (6): the child got through its writes and checks, then died uncleanly.
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(6),
        "the child aborts after its writes: {status:?}"
    );

    let mut store = RedbStore::open(&path).expect("reopen after the crash");
    // a: k1 (2 + 100) + k2 (2 + 400); b: nothing left.
    assert_eq!(usage(&mut store, "a"), 504);
    assert_eq!(usage(&mut store, "b"), 0);
    drop(store);

    // The quota holds on the reopened file: 504 + 497 > 1000, 504 + 496 fits.
    let h = kv::spawn(&path, limits()).unwrap();
    let r = h.kv_blocking("a", put(&[(b"k3", &[5; 495])]));
    assert!(kv::is_quota_refusal(&r), "{r:?}");
    assert_eq!(
        h.kv_blocking("a", put(&[(b"k3", &[5; 494])])),
        KvResponseData::Put
    );
    assert_eq!(h.stats().quota_refused, 1);
    h.shutdown();
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}
