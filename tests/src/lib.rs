//! Shared helpers for the end-to-end tests and the benchmark: real `varnishd`, the real
//! `coordinator` and `edge-agent` binaries, the sample origin, and a tiny HTTP client.
//!
//! Nothing here fakes a component. A test that needs varnishd panics with a clear message
//! when it is missing (`scripts/test.sh` installs it); it never skips.

// The test harness starts real programs (varnishd, the binaries, chromium) by design.
#![allow(clippy::disallowed_methods)]

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use coordinator::api::views::{name_of, RegionView};
use coordinator_cli::demo::origin::{self, Origin};
use coordinator_cli::demo::process::{self, Child, VarnishSpec};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub mod ha;

/// Retries `$cond` (an expression, may `.await`) until it is true or `$secs` pass.
#[macro_export]
macro_rules! assert_eventually {
    ($secs:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64($secs as f64);
        loop {
            if $cond {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!("not true after {}s: {}", $secs, format!($($msg)+));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }};
}

/// Panics unless etcd (Debian's etcd-server) is installed.
pub fn require_etcd() {
    let ok = std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "etcd is not installed: these tests need Debian's etcd-server (run scripts/test.sh, which installs it)"
    );
}

/// A real etcd cluster of `n` members on loopback, each with its own data dir.
pub struct EtcdCluster {
    /// Client URLs (`http://127.0.0.1:P`), one per member.
    pub endpoints: Vec<String>,
    pub members: Vec<Child>,
    /// Each member's command line and log, to start it again after a kill.
    commands: Vec<(Vec<String>, PathBuf)>,
}

impl EtcdCluster {
    pub async fn start(dir: &Path, n: usize) -> Self {
        Self::start_with(dir, n, &[]).await
    }

    /// [`Self::start`] with more flags for every member (e.g. `--auth-token-ttl=2`).
    pub async fn start_with(dir: &Path, n: usize, flags: &[&str]) -> Self {
        require_etcd();
        std::fs::create_dir_all(dir).expect("etcd dir");
        let client: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let peer: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let initial: Vec<String> = (0..n)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", peer[i]))
            .collect();
        let mut members = Vec::new();
        let mut commands = Vec::new();
        for i in 0..n {
            let data = dir.join(format!("m{i}"));
            let mut args: Vec<String> = [
                format!("--name=m{i}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls=http://127.0.0.1:{}", client[i]),
                format!("--advertise-client-urls=http://127.0.0.1:{}", client[i]),
                format!("--listen-peer-urls=http://127.0.0.1:{}", peer[i]),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{}", peer[i]),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=test".into(),
                "--heartbeat-interval=50".into(),
                "--election-timeout=500".into(),
                "--log-level=warn".into(),
                "--logger=zap".into(),
            ]
            .into();
            args.extend(flags.iter().map(|f| f.to_string()));
            let log = dir.join(format!("m{i}.log"));
            members
                .push(process::spawn(Path::new("etcd"), &args, &log, "etcd").expect("spawn etcd"));
            commands.push((args, log));
        }
        let endpoints: Vec<String> = client
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let cluster = EtcdCluster {
            endpoints,
            members,
            commands,
        };
        // Serving once every member answers /health with a leader.
        let deadline = Instant::now() + Duration::from_secs(30);
        for p in &client {
            loop {
                let up = get_json(lo(*p), "/health")
                    .await
                    .is_some_and(|h| h["health"] == "true");
                if up {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd member on {p} not healthy after 30 s; logs in {}",
                    dir.display()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        cluster
    }
}

impl EtcdCluster {
    /// SIGKILL member `i`.
    pub async fn kill9(&mut self, i: usize) {
        self.members[i].kill9().await;
    }

    /// Starts killed member `i` again on its data dir.
    pub fn restart(&mut self, i: usize) {
        let (args, log) = &self.commands[i];
        self.members[i] = process::spawn(Path::new("etcd"), args, log, "etcd").expect("spawn etcd");
    }

    /// Turns on etcd's authentication: a `root` user (password `root_password`), and
    /// `user` (password `password`) with a role that may read and write the keys under
    /// `prefix` only, as an operator would set up a coordinator's account.
    pub async fn enable_auth(&self, root_password: &str, user: &str, password: &str, prefix: &str) {
        use etcd::authpb::{permission::Type, Permission};
        use etcd::etcdserverpb::{auth_client::AuthClient, *};
        let etcd = etcd::Etcd::connect(&self.endpoints).expect("connect");
        let mut auth = AuthClient::new(etcd.channel());
        for (name, pw) in [("root", root_password), (user, password)] {
            auth.user_add(AuthUserAddRequest {
                name: name.into(),
                password: pw.into(),
                ..Default::default()
            })
            .await
            .expect("user add");
        }
        for role in ["root", user] {
            auth.role_add(AuthRoleAddRequest { name: role.into() })
                .await
                .expect("role add");
        }
        auth.role_grant_permission(AuthRoleGrantPermissionRequest {
            name: user.into(),
            perm: Some(Permission {
                perm_type: Type::Readwrite as i32,
                key: prefix.as_bytes().to_vec(),
                range_end: etcd::prefix_end(prefix.as_bytes()),
            }),
        })
        .await
        .expect("grant the prefix");
        for (name, role) in [("root", "root"), (user, user)] {
            auth.user_grant_role(AuthUserGrantRoleRequest {
                user: name.into(),
                role: role.into(),
            })
            .await
            .expect("grant role");
        }
        auth.auth_enable(AuthEnableRequest {})
            .await
            .expect("auth enable");
    }

    /// `endpoints` as a TOML array.
    pub fn endpoints_toml(&self) -> String {
        let quoted: Vec<String> = self.endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }
}

/// Panics unless PowerDNS with its remote backend and dig are installed.
pub fn require_pdns() {
    let ok = |program: &str, arg: &str| {
        std::process::Command::new(program)
            .arg(arg)
            .output()
            .map(|o| o.status.success() || !o.stdout.is_empty() || !o.stderr.is_empty())
            .unwrap_or(false)
    };
    let backend = [
        "/usr/lib/x86_64-linux-gnu/pdns",
        "/usr/lib/aarch64-linux-gnu/pdns",
        "/usr/lib/pdns",
    ]
    .iter()
    .any(|d| Path::new(d).join("libremotebackend.so").exists());
    assert!(
        ok("pdns_server", "--version") && backend && ok("dig", "-v"),
        "PowerDNS is not installed: these tests need Debian's pdns-server, pdns-backend-remote and bind9-dnsutils (run scripts/test.sh, which installs them)"
    );
}

/// A real `pdns_server` on a free loopback port, serving what the remote backend at
/// `backend` (`http://ADDR/dns`) answers, with every cache off and EDNS client subnet on.
pub struct Pdns {
    pub addr: SocketAddr,
    pub child: Child,
}

impl Pdns {
    pub async fn start(dir: &Path, backend: SocketAddr) -> Self {
        require_pdns();
        std::fs::create_dir_all(dir).expect("pdns dir");
        let mut last = String::new();
        for _ in 0..3 {
            let addr = lo(free_port());
            let conf = format!(
                "launch=remote\nremote-connection-string=http:url=http://{backend}/dns,timeout=2000\n\
                 local-address=127.0.0.1\nlocal-port={}\nsocket-dir={}\nsecurity-poll-suffix=\n\
                 edns-subnet-processing=yes\ncache-ttl=0\nquery-cache-ttl=0\nnegquery-cache-ttl=0\n\
                 zone-cache-refresh-interval=0\ndisable-syslog=yes\nloglevel=4\n",
                addr.port(),
                dir.display()
            );
            std::fs::write(dir.join("pdns.conf"), conf).expect("pdns.conf");
            let args = vec![
                format!("--config-dir={}", dir.display()),
                "--daemon=no".into(),
                "--guardian=no".into(),
            ];
            let log = dir.join("pdns.log");
            let mut child = process::spawn(Path::new("pdns_server"), &args, &log, "pdns_server")
                .expect("spawn pdns_server");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Some(status) = child.try_status() {
                    last = format!(
                        "pdns_server exited ({status}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                // Any answer at all (dig exits 0) means it is serving.
                if !dig_full(
                    addr,
                    &["+tries=1", "+time=1", "version.bind", "TXT", "CH"],
                    None,
                )
                .await
                .is_empty()
                {
                    return Pdns { addr, child };
                }
                if Instant::now() > deadline {
                    last = format!(
                        "pdns_server did not answer: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    child.kill9().await;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("{last}");
    }
}

/// `dig @addr NAME TYPE +short [+subnet=S]`: the answer lines (empty on any failure).
pub async fn dig(addr: SocketAddr, name: &str, qtype: &str, subnet: Option<&str>) -> Vec<String> {
    let mut args = vec![name, qtype, "+short", "+tries=1", "+time=2"];
    let subnet_arg = subnet.map(|s| format!("+subnet={s}"));
    if let Some(s) = &subnet_arg {
        args.push(s);
    }
    dig_full(addr, &args, None).await
}

/// `dig @addr ARGS...` output lines (empty on any failure); `port` overrides addr's.
pub async fn dig_full(addr: SocketAddr, args: &[&str], port: Option<u16>) -> Vec<String> {
    let mut cmd = tokio::process::Command::new("dig");
    cmd.arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(port.unwrap_or(addr.port()).to_string())
        .args(args)
        .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(10), cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.trim().is_empty())
            .collect(),
        _ => Vec::new(),
    }
}

/// Panics unless varnishd (with xkey) is installed.
pub fn require_varnish() {
    let ok = std::process::Command::new("varnishd")
        .arg("-V")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "varnishd is not installed: these tests need Debian's varnish and varnish-modules (run scripts/test.sh, which installs them)"
    );
}

/// The `target/<profile>` directory holding the workspace binaries, (re)built once per
/// test process so a test never runs a stale binary (`cargo test -p tests` alone does not
/// rebuild other packages' binaries).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // target/debug/deps/e2e-hash -> target/debug
        let dir = exe
            .parent()
            .and_then(|d| {
                if d.ends_with("deps") {
                    d.parent()
                } else {
                    Some(d)
                }
            })
            .expect("binary directory")
            .to_owned();
        {
            let release = dir.ends_with("release");
            let mut cmd = std::process::Command::new(env!("CARGO"));
            cmd.args(["build", "--workspace", "--bins"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("cargo build");
            assert!(status.success(), "building the binaries failed");
        }
        dir
    })
}

/// A port that was free a moment ago (for varnishd, which binds its own sockets).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn lo(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A temp dir others (varnishd's workers) can traverse.
pub fn temp_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("e2e-")
        .tempdir()
        .expect("tempdir");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
    }
    dir
}

/// The sample origin, in this process.
pub struct OriginServer {
    pub addr: SocketAddr,
    pub origin: Arc<Origin>,
    stop: CancellationToken,
}

impl OriginServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let origin = Arc::new(Origin::default());
        let stop = CancellationToken::new();
        tokio::spawn(origin::serve(listener, origin.clone(), stop.clone()));
        OriginServer { addr, origin, stop }
    }

    /// Stops serving: new connections are refused (an origin outage).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for OriginServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One varnishd with the project's VCL.
pub struct VarnishNode {
    pub workdir: PathBuf,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub secret: PathBuf,
    /// The boot VCL (`main.vcl` of the sample bundle rendered for this node).
    pub boot_vcl: PathBuf,
    pub child: Child,
    spec: VarnishSpec,
    log: PathBuf,
}

impl VarnishNode {
    pub async fn start(dir: &Path, backend: SocketAddr) -> Self {
        require_varnish();
        std::fs::create_dir_all(dir).expect("varnish dir");
        let secret = dir.join("secret");
        process::write_secret(&secret).expect("secret");
        let vcl = coordinator_cli::demo::write_boot_vcl(
            &dir.join("boot-vcl"),
            "boot",
            backend,
            WARM_TOKEN,
        )
        .expect("boot vcl");
        let mut last_err = None;
        for _ in 0..3 {
            let spec = VarnishSpec {
                also_listen: None,
                workdir: dir.join("varnish"),
                http: lo(free_port()),
                admin: lo(free_port()),
                secret_file: secret.clone(),
                vcl_file: vcl.clone(),
                storage_mb: 32,
            };
            let log = dir.join("varnishd.log");
            match process::start_varnishd(&spec, &log).await {
                Ok(child) => {
                    return VarnishNode {
                        workdir: spec.workdir.clone(),
                        http: spec.http,
                        admin: spec.admin,
                        secret,
                        boot_vcl: vcl,
                        child,
                        spec,
                        log,
                    };
                }
                Err(e) => last_err = Some(e),
            }
        }
        panic!("varnishd did not start: {last_err:?}");
    }

    /// SIGKILL varnishd and start it again on the same ports: it comes back with its
    /// boot VCL and an empty cache.
    pub async fn kill9_and_restart(&mut self) {
        self.kill9().await;
        self.restart().await;
    }

    /// SIGKILL varnishd (manager and cache process) and wait until it no longer answers.
    pub async fn kill9(&mut self) {
        self.child.kill9().await;
        // The killed manager's cache process may serve and hold the ports for a moment.
        let deadline = Instant::now() + Duration::from_secs(15);
        while process::http_answers(self.http).await && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts a killed varnishd again on the same ports.
    pub async fn restart(&mut self) {
        let mut last = None;
        for _ in 0..40 {
            match process::start_varnishd(&self.spec, &self.log).await {
                Ok(child) => {
                    self.child = child;
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("varnishd did not restart: {last:?}");
    }

    /// The name of the active VCL (`vcl.list`).
    pub async fn active_vcl(&self) -> String {
        let list = self.admin("vcl.list").await;
        list.lines()
            .find(|l| l.starts_with("active"))
            .and_then(|l| l.split_whitespace().nth(4))
            .unwrap_or_default()
            .to_owned()
    }

    /// One counter from `varnishstat -1` (e.g. `MAIN.bans_added`).
    pub fn counter(&self, name: &str) -> u64 {
        let out = std::process::Command::new("varnishstat")
            .arg("-n")
            .arg(&self.workdir)
            .args(["-1", "-f", name])
            .output()
            .expect("varnishstat");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no counter {name} in varnishstat output: {text}"))
    }

    /// Runs an admin CLI command (through the agent's own protocol client).
    pub async fn admin(&self, command: &str) -> String {
        let secret = std::fs::read(&self.secret).expect("secret");
        let mut c = edge_agent::varnish::admin::AdminClient::connect(
            self.admin,
            &secret,
            Duration::from_secs(5),
        )
        .await
        .expect("admin connect");
        c.command(command).await.expect("admin command")
    }
}

/// Options for a coordinator under test.
#[derive(Debug, Clone)]
pub struct CoordinatorOpts {
    pub allow: Vec<String>,
    pub retention_entries: u64,
    /// More TOML appended to coordinator.toml (e.g. a `[rollout]` table).
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
    /// More keys for region i's `[[regions]]` table (`lat`, `lon`, `addresses`), by index.
    pub region_keys: Vec<String>,
    /// The gRPC address to listen on (default: a free loopback port), for agents that
    /// list a coordinator before it starts.
    pub grpc: Option<SocketAddr>,
}

/// The warm secret every test cluster shares (boot VCL and `[warm] token_file`).
pub const WARM_TOKEN: &str = "test-warm-token-0123456789abcdef";

impl Default for CoordinatorOpts {
    fn default() -> Self {
        CoordinatorOpts {
            allow: vec!["127.0.0.0/8".into()],
            retention_entries: 1_000_000,
            extra: String::new(),
            insecure: false,
            read_requires_token: false,
            purge_extra: String::new(),
            api_extra: String::new(),
            warm_extra: String::new(),
            region_keys: Vec::new(),
            grpc: None,
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
}

impl CoordinatorProc {
    /// Starts on fresh loopback ports (retrying if another process grabbed one first).
    pub async fn start(dir: &Path, opts: &CoordinatorOpts) -> Self {
        std::fs::create_dir_all(dir).expect("coordinator dir");
        let token = "test-token-0123456789".to_owned();
        std::fs::write(dir.join("token"), &token).expect("token");
        std::fs::write(dir.join("warm-token"), WARM_TOKEN).expect("warm token");
        let allow: Vec<String> = opts.allow.iter().map(|a| format!("\"{a}\"")).collect();
        let config = dir.join("coordinator.toml");
        let pki = (!opts.insecure).then(|| dir.join("pki"));
        let tls = match &pki {
            Some(p) => {
                coordinator::pki::init(p, &[]).expect("pki init");
                format!(
                    "[grpc.tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/coordinator.pem\"\nkey = \"{0}/coordinator.key\"\n",
                    p.display()
                )
            }
            None => String::new(),
        };
        let state = dir.join("state");
        let mut last_err = String::new();
        for _ in 0..3 {
            let (purge, api) = (lo(free_port()), lo(free_port()));
            let grpc = opts.grpc.unwrap_or_else(|| lo(free_port()));
            // `{dns}` in the extra TOML: a fresh port for the DNS backend.
            let dns = opts.extra.contains("{dns}").then(|| lo(free_port()));
            let extra = match dns {
                Some(d) => opts.extra.replace("{dns}", &d.to_string()),
                None => opts.extra.clone(),
            };
            std::fs::write(
                &config,
                format!(
                    "[purge]\nlisten = \"{purge}\"\nallow = [{}]\nretention_entries = {}\n{}[grpc]\nlisten = \"{grpc}\"\n[api]\nlisten = \"{api}\"\ntoken_file = \"{}\"\nread_requires_token = {}\n{}[warm]\ntoken_file = \"{}\"\n{}\n{}\n",
                    allow.join(", "),
                    opts.retention_entries,
                    opts.purge_extra,
                    dir.join("token").display(),
                    opts.read_requires_token,
                    opts.api_extra,
                    dir.join("warm-token").display(),
                    opts.warm_extra,
                    extra + &tls,
                ),
            )
            .expect("config");
            match spawn_coordinator(&config, &state, api, opts.insecure).await {
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
        self.child = spawn_coordinator(&self.config, &self.state, self.api, self.pki.is_none())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
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
    let mut child = process::spawn(&bin_dir().join("coordinator"), &args, &log, "coordinator")
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

/// `stats_interval_s` for agents started from now on (tests: 1 s; benchmarks set more).
pub static AGENT_STATS_INTERVAL_S: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(1);

/// `purge_window_ms` for agents started from now on (negative: the agent's default;
/// benchmarks set it to compare windows).
pub static AGENT_PURGE_WINDOW_MS: std::sync::atomic::AtomicI64 =
    std::sync::atomic::AtomicI64::new(-1);

/// The real `edge-agent` binary.
pub struct AgentProc {
    pub id: String,
    pub config: PathBuf,
    pub child: Child,
    pub log: PathBuf,
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
        mode: &str,
    ) -> Self {
        let tls = coordinator.agent_tls(id, region);
        Self::start_with(dir, id, region, &[coordinator.grpc], tls, varnish, mode)
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
        mode: &str,
    ) -> Self {
        std::fs::create_dir_all(dir).expect("agent dir");
        let config = dir.join(format!("{id}.toml"));
        let urls: Vec<String> = grpc
            .iter()
            .map(|g| format!("\"{}://{g}\"", if tls.is_some() { "https" } else { "http" }))
            .collect();
        let coordinators = match urls.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let tls_table = match &tls {
            Some((ca, cert, key)) => format!(
                "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                ca.display(),
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        let window = match AGENT_PURGE_WINDOW_MS.load(std::sync::atomic::Ordering::Relaxed) {
            ms if ms < 0 => String::new(),
            ms => format!("purge_window_ms = {ms}\n"),
        };
        std::fs::write(
            &config,
            format!(
                "id = \"{id}\"\nregion = \"{region}\"\ncoordinator = {coordinators}\nstate_dir = \"{}\"\nreport_interval_s = 1\nstats_interval_s = {}\ntop_urls_interval_s = 1\nclient_nets_interval_s = 1\n{window}[varnish]\nhttp = \"{}\"\nadmin = \"{}\"\nsecret_file = \"{}\"\npurge_mode = \"{mode}\"\ninstance = \"{}\"\n{tls_table}",
                dir.join(format!("{id}-state")).display(),
                AGENT_STATS_INTERVAL_S.load(std::sync::atomic::Ordering::Relaxed),
                varnish.http,
                varnish.admin,
                varnish.secret.display(),
                varnish.workdir.display()
            ),
        )
        .expect("agent config");
        let log = dir.join(format!("{id}.log"));
        let insecure = tls.is_none();
        let child = Self::spawn(&config, &log, insecure);
        AgentProc {
            id: id.to_owned(),
            config,
            child,
            log,
            insecure,
        }
    }

    fn spawn(config: &Path, log: &Path, insecure: bool) -> Child {
        let mut args = vec!["--config".to_owned(), config.display().to_string()];
        if insecure {
            args.push("--insecure".into());
        }
        process::spawn(&bin_dir().join("edge-agent"), &args, log, "edge-agent")
            .expect("spawn edge-agent")
    }

    pub async fn kill9(&mut self) {
        self.child.kill9().await;
    }

    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.config, &self.log, self.insecure);
    }
}

/// `[[regions]]` tables `region-0..n`, each fetching from `backend` (bundle vars).
pub fn regions_toml(n: usize, backend: SocketAddr) -> String {
    (0..n)
        .map(|i| {
            format!(
                "\n[[regions]]\nname = \"region-{i}\"\n[regions.vars]\nbackend_host = \"{}\"\nbackend_port = \"{}\"\n",
                backend.ip(),
                backend.port()
            )
        })
        .collect()
}

/// Origin + coordinator + one varnishd and agent per region.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub origin: OriginServer,
    pub coordinator: CoordinatorProc,
    pub varnish: Vec<VarnishNode>,
    pub agents: Vec<AgentProc>,
}

impl Cluster {
    pub async fn start(regions: usize, mode: &str, opts: CoordinatorOpts) -> Self {
        Self::start_as(regions, mode, opts, false).await
    }

    /// With `tiered`, region-0 is the shield: it fetches from the origin, every other
    /// region's varnish fetches from region-0's varnish, and `[warm] shield` names it.
    pub async fn start_as(regions: usize, mode: &str, opts: CoordinatorOpts, tiered: bool) -> Self {
        require_varnish();
        let dir = temp_dir();
        let origin = OriginServer::start().await;
        let mut opts = opts;
        // `{origin}` in the extra TOML is the sample origin's address.
        opts.extra = opts.extra.replace("{origin}", &origin.addr.to_string());
        if tiered {
            opts.warm_extra.push_str("shield = \"region-0\"\n");
        }
        // Region-0's varnish first: in tiered mode the others point at it.
        let mut varnish: Vec<VarnishNode> = Vec::new();
        for i in 0..regions {
            let backend = match varnish.first() {
                Some(shield) if tiered => shield.http,
                _ => origin.addr,
            };
            let name = format!("region-{i}");
            let keys = opts.region_keys.get(i).cloned().unwrap_or_default();
            opts.extra.push_str(&regions_toml(1, backend).replace(
                "name = \"region-0\"\n",
                &format!("name = \"{name}\"\n{keys}\n"),
            ));
            varnish.push(VarnishNode::start(&dir.path().join(format!("r{i}")), backend).await);
        }
        let coordinator = CoordinatorProc::start(&dir.path().join("coordinator"), &opts).await;
        let mut agents = Vec::new();
        for (i, v) in varnish.iter().enumerate() {
            let rdir = dir.path().join(format!("r{i}"));
            agents.push(AgentProc::start(
                &rdir,
                &format!("edge-{i}"),
                &format!("region-{i}"),
                &coordinator,
                v,
                mode,
            ));
        }
        let cluster = Cluster {
            dir,
            origin,
            coordinator,
            varnish,
            agents,
        };
        assert_eventually!(
            30,
            cluster.coordinator.applied_everywhere(0, regions).await,
            "agents did not connect"
        );
        cluster
    }

    /// Waits until every edge applied `seq`.
    pub async fn wait_applied(&self, seq: u64) {
        let n = self.agents.len();
        assert_eventually!(
            30,
            self.coordinator.applied_everywhere(seq, n).await,
            "seq {seq} not applied on all {n} edges: {:?}",
            self.coordinator.edges().await
        );
    }
}

/// A TCP proxy on loopback that can be *cut*: it stops forwarding in both directions
/// without closing anything (a partition, not a crash), and forwards again when healed.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
    target: Arc<std::sync::Mutex<SocketAddr>>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        Self::start_from(target, None).await
    }

    /// A proxy whose connections to `target` come from `source` (e.g. 127.0.0.2: on
    /// loopback, another host as the target sees it); `None`: the system's choice.
    pub async fn start_from(target: SocketAddr, source: Option<std::net::IpAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(tokio::sync::watch::channel(false).0);
        let target = Arc::new(std::sync::Mutex::new(target));
        let stop = CancellationToken::new();
        let (c, s, t) = (cut.clone(), stop.clone(), target.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = s.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((down, _)) = accepted else { continue };
                let (c, s) = (c.clone(), s.clone());
                let target = *t.lock().unwrap_or_else(|p| p.into_inner());
                tokio::spawn(async move {
                    let Ok(up) = connect_from(target, source).await else {
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::select! {
                        _ = s.cancelled() => {}
                        _ = pump(dr, uw, c.subscribe()) => {}
                        _ = pump(ur, dw, c.subscribe()) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            cut,
            target,
            stop,
        }
    }

    /// Forwards new connections to `target` from now on (for a proxy started before the
    /// address it fronts was known).
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    /// Whether the proxy is cut now.
    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }

    /// Stop forwarding (connections stay open; new ones are accepted and held).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A connection to `target` from `source` (any port), or from the system's choice.
async fn connect_from(
    target: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect(target).await;
    };
    let socket = match ip {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(target).await
}

/// Copies `from` to `to`, holding everything (EOF included) while cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while *cut.borrow_and_update() {
            if cut.changed().await.is_err() {
                return;
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => r.unwrap_or(0),
            _ = cut.changed() => continue,
        };
        // Data read just as the cut began waits for the heal, like a queue in a dead link.
        while *cut.borrow_and_update() {
            if cut.changed().await.is_err() {
                return;
            }
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Pids of running programs named `name` whose command line contains `needle`.
pub fn pids_of(name: &str, needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|d| {
            let pid: u32 = d.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(d.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let prog = args.first()?.rsplit('/').next()?.to_owned();
            (prog == name && args.iter().any(|a| a.contains(needle))).then_some(pid)
        })
        .collect()
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn cache(&self) -> &str {
        self.header("x-magento-cache-debug").unwrap_or("")
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// `coordinator demo --state-dir STATE` with `args`, on a block of fixed ports below the
/// ephemeral range (where other tests' connections live), trying another block when one is
/// taken; returns the running demo once it wrote `cluster.json`, and that file. `salt`
/// spreads tests that run at once over different blocks.
pub async fn start_demo(state: &Path, log: &Path, args: &[&str], salt: u16) -> (Child, Value) {
    let cluster_json = state.join("cluster.json");
    for attempt in 0..5u16 {
        let base = 10_000 + (std::process::id() as u16 % 200 + attempt * 37 + salt) % 200 * 100;
        let mut all: Vec<String> = vec!["demo".into()];
        all.extend(args.iter().map(|a| a.to_string()));
        all.extend([
            "--base-port".into(),
            base.to_string(),
            "--state-dir".into(),
            state.display().to_string(),
        ]);
        let mut child =
            process::spawn(&bin_dir().join("coordinator"), &all, log, "demo").expect("spawn demo");
        let deadline = Instant::now() + Duration::from_secs(90);
        while !cluster_json.is_file() && child.try_status().is_none() {
            assert!(Instant::now() < deadline, "no cluster.json after 90s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if cluster_json.is_file() {
            let cluster = serde_json::from_slice(&std::fs::read(&cluster_json).expect("read"))
                .expect("cluster.json is JSON");
            return (child, cluster);
        }
        eprintln!(
            "demo on base port {base} exited: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    panic!("the demo never came up; see the logs above");
}

/// Writes `request` on a new connection and reads one response (by Content-Length, or
/// to EOF).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<Resp> {
    raw_from(None, addr, request).await
}

/// Like [`raw`], from a chosen local address (any 127.x.y.z works on loopback).
pub async fn raw_from(
    local: Option<std::net::IpAddr>,
    addr: SocketAddr,
    request: &[u8],
) -> std::io::Result<Resp> {
    let mut s = match local {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    s.write_all(request).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(resp) = parse_response(&buf) {
            return Ok(resp);
        }
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response timeout"))??;
        if n == 0 {
            return parse_response_eof(&buf).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no complete response")
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

type Head = (usize, u16, Vec<(String, String)>);

fn parse_head(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Some((
            n,
            r.code.unwrap_or(0),
            r.headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
        )),
        _ => None,
    }
}

fn parse_response(buf: &[u8]) -> Option<Resp> {
    let (n, status, headers) = parse_head(buf)?;
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))?
        .1
        .trim()
        .parse()
        .ok()?;
    if buf.len() < n + len {
        return None;
    }
    Some(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&buf[n..n + len]).into_owned(),
    })
}

fn parse_response_eof(buf: &[u8]) -> Option<Resp> {
    let (n, status, headers) = parse_head(buf)?;
    Some(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&buf[n..]).into_owned(),
    })
}

/// `GET path` with `Connection: close`.
pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// `GET path` and the JSON body, or `None` on any failure.
pub async fn get_json(addr: SocketAddr, path: &str) -> Option<Value> {
    let r = raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    (r.status == 200).then(|| r.json())
}

/// An API request (JSON body, optional bearer token) with `Connection: close`.
pub async fn api_call(
    api: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw(api, request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// Exactly the bytes Magento 2.4 writes for a tag purge (no Content-Length, Host without
/// port, two headers in this order).
pub fn magento_purge(pattern: &str) -> Vec<u8> {
    format!("PURGE / HTTP/1.1\r\nX-Magento-Tags-Pattern: {pattern}\r\nHost: coordinator.internal\r\n\r\n").into_bytes()
}

/// Magento's canonical pattern for these tags.
pub fn tags_pattern(tags: &[&str]) -> String {
    tags.iter()
        .map(|t| format!("((^|,){t}(,|$))"))
        .collect::<Vec<_>>()
        .join("|")
}

/// One request on a kept-alive HTTP/1.1 connection: writes `request`, reads the status
/// line, the headers and a `Content-Length` body; returns the status (for benches).
pub async fn exchange_keepalive(
    conn: &mut tokio::io::BufReader<TcpStream>,
    request: &[u8],
) -> std::io::Result<u16> {
    use tokio::io::AsyncBufReadExt;
    conn.get_mut().write_all(request).await?;
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut length = 0usize;
    loop {
        line.clear();
        conn.read_line(&mut line).await?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body).await?;
    Ok(status)
}

/// Sends a Magento purge and returns the acknowledged sequence.
pub async fn purge_tags(purge: SocketAddr, tags: &[&str]) -> u64 {
    let r = raw(purge, &magento_purge(&tags_pattern(tags)))
        .await
        .expect("purge");
    assert_eq!(r.status, 200, "purge answered {}: {}", r.status, r.body);
    r.json()["seq"].as_u64().expect("seq in purge answer")
}

/// Percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One benchmark line: `name n=… p50=… p90=… p99=… max=… ms` over `ms` (any order).
pub fn percentiles_line(name: &str, mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!(
        "{name:<46} n={:<6} p50={:>8.3} p90={:>8.3} p99={:>8.3} max={:>8.3} ms",
        ms.len(),
        percentile(&ms, 50.0),
        percentile(&ms, 90.0),
        percentile(&ms, 99.0),
        percentile(&ms, 100.0)
    )
}

/// Runs Debian's headless chromium with the flags this machine needs (no sandbox as root,
/// no background networking) and `args`; panics when chromium is missing.
pub fn chromium(args: &[&str], profile: &std::path::Path) -> std::process::Output {
    let found = std::process::Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "chromium is not installed: scripts/test.sh installs Debian's chromium"
    );
    std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=8000",
            "--window-size=1280,2000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium")
}
