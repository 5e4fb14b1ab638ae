//! Prometheus metrics, rendered by hand in the text exposition format.
//!
//! Counters are plain atomics bumped on the hot path; per-edge gauges are read from the
//! [`EdgeRegistry`] at scrape time, so nothing is kept twice. Names follow
//! `coordinator_<what>_<unit>[_total]` with labels `region` and `edge`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::fanout::edges::EdgeRegistry;
use crate::purge::log::PurgeLog;
use crate::rollout::Rollouts;

const REQUEST_RESULTS: [&str; 5] = [
    "accepted",
    "bad_request",
    "bad_method",
    "forbidden",
    "unavailable",
];
const PURGE_KINDS: [&str; 4] = ["tags", "regex", "pool", "all"];

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: [AtomicU64; 5],
    logged: [AtomicU64; 4],
}

/// What the exposition reads besides the purge counters.
#[derive(Clone, Copy)]
pub struct Sources<'a> {
    pub log: &'a PurgeLog,
    pub edges: &'a EdgeRegistry,
    pub rollouts: &'a Rollouts,
    pub tls: Option<&'a crate::tls::ServerTls>,
    pub traffic: &'a crate::traffic::Traffic,
    pub monitor: &'a crate::monitor::Monitor,
    pub warm: &'a crate::warm::Warm,
}

impl Metrics {
    /// Counts one purge request by its outcome.
    pub fn purge_request(&self, result: &str) {
        if let Some(i) = REQUEST_RESULTS.iter().position(|r| *r == result) {
            self.requests[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one logged purge by kind.
    pub fn purge_logged(&self, kind: &str) {
        if let Some(i) = PURGE_KINDS.iter().position(|k| *k == kind) {
            self.logged[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The whole exposition.
    pub fn render(&self, sources: &Sources<'_>) -> String {
        let Sources {
            log,
            edges,
            rollouts,
            tls,
            traffic,
            monitor,
            warm,
        } = *sources;
        let mut out = String::with_capacity(4096);
        family(
            &mut out,
            "coordinator_purge_requests_total",
            "counter",
            "PURGE requests received, by result.",
        );
        for (i, r) in REQUEST_RESULTS.iter().enumerate() {
            let _ = writeln!(
                out,
                "coordinator_purge_requests_total{{result=\"{r}\"}} {}",
                self.requests[i].load(Ordering::Relaxed)
            );
        }
        family(
            &mut out,
            "coordinator_purges_received_total",
            "counter",
            "Purges durably logged, by kind.",
        );
        for (i, k) in PURGE_KINDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "coordinator_purges_received_total{{kind=\"{k}\"}} {}",
                self.logged[i].load(Ordering::Relaxed)
            );
        }
        let head = log.head();
        family(
            &mut out,
            "coordinator_purge_log_head_seq",
            "gauge",
            "Newest durable purge sequence.",
        );
        let _ = writeln!(out, "coordinator_purge_log_head_seq {head}");
        family(
            &mut out,
            "coordinator_purge_log_first_seq",
            "gauge",
            "Oldest retained purge sequence.",
        );
        let _ = writeln!(out, "coordinator_purge_log_first_seq {}", log.first());
        let list = edges.list_with_lag(log);
        type PerEdge = fn(&crate::fanout::edges::EdgeView) -> f64;
        let per_edge: [(&str, &str, &str, PerEdge); 8] = [
            (
                "coordinator_purges_applied_total",
                "counter",
                "Purge log entries applied, per edge (since coordinator start).",
                |e| e.applied_total as f64,
            ),
            (
                "coordinator_edge_purge_lag_entries",
                "gauge",
                "Purge log entries not yet applied, per edge.",
                |e| e.lag as f64,
            ),
            (
                "coordinator_edge_applied_seq",
                "gauge",
                "Highest purge sequence applied, per edge.",
                |e| e.applied_seq as f64,
            ),
            (
                "coordinator_edge_connected",
                "gauge",
                "Whether the edge's session is up (1) or not (0).",
                |e| f64::from(u8::from(e.connected)),
            ),
            (
                "coordinator_edge_purge_lag_seconds",
                "gauge",
                "How long the oldest purge an edge has not applied has waited (0: none).",
                |e| e.lag_s.unwrap_or(0.0),
            ),
            (
                "coordinator_edge_purge_failing",
                "gauge",
                "1 while the edge reports that it cannot apply its next purge (it retries).",
                |e| f64::from(u8::from(e.purge_failing)),
            ),
            (
                "coordinator_edge_purge_full_bans_total",
                "counter",
                "Purges varnish refused for good that the edge applied as a full ban instead.",
                |e| e.full_bans as f64,
            ),
            (
                "coordinator_edge_acks_refused_total",
                "counter",
                "Acks beyond the log head (or for another log) refused; each dropped the session.",
                |e| e.refused_acks as f64,
            ),
        ];
        for (name, kind, help, value) in per_edge {
            family(&mut out, name, kind, help);
            for e in &list {
                let _ = writeln!(
                    out,
                    "{name}{{region=\"{}\",edge=\"{}\"}} {}",
                    e.region,
                    e.id,
                    value(e)
                );
            }
        }
        render_config(&mut out, rollouts);
        render_tls(&mut out, &list, tls);
        render_traffic(&mut out, traffic);
        render_monitor(&mut out, monitor);
        render_warm(&mut out, warm);
        out
    }
}

fn render_warm(out: &mut String, warm: &crate::warm::Warm) {
    let (totals, states, rate) = warm.metrics();
    family(
        out,
        "coordinator_warm_fetches_total",
        "counter",
        "Warm fetches reported by the edges, per region and result (since coordinator start).",
    );
    for (region, t) in &totals {
        for (result, v) in [("hit", t[1]), ("miss", t[2]), ("error", t[3])] {
            let _ = writeln!(
                out,
                "coordinator_warm_fetches_total{{region=\"{region}\",result=\"{result}\"}} {v}"
            );
        }
    }
    family(
        out,
        "coordinator_warm_jobs",
        "gauge",
        "Warm jobs known, by state.",
    );
    for (state, n) in states {
        let _ = writeln!(out, "coordinator_warm_jobs{{state=\"{state}\"}} {n}");
    }
    family(
        out,
        "coordinator_warm_origin_rate_rps",
        "gauge",
        "Origin requests per second the running warm job may send now (AIMD; 0 when idle).",
    );
    let _ = writeln!(out, "coordinator_warm_origin_rate_rps {rate}");
}

/// The `# HELP` and `# TYPE` lines that open a metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn render_monitor(out: &mut String, monitor: &crate::monitor::Monitor) {
    use crate::monitor::{Health, BUCKETS};
    family(
        out,
        "coordinator_region_health",
        "gauge",
        "Region health: agents connected, purges applied within the lag bound, probes passing (1 for the current state).",
    );
    for (region, h) in monitor.health() {
        for (name, state) in [
            ("up", Health::Up),
            ("degraded", Health::Degraded),
            ("down", Health::Down),
        ] {
            let _ = writeln!(
                out,
                "coordinator_region_health{{region=\"{region}\",state=\"{name}\"}} {}",
                u8::from(h.health == state)
            );
        }
    }
    family(
        out,
        "coordinator_probe_duration_seconds",
        "histogram",
        "Synthetic probe response time, through the edge or straight to the origin.",
    );
    for (region, check, target, counts, total, sum) in monitor.histograms() {
        let labels = format!("region=\"{region}\",check=\"{check}\",target=\"{target}\"");
        for (b, c) in BUCKETS.iter().zip(&counts) {
            let _ = writeln!(
                out,
                "coordinator_probe_duration_seconds_bucket{{{labels},le=\"{b}\"}} {c}"
            );
        }
        let _ = writeln!(
            out,
            "coordinator_probe_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {total}"
        );
        let _ = writeln!(
            out,
            "coordinator_probe_duration_seconds_sum{{{labels}}} {sum}"
        );
        let _ = writeln!(
            out,
            "coordinator_probe_duration_seconds_count{{{labels}}} {total}"
        );
    }
    let (sent, failed) = monitor.alert_counts();
    family(
        out,
        "coordinator_alerts_total",
        "counter",
        "Alert deliveries, by result.",
    );
    let _ = writeln!(out, "coordinator_alerts_total{{result=\"sent\"}} {sent}");
    let _ = writeln!(
        out,
        "coordinator_alerts_total{{result=\"failed\"}} {failed}"
    );
}

fn render_traffic(out: &mut String, traffic: &crate::traffic::Traffic) {
    let now = crate::clock::now_ms();
    let edges = traffic.edges(now);
    type Get = fn(&crate::traffic::Delta) -> u64;
    let counters: [(&str, &str, Get); 9] = [
        (
            "coordinator_varnish_requests_total",
            "Client requests varnish received (since coordinator start).",
            |d| d.requests,
        ),
        ("coordinator_varnish_cache_hits_total", "Cache hits.", |d| {
            d.hits
        }),
        (
            "coordinator_varnish_cache_misses_total",
            "Cache misses.",
            |d| d.misses,
        ),
        (
            "coordinator_varnish_passes_total",
            "Requests passed to the backend uncached.",
            |d| d.passes,
        ),
        (
            "coordinator_varnish_backend_fetches_total",
            "Backend fetches.",
            |d| d.backend_fetches,
        ),
        (
            "coordinator_varnish_backend_failures_total",
            "Failed backend connections and fetches.",
            |d| d.backend_failures,
        ),
        (
            "coordinator_varnish_synthetic_requests_total",
            "The agent's own requests (warm shards, probes) among the client requests.",
            |d| d.synthetic_requests,
        ),
        (
            "coordinator_varnish_synthetic_hits_total",
            "Cache hits of the agent's own requests.",
            |d| d.synthetic_hits,
        ),
        (
            "coordinator_varnish_synthetic_misses_total",
            "Cache misses of the agent's own requests (warming).",
            |d| d.synthetic_misses,
        ),
    ];
    for (name, help, get) in counters {
        family(out, name, "counter", help);
        for (id, (region, _, total)) in &edges {
            let _ = writeln!(
                out,
                "{name}{{region=\"{region}\",edge=\"{id}\"}} {}",
                get(total)
            );
        }
    }
    type Gauge = fn(&crate::traffic::Summary) -> Option<u64>;
    let gauges: [(&str, &str, Gauge); 2] = [
        (
            "coordinator_varnish_objects",
            "Objects in the cache.",
            |s| s.objects,
        ),
        ("coordinator_varnish_bans", "Length of the ban list.", |s| {
            s.bans
        }),
    ];
    for (name, help, get) in gauges {
        family(out, name, "gauge", help);
        for (id, (region, summary, _)) in &edges {
            // A stale edge has no live value: no sample rather than its last one.
            if let Some(v) = get(summary) {
                let _ = writeln!(out, "{name}{{region=\"{region}\",edge=\"{id}\"}} {v}");
            }
        }
    }
    family(
        out,
        "coordinator_region_hit_ratio",
        "gauge",
        "Shoppers' Σhits / Σ(hits + misses) over the region's edges in the window (the agents' warm and probe requests excluded).",
    );
    for (region, summary) in traffic.regions(now) {
        for (window, ratio) in &summary.hit_ratio {
            if let Some(r) = ratio {
                let _ = writeln!(
                    out,
                    "coordinator_region_hit_ratio{{region=\"{region}\",window=\"{window}\"}} {r}"
                );
            }
        }
    }
}

fn render_tls(
    out: &mut String,
    edges: &[crate::fanout::edges::EdgeView],
    tls: Option<&crate::tls::ServerTls>,
) {
    let Some(tls) = tls else { return };
    let e = tls.expiry();
    family(
        out,
        "coordinator_tls_cert_expiry_timestamp_seconds",
        "gauge",
        "When a certificate in use expires (Unix time).",
    );
    let _ = writeln!(
        out,
        "coordinator_tls_cert_expiry_timestamp_seconds{{cert=\"server\"}} {}",
        e.server_not_after
    );
    let _ = writeln!(
        out,
        "coordinator_tls_cert_expiry_timestamp_seconds{{cert=\"ca\"}} {}",
        e.ca_not_after
    );
    family(
        out,
        "coordinator_edge_cert_expiry_timestamp_seconds",
        "gauge",
        "When the client certificate an edge presented expires (Unix time).",
    );
    for edge in edges {
        if let Some(t) = edge.cert_not_after {
            let _ = writeln!(
                out,
                "coordinator_edge_cert_expiry_timestamp_seconds{{region=\"{}\",edge=\"{}\"}} {t}",
                edge.region, edge.id
            );
        }
    }
    family(
        out,
        "coordinator_tls_handshakes_refused_total",
        "counter",
        "gRPC connections refused during the TLS handshake.",
    );
    let _ = writeln!(
        out,
        "coordinator_tls_handshakes_refused_total {}",
        tls.refused.load(Ordering::Relaxed)
    );
}

fn render_config(out: &mut String, rollouts: &Rollouts) {
    let view = rollouts.view();
    family(
        out,
        "coordinator_config_edge_in_sync",
        "gauge",
        "Whether the edge runs its target config version (1) or not (0).",
    );
    for e in &view.edges {
        let _ = writeln!(
            out,
            "coordinator_config_edge_in_sync{{region=\"{}\",edge=\"{}\"}} {}",
            e.region,
            e.id,
            u8::from(e.state == "in_sync")
        );
    }
    family(
        out,
        "coordinator_config_edge_drift",
        "gauge",
        "Whether the edge runs a VCL the coordinator did not push (1) or not (0).",
    );
    for e in &view.edges {
        let _ = writeln!(
            out,
            "coordinator_config_edge_drift{{region=\"{}\",edge=\"{}\"}} {}",
            e.region,
            e.id,
            u8::from(e.drift)
        );
    }
    family(
        out,
        "coordinator_config_drift_events_total",
        "counter",
        "Times the edge was seen leaving its config version (since coordinator start).",
    );
    for e in &view.edges {
        let _ = writeln!(
            out,
            "coordinator_config_drift_events_total{{region=\"{}\",edge=\"{}\"}} {}",
            e.region, e.id, e.drift_events
        );
    }
    let phase = view.rollout.as_ref().map(|r| r.phase);
    family(
        out,
        "coordinator_config_rollout_phase",
        "gauge",
        "The latest rollout's phase (1 for the current one).",
    );
    for (name, p) in [
        ("canary", crate::rollout::Phase::Canary),
        ("fleet", crate::rollout::Phase::Fleet),
        ("done", crate::rollout::Phase::Done),
        ("failed", crate::rollout::Phase::Failed),
    ] {
        let _ = writeln!(
            out,
            "coordinator_config_rollout_phase{{phase=\"{name}\"}} {}",
            u8::from(phase == Some(p))
        );
    }
}
