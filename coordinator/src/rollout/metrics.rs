//! The rollout's families, read from [`Rollouts::view`] at scrape time: per edge whether
//! it runs its target version and whether it drifted, and the latest rollout's phase.

use std::sync::Arc;

use super::{Phase, Rollouts};
use crate::metrics::{
    collector, counter, edge_labels, gauge, gauge_value, DescriptorEncoder, Label, Registry,
};

impl Rollouts {
    /// Registers the config families.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(collector(self.clone(), encode));
    }
}

fn encode(source: &Arc<Rollouts>, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let view = source.view_scoped(true);
    fn labels(v: &super::EdgeBundleView) -> [(&'static str, Label<'_>); 2] {
        edge_labels(&v.region, &v.id)
    }
    gauge(
        e,
        "coordinator_config_edge_in_sync",
        "Whether the edge runs its target config version (1) or not (0).",
        view.edges
            .iter()
            .map(|v| (labels(v), u64::from(v.state == super::BundleState::InSync))),
    )?;
    gauge(
        e,
        "coordinator_config_edge_drift",
        "Whether the edge runs a VCL the coordinator did not push (1) or not (0).",
        view.edges.iter().map(|v| (labels(v), u64::from(v.drift))),
    )?;
    counter(
        e,
        "coordinator_config_drift_events_total",
        "Times the edge was seen leaving its config version (since coordinator start).",
        view.edges.iter().map(|v| (labels(v), v.drift_events)),
    )?;
    gauge_value(
        e,
        "coordinator_config_rollout_id",
        "The latest rollout's id (0: none yet); a change marks a rollout starting (the dashboard's annotations).",
        view.rollout.as_ref().map_or(0, |r| r.id),
    )?;
    let phase = view.rollout.as_ref().map(|r| r.phase);
    gauge(
        e,
        "coordinator_config_rollout_phase",
        "The latest rollout's phase (1 for the current one).",
        [
            ("canary", Phase::Canary),
            ("fleet", Phase::Fleet),
            ("done", Phase::Done),
            ("failed", Phase::Failed),
        ]
        .into_iter()
        .map(|(name, p)| ([("phase", Label(name))], u64::from(phase == Some(p)))),
    )
}
