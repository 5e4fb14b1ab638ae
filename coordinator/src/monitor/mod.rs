//! Synthetic monitoring: probe results in, region health and grouped alerts out.
//!
//! Three rooms, each with its own state and lock, tied together by [`Monitor`]:
//!
//! * [`probes`]: every agent probes each `[[checks]]` entry through its varnish (`edge`)
//!   and straight at the origin (`origin`); per region, check and target a small state
//!   machine turns results into `up`, `degraded` or `down`, with per-minute response
//!   times and histograms.
//! * [`health`]: the one rule for a region's health ([`health::decide`]) and the fleet's
//!   ([`fleet_status`]). `up` needs a connected agent, purges applied within
//!   `max_purge_lag_s` and passing probes. Otherwise the diagnosis says why:
//!   `no_agents`, `agent_lost`, `edge_down` (edge fails, origin reachable from there),
//!   `origin_unreachable` (origin fails from this region only), `origin_down_everywhere`
//!   (every region that probes the origin fails it), or, degraded, `purge_failing`,
//!   `purge_stalled`, `varnish_unreachable`, `varnish_restarted` (an edge's varnishd
//!   cache process restarted within `varnish_restart_s`: its cache is empty; the error
//!   names the purge it had applied just before), `slow`, `edge_lost`.
//! * [`alerts`]: changes of a region's health or diagnosis are queued; [`Monitor::run`]
//!   sends them to the webhooks once no new change arrived for `group_ms`, or at the
//!   latest after `4 x group_ms`, all together in one message, so everything failing at
//!   once is one alert, not one per region. Delivery is retried with backoff, and in a
//!   cluster goes through the etcd [`ledger`].
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
//! is true then. The fleet reads `unknown` when a region does and none is worse.
//!
//! Locks: an evaluation takes the alerts' lock, then (inside it) the probes' lock to read
//! their summary; nothing takes them the other way round, and none is held across an
//! `.await`.

use std::collections::BTreeMap;
use std::sync::Arc;

use proto::edge::{ProbePlan, ProbeResult};
use serde::{Deserialize, Serialize};

pub mod alerts;
pub mod config;
pub mod health;
pub mod ledger;
mod metrics;
pub mod probes;

use crate::edges::EdgeRegistry;
use crate::purge::log::PurgeLog;
use crate::store_health::StoreHealth;
use crate::traffic::{Restart, Traffic};
pub use alerts::{alert_body, AlertCounts, AlertRecord};
pub use config::{AlertRule, AlertsConfig, CheckConfig, MonitoringConfig, RuleMetric};
pub use health::{
    breached, fleet_status, Diagnosis, FleetStatus, Health, RegionFacts, RegionHealth,
};
pub use ledger::LedgerError;
pub use probes::{MinuteStats, ProbeHistogram, ProbeView, BUCKETS};

/// One change in an alert (queued by `alerts`, kept in the `ledger`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub region: String,
    pub previous: Health,
    pub state: Health,
    pub diagnosis: Option<Diagnosis>,
    pub check: Option<String>,
    pub last_error: Option<String>,
    pub at_ms: u64,
    /// The diagnosis the region had before (a silence of a diagnosis covers the
    /// recovery from it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_diagnosis: Option<Diagnosis>,
    /// Why the change was not sent to the webhooks (absent: it was, or will be).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<Held>,
    /// The silence that matched it (with `held: silenced`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silence: Option<String>,
}

/// Why a change was listed but paged nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Held {
    /// Its region is drained (`POST /api/v1/regions/{name}/drain`).
    Drained,
    /// A silence in force matched it (`POST /api/v1/silences`).
    Silenced,
}

/// Probe results → health → alerts; share behind an `Arc`.
pub struct Monitor {
    probes: probes::Probes,
    rule: health::HealthRule,
    alerts: alerts::Alerts,
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
        let rule =
            health::HealthRule::new(&config, alerts.rules.clone(), regions, edges, log, traffic);
        Arc::new(Monitor {
            probes: probes::Probes::new(&config, checks),
            rule,
            alerts: alerts::Alerts::new(alerts, config.startup_grace_s),
        })
    }

    /// Whether any check is configured.
    pub fn enabled(&self) -> bool {
        self.probes.enabled()
    }

    /// The plan every agent runs.
    pub fn plan(&self) -> ProbePlan {
        self.probes.plan()
    }

    /// Records one result from an edge of `region` whose session this coordinator holds.
    pub fn record(&self, region: &str, result: ProbeResult) {
        if self.probes.observe(region, result, true) {
            self.evaluate();
        }
    }

    /// Records one result another coordinator of the cluster relayed: it moves the
    /// region's health like an own one (at the next evaluation: relayed results come in
    /// batches, the alert loop's tick evaluates them within 250 ms), and stays out of this
    /// coordinator's probe histograms (each coordinator exports its own agents' probes,
    /// so the sum over coordinators counts each once).
    pub fn record_relayed(&self, region: &str, result: ProbeResult) {
        self.probes.observe(region, result, false);
    }

    /// Every region's health now, with the facts about its edges (what geo routes by).
    pub fn regions(&self) -> BTreeMap<String, RegionFacts> {
        self.rule.regions(&self.probes.summary())
    }

    /// Every region's health now.
    pub fn health(&self) -> BTreeMap<String, RegionHealth> {
        self.regions()
            .into_iter()
            .map(|(name, f)| (name, f.health))
            .collect()
    }

    /// The newest varnishd restart among `region`'s edges within `varnish_restart_s`.
    pub fn recent_restart(&self, region: &str) -> Option<Restart> {
        self.rule.recent_restart(region)
    }

    /// Per region, every check's view.
    pub fn probes(&self, region: &str) -> Vec<ProbeView> {
        self.probes.probes(region)
    }

    /// A region's per-minute response times, per check.
    pub fn minutes(&self, region: &str) -> BTreeMap<String, Vec<MinuteStats>> {
        self.probes.minutes(region)
    }

    /// Histograms per (region, check, target).
    pub fn histograms(&self) -> Vec<ProbeHistogram> {
        self.probes.histograms()
    }

    /// Compares health with what was last announced and queues changes.
    pub fn evaluate(&self) {
        self.alerts.evaluate(|| self.health());
    }

    /// Webhooks alerts go to.
    pub fn webhook_count(&self) -> usize {
        self.alerts.webhook_count()
    }

    /// The newest alerts, newest first: this coordinator's own (with the embedded store).
    pub fn recent_alerts(&self) -> Vec<AlertRecord> {
        self.alerts.recent_alerts()
    }

    /// The cluster's alerts from its ledger in etcd, newest first (`None` with the
    /// embedded store). Blocking (it reads etcd).
    pub fn cluster_alerts(&self) -> Option<Result<Vec<AlertRecord>, LedgerError>> {
        self.alerts.cluster_alerts()
    }

    /// Alerts sent and failed (after all attempts).
    pub fn alert_counts(&self) -> AlertCounts {
        self.alerts.counts()
    }

    /// Whether this coordinator reaches etcd (`[store] backend = "etcd"`); set once at
    /// start. Without it the store counts as always reachable.
    /// What warming sees of the origin, for `origin_down`; set once at start.
    pub fn set_origin_evidence(&self, evidence: health::OriginEvidence) {
        self.rule.set_origin_evidence(evidence);
    }

    pub fn set_store_health(&self, store: StoreHealth) {
        self.rule.set_store_health(store.clone());
        self.alerts.set_store_health(store);
    }

    /// Drains and silences (what holds alerts); set once at start.
    pub fn set_maintenance(&self, maintenance: Arc<crate::maintenance::Maintenance>) {
        self.alerts.set_maintenance(maintenance);
    }

    /// The cluster's alert ledger (`[store] backend = "etcd"`); set once at start.
    pub fn set_ledger(&self, ledger: ledger::Ledger) {
        self.alerts.set_ledger(ledger);
    }

    /// Sends one cluster alert (etcd unreachable / back, `cluster::store_alert`) to every
    /// webhook: not in the ledger (etcd is its subject), not in the region history.
    pub async fn send_cluster_alert(
        &self,
        event: &str,
        text: &str,
        coordinators: Vec<serde_json::Value>,
    ) {
        self.alerts
            .send_cluster_alert(event, text, coordinators)
            .await;
    }
}

#[cfg(test)]
mod tests;
