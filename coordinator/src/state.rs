//! The running coordinator's shared state: one handle per subsystem, opened once by
//! [`Coordinator::open`] and cloned (every field is a cheap handle) into the agent sessions
//! ([`crate::session`]), the API ([`crate::api`]) and the server's tasks.
//!
//! It sits below the sessions, the API and the server and above every subsystem, so
//! each of those reads the same handles instead of keeping its own copy of them. It also
//! builds the metrics [`Registry`]: each subsystem registers its own families into it.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use crate::bundle::store::{BundleStore, StoreError};
use crate::cluster::{config::Backend, Cluster, ClusterError};
use crate::config::CoordinatorConfig;
use crate::edges::EdgeRegistry;
use crate::fanout::Fanout;
use crate::geo::db::DbError;
use crate::geo::Geo;
use crate::maintenance::Maintenance;
use crate::metrics::Registry;
use crate::monitor::Monitor;
use crate::purge::counters::PurgeCounters;
use crate::purge::log::{LogError, PurgeLog, SpoolOpts};
use crate::rollout::Rollouts;
use crate::tls::{ServerTls, TlsError};
use crate::traffic::Traffic;
use crate::warm::store::WarmStoreError;
use crate::warm::Warm;

/// Why the state could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Warm(#[from] WarmStoreError),
    #[error(transparent)]
    Geo(#[from] DbError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("drains and silences: {0}")]
    Maintenance(#[from] crate::maintenance::StoreError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("warm token in etcd: {0}")]
    SharedToken(String),
    #[error("warm token {path}: {source}")]
    WarmToken {
        path: String,
        source: std::io::Error,
    },
}

/// Shared handles of a running coordinator.
#[derive(Clone)]
pub struct Coordinator {
    pub log: PurgeLog,
    /// Paces every session's purge batches to the fleet and the purge rate, and shares
    /// the batches encoded for sessions at one cursor.
    pub fanout: Arc<Fanout>,
    /// Who this coordinator is in its cluster and who leads (a cluster of one when
    /// the store is embedded).
    pub cluster: Arc<Cluster>,
    /// What the purge listener and the API count (one set for both doors).
    pub purge_counters: PurgeCounters,
    pub edges: Arc<EdgeRegistry>,
    pub rollouts: Arc<Rollouts>,
    /// Present when `[grpc.tls]` is configured.
    pub tls: Option<Arc<ServerTls>>,
    pub traffic: Arc<Traffic>,
    pub monitor: Arc<Monitor>,
    pub warm: Arc<Warm>,
    /// Present when `[geo]` is configured.
    pub geo: Option<Arc<Geo>>,
    /// Drained regions and alert silences.
    pub maintenance: Arc<Maintenance>,
    /// Region names from coordinator.toml (edges may add others).
    pub regions: Arc<Vec<String>>,
    /// Who asked the API for what ([`crate::audit`]).
    pub audit: crate::audit::Audit,
    /// Every subsystem's metric families.
    pub metrics: Arc<Registry>,
    /// `--state-dir` (where a backup's scratch copy is made).
    pub state_dir: Arc<Path>,
}

impl Coordinator {
    /// Opens the purge log (under `state_dir`, or the cluster's in etcd with
    /// `[store] backend = "etcd"`), the config store and warm store under `state_dir`,
    /// loads the TLS files, and builds every subsystem and its metrics.
    pub async fn open(
        config: &CoordinatorConfig,
        state_dir: &Path,
    ) -> Result<Coordinator, OpenError> {
        // Owner only: the stores hold bundles (passwords in `waf.toml`), the warm token.
        daemon::files::dir_with_mode(state_dir, daemon::files::PRIVATE_DIR).map_err(|e| {
            OpenError::Store(StoreError::Storage(format!("{}: {e}", state_dir.display())))
        })?;
        let id = config.store.id_or_default(config.api.listen);
        let api_url = config.store.api_url(config.api.listen);
        let (cluster, log, token, store, etcd_kv) = match config.store.backend {
            Backend::Embedded => (
                Cluster::embedded(id, api_url),
                PurgeLog::open(state_dir, config.purge.retention())?,
                warm_token(config, state_dir)?,
                BundleStore::open(state_dir)?,
                None,
            ),
            Backend::Etcd => {
                let (cluster, etcd) = Cluster::open_etcd(&config.store, id, api_url).await?;
                let spool = SpoolOpts {
                    dir: state_dir.to_path_buf(),
                    coordinator_id: cluster.id().to_owned(),
                    after: std::time::Duration::from_millis(config.store.spool_after_ms),
                    max_bytes: config.store.spool_max_bytes,
                    health: cluster.store_health().clone(),
                };
                let log = PurgeLog::open_etcd(
                    etcd.clone(),
                    &config.store.prefix,
                    config.purge.retention(),
                    cluster.leading(),
                    spool,
                )
                .await?;
                // Every coordinator renders VCL for agents that may fail over to another:
                // they must share the warm token.
                let token = match &config.warm.token_file {
                    Some(_) => warm_token(config, state_dir)?,
                    None => {
                        let key = format!("{}warm/token", config.store.prefix);
                        let fresh = hex::encode(rand::random::<[u8; 24]>());
                        let v = etcd
                            .get_or_create(key.as_bytes(), fresh.as_bytes())
                            .await
                            .map_err(|e| OpenError::SharedToken(e.message().to_owned()))?;
                        String::from_utf8_lossy(&v).into_owned()
                    }
                };
                let kv = crate::etcd_kv::EtcdKv::new(
                    etcd.clone(),
                    &config.store.prefix,
                    cluster.leadership(),
                );
                (cluster, log, token, BundleStore::etcd(kv.clone()), Some(kv))
            }
        };
        let store = Arc::new(store);
        let rollouts = Rollouts::new(store, config.rollout.clone(), config.region_vars(&token))?;
        rollouts.set_leading(cluster.leading());
        let tls = match &config.grpc.tls {
            Some(files) => Some(ServerTls::load(files)?),
            None => None,
        };
        let edges = Arc::new(EdgeRegistry::default());
        let traffic = Arc::new(Traffic::default());
        let monitor = Monitor::new(
            config.monitoring.clone(),
            config.checks.clone(),
            config.alerts.clone(),
            config.region_names(),
            edges.clone(),
            log.clone(),
            traffic.clone(),
        );
        if let Some(kv) = &etcd_kv {
            monitor.set_ledger(crate::monitor::ledger::Ledger::new(kv.clone()));
        }
        monitor.set_store_health(cluster.store_health().clone());
        let maintenance = match &etcd_kv {
            None => Maintenance::open(state_dir, config.region_names())?,
            Some(kv) => Maintenance::etcd(
                kv.clone(),
                config.region_names(),
                cluster.store_health().clone(),
            ),
        };
        monitor.set_maintenance(maintenance.clone());
        cluster.set_log(log.clone());
        let mut warm_config = config.warm.clone();
        warm_config.refresh_max_stale_s = config
            .purge
            .refresh_tags
            .then_some(config.purge.refresh_max_stale_s);
        let warm = match &etcd_kv {
            None => Warm::open(
                warm_config,
                token,
                config.region_names(),
                state_dir,
                edges.clone(),
            )?,
            Some(kv) => Warm::with_store(
                warm_config,
                token,
                config.region_names(),
                crate::warm::store::WarmStore::etcd(kv.clone()),
                edges.clone(),
            )?,
        };
        warm.set_traffic(traffic.clone());
        let evidence = warm.clone();
        monitor.set_origin_evidence(Arc::new(move |region| evidence.origin_failing(region)));
        let purge_counters = PurgeCounters::default();
        let geo = match &config.geo {
            Some(g) => Some(Arc::new(Geo::open(
                g.clone(),
                config.dns.clone(),
                config.region_points(),
            )?)),
            None => None,
        };

        let audit = crate::audit::Audit::open(
            state_dir,
            cluster.id(),
            crate::audit::Bounds {
                keep: config.api.audit_keep,
                keep_ms: config.api.audit_keep_days * 86_400_000,
            },
            etcd_kv.clone(),
            etcd_kv.as_ref().map(|_| cluster.store_health().clone()),
        )?;

        let mut registry = Registry::default();
        purge_counters.register(&log, &mut registry);
        let fanout = Arc::new(Fanout::default());
        fanout.register_metrics(&mut registry);
        cluster.register_metrics(&mut registry);
        edges.register_metrics(&log, tls.is_some(), &mut registry);
        rollouts.register_metrics(&mut registry);
        if let Some(tls) = &tls {
            tls.register_metrics(&mut registry);
        }
        traffic.register_metrics(&mut registry);
        monitor.register_metrics(&mut registry);
        warm.register_metrics(&mut registry);
        if let Some(geo) = &geo {
            geo.set_maintenance(maintenance.clone());
            geo.register_metrics(&mut registry);
        }
        maintenance.register_metrics(&mut registry);
        registry.register_collector(crate::metrics::collector((), |_, e| {
            crate::metrics::counter(
                e,
                "coordinator_accept_errors_total",
                "Connections the kernel could not hand over (out of file descriptors, ...), by listener.",
                crate::accept::errors()
                    .into_iter()
                    .map(|(l, n)| ([("listener", crate::metrics::Label(l))], n)),
            )
        }));
        registry.register_collector(crate::metrics::collector((), |_, e| {
            let rows: Vec<(&str, String, u64)> = crate::http_front::refused()
                .into_iter()
                .map(|(l, s, n)| (l, s.to_string(), n))
                .collect();
            crate::metrics::counter(
                e,
                "coordinator_http_requests_refused_total",
                "Requests the API or DNS front refused before the app saw them (bad head, no token, body too large, timeout), by listener and status.",
                rows.iter().map(|(l, s, n)| {
                    (
                        [
                            ("listener", crate::metrics::Label(l)),
                            ("status", crate::metrics::Label(s)),
                        ],
                        *n,
                    )
                }),
            )
        }));

        Ok(Coordinator {
            log,
            fanout,
            cluster,
            purge_counters,
            edges,
            rollouts,
            tls,
            traffic,
            monitor,
            warm,
            geo,
            maintenance,
            regions: Arc::new(config.region_names()),
            audit,
            metrics: Arc::new(registry),
            state_dir: Arc::from(state_dir),
        })
    }
}

/// The secret warm requests carry (`X-Warm-Token`, the VCL's `${warm_token}`): read from
/// `[warm] token_file`, or generated once into `STATE_DIR/warm.token` (mode 0600).
pub fn warm_token(config: &CoordinatorConfig, state_dir: &Path) -> Result<String, OpenError> {
    let (path, generate) = match &config.warm.token_file {
        Some(p) => (p.clone(), false),
        None => (state_dir.join("warm.token"), true),
    };
    let err = |source| OpenError::WarmToken {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
        Err(e) if !(generate && e.kind() == std::io::ErrorKind::NotFound) => Err(err(e)),
        _ if !generate => Err(err(std::io::Error::other("is empty"))),
        _ => {
            let token = hex::encode(rand::random::<[u8; 24]>());
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(err)?;
            f.write_all(token.as_bytes()).map_err(err)?;
            Ok(token)
        }
    }
}
