//! Routing lookups for the data path: by actor id ([`Engine::resolve`]), by name and key with
//! get-or-create ([`Engine::resolve_by_name`]), a wake without a waiter ([`Engine::wake`]), and
//! the KV store's gate ([`Engine::actor_placed_on`]). A lookup that cannot be answered at once
//! wakes the actor and leaves a waiter (see `waiters`).
//!
//! Must never give a route before the runner proved, on its current connection, that it hosts
//! that generation (`route_of`).

use std::time::Instant;

use super::actor::{ActorStatus, CrashPolicy, CreateActor};
use super::{Action, ConnRef, Engine, Resolve, ResolveError, Waiter};

impl Engine {
    /// Where to send traffic for `actor_id`. A sleeping actor is woken; while it is not
    /// routable the lookup is `Pending` and answered later with `Action::Resolved { waiter }`
    /// (at the latest after `wake_timeout`). `waiter` is chosen by the caller and unique among
    /// its outstanding lookups.
    pub fn resolve(&mut self, actor_id: &str, waiter: u64, now: Instant) -> (Resolve, Vec<Action>) {
        let Some(a) = self.actors.get(actor_id) else {
            return (Resolve::NotFound, Vec::new());
        };
        if a.status == ActorStatus::Destroyed {
            return (Resolve::NotFound, Vec::new());
        }
        if let Some(route) = self.route_of(a) {
            return (Resolve::Ready(route), Vec::new());
        }
        self.cancel_waiter(waiter);
        let deadline = now + self.cfg.wake_timeout;
        self.waiters.insert(
            waiter,
            Waiter {
                actor_id: actor_id.to_string(),
                deadline,
            },
        );
        self.waiter_deadlines.insert((deadline, waiter));
        if let Some(a) = self.actors.get_mut(actor_id) {
            a.waiters.push(waiter);
        }
        self.want_running(actor_id, now);
        if self.pool_failing_for(actor_id) {
            // Its pool cannot start runners: say so now rather than at the wake timeout
            // (the wake stands, so the pool keeps trying).
            self.fail_waiters(actor_id, ResolveError::RunnerFailed);
        }
        let out = self.take_out();
        // A wake never yields a route at once (only the runner's `Running` does).
        (
            Resolve::Pending {
                actor_id: actor_id.to_string(),
            },
            out,
        )
    }

    /// Lookup by name and key (the `/gateway/{name}/…?rvt-method=get|getOrCreate` form). With
    /// `get_or_create`, a missing actor is created on runners named `runner_name`.
    #[allow(clippy::too_many_arguments)]
    pub fn resolve_by_name(
        &mut self,
        namespace: &str,
        name: &str,
        key: &str,
        get_or_create: bool,
        runner_name: Option<&str>,
        waiter: u64,
        now: Instant,
    ) -> (Resolve, Vec<Action>) {
        let id = match self.actor_by_key(namespace, name, key) {
            Some(info) => info.actor_id,
            None if get_or_create => {
                let req = CreateActor {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                    key: Some(key.to_string()),
                    runner_name: runner_name.map(str::to_string),
                    input: None,
                    crash_policy: CrashPolicy::Sleep,
                };
                match self.create_actor(req, now) {
                    Ok((info, actions)) => {
                        self.out.extend(actions);
                        info.actor_id
                    }
                    Err(_) => return (Resolve::NotFound, Vec::new()),
                }
            }
            None => return (Resolve::NotFound, Vec::new()),
        };
        let pre = self.take_out();
        let (res, mut actions) = self.resolve(&id, waiter, now);
        let mut all = pre;
        all.append(&mut actions);
        (res, all)
    }

    /// Wake an actor without a routing waiter (a hibernating client socket wants it, or the
    /// shell wants it running for another reason). `Ready` when it is routable now; `Pending`
    /// when it is being started (or waits for a runner with room, or for its current stop to
    /// finish): [`Action::ActorRunning`] follows once it runs (no `Resolved`, and no
    /// timeout: the caller decides how long to wait). `NotFound` for a missing or destroyed
    /// actor.
    pub fn wake(&mut self, actor_id: &str, now: Instant) -> (Resolve, Vec<Action>) {
        let Some(a) = self.actors.get(actor_id) else {
            return (Resolve::NotFound, Vec::new());
        };
        if a.status == ActorStatus::Destroyed {
            return (Resolve::NotFound, Vec::new());
        }
        if let Some(route) = self.route_of(a) {
            return (Resolve::Ready(route), Vec::new());
        }
        self.want_running(actor_id, now);
        (
            Resolve::Pending {
                actor_id: actor_id.to_string(),
            },
            self.take_out(),
        )
    }

    /// Is `actor_id` placed (starting, running or stopping) on the runner whose current
    /// connection is `conn`? Gates the actor KV store: a runner reaches only its own actors.
    pub fn actor_placed_on(&self, actor_id: &str, conn: ConnRef) -> bool {
        let Some(&idx) = self.runner_by_conn.get(&conn) else {
            return false;
        };
        self.actors
            .get(actor_id)
            .is_some_and(|a| a.status.placed() && a.runner == Some(idx))
    }
}
