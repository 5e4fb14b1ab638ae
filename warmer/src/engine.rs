//! The standalone warming pass: read the sitemaps, then fetch every URL (in every
//! variation) through one varnish at a bounded rate and concurrency, and summarise what
//! the cache said (hits, misses) and what the origin paid (misses per second).
//!
//! [`fetch_all`] is the part the edge agents share: it fetches a list of (URL, variation)
//! items paced by a [`Throttle`] (bursts never exceed the rate however fast varnish
//! answers, and 5xx or slow misses slow it down) with a semaphore for concurrency, and
//! tallies what came back, including each page's `X-Magento-Tags` when the VCL shows
//! them to the warmer.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon::sync::Recover;
use tokio::sync::Semaphore;

use crate::error::WarmError;
use crate::fetch::{self, FetchError, TlsRoots};
use crate::pace::{Aimd, Throttle};
use crate::sign;
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
    /// Header sets; every URL is fetched plain and once more per variation.
    pub variations: Vec<Vec<(String, String)>>,
    pub timeout: Duration,
    /// A miss slower than this to its first byte makes the pass slow down.
    pub slow_ttfb: Duration,
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
    /// Failed fetches (no answer, 5xx, 429).
    pub errors: usize,
    /// 5xx and 429 answers among the errors.
    pub throttled: usize,
    /// Time to first byte summed over the misses (what the origin took).
    pub miss_ttfb: Duration,
    pub total_ms: Vec<f64>,
    pub elapsed: Duration,
    pub first_errors: Vec<String>,
    /// `X-Magento-Tags` of each fetched URL, when asked for.
    pub tags: Vec<(String, Vec<String>)>,
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

/// Drops repeated URLs, keeping the first; remembers 8-byte hashes rather than copies, so a
/// million-URL list costs 8 MB to de-duplicate, not a second copy of every URL.
pub fn dedup<T>(items: &mut Vec<T>, url: impl Fn(&T) -> &str) {
    use std::hash::{BuildHasher, RandomState};
    let state = RandomState::new();
    let mut seen = HashSet::with_capacity(items.len());
    items.retain(|i| seen.insert(state.hash_one(url(i))));
}

/// Every (URL, headers) fetch of a pass: each URL plain (what a first-time visitor
/// sends), then once per variation.
pub fn items(
    urls: &[String],
    variations: &[Vec<(String, String)>],
) -> Vec<(String, Vec<(String, String)>)> {
    let sets: Vec<&[(String, String)]> = std::iter::once(&[][..])
        .chain(
            variations
                .iter()
                .filter(|v| !v.is_empty())
                .map(Vec::as_slice),
        )
        .collect();
    urls.iter()
        .flat_map(|u| sets.iter().map(move |v| (u.clone(), v.to_vec())))
        .collect()
}

/// The `'Name: value;;Name: value'` form [`parse_variation`] reads.
pub fn format_variation(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}"))
        .collect::<Vec<_>>()
        .join(";;")
}

/// Parses `Name: value` into a header pair.
pub fn parse_variation(spec: &str) -> Result<Vec<(String, String)>, WarmError> {
    spec.split(";;")
        .map(|h| {
            let (n, v) = h.split_once(':').ok_or_else(|| {
                WarmError::Variation(format!("variation {h:?} must look like 'Header: value'"))
            })?;
            let n = n.trim();
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(WarmError::Variation(format!("bad header name {n:?}")));
            }
            Ok((n.to_owned(), v.trim().to_owned()))
        })
        .collect()
}

/// Every page URL reachable from `source` (an `http://` or `https://` sitemap URL, or a
/// local file), following one level of sitemap index, de-duplicated, highest priority
/// first. https servers are verified against the system's trust store.
pub async fn collect_urls(
    source: &str,
    limits: &Limits,
    timeout: Duration,
) -> Result<Vec<String>, WarmError> {
    collect_urls_trusting(source, limits, timeout, &TlsRoots::system()).await
}

/// [`collect_urls`] with https servers verified against `roots`.
pub async fn collect_urls_trusting(
    source: &str,
    limits: &Limits,
    timeout: Duration,
    roots: &TlsRoots,
) -> Result<Vec<String>, WarmError> {
    let first = load(source, limits, timeout, roots).await?;
    let mut pages = Vec::new();
    match first {
        Sitemap::Pages(p) => pages.extend(p),
        Sitemap::Index(children) => {
            if children.len() > MAX_CHILD_SITEMAPS {
                return Err(WarmError::TooManySitemaps(MAX_CHILD_SITEMAPS));
            }
            for child in children {
                match load(&child, limits, timeout, roots).await? {
                    Sitemap::Pages(p) => {
                        pages.extend(p);
                        if pages.len() > limits.max_total_urls {
                            return Err(WarmError::TooManyUrls(limits.max_total_urls));
                        }
                    }
                    Sitemap::Index(_) => return Err(WarmError::NestedIndex(child)),
                }
            }
        }
    }
    dedup(&mut pages, |p| &p.loc);
    pages.sort_by(|a, b| {
        b.priority
            .unwrap_or(0.5)
            .total_cmp(&a.priority.unwrap_or(0.5))
    });
    Ok(pages.into_iter().map(|p| p.loc).collect())
}

async fn load(
    source: &str,
    limits: &Limits,
    timeout: Duration,
    roots: &TlsRoots,
) -> Result<Sitemap, WarmError> {
    let url = || source.to_owned();
    let bytes = if source.starts_with("http://") || source.starts_with("https://") {
        let got = fetch::get_url(source, timeout, roots)
            .await
            .map_err(|error| WarmError::Fetch { url: url(), error })?;
        if got.status != 200 {
            return Err(WarmError::Status {
                url: url(),
                status: got.status,
            });
        }
        if got.body.len() >= fetch::MAX_BODY {
            return Err(WarmError::TooLarge {
                url: url(),
                limit: fetch::MAX_BODY,
            });
        }
        got.body
    } else {
        std::fs::read(source).map_err(|error| WarmError::Read { path: url(), error })?
    };
    sitemap::parse(&bytes, limits).map_err(|error| WarmError::Sitemap { url: url(), error })
}

/// How each fetch of a pass is made.
#[derive(Debug, Clone)]
pub struct FetchSpec {
    pub via: SocketAddr,
    /// Host header; default: each URL's own host.
    pub host: Option<String>,
    pub timeout: Duration,
    /// The warm secret: each request is signed with it ([`sign`], `X-Warm-Sig`; the secret
    /// itself is never sent), and the project's VCL then shows `X-Magento-Tags` and honours
    /// `refresh`.
    pub token: Option<String>,
    /// Ask for a forced miss (`X-Warm-Refresh: 1`): refresh a cached page in place.
    pub refresh: bool,
    /// Refresh only a stale copy (`X-Warm-Refresh: stale`); a copy still stale after it
    /// (`X-Cache-Stale`: the backend did not answer) counts as an error.
    pub only_stale: bool,
    /// Keep each URL's `X-Magento-Tags`.
    pub want_tags: bool,
}

/// Most tags kept per URL, and longest tag.
const MAX_TAGS: usize = 512;
const MAX_TAG_BYTES: usize = 200;

/// Fetches every (URL, variation headers) item through `spec.via`, pacing starts with
/// `throttle` (which each outcome feeds) and at most `slots` at once;
/// `progress(done, total)` is called as fetches end.
pub async fn fetch_all(
    items: Vec<(String, Vec<(String, String)>)>,
    spec: Arc<FetchSpec>,
    throttle: Arc<Throttle>,
    slots: Arc<Semaphore>,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Summary {
    let total = items.len();
    let start = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let summary = Arc::new(Mutex::new(Summary::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for (url, variation) in items {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        throttle.wait().await;
        // Browsers send Accept-Encoding; varnish stores the gzip variant shoppers get.
        let mut headers = vec![("Accept-Encoding".to_owned(), "gzip".to_owned())];
        headers.extend(variation);
        if let Some(t) = &spec.token {
            let target = fetch::path_of(&url);
            headers.push((sign::HEADER.to_owned(), sign::signature_now(t, target)));
            if spec.refresh {
                headers.push(("X-Warm-Refresh".to_owned(), "1".to_owned()));
            } else if spec.only_stale {
                headers.push(("X-Warm-Refresh".to_owned(), "stale".to_owned()));
            }
        }
        let host = spec
            .host
            .clone()
            .unwrap_or_else(|| url.split('/').nth(2).unwrap_or("localhost").to_owned());
        let (spec, throttle) = (spec.clone(), throttle.clone());
        let (summary, finished) = (summary.clone(), done.clone());
        tasks.spawn(async move {
            let result = fetch::get(
                spec.via,
                fetch::path_of(&url),
                &host,
                &headers,
                spec.timeout,
            )
            .await;
            drop(permit);
            let status = result.as_ref().ok().map(|f| f.status);
            let miss_ttfb = result
                .as_ref()
                .ok()
                .filter(|f| f.cache.to_ascii_uppercase().starts_with("MISS"))
                .map(|f| f.ttfb);
            throttle.observe(status, miss_ttfb);
            summary.locked().record(&url, &result, &spec);
            finished.fetch_add(1, Ordering::Relaxed);
        });
        progress(done.load(Ordering::Relaxed), total);
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {
        progress(done.load(Ordering::Relaxed), total);
    }
    let mut s = summary.locked().clone();
    s.elapsed = start.elapsed();
    s
}

impl Summary {
    /// Counts one fetch's outcome.
    fn record(&mut self, url: &str, result: &Result<fetch::Fetched, FetchError>, spec: &FetchSpec) {
        let error = match result {
            Ok(f) if spec.only_stale && f.header("X-Cache-Stale") == Some("1") => {
                // The origin failed it: it counts as an origin in trouble.
                self.throttled += 1;
                format!("{url}: still stale (the backend did not answer the refresh)")
            }
            Ok(f) if f.status < 500 && f.status != 429 => {
                self.fetched += 1;
                self.total_ms.push(f.total.as_secs_f64() * 1000.0);
                match f.cache.to_ascii_uppercase().as_str() {
                    c if c.starts_with("HIT") => self.hits += 1,
                    c if c.starts_with("MISS") => {
                        self.misses += 1;
                        self.miss_ttfb += f.ttfb;
                    }
                    _ => self.other += 1,
                }
                if spec.want_tags {
                    if let Some(tags) = f.header("X-Magento-Tags") {
                        let tags: Vec<String> = tags
                            .split(',')
                            .map(str::trim)
                            .filter(|t| !t.is_empty() && t.len() <= MAX_TAG_BYTES)
                            .take(MAX_TAGS)
                            .map(str::to_owned)
                            .collect();
                        self.tags.push((url.to_owned(), tags));
                    }
                }
                return;
            }
            Ok(f) => {
                self.throttled += 1;
                format!("{url}: HTTP {}", f.status)
            }
            Err(e) => format!("{url}: {e}"),
        };
        self.errors += 1;
        if self.first_errors.len() < 5 {
            self.first_errors.push(error);
        }
    }
}

/// Fetches every URL in every variation through `opts.via` at `opts.rate` (slowing down
/// when the origin suffers); `progress(done, total)` is called as fetches end.
pub async fn warm(
    urls: &[String],
    opts: &Options,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Summary {
    let items = items(urls, &opts.variations);
    let spec = Arc::new(FetchSpec {
        via: opts.via,
        host: opts.host.clone(),
        timeout: opts.timeout,
        token: None,
        refresh: false,
        only_stale: false,
        want_tags: false,
    });
    let throttle = Arc::new(Throttle::new(Aimd::new(opts.rate, opts.slow_ttfb)));
    let slots = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut s = fetch_all(items, spec, throttle, slots, progress).await;
    s.urls = urls.len();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keeps_the_first_of_each() {
        let mut v = vec!["a", "b", "a", "c", "b"];
        dedup(&mut v, |s| s);
        assert_eq!(v, vec!["a", "b", "c"]);
    }

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
        let two = parse_variation("Cookie: a=1;;X-Device: mobile").unwrap();
        assert_eq!(parse_variation(&format_variation(&two)).unwrap(), two);
        assert!(parse_variation("Bad Name: x").is_err());
    }
}
