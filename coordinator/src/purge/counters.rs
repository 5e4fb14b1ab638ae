//! The purge path's own metrics: every request the listener answers, by result, and
//! every purge logged, by kind — Magento's PURGEs and the API's `POST /api/v1/purges`
//! alike, so a purge counts once whichever door it came through. The log's head and
//! first sequence, and the local spool's depth and counts, are read from the
//! [`PurgeLog`] at scrape time.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::log::PurgeLog;
use crate::metrics::{collector, counter_value, gauge_value, DescriptorEncoder, Registry};

/// Results a PURGE request can end with (every one is exported from the start at 0).
pub const REQUEST_RESULTS: [&str; 5] = [
    "accepted",
    "bad_request",
    "bad_method",
    "forbidden",
    "unavailable",
];
/// Kinds a logged purge has (`url` only comes from the API).
pub const PURGE_KINDS: [&str; 5] = ["tags", "regex", "pool", "all", "url"];

type ByLabel = Family<[(&'static str, &'static str); 1], Counter>;

/// Counters bumped on the hot path; cheap to clone (shared families).
#[derive(Debug, Clone, Default)]
pub struct PurgeCounters {
    requests: ByLabel,
    logged: ByLabel,
}

impl PurgeCounters {
    /// Counts one PURGE request by its outcome (one of [`REQUEST_RESULTS`]).
    pub fn request(&self, result: &'static str) {
        self.requests.get_or_create(&[("result", result)]).inc();
    }

    /// Counts one logged purge by kind (one of [`PURGE_KINDS`]).
    pub fn logged(&self, kind: &'static str) {
        self.logged.get_or_create(&[("kind", kind)]).inc();
    }

    /// Registers the families (every known label at 0) and the log's gauges.
    pub fn register(&self, log: &PurgeLog, registry: &mut Registry) {
        for r in REQUEST_RESULTS {
            let _ = self.requests.get_or_create(&[("result", r)]);
        }
        for k in PURGE_KINDS {
            let _ = self.logged.get_or_create(&[("kind", k)]);
        }
        registry.register(
            "coordinator_purge_requests",
            "PURGE requests received, by result",
            self.requests.clone(),
        );
        registry.register(
            "coordinator_purges_received",
            "Purges durably logged, by kind",
            self.logged.clone(),
        );
        registry.register_collector(collector(log.clone(), encode_log));
    }
}

fn encode_log(source: &PurgeLog, e: &mut DescriptorEncoder) -> std::fmt::Result {
    gauge_value(
        e,
        "coordinator_purge_log_head_seq",
        "Newest durable purge sequence.",
        source.head(),
    )?;
    gauge_value(
        e,
        "coordinator_purge_log_first_seq",
        "Oldest retained purge sequence.",
        source.first(),
    )?;
    gauge_value(
        e,
        "coordinator_purge_spool_entries",
        "Purges answered 200 waiting in this coordinator's local spool for the shared log (etcd did not commit them in time).",
        source.spool_depth(),
    )?;
    let (spooled, drained) = source.spool_counts();
    counter_value(
        e,
        "coordinator_purge_spooled_total",
        "Purges written to the local spool because etcd did not commit them in time.",
        spooled,
    )?;
    counter_value(
        e,
        "coordinator_purge_spool_drained_total",
        "Spooled purges that reached the shared log (drained, or committed late by the etcd attempt that preceded the spool).",
        drained,
    )
}
