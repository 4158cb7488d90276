//! The end of a placement: stop requests (sleep, or destroy), an actor going down (it reported
//! `Stopped`, its stop timed out, or its runner was lost) and its crash policy, a placement
//! its runner turned out not to hold, and final destruction; with the count of live actors
//! per namespace that creation and destruction keep.
//!
//! Must never leave a destroyed actor reachable: destruction frees its key, alarm, pending
//! place and hibernating records, and fails its waiters.

use std::time::Instant;

use super::actor::{mark, set_deadline, ActorStatus, CrashPolicy};
use super::placement::push_command;
use super::runners::CmdState;
use super::store_keys::hib_delete;
use super::{Action, Engine, ResolveError};
use crate::protocol::{Command, StopCode};

impl Engine {
    /// Ask the runner to stop the actor (sleep, or destroy when `destroy`).
    pub(super) fn request_stop(&mut self, actor_id: &str, destroy: bool, now: Instant) {
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        if destroy && !a.destroy_requested && a.status != ActorStatus::Destroyed {
            a.destroy_requested = true;
            mark(&mut self.dirty, a);
        }
        match a.status {
            ActorStatus::Starting | ActorStatus::Running => {
                let Some(idx) = a.runner else {
                    return;
                };
                let Some(r) = self.runners.get_mut(idx) else {
                    return;
                };
                a.status = ActorStatus::Stopping;
                push_command(a, r, Command::StopActor, CmdState::Unsent);
                let deadline = now + self.cfg.actor_stop_threshold;
                set_deadline(&mut self.actor_deadlines, a, Some(deadline));
                self.flush(idx);
            }
            ActorStatus::Sleeping if destroy => self.destroy(actor_id, now),
            ActorStatus::Sleeping | ActorStatus::Stopping | ActorStatus::Destroyed => {}
        }
    }

    /// The actor is no longer on a runner (it stopped, or its runner was lost). `from` is the
    /// runner it was on, if that runner record still exists.
    pub(super) fn actor_down(
        &mut self,
        actor_id: &str,
        from: Option<(usize, StopCode)>,
        now: Instant,
    ) {
        let now_ms = self.unix_ms(now);
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        if let Some((idx, _)) = from {
            if let Some(r) = self.runners.get_mut(idx) {
                r.actors.remove(actor_id);
                r.prune_actor(actor_id, a.generation);
            }
        }
        let crashed = matches!(from, Some((_, StopCode::Error)));
        set_deadline(&mut self.actor_deadlines, a, None);
        a.runner = None;
        a.status = ActorStatus::Sleeping;
        a.sleep_ts = Some(now_ms);
        a.connectable_ts = None;
        mark(&mut self.dirty, a);
        self.out.push(Action::ActorStopped {
            actor_id: actor_id.to_string(),
        });
        let destroy = a.destroy_requested || (crashed && a.crash_policy == CrashPolicy::Destroy);
        let wake = a.wake_after_stop
            || !a.waiters.is_empty()
            || (crashed && a.crash_policy == CrashPolicy::Restart);
        a.wake_after_stop = false;
        if destroy {
            self.destroy(actor_id, now);
        } else if wake {
            self.want_running(actor_id, now);
        }
    }

    /// The runner does not hold generation `generation` of the actor although it was placed
    /// there (see `runner_pong`): the placement is over. An actor that was meant to run gets a
    /// new generation; one that was stopping is stopped.
    pub(super) fn placement_vanished(
        &mut self,
        actor_id: &str,
        generation: u32,
        idx: usize,
        now: Instant,
    ) {
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        if a.runner != Some(idx) || a.generation != generation || !a.status.placed() {
            return;
        }
        if a.status == ActorStatus::Starting {
            a.wake_after_stop = true;
        }
        self.actor_down(actor_id, Some((idx, StopCode::Ok)), now);
    }

    /// Final: the actor is destroyed.
    pub(super) fn destroy(&mut self, actor_id: &str, now: Instant) {
        let now_ms = self.unix_ms(now);
        let retention = self.cfg.destroyed_retention;
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        if a.status == ActorStatus::Destroyed {
            return;
        }
        if let Some(idx) = a.runner.take() {
            if let Some(r) = self.runners.get_mut(idx) {
                r.actors.remove(actor_id);
                r.prune_actor(actor_id, a.generation);
            }
        }
        set_deadline(&mut self.actor_deadlines, a, None);
        a.status = ActorStatus::Destroyed;
        a.destroy_ts = Some(now_ms);
        mark(&mut self.dirty, a);
        a.has_input = false;
        for (h, _) in a.hibernating.drain() {
            self.hib_ops.push(hib_delete(actor_id, h));
        }
        a.pending = false;
        if let Some(ts) = a.alarm_ts.take() {
            self.alarms.remove(&(ts, actor_id.to_string()));
        }
        if let Some(key) = &a.key {
            let k = (a.namespace.clone(), a.name.clone(), key.clone());
            if self.actor_by_key.get(&k).is_some_and(|v| v == actor_id) {
                self.actor_by_key.remove(&k);
            }
        }
        let namespace = a.namespace.clone();
        self.count_live(&namespace, false);
        self.destroyed_gc
            .insert((now + retention, actor_id.to_string()));
        self.out.push(Action::ActorDestroyed {
            actor_id: actor_id.to_string(),
        });
        self.fail_waiters(actor_id, ResolveError::Destroyed);
    }

    /// Count one live actor more (`up`) or less in its namespace.
    pub(super) fn count_live(&mut self, namespace: &str, up: bool) {
        if up {
            self.live_actors += 1;
            *self
                .live_by_namespace
                .entry(namespace.to_string())
                .or_default() += 1;
            return;
        }
        self.live_actors = self.live_actors.saturating_sub(1);
        if let Some(n) = self.live_by_namespace.get_mut(namespace) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.live_by_namespace.remove(namespace);
            }
        }
    }
}
