//! varnishd's counters, read with `varnishstat -j` every `stats_interval_s` and sent up
//! as [`VarnishStats`]. The agent sends raw cumulative counters; turning them into rates
//! (and surviving a varnishd restart, which resets them) is the coordinator's job, so a
//! lost message costs resolution, never correctness.
//!
//! Each sample also carries `MGT.child_panic` and the purge sequence the agent had
//! applied when it was read. The agent logs a varnishd child restart it sees (uptime
//! going back, or a panic counted) with that sequence; the coordinator marks the region
//! `varnish_restarted` from the same two fields ([`restarted`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::edge::{agent_message, AgentMessage, VarnishStats};
use tokio::sync::mpsc;

use crate::command;

/// The counters read, by name.
const FIELDS: [&str; 15] = [
    "MGT.child_panic",
    "MAIN.uptime",
    "MAIN.client_req",
    "MAIN.cache_hit",
    "MAIN.cache_miss",
    "MAIN.cache_hitpass",
    "MAIN.cache_hitmiss",
    "MAIN.s_pass",
    "MAIN.backend_req",
    "MAIN.backend_fail",
    "MAIN.fetch_failed",
    "MAIN.n_object",
    "MAIN.bans",
    "MAIN.cache_hit_grace",
    "MAIN.s_bgfetch",
];

/// Parses `varnishstat -j` output (Varnish 6.5+: counters under `"counters"`; older
/// versions put them at the top level).
pub fn parse(json: &[u8], taken_at_ms: u64) -> Result<VarnishStats, String> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("varnishstat output is not JSON: {e}"))?;
    let counters = v.get("counters").unwrap_or(&v);
    let get = |name: &str| counters[name]["value"].as_u64().unwrap_or(0);
    if counters.get("MAIN.uptime").is_none() {
        return Err("varnishstat output has no MAIN.uptime".into());
    }
    Ok(VarnishStats {
        taken_at_ms,
        uptime_s: get("MAIN.uptime"),
        requests: get("MAIN.client_req"),
        hits: get("MAIN.cache_hit"),
        misses: get("MAIN.cache_miss"),
        hitpass: get("MAIN.cache_hitpass"),
        hitmiss: get("MAIN.cache_hitmiss"),
        passes: get("MAIN.s_pass"),
        backend_fetches: get("MAIN.backend_req"),
        backend_failures: get("MAIN.backend_fail") + get("MAIN.fetch_failed"),
        objects: get("MAIN.n_object"),
        bans: get("MAIN.bans"),
        grace_hits: get("MAIN.cache_hit_grace"),
        bgfetches: get("MAIN.s_bgfetch"),
        child_panics: get("MGT.child_panic"),
        ..VarnishStats::default()
    })
}

/// Reads the counters once.
pub async fn read(varnishstat: &Path, instance: Option<&Path>) -> Result<VarnishStats, String> {
    let mut args: Vec<String> = vec!["-j".into()];
    if let Some(n) = instance {
        args.push("-n".into());
        args.push(n.display().to_string());
    }
    for f in FIELDS {
        args.push("-f".into());
        args.push(f.into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = command::run(varnishstat, &args, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    parse(&out, now)
}

/// Whether varnishd's cache process restarted between two samples: its uptime went
/// back, or the manager counted another panic. Some(true) when a panic says so.
pub fn restarted(prev: &VarnishStats, next: &VarnishStats) -> Option<bool> {
    let panicked = next.child_panics > prev.child_panics;
    (panicked || next.uptime_s < prev.uptime_s).then_some(panicked)
}

/// Sends a sample every `every` until `out` closes; a failed read is logged and skipped.
/// `applied` is the session's applied purge sequence, sent with every sample.
pub async fn run(
    instance: Option<PathBuf>,
    every: Duration,
    synthetic: crate::synthetic::Synthetic,
    served: crate::served::Served,
    applied: std::sync::Arc<std::sync::atomic::AtomicU64>,
    out: mpsc::Sender<AgentMessage>,
) {
    let program = PathBuf::from("varnishstat");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut last: Option<VarnishStats> = None;
    loop {
        tick.tick().await;
        match read(&program, instance.as_deref()).await {
            Ok(mut stats) => {
                failing = false;
                // Read right after varnishstat, so both describe nearly the same moment.
                (
                    stats.synthetic_requests,
                    stats.synthetic_hits,
                    stats.synthetic_misses,
                ) = synthetic.read();
                let s = served.read();
                stats.served_requests = s.requests;
                stats.served_time_us = s.time_us;
                stats.served_time_sq_ms = s.time_sq_ms;
                stats.served_5xx = s.errors_5xx;
                stats.served_buckets = s.buckets;
                stats.served_hits = s.hits;
                stats.served_misses = s.misses;
                stats.served_logged = synthetic.logged();
                stats.applied_seq = applied.load(std::sync::atomic::Ordering::Relaxed);
                if let Some(panic) = last.as_ref().and_then(|p| restarted(p, &stats)) {
                    tracing::error!(
                        panic,
                        uptime_s = stats.uptime_s,
                        child_panics = stats.child_panics,
                        applied_seq = stats.applied_seq,
                        "varnishd's cache process restarted: its cache is empty"
                    );
                }
                last = Some(stats.clone());
                let msg = AgentMessage {
                    msg: Some(agent_message::Msg::Stats(stats)),
                };
                if out.send(msg).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read varnish counters");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_is_an_uptime_going_back_or_a_panic() {
        let s = |uptime_s, child_panics| VarnishStats {
            uptime_s,
            child_panics,
            ..VarnishStats::default()
        };
        assert_eq!(restarted(&s(100, 0), &s(110, 0)), None);
        assert_eq!(restarted(&s(100, 0), &s(3, 0)), Some(false));
        assert_eq!(restarted(&s(100, 0), &s(3, 1)), Some(true));
        // A panic between two reads whose child came back and ran past the old uptime.
        assert_eq!(restarted(&s(5, 1), &s(50, 2)), Some(true));
        // The manager restarted too: its panic counter starts again.
        assert_eq!(restarted(&s(100, 3), &s(2, 0)), Some(false));
    }

    #[test]
    fn parses_varnish_7_and_6_layouts() {
        let v7 = br#"{"version":1,"timestamp":"x","counters":{
            "MAIN.uptime":{"value":30},"MAIN.client_req":{"value":100},
            "MAIN.cache_hit":{"value":90},"MAIN.cache_miss":{"value":10},
            "MAIN.backend_fail":{"value":1},"MAIN.fetch_failed":{"value":2},"MAIN.bans":{"value":1}}}"#;
        let s = parse(v7, 5).unwrap();
        assert_eq!(
            (s.uptime_s, s.requests, s.hits, s.misses),
            (30, 100, 90, 10)
        );
        assert_eq!((s.backend_failures, s.bans, s.taken_at_ms), (3, 1, 5));
        let v6 = br#"{"timestamp":"x","MAIN.uptime":{"value":3},"MAIN.cache_hit":{"value":4}}"#;
        assert_eq!(parse(v6, 0).unwrap().hits, 4);
        assert!(parse(b"{}", 0).is_err());
        let mgt = br#"{"counters":{"MGT.child_panic":{"value":2},"MAIN.uptime":{"value":9}}}"#;
        assert_eq!(parse(mgt, 0).unwrap().child_panics, 2);
        assert!(parse(b"not json", 0).is_err());
    }
}
