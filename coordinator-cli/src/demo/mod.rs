//! `coordinator demo`: a whole cluster on 127.0.0.1 for a first look.
//!
//! Starts the sample [`origin`] (unless `--origin` names one), a coordinator in this
//! process, and per region a `varnishd` plus an `edge-agent` ([`process`]). Ports (see
//! docs/api.md): origin `P`, purge `P+1`, gRPC `P+2`, API `P+3`, region `i` varnish HTTP
//! `P+10+10i` and admin `P+11+10i`. Every generated file lands under the state dir, and
//! `cluster.json` is written once every agent is connected. Children are not restarted;
//! SIGINT/SIGTERM stops them all. Run again on the same state dir, it keeps the bundle
//! directory and the version pushed last (saying so on stdout); tokens, certificates and
//! configs are written afresh.

pub mod configs;
pub mod origin;
pub mod process;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use coordinator::bundle::{self, vars::Vars, Bundle};
use coordinator::config::{CoordinatorConfig, RegionConfig, RolloutConfig, TlsConfig};
use coordinator::rollout::Phase;
use coordinator::server::{self, Listeners, ServeError};
use process::{Child, ProcessError, VarnishSpec};

/// The project's Magento VCL, with `${backend_host}` / `${backend_port}` placeholders.
pub const MAGENTO_VCL: &str = include_str!("../../../edge-agent/vcl/main.vcl");
/// The sample bundle's WAF rules.
pub const SAMPLE_WAF: &str = include_str!("../../../edge-agent/vcl/waf.toml");

/// The project's sample bundle (`edge-agent/vcl/`): the Magento VCL and `waf.toml`.
pub fn sample_bundle() -> Bundle {
    Bundle {
        files: [(bundle::MAIN, MAGENTO_VCL), (bundle::WAF_TOML, SAMPLE_WAF)]
            .into_iter()
            .map(|(n, t)| (n.to_owned(), t.to_owned()))
            .collect(),
    }
}

/// The region values that point a bundle's backend at `backend`.
pub fn backend_vars(backend: SocketAddr) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    vars.insert("backend_host".to_owned(), backend.ip().to_string());
    vars.insert("backend_port".to_owned(), backend.port().to_string());
    vars
}

/// Writes the sample bundle rendered for `backend` into `dir` (varnishd's boot VCL);
/// returns the path of its `main.vcl`.
pub fn write_boot_vcl(
    dir: &Path,
    region: &str,
    backend: SocketAddr,
    warm_token: &str,
    max_stale_s: u64,
) -> Result<PathBuf, DemoError> {
    let vars = Vars::for_region(region, &backend_vars(backend))
        .with_warm_token(warm_token)
        .with_max_stale(max_stale_s);
    let files = bundle::render(&sample_bundle(), &vars)
        .map_err(|e| DemoError::Invalid(format!("sample bundle: {e}")))?;
    // It holds the warm token: varnishd's compiler may read it, nobody else.
    use daemon::files::{dir_with_mode, share_with, varnish_gid, write_with_mode};
    let gid = varnish_gid();
    dir_with_mode(dir, daemon::files::SHARED_DIR)
        .map_err(io(format!("cannot create {}", dir.display())))?;
    share_with(dir, gid);
    for (name, text) in files {
        let path = dir.join(&name);
        write_with_mode(&path, text.as_bytes(), daemon::files::SHARED_FILE)
            .map_err(io(format!("cannot write {name}")))?;
        share_with(&path, gid);
    }
    Ok(dir.join(bundle::MAIN))
}

/// The shop's Host header in the demo (warm jobs use it; so should `curl -H`).
pub const DEMO_HOST: &str = "shop.test";

/// Region names and coordinates used for the first regions.
const REGIONS: [(&str, f64, f64); 8] = [
    ("eu-west", 53.35, -6.26),
    ("us-east", 38.9, -77.04),
    ("ap-southeast", 1.35, 103.82),
    ("sa-east", -23.55, -46.63),
    ("us-west", 45.52, -122.68),
    ("eu-central", 50.11, 8.68),
    ("ap-northeast", 35.68, 139.69),
    ("af-south", -33.92, 18.42),
];

/// `coordinator demo` arguments.
#[derive(Debug, Clone)]
pub struct DemoArgs {
    pub regions: usize,
    pub base_port: u16,
    pub state_dir: PathBuf,
    pub origin: Option<String>,
    pub tiered: bool,
    /// `ban` or `xkey`; none: ban, or xkey with `refresh_tags`.
    pub purge_mode: Option<String>,
    /// `[purge] refresh_tags`.
    pub refresh_tags: bool,
    /// Plaintext gRPC instead of mutual TLS.
    pub insecure: bool,
    /// Geo routing with this MaxMind database, and the DNS remote backend on `P+4`.
    pub geoip: Option<PathBuf>,
}

/// The demo's address for region `i` (127.0.1.i+1): what routing and DNS answer, and a
/// second listen address of that region's varnishd.
pub fn demo_address(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, (i + 1).min(254) as u8))
}

/// The zone the demo's DNS backend serves.
pub const DEMO_ZONE: &str = "shop.test.";

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

struct Region {
    name: String,
    http: SocketAddr,
    admin: SocketAddr,
    dir: PathBuf,
    varnish: Child,
    agent: Child,
    agent_config: PathBuf,
}

/// Runs the demo until `shutdown`.
pub async fn run(args: DemoArgs, shutdown: CancellationToken) -> Result<(), DemoError> {
    if args.regions == 0 || args.regions > 50 {
        return Err(DemoError::Invalid("--regions must be 1..=50".into()));
    }
    let purge_mode = match (args.purge_mode.as_deref(), args.refresh_tags) {
        (Some("ban"), true) => {
            return Err(DemoError::Invalid(
                "--refresh-tags needs --purge-mode xkey: a ban cannot leave a page stale, only evict it"
                    .into(),
            ))
        }
        (Some(mode), _) => mode.to_owned(),
        (None, true) => "xkey".to_owned(),
        (None, false) => "ban".to_owned(),
    };
    let top = args.base_port as u32 + 11 + 10 * (args.regions as u32 - 1);
    if args.base_port < 1024 || top > 65535 {
        return Err(DemoError::Invalid(format!(
            "--base-port must leave room for ports up to {top} (<= 65535)"
        )));
    }
    // Tokens, stores and rendered VCL live below: a new directory is owner only
    // (varnishd and the agents run as this user, or as root with `-j none`); an existing
    // one keeps its mode, and each file below has its own.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(daemon::files::PRIVATE_DIR)
            .create(&args.state_dir)
            .map_err(io(format!("cannot create {}", args.state_dir.display())))?;
    }
    let dir = args
        .state_dir
        .canonicalize()
        .map_err(io("cannot resolve --state-dir"))?;
    // Written again once this run's agents are connected; an earlier run's is stale.
    let _ = std::fs::remove_file(dir.join("cluster.json"));
    let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let port = |off: u32| SocketAddr::new(lo, (args.base_port as u32 + off) as u16);

    // Origin.
    let origin_addr = match &args.origin {
        Some(url) => resolve_origin(url)?,
        None => {
            let listener = TcpListener::bind(port(0))
                .await
                .map_err(io(format!("cannot listen on {}", port(0))))?;
            let origin = Arc::new(origin::Origin::default());
            tokio::spawn(origin::serve(listener, origin, shutdown.clone()));
            port(0)
        }
    };
    let origin_url = args
        .origin
        .clone()
        .unwrap_or_else(|| format!("http://{origin_addr}"));

    // Coordinator, in this process.
    let token = hex::encode(rand::random::<[u8; 24]>());
    let token_file = dir.join("api-token");
    process::write_private(&token_file, format!("{token}\n").as_bytes())?;
    let warm_token = hex::encode(rand::random::<[u8; 24]>());
    let warm_token_file = dir.join("warm-token");
    process::write_private(&warm_token_file, warm_token.as_bytes())?;
    let names: Vec<String> = (0..args.regions)
        .map(|i| {
            REGIONS
                .get(i)
                .map(|r| r.0.to_owned())
                .unwrap_or_else(|| format!("region-{i}"))
        })
        .collect();
    // In tiered mode region 0 (the shield) fetches from the origin, the others from it.
    let backend_of = |i: usize| {
        if args.tiered && i > 0 {
            port(10)
        } else {
            origin_addr
        }
    };
    // Mutual TLS unless --insecure: a CA, the coordinator's and each agent's certificate.
    let pki_dir = dir.join("pki");
    let tls_files = if args.insecure {
        tracing::warn!("--insecure: agents talk to the coordinator in plaintext, unauthenticated");
        None
    } else {
        coordinator::pki::init(&pki_dir, &[]).map_err(|e| DemoError::Invalid(e.to_string()))?;
        Some(TlsConfig {
            ca: pki_dir.join("ca.pem"),
            cert: pki_dir.join("coordinator.pem"),
            key: pki_dir.join("coordinator.key"),
        })
    };
    let base = configs::coordinator(&configs::CoordinatorFiles {
        purge: port(1),
        grpc: port(2),
        api: port(3),
        token_file: token_file.clone(),
        warm_token_file,
        tls: tls_files.clone(),
    })
    .map_err(|e| DemoError::Invalid(e.to_string()))?;
    let config = CoordinatorConfig {
        regions: names
            .iter()
            .enumerate()
            .map(|(i, name)| RegionConfig {
                name: name.clone(),
                lat: Some(REGIONS.get(i).map(|r| r.1).unwrap_or(0.0)),
                lon: Some(REGIONS.get(i).map(|r| r.2).unwrap_or(0.0)),
                vars: backend_vars(backend_of(i)),
                addresses: if args.geoip.is_some() {
                    vec![demo_address(i)]
                } else {
                    vec![]
                },
            })
            .collect(),
        rollout: RolloutConfig {
            canary_region: (args.regions > 1).then(|| names[0].clone()),
            canary_wait_s: 10,
            health_path: Some("/health_check.php".into()),
            ..RolloutConfig::default()
        },
        monitoring: coordinator::config::MonitoringConfig {
            origin: Some(origin_addr.to_string()),
            ..Default::default()
        },
        checks: vec![coordinator::config::CheckConfig {
            name: "health".into(),
            path: "/health_check.php".into(),
            host: "localhost".into(),
            expect_status: 200,
            body_contains: None,
            interval_ms: 2_000,
            timeout_ms: 2_000,
            slow_ms: 1_000,
        }],
        alerts: Default::default(),
        warm: coordinator::config::WarmConfig {
            shield: args.tiered.then(|| names[0].clone()),
            host: Some(DEMO_HOST.into()),
            rewarm_after_purge: true,
            ..base.warm.clone()
        },
        geo: match &args.geoip {
            Some(db) => Some(
                toml::from_str::<coordinator::config::GeoConfig>(&format!(
                    "database = {:?}\ndefault_region = {:?}\nrecover_s = 10",
                    std::path::absolute(db).unwrap_or_else(|_| db.clone()),
                    names[0]
                ))
                .map_err(|e| DemoError::Invalid(e.to_string()))?,
            ),
            None => None,
        },
        dns: match &args.geoip {
            Some(_) => Some(
                toml::from_str::<coordinator::config::DnsConfig>(&format!(
                    "listen = \"{}\"\nzone = {DEMO_ZONE:?}\nnames = [\"www\", \"@\"]\nttl = 30",
                    port(4)
                ))
                .map_err(|e| DemoError::Invalid(e.to_string()))?,
            ),
            None => None,
        },
        purge: coordinator::config::PurgeConfig {
            refresh_tags: args.refresh_tags,
            ..base.purge.clone()
        },
        ..base
    };
    let max_stale_s = config.purge.max_stale_s();
    config
        .validate()
        .map_err(|e| DemoError::Invalid(e.to_string()))?;
    let config_path = dir.join("coordinator.toml");
    configs::write(&config_path, &config).map_err(io("cannot write coordinator.toml"))?;
    let listeners = Listeners::bind(&config).await.map_err(io("coordinator"))?;
    let handles = server::open(&config, &dir.join("coordinator-state")).await?;
    let edges = handles.edges.clone();
    let rollouts = handles.rollouts.clone();
    let coordinator = tokio::spawn(server::run(
        config.clone(),
        handles,
        listeners,
        args.insecure,
        shutdown.clone(),
    ));

    // The sample bundle, for users to edit and push; rolled out once agents are up. A
    // state dir used before keeps what its user edited there and pushed.
    let bundle_dir = dir.join("bundle");
    if bundle_dir.join(bundle::MAIN).is_file() {
        daemon::say!(
            "keeping the bundle in {} (written by an earlier run; delete it for the sample)",
            bundle_dir.display()
        );
    } else {
        std::fs::create_dir_all(&bundle_dir).map_err(io("cannot create bundle dir"))?;
        for (name, text) in &sample_bundle().files {
            std::fs::write(bundle_dir.join(name), text).map_err(io("cannot write bundle"))?;
        }
    }
    let pushed_before = rollouts.view().desired;

    // Regions.
    let agent_bin = process::sibling_binary("edge-agent");
    let mut regions: Vec<Region> = Vec::new();
    let started = async {
        for (i, name) in names.iter().enumerate() {
            let rdir = dir.join(name);
            std::fs::create_dir_all(&rdir)
                .map_err(io(format!("cannot create {}", rdir.display())))?;
            let http = port(10 + 10 * i as u32);
            let admin = port(11 + 10 * i as u32);
            let vcl_file = write_boot_vcl(
                &rdir.join("boot-vcl"),
                name,
                backend_of(i),
                &warm_token,
                max_stale_s,
            )?;
            let secret_file = rdir.join("secret");
            process::write_secret(&secret_file)?;
            let spec = VarnishSpec {
                workdir: rdir.join("varnish"),
                http,
                admin,
                secret_file: secret_file.clone(),
                vcl_file,
                storage_mb: 64,
                also_listen: args
                    .geoip
                    .is_some()
                    .then(|| SocketAddr::new(demo_address(i), http.port())),
            };
            let varnish = process::start_varnishd(&spec, &rdir.join("varnishd.log")).await?;
            let agent_config = rdir.join("edge-agent.toml");
            let id = format!("{name}-1");
            let tls = if args.insecure {
                None
            } else {
                coordinator::pki::issue(&pki_dir, &id, name, coordinator::pki::LEAF_DAYS)
                    .map_err(|e| DemoError::Invalid(e.to_string()))?;
                Some(configs::agent_tls(&pki_dir, &id))
            };
            let mode =
                configs::purge_mode(&purge_mode).map_err(|e| DemoError::Invalid(e.to_string()))?;
            let agent = configs::agent(
                &id,
                name,
                &[port(2)],
                tls,
                rdir.join("agent-state"),
                &configs::VarnishFiles {
                    http,
                    admin,
                    secret_file: secret_file.clone(),
                    instance: rdir.join("varnish"),
                },
                mode,
            );
            configs::write(&agent_config, &agent).map_err(io("cannot write edge-agent.toml"))?;
            let mut agent_args = vec!["--config".to_owned(), agent_config.display().to_string()];
            if args.insecure {
                agent_args.push("--insecure".into());
            }
            let agent = process::spawn(
                &agent_bin,
                &agent_args,
                &rdir.join("edge-agent.log"),
                "edge-agent",
            )?;
            regions.push(Region {
                name: name.clone(),
                http,
                admin,
                dir: rdir,
                varnish,
                agent,
                agent_config,
            });
        }
        // Wait for every agent.
        let deadline = Instant::now() + Duration::from_secs(60);
        while edges.connected() < names.len() {
            for r in regions.iter_mut() {
                if let Some(status) = r.agent.try_status() {
                    return Err(DemoError::Process(ProcessError::Exited {
                        program: "edge-agent".into(),
                        status,
                        log: r.agent.log_path().display().to_string(),
                    }));
                }
            }
            if Instant::now() > deadline {
                return Err(DemoError::Invalid(
                    "not every edge agent connected within 60s; see */edge-agent.log".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Roll the sample bundle out everywhere (no canary wait for the first one), unless
        // the state dir's coordinator has a version already: what its user pushed stays.
        let sample = pushed_before.is_none();
        let version = match pushed_before {
            Some(version) => {
                daemon::say!(
                    "keeping version {version}, pushed in an earlier run on this state dir (the sample bundle is not pushed; delete {} to start afresh)",
                    dir.join("coordinator-state").display()
                );
                version
            }
            None => {
                let bundle =
                    Bundle::from_dir(&bundle_dir).map_err(|e| DemoError::Invalid(e.to_string()))?;
                rollouts
                    .push(&bundle, false, true)
                    .map_err(|e| DemoError::Invalid(format!("pushing the sample bundle: {e}")))?
                    .version
            }
        };
        loop {
            let view = rollouts.view();
            let everywhere = view
                .edges
                .iter()
                .all(|e| e.active_version.as_deref() == Some(version.as_str()));
            match view.rollout.as_ref().map(|r| r.phase) {
                None | Some(Phase::Done) if everywhere => break,
                Some(Phase::Failed) if sample => {
                    return Err(DemoError::Invalid(format!(
                        "the sample bundle failed to roll out: {}",
                        view.rollout.and_then(|r| r.error).unwrap_or_default()
                    )))
                }
                _ => {}
            }
            if Instant::now() > deadline + Duration::from_secs(60) {
                return Err(DemoError::Invalid(
                    "the sample bundle did not reach every edge within 60s; see */edge-agent.log"
                        .into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok::<String, DemoError>(version)
    };
    let outcome = tokio::select! {
        r = started => r.map(Some),
        _ = shutdown.cancelled() => Ok(None),
    };
    let config_version = match outcome {
        Ok(v) => v,
        Err(e) => {
            stop_all(&mut regions).await;
            shutdown.cancel();
            return Err(e);
        }
    };

    if !shutdown.is_cancelled() {
        let cluster = json!({
            "origin": origin_url,
            "purge": port(1).to_string(),
            "grpc": port(2).to_string(),
            "api": format!("http://{}", port(3)),
            "api_token": token,
            "bundle_dir": bundle_dir,
            "config_version": config_version,
            "coordinator_config": config_path,
            "dns": config.dns.as_ref().map(|d| d.listen.to_string()),
            "geoip": config.geo.as_ref().map(|g| g.database.clone()),
            "tiered": args.tiered,
            "warm_host": DEMO_HOST,
            "grpc_tls": !args.insecure,
            "pki_dir": (!args.insecure).then(|| pki_dir.clone()),
            "regions": regions.iter().map(|r| json!({
                "name": r.name,
                "varnish_http": r.http.to_string(),
                "varnish_admin": r.admin.to_string(),
                "varnish_dir": r.dir.join("varnish"),
                "varnish_secret": r.dir.join("secret"),
                "varnish_pid": r.varnish.pid(),
                "agent_pid": r.agent.pid(),
                "agent_config": r.agent_config,
            })).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&cluster).unwrap_or_default();
        // It holds the API token.
        process::write_private(&dir.join("cluster.json"), text.as_bytes())?;
        print_howto(
            &dir,
            &regions,
            port(1),
            port(3),
            origin_addr,
            args.refresh_tags,
        );
        if config.geo.is_some() {
            print_geo_howto(&dir, port(3), port(4));
        }
    }

    shutdown.cancelled().await;
    stop_all(&mut regions).await;
    let _ = tokio::time::timeout(server::GRACE, coordinator).await;
    Ok(())
}

/// What to try with `--geoip`: routing over JSON and through a local PowerDNS.
fn print_geo_howto(dir: &Path, api: SocketAddr, dns: SocketAddr) {
    let bin = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "coordinator".into());
    let d = dir.display();
    daemon::say!(
        "\nGeo routing (each region answers as 127.0.1.N; its varnish listens there too):"
    );
    daemon::say!("  {bin} route 81.2.69.142 --api http://{api}          # London: nearest region, why, every candidate");
    daemon::say!("  curl -s 'http://{api}/api/v1/route?ip=175.16.199.1'");
    daemon::say!(
        "  PowerDNS remote backend on http://{dns}/dns (zone {DEMO_ZONE}); with pdns installed:"
    );
    daemon::say!("  printf 'launch=remote\\nremote-connection-string=http:url=http://{dns}/dns\\nlocal-address=127.0.0.1\\nlocal-port=5300\\nedns-subnet-processing=yes\\nsecurity-poll-suffix=\\nzone-cache-refresh-interval=0\\ncache-ttl=0\\nquery-cache-ttl=0\\nnegquery-cache-ttl=0\\nsocket-dir={d}\\n' > {d}/pdns.conf");
    daemon::say!("  pdns_server --config-dir={d} --daemon=no --guardian=no &");
    daemon::say!("  dig @127.0.0.1 -p 5300 www.shop.test A +subnet=81.2.69.142/32 +short");
}

async fn stop_all(regions: &mut [Region]) {
    for r in regions.iter_mut() {
        r.agent.stop(Duration::from_secs(5)).await;
    }
    for r in regions.iter_mut() {
        r.varnish.stop(Duration::from_secs(10)).await;
    }
}

fn resolve_origin(url: &str) -> Result<SocketAddr, DemoError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| DemoError::Invalid(format!("--origin {url:?} must be an http:// URL")))?;
    let hostport = rest.split('/').next().unwrap_or_default();
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    };
    hostport
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| DemoError::Invalid(format!("cannot resolve --origin {url:?}")))
}

fn print_howto(
    dir: &Path,
    regions: &[Region],
    purge: SocketAddr,
    api: SocketAddr,
    origin: SocketAddr,
    refresh: bool,
) {
    let http = |i: usize| {
        regions
            .get(i)
            .or(regions.first())
            .map(|r| r.http.to_string())
            .unwrap_or_default()
    };
    let (first, second) = (http(0), http(1));
    // The binary that is running, so the lines work as pasted.
    let bin = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "coordinator".into());
    let d = dir.display();
    let host = format!("-H 'Host: {DEMO_HOST}'");
    daemon::say!(
        "\nDemo cluster is up ({} regions). Files: {d}/cluster.json\n",
        regions.len()
    );
    daemon::say!("  origin           http://{origin}");
    daemon::say!("  purge listener   {purge}   (Magento: bin/magento setup:config:set --http-cache-hosts={purge})");
    daemon::say!("  API / metrics    http://{api}/api/v1/edges   http://{api}/metrics   dashboard http://{api}/");
    for r in regions {
        daemon::say!(
            "  {:<16} varnish http://{}  admin {}",
            r.name,
            r.http,
            r.admin
        );
    }
    daemon::say!("\nTry it (every request as the shop's host, {DEMO_HOST}):");
    daemon::say!("  curl -si {host} http://{first}/p/42 | grep -i cache-debug    # MISS, then HIT");
    daemon::say!("  curl -si {host} http://{second}/p/42 | grep -i cache-debug    # MISS, then HIT in a second region");
    daemon::say!(
        "  curl -si -X PURGE -H 'X-Magento-Tags-Pattern: ((^|,)cat_p_42(,|$))' http://{purge}/"
    );
    if refresh {
        daemon::say!("  curl -si {host} http://{first}/p/42 | grep -i -e cache-debug -e x-origin-render   # HIT at once: the stale copy (refresh mode)");
        daemon::say!("  curl -si {host} http://{second}/p/42 | grep -i -e cache-debug -e x-origin-render  # a second later: the new render, everywhere");
        daemon::say!("  curl -s  http://{origin}/__origin/renders?url=/p/42          # rendered once more, for every region (once if tiered)");
    } else {
        daemon::say!(
            "  curl -si {host} http://{first}/p/42 | grep -i cache-debug    # MISS: purged"
        );
        daemon::say!(
            "  curl -si {host} http://{second}/p/42 | grep -i cache-debug    # MISS: purged there too"
        );
    }
    daemon::say!("  curl -s  http://{api}/api/v1/purges/1                         # when each edge applied it");
    daemon::say!("  {bin} status --api http://{api}");
    daemon::say!("\nChange config (VCL + WAF), canary region first:");
    daemon::say!("  $EDITOR {d}/bundle/waf.toml");
    daemon::say!(
        "  {bin} config push {d}/bundle --wait --api http://{api} --token-file {d}/api-token"
    );
    daemon::say!(
        "\nWarm every region from the sitemap (tiered with --tiered: one origin render per page):"
    );
    daemon::say!(
        "  {bin} warm start --sitemap http://{origin}/sitemap.xml --wait --api http://{api} --token-file {d}/api-token"
    );
    daemon::say!("  curl -si {host} http://{first}/p/7 | grep -i cache-debug     # HIT");
    daemon::say!("  curl -s  http://{origin}/__origin/renders?url=/p/7     # rendered once per region (once if tiered)");
    daemon::say!("\nCtrl-C stops everything.");
}
