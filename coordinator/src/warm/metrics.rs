//! The warmer's families, read at scrape time: fetch results per region, jobs per
//! state, and the origin rate the running jobs may use now.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::job::JobState;
use super::Warm;
use crate::metrics::{collector, counter, gauge, gauge_value, DescriptorEncoder, Label, Registry};

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
    /// What the metrics export: fetch results per region, jobs per state, the rate.
    pub fn metrics(&self) -> WarmMetrics {
        let queue = self.queue();
        let budget = self.budget();
        let progress = self.progress();
        let mut jobs: BTreeMap<&'static str, usize> = [
            JobState::Queued,
            JobState::Running,
            JobState::Done,
            JobState::Failed,
            JobState::Cancelled,
        ]
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
        for j in queue.jobs.values() {
            *jobs.entry(j.state.as_str()).or_default() += 1;
        }
        WarmMetrics {
            fetches: progress.totals.clone(),
            jobs,
            origin_rate_rps: budget.total(),
        }
    }

    /// Registers the warm families.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(collector(self.clone(), encode));
    }
}

fn encode(source: &Arc<Warm>, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let m = source.metrics();
    counter(
        e,
        "coordinator_warm_fetches_total",
        "Warm fetches reported by the edges, per region and result (since coordinator start).",
        m.fetches.iter().flat_map(|(region, t)| {
            [("hit", t.hits), ("miss", t.misses), ("error", t.errors)]
                .into_iter()
                .map(move |(result, v)| ([("region", Label(region)), ("result", Label(result))], v))
        }),
    )?;
    gauge(
        e,
        "coordinator_warm_jobs",
        "Warm jobs known, by state.",
        m.jobs
            .iter()
            .map(|(state, n)| ([("state", Label(state))], *n as u64)),
    )?;
    gauge_value(
        e,
        "coordinator_warm_origin_rate_rps",
        "Origin requests per second the running warm job may send now (AIMD; 0 when idle).",
        m.origin_rate_rps,
    )
}
