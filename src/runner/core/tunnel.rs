//! The gateway's tunnelled traffic: HTTP requests (streamed bodies collected up to
//! [`MAX_BODY`], answered with one `ResponseStart`) and client WebSockets (open and its answer
//! ahead of the actor's first messages, inbound messages checked by index, duplicates
//! re-acknowledged, a gap closing the socket, closes from either side).
//!
//! Must never hand an actor a duplicate or an out-of-order message of a hibernatable socket,
//! nor a message or request of a socket that belongs to another generation.

use bytes::Bytes;

use super::Core;
use crate::protocol::{
    MessageId, StrMap, ToClientRequestStart, ToClientTunnelMessage, ToClientTunnelMessageKind,
    ToClientWebSocketOpen, ToServer, ToServerResponseStart, ToServerTunnelMessage,
    ToServerTunnelMessageKind, ToServerWebSocketClose, ToServerWebSocketOpen,
};
use crate::runner::actor::ActorCx;
use crate::runner::counters::Counters;
use crate::runner::index::{after, InboundIndex, Verdict};
use crate::runner::io::{msg_id, HttpOut, HttpReq, Outgoing, Phase, Req, WsReq};
use crate::runner::types::{AckPolicy, HttpRequest, HttpResponse, RequestKey, WsOpen, WsOpenReply};

/// Largest request body collected from a streamed request (as the TS runner's payload cap).
pub(crate) const MAX_BODY: usize = 20 * 1024 * 1024;

/// Close reason the TS runner uses when an inbound index skips ahead.
pub const GAP_CLOSE_CODE: u16 = 1008;
pub const GAP_CLOSE_REASON: &str = "ws.message_index_skip";

fn key_of(id: &MessageId) -> RequestKey {
    RequestKey {
        gateway_id: id.gateway_id,
        request_id: id.request_id,
    }
}

/// Lower-cases names and joins repeated ones with ", " so the map has unique keys.
fn header_map(headers: Vec<(String, String)>) -> StrMap {
    let mut out: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        let k = k.to_ascii_lowercase();
        if let Some((_, existing)) = out.iter_mut().find(|(ek, _)| *ek == k) {
            existing.push_str(", ");
            existing.push_str(&v);
        } else {
            out.push((k, v));
        }
    }
    StrMap(out)
}

fn response_start(resp: HttpResponse) -> ToServerTunnelMessageKind {
    let mut headers = header_map(resp.headers);
    let body = if resp.body.is_empty() {
        None
    } else {
        if !resp.stream && headers.get("content-length").is_none() {
            headers
                .0
                .push(("content-length".into(), resp.body.len().to_string()));
        }
        Some(Vec::from(resp.body))
    };
    ToServerTunnelMessageKind::ResponseStart(ToServerResponseStart {
        status: resp.status,
        headers,
        body,
        stream: resp.stream,
    })
}

impl Core {
    pub(super) fn on_tunnel(&mut self, t: ToClientTunnelMessage) {
        let key = key_of(&t.message_id);
        let index = t.message_id.message_index;
        match t.message_kind {
            ToClientTunnelMessageKind::RequestStart(start) => self.on_request_start(key, start),
            ToClientTunnelMessageKind::RequestChunk(chunk) => {
                let Some(Req::Http(h)) = self.io.requests.get_mut(&key) else {
                    return;
                };
                if h.streaming {
                    let (actor_id, generation) = (h.actor_id.clone(), h.generation);
                    self.http_body(&actor_id, generation, key, chunk.body, chunk.finish);
                    if chunk.finish {
                        self.io.requests.remove(&key);
                    }
                    return;
                }
                if h.body.len() + chunk.body.len() > MAX_BODY {
                    self.io.requests.remove(&key);
                    self.io.push_tunnel(
                        key,
                        0,
                        response_start(HttpResponse::new(413, "Payload Too Large")),
                    );
                    return;
                }
                h.body.extend_from_slice(&chunk.body);
                if chunk.finish {
                    if let Some(Req::Http(h)) = self.io.requests.remove(&key) {
                        let req = HttpRequest {
                            key,
                            method: h.method,
                            path: h.path,
                            headers: h.headers,
                            body: Bytes::from(h.body),
                        };
                        self.dispatch_http(&h.actor_id, h.generation, req);
                    }
                }
            }
            ToClientTunnelMessageKind::RequestAbort => {
                let owner = match self.io.requests.get(&key) {
                    Some(Req::Http(h)) => Some((h.actor_id.clone(), h.generation)),
                    _ => None,
                };
                if owner.is_some() {
                    self.io.requests.remove(&key);
                }
                let owner = match self.io.http_out.remove(&key) {
                    Some(h) => Some((h.actor_id, h.generation)),
                    None => owner,
                };
                if let Some((actor_id, generation)) = owner {
                    if let Some(slot) = self
                        .actors
                        .get_mut(&*actor_id)
                        .filter(|s| s.meta.generation == generation)
                    {
                        let mut cx = ActorCx {
                            io: &mut self.io,
                            meta: &mut slot.meta,
                        };
                        slot.actor.on_http_abort(&mut cx, key);
                    }
                }
            }
            ToClientTunnelMessageKind::WebSocketOpen(open) => self.on_ws_open(key, open),
            ToClientTunnelMessageKind::WebSocketMessage(m) => {
                self.on_ws_message(key, index, Bytes::from(m.data), m.binary)
            }
            ToClientTunnelMessageKind::WebSocketClose(c) => {
                let Some(Req::Ws(_)) = self.io.requests.get(&key) else {
                    return;
                };
                // The TS runner answers the gateway's close with a close of its own.
                self.io.push_ws(
                    key,
                    ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                        code: c.code,
                        reason: c.reason.clone(),
                        hibernate: false,
                    }),
                );
                if let Some(Req::Ws(ws)) = self.io.requests.remove(&key) {
                    self.call_close(&ws, key, c.code, c.reason.as_deref());
                }
            }
        }
    }

    fn on_request_start(&mut self, key: RequestKey, start: ToClientRequestStart) {
        let Some(slot) = self.actors.get(start.actor_id.as_str()) else {
            self.io.push_tunnel(
                key,
                0,
                response_start(
                    HttpResponse::new(503, "Actor not found")
                        .header("x-rivet-error", "runner.actor_not_found"),
                ),
            );
            return;
        };
        let actor_id = slot.meta.actor_id.clone();
        let generation = slot.meta.generation;
        let body = start.body.unwrap_or_default();
        if start.stream && slot.actor.streams_requests() {
            self.io.requests.insert(
                key,
                Req::Http(HttpReq {
                    actor_id: actor_id.clone(),
                    generation,
                    method: String::new(),
                    path: String::new(),
                    headers: Vec::new(),
                    body: Vec::new(),
                    streaming: true,
                    answered: false,
                }),
            );
            let req = HttpRequest {
                key,
                method: start.method,
                path: start.path,
                headers: start.headers.0,
                body: Bytes::from(body),
            };
            let Some(slot) = self.actors.get_mut(&*actor_id) else {
                return;
            };
            let mut cx = ActorCx {
                io: &mut self.io,
                meta: &mut slot.meta,
            };
            Counters::bump(&cx.io.counters.http_requests);
            if let Some(resp) = slot.actor.on_http_stream_start(&mut cx, req) {
                self.answer_stream(key, &actor_id, generation, resp);
            }
            return;
        }
        if start.stream {
            self.io.requests.insert(
                key,
                Req::Http(HttpReq {
                    actor_id,
                    generation,
                    method: start.method,
                    path: start.path,
                    headers: start.headers.0,
                    body,
                    streaming: false,
                    answered: false,
                }),
            );
            return;
        }
        let req = HttpRequest {
            key,
            method: start.method,
            path: start.path,
            headers: start.headers.0,
            body: Bytes::from(body),
        };
        self.dispatch_http(&actor_id, generation, req);
    }

    /// A piece of a streamed request's body for an actor that takes them.
    fn http_body(
        &mut self,
        actor_id: &std::sync::Arc<str>,
        generation: u32,
        key: RequestKey,
        data: Vec<u8>,
        finish: bool,
    ) {
        let Some(slot) = self
            .actors
            .get_mut(&**actor_id)
            .filter(|s| s.meta.generation == generation)
        else {
            return;
        };
        let mut cx = ActorCx {
            io: &mut self.io,
            meta: &mut slot.meta,
        };
        if let Some(resp) = slot
            .actor
            .on_http_body(&mut cx, key, Bytes::from(data), finish)
        {
            self.answer_stream(key, actor_id, generation, resp);
        }
    }

    /// The answer to a streamed request, once.
    fn answer_stream(
        &mut self,
        key: RequestKey,
        actor_id: &std::sync::Arc<str>,
        generation: u32,
        resp: HttpResponse,
    ) {
        if let Some(Req::Http(h)) = self.io.requests.get_mut(&key) {
            if std::mem::replace(&mut h.answered, true) {
                return;
            }
        }
        self.respond(key, actor_id, generation, resp);
    }

    /// Sends an actor's answer (index 0); a streamed one's body follows through
    /// `http_out` (indices 1, 2, …).
    fn respond(
        &mut self,
        key: RequestKey,
        actor_id: &std::sync::Arc<str>,
        generation: u32,
        resp: HttpResponse,
    ) {
        if resp.stream {
            self.io.http_out.insert(
                key,
                HttpOut {
                    actor_id: actor_id.clone(),
                    generation,
                    next: 1,
                },
            );
        }
        self.io.push_tunnel(key, 0, response_start(resp));
    }

    fn dispatch_http(&mut self, actor_id: &str, generation: u32, req: HttpRequest) {
        let key = req.key;
        let resp = match self.actors.get_mut(actor_id) {
            Some(slot) if slot.meta.generation == generation => {
                let mut cx = ActorCx {
                    io: &mut self.io,
                    meta: &mut slot.meta,
                };
                Counters::bump(&cx.io.counters.http_requests);
                slot.actor.on_http_request(&mut cx, req)
            }
            _ => HttpResponse::new(503, "Actor not found")
                .header("x-rivet-error", "runner.actor_not_found"),
        };
        let actor_id: std::sync::Arc<str> = actor_id.into();
        self.respond(key, &actor_id, generation, resp);
    }

    fn on_ws_open(&mut self, key: RequestKey, open: ToClientWebSocketOpen) {
        if self.io.requests.contains_key(&key) {
            // A second open for the same request replaces the first (TS: ws.duplicate_open).
            if let Some(Req::Ws(old)) = self.io.requests.remove(&key) {
                self.call_close(&old, key, Some(1000), Some("ws.duplicate_open"));
            }
        }
        let Some(slot) = self.actors.get_mut(open.actor_id.as_str()) else {
            self.io.push_tunnel(
                key,
                0,
                ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                    code: Some(1011),
                    reason: Some("Actor not found".into()),
                    hibernate: false,
                }),
            );
            return;
        };
        // Register first (index 0 reserved for the open answer) so the actor may send from
        // inside the callback; the answer is then inserted ahead of those messages.
        self.io.requests.insert(
            key,
            Req::Ws(WsReq {
                actor_id: slot.meta.actor_id.clone(),
                generation: slot.meta.generation,
                hibernatable: false,
                inbound: InboundIndex::opened(),
                next_out: 1,
                ack_to: None,
                acked: None,
            }),
        );
        let connected = self.io.phase == Phase::Connected;
        let mark = if connected {
            self.io.out.len()
        } else {
            self.io.backlog.len()
        };
        let mut cx = ActorCx {
            io: &mut self.io,
            meta: &mut slot.meta,
        };
        let reply = slot.actor.on_websocket_open(
            &mut cx,
            &WsOpen {
                key,
                path: &open.path,
                headers: &open.headers.0,
            },
        );
        let kind = match reply {
            WsOpenReply::Accept { can_hibernate } => {
                if let Some(Req::Ws(ws)) = self.io.requests.get_mut(&key) {
                    ws.hibernatable = can_hibernate;
                }
                ToServerTunnelMessageKind::WebSocketOpen(ToServerWebSocketOpen { can_hibernate })
            }
            WsOpenReply::Reject { code, reason } => {
                self.io.requests.remove(&key);
                ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                    code: Some(code),
                    reason: Some(reason),
                    hibernate: false,
                })
            }
        };
        let msg = Outgoing::Msg(ToServer::TunnelMessage(ToServerTunnelMessage {
            message_id: msg_id(key, 0),
            message_kind: kind,
        }));
        if connected {
            self.io.out.insert(mark, msg);
        } else {
            self.io.backlog.insert(mark, msg);
            self.io.set_queued();
        }
    }

    pub(super) fn on_ws_message(&mut self, key: RequestKey, index: u16, data: Bytes, binary: bool) {
        let Some(Req::Ws(ws)) = self.io.requests.get_mut(&key) else {
            tracing::debug!(%key, index, "message for an unknown websocket");
            return;
        };
        // Like the TS runner, only hibernatable sockets are checked: they are the ones the
        // gateway replays.
        if ws.hibernatable {
            match ws.inbound.check(index) {
                Verdict::Deliver => {}
                Verdict::Duplicate => {
                    Counters::bump(&self.io.counters.duplicates_dropped);
                    // The gateway replays only what it still holds, so an ack that covered
                    // this index was lost with a connection. Send the newest one again (acks
                    // are cumulative): nothing else would, and the gateway would keep the
                    // messages until its ack timeout closes the client.
                    if let Some(acked) = ws.acked.filter(|&a| !after(index, a)) {
                        self.io.set_ack(key, acked);
                    }
                    return;
                }
                Verdict::Gap { expected, got } => {
                    Counters::bump(&self.io.counters.gaps);
                    tracing::warn!(%key, expected, got, "websocket message index skipped, closing");
                    self.io.push_ws(
                        key,
                        ToServerTunnelMessageKind::WebSocketClose(ToServerWebSocketClose {
                            code: Some(GAP_CLOSE_CODE),
                            reason: Some(GAP_CLOSE_REASON.into()),
                            hibernate: false,
                        }),
                    );
                    if let Some(Req::Ws(ws)) = self.io.requests.remove(&key) {
                        self.call_close(&ws, key, Some(GAP_CLOSE_CODE), Some(GAP_CLOSE_REASON));
                    }
                    return;
                }
            }
        }
        let hibernatable = ws.hibernatable;
        let (actor_id, generation) = (ws.actor_id.clone(), ws.generation);
        let Some(slot) = self
            .actors
            .get_mut(&actor_id)
            .filter(|s| s.meta.generation == generation)
        else {
            self.io.requests.remove(&key);
            return;
        };
        Counters::bump(&self.io.counters.messages);
        let mut cx = ActorCx {
            io: &mut self.io,
            meta: &mut slot.meta,
        };
        slot.actor
            .on_websocket_message(&mut cx, key, index, data, binary);
        if hibernatable && slot.meta.ack_policy == AckPolicy::Immediate {
            self.io.set_ack(key, index);
        }
    }
}
