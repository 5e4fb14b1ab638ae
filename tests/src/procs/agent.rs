//! The real `edge-agent` binary under test ([`AgentProc`]): its config built from the
//! real [`AgentConfig`] (the demo's builder, [`configs::agent`]) with a test's
//! [`AgentOpts`], a client certificate from the coordinator's PKI unless plaintext,
//! SIGKILL and restart on the same config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use coordinator_cli::demo::configs::{self, VarnishFiles};
use coordinator_cli::demo::process::{self, Child};
use edge_agent::config::{AgentConfig, PurgeMode, TlsConfig};

use super::coordinator::CoordinatorProc;
use super::host::bin_dir;
use super::varnish::VarnishNode;

/// `stats_interval_s` for agents started from now on (tests: 1 s; benchmarks set more).
pub static AGENT_STATS_INTERVAL_S: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(1);

/// `purge_window_ms` for agents started from now on (negative: the agent's default;
/// benchmarks set it to compare windows).
pub static AGENT_PURGE_WINDOW_MS: std::sync::atomic::AtomicI64 =
    std::sync::atomic::AtomicI64::new(-1);

/// What a test or a bench varies in an agent's config; the rest is the agent's default.
/// A purge mode alone (`"ban"`, `"xkey"`) converts into the test defaults.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    /// `[varnish] purge_mode`.
    pub mode: PurgeMode,
    /// `stats_interval_s` (tests: 1 s, so a minute's figures arrive quickly).
    pub stats_interval_s: u64,
    /// `report_interval_s`, `top_urls_interval_s` and `client_nets_interval_s` (1 s).
    pub report_interval_s: u64,
    /// `purge_window_ms`; `None`: the agent's default.
    pub purge_window_ms: Option<u64>,
    /// More environment for the process (e.g. [`super::protocol_env`]).
    pub env: Vec<(String, String)>,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            mode: PurgeMode::Ban,
            stats_interval_s: 1,
            report_interval_s: 1,
            purge_window_ms: None,
            env: Vec::new(),
        }
    }
}

impl From<&str> for AgentOpts {
    fn from(mode: &str) -> Self {
        AgentOpts {
            mode: configs::purge_mode(mode).unwrap_or_else(|e| panic!("purge mode {mode}: {e}")),
            ..AgentOpts::default()
        }
    }
}

impl From<&AgentOpts> for AgentOpts {
    fn from(opts: &AgentOpts) -> Self {
        opts.clone()
    }
}

/// The real `edge-agent` binary.
pub struct AgentProc {
    pub id: String,
    pub config: PathBuf,
    pub child: Child,
    pub log: PathBuf,
    /// More environment for the process, at every (re)start: set it before a restart to
    /// restart it as another build (e.g. [`super::protocol_env`]).
    pub env: Vec<(String, String)>,
    insecure: bool,
}

impl AgentProc {
    /// An agent for `coordinator`, with a certificate from its PKI (issued for `id` in
    /// `region`) unless the coordinator runs plaintext.
    pub fn start(
        dir: &Path,
        id: &str,
        region: &str,
        coordinator: &CoordinatorProc,
        varnish: &VarnishNode,
        opts: impl Into<AgentOpts>,
    ) -> Self {
        let tls = coordinator.agent_tls(id, region);
        Self::start_with(dir, id, region, &[coordinator.grpc], tls, varnish, opts)
    }

    /// An agent with explicit TLS files (`None`: plaintext with `--insecure`) dialling
    /// `grpc` (several: the agent's coordinator list, failing over between them).
    pub fn start_with(
        dir: &Path,
        id: &str,
        region: &str,
        grpc: &[SocketAddr],
        tls: Option<(PathBuf, PathBuf, PathBuf)>,
        varnish: &VarnishNode,
        opts: impl Into<AgentOpts>,
    ) -> Self {
        let opts = opts.into();
        std::fs::create_dir_all(dir).expect("agent dir");
        let config = dir.join(format!("{id}.toml"));
        let insecure = tls.is_none();
        let tls = tls.map(|(ca, cert, key)| TlsConfig { ca, cert, key });
        let varnish = VarnishFiles {
            http: varnish.http,
            admin: varnish.admin,
            secret_file: varnish.secret.clone(),
            instance: varnish.workdir.clone(),
        };
        let state_dir = dir.join(format!("{id}-state"));
        let base = configs::agent(id, region, grpc, tls, state_dir, &varnish, opts.mode);
        let agent = AgentConfig {
            report_interval_s: opts.report_interval_s,
            stats_interval_s: opts.stats_interval_s,
            top_urls_interval_s: opts.report_interval_s,
            client_nets_interval_s: opts.report_interval_s,
            purge_window_ms: opts.purge_window_ms.unwrap_or(base.purge_window_ms),
            ..base
        };
        configs::write(&config, &agent).expect("agent config");
        let log = dir.join(format!("{id}.log"));
        let child = Self::spawn(&config, &log, insecure, &opts.env);
        AgentProc {
            id: id.to_owned(),
            config,
            child,
            log,
            env: opts.env,
            insecure,
        }
    }

    fn spawn(config: &Path, log: &Path, insecure: bool, env: &[(String, String)]) -> Child {
        let mut args = vec!["--config".to_owned(), config.display().to_string()];
        if insecure {
            args.push("--insecure".into());
        }
        process::spawn_with_env(&bin_dir().join("edge-agent"), &args, env, log, "edge-agent")
            .expect("spawn edge-agent")
    }

    /// Stops it as systemd does (SIGTERM, SIGKILL after 10 s), to restart it after.
    pub async fn stop(&mut self) {
        self.child.stop(std::time::Duration::from_secs(10)).await;
    }

    pub async fn kill9(&mut self) {
        self.child.kill9().await;
    }

    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.config, &self.log, self.insecure, &self.env);
    }
}
