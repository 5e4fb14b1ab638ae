//! The per-edge metric families, read from the registry at scrape time: one collector
//! over the edges whose sessions this coordinator holds (or held last), and the session
//! refusal and hand-off counters.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::view::EdgeView;
use super::EdgeRegistry;
use crate::metrics::{collector, counter, edge_labels, gauge, DescriptorEncoder, Label, Registry};
use crate::purge::log::PurgeLog;

impl EdgeRegistry {
    /// Registers the per-edge families, read from the registry at scrape time;
    /// `with_certs` adds the client certificates' expiry (mutual TLS only).
    pub fn register_metrics(
        self: &Arc<Self>,
        log: &PurgeLog,
        with_certs: bool,
        registry: &mut Registry,
    ) {
        let source = (self.clone(), log.clone(), with_certs);
        registry.register_collector(collector(source, encode_edges));
    }
}

type EdgeSource = (Arc<EdgeRegistry>, PurgeLog, bool);

/// The per-edge families, for the edges whose sessions this coordinator holds (or held
/// last): in a cluster each edge is exported by one coordinator, so sums over the
/// coordinators count it once.
fn encode_edges(source: &EdgeSource, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let (edges, log, with_certs) = source;
    let list = edges.list_local_with_lag(log);
    fn labels(v: &EdgeView) -> [(&'static str, Label<'_>); 2] {
        edge_labels(&v.region, &v.id)
    }
    type PerEdge = fn(&EdgeView) -> u64;
    let counters: [(&str, &str, PerEdge); 3] = [
        (
            "coordinator_purges_applied_total",
            "Purge log entries applied, per edge (since coordinator start).",
            |v| v.applied_total,
        ),
        (
            "coordinator_edge_purge_full_bans_total",
            "Purges varnish refused for good that the edge applied as a full ban instead.",
            |v| v.full_bans,
        ),
        (
            "coordinator_edge_acks_refused_total",
            "Acks beyond the log head (or for another log) refused; each dropped the session.",
            |v| v.refused_acks,
        ),
    ];
    for (name, help, value) in counters {
        counter(e, name, help, list.iter().map(|v| (labels(v), value(v))))?;
    }
    let gauges: [(&str, &str, PerEdge); 5] = [
        (
            "coordinator_edge_purge_lag_entries",
            "Purge log entries not yet applied, per edge.",
            |v| v.lag,
        ),
        (
            "coordinator_edge_applied_seq",
            "Highest purge sequence applied, per edge.",
            |v| v.applied_seq,
        ),
        (
            "coordinator_edge_connected",
            "Whether the edge's session is up (1) or not (0).",
            |v| u64::from(v.connected),
        ),
        (
            "coordinator_edge_purge_failing",
            "1 while the edge reports that it cannot apply its next purge (it retries).",
            |v| u64::from(v.purge_failing),
        ),
        (
            "coordinator_edge_protocol_version",
            "The protocol version the edge's agent speaks (0: unknown).",
            |v| u64::from(v.session.protocol.unwrap_or(0)),
        ),
    ];
    for (name, help, value) in gauges {
        gauge(e, name, help, list.iter().map(|v| (labels(v), value(v))))?;
    }
    gauge(
        e,
        "coordinator_edge_purge_lag_seconds",
        "How long the oldest purge an edge has not applied has waited (0: none).",
        list.iter().map(|v| (labels(v), v.lag_s.unwrap_or(0.0))),
    )?;
    counter(
        e,
        "coordinator_sessions_refused_total",
        "Agent sessions refused: duplicate_edge_id (the id is live from another agent process), handoff (this coordinator cannot reach its store), protocol_version (the agent's protocol version is outside this coordinator's window).",
        [
            (
                [("reason", Label(proto::REFUSAL_DUPLICATE))],
                edges.refused_duplicate.load(Relaxed),
            ),
            (
                [("reason", Label(proto::REFUSAL_HANDOFF))],
                edges.refused_handoff.load(Relaxed),
            ),
            (
                [("reason", Label(proto::REFUSAL_PROTOCOL))],
                edges.refused_protocol.load(Relaxed),
            ),
        ],
    )?;
    crate::metrics::counter_value(
        e,
        "coordinator_sessions_handed_off_total",
        "Agent sessions this coordinator ended to hand the agents to another one (it could not reach its store).",
        edges.handed_off.load(Relaxed),
    )?;
    if *with_certs {
        gauge(
            e,
            "coordinator_edge_cert_expiry_timestamp_seconds",
            "When the client certificate an edge presented expires (Unix time).",
            list.iter()
                .filter_map(|v| v.cert_not_after.map(|t| (labels(v), t))),
        )?;
    }
    Ok(())
}
