//! `telemetry-bench`: what watching the fleet costs the coordinator, and how fresh the
//! numbers are. Real varnishd, real binaries, mutual TLS, on loopback.
//!
//! ```sh
//! cargo run --release -p tests --bin telemetry-bench -- --agents 50 --interval-s 2
//! ```
//!
//! Agents (each its own region, spread over `--varnishes` varnishd) send varnishstat
//! counters every `--interval-s` and probe one check at the same interval. Reports the
//! coordinator's CPU (from /proc over `--seconds`) and resident memory, and the delay from
//! a burst of cache hits in varnish to the burst showing in `/api/v1/regions`.

// The test harness starts real programs (varnishd, the binaries, chromium) by design.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use clap::Parser;
use tests::{
    get, percentile, AgentOpts, AgentProc, CoordinatorOpts, CoordinatorProc, OriginServer,
    VarnishNode,
};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 50)]
    agents: usize,
    #[arg(long, default_value_t = 5)]
    varnishes: usize,
    #[arg(long, default_value_t = 2)]
    interval_s: u64,
    /// How long CPU is measured.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Freshness samples.
    #[arg(long, default_value_t = 10)]
    bursts: usize,
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields after the name: state(0) ... utime(11) stime(12)
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn proc_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn hits(c: &CoordinatorProc, region: &str) -> u64 {
    let r = c.call("GET", "/api/v1/regions", None).await.json();
    r.as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == region).cloned())
        .and_then(|r| r["last_minute"]["hits"].as_u64())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tests::require_varnish();
    let agent_opts = AgentOpts {
        stats_interval_s: args.interval_s,
        ..AgentOpts::default()
    };
    let dir = tests::temp_dir();
    let origin = OriginServer::start().await;
    let extra = format!(
        "[monitoring]\norigin = \"{}\"\n[[checks]]\nname = \"health\"\npath = \"/health_check.php\"\ninterval_ms = {}\n",
        origin.addr,
        args.interval_s * 1000
    );
    let coordinator = CoordinatorProc::start(
        &dir.path().join("coordinator"),
        &CoordinatorOpts {
            extra,
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let mut nodes = Vec::new();
    for v in 0..args.varnishes.max(1) {
        nodes.push(VarnishNode::start(&dir.path().join(format!("v{v}")), origin.addr).await);
    }
    let mut agents = Vec::new();
    for a in 0..args.agents {
        agents.push(AgentProc::start(
            &dir.path().join(format!("a{a}")),
            &format!("edge-{a}"),
            &format!("region-{a}"),
            &coordinator,
            &nodes[a % nodes.len()],
            &agent_opts,
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !coordinator.applied_everywhere(0, args.agents).await {
        assert!(Instant::now() < deadline, "agents did not connect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pid = coordinator.child.pid().expect("coordinator pid");
    println!(
        "{} agents on {} varnishd, reporting every {} s; settling 10 s",
        args.agents,
        nodes.len(),
        args.interval_s
    );
    tokio::time::sleep(Duration::from_secs(10)).await;

    let hz = 100.0; // USER_HZ on Linux
    let t0 = proc_cpu_ticks(pid);
    let start = Instant::now();
    let mut rss_max = 0;
    while start.elapsed() < Duration::from_secs(args.seconds) {
        rss_max = rss_max.max(proc_rss_kb(pid));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let cpu = (proc_cpu_ticks(pid) - t0) as f64 / hz / start.elapsed().as_secs_f64();
    println!(
        "coordinator CPU: {:.1}% of one core; RSS max {:.1} MiB",
        cpu * 100.0,
        rss_max as f64 / 1024.0
    );

    // Freshness: a burst of 20 hits on varnish 0 (region-0's agent) until the API shows it.
    let v0 = nodes[0].http;
    get(v0, "/p/burst").await; // cached
    let mut delays = Vec::new();
    for _ in 0..args.bursts {
        tokio::time::sleep(Duration::from_millis(1300)).await; // desynchronise from ticks
        let before = hits(&coordinator, "region-0").await;
        let t = Instant::now();
        for _ in 0..20 {
            get(v0, "/p/burst").await;
        }
        while hits(&coordinator, "region-0").await < before + 20 {
            assert!(t.elapsed() < Duration::from_secs(30), "burst never showed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        delays.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    delays.sort_by(f64::total_cmp);
    println!(
        "traffic -> /api/v1/regions delay: n={} p50={:.0} ms p90={:.0} ms max={:.0} ms",
        delays.len(),
        percentile(&delays, 50.0),
        percentile(&delays, 90.0),
        percentile(&delays, 100.0)
    );
    drop(agents);
}
