//! Gateway requests in the shell: asks the control plane where the actor a request names
//! lives (waking it if it sleeps), and carries a buffered HTTP request through the core's
//! HTTP tunnel to the actor's answer. The rules (what a routing answer means, the headers
//! either way, the tunnel's phases and deadline) are the core's ([`crate::gateway`]).

use super::shell::Shard;
use crate::gateway::route::{request_headers, resolve_question, resolved, response_from, Target};
use crate::gateway::{HttpOutcome, Refusal, Routed};
use crate::http::parse::RequestHead;
use crate::http::response::Response;
use bytes::Bytes;
use std::time::Duration;

/// Finds (and wakes, if needed) the actor `target` names: where it lives and the path it
/// sees.
pub async fn resolve(shard: &Shard, target: Target) -> Result<(Routed, String), Refusal> {
    let wake = Duration::from_millis(shard.shared.config.timeouts.actor_wake_ms);
    let (path, make) = resolve_question(target);
    let reply = shard.ask(make, wake + Duration::from_secs(1)).await;
    resolved(reply).map(|r| (r, path))
}

fn failure(shard: &Shard, r: Refusal) -> Response {
    shard.metrics().error(r.code);
    r.response()
}

/// Tunnels one buffered HTTP request to its actor and returns the actor's response.
pub async fn serve_http(
    shard: &Shard,
    head: &RequestHead,
    target: Target,
    body: Bytes,
) -> Response {
    let (routed, path) = match resolve(shard, target).await {
        Ok(r) => r,
        Err(r) => return failure(shard, r),
    };
    let headers = request_headers(head, body.len());
    let method = head.method.clone();
    let id = shard.with(|c, now| c.start_request(&routed, method, path, headers, body, now));
    let (wake, _) = shard.register(id, None);
    let outcome = loop {
        if let Some(o) = shard.call(|c| c.take_http_outcome(id)) {
            break o;
        }
        if !shard.peek(|c| c.contains(id)) {
            break HttpOutcome::Failed(Refusal::RESPONSE_TIMEOUT);
        }
        wake.notified().await;
    };
    shard.call(|c| c.remove(id));
    shard.unregister(id);
    match outcome {
        HttpOutcome::Response {
            status,
            headers,
            body,
        } => response_from(status, headers, body),
        HttpOutcome::Failed(r) => failure(shard, r),
    }
}
