//! The cluster's edges as one answer: this coordinator's sessions merged with the views
//! its peers relayed, refusals from every coordinator added, lag in entries and seconds,
//! and where one purge stands on each edge ([`EdgeRegistry::progress`]).
//!
//! An edge two coordinators know (it moved) is listed once, where it is connected. A peer
//! silent for [`REMOTE_TTL`] leaves its edges shown disconnected (its regions read
//! `agent_lost`, not `no_agents`). A purge's `applied_at` is the same on every
//! coordinator: the first ack point covering it, local or relayed alike (the oldest
//! known once history was thinned).

use daemon::sync::Recover;
use std::collections::HashMap;
use std::time::SystemTime;

use super::view::{fmt_time, merge_refusals, with_lag, EdgeRefusals, EdgeView, PurgeProgress};
use super::{EdgeRegistry, REMOTE_TTL};
use crate::purge::log::PurgeLog;

impl EdgeRegistry {
    /// The highest purge sequence the edge has applied, if it is known: from its
    /// session here, else from the coordinator that holds it (as of its last report).
    pub fn applied_seq(&self, edge_id: &str) -> Option<u64> {
        let local = self
            .edges
            .get(edge_id)
            .map(|e| (e.connected, e.applied_seq));
        if let Some((true, seq)) = local {
            return Some(seq);
        }
        let remote = self.remote.locked();
        remote
            .values()
            .filter(|(at, _)| at.elapsed() < REMOTE_TTL)
            .flat_map(|(_, edges)| edges.iter())
            .find(|e| e.id == edge_id && e.connected)
            .map(|e| e.applied_seq)
            .or(local.map(|(_, seq)| seq))
    }

    /// Every edge of the cluster, sorted by id, with lag computed against `head`: this
    /// coordinator's own, and those other coordinators reported. A coordinator that has
    /// not reported for [`REMOTE_TTL`] (it died, or is cut off) leaves its edges shown
    /// disconnected, as a dead local session does: a region whose agents were all on it
    /// reads `agent_lost`, not `no_agents`. An edge both know (it moved) is shown where
    /// it is connected.
    pub fn list(&self, head: u64) -> Vec<EdgeView> {
        let mut out = self.list_local(head);
        let remote = self.remote.locked();
        for (peer, (at, edges)) in remote.iter() {
            let silent = at.elapsed() >= REMOTE_TTL;
            for e in edges {
                let mut e = e.clone();
                if silent {
                    e.connected = false;
                    e.purge_failing = false;
                    e.varnish_error = None;
                }
                e.lag = head.saturating_sub(e.applied_seq);
                e.coordinator = Some(peer.clone());
                if let Some(mine) = self.refused.get(&e.id) {
                    e.session.refused_sessions = Some(match e.session.refused_sessions.take() {
                        Some(theirs) => merge_refusals(&theirs, &mine),
                        None => mine.clone(),
                    });
                }
                match out.iter_mut().find(|o| o.id == e.id) {
                    Some(o) if !o.connected && e.connected => *o = e,
                    Some(_) => {}
                    None => out.push(e),
                }
            }
        }
        drop(remote);
        let refused = self.remote_refused.locked();
        if !refused.is_empty() {
            for e in out.iter_mut() {
                let holder = e.coordinator.clone();
                add_peer_refusals(&refused, e, holder.as_deref());
            }
        }
        drop(refused);
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// [`Self::list`] with each lagging edge's `lag_s`: how long the oldest purge it has
    /// not applied has waited.
    pub fn list_with_lag(&self, log: &PurgeLog) -> Vec<EdgeView> {
        with_lag(self.list(log.head()), log)
    }

    /// Where purge `seq` stands on every edge of the cluster ([`Self::list`]): when it
    /// applied it (the first ack point covering `seq`, from this coordinator's sessions
    /// and what the others relayed alike; if history was thinned, the oldest known),
    /// and the error if it could not.
    pub fn progress(&self, seq: u64) -> Vec<(String, PurgeProgress)> {
        let views = self.list(0);
        let relayed = self.relayed.locked();
        views
            .into_iter()
            .map(|v| {
                let local = self.edges.get(&v.id);
                let local = local.as_deref();
                let remote = relayed.get(&v.id);
                let applied_at = (v.applied_seq >= seq).then(|| {
                    let covering = [
                        local.and_then(|e| e.acks.covering(seq)),
                        remote.and_then(|r| r.acks.covering(seq)),
                    ];
                    let oldest = [
                        local.and_then(|e| e.acks.oldest()),
                        remote.and_then(|r| r.acks.oldest()),
                    ];
                    let pick = |points: [Option<(u64, u64)>; 2]| {
                        points.into_iter().flatten().map(|(_, t)| t).min()
                    };
                    pick(covering)
                        .or_else(|| pick(oldest))
                        .map(|us| SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(us))
                        .or_else(|| humantime::parse_rfc3339(&v.last_seen).ok())
                        .unwrap_or_else(SystemTime::now)
                });
                let failures = local
                    .map(|e| e.failures.iter())
                    .into_iter()
                    .flatten()
                    .chain(remote.map(|r| r.failures.iter()).into_iter().flatten());
                let refused = failures
                    .filter(|f| f.first_seq <= seq && seq <= f.last_seq)
                    .min_by_key(|f| f.first_seq)
                    .map(|f| format!("varnish refused it; applied as a full ban: {}", f.error));
                let failing = if v.coordinator.is_none() {
                    local.and_then(|e| e.last_error.clone())
                } else {
                    remote.and_then(|r| r.failing.clone())
                };
                let error = match failing {
                    _ if refused.is_some() => refused,
                    Some((s, msg)) if applied_at.is_none() && s <= seq => Some(msg),
                    _ => None,
                };
                let progress = PurgeProgress {
                    applied_at: applied_at.map(fmt_time),
                    applied_at_us: applied_at.and_then(|t| {
                        t.duration_since(std::time::UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_micros() as u64)
                    }),
                    error,
                };
                (v.id, progress)
            })
            .collect()
    }
}

/// Adds to `e` the refusals of its id that peers other than `holder` made (the
/// holder's are in its row already).
fn add_peer_refusals(
    remote: &HashMap<String, Vec<EdgeRefusals>>,
    e: &mut EdgeView,
    holder: Option<&str>,
) {
    for (peer, list) in remote {
        if Some(peer.as_str()) == holder {
            continue;
        }
        if let Some(r) = list.iter().find(|r| r.edge == e.id) {
            e.session.refused_sessions = Some(match e.session.refused_sessions.take() {
                Some(known) => merge_refusals(&known, &r.refused),
                None => r.refused.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use tokio_util::sync::CancellationToken;

    use super::super::fixtures::{from, hello};
    use super::super::view::RefusedSessions;
    use super::*;

    #[test]
    fn a_silent_coordinators_edges_read_disconnected_and_a_moved_edge_where_it_is() {
        let reg = EdgeRegistry::default();
        let mut moved = EdgeView::new("eu-2", "eu");
        moved.applied_seq = 7;
        reg.set_remote("c2", vec![EdgeView::new("eu-1", "eu"), moved]);
        assert!(reg.list(10).iter().all(|e| e.connected));
        assert_eq!(reg.applied_seq("eu-2"), Some(7));
        // c2 falls silent; eu-2's agent comes here.
        reg.remote.locked().get_mut("c2").unwrap().0 -= REMOTE_TTL * 2;
        let _h = reg.connect(hello("eu-2"), 9, &CancellationToken::new());
        let list = reg.list(10);
        let view = |id: &str| list.iter().find(|e| e.id == id).unwrap().clone();
        assert_eq!(list.len(), 2);
        assert!(!view("eu-1").connected, "c2's edge is not shown connected");
        assert_eq!(view("eu-1").coordinator.as_deref(), Some("c2"));
        assert!(view("eu-2").connected);
        assert_eq!(
            view("eu-2").coordinator,
            None,
            "shown where it is connected"
        );
        assert_eq!(reg.applied_seq("eu-2"), Some(9));
    }

    #[test]
    fn every_coordinator_shows_the_refusals_any_of_them_made() {
        let refusal = |count| RefusedSessions {
            count,
            last_addr: "10.0.0.9:4000".into(),
            last_at: fmt_time(SystemTime::now()),
            reason: "edge id eu-1 already has a live session".into(),
        };
        // This coordinator holds nothing; c3 holds eu-1 and shows its own refusals in
        // its row; c2 refused a copy too, as its self record says.
        let reg = EdgeRegistry::default();
        let mut held = EdgeView::new("eu-1", "eu");
        held.session.refused_sessions = Some(refusal(5));
        reg.set_remote("c3", vec![held]);
        let of = |reg: &EdgeRegistry| {
            reg.list(0)[0]
                .session
                .refused_sessions
                .as_ref()
                .map(|r| r.count)
        };
        assert_eq!(of(&reg), Some(5));
        let mine = |count| EdgeRefusals {
            edge: "eu-1".into(),
            refused: refusal(count),
        };
        reg.set_remote_refusals("c2", vec![mine(2)]);
        assert_eq!(of(&reg), Some(7), "c2's refusals added");
        reg.set_remote_refusals("c3", vec![mine(5)]);
        assert_eq!(of(&reg), Some(7), "the holder's are in its row already");
        // Held here: every peer's refusals are added.
        let local = EdgeRegistry::default();
        let root = CancellationToken::new();
        let _s = local
            .try_connect(hello("eu-1"), from("10.0.0.1:1", 60_000, false), 0, &root)
            .unwrap();
        local.set_remote_refusals("c2", vec![mine(2)]);
        assert_eq!(of(&local), Some(2));
        assert_eq!(local.local_refusals(), vec![]);
        reg.set_remote_refusals("c2", vec![]);
        assert_eq!(of(&reg), Some(5));
    }

    #[test]
    fn cumulative_acks_answer_progress() {
        let reg = EdgeRegistry::default();
        let root = CancellationToken::new();
        let h = reg.connect(hello("a"), 0, &root);
        reg.ack(&h, 3);
        reg.ack(&h, 7);
        let p = reg.progress(5);
        assert!(p[0].1.applied_at.is_some());
        assert!(reg.progress(8)[0].1.applied_at.is_none());
        assert_eq!(reg.list(10)[0].lag, 3);
    }
}
