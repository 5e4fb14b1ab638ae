//! `[purge]`: the Magento-facing listener (who may purge, header limits, the optional
//! shared secret) and the log's retention. The section checks itself and derives the
//! [`ListenerConfig`] and [`Retention`] the listener and the log take.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use daemon::ConfigError;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::listener::ListenerConfig;
use super::log::Retention;
use super::wire::Limits;

/// `[purge]`: the Magento-facing listener and the log's retention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeConfig {
    pub listen: SocketAddr,
    /// Sources allowed to purge; others get 405.
    #[serde(default = "default_allow", deserialize_with = "daemon::cidr::list")]
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
    #[serde(default, deserialize_with = "daemon::cidr::list")]
    pub trusted_proxies: Vec<IpNet>,
    /// A file holding a shared secret every PURGE must carry in `secret_header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    #[serde(default = "default_secret_header")]
    pub secret_header: String,
    /// Accept `X-Magento-Tags-Pattern` / `X-Pool` regexes other than Magento's tag
    /// pattern, `.*` and plain pool names; each is trial-matched under varnishd's
    /// default PCRE2 limits first, and refused if it reaches them.
    #[serde(default)]
    pub allow_regex: bool,
    /// Refresh instead of evict: a tag purge marks its pages stale (xkey soft purge);
    /// shoppers are served the stale copy while the coordinator re-renders the pages,
    /// most requested first, through the shield and within the warm budget. Full flushes
    /// and `X-Pool` purges stay hard. Needs the agents in xkey mode (in ban mode a tag
    /// purge evicts, then the pages are re-warmed).
    #[serde(default)]
    pub refresh_tags: bool,
    /// A page a refresh has not reached this long after the purge is evicted (a miss for
    /// the next shopper), so a purged price is never hidden longer.
    #[serde(default = "default_refresh_max_stale_s")]
    pub refresh_max_stale_s: u64,
}

/// How long varnish serves a stale copy while the backend is healthy when not in refresh
/// mode (Magento's stock VCL: 300 s).
pub const MAGENTO_STALE_S: u64 = 300;

fn default_refresh_max_stale_s() -> u64 {
    30
}

fn default_secret_header() -> String {
    "X-Purge-Secret".into()
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

impl PurgeConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::invalid(m));
        if self.max_header_bytes < 8 * 1024 {
            return invalid(
                "purge.max_header_bytes must be at least 8192 (Magento sends ~7.7 KB headers)",
            );
        }
        if self.retention_entries == 0 {
            return invalid("purge.retention_entries must be at least 1");
        }
        if self.max_connections == 0 || self.header_timeout_s == 0 {
            return invalid("purge.max_connections and purge.header_timeout_s must be positive");
        }
        if self.secret_header.is_empty()
            || !self
                .secret_header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return invalid("purge.secret_header must be a header name");
        }
        if self.refresh_max_stale_s == 0 || self.refresh_max_stale_s > 86_400 {
            return invalid("purge.refresh_max_stale_s must be 1..=86400 seconds");
        }
        Ok(())
    }

    /// How long a stale copy may be served while the backend is healthy: the VCL's
    /// `${max_stale_s}`.
    pub fn max_stale_s(&self) -> u64 {
        if self.refresh_tags {
            self.refresh_max_stale_s
        } else {
            MAGENTO_STALE_S
        }
    }

    /// The listener settings (reads `secret_file`).
    pub fn listener(&self) -> Result<ListenerConfig, ConfigError> {
        let secret = match &self.secret_file {
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
                Some((self.secret_header.clone(), value))
            }
            None => None,
        };
        Ok(ListenerConfig {
            trusted_proxies: self.trusted_proxies.clone(),
            secret,
            allow: self.allow.clone(),
            limits: Limits {
                max_head_bytes: self.max_header_bytes,
                head_timeout: Duration::from_secs(self.header_timeout_s),
                ..Limits::default()
            },
            max_connections: self.max_connections,
            patterns: super::pattern::Policy {
                allow_regex: self.allow_regex,
            },
            refresh_tags: self.refresh_tags,
        })
    }

    /// The log's retention.
    pub fn retention(&self) -> Retention {
        Retention {
            max_entries: self.retention_entries,
            max_age: Duration::from_secs(self.retention_hours.saturating_mul(3600)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_regexes_are_off_unless_asked_for() {
        let c: PurgeConfig = toml::from_str("listen = \"127.0.0.1:6091\"").expect("config");
        assert!(!c.allow_regex);
        assert!(!c.listener().expect("listener").patterns.allow_regex);
        let c: PurgeConfig =
            toml::from_str("listen = \"127.0.0.1:6091\"\nallow_regex = true").expect("config");
        assert!(c.listener().expect("listener").patterns.allow_regex);
        assert!(
            toml::from_str::<PurgeConfig>("listen = \"127.0.0.1:6091\"\nallow_regexes = 1")
                .is_err()
        );
    }
}
