//! Rollout: which bundle version each edge should run, and getting it there safely.
//!
//! The persisted [`Plan`] holds the last version that reached the whole fleet
//! (`current`) and at most one [`Rollout`] in progress. A rollout moves through
//! [`Phase`]s:
//!
//! * `canary`: only the canary region's edges target the new version. Once every
//!   connected edge there runs it and its health probe passes continuously for
//!   `canary_wait_s`, the rollout moves on. A compile error or a failing probe there
//!   stops it (`failed`): every edge targets the previous version again.
//! * `fleet`: every edge targets the new version; when every connected edge runs it the
//!   rollout is `done` and the version becomes `current`.
//!
//! The files, one concept each:
//!
//! * [`plan`]: the plan and its phase machine (`target`, `advance`, `waiting`), pure;
//! * `dispatch.rs`: per-edge state, the one apply a session sends next, and drift;
//! * `commands.rs`: the operator's [`Rollouts::push`] and [`Rollouts::rollback`];
//! * `view.rs`: what the API shows ([`BundleView`]), and a peer's view taken back in;
//! * [`config`]: the `[rollout]` TOML section; `metrics.rs` and [`redact`].
//!
//! [`Rollouts`] ties them together: one `std::sync::Mutex` over the plan and every
//! edge's state, never held across an `.await`, and a [`watch`] counter that wakes the
//! sessions (pull-based: each asks [`Rollouts::next_apply`] after any change). In a
//! cluster only the leader moves phases and writes the plan; the others take the plan
//! the bundle store delivers ([`Rollouts::follow_plan`]).

use daemon::sync::IoMutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use proto::edge::ApplyConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bundle::store::{BundleStore, StoreError};
use crate::bundle::vars::Vars;
use crate::clock::now_ms;

mod commands;
pub mod config;
mod dispatch;
mod metrics;
pub mod plan;
pub mod redact;
mod view;

pub use commands::{RolloutError, Started};
pub use config::{DriftPolicy, RolloutConfig};
pub use plan::{Phase, Plan, Rollout, PAST_ROLLOUTS};
pub use view::{BundleState, BundleView, EdgeBundleView};

use dispatch::{EdgeState, REMOTE_TTL};
use plan::Seen;

/// How often the driver re-evaluates phases.
const TICK: Duration = Duration::from_millis(250);
/// How often sessions are woken regardless, so in-flight and retry timeouts are noticed.
const WAKE_EVERY_TICKS: u32 = 20;

/// Everything under the one lock.
struct Inner {
    plan: Plan,
    edges: HashMap<String, EdgeState>,
    /// Each (version, region) rendered once, for every edge of the region.
    rendered: HashMap<(String, String), Arc<Result<ApplyConfig, String>>>,
}

impl Inner {
    /// The edges the phase machine counts (connected, bundle-capable).
    fn counted(&self) -> Vec<Seen<'_>> {
        self.edges.iter().filter_map(|(id, e)| e.seen(id)).collect()
    }

    /// [`plan::advance`] over the counted edges, now.
    fn advance(&mut self, config: &RolloutConfig) {
        let Inner { plan, edges, .. } = self;
        let seen: Vec<Seen<'_>> = edges.iter().filter_map(|(id, e)| e.seen(id)).collect();
        plan::advance(plan, &seen, config, now_ms());
    }
}

/// The rollout manager; share it behind an `Arc`.
pub struct Rollouts {
    store: Arc<BundleStore>,
    config: RolloutConfig,
    regions: BTreeMap<String, Vars>,
    /// An `IoMutex`: a rollout's start holds it across its plan write to etcd.
    inner: IoMutex<Inner>,
    changed: watch::Sender<u64>,
    /// `true` while this coordinator leads its cluster (always, embedded): only then do
    /// phases move and the plan get written. Followers take the leader's plan instead.
    leading: std::sync::OnceLock<watch::Receiver<bool>>,
}

impl Rollouts {
    pub fn new(
        store: Arc<BundleStore>,
        config: RolloutConfig,
        regions: BTreeMap<String, Vars>,
    ) -> Result<Arc<Self>, StoreError> {
        let plan = store.load_plan::<Plan>()?.unwrap_or_default();
        Ok(Arc::new(Rollouts {
            store,
            config,
            regions,
            inner: IoMutex::new(Inner {
                plan,
                edges: HashMap::new(),
                rendered: HashMap::new(),
            }),
            changed: watch::Sender::new(0),
            leading: std::sync::OnceLock::new(),
        }))
    }

    /// Makes phase changes depend on `leading` (the cluster's leadership).
    pub fn set_leading(&self, leading: watch::Receiver<bool>) {
        let _ = self.leading.set(leading);
    }

    fn leads(&self) -> bool {
        self.leading.get().is_none_or(|d| *d.borrow())
    }

    /// A follower takes the plan the leader wrote (the leader's own copy is the truth).
    /// The versions it names are read first, outside the lock, so that rendering them
    /// for a session never waits on etcd.
    pub fn replace_plan(&self, plan: Plan) {
        if self.leads() {
            return;
        }
        let named = [
            plan.current.clone(),
            plan.rollout.as_ref().map(|r| r.version.clone()),
            plan.rollout.as_ref().and_then(|r| r.previous.clone()),
        ];
        for v in named.into_iter().flatten() {
            if let Err(e) = self.store.get(&v) {
                tracing::warn!(version = %v, error = %e, "config version not readable yet");
            }
        }
        let mut inner = self.lock();
        if inner.plan.rollout == plan.rollout && inner.plan.current == plan.current {
            return;
        }
        inner.plan = plan;
        drop(inner);
        self.bump();
    }

    /// Takes every plan the bundle store delivers ([`BundleStore::plan_changes`]: the
    /// stored one, then each one written) until `shutdown`; a leader ignores them.
    pub async fn follow_plan(self: Arc<Self>, shutdown: CancellationToken) {
        let mut plans = self.store.plan_changes::<Plan>();
        loop {
            let plan = tokio::select! {
                _ = shutdown.cancelled() => return,
                p = plans.next() => p,
            };
            let Some(plan) = plan else { return };
            self.replace_plan(plan);
        }
    }

    pub fn store(&self) -> &BundleStore {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes when something changes that could produce an apply on any edge (a push, a
    /// rollback, a rollout phase, an edge joining or leaving).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Moves the rollout along its phases; called on every result and periodically.
    /// Stores the plan and wakes the sessions when it changed.
    pub fn tick(&self) {
        let mut inner = self.lock();
        inner.edges.retain(|_, e| {
            e.remote
                .as_ref()
                .is_none_or(|(_, at)| at.elapsed() < REMOTE_TTL)
        });
        if !self.leads() {
            return; // the leader moves phases; its plan arrives through `replace_plan`
        }
        let before = inner.plan.rollout.clone();
        inner.advance(&self.config);
        let changed = inner.plan.rollout != before;
        let plan = changed.then(|| inner.plan.clone());
        drop(inner);
        if let Some(plan) = plan {
            if let Err(e) = self.store.save_plan(&plan) {
                tracing::error!(error = %e, "cannot store the rollout plan; it is kept in memory");
            }
            self.bump();
        }
    }

    /// Runs [`Self::tick`] until shutdown, waking every session now and then.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(TICK);
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => self.tick(),
            }
            ticks = ticks.wrapping_add(1);
            if ticks.is_multiple_of(WAKE_EVERY_TICKS) {
                self.bump();
            }
        }
    }
}

#[cfg(test)]
mod tests;
