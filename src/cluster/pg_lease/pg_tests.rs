//! The lease and the fence against a real (throwaway) PostgreSQL server.
//!
//! Waits are for conditions (a lease expired in the database's clock, a backend waiting on a
//! lock), polled with a generous deadline that only bounds a failure.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::{Acquire, PgLease, Renew};
use crate::cluster::lease::{Lease, LeaseAction, LeaseConfig, StoreAnswer};
use crate::kv::pg_cluster::PgCluster;
use crate::kv::pg_store::Fence;
use crate::kv::{KvBackend, KvError, KvLimits, PgSettings, PgStore};
use crate::protocol::{KvPutRequest, KvRequestData, KvResponseData};

/// Bounds every wait for a condition.
const DEADLINE: Duration = Duration::from_secs(60);

fn fresh_db(tag: &str) -> String {
    PgCluster::shared()
        .fresh_database(tag)
        .expect("create a test database")
}

fn lease(url: &str) -> PgLease {
    let mut l = PgLease::new(url, Duration::from_secs(30));
    l.connect().expect("connect the lease client");
    l
}

fn store(url: &str, fence: Option<u64>) -> PgStore {
    let mut s = PgStore::open(PgSettings::new(url)).expect("open the store");
    s.set_fence(fence.map(|epoch| Fence { epoch }));
    s
}

/// Polls `f` until it returns `Some`, at most [`DEADLINE`].
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends the current lease now in the database's clock, as if its time had passed: the tests
/// give leases a long time to live and end them on purpose, so that no outcome depends on how
/// fast the machine runs.
fn expire_now(url: &str) {
    let mut c = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    let n = c
        .execute(
            "UPDATE torpor_lease SET expires_at = clock_timestamp() - interval '1 second' \
             WHERE id = 1",
            &[],
        )
        .expect("expire the lease");
    assert_eq!(n, 1, "a lease row to expire");
}

/// Polls until the lease row has expired in the database's clock.
fn wait_expired(observer: &mut PgLease) {
    wait_for(
        "the lease to expire in the database's clock",
        || match observer.current().expect("read the lease row") {
            Some((_, _, true)) => Some(()),
            _ => None,
        },
    );
}

fn meta(s: &mut PgStore) -> Vec<(Vec<u8>, Vec<u8>)> {
    s.load_meta().expect("load meta")
}

#[test]
fn two_contenders_exactly_one_acquires_then_the_other_after_expiry() {
    let url = fresh_db("lease_two");
    let ttl = Duration::from_secs(60);
    // Both at once: exactly one gets it.
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|node| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut l = lease(&url);
                barrier.wait();
                (node, l.acquire(node, ttl).expect("acquire"))
            })
        })
        .collect();
    let results: Vec<(&str, Acquire)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let winners: Vec<&str> = results
        .iter()
        .filter(|(_, r)| matches!(r, Acquire::Acquired { epoch: 1 }))
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let winner = winners[0];
    let loser = if winner == "a" { "b" } else { "a" };
    for (n, r) in &results {
        if *n == loser {
            assert!(
                matches!(r, Acquire::Held { epoch: 1, .. } | Acquire::Busy),
                "{r:?}"
            );
        }
    }
    let mut w = lease(&url);
    let mut l = lease(&url);
    match l.acquire(loser, ttl).unwrap() {
        Acquire::Held { holder, epoch, .. } => {
            assert_eq!((holder.as_str(), epoch), (winner, 1));
        }
        other => panic!("expected held, got {other:?}"),
    }
    assert_eq!(w.renew(winner, 1, ttl).unwrap(), Renew::Renewed);
    // The winner stops renewing: the other acquires after the expiry, with the next epoch.
    expire_now(&url);
    let epoch = wait_for("the other contender to acquire", || {
        match l.acquire(loser, ttl).expect("acquire") {
            Acquire::Acquired { epoch } => Some(epoch),
            Acquire::Held { .. } | Acquire::Busy => None,
        }
    });
    assert_eq!(epoch, 2);
    assert_eq!(w.renew(winner, 1, ttl).unwrap(), Renew::Lost);
    assert_eq!(l.renew(loser, 2, ttl).unwrap(), Renew::Renewed);
    assert_eq!(
        l.current().unwrap(),
        Some((2, loser.to_string(), false)),
        "the row names the new holder"
    );
}

#[test]
fn a_paused_leaders_fenced_write_is_refused_and_the_new_leaders_succeeds() {
    let url = fresh_db("lease_fence");
    let ttl = Duration::from_secs(60);
    let mut a = lease(&url);
    let mut b = lease(&url);
    assert_eq!(a.acquire("a", ttl).unwrap(), Acquire::Acquired { epoch: 1 });
    let mut store_a = store(&url, Some(1));
    store_a.put_meta(b"placement", b"a1").expect("a leads");
    // A is paused: it renews no more. B acquires after the expiry.
    expire_now(&url);
    let epoch = wait_for("b to acquire", || match b.acquire("b", ttl).unwrap() {
        Acquire::Acquired { epoch } => Some(epoch),
        _ => None,
    });
    assert_eq!(epoch, 2);
    // A resumes and writes: refused, nothing kept.
    let e = store_a
        .write_batch(&mut |v| {
            v.put_meta(b"placement", b"a2")?;
            v.put_meta(b"other", b"a2")
        })
        .unwrap_err();
    assert_eq!(
        e,
        KvError::Fenced {
            epoch: 1,
            current: Some(2)
        }
    );
    assert!(e.to_string().starts_with("kv.fenced"), "{e}");
    assert_eq!(
        meta(&mut store_a),
        vec![(b"placement".to_vec(), b"a1".to_vec())]
    );
    // The store is still usable: B's fenced writes commit.
    let mut store_b = store(&url, Some(2));
    store_b.put_meta(b"placement", b"b").expect("b leads");
    assert_eq!(
        meta(&mut store_b),
        vec![(b"placement".to_vec(), b"b".to_vec())]
    );
    // Once B's lease expires too, B's writes are refused even though no one took over.
    expire_now(&url);
    wait_expired(&mut b);
    assert_eq!(
        store_b.put_meta(b"placement", b"b2").unwrap_err(),
        KvError::Fenced {
            epoch: 2,
            current: Some(2)
        }
    );
}

#[test]
fn a_fenced_write_without_any_lease_is_refused() {
    let url = fresh_db("lease_none");
    let mut s = store(&url, Some(1));
    let e = s.put_meta(b"k", b"v").unwrap_err();
    assert_eq!(
        e,
        KvError::Fenced {
            epoch: 1,
            current: None
        }
    );
    // The table exists but no lease was granted yet: refused the same way.
    lease(&url);
    assert_eq!(s.put_meta(b"k", b"v").unwrap_err(), e);
    s.set_fence(None);
    s.put_meta(b"k", b"v").expect("an unfenced write commits");
    assert_eq!(meta(&mut s), vec![(b"k".to_vec(), b"v".to_vec())]);
}

#[test]
fn a_write_racing_an_acquisition_commits_first_and_the_acquire_waits() {
    let url = fresh_db("lease_race");
    let mut a = lease(&url);
    let mut observer = lease(&url);
    assert_eq!(
        a.acquire("a", Duration::from_secs(60)).unwrap(),
        Acquire::Acquired { epoch: 1 }
    );
    let mut store_a = store(&url, Some(1));
    let (in_tx, in_rx) = crossbeam_channel::bounded::<()>(1);
    let (go_tx, go_rx) = crossbeam_channel::bounded::<()>(1);
    let writer = std::thread::spawn(move || {
        let r = store_a.write_batch(&mut |v| {
            v.put_meta(b"placement", b"a")?;
            // The fence check ran: the row is locked FOR KEY SHARE until the commit.
            let _ = in_tx.send(());
            let _ = go_rx.recv_timeout(DEADLINE);
            Ok(())
        });
        (r, store_a)
    });
    in_rx
        .recv_timeout(DEADLINE)
        .expect("a's write transaction started");
    // The lease expires while A's write is open (an update of `expires_at` does not conflict
    // with A's key-share lock); B tries to take over.
    expire_now(&url);
    wait_expired(&mut observer);
    let (b_tx, b_rx) = crossbeam_channel::bounded(1);
    let b_url = url.clone();
    let acquirer = std::thread::spawn(move || {
        let mut b = lease(&b_url);
        let _ = b_tx.send(b.acquire("b", Duration::from_secs(30)));
    });
    // B's acquire waits on the row lock held by A's open write.
    let mut probe = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    wait_for("b's acquire to wait on a's row lock", || {
        let n: i64 = probe
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'torpor-lease' AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .get(0);
        (n == 1).then_some(())
    });
    assert!(
        b_rx.try_recv().is_err(),
        "b acquired while a's write was open"
    );
    go_tx.send(()).unwrap();
    let (r, mut store_a) = writer.join().unwrap();
    r.expect("a's write commits: it came before the acquisition");
    let acquired = b_rx.recv_timeout(DEADLINE).expect("b answered").unwrap();
    assert_eq!(acquired, Acquire::Acquired { epoch: 2 });
    acquirer.join().unwrap();
    // A's write is there for the new leader to restore from; A's next write is refused.
    let mut store_b = store(&url, Some(2));
    assert_eq!(
        meta(&mut store_b),
        vec![(b"placement".to_vec(), b"a".to_vec())]
    );
    assert_eq!(
        store_a.put_meta(b"placement", b"a2").unwrap_err(),
        KvError::Fenced {
            epoch: 1,
            current: Some(2)
        }
    );
}

#[test]
fn the_worker_answers_fenced_without_marking_the_store_down_or_keeping_records() {
    let url = fresh_db("lease_worker");
    let ttl = Duration::from_secs(30);
    let mut b = lease(&url);
    assert_eq!(b.acquire("b", ttl).unwrap(), Acquire::Acquired { epoch: 1 });
    // A deposed leader still fenced with epoch 0.
    let handle = crate::kv::spawn_backend(store(&url, Some(0)), KvLimits::default()).unwrap();
    let e = handle.put_meta_blocking(b"k", b"v").unwrap_err();
    assert!(e.is_fenced(), "{e:?}");
    assert!(
        handle.is_up(),
        "a fenced write does not take the store down"
    );
    let resp = handle.kv_blocking(
        "actor",
        KvRequestData::Put(KvPutRequest {
            keys: vec![b"x".to_vec()],
            values: vec![b"y".to_vec()],
        }),
    );
    match resp {
        KvResponseData::Error(e) => assert!(e.message.starts_with("kv.fenced"), "{}", e.message),
        other => panic!("expected an error, got {other:?}"),
    }
    // A fire-and-forget record of the deposed leader is dropped, not retried: once its batch
    // failed, a flush (nothing left to write) succeeds.
    let failures = handle.stats().commit_failures;
    handle
        .submit(crate::kv::Job::PutMeta {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            done: None,
        })
        .unwrap();
    wait_for("the fire-and-forget batch to fail", || {
        (handle.stats().commit_failures > failures).then_some(())
    });
    handle.flush_blocking().expect("nothing kept to retry");
    assert!(handle.is_up());
    assert!(handle.load_meta_blocking().unwrap().is_empty());
    handle.shutdown();
}

/// Runs the machine's requests against the real lease until it asks for nothing more.
fn drive(
    l: &mut Lease,
    pg: &mut PgLease,
    node: &str,
    db_ttl: Duration,
    now: Instant,
) -> Vec<LeaseAction> {
    let mut all = Vec::new();
    let mut actions = l.tick(now);
    while !actions.is_empty() {
        let mut next = Vec::new();
        for a in actions {
            all.push(a);
            let answer = match a {
                LeaseAction::TryAcquire => Some(match pg.acquire(node, db_ttl) {
                    Ok(Acquire::Acquired { epoch }) => StoreAnswer::Acquired { epoch },
                    Ok(_) => StoreAnswer::Held,
                    Err(_) => StoreAnswer::Error,
                }),
                LeaseAction::Renew { epoch } => Some(match pg.renew(node, epoch, db_ttl) {
                    Ok(Renew::Renewed) => StoreAnswer::Renewed,
                    Ok(Renew::Lost) => StoreAnswer::Lost,
                    Err(_) => StoreAnswer::Error,
                }),
                LeaseAction::BecameLeader { .. } | LeaseAction::StepDown { .. } => None,
            };
            if let Some(answer) = answer {
                next.extend(l.on_answer(now, answer));
            }
        }
        actions = next;
    }
    all
}

#[test]
fn the_machine_on_the_real_lease_steps_down_when_the_database_stops_and_leads_again() {
    let cluster = PgCluster::start().expect("start a cluster");
    cluster.create_database("lease").unwrap();
    let url = cluster.url("lease");
    let cfg = LeaseConfig {
        ttl: Duration::from_millis(1000),
        renew_every: Duration::from_millis(200),
        safety_margin: Duration::from_millis(100),
        retry_every: Duration::from_millis(100),
    };
    cfg.validate().unwrap();
    let step = Duration::from_millis(50);
    // The machines' clock is fake: it moves `step` per round. The database grants a minute
    // (longer than the machines believe, which is the safe direction), so that no outcome
    // depends on how fast rounds run in real time; the test ends the lease on purpose.
    let db_ttl = Duration::from_secs(60);
    let t0 = Instant::now();
    let mut t = t0;
    let names = ["a", "b"];
    let mut nodes: Vec<(Lease, PgLease)> = names
        .iter()
        .map(|_| {
            (
                Lease::new(cfg, t0),
                PgLease::new(url.as_str(), Duration::from_secs(5)),
            )
        })
        .collect();
    let round = |nodes: &mut Vec<(Lease, PgLease)>, t: Instant| -> Vec<Vec<LeaseAction>> {
        nodes
            .iter_mut()
            .zip(names)
            .map(|((l, pg), n)| drive(l, pg, n, db_ttl, t))
            .collect()
    };
    let leaders = |nodes: &Vec<(Lease, PgLease)>, t: Instant| -> Vec<u64> {
        nodes
            .iter()
            .filter_map(|(l, _)| l.leader_epoch(t))
            .collect()
    };
    // Phase 1: one leader, renewing.
    for _ in 0..40 {
        round(&mut nodes, t);
        assert_eq!(leaders(&nodes, t), vec![1], "one leader with epoch 1");
        t += step;
    }
    let leader = nodes
        .iter()
        .position(|(l, _)| l.is_leader(t - step))
        .unwrap();
    // Phase 2: the database stops; the leader steps down by its deadline.
    cluster.stop();
    let deadline = match nodes[leader].0.role() {
        crate::cluster::lease::Role::Leader { valid_until, .. } => valid_until,
        other => panic!("not leading: {other:?}"),
    };
    let mut stepped = None;
    while t < deadline + cfg.ttl {
        let out = round(&mut nodes, t);
        if out[leader].contains(&LeaseAction::StepDown { epoch: 1 }) {
            stepped = Some(t);
        }
        if t >= deadline {
            assert!(
                leaders(&nodes, t).is_empty(),
                "no one leads without the database"
            );
        }
        t += step;
    }
    let stepped = stepped.expect("the leader stepped down");
    assert!(
        stepped >= deadline && stepped < deadline + step,
        "stepped down at the first tick past the deadline"
    );
    // Phase 3: the database returns; some node leads again with a new epoch.
    cluster.start_server().expect("restart the server");
    // The old leader's grant outlives the outage in the database's clock: end it.
    expire_now(&url);
    let epoch = wait_for("a node to lead again", || {
        round(&mut nodes, t);
        let l = leaders(&nodes, t);
        assert!(l.len() <= 1, "two leaders: {l:?}");
        t += step;
        l.first().copied()
    });
    assert_eq!(epoch, 2);
}
