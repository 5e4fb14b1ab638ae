//! `[monitoring]`, `[[checks]]` and `[alerts]`: how probe results and purge lag become
//! region health, and where state changes are sent. Each section checks itself.

use daemon::ConfigError;
use serde::{Deserialize, Serialize};

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
    /// `purge_stalled`, its region `degraded` (seconds; the same knob as `[geo]
    /// max_purge_lag_s`, which keeps shoppers away from such a region). Formerly
    /// `purge_lag_s`, still read.
    #[serde(default = "default_max_purge_lag_s", alias = "purge_lag_s")]
    pub max_purge_lag_s: f64,
    /// After the coordinator starts, a region with no agent yet reads `down`
    /// (`no_agents`) but alerts only once this passed (agents are still dialling in).
    #[serde(default = "default_startup_grace_s")]
    pub startup_grace_s: u64,
    /// A region one of whose edges saw its varnishd cache process restart (a panic, a
    /// kill: the cache is empty) within this long is `degraded` (`varnish_restarted`);
    /// it clears by itself once the restart is this old (seconds; 0: never).
    #[serde(default = "default_varnish_restart_s")]
    pub varnish_restart_s: u64,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        MonitoringConfig {
            origin: None,
            failures_to_down: default_failures_to_down(),
            successes_to_up: default_successes_to_up(),
            max_purge_lag_s: default_max_purge_lag_s(),
            startup_grace_s: default_startup_grace_s(),
            varnish_restart_s: default_varnish_restart_s(),
        }
    }
}

fn default_max_purge_lag_s() -> f64 {
    10.0
}

fn default_startup_grace_s() -> u64 {
    30
}

/// Five minutes: long enough to be seen and to refill the hottest pages, short enough
/// not to hide the next problem.
fn default_varnish_restart_s() -> u64 {
    300
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
    /// Rules on what shoppers are served (from varnish's log): a region breaching one
    /// reads `degraded` and alerts like any other change.
    #[serde(default)]
    pub rules: Vec<AlertRule>,
}

/// `[[alerts.rules]]`: e.g. shoppers served slower than `above` ms on average, every
/// minute for `for_minutes` minutes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    pub name: String,
    pub metric: RuleMetric,
    /// The threshold: milliseconds for `served_mean_ms`, a share (0..1) for
    /// `served_5xx_ratio`.
    pub above: f64,
    /// Consecutive minutes over the threshold (the current one counts once it has
    /// `min_requests`).
    #[serde(default = "default_for_minutes")]
    pub for_minutes: u32,
    /// A minute with fewer shopper requests says nothing (too few to judge).
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Regions it applies to (default: every region).
    #[serde(default)]
    pub regions: Vec<String>,
}

/// What an [`AlertRule`] measures, per region and minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleMetric {
    /// Mean time varnish took to serve shoppers (ms).
    ServedMeanMs,
    /// Share of shoppers' requests answered 5xx.
    Served5xxRatio,
}

fn default_for_minutes() -> u32 {
    3
}
fn default_min_requests() -> u64 {
    10
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhooks: Vec::new(),
            rules: Vec::new(),
            group_ms: default_group_ms(),
            attempts: default_attempts(),
        }
    }
}

fn default_health_host() -> String {
    "localhost".into()
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

impl MonitoringConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::invalid(m));
        if !(self.max_purge_lag_s.is_finite() && self.max_purge_lag_s > 0.0) {
            return invalid("monitoring.max_purge_lag_s must be a positive number of seconds");
        }
        if self.failures_to_down == 0 || self.successes_to_up == 0 {
            return invalid("monitoring.failures_to_down and successes_to_up must be positive");
        }
        if let Some(o) = &self.origin {
            if o.contains('/') || !o.contains(':') {
                return invalid("monitoring.origin must be host:port");
            }
        }
        Ok(())
    }
}

impl CheckConfig {
    /// Checks every `[[checks]]` entry and that their names are unique.
    pub fn validate_all(checks: &[CheckConfig]) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let mut names = std::collections::HashSet::new();
        for c in checks {
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
        Ok(())
    }
}

impl AlertsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for w in &self.webhooks {
            if !w.starts_with("http://") {
                return Err(ConfigError::Invalid(format!(
                    "alerts.webhooks: {w:?} must be an http:// URL (put an https relay in front)"
                )));
            }
        }
        if self.attempts == 0 {
            return Err(ConfigError::invalid("alerts.attempts must be at least 1"));
        }
        let mut names = std::collections::HashSet::new();
        for r in &self.rules {
            let bad = |m: &str| {
                Err(ConfigError::Invalid(format!(
                    "alerts.rules {:?}: {m}",
                    r.name
                )))
            };
            if r.name.is_empty() || r.name.chars().any(|c| c.is_control()) || !names.insert(&r.name)
            {
                return bad("name must be unique and non-empty");
            }
            if !r.above.is_finite() || r.above < 0.0 {
                return bad("above must be a number >= 0");
            }
            if r.metric == RuleMetric::Served5xxRatio && r.above >= 1.0 {
                return bad("above is a share for served_5xx_ratio: below 1 (0.05 = 5 %)");
            }
            if !(1..=60).contains(&r.for_minutes) {
                return bad("for_minutes must be 1..=60");
            }
            if r.min_requests == 0 {
                return bad("min_requests must be at least 1");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_purge_lag_bound_reads_its_old_name_too() {
        let new: MonitoringConfig = toml::from_str("max_purge_lag_s = 2.5").expect("toml");
        assert_eq!(new.max_purge_lag_s, 2.5);
        // A config written before the rename (`purge_lag_s`, whole seconds) still loads.
        let old: MonitoringConfig = toml::from_str("purge_lag_s = 30").expect("old toml");
        assert_eq!(old.max_purge_lag_s, 30.0);
        assert!(old.validate().is_ok());
        assert_eq!(MonitoringConfig::default().max_purge_lag_s, 10.0);
        let zero: MonitoringConfig = toml::from_str("max_purge_lag_s = 0").expect("toml");
        let err = zero.validate().expect_err("zero");
        assert!(err.to_string().contains("max_purge_lag_s"), "{err}");
    }
}
