//! The runner session (SPEC §1.4) on the gateway side: who may connect (the token or, in
//! protected mode, a loopback peer; the query; the protocol version; a valid upgrade), the
//! `Init` that must come first and within `timeouts.runner_init_ms`, pings as deadlines and
//! the pong timeout, fence pongs handed to the control plane in arrival order, and late
//! messages of a superseded connection ignored. Tunnel traffic goes straight to the owning
//! request's shard; everything else to the control plane.

use super::conns::{ConnKind, RunnerConn};
use super::msg::{ControlMsg, ShardMsg, TunnelIn};
use super::{ConnId, Gateway, Next, Reason, Timer};
use crate::engine::ConnRef;
use crate::http::access::Access;
use crate::http::parse::{parse_query, RequestHead};
use crate::http::response::Response;
use crate::metrics::{Counter, Gauge};
use crate::protocol::hot::{decode_to_server_hot, ToServerHot};
use crate::protocol::{self, ToServer, ToServerTunnelMessageKind};
use crate::ws::frame::OpCode;
use crate::ws::reader::{WsEvent, WsReader};
use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::time::Instant;

/// A runner connection the gateway accepts: who it is and the upgrade's accept key.
#[derive(Debug)]
pub struct RunnerAccept {
    pub namespace: String,
    pub runner_key: String,
    /// `Sec-WebSocket-Accept` of the 101 (subprotocol `rivet`).
    pub accept: String,
}

/// Why a runner connection is refused: the response, and its `{group}.{code}`.
#[derive(Debug)]
pub struct RunnerRefused {
    pub response: Response,
    pub code: String,
    /// Refused for want of the token (or a loopback peer): logged, rate-limited.
    pub unauthorized: bool,
}

/// The accept rules of `GET /runners/connect`, in order: the token (or, in protected mode, a
/// loopback peer) before anything else, so a refused runner makes torpor hold nothing; then
/// the three query parameters; the protocol version; a valid WebSocket upgrade.
pub fn accept_runner(
    access: &Access,
    head: &RequestHead,
    query: &str,
    peer: SocketAddr,
) -> Result<RunnerAccept, RunnerRefused> {
    if let Err(denied) = access.check_runner(head, peer) {
        return Err(RunnerRefused {
            response: denied.response(true),
            code: denied.code(true).to_string(),
            unauthorized: true,
        });
    }
    let refused = |status: u16, code: &str, msg: &str| RunnerRefused {
        response: Response::error(status, code, msg),
        code: code.to_string(),
        unauthorized: false,
    };
    let params = parse_query(query);
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let (Some(version), Some(namespace), Some(runner_key)) = (
        param("protocol_version"),
        param("namespace"),
        param("runner_key"),
    ) else {
        return Err(refused(
            400,
            "runner.invalid_query",
            "protocol_version, namespace and runner_key are required",
        ));
    };
    if let Err(e) = protocol::version::negotiate(Some(version)) {
        return Err(refused(
            400,
            "runner.unsupported_protocol_version",
            &e.to_string(),
        ));
    }
    let key = crate::ws::handshake::validate_upgrade(head).map_err(|e| RunnerRefused {
        response: e.to_response(),
        code: "request.bad_request".into(),
        unauthorized: false,
    })?;
    Ok(RunnerAccept {
        namespace: namespace.to_string(),
        runner_key: runner_key.to_string(),
        accept: crate::ws::handshake::accept_key(key),
    })
}

/// The key of a runner's `Init.metadata` (a JSON object) by which it says that it takes
/// streamed request bodies (`RequestStart { stream: true }` and `RequestChunk`s). Protocol v7
/// has no such capability, and `@rivetkit/engine-runner@2.2.1` loses a `RequestChunk` that
/// arrives before it has registered the request (see ARCHITECTURE.md), so only runners that
/// say so get streamed bodies; the Rust runner library does.
pub const STREAM_REQUESTS_KEY: &str = "torpor_stream_requests";

/// Whether `Init.metadata` holds `{"torpor_stream_requests": true}`.
pub fn streams_requests(metadata: Option<&str>) -> bool {
    metadata
        .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
        .and_then(|v| v.get(STREAM_REQUESTS_KEY)?.as_bool())
        .unwrap_or(false)
}

impl Gateway {
    /// Tells every shard (this one at once) whether the runner connection `conn` takes
    /// streamed request bodies.
    fn broadcast_streams(&mut self, conn: ConnRef, on: bool) {
        for shard in 0..self.shards as u16 {
            if shard == self.id {
                self.stream_runners.retain(|c| *c != conn);
                if on {
                    self.stream_runners.push(conn);
                }
            } else {
                self.mail(shard, ShardMsg::RunnerStreams { conn, on });
            }
        }
    }

    /// The runner got its 101: its entry, and the deadline of its `Init`.
    pub fn runner_connected(&mut self, a: RunnerAccept, peer: SocketAddr, now: Instant) -> ConnId {
        let id = self.insert(ConnKind::Runner(RunnerConn {
            last_pong: now,
            superseded: false,
            runner_idx: None,
            initialised: false,
            peer,
            namespace: a.namespace,
            runner_key: a.runner_key,
        }));
        self.metrics().gauge_add(Gauge::RunnersConnected, 1);
        let at = now + crate::config::ms(self.config.timeouts.runner_init_ms);
        self.arm(at, Timer::Init(id));
        id
    }

    /// Every complete frame buffered from a runner, parsed and handled in order: one call
    /// per read. `Continue` asks for more bytes; `Stop` and `Done` are those of the frame that
    /// ended it ([`Self::handle_runner_frame`]), and a connection that is gone stops.
    pub fn handle_runner_bytes(
        &mut self,
        id: ConnId,
        reader: &mut WsReader,
        buf: &mut BytesMut,
        now: Instant,
    ) -> Next {
        if !self.contains(id) {
            return Next::Stop;
        }
        loop {
            let next = match reader.next(buf) {
                Ok(Some(ev)) => self.handle_runner_frame(id, ev, now),
                Ok(None) => return Next::Continue,
                Err(e) => self.runner_protocol_error(id, e.into(), now),
            };
            if next != Next::Continue {
                return next;
            }
        }
    }

    /// One frame a runner sent (parsed by the shell's reader).
    pub fn handle_runner_frame(&mut self, id: ConnId, ev: WsEvent, now: Instant) -> Next {
        let Some(c) = self.conn(id) else {
            return Next::Stop;
        };
        let closing = c.out.closing;
        let initialised = matches!(&c.kind, ConnKind::Runner(r) if r.initialised);
        let msg = match ev {
            WsEvent::Message { text: false, data } => data,
            WsEvent::Message { text: true, .. } => {
                self.close_conn(id, Reason::WsInvalidPacket, now);
                return Next::Stop;
            }
            WsEvent::Ping(p) => {
                let f = self.ws_frame(OpCode::Pong, p);
                self.write_local(id, f);
                return Next::Continue;
            }
            WsEvent::Pong(_) => return Next::Continue,
            WsEvent::Close { code, .. } => {
                if closing {
                    // The answer to our close: the handshake is complete, and the server
                    // ends the TCP connection (RFC 6455 §7.1.1).
                    return Next::Done;
                }
                // The answer echoes the runner's code.
                let code = code.unwrap_or(crate::ws::close::NORMAL);
                self.close_conn_code(id, code, Reason::WsClosed, now);
                return Next::Stop;
            }
        };
        if initialised {
            if !self.handle_runner_message(id, msg, now) {
                self.metrics().inc(Counter::RunnerProtocolErrors);
                self.close_conn(id, Reason::WsInvalidPacket, now);
                return Next::Stop;
            }
            return Next::Continue;
        }
        if closing {
            // Refused before its Init (the deadline passed): nothing it sends counts.
            return Next::Continue;
        }
        match protocol::decode_to_server(&msg) {
            Ok(ToServer::Init(init)) => {
                let conn = self.conn_ref(id);
                let Some(ConnKind::Runner(r)) = self.conn_mut(id).map(|c| &mut c.kind) else {
                    return Next::Stop;
                };
                r.initialised = true;
                let (peer, namespace, runner_key) = (
                    r.peer,
                    std::mem::take(&mut r.namespace),
                    std::mem::take(&mut r.runner_key),
                );
                self.metrics().inc(Counter::RunnerConnections);
                if streams_requests(init.metadata.as_deref()) {
                    // Before the Init reaches the control plane: every routing answer that
                    // names this connection comes after it on each shard's mailbox.
                    self.broadcast_streams(conn, true);
                }
                self.control(ControlMsg::RunnerInit {
                    conn,
                    peer,
                    namespace,
                    runner_key,
                    init,
                });
                let interval = crate::config::ms(self.config.timeouts.ping_interval_ms);
                self.arm_ping(id, now, interval);
                Next::Continue
            }
            _ => {
                self.close_conn(id, Reason::WsInvalidInitialPacket, now);
                Next::Stop
            }
        }
    }

    /// The runner broke the WebSocket protocol: close with the reader's reason (a
    /// [`crate::ws::close::WsClose`] converts).
    pub fn runner_protocol_error(&mut self, id: ConnId, reason: Reason, now: Instant) -> Next {
        self.close_conn(id, reason, now);
        Next::Stop
    }

    /// The runner's connection ended: the control plane hears of it (after an `Init`) and
    /// the entry goes.
    pub fn runner_ended(&mut self, id: ConnId) {
        let Some(ConnKind::Runner(r)) = self.kind(id) else {
            return;
        };
        let initialised = r.initialised;
        self.metrics().gauge_add(Gauge::RunnersConnected, -1);
        let conn = self.conn_ref(id);
        if self.stream_runners.contains(&conn) {
            self.broadcast_streams(conn, false);
        }
        if initialised {
            let conn = self.conn_ref(id);
            self.control(ControlMsg::RunnerClosed { conn });
        }
        self.remove(id);
    }

    /// One runner message after `Init`: tunnel traffic is routed to its request's shard,
    /// the rest goes to the control plane. Returns false on a protocol error.
    pub fn handle_runner_message(&mut self, id: ConnId, msg: Bytes, now: Instant) -> bool {
        let decoded = match decode_to_server_hot(&msg) {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "runner sent an invalid message");
                return false;
            }
        };
        let (superseded, from) = match self.kind(id) {
            Some(ConnKind::Runner(r)) => (r.superseded, r.runner_idx),
            _ => (false, None),
        };
        if superseded && !matches!(decoded, ToServerHot::Other(ToServer::Pong(_))) {
            // A late message from a replaced connection: ignored, counted.
            self.metrics().inc(Counter::UnroutableTunnelMessages);
            return true;
        }
        let conn = self.conn_ref(id);
        match decoded {
            ToServerHot::WsMessage {
                gateway_id,
                request_id,
                data,
                binary,
                ..
            } => self.route_tunnel(
                gateway_id,
                request_id,
                TunnelIn::Message { data, binary },
                from,
                now,
            ),
            ToServerHot::WsAck {
                gateway_id,
                request_id,
                ack_index,
                ..
            } => self.route_tunnel(gateway_id, request_id, TunnelIn::Ack(ack_index), from, now),
            ToServerHot::Other(ToServer::TunnelMessage(t)) => {
                let (gw, req) = (t.message_id.gateway_id, t.message_id.request_id);
                let m = match t.message_kind {
                    ToServerTunnelMessageKind::WebSocketOpen(o) => TunnelIn::Open {
                        can_hibernate: o.can_hibernate,
                    },
                    ToServerTunnelMessageKind::WebSocketClose(c) => TunnelIn::Close {
                        code: c.code,
                        reason: c.reason,
                        hibernate: c.hibernate,
                    },
                    ToServerTunnelMessageKind::WebSocketMessage(w) => TunnelIn::Message {
                        data: Bytes::from(w.data),
                        binary: w.binary,
                    },
                    ToServerTunnelMessageKind::WebSocketMessageAck(a) => TunnelIn::Ack(a.index),
                    other => TunnelIn::Other(other),
                };
                self.route_tunnel(gw, req, m, from, now);
            }
            ToServerHot::Other(ToServer::Pong(p)) if p.ts < 0 => {
                // A fence pong: the control plane's proof of delivery, kept in arrival order.
                self.control(ControlMsg::RunnerMsg {
                    conn,
                    msg: ToServer::Pong(p),
                });
            }
            ToServerHot::Other(ToServer::Pong(_)) => {
                if let Some(ConnKind::Runner(r)) = self.conn_mut(id).map(|c| &mut c.kind) {
                    r.last_pong = now;
                }
            }
            ToServerHot::Other(ToServer::Init(_)) => return false,
            ToServerHot::Other(other) => self.control(ControlMsg::RunnerMsg { conn, msg: other }),
        }
        true
    }
}
