//! Runner configs against the real daemon over HTTP: PUT/GET/DELETE `/runner-configs` with the
//! body `rivetkit@2.2.1` sends (its stray `metadataPollInterval` included), an unknown
//! top-level field refused, the admin token required when one is configured, configs kept
//! across a `kill -9` and restart, a configured bound applied, and a full disk answered 503
//! without acknowledging.

mod common;

use common::tmpfs::{fill, Tmpfs};
use common::*;
use serde_json::{json, Value};

/// What `configureServerlessRunner` of rivetkit@2.2.1 sends, for the datacenters that
/// `GET /datacenters` names.
fn rivetkit_body(dcs: &[String], url: &str, metadata: Value) -> Value {
    let entry = json!({
        "serverless": {
            "url": url,
            "headers": { "x-secret": "s3cret" },
            "max_runners": 100000,
            "min_runners": 0,
            "request_lifespan": 900,
            "runners_margin": 0,
            "slots_per_runner": 1,
            "metadata_poll_interval": 1000
        },
        "metadata": metadata,
        "drain_on_version_upgrade": true,
        "metadataPollInterval": 1000
    });
    let dcs: serde_json::Map<String, Value> =
        dcs.iter().map(|dc| (dc.clone(), entry.clone())).collect();
    json!({ "datacenters": dcs })
}

fn call(
    d: &Daemon,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> (u16, Option<String>, Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("authorization", b));
    }
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let (status, h, raw) = http(d.addr, method, path, &headers, &body);
    let err = h
        .iter()
        .find(|(k, _)| k == "x-rivet-error")
        .map(|(_, v)| v.clone());
    (status, err, json_body(&raw))
}

fn datacenters(d: &Daemon, token: Option<&str>) -> Vec<String> {
    let (status, _, v) = call(
        d,
        "GET",
        "/datacenters?namespace=default",
        token,
        &Value::Null,
    );
    assert_eq!(status, 200, "{v}");
    v["datacenters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|dc| dc["name"].as_str().unwrap().to_string())
        .collect()
}

fn list(d: &Daemon, token: Option<&str>) -> Value {
    let (status, _, v) = call(
        d,
        "GET",
        "/runner-configs?namespace=default",
        token,
        &Value::Null,
    );
    assert_eq!(status, 200, "{v}");
    v
}

#[test]
fn configs_are_stored_listed_deleted_and_survive_a_restart() {
    let d = Daemon::start(1, &[]);
    let dcs = datacenters(&d, None);
    let body = rivetkit_body(&dcs, "http://127.0.0.1:9/api/rivet", json!({}));
    let (status, _, v) = call(
        &d,
        "PUT",
        "/runner-configs/default?namespace=default",
        None,
        &body,
    );
    assert_eq!(
        (status, v),
        (200, json!({ "endpoint_config_changed": true }))
    );
    let (status, _, v) = call(
        &d,
        "PUT",
        "/runner-configs/default?namespace=default",
        None,
        &body,
    );
    assert_eq!(
        (status, v),
        (200, json!({ "endpoint_config_changed": false }))
    );
    let (status, _, _) = call(
        &d,
        "PUT",
        "/runner-configs/doomed?namespace=default",
        None,
        &json!({ "datacenters": { dcs[0].as_str(): { "normal": {} } } }),
    );
    assert_eq!(status, 200);

    let v = list(&d, None);
    let got = &v["runner_configs"]["default"]["datacenters"][dcs[0].as_str()];
    assert_eq!(
        got["serverless"]["url"], "http://127.0.0.1:9/api/rivet",
        "{v}"
    );
    assert_eq!(got["serverless"]["headers"]["x-secret"], "s3cret");
    assert_eq!(got["serverless"]["max_runners"], 100000);
    assert_eq!(got["drain_on_version_upgrade"], true);
    assert!(got.get("metadataPollInterval").is_none(), "{got}");
    assert!(v["runner_configs"]["doomed"].is_object(), "{v}");

    // An unknown top-level field is refused, by name.
    let mut bad = body.clone();
    bad["metadataPollInterval"] = json!(1000);
    let (status, err, v) = call(
        &d,
        "PUT",
        "/runner-configs/default?namespace=default",
        None,
        &bad,
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(err.as_deref(), Some("api.bad_request"));
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("metadataPollInterval"),
        "{v}"
    );
    // A bound: counted under its code.
    let mut bad = body.clone();
    bad["datacenters"][dcs[0].as_str()]["serverless"]["slots_per_runner"] = json!(0);
    let (status, err, _) = call(
        &d,
        "PUT",
        "/runner-configs/default?namespace=default",
        None,
        &bad,
    );
    assert_eq!(
        (status, err.as_deref()),
        (400, Some("runner_config.invalid"))
    );
    assert_eq!(
        d.metric("torpor_errors_total{code=\"runner_config.invalid\"}"),
        1.0
    );

    let (status, _, v) = call(
        &d,
        "DELETE",
        "/runner-configs/doomed?namespace=default",
        None,
        &Value::Null,
    );
    assert_eq!((status, v), (200, json!({})));
    let before = list(&d, None);
    assert!(before["runner_configs"].get("doomed").is_none());

    // kill -9: every answered change is in the store.
    let d = d.kill_and_restart(1, &[]);
    assert_eq!(list(&d, None), before);
    let (_, _, v) = call(
        &d,
        "PUT",
        "/runner-configs/default?namespace=default",
        None,
        &body,
    );
    assert_eq!(
        v,
        json!({ "endpoint_config_changed": false }),
        "same endpoint"
    );
}

#[test]
fn the_admin_token_is_required_when_configured() {
    let token = "rc-token-123";
    let d = Daemon::start(
        1,
        &[
            ("TORPOR_AUTH__ADMIN_TOKEN", token),
            ("TORPOR_LIMITS__RUNNER_CONFIGS_PER_NAMESPACE", "1"),
        ],
    );
    let dcs = datacenters(&d, Some(token));
    let body = rivetkit_body(&dcs, "https://app.example/api/rivet", json!({ "a": 1 }));
    let path = "/runner-configs/default?namespace=default";
    for (method, body) in [
        ("PUT", &body),
        ("GET", &Value::Null),
        ("DELETE", &Value::Null),
    ] {
        let path = if method == "GET" {
            "/runner-configs?namespace=default"
        } else {
            path
        };
        for wrong in [None, Some("nope")] {
            let (status, err, _) = call(&d, method, path, wrong, body);
            assert_eq!(
                (status, err.as_deref()),
                (401, Some("api.unauthorized")),
                "{method} with {wrong:?}"
            );
        }
    }
    let (status, _, _) = call(&d, "PUT", path, Some(token), &body);
    assert_eq!(status, 200);
    let v = list(&d, Some(token));
    assert_eq!(
        v["runner_configs"]["default"]["datacenters"][dcs[0].as_str()]["metadata"],
        json!({ "a": 1 })
    );
    // The configured bound reaches the engine.
    let (status, err, v) = call(
        &d,
        "PUT",
        "/runner-configs/second?namespace=default",
        Some(token),
        &body,
    );
    assert_eq!(
        (status, err.as_deref()),
        (429, Some("runner_config.quota_exceeded")),
        "{v}"
    );
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("limits.runner_configs_per_namespace"));
}

#[test]
fn a_store_that_cannot_commit_answers_503_and_acknowledges_nothing() {
    let Some(fs) = Tmpfs::mount("20m") else {
        return;
    };
    let d = Daemon::start_at(
        "127.0.0.1:0",
        &fs.0.join("data"),
        1,
        &[("TORPOR_LIMITS__RUNNER_CONFIGS_PER_NAMESPACE", "1000")],
        &[],
    );
    let dcs = datacenters(&d, None);
    let big = json!({ "blob": "m".repeat(15 * 1024) });
    let body = rivetkit_body(&dcs, "https://app.example/api/rivet", big);
    let (status, _, _) = call(
        &d,
        "PUT",
        "/runner-configs/kept?namespace=default",
        None,
        &body,
    );
    assert_eq!(status, 200);
    let filler = fill(&fs.0);
    // Configs of 16 KiB until a commit fails (redb may still have free pages at first).
    let mut refused = None;
    for i in 0..1000 {
        let path = format!("/runner-configs/full-{i}?namespace=default");
        let (status, err, v) = call(&d, "PUT", &path, None, &body);
        if status == 503 {
            assert_eq!(err.as_deref(), Some("store.unavailable"), "{v}");
            refused = Some(i);
            break;
        }
        assert_eq!(status, 200, "{v}");
    }
    let refused = refused.expect("a full disk must refuse a change");
    // Known down: the next change is refused before the engine sees it.
    let (status, err, _) = call(
        &d,
        "DELETE",
        "/runner-configs/kept?namespace=default",
        None,
        &Value::Null,
    );
    assert_eq!((status, err.as_deref()), (503, Some("store.unavailable")));
    std::fs::remove_file(&filler).unwrap();
    let (status, _, v) = call(
        &d,
        "PUT",
        "/runner-configs/after?namespace=default",
        None,
        &body,
    );
    assert_eq!(status, 200, "{v}");
    let d = d.kill_and_restart(1, &[]);
    let v = list(&d, None);
    let names = v["runner_configs"].as_object().unwrap();
    assert!(
        names.contains_key("kept") && names.contains_key("after"),
        "{:?}",
        names.keys()
    );
    for i in 0..refused {
        assert!(
            names.contains_key(&format!("full-{i}")),
            "acknowledged full-{i} lost"
        );
    }
    drop(d);
    drop(fs);
}
