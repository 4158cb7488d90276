//! Limits: runner Init, names, quotas, inputs.

use super::*;

fn engine_with(cfg: EngineConfig) -> (Engine, Instant) {
    let t0 = Instant::now();
    (Engine::new(cfg, 7, t0, T0_MS), t0)
}

fn named(names: &[(&str, &str)]) -> Option<ActorNameMap> {
    Some(ActorNameMap(
        names
            .iter()
            .map(|(n, m)| {
                (
                    n.to_string(),
                    ActorName {
                        metadata: m.to_string(),
                    },
                )
            })
            .collect(),
    ))
}

fn name_list(e: &Engine, ns: &str) -> Vec<(String, String)> {
    e.actor_names(ns, None, usize::MAX)
}

#[test]
fn runner_slots_above_the_limit_are_clamped() {
    let (mut e, t0) = engine_with(EngineConfig {
        runner_max_slots: 2,
        ..EngineConfig::default()
    });
    let (a, report) = e.runner_init_report(c(1), "default", "k1", init("default", 5), t0);
    assert_eq!(report.slots_clamped_from, Some(5));
    assert_eq!(report.refused, None);
    assert!(a.contains(&Action::RunnerAttached {
        runner_idx: 0,
        conn: c(1)
    }));
    let placed: usize = (0..3)
        .map(|i| starts(&create(&mut e, "counter", Some(&i.to_string()), t0).1).len())
        .sum();
    assert_eq!(placed, 2, "two slots, not five");
    // At the limit: not clamped.
    let (_, report) = e.runner_init_report(c(2), "default", "k2", init("default", 2), t0);
    assert_eq!(report.slots_clamped_from, None);
}

#[test]
fn an_init_above_a_limit_is_refused_and_leaves_no_state() {
    let cfg = EngineConfig {
        runner_name_bytes: 8,
        runner_actor_names: 2,
        runner_actor_metadata_bytes: 16,
        max_name_bytes: 8,
        ..EngineConfig::default()
    };
    let long = "x".repeat(9);
    let big_meta = format!("{{\"a\":\"{}\"}}", "y".repeat(20));
    let cases: Vec<(&str, String, String, ToServerInit)> = vec![
        ("namespace", long.clone(), "k".into(), init("default", 1)),
        ("runner name", "default".into(), "k".into(), init(&long, 1)),
        (
            "runner key",
            "default".into(),
            long.clone(),
            init("default", 1),
        ),
        ("names", "default".into(), "k".into(), {
            let mut i = init("default", 1);
            i.prepopulate_actor_names = named(&[("a", "{}"), ("b", "{}"), ("c", "{}")]);
            i
        }),
        ("actor name", "default".into(), "k".into(), {
            let mut i = init("default", 1);
            i.prepopulate_actor_names = named(&[(&long, "{}")]);
            i
        }),
        ("name metadata", "default".into(), "k".into(), {
            let mut i = init("default", 1);
            i.prepopulate_actor_names = named(&[("a", &big_meta)]);
            i
        }),
        ("Init metadata", "default".into(), "k".into(), {
            let mut i = init("default", 1);
            i.metadata = Some(big_meta.clone());
            i
        }),
    ];
    for (what, ns, key, i) in cases {
        let (mut e, t0) = engine_with(cfg.clone());
        create(&mut e, "counter", None, t0);
        let (a, report) = e.runner_init_report(c(1), &ns, &key, i, t0);
        assert_eq!(
            a,
            vec![Action::CloseRunner {
                conn: c(1),
                code: 1011,
                reason: "runner.init_too_large"
            }],
            "{what}"
        );
        let why = report.refused.expect(what);
        assert!(why.contains("limits."), "{what}: {why}");
        assert_eq!(e.runner_count(), 0, "{what}: no runner record");
        assert!(name_list(&e, &ns).is_empty(), "{what}: no names");
        // The connection is nobody's: its messages and close change nothing.
        assert!(e.runner_stopping(c(1), t0).is_empty());
        assert!(e.runner_closed(c(1), t0).is_empty());
    }
    // At the limits: accepted.
    let (mut e, t0) = engine_with(cfg);
    let mut i = init(&"n".repeat(8), 1);
    i.prepopulate_actor_names = named(&[(&"a".repeat(8), "{}"), ("b", &"m".repeat(16))]);
    i.metadata = Some("m".repeat(16));
    let (_, report) = e.runner_init_report(c(1), &"s".repeat(8), &"k".repeat(8), i, t0);
    assert_eq!(report, InitReport::default());
    assert_eq!(e.runner_count(), 1);
}

#[test]
fn a_refused_reconnect_leaves_the_runner_as_it_was() {
    let (mut e, t0) = engine_with(EngineConfig {
        runner_actor_names: 1,
        ..EngineConfig::default()
    });
    let a = e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let id = runner_id_of(&a);
    let mut big = init("default", 10);
    big.prepopulate_actor_names = named(&[("a", "{}"), ("b", "{}")]);
    let (a, report) = e.runner_init_report(c(2), "default", "k1", big, t0);
    assert!(report.refused.is_some());
    assert_eq!(report.evicted, None, "the live connection is not evicted");
    assert_eq!(a.len(), 1);
    assert_eq!(e.runner_id(0), Some(id.as_str()));
    assert!(starts(&create(&mut e, "counter", None, t0).1).len() == 1);
}

#[test]
fn an_eviction_is_reported_with_the_old_connection() {
    let (mut e, t0) = new_engine();
    let (_, report) = e.runner_init_report(c(1), "default", "k1", init("default", 10), t0);
    assert_eq!(report.evicted, None);
    let (a, report) = e.runner_init_report(c(2), "default", "k1", init("default", 10), t0);
    assert_eq!(report.evicted, Some(c(1)));
    assert!(a.contains(&Action::CloseRunner {
        conn: c(1),
        code: 1000,
        reason: "ws.eviction"
    }));
    // A different key is another runner: nothing evicted.
    let (_, report) = e.runner_init_report(c(3), "default", "k2", init("default", 10), t0);
    assert_eq!(report.evicted, None);
}

#[test]
fn actor_names_leave_with_their_runner() {
    let (mut e, t0) = new_engine();
    let mut i1 = init("default", 10);
    i1.prepopulate_actor_names = named(&[("a", r#"{"v":1}"#), ("b", r#"{"v":1}"#)]);
    e.runner_init(c(1), "default", "k1", i1, t0);
    let mut i2 = init("default", 10);
    i2.prepopulate_actor_names = named(&[("b", r#"{"v":2}"#), ("c", r#"{"v":2}"#)]);
    e.runner_init(c(2), "default", "k2", i2, t0);
    let mut other = init("default", 10);
    other.prepopulate_actor_names = named(&[("z", "{}")]);
    e.runner_init(c(3), "elsewhere", "k3", other, t0);
    let s = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        name_list(&e, "default"),
        s(&[
            ("a", r#"{"v":1}"#),
            ("b", r#"{"v":2}"#),
            ("c", r#"{"v":2}"#)
        ]),
        "merged; a shared name shows its latest announcer's metadata"
    );
    // The same identity reconnects with other names: they replace its old ones.
    let mut i1 = init("default", 10);
    i1.prepopulate_actor_names = named(&[("d", "{}")]);
    e.runner_init(c(4), "default", "k1", i1, t0);
    assert_eq!(
        name_list(&e, "default"),
        s(&[("b", r#"{"v":2}"#), ("c", r#"{"v":2}"#), ("d", "{}")])
    );
    // Disconnected but not yet lost: its names stay.
    e.runner_closed(c(2), t0);
    e.tick(secs(t0, 1.0));
    assert_eq!(name_list(&e, "default").len(), 3);
    // Lost: its names go with it (and its runnerId: a later Init gets a new record).
    e.tick(secs(t0, 16.0));
    assert_eq!(name_list(&e, "default"), s(&[("d", "{}")]));
    assert_eq!(name_list(&e, "elsewhere"), s(&[("z", "{}")]));
    e.runner_closed(c(4), secs(t0, 16.0));
    e.runner_closed(c(3), secs(t0, 16.0));
    e.tick(secs(t0, 40.0));
    assert_eq!(e.runner_count(), 0);
    assert!(e.actor_names.is_empty(), "nothing left behind");
}

#[test]
fn actor_names_are_paginated_like_the_rivet_engine() {
    let (mut e, t0) = new_engine();
    let names: Vec<String> = (0..250).map(|i| format!("n{i:03}")).collect();
    // Two runners announce overlapping halves: the pages hold each name once.
    for (slot, key, range) in [(1, "k1", 0..150), (2, "k2", 100..250)] {
        let mut i = init("default", 1);
        let announced: Vec<(&str, &str)> =
            names[range].iter().map(|n| (n.as_str(), "{}")).collect();
        i.prepopulate_actor_names = named(&announced);
        e.runner_init(c(slot), "default", key, i, t0);
    }
    let page = |e: &mut Engine, extra: &[(&str, &str)]| {
        let mut qs = vec![NS];
        qs.extend_from_slice(extra);
        call(e, "GET", "/actors/names", &qs, Value::Null, t0)
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut sizes = Vec::new();
    loop {
        let extra: Vec<(&str, &str)> = cursor.iter().map(|c| ("cursor", c.as_str())).collect();
        let (st, v, _) = page(&mut e, &extra);
        assert_eq!(st, 200);
        let got: Vec<String> = v["names"].as_object().unwrap().keys().cloned().collect();
        sizes.push(got.len());
        match v["pagination"]["cursor"].as_str() {
            Some(c) => {
                assert_eq!(
                    Some(c),
                    got.last().map(String::as_str),
                    "cursor = last name"
                );
                cursor = Some(c.to_string());
            }
            None => {
                assert!(got.is_empty(), "only an empty page has no cursor");
                break;
            }
        }
        seen.extend(got);
    }
    assert_eq!(sizes, vec![100, 100, 50, 0], "default limit 100");
    assert_eq!(seen, names);
    let (_, v, _) = page(&mut e, &[("limit", "3"), ("cursor", "n100")]);
    assert_eq!(
        v,
        json!({
            "names": {"n101": {"metadata": {}}, "n102": {"metadata": {}}, "n103": {"metadata": {}}},
            "pagination": {"cursor": "n103"}
        })
    );
    let (_, v, _) = page(&mut e, &[("limit", "100000")]);
    assert_eq!(
        v["names"].as_object().unwrap().len(),
        250,
        "clamped to 1000"
    );
    let (st, _, _) = page(&mut e, &[("limit", "0")]);
    assert_eq!(st, 400);
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors/names",
        &[("namespace", "nobody")],
        Value::Null,
        t0,
    );
    assert_eq!(v, json!({"names": {}, "pagination": {"cursor": null}}));
}

#[test]
fn a_long_runner_name_selector_is_refused() {
    let (mut e, t0) = engine_with(EngineConfig {
        runner_name_bytes: 16,
        ..EngineConfig::default()
    });
    for method in ["POST", "PUT"] {
        let (st, v, _) = call(
            &mut e,
            method,
            "/actors",
            &[NS],
            json!({"name": "counter", "key": "k", "runner_name_selector": "r".repeat(17)}),
            t0,
        );
        assert_eq!(st, 400, "{method}");
        assert!(
            v["message"].as_str().unwrap().contains("runner_name_bytes"),
            "{v}"
        );
    }
    let (st, _, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[("namespace", &"n".repeat(17))],
        json!({"name": "counter", "runner_name_selector": "r"}),
        t0,
    );
    assert_eq!(st, 400, "a namespace is bounded the same way");
    let (st, _, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({"name": "counter", "runner_name_selector": "r".repeat(16)}),
        t0,
    );
    assert_eq!(st, 200);
}

#[test]
fn actors_per_namespace_is_a_quota() {
    let (mut e, t0) = engine_with(EngineConfig {
        actors_per_namespace: 2,
        ..EngineConfig::default()
    });
    let (a, _) = create(&mut e, "counter", Some("a"), t0);
    create(&mut e, "counter", Some("b"), t0);
    let body = json!({"name": "counter", "key": "c", "runner_name_selector": "default"});
    for method in ["POST", "PUT"] {
        let (st, v, _) = call(&mut e, method, "/actors", &[NS], body.clone(), t0);
        assert_eq!(st, 429, "{method}");
        assert_eq!(
            (v["group"].as_str(), v["code"].as_str()),
            (Some("actor"), Some("quota_exceeded"))
        );
        assert!(v["message"]
            .as_str()
            .unwrap()
            .contains("limits.actors_per_namespace"));
    }
    // getOrCreate of an existing actor still works; a new one through the gateway is refused.
    let (st, v, _) = call(
        &mut e,
        "PUT",
        "/actors",
        &[NS],
        json!({"name": "counter", "key": "a", "runner_name_selector": "default"}),
        t0,
    );
    assert_eq!((st, v["created"].as_bool()), (200, Some(false)));
    let (r, _) = e.resolve_by_name("default", "counter", "c", true, None, 1, t0);
    assert_eq!(r, Resolve::NotFound);
    assert!(
        e.actor_by_key("default", "counter", "c").is_none(),
        "not created"
    );
    // Other namespaces have their own count.
    let (st, _, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[("namespace", "other")],
        body.clone(),
        t0,
    );
    assert_eq!(st, 200);
    // A destroyed actor frees its place.
    e.destroy_actor("default", &a, t0).unwrap();
    assert_eq!(e.live_actors_in("default"), 1);
    let (st, _, _) = call(&mut e, "POST", "/actors", &[NS], body, t0);
    assert_eq!(st, 200);
    // Restored actors count too.
    let mut store = Store::new();
    flush(&mut e, &mut store);
    let (e2, _, _) = restarted(&store, 1);
    assert_eq!(
        (e2.live_actors_in("default"), e2.live_actors_in("other")),
        (2, 1)
    );
}

#[test]
fn an_actor_waiting_for_a_runner_holds_no_input() {
    let (mut e, t0) = new_engine();
    let mut store = Store::new();
    let big = vec![7u8; 64 * 1024];
    let (info, a) = e
        .create_actor(
            CreateActor {
                namespace: "default".into(),
                name: "counter".into(),
                key: None,
                runner_name: None,
                input: Some(big.clone()),
                crash_policy: CrashPolicy::Sleep,
            },
            t0,
        )
        .unwrap();
    let id = info.actor_id;
    assert!(starts(&a).is_empty(), "no runner yet");
    flush(&mut e, &mut store);
    assert_eq!(
        store.get(&input_key(&id)),
        Some(&big),
        "written to the store"
    );
    assert!(e.fresh_inputs.is_empty(), "and gone from memory");
    assert!(e.actors[&id].has_input);
    assert!(e.take_input_loads().is_empty());
    // A runner arrives: the start waits for the store read.
    let a = e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    assert!(starts(&a).is_empty());
    assert_eq!(status(&e, &id), ActorStatus::Starting);
    // A late answer for another actor, or one that is gone, changes nothing.
    assert!(e.input_loaded("nobody", Some(vec![1]), t0).is_empty());
    let a = feed_inputs(&mut e, &store, t0);
    let (checkpoint, s) = start_of(&a);
    assert_eq!(checkpoint, cp(&id, 0, 0));
    assert_eq!(s.config.input.as_ref(), Some(&big));
    // A second answer does not send the start again.
    assert!(e.input_loaded(&id, Some(big.clone()), t0).is_empty());
    // Running: nothing in memory holds the input any more.
    e.runner_events(c(1), vec![ev(&id, 0, 0, running())], t0);
    let held = e.runners.iter().any(|(_, r)| {
        r.outbox
            .iter()
            .any(|c| matches!(&c.cmd.inner, Command::StartActor(s) if s.config.input.is_some()))
    });
    assert!(!held);
    // Each later start reads it again.
    e.runner_events(
        c(1),
        vec![
            ev(&id, 0, 1, intent(ActorIntent::Sleep)),
            ev(&id, 0, 2, stopped(StopCode::Ok)),
        ],
        t0,
    );
    let (_, a) = e.resolve(&id, 1, t0);
    assert!(starts(&a).is_empty());
    let a = feed_inputs(&mut e, &store, t0);
    assert_eq!(start_of(&a).1.config.input.as_ref(), Some(&big));
}

#[test]
fn commands_behind_a_start_waiting_for_its_input_wait_too() {
    let (mut e, t0) = new_engine();
    let mut store = Store::new();
    let (info, _) = e
        .create_actor(
            CreateActor {
                namespace: "default".into(),
                name: "counter".into(),
                key: None,
                runner_name: None,
                input: Some(vec![1]),
                crash_policy: CrashPolicy::Sleep,
            },
            t0,
        )
        .unwrap();
    let id = info.actor_id;
    flush(&mut e, &mut store);
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let a = e.destroy_actor("default", &id, t0).unwrap();
    assert!(commands(&a).is_empty(), "the stop waits behind the start");
    let a = feed_inputs(&mut e, &store, t0);
    let cmds = commands(&a);
    assert_eq!(cmds.len(), 2);
    assert!(matches!(cmds[0].1.inner, Command::StartActor(_)));
    assert!(matches!(cmds[1].1.inner, Command::StopActor));
}

#[test]
fn a_create_with_a_runner_at_hand_sends_its_input_at_once() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let (_, a) = e
        .create_actor(
            CreateActor {
                namespace: "default".into(),
                name: "counter".into(),
                key: None,
                runner_name: None,
                input: Some(vec![5, 6]),
                crash_policy: CrashPolicy::Sleep,
            },
            t0,
        )
        .unwrap();
    assert_eq!(start_of(&a).1.config.input, Some(vec![5, 6]));
    assert!(e.take_input_loads().is_empty());
    e.take_store_ops();
    assert!(e.fresh_inputs.is_empty());
}
