//! The standalone warming pass: read the sitemaps, then fetch every URL (in every
//! variation) through one varnish at a bounded rate and concurrency, and summarise what
//! the cache said (hits, misses) and what the origin paid (misses per second).
//!
//! The rate is a fixed schedule (request `n` starts no earlier than `n / rate` seconds
//! after the start), so bursts never exceed it however fast varnish answers; the
//! concurrency is a semaphore.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fetch;
use crate::sitemap::{self, Limits, Sitemap};

/// Most sitemaps followed from one index.
const MAX_CHILD_SITEMAPS: usize = 1000;

/// How to warm.
#[derive(Debug, Clone)]
pub struct Options {
    /// The varnish to fetch through.
    pub via: SocketAddr,
    /// Host header; default: each URL's own host.
    pub host: Option<String>,
    /// Requests per second (all variations together).
    pub rate: f64,
    pub concurrency: usize,
    /// Header sets; every URL is fetched once per variation (none: once, plain).
    pub variations: Vec<Vec<(String, String)>>,
    pub timeout: Duration,
}

/// What a pass did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub urls: usize,
    pub fetched: usize,
    pub hits: usize,
    pub misses: usize,
    /// Answers without a HIT/MISS verdict (pass, synth, no debug header).
    pub other: usize,
    pub errors: usize,
    pub total_ms: Vec<f64>,
    pub elapsed: Duration,
    pub first_errors: Vec<String>,
}

impl Summary {
    /// Requests that reached the origin per second (the misses).
    pub fn origin_rps(&self) -> f64 {
        self.misses as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile_ms(&self, p: f64) -> f64 {
        let mut v = self.total_ms.clone();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
    }
}

/// Parses `Name: value` into a header pair.
pub fn parse_variation(spec: &str) -> Result<Vec<(String, String)>, String> {
    spec.split(";;")
        .map(|h| {
            let (n, v) = h
                .split_once(':')
                .ok_or_else(|| format!("variation {h:?} must look like 'Header: value'"))?;
            let n = n.trim();
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(format!("bad header name {n:?}"));
            }
            Ok((n.to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// Every page URL reachable from `source` (an `http://` sitemap URL or a local file),
/// following one level of sitemap index, de-duplicated, highest priority first.
pub async fn collect_urls(
    source: &str,
    limits: &Limits,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let first = load(source, limits, timeout).await?;
    let mut pages = Vec::new();
    match first {
        Sitemap::Pages(p) => pages.extend(p),
        Sitemap::Index(children) => {
            if children.len() > MAX_CHILD_SITEMAPS {
                return Err(format!(
                    "sitemap index lists more than {MAX_CHILD_SITEMAPS} sitemaps"
                ));
            }
            for child in children {
                match load(&child, limits, timeout).await? {
                    Sitemap::Pages(p) => pages.extend(p),
                    Sitemap::Index(_) => {
                        return Err(format!("{child}: nested sitemap indexes are not followed"))
                    }
                }
            }
        }
    }
    let mut seen = HashSet::new();
    pages.retain(|p| seen.insert(p.loc.clone()));
    pages.sort_by(|a, b| {
        b.priority
            .unwrap_or(0.5)
            .total_cmp(&a.priority.unwrap_or(0.5))
    });
    Ok(pages.into_iter().map(|p| p.loc).collect())
}

async fn load(source: &str, limits: &Limits, timeout: Duration) -> Result<Sitemap, String> {
    let bytes = if source.starts_with("http://") {
        let (host, addr, path) = fetch::split_url(source).await?;
        let got = fetch::get(addr, &path, &host, &[], timeout)
            .await
            .map_err(|e| format!("{source}: {e}"))?;
        if got.status != 200 {
            return Err(format!("{source}: HTTP {}", got.status));
        }
        if got.body.len() >= fetch::MAX_BODY {
            return Err(format!("{source}: larger than {} bytes", fetch::MAX_BODY));
        }
        got.body
    } else if source.starts_with("https://") {
        return Err(format!("{source}: https sitemaps are not fetched directly; give its http:// URL or a local file"));
    } else {
        std::fs::read(source).map_err(|e| format!("{source}: {e}"))?
    };
    sitemap::parse(&bytes, limits).map_err(|e| format!("{source}: {e}"))
}

/// Fetches every URL in every variation through `opts.via`; `progress(done, total)` is
/// called after each request.
pub async fn warm(
    urls: &[String],
    opts: &Options,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Summary {
    let variations: Vec<Vec<(String, String)>> = if opts.variations.is_empty() {
        vec![Vec::new()]
    } else {
        opts.variations.clone()
    };
    let jobs: Vec<(String, usize)> = urls
        .iter()
        .flat_map(|u| (0..variations.len()).map(move |v| (u.clone(), v)))
        .collect();
    let total = jobs.len();
    let start = Instant::now();
    let next_slot = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let summary = Arc::new(Mutex::new(Summary {
        urls: urls.len(),
        ..Summary::default()
    }));
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.concurrency.max(1)));
    let interval = Duration::from_secs_f64(1.0 / opts.rate.max(0.001));
    let mut tasks = tokio::task::JoinSet::new();
    for (url, v) in jobs {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let slot = next_slot.fetch_add(1, Ordering::Relaxed);
        let due = start + interval.mul_f64(slot as f64);
        // Browsers send Accept-Encoding; varnish stores the gzip variant shoppers get.
        let mut headers = vec![("Accept-Encoding".to_owned(), "gzip".to_owned())];
        headers.extend(variations[v].iter().cloned());
        let host = opts
            .host
            .clone()
            .unwrap_or_else(|| url.split('/').nth(2).unwrap_or("localhost").to_owned());
        let (via, timeout) = (opts.via, opts.timeout);
        let (summary, finished) = (summary.clone(), done.clone());
        tasks.spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            let result = fetch::get(via, fetch::path_of(&url), &host, &headers, timeout).await;
            drop(permit);
            let mut s = summary.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(f) if f.status < 500 => {
                    s.fetched += 1;
                    s.total_ms.push(f.total.as_secs_f64() * 1000.0);
                    match f.cache.to_ascii_uppercase().as_str() {
                        c if c.starts_with("HIT") => s.hits += 1,
                        c if c.starts_with("MISS") => s.misses += 1,
                        _ => s.other += 1,
                    }
                }
                Ok(f) => {
                    s.errors += 1;
                    if s.first_errors.len() < 5 {
                        s.first_errors.push(format!("{url}: HTTP {}", f.status));
                    }
                }
                Err(e) => {
                    s.errors += 1;
                    if s.first_errors.len() < 5 {
                        s.first_errors.push(format!("{url}: {e}"));
                    }
                }
            }
            drop(s);
            finished.fetch_add(1, Ordering::Relaxed);
        });
        progress(done.load(Ordering::Relaxed), total);
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {
        progress(done.load(Ordering::Relaxed), total);
    }
    let mut s = summary.lock().unwrap_or_else(|p| p.into_inner()).clone();
    s.elapsed = start.elapsed();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variations_parse() {
        assert_eq!(
            parse_variation("Cookie: store=de").unwrap(),
            vec![("Cookie".into(), "store=de".into())]
        );
        assert_eq!(
            parse_variation("Cookie: a=1;;X-Device: mobile")
                .unwrap()
                .len(),
            2
        );
        assert!(parse_variation("nocolon").is_err());
        assert!(parse_variation("Bad Name: x").is_err());
    }
}
