//! The rollout plan and its phase machine: which version each edge should run
//! ([`target`]), when a rollout moves to its next phase ([`advance`]) and what it is
//! waiting for ([`waiting`]).
//!
//! Pure: these read a [`Plan`], what the counted edges report ([`Seen`]: connected and
//! bundle-capable ones) and the time they are given; they touch no store, lock or clock,
//! so every phase rule is tested here on plain values.

use std::collections::BTreeMap;

use proto::edge::ConfigStatus;
use serde::{Deserialize, Serialize};

use super::config::RolloutConfig;

/// Versions remembered as having completed a rollout (for `rollback` without a version).
pub const HISTORY: usize = 100;
/// Earlier rollouts the plan keeps for `GET /api/v1/config`.
pub const PAST_ROLLOUTS: usize = 20;

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

/// What the phase machine knows of one counted edge (connected, bundle-capable).
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub id: &'a str,
    pub region: &'a str,
    /// The agent's last report (`None` before its first).
    pub status: Option<&'a ConfigStatus>,
    /// The version of the last apply sent, and the agent's error if it refused it.
    pub failed: Option<(&'a str, &'a str)>,
}

impl Seen<'_> {
    fn runs(&self, version: &str) -> bool {
        self.status.is_some_and(|s| s.active_version == version)
    }
}

/// The version edge `edge` of `region` should run.
pub fn target<'a>(plan: &'a Plan, region: &str, edge: &str) -> Option<&'a str> {
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

fn healthy(status: &ConfigStatus) -> bool {
    status.health_error.is_empty() && status.health_status < 500
}

/// The edges in `region` (every edge with `None`).
fn counted<'a, 'b>(
    edges: &'b [Seen<'a>],
    region: Option<&'b str>,
) -> impl Iterator<Item = &'b Seen<'a>> {
    edges
        .iter()
        .filter(move |e| region.is_none_or(|r| e.region == r))
}

/// The first failure reported for `version` among the edges of `region`.
fn failure(edges: &[Seen<'_>], region: Option<&str>, version: &str) -> Option<String> {
    counted(edges, region).find_map(|e| {
        let (v, msg) = e.failed?;
        (v == version).then(|| format!("edge {} ({}): {msg}", e.id, e.region))
    })
}

/// Moves the plan's rollout along its phases, given the counted edges and the time
/// `now` (ms); a rollout that is done becomes the plan's `current`.
pub fn advance(plan: &mut Plan, edges: &[Seen<'_>], config: &RolloutConfig, now: u64) {
    let Some(r) = plan.rollout.clone() else {
        return;
    };
    let mut next = r.clone();
    match r.phase {
        Phase::Done | Phase::Failed => return,
        Phase::Canary => {
            let region = r.canary_region.as_deref();
            if let Some(err) = failure(edges, region, &r.version) {
                next.phase = Phase::Failed;
                next.error = Some(format!("rejected on the canary: {err}"));
            } else {
                let canary: Vec<_> = counted(edges, region).collect();
                let active = !canary.is_empty() && canary.iter().all(|e| e.runs(&r.version));
                let sick = canary.iter().find_map(|e| {
                    let s = e.status?;
                    (s.active_version == r.version && !healthy(s)).then(|| {
                        format!(
                            "canary edge {} unhealthy after the switch: {}",
                            e.id,
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
            if let Some(err) = failure(edges, None, &r.version) {
                next.phase = Phase::Failed;
                next.error = Some(err);
            } else if !edges.is_empty() && edges.iter().all(|e| e.runs(&r.version)) {
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
    plan.rollout = Some(next);
}

/// Why the rollout is not moving yet, if one is in progress (`now` in ms).
pub fn waiting(
    plan: &Plan,
    edges: &[Seen<'_>],
    config: &RolloutConfig,
    now: u64,
) -> Option<String> {
    let r = plan.rollout.as_ref()?;
    match r.phase {
        Phase::Canary => {
            let region = r.canary_region.as_deref();
            if counted(edges, region).next().is_none() {
                Some(format!(
                    "no connected edge in canary region {}",
                    region.unwrap_or("?")
                ))
            } else if let Some(since) = r.canary_healthy_since_ms {
                let left = (config.canary_wait_s * 1000).saturating_sub(now.saturating_sub(since));
                Some(format!(
                    "canary healthy; fleet follows in {}s",
                    left.div_ceil(1000)
                ))
            } else {
                Some("canary edges are switching".into())
            }
        }
        Phase::Fleet => {
            let left = edges.iter().filter(|e| !e.runs(&r.version)).count();
            Some(format!("{left} edge(s) still switching"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(version: &str) -> ConfigStatus {
        ConfigStatus {
            active_version: version.into(),
            active_vcl: format!("cfg_{version}"),
            ..Default::default()
        }
    }

    fn seen<'a>(id: &'a str, region: &'a str, status: Option<&'a ConfigStatus>) -> Seen<'a> {
        Seen {
            id,
            region,
            status,
            failed: None,
        }
    }

    /// A plan with `v0` everywhere and a rollout of `v1` in `phase`.
    fn rolling(phase: Phase, canary: Option<&str>) -> Plan {
        Plan {
            current: Some("v0".into()),
            history: vec!["v0".into()],
            rollout: Some(Rollout {
                id: 1,
                version: "v1".into(),
                previous: Some("v0".into()),
                phase,
                canary_region: canary.map(str::to_owned),
                started_at_ms: 0,
                canary_healthy_since_ms: None,
                finished_at_ms: None,
                error: None,
                kind: "push".into(),
                previous_by_edge: BTreeMap::new(),
            }),
            next_id: 1,
            past: Vec::new(),
        }
    }

    fn config(canary_wait_s: u64) -> RolloutConfig {
        RolloutConfig {
            canary_region: Some("eu".into()),
            canary_wait_s,
            ..RolloutConfig::default()
        }
    }

    #[test]
    fn the_canary_region_alone_targets_the_new_version() {
        let mut plan = rolling(Phase::Canary, Some("eu"));
        assert_eq!(target(&plan, "eu", "eu-1"), Some("v1"));
        assert_eq!(target(&plan, "us", "us-1"), Some("v0"));
        let r = plan.rollout.as_mut().unwrap();
        r.previous_by_edge.insert("us-1".into(), "v½".into());
        assert_eq!(
            target(&plan, "us", "us-1"),
            Some("v½"),
            "back to what it ran"
        );
        plan.rollout.as_mut().unwrap().phase = Phase::Fleet;
        assert_eq!(target(&plan, "us", "us-1"), Some("v1"));
        plan.rollout = None;
        assert_eq!(target(&plan, "us", "us-1"), Some("v0"));
    }

    #[test]
    fn a_healthy_canary_waits_its_time_then_the_fleet_follows() {
        let mut plan = rolling(Phase::Canary, Some("eu"));
        let (old, new) = (status("v0"), status("v1"));
        let switching = [
            seen("eu-1", "eu", Some(&old)),
            seen("us-1", "us", Some(&old)),
        ];
        advance(&mut plan, &switching, &config(60), 1_000);
        assert_eq!(plan.rollout.as_ref().unwrap().phase, Phase::Canary);
        assert_eq!(
            waiting(&plan, &switching, &config(60), 1_000).as_deref(),
            Some("canary edges are switching")
        );
        let switched = [
            seen("eu-1", "eu", Some(&new)),
            seen("us-1", "us", Some(&old)),
        ];
        advance(&mut plan, &switched, &config(60), 1_000);
        let r = plan.rollout.as_ref().unwrap();
        assert_eq!(
            (r.phase, r.canary_healthy_since_ms),
            (Phase::Canary, Some(1_000))
        );
        assert_eq!(
            waiting(&plan, &switched, &config(60), 31_000).as_deref(),
            Some("canary healthy; fleet follows in 30s")
        );
        advance(&mut plan, &switched, &config(60), 60_999);
        assert_eq!(plan.rollout.as_ref().unwrap().phase, Phase::Canary);
        advance(&mut plan, &switched, &config(60), 61_000);
        assert_eq!(plan.rollout.as_ref().unwrap().phase, Phase::Fleet);
        assert_eq!(
            waiting(&plan, &switched, &config(60), 61_000).as_deref(),
            Some("1 edge(s) still switching")
        );
        let everywhere = [
            seen("eu-1", "eu", Some(&new)),
            seen("us-1", "us", Some(&new)),
        ];
        advance(&mut plan, &everywhere, &config(60), 62_000);
        let r = plan.rollout.as_ref().unwrap();
        assert_eq!((r.phase, r.finished_at_ms), (Phase::Done, Some(62_000)));
        assert_eq!(plan.current.as_deref(), Some("v1"));
        assert_eq!(plan.history, ["v0", "v1"]);
        assert_eq!(waiting(&plan, &everywhere, &config(60), 62_000), None);
    }

    #[test]
    fn a_canary_that_leaves_the_version_restarts_its_wait() {
        let mut plan = rolling(Phase::Canary, Some("eu"));
        let (old, new) = (status("v0"), status("v1"));
        advance(
            &mut plan,
            &[seen("eu-1", "eu", Some(&new))],
            &config(60),
            1_000,
        );
        advance(
            &mut plan,
            &[seen("eu-1", "eu", Some(&old))],
            &config(60),
            2_000,
        );
        let r = plan.rollout.as_ref().unwrap();
        assert_eq!((r.phase, r.canary_healthy_since_ms), (Phase::Canary, None));
    }

    #[test]
    fn a_refusal_or_a_sick_canary_fails_the_rollout() {
        let old = status("v0");
        let mut plan = rolling(Phase::Canary, Some("eu"));
        let refused = [Seen {
            failed: Some(("v1", "main.vcl line 3: syntax")),
            ..seen("eu-1", "eu", Some(&old))
        }];
        advance(&mut plan, &refused, &config(0), 5);
        let r = plan.rollout.as_ref().unwrap();
        assert_eq!((r.phase, r.finished_at_ms), (Phase::Failed, Some(5)));
        assert_eq!(
            r.error.as_deref(),
            Some("rejected on the canary: edge eu-1 (eu): main.vcl line 3: syntax")
        );
        assert_eq!(
            target(&plan, "eu", "eu-1"),
            Some("v0"),
            "back to the old one"
        );
        assert_eq!(plan.current.as_deref(), Some("v0"));

        let mut plan = rolling(Phase::Canary, Some("eu"));
        let sick = ConfigStatus {
            health_status: 503,
            ..status("v1")
        };
        advance(&mut plan, &[seen("eu-1", "eu", Some(&sick))], &config(0), 5);
        let r = plan.rollout.as_ref().unwrap();
        assert_eq!(r.phase, Phase::Failed);
        assert_eq!(
            r.error.as_deref(),
            Some("canary edge eu-1 unhealthy after the switch: health check answered 503")
        );

        // A refusal of another version (an older apply) does not count.
        let mut plan = rolling(Phase::Fleet, None);
        let other = [Seen {
            failed: Some(("v0", "old")),
            ..seen("us-1", "us", Some(&old))
        }];
        advance(&mut plan, &other, &config(0), 5);
        assert_eq!(plan.rollout.as_ref().unwrap().phase, Phase::Fleet);
    }

    #[test]
    fn no_edge_means_no_progress() {
        let mut plan = rolling(Phase::Canary, Some("eu"));
        let new = status("v1");
        let elsewhere = [seen("us-1", "us", Some(&new))];
        advance(&mut plan, &elsewhere, &config(0), 5);
        assert_eq!(plan.rollout.as_ref().unwrap().phase, Phase::Canary);
        assert_eq!(
            waiting(&plan, &elsewhere, &config(0), 5).as_deref(),
            Some("no connected edge in canary region eu")
        );
        let mut plan = rolling(Phase::Fleet, None);
        advance(&mut plan, &[], &config(0), 5);
        assert_eq!(
            plan.rollout.as_ref().unwrap().phase,
            Phase::Fleet,
            "not done"
        );
    }

    #[test]
    fn history_keeps_the_last_versions_once_each() {
        let mut plan = rolling(Phase::Fleet, None);
        plan.history = (0..HISTORY).map(|i| format!("h{i}")).collect();
        plan.history[3] = "v1".into();
        let new = status("v1");
        advance(&mut plan, &[seen("eu-1", "eu", Some(&new))], &config(0), 5);
        assert_eq!(plan.history.len(), HISTORY);
        assert_eq!(plan.history.last().map(String::as_str), Some("v1"));
        assert_eq!(plan.history.iter().filter(|v| *v == "v1").count(), 1);
    }
}
