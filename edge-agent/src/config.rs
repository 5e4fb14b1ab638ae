//! `edge-agent.toml`: explicit structs, defaults, `validate()`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The coordinators to dial: one URL (`coordinator = "https://c1:6092"`) or several
/// (`coordinator = ["https://c1:6092", "https://c2:6092"]`), all with the same scheme.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Coordinators {
    One(String),
    Many(Vec<String>),
}

impl Coordinators {
    pub fn urls(&self) -> &[String] {
        match self {
            Coordinators::One(u) => std::slice::from_ref(u),
            Coordinators::Many(v) => v,
        }
    }

    /// Whether they are `https://` (checked to be all or none by `validate`).
    pub fn https(&self) -> bool {
        self.urls().iter().all(|u| u.starts_with("https://"))
    }
}

/// One coordinator URL: `http(s)://host:port`.
fn check_coordinator_url(url: &str) -> Result<(), ConfigError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ConfigError::Invalid(format!(
            "coordinator {url:?} must start with https:// or http://"
        )));
    }
    match url.parse::<tonic::codegen::http::Uri>() {
        Ok(uri) if uri.host().is_some_and(|h| !h.is_empty()) => Ok(()),
        Ok(_) => Err(ConfigError::Invalid(format!(
            "coordinator {url:?} names no host"
        ))),
        Err(e) => Err(ConfigError::Invalid(format!(
            "coordinator {url:?} is not a valid URL: {e}"
        ))),
    }
}

/// The whole agent configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This edge's identity (unique in the cluster).
    pub id: String,
    pub region: String,
    /// `https://host:port` (mTLS) or `http://host:port` (needs `--insecure`), or a list of
    /// them: the agent uses one and fails over to the next.
    pub coordinator: Coordinators,
    /// Where the purge cursor and loaded config bundles are kept.
    pub state_dir: PathBuf,
    pub varnish: VarnishConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// How often the agent reports its active VCL (and probes health) to the coordinator.
    #[serde(default = "default_report_interval_s")]
    pub report_interval_s: u64,
    /// Purges arriving in the same slot of this many milliseconds (aligned on the wall
    /// clock) as the last apply wait for the next slot and are applied together: at most
    /// 1000/purge_window_ms bans (or xkey purges) per second however fast purges come (an
    /// apply that needs k of them, its tags being over one expression's bound, takes k
    /// slots), for at most this much added delay; a lone purge goes at once (0: apply
    /// each batch at once).
    #[serde(default = "default_purge_window_ms")]
    pub purge_window_ms: u64,
    /// How often varnishstat counters are read and sent (hit ratios, rates).
    #[serde(default = "default_stats_interval_s")]
    pub stats_interval_s: u64,
    /// How many of the region's most requested URLs to report (0: do not run varnishncsa).
    #[serde(default = "default_top_urls")]
    pub top_urls: usize,
    /// How often the popular URLs are reported.
    #[serde(default = "default_top_urls_interval_s")]
    pub top_urls_interval_s: u64,
    /// How many client networks (/24, /48) to report per interval for per-country
    /// traffic (0: none).
    #[serde(default = "default_client_nets")]
    pub client_nets: usize,
    /// How often client networks are reported.
    #[serde(default = "default_client_nets_interval_s")]
    pub client_nets_interval_s: u64,
}

impl AgentConfig {
    /// Logs one warning for each `[tls]` certificate (the agent's, the CA) that expires
    /// within 30 days, or has expired ([`daemon::certs`]); the agent calls it at start.
    pub fn warn_expiring_certs(&self) {
        let Some(tls) = &self.tls else { return };
        for (what, path) in [("agent", &tls.cert), ("CA", &tls.ca)] {
            if let Some(t) = std::fs::read(path)
                .ok()
                .and_then(|pem| daemon::certs::pem_not_after(&pem))
            {
                daemon::certs::warn_if_expiring(what, &path.display().to_string(), t);
            }
        }
    }

    /// An agent `id` in `region` dialling `coordinator`, with every interval and bound at
    /// its default (the demo and the end-to-end tests build their agents' files from it).
    pub fn new(
        id: &str,
        region: &str,
        coordinator: Coordinators,
        state_dir: PathBuf,
        varnish: VarnishConfig,
    ) -> Self {
        AgentConfig {
            id: id.to_owned(),
            region: region.to_owned(),
            coordinator,
            state_dir,
            varnish,
            tls: None,
            report_interval_s: default_report_interval_s(),
            purge_window_ms: default_purge_window_ms(),
            stats_interval_s: default_stats_interval_s(),
            top_urls: default_top_urls(),
            top_urls_interval_s: default_top_urls_interval_s(),
            client_nets: default_client_nets(),
            client_nets_interval_s: default_client_nets_interval_s(),
        }
    }
}

fn default_purge_window_ms() -> u64 {
    20
}

fn default_client_nets() -> usize {
    256
}

fn default_client_nets_interval_s() -> u64 {
    30
}

fn default_top_urls() -> usize {
    100
}

fn default_top_urls_interval_s() -> u64 {
    30
}

fn default_stats_interval_s() -> u64 {
    5
}

fn default_report_interval_s() -> u64 {
    5
}

/// `[varnish]`: the local varnishd.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VarnishConfig {
    /// varnishd's HTTP listener (xkey purges go here).
    pub http: SocketAddr,
    /// varnishd's admin CLI (`-T`).
    pub admin: SocketAddr,
    /// varnishd's `-S` secret file.
    pub secret_file: PathBuf,
    #[serde(default)]
    pub purge_mode: PurgeMode,
    /// varnishd's `-n` instance (working directory) for varnishstat; default: varnish's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<PathBuf>,
    /// Timeout for one admin or HTTP exchange with varnishd.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Longest tag alternation in one ban (ban mode): more tags per ban means fewer bans
    /// in a storm. A ban varnishd refuses as too large is split in two and applied, never
    /// turned into a full ban.
    #[serde(default = "default_max_ban_bytes")]
    pub max_ban_bytes: usize,
}

impl VarnishConfig {
    /// The varnishd at `http` / `admin` with its `-S` secret, in the default ban mode.
    pub fn new(http: SocketAddr, admin: SocketAddr, secret_file: PathBuf) -> Self {
        VarnishConfig {
            http,
            admin,
            secret_file,
            purge_mode: PurgeMode::default(),
            instance: None,
            timeout_ms: default_timeout_ms(),
            max_ban_bytes: default_max_ban_bytes(),
        }
    }
}

/// `[tls]`: the agent's client certificate and the cluster CA (the coordinator's
/// `[grpc.tls]` is the same struct).
pub use daemon::TlsConfig;

/// How purges reach varnish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PurgeMode {
    /// `ban obj.http.X-Magento-Tags ~ ...` over the admin CLI; works with any VCL.
    #[default]
    Ban,
    /// Tag purges through the xkey vmod (the project's VCL); regexes still use bans.
    Xkey,
}

impl PurgeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PurgeMode::Ban => "ban",
            PurgeMode::Xkey => "xkey",
        }
    }
}

fn default_timeout_ms() -> u64 {
    5000
}

/// The default `max_ban_bytes`. varnishd's PCRE2 refuses a tag alternation much over
/// 24 KiB ("regular expression is too large", measured on varnish 7.1 with 2,000 and
/// 3,000 tags); 16 KiB holds a 20 ms window of a storm of ~60,000 purges/s in one ban.
pub const DEFAULT_MAX_BAN_BYTES: usize = 16_384;

fn default_max_ban_bytes() -> usize {
    DEFAULT_MAX_BAN_BYTES
}

pub use daemon::ConfigError;

impl daemon::Validate for AgentConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        AgentConfig::validate(self)
    }
}

impl AgentConfig {
    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        daemon::load(path)
    }

    /// Checks what serde cannot.
    /// What can be checked on this machine at start: the varnish secret is readable (an
    /// agent that cannot read it fails every purge), the varnishd instance directory
    /// exists when given as a path. Each failure is one line for the operator.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let v = &self.varnish;
        match std::fs::read(&v.secret_file) {
            Ok(s) if s.is_empty() => {
                return Err(ConfigError::Invalid(format!(
                    "varnish.secret_file {} is empty",
                    v.secret_file.display()
                )))
            }
            Ok(_) => {}
            Err(e) => {
                return Err(ConfigError::Invalid(format!(
                    "cannot read varnish.secret_file {}: {e} (it must be readable by the user edge-agent runs as)",
                    v.secret_file.display()
                )))
            }
        }
        if let Some(dir) = v.instance.as_deref().filter(|d| d.is_absolute()) {
            if !dir.is_dir() {
                return Err(ConfigError::Invalid(format!(
                    "varnish.instance {}: no such directory (is varnishd running with -n {}?)",
                    dir.display(),
                    dir.display()
                )));
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let ident = |v: &str| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        if !ident(&self.id) {
            return Err(ConfigError::Invalid(format!(
                "id {:?} must be 1-128 characters of [A-Za-z0-9._-]",
                self.id
            )));
        }
        if !ident(&self.region) {
            return Err(ConfigError::Invalid(format!(
                "region {:?} must be 1-128 characters of [A-Za-z0-9._-]",
                self.region
            )));
        }
        let urls = self.coordinator.urls();
        if urls.is_empty() {
            return Err(ConfigError::Invalid(
                "coordinator is an empty list: name at least one".into(),
            ));
        }
        for url in urls {
            check_coordinator_url(url)?;
        }
        if !self.coordinator.https() && urls.iter().any(|u| u.starts_with("https://")) {
            return Err(ConfigError::Invalid(
                "coordinator URLs mix https:// and http://: use one scheme for all".into(),
            ));
        }
        if self.stats_interval_s == 0 || self.stats_interval_s > 3600 {
            return Err(ConfigError::Invalid(
                "stats_interval_s must be 1..=3600".into(),
            ));
        }
        if self.report_interval_s == 0 || self.report_interval_s > 3600 {
            return Err(ConfigError::Invalid(
                "report_interval_s must be 1..=3600".into(),
            ));
        }
        if self.top_urls_interval_s == 0 || self.top_urls_interval_s > 3600 {
            return Err(ConfigError::Invalid(
                "top_urls_interval_s must be 1..=3600".into(),
            ));
        }
        if self.purge_window_ms > 1000 {
            return Err(ConfigError::Invalid(
                "purge_window_ms must be 0..=1000".into(),
            ));
        }
        if self.client_nets_interval_s == 0 || self.client_nets_interval_s > 3600 {
            return Err(ConfigError::Invalid(
                "client_nets_interval_s must be 1..=3600".into(),
            ));
        }
        if self.client_nets > crate::clients::MAX_TRACKED {
            return Err(ConfigError::Invalid(format!(
                "client_nets must be at most {}",
                crate::clients::MAX_TRACKED
            )));
        }
        if self.top_urls > 10_000 {
            return Err(ConfigError::Invalid(
                "top_urls must be at most 10000".into(),
            ));
        }
        if self.varnish.timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "varnish.timeout_ms must be positive".into(),
            ));
        }
        if !(1024..=1 << 20).contains(&self.varnish.max_ban_bytes) {
            return Err(ConfigError::Invalid(
                "varnish.max_ban_bytes must be 1024..=1048576".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_sample_parses() {
        let c: AgentConfig = toml::from_str(
            r#"
id = "eu-west-1"
region = "eu-west"
coordinator = "https://coordinator.internal:6092"
state_dir = "/var/lib/edge-agent"
[varnish]
http = "127.0.0.1:6081"
admin = "127.0.0.1:6082"
secret_file = "/etc/varnish/secret"
purge_mode = "ban"
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.varnish.purge_mode, PurgeMode::Ban);
        assert!(toml::from_str::<AgentConfig>("id = 1").is_err());
    }

    #[test]
    fn one_coordinator_or_a_list() {
        let with = |coordinator: &str| {
            toml::from_str::<AgentConfig>(&format!(
                "id = \"e\"\nregion = \"r\"\ncoordinator = {coordinator}\nstate_dir = \"/tmp/x\"\n[varnish]\nhttp = \"127.0.0.1:6081\"\nadmin = \"127.0.0.1:6082\"\nsecret_file = \"/s\"\n"
            ))
        };
        let one = with("\"https://c1:6092\"").unwrap();
        one.validate().unwrap();
        assert_eq!(one.coordinator.urls(), ["https://c1:6092"]);
        let two = with("[\"https://c1:6092\", \"https://c2:6092\"]").unwrap();
        two.validate().unwrap();
        assert_eq!(two.coordinator.urls().len(), 2);
        assert!(two.coordinator.https());
        let mixed = with("[\"https://c1:6092\", \"http://c2:6092\"]").unwrap();
        assert!(mixed.validate().unwrap_err().to_string().contains("mix"));
        assert!(with("[]").unwrap().validate().is_err());
        let bad = with("[\"https://c1:6092\", \"c2:6092\"]").unwrap();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("\"c2:6092\""));
    }

    #[test]
    fn what_can_be_checked_at_start_is() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let text = |coordinator: &str, secret: &std::path::Path, instance: &std::path::Path| {
            format!(
                "id = \"e\"\nregion = \"r\"\ncoordinator = \"{coordinator}\"\nstate_dir = \"/tmp/x\"\n[varnish]\nhttp = \"127.0.0.1:6081\"\nadmin = \"127.0.0.1:6082\"\nsecret_file = \"{}\"\ninstance = \"{}\"\n",
                secret.display(),
                instance.display()
            )
        };
        let ok: AgentConfig = toml::from_str(&text("https://c:6092", &secret, dir.path())).unwrap();
        ok.validate().unwrap();
        ok.check_files().unwrap();
        let bad_url: AgentConfig =
            toml::from_str(&text("https://exa mple:6092", &secret, dir.path())).unwrap();
        assert!(bad_url
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a valid URL"));
        let no_host: AgentConfig =
            toml::from_str(&text("https://:6092", &secret, dir.path())).unwrap();
        assert!(no_host.validate().is_err());
        let missing = dir.path().join("missing");
        let no_secret: AgentConfig =
            toml::from_str(&text("https://c:6092", &missing, dir.path())).unwrap();
        assert!(no_secret
            .check_files()
            .unwrap_err()
            .to_string()
            .contains("secret_file"));
        let no_instance: AgentConfig =
            toml::from_str(&text("https://c:6092", &secret, &missing)).unwrap();
        assert!(no_instance
            .check_files()
            .unwrap_err()
            .to_string()
            .contains("varnish.instance"));
    }
}
