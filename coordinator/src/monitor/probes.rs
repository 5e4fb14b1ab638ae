//! Synthetic probes: the plan every agent runs, and per region, check and target a small
//! state machine over the results, with per-minute response times and histograms.
//!
//! `failures_to_down` consecutive failures make a target `down`, as many slow answers
//! make an up edge `degraded`, `successes_to_up` good answers bring it back, so one blip
//! changes nothing. Each (region, check) also keeps 24 h of per-minute count, mean and
//! standard deviation of the edge response time, and the probe-duration histograms of
//! this coordinator's own agents (a relayed result moves health, not the histograms:
//! each coordinator exports its own agents' probes). [`Probes::summary`] is what the
//! health rule reads of all this. One lock, over the per-check state only.

use daemon::sync::Recover;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use proto::edge::{Check, ProbePlan, ProbeResult};
use serde::{Deserialize, Serialize};

use super::config::{CheckConfig, MonitoringConfig};
use super::health::{Health, ProbeHealth, ProbeSummary};
use crate::clock::now_ms;

/// Histogram buckets for probe durations (seconds).
pub const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const MINUTES_KEEP: usize = 24 * 60;

#[derive(Debug, Default)]
struct Target {
    health: Health,
    fails: u32,
    oks: u32,
    slow: u32,
    last: Option<ProbeResult>,
}

impl Target {
    /// The last probe's error, if it failed.
    fn last_error(&self) -> Option<String> {
        self.last
            .as_ref()
            .map(|l| l.error.clone())
            .filter(|e| !e.is_empty())
    }
}

/// One probe-duration histogram: which series, and its cumulative counts.
#[derive(Debug, Clone)]
pub struct ProbeHistogram {
    pub region: String,
    pub check: String,
    /// `edge` (through varnish) or `origin` (straight to the origin).
    pub target: &'static str,
    pub durations: crate::metrics::HistogramSample,
}

/// One minute of successful edge probes: mean and standard deviation of the total
/// response time and of the time to first byte (ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MinuteStats {
    pub t: u64,
    pub count: u64,
    pub mean_ms: f64,
    pub std_ms: f64,
    pub ttfb_mean_ms: f64,
    pub ttfb_std_ms: f64,
    #[serde(skip)]
    sums: [f64; 4],
}

impl MinuteStats {
    fn add(&mut self, ms: f64, ttfb_ms: f64) {
        self.count += 1;
        let n = self.count as f64;
        self.sums[0] += ms;
        self.sums[1] += ms * ms;
        self.sums[2] += ttfb_ms;
        self.sums[3] += ttfb_ms * ttfb_ms;
        let stats = |sum: f64, sumsq: f64| {
            let mean = sum / n;
            (mean, (sumsq / n - mean * mean).max(0.0).sqrt())
        };
        (self.mean_ms, self.std_ms) = stats(self.sums[0], self.sums[1]);
        (self.ttfb_mean_ms, self.ttfb_std_ms) = stats(self.sums[2], self.sums[3]);
    }
}

#[derive(Debug, Default)]
struct RegionCheck {
    edge: Target,
    origin: Target,
    minutes: VecDeque<MinuteStats>,
    /// Histogram counts per target: (bucket counts, +Inf count, sum seconds).
    hist: HashMap<&'static str, (Vec<u64>, u64, f64)>,
}

/// One check in a region, for the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeView {
    pub check: String,
    pub state: Health,
    pub origin_state: Health,
    pub last_status: Option<u32>,
    pub last_error: Option<String>,
    pub cache: Option<String>,
    pub ttfb_ms: Option<f64>,
    /// The current minute's response time (edge target).
    pub minute: Option<MinuteStats>,
}

/// The probe plan and every (region, check)'s state.
pub struct Probes {
    checks: Vec<CheckConfig>,
    /// `[monitoring] origin`.
    origin: Option<String>,
    failures_to_down: u32,
    successes_to_up: u32,
    state: Mutex<HashMap<(String, String), RegionCheck>>,
}

impl Probes {
    pub fn new(config: &MonitoringConfig, checks: Vec<CheckConfig>) -> Self {
        Probes {
            checks,
            origin: config.origin.clone(),
            failures_to_down: config.failures_to_down,
            successes_to_up: config.successes_to_up,
            state: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), RegionCheck>> {
        self.state.locked()
    }

    /// Whether any check is configured.
    pub fn enabled(&self) -> bool {
        !self.checks.is_empty()
    }

    /// The plan every agent runs.
    pub fn plan(&self) -> ProbePlan {
        ProbePlan {
            checks: self
                .checks
                .iter()
                .map(|c| Check {
                    name: c.name.clone(),
                    path: c.path.clone(),
                    host: c.host.clone(),
                    expect_status: u32::from(c.expect_status),
                    body_contains: c.body_contains.clone().unwrap_or_default(),
                    interval_ms: c.interval_ms,
                    timeout_ms: c.timeout_ms,
                })
                .collect(),
            origin: self.origin.clone().unwrap_or_default(),
        }
    }

    /// Takes one result from an edge of `region`; `own` when this coordinator holds its
    /// session (only those count in the histograms). `false`: a check of an older plan,
    /// ignored.
    pub fn observe(&self, region: &str, result: ProbeResult, own: bool) -> bool {
        let Some(check) = self.checks.iter().find(|c| c.name == result.check) else {
            return false; // a check from an older plan
        };
        let (down_after, up_after) = (self.failures_to_down, self.successes_to_up);
        let slow_ms = f64::from(check.slow_ms);
        let mut checks = self.lock();
        let rc = checks
            .entry((region.to_owned(), result.check.clone()))
            .or_default();
        let total_ms = f64::from(result.total_us) / 1000.0;
        let (target, name): (&mut Target, &'static str) = match result.target.as_str() {
            "origin" => (&mut rc.origin, "origin"),
            _ => (&mut rc.edge, "edge"),
        };
        if result.ok {
            target.fails = 0;
            target.oks += 1;
            target.slow = if total_ms > slow_ms {
                target.slow + 1
            } else {
                0
            };
            let slow = target.slow >= down_after;
            target.health = match target.health {
                Health::Unknown => Health::Up,
                Health::Down if target.oks < up_after => Health::Down,
                _ if slow => Health::Degraded,
                Health::Degraded if target.slow > 0 => Health::Degraded,
                _ => Health::Up,
            };
        } else {
            target.oks = 0;
            target.fails += 1;
            if target.fails >= down_after {
                target.health = Health::Down;
            }
        }
        target.last = Some(result.clone());
        if own {
            let (counts, inf, sum) = rc
                .hist
                .entry(name)
                .or_insert_with(|| (vec![0; BUCKETS.len()], 0, 0.0));
            let secs = total_ms / 1000.0;
            for (i, b) in BUCKETS.iter().enumerate() {
                if secs <= *b {
                    counts[i] += 1;
                }
            }
            *inf += 1;
            *sum += secs;
        }
        if name == "edge" && result.ok {
            let minute = result.at_ms / 60_000 * 60;
            let ttfb_ms = f64::from(result.ttfb_us) / 1000.0;
            match rc.minutes.back_mut() {
                Some(m) if m.t == minute => m.add(total_ms, ttfb_ms),
                _ => {
                    let mut m = MinuteStats {
                        t: minute,
                        ..Default::default()
                    };
                    m.add(total_ms, ttfb_ms);
                    rc.minutes.push_back(m);
                    if rc.minutes.len() > MINUTES_KEEP {
                        rc.minutes.pop_front();
                    }
                }
            }
        }
        true
    }

    /// What the health rule reads: per region its worst check (by edge health) and the
    /// worst origin health over its checks that have one.
    pub fn summary(&self) -> ProbeSummary {
        let checks = self.lock();
        let mut worst: BTreeMap<String, (&String, &RegionCheck)> = BTreeMap::new();
        // Per region its worst origin check: health, check name, error.
        let mut origin_worst: BTreeMap<String, (Health, String, Option<String>)> = BTreeMap::new();
        for ((r, c), rc) in checks.iter() {
            if rc.origin.health != Health::Unknown
                && origin_worst
                    .get(r)
                    .is_none_or(|(h, _, _)| rc.origin.health > *h)
            {
                origin_worst.insert(
                    r.clone(),
                    (rc.origin.health, c.clone(), rc.origin.last_error()),
                );
            }
            match worst.get(r) {
                Some((_, w)) if rc.edge.health <= w.edge.health => {}
                _ => {
                    worst.insert(r.clone(), (c, rc));
                }
            }
        }
        let origin = origin_worst
            .iter()
            .map(|(r, (h, _, _))| (r.clone(), *h))
            .collect();
        let worst = worst
            .into_iter()
            .map(|(r, (check, rc))| {
                let p = ProbeHealth {
                    check: check.clone(),
                    edge: rc.edge.health,
                    origin: rc.origin.health,
                    last_error: rc.edge.last_error(),
                    origin_worst: origin_worst.get(&r).cloned(),
                };
                (r, p)
            })
            .collect();
        ProbeSummary { worst, origin }
    }

    /// Per region, every check's view.
    pub fn probes(&self, region: &str) -> Vec<ProbeView> {
        let checks = self.lock();
        let mut out: Vec<ProbeView> = checks
            .iter()
            .filter(|((r, _), _)| r == region)
            .map(|((_, c), rc)| ProbeView {
                check: c.clone(),
                state: rc.edge.health,
                origin_state: rc.origin.health,
                last_status: rc.edge.last.as_ref().map(|l| l.status).filter(|s| *s != 0),
                last_error: rc.edge.last_error(),
                cache: rc
                    .edge
                    .last
                    .as_ref()
                    .map(|l| l.cache.clone())
                    .filter(|c| !c.is_empty()),
                // Live figures only: nothing from a failed probe or an earlier minute.
                ttfb_ms: rc
                    .edge
                    .last
                    .as_ref()
                    .filter(|l| l.ok && now_ms().saturating_sub(l.at_ms) < 60_000)
                    .map(|l| f64::from(l.ttfb_us) / 1000.0),
                minute: rc
                    .minutes
                    .back()
                    .filter(|m| {
                        m.t + 120 >= now_ms() / 1000 && rc.edge.last.as_ref().is_some_and(|l| l.ok)
                    })
                    .copied(),
            })
            .collect();
        out.sort_by(|a, b| a.check.cmp(&b.check));
        out
    }

    /// A region's per-minute response times, per check.
    pub fn minutes(&self, region: &str) -> BTreeMap<String, Vec<MinuteStats>> {
        self.lock()
            .iter()
            .filter(|((r, _), _)| r == region)
            .map(|((_, c), rc)| (c.clone(), rc.minutes.iter().copied().collect()))
            .collect()
    }

    /// Histograms per (region, check, target).
    pub fn histograms(&self) -> Vec<ProbeHistogram> {
        let checks = self.lock();
        let mut out = Vec::new();
        for ((r, c), rc) in checks.iter() {
            for (t, (counts, inf, sum)) in &rc.hist {
                out.push(ProbeHistogram {
                    region: r.clone(),
                    check: c.clone(),
                    target: t,
                    durations: crate::metrics::HistogramSample {
                        sum: *sum,
                        count: *inf,
                        buckets: BUCKETS
                            .iter()
                            .copied()
                            .zip(counts.iter().copied())
                            .collect(),
                    },
                });
            }
        }
        out.sort_by(|a, b| (&a.region, &a.check, a.target).cmp(&(&b.region, &b.check, b.target)));
        out
    }
}
