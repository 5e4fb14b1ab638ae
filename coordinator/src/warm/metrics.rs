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
    /// Refresh mode: pages refreshed in time and evicted at the bound, as deadlines close.
    pub refresh_pages: (u64, u64),
    /// Refresh mode: pages still stale, waiting for their refresh.
    pub refresh_stale: u64,
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
        let now = crate::clock::now_ms();
        let mut refresh_stale = 0;
        for j in queue.jobs.values() {
            *jobs.entry(j.state.as_str()).or_default() += 1;
            if let Some(r) = j.refresh_progress(now) {
                refresh_stale += r.stale;
            }
        }
        WarmMetrics {
            fetches: progress.totals.clone(),
            jobs,
            origin_rate_rps: budget.total(),
            refresh_pages: self.refresh_totals.get(),
            refresh_stale,
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
    counter(
        e,
        "coordinator_refresh_pages_total",
        "Refresh mode: purged pages refreshed in every region before the bound, and evicted at it (since coordinator start).",
        [("refreshed", m.refresh_pages.0), ("evicted", m.refresh_pages.1)]
            .into_iter()
            .map(|(outcome, v)| ([("outcome", Label(outcome))], v)),
    )?;
    gauge_value(
        e,
        "coordinator_refresh_stale_pages",
        "Refresh mode: purged pages still stale, waiting for their refresh.",
        m.refresh_stale as f64,
    )?;
    gauge_value(
        e,
        "coordinator_warm_origin_rate_rps",
        "Origin requests per second the running warm job may send now (AIMD; 0 when idle).",
        m.origin_rate_rps,
    )
}
