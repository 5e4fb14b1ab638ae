//! Geo routing: which region should serve a client, answered over JSON
//! (`/api/v1/route`) and to PowerDNS ([`dns`]), and where each region's shoppers come
//! from ([`countries`]).
//!
//! [`Geo`] joins three things: the MaxMind database ([`db::GeoDb`], swapped atomically
//! on change), the regions' coordinates and addresses from `[[regions]]`, and what each
//! region looks like now. That last part is observed by [`Geo::run`] twice a second from
//! the one place that decides health ([`crate::monitor::Monitor::regions`]: each region's
//! health with its connected agents and worst purge lag, [`RegionFacts`]), passed
//! through the `recover_s` hold-down ([`route::Recovery`]) and kept as an immutable
//! snapshot. A lookup reads the snapshot and the database and calls the pure
//! [`route::decide`]; it takes no lock that a slow task holds, and never waits on an
//! edge. A region this coordinator cannot see (`unknown`: a silent peer holds its edges,
//! or etcd cannot be read) keeps its shoppers: blindness is no reason to move them. A
//! drained region ([`crate::maintenance`]) gets `drained` before the hold-down, whatever
//! else is true of it.

pub mod centroids;
pub mod config;
pub mod countries;
pub mod db;
pub mod dns;
pub mod route;

use daemon::sync::{Recover, RecoverRw};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics::{collector, counter, counter_value, gauge, gauge_value, Label, Registry};
use crate::monitor::{Health, Monitor, RegionFacts};
pub use config::{DnsConfig, GeoConfig};
pub use countries::{CountryView, NetCount};
use db::{DbError, DbInfo, GeoDb};
use route::{Candidate, Reason, Recovery, RegionState, WhyNot};

/// A region's place and what DNS answers for it (from `[[regions]]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RegionPoint {
    pub name: String,
    pub lat: f64,
    pub lon: f64,
    pub addresses: Vec<IpAddr>,
}

/// `GET /api/v1/route?ip=`: the answer for one client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteView {
    pub ip: IpAddr,
    pub region: String,
    pub addresses: Vec<IpAddr>,
    pub reason: Reason,
    pub distance_km: Option<f64>,
    /// ISO 3166-1 alpha-2, when the database knows the address.
    pub country: Option<String>,
    pub candidates: Vec<Candidate>,
}

/// One region's routing state now (`GET /api/v1/geo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionRouting {
    pub region: String,
    pub eligible: bool,
    pub why_not: Vec<WhyNot>,
    pub addresses: Vec<IpAddr>,
}

/// `GET /api/v1/geo`: whether geo routing is on, the database, and each region's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeoView {
    pub enabled: bool,
    pub database: Option<DbInfo>,
    pub regions: Vec<RegionRouting>,
}

/// All reasons, for the decision counter.
const REASONS: [Reason; 6] = [
    Reason::Nearest,
    Reason::NearestEligible,
    Reason::DefaultRegion,
    Reason::FirstEligible,
    Reason::NearestHealthy,
    Reason::NoRegionEligible,
];

/// Geo routing state; share behind an `Arc`.
pub struct Geo {
    config: GeoConfig,
    dns: Option<DnsConfig>,
    db: GeoDb,
    regions: Vec<RegionPoint>,
    default: usize,
    recovery: Mutex<Recovery>,
    /// The regions as of the last observation (`why_not` per region, config order).
    states: RwLock<Arc<Vec<RegionState>>>,
    decisions: [AtomicU64; REASONS.len()],
    countries: countries::Countries,
    started: std::time::Instant,
    /// Drained regions (unset: none).
    maintenance: OnceLock<Arc<crate::maintenance::Maintenance>>,
}

impl std::fmt::Debug for Geo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Geo").field("db", &self.db).finish()
    }
}

impl Geo {
    /// Opens the database (a missing or unusable file is an error: the caller exits 2).
    /// `regions` is `[[regions]]` in file order; the config checked `default_region`.
    pub fn open(
        config: GeoConfig,
        dns: Option<DnsConfig>,
        regions: Vec<RegionPoint>,
    ) -> Result<Geo, DbError> {
        let db = GeoDb::open(&config.database)?;
        let default = regions
            .iter()
            .position(|r| r.name == config.default_region)
            .unwrap_or(0);
        // Until the first observation nothing is known: no agents anywhere.
        let states = regions
            .iter()
            .map(|r| state_of(r, vec![WhyNot::NoAgents]))
            .collect();
        Ok(Geo {
            recovery: Mutex::new(Recovery::new(Duration::from_secs(config.recover_s))),
            config,
            dns,
            db,
            regions,
            default,
            states: RwLock::new(Arc::new(states)),
            decisions: Default::default(),
            countries: countries::Countries::default(),
            started: std::time::Instant::now(),
            maintenance: OnceLock::new(),
        })
    }

    /// Drains and silences; set once at start.
    pub fn set_maintenance(&self, maintenance: Arc<crate::maintenance::Maintenance>) {
        let _ = self.maintenance.set(maintenance);
    }

    pub fn dns_config(&self) -> Option<&DnsConfig> {
        self.dns.as_ref()
    }

    pub fn database(&self) -> DbInfo {
        self.db.info()
    }

    /// The database and every region's routing state now.
    pub fn view(&self) -> GeoView {
        GeoView {
            enabled: true,
            database: Some(self.db.info()),
            regions: self
                .snapshot()
                .iter()
                .map(|s| RegionRouting {
                    region: s.name.clone(),
                    eligible: s.why_not.is_empty(),
                    why_not: s.why_not.clone(),
                    addresses: s.addresses.clone(),
                })
                .collect(),
        }
    }

    /// Reads the database file again (SIGHUP); the old one stays on failure.
    pub fn reload(&self) -> Result<bool, DbError> {
        self.db.reload()
    }

    /// Where `ip` is, from the database.
    pub fn locate(&self, ip: IpAddr) -> Option<db::Located> {
        self.db.locate(ip)
    }

    fn snapshot(&self) -> Arc<Vec<RegionState>> {
        self.states.read_locked().clone()
    }

    /// The region for `ip` now, with the reason and every candidate.
    pub fn route(&self, ip: IpAddr) -> RouteView {
        let located = self.db.locate(ip);
        let states = self.snapshot();
        let d = route::decide(
            located.as_ref().and_then(|l| l.point),
            &states,
            self.default,
        );
        if let Some(i) = REASONS.iter().position(|r| *r == d.reason) {
            self.decisions[i].fetch_add(1, Ordering::Relaxed);
        }
        RouteView {
            ip,
            region: states[d.region].name.clone(),
            addresses: states[d.region].addresses.clone(),
            reason: d.reason,
            distance_km: d.distance_km,
            country: located.and_then(|l| l.country),
            candidates: d.candidates,
        }
    }

    /// The nearest configured region to a point, whatever its health (what a shopper
    /// there would get on a good day).
    pub fn nearest(&self, point: (f64, f64)) -> Option<(&str, f64)> {
        self.regions
            .iter()
            .map(|r| (r.name.as_str(), route::distance_km(point, (r.lat, r.lon))))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// Takes one observation of every region: `regions` as monitoring judges them (their
    /// health, connected agents and purge lag). `now_s` is seconds on a monotonic clock.
    pub fn observe(&self, regions: &BTreeMap<String, RegionFacts>, now_s: f64) {
        let mut recovery = self.recovery.locked();
        let states = self
            .regions
            .iter()
            .map(|r| {
                let mut problems = problems(&self.config, regions.get(&r.name));
                if self.maintenance.get().is_some_and(|m| m.drained(&r.name)) {
                    problems.insert(0, WhyNot::Drained);
                }
                state_of(r, recovery.observe(&r.name, problems, now_s))
            })
            .collect();
        drop(recovery);
        *self.states.write_locked() = Arc::new(states);
    }

    /// Geolocates one edge's report of its clients.
    pub fn record_clients(&self, region: &str, nets: &[NetCount]) {
        self.countries.record(self, region, nets);
    }

    /// `GET /api/v1/regions/{name}/countries`.
    pub fn countries(&self, region: &str) -> Vec<CountryView> {
        self.countries.view(region)
    }

    /// Observes the regions every second and checks the database file every
    /// `reload_check_s`, until `shutdown`.
    pub async fn run(self: Arc<Self>, monitor: Arc<Monitor>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let check_every = Duration::from_secs(self.config.reload_check_s);
        let mut last_check = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.observe(&monitor.regions(), self.started.elapsed().as_secs_f64());
            if last_check.elapsed() >= check_every {
                last_check = tokio::time::Instant::now();
                let geo = self.clone();
                // Reading and parsing a large database is blocking work.
                match tokio::task::spawn_blocking(move || geo.db.check()).await {
                    Ok(Ok(true)) => {
                        let info = self.db.info();
                        tracing::info!(path = %info.path, database_type = %info.database_type,
                            build_epoch = info.build_epoch, "GeoIP database reloaded");
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e,
                        "GeoIP database changed but cannot be used; keeping the previous one"),
                    Err(e) => tracing::error!(error = %e, "GeoIP reload task failed"),
                }
            }
        }
    }

    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(collector(self.clone(), encode_metrics));
    }
}

fn state_of(r: &RegionPoint, why_not: Vec<WhyNot>) -> RegionState {
    RegionState {
        name: r.name.clone(),
        point: (r.lat, r.lon),
        addresses: r.addresses.clone(),
        why_not,
    }
}

/// What keeps a region from shoppers now, before the recovery hold-down, from what
/// monitoring knows of it (`None`: nothing, no agent ever seen).
fn problems(config: &GeoConfig, region: Option<&RegionFacts>) -> Vec<WhyNot> {
    let Some(region) = region else {
        return vec![WhyNot::NoAgents];
    };
    let mut out = Vec::new();
    // A region out of this coordinator's sight (`unknown`: a silent peer, etcd
    // unreadable) keeps the shoppers it had: not seeing it is no reason to move them.
    if region.blind() {
        return out;
    }
    if region.without_agents() {
        out.push(WhyNot::NoAgents);
    } else if region.health.health == Health::Down {
        out.push(WhyNot::Down);
    }
    if region.behind(config.max_purge_lag, config.max_purge_lag_s) {
        out.push(WhyNot::Stale);
    }
    out
}

fn encode_metrics(geo: &Arc<Geo>, e: &mut DescriptorEncoder) -> std::fmt::Result {
    counter(
        e,
        "coordinator_geo_route_decisions_total",
        "Routing answers (JSON and DNS), by reason.",
        REASONS
            .iter()
            .zip(&geo.decisions)
            .map(|(r, n)| ([("reason", Label(r.as_str()))], n.load(Ordering::Relaxed))),
    )?;
    let states = geo.snapshot();
    gauge(
        e,
        "coordinator_geo_region_eligible",
        "1 when the region gets the shoppers nearest to it (healthy, in sync, not recovering).",
        states.iter().map(|s| {
            (
                [("region", Label(&s.name))],
                u64::from(s.why_not.is_empty()),
            )
        }),
    )?;
    let info = geo.db.info();
    counter_value(
        e,
        "coordinator_geo_database_loads_total",
        "Times the GeoIP database was (re)loaded, the first load included.",
        info.loads,
    )?;
    counter_value(
        e,
        "coordinator_geo_database_reload_errors_total",
        "Reloads that failed; the previous database stayed in use.",
        info.reload_errors,
    )?;
    gauge_value(
        e,
        "coordinator_geo_database_build_timestamp_seconds",
        "When MaxMind built the database in use (Unix seconds).",
        info.build_epoch,
    )?;
    countries::encode(&geo.countries, e)
}

/// The networks of a `ClientNets` report; an entry that is not an address is dropped.
/// Networks beyond the reported ones count as `unknown`.
pub fn client_nets(report: &proto::edge::ClientNets) -> Vec<crate::geo::NetCount> {
    let mut out: Vec<crate::geo::NetCount> = report
        .nets
        .iter()
        .take(MAX_NETS)
        .filter_map(|n| {
            Some(crate::geo::NetCount {
                net: n.net.parse().ok()?,
                hits: n.hits,
                misses: n.misses,
            })
        })
        .collect();
    if report.other_hits > 0 || report.other_misses > 0 {
        out.push(crate::geo::NetCount {
            net: std::net::IpAddr::from([0, 0, 0, 0]),
            hits: report.other_hits,
            misses: report.other_misses,
        });
    }
    out
}

/// Most networks taken from one report (an agent sends at most its `client_nets`).
const MAX_NETS: usize = 4096;

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
