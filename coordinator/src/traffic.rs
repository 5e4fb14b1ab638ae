//! Traffic and hit ratios from the edges' varnishstat counters.
//!
//! Agents send cumulative counters ([`VarnishStats`]) every few seconds. [`Traffic`]
//! turns consecutive samples of one edge into *deltas* and keeps them twice: every
//! sample of the last hour (for the 1 min / 5 min / 1 h windows) and per-minute sums for
//! 24 h (history). Counters that go backwards (a varnishd restart) are counted from zero
//! again: the new values are what happened since the restart. A gap longer than
//! [`MAX_GAP`] (an agent that was away) only re-baselines, so nothing lands as a spike.
//!
//! A region's hit ratio is the shoppers' `Σhits / Σ(hits + misses)` over all its edges'
//! deltas in the window — never the mean of per-edge ratios, which overweights idle
//! edges. Shoppers' hits and misses come from varnish's log where the agent reads it
//! (`served_logged`: its own requests carry `X-Edge-Agent`, which the log shows whatever
//! the VCL), so they never include the agent's probes, health checks or warm fetches;
//! from an agent without the log (an older one), they are varnish's counters less the
//! agent's own requests (`synthetic_*`), per sample. Requests per second are counted the
//! same way.
//!
//! A restart of varnishd's cache process (its uptime going back, or `MGT.child_panic`
//! rising) is also kept as a [`Restart`] per edge, with the purge sequence the edge had
//! applied when it saw it: `monitor::decide` reads a recent one as `varnish_restarted`.
//!
//! One `std::sync::Mutex`, held for map updates only, never across an `.await`.

use daemon::sync::Recover;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use proto::edge::VarnishStats;
use serde::{Deserialize, Serialize};

use crate::metrics::{
    collector, counter, counter_f64, edge_labels, gauge, histogram, DescriptorEncoder, Label,
    Registry,
};

/// Samples older than this are dropped (the longest window).
const SAMPLE_KEEP_MS: u64 = 3_600_000;
/// Per-minute history kept.
const MINUTES_KEEP: usize = 24 * 60;
/// Two samples further apart than this are not subtracted.
pub const MAX_GAP_MS: u64 = 120_000;
/// The windows reported.
pub const WINDOWS: [(&str, u64); 3] = [("m1", 60_000), ("m5", 300_000), ("h1", 3_600_000)];

/// What happened between two samples (or in a minute, or a window).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Delta {
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub hitpass: u64,
    pub hitmiss: u64,
    pub passes: u64,
    pub backend_fetches: u64,
    pub backend_failures: u64,
    /// Stale copies served (grace hits) and the background fetches refreshing them.
    pub grace_hits: u64,
    pub bgfetches: u64,
    /// The agent's own requests (warm shards, probes) among the above, and their
    /// hits and misses: subtracted for the shoppers' ratio, reported as their own series.
    pub synthetic_requests: u64,
    pub synthetic_hits: u64,
    pub synthetic_misses: u64,
    /// Shoppers' requests as varnish logged them (varnishncsa, the agents' own
    /// excluded): how many, the time varnish took to serve them (Σ µs and Σ ms²) and how
    /// many were answered 5xx.
    pub served: u64,
    pub served_time_us: u64,
    pub served_time_sq_ms: f64,
    pub served_5xx: u64,
    /// Shoppers' hits, misses and requests: from varnish's log where the agent reads it
    /// (the agent's own requests told apart by their `X-Edge-Agent` header, whatever the
    /// VCL), else varnish's counters less the agent's own requests.
    pub shopper_hits: u64,
    pub shopper_misses: u64,
    pub shopper_requests: u64,
}

impl Delta {
    fn add(&mut self, o: &Delta) {
        self.shopper_hits += o.shopper_hits;
        self.shopper_misses += o.shopper_misses;
        self.shopper_requests += o.shopper_requests;
        self.served += o.served;
        self.served_time_us += o.served_time_us;
        self.served_time_sq_ms += o.served_time_sq_ms;
        self.served_5xx += o.served_5xx;
        self.requests += o.requests;
        self.hits += o.hits;
        self.misses += o.misses;
        self.hitpass += o.hitpass;
        self.hitmiss += o.hitmiss;
        self.passes += o.passes;
        self.backend_fetches += o.backend_fetches;
        self.backend_failures += o.backend_failures;
        self.grace_hits += o.grace_hits;
        self.bgfetches += o.bgfetches;
        self.synthetic_requests += o.synthetic_requests;
        self.synthetic_hits += o.synthetic_hits;
        self.synthetic_misses += o.synthetic_misses;
    }

    /// Shoppers' hits and misses.
    pub fn shopper_lookups(&self) -> (u64, u64) {
        (self.shopper_hits, self.shopper_misses)
    }

    /// The shoppers' `hits / (hits + misses)`, or `None` without lookups.
    pub fn hit_ratio(&self) -> Option<f64> {
        let (hits, misses) = self.shopper_lookups();
        let total = hits + misses;
        (total > 0).then(|| hits as f64 / total as f64)
    }

    /// Mean time varnish took to serve a shopper's request (ms), `None` without any.
    pub fn served_mean_ms(&self) -> Option<f64> {
        (self.served > 0).then(|| self.served_time_us as f64 / 1000.0 / self.served as f64)
    }

    /// Standard deviation of that time (ms), `None` without any.
    pub fn served_std_ms(&self) -> Option<f64> {
        let mean = self.served_mean_ms()?;
        let var = self.served_time_sq_ms / self.served as f64 - mean * mean;
        Some(var.max(0.0).sqrt())
    }

    /// Share of shoppers' requests answered 5xx, `None` without any.
    pub fn served_5xx_ratio(&self) -> Option<f64> {
        (self.served > 0).then(|| self.served_5xx as f64 / self.served as f64)
    }

    /// The same for the agent's own (warm and probe) requests.
    pub fn synthetic_hit_ratio(&self) -> Option<f64> {
        let total = self.synthetic_hits + self.synthetic_misses;
        (total > 0).then(|| self.synthetic_hits as f64 / total as f64)
    }
}

fn counters(s: &VarnishStats) -> Delta {
    Delta {
        requests: s.requests,
        hits: s.hits,
        misses: s.misses,
        hitpass: s.hitpass,
        hitmiss: s.hitmiss,
        passes: s.passes,
        backend_fetches: s.backend_fetches,
        backend_failures: s.backend_failures,
        grace_hits: s.grace_hits,
        bgfetches: s.bgfetches,
        ..Delta::default()
    }
}

/// The delta from `prev` to `next`; `None` when they cannot be compared.
pub fn delta(prev: &VarnishStats, next: &VarnishStats) -> Option<Delta> {
    if next.taken_at_ms <= prev.taken_at_ms || next.taken_at_ms - prev.taken_at_ms > MAX_GAP_MS {
        return None;
    }
    let (a, b) = (counters(prev), counters(next));
    let went_back = next.uptime_s < prev.uptime_s
        || b.requests < a.requests
        || b.hits < a.hits
        || b.misses < a.misses
        || b.hitpass < a.hitpass
        || b.hitmiss < a.hitmiss
        || b.passes < a.passes
        || b.backend_fetches < a.backend_fetches
        || b.backend_failures < a.backend_failures
        || b.grace_hits < a.grace_hits
        || b.bgfetches < a.bgfetches;
    // The agent's counters run since the agent started (a new session re-baselines).
    let since = |n: u64, p: u64| if n >= p { n - p } else { n };
    let synthetic = Delta {
        synthetic_requests: since(next.synthetic_requests, prev.synthetic_requests),
        synthetic_hits: since(next.synthetic_hits, prev.synthetic_hits),
        synthetic_misses: since(next.synthetic_misses, prev.synthetic_misses),
        served: since(next.served_requests, prev.served_requests),
        served_time_us: since(next.served_time_us, prev.served_time_us),
        served_time_sq_ms: if next.served_requests >= prev.served_requests {
            (next.served_time_sq_ms - prev.served_time_sq_ms).max(0.0)
        } else {
            next.served_time_sq_ms
        },
        served_5xx: since(next.served_5xx, prev.served_5xx),
        shopper_hits: since(next.served_hits, prev.served_hits),
        shopper_misses: since(next.served_misses, prev.served_misses),
        ..Delta::default()
    };
    let logged = next.served_logged;
    if went_back {
        // varnishd restarted in between: everything it counted is new.
        return Some(Delta { ..b }.with_synthetic(&synthetic, logged));
    }
    Some(
        Delta {
            requests: b.requests - a.requests,
            hits: b.hits - a.hits,
            misses: b.misses - a.misses,
            hitpass: b.hitpass - a.hitpass,
            hitmiss: b.hitmiss - a.hitmiss,
            passes: b.passes - a.passes,
            backend_fetches: b.backend_fetches - a.backend_fetches,
            backend_failures: b.backend_failures - a.backend_failures,
            grace_hits: b.grace_hits - a.grace_hits,
            bgfetches: b.bgfetches - a.bgfetches,
            ..Delta::default()
        }
        .with_synthetic(&synthetic, logged),
    )
}

impl Delta {
    /// The agent-counted fields (its own requests, and what shoppers were served), and
    /// the shoppers' figures: from the log when `logged`, else the counters less the
    /// agent's own requests.
    fn with_synthetic(mut self, s: &Delta, logged: bool) -> Delta {
        if logged {
            self.shopper_hits = s.shopper_hits;
            self.shopper_misses = s.shopper_misses;
            self.shopper_requests = s.served;
        } else {
            self.shopper_hits = self.hits.saturating_sub(s.synthetic_hits);
            self.shopper_misses = self.misses.saturating_sub(s.synthetic_misses);
            self.shopper_requests = self.requests.saturating_sub(s.synthetic_requests);
        }
        self.synthetic_requests = s.synthetic_requests;
        self.synthetic_hits = s.synthetic_hits;
        self.synthetic_misses = s.synthetic_misses;
        self.served = s.served;
        self.served_time_us = s.served_time_us;
        self.served_time_sq_ms = s.served_time_sq_ms;
        self.served_5xx = s.served_5xx;
        self
    }
}

#[derive(Debug, Default)]
struct EdgeTraffic {
    region: String,
    last: Option<VarnishStats>,
    samples: VecDeque<(u64, Delta)>,
    minutes: VecDeque<(u64, Delta)>,
    total: Delta,
    /// Shoppers' requests within each bound of `proto::SERVED_BUCKETS_S`, since the
    /// coordinator started (cumulative, as a Prometheus histogram wants them).
    served_buckets: Vec<u64>,
    restarts: u64,
    /// The latest restart seen.
    last_restart: Option<Restart>,
    /// Time between the last two samples: the edge's reporting interval.
    interval_ms: u64,
    /// When (sample time) varnishd's uptime last moved: a killed varnishd leaves its
    /// shared memory behind, and varnishstat goes on reading the frozen counters.
    alive_at_ms: u64,
    /// The samples come from another coordinator of the cluster (it holds the edge's
    /// session): in the regions' figures, not in this coordinator's per-edge metrics.
    relayed: bool,
}

/// A restart of an edge's varnishd cache process, as its counters showed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    pub edge: String,
    /// When the first sample after the restart was taken (Unix ms).
    pub at_ms: u64,
    /// `MGT.child_panic` rose: the child panicked (otherwise it was restarted or killed).
    pub panic: bool,
    /// The newest purge the edge had applied when it read that sample: the last one
    /// before the restart, unless purges were applied between the restart and the read.
    pub applied_seq: u64,
}

/// Samples this many intervals old are no longer live figures.
const STALE_INTERVALS: u64 = 3;

/// Per-edge traffic; share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct Traffic {
    edges: Mutex<HashMap<String, EdgeTraffic>>,
}

/// One region (or edge) over the windows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Shoppers' hit ratio per window (`m1`, `m5`, `h1`): the agents' own warm, probe
    /// and health-check requests are not in it, whatever the VCL; null without shoppers'
    /// lookups in it, or when stale.
    pub hit_ratio: BTreeMap<&'static str, Option<f64>>,
    /// The hit ratio of the agents' own (warm, probe) requests per window.
    pub synthetic_hit_ratio: BTreeMap<&'static str, Option<f64>>,
    /// Shoppers' requests per second over the last minute (null when stale).
    pub requests_per_s: Option<f64>,
    /// Sums over the last minute.
    pub last_minute: Delta,
    /// Cached objects and ban-list length, summed over the live latest samples.
    pub objects: Option<u64>,
    pub bans: Option<u64>,
    /// No edge has reported counters for three of its intervals: the figures above are
    /// not live (varnishd or the agent is gone) and are null.
    pub stale: bool,
    /// Seconds since the newest sample.
    pub stats_age_s: Option<f64>,
    /// varnishd restarts seen (counters going back).
    pub restarts: u64,
}

/// One edge's served-time histogram and 5xx count since the coordinator started.
#[derive(Debug, Clone)]
pub struct ServedEdge {
    pub edge: String,
    pub region: String,
    pub histogram: crate::metrics::HistogramSample,
    /// Σ (served time)², in s²: with the histogram's sum and count, the standard deviation.
    pub time_sq_s2: f64,
    pub errors_5xx: u64,
}

/// One minute of a region's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinutePoint {
    /// Unix seconds of the minute's start.
    pub t: u64,
    pub hit_ratio: Option<f64>,
    pub requests_per_s: f64,
    /// Mean and standard deviation of the time varnish took to serve shoppers (ms).
    #[serde(default)]
    pub served_mean_ms: Option<f64>,
    #[serde(default)]
    pub served_std_ms: Option<f64>,
    #[serde(flatten)]
    pub delta: Delta,
}

impl Traffic {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, EdgeTraffic>> {
        self.edges.locked()
    }

    /// A new session: the next sample is a baseline.
    pub fn connect(&self, edge: &str, region: &str) {
        let mut edges = self.lock();
        let e = edges.entry(edge.to_owned()).or_default();
        e.region = region.to_owned();
        e.last = None;
        e.relayed = false;
    }

    /// Records one sample from `edge`, whose session this coordinator holds.
    pub fn record(&self, edge: &str, region: &str, stats: VarnishStats) {
        self.observe(edge, region, stats, false);
    }

    /// Records one sample another coordinator of the cluster relayed.
    pub fn record_relayed(&self, edge: &str, region: &str, stats: VarnishStats) {
        self.observe(edge, region, stats, true);
    }

    fn observe(&self, edge: &str, region: &str, stats: VarnishStats, relayed: bool) {
        let mut edges = self.lock();
        let e = edges.entry(edge.to_owned()).or_default();
        e.region = region.to_owned();
        e.relayed = relayed;
        let at = stats.taken_at_ms;
        if e.last.as_ref().is_none_or(|p| p.uptime_s != stats.uptime_s) {
            e.alive_at_ms = at;
        }
        if let Some(prev) = &e.last {
            if at > prev.taken_at_ms {
                e.interval_ms = at - prev.taken_at_ms;
            }
            let panic = stats.child_panics > prev.child_panics;
            if panic || stats.uptime_s < prev.uptime_s {
                e.restarts += 1;
                e.last_restart = Some(Restart {
                    edge: edge.to_owned(),
                    at_ms: at,
                    panic,
                    applied_seq: stats.applied_seq,
                });
            }
            if let Some(d) = delta(prev, &stats) {
                e.total.add(&d);
                let n = proto::SERVED_BUCKETS_S.len();
                if e.served_buckets.len() != n {
                    e.served_buckets = vec![0; n];
                }
                let restarted = stats.served_requests < prev.served_requests;
                for (i, total) in e.served_buckets.iter_mut().enumerate() {
                    let now = stats.served_buckets.get(i).copied().unwrap_or(0);
                    let before = prev.served_buckets.get(i).copied().unwrap_or(0);
                    *total += if restarted || now < before {
                        now
                    } else {
                        now - before
                    };
                }
                e.samples.push_back((at, d));
                let minute = at / 60_000 * 60_000;
                match e.minutes.back_mut() {
                    Some((m, sum)) if *m == minute => sum.add(&d),
                    _ => e.minutes.push_back((minute, d)),
                }
            }
        }
        while e
            .samples
            .front()
            .is_some_and(|(t, _)| *t + SAMPLE_KEEP_MS < at)
        {
            e.samples.pop_front();
        }
        while e.minutes.len() > MINUTES_KEEP {
            e.minutes.pop_front();
        }
        e.last = Some(stats);
    }

    /// Summaries per region at `now_ms`.
    pub fn regions(&self, now_ms: u64) -> BTreeMap<String, Summary> {
        let edges = self.lock();
        let mut by_region: BTreeMap<String, Vec<&EdgeTraffic>> = BTreeMap::new();
        for e in edges.values() {
            by_region.entry(e.region.clone()).or_default().push(e);
        }
        by_region
            .into_iter()
            .map(|(r, list)| (r, summarize(&list, now_ms)))
            .collect()
    }

    /// Background fetches per second in `regions` over the `window_ms` before `now_ms`:
    /// the origin (or shield) requests shoppers' stale hits start.
    pub fn bgfetch_rate(&self, regions: &[&str], now_ms: u64, window_ms: u64) -> f64 {
        let edges = self.lock();
        let mut sum = 0;
        for e in edges
            .values()
            .filter(|e| regions.contains(&e.region.as_str()))
        {
            for (t, d) in e.samples.iter().rev() {
                if *t + window_ms <= now_ms {
                    break;
                }
                sum += d.bgfetches;
            }
        }
        sum as f64 * 1000.0 / window_ms.max(1) as f64
    }

    /// Per-edge summaries at `now_ms`, by edge id, of the edges whose samples this
    /// coordinator's own sessions brought (not relayed ones).
    pub fn own_edges(&self, now_ms: u64) -> BTreeMap<String, (String, Summary, Delta)> {
        let edges = self.lock();
        edges
            .iter()
            .filter(|(_, e)| !e.relayed)
            .map(|(id, e)| {
                (
                    id.clone(),
                    (e.region.clone(), summarize(&[e], now_ms), e.total),
                )
            })
            .collect()
    }

    /// Per edge of `region`, its latest varnishd restart seen at or after `since_ms`,
    /// newest first.
    pub fn restarts_since(&self, region: &str, since_ms: u64) -> Vec<Restart> {
        let edges = self.lock();
        let mut out: Vec<Restart> = edges
            .values()
            .filter(|e| e.region == region)
            .filter_map(|e| e.last_restart.clone())
            .filter(|r| r.at_ms >= since_ms)
            .collect();
        out.sort_by(|a, b| b.at_ms.cmp(&a.at_ms).then_with(|| a.edge.cmp(&b.edge)));
        out
    }

    /// A region's minutes starting at or after `from_ms` (minute starts, Unix ms), summed
    /// over its edges.
    pub fn recent(&self, region: &str, from_ms: u64) -> BTreeMap<u64, Delta> {
        let edges = self.lock();
        let mut minutes: BTreeMap<u64, Delta> = BTreeMap::new();
        for e in edges.values().filter(|e| e.region == region) {
            for (m, d) in e.minutes.iter().rev() {
                if *m < from_ms {
                    break;
                }
                minutes.entry(*m).or_default().add(d);
            }
        }
        minutes
    }

    /// Per edge (this coordinator's own sessions'), what shoppers were served since the
    /// coordinator started.
    pub fn served(&self) -> Vec<ServedEdge> {
        let edges = self.lock();
        let mut out: Vec<_> = edges
            .iter()
            .filter(|(_, e)| !e.relayed && !e.served_buckets.is_empty())
            .map(|(id, e)| {
                let buckets = proto::SERVED_BUCKETS_S
                    .iter()
                    .copied()
                    .zip(e.served_buckets.iter().copied())
                    .collect();
                let histogram = crate::metrics::HistogramSample {
                    sum: e.total.served_time_us as f64 / 1e6,
                    count: e.total.served,
                    buckets,
                };
                ServedEdge {
                    edge: id.clone(),
                    region: e.region.clone(),
                    histogram,
                    time_sq_s2: e.total.served_time_sq_ms / 1e6,
                    errors_5xx: e.total.served_5xx,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.region, &a.edge).cmp(&(&b.region, &b.edge)));
        out
    }

    /// A region's per-minute history (oldest first).
    pub fn history(&self, region: &str) -> Vec<MinutePoint> {
        let edges = self.lock();
        let mut minutes: BTreeMap<u64, Delta> = BTreeMap::new();
        for e in edges.values().filter(|e| e.region == region) {
            for (m, d) in &e.minutes {
                minutes.entry(*m).or_default().add(d);
            }
        }
        minutes
            .into_iter()
            .map(|(m, d)| MinutePoint {
                t: m / 1000,
                hit_ratio: d.hit_ratio(),
                requests_per_s: d.shopper_requests as f64 / 60.0,
                served_mean_ms: d.served_mean_ms(),
                served_std_ms: d.served_std_ms(),
                delta: d,
            })
            .collect()
    }
}

fn summarize(all: &[&EdgeTraffic], now_ms: u64) -> Summary {
    // Only edges whose counters are live count; a dead varnishd shows no figures.
    let live: Vec<&EdgeTraffic> = all
        .iter()
        .copied()
        .filter(|e| {
            // Live: a sample within three intervals, from a varnishd whose uptime moves
            // (uptime has one-second resolution, hence the 2 s floor).
            let every = if e.interval_ms == 0 {
                5_000
            } else {
                e.interval_ms
            };
            let limit = every.max(1_000) * STALE_INTERVALS;
            e.last.as_ref().is_some_and(|l| {
                now_ms.saturating_sub(l.taken_at_ms) <= limit
                    && now_ms.saturating_sub(e.alive_at_ms) <= limit.max(2_000) + 1_000
            })
        })
        .collect();
    let newest = all
        .iter()
        .filter_map(|e| e.last.as_ref().map(|l| l.taken_at_ms))
        .max();
    let stale = live.is_empty();
    let window = |ms: u64| {
        let mut sum = Delta::default();
        for e in &live {
            for (t, d) in e.samples.iter().rev() {
                if *t + ms <= now_ms {
                    break;
                }
                sum.add(d);
            }
        }
        sum
    };
    let hit_ratio = WINDOWS
        .iter()
        .map(|(name, ms)| (*name, window(*ms).hit_ratio()))
        .collect();
    let synthetic_hit_ratio = WINDOWS
        .iter()
        .map(|(name, ms)| (*name, window(*ms).synthetic_hit_ratio()))
        .collect();
    let last_minute = window(60_000);
    let gauge = |f: fn(&VarnishStats) -> u64| {
        (!stale).then(|| live.iter().filter_map(|e| e.last.as_ref()).map(f).sum())
    };
    Summary {
        hit_ratio,
        synthetic_hit_ratio,
        requests_per_s: (!stale).then(|| last_minute.shopper_requests as f64 / 60.0),
        last_minute,
        objects: gauge(|s| s.objects),
        bans: gauge(|s| s.bans),
        restarts: all.iter().map(|e| e.restarts).sum(),
        stale,
        stats_age_s: newest.map(|t| now_ms.saturating_sub(t) as f64 / 1000.0),
    }
}

impl Traffic {
    /// Registers the varnish counter families (per edge) and the regions' hit ratios.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(collector(self.clone(), encode_metrics));
    }
}

fn encode_metrics(source: &Arc<Traffic>, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let now = crate::clock::now_ms();
    let edges = source.own_edges(now);
    type Get = fn(&Delta) -> u64;
    let counters: [(&str, &str, Get); 11] = [
        (
            "coordinator_varnish_requests_total",
            "Client requests varnish received (since coordinator start).",
            |d| d.requests,
        ),
        ("coordinator_varnish_cache_hits_total", "Cache hits.", |d| {
            d.hits
        }),
        (
            "coordinator_varnish_cache_misses_total",
            "Cache misses.",
            |d| d.misses,
        ),
        (
            "coordinator_varnish_passes_total",
            "Requests passed to the backend uncached.",
            |d| d.passes,
        ),
        (
            "coordinator_varnish_backend_fetches_total",
            "Backend fetches.",
            |d| d.backend_fetches,
        ),
        (
            "coordinator_varnish_backend_failures_total",
            "Failed backend connections and fetches.",
            |d| d.backend_failures,
        ),
        (
            "coordinator_varnish_stale_answers_total",
            "Stale copies served at once while a background fetch refreshes them (grace hits; a refresh-mode purge's pages, or the origin down).",
            |d| d.grace_hits,
        ),
        (
            "coordinator_varnish_background_fetches_total",
            "Background fetches refreshing stale copies (each one origin or shield request).",
            |d| d.bgfetches,
        ),
        (
            "coordinator_varnish_synthetic_requests_total",
            "The agent's own requests (warm shards, probes) among the client requests.",
            |d| d.synthetic_requests,
        ),
        (
            "coordinator_varnish_synthetic_hits_total",
            "Cache hits of the agent's own requests.",
            |d| d.synthetic_hits,
        ),
        (
            "coordinator_varnish_synthetic_misses_total",
            "Cache misses of the agent's own requests (warming).",
            |d| d.synthetic_misses,
        ),
    ];
    for (name, help, get) in counters {
        let samples = edges
            .iter()
            .map(|(id, (region, _, total))| (edge_labels(region, id), get(total)));
        counter(e, name, help, samples)?;
    }
    type Current = fn(&Summary) -> Option<u64>;
    let gauges: [(&str, &str, Current); 2] = [
        (
            "coordinator_varnish_objects",
            "Objects in the cache.",
            |s| s.objects,
        ),
        ("coordinator_varnish_bans", "Length of the ban list.", |s| {
            s.bans
        }),
    ];
    for (name, help, get) in gauges {
        // A stale edge has no live value: no sample rather than its last one.
        let samples = edges.iter().filter_map(|(id, (region, summary, _))| {
            get(summary).map(|v| (edge_labels(region, id), v))
        });
        gauge(e, name, help, samples)?;
    }
    let served = source.served();
    histogram(
        e,
        "coordinator_shopper_response_seconds",
        "Time varnish took to serve shoppers' requests (from its log; the agents' own excluded), since coordinator start.",
        served
            .iter()
            .map(|s| (edge_labels(&s.region, &s.edge), s.histogram.clone())),
    )?;
    counter_f64(
        e,
        "coordinator_shopper_response_seconds_squared_total",
        "Σ of the squares of shoppers' served times (s²; the histogram's sum and count give the mean, this the standard deviation), since coordinator start.",
        served
            .iter()
            .map(|s| (edge_labels(&s.region, &s.edge), s.time_sq_s2)),
    )?;
    counter(
        e,
        "coordinator_shopper_responses_5xx_total",
        "Shoppers' requests varnish answered with a 5xx (since coordinator start).",
        served
            .iter()
            .map(|s| (edge_labels(&s.region, &s.edge), s.errors_5xx)),
    )?;
    let regions = source.regions(now);
    gauge(
            e,
            "coordinator_region_hit_ratio",
            "Shoppers' Σhits / Σ(hits + misses) over the region's edges in the window (the agents' warm and probe requests excluded).",
            regions.iter().flat_map(|(region, summary)| {
                summary.hit_ratio.iter().filter_map(move |(window, ratio)| {
                    ratio.map(|r| {
                        (
                            [("region", Label(region)), ("window", Label(window))],
                            r,
                        )
                    })
                })
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: u64, uptime: u64, hits: u64, misses: u64) -> VarnishStats {
        VarnishStats {
            taken_at_ms: at,
            uptime_s: uptime,
            requests: hits + misses,
            hits,
            misses,
            ..Default::default()
        }
    }

    #[test]
    fn relayed_edges_count_in_the_regions_and_not_in_own_metrics() {
        let t = Traffic::default();
        t.record("a", "eu", s(1_000, 10, 0, 0));
        t.record("a", "eu", s(3_000, 12, 90, 10));
        // Edge b's session is on another coordinator, which relayed its samples.
        t.record_relayed("b", "eu", s(1_000, 10, 0, 0));
        t.record_relayed("b", "eu", s(3_000, 12, 0, 100));
        let eu = &t.regions(4_000)["eu"];
        assert_eq!(eu.last_minute.hits, 90);
        assert_eq!(eu.last_minute.misses, 110);
        assert_eq!(eu.hit_ratio["m1"], Some(90.0 / 200.0));
        let own = t.own_edges(4_000);
        assert_eq!(own.keys().collect::<Vec<_>>(), ["a"]);
        // b's session moves here: its own samples count in this coordinator's metrics.
        t.connect("b", "eu");
        t.record("b", "eu", s(5_000, 14, 0, 110));
        assert_eq!(t.own_edges(6_000).len(), 2);
    }

    #[test]
    fn region_ratio_is_summed_not_averaged() {
        let t = Traffic::default();
        // Edge a: 90 hits, 10 misses. Edge b: 0 hits, 1 miss (idle).
        t.record("a", "eu", s(1_000, 10, 0, 0));
        t.record("a", "eu", s(3_000, 12, 90, 10));
        t.record("b", "eu", s(1_000, 10, 0, 0));
        t.record("b", "eu", s(3_000, 12, 0, 1));
        t.record("c", "us", s(1_000, 10, 0, 0));
        let r = t.regions(4_000);
        // Σ: 90 / 101, not (0.9 + 0.0) / 2.
        let eu = r["eu"].hit_ratio["m1"].unwrap();
        assert!((eu - 90.0 / 101.0).abs() < 1e-9, "{eu}");
        assert_eq!(r["us"].hit_ratio["m1"], None);
        assert!((r["eu"].requests_per_s.unwrap() - 101.0 / 60.0).abs() < 1e-9);
    }

    #[test]
    fn warm_and_probe_requests_are_not_shoppers() {
        let t = Traffic::default();
        let mut a = s(1_000, 10, 0, 0);
        t.record("a", "eu", a);
        // 100 warm misses and 20 warm hits, plus shoppers: 60 hits, 20 misses.
        a = VarnishStats {
            taken_at_ms: 3_000,
            uptime_s: 12,
            requests: 200,
            hits: 80,
            misses: 120,
            synthetic_requests: 120,
            synthetic_hits: 20,
            synthetic_misses: 100,
            ..Default::default()
        };
        t.record("a", "eu", a);
        let eu = &t.regions(4_000)["eu"];
        assert_eq!(eu.hit_ratio["m1"], Some(0.75));
        assert_eq!(eu.synthetic_hit_ratio["m1"], Some(20.0 / 120.0));
        assert!((eu.requests_per_s.unwrap() - 80.0 / 60.0).abs() < 1e-9);
    }

    /// A sample from an agent that reads varnish's log: varnish counted `(requests, hits)`
    /// of which the agent sent `own`; its log showed `(served, hits, misses)` shoppers'.
    fn logged(
        at: u64,
        uptime: u64,
        counted: (u64, u64),
        own: u64,
        log: (u64, u64, u64),
    ) -> VarnishStats {
        VarnishStats {
            taken_at_ms: at,
            uptime_s: uptime,
            requests: counted.0,
            hits: counted.1,
            synthetic_requests: own,
            served_requests: log.0,
            served_hits: log.1,
            served_misses: log.2,
            served_logged: true,
            ..Default::default()
        }
    }

    #[test]
    fn with_the_log_the_agents_own_hits_never_count_whatever_the_vcl() {
        let t = Traffic::default();
        // Probes and health checks hit the cache 40 times; the VCL set no debug header,
        // so the agent knew no verdict from the responses (synthetic hits 0): only the
        // log tells them apart, and no shopper came.
        t.record("a", "eu", logged(1_000, 10, (0, 0), 0, (0, 0, 0)));
        t.record("a", "eu", logged(41_000, 50, (40, 40), 40, (0, 0, 0)));
        let eu = &t.regions(42_000)["eu"];
        assert_eq!(eu.hit_ratio["m1"], None, "no shopper: no ratio, not 100 %");
        assert_eq!(eu.requests_per_s, Some(0.0));
        assert_eq!(
            eu.last_minute.hits, 40,
            "varnish's own count is still shown"
        );
        // Then 1 miss and 10 hits from shoppers (varnish counts them with 5 more probes).
        t.record("a", "eu", logged(51_000, 60, (56, 55), 45, (11, 10, 1)));
        let eu = &t.regions(52_000)["eu"];
        assert_eq!(eu.hit_ratio["m1"], Some(10.0 / 11.0));
        assert_eq!(
            (eu.last_minute.shopper_hits, eu.last_minute.shopper_misses),
            (10, 1)
        );
        assert!((eu.requests_per_s.unwrap_or(0.0) - 11.0 / 60.0).abs() < 1e-9);
        // An older agent in the same region: its counters less its own requests.
        t.record("b", "eu", s(1_000, 10, 0, 0));
        t.record(
            "b",
            "eu",
            VarnishStats {
                synthetic_requests: 5,
                synthetic_hits: 5,
                ..s(51_000, 60, 15, 5)
            },
        );
        let eu = &t.regions(52_000)["eu"];
        assert_eq!(eu.hit_ratio["m1"], Some(20.0 / 26.0));
        let h = t.history("eu");
        assert_eq!(h.iter().map(|m| m.delta.shopper_hits).sum::<u64>(), 20);
    }

    #[test]
    fn a_silent_edge_shows_no_live_figures() {
        let t = Traffic::default();
        t.record("a", "eu", s(1_000, 10, 0, 0));
        t.record("a", "eu", s(6_000, 15, 9, 1));
        let live = &t.regions(7_000)["eu"];
        assert!(!live.stale);
        assert_eq!(live.hit_ratio["m1"], Some(0.9));
        // Three intervals (15 s) later with nothing new: stale, no figures.
        let dead = &t.regions(6_000 + 15_001)["eu"];
        assert!(dead.stale);
        // Samples that keep coming from a dead varnishd (its uptime frozen) are stale too.
        for at in [11_000, 16_000, 21_000, 26_000] {
            t.record("a", "eu", s(at, 15, 9, 1));
        }
        assert!(t.regions(26_001)["eu"].stale);
        assert_eq!(dead.hit_ratio["m1"], None);
        assert_eq!((dead.requests_per_s, dead.objects), (None, None));
        assert!(dead.stats_age_s.unwrap() > 15.0);
    }

    #[test]
    fn restarts_never_go_negative_and_gaps_rebaseline() {
        let t = Traffic::default();
        t.record("a", "eu", s(0, 100, 500, 500));
        t.record("a", "eu", s(2_000, 102, 510, 500)); // +10 hits
        t.record("a", "eu", s(4_000, 1, 3, 1)); // restart: 3 hits, 1 miss since
        t.record("a", "eu", s(6_000, 3, 5, 1)); // +2 hits
        let e = &t.own_edges(7_000)["a"];
        assert_eq!((e.2.hits, e.2.misses), (15, 1));
        assert_eq!(e.1.restarts, 1);
        // An agent away for 10 minutes: its next sample only re-baselines.
        t.record("a", "eu", s(606_000, 603, 100_000, 1));
        assert_eq!(t.own_edges(607_000)["a"].2.hits, 15);
        // Windows exclude old samples.
        let r = t.regions(606_000 + 1);
        assert_eq!(r["eu"].hit_ratio["m1"], None);
        assert!(r["eu"].hit_ratio["h1"].is_some());
    }

    #[test]
    fn a_restart_is_kept_with_the_purge_applied_before_it() {
        let t = Traffic::default();
        let at = |taken_at_ms, uptime_s, child_panics, applied_seq| VarnishStats {
            taken_at_ms,
            uptime_s,
            child_panics,
            applied_seq,
            ..VarnishStats::default()
        };
        t.record("a", "eu", at(1_000, 100, 0, 7));
        t.record("a", "eu", at(2_000, 101, 0, 8));
        assert!(t.restarts_since("eu", 0).is_empty());
        // The child panicked and came back (uptime 0, one more panic).
        t.record("a", "eu", at(3_000, 0, 1, 8));
        t.record("a", "eu", at(4_000, 1, 1, 9));
        let r = t.restarts_since("eu", 0);
        assert_eq!(
            r,
            vec![Restart {
                edge: "a".into(),
                at_ms: 3_000,
                panic: true,
                applied_seq: 8
            }]
        );
        assert!(t.restarts_since("eu", 3_001).is_empty());
        assert!(t.restarts_since("us", 0).is_empty());
        // Killed and restarted without a panic: uptime going back is enough.
        t.record("a", "eu", at(5_000, 0, 1, 9));
        assert!(!t.restarts_since("eu", 0)[0].panic);
        assert_eq!(t.own_edges(5_001)["a"].1.restarts, 2);
    }

    #[test]
    fn served_time_squares_are_exported_in_seconds_squared() {
        let served = |at: u64, n: u64, us: u64, sq_ms: f64| VarnishStats {
            served_requests: n,
            served_time_us: us,
            served_time_sq_ms: sq_ms,
            served_buckets: vec![0; proto::SERVED_BUCKETS_S.len()],
            ..s(at, at / 1000, 0, 0)
        };
        let t = Arc::new(Traffic::default());
        t.record("a", "eu", served(1_000, 0, 0, 0.0));
        // Two requests of 100 ms and 300 ms: Σt = 0.4 s, Σt² = 10 000 + 90 000 ms².
        t.record("a", "eu", served(3_000, 2, 400_000, 100_000.0));
        let s = &t.served()[0];
        assert!((s.time_sq_s2 - 0.1).abs() < 1e-9, "{}", s.time_sq_s2);
        let mut registry = Registry::default();
        t.register_metrics(&mut registry);
        let text = crate::metrics::render(&registry, crate::metrics::Format::Prometheus);
        assert!(
            text.contains("# TYPE coordinator_shopper_response_seconds_squared_total counter\n"),
            "{text}"
        );
        let line = text
            .lines()
            .find(|l| l.starts_with("coordinator_shopper_response_seconds_squared_total{"))
            .unwrap_or_default();
        assert_eq!(
            line.rsplit_once(' ').map(|(_, v)| v.parse::<f64>().ok()),
            Some(Some(0.1)),
            "{line}"
        );
        // std = sqrt(Σt²/n - mean²) = sqrt(0.05 - 0.04) = 0.1 s, as served_std_ms says.
        let d = &t.regions(4_000)["eu"].last_minute;
        assert!((d.served_std_ms().unwrap_or(0.0) - 100.0).abs() < 1e-6);
    }

    #[test]
    fn history_is_per_minute() {
        let t = Traffic::default();
        t.record("a", "eu", s(0, 1, 0, 0));
        t.record("a", "eu", s(30_000, 31, 6, 0));
        t.record("a", "eu", s(70_000, 71, 6, 6));
        let h = t.history("eu");
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].t, h[0].delta.hits, h[1].delta.misses), (0, 6, 6));
        assert_eq!(h[1].hit_ratio, Some(0.0));
    }
}
