//! Durable actors: store ops, restore after a restart, hibernating records, destroy and
//! retention across restarts, unusable records, and the KV gate.

use super::*;

fn record_in(store: &Store, id: &str) -> ActorRecord {
    ActorRecord::decode(&store[&actor_key(id)]).expect("record")
}

fn get_actor_json(e: &mut Engine, id: &str, t: Instant) -> Value {
    let (status, v, _) = call(
        e,
        "GET",
        "/actors",
        &[NS, ("actor_ids", id)],
        Value::Null,
        t,
    );
    assert_eq!(status, 200);
    v["actors"][0].clone()
}

#[test]
fn store_ops_are_one_record_per_actor_per_flush_in_order() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    assert!(e.take_store_ops().is_empty(), "runners are not durable");
    let (info, _) = e
        .create_actor(
            CreateActor {
                namespace: "default".into(),
                name: "counter".into(),
                key: Some("x".into()),
                runner_name: None,
                input: Some(vec![1, 2, 3]),
                crash_policy: CrashPolicy::Restart,
            },
            t0,
        )
        .unwrap();
    let id = info.actor_id;
    // Created and allocated in one call: the input, then one actor record.
    let ops = e.take_store_ops();
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert_eq!(
        ops[0],
        StoreOp::Put {
            key: format!("engine/input/{id}").into_bytes(),
            value: vec![1, 2, 3]
        }
    );
    let StoreOp::Put { key, value } = &ops[1] else {
        panic!("put expected");
    };
    assert_eq!(key, &format!("engine/actor/{id}").into_bytes());
    let rec = ActorRecord::decode(value).unwrap();
    assert_eq!(
        rec,
        ActorRecord {
            v: 1,
            id: id.clone(),
            seq: 0,
            namespace: "default".into(),
            name: "counter".into(),
            key: Some("x".into()),
            runner_name: "default".into(),
            crash_policy: "restart".into(),
            create_ts: T0_MS,
            input: true,
            generation: 0,
            allocated: true,
            destroy_requested: false,
            alarm_ts: None,
            start_ts: Some(T0_MS),
            pending_allocation_ts: None,
            sleep_ts: None,
            destroy_ts: None,
            hibernating: vec![],
        }
    );
    // Running is not durable (a restarted gateway has it asleep anyway).
    e.runner_events(c(1), vec![ev(&id, 0, 0, running())], t0);
    assert!(e.take_store_ops().is_empty());
    // Alarm, sleep and stop in one batch: one record.
    e.runner_events(
        c(1),
        vec![
            ev(&id, 0, 1, alarm(Some(T0_MS + 5_000))),
            ev(&id, 0, 2, intent(ActorIntent::Sleep)),
        ],
        t0,
    );
    e.runner_events(c(1), vec![ev(&id, 0, 3, stopped(StopCode::Ok))], t0);
    let ops = e.take_store_ops();
    assert_eq!(ops.len(), 1);
    // The same alarm again changes nothing. The wake reads the input from the store: the
    // start waits for it.
    let a = e.resolve(&id, 1, t0).1;
    e.take_store_ops();
    assert!(starts(&a).is_empty(), "{a:?}");
    assert_eq!(e.take_input_loads(), vec![id.clone()]);
    let a = e.input_loaded(&id, Some(vec![1, 2, 3]), t0);
    let (checkpoint, s) = start_of(&a);
    assert_eq!(checkpoint, cp(&id, 1, 0));
    assert_eq!(s.config.input, Some(vec![1, 2, 3]));
    e.runner_events(
        c(1),
        vec![
            ev(&id, 1, 0, running()),
            ev(&id, 1, 1, alarm(Some(T0_MS + 5_000))),
        ],
        t0,
    );
    assert!(e.take_store_ops().is_empty());
    // Destroy: the record (destroyed), then the input is deleted; after retention both gone.
    e.destroy_actor("default", &id, t0).unwrap();
    let ops = e.take_store_ops();
    assert_eq!(ops.len(), 1, "destroy asked: {ops:?}");
    assert!(record_in_ops(&ops).destroy_requested);
    e.runner_events(c(1), vec![ev(&id, 1, 2, stopped(StopCode::Ok))], t0);
    let ops = e.take_store_ops();
    assert_eq!(ops.len(), 2, "{ops:?}");
    let rec = record_in_ops(&ops);
    assert_eq!(rec.destroy_ts, Some(T0_MS));
    assert!(!rec.input && !rec.destroy_requested && rec.alarm_ts.is_none());
    assert_eq!(
        ops[1],
        StoreOp::Delete {
            key: input_key(&id)
        }
    );
    e.tick(secs(t0, 601.0));
    assert_eq!(
        e.take_store_ops(),
        vec![StoreOp::Delete {
            key: actor_key(&id)
        }]
    );
}

fn record_in_ops(ops: &[StoreOp]) -> ActorRecord {
    ops.iter()
        .find_map(|op| match op {
            StoreOp::Put { key, value } if key.starts_with(ACTOR_KEY_PREFIX) => {
                Some(ActorRecord::decode(value).unwrap())
            }
            _ => None,
        })
        .expect("an actor record")
}

#[test]
fn forgotten_before_a_flush_deletes_input_and_record() {
    let cfg = EngineConfig {
        destroyed_retention: Duration::ZERO,
        ..EngineConfig::default()
    };
    let t0 = Instant::now();
    let mut e = Engine::new(cfg, 1, t0, T0_MS);
    let mut store = Store::new();
    let (info, _) = e
        .create_actor(
            CreateActor {
                namespace: "default".into(),
                name: "n".into(),
                key: None,
                runner_name: None,
                input: Some(vec![7]),
                crash_policy: CrashPolicy::Sleep,
            },
            t0,
        )
        .unwrap();
    flush(&mut e, &mut store);
    assert_eq!(store.len(), 2);
    e.destroy_actor("default", &info.actor_id, t0).unwrap();
    e.tick(t0);
    assert!(e.actor(&info.actor_id).is_none());
    flush(&mut e, &mut store);
    assert!(store.is_empty(), "{store:?}");
}

#[test]
fn restore_gives_the_same_api_view() {
    let (mut e, t0) = new_engine();
    let mut store = Store::new();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    // Sleeping with an alarm, after two generations.
    let (sleeper, _) = create(&mut e, "counter", Some("s"), t0);
    e.runner_events(c(1), vec![ev(&sleeper, 0, 0, running())], t0);
    e.runner_events(
        c(1),
        vec![
            ev(&sleeper, 0, 1, intent(ActorIntent::Sleep)),
            ev(&sleeper, 0, 2, stopped(StopCode::Ok)),
        ],
        t0,
    );
    e.resolve(&sleeper, 1, secs(t0, 1.0));
    e.runner_events(c(1), vec![ev(&sleeper, 1, 0, running())], secs(t0, 1.0));
    e.runner_events(
        c(1),
        vec![
            ev(&sleeper, 1, 1, alarm(Some(T0_MS + 3_600_000))),
            ev(&sleeper, 1, 2, intent(ActorIntent::Sleep)),
            ev(&sleeper, 1, 3, stopped(StopCode::Ok)),
        ],
        secs(t0, 2.0),
    );
    // Running when the process ends.
    let (runner, _) = create(&mut e, "counter", Some("r"), secs(t0, 3.0));
    e.runner_events(c(1), vec![ev(&runner, 0, 0, running())], secs(t0, 3.0));
    // Destroyed.
    let (gone, _) = create(&mut e, "counter", Some("g"), secs(t0, 4.0));
    e.destroy_actor("default", &gone, secs(t0, 4.0));
    e.runner_events(
        c(1),
        vec![ev(&gone, 0, 0, stopped(StopCode::Ok))],
        secs(t0, 4.0),
    );
    // Waiting for a runner that never came.
    let (waiting, _) = e
        .create_actor(
            CreateActor {
                namespace: "default".into(),
                name: "other".into(),
                key: None,
                runner_name: Some("elsewhere".into()),
                input: Some(b"hello".to_vec()),
                crash_policy: CrashPolicy::Destroy,
            },
            secs(t0, 5.0),
        )
        .unwrap();
    let waiting = waiting.actor_id;
    flush(&mut e, &mut store);

    let list = |e: &mut Engine, t: Instant| {
        call(
            e,
            "GET",
            "/actors",
            &[NS, ("include_destroyed", "true")],
            Value::Null,
            t,
        )
        .1
    };
    let before = list(&mut e, secs(t0, 6.0));
    let runner_before = get_actor_json(&mut e, &runner, secs(t0, 6.0));

    let (mut e2, t1, report) = restarted(&store, 10);
    assert_eq!(
        report,
        RestoreReport {
            live: 3,
            destroyed: 1,
            ..RestoreReport::default()
        }
    );
    assert!(e2.take_store_ops().is_empty(), "restore writes nothing");
    let after = list(&mut e2, t1);
    // Same actors, same order, same fields; only the running one is now asleep.
    let b = before["actors"].as_array().unwrap();
    let a = after["actors"].as_array().unwrap();
    assert_eq!(a.len(), 4);
    for (x, y) in b.iter().zip(a) {
        if x["actor_id"] == runner.as_str() {
            continue;
        }
        assert_eq!(x, y);
    }
    let mut expect = runner_before.clone();
    expect["sleep_ts"] = json!(T0_MS + 10_000);
    expect["connectable_ts"] = Value::Null;
    assert_eq!(get_actor_json(&mut e2, &runner, t1), expect);
    assert_eq!(before["pagination"], after["pagination"]);

    // Key lookups work; the destroyed key is free.
    for (key, id) in [("s", &sleeper), ("r", &runner)] {
        let info = e2.actor_by_key("default", "counter", key).expect("by key");
        assert_eq!(&info.actor_id, id);
        assert_eq!(info.status, ActorStatus::Sleeping);
    }
    assert!(e2.actor_by_key("default", "counter", "g").is_none());
    let (_, v, _) = call(
        &mut e2,
        "GET",
        "/actors",
        &[NS, ("name", "counter"), ("key", "s")],
        Value::Null,
        t1,
    );
    assert_eq!(v["actors"][0]["actor_id"], sleeper.as_str());
    let (st, _, _) = call(
        &mut e2,
        "POST",
        "/actors",
        &[NS],
        json!({"name": "counter", "key": "r", "runner_name_selector": "default"}),
        t1,
    );
    assert_eq!(st, 400, "the restored key is taken");

    // Generations continue; inputs come back; crash policies too.
    let a = e2.runner_init(c(1), "default", "k1", init("default", 10), t1);
    assert!(starts(&a).is_empty(), "nothing runs without demand");
    let (_, a) = e2.resolve(&sleeper, 1, t1);
    assert_eq!(start_of(&a).0, cp(&sleeper, 2, 0));
    let (_, a) = e2.resolve(&runner, 2, t1);
    assert_eq!(start_of(&a).0, cp(&runner, 1, 0));
    e2.runner_init(c(2), "default", "k2", init("elsewhere", 10), t1);
    let (_, a) = e2.resolve(&waiting, 3, t1);
    assert!(
        starts(&a).is_empty(),
        "the start waits for the stored input"
    );
    let a = feed_inputs(&mut e2, &store, t1);
    let (checkpoint, s) = start_of(&a);
    assert_eq!(checkpoint, cp(&waiting, 0, 0), "never allocated before");
    assert_eq!(s.config.input.as_deref(), Some(&b"hello"[..]));
    assert_eq!(s.config.create_ts, T0_MS + 5_000);
    e2.runner_events(c(2), vec![ev(&waiting, 0, 0, stopped(StopCode::Error))], t1);
    assert_eq!(status(&e2, &waiting), ActorStatus::Destroyed);
    // New actors do not reuse listing positions.
    let (fresh, _) = create(&mut e2, "counter", Some("new"), t1);
    let after = list(&mut e2, t1);
    assert_eq!(after["actors"][4]["actor_id"], fresh.as_str());
}

#[test]
fn alarm_fires_after_restore_and_wakes_with_the_next_generation() {
    let (mut e, t0, id, _) = running_actor();
    let mut store = Store::new();
    e.runner_events(c(1), vec![ev(&id, 0, 1, alarm(Some(T0_MS + 60_000)))], t0);
    flush(&mut e, &mut store);

    // Restart 10 s later: the alarm is 50 s away.
    let (mut e2, t1, _) = restarted(&store, 10);
    assert_eq!(e2.next_deadline(), Some(secs(t1, 50.0)));
    e2.runner_init(c(1), "default", "k1", init("default", 10), t1);
    assert!(starts(&e2.tick(secs(t1, 49.9))).is_empty());
    let a = e2.tick(secs(t1, 50.0));
    assert_eq!(start_of(&a).0, cp(&id, 1, 0));
    let a = e2.runner_events(c(1), vec![ev(&id, 1, 0, running())], secs(t1, 50.0));
    assert!(a.contains(&Action::ActorRunning {
        actor_id: id.clone(),
        generation: 1,
        runner_idx: 0
    }));
    let mut store2 = store.clone();
    flush(&mut e2, &mut store2);
    let rec = record_in(&store2, &id);
    assert_eq!((rec.generation, rec.alarm_ts), (1, None));

    // Restart after the alarm time: it fires at the first tick.
    let (mut e3, t3, _) = restarted(&store, 120);
    assert_eq!(e3.next_deadline(), Some(t3));
    e3.runner_init(c(1), "default", "k1", init("default", 10), t3);
    assert_eq!(start_of(&e3.tick(t3)).0, cp(&id, 1, 0));
}

#[test]
fn hibernating_records_survive_a_restart_with_their_age() {
    let (mut e, t0, id, _) = running_actor();
    let mut store = Store::new();
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    e.hibernating_upsert(&id, hib(1), t0);
    e.hibernating_upsert(&id, hib(2), t0);
    e.hibernating_upsert(&id, hib(3), t0);
    e.hibernating_remove(&id, hib(3));
    e.hibernating_upsert(&id, hib(2), secs(t0, 40.0)); // refreshed
    flush(&mut e, &mut store);
    // One key per socket, the actor record has none.
    assert!(record_in(&store, &id).hibernating.is_empty());
    assert_eq!(
        hib_entries(&store),
        vec![
            (hib_key(&id, hib(1)), T0_MS),
            (hib_key(&id, hib(2)), T0_MS + 40_000)
        ]
    );

    // Restart at 60 s: both still fresh, with their age kept.
    let (mut e2, t1, _) = restarted(&store, 60);
    assert_eq!(e2.hibernating(&id).len(), 2);
    e2.runner_init(c(1), "default", "k1", init("default", 10), t1);
    // 35 s later (95 s after t0) only the refreshed one (55 s old) is eligible.
    let (r, a) = e2.wake(&id, secs(t1, 35.0));
    assert!(matches!(r, Resolve::Pending { .. }));
    let (checkpoint, s) = start_of(&a);
    assert_eq!(checkpoint, cp(&id, 1, 0));
    assert_eq!(s.hibernating_requests, vec![hib(2)]);

    // Restart at 100 s: the first is dropped at once.
    let (e3, _, _) = restarted(&store, 100);
    assert_eq!(
        e3.hibernating(&id)
            .into_iter()
            .map(|(h, _)| h)
            .collect::<Vec<_>>(),
        vec![hib(2)]
    );
}

/// The hibernating records in a store: (key, last seen ms).
fn hib_entries(store: &Store) -> Vec<(Vec<u8>, i64)> {
    store
        .iter()
        .filter(|(k, _)| k.starts_with(HIB_KEY_PREFIX))
        .map(|(k, v)| (k.clone(), i64::from_le_bytes(v[..].try_into().unwrap())))
        .collect()
}

#[test]
fn opening_a_socket_writes_the_same_few_bytes_however_many_the_actor_has() {
    let (mut e, t0, id, _) = running_actor();
    let mut store = Store::new();
    flush(&mut e, &mut store);
    let bytes_of = |ops: &[StoreOp]| -> usize {
        ops.iter()
            .map(|op| match op {
                StoreOp::Put { key, value } => key.len() + value.len(),
                StoreOp::Delete { key } => key.len(),
            })
            .sum()
    };
    let mut first = 0;
    for n in 0..20_000u32 {
        let h = HibernatingRequest {
            gateway_id: [1, 2, 3, 4],
            request_id: n.to_be_bytes(),
        };
        assert!(e.hibernating_upsert(&id, h, t0));
        let ops = e.take_store_ops();
        let b = bytes_of(&ops);
        if n == 0 {
            first = b;
        }
        assert_eq!(ops.len(), 1, "socket {n}: {ops:?}");
        assert_eq!(b, first, "socket {n} wrote more than the first");
        apply_ops(&mut store, ops);
    }
    assert_eq!(hib_entries(&store).len(), 20_000);
    // A close deletes its one key.
    e.hibernating_remove(
        &id,
        HibernatingRequest {
            gateway_id: [1, 2, 3, 4],
            request_id: 7u32.to_be_bytes(),
        },
    );
    let ops = e.take_store_ops();
    assert_eq!(ops.len(), 1);
    assert!(matches!(&ops[0], StoreOp::Delete { .. }));
}

#[test]
fn hibernating_records_of_an_earlier_version_move_to_their_own_keys() {
    let (mut e, t0, id, _) = running_actor();
    let mut store = Store::new();
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    flush(&mut e, &mut store);
    // The record as an earlier version wrote it: the sockets inside.
    let mut rec = record_in(&store, &id);
    rec.hibernating = vec![HibernatingRecord {
        gateway_id: [9, 9, 9, 9],
        request_id: [0, 0, 0, 5],
        last_seen_ms: T0_MS + 1_000,
    }];
    store.insert(actor_key(&id), rec.encode());
    assert!(String::from_utf8(rec.encode())
        .unwrap()
        .contains("hibernating"));

    let (mut e2, _, _) = restarted(&store, 10);
    assert_eq!(
        e2.hibernating(&id)
            .into_iter()
            .map(|(h, _)| h)
            .collect::<Vec<_>>(),
        vec![hib(5)]
    );
    flush(&mut e2, &mut store);
    assert!(record_in(&store, &id).hibernating.is_empty());
    assert_eq!(
        hib_entries(&store),
        vec![(hib_key(&id, hib(5)), T0_MS + 1_000)]
    );
    // And a second restart reads them from there.
    let (e3, _, _) = restarted(&store, 20);
    assert_eq!(e3.hibernating(&id).len(), 1);
}

#[test]
fn hibernating_records_go_with_their_actor() {
    let (mut e, t0, id, _) = running_actor();
    let mut store = Store::new();
    e.hibernating_upsert(&id, hib(1), t0);
    e.hibernating_upsert(&id, hib(2), t0);
    flush(&mut e, &mut store);
    assert_eq!(hib_entries(&store).len(), 2);
    // Records of an actor the store does not know (its record never made it) are deleted at
    // the restore; so are records too old to be listed again.
    store.insert(
        hib_key("no-such-actor", hib(3)),
        T0_MS.to_le_bytes().to_vec(),
    );
    let (mut e2, t1, report) = restarted(&store, 10);
    assert_eq!(report.live, 1);
    flush(&mut e2, &mut store);
    assert_eq!(hib_entries(&store).len(), 2, "the orphan is deleted");
    // A malformed one is skipped and left alone.
    let mut bad = HIB_KEY_PREFIX.to_vec();
    bad.extend_from_slice(b"x");
    store.insert(bad.clone(), vec![1, 2, 3]);
    let (_, _, report) = restarted(&store, 10);
    assert_eq!(report.skipped, 1);
    store.remove(&bad);
    // Past hibernation_eligible, they are forgotten at the restore.
    let (mut e3, _, _) = restarted(&store, 3_600);
    assert!(e3.hibernating(&id).is_empty());
    let mut s3 = store.clone();
    flush(&mut e3, &mut s3);
    assert!(hib_entries(&s3).is_empty());
    // Destroying the actor deletes them.
    e2.destroy_actor("default", &id, t1).unwrap();
    flush(&mut e2, &mut store);
    assert!(hib_entries(&store).is_empty());
}

#[test]
fn destroy_asked_before_a_restart_is_finished_by_the_restore() {
    let (mut e, t0, id, _) = running_actor();
    let mut store = Store::new();
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Stop))], t0);
    assert_eq!(status(&e, &id), ActorStatus::Stopping);
    flush(&mut e, &mut store);
    let (mut e2, t1, report) = restarted(&store, 5);
    assert_eq!((report.live, report.destroyed), (0, 1));
    let info = e2.actor(&id).unwrap();
    assert_eq!(info.status, ActorStatus::Destroyed);
    assert_eq!(info.destroy_ts, Some(T0_MS + 5_000));
    assert!(e2.actor_by_key("default", "counter", "x").is_none());
    assert_eq!(e2.resolve(&id, 1, t1).0, Resolve::NotFound);
    flush(&mut e2, &mut store);
    assert_eq!(record_in(&store, &id).destroy_ts, Some(T0_MS + 5_000));
}

#[test]
fn destroyed_actors_keep_their_retention_across_a_restart() {
    let (mut e, t0, id, _) = running_actor();
    let mut store = Store::new();
    e.destroy_actor("default", &id, t0);
    e.runner_events(c(1), vec![ev(&id, 0, 1, stopped(StopCode::Ok))], t0);
    flush(&mut e, &mut store);

    // 300 s later: visible for the 300 s left.
    let (mut e2, t1, report) = restarted(&store, 300);
    assert_eq!(report.destroyed, 1);
    assert_eq!(e2.next_deadline(), Some(secs(t1, 300.0)));
    assert_eq!(get_actor_json(&mut e2, &id, t1)["destroy_ts"], json!(T0_MS));
    e2.tick(secs(t1, 299.0));
    assert!(e2.actor(&id).is_some());
    e2.tick(secs(t1, 300.0));
    assert!(e2.actor(&id).is_none());
    let mut s2 = store.clone();
    flush(&mut e2, &mut s2);
    assert!(s2.is_empty());

    // 700 s later: past retention, deleted by the restore.
    let (mut e3, _, report) = restarted(&store, 700);
    assert_eq!((report.destroyed, report.expired), (0, 1));
    assert!(e3.actor(&id).is_none());
    flush(&mut e3, &mut store);
    assert!(store.is_empty());
}

#[test]
fn restore_skips_what_it_cannot_use_and_never_panics() {
    let (mut e, _, id, _) = running_actor();
    let mut store = Store::new();
    flush(&mut e, &mut store);
    let good = store[&actor_key(&id)].clone();
    let mut rec = ActorRecord::decode(&good).unwrap();

    let mut entries: Vec<(Vec<u8>, Vec<u8>)> = vec![(actor_key(&id), good.clone())];
    entries.push((actor_key("junk"), b"\xff\x00not json".to_vec()));
    entries.push((actor_key("empty"), Vec::new()));
    rec.v = 2;
    entries.push((actor_key(&id), rec.encode())); // another version (and a duplicate id)
    rec.v = 1;
    rec.id = "other".into();
    entries.push((actor_key("mismatch"), rec.encode()));
    let mut bad_policy = rec.clone();
    bad_policy.id = "bp".into();
    bad_policy.crash_policy = "explode".into();
    entries.push((actor_key("bp"), bad_policy.encode()));
    // Same (namespace, name, key) as the good one.
    let mut dup_key = rec.clone();
    dup_key.id = "dupkey".into();
    dup_key.seq = 50;
    entries.push((actor_key("dupkey"), dup_key.encode()));
    entries.push((b"engine/actor/\xff\xfe".to_vec(), good.clone()));
    entries.push((b"engine/unknown/x".to_vec(), b"{}".to_vec()));
    entries.push((b"kv/something".to_vec(), b"x".to_vec()));
    // An input whose actor record never made it; one whose record is unreadable.
    entries.push((input_key("orphan"), vec![1]));
    entries.push((input_key("junk"), vec![2]));

    let t1 = Instant::now();
    let mut e2 = Engine::new(EngineConfig::default(), 5, t1, T0_MS);
    let report = e2.restore(entries, t1);
    assert_eq!(
        report,
        RestoreReport {
            live: 1,
            skipped: 8,
            foreign: 1,
            ..RestoreReport::default()
        }
    );
    assert_eq!(status(&e2, &id), ActorStatus::Sleeping);
    assert!(e2.actor("dupkey").is_none());
    // Only the orphan input is deleted; unreadable records stay for a later version.
    assert_eq!(
        e2.take_store_ops(),
        vec![StoreOp::Delete {
            key: input_key("orphan")
        }]
    );

    // Random bytes under engine keys: skipped, never a panic.
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..500 {
        let len = rng.random_range(0..64);
        let mut v: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if rng.random_range(0..2) == 0 {
            // Mutate a valid record instead.
            v = good.clone();
            let i = rng.random_range(0..v.len());
            v[i] = rng.random();
        }
        let mut e3 = Engine::new(EngineConfig::default(), 5, t1, T0_MS);
        let r = e3.restore(vec![(actor_key(&id), v)], t1);
        assert_eq!(r.live + r.skipped, 1);
    }
}

#[test]
fn a_live_actor_without_its_input_is_restored_without_it() {
    let (mut e, t0) = new_engine();
    let mut store = Store::new();
    let (info, _) = e
        .create_actor(
            CreateActor {
                namespace: "default".into(),
                name: "n".into(),
                key: None,
                runner_name: None,
                input: Some(vec![1]),
                crash_policy: CrashPolicy::Sleep,
            },
            t0,
        )
        .unwrap();
    flush(&mut e, &mut store);
    store.remove(&input_key(&info.actor_id));
    let (mut e2, t1, report) = restarted(&store, 1);
    assert_eq!((report.live, report.missing_input), (1, 1));
    e2.runner_init(c(1), "default", "k1", init("default", 1), t1);
    let (_, a) = e2.resolve(&info.actor_id, 1, t1);
    assert_eq!(start_of(&a).1.config.input, None);
}

#[test]
fn kv_access_is_limited_to_the_runner_hosting_the_actor() {
    let (mut e, t0, id, _) = running_actor();
    assert!(e.actor_placed_on(&id, c(1)));
    assert!(!e.actor_placed_on(&id, c(2)), "another connection");
    assert!(!e.actor_placed_on("nope", c(1)), "unknown actor");
    let _ = e.runner_init(c(2), "default", "k2", init("default", 10), t0);
    assert!(!e.actor_placed_on(&id, c(2)), "another runner");
    // Asleep: nobody hosts it.
    let _ = e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    let _ = e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    assert!(!e.actor_placed_on(&id, c(1)));
}
