//! Per-edge dispatch and drift: what each edge runs, what was sent to it, and the one
//! apply its session should send next ([`Rollouts::next_apply`]).
//!
//! Pull-based: a session asks after any change and gets an [`ApplyConfig`] only when its
//! edge's active version differs from its target and nothing is in flight (an apply with
//! no answer is sent again after [`IN_FLIGHT_TIMEOUT`], a failed one after
//! [`RETRY_FAILED`]). So a slow VCL compile on one edge holds back nobody else, and
//! nothing here waits on an edge.
//!
//! Drift: an edge that ran its target and then runs something else (a hand `vcl.use`, a
//! varnishd restarted with its boot VCL) counts a drift event; with `drift = "enforce"`
//! it is sent the target again, with `"report"` it is only flagged, except a varnishd
//! back on its boot VCL, which is always restored. A (re)connecting session always
//! converges. Rendered bundles are kept per (version, region), so a thousand edges of
//! one region render once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::edge::{ApplyConfig, ConfigResult, ConfigStatus};

use super::config::DriftPolicy;
use super::plan::{target, Seen};
use super::{Inner, Rollouts};
use crate::bundle::{self, vars::Vars};

/// An apply with no answer is sent again after this long.
pub const IN_FLIGHT_TIMEOUT: Duration = Duration::from_secs(180);
/// A failed apply (not a compile error on a rollout, which stops it) is retried after this.
pub const RETRY_FAILED: Duration = Duration::from_secs(30);
/// How long a peer's report of its edges counts without a refresh.
pub const REMOTE_TTL: Duration = Duration::from_secs(5);

/// The last apply sent to an edge, and its answer once there is one.
#[derive(Debug)]
pub(super) struct Sent {
    pub version: String,
    pub at: Instant,
    pub result: Option<Result<(), String>>,
}

/// What the coordinator knows of one edge's bundle.
#[derive(Debug)]
pub(super) struct EdgeState {
    pub region: String,
    pub session: u64,
    pub connected: bool,
    pub capable: bool,
    pub status: Option<ConfigStatus>,
    pub sent: Option<Sent>,
    /// The target this session was last seen running (drift means leaving it).
    pub synced: Option<String>,
    /// Whether the active version differed from `synced` at the last report.
    pub drifting: bool,
    pub drift_events: u64,
    /// Wakes this edge's session alone (its status or apply result changed).
    pub wake: Arc<tokio::sync::Notify>,
    /// Set when another coordinator of the cluster holds this edge's session: its id and
    /// when it last reported the edge (the leader decides phases over every edge).
    pub remote: Option<(String, Instant)>,
}

impl EdgeState {
    /// What the phase machine sees of this edge; `None` when it does not count
    /// (disconnected, or without bundle support).
    pub fn seen<'a>(&'a self, id: &'a str) -> Option<Seen<'a>> {
        (self.connected && self.capable).then(|| Seen {
            id,
            region: &self.region,
            status: self.status.as_ref(),
            failed: self.sent.as_ref().and_then(|s| match &s.result {
                Some(Err(msg)) => Some((s.version.as_str(), msg.as_str())),
                _ => None,
            }),
        })
    }

    /// Whether the edge reports running `version`.
    pub fn runs(&self, version: &str) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.active_version == version)
    }
}

impl Rollouts {
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
    pub fn on_result(&self, edge: &str, session: u64, mut result: ConfigResult) {
        let mut inner = self.lock();
        if let Some(e) = inner.edges.get_mut(edge).filter(|e| e.session == session) {
            // A compile error quotes the source line, which may hold the warm token: it
            // is stored, shown and logged as `${warm_token}`.
            if let Some(vars) = self.regions.get(&e.region) {
                result.error = vars.redact(&result.error);
            }
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

    /// Stored version `version` rendered for `region`, as the agent receives it.
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
}
