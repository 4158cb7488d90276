//! One shard's gateway core ([`Gateway`]) with one runner connected and attached as runner
//! 0, for tests that drive the core with made-up clocks and no sockets.

use std::sync::Arc;
use std::time::Instant;

use torpor::config::Config;
use torpor::gateway::{ConnId, Gateway, RunnerAccept, Settings, ShardMsg};
use torpor::metrics::Metrics;

/// The core (shard 0 of 1, gateway id `[7; 4]`), its metrics and the runner's connection.
pub fn core_with_runner(cfg: Config, t0: Instant) -> (Gateway, Metrics, ConnId) {
    let metrics = Metrics::new(1);
    let settings = Settings {
        shard: 0,
        shards: 1,
        config: Arc::new(cfg),
        metrics: metrics.clone(),
        gateway_id: [7; 4],
        clustered: false,
    };
    let mut gw = Gateway::new(settings, 1, t0, 0);
    let accept = RunnerAccept {
        namespace: "default".into(),
        runner_key: "key".into(),
        accept: String::new(),
    };
    let runner = gw.runner_connected(accept, "127.0.0.1:1".parse().unwrap(), t0);
    let conn = gw.conn_ref(runner);
    gw.handle_shard_msg(
        ShardMsg::RunnerAttached {
            runner_idx: 0,
            conn,
        },
        t0,
    );
    (gw, metrics, runner)
}
