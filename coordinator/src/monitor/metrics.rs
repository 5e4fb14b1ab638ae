//! The monitor's families, read at scrape time: each region's health (one series per
//! state, 1 for the current one), the probe-duration histograms, alert deliveries.

use std::sync::Arc;

use super::{Health, Monitor};
use crate::metrics::{collector, counter, gauge, histogram, DescriptorEncoder, Label, Registry};

impl Monitor {
    /// Registers the health, probe and alert families.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(collector(self.clone(), encode));
    }
}

fn encode(source: &Arc<Monitor>, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let health = source.health();
    gauge(
            e,
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
    let histograms = source.histograms();
    histogram(
        e,
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
    let alerts = source.alert_counts();
    counter(
        e,
        "coordinator_alerts_total",
        "Alert deliveries, by result.",
        [
            ([("result", Label("sent"))], alerts.sent),
            ([("result", Label("failed"))], alerts.failed),
        ],
    )
}
