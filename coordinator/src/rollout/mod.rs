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
//! [`Rollouts`] is pull-based: each agent session asks [`Rollouts::next_apply`] after
//! any change (a [`watch`] counter) and gets an [`ApplyConfig`] only when its edge's
//! active version differs from its target and nothing is in flight. So a slow VCL
//! compile on one edge holds back nobody else, and nothing here ever waits on an edge.
//!
//! Drift: agents report the active VCL's version ([`ConfigStatus`]). An edge that ran its
//! target and then runs something else (a hand `vcl.use`, a varnishd restarted with its
//! boot VCL) counts a drift event; with `drift = "enforce"` it is sent the target again,
//! with `"report"` it is only flagged — except a varnishd back on its boot VCL, which is
//! always restored. A (re)connecting session always converges.
//!
//! Locking: one `std::sync::Mutex`, never held across an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use proto::edge::{ApplyConfig, ConfigResult, ConfigStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bundle::store::{ConfigStore, StoreError};
use crate::bundle::vars::Vars;
use crate::bundle::{self, Bundle, BundleError};
use crate::clock::now_ms;
pub mod config;
mod metrics;
pub mod redact;

pub use config::{DriftPolicy, RolloutConfig};

/// An apply with no answer is sent again after this long.
const IN_FLIGHT_TIMEOUT: Duration = Duration::from_secs(180);
/// A failed apply (not a compile error on a rollout, which stops it) is retried after this.
const RETRY_FAILED: Duration = Duration::from_secs(30);
/// How often the driver re-evaluates phases.
const TICK: Duration = Duration::from_millis(250);
/// How often sessions are woken regardless, so in-flight and retry timeouts are noticed.
const WAKE_EVERY_TICKS: u32 = 20;
/// Versions remembered as having completed a rollout (for `rollback` without a version).
const HISTORY: usize = 100;

/// Rollout state that survives restarts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    /// The version the whole fleet last reached.
    pub current: Option<String>,
    /// Versions that completed a rollout, oldest first.
    #[serde(default)]
    pub history: Vec<String>,
    pub rollout: Option<Rollout>,
    #[serde(default)]
    pub next_id: u64,
    /// Earlier rollouts (done, failed or superseded), oldest first, at most
    /// [`PAST_ROLLOUTS`].
    #[serde(default)]
    pub past: Vec<Rollout>,
}

/// Earlier rollouts the plan keeps for `GET /api/v1/config`.
pub const PAST_ROLLOUTS: usize = 20;

/// One rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: u64,
    pub version: String,
    pub previous: Option<String>,
    pub phase: Phase,
    pub canary_region: Option<String>,
    pub started_at_ms: u64,
    pub canary_healthy_since_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub error: Option<String>,
    /// `push` or `rollback`.
    pub kind: String,
    /// What each edge ran when this rollout started, where that was the rollout it
    /// superseded: a failure puts every edge back on what it ran, never older than the
    /// fleet's `previous`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub previous_by_edge: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Canary,
    Fleet,
    Done,
    Failed,
}

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

#[derive(Debug)]
struct Sent {
    version: String,
    at: Instant,
    result: Option<Result<(), String>>,
}

#[derive(Debug)]
struct EdgeState {
    region: String,
    session: u64,
    connected: bool,
    capable: bool,
    status: Option<ConfigStatus>,
    sent: Option<Sent>,
    /// The target this session was last seen running (drift means leaving it).
    synced: Option<String>,
    /// Whether the active version differed from `synced` at the last report.
    drifting: bool,
    drift_events: u64,
    /// Wakes this edge's session alone (its status or apply result changed).
    wake: Arc<tokio::sync::Notify>,
    /// Set when another coordinator of the cluster holds this edge's session: its id and
    /// when it last reported the edge (the leader decides phases over every edge).
    remote: Option<(String, Instant)>,
}

/// How long a peer's report of its edges counts without a refresh.
const REMOTE_TTL: Duration = Duration::from_secs(5);

struct Inner {
    plan: Plan,
    edges: HashMap<String, EdgeState>,
    rendered: HashMap<(String, String), Arc<Result<ApplyConfig, String>>>,
}

/// The rollout manager; share it behind an `Arc`.
pub struct Rollouts {
    store: Arc<ConfigStore>,
    config: RolloutConfig,
    regions: BTreeMap<String, Vars>,
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    /// `true` while this coordinator leads its cluster (always, embedded): only then do
    /// phases move and the plan get written. Followers take the leader's plan instead.
    leading: std::sync::OnceLock<watch::Receiver<bool>>,
}

/// Where one edge's config is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigState {
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
pub struct EdgeConfigView {
    pub id: String,
    pub region: String,
    pub connected: bool,
    pub state: ConfigState,
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
pub struct ConfigView {
    /// The version the fleet is heading to (the rollout's, else `current`).
    pub desired: Option<String>,
    pub current: Option<String>,
    pub rollout: Option<Rollout>,
    /// Why the rollout is not moving, if it is waiting.
    pub waiting: Option<String>,
    pub canary_region: Option<String>,
    pub canary_wait_s: u64,
    pub drift_policy: DriftPolicy,
    pub edges: Vec<EdgeConfigView>,
    /// Earlier rollouts, newest first (a superseded one ended in the phase it was in).
    #[serde(default)]
    pub past_rollouts: Vec<Rollout>,
}

impl Rollouts {
    pub fn new(
        store: Arc<ConfigStore>,
        config: RolloutConfig,
        regions: BTreeMap<String, Vars>,
    ) -> Result<Arc<Self>, StoreError> {
        let plan = store.load_plan::<Plan>()?.unwrap_or_default();
        Ok(Arc::new(Rollouts {
            store,
            config,
            regions,
            inner: Mutex::new(Inner {
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

    /// Follows the plan in etcd (a no-op with the embedded store) until `shutdown`.
    pub async fn follow_plan(self: Arc<Self>, shutdown: CancellationToken) {
        use etcd::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};
        let Some((etcd, key)) = self.store.plan_key() else {
            return;
        };
        while !shutdown.is_cancelled() {
            // Read, then watch from the next revision (a change in between is not missed).
            let rev = match tokio::time::timeout(Duration::from_secs(5), async {
                let resp = etcd
                    .range(etcd::etcdserverpb::RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    })
                    .await?;
                if let Some(plan) = resp
                    .kvs
                    .first()
                    .and_then(|kv| serde_json::from_slice::<Plan>(&kv.value).ok())
                {
                    self.replace_plan(plan);
                }
                Ok::<i64, tonic::Status>(resp.header.map(|h| h.revision).unwrap_or(0))
            })
            .await
            {
                Ok(Ok(rev)) => rev,
                _ => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let _ = tx
                .send(WatchRequest {
                    request_union: Some(watch_request::RequestUnion::CreateRequest(
                        WatchCreateRequest {
                            key: key.clone(),
                            start_revision: rev + 1,
                            ..Default::default()
                        },
                    )),
                })
                .await;
            let Ok(stream) = etcd
                .watch()
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            let mut stream = stream.into_inner();
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = stream.message() => m,
                };
                let Ok(Some(resp)) = msg else { break };
                if resp.canceled || resp.compact_revision > 0 {
                    break;
                }
                for ev in resp.events {
                    if let Some(plan) = ev
                        .kv
                        .and_then(|kv| serde_json::from_slice::<Plan>(&kv.value).ok())
                    {
                        self.replace_plan(plan);
                    }
                }
            }
        }
    }

    /// Replaces what coordinator `peer` reports of the edges it holds (their config
    /// state from its `GET /api/v1/config?scope=local`), for the leader's phase decisions.
    pub fn set_remote(&self, peer: &str, views: Vec<EdgeConfigView>) {
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
            let sent = (v.state == ConfigState::Failed)
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
                    ConfigState::Failed => String::new(),
                    _ => v.error.clone().unwrap_or_default(),
                },
            };
            inner.edges.insert(
                v.id.clone(),
                EdgeState {
                    region: v.region.clone(),
                    session: u64::MAX,
                    connected: v.connected,
                    capable: v.state != ConfigState::Unsupported,
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

    pub fn store(&self) -> &ConfigStore {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes when something changes that could produce an apply on any edge (a push, a
    /// rollback, a rollout phase, an edge joining or leaving).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Wakes when something changes that concerns `edge` alone (its status report or an
    /// apply result): at a thousand edges a report must not wake every session. `None`
    /// before the edge's first [`Rollouts::connect`].
    pub fn subscribe_edge(&self, edge: &str) -> Option<Arc<tokio::sync::Notify>> {
        self.lock().edges.get(edge).map(|e| e.wake.clone())
    }

    /// Wakes `edge`'s session (a stored permit if it is busy: no wake-up is lost).
    fn wake(&self, edge: &str) {
        if let Some(w) = self.subscribe_edge(edge) {
            w.notify_one();
        }
    }

    /// A session started for `edge` (`capable`: it announced the config capability).
    pub fn connect(&self, edge: &str, region: &str, session: u64, capable: bool) {
        let mut inner = self.lock();
        let e = inner
            .edges
            .entry(edge.to_owned())
            .or_insert_with(|| EdgeState {
                region: region.to_owned(),
                session,
                connected: true,
                capable,
                status: None,
                sent: None,
                synced: None,
                drifting: false,
                drift_events: 0,
                wake: Arc::new(tokio::sync::Notify::new()),
                remote: None,
            });
        e.remote = None;
        e.region = region.to_owned();
        e.session = session;
        e.connected = true;
        e.capable = capable;
        e.status = None;
        e.sent = None;
        e.synced = None;
        e.drifting = false;
        drop(inner);
        self.bump();
    }

    pub fn disconnect(&self, edge: &str, session: u64) {
        let mut inner = self.lock();
        if let Some(e) = inner.edges.get_mut(edge).filter(|e| e.session == session) {
            e.connected = false;
        }
        drop(inner);
        self.bump();
    }

    /// The agent's periodic report of what varnishd runs.
    pub fn on_status(&self, edge: &str, session: u64, status: ConfigStatus) {
        let mut inner = self.lock();
        let Inner { plan, edges, .. } = &mut *inner;
        let Some(e) = edges.get_mut(edge).filter(|e| e.session == session) else {
            return;
        };
        let target = target(plan, &e.region, edge).map(str::to_owned);
        let active = status.active_version.clone();
        if !status.admin_error.is_empty() {
            // Nothing known about varnishd right now; judge drift when it answers again.
        } else if target.as_deref() == Some(active.as_str()) && !active.is_empty() {
            if e.sent
                .as_ref()
                .is_some_and(|s| Some(&s.version) == target.as_ref())
            {
                e.sent = None; // confirmed: a later drift may send it again
            }
            e.synced = target;
            e.drifting = false;
        } else if e.synced.is_some() && e.synced == target && !e.drifting {
            e.drifting = true;
            e.drift_events += 1;
            tracing::warn!(edge, region = %e.region, active_vcl = %status.active_vcl,
                expected = ?e.synced, policy = ?self.config.drift, "config drift: edge runs a VCL the coordinator did not push");
        }
        e.status = Some(status);
        drop(inner);
        self.wake(edge);
    }

    /// The agent's answer to an apply.
    pub fn on_result(&self, edge: &str, session: u64, result: ConfigResult) {
        let mut inner = self.lock();
        if let Some(e) = inner.edges.get_mut(edge).filter(|e| e.session == session) {
            if let Some(sent) = e.sent.as_mut().filter(|s| s.version == result.version) {
                sent.result = Some(if result.ok {
                    Ok(())
                } else {
                    Err(result.error.clone())
                });
            }
            if result.ok {
                tracing::info!(edge, version = %result.version, vcl = %result.vcl_name, "config active");
            } else {
                tracing::warn!(edge, version = %result.version, error = %result.error, "config apply failed");
            }
        }
        drop(inner);
        // A phase change wakes everyone (tick); the edge's own apply state wakes it alone.
        self.tick();
        self.wake(edge);
    }

    /// The apply this session should send now, if any (and marks it in flight).
    pub fn next_apply(&self, edge: &str, session: u64) -> Option<ApplyConfig> {
        let mut inner = self.lock();
        let Inner {
            plan,
            edges,
            rendered,
        } = &mut *inner;
        let e = edges.get_mut(edge)?;
        if !e.connected || !e.capable || e.session != session {
            return None;
        }
        let target = target(plan, &e.region, edge)?.to_owned();
        let status = e.status.as_ref()?; // wait for the agent's first report
        if status.active_version == target || !status.admin_error.is_empty() {
            return None; // in sync, or varnishd unreachable (restarting): wait for it
        }
        if let Some(sent) = e.sent.as_ref().filter(|s| s.version == target) {
            let wait = match sent.result {
                Some(Err(_)) => RETRY_FAILED,
                _ => IN_FLIGHT_TIMEOUT,
            };
            if sent.at.elapsed() < wait {
                return None;
            }
        }
        if self.config.drift == DriftPolicy::Report
            && e.synced.as_deref() == Some(target.as_str())
            && status.active_vcl != "boot"
        {
            return None; // drift is only reported
        }
        let apply = rendered
            .entry((target.clone(), e.region.clone()))
            .or_insert_with(|| Arc::new(self.render(&target, &e.region)))
            .clone();
        match &*apply {
            Ok(apply) => {
                e.sent = Some(Sent {
                    version: target,
                    at: Instant::now(),
                    result: None,
                });
                Some(apply.clone())
            }
            Err(msg) => {
                e.sent = Some(Sent {
                    version: target,
                    at: Instant::now(),
                    result: Some(Err(msg.clone())),
                });
                None
            }
        }
    }

    fn render(&self, version: &str, region: &str) -> Result<ApplyConfig, String> {
        let stored = self
            .store
            .get(version)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("version {version} is not in the store"))?;
        let vars = self
            .regions
            .get(region)
            .cloned()
            .unwrap_or_else(|| Vars::for_region(region, &BTreeMap::new()));
        let files = bundle::render(&stored.bundle, &vars)
            .map_err(|e| format!("cannot render for region {region}: {e}"))?;
        Ok(ApplyConfig {
            version: version.to_owned(),
            files: files
                .into_iter()
                .map(|(n, t)| (n, t.into_bytes()))
                .collect(),
            keep: self.config.keep_vcls,
            health_path: self.config.health_path.clone().unwrap_or_default(),
            health_host: self.config.health_host.clone(),
        })
    }

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
        advance(&mut inner, &self.config);
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
                    .filter(|(_, e)| e.status.as_ref().is_some_and(|s| s.active_version == v))
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
        advance(&mut inner, &self.config);
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

    /// The active version an edge reports, for `/api/v1/edges`.
    pub fn active_version(&self, edge: &str) -> Option<String> {
        let inner = self.lock();
        inner
            .edges
            .get(edge)
            .and_then(|e| e.status.as_ref())
            .map(|s| s.active_version.clone())
            .filter(|v| !v.is_empty())
    }

    pub fn view(&self) -> ConfigView {
        self.view_scoped(false)
    }

    /// [`Self::view`]; with `local`, only the edges whose sessions this coordinator holds.
    pub fn view_scoped(&self, local: bool) -> ConfigView {
        let inner = self.lock();
        let plan = &inner.plan;
        let desired = match &plan.rollout {
            Some(r) if r.phase != Phase::Failed => Some(r.version.clone()),
            _ => plan.current.clone(),
        };
        let mut edges: Vec<EdgeConfigView> = inner
            .edges
            .iter()
            .filter(|(_, e)| !local || e.remote.is_none())
            .map(|(id, e)| edge_view(id, e, target(plan, &e.region, id)))
            .collect();
        edges.sort_by(|a, b| (&a.region, &a.id).cmp(&(&b.region, &b.id)));
        ConfigView {
            past_rollouts: plan.past.iter().rev().cloned().collect(),
            desired,
            current: plan.current.clone(),
            rollout: plan.rollout.clone(),
            waiting: waiting(&inner, &self.config),
            canary_region: self.config.canary_region.clone(),
            canary_wait_s: self.config.canary_wait_s,
            drift_policy: self.config.drift,
            edges,
        }
    }
}

/// The version edge `edge` of `region` should run.
fn target<'a>(plan: &'a Plan, region: &str, edge: &str) -> Option<&'a str> {
    match &plan.rollout {
        None => plan.current.as_deref(),
        Some(r) => match r.phase {
            Phase::Canary if r.canary_region.as_deref() == Some(region) => Some(&r.version),
            Phase::Canary | Phase::Failed => r
                .previous_by_edge
                .get(edge)
                .map(String::as_str)
                .or(r.previous.as_deref()),
            Phase::Fleet | Phase::Done => Some(&r.version),
        },
    }
}

fn edge_view(id: &str, e: &EdgeState, target: Option<&str>) -> EdgeConfigView {
    let active = e.status.as_ref().map(|s| s.active_version.as_str());
    let sent = e
        .sent
        .as_ref()
        .filter(|s| Some(s.version.as_str()) == target);
    let state = if !e.connected {
        ConfigState::Disconnected
    } else if !e.capable {
        ConfigState::Unsupported
    } else if target.is_none() {
        ConfigState::NoTarget
    } else if active == target {
        ConfigState::InSync
    } else if let Some(s) = sent {
        match s.result {
            Some(Err(_)) => ConfigState::Failed,
            _ => ConfigState::Applying,
        }
    } else if e.drifting {
        ConfigState::Drift
    } else {
        ConfigState::Pending
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
    EdgeConfigView {
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

fn healthy(status: &ConfigStatus) -> bool {
    status.health_error.is_empty() && status.health_status < 500
}

/// The edges that count for a phase: connected, config-capable, in `region` if given.
fn counted<'a>(
    inner: &'a Inner,
    region: Option<&'a str>,
) -> impl Iterator<Item = (&'a String, &'a EdgeState)> {
    inner
        .edges
        .iter()
        .filter(move |(_, e)| e.connected && e.capable && region.is_none_or(|r| e.region == r))
}

/// The first failure reported for `version` among the counted edges.
fn failure(inner: &Inner, region: Option<&str>, version: &str) -> Option<String> {
    counted(inner, region).find_map(|(id, e)| {
        let sent = e.sent.as_ref().filter(|s| s.version == version)?;
        match &sent.result {
            Some(Err(msg)) => Some(format!("edge {id} ({}): {msg}", e.region)),
            _ => None,
        }
    })
}

fn advance(inner: &mut Inner, config: &RolloutConfig) {
    let Some(r) = inner.plan.rollout.clone() else {
        return;
    };
    let now = now_ms();
    let mut next = r.clone();
    match r.phase {
        Phase::Done | Phase::Failed => return,
        Phase::Canary => {
            let region = r.canary_region.as_deref();
            if let Some(err) = failure(inner, region, &r.version) {
                next.phase = Phase::Failed;
                next.error = Some(format!("rejected on the canary: {err}"));
            } else {
                let edges: Vec<_> = counted(inner, region).collect();
                let active = !edges.is_empty()
                    && edges.iter().all(|(_, e)| {
                        e.status
                            .as_ref()
                            .is_some_and(|s| s.active_version == r.version)
                    });
                let sick = edges.iter().find_map(|(id, e)| {
                    let s = e.status.as_ref()?;
                    (s.active_version == r.version && !healthy(s)).then(|| {
                        format!(
                            "canary edge {id} unhealthy after the switch: {}",
                            if s.health_error.is_empty() {
                                format!("health check answered {}", s.health_status)
                            } else {
                                s.health_error.clone()
                            }
                        )
                    })
                });
                if let Some(why) = sick {
                    next.phase = Phase::Failed;
                    next.error = Some(why);
                } else if active {
                    let since = *next.canary_healthy_since_ms.get_or_insert(now);
                    if now.saturating_sub(since) >= config.canary_wait_s.saturating_mul(1000) {
                        next.phase = Phase::Fleet;
                    }
                } else {
                    next.canary_healthy_since_ms = None;
                }
            }
        }
        Phase::Fleet => {
            if let Some(err) = failure(inner, None, &r.version) {
                next.phase = Phase::Failed;
                next.error = Some(err);
            } else if counted(inner, None).all(|(_, e)| {
                e.status
                    .as_ref()
                    .is_some_and(|s| s.active_version == r.version)
            }) && counted(inner, None).next().is_some()
            {
                next.phase = Phase::Done;
            }
        }
    }
    if next.phase != r.phase {
        tracing::info!(version = %r.version, from = ?r.phase, to = ?next.phase, error = ?next.error, "rollout phase");
    }
    match next.phase {
        Phase::Done => {
            next.finished_at_ms = Some(now);
            let plan = &mut inner.plan;
            plan.current = Some(r.version.clone());
            plan.history.retain(|v| v != &r.version);
            plan.history.push(r.version.clone());
            if plan.history.len() > HISTORY {
                plan.history.remove(0);
            }
        }
        Phase::Failed => next.finished_at_ms = Some(now),
        _ => {}
    }
    inner.plan.rollout = Some(next);
}

fn waiting(inner: &Inner, config: &RolloutConfig) -> Option<String> {
    let r = inner.plan.rollout.as_ref()?;
    match r.phase {
        Phase::Canary => {
            let region = r.canary_region.as_deref();
            if counted(inner, region).next().is_none() {
                Some(format!(
                    "no connected edge in canary region {}",
                    region.unwrap_or("?")
                ))
            } else if let Some(since) = r.canary_healthy_since_ms {
                let left =
                    (config.canary_wait_s * 1000).saturating_sub(now_ms().saturating_sub(since));
                Some(format!(
                    "canary healthy; fleet follows in {}s",
                    left.div_ceil(1000)
                ))
            } else {
                Some("canary edges are switching".into())
            }
        }
        Phase::Fleet => {
            let left = counted(inner, None)
                .filter(|(_, e)| {
                    e.status
                        .as_ref()
                        .is_none_or(|s| s.active_version != r.version)
                })
                .count();
            Some(format!("{left} edge(s) still switching"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(canary: Option<&str>, drift: DriftPolicy) -> (tempfile::TempDir, Arc<Rollouts>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ConfigStore::open(dir.path()).unwrap());
        let config = RolloutConfig {
            canary_region: canary.map(str::to_owned),
            canary_wait_s: 0,
            drift,
            ..RolloutConfig::default()
        };
        let mut regions = BTreeMap::new();
        for r in ["eu", "us"] {
            regions.insert(r.to_owned(), Vars::for_region(r, &BTreeMap::new()));
        }
        (dir, Rollouts::new(store, config, regions).unwrap())
    }

    fn bundle(text: &str) -> Bundle {
        let mut files = BTreeMap::new();
        files.insert("main.vcl".to_owned(), text.to_owned());
        Bundle { files }
    }

    fn report(r: &Rollouts, edge: &str, vcl: &str, version: &str) {
        r.on_status(
            edge,
            1,
            ConfigStatus {
                active_vcl: vcl.into(),
                active_version: version.into(),
                ..Default::default()
            },
        );
    }

    #[tokio::test]
    async fn a_status_report_wakes_only_its_own_edge() {
        let (_d, r) = setup(None, DriftPolicy::Enforce);
        r.connect("eu-1", "eu", 1, true);
        r.connect("us-1", "us", 1, true);
        let mut everyone = r.subscribe();
        everyone.mark_unchanged();
        let (eu, us) = (
            r.subscribe_edge("eu-1").unwrap(),
            r.subscribe_edge("us-1").unwrap(),
        );
        report(&r, "eu-1", "boot", "");
        let woke = |n: &tokio::sync::Notify| {
            let fut = n.notified();
            futures_ready(fut)
        };
        assert!(woke(&eu), "eu-1's session is woken");
        assert!(!woke(&us), "us-1's is not");
        assert!(!everyone.has_changed().unwrap(), "nor is every session");
        // A push still wakes every session.
        r.push(
            &bundle("vcl 4.1; backend b { .host = \"127.0.0.1\"; }"),
            false,
            true,
        )
        .unwrap();
        assert!(everyone.has_changed().unwrap());
    }

    /// Whether a future is ready at its first poll.
    fn futures_ready<F: std::future::Future>(fut: F) -> bool {
        let mut fut = std::pin::pin!(fut);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        fut.as_mut().poll(&mut cx).is_ready()
    }

    /// Plays an agent whose varnishd refuses `version` to compile.
    fn reject(r: &Rollouts, edge: &str, version: &str, error: &str) {
        r.on_result(
            edge,
            1,
            ConfigResult {
                version: version.to_owned(),
                ok: false,
                error: error.into(),
                ..Default::default()
            },
        );
    }

    /// Plays an agent that applies whatever it is sent.
    fn obey(r: &Rollouts, edge: &str) -> Option<String> {
        let apply = r.next_apply(edge, 1)?;
        r.on_result(
            edge,
            1,
            ConfigResult {
                version: apply.version.clone(),
                ok: true,
                ..Default::default()
            },
        );
        report(r, edge, &format!("cfg_{}", apply.version), &apply.version);
        Some(apply.version)
    }

    #[test]
    fn canary_first_then_fleet() {
        let (_d, r) = setup(Some("eu"), DriftPolicy::Enforce);
        r.connect("eu-1", "eu", 1, true);
        r.connect("us-1", "us", 1, true);
        report(&r, "eu-1", "boot", "");
        report(&r, "us-1", "boot", "");
        let v1 = r.push(&bundle("v1"), true, false).unwrap().version;
        assert_eq!(r.next_apply("us-1", 1), None, "fleet waits for the canary");
        assert_eq!(obey(&r, "eu-1").as_deref(), Some(v1.as_str()));
        r.tick(); // canary healthy, wait 0 s -> fleet
        assert_eq!(obey(&r, "us-1").as_deref(), Some(v1.as_str()));
        r.tick();
        let view = r.view();
        assert_eq!(view.current.as_deref(), Some(v1.as_str()));
        assert_eq!(view.rollout.unwrap().phase, Phase::Done);
        assert!(view.edges.iter().all(|e| e.state == ConfigState::InSync));
    }

    #[test]
    fn a_broken_push_over_a_rollout_in_flight_goes_back_to_what_ran() {
        let (_d, r) = setup(Some("eu"), DriftPolicy::Enforce);
        for (e, region) in [("eu-1", "eu"), ("us-1", "us"), ("us-2", "us")] {
            r.connect(e, region, 1, true);
            report(&r, e, "boot", "");
        }
        let v0 = r.push(&bundle("v0"), false, false).unwrap().version;
        for e in ["eu-1", "us-1", "us-2"] {
            obey(&r, e);
        }
        r.tick();
        // v1 (say, a new WAF rule) reaches the canary and one fleet edge, not yet us-2.
        let v1 = r.push(&bundle("v1"), true, false).unwrap().version;
        obey(&r, "eu-1");
        r.tick();
        obey(&r, "us-1");
        r.tick();
        // A second push while v1 is in flight is refused without --force...
        assert!(matches!(
            r.push(&bundle("broken"), true, false),
            Err(RolloutError::InFlight(v)) if v == v1
        ));
        // ...and with it, supersedes v1; the canary rejects it.
        let v2 = r.push(&bundle("broken"), true, true).unwrap().version;
        let apply = r.next_apply("eu-1", 1).unwrap();
        assert_eq!(apply.version, v2);
        reject(&r, "eu-1", &v2, "main.vcl line 1: syntax");
        r.tick();
        let view = r.view();
        assert_eq!(view.rollout.as_ref().map(|r| r.phase), Some(Phase::Failed));
        let target = |id: &str| {
            view.edges
                .iter()
                .find(|e| e.id == id)
                .and_then(|e| e.target_version.clone())
        };
        // Each edge goes back to what it ran: v1 where v1 had arrived, never older.
        assert_eq!(target("eu-1").as_deref(), Some(v1.as_str()));
        assert_eq!(target("us-1").as_deref(), Some(v1.as_str()));
        assert_eq!(target("us-2").as_deref(), Some(v0.as_str()));
        for e in ["eu-1", "us-1", "us-2"] {
            assert_eq!(r.next_apply(e, 1), None, "{e} keeps what it runs");
        }
    }

    #[test]
    fn canary_failure_stops_and_reverts() {
        let (_d, r) = setup(Some("eu"), DriftPolicy::Enforce);
        r.connect("eu-1", "eu", 1, true);
        r.connect("us-1", "us", 1, true);
        report(&r, "eu-1", "boot", "");
        report(&r, "us-1", "boot", "");
        let v1 = r.push(&bundle("v1"), false, false).unwrap().version;
        obey(&r, "eu-1");
        obey(&r, "us-1");
        r.tick();
        let v2 = r.push(&bundle("broken"), true, false).unwrap().version;
        let apply = r.next_apply("eu-1", 1).unwrap();
        assert_eq!(apply.version, v2);
        reject(&r, "eu-1", &v2, "main.vcl line 3: syntax");
        let view = r.view();
        let rollout = view.rollout.unwrap();
        assert_eq!(rollout.phase, Phase::Failed);
        assert!(rollout.error.unwrap().contains("main.vcl line 3"));
        assert_eq!(view.desired.as_deref(), Some(v1.as_str()));
        assert_eq!(r.next_apply("us-1", 1), None, "the fleet never saw v2");
        assert_eq!(r.next_apply("eu-1", 1), None, "eu-1 still runs v1");
    }

    #[test]
    fn drift_enforce_and_report() {
        for policy in [DriftPolicy::Enforce, DriftPolicy::Report] {
            let (_d, r) = setup(None, policy);
            r.connect("eu-1", "eu", 1, true);
            report(&r, "eu-1", "boot", "");
            let v1 = r.push(&bundle("v1"), false, false).unwrap().version;
            obey(&r, "eu-1");
            report(&r, "eu-1", "hand_edit", "");
            let view = r.view();
            assert!(view.edges[0].drift && view.edges[0].drift_events == 1);
            let resent = r.next_apply("eu-1", 1).map(|a| a.version);
            match policy {
                DriftPolicy::Enforce => assert_eq!(resent, Some(v1.clone())),
                DriftPolicy::Report => assert_eq!(resent, None),
            }
            // A varnishd back on its boot VCL is restored in both modes.
            report(&r, "eu-1", "boot", "");
            if policy == DriftPolicy::Report {
                assert_eq!(r.next_apply("eu-1", 1).map(|a| a.version), Some(v1));
            }
        }
    }

    #[test]
    fn an_unreachable_varnish_is_waited_for_not_sent_to() {
        let (_d, r) = setup(None, DriftPolicy::Enforce);
        r.connect("eu-1", "eu", 1, true);
        report(&r, "eu-1", "boot", "");
        let v1 = r.push(&bundle("v1"), false, false).unwrap().version;
        obey(&r, "eu-1");
        r.on_status(
            "eu-1",
            1,
            ConfigStatus {
                admin_error: "connection refused".into(),
                ..Default::default()
            },
        );
        assert_eq!(r.next_apply("eu-1", 1), None);
        assert_eq!(r.view().edges[0].drift_events, 0);
        // varnishd is back on its boot VCL: drift, and the version goes out at once.
        report(&r, "eu-1", "boot", "");
        assert_eq!(r.next_apply("eu-1", 1).map(|a| a.version), Some(v1));
    }

    #[test]
    fn rollback_and_restart_resume() {
        let (d, r) = setup(None, DriftPolicy::Enforce);
        r.connect("eu-1", "eu", 1, true);
        report(&r, "eu-1", "boot", "");
        let v1 = r.push(&bundle("v1"), false, false).unwrap().version;
        obey(&r, "eu-1");
        r.tick();
        let v2 = r.push(&bundle("v2"), false, false).unwrap().version;
        obey(&r, "eu-1");
        r.tick();
        assert_eq!(r.view().current.as_deref(), Some(v2.as_str()));
        let back = r.rollback(None).unwrap();
        assert_eq!(back.version, v1);
        // A restarted coordinator resumes the rollback.
        drop(r);
        let store = Arc::new(ConfigStore::open(d.path()).unwrap());
        let r = Rollouts::new(store, RolloutConfig::default(), BTreeMap::new()).unwrap();
        let view = r.view();
        assert_eq!(view.rollout.as_ref().map(|r| r.phase), Some(Phase::Fleet));
        assert_eq!(view.desired.as_deref(), Some(v1.as_str()));
        // The earlier rollouts survived the restart too, newest first, each as it ended.
        let past: Vec<(&str, &str, Phase)> = view
            .past_rollouts
            .iter()
            .map(|r| (r.kind.as_str(), r.version.as_str(), r.phase))
            .collect();
        assert_eq!(
            past,
            vec![
                ("push", v2.as_str(), Phase::Done),
                ("push", v1.as_str(), Phase::Done)
            ]
        );
        r.connect("eu-1", "eu", 1, true);
        report(&r, "eu-1", "cfg_v2", &v2);
        assert_eq!(obey(&r, "eu-1"), Some(v1.clone()));
        r.tick();
        assert_eq!(r.view().current.as_deref(), Some(v1.as_str()));
        assert!(r.rollback(Some("0000".into())).is_err());
    }

    #[test]
    fn push_refuses_unknown_variables() {
        let (_d, r) = setup(None, DriftPolicy::Enforce);
        let err = r
            .push(&bundle("x ${nope}"), false, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("main.vcl:1") && err.contains("nope"), "{err}");
        assert!(r.store().list().unwrap().is_empty(), "nothing stored");
    }
}
