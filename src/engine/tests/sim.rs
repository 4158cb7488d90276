//! Seeded simulation against a model of @rivetkit/engine-runner@2.2.1's command handling.

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
                                self.starts_seen
                                    .insert((rid, cp.actor_id.clone(), cp.generation)),
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
        node: [0; 4],
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
