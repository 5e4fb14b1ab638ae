//! The fan-out window: how long a session's purge sender waits after a send before the
//! next one, so that a purge storm costs the coordinator what it can afford.
//!
//! A send costs about the same with one entry or two thousand (HTTP/2 framing, task
//! wake-ups, a socket write, and the ack that comes back), so what the fan-out costs is
//! sessions × sends per session. In normal traffic (Magento saving products, up to
//! [`STORM_PURGES_PER_S`]) each purge goes out within [`FANOUT_WINDOW_MIN`], so a lone
//! purge reaches every edge at once. In a storm, the window grows with the number of
//! live senders so that the fleet's sends stay under [`STORM_SENDS_PER_S`]: 1 ms
//! ([`FANOUT_STORM_MIN`]) up to 5 sessions, 10 ms at 50, 20 ms at 100, 100 ms at 500,
//! 200 ms ([`FANOUT_WINDOW_MAX`]) from 1,000. A small fleet is sent about every commit and
//! its agents coalesce (their `purge_window_ms`, 20 ms); a large one is coalesced here.
//! (fleet-bench at 1,000 sessions: 5,000 sends/s accepted about 20% more purges in a
//! storm than 10,000/s, medians of 4-5 runs, and 2,500/s no more.) Each edge then
//! gets fewer, bigger batches (its agent bans them as one anyway), and the purge
//! listener keeps the CPU it needs to answer Magento.
//!
//! In a storm the senders also keep one clock ([`Pacer::tick`]): each sends once per
//! tick, up to the log's head as the tick's first sender saw it ([`Pacer::head_at`]).
//! A fleet in sync then asks the log for the same range and shares one encoded batch,
//! where unaligned windows would have each session encode slightly different ones.
//!
//! The purge rate is the log head's advance over the last [`RATE_SAMPLE`], so a storm
//! on another coordinator of a cluster (entries followed from etcd) counts too.

use daemon::sync::Recover;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::time::Instant as TokioInstant;

use crate::metrics::{collector, gauge_value, Registry};

/// Least time between two batches to one session outside a storm.
pub const FANOUT_WINDOW_MIN: Duration = Duration::from_millis(10);
/// Least time between two batches to one session in a storm: a small fleet can afford a
/// batch per commit, and its agents' own purge window does the coalescing.
pub const FANOUT_STORM_MIN: Duration = Duration::from_millis(1);
/// Most time between two batches to one session, however many sessions.
pub const FANOUT_WINDOW_MAX: Duration = Duration::from_millis(200);
/// Above this many purges per second the log is in a storm.
pub const STORM_PURGES_PER_S: f64 = 200.0;
/// Batches per second all sessions together send during a storm, as long as the window
/// is between its bounds.
pub const STORM_SENDS_PER_S: u64 = 5_000;
/// The span over which the purge rate is measured.
pub const RATE_SAMPLE: Duration = Duration::from_millis(250);

/// The fan-out window for `sessions` live senders, in a storm or not.
pub fn fanout_window(sessions: usize, storm: bool) -> Duration {
    if !storm {
        return FANOUT_WINDOW_MIN;
    }
    let micros = (sessions as u64).saturating_mul(1_000_000) / STORM_SENDS_PER_S;
    Duration::from_micros(micros).clamp(FANOUT_STORM_MIN, FANOUT_WINDOW_MAX)
}

/// Shared by every session's sender: counts the live ones, tracks the purge rate, and
/// keeps the fleet's clock for storms.
#[derive(Debug)]
pub struct Pacer {
    senders: AtomicUsize,
    storm: AtomicBool,
    rate: Mutex<RateMeter>,
    /// Where the ticks are counted from.
    epoch: TokioInstant,
    /// The latest tick a sender sent at, and the log's head as the first one saw it.
    tick: Mutex<Option<(TokioInstant, u64)>>,
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer {
            senders: AtomicUsize::new(0),
            storm: AtomicBool::new(false),
            rate: Mutex::new(RateMeter::default()),
            epoch: TokioInstant::now(),
            tick: Mutex::new(None),
        }
    }
}

impl Pacer {
    /// The start of the tick of length `window` that `now` falls in. In a storm every
    /// sender sends on these ticks, one batch per tick, up to [`Self::head_at`] that
    /// tick: senders at one cursor then ask for the same entries and share one encoded
    /// batch (`super::batches`) instead of a thousand slightly different ones.
    pub fn tick(&self, window: Duration, now: TokioInstant) -> TokioInstant {
        let since = now.saturating_duration_since(self.epoch).as_nanos();
        let w = window.as_nanos().max(1);
        let start = u64::try_from(since / w * w).unwrap_or(u64::MAX);
        self.epoch + Duration::from_nanos(start)
    }

    /// The log's head for the senders of the tick starting at `tick`: `head` as the
    /// first of them saw it (a sender at an older tick than the latest gets `head`).
    pub fn head_at(&self, tick: TokioInstant, head: u64) -> u64 {
        let mut latest = self.tick.locked();
        match *latest {
            Some((t, h)) if t == tick => h.min(head),
            Some((t, _)) if t > tick => head,
            _ => {
                *latest = Some((tick, head));
                head
            }
        }
    }

    /// The window a sender waits after a send, with the log's head now at `head`.
    pub fn window(&self, head: u64) -> Duration {
        // Whoever holds the meter updates it; the others read the last verdict.
        if let Ok(mut meter) = self.rate.try_lock() {
            if let Some(per_s) = meter.sample(Instant::now(), head) {
                self.storm
                    .store(per_s > STORM_PURGES_PER_S, Ordering::Relaxed);
            }
        }
        fanout_window(
            self.senders.load(Ordering::Relaxed),
            self.storm.load(Ordering::Relaxed),
        )
    }

    /// The window now, without taking a sample (for metrics).
    pub fn current(&self) -> Duration {
        fanout_window(
            self.senders.load(Ordering::Relaxed),
            self.storm.load(Ordering::Relaxed),
        )
    }

    /// Whether the log was in a storm at the last sample.
    pub fn storm(&self) -> bool {
        self.storm.load(Ordering::Relaxed)
    }

    /// Registers the window and storm gauges.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(collector(self.clone(), |pacer, e| {
            gauge_value(
                e,
                "coordinator_fanout_window_seconds",
                "Least time between two purge batches to one edge now (grows with the fleet during a storm).",
                pacer.current().as_secs_f64(),
            )?;
            gauge_value(
                e,
                "coordinator_purge_storm",
                "1 while purges arrive faster than the storm threshold (200/s), else 0.",
                i64::from(pacer.storm()),
            )
        }));
    }

    /// Counts one sender until the returned slot is dropped.
    pub fn join(self: &Arc<Self>) -> PacerSlot {
        self.senders.fetch_add(1, Ordering::Relaxed);
        PacerSlot(self.clone())
    }
}

/// One live sender, counted by its [`Pacer`] while it lives.
#[derive(Debug)]
pub struct PacerSlot(Arc<Pacer>);

impl Drop for PacerSlot {
    fn drop(&mut self) {
        self.0.senders.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The log head's advance per second, sampled every [`RATE_SAMPLE`].
#[derive(Debug, Default)]
struct RateMeter {
    /// The head and when it was seen, at the start of the current sample.
    since: Option<(Instant, u64)>,
}

impl RateMeter {
    /// Purges per second over the sample that `now` completes, if it completes one.
    fn sample(&mut self, now: Instant, head: u64) -> Option<f64> {
        let Some((at, from)) = self.since else {
            self.since = Some((now, head));
            return None;
        };
        let span = now.saturating_duration_since(at);
        if span < RATE_SAMPLE {
            return None;
        }
        self.since = Some((now, head));
        Some(head.saturating_sub(from) as f64 / span.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_a_storm_the_window_is_the_least_whatever_the_fleet() {
        for n in [0, 100, 1_000, 100_000] {
            assert_eq!(fanout_window(n, false), FANOUT_WINDOW_MIN);
        }
    }

    #[test]
    fn in_a_storm_the_window_grows_with_the_fleet_within_its_bounds() {
        assert_eq!(fanout_window(0, true), FANOUT_STORM_MIN);
        assert_eq!(fanout_window(3, true), FANOUT_STORM_MIN);
        assert_eq!(fanout_window(50, true), Duration::from_millis(10));
        assert_eq!(fanout_window(100, true), Duration::from_millis(20));
        assert_eq!(fanout_window(500, true), Duration::from_millis(100));
        assert_eq!(fanout_window(1_000, true), FANOUT_WINDOW_MAX);
        assert_eq!(fanout_window(100_000, true), FANOUT_WINDOW_MAX);
    }

    #[test]
    fn the_meter_measures_the_heads_advance_per_sample() {
        let t0 = Instant::now();
        let mut m = RateMeter::default();
        // The first look only sets the baseline: a log a million entries long is no storm.
        assert_eq!(m.sample(t0, 1_000_000), None);
        assert_eq!(m.sample(t0 + RATE_SAMPLE / 2, 1_000_500), None);
        let per_s = m.sample(t0 + RATE_SAMPLE, 1_000_500).expect("a sample");
        assert!((per_s - 2_000.0).abs() < 1.0, "{per_s}");
        // A quiet sample after it.
        let per_s = m.sample(t0 + RATE_SAMPLE * 2, 1_000_510).expect("a sample");
        assert!((per_s - 40.0).abs() < 1.0, "{per_s}");
    }

    #[test]
    fn a_storm_seen_by_a_sender_widens_every_senders_window() {
        let pacer = Arc::new(Pacer::default());
        let _slots: Vec<_> = (0..250).map(|_| pacer.join()).collect();
        assert_eq!(pacer.window(1_000), FANOUT_WINDOW_MIN);
        std::thread::sleep(RATE_SAMPLE);
        // 99,000 purges in a little over 250 ms (a storm even if the sleep overran 100×).
        assert_eq!(pacer.window(100_000), Duration::from_millis(50));
        assert!(pacer.storm());
        assert_eq!(pacer.current(), Duration::from_millis(50));
        std::thread::sleep(RATE_SAMPLE);
        assert_eq!(
            pacer.window(100_001),
            FANOUT_WINDOW_MIN,
            "the storm is over"
        );
    }

    #[test]
    fn senders_of_one_tick_share_its_head() {
        let pacer = Pacer::default();
        let w = Duration::from_millis(200);
        let now = TokioInstant::now();
        let t = pacer.tick(w, now);
        assert!(t <= now && now < t + w);
        assert_eq!(pacer.tick(w, t + w / 2), t, "the same tick");
        assert_eq!(pacer.tick(w, t + w), t + w, "the next one");
        assert_eq!(pacer.head_at(t, 100), 100, "the first sender sets it");
        assert_eq!(
            pacer.head_at(t, 180),
            100,
            "later ones in the tick share it"
        );
        assert_eq!(pacer.head_at(t + w, 250), 250, "the next tick moves on");
        assert_eq!(
            pacer.head_at(t, 260),
            260,
            "a sender late for its tick gets the head"
        );
        assert_eq!(pacer.head_at(t + w, 260), 250);
    }

    #[test]
    fn the_pacer_counts_live_senders_only() {
        let pacer = Arc::new(Pacer::default());
        let slots: Vec<_> = (0..1_000).map(|_| pacer.join()).collect();
        assert_eq!(pacer.window(0), FANOUT_WINDOW_MIN, "no storm yet");
        pacer.storm.store(true, Ordering::Relaxed);
        assert_eq!(pacer.window(0), FANOUT_WINDOW_MAX);
        drop(slots);
        assert_eq!(pacer.window(0), FANOUT_STORM_MIN, "a storm with no senders");
    }
}
