//! The agent's own traffic through its varnish: warm shards, edge probes, the config
//! health check.
//!
//! varnishstat counts every request, and warming a region is thousands of misses: left
//! in, a warm job makes the region's hit ratio read near zero right when its cache is
//! fullest. [`Synthetic`] counts exactly the requests the agent itself sent and varnish's
//! verdict on each. The verdict comes from varnish's log while the log reader
//! ([`crate::top`]) runs (each own request's line, told apart by [`crate::mark`], says
//! `hit` or `miss` whatever the VCL); without a log reader (varnishncsa cannot be
//! started), from the response's cache-debug header (`HIT`, `MISS`, or neither for a pass:
//! only the project's VCL and some of Magento's set it). The counters travel cumulative
//! with every `VarnishStats`; the coordinator subtracts them where it has no shoppers'
//! counts from the log, and shows the agent's own traffic as its own series.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// The log reader runs: verdicts come from the log.
    logged: AtomicBool,
}

/// Cumulative counters since the agent started; clone to share.
#[derive(Debug, Clone, Default)]
pub struct Synthetic(Arc<Counters>);

impl Synthetic {
    pub fn new() -> Self {
        Self::default()
    }

    fn verdict(&self, hits: u64, misses: u64) {
        self.0.hits.fetch_add(hits, Ordering::Relaxed);
        self.0.misses.fetch_add(misses, Ordering::Relaxed);
    }

    /// One request the agent sent through varnish, with the response's cache verdict
    /// (`HIT...`, `MISS...`, anything else: neither), used while no log reader runs.
    pub fn record(&self, cache: &str) {
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        if !self.logged() {
            let hit = cache.starts_with("HIT");
            let miss = cache.starts_with("MISS");
            self.verdict(u64::from(hit), u64::from(miss));
        }
    }

    /// A batch of requests (a warm shard) with its verdict counts from the responses.
    pub fn add(&self, requests: u64, hits: u64, misses: u64) {
        self.0.requests.fetch_add(requests, Ordering::Relaxed);
        if !self.logged() {
            self.verdict(hits, misses);
        }
    }

    /// A request that got no answer from varnish (it may still have counted it).
    pub fn record_failed(&self) {
        self.0.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the log reader runs (varnishncsa started): verdicts, and the shoppers'
    /// figures, come from the log while it does.
    pub fn set_logged(&self, logged: bool) {
        self.0.logged.store(logged, Ordering::Relaxed);
    }

    /// Whether verdicts (and shoppers' figures) come from varnish's log.
    pub fn logged(&self) -> bool {
        self.0.logged.load(Ordering::Relaxed)
    }

    /// One of the agent's own requests in varnish's log, with its handling (`hit`,
    /// `miss`, `pass`, `synth`, `pipe`).
    pub fn record_logged(&self, handling: &str) {
        self.verdict(u64::from(handling == "hit"), u64::from(handling == "miss"));
    }

    /// (requests, hits, misses).
    pub fn read(&self) -> (u64, u64, u64) {
        (
            self.0.requests.load(Ordering::Relaxed),
            self.0.hits.load(Ordering::Relaxed),
            self.0.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_verdict() {
        let s = Synthetic::new();
        let shared = s.clone();
        for c in ["HIT", "MISS", "MISS", "UNCACHEABLE", ""] {
            shared.record(c);
        }
        s.record_failed();
        assert_eq!(s.read(), (6, 1, 2));
        s.add(10, 4, 5);
        assert_eq!(s.read(), (16, 5, 7));
    }

    #[test]
    fn while_the_log_is_read_verdicts_come_from_it_only() {
        let s = Synthetic::new();
        s.record("HIT");
        assert!(!s.logged());
        s.set_logged(true);
        // The response header no longer counts (its log line does): no double count.
        s.record("HIT");
        s.add(3, 3, 0);
        assert_eq!(s.read(), (5, 1, 0));
        for h in ["hit", "hit", "miss", "pass", "synth", "pipe"] {
            s.record_logged(h);
        }
        assert_eq!(s.read(), (5, 3, 1));
        s.set_logged(false);
        s.record("MISS");
        assert_eq!(s.read(), (6, 3, 2));
    }
}
