//! Geo routing end to end: a real MaxMind database (MaxMind's own test database), real
//! varnishd and agents in three regions, the real coordinator, and a real PowerDNS
//! (`pdns_server` with the remote backend) queried with `dig`. What a shopper's resolver
//! would get follows what `/api/v1/route` says, and both follow health and purge lag.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coordinator::api::views::{name_of, CountryView, RouteView};
use tests::{
    assert_eventually, bin_dir, dig, dig_full, get_json, magento_purge, raw, raw_from, temp_dir,
    Cluster, CoordinatorOpts, CoordinatorProc, Pdns,
};

/// MaxMind's test databases, committed under tests/data/geoip (MIT/Apache-2.0).
pub(crate) fn test_db(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("data/geoip/{name}.mmdb"))
}

pub(crate) const LONDON: &str = "81.2.69.142";
pub(crate) const MILTON_WA: &str = "216.160.83.56";
const CHANGCHUN: &str = "175.16.199.1";

/// Dublin, Seattle, Tokyo, each with documentation addresses for DNS to hand out.
pub(crate) fn region_keys() -> Vec<String> {
    vec![
        "lat = 53.35\nlon = -6.26\naddresses = [\"198.51.100.10\", \"2001:db8:100::10\"]".into(),
        "lat = 47.6\nlon = -122.3\naddresses = [\"198.51.100.20\"]".into(),
        "lat = 35.68\nlon = 139.69\naddresses = [\"198.51.100.30\"]".into(),
    ]
}

pub(crate) fn geo_toml(db: &Path, extra_geo: &str) -> String {
    format!(
        "[geo]\ndatabase = \"{}\"\ndefault_region = \"region-1\"\nmax_purge_lag = 3\nmax_purge_lag_s = 30\nrecover_s = 3\n{extra_geo}\n\
         [dns]\nlisten = \"{{dns}}\"\nzone = \"shop.test.\"\nnames = [\"www\", \"@\"]\nttl = 20\n",
        db.display()
    )
}

pub(crate) async fn route(c: &CoordinatorProc, ip: &str) -> RouteView {
    let r = c.call("GET", &format!("/api/v1/route?ip={ip}"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("route view: {e}: {}", r.body))
}

pub(crate) fn why_not(view: &RouteView, region: &str) -> Vec<String> {
    view.candidates
        .iter()
        .find(|c| c.region == region)
        .map(|c| c.why_not.iter().map(name_of).collect())
        .unwrap_or_default()
}

/// What pdns answers `www.shop.test A` for a client in `subnet`.
pub(crate) async fn dns_a(pdns: SocketAddr, subnet: Option<&str>) -> Vec<String> {
    dig(pdns, "www.shop.test", "A", subnet).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoppers_go_to_the_nearest_healthy_in_sync_region_over_json_and_real_dns() {
    let extra = format!(
        "[monitoring]\norigin = \"{{origin}}\"\nfailures_to_down = 2\nsuccesses_to_up = 2\n\
         [[checks]]\nname = \"health\"\npath = \"/health_check.php\"\ninterval_ms = 300\ntimeout_ms = 1000\nslow_ms = 5000\n{}",
        geo_toml(&test_db("GeoIP2-City-Test"), "")
    );
    let mut cluster = Cluster::start(
        3,
        "ban",
        CoordinatorOpts {
            extra,
            region_keys: region_keys(),
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let c = &cluster.coordinator;
    assert_eventually!(
        20,
        route(c, LONDON).await.reason == coordinator::geo::route::Reason::Nearest,
        "London not routed as nearest: {:?}",
        route(c, LONDON).await
    );

    // Nearest region per client; unknown clients to the default.
    let london = route(c, LONDON).await;
    assert_eq!(
        (london.region.as_str(), london.country.as_deref()),
        ("region-0", Some("GB"))
    );
    assert!(
        london
            .distance_km
            .is_some_and(|d| (400.0..500.0).contains(&d)),
        "{london:?}"
    );
    assert_eq!(london.candidates.len(), 3);
    assert!(london.candidates.iter().all(|c| c.eligible), "{london:?}");
    assert_eq!(route(c, MILTON_WA).await.region, "region-1");
    assert_eq!(route(c, CHANGCHUN).await.region, "region-2");
    assert_eq!(
        route(c, "2001:218::1").await.region,
        "region-2",
        "Japan over IPv6"
    );
    let private = route(c, "10.1.2.3").await;
    assert_eq!(
        (private.region.as_str(), name_of(&private.reason).as_str()),
        ("region-1", "default_region")
    );
    assert_eq!((private.distance_km, private.country), (None, None));
    let bad = c.call("GET", "/api/v1/route?ip=not-an-ip", None).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap_or("")
            .contains("not-an-ip"),
        "{}",
        bad.body
    );
    let (code, out, err) = c.cli(&["route", LONDON]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("region-0 (nearest)") && out.contains("country GB"),
        "{out}"
    );
    assert!(
        out.lines().filter(|l| l.starts_with("region-")).count() == 3,
        "{out}"
    );

    // A real PowerDNS in front: the answers follow the JSON answers.
    let backend = c.dns.expect("dns backend address");
    let pdns = Pdns::start(&cluster.dir.path().join("pdns"), backend).await;
    for (ip, region_addr) in [
        (LONDON, "198.51.100.10"),
        (MILTON_WA, "198.51.100.20"),
        (CHANGCHUN, "198.51.100.30"),
    ] {
        let subnet = format!("{ip}/32");
        assert_eq!(
            dns_a(pdns.addr, Some(&subnet)).await,
            vec![region_addr.to_owned()],
            "{ip}"
        );
        let json = route(c, ip).await;
        assert_eq!(
            json.addresses.first(),
            Some(&region_addr.parse::<IpAddr>().expect("ip"))
        );
    }
    // Without a client subnet the resolver (127.0.0.1, unplaced) gets the default region.
    assert_eq!(
        dns_a(pdns.addr, None).await,
        vec!["198.51.100.20".to_owned()]
    );
    assert_eq!(
        dig(pdns.addr, "www.shop.test", "AAAA", Some("81.2.69.142/32")).await,
        vec!["2001:db8:100::10".to_owned()]
    );
    let soa = dig(pdns.addr, "shop.test", "SOA", None).await;
    assert_eq!(soa.len(), 1, "{soa:?}");
    assert_eq!(
        soa[0].split_whitespace().count(),
        7,
        "all seven SOA fields: {soa:?}"
    );
    assert!(
        soa[0].starts_with("ns1.shop.test. hostmaster.shop.test. "),
        "{soa:?}"
    );
    assert_eq!(
        dig(pdns.addr, "shop.test", "NS", None).await,
        vec!["ns1.shop.test.".to_owned()]
    );
    assert_eq!(
        dns_a(pdns.addr, Some("81.2.69.142/32")).await,
        dig(pdns.addr, "shop.test", "A", Some("81.2.69.142/32")).await,
        "@ is a name too"
    );
    // The answer is scoped to the client's subnet, so nobody caches it for another.
    let full = dig_full(
        pdns.addr,
        &["www.shop.test", "A", "+subnet=81.2.69.142/32", "+tries=1"],
        None,
    )
    .await;
    assert!(
        full.iter()
            .any(|l| l.contains("CLIENT-SUBNET: 81.2.69.142/32/32")),
        "{full:?}"
    );
    let nx = dig_full(pdns.addr, &["nope.shop.test", "A", "+tries=1"], None).await;
    assert!(nx.iter().any(|l| l.contains("status: NXDOMAIN")), "{nx:?}");

    // Per-country traffic: shoppers behind a load balancer (X-Forwarded-For) in China and
    // Britain, all served by region-0 (Dublin): the Chinese ones are flagged as far.
    let v0 = cluster.varnish[0].http;
    for (xff, n) in [("175.16.199.9", 3), ("2a02:d3c0::5, 10.0.0.1", 2)] {
        for _ in 0..n {
            let req = format!("GET /p/11 HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: {xff}\r\nConnection: close\r\n\r\n");
            let r = raw(v0, req.as_bytes()).await.expect("shopper request");
            assert_eq!(r.status, 200);
        }
    }
    let countries = || async {
        let r = c
            .call("GET", "/api/v1/regions/region-0/countries", None)
            .await;
        serde_json::from_str::<Vec<CountryView>>(&r.body).unwrap_or_default()
    };
    assert_eventually!(
        15,
        countries().await.iter().map(|v| v.requests).sum::<u64>() >= 5,
        "countries: {:?}",
        countries().await
    );
    let v = countries().await;
    let cn = v.iter().find(|v| v.country == "CN").expect("CN");
    assert_eq!((cn.requests, cn.misses, cn.hits), (3, 1, 2), "{v:?}");
    assert!(
        cn.far && cn.nearest_region.as_deref() == Some("region-2"),
        "{cn:?}"
    );
    let gb = v.iter().find(|v| v.country == "GB").expect("GB");
    assert!(!gb.far && gb.requests == 2, "{gb:?}");
    let metrics = c.call("GET", "/metrics", None).await.body;
    assert!(
        metrics.contains("coordinator_country_requests_total{region=\"region-0\",country=\"CN\",cache=\"hit\"} 2"),
        "{}",
        metrics.lines().filter(|l| l.contains("country")).collect::<Vec<_>>().join("\n")
    );

    // Region-0's varnishd dies: London goes elsewhere within the probe thresholds.
    cluster.varnish[0].kill9().await;
    assert_eventually!(
        15,
        route(c, LONDON).await.region != "region-0",
        "London still sent to a dead region: {:?}",
        route(c, LONDON).await
    );
    let away = route(c, LONDON).await;
    assert_eq!(
        (away.region.as_str(), name_of(&away.reason).as_str()),
        ("region-1", "nearest_eligible")
    );
    assert_eq!(why_not(&away, "region-0"), vec!["down"]);
    assert_eq!(
        dns_a(pdns.addr, Some("81.2.69.142/32")).await,
        vec!["198.51.100.20".to_owned()]
    );

    // It comes back: held for recover_s, then London returns.
    cluster.varnish[0].restart().await;
    assert_eventually!(
        20,
        why_not(&route(c, LONDON).await, "region-0") == vec!["recovering"],
        "region-0 not recovering: {:?}",
        route(c, LONDON).await
    );
    assert_eq!(
        route(c, LONDON).await.region,
        "region-1",
        "held down while recovering"
    );
    assert_eventually!(
        10,
        route(c, LONDON).await.region == "region-0",
        "region-0 never got London back: {:?}",
        route(c, LONDON).await
    );
    assert_eq!(
        dns_a(pdns.addr, Some("81.2.69.142/32")).await,
        vec!["198.51.100.10".to_owned()]
    );

    // Region-2's agent freezes while purges arrive: its cache goes stale, so Changchun is
    // sent elsewhere, and gets region-2 back once it caught up (and recover_s passed).
    cluster.agents[2].child.suspend();
    for i in 0..5 {
        let pattern = format!("((^|,)cat_p_{i}(,|$))");
        let r = raw(c.purge, &magento_purge(&pattern)).await.expect("purge");
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eventually!(
        3,
        why_not(&route(c, CHANGCHUN).await, "region-2").contains(&"stale".to_owned()),
        "region-2 not stale: {:?}",
        route(c, CHANGCHUN).await
    );
    let elsewhere = route(c, CHANGCHUN).await;
    assert_ne!(elsewhere.region, "region-2", "{elsewhere:?}");
    assert_ne!(
        dns_a(pdns.addr, Some("175.16.199.1/32")).await,
        vec!["198.51.100.30".to_owned()]
    );
    cluster.agents[2].child.resume();
    assert_eventually!(
        30,
        route(c, CHANGCHUN).await.region == "region-2",
        "region-2 never got Changchun back: {:?}",
        route(c, CHANGCHUN).await
    );
    assert_eq!(
        dns_a(pdns.addr, Some("175.16.199.1/32")).await,
        vec!["198.51.100.30".to_owned()]
    );
    let metrics = c.call("GET", "/metrics", None).await.body;
    for family in [
        "coordinator_geo_route_decisions_total{reason=\"nearest_eligible\"}",
        "coordinator_geo_region_eligible{region=\"region-2\"} 1",
    ] {
        assert!(metrics.contains(family), "{family} missing");
    }
    drop(pdns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_is_replaced_under_a_lookup_loop_without_a_failed_lookup() {
    let dir = temp_dir();
    let db = dir.path().join("GeoIP.mmdb");
    std::fs::copy(test_db("GeoIP2-City-Test"), &db).expect("copy db");
    let regions: String = ["region-0", "region-1", "region-2"]
        .iter()
        .zip(region_keys())
        .map(|(n, k)| format!("\n[[regions]]\nname = \"{n}\"\n{k}\n"))
        .collect();
    let extra = format!("{}{regions}", geo_toml(&db, "reload_check_s = 1"));
    let mut c = CoordinatorProc::start(
        &dir.path().join("coordinator"),
        &CoordinatorOpts {
            extra,
            insecure: true,
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let db_type = |c: &CoordinatorProc| {
        let api = c.api;
        async move {
            get_json(api, "/api/v1/geo").await.unwrap_or_default()["database"]["database_type"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        }
    };
    assert_eq!(db_type(&c).await, "GeoIP2-City");

    // Four clients look London up as fast as they can, each on a new connection.
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut loops = Vec::new();
    for i in 0..4u8 {
        let (api, ok, failed, stop) = (c.api, ok.clone(), failed.clone(), stop.clone());
        loops.push(tokio::spawn(async move {
            let from = Some(IpAddr::from([127, 0, 0, 10 + i]));
            while !stop.is_cancelled() {
                let req = format!("GET /api/v1/route?ip={LONDON} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
                let good = match raw_from(from, api, req.as_bytes()).await {
                    Ok(r) if r.status == 200 => r.json()["country"] == "GB",
                    _ => false,
                };
                let counter = if good { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Replaced by rename (the documented way), back and forth between a City and a
    // Country database; each takes effect within 10 s.
    for (name, db_type_name) in [
        ("GeoLite2-Country-Test", "GeoLite2-Country"),
        ("GeoIP2-City-Test", "GeoIP2-City"),
        ("GeoLite2-Country-Test", "GeoLite2-Country"),
    ] {
        let tmp = dir.path().join("GeoIP.mmdb.tmp");
        std::fs::copy(test_db(name), &tmp).expect("copy");
        std::fs::rename(&tmp, &db).expect("rename");
        assert_eventually!(
            10,
            db_type(&c).await == db_type_name,
            "{name} not picked up"
        );
    }
    // A corrupt file is refused: the previous database stays, the error is counted.
    let tmp = dir.path().join("GeoIP.mmdb.tmp");
    std::fs::write(&tmp, b"\x00\x01 this is not a MaxMind database").expect("write");
    std::fs::rename(&tmp, &db).expect("rename");
    let errors = || async {
        get_json(c.api, "/api/v1/geo").await.unwrap_or_default()["database"]["reload_errors"]
            .as_u64()
            .unwrap_or(0)
    };
    assert_eventually!(10, errors().await >= 1, "corrupt database not reported");
    assert_eq!(
        db_type(&c).await,
        "GeoLite2-Country",
        "kept the previous one"
    );
    let metrics = c.call("GET", "/metrics", None).await.body;
    assert!(
        metrics.contains("coordinator_geo_database_reload_errors_total 1"),
        "{metrics}"
    );
    // SIGHUP re-reads it at once (here: a good file again).
    std::fs::copy(test_db("GeoIP2-City-Test"), &tmp).expect("copy");
    std::fs::rename(&tmp, &db).expect("rename");
    if let Some(pid) = c.child.pid() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP");
    }
    assert_eventually!(10, db_type(&c).await == "GeoIP2-City", "SIGHUP reload");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    for l in loops {
        l.await.expect("lookup loop");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "only {ok} lookups ran");
    assert_eq!(
        failed,
        0,
        "{failed} of {} lookups failed during reloads",
        ok + failed
    );

    // A database missing at start: one clear line and exit 2.
    c.child.kill9().await;
    std::fs::remove_file(&db).expect("remove db");
    let out = std::process::Command::new(bin_dir().join("coordinator"))
        .args(["serve", "--config"])
        .arg(&c.config)
        .arg("--state-dir")
        .arg(&c.state)
        .arg("--insecure")
        .output()
        .expect("run coordinator");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.contains("GeoIP database") && last.contains("GeoIP.mmdb"),
        "{stderr}"
    );
}
