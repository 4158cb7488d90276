//! HTTP API: the engine API's responses (`/actors`, `/metadata`, `/datacenters`), errors and
//! query parsing.

use super::*;

#[test]
fn api_create_shape() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    // Exactly what RemoteManagerDriver.createActor sends ("input" is base64 of CBOR).
    let (status, v, actions) = call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({
            "name": "counter",
            "runner_name_selector": "default",
            "key": "a/b",
            "input": "oWF4AQ==",
            "crash_policy": "sleep"
        }),
        t0,
    );
    assert_eq!(status, 200);
    let actor = &v["actor"];
    let id = actor["actor_id"].as_str().unwrap().to_string();
    assert_eq!(
        *actor,
        json!({
            "actor_id": id,
            "name": "counter",
            "key": "a/b",
            "namespace_id": "default",
            "datacenter": "default",
            "runner_name_selector": "default",
            "crash_policy": "sleep",
            "create_ts": T0_MS,
            "start_ts": T0_MS,
            "pending_allocation_ts": null,
            "connectable_ts": null,
            "sleep_ts": null,
            "reschedule_ts": null,
            "destroy_ts": null,
            "error": null,
        })
    );
    // The create started the actor, with the decoded input.
    match &starts(&actions)[0].inner {
        Command::StartActor(s) => {
            assert_eq!(s.config.input, Some(vec![0xa1, 0x61, 0x78, 0x01]));
            assert_eq!(s.config.key.as_deref(), Some("a/b"));
        }
        _ => unreachable!(),
    }
    // Same key again: the client gets {group, code, message}.
    let (status, v, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({"name": "counter", "runner_name_selector": "default", "key": "a/b", "crash_policy": "sleep"}),
        t0,
    );
    assert_eq!(status, 400);
    assert_eq!(v["group"], "actor");
    assert_eq!(v["code"], "duplicate_key");
    assert!(v["message"].is_string());
}

#[test]
fn api_get_by_id_and_key() {
    let (mut e, t0) = new_engine();
    let (_, v, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({"name": "counter", "runner_name_selector": "default", "key": "k1", "crash_policy": "sleep"}),
        t0,
    );
    let id = v["actor"]["actor_id"].as_str().unwrap().to_string();
    // getForId: GET /actors?actor_ids=<id>&namespace=default → actors[0]
    let (status, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("actor_ids", &id), NS],
        Value::Null,
        t0,
    );
    assert_eq!(status, 200);
    assert_eq!(v["actors"].as_array().unwrap().len(), 1);
    assert_eq!(v["actors"][0]["actor_id"], json!(id));
    assert_eq!(
        v["actors"][0]["pending_allocation_ts"],
        json!(T0_MS),
        "no runner yet"
    );
    // getWithKey: GET /actors?name=&key=
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "counter"), ("key", "k1"), NS],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"][0]["actor_id"], json!(id));
    // Missing key → empty list with 200 (the client reads actors[0] and treats none as absent).
    let (status, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "counter"), ("key", "zz"), NS],
        Value::Null,
        t0,
    );
    assert_eq!(status, 200);
    assert_eq!(v["actors"], json!([]));
    let (status, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("actor_ids", "nope"), NS],
        Value::Null,
        t0,
    );
    assert_eq!((status, v["actors"].clone()), (200, json!([])));
    // Another namespace does not see it.
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("actor_ids", &id), ("namespace", "other")],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"], json!([]));
    // key without name is a bad request.
    let (status, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("key", "k1"), NS],
        Value::Null,
        t0,
    );
    assert_eq!(status, 400);
    assert_eq!(v["code"], "bad_request");
    // GET /actors/{id}
    let (status, v, _) = call(
        &mut e,
        "GET",
        &format!("/actors/{id}"),
        &[NS],
        Value::Null,
        t0,
    );
    assert_eq!(status, 200);
    assert_eq!(v["actor"]["name"], "counter");
    let (status, v, _) = call(&mut e, "GET", "/actors/nope", &[NS], Value::Null, t0);
    assert_eq!(status, 404);
    assert_eq!(
        (v["group"].as_str(), v["code"].as_str()),
        (Some("actor"), Some("not_found"))
    );
}

#[test]
fn api_get_or_create_shape() {
    let (mut e, t0) = new_engine();
    e.runner_init(c(1), "default", "k1", init("default", 10), t0);
    let body = json!({
        "name": "chat",
        "key": "room",
        "runner_name_selector": "default",
        "crash_policy": "sleep"
    });
    let (status, v, actions) = call(&mut e, "PUT", "/actors", &[NS], body.clone(), t0);
    assert_eq!(status, 200);
    assert_eq!(v["created"], json!(true));
    assert_eq!(starts(&actions).len(), 1);
    let id = v["actor"]["actor_id"].clone();
    let (status, v, actions) = call(&mut e, "PUT", "/actors", &[NS], body, t0);
    assert_eq!(status, 200);
    assert_eq!(v["created"], json!(false));
    assert_eq!(v["actor"]["actor_id"], id);
    assert!(actions.is_empty());
    // key is required for get-or-create.
    let (status, _, _) = call(
        &mut e,
        "PUT",
        "/actors",
        &[NS],
        json!({"name": "chat", "runner_name_selector": "default", "crash_policy": "sleep"}),
        t0,
    );
    assert_eq!(status, 400);
}

#[test]
fn api_list_by_name_with_pagination() {
    let (mut e, t0) = new_engine();
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, v, _) = call(
            &mut e,
            "POST",
            "/actors",
            &[NS],
            json!({"name": "n", "runner_name_selector": "default", "key": format!("{i}"), "crash_policy": "sleep"}),
            t0,
        );
        ids.push(v["actor"]["actor_id"].clone());
    }
    call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({"name": "other", "runner_name_selector": "default", "crash_policy": "sleep"}),
        t0,
    );
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "n"), NS],
        Value::Null,
        t0,
    );
    let got: Vec<Value> = v["actors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["actor_id"].clone())
        .collect();
    assert_eq!(got, ids);
    assert_eq!(v["pagination"]["cursor"], Value::Null);
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "n"), ("limit", "2"), NS],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"].as_array().unwrap().len(), 2);
    let cursor = v["pagination"]["cursor"].as_str().unwrap().to_string();
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "n"), ("cursor", &cursor), NS],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"].as_array().unwrap().len(), 1);
    assert_eq!(v["actors"][0]["actor_id"], ids[2]);
}

#[test]
fn api_destroy() {
    let (mut e, t0, id, _) = running_actor();
    let (status, v, actions) = call(
        &mut e,
        "DELETE",
        &format!("/actors/{id}"),
        &[NS],
        Value::Null,
        t0,
    );
    assert_eq!((status, v), (200, json!({})));
    assert_eq!(stops(&actions)[0].checkpoint, cp(&id, 0, 1));
    let a = e.runner_events(
        c(1),
        vec![ev(&id, 0, 1, stopped(StopCode::Ok))],
        secs(t0, 1.0),
    );
    assert!(a.contains(&Action::ActorDestroyed {
        actor_id: id.clone()
    }));
    // By id it is still visible, with destroy_ts; by key and by name it is gone.
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("actor_ids", &id), NS],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"][0]["destroy_ts"], json!(T0_MS + 1000));
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "counter"), ("key", "x"), NS],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"], json!([]));
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/actors",
        &[("name", "counter"), NS],
        Value::Null,
        t0,
    );
    assert_eq!(v["actors"], json!([]));
    // Idempotent; unknown → 404 actor.not_found.
    let (status, _, _) = call(
        &mut e,
        "DELETE",
        &format!("/actors/{id}"),
        &[NS],
        Value::Null,
        t0,
    );
    assert_eq!(status, 200);
    let (status, v, _) = call(&mut e, "DELETE", "/actors/unknown", &[NS], Value::Null, t0);
    assert_eq!(status, 404);
    assert_eq!(v["group"], "actor");
    assert_eq!(v["code"], "not_found");
    // A sleeping actor is destroyed at once.
    let (_, v, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[("namespace", "ns2")],
        json!({"name": "n", "runner_name_selector": "default", "crash_policy": "sleep"}),
        t0,
    );
    let id2 = v["actor"]["actor_id"].as_str().unwrap().to_string();
    let (_, _, actions) = call(
        &mut e,
        "DELETE",
        &format!("/actors/{id2}"),
        &[("namespace", "ns2")],
        Value::Null,
        t0,
    );
    assert_eq!(
        actions,
        vec![Action::ActorDestroyed {
            actor_id: id2.clone()
        }]
    );
}

#[test]
fn api_metadata_datacenters_names_and_errors() {
    let (mut e, t0) = new_engine();
    let (status, v, _) = call(&mut e, "GET", "/metadata", &[NS], Value::Null, t0);
    assert_eq!(status, 200);
    assert_eq!(v["runtime"], "engine");
    assert!(v["version"].is_string());
    assert!(
        v.get("clientEndpoint").is_none(),
        "would redirect the client"
    );
    let (_, v, _) = call(&mut e, "GET", "/health", &[], Value::Null, t0);
    assert_eq!(v["runtime"], "engine");
    assert_eq!(v["status"], "ok");
    let (_, v, _) = call(&mut e, "GET", "/datacenters", &[NS], Value::Null, t0);
    assert_eq!(
        v,
        json!({
            "datacenters": [{"label": 1, "name": "default", "url": "http://127.0.0.1:6420"}],
            "pagination": {"cursor": null}
        })
    );
    let mut i = init("default", 1);
    i.prepopulate_actor_names = Some(ActorNameMap(vec![
        (
            "counter".into(),
            ActorName {
                metadata: r#"{"name":"Counter"}"#.into(),
            },
        ),
        (
            "broken".into(),
            ActorName {
                metadata: "not json".into(),
            },
        ),
    ]));
    e.runner_init(c(1), "default", "k", i, t0);
    let (_, v, _) = call(&mut e, "GET", "/actors/names", &[NS], Value::Null, t0);
    assert_eq!(
        v["names"],
        json!({"counter": {"metadata": {"name": "Counter"}}, "broken": {"metadata": {}}})
    );
    // Errors
    let r = handle(&mut e, "POST", "/actors", &q(&[NS]), b"{not json", t0);
    assert_eq!(r.status, 400);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (v["group"].as_str(), v["code"].as_str()),
        (Some("api"), Some("bad_request"))
    );
    let (status, _, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({"name": "n", "runner_name_selector": "default", "crash_policy": "sleep", "input": "***"}),
        t0,
    );
    assert_eq!(status, 400);
    let (status, v, _) = call(
        &mut e,
        "POST",
        "/actors",
        &[NS],
        json!({"name": "n", "runner_name_selector": "default", "crash_policy": "sleep", "datacenter": "mars"}),
        t0,
    );
    assert_eq!((status, v["code"].as_str()), (400, Some("not_found")));
    let (status, _, _) = call(&mut e, "PATCH", "/actors", &[NS], Value::Null, t0);
    assert_eq!(status, 405);
    let (status, v, _) = call(&mut e, "GET", "/nope", &[], Value::Null, t0);
    assert_eq!((status, v["group"].as_str()), (404, Some("api")));
}

#[test]
fn api_query_parsing() {
    assert_eq!(
        api::parse_query("name=a%2Fb&key=x+y&namespace=default&flag"),
        q(&[
            ("name", "a/b"),
            ("key", "x y"),
            ("namespace", "default"),
            ("flag", "")
        ])
    );
    assert_eq!(
        api::parse_query("a=%zz&b=1"),
        q(&[("a", "%zz"), ("b", "1")])
    );
    assert_eq!(api::percent_decode("%E2%9C%93"), Some("✓".to_string()));
    assert_eq!(api::percent_decode("%E2%9C"), None);
    assert_eq!(api::percent_decode("%4"), None);
}
