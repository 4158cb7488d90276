//! Runner configs: the `/runner-configs` API (shapes as `rivetkit@2.2.1` sends them and the
//! Rivet engine answers), `endpoint_config_changed`, the bounds, durability across a restart,
//! and `desired_runners`.

use super::*;
use crate::engine::runner_configs::{runner_config_key, RunnerConfigRecord, Variant};

/// What `rivetkit@2.2.1`'s `configureServerlessRunner` sends with its defaults (including the
/// stray `metadataPollInterval` beside `serverless`).
fn rivetkit_body(url: &str) -> Value {
    json!({
        "datacenters": {
            "default": {
                "serverless": {
                    "url": url,
                    "headers": {},
                    "max_runners": 100000,
                    "min_runners": 0,
                    "request_lifespan": 900,
                    "runners_margin": 0,
                    "slots_per_runner": 1,
                    "metadata_poll_interval": 1000
                },
                "metadata": {},
                "drain_on_version_upgrade": true,
                "metadataPollInterval": 1000
            }
        }
    })
}

fn serverless(extra: Value) -> Value {
    let mut s = json!({
        "url": "https://example.com/api/rivet",
        "request_lifespan": 300,
        "slots_per_runner": 4,
        "max_runners": 10
    });
    if let (Value::Object(s), Value::Object(x)) = (&mut s, extra) {
        s.extend(x);
    }
    json!({ "datacenters": { "default": { "serverless": s } } })
}

fn put(e: &mut Engine, name: &str, body: Value, t: Instant) -> (u16, Value) {
    let (st, v, actions) = call(e, "PUT", &format!("/runner-configs/{name}"), &[NS], body, t);
    assert!(actions.is_empty());
    (st, v)
}

fn list(e: &mut Engine, query: &[(&str, &str)], t: Instant) -> Value {
    let mut q = vec![NS];
    q.extend_from_slice(query);
    let (st, v, _) = call(e, "GET", "/runner-configs", &q, Value::Null, t);
    assert_eq!(st, 200, "{v}");
    v
}

fn code(v: &Value) -> String {
    format!(
        "{}.{}",
        v["group"].as_str().unwrap(),
        v["code"].as_str().unwrap()
    )
}

#[test]
fn rivetkit_upsert_is_accepted_and_listed_in_the_engine_shape() {
    let (mut e, t0) = new_engine();
    let (st, v) = put(
        &mut e,
        "default",
        rivetkit_body("http://127.0.0.1:3000/api/rivet"),
        t0,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v, json!({ "endpoint_config_changed": true }));
    let v = list(&mut e, &[], t0);
    assert_eq!(
        v,
        json!({
            "runner_configs": {
                "default": {
                    "datacenters": {
                        "default": {
                            "serverless": {
                                "url": "http://127.0.0.1:3000/api/rivet",
                                "headers": {},
                                "request_lifespan": 900,
                                "slots_per_runner": 1,
                                "min_runners": 0,
                                "max_runners": 100000,
                                "runners_margin": 0,
                                "metadata_poll_interval": 1000
                            },
                            "metadata": {},
                            "drain_on_version_upgrade": true
                        }
                    }
                }
            },
            "pagination": { "cursor": null }
        })
    );
    // Another namespace sees nothing.
    let (_, v, _) = call(
        &mut e,
        "GET",
        "/runner-configs",
        &[("namespace", "other")],
        Value::Null,
        t0,
    );
    assert_eq!(v["runner_configs"], json!({}));
}

#[test]
fn optional_fields_take_the_engine_defaults() {
    let (mut e, t0) = new_engine();
    let (st, _) = put(&mut e, "pool", serverless(json!({ "headers": null })), t0);
    assert_eq!(st, 200);
    let c = e.runner_config("default", "pool").unwrap();
    let s = c.serverless().unwrap();
    assert_eq!((s.min_runners, s.runners_margin), (0, 0));
    assert!(s.headers.is_empty());
    assert_eq!(s.metadata_poll_interval, None);
    assert_eq!(c.metadata, None);
    assert!(!c.drain_on_version_upgrade, "the engine's default");
    let v = list(&mut e, &[], t0);
    let got = &v["runner_configs"]["pool"]["datacenters"]["default"];
    assert!(got.get("metadata").is_none(), "{got}");
    assert!(
        got["serverless"].get("metadata_poll_interval").is_none(),
        "{got}"
    );
}

#[test]
fn endpoint_config_changed_as_the_engine_decides_it() {
    let (mut e, t0) = new_engine();
    let url = |u: &str| serverless(json!({ "url": u }));
    assert_eq!(
        put(&mut e, "p", url("https://a.example/x"), t0).1["endpoint_config_changed"],
        true
    );
    // Same url and headers, other sizes: unchanged.
    let (_, v) = put(
        &mut e,
        "p",
        serverless(json!({ "url": "https://a.example/x", "max_runners": 99 })),
        t0,
    );
    assert_eq!(v["endpoint_config_changed"], false);
    assert_eq!(
        e.runner_config("default", "p")
            .unwrap()
            .serverless()
            .unwrap()
            .max_runners,
        99
    );
    // Headers changed.
    let (_, v) = put(
        &mut e,
        "p",
        serverless(json!({ "url": "https://a.example/x", "headers": { "x-a": "1" } })),
        t0,
    );
    assert_eq!(v["endpoint_config_changed"], true);
    // Url changed.
    let (_, v) = put(
        &mut e,
        "p",
        serverless(json!({ "url": "https://b.example/x", "headers": { "x-a": "1" } })),
        t0,
    );
    assert_eq!(v["endpoint_config_changed"], true);
    // To normal and back: changed both times (as the engine).
    let normal = json!({ "datacenters": { "default": { "normal": {} } } });
    assert_eq!(
        put(&mut e, "p", normal.clone(), t0).1["endpoint_config_changed"],
        true
    );
    assert_eq!(
        put(&mut e, "p", normal, t0).1["endpoint_config_changed"],
        true
    );
    assert_eq!(
        put(&mut e, "p", url("https://b.example/x"), t0).1["endpoint_config_changed"],
        true
    );
}

#[test]
fn normal_configs_are_stored_and_listed() {
    let (mut e, t0) = new_engine();
    let body = json!({ "datacenters": { "default": { "normal": {}, "metadata": { "a": 1 } } } });
    let (st, _) = put(&mut e, "n", body, t0);
    assert_eq!(st, 200);
    let v = list(&mut e, &[], t0);
    assert_eq!(
        v["runner_configs"]["n"]["datacenters"]["default"],
        json!({ "normal": {}, "metadata": { "a": 1 }, "drain_on_version_upgrade": false })
    );
}

#[test]
fn shape_errors_are_refused_with_clear_messages() {
    let (mut e, t0) = new_engine();
    let cases = [
        // An unknown top-level field (the engine's body denies them).
        (
            json!({ "datacenters": {}, "metadataPollInterval": 1000 }),
            "unknown field",
        ),
        (json!({}), "missing field `datacenters`"),
        (
            json!({ "datacenters": { "default": 5 } }),
            "must be a JSON object",
        ),
        (
            json!({ "datacenters": { "default": {} } }),
            "needs `serverless` or `normal`",
        ),
        (
            json!({ "datacenters": { "default": { "normal": {}, "serverless": {} } } }),
            "not both",
        ),
        (
            json!({ "datacenters": { "default": { "serverless": { "url": "https://x.example" } } } }),
            "missing field",
        ),
        (serverless(json!({ "slots_per_runner": -1 })), "serverless:"),
        (serverless(json!({ "max_runners": 1.5 })), "serverless:"),
        (
            json!({ "datacenters": { "default": { "normal": {}, "drain_on_version_upgrade": "yes" } } }),
            "must be a boolean",
        ),
    ];
    for (body, needle) in cases {
        let (st, v) = put(&mut e, "p", body.clone(), t0);
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(code(&v), "api.bad_request", "{body}");
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let r = handle(
        &mut e,
        "PUT",
        "/runner-configs/p",
        &q(&[NS]),
        b"{not json",
        t0,
    );
    assert_eq!(r.status, 400);
    assert_eq!(e.runner_configs_count(), 0, "nothing was stored");
    assert!(e.take_store_ops().is_empty());
}

#[test]
fn other_datacenters_refuse_the_request_and_leaving_ours_out_deletes_it() {
    let (mut e, t0) = new_engine();
    assert_eq!(put(&mut e, "p", serverless(json!({})), t0).0, 200);
    e.take_store_ops();
    // A datacenter that is not ours: nothing changes (the engine checks before writing).
    let mut body = serverless(json!({ "max_runners": 3 }));
    body["datacenters"]["elsewhere"] = json!({ "normal": {} });
    let (st, v) = put(&mut e, "p", body, t0);
    assert_eq!(
        (st, code(&v)),
        (400, "datacenter.not_found".to_string()),
        "{v}"
    );
    assert_eq!(
        e.runner_config("default", "p")
            .unwrap()
            .serverless()
            .unwrap()
            .max_runners,
        10
    );
    assert!(e.take_store_ops().is_empty());
    // Ours left out: the engine deletes our config.
    let (st, v) = put(&mut e, "p", json!({ "datacenters": {} }), t0);
    assert_eq!((st, v), (200, json!({ "endpoint_config_changed": false })));
    assert!(e.runner_config("default", "p").is_none());
    assert_eq!(
        e.take_store_ops(),
        vec![StoreOp::Delete {
            key: runner_config_key("default", "p")
        }]
    );
}

#[test]
fn delete_answers_empty_whether_or_not_there_was_one() {
    let (mut e, t0) = new_engine();
    put(&mut e, "p", serverless(json!({})), t0);
    e.take_store_ops();
    for _ in 0..2 {
        let (st, v, _) = call(
            &mut e,
            "DELETE",
            "/runner-configs/p",
            &[NS],
            Value::Null,
            t0,
        );
        assert_eq!((st, v), (200, json!({})));
    }
    assert_eq!(
        e.take_store_ops().len(),
        1,
        "one delete, then nothing to write"
    );
    assert_eq!(list(&mut e, &[], t0)["runner_configs"], json!({}));
    // Other methods and paths.
    let (st, _, _) = call(&mut e, "GET", "/runner-configs/p", &[NS], Value::Null, t0);
    assert_eq!(st, 405);
    let (st, _, _) = call(&mut e, "POST", "/runner-configs", &[NS], Value::Null, t0);
    assert_eq!(st, 405);
    let (st, v, _) = call(
        &mut e,
        "POST",
        "/runner-configs/p/refresh-metadata",
        &[NS],
        Value::Null,
        t0,
    );
    assert_eq!((st, code(&v)), (501, "api.not_implemented".to_string()));
}

#[test]
fn names_are_percent_decoded_and_bounded() {
    let (mut e, t0) = new_engine();
    assert_eq!(put(&mut e, "my%20pool", serverless(json!({})), t0).0, 200);
    assert!(e.runner_config("default", "my pool").is_some());
    let long = "n".repeat(257);
    let (st, v) = put(&mut e, &long, serverless(json!({})), t0);
    assert_eq!(
        (st, code(&v)),
        (400, "runner_config.name_too_long".to_string()),
        "{v}"
    );
    let long_ns = "s".repeat(257);
    let (st, v, _) = call(
        &mut e,
        "PUT",
        "/runner-configs/p",
        &[("namespace", &long_ns)],
        serverless(json!({})),
        t0,
    );
    assert_eq!(
        (st, code(&v)),
        (400, "runner_config.name_too_long".to_string())
    );
    let (st, _, _) = call(
        &mut e,
        "DELETE",
        &format!("/runner-configs/{long}"),
        &[NS],
        Value::Null,
        t0,
    );
    assert_eq!(st, 400);
    let r = handle(&mut e, "PUT", "/runner-configs/%ff", &q(&[NS]), b"{}", t0);
    assert_eq!(r.status, 400);
}

#[test]
fn every_bound_has_its_error_code() {
    let cfg = EngineConfig {
        runner_configs: RunnerConfigLimits {
            per_namespace: 2,
            total: 3,
            url_bytes: 40,
            headers: 2,
            header_bytes: 20,
            metadata_bytes: 30,
            max_runners: 50,
            request_lifespan_min_s: 10,
            request_lifespan_max_s: 600,
        },
        ..EngineConfig::default()
    };
    let t0 = Instant::now();
    let mut e = Engine::new(cfg, 1, t0, T0_MS);
    let long_url = format!("https://example.com/{}", "a".repeat(30));
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            serverless(json!({ "url": long_url })),
            400,
            "runner_config.url_too_long",
        ),
        (
            serverless(json!({ "url": "ftp://example.com/x" })),
            400,
            "runner_config.invalid",
        ),
        (
            serverless(json!({ "url": "not a url" })),
            400,
            "runner_config.invalid",
        ),
        (
            serverless(json!({ "headers": { "a": "1", "b": "2", "c": "3" } })),
            400,
            "runner_config.too_many_headers",
        ),
        (
            serverless(json!({ "headers": { "a": "x".repeat(20) } })),
            400,
            "runner_config.headers_too_large",
        ),
        (
            serverless(json!({ "headers": { "bad name": "1" } })),
            400,
            "runner_config.invalid",
        ),
        (
            serverless(json!({ "headers": { "a": "x\ny" } })),
            400,
            "runner_config.invalid",
        ),
        (
            serverless(json!({ "headers": { "X-A": "1", "x-a": "2" } })),
            400,
            "runner_config.invalid",
        ),
        (
            serverless(json!({ "slots_per_runner": 0 })),
            400,
            "runner_config.invalid",
        ),
        (
            serverless(json!({ "max_runners": 51 })),
            400,
            "runner_config.max_runners_too_high",
        ),
        (
            serverless(json!({ "min_runners": 11, "max_runners": 10 })),
            400,
            "runner_config.invalid",
        ),
        (
            serverless(json!({ "request_lifespan": 9 })),
            400,
            "runner_config.request_lifespan_out_of_range",
        ),
        (
            serverless(json!({ "request_lifespan": 900_000 })),
            400,
            "runner_config.request_lifespan_out_of_range",
        ),
        (
            json!({ "datacenters": { "default": { "normal": {}, "metadata": { "k": "v".repeat(30) } } } }),
            400,
            "runner_config.metadata_too_large",
        ),
    ];
    for (body, status, want) in cases {
        let (st, v) = put(&mut e, "p", body.clone(), t0);
        assert_eq!((st, code(&v)), (status, want.to_string()), "{body}: {v}");
        assert!(!v["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(e.runner_configs_count(), 0);
    assert!(e.take_store_ops().is_empty(), "refusals write nothing");
    // At the edges: accepted.
    let ok = serverless(json!({
        "url": "http://h.example/abc",
        "headers": { "a": "1", "B": "2" },
        "max_runners": 50,
        "min_runners": 50,
        "request_lifespan": 600
    }));
    assert_eq!(put(&mut e, "p", ok, t0).0, 200);
    // Counts: 2 per namespace, 3 in all; replacing one is not a new one.
    assert_eq!(put(&mut e, "q", serverless(json!({})), t0).0, 200);
    assert_eq!(put(&mut e, "q", serverless(json!({})), t0).0, 200);
    let (st, v) = put(&mut e, "r", serverless(json!({})), t0);
    assert_eq!(
        (st, code(&v)),
        (429, "runner_config.quota_exceeded".to_string())
    );
    let (st, _, _) = call(
        &mut e,
        "PUT",
        "/runner-configs/r",
        &[("namespace", "b")],
        serverless(json!({})),
        t0,
    );
    assert_eq!(st, 200);
    let (st, v, _) = call(
        &mut e,
        "PUT",
        "/runner-configs/s",
        &[("namespace", "c")],
        serverless(json!({})),
        t0,
    );
    assert_eq!((st, code(&v)), (429, "runner_config.too_many".to_string()));
    // A delete makes room.
    call(
        &mut e,
        "DELETE",
        "/runner-configs/q",
        &[NS],
        Value::Null,
        t0,
    );
    let (st, _, _) = call(
        &mut e,
        "PUT",
        "/runner-configs/s",
        &[("namespace", "c")],
        serverless(json!({})),
        t0,
    );
    assert_eq!(st, 200);
    assert_eq!(e.runner_configs_count(), 3);
}

#[test]
fn the_list_pages_filters_and_finds_by_name() {
    let (mut e, t0) = new_engine();
    for n in ["a", "b", "c", "d", "e"] {
        let body = if n == "c" {
            json!({ "datacenters": { "default": { "normal": {} } } })
        } else {
            serverless(json!({}))
        };
        assert_eq!(put(&mut e, n, body, t0).0, 200);
    }
    let names = |v: &Value| -> Vec<String> {
        v["runner_configs"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    let p1 = list(&mut e, &[("limit", "2")], t0);
    assert_eq!(names(&p1), ["a", "b"]);
    assert_eq!(p1["pagination"]["cursor"], "serverless:b");
    let p2 = list(&mut e, &[("limit", "2"), ("cursor", "serverless:b")], t0);
    assert_eq!(names(&p2), ["c", "d"]);
    assert_eq!(p2["pagination"]["cursor"], "serverless:d");
    let p3 = list(&mut e, &[("limit", "2"), ("cursor", "serverless:d")], t0);
    assert_eq!(names(&p3), ["e"]);
    assert!(p3["pagination"]["cursor"].is_null());
    // Exactly one page: no cursor.
    assert!(list(&mut e, &[("limit", "5")], t0)["pagination"]["cursor"].is_null());
    // By variant.
    assert_eq!(names(&list(&mut e, &[("variant", "normal")], t0)), ["c"]);
    assert_eq!(
        names(&list(&mut e, &[("variant", "serverless")], t0)),
        ["a", "b", "d", "e"]
    );
    // By name: repeated runner_name and the comma-separated runner_names; missing ones left out.
    let v = list(
        &mut e,
        &[
            ("runner_name", "e"),
            ("runner_name", "zz"),
            ("runner_names", "a,c"),
        ],
        t0,
    );
    assert_eq!(names(&v), ["a", "c", "e"]);
    assert!(v["pagination"]["cursor"].is_null());
    // Bad parameters.
    for (k, val) in [
        ("limit", "0"),
        ("limit", "x"),
        ("variant", "other"),
        ("cursor", "nocolon"),
    ] {
        let (st, _, _) = call(
            &mut e,
            "GET",
            "/runner-configs",
            &[NS, (k, val)],
            Value::Null,
            t0,
        );
        assert_eq!(st, 400, "{k}={val}");
    }
    let many = vec!["n"; 101].join(",");
    let (st, _, _) = call(
        &mut e,
        "GET",
        "/runner-configs",
        &[NS, ("runner_names", &many)],
        Value::Null,
        t0,
    );
    assert_eq!(st, 400);
    assert_eq!(
        e.runner_configs_page("default", Some(Variant::Normal), None, 10)
            .0
            .len(),
        1
    );
}

#[test]
fn configs_are_written_to_the_store_and_restored() {
    let (mut e, t0) = new_engine();
    let mut store = Store::new();
    put(
        &mut e,
        "default",
        rivetkit_body("https://app.example/api/rivet"),
        t0,
    );
    put(
        &mut e,
        "other",
        serverless(json!({ "headers": { "authorization": "Bearer s3cret" }, "runners_margin": 2 })),
        t0,
    );
    put(&mut e, "gone", serverless(json!({})), t0);
    let (st, _, _) = call(
        &mut e,
        "PUT",
        "/runner-configs/n",
        &[("namespace", "ns2")],
        json!({ "datacenters": { "default": { "normal": {} } } }),
        t0,
    );
    assert_eq!(st, 200);
    call(
        &mut e,
        "DELETE",
        "/runner-configs/gone",
        &[NS],
        Value::Null,
        t0,
    );
    let ops = e.take_store_ops();
    assert_eq!(ops.len(), 5, "four puts and a delete, in order: {ops:?}");
    apply_ops(&mut store, ops);
    assert_eq!(store.len(), 3);
    let rec: RunnerConfigRecord =
        serde_json::from_slice(&store[&runner_config_key("default", "other")]).unwrap();
    assert_eq!(
        (rec.v, rec.namespace.as_str(), rec.name.as_str()),
        (1, "default", "other")
    );
    let before = list(&mut e, &[], t0);

    let (mut e2, t1, report) = restarted(&store, 10);
    assert_eq!(
        report,
        RestoreReport {
            runner_configs: 3,
            ..RestoreReport::default()
        }
    );
    assert!(e2.take_store_ops().is_empty(), "restore writes nothing");
    assert_eq!(list(&mut e2, &[], t1), before);
    let (_, v, _) = call(
        &mut e2,
        "GET",
        "/runner-configs",
        &[("namespace", "ns2")],
        Value::Null,
        t1,
    );
    assert_eq!(
        v["runner_configs"]["n"]["datacenters"]["default"]["normal"],
        json!({})
    );
    // The same config again is not an endpoint change after the restart either.
    let (_, v) = put(
        &mut e2,
        "default",
        rivetkit_body("https://app.example/api/rivet"),
        t1,
    );
    assert_eq!(v["endpoint_config_changed"], false);
}

#[test]
fn restore_skips_unusable_config_records_and_ignores_limits() {
    let good = |ns: &str, name: &str| {
        serde_json::to_vec(&RunnerConfigRecord {
            v: 1,
            namespace: ns.into(),
            name: name.into(),
            config: json!({ "normal": {} }),
        })
        .unwrap()
    };
    let mut entries = vec![
        (runner_config_key("default", "a"), good("default", "a")),
        (runner_config_key("default", "b"), good("default", "b")),
        (runner_config_key("default", "c"), good("default", "c")),
        // Under another key than its own.
        (runner_config_key("default", "x"), good("default", "y")),
        (runner_config_key("default", "j"), b"{junk".to_vec()),
    ];
    let mut v2 = RunnerConfigRecord {
        v: 2,
        namespace: "default".into(),
        name: "v".into(),
        config: json!({ "normal": {} }),
    };
    entries.push((
        runner_config_key("default", "v"),
        serde_json::to_vec(&v2).unwrap(),
    ));
    v2.v = 1;
    v2.config = json!({ "weird": {} });
    entries.push((
        runner_config_key("default", "v"),
        serde_json::to_vec(&v2).unwrap(),
    ));
    let cfg = EngineConfig {
        runner_configs: RunnerConfigLimits {
            per_namespace: 1,
            ..RunnerConfigLimits::DEFAULT
        },
        ..EngineConfig::default()
    };
    let t1 = Instant::now();
    let mut e = Engine::new(cfg, 3, t1, T0_MS);
    let report = e.restore(entries, t1);
    assert_eq!(
        report,
        RestoreReport {
            runner_configs: 3,
            skipped: 4,
            ..RestoreReport::default()
        }
    );
    assert_eq!(
        e.runner_configs_count(),
        3,
        "a lowered limit drops nothing stored"
    );
    assert!(
        e.take_store_ops().is_empty(),
        "unusable records are left alone"
    );
    // But refuses new ones.
    let (st, _) = put(&mut e, "d", serverless(json!({})), t1);
    assert_eq!(st, 429);
}

#[test]
fn keys_of_different_namespace_and_name_splits_differ() {
    assert_ne!(runner_config_key("ab", "c"), runner_config_key("a", "bc"));
    assert!(runner_config_key("a", "b").starts_with(RUNNER_CONFIG_KEY_PREFIX));
}

fn pool(margin: u32, per_runner: u32, min: u32, max: u32) -> ServerlessConfig {
    ServerlessConfig {
        url: "https://x.example".into(),
        headers: Default::default(),
        request_lifespan: 900,
        slots_per_runner: per_runner,
        min_runners: min,
        max_runners: max,
        runners_margin: margin,
        metadata_poll_interval: None,
    }
}

#[test]
fn desired_runners_follows_the_engine_formula() {
    // No demand: the margin, at least min_runners.
    assert_eq!(desired_runners(&pool(0, 1, 0, 10), 0), 0);
    assert_eq!(desired_runners(&pool(2, 1, 0, 10), 0), 2);
    assert_eq!(desired_runners(&pool(0, 1, 3, 10), 0), 3);
    // Slots round up to whole runners.
    assert_eq!(desired_runners(&pool(0, 4, 0, 10), 1), 1);
    assert_eq!(desired_runners(&pool(0, 4, 0, 10), 4), 1);
    assert_eq!(desired_runners(&pool(0, 4, 0, 10), 5), 2);
    assert_eq!(desired_runners(&pool(1, 4, 0, 10), 5), 3);
    // Capped at max_runners, which wins over min_runners.
    assert_eq!(desired_runners(&pool(0, 1, 0, 10), 1000), 10);
    assert_eq!(desired_runners(&pool(0, 1, 20, 10), 0), 10);
    assert_eq!(desired_runners(&pool(0, 1, 0, 0), 5), 0);
}

#[test]
fn desired_runners_cannot_overflow() {
    let p = pool(u32::MAX, 1, u32::MAX, u32::MAX);
    assert_eq!(desired_runners(&p, u64::MAX), u32::MAX);
    assert_eq!(desired_runners(&pool(u32::MAX, 1, 0, 7), u64::MAX), 7);
    assert_eq!(
        desired_runners(&pool(0, u32::MAX, 0, u32::MAX), u64::MAX),
        u32::MAX
    );
    assert_eq!(desired_runners(&pool(0, u32::MAX, 0, u32::MAX), 1), 1);
    // A zero slots_per_runner (refused by the API) counts as one instead of dividing by zero.
    assert_eq!(desired_runners(&pool(0, 0, 0, 10), 3), 3);
}
