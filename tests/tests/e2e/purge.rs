//! Magento's purges reach every region and purge exactly what they name.

use tests::{
    assert_eventually, get, magento_purge, purge_tags, raw, tags_pattern, Cluster, CoordinatorOpts,
};

/// Caches `paths` in every region (MISS then HIT).
async fn warm(cluster: &Cluster, paths: &[&str]) {
    for v in &cluster.varnish {
        for p in paths {
            get(v.http, p).await;
            let r = get(v.http, p).await;
            assert_eq!(r.cache(), "HIT", "{p} not cached on {}", v.http);
        }
    }
}

async fn cache_state(cluster: &Cluster, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    for v in &cluster.varnish {
        out.push(get(v.http, path).await.cache().to_owned());
    }
    out
}

async fn assert_purged(cluster: &Cluster, path: &str) {
    for v in &cluster.varnish {
        let r = get(v.http, path).await;
        assert_eq!(
            r.cache(),
            "MISS",
            "{path} should have been purged on {}",
            v.http
        );
    }
}

async fn assert_cached(cluster: &Cluster, path: &str) {
    let states = cache_state(cluster, path).await;
    assert!(
        states.iter().all(|s| s == "HIT"),
        "{path} should still be cached everywhere: {states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn magento_bytes_purge_exactly_the_tagged_pages_in_every_region() {
    let c = Cluster::start(3, "ban", CoordinatorOpts::default()).await;
    warm(&c, &["/p/1", "/p/2", "/c/1", "/untagged/a"]).await;

    // Magento's exact request, on a fresh connection, no Content-Length.
    let r = raw(
        c.coordinator.purge,
        &magento_purge(&tags_pattern(&["cat_p_1", "cat_c_1"])),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length")
            .map(|v| v.parse::<usize>().unwrap()),
        Some(r.body.len())
    );
    let seq = r.json()["seq"].as_u64().expect("seq");
    assert_eq!(r.header("x-purge-seq"), Some(seq.to_string().as_str()));

    c.wait_applied(seq).await;
    let p = tests::get_json(c.coordinator.api, &format!("/api/v1/purges/{seq}"))
        .await
        .expect("purge status");
    let edges = p["edges"].as_object().expect("edges");
    assert_eq!(edges.len(), 3);
    assert!(edges.values().all(|e| e["applied_at"].is_string()), "{p}");
    assert_eq!(p["op"]["tags"], serde_json::json!(["cat_c_1", "cat_p_1"]));

    assert_purged(&c, "/p/1").await;
    assert_purged(&c, "/c/1").await;
    assert_cached(&c, "/p/2").await;
    assert_cached(&c, "/untagged/a").await;

    // `coordinator purge --wait` returns once every connected edge applied it, per edge.
    let (code, out, err) = c.coordinator.cli(&["purge", "--tag", "cat_p_2", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.matches("ms after receipt").count(), 3, "{out}");
    assert!(out.contains("edge-2"), "{out}");
    assert_purged(&c, "/p/2").await;

    // An edge whose varnishd is gone: --wait gives up, names it and says why (exit 1).
    let mut c = c;
    c.varnish[2].kill9().await;
    let (code, out, err) =
        c.coordinator
            .cli(&["purge", "--tag", "cat_p_3", "--wait", "--timeout-s", "3"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("not applied within 3s by edge-2"), "{err}");
    assert_eq!(out.matches("ms after receipt").count(), 2, "{out}");
    assert!(
        out.contains("edge-2") && out.contains("not applied yet"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_full_flush_regex_and_pool() {
    let opts = CoordinatorOpts {
        purge_extra: "allow_regex = true\n".into(),
        ..CoordinatorOpts::default()
    };
    let c = Cluster::start(2, "ban", opts).await;
    warm(
        &c,
        &[
            "/p/3",
            "/p/399",
            "/p/5000",
            "/p/1007",
            "/p/1008",
            "/p/1009",
            "/untagged/x?pool=blue",
            "/untagged/y?pool=green",
        ],
    )
    .await;

    // A ~7.7 KB multi-tag chunk, as Magento splits big tag lists.
    let tags: Vec<String> = (0..400).map(|i| format!("cat_p_{i}")).collect();
    let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    let pattern = tags_pattern(&refs);
    assert!(pattern.len() > 7000, "{}", pattern.len());
    let seq = purge_tags(c.coordinator.purge, &refs).await;
    c.wait_applied(seq).await;
    assert_purged(&c, "/p/3").await;
    assert_purged(&c, "/p/399").await;
    assert_cached(&c, "/p/5000").await;

    // An opaque regex (not Magento's canonical form), taken under `allow_regex`.
    let r = raw(c.coordinator.purge, &magento_purge("cat_p_100(7|8)(,|$)"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    c.wait_applied(r.json()["seq"].as_u64().unwrap()).await;
    assert_purged(&c, "/p/1007").await;
    assert_purged(&c, "/p/1008").await;
    assert_cached(&c, "/p/1009").await;

    // X-Pool.
    let r = raw(
        c.coordinator.purge,
        b"PURGE / HTTP/1.1\r\nX-Pool: ^blue$\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    c.wait_applied(r.json()["seq"].as_u64().unwrap()).await;
    assert_purged(&c, "/untagged/x?pool=blue").await;
    assert_cached(&c, "/untagged/y?pool=green").await;

    // Full flush: everything goes, tagged or not.
    let r = raw(c.coordinator.purge, &magento_purge(".*"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    c.wait_applied(r.json()["seq"].as_u64().unwrap()).await;
    assert_purged(&c, "/p/5000").await;
    assert_purged(&c, "/untagged/y?pool=green").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xkey_mode_purges_without_bans_and_soft_purge_serves_stale() {
    let c = Cluster::start(2, "xkey", CoordinatorOpts::default()).await;
    warm(&c, &["/p/11", "/p/12", "/p/13"]).await;
    let bans_before: Vec<usize> = {
        let mut v = Vec::new();
        for n in &c.varnish {
            v.push(n.admin("ban.list").await.lines().count());
        }
        v
    };

    // Hard purge through xkey: a MISS, and the ban list did not grow.
    let seq = purge_tags(c.coordinator.purge, &["cat_p_12"]).await;
    c.wait_applied(seq).await;
    assert_purged(&c, "/p/12").await;
    assert_cached(&c, "/p/13").await;
    for (n, before) in c.varnish.iter().zip(&bans_before) {
        assert_eq!(
            n.admin("ban.list").await.lines().count(),
            *before,
            "xkey purge added a ban"
        );
    }

    // Soft purge: the stale copy is served while a background fetch refreshes it.
    let renders_before = c.origin.origin.renders("/p/11");
    let mut bodies_before = Vec::new();
    for v in &c.varnish {
        bodies_before.push(get(v.http, "/p/11").await.body);
    }
    let req = format!(
        "PURGE / HTTP/1.1\r\nX-Magento-Tags-Pattern: {}\r\nX-Magento-Purge-Soft: 1\r\nHost: x\r\n\r\n",
        tags_pattern(&["cat_p_11"])
    );
    let r = raw(c.coordinator.purge, req.as_bytes()).await.unwrap();
    assert_eq!(r.status, 200);
    c.wait_applied(r.json()["seq"].as_u64().unwrap()).await;
    for (v, before) in c.varnish.iter().zip(&bodies_before) {
        let r = get(v.http, "/p/11").await;
        assert_eq!(
            r.cache(),
            "HIT",
            "soft-purged page should be served from grace"
        );
        assert_eq!(
            &r.body, before,
            "the stale copy is served while it refreshes"
        );
    }
    let origin = c.origin.origin.clone();
    assert_eventually!(
        10,
        origin.renders("/p/11") >= renders_before + 2,
        "background refresh in both regions"
    );
}

/// A purge storm (here ~1,000/s from 8 Magento-style clients) adds at most one ban per
/// purge window (20 ms) to the edge's ban list, not one per batch, and every purge is
/// still applied, exactly: the batches arrive as range entries (runs of tag purges
/// merged by the coordinator), and the pages they name are purged, the others kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_storm_adds_at_most_one_ban_per_window() {
    let cluster = tests::Cluster::start(1, "ban", tests::CoordinatorOpts::default()).await;
    let c = &cluster.coordinator;
    let named: Vec<String> = (0..8).map(|k| format!("/p/{}", 11 + k)).collect();
    let mut paths: Vec<&str> = named.iter().map(String::as_str).collect();
    paths.push("/p/30");
    warm(&cluster, &paths).await;
    let bans_before = cluster.varnish[0].counter("MAIN.bans_added");
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    for k in 0..8 {
        let purge = c.purge;
        clients.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..60 {
                // Mid-storm, each client also names one cached page.
                let page = format!("cat_p_{}", 11 + k);
                let storm = format!("storm_{k}_{i}");
                let tags: Vec<&str> = if i == 30 {
                    vec![&storm, &page]
                } else {
                    vec![&storm]
                };
                last = tests::purge_tags(purge, &tags).await;
            }
            last
        }));
    }
    let mut head = 0;
    for t in clients {
        head = head.max(t.await.expect("client"));
    }
    cluster.wait_applied(head).await;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let added = cluster.varnish[0].counter("MAIN.bans_added") - bans_before;
    let bound = (elapsed_ms / 20.0).ceil() as u64 + 2;
    assert!(
        added <= bound,
        "{added} bans for 480 purges in {elapsed_ms:.0} ms: more than one per 20 ms window ({bound})"
    );
    eprintln!("480 purges in {elapsed_ms:.0} ms: {added} bans (bound {bound})");
    for p in &named {
        assert_purged(&cluster, p).await;
    }
    assert_cached(&cluster, "/p/30").await;
}
