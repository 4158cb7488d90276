//! Runner events: `ToServer::Events` from a runner connection, de-duplicated by index,
//! acknowledged per batch, and applied to their actor (`Running`, `Stopped`, sleep and stop
//! intents, alarms).
//!
//! Must never act on an event whose (actor, generation) is not currently placed on the sending
//! runner, and never acknowledge such an event (the runner matches acknowledgements by actor id
//! only, so acknowledging an old generation would drop the new generation's history).

use std::collections::HashMap;
use std::time::Instant;

use super::actor::{set_deadline, ActorStatus};
use super::{Action, ConnRef, Engine, RunnerIdx};
use crate::protocol::{
    ActorCheckpoint, ActorIntent, ActorState, Event, EventWrapper, ToClient, ToClientAckEvents,
};

impl Engine {
    /// `ToServer::Events` from a runner connection.
    pub fn runner_events(
        &mut self,
        conn: ConnRef,
        events: Vec<EventWrapper>,
        now: Instant,
    ) -> Vec<Action> {
        let Some(&idx) = self.runner_by_conn.get(&conn) else {
            return Vec::new();
        };
        let mut acks: Vec<ActorCheckpoint> = Vec::new();
        let mut ack_pos: HashMap<String, usize> = HashMap::new();
        // Follow-up actions go after the AckEvents, so that an ack for generation g reaches
        // the runner before a start of generation g + 1 of the same actor.
        let before = std::mem::take(&mut self.out);
        // Running actors whose event proved, during a reconnect's possession check, that this
        // connection hosts them: their waiting lookups are answered after the batch.
        let mut proven: Vec<String> = Vec::new();
        for ev in events {
            let cp = ev.checkpoint;
            let Some(a) = self.actors.get_mut(&cp.actor_id) else {
                continue;
            };
            if a.runner != Some(idx) || a.generation != cp.generation || !a.status.placed() {
                continue;
            }
            if let Some(proof) = self.runners.get_mut(idx).and_then(|r| r.proof.as_mut()) {
                if proof.insert((cp.actor_id.clone(), cp.generation)) && !a.waiters.is_empty() {
                    proven.push(cp.actor_id.clone());
                }
            }
            // The latest event of a live instance stays unacknowledged: the runner re-sends
            // it after every Init, which proves it still hosts the actor (see
            // `Runner::proof`). `Stopped` ends the instance and is acknowledged in full.
            let terminal = matches!(
                ev.inner,
                Event::ActorStateUpdate(ref u) if matches!(u.state, ActorState::Stopped(_))
            );
            let ack = if terminal { cp.index } else { cp.index - 1 };
            match ack_pos.get(&cp.actor_id) {
                Some(&p) => {
                    if acks[p].index < ack {
                        acks[p].index = ack;
                    }
                }
                None => {
                    ack_pos.insert(cp.actor_id.clone(), acks.len());
                    let mut c = cp.clone();
                    c.index = ack;
                    acks.push(c);
                }
            }
            if cp.index <= a.last_event_idx {
                continue;
            }
            a.last_event_idx = cp.index;
            if let Some(r) = self.runners.get_mut(idx) {
                r.prune_start(&cp.actor_id, cp.generation);
            }
            self.apply_event(idx, &cp.actor_id, ev.inner, now);
        }
        for id in proven {
            self.answer_waiters(&id);
        }
        let follow = std::mem::replace(&mut self.out, before);
        acks.retain(|c| c.index >= 0);
        if !acks.is_empty() {
            self.out.push(Action::Send {
                conn,
                msg: ToClient::AckEvents(ToClientAckEvents {
                    last_event_checkpoints: acks,
                }),
            });
        }
        self.out.extend(follow);
        self.flush(idx);
        self.place_pending(now);
        self.take_out()
    }

    fn apply_event(&mut self, idx: usize, actor_id: &str, ev: Event, now: Instant) {
        match ev {
            Event::ActorStateUpdate(u) => match u.state {
                ActorState::Running => {
                    let now_ms = self.unix_ms(now);
                    let Some(a) = self.actors.get_mut(actor_id) else {
                        return;
                    };
                    if a.status != ActorStatus::Starting {
                        return;
                    }
                    a.status = ActorStatus::Running;
                    set_deadline(&mut self.actor_deadlines, a, None);
                    a.connectable_ts = Some(now_ms);
                    a.sleep_ts = None;
                    a.pending_allocation_ts = None;
                    let generation = a.generation;
                    if let Ok(runner_idx) = RunnerIdx::try_from(idx) {
                        self.out.push(Action::ActorRunning {
                            actor_id: actor_id.to_string(),
                            generation,
                            runner_idx,
                        });
                    }
                    self.answer_waiters(actor_id);
                }
                ActorState::Stopped(s) => self.actor_down(actor_id, Some((idx, s.code)), now),
            },
            Event::ActorIntent(i) => match i.intent {
                ActorIntent::Sleep => self.request_stop(actor_id, false, now),
                ActorIntent::Stop => self.request_stop(actor_id, true, now),
            },
            Event::ActorSetAlarm(s) => self.set_alarm(actor_id, s.alarm_ts),
        }
    }
}
