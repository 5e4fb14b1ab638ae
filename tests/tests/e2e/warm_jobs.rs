//! Distributed warm jobs: the coordinator splits a sitemap into shards, agents fetch them
//! through their region's varnish, the origin (which counts renders) never sees more than
//! the budget; tiered jobs render each page once; a tag purge re-warms exactly its pages;
//! a coordinator killed mid-job resumes without starting over.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{
    assert_eventually, assert_stays, get, purge_tags, Cluster, CoordinatorOpts, CoordinatorProc,
};

/// Every page of `/sitemap.xml?products=N`: `/`, ten categories, N products.
fn pages(products: u32) -> Vec<String> {
    let mut v = vec!["/".to_owned()];
    v.extend((1..=10).map(|c| format!("/c/{c}")));
    v.extend((1..=products).map(|p| format!("/p/{p}")));
    v
}

fn opts(warm: &str) -> CoordinatorOpts {
    CoordinatorOpts {
        warm_extra: warm.to_owned(),
        ..CoordinatorOpts::default()
    }
}

async fn start_job(c: &CoordinatorProc, spec: Value) -> u64 {
    c.start_warm_job(&spec).await
}

async fn job(c: &CoordinatorProc, id: u64) -> Value {
    c.warm_job(id).await
}

async fn finished(c: &CoordinatorProc, id: u64, secs: u64) -> Value {
    c.warm_finished(id, secs).await
}

fn cli(c: &CoordinatorProc, args: &[&str]) -> (bool, String) {
    let (code, out, err) = c.cli(args);
    (code == 0, out + &err)
}

/// Every page answers HIT in every region.
async fn all_hits(cluster: &Cluster, paths: &[String]) {
    for (i, v) in cluster.varnish.iter().enumerate() {
        for p in paths {
            let r = get(v.http, p).await;
            assert_eq!(r.status, 200, "{p} in region-{i}");
            assert_eq!(
                r.header("X-Magento-Cache-Debug"),
                Some("HIT"),
                "{p} in region-{i} is not cached"
            );
            assert!(
                r.header("X-Magento-Tags").is_none(),
                "tags leak to shoppers"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flat_job_from_the_cli_warms_every_region_and_every_page_is_then_a_hit() {
    let cluster = Cluster::start(3, "ban", opts("origin_budget_rps = 300\n")).await;
    let sitemap = format!("http://{}/sitemap.xml?products=189", cluster.origin.addr);
    let (ok, out) = cli(
        &cluster.coordinator,
        &[
            "warm",
            "start",
            "--sitemap",
            &sitemap,
            "--host",
            "shop.test",
            "--rate",
            "300",
            "--wait",
        ],
    );
    assert!(ok, "{out}");
    let id: u64 = out
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("job id printed");
    let view = job(&cluster.coordinator, id).await;
    assert_eq!(view["state"], "done", "{view}");
    assert_eq!(view["urls"], 200);
    assert_eq!(view["tiered"], false);
    for r in 0..3 {
        let p = &view["regions"][format!("region-{r}")];
        assert_eq!(
            (p["done"].as_u64(), p["total"].as_u64()),
            (Some(200), Some(200)),
            "{view}"
        );
        assert_eq!(p["errors"], 0);
        assert_eq!(p["misses"], 200);
    }
    // The CLI's last progress lines show every region complete.
    assert!(out.contains("region-2") && out.contains("200/200"), "{out}");
    let paths = pages(189);
    // Flat: each region's varnish asked the origin once for each page.
    for p in &paths {
        assert_eq!(cluster.origin.origin.renders(p), 3, "{p}");
    }
    let before = cluster.origin.origin.total_renders();
    all_hits(&cluster, &paths).await;
    assert_eq!(
        cluster.origin.origin.total_renders(),
        before,
        "a full pass of GETs rendered nothing"
    );

    let (ok, status) = cli(&cluster.coordinator, &["warm", "status"]);
    assert!(ok && status.contains("done"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered_job_renders_each_page_once_and_every_region_serves_it_from_cache() {
    let cluster = Cluster::start_as(
        3,
        "ban",
        opts("origin_budget_rps = 300\nsatellite_rate = 300\n"),
        true,
    )
    .await;
    let id = start_job(
        &cluster.coordinator,
        json!({"sitemap": format!("http://{}/sitemap.xml?products=189", cluster.origin.addr),
               "host": "shop.test", "rewarm": true}),
    )
    .await;
    let view = finished(&cluster.coordinator, id, 60).await;
    assert_eq!(view["state"], "done", "{view}");
    assert_eq!(view["tiered"], true);
    let paths = pages(189);
    for p in &paths {
        assert_eq!(
            cluster.origin.origin.renders(p),
            1,
            "{p} rendered once for three regions"
        );
    }
    // The satellites fetched from the shield: their first request was a miss there and a
    // hit at the shield.
    assert_eq!(view["regions"]["region-1"]["misses"], 200);
    all_hits(&cluster, &paths).await;
    assert_eq!(cluster.origin.origin.total_renders(), 200);

    // The satellites cached the tags (the shield showed them to the satellite's fetch),
    // so a tag purge reaches their copies, and the re-warm renders the page once more.
    let seq = purge_tags(cluster.coordinator.purge, &["cat_p_5"]).await;
    cluster.wait_applied(seq).await;
    assert_eventually!(
        30,
        cluster.origin.origin.renders("/p/5") == 2 && {
            let mut hits = true;
            for v in &cluster.varnish {
                hits &= get(v.http, "/p/5").await.header("X-Magento-Cache-Debug") == Some("HIT");
            }
            hits
        },
        "/p/5 re-warmed everywhere ({} renders)",
        cluster.origin.origin.renders("/p/5")
    );
    assert_eq!(
        cluster.origin.origin.renders("/p/5"),
        2,
        "re-warmed through the shield: one render"
    );
    assert_eq!(
        cluster.origin.origin.total_renders(),
        201,
        "nothing else rendered"
    );
    // Every region, satellites included, serves the new render: the purge reached the
    // satellites' copies (they carry the tags the shield showed them).
    for (i, v) in cluster.varnish.iter().enumerate() {
        let body = get(v.http, "/p/5").await.body;
        assert!(
            body.contains("render 2"),
            "region-{i} serves a stale page: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_budget_holds_and_a_slow_or_failing_origin_slows_the_warmer() {
    let budget = 30.0;
    let cluster = Cluster::start(
        3,
        "ban",
        opts(&format!(
            "origin_budget_rps = {budget}\nslow_ttfb_ms = 150\nshard_urls = 10\n"
        )),
    )
    .await;
    let origin = &cluster.origin.origin;
    let sitemap = format!("http://{}/sitemap.xml?products=49", cluster.origin.addr);

    // Healthy origin: 3 regions x 60 pages under a 30 req/s budget.
    let id = start_job(
        &cluster.coordinator,
        json!({"sitemap": sitemap, "host": "shop.test"}),
    )
    .await;
    let view = finished(&cluster.coordinator, id, 60).await;
    assert_eq!(view["state"], "done", "{view}");
    let times = origin.request_times();
    assert_eq!(times.len(), 180);
    let (rate, window) = load(&times);
    println!("healthy origin: {rate:.1} req/s over the job, at most {window} in any 2 s");
    assert!(
        rate <= budget * 1.1,
        "{rate:.1} req/s over a {budget} budget"
    );
    assert!(
        window as f64 <= 2.0 * budget * 1.1,
        "{window} requests in 2 s"
    );

    // Slow origin (300 ms to first byte against a 150 ms threshold): the controller
    // backs off and the origin sees much less than the budget; once the origin is fast
    // again the rate recovers and the job ends.
    origin.set_delay(Duration::from_millis(300));
    let slow_start = Instant::now();
    let id = start_job(
        &cluster.coordinator,
        json!({"sitemap": format!("{sitemap}&v=slow"), "host": "shop.test", "refresh": true}),
    )
    .await;
    let mut rate;
    assert_eventually!(
        20,
        {
            rate = job(&cluster.coordinator, id).await["rate"]
                .as_f64()
                .unwrap_or(f64::MAX);
            rate <= budget / 2.0
        },
        "the controller did not back off: {rate}"
    );
    // A measuring window: time passing is the point (the rate is over it).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let slow: Vec<Instant> = origin
        .request_times()
        .into_iter()
        .filter(|t| *t >= slow_start)
        .collect();
    let slow_rate = slow.len() as f64 / slow_start.elapsed().as_secs_f64();
    println!("slow origin: {slow_rate:.1} req/s while slow, controller at {rate:.1}");
    assert!(
        slow_rate < budget * 0.6,
        "{slow_rate:.1} req/s to a slow origin"
    );
    origin.set_delay(Duration::ZERO);
    let view = finished(&cluster.coordinator, id, 90).await;
    assert_eq!(view["state"], "done", "{view}");

    println!(
        "slow phase took {:.1} s",
        slow_start.elapsed().as_secs_f64()
    );
    // Failing origin: every 4th request is a 503; errors are reported, the job ends.
    origin.set_delay(Duration::ZERO);
    origin.set_fail_every(4);
    let few: Vec<String> = (1..=12)
        .map(|p| format!("http://{}/p/{p}", cluster.origin.addr))
        .collect();
    let id = start_job(
        &cluster.coordinator,
        json!({"urls": few, "host": "shop.test", "refresh": true}),
    )
    .await;
    let mut lowest = f64::MAX;
    let mut view;
    assert_eventually!(
        90,
        {
            view = job(&cluster.coordinator, id).await;
            if let Some(r) = view["rate"].as_f64() {
                lowest = lowest.min(r);
            }
            matches!(
                view["state"].as_str(),
                Some("done" | "failed" | "cancelled")
            )
        },
        "the job against a failing origin did not end: {view}"
    );
    assert_eq!(view["state"], "done", "{view}");
    let errors: u64 = (0..3)
        .map(|r| {
            view["regions"][format!("region-{r}")]["errors"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert!(errors > 0, "503s reported: {view}");
    assert!(lowest <= budget / 2.0, "5xx made it back off: {lowest}");
}

/// Requests per second over the span, and the most in any 2 s window.
fn load(times: &[Instant]) -> (f64, usize) {
    let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) else {
        return (0.0, 0);
    };
    let span = last.duration_since(*first).as_secs_f64().max(1.0);
    let mut sorted = times.to_vec();
    sorted.sort();
    let mut window = 0;
    let mut lo = 0;
    for hi in 0..sorted.len() {
        while sorted[hi].duration_since(sorted[lo]) >= Duration::from_secs(2) {
            lo += 1;
        }
        window = window.max(hi - lo + 1);
    }
    (times.len() as f64 / span, window)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_rewarms_exactly_its_pages_in_every_region() {
    let cluster = Cluster::start(
        3,
        "ban",
        opts("origin_budget_rps = 300\nrewarm_after_purge = true\nrewarm_debounce_ms = 500\n"),
    )
    .await;
    let id = start_job(
        &cluster.coordinator,
        json!({"sitemap": format!("http://{}/sitemap.xml", cluster.origin.addr), "host": "shop.test"}),
    )
    .await;
    assert_eq!(
        finished(&cluster.coordinator, id, 60).await["state"],
        "done"
    );
    let origin = &cluster.origin.origin;
    assert_eq!(origin.total_renders(), 333);
    // A burst of purges of the same product (a save, then a reindex) is one re-warm.
    let mut seq = 0;
    for _ in 0..3 {
        seq = purge_tags(cluster.coordinator.purge, &["cat_p_5"]).await;
    }
    cluster.wait_applied(seq).await;
    assert_eventually!(
        30,
        {
            let mut hits = origin.renders("/p/5") == 6;
            for v in &cluster.varnish {
                hits &= get(v.http, "/p/5").await.header("X-Magento-Cache-Debug") == Some("HIT");
            }
            hits
        },
        "/p/5 not re-warmed: {} renders",
        origin.renders("/p/5")
    );
    assert_stays!(
        2,
        origin.renders("/p/5") == 6,
        "one re-warm pass for the burst: {} renders",
        origin.renders("/p/5")
    );
    assert_eq!(
        origin.total_renders(),
        336,
        "only the purged product was re-warmed"
    );
    let jobs = cluster
        .coordinator
        .call("GET", "/api/v1/warm/jobs", None)
        .await
        .json();
    let rewarms: Vec<&Value> = jobs["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter(|j| j["kind"] == "rewarm")
        .collect();
    assert_eq!(rewarms.len(), 1, "{jobs}");
    assert_eq!(rewarms[0]["urls"], 1);
    assert_eq!(
        rewarms[0]["spec"]["urls"],
        json!(["http://127.0.0.1:{}/p/5".replace("{}", &cluster.origin.addr.port().to_string())])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_and_an_agent_killed_mid_job_resume_without_refetching() {
    let mut cluster =
        Cluster::start(1, "ban", opts("origin_budget_rps = 25\nshard_urls = 10\n")).await;
    let id = start_job(
        &cluster.coordinator,
        json!({"sitemap": format!("http://{}/sitemap.xml?products=189", cluster.origin.addr),
               "host": "shop.test"}),
    )
    .await;
    assert_eventually!(
        30,
        job(&cluster.coordinator, id).await["regions"]["region-0"]["done"]
            .as_u64()
            .unwrap_or(0)
            >= 80,
        "job did not progress"
    );
    cluster.coordinator.kill9_and_restart().await;
    // And the agent, later in the job.
    assert_eventually!(
        30,
        job(&cluster.coordinator, id).await["regions"]["region-0"]["done"]
            .as_u64()
            .unwrap_or(0)
            >= 140,
        "job did not resume after the coordinator restart"
    );
    cluster.agents[0].kill9().await;
    cluster.agents[0].restart();
    let view = finished(&cluster.coordinator, id, 60).await;
    assert_eq!(view["state"], "done", "{view}");
    assert_eq!(view["regions"]["region-0"]["done"], 200);
    // Every page was requested once, plus at most the shards in flight at each kill.
    let requests = cluster.varnish[0].counter("MAIN.client_req");
    println!(
        "varnish saw {requests} requests for 200 pages across a coordinator and an agent kill -9"
    );
    assert!(
        (200..=200 + 2 * 2 * 10).contains(&requests),
        "{requests} requests"
    );
    assert_eq!(cluster.origin.origin.total_renders(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sitemap_index_with_gzip_children_popular_urls_cancel_and_bad_input() {
    let cluster = Cluster::start(1, "ban", opts("origin_budget_rps = 300\n")).await;
    let c = &cluster.coordinator;
    let origin = cluster.origin.addr;
    let id = start_job(
        c,
        json!({"sitemap": format!("http://{origin}/sitemap_index.xml"), "host": "shop.test"}),
    )
    .await;
    let view = finished(c, id, 60).await;
    assert_eq!(view["state"], "done", "{view}");
    assert_eq!(view["urls"], 100, "both gzipped halves");
    assert_eq!(cluster.origin.origin.renders("/p/100"), 1);

    // A variation (Magento's store-view cookie) is a second cache key: both are warmed.
    let id = start_job(
        c,
        json!({"urls": [format!("http://{origin}/c/5")], "host": "shop.test",
               "variations": ["Cookie: X-Magento-Vary=store_de"]}),
    )
    .await;
    let view = finished(c, id, 30).await;
    assert_eq!(
        (view["state"].as_str(), view["variations"].as_u64()),
        (Some("done"), Some(2)),
        "{view}"
    );
    assert_eq!(cluster.origin.origin.renders("/c/5"), 2);
    let with_cookie = tests::raw(
        cluster.varnish[0].http,
        b"GET /c/5 HTTP/1.1\r\nHost: shop.test\r\nCookie: X-Magento-Vary=store_de\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("GET");
    assert_eq!(with_cookie.header("X-Magento-Cache-Debug"), Some("HIT"));
    assert_eq!(
        get(cluster.varnish[0].http, "/c/5")
            .await
            .header("X-Magento-Cache-Debug"),
        Some("HIT")
    );

    // Not a sitemap: the job fails and says why.
    let id = start_job(c, json!({"sitemap": format!("http://{origin}/p/1")})).await;
    let view = finished(c, id, 30).await;
    assert_eq!(view["state"], "failed");
    let error = view["error"].as_str().unwrap_or("");
    assert!(error.contains("/p/1") && error.contains("line"), "{error}");
    // Refused before it is queued.
    for bad in [
        json!({}),
        json!({"sitemap": "/etc/passwd"}),
        json!({"urls": ["http://x/"], "regions": ["mars"]}),
        json!({"urls": ["http://x/"], "bogus": 1}),
        json!({"urls": ["http://x/"], "variations": ["no colon"]}),
    ] {
        let r = c.call("POST", "/api/v1/warm/jobs", Some(&bad)).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert!(r.json()["error"].is_string());
    }
    let r = tests::api_call(
        c.api,
        "POST",
        "/api/v1/warm/jobs",
        None,
        Some(&json!({"urls": ["http://x/"]})),
    )
    .await;
    assert_eq!(r.status, 401);

    // Popular URLs: shoppers' requests are counted, the warmer's are not.
    for _ in 0..5 {
        get(cluster.varnish[0].http, "/c/7").await;
    }
    for _ in 0..3 {
        get(cluster.varnish[0].http, "/c/8?page=2").await;
    }
    let mut top;
    assert_eventually!(
        20,
        {
            top = c.call("GET", "/api/v1/warm/top?n=2", None).await.json();
            top["region-0"][0] == json!(["http://shop.test/c/7", 5])
                && top["region-0"][1] == json!(["http://shop.test/c/8?page=2", 3])
        },
        "popular URLs: {top}"
    );
    cluster.varnish[0].admin("ban req.url ~ .").await;
    let id = start_job(c, json!({"top": 2})).await;
    let view = finished(c, id, 30).await;
    assert_eq!(
        (view["state"].as_str(), view["urls"].as_u64()),
        (Some("done"), Some(2)),
        "{view}"
    );
    assert_eq!(
        get(cluster.varnish[0].http, "/c/8?page=2")
            .await
            .header("X-Magento-Cache-Debug"),
        Some("HIT")
    );
    let mut top;
    assert_stays!(
        2,
        {
            top = c.call("GET", "/api/v1/warm/top?n=1", None).await.json();
            top["region-0"][0] == json!(["http://shop.test/c/7", 5])
        },
        "warm requests are not counted: {top}"
    );

    // Cancel from the CLI: the job stops.
    let id = start_job(
        c,
        json!({"sitemap": format!("http://{origin}/sitemap.xml?products=500"), "host": "shop.test", "rate": 2}),
    )
    .await;
    assert_eventually!(10, job(c, id).await["state"] == "running", "not running");
    let (ok, out) = cli(c, &["warm", "cancel", &id.to_string()]);
    assert!(ok && out.contains("cancelled"), "{out}");
    let requests = cluster.varnish[0].counter("MAIN.client_req");
    assert_stays!(
        2,
        cluster.varnish[0].counter("MAIN.client_req") <= requests + 1,
        "fetching continued after cancel"
    );
    let (ok, out) = cli(c, &["warm", "status", &id.to_string()]);
    assert!(ok && out.contains("cancelled"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_schedule_queues_jobs_and_never_piles_them_up() {
    let opts = CoordinatorOpts {
        warm_extra: "origin_budget_rps = 300\n".into(),
        extra: "[[warm.schedule]]\nname = \"often\"\ncron = \"*/2 * * * * *\"\nurls = [\"http://{origin}/p/3\"]\nhost = \"shop.test\"\n".into(),
        ..CoordinatorOpts::default()
    };
    let cluster = Cluster::start(1, "ban", opts).await;
    let mut jobs;
    assert_eventually!(
        20,
        {
            jobs = cluster
                .coordinator
                .call("GET", "/api/v1/warm/jobs", None)
                .await
                .json();
            jobs["jobs"].as_array().is_some_and(|j| {
                j.iter()
                    .filter(|j| j["kind"] == "schedule" && j["state"] == "done")
                    .count()
                    >= 2
            })
        },
        "scheduled jobs: {jobs}"
    );
    let all = jobs["jobs"].as_array().expect("jobs");
    assert!(all.iter().all(|j| j["name"] == "often"), "{jobs}");
    let pending = all
        .iter()
        .filter(|j| j["state"] == "queued" || j["state"] == "running")
        .count();
    assert!(pending <= 1, "scheduled jobs piled up: {jobs}");
    assert_eq!(
        get(cluster.varnish[0].http, "/p/3")
            .await
            .header("X-Magento-Cache-Debug"),
        Some("HIT")
    );
}
