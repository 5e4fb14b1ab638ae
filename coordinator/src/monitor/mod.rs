//! Synthetic monitoring: probe results in, region health and grouped alerts out.
//!
//! Every agent probes each `[[checks]]` entry through its varnish (`edge`) and straight
//! at the origin (`origin`). Per region, check and target, [`Monitor`] keeps a small
//! state machine: `failures_to_down` consecutive failures make it `down`, as many slow
//! answers make an up edge `degraded`, `successes_to_up` good answers bring it back, so
//! one blip changes nothing. It also keeps per-minute count, mean and standard deviation
//! of the edge response time.
//!
//! A region's health is decided in one place, [`decide`], from its sessions and its
//! worst check: `up` needs a connected agent, purges applied within `purge_lag_s` and
//! passing probes. Otherwise the diagnosis says why: `no_agents`, `agent_lost`,
//! `edge_down` (edge fails, origin reachable from there), `origin_unreachable` (origin
//! fails from this region only), `origin_down_everywhere` (every region that probes the
//! origin fails it), or, degraded, `purge_failing`, `purge_stalled`,
//! `varnish_unreachable`, `varnish_restarted` (an edge's varnishd cache process
//! restarted within `varnish_restart_s`: its cache is empty; the error names the purge
//! it had applied just before), `slow`, `edge_lost`.
//!
//! **Blindness is not an outage.** A region this coordinator cannot see reads `unknown`
//! with the reason, never `down`: `peer_silent` when its edges are held by a peer that
//! stopped answering whose lease etcd has not dropped (or etcd cannot be read to tell),
//! `store_unavailable` when no connected agent is in sight while this coordinator cannot
//! read etcd (agents may be reconnecting to a peer it cannot confirm). `agent_lost` means
//! the agents' coordinator is gone for real — this one, or a peer whose lease expired in
//! an etcd this coordinator reads — and no agent reconnected elsewhere. `unknown` is
//! never news (it pages nobody), and a change formed before or while blind is sent only
//! if it is still true when it would go out: when sight returns, the baseline is what
//! is true then.
//!
//! Changes of a region's health or diagnosis are queued; [`Monitor::run`] sends them
//! to the webhooks once no new change arrived for `group_ms`... or at the latest after
//! `4 x group_ms`, all together in one message, so everything failing at once is one
//! alert, not one per region. Delivery is retried with backoff.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use proto::edge::{Check, ProbePlan, ProbeResult};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
pub mod config;
pub mod ledger;
mod metrics;

use crate::edges::{EdgeRegistry, EdgeView};
use crate::purge::log::PurgeLog;
use crate::store_health::StoreHealth;
use crate::traffic::{Delta, Restart, Traffic};
pub use config::{AlertRule, AlertsConfig, CheckConfig, MonitoringConfig, RuleMetric};

/// Histogram buckets for probe durations (seconds).
pub const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const MINUTES_KEEP: usize = 24 * 60;

/// Health of a check, a target or a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    #[default]
    Unknown,
    Up,
    Degraded,
    Down,
}

/// Why a region is not `up` (or, for a probe, which check says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Diagnosis {
    /// No edge agent ever connected in the region.
    NoAgents,
    /// None is connected now (or they went silent).
    AgentLost,
    /// Probes through varnish fail while the origin answers.
    EdgeDown,
    /// Probes fail and the origin does not answer from this region.
    OriginUnreachable,
    /// The origin does not answer from any region.
    OriginDownEverywhere,
    /// An edge reports it cannot apply its next purge.
    PurgeFailing,
    /// An edge's oldest unapplied purge waited past `monitoring.purge_lag_s`.
    PurgeStalled,
    /// An agent cannot reach its varnishd's admin port.
    VarnishUnreachable,
    /// An edge's varnishd cache process restarted recently (panic or kill): cache lost.
    VarnishRestarted,
    /// Probes answer, slower than the check's `slow_ms`.
    Slow,
    /// Some of the region's edges are disconnected.
    EdgeLost,
    /// An `[[alerts.rules]]` rule on shoppers' served time is breached.
    ShoppersSlow,
    /// An `[[alerts.rules]]` rule on shoppers' 5xx share is breached.
    ShopperErrors,
    /// `unknown`: this coordinator cannot read etcd and sees no connected agent of the
    /// region (they may be on a peer it cannot confirm).
    StoreUnavailable,
    /// `unknown`: the region's edges are held by a peer that stopped answering (its
    /// lease not known to be gone).
    PeerSilent,
}

impl Diagnosis {
    /// The name the API and alerts use.
    pub fn as_str(self) -> &'static str {
        match self {
            Diagnosis::NoAgents => "no_agents",
            Diagnosis::AgentLost => "agent_lost",
            Diagnosis::EdgeDown => "edge_down",
            Diagnosis::OriginUnreachable => "origin_unreachable",
            Diagnosis::OriginDownEverywhere => "origin_down_everywhere",
            Diagnosis::PurgeFailing => "purge_failing",
            Diagnosis::PurgeStalled => "purge_stalled",
            Diagnosis::VarnishUnreachable => "varnish_unreachable",
            Diagnosis::VarnishRestarted => "varnish_restarted",
            Diagnosis::Slow => "slow",
            Diagnosis::EdgeLost => "edge_lost",
            Diagnosis::ShoppersSlow => "shoppers_slow",
            Diagnosis::ShopperErrors => "shopper_errors",
            Diagnosis::StoreUnavailable => "store_unavailable",
            Diagnosis::PeerSilent => "peer_silent",
        }
    }

    /// A diagnosis of blindness: the region is `unknown` to this coordinator.
    pub fn is_blind(self) -> bool {
        matches!(self, Diagnosis::StoreUnavailable | Diagnosis::PeerSilent)
    }
}

impl std::fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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

/// Alert deliveries since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlertCounts {
    pub sent: u64,
    pub failed: u64,
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

/// A region's health as alerts see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionHealth {
    pub health: Health,
    pub diagnosis: Option<Diagnosis>,
    pub check: Option<String>,
    pub last_error: Option<String>,
}

/// One change in an alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub region: String,
    pub previous: Health,
    pub state: Health,
    pub diagnosis: Option<Diagnosis>,
    pub check: Option<String>,
    pub last_error: Option<String>,
    pub at_ms: u64,
}

/// Alerts kept for `GET /api/v1/alerts`.
const ALERTS_KEPT: usize = 50;

/// One grouped alert: its changes, when it went out, and whether every webhook took it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// The same in every delivery of this alert (a new leader resending it, see
    /// `ledger`), and in the webhook's body.
    #[serde(default)]
    pub id: String,
    pub at_ms: u64,
    pub changes: Vec<Change>,
    /// Webhooks that answered 2xx (within the attempts) and those that did not.
    pub delivered: u32,
    pub failed: u32,
}

impl AlertRecord {
    /// A new alert of `changes`, formed now, with a fresh id.
    fn new(changes: Vec<Change>) -> Self {
        AlertRecord {
            id: format!("{:016x}", rand::random::<u64>()),
            at_ms: now_ms(),
            changes,
            delivered: 0,
            failed: 0,
        }
    }
}

struct Inner {
    checks: HashMap<(String, String), RegionCheck>,
    announced: BTreeMap<String, RegionHealth>,
    /// The newest alerts, oldest first.
    history: VecDeque<AlertRecord>,
    pending: Vec<Change>,
    pending_since: Option<u64>,
    last_change: u64,
    sent: u64,
    failed: u64,
}

/// Probe results → health → alerts; share behind an `Arc`.
pub struct Monitor {
    config: MonitoringConfig,
    checks: Vec<CheckConfig>,
    alerts: AlertsConfig,
    regions: Vec<String>,
    edges: Arc<EdgeRegistry>,
    log: PurgeLog,
    /// Per-minute shopper figures, for `[[alerts.rules]]`.
    traffic: Arc<Traffic>,
    started: std::time::Instant,
    /// The cluster's alert ledger in etcd (none with the embedded store).
    ledger: std::sync::OnceLock<ledger::Ledger>,
    /// Whether this coordinator reaches etcd (unset: always, embedded).
    store: std::sync::OnceLock<StoreHealth>,
    inner: Mutex<Inner>,
}

impl Monitor {
    pub fn new(
        config: MonitoringConfig,
        checks: Vec<CheckConfig>,
        alerts: AlertsConfig,
        regions: Vec<String>,
        edges: Arc<EdgeRegistry>,
        log: PurgeLog,
        traffic: Arc<Traffic>,
    ) -> Arc<Self> {
        Arc::new(Monitor {
            config,
            checks,
            alerts,
            regions,
            edges,
            log,
            traffic,
            started: std::time::Instant::now(),
            ledger: std::sync::OnceLock::new(),
            store: std::sync::OnceLock::new(),
            inner: Mutex::new(Inner {
                checks: HashMap::new(),
                announced: BTreeMap::new(),
                history: VecDeque::new(),
                pending: Vec::new(),
                pending_since: None,
                last_change: 0,
                sent: 0,
                failed: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
            origin: self.config.origin.clone().unwrap_or_default(),
        }
    }

    /// Records one result from an edge of `region` whose session this coordinator holds.
    pub fn record(&self, region: &str, result: ProbeResult) {
        self.observe(region, result, true);
    }

    /// Records one result another coordinator of the cluster relayed: it moves the
    /// region's health like an own one (at the next evaluation), and stays out of this
    /// coordinator's probe histograms (each coordinator exports its own agents' probes, so the sum over
    /// coordinators counts each once).
    pub fn record_relayed(&self, region: &str, result: ProbeResult) {
        self.observe(region, result, false);
    }

    fn observe(&self, region: &str, result: ProbeResult, own: bool) {
        let Some(check) = self.checks.iter().find(|c| c.name == result.check) else {
            return; // a check from an older plan
        };
        let (down_after, up_after) = (self.config.failures_to_down, self.config.successes_to_up);
        let slow_ms = f64::from(check.slow_ms);
        let mut inner = self.lock();
        let rc = inner
            .checks
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
        drop(inner);
        // Relayed results come in batches; the drive's tick evaluates them (within
        // 250 ms) instead of once per result.
        if own {
            self.evaluate();
        }
    }

    /// Every region's health now.
    pub fn health(&self) -> BTreeMap<String, RegionHealth> {
        let inner = self.lock();
        self.health_locked(&inner)
    }

    /// The first `[[alerts.rules]]` rule `region` breaches at `now_ms`, with its words.
    fn rule_breach(&self, region: &str, now_ms: u64) -> Option<(Diagnosis, String)> {
        let rules: Vec<&AlertRule> = self
            .alerts
            .rules
            .iter()
            .filter(|r| r.regions.is_empty() || r.regions.iter().any(|n| n == region))
            .collect();
        let longest = rules.iter().map(|r| r.for_minutes).max()?;
        let this_minute = now_ms / 60_000 * 60_000;
        let from = this_minute.saturating_sub(u64::from(longest) * 60_000);
        let minutes = self.traffic.recent(region, from);
        rules
            .into_iter()
            .find_map(|rule| breached(rule, &minutes, this_minute))
    }

    fn health_locked(&self, inner: &Inner) -> BTreeMap<String, RegionHealth> {
        let edges = self.edges.list_with_lag(&self.log);
        let unseen = self.edges.unseen_peers();
        let store = self
            .store
            .get()
            .map(StoreHealth::get)
            .filter(|r| r.reachable == Some(false));
        let mut names: std::collections::BTreeSet<String> = self.regions.iter().cloned().collect();
        names.extend(edges.iter().map(|e| e.region.clone()));
        names.extend(inner.checks.keys().map(|(r, _)| r.clone()));
        // Origin health per region (worst over checks), for the "everywhere" diagnosis.
        let mut origin_by_region: BTreeMap<&str, Health> = BTreeMap::new();
        for ((r, _), rc) in &inner.checks {
            if rc.origin.health != Health::Unknown {
                let h = origin_by_region.entry(r.as_str()).or_default();
                *h = (*h).max(rc.origin.health);
            }
        }
        let origin_everywhere_down =
            !origin_by_region.is_empty() && origin_by_region.values().all(|h| *h == Health::Down);
        let lag_limit_s = self.config.purge_lag_s as f64;
        names
            .into_iter()
            .map(|name| {
                let mine: Vec<&EdgeView> = edges.iter().filter(|e| e.region == name).collect();
                if let Some(blind) = blindness(&mine, &unseen, store.as_ref()) {
                    return (name, blind);
                }
                let mut worst: Option<(&String, &RegionCheck)> = None;
                for ((r, c), rc) in &inner.checks {
                    if *r == name && worst.is_none_or(|(_, w)| rc.edge.health > w.edge.health) {
                        worst = Some((c, rc));
                    }
                }
                let probe = worst.map(|(check, rc)| ProbeHealth {
                    check: check.clone(),
                    edge: rc.edge.health,
                    origin: rc.origin.health,
                    last_error: rc.edge.last_error(),
                });
                let breach = self.rule_breach(&name, now_ms());
                let restart = self.recent_restart(&name);
                let h = decide(
                    &mine,
                    probe,
                    breach,
                    restart.as_ref(),
                    origin_everywhere_down,
                    lag_limit_s,
                );
                (name, h)
            })
            .collect()
    }

    /// The newest varnishd restart among `region`'s edges within `varnish_restart_s`.
    pub fn recent_restart(&self, region: &str) -> Option<Restart> {
        if self.config.varnish_restart_s == 0 {
            return None;
        }
        let window_ms = self.config.varnish_restart_s.saturating_mul(1000);
        self.traffic
            .restarts_since(region, now_ms().saturating_sub(window_ms))
            .into_iter()
            .next()
    }

    /// Per region, every check's view.
    pub fn probes(&self, region: &str) -> Vec<ProbeView> {
        let inner = self.lock();
        let mut out: Vec<ProbeView> = inner
            .checks
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

    /// A region's per-minute response times for one check.
    pub fn minutes(&self, region: &str) -> BTreeMap<String, Vec<MinuteStats>> {
        let inner = self.lock();
        inner
            .checks
            .iter()
            .filter(|((r, _), _)| r == region)
            .map(|((_, c), rc)| (c.clone(), rc.minutes.iter().copied().collect()))
            .collect()
    }

    /// Compares health with what was last announced and queues changes.
    pub fn evaluate(&self) {
        let mut inner = self.lock();
        let now = now_ms();
        let current = self.health_locked(&inner);
        for (region, h) in current {
            let previous = inner.announced.get(&region).cloned();
            let prev_health = previous.as_ref().map(|p| p.health).unwrap_or_default();
            let changed = previous.as_ref() != Some(&h);
            if !changed {
                continue;
            }
            // Agents are still dialling in: not news yet (the state itself is shown).
            let starting = self.started.elapsed().as_secs() < self.config.startup_grace_s;
            if starting && previous.is_none() && h.diagnosis == Some(Diagnosis::NoAgents) {
                continue;
            }
            // Unknown -> up (a region coming online) is not news; the rest is.
            let coming_up = prev_health == Health::Unknown && h.health <= Health::Up;
            let newsworthy = !coming_up
                && h.health != Health::Unknown
                && (prev_health != h.health
                    || h.diagnosis != previous.as_ref().and_then(|p| p.diagnosis));
            if newsworthy {
                inner.pending.push(Change {
                    region: region.clone(),
                    previous: prev_health,
                    state: h.health,
                    diagnosis: h.diagnosis,
                    check: h.check.clone(),
                    last_error: h.last_error.clone(),
                    at_ms: now,
                });
                inner.pending_since.get_or_insert(now);
                inner.last_change = now;
            }
            inner.announced.insert(region, h);
        }
    }

    /// Whether `change` is still what the region shows now (what a change formed
    /// earlier must be to go out: no page replays what is no longer true).
    fn still_true(inner: &Inner, change: &Change) -> bool {
        inner
            .announced
            .get(&change.region)
            .is_some_and(|h| h.health == change.state && h.diagnosis == change.diagnosis)
    }

    /// Whether `region` is out of this coordinator's sight now.
    fn blind_now(inner: &Inner, region: &str) -> bool {
        inner
            .announced
            .get(region)
            .is_some_and(|h| h.diagnosis.is_some_and(Diagnosis::is_blind))
    }

    /// The pending changes once they have settled (or waited long enough).
    fn take_due(&self) -> Option<Vec<Change>> {
        let mut inner = self.lock();
        let since = inner.pending_since?;
        let now = now_ms();
        let quiet = now.saturating_sub(inner.last_change) >= self.alerts.group_ms;
        let too_long = now.saturating_sub(since) >= self.alerts.group_ms * 4;
        if !(quiet || too_long) {
            return None;
        }
        inner.pending_since = None;
        // Per region: from the state before the group to its latest state; a region that
        // flapped back within the group is dropped.
        let mut latest: BTreeMap<String, Change> = BTreeMap::new();
        for c in inner.pending.drain(..) {
            match latest.get_mut(&c.region) {
                Some(first) => {
                    let previous = first.previous;
                    *first = Change { previous, ..c };
                }
                None => {
                    latest.insert(c.region.clone(), c);
                }
            }
        }
        // A region that went out of sight since is not paged for what it showed before.
        let changes: Vec<Change> = latest
            .into_values()
            .filter(|c| c.previous != c.state || c.diagnosis.is_some())
            .filter(|c| !Self::blind_now(&inner, &c.region))
            .collect();
        (!changes.is_empty()).then_some(changes)
    }

    /// Webhooks alerts go to.
    pub fn webhook_count(&self) -> usize {
        self.alerts.webhooks.len()
    }

    /// The newest alerts, newest first: this coordinator's own (with the embedded store).
    pub fn recent_alerts(&self) -> Vec<AlertRecord> {
        self.lock().history.iter().rev().cloned().collect()
    }

    /// The cluster's alerts from its ledger in etcd, newest first (`None` with the
    /// embedded store): the same list on every coordinator, whichever leader sent them.
    /// An alert on its way shows no delivery yet. Blocking (it reads etcd).
    pub fn cluster_alerts(&self) -> Option<Result<Vec<AlertRecord>, String>> {
        let ledger = self.ledger.get()?;
        // Known unreachable: no read that could only time out.
        if self.store.get().and_then(StoreHealth::reachable) == Some(false) {
            return Some(Err("etcd is unreachable".into()));
        }
        Some(ledger.entries().map(|entries| {
            entries
                .into_iter()
                .rev()
                .take(ALERTS_KEPT)
                .map(|e| AlertRecord {
                    id: e.id,
                    at_ms: e.at_ms,
                    changes: e.changes,
                    delivered: e.delivered,
                    failed: e.failed,
                })
                .collect()
        }))
    }

    /// Alerts sent and failed (after all attempts).
    pub fn alert_counts(&self) -> AlertCounts {
        let inner = self.lock();
        AlertCounts {
            sent: inner.sent,
            failed: inner.failed,
        }
    }

    /// Histograms per (region, check, target).
    pub fn histograms(&self) -> Vec<ProbeHistogram> {
        let inner = self.lock();
        let mut out = Vec::new();
        for ((r, c), rc) in &inner.checks {
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

    /// Whether this coordinator reaches etcd (`[store] backend = "etcd"`); set once at
    /// start. Without it the store counts as always reachable.
    pub fn set_store_health(&self, store: StoreHealth) {
        let _ = self.store.set(store);
    }

    /// Sends one cluster alert (etcd unreachable / back, `cluster::store_alert`) to every
    /// webhook: not in the ledger (etcd is its subject), not in the region history.
    pub async fn send_cluster_alert(
        &self,
        event: &str,
        text: &str,
        coordinators: Vec<serde_json::Value>,
    ) {
        let client: WebhookClient =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let id = format!("{:016x}", rand::random::<u64>());
        let body = serde_json::json!({
            "id": id,
            "text": text,
            "grouped": false,
            "alerts": [],
            "cluster": {"event": event, "coordinators": coordinators},
        });
        self.deliver_all(&client, &body).await;
    }

    /// Sends `body` to every webhook, counting each delivery; (delivered, failed).
    async fn deliver_all(&self, client: &WebhookClient, body: &serde_json::Value) -> (u32, u32) {
        let (mut delivered, mut failed) = (0, 0);
        for url in &self.alerts.webhooks {
            let ok = deliver(client, url, body, self.alerts.attempts).await;
            let mut inner = self.lock();
            if ok {
                inner.sent += 1;
                delivered += 1;
            } else {
                inner.failed += 1;
                failed += 1;
            }
        }
        (delivered, failed)
    }

    /// The cluster's alert ledger (`[store] backend = "etcd"`); set once at start.
    pub fn set_ledger(&self, ledger: ledger::Ledger) {
        let _ = self.ledger.set(ledger);
    }

    /// Evaluates periodically (agent loss has no probe result) and delivers alerts —
    /// while `leading` is `true` (the cluster's leader; every coordinator keeps evaluating,
    /// so a new leader announces only what changes after it took over, besides what the
    /// last one left unsent: `ledger`).
    pub async fn run(
        self: Arc<Self>,
        leading: tokio::sync::watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let client: WebhookClient =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let mut led = *leading.borrow();
        // When this coordinator last took the lead: what it formed before that as a
        // follower was looked at then.
        let mut took_over_ms = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let leads = *leading.borrow();
            if leads && !led {
                self.take_over(&client, took_over_ms).await;
                took_over_ms = now_ms();
            }
            led = leads;
            self.evaluate();
            let Some(changes) = self.take_due() else {
                continue;
            };
            let mut record = AlertRecord::new(changes);
            tracing::warn!(changes = record.changes.len(), id = %record.id,
                text = %alert_body(&record.id, &record.changes)["text"], "alert");
            if leads {
                self.send(&client, &mut record).await;
            } else {
                tracing::debug!("alert left to the cluster's leader to deliver");
            }
            self.keep(record);
        }
    }

    /// A coordinator that has just become the leader sends what the ledger holds unsent,
    /// then the changes it saw as a follower (since `since_ms`, within the window) that
    /// no ledger entry covers.
    async fn take_over(&self, client: &WebhookClient, since_ms: u64) {
        let Some(ledger) = self.ledger.get() else {
            return;
        };
        let entries = match ledger.entries() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "alert ledger unreadable; alerts the last leader left unsent may be lost");
                return;
            }
        };
        for e in entries.iter().filter(|e| !e.sent) {
            tracing::info!(id = %e.id, changes = e.changes.len(), "sending an alert the last leader did not finish");
            let mut record = AlertRecord {
                id: e.id.clone(),
                at_ms: e.at_ms,
                changes: e.changes.clone(),
                delivered: 0,
                failed: 0,
            };
            self.send(client, &mut record).await;
            self.keep(record);
        }
        let from = now_ms()
            .saturating_sub(ledger::TAKEOVER_WINDOW_MS)
            .max(since_ms);
        // Only what is still true: a change seen while no leader could send it (etcd
        // gone, say) that has passed is not replayed as a page.
        let own: Vec<Change> = {
            let inner = self.lock();
            inner
                .history
                .iter()
                .filter(|r| r.at_ms >= from && r.delivered == 0 && r.failed == 0)
                .flat_map(|r| r.changes.clone())
                .filter(|c| Self::still_true(&inner, c))
                .collect()
        };
        let changes = ledger::uncovered(own, &entries);
        if !changes.is_empty() {
            let mut record = AlertRecord::new(changes);
            tracing::info!(id = %record.id, changes = record.changes.len(), "sending changes seen while the lead changed hands");
            self.send(client, &mut record).await;
            self.keep(record);
        }
    }

    /// Sends `record` to every webhook, recorded in the ledger before and after.
    async fn send(&self, client: &WebhookClient, record: &mut AlertRecord) {
        let mut entry = ledger::Entry {
            id: record.id.clone(),
            at_ms: record.at_ms,
            changes: record.changes.clone(),
            sent: false,
            delivered: 0,
            failed: 0,
        };
        let ledger = self.ledger.get();
        if let Some(l) = ledger {
            if let Err(e) = l.put(&entry) {
                tracing::warn!(id = %record.id, error = %e, "alert not in the ledger; sending it anyway");
            }
        }
        let body = alert_body(&record.id, &record.changes);
        let (delivered, failed) = self.deliver_all(client, &body).await;
        record.delivered += delivered;
        record.failed += failed;
        if let Some(l) = ledger {
            entry.sent = true;
            entry.delivered = record.delivered;
            entry.failed = record.failed;
            let done = l.put(&entry).and_then(|()| l.trim(&l.entries()?));
            if let Err(e) = done {
                tracing::warn!(id = %record.id, error = %e, "alert sent, not marked sent in the ledger");
            }
        }
    }

    /// Keeps `record` for `GET /api/v1/alerts`.
    fn keep(&self, record: AlertRecord) {
        let mut inner = self.lock();
        inner.history.push_back(record);
        while inner.history.len() > ALERTS_KEPT {
            inner.history.pop_front();
        }
    }
}

type WebhookClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<axum::body::Bytes>,
>;

/// A region's worst check, as [`decide`] reads it.
#[derive(Debug, Clone)]
struct ProbeHealth {
    check: String,
    edge: Health,
    origin: Health,
    last_error: Option<String>,
}

/// Whether `rule` is breached by a region's `minutes` (minute start → sums): every minute
/// of the last `for_minutes` over the threshold with at least `min_requests` requests.
/// The minute in progress (`this_minute`) counts once it has `min_requests`; until then
/// the window is the last complete minutes, so a rule does not flap at each minute's
/// start. Returns the diagnosis and its words.
pub fn breached(
    rule: &AlertRule,
    minutes: &BTreeMap<u64, Delta>,
    this_minute: u64,
) -> Option<(Diagnosis, String)> {
    let enough = |m: u64| {
        minutes
            .get(&m)
            .is_some_and(|d| d.served >= rule.min_requests)
    };
    let last = if enough(this_minute) {
        this_minute
    } else {
        this_minute.checked_sub(60_000)?
    };
    let n = u64::from(rule.for_minutes);
    let mut worst = f64::MIN;
    for i in 0..n {
        let m = last.checked_sub(i * 60_000)?;
        let d = minutes.get(&m).filter(|d| d.served >= rule.min_requests)?;
        let value = match rule.metric {
            RuleMetric::ServedMeanMs => d.served_mean_ms()?,
            RuleMetric::Served5xxRatio => d.served_5xx_ratio()?,
        };
        if value <= rule.above {
            return None;
        }
        worst = worst.max(value);
    }
    Some(match rule.metric {
        RuleMetric::ServedMeanMs => (
            Diagnosis::ShoppersSlow,
            format!(
                "rule {}: shoppers served in {worst:.0} ms on average, over {} ms, for {n} min",
                rule.name, rule.above
            ),
        ),
        RuleMetric::Served5xxRatio => (
            Diagnosis::ShopperErrors,
            format!(
                "rule {}: {:.1} % of shoppers' requests answered 5xx, over {:.1} %, for {n} min",
                rule.name,
                worst * 100.0,
                rule.above * 100.0
            ),
        ),
    })
}

/// A region this coordinator cannot see (module docs), from its `edges` as listed:
/// `unseen` are the peers out of sight, `store` set while etcd cannot be read. `None`:
/// the region is in sight, [`decide`] judges it.
fn blindness(
    edges: &[&EdgeView],
    unseen: &[String],
    store: Option<&crate::store_health::Reach>,
) -> Option<RegionHealth> {
    let held_by_unseen = |e: &&&EdgeView| {
        e.coordinator
            .as_ref()
            .is_some_and(|c| unseen.iter().any(|u| u == c))
    };
    let hidden: Vec<&str> = edges
        .iter()
        .filter(held_by_unseen)
        .filter_map(|e| e.coordinator.as_deref())
        .collect();
    let seen_connected = edges.iter().any(|e| e.connected && !held_by_unseen(&e));
    if seen_connected {
        return None;
    }
    let unknown = |diagnosis, error: String| RegionHealth {
        health: Health::Unknown,
        diagnosis: Some(diagnosis),
        check: None,
        last_error: Some(error),
    };
    if let Some(peer) = hidden.first() {
        let store = store
            .map(|r| {
                format!(
                    "; etcd cannot be read to tell whether its lease holds ({})",
                    r.error.as_deref().unwrap_or("no answer")
                )
            })
            .unwrap_or_else(|| "; its lease still holds in etcd".into());
        return Some(unknown(
            Diagnosis::PeerSilent,
            format!("the region's edges are held by coordinator {peer}, which has not answered for a while{store}"),
        ));
    }
    store.map(|r| {
        unknown(
            Diagnosis::StoreUnavailable,
            format!(
                "no connected agent in sight and etcd cannot be read to tell where they are ({})",
                r.error.as_deref().unwrap_or("no answer")
            ),
        )
    })
}

/// The one rule for a region's health. `up` needs a connected agent, purges applied
/// within the lag bound and passing probes; the first thing that fails names the state:
///
/// * `down`: `no_agents` (none ever connected), `agent_lost` (none connected now, or
///   silent: the session layer drops a silent one), or the probes' `edge_down`,
///   `origin_unreachable`, `origin_down_everywhere`;
/// * `degraded`: `purge_failing` (an edge reports it cannot apply the next purge),
///   `purge_stalled` (an edge's oldest unapplied purge waited past the bound),
///   `varnish_unreachable` (an agent cannot reach its varnishd's admin port),
///   `varnish_restarted` (`restart`: an edge's varnishd cache process restarted
///   recently, its cache is empty), `slow` (probes), `edge_lost` (some of the region's
///   edges are disconnected).
fn decide(
    edges: &[&EdgeView],
    probe: Option<ProbeHealth>,
    breach: Option<(Diagnosis, String)>,
    restart: Option<&Restart>,
    origin_everywhere_down: bool,
    lag_limit_s: f64,
) -> RegionHealth {
    let state = |health, diagnosis, error: String| RegionHealth {
        health,
        diagnosis: Some(diagnosis),
        check: None,
        last_error: Some(error),
    };
    let from_probe = |p: &ProbeHealth, health, diagnosis| RegionHealth {
        health,
        diagnosis: Some(diagnosis),
        check: Some(p.check.clone()),
        last_error: p.last_error.clone(),
    };
    let connected: Vec<&&EdgeView> = edges.iter().filter(|e| e.connected).collect();
    if edges.is_empty() {
        return state(
            Health::Down,
            Diagnosis::NoAgents,
            "no edge agent has connected in this region".into(),
        );
    }
    if connected.is_empty() {
        return state(
            Health::Down,
            Diagnosis::AgentLost,
            "no connected edge agent in this region".into(),
        );
    }
    if let Some(p) = probe.as_ref().filter(|p| p.edge == Health::Down) {
        let diagnosis = match p.origin {
            Health::Down if origin_everywhere_down => Diagnosis::OriginDownEverywhere,
            Health::Down => Diagnosis::OriginUnreachable,
            _ => Diagnosis::EdgeDown,
        };
        return from_probe(p, Health::Down, diagnosis);
    }
    if let Some(e) = connected.iter().find(|e| e.purge_failing) {
        let error = e.last_error.as_deref().unwrap_or("cannot apply purges");
        return state(
            Health::Degraded,
            Diagnosis::PurgeFailing,
            format!("edge {}: {error}", e.id),
        );
    }
    if let Some(e) = connected
        .iter()
        .find(|e| e.lag_s.is_some_and(|s| s > lag_limit_s))
    {
        return state(
            Health::Degraded,
            Diagnosis::PurgeStalled,
            format!(
                "edge {} is {} purges behind; the oldest has waited {:.0} s",
                e.id,
                e.lag,
                e.lag_s.unwrap_or_default()
            ),
        );
    }
    if let Some(e) = connected.iter().find(|e| e.varnish_error.is_some()) {
        return state(
            Health::Degraded,
            Diagnosis::VarnishUnreachable,
            format!(
                "edge {}: {}",
                e.id,
                e.varnish_error.as_deref().unwrap_or_default()
            ),
        );
    }
    if let Some(r) = restart {
        return state(
            Health::Degraded,
            Diagnosis::VarnishRestarted,
            format!(
                "edge {}: varnishd's cache process {} (its cache is lost); the last purge it had applied: seq {}",
                r.edge,
                if r.panic { "panicked and restarted" } else { "restarted" },
                r.applied_seq
            ),
        );
    }
    if let Some((diagnosis, why)) = breach {
        return state(Health::Degraded, diagnosis, why);
    }
    if let Some(p) = probe.as_ref().filter(|p| p.edge == Health::Degraded) {
        return from_probe(p, Health::Degraded, Diagnosis::Slow);
    }
    if connected.len() < edges.len() {
        let lost: Vec<&str> = edges
            .iter()
            .filter(|e| !e.connected)
            .map(|e| e.id.as_str())
            .collect();
        return state(
            Health::Degraded,
            Diagnosis::EdgeLost,
            format!(
                "{} of {} edges disconnected: {}",
                lost.len(),
                edges.len(),
                lost.join(", ")
            ),
        );
    }
    RegionHealth {
        health: Health::Up,
        diagnosis: None,
        check: probe.map(|p| p.check),
        last_error: None,
    }
}

/// The webhook payload: a Slack-compatible `text` and the structured changes.
pub fn alert_body(id: &str, changes: &[Change]) -> serde_json::Value {
    let icon = |h: Health| match h {
        Health::Down => "🔴",
        Health::Degraded => "🟠",
        Health::Up => "🟢",
        Health::Unknown => "⚪",
    };
    let everywhere = changes.len() > 1
        && changes
            .iter()
            .all(|c| c.diagnosis == Some(Diagnosis::OriginDownEverywhere));
    let mut text = if everywhere {
        format!(
            "🔴 origin down everywhere: {} regions cannot reach it\n",
            changes.len()
        )
    } else {
        String::new()
    };
    for c in changes {
        text.push_str(&format!(
            "{} {}: {:?} → {:?}{}{}{}\n",
            icon(c.state),
            c.region,
            c.previous,
            c.state,
            c.diagnosis.map(|d| format!(" ({d})")).unwrap_or_default(),
            c.check
                .as_ref()
                .map(|k| format!(", check {k}"))
                .unwrap_or_default(),
            c.last_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default(),
        ));
    }
    serde_json::json!({ "id": id, "text": text.trim_end(), "grouped": changes.len() > 1, "alerts": changes })
}

async fn deliver(
    client: &WebhookClient,
    url: &str,
    body: &serde_json::Value,
    attempts: u32,
) -> bool {
    let payload = axum::body::Bytes::from(body.to_string());
    for attempt in 0..attempts {
        let req = hyper::Request::post(url)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(payload.clone()));
        let Ok(req) = req else {
            tracing::error!(url, "bad webhook URL");
            return false;
        };
        match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => return true,
            Ok(Ok(resp)) => tracing::warn!(
                url,
                status = resp.status().as_u16(),
                attempt,
                "webhook refused the alert"
            ),
            Ok(Err(e)) => tracing::warn!(url, error = %e, attempt, "webhook unreachable"),
            Err(_) => tracing::warn!(url, attempt, "webhook timed out"),
        }
        tokio::time::sleep(Duration::from_millis(500) * 2u32.pow(attempt.min(6))).await;
    }
    tracing::error!(url, "alert not delivered after all attempts");
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edges::EdgeHello;

    fn hello(id: &str, region: &str) -> EdgeHello {
        EdgeHello {
            id: id.into(),
            region: region.into(),
            varnish_version: String::new(),
            purge_mode: String::new(),
            agent_version: String::new(),
            cert_not_after: None,
        }
    }

    fn monitor() -> (Arc<Monitor>, Arc<EdgeRegistry>) {
        let edges = Arc::new(EdgeRegistry::default());
        let shutdown = CancellationToken::new();
        for (id, region) in [("a-1", "a"), ("b-1", "b")] {
            edges.connect(hello(id, region), 0, &shutdown);
        }
        let check = CheckConfig {
            name: "health".into(),
            path: "/".into(),
            host: "x".into(),
            expect_status: 200,
            body_contains: None,
            interval_ms: 1000,
            timeout_ms: 1000,
            slow_ms: 100,
        };
        let m = Monitor::new(
            MonitoringConfig::default(),
            vec![check],
            AlertsConfig::default(),
            vec!["a".into(), "b".into()],
            edges.clone(),
            test_log(),
            Arc::default(),
        );
        (m, edges)
    }

    fn minute(served: u64, mean_ms: u64, errors: u64) -> Delta {
        Delta {
            served,
            served_time_us: served * mean_ms * 1000,
            served_time_sq_ms: (served * mean_ms * mean_ms) as f64,
            served_5xx: errors,
            ..Delta::default()
        }
    }

    #[test]
    fn rules_need_every_minute_of_the_window_and_enough_requests() {
        let rule = AlertRule {
            name: "slow".into(),
            metric: RuleMetric::ServedMeanMs,
            above: 500.0,
            for_minutes: 2,
            min_requests: 10,
            regions: vec![],
        };
        let now = 10 * 60_000;
        let at = |m: u64| now - m * 60_000;
        let mut minutes = BTreeMap::new();
        minutes.insert(at(2), minute(50, 900, 0));
        minutes.insert(at(1), minute(50, 800, 0));
        // Two slow complete minutes; the one in progress has too few requests to count.
        minutes.insert(at(0), minute(3, 10, 0));
        let (d, why) = breached(&rule, &minutes, now).expect("breached");
        assert_eq!(d, Diagnosis::ShoppersSlow);
        assert!(why.contains("900 ms") && why.contains("2 min"), "{why}");
        // The minute in progress, once it has enough requests, decides with the last one.
        minutes.insert(at(0), minute(20, 100, 0));
        assert_eq!(breached(&rule, &minutes, now), None);
        // A gap (no traffic) is no breach.
        minutes.remove(&at(0));
        minutes.remove(&at(1));
        assert_eq!(breached(&rule, &minutes, now), None);
        // 5xx share.
        let errors = AlertRule {
            metric: RuleMetric::Served5xxRatio,
            above: 0.05,
            for_minutes: 1,
            ..rule
        };
        let mut m = BTreeMap::new();
        m.insert(now, minute(100, 10, 7));
        let (d, why) = breached(&errors, &m, now).expect("breached");
        assert_eq!(d, Diagnosis::ShopperErrors);
        assert!(why.contains("7.0 %"), "{why}");
        m.insert(now, minute(100, 10, 5));
        assert_eq!(breached(&errors, &m, now), None, "5 % is not over 5 %");
    }

    fn test_log() -> PurgeLog {
        let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
        PurgeLog::open(
            dir.path(),
            crate::purge::log::Retention {
                max_entries: 1000,
                max_age: Duration::from_secs(3600),
            },
        )
        .unwrap()
    }

    fn view(id: &str, connected: bool) -> EdgeView {
        EdgeView {
            connected,
            applied_seq: 10,
            ..EdgeView::new(id, "a")
        }
    }

    #[test]
    fn failing_purges_are_news() {
        let (m, edges) = monitor();
        for r in ["a", "b"] {
            m.record(r, result("edge", true, 10));
        }
        m.evaluate();
        assert!(m.lock().pending.is_empty());
        let handle = edges.connect(hello("a-1", "a"), 0, &CancellationToken::new());
        edges.error(
            &handle,
            1,
            1,
            "varnish admin authentication failed".into(),
            false,
        );
        m.evaluate();
        let pending = m.lock().pending.clone();
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert_eq!(
            (pending[0].state, pending[0].diagnosis),
            (Health::Degraded, Some(Diagnosis::PurgeFailing))
        );
    }

    #[test]
    fn one_rule_for_region_health() {
        let d = |edges: &[&EdgeView]| {
            let h = decide(edges, None, None, None, false, 30.0);
            (h.health, h.diagnosis)
        };
        assert_eq!(d(&[]), (Health::Down, Some(Diagnosis::NoAgents)));
        let lost = view("a-1", false);
        assert_eq!(d(&[&lost]), (Health::Down, Some(Diagnosis::AgentLost)));
        let ok = view("a-2", true);
        assert_eq!(d(&[&ok]), (Health::Up, None));
        assert_eq!(
            d(&[&ok, &lost]),
            (Health::Degraded, Some(Diagnosis::EdgeLost))
        );
        let mut failing = view("a-3", true);
        failing.purge_failing = true;
        failing.last_error = Some("varnish admin authentication failed".into());
        assert_eq!(
            d(&[&ok, &failing]),
            (Health::Degraded, Some(Diagnosis::PurgeFailing))
        );
        let mut stalled = view("a-4", true);
        (stalled.lag, stalled.lag_s) = (40, Some(31.0));
        assert_eq!(
            d(&[&stalled]),
            (Health::Degraded, Some(Diagnosis::PurgeStalled))
        );
        stalled.lag_s = Some(29.0);
        assert_eq!(d(&[&stalled]), (Health::Up, None));
        let mut blind = view("a-5", true);
        blind.varnish_error = Some("connection refused".into());
        assert_eq!(
            d(&[&blind]),
            (Health::Degraded, Some(Diagnosis::VarnishUnreachable))
        );
        // Failing probes outrank purge trouble; a lost agent outranks everything.
        let probe = ProbeHealth {
            check: "home".into(),
            edge: Health::Down,
            origin: Health::Up,
            last_error: None,
        };
        let h = decide(&[&failing], Some(probe.clone()), None, None, false, 30.0);
        assert_eq!(
            (h.health, h.diagnosis),
            (Health::Down, Some(Diagnosis::EdgeDown))
        );
        let h = decide(&[&lost], Some(probe), None, None, false, 30.0);
        assert_eq!(h.diagnosis, Some(Diagnosis::AgentLost));
    }

    #[test]
    fn a_varnish_restart_degrades_the_region_naming_the_last_purge_then_clears() {
        let restart = Restart {
            edge: "a-2".into(),
            at_ms: 1,
            panic: true,
            applied_seq: 42,
        };
        let ok = view("a-2", true);
        let h = decide(&[&ok], None, None, Some(&restart), false, 30.0);
        assert_eq!(
            (h.health, h.diagnosis),
            (Health::Degraded, Some(Diagnosis::VarnishRestarted))
        );
        let error = h.last_error.unwrap_or_default();
        assert!(
            error.contains("a-2") && error.contains("panicked") && error.contains("seq 42"),
            "{error}"
        );
        // Purge trouble on the same region is named first.
        let mut failing = view("a-3", true);
        failing.purge_failing = true;
        let h = decide(&[&ok, &failing], None, None, Some(&restart), false, 30.0);
        assert_eq!(h.diagnosis, Some(Diagnosis::PurgeFailing));

        // Through the monitor: counters showing the restart, then the window passing.
        let edges = Arc::new(EdgeRegistry::default());
        edges.connect(hello("a-1", "a"), 0, &CancellationToken::new());
        let traffic: Arc<Traffic> = Arc::default();
        let m = Monitor::new(
            MonitoringConfig {
                varnish_restart_s: 2,
                ..MonitoringConfig::default()
            },
            vec![],
            AlertsConfig::default(),
            vec!["a".into()],
            edges,
            test_log(),
            traffic.clone(),
        );
        let sample = |taken_at_ms, uptime_s, child_panics| proto::edge::VarnishStats {
            taken_at_ms,
            uptime_s,
            child_panics,
            applied_seq: 5,
            ..Default::default()
        };
        let now = now_ms();
        traffic.record("a-1", "a", sample(now - 1_000, 500, 0));
        assert_eq!(m.health()["a"].health, Health::Up);
        traffic.record("a-1", "a", sample(now, 1, 1));
        let h = &m.health()["a"];
        assert_eq!(h.diagnosis, Some(Diagnosis::VarnishRestarted));
        assert!(h
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("seq 5"));
        assert_eq!(m.recent_restart("a").map(|r| r.applied_seq), Some(5));
        std::thread::sleep(Duration::from_millis(2_100));
        assert_eq!(m.health()["a"].health, Health::Up, "it clears by itself");
    }

    fn result(target: &str, ok: bool, ms: u32) -> ProbeResult {
        ProbeResult {
            check: "health".into(),
            target: target.into(),
            ok,
            status: if ok { 200 } else { 0 },
            total_us: ms * 1000,
            ttfb_us: ms * 500,
            error: if ok {
                String::new()
            } else {
                "connect refused".into()
            },
            at_ms: {
                // One instant for every result of a test run: they share one minute.
                static AT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
                *AT.get_or_init(now_ms)
            },
            ..Default::default()
        }
    }

    #[test]
    fn relayed_results_move_health_and_stay_out_of_this_coordinators_histograms() {
        let (m, _) = monitor();
        m.record("a", result("edge", true, 10));
        // Region a's other edge is held by another coordinator: its results arrive
        // relayed, and they count for the region's health like an own one's.
        for _ in 0..3 {
            m.record_relayed("a", result("edge", false, 0));
        }
        let h = &m.health()["a"];
        assert_eq!(
            (h.health, h.diagnosis),
            (Health::Down, Some(Diagnosis::EdgeDown))
        );
        assert_eq!(
            m.probes("a")[0].last_error.as_deref(),
            Some("connect refused")
        );
        // /metrics counts only the one result this coordinator's own agent sent.
        let edge = m
            .histograms()
            .into_iter()
            .find(|h| h.region == "a" && h.target == "edge")
            .expect("a histogram for region a");
        assert_eq!(edge.durations.count, 1);
    }

    #[test]
    fn thresholds_diagnosis_and_stats() {
        let (m, _) = monitor();
        for r in ["a", "b"] {
            m.record(r, result("edge", true, 10));
            m.record(r, result("origin", true, 10));
        }
        assert_eq!(m.health()["a"].health, Health::Up);
        // Two failures change nothing; the third makes it down: the edge, not the origin.
        m.record("a", result("edge", false, 0));
        m.record("a", result("edge", false, 0));
        assert_eq!(m.health()["a"].health, Health::Up);
        m.record("a", result("edge", false, 0));
        let h = &m.health()["a"];
        assert_eq!(
            (h.health, h.diagnosis),
            (Health::Down, Some(Diagnosis::EdgeDown))
        );
        // One success is not enough to recover; two are.
        m.record("a", result("edge", true, 10));
        assert_eq!(m.health()["a"].health, Health::Down);
        m.record("a", result("edge", true, 30));
        assert_eq!(m.health()["a"].health, Health::Up);
        // Slow answers degrade.
        for _ in 0..3 {
            m.record("b", result("edge", true, 500));
        }
        assert_eq!(m.health()["b"].health, Health::Degraded);
        let minute = m.probes("a")[0].minute.unwrap();
        assert_eq!(minute.count, 3);
        assert!((minute.mean_ms - 50.0 / 3.0).abs() < 1e-9);
        assert!(minute.std_ms > 0.0);
        assert!((minute.ttfb_mean_ms - 25.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn origin_down_everywhere_is_one_grouped_change_set() {
        let (m, _) = monitor();
        for r in ["a", "b"] {
            m.record(r, result("edge", true, 10));
            m.record(r, result("origin", true, 10));
        }
        m.evaluate();
        for _ in 0..3 {
            for r in ["a", "b"] {
                m.record(r, result("edge", false, 0));
                m.record(r, result("origin", false, 0));
            }
        }
        let h = m.health();
        assert!(
            h.values()
                .all(|h| h.diagnosis == Some(Diagnosis::OriginDownEverywhere)),
            "{h:?}"
        );
        {
            let mut inner = m.lock();
            inner.last_change = 0; // settled
        }
        let changes = m.take_due().unwrap();
        assert_eq!(changes.len(), 2);
        let body = alert_body("x", &changes);
        assert!(body["text"]
            .as_str()
            .unwrap()
            .starts_with("🔴 origin down everywhere"));
        assert_eq!(body["grouped"], true);
        assert!(m.take_due().is_none());
    }

    #[tokio::test]
    async fn webhook_delivery_retries_until_accepted() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let seen = seen.clone();
                async move {
                    if seen.fetch_add(1, Ordering::SeqCst) < 2 {
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        axum::http::StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let body = serde_json::json!({"text": "x"});
        assert!(deliver(&client, &format!("http://{addr}/hook"), &body, 4).await);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // Never accepted: gives up after the attempts.
        assert!(!deliver(&client, &format!("http://{addr}/missing"), &body, 2).await);
    }

    #[test]
    fn what_a_coordinator_cannot_see_is_unknown_and_pages_nobody() {
        let (m, edges) = monitor();
        let store = StoreHealth::new();
        store.succeeded();
        m.set_store_health(store.clone());
        for r in ["a", "b"] {
            m.record(r, result("edge", true, 10));
        }
        m.evaluate();
        assert!(m.health().values().all(|h| h.health == Health::Up));
        // a-1's session drops while etcd cannot be read: where it went cannot be told.
        let handle = edges.connect(hello("a-1", "a"), 0, &CancellationToken::new());
        edges.disconnect(&handle);
        store.failed("deadline");
        let h = m.health()["a"].clone();
        assert_eq!(
            (h.health, h.diagnosis),
            (Health::Unknown, Some(Diagnosis::StoreUnavailable))
        );
        assert!(h.last_error.unwrap().contains("deadline"));
        assert_eq!(m.health()["b"].health, Health::Up, "b is in sight");
        m.evaluate();
        assert!(m.lock().pending.is_empty(), "unknown is no news");
        // Sight returns and the agent is really gone: one change, from what is true now.
        store.succeeded();
        m.evaluate();
        let pending = m.lock().pending.clone();
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert_eq!(
            (pending[0].state, pending[0].diagnosis),
            (Health::Down, Some(Diagnosis::AgentLost))
        );
        // Formed, then out of sight again before it went out: not sent.
        store.failed("deadline");
        m.evaluate();
        m.lock().last_change = 0;
        assert!(m.take_due().is_none(), "a blind region is not paged");
        // Up -> unknown -> up: nothing.
        let _back = edges.connect(hello("a-1", "a"), 0, &CancellationToken::new());
        store.succeeded();
        m.evaluate();
        m.lock().last_change = 0;
        assert!(m.take_due().is_none());
    }

    #[test]
    fn a_region_held_by_a_silent_peer_is_unknown_unless_the_peer_is_gone() {
        let mut far = EdgeView::new("c-1", "c");
        far.coordinator = Some("c2".into());
        far.connected = false; // shown so once c2 stopped reporting
        let unseen = vec!["c2".to_owned()];
        let h = blindness(&[&far], &unseen, None).expect("blind");
        assert_eq!(
            (h.health, h.diagnosis),
            (Health::Unknown, Some(Diagnosis::PeerSilent))
        );
        // c2's lease is gone (not in `unseen`): its region is judged, agent_lost.
        assert!(blindness(&[&far], &[], None).is_none());
        let d = decide(&[&far], None, None, None, false, 30.0);
        assert_eq!(d.diagnosis, Some(Diagnosis::AgentLost));
        // An agent in sight elsewhere: the region is judged from it.
        let near = EdgeView::new("c-2", "c");
        assert!(blindness(&[&far, &near], &unseen, None).is_none());
    }

    #[test]
    fn a_lost_agent_is_told_apart() {
        let (m, edges) = monitor();
        m.record("a", result("edge", true, 10));
        let list = edges.list(0);
        assert!(list.iter().all(|e| e.connected));
        // Disconnect a-1 by replacing its session and dropping the new handle's claim.
        let shutdown = CancellationToken::new();
        let handle = edges.connect(hello("a-1", "a"), 0, &shutdown);
        edges.disconnect(&handle);
        let h = &m.health()["a"];
        assert_eq!(
            (h.health, h.diagnosis),
            (Health::Down, Some(Diagnosis::AgentLost))
        );
    }
}
