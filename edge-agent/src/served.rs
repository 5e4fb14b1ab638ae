//! What shoppers got: every client request varnish logged (read from varnishncsa by
//! [`crate::top`], the agent's own requests and the project's tools excluded), counted
//! with the time varnish took to serve it, whether it was a 5xx, and whether varnish
//! served it from the cache (`hit`) or fetched it (`miss`): the shoppers' hit ratio,
//! whatever the VCL.
//!
//! [`Served`] keeps cumulative counters since the agent started, like
//! [`crate::synthetic`]: they travel with every `VarnishStats`, and the coordinator turns
//! them into per-minute means, standard deviations, 5xx counts and a histogram.

use daemon::sync::Recover;
use std::sync::{Arc, Mutex};

use proto::SERVED_BUCKETS_S;

/// Cumulative counts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServedCounts {
    pub requests: u64,
    pub time_us: u64,
    pub time_sq_ms: f64,
    pub errors_5xx: u64,
    /// Requests varnish's log says were hits (`vcl_hit`, stale copies too) and misses
    /// (`vcl_miss`); passes, pipes and synthetic answers are neither.
    pub hits: u64,
    pub misses: u64,
    /// Requests served within each bound of [`SERVED_BUCKETS_S`].
    pub buckets: Vec<u64>,
}

/// Shared counters; clone to share.
#[derive(Debug, Clone, Default)]
pub struct Served(Arc<Mutex<ServedCounts>>);

impl Served {
    pub fn new() -> Self {
        Self::default()
    }

    /// One request answered `status` after `micros` (varnishncsa's `%D`), handled as
    /// `handling` (`%{Varnish:handling}x`: `hit`, `miss`, `pass`, `synth`, `pipe`).
    pub fn record(&self, status: u16, micros: u64, handling: &str) {
        let mut c = self.0.locked();
        if c.buckets.len() != SERVED_BUCKETS_S.len() {
            c.buckets = vec![0; SERVED_BUCKETS_S.len()];
        }
        c.requests += 1;
        c.time_us += micros;
        let ms = micros as f64 / 1000.0;
        c.time_sq_ms += ms * ms;
        if (500..600).contains(&status) {
            c.errors_5xx += 1;
        }
        match handling {
            "hit" => c.hits += 1,
            "miss" => c.misses += 1,
            _ => {}
        }
        let secs = micros as f64 / 1e6;
        for (count, bound) in c.buckets.iter_mut().zip(SERVED_BUCKETS_S) {
            if secs <= bound {
                *count += 1;
            }
        }
    }

    pub fn read(&self) -> ServedCounts {
        let mut c = self.0.locked().clone();
        if c.buckets.is_empty() {
            c.buckets = vec![0; SERVED_BUCKETS_S.len()];
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_times_errors_and_buckets() {
        let s = Served::new();
        s.clone().record(200, 400, "hit"); // 0.4 ms: every bucket
        s.record(503, 2_000_000, "miss"); // 2 s: the 2.5 s bucket and above
        s.record(200, 0, "pass");
        let c = s.read();
        assert_eq!((c.requests, c.time_us, c.errors_5xx), (3, 2_000_400, 1));
        assert_eq!((c.hits, c.misses), (1, 1));
        assert!((c.time_sq_ms - (0.16 + 4_000_000.0)).abs() < 1e-6);
        assert_eq!(c.buckets[0], 2);
        assert_eq!(c.buckets[SERVED_BUCKETS_S.len() - 1], 3);
        assert_eq!(c.buckets[8], 2, "1 s bound: all but the slow one");
    }
}
