//! Reports up the stream: acks, purge errors, heartbeats, config status and results,
//! probe results, varnish stats, warm progress, top URLs and client networks, each handed
//! to the subsystem that owns it (all but acks, errors and config also to the cluster's
//! relay, for the other coordinators).
//!
//! An ack beyond the log head (or for another log) is refused and ends the session; an
//! agent silent for [`super::silence_limit`] is counted as lost.

use std::time::Duration;

use proto::edge::{agent_message, AgentMessage};
use tonic::Streaming;

use crate::edges::SessionHandle;
use crate::state::Coordinator;

/// Reads one agent's messages into the registry, the rollout, traffic and monitoring.
pub(super) async fn receive_loop(
    state: &Coordinator,
    region: &str,
    handle: &SessionHandle,
    silence: Duration,
    mut inbound: Streaming<AgentMessage>,
) {
    let Coordinator {
        edges,
        rollouts,
        traffic,
        monitor,
        warm,
        log,
        ..
    } = state;
    // One registration for the session's life, not one per message.
    let cancelled = handle.cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        let msg = tokio::select! {
            _ = &mut cancelled => return,
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
        if let Ok(Some(_)) = &msg {
            // Any message proves the agent alive on this session (see `edges`: a session
            // silent for two report intervals may be taken over by another agent process).
            edges.seen(handle);
        }
        if let Ok(Some(AgentMessage { msg: Some(m) })) = &msg {
            // Probe results, counter samples and warm progress, for the other coordinators.
            state.cluster.relay().offer(&handle.edge_id, region, m);
        }
        match msg {
            Ok(Some(AgentMessage { msg: Some(m) })) => match m {
                agent_message::Msg::Ack(ack) => {
                    // An ack past the head (or for another log) is a bug or a lie; taking
                    // it would make the purge status claim what never happened.
                    let head = log.head();
                    if ack.applied_seq > head
                        || (!ack.log_id.is_empty() && ack.log_id != log.log_id())
                    {
                        tracing::warn!(edge = %handle.edge_id, acked = ack.applied_seq, head,
                            log_id = %ack.log_id, "ack beyond the log head or for another log; dropping the session");
                        edges.refused_ack(handle);
                        return;
                    }
                    edges.ack(handle, ack.applied_seq)
                }
                agent_message::Msg::Heartbeat(_) => {}
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
                    monitor.record(region, result);
                }
                agent_message::Msg::Stats(stats) => {
                    traffic.record(&handle.edge_id, region, stats);
                }
                agent_message::Msg::WarmProgress(p) => {
                    warm.on_progress(&handle.edge_id, handle.session, p);
                }
                agent_message::Msg::TopUrls(top) => warm.on_top(&handle.edge_id, region, top),
                agent_message::Msg::ClientNets(nets) => {
                    if let Some(geo) = &state.geo {
                        geo.record_clients(region, &crate::geo::client_nets(&nets));
                    }
                }
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
