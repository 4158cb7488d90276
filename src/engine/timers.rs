//! Time-driven actor work, run from [`Engine::tick`]: alarms (set by the runner's events; a due
//! one wakes its actor), start and stop deadlines (re-armed for a runner back from a fence),
//! and forgetting destroyed actors after `destroyed_retention`.
//!
//! Must never end a stop while its runner cannot report it (disconnected or fenced): such a
//! stop is settled at the reconnect's fence, or by the runner's loss.

use std::time::Instant;

use super::actor::{mark, set_deadline, ActorStatus};
use super::store_keys::{actor_key, input_key};
use super::Engine;
use crate::protocol::StopCode;

impl Engine {
    pub(super) fn set_alarm(&mut self, actor_id: &str, ts: Option<i64>) {
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        if a.alarm_ts == ts {
            return;
        }
        if let Some(old) = a.alarm_ts.take() {
            self.alarms.remove(&(old, actor_id.to_string()));
        }
        if let Some(ts) = ts {
            a.alarm_ts = Some(ts);
            self.alarms.insert((ts, actor_id.to_string()));
        }
        mark(&mut self.dirty, a);
    }

    pub(super) fn fire_alarms(&mut self, now: Instant) {
        let now_ms = self.unix_ms(now);
        while let Some((ts, _)) = self.alarms.first() {
            if *ts > now_ms {
                break;
            }
            let Some((_, id)) = self.alarms.pop_first() else {
                break;
            };
            if let Some(a) = self.actors.get_mut(&id) {
                a.alarm_ts = None;
                mark(&mut self.dirty, a);
            }
            self.want_running(&id, now);
        }
    }

    /// A start that never reported `Running` is stopped; a stop that never reported `Stopped`
    /// is taken as done (with `StopCode::Error`, so the crash policy applies).
    pub(super) fn expire_actor_deadlines(&mut self, now: Instant) {
        while let Some((t, _)) = self.actor_deadlines.first() {
            if *t > now {
                break;
            }
            let Some((t, id)) = self.actor_deadlines.pop_first() else {
                break;
            };
            let Some(a) = self.actors.get_mut(&id) else {
                continue;
            };
            if a.deadline != Some(t) {
                continue;
            }
            a.deadline = None;
            match (a.status, a.runner) {
                (ActorStatus::Starting, _) => self.request_stop(&id, false, now),
                // A runner that still hosts the actor re-sends its unacknowledged latest event
                // after every reconnect, so a `Stopped` lost with a socket is settled at the
                // reconnect's fence (see `Runner::proof`), and a runner that never comes back
                // is lost after `runner_lost_threshold`. Only a stop that a connected runner
                // ignores ends here.
                (ActorStatus::Stopping, Some(idx))
                    if self
                        .runners
                        .get(idx)
                        .is_some_and(|r| r.conn.is_some() && r.fence.is_none()) =>
                {
                    self.actor_down(&id, Some((idx, StopCode::Error)), now)
                }
                _ => {}
            }
        }
        self.place_pending(now);
    }

    /// Give every stopping actor placed on runner `idx` that has no stop deadline a fresh
    /// one (its deadline passed while the runner was disconnected or fenced, when it cannot
    /// end the stop: see `expire_actor_deadlines`), and so every one whose stop command is
    /// written to the runner now (`stops_sent`: actor, generation): a runner that reconnects
    /// has the whole `actor_stop_threshold` to report a stop it gets again, not what was left
    /// of it when the stop was first sent.
    pub(super) fn rearm_stop_deadlines(
        &mut self,
        idx: usize,
        stops_sent: &[(String, u32)],
        now: Instant,
    ) {
        let Some(r) = self.runners.get(idx) else {
            return;
        };
        let deadline = now + self.cfg.actor_stop_threshold;
        for id in &r.actors {
            if let Some(a) = self.actors.get_mut(id) {
                let sent_now = stops_sent
                    .iter()
                    .any(|(id, generation)| *id == a.id && *generation == a.generation);
                if a.status == ActorStatus::Stopping && (a.deadline.is_none() || sent_now) {
                    set_deadline(&mut self.actor_deadlines, a, Some(deadline));
                }
            }
        }
    }

    pub(super) fn gc_destroyed(&mut self, now: Instant) {
        while let Some((at, _)) = self.destroyed_gc.first() {
            if *at > now {
                break;
            }
            let Some((_, id)) = self.destroyed_gc.pop_first() else {
                break;
            };
            if let Some(a) = self.actors.get(&id) {
                if a.status == ActorStatus::Destroyed {
                    let seq = a.seq;
                    let input_stored = a.input_stored;
                    self.actors.remove(&id);
                    self.actor_order.remove(&seq);
                    if input_stored {
                        self.store_deletes.push(input_key(&id));
                    }
                    self.store_deletes.push(actor_key(&id));
                }
            }
        }
    }
}
