//! The thread-per-core runtime: N shard threads, each pinned to a core and running one
//! `tokio_uring` runtime, plus one control-plane thread that runs the sans-IO
//! [`crate::engine::Engine`].
//!
//! A shard owns a slab of its connections (client WebSockets with their tunnel state and
//! pending window, runner connections, plain HTTP connections) and a share of the global
//! pending-bytes budget. Nothing on the data path is shared between shards: shards talk only
//! through their mailboxes ([`mailbox`]). A `RequestId` names its owning shard and slab slot
//! (see [`RequestKey`]) so a runner's reply is routed with one array index.
//!
//! This module never decides protocol behaviour; it only holds state and moves messages.

pub mod control;
pub mod mailbox;
pub mod state;

use crate::config::Config;
use crate::metrics::Metrics;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use state::{ShardMsg, ShardState};

/// Slot bits in a request id; the rest of the low 24 bits is a generation against reuse.
pub const SLOT_BITS: u32 = 20;
pub const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
pub const GEN_MASK: u32 = 0xF;

/// The routing content of a 4-byte `RequestId`: byte 0 is the owning shard, the next three
/// bytes (little endian) carry the slab slot (20 bits) and a 4-bit generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestKey {
    pub shard: u16,
    pub slot: u32,
    pub gen: u32,
}

impl RequestKey {
    pub fn encode(self) -> [u8; 4] {
        let low = (self.slot & SLOT_MASK) | ((self.gen & GEN_MASK) << SLOT_BITS);
        let b = low.to_le_bytes();
        [self.shard as u8, b[0], b[1], b[2]]
    }

    pub fn decode(id: [u8; 4]) -> RequestKey {
        let low = u32::from_le_bytes([id[1], id[2], id[3], 0]);
        RequestKey {
            shard: id[0] as u16,
            slot: low & SLOT_MASK,
            gen: (low >> SLOT_BITS) & GEN_MASK,
        }
    }
}

/// What every shard thread is given at start.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub gateway_id: [u8; 4],
    pub shards: Arc<[mailbox::Mailbox<ShardMsg>]>,
    pub control: crossbeam_channel::Sender<control::ControlMsg>,
    /// Set on SIGTERM: `/readyz` answers 503 and listeners stop accepting.
    pub draining: Arc<AtomicBool>,
    /// Shards that finished their drain after SIGTERM (in-flight work done, WebSockets
    /// closed); the main thread waits for all of them before it stops the control plane.
    pub drained: Arc<std::sync::atomic::AtomicUsize>,
    /// Who may call the engine API and connect runners.
    pub access: Arc<crate::http::access::Access>,
}

/// What [`Shared::new`] makes besides the shared part: each shard's inbox (index = shard
/// id) and the control plane's inbox.
pub type Inboxes = (
    Vec<mailbox::Inbox<ShardMsg>>,
    crossbeam_channel::Receiver<control::ControlMsg>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_key_round_trip() {
        for &(shard, slot, gen) in &[(0u16, 0u32, 0u32), (3, 12345, 7), (255, SLOT_MASK, 15)] {
            let k = RequestKey { shard, slot, gen };
            assert_eq!(RequestKey::decode(k.encode()), k);
        }
    }
}
