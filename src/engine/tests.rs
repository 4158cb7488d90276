//! Unit tests of the control plane and its HTTP API. Deterministic: time is an `Instant` base
//! plus offsets; the rng is seeded.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::api::{self, handle};
use super::*;
use crate::protocol::*;

const T0_MS: i64 = 1_700_000_000_000;

fn c(slot: u32) -> ConnRef {
    ConnRef {
        shard: 0,
        slot,
        gen: 1,
    }
}

fn new_engine() -> (Engine, Instant) {
    let t0 = Instant::now();
    (Engine::new(EngineConfig::default(), 7, t0, T0_MS), t0)
}

fn init(name: &str, slots: u32) -> ToServerInit {
    ToServerInit {
        name: name.to_string(),
        version: 1,
        total_slots: slots,
        prepopulate_actor_names: None,
        metadata: None,
    }
}

fn secs(t: Instant, s: f64) -> Instant {
    t + Duration::from_secs_f64(s)
}

fn runner_id_of(actions: &[Action]) -> String {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Send {
                msg: ToClient::Init(i),
                ..
            } => Some(i.runner_id.clone()),
            _ => None,
        })
        .expect("an Init reply")
}

fn commands(actions: &[Action]) -> Vec<(ConnRef, CommandWrapper)> {
    let mut out = Vec::new();
    for a in actions {
        if let Action::Send {
            conn,
            msg: ToClient::Commands(cmds),
        } = a
        {
            for c in cmds {
                out.push((*conn, c.clone()));
            }
        }
    }
    out
}

fn starts(actions: &[Action]) -> Vec<CommandWrapper> {
    commands(actions)
        .into_iter()
        .filter(|(_, c)| matches!(c.inner, Command::StartActor(_)))
        .map(|(_, c)| c)
        .collect()
}

fn stops(actions: &[Action]) -> Vec<CommandWrapper> {
    commands(actions)
        .into_iter()
        .filter(|(_, c)| matches!(c.inner, Command::StopActor))
        .map(|(_, c)| c)
        .collect()
}

fn acks(actions: &[Action]) -> Vec<Vec<ActorCheckpoint>> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                msg: ToClient::AckEvents(ack),
                ..
            } => Some(ack.last_event_checkpoints.clone()),
            _ => None,
        })
        .collect()
}

fn fence_ts(actions: &[Action]) -> Option<i64> {
    actions.iter().find_map(|a| match a {
        Action::Send {
            msg: ToClient::Ping(p),
            ..
        } => Some(p.ts),
        _ => None,
    })
}

fn cp(actor: &str, generation: u32, index: i64) -> ActorCheckpoint {
    ActorCheckpoint {
        actor_id: actor.to_string(),
        generation,
        index,
    }
}

fn ev(actor: &str, generation: u32, index: i64, inner: Event) -> EventWrapper {
    EventWrapper {
        checkpoint: cp(actor, generation, index),
        inner,
    }
}

fn running() -> Event {
    Event::ActorStateUpdate(EventActorStateUpdate {
        state: ActorState::Running,
    })
}

fn stopped(code: StopCode) -> Event {
    Event::ActorStateUpdate(EventActorStateUpdate {
        state: ActorState::Stopped(ActorStateStopped {
            code,
            message: None,
        }),
    })
}

fn intent(i: ActorIntent) -> Event {
    Event::ActorIntent(EventActorIntent { intent: i })
}

fn create(e: &mut Engine, name: &str, key: Option<&str>, t: Instant) -> (String, Vec<Action>) {
    let (info, actions) = e
        .create_actor(
            CreateActor {
                namespace: "default".into(),
                name: name.into(),
                key: key.map(str::to_string),
                runner_name: None,
                input: None,
                crash_policy: CrashPolicy::Sleep,
            },
            t,
        )
        .expect("create");
    (info.actor_id, actions)
}

fn status(e: &Engine, id: &str) -> ActorStatus {
    e.actor(id).expect("actor").status
}

/// A runner on `c(1)` with one running actor; returns (engine, t0, actor id, runner id).
fn running_actor() -> (Engine, Instant, String, String) {
    let (mut e, t0) = new_engine();
    let a = e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let rid = runner_id_of(&a);
    let (id, a) = create(&mut e, "counter", Some("x"), t0);
    assert_eq!(starts(&a).len(), 1);
    let a = e.runner_events(c(1), vec![ev(&id, 0, 0, running())], t0);
    assert!(a.contains(&Action::ActorRunning {
        actor_id: id.clone(),
        generation: 0,
        runner_idx: 0
    }));
    (e, t0, id, rid)
}

// ---------------------------------------------------------------------------------------------
// Runner sessions

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

// ---------------------------------------------------------------------------------------------
// Command delivery across reconnects

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

// ---------------------------------------------------------------------------------------------
// Actors, events, placement

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

// ---------------------------------------------------------------------------------------------
// HTTP API

fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn call(
    e: &mut Engine,
    method: &str,
    path: &str,
    query: &[(&str, &str)],
    body: Value,
    t: Instant,
) -> (u16, Value, Vec<Action>) {
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let r = handle(e, method, path, &q(query), &body, t);
    let v: Value = serde_json::from_str(&r.body).expect("JSON body");
    (r.status, v, r.actions)
}

const NS: (&str, &str) = ("namespace", "default");

#[test]
fn api_create_shape() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    // Exactly what RemoteManagerDriver.createActor sends ("input" is base64 of CBOR).
    let (status, v, actions) = call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({
            "name": "counter",
            "runner_name_selector": "default",
            "key": "a/b",
            "input": "oWF4AQ==",
            "crash_policy": "sleep"
        }),
        t0,
    );
    assert_eq!(status, 200);
    let actor = &v["actor"];
    let id = actor["actor_id"].as_str().unwrap().to_string();
    assert_eq!(
        *actor,
        json!({
            "actor_id": id,
            "name": "counter",
            "key": "a/b",
            "namespace_id": "default",
            "datacenter": "default",
            "runner_name_selector": "default",
            "crash_policy": "sleep",
            "create_ts": T0_MS,
            "start_ts": T0_MS,
            "pending_allocation_ts": null,
            "connectable_ts": null,
            "sleep_ts": null,
            "reschedule_ts": null,
            "destroy_ts": null,
        })
    );
    // The create started the actor, with the decoded input.
    match &starts(&actions)[0].inner {
        Command::StartActor(s) => {
            assert_eq!(s.config.input, Some(vec![0xa1, 0x61, 0x78, 0x01]));
            assert_eq!(s.config.key.as_deref(), Some("a/b"));
        }
        _ => unreachable!(),
    }
    // Same key again: the client gets {group, code, message}.
    let (status, v, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({"name": "counter", "runner_name_selector": "default", "key": "a/b", "crash_policy": "sleep"}),
        t0,
    );
    assert_eq!(status, 400);
    assert_eq!(v["group"], "actor");
    assert_eq!(v["code"], "duplicate_key");
    assert!(v["message"].is_string());
}

#[test]
fn api_get_by_id_and_key() {
    let (mut e, t0) = new_engine();
    let (_, v, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({"name": "counter", "runner_name_selector": "default", "key": "k1", "crash_policy": "sleep"}),
        t0,
    );
    let id = v["actor"]["actor_id"].as_str().unwrap().to_string();
    // getForId: GET /actors?actor_ids=<id>&namespace=default → actors[0]
    let (status, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("actor_ids", &id), NS],
        Value::Null,
        t0,
    );
    assert_eq!(status, 200);
    assert_eq!(v["actors"].as_array().unwrap().len(), 1);
    assert_eq!(v["actors"][0]["actor_id"], json!(id));
    assert_eq!(
        v["actors"][0]["pending_allocation_ts"],
        json!(T0_MS),
        "no runner yet"
    );
    // getWithKey: GET /actors?name=&key=
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "counter"), ("key", "k1"), NS],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"][0]["actor_id"], json!(id));
    // Missing key → empty list with 200 (the client reads actors[0] and treats none as absent).
    let (status, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "counter"), ("key", "zz"), NS],
        Value::Null,
        t0,
    );
    assert_eq!(status, 200);
    assert_eq!(v["actors"], json!([]));
    let (status, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("actor_ids", "nope"), NS],
        Value::Null,
        t0,
    );
    assert_eq!((status, v["actors"].clone()), (200, json!([])));
    // Another namespace does not see it.
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("actor_ids", &id), ("namespace", "other")],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"], json!([]));
    // key without name is a bad request.
    let (status, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("key", "k1"), NS],
        Value::Null,
        t0,
    );
    assert_eq!(status, 400);
    assert_eq!(v["code"], "bad_request");
    // GET /actors/{id}
    let (status, v, _) = call(
        &mut e,
        "GET",
        &format!("/actors/{id}"),
        &[NS],
        Value::Null,
        t0,
    );
    assert_eq!(status, 200);
    assert_eq!(v["actor"]["name"], "counter");
    let (status, v, _) = call(&mut e, "GET", "/actors/nope", &[NS], Value::Null, t0);
    assert_eq!(status, 404);
    assert_eq!(
        (v["group"].as_str(), v["code"].as_str()),
        (Some("actor"), Some("not_found"))
    );
}

#[test]
fn api_get_or_create_shape() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let body = json!({
        "name": "chat",
        "key": "room",
        "runner_name_selector": "default",
        "crash_policy": "sleep"
    });
    let (status, v, actions) = call(&mut e, "PUT", "/actors", &[NS], body.clone(), t0);
    assert_eq!(status, 200);
    assert_eq!(v["created"], json!(true));
    assert_eq!(starts(&actions).len(), 1);
    let id = v["actor"]["actor_id"].clone();
    let (status, v, actions) = call(&mut e, "PUT", "/actors", &[NS], body, t0);
    assert_eq!(status, 200);
    assert_eq!(v["created"], json!(false));
    assert_eq!(v["actor"]["actor_id"], id);
    assert!(actions.is_empty());
    // key is required for get-or-create.
    let (status, _, _) = call(
        &mut e,
        "PUT",
        "/actors",
        &[NS],
        json!({"name": "chat", "runner_name_selector": "default", "crash_policy": "sleep"}),
        t0,
    );
    assert_eq!(status, 400);
}

#[test]
fn api_list_by_name_with_pagination() {
    let (mut e, t0) = new_engine();
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, v, _) = call(
            &mut e,
            "POST",
            "/actors",
            &[NS],
            json!({"name": "n", "runner_name_selector": "default", "key": format!("{i}"), "crash_policy": "sleep"}),
            t0,
        );
        ids.push(v["actor"]["actor_id"].clone());
    }
    call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({"name": "other", "runner_name_selector": "default", "crash_policy": "sleep"}),
        t0,
    );
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "n"), NS],
        Value::Null,
        t0,
    );
    let got: Vec<Value> = v["actors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["actor_id"].clone())
        .collect();
    assert_eq!(got, ids);
    assert_eq!(v["pagination"]["cursor"], Value::Null);
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "n"), ("limit", "2"), NS],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"].as_array().unwrap().len(), 2);
    let cursor = v["pagination"]["cursor"].as_str().unwrap().to_string();
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "n"), ("cursor", &cursor), NS],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"].as_array().unwrap().len(), 1);
    assert_eq!(v["actors"][0]["actor_id"], ids[2]);
}

#[test]
fn api_destroy() {
    let (mut e, t0, id, _) = running_actor();
    let (status, v, actions) = call(
        &mut e,
        "DELETE",
        &format!("/actors/{id}"),
        &[NS],
        Value::Null,
        t0,
    );
    assert_eq!((status, v), (200, json!({})));
    assert_eq!(stops(&actions)[0].checkpoint, cp(&id, 0, 1));
    let a = e.runner_events(
        c(1),
        vec![ev(&id, 0, 1, stopped(StopCode::Ok))],
        secs(t0, 1.0),
    );
    assert!(a.contains(&Action::ActorDestroyed {
        actor_id: id.clone()
    }));
    // By id it is still visible, with destroy_ts; by key and by name it is gone.
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("actor_ids", &id), NS],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"][0]["destroy_ts"], json!(T0_MS + 1000));
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "counter"), ("key", "x"), NS],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"], json!([]));
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "counter"), NS],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"], json!([]));
    // Idempotent; unknown → 404 actor.not_found.
    let (status, _, _) = call(
        &mut e,
        "DELETE",
        &format!("/actors/{id}"),
        &[NS],
        Value::Null,
        t0,
    );
    assert_eq!(status, 200);
    let (status, v, _) = call(&mut e, "DELETE", "/actors/unknown", &[NS], Value::Null, t0);
    assert_eq!(status, 404);
    assert_eq!(v["group"], "actor");
    assert_eq!(v["code"], "not_found");
    // A sleeping actor is destroyed at once.
    let (_, v, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[("namespace", "ns2")],
        json!({"name": "n", "runner_name_selector": "default", "crash_policy": "sleep"}),
        t0,
    );
    let id2 = v["actor"]["actor_id"].as_str().unwrap().to_string();
    let (_, _, actions) = call(
        &mut e,
        "DELETE",
        &format!("/actors/{id2}"),
        &[("namespace", "ns2")],
        Value::Null,
        t0,
    );
    assert_eq!(
        actions,
        vec![Action::ActorDestroyed {
            actor_id: id2.clone()
        }]
    );
}

#[test]
fn api_metadata_datacenters_names_and_errors() {
    let (mut e, t0) = new_engine();
    let (status, v, _) = call(&mut e, "GET", "/metadata", &[NS], Value::Null, t0);
    assert_eq!(status, 200);
    assert_eq!(v["runtime"], "engine");
    assert!(v["version"].is_string());
    assert!(
        v.get("clientEndpoint").is_none(),
        "would redirect the client"
    );
    let (_, v, _) = call(&mut e, "GET", "/health", &[], Value::Null, t0);
    assert_eq!(v["runtime"], "engine");
    assert_eq!(v["status"], "ok");
    let (_, v, _) = call(&mut e, "GET", "/datacenters", &[NS], Value::Null, t0);
    assert_eq!(
        v,
        json!({
            "datacenters": [{"label": 1, "name": "default", "url": "http://127.0.0.1:6420"}],
            "pagination": {"cursor": null}
        })
    );
    let mut i = init("default", 1);
    i.prepopulate_actor_names = Some(ActorNameMap(vec![
        (
            "counter".into(),
            ActorName {
                metadata: r#"{"name":"Counter"}"#.into(),
            },
        ),
        (
            "broken".into(),
            ActorName {
                metadata: "not json".into(),
            },
        ),
    ]));
    e.runner_init(c(1), "default", "k", i, t0);
    let (_, v, _) = call(&mut e, "GET", "/actors/names", &[NS], Value::Null, t0);
    assert_eq!(
        v["names"],
        json!({"counter": {"metadata": {"name": "Counter"}}, "broken": {"metadata": {}}})
    );
    // Errors
    let r = handle(&mut e, "POST", "/actors", &q(&[NS]), b"{not json", t0);
    assert_eq!(r.status, 400);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (v["group"].as_str(), v["code"].as_str()),
        (Some("api"), Some("bad_request"))
    );
    let (status, _, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({"name": "n", "runner_name_selector": "default", "crash_policy": "sleep", "input": "***"}),
        t0,
    );
    assert_eq!(status, 400);
    let (status, v, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({"name": "n", "runner_name_selector": "default", "crash_policy": "sleep", "datacenter": "mars"}),
        t0,
    );
    assert_eq!((status, v["code"].as_str()), (400, Some("not_found")));
    let (status, _, _) = call(&mut e, "PATCH", "/actors", &[NS], Value::Null, t0);
    assert_eq!(status, 405);
    let (status, v, _) = call(&mut e, "GET", "/nope", &[], Value::Null, t0);
    assert_eq!((status, v["group"].as_str()), (404, Some("api")));
}

#[test]
fn api_query_parsing() {
    assert_eq!(
        api::parse_query("name=a%2Fb&key=x+y&namespace=default&flag"),
        q(&[
            ("name", "a/b"),
            ("key", "x y"),
            ("namespace", "default"),
            ("flag", "")
        ])
    );
    assert_eq!(
        api::parse_query("a=%zz&b=1"),
        q(&[("a", "%zz"), ("b", "1")])
    );
    assert_eq!(api::percent_decode("%E2%9C%93"), Some("✓".to_string()));
    assert_eq!(api::percent_decode("%E2%9C"), None);
    assert_eq!(api::percent_decode("%4"), None);
}

// ---------------------------------------------------------------------------------------------
// Seeded simulation against a model of @rivetkit/engine-runner@2.2.1's command handling

mod sim {
    use std::collections::{HashMap, HashSet, VecDeque};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// What the TS runner keeps per actor: generation, next event index, unacked events.
    struct ModelActor {
        generation: u32,
        next_event: i64,
        history: Vec<EventWrapper>,
    }

    struct Model {
        runner_id: Option<String>,
        actors: HashMap<String, ModelActor>,
        /// (runnerId, actor, generation) of every start the runner handled.
        starts_seen: HashSet<(String, String, u32)>,
        conn: Option<ConnRef>,
        to_runner: VecDeque<ToClient>,
        to_server: VecDeque<ToServer>,
        next_slot: u32,
    }

    impl Model {
        fn emit(&mut self, actor_id: &str, inner: Event) {
            let Some(a) = self.actors.get_mut(actor_id) else {
                return;
            };
            let w = ev(actor_id, a.generation, a.next_event, inner);
            a.next_event += 1;
            a.history.push(w.clone());
            self.to_server.push_back(ToServer::Events(vec![w]));
        }

        /// The runner handling one message, as mod.js does.
        fn handle(&mut self, msg: ToClient) {
            match msg {
                ToClient::Init(i) => {
                    if self.runner_id.as_deref() != Some(i.runner_id.as_str()) {
                        self.runner_id = Some(i.runner_id);
                        let ids: Vec<String> = self.actors.keys().cloned().collect();
                        for id in ids {
                            self.emit(&id, stopped(StopCode::Error));
                            self.actors.remove(&id);
                        }
                    }
                    let all: Vec<EventWrapper> = self
                        .actors
                        .values()
                        .flat_map(|a| a.history.clone())
                        .collect();
                    if !all.is_empty() {
                        self.to_server.push_back(ToServer::Events(all));
                    }
                }
                ToClient::Commands(cmds) => {
                    for cmd in cmds {
                        let cp = cmd.checkpoint;
                        match cmd.inner {
                            Command::StartActor(_) => {
                                let rid = self.runner_id.clone().expect("init first");
                                assert!(
                                    self.starts_seen.insert((
                                        rid,
                                        cp.actor_id.clone(),
                                        cp.generation
                                    )),
                                    "duplicate CommandStartActor for {cp:?}"
                                );
                                self.actors.insert(
                                    cp.actor_id.clone(),
                                    ModelActor {
                                        generation: cp.generation,
                                        next_event: 0,
                                        history: Vec::new(),
                                    },
                                );
                                self.emit(&cp.actor_id, running());
                            }
                            Command::StopActor => {
                                if self
                                    .actors
                                    .get(&cp.actor_id)
                                    .is_some_and(|a| a.generation == cp.generation)
                                {
                                    self.emit(&cp.actor_id, stopped(StopCode::Ok));
                                    self.actors.remove(&cp.actor_id);
                                }
                            }
                        }
                    }
                }
                ToClient::AckEvents(ack) => {
                    // mod.js: per actor in the map, the first checkpoint with its id, whatever
                    // the generation.
                    for (id, a) in self.actors.iter_mut() {
                        if let Some(c) = ack
                            .last_event_checkpoints
                            .iter()
                            .find(|c| c.actor_id == *id)
                        {
                            let idx = c.index;
                            a.history.retain(|h| h.checkpoint.index > idx);
                        }
                    }
                }
                ToClient::Ping(p) => self
                    .to_server
                    .push_back(ToServer::Pong(ToServerPong { ts: p.ts })),
                ToClient::KvResponse(_) | ToClient::TunnelMessage(_) => {}
            }
        }
    }

    fn apply(m: &mut Model, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Send { conn, msg } if Some(conn) == m.conn => m.to_runner.push_back(msg),
                Action::CloseRunner { conn, .. } if Some(conn) == m.conn => {
                    m.conn = None;
                    m.to_runner.clear();
                    m.to_server.clear();
                }
                _ => {}
            }
        }
    }

    fn connect(e: &mut Engine, m: &mut Model, now: Instant) {
        m.next_slot += 1;
        let conn = ConnRef {
            shard: 0,
            slot: m.next_slot,
            gen: 0,
        };
        m.conn = Some(conn);
        m.to_runner.clear();
        m.to_server.clear();
        let a = e.runner_init(conn, "default", "k", init("default", 3), now);
        apply(m, a);
    }

    fn run(seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let t0 = Instant::now();
        let mut now = t0;
        let mut e = Engine::new(EngineConfig::default(), seed, t0, T0_MS);
        let mut m = Model {
            runner_id: None,
            actors: HashMap::new(),
            starts_seen: HashSet::new(),
            conn: None,
            to_runner: VecDeque::new(),
            to_server: VecDeque::new(),
            next_slot: 0,
        };
        let mut ids: Vec<String> = Vec::new();
        let mut waiter = 0u64;
        connect(&mut e, &mut m, now);
        for _ in 0..400 {
            match rng.random_range(0..100) {
                0..=34 => {
                    if let Some(msg) = m.to_runner.pop_front() {
                        m.handle(msg);
                    }
                }
                35..=69 => {
                    if let (Some(conn), Some(msg)) = (m.conn, m.to_server.pop_front()) {
                        let a = e.runner_message(conn, msg, now);
                        apply(&mut m, a);
                    }
                }
                70..=74 => {
                    // The socket dies; whatever was in flight is lost.
                    if let Some(conn) = m.conn.take() {
                        m.to_runner.clear();
                        m.to_server.clear();
                        let a = e.runner_closed(conn, now);
                        apply(&mut m, a);
                    }
                }
                75..=79 => {
                    if m.conn.is_none() {
                        connect(&mut e, &mut m, now);
                    } else if rng.random_range(0..4) == 0 {
                        // A second connection of the same runner: evicts the first.
                        connect(&mut e, &mut m, now);
                    }
                }
                80..=84 => {
                    if ids.len() < 6 {
                        let (id, a) = create(&mut e, "n", None, now);
                        ids.push(id);
                        apply(&mut m, a);
                    }
                }
                85..=89 => {
                    if !ids.is_empty() {
                        let id = ids[rng.random_range(0..ids.len())].clone();
                        waiter += 1;
                        let (_, a) = e.resolve(&id, waiter, now);
                        apply(&mut m, a);
                    }
                }
                90..=94 => {
                    // The runner asks an actor to sleep.
                    if let Some(id) = m.actors.keys().next().cloned() {
                        if m.conn.is_some() {
                            m.emit(&id, intent(ActorIntent::Sleep));
                        }
                    }
                }
                _ => {
                    let step = if rng.random_range(0..20) == 0 {
                        20.0
                    } else {
                        1.0
                    };
                    now += Duration::from_secs_f64(step);
                    let a = e.tick(now);
                    apply(&mut m, a);
                }
            }
        }
        // Quiesce: connect if needed, deliver everything both ways, let deadlines pass.
        if m.conn.is_none() {
            connect(&mut e, &mut m, now);
        }
        for _round in 0..4 {
            for _ in 0..1000 {
                if let Some(msg) = m.to_runner.pop_front() {
                    m.handle(msg);
                } else if let Some(msg) = m.to_server.pop_front() {
                    let conn = m.conn.expect("connected");
                    let a = e.runner_message(conn, msg, now);
                    apply(&mut m, a);
                } else {
                    break;
                }
            }
            now += Duration::from_secs(31);
            let a = e.tick(now);
            apply(&mut m, a);
        }
        // Engine and runner agree on what runs where.
        for id in &ids {
            let info = e.actor(id).expect("actor");
            match info.status {
                ActorStatus::Running => {
                    let ma = m.actors.get(id).unwrap_or_else(|| {
                        panic!("seed {seed}: engine thinks {id} runs, runner lacks it")
                    });
                    assert_eq!(ma.generation, info.generation, "seed {seed}");
                }
                ActorStatus::Sleeping => {
                    assert!(
                        !m.actors.contains_key(id),
                        "seed {seed}: runner still has {id}"
                    );
                }
                other => panic!("seed {seed}: {id} stuck in {other:?}"),
            }
        }
    }

    #[test]
    fn never_a_duplicate_start_and_engine_agrees_with_runner() {
        for seed in std::env::var("ESEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(0..300, |s: u64| s..s + 1)
        {
            run(seed);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lifecycle (SPEC §1.4.4–5, §1.5, §2.6)

fn alarm(ts: Option<i64>) -> Event {
    Event::ActorSetAlarm(EventActorSetAlarm { alarm_ts: ts })
}

fn hib(n: u8) -> HibernatingRequest {
    HibernatingRequest {
        gateway_id: [9, 9, 9, 9],
        request_id: [0, 0, 0, n],
    }
}

fn start_of(actions: &[Action]) -> (ActorCheckpoint, CommandStartActor) {
    let s = starts(actions);
    assert_eq!(s.len(), 1, "one start expected in {actions:?}");
    match &s[0].inner {
        Command::StartActor(x) => (s[0].checkpoint.clone(), x.clone()),
        Command::StopActor => unreachable!(),
    }
}

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

// ---------------------------------------------------------------------------------------------
// Durable actors

type Store = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;

fn apply_ops(store: &mut Store, ops: Vec<StoreOp>) {
    for op in ops {
        match op {
            StoreOp::Put { key, value } => {
                store.insert(key, value);
            }
            StoreOp::Delete { key } => {
                store.remove(&key);
            }
        }
    }
}

/// What the shell does with `take_input_loads`: read each input from the store and hand it to
/// the engine.
fn feed_inputs(e: &mut Engine, store: &Store, t: Instant) -> Vec<Action> {
    let mut out = Vec::new();
    for id in e.take_input_loads() {
        let input = store.get(&input_key(&id)).cloned();
        out.extend(e.input_loaded(&id, input, t));
    }
    out
}

fn flush(e: &mut Engine, store: &mut Store) {
    let ops = e.take_store_ops();
    apply_ops(store, ops);
}

fn record_in(store: &Store, id: &str) -> ActorRecord {
    ActorRecord::decode(&store[&actor_key(id)]).expect("record")
}

/// A second process: a fresh engine at `T0_MS + offset`, restored from `store`.
fn restarted(store: &Store, offset_s: u64) -> (Engine, Instant, RestoreReport) {
    let t1 = Instant::now();
    let mut e = Engine::new(
        EngineConfig::default(),
        99,
        t1,
        T0_MS + (offset_s as i64) * 1000,
    );
    let report = e.restore(store.clone(), t1);
    (e, t1, report)
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

// ---------------------------------------------------------------------------------------------
// Limits: runner Init, names, quotas, inputs

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

// ---------------------------------------------------------------------------------------------
// Runner restarts with the same key (SPEC §1.4.2, §1.4.5, §2.5, §2.6): whatever the old session
// left on the runner record and on its actors must not keep the new session from work.

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
