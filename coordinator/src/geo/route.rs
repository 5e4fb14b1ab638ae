//! The routing decision, pure: given where a client is and what each region looks like
//! now, which region serves it and why.
//!
//! A region is *eligible* when it is healthy (monitoring does not call it `down`, and it
//! has a connected agent) and in sync (no connected edge is further behind the purge log
//! than `[geo] max_purge_lag` entries or `max_purge_lag_s` seconds), and it is not
//! recovering: [`Recovery`] holds a region that was ineligible out for `recover_s` after
//! it became well again, so a flapping region does not pull shoppers back and forth.
//! A drained region (an operator took it out, `drained`) is never eligible, passes
//! through the same hold-down once undrained, and gets a shopper only when every region
//! is drained.
//! [`decide`] takes the nearest eligible region (great-circle distance, [`distance_km`]),
//! else the nearest healthy one, else the nearest; a client the database does not place
//! goes to the default region (or, when that is ineligible, the first eligible in config
//! order). Every answer names its reason and lists each candidate with its `why_not`.
//!
//! Nothing here reads a clock, a lock or the network: the caller passes the time and the
//! observations, so each rule is a unit test.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Mean Earth radius (IUGG), km.
const EARTH_RADIUS_KM: f64 = 6371.0088;

/// Great-circle distance between two (lat, lon) points in degrees (haversine).
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// Why a region does not get shoppers now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhyNot {
    /// No agent is connected in the region.
    NoAgents,
    /// Monitoring says the region is down.
    Down,
    /// An edge is behind the purge log past the limits (it would serve stale pages).
    Stale,
    /// Well again, but not yet for `recover_s`.
    Recovering,
    /// An operator drained it (`POST /api/v1/regions/{name}/drain`).
    Drained,
}

impl WhyNot {
    /// Only `stale` and `recovering` leave a region serving: the fallback may use it.
    fn healthy(self) -> bool {
        matches!(self, WhyNot::Stale | WhyNot::Recovering)
    }
}

/// Why the answer is the region it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The nearest region, and it is eligible.
    Nearest,
    /// The nearest is not eligible; this is the nearest one that is.
    NearestEligible,
    /// The database does not place the client; the default region is eligible.
    DefaultRegion,
    /// Unplaced client, default region ineligible: the first eligible in config order.
    FirstEligible,
    /// No region is eligible: the nearest healthy one (it may be stale or recovering).
    NearestHealthy,
    /// No region is even healthy: the nearest (or, unplaced, the default).
    NoRegionEligible,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Nearest => "nearest",
            Reason::NearestEligible => "nearest_eligible",
            Reason::DefaultRegion => "default_region",
            Reason::FirstEligible => "first_eligible",
            Reason::NearestHealthy => "nearest_healthy",
            Reason::NoRegionEligible => "no_region_eligible",
        }
    }
}

/// A region as routing sees it at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionState {
    pub name: String,
    pub point: (f64, f64),
    pub addresses: Vec<IpAddr>,
    /// Empty when eligible.
    pub why_not: Vec<WhyNot>,
}

/// One region in an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub region: String,
    pub distance_km: Option<f64>,
    pub eligible: bool,
    pub why_not: Vec<WhyNot>,
}

/// Where a client is (from the database), if it is known.
#[derive(Debug, Clone, PartialEq)]
pub struct Client {
    pub country: Option<String>,
    pub point: Option<(f64, f64)>,
}

/// The decision: region index into the input, reason, distance, all candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub region: usize,
    pub reason: Reason,
    pub distance_km: Option<f64>,
    /// Nearest first (config order for an unplaced client).
    pub candidates: Vec<Candidate>,
}

/// Picks the region for a client. `regions` is in config order and not empty;
/// `default` indexes it.
pub fn decide(client: Option<(f64, f64)>, regions: &[RegionState], default: usize) -> Decision {
    let distances: Vec<Option<f64>> = regions
        .iter()
        .map(|r| client.map(|c| distance_km(c, r.point)))
        .collect();
    let mut order: Vec<usize> = (0..regions.len()).collect();
    if client.is_some() {
        order.sort_by(|&a, &b| {
            let (da, db) = (distances[a].unwrap_or(0.0), distances[b].unwrap_or(0.0));
            da.total_cmp(&db).then(a.cmp(&b))
        });
    }
    let eligible = |i: &usize| regions[*i].why_not.is_empty();
    let healthy = |i: &usize| regions[*i].why_not.iter().all(|w| w.healthy());
    let in_service = |i: &usize| !regions[*i].why_not.contains(&WhyNot::Drained);
    // Nothing eligible or healthy: the first not drained of `order` (or `or`).
    let last_resort = |or: usize| order.iter().copied().find(in_service).unwrap_or(or);
    let (region, reason) = if client.is_some() {
        let nearest = order[0];
        match order.iter().copied().find(eligible) {
            Some(i) if i == nearest => (i, Reason::Nearest),
            Some(i) => (i, Reason::NearestEligible),
            None => match order.iter().copied().find(healthy) {
                Some(i) => (i, Reason::NearestHealthy),
                None => (last_resort(nearest), Reason::NoRegionEligible),
            },
        }
    } else if eligible(&default) {
        (default, Reason::DefaultRegion)
    } else {
        match order.iter().copied().find(eligible) {
            Some(i) => (i, Reason::FirstEligible),
            None => match order.iter().copied().find(healthy) {
                Some(i) => (i, Reason::NearestHealthy),
                None if in_service(&default) => (default, Reason::NoRegionEligible),
                None => (last_resort(default), Reason::NoRegionEligible),
            },
        }
    };
    let candidates = order
        .iter()
        .map(|&i| Candidate {
            region: regions[i].name.clone(),
            distance_km: distances[i].map(|d| (d * 10.0).round() / 10.0),
            eligible: regions[i].why_not.is_empty(),
            why_not: regions[i].why_not.clone(),
        })
        .collect();
    Decision {
        region,
        reason,
        distance_km: distances[region].map(|d| (d * 10.0).round() / 10.0),
        candidates,
    }
}

/// Per region: was it eligible, and since when has it been well again.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// Not yet eligible since start-up (agents still dialling): no hold-down applies.
    Fresh,
    Eligible,
    Ineligible,
    /// Well since this instant (seconds on the caller's clock).
    Recovering(f64),
}

/// The `recover_s` hold-down, per region.
#[derive(Debug, Clone)]
pub struct Recovery {
    hold: f64,
    phases: HashMap<String, Phase>,
}

impl Recovery {
    pub fn new(hold: Duration) -> Self {
        Recovery {
            hold: hold.as_secs_f64(),
            phases: HashMap::new(),
        }
    }

    /// Feeds one observation of `region` at `now_s` (`problems`: what monitoring and the
    /// purge lag say now) and returns the region's `why_not`, `recovering` added when it
    /// is well but held down.
    pub fn observe(&mut self, region: &str, problems: Vec<WhyNot>, now_s: f64) -> Vec<WhyNot> {
        let well = problems.is_empty();
        let phase = self.phases.entry(region.to_owned()).or_insert(Phase::Fresh);
        *phase = match (*phase, well) {
            (Phase::Fresh | Phase::Eligible, true) => Phase::Eligible,
            (Phase::Eligible | Phase::Ineligible | Phase::Recovering(_), false) => {
                Phase::Ineligible
            }
            // Never eligible yet (start-up, agents still dialling): no hold-down.
            (Phase::Fresh, false) => Phase::Fresh,
            (Phase::Ineligible, true) if self.hold <= 0.0 => Phase::Eligible,
            (Phase::Ineligible, true) => Phase::Recovering(now_s),
            (Phase::Recovering(since), true) if now_s - since >= self.hold => Phase::Eligible,
            (Phase::Recovering(since), true) => Phase::Recovering(since),
        };
        match *phase {
            Phase::Recovering(_) => vec![WhyNot::Recovering],
            _ => problems,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUBLIN: (f64, f64) = (53.35, -6.26);
    const VIRGINIA: (f64, f64) = (38.9, -77.0);
    const TOKYO: (f64, f64) = (35.68, 139.69);
    const LONDON: (f64, f64) = (51.51, -0.09);

    fn regions(why: [&[WhyNot]; 3]) -> Vec<RegionState> {
        [("eu-west", DUBLIN), ("us-east", VIRGINIA), ("ap-ne", TOKYO)]
            .iter()
            .zip(why)
            .map(|((n, p), w)| RegionState {
                name: n.to_string(),
                point: *p,
                addresses: vec![],
                why_not: w.to_vec(),
            })
            .collect()
    }

    #[test]
    fn distances_are_great_circle() {
        let d = distance_km(LONDON, DUBLIN);
        assert!((450.0..480.0).contains(&d), "{d}");
        let d = distance_km(DUBLIN, TOKYO);
        assert!((9500.0..9700.0).contains(&d), "{d}");
        assert_eq!(distance_km(TOKYO, TOKYO), 0.0);
        // Antipodes do not overflow asin.
        let d = distance_km((0.0, 0.0), (0.0, 180.0));
        assert!((d - std::f64::consts::PI * EARTH_RADIUS_KM).abs() < 1e-6);
    }

    #[test]
    fn nearest_eligible_wins() {
        let d = decide(Some(LONDON), &regions([&[], &[], &[]]), 0);
        assert_eq!((d.region, d.reason), (0, Reason::Nearest));
        assert_eq!(d.candidates[0].region, "eu-west");
        assert_eq!(d.candidates[2].region, "ap-ne");

        let d = decide(Some(LONDON), &regions([&[WhyNot::Stale], &[], &[]]), 0);
        assert_eq!((d.region, d.reason), (1, Reason::NearestEligible));
        assert_eq!(d.candidates[0].why_not, vec![WhyNot::Stale]);
        assert!(!d.candidates[0].eligible && d.candidates[1].eligible);
    }

    #[test]
    fn fallbacks_say_so() {
        let stale_eu = regions([&[WhyNot::Stale], &[WhyNot::Down], &[WhyNot::NoAgents]]);
        let d = decide(Some(TOKYO), &stale_eu, 0);
        assert_eq!((d.region, d.reason), (0, Reason::NearestHealthy));
        let all_down = regions([
            &[WhyNot::Down],
            &[WhyNot::Down],
            &[WhyNot::Down, WhyNot::Stale],
        ]);
        let d = decide(Some(TOKYO), &all_down, 0);
        assert_eq!((d.region, d.reason), (2, Reason::NoRegionEligible));
    }

    #[test]
    fn unplaced_clients_go_to_the_default() {
        let d = decide(None, &regions([&[], &[], &[]]), 1);
        assert_eq!(
            (d.region, d.reason, d.distance_km),
            (1, Reason::DefaultRegion, None)
        );
        assert_eq!(d.candidates[0].region, "eu-west", "config order");
        let d = decide(None, &regions([&[], &[WhyNot::Down], &[]]), 1);
        assert_eq!((d.region, d.reason), (0, Reason::FirstEligible));
        let d = decide(None, &regions([&[WhyNot::Down]; 3]), 1);
        assert_eq!((d.region, d.reason), (1, Reason::NoRegionEligible));
    }

    #[test]
    fn recovery_holds_a_returning_region_not_a_starting_one() {
        let mut r = Recovery::new(Duration::from_secs(30));
        // Start-up: no agents yet, then well: eligible at once.
        assert_eq!(
            r.observe("eu", vec![WhyNot::NoAgents], 0.0),
            vec![WhyNot::NoAgents]
        );
        assert_eq!(r.observe("eu", vec![], 1.0), vec![]);
        // Goes down, comes back: held for 30 s.
        assert_eq!(
            r.observe("eu", vec![WhyNot::Down], 10.0),
            vec![WhyNot::Down]
        );
        assert_eq!(r.observe("eu", vec![], 20.0), vec![WhyNot::Recovering]);
        assert_eq!(r.observe("eu", vec![], 49.0), vec![WhyNot::Recovering]);
        // A relapse restarts the hold.
        assert_eq!(
            r.observe("eu", vec![WhyNot::Stale], 49.5),
            vec![WhyNot::Stale]
        );
        assert_eq!(r.observe("eu", vec![], 50.0), vec![WhyNot::Recovering]);
        assert_eq!(r.observe("eu", vec![], 79.0), vec![WhyNot::Recovering]);
        assert_eq!(r.observe("eu", vec![], 80.0), vec![]);
        // Regions are independent.
        assert_eq!(r.observe("us", vec![], 80.0), vec![]);
    }

    #[test]
    fn a_drained_region_gets_nobody_while_another_can_serve() {
        let d = decide(Some(LONDON), &regions([&[WhyNot::Drained], &[], &[]]), 0);
        assert_eq!((d.region, d.reason), (1, Reason::NearestEligible));
        assert_eq!(d.candidates[0].why_not, vec![WhyNot::Drained]);
        // Healthy but drained is no fallback; a down region is preferred to it only
        // when nothing else is left.
        let d = decide(
            Some(LONDON),
            &regions([&[WhyNot::Drained], &[WhyNot::Down], &[WhyNot::Down]]),
            0,
        );
        assert_eq!((d.region, d.reason), (1, Reason::NoRegionEligible));
        let d = decide(
            None,
            &regions([&[WhyNot::Down], &[WhyNot::Drained], &[]]),
            1,
        );
        assert_eq!((d.region, d.reason), (2, Reason::FirstEligible));
        let d = decide(
            None,
            &regions([&[WhyNot::Down], &[WhyNot::Drained], &[WhyNot::Down]]),
            1,
        );
        assert_eq!((d.region, d.reason), (0, Reason::NoRegionEligible));
        let d = decide(Some(TOKYO), &regions([&[WhyNot::Drained]; 3]), 0);
        assert_eq!(
            (d.region, d.reason),
            (2, Reason::NoRegionEligible),
            "all drained"
        );
        // Undrained: held for recover_s like any returning region.
        let mut r = Recovery::new(Duration::from_secs(30));
        assert_eq!(r.observe("eu", vec![], 0.0), vec![]);
        assert_eq!(
            r.observe("eu", vec![WhyNot::Drained], 1.0),
            vec![WhyNot::Drained]
        );
        assert_eq!(r.observe("eu", vec![], 2.0), vec![WhyNot::Recovering]);
        assert_eq!(r.observe("eu", vec![], 32.0), vec![]);
    }

    #[test]
    fn zero_hold_means_no_hold() {
        let mut r = Recovery::new(Duration::ZERO);
        r.observe("eu", vec![], 0.0);
        r.observe("eu", vec![WhyNot::Down], 1.0);
        assert_eq!(r.observe("eu", vec![], 2.0), vec![]);
    }
}
