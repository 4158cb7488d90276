//! The simulation's knobs (drawn from each seed), its counters and its failures.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::tunnel::{Budget, WindowLimits};

/// Knobs of one run, drawn from its seed.
#[derive(Debug, Clone)]
pub(crate) struct SimConfig {
    pub runners: usize,
    pub slots: u32,
    pub actors: usize,
    pub max_sockets: usize,
    pub steps: usize,
    pub limits: WindowLimits,
    pub global_cap: u64,
    pub hib_probability: f64,
    /// Actors acknowledge each message as they process it (the runner coalesces), instead
    /// of acknowledging on their own schedule.
    pub immediate_acks: bool,
    /// Actors acknowledge their persisted index when a socket is restored. Without it, a
    /// restored socket whose acknowledgement was lost with a connection is never acknowledged
    /// by an immediate-ack actor (see the ignored test in `mod.rs`).
    pub ack_on_restore: bool,
    /// Actors restore a socket from the runner's remembered index when it has one (the
    /// library's default `on_websocket_restore`) instead of from what they persisted.
    pub trust_runner_memory: bool,
    /// Actors sometimes acknowledge an older index after a newer one (out-of-order
    /// completions). Off by default: the runner core then forgets the newer acknowledgement
    /// (see the ignored test in `mod.rs`). Late and repeated acks still reach the gateway
    /// through the network (a delivered ack is sometimes delivered again later).
    pub late_actor_acks: bool,
    /// Most messages a client produces at once.
    pub send_burst: usize,
    /// Most messages a client holds before the gateway takes them (its socket buffer).
    pub client_queue: usize,
    /// Clients and actors close sockets at random.
    pub random_closes: bool,
    pub ack_timeout: Duration,
    pub open_timeout: Duration,
    pub refresh_every: Duration,
    /// Register a socket's hibernating record only when it enters hibernation (the literal
    /// reading of SPEC §2.6) instead of as soon as it is hibernatable: the simulated shell
    /// holds back the core's early records. Only for the test that shows why the core's
    /// eager rule is needed.
    pub naive_records: bool,
    /// Gateway shards (each a gateway core) per node; clients and runners land on any of them.
    pub shards: usize,
    /// Nodes (each with `shards` gateway shards), joined by the simulated bus; one leads.
    pub nodes: usize,
    /// The leader may lose its lease at a random step (several nodes only): in half the
    /// multi-node seeds (`SIM_LEASE_LOSS=0`: never).
    pub lease_loss: bool,
    /// Check that no actor ever runs on two runners at once, through drains too
    /// (`SIM_SINGLE_INSTANCE=0`: not).
    pub single_instance: bool,
    /// Followers' first heartbeats cross the lossy bus while runners already attach: on in
    /// half of the multi-node seeds (`SIM_LATE_JOIN=0`: never; see
    /// `a_node_joining_late_learns_the_runners`).
    pub late_join: bool,
    /// What the gateway wrote to a runner before closing its connection is lost with the
    /// close (as the simulation did before several nodes), instead of read up to the close
    /// frame. Loses the fencing `Init` of a leader change (see `unfenced_runners_are_caught`).
    pub drop_before_close: bool,
    /// A new leader holds placement for `runner_lost_threshold` after its quiet period, as
    /// `lead()` does (off only to show that the simulation catches its absence).
    pub placement_hold: bool,
    /// Actors send to their clients (a greeting at open, echoes); several nodes only.
    pub actor_sends: bool,
    /// The receiving node delivers a runner's tunnel message at once, without waiting for
    /// the control messages sent before it (no `TunGate`; see `tun_gate_is_needed`).
    pub no_tun_gate: bool,
}

impl SimConfig {
    pub fn from_seed(seed: u64) -> SimConfig {
        let mut r = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        SimConfig {
            runners: r.random_range(1..=3),
            slots: r.random_range(1..=4),
            actors: r.random_range(1..=4),
            max_sockets: r.random_range(1..=8),
            steps: r.random_range(100..=400),
            limits: WindowLimits {
                max_bytes: r.random_range(40..=400),
                max_messages: r.random_range(1..=12),
            },
            global_cap: if r.random_bool(0.7) {
                Budget::DEFAULT_PROCESS_CAP
            } else {
                r.random_range(60..=1500)
            },
            hib_probability: if r.random_bool(0.8) { 0.85 } else { 0.3 },
            immediate_acks: r.random_bool(0.5),
            ack_on_restore: true,
            trust_runner_memory: false,
            late_actor_acks: false,
            send_burst: 3,
            client_queue: 12,
            random_closes: true,
            ack_timeout: Duration::from_secs(30),
            open_timeout: Duration::from_secs(15),
            refresh_every: Duration::from_secs(45),
            naive_records: false,
            shards: r.random_range(1..=2),
            nodes: 1,
            lease_loss: false,
            single_instance: true,
            late_join: false,
            drop_before_close: false,
            placement_hold: true,
            actor_sends: false,
            no_tun_gate: false,
        }
        .with_nodes(seed)
    }

    /// About one seed in five runs several nodes (drawn apart from the other knobs, so that
    /// one-node seeds keep their shape).
    fn with_nodes(mut self, seed: u64) -> SimConfig {
        let mut r = StdRng::seed_from_u64(seed ^ 0x6a09_e667_f3bc_c908);
        if r.random_bool(0.2) {
            self.nodes = if r.random_bool(0.75) { 2 } else { 3 };
            self.actor_sends = r.random_bool(0.5);
            self.lease_loss = env_flag("SIM_LEASE_LOSS").unwrap_or(true) && r.random_bool(0.5);
            self.late_join = env_flag("SIM_LATE_JOIN").unwrap_or(true) && r.random_bool(0.5);
        }
        if env_flag("SIM_SINGLE_INSTANCE") == Some(false) {
            self.single_instance = false;
        }
        self
    }

    /// The gateway's configuration for this run: the window and global caps, and the
    /// timeouts the simulation reasons about.
    pub fn gateway_config(&self) -> crate::config::Config {
        let mut c = crate::config::Config::default();
        c.limits.pending_bytes_per_socket = self.limits.max_bytes;
        c.limits.pending_messages_per_socket = self.limits.max_messages;
        // Each shard gets an equal share of the process cap: every shard gets `global_cap`.
        c.limits.pending_bytes_global = self.global_cap.saturating_mul(self.shards as u64);
        c.timeouts.ack_timeout_ms = self.ack_timeout.as_millis() as u64;
        c.timeouts.websocket_open_ms = self.open_timeout.as_millis() as u64;
        c.timeouts.hibernation_refresh_ms = self.refresh_every.as_millis() as u64;
        // Simulated clients answer at once and never idle out (their pings are not modelled).
        c.timeouts.client_idle_ping_ms = 0;
        c
    }
}

/// A boolean from the environment (`1` or `0`), if set.
pub(crate) fn env_flag(name: &str) -> Option<bool> {
    std::env::var(name).ok().map(|v| v.trim() == "1")
}

/// Counts over a run (reported by the tests).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stats {
    pub steps: u64,
    pub sockets: u64,
    pub messages_offered: u64,
    pub messages_delivered: u64,
    pub pauses: u64,
    pub replays: u64,
    pub replayed_messages: u64,
    pub hibernations: u64,
    pub restores: u64,
    pub stale_remembered: u64,
    /// Actor generations that started after a newer generation of the same actor.
    pub stale_starts: u64,
    pub runner_drops: u64,
    /// Runners that drained (`Stopping`) while they ran actors.
    pub drains_hosting: u64,
    /// Runner connections the gateway closed (eviction, ping timeout, protocol error).
    pub runner_closes: u64,
    pub runners_lost: u64,
    pub legit_closes: u64,
    pub refusals: u64,
    pub acks_ignored: u64,
    /// Most messages delivered on one socket.
    pub longest_socket: u64,
    /// Runs with several nodes, leases lost, frames the bus lost.
    pub multi_node: u64,
    pub lease_losses: u64,
    /// Messages of actors that reached their clients.
    pub actor_messages: u64,
    pub bus_dropped: u64,
}

/// A violated invariant, with what is needed to reproduce it.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub seed: u64,
    pub step: u64,
    pub message: String,
}
