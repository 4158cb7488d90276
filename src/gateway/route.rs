//! The client upgrade and routing rules (SPEC §2.1–§2.3): which actor a gateway request
//! names (by id, by name and key, or by header and subprotocol), what the control plane is
//! asked to find it, what each routing answer means for the client, the headers an actor
//! sees and the client gets back (no hop-by-hop headers, unique keys), and the subprotocol
//! the gateway answers.

use super::msg::{ControlMsg, Reply, ResolveError, Routed};
use super::Refusal;
use crate::http::parse::{parse_query, RequestHead};
use crate::http::response::Response;
use crate::protocol::StrMap;
use bytes::Bytes;

/// Where a gateway request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    /// `/gateway/{actorId}[@token]/…` or the header/subprotocol form.
    Actor { actor_id: String, path: String },
    /// `/gateway/{name}/…?rvt-method=get|getOrCreate&rvt-key=…`.
    Named {
        namespace: String,
        name: String,
        key: Option<String>,
        get_or_create: bool,
        path: String,
    },
}

/// Parses the gateway target from the path, query and headers (SPEC §2.1). `None` = not a
/// gateway request.
pub fn parse_target(head: &RequestHead, path: &str, query: &str) -> Option<Target> {
    // Only origin-form targets (`/…`) are routed; anything else (`*`, absolute-form, or a
    // bare word) would hand the actor a path that is not a path.
    if !path.starts_with('/') {
        return None;
    }
    let params = parse_query(query);
    let kept: Vec<String> = query
        .split('&')
        .filter(|kv| !kv.is_empty() && !kv.starts_with("rvt-"))
        .map(str::to_string)
        .collect();
    let with_query = |p: &str| {
        let p = if p.is_empty() { "/" } else { p };
        if kept.is_empty() {
            p.to_string()
        } else {
            format!("{p}?{}", kept.join("&"))
        }
    };
    if let Some(rest) = path.strip_prefix("/gateway/") {
        let (first, tail) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let first = crate::http::parse::percent_decode(first)?;
        let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if let Some(method) = param("rvt-method") {
            return Some(Target::Named {
                namespace: param("rvt-namespace").unwrap_or_else(|| "default".into()),
                name: first,
                key: param("rvt-key"),
                get_or_create: method.eq_ignore_ascii_case("getOrCreate"),
                path: with_query(tail),
            });
        }
        let actor_id = match first.split_once('@') {
            Some((id, _token)) => id.to_string(),
            None => first,
        };
        if actor_id.is_empty() {
            return None;
        }
        return Some(Target::Actor {
            actor_id,
            path: with_query(tail),
        });
    }
    // Header form (HTTP) and subprotocol form (WebSocket).
    if head.header("x-rivet-target").is_some_and(|t| t == "actor") {
        if let Some(id) = head.header("x-rivet-actor") {
            return Some(Target::Actor {
                actor_id: id.to_string(),
                path: with_query(path),
            });
        }
    }
    let protos: Vec<&str> = crate::ws::handshake::offered_protocols(head).collect();
    if protos.contains(&"rivet_target.actor") {
        if let Some(id) = protos.iter().find_map(|p| p.strip_prefix("rivet_actor.")) {
            return Some(Target::Actor {
                actor_id: id.to_string(),
                path: with_query(path),
            });
        }
    }
    None
}

/// The upgrade headers as a map with unique keys (repeated headers joined with ", ").
pub fn header_map(head: &RequestHead) -> StrMap {
    let mut out: Vec<(String, String)> = Vec::with_capacity(head.headers.len());
    for (k, v) in &head.headers {
        match out.iter_mut().find(|(ek, _)| ek == k) {
            Some((_, ev)) => {
                ev.push_str(", ");
                ev.push_str(v);
            }
            None => out.push((k.clone(), v.clone())),
        }
    }
    StrMap(out)
}

/// The control-plane question that finds (and wakes, if needed) the actor `target` names,
/// and the path the actor sees.
pub fn resolve_question(target: Target) -> (String, Box<dyn FnOnce(u64) -> ControlMsg>) {
    match target {
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
    }
}

/// What a routing answer means for the client (`None`: no answer in time).
pub fn resolved(reply: Option<Reply>) -> Result<Routed, Refusal> {
    match reply {
        Some(Reply::Resolve(Ok(r))) => Ok(r),
        Some(Reply::Resolve(Err(ResolveError::NotFound))) => Err(Refusal::ACTOR_NOT_FOUND),
        Some(Reply::Resolve(Err(ResolveError::Unavailable))) => Err(Refusal::STORE_UNAVAILABLE),
        Some(Reply::Resolve(Err(ResolveError::RunnerFailed))) => Err(Refusal::RUNNER_FAILED),
        _ => Err(Refusal::WAKE_TIMEOUT),
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

/// The subprotocol the gateway answers: `rivet` if offered, else the first offered.
pub fn pick_protocol(head: &RequestHead) -> Option<String> {
    let offered: Vec<&str> = crate::ws::handshake::offered_protocols(head).collect();
    if offered.contains(&"rivet") {
        return Some("rivet".into());
    }
    offered.first().map(|s| s.to_string())
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
