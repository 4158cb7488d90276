//! Tests of the actor KV store: semantics on every backend (memory, redb, PostgreSQL), limits, durability across reopen,
//! the worker's group commit and failure handling, and a model-based property test.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::mem_store::MemBackend;
use super::*;
use crate::protocol::{
    KvDeleteRangeRequest, KvDeleteRequest, KvGetRequest, KvListPrefixQuery, KvListRangeQuery,
    KvListRequest, KvPutRequest,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("torpor-kv-test-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("kv.redb")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs requests on a backend, one transaction each (or a group in one), with a clock that
/// advances by 1 ms per request.
struct H<B: KvBackend> {
    b: B,
    limits: KvLimits,
    now: i64,
}

impl<B: KvBackend> H<B> {
    fn new(b: B) -> H<B> {
        H {
            b,
            limits: KvLimits::default(),
            now: 1_000,
        }
    }

    fn run(&mut self, actor: &str, req: KvRequestData) -> KvResponseData {
        self.group(vec![(actor.to_string(), req)]).remove(0)
    }

    /// Runs `reqs` in order inside one transaction (a read transaction when none writes).
    fn group(&mut self, reqs: Vec<(String, KvRequestData)>) -> Vec<KvResponseData> {
        let writes = reqs.iter().any(|(_, r)| !is_read_only(r));
        let mut reqs: Vec<Option<(String, KvRequestData)>> = reqs.into_iter().map(Some).collect();
        let mut out = Vec::new();
        let limits = &self.limits;
        let now = &mut self.now;
        let mut f = |v: &mut dyn KvBatch| -> Result<(), KvError> {
            out.clear();
            for slot in reqs.iter_mut() {
                let (actor, req) = slot.take().expect("run once");
                *now += 1;
                out.push(apply(v, limits, &actor, req, *now)?);
            }
            Ok(())
        };
        let r = if writes {
            self.b.write_batch(&mut f)
        } else {
            self.b.read_batch(&mut f)
        };
        r.expect("storage error");
        out
    }

    /// The actor's usage, read in a read transaction.
    fn usage(&mut self, actor: &str) -> u64 {
        let mut u = None;
        self.b
            .read_batch(&mut |v| {
                u = Some(v.usage(actor)?);
                Ok(())
            })
            .expect("storage error");
        u.expect("read ran")
    }
}

/// A store under test with a settable quota, for tests that run on both backends.
trait Quota {
    fn run(&mut self, actor: &str, req: KvRequestData) -> KvResponseData;
    fn usage(&mut self, actor: &str) -> u64;
    fn set_quota(&mut self, bytes: u64);
}

impl<B: KvBackend> Quota for H<B> {
    fn run(&mut self, actor: &str, req: KvRequestData) -> KvResponseData {
        H::run(self, actor, req)
    }
    fn usage(&mut self, actor: &str) -> u64 {
        H::usage(self, actor)
    }
    fn set_quota(&mut self, bytes: u64) {
        self.limits.max_actor_bytes = bytes;
    }
}

/// A PgStore on a fresh database of this process's shared test cluster.
pub(super) fn pg_store(tag: &str) -> PgStore {
    let url = pg_cluster::PgCluster::shared()
        .fresh_database(tag)
        .expect("create a test database");
    PgStore::open(PgSettings::new(url)).expect("open the PostgreSQL store")
}

/// Runs `f` on a fresh MemBackend, a fresh redb store and a fresh PostgreSQL store whose quota
/// is `quota` bytes.
fn both_quota(quota: u64, f: impl Fn(&mut dyn Quota)) {
    let mut mem = H::new(MemBackend::new());
    mem.limits.max_actor_bytes = quota;
    f(&mut mem);
    let dir = TempDir::new("quota");
    let mut redb = H::new(RedbStore::open(&dir.file()).expect("open"));
    redb.limits.max_actor_bytes = quota;
    f(&mut redb);
    let mut pg = H::new(pg_store("quota"));
    pg.limits.max_actor_bytes = quota;
    f(&mut pg);
}

fn k(s: &[u8]) -> Vec<u8> {
    s.to_vec()
}

fn get(keys: &[&[u8]]) -> KvRequestData {
    KvRequestData::Get(KvGetRequest {
        keys: keys.iter().map(|x| x.to_vec()).collect(),
    })
}

fn put(pairs: &[(&[u8], &[u8])]) -> KvRequestData {
    KvRequestData::Put(KvPutRequest {
        keys: pairs.iter().map(|p| p.0.to_vec()).collect(),
        values: pairs.iter().map(|p| p.1.to_vec()).collect(),
    })
}

fn del(keys: &[&[u8]]) -> KvRequestData {
    KvRequestData::Delete(KvDeleteRequest {
        keys: keys.iter().map(|x| x.to_vec()).collect(),
    })
}

fn del_range(start: &[u8], end: &[u8]) -> KvRequestData {
    KvRequestData::DeleteRange(KvDeleteRangeRequest {
        start: start.to_vec(),
        end: end.to_vec(),
    })
}

fn list(query: KvListQuery, reverse: Option<bool>, limit: Option<u64>) -> KvRequestData {
    KvRequestData::List(KvListRequest {
        query,
        reverse,
        limit,
    })
}

fn all() -> KvListQuery {
    KvListQuery::All
}

fn prefix(p: &[u8]) -> KvListQuery {
    KvListQuery::Prefix(KvListPrefixQuery { key: p.to_vec() })
}

fn range(start: &[u8], end: &[u8], exclusive: bool) -> KvListQuery {
    KvListQuery::Range(KvListRangeQuery {
        start: start.to_vec(),
        end: end.to_vec(),
        exclusive,
    })
}

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Keys and values of a Get or List response.
fn pairs(r: &KvResponseData) -> Pairs {
    let (keys, values) = match r {
        KvResponseData::Get(g) => (&g.keys, &g.values),
        KvResponseData::List(l) => (&l.keys, &l.values),
        other => panic!("expected get or list, got {other:?}"),
    };
    assert_eq!(keys.len(), values.len());
    keys.iter().cloned().zip(values.iter().cloned()).collect()
}

fn keys_of(r: &KvResponseData) -> Vec<Vec<u8>> {
    pairs(r).into_iter().map(|p| p.0).collect()
}

fn metadata(r: &KvResponseData) -> Vec<KvMetadata> {
    match r {
        KvResponseData::Get(g) => g.metadata.clone(),
        KvResponseData::List(l) => l.metadata.clone(),
        other => panic!("expected get or list, got {other:?}"),
    }
}

fn error_message(r: &KvResponseData) -> String {
    match r {
        KvResponseData::Error(e) => e.message.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn version(m: &KvMetadata) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&m.version);
    u64::from_be_bytes(b)
}

/// Runs `f` on a fresh MemBackend, a fresh redb store and a fresh PostgreSQL store.
fn both(f: impl Fn(&mut dyn FnMut(&str, KvRequestData) -> KvResponseData)) {
    let mut mem = H::new(MemBackend::new());
    f(&mut |a, r| mem.run(a, r));
    let dir = TempDir::new("both");
    let mut redb = H::new(RedbStore::open(&dir.file()).expect("open"));
    f(&mut |a, r| redb.run(a, r));
    let mut pg = H::new(pg_store("both"));
    f(&mut |a, r| pg.run(a, r));
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

#[test]
fn prefix_successor_drops_trailing_ff() {
    assert_eq!(prefix_successor(b""), None);
    assert_eq!(prefix_successor(&[0xFF, 0xFF]), None);
    assert_eq!(prefix_successor(&[0x01, 0xFF]), Some(vec![0x02]));
    assert_eq!(prefix_successor(&[0x01, 0x02]), Some(vec![0x01, 0x03]));
    assert_eq!(prefix_successor(&[0xFE]), Some(vec![0xFF]));
}

#[test]
fn actor_prefixes_never_collide() {
    let mut a = Vec::new();
    let mut b = Vec::new();
    encode_key("a", b"bc", &mut a).unwrap();
    encode_key("ab", b"c", &mut b).unwrap();
    assert_ne!(a, b);
    assert!(!a.starts_with(&b) && !b.starts_with(&a));
}

#[test]
fn decode_value_refuses_short_records() {
    assert!(matches!(decode_value(&[0; 15]), Err(KvError::Corrupt(_))));
    let v = encode_value(7, -3, b"xy");
    let (m, val) = decode_value(&v).unwrap();
    assert_eq!((version(&m), m.update_ts, val), (7, -3, &b"xy"[..]));
}

// ---------------------------------------------------------------------------------------------
// Semantics, on both backends
// ---------------------------------------------------------------------------------------------

#[test]
fn get_returns_only_existing_keys_in_request_order() {
    both(|run| {
        assert_eq!(
            run("a", put(&[(b"k1", b"v1"), (b"k2", b"v2")])),
            KvResponseData::Put
        );
        let r = run("a", get(&[b"k2", b"missing", b"k1", b"k2"]));
        assert_eq!(
            pairs(&r),
            vec![
                (k(b"k2"), k(b"v2")),
                (k(b"k1"), k(b"v1")),
                (k(b"k2"), k(b"v2"))
            ]
        );
        assert_eq!(metadata(&r).len(), 3);
        assert_eq!(pairs(&run("a", get(&[]))), vec![]);
        assert_eq!(pairs(&run("other", get(&[b"k1"]))), vec![]);
    });
}

#[test]
fn metadata_version_increases_and_overwrite_updates_ts() {
    both(|run| {
        run("a", put(&[(b"x", b"1"), (b"y", b"1")]));
        let m1 = metadata(&run("a", get(&[b"x", b"y"])));
        assert_eq!(m1[0].version.len(), 8);
        assert!(version(&m1[1]) > version(&m1[0]));
        assert_eq!(m1[0].update_ts, m1[1].update_ts, "one put, one timestamp");
        run("a", put(&[(b"x", b"2")]));
        let r = run("a", get(&[b"x", b"y"]));
        assert_eq!(pairs(&r)[0], (k(b"x"), k(b"2")));
        let m2 = metadata(&r);
        assert!(
            version(&m2[0]) > version(&m1[1]),
            "overwrite takes a new version"
        );
        assert!(
            m2[0].update_ts > m1[0].update_ts,
            "overwrite updates the timestamp"
        );
        assert_eq!(m2[1], m1[1], "untouched key keeps its metadata");
        // Delete and re-put: the version is never reused.
        run("a", del(&[b"x"]));
        run("a", put(&[(b"x", b"3")]));
        let m3 = metadata(&run("a", get(&[b"x"])));
        assert!(version(&m3[0]) > version(&m2[0]));
    });
}

#[test]
fn list_all_orders_by_raw_bytes() {
    both(|run| {
        let ks: [&[u8]; 8] = [
            b"b",
            b"",
            &[0xFF],
            &[0x00],
            b"a",
            b"ab",
            &[0x01, 0x02],
            &[0xFF, 0x00],
        ];
        for key in ks {
            run("a", put(&[(key, b"v")]));
        }
        run("b", put(&[(b"zzz", b"other actor")]));
        let mut want: Vec<Vec<u8>> = ks.iter().map(|x| x.to_vec()).collect();
        want.sort();
        assert_eq!(keys_of(&run("a", list(all(), None, None))), want);
        // An empty prefix is All.
        assert_eq!(keys_of(&run("a", list(prefix(b""), None, None))), want);
        want.reverse();
        assert_eq!(keys_of(&run("a", list(all(), Some(true), None))), want);
        assert_eq!(
            keys_of(&run("a", list(all(), Some(false), Some(0)))),
            Vec::<Vec<u8>>::new()
        );
    });
}

#[test]
fn list_prefix_including_all_ff_prefixes() {
    both(|run| {
        let ks: [&[u8]; 8] = [
            &[0xFE],
            &[0xFE, 0xFF],
            &[0xFF],
            &[0xFF, 0x00],
            &[0xFF, 0xFF],
            &[0xFF, 0xFF, 0x00],
            &[0xFF, 0xFF, 0xFF, 0xFF],
            b"pre",
        ];
        for key in ks {
            run("a", put(&[(key, b"v")]));
        }
        // Neighbouring actors must not leak into a 0xFF prefix scan.
        run("b", put(&[(&[0xFF, 0xFF], b"b")]));
        run("", put(&[(&[0xFF], b"empty actor")]));
        let mut l = |p: &[u8]| keys_of(&run("a", list(prefix(p), None, None)));
        assert_eq!(
            l(&[0xFF]),
            vec![
                vec![0xFF],
                vec![0xFF, 0x00],
                vec![0xFF, 0xFF],
                vec![0xFF, 0xFF, 0x00],
                vec![0xFF, 0xFF, 0xFF, 0xFF]
            ]
        );
        assert_eq!(
            l(&[0xFF, 0xFF]),
            vec![
                vec![0xFF, 0xFF],
                vec![0xFF, 0xFF, 0x00],
                vec![0xFF, 0xFF, 0xFF, 0xFF]
            ]
        );
        assert_eq!(l(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF]), Vec::<Vec<u8>>::new());
        assert_eq!(l(&[0xFE]), vec![vec![0xFE], vec![0xFE, 0xFF]]);
        assert_eq!(l(b"pr"), vec![k(b"pre")]);
        assert_eq!(l(b"pref"), Vec::<Vec<u8>>::new());
        let r = run("a", list(prefix(&[0xFF]), Some(true), Some(2)));
        assert_eq!(
            keys_of(&r),
            vec![vec![0xFF, 0xFF, 0xFF, 0xFF], vec![0xFF, 0xFF, 0x00]]
        );
        assert_eq!(
            keys_of(&run("", list(prefix(&[0xFF]), None, None))),
            vec![vec![0xFF]]
        );
        assert_eq!(
            keys_of(&run("b", list(all(), None, None))),
            vec![vec![0xFF, 0xFF]]
        );
    });
}

#[test]
fn list_range_inclusive_exclusive_and_empty() {
    both(|run| {
        for key in [b"a", b"b", b"c", b"d"] {
            run("x", put(&[(key, b"v")]));
        }
        let mut l = |q, rev, lim| keys_of(&run("x", list(q, rev, lim)));
        assert_eq!(
            l(range(b"b", b"d", true), None, None),
            vec![k(b"b"), k(b"c")]
        );
        assert_eq!(
            l(range(b"b", b"d", false), None, None),
            vec![k(b"b"), k(b"c"), k(b"d")]
        );
        assert_eq!(l(range(b"b", b"b", false), None, None), vec![k(b"b")]);
        assert_eq!(
            l(range(b"b", b"b", true), None, None),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(
            l(range(b"d", b"a", false), None, None),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(
            l(range(b"d", b"a", true), None, None),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(
            l(range(b"", b"bb", true), None, None),
            vec![k(b"a"), k(b"b")]
        );
        assert_eq!(
            l(range(b"a", b"d", false), Some(true), Some(2)),
            vec![k(b"d"), k(b"c")],
            "reverse takes the limit from the top"
        );
        assert_eq!(
            l(range(b"a", b"d", true), Some(true), Some(10)),
            vec![k(b"c"), k(b"b"), k(b"a")]
        );
        assert_eq!(
            l(range(b"a", b"d", false), Some(false), Some(1)),
            vec![k(b"a")]
        );
    });
}

#[test]
fn list_default_limit_and_clamp() {
    list_default_limit_and_clamp_on(H::new(MemBackend::new()));
    let dir = TempDir::new("limit");
    list_default_limit_and_clamp_on(H::new(RedbStore::open(&dir.file()).unwrap()));
    list_default_limit_and_clamp_on(H::new(pg_store("limit")));
}

fn list_default_limit_and_clamp_on<B: KvBackend>(mut h: H<B>) {
    h.limits.default_list_limit = 3;
    h.limits.max_list_limit = 5;
    for i in 0u8..10 {
        h.run("a", put(&[(&[i], b"v")]));
    }
    assert_eq!(keys_of(&h.run("a", list(all(), None, None))).len(), 3);
    assert_eq!(keys_of(&h.run("a", list(all(), None, Some(4)))).len(), 4);
    assert_eq!(
        keys_of(&h.run("a", list(all(), None, Some(u64::MAX)))).len(),
        5
    );
    assert_eq!(KvLimits::default().default_list_limit, 16384);
}

#[test]
fn delete_and_delete_range() {
    both(|run| {
        for key in [b"a", b"b", b"c", b"d", b"e"] {
            run("x", put(&[(key, b"v")]));
        }
        run("y", put(&[(b"c", b"y")]));
        assert_eq!(run("x", del(&[b"a", b"missing"])), KvResponseData::Delete);
        assert_eq!(run("x", del_range(b"b", b"d")), KvResponseData::Delete);
        assert_eq!(
            keys_of(&run("x", list(all(), None, None))),
            vec![k(b"d"), k(b"e")]
        );
        // Empty and inverted ranges delete nothing.
        assert_eq!(run("x", del_range(b"d", b"d")), KvResponseData::Delete);
        assert_eq!(run("x", del_range(b"e", b"a")), KvResponseData::Delete);
        assert_eq!(
            keys_of(&run("x", list(all(), None, None))),
            vec![k(b"d"), k(b"e")]
        );
        // An end past every key.
        assert_eq!(run("x", del_range(b"d", &[0xFF])), KvResponseData::Delete);
        assert_eq!(
            keys_of(&run("x", list(all(), None, None))),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(pairs(&run("y", get(&[b"c"]))), vec![(k(b"c"), k(b"y"))]);
    });
}

#[test]
fn drop_touches_only_that_actor() {
    both(|run| {
        run("a", put(&[(b"bc", b"1"), (b"", b"0"), (&[0xFF; 4], b"f")]));
        run("ab", put(&[(b"c", b"2")]));
        run("", put(&[(b"k", b"3")]));
        run("b", put(&[(b"k", b"4")]));
        assert_eq!(run("a", KvRequestData::Drop), KvResponseData::Drop);
        assert_eq!(
            keys_of(&run("a", list(all(), None, None))),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(
            pairs(&run("ab", list(all(), None, None))),
            vec![(k(b"c"), k(b"2"))]
        );
        assert_eq!(
            pairs(&run("", list(all(), None, None))),
            vec![(k(b"k"), k(b"3"))]
        );
        assert_eq!(
            pairs(&run("b", list(all(), None, None))),
            vec![(k(b"k"), k(b"4"))]
        );
        // Dropping an actor without keys is fine.
        assert_eq!(run("nobody", KvRequestData::Drop), KvResponseData::Drop);
    });
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

#[test]
fn every_limit_is_refused_by_name_and_writes_nothing() {
    both(|run| {
        let l = KvLimits::default();
        let big_key = vec![b'k'; l.max_key_size + 1];
        let ok_key = vec![b'k'; l.max_key_size];
        let big_val = vec![0u8; l.max_value_size + 1];
        let ok_val = vec![0u8; l.max_value_size];
        let many: Vec<Vec<u8>> = (0..=l.max_keys_per_call)
            .map(|i| (i as u32).to_be_bytes().to_vec())
            .collect();

        let cases: Vec<(KvRequestData, &str)> = vec![
            (put(&[(b"good", b"v"), (&big_key, b"v")]), "max_key_size"),
            (
                put(&[(b"good", b"v"), (b"bad", &big_val)]),
                "max_value_size",
            ),
            (
                KvRequestData::Put(KvPutRequest {
                    keys: many.clone(),
                    values: many.clone(),
                }),
                "max_keys_per_call",
            ),
            (
                // 8 values of 128 KiB = 1 MiB > 976 KiB.
                KvRequestData::Put(KvPutRequest {
                    keys: (0u8..8).map(|i| vec![i]).collect(),
                    values: vec![ok_val.clone(); 8],
                }),
                "max_put_payload",
            ),
            (
                KvRequestData::Put(KvPutRequest {
                    keys: vec![k(b"a"), k(b"b")],
                    values: vec![k(b"1")],
                }),
                "keys but",
            ),
            (get(&[&big_key]), "max_key_size"),
            (
                KvRequestData::Get(KvGetRequest { keys: many.clone() }),
                "max_keys_per_call",
            ),
            (del(&[&big_key]), "max_key_size"),
            (
                KvRequestData::Delete(KvDeleteRequest { keys: many.clone() }),
                "max_keys_per_call",
            ),
            (del_range(&big_key, b"z"), "max_key_size"),
            (del_range(b"", &big_key), "max_key_size"),
            (list(prefix(&big_key), None, None), "max_key_size"),
            (list(range(b"", &big_key, true), None, None), "max_key_size"),
            (list(range(&big_key, b"", true), None, None), "max_key_size"),
        ];
        run("a", put(&[(b"keep", b"1")]));
        for (req, name) in cases {
            let msg = error_message(&run("a", req));
            assert!(msg.contains(name), "{msg:?} does not name {name}");
        }
        let long_actor = "x".repeat(l.max_actor_id_size + 1);
        assert!(error_message(&run(&long_actor, get(&[b"k"]))).contains("max_actor_id_size"));
        // Nothing of a refused put was written.
        assert_eq!(
            pairs(&run("a", list(all(), None, None))),
            vec![(k(b"keep"), k(b"1"))]
        );
        // Exactly at the limits is accepted.
        assert_eq!(run("a", put(&[(&ok_key, &ok_val)])), KvResponseData::Put);
        let at_count: Vec<Vec<u8>> = many[..l.max_keys_per_call].to_vec();
        assert_eq!(
            run(
                "a",
                KvRequestData::Put(KvPutRequest {
                    keys: at_count.clone(),
                    values: at_count.clone()
                })
            ),
            KvResponseData::Put
        );
        assert_eq!(
            pairs(&run(
                "a",
                KvRequestData::Get(KvGetRequest { keys: at_count })
            ))
            .len(),
            128
        );
    });
}

#[test]
fn put_payload_limit_counts_keys_and_values() {
    let mut h = H::new(MemBackend::new());
    h.limits.max_put_payload = 10;
    assert_eq!(
        h.run("a", put(&[(b"12345", b"12345")])),
        KvResponseData::Put
    );
    let msg = error_message(&h.run("a", put(&[(b"123456", b"12345")])));
    assert!(
        msg.contains("max_put_payload") && msg.contains("11"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// Per-actor quota
// ---------------------------------------------------------------------------------------------

#[test]
fn quota_refuses_a_crossing_put_whole_and_deletes_make_room() {
    both_quota(100, |s| {
        let v40 = [b'v'; 40];
        assert_eq!(s.run("a", put(&[(b"k1", &v40)])), KvResponseData::Put);
        assert_eq!(s.usage("a"), 42);
        // 42 + 2 × 42 = 126 > 100: refused whole, naming the quota.
        let crossing = || put(&[(b"k2", &v40[..]), (b"k3", &v40[..])]);
        let msg = error_message(&s.run("a", crossing()));
        assert!(msg.starts_with(QUOTA_EXCEEDED), "{msg}");
        assert!(
            msg.contains("limits.kv_bytes_per_actor")
                && msg.contains("(limits.kv_bytes_per_actor, 100 bytes)")
                && msg.contains("from 42 to 126 bytes"),
            "{msg}"
        );
        assert_eq!(pairs(&s.run("a", get(&[b"k2", b"k3"]))), vec![]);
        assert_eq!(
            keys_of(&s.run("a", list(all(), None, None))),
            vec![k(b"k1")]
        );
        assert_eq!(s.usage("a"), 42, "nothing of the refused put is counted");
        // The quota is per actor.
        assert_eq!(s.run("b", crossing()), KvResponseData::Put);
        assert_eq!(s.usage("b"), 84);
        // After a delete the same put fits.
        assert_eq!(
            s.run("a", del(&[b"k1", b"missing"])),
            KvResponseData::Delete
        );
        assert_eq!(s.usage("a"), 0);
        assert_eq!(s.run("a", crossing()), KvResponseData::Put);
        assert_eq!(s.usage("a"), 84);
        // Exactly at the quota is accepted, one byte more is not.
        assert_eq!(s.run("a", put(&[(b"k4", &[0u8; 14])])), KvResponseData::Put);
        assert_eq!(s.usage("a"), 100);
        assert!(error_message(&s.run("a", put(&[(b"", b"x")]))).starts_with(QUOTA_EXCEEDED));
        // An empty key and value weigh nothing, even at the quota.
        assert_eq!(s.run("a", put(&[(b"", b"")])), KvResponseData::Put);
        assert_eq!(s.usage("a"), 100);
        assert_eq!(s.usage("nobody"), 0);
    });
}

#[test]
fn quota_counts_overwrites_and_duplicates_by_difference() {
    both_quota(100, |s| {
        assert_eq!(s.run("a", put(&[(b"k", &[1u8; 50])])), KvResponseData::Put);
        assert_eq!(s.usage("a"), 51);
        // 51 → 91: only the difference counts (51 + 91 would exceed 100).
        assert_eq!(s.run("a", put(&[(b"k", &[2u8; 90])])), KvResponseData::Put);
        assert_eq!(s.usage("a"), 91);
        assert_eq!(s.run("a", put(&[(b"k", &[3u8; 10])])), KvResponseData::Put);
        assert_eq!(s.usage("a"), 11);
        // A key written twice in one put counts once, with its last value.
        assert_eq!(
            s.run("a", put(&[(b"x", b"aaaa"), (b"y", b"1"), (b"x", b"bb")])),
            KvResponseData::Put
        );
        assert_eq!(pairs(&s.run("a", get(&[b"x"]))), vec![(k(b"x"), k(b"bb"))]);
        assert_eq!(s.usage("a"), 11 + 3 + 2);
        // Duplicates are counted once in the check too: 16 - 3 + 82 = 95 fits (counting both
        // occurrences would make it 186).
        assert_eq!(
            s.run("a", put(&[(b"x", &[0u8; 90]), (b"x", &[0u8; 81])])),
            KvResponseData::Put
        );
        assert_eq!(s.usage("a"), 11 + 82 + 2);
        // Above a lowered quota, a put that does not raise the usage is still accepted (the
        // actor can shrink), one that raises it is refused.
        s.set_quota(10);
        assert_eq!(s.run("a", put(&[(b"x", b"")])), KvResponseData::Put);
        assert_eq!(s.usage("a"), 11 + 1 + 2);
        assert_eq!(s.run("a", put(&[(b"k", &[4u8; 10])])), KvResponseData::Put);
        assert!(error_message(&s.run("a", put(&[(b"k", &[4u8; 11])]))).starts_with(QUOTA_EXCEEDED));
        assert!(error_message(&s.run("a", put(&[(b"z", b"")]))).starts_with(QUOTA_EXCEEDED));
        assert_eq!(s.usage("a"), 14);
        // A put that moves bytes between keys without growing is fine.
        assert_eq!(
            s.run("a", put(&[(b"k", b""), (b"x", &[5u8; 10])])),
            KvResponseData::Put
        );
        assert_eq!(s.usage("a"), 1 + 11 + 2);
        assert_eq!(pairs(&s.run("a", get(&[b"k"]))), vec![(k(b"k"), k(b""))]);
    });
}

#[test]
fn quota_delete_range_and_drop_free_usage() {
    both_quota(1000, |s| {
        for key in [b"a", b"b", b"c", b"d"] {
            s.run("x", put(&[(key, &[0u8; 9])]));
        }
        s.run("x", put(&[(b"", b"e")]));
        s.run("y", put(&[(b"b", b"12345")]));
        assert_eq!(s.usage("x"), 4 * 10 + 1);
        assert_eq!(s.usage("y"), 6);
        assert_eq!(s.run("x", del_range(b"b", b"d")), KvResponseData::Delete);
        assert_eq!(s.usage("x"), 2 * 10 + 1);
        // Empty ranges and ranges without keys free nothing.
        s.run("x", del_range(b"d", b"b"));
        s.run("x", del_range(b"b", b"c"));
        assert_eq!(s.usage("x"), 21);
        assert_eq!(s.run("x", KvRequestData::Drop), KvResponseData::Drop);
        assert_eq!(s.usage("x"), 0);
        assert_eq!(s.usage("y"), 6, "other actors keep their usage");
        s.run("y", del_range(b"", &[0xFF]));
        assert_eq!(s.usage("y"), 0);
        // A dropped actor starts over with its whole quota.
        assert_eq!(s.run("x", put(&[(b"k", &[0u8; 998])])), KvResponseData::Put);
        assert_eq!(s.usage("x"), 999);
    });
}

#[test]
fn quota_usage_survives_reopen() {
    let dir = TempDir::new("quota-reopen");
    let want = |h: &mut H<RedbStore>| (h.usage("a"), h.usage("b"), h.usage("c"));
    let before;
    {
        let mut h = H::new(RedbStore::open(&dir.file()).unwrap());
        h.limits.max_actor_bytes = 100;
        h.run("a", put(&[(b"k1", &[0u8; 30]), (b"k2", &[0u8; 30])]));
        h.run("a", put(&[(b"k1", &[0u8; 10])]));
        h.run("b", put(&[(b"k", b"v")]));
        h.run("b", del(&[b"k"]));
        h.run("c", put(&[(b"x", b"1"), (b"y", b"2"), (b"z", b"3")]));
        h.run("c", del_range(b"y", b"z"));
        assert!(error_message(&h.run("a", put(&[(b"k3", &[0u8; 60])]))).starts_with(QUOTA_EXCEEDED));
        before = want(&mut h);
        assert_eq!(before, (12 + 32, 0, 4));
    }
    let mut h = H::new(RedbStore::open(&dir.file()).unwrap());
    h.limits.max_actor_bytes = 100;
    assert_eq!(want(&mut h), before);
    // The quota still holds after the reopen.
    assert!(error_message(&h.run("a", put(&[(b"k3", &[0u8; 60])]))).starts_with(QUOTA_EXCEEDED));
    assert_eq!(h.run("a", put(&[(b"k3", &[0u8; 54])])), KvResponseData::Put);
    assert_eq!(h.usage("a"), 100);
}

#[test]
fn quota_usage_is_computed_for_a_file_from_before_quotas() {
    let dir = TempDir::new("quota-rebuild");
    let before;
    {
        let mut h = H::new(RedbStore::open(&dir.file()).unwrap());
        h.run("a", put(&[(b"k1", &[0u8; 30]), (b"k2", b"")]));
        h.run("ab", put(&[(b"c", b"1")]));
        h.run("", put(&[(&[0xFF], b"22")]));
        before = (h.usage("a"), h.usage("ab"), h.usage(""));
        assert_eq!(before, (34, 2, 3));
        h.b.forget_usage().unwrap();
    }
    let mut h = H::new(RedbStore::open(&dir.file()).unwrap());
    assert_eq!((h.usage("a"), h.usage("ab"), h.usage("")), before);
    h.run("a", del(&[b"k1"]));
    assert_eq!(h.usage("a"), 2);
}

#[test]
fn quota_refusals_are_counted_by_the_worker() {
    let limits = KvLimits {
        max_actor_bytes: 10,
        ..KvLimits::default()
    };
    let h = spawn_backend(MemBackend::new(), limits).unwrap();
    assert_eq!(h.limits().max_actor_bytes, 10);
    assert_eq!(
        h.kv_blocking("a", put(&[(b"k", b"123456789")])),
        KvResponseData::Put
    );
    let r = h.kv_blocking("a", put(&[(b"j", b"")]));
    assert!(is_quota_refusal(&r), "{r:?}");
    let big = vec![0u8; 3000];
    assert!(!is_quota_refusal(&h.kv_blocking("a", get(&[&big]))));
    let s = h.stats();
    assert_eq!((s.puts, s.refused, s.quota_refused), (2, 2, 1), "{s:?}");
}

// ---------------------------------------------------------------------------------------------
// Transactions and durability
// ---------------------------------------------------------------------------------------------

#[test]
fn reads_in_a_batch_see_earlier_writes_of_the_batch() {
    let dir = TempDir::new("batch");
    reads_in_a_batch_see_earlier_writes_on(H::new(RedbStore::open(&dir.file()).unwrap()));
    reads_in_a_batch_see_earlier_writes_on(H::new(pg_store("batch")));
}

fn reads_in_a_batch_see_earlier_writes_on<B: KvBackend>(mut h: H<B>) {
    let out = h.group(vec![
        ("a".into(), put(&[(b"k", b"1")])),
        ("a".into(), get(&[b"k"])),
        ("a".into(), put(&[(b"k", b"2")])),
        ("a".into(), list(all(), None, None)),
        ("a".into(), del(&[b"k"])),
        ("a".into(), get(&[b"k"])),
    ]);
    assert_eq!(pairs(&out[1]), vec![(k(b"k"), k(b"1"))]);
    assert_eq!(pairs(&out[3]), vec![(k(b"k"), k(b"2"))]);
    assert_eq!(pairs(&out[5]), vec![]);
}

type WriteFn = dyn FnMut(&mut BatchFn<'_>) -> Result<(), KvError>;

#[test]
fn failed_batch_keeps_nothing() {
    for redb in ["mem", "redb", "pg"] {
        let dir = TempDir::new("abort");
        let mut backend: Box<WriteFn> = match redb {
            "redb" => {
                let mut s = RedbStore::open(&dir.file()).unwrap();
                Box::new(move |f| s.write_batch(f))
            }
            "pg" => {
                let mut s = pg_store("abort");
                Box::new(move |f| s.write_batch(f))
            }
            _ => {
                let mut s = MemBackend::new();
                Box::new(move |f| s.write_batch(f))
            }
        };
        let limits = KvLimits::default();
        backend(&mut |v| {
            apply(v, &limits, "a", put(&[(b"old", b"1")]), 1)?;
            v.put_meta(b"m", b"1")?;
            Ok(())
        })
        .unwrap();
        let r = backend(&mut |v| {
            apply(v, &limits, "a", put(&[(b"new", b"2")]), 2)?;
            apply(v, &limits, "b", put(&[(b"other", b"2")]), 2)?;
            apply(v, &limits, "a", KvRequestData::Drop, 2)?;
            v.put_meta(b"m", b"2")?;
            v.put_meta(b"n", b"2")?;
            Err(KvError::Storage("boom".into()))
        });
        assert_eq!(r, Err(KvError::Storage("boom".into())));
        let mut seen = None;
        backend(&mut |v| {
            let l = apply(v, &limits, "a", list(all(), None, None), 3)?;
            seen = Some((pairs(&l), v.load_meta()?, metadata(&l), v.usage("a")?));
            Ok(())
        })
        .unwrap();
        let (p, meta, md, usage) = seen.unwrap();
        assert_eq!(p, vec![(k(b"old"), k(b"1"))], "redb={redb}");
        assert_eq!(usage, 4, "the usage rolls back with the batch, redb={redb}");
        assert_eq!(meta, vec![(k(b"m"), k(b"1"))], "redb={redb}");
        assert_eq!(version(&md[0]), 1);
    }
}

#[test]
fn redb_reopen_keeps_data_meta_and_version_sequence() {
    let dir = TempDir::new("reopen");
    let v1;
    {
        let mut h = H::new(RedbStore::open(&dir.file()).unwrap());
        h.run("a", put(&[(b"k", b"v"), (b"k2", b"v2")]));
        h.run("b", put(&[(b"k", b"w")]));
        h.run("b", del(&[b"k"]));
        v1 = version(&metadata(&h.run("a", get(&[b"k2"])))[0]);
        h.b.put_meta(b"actor/1", b"record 1").unwrap();
        h.b.put_meta(b"actor/2", b"record 2").unwrap();
        h.b.put_meta(b"actor/0", b"record 0").unwrap();
        h.b.delete_meta(b"actor/2").unwrap();
        h.b.delete_meta(b"missing").unwrap();
    }
    let mut s = RedbStore::open(&dir.file()).unwrap();
    assert_eq!(
        s.load_meta().unwrap(),
        vec![
            (k(b"actor/0"), k(b"record 0")),
            (k(b"actor/1"), k(b"record 1"))
        ]
    );
    assert_eq!(s.kv_len().unwrap(), 2);
    let mut h = H::new(s);
    assert_eq!(
        pairs(&h.run("a", list(all(), None, None))),
        vec![(k(b"k"), k(b"v")), (k(b"k2"), k(b"v2"))]
    );
    assert_eq!(pairs(&h.run("b", get(&[b"k"]))), vec![]);
    h.run("c", put(&[(b"k", b"v")]));
    assert!(
        version(&metadata(&h.run("c", get(&[b"k"])))[0]) > v1,
        "versions continue after reopen"
    );
}

#[test]
fn opening_the_same_file_twice_is_refused() {
    let dir = TempDir::new("twice");
    let first = RedbStore::open(&dir.file()).unwrap();
    match RedbStore::open(&dir.file()) {
        Err(e @ KvOpenError::AlreadyOpen { .. }) => {
            assert!(e.to_string().contains("already open"), "{e}")
        }
        other => panic!("expected AlreadyOpen, got {other:?}"),
    }
    let h = spawn(&dir.file(), KvLimits::default());
    assert!(matches!(h, Err(KvOpenError::AlreadyOpen { .. })));
    drop(first);
    RedbStore::open(&dir.file()).expect("free again once closed");
}

#[test]
fn open_creates_missing_parent_directories() {
    let dir = TempDir::new("parents");
    let path = dir.0.join("a").join("b").join("kv.redb");
    RedbStore::open(&path).unwrap();
    assert!(path.exists());
}

// ---------------------------------------------------------------------------------------------
// Worker
// ---------------------------------------------------------------------------------------------

/// Submits a job whose reply blocks the worker until the returned sender is dropped or sent
/// to; returns once the worker is blocked in it. Everything submitted meanwhile forms one batch.
fn block_worker(h: &KvHandle) -> crossbeam_channel::Sender<()> {
    let (entered_tx, entered_rx) = crossbeam_channel::bounded::<()>(1);
    let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(1);
    h.kv("blocker", get(&[]), move |_| {
        let _ = entered_tx.send(());
        let _ = release_rx.recv();
    })
    .unwrap();
    entered_rx.recv().unwrap();
    release_tx
}

type Log = Arc<Mutex<Vec<(usize, KvResponseData)>>>;

fn logging(log: &Log, i: usize) -> impl FnOnce(KvResponseData) + Send + 'static {
    let log = log.clone();
    move |r| log.lock().unwrap().push((i, r))
}

#[test]
fn group_commit_answers_all_in_order_after_one_commit() {
    let dir = TempDir::new("group");
    let h = spawn(&dir.file(), KvLimits::default()).unwrap();
    let release = block_worker(&h);
    let log: Log = Arc::default();
    let n = 200;
    for i in 0..n {
        let actor = format!("actor-{}", i % 3);
        let key = [(i % 5) as u8];
        let req = if i % 2 == 0 {
            put(&[(&key, &(i as u32).to_be_bytes())])
        } else {
            get(&[&key])
        };
        h.kv(actor, req, logging(&log, i)).unwrap();
    }
    let before = h.stats();
    assert_eq!(before.commits, 0);
    drop(release);
    h.flush_blocking().unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.len(), n);
    // Replies run in submission order, and each get sees exactly the puts submitted before
    // it: compare with a sequential model.
    let mut model: BTreeMap<(usize, u8), u32> = BTreeMap::new();
    for (pos, (i, r)) in log.iter().enumerate() {
        assert_eq!(pos, *i, "replies run in submission order");
        let key = (i % 3, (i % 5) as u8);
        if i % 2 == 0 {
            assert_eq!(*r, KvResponseData::Put);
            model.insert(key, *i as u32);
        } else {
            let want: Pairs = model
                .get(&key)
                .map(|v| vec![(vec![key.1], v.to_be_bytes().to_vec())])
                .unwrap_or_default();
            assert_eq!(pairs(r), want, "reply {i}");
        }
    }
    let s = h.stats();
    assert_eq!(s.commits, 1, "the queued batch committed once: {s:?}");
    assert!(s.max_batch_jobs >= n as u64, "{s:?}");
    assert_eq!((s.puts, s.gets), (100, 101));
    assert!(s.batches >= 2);
    h.shutdown();
}

#[test]
fn failed_commit_acknowledges_nothing() {
    let fail = Arc::new(AtomicBool::new(false));
    let h = spawn_backend(
        MemBackend::with_commit_failures(fail.clone()),
        KvLimits::default(),
    )
    .unwrap();
    assert_eq!(
        h.kv_blocking("a", put(&[(b"old", b"1")])),
        KvResponseData::Put
    );
    let release = block_worker(&h);
    let log: Log = Arc::default();
    h.kv("a", put(&[(b"new", b"2")]), logging(&log, 0)).unwrap();
    h.kv("a", get(&[b"new"]), logging(&log, 1)).unwrap();
    h.kv("b", KvRequestData::Drop, logging(&log, 2)).unwrap();
    let (meta_tx, meta_rx) = crossbeam_channel::bounded(1);
    h.submit(Job::PutMeta {
        key: k(b"m"),
        value: k(b"v"),
        done: Some(Reply::new(move |r| {
            let _ = meta_tx.send(r);
        })),
    })
    .unwrap();
    fail.store(true, Ordering::SeqCst);
    drop(release);
    // The meta write is the last job of the failing batch.
    assert!(matches!(meta_rx.recv().unwrap(), Err(KvError::Storage(_))));
    fail.store(false, Ordering::SeqCst);
    {
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 3);
        for (_, r) in log.iter() {
            assert!(error_message(r).starts_with("kv.storage"), "{r:?}");
        }
    }
    assert_eq!(
        pairs(&h.kv_blocking("a", list(all(), None, None))),
        vec![(k(b"old"), k(b"1"))]
    );
    assert_eq!(h.load_meta_blocking().unwrap(), vec![]);
    let s = h.stats();
    assert_eq!(s.commit_failures, 1);
    assert_eq!(s.failed, 4);
    // The store works again afterwards.
    assert_eq!(
        h.kv_blocking("a", put(&[(b"new", b"3")])),
        KvResponseData::Put
    );
    assert_eq!(
        pairs(&h.kv_blocking("a", get(&[b"new"]))),
        vec![(k(b"new"), k(b"3"))]
    );
}

#[test]
fn read_only_batches_commit_nothing_and_refusals_are_counted() {
    let h = spawn_backend(MemBackend::new(), KvLimits::default()).unwrap();
    h.kv_blocking("a", put(&[(b"k", b"v")]));
    let commits = h.stats().commits;
    h.kv_blocking("a", get(&[b"k"]));
    h.kv_blocking("a", list(all(), None, None));
    let big = vec![0u8; 3000];
    assert!(error_message(&h.kv_blocking("a", get(&[&big]))).contains("max_key_size"));
    let s = h.stats();
    assert_eq!(s.commits, commits);
    assert_eq!((s.gets, s.lists, s.refused), (2, 1, 1));
}

#[test]
fn meta_records_through_the_worker() {
    let dir = TempDir::new("meta");
    {
        let h = spawn(&dir.file(), KvLimits::default()).unwrap();
        h.put_meta_blocking(b"b", b"2").unwrap();
        h.submit(Job::PutMeta {
            key: k(b"a"),
            value: k(b"1"),
            done: None,
        })
        .unwrap();
        h.submit(Job::DeleteMeta {
            key: k(b"b"),
            done: None,
        })
        .unwrap();
        assert_eq!(h.load_meta_blocking().unwrap(), vec![(k(b"a"), k(b"1"))]);
        // One-key reads see the writes queued before them, and skip missing keys.
        let (tx, rx) = std::sync::mpsc::channel();
        h.submit(Job::GetMeta {
            keys: vec![k(b"zz"), k(b"a"), k(b"b")],
            reply: crate::kv::worker::Reply::new(move |r| {
                let _ = tx.send(r);
            }),
        })
        .unwrap();
        assert_eq!(rx.recv().unwrap().unwrap(), vec![(k(b"a"), k(b"1"))]);
        h.delete_meta_blocking(b"zz").unwrap();
        assert_eq!(h.stats().meta_puts, 2);
    }
    let mut s = RedbStore::open(&dir.file()).unwrap();
    assert_eq!(s.load_meta().unwrap(), vec![(k(b"a"), k(b"1"))]);
}

#[test]
fn dropping_the_last_handle_drains_commits_and_releases_the_file() {
    let dir = TempDir::new("drop");
    let h = spawn(&dir.file(), KvLimits::default()).unwrap();
    let h2 = h.clone();
    let answered = Arc::new(AtomicU64::new(0));
    for i in 0u32..50 {
        let a = answered.clone();
        h2.kv("a", put(&[(&i.to_be_bytes(), b"v")]), move |r| {
            assert_eq!(r, KvResponseData::Put);
            a.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    }
    drop(h);
    drop(h2);
    // The worker was joined: every job answered and the file lock released.
    assert_eq!(answered.load(Ordering::SeqCst), 50);
    let mut s = RedbStore::open(&dir.file()).expect("lock released");
    assert_eq!(s.kv_len().unwrap(), 50);
    let _ = s.load_meta().unwrap();
}

#[test]
fn shutdown_drains_then_refuses() {
    let dir = TempDir::new("shutdown");
    let h = spawn(&dir.file(), KvLimits::default()).unwrap();
    let other = h.clone();
    let log: Log = Arc::default();
    for i in 0..10 {
        h.kv("a", put(&[(&[i as u8], b"v")]), logging(&log, i))
            .unwrap();
    }
    h.shutdown();
    assert_eq!(log.lock().unwrap().len(), 10);
    assert!(log
        .lock()
        .unwrap()
        .iter()
        .all(|(_, r)| *r == KvResponseData::Put));
    // After shutdown, a submission is answered at once with kv.unavailable.
    let late: Log = Arc::default();
    assert_eq!(other.kv("a", get(&[b"x"]), logging(&late, 0)), Err(Closed));
    assert!(error_message(&late.lock().unwrap()[0].1).starts_with("kv.unavailable"));
    assert!(other.flush_blocking().is_err());
    other.shutdown(); // idempotent
    drop(other);
    let s = RedbStore::open(&dir.file()).unwrap();
    assert_eq!(s.kv_len().unwrap(), 10);
}

#[test]
fn a_dropped_reply_is_answered_unavailable() {
    let got: Arc<Mutex<Option<KvResponseData>>> = Arc::default();
    let g = got.clone();
    let job = Job::kv("a", get(&[]), move |r| *g.lock().unwrap() = Some(r));
    drop(job);
    let r = got.lock().unwrap().take().unwrap();
    assert!(error_message(&r).starts_with("kv.unavailable"));
}

#[test]
fn shutdown_from_a_reply_callback_does_not_deadlock() {
    let h = spawn_backend(MemBackend::new(), KvLimits::default()).unwrap();
    let inner = h.clone();
    let (tx, rx) = crossbeam_channel::bounded(1);
    h.kv("a", get(&[]), move |_| {
        inner.shutdown();
        drop(inner);
        let _ = tx.send(());
    })
    .unwrap();
    rx.recv().unwrap();
    h.shutdown();
    assert_eq!(h.kv("a", get(&[]), |_| {}), Err(Closed));
}

// ---------------------------------------------------------------------------------------------
// Model-based property test
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Get(Vec<Vec<u8>>),
    Put(Vec<(Vec<u8>, Vec<u8>)>),
    Delete(Vec<Vec<u8>>),
    DeleteRange(Vec<u8>, Vec<u8>),
    Drop,
    ListAll(bool, Option<u64>),
    ListPrefix(Vec<u8>, bool, Option<u64>),
    ListRange(Vec<u8>, Vec<u8>, bool, bool, Option<u64>),
}

fn key_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop::sample::select(vec![0x00u8, 0x01, 0x7F, 0xFE, 0xFF]),
        0..4,
    )
}

fn op_strategy() -> impl Strategy<Value = (usize, Op)> {
    let keys = || prop::collection::vec(key_strategy(), 0..5);
    let limit = || prop::option::of(0u64..6);
    let op = prop_oneof![
        keys().prop_map(Op::Get),
        prop::collection::vec(
            (key_strategy(), prop::collection::vec(any::<u8>(), 0..4)),
            0..5
        )
        .prop_map(Op::Put),
        keys().prop_map(Op::Delete),
        (key_strategy(), key_strategy()).prop_map(|(a, b)| Op::DeleteRange(a, b)),
        Just(Op::Drop),
        (any::<bool>(), limit()).prop_map(|(r, l)| Op::ListAll(r, l)),
        (key_strategy(), any::<bool>(), limit()).prop_map(|(p, r, l)| Op::ListPrefix(p, r, l)),
        (
            key_strategy(),
            key_strategy(),
            any::<bool>(),
            any::<bool>(),
            limit()
        )
            .prop_map(|(a, b, e, r, l)| Op::ListRange(a, b, e, r, l)),
    ];
    (0usize..3, op)
}

const ACTORS: [&str; 3] = ["a", "ab", ""];

fn to_request(op: &Op) -> KvRequestData {
    match op.clone() {
        Op::Get(keys) => KvRequestData::Get(KvGetRequest { keys }),
        Op::Put(p) => KvRequestData::Put(KvPutRequest {
            keys: p.iter().map(|x| x.0.clone()).collect(),
            values: p.into_iter().map(|x| x.1).collect(),
        }),
        Op::Delete(keys) => KvRequestData::Delete(KvDeleteRequest { keys }),
        Op::DeleteRange(s, e) => del_range(&s, &e),
        Op::Drop => KvRequestData::Drop,
        Op::ListAll(r, l) => list(all(), Some(r), l),
        Op::ListPrefix(p, r, l) => list(prefix(&p), Some(r), l),
        Op::ListRange(s, e, x, r, l) => list(range(&s, &e, x), Some(r), l),
    }
}

/// key → (value, version, updateTs)
type ModelMap = BTreeMap<Vec<u8>, (Vec<u8>, u64, i64)>;

/// The quota of the model tests: small, so that puts are refused often.
const MODEL_QUOTA: u64 = 24;

/// How the model answers a put refused by the quota (the store's message is normalized to it).
fn quota_marker() -> KvResponseData {
    KvResponseData::Error(crate::protocol::KvErrorResponse {
        message: QUOTA_EXCEEDED.to_string(),
    })
}

fn model_usage(m: &ModelMap) -> u64 {
    m.iter()
        .map(|(k, (v, _, _))| (k.len() + v.len()) as u64)
        .sum()
}

/// The obvious model: per actor a sorted map of key → (value, version, ts), usage summed over
/// every entry; lists filter every entry.
#[derive(Default)]
struct Model {
    actors: BTreeMap<String, ModelMap>,
    seq: u64,
}

impl Model {
    fn apply(&mut self, actor: &str, op: &Op, now: i64) -> KvResponseData {
        let m = self.actors.entry(actor.to_string()).or_default();
        type Entry<'e> = (&'e Vec<u8>, &'e (Vec<u8>, u64, i64));
        let entries = |it: Vec<Entry<'_>>| -> KvEntries {
            let mut out = KvEntries::default();
            for (k, (v, ver, ts)) in it {
                out.push(
                    k.clone(),
                    v.clone(),
                    KvMetadata {
                        version: ver.to_be_bytes().to_vec(),
                        update_ts: *ts,
                    },
                );
            }
            out
        };
        let listed =
            |m: &ModelMap, pred: &dyn Fn(&[u8]) -> bool, reverse: bool, limit: Option<u64>| {
                let mut v: Vec<_> = m.iter().filter(|(k, _)| pred(k)).collect();
                if reverse {
                    v.reverse();
                }
                v.truncate(limit.unwrap_or(16384) as usize);
                let e = entries(v);
                KvResponseData::List(crate::protocol::KvListResponse {
                    keys: e.keys,
                    values: e.values,
                    metadata: e.metadata,
                })
            };
        match op {
            Op::Get(keys) => {
                let e = entries(keys.iter().filter_map(|k| m.get_key_value(k)).collect());
                KvResponseData::Get(crate::protocol::KvGetResponse {
                    keys: e.keys,
                    values: e.values,
                    metadata: e.metadata,
                })
            }
            Op::Put(p) => {
                let usage = model_usage(m);
                let mut next = m.clone();
                for (k, v) in p {
                    next.insert(k.clone(), (v.clone(), 0, 0));
                }
                let after = model_usage(&next);
                if after > usage && after > MODEL_QUOTA {
                    return quota_marker();
                }
                for (k, v) in p {
                    self.seq += 1;
                    m.insert(k.clone(), (v.clone(), self.seq, now));
                }
                KvResponseData::Put
            }
            Op::Delete(keys) => {
                for k in keys {
                    m.remove(k);
                }
                KvResponseData::Delete
            }
            Op::DeleteRange(s, e) => {
                m.retain(|k, _| !(k >= s && k < e));
                KvResponseData::Delete
            }
            Op::Drop => {
                m.clear();
                KvResponseData::Drop
            }
            Op::ListAll(r, l) => listed(m, &|_| true, *r, *l),
            Op::ListPrefix(p, r, l) => listed(m, &|k| k.starts_with(p), *r, *l),
            Op::ListRange(s, e, x, r, l) => listed(
                m,
                &|k| {
                    k >= s.as_slice()
                        && if *x {
                            k < e.as_slice()
                        } else {
                            k <= e.as_slice()
                        }
                },
                *r,
                *l,
            ),
        }
    }
}

fn check_against_model<B: KvBackend>(
    backend: B,
    ops: &[(usize, Op)],
    chunks: &[usize],
) -> Result<(), TestCaseError> {
    let mut h = H::new(backend);
    h.limits.max_actor_bytes = MODEL_QUOTA;
    let mut model = Model::default();
    let mut now = h.now;
    let mut i = 0;
    let mut c = 0;
    while i < ops.len() {
        let n = chunks
            .get(c)
            .copied()
            .unwrap_or(1)
            .max(1)
            .min(ops.len() - i);
        c += 1;
        let group: Vec<(String, KvRequestData)> = ops[i..i + n]
            .iter()
            .map(|(a, op)| (ACTORS[*a].to_string(), to_request(op)))
            .collect();
        let got = h.group(group);
        for (j, (a, op)) in ops[i..i + n].iter().enumerate() {
            now += 1;
            let want = model.apply(ACTORS[*a], op, now);
            let got = if is_quota_refusal(&got[j]) {
                quota_marker()
            } else {
                got[j].clone()
            };
            prop_assert_eq!(&got, &want, "op {} {:?} on {:?}", i + j, op, ACTORS[*a]);
        }
        for actor in ACTORS {
            let want = model.actors.get(actor).map_or(0, model_usage);
            prop_assert_eq!(
                h.usage(actor),
                want,
                "usage of {:?} after op {}",
                actor,
                i + n - 1
            );
        }
        i += n;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mem_backend_matches_model(
        ops in prop::collection::vec(op_strategy(), 1..60),
        chunks in prop::collection::vec(1usize..6, 0..60),
    ) {
        check_against_model(MemBackend::new(), &ops, &chunks)?;
    }
}

proptest! {
    // Every chunk is a durable commit: keep the case count modest.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn redb_backend_matches_model(
        ops in prop::collection::vec(op_strategy(), 1..60),
        chunks in prop::collection::vec(4usize..16, 0..20),
    ) {
        let dir = TempDir::new("prop");
        check_against_model(RedbStore::open(&dir.file()).unwrap(), &ops, &chunks)?;
    }
}

proptest! {
    // Every chunk is a transaction on a server: keep the case count modest.
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn pg_backend_matches_model(
        ops in prop::collection::vec(op_strategy(), 1..60),
        chunks in prop::collection::vec(4usize..16, 0..20),
    ) {
        check_against_model(pg_store("prop"), &ops, &chunks)?;
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: meta records, durability across reopen and a server restart
// ---------------------------------------------------------------------------------------------

#[test]
fn pg_meta_records_put_delete_load_get() {
    let mut s = pg_store("meta");
    s.put_meta(b"b", b"2").unwrap();
    s.put_meta(b"a", b"1").unwrap();
    s.put_meta(&[0xFF, 0], b"high").unwrap();
    s.put_meta(b"b", b"22").unwrap();
    s.delete_meta(b"missing").unwrap();
    assert_eq!(
        s.load_meta().unwrap(),
        vec![
            (k(b"a"), k(b"1")),
            (k(b"b"), k(b"22")),
            (vec![0xFF, 0], k(b"high"))
        ]
    );
    s.delete_meta(b"a").unwrap();
    let mut got = None;
    s.read_batch(&mut |v| {
        got = Some(v.get_meta(&[k(b"zz"), vec![0xFF, 0], k(b"a"), k(b"b")])?);
        // Writes fail in a read transaction.
        assert!(v.put_meta(b"x", b"y").is_err());
        Ok(())
    })
    .unwrap();
    assert_eq!(
        got.unwrap(),
        vec![(vec![0xFF, 0], k(b"high")), (k(b"b"), k(b"22"))]
    );
}

/// Puts, a meta record and the usage; then checks they are all there after `reopen`.
fn pg_durability_check(reopen: impl FnOnce(PgStore) -> PgStore) {
    let url = pg_cluster::PgCluster::shared()
        .fresh_database("durable")
        .unwrap();
    let mut h = H::new(PgStore::open(PgSettings::new(url.clone())).unwrap());
    h.run("a", put(&[(b"k1", b"v1"), (b"k2", b"v2")]));
    h.run("b", put(&[(b"x", b"yy")]));
    h.b.put_meta(b"actor/1", b"rec").unwrap();
    // The last put of all.
    let v_before = version(&metadata(&h.run("b", get(&[b"x"])))[0]);
    let b = reopen(h.b);
    let mut h = H::new(b);
    assert_eq!(
        pairs(&h.run("a", list(all(), None, None))),
        vec![(k(b"k1"), k(b"v1")), (k(b"k2"), k(b"v2"))]
    );
    assert_eq!(h.usage("a"), 8);
    assert_eq!(h.usage("b"), 3);
    assert_eq!(h.b.load_meta().unwrap(), vec![(k(b"actor/1"), k(b"rec"))]);
    // The version sequence continues where it was.
    h.run("a", put(&[(b"k3", b"v")]));
    let v_after = version(&metadata(&h.run("a", get(&[b"k3"])))[0]);
    assert_eq!(v_after, v_before + 1);
    // And a second store on the same database sees the same data.
    let mut other = H::new(PgStore::open(PgSettings::new(url)).unwrap());
    assert_eq!(keys_of(&other.run("a", list(all(), None, None))).len(), 3);
}

#[test]
fn pg_data_survives_closing_and_reopening_the_store() {
    pg_durability_check(|s| {
        let settings = s.settings().clone();
        drop(s);
        PgStore::open(settings).unwrap()
    });
}

#[test]
fn pg_data_survives_a_restart_of_the_server() {
    let cluster = pg_cluster::PgCluster::start().expect("start a cluster");
    let url = cluster.url("torpor");
    let mut h = H::new(PgStore::open(PgSettings::new(url.clone())).unwrap());
    h.run("a", put(&[(b"k1", b"v1")]));
    h.b.put_meta(b"actor/1", b"rec").unwrap();
    drop(h);
    // An immediate stop: no checkpoint, the committed data comes back from the WAL.
    cluster.stop();
    cluster.start_server().expect("restart the server");
    let mut h = H::new(PgStore::open(PgSettings::new(url)).unwrap());
    assert_eq!(
        pairs(&h.run("a", get(&[b"k1"]))),
        vec![(k(b"k1"), k(b"v1"))]
    );
    assert_eq!(h.usage("a"), 4);
    assert_eq!(h.b.load_meta().unwrap(), vec![(k(b"actor/1"), k(b"rec"))]);
}

#[test]
fn pg_open_refuses_a_bad_url_and_an_unreachable_server() {
    let e = PgStore::open(PgSettings::new("postgres://[nope")).unwrap_err();
    assert!(matches!(e, PgOpenError::BadUrl(_)), "{e}");
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = PgStore::open(PgSettings::new(format!(
        "postgres://u:secret@127.0.0.1:{port}/torpor"
    )))
    .unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, PgOpenError::Connect { .. }), "{m}");
    assert!(m.contains("cannot connect") && !m.contains("secret"), "{m}");
}

#[test]
fn pg_open_refuses_a_database_whose_tables_are_not_torpors() {
    let url = pg_cluster::PgCluster::shared()
        .fresh_database("foreign")
        .unwrap();
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute("CREATE TABLE kv (x int)").unwrap();
    let e = PgStore::open(PgSettings::new(url)).unwrap_err();
    assert!(matches!(e, PgOpenError::Schema { .. }), "{e}");
    assert!(e.to_string().contains("tables"), "{e}");
}
