//! Lifecycle (SPEC §1.4.4–5, §1.5, §2.6): sleep and wake with the next generation, alarms,
//! wakes without a waiter, runner loss, hibernating requests in start commands.

use super::*;

#[test]
fn sleep_then_resolve_wakes_with_the_next_generation() {
    let (mut e, t0, id, _) = running_actor();
    let a = e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    assert_eq!(stops(&a)[0].checkpoint, cp(&id, 0, 1));
    assert_eq!(status(&e, &id), ActorStatus::Stopping);
    e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    assert_eq!(status(&e, &id), ActorStatus::Sleeping);
    let (_, a) = e.resolve(&id, 1, secs(t0, 5.0));
    assert_eq!(start_of(&a).0, cp(&id, 1, 0));
    let a = e.runner_events(c(1), vec![ev(&id, 1, 0, running())], secs(t0, 5.0));
    assert!(a.contains(&Action::ActorRunning {
        actor_id: id.clone(),
        generation: 1,
        runner_idx: 0
    }));
}

#[test]
fn null_alarm_clears_the_alarm() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_events(
        c(1),
        vec![
            ev(&id, 0, 1, alarm(Some(T0_MS + 60_000))),
            ev(&id, 0, 2, alarm(None)),
            ev(&id, 0, 3, intent(ActorIntent::Sleep)),
        ],
        t0,
    );
    e.runner_events(c(1), vec![ev(&id, 0, 4, stopped(StopCode::Ok))], t0);
    assert_eq!(e.next_deadline(), None);
    assert!(starts(&e.tick(secs(t0, 120.0))).is_empty());
    assert_eq!(status(&e, &id), ActorStatus::Sleeping);
    assert_eq!(e.actor_record(&id).unwrap().alarm_ts, None);
}

#[test]
fn alarm_is_replaced_by_a_later_one() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_events(
        c(1),
        vec![
            ev(&id, 0, 1, alarm(Some(T0_MS + 10_000))),
            ev(&id, 0, 2, alarm(Some(T0_MS + 20_000))),
            ev(&id, 0, 3, intent(ActorIntent::Sleep)),
        ],
        t0,
    );
    e.runner_events(c(1), vec![ev(&id, 0, 4, stopped(StopCode::Ok))], t0);
    assert!(starts(&e.tick(secs(t0, 15.0))).is_empty());
    assert_eq!(start_of(&e.tick(secs(t0, 20.0))).0, cp(&id, 1, 0));
}

#[test]
fn lost_runner_stops_actors_and_next_demand_places_them_again() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_closed(c(1), t0);
    let a = e.tick(secs(t0, 15.0));
    assert!(a.contains(&Action::ActorStopped {
        actor_id: id.clone()
    }));
    assert!(a.contains(&Action::RunnerLost { runner_idx: 0 }));
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 20.0));
    assert!(starts(&a).is_empty(), "no demand yet");
    let (_, a) = e.resolve(&id, 1, secs(t0, 21.0));
    assert_eq!(start_of(&a).0, cp(&id, 1, 0));
    assert_eq!(commands(&a)[0].0, c(2));
}

#[test]
fn wake_without_a_waiter_lists_fresh_hibernating_requests() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    assert!(e.hibernating_upsert(&id, hib(1), t0));
    assert!(e.hibernating_upsert(&id, hib(2), secs(t0, 30.0)));
    assert!(!e.hibernating_upsert("missing", hib(3), t0));
    // At t0 + 95 s the first record (95 s old) is stale, the second (65 s) fresh.
    let (r, a) = e.wake(&id, secs(t0, 95.0));
    assert_eq!(
        r,
        Resolve::Pending {
            actor_id: id.clone()
        }
    );
    let (checkpoint, s) = start_of(&a);
    assert_eq!(checkpoint, cp(&id, 1, 0));
    assert_eq!(s.hibernating_requests, vec![hib(2)]);
    // The stale record is gone for good.
    assert_eq!(e.hibernating(&id).len(), 1);
    // Waking twice does not start twice.
    let (_, a) = e.wake(&id, secs(t0, 96.0));
    assert!(commands(&a).is_empty());
    let a = e.runner_events(c(1), vec![ev(&id, 1, 0, running())], secs(t0, 97.0));
    assert!(a.contains(&Action::ActorRunning {
        actor_id: id.clone(),
        generation: 1,
        runner_idx: 0
    }));
    let (r, a) = e.wake(&id, secs(t0, 98.0));
    assert!(a.is_empty());
    assert!(matches!(r, Resolve::Ready(Route { generation: 1, .. })));
    // No waiter: nothing is ever resolved.
    assert!(!e
        .tick(secs(t0, 200.0))
        .iter()
        .any(|x| matches!(x, Action::Resolved { .. })));
    assert_eq!(e.wake("missing", t0).0, Resolve::NotFound);
}

#[test]
fn wake_while_stopping_restarts_after_the_stop() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    let (r, a) = e.wake(&id, t0);
    assert!(matches!(r, Resolve::Pending { .. }));
    assert!(commands(&a).is_empty());
    let a = e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    assert_eq!(start_of(&a).0, cp(&id, 1, 0));
}

#[test]
fn wake_of_a_destroyed_actor_is_not_found() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Stop))], t0);
    e.runner_events(c(1), vec![ev(&id, 0, 2, stopped(StopCode::Ok))], t0);
    assert_eq!(status(&e, &id), ActorStatus::Destroyed);
    assert_eq!(e.wake(&id, t0), (Resolve::NotFound, Vec::new()));
    assert!(!e.hibernating_upsert(&id, hib(1), t0));
}

#[test]
fn every_running_is_announced_with_its_runner() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 1), t0);
    e.runner_init(c(2), "default", "k2", init("default", 1), t0);
    let (a1, _) = create(&mut e, "n", None, t0);
    let (a2, x) = create(&mut e, "n", None, t0);
    assert_eq!(commands(&x)[0].0, c(2));
    let a = e.runner_events(c(1), vec![ev(&a1, 0, 0, running())], t0);
    assert!(a.contains(&Action::ActorRunning {
        actor_id: a1.clone(),
        generation: 0,
        runner_idx: 0
    }));
    let a = e.runner_events(c(2), vec![ev(&a2, 0, 0, running())], t0);
    assert!(a.contains(&Action::ActorRunning {
        actor_id: a2.clone(),
        generation: 0,
        runner_idx: 1
    }));
}
