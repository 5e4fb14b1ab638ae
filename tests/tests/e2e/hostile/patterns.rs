//! Purge patterns that could hurt varnish, against real varnishd: a backtracking tag
//! pattern or X-Pool regex is refused (and no varnishd child panics while every cached
//! page is requested again), with `allow_regex` the trial match still refuses them while
//! a harmless regex is applied, URL purges with every special character ban exactly
//! that URL (never a full ban), and a varnishd child panic (or a killed child) makes
//! the region `varnish_restarted`, with an alert naming the last applied purge, until it
//! clears.
//! Figures are printed as `figure:` lines.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{
    assert_eventually, get, magento_purge, purge_tags, raw, regions, temp_dir, AgentProc,
    CoordinatorOpts, CoordinatorProc, VarnishNode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An ordinary tag header of a few KiB, the subject the backtracking pattern chokes on.
fn long_tags() -> String {
    (0..150)
        .map(|i| format!("cat_p_{},cat_c_{}", 1234 + i, 56 + i))
        .collect::<Vec<_>>()
        .join(",")
}

/// An origin that answers every request, whatever bytes its URL holds, with a
/// cacheable page carrying `long_tags()` (and `X-Pool: aaa…a!` under `/pool/`).
async fn raw_origin() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind origin");
    let addr = listener.local_addr().expect("origin addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&buf);
                let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                let pool = if path.starts_with("/pool/") {
                    format!("X-Pool: {}!\r\n", "a".repeat(30))
                } else {
                    String::new()
                };
                let body = format!("page {path}\n");
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nCache-Control: public, max-age=86400, s-maxage=86400\r\nX-Magento-Tags: {}\r\n{pool}Content-Length: {}\r\nConnection: close\r\n\r\n",
                    long_tags(),
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    addr
}

/// One region (varnishd + agent in ban mode) behind a coordinator, on [`raw_origin`].
struct Edge {
    _dir: tempfile::TempDir,
    c: CoordinatorProc,
    v: VarnishNode,
    _agent: AgentProc,
}

async fn edge(purge_extra: &str) -> Edge {
    tests::require_varnish();
    let dir = temp_dir();
    let origin = raw_origin().await;
    let v = VarnishNode::start(&dir.path().join("r0"), origin).await;
    let c = CoordinatorProc::start(
        &dir.path().join("coordinator"),
        &CoordinatorOpts {
            purge_extra: purge_extra.to_owned(),
            regions: regions(1, origin),
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let agent = AgentProc::start(&dir.path().join("r0"), "edge-0", "region-0", &c, &v, "ban");
    assert_eventually!(
        30,
        c.applied_everywhere(0, 1).await,
        "the agent did not connect"
    );
    Edge {
        _dir: dir,
        c,
        v,
        _agent: agent,
    }
}

/// Requests `path` until varnish serves it from cache.
async fn cache(v: &VarnishNode, path: &str) {
    assert_eq!(get(v.http, path).await.status, 200, "{path}");
    assert_eventually!(
        10,
        get(v.http, path).await.cache() == "HIT",
        "{path} is not cached"
    );
}

const PAGES: [&str; 4] = ["/p/1", "/p/2", "/c/3", "/pool/blue"];

/// varnishd's child: (panics, uptime in seconds).
fn child(v: &VarnishNode) -> (u64, u64) {
    (v.counter("MGT.child_panic"), v.counter("MAIN.uptime"))
}

/// Requests every cached page again: all still HITs, and no child panicked or restarted.
async fn no_panic_while_every_page_is_requested(v: &VarnishNode, before: (u64, u64)) {
    for p in PAGES {
        let r = get(v.http, p).await;
        assert_eq!((r.status, r.cache()), (200, "HIT"), "{p}");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = child(v);
    assert_eq!(after.0, before.0, "varnishd's child panicked");
    assert!(after.1 >= before.1, "varnishd's child restarted: {after:?}");
}

const BACKTRACKING_TAGS: &str = "^([a-z0-9_,]+)+,$";
const BACKTRACKING_POOL: &str = "^(a+)+$";

/// Sends a purge that must be refused; its 400's reason.
async fn refused(purge: SocketAddr, request: &[u8]) -> String {
    let r = raw(purge, request).await.expect("purge answered");
    assert_eq!(r.status, 400, "{}", r.body);
    r.json()["error"].as_str().unwrap_or_default().to_owned()
}

fn pool_purge(pool: &str) -> Vec<u8> {
    format!("PURGE / HTTP/1.1\r\nX-Pool: {pool}\r\nHost: x\r\n\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backtracking_patterns_are_refused_and_no_varnishd_child_panics() {
    let e = edge("").await;
    for p in PAGES {
        cache(&e.v, p).await;
    }
    let before = child(&e.v);
    let error = refused(e.c.purge, &magento_purge(BACKTRACKING_TAGS)).await;
    assert!(
        error.contains("((^|,)TAG(,|$))") && error.contains("allow_regex"),
        "{error}"
    );
    let error = refused(e.c.purge, &pool_purge(BACKTRACKING_POOL)).await;
    assert!(error.contains("plain pool name"), "{error}");
    assert_eq!(e.c.head().await, 0, "nothing refused may be logged");
    no_panic_while_every_page_is_requested(&e.v, before).await;

    // What Magento does send still works: a tag purge and a plain pool name.
    let seq = purge_tags(e.c.purge, &["cat_p_1240"]).await;
    let r = raw(e.c.purge, &pool_purge("^blue$")).await.expect("pool");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eventually!(
        30,
        e.c.applied_everywhere(seq + 1, 1).await,
        "purges not applied"
    );
    assert_eq!(get(e.v.http, "/p/1").await.cache(), "MISS");
    assert_eq!(child(&e.v).0, before.0, "varnishd's child panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_allow_regex_the_trial_match_still_refuses_them_and_a_harmless_regex_applies() {
    let e = edge("allow_regex = true\n").await;
    for p in PAGES {
        cache(&e.v, p).await;
    }
    let before = child(&e.v);
    let started = Instant::now();
    let error = refused(e.c.purge, &magento_purge(BACKTRACKING_TAGS)).await;
    let refused_in = started.elapsed();
    assert!(error.contains("pcre2_match_limit 10000"), "{error}");
    let error = refused(e.c.purge, &pool_purge(BACKTRACKING_POOL)).await;
    assert!(error.contains("pcre2_match_limit"), "{error}");
    assert_eq!(e.c.head().await, 0);
    no_panic_while_every_page_is_requested(&e.v, before).await;

    // A harmless opaque regex passes the trial and is applied (every page of this
    // origin carries cat_p_1234).
    let started = Instant::now();
    let r = raw(e.c.purge, &magento_purge("(^|,)cat_p_12(34|99)(,|$)"))
        .await
        .expect("regex purge");
    let accepted_in = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    let seq = r.json()["seq"].as_u64().expect("seq");
    assert_eventually!(
        30,
        e.c.applied_everywhere(seq, 1).await,
        "regex purge not applied"
    );
    assert_eq!(get(e.v.http, "/p/2").await.cache(), "MISS", "regex applied");
    // And an X-Pool regex: only the page with a matching X-Pool goes.
    cache(&e.v, "/pool/blue").await;
    cache(&e.v, "/c/9").await;
    let r = raw(e.c.purge, &pool_purge("^a+!$")).await.expect("pool");
    assert_eq!(r.status, 200, "{}", r.body);
    let seq = r.json()["seq"].as_u64().expect("seq");
    assert_eventually!(30, e.c.applied_everywhere(seq, 1).await, "pool purge");
    assert_eq!(get(e.v.http, "/pool/blue").await.cache(), "MISS");
    assert_eq!(
        get(e.v.http, "/c/9").await.cache(),
        "HIT",
        "a page without X-Pool was purged"
    );
    assert_eq!(child(&e.v).0, before.0, "varnishd's child panicked");
    eprintln!(
        "figure: trial match: backtracking pattern refused in {:.1} ms, harmless regex accepted in {:.1} ms (request round trips)",
        refused_in.as_secs_f64() * 1000.0,
        accepted_in.as_secs_f64() * 1000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_purges_with_every_special_character_ban_exactly_that_url() {
    let e = edge("").await;
    let mut specials: Vec<String> = (0x21u8..0x7f)
        .filter(u8::is_ascii_punctuation)
        .map(|b| char::from(b).to_string())
        .collect();
    specials.extend([
        "é".to_owned(),
        "€".to_owned(),
        "😀".to_owned(),
        "%22".to_owned(),
    ]);
    specials.push("\\\"".to_owned()); // a backslash before a quote
    let paths: Vec<String> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| format!("/u/{i}/a{s}b"))
        .collect();
    for p in &paths {
        cache(&e.v, p).await;
    }
    cache(&e.v, "/u/control").await;

    // A space cannot reach varnish's CLI intact: refused, not a full ban.
    let r =
        e.c.call(
            "POST",
            "/api/v1/purges",
            Some(&json!({"url": "/u/a b", "host": ""})),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"]
        .as_str()
        .unwrap_or_default()
        .contains("%20"));

    let mut last = 0;
    for (i, p) in paths.iter().enumerate() {
        // Every third through the CLI (`coordinator purge --url`), the rest by the API.
        if i % 3 == 0 {
            let (code, out, err) = e.c.cli(&["purge", "--url", p]);
            assert_eq!(code, 0, "{p}: {out} {err}");
            last = e.c.head().await;
        } else {
            let r =
                e.c.call("POST", "/api/v1/purges", Some(&json!({"url": p})))
                    .await;
            assert_eq!(r.status, 200, "{p}: {}", r.body);
            last = r.json()["seq"].as_u64().expect("seq");
        }
    }
    assert_eq!(last, paths.len() as u64);
    assert_eventually!(
        30,
        e.c.applied_everywhere(last, 1).await,
        "URL purges not applied"
    );
    let edges = e.c.edges().await;
    assert_eq!(
        edges[0]["full_bans"], 0,
        "a URL purge became a full ban: {edges:?}"
    );
    for seq in 1..=last {
        let view: Value = tests::get_json(e.c.api, &format!("/api/v1/purges/{seq}"))
            .await
            .unwrap_or(Value::Null);
        let error = &view["edges"]["edge-0"]["error"];
        assert!(error.is_null(), "purge {seq}: {view}");
    }
    for p in &paths {
        assert_eq!(get(e.v.http, p).await.cache(), "MISS", "{p} was not purged");
    }
    assert_eq!(
        get(e.v.http, "/u/control").await.cache(),
        "HIT",
        "another page was purged too"
    );
    let bans = e.v.admin("ban.list").await;
    assert!(bans.contains("req.url == /u/0/a!b"), "{bans}");
    eprintln!(
        "figure: {} URL purges with special characters, 0 full bans",
        paths.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_varnishd_child_panic_degrades_the_region_naming_the_last_purge_then_clears() {
    let (hook, got) = crate::monitor::receiver().await;
    let extra = format!(
        "[monitoring]\nvarnish_restart_s = 8\n[alerts]\nwebhooks = [\"http://{hook}/hook\"]\ngroup_ms = 500\n"
    );
    let cluster = tests::Cluster::start(
        2,
        "ban",
        CoordinatorOpts {
            extra,
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let c = &cluster.coordinator;
    let region = |name: &'static str| async move {
        let all = c.call("GET", "/api/v1/regions", None).await.json();
        all.as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eventually!(
        20,
        region("region-0").await["health"] == "up" && region("region-1").await["health"] == "up",
        "regions not up"
    );
    let seq = purge_tags(c.purge, &["cat_p_1"]).await;
    cluster.wait_applied(seq).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // a counter sample after the apply
    assert_eq!(get(cluster.varnish[0].http, "/p/5").await.status, 200);

    // Panic region-0's varnishd child through its CLI (the command never answers).
    let v = &cluster.varnish[0];
    let secret = std::fs::read(&v.secret).expect("secret");
    let mut admin =
        edge_agent::varnish::admin::AdminClient::connect(v.admin, &secret, Duration::from_secs(5))
            .await
            .expect("admin");
    let _ = admin.command("debug.panic.worker").await;
    let panicked_at = Instant::now();
    assert_eventually!(
        20,
        region("region-0").await["diagnosis"] == "varnish_restarted",
        "region-0 not varnish_restarted: {}",
        region("region-0").await
    );
    let seen_in = panicked_at.elapsed();
    let r0 = region("region-0").await;
    assert_eq!(r0["health"], "degraded", "{r0}");
    let error = r0["health_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("edge-0")
            && error.contains("panicked")
            && error.contains(&format!("seq {seq}")),
        "{error}"
    );
    assert_eq!(r0["varnish_restart"]["applied_seq"], seq, "{r0}");
    assert_eq!(r0["varnish_restart"]["panic"], true, "{r0}");
    assert_eq!(region("region-1").await["health"], "up");
    assert!(v.counter("MGT.child_panic") >= 1);

    // One alert names it, with the seq.
    assert_eventually!(
        15,
        got.lock().expect("lock").iter().any(|a| {
            a["alerts"].as_array().into_iter().flatten().any(|c| {
                c["region"] == "region-0"
                    && c["diagnosis"] == "varnish_restarted"
                    && c["last_error"]
                        .as_str()
                        .is_some_and(|e| e.contains(&format!("seq {seq}")))
            })
        }),
        "no varnish_restarted alert: {:?}",
        got.lock().expect("lock")
    );
    // It clears by itself once the restart is older than varnish_restart_s.
    assert_eventually!(
        30,
        region("region-0").await["health"] == "up",
        "region-0 did not clear: {}",
        region("region-0").await
    );
    let cleared_in = panicked_at.elapsed();
    assert!(region("region-0").await["varnish_restart"].is_null());

    // Killing the cache process (no panic counted; its uptime starts again) is seen too.
    let seq = purge_tags(c.purge, &["cat_p_2"]).await;
    cluster.wait_applied(seq).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let workdir = v.workdir.display().to_string();
    let cache_main: Vec<u32> = tests::pids_of("varnishd", &workdir)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "cache-main")
        })
        .collect();
    assert_eq!(cache_main.len(), 1, "one cache process: {cache_main:?}");
    let killed = std::process::Command::new("kill")
        .args(["-9", &cache_main[0].to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    assert_eventually!(
        20,
        region("region-0").await["health_error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("seq {seq}"))),
        "the kill is not seen: {}",
        region("region-0").await
    );
    let r0 = region("region-0").await;
    assert_eq!(r0["diagnosis"], "varnish_restarted", "{r0}");
    assert_eq!(r0["varnish_restart"]["panic"], false, "{r0}");
    assert_eventually!(
        30,
        region("region-0").await["health"] == "up",
        "region-0 did not clear after the kill"
    );
    eprintln!(
        "figure: varnishd child panic seen as varnish_restarted after {:.1} s, cleared after {:.1} s (varnish_restart_s = 8)",
        seen_in.as_secs_f64(),
        cleared_in.as_secs_f64()
    );
}
