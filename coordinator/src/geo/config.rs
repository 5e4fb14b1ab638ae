//! `[geo]` and `[dns]`: where the MaxMind database is, when a region may receive
//! shoppers (how far behind on purges it may be, how long it must stay well before it
//! gets them back), and the zone the PowerDNS remote backend serves.
//!
//! Both sections check themselves; the region names they refer to come from the caller.

use std::net::SocketAddr;
use std::path::PathBuf;

use daemon::ConfigError;
use serde::{Deserialize, Serialize};

/// `[geo]`: GeoIP routing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoConfig {
    /// A MaxMind DB file (GeoIP2/GeoLite2 City or Country). Replace it by rename.
    pub database: PathBuf,
    /// Where a client the database does not know goes (when it is eligible).
    pub default_region: String,
    /// Entries an edge may be behind the log head and still receive shoppers.
    #[serde(default = "default_max_purge_lag")]
    pub max_purge_lag: u64,
    /// Seconds the oldest purge an edge has not applied may wait.
    #[serde(default = "default_max_purge_lag_s")]
    pub max_purge_lag_s: f64,
    /// A region that was ineligible must stay healthy and in sync this long first.
    #[serde(default = "default_recover_s")]
    pub recover_s: u64,
    /// How often the database file is checked for a change (seconds).
    #[serde(default = "default_reload_check_s")]
    pub reload_check_s: u64,
}

fn default_max_purge_lag() -> u64 {
    1000
}
fn default_max_purge_lag_s() -> f64 {
    10.0
}
fn default_recover_s() -> u64 {
    30
}
fn default_reload_check_s() -> u64 {
    2
}

impl GeoConfig {
    /// `default_region` is one of `regions`; the timings are usable.
    pub fn validate(&self, regions: &[String]) -> Result<(), ConfigError> {
        if !regions.contains(&self.default_region) {
            return Err(ConfigError::Invalid(format!(
                "geo.default_region {:?} is not one of [[regions]]",
                self.default_region
            )));
        }
        if !(self.max_purge_lag_s.is_finite() && self.max_purge_lag_s > 0.0) {
            return Err(ConfigError::invalid(
                "geo.max_purge_lag_s must be a positive number of seconds",
            ));
        }
        if !(1..=60).contains(&self.reload_check_s) {
            return Err(ConfigError::invalid(
                "geo.reload_check_s must be between 1 and 60 (a changed database takes effect within 10 s by default)",
            ));
        }
        Ok(())
    }
}

/// `[dns]`: the PowerDNS remote backend (HTTP connector, path `/dns`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    pub listen: SocketAddr,
    /// The zone served, with or without the final dot (`shop.example.`).
    pub zone: String,
    /// Names answered with the chosen region's addresses: `www`, or `@` for the apex.
    pub names: Vec<String>,
    /// TTL of the A/AAAA answers (seconds).
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// The zone's name servers (NS records; default `ns1.ZONE`).
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// The SOA's responsible mailbox in DNS form (default `hostmaster.ZONE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostmaster: Option<String>,
    /// TTL of SOA and NS (seconds).
    #[serde(default = "default_zone_ttl")]
    pub zone_ttl: u32,
}

fn default_ttl() -> u32 {
    30
}
fn default_zone_ttl() -> u32 {
    3600
}

impl DnsConfig {
    /// A zone and names that are DNS names; `[dns]` needs `[geo]` (the caller checks).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let zone = self.zone.trim_end_matches('.');
        if !is_dns_name(zone) {
            return Err(ConfigError::Invalid(format!(
                "dns.zone {:?} is not a DNS name",
                self.zone
            )));
        }
        if self.names.is_empty() {
            return Err(ConfigError::invalid(
                "dns.names is empty: list the names to answer, e.g. [\"www\", \"@\"]",
            ));
        }
        for n in &self.names {
            if n != "@" && !is_dns_name(n.trim_end_matches('.')) {
                return Err(ConfigError::Invalid(format!(
                    "dns.names: {n:?} is not a DNS label (or `@` for the apex)"
                )));
            }
        }
        for ns in &self.nameservers {
            if !is_dns_name(ns.trim_end_matches('.')) {
                return Err(ConfigError::Invalid(format!(
                    "dns.nameservers: {ns:?} is not a DNS name"
                )));
            }
        }
        if self.ttl == 0 {
            return Err(ConfigError::invalid("dns.ttl must be at least 1 second"));
        }
        Ok(())
    }
}

/// Labels of letters, digits, `-` and `_`, 1–63 bytes each, 253 in all.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns(zone: &str, names: &[&str]) -> DnsConfig {
        DnsConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            zone: zone.into(),
            names: names.iter().map(|s| s.to_string()).collect(),
            ttl: 30,
            nameservers: vec![],
            hostmaster: None,
            zone_ttl: 3600,
        }
    }

    #[test]
    fn dns_names_are_checked() {
        assert!(dns("shop.example.", &["www", "@"]).validate().is_ok());
        assert!(dns("shop..example", &["www"]).validate().is_err());
        assert!(dns("shop.example", &[]).validate().is_err());
        assert!(dns("shop.example", &["w w"]).validate().is_err());
    }

    #[test]
    fn geo_needs_a_known_default_region() {
        let geo: GeoConfig =
            toml::from_str("database = \"/x.mmdb\"\ndefault_region = \"eu\"").expect("toml");
        assert!(geo.validate(&["eu".into()]).is_ok());
        let err = geo.validate(&["us".into()]).expect_err("unknown region");
        assert!(err.to_string().contains("geo.default_region"), "{err}");
        assert_eq!((geo.max_purge_lag, geo.recover_s), (1000, 30));
    }
}
