//! The answer of a rivetkit app's `GET {url}/metadata`, parsed into a typed value.
//!
//! rivetkit 2.2.1 (`handleMetadataRequest`) answers JSON:
//! `{runtime: "rivetkit", version, runner: {kind: {serverless: {}}, version?},
//! actorNames: {name: {metadata: {icon?, name?}}}, clientEndpoint?, clientNamespace?,
//! clientToken?}`. As the Rivet engine (`pegboard/src/ops/serverless_metadata/fetch.rs`),
//! torpor requires `runtime == "rivetkit"` and a non-empty `version`, and reads
//! `runner.version` as a u32. Unknown fields are ignored. `clientToken` (a secret of the
//! app) is deliberately not kept. An actor name whose `metadata` is not an object keeps its
//! name with empty metadata (the engine drops such names). The body's size is bounded by the
//! shell before it gets here.
//!
//! Sans-IO.

use serde::Deserialize;
use std::collections::BTreeMap;

/// What matters of an app's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct RunnerMetadata {
    /// Always `rivetkit`.
    pub runtime: String,
    /// The rivetkit version (trimmed).
    pub version: String,
    /// The runner kind rivetkit reports (`serverless` from its serverless router).
    pub runner_kind: Option<String>,
    /// The app's runner version (rivetkit's `runner.version`, for drains on deploy).
    pub runner_version: Option<u32>,
    /// The actors the app defines, sorted by name.
    pub actor_names: Vec<ActorName>,
    /// Where the app's own clients connect, if it says.
    pub client_endpoint: Option<String>,
    pub client_namespace: Option<String>,
}

/// One actor name and its metadata (`icon`, `name`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct ActorName {
    pub name: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// Why a metadata answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata is not valid JSON of the expected shape: {0}")]
    Json(String),
    #[error("metadata names runtime {runtime:?} version {version:?}, not rivetkit")]
    Runtime { runtime: String, version: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    runtime: String,
    version: String,
    #[serde(default)]
    runner: Option<RawRunner>,
    #[serde(default)]
    actor_names: BTreeMap<String, RawActorName>,
    #[serde(default)]
    client_endpoint: Option<String>,
    #[serde(default)]
    client_namespace: Option<String>,
}

#[derive(Deserialize)]
struct RawRunner {
    #[serde(default)]
    kind: Option<serde_json::Value>,
    #[serde(default)]
    version: Option<u32>,
}

#[derive(Deserialize)]
struct RawActorName {
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

/// Parse a metadata body.
pub fn parse_metadata(body: &[u8]) -> Result<RunnerMetadata, MetadataError> {
    let raw: Raw = serde_json::from_slice(body).map_err(|e| MetadataError::Json(e.to_string()))?;
    let version = raw.version.trim();
    if raw.runtime != "rivetkit" || version.is_empty() {
        return Err(MetadataError::Runtime {
            runtime: raw.runtime,
            version: raw.version,
        });
    }
    let (runner_kind, runner_version) = match raw.runner {
        Some(r) => {
            let kind = match r.kind {
                Some(serde_json::Value::Object(m)) => m.keys().next().cloned(),
                Some(serde_json::Value::String(s)) => Some(s),
                _ => None,
            };
            (kind, r.version)
        }
        None => (None, None),
    };
    let actor_names = raw
        .actor_names
        .into_iter()
        .map(|(name, a)| ActorName {
            name,
            metadata: match a.metadata {
                Some(serde_json::Value::Object(m)) => m,
                _ => serde_json::Map::new(),
            },
        })
        .collect();
    Ok(RunnerMetadata {
        runtime: raw.runtime,
        version: version.to_owned(),
        runner_kind,
        runner_version,
        actor_names,
        client_endpoint: raw.client_endpoint,
        client_namespace: raw.client_namespace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape rivetkit 2.2.1 answers (`handleMetadataRequest` with `buildActorNames`).
    pub(crate) const RIVETKIT_METADATA: &str = r#"{"runtime":"rivetkit","version":"2.2.1","runner":{"kind":{"serverless":{}},"version":3},"actorNames":{"counter":{"metadata":{"icon":"calculator","name":"Counter"}},"chat":{"metadata":{}}},"clientEndpoint":"https://api.example","clientNamespace":"default","clientToken":"app-secret"}"#;

    #[test]
    fn parses_rivetkit_answer() {
        let m = parse_metadata(RIVETKIT_METADATA.as_bytes()).unwrap();
        assert_eq!(m.runtime, "rivetkit");
        assert_eq!(m.version, "2.2.1");
        assert_eq!(m.runner_kind.as_deref(), Some("serverless"));
        assert_eq!(m.runner_version, Some(3));
        let names: Vec<&str> = m.actor_names.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["chat", "counter"]);
        assert_eq!(m.actor_names[1].metadata["icon"], "calculator");
        assert_eq!(m.client_endpoint.as_deref(), Some("https://api.example"));
        assert!(!format!("{m:?}").contains("app-secret"));
    }

    #[test]
    fn minimal_and_refused_answers() {
        let m = parse_metadata(br#"{"runtime":"rivetkit","version":" 2.2.1 ","runner":{"kind":{"serverless":{}}},"actorNames":{"a":{}}}"#).unwrap();
        assert_eq!(m.version, "2.2.1");
        assert_eq!(m.runner_version, None);
        assert!(m.actor_names[0].metadata.is_empty());

        assert!(matches!(
            parse_metadata(br#"{"runtime":"other","version":"1"}"#),
            Err(MetadataError::Runtime { .. })
        ));
        assert!(matches!(
            parse_metadata(br#"{"runtime":"rivetkit","version":""}"#),
            Err(MetadataError::Runtime { .. })
        ));
        assert!(matches!(parse_metadata(b"{"), Err(MetadataError::Json(_))));
        assert!(matches!(
            parse_metadata(br#"{"runtime":"rivetkit","version":"1","runner":{"version":-1}}"#),
            Err(MetadataError::Json(_))
        ));
    }
}
