//! Refresh mode (`[purge] refresh_tags`) end to end, against real varnishd with xkey: a
//! tag purge keeps the pages, stale, in every region; shoppers are served the stale copy
//! at once while one background fetch re-renders it, and in a tiered cluster the origin
//! renders it once for every region (a satellite's background fetch waits for the
//! shield's fresh copy, it never takes the shield's stale one). The stale copy is bounded
//! (`refresh_max_stale_s`: past it an untouched page is a miss), outlives the bound only
//! while the origin is down, and is never stored as fresh by a satellite. Full flushes and
//! `X-Pool` stay hard; Magento's own `X-Magento-Purge-Soft: 1` keeps working without the
//! mode.
//!
//! The pages here are cached by shoppers' requests, not by warm jobs, so the coordinator's
//! tag index does not know them and no refresh job runs: what these tests see is the VCL
//! alone. The refresh jobs have their own tests below them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{
    assert_eventually, assert_stays, get, get_json, magento_purge, purge_tags, raw, tags_pattern,
    Cluster, CoordinatorOpts, Resp,
};

/// Refresh mode with a stale bound of `max_stale_s`.
fn refresh(max_stale_s: u64) -> CoordinatorOpts {
    CoordinatorOpts {
        refresh_tags: true,
        refresh_max_stale_s: max_stale_s,
        ..CoordinatorOpts::default()
    }
}

/// `GET path` and how long the answer took.
async fn timed_get(addr: SocketAddr, path: &str) -> (Resp, Duration) {
    let started = Instant::now();
    let r = get(addr, path).await;
    (r, started.elapsed())
}

/// The origin's render number a page carries (`X-Origin-Render`), 0 without one.
fn render_of(r: &Resp) -> u64 {
    r.header("X-Origin-Render")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Caches `paths` as shoppers do, shield first: after it every region answers HIT and the
/// origin rendered each page once.
async fn shop(cluster: &Cluster, paths: &[&str]) {
    for p in paths {
        for (i, v) in cluster.varnish.iter().enumerate() {
            get(v.http, p).await;
            let r = get(v.http, p).await;
            assert_eq!(
                (r.status, r.cache()),
                (200, "HIT"),
                "{p} not cached in region-{i}"
            );
        }
        assert_eq!(cluster.origin.origin.renders(p), 1, "{p} rendered once");
    }
}

/// Each region's `varnishstat` counter `name`.
fn counters(cluster: &Cluster, name: &str) -> Vec<u64> {
    cluster.varnish.iter().map(|v| v.counter(name)).collect()
}

/// `GET /api/v1/purges/{seq}`.
async fn purge_status(cluster: &Cluster, seq: u64) -> Value {
    get_json(cluster.coordinator.api, &format!("/api/v1/purges/{seq}"))
        .await
        .unwrap_or(Value::Null)
}

/// Each region's (name, health, diagnosis, error) from `GET /api/v1/regions`.
async fn health(cluster: &Cluster) -> Vec<(String, String, String, String)> {
    cluster
        .coordinator
        .regions()
        .await
        .into_values()
        .map(|r| {
            (
                r.name,
                coordinator::api::views::name_of(&r.health),
                r.diagnosis
                    .map(|d| d.as_str().to_owned())
                    .unwrap_or_default(),
                r.health_error.unwrap_or_default(),
            )
        })
        .collect()
}

/// A PURGE with these extra header lines; the acknowledged sequence.
async fn purge_with(cluster: &Cluster, headers: &str) -> u64 {
    let req = format!("PURGE / HTTP/1.1\r\n{headers}Host: coordinator.internal\r\n\r\n");
    let r = raw(cluster.coordinator.purge, req.as_bytes())
        .await
        .expect("purge");
    assert_eq!(r.status, 200, "purge answered {}: {}", r.status, r.body);
    r.json()["seq"].as_u64().expect("seq in purge answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_serves_every_region_the_stale_copy_at_once_and_renders_it_once() {
    let c = Cluster::start_as(3, "xkey", refresh(30), true).await;
    let origin = c.origin.origin.clone();
    shop(&c, &["/p/1"]).await;
    let bgfetch = counters(&c, "MAIN.s_bgfetch");

    let render = Duration::from_millis(1500);
    origin.set_delay(render);
    let seq = purge_tags(c.coordinator.purge, &["cat_p_1"]).await;
    assert_eq!(purge_status(&c, seq).await["soft"], true, "logged soft");
    c.wait_applied(seq).await;

    // Every region at once, satellites first (their background fetches reach the shield
    // while its copy is still stale): the copy rendered before the purge, well under the
    // render time.
    for (i, v) in c.varnish.iter().enumerate().rev() {
        let (r, took) = timed_get(v.http, "/p/1").await;
        assert_eq!(r.status, 200, "region-{i}");
        assert_eq!(render_of(&r), 1, "region-{i} serves the stale copy: {r:?}");
        assert!(
            took < render / 3,
            "region-{i} made the shopper wait {took:?} (the render takes {render:?})"
        );
    }
    // Then the fresh copy everywhere, and no shopper waited meanwhile.
    let mut slowest = Duration::ZERO;
    assert_eventually!(
        15,
        {
            let mut fresh = true;
            for v in &c.varnish {
                let (r, took) = timed_get(v.http, "/p/1").await;
                slowest = slowest.max(took);
                fresh &= r.status == 200 && render_of(&r) == 2;
            }
            fresh
        },
        "not every region serves the fresh render ({} renders)",
        origin.renders("/p/1")
    );
    assert!(
        slowest < render / 3,
        "a shopper waited {slowest:?} while the page refreshed"
    );
    assert_eq!(
        origin.renders("/p/1"),
        2,
        "the refresh rendered the page once for three regions"
    );
    // Each satellite fetched in the background exactly once: it waited for the shield's
    // fresh copy instead of taking its stale one (which it would have abandoned, and
    // fetched again at the next request).
    let after = counters(&c, "MAIN.s_bgfetch");
    for i in 1..3 {
        assert_eq!(
            after[i] - bgfetch[i],
            1,
            "region-{i}'s background fetches: {bgfetch:?} -> {after:?}"
        );
    }
    assert!(after[0] - bgfetch[0] <= 1, "{bgfetch:?} -> {after:?}");
    // The coordinator counts both, per edge, from the agents' varnishstat.
    for (metric, edge) in [
        ("coordinator_varnish_stale_answers_total", "edge-1"),
        ("coordinator_varnish_background_fetches_total", "edge-1"),
        ("coordinator_varnish_stale_answers_total", "edge-0"),
    ] {
        let mut seen;
        assert_eventually!(
            10,
            {
                seen = metric_value(&c, metric, edge).await;
                seen >= Some(1.0)
            },
            "{metric} for {edge}: {seen:?}"
        );
    }
}

/// A metric's value for one edge in `/metrics` (its `edge` label), if exported.
async fn metric_value(cluster: &Cluster, name: &str, edge: &str) -> Option<f64> {
    let text = get(cluster.coordinator.api, "/metrics").await.body;
    let label = format!("edge=\"{edge}\"");
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `path` at `addr` is a miss answered with the origin's second render, after at least
/// `render` (a wait for the origin) when given.
async fn assert_fresh_miss(addr: SocketAddr, path: &str, render: Option<Duration>) {
    let (r, took) = timed_get(addr, path).await;
    assert_eq!(
        (r.status, r.cache(), render_of(&r)),
        (200, "MISS", 2),
        "{path} at {addr}: {r:?}"
    );
    if let Some(render) = render {
        assert!(
            took >= render,
            "{path} at {addr} answered in {took:?}: not a render"
        );
    }
}

/// `[monitoring]` against the origin and a `/health_check.php` check every 300 ms.
const MONITORED: &str = "[monitoring]\norigin = \"{origin}\"\nfailures_to_down = 3\nsuccesses_to_up = 2\n\
     [[checks]]\nname = \"health\"\npath = \"/health_check.php\"\ninterval_ms = 300\ntimeout_ms = 1000\nslow_ms = 5000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bound_an_untouched_page_is_a_miss_that_waits_for_a_fresh_render() {
    let bound = 3;
    let c = Cluster::start_as(2, "xkey", refresh(bound), true).await;
    let origin = c.origin.origin.clone();
    shop(&c, &["/p/2", "/p/3"]).await;
    let seq = purge_tags(c.coordinator.purge, &["cat_p_2", "cat_p_3"]).await;
    c.wait_applied(seq).await;
    let applied = Instant::now();
    let render = Duration::from_millis(1000);
    origin.set_delay(render);
    // No shopper asks for the pages until the bound passed: time passing is the point.
    tokio::time::sleep_until((applied + Duration::from_secs(bound + 1)).into()).await;

    // The shield: a miss that waits for the origin's fresh render.
    assert_fresh_miss(c.varnish[0].http, "/p/3", Some(render)).await;
    // A satellite: a miss at both layers, waiting for the origin too.
    assert_fresh_miss(c.varnish[1].http, "/p/2", Some(render)).await;
    // A satellite whose shield was refreshed meanwhile: its own stale copy is past the
    // bound too, it takes the shield's fresh one.
    assert_fresh_miss(c.varnish[1].http, "/p/3", None).await;
    assert_eq!((origin.renders("/p/2"), origin.renders("/p/3")), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_origin_down_shoppers_keep_the_stale_copy_past_the_bound_and_regions_say_why() {
    let bound = 3;
    let c = Cluster::start_as(
        3,
        "xkey",
        CoordinatorOpts {
            extra: MONITORED.into(),
            ..refresh(bound)
        },
        true,
    )
    .await;
    assert_eventually!(
        20,
        health(&c).await.iter().all(|(_, h, _, _)| h == "up"),
        "regions not up: {:?}",
        health(&c).await
    );
    shop(&c, &["/p/4"]).await;

    // The origin stops, then a reindex purges the page.
    c.origin.stop();
    let seq = purge_tags(c.coordinator.purge, &["cat_p_4"]).await;
    c.wait_applied(seq).await;
    let applied = Instant::now();
    // Every region keeps answering the stale copy, past the bound too: a shopper never
    // gets an error while a copy is in grace.
    let mut last = Vec::new();
    assert_stays!(
        bound + 4,
        {
            last.clear();
            for v in &c.varnish {
                let r = get(v.http, "/p/4").await;
                last.push((r.status, render_of(&r)));
            }
            last.iter().all(|a| *a == (200, 1))
        },
        "(status, render) per region {:.1} s after the purge, the origin down: {last:?}; varnish's backends: {}",
        applied.elapsed().as_secs_f64(),
        c.varnish[0].admin("backend.list").await
    );
    // The regions say what is wrong: the origin, not the edges, and not that all is fine.
    assert_eventually!(
        20,
        health(&c)
            .await
            .iter()
            .all(|(_, h, d, _)| h == "down" && d == "origin_down_everywhere"),
        "regions with the origin down: {:?}",
        health(&c).await
    );
    eprintln!(
        "figure: origin down in refresh mode: regions say {:?}",
        health(&c).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_satellite_never_keeps_the_shields_stale_copy_as_fresh() {
    let c = Cluster::start_as(3, "xkey", refresh(30), true).await;
    let origin = c.origin.origin.clone();
    // /p/5 is cached everywhere, /p/6 at the shield only.
    shop(&c, &["/p/5"]).await;
    get(c.varnish[0].http, "/p/6").await;

    // The origin answers 503 to every page; a reindex purges both.
    origin.set_fail_every(1);
    let seq = purge_tags(c.coordinator.purge, &["cat_p_5", "cat_p_6"]).await;
    c.wait_applied(seq).await;
    // Shoppers get the stale copies, /p/6 at the satellites from the shield's stale copy
    // (their background fetches fail and are abandoned).
    for round in 0..3 {
        for (i, v) in c.varnish.iter().enumerate() {
            for p in ["/p/5", "/p/6"] {
                let r = get(v.http, p).await;
                assert_eq!(
                    (r.status, render_of(&r)),
                    (200, 1),
                    "round {round}: {p} in region-{i} with the origin failing: {r:?}"
                );
            }
        }
    }
    eprintln!(
        "figure: origin answering 503 to every page (its health check 200): regions say {:?}",
        health(&c).await
    );

    // The origin is back: the next requests refresh every copy, the satellites' /p/6 too
    // (stored stale, not as fresh for a day).
    origin.set_fail_every(0);
    let mut last = Vec::new();
    assert_eventually!(
        15,
        {
            last.clear();
            for v in &c.varnish {
                for p in ["/p/5", "/p/6"] {
                    last.push(render_of(&get(v.http, p).await));
                }
            }
            last.iter().all(|n| *n == 2)
        },
        "renders served (region-0 /p/5 /p/6, region-1 ...): {last:?}"
    );
    assert_eq!(
        (origin.renders("/p/5"), origin.renders("/p/6")),
        (2, 2),
        "one fresh render each for every region"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_flushes_and_pools_stay_hard_purges_in_refresh_mode() {
    let c = Cluster::start_as(2, "xkey", refresh(30), true).await;
    let origin = c.origin.origin.clone();
    shop(
        &c,
        &["/p/7", "/untagged/x?pool=blue", "/untagged/y?pool=green"],
    )
    .await;

    // X-Pool: the pool's pages are gone at both layers, the shield's request is a render.
    let seq = purge_with(&c, "X-Pool: ^blue$\r\n").await;
    assert_eq!(purge_status(&c, seq).await["soft"], false);
    c.wait_applied(seq).await;
    for (i, v) in c.varnish.iter().enumerate() {
        let r = get(v.http, "/untagged/x?pool=blue").await;
        assert_eq!((r.cache(), render_of(&r)), ("MISS", 2), "region-{i}: {r:?}");
        let r = get(v.http, "/untagged/y?pool=green").await;
        assert_eq!((r.cache(), render_of(&r)), ("HIT", 1), "region-{i}: {r:?}");
    }

    // A full flush: everything is gone, tagged or not.
    let r = raw(c.coordinator.purge, &magento_purge(".*"))
        .await
        .expect("purge");
    assert_eq!(r.status, 200, "{}", r.body);
    let seq = r.json()["seq"].as_u64().expect("seq");
    assert_eq!(purge_status(&c, seq).await["soft"], false);
    c.wait_applied(seq).await;
    for (i, v) in c.varnish.iter().enumerate() {
        for p in ["/p/7", "/untagged/y?pool=green"] {
            let r = get(v.http, p).await;
            assert_eq!(
                (r.cache(), render_of(&r)),
                ("MISS", 2),
                "{p} in region-{i}: {r:?}"
            );
        }
    }
    assert_eq!(origin.renders("/p/7"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn magentos_soft_purge_still_serves_stale_without_refresh_tags() {
    let c = Cluster::start_as(3, "xkey", CoordinatorOpts::default(), true).await;
    let origin = c.origin.origin.clone();
    shop(&c, &["/p/8", "/p/9"]).await;

    // Without the mode a tag purge is Magento's: the page is gone.
    let seq = purge_tags(c.coordinator.purge, &["cat_p_9"]).await;
    assert_eq!(purge_status(&c, seq).await["soft"], false);
    c.wait_applied(seq).await;
    for (i, v) in c.varnish.iter().enumerate() {
        let r = get(v.http, "/p/9").await;
        assert_eq!((r.cache(), render_of(&r)), ("MISS", 2), "region-{i}: {r:?}");
    }

    // Magento's soft purge: the stale copy at once everywhere, then one fresh render.
    let render = Duration::from_millis(1000);
    origin.set_delay(render);
    let seq = purge_with(
        &c,
        &format!(
            "X-Magento-Tags-Pattern: {}\r\nX-Magento-Purge-Soft: 1\r\n",
            tags_pattern(&["cat_p_8"])
        ),
    )
    .await;
    assert_eq!(purge_status(&c, seq).await["soft"], true);
    c.wait_applied(seq).await;
    for (i, v) in c.varnish.iter().enumerate().rev() {
        let (r, took) = timed_get(v.http, "/p/8").await;
        assert_eq!((r.status, render_of(&r)), (200, 1), "region-{i}: {r:?}");
        assert!(took < render / 2, "region-{i} waited {took:?}");
    }
    assert_eventually!(
        15,
        {
            let mut fresh = true;
            for v in &c.varnish {
                fresh &= render_of(&get(v.http, "/p/8").await) == 2;
            }
            fresh
        },
        "not refreshed everywhere ({} renders)",
        origin.renders("/p/8")
    );
    assert_eq!(origin.renders("/p/8"), 2, "once for three regions");
}

// The refresh jobs: the coordinator re-renders the purged pages its tag index knows (learnt
// from a warm job), with no shopper asking.

/// Refresh mode with a stale bound of `max_stale_s` and `[warm]` keys `warm`.
fn refresh_warm(max_stale_s: u64, warm: &str) -> CoordinatorOpts {
    CoordinatorOpts {
        warm_extra: warm.to_owned(),
        ..refresh(max_stale_s)
    }
}

/// `/p/1..=n`.
fn products(n: u32) -> Vec<String> {
    (1..=n).map(|p| format!("/p/{p}")).collect()
}

/// Caches `paths` everywhere with a warm job that learns their tags; waits until done.
async fn prewarm(cluster: &Cluster, paths: &[String]) {
    let urls: Vec<String> = paths
        .iter()
        .map(|p| format!("http://{}{p}", cluster.origin.addr))
        .collect();
    let c = &cluster.coordinator;
    let id = c
        .start_warm_job(&serde_json::json!({"urls": urls, "host": "shop.test", "rewarm": true}))
        .await;
    let view = c.warm_finished(id, 60).await;
    assert_eq!(view["state"], "done", "{view}");
    for p in paths {
        assert_eq!(cluster.origin.origin.renders(p), 1, "{p} prewarmed once");
    }
}

/// The refresh jobs (`"kind": "refresh"`) in `GET /api/v1/warm/jobs`.
async fn refresh_jobs(cluster: &Cluster) -> Vec<Value> {
    let jobs = cluster
        .coordinator
        .call("GET", "/api/v1/warm/jobs", None)
        .await
        .json();
    jobs["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|j| j["kind"] == "refresh")
        .cloned()
        .collect()
}

/// The `"refresh"` object of purge `seq`, once a refresh covers it; checks that its
/// counts add up.
async fn progress(cluster: &Cluster, seq: u64) -> Option<Value> {
    let r = purge_status(cluster, seq).await["refresh"].clone();
    if r.is_null() {
        return None;
    }
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert_eq!(
        n("stale") + n("refreshed") + n("evicted"),
        n("pages"),
        "a refresh's counts add up: {r}"
    );
    Some(r)
}

/// Waits until the refresh covering `seq` has refreshed every page; its final view.
async fn refreshed(cluster: &Cluster, seq: u64, secs: u64) -> Value {
    let mut last;
    assert_eventually!(
        secs,
        {
            last = progress(cluster, seq).await;
            last.as_ref()
                .is_some_and(|r| r["pages"].as_u64() > Some(0) && r["refreshed"] == r["pages"])
        },
        "the refresh of seq {seq} did not end refreshed: {last:?}"
    );
    last.unwrap_or(Value::Null)
}

/// Every region serves each page fresh: a HIT with the origin's newest render.
async fn all_fresh(cluster: &Cluster, paths: &[String]) {
    for (i, v) in cluster.varnish.iter().enumerate() {
        for p in paths {
            let r = get(v.http, p).await;
            assert_eq!(
                (r.status, r.cache(), render_of(&r)),
                (200, "HIT", cluster.origin.origin.renders(p)),
                "{p} in region-{i} is not the newest render, cached"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_re_renders_every_purged_page_once_with_no_shopper_asking() {
    let c = Cluster::start_as(
        3,
        "xkey",
        refresh_warm(10, "origin_budget_rps = 100\nsatellite_rate = 100\n"),
        true,
    )
    .await;
    let origin = c.origin.origin.clone();
    let pages = products(20);
    prewarm(&c, &pages).await;

    // A reindex: a burst of purges, five pages each, is one refresh.
    let mut seqs = Vec::new();
    for k in 0..4 {
        let tags: Vec<String> = (1..=5).map(|i| format!("cat_p_{}", k * 5 + i)).collect();
        let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
        seqs.push(purge_tags(c.coordinator.purge, &refs).await);
    }
    let (first, last) = (seqs[0], seqs[3]);
    let view = refreshed(&c, last, 30).await;
    assert_eq!(
        (
            &view["pages"],
            &view["stale"],
            &view["evicted"],
            &view["errors"]
        ),
        (
            &Value::from(20),
            &Value::from(0),
            &Value::from(0),
            &Value::from(0)
        ),
        "{view}"
    );
    assert_eq!(
        (view["first_seq"].as_u64(), view["last_seq"].as_u64()),
        (Some(first), Some(last))
    );
    assert_eq!(
        progress(&c, first).await.map(|r| r["job_id"].clone()),
        Some(view["job_id"].clone())
    );
    let jobs = refresh_jobs(&c).await;
    assert_eq!(jobs.len(), 1, "one refresh for the burst: {jobs:?}");
    let job = c
        .coordinator
        .warm_job(view["job_id"].as_u64().expect("job_id"))
        .await;
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["refresh"], view, "the job shows the same progress");

    // Each page rendered once more for three regions, and served fresh everywhere.
    for p in &pages {
        assert_eq!(origin.renders(p), 2, "{p}: one render for the refresh");
    }
    all_fresh(&c, &pages).await;
    assert_eq!(origin.total_renders(), 40, "nothing else rendered");
    // At the bound the refreshed pages are counted.
    let mut seen;
    assert_eventually!(
        15,
        {
            let text = get(c.coordinator.api, "/metrics").await.body;
            seen = text
                .lines()
                .find(|l| l.starts_with("coordinator_refresh_pages_total{outcome=\"refreshed\"}"))
                .map(str::to_owned);
            seen.as_deref().is_some_and(|l| l.ends_with(" 20"))
        },
        "refreshed pages metric: {seen:?}"
    );
}

/// How many of `paths` the origin rendered at least `n` times.
fn rendered_at_least(cluster: &Cluster, paths: &[String], n: u64) -> usize {
    paths
        .iter()
        .filter(|p| cluster.origin.origin.renders(p) >= n)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reindex_during_a_refresh_is_merged_not_doubled() {
    let c = Cluster::start_as(
        2,
        "xkey",
        refresh_warm(
            30,
            "origin_budget_rps = 10\nsatellite_rate = 100\nshard_urls = 5\n",
        ),
        true,
    )
    .await;
    let origin = c.origin.origin.clone();
    let pages = products(30);
    prewarm(&c, &pages).await;

    let seq1 = purge_tags(c.coordinator.purge, &["cat_p"]).await;
    assert_eventually!(
        20,
        rendered_at_least(&c, &pages, 2) >= 5,
        "the first refresh did not start: {:?}",
        progress(&c, seq1).await
    );
    let before: Vec<u64> = pages.iter().map(|p| origin.renders(p)).collect();
    let first = progress(&c, seq1).await.expect("the first refresh");
    let seq2 = purge_tags(c.coordinator.purge, &["cat_p"]).await;

    // One refresh takes over: the first is cancelled and says into which.
    let mut jobs;
    assert_eventually!(
        10,
        {
            jobs = refresh_jobs(&c).await;
            jobs.len() == 2
        },
        "no second refresh: {jobs:?}"
    );
    let old = c
        .coordinator
        .warm_job(first["job_id"].as_u64().expect("job_id"))
        .await;
    let new_id = jobs
        .iter()
        .filter_map(|j| j["id"].as_u64())
        .max()
        .expect("ids");
    assert_eq!(old["state"], "cancelled", "{old}");
    assert_eq!(old["refresh"]["merged_into"], new_id, "{old}");
    let mut running = 0;
    let view = {
        let mut last;
        assert_eventually!(
            30,
            {
                let active = refresh_jobs(&c)
                    .await
                    .iter()
                    .filter(|j| matches!(j["state"].as_str(), Some("queued" | "running")))
                    .count();
                running = running.max(active);
                last = progress(&c, seq2).await;
                last.as_ref()
                    .is_some_and(|r| r["pages"].as_u64() > Some(0) && r["refreshed"] == r["pages"])
            },
            "the merged refresh did not end refreshed: {last:?}"
        );
        last.unwrap_or(Value::Null)
    };
    assert_eq!(running, 1, "one refresh at a time");
    assert_eq!(view["job_id"], new_id, "{view}");
    assert_eq!(
        (
            view["first_seq"].as_u64(),
            view["last_seq"].as_u64(),
            view["pages"].as_u64()
        ),
        (Some(seq1), Some(seq2), Some(30)),
        "the merged refresh covers both purges, each page once: {view}"
    );
    assert_eq!(
        progress(&c, seq1).await.map(|r| r["job_id"].clone()),
        Some(Value::from(new_id)),
        "the first purge's refresh is the merged one"
    );

    // Every page was rendered after the second purge, about once: a page is rendered
    // twice only if a render was under way when the second purge came.
    let mut extra = 0;
    for (p, b) in pages.iter().zip(&before) {
        let more = origin.renders(p) - b;
        assert!(
            (1..=2).contains(&more),
            "{p}: {b} renders before the second purge, {more} after"
        );
        extra += more - 1;
    }
    assert!(
        extra <= 4,
        "{extra} pages rendered twice after the second purge"
    );
    all_fresh(&c, &pages).await;
}

/// What dies in region-2 mid-refresh.
#[derive(Debug, Clone, Copy)]
enum Kill {
    Varnishd,
    Agent,
}

/// Region-2's `kill` dies mid-refresh in a tiered cluster of three: the refresh ends with
/// every page fresh in the others, region-2 dropped; returns why the job says it was.
async fn killed_mid_refresh(kill: Kill) -> String {
    let mut c = Cluster::start_as(
        3,
        "xkey",
        refresh_warm(
            30,
            "origin_budget_rps = 50\nsatellite_rate = 8\nshard_urls = 4\nedge_timeout_s = 3\n",
        ),
        true,
    )
    .await;
    let origin = c.origin.origin.clone();
    let pages = products(24);
    prewarm(&c, &pages).await;

    let seq = purge_tags(c.coordinator.purge, &["cat_p"]).await;
    let mut job = Value::Null;
    assert_eventually!(
        20,
        {
            if let Some(r) = progress(&c, seq).await {
                job = c
                    .coordinator
                    .warm_job(r["job_id"].as_u64().unwrap_or(0))
                    .await;
            }
            job["regions"]["region-2"]["done"].as_u64() > Some(0)
        },
        "region-2 did not start refreshing: {job}"
    );
    assert!(
        job["regions"]["region-2"]["done"].as_u64() < Some(24),
        "region-2 finished before it could be killed: {job}"
    );
    match kill {
        Kill::Varnishd => c.varnish[2].kill9().await,
        Kill::Agent => c.agents[2].kill9().await,
    }
    let killed = Instant::now();
    let view = refreshed(&c, seq, 40).await;
    let id = view["job_id"].as_u64().expect("job_id");
    let job = c.coordinator.warm_job(id).await;
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["regions"]["region-2"]["status"], "dropped", "{job}");
    let why = job["regions"]["region-2"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        why.contains("edge-2"),
        "the job says why edge-2 was dropped: {job}"
    );
    for r in ["region-0", "region-1"] {
        assert_eq!(job["regions"][r]["status"], "done", "{job}");
        assert_eq!(job["regions"][r]["done"], 24, "{job}");
    }
    eprintln!(
        "figure: {kill:?} killed mid-refresh: refresh ended {:.1} s later; region-2: {why}",
        killed.elapsed().as_secs_f64()
    );
    // The others have every page fresh, rendered once for both.
    for p in &pages {
        assert_eq!(origin.renders(p), 2, "{p}");
    }
    for (i, v) in c.varnish.iter().enumerate().take(2) {
        for p in &pages {
            let r = get(v.http, p).await;
            assert_eq!((r.cache(), render_of(&r)), ("HIT", 2), "{p} in region-{i}");
        }
    }
    why.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_varnishd_killed_mid_refresh_is_dropped_with_the_reason_and_the_others_finish() {
    let why = killed_mid_refresh(Kill::Varnishd).await;
    assert!(why.contains("failed every fetch"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_refresh_is_dropped_with_the_reason_and_the_others_finish() {
    let why = killed_mid_refresh(Kill::Agent).await;
    assert!(why.contains("agent disconnected"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_ban_mode_the_refresh_re_renders_the_evicted_pages_and_none_is_served_stale() {
    let c = Cluster::start_as(
        2,
        "ban",
        refresh_warm(30, "origin_budget_rps = 20\nsatellite_rate = 100\n"),
        true,
    )
    .await;
    let origin = c.origin.origin.clone();
    let pages = products(12);
    prewarm(&c, &pages).await;

    let seq = purge_tags(c.coordinator.purge, &["cat_p"]).await;
    c.wait_applied(seq).await;
    // From the moment every edge applied the ban, no region answers a copy rendered
    // before it, while the refresh runs.
    let mut last;
    assert_eventually!(
        30,
        {
            for (i, v) in c.varnish.iter().enumerate() {
                let r = get(v.http, "/p/1").await;
                assert_eq!(
                    (r.status, render_of(&r) >= 2),
                    (200, true),
                    "region-{i} served /p/1 rendered before the purge: {r:?}"
                );
            }
            last = progress(&c, seq).await;
            last.as_ref()
                .is_some_and(|r| r["pages"].as_u64() > Some(0) && r["refreshed"] == r["pages"])
        },
        "the refresh did not end refreshed: {last:?}"
    );
    let view = last.unwrap_or(Value::Null);
    assert_eq!(
        (view["pages"].as_u64(), view["evicted"].as_u64()),
        (Some(12), Some(0)),
        "{view}"
    );
    // The pages nobody asked for are back in every cache, rendered once more.
    for p in &pages {
        assert_eq!(origin.renders(p), 2, "{p}");
    }
    all_fresh(&c, &pages).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_most_requested_pages_are_refreshed_first() {
    let c = Cluster::start_as(
        2,
        "xkey",
        refresh_warm(
            30,
            "origin_budget_rps = 4\nsatellite_rate = 100\nconcurrency = 1\n",
        ),
        true,
    )
    .await;
    let origin = c.origin.origin.clone();
    let pages = products(10);
    prewarm(&c, &pages).await;
    // Shoppers want /p/9 most (in the satellite), then /p/4 (at the shield).
    for _ in 0..6 {
        get(c.varnish[1].http, "/p/9").await;
    }
    for _ in 0..4 {
        get(c.varnish[0].http, "/p/4").await;
    }
    let mut top;
    assert_eventually!(
        20,
        {
            top = c
                .coordinator
                .call("GET", "/api/v1/warm/top?n=1", None)
                .await
                .json();
            top["region-1"][0] == serde_json::json!(["http://shop.test/p/9", 6])
                && top["region-0"][0] == serde_json::json!(["http://shop.test/p/4", 4])
        },
        "popular URLs: {top}"
    );

    let seq = purge_tags(c.coordinator.purge, &["cat_p"]).await;
    let mut order: Vec<String> = Vec::new();
    assert_eventually!(
        30,
        {
            let mut new: Vec<&String> = pages
                .iter()
                .filter(|p| origin.renders(p) >= 2 && !order.contains(p))
                .collect();
            new.sort();
            order.extend(new.into_iter().cloned());
            order.len() == pages.len()
        },
        "not every page refreshed: {order:?}, {:?}",
        progress(&c, seq).await
    );
    let mut first: Vec<&str> = order.iter().take(2).map(String::as_str).collect();
    first.sort_unstable();
    assert_eq!(
        first,
        ["/p/4", "/p/9"],
        "the most requested first: {order:?}"
    );
    let view = refreshed(&c, seq, 20).await;
    assert_eq!(view["pages"], 10, "{view}");
    for p in &pages {
        assert_eq!(origin.renders(p), 2, "{p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_against_an_origin_answering_503_keeps_the_stale_copies_and_regions_say_why() {
    let c = Cluster::start_as(
        2,
        "xkey",
        CoordinatorOpts {
            extra: MONITORED.into(),
            ..refresh_warm(30, "origin_budget_rps = 20\nsatellite_rate = 100\n")
        },
        true,
    )
    .await;
    let pages = products(5);
    prewarm(&c, &pages).await;
    assert_eventually!(
        20,
        health(&c).await.iter().all(|(_, h, _, _)| h == "up"),
        "regions not up: {:?}",
        health(&c).await
    );
    // Magento answers 503 to every page (its health check still 200, as in maintenance
    // mode); a reindex purges them.
    c.origin.origin.set_fail_every(1);
    let seq = purge_tags(c.coordinator.purge, &["cat_p"]).await;
    c.wait_applied(seq).await;
    let mut last;
    assert_eventually!(
        20,
        {
            last = progress(&c, seq).await;
            last.as_ref()
                .is_some_and(|r| r["errors"].as_u64() > Some(0))
        },
        "the refresh's failed fetches are not counted: {last:?}"
    );
    for (i, v) in c.varnish.iter().enumerate() {
        for p in &pages {
            let r = get(v.http, p).await;
            assert_eq!(
                (r.status, render_of(&r)),
                (200, 1),
                "{p} in region-{i}: {r:?}"
            );
        }
    }
    // Every refresh fetch fails: the regions do not say all is fine, they say the origin
    // is down while they serve from their caches.
    assert_eventually!(
        20,
        health(&c)
            .await
            .iter()
            .all(|(_, h, d, _)| h == "degraded" && d == "origin_down"),
        "every page fetch from the origin fails, the regions say: {:?}; the refresh: {:?}",
        health(&c).await,
        progress(&c, seq).await
    );
}
