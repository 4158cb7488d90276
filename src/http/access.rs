//! Who may call what, decided from a request head and the peer's address (sans-IO):
//!
//! * **The admin token** (`auth.admin_token`), as the Rivet engine takes it: the engine API
//!   as `Authorization: Bearer <token>`, runners as the `rivet_token.<token>` WebSocket
//!   subprotocol (or an `x-rivet-token` header). Compared in constant time; never logged.
//! * **Protected mode** (no token configured, as Redis has it): the engine API and runner
//!   connections are accepted from loopback peers only.
//! * **CORS.** The engine API answers preflights and sets `access-control-allow-*` for allowed
//!   origins, and refuses a request whose `Origin` is not allowed (a browser sends some
//!   cross-origin requests without a preflight, so response headers alone would not stop a
//!   page from changing state). Gateway routes answer every `OPTIONS` themselves, as the
//!   Rivet engine's gateway does: a preflight never reaches (or wakes) an actor.
//!
//! Client traffic to actors (`/gateway/…`) is never authenticated here: actors authenticate
//! their own clients. What this must never do: allocate per-connection state before a
//! refusal, or let a token reach a log line or an error body.

use super::parse::RequestHead;
use super::response::Response;
use crate::config::Config;
use std::net::{IpAddr, SocketAddr};

/// Which origins may call the engine API from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    Any,
    /// `http(s)://localhost`, `127.0.0.0/8` and `[::1]`, any port.
    Loopback,
    /// Exact origins.
    List(Vec<String>),
}

/// The access policy of a running daemon.
#[derive(Clone)]
pub struct Access {
    token: Option<String>,
    origins: Origins,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// A token is configured and the request did not carry it (or carried another).
    Token,
    /// No token is configured and the peer is not on loopback.
    NotLoopback,
    /// The request's `Origin` is not allowed to call the API.
    Origin,
}

impl Denied {
    /// The `{group}.{code}` of the refusal for an API call or a runner connection.
    pub fn code(self, runner: bool) -> &'static str {
        match (self, runner) {
            (Denied::Origin, _) => "api.forbidden_origin",
            (_, true) => "runner.unauthorized",
            (_, false) => "api.unauthorized",
        }
    }

    /// The HTTP refusal (401, or 403 for an origin), with `x-rivet-error`.
    pub fn response(self, runner: bool) -> Response {
        let (status, msg) = match (self, runner) {
            (Denied::Token, false) => (
                401,
                "this call needs the admin token: send `Authorization: Bearer <auth.admin_token>`",
            ),
            (Denied::Token, true) => (
                401,
                "runners must offer the admin token as the `rivet_token.<auth.admin_token>` subprotocol",
            ),
            (Denied::NotLoopback, _) => (
                401,
                "protected mode: no auth.admin_token is configured, so the engine API and runners are accepted from loopback only; set auth.admin_token (TORPOR_AUTH__ADMIN_TOKEN) to accept other peers",
            ),
            (Denied::Origin, _) => (
                403,
                "this origin may not call the engine API (cors.allowed_origins)",
            ),
        };
        Response::error(status, self.code(runner), msg)
    }
}

/// Routes of the listener that anyone may call: liveness, readiness, and the discovery
/// answers rivetkit reads before it has credentials (the Rivet engine does not authenticate
/// `/metadata` either).
pub fn is_public_route(path: &str) -> bool {
    matches!(
        path.trim_end_matches('/'),
        "/livez" | "/readyz" | "/health" | "/metadata"
    )
}

/// Constant-time equality (length is not secret).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `peer` is this host: 127.0.0.0/8, `::1`, or either mapped into IPv6.
pub fn is_loopback(peer: IpAddr) -> bool {
    peer.to_canonical().is_loopback()
}

/// The host part of an origin (`scheme://host[:port]`), without brackets.
fn origin_host(origin: &str) -> Option<&str> {
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))?;
    if let Some(v6) = rest.strip_prefix('[') {
        return v6.split_once(']').map(|(h, _)| h);
    }
    Some(rest.split(':').next().unwrap_or(rest))
}

impl Access {
    pub fn new(token: Option<&str>, allowed_origins: &[String]) -> Access {
        let origins = if allowed_origins.iter().any(|o| o == "*") {
            Origins::Any
        } else if !allowed_origins.is_empty() {
            Origins::List(allowed_origins.to_vec())
        } else if token.is_some() {
            Origins::Any
        } else {
            Origins::Loopback
        };
        Access {
            token: token.map(str::to_string),
            origins,
        }
    }

    pub fn from_config(cfg: &Config) -> Access {
        Access::new(cfg.admin_token(), &cfg.cors.allowed_origins)
    }

    /// True when no token is configured (API and runners from loopback only).
    pub fn protected_mode(&self) -> bool {
        self.token.is_none()
    }

    pub fn origins(&self) -> &Origins {
        &self.origins
    }

    fn token_ok(&self, offered: impl IntoIterator<Item = impl AsRef<str>>) -> bool {
        let Some(token) = &self.token else {
            return false;
        };
        // Every offer is compared, so the time taken does not say which one matched.
        offered.into_iter().fold(false, |ok, t| {
            ct_eq(t.as_ref().as_bytes(), token.as_bytes()) | ok
        })
    }

    /// Token or loopback, for whatever the request offers.
    fn authorize(
        &self,
        peer: SocketAddr,
        offered: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> Result<(), Denied> {
        match &self.token {
            None if is_loopback(peer.ip()) => Ok(()),
            None => Err(Denied::NotLoopback),
            Some(_) if self.token_ok(offered) => Ok(()),
            Some(_) => Err(Denied::Token),
        }
    }

    /// An engine API call (`/actors…`, `/metrics`, …): the bearer token (or loopback in
    /// protected mode), and an allowed `Origin` when a browser sends one.
    pub fn check_api(&self, head: &RequestHead, peer: SocketAddr) -> Result<(), Denied> {
        let bearer = head.header_values("authorization").filter_map(|v| {
            let (scheme, cred) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| cred.trim())
        });
        self.authorize(peer, bearer)?;
        match head.header("origin") {
            Some(o) if !self.origin_allowed(o) => Err(Denied::Origin),
            _ => Ok(()),
        }
    }

    /// A runner connection: `rivet_token.<token>` among the offered subprotocols (what
    /// `@rivetkit/engine-runner` sends) or an `x-rivet-token` header (the Rivet engine takes
    /// either), or loopback in protected mode.
    pub fn check_runner(&self, head: &RequestHead, peer: SocketAddr) -> Result<(), Denied> {
        let offered = crate::ws::handshake::offered_protocols(head)
            .filter_map(|p| p.strip_prefix("rivet_token."))
            .chain(head.header_values("x-rivet-token").map(str::trim));
        self.authorize(peer, offered)
    }

    pub fn origin_allowed(&self, origin: &str) -> bool {
        match &self.origins {
            Origins::Any => true,
            Origins::Loopback => origin_host(origin).is_some_and(|h| {
                h.eq_ignore_ascii_case("localhost")
                    || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }),
            Origins::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }

    /// The CORS headers of an engine API answer to a request from an allowed `Origin`.
    pub fn api_cors(&self, head: &RequestHead, resp: &mut Response) {
        if let Some(origin) = head.header("origin").filter(|o| self.origin_allowed(o)) {
            cors_headers(resp, origin);
        }
    }

    /// The answer to an `OPTIONS` preflight of an engine API route. Preflights carry no
    /// credentials, so they are answered without the token; the request that follows is
    /// checked as usual.
    pub fn api_preflight(&self, head: &RequestHead) -> Response {
        match head.header("origin") {
            Some(o) if self.origin_allowed(o) => preflight(head, o),
            Some(_) => Denied::Origin.response(false),
            None => Response::new(204),
        }
    }
}

/// `access-control-allow-*` for a simple or actual request from `origin` (mirrored, with
/// credentials, all response headers readable), as the Rivet engine answers.
fn cors_headers(resp: &mut Response, origin: &str) {
    resp.headers.retain(|(k, _)| {
        !k.to_ascii_lowercase().starts_with("access-control-") && !k.eq_ignore_ascii_case("vary")
    });
    resp.headers
        .push(("access-control-allow-origin".into(), origin.into()));
    resp.headers
        .push(("access-control-allow-credentials".into(), "true".into()));
    resp.headers
        .push(("access-control-expose-headers".into(), "*".into()));
    if origin != "*" {
        resp.headers.push(("vary".into(), "Origin".into()));
    }
}

/// A 204 preflight answer for `origin`: the methods the routes take, the headers the page
/// asked for, cached for a day.
fn preflight(head: &RequestHead, origin: &str) -> Response {
    let mut r = Response::new(204);
    cors_headers(&mut r, origin);
    r.headers.push((
        "access-control-allow-methods".into(),
        "GET, POST, PUT, DELETE, OPTIONS, PATCH".into(),
    ));
    let asked = head
        .headers_joined("access-control-request-headers")
        .unwrap_or_else(|| "*".into());
    r.headers
        .push(("access-control-allow-headers".into(), asked));
    r.headers
        .push(("access-control-max-age".into(), "86400".into()));
    r
}

/// The gateway's answer to any `OPTIONS` for an actor route: a permissive preflight, never
/// tunnelled (actors authenticate their clients on the request that follows).
pub fn gateway_preflight(head: &RequestHead) -> Response {
    preflight(head, head.header("origin").unwrap_or("*"))
}

/// CORS headers on an actor's answer (or the gateway's error) to a browser request.
pub fn gateway_cors(head: &RequestHead, resp: &mut Response) {
    cors_headers(resp, head.header("origin").unwrap_or("*"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: method.into(),
            path: "/actors".into(),
            version_minor: 1,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const LOCAL: &str = "127.0.0.1:5000";
    const REMOTE: &str = "10.1.2.3:5000";

    #[test]
    fn protected_mode_is_loopback_only() {
        let a = Access::new(None, &[]);
        assert!(a.protected_mode());
        let h = head("GET", &[]);
        assert_eq!(a.check_api(&h, peer(LOCAL)), Ok(()));
        assert_eq!(a.check_api(&h, peer("[::1]:1")), Ok(()));
        assert_eq!(a.check_api(&h, peer("[::ffff:127.0.0.1]:1")), Ok(()));
        assert_eq!(a.check_api(&h, peer(REMOTE)), Err(Denied::NotLoopback));
        assert_eq!(a.check_runner(&h, peer(REMOTE)), Err(Denied::NotLoopback));
        let r = Denied::NotLoopback.response(false);
        assert_eq!(r.status, 401);
        assert!(std::str::from_utf8(&r.body)
            .unwrap()
            .contains("auth.admin_token"));
    }

    #[test]
    fn the_token_is_required_from_every_peer() {
        let a = Access::new(Some("s3cret"), &[]);
        let ok = head("GET", &[("authorization", "Bearer s3cret")]);
        let lower = head("GET", &[("Authorization", "bearer  s3cret ")]);
        let wrong = head("GET", &[("authorization", "Bearer s3cre7")]);
        let none = head("GET", &[]);
        for p in [LOCAL, REMOTE] {
            assert_eq!(a.check_api(&ok, peer(p)), Ok(()));
            assert_eq!(a.check_api(&lower, peer(p)), Ok(()));
            assert_eq!(a.check_api(&wrong, peer(p)), Err(Denied::Token));
            assert_eq!(a.check_api(&none, peer(p)), Err(Denied::Token));
        }
        let r = Denied::Token.response(false);
        assert_eq!(r.header("x-rivet-error"), Some("api.unauthorized"));
        assert!(!std::str::from_utf8(&r.body).unwrap().contains("s3cret"));
    }

    #[test]
    fn runners_offer_the_token_as_a_subprotocol_or_header() {
        let a = Access::new(Some("s3cret"), &[]);
        let sub = head(
            "GET",
            &[("sec-websocket-protocol", "rivet, rivet_token.s3cret")],
        );
        let hdr = head("GET", &[("x-rivet-token", "s3cret")]);
        let wrong = head(
            "GET",
            &[("sec-websocket-protocol", "rivet, rivet_token.nope")],
        );
        let bearer_only = head("GET", &[("authorization", "Bearer s3cret")]);
        assert_eq!(a.check_runner(&sub, peer(REMOTE)), Ok(()));
        assert_eq!(a.check_runner(&hdr, peer(REMOTE)), Ok(()));
        assert_eq!(a.check_runner(&wrong, peer(LOCAL)), Err(Denied::Token));
        assert_eq!(
            a.check_runner(&bearer_only, peer(LOCAL)),
            Err(Denied::Token)
        );
        assert_eq!(
            Denied::Token.response(true).header("x-rivet-error"),
            Some("runner.unauthorized")
        );
    }

    #[test]
    fn origins_default_by_mode() {
        let open = Access::new(Some("t"), &[]);
        assert_eq!(open.origins(), &Origins::Any);
        let local = Access::new(None, &[]);
        assert_eq!(local.origins(), &Origins::Loopback);
        for o in [
            "http://localhost:3000",
            "http://127.0.0.1",
            "https://127.3.4.5:8443",
            "http://[::1]:5173",
        ] {
            assert!(local.origin_allowed(o), "{o}");
        }
        for o in [
            "http://evil.example",
            "http://localhost.evil.example",
            "null",
            "http://10.0.0.1",
        ] {
            assert!(!local.origin_allowed(o), "{o}");
        }
        let list = Access::new(None, &["https://app.example".to_string()]);
        assert!(list.origin_allowed("https://app.example"));
        assert!(!list.origin_allowed("http://localhost:3000"));
    }

    #[test]
    fn a_disallowed_origin_cannot_change_state_in_protected_mode() {
        let a = Access::new(None, &[]);
        let h = head("POST", &[("origin", "http://evil.example")]);
        assert_eq!(a.check_api(&h, peer(LOCAL)), Err(Denied::Origin));
        let r = a.api_preflight(&h);
        assert_eq!(r.status, 403);
        let h = head(
            "OPTIONS",
            &[
                ("origin", "http://localhost:3000"),
                ("access-control-request-headers", "content-type, x-a"),
            ],
        );
        let r = a.api_preflight(&h);
        assert_eq!(r.status, 204);
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("http://localhost:3000")
        );
        assert_eq!(
            r.header("access-control-allow-headers"),
            Some("content-type, x-a")
        );
        let mut resp = Response::json(200, "{}");
        a.api_cors(&h, &mut resp);
        assert_eq!(resp.header("vary"), Some("Origin"));
        assert_eq!(
            resp.header("access-control-allow-credentials"),
            Some("true")
        );
    }

    #[test]
    fn gateway_preflights_mirror_the_origin() {
        let h = head("OPTIONS", &[("origin", "https://site.example")]);
        let r = gateway_preflight(&h);
        assert_eq!(r.status, 204);
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://site.example")
        );
        assert_eq!(r.header("access-control-allow-headers"), Some("*"));
        let mut resp = Response::json(200, "{}");
        resp.headers
            .push(("Access-Control-Allow-Origin".into(), "x".into()));
        gateway_cors(&h, &mut resp);
        let n = resp
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("access-control-allow-origin"))
            .count();
        assert_eq!(n, 1);
    }

    #[test]
    fn public_routes() {
        for p in ["/livez", "/readyz", "/health", "/metadata", "/metadata/"] {
            assert!(is_public_route(p), "{p}");
        }
        for p in [
            "/metrics",
            "/actors",
            "/actors/names",
            "/datacenters",
            "/runner-configs",
            "/runner-configs/default",
            "/",
        ] {
            assert!(!is_public_route(p), "{p}");
        }
    }
}
