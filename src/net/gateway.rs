//! Gateway requests: finding the actor a request names (by id, or by name and key, waking it
//! if it sleeps) and the HTTP tunnel (SPEC §2.3): a buffered request becomes
//! `RequestStart { stream: false }` (index 0) on the actor's runner, and the runner's
//! `ResponseStart` (plus `ResponseChunk`s if it streams) becomes the HTTP response.
//!
//! It only moves bytes and waits; the runner's answers are matched to the request by
//! `ShardState::tunnel_in`, and every failure ends as an `x-rivet-error` response. It must never
//! emit duplicate header keys to the runner, never forward hop-by-hop headers, and never leave
//! a request registered after it answered.

use super::ask_control;
use super::client::{header_map, Target};
use crate::engine::ConnRef;
use crate::http::parse::RequestHead;
use crate::http::response::Response;
use crate::metrics::Counter;
use crate::protocol::{self, StrMap, ToClientTunnelMessageKind};
use crate::shard::control::ControlMsg;
use crate::shard::state::{ConnKind, HttpOutcome, Reply, RequestConn, ResolveError, ShardState};
use bytes::Bytes;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Where a gateway request goes once its actor is routable.
#[derive(Debug)]
pub struct Routed {
    pub actor_id: Arc<str>,
    pub generation: u32,
    pub runner_idx: u32,
    pub conn: ConnRef,
    /// The path the actor sees (query kept, `rvt-*` parameters removed).
    pub path: String,
}

/// Why a gateway request could not be routed: status, `{group}.{code}`, message.
pub type RouteFailure = (u16, &'static str, &'static str);

/// Finds (and wakes, if needed) the actor `target` names.
pub async fn resolve(
    state: &Rc<RefCell<ShardState>>,
    target: Target,
) -> Result<Routed, RouteFailure> {
    let wake = Duration::from_millis(state.borrow().shared.config.timeouts.actor_wake_ms);
    let (path, make): (String, Box<dyn FnOnce(u64) -> ControlMsg>) = match target {
        Target::Actor { actor_id, path } => (
            path,
            Box::new(move |waiter| ControlMsg::Resolve { actor_id, waiter }),
        ),
        Target::Named {
            namespace,
            name,
            key,
            get_or_create,
            path,
        } => (
            path,
            Box::new(move |waiter| ControlMsg::ResolveNamed {
                namespace,
                name,
                key,
                get_or_create,
                waiter,
            }),
        ),
    };
    match ask_control(state, make, wake + Duration::from_secs(1)).await {
        Some(Reply::Resolve(Ok(r))) => Ok(Routed {
            actor_id: r.actor_id,
            generation: r.generation,
            runner_idx: r.runner_idx,
            conn: r.conn,
            path,
        }),
        Some(Reply::Resolve(Err(ResolveError::NotFound))) => {
            Err((404, "actor.not_found", "the actor does not exist"))
        }
        Some(Reply::Resolve(Err(ResolveError::Unavailable))) => Err((
            503,
            "store.unavailable",
            "the store cannot commit; retry later",
        )),
        _ => Err((503, "actor.wake_timeout", "the actor did not become ready")),
    }
}

/// Headers that describe one hop's connection, never forwarded either way.
fn hop_by_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
    )
}

/// The request headers the actor sees: unique keys (repeats joined with `, `), no hop-by-hop
/// headers, and a `content-length` that matches the buffered body.
pub fn request_headers(head: &RequestHead, body_len: usize) -> StrMap {
    let mut map = header_map(head);
    map.0.retain(|(k, _)| !hop_by_hop(k));
    if body_len > 0 {
        map.0
            .push(("content-length".to_string(), body_len.to_string()));
    }
    map
}

/// The HTTP response for the runner's answer.
pub fn response_from(status: u16, headers: StrMap, body: Bytes) -> Response {
    let mut r = Response::new(status);
    r.headers = headers
        .0
        .into_iter()
        .filter(|(k, _)| !hop_by_hop(&k.to_ascii_lowercase()))
        .collect();
    r.body = body;
    r
}

fn failure(state: &Rc<RefCell<ShardState>>, status: u16, code: &str, msg: &str) -> Response {
    state.borrow().metrics().error(code);
    Response::error(status, code, msg)
}

/// Tunnels one buffered HTTP request to its actor and returns the actor's response.
pub async fn serve_http(
    state: &Rc<RefCell<ShardState>>,
    head: &RequestHead,
    target: Target,
    body: Bytes,
) -> Response {
    let routed = match resolve(state, target).await {
        Ok(r) => r,
        Err((status, code, msg)) => return failure(state, status, code, msg),
    };
    let (tx, rx) = oneshot::channel();
    let (slot, gen, req, timeout) = {
        let mut st = state.borrow_mut();
        let timeout = Duration::from_millis(st.shared.config.timeouts.response_start_ms);
        let (slot, gen) = st.insert(ConnKind::Http);
        let req = st.request_key(slot, gen).encode();
        st.conns[slot as usize].kind = ConnKind::Request(RequestConn {
            actor_id: routed.actor_id.clone(),
            runner_idx: routed.runner_idx,
            req,
            streamed: None,
            done: Some(tx),
        });
        let idx = routed.runner_idx as usize;
        if st.runners.len() <= idx {
            st.runners.resize(idx + 1, None);
        }
        st.runners[idx].get_or_insert(routed.conn);
        let start = ToClientTunnelMessageKind::RequestStart(protocol::ToClientRequestStart {
            actor_id: routed.actor_id.to_string(),
            method: head.method.clone(),
            path: routed.path,
            headers: request_headers(head, body.len()),
            body: (!body.is_empty()).then(|| body.to_vec()),
            stream: false,
        });
        let frames = st.tunnel_frames(req, 0, start);
        st.metrics().inc(Counter::HttpTunnelRequests);
        if !st.send_to_runner(routed.runner_idx, frames) {
            st.finish_request(
                slot,
                gen,
                HttpOutcome::Failed {
                    status: 503,
                    code: "request.runner_disconnected",
                },
            );
        }
        (slot, gen, req, timeout)
    };
    let outcome = tokio::time::timeout(timeout, rx).await;
    let mut st = state.borrow_mut();
    if st.get(slot, gen).is_some() {
        st.conns.remove(slot as usize);
    }
    match outcome {
        Ok(Ok(HttpOutcome::Response {
            status,
            headers,
            body,
        })) => response_from(status, headers, body),
        Ok(Ok(HttpOutcome::Failed { status, code })) => {
            drop(st);
            failure(
                state,
                status,
                code,
                "the actor could not answer the request",
            )
        }
        Ok(Err(_)) | Err(_) => {
            // No answer in time: tell the runner to drop it (index 1, after the start).
            let frames = st.tunnel_frames(req, 1, ToClientTunnelMessageKind::RequestAbort);
            let runner_idx = routed.runner_idx;
            st.send_to_runner(runner_idx, frames);
            drop(st);
            failure(
                state,
                504,
                "guard.response_timeout",
                "the actor did not answer in time",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: "POST".into(),
            path: "/gateway/a/x".into(),
            version_minor: 1,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn request_headers_are_unique_and_end_to_end() {
        let h = head(&[
            ("host", "x"),
            ("accept", "a"),
            ("connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("accept", "b"),
            ("content-length", "999"),
        ]);
        let m = request_headers(&h, 5);
        assert_eq!(
            m.0,
            vec![
                ("host".to_string(), "x".to_string()),
                ("accept".to_string(), "a, b".to_string()),
                ("content-length".to_string(), "5".to_string()),
            ]
        );
        let m = request_headers(&h, 0);
        assert!(m.0.iter().all(|(k, _)| k != "content-length"));
    }

    #[test]
    fn response_drops_hop_by_hop_headers() {
        let headers = StrMap(vec![
            ("Content-Type".into(), "text/plain".into()),
            ("Content-Length".into(), "2".into()),
            ("Connection".into(), "close".into()),
        ]);
        let r = response_from(201, headers, Bytes::from_static(b"ok"));
        assert_eq!(r.status, 201);
        assert_eq!(
            r.headers,
            vec![("Content-Type".to_string(), "text/plain".to_string())]
        );
        assert_eq!(&r.body[..], b"ok");
    }
}
