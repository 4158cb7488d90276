//! Why the gateway refuses a request or closes a WebSocket, each named once.
//!
//! - [`Refusal`]: an HTTP status, the `{group}.{code}` that goes in `x-rivet-error` and the
//!   metrics, and a message for people.
//! - [`Reason`]: a close the gateway itself sends: its `{group}.{code}` (the close frame's
//!   reason and the runner's `WebSocketClose`), its close code, and its metric label
//!   ([`CloseLabel`]), each by a `match`. Text that is not the gateway's own (a client's
//!   close frame, an actor's `WebSocketClose`) is passed on as it came and counted by whose
//!   it is ([`Peer`]), never by its text.
//!
//! The tunnel's decisions ([`CloseReason`]) and the frame reader's errors ([`WsClose`]) are
//! their modules' own types; they become a [`Reason`] where the gateway applies them.

use crate::http::response::Response;
use crate::metrics::CloseLabel;
use crate::tunnel::CloseReason;
use crate::ws::close::{
    WsClose, GOING_AWAY, INTERNAL_ERROR, INVALID_PAYLOAD, MESSAGE_TOO_BIG, NORMAL, PROTOCOL_ERROR,
    SERVICE_RESTART,
};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: &'static str,
}

impl Refusal {
    const fn new(status: u16, code: &'static str, message: &'static str) -> Refusal {
        Refusal {
            status,
            code,
            message,
        }
    }

    pub fn response(&self) -> Response {
        Response::error(self.status, self.code, self.message)
    }

    pub const NOT_FOUND_ROUTE: Refusal = Refusal::new(404, "request.not_found", "no such route");
    pub const ACTOR_NOT_FOUND: Refusal =
        Refusal::new(404, "actor.not_found", "the actor does not exist");
    pub const STORE_UNAVAILABLE: Refusal = Refusal::new(
        503,
        "store.unavailable",
        "the store cannot commit; retry later",
    );
    /// The codes of the Rivet engine's guard that rivetkit's client reads as scheduling
    /// errors (`isSchedulingError`): it then asks `/actors` for the actor's `error`.
    pub const WAKE_TIMEOUT: Refusal = Refusal::new(
        503,
        "guard.actor_ready_timeout",
        "the actor did not become ready",
    );
    pub const RUNNER_FAILED: Refusal = Refusal::new(
        503,
        "guard.actor_runner_failed",
        "the actor's runner pool fails to start runners",
    );
    pub const OPEN_REFUSED: Refusal = Refusal::new(
        503,
        "guard.websocket_open_refused",
        "the actor refused the WebSocket",
    );
    pub const OPEN_TIMEOUT: Refusal = Refusal::new(
        503,
        "guard.websocket_open_timeout",
        "the actor did not accept the WebSocket in time",
    );
    pub const RESPONSE_TIMEOUT: Refusal = Refusal::new(
        504,
        "guard.response_timeout",
        "the actor did not answer in time",
    );
    pub const CONTROL_UNAVAILABLE: Refusal = Refusal::new(
        503,
        "guard.control_unavailable",
        "control plane did not answer",
    );
    pub const DRAINING: Refusal =
        Refusal::new(503, "guard.draining", "the gateway is shutting down");

    /// A tunnelled HTTP request that ended without the actor's answer (`code` says why).
    pub const fn request_failed(status: u16, code: &'static str) -> Refusal {
        Refusal::new(status, code, "the actor could not answer the request")
    }
}

/// Defines [`Reason`] from one table: each row is a variant, its `{group}.{code}`, its close
/// code and its [`CloseLabel`]; the three lookups are `match`es generated from the rows.
macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident => ($text:literal, $code:expr, $label:ident)),* $(,)?) => {
        /// A close the gateway itself sends (see the module's documentation).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason { $($(#[$doc])* $variant),* }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$(Reason::$variant),*];

            /// The `{group}.{code}` sent in the close frame and to the runner.
            pub const fn as_str(self) -> &'static str {
                match self { $(Reason::$variant => $text),* }
            }

            /// The close code sent with it. (`ws.closed` answering a runner's close echoes
            /// the runner's code instead.)
            pub const fn code(self) -> u16 {
                match self { $(Reason::$variant => $code),* }
            }

            /// Its series of `torpor_websocket_closes_total`.
            pub const fn label(self) -> CloseLabel {
                match self { $(Reason::$variant => CloseLabel::$label),* }
            }
        }
    };
}

reasons! {
    /// A normal end: the client's socket ended, a runner closed (its code echoed), or an
    /// actor asked to hibernate a socket that cannot.
    WsClosed => ("ws.closed", NORMAL, WsClosed),
    /// The gateway shuts down (the drain's last step).
    WsGoingAway => ("ws.going_away", GOING_AWAY, WsGoingAway),
    /// A runner sent a text frame, or a message that does not decode.
    WsInvalidPacket => ("ws.invalid_packet", INTERNAL_ERROR, WsInvalidPacket),
    /// A runner's first message was not `Init`.
    WsInvalidInitialPacket =>
        ("ws.invalid_initial_packet", INTERNAL_ERROR, WsInvalidInitialPacket),
    /// A runner sent no `Init` within `timeouts.runner_init_ms`.
    WsTimedOutWaitingForInit =>
        ("ws.timed_out_waiting_for_init", INTERNAL_ERROR, WsTimedOutWaitingForInit),
    /// A runner did not answer pings within `timeouts.ping_timeout_ms`.
    WsPingTimeout => ("ws.ping_timeout", INTERNAL_ERROR, WsPingTimeout),
    /// The runner connection dropped under a socket that cannot hibernate.
    WsRunnerDisconnected => ("ws.runner_disconnected", INTERNAL_ERROR, WsRunnerDisconnected),
    /// The frame reader: the peer broke the framing rules.
    WsProtocolError => ("ws.protocol_error", PROTOCOL_ERROR, WsProtocolError),
    /// The frame reader: a text message or a close reason is not valid UTF-8.
    WsInvalidUtf8 => ("ws.invalid_utf8", INVALID_PAYLOAD, WsInvalidUtf8),
    /// The frame reader: a frame above the frame limit.
    WsFrameTooBig => ("ws.frame_too_big", MESSAGE_TOO_BIG, WsFrameTooBig),
    /// The frame reader: a message above the message limit.
    WsMessageTooBig => ("ws.message_too_big", MESSAGE_TOO_BIG, WsMessageTooBig),
    /// The engine: a newer connection with the same runner key took over.
    WsEviction => ("ws.eviction", NORMAL, WsEviction),
    /// The actor stopped under a socket that cannot hibernate.
    ActorStopped => ("actor.stopped", NORMAL, ActorStopped),
    /// The actor was destroyed.
    ActorDestroyed => ("actor.destroyed", NORMAL, ActorDestroyed),
    /// The runner did not acknowledge the oldest pending message within the ack timeout.
    MessageNotAcked => ("guard.websocket_message_not_acked", INTERNAL_ERROR, MessageNotAcked),
    /// The pending-bytes cap would be exceeded.
    PendingLimitReached =>
        ("guard.websocket_pending_limit_reached", INTERNAL_ERROR, PendingLimitReached),
    /// The runner did not answer `WebSocketOpen` in time.
    OpenTimeout => ("guard.websocket_open_timeout", INTERNAL_ERROR, OpenTimeout),
    /// The client does not read what it is sent (the connection is reset).
    ClientTooSlow => ("guard.client_too_slow", INTERNAL_ERROR, ClientTooSlow),
    /// The client stayed silent after an idle ping.
    ClientIdleTimeout => ("guard.client_idle_timeout", INTERNAL_ERROR, ClientIdleTimeout),
    /// A socket hibernated longer than `timeouts.hibernation_max_ms`.
    HibernationTimeout => ("guard.hibernation_timeout", INTERNAL_ERROR, HibernationTimeout),
    /// The engine: a runner's `Init` is above a limit.
    RunnerInitTooLarge => ("runner.init_too_large", INTERNAL_ERROR, RunnerInitTooLarge),
    /// The engine: it holds as many runners as it may.
    EngineTooManyRunners => ("engine.too_many_runners", INTERNAL_ERROR, EngineTooManyRunners),
    /// Several nodes: the placement leader changed; runners connect again and are placed
    /// anew by the new leader.
    ClusterLeaderChanged => ("cluster.leader_changed", SERVICE_RESTART, ClusterLeaderChanged),
    /// Several nodes: the leader had counted this node out (silent past
    /// `cluster.node_timeout_ms`) and forgot its runners; they connect again.
    ClusterNodeRejoined => ("cluster.node_rejoined", SERVICE_RESTART, ClusterNodeRejoined),
}

impl Reason {
    /// A close decided elsewhere that names no [`Reason`]: a bug, so debug builds stop;
    /// release builds log it and close with `fallback`.
    #[cold]
    pub fn unmapped(source: &str, code: u16, text: &str, fallback: Reason) -> Reason {
        if cfg!(debug_assertions) {
            panic!("{source} close {code} {text:?} has no gateway Reason");
        }
        tracing::warn!(source, code, text, fallback = %fallback, "close without a gateway Reason");
        fallback
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The tunnel's decisions, applied by the gateway.
impl From<CloseReason> for Reason {
    fn from(c: CloseReason) -> Reason {
        match c {
            CloseReason::NOT_ACKED => Reason::MessageNotAcked,
            CloseReason::PENDING_LIMIT => Reason::PendingLimitReached,
            CloseReason::RUNNER_DISCONNECTED => Reason::WsRunnerDisconnected,
            CloseReason::ACTOR_STOPPED => Reason::ActorStopped,
            CloseReason::CLOSED => Reason::WsClosed,
            CloseReason::OPEN_TIMEOUT => Reason::OpenTimeout,
            CloseReason::HIBERNATION_TIMEOUT => Reason::HibernationTimeout,
            other => Reason::unmapped("tunnel", other.code, other.reason, Reason::WsClosed),
        }
    }
}

/// The frame reader's errors (the peer broke RFC 6455).
impl From<WsClose> for Reason {
    fn from(c: WsClose) -> Reason {
        match c {
            WsClose::PROTOCOL => Reason::WsProtocolError,
            WsClose::INVALID_UTF8 => Reason::WsInvalidUtf8,
            WsClose::FRAME_TOO_BIG => Reason::WsFrameTooBig,
            WsClose::MESSAGE_TOO_BIG => Reason::WsMessageTooBig,
            other => Reason::unmapped("reader", other.code, other.reason, Reason::WsProtocolError),
        }
    }
}

/// Whose words a close passes on when they are not the gateway's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The client's own close frame (its code and reason go to the runner): `client.closed`.
    Client,
    /// The actor's `WebSocketClose` (its code and reason go to the client): `actor.closed`.
    Actor,
}

impl Peer {
    pub const fn label(self) -> CloseLabel {
        match self {
            Peer::Client => CloseLabel::ClientClosed,
            Peer::Actor => CloseLabel::ActorClosed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::DetachCause;

    /// Every reason is `{group}.{code}`, fits a close frame (123 bytes after the code) and is
    /// counted under the label of the same text: none lands in `other`.
    #[test]
    fn every_reason_is_shaped_fits_and_has_its_own_label() {
        for &r in Reason::ALL {
            let s = r.as_str();
            let (group, code) = s.split_once('.').unwrap_or_else(|| panic!("{s}: no group"));
            let word = |w: &str| {
                !w.is_empty()
                    && w.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            };
            assert!(word(group) && word(code), "{s} is not {{group}}.{{code}}");
            assert!(s.len() <= 123, "{s} is longer than a close frame's reason");
            assert_ne!(r.label(), CloseLabel::Other, "{s}");
            assert_eq!(r.label().label(), s, "{r:?} is counted under another label");
            assert_eq!(CloseLabel::of(s), Some(r.label()));
            assert!(
                crate::ws::close::is_valid_close_code(r.code()),
                "{s}: {}",
                r.code()
            );
            assert_eq!(r.to_string(), s);
        }
    }

    /// One reason per label, and every label but the peers' and `other` is a reason.
    #[test]
    fn reasons_and_labels_match_one_to_one() {
        let texts: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(texts.len(), Reason::ALL.len(), "two reasons share a text");
        let peers = [Peer::Client.label(), Peer::Actor.label(), CloseLabel::Other];
        for &l in CloseLabel::ALL {
            let reasons = Reason::ALL.iter().filter(|r| r.label() == l).count();
            let want = usize::from(!peers.contains(&l));
            assert_eq!(reasons, want, "label {} has {reasons} reasons", l.label());
        }
    }

    /// The tunnel's and the reader's closes keep their code and text as a [`Reason`].
    #[test]
    fn conversions_keep_code_and_text() {
        let tunnel = [
            CloseReason::NOT_ACKED,
            CloseReason::PENDING_LIMIT,
            CloseReason::RUNNER_DISCONNECTED,
            CloseReason::ACTOR_STOPPED,
            CloseReason::CLOSED,
            CloseReason::OPEN_TIMEOUT,
            CloseReason::HIBERNATION_TIMEOUT,
        ]
        .into_iter()
        .chain(
            [
                DetachCause::RunnerLost,
                DetachCause::ActorStopped,
                DetachCause::HibernateRequested,
            ]
            .map(DetachCause::close_reason),
        );
        for c in tunnel {
            let r = Reason::from(c);
            assert_eq!((r.code(), r.as_str()), (c.code, c.reason), "{r:?}");
        }
        for c in [
            WsClose::PROTOCOL,
            WsClose::INVALID_UTF8,
            WsClose::FRAME_TOO_BIG,
            WsClose::MESSAGE_TOO_BIG,
        ] {
            let r = Reason::from(c);
            assert_eq!((r.code(), r.as_str()), (c.code, c.reason), "{r:?}");
        }
        assert_eq!(
            Reason::OpenTimeout.as_str(),
            Refusal::OPEN_TIMEOUT.code,
            "the open timeout closes and refuses with one text"
        );
    }
}
