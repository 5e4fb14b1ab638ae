//! `coordinator.toml`: explicit structs, defaults for everything optional, `validate()`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::purge::listener::ListenerConfig;
use crate::purge::log::Retention;
use crate::purge::wire::Limits;

/// The whole coordinator configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub purge: PurgeConfig,
    pub grpc: GrpcConfig,
    pub api: ApiConfig,
    #[serde(default)]
    pub regions: Vec<RegionConfig>,
    #[serde(default)]
    pub rollout: RolloutConfig,
    #[serde(default)]
    pub monitoring: MonitoringConfig,
    /// Synthetic checks every agent runs from its region.
    #[serde(default)]
    pub checks: Vec<CheckConfig>,
    #[serde(default)]
    pub alerts: AlertsConfig,
    #[serde(default)]
    pub warm: WarmConfig,
}

/// `[warm]`: the cache warmer's budget and defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmConfig {
    /// Requests per second warming may send to the Magento backend, all edges together.
    #[serde(default = "default_origin_budget_rps")]
    pub origin_budget_rps: f64,
    /// Requests per second per satellite edge in tiered jobs (they fetch from the shield).
    #[serde(default = "default_satellite_rate")]
    pub satellite_rate: f64,
    /// Concurrent fetches per edge.
    #[serde(default = "default_warm_concurrency")]
    pub concurrency: u32,
    /// URLs per shard (the unit handed to an edge, reported and persisted).
    #[serde(default = "default_shard_urls")]
    pub shard_urls: usize,
    /// A miss slower than this to its first byte counts as origin overload (AIMD).
    #[serde(default = "default_slow_ttfb_ms")]
    pub slow_ttfb_ms: u64,
    #[serde(default = "default_warm_timeout_ms")]
    pub timeout_ms: u64,
    /// Most URLs in one job (a sitemap index may list many sitemaps).
    #[serde(default = "default_warm_max_urls")]
    pub max_urls: usize,
    /// The region beside the origin; when set, jobs run tiered by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shield: Option<String>,
    /// Host header for warm requests (default: each URL's own host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Default variations (`Header: value`, several joined by `;;`).
    #[serde(default)]
    pub variations: Vec<String>,
    /// File with the secret the warmer sends as `X-Warm-Token` (the VCL's `${warm_token}`);
    /// default: generated once under the state dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Learn every job's tags and re-warm the URLs of purged tags.
    #[serde(default)]
    pub rewarm_after_purge: bool,
    /// Purges within this quiet time coalesce into one re-warm (a reindex is one pass).
    #[serde(default = "default_rewarm_debounce_ms")]
    pub rewarm_debounce_ms: u64,
    /// A target edge that is disconnected, or makes no progress (a re-warm waiting on a
    /// purge it cannot apply, say), for this long is dropped from the job with the reason
    /// recorded, so no job waits on a dead edge (seconds; stretched for a shard that is
    /// slow at its rate).
    #[serde(default = "default_warm_edge_timeout_s")]
    pub edge_timeout_s: u64,
    /// (tag, URL) pairs the re-warm index keeps.
    #[serde(default = "default_tag_index_pairs")]
    pub tag_index_pairs: usize,
    /// Cron-scheduled jobs.
    #[serde(default)]
    pub schedule: Vec<ScheduleConfig>,
}

/// `[[warm.schedule]]`: a job started on a cron schedule (5 fields, or 6 with seconds
/// first; UTC).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct ScheduleConfig {
    pub name: String,
    pub cron: String,
    /// The job, as `POST /api/v1/warm/jobs` takes it (`sitemap`, `regions`, `rate`...).
    #[serde(flatten)]
    pub job: crate::warm::job::JobSpec,
}

impl ScheduleConfig {
    /// The parsed cron expression (5 fields, or 6 with seconds first).
    pub fn cron(&self) -> Result<croner::Cron, croner::errors::CronError> {
        croner::Cron::new(&self.cron)
            .with_seconds_optional()
            .parse()
    }
}

impl TryFrom<toml::Table> for ScheduleConfig {
    type Error = String;

    /// `name` and `cron`, and the rest is the job (whose unknown keys are errors, which
    /// `#[serde(flatten)]` alone would let through).
    fn try_from(mut t: toml::Table) -> Result<Self, String> {
        let mut take = |key: &str| match t.remove(key) {
            Some(toml::Value::String(s)) => Ok(s),
            Some(_) => Err(format!("warm.schedule: `{key}` must be a string")),
            None => Err(format!("warm.schedule: `{key}` is missing")),
        };
        let name = take("name")?;
        let cron = take("cron")?;
        let job = crate::warm::job::JobSpec::deserialize(toml::Value::Table(t))
            .map_err(|e| format!("warm.schedule {name:?}: {}", e.message()))?;
        Ok(ScheduleConfig { name, cron, job })
    }
}

fn default_origin_budget_rps() -> f64 {
    20.0
}
fn default_satellite_rate() -> f64 {
    50.0
}
fn default_warm_concurrency() -> u32 {
    4
}
fn default_shard_urls() -> usize {
    20
}
fn default_slow_ttfb_ms() -> u64 {
    2000
}
fn default_warm_timeout_ms() -> u64 {
    30_000
}
fn default_warm_max_urls() -> usize {
    1_000_000
}
fn default_warm_edge_timeout_s() -> u64 {
    60
}

fn default_rewarm_debounce_ms() -> u64 {
    2000
}
fn default_tag_index_pairs() -> usize {
    500_000
}

impl Default for WarmConfig {
    fn default() -> Self {
        WarmConfig {
            origin_budget_rps: default_origin_budget_rps(),
            satellite_rate: default_satellite_rate(),
            concurrency: default_warm_concurrency(),
            shard_urls: default_shard_urls(),
            slow_ttfb_ms: default_slow_ttfb_ms(),
            timeout_ms: default_warm_timeout_ms(),
            max_urls: default_warm_max_urls(),
            shield: None,
            host: None,
            variations: Vec::new(),
            token_file: None,
            rewarm_after_purge: false,
            rewarm_debounce_ms: default_rewarm_debounce_ms(),
            edge_timeout_s: default_warm_edge_timeout_s(),
            tag_index_pairs: default_tag_index_pairs(),
            schedule: Vec::new(),
        }
    }
}

impl WarmConfig {
    fn validate(&self, regions: &[String]) -> Result<(), String> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if self.edge_timeout_s == 0 {
            return Err("warm.edge_timeout_s must be positive".into());
        }
        if !positive(self.origin_budget_rps) || !positive(self.satellite_rate) {
            return Err("warm.origin_budget_rps and warm.satellite_rate must be positive".into());
        }
        if self.concurrency == 0 || self.concurrency > 64 {
            return Err("warm.concurrency must be 1..=64".into());
        }
        if self.shard_urls == 0 || self.shard_urls > 10_000 {
            return Err("warm.shard_urls must be 1..=10000".into());
        }
        if self.slow_ttfb_ms == 0 || self.timeout_ms == 0 || self.max_urls == 0 {
            return Err(
                "warm.slow_ttfb_ms, warm.timeout_ms and warm.max_urls must be positive".into(),
            );
        }
        if let Some(s) = &self.shield {
            if !regions.contains(s) {
                return Err(format!("warm.shield {s:?} is not a configured region"));
            }
        }
        for v in &self.variations {
            warmer::engine::parse_variation(v).map_err(|e| format!("warm.variations: {e}"))?;
        }
        for s in &self.schedule {
            s.cron()
                .map_err(|e| format!("warm.schedule {:?}: cron {:?}: {e}", s.name, s.cron))?;
            s.job
                .validate(regions)
                .map_err(|e| format!("warm.schedule {:?}: {e}", s.name))?;
        }
        Ok(())
    }
}

/// `[monitoring]`: how probe results become region health.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringConfig {
    /// `host:port` of the origin, probed straight from every region (besides through
    /// its varnish) to tell an edge failure from an origin failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Consecutive failures (or slow answers) before a check is down (or degraded).
    #[serde(default = "default_failures_to_down")]
    pub failures_to_down: u32,
    /// Consecutive good answers before it is up again.
    #[serde(default = "default_successes_to_up")]
    pub successes_to_up: u32,
    /// A connected edge whose oldest unapplied purge waited longer than this is
    /// `purge_stalled`, its region `degraded` (seconds).
    #[serde(default = "default_purge_lag_s")]
    pub purge_lag_s: u64,
    /// After the coordinator starts, a region with no agent yet reads `down`
    /// (`no_agents`) but alerts only once this passed (agents are still dialling in).
    #[serde(default = "default_startup_grace_s")]
    pub startup_grace_s: u64,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        MonitoringConfig {
            origin: None,
            failures_to_down: default_failures_to_down(),
            successes_to_up: default_successes_to_up(),
            purge_lag_s: default_purge_lag_s(),
            startup_grace_s: default_startup_grace_s(),
        }
    }
}

fn default_purge_lag_s() -> u64 {
    10
}

fn default_startup_grace_s() -> u64 {
    30
}

/// `[[checks]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    pub name: String,
    pub path: String,
    #[serde(default = "default_health_host")]
    pub host: String,
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u32,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u32,
    /// Answers slower than this (total time) count towards `degraded`.
    #[serde(default = "default_slow_ms")]
    pub slow_ms: u32,
}

/// `[alerts]`: where state changes are sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// `http://` URLs receiving a JSON POST (with a Slack-compatible `text`).
    #[serde(default)]
    pub webhooks: Vec<String>,
    /// Changes within this long are sent as one grouped alert.
    #[serde(default = "default_group_ms")]
    pub group_ms: u64,
    /// Delivery attempts per webhook.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhooks: Vec::new(),
            group_ms: default_group_ms(),
            attempts: default_attempts(),
        }
    }
}

fn default_failures_to_down() -> u32 {
    3
}
fn default_successes_to_up() -> u32 {
    2
}
fn default_expect_status() -> u16 {
    200
}
fn default_interval_ms() -> u32 {
    10_000
}
fn default_timeout_ms() -> u32 {
    2_000
}
fn default_slow_ms() -> u32 {
    1_000
}
fn default_group_ms() -> u64 {
    3_000
}
fn default_attempts() -> u32 {
    4
}

/// `[purge]`: the Magento-facing listener and the log's retention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeConfig {
    pub listen: SocketAddr,
    /// Sources allowed to purge; others get 405.
    #[serde(default = "default_allow")]
    pub allow: Vec<IpNet>,
    /// Request line plus headers; Magento's tag chunks are up to ~7.7 KB, 64 KiB lines pass.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "default_header_timeout_s")]
    pub header_timeout_s: u64,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Keep at most this many log entries...
    #[serde(default = "default_retention_entries")]
    pub retention_entries: u64,
    /// ...and none older than this; an edge further behind gets a full ban.
    #[serde(default = "default_retention_hours")]
    pub retention_hours: u64,
    /// Proxies in front of the listener whose `X-Forwarded-For` is believed.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// A file holding a shared secret every PURGE must carry in `secret_header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    #[serde(default = "default_secret_header")]
    pub secret_header: String,
}

fn default_secret_header() -> String {
    "X-Purge-Secret".into()
}

/// `[grpc]`: where agents connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    pub listen: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// `[grpc.tls]`: certificate files for mutual TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[api]`: JSON API, metrics and dashboard.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Bearer token for write endpoints; without it writes are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Require the token on read endpoints too (`/healthz` stays open).
    #[serde(default)]
    pub read_requires_token: bool,
}

/// `[[regions]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub name: String,
    #[serde(default)]
    pub lat: f64,
    #[serde(default)]
    pub lon: f64,
    /// Values substituted for `${name}` in this region's rendering of a config bundle
    /// (`region` is always defined as the region's name).
    #[serde(default)]
    pub vars: std::collections::BTreeMap<String, String>,
}

/// `[rollout]`: how config bundles reach the edges.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Region that gets a new bundle first; without one a push goes everywhere at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_region: Option<String>,
    /// How long the canary must stay healthy before the rest of the fleet follows.
    #[serde(default = "default_canary_wait_s")]
    pub canary_wait_s: u64,
    /// Path the agents GET through their varnish after switching (and periodically);
    /// a 5xx or no answer makes the canary unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    /// Host header for that request.
    #[serde(default = "default_health_host")]
    pub health_host: String,
    /// What to do when an edge runs something else than the desired version.
    #[serde(default)]
    pub drift: DriftPolicy,
    /// Coordinator VCLs each varnishd keeps loaded (the active one included).
    #[serde(default = "default_keep_vcls")]
    pub keep_vcls: u32,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            canary_region: None,
            canary_wait_s: default_canary_wait_s(),
            health_path: None,
            health_host: default_health_host(),
            drift: DriftPolicy::default(),
            keep_vcls: default_keep_vcls(),
        }
    }
}

/// `rollout.drift`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftPolicy {
    /// Put the desired version back on a drifted edge.
    #[default]
    Enforce,
    /// Only flag it (a restarted varnishd running its boot VCL is still brought back).
    Report,
}

fn default_canary_wait_s() -> u64 {
    60
}
fn default_health_host() -> String {
    "localhost".into()
}
fn default_keep_vcls() -> u32 {
    3
}

fn default_allow() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}
fn default_max_header_bytes() -> usize {
    72 * 1024
}
fn default_header_timeout_s() -> u64 {
    10
}
fn default_max_connections() -> usize {
    4096
}
fn default_retention_entries() -> u64 {
    1_000_000
}
fn default_retention_hours() -> u64 {
    24 * 7
}

/// A configuration that cannot be used, with one clear line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl CoordinatorConfig {
    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.message().to_owned()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let names: Vec<String> = self.regions.iter().map(|r| r.name.clone()).collect();
        self.warm.validate(&names).map_err(ConfigError::Invalid)?;
        if self.purge.max_header_bytes < 8 * 1024 {
            return invalid(
                "purge.max_header_bytes must be at least 8192 (Magento sends ~7.7 KB headers)"
                    .into(),
            );
        }
        if self.purge.retention_entries == 0 {
            return invalid("purge.retention_entries must be at least 1".into());
        }
        if self.purge.max_connections == 0 || self.purge.header_timeout_s == 0 {
            return invalid(
                "purge.max_connections and purge.header_timeout_s must be positive".into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for r in &self.regions {
            if r.name.is_empty()
                || !r
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return invalid(format!(
                    "region name {:?} must be non-empty [A-Za-z0-9_-]",
                    r.name
                ));
            }
            if !seen.insert(&r.name) {
                return invalid(format!("region {:?} is listed twice", r.name));
            }
            for name in r.vars.keys() {
                if !crate::bundle::vars::is_name(name) || name == "region" || name == "warm_token" {
                    return invalid(format!(
                        "region {:?}: variable name {name:?} must match [A-Za-z_][A-Za-z0-9_]* and not be `region` or `warm_token`",
                        r.name
                    ));
                }
            }
            if !(-90.0..=90.0).contains(&r.lat) || !(-180.0..=180.0).contains(&r.lon) {
                return invalid(format!("region {:?} has lat/lon out of range", r.name));
            }
        }
        if self.purge.secret_header.is_empty()
            || !self
                .purge
                .secret_header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return invalid("purge.secret_header must be a header name".into());
        }
        if self.api.read_requires_token && self.api.token_file.is_none() {
            return invalid("api.read_requires_token needs api.token_file".into());
        }
        if let Some(canary) = &self.rollout.canary_region {
            if !self.regions.iter().any(|r| &r.name == canary) {
                return invalid(format!(
                    "rollout.canary_region {canary:?} is not one of [[regions]]"
                ));
            }
        }
        if let Some(path) = &self.rollout.health_path {
            if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' ') {
                return invalid("rollout.health_path must be a path starting with /".into());
            }
        }
        if self.rollout.health_host.is_empty()
            || self
                .rollout
                .health_host
                .chars()
                .any(|c| c.is_control() || c == ' ')
        {
            return invalid("rollout.health_host must be a host name".into());
        }
        let mut names = std::collections::HashSet::new();
        for c in &self.checks {
            if c.name.is_empty()
                || !c
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                || !names.insert(&c.name)
            {
                return invalid(format!(
                    "check name {:?} must be unique [A-Za-z0-9_-]",
                    c.name
                ));
            }
            if !c.path.starts_with('/') || c.path.chars().any(|ch| ch.is_control() || ch == ' ') {
                return invalid(format!("check {}: path must start with /", c.name));
            }
            if c.host.is_empty() || c.host.chars().any(|ch| ch.is_control() || ch == ' ') {
                return invalid(format!("check {}: host must be a host name", c.name));
            }
            if c.interval_ms < 100
                || c.timeout_ms == 0
                || c.timeout_ms > c.interval_ms.max(1000) * 10
            {
                return invalid(format!(
                    "check {}: interval_ms >= 100 and a sane timeout_ms",
                    c.name
                ));
            }
        }
        if self.monitoring.purge_lag_s == 0 {
            return invalid("monitoring.purge_lag_s must be positive".into());
        }
        if self.monitoring.failures_to_down == 0 || self.monitoring.successes_to_up == 0 {
            return invalid(
                "monitoring.failures_to_down and successes_to_up must be positive".into(),
            );
        }
        if let Some(o) = &self.monitoring.origin {
            if o.contains('/') || !o.contains(':') {
                return invalid("monitoring.origin must be host:port".into());
            }
        }
        for w in &self.alerts.webhooks {
            if !w.starts_with("http://") {
                return invalid(format!(
                    "alerts.webhooks: {w:?} must be an http:// URL (put an https relay in front)"
                ));
            }
        }
        if self.alerts.attempts == 0 {
            return invalid("alerts.attempts must be at least 1".into());
        }
        if !(1..=50).contains(&self.rollout.keep_vcls) {
            return invalid("rollout.keep_vcls must be 1..=50".into());
        }
        Ok(())
    }

    /// Per-region substitution values for config bundles (`region` included).
    pub fn region_vars(
        &self,
        warm_token: &str,
    ) -> std::collections::BTreeMap<String, crate::bundle::vars::Vars> {
        self.regions
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    crate::bundle::vars::Vars::for_region(&r.name, &r.vars)
                        .with_warm_token(warm_token),
                )
            })
            .collect()
    }

    /// The listener settings derived from `[purge]` (reads `secret_file`).
    pub fn listener(&self) -> Result<ListenerConfig, ConfigError> {
        let secret = match &self.purge.secret_file {
            Some(path) => {
                let value = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let value = value.trim().to_owned();
                if value.is_empty() || value.chars().any(char::is_control) {
                    return Err(ConfigError::Invalid(format!(
                        "{}: the purge secret must be one non-empty line",
                        path.display()
                    )));
                }
                Some((self.purge.secret_header.clone(), value))
            }
            None => None,
        };
        Ok(ListenerConfig {
            trusted_proxies: self.purge.trusted_proxies.clone(),
            secret,
            allow: self.purge.allow.clone(),
            limits: Limits {
                max_head_bytes: self.purge.max_header_bytes,
                head_timeout: Duration::from_secs(self.purge.header_timeout_s),
                ..Limits::default()
            },
            max_connections: self.purge.max_connections,
        })
    }

    /// The log's retention derived from `[purge]`.
    pub fn retention(&self) -> Retention {
        Retention {
            max_entries: self.purge.retention_entries,
            max_age: Duration::from_secs(self.purge.retention_hours.saturating_mul(3600)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[purge]
listen = "0.0.0.0:6091"
allow = ["127.0.0.0/8", "10.0.0.0/8"]
[grpc]
listen = "0.0.0.0:6092"
[api]
listen = "127.0.0.1:6093"
token_file = "/etc/coordinator/token"
[[regions]]
name = "eu-west"
lat = 53.35
lon = -6.26
"#;

    #[test]
    fn design_sample_parses() {
        let c: CoordinatorConfig = toml::from_str(SAMPLE).unwrap();
        c.validate().unwrap();
        assert_eq!(c.purge.allow.len(), 2);
        assert_eq!(c.purge.retention_entries, 1_000_000);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let bad = SAMPLE.replace("[grpc]", "[grpc]\nlisten_typo = 1");
        assert!(toml::from_str::<CoordinatorConfig>(&bad).is_err());
    }

    #[test]
    fn duplicate_regions_are_refused() {
        let bad = format!("{SAMPLE}\n[[regions]]\nname = \"eu-west\"\n");
        let c: CoordinatorConfig = toml::from_str(&bad).unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn warm_table_is_checked() {
        let ok = format!(
            "{SAMPLE}\n[warm]\nshield = \"eu-west\"\n[[warm.schedule]]\nname = \"n\"\ncron = \"30 3 * * *\"\nsitemap = \"http://s/sitemap.xml\"\n[[warm.schedule]]\nname = \"fast\"\ncron = \"*/5 * * * * *\"\ntop = 10\n"
        );
        let c: CoordinatorConfig = toml::from_str(&ok).unwrap();
        c.validate().unwrap();
        assert_eq!(c.warm.schedule.len(), 2);
        for (from, to, what) in [
            ("30 3 * * *", "61 3 * * *", "cron"),
            ("shield = \"eu-west\"", "shield = \"mars\"", "shield"),
            ("top = 10", "top = 0", "top"),
        ] {
            let bad: CoordinatorConfig = toml::from_str(&ok.replace(from, to)).unwrap();
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        }
        let typo = ok.replace("top = 10", "tpo = 10");
        assert!(toml::from_str::<CoordinatorConfig>(&typo).is_err());
    }
}
