//! The runner's protocol state machine, without I/O: it takes decoded `ToClient` messages,
//! connection events, handle operations and `now`, calls the actors, and queues `ToServer`
//! messages for the shell ([`super::client`]) to write.
//!
//! It owns: the actors and their per-(actor, generation) event numbering and unacknowledged
//! event history, the per-request tunnel state (inbound index for duplicate/gap handling,
//! outbound message index, pending ack), the queue of tunnel messages waiting for a connection,
//! and the runner-lost deadline. It must never touch a socket, sleep, or read a clock.
//!
//! Layout: this file holds the state machine and its accessors; `session` the connection and
//! the control messages (Init, pings, commands, event acks), `hosting` the actors (start, stop,
//! operations from handles), `tunnel` the gateway's tunnelled requests and WebSockets. The
//! state the actors' callbacks share ([`Io`]) is in [`super::io`].

mod hosting;
mod session;
mod tunnel;

use super::FastMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::actor::{Actor, ActorFactory};
use super::counters::Counters;
use super::io::{ActorMeta, Io};
use crate::protocol::ProtocolMetadata;

// The types of the core's interface, under the paths the shell and the simulation name.
pub(crate) use super::ctl::Ctl;
pub(crate) use super::io::{Outgoing, Phase};
pub use tunnel::{GAP_CLOSE_CODE, GAP_CLOSE_REASON};

struct ActorSlot {
    meta: ActorMeta,
    actor: Box<dyn Actor>,
}

/// Runner identity sent in `Init`.
#[derive(Debug, Clone)]
pub(crate) struct InitInfo {
    pub name: String,
    pub version: u32,
    pub total_slots: u32,
    pub metadata: Option<String>,
}

/// The runner state machine.
pub(crate) struct Core {
    pub(crate) io: Io,
    actors: FastMap<Arc<str>, ActorSlot>,
    factory: Box<dyn ActorFactory>,
    init: InitInfo,
    runner_id: Option<String>,
    metadata: Option<ProtocolMetadata>,
    lost_deadline: Option<Instant>,
    draining: bool,
}

impl Core {
    pub(crate) fn new(
        init: InitInfo,
        factory: Box<dyn ActorFactory>,
        counters: Arc<Counters>,
        ctl_tx: UnboundedSender<Ctl>,
    ) -> Self {
        Self {
            io: Io::new(counters, ctl_tx),
            actors: FastMap::default(),
            factory,
            init,
            runner_id: None,
            metadata: None,
            lost_deadline: None,
            draining: false,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.io.phase
    }

    pub(crate) fn runner_id(&self) -> Option<&str> {
        self.runner_id.as_deref()
    }

    pub(crate) fn actor_count(&self) -> usize {
        self.actors.len()
    }

    pub(crate) fn lost_deadline(&self) -> Option<Instant> {
        self.lost_deadline
    }

    /// Number of tunnel messages waiting for a connection.
    #[cfg(test)]
    pub(crate) fn backlog_len(&self) -> usize {
        self.io.backlog.len()
    }

    /// Drains everything ready to be written, in order.
    pub(crate) fn take_out(&mut self, buf: &mut Vec<Outgoing>) {
        self.io.flush_acks();
        buf.extend(self.io.out.drain(..));
    }
}
