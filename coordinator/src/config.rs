//! `coordinator.toml`: the whole file as one struct of sections.
//!
//! Each subsystem owns its section and checks it ([`PurgeConfig`] in `purge::config`,
//! [`RolloutConfig`] in `rollout::config`, [`MonitoringConfig`], [`CheckConfig`] and
//! [`AlertsConfig`] in `monitor::config`, [`WarmConfig`] in `warm::config`, [`TlsConfig`]
//! in `tls`). This module aggregates them, holds the sections that belong to no single
//! subsystem (`[grpc]`, `[api]`, `[[regions]]`), and checks what spans sections: the
//! canary region, the shield and scheduled jobs' regions exist in `[[regions]]`.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

pub use crate::cluster::config::{Backend as StoreBackend, StoreConfig};
pub use daemon::ConfigError;
use serde::{Deserialize, Serialize};

pub use crate::geo::config::{DnsConfig, GeoConfig};
pub use crate::monitor::config::{
    AlertRule, AlertsConfig, CheckConfig, MonitoringConfig, RuleMetric,
};
pub use crate::purge::config::{PurgeConfig, MAGENTO_STALE_S};
pub use crate::rollout::config::{DriftPolicy, RolloutConfig};
pub use crate::tls::TlsConfig;
pub use crate::warm::config::{ScheduleConfig, WarmConfig};

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
    /// GeoIP routing (`/api/v1/route`, per-country traffic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geo: Option<GeoConfig>,
    /// The PowerDNS remote backend (needs `[geo]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
    /// Where the purge log lives: the state dir (default) or etcd, shared by a cluster.
    #[serde(default)]
    pub store: StoreConfig,
}

/// `[grpc]`: where agents connect.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    pub listen: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Connections from one source address (an IPv6 /64) still in their TLS handshake
    /// (or, plaintext, before their first bytes), at most; one more is closed at once.
    /// Raise it for many agents behind one NAT address.
    #[serde(default = "default_handshakes_per_source")]
    pub handshakes_per_source: usize,
}

fn default_handshakes_per_source() -> usize {
    crate::accept::HANDSHAKES_PER_SOURCE
}

/// `[api]`: JSON API, metrics and dashboard.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Bearer token for write endpoints; without it writes are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Require a token on read endpoints too (`/healthz` stays open).
    #[serde(default)]
    pub read_requires_token: bool,
    /// Named tokens, each with its scopes (`[[api.tokens]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<crate::tokens::TokenConfig>,
    /// Audit entries kept (newest first; older ones are dropped).
    #[serde(default = "default_audit_keep")]
    pub audit_keep: usize,
    /// Days an audit entry is kept.
    #[serde(default = "default_audit_keep_days")]
    pub audit_keep_days: u64,
    /// Connections served at once; more wait in the kernel's backlog.
    #[serde(default = "default_api_max_connections")]
    pub max_connections: usize,
    /// A new connection's first request head, and any head once it started, must arrive
    /// within this (else 408 and close).
    #[serde(default = "default_api_header_timeout_s")]
    pub header_timeout_s: u64,
    /// A kept-alive connection waiting for its next request is closed after this.
    #[serde(default = "default_api_idle_timeout_s")]
    pub idle_timeout_s: u64,
    /// Reading a request body (once its head was admitted), and writing an answer.
    #[serde(default = "default_api_body_timeout_s")]
    pub body_timeout_s: u64,
}

pub fn default_audit_keep() -> usize {
    10_000
}
pub fn default_audit_keep_days() -> u64 {
    90
}
pub fn default_api_max_connections() -> usize {
    256
}
pub fn default_api_header_timeout_s() -> u64 {
    10
}
pub fn default_api_idle_timeout_s() -> u64 {
    60
}
pub fn default_api_body_timeout_s() -> u64 {
    30
}

impl ApiConfig {
    /// The API on `listen` with every other setting at its default.
    pub fn new(listen: SocketAddr) -> Self {
        ApiConfig {
            listen,
            token_file: None,
            read_requires_token: false,
            tokens: Vec::new(),
            audit_keep: default_audit_keep(),
            audit_keep_days: default_audit_keep_days(),
            max_connections: default_api_max_connections(),
            header_timeout_s: default_api_header_timeout_s(),
            idle_timeout_s: default_api_idle_timeout_s(),
            body_timeout_s: default_api_body_timeout_s(),
        }
    }

    /// The front's bounds (also used for the DNS backend's listener).
    pub fn front_limits(&self) -> crate::http_front::FrontLimits {
        crate::http_front::FrontLimits {
            max_connections: self.max_connections,
            max_head_bytes: crate::http_front::MAX_HEAD_BYTES,
            header_timeout: std::time::Duration::from_secs(self.header_timeout_s),
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_s),
            body_timeout: std::time::Duration::from_secs(self.body_timeout_s),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.read_requires_token && self.token_file.is_none() && self.tokens.is_empty() {
            return Err(ConfigError::invalid(
                "api.read_requires_token needs api.token_file or [[api.tokens]]",
            ));
        }
        crate::tokens::validate(&self.tokens, self.token_file.as_deref())
            .map_err(ConfigError::Invalid)?;
        if !(10..=1_000_000).contains(&self.audit_keep) {
            return Err(ConfigError::invalid(
                "api.audit_keep must be between 10 and 1000000",
            ));
        }
        if !(1..=3650).contains(&self.audit_keep_days) {
            return Err(ConfigError::invalid(
                "api.audit_keep_days must be between 1 and 3650",
            ));
        }
        if !(1..=100_000).contains(&self.max_connections) {
            return Err(ConfigError::invalid(
                "api.max_connections must be between 1 and 100000",
            ));
        }
        for (name, v) in [
            ("header_timeout_s", self.header_timeout_s),
            ("idle_timeout_s", self.idle_timeout_s),
            ("body_timeout_s", self.body_timeout_s),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(ConfigError::Invalid(format!(
                    "api.{name} must be between 1 and 3600 seconds"
                )));
            }
        }
        Ok(())
    }
}

/// `[[regions]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub name: String,
    /// Where the region is (degrees); geo routing needs both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lat: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lon: Option<f64>,
    /// What DNS and `/api/v1/route` answer for this region (its public addresses).
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Values substituted for `${name}` in this region's rendering of a config bundle
    /// (`region` is always defined as the region's name).
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
}

impl CoordinatorConfig {
    /// Reads, parses and validates a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        daemon::load(path)
    }

    /// The configured region names, in file order.
    pub fn region_names(&self) -> Vec<String> {
        self.regions.iter().map(|r| r.name.clone()).collect()
    }

    /// Each region's place and addresses, for geo routing.
    pub fn region_points(&self) -> Vec<crate::geo::RegionPoint> {
        self.regions
            .iter()
            .map(|r| crate::geo::RegionPoint {
                name: r.name.clone(),
                lat: r.lat.unwrap_or(0.0),
                lon: r.lon.unwrap_or(0.0),
                addresses: r.addresses.clone(),
            })
            .collect()
    }

    /// Per-region substitution values for config bundles (`region` included).
    pub fn region_vars(&self, warm_token: &str) -> BTreeMap<String, crate::bundle::vars::Vars> {
        self.regions
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    crate::bundle::vars::Vars::for_region(&r.name, &r.vars)
                        .with_warm_token(warm_token)
                        .with_max_stale(self.purge.max_stale_s()),
                )
            })
            .collect()
    }
}

impl daemon::Validate for CoordinatorConfig {
    /// Every section's own checks, then what spans sections.
    fn validate(&self) -> Result<(), ConfigError> {
        let names = self.region_names();
        self.purge.validate()?;
        self.store.validate(self.api.listen)?;
        self.rollout.validate()?;
        self.monitoring.validate()?;
        CheckConfig::validate_all(&self.checks)?;
        self.alerts.validate()?;
        self.warm.validate(&names)?;
        RegionConfig::validate_all(&self.regions)?;
        self.api.validate()?;
        let admin = self.api.token_file.is_some()
            || self
                .api
                .tokens
                .iter()
                .any(|t| t.scopes.contains(&crate::tokens::Scope::Admin));
        if self.store.backend == crate::cluster::config::Backend::Etcd
            && !self.api.tokens.is_empty()
            && !admin
        {
            return Err(ConfigError::invalid(
                "[[api.tokens]] in a cluster needs a token with the admin scope (or [api] token_file): coordinators call each other with it",
            ));
        }
        if self.grpc.handshakes_per_source == 0 {
            return Err(ConfigError::invalid(
                "grpc.handshakes_per_source must be at least 1",
            ));
        }
        for rule in &self.alerts.rules {
            if let Some(r) = rule.regions.iter().find(|r| !names.contains(r)) {
                return Err(ConfigError::Invalid(format!(
                    "alerts.rules {:?}: region {r:?} is not one of [[regions]]",
                    rule.name
                )));
            }
        }
        if let Some(geo) = &self.geo {
            geo.validate(&names)?;
            if let Some(r) = self
                .regions
                .iter()
                .find(|r| r.lat.is_none() || r.lon.is_none())
            {
                return Err(ConfigError::Invalid(format!(
                    "[geo] is set but region {:?} has no lat and lon: routing measures distances to them",
                    r.name
                )));
            }
        }
        if let Some(dns) = &self.dns {
            dns.validate()?;
            if self.geo.is_none() {
                return Err(ConfigError::invalid(
                    "[dns] needs [geo]: the answers come from geo routing",
                ));
            }
            if let Some(r) = self.regions.iter().find(|r| r.addresses.is_empty()) {
                return Err(ConfigError::Invalid(format!(
                    "[dns] is set but region {:?} has no addresses: DNS would have nothing to answer for it",
                    r.name
                )));
            }
        }
        if let Some(canary) = &self.rollout.canary_region {
            if !names.contains(canary) {
                return Err(ConfigError::Invalid(format!(
                    "rollout.canary_region {canary:?} is not one of [[regions]]"
                )));
            }
        }
        Ok(())
    }
}

impl CoordinatorConfig {
    /// Checks what serde cannot (see [`daemon::Validate`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        daemon::Validate::validate(self)
    }
}

impl RegionConfig {
    /// Names are unique identifiers, variables are bundle variable names, coordinates
    /// are on Earth.
    pub fn validate_all(regions: &[RegionConfig]) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let mut seen = HashSet::new();
        for r in regions {
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
                if !crate::bundle::vars::is_name(name)
                    || matches!(name.as_str(), "region" | "warm_token" | "warm_tier_token")
                {
                    return invalid(format!(
                        "region {:?}: variable name {name:?} must match [A-Za-z_][A-Za-z0-9_]* and not be a built-in (`region`, `warm_token`, `warm_tier_token`)",
                        r.name
                    ));
                }
            }
            if !r.lat.is_none_or(|lat| (-90.0..=90.0).contains(&lat))
                || !r.lon.is_none_or(|lon| (-180.0..=180.0).contains(&lon))
            {
                return invalid(format!("region {:?} has lat/lon out of range", r.name));
            }
        }
        Ok(())
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
addresses = ["203.0.113.10", "2001:db8::10"]
"#;

    /// The `[geo]` and `[dns]` blocks of README's coordinator.toml.
    const GEO: &str = r#"
[geo]
database = "/var/lib/GeoIP/GeoLite2-City.mmdb"
default_region = "eu-west"
max_purge_lag = 1000
max_purge_lag_s = 10
recover_s = 30
[dns]
listen = "127.0.0.1:6094"
zone = "shop.example."
names = ["www", "@"]
ttl = 30
"#;

    #[test]
    fn geo_and_dns_blocks_parse_and_are_checked() {
        let c: CoordinatorConfig = toml::from_str(&format!("{SAMPLE}{GEO}")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.region_points()[0].addresses.len(), 2);
        let dns_only = format!("{SAMPLE}{}", &GEO[GEO.find("[dns]").unwrap()..]);
        let c: CoordinatorConfig = toml::from_str(&dns_only).unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("[dns] needs [geo]"));
        let no_place = format!("{SAMPLE}{GEO}\n[[regions]]\nname = \"us-east\"\n");
        let c: CoordinatorConfig = toml::from_str(&no_place).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("\"us-east\" has no lat and lon"), "{err}");
        let no_addr = format!("{no_place}lat = 38.9\nlon = -77.0\n");
        let c: CoordinatorConfig = toml::from_str(&no_addr).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("\"us-east\" has no addresses"), "{err}");
        let bad_default = format!("{SAMPLE}{GEO}")
            .replace("default_region = \"eu-west\"", "default_region = \"mars\"");
        let c: CoordinatorConfig = toml::from_str(&bad_default).unwrap();
        assert!(c.validate().is_err());
        let bad_addr = SAMPLE.replace("203.0.113.10", "not-an-ip");
        assert!(toml::from_str::<CoordinatorConfig>(&bad_addr).is_err());
    }

    #[test]
    fn design_sample_parses() {
        let c: CoordinatorConfig = toml::from_str(SAMPLE).unwrap();
        c.validate().unwrap();
        assert_eq!(c.purge.allow.len(), 2);
        assert_eq!(c.purge.retention_entries, 1_000_000);
    }

    #[test]
    fn api_limits_have_safe_defaults_and_are_checked() {
        let c: CoordinatorConfig = toml::from_str(SAMPLE).unwrap();
        let l = c.api.front_limits();
        assert_eq!(l.max_connections, 256);
        assert_eq!(l.header_timeout, std::time::Duration::from_secs(10));
        assert_eq!(l.idle_timeout, std::time::Duration::from_secs(60));
        assert_eq!(l.body_timeout, std::time::Duration::from_secs(30));
        for (key, bad) in [
            ("max_connections", "0"),
            ("header_timeout_s", "0"),
            ("idle_timeout_s", "0"),
            ("body_timeout_s", "7200"),
        ] {
            let text = SAMPLE.replace("[api]\n", &format!("[api]\n{key} = {bad}\n"));
            let c: CoordinatorConfig = toml::from_str(&text).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
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

    #[test]
    fn a_bad_value_is_named_by_line_column_key_and_value() {
        let bad = SAMPLE.replace("\"10.0.0.0/8\"]", "\"10.0.0.0/33\"]");
        let err = daemon::config::parse::<CoordinatorConfig>(&bad)
            .expect_err("bad CIDR")
            .to_string();
        assert!(
            err.starts_with("4:25: purge.allow[1]: \"10.0.0.0/33\": invalid IP address"),
            "{err}"
        );
        let typo = SAMPLE.replace("[grpc]", "[grpc]\nlisten_typo = 1");
        let err = daemon::config::parse::<CoordinatorConfig>(&typo)
            .expect_err("unknown key")
            .to_string();
        assert!(err.starts_with("6:1: unknown field `listen_typo`"), "{err}");
    }
}
