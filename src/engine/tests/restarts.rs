//! Runner restarts with the same key (SPEC §1.4.2, §1.4.5, §2.5, §2.6): whatever the old session
//! left on the runner record and on its actors must not keep the new session from work.

use super::*;

/// Every start command in `log`, as (actor, generation): none may appear twice (the runner
/// does not de-duplicate, and the runnerId is the same across these reconnects).
fn assert_no_start_twice(log: &[Action]) {
    let mut seen = std::collections::BTreeSet::new();
    for w in starts(log) {
        let k = (w.checkpoint.actor_id.clone(), w.checkpoint.generation);
        assert!(seen.insert(k.clone()), "start {k:?} sent twice");
    }
}

fn resolved(actions: &[Action], waiter: u64) -> Option<Result<Route, ResolveError>> {
    actions.iter().find_map(|a| match a {
        Action::Resolved { waiter: w, result } if *w == waiter => Some(result.clone()),
        _ => None,
    })
}

fn route(id: &str, generation: u32, conn: ConnRef) -> Route {
    Route {
        actor_id: id.to_string(),
        generation,
        runner_idx: 0,
        conn,
    }
}

#[test]
fn a_runner_that_drained_and_restarts_with_its_key_gets_its_actor_back() {
    // The operator's report: SIGTERM (Stopping, the actor stopped, the process exited), then
    // the same key again within the lost threshold.
    let (mut e, t0, id, rid) = running_actor();
    let mut log = Vec::new();
    let a = e.runner_message(c(1), ToServer::Stopping, secs(t0, 1.0));
    assert_eq!(stops(&a)[0].checkpoint, cp(&id, 0, 1));
    log.extend(e.runner_events(
        c(1),
        vec![ev(&id, 0, 1, stopped(StopCode::Ok))],
        secs(t0, 1.0),
    ));
    assert_eq!(status(&e, &id), ActorStatus::Sleeping);
    // A request while the old process drains: nothing to place it on yet.
    let (r, a) = e.resolve(&id, 1, secs(t0, 1.5));
    assert!(matches!(r, Resolve::Pending { .. }));
    assert!(commands(&a).is_empty(), "a draining runner takes no work");
    e.runner_closed(c(1), secs(t0, 2.0));
    // The new process: same runnerId, and the waiting actor goes out with the Init.
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 3.0));
    log.extend(a.clone());
    assert_eq!(runner_id_of(&a), rid);
    assert_eq!(fence_ts(&a), None, "nothing in doubt, nothing hosted");
    let (checkpoint, _) = start_of(&a);
    assert_eq!(checkpoint, cp(&id, 1, 0));
    assert_eq!(commands(&a)[0].0, c(2));
    let a = e.runner_events(c(2), vec![ev(&id, 1, 0, running())], secs(t0, 3.1));
    assert_eq!(resolved(&a, 1), Some(Ok(route(&id, 1, c(2)))));
    // Later requests are routed at once, new actors are placed here.
    let (r, _) = e.resolve(&id, 2, secs(t0, 4.0));
    assert_eq!(r, Resolve::Ready(route(&id, 1, c(2))));
    let (id2, a) = create(&mut e, "other", None, secs(t0, 4.0));
    log.extend(a.clone());
    assert_eq!(start_of(&a).0, cp(&id2, 0, 0));
    assert_no_start_twice(&log);
}

#[test]
fn a_drained_actor_whose_stopped_was_lost_is_settled_by_the_restart() {
    // SIGTERM, but the process exited before its `Stopped` reached the gateway: the actor is
    // still `stopping` on the record and takes the runner's only slot.
    let (mut e, t0) = new_engine();
    let mut log = e.runner_init(c(1), "default", "k1", init("default", 1), t0);
    let (id, a) = create(&mut e, "n", None, t0);
    log.extend(a);
    log.extend(e.runner_events(c(1), vec![ev(&id, 0, 0, running())], t0));
    let a = e.runner_message(c(1), ToServer::Stopping, t0);
    assert_eq!(stops(&a).len(), 1);
    let (r, _) = e.resolve(&id, 1, t0);
    assert!(matches!(r, Resolve::Pending { .. }));
    let (id2, a) = create(&mut e, "n", None, t0);
    assert!(commands(&a).is_empty(), "draining, and no room");
    e.runner_closed(c(1), secs(t0, 1.0));
    let a = e.runner_init(c(2), "default", "k1", init("default", 1), secs(t0, 2.0));
    log.extend(a.clone());
    assert!(
        commands(&a).is_empty(),
        "the stop is in doubt, the slot still taken"
    );
    let ts = fence_ts(&a).expect("possession fence");
    // The new process sends nothing back: the stopping actor is not hosted. Its slot is free
    // and the actors that wait are placed at once, each with a new generation.
    let a = e.runner_pong(c(2), ts, secs(t0, 2.1));
    log.extend(a.clone());
    assert!(a.contains(&Action::ActorStopped {
        actor_id: id.clone()
    }));
    let placed: Vec<ActorCheckpoint> = starts(&a).into_iter().map(|w| w.checkpoint).collect();
    assert_eq!(placed.len(), 1, "one slot: {placed:?}");
    assert!(
        placed[0] == cp(&id, 1, 0) || placed[0] == cp(&id2, 0, 0),
        "{placed:?}"
    );
    assert!(stops(&a).is_empty(), "the old stop is moot");
    assert_no_start_twice(&log);
}

#[test]
fn stopping_is_forgotten_by_a_connection_that_replaces_a_live_one() {
    // The old connection said Stopping and still looks alive when the new one arrives.
    let (mut e, t0, id, rid) = running_actor();
    let mut log = Vec::new();
    e.runner_message(c(1), ToServer::Stopping, t0);
    let (r, _) = e.resolve(&id, 1, t0);
    assert!(matches!(r, Resolve::Pending { .. }));
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 1.0));
    log.extend(a.clone());
    assert!(a.contains(&Action::CloseRunner {
        conn: c(1),
        code: 1000,
        reason: "ws.eviction"
    }));
    assert_eq!(runner_id_of(&a), rid);
    let ts = fence_ts(&a).expect("possession fence");
    // The old connection's late Stopped and close touch nothing.
    assert!(e
        .runner_events(c(1), vec![ev(&id, 0, 1, stopped(StopCode::Ok))], t0)
        .is_empty());
    assert!(e.runner_closed(c(1), secs(t0, 1.0)).is_empty());
    assert_eq!(status(&e, &id), ActorStatus::Stopping);
    // New work is placed on the new connection at once.
    let (id2, a) = create(&mut e, "other", None, secs(t0, 1.0));
    log.extend(a.clone());
    assert_eq!(start_of(&a).0, cp(&id2, 0, 0));
    assert_eq!(commands(&a)[0].0, c(2));
    // The pong settles the old actor; its waiter's wake starts generation 1 here.
    let a = e.runner_pong(c(2), ts, secs(t0, 1.1));
    log.extend(a.clone());
    assert_eq!(start_of(&a).0, cp(&id, 1, 0));
    let a = e.runner_events(c(2), vec![ev(&id, 1, 0, running())], secs(t0, 1.2));
    assert_eq!(resolved(&a, 1), Some(Ok(route(&id, 1, c(2)))));
    assert_no_start_twice(&log);
}

#[test]
fn a_crashed_runner_restarting_with_its_key_gets_no_route_before_the_proof() {
    // kill -9: the actor was running; the new process does not host it.
    let (mut e, t0, id, _) = running_actor();
    let mut log = Vec::new();
    e.runner_closed(c(1), t0);
    let (r, _) = e.resolve(&id, 1, secs(t0, 0.5));
    assert!(matches!(r, Resolve::Pending { .. }));
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 1.0));
    log.extend(a.clone());
    assert_eq!(
        resolved(&a, 1),
        None,
        "no route to a process that may not host it"
    );
    let ts = fence_ts(&a).expect("possession fence");
    // A request between the Init and the pong waits too.
    let (r, _) = e.resolve(&id, 2, secs(t0, 1.0));
    assert!(matches!(r, Resolve::Pending { .. }), "{r:?}");
    let a = e.runner_pong(c(2), ts, secs(t0, 1.1));
    log.extend(a.clone());
    assert!(a.contains(&Action::ActorStopped {
        actor_id: id.clone()
    }));
    assert_eq!(start_of(&a).0, cp(&id, 1, 0));
    assert_eq!(resolved(&a, 1), None);
    let a = e.runner_events(c(2), vec![ev(&id, 1, 0, running())], secs(t0, 1.2));
    assert_eq!(resolved(&a, 1), Some(Ok(route(&id, 1, c(2)))));
    assert_eq!(resolved(&a, 2), Some(Ok(route(&id, 1, c(2)))));
    assert_no_start_twice(&log);
}

#[test]
fn a_network_cut_keeps_the_actor_and_routes_as_soon_as_it_is_proven() {
    // The same process reconnects: it re-sends the actor's latest event before the pong.
    let (mut e, t0, id, _) = running_actor();
    e.runner_closed(c(1), t0);
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 1.0));
    let ts = fence_ts(&a).unwrap();
    let (r, _) = e.resolve(&id, 1, secs(t0, 1.0));
    assert!(matches!(r, Resolve::Pending { .. }));
    let a = e.runner_events(c(2), vec![ev(&id, 0, 0, running())], secs(t0, 1.0));
    assert_eq!(resolved(&a, 1), Some(Ok(route(&id, 0, c(2)))));
    let (r, _) = e.resolve(&id, 2, secs(t0, 1.0));
    assert_eq!(r, Resolve::Ready(route(&id, 0, c(2))));
    let a = e.runner_pong(c(2), ts, secs(t0, 1.1));
    assert!(a.is_empty(), "{a:?}");
    assert_eq!(status(&e, &id), ActorStatus::Running);
}

#[test]
fn a_replaced_live_connection_of_a_new_process_gives_the_actor_a_new_generation() {
    // A new process connects while the old connection still looks alive (no close seen).
    let (mut e, t0, id, _) = running_actor();
    let (r, _) = e.resolve(&id, 9, t0);
    assert!(matches!(r, Resolve::Ready(_)));
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 1.0));
    let ts = fence_ts(&a).unwrap();
    let (r, _) = e.resolve(&id, 1, secs(t0, 1.0));
    assert!(matches!(r, Resolve::Pending { .. }), "{r:?}");
    // Late messages of the replaced connection are ignored.
    assert!(e
        .runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0)
        .is_empty());
    assert!(e.runner_pong(c(1), ts, t0).is_empty());
    assert!(e.runner_message(c(1), ToServer::Stopping, t0).is_empty());
    let a = e.runner_pong(c(2), ts, secs(t0, 1.1));
    assert_eq!(start_of(&a).0, cp(&id, 1, 0));
    let a = e.runner_events(c(2), vec![ev(&id, 1, 0, running())], secs(t0, 1.2));
    assert_eq!(resolved(&a, 1), Some(Ok(route(&id, 1, c(2)))));
}

#[test]
fn a_hibernating_socket_wakes_its_actor_on_the_restarted_runner() {
    // The actor slept (its socket hibernated); the runner was SIGTERMed; the client's next
    // message wants the actor while there is no runner to take it.
    let (mut e, t0, id, _) = running_actor();
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    assert!(e.hibernating_upsert(&id, hib(1), t0));
    e.runner_message(c(1), ToServer::Stopping, secs(t0, 1.0));
    let (r, a) = e.wake(&id, secs(t0, 1.5));
    assert!(matches!(r, Resolve::Pending { .. }));
    assert!(commands(&a).is_empty());
    e.runner_closed(c(1), secs(t0, 2.0));
    let (_, a) = e.wake(&id, secs(t0, 2.5));
    assert!(commands(&a).is_empty());
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 3.0));
    let (checkpoint, s) = start_of(&a);
    assert_eq!(checkpoint, cp(&id, 1, 0));
    assert_eq!(s.hibernating_requests, vec![hib(1)]);
    let a = e.runner_events(c(2), vec![ev(&id, 1, 0, running())], secs(t0, 3.1));
    assert!(a.contains(&Action::ActorRunning {
        actor_id: id.clone(),
        generation: 1,
        runner_idx: 0
    }));
}

#[test]
fn a_start_in_flight_when_the_runner_drained_is_never_sent_again() {
    let (mut e, t0) = new_engine();
    let mut log = e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let (id, a) = create(&mut e, "n", None, t0);
    log.extend(a);
    let (_, _) = e.resolve(&id, 1, t0);
    let a = e.runner_message(c(1), ToServer::Stopping, t0);
    assert_eq!(stops(&a)[0].checkpoint, cp(&id, 0, 1));
    e.runner_closed(c(1), t0);
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 1.0));
    log.extend(a.clone());
    assert!(commands(&a).is_empty(), "start and stop in doubt");
    let a = e.runner_pong(c(2), fence_ts(&a).unwrap(), secs(t0, 1.1));
    log.extend(a.clone());
    assert_eq!(start_of(&a).0, cp(&id, 1, 0));
    assert!(stops(&a).is_empty(), "the old generation is over");
    assert_no_start_twice(&log);
}

#[test]
fn a_stop_deadline_that_passed_while_fenced_is_rearmed_at_the_pong() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    e.runner_closed(c(1), secs(t0, 1.0));
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 10.0));
    let ts = fence_ts(&a).unwrap();
    // The same process: it still hosts the actor (its latest event comes back).
    e.runner_events(
        c(2),
        vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))],
        secs(t0, 10.0),
    );
    // The stop deadline passes while the fence is out: nothing may end the stop yet.
    assert!(e.tick(secs(t0, 31.0)).is_empty());
    let a = e.runner_pong(c(2), ts, secs(t0, 31.0));
    assert_eq!(stops(&a)[0].checkpoint, cp(&id, 0, 1));
    assert_eq!(status(&e, &id), ActorStatus::Stopping);
    // A connected runner that ignores the re-sent stop: it ends at the new deadline.
    assert!(e.tick(secs(t0, 60.9)).is_empty());
    let a = e.tick(secs(t0, 61.0));
    assert!(a.contains(&Action::ActorStopped {
        actor_id: id.clone()
    }));
}

/// A stop sent again at a reconnect's pong gets the whole `actor_stop_threshold` from then:
/// the deadline it had before the runner went away would end it (and place the actor
/// elsewhere) while the runner, which got it again a moment ago, still runs the actor.
/// (Found by the simulation, seed 1023808.)
#[test]
fn a_stop_sent_again_at_the_pong_gets_its_whole_threshold() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    e.runner_closed(c(1), secs(t0, 1.0));
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 28.0));
    let ts = fence_ts(&a).unwrap();
    e.runner_events(
        c(2),
        vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))],
        secs(t0, 29.0),
    );
    let a = e.runner_pong(c(2), ts, secs(t0, 29.0));
    assert_eq!(
        stops(&a)[0].checkpoint,
        cp(&id, 0, 1),
        "the stop goes again"
    );
    // The first deadline (t0 + 30 s) passes: the runner has had the stop for 1 s only.
    assert!(e.tick(secs(t0, 31.0)).is_empty());
    assert_eq!(status(&e, &id), ActorStatus::Stopping);
    assert!(e.tick(secs(t0, 58.9)).is_empty());
    let a = e.tick(secs(t0, 59.0));
    assert!(a.contains(&Action::ActorStopped {
        actor_id: id.clone()
    }));
}

#[test]
fn a_close_before_the_pong_leaves_no_possession_check_behind() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_closed(c(1), t0);
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 1.0));
    assert!(fence_ts(&a).is_some());
    e.runner_closed(c(2), secs(t0, 1.5));
    // The next connection checks again; the same process proves the actor and routes.
    let a = e.runner_init(c(3), "default", "k1", init("default", 10), secs(t0, 2.0));
    let ts = fence_ts(&a).unwrap();
    e.runner_events(c(3), vec![ev(&id, 0, 0, running())], secs(t0, 2.0));
    assert!(
        e.runner_pong(c(2), ts, secs(t0, 2.0)).is_empty(),
        "old conn"
    );
    let a = e.runner_pong(c(3), ts, secs(t0, 2.1));
    assert!(a.is_empty(), "{a:?}");
    let (r, _) = e.resolve(&id, 1, secs(t0, 2.2));
    assert_eq!(r, Resolve::Ready(route(&id, 0, c(3))));
}

/// A new placement leader holds placement (`hold_placement_until`): a wake and a create wait
/// as pending while runners connect, and go out at the first tick after the hold.
#[test]
fn a_placement_hold_defers_every_start_until_it_ends() {
    let (mut e, t0) = new_engine();
    let until = secs(t0, 5.0);
    e.hold_placement_until(until);
    let a = e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    assert!(starts(&a).is_empty());
    let (id, a) = create(&mut e, "counter", Some("x"), secs(t0, 1.0));
    assert!(
        starts(&a).is_empty(),
        "a create places nothing during the hold"
    );
    let (r, a) = e.resolve(&id, 7, secs(t0, 2.0));
    assert!(matches!(r, Resolve::Pending { .. }));
    assert!(
        starts(&a).is_empty(),
        "a wake places nothing during the hold"
    );
    assert_eq!(status(&e, &id), ActorStatus::Sleeping);
    assert!(e.next_deadline().is_some_and(|t| t <= until));
    assert!(starts(&e.tick(secs(t0, 4.9))).is_empty());
    let a = e.tick(until);
    let (checkpoint, _) = start_of(&a);
    assert_eq!(checkpoint.actor_id, id);
    assert!(
        e.next_deadline().is_none_or(|t| t > until),
        "the hold's deadline is gone once it ran out"
    );
    // A hold with nothing waiting runs out at its tick too.
    e.hold_placement_until(secs(t0, 5.5));
    e.tick(secs(t0, 5.5));
    assert!(e.next_deadline().is_none_or(|t| t > secs(t0, 5.5)));
    // Past the hold, placement is immediate again.
    let (other, a) = create(&mut e, "counter", Some("y"), secs(t0, 6.0));
    assert_eq!(start_of(&a).0.actor_id, other);
}

/// A shard's complete list of socket records (sent when the placement leader changed)
/// forgets that shard's records it does not list, keeps other shards' and nodes', and
/// records what it lists.
#[test]
fn a_hibernating_sync_replaces_one_shards_records() {
    let (mut e, t0, id, _) = running_actor();
    let gw = [1, 2, 3, 4];
    let req = |shard: u8, n: u8| HibernatingRequest {
        gateway_id: gw,
        request_id: [shard, n, 0, 0],
    };
    let other_node = HibernatingRequest {
        gateway_id: [9, 9, 9, 9],
        request_id: [0, 1, 0, 0],
    };
    for r in [req(0, 1), req(0, 2), req(1, 1), other_node] {
        assert!(e.hibernating_upsert(&id, r, t0));
    }
    let listed = vec![(std::sync::Arc::from(id.as_str()), req(0, 3))];
    assert_eq!(e.hibernating_sync(gw, 0, &listed, t0), 2);
    let mut left: Vec<HibernatingRequest> =
        e.hibernating(&id).into_iter().map(|(h, _)| h).collect();
    left.sort_by_key(|h| (h.gateway_id, h.request_id));
    assert_eq!(left, vec![req(0, 3), req(1, 1), other_node]);
}

#[test]
fn an_actor_placed_after_the_fence_and_drained_before_it_ran_stays_until_its_stopped() {
    // The runner reconnects while it hosts an actor: a possession fence is out. A new actor is
    // placed on the new connection after the fence ping, and the runner drains before that
    // actor's `Running` came back. The pong proves nothing about it (the runner got its start
    // after the ping): it stays placed, stopping, until the runner reports it stopped, and
    // is never started on another runner meanwhile (single instance).
    let (mut e, t0, id, _) = running_actor();
    e.runner_closed(c(1), t0);
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 1.0));
    let ts = fence_ts(&a).expect("possession fence");
    // The same process: the hosted actor's latest event comes back.
    e.runner_events(c(2), vec![ev(&id, 0, 0, running())], secs(t0, 1.0));
    let (b, a) = create(&mut e, "n", None, secs(t0, 1.1));
    assert_eq!(start_of(&a).0, cp(&b, 0, 0));
    assert_eq!(commands(&a)[0].0, c(2));
    // Another runner with room, and a request that wants `b` running.
    e.runner_init(c(3), "default", "k2", init("default", 10), secs(t0, 1.2));
    let (r, _) = e.resolve(&b, 1, secs(t0, 1.2));
    assert!(matches!(r, Resolve::Pending { .. }));
    let a = e.runner_message(c(2), ToServer::Stopping, secs(t0, 1.3));
    let s: Vec<ActorCheckpoint> = stops(&a).into_iter().map(|w| w.checkpoint).collect();
    assert!(
        s.contains(&cp(&b, 0, 1)) && s.contains(&cp(&id, 0, 1)),
        "{s:?}"
    );
    let a = e.runner_pong(c(2), ts, secs(t0, 1.4));
    assert!(
        !a.contains(&Action::ActorStopped {
            actor_id: b.clone()
        }),
        "{a:?}"
    );
    assert!(starts(&a).is_empty(), "{a:?}");
    assert_eq!(status(&e, &b), ActorStatus::Stopping);
    // The runner started `b` after the ping and stops it now: only then does it run elsewhere.
    let a = e.runner_events(c(2), vec![ev(&b, 0, 0, running())], secs(t0, 1.5));
    assert!(starts(&a).is_empty(), "{a:?}");
    assert_eq!(status(&e, &b), ActorStatus::Stopping);
    let a = e.runner_events(
        c(2),
        vec![ev(&b, 0, 1, stopped(StopCode::Ok))],
        secs(t0, 1.6),
    );
    assert!(a.contains(&Action::ActorStopped {
        actor_id: b.clone()
    }));
    assert_eq!(start_of(&a).0, cp(&b, 1, 0));
    assert_eq!(commands(&a)[0].0, c(3));
}
