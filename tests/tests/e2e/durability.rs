//! Nothing acknowledged is ever lost: agent SIGKILL, coordinator SIGKILL, retention.

use std::time::Duration;

use tests::{assert_eventually, get, get_json, purge_tags, Cluster, CoordinatorOpts};

/// Every acknowledged sequence is applied on every edge; returns how many were lost.
async fn lost(c: &Cluster, acked: &[u64]) -> usize {
    let mut lost = 0;
    for seq in acked {
        let p = get_json(c.coordinator.api, &format!("/api/v1/purges/{seq}")).await;
        let ok = p
            .as_ref()
            .and_then(|p| p["edges"].as_object().cloned())
            .is_some_and(|edges| {
                edges.len() == c.agents.len() && edges.values().all(|e| e["applied_at"].is_string())
            });
        if !ok {
            lost += 1;
        }
    }
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_purges_arrive_converges_after_restart() {
    let mut c = Cluster::start(2, "ban", CoordinatorOpts::default()).await;
    for v in &c.varnish {
        for p in ["/p/100", "/p/101"] {
            get(v.http, p).await;
        }
    }
    let mut acked = Vec::new();
    for i in 0..300u64 {
        if i == 100 {
            c.agents[1].kill9().await;
        }
        if i == 150 {
            // Purged while region 1's agent is down.
            acked.push(purge_tags(c.coordinator.purge, &["cat_p_100"]).await);
        }
        if i == 250 {
            c.agents[1].restart();
        }
        acked.push(purge_tags(c.coordinator.purge, &[&format!("bulk_{i}")]).await);
    }
    let head = *acked.iter().max().unwrap();
    c.wait_applied(head).await;
    assert_eq!(lost(&c, &acked).await, 0, "purges lost");
    for v in &c.varnish {
        assert_eq!(
            get(v.http, "/p/100").await.cache(),
            "MISS",
            "purge during downtime not applied on {}",
            v.http
        );
        // Resumed from its cursor: no full ban, unrelated pages stay cached.
        assert_eq!(
            get(v.http, "/p/101").await.cache(),
            "HIT",
            "unexpected flush on {}",
            v.http
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_right_after_acks_delivers_everything_after_restart() {
    let mut c = Cluster::start(2, "ban", CoordinatorOpts::default()).await;
    for v in &c.varnish {
        get(v.http, "/p/200").await;
    }
    // Stop one agent so the purges cannot all have been delivered before the crash.
    c.agents[0].kill9().await;
    let mut acked = Vec::new();
    for i in 0..200u64 {
        acked.push(purge_tags(c.coordinator.purge, &[&format!("bulk_{i}")]).await);
    }
    acked.push(purge_tags(c.coordinator.purge, &["cat_p_200"]).await);
    c.coordinator.kill9_and_restart().await;
    assert!(
        c.coordinator.head().await >= *acked.last().unwrap(),
        "acknowledged entries vanished"
    );
    c.agents[0].restart();
    let head = *acked.iter().max().unwrap();
    c.wait_applied(head).await;
    assert_eq!(lost(&c, &acked).await, 0, "purges lost");
    for v in &c.varnish {
        assert_eq!(get(v.http, "/p/200").await.cache(), "MISS", "on {}", v.http);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_older_than_retention_leads_to_a_full_ban() {
    let mut c = Cluster::start(
        1,
        "ban",
        CoordinatorOpts {
            retention_entries: 5,
            ..Default::default()
        },
    )
    .await;
    let v = c.varnish[0].http;
    get(v, "/untagged/keep").await;
    assert_eq!(get(v, "/untagged/keep").await.cache(), "HIT");
    let seq = purge_tags(c.coordinator.purge, &["warmup"]).await;
    c.wait_applied(seq).await;

    c.agents[0].kill9().await;
    let mut last = 0;
    for i in 0..20 {
        last = purge_tags(c.coordinator.purge, &[&format!("other_{i}")]).await;
    }
    // Retention runs about once a second.
    let api = c.coordinator.api;
    assert_eventually!(
        10,
        {
            let m = get(api, "/metrics").await.body;
            m.lines().any(|l| {
                l.starts_with("coordinator_purge_log_first_seq ")
                    && l.split(' ')
                        .nth(1)
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0)
                        > seq + 1
            })
        },
        "log not pruned"
    );
    c.agents[0].restart();
    c.wait_applied(last).await;
    // The untagged page was not named by any purge: only a full ban removes it.
    assert_eq!(get(v, "/untagged/keep").await.cache(), "MISS");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_stalls_nothing_and_catches_up_coalesced() {
    let c = Cluster::start(2, "ban", CoordinatorOpts::default()).await;
    let frozen = &c.varnish[1];
    get(frozen.http, "/p/300").await;
    let bans_before = frozen.counter("MAIN.bans_added");

    // Region 1's agent stops answering with its connection open (a stalled path).
    c.agents[1].child.suspend();
    let mut acked = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..200u64 {
        acked.push(purge_tags(c.coordinator.purge, &[&format!("frozen_{i}")]).await);
    }
    acked.push(purge_tags(c.coordinator.purge, &["cat_p_300"]).await);
    let sending = started.elapsed();
    let head = *acked.last().unwrap();
    // The healthy region is not held back by the frozen one.
    let api = c.coordinator.api;
    assert_eventually!(
        10,
        {
            let edges = c.coordinator.edges().await;
            edges
                .iter()
                .any(|e| e["id"] == "edge-0" && e["applied_seq"].as_u64() == Some(head))
                && edges
                    .iter()
                    .any(|e| e["id"] == "edge-1" && e["lag"].as_u64().unwrap_or(0) > 0)
        },
        "edge-0 should be caught up and edge-1 lagging: {:?}",
        get_json(api, "/api/v1/edges").await
    );
    assert!(
        sending < Duration::from_secs(20),
        "Magento-facing acks slowed down: {sending:?}"
    );

    c.agents[1].child.resume();
    c.wait_applied(head).await;
    assert_eq!(lost(&c, &acked).await, 0, "purges lost");
    assert_eq!(get(frozen.http, "/p/300").await.cache(), "MISS");
    // The backlog was coalesced: far fewer bans than purges.
    let added = frozen.counter("MAIN.bans_added") - bans_before;
    eprintln!("frozen agent: {added} bans for {} purges", acked.len());
    assert!(
        added <= 5,
        "{added} bans for {} purges: backlog was not coalesced",
        acked.len()
    );
}

/// A ban too large for varnishd's PCRE2 ("regular expression is too large") is split and
/// applied, never turned into a full ban: here the agent may build bans of up to 1 MiB
/// of tags, and a backlog of 3,000 purges becomes one alternation varnish refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_too_large_for_varnish_is_split_not_flushed() {
    let mut c = Cluster::start(1, "ban", CoordinatorOpts::default()).await;
    let v = &c.varnish[0];
    for p in ["/p/1", "/untagged/keep"] {
        get(v.http, p).await;
        assert_eq!(get(v.http, p).await.cache(), "HIT", "{p} not cached");
    }
    let agent = &mut c.agents[0];
    let config = std::fs::read_to_string(&agent.config).expect("agent config");
    let default = format!(
        "max_ban_bytes = {}\n",
        edge_agent::config::DEFAULT_MAX_BAN_BYTES
    );
    assert!(config.contains(&default), "{config}");
    let config = config.replace(&default, "max_ban_bytes = 1048576\n");
    std::fs::write(&agent.config, config).expect("agent config");
    agent.kill9().await;
    agent.restart();
    c.wait_applied(0).await;

    c.agents[0].child.suspend();
    let mut clients = Vec::new();
    for k in 0..8u64 {
        let purge = c.coordinator.purge;
        clients.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..375u64 {
                let tag = format!("big_{k}_{i}_abcdefghijkl");
                let tags: Vec<&str> = if k == 0 && i == 100 {
                    vec![&tag, "cat_p_1"]
                } else {
                    vec![&tag]
                };
                last = purge_tags(purge, &tags).await;
            }
            last
        }));
    }
    let mut head = 0;
    for t in clients {
        head = head.max(t.await.expect("client"));
    }
    c.agents[0].child.resume();
    c.wait_applied(head).await;

    let edges = c.coordinator.edges().await;
    assert_eq!(
        edges[0]["full_bans"], 0,
        "a full ban instead of a split: {edges:?}"
    );
    assert_eq!(
        get(v.http, "/p/1").await.cache(),
        "MISS",
        "the named page was kept"
    );
    assert_eq!(
        get(v.http, "/untagged/keep").await.cache(),
        "HIT",
        "an unnamed page was purged (a full ban)"
    );
    let log = std::fs::read_to_string(&c.agents[0].log).unwrap_or_default();
    assert!(
        log.contains("splitting it"),
        "varnish never refused a ban, so nothing was split; the test needs a bigger one"
    );
}
