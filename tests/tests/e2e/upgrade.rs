//! Versions and upgrades: agents and coordinators one protocol version apart work
//! together, further apart they refuse each other with both versions named, and a
//! running cluster upgraded in the documented order (coordinators one at a time, then
//! the agents) loses no acknowledged purge.
//!
//! The "old" and "new" builds are today's binaries: `VC_PROTOCOL_VERSION`
//! ([`tests::protocol_env`], a test knob read once at start) makes one speak another
//! protocol version. Protocol 1 is the builds from before versions were said: they send
//! none and refuse nobody, and a binary running as 1 does the same.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tests::ha::{HaCluster, HaOpts, Placement};
use tests::{
    assert_eventually, assert_stays, get, get_json, magento_purge, protocol_env, purge_tags, raw,
    tags_pattern, temp_dir, AgentOpts, AgentProc, Cluster, CoordinatorOpts, CoordinatorProc,
    OriginServer, VarnishNode,
};

/// `coordinator_sessions_refused_total{reason="protocol_version"}` on `c`.
async fn protocol_refusals(c: &CoordinatorProc) -> u64 {
    tests::ha::sessions_refused(c, proto::REFUSAL_PROTOCOL).await
}

/// `edge-0` as `c` shows it once its session was refused for its protocol version.
async fn refused_edge(c: &CoordinatorProc) -> Value {
    let mut e: Value;
    assert_eventually!(
        15,
        {
            e = c.edge("edge-0").await;
            e["refused"].is_string()
        },
        "the refused agent is not shown: {:?}",
        c.edges().await
    );
    e
}

/// The agent's error lines about protocol versions, once there is one.
async fn version_errors(a: &AgentProc) -> Vec<String> {
    let mut errors: Vec<String>;
    assert_eventually!(
        15,
        {
            errors = log_lines(&a.log, &["ERROR", "protocol versions too far apart"]);
            !errors.is_empty()
        },
        "no error in the agent's log: {:?}",
        std::fs::read_to_string(&a.log)
    );
    errors
}

/// `GET /healthz` of `c`.
async fn healthz(c: &CoordinatorProc) -> Value {
    get_json(c.api, "/healthz").await.unwrap_or(Value::Null)
}

/// Lines of `path` (a process's log) containing every one of `words`.
fn log_lines(path: &std::path::Path, words: &[&str]) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .map(str::to_owned)
        .collect()
}

/// A page cached on `v`, then purged through `c` by tag: the purge reaches the edge.
async fn purge_reaches(cluster: &Cluster, page: u32) {
    let v = &cluster.varnish[0];
    let path = format!("/p/{page}");
    get(v.http, &path).await;
    assert_eq!(get(v.http, &path).await.cache(), "HIT");
    let seq = purge_tags(cluster.coordinator.purge, &[&format!("cat_p_{page}")]).await;
    cluster.wait_applied(seq).await;
    assert_eq!(
        get(v.http, &path).await.cache(),
        "MISS",
        "purge {seq} not applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_one_protocol_version_apart_work_together_in_both_directions() {
    // An agent one version behind (protocol 1: today's builds) on a new coordinator.
    let old_agent = AgentOpts {
        env: protocol_env(1),
        ..AgentOpts::default()
    };
    let cluster = Cluster::start(1, old_agent, CoordinatorOpts::default()).await;
    purge_reaches(&cluster, 1).await;
    let e = cluster.coordinator.edge("edge-0").await;
    assert_eq!(
        (e["protocol"].as_u64(), &e["refused"]),
        (Some(1), &Value::Null),
        "{e}"
    );
    let h = healthz(&cluster.coordinator).await;
    assert_eq!(h["protocol"], proto::version::PROTOCOL_VERSION, "{h}");
    assert_eq!(h["accepts_protocols"], "1..=3", "{h}");
    assert_eq!(protocol_refusals(&cluster.coordinator).await, 0);
    drop(cluster);

    // A new agent on a coordinator one version behind (it checks nothing, as those did).
    let old_coordinator = CoordinatorOpts {
        env: protocol_env(1),
        ..CoordinatorOpts::default()
    };
    let cluster = Cluster::start(1, AgentOpts::default(), old_coordinator).await;
    purge_reaches(&cluster, 2).await;
    let e = cluster.coordinator.edge("edge-0").await;
    assert_eq!(e["protocol"].as_u64(), Some(2), "{e}");
    assert_eq!(healthz(&cluster.coordinator).await["protocol"], 1);
    let agent_log = &cluster.agents[0].log;
    assert!(
        log_lines(agent_log, &["protocol versions too far apart"]).is_empty(),
        "{:?}",
        std::fs::read_to_string(agent_log)
    );
    // And one version ahead: a coordinator speaking 3 takes today's agent.
    drop(cluster);
    let newer_coordinator = CoordinatorOpts {
        env: protocol_env(3),
        ..CoordinatorOpts::default()
    };
    let cluster = Cluster::start(1, AgentOpts::default(), newer_coordinator).await;
    purge_reaches(&cluster, 3).await;
    assert_eq!(protocol_refusals(&cluster.coordinator).await, 0);
}

/// A coordinator (its environment `coordinator_env`) and one varnishd with an agent
/// speaking `agent_env`, not waited on (the agent may be refused).
async fn pair(
    coordinator_env: Vec<(String, String)>,
    agent_env: Vec<(String, String)>,
) -> (
    tempfile::TempDir,
    OriginServer,
    CoordinatorProc,
    VarnishNode,
    AgentProc,
) {
    tests::require_varnish();
    let dir = temp_dir();
    let origin = OriginServer::start().await;
    let opts = CoordinatorOpts {
        regions: tests::regions(1, origin.addr),
        env: coordinator_env,
        ..CoordinatorOpts::default()
    };
    let c = CoordinatorProc::start(&dir.path().join("coordinator"), &opts).await;
    let v = VarnishNode::start(&dir.path().join("r0"), origin.addr).await;
    let agent = AgentOpts {
        env: agent_env,
        ..AgentOpts::default()
    };
    let a = AgentProc::start(&dir.path().join("r0"), "edge-0", "region-0", &c, &v, agent);
    (dir, origin, c, v, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_new_agent_is_refused_with_both_versions_then_gets_in_once_the_coordinator_is_upgraded(
) {
    // Today's agent, connected with a cursor (its first full ban applied), pages cached.
    let (_dir, _origin, mut c, v, mut a) = pair(Vec::new(), Vec::new()).await;
    let seq = purge_tags(c.purge, &["cat_p_0"]).await;
    assert_eventually!(
        20,
        c.applied_everywhere(seq, 1).await,
        "{:?}",
        c.edges().await
    );
    for page in ["/p/7", "/p/8"] {
        get(v.http, page).await;
        assert_eq!(get(v.http, page).await.cache(), "HIT");
    }
    // Restarted as a build two versions ahead: refused, and shown in /api/v1/edges, the
    // metric and the coordinator's log.
    a.stop().await;
    a.env = protocol_env(4);
    a.restart();
    let e = refused_edge(&c).await;
    assert_eq!(
        e["refused"], "protocol 4, this coordinator speaks 1..=3",
        "{e}"
    );
    assert_eq!(
        (&e["connected"], e["protocol"].as_u64()),
        (&Value::Bool(false), Some(4)),
        "{e}"
    );
    assert_eq!(e["region"], "region-0", "{e}");
    assert_eq!(protocol_refusals(&c).await, 1);
    let coordinator_log = c.child.log_path().to_owned();
    let lines = log_lines(
        &coordinator_log,
        &["session refused", "protocol 4", "1..=3"],
    );
    assert_eq!(lines.len(), 1, "{lines:?}");
    // The agent: one clear error naming both versions and what to do.
    let errors = version_errors(&a).await;
    assert!(
        errors[0]
            .contains("agent speaks protocol 4, this coordinator speaks 1..=3 (it is protocol 2)")
            && errors[0].contains("upgrade the coordinators first"),
        "{errors:?}"
    );
    // It backs off: no second attempt within the next seconds, no second error line.
    assert_stays!(
        5,
        protocol_refusals(&c).await == 1,
        "the refused agent redials in a tight loop"
    );
    assert_eq!(
        log_lines(&a.log, &["ERROR", "protocol versions too far apart"]).len(),
        1
    );

    // A purge acknowledged meanwhile, for a page the edge holds.
    let seq = purge_tags(c.purge, &["cat_p_7"]).await;
    // The coordinators are upgraded (to 3): the agent gets in at its next redial and
    // applies what it missed.
    c.stop().await;
    c.env = protocol_env(3);
    c.restart().await;
    assert_eventually!(
        25,
        c.applied_everywhere(seq, 1).await,
        "the agent did not get in after the upgrade: {:?}",
        c.edges().await
    );
    assert_eq!(get(v.http, "/p/7").await.cache(), "MISS");
    // It resumed from its cursor: the page no purge named is still cached.
    assert_eq!(get(v.http, "/p/8").await.cache(), "HIT", "a full ban");
    let e = c.edge("edge-0").await;
    assert_eq!(
        (&e["refused"], e["protocol"].as_u64()),
        (&Value::Null, Some(4)),
        "{e}"
    );
    assert_eq!(
        log_lines(
            &a.log,
            &["session accepted", "protocol versions work together"]
        )
        .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_old_agent_is_refused_and_an_agent_refuses_a_coordinator_outside_its_window() {
    // A coordinator two versions ahead of today's agent.
    let (_dir, _origin, c, _v, a) = pair(protocol_env(4), Vec::new()).await;
    let e = refused_edge(&c).await;
    assert_eq!(
        e["refused"], "protocol 2, this coordinator speaks 3..=5",
        "{e}"
    );
    assert_eq!(e["connected"], false, "{e}");
    let errors = version_errors(&a).await;
    assert!(
        errors[0]
            .contains("agent speaks protocol 2, this coordinator speaks 3..=5 (it is protocol 4)")
            && errors[0].contains("upgrade the agent"),
        "{errors:?}"
    );
    assert_eq!(
        healthz(&c).await["accepts_protocols"],
        "3..=5",
        "/healthz names the window"
    );
    drop((a, c));

    // An agent two versions ahead of a coordinator that checks nothing (protocol 1, as
    // the builds before this check): the agent refuses its Welcome.
    let (_dir, _origin, c, v, a) = pair(protocol_env(1), protocol_env(3)).await;
    let errors = version_errors(&a).await;
    assert!(
        errors[0]
            .contains("coordinator speaks protocol 1, this agent speaks 2..=4 (it is protocol 3)"),
        "{errors:?}"
    );
    // It applies nothing from that coordinator, and does not redial in a loop.
    get(v.http, "/p/9").await;
    let seq = purge_tags(c.purge, &["cat_p_9"]).await;
    assert_stays!(
        4,
        {
            let e = c.edge("edge-0").await;
            e["applied_seq"].as_u64().unwrap_or(0) < seq && e["sessions"].as_u64() == Some(1)
        },
        "the agent took purges from, or kept redialling, a coordinator outside its window: {}",
        c.edge("edge-0").await
    );
    assert_eq!(get(v.http, "/p/9").await.cache(), "HIT", "nothing applied");
}

/// A Magento purge of `tag` to `c` on a new connection: `Some(seq)` (0 if the answer
/// has none: spooled) when answered 200.
async fn send_purge(purge: std::net::SocketAddr, tag: &str) -> Option<u64> {
    let request = magento_purge(&tags_pattern(&[tag]));
    match tokio::time::timeout(Duration::from_secs(10), raw(purge, &request)).await {
        Ok(Ok(r)) if r.status == 200 => Some(r.json()["seq"].as_u64().unwrap_or(0)),
        _ => None,
    }
}

/// Whether every coordinator of `ha` answers and shows every edge connected with
/// everything applied up to `seq`, speaking `protocol`.
async fn settled(ha: &HaCluster, seq: u64, protocol: u64) -> bool {
    for c in &ha.c {
        let edges = c.edges().await;
        let ok = edges.len() == ha.agents.len()
            && edges.iter().all(|e| {
                e["connected"] == true
                    && e["applied_seq"].as_u64().unwrap_or(0) >= seq
                    && e["protocol"].as_u64() == Some(protocol)
            });
        if !ok {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_with_purges_flowing_loses_no_acknowledged_purge() {
    // Two coordinators on etcd and three agents listing both, all the "old" build.
    let mut ha = HaCluster::start(HaOpts {
        coordinators: 2,
        regions: 3,
        placement: Placement::All,
        env: protocol_env(1),
        ..HaOpts::default()
    })
    .await;
    // One purge applied everywhere first: each new edge's first full ban is behind it.
    let seq = purge_tags(ha.c[0].purge, &["cat_p_0"]).await;
    assert_eventually!(
        20,
        settled(&ha, seq, 1).await,
        "not all on protocol 1: {:?}",
        ha.c[0].edges().await
    );
    // Every page the purges will name cached on every edge, and some never purged: they
    // must still be cached at the end (no full ban hid a lost purge).
    const PAGES: usize = 600;
    const CONTROL: std::ops::Range<usize> = 5000..5020;
    for v in &ha.varnish {
        for i in (0..PAGES).chain(CONTROL) {
            assert_eq!(get(v.http, &format!("/p/{i}")).await.status, 200);
        }
        assert_eq!(get(v.http, "/p/0").await.cache(), "HIT");
    }

    // Magento: each purge to every coordinator in turn (`http-cache-hosts`), one new
    // connection each; acknowledged once any answered 200.
    let purges: Vec<std::net::SocketAddr> = ha.c.iter().map(|c| c.purge).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<usize>::new()));
    let max_seq = Arc::new(AtomicUsize::new(0));
    let sender = tokio::spawn({
        let (stop, acked, max_seq) = (stop.clone(), acked.clone(), max_seq.clone());
        async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < PAGES {
                let mut ok = false;
                for k in 0..purges.len() {
                    let target = purges[(i + k) % purges.len()];
                    if let Some(seq) = send_purge(target, &format!("cat_p_{i}")).await {
                        ok = true;
                        max_seq.fetch_max(seq as usize, Ordering::Relaxed);
                    }
                }
                if ok {
                    acked.lock().unwrap().push(i);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            i
        }
    });
    let started = std::time::Instant::now();
    let acked_now = || (acked.lock().unwrap().len(), started.elapsed().as_secs_f32());
    let mut steps = vec![("start", acked_now())];
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The coordinators, one at a time: stopped as systemd does, started as the new build,
    // and back in the cluster with every edge before the next.
    for i in 0..ha.c.len() {
        ha.c[i].stop().await;
        ha.c[i].env = Vec::new();
        ha.c[i].restart().await;
        let c = &ha.c[i];
        assert_eventually!(
            20,
            {
                let v = tests::ha::cluster_view(c).await;
                v["members"].as_array().map(Vec::len) == Some(2)
                    && c.applied_everywhere(0, ha.agents.len()).await
            },
            "c{} did not rejoin with every edge: {}",
            i + 1,
            tests::ha::cluster_view(c).await
        );
        assert_eq!(
            healthz(c).await["protocol"],
            proto::version::PROTOCOL_VERSION
        );
        steps.push(("coordinator", acked_now()));
    }
    // Then the agents, one at a time.
    for i in 0..ha.agents.len() {
        ha.agents[i].stop().await;
        ha.agents[i].env = Vec::new();
        ha.agents[i].restart();
        let id = ha.agents[i].id.clone();
        for c in &ha.c {
            assert_eventually!(
                20,
                {
                    let e = c.edge(&id).await;
                    e["connected"] == true && e["protocol"] == 2
                },
                "{id} not back as protocol 2 on {}: {}",
                c.api,
                c.edge(&id).await
            );
        }
        steps.push(("agent", acked_now()));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = sender.await.expect("the sender");
    let acked = acked.lock().unwrap().clone();
    let max_seq = max_seq.load(Ordering::Relaxed) as u64;
    eprintln!(
        "{sent} purges sent, {} acknowledged (highest seq {max_seq}); acknowledged by step: {steps:?}",
        acked.len()
    );
    assert!(
        sent < PAGES,
        "the sender ran out of pages before the upgrade ended"
    );
    // Purges were acknowledged all along: during every step.
    for w in steps.windows(2) {
        assert!(
            w[1].1 .0 > w[0].1 .0,
            "no purge acknowledged during a step: {steps:?}"
        );
    }
    assert_eq!(acked.len(), sent, "a purge got no 200 from any coordinator");

    // Everything acknowledged applied on every edge: their cursors, then their caches.
    let head = ha.c[0].head().await.max(max_seq);
    assert_eventually!(
        30,
        settled(&ha, head, 2).await,
        "head {head} not applied everywhere as protocol 2: {:?}",
        ha.c[0].edges().await
    );
    for (n, v) in ha.varnish.iter().enumerate() {
        let mut stale = Vec::new();
        for i in &acked {
            if get(v.http, &format!("/p/{i}")).await.cache() == "HIT" {
                stale.push(*i);
            }
        }
        assert!(
            stale.is_empty(),
            "acknowledged purges lost on edge-{n}: {stale:?}"
        );
        for i in CONTROL {
            let r = get(v.http, &format!("/p/{i}")).await;
            assert_eq!(r.cache(), "HIT", "edge-{n} lost /p/{i}: a full ban?");
        }
    }
    for c in &ha.c {
        eprintln!(
            "{}: duplicate_edge_id refusals {}",
            c.api,
            tests::ha::sessions_refused(c, proto::REFUSAL_DUPLICATE).await
        );
        assert_eq!(protocol_refusals(c).await, 0, "a session was refused");
        for e in c.edges().await {
            assert_eq!(e["full_bans"], 0, "{e}");
        }
    }
}
