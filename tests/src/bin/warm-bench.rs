//! `warm-bench`: distributed warming with real varnishd and the real binaries on loopback.
//!
//! ```sh
//! cargo run --release -p tests --bin warm-bench -- --regions 3 --urls 500 --render-ms 20
//! cargo run --release -p tests --bin warm-bench -- --regions 5 --urls 500 --render-ms 20
//! cargo run --release -p tests --bin warm-bench -- --regions 3 --urls 500 --budget 100
//! cargo run --release -p tests --bin warm-bench -- --memory-urls 1000000
//! ```
//!
//! For flat and tiered jobs over the same sitemap, with an origin that takes a fixed time
//! to render: warmed URLs per second per region (URLs / time until that region was
//! complete) and origin renders per URL. With `--memory-urls N`, the coordinator's peak
//! RSS while it resolves an N-URL sitemap index (gzipped parts of 50,000) into shards.

// The test harness starts real programs (varnishd, the binaries, chromium) by design.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use tests::{Cluster, CoordinatorOpts};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 3)]
    regions: usize,
    /// Pages in the sitemap (the home page, ten categories, products).
    #[arg(long, default_value_t = 500)]
    urls: u32,
    /// Origin time to first byte per render.
    #[arg(long, default_value_t = 20)]
    render_ms: u64,
    /// Concurrent fetches per edge.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Origin budget, requests per second (satellites fetch from the shield at this rate
    /// too).
    #[arg(long, default_value_t = 2000.0)]
    budget: f64,
    /// Only measure coordinator memory for a sitemap index of this many URLs.
    #[arg(long)]
    memory_urls: Option<u64>,
}

async fn view(cluster: &Cluster, id: u64) -> Value {
    cluster
        .coordinator
        .call("GET", &format!("/api/v1/warm/jobs/{id}"), None)
        .await
        .json()
}

async fn run(args: &Args, tiered: bool) {
    let opts = CoordinatorOpts {
        warm_extra: format!(
            "origin_budget_rps = {0}\nsatellite_rate = {0}\nconcurrency = {1}\n",
            args.budget, args.concurrency
        ),
        ..CoordinatorOpts::default()
    };
    let cluster = Cluster::start_as(args.regions, "ban", opts, tiered).await;
    cluster
        .origin
        .origin
        .set_delay(Duration::from_millis(args.render_ms));
    let products = args.urls.saturating_sub(11);
    let r = cluster
        .coordinator
        .call(
            "POST",
            "/api/v1/warm/jobs",
            Some(&json!({"sitemap": format!("http://{}/sitemap.xml?products={products}", cluster.origin.addr),
                         "host": "shop.test"})),
        )
        .await;
    let id = r.json()["id"].as_u64().expect("job id");
    let start = Instant::now();
    let mut complete: Vec<Option<f64>> = vec![None; args.regions];
    loop {
        let v = view(&cluster, id).await;
        for (i, slot) in complete.iter_mut().enumerate() {
            let p = &v["regions"][format!("region-{i}")];
            if slot.is_none()
                && p["total"].as_u64().is_some_and(|t| t > 0)
                && p["done"] == p["total"]
            {
                *slot = Some(start.elapsed().as_secs_f64());
            }
        }
        if v["state"] != "running" && v["state"] != "queued" {
            assert_eq!(v["state"], "done", "{v}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let urls = f64::from(products + 11);
    let renders = cluster.origin.origin.total_renders() as f64;
    let per_region: Vec<String> = complete
        .iter()
        .map(|t| format!("{:.0}", urls / t.unwrap_or(f64::NAN)))
        .collect();
    println!(
        "{:<7} regions={} urls={} render={}ms budget={}  URLs/s per region [{}]  whole job {:.1}s  origin renders/URL {:.2}",
        if tiered { "tiered" } else { "flat" },
        args.regions,
        urls,
        args.render_ms,
        args.budget,
        per_region.join(", "),
        start.elapsed().as_secs_f64(),
        renders / urls
    );
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn memory(n: u64) {
    let cluster = Cluster::start(1, "ban", CoordinatorOpts::default()).await;
    let pid = cluster.coordinator.child.pid().expect("coordinator pid");
    let before = rss_kib(pid, "VmHWM:");
    let parts = n.div_ceil(50_000);
    let per = n.min(50_000);
    let r = cluster
        .coordinator
        .call(
            "POST",
            "/api/v1/warm/jobs",
            Some(&json!({"sitemap": format!("http://{}/sitemap_index.xml?parts={parts}&per={per}", cluster.origin.addr),
                         "host": "shop.test", "rate": 1})),
        )
        .await;
    let id = r.json()["id"].as_u64().expect("job id");
    let start = Instant::now();
    loop {
        let v = view(&cluster, id).await;
        if v["state"] != "queued" {
            assert_eq!(v["state"], "running", "{v}");
            println!(
                "sitemap index of {} URLs ({parts} gzipped parts) resolved and stored as shards in {:.1}s",
                v["urls"],
                start.elapsed().as_secs_f64()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak = rss_kib(pid, "VmHWM:");
    let _ = cluster
        .coordinator
        .call("POST", &format!("/api/v1/warm/jobs/{id}/cancel"), None)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "coordinator peak RSS {:.1} MiB before, {:.1} MiB after (+{:.1} MiB); RSS now {:.1} MiB; warm.redb {:.1} MiB",
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        (peak - before) as f64 / 1024.0,
        rss_kib(pid, "VmRSS:") as f64 / 1024.0,
        std::fs::metadata(cluster.coordinator.state.join("warm.redb"))
            .map(|m| m.len() as f64 / 1048576.0)
            .unwrap_or(0.0)
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tests::require_varnish();
    if let Some(n) = args.memory_urls {
        memory(n).await;
        return;
    }
    run(&args, false).await;
    run(&args, true).await;
}
