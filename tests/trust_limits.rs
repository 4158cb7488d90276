//! What a runner or an API caller can make torpor hold, against the real daemon: each attack
//! used to grow memory without bound (figures in the comments); now it is refused or bounded,
//! checked on the daemon's RSS read from `/proc`, while a well-behaved client keeps working.

mod common;

use common::*;
use std::net::SocketAddr;
use torpor::protocol::{
    encode_to_server, ActorName, ActorNameMap, Command, KvPutRequest, KvRequestData,
    KvResponseData, ToClient, ToServer, ToServerInit, ToServerKvRequest,
};
use tungstenite::Message;

const MIB: u64 = 1024 * 1024;

fn runner_ws(addr: SocketAddr, key: &str, init: ToServerInit) -> Ws {
    raw_runner_ws(addr, key, init)
}

fn until<T>(ws: &mut Ws, pick: impl FnMut(ToClient) -> Option<T>) -> T {
    runner_until(ws, pick)
}

fn init(name: &str, names: ActorNameMap) -> ToServerInit {
    ToServerInit {
        name: name.into(),
        version: 1,
        total_slots: 10,
        prepopulate_actor_names: Some(names),
        metadata: None,
    }
}

fn echo_round(ws: &mut Ws, tag: &str) {
    let m = Message::text(format!("still here: {tag}"));
    ws.send(m.clone()).unwrap();
    assert_eq!(ws_recv(ws), m);
}

/// 400 runner Inits × 1,000 names × 1 KB of metadata used to add 450 MB that was never
/// freed. A runner's names now live as long as the runner: a reconnect with the same key
/// replaces them, so the daemon holds one set.
#[test]
fn announced_actor_names_are_freed_with_their_runner() {
    let daemon = Daemon::start(1, &[]);
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = daemon.create_actor("echo", None);
    let mut client = ws_connect(daemon.addr, &actor, "/bystander");
    let before = daemon.rss();
    let metadata = format!("{{\"pad\":\"{}\"}}", "m".repeat(1000));
    let mut prev: Option<Ws> = None;
    for round in 0..400 {
        let names = ActorNameMap(
            (0..1000)
                .map(|i| {
                    (
                        format!("r{round}-actor-{i}"),
                        ActorName {
                            metadata: metadata.clone(),
                        },
                    )
                })
                .collect(),
        );
        let mut ws = runner_ws(daemon.addr, "names", init("names", names));
        until(&mut ws, |m| matches!(m, ToClient::Init(_)).then_some(()));
        drop(prev.replace(ws));
        if round % 100 == 0 {
            echo_round(&mut client, "names");
        }
    }
    // Only the last runner's names are listed, one bounded page at a time.
    let (status, _, body) = http(
        daemon.addr,
        "GET",
        "/actors/names?namespace=default&limit=10",
        &[],
        b"",
    );
    assert_eq!(status, 200);
    let v = json_body(&body);
    let page = v["names"].as_object().unwrap();
    assert_eq!(page.len(), 10);
    assert!(page.keys().all(|k| k.starts_with("r399-")), "{v}");
    let grown = daemon.rss().saturating_sub(before);
    eprintln!("RSS grew by {} MiB after 400 Inits", grown / MIB);
    assert!(grown < 120 * MIB, "RSS grew by {} MiB", grown / MIB);
    echo_round(&mut client, "after");
}

/// 140 creates with a 4 MB input each used to add 640 MB of RSS: every input was held in
/// memory until its actor first ran. Now inputs wait in the store.
#[test]
fn actor_inputs_wait_in_the_store_not_in_memory() {
    use base64::Engine as _;
    let daemon = Daemon::start(1, &[]);
    let _runner = Runner::start(&daemon.endpoint(), &[]);
    let actor = daemon.create_actor("echo", None);
    let mut client = ws_connect(daemon.addr, &actor, "/bystander");
    let input = base64::engine::general_purpose::STANDARD.encode(vec![0x5au8; 4_000_000]);
    let before = daemon.rss();
    for i in 0..100 {
        // A runner name nobody serves: the actors wait for a runner.
        let body = serde_json::json!({
            "name": "with-input",
            "key": format!("k{i}"),
            "runner_name_selector": "nobody",
            "crash_policy": "sleep",
            "input": input,
        });
        let (status, _, resp) = post_actor(daemon.addr, &body);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
        if i % 25 == 0 {
            echo_round(&mut client, "inputs");
        }
    }
    let grown = daemon.rss().saturating_sub(before);
    eprintln!("RSS grew by {} MiB after 100 creates x 4 MB", grown / MIB);
    assert!(grown < 160 * MIB, "RSS grew by {} MiB", grown / MIB);
    // Larger than the limit is refused.
    let big = base64::engine::general_purpose::STANDARD.encode(vec![1u8; 4 * 1024 * 1024 + 1]);
    let body = serde_json::json!({"name": "x", "runner_name_selector": "nobody", "input": big});
    let (status, _, _) = post_actor(daemon.addr, &body);
    assert_eq!(status, 413);
    assert_eq!(
        daemon.metric("torpor_errors_total{code=\"actor.input_too_large\"}"),
        1.0
    );
}

/// 50,000 actors in 10 s used to be accepted from anyone; a namespace now has a quota, and a
/// runner name selector a length.
#[test]
fn actors_per_namespace_and_name_lengths_are_bounded() {
    let daemon = Daemon::start(1, &[("TORPOR_LIMITS__ACTORS_PER_NAMESPACE", "50")]);
    let create = |ns: &str, selector: &str| {
        let body = serde_json::json!({
            "name": "echo",
            "runner_name_selector": selector,
            "crash_policy": "sleep",
        })
        .to_string();
        http(
            daemon.addr,
            "POST",
            &format!("/actors?namespace={ns}"),
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
    };
    for _ in 0..50 {
        assert_eq!(create("default", "default").0, 200);
    }
    let (status, _, body) = create("default", "default");
    assert_eq!(status, 429);
    let v = json_body(&body);
    assert_eq!(v["code"], "quota_exceeded", "{v}");
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("limits.actors_per_namespace"));
    assert_eq!(
        daemon.metric("torpor_errors_total{code=\"actor.quota_exceeded\"}"),
        1.0
    );
    // Through the gateway's get-or-create too: refused, nothing created.
    let (status, _, _) = http(
        daemon.addr,
        "GET",
        "/gateway/echo/?rvt-namespace=default&rvt-method=getOrCreate&rvt-key=new",
        &[],
        b"",
    );
    assert!(
        status >= 400,
        "getOrCreate past the quota answered {status}"
    );
    // Another namespace has its own quota.
    assert_eq!(create("other", "default").0, 200);
    // A 4 MB runner_name_selector used to be accepted.
    let (status, _, _) = create("other", &"s".repeat(4 * 1024 * 1024));
    assert!(status == 400 || status == 413, "{status}");
    let (status, h, _) = create("other", &"s".repeat(257));
    assert_eq!(status, 400);
    assert!(h
        .iter()
        .any(|(k, v)| k == "x-rivet-error" && v == "api.bad_request"));
    assert!(daemon.metric("torpor_errors_total{code=\"api.bad_request\"}") >= 1.0);
}

/// One actor could write 300 MiB of KV in seconds. A put past `limits.kv_bytes_per_actor`
/// is refused whole, with an error naming the quota, and nothing of it is stored.
#[test]
fn kv_bytes_per_actor_are_bounded() {
    let daemon = Daemon::start(1, &[("TORPOR_LIMITS__KV_BYTES_PER_ACTOR", "1048576")]);
    let mut ws = runner_ws(
        daemon.addr,
        "kv",
        ToServerInit {
            name: "kv".into(),
            version: 1,
            total_slots: 1,
            prepopulate_actor_names: None,
            metadata: None,
        },
    );
    until(&mut ws, |m| matches!(m, ToClient::Init(_)).then_some(()));
    let body = serde_json::json!({"name": "kv", "runner_name_selector": "kv"});
    let (status, _, resp) = post_actor(daemon.addr, &body);
    assert_eq!(status, 200);
    let actor = created_actor_id(&resp);
    until(&mut ws, |m| match m {
        ToClient::Commands(c) => c
            .iter()
            .any(|c| matches!(c.inner, Command::StartActor(_)))
            .then_some(()),
        _ => None,
    });
    let mut put = |id: u32, key: &str, len: usize| -> KvResponseData {
        ws.send(Message::binary(encode_to_server(&ToServer::KvRequest(
            ToServerKvRequest {
                actor_id: actor.clone(),
                request_id: id,
                data: KvRequestData::Put(KvPutRequest {
                    keys: vec![key.as_bytes().to_vec()],
                    values: vec![vec![7u8; len]],
                }),
            },
        ))))
        .unwrap();
        until(&mut ws, |m| match m {
            ToClient::KvResponse(r) if r.request_id == id => Some(r.data),
            _ => None,
        })
    };
    // 7 × 120 KiB fit under 1 MiB; the 9th does not.
    for i in 0..8 {
        let r = put(i, &format!("k{i}"), 120 * 1024);
        assert!(matches!(r, KvResponseData::Put), "put {i}: {r:?}");
    }
    match put(100, "k-over", 120 * 1024) {
        KvResponseData::Error(e) => {
            assert!(e.message.contains("kv_bytes_per_actor"), "{}", e.message)
        }
        r => panic!("a put past the quota answered {r:?}"),
    }
    // Overwriting a key in place still works (its size does not grow).
    let r = put(101, "k0", 120 * 1024);
    assert!(matches!(r, KvResponseData::Put), "{r:?}");
}
