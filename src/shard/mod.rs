//! The thread-per-core runtime: N shard threads, each pinned to a core and running one
//! `tokio_uring` runtime, plus one control-plane thread that runs the sans-IO
//! [`crate::engine::Engine`].
//!
//! A shard's state and rules are its gateway core ([`crate::gateway::Gateway`]); its
//! sockets are the `net` shell's. Nothing on the data path is shared between shards: shards
//! talk only through their mailboxes ([`mailbox`]).
//!
//! This module never decides protocol behaviour; it only starts threads and moves messages.

pub mod control;
pub mod mailbox;

use crate::config::Config;
use crate::gateway::{ControlMsg, ShardMsg};
use crate::metrics::Metrics;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// What every shard thread is given at start.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub gateway_id: [u8; 4],
    pub shards: Arc<[mailbox::Mailbox<ShardMsg>]>,
    pub control: crossbeam_channel::Sender<ControlMsg>,
    /// Set on SIGTERM: `/readyz` answers 503 and listeners stop accepting.
    pub draining: Arc<AtomicBool>,
    /// Shards that finished their drain after SIGTERM (in-flight work done, WebSockets
    /// closed); the main thread waits for all of them before it stops the control plane.
    pub drained: Arc<std::sync::atomic::AtomicUsize>,
    /// Who may call the engine API and connect runners.
    pub access: Arc<crate::http::access::Access>,
    /// This node's bus to the other nodes (`[cluster] enabled`), set before the threads
    /// start.
    pub node: Option<Arc<crate::cluster::node::Node>>,
}

/// What [`Shared::new`] makes besides the shared part: each shard's inbox (index = shard
/// id) and the control plane's inbox.
pub type Inboxes = (
    Vec<mailbox::Inbox<ShardMsg>>,
    crossbeam_channel::Receiver<ControlMsg>,
);

impl Shared {
    /// The state every shard shares, with a mailbox per shard (`shards` of them) and the
    /// control plane's channel.
    pub fn new(
        config: Arc<Config>,
        metrics: Metrics,
        gateway_id: [u8; 4],
        shards: usize,
    ) -> std::io::Result<(Shared, Inboxes)> {
        let mut mailboxes = Vec::with_capacity(shards);
        let mut inboxes = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (tx, rx) = mailbox::mailbox::<ShardMsg>()?;
            mailboxes.push(tx);
            inboxes.push(rx);
        }
        let (control, control_rx) = crossbeam_channel::unbounded();
        let shared = Shared {
            access: Arc::new(crate::http::access::Access::from_config(&config)),
            config,
            metrics,
            gateway_id,
            shards: mailboxes.into(),
            control,
            draining: Arc::new(AtomicBool::new(false)),
            drained: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            node: None,
        };
        Ok((shared, (inboxes, control_rx)))
    }
}

/// Pins the calling thread to `core` (best effort; returns whether it worked).
pub fn pin_to_core(core: usize) -> bool {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core % libc::CPU_SETSIZE as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Wall-clock milliseconds now.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
