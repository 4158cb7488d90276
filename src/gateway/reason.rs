//! Why the gateway refuses a request: an HTTP status, the `{group}.{code}` that goes in
//! `x-rivet-error` and the metrics, and a message for people. Each refusal the gateway
//! core makes is named here once.

use crate::http::response::Response;

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
    pub const WAKE_TIMEOUT: Refusal =
        Refusal::new(503, "actor.wake_timeout", "the actor did not become ready");
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
