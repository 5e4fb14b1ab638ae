//! The agent's side of the session: dial, say Hello, apply what comes down, ack.
//!
//! [`run`] loops forever: connect to the coordinator, send Hello with the cursor from
//! disk, then apply purge batches in order. Each batch is coalesced ([`plan`]), applied
//! to varnish (a transient failure is retried until it works: an unapplied purge is never
//! acked; an op varnish refuses for good becomes a full ban of this edge, so one bad entry
//! never stalls the ones behind it), the cursor is stored durably, and only then the ack
//! goes up. A heartbeat task reports every `report_interval_s` whatever the purge loop is
//! doing, so only a frozen or cut-off agent looks silent. A dropped session is redialled
//! with exponential backoff and full jitter (reset after a session that stayed up); the
//! coordinator resumes from the cursor, so a purge can be applied twice after a crash
//! (harmless) but never skipped. Config bundles arriving on the same stream are handed to
//! the [`crate::vcl`] worker.
//!
//! Two refusals change the redial ([`proto::Refusal`]): `handoff` (the coordinator cannot
//! reach its store and gives its agents to the others) moves on to the next coordinator
//! of the list at once, said in one info line; `duplicate_edge_id` (another agent
//! process holds a live session for this id: a copied config) is retried once after
//! [`duplicate_first_retry`] (three report intervals: long enough for a half-open session
//! of this very agent, left by a kill -9 or a reboot, to count as dead) and then every
//! [`DUPLICATE_BACKOFF`] (with jitter) for as long as it lasts, logged as one error (the
//! first quick retry a warning, later ones at debug) and an info line once it gets in.
//! A third, `protocol_version` (this agent's protocol version is outside the
//! coordinator's window), and a `Welcome` whose protocol version is outside this agent's
//! own window ([`proto::version::check`]: this agent ends the session) are one thing to
//! the operator: one of the two must be upgraded. Logged as one error naming both
//! versions, then redialled every [`VERSION_BACKOFF`] (jittered; debug lines meanwhile),
//! moving on through the coordinator list, with an info line once a session is accepted.
//! Each Hello carries this process's random instance id ([`new_instance`], drawn once
//! at start) and its dial count, which is how the coordinators tell this process's own
//! sessions (a reconnect, a move to another coordinator) from another agent's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::edge::{
    agent_message, coordinator_message, AgentMessage, CoordinatorMessage, FullBan, Heartbeat,
    Hello, PurgeAck, PurgeEntry, PurgeError,
};
use proto::CoordinatorClient;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::config::AgentConfig;
use crate::cursor::{Cursor, CursorFile};
use crate::plan::{plan, VarnishOp};
use crate::varnish::Varnish;

/// A session that stayed up this long was healthy: the next redial starts the backoff
/// over instead of waiting as after many failures in a row.
const STABLE_SESSION: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Redial pace while another agent holds this edge id (after the first quick retry):
/// 20 s, jittered by a quarter either way. Longer than any normal reconnect (at most
/// [`BACKOFF_MAX`]), short enough to get in soon after the other one goes away.
pub const DUPLICATE_BACKOFF: Duration = Duration::from_secs(20);
/// Redial pace while the coordinators refuse this agent's protocol version (or it
/// refuses theirs): 15 s, jittered by a quarter either way. Nothing changes until one
/// side is upgraded, so no tight loop; short enough to get in soon after.
pub const VERSION_BACKOFF: Duration = Duration::from_secs(15);
/// Largest message accepted from the coordinator (a config bundle is at most 2 MiB).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Most entries merged into one apply while catching up.
const COALESCE_MAX_ENTRIES: usize = 20_000;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("cannot use state_dir: {0}")]
    State(std::io::Error),
}

/// Why one session ended (the loop redials after any of these).
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("cannot connect to the coordinator: {}", crate::why::describe(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("session refused or broken: {}", status_words(.0))]
    Status(#[from] tonic::Status),
    #[error("coordinator closed the session")]
    Closed,
    #[error("cursor could not be stored: {0}")]
    Cursor(std::io::Error),
    #[error("{0}")]
    Protocol(String),
    /// The Welcome's protocol version is outside this agent's window (the message names
    /// both).
    #[error("{0}")]
    Version(String),
    #[error("shutting down")]
    Shutdown,
}

/// A status's message, or for a transport failure under it, its cause in words.
fn status_words(status: &tonic::Status) -> String {
    match std::error::Error::source(status) {
        Some(cause) => format!("{}: {}", status.message(), crate::why::describe(cause)),
        None => format!("{:?}: {}", status.code(), status.message()),
    }
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(
    config: AgentConfig,
    insecure: bool,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let https = config.coordinator.https();
    match (https, &config.tls) {
        (true, None) => {
            return Err(AgentError::Config(
                "an https:// coordinator needs a [tls] table (ca, cert, key)".into(),
            ))
        }
        (false, Some(_)) => {
            return Err(AgentError::Config(
                "[tls] is set but the coordinator URL is http://; use https://".into(),
            ))
        }
        (false, None) if !insecure => {
            return Err(AgentError::Config(
                "a plaintext (http://) coordinator needs --insecure".into(),
            ))
        }
        (false, None) => {
            tracing::warn!("plaintext gRPC (--insecure): the coordinator is not authenticated")
        }
        (true, Some(tls)) => {
            // Fail at start on unreadable files; they are read again at every dial, so a
            // rotated certificate is picked up on the next reconnect.
            client_tls(tls).map_err(AgentError::Config)?;
        }
    }
    if let Some(v) = proto::version::from_env().map_err(AgentError::Config)? {
        tracing::warn!(protocol = v, accepts = %proto::version::fmt_window(v),
            "{}={v}: speaking protocol {v} instead of {} (for tests only)",
            proto::version::ENV, proto::version::PROTOCOL_VERSION);
    }
    let cursor_file = CursorFile::open(&config.state_dir).map_err(AgentError::State)?;
    let mut agent = Agent {
        welcomed_at: None,
        version_refusals: 0,
        instance: new_instance(),
        dials: 0,
        applied: Arc::new(AtomicU64::new(0)),
        synthetic: crate::synthetic::Synthetic::new(),
        served: crate::served::Served::new(),
        cursor: cursor_file.load(),
        cursor_file,
        varnish: Varnish::new(config.varnish.clone()),
        config,
    };
    tracing::info!(edge = %agent.config.id, region = %agent.config.region,
        applied_seq = agent.cursor.applied_seq, "edge agent starting");
    let mut failures: u32 = 0;
    // Several coordinators: start at a random one (spreads a fleet's reconnects) and move
    // to the next after every failure; the cursor and log id resume wherever it lands.
    let urls = agent.config.coordinator.urls().to_vec();
    let mut next = rand::thread_rng().gen_range(0..urls.len().max(1));
    // Refusals in a row because another agent holds this edge id.
    let mut duplicate: u32 = 0;
    let interval = Duration::from_secs(agent.config.report_interval_s);
    loop {
        agent.welcomed_at = None;
        let url = urls[next % urls.len().max(1)].clone();
        next = next.wrapping_add(1);
        let result = agent.session(&url, &shutdown).await;
        if agent.welcomed_at.is_some() && duplicate > 0 {
            tracing::info!(coordinator = %url, refusals = duplicate,
                "session accepted: no other agent holds this edge id any more");
            duplicate = 0;
        }
        let refusal = match &result {
            Err(SessionEnd::Status(s)) => proto::Refusal::of(s),
            _ => None,
        };
        match (&result, refusal) {
            (Err(SessionEnd::Shutdown), _) => return Ok(()),
            (Err(SessionEnd::Status(s)), Some(proto::Refusal::DuplicateEdgeId)) => {
                duplicate = duplicate.saturating_add(1);
                let delay = match duplicate {
                    1 => duplicate_first_retry(interval),
                    _ => jittered(DUPLICATE_BACKOFF),
                };
                match duplicate {
                    1 => {
                        tracing::warn!(coordinator = %url, reason = %s.message(), retry_s = delay.as_secs_f64(),
                        "session refused: another agent holds this edge id; retrying once soon in case it is this agent's own session left half-open")
                    }
                    2 => {
                        tracing::error!(coordinator = %url, reason = %s.message(), retry_every_s = DUPLICATE_BACKOFF.as_secs(),
                        "session refused again: another agent holds this edge id (a copied config? each agent needs its own id); retrying slowly until it goes away")
                    }
                    _ => {
                        tracing::debug!(coordinator = %url, refusals = duplicate, "still refused: another agent holds this edge id")
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
            (Err(SessionEnd::Status(_)), Some(proto::Refusal::ProtocolVersion))
            | (Err(SessionEnd::Version(_)), _) => {
                let reason = match &result {
                    Err(SessionEnd::Status(s)) => s.message().to_owned(),
                    Err(e) => e.to_string(),
                    Ok(()) => String::new(),
                };
                agent.version_refusals = agent.version_refusals.saturating_add(1);
                let delay = jittered(VERSION_BACKOFF);
                if agent.version_refusals == 1 {
                    tracing::error!(coordinator = %url, protocol = proto::version::own(),
                        accepts = %proto::version::fmt_window(proto::version::own()),
                        reason = %reason, retry_every_s = VERSION_BACKOFF.as_secs(),
                        "session refused: this agent and the coordinator speak protocol versions too far apart; retrying slowly until one of them is upgraded");
                } else {
                    tracing::debug!(coordinator = %url, refusals = agent.version_refusals, reason = %reason,
                        "still refused for the protocol version");
                }
                duplicate = 0;
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                continue;
            }
            (Err(SessionEnd::Status(s)), Some(proto::Refusal::Handoff)) => {
                tracing::info!(coordinator = %url, reason = %s.message(), next = %urls[next % urls.len().max(1)],
                    "coordinator hands its agents to another one; dialling the next");
                duplicate = 0;
            }
            (Ok(()), _) => {}
            (Err(e), _) => {
                tracing::warn!(error = %e, coordinator = %url, "session ended");
            }
        }
        failures = failures_after(failures, agent.welcomed_at.map(|t| t.elapsed()));
        // The backoff grows per round through the list, so a dead coordinator costs a
        // quick hop to the next one, not a long wait.
        let rounds = failures.div_ceil(urls.len().max(1) as u32);
        let delay = backoff(rounds);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The client side of mutual TLS, read fresh from the files.
fn client_tls(tls: &crate::config::TlsConfig) -> Result<ClientTlsConfig, String> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?)))
}

/// The failure count after a session that ended having stayed up `up` since its Welcome
/// (`None`: never established): a healthy session starts the count over, so an agent
/// that lost a few sessions over the days does not redial at the slowest pace forever.
fn failures_after(failures: u32, up: Option<Duration>) -> u32 {
    if up.is_some_and(|d| d >= STABLE_SESSION) {
        1
    } else {
        failures.saturating_add(1)
    }
}

/// The first retry after a `duplicate_edge_id` refusal: three report intervals, at least
/// 3 s, so that a half-open session this agent left behind (silent since) has missed
/// the two heartbeats after which the coordinator lets a new one replace it.
pub fn duplicate_first_retry(report_interval: Duration) -> Duration {
    (report_interval * 3).max(Duration::from_secs(3))
}

/// A random id for this agent process (16 random bytes, hex), drawn once at start: the
/// coordinators tell this process's own sessions (a reconnect, a move) from another
/// agent's with the same edge id (a copied config), whatever the addresses.
fn new_instance() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// `d`, jittered by a quarter either way.
fn jittered(d: Duration) -> Duration {
    rand::thread_rng().gen_range(d.mul_f64(0.75)..=d.mul_f64(1.25))
}

/// Full-jitter exponential backoff.
fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_MAX);
    rand::thread_rng().gen_range(Duration::ZERO..=cap)
}

struct Agent {
    /// When the current session's Welcome arrived.
    welcomed_at: Option<Instant>,
    /// Sessions in a row refused for the protocol version (by either side).
    version_refusals: u32,
    /// This process's instance id, sent in every Hello ([`new_instance`]).
    instance: String,
    /// Sessions dialled so far (the Hello's `dial`).
    dials: u64,
    /// The cursor's sequence, for the heartbeat task.
    applied: Arc<AtomicU64>,
    /// The agent's own requests through varnish, subtracted from the hit ratio.
    synthetic: crate::synthetic::Synthetic,
    /// Shoppers' requests from varnishncsa, reported with every stats sample.
    served: crate::served::Served,
    config: AgentConfig,
    cursor_file: CursorFile,
    cursor: Cursor,
    varnish: Varnish,
}

type Outbound = mpsc::Sender<AgentMessage>;

impl Agent {
    /// One connected session; `Ok(())` means it was established and later ended cleanly.
    async fn session(&mut self, url: &str, shutdown: &CancellationToken) -> Result<(), SessionEnd> {
        tracing::debug!(coordinator = url, "dialling");
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| SessionEnd::Protocol(format!("bad coordinator URL: {e}")))?;
        if let Some(tls) = &self.config.tls {
            endpoint = endpoint
                .tls_config(client_tls(tls).map_err(SessionEnd::Protocol)?)
                .map_err(SessionEnd::Connect)?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let channel = tokio::select! {
            _ = shutdown.cancelled() => return Err(SessionEnd::Shutdown),
            c = endpoint.connect() => c?,
        };
        let varnish_version = match self.varnish.version().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "varnish admin not reachable yet");
                String::new()
            }
        };
        let (out, out_rx) = mpsc::channel(64);
        self.dials += 1;
        let hello = Hello {
            instance: self.instance.clone(),
            dial: self.dials,
            protocol_version: proto::version::own(),
            edge_id: self.config.id.clone(),
            region: self.config.region.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            log_id: self.cursor.log_id.clone(),
            applied_seq: self.cursor.applied_seq,
            varnish_version,
            purge_mode: self.config.varnish.purge_mode.as_str().to_owned(),
            report_interval_ms: u32::try_from(self.config.report_interval_s * 1000)
                .unwrap_or(u32::MAX),
            coordinators: {
                let mut urls = self.config.coordinator.urls().to_vec();
                urls.sort();
                urls.dedup();
                u32::try_from(urls.len()).unwrap_or(u32::MAX)
            },
            capabilities: vec![
                proto::CAP_FULL_BAN.to_owned(),
                proto::CAP_SOFT_PURGE.to_owned(),
                proto::CAP_CONFIG.to_owned(),
                proto::CAP_PROBES.to_owned(),
                proto::CAP_WARM.to_owned(),
                proto::CAP_PURGE_RANGES.to_owned(),
            ],
        };
        send(&out, agent_message::Msg::Hello(hello)).await?;
        let mut client =
            CoordinatorClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut inbound = tokio::select! {
            _ = shutdown.cancelled() => return Err(SessionEnd::Shutdown),
            r = client.session(ReceiverStream::new(out_rx)) => r?.into_inner(),
        };

        // Read the stream in its own task so batches queue up while we apply: whatever
        // queued is coalesced into the next apply.
        let (in_tx, mut in_rx) = mpsc::channel::<Result<CoordinatorMessage, tonic::Status>>(64);
        let reader = tokio::spawn(async move {
            loop {
                let item = match inbound.message().await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => break,
                    Err(s) => Err(s),
                };
                let stop = item.is_err();
                if in_tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        let _abort_reader = AbortOnDrop(reader);

        // Config bundles are applied by their own task (its own admin connection), so a
        // VCL compile never holds up a purge.
        let (config_tx, config_rx) = mpsc::channel(4);
        let worker = tokio::spawn({
            let varnish = self.config.varnish.clone();
            let state_dir = self.config.state_dir.clone();
            let out = out.clone();
            let every = Duration::from_secs(self.config.report_interval_s);
            let synthetic = self.synthetic.clone();
            async move { crate::vcl::run(varnish, &state_dir, config_rx, out, every, synthetic).await }
        });
        let _abort_worker = AbortOnDrop(worker);
        let stats = tokio::spawn(crate::stats::run(
            self.config.varnish.instance.clone(),
            Duration::from_secs(self.config.stats_interval_s),
            self.synthetic.clone(),
            self.served.clone(),
            self.applied.clone(),
            out.clone(),
        ));
        // Heartbeats run beside the purge loop, so a long apply (a backlog, a varnishd
        // restarting) never looks like a silent agent.
        self.applied
            .store(self.cursor.applied_seq, Ordering::Relaxed);
        let heartbeat = tokio::spawn({
            let (out, applied) = (out.clone(), self.applied.clone());
            let every = Duration::from_secs(self.config.report_interval_s);
            async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let beat = Heartbeat {
                        applied_seq: applied.load(Ordering::Relaxed),
                    };
                    if send(&out, agent_message::Msg::Heartbeat(beat))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        let _abort_heartbeat = AbortOnDrop(heartbeat);
        let _abort_stats = AbortOnDrop(stats);
        // Warm shards run beside purges, never in front of them.
        let (warm_tx, warm_rx) = mpsc::channel(64);
        let warm = tokio::spawn(crate::warm::run(
            self.config.varnish.http,
            warm_rx,
            self.synthetic.clone(),
            out.clone(),
        ));
        let _abort_warm = AbortOnDrop(warm);
        // varnish's own log: shoppers' served times always, popular URLs when asked.
        let _abort_log = AbortOnDrop(tokio::spawn(crate::top::run(
            "varnishncsa".into(),
            self.config.varnish.instance.clone(),
            crate::top::Reports {
                top_urls: self.config.top_urls,
                top_every: Duration::from_secs(self.config.top_urls_interval_s),
                client_nets: self.config.client_nets,
                clients_every: Duration::from_secs(self.config.client_nets_interval_s),
            },
            self.served.clone(),
            self.synthetic.clone(),
            out.clone(),
        )));
        // Synthetic probes: restarted whenever a new plan arrives.
        let mut _probes: Option<AbortOnDrop> = None;

        let mut log_id = String::new();
        // A message taken off the channel while coalescing but not part of the batch.
        let mut pending = None;
        let window = Duration::from_millis(self.config.purge_window_ms);
        // The earliest start of the next apply: the first purge slot after the last one.
        let mut next_slot: Option<tokio::time::Instant> = None;
        loop {
            let msg = match pending.take() {
                Some(m) => Some(m),
                None => tokio::select! {
                    _ = shutdown.cancelled() => return Err(SessionEnd::Shutdown),
                    m = in_rx.recv() => m,
                },
            };
            let msg = match msg {
                None => return Err(SessionEnd::Closed),
                Some(Err(status)) => return Err(status.into()),
                Some(Ok(CoordinatorMessage { msg: None })) => continue, // unknown kind: ignore
                Some(Ok(CoordinatorMessage { msg: Some(m) })) => m,
            };
            match msg {
                coordinator_message::Msg::Welcome(w) => {
                    if let Err(m) = proto::version::check(proto::version::own(), w.protocol_version)
                    {
                        return Err(SessionEnd::Version(format!(
                            "the coordinator's Welcome is outside this agent's window: {}",
                            m.explain("agent")
                        )));
                    }
                    tracing::info!(coordinator = url, log_id = %w.log_id, head_seq = w.head_seq, applied_seq = self.cursor.applied_seq, "session established");
                    log_id = w.log_id;
                    self.welcomed_at = Some(Instant::now());
                    if self.version_refusals > 0 {
                        tracing::info!(
                            coordinator = url,
                            refusals = self.version_refusals,
                            protocol = proto::version::own(),
                            coordinator_protocol = proto::version::of_wire(w.protocol_version),
                            "session accepted: the protocol versions work together now"
                        );
                        self.version_refusals = 0;
                    }
                }
                coordinator_message::Msg::FullBan(fb) => self.full_ban(fb, &out, shutdown).await?,
                coordinator_message::Msg::ProbePlan(plan) => {
                    tracing::info!(checks = plan.checks.len(), origin = %plan.origin, "probe plan received");
                    _probes = Some(AbortOnDrop(tokio::spawn(crate::probe::run(
                        plan,
                        self.config.varnish.http,
                        self.synthetic.clone(),
                        out.clone(),
                    ))));
                }
                coordinator_message::Msg::ApplyConfig(apply) => {
                    tracing::info!(version = %apply.version, files = apply.files.len(), "config bundle received");
                    if config_tx.try_send(apply).is_err() {
                        tracing::warn!("config worker busy; the coordinator will resend");
                    }
                }
                coordinator_message::Msg::WarmShard(shard) => {
                    forward_warm(&warm_tx, crate::warm::Command::Shard(shard));
                }
                coordinator_message::Msg::WarmRate(r) => {
                    forward_warm(
                        &warm_tx,
                        crate::warm::Command::Rate {
                            job_id: r.job_id,
                            rate: r.rate,
                        },
                    );
                }
                coordinator_message::Msg::WarmCancel(c) => {
                    forward_warm(&warm_tx, crate::warm::Command::Cancel { job_id: c.job_id });
                }
                coordinator_message::Msg::Purges(batch) => {
                    let mut entries = batch.entries;
                    // Coalesce whatever else already arrived, and, until the next purge
                    // slot opens, whatever arrives meanwhile: a storm becomes one apply
                    // (one ban) per slot, a lone purge goes at once. Yielding lets the
                    // reader move more of a backlog out of the HTTP/2 buffers into the
                    // channel.
                    let window_ends = next_slot;
                    'drain: while entries.len() < COALESCE_MAX_ENTRIES {
                        while let Ok(next) = in_rx.try_recv() {
                            match next {
                                Ok(CoordinatorMessage {
                                    msg: Some(coordinator_message::Msg::Purges(b)),
                                }) => entries.extend(b.entries),
                                other => {
                                    pending = Some(other);
                                    break 'drain;
                                }
                            }
                        }
                        tokio::task::yield_now().await;
                        if !in_rx.is_empty() {
                            continue;
                        }
                        let Some(ends) = window_ends.filter(|e| *e > tokio::time::Instant::now())
                        else {
                            break;
                        };
                        // Wait for more until the window closes.
                        match tokio::time::timeout_at(ends, in_rx.recv()).await {
                            Err(_) => break,
                            Ok(None) => return Err(SessionEnd::Closed),
                            Ok(Some(Ok(CoordinatorMessage {
                                msg: Some(coordinator_message::Msg::Purges(b)),
                            }))) => entries.extend(b.entries),
                            Ok(Some(other)) => {
                                pending = Some(other);
                                break;
                            }
                        }
                    }
                    let started = tokio::time::Instant::now();
                    let slot = slot_start(started, wall_clock(), window);
                    let ops = self.apply_entries(entries, &log_id, &out, shutdown).await?;
                    // An apply of k operations (a window's tags beyond one expression's
                    // bound) takes k slots: at most one ban per slot on average, however
                    // large the storm.
                    let slots = u32::try_from(ops.max(1)).unwrap_or(u32::MAX);
                    next_slot = Some(slot + window.saturating_mul(slots));
                }
            }
        }
    }

    async fn apply_entries(
        &mut self,
        entries: Vec<PurgeEntry>,
        log_id: &str,
        out: &Outbound,
        shutdown: &CancellationToken,
    ) -> Result<usize, SessionEnd> {
        if log_id.is_empty() {
            return Err(SessionEnd::Protocol("purges before Welcome".into()));
        }
        let applied = if self.cursor.log_id == log_id {
            self.cursor.applied_seq
        } else {
            0
        };
        let fresh: Vec<PurgeEntry> = entries.into_iter().filter(|e| e.seq > applied).collect();
        let Some(last) = fresh.last().map(|e| e.seq) else {
            return Ok(0);
        };
        // An entry may stand for a range of purges (`first_seq`); one that overlaps what
        // is applied repeats tag purges, which is harmless.
        let first = fresh[0].first();
        if applied != 0 && first > applied + 1 {
            return Err(SessionEnd::Protocol(format!(
                "gap in purge stream: applied {applied}, got {first}"
            )));
        }
        let ops = plan(
            &fresh,
            self.config.varnish.purge_mode,
            self.config.varnish.max_ban_bytes,
        );
        tracing::debug!(
            first,
            last,
            entries = fresh.len(),
            ops = ops.len(),
            "applying purges"
        );
        self.apply_ops(&ops, first, last, out, shutdown).await?;
        self.commit(
            Cursor {
                log_id: log_id.to_owned(),
                applied_seq: last,
            },
            out,
        )
        .await?;
        Ok(ops.len())
    }

    /// Bans everything, then counts the log as applied up to `fb.up_to_seq`.
    async fn full_ban(
        &mut self,
        fb: FullBan,
        out: &Outbound,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        tracing::warn!(up_to_seq = fb.up_to_seq, reason = %fb.reason, "coordinator asked for a full ban");
        self.apply_ops(
            &[VarnishOp::BanAll],
            fb.up_to_seq,
            fb.up_to_seq,
            out,
            shutdown,
        )
        .await?;
        let cursor = Cursor {
            log_id: fb.log_id,
            applied_seq: fb.up_to_seq,
        };
        self.commit(cursor, out).await
    }

    /// Applies every op of the entries `first_seq..=last_seq`. A transient failure (the
    /// admin connection lost, varnishd restarting, a wrong secret) is retried with backoff
    /// until it works, reported upstream. An op varnish refuses for good (a regex it
    /// cannot compile) would stall every later purge: it is replaced by a full ban of this
    /// edge, which keeps the promise made to Magento (nothing stale survives), reported
    /// with `full_ban` before the ack.
    async fn apply_ops(
        &mut self,
        ops: &[VarnishOp],
        first_seq: u64,
        last_seq: u64,
        out: &Outbound,
        shutdown: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let mut ops = ops.to_vec();
        let mut i = 0;
        let mut attempt = 0u32;
        while let Some(op) = ops.get(i) {
            match self.varnish.apply(op).await {
                Ok(()) => {
                    i += 1;
                    attempt = 0;
                }
                Err(e)
                    if e.is_permanent()
                        && matches!(op, VarnishOp::BanTagList(t) if t.len() > 1) =>
                {
                    // Our own alternation, too large for this varnishd's PCRE2: two halves.
                    let VarnishOp::BanTagList(mut tags) = ops.remove(i) else {
                        continue;
                    };
                    tracing::warn!(error = %e, tags = tags.len(), "varnish refused a ban of many tags; splitting it");
                    let second = tags.split_off(tags.len() / 2);
                    ops.insert(i, VarnishOp::BanTagList(second));
                    ops.insert(i, VarnishOp::BanTagList(tags));
                }
                Err(e) if e.is_permanent() && *op != VarnishOp::BanAll => {
                    tracing::error!(error = %e, first_seq, last_seq,
                        "varnish refused purges for good; banning everything on this edge instead");
                    send(
                        out,
                        agent_message::Msg::PurgeError(PurgeError {
                            seq: first_seq,
                            error: e.to_string(),
                            last_seq,
                            full_ban: true,
                        }),
                    )
                    .await?;
                    // A full ban subsumes this op and every other one of the batch.
                    ops = vec![VarnishOp::BanAll];
                    i = 0;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, seq = first_seq, "purge not applied; retrying");
                    if attempt == 1 || attempt.is_multiple_of(10) {
                        let _ = out.try_send(AgentMessage {
                            msg: Some(agent_message::Msg::PurgeError(PurgeError {
                                seq: first_seq,
                                error: e.to_string(),
                                last_seq,
                                full_ban: false,
                            })),
                        });
                    }
                    let delay = (BACKOFF_BASE * attempt.min(50)).min(RETRY_MAX);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(SessionEnd::Shutdown),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// Stores the cursor durably, then acks it.
    async fn commit(&mut self, cursor: Cursor, out: &Outbound) -> Result<(), SessionEnd> {
        self.cursor_file
            .store(&cursor)
            .map_err(SessionEnd::Cursor)?;
        let ack = PurgeAck {
            applied_seq: cursor.applied_seq,
            log_id: cursor.log_id.clone(),
        };
        self.applied.store(cursor.applied_seq, Ordering::Relaxed);
        self.cursor = cursor;
        send(out, agent_message::Msg::Ack(ack)).await
    }
}

/// Time since the Unix epoch on this host's clock (zero if it is set before 1970).
fn wall_clock() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// The start of the purge slot holding `now`, whose wall-clock time is `since_epoch`.
///
/// Slots are `window` long and aligned on the wall clock, not on this agent's last apply:
/// every agent of a fleet (on NTP time) applies a storm's purges at the same instants, so
/// "applied everywhere" waits for one slot, not for the latest of many, and a lone purge
/// applied mid-slot holds the next apply only until the slot ends, not a whole window.
/// A slot is taken to start an eighth of a window early, so a timer that fires on a
/// boundary while the wall clock reads a few microseconds short of it (the two clocks
/// drift) still counts in the new slot. At most one apply starts in each slot, so
/// `1000/purge_window_ms` per second stays the bound (two starts may be closer than a
/// window: one late in a slot, the next early in the following one). A wall clock that
/// steps only moves the phase: the result is never more than an eighth of a window after
/// `now`, nor more than a window before it.
fn slot_start(
    now: tokio::time::Instant,
    since_epoch: Duration,
    window: Duration,
) -> tokio::time::Instant {
    let window_us = window.as_micros();
    if window_us == 0 {
        return now;
    }
    let early = window_us / 8;
    let into_slot = (since_epoch.as_micros() + early) % window_us;
    let micros = |us: u128| Duration::from_micros(u64::try_from(us).unwrap_or(0));
    (now + micros(early))
        .checked_sub(micros(into_slot))
        .unwrap_or(now)
}

async fn send(out: &Outbound, msg: agent_message::Msg) -> Result<(), SessionEnd> {
    out.send(AgentMessage { msg: Some(msg) })
        .await
        .map_err(|_| SessionEnd::Closed)
}

/// Hands a warm command to the worker without ever blocking purges; a shard dropped
/// here is handed out again after the session ends.
fn forward_warm(tx: &mpsc::Sender<crate::warm::Command>, cmd: crate::warm::Command) {
    if tx.try_send(cmd).is_err() {
        tracing::warn!("warm worker is behind; a shard is left for the coordinator to resend");
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_slots_follow_the_wall_clock() {
        let now = tokio::time::Instant::now();
        let w = Duration::from_millis(20);
        let at = |ms: u64, us: u64| Duration::from_millis(ms) + Duration::from_micros(us);
        // 1,000,007 ms into the epoch: 7 ms into a slot.
        assert_eq!(slot_start(now, at(1_000_007, 0), w), now - at(7, 0));
        // On a boundary, and a little short of one: the new slot.
        assert_eq!(slot_start(now, at(1_000_000, 0), w), now);
        assert_eq!(slot_start(now, at(999_999, 990), w), now + at(0, 10));
        // 2.5 ms (an eighth) short of a boundary is already the next slot; 2.6 is not.
        assert_eq!(slot_start(now, at(999_997, 500), w), now + at(2, 500));
        assert_eq!(slot_start(now, at(999_997, 400), w), now - at(17, 400));
        // Every agent's slot ends at the same wall-clock instant, whatever its phase.
        for into in [0, 3, 11, 17] {
            let wall = at(2_000_000 + into, 0);
            let end = slot_start(now, wall, w) + w;
            assert_eq!(end - now, at(20 - into, 0), "{into} ms into the slot");
        }
        // No window: no slots.
        assert_eq!(slot_start(now, at(1_000_007, 0), Duration::ZERO), now);
    }

    #[test]
    fn a_refused_duplicate_retries_once_after_two_missed_heartbeats_then_slowly() {
        // The coordinator replaces a session silent for two intervals: retry after three.
        assert_eq!(
            duplicate_first_retry(Duration::from_secs(1)),
            Duration::from_secs(3)
        );
        assert_eq!(
            duplicate_first_retry(Duration::from_secs(5)),
            Duration::from_secs(15)
        );
        for _ in 0..100 {
            let d = jittered(DUPLICATE_BACKOFF);
            assert!(
                d >= Duration::from_secs(15) && d <= Duration::from_secs(25),
                "{d:?}"
            );
            assert!(d > BACKOFF_MAX, "slower than any normal reconnect");
        }
    }

    #[test]
    fn a_protocol_refusal_redials_slowly() {
        for _ in 0..100 {
            let d = jittered(VERSION_BACKOFF);
            assert!(
                d >= Duration::from_millis(11_250) && d <= Duration::from_millis(18_750),
                "{d:?}"
            );
            assert!(d > BACKOFF_MAX, "slower than any normal reconnect");
        }
    }

    #[test]
    fn each_process_draws_its_own_instance_id() {
        let (a, b) = (new_instance(), new_instance());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b, "two processes, two ids");
    }

    #[test]
    fn a_healthy_session_resets_the_backoff() {
        let mut failures = 0;
        for _ in 0..7 {
            failures = failures_after(failures, None);
        }
        assert_eq!(failures, 7);
        assert!(BACKOFF_BASE.saturating_mul(1 << failures).min(BACKOFF_MAX) == BACKOFF_MAX);
        // A short session is not proof of health; one that stayed up is.
        assert_eq!(failures_after(failures, Some(Duration::from_secs(2))), 8);
        let after = failures_after(failures, Some(STABLE_SESSION));
        assert_eq!(after, 1);
        for _ in 0..100 {
            assert!(backoff(after) <= BACKOFF_BASE * 2);
        }
    }
}
