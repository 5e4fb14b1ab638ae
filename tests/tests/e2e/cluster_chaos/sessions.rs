//! Who holds an edge's session on a bad day: a copied agent config (same edge id) on the
//! very host of the genuine agent (the same address, as behind one NAT address) is
//! refused on every coordinator while the genuine agent is live, and the genuine edge
//! notices nothing; the genuine agent restarting behind its own half-open session gets in
//! within seconds; one agent process moving to another coordinator leaves one session;
//! a coordinator cut off from etcd (not from its peers) hands its agents to the others,
//! so purges sent to them reach every edge, and takes sessions again once it reaches
//! etcd.
//!
//! Agents are told apart by process (the Hello's random `instance`), not by address: the
//! copies dial from 127.0.0.1 like the genuine agents. "Another host" (for an agent that
//! sends no instance) dials through a `tests::Proxy` whose connections come from
//! 127.0.0.2.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use proto::edge::{agent_message, coordinator_message, AgentMessage, Hello};
use serde_json::Value;
use tests::ha::{HaCluster, HaOpts, Placement};
use tests::VarnishNode;
use tests::{assert_eventually, get, get_json, purge_tags, AgentProc, CoordinatorProc, Proxy};

const OTHER_HOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
/// What the agent bans with when it has no usable cursor (a full ban).
const FULL_BAN: &str = "obj.status != 0";

/// A bare agent's session, open until dropped (it sends nothing after its Hello).
struct Bare {
    _client: proto::CoordinatorClient<tonic::transport::Channel>,
    _inbound: tonic::Streaming<proto::edge::CoordinatorMessage>,
}

/// A bare agent's Hello for `edge` (listing `coordinators` coordinators), from agent
/// process `instance` ("": an agent that sends none), heartbeating every second.
fn bare_hello(edge: &str, region: &str, coordinators: u32, instance: &str) -> Hello {
    Hello {
        edge_id: edge.into(),
        region: region.into(),
        report_interval_ms: 1000,
        coordinators,
        instance: instance.into(),
        dial: 1,
        ..Default::default()
    }
}

/// Opens a session saying `hello`; Ok (the open session) once Welcome arrives, else the
/// status.
async fn open(grpc: SocketAddr, hello: Hello) -> Result<Bare, tonic::Status> {
    let mut client = proto::CoordinatorClient::connect(format!("http://{grpc}"))
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?;
    let hello = AgentMessage {
        msg: Some(agent_message::Msg::Hello(hello)),
    };
    let out =
        tokio_stream::StreamExt::chain(tokio_stream::iter(vec![hello]), tokio_stream::pending());
    let mut inbound = client.session(out).await?.into_inner();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Err(_) => return Err(tonic::Status::deadline_exceeded("no Welcome within 10 s")),
            Ok(Err(s)) => return Err(s),
            Ok(Ok(None)) => return Err(tonic::Status::aborted("closed before Welcome")),
            Ok(Ok(Some(m))) => {
                if let Some(coordinator_message::Msg::Welcome(_)) = m.msg {
                    return Ok(Bare {
                        _client: client,
                        _inbound: inbound,
                    });
                }
            }
        }
    }
}

/// Opens a session as a bare agent without an instance saying Hello for `edge` (listing
/// `coordinators` coordinators); Ok once Welcome arrives (the session then ends), else
/// the status.
async fn hello(
    grpc: SocketAddr,
    edge: &str,
    region: &str,
    coordinators: u32,
) -> Result<(), tonic::Status> {
    open(grpc, bare_hello(edge, region, coordinators, ""))
        .await
        .map(drop)
}

/// The refusal a status carries (its `x-vc-refusal` metadata).
fn refusal(s: &tonic::Status) -> Option<proto::Refusal> {
    proto::Refusal::of(s)
}

fn log_of(agent: &AgentProc) -> String {
    std::fs::read_to_string(&agent.log).unwrap_or_default()
}

/// Full bans on `v`'s ban list added at or after `since` (Unix seconds).
async fn full_bans_since(v: &VarnishNode, since: f64) -> usize {
    v.admin("ban.list")
        .await
        .lines()
        .filter(|l| l.contains(FULL_BAN))
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|t| t.parse::<f64>().ok())
                .is_some_and(|t| t >= since)
        })
        .count()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Full bans the coordinator asked `agent` for, as its log says.
fn full_bans_asked(agent: &AgentProc) -> usize {
    log_of(agent)
        .matches("coordinator asked for a full ban")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copied_agent_config_on_the_same_host_is_refused_on_every_coordinator_and_the_genuine_edge_is_untouched(
) {
    let ha = HaCluster::start(HaOpts {
        regions: 2,
        ..HaOpts::default()
    })
    .await;
    // edge-0 lives on c1 (Spread).
    let (c1, c2) = (&ha.c[0], &ha.c[1]);
    let seq = purge_tags(c1.purge, &["before-copy"]).await;
    assert_eventually!(
        20,
        c1.applied_everywhere(seq, 2).await,
        "{:?}",
        c1.edges().await
    );
    let before = c1.edge("edge-0").await;
    assert!(
        before["session_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{before}"
    );
    let genuine_sessions = before["sessions"].as_u64();
    let genuine_established = log_of(&ha.agents[0]).matches("session established").count();
    let genuine_full_bans = full_bans_asked(&ha.agents[0]);
    let since = unix_now();

    // The copy: its own varnishd, the same id and region, the same host (127.0.0.1, as
    // the genuine agent), and two coordinators' addresses.
    let copy_v = VarnishNode::start(&ha.path().join("copy-v"), ha.origin.addr).await;
    let copy = AgentProc::start_with(
        &ha.path().join("copy"),
        "edge-0",
        "region-0",
        &[c1.grpc, c2.grpc],
        None,
        &copy_v,
        "ban",
    );
    // Refused by the coordinator holding the session and by one that knows it from its
    // peer poll: each counts it, and the edges API shows the refusal with the reason.
    assert_eventually!(
        20,
        tests::ha::sessions_refused(c1, "duplicate_edge_id").await >= 1
            && tests::ha::sessions_refused(c2, "duplicate_edge_id").await >= 1,
        "c1 refused {}, c2 refused {}; copy log: {}",
        tests::ha::sessions_refused(c1, "duplicate_edge_id").await,
        tests::ha::sessions_refused(c2, "duplicate_edge_id").await,
        log_of(&copy)
    );
    for c in [c1, c2] {
        let v = c.edge("edge-0").await;
        let r = &v["refused_sessions"];
        assert!(r["count"].as_u64() >= Some(1), "{}: {v}", c.api);
        assert!(
            r["last_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{v}"
        );
        let reason = r["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("edge id edge-0 already has a live session from 127.0.0.1:")
                && reason.contains(" since ")
                && reason.contains("another agent process")
                && reason.contains("each agent needs its own id"),
            "{reason}"
        );
    }
    // One answer: every coordinator, c3 too (it refused nothing), shows every refusal,
    // whichever coordinator made it (c1 and c2 each refused the copy at least once).
    let mut counts: Vec<Option<u64>> = Vec::new();
    assert_eventually!(
        10,
        {
            counts.clear();
            for c in &ha.c {
                counts.push(c.edge("edge-0").await["refused_sessions"]["count"].as_u64());
            }
            counts[0] >= Some(2) && counts.iter().all(|n| *n == counts[0])
        },
        "refusals differ between coordinators: {counts:?}"
    );
    // One answer: every coordinator shows the genuine session, on c1.
    let instance = c1.edge("edge-0").await["session_instance"].clone();
    assert!(
        instance.as_str().is_some_and(|i| i.len() == 16),
        "{instance}"
    );
    for c in &ha.c {
        let v = c.edge("edge-0").await;
        assert_eq!(v["coordinator"], "c1", "{}: {v}", c.api);
        assert_eq!(v["session_instance"], instance, "{}: {v}", c.api);
    }
    // The genuine edge meanwhile: the same session, purges applied, no full ban.
    for i in 0..3 {
        let seq = purge_tags(c2.purge, &[&format!("during-copy-{i}")]).await;
        assert_eventually!(
            20,
            c1.applied_everywhere(seq, 2).await,
            "{:?}",
            c1.edges().await
        );
    }
    // Wait for the copy's third try (after its slow backoff), then read its log.
    let t = Instant::now();
    assert_eventually!(
        40,
        tests::ha::sessions_refused(c1, "duplicate_edge_id").await
            + tests::ha::sessions_refused(c2, "duplicate_edge_id").await
            >= 3,
        "the copy does not keep trying: {}",
        log_of(&copy)
    );
    println!(
        "copy's third try {:.1} s after its second refusal was seen",
        t.elapsed().as_secs_f64()
    );
    let log = log_of(&copy);
    assert!(
        !log.contains("session established"),
        "the copy got in: {log}"
    );
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one clear error, not one per retry: {log}");
    assert!(
        errors[0].contains("another agent holds this edge id") && errors[0].contains("127.0.0.1:"),
        "{}",
        errors[0]
    );

    let after = c1.edge("edge-0").await;
    assert_eq!(
        after["sessions"].as_u64(),
        genuine_sessions,
        "the genuine session was never replaced: {after}"
    );
    assert_eq!(after["full_bans"], 0, "{after}");
    assert!(
        after["session_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{after}"
    );
    assert_eq!(
        full_bans_since(&ha.varnish[0], since).await,
        0,
        "{}",
        ha.varnish[0].admin("ban.list").await
    );
    assert_eq!(
        full_bans_since(&copy_v, 0.0).await,
        0,
        "the copy never got a session to ban with"
    );
    let genuine_log = log_of(&ha.agents[0]);
    assert_eq!(
        genuine_log.matches("session established").count(),
        genuine_established,
        "{genuine_log}"
    );
    assert_eq!(
        full_bans_asked(&ha.agents[0]),
        genuine_full_bans,
        "{genuine_log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_genuine_agent_restarting_behind_its_half_open_session_gets_in_within_seconds() {
    let mut ha = HaCluster::start(HaOpts {
        regions: 1,
        ..HaOpts::default()
    })
    .await;
    let (c1, c2, c3) = (&ha.c[0], &ha.c[1], &ha.c[2]);
    let dir = ha.path().join("a0");
    let at = |c: &CoordinatorProc, id: &'static str| {
        let api = c.api;
        async move {
            let v = get_json(api, "/api/v1/edges?scope=local")
                .await
                .unwrap_or(Value::Null);
            v.as_array()
                .and_then(|l| {
                    l.iter()
                        .find(|e| e["id"] == id && e["connected"] == true)
                        .cloned()
                })
                .and_then(|e| e["session_addr"].as_str().map(str::to_owned))
                .unwrap_or_default()
        }
    };
    // While the genuine agent (127.0.0.1) heartbeats, another process is refused from
    // its very address, and one that sends no instance from another host.
    let err = open(c1.grpc, bare_hello("edge-0", "region-0", 1, "a-copy"))
        .await
        .err()
        .expect("a copy on the same host got in");
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
    assert_eq!(refusal(&err), Some(proto::Refusal::DuplicateEdgeId));
    assert!(
        err.message()
            .contains("already has a live session from 127.0.0.1:")
            && err.message().contains("another agent process"),
        "{}",
        err.message()
    );
    let from_other = Proxy::start_from(c1.grpc, Some(OTHER_HOST)).await;
    let err = hello(from_other.addr, "edge-0", "region-0", 1)
        .await
        .expect_err("an older agent from another host got in");
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");

    // The genuine agent again, through a proxy (from 127.0.0.1 too).
    let direct = at(c1, "edge-0").await;
    ha.agents[0].kill9().await;
    let via = Proxy::start(c1.grpc).await;
    let agent = AgentProc::start_with(
        &dir,
        "edge-0",
        "region-0",
        &[via.addr],
        None,
        &ha.varnish[0],
        "ban",
    );
    assert_eventually!(
        20,
        {
            let a = at(c1, "edge-0").await;
            !a.is_empty() && a != direct
        },
        "{:?}",
        c1.edges().await
    );
    let seq = purge_tags(c1.purge, &["first"]).await;
    assert_eventually!(
        20,
        c1.applied_everywhere(seq, 1).await,
        "{:?}",
        c1.edges().await
    );
    let since = unix_now();
    let full_bans = full_bans_asked(&agent);

    // Half-open: the link is cut (the socket stays open), the agent killed -9 and
    // started again from the same address (straight to c1): a new process, let in once
    // the old session has missed two heartbeats.
    via.cut();
    let mut agent = agent;
    agent.kill9().await;
    let through = at(c1, "edge-0").await;
    let t = Instant::now();
    let agent = AgentProc::start_with(
        &dir,
        "edge-0",
        "region-0",
        &[c1.grpc],
        None,
        &ha.varnish[0],
        "ban",
    );
    assert_eventually!(
        20,
        {
            let a = at(c1, "edge-0").await;
            !a.is_empty() && a != through
        },
        "{:?}; {}",
        c1.edges().await,
        log_of(&agent)
    );
    let restarted = t.elapsed();
    println!(
        "restart behind a half-open session: in after {:.1} s",
        restarted.as_secs_f64()
    );
    assert!(restarted < Duration::from_secs(10), "{restarted:?}");

    // Resumed from its cursor: every purge applied, never a full ban.
    let seq = purge_tags(c1.purge, &["resumed"]).await;
    assert_eventually!(
        20,
        c1.applied_everywhere(seq, 1).await,
        "{:?}",
        c1.edges().await
    );
    assert_eq!(
        full_bans_since(&ha.varnish[0], since).await,
        0,
        "{}",
        ha.varnish[0].admin("ban.list").await
    );
    assert_eq!(full_bans_asked(&agent), full_bans, "{}", log_of(&agent));
    assert_eq!(c1.edge("edge-0").await["full_bans"], 0);

    // One process moving to another coordinator (its session on c1 left open, and
    // heartbeating every 10 s, so silence would take 30 s to end it): c1 ends the older
    // session at its next poll of c2, and every coordinator shows it on c2 alone.
    let slow = |dial: u64| Hello {
        report_interval_ms: 10_000,
        dial,
        ..bare_hello("mover", "region-0", 3, "mover-process")
    };
    let _old = open(c1.grpc, slow(1)).await.expect("first session");
    assert_eventually!(
        10,
        c2.edges().await.iter().any(|e| e["id"] == "mover"),
        "{:?}",
        c2.edges().await
    );
    let t = Instant::now();
    let _new = open(c2.grpc, slow(2))
        .await
        .expect("the same process, moved");
    assert_eventually!(
        10,
        at(c1, "mover").await.is_empty(),
        "c1 keeps the older session: {:?}",
        c1.edges().await
    );
    let moved = t.elapsed();
    println!(
        "a moved process's older session ended {:.1} s after the move",
        moved.as_secs_f64()
    );
    assert!(!at(c2, "mover").await.is_empty(), "the newer one stays");
    for c in &ha.c {
        assert_eventually!(
            10,
            c.edge("mover").await["coordinator"] == "c2",
            "{}: {}",
            c.api,
            c.edge("mover").await
        );
    }
    // And another process is refused on a third coordinator, from the same address.
    let err = open(
        c3.grpc,
        Hello {
            instance: "another-process".into(),
            ..slow(1)
        },
    )
    .await
    .err()
    .expect("another process got in beside the moved one");
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
    assert!(
        err.message().contains("on coordinator c2"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_cut_off_from_etcd_hands_its_agents_to_the_others() {
    let mut ha = HaCluster::start(HaOpts {
        coordinators: 3,
        regions: 3,
        placement: Placement::All,
        // `[store] handoff_after_s` at its default, 5 s.
        ..HaOpts::default()
    })
    .await;
    // The coordinator holding the most sessions is cut off.
    let mut held = Vec::new();
    for c in &ha.c {
        held.push(tests::ha::local_edges(c).await);
    }
    let i = (0..held.len())
        .max_by_key(|i| held[*i].len())
        .expect("coordinators");
    let moving = held[i].clone();
    assert!(!moving.is_empty(), "{held:?}");
    let j = (i + 1) % ha.c.len();
    let (cut, other) = (&ha.c[i], &ha.c[j]);

    ha.cut_etcd(i);
    let t = Instant::now();
    assert_eventually!(
        40,
        tests::ha::local_edges(cut).await.is_empty() && other.applied_everywhere(0, 3).await,
        "c{} still holds {:?}; c{} sees {:?}",
        i + 1,
        tests::ha::local_edges(cut).await,
        j + 1,
        other.edges().await
    );
    let moved = t.elapsed();
    println!(
        "{:?} moved off c{} {:.1} s after its etcd was cut",
        moving,
        i + 1,
        moved.as_secs_f64()
    );
    assert!(moved < Duration::from_secs(30), "{moved:?}");

    // No region stale behind the cut one: a purge sent to another reaches every edge.
    let seq = purge_tags(other.purge, &["while-cut"]).await;
    assert_eventually!(
        20,
        other.applied_everywhere(seq, 3).await,
        "{:?}",
        other.edges().await
    );
    for (k, a) in ha.agents.iter().enumerate() {
        assert!(
            !log_of(a).contains("session refused again"),
            "edge-{k} was taken for a duplicate: {}",
            log_of(a)
        );
    }
    for e in other.edges().await {
        assert_ne!(e["coordinator"], format!("c{}", i + 1), "{e}");
    }

    // While cut: an agent listing several coordinators is sent on, one listing only
    // this one stays.
    let err = hello(cut.grpc, "probe-movable", "region-0", 3)
        .await
        .expect_err("not handed off");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert_eq!(refusal(&err), Some(proto::Refusal::Handoff), "{err}");
    assert!(
        err.message().contains("use another coordinator"),
        "{}",
        err.message()
    );
    hello(cut.grpc, "probe-single", "region-0", 1)
        .await
        .expect("an agent listing one coordinator stays");
    for (k, a) in ha.agents.iter().enumerate() {
        if moving.contains(&format!("edge-{k}")) {
            assert!(
                log_of(a).contains("coordinator hands its agents to another one"),
                "{}",
                log_of(a)
            );
        }
    }

    // Healed: it takes sessions again.
    ha.heal_etcd(i);
    assert_eventually!(
        30,
        ha.view(i).await["store_reachable"] == true,
        "{}",
        ha.view(i).await
    );
    let t = Instant::now();
    assert_eventually!(
        10,
        hello(cut.grpc, "probe-after", "region-0", 3).await.is_ok(),
        "c{} still refuses: {:?}",
        i + 1,
        hello(cut.grpc, "probe-after", "region-0", 3).await
    );
    println!(
        "c{} accepted sessions {:.1} s after it reached etcd again",
        i + 1,
        t.elapsed().as_secs_f64()
    );

    // etcd loses its quorum: every coordinator is blind, so nobody hands anything off.
    let mut handed = Vec::new();
    let mut held = Vec::new();
    for c in &ha.c {
        handed.push(handed_off_metric(c).await);
        held.push(agents_on(c).await);
    }
    ha.kill_etcd(&[0, 1]).await;
    HaCluster::settle(12.0).await;
    for (k, c) in ha.c.iter().enumerate() {
        assert_eq!(
            handed_off_metric(c).await,
            handed[k],
            "c{} handed agents off with every coordinator blind",
            k + 1
        );
        assert_eq!(agents_on(c).await, held[k], "c{}'s agents moved", k + 1);
    }
    ha.restart_etcd(&[0, 1]).await;
}

/// The real agents (not the probes above) `c` holds.
async fn agents_on(c: &CoordinatorProc) -> Vec<String> {
    let mut l = tests::ha::local_edges(c).await;
    l.retain(|e| e.starts_with("edge-"));
    l
}

/// `coordinator_sessions_handed_off_total` on `c`.
async fn handed_off_metric(c: &CoordinatorProc) -> u64 {
    let body = get(c.api, "/metrics").await.body;
    body.lines()
        .find_map(|l| l.strip_prefix("coordinator_sessions_handed_off_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copied_certificate_is_the_same_identity_so_the_instance_keeps_the_copy_out() {
    // One coordinator with mutual TLS: the copy presents the genuine agent's very files.
    let cluster = tests::Cluster::start(1, "ban", tests::CoordinatorOpts::default()).await;
    let c = &cluster.coordinator;
    let genuine: toml::Value =
        toml::from_str(&std::fs::read_to_string(&cluster.agents[0].config).expect("agent config"))
            .expect("agent config parses");
    let file =
        |k: &str| std::path::PathBuf::from(genuine["tls"][k].as_str().expect("a [tls] file"));
    let tls = Some((file("ca"), file("cert"), file("key")));
    // From the genuine agent's own address: only the process tells them apart.
    let copy_v = VarnishNode::start(&cluster.dir.path().join("copy-v"), cluster.origin.addr).await;
    let copy = AgentProc::start_with(
        &cluster.dir.path().join("copy"),
        "edge-0",
        "region-0",
        &[c.grpc],
        tls,
        &copy_v,
        "ban",
    );
    assert_eventually!(
        20,
        tests::ha::sessions_refused(c, "duplicate_edge_id").await >= 1,
        "copy log: {}",
        log_of(&copy)
    );
    let v = c.edge("edge-0").await;
    assert!(
        v["refused_sessions"]["last_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{v}"
    );
    assert!(
        v["session_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{v}"
    );
    let seq = purge_tags(c.purge, &["with-a-copy-around"]).await;
    cluster.wait_applied(seq).await;
    assert!(
        !log_of(&copy).contains("session established"),
        "{}",
        log_of(&copy)
    );
    assert_eq!(c.edge("edge-0").await["sessions"], 1);
}
