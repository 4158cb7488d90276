//! Placement: making an actor run. A sleeping actor goes to the connected, non-draining runner
//! of its namespace and runner name with the most free slots, or waits in the pending queue
//! until one has room; every allocation takes the next generation and numbers its commands
//! from 0; the start command lists the fresh hibernating sockets and, when the actor has an
//! input, waits for it to be read from the store.
//!
//! Must never place an actor on a runner without a free slot, nor start a generation twice.

use std::time::Instant;

use super::actor::{mark, set_deadline, sorted_hibernating, Actor, ActorStatus};
use super::runners::{CmdState, OutCmd, Runner};
use super::store_keys::hib_delete;
use super::{Action, Engine};
use crate::protocol::{ActorCheckpoint, ActorConfig, Command, CommandStartActor, CommandWrapper};

impl Engine {
    /// Make the actor run: place a sleeping actor, or restart a stopping one once stopped.
    pub(super) fn want_running(&mut self, actor_id: &str, now: Instant) {
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        match a.status {
            ActorStatus::Sleeping => {
                if a.pending {
                    return;
                }
                let runner = if self.placement_held(now) {
                    None
                } else {
                    self.find_runner(actor_id)
                };
                match runner {
                    Some(idx) => self.place_on(actor_id, idx, now),
                    None => {
                        let now_ms = self.unix_ms(now);
                        if let Some(a) = self.actors.get_mut(actor_id) {
                            a.pending = true;
                            a.pending_allocation_ts = Some(now_ms);
                            mark(&mut self.dirty, a);
                        }
                        self.pending.push_back(actor_id.to_string());
                        // A serverless pool may need another runner.
                        if self.has_pools() {
                            self.pools_changed();
                        }
                    }
                }
            }
            ActorStatus::Stopping => a.wake_after_stop = true,
            ActorStatus::Starting | ActorStatus::Running | ActorStatus::Destroyed => {}
        }
    }

    /// Holds every placement until `until`: actors asked for meanwhile wait as pending (as
    /// when no runner is there) and are placed at the first [`Engine::tick`] after it.
    ///
    /// A new placement leader (several nodes) restores every actor as sleeping, but an
    /// instance the old leader started may still run on a runner whose connection was down
    /// when the nodes fenced their runners: such a runner stops its actors by itself only
    /// `runner_lost_threshold` after it lost its connection. The leader holds placement that
    /// long, so no actor runs twice.
    pub fn hold_placement_until(&mut self, until: Instant) {
        self.placement_hold = Some(until);
    }

    /// Placement is held at `now` (a hold that ran out is forgotten).
    pub(super) fn placement_held(&mut self, now: Instant) -> bool {
        match self.placement_hold {
            Some(t) if now < t => true,
            Some(_) => {
                self.placement_hold = None;
                false
            }
            None => false,
        }
    }

    /// The connected, non-draining runner of the actor's namespace and runner name with the
    /// most free slots (lowest index on ties).
    fn find_runner(&self, actor_id: &str) -> Option<usize> {
        let a = self.actors.get(actor_id)?;
        let mut best: Option<(usize, u32)> = None;
        for (idx, r) in self.runners.iter() {
            if r.namespace != a.namespace || r.name != a.runner_name || !r.placeable() {
                continue;
            }
            let free = r.free_slots();
            if best.is_none_or(|(_, f)| free > f) {
                best = Some((idx, free));
            }
        }
        best.map(|(i, _)| i)
    }

    /// Place pending actors on runners that have room, oldest first.
    pub(super) fn place_pending(&mut self, now: Instant) {
        if self.pending.is_empty()
            || self.placement_held(now)
            || !self.runners.iter().any(|(_, r)| r.placeable())
        {
            return;
        }
        let queue = std::mem::take(&mut self.pending);
        for id in queue {
            let wants = self
                .actors
                .get(&id)
                .is_some_and(|a| a.pending && a.status == ActorStatus::Sleeping);
            if !wants {
                continue;
            }
            match self.find_runner(&id) {
                Some(idx) => {
                    if let Some(a) = self.actors.get_mut(&id) {
                        a.pending = false;
                    }
                    self.place_on(&id, idx, now);
                }
                None => self.pending.push_back(id),
            }
        }
    }

    fn place_on(&mut self, actor_id: &str, idx: usize, now: Instant) {
        let now_ms = self.unix_ms(now);
        let eligible = self.cfg.hibernation_eligible;
        let Some(a) = self.actors.get_mut(actor_id) else {
            return;
        };
        let Some(r) = self.runners.get_mut(idx) else {
            return;
        };
        if a.allocated {
            a.generation = a.generation.wrapping_add(1);
        }
        a.allocated = true;
        mark(&mut self.dirty, a);
        a.pending = false;
        a.status = ActorStatus::Starting;
        a.runner = Some(idx);
        a.next_cmd_idx = 0;
        a.last_event_idx = -1;
        a.start_ts = Some(now_ms);
        a.wake_after_stop = false;
        let hib_ops = &mut self.hib_ops;
        a.hibernating.retain(|h, seen| {
            let fresh = now.saturating_duration_since(*seen) <= eligible;
            if !fresh {
                hib_ops.push(hib_delete(&a.id, *h));
            }
            fresh
        });
        let hibernating_requests = sorted_hibernating(&a.hibernating)
            .into_iter()
            .map(|(h, _)| h)
            .collect();
        // The input comes from the store (`input_loaded`) unless the create that wrote it is
        // still in this engine call; the start command waits for it.
        let (input, state) = match (a.has_input, self.fresh_inputs.get(&a.id)) {
            (false, _) => (None, CmdState::Unsent),
            (true, Some(fresh)) => (Some(fresh.clone()), CmdState::Unsent),
            (true, None) => {
                self.input_loads.push(a.id.clone());
                (None, CmdState::NeedsInput)
            }
        };
        let cmd = Command::StartActor(CommandStartActor {
            config: ActorConfig {
                name: a.name.clone(),
                key: a.key.clone(),
                create_ts: a.create_ts,
                input,
            },
            hibernating_requests,
        });
        r.actors.insert(a.id.clone());
        push_command(a, r, cmd, state);
        let deadline = now + self.cfg.actor_start_threshold;
        set_deadline(&mut self.actor_deadlines, a, Some(deadline));
        self.flush(idx);
    }

    /// The stored input of `actor_id` was read (see [`Engine::take_input_loads`]): its start
    /// command, held until now, goes out. `None` when the store had none (the actor starts
    /// without input).
    pub fn input_loaded(
        &mut self,
        actor_id: &str,
        input: Option<Vec<u8>>,
        _now: Instant,
    ) -> Vec<Action> {
        let Some(idx) = self.actors.get(actor_id).and_then(|a| a.runner) else {
            return Vec::new();
        };
        let Some(r) = self.runners.get_mut(idx) else {
            return Vec::new();
        };
        let mut any = false;
        for c in r.outbox.iter_mut() {
            if c.state != CmdState::NeedsInput || c.cmd.checkpoint.actor_id != actor_id {
                continue;
            }
            if let Command::StartActor(start) = &mut c.cmd.inner {
                start.config.input = input.clone();
            }
            c.state = CmdState::Unsent;
            any = true;
        }
        if any {
            self.flush(idx);
        }
        self.take_out()
    }
}

/// Queue the next command of the actor's current generation on its runner.
pub(super) fn push_command(a: &mut Actor, r: &mut Runner, inner: Command, state: CmdState) {
    let index = a.next_cmd_idx;
    a.next_cmd_idx += 1;
    r.outbox.push(OutCmd {
        cmd: CommandWrapper {
            checkpoint: ActorCheckpoint {
                actor_id: a.id.clone(),
                generation: a.generation,
                index,
            },
            inner,
        },
        state,
    });
}
