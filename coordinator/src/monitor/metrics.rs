//! The monitor's families, read at scrape time: each region's health (one series per
//! state, 1 for the current one), the probe-duration histograms, alert deliveries.

use std::sync::Arc;

use prometheus_client::encoding::DescriptorEncoder;

use super::{Health, Monitor};
use crate::metrics::{counter, gauge, histogram, Collector, Label, Registry};

impl Monitor {
    /// Registers the health, probe and alert families.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(Box::new(MonitorMetrics(self.clone())));
    }
}

struct MonitorMetrics(Arc<Monitor>);

impl std::fmt::Debug for MonitorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MonitorMetrics")
    }
}

impl Collector for MonitorMetrics {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let health = self.0.health();
        gauge(
            &mut e,
            "coordinator_region_health",
            "Region health: agents connected, purges applied within the lag bound, probes passing (1 for the current state).",
            health.iter().flat_map(|(region, h)| {
                [
                    ("up", Health::Up),
                    ("degraded", Health::Degraded),
                    ("down", Health::Down),
                ]
                .into_iter()
                .map(move |(name, state)| {
                    (
                        [("region", Label(region)), ("state", Label(name))],
                        u64::from(h.health == state),
                    )
                })
            }),
        )?;
        let histograms = self.0.histograms();
        histogram(
            &mut e,
            "coordinator_probe_duration_seconds",
            "Synthetic probe response time, through the edge or straight to the origin.",
            histograms.iter().map(|h| {
                (
                    [
                        ("region", Label(&h.region)),
                        ("check", Label(&h.check)),
                        ("target", Label(h.target)),
                    ],
                    h.durations.clone(),
                )
            }),
        )?;
        let alerts = self.0.alert_counts();
        counter(
            &mut e,
            "coordinator_alerts_total",
            "Alert deliveries, by result.",
            [
                ([("result", Label("sent"))], alerts.sent),
                ([("result", Label("failed"))], alerts.failed),
            ],
        )
    }
}
