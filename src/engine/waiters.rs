//! Waiting lookups: a lookup answered `Pending` keeps a waiter until its actor is routable
//! (answered with the route), destroyed, or `wake_timeout` passes; the route a waiter gets
//! (`route_of`), cancelling a waiter, and the timeouts.
//!
//! Must never answer a waiter twice, nor drop one unanswered unless its caller cancelled it.

use std::time::Instant;

use super::actor::{Actor, ActorStatus};
use super::{Action, ConnRef, Engine, ResolveError, Route, RunnerIdx};

impl Engine {
    /// Forget a waiter (its client went away). No `Resolved` will be emitted for it.
    pub fn cancel_waiter(&mut self, waiter: u64) {
        if let Some(w) = self.waiters.remove(&waiter) {
            self.waiter_deadlines.remove(&(w.deadline, waiter));
            if let Some(a) = self.actors.get_mut(&w.actor_id) {
                a.waiters.retain(|x| *x != waiter);
            }
        }
    }

    pub(super) fn route_of(&self, a: &Actor) -> Option<Route> {
        if a.status != ActorStatus::Running {
            return None;
        }
        let idx = a.runner?;
        let r = self.runners.get(idx)?;
        if !r.proven(&a.id, a.generation) {
            return None;
        }
        let conn: ConnRef = r.conn?;
        Some(Route {
            actor_id: a.id.clone(),
            generation: a.generation,
            runner_idx: RunnerIdx::try_from(idx).ok()?,
            conn,
        })
    }

    /// Answer every waiter of a routable actor.
    pub(super) fn answer_waiters(&mut self, actor_id: &str) {
        let Some(a) = self.actors.get(actor_id) else {
            return;
        };
        if a.waiters.is_empty() {
            return;
        }
        let Some(route) = self.route_of(a) else {
            return;
        };
        let waiters = match self.actors.get_mut(actor_id) {
            Some(a) => std::mem::take(&mut a.waiters),
            None => return,
        };
        for w in waiters {
            if let Some(wt) = self.waiters.remove(&w) {
                self.waiter_deadlines.remove(&(wt.deadline, w));
            }
            self.out.push(Action::Resolved {
                waiter: w,
                result: Ok(route.clone()),
            });
        }
    }

    pub(super) fn fail_waiters(&mut self, actor_id: &str, err: ResolveError) {
        let waiters = match self.actors.get_mut(actor_id) {
            Some(a) => std::mem::take(&mut a.waiters),
            None => return,
        };
        for w in waiters {
            if let Some(wt) = self.waiters.remove(&w) {
                self.waiter_deadlines.remove(&(wt.deadline, w));
            }
            self.out.push(Action::Resolved {
                waiter: w,
                result: Err(err),
            });
        }
    }

    /// After a runner (re)attached: its running actors are routable again.
    pub(super) fn answer_runner_waiters(&mut self, idx: usize) {
        let Some(r) = self.runners.get(idx) else {
            return;
        };
        let ids: Vec<String> = r.actors.iter().cloned().collect();
        for id in ids {
            self.answer_waiters(&id);
        }
    }

    pub(super) fn expire_waiters(&mut self, now: Instant) {
        while let Some(&(deadline, w)) = self.waiter_deadlines.first() {
            if deadline > now {
                break;
            }
            self.waiter_deadlines.pop_first();
            if let Some(wt) = self.waiters.remove(&w) {
                if let Some(a) = self.actors.get_mut(&wt.actor_id) {
                    a.waiters.retain(|x| *x != w);
                }
                self.out.push(Action::Resolved {
                    waiter: w,
                    result: Err(ResolveError::Timeout),
                });
            }
        }
    }
}
