//! The benchmarks' figures: percentiles of latency samples, printed one line each so runs
//! compare side by side.

/// Percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One benchmark line: `name n=… p50=… p90=… p99=… max=… ms` over `ms` (any order).
pub fn percentiles_line(name: &str, mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!(
        "{name:<46} n={:<6} p50={:>8.3} p90={:>8.3} p99={:>8.3} max={:>8.3} ms",
        ms.len(),
        percentile(&ms, 50.0),
        percentile(&ms, 90.0),
        percentile(&ms, 99.0),
        percentile(&ms, 100.0)
    )
}
