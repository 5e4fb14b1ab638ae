//! What waiting on a lock without stalling a runtime worker costs: `IoMutex::lock()`
//! (try, spin, yield, then wait in `block_in_place`) against a plain `Mutex::lock()`
//! (what `Recover::locked()` does), side by side in one run, on a two-worker runtime.
//!
//! ```text
//! cargo run --release -p daemon --example lock-bench -- [TASKS] [ROUNDS] [WORDS]
//! ```
//!
//! Each of TASKS tasks takes the lock ROUNDS times, holds it while it updates WORDS
//! words (64, the default: a couple of hundred nanoseconds, like the coordinator's
//! counters and maps; 4096: tens of microseconds, so most waits leave the spin), and
//! yields every 16 rounds. Reported per way: throughput, the latency of one
//! acquire-and-release at p50/p99/p99.9/max, and CPU time per acquire. The two ways
//! alternate three times so a noisy neighbour hits both.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use daemon::sync::IoMutex;

#[derive(Clone, Copy, PartialEq)]
enum Way {
    Plain,
    Io,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Plain => "Mutex::lock",
            Way::Io => "IoMutex::lock",
        }
    }
}

fn cpu_time() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF);
    usage.map_or(Duration::ZERO, |u| {
        let t = |v: nix::sys::time::TimeVal| {
            Duration::from_secs(v.tv_sec().unsigned_abs())
                + Duration::from_micros(v.tv_usec().unsigned_abs())
        };
        t(u.user_time()) + t(u.system_time())
    })
}

/// One run: (acquires per second, sorted latencies, CPU per acquire).
// The baseline is the raw lock clippy.toml bans elsewhere.
#[allow(clippy::disallowed_methods)]
fn run(way: Way, tasks: usize, rounds: usize, words: usize) -> (f64, Vec<Duration>, Duration) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let plain = Arc::new(Mutex::new(vec![0u64; words]));
    let io = Arc::new(IoMutex::new(vec![0u64; words]));
    let cpu0 = cpu_time();
    let start = Instant::now();
    let mut lat: Vec<Duration> = rt.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let (plain, io) = (plain.clone(), io.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(rounds);
                    for r in 0..rounds {
                        let at = Instant::now();
                        {
                            let mut g = match way {
                                Way::Plain => plain.lock().unwrap_or_else(PoisonError::into_inner),
                                Way::Io => io.lock(),
                            };
                            for (i, v) in g.iter_mut().enumerate() {
                                *v = v.wrapping_add((i ^ t ^ r) as u64);
                            }
                        }
                        lat.push(at.elapsed());
                        if r % 16 == 15 {
                            tokio::task::yield_now().await;
                        }
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::with_capacity(tasks * rounds);
        for h in handles {
            all.extend(h.await.expect("task"));
        }
        all
    });
    let wall = start.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    lat.sort();
    let n = lat.len().max(1);
    (n as f64 / wall.as_secs_f64(), lat, cpu / n as u32)
}

fn pct(lat: &[Duration], p: f64) -> Duration {
    let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
    lat.get(i).copied().unwrap_or_default()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(32);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let words: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    println!("{tasks} tasks x {rounds} acquires of {words} words, 2 workers, 3 alternations");
    println!(
        "{:<16} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "way", "acquires/s", "p50", "p99", "p99.9", "max", "cpu/acq"
    );
    for _ in 0..3 {
        for way in [Way::Plain, Way::Io] {
            let (rate, lat, cpu) = run(way, tasks, rounds, words);
            println!(
                "{:<16} {:>12.0} {:>9.2?} {:>9.2?} {:>9.2?} {:>9.2?} {:>10.2?}",
                way.name(),
                rate,
                pct(&lat, 0.5),
                pct(&lat, 0.99),
                pct(&lat, 0.999),
                lat.last().copied().unwrap_or_default(),
                cpu
            );
        }
    }
}
