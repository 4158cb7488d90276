//! The invariants: after every step (the gateway cores' own `verify`, window caps, no
//! hibernating socket with messages and no wake under way, no actor ahead of its client),
//! and at the end of a run (quiescence after reconnecting, everything delivered, every
//! actor's start listing exactly its live hibernatable sockets, nothing left behind once
//! every client closed).

use std::collections::BTreeSet;
use std::time::Duration;

use super::actor::lock;
use super::clients::{Client, Phase};
use super::config::Failure;
use super::world::World;
use crate::engine::ActorStatus;
use crate::gateway::ConnKind;
use crate::tunnel::SocketState;

impl World {
    /// Whether a client has nothing left to do.
    pub(super) fn client_quiet(&self, c: &Client) -> bool {
        match c.phase {
            Phase::Closed => true,
            Phase::Resolving { .. } | Phase::Opening { .. } => false,
            Phase::Open { conn } => {
                c.queue.is_empty()
                    && match self.gw[c.shard].kind(conn) {
                        Some(ConnKind::Client(cc)) => {
                            !cc.socket.is_paused()
                                && cc.socket.pending_len() == 0
                                && (cc.hibernation.is_some()
                                    || cc.socket.state() == SocketState::Open)
                        }
                        _ => false,
                    }
            }
        }
    }

    fn describe_client(&self, c: &Client) -> String {
        let core = c.conn().and_then(|conn| match self.gw[c.shard].kind(conn) {
            Some(ConnKind::Client(cc)) => Some(format!(
                "state {:?} hib {} pending {}/{}B paused {} hibernating {:?}",
                cc.socket.state(),
                cc.socket.is_hibernatable(),
                cc.socket.pending_len(),
                cc.socket.pending_bytes(),
                cc.socket.is_paused(),
                cc.hibernation
            )),
            _ => None,
        });
        format!("{} gateway: {core:?}", c.describe())
    }

    pub(super) fn quiesce_and_check(&mut self) -> Result<(), Failure> {
        // Draining runners finish exiting and come back as new processes; everyone
        // reconnects; deliver, acknowledge, wake, and let timers run until stable.
        for no in 0..self.runners.len() {
            if self.runners[no].draining {
                self.runner_restart(no, true);
            }
        }
        for _ in 0..120 {
            self.settle(true);
            let ids: Vec<u32> = self.clients.keys().copied().collect();
            for id in ids {
                self.client_send(id);
            }
            self.settle(true);
            self.check()?;
            if self.is_quiet() {
                break;
            }
            self.sleep_idle_if_contended();
            self.advance(Duration::from_secs(1));
            self.check()?;
        }
        if !self.is_quiet() {
            let busy: Vec<String> = self
                .clients
                .values()
                .filter(|c| !self.client_quiet(c))
                .map(|c| self.describe_client(c))
                .collect();
            self.fail(format!("not quiescent after reconnecting: {busy:?}"));
            self.check()?;
        }
        self.check_all_delivered()?;

        // Every actor sleeps and wakes once: the wake must list exactly its live hibernatable
        // sockets, and they must all come back attached.
        self.sleep_wake_round(false)?;
        self.check_all_delivered()?;

        // Clients leave; afterwards nothing may remain: no pending bytes, no records (a wake
        // lists nobody), no owed closes.
        let ids: Vec<u32> = self.clients.keys().copied().collect();
        for id in ids {
            self.client_close(id);
        }
        self.settle(true);
        // Identities of crashed runner processes get declared lost (their owed closes go).
        self.advance(Duration::from_secs(16));
        self.settle(true);
        self.check()?;
        self.sleep_wake_round(true)?;
        let used: u64 = self.gw.iter().map(|g| g.budget().used).sum();
        if used != 0 {
            self.fail(format!(
                "{used} pending bytes remain after every client closed"
            ));
        }
        let owed: usize = self.gw.iter().map(|g| g.owed_closes()).sum();
        if owed != 0 && !self.runners.is_empty() {
            self.fail(format!(
                "{owed} closes still owed to runners after reconnecting"
            ));
        }
        let sockets: usize = self.gw.iter().map(|g| g.clients().count()).sum();
        if sockets != 0 {
            self.fail(format!(
                "{sockets} client sockets remain in the gateway after every client closed"
            ));
        }
        self.check()
    }

    /// When a socket waits for its actor to be placed and actors occupy the slots, the idle
    /// ones go to sleep (as idle actors do), so that the waiting one gets a slot.
    fn sleep_idle_if_contended(&mut self) {
        let running = |w: &World, a: &str| {
            w.engine
                .actor(a)
                .is_some_and(|i| i.status == ActorStatus::Running)
        };
        let waiting = self
            .clients
            .values()
            .any(|c| !self.client_quiet(c) && !running(self, &c.actor));
        if !waiting {
            return;
        }
        let idle: Vec<(usize, crate::runner::ActorHandle)> = lock(&self.shared)
            .handles
            .iter()
            .filter(|(a, _)| {
                self.clients
                    .values()
                    .all(|c| c.actor != **a || self.client_quiet(c))
            })
            .map(|(_, (n, _, h))| (*n, h.clone()))
            .collect();
        for (no, h) in idle {
            h.sleep();
            self.runner_flush(no);
        }
    }

    fn is_quiet(&self) -> bool {
        self.clients.values().all(|c| self.client_quiet(c))
            && self
                .conns
                .values()
                .all(|c| c.g2r.is_empty() && c.r2g.is_empty())
            && self.control_mail.iter().all(|q| q.is_empty())
            && self.pending_notices.is_empty()
            && self.cluster.placing()
            && self.cluster.idle()
    }

    fn check_all_delivered(&mut self) -> Result<(), Failure> {
        let s = lock(&self.shared);
        let mut errs = Vec::new();
        for (id, c) in &self.clients {
            if c.is_closed() {
                continue;
            }
            let d = s.socks.get(id);
            if d.is_some_and(|d| d.actor_closed) {
                continue;
            }
            let got = d.map_or(0, |d| d.last_seq);
            if got != c.offered {
                errs.push(format!(
                    "socket {id}: client sent {} messages, actor processed {got} ({})",
                    c.offered,
                    self.describe_client(c)
                ));
            }
        }
        drop(s);
        for e in errs {
            self.fail(e);
        }
        self.check()
    }

    /// One actor at a time: put every actor to sleep, wake this one, check the hibernating
    /// list of its start command against its live sockets.
    fn sleep_wake_round(&mut self, expect_empty: bool) -> Result<(), Failure> {
        let actors = self.actor_ids.clone();
        for actor in actors {
            self.sleep_all_and_settle(None);
            self.check()?;
            let before = self.engine.actor(&actor).map(|i| i.generation);
            self.dummy_resolve(&actor);
            for _ in 0..40 {
                self.settle(true);
                let running = self
                    .engine
                    .actor(&actor)
                    .is_some_and(|i| i.status == ActorStatus::Running);
                if running {
                    break;
                }
                // Alarms may have woken others into the slots this one needs.
                self.sleep_all_and_settle(Some(&actor));
                self.advance(Duration::from_secs(1));
            }
            self.check()?;
            let Some(info) = self.engine.actor(&actor) else {
                continue;
            };
            if info.status != ActorStatus::Running {
                self.fail(format!(
                    "actor {actor} did not run again after a wake ({:?})",
                    info.status
                ));
                return self.check();
            }
            if Some(info.generation) == before {
                continue;
            }
            let actor_closed: BTreeSet<u32> = lock(&self.shared)
                .socks
                .iter()
                .filter(|(_, d)| d.actor_closed)
                .map(|(i, _)| *i)
                .collect();
            let listed: BTreeSet<u32> = self
                .start_lists
                .get(&(actor.clone(), info.generation))
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default();
            let listed: BTreeSet<u32> = listed.difference(&actor_closed).copied().collect();
            let live: BTreeSet<u32> = self
                .clients
                .iter()
                .filter(|(_, c)| c.actor == actor && !c.is_closed())
                .filter(|(_, c)| {
                    c.conn().is_some_and(|conn| {
                        matches!(self.gw[c.shard].kind(conn),
                            Some(ConnKind::Client(cc)) if cc.socket.is_hibernatable())
                    })
                })
                .map(|(i, _)| *i)
                .collect();
            if expect_empty && !listed.is_empty() {
                self.fail(format!(
                    "actor {actor}: hibernating records leak after every client closed: \
                     start lists {listed:?}"
                ));
            } else if listed != live {
                self.fail(format!(
                    "actor {actor} g{}: start listed {listed:?}, live hibernatable sockets \
                     are {live:?}",
                    info.generation
                ));
            }
            for id in &live {
                let c = &self.clients[id];
                let attached = c.conn().is_some_and(|conn| {
                    matches!(self.gw[c.shard].kind(conn),
                        Some(ConnKind::Client(cc))
                            if cc.hibernation.is_none() && cc.socket.state() == SocketState::Open)
                });
                if !attached {
                    let d = self.describe_client(c);
                    self.fail(format!("socket {id} not attached after the wake: {d}"));
                }
            }
            self.check()?;
        }
        self.sleep_all_and_settle(None);
        self.check()
    }

    /// Puts every running actor (but `except`) to sleep and waits until they all sleep.
    fn sleep_all_and_settle(&mut self, except: Option<&str>) {
        for _ in 0..40 {
            let running: Vec<(usize, crate::runner::ActorHandle)> = lock(&self.shared)
                .handles
                .iter()
                .filter(|(a, _)| Some(a.as_str()) != except)
                .map(|(_, (n, _, h))| (*n, h.clone()))
                .collect();
            for (no, h) in running {
                h.sleep();
                self.runner_flush(no);
            }
            self.settle(true);
            let awake: Vec<String> = self
                .actor_ids
                .iter()
                .filter(|a| Some(a.as_str()) != except)
                .filter(|a| {
                    self.engine
                        .actor(a)
                        .is_some_and(|i| i.status != ActorStatus::Sleeping)
                })
                .cloned()
                .collect();
            if awake.is_empty() {
                return;
            }
            self.advance(Duration::from_secs(1));
        }
        self.fail("actors did not go to sleep");
    }

    // -----------------------------------------------------------------------------------------
    // Invariants after every step

    pub fn check(&mut self) -> Result<(), Failure> {
        self.register_late_records();
        if let Some(f) = self.failure() {
            return Err(f);
        }
        let mut errs: Vec<String> = Vec::new();
        let lim = self.cfg.limits;
        for (s, g) in self.gw.iter().enumerate() {
            if let Err(e) = g.verify() {
                errs.push(format!("shard {s}: {e}"));
            }
        }
        {
            let store = lock(&self.shared);
            for (id, c) in &self.clients {
                let got = store.socks.get(id).map_or(0, |d| d.last_seq);
                if got > c.offered {
                    errs.push(format!(
                        "socket {id}: actor processed seq {got}, client offered only {}",
                        c.offered
                    ));
                }
                let Some(conn) = c.conn() else {
                    continue;
                };
                let Some(ConnKind::Client(cc)) = self.gw[c.shard].kind(conn) else {
                    errs.push(format!(
                        "socket {id}: the client's socket is gone from the gateway without a \
                         close [{}]",
                        c.describe()
                    ));
                    continue;
                };
                let (n, b) = (cc.socket.pending_len(), cc.socket.pending_bytes());
                if n > lim.max_messages {
                    errs.push(format!(
                        "socket {id}: {n} pending messages over the cap {}",
                        lim.max_messages
                    ));
                }
                if b > lim.max_bytes && n > 1 {
                    errs.push(format!(
                        "socket {id}: {b} pending bytes over the cap {} with {n} messages",
                        lim.max_bytes
                    ));
                }
                let has_data = n > 0 || cc.socket.is_paused();
                // (While a new leader waits its quiet period, nothing is placed.)
                let placing = self.cluster.placing();
                if placing && cc.hibernation.is_some_and(|h| !h.waking) && has_data {
                    // Only while the actor still runs (or is stopping) without this socket,
                    // which the runner handed back: the wake follows its `ActorStopped`.
                    let placed = self.engine.actor(&c.actor).is_some_and(|i| {
                        matches!(i.status, ActorStatus::Running | ActorStatus::Stopping)
                    });
                    if !placed {
                        errs.push(format!(
                            "socket {id}: hibernating with messages but no wake under way \
                             (SPEC 2.6: wake immediately)"
                        ));
                    }
                }
            }
        }
        for e in errs {
            self.fail(e);
        }
        match self.failure() {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }
}
