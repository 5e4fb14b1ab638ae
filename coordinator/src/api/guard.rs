//! The API's door: which scope each request needs, who the caller is, and the audit
//! entry each write leaves.
//!
//! One table, [`route_rule`], decides from the method and path alone what a request
//! needs: the [`Scope`] (none for open reads), the largest body, and whether it is
//! audited. It is applied twice with the same answer: by [`admit`], the gate of the
//! API's front ([`crate::http_front`]), from the head before any body byte is read; and
//! by [`guard`], the router's middleware, which also puts the [`Caller`] in the
//! request's extensions and forms the [`crate::audit::Entry`] of every audited request
//! from what was asked (its JSON body, credentials blanked, never a bundle) and what
//! came of it (its status and JSON answer). A refusal is audited too; refused reads at
//! most once per source and path every [`REFUSED_READ_EVERY_MS`], so a dashboard
//! left open without its token does not flood the log.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use daemon::sync::Recover;
use serde_json::Value;

use super::{error, ApiState, MAX_BUNDLE_BODY, MAX_SMALL_BODY, MAX_WARM_PULL_BODY};
use crate::audit::Event;
use crate::http_front::Peer;
use crate::tokens::{Caller, Refusal, Scope};

/// What a request needs before its body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RouteRule {
    /// `None`: open to anyone.
    pub scope: Option<Scope>,
    pub max_body: usize,
    /// Its entry in the audit log: the action's name.
    pub audit: Option<&'static str>,
}

/// Refused reads are audited at most once per source and path this often.
pub const REFUSED_READ_EVERY_MS: u64 = 10_000;

/// The whole table.
pub(super) fn route_rule(method: &str, target: &str, read_requires_token: bool) -> RouteRule {
    let path = target.split('?').next().unwrap_or_default();
    let read = matches!(method, "GET" | "HEAD");
    // The page and its library hold no data; `/healthz` is for load balancers. (The
    // router matches paths as sent, without resolving dot segments; refuse them anyway.)
    let open =
        matches!(path, "/healthz" | "/") || (path.starts_with("/assets/") && !path.contains(".."));
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (scope, audit) = if read {
        match segments.as_slice() {
            // Stored bundles may hold credentials (basic auth in `waf.toml`).
            ["api", "v1", "config", "versions", _] => (Some(Scope::Config), Some("config.read")),
            // Who did what from where is not for anyone who reaches the port.
            ["api", "v1", "audit"] => (Some(Scope::Read), None),
            _ if read_requires_token && !open => (Some(Scope::Read), None),
            _ => (None, None),
        }
    } else {
        let (scope, audit) = match (method, segments.as_slice()) {
            ("POST", ["api", "v1", "purges"]) => (Scope::Purge, Some("purge")),
            ("POST", ["api", "v1", "config"]) => (Scope::Config, Some("config.push")),
            ("POST", ["api", "v1", "config", "rollback"]) => {
                (Scope::Config, Some("config.rollback"))
            }
            ("POST", ["api", "v1", "warm", "jobs"]) => (Scope::Warm, Some("warm.start")),
            ("POST", ["api", "v1", "warm", "jobs", _, "cancel"]) => {
                (Scope::Warm, Some("warm.cancel"))
            }
            ("POST", ["api", "v1", "regions", _, "drain"]) => (Scope::Admin, Some("region.drain")),
            ("DELETE", ["api", "v1", "regions", _, "drain"]) => {
                (Scope::Admin, Some("region.undrain"))
            }
            ("POST", ["api", "v1", "silences"]) => (Scope::Admin, Some("silence.add")),
            ("DELETE", ["api", "v1", "silences", _]) => (Scope::Admin, Some("silence.remove")),
            ("POST", ["api", "v1", "backup"]) => (Scope::Admin, Some("backup")),
            // The coordinators' own calls to each other, every second: not an
            // operator's action.
            ("POST", ["api", "v1", "cluster", "warm"]) => (Scope::Admin, None),
            _ => (Scope::Admin, Some("other")),
        };
        (Some(scope), audit)
    };
    RouteRule {
        scope,
        audit,
        max_body: match (read, path) {
            (true, _) => 0,
            (false, "/api/v1/config") => MAX_BUNDLE_BODY,
            (false, "/api/v1/cluster/warm") => MAX_WARM_PULL_BODY,
            (false, _) => MAX_SMALL_BODY,
        },
    }
}

/// The API front's [`crate::http_front::Gate`]: decides from the head alone, before any
/// body byte is read. The answer is the largest body the route takes.
#[allow(clippy::result_large_err)] // the same shape as `authorize`
pub fn admit(
    s: &ApiState,
    head: &crate::http_head::Head,
    peer: std::net::SocketAddr,
) -> Result<usize, Response> {
    let rule = route_rule(&head.method, &head.path, s.read_requires_token);
    if let Some(scope) = rule.scope {
        let given = head
            .single("authorization")
            .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
        if let Err(refusal) = s.tokens.check(given, scope) {
            refused(s, &head.method, &head.path, peer, &refusal, rule.audit);
            return Err(refusal_answer(&refusal));
        }
    }
    Ok(rule.max_body)
}

fn refusal_answer(r: &Refusal) -> Response {
    let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::UNAUTHORIZED);
    error(status, r.to_string())
}

/// The caller of a request that needed `scope`, from its headers (the handlers that
/// need more than their route does, e.g. `?detail=full`).
#[allow(clippy::result_large_err)]
pub(super) fn authorize(
    s: &ApiState,
    headers: &HeaderMap,
    scope: Scope,
) -> Result<Caller, Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .map(axum::http::HeaderValue::as_bytes);
    s.tokens.check(given, scope).map_err(|r| refusal_answer(&r))
}

/// Records a refused request (reads: at most once per source and path every
/// [`REFUSED_READ_EVERY_MS`]).
fn refused(
    s: &ApiState,
    method: &str,
    target: &str,
    peer: std::net::SocketAddr,
    refusal: &Refusal,
    action: Option<&'static str>,
) {
    let path = target.split('?').next().unwrap_or_default();
    if matches!(method, "GET" | "HEAD") && !first_refusal(peer.ip(), path) {
        return;
    }
    s.state.audit.record(Event {
        token: refusal.name().map(str::to_owned),
        source: peer.ip().to_string(),
        action: action.unwrap_or("read").to_owned(),
        method: method.to_owned(),
        path: path.to_owned(),
        asked: None,
        status: refusal.status(),
        result: Some(serde_json::json!({ "error": refusal.to_string() })),
    });
}

/// Whether this (source, path) had no refused read audited in the last
/// [`REFUSED_READ_EVERY_MS`].
fn first_refusal(ip: std::net::IpAddr, path: &str) -> bool {
    static LAST: Mutex<Option<HashMap<(std::net::IpAddr, String), u64>>> = Mutex::new(None);
    let now = crate::clock::now_ms();
    let mut last = LAST.locked();
    let map = last.get_or_insert_with(HashMap::new);
    if map.len() > 4096 {
        map.retain(|_, at| now.saturating_sub(*at) < REFUSED_READ_EVERY_MS);
    }
    match map.get(&(ip, path.to_owned())) {
        Some(at) if now.saturating_sub(*at) < REFUSED_READ_EVERY_MS => false,
        _ => {
            map.insert((ip, path.to_owned()), now);
            true
        }
    }
}

/// The largest answer kept in an audit entry; a longer one is noted by its size.
const ANSWER_KEPT: usize = 16 * 1024;

/// [`route_rule`] again, on the request axum routes (one rule however the router is
/// served), and the audit entry of every audited request.
pub(super) async fn guard(
    State(s): State<ApiState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().as_str().to_owned();
    let target = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let peer = request
        .extensions()
        .get::<Peer>()
        .map(|p| p.0)
        .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let rule = route_rule(&method, &target, s.read_requires_token);
    let mut caller = None;
    if let Some(scope) = rule.scope {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(axum::http::HeaderValue::as_bytes);
        match s.tokens.check(given, scope) {
            Ok(c) => caller = Some(c),
            Err(refusal) => {
                refused(&s, &method, &target, peer, &refusal, rule.audit);
                return refusal_answer(&refusal);
            }
        }
    }
    if let Some(c) = &caller {
        request.extensions_mut().insert(c.clone());
    }
    let Some(action) = rule.audit else {
        return next.run(request).await;
    };
    let path = target.split('?').next().unwrap_or_default().to_owned();
    // The body was read whole by the front already; a bundle is never kept.
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BUNDLE_BODY)
        .await
        .unwrap_or_default();
    let asked = if path == "/api/v1/config" {
        None
    } else {
        crate::audit::redacted(&body)
    };
    let asked = match (asked, parts.uri.query()) {
        (a, None) => a,
        (None, Some(q)) => Some(serde_json::json!({ "query": q })),
        (Some(mut a), Some(q)) => {
            if let Some(map) = a.as_object_mut() {
                map.insert("query".into(), Value::String(q.to_owned()));
            }
            Some(a)
        }
    };
    let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(body));
    let answer = next.run(request).await;
    let status = answer.status().as_u16();
    let json = answer
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    // A read's answer is what was read (a stored bundle: its files, credentials and
    // all): only an error of it is kept. A write's answer is kept, credentials blanked.
    let keep = json && (!matches!(method.as_str(), "GET" | "HEAD") || status >= 400);
    let (answer, result) = if keep {
        let (parts, body) = answer.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let result = if bytes.len() <= ANSWER_KEPT {
            crate::audit::redacted(&bytes)
        } else {
            Some(serde_json::json!({ "bytes": bytes.len() }))
        };
        (
            Response::from_parts(parts, axum::body::Body::from(bytes)),
            result,
        )
    } else {
        (answer, None)
    };
    s.state.audit.record(Event {
        token: caller.map(|c| c.name.to_string()),
        source: peer.ip().to_string(),
        action: action.to_owned(),
        method,
        path,
        asked,
        status,
        result,
    });
    answer.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_rules_decide_scope_body_and_audit_from_the_head() {
        let rule = |m, p, strict| route_rule(m, p, strict);
        let r = |scope, max_body, audit| RouteRule {
            scope,
            max_body,
            audit,
        };
        use Scope::*;
        assert_eq!(
            rule("POST", "/api/v1/config?canary=false", false),
            r(Some(Config), MAX_BUNDLE_BODY, Some("config.push"))
        );
        assert_eq!(
            rule("POST", "/api/v1/purges", false),
            r(Some(Purge), MAX_SMALL_BODY, Some("purge"))
        );
        assert_eq!(
            rule("POST", "/api/v1/warm/jobs", false),
            r(Some(Warm), MAX_SMALL_BODY, Some("warm.start"))
        );
        assert_eq!(
            rule("POST", "/api/v1/warm/jobs/7/cancel", false),
            r(Some(Warm), MAX_SMALL_BODY, Some("warm.cancel"))
        );
        assert_eq!(
            rule("POST", "/api/v1/config/rollback", false),
            r(Some(Config), MAX_SMALL_BODY, Some("config.rollback"))
        );
        assert_eq!(
            rule("POST", "/api/v1/cluster/warm", false),
            r(Some(Admin), MAX_WARM_PULL_BODY, None)
        );
        assert_eq!(
            rule("DELETE", "/api/v1/regions/eu/drain", false),
            r(Some(Admin), MAX_SMALL_BODY, Some("region.undrain"))
        );
        assert_eq!(
            rule("DELETE", "/api/v1/purges/1", false),
            r(Some(Admin), MAX_SMALL_BODY, Some("other"))
        );
        // Reads: no body; a scope only for a bundle's files, the audit log, or when
        // reads require a token.
        assert_eq!(rule("GET", "/api/v1/regions", false), r(None, 0, None));
        assert_eq!(
            rule("GET", "/api/v1/config/versions/abc", false),
            r(Some(Config), 0, Some("config.read"))
        );
        assert_eq!(
            rule("GET", "/api/v1/audit?limit=5", false),
            r(Some(Read), 0, None)
        );
        assert_eq!(
            rule("GET", "/api/v1/edges?scope=local", true),
            r(Some(Read), 0, None)
        );
        assert_eq!(rule("HEAD", "/metrics", true), r(Some(Read), 0, None));
        for open in ["/healthz", "/", "/?token=x", "/assets/uPlot.min.css"] {
            assert_eq!(rule("GET", open, true), r(None, 0, None), "{open}");
        }
        assert_eq!(
            rule("GET", "/assets/../api/v1/edges", true),
            r(Some(Read), 0, None)
        );
        const { assert!(MAX_SMALL_BODY < MAX_WARM_PULL_BODY && MAX_WARM_PULL_BODY < MAX_BUNDLE_BODY) };
    }

    #[test]
    fn a_refused_read_is_audited_once_per_source_and_path_in_a_while() {
        let ip: std::net::IpAddr = [10, 9, 8, 7].into();
        assert!(first_refusal(ip, "/api/v1/edges-test"));
        assert!(!first_refusal(ip, "/api/v1/edges-test"));
        assert!(first_refusal(ip, "/api/v1/regions-test"));
        assert!(first_refusal([10, 9, 8, 6].into(), "/api/v1/edges-test"));
    }
}
