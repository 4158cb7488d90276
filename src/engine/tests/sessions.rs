//! Runner sessions: Init and its reply, identity across reconnects, eviction of a second
//! connection, stale connections, runner loss.

use super::*;

#[test]
fn init_reply_carries_configured_metadata_then_attaches() {
    let (mut e, t0) = new_engine();
    let a = e.runner_init(c(1), "default", "k1", init("default", 5), t0);
    match &a[0] {
        Action::Send {
            conn,
            msg: ToClient::Init(i),
        } => {
            assert_eq!(*conn, c(1));
            assert_eq!(
                i.metadata,
                ProtocolMetadata {
                    runner_lost_threshold: 15000,
                    actor_stop_threshold: 30000,
                    serverless_drain_grace_period: None
                }
            );
            assert_eq!(i.runner_id.len(), 36);
        }
        other => panic!("first action must be Init, got {other:?}"),
    }
    assert_eq!(
        a.last(),
        Some(&Action::RunnerAttached {
            runner_idx: 0,
            conn: c(1)
        })
    );
}

#[test]
fn identity_keeps_runner_id_across_reconnect() {
    let (mut e, t0) = new_engine();
    let id1 = runner_id_of(&e.runner_init(c(1), "default", "k1", init("default", 5), t0));
    assert_eq!(
        e.runner_closed(c(1), t0),
        vec![Action::RunnerDetached { runner_idx: 0 }]
    );
    let a = e.runner_init(c(2), "default", "k1", init("default", 5), secs(t0, 5.0));
    assert_eq!(runner_id_of(&a), id1);
    assert!(a.contains(&Action::RunnerAttached {
        runner_idx: 0,
        conn: c(2)
    }));
    // Another key, name or namespace is another runner.
    let other = runner_id_of(&e.runner_init(c(3), "default", "k2", init("default", 5), t0));
    assert_ne!(other, id1);
    let other2 = runner_id_of(&e.runner_init(c(4), "default", "k1", init("other", 5), t0));
    assert_ne!(other2, id1);
    let other3 = runner_id_of(&e.runner_init(c(5), "ns2", "k1", init("default", 5), t0));
    assert_ne!(other3, id1);
    assert_eq!(e.runner_count(), 4);
}

#[test]
fn second_live_connection_evicts_the_first() {
    let (mut e, t0) = new_engine();
    let id1 = runner_id_of(&e.runner_init(c(1), "default", "k1", init("default", 5), t0));
    let a = e.runner_init(c(2), "default", "k1", init("default", 5), t0);
    assert_eq!(
        a[0],
        Action::CloseRunner {
            conn: c(1),
            code: 1000,
            reason: "ws.eviction"
        }
    );
    assert_eq!(runner_id_of(&a), id1);
    // The evicted socket's close and late messages touch nothing.
    assert!(e.runner_closed(c(1), t0).is_empty());
    assert!(e.runner_stopping(c(1), t0).is_empty());
    let (id, a) = create(&mut e, "counter", None, t0);
    assert_eq!(commands(&a)[0].0, c(2));
    assert!(e
        .runner_events(c(1), vec![ev(&id, 0, 0, running())], t0)
        .is_empty());
    assert_eq!(status(&e, &id), ActorStatus::Starting);
}

#[test]
fn stale_close_after_reconnect_is_ignored() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 5), t0);
    assert_eq!(e.runner_closed(c(1), t0).len(), 1);
    e.runner_init(c(2), "default", "k1", init("default", 5), t0);
    assert!(e.runner_closed(c(1), t0).is_empty(), "old close repeated");
    // Connection never initialised.
    assert!(e.runner_closed(c(9), t0).is_empty());
    // Long after, the runner is still attached on c(2): not lost.
    assert!(e.tick(secs(t0, 100.0)).is_empty());
    assert_eq!(
        e.runner_closed(c(2), t0),
        vec![Action::RunnerDetached { runner_idx: 0 }]
    );
}

#[test]
fn second_init_on_same_connection_is_ignored() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 5), t0);
    assert!(e
        .runner_init(c(1), "default", "k1", init("default", 5), t0)
        .is_empty());
}

#[test]
fn runner_lost_after_threshold_stops_actors_and_forgets_runner_id() {
    let (mut e, t0, id, rid) = running_actor();
    e.runner_closed(c(1), t0);
    assert!(e.tick(secs(t0, 14.9)).is_empty());
    assert_eq!(e.next_deadline(), Some(secs(t0, 15.0)));
    let a = e.tick(secs(t0, 15.0));
    assert_eq!(
        a,
        vec![
            Action::ActorStopped {
                actor_id: id.clone()
            },
            Action::RunnerLost { runner_idx: 0 }
        ]
    );
    assert_eq!(status(&e, &id), ActorStatus::Sleeping);
    assert_eq!(e.runner_count(), 0);
    let a = e.runner_init(c(2), "default", "k1", init("default", 5), secs(t0, 16.0));
    assert_ne!(runner_id_of(&a), rid);
    // Nobody asked for the actor: it stays asleep.
    assert!(starts(&a).is_empty());
}

#[test]
fn reconnect_in_time_keeps_actors() {
    let (mut e, t0, id, rid) = running_actor();
    e.runner_closed(c(1), t0);
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 10.0));
    assert_eq!(runner_id_of(&a), rid);
    assert!(
        commands(&a).is_empty(),
        "nothing in doubt: Running proved the start"
    );
    // The runner still hosts the actor: it re-sends the unacknowledged Running (its latest
    // event), then answers the possession fence.
    let ts = fence_ts(&a).expect("possession fence");
    let a = e.runner_events(c(2), vec![ev(&id, 0, 0, running())], secs(t0, 10.0));
    assert!(acks(&a).is_empty(), "the latest event stays unacknowledged");
    let a = e.runner_pong(c(2), ts, secs(t0, 10.0));
    assert!(a.is_empty(), "{a:?}");
    assert!(e.tick(secs(t0, 60.0)).is_empty());
    assert_eq!(status(&e, &id), ActorStatus::Running);
    let (r, _) = e.resolve(&id, 1, secs(t0, 60.0));
    assert_eq!(
        r,
        Resolve::Ready(Route {
            actor_id: id.clone(),
            generation: 0,
            runner_idx: 0,
            conn: c(2)
        })
    );
}

#[test]
fn a_new_process_behind_the_same_runner_key_does_not_host_the_old_actors() {
    let (mut e, t0, id, rid) = running_actor();
    e.runner_closed(c(1), t0);
    // A new process with the same key, within the lost threshold: same runnerId, no actors,
    // so nothing comes back before the pong.
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), secs(t0, 1.0));
    assert_eq!(runner_id_of(&a), rid);
    let ts = fence_ts(&a).expect("possession fence");
    let a = e.runner_pong(c(2), ts, secs(t0, 1.0));
    assert!(
        a.contains(&Action::ActorStopped {
            actor_id: id.clone()
        }),
        "{a:?}"
    );
    assert_eq!(status(&e, &id), ActorStatus::Sleeping);
    // The next request starts a new generation on it.
    let (_, a) = e.resolve(&id, 7, secs(t0, 2.0));
    assert_eq!(starts(&a)[0].checkpoint, cp(&id, 1, 0));
}
