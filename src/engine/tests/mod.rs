//! Unit tests of the control plane and its HTTP API. Deterministic: time is an `Instant` base
//! plus offsets; the rng is seeded.
//!
//! One file per concern; this module holds the helpers they share.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::api::{self, handle};
use super::*;
use crate::protocol::*;

mod actors;
mod delivery;
mod durability;
mod http_api;
mod lifecycle;
mod limits;
mod pools;
mod restarts;
mod runner_configs;
mod sessions;
mod sim;

const T0_MS: i64 = 1_700_000_000_000;

fn c(slot: u32) -> ConnRef {
    ConnRef {
        node: [0; 4],
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
// Engine API calls

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

// ---------------------------------------------------------------------------------------------
// Lifecycle events and start commands

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

// ---------------------------------------------------------------------------------------------
// A store for the engine's records, and restarts

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
