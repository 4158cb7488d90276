//! Several torpor nodes (`[cluster] enabled`) on one throwaway PostgreSQL cluster and one
//! throwaway `nats-server`, all on loopback.
//!
//! The lease timings are shortened for tests (a 3 s lease renewed every 0.5 s, heartbeats
//! every 0.2 s, a node counted out after 2 s) so that a failover is quick; no verdict depends
//! on them being met in time, only on what happens.

use super::Daemon;
use torpor::cluster::nats_server::NatsServer;
use torpor::kv::pg_cluster::PgCluster;

/// The PostgreSQL cluster and the NATS server the nodes share.
pub struct Backends {
    pub pg: PgCluster,
    pub nats: NatsServer,
}

impl Backends {
    pub fn start() -> Backends {
        Backends {
            pg: PgCluster::start().expect("start a PostgreSQL cluster"),
            nats: NatsServer::start().expect("start nats-server"),
        }
    }

    /// The settings of a node.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TORPOR_STORE__BACKEND", "postgres".into()),
            ("TORPOR_STORE__POSTGRES_URL", self.pg.url("torpor")),
            ("TORPOR_STORE__CONNECT_TIMEOUT_MS", "2000".into()),
            ("TORPOR_STORE__PROBE_TIMEOUT_MS", "2000".into()),
            ("TORPOR_STORE__STATEMENT_TIMEOUT_MS", "2000".into()),
            ("TORPOR_CLUSTER__ENABLED", "true".into()),
            ("TORPOR_CLUSTER__NATS_URL", self.nats.url()),
            ("TORPOR_CLUSTER__LEASE_TTL_MS", "3000".into()),
            ("TORPOR_CLUSTER__LEASE_RENEW_MS", "500".into()),
            ("TORPOR_CLUSTER__LEASE_SAFETY_MS", "500".into()),
            ("TORPOR_CLUSTER__LEASE_RETRY_MS", "200".into()),
            ("TORPOR_CLUSTER__HEARTBEAT_MS", "200".into()),
            ("TORPOR_CLUSTER__NODE_TIMEOUT_MS", "2000".into()),
            // A new leader holds placement this long after its quiet period.
            ("TORPOR_TIMEOUTS__RUNNER_LOST_THRESHOLD_MS", "2000".into()),
        ]
    }

    /// Starts one node with extra settings (`TORPOR_*` pairs).
    pub fn node_with(&self, shards: usize, extra: &[(&str, &str)]) -> Daemon {
        let env = self.env();
        let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.extend_from_slice(extra);
        Daemon::start(shards, &env)
    }

    /// Starts one node.
    pub fn node(&self, shards: usize) -> Daemon {
        self.node_with(shards, &[])
    }

    /// Three nodes `[n1, n2, n3]`: `n3` is started first and leads (it took the lease);
    /// `n1` and `n2` follow it.
    pub fn three_nodes(&self, extra: &[(&str, &str)]) -> [Daemon; 3] {
        let leader = self.node_with(1, extra);
        wait_leading(&leader);
        let n1 = self.node_with(1, extra);
        let n2 = self.node_with(1, extra);
        [n1, n2, leader]
    }
}

/// Waits (bounded) until `node` leads placement; returns its lease epoch.
pub fn wait_leading(node: &Daemon) -> f64 {
    node.wait_metric("torpor_cluster_leading_epoch", |v| v > 0.0)
}
