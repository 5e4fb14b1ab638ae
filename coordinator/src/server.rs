//! `coordinator serve`: wires the log, the purge listener, the gRPC fan-out and the API
//! together on sockets the caller has already bound (tests bind port 0).
//!
//! Shutdown: cancelling the token stops accepting, ends every agent session (agents
//! reconnect elsewhere or later and resume from their cursor), and waits at most
//! [`GRACE`] for in-flight requests.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::bundle::store::{ConfigStore, StoreError};
use crate::config::CoordinatorConfig;
use crate::fanout::edges::EdgeRegistry;
use crate::fanout::FanoutService;
use crate::metrics::Metrics;
use crate::purge::listener;
use crate::purge::log::{LogError, PurgeLog};
use crate::rollout::Rollouts;
use crate::tls::{self, ServerTls};

/// Longest wait for in-flight work after shutdown is requested.
pub const GRACE: Duration = Duration::from_secs(10);

/// The three sockets, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    pub purge: TcpListener,
    pub grpc: TcpListener,
    pub api: TcpListener,
}

impl Listeners {
    /// Binds the addresses the config names.
    pub async fn bind(config: &CoordinatorConfig) -> std::io::Result<Self> {
        let bind = |addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
        };
        Ok(Listeners {
            purge: bind(config.purge.listen).await?,
            grpc: bind(config.grpc.listen).await?,
            api: bind(config.api.listen).await?,
        })
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read api.token_file {path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
    #[error("gRPC needs [grpc.tls] (ca, cert, key) for mutual TLS, or --insecure for plaintext")]
    NeedsInsecure,
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Config(crate::config::ConfigError),
    #[error(transparent)]
    Warm(#[from] crate::warm::store::WarmStoreError),
    #[error("warm token {path}: {source}")]
    WarmToken {
        path: String,
        source: std::io::Error,
    },
}

/// Shared handles of a running coordinator (the demo and tests look inside).
#[derive(Clone)]
pub struct Handles {
    pub log: PurgeLog,
    pub edges: Arc<EdgeRegistry>,
    pub metrics: Arc<Metrics>,
    pub rollouts: Arc<Rollouts>,
    /// Present when `[grpc.tls]` is configured.
    pub tls: Option<Arc<ServerTls>>,
    pub traffic: Arc<crate::traffic::Traffic>,
    pub monitor: Arc<crate::monitor::Monitor>,
    pub warm: Arc<crate::warm::Warm>,
}

/// The secret warm requests carry (`X-Warm-Token`, the VCL's `${warm_token}`): read from
/// `[warm] token_file`, or generated once into `STATE_DIR/warm.token` (mode 0600).
pub fn warm_token(config: &CoordinatorConfig, state_dir: &Path) -> Result<String, ServeError> {
    let (path, generate) = match &config.warm.token_file {
        Some(p) => (p.clone(), false),
        None => (state_dir.join("warm.token"), true),
    };
    let err = |source| ServeError::WarmToken {
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

/// Opens the state and returns the handles; [`run`] serves them.
pub fn open(config: &CoordinatorConfig, state_dir: &Path) -> Result<Handles, ServeError> {
    let log = PurgeLog::open(state_dir, config.retention())?;
    let store = Arc::new(ConfigStore::open(state_dir)?);
    let token = warm_token(config, state_dir)?;
    let rollouts = Rollouts::new(store, config.rollout.clone(), config.region_vars(&token))?;
    let tls = match &config.grpc.tls {
        Some(files) => Some(ServerTls::load(files)?),
        None => None,
    };
    let edges = Arc::new(EdgeRegistry::default());
    let monitor = crate::monitor::Monitor::new(
        config.monitoring.clone(),
        config.checks.clone(),
        config.alerts.clone(),
        config.regions.iter().map(|r| r.name.clone()).collect(),
        edges.clone(),
        log.clone(),
    );
    let warm = crate::warm::Warm::open(
        config.warm.clone(),
        token,
        config.regions.iter().map(|r| r.name.clone()).collect(),
        state_dir,
        edges.clone(),
    )?;
    Ok(Handles {
        warm,
        log,
        rollouts,
        tls,
        traffic: Arc::default(),
        monitor,
        edges,
        metrics: Arc::new(Metrics::default()),
    })
}

/// Serves until `shutdown` is cancelled.
pub async fn run(
    config: CoordinatorConfig,
    handles: Handles,
    listeners: Listeners,
    insecure: bool,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    if handles.tls.is_none() && !insecure {
        return Err(ServeError::NeedsInsecure);
    }
    let token = Arc::new(std::sync::RwLock::new(read_token(
        config.api.token_file.as_deref(),
    )?));
    match &handles.tls {
        Some(t) => {
            let e = t.expiry();
            tracing::info!(server_not_after = e.server_not_after, ca_not_after = e.ca_not_after,
                "gRPC requires mutual TLS; SIGHUP reloads the certificate files");
        }
        None => tracing::warn!(
            "gRPC runs in plaintext (--insecure): agents are not authenticated, anyone who reaches the port can purge and push config"
        ),
    }
    tracing::info!(
        purge = %config.purge.listen, grpc = %config.grpc.listen, api = %config.api.listen,
        log_id = handles.log.log_id(), head_seq = handles.log.head(), "coordinator serving"
    );

    let listener_config = config.listener().map_err(ServeError::Config)?;
    let purge_task = tokio::spawn(listener::run(
        listeners.purge,
        listener_config,
        handles.log.clone(),
        handles.metrics.clone(),
        shutdown.clone(),
    ));

    let driver = tokio::spawn(handles.rollouts.clone().drive(shutdown.clone()));
    let monitor_task = tokio::spawn(handles.monitor.clone().drive(shutdown.clone()));
    let warm_task = tokio::spawn(
        handles
            .warm
            .clone()
            .run(handles.log.clone(), shutdown.clone()),
    );
    let service = FanoutService::new(&handles, shutdown.clone());
    let grpc_shutdown = shutdown.clone();
    let server_tls = handles.tls.clone();
    let grpc_task = tokio::spawn(async move {
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(proto::CoordinatorServer::new(service));
        let result = match server_tls {
            Some(t) => {
                let incoming = tls::incoming(listeners.grpc, t, grpc_shutdown.clone());
                router
                    .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled_owned())
                    .await
            }
            None => {
                // `Server::tcp_nodelay` only applies to sockets tonic binds itself; an
                // already-bound listener needs its accepted sockets set here.
                match tonic::transport::server::TcpIncoming::from_listener(
                    listeners.grpc,
                    true,
                    None,
                ) {
                    Ok(incoming) => {
                        router
                            .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled_owned())
                            .await
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "gRPC listener unusable");
                        return;
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    tokio::spawn(reload_on_sighup(
        handles.tls.clone(),
        token.clone(),
        config.api.token_file.clone(),
        shutdown.clone(),
    ));

    let app = api::router(ApiState {
        log: handles.log.clone(),
        edges: handles.edges.clone(),
        metrics: handles.metrics.clone(),
        rollouts: handles.rollouts.clone(),
        tls: handles.tls.clone(),
        traffic: handles.traffic.clone(),
        monitor: handles.monitor.clone(),
        warm: handles.warm.clone(),
        regions: Arc::new(config.regions.iter().map(|r| r.name.clone()).collect()),
        read_requires_token: config.api.read_requires_token,
        token,
    });
    let api_shutdown = shutdown.clone();
    let api_task = tokio::spawn(async move {
        let result = axum::serve(listeners.api, app)
            .with_graceful_shutdown(api_shutdown.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "API server failed");
        }
    });

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    let all = async {
        let _ = tokio::join!(
            purge_task,
            grpc_task,
            api_task,
            driver,
            monitor_task,
            warm_task
        );
    };
    if tokio::time::timeout(GRACE, all).await.is_err() {
        tracing::warn!("grace period over; abandoning in-flight work");
    }
    Ok(())
}

fn read_token(path: Option<&Path>) -> Result<Option<Arc<str>>, ServeError> {
    let Some(path) = path else { return Ok(None) };
    let t = std::fs::read_to_string(path).map_err(|source| ServeError::Token {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Some(Arc::<str>::from(t.trim())))
}

/// On every SIGHUP: reload the TLS files and the API token (rotation without a restart).
/// A reload that fails keeps what was loaded before.
async fn reload_on_sighup(
    tls: Option<Arc<ServerTls>>,
    token: Arc<std::sync::RwLock<Option<Arc<str>>>>,
    token_file: Option<std::path::PathBuf>,
    shutdown: CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; certificates and token reload only on restart");
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            s = hup.recv() => if s.is_none() { return },
        }
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => {
                    let e = tls.expiry();
                    tracing::info!(
                        server_not_after = e.server_not_after,
                        ca_not_after = e.ca_not_after,
                        "TLS certificates reloaded"
                    );
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS reload failed; keeping the previous certificates")
                }
            }
        }
        match read_token(token_file.as_deref()) {
            Ok(new) => {
                *token.write().unwrap_or_else(|p| p.into_inner()) = new;
                tracing::info!("API token reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "API token reload failed; keeping the previous token")
            }
        }
    }
}
