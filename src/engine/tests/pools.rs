//! Serverless runner pools: the autoscaler, drains at the lifespan, restarts, back-off, a
//! changed endpoint, the drain grace in `Init`, and what a waiting client gets from a failing
//! pool. Driven with made-up clocks and made-up outbound events.

use super::*;
use crate::serverless::{self, EndReason, Failure};

const APP: &str = "http://app.test/api/rivet";

fn pool_engine() -> (Engine, Instant) {
    let t0 = Instant::now();
    let cfg = EngineConfig {
        pools: PoolSettings {
            endpoint: "https://torpor.example".into(),
            ..PoolSettings::default()
        },
        ..EngineConfig::default()
    };
    (Engine::new(cfg, 7, t0, T0_MS), t0)
}

fn put_pool(e: &mut Engine, url: &str, slots: u32, lifespan: u32, t: Instant) -> bool {
    let body = json!({"datacenters": {"default": {"serverless": {
        "url": url,
        "headers": {"x-app": "1"},
        "request_lifespan": lifespan,
        "slots_per_runner": slots,
        "max_runners": 10
    }}}});
    let (st, v, _) = call(e, "PUT", "/runner-configs/default", &[NS], body, t);
    assert_eq!(st, 200, "{v}");
    v["endpoint_config_changed"].as_bool().expect("bool")
}

/// (stream id, headers) of every `Start` in `cmds`.
fn started(cmds: &[serverless::Command]) -> Vec<(u64, serverless::Headers)> {
    cmds.iter()
        .filter_map(|c| match c {
            serverless::Command::Start { id, headers, .. } => Some((*id, headers.clone())),
            _ => None,
        })
        .collect()
}

fn stopped_streams(cmds: &[serverless::Command]) -> Vec<u64> {
    cmds.iter()
        .filter_map(|c| match c {
            serverless::Command::Stop { id } => Some(*id),
            _ => None,
        })
        .collect()
}

fn evictions(actions: &[Action]) -> Vec<ConnRef> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::CloseRunner {
                conn,
                reason: "ws.eviction",
                ..
            } => Some(*conn),
            _ => None,
        })
        .collect()
}

/// Tick at `t`: the actions and the outbound commands.
fn tick(e: &mut Engine, t: Instant) -> (Vec<Action>, Vec<serverless::Command>) {
    let a = e.tick(t);
    (a, e.take_outbound())
}

/// The app connects a runner for stream `id` on `conn` and says so in its init event.
fn connect(e: &mut Engine, id: u64, conn: ConnRef, slots: u32, t: Instant) -> Vec<Action> {
    let mut a = e.runner_init(
        conn,
        "default",
        &format!("key-{id}"),
        init("default", slots),
        t,
    );
    let grace = a.iter().find_map(|x| match x {
        Action::Send {
            msg: ToClient::Init(i),
            ..
        } => Some(i.metadata.serverless_drain_grace_period),
        _ => None,
    });
    assert_eq!(
        grace,
        Some(Some(10_000)),
        "a pool's runner is told the grace"
    );
    let rid = runner_id_of(&a);
    a.extend(e.pool_event(
        serverless::Event::Started {
            id,
            runner_id: rid,
            protocol_version: 7,
        },
        t,
    ));
    a
}

#[test]
fn scales_up_for_demand_and_back_down() {
    let (mut e, t0) = pool_engine();
    assert!(put_pool(&mut e, APP, 10, 300, t0));
    let (_, cmds) = tick(&mut e, t0);
    assert!(started(&cmds).is_empty(), "no demand, no runner");
    assert!(cmds
        .iter()
        .any(|c| matches!(c, serverless::Command::Metadata { url, .. } if url == APP)));

    let ids: Vec<String> = (0..30)
        .map(|i| create(&mut e, "counter", Some(&format!("k{i}")), t0).0)
        .collect();
    let t1 = secs(t0, 0.1);
    assert!(
        e.next_deadline().is_some_and(|d| d <= t1),
        "demand asks for a tick"
    );
    let (_, cmds) = tick(&mut e, t1);
    let streams = started(&cmds);
    assert_eq!(streams.len(), 3, "30 actors at 10 slots each");
    let h = &streams[0].1;
    assert_eq!(h.get("x-rivet-endpoint"), Some("https://torpor.example"));
    assert_eq!(h.get("x-rivet-total-slots"), Some("10"));
    assert_eq!(h.get("x-rivet-runner-name"), Some("default"));
    assert_eq!(h.get("x-rivet-namespace-name"), Some("default"));
    assert_eq!(h.get("x-app"), Some("1"));
    assert_eq!(
        h.get("x-rivet-token"),
        None,
        "no token without authentication"
    );
    assert_eq!(e.pool_slots("default", "default"), (3, 3));
    let status = |e: &Engine| {
        let all = e.pool_statuses();
        assert_eq!(all.len(), 1);
        let s = &all[0];
        assert_eq!(
            (s.namespace.as_str(), s.pool.as_str()),
            ("default", "default")
        );
        (s.starting, s.running, s.backoff, s.draining, s.failing)
    };
    assert_eq!(status(&e), (3, 0, 0, 0, false));

    // The runners connect; every actor is placed.
    let mut placed = Vec::new();
    for (n, (id, _)) in streams.iter().enumerate() {
        let a = connect(&mut e, *id, c(n as u32 + 1), 10, t1);
        placed.extend(commands(&a));
    }
    assert_eq!(placed.len(), 30);
    assert_eq!(status(&e), (0, 3, 0, 0, false));
    let (_, cmds) = tick(&mut e, secs(t0, 1.5));
    assert!(started(&cmds).is_empty(), "enough runners");

    // Every actor goes away: the pool drains to nothing.
    for id in &ids {
        e.destroy_actor("default", id, secs(t0, 2.0))
            .expect("actor");
    }
    for (conn, cmd) in &placed {
        let cp = &cmd.checkpoint;
        e.runner_events(
            *conn,
            vec![ev(&cp.actor_id, cp.generation, 0, stopped(StopCode::Ok))],
            secs(t0, 2.0),
        );
    }
    let (_, cmds) = tick(&mut e, secs(t0, 3.0));
    assert!(
        stopped_streams(&cmds).is_empty(),
        "draining runners get the grace"
    );
    assert_eq!(e.pool_slots("default", "default"), (0, 3));
    assert_eq!(status(&e), (0, 0, 0, 3, false));
    // Grace over: the streams are stopped and the runners closed.
    let (a, cmds) = tick(&mut e, secs(t0, 13.5));
    assert_eq!(stopped_streams(&cmds).len(), 3);
    assert_eq!(evictions(&a).len(), 3);
    assert_eq!(e.pool_slots("default", "default"), (0, 0));
}

#[test]
fn drains_at_lifespan_and_starts_a_replacement() {
    let (mut e, t0) = pool_engine();
    put_pool(&mut e, APP, 10, 60, t0);
    let (id, _) = create(&mut e, "counter", Some("a"), t0);
    let (_, cmds) = tick(&mut e, t0);
    let s1 = started(&cmds)[0].0;
    let a = connect(&mut e, s1, c(1), 10, t0);
    let st = starts(&a);
    assert_eq!(st.len(), 1);
    e.runner_events(c(1), vec![ev(&id, 0, 0, running())], t0);
    assert_eq!(status(&e, &id), ActorStatus::Running);

    // Nothing before lifespan − grace (60 − 10 s).
    let (_, cmds) = tick(&mut e, secs(t0, 49.0));
    assert!(started(&cmds).is_empty());
    // At 50 s: the runner drains (its actor is stopped) and a replacement is requested.
    let t50 = secs(t0, 50.0);
    let a = e.tick(t50);
    let cmds = e.take_outbound();
    assert_eq!(stops(&a).len(), 1, "the drained runner's actor is stopped");
    let s2 = started(&cmds)
        .first()
        .map(|(id, _)| *id)
        .expect("a replacement");
    assert_ne!(s1, s2);
    assert_eq!(e.pool_slots("default", "default"), (1, 2));
    // The actor sleeps; its next demand places it on the new runner.
    e.runner_events(c(1), vec![ev(&id, 0, 1, stopped(StopCode::Ok))], t50);
    assert_eq!(status(&e, &id), ActorStatus::Sleeping);
    let a = connect(&mut e, s2, c(2), 10, t50);
    assert!(starts(&a).is_empty(), "a sleeping actor waits for demand");
    let (_, a) = e.resolve(&id, 1, t50);
    let placed = commands(&a);
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].0, c(2), "not on the draining runner");
    // The draining runner reconnects: it stays draining.
    e.runner_init(
        c(9),
        "default",
        &format!("key-{s1}"),
        init("default", 10),
        t50,
    );
    let (_, a) = create(&mut e, "counter", Some("b"), t50);
    assert!(
        commands(&a).iter().all(|(conn, _)| *conn != c(9)),
        "no new actor on a draining runner"
    );
    // The old stream ends within the grace: no eviction needed.
    let a = e.pool_event(
        serverless::Event::Ended {
            id: s1,
            reason: EndReason::Stopped,
        },
        secs(t0, 52.0),
    );
    assert!(evictions(&a).is_empty());
    assert_eq!(e.pool_slots("default", "default"), (1, 1));
}

#[test]
fn a_stream_that_ends_early_is_requested_again_at_once() {
    let (mut e, t0) = pool_engine();
    put_pool(&mut e, APP, 10, 300, t0);
    create(&mut e, "counter", Some("a"), t0);
    let (_, cmds) = tick(&mut e, t0);
    let s1 = started(&cmds)[0].0;
    connect(&mut e, s1, c(1), 10, t0);
    e.pool_event(
        serverless::Event::Failed {
            id: s1,
            failure: Failure::StreamEnded {
                started: true,
                error_event: None,
                read_error: None,
            },
        },
        secs(t0, 5.0),
    );
    let again = started(&e.take_outbound());
    assert_eq!(again.len(), 1, "requested again in the same step");
    assert_ne!(again[0].0, s1);
    assert_eq!(e.pool_slots("default", "default"), (1, 1));
    assert!(e.pool_error("default", "default").is_none());
}

#[test]
fn failures_back_off_and_the_waiting_client_is_told() {
    let (mut e, t0) = pool_engine();
    put_pool(&mut e, APP, 10, 300, t0);
    let (id, _) = create(&mut e, "counter", Some("a"), t0);
    let (r, _) = e.resolve(&id, 77, t0);
    assert!(matches!(r, Resolve::Pending { .. }));
    let (_, cmds) = tick(&mut e, t0);
    let mut stream = started(&cmds)[0].0;

    // The app answers 500: the waiting lookup fails at once with RunnerFailed.
    let fail = |e: &mut Engine, id: u64, t: Instant| {
        e.pool_event(
            serverless::Event::Failed {
                id,
                failure: Failure::Status {
                    status: 500,
                    body: "boom".into(),
                },
            },
            t,
        )
    };
    let a = fail(&mut e, stream, secs(t0, 0.5));
    assert!(a.contains(&Action::Resolved {
        waiter: 77,
        result: Err(ResolveError::RunnerFailed)
    }));
    let st = &e.pool_statuses()[0];
    assert_eq!((st.backoff, st.running, st.failing), (1, 0, true));
    // The actor shows the pool's error as the Rivet engine shows it.
    let (st, v, _) = call(
        &mut e,
        "GET",
        &format!("/actors/{id}"),
        &[NS],
        Value::Null,
        t0,
    );
    assert_eq!(st, 200);
    assert_eq!(
        v["actor"]["error"],
        json!({"runner_pool_error": {"serverless_http_error": {"status_code": 500, "body": "boom"}}}),
        "{v}"
    );
    // A new lookup fails at once too (the wake stands).
    let (_, a) = e.resolve(&id, 78, secs(t0, 0.6));
    assert!(a.contains(&Action::Resolved {
        waiter: 78,
        result: Err(ResolveError::RunnerFailed)
    }));

    // Back-off: 2 s (+ up to 0.5 s), then 4 s, 8 s, ... bounded starts over a minute.
    let mut t = secs(t0, 0.5);
    let mut starts_seen = 1;
    let mut gaps = Vec::new();
    let end = secs(t0, 60.0);
    let mut last = t;
    while t < end {
        let next = e.next_deadline().expect("a deadline");
        t = next.max(t);
        if t >= end {
            break;
        }
        let (_, cmds) = tick(&mut e, t);
        if let Some((s, _)) = started(&cmds).first() {
            starts_seen += 1;
            gaps.push(t.duration_since(last).as_secs_f64());
            stream = *s;
            fail(&mut e, stream, t);
            last = t;
        }
    }
    assert!(
        starts_seen <= 6,
        "{starts_seen} starts in a minute: {gaps:?}"
    );
    assert!(gaps[0] >= 2.0 && gaps[0] < 2.5, "{gaps:?}");
    assert!(gaps[1] >= 4.0 && gaps[1] < 4.5, "{gaps:?}");
    assert!(gaps[2] >= 8.0 && gaps[2] < 8.5, "{gaps:?}");

    // The app recovers: three successes clear the error.
    let (_, cmds) = tick(&mut e, secs(t0, 600.0));
    let s = started(&cmds)[0].0;
    connect(&mut e, s, c(1), 10, secs(t0, 600.0));
    assert!(
        e.pool_error("default", "default").is_some(),
        "one success is not enough"
    );
    // With a runner up, a lookup waits for the actor again.
    let (r, a) = e.resolve(&id, 79, secs(t0, 600.0));
    assert!(matches!(r, Resolve::Pending { .. }));
    assert!(!a
        .iter()
        .any(|x| matches!(x, Action::Resolved { waiter: 79, .. })));
}

#[test]
fn a_changed_url_drains_all_and_starts_anew() {
    let (mut e, t0) = pool_engine();
    put_pool(&mut e, APP, 1, 300, t0);
    create(&mut e, "counter", Some("a"), t0);
    create(&mut e, "counter", Some("b"), t0);
    let (_, cmds) = tick(&mut e, t0);
    let old = started(&cmds);
    assert_eq!(old.len(), 2);
    for (n, (id, _)) in old.iter().enumerate() {
        connect(&mut e, *id, c(n as u32 + 1), 1, t0);
    }
    // Same url and headers: nothing changes.
    assert!(!put_pool(&mut e, APP, 1, 300, secs(t0, 1.0)));
    let (_, cmds) = tick(&mut e, secs(t0, 1.0));
    assert!(started(&cmds).is_empty());
    // A new url drains both and starts two new ones there.
    assert!(put_pool(&mut e, "http://app2.test/", 1, 300, secs(t0, 2.0)));
    let (a, cmds) = tick(&mut e, secs(t0, 2.0));
    let new = started(&cmds);
    assert_eq!(new.len(), 2);
    assert!(cmds.iter().any(
        |c| matches!(c, serverless::Command::Start { url, .. } if url == "http://app2.test/")
    ));
    assert_eq!(stops(&a).len(), 2, "the old runners' actors are stopped");
    assert_eq!(e.pool_slots("default", "default"), (2, 4));
    // Deleting the config drains everything.
    let (st, _, _) = call(
        &mut e,
        "DELETE",
        "/runner-configs/default",
        &[NS],
        Value::Null,
        secs(t0, 3.0),
    );
    assert_eq!(st, 200);
    let (_, cmds) = tick(&mut e, secs(t0, 3.0));
    assert!(started(&cmds).is_empty());
    let (_, _) = tick(&mut e, secs(t0, 3.1));
    let (a, cmds) = tick(&mut e, secs(t0, 20.0));
    assert_eq!(
        stopped_streams(&cmds).len(),
        2,
        "the old ones, at the end of the grace"
    );
    assert_eq!(evictions(&a).len(), 2);
    assert_eq!(e.pool_slots("default", "default"), (0, 0));
}

#[test]
fn a_normal_runner_gets_no_drain_grace() {
    let (mut e, t0) = pool_engine();
    let a = e.runner_init(c(1), "default", "k", init("default", 1), t0);
    let grace = a.iter().find_map(|x| match x {
        Action::Send {
            msg: ToClient::Init(i),
            ..
        } => Some(i.metadata.serverless_drain_grace_period),
        _ => None,
    });
    assert_eq!(grace, Some(None));
}

#[test]
fn a_stream_that_ends_right_after_its_start_backs_off() {
    let (mut e, t0) = pool_engine();
    put_pool(&mut e, APP, 10, 300, t0);
    create(&mut e, "counter", Some("a"), t0);
    let (_, cmds) = tick(&mut e, t0);
    let s1 = started(&cmds)[0].0;
    connect(&mut e, s1, c(1), 10, t0);
    e.pool_event(
        serverless::Event::Ended {
            id: s1,
            reason: EndReason::Lifespan,
        },
        secs(t0, 0.5),
    );
    assert!(started(&e.take_outbound()).is_empty(), "not at once");
    let (_, cmds) = tick(&mut e, secs(t0, 3.0));
    assert_eq!(started(&cmds).len(), 1, "after the back-off");
}

#[test]
fn the_token_goes_to_the_app_with_authentication() {
    let t0 = Instant::now();
    let cfg = EngineConfig {
        pools: PoolSettings {
            token: Some("s3cret".into()),
            ..PoolSettings::default()
        },
        ..EngineConfig::default()
    };
    let mut e = Engine::new(cfg, 7, t0, T0_MS);
    put_pool(&mut e, APP, 10, 300, t0);
    create(&mut e, "counter", Some("a"), t0);
    let (_, cmds) = tick(&mut e, t0);
    let (_, h) = &started(&cmds)[0];
    assert_eq!(h.get("x-rivet-token"), Some("s3cret"));
    assert_eq!(h.get("x-rivet-endpoint"), Some("http://127.0.0.1:6420"));
}

#[test]
fn a_newer_app_version_drains_older_runners() {
    let (mut e, t0) = pool_engine();
    let body = json!({"datacenters": {"default": {"serverless": {
        "url": APP, "request_lifespan": 300, "slots_per_runner": 10, "max_runners": 10,
        "min_runners": 1
    }, "drain_on_version_upgrade": true}}});
    let (st, _, _) = call(&mut e, "PUT", "/runner-configs/default", &[NS], body, t0);
    assert_eq!(st, 200);
    let (_, cmds) = tick(&mut e, t0);
    let md = cmds
        .iter()
        .find_map(|c| match c {
            serverless::Command::Metadata { id, .. } => Some(*id),
            _ => None,
        })
        .expect("a metadata request");
    let s1 = started(&cmds)[0].0;
    connect(&mut e, s1, c(1), 10, t0); // runner version 1
    let meta = |v: u32| crate::serverless::RunnerMetadata {
        runtime: "rivetkit".into(),
        version: "2.2.1".into(),
        runner_kind: Some("serverless".into()),
        runner_version: Some(v),
        actor_names: Vec::new(),
        client_endpoint: None,
        client_namespace: None,
    };
    e.pool_event(
        serverless::Event::Metadata {
            id: md,
            result: Ok(meta(1)),
        },
        t0,
    );
    let (_, cmds) = tick(&mut e, secs(t0, 0.1));
    assert!(started(&cmds).is_empty(), "same version: nothing drains");
    // The next poll (clamped to at least 5 s) finds version 2.
    let (_, cmds) = tick(&mut e, secs(t0, 10.0));
    let md = cmds
        .iter()
        .find_map(|c| match c {
            serverless::Command::Metadata { id, .. } => Some(*id),
            _ => None,
        })
        .expect("a second poll");
    e.pool_event(
        serverless::Event::Metadata {
            id: md,
            result: Ok(meta(2)),
        },
        secs(t0, 10.0),
    );
    let (_, cmds) = tick(&mut e, secs(t0, 10.0));
    assert_eq!(
        started(&cmds).len(),
        1,
        "a replacement for the drained runner"
    );
    assert_eq!(e.pool_slots("default", "default"), (1, 2));
}

#[test]
fn pools_come_back_from_their_configs_after_a_restart() {
    let (mut e, t0) = pool_engine();
    let mut store = Store::default();
    put_pool(&mut e, APP, 10, 300, t0);
    let (id, _) = create(&mut e, "counter", Some("a"), t0);
    flush(&mut e, &mut store);

    // A second process with the same settings, restored from the records.
    let (mut e2, t1) = pool_engine();
    let report = e2.restore(store.clone(), t1);
    assert_eq!((report.runner_configs, report.live), (1, 1));
    // A request for the sleeping actor is demand: the restored pool starts a runner.
    let (r, _) = e2.resolve(&id, 5, t1);
    assert!(matches!(r, Resolve::Pending { .. }));
    let (_, cmds) = tick(&mut e2, t1);
    let streams = started(&cmds);
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0].1.get("x-rivet-runner-name"), Some("default"));
    let a = connect(&mut e2, streams[0].0, c(1), 10, t1);
    assert_eq!(commands(&a).len(), 1, "the actor starts on the new runner");
}
