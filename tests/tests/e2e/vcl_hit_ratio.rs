//! The shoppers' hit ratio whatever VCL varnishd runs: the project's bundle (pushed by
//! the coordinator), Debian's `default.vcl` (what an edge boots with before the first
//! push) and Magento's stock VCL (`tests/data/vcl/`). The agent probes a cached page and
//! the health check through its varnish every 200 ms and warms pages; no response tells
//! it a hit from a miss under the last two. With no shopper, the region's ratio stays
//! null in every window (not the probes' 80-100 %) and no shopper request is counted;
//! then one shopper's miss and ten hits read 10/11 in every window.

use std::net::SocketAddr;
use std::path::Path;

use coordinator::api::views::RegionView;
use tests::{assert_eventually, assert_stays, get, Cluster, CoordinatorOpts};

/// Two edge probes: the health check and a cacheable page.
const CHECKS: &str = "[[checks]]\nname = \"health\"\npath = \"/health_check.php\"\ninterval_ms = 200\ntimeout_ms = 1000\nslow_ms = 5000\n\
                      [[checks]]\nname = \"page\"\npath = \"/c/probe\"\nhost = \"shop.test\"\ninterval_ms = 200\ntimeout_ms = 1000\nslow_ms = 5000\n";

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/vcl")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Debian's `default.vcl` pointed at `backend` (it ships with 127.0.0.1:8080).
fn debian_default(backend: SocketAddr) -> String {
    let vcl = fixture("debian-default.vcl");
    assert!(vcl.contains(".host = \"127.0.0.1\";") && vcl.contains(".port = \"8080\";"));
    vcl.replace(
        ".host = \"127.0.0.1\";",
        &format!(".host = \"{}\";", backend.ip()),
    )
    .replace(
        ".port = \"8080\";",
        &format!(".port = \"{}\";", backend.port()),
    )
}

/// Magento's stock VCL with its placeholders filled as `bin/magento varnish:vcl:generate`
/// fills them: backend host and port, the purge access list, the SSL offload header, no
/// design exceptions, 300 s of grace.
fn magento_stock(backend: SocketAddr) -> String {
    let filled = [
        ("/* {{ host }} */", backend.ip().to_string()),
        ("/* {{ port }} */", backend.port().to_string()),
        (
            "/* {{ ips }} */",
            "    \"127.0.0.1\";\n    \"localhost\";".to_owned(),
        ),
        (
            "/* {{ ssl_offloaded_header }} */",
            "X-Forwarded-Proto".to_owned(),
        ),
        ("/* {{ design_exceptions_code }} */", String::new()),
        ("/* {{ grace_period }} */", "300".to_owned()),
    ];
    let mut vcl = fixture("magento-stock.vcl");
    for (placeholder, value) in filled {
        assert!(
            vcl.contains(placeholder),
            "{placeholder} not in the fixture"
        );
        vcl = vcl.replace(placeholder, &value);
    }
    vcl
}

fn opts(extra: &str) -> CoordinatorOpts {
    CoordinatorOpts {
        extra: format!("{CHECKS}{extra}"),
        ..CoordinatorOpts::default()
    }
}

async fn region(cluster: &Cluster) -> RegionView {
    cluster
        .coordinator
        .regions()
        .await
        .remove("region-0")
        .unwrap_or_default()
}

fn no_ratio(r: &RegionView) -> bool {
    let h = r.hit_ratio;
    h.m1.is_none() && h.m5.is_none() && h.h1.is_none()
}

/// The scenario, on a one-region cluster whose varnish runs `vcl` (named in messages).
async fn shoppers_ratio_only(cluster: &Cluster, vcl: &str) {
    let c = &cluster.coordinator;
    let v0 = cluster.varnish[0].http;
    // varnish counts the probes' hits: under this VCL they are cache lookups that hit.
    let mut r;
    assert_eventually!(
        30,
        {
            r = region(cluster).await;
            r.last_minute.as_ref().is_some_and(|m| m.hits >= 20)
        },
        "{vcl}: the probes never hit the cache: {r:?}"
    );
    // The agent's own warm fetches: ten misses, then ten hits.
    for round in 0..2 {
        let urls: Vec<String> = (0..10).map(|i| format!("http://shop.test/w/{i}")).collect();
        let id = c
            .start_warm_job(&serde_json::json!({ "urls": urls, "regions": ["region-0"] }))
            .await;
        let job = c.warm_finished(id, 30).await;
        assert_eq!(job["state"], "done", "{vcl}: warm round {round}: {job}");
    }
    // No shopper: no ratio in any window, no shopper request, however many of the
    // agent's own requests varnish counted.
    assert_stays!(
        4,
        {
            r = region(cluster).await;
            no_ratio(&r)
                && r.requests_per_s == Some(0.0)
                && r.served.requests == 0
                && r.last_minute
                    .as_ref()
                    .is_some_and(|m| m.shopper_hits + m.shopper_misses == 0)
        },
        "{vcl}: the agent's own requests counted as shoppers': {r:?}"
    );
    let last = r.last_minute.unwrap_or_default();
    assert!(
        last.hits >= 20 && last.synthetic_requests >= 20,
        "{vcl}: {last:?}"
    );
    // The agent's own verdicts come from varnish's log, whatever the VCL answered.
    let own = r.synthetic_hit_ratio.and_then(|h| h.m5);
    assert!(
        own.is_some_and(|o| o > 0.0),
        "{vcl}: own ratio {own:?}: {r:?}"
    );
    let metrics = get(c.api, "/metrics").await.body;
    assert!(
        !metrics.contains("coordinator_region_hit_ratio{region=\"region-0\""),
        "{vcl}: a hit ratio without shoppers:\n{metrics}"
    );

    // One shopper: a miss, then ten hits on the same page.
    for _ in 0..11 {
        let page = get(v0, "/p/shopper").await;
        assert_eq!(page.status, 200, "{vcl}: {page:?}");
    }
    assert_eq!(
        cluster.origin.origin.renders("/p/shopper"),
        1,
        "{vcl}: the page was not cached"
    );
    assert_eventually!(
        15,
        {
            r = region(cluster).await;
            r.last_minute
                .as_ref()
                .is_some_and(|m| (m.shopper_hits, m.shopper_misses) == (10, 1))
                && r.served.requests == 11
        },
        "{vcl}: the shopper's requests not counted: {r:?}"
    );
    let want = 10.0 / 11.0;
    let exact = |v: Option<f64>| v.is_some_and(|v| (v - want).abs() < 1e-9);
    assert_stays!(
        3,
        {
            r = region(cluster).await;
            exact(r.hit_ratio.m1) && exact(r.hit_ratio.m5) && exact(r.hit_ratio.h1)
        },
        "{vcl}: the shoppers' ratio is not 10/11 in every window: {r:?}"
    );
    let per_s = r.requests_per_s.unwrap_or(0.0);
    assert!(
        (per_s * 60.0 - 11.0).abs() < 1e-6,
        "{vcl}: {per_s} shopper requests/s"
    );
    eprintln!(
        "figure: {vcl}: shoppers' ratio {:.4} over 11 requests, beside {} hits varnish counted in the last minute",
        want,
        r.last_minute.map(|m| m.hits).unwrap_or(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_vcl_pushed_by_the_coordinator() {
    // Booted with Debian's VCL, then the project's bundle is pushed; its health check
    // after the switch is one more of the agent's own requests.
    let cluster = Cluster::start_with_vcl(
        1,
        "ban",
        opts("[rollout]\nhealth_path = \"/c/health\"\n"),
        &debian_default,
    )
    .await;
    let bundle = coordinator_cli::demo::sample_bundle();
    let (_, view) = cluster.coordinator.push_and_wait(&bundle, false).await;
    assert_eq!(view["rollout"]["phase"], "done", "{view}");
    shoppers_ratio_only(&cluster, "the project's bundle").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debians_default_vcl() {
    let cluster = Cluster::start_with_vcl(1, "ban", opts(""), &debian_default).await;
    shoppers_ratio_only(&cluster, "Debian's default.vcl").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn magentos_stock_vcl() {
    let cluster = Cluster::start_with_vcl(1, "ban", opts(""), &magento_stock).await;
    shoppers_ratio_only(&cluster, "Magento's stock VCL").await;
}
