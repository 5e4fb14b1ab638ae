//! Sessions: one long-lived gRPC stream per edge agent, carrying everything the
//! coordinator tells an edge down and everything it reports up.
//!
//! An agent opens `Session` and says Hello with its cursor (`log_id`, `applied_seq`).
//! [`SessionService`] checks the Hello against the client certificate, decides where the
//! purges resume ([`resume_point`]) and starts the flows: the purges as a stream the
//! response polls itself, each other flow as a task:
//!
//! * purges: the log from the cursor on, in batches, at most one batch per fan-out
//!   window ([`crate::fanout`]), polled by the response stream itself;
//! * [`bundles`]: the bundles the rollout wants this edge to run (config-capable agents);
//! * [`warm`]: warm shards, rate changes and cancels (warm-capable agents);
//! * [`reports`]: acks, errors, heartbeats, stats, probe results and warm progress up,
//!   each handed to its subsystem; it refuses an ack beyond the log head and ends the
//!   session when the agent has been silent for three of its report intervals
//!   ([`silence_limit`]), so a frozen or partitioned agent is lost in seconds.
//!
//! Three refusals tell the agent what to do (`proto::Refusal`, in the status's metadata):
//! a Hello whose protocol version is outside this coordinator's window
//! (`proto::version::check`) is refused with `protocol_version` and both versions, and
//! the refused agent shown in `/api/v1/edges` (`refused`);
//! a Hello for an edge id whose session is live from another agent process (another
//! `Hello.instance`; for older agents, another address) is refused with
//! `duplicate_edge_id` and the live one's address and start, while one from the same
//! process replaces its old session ([`crate::edges::EdgeRegistry::try_connect`]); while this coordinator hands its agents
//! off ([`handoff`]: cut off from the store, a peer is not) a session of an agent that
//! lists other coordinators is ended, or refused, with `handoff`. A session the
//! coordinator ends for such a reason ends with that status, not a bare close.
//!
//! The purge listener never waits on an edge: it only appends to the log.

mod bundles;
pub mod handoff;
mod reports;
mod warm;

use crate::fanout::{resume_point, ResumePoint};

use std::pin::Pin;
use std::time::Duration;

use proto::edge::AgentMessage;
use proto::edge::{agent_message, coordinator_message, CoordinatorMessage, Welcome};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::edges::{EdgeHello, SessionEnded, SessionHandle, SessionOrigin};
use crate::state::Coordinator;

/// Config and warm messages queued towards one agent before their sender waits.
const OUTBOUND_DEPTH: usize = 2;
/// Time an agent has to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The sending half of one session's stream.
type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// The gRPC service agents connect to.
#[derive(Clone)]
pub struct SessionService {
    state: Coordinator,
    /// With mTLS: the Hello must claim the identity in the client certificate.
    require_identity: bool,
    shutdown: CancellationToken,
    handoff: std::sync::Arc<handoff::Handoff>,
}

impl SessionService {
    /// The service over a running coordinator's shared state; with TLS configured, every
    /// Hello must match its client certificate.
    pub fn new(state: Coordinator, shutdown: CancellationToken) -> Self {
        SessionService {
            require_identity: state.tls.is_some(),
            state,
            shutdown,
            handoff: std::sync::Arc::new(handoff::Handoff::new(Duration::from_secs(
                crate::cluster::config::DEFAULT_HANDOFF_AFTER_S,
            ))),
        }
    }

    /// Hands the agents off once the store has been unreachable for `after` (see
    /// [`handoff`]); run [`Self::watch_handoff`] for it to happen.
    pub fn with_handoff_after(mut self, after: Duration) -> Self {
        self.handoff = std::sync::Arc::new(handoff::Handoff::new(after));
        self
    }

    /// Follows the store's and the peers' reachability, handing agents off while due.
    pub fn watch_handoff(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.handoff
            .clone()
            .watch(self.state.clone(), self.shutdown.clone())
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
        let not_after = crate::tls::not_after(cert);
        if let Some(t) = not_after {
            // Seen at every session, said once a day: it is renewed on the agent's host.
            let edge = format!("edge {id} in {region}");
            daemon::certs::warn_daily(&edge, &edge, "the agent's [tls] cert", t);
        }
        Ok(not_after)
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl proto::Coordinator for SessionService {
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
        let movable = hello.coordinators > 1;
        let protocol = proto::version::own();
        let origin = SessionOrigin {
            peer,
            replace_after: crate::edges::replace_after(hello.report_interval_ms),
            movable,
            instance: crate::edges::instance_fingerprint(&hello.instance),
            dial: hello.dial,
            protocol: proto::version::of_wire(hello.protocol_version),
        };
        if let Err(mismatch) = proto::version::check(protocol, hello.protocol_version) {
            let applied = if hello.log_id == self.state.log.log_id() {
                hello.applied_seq
            } else {
                0
            };
            self.state.edges.refused_for_protocol(
                edge_hello(&hello, cert_not_after),
                &origin,
                applied,
                mismatch.short("coordinator"),
            );
            let reason = mismatch.explain("coordinator");
            tracing::warn!(edge = %hello.edge_id, region = %hello.region, peer = ?peer,
                agent_protocol = mismatch.peer, protocol, reason = %reason,
                "session refused: the agent's protocol version is outside this coordinator's window");
            return Err(proto::Refusal::ProtocolVersion.status(reason));
        }
        if let Some(reason) = self.handoff.active().filter(|_| movable) {
            self.state.edges.refused_for_handoff();
            tracing::info!(edge = %hello.edge_id, peer = ?peer, "session refused: handing agents to the other coordinators");
            return Err(proto::Refusal::Handoff.status(reason));
        }

        let resume = resume_point(
            self.state.log.log_id(),
            self.state.log.restored_from(),
            self.state.log.first(),
            self.state.log.head(),
            &hello.log_id,
            hello.applied_seq,
        );
        let start_seq = match resume {
            ResumePoint::From(_) => hello.applied_seq,
            ResumePoint::FullBan { .. } => 0,
        };
        let handle = self.state.edges.try_connect(
            edge_hello(&hello, cert_not_after),
            origin,
            start_seq,
            &self.shutdown,
        );
        let handle = match handle {
            Ok(h) => h,
            Err(refused) => {
                tracing::warn!(edge = %hello.edge_id, peer = ?peer, reason = %refused,
                    "session refused: the edge id has a live session from another agent process");
                return Err(proto::Refusal::DuplicateEdgeId.status(refused.0));
            }
        };
        tracing::info!(edge = %hello.edge_id, region = %hello.region, peer = ?peer,
            applied_seq = hello.applied_seq, resume = ?resume, "edge connected");

        let (tx, rx) = mpsc::channel(OUTBOUND_DEPTH);
        let mut opening = vec![Ok(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Welcome(Welcome {
                log_id: self.state.log.log_id().to_owned(),
                head_seq: self.state.log.head(),
                coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
                protocol_version: protocol,
            })),
        })];
        if self.state.monitor.enabled() && hello.capabilities.iter().any(|c| c == proto::CAP_PROBES)
        {
            opening.push(Ok(CoordinatorMessage {
                msg: Some(coordinator_message::Msg::ProbePlan(
                    self.state.monitor.plan(),
                )),
            }));
        }

        self.state.traffic.connect(&hello.edge_id, &hello.region);
        let capable = hello.capabilities.iter().any(|c| c == proto::CAP_CONFIG);
        self.state
            .rollouts
            .connect(&hello.edge_id, &hello.region, handle.session, capable);
        let configurer = capable.then(|| {
            tokio::spawn(bundles::bundle_loop(
                self.state.rollouts.clone(),
                tx.clone(),
                handle.clone(),
            ))
        });
        let warmable = hello.capabilities.iter().any(|c| c == proto::CAP_WARM);
        if self.state.warm.refreshes() && hello.purge_mode != "xkey" {
            tracing::warn!(
                edge = %hello.edge_id,
                region = %hello.region,
                purge_mode = %hello.purge_mode,
                "refresh_tags needs agents in xkey mode: this edge's tag purges evict its pages (a ban cannot leave them stale), and the refresh then re-renders them"
            );
        }
        let warmer = warmable.then(|| {
            self.state
                .warm
                .connect(&hello.edge_id, &hello.region, handle.session);
            tokio::spawn(warm::warm_loop(
                self.state.warm.clone(),
                tx.clone(),
                handle.clone(),
            ))
        });
        let silence = silence_limit(hello.report_interval_ms);
        // The purges are polled by the response itself: no task or channel between the
        // log and the socket. Config and warm messages come through `tx`.
        let purges = crate::fanout::feed(
            self.state.log.clone(),
            resume,
            handle.clone(),
            self.state.fanout.clone(),
            hello
                .capabilities
                .iter()
                .any(|c| c == proto::CAP_PURGE_RANGES),
        );
        drop(tx);
        // The session counts among the pacer's senders until its report reader ends it
        // (not until the response is dropped, which a partition can hold off).
        let sender = self.state.fanout.pacer.join();
        let service = self.clone();
        let region = hello.region.clone();
        let ended = handle.ended.clone();
        tokio::spawn(async move {
            reports::receive_loop(&service.state, &region, &handle, silence, inbound).await;
            handle.cancel.cancel();
            drop(sender);
            if let Some(c) = configurer {
                let _ = c.await;
            }
            if let Some(w) = warmer {
                let _ = w.await;
                service
                    .state
                    .warm
                    .disconnect(&handle.edge_id, handle.session);
            }
            service.state.edges.disconnect(&handle);
            service
                .state
                .rollouts
                .disconnect(&handle.edge_id, handle.session);
            tracing::info!(edge = %handle.edge_id, "edge disconnected");
        });
        // A session the coordinator ended for a reason ends with a status saying it.
        let why = futures_util::stream::once(async move { ended.get().map(ended_status) })
            .filter_map(|s| s.map(Err));
        let out = tokio_stream::iter(opening)
            .chain(purges.merge(ReceiverStream::new(rx)))
            .chain(why);
        Ok(Response::new(Box::pin(out)))
    }
}

/// What the registry keeps of a Hello.
fn edge_hello(hello: &proto::edge::Hello, cert_not_after: Option<u64>) -> EdgeHello {
    EdgeHello {
        id: hello.edge_id.clone(),
        region: hello.region.clone(),
        varnish_version: hello.varnish_version.clone(),
        purge_mode: hello.purge_mode.clone(),
        agent_version: hello.agent_version.clone(),
        cert_not_after,
    }
}

/// The status a session the coordinator ended closes with.
fn ended_status(ended: &SessionEnded) -> Status {
    match ended {
        SessionEnded::Handoff(reason) => proto::Refusal::Handoff.status(reason.clone()),
        SessionEnded::Duplicate(reason) => proto::Refusal::DuplicateEdgeId.status(reason.clone()),
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

/// Sends one message unless the session is being torn down; false when it is over.
async fn send(tx: &Outbound, handle: &SessionHandle, msg: coordinator_message::Msg) -> bool {
    tokio::select! {
        _ = handle.cancel.cancelled() => false,
        r = tx.send(Ok(CoordinatorMessage { msg: Some(msg) })) => r.is_ok(),
    }
}
