//! `[rollout]`: canary region and wait, the health request agents make after a switch,
//! the drift policy and how many VCLs varnishd keeps. The section checks its own values;
//! that the canary region exists is checked where the regions are known.

use daemon::ConfigError;
use serde::{Deserialize, Serialize};

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

impl RolloutConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::invalid(m));
        if let Some(path) = &self.health_path {
            if !path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' ') {
                return invalid("rollout.health_path must be a path starting with /");
            }
        }
        if self.health_host.is_empty()
            || self.health_host.chars().any(|c| c.is_control() || c == ' ')
        {
            return invalid("rollout.health_host must be a host name");
        }
        if !(1..=50).contains(&self.keep_vcls) {
            return invalid("rollout.keep_vcls must be 1..=50");
        }
        Ok(())
    }
}
