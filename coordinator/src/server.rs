//! `coordinator serve`: serves the [`Coordinator`] on three sockets the caller has already bound
//! (tests bind port 0): the purge listener, the agents' gRPC sessions and the API. The
//! API (and the DNS backend, when configured) is served through [`crate::http_front`],
//! with [`api::admit`] as its gate: the token and the body limit from the head first.
//!
//! Shutdown: cancelling the token stops accepting, ends every agent session (agents
//! reconnect elsewhere or later and resume from their cursor), and waits at most
//! [`GRACE`] for in-flight requests.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::config::CoordinatorConfig;
use crate::purge::listener;
use crate::session::SessionService;
use crate::state::{Coordinator, OpenError};
use crate::tls::{self, ServerTls};

/// Longest wait for in-flight work after shutdown is requested.
pub const GRACE: Duration = Duration::from_secs(10);

/// The three sockets, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    pub purge: TcpListener,
    pub grpc: TcpListener,
    pub api: TcpListener,
    /// The PowerDNS remote backend, when `[dns]` is configured.
    pub dns: Option<TcpListener>,
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
            dns: match &config.dns {
                Some(d) => Some(bind(d.listen).await?),
                None => None,
            },
        })
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("api tokens: {0}")]
    Token(#[from] crate::tokens::TokenError),
    #[error("gRPC needs [grpc.tls] (ca, cert, key) for mutual TLS, or --insecure for plaintext")]
    NeedsInsecure,
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("purge listener: {0}")]
    Listener(String),
    #[error("{0}")]
    ProtocolVersion(String),
}

/// What can be refused before anything is opened or joined (an election lease taken by a
/// coordinator that then exits stalls its cluster's election for a lease TTL): plaintext
/// gRPC without `insecure`, an API token file that cannot be read, a bad
/// `VC_PROTOCOL_VERSION` (a test knob: `proto::version`).
pub fn preflight(config: &CoordinatorConfig, insecure: bool) -> Result<(), ServeError> {
    if config.grpc.tls.is_none() && !insecure {
        return Err(ServeError::NeedsInsecure);
    }
    if let Some(v) = proto::version::from_env().map_err(ServeError::ProtocolVersion)? {
        tracing::warn!(protocol = v, accepts = %proto::version::fmt_window(v),
            "{}={v}: speaking protocol {v} instead of {} (for tests only)",
            proto::version::ENV, proto::version::PROTOCOL_VERSION);
    }
    load_tokens(config).map(|_| ())
}

fn load_tokens(config: &CoordinatorConfig) -> Result<crate::tokens::Tokens, ServeError> {
    Ok(crate::tokens::Tokens::load(
        config.api.token_file.as_deref(),
        &config.api.tokens,
    )?)
}

/// Opens the state ([`Coordinator::open`]); [`run`] serves it.
pub async fn open(config: &CoordinatorConfig, state_dir: &Path) -> Result<Coordinator, ServeError> {
    crate::backup::sweep_leftovers(state_dir);
    Ok(Coordinator::open(config, state_dir).await?)
}

/// Serves until `shutdown` is cancelled.
pub async fn run(
    config: CoordinatorConfig,
    state: Coordinator,
    listeners: Listeners,
    insecure: bool,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    if state.tls.is_none() && !insecure {
        return Err(ServeError::NeedsInsecure);
    }
    let tokens = load_tokens(&config)?;
    match &state.tls {
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
        log_id = state.log.log_id(), head_seq = state.log.head(), id = state.cluster.id(),
        store = if state.log.is_shared() { "etcd" } else { "embedded" }, "coordinator serving"
    );

    let listener_config = config.purge.listener()?;
    let purge_task = listener::run_dedicated(
        listeners.purge,
        listener_config,
        state.log.clone(),
        state.purge_counters.clone(),
        shutdown.clone(),
    )
    .map_err(|e| ServeError::Listener(e.to_string()))?;

    let views = crate::cluster::PeerViews {
        edges: state.edges.clone(),
        rollouts: state.rollouts.clone(),
        monitor: state.monitor.clone(),
        traffic: state.traffic.clone(),
        warm: state.warm.clone(),
        geo: state.geo.clone(),
    };
    let cluster_task = tokio::spawn(state.cluster.clone().run(
        views,
        tokens.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(state.rollouts.clone().follow_plan(shutdown.clone()));
    tokio::spawn(
        state
            .maintenance
            .clone()
            .run(state.cluster.leading(), shutdown.clone()),
    );
    let driver = tokio::spawn(state.rollouts.clone().run(shutdown.clone()));
    let monitor_task = tokio::spawn(
        state
            .monitor
            .clone()
            .run(state.cluster.leading(), shutdown.clone()),
    );
    let warm_task = tokio::spawn(state.warm.clone().run(
        state.log.clone(),
        state.cluster.leading(),
        shutdown.clone(),
    ));
    let service = SessionService::new(state.clone(), shutdown.clone())
        .with_handoff_after(Duration::from_secs(config.store.handoff_after_s));
    let handoff_task = tokio::spawn(service.watch_handoff());
    let grpc_shutdown = shutdown.clone();
    let server_tls = state.tls.clone();
    let per_source = config.grpc.handshakes_per_source;
    let grpc_task = tokio::spawn(async move {
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(proto::CoordinatorServer::new(service));
        let result = match server_tls {
            Some(t) => {
                let incoming = tls::incoming(listeners.grpc, t, per_source, grpc_shutdown.clone());
                router
                    .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled_owned())
                    .await
            }
            None => {
                // Our own accept loop (TCP_NODELAY set, failures counted and logged):
                // `Server::tcp_nodelay` only applies to sockets tonic binds itself.
                let incoming = crate::accept::incoming(
                    listeners.grpc,
                    per_source,
                    grpc_shutdown.clone(),
                    "grpc",
                );
                router
                    .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled_owned())
                    .await
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    let geo_task = state
        .geo
        .clone()
        .map(|geo| tokio::spawn(geo.run(state.monitor.clone(), shutdown.clone())));
    let dns_task = match (
        listeners.dns,
        state.geo.clone().and_then(crate::geo::dns::router),
    ) {
        (Some(listener), Some(app)) => {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(dns = %addr, "PowerDNS remote backend serving at /dns");
            }
            // pdns's queries: GETs, or small POSTs in its `post` mode; no token.
            let gate: crate::http_front::Gate = Arc::new(|head: &crate::http_head::Head, _| {
                Ok(if matches!(head.method.as_str(), "GET" | "HEAD") {
                    0
                } else {
                    64 * 1024
                })
            });
            Some(tokio::spawn(crate::http_front::serve(
                listener,
                app,
                gate,
                config.api.front_limits(),
                shutdown.clone(),
                "dns",
            )))
        }
        _ => None,
    };
    tokio::spawn(reload_on_sighup(
        state.geo.clone(),
        state.tls.clone(),
        tokens.clone(),
        shutdown.clone(),
    ));
    let audit_task = tokio::spawn(state.audit.clone().run(shutdown.clone()));

    let api_state = ApiState {
        state: state.clone(),
        read_requires_token: config.api.read_requires_token,
        tokens,
    };
    let app = api::router(api_state.clone());
    // The token and the body limit are decided from the head, before any body is read.
    let gate: crate::http_front::Gate = Arc::new(move |head: &crate::http_head::Head, peer| {
        api::admit(&api_state, head, peer).map_err(Box::new)
    });
    let api_task = tokio::spawn(crate::http_front::serve(
        listeners.api,
        app,
        gate,
        config.api.front_limits(),
        shutdown.clone(),
        "api",
    ));

    shutdown.cancelled().await;
    tracing::info!("shutting down");
    let all = async {
        let _ = tokio::join!(
            purge_task,
            grpc_task,
            api_task,
            driver,
            cluster_task,
            monitor_task,
            warm_task,
            handoff_task,
            audit_task,
            async {
                if let Some(t) = geo_task {
                    let _ = t.await;
                }
            },
            async {
                if let Some(t) = dns_task {
                    let _ = t.await;
                }
            }
        );
    };
    if tokio::time::timeout(GRACE, all).await.is_err() {
        tracing::warn!("grace period over; abandoning in-flight work");
    }
    Ok(())
}

/// On every SIGHUP: reload the TLS files, the API token (rotation without a restart) and
/// the GeoIP database. A reload that fails keeps what was loaded before.
async fn reload_on_sighup(
    geo: Option<Arc<crate::geo::Geo>>,
    tls: Option<Arc<ServerTls>>,
    tokens: crate::tokens::Tokens,
    shutdown: CancellationToken,
) {
    daemon::signal::on_hangup(shutdown, move || {
        if let Some(geo) = geo.clone() {
            // Reading a large database is blocking work: off the runtime's threads.
            tokio::task::spawn_blocking(move || match geo.reload() {
                Ok(_) => {
                    let info = geo.database();
                    tracing::info!(path = %info.path, database_type = %info.database_type,
                        build_epoch = info.build_epoch, "GeoIP database reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "GeoIP reload failed; keeping the previous database")
                }
            });
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
        let (reloaded, failed) = tokens.reload();
        if !reloaded.is_empty() {
            let names: Vec<&str> = reloaded.iter().map(|n| &**n).collect();
            tracing::info!(tokens = %names.join(","), failed = failed.len(), "API tokens reloaded");
        }
        for e in failed {
            tracing::error!(error = %e, "API token reload failed; keeping its previous secret")
        }
    })
    .await
}
