//! `[warm]` and `[[warm.schedule]]`: the warmer's origin budget, per-edge limits, the
//! re-warm index and cron-scheduled jobs. The section checks itself; the region names it
//! refers to come from the caller.

use std::path::PathBuf;

use daemon::ConfigError;
use serde::{Deserialize, Serialize};

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
    /// Set by the coordinator from `[purge] refresh_tags` / `refresh_max_stale_s` (not a
    /// key of this section): soft tag purges are refreshed, within this many seconds.
    #[serde(skip)]
    pub refresh_max_stale_s: Option<u64>,
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
    pub job: super::job::JobSpec,
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
        let job = super::job::JobSpec::deserialize(toml::Value::Table(t))
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
            refresh_max_stale_s: None,
        }
    }
}

impl WarmConfig {
    /// Checks the section; `regions` are the configured region names (the shield and
    /// scheduled jobs must name them).
    pub fn validate(&self, regions: &[String]) -> Result<(), ConfigError> {
        self.check(regions).map_err(ConfigError::Invalid)
    }

    fn check(&self, regions: &[String]) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_entries_parse_with_the_job_flattened() {
        let c: ScheduleConfig = toml::from_str(
            r#"
name = "nightly"
cron = "0 3 * * *"
sitemap = "http://shop/sitemap.xml"
regions = ["eu"]
rate = 5.0
"#,
        )
        .unwrap();
        assert_eq!(c.job.rate, Some(5.0));
        assert!(toml::from_str::<ScheduleConfig>(
            "name = \"x\"\ncron = \"* * * * *\"\nsitemap = \"http://s/\"\nbogus = 1\n"
        )
        .is_err());
    }
}
