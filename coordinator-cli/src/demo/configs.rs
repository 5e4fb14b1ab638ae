//! The config files of a cluster on one machine, as the demo and the end-to-end tests write
//! them: built from the real config structs ([`CoordinatorConfig`], [`AgentConfig`]) and
//! serialized with `toml`, so a key renamed in either crate fails to compile here rather
//! than failing a coordinator or an agent at start.
//!
//! [`coordinator`] gives the sections every such coordinator has (its three listeners,
//! the API and warm token files, mutual TLS unless `None`); a caller fills in the rest with
//! struct update syntax. [`agent`] gives an agent for one varnishd dialling one or more
//! coordinators (`https://` with TLS files, `http://` without).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use coordinator::config::{ApiConfig, CoordinatorConfig, GrpcConfig, PurgeConfig, WarmConfig};
use edge_agent::config::{AgentConfig, Coordinators, PurgeMode, VarnishConfig};

/// Where a coordinator listens and the files it reads.
#[derive(Debug, Clone)]
pub struct CoordinatorFiles {
    pub purge: SocketAddr,
    pub grpc: SocketAddr,
    pub api: SocketAddr,
    /// `[api] token_file`.
    pub token_file: PathBuf,
    /// `[warm] token_file` (the secret the boot VCL checks on warm requests).
    pub warm_token_file: PathBuf,
    /// `[grpc.tls]`; `None` for plaintext gRPC (`--insecure`).
    pub tls: Option<coordinator::config::TlsConfig>,
}

/// A coordinator on `files`' listeners, every other setting at its default.
pub fn coordinator(files: &CoordinatorFiles) -> Result<CoordinatorConfig, toml::de::Error> {
    // `[purge]` has no `Default` (its listener is required): the defaults come from serde.
    let purge: PurgeConfig = toml::from_str(&format!("listen = \"{}\"", files.purge))?;
    Ok(CoordinatorConfig {
        purge,
        grpc: GrpcConfig {
            listen: files.grpc,
            tls: files.tls.clone(),
            handshakes_per_source: coordinator::accept::HANDSHAKES_PER_SOURCE,
        },
        api: ApiConfig {
            token_file: Some(files.token_file.clone()),
            ..ApiConfig::new(files.api)
        },
        regions: Vec::new(),
        rollout: Default::default(),
        monitoring: Default::default(),
        checks: Vec::new(),
        alerts: Default::default(),
        warm: WarmConfig {
            token_file: Some(files.warm_token_file.clone()),
            ..Default::default()
        },
        geo: None,
        dns: None,
        store: Default::default(),
    })
}

/// An agent's client certificate, as [`coordinator::pki::issue`] writes it: `ca.pem`,
/// `ID.pem` and `ID.key` in the cluster's PKI directory.
pub fn agent_tls(pki: &Path, id: &str) -> edge_agent::config::TlsConfig {
    edge_agent::config::TlsConfig {
        ca: pki.join("ca.pem"),
        cert: pki.join(format!("{id}.pem")),
        key: pki.join(format!("{id}.key")),
    }
}

/// The varnishd an agent drives.
#[derive(Debug, Clone)]
pub struct VarnishFiles {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub secret_file: PathBuf,
    /// varnishd's `-n` working directory (for varnishstat).
    pub instance: PathBuf,
}

/// Agent `id` in `region` for `varnish`, dialling `grpc` (several: its failover list) over
/// mutual TLS with `tls`, or plaintext when `None`; every interval at its default.
pub fn agent(
    id: &str,
    region: &str,
    grpc: &[SocketAddr],
    tls: Option<edge_agent::config::TlsConfig>,
    state_dir: PathBuf,
    varnish: &VarnishFiles,
    mode: PurgeMode,
) -> AgentConfig {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut urls: Vec<String> = grpc.iter().map(|g| format!("{scheme}://{g}")).collect();
    let coordinator = match urls.len() {
        1 => Coordinators::One(urls.remove(0)),
        _ => Coordinators::Many(urls),
    };
    let varnish = VarnishConfig {
        purge_mode: mode,
        instance: Some(varnish.instance.clone()),
        ..VarnishConfig::new(varnish.http, varnish.admin, varnish.secret_file.clone())
    };
    AgentConfig {
        tls,
        ..AgentConfig::new(id, region, coordinator, state_dir, varnish)
    }
}

/// `ban` or `xkey` as the agent's [`PurgeMode`].
pub fn purge_mode(name: &str) -> Result<PurgeMode, toml::de::Error> {
    toml::Value::String(name.to_owned()).try_into()
}

/// Writes `config` to `path` as TOML.
pub fn write(path: &Path, config: &impl serde::Serialize) -> std::io::Result<()> {
    let text = toml::to_string_pretty(config).map_err(std::io::Error::other)?;
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lo(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn the_written_configs_read_back_as_written() {
        let files = CoordinatorFiles {
            purge: lo(1),
            grpc: lo(2),
            api: lo(3),
            token_file: "/t".into(),
            warm_token_file: "/w".into(),
            tls: None,
        };
        let c = coordinator(&files).expect("base");
        let text = toml::to_string_pretty(&c).expect("serializes");
        let back: CoordinatorConfig = toml::from_str(&text).expect("parses");
        back.validate().expect("valid");
        assert_eq!(toml::to_string_pretty(&back).expect("serializes"), text);

        let varnish = VarnishFiles {
            http: lo(4),
            admin: lo(5),
            secret_file: "/s".into(),
            instance: "/v".into(),
        };
        let tls = Some(agent_tls(Path::new("/pki"), "edge-0"));
        let a = agent(
            "edge-0",
            "region-0",
            &[lo(2), lo(6)],
            tls,
            "/state".into(),
            &varnish,
            purge_mode("xkey").expect("xkey"),
        );
        let text = toml::to_string_pretty(&a).expect("serializes");
        let back: AgentConfig = toml::from_str(&text).expect("parses");
        back.validate().expect("valid");
        assert_eq!(
            back.coordinator.urls(),
            ["https://127.0.0.1:2", "https://127.0.0.1:6"]
        );
        assert_eq!(back.varnish.purge_mode, PurgeMode::Xkey);
        assert_eq!(back.tls.map(|t| t.cert), Some("/pki/edge-0.pem".into()));
        assert!(purge_mode("purge").is_err());
    }
}
