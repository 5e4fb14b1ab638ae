//! `[store]`: where the coordinator keeps what must outlive it, and, with etcd, how it
//! joins a cluster of coordinators.

use std::net::SocketAddr;
use std::path::PathBuf;

use daemon::ConfigError;
use serde::{Deserialize, Serialize};

/// Which store holds the purge log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One coordinator, its state in redb files under `--state-dir`.
    #[default]
    Embedded,
    /// Several coordinators sharing one purge log in etcd.
    Etcd,
}

/// `[store]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub backend: Backend,
    /// etcd members' client URLs (`http://host:2379`, or `https://` with `[store.tls]`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Every key this cluster writes starts with it (several clusters can share an etcd).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// This coordinator's name in the cluster (default: the host name and API port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The URL other coordinators reach this one's API at (default: `http://` and
    /// `[api] listen`, which then must not be a wildcard address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise_api: Option<String>,
    /// The leader's lease: a dead leader is replaced within about this long.
    #[serde(default = "default_lease_ttl_s")]
    pub lease_ttl_s: u64,
    /// A coordinator that cannot reach etcd for this long, while another coordinator
    /// can, hands its agents to the others (those that list more than one coordinator).
    #[serde(default = "default_handoff_after_s")]
    pub handoff_after_s: u64,
    /// TLS to etcd: the CA that signed the members' certificates, and optionally this
    /// coordinator's client certificate and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EtcdTls>,
    /// etcd's user/password authentication: the user, and a file holding the password
    /// (only the first line counts; it is never logged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// How long a purge may wait for etcd to commit it before it goes to this
    /// coordinator's local spool (answered 200 `"spooled": true`, appended to the shared
    /// log once etcd takes writes again). At most 1000.
    #[serde(default = "default_spool_after_ms")]
    pub spool_after_ms: u64,
    /// The local spool's size bound: past it, a purge etcd cannot take is answered 503.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
}

/// `[store.tls]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    pub ca: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Embedded,
            endpoints: Vec::new(),
            prefix: default_prefix(),
            id: None,
            advertise_api: None,
            lease_ttl_s: default_lease_ttl_s(),
            handoff_after_s: default_handoff_after_s(),
            tls: None,
            user: None,
            password_file: None,
            spool_after_ms: default_spool_after_ms(),
            spool_max_bytes: default_spool_max_bytes(),
        }
    }
}

fn default_spool_after_ms() -> u64 {
    1000
}

fn default_spool_max_bytes() -> u64 {
    256 << 20
}

fn default_prefix() -> String {
    "/varnish-coordinator/".into()
}

fn default_lease_ttl_s() -> u64 {
    10
}

/// `[store] handoff_after_s` by default.
pub const DEFAULT_HANDOFF_AFTER_S: u64 = 5;

fn default_handoff_after_s() -> u64 {
    DEFAULT_HANDOFF_AFTER_S
}

fn invalid(msg: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid(msg.into()))
}

impl StoreConfig {
    pub fn validate(&self, api_listen: SocketAddr) -> Result<(), ConfigError> {
        if self.backend == Backend::Embedded {
            if !self.endpoints.is_empty() || self.tls.is_some() || self.user.is_some() {
                return invalid(
                    "store.endpoints, store.user and [store.tls] need store.backend = \"etcd\"",
                );
            }
            return Ok(());
        }
        if self.endpoints.is_empty() {
            return invalid("store.backend = \"etcd\" needs store.endpoints");
        }
        for e in &self.endpoints {
            let https = e.starts_with("https://");
            if !https && !e.starts_with("http://") {
                return invalid(format!(
                    "store.endpoints: {e:?} must be an http:// or https:// URL"
                ));
            }
            if https && self.tls.is_none() {
                return invalid(format!(
                    "store.endpoints: {e:?} is https:// but [store.tls] has no ca"
                ));
            }
        }
        if let Some(t) = &self.tls {
            if t.cert.is_some() != t.key.is_some() {
                return invalid("[store.tls] cert and key go together");
            }
        }
        if self.user.is_some() != self.password_file.is_some() {
            return invalid("store.user and store.password_file go together");
        }
        if self.user.as_deref().is_some_and(str::is_empty) {
            return invalid("store.user must not be empty");
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return invalid("store.prefix must start and end with '/'");
        }
        if !(2..=60).contains(&self.lease_ttl_s) {
            return invalid("store.lease_ttl_s must be between 2 and 60");
        }
        if !(2..=600).contains(&self.handoff_after_s) {
            return invalid("store.handoff_after_s must be between 2 and 600");
        }
        if !(50..=1000).contains(&self.spool_after_ms) {
            return invalid("store.spool_after_ms must be between 50 and 1000");
        }
        if self.spool_max_bytes < 4096 {
            return invalid("store.spool_max_bytes must be at least 4096");
        }
        if let Some(id) = &self.id {
            if id.is_empty() || id.len() > 64 || id.contains(['/', ' ']) {
                return invalid("store.id must be 1-64 characters without '/' or spaces");
            }
        }
        match &self.advertise_api {
            Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                invalid("store.advertise_api must be an http:// URL")
            }
            None if api_listen.ip().is_unspecified() => invalid(format!(
                "[api] listen is {api_listen}: with store.backend = \"etcd\" set store.advertise_api to the URL other coordinators reach this one at"
            )),
            _ => Ok(()),
        }
    }

    /// This coordinator's id.
    pub fn id_or_default(&self, api_listen: SocketAddr) -> String {
        self.id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "coordinator".into());
            format!("{host}:{}", api_listen.port())
        })
    }

    /// Where other coordinators reach this one's API.
    pub fn api_url(&self, api_listen: SocketAddr) -> String {
        self.advertise_api
            .clone()
            .unwrap_or_else(|| format!("http://{api_listen}"))
            .trim_end_matches('/')
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd() -> StoreConfig {
        StoreConfig {
            backend: Backend::Etcd,
            endpoints: vec!["http://127.0.0.1:2379".into()],
            ..Default::default()
        }
    }

    #[test]
    fn checks() {
        let api: SocketAddr = "127.0.0.1:6093".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:6093".parse().unwrap();
        assert!(StoreConfig::default().validate(any).is_ok());
        assert!(etcd().validate(api).is_ok());
        let bad = |c: StoreConfig, addr, what: &str| {
            let e = c.validate(addr).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        };
        bad(etcd(), any, "advertise_api");
        bad(
            StoreConfig {
                endpoints: vec![],
                ..etcd()
            },
            api,
            "needs store.endpoints",
        );
        bad(
            StoreConfig {
                endpoints: vec!["127.0.0.1:2379".into()],
                ..etcd()
            },
            api,
            "http://",
        );
        bad(
            StoreConfig {
                endpoints: vec!["https://e:2379".into()],
                ..etcd()
            },
            api,
            "[store.tls]",
        );
        bad(
            StoreConfig {
                prefix: "vc".into(),
                ..etcd()
            },
            api,
            "prefix",
        );
        bad(
            StoreConfig {
                lease_ttl_s: 1,
                ..etcd()
            },
            api,
            "lease_ttl_s",
        );
        bad(
            StoreConfig {
                handoff_after_s: 0,
                ..etcd()
            },
            api,
            "handoff_after_s",
        );
        bad(
            StoreConfig {
                spool_after_ms: 5000,
                ..etcd()
            },
            api,
            "spool_after_ms",
        );
        bad(
            StoreConfig {
                spool_max_bytes: 10,
                ..etcd()
            },
            api,
            "spool_max_bytes",
        );
        bad(
            StoreConfig {
                user: Some("coordinator".into()),
                ..etcd()
            },
            api,
            "go together",
        );
        bad(
            StoreConfig {
                user: Some(String::new()),
                password_file: Some("/etc/coordinator/etcd-password".into()),
                ..etcd()
            },
            api,
            "must not be empty",
        );
        assert!(StoreConfig {
            user: Some("coordinator".into()),
            password_file: Some("/etc/coordinator/etcd-password".into()),
            ..etcd()
        }
        .validate(api)
        .is_ok());
        bad(
            StoreConfig {
                endpoints: etcd().endpoints,
                ..Default::default()
            },
            api,
            "backend",
        );
        assert_eq!(etcd().api_url(api), "http://127.0.0.1:6093");
        assert!(etcd().id_or_default(api).ends_with(":6093"));
    }
}
