//! Actors, events, placement: command and event indices, acknowledgements, slots and runner
//! names, pending actors, lookups and their waiters, intents, crash policies, drains, alarms,
//! announced actor names.

use super::*;

#[test]
fn command_indices_per_generation() {
    let (mut e, t0, id, _) = running_actor();
    let a = e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    assert_eq!(stops(&a)[0].checkpoint, cp(&id, 0, 1));
    assert_eq!(status(&e, &id), ActorStatus::Stopping);
    let a = e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    assert!(a.contains(&Action::ActorStopped {
        actor_id: id.clone()
    }));
    assert_eq!(status(&e, &id), ActorStatus::Sleeping);
    let (r, a) = e.resolve(&id, 9, t0);
    assert_eq!(
        r,
        Resolve::Pending {
            actor_id: id.clone()
        }
    );
    assert_eq!(starts(&a)[0].checkpoint, cp(&id, 1, 0));
}

#[test]
fn events_are_deduplicated_and_acknowledged_per_batch() {
    let (mut e, t0, id, _) = running_actor();
    // Same event again (resend after reconnect): ignored but acknowledged.
    let a = e.runner_events(c(1), vec![ev(&id, 0, 0, running())], t0);
    assert!(acks(&a).is_empty(), "the latest event stays unacknowledged");
    assert!(!a.iter().any(|x| matches!(x, Action::ActorRunning { .. })));
    // A batch with an old and two new events: one AckEvents up to the one before the
    // newest (the newest stays unacknowledged as proof of possession).
    let alarm = Event::ActorSetAlarm(EventActorSetAlarm {
        alarm_ts: Some(T0_MS + 1_000_000),
    });
    let a = e.runner_events(
        c(1),
        vec![
            ev(&id, 0, 0, running()),
            ev(&id, 0, 1, alarm.clone()),
            ev(
                &id,
                0,
                2,
                Event::ActorSetAlarm(EventActorSetAlarm { alarm_ts: None }),
            ),
        ],
        t0,
    );
    assert_eq!(acks(&a), vec![vec![cp(&id, 0, 1)]]);
    // Index 1 again would set the alarm again: ignored.
    e.runner_events(c(1), vec![ev(&id, 0, 1, alarm)], t0);
    assert_eq!(
        e.next_deadline(),
        None,
        "alarm cleared by index 2, index 1 ignored"
    );
}

#[test]
fn events_of_another_generation_or_runner_are_ignored_and_not_acked() {
    let (mut e, t0, id, _) = running_actor();
    let a = e.runner_events(c(1), vec![ev(&id, 5, 0, stopped(StopCode::Ok))], t0);
    assert!(a.is_empty());
    e.runner_init(c(2), "default", "other", init("default", 10), t0);
    let a = e.runner_events(c(2), vec![ev(&id, 0, 1, stopped(StopCode::Ok))], t0);
    assert!(a.is_empty());
    let a = e.runner_events(c(1), vec![ev("nope", 0, 0, running())], t0);
    assert!(a.is_empty());
    assert_eq!(status(&e, &id), ActorStatus::Running);
}

#[test]
fn ack_for_a_stopped_generation_precedes_the_next_start() {
    let (mut e, t0, id, _) = running_actor();
    let (_, _) = e.resolve(&id, 1, t0); // ready; no waiter
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    // A client arrives while it stops.
    let (r, _) = e.resolve(&id, 2, t0);
    assert!(matches!(r, Resolve::Pending { .. }));
    let a = e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    let ack_pos = a
        .iter()
        .position(|x| {
            matches!(
                x,
                Action::Send {
                    msg: ToClient::AckEvents(_),
                    ..
                }
            )
        })
        .unwrap();
    let start_pos = a
        .iter()
        .position(|x| {
            matches!(
                x,
                Action::Send {
                    msg: ToClient::Commands(_),
                    ..
                }
            )
        })
        .unwrap();
    assert!(ack_pos < start_pos);
    assert_eq!(starts(&a)[0].checkpoint, cp(&id, 1, 0));
    let a = e.runner_events(c(1), vec![ev(&id, 1, 0, running())], t0);
    assert!(a.contains(&Action::Resolved {
        waiter: 2,
        result: Ok(Route {
            actor_id: id.clone(),
            generation: 1,
            runner_idx: 0,
            conn: c(1)
        })
    }));
}

#[test]
fn placement_respects_slots() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 2), t0);
    let (a1, x) = create(&mut e, "n", None, t0);
    assert_eq!(starts(&x).len(), 1);
    let (_a2, x) = create(&mut e, "n", None, t0);
    assert_eq!(starts(&x).len(), 1);
    let (a3, x) = create(&mut e, "n", None, t0);
    assert!(starts(&x).is_empty());
    let info = e.actor(&a3).unwrap();
    assert_eq!(info.status, ActorStatus::Sleeping);
    assert_eq!(info.pending_allocation_ts, Some(T0_MS));
    // One stops: the pending one takes its slot.
    e.runner_events(c(1), vec![ev(&a1, 0, 0, running())], t0);
    e.runner_events(c(1), vec![ev(&a1, 0, 1, intent(ActorIntent::Sleep))], t0);
    let x = e.runner_events(c(1), vec![ev(&a1, 0, 2, stopped(StopCode::Ok))], t0);
    assert_eq!(starts(&x)[0].checkpoint.actor_id, a3);
    assert_eq!(status(&e, &a3), ActorStatus::Starting);
}

#[test]
fn placement_prefers_most_free_slots_and_matches_runner_name() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 1), t0);
    e.runner_init(c(2), "default", "k2", init("default", 5), t0);
    e.runner_init(c(3), "default", "k3", init("gpu", 100), t0);
    let (_, x) = create(&mut e, "n", None, t0);
    assert_eq!(commands(&x)[0].0, c(2));
    let (info, x) = e
        .create_actor(
            CreateActor {
                namespace: "default".into(),
                name: "n".into(),
                key: None,
                runner_name: Some("gpu".into()),
                input: Some(vec![1, 2, 3]),
                crash_policy: CrashPolicy::Sleep,
            },
            t0,
        )
        .unwrap();
    assert_eq!(commands(&x)[0].0, c(3));
    match &starts(&x)[0].inner {
        Command::StartActor(s) => {
            assert_eq!(s.config.input, Some(vec![1, 2, 3]));
            assert_eq!(s.config.name, "n");
            assert_eq!(s.config.create_ts, info.create_ts);
        }
        _ => unreachable!(),
    }
}

#[test]
fn pending_actor_is_placed_when_a_runner_arrives() {
    let (mut e, t0) = new_engine();
    let (id, x) = create(&mut e, "counter", Some("k"), t0);
    assert!(x.is_empty());
    let a = e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    assert!(matches!(
        a[0],
        Action::Send {
            msg: ToClient::Init(_),
            ..
        }
    ));
    assert!(matches!(
        a[1],
        Action::Send {
            msg: ToClient::Commands(_),
            ..
        }
    ));
    assert_eq!(starts(&a)[0].checkpoint, cp(&id, 0, 0));
    match &starts(&a)[0].inner {
        Command::StartActor(s) => assert_eq!(s.config.key.as_deref(), Some("k")),
        _ => unreachable!(),
    }
    // A runner of another namespace would not have taken it.
    let (mut e, t0) = new_engine();
    let (_id, _) = create(&mut e, "counter", None, t0);
    let a = e.runner_init(c(1), "other-ns", "k1", init("default", 10), t0);
    assert!(starts(&a).is_empty());
}

#[test]
fn resolve_wakes_a_sleeping_actor() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    let (r, a) = e.resolve(&id, 42, t0);
    assert!(matches!(r, Resolve::Pending { .. }));
    assert_eq!(starts(&a).len(), 1);
    // Second waiter: no second start.
    let (_, a) = e.resolve(&id, 43, t0);
    assert!(commands(&a).is_empty());
    let a = e.runner_events(c(1), vec![ev(&id, 1, 0, running())], t0);
    let resolved: Vec<u64> = a
        .iter()
        .filter_map(|x| match x {
            Action::Resolved {
                waiter,
                result: Ok(_),
            } => Some(*waiter),
            _ => None,
        })
        .collect();
    assert_eq!(resolved, vec![42, 43]);
    assert_eq!(e.resolve("missing", 1, t0).0, Resolve::NotFound);
}

#[test]
fn sleep_intent_stops_but_keeps_the_actor() {
    let (mut e, t0, id, _) = running_actor();
    let a = e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    assert_eq!(stops(&a).len(), 1);
    // Repeated intent: no second stop.
    let a = e.runner_events(c(1), vec![ev(&id, 0, 2, intent(ActorIntent::Sleep))], t0);
    assert!(stops(&a).is_empty());
    let a = e.runner_events(c(1), vec![ev(&id, 0, 3, stopped(StopCode::Ok))], t0);
    assert!(a.contains(&Action::ActorStopped {
        actor_id: id.clone()
    }));
    assert!(!a.iter().any(|x| matches!(x, Action::ActorDestroyed { .. })));
    let info = e.actor(&id).unwrap();
    assert_eq!(info.status, ActorStatus::Sleeping);
    assert_eq!(info.sleep_ts, Some(T0_MS));
    assert_eq!(
        e.actor_by_key("default", "counter", "x").unwrap().actor_id,
        id
    );
}

#[test]
fn stop_intent_destroys_when_stopped() {
    let (mut e, t0, id, _) = running_actor();
    let a = e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Stop))], t0);
    assert_eq!(stops(&a).len(), 1);
    let (r, _) = e.resolve(&id, 5, t0);
    assert!(matches!(r, Resolve::Pending { .. }));
    let a = e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    assert!(a.contains(&Action::ActorDestroyed {
        actor_id: id.clone()
    }));
    assert!(a.contains(&Action::Resolved {
        waiter: 5,
        result: Err(ResolveError::Destroyed)
    }));
    assert!(starts(&a).is_empty());
    assert_eq!(status(&e, &id), ActorStatus::Destroyed);
    assert_eq!(e.resolve(&id, 6, t0).0, Resolve::NotFound);
    assert!(e.actor_by_key("default", "counter", "x").is_none());
    // Forgotten after the retention period.
    e.tick(secs(t0, 601.0));
    assert!(e.actor(&id).is_none());
}

#[test]
fn crash_policies() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_events(c(1), vec![ev(&id, 0, 1, stopped(StopCode::Error))], t0);
    assert_eq!(
        status(&e, &id),
        ActorStatus::Sleeping,
        "rivetkit's policy: sleep"
    );

    let (info, _) = e
        .create_actor(
            CreateActor {
                namespace: "default".into(),
                name: "d".into(),
                key: None,
                runner_name: None,
                input: None,
                crash_policy: CrashPolicy::Destroy,
            },
            t0,
        )
        .unwrap();
    let d = info.actor_id;
    e.runner_events(c(1), vec![ev(&d, 0, 0, stopped(StopCode::Error))], t0);
    assert_eq!(status(&e, &d), ActorStatus::Destroyed);
}

#[test]
fn stopping_runner_drains() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let (a1, _) = create(&mut e, "n", None, t0);
    let (a2, _) = create(&mut e, "n", None, t0);
    e.runner_events(c(1), vec![ev(&a1, 0, 0, running())], t0);
    let a = e.runner_message(c(1), ToServer::Stopping, t0);
    let s: Vec<String> = stops(&a)
        .into_iter()
        .map(|w| w.checkpoint.actor_id)
        .collect();
    assert_eq!(s.len(), 2);
    assert!(s.contains(&a1) && s.contains(&a2));
    // No new placement on a draining runner.
    let (a3, x) = create(&mut e, "n", None, t0);
    assert!(commands(&x).is_empty());
    // Stopped actors with waiters move to another runner.
    let (_, _) = e.resolve(&a1, 7, t0);
    e.runner_events(c(1), vec![ev(&a1, 0, 1, stopped(StopCode::Ok))], t0);
    let a = e.runner_init(c(2), "default", "k2", init("default", 10), t0);
    let placed: Vec<String> = starts(&a)
        .into_iter()
        .map(|w| w.checkpoint.actor_id)
        .collect();
    assert!(placed.contains(&a1) && placed.contains(&a3));
    assert!(commands(&a).iter().all(|(conn, _)| *conn == c(2)));
}

#[test]
fn lost_runner_moves_wanted_actors_elsewhere() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_init(c(2), "default", "k2", init("default", 10), t0);
    e.runner_closed(c(1), t0);
    let (r, _) = e.resolve(&id, 3, t0);
    assert!(matches!(r, Resolve::Pending { .. }), "runner disconnected");
    let a = e.tick(secs(t0, 15.0));
    assert!(a.contains(&Action::ActorStopped {
        actor_id: id.clone()
    }));
    let s = starts(&a);
    assert_eq!(s[0].checkpoint, cp(&id, 1, 0));
    assert_eq!(commands(&a)[0].0, c(2));
    let a = e.runner_events(c(2), vec![ev(&id, 1, 0, running())], t0);
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Resolved {
            waiter: 3,
            result: Ok(_)
        }
    )));
}

#[test]
fn waiter_answered_when_its_runner_reattaches() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_closed(c(1), t0);
    let (r, _) = e.resolve(&id, 3, t0);
    assert!(matches!(r, Resolve::Pending { .. }));
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 2.0));
    // Not at the Init: a new process behind the same key would not host the actor.
    assert!(
        !a.iter().any(|x| matches!(x, Action::Resolved { .. })),
        "{a:?}"
    );
    // The runner re-sends the actor's latest event: it hosts it, the waiter gets its route
    // at once (before the fence's pong).
    let a = e.runner_events(c(2), vec![ev(&id, 0, 0, running())], secs(t0, 2.0));
    assert!(a.contains(&Action::Resolved {
        waiter: 3,
        result: Ok(Route {
            actor_id: id.clone(),
            generation: 0,
            runner_idx: 0,
            conn: c(2)
        })
    }));
}

#[test]
fn waiters_time_out() {
    let (mut e, t0) = new_engine();
    let (id, _) = create(&mut e, "n", None, t0);
    let (r, _) = e.resolve(&id, 1, t0);
    assert!(matches!(r, Resolve::Pending { .. }));
    let (_, _) = e.resolve(&id, 2, secs(t0, 10.0));
    e.cancel_waiter(2);
    assert!(e.tick(secs(t0, 29.9)).is_empty());
    assert_eq!(e.next_deadline(), Some(secs(t0, 30.0)));
    assert_eq!(
        e.tick(secs(t0, 30.0)),
        vec![Action::Resolved {
            waiter: 1,
            result: Err(ResolveError::Timeout)
        }]
    );
    assert!(
        e.tick(secs(t0, 100.0)).is_empty(),
        "cancelled waiter never answered"
    );
}

#[test]
fn alarm_wakes_a_sleeping_actor() {
    let (mut e, t0, id, _) = running_actor();
    let alarm = Event::ActorSetAlarm(EventActorSetAlarm {
        alarm_ts: Some(T0_MS + 60_000),
    });
    e.runner_events(
        c(1),
        vec![
            ev(&id, 0, 1, alarm),
            ev(&id, 0, 2, intent(ActorIntent::Sleep)),
        ],
        t0,
    );
    e.runner_events(c(1), vec![ev(&id, 0, 3, stopped(StopCode::Ok))], t0);
    assert_eq!(e.next_deadline(), Some(secs(t0, 60.0)));
    assert!(starts(&e.tick(secs(t0, 59.0))).is_empty());
    let a = e.tick(secs(t0, 60.0));
    assert_eq!(starts(&a)[0].checkpoint, cp(&id, 1, 0));
}

#[test]
fn start_lists_fresh_hibernating_requests() {
    let (mut e, t0, id, _) = running_actor();
    let h1 = HibernatingRequest {
        gateway_id: [1, 2, 3, 4],
        request_id: [0, 0, 0, 1],
    };
    let h2 = HibernatingRequest {
        gateway_id: [1, 2, 3, 4],
        request_id: [0, 0, 0, 2],
    };
    let h3 = HibernatingRequest {
        gateway_id: [1, 2, 3, 4],
        request_id: [0, 0, 0, 3],
    };
    e.hibernating_upsert(&id, h1, t0);
    e.hibernating_upsert(&id, h2, t0);
    e.hibernating_upsert(&id, h3, t0);
    e.hibernating_upsert(&id, h2, secs(t0, 50.0)); // refreshed
    e.hibernating_remove(&id, h3);
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    let (_, a) = e.resolve(&id, 1, secs(t0, 100.0));
    match &starts(&a)[0].inner {
        Command::StartActor(s) => assert_eq!(s.hibernating_requests, vec![h2]),
        _ => unreachable!(),
    }
}

/// A lost node's hibernating sockets are forgotten (records deleted), other nodes' kept.
#[test]
fn a_lost_nodes_hibernating_sockets_are_forgotten() {
    let (mut e, t0, id, _) = running_actor();
    let lost = HibernatingRequest {
        gateway_id: [9, 9, 9, 9],
        request_id: [0, 0, 0, 1],
    };
    let kept = HibernatingRequest {
        gateway_id: [1, 2, 3, 4],
        request_id: [0, 0, 0, 1],
    };
    e.hibernating_upsert(&id, lost, t0);
    e.hibernating_upsert(&id, kept, t0);
    e.take_store_ops();
    assert_eq!(e.forget_gateway([9, 9, 9, 9]), 1);
    assert_eq!(e.forget_gateway([9, 9, 9, 9]), 0);
    let ops = e.take_store_ops();
    assert!(
        matches!(&ops[..], [crate::engine::StoreOp::Delete { .. }]),
        "{ops:?}"
    );
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    let (_, a) = e.resolve(&id, 1, secs(t0, 1.0));
    match &starts(&a)[0].inner {
        Command::StartActor(s) => assert_eq!(s.hibernating_requests, vec![kept]),
        _ => unreachable!(),
    }
}

#[test]
fn resolve_by_name_gets_or_creates() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let (r, a) = e.resolve_by_name("default", "chat", "room1", false, None, 1, t0);
    assert_eq!(r, Resolve::NotFound);
    assert!(a.is_empty());
    let (r, a) = e.resolve_by_name("default", "chat", "room1", true, None, 1, t0);
    let Resolve::Pending { actor_id } = r else {
        panic!("pending expected");
    };
    assert_eq!(starts(&a)[0].checkpoint.actor_id, actor_id);
    e.runner_events(c(1), vec![ev(&actor_id, 0, 0, running())], t0);
    let (r, a) = e.resolve_by_name("default", "chat", "room1", true, None, 2, t0);
    assert!(a.is_empty());
    assert!(matches!(r, Resolve::Ready(Route { actor_id: ref x, .. }) if *x == actor_id));
}

#[test]
fn names_announced_by_runners() {
    let (mut e, t0) = new_engine();
    let mut i = init("default", 10);
    i.prepopulate_actor_names = Some(ActorNameMap(vec![(
        "counter".to_string(),
        ActorName {
            metadata: r#"{"icon":"x"}"#.to_string(),
        },
    )]));
    e.runner_init(c(1), "default", "k1", i, t0);
    assert_eq!(
        e.actor_names("default", None, 100),
        vec![("counter".to_string(), r#"{"icon":"x"}"#.to_string())]
    );
}

/// A start placed while the shards were still applying the actor's stop is brought up to
/// date before it goes: the sockets that hibernated because of that stop are listed.
#[test]
fn a_held_start_is_refreshed_with_the_records_that_came_since() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    let (_, a) = e.resolve(&id, 1, secs(t0, 1.0));
    let (cp1, start) = start_of(&a);
    assert_eq!(cp1.generation, 1);
    assert!(start.hibernating_requests.is_empty(), "no record yet");
    // A shard applies the stop: its socket hibernates and its record comes.
    e.hibernating_upsert(&id, hib(1), secs(t0, 1.5));
    assert_eq!(e.refresh_start(&id, 1), Some(vec![hib(1)]));
    // Only the generation that waits is refreshed.
    assert_eq!(e.refresh_start(&id, 0), None);
    assert_eq!(e.refresh_start("nobody", 1), None);
    // Once the runner acknowledged the start, nothing waits.
    e.runner_events(c(1), vec![ev(&id, 1, 0, running())], secs(t0, 2.0));
    e.runner_message(
        c(1),
        ToServer::AckCommands(crate::protocol::ToServerAckCommands {
            last_command_checkpoints: vec![cp(&id, 1, 0)],
        }),
        secs(t0, 2.0),
    );
    assert_eq!(e.refresh_start(&id, 1), None);
}
