use super::*;
use crate::edges::EdgeView;
use crate::geo::db::tests::test_db;
use crate::monitor::{Diagnosis, RegionHealth};

pub(super) fn geo(recover_s: u64) -> Geo {
    let config = GeoConfig {
        database: test_db("GeoIP2-City-Test"),
        default_region: "us-west".into(),
        max_purge_lag: 10,
        max_purge_lag_s: 5.0,
        recover_s,
        reload_check_s: 2,
    };
    let regions = vec![
        RegionPoint {
            name: "eu-west".into(),
            lat: 53.35,
            lon: -6.26,
            addresses: vec![
                "203.0.113.10".parse().expect("ip"),
                "2001:db8::10".parse().expect("ip"),
            ],
        },
        RegionPoint {
            name: "us-west".into(),
            lat: 47.6,
            lon: -122.3,
            addresses: vec!["203.0.113.20".parse().expect("ip")],
        },
        RegionPoint {
            name: "ap-northeast".into(),
            lat: 35.68,
            lon: 139.69,
            addresses: vec!["203.0.113.30".parse().expect("ip")],
        },
    ];
    Geo::open(config, None, regions).expect("open")
}

fn edge(region: &str, connected: bool, lag: u64, lag_s: Option<f64>) -> EdgeView {
    EdgeView {
        connected,
        lag,
        lag_s,
        ..EdgeView::new(&format!("{region}-1"), region)
    }
}

fn health(states: &[(&str, Health, Option<Diagnosis>)]) -> BTreeMap<String, RegionHealth> {
    states
        .iter()
        .map(|(n, h, d)| {
            (
                n.to_string(),
                RegionHealth {
                    health: *h,
                    diagnosis: *d,
                    check: None,
                    last_error: None,
                },
            )
        })
        .collect()
}

/// What monitoring would say of regions judged `health` whose edges are `edges`.
pub(super) fn facts(
    health: &BTreeMap<String, RegionHealth>,
    edges: &[EdgeView],
) -> BTreeMap<String, RegionFacts> {
    health
        .iter()
        .map(|(name, h)| {
            let mine: Vec<&EdgeView> = edges.iter().filter(|e| e.region == *name).collect();
            (name.clone(), RegionFacts::of(h.clone(), &mine))
        })
        .collect()
}

pub(super) fn all_up() -> BTreeMap<String, RegionHealth> {
    health(&[
        ("eu-west", Health::Up, None),
        ("us-west", Health::Up, None),
        ("ap-northeast", Health::Up, None),
    ])
}

pub(super) fn all_edges() -> Vec<EdgeView> {
    ["eu-west", "us-west", "ap-northeast"]
        .iter()
        .map(|r| edge(r, true, 0, None))
        .collect()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[test]
fn before_any_agent_every_answer_says_so() {
    let g = geo(30);
    let r = g.route(ip("81.2.69.142"));
    assert_eq!(r.reason, Reason::NoRegionEligible);
    assert_eq!(r.region, "eu-west", "still the nearest");
    assert!(r
        .candidates
        .iter()
        .all(|c| c.why_not == vec![WhyNot::NoAgents]));
}

#[test]
fn nearest_per_ip_and_unknown_to_default() {
    let g = geo(30);
    g.observe(&facts(&all_up(), &all_edges()), 0.0);
    let london = g.route(ip("81.2.69.142"));
    assert_eq!(
        (london.region.as_str(), london.reason),
        ("eu-west", Reason::Nearest)
    );
    assert_eq!(london.country.as_deref(), Some("GB"));
    assert_eq!(london.addresses.len(), 2);
    let d = london.distance_km.expect("distance");
    assert!((400.0..500.0).contains(&d), "{d}");
    assert_eq!(g.route(ip("216.160.83.56")).region, "us-west");
    assert_eq!(g.route(ip("175.16.199.7")).region, "ap-northeast");
    assert_eq!(g.route(ip("2001:218::1")).region, "ap-northeast");
    let private = g.route(ip("10.0.0.1"));
    assert_eq!(
        (private.region.as_str(), private.reason),
        ("us-west", Reason::DefaultRegion)
    );
    assert_eq!((private.distance_km, private.country), (None, None));
}

#[test]
fn down_stale_and_recovering_regions_are_skipped() {
    let g = geo(30);
    g.observe(&facts(&all_up(), &all_edges()), 0.0);
    // eu-west's varnishd died: monitoring says down.
    let mut h = all_up();
    h.insert(
        "eu-west".into(),
        health(&[("eu-west", Health::Down, Some(Diagnosis::EdgeDown))])["eu-west"].clone(),
    );
    g.observe(&facts(&h, &all_edges()), 1.0);
    let r = g.route(ip("81.2.69.142"));
    assert_eq!(
        (r.region.as_str(), r.reason),
        ("us-west", Reason::NearestEligible)
    );
    assert_eq!(r.candidates[0].why_not, vec![WhyNot::Down]);
    // Back up: held for recover_s.
    g.observe(&facts(&all_up(), &all_edges()), 2.0);
    let r = g.route(ip("81.2.69.142"));
    assert_eq!(r.candidates[0].why_not, vec![WhyNot::Recovering]);
    assert_eq!(r.region, "us-west");
    g.observe(&facts(&all_up(), &all_edges()), 32.0);
    assert_eq!(g.route(ip("81.2.69.142")).region, "eu-west");

    // Stale by entries, then by seconds; a disconnected edge is health's business.
    let mut edges = all_edges();
    edges[0] = edge("eu-west", true, 11, Some(0.5));
    g.observe(&facts(&all_up(), &edges), 40.0);
    assert_eq!(
        g.route(ip("81.2.69.142")).candidates[0].why_not,
        vec![WhyNot::Stale]
    );
    edges[0] = edge("eu-west", true, 3, Some(6.0));
    g.observe(&facts(&all_up(), &edges), 41.0);
    assert_eq!(
        g.route(ip("81.2.69.142")).candidates[0].why_not,
        vec![WhyNot::Stale]
    );
    edges[0] = edge("eu-west", false, 3, Some(6.0));
    let h = health(&[
        ("eu-west", Health::Down, Some(Diagnosis::AgentLost)),
        ("us-west", Health::Up, None),
        ("ap-northeast", Health::Up, None),
    ]);
    g.observe(&facts(&h, &edges), 42.0);
    assert_eq!(
        g.route(ip("81.2.69.142")).candidates[0].why_not,
        vec![WhyNot::NoAgents]
    );
}

#[test]
fn unknown_client_with_default_down_goes_to_first_eligible() {
    let g = geo(0);
    let h = health(&[
        ("eu-west", Health::Up, None),
        ("us-west", Health::Down, Some(Diagnosis::EdgeDown)),
        ("ap-northeast", Health::Up, None),
    ]);
    g.observe(&facts(&h, &all_edges()), 0.0);
    let r = g.route(ip("127.0.0.1"));
    assert_eq!(
        (r.region.as_str(), r.reason),
        ("eu-west", Reason::FirstEligible)
    );
}

#[test]
fn countries_are_geolocated_and_far_shoppers_flagged() {
    let g = geo(30);
    let nets = [
        NetCount {
            net: ip("175.16.199.0"),
            hits: 8,
            misses: 2,
        },
        NetCount {
            net: ip("2a02:d3c0::"),
            hits: 1,
            misses: 1,
        },
        NetCount {
            net: ip("10.1.2.0"),
            hits: 5,
            misses: 0,
        },
    ];
    g.record_clients("eu-west", &nets);
    g.record_clients("eu-west", &nets[..1]);
    let v = g.countries("eu-west");
    assert_eq!(v[0].country, "CN");
    assert_eq!((v[0].hits, v[0].misses, v[0].requests), (16, 4, 20));
    assert_eq!(v[0].nearest_region.as_deref(), Some("ap-northeast"));
    assert!(v[0].far);
    let gb = v.iter().find(|c| c.country == "GB").expect("GB");
    assert!(!gb.far, "{gb:?}");
    let unknown = v
        .iter()
        .find(|c| c.country == countries::UNKNOWN)
        .expect("unknown");
    assert_eq!((unknown.requests, unknown.mean_distance_km), (5, None));
    assert!(g.countries("us-west").is_empty());
}

#[test]
fn a_region_out_of_sight_keeps_its_shoppers() {
    let g = geo(0);
    // eu-west's edge is held by a silent peer: shown disconnected, health unknown.
    let mut edges = all_edges();
    edges[0] = edge("eu-west", false, 0, None);
    for blind in [Diagnosis::PeerSilent, Diagnosis::StoreUnavailable] {
        let h = health(&[
            ("eu-west", Health::Unknown, Some(blind)),
            ("us-west", Health::Up, None),
            ("ap-northeast", Health::Up, None),
        ]);
        g.observe(&facts(&h, &edges), 0.0);
        let r = g.route(ip("81.2.69.142"));
        assert_eq!(r.region, "eu-west", "{blind}: {r:?}");
        assert!(r.candidates[0].why_not.is_empty(), "{r:?}");
    }
}
