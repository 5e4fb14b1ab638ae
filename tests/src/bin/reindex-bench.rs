//! `reindex-bench`: the reindex day, evict vs refresh side by side, with real varnishd,
//! the real binaries and the sample Magento-like origin on loopback.
//!
//! ```sh
//! cargo run -p tests --bin reindex-bench                      # both modes, the scenario below
//! cargo run -p tests --bin reindex-bench -- --mode refresh --budget 40
//! ```
//!
//! The scenario: three regions, tiered (region-0 is the shield, the others fetch from
//! it), an origin taking `--render-ms` (300) per render, `--pages` (1,000) product pages
//! warmed into every region, shoppers at `--rps` (30) requests/s per region picking pages
//! with Zipf-like popularity (s = 1, seeded), open loop (one task per arrival, so a slow
//! answer does not slow the arrivals). After `--warmup-s` of shopping, five Magento tag
//! purges cover every page (200 product tags each, Magento's own pattern), and shoppers
//! go on for `--seconds` (60). Each mode runs on a fresh cluster of the same shape:
//!
//! - `evict`: Magento's semantics (`refresh_tags = false`, agents in xkey mode, the pages
//!   warmed without learning their tags, so nothing re-renders them but shoppers);
//! - `refresh`: `[purge] refresh_tags = true`, `refresh_max_stale_s = 30`.
//!
//! Per mode: origin renders per purged page (during the measured seconds and a settle
//! of `--settle-s`), the share of shopper requests that waited for the origin (answered
//! with a render that happened during the request: its `X-Origin-Render` is newer than any
//! the shopper's region had served before and it took at least half a render time), shopper
//! p50/p99, the share of answers from +15 s on that were pages rendered before the purge
//! (`X-Origin-Render` not above the origin's count for that page at the purge), and in
//! refresh mode when the refresh had every page fresh in every region.

// The test harness starts real programs (varnishd, the binaries, chromium) by design.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tests::{bench::percentile, get, magento_purge, raw, tags_pattern, Cluster, CoordinatorOpts};

#[derive(Debug, Parser)]
struct Args {
    /// `evict`, `refresh` or `both` (side by side, evict first).
    #[arg(long, default_value = "both", value_parser = ["evict", "refresh", "both"])]
    mode: String,
    #[arg(long, default_value_t = 3)]
    regions: usize,
    /// Cached product pages, all purged.
    #[arg(long, default_value_t = 1000)]
    pages: u32,
    /// Origin time per render.
    #[arg(long, default_value_t = 300)]
    render_ms: u64,
    /// Shopper requests per second per region.
    #[arg(long, default_value_t = 30.0)]
    rps: f64,
    /// Zipf exponent of page popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Measured seconds after the purge.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Shopping before the purge (the agents report popular pages meanwhile).
    #[arg(long, default_value_t = 8)]
    warmup_s: u64,
    /// After the measured seconds, without shoppers, before renders are counted.
    #[arg(long, default_value_t = 10)]
    settle_s: u64,
    /// `[warm] origin_budget_rps` (the refresh's budget).
    #[arg(long, default_value_t = 60.0)]
    budget: f64,
    /// `[warm] satellite_rate` (a satellite edge's requests/s to the shield).
    #[arg(long, default_value_t = 200.0)]
    satellite_rate: f64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// One shopper request.
#[derive(Debug, Clone)]
struct Sample {
    /// Seconds after the purge it was sent (negative: before).
    at_s: f64,
    region: usize,
    page: u32,
    ms: f64,
    status: u16,
    render: u64,
}

/// The cumulative Zipf distribution over `n` pages: page `i` (from 1) has weight 1/i^s.
fn zipf_cdf(n: u32, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    let mut cdf: Vec<f64> = (1..=n)
        .map(|i| {
            acc += 1.0 / f64::from(i).powf(s);
            acc
        })
        .collect();
    for c in &mut cdf {
        *c /= acc;
    }
    cdf
}

fn pick(cdf: &[f64], u: f64) -> u32 {
    cdf.partition_point(|c| *c < u) as u32 + 1
}

/// Shoppers of every region until `stop`, each arrival its own task (open loop).
async fn shop(
    cluster: &Cluster,
    args: &Args,
    purge_at: Arc<Mutex<Option<Instant>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let cdf = Arc::new(zipf_cdf(args.pages, args.zipf));
    let start = Instant::now();
    cluster
        .varnish
        .iter()
        .enumerate()
        .map(|(region, v)| {
            let addr = v.http;
            let (cdf, stop, samples, purge_at) =
                (cdf.clone(), stop.clone(), samples.clone(), purge_at.clone());
            let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed + region as u64);
            let rps = args.rps;
            tokio::spawn(async move {
                let mut next = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Poisson arrivals at `rps`.
                    let gap = -(1.0 - rng.gen::<f64>()).ln() / rps;
                    next += Duration::from_secs_f64(gap);
                    tokio::time::sleep_until(next.into()).await;
                    let page = pick(&cdf, rng.gen::<f64>());
                    let (samples, purge_at) = (samples.clone(), purge_at.clone());
                    tokio::spawn(async move {
                        let sent = Instant::now();
                        let r = get(addr, &format!("/p/{page}")).await;
                        let ms = sent.elapsed().as_secs_f64() * 1000.0;
                        let at_s = match *purge_at.lock().unwrap_or_else(|p| p.into_inner()) {
                            Some(t) if sent >= t => (sent - t).as_secs_f64(),
                            Some(t) => -(t - sent).as_secs_f64(),
                            None => -(start.elapsed().as_secs_f64() + 1e6),
                        };
                        let render = r
                            .header("X-Origin-Render")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        samples
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Sample {
                                at_s,
                                region,
                                page,
                                ms,
                                status: r.status,
                                render,
                            });
                    });
                }
            })
        })
        .collect()
}

/// What one mode measured.
#[derive(Debug, Default)]
struct Figures {
    renders_per_page: f64,
    waited: f64,
    p50: f64,
    p99: f64,
    stale_after_15s: f64,
    errors: usize,
    requests: usize,
    refreshed_at_s: Option<f64>,
    evicted: Option<u64>,
}

async fn run(args: &Args, refresh: bool) -> Figures {
    let opts = CoordinatorOpts {
        refresh_tags: refresh,
        refresh_max_stale_s: 30,
        warm_extra: format!(
            "origin_budget_rps = {}\nsatellite_rate = {}\n",
            args.budget, args.satellite_rate
        ),
        ..CoordinatorOpts::default()
    };
    let cluster = Cluster::start_as(args.regions, "xkey", opts, true).await;
    let origin = cluster.origin.origin.clone();
    let urls: Vec<String> = (1..=args.pages)
        .map(|p| format!("http://{}/p/{p}", cluster.origin.addr))
        .collect();
    // Every page in every region; in refresh mode the tag index learns them.
    let job = cluster
        .coordinator
        .start_warm_job(
            &json!({"urls": urls, "host": "shop.test", "rewarm": refresh, "rate": 2000}),
        )
        .await;
    let view = cluster.coordinator.warm_finished(job, 300).await;
    assert_eq!(view["state"], "done", "{view}");
    origin.set_delay(Duration::from_millis(args.render_ms));

    let purge_at = Arc::new(Mutex::new(None));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let shoppers = shop(
        &cluster,
        args,
        purge_at.clone(),
        stop.clone(),
        samples.clone(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(args.warmup_s)).await;

    // The reindex: five purges of 200 product tags each.
    let before: HashMap<u32, u64> = (1..=args.pages)
        .map(|p| (p, origin.renders(&format!("/p/{p}"))))
        .collect();
    let renders_before = origin.total_renders();
    let t0 = Instant::now();
    *purge_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(t0);
    let ids: Vec<u32> = (1..=args.pages).collect();
    let mut last_seq = 0;
    for chunk in ids.chunks(ids.len().div_ceil(5)) {
        let tags: Vec<String> = chunk.iter().map(|p| format!("cat_p_{p}")).collect();
        let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
        let r = raw(
            cluster.coordinator.purge,
            &magento_purge(&tags_pattern(&tags)),
        )
        .await
        .expect("purge");
        assert_eq!(r.status, 200, "{}", r.body);
        last_seq = r.json()["seq"].as_u64().unwrap_or(0);
    }
    // Follow the refresh while shoppers shop.
    let mut refreshed_at_s = None;
    let mut evicted = None;
    while t0.elapsed() < Duration::from_secs(args.seconds) {
        if refresh {
            let v = cluster
                .coordinator
                .call("GET", &format!("/api/v1/purges/{last_seq}"), None)
                .await
                .json();
            let r = &v["refresh"];
            if refreshed_at_s.is_none()
                && r["pages"].as_u64().is_some_and(|p| p > 0)
                && r["refreshed"] == r["pages"]
            {
                refreshed_at_s = Some(t0.elapsed().as_secs_f64());
            }
            evicted = r["evicted"].as_u64().or(evicted);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in shoppers {
        let _ = s.await;
    }
    tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
    let renders = origin.total_renders() - renders_before;

    let all = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let window: Vec<&Sample> = all
        .iter()
        .filter(|s| s.at_s >= 0.0 && s.at_s < args.seconds as f64)
        .collect();
    // Waited: answered with a render newer than the purge that took at least half a
    // render time (a stale or cached answer is neither).
    let waited = window
        .iter()
        .filter(|s| s.render > before[&s.page] && s.ms >= args.render_ms as f64 / 2.0)
        .count();
    let late: Vec<&&Sample> = window.iter().filter(|s| s.at_s >= 15.0).collect();
    let stale = late
        .iter()
        .filter(|s| s.status == 200 && s.render <= before[&s.page])
        .count();
    let mut ms: Vec<f64> = window.iter().map(|s| s.ms).collect();
    ms.sort_by(f64::total_cmp);
    let share = |n: usize, of: usize| {
        if of == 0 {
            f64::NAN
        } else {
            n as f64 / of as f64
        }
    };
    let per_region: Vec<usize> = (0..args.regions)
        .map(|r| window.iter().filter(|s| s.region == r).count())
        .collect();
    eprintln!(
        "{}: {} shopper requests in the window ({per_region:?} per region), {renders} renders",
        if refresh { "refresh" } else { "evict" },
        window.len()
    );
    Figures {
        renders_per_page: renders as f64 / f64::from(args.pages),
        waited: share(waited, window.len()),
        p50: percentile(&ms, 50.0),
        p99: percentile(&ms, 99.0),
        stale_after_15s: share(stale, late.len()),
        errors: window.iter().filter(|s| s.status != 200).count(),
        requests: window.len(),
        refreshed_at_s,
        evicted,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tests::require_varnish();
    let modes: Vec<bool> = match args.mode.as_str() {
        "evict" => vec![false],
        "refresh" => vec![true],
        _ => vec![false, true],
    };
    let mut rows = Vec::new();
    for refresh in modes {
        rows.push((refresh, run(&args, refresh).await));
    }
    println!(
        "reindex-bench: {} regions tiered, {} pages, render {} ms, {} req/s per region (Zipf s={}), 5 tag purges of every page, {} s measured, budget {} req/s",
        args.regions, args.pages, args.render_ms, args.rps, args.zipf, args.seconds, args.budget
    );
    println!(
        "{:<8} {:>16} {:>10} {:>9} {:>9} {:>18} {:>8} {:>14}",
        "mode",
        "renders/page",
        "waited",
        "p50 ms",
        "p99 ms",
        "stale from +15 s",
        "errors",
        "all fresh at"
    );
    for (refresh, f) in &rows {
        println!(
            "{:<8} {:>16.2} {:>9.1}% {:>9.1} {:>9.1} {:>17.1}% {:>8} {:>14}",
            if *refresh { "refresh" } else { "evict" },
            f.renders_per_page,
            f.waited * 100.0,
            f.p50,
            f.p99,
            f.stale_after_15s * 100.0,
            format!("{}/{}", f.errors, f.requests),
            match (f.refreshed_at_s, f.evicted) {
                (Some(t), _) => format!("+{t:.1} s"),
                (None, Some(e)) if *refresh => format!("{e} evicted"),
                _ => "–".to_owned(),
            }
        );
    }
    println!("targets for refresh: renders/page <= 1.1, waited <= 1 %, p99 < 100 ms, stale from +15 s <= 5 %");
}
