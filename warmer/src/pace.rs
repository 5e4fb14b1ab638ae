//! How fast to warm: a [`Throttle`] hands out request start times at a rate that an
//! [`Aimd`] controller adjusts from what the origin says.
//!
//! The budget is a ceiling, never a target to make up: slots are spaced `1 / rate` apart
//! from the later of "now" and the previous slot, so a stall is not followed by a burst.
//! The controller is additive-increase / multiplicative-decrease, as TCP does it:
//!
//! * *overload* (a 5xx or 429, or a miss whose time to first byte passed
//!   [`Aimd::slow_ttfb`]) halves the rate, at most once per [`CUT_COOLDOWN`] so one slow
//!   burst is one cut;
//! * otherwise the rate grows back by [`GROWTH_PER_S`] of the ceiling per second: from
//!   half to full in ten seconds, slow enough that an origin that just recovered is not
//!   knocked over again.
//!
//! The coordinator runs one [`Aimd`] per job over every edge's reports (the global
//! budget) and hands each edge its share as the ceiling of the edge's own [`Throttle`],
//! whose local controller reacts within one request, without waiting for the round trip.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use daemon::sync::Recover;

/// Shortest time between two multiplicative cuts.
pub const CUT_COOLDOWN: Duration = Duration::from_secs(1);
/// Fraction of the ceiling regained per second without overload.
pub const GROWTH_PER_S: f64 = 0.05;
/// Lowest rate as a fraction of the ceiling (never stop entirely: a job must end).
const FLOOR: f64 = 0.05;

/// The additive-increase / multiplicative-decrease rate controller.
#[derive(Debug, Clone)]
pub struct Aimd {
    ceiling: f64,
    rate: f64,
    /// A miss slower than this to its first byte counts as overload.
    pub slow_ttfb: Duration,
    last_cut: Option<Instant>,
    last_update: Instant,
}

impl Aimd {
    /// Starts at the ceiling.
    pub fn new(ceiling: f64, slow_ttfb: Duration) -> Self {
        Aimd {
            ceiling: ceiling.max(0.001),
            rate: ceiling.max(0.001),
            slow_ttfb,
            last_cut: None,
            last_update: Instant::now(),
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn ceiling(&self) -> f64 {
        self.ceiling
    }

    /// A new ceiling (the budget or this edge's share of it changed); the rate never
    /// exceeds it.
    pub fn set_ceiling(&mut self, ceiling: f64) {
        self.ceiling = ceiling.max(0.001);
        self.rate = self.rate.min(self.ceiling);
    }

    /// Feeds one observation at `now`: `overloaded` from the caller's verdict.
    pub fn observe(&mut self, overloaded: bool, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update);
        self.last_update = now;
        if overloaded {
            let cooled = self
                .last_cut
                .is_none_or(|t| now.saturating_duration_since(t) >= CUT_COOLDOWN);
            if cooled {
                self.rate = (self.rate / 2.0).max(self.ceiling * FLOOR);
                self.last_cut = Some(now);
            }
        } else {
            let grown = self.rate + self.ceiling * GROWTH_PER_S * elapsed.as_secs_f64();
            self.rate = grown.min(self.ceiling);
        }
    }

    /// Whether one fetch's outcome is overload: a 5xx or 429, or a slow miss.
    pub fn is_overload(&self, status: Option<u16>, miss_ttfb: Option<Duration>) -> bool {
        matches!(status, Some(s) if s >= 500 || s == 429)
            || miss_ttfb.is_some_and(|t| t > self.slow_ttfb)
    }
}

/// Start times for requests at the controller's current rate; shared by every task of a
/// pass (and, on an agent, by every shard of a job).
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<(Option<tokio::time::Instant>, Aimd)>,
}

impl Throttle {
    pub fn new(aimd: Aimd) -> Self {
        Throttle {
            state: Mutex::new((None, aimd)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<tokio::time::Instant>, Aimd)> {
        self.state.locked()
    }

    /// Reserves the next slot and sleeps until it (the lock is not held while waiting).
    pub async fn wait(&self) {
        let due = {
            let mut s = self.lock();
            let now = tokio::time::Instant::now();
            let interval = Duration::from_secs_f64(1.0 / s.1.rate());
            let due = match s.0 {
                Some(prev) => (prev + interval).max(now),
                None => now,
            };
            s.0 = Some(due);
            due
        };
        tokio::time::sleep_until(due).await;
    }

    /// Feeds one fetch's outcome to the controller.
    pub fn observe(&self, status: Option<u16>, miss_ttfb: Option<Duration>) {
        let mut s = self.lock();
        let overloaded = s.1.is_overload(status, miss_ttfb);
        s.1.observe(overloaded, tokio::time::Instant::now().into_std());
    }

    pub fn set_ceiling(&self, ceiling: f64) {
        self.lock().1.set_ceiling(ceiling);
    }

    pub fn rate(&self) -> f64 {
        self.lock().1.rate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_on_overload_once_per_cooldown_and_regrows_slowly() {
        let t0 = Instant::now();
        let mut a = Aimd::new(100.0, Duration::from_millis(500));
        a.observe(true, t0);
        assert_eq!(a.rate(), 50.0);
        // A burst of overload within the cooldown is one cut.
        a.observe(true, t0 + Duration::from_millis(300));
        assert_eq!(a.rate(), 50.0);
        a.observe(true, t0 + Duration::from_millis(1300));
        assert_eq!(a.rate(), 25.0);
        // 5 % of the ceiling per second: 2 s without overload adds 10.
        a.observe(false, t0 + Duration::from_millis(3300));
        assert!((a.rate() - 35.0).abs() < 1e-9, "{}", a.rate());
        // Never above the ceiling, never below the floor.
        a.observe(false, t0 + Duration::from_secs(100));
        assert_eq!(a.rate(), 100.0);
        for i in 0..40 {
            a.observe(true, t0 + Duration::from_secs(200 + i * 2));
        }
        assert_eq!(a.rate(), 5.0);
        a.set_ceiling(1.0);
        assert_eq!(a.rate(), 1.0);
    }

    #[test]
    fn overload_verdict() {
        let a = Aimd::new(10.0, Duration::from_millis(500));
        assert!(a.is_overload(Some(503), None));
        assert!(a.is_overload(Some(429), None));
        assert!(!a.is_overload(Some(404), None));
        assert!(a.is_overload(Some(200), Some(Duration::from_millis(800))));
        assert!(!a.is_overload(Some(200), Some(Duration::from_millis(100))));
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_spaces_slots_and_never_bursts_after_a_stall() {
        let t = Throttle::new(Aimd::new(10.0, Duration::from_secs(1)));
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            t.wait().await;
        }
        // Slots at 0, 100, ..., 400 ms.
        assert_eq!(start.elapsed(), Duration::from_millis(400));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after_stall = tokio::time::Instant::now();
        t.wait().await;
        t.wait().await;
        assert_eq!(after_stall.elapsed(), Duration::from_millis(100));
    }
}
