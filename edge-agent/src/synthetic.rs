//! The agent's own traffic through its varnish: warm shards and edge probes.
//!
//! varnishstat counts every request, and warming a region is thousands of misses: left
//! in, a warm job makes the region's hit ratio read near zero right when its cache is
//! fullest. [`Synthetic`] counts exactly the requests the agent itself sent and what
//! varnish said of each (the cache-debug header: `HIT`, `MISS`, or neither for a pass);
//! the counters travel cumulative with every `VarnishStats`, and the coordinator
//! subtracts them, so a region's hit ratio is its shoppers' and warm traffic is its own
//! series.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Cumulative counters since the agent started; clone to share.
#[derive(Debug, Clone, Default)]
pub struct Synthetic(Arc<[AtomicU64; 3]>);

impl Synthetic {
    pub fn new() -> Self {
        Self::default()
    }

    /// One request the agent sent through varnish, with varnish's cache verdict
    /// (`HIT...`, `MISS...`, anything else: neither).
    pub fn record(&self, cache: &str) {
        self.0[0].fetch_add(1, Ordering::Relaxed);
        if cache.starts_with("HIT") {
            self.0[1].fetch_add(1, Ordering::Relaxed);
        } else if cache.starts_with("MISS") {
            self.0[2].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A batch of requests (a warm shard) with its verdict counts.
    pub fn add(&self, requests: u64, hits: u64, misses: u64) {
        self.0[0].fetch_add(requests, Ordering::Relaxed);
        self.0[1].fetch_add(hits, Ordering::Relaxed);
        self.0[2].fetch_add(misses, Ordering::Relaxed);
    }

    /// A request that got no answer from varnish (it may still have counted it).
    pub fn record_failed(&self) {
        self.0[0].fetch_add(1, Ordering::Relaxed);
    }

    /// (requests, hits, misses).
    pub fn read(&self) -> (u64, u64, u64) {
        (
            self.0[0].load(Ordering::Relaxed),
            self.0[1].load(Ordering::Relaxed),
            self.0[2].load(Ordering::Relaxed),
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
}
