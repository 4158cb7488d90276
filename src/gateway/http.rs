//! The HTTP tunnel (SPEC §2.3) as phases: a buffered request becomes
//! `RequestStart { stream: false }` (index 0) on the actor's runner ([`RequestPhase::Waiting`],
//! the response deadline runs); the runner's `ResponseStart` answers it, or starts a streamed
//! body ([`RequestPhase::Streaming`]) that `ResponseChunk`s complete; an abort, the runner's
//! or the actor's end, or the deadline fail it. The outcome waits in
//! [`RequestPhase::Answered`] until the shell takes it.

use super::conns::{ConnKind, HttpOutcome, RequestConn, RequestPhase};
use super::msg::{Routed, TunnelIn};
use super::{ConnId, Gateway, Notice, Refusal, Timer};
use crate::metrics::Counter;
use crate::protocol::{self, StrMap, ToClientTunnelMessageKind, ToServerTunnelMessageKind};
use bytes::{Bytes, BytesMut};
use std::time::Instant;

impl Gateway {
    /// Tunnels one buffered HTTP request to its routed actor. The outcome comes as
    /// [`Output::Wake`]; [`Gateway::take_http_outcome`] then hands it over.
    pub fn start_request(
        &mut self,
        routed: &Routed,
        method: String,
        path: String,
        headers: StrMap,
        body: Bytes,
        now: Instant,
    ) -> ConnId {
        let id = self.insert(ConnKind::Request(RequestConn {
            actor_id: routed.actor_id.clone(),
            runner_idx: routed.runner_idx,
            req: [0; 4],
            phase: RequestPhase::Waiting,
        }));
        let req = self.issue_request_id(id);
        if let Some(ConnKind::Request(r)) = self.conn_mut(id).map(|c| &mut c.kind) {
            r.req = req;
        }
        self.learn_runner(routed.runner_idx, routed.conn);
        let start = ToClientTunnelMessageKind::RequestStart(protocol::ToClientRequestStart {
            actor_id: routed.actor_id.to_string(),
            method,
            path,
            headers,
            body: (!body.is_empty()).then(|| body.to_vec()),
            stream: false,
        });
        let frames = self.tunnel_frames(req, 0, start);
        self.metrics().inc(Counter::HttpTunnelRequests);
        if self.send_to_runner(routed.runner_idx, frames) {
            let at = now + crate::config::ms(self.config.timeouts.response_start_ms);
            self.arm(at, Timer::Response(id));
        } else {
            let r = Refusal::request_failed(503, "request.runner_disconnected");
            self.answer_request(id, HttpOutcome::Failed(r));
        }
        id
    }

    /// The outcome of a tunnelled HTTP request, once answered (taken once).
    pub fn take_http_outcome(&mut self, id: ConnId) -> Option<HttpOutcome> {
        match &mut self.conn_mut(id)?.kind {
            ConnKind::Request(RequestConn {
                phase: RequestPhase::Answered(o),
                ..
            }) => o.take(),
            _ => None,
        }
    }

    /// Runner → gateway traffic of a tunnelled HTTP request: the response head (and body),
    /// body chunks of a streamed response, or an abort.
    pub(super) fn request_in(&mut self, id: ConnId, msg: TunnelIn) {
        let body_limit = self.config.limits.http_body_bytes;
        let Some(ConnKind::Request(rc)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return;
        };
        let outcome = match (msg, &mut rc.phase) {
            (
                TunnelIn::Other(ToServerTunnelMessageKind::ResponseStart(r)),
                RequestPhase::Waiting,
            ) => {
                let body = r.body.unwrap_or_default();
                if r.stream {
                    rc.phase = RequestPhase::Streaming {
                        status: r.status,
                        headers: r.headers,
                        body: BytesMut::from(&body[..]),
                    };
                    None
                } else {
                    Some(HttpOutcome::Response {
                        status: r.status,
                        headers: r.headers,
                        body: Bytes::from(body),
                    })
                }
            }
            (
                TunnelIn::Other(ToServerTunnelMessageKind::ResponseChunk(c)),
                RequestPhase::Streaming { body, .. },
            ) => {
                if body.len() + c.body.len() > body_limit {
                    Some(HttpOutcome::Failed(Refusal::request_failed(
                        502,
                        "request.response_too_large",
                    )))
                } else {
                    body.extend_from_slice(&c.body);
                    if c.finish {
                        let RequestPhase::Streaming {
                            status,
                            headers,
                            body,
                        } = std::mem::replace(&mut rc.phase, RequestPhase::Waiting)
                        else {
                            unreachable!("matched above");
                        };
                        Some(HttpOutcome::Response {
                            status,
                            headers,
                            body: body.freeze(),
                        })
                    } else {
                        None
                    }
                }
            }
            (
                TunnelIn::Other(ToServerTunnelMessageKind::ResponseAbort),
                RequestPhase::Waiting | RequestPhase::Streaming { .. },
            ) => Some(HttpOutcome::Failed(Refusal::request_failed(
                503,
                "request.aborted",
            ))),
            _ => {
                self.metrics().inc(Counter::UnroutableTunnelMessages);
                return;
            }
        };
        if let Some(o) = outcome {
            self.answer_request(id, o);
        }
    }

    /// Answers a tunnelled HTTP request (once) and wakes its task.
    pub(super) fn answer_request(&mut self, id: ConnId, outcome: HttpOutcome) {
        let Some(ConnKind::Request(rc)) = self.conn_mut(id).map(|c| &mut c.kind) else {
            return;
        };
        if matches!(rc.phase, RequestPhase::Answered(_)) {
            return;
        }
        rc.phase = RequestPhase::Answered(Some(outcome));
        self.notice(Notice::Wake(id));
    }

    /// Fails every tunnelled HTTP request that matches `pred` (its runner or actor is gone).
    pub(super) fn fail_requests(
        &mut self,
        code: &'static str,
        pred: impl Fn(&RequestConn) -> bool,
    ) {
        let hit: Vec<ConnId> = self
            .conns
            .iter()
            .filter_map(|(s, c)| match &c.kind {
                ConnKind::Request(r)
                    if !matches!(r.phase, RequestPhase::Answered(_)) && pred(r) =>
                {
                    Some(ConnId {
                        slot: s as u32,
                        gen: c.gen,
                    })
                }
                _ => None,
            })
            .collect();
        for id in hit {
            self.answer_request(id, HttpOutcome::Failed(Refusal::request_failed(503, code)));
        }
    }
}
