//! The control plane's limits through the real daemon: a runner `Init` above a limit is
//! refused (1011 `runner.init_too_large`) and counted, `totalSlots` is clamped and counted, a
//! takeover by the same runner key is counted, and an actor's input, kept only in the store
//! while it waits for a runner, reaches its start command.

mod common;

use common::{http, json_body, Daemon, Ws};
use std::net::SocketAddr;
use torpor::protocol::{ActorName, ActorNameMap, Command, ToClient, ToServerInit};
use tungstenite::Message;

fn runner(addr: SocketAddr, key: &str, init: ToServerInit) -> Ws {
    common::raw_runner_ws(addr, key, init)
}

fn init(names: usize, slots: u32) -> ToServerInit {
    ToServerInit {
        name: "raw".into(),
        version: 1,
        total_slots: slots,
        prepopulate_actor_names: Some(ActorNameMap(
            (0..names)
                .map(|i| {
                    (
                        format!("a{i}"),
                        ActorName {
                            metadata: "{}".into(),
                        },
                    )
                })
                .collect(),
        )),
        metadata: None,
    }
}

/// Reads until the gateway closes; returns its code and reason.
fn closed(ws: &mut Ws) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return (f.code.into(), f.reason.to_string()),
            Ok(Message::Close(None)) => return (0, String::new()),
            Ok(_) => continue,
            Err(e) => panic!("runner read: {e}"),
        }
    }
}

fn until<T>(ws: &mut Ws, pick: impl FnMut(ToClient) -> Option<T>) -> T {
    common::runner_until(ws, pick)
}

#[test]
fn runner_limits_and_inputs_through_the_daemon() {
    let d = Daemon::start(
        1,
        &[
            ("TORPOR_LIMITS__RUNNER_ACTOR_NAMES", "2"),
            ("TORPOR_LIMITS__RUNNER_MAX_SLOTS", "3"),
        ],
    );
    // Too many names: refused, counted, no runner.
    let mut ws = runner(d.addr, "big", init(3, 1));
    assert_eq!(closed(&mut ws), (1011, "runner.init_too_large".to_string()));
    d.wait_metric("torpor_runners_refused_total", |v| v == 1.0);

    // An actor with input created while no runner of its name is there.
    let input = vec![0xa5u8; 300 * 1024];
    let body = serde_json::json!({
        "name": "a0",
        "runner_name_selector": "raw",
        "input": base64_encode(&input),
    })
    .to_string();
    let (st, _, b) = http(
        d.addr,
        "POST",
        "/actors?namespace=default",
        &[("content-type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(st, 200, "{}", String::from_utf8_lossy(&b));
    let actor_id = json_body(&b)["actor"]["actor_id"]
        .as_str()
        .unwrap()
        .to_string();

    // A runner asking for 10 slots gets 3 (counted), and the start carries the stored input.
    let mut a = runner(d.addr, "k", init(2, 10));
    let got = until(&mut a, |m| match m {
        ToClient::Commands(cmds) => cmds.into_iter().find_map(|c| match c.inner {
            Command::StartActor(s) if c.checkpoint.actor_id == actor_id => s.config.input,
            _ => None,
        }),
        _ => None,
    });
    assert!(got == input, "the input read back from the store");
    d.wait_metric("torpor_runner_slots_clamped_total", |v| v == 1.0);
    let (_, _, b) = http(
        d.addr,
        "GET",
        "/actors/names?namespace=default&limit=1",
        &[],
        b"",
    );
    let v = json_body(&b);
    assert_eq!(v["pagination"]["cursor"], "a0", "{v}");

    // The same runner key again: the first connection is evicted, and it is counted.
    let _b = runner(d.addr, "k", init(0, 1));
    assert_eq!(closed(&mut a), (1000, "ws.eviction".to_string()));
    d.wait_metric("torpor_runner_evictions_total", |v| v == 1.0);
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
