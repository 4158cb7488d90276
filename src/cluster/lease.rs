//! One placement leader at a time: the lease state machine of one node.
//!
//! Sans-IO. The machine never touches a store or a clock: the driver passes `now` into every
//! call, runs the [`LeaseAction::TryAcquire`] / [`LeaseAction::Renew`] it asks for against the
//! shared store ([`super::pg_lease::PgLease`] for PostgreSQL) and hands the answer back with
//! [`Lease::on_answer`]. The driver must answer every request it was given, with
//! [`StoreAnswer::Error`] when the store does not answer in time; until then the machine asks
//! for nothing else (there is at most one request in flight).
//!
//! Rules:
//! - a leader believes it leads only while `now < start + ttl - safety_margin`, where `start` is
//!   when its last *successful* acquire or renew was *issued*. The store sets the expiry from its
//!   own clock when it executes the request, which is after the request left, so a slow answer
//!   can never stretch the local deadline beyond the store's; `safety_margin` absorbs the
//!   difference in clock rates between the node and the store over one `ttl`;
//! - a leader renews every `renew_every`, and again after `retry_every` when a renew failed;
//!   when its deadline passes without a successful renew it steps down at once
//!   ([`LeaseAction::StepDown`]), whatever the store answers or fails to answer: the check is
//!   made first on every tick and every answer, so a node paused past its lease steps down on
//!   the first tick after it resumes;
//! - a renew answered "lost" (another epoch, or the lease expired in the store's clock) steps
//!   down at once;
//! - a follower tries to acquire every `retry_every`; the store grants the lease only when the
//!   holder's lease has expired in the store's clock, with the next epoch.
//!
//! Bound: a leader that dies or is cut off stops believing it leads at most `ttl -
//! safety_margin` after its last successful renew started, before the store lets anyone else
//! acquire (`ttl` after that renew executed); a standby acquires at its first attempt after
//! that, so a standby leads within `ttl + retry_every` (plus one store round trip) of the
//! leader's last successful renew.

use std::time::{Duration, Instant};

/// Timing of the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long a grant or renew lasts in the store's clock (default 10 s).
    pub ttl: Duration,
    /// How often a leader renews (default 2 s; below `ttl / 3`, so two renews may fail before
    /// the deadline comes near).
    pub renew_every: Duration,
    /// How much earlier than the store a leader gives up (default 1 s: room for clock-rate
    /// differences and for the time between the local deadline check and a write's fence).
    pub safety_margin: Duration,
    /// How often a follower tries to acquire, and a leader retries a failed renew (default
    /// 1 s; with the defaults a standby leads within 11 s).
    pub retry_every: Duration,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            ttl: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
            safety_margin: Duration::from_secs(1),
            retry_every: Duration::from_secs(1),
        }
    }
}

impl LeaseConfig {
    /// Checks that the timings make sense together; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.ttl.is_zero() || self.renew_every.is_zero() || self.retry_every.is_zero() {
            return Err("lease: ttl, renew_every and retry_every must be above zero".into());
        }
        if self.safety_margin >= self.ttl {
            return Err(format!(
                "lease: safety_margin ({} ms) must be below ttl ({} ms)",
                self.safety_margin.as_millis(),
                self.ttl.as_millis()
            ));
        }
        if self.renew_every.saturating_mul(3) >= self.ttl {
            return Err(format!(
                "lease: renew_every ({} ms) must be below ttl / 3 ({} ms)",
                self.renew_every.as_millis(),
                (self.ttl / 3).as_millis()
            ));
        }
        if self.renew_every.saturating_add(self.safety_margin) >= self.ttl {
            return Err(format!(
                "lease: renew_every + safety_margin ({} ms) must be below ttl ({} ms)",
                (self.renew_every + self.safety_margin).as_millis(),
                self.ttl.as_millis()
            ));
        }
        if self.retry_every >= self.ttl - self.safety_margin {
            return Err(format!(
                "lease: retry_every ({} ms) must be below ttl - safety_margin ({} ms)",
                self.retry_every.as_millis(),
                (self.ttl - self.safety_margin).as_millis()
            ));
        }
        Ok(())
    }

    /// How long a grant or renew issued at `start` is believed.
    fn valid_until(&self, start: Instant) -> Instant {
        start + (self.ttl - self.safety_margin)
    }
}

/// What the node believes it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    Leader { epoch: u64, valid_until: Instant },
}

/// What the driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// Ask the store for the lease (answer with `Acquired`, `Held` or `Error`).
    TryAcquire,
    /// Ask the store to extend the lease of `epoch` (answer with `Renewed`, `Lost` or `Error`).
    Renew { epoch: u64 },
    /// This node leads with `epoch` from now: fence every write with it and restore the
    /// placement from the records before placing anything.
    BecameLeader { epoch: u64 },
    /// This node no longer leads: stop placing at once and drop the fence's epoch.
    StepDown { epoch: u64 },
}

/// The store's answer to the request in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAnswer {
    /// The lease was granted with this epoch.
    Acquired { epoch: u64 },
    /// Another node holds a lease that has not expired.
    Held,
    /// The lease was extended.
    Renewed,
    /// The lease is no longer ours (another epoch, or expired in the store's clock).
    Lost,
    /// No answer (store unreachable, timeout, error): what happened in the store is unknown.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InFlight {
    Acquire { started: Instant },
    Renew { epoch: u64, started: Instant },
}

/// The lease state machine of one node.
#[derive(Debug, Clone)]
pub struct Lease {
    cfg: LeaseConfig,
    role: Role,
    in_flight: Option<InFlight>,
    /// When the next acquire (follower) or renew (leader) is due.
    next: Instant,
}

impl Lease {
    /// A follower that tries to acquire at its first tick.
    pub fn new(cfg: LeaseConfig, now: Instant) -> Lease {
        Lease {
            cfg,
            role: Role::Follower,
            in_flight: None,
            next: now,
        }
    }

    /// The role as last decided (a leader past its deadline is still `Leader` until the next
    /// tick or answer; use [`Lease::is_leader`] to decide whether to place).
    pub fn role(&self) -> Role {
        self.role
    }

    /// The epoch this node leads with at `now`, if it does.
    pub fn leader_epoch(&self, now: Instant) -> Option<u64> {
        match self.role {
            Role::Leader { epoch, valid_until } if now < valid_until => Some(epoch),
            _ => None,
        }
    }

    /// True while this node may place actors.
    pub fn is_leader(&self, now: Instant) -> bool {
        self.leader_epoch(now).is_some()
    }

    /// True while a request is waiting for its answer.
    pub fn waiting(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Steps down when the deadline has passed.
    fn check_deadline(&mut self, now: Instant, out: &mut Vec<LeaseAction>) {
        if let Role::Leader { epoch, valid_until } = self.role {
            if now >= valid_until {
                self.step_down(epoch, now, out);
            }
        }
    }

    fn step_down(&mut self, epoch: u64, now: Instant, out: &mut Vec<LeaseAction>) {
        self.role = Role::Follower;
        // An answer to a request of the old term no longer matters.
        self.in_flight = None;
        self.next = now + self.cfg.retry_every;
        out.push(LeaseAction::StepDown { epoch });
    }

    /// The timer: steps down past the deadline, and asks for the next acquire or renew when
    /// it is due and nothing is in flight.
    pub fn tick(&mut self, now: Instant) -> Vec<LeaseAction> {
        let mut out = Vec::new();
        self.check_deadline(now, &mut out);
        if self.in_flight.is_none() && now >= self.next {
            match self.role {
                Role::Follower => {
                    self.in_flight = Some(InFlight::Acquire { started: now });
                    out.push(LeaseAction::TryAcquire);
                }
                Role::Leader { epoch, .. } => {
                    self.in_flight = Some(InFlight::Renew {
                        epoch,
                        started: now,
                    });
                    out.push(LeaseAction::Renew { epoch });
                }
            }
        }
        out
    }

    /// The answer to the request in flight (an answer without one is ignored).
    pub fn on_answer(&mut self, now: Instant, answer: StoreAnswer) -> Vec<LeaseAction> {
        let mut out = Vec::new();
        self.check_deadline(now, &mut out);
        let Some(flight) = self.in_flight.take() else {
            return out;
        };
        match (flight, answer) {
            (InFlight::Acquire { started }, StoreAnswer::Acquired { epoch }) => {
                let valid_until = self.cfg.valid_until(started);
                if now < valid_until {
                    self.role = Role::Leader { epoch, valid_until };
                    self.next = started + self.cfg.renew_every;
                    out.push(LeaseAction::BecameLeader { epoch });
                } else {
                    // Granted, but the answer came too late to be believed: the store lets
                    // another node in once it expires.
                    self.next = now + self.cfg.retry_every;
                }
            }
            (InFlight::Acquire { .. }, _) => {
                self.next = now + self.cfg.retry_every;
            }
            (InFlight::Renew { epoch, started }, StoreAnswer::Renewed) => {
                if let Role::Leader {
                    epoch: current,
                    valid_until,
                } = self.role
                {
                    if current == epoch {
                        self.role = Role::Leader {
                            epoch,
                            valid_until: valid_until.max(self.cfg.valid_until(started)),
                        };
                        self.next = started + self.cfg.renew_every;
                    }
                }
            }
            (InFlight::Renew { epoch, .. }, StoreAnswer::Lost) => {
                if matches!(self.role, Role::Leader { epoch: e, .. } if e == epoch) {
                    self.step_down(epoch, now, &mut out);
                }
            }
            (InFlight::Renew { .. }, _) => {
                // Unknown outcome: keep leading until the deadline, try again soon.
                self.next = now + self.cfg.retry_every.min(self.cfg.renew_every);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cfg() -> LeaseConfig {
        LeaseConfig::default()
    }

    /// A follower that acquired epoch `epoch` at `t0`.
    fn leader(t0: Instant, epoch: u64) -> Lease {
        let mut l = Lease::new(cfg(), t0);
        assert_eq!(l.tick(t0), vec![LeaseAction::TryAcquire]);
        assert_eq!(
            l.on_answer(t0 + ms(5), StoreAnswer::Acquired { epoch }),
            vec![LeaseAction::BecameLeader { epoch }]
        );
        l
    }

    #[test]
    fn defaults_are_valid_and_bad_settings_are_named() {
        cfg().validate().unwrap();
        let bad = LeaseConfig {
            renew_every: Duration::from_secs(4),
            ..cfg()
        };
        assert!(bad.validate().unwrap_err().contains("renew_every"));
        let bad = LeaseConfig {
            safety_margin: Duration::from_secs(10),
            ..cfg()
        };
        assert!(bad.validate().unwrap_err().contains("safety_margin"));
        let bad = LeaseConfig {
            retry_every: Duration::ZERO,
            ..cfg()
        };
        assert!(bad.validate().is_err());
        let bad = LeaseConfig {
            retry_every: Duration::from_secs(9),
            ..cfg()
        };
        assert!(bad.validate().unwrap_err().contains("retry_every"));
    }

    #[test]
    fn follower_tries_to_acquire_at_once_then_every_retry() {
        let t0 = Instant::now();
        let mut l = Lease::new(cfg(), t0);
        assert_eq!(l.tick(t0), vec![LeaseAction::TryAcquire]);
        // Nothing more while the request is in flight.
        assert!(l.tick(t0 + ms(1500)).is_empty());
        assert!(l.on_answer(t0 + ms(1600), StoreAnswer::Held).is_empty());
        assert!(!l.is_leader(t0 + ms(1600)));
        assert!(l.tick(t0 + ms(2000)).is_empty());
        assert_eq!(l.tick(t0 + ms(2600)), vec![LeaseAction::TryAcquire]);
        assert!(l.on_answer(t0 + ms(2700), StoreAnswer::Error).is_empty());
        assert_eq!(l.tick(t0 + ms(3700)), vec![LeaseAction::TryAcquire]);
    }

    #[test]
    fn acquired_is_believed_from_when_the_request_started() {
        let t0 = Instant::now();
        let mut l = Lease::new(cfg(), t0);
        l.tick(t0);
        // A slow answer: the deadline still counts from t0.
        assert_eq!(
            l.on_answer(t0 + ms(3000), StoreAnswer::Acquired { epoch: 7 }),
            vec![LeaseAction::BecameLeader { epoch: 7 }]
        );
        assert_eq!(
            l.role(),
            Role::Leader {
                epoch: 7,
                valid_until: t0 + ms(9000)
            }
        );
        assert_eq!(l.leader_epoch(t0 + ms(8999)), Some(7));
        assert_eq!(l.leader_epoch(t0 + ms(9000)), None);
    }

    #[test]
    fn a_grant_answered_after_its_deadline_is_not_believed() {
        let t0 = Instant::now();
        let mut l = Lease::new(cfg(), t0);
        l.tick(t0);
        assert!(l
            .on_answer(t0 + ms(9000), StoreAnswer::Acquired { epoch: 1 })
            .is_empty());
        assert_eq!(l.role(), Role::Follower);
        assert_eq!(l.tick(t0 + ms(10_000)), vec![LeaseAction::TryAcquire]);
    }

    #[test]
    fn leader_renews_every_renew_every_and_extends_from_the_renew_start() {
        let t0 = Instant::now();
        let mut l = leader(t0, 1);
        assert!(l.tick(t0 + ms(1999)).is_empty());
        assert_eq!(l.tick(t0 + ms(2000)), vec![LeaseAction::Renew { epoch: 1 }]);
        assert!(l.tick(t0 + ms(3000)).is_empty());
        assert!(l.on_answer(t0 + ms(5000), StoreAnswer::Renewed).is_empty());
        assert_eq!(
            l.role(),
            Role::Leader {
                epoch: 1,
                valid_until: t0 + ms(11_000)
            }
        );
        // Next renew counts from the previous renew's start.
        assert_eq!(l.tick(t0 + ms(5000)), vec![LeaseAction::Renew { epoch: 1 }]);
    }

    #[test]
    fn failed_renew_keeps_leading_until_the_deadline_then_steps_down() {
        let t0 = Instant::now();
        let mut l = leader(t0, 3);
        assert_eq!(l.tick(t0 + ms(2000)), vec![LeaseAction::Renew { epoch: 3 }]);
        assert!(l.on_answer(t0 + ms(2100), StoreAnswer::Error).is_empty());
        assert!(l.is_leader(t0 + ms(2100)));
        assert!(l.tick(t0 + ms(2500)).is_empty());
        assert_eq!(l.tick(t0 + ms(3100)), vec![LeaseAction::Renew { epoch: 3 }]);
        // The renew never comes back; the deadline does.
        assert!(l.tick(t0 + ms(8999)).is_empty());
        assert_eq!(
            l.tick(t0 + ms(9000)),
            vec![LeaseAction::StepDown { epoch: 3 }]
        );
        assert!(!l.is_leader(t0 + ms(9000)));
        // A late answer of the old term is ignored.
        assert!(l.on_answer(t0 + ms(9100), StoreAnswer::Renewed).is_empty());
        assert_eq!(l.role(), Role::Follower);
        assert_eq!(l.tick(t0 + ms(10_000)), vec![LeaseAction::TryAcquire]);
    }

    #[test]
    fn lost_renew_steps_down_at_once() {
        let t0 = Instant::now();
        let mut l = leader(t0, 2);
        l.tick(t0 + ms(2000));
        assert_eq!(
            l.on_answer(t0 + ms(2010), StoreAnswer::Lost),
            vec![LeaseAction::StepDown { epoch: 2 }]
        );
        assert!(!l.is_leader(t0 + ms(2010)));
        assert!(l.tick(t0 + ms(2500)).is_empty());
        assert_eq!(l.tick(t0 + ms(3010)), vec![LeaseAction::TryAcquire]);
    }

    #[test]
    fn an_answer_after_the_deadline_steps_down_first() {
        let t0 = Instant::now();
        let mut l = leader(t0, 4);
        l.tick(t0 + ms(2000));
        // The renew started at 2000 would extend to 11000, but the leader was paused past
        // its deadline (9000) before the answer: it steps down and ignores the answer.
        assert_eq!(
            l.on_answer(t0 + ms(9500), StoreAnswer::Renewed),
            vec![LeaseAction::StepDown { epoch: 4 }]
        );
        assert_eq!(l.role(), Role::Follower);
    }

    #[test]
    fn paused_leader_steps_down_on_its_first_tick() {
        let t0 = Instant::now();
        let mut l = leader(t0, 5);
        let out = l.tick(t0 + ms(60_000));
        assert_eq!(out[0], LeaseAction::StepDown { epoch: 5 });
        assert!(!l.is_leader(t0 + ms(60_000)));
    }

    #[test]
    fn answer_without_request_is_ignored() {
        let t0 = Instant::now();
        let mut l = Lease::new(cfg(), t0);
        assert!(l
            .on_answer(t0, StoreAnswer::Acquired { epoch: 9 })
            .is_empty());
        assert_eq!(l.role(), Role::Follower);
    }

    // ----------------------------------------------------------------------------------------
    // Property: a linearizable register with its own clock, several nodes, random delays.
    // ----------------------------------------------------------------------------------------

    /// The store: one register (epoch, holder, expiry in store time).
    #[derive(Debug, Default)]
    struct Db {
        epoch: u64,
        holder: Option<usize>,
        expires_ms: u64,
    }

    impl Db {
        fn run(&mut self, node: usize, op: Op, now_ms: u64, ttl_ms: u64) -> StoreAnswer {
            match op {
                Op::Acquire => {
                    if self.holder.is_none() || self.expires_ms < now_ms {
                        self.epoch += 1;
                        self.holder = Some(node);
                        self.expires_ms = now_ms + ttl_ms;
                        StoreAnswer::Acquired { epoch: self.epoch }
                    } else {
                        StoreAnswer::Held
                    }
                }
                Op::Renew(epoch) => {
                    if self.epoch == epoch && self.holder == Some(node) && self.expires_ms >= now_ms
                    {
                        self.expires_ms = now_ms + ttl_ms;
                        StoreAnswer::Renewed
                    } else {
                        StoreAnswer::Lost
                    }
                }
            }
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Acquire,
        Renew(u64),
    }

    #[derive(Debug)]
    struct Pending {
        op: Op,
        answer: Option<StoreAnswer>,
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Time passes.
        Advance(u64),
        /// A node's timer fires (a paused node simply gets none).
        Tick(usize),
        /// The store executes a node's request (now).
        Execute(usize),
        /// A node receives its answer (or `Error` when none was executed, or when
        /// `lose` — the answer was lost after the store executed it).
        Deliver(usize, bool),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0u64..4000).prop_map(Step::Advance),
            4 => (0usize..3).prop_map(Step::Tick),
            3 => (0usize..3).prop_map(Step::Execute),
            3 => ((0usize..3), proptest::bool::weighted(0.15)).prop_map(|(n, l)| Step::Deliver(n, l)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_two_leaders_at_once(
            steps in proptest::collection::vec(step(), 1..400),
            // Each node's clock rate in parts per thousand of the store's: within the 10 %
            // that the safety margin covers (1 s of 10 s), with room for rounding.
            rates in proptest::collection::vec(950u64..=1050, 3),
            db_offset_ms in 0u64..1_000_000_000,
        ) {
            let cfg = LeaseConfig::default();
            let ttl_ms = cfg.ttl.as_millis() as u64;
            let t0 = Instant::now();
            // `now_ms` is real time; node `n` reads `t0 + now_ms * rates[n] / 1000`, the store
            // reads `db_offset_ms + now_ms`.
            let mut now_ms = 0u64;
            let node_now = |n: usize, now_ms: u64| t0 + Duration::from_micros(now_ms * rates[n]);
            let mut db = Db::default();
            let mut nodes: Vec<Lease> = (0..3).map(|_| Lease::new(cfg, t0)).collect();
            let mut pending: Vec<Option<Pending>> = (0..3).map(|_| None).collect();
            let mut epochs_led: Vec<(u64, usize)> = Vec::new();
            for s in steps {
                let mut outs = Vec::new();
                match s {
                    Step::Advance(d) => now_ms += d,
                    Step::Tick(n) => outs.push((n, nodes[n].tick(node_now(n, now_ms)))),
                    Step::Execute(n) => {
                        if let Some(p) = pending[n].as_mut() {
                            if p.answer.is_none() {
                                p.answer = Some(db.run(n, p.op, db_offset_ms + now_ms, ttl_ms));
                            }
                        }
                    }
                    Step::Deliver(n, lose) => {
                        if let Some(p) = pending[n].take() {
                            let answer = match p.answer {
                                Some(a) if !lose => a,
                                _ => StoreAnswer::Error,
                            };
                            outs.push((n, nodes[n].on_answer(node_now(n, now_ms), answer)));
                        }
                    }
                }
                for (n, out) in outs {
                    for a in out {
                        match a {
                            LeaseAction::TryAcquire => {
                                pending[n] = Some(Pending { op: Op::Acquire, answer: None })
                            }
                            LeaseAction::Renew { epoch } => {
                                pending[n] = Some(Pending { op: Op::Renew(epoch), answer: None })
                            }
                            LeaseAction::BecameLeader { epoch } => {
                                // Every epoch is led by one node only, once.
                                prop_assert!(!epochs_led.iter().any(|&(e, _)| e == epoch));
                                epochs_led.push((epoch, n));
                            }
                            LeaseAction::StepDown { .. } => {}
                        }
                    }
                }
                // Check at this instant and just before the next step's instant could differ
                // only by time passing, which only ends leaderships.
                let leaders: Vec<u64> = nodes
                    .iter()
                    .enumerate()
                    .filter_map(|(n, l)| l.leader_epoch(node_now(n, now_ms)))
                    .collect();
                prop_assert!(leaders.len() <= 1, "two leaders at {now_ms} ms: {leaders:?}");
                // A node that believes it leads holds the store's current epoch... or one the
                // store has not yet replaced.
                if let Some(&e) = leaders.first() {
                    prop_assert!(e <= db.epoch);
                }
            }
        }

        #[test]
        fn a_leader_paused_past_its_lease_steps_down_on_its_first_tick(
            pause_ms in 9_000u64..120_000,
            renews in 0usize..5,
        ) {
            let t0 = Instant::now();
            let mut l = leader(t0, 1);
            let mut t = t0;
            for _ in 0..renews {
                t += ms(2000);
                prop_assert_eq!(l.tick(t), vec![LeaseAction::Renew { epoch: 1 }]);
                prop_assert!(l.on_answer(t, StoreAnswer::Renewed).is_empty());
            }
            let out = l.tick(t + ms(pause_ms));
            prop_assert_eq!(out.first(), Some(&LeaseAction::StepDown { epoch: 1 }));
            prop_assert!(!l.is_leader(t + ms(pause_ms)));
        }
    }
}
