//! Command delivery across reconnects: what counts as received (acks, events, fences), what
//! is sent again and what never is.

use super::*;

#[test]
fn start_received_before_disconnect_is_not_resent() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let (id, a) = create(&mut e, "counter", None, t0);
    assert_eq!(starts(&a).len(), 1);
    // The socket dies before we see any reply.
    e.runner_closed(c(1), t0);
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), t0);
    assert!(commands(&a).is_empty(), "in-doubt start held");
    let ts = fence_ts(&a).expect("fence ping");
    assert!(ts < 0);
    // The runner had it: after Init it re-sends its unacknowledged Running event...
    let a = e.runner_events(c(2), vec![ev(&id, 0, 0, running())], t0);
    assert!(acks(&a).is_empty(), "the latest event stays unacknowledged");
    // ...then answers the fence. Nothing is re-sent.
    let a = e.runner_pong(c(2), ts, t0);
    assert!(commands(&a).is_empty());
    assert_eq!(status(&e, &id), ActorStatus::Running);
}

#[test]
fn start_lost_with_the_socket_is_reissued_as_a_new_generation() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let (id, a) = create(&mut e, "counter", Some("k"), t0);
    assert_eq!(starts(&a)[0].checkpoint, cp(&id, 0, 0));
    e.runner_closed(c(1), t0);
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), t0);
    let ts = fence_ts(&a).expect("fence ping");
    // A pong for some other ping (liveness) does not release anything.
    assert!(e.runner_pong(c(2), 12345, t0).is_empty());
    // No event came back before the fence: the runner does not hold generation 0. It is
    // never started twice; generation 1 is allocated instead.
    let a = e.runner_message(c(2), ToServer::Pong(ToServerPong { ts }), t0);
    assert!(a.contains(&Action::ActorStopped {
        actor_id: id.clone()
    }));
    let again = starts(&a);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].checkpoint, cp(&id, 1, 0));
    assert_eq!(status(&e, &id), ActorStatus::Starting);
    assert!(e.runner_pong(c(2), ts, t0).is_empty(), "fence used up");
    // Late events of generation 0 are ignored.
    assert!(e
        .runner_events(c(2), vec![ev(&id, 0, 0, running())], t0)
        .is_empty());
}

#[test]
fn fence_pong_proves_commands_sent_on_the_same_connection() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let (id1, _) = create(&mut e, "a", None, t0);
    e.runner_closed(c(1), t0);
    // Reconnect: a's start is in doubt; b, created meanwhile, goes out at once.
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), t0);
    let ts = fence_ts(&a).unwrap();
    let (id2, a) = create(&mut e, "b", None, t0);
    assert_eq!(starts(&a)[0].checkpoint, cp(&id2, 0, 0));
    // b's start went out after the ping: the pong proves nothing about it.
    let a = e.runner_pong(c(2), ts, t0);
    let s: Vec<ActorCheckpoint> = starts(&a).into_iter().map(|w| w.checkpoint).collect();
    assert_eq!(s, vec![cp(&id1, 1, 0)]);
    // The socket dies again: both starts are in doubt; neither is proven by the next fence.
    e.runner_closed(c(2), t0);
    let a = e.runner_init(c(3), "default", "k1", init("default", 10), t0);
    assert!(commands(&a).is_empty());
    let ts = fence_ts(&a).unwrap();
    let a = e.runner_pong(c(3), ts, t0);
    let mut s: Vec<ActorCheckpoint> = starts(&a).into_iter().map(|w| w.checkpoint).collect();
    s.sort_by_key(|x| x.generation);
    assert_eq!(s, vec![cp(&id2, 1, 0), cp(&id1, 2, 0)]);
    // Had the runner proven b's start with its Running event, a fence would leave it alone.
    e.runner_closed(c(3), t0);
    let a = e.runner_init(c(4), "default", "k1", init("default", 10), t0);
    let ts = fence_ts(&a).unwrap();
    e.runner_events(c(4), vec![ev(&id2, 1, 0, running())], t0);
    let a = e.runner_pong(c(4), ts, t0);
    let s: Vec<ActorCheckpoint> = starts(&a).into_iter().map(|w| w.checkpoint).collect();
    assert_eq!(s, vec![cp(&id1, 3, 0)]);
    assert_eq!(status(&e, &id2), ActorStatus::Running);
}

#[test]
fn stop_in_doubt_is_sent_again_after_the_fence() {
    let (mut e, t0, id, _) = running_actor();
    let a = e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    assert_eq!(stops(&a)[0].checkpoint, cp(&id, 0, 1));
    e.runner_closed(c(1), t0);
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), t0);
    assert!(commands(&a).is_empty());
    // The runner still hosts it: its unacknowledged latest event (the intent) comes back
    // before the pong, and the stop in doubt is sent again.
    let ts = fence_ts(&a).unwrap();
    e.runner_events(c(2), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    let a = e.runner_pong(c(2), ts, t0);
    assert_eq!(stops(&a)[0].checkpoint, cp(&id, 0, 1));
    assert_eq!(status(&e, &id), ActorStatus::Stopping);
}

#[test]
fn a_stopped_lost_with_the_socket_is_settled_at_the_reconnect_fence() {
    let (mut e, t0, id, _) = running_actor();
    let a = e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    assert_eq!(stops(&a)[0].checkpoint, cp(&id, 0, 1));
    // The runner stopped and removed the actor; its Stopped died with the socket, and it
    // forgot the actor's events. Nothing comes back before the pong: the actor is down.
    e.runner_closed(c(1), t0);
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), t0);
    let a = e.runner_pong(c(2), fence_ts(&a).unwrap(), t0);
    assert!(
        a.contains(&Action::ActorStopped {
            actor_id: id.clone()
        }),
        "{a:?}"
    );
    assert_eq!(status(&e, &id), ActorStatus::Sleeping);
}

#[test]
fn a_stop_that_a_connected_runner_ignores_ends_at_the_stop_threshold() {
    let (mut e, t0, id, _) = running_actor();
    e.runner_events(c(1), vec![ev(&id, 0, 1, intent(ActorIntent::Sleep))], t0);
    assert!(e.tick(secs(t0, 29.0)).is_empty());
    let a = e.tick(secs(t0, 30.0));
    assert_eq!(
        a,
        vec![Action::ActorStopped {
            actor_id: id.clone()
        }]
    );
    assert_eq!(status(&e, &id), ActorStatus::Sleeping);
}

#[test]
fn start_without_running_is_stopped_after_the_start_threshold() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 1), t0);
    let (id, _) = create(&mut e, "a", None, t0);
    let (id2, _) = create(&mut e, "b", None, t0);
    assert_eq!(status(&e, &id2), ActorStatus::Sleeping, "no room");
    let a = e.tick(secs(t0, 30.0));
    assert_eq!(stops(&a)[0].checkpoint, cp(&id, 0, 1));
    assert_eq!(status(&e, &id), ActorStatus::Stopping);
    let a = e.tick(secs(t0, 60.0));
    assert!(a.contains(&Action::ActorStopped {
        actor_id: id.clone()
    }));
    // The slot is free again: the pending actor is placed.
    assert_eq!(starts(&a)[0].checkpoint, cp(&id2, 0, 0));
}

#[test]
fn ack_commands_prunes_so_nothing_is_in_doubt() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let (id, _) = create(&mut e, "counter", None, t0);
    e.runner_message(
        c(1),
        ToServer::AckCommands(ToServerAckCommands {
            last_command_checkpoints: vec![cp(&id, 0, 0)],
        }),
        t0,
    );
    e.runner_closed(c(1), t0);
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), t0);
    // Nothing is held or re-sent; the fence only checks possession, and a starting actor
    // (no event yet) is left to its start deadline.
    assert!(commands(&a).is_empty());
    let a = e.runner_pong(c(2), fence_ts(&a).expect("possession fence"), t0);
    assert!(commands(&a).is_empty());
    assert_eq!(status(&e, &id), ActorStatus::Starting);
}

#[test]
fn later_commands_of_an_in_doubt_actor_wait_behind_it() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let (id, _) = create(&mut e, "counter", None, t0);
    let (id2, _) = create(&mut e, "other", None, t0);
    e.runner_events(c(1), vec![ev(&id2, 0, 0, running())], t0);
    e.runner_closed(c(1), t0);
    // Destroy both while disconnected: the stops are queued.
    let a = e.destroy_actor("default", &id, t0).unwrap();
    assert!(commands(&a).is_empty());
    e.destroy_actor("default", &id2, t0).unwrap();
    let a = e.runner_init(c(2), "default", "k1", init("default", 10), t0);
    // id2's start was proven: its stop goes out at once. id's stop must not overtake its
    // start, which is in doubt.
    let s: Vec<ActorCheckpoint> = commands(&a)
        .into_iter()
        .map(|(_, w)| w.checkpoint)
        .collect();
    assert_eq!(s, vec![cp(&id2, 0, 1)]);
    // The runner does not hold id (no event before the fence): destroyed without a command.
    let a = e.runner_pong(c(2), fence_ts(&a).unwrap(), t0);
    assert!(commands(&a).is_empty());
    assert!(a.contains(&Action::ActorDestroyed {
        actor_id: id.clone()
    }));
}
