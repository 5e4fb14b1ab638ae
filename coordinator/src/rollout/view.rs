//! What the API shows of the rollout (`GET /api/v1/config`): the plan, why it waits, and
//! each edge's bundle state ([`BundleView`], [`EdgeBundleView`]); and the way back, a
//! peer's local view taken in for the leader's phase decisions ([`Rollouts::set_remote`]).

use std::sync::Arc;
use std::time::Instant;

use proto::edge::ConfigStatus;
use serde::{Deserialize, Serialize};

use super::config::DriftPolicy;
use super::dispatch::{EdgeState, Sent};
use super::plan::{target, waiting, Phase, Rollout};
use super::Rollouts;
use crate::clock::now_ms;

/// Where one edge's bundle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleState {
    /// Runs its target version.
    InSync,
    /// The target was sent; no result yet.
    Applying,
    /// The agent could not load the target (`error` says why).
    Failed,
    /// Runs something the coordinator did not push.
    Drift,
    /// The target is not sent yet.
    Pending,
    Disconnected,
    /// The agent has no config support.
    Unsupported,
    /// Nothing was ever pushed.
    NoTarget,
}

/// One edge in `GET /api/v1/config`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeBundleView {
    pub id: String,
    pub region: String,
    pub connected: bool,
    pub state: BundleState,
    pub target_version: Option<String>,
    pub active_version: Option<String>,
    pub active_vcl: Option<String>,
    pub drift: bool,
    pub drift_events: u64,
    pub error: Option<String>,
    pub health_status: Option<u32>,
    pub health_error: Option<String>,
}

/// `GET /api/v1/config`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleView {
    /// The version the fleet is heading to (the rollout's, else `current`).
    pub desired: Option<String>,
    pub current: Option<String>,
    pub rollout: Option<Rollout>,
    /// Why the rollout is not moving, if it is waiting.
    pub waiting: Option<String>,
    pub canary_region: Option<String>,
    pub canary_wait_s: u64,
    pub drift_policy: DriftPolicy,
    pub edges: Vec<EdgeBundleView>,
    /// Earlier rollouts, newest first (a superseded one ended in the phase it was in).
    #[serde(default)]
    pub past_rollouts: Vec<Rollout>,
}

impl Rollouts {
    pub fn view(&self) -> BundleView {
        self.view_scoped(false)
    }

    /// [`Self::view`]; with `local`, only the edges whose sessions this coordinator holds.
    pub fn view_scoped(&self, local: bool) -> BundleView {
        let inner = self.lock();
        let plan = &inner.plan;
        let desired = match &plan.rollout {
            Some(r) if r.phase != Phase::Failed => Some(r.version.clone()),
            _ => plan.current.clone(),
        };
        let mut edges: Vec<EdgeBundleView> = inner
            .edges
            .iter()
            .filter(|(_, e)| !local || e.remote.is_none())
            .map(|(id, e)| edge_view(id, e, target(plan, &e.region, id)))
            .collect();
        edges.sort_by(|a, b| (&a.region, &a.id).cmp(&(&b.region, &b.id)));
        BundleView {
            past_rollouts: plan.past.iter().rev().cloned().collect(),
            desired,
            current: plan.current.clone(),
            rollout: plan.rollout.clone(),
            waiting: waiting(plan, &inner.counted(), &self.config, now_ms()),
            canary_region: self.config.canary_region.clone(),
            canary_wait_s: self.config.canary_wait_s,
            drift_policy: self.config.drift,
            edges,
        }
    }

    /// Replaces what coordinator `peer` reports of the edges it holds (their bundle
    /// state from its `GET /api/v1/config?scope=local`), for the leader's phase decisions.
    pub fn set_remote(&self, peer: &str, views: Vec<EdgeBundleView>) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner
            .edges
            .retain(|_, e| e.remote.as_ref().is_none_or(|(p, _)| p != peer));
        for v in views {
            if inner
                .edges
                .get(&v.id)
                .is_some_and(|e| e.connected && e.remote.is_none())
            {
                continue; // this coordinator holds its session
            }
            let sent = (v.state == BundleState::Failed)
                .then(|| {
                    Some(Sent {
                        version: v.target_version.clone()?,
                        at: now,
                        result: Some(Err(v.error.clone().unwrap_or_default())),
                    })
                })
                .flatten();
            let status = ConfigStatus {
                active_version: v.active_version.clone().unwrap_or_default(),
                active_vcl: v.active_vcl.clone().unwrap_or_default(),
                health_status: v.health_status.unwrap_or(0),
                health_error: v.health_error.clone().unwrap_or_default(),
                // Not a failed apply: the error is what the agent says of varnishd's
                // admin port, shown by every coordinator as by the holder.
                admin_error: match v.state {
                    BundleState::Failed => String::new(),
                    _ => v.error.clone().unwrap_or_default(),
                },
            };
            inner.edges.insert(
                v.id.clone(),
                EdgeState {
                    region: v.region.clone(),
                    session: u64::MAX,
                    connected: v.connected,
                    capable: v.state != BundleState::Unsupported,
                    status: Some(status),
                    sent,
                    synced: None,
                    drifting: v.drift,
                    drift_events: v.drift_events,
                    wake: Arc::new(tokio::sync::Notify::new()),
                    remote: Some((peer.to_owned(), now)),
                },
            );
        }
    }
}

fn edge_view(id: &str, e: &EdgeState, target: Option<&str>) -> EdgeBundleView {
    let active = e.status.as_ref().map(|s| s.active_version.as_str());
    let sent = e
        .sent
        .as_ref()
        .filter(|s| Some(s.version.as_str()) == target);
    let state = if !e.connected {
        BundleState::Disconnected
    } else if !e.capable {
        BundleState::Unsupported
    } else if target.is_none() {
        BundleState::NoTarget
    } else if active == target {
        BundleState::InSync
    } else if let Some(s) = sent {
        match s.result {
            Some(Err(_)) => BundleState::Failed,
            _ => BundleState::Applying,
        }
    } else if e.drifting {
        BundleState::Drift
    } else {
        BundleState::Pending
    };
    let error = sent
        .and_then(|s| s.result.as_ref())
        .and_then(|r| r.as_ref().err().cloned())
        .or_else(|| {
            e.status
                .as_ref()
                .map(|s| s.admin_error.clone())
                .filter(|m| !m.is_empty())
        });
    EdgeBundleView {
        id: id.to_owned(),
        region: e.region.clone(),
        connected: e.connected,
        state,
        target_version: target.map(str::to_owned),
        active_version: active.filter(|a| !a.is_empty()).map(str::to_owned),
        active_vcl: e.status.as_ref().map(|s| s.active_vcl.clone()),
        drift: e.drifting,
        drift_events: e.drift_events,
        error,
        health_status: e
            .status
            .as_ref()
            .map(|s| s.health_status)
            .filter(|s| *s != 0),
        health_error: e
            .status
            .as_ref()
            .map(|s| s.health_error.clone())
            .filter(|m| !m.is_empty()),
    }
}
