//! Where each region's shoppers are: agents report their clients' networks (IPv4 /24,
//! IPv6 /48, with hits and misses, the busiest few hundred per interval, warm and probe
//! traffic excluded), and [`Countries`] geolocates each network and adds it to its
//! region's per-country totals.
//!
//! Each country's totals carry the mean distance of its shoppers to the region that
//! served them and the region nearest to them, so a country served from far away (DNS
//! sent it elsewhere, a region was down, a resolver without client subnet) shows up in
//! `GET /api/v1/regions/{name}/countries` and on the dashboard. Memory is bounded by
//! regions × countries (about 250), whatever the clients.

use daemon::sync::Recover;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;

use prometheus_client::encoding::DescriptorEncoder;
use serde::{Deserialize, Serialize};

use crate::metrics::{counter, Label};

/// The label and API value for clients the database does not place.
pub const UNKNOWN: &str = "unknown";

/// One reported client network (as the agent sent it: network address and counts).
#[derive(Debug, Clone, PartialEq)]
pub struct NetCount {
    pub net: IpAddr,
    pub hits: u64,
    pub misses: u64,
}

#[derive(Debug, Default, Clone)]
struct Totals {
    hits: u64,
    misses: u64,
    /// Requests with a known distance, and the sum of those distances.
    placed: u64,
    distance_sum_km: f64,
    nearest: Option<String>,
}

/// One country's share of a region's traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountryView {
    /// ISO 3166-1 alpha-2, or `unknown`.
    pub country: String,
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub hit_ratio: Option<f64>,
    /// Mean distance from these shoppers to this region.
    pub mean_distance_km: Option<f64>,
    /// The region nearest to them (whatever its health).
    pub nearest_region: Option<String>,
    /// True when a nearer region exists: these shoppers are served from afar.
    pub far: bool,
}

/// Per (region, country) totals since the coordinator started.
#[derive(Debug, Default)]
pub struct Countries {
    totals: Mutex<BTreeMap<(String, String), Totals>>,
}

impl Countries {
    pub fn record(&self, geo: &super::Geo, region: &str, nets: &[NetCount]) {
        // Geolocate outside the lock.
        // (country, counts, (nearest region, distance to this one) when placed)
        type Placed<'a> = (String, &'a NetCount, Option<(String, f64)>);
        let here = geo.regions.iter().find(|r| r.name == region);
        let placed: Vec<Placed<'_>> = nets
            .iter()
            .map(|n| {
                let loc = geo.locate(n.net);
                let country = loc
                    .as_ref()
                    .and_then(|l| l.country.clone())
                    .unwrap_or_else(|| UNKNOWN.to_owned());
                let near = loc.and_then(|l| l.point).and_then(|p| {
                    let (nearest, _) = geo.nearest(p)?;
                    let d = here.map(|r| super::route::distance_km(p, (r.lat, r.lon)))?;
                    Some((nearest.to_owned(), d))
                });
                (country, n, near)
            })
            .collect();
        let mut totals = self.totals.locked();
        for (country, n, near) in placed {
            let t = totals.entry((region.to_owned(), country)).or_default();
            t.hits = t.hits.saturating_add(n.hits);
            t.misses = t.misses.saturating_add(n.misses);
            if let Some((nearest, d)) = near {
                let requests = n.hits.saturating_add(n.misses);
                t.placed = t.placed.saturating_add(requests);
                t.distance_sum_km += d * requests as f64;
                t.nearest = Some(nearest);
            }
        }
    }

    /// `region`'s countries, busiest first.
    pub fn view(&self, region: &str) -> Vec<CountryView> {
        let totals = self.totals.locked();
        let mut out: Vec<CountryView> = totals
            .iter()
            .filter(|((r, _), _)| r == region)
            .map(|((_, country), t)| {
                let requests = t.hits + t.misses;
                CountryView {
                    country: country.clone(),
                    requests,
                    hits: t.hits,
                    misses: t.misses,
                    hit_ratio: (requests > 0).then(|| t.hits as f64 / requests as f64),
                    mean_distance_km: (t.placed > 0)
                        .then(|| (t.distance_sum_km / t.placed as f64).round()),
                    far: t.nearest.as_deref().is_some_and(|n| n != region),
                    nearest_region: t.nearest.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.country.cmp(&b.country)));
        out
    }
}

pub(super) fn encode(countries: &Countries, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let totals = countries.totals.locked();
    let samples = totals.iter().flat_map(|((region, country), t)| {
        [("hit", t.hits), ("miss", t.misses)].map(|(cache, n)| {
            (
                [
                    ("region", Label(region)),
                    ("country", Label(country)),
                    ("cache", Label(cache)),
                ],
                n,
            )
        })
    });
    counter(
        e,
        "coordinator_country_requests_total",
        "Shoppers' requests by serving region, client country (GeoIP) and cache result.",
        samples,
    )
}
