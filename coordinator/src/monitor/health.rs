//! The one rule for region health, and for the fleet's: what `up` needs, what each
//! diagnosis means, which comes first.
//!
//! [`HealthRule::regions`] judges every region from what it reads (the edge registry
//! with each edge's purge lag, the probes' summary, shoppers' per-minute figures,
//! varnishd restarts, whether etcd answers) through two functions: [`blindness`] (a
//! region this coordinator cannot see is `unknown`, never `down`) and the pure
//! [`decide`]. [`fleet_status`] folds the regions into one word, the one `/healthz`
//! says and `coordinator status` exits with: `down` > `degraded` > `unknown` > `up`.
//! Geo routing reads the same [`RegionFacts`] (health, connected agents, worst purge
//! lag) instead of deriving them again. The rule keeps no state of its own: it holds
//! only what it reads, so it takes no lock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use super::config::{AlertRule, MonitoringConfig, RuleMetric};
use crate::clock::now_ms;
use crate::edges::{EdgeRegistry, EdgeView};
use crate::purge::log::PurgeLog;
use crate::store_health::{Reach, StoreHealth};
use crate::traffic::{Delta, Restart, Traffic};

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
    /// The region's varnish answers its checks (from its cache) but the origin fails one
    /// straight from the region: shoppers get cached, perhaps stale, pages.
    OriginDown,
    /// An edge reports it cannot apply its next purge.
    PurgeFailing,
    /// An edge's oldest unapplied purge waited past `monitoring.max_purge_lag_s`.
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
            Diagnosis::OriginDown => "origin_down",
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

/// A region's health as alerts see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionHealth {
    pub health: Health,
    pub diagnosis: Option<Diagnosis>,
    pub check: Option<String>,
    pub last_error: Option<String>,
}

/// A region's health with the facts about its edges it was decided from, which geo
/// routing reads too.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionFacts {
    pub health: RegionHealth,
    /// Edges of the region connected now (to any coordinator).
    pub connected: usize,
    /// The most purges a connected edge is behind the log head.
    pub lag: u64,
    /// The longest a connected edge's oldest unapplied purge has waited (seconds).
    pub lag_s: Option<f64>,
}

impl RegionFacts {
    /// The facts of a region whose edges are `edges`, judged `health`.
    pub fn of(health: RegionHealth, edges: &[&EdgeView]) -> Self {
        let connected: Vec<&&EdgeView> = edges.iter().filter(|e| e.connected).collect();
        RegionFacts {
            health,
            connected: connected.len(),
            lag: connected.iter().map(|e| e.lag).max().unwrap_or(0),
            lag_s: connected
                .iter()
                .filter_map(|e| e.lag_s)
                .max_by(f64::total_cmp),
        }
    }

    /// Out of this coordinator's sight (`unknown`: a silent peer, etcd unreadable).
    pub fn blind(&self) -> bool {
        self.health.diagnosis.is_some_and(Diagnosis::is_blind)
    }

    /// No agent serves the region: none connected, `no_agents` or `agent_lost`.
    pub fn without_agents(&self) -> bool {
        self.connected == 0
            || matches!(
                self.health.diagnosis,
                Some(Diagnosis::NoAgents | Diagnosis::AgentLost)
            )
    }

    /// Whether a connected edge is more than `max_purge_lag` entries behind, or its
    /// oldest unapplied purge waited longer than `max_purge_lag_s` seconds.
    pub fn behind(&self, max_purge_lag: u64, max_purge_lag_s: f64) -> bool {
        self.lag > max_purge_lag || self.lag_s.is_some_and(|s| s > max_purge_lag_s)
    }
}

/// The fleet's health in one word: what `/healthz` says in `status` and what
/// `coordinator status` exits with. Ordered by precedence (the worst region wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FleetStatus {
    /// Every region up (or none configured).
    Ok,
    /// Some region is out of this coordinator's sight, none is worse.
    Unknown,
    Degraded,
    Down,
}

/// The one rule for the fleet: `down` > `degraded` > `unknown` > `up` (`ok`). What a
/// coordinator cannot see is `unknown`, never `down` and never `ok`.
pub fn fleet_status(regions: impl IntoIterator<Item = Health>) -> FleetStatus {
    regions
        .into_iter()
        .map(|h| match h {
            Health::Up => FleetStatus::Ok,
            Health::Unknown => FleetStatus::Unknown,
            Health::Degraded => FleetStatus::Degraded,
            Health::Down => FleetStatus::Down,
        })
        .max()
        .unwrap_or(FleetStatus::Ok)
}

/// A region's worst check, as [`decide`] reads it.
#[derive(Debug, Clone)]
pub struct ProbeHealth {
    pub check: String,
    pub edge: Health,
    pub origin: Health,
    pub last_error: Option<String>,
    /// The worst origin health over all the region's checks, and that check's error.
    pub origin_worst: Option<(Health, String, Option<String>)>,
}

/// What the rule reads of the probes: per region its worst check and the worst origin
/// health over its checks (regions whose origin probes say nothing yet left out).
#[derive(Debug, Clone, Default)]
pub struct ProbeSummary {
    pub worst: BTreeMap<String, ProbeHealth>,
    pub origin: BTreeMap<String, Health>,
}

/// The rule and what it reads; it keeps no state of its own.
pub struct HealthRule {
    /// `[monitoring] max_purge_lag_s`.
    max_purge_lag_s: f64,
    /// `[monitoring] varnish_restart_s`.
    varnish_restart_s: u64,
    /// `[[alerts.rules]]`.
    rules: Vec<AlertRule>,
    /// `[[regions]]`: judged even before any agent connects.
    regions: Vec<String>,
    edges: Arc<EdgeRegistry>,
    log: PurgeLog,
    /// Per-minute shopper figures, for `[[alerts.rules]]`.
    traffic: Arc<Traffic>,
    /// Whether this coordinator reaches etcd (unset: always, embedded).
    store: OnceLock<StoreHealth>,
    /// What warming saw of the origin from a region (see [`OriginEvidence`]).
    origin_evidence: OnceLock<OriginEvidence>,
}

/// Per region, why warm or refresh fetches from the origin are failing now (`None`: they
/// are not, or none ran): evidence the probes may not have (a check on
/// `/health_check.php` passes while Magento answers every page 503).
pub type OriginEvidence = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

impl HealthRule {
    pub fn new(
        config: &MonitoringConfig,
        rules: Vec<AlertRule>,
        regions: Vec<String>,
        edges: Arc<EdgeRegistry>,
        log: PurgeLog,
        traffic: Arc<Traffic>,
    ) -> Self {
        HealthRule {
            max_purge_lag_s: config.max_purge_lag_s,
            varnish_restart_s: config.varnish_restart_s,
            rules,
            regions,
            edges,
            log,
            traffic,
            store: OnceLock::new(),
            origin_evidence: OnceLock::new(),
        }
    }

    /// Where the rule reads warming's evidence about the origin; set once at start.
    pub fn set_origin_evidence(&self, evidence: OriginEvidence) {
        let _ = self.origin_evidence.set(evidence);
    }

    /// Whether this coordinator reaches etcd; set once at start.
    pub fn set_store_health(&self, store: StoreHealth) {
        let _ = self.store.set(store);
    }

    /// Every region's health now, with its facts, given the probes' `summary`.
    pub fn regions(&self, probes: &ProbeSummary) -> BTreeMap<String, RegionFacts> {
        let edges = self.edges.list_with_lag(&self.log);
        let unseen = self.edges.unseen_peers();
        let store = self
            .store
            .get()
            .map(StoreHealth::get)
            .filter(|r| r.reachable == Some(false));
        let mut names: BTreeSet<String> = self.regions.iter().cloned().collect();
        names.extend(edges.iter().map(|e| e.region.clone()));
        names.extend(probes.worst.keys().cloned());
        let origin_everywhere_down =
            !probes.origin.is_empty() && probes.origin.values().all(|h| *h == Health::Down);
        names
            .into_iter()
            .map(|name| {
                let mine: Vec<&EdgeView> = edges.iter().filter(|e| e.region == name).collect();
                let health = match blindness(&mine, &unseen, store.as_ref()) {
                    Some(blind) => blind,
                    None => decide(
                        &mine,
                        probes.worst.get(&name).cloned(),
                        self.rule_breach(&name, now_ms())
                            .or_else(|| self.origin_failing(&name)),
                        self.recent_restart(&name).as_ref(),
                        origin_everywhere_down,
                        self.max_purge_lag_s,
                    ),
                };
                let facts = RegionFacts::of(health, &mine);
                (name, facts)
            })
            .collect()
    }

    /// The newest varnishd restart among `region`'s edges within `varnish_restart_s`.
    pub fn recent_restart(&self, region: &str) -> Option<Restart> {
        if self.varnish_restart_s == 0 {
            return None;
        }
        let window_ms = self.varnish_restart_s.saturating_mul(1000);
        self.traffic
            .restarts_since(region, now_ms().saturating_sub(window_ms))
            .into_iter()
            .next()
    }

    /// The first `[[alerts.rules]]` rule `region` breaches at `now_ms`, with its words.
    /// `origin_down` from warming's evidence, when the probes did not see it.
    fn origin_failing(&self, region: &str) -> Option<(Diagnosis, String)> {
        let why = (self.origin_evidence.get()?)(region)?;
        Some((
            Diagnosis::OriginDown,
            format!("warm and refresh fetches from the origin fail ({why}); shoppers get what varnish has cached"),
        ))
    }

    fn rule_breach(&self, region: &str, now_ms: u64) -> Option<(Diagnosis, String)> {
        let rules: Vec<&AlertRule> = self
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

/// A region this coordinator cannot see (module docs of `monitor`), from its `edges` as
/// listed: `unseen` are the peers out of sight, `store` set while etcd cannot be read.
/// `None`: the region is in sight, [`decide`] judges it.
fn blindness(
    edges: &[&EdgeView],
    unseen: &[String],
    store: Option<&Reach>,
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
/// * `degraded`: `origin_down` (the edge answers its checks, from its cache, but the
///   origin fails one straight from the region), `purge_failing` (an edge reports it
///   cannot apply the next purge),
///   `purge_stalled` (an edge's oldest unapplied purge waited past the bound),
///   `varnish_unreachable` (an agent cannot reach its varnishd's admin port),
///   `varnish_restarted` (`restart`: an edge's varnishd cache process restarted
///   recently, its cache is empty), `slow` (probes), `edge_lost` (some of the region's
///   edges are disconnected).
pub(super) fn decide(
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
    if let Some((_, check, error)) = probe
        .as_ref()
        .and_then(|p| p.origin_worst.as_ref())
        .filter(|(h, _, _)| *h == Health::Down)
    {
        return RegionHealth {
            health: Health::Degraded,
            diagnosis: Some(Diagnosis::OriginDown),
            check: Some(check.clone()),
            last_error: Some(format!(
                "the origin fails check {check:?} from this region ({}); shoppers get what varnish has cached",
                error.as_deref().unwrap_or("no answer")
            )),
        };
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::super::tests::{hello, test_log, view};
    use super::super::{AlertsConfig, Monitor};
    use super::*;
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
            origin_worst: None,
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
    fn a_region_answering_from_its_cache_while_the_origin_fails_says_origin_down() {
        let ok = view("a-1", true);
        let cached = ProbeHealth {
            check: "home".into(),
            edge: Health::Up,
            origin: Health::Down,
            last_error: None,
            origin_worst: Some((Health::Down, "home".into(), Some("HTTP 503".into()))),
        };
        let h = decide(&[&ok], Some(cached.clone()), None, None, false, 30.0);
        assert_eq!(
            (h.health, h.diagnosis, h.check.as_deref()),
            (Health::Degraded, Some(Diagnosis::OriginDown), Some("home"))
        );
        assert!(h.last_error.unwrap_or_default().contains("HTTP 503"));
        // The edge failing too is worse: down, and the origin named.
        let failing = ProbeHealth {
            edge: Health::Down,
            ..cached.clone()
        };
        let h = decide(&[&ok], Some(failing), None, None, true, 30.0);
        assert_eq!(
            (h.health, h.diagnosis),
            (Health::Down, Some(Diagnosis::OriginDownEverywhere))
        );
        // A slow origin is not a down one.
        let slow = ProbeHealth {
            origin_worst: Some((Health::Degraded, "home".into(), None)),
            ..cached
        };
        assert_eq!(
            decide(&[&ok], Some(slow), None, None, false, 30.0).health,
            Health::Up
        );
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
    fn the_fleet_is_its_worst_region_and_what_cannot_be_seen_is_unknown() {
        use Health::*;
        let f = |regions: &[Health]| fleet_status(regions.iter().copied());
        assert_eq!(f(&[]), FleetStatus::Ok, "no region: nothing wrong");
        assert_eq!(f(&[Up, Up]), FleetStatus::Ok);
        // Blindness is neither an outage nor fine.
        assert_eq!(f(&[Up, Unknown]), FleetStatus::Unknown);
        assert_eq!(f(&[Unknown]), FleetStatus::Unknown);
        // down > degraded > unknown > up.
        assert_eq!(f(&[Unknown, Degraded, Up]), FleetStatus::Degraded);
        assert_eq!(f(&[Degraded, Down, Unknown]), FleetStatus::Down);
        assert_eq!(f(&[Down, Up]), FleetStatus::Down);
        // What /healthz says.
        let words: Vec<String> = [
            FleetStatus::Ok,
            FleetStatus::Unknown,
            FleetStatus::Degraded,
            FleetStatus::Down,
        ]
        .iter()
        .map(|s| {
            serde_json::to_value(s)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
        assert_eq!(words, ["ok", "unknown", "degraded", "down"]);
    }

    #[test]
    fn the_facts_geo_reads_come_from_the_same_edges() {
        let up = RegionHealth {
            health: Health::Up,
            diagnosis: None,
            check: None,
            last_error: None,
        };
        let mut behind = view("a-1", true);
        (behind.lag, behind.lag_s) = (12, Some(4.0));
        let mut gone = view("a-2", false);
        (gone.lag, gone.lag_s) = (99, Some(99.0));
        let f = RegionFacts::of(up.clone(), &[&behind, &gone]);
        // A disconnected edge's lag is not the region's.
        assert_eq!((f.connected, f.lag, f.lag_s), (1, 12, Some(4.0)));
        assert!(!f.without_agents() && !f.blind());
        assert!(f.behind(10, 30.0) && f.behind(100, 3.0) && !f.behind(100, 30.0));
        let none = RegionFacts::of(up, &[&gone]);
        assert!(none.without_agents());
        let lost = RegionFacts {
            health: decide(&[&gone], None, None, None, false, 30.0),
            ..none
        };
        assert!(lost.without_agents());
    }
}
