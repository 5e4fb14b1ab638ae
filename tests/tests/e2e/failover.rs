//! An agent given several coordinators (`coordinator = [c1, c2]`) uses one and, when it
//! dies, is on the other within seconds, applying what that one logs. (With the
//! embedded store each coordinator has its own log, so the switch costs one full ban;
//! with a shared store, issue 15, the cursor resumes.)

use std::time::{Duration, Instant};

use tests::{
    assert_eventually, get, purge_tags, temp_dir, AgentProc, CoordinatorOpts, CoordinatorProc,
    OriginServer, VarnishNode,
};

async fn connected_on(c: &CoordinatorProc) -> bool {
    tests::get_json(c.api, "/api/v1/edges")
        .await
        .and_then(|e| e.as_array().cloned())
        .is_some_and(|e| {
            e.iter()
                .any(|e| e["id"] == "edge-0" && e["connected"] == true)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_to_the_next_coordinator_in_its_list() {
    tests::require_varnish();
    let dir = temp_dir();
    let origin = OriginServer::start().await;
    let opts = CoordinatorOpts {
        insecure: true,
        regions: tests::regions(1, origin.addr),
        ..CoordinatorOpts::default()
    };
    let mut c1 = CoordinatorProc::start(&dir.path().join("c1"), &opts).await;
    let mut c2 = CoordinatorProc::start(&dir.path().join("c2"), &opts).await;
    let varnish = VarnishNode::start(&dir.path().join("v0"), origin.addr).await;
    let _agent = AgentProc::start_with(
        &dir.path().join("a0"),
        "edge-0",
        "region-0",
        &[c1.grpc, c2.grpc],
        None,
        &varnish,
        "ban",
    );
    assert_eventually!(
        20,
        connected_on(&c1).await || connected_on(&c2).await,
        "the agent connected to neither coordinator"
    );
    // Kill the one it chose; it must be on the other within seconds.
    let (dead, alive) = if connected_on(&c1).await {
        (&mut c1, &c2)
    } else {
        (&mut c2, &c1)
    };
    dead.child.kill9().await;
    let killed = Instant::now();
    assert_eventually!(
        15,
        connected_on(alive).await,
        "the agent did not fail over: {:?}",
        alive.edges().await
    );
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(15), "{took:?}");
    // What the survivor logs reaches this edge's varnish.
    assert_eq!(get(varnish.http, "/p/5").await.status, 200);
    assert_eq!(get(varnish.http, "/p/5").await.cache(), "HIT");
    let seq = purge_tags(alive.purge, &["cat_p_5"]).await;
    assert_eventually!(
        15,
        alive.applied_everywhere(seq, 1).await,
        "purge {seq} not applied after failover"
    );
    assert_eq!(get(varnish.http, "/p/5").await.cache(), "MISS");
    eprintln!("failover took {took:?}");
}
