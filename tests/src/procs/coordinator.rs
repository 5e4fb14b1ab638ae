//! The real `coordinator serve` binary under test ([`CoordinatorProc`]): its config
//! written from the real [`CoordinatorConfig`](coordinator::config::CoordinatorConfig)
//! (the demo's base, [`configs::coordinator`]) with a test's [`CoordinatorOpts`] and extra
//! TOML laid over it; fresh loopback ports, a cluster PKI unless plaintext, SIGKILL and
//! restart on the same state, and the API calls the tests make of it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coordinator::api::views::{name_of, RegionView};
use coordinator::config::{RegionConfig, TlsConfig};
use coordinator_cli::demo::configs::{self, CoordinatorFiles};
use coordinator_cli::demo::process::{self, Child};
use serde_json::Value;

use super::host::{bin_dir, free_port, lo};
use super::WARM_TOKEN;
use crate::assert_eventually;
use crate::http::{api_call, get, get_json, raw, Resp};

/// Options for a coordinator under test.
#[derive(Debug, Clone)]
pub struct CoordinatorOpts {
    pub allow: Vec<String>,
    pub retention_entries: u64,
    /// `[[regions]]` (see [`crate::cluster::regions`]); more can come in `extra`.
    pub regions: Vec<RegionConfig>,
    /// More TOML laid over the config (e.g. a `[rollout]` table): tables merge key by key,
    /// arrays of tables (`[[regions]]`, `[[checks]]`) grow, other values replace.
    pub extra: String,
    /// Plaintext gRPC (`--insecure`) instead of mutual TLS with a fresh cluster PKI.
    pub insecure: bool,
    /// `[api] read_requires_token`.
    pub read_requires_token: bool,
    /// More keys for the `[purge]` table.
    pub purge_extra: String,
    /// More keys for the `[api]` table (e.g. `max_connections = 8`).
    pub api_extra: String,
    /// More keys for the `[warm]` table (its `token_file` is always set).
    pub warm_extra: String,
    /// More keys for region i's `[[regions]]` table (`lat`, `lon`, `addresses`), by index
    /// into `regions`.
    pub region_keys: Vec<String>,
    /// The gRPC address to listen on (default: a free loopback port), for agents that
    /// list a coordinator before it starts.
    pub grpc: Option<SocketAddr>,
    /// More environment for the process (e.g. [`super::protocol_env`]).
    pub env: Vec<(String, String)>,
    /// `[purge] refresh_tags = true` (a [`crate::Cluster`] also boots its varnishes with
    /// the refresh mode's stale bound).
    pub refresh_tags: bool,
    /// `[purge] refresh_max_stale_s` (default 30).
    pub refresh_max_stale_s: u64,
}

impl CoordinatorOpts {
    /// The `${max_stale_s}` the coordinator renders for these options.
    pub fn max_stale_s(&self) -> u64 {
        if self.refresh_tags {
            self.refresh_max_stale_s
        } else {
            coordinator::config::MAGENTO_STALE_S
        }
    }
}

impl Default for CoordinatorOpts {
    fn default() -> Self {
        CoordinatorOpts {
            allow: vec!["127.0.0.0/8".into()],
            retention_entries: 1_000_000,
            regions: Vec::new(),
            extra: String::new(),
            insecure: false,
            read_requires_token: false,
            purge_extra: String::new(),
            api_extra: String::new(),
            warm_extra: String::new(),
            region_keys: Vec::new(),
            grpc: None,
            env: Vec::new(),
            refresh_tags: false,
            refresh_max_stale_s: 30,
        }
    }
}

/// The real `coordinator serve` binary.
pub struct CoordinatorProc {
    pub purge: SocketAddr,
    pub grpc: SocketAddr,
    pub api: SocketAddr,
    pub config: PathBuf,
    pub state: PathBuf,
    pub token: String,
    pub child: Child,
    /// The cluster PKI (`ca.pem`, `coordinator.pem`, agents' certificates); `None` when
    /// gRPC is plaintext.
    pub pki: Option<PathBuf>,
    /// The DNS remote backend, when the extra TOML used the `{dns}` placeholder.
    pub dns: Option<SocketAddr>,
    /// More environment for the process, at every (re)start: set it before a restart to
    /// restart it as another build (e.g. [`super::protocol_env`]).
    pub env: Vec<(String, String)>,
}

impl CoordinatorProc {
    /// Starts on fresh loopback ports (retrying if another process grabbed one first).
    pub async fn start(dir: &Path, opts: &CoordinatorOpts) -> Self {
        std::fs::create_dir_all(dir).expect("coordinator dir");
        let token = "test-token-0123456789".to_owned();
        std::fs::write(dir.join("token"), &token).expect("token");
        std::fs::write(dir.join("warm-token"), WARM_TOKEN).expect("warm token");
        let config = dir.join("coordinator.toml");
        let pki = (!opts.insecure).then(|| dir.join("pki"));
        if let Some(p) = &pki {
            coordinator::pki::init(p, &[]).expect("pki init");
        }
        let state = dir.join("state");
        let mut last_err = String::new();
        for _ in 0..3 {
            let (purge, api) = (lo(free_port()), lo(free_port()));
            let grpc = opts.grpc.unwrap_or_else(|| lo(free_port()));
            // `{dns}` in the extra TOML: a fresh port for the DNS backend.
            let dns = opts.extra.contains("{dns}").then(|| lo(free_port()));
            let files = CoordinatorFiles {
                purge,
                grpc,
                api,
                token_file: dir.join("token"),
                warm_token_file: dir.join("warm-token"),
                tls: pki.as_ref().map(|p| TlsConfig {
                    ca: p.join("ca.pem"),
                    cert: p.join("coordinator.pem"),
                    key: p.join("coordinator.key"),
                }),
            };
            std::fs::write(&config, config_toml(&files, opts, dns)).expect("config");
            match spawn_coordinator(&config, &state, api, opts.insecure, &opts.env).await {
                Ok(child) => {
                    return CoordinatorProc {
                        purge,
                        grpc,
                        api,
                        config,
                        state,
                        token,
                        child,
                        pki,
                        dns,
                        env: opts.env.clone(),
                    }
                }
                Err(e) => last_err = e,
            }
        }
        panic!("{last_err}");
    }

    /// SIGKILL and start again on the same ports and state.
    pub async fn kill9_and_restart(&mut self) {
        self.child.kill9().await;
        self.restart().await;
    }

    /// Starts a killed coordinator again on the same ports and state.
    pub async fn restart(&mut self) {
        self.try_restart().await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Self::restart`], or why the coordinator exited at start (e.g. its state is still
    /// locked by another process), for a test that waits until it can.
    pub async fn try_restart(&mut self) -> Result<(), String> {
        self.child = spawn_coordinator(
            &self.config,
            &self.state,
            self.api,
            self.pki.is_none(),
            &self.env,
        )
        .await?;
        Ok(())
    }

    /// Stops it as systemd does (SIGTERM, SIGKILL after 10 s), to restart it after.
    pub async fn stop(&mut self) {
        self.child.stop(Duration::from_secs(10)).await;
    }

    /// The TLS files for an agent `id` in `region` (`None` with plaintext gRPC).
    pub fn agent_tls(&self, id: &str, region: &str) -> Option<(PathBuf, PathBuf, PathBuf)> {
        self.pki.as_ref().map(|pki| {
            coordinator::pki::issue(pki, id, region, 30).expect("issue agent certificate");
            (
                pki.join("ca.pem"),
                pki.join(format!("{id}.pem")),
                pki.join(format!("{id}.key")),
            )
        })
    }

    /// `GET /api/v1/regions` as a map by region name.
    /// `GET /api/v1/regions` read as the API's own typed views, by name: an answer that
    /// does not parse as [`RegionView`] (a field renamed on one side only) fails the test.
    pub async fn regions(&self) -> std::collections::BTreeMap<String, RegionView> {
        let r = get(self.api, "/api/v1/regions").await;
        if r.status != 200 {
            return Default::default();
        }
        let rows: Vec<RegionView> = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("/api/v1/regions is not Vec<RegionView>: {e}: {}", r.body));
        rows.into_iter().map(|r| (r.name.clone(), r)).collect()
    }

    /// One region's `health` from `GET /api/v1/regions` (`up`, `degraded`, `down`).
    pub async fn health(&self, region: &str) -> String {
        self.regions()
            .await
            .get(region)
            .map_or_else(String::new, |r| name_of(&r.health))
    }

    pub async fn edges(&self) -> Vec<Value> {
        let req = format!(
            "GET /api/v1/edges HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            self.token
        );
        match raw(self.api, req.as_bytes()).await {
            Ok(r) if r.status == 200 => r.json().as_array().cloned().unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Edge `id` as `GET /api/v1/edges` shows it (null if absent).
    pub async fn edge(&self, id: &str) -> Value {
        self.edges()
            .await
            .into_iter()
            .find(|e| e["id"] == id)
            .unwrap_or(Value::Null)
    }

    pub async fn head(&self) -> u64 {
        get_json(self.api, "/healthz")
            .await
            .and_then(|v| v["head_seq"].as_u64())
            .unwrap_or(0)
    }

    /// A JSON API call with the token; the response.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        api_call(self.api, method, path, Some(&self.token), body).await
    }

    /// `GET /api/v1/config?detail=full` with the token (errors as the compiler wrote
    /// them; without the token a reader sees each error's place and one line).
    pub async fn config(&self) -> Value {
        let req = format!(
            "GET /api/v1/config?detail=full HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            self.token
        );
        match raw(self.api, req.as_bytes()).await {
            Ok(r) if r.status == 200 => r.json(),
            _ => Value::Null,
        }
    }

    /// Waits until rollout `id` has finished; returns the config view.
    pub async fn wait_rollout(&self, id: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let view = self.config().await;
            let r = &view["rollout"];
            if r["id"].as_u64() == Some(id)
                && matches!(r["phase"].as_str(), Some("done" | "failed"))
            {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "rollout {id} did not finish: {view}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Pushes a bundle through the API and waits for its rollout; returns
    /// (version, final config view).
    pub async fn push_and_wait(
        &self,
        bundle: &coordinator::bundle::Bundle,
        canary: bool,
    ) -> (String, Value) {
        let body = serde_json::to_value(bundle).expect("bundle json");
        let r = self
            .call(
                "POST",
                &format!("/api/v1/config?canary={canary}"),
                Some(&body),
            )
            .await;
        assert_eq!(r.status, 200, "push answered {}: {}", r.status, r.body);
        let started = r.json();
        let version = started["version"].as_str().expect("version").to_owned();
        let id = started["rollout"]["id"]
            .as_u64()
            .expect("a rollout started");
        (version, self.wait_rollout(id).await)
    }

    /// Runs the real `coordinator` CLI against this coordinator's API with its token:
    /// (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = std::process::Command::new(bin_dir().join("coordinator"))
            .args(args)
            .args([
                "--api",
                &format!("http://{}", self.api),
                "--token",
                &self.token,
            ])
            .output()
            .expect("run the coordinator CLI");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `POST /api/v1/warm/jobs`; the job id (panics unless accepted).
    pub async fn start_warm_job(&self, spec: &Value) -> u64 {
        let r = self.call("POST", "/api/v1/warm/jobs", Some(spec)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["id"].as_u64().expect("job id")
    }

    /// `GET /api/v1/warm/jobs/{id}`.
    pub async fn warm_job(&self, id: u64) -> Value {
        self.call("GET", &format!("/api/v1/warm/jobs/{id}"), None)
            .await
            .json()
    }

    /// Waits up to `secs` for warm job `id` to end; its final view.
    pub async fn warm_finished(&self, id: u64, secs: u64) -> Value {
        let mut last;
        assert_eventually!(
            secs,
            {
                last = self.warm_job(id).await;
                matches!(
                    last["state"].as_str(),
                    Some("done" | "failed" | "cancelled")
                )
            },
            "job {id} still {last}"
        );
        last
    }

    /// True when every listed edge is connected and has applied `seq`.
    pub async fn applied_everywhere(&self, seq: u64, edges: usize) -> bool {
        let list = self.edges().await;
        list.len() == edges
            && list
                .iter()
                .all(|e| e["connected"] == true && e["applied_seq"].as_u64().unwrap_or(0) >= seq)
    }
}

/// Starts `coordinator serve` and waits for `/healthz`.
async fn spawn_coordinator(
    config: &Path,
    state: &Path,
    api: SocketAddr,
    insecure: bool,
    env: &[(String, String)],
) -> Result<Child, String> {
    let log = config.with_file_name("coordinator.log");
    let mut args = vec![
        "serve".to_owned(),
        "--config".into(),
        config.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    if insecure {
        args.push("--insecure".into());
    }
    let mut child = process::spawn_with_env(
        &bin_dir().join("coordinator"),
        &args,
        env,
        &log,
        "coordinator",
    )
    .expect("spawn coordinator");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_status() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "coordinator exited ({status}): {}",
                tail.lines().last().unwrap_or_default()
            ));
        }
        if get_json(api, "/healthz").await.is_some() {
            return Ok(child);
        }
        assert!(Instant::now() < deadline, "coordinator did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `coordinator.toml` for `opts` on `files`: the demo's base config
/// ([`configs::coordinator`]) with the options set, serialized, and the extra TOML laid
/// over it (`{dns}` there is `dns`).
fn config_toml(
    files: &CoordinatorFiles,
    opts: &CoordinatorOpts,
    dns: Option<SocketAddr>,
) -> String {
    let mut config = configs::coordinator(files).expect("the base coordinator config");
    config.purge.allow = toml::Value::try_from(&opts.allow)
        .expect("strings serialize")
        .try_into()
        .expect("CoordinatorOpts::allow holds networks");
    config.purge.retention_entries = opts.retention_entries;
    config.purge.refresh_tags = opts.refresh_tags;
    config.purge.refresh_max_stale_s = opts.refresh_max_stale_s;
    config.api.read_requires_token = opts.read_requires_token;
    config.regions = opts.regions.clone();
    let mut doc = toml::Table::try_from(&config).expect("the config serializes");
    let parse = |what: &str, text: &str| -> toml::Table {
        toml::from_str(text).unwrap_or_else(|e| panic!("{what} is not TOML: {e}: {text}"))
    };
    for (section, text) in [
        ("purge", &opts.purge_extra),
        ("api", &opts.api_extra),
        ("warm", &opts.warm_extra),
    ] {
        if let Some(toml::Value::Table(t)) = doc.get_mut(section) {
            overlay(t, parse(section, text));
        }
    }
    if let Some(toml::Value::Array(regions)) = doc.get_mut("regions") {
        for (region, keys) in regions.iter_mut().zip(&opts.region_keys) {
            if let toml::Value::Table(t) = region {
                overlay(t, parse("a region's keys", keys));
            }
        }
    }
    let extra = match dns {
        Some(d) => opts.extra.replace("{dns}", &d.to_string()),
        None => opts.extra.clone(),
    };
    overlay(&mut doc, parse("CoordinatorOpts::extra", &extra));
    toml::to_string(&doc).expect("the config serializes")
}

/// Lays `extra` over `base`: tables merge key by key, an array of tables grows
/// (`[[regions]]`, `[[checks]]`), any other value replaces the base's.
fn overlay(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => overlay(b, e),
            (Some(toml::Value::Array(b)), toml::Value::Array(e))
                if b.iter().chain(&e).all(toml::Value::is_table) =>
            {
                b.extend(e)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_config_is_one_the_coordinator_reads() {
        let files = CoordinatorFiles {
            purge: lo(1),
            grpc: lo(2),
            api: lo(3),
            token_file: "/t".into(),
            warm_token_file: "/w".into(),
            tls: None,
        };
        let opts = CoordinatorOpts {
            regions: crate::cluster::regions(2, lo(4)),
            region_keys: vec!["lat = 1.5\nlon = 2.5".into()],
            warm_extra: "shield = \"region-0\"\n".into(),
            api_extra: "max_connections = 8\n".into(),
            extra: "[[regions]]\nname = \"region-9\"\n[monitoring]\norigin = \"{dns}\"\n".into(),
            ..CoordinatorOpts::default()
        };
        let text = config_toml(&files, &opts, Some(lo(5)));
        let config: coordinator::config::CoordinatorConfig =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        config.validate().unwrap_or_else(|e| panic!("{e}: {text}"));
        let names: Vec<&str> = config.regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["region-0", "region-1", "region-9"]);
        assert_eq!(
            (config.regions[0].lat, config.regions[1].lat),
            (Some(1.5), None)
        );
        assert_eq!(config.warm.shield.as_deref(), Some("region-0"));
        assert_eq!(config.warm.token_file, Some("/w".into()));
        assert_eq!(config.api.max_connections, 8);
        assert_eq!(config.purge.retention_entries, 1_000_000);
        assert_eq!(config.monitoring.origin, Some(lo(5).to_string()));
    }

    #[test]
    fn extra_toml_merges_tables_grows_table_arrays_and_replaces_values() {
        let mut base: toml::Table = toml::from_str(
            "allow = [\"a\"]\n[[regions]]\nname = \"r0\"\n[warm]\nhost = \"h\"\nx = 1\n",
        )
        .unwrap();
        let extra: toml::Table = toml::from_str(
            "allow = [\"b\"]\n[[regions]]\nname = \"r9\"\n[warm]\nx = 2\n[geo]\ny = 3\n",
        )
        .unwrap();
        overlay(&mut base, extra);
        let want: toml::Table = toml::from_str(
            "allow = [\"b\"]\n[[regions]]\nname = \"r0\"\n[[regions]]\nname = \"r9\"\n[warm]\nhost = \"h\"\nx = 2\n[geo]\ny = 3\n",
        )
        .unwrap();
        assert_eq!(base, want);
    }
}
