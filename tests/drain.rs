//! The graceful stop (SIGTERM), against the real daemon: readiness turns 503 at once, an HTTP
//! request in flight still gets its actor's answer, every client WebSocket and runner gets a
//! 1001 close frame and the close handshake completes (no reset), and the daemon exits 0.
//! Twenty times in a row.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use torpor::protocol::{
    encode_to_server, ActorCheckpoint, ActorState, Command, Event, EventActorStateUpdate,
    EventWrapper, MessageId, StrMap, ToClient, ToClientTunnelMessageKind, ToServer,
    ToServerResponseStart, ToServerTunnelMessage, ToServerTunnelMessageKind,
};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

/// A runner written out by hand: it hosts one actor and answers its HTTP request only when
/// the test says so.
struct SlowRunner {
    ws: Ws,
}

impl SlowRunner {
    fn connect(addr: SocketAddr) -> SlowRunner {
        let mut ws = raw_runner_ws(addr, "slow", runner_init("slow", 10));
        runner_until(&mut ws, |m| matches!(m, ToClient::Init(_)).then_some(()));
        SlowRunner { ws }
    }

    fn until<T>(&mut self, pick: impl FnMut(ToClient) -> Option<T>) -> T {
        runner_until(&mut self.ws, pick)
    }

    /// Waits for the start of `actor` and reports it running.
    fn run_actor(&mut self, actor: &str) {
        let generation = self.until(|m| match m {
            ToClient::Commands(cmds) => cmds.into_iter().find_map(|c| match c.inner {
                Command::StartActor(_) if c.checkpoint.actor_id == actor => {
                    Some(c.checkpoint.generation)
                }
                _ => None,
            }),
            _ => None,
        });
        let running = ToServer::Events(vec![EventWrapper {
            checkpoint: ActorCheckpoint {
                actor_id: actor.to_string(),
                generation,
                index: 0,
            },
            inner: Event::ActorStateUpdate(EventActorStateUpdate {
                state: ActorState::Running,
            }),
        }]);
        self.ws
            .send(Message::binary(encode_to_server(&running)))
            .unwrap();
    }

    /// Waits for an HTTP request and returns its (gateway id, request id).
    fn next_request(&mut self) -> ([u8; 4], [u8; 4]) {
        self.until(|m| match m {
            ToClient::TunnelMessage(t) => match t.message_kind {
                ToClientTunnelMessageKind::RequestStart(_) => {
                    Some((t.message_id.gateway_id, t.message_id.request_id))
                }
                _ => None,
            },
            _ => None,
        })
    }

    fn answer(&mut self, (gateway_id, request_id): ([u8; 4], [u8; 4]), body: &[u8]) {
        let msg = ToServer::TunnelMessage(ToServerTunnelMessage {
            message_id: MessageId {
                gateway_id,
                request_id,
                message_index: 0,
            },
            message_kind: ToServerTunnelMessageKind::ResponseStart(ToServerResponseStart {
                status: 200,
                headers: StrMap(vec![("content-type".into(), "text/plain".into())]),
                body: Some(body.to_vec()),
                stream: false,
            }),
        });
        self.ws
            .send(Message::binary(encode_to_server(&msg)))
            .unwrap();
    }

    /// Reads until the gateway's close frame and answers it; returns its code and whether
    /// the handshake ended cleanly.
    fn expect_close(&mut self) -> (u16, bool) {
        client_close(&mut self.ws)
    }
}

/// A client WebSocket's close from the gateway: the code, and whether the handshake ended
/// cleanly (tungstenite answered the close and then saw the connection end, not a reset).
fn client_close(ws: &mut Ws) -> (u16, bool) {
    let code = loop {
        match ws.read() {
            Ok(Message::Close(f)) => break f.map(|f| u16::from(f.code)).unwrap_or(0),
            Ok(_) => continue,
            Err(e) => panic!("client: no close frame ({e})"),
        }
    };
    // tungstenite queued its close reply; flushing it and reading on ends the handshake.
    let clean = loop {
        match ws.read() {
            Err(tungstenite::Error::ConnectionClosed) => break true,
            Err(tungstenite::Error::Io(e)) => {
                eprintln!("client close ended with {e}");
                break false;
            }
            Err(e) => {
                eprintln!("client close ended with {e}");
                break false;
            }
            Ok(_) => continue,
        }
    };
    (code, clean)
}

/// Reads one response from a keep-alive connection: (status, whether it says
/// `connection: close`).
fn read_keep_alive_response(s: &mut TcpStream) -> (u16, bool) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if let Err(e) = s.read_exact(&mut byte) {
            panic!(
                "readiness probe: {e} after {:?}",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (status, head.contains("connection: close"))
}

fn one_round(round: usize) {
    let mut daemon = Daemon::start(2, &[]);
    let _echo = Runner::start(&daemon.endpoint(), &[]);
    let mut slow = SlowRunner::connect(daemon.addr);
    let body = serde_json::json!({"name": "slow", "runner_name_selector": "slow"});
    let (status, _, resp) = post_actor(daemon.addr, &body);
    assert_eq!(status, 200);
    let slow_actor = created_actor_id(&resp);
    slow.run_actor(&slow_actor);
    let echo_actor = daemon.create_actor("echo", None);
    let mut clients: Vec<Ws> = (0..20)
        .map(|i| {
            let mut ws = ws_connect(daemon.addr, &echo_actor, &format!("/c{i}"));
            let m = Message::text(format!("hello {i}"));
            ws.send(m.clone()).unwrap();
            assert_eq!(ws_recv(&mut ws), m);
            ws
        })
        .collect();
    // Keep-alive connections opened before the signal, to ask for readiness afterwards. Each
    // is answered once, so it is accepted (a connection still in the listener's backlog when
    // the listener shuts is dropped with it).
    let mut probes: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut p = TcpStream::connect(daemon.addr).unwrap();
            p.set_read_timeout(Some(WAIT)).unwrap();
            p.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            assert_eq!(read_keep_alive_response(&mut p), (200, false));
            p
        })
        .collect();
    // The HTTP request in flight: sent, received by the runner, not answered yet.
    let addr = daemon.addr;
    let path = format!("/gateway/{slow_actor}/slow");
    let request = std::thread::spawn(move || http(addr, "GET", &path, &[], b""));
    let req = slow.next_request();

    daemon.proc.signal(libc::SIGTERM);
    // Readiness turns 503 as soon as the signal is handled (asked on a connection opened
    // before, as new connections are no longer accepted); that answer ends the connection.
    // A request read just before the drain began is answered 200 with `connection: close`:
    // the drain has begun then, and the second probe sees 503.
    let deadline = std::time::Instant::now() + WAIT;
    let mut probe = probes.remove(0);
    loop {
        probe
            .write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let (status, closes) = read_keep_alive_response(&mut probe);
        if status == 503 {
            assert!(
                closes,
                "round {round}: a draining answer keeps the connection"
            );
            break;
        }
        assert_eq!(status, 200);
        if closes {
            probe = probes.pop().expect("a second probe");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "round {round}: never 503"
        );
    }
    // The actor answers after the signal; the client gets it.
    slow.answer(req, b"finished after SIGTERM");
    let (status, _, body) = request.join().unwrap();
    assert_eq!(status, 200, "round {round}");
    assert_eq!(body, b"finished after SIGTERM");
    // Every client and the runner get 1001; the close handshakes complete.
    for (i, ws) in clients.iter_mut().enumerate() {
        let (code, clean) = client_close(ws);
        assert_eq!(code, 1001, "round {round}, client {i}");
        assert!(
            clean,
            "round {round}, client {i}: the close handshake did not complete"
        );
    }
    assert_eq!(slow.expect_close(), (u16::from(CloseCode::Away), true));

    let status = daemon.proc.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "round {round}: exit {status:?}");
}

#[test]
fn sigterm_drains_twenty_times() {
    for round in 0..20 {
        one_round(round);
    }
}

/// A second signal during the drain stops the daemon at once.
#[test]
fn a_second_signal_stops_at_once() {
    let daemon = Daemon::start(1, &[("TORPOR_TIMEOUTS__DRAIN_MS", "60000")]);
    let mut slow = SlowRunner::connect(daemon.addr);
    let body = serde_json::json!({"name": "slow", "runner_name_selector": "slow"});
    let (_, _, resp) = post_actor(daemon.addr, &body);
    let actor = created_actor_id(&resp);
    slow.run_actor(&actor);
    let addr = daemon.addr;
    let path = format!("/gateway/{actor}/never");
    let _request = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    slow.next_request();
    // The drain waits for that request (up to a minute); the second signal does not.
    // Two different signals, so neither merges into the other while pending.
    daemon.proc.signal(libc::SIGTERM);
    daemon.proc.signal(libc::SIGINT);
    let mut d = daemon;
    let status = d.proc.child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
}
