//! The operator's commands: [`Rollouts::push`] a bundle, [`Rollouts::rollback`] to an
//! earlier version. Each starts a rollout under the one lock that checks no other is in
//! flight (unless forced), and stores the plan before it answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::plan::{Phase, Rollout, PAST_ROLLOUTS};
use super::Rollouts;
use crate::bundle::store::StoreError;
use crate::bundle::{self, Bundle, BundleError};
use crate::clock::now_ms;

/// Why a push or rollback was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{0}")]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unknown version {0}")]
    UnknownVersion(String),
    #[error("{0}")]
    Nothing(String),
    #[error(
        "rollout of {0} is still in progress; wait for it, or push with --force to supersede it"
    )]
    InFlight(String),
}

/// What a push or rollback started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Started {
    pub version: String,
    /// False when the same content was pushed before.
    pub new_version: bool,
    /// Null when the version already runs everywhere.
    pub rollout: Option<Rollout>,
}

impl Rollouts {
    /// Validates, stores and starts rolling out a pushed bundle. While another rollout is
    /// in progress the push is refused ([`RolloutError::InFlight`]) unless `force`: then
    /// it supersedes it, and a failure returns each edge to what it was running.
    pub fn push(
        &self,
        bundle: &Bundle,
        canary: bool,
        force: bool,
    ) -> Result<Started, RolloutError> {
        bundle::check(bundle, &self.regions)?;
        let (version, new_version) = self.store.put(bundle)?;
        let rollout = self.start(&version, canary, "push", force)?;
        Ok(Started {
            version,
            new_version,
            rollout,
        })
    }

    /// Rolls back to `version`, or to what ran before: the last complete version when a
    /// rollout is in progress or failed, else the one before it. Skips the canary.
    pub fn rollback(&self, version: Option<String>) -> Result<Started, RolloutError> {
        let version = match version {
            Some(v) => v,
            None => {
                let inner = self.lock();
                let plan = &inner.plan;
                let in_progress = plan
                    .rollout
                    .as_ref()
                    .is_some_and(|r| r.phase != Phase::Done);
                let pick = if in_progress {
                    plan.current.clone()
                } else {
                    plan.history.iter().rev().nth(1).cloned()
                };
                pick.ok_or_else(|| {
                    RolloutError::Nothing("there is no earlier version to roll back to".into())
                })?
            }
        };
        if self.store.get(&version)?.is_none() {
            return Err(RolloutError::UnknownVersion(version));
        }
        let rollout = self.start(&version, false, "rollback", true)?;
        Ok(Started {
            version,
            new_version: false,
            rollout,
        })
    }

    /// Starts a rollout of `version`. One in flight is superseded only with `supersede`
    /// (checked under the same lock that starts the new one, so two pushes cannot both
    /// pass); otherwise [`RolloutError::InFlight`].
    fn start(
        &self,
        version: &str,
        canary: bool,
        kind: &str,
        supersede: bool,
    ) -> Result<Option<Rollout>, RolloutError> {
        let mut inner = self.lock();
        // A rollout that has in fact reached every edge is done before it is superseded.
        let before = inner.plan.rollout.clone();
        inner.advance(&self.config);
        let superseded = inner
            .plan
            .rollout
            .as_ref()
            .filter(|r| matches!(r.phase, Phase::Canary | Phase::Fleet))
            .map(|r| r.version.clone());
        let plan = &inner.plan;
        let settled = plan.rollout.as_ref().is_none_or(|r| r.phase == Phase::Done);
        let refused = superseded.clone().filter(|_| !supersede);
        if refused.is_some() || (settled && plan.current.as_deref() == Some(version)) {
            if inner.plan.rollout != before {
                self.store.save_plan(&inner.plan)?;
                drop(inner);
                self.bump();
            }
            return refused.map_or(Ok(None), |v| Err(RolloutError::InFlight(v)));
        }
        // Where an edge already runs the rollout being superseded, that is what it goes
        // back to if this one fails; any other edge goes back to the fleet's version.
        let previous_by_edge: BTreeMap<String, String> = superseded
            .map(|v| {
                inner
                    .edges
                    .iter()
                    .filter(|(_, e)| e.runs(&v))
                    .map(|(id, _)| (id.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let plan = &mut inner.plan;
        let canary_region = self.config.canary_region.clone().filter(|_| canary);
        plan.next_id += 1;
        let rollout = Rollout {
            id: plan.next_id,
            version: version.to_owned(),
            previous: plan.current.clone(),
            phase: if canary_region.is_some() {
                Phase::Canary
            } else {
                Phase::Fleet
            },
            canary_region,
            started_at_ms: now_ms(),
            canary_healthy_since_ms: None,
            finished_at_ms: None,
            error: None,
            kind: kind.to_owned(),
            previous_by_edge,
        };
        tracing::info!(version, kind, phase = ?rollout.phase, "rollout started");
        if let Some(before) = plan.rollout.replace(rollout.clone()) {
            plan.past.push(before);
            if plan.past.len() > PAST_ROLLOUTS {
                plan.past.remove(0);
            }
        }
        self.store.save_plan(&inner.plan)?;
        drop(inner);
        self.bump();
        Ok(Some(rollout))
    }
}
