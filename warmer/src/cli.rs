//! The standalone `warmer` command: its arguments ([`Args`]) and the pass it runs
//! ([`run`]): read the sitemaps, warm one varnish, print what the cache said.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::engine::{self, Options};
use crate::sitemap::Limits;

/// Warm a varnish from Magento's sitemaps (index, urlset, .gz, or a plain URL list).
#[derive(Debug, Parser)]
#[command(version = env!("BUILD_VERSION"), about)]
pub struct Args {
    /// Sitemap: an http:// or https:// URL, or a local file.
    #[arg(long)]
    pub sitemap: String,
    /// The varnish to fetch through, e.g. http://127.0.0.1:6081.
    #[arg(long)]
    pub via: String,
    /// Host header (default: each URL's host).
    #[arg(long)]
    pub host: Option<String>,
    /// Requests per second.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Fetches in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Fetch every URL once more with these headers ('Name: value', several joined by ';;').
    #[arg(long)]
    pub variation: Vec<String>,
    /// Longest wait for one answer (and for each sitemap).
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Halve the rate when a miss takes longer than this to its first byte (or on a 5xx
    /// or 429); regain 5 % of --rate per second otherwise.
    #[arg(long, default_value_t = 2_000)]
    pub slow_ttfb_ms: u64,
}

/// Runs one pass to its exit status: 0 when anything was fetched, 1 when every fetch
/// failed, 2 for bad arguments or an unreadable sitemap.
pub async fn run(args: Args) -> ExitCode {
    let fail = |m: String| {
        eprintln!("warmer: {m}");
        ExitCode::from(2)
    };
    if !args.rate.is_finite() || args.rate <= 0.0 || args.concurrency == 0 {
        return fail("--rate and --concurrency must be positive".into());
    }
    let via = match args
        .via
        .strip_prefix("http://")
        .unwrap_or(&args.via)
        .trim_end_matches('/')
        .parse()
    {
        Ok(a) => a,
        Err(_) => return fail(format!("--via {:?} must be http://IP:PORT", args.via)),
    };
    let mut variations = Vec::new();
    for v in &args.variation {
        match engine::parse_variation(v) {
            Ok(h) => variations.push(h),
            Err(e) => return fail(e.to_string()),
        }
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    let urls = match engine::collect_urls(&args.sitemap, &Limits::default(), timeout).await {
        Ok(u) => u,
        Err(e) => return fail(e.to_string()),
    };
    let opts = Options {
        via,
        host: args.host,
        rate: args.rate,
        concurrency: args.concurrency,
        variations,
        timeout,
        slow_ttfb: Duration::from_millis(args.slow_ttfb_ms),
    };
    let tty = std::io::stderr().is_terminal();
    let progress = move |done: usize, total: usize| {
        if tty && total > 0 {
            let width = 40;
            let filled = done * width / total;
            eprint!(
                "\r[{}{}] {done}/{total}",
                "=".repeat(filled),
                " ".repeat(width - filled)
            );
        }
    };
    let s = engine::warm(&urls, &opts, &progress).await;
    if tty {
        eprintln!();
    }
    daemon::say!(
        "urls {} fetched {} hits {} misses {} other {} errors {} p50 {:.1} ms p95 {:.1} ms elapsed {:.1} s origin load {:.1} req/s",
        s.urls,
        s.fetched,
        s.hits,
        s.misses,
        s.other,
        s.errors,
        s.percentile_ms(50.0),
        s.percentile_ms(95.0),
        s.elapsed.as_secs_f64(),
        s.origin_rps()
    );
    if s.throttled > 0 {
        daemon::say!("origin answered 5xx/429 {} times: slowed down", s.throttled);
    }
    for e in &s.first_errors {
        daemon::say!("error: {e}");
    }
    if s.fetched == 0 && s.errors > 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
