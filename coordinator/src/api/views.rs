//! The JSON the API answers and takes, as types. The API builds them, the CLI
//! (`coordinator status`, `config`, `warm`, `purge`) and the end-to-end tests read them
//! back with serde, and the dashboard reads the same fields; a field renamed here is
//! renamed for all of them at once.
//!
//! Views a subsystem already keeps are re-exported from it (an edge, a config rollout,
//! a warm job); the ones the API composes from several subsystems are defined here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::bundle::store::VersionInfo;
pub use crate::edges::{EdgeView, PurgeFailure, PurgeProgress};
pub use crate::geo::db::DbInfo as GeoDatabaseView;
pub use crate::geo::route::{Candidate, Reason as RouteReason, WhyNot};
pub use crate::geo::{CountryView, GeoView, RegionRouting, RouteView};
pub use crate::maintenance::{Drain, DrainRequest, Silence, SilenceRequest};
pub use crate::monitor::{
    AlertRecord, Change, Diagnosis, FleetStatus, Health, Held, MinuteStats, ProbeView,
};
pub use crate::rollout::{BundleState, BundleView, EdgeBundleView, Phase, Rollout, Started};
pub use crate::tls::CertExpiry;
pub use crate::traffic::{Delta, MinutePoint};
pub use crate::warm::job::{JobSpec, JobState, JobView, RegionProgress, RegionStatus};

/// The API's snake_case name of a view's enum value (a health, a phase, a state): what
/// the JSON carries, for text output.
pub fn name_of(value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".into(),
    }
}

/// Shoppers' hit ratio per window; null without lookups in the window, or when stale.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct HitRatio {
    pub m1: Option<f64>,
    pub m5: Option<f64>,
    pub h1: Option<f64>,
}

impl HitRatio {
    /// From the per-window map the traffic module keeps.
    pub fn from_windows(windows: &BTreeMap<&'static str, Option<f64>>) -> Self {
        let get = |w: &str| windows.get(w).copied().flatten();
        HitRatio {
            m1: get("m1"),
            m5: get("m5"),
            h1: get("h1"),
        }
    }
}

/// One row of `GET /api/v1/regions`. Fields missing from an answer (an older
/// coordinator) read as their defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RegionView {
    pub name: String,
    pub edges: usize,
    pub edges_connected: usize,
    /// Decided by the monitor alone (sessions, purge lag, probes).
    pub health: Health,
    pub diagnosis: Option<Diagnosis>,
    pub health_error: Option<String>,
    pub hit_ratio: HitRatio,
    pub requests_per_s: Option<f64>,
    /// The agents' own (warm, probe) requests' hit ratio.
    pub synthetic_hit_ratio: Option<HitRatio>,
    /// No live counters: varnishd or the agent is gone, the figures are null.
    pub stats_stale: bool,
    pub stats_age_s: Option<f64>,
    pub last_minute: Option<Delta>,
    pub objects: Option<u64>,
    pub bans: Option<u64>,
    pub varnish_restarts: u64,
    /// The newest restart of an edge's varnishd cache process within
    /// `[monitoring] varnish_restart_s` (the region reads `varnish_restarted` meanwhile):
    /// which edge, when, whether it panicked, and the last purge it had applied before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub varnish_restart: Option<crate::traffic::Restart>,
    /// The largest purge lag (entries) of the region's edges.
    pub purge_lag: u64,
    pub probes: Vec<ProbeView>,
    /// What shoppers were served in the last minute, from varnish's own log.
    pub served: ServedMinute,
    /// An operator drained it: out of routing and DNS, its alerts held (its health
    /// above is still the truth).
    pub drained: bool,
    /// Who drained it, why, since and until when (null unless drained).
    pub drain: Option<Drain>,
}

/// Shoppers' requests in a window as varnish logged them (the agents' own excluded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServedMinute {
    pub requests: u64,
    /// Mean and standard deviation of the time varnish took to serve them (ms); null
    /// without requests (or when the figures are stale).
    pub mean_ms: Option<f64>,
    pub std_ms: Option<f64>,
    pub errors_5xx: u64,
}

impl ServedMinute {
    pub fn of(d: &Delta) -> Self {
        ServedMinute {
            requests: d.served,
            mean_ms: d.served_mean_ms(),
            std_ms: d.served_std_ms(),
            errors_5xx: d.served_5xx,
        }
    }
}

/// `GET /api/v1/regions/{name}/history`: per-minute traffic and probe times for 24 h.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionHistory {
    pub name: String,
    pub minutes: Vec<MinutePoint>,
    /// Per check, the edge probes' minutes.
    pub probes: BTreeMap<String, Vec<MinuteStats>>,
}

/// A region that is not up, in `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionProblem {
    pub health: Health,
    pub diagnosis: Option<Diagnosis>,
    pub error: Option<String>,
}

/// `GET /healthz`: always 200 while the coordinator serves; `status` tells the truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthz {
    pub status: FleetStatus,
    /// `ok` whenever the process answers.
    pub coordinator: String,
    /// `leader` or `follower` (always `leader` with the embedded store).
    pub role: crate::cluster::Role,
    /// The leader's id.
    pub leader: Option<String>,
    /// This coordinator's id.
    pub id: String,
    /// Whether this coordinator reaches the purge log's store: `ok`, `unavailable`
    /// (etcd, from here: purges wait in the local spool), `unknown` (not yet asked).
    /// Regions it cannot see meanwhile read `unknown` in `regions_not_up`, and `status`
    /// reads `unknown` unless a region is degraded or down.
    pub store: String,
    pub head_seq: u64,
    pub edges_connected: usize,
    pub regions_not_up: BTreeMap<String, RegionProblem>,
    /// The protocol version this coordinator speaks (`proto::version`; 0 from one that
    /// predates the field).
    #[serde(default)]
    pub protocol: u32,
    /// The agents' protocol versions it accepts (`1..=3`; empty from an older one).
    #[serde(default)]
    pub accepts_protocols: String,
}

/// How agents connect, in `GET /api/v1/tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    Plaintext,
    MutualTls,
}

/// `GET /api/v1/tls`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsView {
    pub mode: TlsMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<CertExpiry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshakes_refused: Option<u64>,
}

/// Body of `POST /api/v1/purges`: exactly one of `tags`, `url` (optionally on one
/// `host`), `all`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeBody {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Keep stale copies for grace (xkey mode).
    #[serde(default)]
    pub soft: bool,
}

impl PurgeBody {
    pub fn tags(tags: Vec<String>, soft: bool) -> Self {
        PurgeBody {
            tags,
            soft,
            ..PurgeBody::default()
        }
    }

    pub fn url(url: String, host: Option<String>, soft: bool) -> Self {
        PurgeBody {
            url: Some(url),
            host,
            soft,
            ..PurgeBody::default()
        }
    }

    pub fn all(soft: bool) -> Self {
        PurgeBody {
            all: true,
            soft,
            ..PurgeBody::default()
        }
    }
}

/// The answer to a purge (API or PURGE): its sequence in the log; 0 with `spooled` when
/// etcd did not commit in time and it waits in the coordinator's local spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeAccepted {
    pub seq: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spooled: bool,
}

/// What a logged purge does, in `GET /api/v1/purges/{seq}` (one field set).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeOpView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// `GET /api/v1/purges/{seq}`: the entry and, per edge, when it applied it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurgeView {
    pub seq: u64,
    pub received_at: String,
    pub received_at_us: u64,
    pub op: Option<PurgeOpView>,
    pub soft: bool,
    pub edges: BTreeMap<String, PurgeProgress>,
    /// In refresh mode, the refresh of a soft tag purge: pages stale, refreshed and
    /// evicted at the bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<crate::warm::job::RefreshProgress>,
}

/// `POST /api/v1/warm/jobs` answers the new job's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmStarted {
    pub id: u64,
}

/// `GET /api/v1/warm/jobs`: the newest jobs first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

/// Every error answer: `{"error": "..."}`; a refused bundle also names the file and line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
}

/// `POST` and `DELETE /api/v1/regions/{name}/drain`: the region and its drain now
/// (after a DELETE, `drain` is the one that ended, null if it was not drained).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainAnswer {
    pub region: String,
    pub drained: bool,
    pub drain: Option<Drain>,
}

/// `GET /api/v1/silences`: the silences in force, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SilenceList {
    pub silences: Vec<Silence>,
}

/// `GET /api/v1/alerts`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertList {
    /// Webhooks configured (0: alerts are only logged and listed here).
    pub webhooks: usize,
    /// Newest first.
    pub alerts: Vec<AlertRecord>,
}
