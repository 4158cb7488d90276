//! What handles send to the runner task: [`Ctl`] (from a [`super::RunnerHandle`] or, wrapping
//! an [`ActorOp`], from an [`super::ActorHandle`]), applied in order on that task.
//!
//! Messages only: must never carry state of the runner, nor act by themselves.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::types::RequestKey;

/// Messages from handles to the runner task.
#[derive(Debug)]
pub(crate) enum Ctl {
    Actor {
        actor_id: Arc<str>,
        generation: u32,
        op: ActorOp,
    },
    DropConnection,
    Shutdown(oneshot::Sender<()>),
}

/// Operations a handle asks the runner task to perform on behalf of one actor generation.
#[derive(Debug)]
pub(crate) enum ActorOp {
    Send {
        key: RequestKey,
        data: Bytes,
        binary: bool,
    },
    Close {
        key: RequestKey,
        code: Option<u16>,
        reason: Option<String>,
    },
    Hibernate(RequestKey),
    Ack(RequestKey, u16),
    HttpChunk {
        key: RequestKey,
        data: Bytes,
        finish: bool,
    },
    HttpAbort(RequestKey),
    Sleep,
    Stop,
    SetAlarm(Option<i64>),
}
