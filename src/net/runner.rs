//! The runner connection driver (`GET /runners/connect`, SPEC §1.4): checks the query, the
//! protocol version and the token, answers the upgrade with subprotocol `rivet`, waits for
//! `Init`, then reads `ToServer` messages: tunnel traffic is routed straight to the owning
//! request's shard (the request id says which), everything else goes to the control plane.
//! It also sends pings and closes a runner that stops answering them.

use super::{
    closing, next_chunk, read_more, read_some, refuse, remove_conn, write_response, writer,
    READ_CHUNK, RUNNER_CHUNKS,
};
use crate::http::parse::{parse_query, RequestHead};
use crate::metrics::{Counter, Gauge};
use crate::protocol::hot::{decode_to_server_hot, ToServerHot};
use crate::protocol::{self, ToClient, ToServer, ToServerTunnelMessageKind};
use crate::shard::control::ControlMsg;
use crate::shard::state::{ConnKind, RunnerConn, ShardState, TunnelIn};
use crate::ws::reader::{Role, WsEvent, WsReader, WsReaderConfig};
use bytes::{Bytes, BytesMut};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_uring::net::TcpStream;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub async fn serve(
    state: Rc<RefCell<ShardState>>,
    stream: Rc<TcpStream>,
    head: RequestHead,
    mut buf: BytesMut,
    query: &str,
    peer: std::net::SocketAddr,
) {
    // The token (or, in protected mode, a loopback peer) before anything else: a refused
    // runner makes torpor hold nothing.
    let access = state.borrow().shared.access.clone();
    if let Err(denied) = access.check_runner(&head, peer) {
        {
            let st = state.borrow();
            st.metrics().inc(Counter::Unauthorized);
            crate::warn_limited!(st.metrics(), %peer, code = denied.code(true), "runner connection refused");
        }
        let resp = denied.response(true);
        state.borrow().metrics().error(denied.code(true));
        write_response(&stream, &closing(resp)).await;
        return;
    }
    let params = parse_query(query);
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let (Some(version), Some(namespace), Some(runner_key)) = (
        param("protocol_version"),
        param("namespace"),
        param("runner_key"),
    ) else {
        refuse(
            &state,
            &stream,
            400,
            "runner.invalid_query",
            "protocol_version, namespace and runner_key are required",
        )
        .await;
        return;
    };
    if let Err(e) = protocol::version::negotiate(Some(version)) {
        refuse(
            &state,
            &stream,
            400,
            "runner.unsupported_protocol_version",
            &e.to_string(),
        )
        .await;
        return;
    }
    let key = match crate::ws::handshake::validate_upgrade(&head) {
        Ok(k) => k,
        Err(e) => {
            state.borrow().metrics().error("request.bad_request");
            write_response(&stream, &closing(e.to_response())).await;
            return;
        }
    };
    let (namespace, runner_key) = (namespace.to_string(), runner_key.to_string());
    let accept = crate::ws::handshake::accept_key(key);
    let resp = Bytes::from(crate::ws::handshake::response_101(&accept, Some("rivet")));
    if writer::write_all_vectored(&stream, vec![resp])
        .await
        .is_err()
    {
        return;
    }
    let (slot, gen, cfg) = {
        let mut st = state.borrow_mut();
        let (slot, gen) = st.insert(ConnKind::Runner(RunnerConn {
            last_pong: Instant::now(),
            superseded: false,
            runner_idx: None,
        }));
        st.metrics().gauge_add(Gauge::RunnersConnected, 1);
        (slot, gen, st.shared.config.clone())
    };
    let conn = state.borrow().conn_ref(slot, gen);
    tokio_uring::spawn(writer::writer_task(
        state.clone(),
        stream.clone(),
        slot,
        gen,
    ));

    let mut reader = WsReader::new(WsReaderConfig {
        role: Role::Server,
        // Runners send each message as one frame, up to the protocol's message limit (the
        // echo of a 16 MiB client message is a little over 16 MiB).
        max_frame: protocol::MAX_MESSAGE_LEN,
        max_message: protocol::MAX_MESSAGE_LEN,
    });
    let init_deadline =
        tokio::time::Instant::now() + Duration::from_millis(cfg.timeouts.runner_init_ms);
    let mut initialised = false;
    let mut handshake_done = false;
    let mut chunk = RUNNER_CHUNKS.0;
    'outer: loop {
        loop {
            let ev = reader.next(&mut buf);
            let now = Instant::now();
            let msg = match ev {
                Ok(Some(WsEvent::Message { text: false, data })) => data,
                Ok(Some(WsEvent::Message { text: true, .. })) => {
                    close(&state, slot, gen, 1011, "ws.invalid_packet");
                    break 'outer;
                }
                Ok(Some(WsEvent::Ping(p))) => {
                    let mut st = state.borrow_mut();
                    let f = st.ws_frame(crate::ws::frame::OpCode::Pong, p);
                    st.write_local(slot, gen, f);
                    continue;
                }
                Ok(Some(WsEvent::Pong(_))) => continue,
                Ok(Some(WsEvent::Close { code, .. })) => {
                    if state
                        .borrow_mut()
                        .get(slot, gen)
                        .is_some_and(|c| c.out.closing)
                    {
                        // The answer to our close: the handshake is complete, and the server
                        // ends the TCP connection (RFC 6455 §7.1.1).
                        handshake_done = true;
                    } else {
                        close(&state, slot, gen, code.unwrap_or(1000), "ws.closed");
                    }
                    break 'outer;
                }
                Ok(None) => break,
                Err(e) => {
                    close(&state, slot, gen, e.code, e.reason);
                    break 'outer;
                }
            };
            if !initialised {
                match protocol::decode_to_server(&msg) {
                    Ok(ToServer::Init(init)) => {
                        initialised = true;
                        let st = state.borrow();
                        st.metrics().inc(Counter::RunnerConnections);
                        st.control(ControlMsg::RunnerInit {
                            conn,
                            peer,
                            namespace: namespace.clone(),
                            runner_key: runner_key.clone(),
                            init,
                        });
                        drop(st);
                        tokio_uring::spawn(ping_task(state.clone(), slot, gen));
                    }
                    _ => {
                        close(&state, slot, gen, 1011, "ws.invalid_initial_packet");
                        break 'outer;
                    }
                }
                continue;
            }
            let ok = on_message(&mut state.borrow_mut(), conn, msg, now);
            if !ok {
                state.borrow().metrics().inc(Counter::RunnerProtocolErrors);
                close(&state, slot, gen, 1011, "ws.invalid_packet");
                break 'outer;
            }
        }
        let want = reader.bytes_wanted(&buf).saturating_sub(buf.len());
        let read = read_some(&stream, &mut buf, want.max(1), chunk);
        let got = if initialised {
            read.await
        } else {
            match tokio::time::timeout_at(init_deadline, read).await {
                Ok(got) => got,
                Err(_) => {
                    close(&state, slot, gen, 1011, "ws.timed_out_waiting_for_init");
                    break 'outer;
                }
            }
        };
        let Some((n, offered)) = got else {
            break;
        };
        chunk = next_chunk(chunk, n, offered, RUNNER_CHUNKS);
        if state.borrow_mut().get(slot, gen).is_none() {
            break;
        }
    }
    // Drain until the peer goes away (the writer ends it after the close frame), unless
    // the close handshake is already complete.
    while !handshake_done && state.borrow_mut().get(slot, gen).is_some() {
        if !read_more(&stream, &mut buf, READ_CHUNK).await {
            break;
        }
        buf.clear();
    }
    {
        let st = state.borrow();
        st.metrics().gauge_add(Gauge::RunnersConnected, -1);
        if initialised {
            st.control(ControlMsg::RunnerClosed { conn });
        }
    }
    remove_conn(&state, slot, gen);
}

fn close(state: &Rc<RefCell<ShardState>>, slot: u32, gen: u32, code: u16, reason: &'static str) {
    state
        .borrow_mut()
        .close_conn(slot, gen, code, reason.into());
}

/// One runner message after Init, received on the runner connection `conn` of this shard:
/// tunnel traffic is routed to its request's shard, the rest goes to the control plane.
/// Returns false on a protocol error. Plain and synchronous (the read loop calls it per
/// message; the allocation test drives it directly).
pub fn on_message(
    st: &mut ShardState,
    conn: crate::engine::ConnRef,
    msg: Bytes,
    now: Instant,
) -> bool {
    let decoded = match decode_to_server_hot(&msg) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "runner sent an invalid message");
            return false;
        }
    };
    let superseded = matches!(
        st.get(conn.slot, conn.gen).map(|c| &c.kind),
        Some(ConnKind::Runner(RunnerConn {
            superseded: true,
            ..
        }))
    );
    let from = match st.get(conn.slot, conn.gen).map(|c| &c.kind) {
        Some(ConnKind::Runner(r)) => r.runner_idx,
        _ => None,
    };
    if superseded && !matches!(decoded, ToServerHot::Other(ToServer::Pong(_))) {
        // A late message from a replaced connection: ignored, counted.
        st.metrics().inc(Counter::UnroutableTunnelMessages);
        return true;
    }
    match decoded {
        ToServerHot::WsMessage {
            request_id,
            data,
            binary,
            ..
        } => st.route_tunnel(request_id, TunnelIn::Message { data, binary }, from, now),
        ToServerHot::WsAck {
            request_id,
            ack_index,
            ..
        } => st.route_tunnel(request_id, TunnelIn::Ack(ack_index), from, now),
        ToServerHot::Other(ToServer::TunnelMessage(t)) => {
            let req = t.message_id.request_id;
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
            st.route_tunnel(req, m, from, now);
        }
        ToServerHot::Other(ToServer::Pong(p)) if p.ts < 0 => {
            // A fence pong: the control plane's proof of delivery, kept in arrival order.
            st.control(ControlMsg::RunnerMsg {
                conn,
                msg: ToServer::Pong(p),
            });
        }
        ToServerHot::Other(ToServer::Pong(_)) => {
            if let Some(c) = st.get(conn.slot, conn.gen) {
                if let ConnKind::Runner(r) = &mut c.kind {
                    r.last_pong = now;
                }
            }
        }
        ToServerHot::Other(ToServer::Init(_)) => return false,
        ToServerHot::Other(other) => st.control(ControlMsg::RunnerMsg { conn, msg: other }),
    }
    true
}

/// Sends `Ping { ts }` every interval (+0–128 ms jitter); closes the runner when no pong
/// came for the ping timeout.
async fn ping_task(state: Rc<RefCell<ShardState>>, slot: u32, gen: u32) {
    let (interval, timeout) = {
        let st = state.borrow();
        let t = &st.shared.config.timeouts;
        (
            Duration::from_millis(t.ping_interval_ms),
            Duration::from_millis(t.ping_timeout_ms),
        )
    };
    loop {
        let jitter = Duration::from_millis(rand::random::<u64>() % 129);
        tokio::time::sleep(interval + jitter).await;
        let mut st = state.borrow_mut();
        let Some(c) = st.get(slot, gen) else {
            return;
        };
        if c.out.closing {
            return;
        }
        let ConnKind::Runner(r) = &c.kind else {
            return;
        };
        if r.last_pong.elapsed() > timeout {
            st.close_conn(slot, gen, 1011, "ws.ping_timeout".into());
            return;
        }
        let frames = st.runner_frame(&ToClient::Ping(protocol::ToClientPing { ts: now_ms() }));
        st.write_local(slot, gen, frames);
    }
}
