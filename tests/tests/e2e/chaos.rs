//! Bad days: poison purges, partitions, varnishd restarts, dead edges during warm jobs,
//! broken pushes over a rollout in flight, regions without a (working) agent. Each test
//! asserts that nothing acknowledged is lost, nothing unrelated is held back, and health
//! says what is true. Measured figures are printed as `figure:` lines
//! (`cargo test -p tests --test e2e chaos -- --nocapture`).

use std::process::Command;
use std::time::{Duration, Instant};

use coordinator::api::views::{Diagnosis, Health};
use serde_json::{json, Value};
use tests::{
    assert_eventually, assert_stays, bin_dir, get, magento_purge, pids_of, purge_tags, raw,
    AgentProc, Cluster, CoordinatorOpts, CoordinatorProc, Proxy,
};

/// `coordinator status` (optionally `--json`) against the cluster: (exit code, stdout).
fn status(c: &CoordinatorProc, json: bool) -> (i32, String) {
    let (code, out, _) = c.cli(if json {
        &["status", "--json"]
    } else {
        &["status"]
    });
    (code, out)
}

async fn healthz(c: &CoordinatorProc) -> Value {
    tests::get_json(c.api, "/healthz")
        .await
        .unwrap_or(Value::Null)
}

async fn purge_view(c: &CoordinatorProc, seq: u64) -> Value {
    tests::get_json(c.api, &format!("/api/v1/purges/{seq}"))
        .await
        .unwrap_or(Value::Null)
}

/// A Magento-style alternation of about `bytes` with a non-tag tail: opaque to the
/// coordinator's tag parser, too large for PCRE2 past ~30 KB.
fn big_alternation(bytes: usize) -> String {
    let mut raw = String::new();
    let mut n = 0;
    while raw.len() < bytes {
        raw.push_str(&format!("((^|,)cat_p_{n}(,|$))|"));
        n += 1;
    }
    raw + "cat_x.*"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_purges_are_refused_or_applied_as_a_full_ban_and_never_stall() {
    let opts = CoordinatorOpts {
        purge_extra: "allow_regex = true\n".into(),
        ..CoordinatorOpts::default()
    };
    let mut cluster = Cluster::start(2, "ban", opts).await;
    let c = &cluster.coordinator;

    // Refused up front with the reason, nothing logged.
    let long_tag = format!("((^|,){}(,|$))", "t".repeat(60_000));
    for (name, pattern, reason) in [
        ("40 KB opaque regex", big_alternation(40_000), "too large"),
        ("60 KB tag", long_tag, "at most 1024"),
        ("Rust-only syntax", "(?u:cat)_p_1".to_owned(), "PCRE2"),
    ] {
        let r = raw(c.purge, &magento_purge(&pattern)).await.expect(name);
        assert_eq!(r.status, 400, "{name}: {}", r.body);
        let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains(reason), "{name}: {error}");
    }
    assert_eq!(c.head().await, 0, "nothing refused may be logged");

    // PCRE2-only syntax (a lookahead the regex crate refuses) is what varnish runs: it is
    // accepted and applied everywhere.
    let r = raw(c.purge, &magento_purge("((^|,)cat_p_3(?=,|$))"))
        .await
        .expect("lookahead purge");
    assert_eq!(r.status, 200, "{}", r.body);
    cluster.wait_applied(1).await;

    // An entry no varnish can apply that is already in the log (written by an older
    // coordinator, say): stop the coordinator and put it there directly.
    for v in &cluster.varnish {
        assert_eq!(get(v.http, "/p/42").await.status, 200);
        assert_eq!(get(v.http, "/p/42").await.cache(), "HIT");
    }
    cluster.coordinator.child.kill9().await;
    {
        let log = coordinator::purge::log::PurgeLog::open(
            &cluster.coordinator.state,
            coordinator::purge::log::Retention {
                max_entries: 1_000_000,
                max_age: Duration::from_secs(3600),
            },
        )
        .expect("open the log");
        let seq = log
            .append(vec![coordinator::purge::log::NewPurge {
                op: proto::edge::purge_entry::Op::TagsRegex(big_alternation(40_000)),
                soft: false,
            }])
            .await
            .expect("append the poison entry");
        assert_eq!(seq, 2);
    }
    // The log's writer thread lets go of the state in its own time: the coordinator starts
    // once it has.
    let mut refused = String::new();
    assert_eventually!(
        10,
        match cluster.coordinator.try_restart().await {
            Ok(()) => true,
            Err(e) => {
                refused = e;
                false
            }
        },
        "the coordinator does not start on its state: {refused}"
    );
    let c = &cluster.coordinator;
    let started = Instant::now();
    // Every edge moves past it (a full ban in its place) and applies what comes next.
    let next = purge_tags(c.purge, &["cat_p_7"]).await;
    assert_eq!(next, 3);
    cluster.wait_applied(next).await;
    let caught_up = started.elapsed();
    let view = purge_view(c, 2).await;
    for (edge, p) in view["edges"].as_object().expect("edges") {
        assert!(p["applied_at"].is_string(), "{edge}: {view}");
        let error = p["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("full ban") && error.contains("too large"),
            "{edge}: {view}"
        );
    }
    // The full ban really happened: the cached page is gone everywhere.
    for v in &cluster.varnish {
        assert_eq!(get(v.http, "/p/42").await.cache(), "MISS");
    }
    let metrics = get(c.api, "/metrics").await.body;
    for e in ["edge-0", "edge-1"] {
        assert!(
            metrics.contains(&format!(
                "coordinator_edge_purge_full_bans_total{{region=\"region-{}\",edge=\"{e}\"}} 1",
                &e[5..]
            )),
            "{metrics}"
        );
    }
    eprintln!(
        "figure: poison entry in the log: every edge past it and the next purge applied in {:.2} s; 0 purges lost",
        caught_up.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_region_is_lost_in_seconds_catches_up_and_holds_nobody_back() {
    let cluster = Cluster::start(2, "ban", CoordinatorOpts::default()).await;
    // A third region whose agent reaches the coordinator through a proxy we can cut.
    let proxy = Proxy::start(cluster.coordinator.grpc).await;
    let dir = cluster.dir.path().join("r2");
    let v2 = tests::VarnishNode::start(&dir, cluster.origin.addr).await;
    let tls = cluster.coordinator.agent_tls("edge-2", "region-2");
    let _agent = AgentProc::start_with(&dir, "edge-2", "region-2", &[proxy.addr], tls, &v2, "ban");
    let c = &cluster.coordinator;
    assert_eventually!(
        30,
        c.applied_everywhere(0, 3).await,
        "edge-2 did not connect"
    );
    assert_eventually!(10, c.health("region-2").await == "up", "region-2 not up");

    proxy.cut();
    let cut_at = Instant::now();
    // A purge burst while region-2 is cut off: the others apply every purge as it comes.
    let mut worst_others = Duration::ZERO;
    let mut last = 0;
    let mut saw_lag = false;
    for i in 0..100 {
        last = purge_tags(c.purge, &[&format!("cat_p_{i}")]).await;
        if i % 10 == 9 {
            let t = Instant::now();
            assert_eventually!(
                5,
                {
                    let edges = c.edges().await;
                    saw_lag |= edges
                        .iter()
                        .any(|e| e["id"] == "edge-2" && e["lag"].as_u64().unwrap_or(0) > 0);
                    edges
                        .iter()
                        .filter(|e| e["id"] != "edge-2")
                        .all(|e| e["applied_seq"].as_u64() >= Some(last))
                },
                "the healthy regions were held back at seq {last}"
            );
            worst_others = worst_others.max(t.elapsed());
        }
        // Pacing: a steady stream of purges, not a burst.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(saw_lag, "region-2's lag never showed");
    let mut lost_after = None;
    assert_eventually!(
        15,
        {
            let r = c.regions().await;
            let h = r.get("region-2");
            let down = h.is_some_and(|h| h.health == Health::Down);
            if down && lost_after.is_none() {
                lost_after = Some(cut_at.elapsed());
            }
            down && h.is_some_and(|h| h.diagnosis == Some(Diagnosis::AgentLost))
        },
        "a silent agent was not counted as lost: {:?}",
        c.regions().await.get("region-2")
    );
    assert_ne!(c.health("region-0").await, "down");
    let (code, _) = status(c, false);
    assert_eq!(code, 2, "status exits 2 while a region is down");
    assert_eq!(healthz(c).await["status"], "down");
    // A long partition: region-2 stays down throughout, the others are never taken with it.
    assert_stays!(
        20,
        c.health("region-2").await == "down" && c.health("region-0").await != "down",
        "during the partition: {:?}",
        c.regions().await
    );

    proxy.heal();
    let healed = Instant::now();
    assert_eventually!(
        60,
        c.edges().await.iter().any(|e| e["id"] == "edge-2"
            && e["connected"] == true
            && e["applied_seq"].as_u64() >= Some(last)),
        "edge-2 did not catch up: {:?}",
        c.edges().await
    );
    let catch_up = healed.elapsed();
    assert_eventually!(
        15,
        c.health("region-2").await == "up",
        "region-2 not back up"
    );
    eprintln!(
        "figure: partition: region-2 down (agent_lost) {:.1} s after the cut; others applied every purge within {:.2} s; caught up {} purges {:.1} s after the heal; 0 lost",
        lost_after.map_or(f64::NAN, |d| d.as_secs_f64()),
        worst_others.as_secs_f64(),
        last,
        catch_up.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varnishd_restarting_under_a_backlog_delays_only_its_own_edge() {
    // The restart empties region-0's cache: `varnish_restarted` for 3 s, then up.
    let opts = CoordinatorOpts {
        extra: "[monitoring]\nvarnish_restart_s = 3\n".into(),
        ..CoordinatorOpts::default()
    };
    let mut cluster = Cluster::start(2, "ban", opts).await;
    cluster.agents[0].kill9().await;
    let mut last = 0;
    for i in 0..300 {
        last = purge_tags(cluster.coordinator.purge, &[&format!("cat_p_{i}")]).await;
    }
    cluster.varnish[0].kill9().await;
    cluster.agents[0].restart();
    let c = &cluster.coordinator;
    // Region-1 never waits; region-0 cannot apply while its varnishd is down.
    assert_eventually!(
        10,
        c.edges()
            .await
            .iter()
            .any(|e| e["id"] == "edge-1" && e["applied_seq"].as_u64() >= Some(last)),
        "edge-1 held back"
    );
    let mut diagnosis;
    assert_eventually!(
        20,
        {
            let r = c.regions().await;
            diagnosis = r.get("region-0").and_then(|r| r.diagnosis);
            r.get("region-0")
                .is_some_and(|r| r.health == Health::Degraded)
        },
        "region-0 reads {:?} with its varnishd down",
        c.regions().await.get("region-0")
    );
    assert!(
        matches!(
            diagnosis,
            Some(Diagnosis::PurgeFailing | Diagnosis::VarnishUnreachable)
        ),
        "{diagnosis:?}"
    );
    let (code, table) = status(c, false);
    assert_eq!(
        code, 1,
        "status exits 1 while a region is degraded: {table}"
    );
    let restarted = Instant::now();
    cluster.varnish[0].restart().await;
    cluster.wait_applied(last).await;
    let caught_up = restarted.elapsed();
    assert_eventually!(
        15,
        c.health("region-0").await == "up",
        "region-0 not back up"
    );
    eprintln!(
        "figure: varnishd down under a 300-purge backlog: region-0 {} ; backlog applied {:.1} s after varnishd came back; 0 lost",
        diagnosis.map(Diagnosis::as_str).unwrap_or("-"),
        caught_up.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_varnishd_never_holds_warm_jobs() {
    let mut cluster = Cluster::start(
        3,
        "ban",
        CoordinatorOpts {
            warm_extra: "origin_budget_rps = 300\nrewarm_after_purge = true\nrewarm_debounce_ms = 300\nedge_timeout_s = 5\n".into(),
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let sitemap = format!("http://{}/sitemap.xml?products=40", cluster.origin.addr);
    let c = &cluster.coordinator;
    let id = c
        .start_warm_job(&json!({"sitemap": sitemap, "host": "shop.test"}))
        .await;
    assert_eq!(c.warm_finished(id, 60).await["state"], "done");

    // Region-2's varnishd dies. A tag purge queues a re-warm that region-2 cannot start
    // (it cannot apply the purge), and a job for the healthy regions comes after it.
    cluster.varnish[2].kill9().await;
    let c = &cluster.coordinator;
    let seq = purge_tags(c.purge, &["cat_p_5"]).await;
    let mut rewarm;
    assert_eventually!(
        10,
        {
            let jobs = c.call("GET", "/api/v1/warm/jobs", None).await.json();
            rewarm = jobs["jobs"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|j| j["kind"] == "rewarm")
                .and_then(|j| j["id"].as_u64());
            rewarm.is_some()
        },
        "no re-warm queued for seq {seq}"
    );
    let started = Instant::now();
    let healthy = c
        .start_warm_job(
            &json!({"urls": [format!("http://{}/p/1", cluster.origin.addr)], "host": "shop.test",
               "regions": ["region-0", "region-1"]}),
        )
        .await;
    let view = c.warm_finished(healthy, 30).await;
    assert_eq!(view["state"], "done", "{view}");
    let healthy_took = started.elapsed();
    let rewarm = rewarm.expect("re-warm id");
    assert_eq!(
        c.warm_job(rewarm).await["state"],
        "running",
        "region-2 is still waited for"
    );
    let view = c.warm_finished(rewarm, 30).await;
    let rewarm_took = started.elapsed();
    assert_eq!(view["state"], "done", "{view}");
    assert_eq!(view["regions"]["region-2"]["status"], "dropped", "{view}");
    let why = view["regions"]["region-2"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("has not applied purge"), "{view}");
    assert_eq!(view["regions"]["region-2"]["eta_s"], Value::Null);
    assert_eq!(view["regions"]["region-0"]["status"], "done");

    // A full job while region-2 is still dead: its edge is dropped (every fetch fails),
    // the job ends done with that region's reason.
    let id = c
        .start_warm_job(&json!({"sitemap": sitemap, "host": "shop.test"}))
        .await;
    let view = c.warm_finished(id, 60).await;
    assert_eq!(view["state"], "done", "{view}");
    assert_eq!(view["regions"]["region-2"]["status"], "dropped", "{view}");
    assert_eq!(view["regions"]["region-1"]["status"], "done", "{view}");
    eprintln!(
        "figure: dead varnishd in region-2: re-warm ended in {:.1} s with region-2 dropped; the healthy regions' job done {:.1} s after it was queued",
        rewarm_took.as_secs_f64(),
        healthy_took.as_secs_f64()
    );
}

fn waf_bundle(dir: &std::path::Path, waf: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("bundle dir");
    let mut b = coordinator_cli::demo::sample_bundle();
    b.files.insert("waf.toml".into(), waf.into());
    for (name, text) in &b.files {
        std::fs::write(dir.join(name), text).expect("write bundle");
    }
    dir.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_push_over_a_rollout_in_flight_keeps_what_each_edge_ran() {
    let cluster = Cluster::start(
        3,
        "ban",
        CoordinatorOpts {
            extra: "[rollout]\ncanary_region = \"region-0\"\ncanary_wait_s = 600\nhealth_path = \"/health_check.php\"\n".into(),
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let c = &cluster.coordinator;
    let cli = |args: &[&str]| {
        let (code, out, err) = c.cli(args);
        (code == 0, out, err)
    };
    // B0 everywhere, then B1 (a new WAF rule) held on the canary (canary_wait_s = 600).
    let b0 = waf_bundle(&cluster.dir.path().join("b0"), "");
    let (ok, out, err) = cli(&[
        "config",
        "push",
        b0.to_str().unwrap(),
        "--no-canary",
        "--wait",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.trim_end().lines().last().unwrap_or("").contains("done"),
        "{out}"
    );
    let b1 = waf_bundle(
        &cluster.dir.path().join("b1"),
        "[[block]]\nprefix = \"/secret\"\n",
    );
    let (ok, out, err) = cli(&["config", "push", b1.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert_eventually!(
        60,
        get(cluster.varnish[0].http, "/secret").await.status == 403,
        "B1 never reached the canary"
    );
    // A broken B2 while B1 is in flight: refused without --force...
    let b2 = waf_bundle(
        &cluster.dir.path().join("b2"),
        "[[block]]\nprefix = \"/secret\"\n",
    );
    // Passes the coordinator's checks; only varnishd's compiler refuses it.
    let vcl = std::fs::read_to_string(b2.join("main.vcl")).expect("main.vcl");
    assert!(vcl.contains("sub vcl_recv {"));
    let broken = vcl.replacen("sub vcl_recv {", "sub vcl_recv {\n    this is not vcl;", 1);
    std::fs::write(b2.join("main.vcl"), broken).expect("break B2");
    let (ok, _, err) = cli(&["config", "push", b2.to_str().unwrap(), "--wait"]);
    assert!(!ok && err.contains("--force"), "{err}");
    // ...and with it, it fails on the canary, which goes back to B1, not B0.
    let (ok, out, err) = cli(&["config", "push", b2.to_str().unwrap(), "--wait", "--force"]);
    assert!(!ok, "a failed rollout exits non-zero: {out}{err}");
    let last_line = out.trim_end().lines().last().unwrap_or("").to_owned();
    assert!(last_line.contains("failed"), "outcome line: {out}");
    assert_stays!(
        3,
        get(cluster.varnish[0].http, "/secret").await.status == 403,
        "the canary lost B1's rule"
    );
    let view = c.config().await;
    let b1_version = view["edges"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["id"] == "edge-0"))
        .map(|e| e["target_version"].clone());
    let active0 = view["edges"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["id"] == "edge-0"))
        .map(|e| e["active_version"].clone());
    assert_eq!(b1_version, active0, "edge-0 targets what it runs: {view}");
    // The fleet never left B0.
    for v in &cluster.varnish[1..] {
        assert_ne!(get(v.http, "/secret").await.status, 403);
    }
    eprintln!("figure: broken push over B1 in flight: 409 without --force; with it the canary stays on B1 (rule enforced), outcome line {last_line:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_the_truth_for_missing_frozen_and_misconfigured_agents() {
    let mut cluster = Cluster::start(
        2,
        "ban",
        CoordinatorOpts {
            extra: "[[regions]]\nname = \"region-9\"\n".into(),
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let c = &cluster.coordinator;
    // A configured region with no agent.
    let r = c.regions().await;
    assert_eq!(
        r.get("region-9").map(|r| (r.health, r.diagnosis)),
        Some((Health::Down, Some(Diagnosis::NoAgents))),
        "{:?}",
        r.get("region-9")
    );
    let (code, out) = status(c, true);
    assert_eq!(code, 2);
    let parsed: Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert!(parsed.as_array().is_some_and(|a| a.len() == 3), "{out}");
    assert_eq!(
        healthz(c).await["regions_not_up"]["region-9"]["diagnosis"],
        "no_agents"
    );

    // A frozen agent (socket open, nothing said) is lost within three report intervals.
    let frozen = Instant::now();
    cluster.agents[1].child.suspend();
    let c = &cluster.coordinator;
    assert_eventually!(
        10,
        {
            let r = c.regions().await;
            r.get("region-1").is_some_and(|r| {
                r.health == Health::Down && r.diagnosis == Some(Diagnosis::AgentLost)
            })
        },
        "frozen agent still counted: {:?}",
        c.regions().await.get("region-1")
    );
    let frozen_lost = frozen.elapsed();
    cluster.agents[1].child.resume();
    assert_eventually!(30, c.health("region-1").await == "up", "region-1 not back");

    // An agent that cannot authenticate to its varnish (every purge fails): degraded.
    // (Its own copy of the secret is wrong; varnishd re-reads its -S file at every
    // login, so that one stays right.)
    let real = cluster.varnish[0].secret.clone();
    let good = std::fs::read(&real).expect("secret");
    let secret = cluster.dir.path().join("agent-0-secret");
    std::fs::write(&secret, b"not-the-secret\n").expect("wrong secret");
    cluster.agents[0].kill9().await;
    let text = std::fs::read_to_string(&cluster.agents[0].config).expect("agent config");
    std::fs::write(
        &cluster.agents[0].config,
        text.replace(real.to_str().unwrap(), secret.to_str().unwrap()),
    )
    .expect("agent config");
    cluster.agents[0].restart();
    let c = &cluster.coordinator;
    assert_eventually!(20, c.applied_everywhere(0, 2).await, "edge-0 not back");
    let seq = purge_tags(c.purge, &["cat_p_1"]).await;
    let failing = Instant::now();
    assert_eventually!(
        15,
        {
            let r = c.regions().await;
            r.get("region-0").is_some_and(|r| {
                r.health == Health::Degraded && r.diagnosis == Some(Diagnosis::PurgeFailing)
            })
        },
        "an agent failing every purge reads {:?}",
        c.regions().await.get("region-0")
    );
    let to_degraded = failing.elapsed();
    let (code, table) = status(c, false);
    assert_eq!(code, 2, "region-9 is still down: {table}");
    assert!(table.contains("purge_failing"), "{table}");
    assert!(
        table.contains("authentication"),
        "the reason is shown: {table}"
    );
    assert_eq!(
        purge_view(c, seq).await["edges"]["edge-0"]["applied_at"],
        Value::Null
    );
    // Fixed: the retried purge lands and the region is up again.
    std::fs::write(&secret, &good).expect("restore secret");
    cluster.wait_applied(seq).await;
    assert_eventually!(15, c.health("region-0").await == "up", "region-0 not up");

    // Bad config is caught at start: one line, non-zero.
    let bad = cluster.dir.path().join("bad-agent.toml");
    let text = std::fs::read_to_string(&cluster.agents[0].config).expect("agent config");
    let text = text.replace(secret.to_str().unwrap(), "/nonexistent/secret");
    std::fs::write(&bad, text).expect("bad config");
    let out = Command::new(bin_dir().join("edge-agent"))
        .args(["--config", bad.to_str().unwrap()])
        .output()
        .expect("run edge-agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("secret_file"), "{stderr}");

    // A dead varnishd shows no live figures.
    cluster.varnish[1].kill9().await;
    let c = &cluster.coordinator;
    assert_eventually!(
        15,
        {
            let r = c.regions().await;
            r.get("region-1").is_some_and(|r1| {
                r1.stats_stale
                    && r1.objects.is_none()
                    && r1.hit_ratio.m1.is_none()
                    && r1.health != Health::Up
            })
        },
        "a dead varnishd's region still shows live figures: {:?}",
        c.regions().await.get("region-1")
    );
    eprintln!(
        "figure: health: frozen agent down (agent_lost) after {:.1} s; failing purges degraded (purge_failing) after {:.1} s",
        frozen_lost.as_secs_f64(),
        to_degraded.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shopper_hit_ratio_excludes_warm_traffic_exactly() {
    let cluster = Cluster::start(
        1,
        "ban",
        CoordinatorOpts {
            warm_extra: "origin_budget_rps = 300\n".into(),
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let c = &cluster.coordinator;
    // A baseline stats sample first, so the warm pass lands in the deltas.
    assert_eventually!(
        10,
        c.regions()
            .await
            .get("region-0")
            .is_some_and(|r| r.stats_age_s.is_some()),
        "no stats sample from region-0"
    );
    let id = c
        .start_warm_job(
            &json!({"sitemap": format!("http://{}/sitemap.xml?products=40", cluster.origin.addr),
               "host": "shop.test"}),
        )
        .await;
    assert_eq!(c.warm_finished(id, 60).await["state"], "done");
    // Shoppers: 30 warmed pages (hits) and 10 pages nobody warmed (misses).
    let v = &cluster.varnish[0];
    for p in 1..=30 {
        assert_eq!(get(v.http, &format!("/p/{p}")).await.cache(), "HIT");
    }
    for p in 1001..=1010 {
        assert_eq!(get(v.http, &format!("/p/{p}")).await.cache(), "MISS");
    }
    let mut region;
    assert_eventually!(
        15,
        {
            region = c.regions().await.get("region-0").cloned();
            region.as_ref().and_then(|r| r.hit_ratio.m5) == Some(0.75)
        },
        "shopper hit ratio is not 30/40: {region:?}"
    );
    let warm_ratio = region
        .as_ref()
        .and_then(|r| r.synthetic_hit_ratio)
        .and_then(|h| h.m5);
    assert_eq!(
        warm_ratio,
        Some(0.0),
        "the warm pass was all misses: {region:?}"
    );
    let raw_hits = v.counter("MAIN.cache_hit");
    let raw_misses = v.counter("MAIN.cache_miss");
    eprintln!(
        "figure: shopper hit ratio {:.3} (exactly 30/40) where varnish's own counters say {:.3} ({raw_hits} hits, {raw_misses} misses with the warm pass)",
        region
            .as_ref()
            .and_then(|r| r.hit_ratio.m5)
            .unwrap_or(f64::NAN),
        raw_hits as f64 / (raw_hits + raw_misses) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_agent_leaves_no_varnishncsa_behind() {
    let mut cluster = Cluster::start(1, "ban", CoordinatorOpts::default()).await;
    let instance = cluster.varnish[0].workdir.display().to_string();
    assert_eventually!(
        10,
        pids_of("varnishncsa", &instance).len() == 1,
        "varnishncsa not started: {:?}",
        pids_of("varnishncsa", &instance)
    );
    for round in 0..3 {
        cluster.agents[0].kill9().await;
        assert_eventually!(
            5,
            pids_of("varnishncsa", &instance).is_empty(),
            "round {round}: varnishncsa outlived its agent: {:?}",
            pids_of("varnishncsa", &instance)
        );
        cluster.agents[0].restart();
        assert_eventually!(
            10,
            pids_of("varnishncsa", &instance).len() == 1,
            "round {round}: {:?}",
            pids_of("varnishncsa", &instance)
        );
    }
}
