//! The JSON API, `/metrics` and `/healthz`, on the API listener.
//!
//! Write endpoints need `Authorization: Bearer <token>` with the token from
//! `[api] token_file` (compared in constant time); read endpoints too when
//! `[api] read_requires_token` is set (`/healthz` always stays open). The token is
//! checked from the request head by [`admit`], the gate of the API's front
//! ([`crate::http_front`]), before any body byte is read, and each route's body limit is
//! decided there from `Content-Length`; the handlers check it again. Handlers only read shared
//! state (the log, the edge registry) or append to the log like the purge listener does.
//! Config pushes are validated and stored on a blocking thread; the rollout itself runs
//! in [`crate::rollout`]. Stored bundle contents may hold credentials (basic auth in
//! `waf.toml`), so reading them needs the token too.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use proto::edge::purge_entry::Op;
use serde::Deserialize;

use crate::bundle::Bundle;
use crate::edges::fmt_time;
use crate::monitor::{fleet_status, Health};
use crate::purge::log::NewPurge;
use crate::rollout::RolloutError;
use crate::state::Coordinator;
use views::{
    ApiError, Healthz, HitRatio, JobList, PurgeAccepted, PurgeBody, PurgeOpView, PurgeView,
    RegionHistory, RegionProblem, RegionView, ServedMinute, TlsMode, TlsView, WarmStarted,
};

mod guard;
mod maintenance;
pub mod views;

pub use guard::admit;

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub state: Coordinator,
    pub read_requires_token: bool,
    /// The tokens the API accepts; their secrets re-read on SIGHUP.
    pub tokens: crate::tokens::Tokens,
}

/// Largest request body: a config bundle push (at most 2 MiB of text, JSON-escaped).
pub const MAX_BUNDLE_BODY: usize = 8 * 1024 * 1024;
/// A follower's protobuf `WarmPull` (its warm-capable sessions and acks).
pub const MAX_WARM_PULL_BODY: usize = 1024 * 1024;
/// Every other write: a purge, a warm job, a rollback, a cancel.
pub const MAX_SMALL_BODY: usize = 64 * 1024;

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/edges", get(edges))
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/cluster/reports", get(cluster_reports))
        .route("/api/v1/cluster/warm", axum::routing::post(cluster_warm))
        .route("/api/v1/purges", axum::routing::post(post_purge))
        .route("/api/v1/purges/:seq", get(purge))
        .route("/api/v1/config", get(config_view).post(config_push))
        .route(
            "/api/v1/config/rollback",
            axum::routing::post(config_rollback),
        )
        .route("/api/v1/config/versions", get(config_versions))
        .route("/api/v1/config/versions/:version", get(config_version))
        .route("/api/v1/tls", get(tls_view))
        .route("/api/v1/regions", get(regions))
        .route("/api/v1/alerts", get(alerts))
        .route("/api/v1/audit", get(audit))
        .route("/assets/uPlot.iife.min.js", get(asset_js))
        .route("/assets/uPlot.min.css", get(asset_css))
        .route("/api/v1/regions/:name/history", get(region_history))
        .route("/api/v1/regions/:name/countries", get(region_countries))
        .route("/api/v1/route", get(route))
        .route("/api/v1/geo", get(geo_view))
        .route("/api/v1/warm/jobs", get(warm_jobs).post(warm_start))
        .route("/api/v1/warm/jobs/:id", get(warm_job))
        .route(
            "/api/v1/warm/jobs/:id/cancel",
            axum::routing::post(warm_cancel),
        )
        .route("/api/v1/warm/top", get(warm_top))
        .route("/api/v1/backup", axum::routing::post(backup))
        .route(
            "/api/v1/regions/:name/drain",
            axum::routing::post(maintenance::drain).delete(maintenance::undrain),
        )
        .route(
            "/api/v1/silences",
            get(maintenance::silences).post(maintenance::silence),
        )
        .route(
            "/api/v1/silences/:id",
            axum::routing::delete(maintenance::unsilence),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::guard,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BUNDLE_BODY))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ApiError {
        error: message.into(),
        file: None,
        line: None,
    };
    (status, Json(body)).into_response()
}

/// The dashboard: one self-contained page (no external assets) reading the JSON API.
/// With `read_requires_token`, open it as `/?token=...` (kept in the tab's session).
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<usize>,
    /// Epoch milliseconds, or how long ago (`90s`, `15m`, `2h`, `7d`).
    since: Option<String>,
}

/// `GET /api/v1/audit?limit=N&since=T` (a token with any scope): the newest audit
/// entries first (`crate::audit`); in a cluster the same on every coordinator, this
/// coordinator's own (`partial`) while etcd does not answer.
async fn audit(State(s): State<ApiState>, Query(q): Query<AuditQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let since_ms = match q.since.as_deref().map(str::trim) {
        None | Some("") => 0,
        Some(t) => match t.parse::<u64>() {
            Ok(ms) => ms,
            Err(_) => match humantime::parse_duration(t) {
                Ok(ago) => crate::clock::now_ms().saturating_sub(ago.as_millis() as u64),
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "since must be epoch milliseconds or a duration like 15m, not {t:?}"
                        ),
                    )
                }
            },
        },
    };
    Json(s.state.audit.list(limit, since_ms).await).into_response()
}

/// `GET /api/v1/alerts`: the newest grouped alerts (what changed, when, delivered). In
/// a cluster the ledger's in etcd, the same on every coordinator; this coordinator's
/// own while etcd does not answer.
async fn alerts(State(s): State<ApiState>) -> Response {
    let monitor = s.state.monitor.clone();
    let shared = tokio::task::spawn_blocking(move || monitor.cluster_alerts())
        .await
        .ok()
        .flatten();
    let alerts = match shared {
        Some(Ok(list)) => list,
        Some(Err(e)) => {
            tracing::debug!(error = %e, "alert ledger unreadable; listing this coordinator's alerts");
            s.state.monitor.recent_alerts()
        }
        None => s.state.monitor.recent_alerts(),
    };
    Json(views::AlertList {
        webhooks: s.state.monitor.webhook_count(),
        alerts,
    })
    .into_response()
}

/// The dashboard's vendored charting library (uPlot, MIT): no network needed.
async fn asset_js() -> Response {
    asset(
        "application/javascript",
        include_str!("assets/uPlot.iife.min.js"),
    )
}

async fn asset_css() -> Response {
    asset("text/css", include_str!("assets/uPlot.min.css"))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}

/// `GET /api/v1/regions`: per region, its edges, hit ratios, rates and purge lag.
async fn regions(State(s): State<ApiState>) -> Response {
    Json(region_views(&s.state)).into_response()
}

/// The per-region rows: every region the monitor knows (configured, or with an edge that
/// connected), with the health it decided.
fn region_views(s: &Coordinator) -> Vec<RegionView> {
    let now = crate::clock::now_ms();
    let traffic = s.traffic.regions(now);
    let edges = s.edges.list(s.log.head());
    s.monitor
        .health()
        .into_iter()
        .map(|(name, h)| {
            let mine: Vec<_> = edges.iter().filter(|e| e.region == name).collect();
            let t = traffic.get(&name);
            let drain = s.maintenance.drain_of(&name, now);
            RegionView {
                edges: mine.len(),
                edges_connected: mine.iter().filter(|e| e.connected).count(),
                health: h.health,
                diagnosis: h.diagnosis,
                health_error: h.last_error,
                hit_ratio: t
                    .map(|t| HitRatio::from_windows(&t.hit_ratio))
                    .unwrap_or_default(),
                requests_per_s: t.and_then(|t| t.requests_per_s),
                synthetic_hit_ratio: t.map(|t| HitRatio::from_windows(&t.synthetic_hit_ratio)),
                stats_stale: t.is_none_or(|t| t.stale),
                stats_age_s: t.and_then(|t| t.stats_age_s),
                last_minute: t.map(|t| t.last_minute),
                objects: t.and_then(|t| t.objects),
                bans: t.and_then(|t| t.bans),
                varnish_restarts: t.map(|t| t.restarts).unwrap_or(0),
                varnish_restart: s.monitor.recent_restart(&name),
                purge_lag: mine.iter().map(|e| e.lag).max().unwrap_or(0),
                probes: s.monitor.probes(&name),
                served: t
                    .filter(|t| !t.stale)
                    .map(|t| ServedMinute::of(&t.last_minute))
                    .unwrap_or_default(),
                drained: drain.is_some(),
                drain,
                name,
            }
        })
        .collect()
}

/// `GET /api/v1/regions/{name}/history`: per-minute hit ratio and traffic for 24 h.
async fn region_history(State(s): State<ApiState>, Path(name): Path<String>) -> Response {
    Json(RegionHistory {
        minutes: s.state.traffic.history(&name),
        probes: s.state.monitor.minutes(&name),
        name,
    })
    .into_response()
}

/// The 404 that says geo routing is not configured.
fn no_geo() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "geo routing is not configured: add a [geo] section with a MaxMind database",
    )
}

#[derive(Debug, serde::Deserialize)]
struct RouteQuery {
    ip: Option<String>,
}

/// `GET /api/v1/route?ip=A`: the region for a client, why, and every candidate.
async fn route(State(s): State<ApiState>, Query(q): Query<RouteQuery>) -> Response {
    let Some(geo) = &s.state.geo else {
        return no_geo();
    };
    let Some(raw) = q.ip else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing ?ip= (an IPv4 or IPv6 address)",
        );
    };
    match raw.trim().parse::<std::net::IpAddr>() {
        Ok(ip) => Json(geo.route(ip)).into_response(),
        Err(_) => error(
            StatusCode::BAD_REQUEST,
            format!("ip {raw:?} is not an IPv4 or IPv6 address"),
        ),
    }
}

/// `GET /api/v1/regions/{name}/countries`: the region's shoppers by country.
async fn region_countries(State(s): State<ApiState>, Path(name): Path<String>) -> Response {
    let Some(geo) = &s.state.geo else {
        return no_geo();
    };
    if !s.state.regions.contains(&name) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no region {name:?} in [[regions]]"),
        );
    }
    Json(geo.countries(&name)).into_response()
}

/// `GET /api/v1/geo`: whether geo routing is on, the database in use and its reloads,
/// and each region's routing state (200 either way, so a dashboard can ask).
async fn geo_view(State(s): State<ApiState>) -> Response {
    match &s.state.geo {
        Some(g) => Json(g.view()).into_response(),
        None => Json(crate::geo::GeoView {
            enabled: false,
            database: None,
            regions: Vec::new(),
        })
        .into_response(),
    }
}

/// `GET /api/v1/tls`: the certificates in use and when they expire.
async fn tls_view(State(s): State<ApiState>) -> Response {
    let view = match &s.state.tls {
        None => TlsView {
            mode: TlsMode::Plaintext,
            expiry: None,
            handshakes_refused: None,
        },
        Some(t) => TlsView {
            mode: TlsMode::MutualTls,
            expiry: Some(t.expiry()),
            handshakes_refused: Some(t.refused.load(std::sync::atomic::Ordering::Relaxed)),
        },
    };
    Json(view).into_response()
}

/// `GET /healthz`: always 200 while the coordinator serves (load balancers keep sending
/// it purges); `status` is the fleet's health (`ok`, `unknown`, `degraded`, `down`:
/// `monitor::fleet_status`) with every region that is not up and why, so a check
/// reading it sees the truth.
async fn healthz(State(s): State<ApiState>) -> Json<Healthz> {
    let (role, leader) = s.state.cluster.role();
    let health = s.state.monitor.health();
    let status = fleet_status(health.values().map(|h| h.health));
    let regions_not_up = health
        .into_iter()
        .filter(|(_, h)| h.health != Health::Up)
        .map(|(name, h)| {
            let problem = RegionProblem {
                health: h.health,
                diagnosis: h.diagnosis,
                error: h.last_error,
            };
            (name, problem)
        })
        .collect();
    Json(Healthz {
        status,
        coordinator: "ok".into(),
        role,
        leader,
        id: s.state.cluster.id().to_owned(),
        store: match s.state.cluster.store_health().reachable() {
            Some(true) => "ok",
            Some(false) => "unavailable",
            None => "unknown",
        }
        .into(),
        head_seq: s.state.log.head(),
        edges_connected: s.state.edges.connected(),
        regions_not_up,
        protocol: proto::version::own(),
        accepts_protocols: proto::version::fmt_window(proto::version::own()),
    })
}

/// `GET /metrics`: every subsystem's families; OpenMetrics when the scraper asks for it.
async fn metrics(State(s): State<ApiState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::metrics::Format::from_accept(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        crate::metrics::render(&s.state.metrics, format),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EdgesQuery {
    /// `local`: only the edges whose sessions this coordinator holds (what the other
    /// coordinators of a cluster ask for); default: every edge of the cluster.
    scope: Option<String>,
    /// With `scope=local`: each edge's ack points from this time on (Unix µs) and its
    /// purge failures (`edges::EdgeHistory`), for the other coordinators' purge status.
    acks_since_us: Option<u64>,
}

impl EdgesQuery {
    /// Whether only this coordinator's sessions are asked for (else a 400).
    #[allow(clippy::result_large_err)] // the same shape as `authorize`
    fn local(&self) -> Result<bool, Response> {
        match self.scope.as_deref() {
            None | Some("cluster") => Ok(false),
            Some("local") => Ok(true),
            Some(other) => Err(error(
                StatusCode::BAD_REQUEST,
                format!("scope must be local or cluster, not {other:?}"),
            )),
        }
    }
}

async fn edges(State(s): State<ApiState>, Query(q): Query<EdgesQuery>) -> Response {
    let head = s.state.log.head();
    let local = match q.local() {
        Ok(local) => local,
        Err(r) => return r,
    };
    if let (true, Some(since)) = (local, q.acks_since_us) {
        let mut list = s.state.edges.list_local_with_history(head, since);
        for e in &mut list {
            e.view.config_version = s.state.rollouts.active_version(&e.view.id);
        }
        return Json(list).into_response();
    }
    let mut list = if local {
        s.state.edges.list_local(head)
    } else {
        s.state.edges.list(head)
    };
    let me = s.state.cluster.is_clustered().then(|| s.state.cluster.id());
    for e in list.iter_mut().filter(|e| e.coordinator.is_none()) {
        e.config_version = s.state.rollouts.active_version(&e.id);
        // In a cluster every coordinator names the one holding the session, itself too.
        if !local {
            e.coordinator = me.map(str::to_owned);
        }
    }
    Json(list).into_response()
}

/// Config pushes and warm jobs are written by the leader only (its writes to etcd are
/// fenced on its leader key), so a cluster has one desired version and one set of jobs.
/// A follower answers 409 naming the leader.
#[allow(clippy::result_large_err)] // the same shape as `authorize`
fn leader_only(s: &ApiState) -> Result<(), Response> {
    if s.state.cluster.leads() {
        return Ok(());
    }
    let view = s.state.cluster.view();
    let leader = view
        .leader
        .clone()
        .unwrap_or_else(|| "none elected yet".into());
    let api = view
        .members
        .iter()
        .find(|m| Some(&m.id) == view.leader.as_ref())
        .map(|m| format!(" at {}", m.api))
        .unwrap_or_default();
    Err(error(
        StatusCode::CONFLICT,
        format!(
            "coordinator {} is a follower: writes (config pushes, warm jobs, drains, silences) go to the leader ({leader}{api})",
            view.id
        ),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportsQuery {
    #[serde(default)]
    instance: u64,
    #[serde(default)]
    since: u64,
}

/// `GET /api/v1/cluster/reports?instance=I&since=N`: the probe results, counter samples
/// and warm progress of this coordinator's agents, for the other coordinators
/// (a protobuf `RelayBatch`; see `cluster::relay`).
async fn cluster_reports(State(s): State<ApiState>, Query(q): Query<ReportsQuery>) -> Response {
    protobuf(&s.state.cluster.relay().read(q.instance, q.since))
}

/// A protobuf answer (the coordinators' own traffic between them).
fn protobuf(msg: &impl prost::Message) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        msg.encode_to_vec(),
    )
        .into_response()
}

/// `POST /api/v1/cluster/warm` (bearer token; a protobuf `WarmPull`): a follower asks
/// the leader for its agents' warm work (a protobuf `WarmRelayBatch`; see
/// `cluster::warm_relay`). The work carries the warm token, hence the API token.
async fn cluster_warm(State(s): State<ApiState>, body: axum::body::Bytes) -> Response {
    if let Err(r) = leader_only(&s) {
        return r;
    }
    let pull = match <proto::edge::WarmPull as prost::Message>::decode(body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("not a WarmPull: {e}")),
    };
    let state = s.state.clone();
    // `Warm` may read shards from the store: blocking work.
    let batch = tokio::task::spawn_blocking(move || {
        state
            .cluster
            .warm_relay()
            .serve(pull, &state.warm, &state.edges)
    })
    .await;
    match batch {
        Ok(batch) => protobuf(&batch),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /api/v1/cluster`: this coordinator's role, the leader, whether it reaches etcd,
/// its spool, every member as it last heard from it, and etcd's members' health.
/// `?scope=local`: only this coordinator's self record (what its peers poll).
async fn cluster(State(s): State<ApiState>, Query(q): Query<EdgesQuery>) -> Response {
    match q.local() {
        Ok(true) => {
            let mut me = s.state.cluster.status();
            me.refused = s.state.edges.local_refusals();
            Json(me).into_response()
        }
        Ok(false) => Json(s.state.cluster.view()).into_response(),
        Err(r) => r,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigQuery {
    /// As in [`EdgesQuery`].
    scope: Option<String>,
    /// `full`: errors as the compiler wrote them (needs the token); default: each error
    /// as its `file:line` and one bounded line ([`crate::rollout::redact`]), since a
    /// compiler error quotes the source it read.
    detail: Option<String>,
}

/// `GET /api/v1/config`: errors redacted unless `detail=full` with the token.
async fn config_view(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<ConfigQuery>,
) -> Response {
    let full = match q.detail.as_deref() {
        None | Some("public") => false,
        Some("full") => match guard::authorize(&s, &headers, crate::tokens::Scope::Config) {
            Ok(_) => true,
            Err(r) => return r,
        },
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("detail must be full or public, not {other:?}"),
            )
        }
    };
    let scope = EdgesQuery {
        scope: q.scope,
        acks_since_us: None,
    };
    match scope.local() {
        Ok(local) => {
            let view = s.state.rollouts.view_scoped(local);
            Json(if full { view } else { view.redacted() }).into_response()
        }
        Err(r) => r,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushQuery {
    /// `false` skips the canary stage.
    canary: Option<bool>,
    /// `true` supersedes a rollout in progress (else 409).
    force: Option<bool>,
}

async fn config_push(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<PushQuery>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = leader_only(&s) {
        return r;
    }
    let bundle: Bundle = match json_body(&body, "body must be {\"files\": {name: text}}") {
        Ok(b) => b,
        Err(r) => return r,
    };
    let rollouts = s.state.rollouts.clone();
    let canary = q.canary.unwrap_or(true);
    let force = q.force.unwrap_or(false);
    rollout_answer(tokio::task::spawn_blocking(move || rollouts.push(&bundle, canary, force)).await)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    version: Option<String>,
}

async fn config_rollback(State(s): State<ApiState>, body: axum::body::Bytes) -> Response {
    if let Err(r) = leader_only(&s) {
        return r;
    }
    let body: RollbackBody = if body.is_empty() {
        RollbackBody::default()
    } else {
        match json_body(&body, "invalid body") {
            Ok(b) => b,
            Err(r) => return r,
        }
    };
    let rollouts = s.state.rollouts.clone();
    rollout_answer(tokio::task::spawn_blocking(move || rollouts.rollback(body.version)).await)
}

/// `POST /api/v1/warm/jobs`: queue a job; answers `{"id": N}`.
async fn warm_start(State(s): State<ApiState>, body: axum::body::Bytes) -> Response {
    if let Err(r) = leader_only(&s) {
        return r;
    }
    let spec: crate::warm::job::JobSpec = match json_body(
        &body,
        "body must be a warm job: {\"sitemap\": URL, \"regions\": [...], \"rate\": R, ...}",
    ) {
        Ok(b) => b,
        Err(r) => return r,
    };
    match s.state.warm.create(spec, crate::warm::job::JobSource::Api) {
        Ok(id) => Json(WarmStarted { id }).into_response(),
        Err(e) => warm_error(e),
    }
}

fn warm_error(e: crate::warm::WarmError) -> Response {
    use crate::warm::WarmError;
    match e {
        WarmError::Invalid(m) => error(StatusCode::BAD_REQUEST, m),
        WarmError::NotFound(_) => error(StatusCode::NOT_FOUND, e.to_string()),
        WarmError::Store(_) | WarmError::TakingOver => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

/// Warm jobs listed on a follower: the leader runs them, so its answer (`rate` and all)
/// when it gives one, else the jobs as etcd holds them (the leader writes each job and
/// each edge's progress there), so a follower never misses a job the cluster has.
async fn warm_from_leader(s: &ApiState, path: &str) -> Option<Response> {
    if s.state.cluster.leads() {
        return None;
    }
    let bearer = s.tokens.peer_secret();
    match s
        .state
        .cluster
        .read_from_leader(path, bearer.as_deref())
        .await
    {
        Ok(body) => Some(([(header::CONTENT_TYPE, "application/json")], body).into_response()),
        Err(e) => {
            tracing::debug!(path, error = %e, "warm jobs not read from the leader; reading etcd");
            None
        }
    }
}

/// `GET /api/v1/warm/jobs`: the newest jobs first.
async fn warm_jobs(State(s): State<ApiState>) -> Response {
    if let Some(r) = warm_from_leader(&s, "/api/v1/warm/jobs").await {
        return r;
    }
    if s.state.cluster.leads() {
        return Json(JobList {
            jobs: s.state.warm.list(50),
        })
        .into_response();
    }
    let warm = s.state.warm.clone();
    match tokio::task::spawn_blocking(move || warm.stored_list(50)).await {
        Ok(Ok(jobs)) => Json(JobList { jobs }).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /api/v1/warm/jobs/{id}`: `{id, state, regions: {NAME: {done, total, errors, eta_s}}}`.
async fn warm_job(State(s): State<ApiState>, Path(id): Path<u64>) -> Response {
    if let Some(r) = warm_from_leader(&s, &format!("/api/v1/warm/jobs/{id}")).await {
        return r;
    }
    let view = if s.state.cluster.leads() {
        s.state.warm.view(id)
    } else {
        let warm = s.state.warm.clone();
        match tokio::task::spawn_blocking(move || warm.stored_view(id)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    };
    match view {
        Some(v) => Json(v).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no warm job {id}")),
    }
}

/// `POST /api/v1/warm/jobs/{id}/cancel`.
async fn warm_cancel(State(s): State<ApiState>, Path(id): Path<u64>) -> Response {
    if let Err(r) = leader_only(&s) {
        return r;
    }
    match s.state.warm.cancel(id) {
        Ok(v) => Json(v).into_response(),
        Err(e) => warm_error(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopQuery {
    n: Option<usize>,
}

/// `GET /api/v1/warm/top?n=`: each region's most requested URLs (what `top` warms).
async fn warm_top(
    State(s): State<ApiState>,
    axum::extract::Query(q): axum::extract::Query<TopQuery>,
) -> Response {
    let n = q.n.unwrap_or(100).min(10_000);
    Json(s.state.warm.top(&s.state.regions, n)).into_response()
}

/// Parses a JSON request body, or the 400 answer saying why not.
#[allow(clippy::result_large_err)]
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, Response> {
    serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("{expected}: {e}")))
}

fn rollout_answer(
    result: Result<Result<crate::rollout::Started, RolloutError>, tokio::task::JoinError>,
) -> Response {
    match result {
        Ok(Ok(started)) => Json(started).into_response(),
        Ok(Err(RolloutError::Bundle(e))) => {
            let body = ApiError {
                error: e.to_string(),
                file: Some(e.file.clone()),
                line: e.line,
            };
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
        Ok(Err(e @ RolloutError::UnknownVersion(_))) => error(StatusCode::NOT_FOUND, e.to_string()),
        Ok(Err(e @ (RolloutError::Nothing(_) | RolloutError::InFlight(_)))) => {
            error(StatusCode::CONFLICT, e.to_string())
        }
        Ok(Err(e @ RolloutError::Store(_))) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn config_versions(State(s): State<ApiState>) -> Response {
    match s.state.rollouts.store().list() {
        Ok(list) => Json(list).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn config_version(State(s): State<ApiState>, Path(version): Path<String>) -> Response {
    match s.state.rollouts.store().get(&version) {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("unknown version {version}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn purge(State(s): State<ApiState>, Path(seq): Path<String>) -> Response {
    let Ok(seq) = seq.parse::<u64>() else {
        return error(StatusCode::BAD_REQUEST, "seq must be a number");
    };
    let entry = match s.state.log.get(seq).await {
        Ok(Some(e)) => e,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("purge {seq} is not in the log (future or past retention)"),
            )
        }
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let received = std::time::UNIX_EPOCH + std::time::Duration::from_micros(entry.received_at_us);
    // Only a soft tag purge can have a refresh; only the leader runs them, a follower
    // reads what it stored.
    let refresh =
        if !entry.soft || !matches!(entry.op, Some(Op::Tags(_))) || !s.state.warm.refreshes() {
            None
        } else if s.state.cluster.leads() {
            s.state.warm.refresh_of(seq)
        } else {
            let warm = s.state.warm.clone();
            match tokio::task::spawn_blocking(move || warm.stored_refresh_of(seq)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        };
    Json(PurgeView {
        seq,
        received_at: fmt_time(received),
        received_at_us: entry.received_at_us,
        op: entry.op.as_ref().map(op_view),
        soft: entry.soft,
        edges: s.state.edges.progress(seq).into_iter().collect(),
        refresh,
    })
    .into_response()
}

fn op_view(op: &Op) -> PurgeOpView {
    let none = PurgeOpView::default();
    match op {
        Op::Tags(t) => PurgeOpView {
            tags: Some(t.tags.clone()),
            ..none
        },
        Op::TagsRegex(r) => PurgeOpView {
            tags_regex: Some(r.clone()),
            ..none
        },
        Op::PoolRegex(r) => PurgeOpView {
            pool_regex: Some(r.clone()),
            ..none
        },
        Op::All(_) => PurgeOpView {
            all: Some(true),
            ..none
        },
        Op::Url(u) => PurgeOpView {
            url: Some(u.path.clone()),
            host: Some(u.host.clone()),
            ..none
        },
    }
}

/// `POST /api/v1/purges`: checked by the purge module's rules, logged like Magento's
/// PURGEs and counted in the same metrics.
async fn post_purge(State(s): State<ApiState>, body: axum::body::Bytes) -> Response {
    let body: PurgeBody = match json_body(&body, "invalid body") {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (op, kind) = match crate::purge::pattern::api_op(body.tags, body.url, body.host, body.all) {
        Ok(op) => op,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let purge = NewPurge {
        op,
        soft: body.soft,
    };
    match s.state.log.append_outcome(vec![purge]).await {
        Ok(appended) => {
            s.state.purge_counters.logged(kind);
            let spooled = matches!(appended, crate::purge::log::Appended::Spooled(_));
            let mut r = Json(PurgeAccepted {
                seq: appended.seq(),
                spooled,
            })
            .into_response();
            if spooled {
                r.headers_mut()
                    .insert("x-purge-spooled", axum::http::HeaderValue::from_static("1"));
            }
            r
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `POST /api/v1/backup` (token): the embedded state as one consistent backup file,
/// streamed (`crate::backup`).
async fn backup(State(s): State<ApiState>) -> Response {
    let state = s.state.clone();
    match tokio::task::spawn_blocking(move || crate::backup::take(&state)).await {
        Ok(Ok(snapshot)) => {
            let h = &snapshot.header;
            tracing::info!(log_id = %h.log_id, head = h.head, schema = h.schema,
                bytes = h.files.iter().map(|f| f.bytes).sum::<u64>(), "backup taken");
            let len = snapshot.bytes().to_string();
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                    (header::CONTENT_LENGTH, len),
                ],
                axum::body::Body::from_stream(snapshot.into_stream()),
            )
                .into_response()
        }
        Ok(Err(e @ crate::backup::BackupError::Etcd)) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
