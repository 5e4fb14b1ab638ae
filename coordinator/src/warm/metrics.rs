//! The warmer's families, read at scrape time: fetch results per region, jobs per
//! state, and the origin rate the running jobs may use now.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::encoding::DescriptorEncoder;

use super::Warm;
use crate::metrics::{counter, gauge, gauge_value, Collector, Label, Registry};

/// Warm fetches the edges reported for one region (since coordinator start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchTotals {
    pub fetched: u64,
    pub hits: u64,
    pub misses: u64,
    pub errors: u64,
}

/// Everything the warm families show, taken under one lock.
#[derive(Debug, Clone, Default)]
pub struct WarmMetrics {
    pub fetches: BTreeMap<String, FetchTotals>,
    /// Jobs known, by state (every state present, 0 included).
    pub jobs: BTreeMap<&'static str, usize>,
    /// Origin requests per second the running jobs may send now (AIMD; 0 when idle).
    pub origin_rate_rps: f64,
}

impl Warm {
    /// Registers the warm families.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(Collect(self.clone())));
    }
}

struct Collect(Arc<Warm>);

impl std::fmt::Debug for Collect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WarmMetrics")
    }
}

impl Collector for Collect {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let m = self.0.metrics();
        counter(
            &mut e,
            "coordinator_warm_fetches_total",
            "Warm fetches reported by the edges, per region and result (since coordinator start).",
            m.fetches.iter().flat_map(|(region, t)| {
                [("hit", t.hits), ("miss", t.misses), ("error", t.errors)]
                    .into_iter()
                    .map(move |(result, v)| {
                        ([("region", Label(region)), ("result", Label(result))], v)
                    })
            }),
        )?;
        gauge(
            &mut e,
            "coordinator_warm_jobs",
            "Warm jobs known, by state.",
            m.jobs
                .iter()
                .map(|(state, n)| ([("state", Label(state))], *n as u64)),
        )?;
        gauge_value(
            &mut e,
            "coordinator_warm_origin_rate_rps",
            "Origin requests per second the running warm job may send now (AIMD; 0 when idle).",
            m.origin_rate_rps,
        )
    }
}
