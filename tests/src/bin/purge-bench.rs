//! `purge-bench`: measures the purge pipeline on loopback with real varnishd and the real
//! binaries, and compares it with Magento's own way (sequential PURGE to every varnishd).
//!
//! ```sh
//! cargo run --release -p tests --bin purge-bench -- --agents 3
//! cargo run --release -p tests --bin purge-bench -- --agents 50 --varnishes 5
//! ```
//!
//! Reports (percentiles over all samples, in milliseconds):
//! 1. acknowledgement latency of a Magento-style PURGE (new connection each, fsync on);
//! 2. time from PURGE received to applied on all edges (coordinator clock: received_at to
//!    the last edge's ack), with purges sent one at a time;
//! 3. sustained accepted purges per second with `--clients` concurrent senders, the
//!    largest edge lag seen, and how long the edges took to catch up afterwards;
//! 4. Magento's way: one PURGE to each varnishd, one after the other, per "save".

// The test harness starts real programs (varnishd, the binaries, chromium) by design.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tests::{
    get_json, magento_purge, raw, tags_pattern, AgentOpts, AgentProc, CoordinatorOpts,
    CoordinatorProc, OriginServer, VarnishNode,
};

#[derive(Debug, Parser)]
struct Args {
    /// Edge agents.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// varnishd instances (agents are spread over them); default: one per agent up to 5.
    #[arg(long)]
    varnishes: Option<usize>,
    /// Sequential purges for latency and propagation.
    #[arg(long, default_value_t = 500)]
    purges: usize,
    /// Pause between sequential purges (50/s is a heavy Magento reindex: 3,000 a minute).
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Concurrent senders for the throughput phase.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Length of the throughput phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Agent purge mode.
    #[arg(long, default_value = "ban")]
    mode: String,
    /// The agents' `purge_window_ms` (default: the agent's own default).
    #[arg(long)]
    window_ms: Option<u64>,
    /// Plaintext gRPC instead of mutual TLS (to compare the two).
    #[arg(long)]
    insecure: bool,
}

/// Every how many purges of a storm client one is timed from received to applied.
const STORM_SAMPLE: u64 = 50;

/// From the coordinator receiving purge `seq` to the first and to the last edge's ack of
/// it (ms), once every edge applied it.
async fn propagation_ms(api: SocketAddr, seq: u64) -> Option<(f64, f64)> {
    let p = get_json(api, &format!("/api/v1/purges/{seq}")).await?;
    let received = p["received_at_us"].as_u64()?;
    let (mut first, mut last) = (u64::MAX, 0);
    for e in p["edges"].as_object()?.values() {
        let at = e["applied_at_us"].as_u64()?;
        (first, last) = (first.min(at), last.max(at));
    }
    let ms = |at: u64| at.saturating_sub(received) as f64 / 1e3;
    Some((ms(first), ms(last)))
}

fn summary(name: &str, ms: Vec<f64>) {
    println!("{}", tests::percentiles_line(name, ms));
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tests::require_varnish();
    let varnishes = args.varnishes.unwrap_or(args.agents.min(5)).max(1);
    let agent_opts = AgentOpts {
        purge_window_ms: args.window_ms,
        ..AgentOpts::from(args.mode.as_str())
    };
    let dir = tests::temp_dir();
    let origin = OriginServer::start().await;
    let coordinator = CoordinatorProc::start(
        &dir.path().join("coordinator"),
        &CoordinatorOpts {
            insecure: args.insecure,
            ..CoordinatorOpts::default()
        },
    )
    .await;
    println!(
        "gRPC: {}",
        if args.insecure {
            "plaintext (--insecure)"
        } else {
            "mutual TLS"
        }
    );
    let mut nodes = Vec::new();
    for v in 0..varnishes {
        nodes.push(VarnishNode::start(&dir.path().join(format!("v{v}")), origin.addr).await);
    }
    let mut agents = Vec::new();
    for a in 0..args.agents {
        let node = &nodes[a % varnishes];
        agents.push(AgentProc::start(
            &dir.path().join("agents"),
            &format!("edge-{a}"),
            &format!("region-{}", a % varnishes),
            &coordinator,
            node,
            &agent_opts,
        ));
    }
    let start = Instant::now();
    while !coordinator.applied_everywhere(0, args.agents).await {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "agents did not connect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "purge-bench: {} agents over {} varnishd, mode {}, purge window {}, sequential purges every {} ms, binaries in {}",
        args.agents,
        varnishes,
        args.mode,
        args.window_ms
            .map_or("the agent's default".to_owned(), |ms| format!("{ms} ms")),
        args.interval_ms,
        tests::bin_dir().display()
    );

    // 1 + 2: sequential purges.
    let mut ack_ms = Vec::new();
    let mut seqs = Vec::new();
    for i in 0..args.purges {
        let req = magento_purge(&tags_pattern(&[&format!("cat_p_{i}"), "cat_p"]));
        let t = Instant::now();
        let r = raw(coordinator.purge, &req).await.expect("purge");
        ack_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r.status, 200);
        seqs.push(r.json()["seq"].as_u64().expect("seq"));
        // Open-loop pacing at a realistic rate, so propagation is measured unsaturated.
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    let last = *seqs.last().expect("purges");
    while !coordinator.applied_everywhere(last, args.agents).await {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut prop_ms = Vec::new();
    for seq in &seqs {
        let (_, all) = propagation_ms(coordinator.api, *seq)
            .await
            .expect("purge status");
        prop_ms.push(all);
    }
    summary("ack latency (Magento PURGE -> 200)", ack_ms);
    summary(
        &format!("received -> applied on all {} edges", args.agents),
        prop_ms,
    );

    // 3: throughput, and what the storm does to each edge's ban list.
    let bans_before: Vec<u64> = nodes.iter().map(|n| n.counter("MAIN.bans_added")).collect();
    let storm_started = Instant::now();
    let accepted = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    let mut conc_ms_all = Vec::new();
    for c in 0..args.clients {
        let accepted = accepted.clone();
        let purge = coordinator.purge;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut sampled = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let req = magento_purge(&tags_pattern(&[&format!("load_{c}_{i}")]));
                let t = Instant::now();
                if let Ok(r) = raw(purge, &req).await {
                    if r.status == 200 {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                        if i.is_multiple_of(STORM_SAMPLE) {
                            sampled.extend(r.json()["seq"].as_u64());
                        }
                    }
                }
                i += 1;
            }
            (lat, sampled)
        }));
    }
    let api = coordinator.api;
    let lag_probe = tokio::spawn(async move {
        let mut max_lag = 0u64;
        while Instant::now() < deadline {
            if let Some(list) = get_json(api, "/api/v1/edges").await {
                for e in list.as_array().into_iter().flatten() {
                    max_lag = max_lag.max(e["lag"].as_u64().unwrap_or(0));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        max_lag
    });
    let mut sampled = Vec::new();
    for t in tasks {
        let (lat, seqs) = t.await.expect("client");
        conc_ms_all.extend(lat);
        sampled.extend(seqs);
    }
    let max_lag = lag_probe.await.unwrap_or(0);
    let head = coordinator.head().await;
    let catch_up = Instant::now();
    while !coordinator.applied_everywhere(head, args.agents).await {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n = accepted.load(Ordering::Relaxed);
    println!(
        "sustained: {} clients x {}s: {} purges accepted = {:.0}/s; max edge lag seen {} entries; all edges caught up {:.0} ms after the last ack",
        args.clients,
        args.seconds,
        n,
        n as f64 / args.seconds as f64,
        max_lag,
        catch_up.elapsed().as_secs_f64() * 1e3
    );
    summary(
        &format!("ack latency under load ({} clients)", args.clients),
        conc_ms_all,
    );
    // Bans over the storm and its catch-up, per varnishd (each serves its agents' bans).
    let storm_s = storm_started.elapsed().as_secs_f64();
    let per_node: Vec<f64> = nodes
        .iter()
        .zip(&bans_before)
        .map(|(node, before)| (node.counter("MAIN.bans_added") - before) as f64 / storm_s)
        .collect();
    let busiest = per_node.iter().copied().fold(0.0, f64::max);
    println!(
        "storm bans: at most {busiest:.1} bans added per second on a varnishd ({} agent(s) each; {:.0} purges per ban)",
        args.agents.div_ceil(varnishes),
        (n as f64 / storm_s) / (busiest / args.agents.div_ceil(varnishes) as f64).max(1e-9)
    );
    let (mut storm_first, mut storm_all) = (Vec::new(), Vec::new());
    for seq in sampled {
        if let Some((first, all)) = propagation_ms(api, seq).await {
            storm_first.push(first);
            storm_all.push(all);
        }
    }
    summary(
        "during the storm, received -> applied on the first edge",
        storm_first,
    );
    summary(
        &format!(
            "during the storm, received -> applied on all {} edges (every {STORM_SAMPLE}th purge)",
            args.agents
        ),
        storm_all,
    );

    // 4: Magento's own way.
    let hosts: Vec<SocketAddr> = nodes.iter().map(|n| n.http).collect();
    let mut magento_ms = Vec::new();
    for i in 0..args.purges.min(500) {
        let req = magento_purge(&tags_pattern(&[&format!("direct_{i}")]));
        let t = Instant::now();
        for h in &hosts {
            let r = raw(*h, &req).await.expect("direct purge");
            assert_eq!(r.status, 200, "varnish refused the purge: {}", r.body);
        }
        magento_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    summary(
        &format!(
            "Magento's way: sequential PURGE to {} varnishd",
            hosts.len()
        ),
        magento_ms,
    );
    println!("(loopback: real WAN round trips add their RTT per host to Magento's way, and nothing to the coordinator's ack)");

    for a in agents.iter_mut() {
        a.child.stop(Duration::from_secs(2)).await;
    }
}
