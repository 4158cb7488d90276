//! The headers of a `/start` request, built from typed inputs.
//!
//! As the Rivet engine sends them (`pegboard/src/workflows/serverless/conn.rs`): the pool's
//! configured headers, then `x-rivet-endpoint` (where the runner connects back),
//! `x-rivet-total-slots`, `x-rivet-runner-name`, `x-rivet-namespace-name`, the deprecated
//! `x-rivet-namespace-id` (which the engine fills with the namespace *name*, and rivetkit
//! 2.2.1 no longer reads), and `x-rivet-token` when torpor has an admin token.
//!
//! A configured header never overrides or doubles one of these: every configured header
//! named `x-rivet-*` (any case) is dropped, as are the message-framing headers
//! (`content-length`, `transfer-encoding`, `connection`, `keep-alive`, `upgrade`, `te`,
//! `trailer`), which would corrupt the request. (The engine appends its own after the
//! configured ones, so a configured `x-rivet-endpoint` would reach the app twice, which
//! rivetkit reads as one comma-joined value.) The runner-config layer can refuse such names
//! up front with [`is_dropped_header`].
//!
//! Sans-IO.

/// A header list whose `Debug` hides the values of `x-rivet-token` and `authorization`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for (name, value) in &self.0 {
            let secret = name.eq_ignore_ascii_case("x-rivet-token")
                || name.eq_ignore_ascii_case("authorization");
            list.entry(&(name, if secret { "<redacted>" } else { value }));
        }
        list.finish()
    }
}

impl Headers {
    /// The value of the first header named `name` (any case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What torpor tells the app about the runner to start.
#[derive(Clone, PartialEq, Eq)]
pub struct StartHeaders<'a> {
    /// torpor's public URL, where the runner connects (`x-rivet-endpoint`).
    pub endpoint: &'a str,
    /// The pool's slots per runner (`x-rivet-total-slots`; rivetkit wants an integer ≥ 1).
    pub total_slots: u32,
    /// The runner (pool) name.
    pub runner_name: &'a str,
    /// The namespace's name.
    pub namespace_name: &'a str,
    /// torpor's admin token, when authentication is on (`x-rivet-token`).
    pub token: Option<&'a str>,
}

const FRAMING: [&str; 7] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
];

/// Whether a configured header named `name` is dropped by [`start_headers`].
pub fn is_dropped_header(name: &str) -> bool {
    let name = name.trim();
    let reserved = name
        .get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("x-rivet-"));
    reserved || FRAMING.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The `/start` request's headers: the configured ones (minus those [`is_dropped_header`]
/// names), then torpor's.
pub fn start_headers(configured: &Headers, start: &StartHeaders<'_>) -> Headers {
    let mut out: Vec<(String, String)> = configured
        .0
        .iter()
        .filter(|(name, _)| !is_dropped_header(name))
        .cloned()
        .collect();
    let own = [
        ("x-rivet-endpoint", start.endpoint.to_owned()),
        ("x-rivet-total-slots", start.total_slots.to_string()),
        ("x-rivet-runner-name", start.runner_name.to_owned()),
        ("x-rivet-namespace-name", start.namespace_name.to_owned()),
        ("x-rivet-namespace-id", start.namespace_name.to_owned()),
    ];
    out.extend(own.into_iter().map(|(n, v)| (n.to_owned(), v)));
    if let Some(token) = start.token {
        out.push(("x-rivet-token".to_owned(), token.to_owned()));
    }
    Headers(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(token: Option<&str>) -> StartHeaders<'_> {
        StartHeaders {
            endpoint: "https://torpor.example:6420",
            total_slots: 5,
            runner_name: "default",
            namespace_name: "ns",
            token,
        }
    }

    #[test]
    fn headers_in_order_and_configured_ones_cannot_override() {
        let configured = Headers(vec![
            ("authorization".into(), "Bearer app".into()),
            ("X-Rivet-Endpoint".into(), "https://evil.example".into()),
            ("x-rivet-token".into(), "forged".into()),
            ("Content-Length".into(), "5".into()),
            ("x-custom".into(), "1".into()),
        ]);
        let h = start_headers(&configured, &start(Some("secret")));
        let names: Vec<&str> = h.0.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "authorization",
                "x-custom",
                "x-rivet-endpoint",
                "x-rivet-total-slots",
                "x-rivet-runner-name",
                "x-rivet-namespace-name",
                "x-rivet-namespace-id",
                "x-rivet-token",
            ]
        );
        assert_eq!(
            h.get("x-rivet-endpoint"),
            Some("https://torpor.example:6420")
        );
        assert_eq!(h.get("x-rivet-total-slots"), Some("5"));
        assert_eq!(h.get("x-rivet-namespace-id"), Some("ns"));
        assert_eq!(h.get("x-rivet-token"), Some("secret"));
        let debug = format!("{h:?}");
        assert!(
            !debug.contains("secret") && !debug.contains("Bearer app"),
            "{debug}"
        );
    }

    #[test]
    fn no_token_without_authentication() {
        let h = start_headers(&Headers::default(), &start(None));
        assert_eq!(h.get("x-rivet-token"), None);
        assert_eq!(h.0.len(), 5);
    }

    #[test]
    fn dropped_names() {
        assert!(is_dropped_header("x-rivet-anything"));
        assert!(is_dropped_header("X-RIVET-TOKEN"));
        assert!(is_dropped_header("transfer-encoding"));
        assert!(!is_dropped_header("x-rivet"));
        assert!(!is_dropped_header("x-custom"));
        assert!(!is_dropped_header("é"));
    }
}
