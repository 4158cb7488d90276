//! Loopback test of the tokio shell against a tiny fake gateway (a tokio-tungstenite server
//! inside the test): connect URL and subprotocols, `Init`, ping/pong, an echoed WebSocket
//! message, a forced connection drop, and the reconnect with the same runner key.
//! Timeouts below only guard against hangs; nothing asserts on timing.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::*;
use crate::protocol::*;

const GUARD: Duration = Duration::from_secs(20);

struct Echo;

impl Actor for Echo {
    fn on_websocket_open(&mut self, _cx: &mut ActorCx<'_>, _open: &WsOpen<'_>) -> WsOpenReply {
        WsOpenReply::Accept {
            can_hibernate: true,
        }
    }
    fn on_websocket_message(
        &mut self,
        cx: &mut ActorCx<'_>,
        key: RequestKey,
        _index: u16,
        data: Bytes,
        binary: bool,
    ) {
        cx.send(key, data, binary);
    }
}

struct Accepted {
    ws: WebSocketStream<TcpStream>,
    uri: String,
    protocols: String,
}

#[allow(clippy::result_large_err)] // the callback signature is tungstenite's
async fn accept(listener: &TcpListener) -> Accepted {
    let (tcp, _) = listener.accept().await.unwrap();
    let mut uri = String::new();
    let mut protocols = String::new();
    let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, mut resp: Response| {
        uri = req.uri().to_string();
        protocols = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        resp.headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("rivet"));
        Ok(resp)
    })
    .await
    .unwrap();
    Accepted { ws, uri, protocols }
}

async fn recv(ws: &mut WebSocketStream<TcpStream>) -> ToServer {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => return decode_to_server(&b).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("runner socket ended: {other:?}"),
        }
    }
}

async fn send(ws: &mut WebSocketStream<TcpStream>, msg: ToClient) {
    ws.send(Message::Binary(encode_to_client(&msg).into()))
        .await
        .unwrap();
}

fn init(id: &str) -> ToClient {
    ToClient::Init(ToClientInit {
        runner_id: id.into(),
        metadata: ProtocolMetadata {
            runner_lost_threshold: 60_000,
            actor_stop_threshold: 30_000,
            serverless_drain_grace_period: None,
        },
    })
}

fn tunnel(index: u16, kind: ToClientTunnelMessageKind) -> ToClient {
    ToClient::TunnelMessage(ToClientTunnelMessage {
        message_id: MessageId {
            gateway_id: [9, 9, 9, 9],
            request_id: [0, 0, 0, 7],
            message_index: index,
        },
        message_kind: kind,
    })
}

/// Receives until a tunnel message arrives (skipping events and acks of commands).
async fn recv_tunnel(ws: &mut WebSocketStream<TcpStream>) -> ToServerTunnelMessage {
    loop {
        if let ToServer::TunnelMessage(t) = recv(ws).await {
            return t;
        }
    }
}

#[tokio::test]
async fn init_ping_echo_drop_and_reconnect_with_same_key() {
    tokio::time::timeout(GUARD, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cfg = RunnerConfig::new(format!("http://{addr}"), "loop");
        cfg.runner_key = "key-1".into();
        cfg.token = Some("sekret".into());
        cfg.reconnect_base = Duration::from_millis(20);
        cfg.seed = Some(1);
        let handle =
            Runner::start(cfg, |_: &ActorInfo| -> Box<dyn Actor> { Box::new(Echo) }).unwrap();

        let mut a = accept(&listener).await;
        assert_eq!(
            a.uri,
            "/runners/connect?protocol_version=7&namespace=default&runner_key=key-1"
        );
        assert_eq!(a.protocols, "rivet, rivet_token.sekret");
        let ToServer::Init(first) = recv(&mut a.ws).await else {
            panic!("first message must be Init")
        };
        assert_eq!(first.name, "loop");
        assert_eq!(first.total_slots, 100);
        send(&mut a.ws, init("runner-A")).await;
        assert_eq!(handle.wait_connected().await.unwrap(), "runner-A");

        send(&mut a.ws, ToClient::Ping(ToClientPing { ts: 77 })).await;
        assert_eq!(
            recv(&mut a.ws).await,
            ToServer::Pong(ToServerPong { ts: 77 })
        );

        // Start an actor, open a socket, echo one message.
        send(
            &mut a.ws,
            ToClient::Commands(vec![CommandWrapper {
                checkpoint: ActorCheckpoint {
                    actor_id: "act".into(),
                    generation: 0,
                    index: 0,
                },
                inner: Command::StartActor(CommandStartActor {
                    config: ActorConfig {
                        name: "echo".into(),
                        key: None,
                        create_ts: 0,
                        input: None,
                    },
                    hibernating_requests: vec![],
                }),
            }]),
        )
        .await;
        send(
            &mut a.ws,
            tunnel(
                0,
                ToClientTunnelMessageKind::WebSocketOpen(ToClientWebSocketOpen {
                    actor_id: "act".into(),
                    path: "/".into(),
                    headers: StrMap::new(),
                }),
            ),
        )
        .await;
        let open = recv_tunnel(&mut a.ws).await;
        assert_eq!(
            open.message_kind,
            ToServerTunnelMessageKind::WebSocketOpen(ToServerWebSocketOpen {
                can_hibernate: true
            })
        );
        send(
            &mut a.ws,
            tunnel(
                1,
                ToClientTunnelMessageKind::WebSocketMessage(ToClientWebSocketMessage {
                    data: b"ping".to_vec(),
                    binary: false,
                }),
            ),
        )
        .await;
        let echo = recv_tunnel(&mut a.ws).await;
        assert_eq!(echo.message_id.message_index, 1);
        assert_eq!(
            echo.message_kind,
            ToServerTunnelMessageKind::WebSocketMessage(ToServerWebSocketMessage {
                data: b"ping".to_vec(),
                binary: false
            })
        );
        let ack = recv_tunnel(&mut a.ws).await;
        assert_eq!(
            ack.message_kind,
            ToServerTunnelMessageKind::WebSocketMessageAck(ToServerWebSocketMessageAck {
                index: 1
            })
        );

        // Connection loss: the runner comes back with the same key and keeps its actor.
        handle.drop_connection();
        let mut b = accept(&listener).await;
        assert_eq!(a.uri, b.uri);
        assert!(matches!(recv(&mut b.ws).await, ToServer::Init(_)));
        send(&mut b.ws, init("runner-A")).await;
        assert_eq!(handle.wait_connections(2).await.unwrap(), "runner-A");
        // The gateway replays message 1 (already processed) and sends 2: only 2 is echoed.
        for (i, d) in [(1u16, &b"ping"[..]), (2, b"two")] {
            send(
                &mut b.ws,
                tunnel(
                    i,
                    ToClientTunnelMessageKind::WebSocketMessage(ToClientWebSocketMessage {
                        data: d.to_vec(),
                        binary: true,
                    }),
                ),
            )
            .await;
        }
        // The replayed duplicate may first bring its ack again (ack 1, or ack 2 coalesced).
        let echo = loop {
            let t = recv_tunnel(&mut b.ws).await;
            if !matches!(
                t.message_kind,
                ToServerTunnelMessageKind::WebSocketMessageAck(_)
            ) {
                break t;
            }
        };
        assert_eq!(
            echo.message_kind,
            ToServerTunnelMessageKind::WebSocketMessage(ToServerWebSocketMessage {
                data: b"two".to_vec(),
                binary: true
            })
        );
        let c = handle.counters();
        assert_eq!(c.duplicates_dropped, 1);
        assert_eq!(c.messages, 2);
        assert_eq!(c.connections, 2);

        // Graceful shutdown: Stopping, then (no actors stopped by us here) the stop command.
        let h2 = handle.clone();
        let shut = tokio::spawn(async move { h2.shutdown().await });
        loop {
            if recv(&mut b.ws).await == ToServer::Stopping {
                break;
            }
        }
        send(
            &mut b.ws,
            ToClient::Commands(vec![CommandWrapper {
                checkpoint: ActorCheckpoint {
                    actor_id: "act".into(),
                    generation: 0,
                    index: 1,
                },
                inner: Command::StopActor,
            }]),
        )
        .await;
        // The runner closes once its last actor stopped.
        loop {
            match b.ws.next().await {
                Some(Ok(Message::Close(f))) => {
                    assert_eq!(f.unwrap().reason.as_str(), "pegboard.runner_shutdown");
                    // Finish the close handshake.
                    while b.ws.next().await.is_some() {}
                    break;
                }
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
        shut.await.unwrap();
        assert!(handle.status().stopped);
    })
    .await
    .expect("loopback test hung");
}
