//! Fan-out: one gRPC session per edge agent, streaming the purge log down and acks up.
//!
//! An agent opens `Session` and says Hello with its cursor (`log_id`, `applied_seq`).
//! [`FanoutService`] decides where it resumes ([`resume_point`]): right after its cursor
//! when the log still holds everything after it, or with a [`FullBan`] when it does not
//! (cursor older than retention, a different log, a brand-new edge whose cache may hold
//! anything). Then two tasks run per session:
//!
//! * the *sender* waits on the log's head and sends every entry after the cursor, in
//!   batches, into a small bounded channel: a slow agent fills it, the sender waits, and
//!   by the time there is room the next batch is bigger, so the agent coalesces more;
//! * the *receiver* reads acks, errors and heartbeats and updates the [`EdgeRegistry`];
//!   it refuses an ack beyond the log head, and ends the session when the agent has been
//!   silent for three of its report intervals ([`silence_limit`]): a frozen or
//!   partitioned agent is lost in seconds, not when the transport's keepalive gives up;
//!   config reports go to [`Rollouts`];
//! * for agents with the config capability, the *config sender* sends whatever
//!   [`Rollouts::next_apply`] hands it, waking on every rollout change;
//! * for agents with the warm capability, the *warm sender* sends what
//!   [`crate::warm::Warm::next_for`] hands it (shards, rate changes, cancels).
//!
//! The purge listener never waits on an edge: it only appends to the log.

pub mod edges;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::edge::AgentMessage;
use proto::edge::{
    agent_message, coordinator_message, CoordinatorMessage, FullBan, PurgeBatch, Welcome,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::purge::log::PurgeLog;
use crate::rollout::Rollouts;
use crate::traffic::Traffic;
use edges::{EdgeHello, EdgeRegistry, SessionHandle};

/// Entries per batch message.
const BATCH_ENTRIES: usize = 2048;
/// Batches in flight towards one agent before the sender waits.
const OUTBOUND_DEPTH: usize = 2;
/// Shortest time between two warm lookups of one session.
const WARM_LOOK_INTERVAL: Duration = Duration::from_millis(20);
/// Time an agent has to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a session starts.
#[derive(Debug, PartialEq, Eq)]
pub enum ResumePoint {
    /// Send entries from this sequence on.
    From(u64),
    /// Ban everything, count as applied up to `head`, then send from `head + 1`.
    FullBan { head: u64, reason: &'static str },
}

/// Decides how an agent with cursor (`log_id`, `applied`) resumes against the log.
pub fn resume_point(
    log_id: &str,
    first: u64,
    head: u64,
    cursor_log: &str,
    applied: u64,
) -> ResumePoint {
    if cursor_log.is_empty() && applied == 0 {
        return ResumePoint::FullBan {
            head,
            reason: "new edge: its cache may hold pages purged before it joined",
        };
    }
    if cursor_log != log_id {
        return ResumePoint::FullBan {
            head,
            reason: "cursor refers to another purge log",
        };
    }
    if applied > head {
        return ResumePoint::FullBan {
            head,
            reason: "cursor is ahead of the log",
        };
    }
    if applied + 1 < first {
        return ResumePoint::FullBan {
            head,
            reason: "cursor is older than the log's retention",
        };
    }
    ResumePoint::From(applied + 1)
}

/// The gRPC service agents connect to.
#[derive(Clone)]
pub struct FanoutService {
    log: PurgeLog,
    edges: Arc<EdgeRegistry>,
    rollouts: Arc<Rollouts>,
    traffic: Arc<Traffic>,
    monitor: Arc<crate::monitor::Monitor>,
    warm: Arc<crate::warm::Warm>,
    /// With mTLS: the Hello must claim the identity in the client certificate.
    require_identity: bool,
    shutdown: CancellationToken,
}

impl FanoutService {
    /// The service over a running coordinator's shared state; with TLS configured, every
    /// Hello must match its client certificate.
    pub fn new(handles: &crate::server::Handles, shutdown: CancellationToken) -> Self {
        FanoutService {
            log: handles.log.clone(),
            edges: handles.edges.clone(),
            rollouts: handles.rollouts.clone(),
            traffic: handles.traffic.clone(),
            monitor: handles.monitor.clone(),
            warm: handles.warm.clone(),
            require_identity: handles.tls.is_some(),
            shutdown,
        }
    }

    /// Checks the Hello against the verified client certificate; returns its expiry.
    #[allow(clippy::result_large_err)]
    fn check_identity(
        &self,
        certs: Option<&[tonic::transport::CertificateDer<'static>]>,
        hello: &proto::edge::Hello,
    ) -> Result<Option<u64>, Status> {
        if !self.require_identity {
            return Ok(None);
        }
        let cert = certs
            .and_then(|c| c.first())
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let (region, id) = crate::tls::peer_identity(cert).map_err(Status::unauthenticated)?;
        if region != hello.region || id != hello.edge_id {
            tracing::warn!(cert_edge = %id, cert_region = %region, claimed_edge = %hello.edge_id,
                claimed_region = %hello.region, "session refused: Hello does not match the certificate");
            return Err(Status::permission_denied(format!(
                "certificate is for edge {id:?} in region {region:?}, Hello claims edge {:?} in region {:?}",
                hello.edge_id, hello.region
            )));
        }
        Ok(crate::tls::not_after(cert))
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl proto::Coordinator for FanoutService {
    type SessionStream = OutStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.remote_addr();
        let certs = request.peer_certs();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(agent_message::Msg::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        validate_id(&hello.edge_id, "edge_id")?;
        validate_id(&hello.region, "region")?;
        let cert_not_after = self.check_identity(certs.as_deref().map(Vec::as_slice), &hello)?;

        let resume = resume_point(
            self.log.log_id(),
            self.log.first(),
            self.log.head(),
            &hello.log_id,
            hello.applied_seq,
        );
        let start_seq = match resume {
            ResumePoint::From(_) => hello.applied_seq,
            ResumePoint::FullBan { .. } => 0,
        };
        let handle = self.edges.connect(
            EdgeHello {
                id: hello.edge_id.clone(),
                region: hello.region.clone(),
                varnish_version: hello.varnish_version.clone(),
                purge_mode: hello.purge_mode.clone(),
                agent_version: hello.agent_version.clone(),
                cert_not_after,
            },
            start_seq,
            &self.shutdown,
        );
        tracing::info!(edge = %hello.edge_id, region = %hello.region, peer = ?peer,
            applied_seq = hello.applied_seq, resume = ?resume, "edge connected");

        let (tx, rx) = mpsc::channel(OUTBOUND_DEPTH);
        let welcome = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Welcome(Welcome {
                log_id: self.log.log_id().to_owned(),
                head_seq: self.log.head(),
                coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
            })),
        };
        tx.send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;
        if self.monitor.enabled() && hello.capabilities.iter().any(|c| c == proto::CAP_PROBES) {
            let plan = CoordinatorMessage {
                msg: Some(coordinator_message::Msg::ProbePlan(self.monitor.plan())),
            };
            tx.send(Ok(plan))
                .await
                .map_err(|_| Status::cancelled("agent went away"))?;
        }

        self.traffic.connect(&hello.edge_id, &hello.region);
        let capable = hello.capabilities.iter().any(|c| c == proto::CAP_CONFIG);
        self.rollouts
            .connect(&hello.edge_id, &hello.region, handle.session, capable);
        let configurer = capable.then(|| {
            tokio::spawn(config_loop(
                self.rollouts.clone(),
                tx.clone(),
                handle.clone(),
            ))
        });
        let warmable = hello.capabilities.iter().any(|c| c == proto::CAP_WARM);
        let warmer = warmable.then(|| {
            self.warm
                .connect(&hello.edge_id, &hello.region, handle.session);
            tokio::spawn(warm_loop(self.warm.clone(), tx.clone(), handle.clone()))
        });
        let silence = silence_limit(hello.report_interval_ms);
        let sender = tokio::spawn(send_loop(self.log.clone(), resume, tx, handle.clone()));
        let service = self.clone();
        let region = hello.region.clone();
        tokio::spawn(async move {
            receive_loop(&service, &region, &handle, silence, inbound).await;
            handle.cancel.cancel();
            let _ = sender.await;
            if let Some(c) = configurer {
                let _ = c.await;
            }
            if let Some(w) = warmer {
                let _ = w.await;
                service.warm.disconnect(&handle.edge_id, handle.session);
            }
            service.edges.disconnect(&handle);
            service.rollouts.disconnect(&handle.edge_id, handle.session);
            tracing::info!(edge = %handle.edge_id, "edge disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// How long an agent may stay silent before it counts as lost: three of its report
/// intervals (it heartbeats every interval), at least 3 s; 30 s for agents that do not
/// say (they heartbeat every 10 s).
pub fn silence_limit(report_interval_ms: u32) -> Duration {
    match report_interval_ms {
        0 => Duration::from_secs(30),
        ms => Duration::from_millis(u64::from(ms) * 3).max(Duration::from_secs(3)),
    }
}

#[allow(clippy::result_large_err)] // tonic's Status is what the handler returns anyway
pub fn validate_id(value: &str, what: &str) -> Result<(), Status> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{what} must be 1-128 characters of [A-Za-z0-9._-]"
        )))
    }
}

/// Reads one agent's messages into the registry, the rollout, traffic and monitoring.
async fn receive_loop(
    service: &FanoutService,
    region: &str,
    handle: &SessionHandle,
    silence: Duration,
    mut inbound: Streaming<AgentMessage>,
) {
    let FanoutService {
        edges,
        rollouts,
        traffic,
        monitor,
        warm,
        ..
    } = service;
    loop {
        let msg = tokio::select! {
            _ = handle.cancel.cancelled() => return,
            m = tokio::time::timeout(silence, inbound.message()) => match m {
                Ok(m) => m,
                Err(_) => {
                    // Frozen, or cut off by a partition that keeps the socket open: the
                    // transport's keepalive would take far longer to notice.
                    tracing::warn!(edge = %handle.edge_id, silent_s = silence.as_secs_f64(),
                        "edge agent silent; counting it as lost");
                    return;
                }
            },
        };
        match msg {
            Ok(Some(AgentMessage { msg: Some(m) })) => match m {
                agent_message::Msg::Ack(ack) => {
                    // An ack past the head (or for another log) is a bug or a lie; taking
                    // it would make the purge status claim what never happened.
                    let head = service.log.head();
                    if ack.applied_seq > head
                        || (!ack.log_id.is_empty() && ack.log_id != service.log.log_id())
                    {
                        tracing::warn!(edge = %handle.edge_id, acked = ack.applied_seq, head,
                            log_id = %ack.log_id, "ack beyond the log head or for another log; dropping the session");
                        edges.refused_ack(handle);
                        return;
                    }
                    edges.ack(handle, ack.applied_seq)
                }
                agent_message::Msg::Heartbeat(_) => edges.seen(handle),
                agent_message::Msg::PurgeError(e) => {
                    let error: String = e.error.chars().take(1000).collect();
                    if e.full_ban {
                        tracing::error!(edge = %handle.edge_id, seq = e.seq, last_seq = e.last_seq, error = %error,
                            "varnish refused purges for good; the edge banned everything instead");
                    } else {
                        tracing::warn!(edge = %handle.edge_id, seq = e.seq, error = %error, "edge failed to apply purge; it retries");
                    }
                    edges.error(handle, e.seq, e.last_seq, error, e.full_ban);
                }
                agent_message::Msg::ConfigStatus(status) => {
                    edges.varnish_status(handle, &status.admin_error);
                    rollouts.on_status(&handle.edge_id, handle.session, status);
                }
                agent_message::Msg::Probe(result) => {
                    edges.seen(handle);
                    monitor.record(region, result);
                }
                agent_message::Msg::Stats(stats) => {
                    edges.seen(handle);
                    traffic.record(&handle.edge_id, region, stats);
                }
                agent_message::Msg::WarmProgress(p) => {
                    edges.seen(handle);
                    warm.on_progress(&handle.edge_id, handle.session, p);
                }
                agent_message::Msg::TopUrls(top) => warm.on_top(&handle.edge_id, region, top),
                agent_message::Msg::ConfigResult(result) => {
                    rollouts.on_result(&handle.edge_id, handle.session, result);
                }
                agent_message::Msg::Hello(_) => {
                    tracing::warn!(edge = %handle.edge_id, "second Hello on a session; closing it");
                    return;
                }
            },
            // Unknown payload from a newer agent: ignore it.
            Ok(Some(AgentMessage { msg: None })) => {}
            Ok(None) => return,
            Err(status) => {
                tracing::debug!(edge = %handle.edge_id, %status, "session stream ended");
                return;
            }
        }
    }
}

/// Sends one message unless the session is being torn down; false when it is over.
async fn send(
    tx: &mpsc::Sender<Result<CoordinatorMessage, Status>>,
    handle: &SessionHandle,
    msg: coordinator_message::Msg,
) -> bool {
    tokio::select! {
        _ = handle.cancel.cancelled() => false,
        r = tx.send(Ok(CoordinatorMessage { msg: Some(msg) })) => r.is_ok(),
    }
}

/// Sends this edge the config bundles the rollout wants it to run.
async fn config_loop(
    rollouts: Arc<Rollouts>,
    tx: mpsc::Sender<Result<CoordinatorMessage, Status>>,
    handle: SessionHandle,
) {
    let mut changed = rollouts.subscribe();
    loop {
        while let Some(apply) = rollouts.next_apply(&handle.edge_id, handle.session) {
            tracing::info!(edge = %handle.edge_id, version = %apply.version, "sending config");
            if !send(&tx, &handle, coordinator_message::Msg::ApplyConfig(apply)).await {
                return;
            }
        }
        tokio::select! {
            _ = handle.cancel.cancelled() => return,
            c = changed.changed() => if c.is_err() { return },
        }
    }
}

/// Sends this edge the warm shards (and rate changes, cancels) the running job has for
/// it; wakes on every warm change, and every second for purge-gated re-warms.
async fn warm_loop(
    warm: Arc<crate::warm::Warm>,
    tx: mpsc::Sender<Result<CoordinatorMessage, Status>>,
    handle: SessionHandle,
) {
    let mut changed = warm.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        for msg in warm.next_for(&handle.edge_id, handle.session) {
            if !send(&tx, &handle, msg).await {
                return;
            }
        }
        // Every report wakes every session; at most one look per 20 ms each keeps a
        // thousand edges from turning one report into a thousand lookups at once.
        tokio::select! {
            _ = handle.cancel.cancelled() => return,
            _ = tokio::time::sleep(WARM_LOOK_INTERVAL) => {}
        }
        tokio::select! {
            _ = handle.cancel.cancelled() => return,
            _ = tick.tick() => {}
            c = changed.changed() => if c.is_err() { return },
        }
    }
}

async fn send_loop(
    log: PurgeLog,
    resume: ResumePoint,
    tx: mpsc::Sender<Result<CoordinatorMessage, Status>>,
    handle: SessionHandle,
) {
    let mut head_rx = log.subscribe();
    let mut next = match resume {
        ResumePoint::From(seq) => seq,
        ResumePoint::FullBan { head, reason } => {
            let ban = FullBan {
                up_to_seq: head,
                log_id: log.log_id().to_owned(),
                reason: reason.to_owned(),
            };
            if !send(&tx, &handle, coordinator_message::Msg::FullBan(ban)).await {
                return;
            }
            head + 1
        }
    };
    loop {
        while next <= log.head() {
            if next < log.first() {
                // Retention overtook a live session that fell this far behind.
                let head = log.head();
                let ban = FullBan {
                    up_to_seq: head,
                    log_id: log.log_id().to_owned(),
                    reason: "edge fell behind the log's retention".to_owned(),
                };
                if !send(&tx, &handle, coordinator_message::Msg::FullBan(ban)).await {
                    return;
                }
                next = head + 1;
                continue;
            }
            let entries = match log.read_from(next, BATCH_ENTRIES) {
                Ok(e) if !e.is_empty() => e,
                Ok(_) => break,
                Err(e) => {
                    tracing::error!(error = %e, edge = %handle.edge_id, "reading the purge log failed");
                    let _ = tx
                        .send(Err(Status::unavailable("purge log unavailable")))
                        .await;
                    return;
                }
            };
            next = entries.last().map(|e| e.seq + 1).unwrap_or(next);
            let batch = PurgeBatch {
                entries: entries.iter().map(|e| (**e).clone()).collect(),
            };
            if !send(&tx, &handle, coordinator_message::Msg::Purges(batch)).await {
                return;
            }
        }
        tokio::select! {
            _ = handle.cancel.cancelled() => return,
            changed = head_rx.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_rules() {
        assert!(matches!(
            resume_point("L", 1, 10, "", 0),
            ResumePoint::FullBan { .. }
        ));
        assert_eq!(resume_point("L", 1, 10, "L", 4), ResumePoint::From(5));
        assert_eq!(resume_point("L", 5, 10, "L", 4), ResumePoint::From(5));
        assert!(matches!(
            resume_point("L", 6, 10, "L", 4),
            ResumePoint::FullBan { .. }
        ));
        assert!(matches!(
            resume_point("L", 1, 10, "X", 4),
            ResumePoint::FullBan { .. }
        ));
        assert!(matches!(
            resume_point("L", 1, 10, "L", 11),
            ResumePoint::FullBan { .. }
        ));
        assert_eq!(resume_point("L", 11, 10, "L", 10), ResumePoint::From(11));
    }
}
