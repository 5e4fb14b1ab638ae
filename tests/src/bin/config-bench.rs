//! `config-bench`: time from `config push` to the bundle being active on every edge, with
//! real varnishd (one per agent, as in production) and the real binaries on loopback.
//!
//! ```sh
//! cargo run --release -p tests --bin config-bench -- --agents 3
//! cargo run --release -p tests --bin config-bench -- --agents 50
//! ```
//!
//! Each push is a distinct version of the sample bundle (a comment changes), rolled out
//! without the canary stage (the canary wait is a configured pause, not a cost). For
//! reference it also times one bare `vcl.load` + `vcl.use` of the same VCL over the admin
//! CLI: the part of a rollout that is varnishd compiling C.

// The test harness starts real programs (varnishd, the binaries, chromium) by design.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use clap::Parser;
use tests::{percentile, AgentProc, CoordinatorOpts, CoordinatorProc, OriginServer, VarnishNode};

#[derive(Debug, Parser)]
struct Args {
    /// Edge agents, each with its own varnishd.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Bundles pushed one after the other.
    #[arg(long, default_value_t = 5)]
    pushes: usize,
}

fn summary(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "{name:<44} n={:<3} p50={:>9.1} max={:>9.1} ms",
        ms.len(),
        percentile(&ms, 50.0),
        percentile(&ms, 100.0)
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tests::require_varnish();
    let dir = tests::temp_dir();
    let origin = OriginServer::start().await;
    let opts = CoordinatorOpts {
        regions: tests::regions(args.agents, origin.addr),
        ..CoordinatorOpts::default()
    };
    let coordinator = CoordinatorProc::start(&dir.path().join("coordinator"), &opts).await;
    let mut nodes = Vec::new();
    for i in 0..args.agents {
        nodes.push(VarnishNode::start(&dir.path().join(format!("v{i}")), origin.addr).await);
    }
    let mut agents = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        agents.push(AgentProc::start(
            &dir.path().join(format!("a{i}")),
            &format!("edge-{i}"),
            &format!("region-{i}"),
            &coordinator,
            node,
            "ban",
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !coordinator.applied_everywhere(0, args.agents).await {
        assert!(Instant::now() < deadline, "agents did not connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{} agents + {} varnishd connected",
        args.agents,
        nodes.len()
    );

    // Baseline: one bare load + use on one varnishd.
    let mut bare = Vec::new();
    for i in 0..args.pushes {
        let t = Instant::now();
        nodes[0]
            .admin(&format!(
                "vcl.load bench_{i} {}",
                nodes[0].boot_vcl.display()
            ))
            .await;
        nodes[0].admin(&format!("vcl.use bench_{i}")).await;
        bare.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    nodes[0].admin("vcl.use boot").await;
    for i in 0..args.pushes {
        nodes[0].admin(&format!("vcl.discard bench_{i}")).await;
    }

    let mut totals = Vec::new();
    for i in 0..args.pushes {
        let mut bundle = coordinator_cli::demo::sample_bundle();
        if let Some(main) = bundle.files.get_mut("main.vcl") {
            main.push_str(&format!("\n# bench push {i} {}\n", std::process::id()));
        }
        let t = Instant::now();
        let (version, view) = coordinator.push_and_wait(&bundle, false).await;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(
            view["rollout"]["phase"], "done",
            "push {i} ({version}): {view}"
        );
        println!(
            "push {i}: {version} active on all {} edges after {ms:.0} ms",
            args.agents
        );
        totals.push(ms);
    }
    println!();
    summary("bare vcl.load + vcl.use on one varnishd", bare);
    summary(
        &format!("push -> active on all {} edges", args.agents),
        totals,
    );
    drop(agents);
}
