//! Several coordinators sharing one purge log in a real 3-member etcd, with real agents
//! and varnishd: Magento lists every coordinator (each purge goes to both), the leader
//! is killed -9 in the middle of a purge burst, and no purge any coordinator answered
//! 200 is lost; one etcd member
//! dying changes nothing; etcd gone entirely means purges are spooled by the coordinator
//! that took them (200 `"spooled": true`) and drained into the log when it is back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{
    assert_eventually, get, get_json, magento_purge, raw, tags_pattern, temp_dir, AgentProc,
    CoordinatorOpts, CoordinatorProc, EtcdCluster, OriginServer, VarnishNode,
};

/// Coordinator options joining the etcd cluster as `id`, with two regions.
fn ha_opts(etcd: &EtcdCluster, origin: &OriginServer, id: &str, rollout: &str) -> CoordinatorOpts {
    CoordinatorOpts {
        insecure: true,
        regions: tests::regions(2, origin.addr),
        extra: format!(
            "[rollout]\n{rollout}\n[store]\nbackend = \"etcd\"\nendpoints = {}\nprefix = \"/vc-test/\"\nid = \"{id}\"\nlease_ttl_s = 2\n",
            etcd.endpoints_toml()
        ),
        ..CoordinatorOpts::default()
    }
}

/// Two edges (`edge-0`, `edge-1`, one region each), each a varnishd in front of `origin`
/// and an agent in ban mode listing `coordinators`.
async fn two_edges(
    dir: &std::path::Path,
    origin: &OriginServer,
    coordinators: &[std::net::SocketAddr],
) -> (Vec<VarnishNode>, Vec<AgentProc>) {
    two_edges_as(
        dir,
        origin,
        coordinators,
        "ban",
        CoordinatorOpts::default().max_stale_s(),
    )
    .await
}

/// [`two_edges`] with agents in `mode` and varnishes serving stale for `max_stale_s`.
async fn two_edges_as(
    dir: &std::path::Path,
    origin: &OriginServer,
    coordinators: &[std::net::SocketAddr],
    mode: &str,
    max_stale_s: u64,
) -> (Vec<VarnishNode>, Vec<AgentProc>) {
    let mut varnish = Vec::new();
    let mut agents = Vec::new();
    for i in 0..2 {
        let v = VarnishNode::start_with(&dir.join(format!("v{i}")), origin.addr, max_stale_s).await;
        agents.push(AgentProc::start_with(
            &dir.join(format!("a{i}")),
            &format!("edge-{i}"),
            &format!("region-{i}"),
            coordinators,
            None,
            &v,
            mode,
        ));
        varnish.push(v);
    }
    (varnish, agents)
}

async fn cluster_view(c: &CoordinatorProc) -> Value {
    get_json(c.api, "/api/v1/cluster")
        .await
        .unwrap_or(Value::Null)
}

/// Sends one Magento purge (new connection) for `tag`; the status, 0 if unreachable.
async fn purge_status(c: &CoordinatorProc, tag: &str) -> u16 {
    match tokio::time::timeout(
        Duration::from_secs(10),
        raw(c.purge, &magento_purge(&tags_pattern(&[tag]))),
    )
    .await
    {
        Ok(Ok(r)) => r.status,
        _ => 0,
    }
}

struct Ha {
    _dir: tempfile::TempDir,
    etcd: EtcdCluster,
    _origin: OriginServer,
    c: Vec<CoordinatorProc>,
    varnish: Vec<VarnishNode>,
    _agents: Vec<AgentProc>,
}

async fn start_ha(rollout: &str) -> Ha {
    tests::require_varnish();
    let dir = temp_dir();
    let etcd = EtcdCluster::start(&dir.path().join("etcd"), 3).await;
    let origin = OriginServer::start().await;
    let mut c = Vec::new();
    for id in ["c1", "c2"] {
        c.push(
            CoordinatorProc::start(&dir.path().join(id), &ha_opts(&etcd, &origin, id, rollout))
                .await,
        );
    }
    let (varnish, agents) = two_edges(dir.path(), &origin, &[c[0].grpc, c[1].grpc]).await;
    // Every coordinator shows every edge, whichever one the agent chose.
    for co in &c {
        assert_eventually!(
            30,
            co.applied_everywhere(0, 2).await,
            "{} does not show both edges: {:?}",
            co.api,
            co.edges().await
        );
    }
    Ha {
        _dir: dir,
        etcd,
        _origin: origin,
        c,
        varnish,
        _agents: agents,
    }
}

/// Index of the coordinator that leads, once both agree on one.
async fn leader_of(c: &[CoordinatorProc]) -> usize {
    let mut leader: Option<usize>;
    assert_eventually!(
        20,
        {
            let views = [cluster_view(&c[0]).await, cluster_view(&c[1]).await];
            let leads: Vec<usize> = (0..2).filter(|i| views[*i]["role"] == "leader").collect();
            leader = leads.first().copied();
            leads.len() == 1
                && views[0]["leader"] == views[1]["leader"]
                && !views[0]["leader"].is_null()
        },
        "no single agreed leader"
    );
    leader.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_burst_loses_no_acknowledged_purge() {
    let mut ha = start_ha("").await;
    let leader = leader_of(&ha.c).await;
    let ids = ["c1", "c2"];
    let view = cluster_view(&ha.c[1 - leader]).await;
    assert_eq!(view["role"], "follower", "{view}");
    assert_eq!(view["leader"], ids[leader], "{view}");
    assert_eq!(view["id"], ids[1 - leader], "{view}");
    assert_eq!(view["store"], "etcd", "{view}");
    assert_eq!(view["members"].as_array().map(Vec::len), Some(2), "{view}");
    assert_eventually!(
        10,
        cluster_view(&ha.c[0]).await["etcd"]
            .as_array()
            .is_some_and(|m| m.len() == 3 && m.iter().all(|m| m["healthy"] == true)),
        "etcd members not all healthy in /api/v1/cluster"
    );
    let health = get_json(ha.c[leader].api, "/healthz")
        .await
        .unwrap_or_default();
    assert_eq!(health["role"], "leader", "{health}");
    assert_eq!(health["id"], ids[leader], "{health}");
    assert_eq!(health["leader"], ids[leader], "{health}");

    // Every page cached on both edges.
    const PAGES: usize = 240;
    for v in &ha.varnish {
        for i in 0..PAGES {
            assert_eq!(get(v.http, &format!("/p/{i}")).await.status, 200);
        }
        assert_eq!(get(v.http, "/p/0").await.cache(), "HIT");
    }

    // Magento-style: each purge to the next coordinator in turn, a new connection each;
    // the leader is killed -9 a third of the way in.
    let mut acked = Vec::new();
    let mut refused = 0;
    let mut killed_at = None;
    for i in 0..PAGES {
        if i == PAGES / 3 {
            ha.c[leader].child.kill9().await;
            killed_at = Some(Instant::now());
        }
        // Magento sends each purge to every host of `http-cache-hosts`, one after the
        // other: acknowledged when any answered 200 (both did: it is logged twice).
        let mut ok = false;
        for target in [i % 2, 1 - i % 2] {
            match purge_status(&ha.c[target], &format!("cat_p_{i}")).await {
                200 => ok = true,
                _ => refused += 1,
            }
        }
        if ok {
            acked.push(i);
        }
    }
    let survivor = &ha.c[1 - leader];
    eprintln!(
        "{} purges acknowledged, {refused} not (sent to the dead coordinator)",
        acked.len()
    );
    assert!(
        acked.len() >= PAGES / 2,
        "too few acknowledged: {}",
        acked.len()
    );

    // Both agents on the survivor within seconds; it leads.
    assert_eventually!(
        15,
        tests::ha::local_edges(survivor).await.len() == 2,
        "agents not on the survivor: {:?}",
        survivor.edges().await
    );
    let moved = killed_at.map(|t| t.elapsed()).unwrap_or_default();
    assert_eventually!(
        10,
        cluster_view(survivor).await["role"] == "leader",
        "the survivor did not take the lead: {}",
        cluster_view(survivor).await
    );
    // Every acknowledged purge reached both varnishes: none of those pages is cached.
    let head = survivor.head().await;
    assert_eventually!(
        30,
        survivor.applied_everywhere(head, 2).await,
        "head {head} not applied everywhere: {:?}",
        survivor.edges().await
    );
    for v in &ha.varnish {
        let mut stale = Vec::new();
        for i in &acked {
            let r = get(v.http, &format!("/p/{i}")).await;
            if r.cache() == "HIT" {
                stale.push(*i);
            }
        }
        assert!(
            stale.is_empty(),
            "acknowledged purges lost on {}: {stale:?}",
            v.http
        );
    }
    // The agents resumed from their cursors on the shared log: no full ban.
    for e in survivor.edges().await {
        assert_eq!(e["full_bans"], 0, "{e}");
    }

    // The killed coordinator rejoins as a follower, sees both edges through its peer and
    // accepts purges that reach them.
    let dead = &mut ha.c[leader];
    dead.restart().await;
    assert_eventually!(
        15,
        {
            let v = cluster_view(dead).await;
            v["role"] == "follower" && v["members"].as_array().map(Vec::len) == Some(2)
        },
        "the restarted coordinator did not rejoin: {}",
        cluster_view(dead).await
    );
    let seq = tests::purge_tags(dead.purge, &["cat_p_0"]).await;
    assert_eventually!(
        15,
        dead.applied_everywhere(seq, 2).await,
        "purge {seq} sent to the rejoined coordinator not applied: {:?}",
        dead.edges().await
    );
    eprintln!("agents on the survivor {moved:?} after the kill");
    drop(ha.etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_losing_a_member_serves_and_losing_quorum_spools_then_drains() {
    let mut ha = start_ha("").await;
    // One member down: still 200, still applied.
    ha.etcd.kill9(0).await;
    let mut seq = 0;
    for i in 0..10 {
        let c = &ha.c[i % 2];
        let r = raw(
            c.purge,
            &magento_purge(&tags_pattern(&[&format!("cat_p_{i}")])),
        )
        .await
        .expect("purge");
        assert_eq!(r.status, 200, "with one etcd member down: {}", r.body);
        seq = seq.max(r.json()["seq"].as_u64().unwrap_or(0));
    }
    assert_eventually!(
        20,
        ha.c[0].applied_everywhere(seq, 2).await,
        "purges not applied with one etcd member down"
    );

    // All members down: purges are spooled by the coordinator that took them, answered
    // 200 `"spooled": true` within the spool deadline, never 503.
    ha.etcd.kill9(1).await;
    ha.etcd.kill9(2).await;
    let started = Instant::now();
    for i in 0..4 {
        let t = Instant::now();
        let r = raw(
            ha.c[i % 2].purge,
            &magento_purge(&tags_pattern(&[&format!("down_{i}")])),
        )
        .await
        .expect("purge");
        assert_eq!(
            r.status, 200,
            "purge answered {} with etcd down: {}",
            r.status, r.body
        );
        assert_eq!(r.header("x-purge-spooled"), Some("1"), "{}", r.body);
        assert_eq!(r.json()["spooled"], true, "{}", r.body);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    eprintln!("4 purges spooled with etcd down in {:?}", started.elapsed());
    assert_eventually!(
        15,
        get_json(ha.c[0].api, "/healthz")
            .await
            .is_some_and(|h| h["store"] == "unavailable"),
        "/healthz does not say the store is unavailable: {:?}",
        get_json(ha.c[0].api, "/healthz").await
    );

    // etcd back: the spools drain into the log, purging works again on both, and it all
    // reaches the edges.
    for i in 0..3 {
        ha.etcd.restart(i);
    }
    let mut last = 0;
    assert_eventually!(
        30,
        {
            let r = raw(ha.c[1].purge, &magento_purge(&tags_pattern(&["cat_p_2"]))).await;
            match r {
                Ok(r) if r.status == 200 && r.header("x-purge-spooled").is_none() => {
                    last = r.json()["seq"].as_u64().unwrap_or(0);
                    true
                }
                _ => false,
            }
        },
        "purges still not committed after etcd came back"
    );
    // c2's own two spooled purges went into the log before its new one.
    assert!(last >= seq + 3, "c2's spooled purges are not before {last}");
    for c in &ha.c {
        assert_eventually!(
            20,
            tests::ha::metric(c, "coordinator_purge_spool_entries").await == Some(0.0),
            "a spool did not drain"
        );
    }
    let last = last.max(ha.c[0].head().await);
    assert_eventually!(
        20,
        ha.c[0].applied_everywhere(last, 2).await && ha.c[1].applied_everywhere(last, 2).await,
        "purge {last} not applied after etcd came back: {:?}",
        ha.c[0].edges().await
    );
    assert_eventually!(
        15,
        get_json(ha.c[0].api, "/healthz")
            .await
            .is_some_and(|h| h["store"] == "ok"),
        "/healthz does not say the store is back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_finishes_the_rollout_in_flight() {
    let mut ha = start_ha("canary_region = \"region-0\"\ncanary_wait_s = 4").await;
    let leader = leader_of(&ha.c).await;
    let bundle = serde_json::to_value(coordinator_cli::demo::sample_bundle()).expect("bundle");
    let r = ha.c[leader]
        .call("POST", "/api/v1/config?canary=true", Some(&bundle))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let started = r.json();
    let version = started["version"].as_str().expect("version").to_owned();
    let id = started["rollout"]["id"].as_u64().expect("rollout id");
    // The canary edge runs it (whichever coordinator holds its session); the follower
    // follows the same plan and shows every edge's config state.
    let survivor = 1 - leader;
    assert_eventually!(
        30,
        {
            let v = ha.c[survivor].config().await;
            v["rollout"]["id"].as_u64() == Some(id)
                && v["rollout"]["phase"] == "canary"
                && v["edges"].as_array().is_some_and(|e| {
                    e.len() == 2
                        && e.iter()
                            .any(|e| e["region"] == "region-0" && e["state"] == "in_sync")
                })
        },
        "the canary did not take the new version: {}",
        ha.c[survivor].config().await
    );
    // The leader dies during the canary wait; the survivor leads and finishes it.
    ha.c[leader].child.kill9().await;
    assert_eventually!(
        15,
        cluster_view(&ha.c[survivor]).await["role"] == "leader",
        "no new leader"
    );
    let view = ha.c[survivor].wait_rollout(id).await;
    assert_eq!(view["rollout"]["phase"], "done", "{view}");
    assert_eq!(view["current"], version.as_str(), "{view}");
    for v in &ha.varnish {
        let active = v.active_vcl().await;
        assert!(active.starts_with(&format!("cfg_{version}_")), "{active}");
    }
}

/// c1 leading with both agents (`mode`, varnishes serving stale for `max_stale_s`) on it,
/// which also list c2, then c2 following: the agents move to c2 when c1 dies.
async fn leader_then_follower(
    dir: &std::path::Path,
    origin: &OriginServer,
    opts: &dyn Fn(&str) -> CoordinatorOpts,
    mode: &str,
    max_stale_s: u64,
) -> (
    CoordinatorProc,
    CoordinatorProc,
    Vec<VarnishNode>,
    Vec<AgentProc>,
) {
    let c1 = CoordinatorProc::start(&dir.join("c1"), &opts("c1")).await;
    let c2_dir = dir.join("c2");
    std::fs::create_dir_all(&c2_dir).expect("c2 dir");
    // The agents list c2 before it runs.
    let c2_grpc = std::net::SocketAddr::from(([127, 0, 0, 1], tests::free_port()));
    let (varnish, agents) = two_edges_as(dir, origin, &[c1.grpc, c2_grpc], mode, max_stale_s).await;
    assert_eventually!(
        30,
        tests::ha::local_edges(&c1).await.len() == 2,
        "agents not on c1"
    );
    assert_eventually!(
        15,
        cluster_view(&c1).await["role"] == "leader",
        "c1 does not lead"
    );
    let c2_opts = CoordinatorOpts {
        grpc: Some(c2_grpc),
        ..opts("c2")
    };
    let c2 = CoordinatorProc::start(&c2_dir, &c2_opts).await;
    assert_eventually!(
        15,
        cluster_view(&c2).await["role"] == "follower",
        "c2 not a follower"
    );
    (c1, c2, varnish, agents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_finishes_the_warm_job_in_flight() {
    tests::require_varnish();
    let dir = temp_dir();
    let etcd = EtcdCluster::start(&dir.path().join("etcd"), 3).await;
    let origin = OriginServer::start().await;
    let opts = |id: &str| CoordinatorOpts {
        warm_extra: "origin_budget_rps = 40\nshard_urls = 10\n".into(),
        ..ha_opts(&etcd, &origin, id, "")
    };
    let (mut c1, c2, varnish, _agents) = leader_then_follower(
        dir.path(),
        &origin,
        &opts,
        "ban",
        coordinator::config::MAGENTO_STALE_S,
    )
    .await;

    let id = c1
        .start_warm_job(&serde_json::json!({
            "sitemap": format!("http://{}/sitemap.xml?products=189", origin.addr),
            "host": "shop.test"
        }))
        .await;
    let done = |v: &Value| {
        (0..2)
            .map(|i| {
                v["regions"][format!("region-{i}")]["done"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum::<u64>()
    };
    assert_eventually!(
        30,
        done(&c1.warm_job(id).await) >= 60,
        "job did not progress"
    );
    let before = done(&c1.warm_job(id).await);
    c1.child.kill9().await;
    // The survivor leads, the agents move to it, and it finishes the job.
    assert_eventually!(
        15,
        cluster_view(&c2).await["role"] == "leader",
        "c2 did not take the lead"
    );
    let view = c2.warm_finished(id, 90).await;
    assert_eq!(view["state"], "done", "{view}");
    assert_eq!(done(&view), 400, "{view}");
    eprintln!("warm job: {before} of 400 done when the leader died, finished by the next");
    // The pages are in both caches.
    for v in &varnish {
        assert_eq!(get(v.http, "/p/5").await.cache(), "HIT");
    }
    drop(c1);
    drop(etcd);
}

/// The `refresh` object of purge `seq` as `c` answers it.
async fn refresh_of(c: &CoordinatorProc, seq: u64) -> Value {
    c.call("GET", &format!("/api/v1/purges/{seq}"), None)
        .await
        .json()["refresh"]
        .clone()
}

/// Refresh mode in a cluster: the leader runs the refresh of a reindex, the follower
/// shows the same progress for the purge (from the store), and when the leader is killed
/// -9 mid-refresh the next one finishes it: every purged page is re-rendered in both
/// regions without a shopper asking, and none is evicted at the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_finishes_the_refresh_in_flight_and_both_show_its_progress() {
    tests::require_varnish();
    let dir = temp_dir();
    let etcd = EtcdCluster::start(&dir.path().join("etcd"), 3).await;
    let origin = OriginServer::start().await;
    let opts = |id: &str| CoordinatorOpts {
        warm_extra: "origin_budget_rps = 20\nshard_urls = 10\n".into(),
        refresh_tags: true,
        refresh_max_stale_s: 90,
        ..ha_opts(&etcd, &origin, id, "")
    };
    let (mut c1, c2, _varnish, _agents) =
        leader_then_follower(dir.path(), &origin, &opts, "xkey", 90).await;
    // Warm 100 products (the tag index learns them), then reindex them all.
    let urls: Vec<String> = (1..=100)
        .map(|p| format!("http://{}/p/{p}", origin.addr))
        .collect();
    let id = c1
        .start_warm_job(&serde_json::json!({"urls": urls, "host": "shop.test", "rate": 200}))
        .await;
    assert_eq!(c1.warm_finished(id, 60).await["state"], "done");
    let renders = |o: &OriginServer| -> Vec<u64> {
        (1..=100)
            .map(|p| o.origin.renders(&format!("/p/{p}")))
            .collect()
    };
    let before = renders(&origin);
    assert!(
        before.iter().all(|r| *r == 2),
        "one render per region: {before:?}"
    );
    origin.origin.set_delay(Duration::from_millis(50));
    let seq = tests::purge_tags(c1.purge, &["cat_p"]).await;
    let mut seen;
    assert_eventually!(
        30,
        {
            seen = refresh_of(&c1, seq).await;
            seen["refreshed"].as_u64().unwrap_or(0) >= 20
        },
        "the refresh did not start on the leader: {seen}"
    );
    assert_eq!(seen["pages"], 100, "{seen}");
    let job = seen["job_id"].clone();
    assert_eventually!(
        10,
        refresh_of(&c2, seq).await["job_id"] == job,
        "the follower does not show the leader's refresh"
    );
    c1.child.kill9().await;
    assert_eventually!(
        15,
        cluster_view(&c2).await["role"] == "leader",
        "c2 did not take the lead"
    );
    assert_eventually!(
        60,
        {
            seen = refresh_of(&c2, seq).await;
            seen["refreshed"] == 100
        },
        "the next leader did not finish the refresh: {seen}"
    );
    assert_eq!(seen["stale"], 0, "{seen}");
    assert_eq!(seen["evicted"], 0, "{seen}");
    // Every page was rendered once more for each region, none of them asked for by a
    // shopper; a shard in flight when the leader died may have been fetched twice.
    let after = renders(&origin);
    assert!(
        after.iter().all(|r| *r >= 4),
        "a page was not refreshed in both regions: {after:?}"
    );
    let extra: u64 = after.iter().map(|r| r - 4).sum();
    assert!(
        extra <= 40,
        "{extra} renders beyond one per page and region: {after:?}"
    );
    drop(c1);
    drop(etcd);
}

/// etcd with authentication on (`[store] user`, `password_file`): a coordinator whose
/// account may only use its own prefix logs and serves purges; its token expires (etcd
/// started with a 2 s token TTL) and the next purge is still answered 200, because the
/// client authenticates again when etcd refuses the token; a wrong password is refused
/// at start with an error that names the user and never shows the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_authentication_serves_with_the_password_and_refuses_a_wrong_one() {
    let dir = temp_dir();
    let etcd = EtcdCluster::start_with(&dir.path().join("etcd"), 1, &["--auth-token-ttl=2"]).await;
    etcd.enable_auth("root-pw", "coordinator", "c0ord-pw", "/vc-auth/")
        .await;
    // Without credentials etcd now refuses everything.
    let anonymous = etcd::Etcd::connect(&etcd.endpoints).expect("connect");
    assert!(anonymous.range(Default::default()).await.is_err());

    let password = dir.path().join("etcd-password");
    std::fs::write(&password, "c0ord-pw\n").expect("password file");
    let store = |password: &std::path::Path| {
        format!(
            "[store]\nbackend = \"etcd\"\nendpoints = {}\nprefix = \"/vc-auth/\"\nid = \"c1\"\nlease_ttl_s = 2\nuser = \"coordinator\"\npassword_file = \"{}\"\n",
            etcd.endpoints_toml(),
            password.display()
        )
    };
    let c1 = CoordinatorProc::start(
        &dir.path().join("c1"),
        &CoordinatorOpts {
            insecure: true,
            extra: store(&password),
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let first = tests::purge_tags(c1.purge, &["cat_p_1"]).await;
    assert_eventually!(
        10,
        {
            let v = cluster_view(&c1).await;
            let h = get_json(c1.api, "/healthz").await.unwrap_or(Value::Null);
            v["role"] == "leader" && v["etcd"][0]["healthy"] == true && h["store"] == "ok"
        },
        "c1 does not lead on an authenticated etcd: {}",
        cluster_view(&c1).await
    );

    // Past the token's TTL with nothing sent: etcd has forgotten the token.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let second = tests::purge_tags(c1.purge, &["cat_p_2"]).await;
    assert_eq!(second, first + 1, "dense sequence across the new token");
    let health = get_json(c1.api, "/healthz").await.expect("healthz");
    assert_eq!(health["head_seq"], second, "{health}");
    let log =
        std::fs::read_to_string(dir.path().join("c1").join("coordinator.log")).unwrap_or_default();
    assert!(!log.contains("c0ord-pw"), "the password is in the log");

    // A wrong password: refused at start, naming the user, not the password.
    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "guess-123\n").expect("password file");
    let config: coordinator::cluster::config::StoreConfig =
        toml::from_str::<toml::Table>(&store(&wrong)).expect("toml")["store"]
            .clone()
            .try_into()
            .expect("store config");
    let refused =
        coordinator::cluster::Cluster::open_etcd(&config, "c2".into(), "http://127.0.0.1:1".into())
            .await
            .map(|_| ())
            .expect_err("a wrong password must be refused");
    let message = refused.to_string();
    assert!(message.contains("\"coordinator\""), "{message}");
    assert!(message.contains("authentication failed"), "{message}");
    assert!(!message.contains("guess-123"), "{message}");
}

/// The `coordinator_edge_connected` sample for `edge` on `c`'s /metrics, if it has one.
async fn edge_connected_metric(c: &CoordinatorProc, edge: &str) -> Option<String> {
    let text = get(c.api, "/metrics").await.body;
    let needle = format!("edge=\"{edge}\"");
    text.lines()
        .find(|l| l.starts_with("coordinator_edge_connected{") && l.contains(&needle))
        .map(str::to_owned)
}

/// Two coordinators on etcd probing every 300 ms and alerting `webhook`, and two edges
/// each on a coordinator of its own: `edge-0` (region-0) on c1, `edge-1` on c2.
struct Spread {
    _dir: tempfile::TempDir,
    etcd: EtcdCluster,
    origin: OriginServer,
    c: Vec<CoordinatorProc>,
    varnish: Vec<VarnishNode>,
    _agents: Vec<AgentProc>,
}

async fn spread(webhook: &str) -> Spread {
    tests::require_varnish();
    let dir = temp_dir();
    let etcd = EtcdCluster::start(&dir.path().join("etcd"), 3).await;
    let origin = OriginServer::start().await;
    let monitoring = format!(
        "[monitoring]\norigin = \"{}\"\nfailures_to_down = 3\nsuccesses_to_up = 2\n\
         [[checks]]\nname = \"health\"\npath = \"/health_check.php\"\ninterval_ms = 300\ntimeout_ms = 1000\nslow_ms = 5000\n\
         [alerts]\nwebhooks = [\"{webhook}\"]\ngroup_ms = 1500\n",
        origin.addr
    );
    let mut c = Vec::new();
    for id in ["c1", "c2"] {
        let mut opts = ha_opts(&etcd, &origin, id, "");
        opts.extra.push_str(&monitoring);
        opts.warm_extra = "origin_budget_rps = 40\nshard_urls = 10\n".into();
        c.push(CoordinatorProc::start(&dir.path().join(id), &opts).await);
    }
    let mut varnish = Vec::new();
    let mut agents = Vec::new();
    for (i, co) in c.iter().enumerate() {
        let v = VarnishNode::start(&dir.path().join(format!("v{i}")), origin.addr).await;
        agents.push(AgentProc::start_with(
            &dir.path().join(format!("a{i}")),
            &format!("edge-{i}"),
            &format!("region-{i}"),
            &[co.grpc],
            None,
            &v,
            "ban",
        ));
        varnish.push(v);
    }
    Spread {
        _dir: dir,
        etcd,
        origin,
        c,
        varnish,
        _agents: agents,
    }
}

/// `region`'s row of `c`'s `/api/v1/regions` (null if absent).
async fn region_row(c: &CoordinatorProc, region: &str) -> Value {
    get_json(c.api, "/api/v1/regions")
        .await
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .find(|r| r["name"] == region)
        .unwrap_or(Value::Null)
}

/// Each agent on a coordinator of its own: every coordinator judges both regions from
/// both agents' probes and counters (relayed between them); the leader's warm job warms
/// the region whose agent is on the follower too; and the leader, which alone sends
/// alerts, alerts for the varnishd that died behind the follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_edge_is_judged_warmed_and_alerted_for_by_the_leader() {
    let (hook, got) = crate::monitor::receiver().await;
    let Spread {
        _dir,
        etcd,
        origin,
        c,
        mut varnish,
        _agents,
    } = spread(&format!("http://{hook}/hook")).await;
    let leader = leader_of(&c).await;
    let follower = 1 - leader;
    let (edge, region) = (format!("edge-{follower}"), format!("region-{follower}"));
    assert_eventually!(
        20,
        tests::ha::local_edges(&c[follower]).await == [edge.clone()],
        "{edge} not on the follower"
    );
    // Shoppers on the follower's edge: a miss, then hits.
    for _ in 0..3 {
        assert_eq!(get(varnish[follower].http, "/p/1").await.status, 200);
    }
    let region_of = |i: usize| region_row(&c[i], &region);
    // The leader sees the follower's region as the follower does: up by its probes, with
    // its shoppers' hits, though no agent of that region talks to the leader. (A shopper
    // keeps coming: the relay's first sample is a baseline, so hits before the leader's
    // first read of the follower are not a delta it can count.)
    assert_eventually!(
        20,
        {
            assert_eq!(get(varnish[follower].http, "/p/1").await.status, 200);
            let r = region_of(leader).await;
            r["health"] == "up"
                && r["probes"][0]["state"] == "up"
                && r["last_minute"]["hits"].as_u64() >= Some(2)
                && r["stats_stale"] == false
        },
        "the leader does not see {region}'s probes and counters: {}",
        region_of(leader).await
    );
    // Each edge is exported on /metrics by the coordinator holding it, once in all.
    assert!(
        edge_connected_metric(&c[follower], &edge).await.is_some(),
        "the follower does not export its own edge"
    );
    assert_eq!(
        edge_connected_metric(&c[leader], &edge).await,
        None,
        "the leader exports an edge it does not hold"
    );
    assert_eq!(alerts_of(&got).len(), 0, "coming up is not news");

    // A warm job on the leader: the follower's agent gets its shards through the
    // follower, and its progress comes back the same way.
    let id = c[leader]
        .start_warm_job(&serde_json::json!({
            "sitemap": format!("http://{}/sitemap.xml?products=49", origin.addr),
            "host": "shop.test"
        }))
        .await;
    let view = c[leader].warm_finished(id, 60).await;
    assert_eq!(view["state"], "done", "{view}");
    let total = view["regions"][region.as_str()]["total"]
        .as_u64()
        .unwrap_or(0);
    assert!(total > 50, "{view}");
    assert_eq!(
        view["regions"][region.as_str()]["done"].as_u64(),
        Some(total),
        "{view}"
    );
    assert_eq!(get(varnish[follower].http, "/p/7").await.cache(), "HIT");

    // The follower's varnishd dies: the leader reads the region down and alerts, once.
    varnish[follower].kill9().await;
    for i in [leader, follower] {
        assert_eventually!(
            15,
            {
                let r = region_of(i).await;
                r["health"] == "down" && r["diagnosis"] == "edge_down"
            },
            "coordinator {} does not read {region} down: {}",
            i + 1,
            region_of(i).await
        );
    }
    assert_eventually!(10, !alerts_of(&got).is_empty(), "no alert from the leader");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a = alerts_of(&got);
    assert_eq!(a.len(), 1, "exactly one alert (the leader's): {a:#?}");
    assert_eq!(a[0]["alerts"][0]["region"], region.as_str(), "{a:#?}");
    assert_eq!(a[0]["alerts"][0]["state"], "down", "{a:#?}");
    let other = format!("region-{leader}");
    assert!(
        a[0]["alerts"]
            .as_array()
            .is_some_and(|l| l.iter().all(|x| x["region"] != other.as_str())),
        "the leader's own region is fine: {a:#?}"
    );
    drop(etcd);
}

fn alerts_of(got: &std::sync::Arc<std::sync::Mutex<Vec<Value>>>) -> Vec<Value> {
    got.lock().map(|v| v.clone()).unwrap_or_default()
}

/// A webhook whose first request hangs (the sender is killed meanwhile); it records
/// every body as it arrives and, apart, those it answered.
pub(crate) async fn hanging_hook() -> (
    std::net::SocketAddr,
    Arc<Mutex<Vec<Value>>>,
    Arc<Mutex<Vec<Value>>>,
) {
    let arrived = Arc::new(Mutex::new(Vec::new()));
    let answered = Arc::new(Mutex::new(Vec::new()));
    let (a, b) = (arrived.clone(), answered.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let (arrived, answered) = (a.clone(), b.clone());
            async move {
                let first = {
                    let mut list = arrived.lock().expect("lock");
                    list.push(v.clone());
                    list.len() == 1
                };
                if first {
                    tokio::time::sleep(Duration::from_secs(120)).await;
                }
                answered.lock().expect("lock").push(v);
                "ok"
            }
        }),
    );
    (crate::monitor::serve_hook(app).await, arrived, answered)
}

/// The leader dies while its alert is on the way: the next leader sends it, with the
/// same id, and does not send it twice (it saw the change too, as a follower).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_the_dying_leader_did_not_finish_is_sent_by_the_next_one() {
    let (hook, arrived, answered) = hanging_hook().await;
    let mut s = spread(&format!("http://{hook}/hook")).await;
    let leader = leader_of(&s.c).await;
    let follower = 1 - leader;
    let region = format!("region-{follower}");
    for c in &s.c {
        assert_eventually!(
            20,
            region_row(c, &region).await["probes"][0]["state"] == "up",
            "{region} not up by its probes on {}",
            c.api
        );
    }
    // The follower's varnishd dies; the leader's alert about it hangs on the way.
    s.varnish[follower].kill9().await;
    let lock = |m: &Arc<Mutex<Vec<Value>>>| m.lock().map(|v| v.clone()).unwrap_or_default();
    assert_eventually!(15, !lock(&arrived).is_empty(), "no alert from the leader");
    let first = lock(&arrived)[0].clone();
    assert_eq!(first["alerts"][0]["region"], region.as_str(), "{first}");
    s.c[leader].child.kill9().await;
    let about = |v: &Value| {
        v["alerts"].as_array().is_some_and(|l| {
            l.iter()
                .any(|a| a["region"] == region.as_str() && a["state"] == "down")
        })
    };
    assert_eventually!(
        20,
        lock(&answered).iter().any(about),
        "the next leader did not send the alert the last one left: {:?}",
        lock(&arrived)
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let sent: Vec<Value> = lock(&answered).into_iter().filter(about).collect();
    assert_eq!(sent.len(), 1, "sent once: {sent:#?}");
    assert_eq!(sent[0]["id"], first["id"], "the same alert: {sent:#?}");
    let view = get_json(s.c[follower].api, "/api/v1/cluster")
        .await
        .unwrap_or_default();
    assert_eq!(view["role"], "leader", "{view}");
    // The dead leader's own agent was known: its region reads lost, not never seen.
    let theirs = format!("region-{leader}");
    assert_eventually!(
        10,
        region_row(&s.c[follower], &theirs).await["diagnosis"] == "agent_lost",
        "{theirs} on the survivor: {}",
        region_row(&s.c[follower], &theirs).await
    );
}
