//! The serverless outbound client against small HTTP servers on 127.0.0.1 written here (real
//! sockets, no mock of the client). Ports are the kernel's (port 0); nothing waits on a
//! sleep: the tests wait for events (with a generous guard against hanging) and assert
//! outcomes, never durations.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use torpor::serverless::init::{encode_init, InitError};
use torpor::serverless::{
    start_headers, Command, EndReason, Event, Failure, Headers, Hooks, Outbound, ServerlessInit,
    ServerlessSettings, StartHeaders, StaticResolver, TimeoutPhase, ERROR_BODY_BYTES,
};

/// A guard against a hung test, not a synchronisation.
const GUARD: Duration = Duration::from_secs(30);
const HOUR: Duration = Duration::from_secs(3600);
const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n";

// ---------------------------------------------------------------------------------------------
// Test servers
// ---------------------------------------------------------------------------------------------

/// What the server does after reading a request.
#[derive(Clone)]
enum Then {
    /// Close the connection.
    Close,
    /// Wait for the peer to close.
    Hold,
    /// Send a ping event every few milliseconds until the peer closes.
    Ping,
}

/// What the server saw.
#[derive(Debug)]
enum Seen {
    Request {
        path: String,
        headers: Vec<(String, String)>,
    },
    /// The client closed the connection.
    PeerClosed,
}

struct Server {
    addr: SocketAddr,
    seen: mpsc::Receiver<Seen>,
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    fn request(&self) -> (String, Vec<(String, String)>) {
        match self
            .seen
            .recv_timeout(GUARD)
            .expect("server saw no request")
        {
            Seen::Request { path, headers } => (path, headers),
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn peer_closed(&self) {
        loop {
            match self
                .seen
                .recv_timeout(GUARD)
                .expect("the client never closed")
            {
                Seen::PeerClosed => return,
                Seen::Request { .. } => {}
            }
        }
    }
}

/// Answers every connection with `head` + `body`, then does `then`.
fn server(head: &str, body: impl Into<Vec<u8>>, then: Then) -> Server {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, seen) = mpsc::channel();
    let answer = [head.as_bytes(), &body.into()].concat();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(socket, answer.clone(), then.clone(), tx.clone()));
            }
        });
    });
    Server { addr, seen }
}

async fn serve(
    mut socket: tokio::net::TcpStream,
    answer: Vec<u8>,
    then: Then,
    tx: mpsc::Sender<Seen>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        let Ok(n) = socket.read(&mut chunk).await else {
            return;
        };
        if n == 0 || buf.len() > 64 * 1024 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&buf[..head_len]).unwrap();
    let _ = tx.send(Seen::Request {
        path: req.path.unwrap_or_default().to_owned(),
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
    });
    if socket.write_all(&answer).await.is_err() {
        return;
    }
    match then {
        Then::Close => {}
        Then::Hold => {
            while matches!(socket.read(&mut chunk).await, Ok(n) if n > 0) {}
            let _ = tx.send(Seen::PeerClosed);
        }
        Then::Ping => loop {
            tokio::select! {
                read = socket.read(&mut chunk) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        let _ = tx.send(Seen::PeerClosed);
                        return;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    if socket.write_all(b"event: ping\ndata: \n\n").await.is_err() {
                        let _ = tx.send(Seen::PeerClosed);
                        return;
                    }
                }
            }
        },
    }
}

fn init_event(runner_id: &str) -> String {
    let data = encode_init(&ServerlessInit {
        runner_id: runner_id.to_owned(),
        runner_protocol_version: 7,
    });
    format!("data: {data}\n\n")
}

// ---------------------------------------------------------------------------------------------
// The client side
// ---------------------------------------------------------------------------------------------

struct Client {
    outbound: Outbound,
    events: crossbeam_channel::Receiver<Event>,
}

impl Client {
    fn new(settings: ServerlessSettings) -> Client {
        Client::with(settings, Hooks::default())
    }

    fn with(settings: ServerlessSettings, hooks: Hooks) -> Client {
        let (outbound, events) = Outbound::spawn(settings, hooks).unwrap();
        Client { outbound, events }
    }

    fn start(&self, id: u64, url: &str, lifespan: Duration) {
        let headers = start_headers(
            &Headers(vec![("x-app".into(), "1".into())]),
            &StartHeaders {
                endpoint: "http://torpor.test:6420",
                total_slots: 3,
                runner_name: "pool",
                namespace_name: "default",
                token: Some("admin-token"),
            },
        );
        assert!(self.outbound.send(Command::Start {
            id,
            url: url.to_owned(),
            headers,
            lifespan,
        }));
    }

    fn metadata(&self, id: u64, url: &str) {
        assert!(self.outbound.send(Command::Metadata {
            id,
            url: url.to_owned(),
            headers: Headers::default(),
        }));
    }

    fn next(&self) -> Event {
        self.events.recv_timeout(GUARD).expect("no event")
    }

    /// The next event that is not a ping.
    fn next_not_ping(&self) -> Event {
        loop {
            match self.next() {
                Event::Ping { .. } => {}
                other => return other,
            }
        }
    }

    fn failure(&self, id: u64) -> Failure {
        match self.next_not_ping() {
            Event::Failed { id: got, failure } if got == id => failure,
            other => panic!("expected a failure of {id}, got {other:?}"),
        }
    }

    fn started(&self, id: u64) -> String {
        match self.next_not_ping() {
            Event::Started {
                id: got,
                runner_id,
                protocol_version: 7,
            } if got == id => runner_id,
            other => panic!("expected {id} to start, got {other:?}"),
        }
    }
}

fn short(f: impl FnOnce(&mut ServerlessSettings)) -> ServerlessSettings {
    let mut s = ServerlessSettings::default();
    f(&mut s);
    s
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn stream_starts_pings_and_stops_on_request() {
    let srv = server(SSE_HEAD, init_event("runner-1"), Then::Ping);
    let woken = Arc::new(AtomicUsize::new(0));
    let count = woken.clone();
    let client = Client::with(
        ServerlessSettings::default(),
        Hooks {
            resolver: None,
            waker: Some(Arc::new(move || {
                count.fetch_add(1, Ordering::SeqCst);
            })),
        },
    );
    client.start(1, &srv.url(), HOUR);

    let (path, headers) = srv.request();
    assert_eq!(path, "/start");
    let header = |name: &str| {
        let values: Vec<&str> = headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(values.len(), 1, "{name}: {values:?}");
        values[0].to_owned()
    };
    assert_eq!(header("x-rivet-endpoint"), "http://torpor.test:6420");
    assert_eq!(header("x-rivet-total-slots"), "3");
    assert_eq!(header("x-rivet-runner-name"), "pool");
    assert_eq!(header("x-rivet-namespace-name"), "default");
    assert_eq!(header("x-rivet-namespace-id"), "default");
    assert_eq!(header("x-rivet-token"), "admin-token");
    assert_eq!(header("x-app"), "1");
    assert_eq!(header("accept"), "text/event-stream");

    assert_eq!(client.started(1), "runner-1");
    assert_eq!(client.next(), Event::Ping { id: 1 });
    client.outbound.send(Command::Stop { id: 1 });
    assert_eq!(
        client.next_not_ping(),
        Event::Ended {
            id: 1,
            reason: EndReason::Stopped
        }
    );
    srv.peer_closed();
    // Woken for Started and Ping at least (the wake for Ended may still be on its way).
    assert!(woken.load(Ordering::SeqCst) >= 2);
    client.outbound.shutdown();
}

#[test]
fn stream_is_closed_at_the_end_of_its_lifespan() {
    let srv = server(SSE_HEAD, init_event("runner-2"), Then::Ping);
    let client = Client::new(ServerlessSettings::default());
    client.start(2, &srv.url(), Duration::from_millis(300));
    match client.next_not_ping() {
        // A slow machine may reach the lifespan before the init event.
        Event::Started { id: 2, .. } => assert_eq!(
            client.next_not_ping(),
            Event::Ended {
                id: 2,
                reason: EndReason::Lifespan
            }
        ),
        Event::Ended {
            id: 2,
            reason: EndReason::Lifespan,
        } => {}
        other => panic!("{other:?}"),
    }
    srv.peer_closed();
}

#[test]
fn refused_answer_keeps_512_bytes_of_body() {
    let head = "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 2048\r\n\r\n";
    let srv = server(head, vec![b'x'; 2048], Then::Close);
    let client = Client::new(ServerlessSettings::default());
    client.start(3, &srv.url(), HOUR);
    match client.failure(3) {
        Failure::Status { status: 500, body } => {
            assert_eq!(body.len(), ERROR_BODY_BYTES);
            assert!(body.bytes().all(|b| b == b'x'));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn redirect_is_not_followed() {
    let head =
        "HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/\r\ncontent-length: 0\r\n\r\n";
    let srv = server(head, "", Then::Close);
    let client = Client::new(ServerlessSettings::default());
    client.start(4, &srv.url(), HOUR);
    assert_eq!(
        client.failure(4),
        Failure::Status {
            status: 302,
            body: String::new()
        }
    );
}

#[test]
fn wrong_content_type() {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\n";
    let srv = server(head, "hi", Then::Close);
    let client = Client::new(ServerlessSettings::default());
    client.start(5, &srv.url(), HOUR);
    assert_eq!(
        client.failure(5),
        Failure::ContentType(Some("text/plain".into()))
    );
}

#[test]
fn bad_payloads() {
    let client = Client::new(ServerlessSettings::default());

    let srv = server(SSE_HEAD, "data: not base64!\n\n", Then::Hold);
    client.start(6, &srv.url(), HOUR);
    assert_eq!(client.failure(6), Failure::Payload(InitError::Base64));
    srv.request();
    srv.peer_closed();

    // Version 6 in the prefix: [6, 0, tag 0, len 1, "r", 7, 0].
    let srv = server(SSE_HEAD, "data: BgAAAXIHAA==\n\n", Then::Hold);
    client.start(7, &srv.url(), HOUR);
    assert_eq!(client.failure(7), Failure::Payload(InitError::Version(6)));

    // A valid base64 of a bad BARE body: [7, 0, tag 1, len 1, "r", 7, 0].
    let srv = server(SSE_HEAD, "data: BwABAXIHAA==\n\n", Then::Hold);
    client.start(8, &srv.url(), HOUR);
    assert!(matches!(
        client.failure(8),
        Failure::Payload(InitError::Bare(_))
    ));

    // An event larger than the bound.
    let client = Client::new(short(|s| s.max_event_bytes = 64));
    let srv = server(
        SSE_HEAD,
        format!("data: {}\n\n", "A".repeat(100)),
        Then::Hold,
    );
    client.start(9, &srv.url(), HOUR);
    assert!(matches!(client.failure(9), Failure::Sse(_)));
}

#[test]
fn stream_that_ends_early() {
    let client = Client::new(ServerlessSettings::default());

    let srv = server(SSE_HEAD, init_event("runner-10"), Then::Close);
    client.start(10, &srv.url(), HOUR);
    assert_eq!(client.started(10), "runner-10");
    assert!(matches!(
        client.failure(10),
        Failure::StreamEnded { started: true, .. }
    ));

    // Before the init event, after an `error` event (hono sends one when the handler throws).
    let srv = server(SSE_HEAD, "event: error\ndata: boom\n\n", Then::Close);
    client.start(11, &srv.url(), HOUR);
    assert_eq!(
        client.failure(11),
        Failure::StreamEnded {
            started: false,
            error_event: Some("boom".into()),
            read_error: None
        }
    );
}

#[test]
fn silent_servers_time_out() {
    let client = Client::new(short(|s| s.init_timeout_ms = 200));

    let srv = server(SSE_HEAD, "", Then::Hold);
    client.start(12, &srv.url(), HOUR);
    assert_eq!(client.failure(12), Failure::Timeout(TimeoutPhase::Init));
    srv.request();
    srv.peer_closed();

    // Its own client, so that only the event deadline is short.
    let client = Client::new(short(|s| s.event_timeout_ms = 200));
    let srv = server(SSE_HEAD, init_event("runner-13"), Then::Hold);
    client.start(13, &srv.url(), HOUR);
    assert_eq!(client.started(13), "runner-13");
    assert_eq!(client.failure(13), Failure::Timeout(TimeoutPhase::Event));

    // A server that never answers the request.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = Client::new(short(|s| s.headers_timeout_ms = 200));
    client.start(
        14,
        &format!("http://{}", listener.local_addr().unwrap()),
        HOUR,
    );
    assert_eq!(client.failure(14), Failure::Timeout(TimeoutPhase::Headers));
}

#[test]
fn connection_refused() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = Client::new(ServerlessSettings::default());
    client.start(15, &format!("http://{addr}"), HOUR);
    assert!(matches!(client.failure(15), Failure::Connect(_)));

    // TLS to a server that speaks plain HTTP at once: the handshake fails on its answer
    // (the TLS stack is wired up).
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = plain.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut socket, _)) = plain.accept() {
            let _ = socket.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        }
    });
    client.start(16, &format!("https://127.0.0.1:{port}"), HOUR);
    let failure = client.failure(16);
    assert!(matches!(failure, Failure::Connect(_)), "{failure:?}");
}

#[test]
fn denied_addresses_are_not_connected_to() {
    let srv = server(SSE_HEAD, init_event("runner-16"), Then::Ping);
    let metadata: IpAddr = "169.254.169.254".parse().unwrap();
    let resolver = StaticResolver(HashMap::from([
        ("imds.test".to_owned(), vec![metadata]),
        (
            "mixed.test".to_owned(),
            vec![metadata, "127.0.0.1".parse().unwrap()],
        ),
    ]));
    let client = Client::with(
        ServerlessSettings::default(),
        Hooks {
            resolver: Some(Arc::new(resolver)),
            waker: None,
        },
    );

    // A name that resolves to the metadata address.
    client.start(16, "http://imds.test/", HOUR);
    assert_eq!(
        client.failure(16),
        Failure::AddressDenied {
            host: "imds.test".into(),
            addr: metadata
        }
    );
    // IP literals, including an IPv4-mapped IPv6 one.
    client.start(17, "http://169.254.169.254/latest", HOUR);
    assert!(matches!(client.failure(17), Failure::AddressDenied { addr, .. } if addr == metadata));
    client.metadata(18, "http://[::ffff:169.254.169.254]:80");
    assert!(matches!(
        client.next(),
        Event::Metadata {
            id: 18,
            result: Err(Failure::AddressDenied { .. })
        }
    ));
    // A name with a denied and an allowed address: only the allowed one is used.
    client.start(19, &format!("http://mixed.test:{}/", srv.addr.port()), HOUR);
    assert_eq!(client.started(19), "runner-16");
    client.outbound.send(Command::Stop { id: 19 });
    assert!(matches!(
        client.next_not_ping(),
        Event::Ended { id: 19, .. }
    ));
}

#[test]
fn concurrent_streams_are_bounded() {
    let srv = server(SSE_HEAD, init_event("runner-20"), Then::Ping);
    let client = Client::new(short(|s| s.max_streams = 1));
    client.start(20, &srv.url(), HOUR);
    assert_eq!(client.started(20), "runner-20");
    client.start(21, &srv.url(), HOUR);
    assert_eq!(client.failure(21), Failure::TooManyRequests { limit: 1 });
    client.start(20, &srv.url(), HOUR);
    assert_eq!(client.failure(20), Failure::DuplicateId);
    // The first stream still runs; once stopped, there is room again.
    assert_eq!(client.next(), Event::Ping { id: 20 });
    client.outbound.send(Command::Stop { id: 20 });
    assert!(matches!(
        client.next_not_ping(),
        Event::Ended { id: 20, .. }
    ));
    client.start(22, &srv.url(), HOUR);
    assert_eq!(client.started(22), "runner-20");
}

const METADATA: &str = r#"{"runtime":"rivetkit","version":"2.2.1","runner":{"kind":{"serverless":{}},"version":2},"actorNames":{"counter":{"metadata":{"icon":"calculator"}}},"clientEndpoint":"http://127.0.0.1:6420","clientNamespace":"default"}"#;

#[test]
fn metadata_is_parsed_and_bounded() {
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        METADATA.len()
    );
    let srv = server(&head, METADATA, Then::Close);
    let client = Client::new(short(|s| s.metadata_body_bytes = 1024));
    client.metadata(30, &srv.url());
    match client.next() {
        Event::Metadata {
            id: 30,
            result: Ok(m),
        } => {
            assert_eq!(m.version, "2.2.1");
            assert_eq!(m.runner_version, Some(2));
            assert_eq!(m.runner_kind.as_deref(), Some("serverless"));
            assert_eq!(m.actor_names.len(), 1);
            assert_eq!(m.actor_names[0].name, "counter");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(srv.request().0, "/metadata");

    // Too large, announced by its length.
    let big = vec![b' '; 4096];
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4096\r\n\r\n";
    let srv = server(head, big.clone(), Then::Close);
    client.metadata(31, &srv.url());
    assert_eq!(
        client.next(),
        Event::Metadata {
            id: 31,
            result: Err(Failure::BodyTooLarge { limit: 1024 })
        }
    );

    // Too large, found while reading a body without a length.
    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n";
    let srv = server(head, big, Then::Close);
    client.metadata(32, &srv.url());
    assert_eq!(
        client.next(),
        Event::Metadata {
            id: 32,
            result: Err(Failure::BodyTooLarge { limit: 1024 })
        }
    );

    // Not rivetkit.
    let body = r#"{"runtime":"other","version":"1"}"#;
    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
    let srv = server(&head, body, Then::Close);
    client.metadata(33, &srv.url());
    assert!(matches!(
        client.next(),
        Event::Metadata {
            id: 33,
            result: Err(Failure::Metadata(_))
        }
    ));
}
