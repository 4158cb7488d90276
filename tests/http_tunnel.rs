//! Gateway requests (SPEC §2.1, §2.3) with the real daemon and the echo runner: the three
//! addressing forms, unique header keys, the body limit, errors with `x-rivet-error`, a
//! sleeping actor woken by a request, and WebSockets addressed by name and key.

mod common;

use common::{create_actor, http, Daemon, Runner};

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn path_header_and_named_forms_reach_the_actor() {
    let d = Daemon::start(1, &[]);
    let _r = Runner::start(&d.endpoint(), &[]);
    let actor = create_actor(d.addr, "echo", Some("k1"));

    // Path form, with a token and rvt-* parameters that the actor must not see.
    let body = b"hello \xe2\x82\xac tunnel";
    let (status, headers, resp) = http(
        d.addr,
        "POST",
        &format!("/gateway/{actor}@tok/some/path?a=1&rvt-x=2&b=3"),
        &[
            ("content-type", "text/plain"),
            ("x-dup", "1"),
            ("x-dup", "2"),
        ],
        body,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(resp, body);
    assert_eq!(header(&headers, "content-type"), Some("text/plain"));
    assert_eq!(header(&headers, "x-echo-method"), Some("POST"));
    assert_eq!(header(&headers, "x-echo-path"), Some("/some/path?a=1&b=3"));

    // Header form on any path.
    let (status, headers, resp) = http(
        d.addr,
        "PUT",
        "/elsewhere?q=1",
        &[("x-rivet-target", "actor"), ("x-rivet-actor", &actor)],
        b"via headers",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(resp, b"via headers");
    assert_eq!(header(&headers, "x-echo-path"), Some("/elsewhere?q=1"));

    // Name + key form, get.
    let (status, headers, resp) = http(
        d.addr,
        "GET",
        "/gateway/echo/named?rvt-namespace=default&rvt-method=get&rvt-key=k1",
        &[],
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(header(&headers, "x-echo-path"), Some("/named"));

    // Name + key form, getOrCreate of a new key creates the actor.
    let (status, _, resp) = http(
        d.addr,
        "POST",
        "/gateway/echo/made?rvt-method=getOrCreate&rvt-key=fresh",
        &[],
        b"created on demand",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(resp, b"created on demand");

    // get of a missing key → 404 actor.not_found.
    let (status, headers, _) = http(
        d.addr,
        "GET",
        "/gateway/echo/x?rvt-method=get&rvt-key=missing",
        &[],
        b"",
    );
    assert_eq!(status, 404);
    assert_eq!(header(&headers, "x-rivet-error"), Some("actor.not_found"));
    assert!(d.metric("torpor_http_tunnel_requests_total") >= 4.0);
}

#[test]
fn errors_carry_x_rivet_error() {
    let d = Daemon::start(1, &[("TORPOR_LIMITS__HTTP_BODY_BYTES", "1024")]);
    let _r = Runner::start(&d.endpoint(), &[]);
    let actor = create_actor(d.addr, "echo", None);

    let (status, headers, _) = http(d.addr, "GET", "/gateway/no-such-actor/", &[], b"");
    assert_eq!(status, 404);
    assert_eq!(header(&headers, "x-rivet-error"), Some("actor.not_found"));

    let big = vec![b'x'; 2048];
    let (status, headers, _) = http(d.addr, "POST", &format!("/gateway/{actor}/"), &[], &big);
    assert_eq!(status, 413);
    assert_eq!(
        header(&headers, "x-rivet-error"),
        Some("http.body_too_large")
    );

    // Exactly at the limit passes.
    let ok = vec![b'y'; 1024];
    let (status, _, resp) = http(d.addr, "POST", &format!("/gateway/{actor}/"), &[], &ok);
    assert_eq!(status, 200);
    assert_eq!(resp, ok);
}

#[test]
fn a_sleeping_actor_is_woken_by_an_http_request() {
    let d = Daemon::start(1, &[]);
    let actor = create_actor(d.addr, "echo", None);
    // No runner yet: the request waits for the actor to be placed and running.
    let addr = d.addr;
    let path = format!("/gateway/{actor}/wake");
    let pending = std::thread::spawn(move || http(addr, "POST", &path, &[], b"wake up"));
    let _r = Runner::start(&d.endpoint(), &[]);
    let (status, _, resp) = pending.join().unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(resp, b"wake up");
}

#[test]
fn websockets_address_actors_by_name_and_key() {
    let d = Daemon::start(1, &[]);
    let _r = Runner::start(&d.endpoint(), &[]);
    let mut ws = common::ws_connect(d.addr, "echo", "/ws?rvt-method=getOrCreate&rvt-key=w1");
    ws.send(tungstenite::Message::text("by name")).unwrap();
    assert_eq!(
        common::ws_recv(&mut ws).into_text().unwrap().as_str(),
        "by name"
    );
    // The same name and key reach the same actor: `get` now finds it.
    let mut ws2 = common::ws_connect(d.addr, "echo", "/ws?rvt-method=get&rvt-key=w1");
    ws2.send(tungstenite::Message::binary(vec![1, 2, 3]))
        .unwrap();
    assert_eq!(
        common::ws_recv(&mut ws2).into_data().as_ref(),
        &[1u8, 2, 3][..]
    );
    let (status, _, body) = http(
        d.addr,
        "GET",
        "/actors?namespace=default&name=echo&key=w1",
        &[],
        b"",
    );
    assert_eq!(status, 200);
    let v = common::json_body(&body);
    assert_eq!(v["actors"].as_array().map(|a| a.len()), Some(1), "{v}");
}
