//! The node bus on a real `nats-server` (src/cluster/nats_server.rs starts one per test):
//! control messages exactly once and in order, across a server kill and restart and a
//! restarted peer; tunnel messages; a full window reported as an unreachable peer.
//!
//! Nothing waits for time to pass: every wait is for an event, bounded by a generous deadline
//! that only turns a hang into a failure.

use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use torpor::cluster::bus::{Bus, BusConfig, BusEvent, Kind, NodeId};
use torpor::cluster::link::LinkConfig;
use torpor::cluster::nats_server::NatsServer;

const DEADLINE: Duration = Duration::from_secs(120);
const A: NodeId = [0, 0, 0, 0xa];
const B: NodeId = [0, 0, 0, 0xb];

fn cfg() -> BusConfig {
    BusConfig {
        link: LinkConfig {
            resend_after: Duration::from_millis(50),
            resend_batch: 1_024,
            ..LinkConfig::default()
        },
        ..BusConfig::default()
    }
}

fn msg(i: u32) -> Bytes {
    Bytes::copy_from_slice(&i.to_le_bytes())
}

/// Receives events until `f` says stop (returns true), failing at the deadline.
fn until(rx: &Receiver<BusEvent>, what: &str, mut f: impl FnMut(BusEvent) -> bool) {
    let end = Instant::now() + DEADLINE;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) => {
                if f(e) {
                    return;
                }
            }
            Err(e) => panic!("waiting for {what}: {e:?}"),
        }
    }
}

/// Collects B's control messages from `from` (checking order and uniqueness) until `n` came.
struct Expect {
    next: u32,
}

impl Expect {
    fn take(&mut self, e: &BusEvent, from: NodeId) {
        if let BusEvent::Message {
            from: f,
            kind: Kind::Ctl,
            data,
        } = e
        {
            assert_eq!(*f, from);
            let i = u32::from_le_bytes(data[..].try_into().unwrap());
            assert_eq!(i, self.next, "control messages exactly once and in order");
            self.next += 1;
        }
    }
}

#[test]
fn control_messages_exactly_once_in_order_and_tunnel_messages() {
    let server = NatsServer::start().unwrap();
    let (a, a_rx) = Bus::start(&server.url(), A, cfg()).unwrap();
    let (b, b_rx) = Bus::start(&server.url(), B, cfg()).unwrap();
    for i in 0..10_000 {
        a.send(B, Kind::Ctl, msg(i)).unwrap();
    }
    let mut exp = Expect { next: 0 };
    until(&b_rx, "10,000 control messages", |e| {
        exp.take(&e, A);
        exp.next == 10_000
    });
    // Tunnel traffic both ways (at most once; nothing is lost on a quiet local server).
    for i in 0..100 {
        a.send(B, Kind::Tun, msg(i)).unwrap();
        b.send(A, Kind::Tun, msg(i)).unwrap();
    }
    for (rx, from) in [(&b_rx, A), (&a_rx, B)] {
        let mut got = Vec::new();
        until(rx, "100 tunnel messages", |e| {
            match e {
                BusEvent::Message {
                    from: f,
                    kind: Kind::Tun,
                    data,
                } => {
                    assert_eq!(f, from);
                    got.push(u32::from_le_bytes(data[..].try_into().unwrap()));
                }
                other => panic!("unexpected {other:?}"),
            }
            got.len() == 100
        });
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }
    assert_eq!(
        a.stats()
            .ctl_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // A node's control link to itself works the same way.
    for i in 0..100 {
        a.send(A, Kind::Ctl, msg(i)).unwrap();
    }
    let mut exp = Expect { next: 0 };
    until(&a_rx, "100 control messages to itself", |e| {
        exp.take(&e, A);
        exp.next == 100
    });
}

#[test]
fn control_messages_survive_a_server_kill_and_restart() {
    let server = NatsServer::start().unwrap();
    let (a, a_rx) = Bus::start(&server.url(), A, cfg()).unwrap();
    let (_b, b_rx) = Bus::start(&server.url(), B, cfg()).unwrap();
    for i in 0..5_000 {
        a.send(B, Kind::Ctl, msg(i)).unwrap();
    }
    let mut exp = Expect { next: 0 };
    until(&b_rx, "the first 1,000 messages", |e| {
        exp.take(&e, A);
        exp.next >= 1_000
    });
    server.kill();
    // The rest is sent while the server is down.
    for i in 5_000..10_000 {
        a.send(B, Kind::Ctl, msg(i)).unwrap();
    }
    let mut b_down = false;
    until(&b_rx, "B's disconnect", |e| {
        exp.take(&e, A);
        b_down |= e == BusEvent::Disconnected;
        b_down
    });
    until(&a_rx, "A's disconnect", |e| e == BusEvent::Disconnected);
    server.restart().unwrap();
    until(&a_rx, "A's reconnect", |e| e == BusEvent::Reconnected);
    let mut b_up = false;
    until(&b_rx, "B's reconnect and every message", |e| {
        exp.take(&e, A);
        b_up |= e == BusEvent::Reconnected;
        b_up && exp.next == 10_000
    });
    let s = a.stats();
    eprintln!(
        "A: frames resent {}, frames dropped (queue full) {}",
        s.frames_resent.load(std::sync::atomic::Ordering::Relaxed),
        s.frames_dropped_out
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[test]
fn a_restarted_peer_is_reported_and_gets_what_follows() {
    let server = NatsServer::start().unwrap();
    let (a, a_rx) = Bus::start(&server.url(), A, cfg()).unwrap();
    let (b, b_rx) = Bus::start(&server.url(), B, cfg()).unwrap();
    for i in 0..100 {
        a.send(B, Kind::Ctl, msg(i)).unwrap();
    }
    let mut exp = Expect { next: 0 };
    until(&b_rx, "100 messages", |e| {
        exp.take(&e, A);
        exp.next == 100
    });
    // A hears from this B (its instance) through a message of B's own.
    b.send(A, Kind::Ctl, Bytes::from_static(b"from the old B"))
        .unwrap();
    until(&a_rx, "B's message", |e| match e {
        BusEvent::Message { from, data, .. } => {
            assert_eq!((from, &data[..]), (B, &b"from the old B"[..]));
            true
        }
        other => panic!("unexpected {other:?}"),
    });
    b.shutdown();
    drop(b_rx);
    let (_b2, b2_rx) = Bus::start(&server.url(), B, cfg()).unwrap();
    // The new B announced itself; and should A have missed that, a probe over A's old link
    // gets an answer carrying the new instance.
    a.send(B, Kind::Ctl, Bytes::from_static(b"probe")).unwrap();
    until(&a_rx, "PeerRestarted", |e| match e {
        BusEvent::PeerRestarted(n) => {
            assert_eq!(n, B);
            true
        }
        other => panic!("unexpected {other:?}"),
    });
    for i in 0..1_000 {
        a.send(B, Kind::Ctl, msg(i)).unwrap();
    }
    // The probe arrives first if it was sent after the restart was known, else never.
    let mut exp = Expect { next: 0 };
    let mut probes = 0;
    until(&b2_rx, "1,000 messages at the new B", |e| {
        match &e {
            BusEvent::Message { data, .. } if &data[..] == b"probe" => {
                assert_eq!((probes, exp.next), (0, 0), "the probe once, first");
                probes += 1;
            }
            BusEvent::Message { .. } => exp.take(&e, A),
            other => panic!("unexpected {other:?}"),
        }
        exp.next == 1_000
    });
    // Nothing more came for A: no second PeerRestarted.
    assert!(a_rx.try_recv().is_err());
}

#[test]
fn a_peer_that_never_acknowledges_is_unreachable() {
    let server = NatsServer::start().unwrap();
    let mut c = cfg();
    c.link.max_unacked = 64;
    let (a, a_rx) = Bus::start(&server.url(), A, c).unwrap();
    for i in 0..65 {
        a.send(B, Kind::Ctl, msg(i)).unwrap();
    }
    until(&a_rx, "PeerUnreachable", |e| match e {
        BusEvent::PeerUnreachable(n) => {
            assert_eq!(n, B);
            true
        }
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(
        a.stats()
            .ctl_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn a_full_caller_channel_drops_tunnel_messages_and_keeps_control_messages() {
    let server = NatsServer::start().unwrap();
    let (a, _a_rx) = Bus::start(&server.url(), A, cfg()).unwrap();
    let mut small = cfg();
    small.in_queue = 16;
    let (b, b_rx) = Bus::start(&server.url(), B, small).unwrap();
    for i in 0..2_000 {
        a.send(B, Kind::Tun, msg(i)).unwrap();
        a.send(B, Kind::Ctl, msg(i)).unwrap();
    }
    let mut exp = Expect { next: 0 };
    let mut tun = Vec::new();
    until(&b_rx, "every control message", |e| {
        match &e {
            BusEvent::Message {
                kind: Kind::Tun,
                data,
                ..
            } => tun.push(u32::from_le_bytes(data[..].try_into().unwrap())),
            BusEvent::Message { .. } => exp.take(&e, A),
            other => panic!("unexpected {other:?}"),
        }
        exp.next == 2_000
    });
    // Every tunnel message published before the last control message was either handed over
    // (in order) or dropped and counted.
    let dropped = b
        .stats()
        .tun_dropped_in
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(tun.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(tun.len() as u64 + dropped, 2_000);
    eprintln!(
        "tunnel messages handed over {}, dropped {dropped}",
        tun.len()
    );
}

/// A server that wants credentials: buses with the right user and password in the URL (one
/// of two addresses, the other one down) exchange control messages; a wrong password or none
/// is refused at start, by name; a token works the same way.
#[test]
fn credentials_in_the_url() {
    let server = NatsServer::start_with(&["--user", "torpor", "--pass", "p@ss:w"]).unwrap();
    let port = server.port();
    // Port 1 on loopback refuses connections: the client moves on to the next address.
    let good = format!("nats://torpor:p%40ss%3Aw@127.0.0.1:1,nats://127.0.0.1:{port}");
    let (a, _a_rx) = Bus::start(&good, A, cfg()).unwrap();
    let (_b, b_rx) = Bus::start(&good, B, cfg()).unwrap();
    for i in 0..100 {
        a.send(B, Kind::Ctl, msg(i)).unwrap();
    }
    let mut exp = Expect { next: 0 };
    until(&b_rx, "100 control messages", |e| {
        exp.take(&e, A);
        exp.next == 100
    });
    const C: NodeId = [0, 0, 0, 0xc];
    for bad in [
        format!("nats://torpor:wrong@127.0.0.1:{port}"),
        server.url(),
    ] {
        let err = match Bus::start(&bad, C, cfg()) {
            Ok(_) => panic!("{bad}: a bus without the right credentials started"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.to_lowercase().contains("authoriz") && !err.contains("wrong"),
            "{bad}: {err}"
        );
    }
    let server = NatsServer::start_with(&["--auth", "t0ken"]).unwrap();
    let (a, _a_rx) = Bus::start(
        &format!("nats://t0ken@127.0.0.1:{}", server.port()),
        A,
        cfg(),
    )
    .unwrap();
    let (_b, b_rx) = Bus::start(
        &format!("nats://t0ken@127.0.0.1:{}", server.port()),
        B,
        cfg(),
    )
    .unwrap();
    a.send(B, Kind::Ctl, msg(0)).unwrap();
    let mut exp = Expect { next: 0 };
    until(&b_rx, "a control message", |e| {
        exp.take(&e, A);
        exp.next == 1
    });
    assert!(Bus::start(&server.url(), C, cfg()).is_err());
}

/// A certificate authority and a server certificate for 127.0.0.1 signed by it, as PEM files
/// in a fresh directory: (CA file, server certificate file, server key file).
fn tls_files(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let files = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&files.0, ca_cert.pem()).unwrap();
    std::fs::write(&files.1, cert.pem()).unwrap();
    std::fs::write(&files.2, key.serialize_pem()).unwrap();
    files
}

/// A server that requires TLS: buses that trust its certificate authority
/// (`BusConfig::tls_ca_file`) exchange control messages over TLS; a bus that trusts only the
/// system's roots is refused.
#[test]
fn tls_with_a_private_certificate_authority() {
    let dir = std::env::temp_dir().join(format!("torpor-nats-tls-{}", std::process::id()));
    let (ca, cert, key) = tls_files(&dir);
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let server = NatsServer::start_with(&["--tls", "--tlscert", cert, "--tlskey", key]).unwrap();
    let tls = BusConfig {
        tls_ca_file: Some(ca),
        ..cfg()
    };
    let (a, _a_rx) = Bus::start(&server.url(), A, tls.clone()).unwrap();
    let (_b, b_rx) = Bus::start(&server.url(), B, tls).unwrap();
    for i in 0..100 {
        a.send(B, Kind::Ctl, msg(i)).unwrap();
    }
    let mut exp = Expect { next: 0 };
    until(&b_rx, "100 control messages over TLS", |e| {
        exp.take(&e, A);
        exp.next == 100
    });
    const C: NodeId = [0, 0, 0, 0xc];
    let tls_url = server.url().replace("nats://", "tls://");
    assert!(
        Bus::start(&tls_url, C, cfg()).is_err(),
        "a certificate of an unknown authority is refused"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
