//! What the other coordinators hold: each peer's edge list as it last told us, whether a
//! silent peer is gone for real or only out of sight, and the ack points and purge
//! failures they relay ([`EdgeHistory`]), so that every coordinator answers
//! `GET /api/v1/purges/{seq}` the same.
//!
//! A peer's list replaces its previous one whole; relayed ack points are merged, each
//! sequence once, within the [`super::acks`] budget; one answer carries at most
//! [`RELAYED_ACK_POINTS`] points and [`RELAYED_FAILURES`] failures per edge. A peer's
//! view is checked for duplicate sessions before it is stored
//! ([`EdgeRegistry::settle_duplicates`]).

use daemon::sync::Recover;
use std::collections::VecDeque;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::acks::AckHistory;
use super::sessions::FAILURES_KEPT;
use super::view::{EdgeView, PurgeFailure};
use super::{EdgeRegistry, REMOTE_TTL};

/// Ack points relayed per edge in one `scope=local` answer, and purge failures: the
/// byte bound of what an edge adds to it (about 40 bytes of JSON a point, at most 1 KB
/// an error: under 10 KB an edge, 10 MB at a thousand edges, within the reader's
/// limit). The reader asks only for what is newer than it has, so at one round a second
/// every ack reaches it unless an edge acks more often than that.
pub const RELAYED_ACK_POINTS: usize = 128;
pub const RELAYED_FAILURES: usize = 4;
/// How far back of the newest point it has the reader asks again (points taken by
/// concurrent acks may land a moment out of order).
const RELAY_SLACK_US: u64 = 5_000_000;

/// How far an edge's purges went, as the coordinator holding its session tells the
/// others (`GET /api/v1/edges?scope=local&acks_since_us=T`), so every coordinator
/// answers `GET /api/v1/purges/{seq}` with the same `applied_at` and `error`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EdgeHistory {
    /// `(seq, applied_at_us)` ack points taken at or after the asked time, oldest first.
    pub acks: Vec<(u64, u64)>,
    /// The purge the edge fails to apply and retries, with the error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing: Option<(u64, String)>,
    /// Purges varnish refused that it applied as a full ban instead (the newest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<PurgeFailure>,
}

/// One edge of a `scope=local` answer, with its [`EdgeHistory`] when asked for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalEdge {
    #[serde(flatten)]
    pub view: EdgeView,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<EdgeHistory>,
}

/// What the other coordinators relayed about an edge's purges (merged over time and
/// over coordinators: an edge that moved has its acks from each).
#[derive(Debug, Default)]
pub(super) struct Relayed {
    pub(super) acks: AckHistory,
    pub(super) failures: VecDeque<PurgeFailure>,
    pub(super) failing: Option<(u64, String)>,
}

impl EdgeRegistry {
    /// Replaces what coordinator `peer` holds (its own sessions only).
    pub fn set_remote(&self, peer: &str, edges: Vec<EdgeView>) {
        self.settle_duplicates(peer, &edges);
        let mut remote = self.remote.locked();
        remote.insert(peer.to_owned(), (std::time::Instant::now(), edges));
        drop(remote);
        self.gone.locked().remove(peer);
    }

    /// Tells which coordinators etcd lists now (read from an etcd that answered): a peer
    /// that reported edges and is not listed is gone for real (its lease expired), one
    /// listed again is back.
    pub fn keep_peers(&self, listed: &[String]) {
        let remote = self.remote.locked();
        let mut gone = self.gone.locked();
        gone.clear();
        gone.extend(remote.keys().filter(|p| !listed.contains(p)).cloned());
    }

    /// The peers out of sight: they have not reported for [`REMOTE_TTL`], and etcd has
    /// not said they are gone (it may be unreadable, or their lease still holds). Their
    /// edges' state is not known (the monitor reads their regions `unknown`).
    pub fn unseen_peers(&self) -> Vec<String> {
        let remote = self.remote.locked();
        let gone = self.gone.locked();
        remote
            .iter()
            .filter(|(peer, (at, _))| at.elapsed() >= REMOTE_TTL && !gone.contains(*peer))
            .map(|(peer, _)| peer.clone())
            .collect()
    }

    /// [`Self::set_remote`] with each edge's relayed history, which is merged into what
    /// `progress` answers from.
    pub fn set_remote_with_history(&self, peer: &str, edges: Vec<LocalEdge>) {
        let mut views = Vec::with_capacity(edges.len());
        {
            let mut relayed = self.relayed.locked();
            let mut newest = 0;
            for LocalEdge { view, history } in edges {
                if let Some(h) = history {
                    let r = relayed.entry(view.id.clone()).or_default();
                    let points: Vec<(u64, u64)> =
                        h.acks.into_iter().take(RELAYED_ACK_POINTS).collect();
                    newest = points.iter().map(|p| p.1).fold(newest, u64::max);
                    r.acks.merge(&points);
                    for f in h.failures.into_iter().take(RELAYED_FAILURES) {
                        let known = r
                            .failures
                            .iter()
                            .any(|k| (k.first_seq, k.last_seq) == (f.first_seq, f.last_seq));
                        if !known {
                            r.failures.push_back(f);
                        }
                    }
                    while r.failures.len() > FAILURES_KEPT {
                        r.failures.pop_front();
                    }
                    if view.connected {
                        r.failing = h.failing;
                    }
                }
                views.push(view);
            }
            if newest > 0 {
                let mut until = self.relayed_until.locked();
                let at = until.entry(peer.to_owned()).or_default();
                *at = (*at).max(newest);
            }
        }
        self.set_remote(peer, views);
    }

    /// From when to ask `peer` for its edges' acks (`acks_since_us`): a little before
    /// the newest it relayed, or from the start.
    pub fn acks_since(&self, peer: &str) -> u64 {
        self.relayed_until
            .locked()
            .get(peer)
            .map_or(0, |t| t.saturating_sub(RELAY_SLACK_US))
    }

    /// [`Self::list_local`] with each edge's history from `since_us` on (bounded:
    /// [`RELAYED_ACK_POINTS`], [`RELAYED_FAILURES`]), for the other coordinators.
    pub fn list_local_with_history(&self, head: u64, since_us: u64) -> Vec<LocalEdge> {
        self.list_local(head)
            .into_iter()
            .map(|view| {
                let history = self.edges.get(&view.id).map(|e| {
                    let since = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(since_us);
                    EdgeHistory {
                        acks: e.acks.recent(since_us, RELAYED_ACK_POINTS),
                        failing: e.last_error.clone(),
                        failures: e
                            .failures
                            .iter()
                            .rev()
                            .filter(|f| {
                                humantime::parse_rfc3339(&f.at).map_or(true, |t| t >= since)
                            })
                            .take(RELAYED_FAILURES)
                            .cloned()
                            .collect(),
                    }
                });
                LocalEdge { view, history }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::super::fixtures::hello;
    use super::super::view::EdgeView;
    use super::super::REMOTE_TTL;
    use super::*;

    #[test]
    fn a_silent_peer_is_out_of_sight_until_etcd_says_it_is_gone() {
        let reg = EdgeRegistry::default();
        reg.set_remote("c2", vec![EdgeView::new("eu-1", "eu")]);
        reg.set_remote("c3", vec![EdgeView::new("us-1", "us")]);
        reg.keep_peers(&["c1".into(), "c2".into(), "c3".into()]);
        assert!(reg.unseen_peers().is_empty(), "both report");
        for (_, (at, _)) in reg.remote.locked().iter_mut() {
            *at -= REMOTE_TTL * 2;
        }
        let mut unseen = reg.unseen_peers();
        unseen.sort();
        assert_eq!(unseen, ["c2", "c3"], "silent, etcd not read: out of sight");
        // etcd lists c2 only: c3's lease is gone, c3 is gone for real.
        reg.keep_peers(&["c1".into(), "c2".into()]);
        assert_eq!(reg.unseen_peers(), ["c2"]);
        // c3 reports again: back.
        reg.set_remote("c3", vec![EdgeView::new("us-1", "us")]);
        assert_eq!(reg.unseen_peers(), ["c2"]);
    }

    #[test]
    fn a_peers_relayed_acks_answer_a_purges_status_as_the_holder_does() {
        let (c1, c2) = (EdgeRegistry::default(), EdgeRegistry::default());
        let root = CancellationToken::new();
        let h = c1.connect(hello("r0-1"), 0, &root);
        c1.ack(&h, 3);
        c1.ack(&h, 7);
        c1.error(&h, 8, 8, "regex too big".into(), true);
        // What c2 reads from c1 (`edges?scope=local&acks_since_us=…`), as JSON.
        let relay = |since: u64| {
            let json = serde_json::to_vec(&c1.list_local_with_history(10, since)).unwrap();
            serde_json::from_slice::<Vec<LocalEdge>>(&json).unwrap()
        };
        c2.set_remote_with_history("c1", relay(c2.acks_since("c1")));
        let same = |seq: u64| {
            let (a, b) = (c1.progress(seq), c2.progress(seq));
            assert_eq!(a.len(), 1, "{a:?}");
            assert_eq!(b.len(), 1, "c2 lists c1's edge: {b:?}");
            assert_eq!(a[0].0, b[0].0);
            assert_eq!(a[0].1.applied_at_us, b[0].1.applied_at_us, "seq {seq}");
            assert_eq!(a[0].1.applied_at, b[0].1.applied_at, "seq {seq}");
            assert_eq!(a[0].1.error, b[0].1.error, "seq {seq}");
            b[0].1.clone()
        };
        assert!(same(2).applied_at.is_some());
        assert!(same(5).applied_at.is_some());
        assert!(same(9).applied_at.is_none());
        // Later acks come with the next rounds, asked from the newest point on.
        c1.ack(&h, 9);
        c1.ack(&h, 10);
        let since = c2.acks_since("c1");
        assert!(since > 0);
        let next = relay(since);
        let acks = &next[0].history.as_ref().unwrap().acks;
        assert!(acks.iter().all(|(_, t)| *t >= since));
        let at9 = acks.iter().find(|p| p.0 == 9).unwrap().1;
        let from9 = relay(at9);
        assert!(
            from9[0]
                .history
                .as_ref()
                .unwrap()
                .acks
                .iter()
                .all(|p| p.0 >= 9),
            "only what is newer than asked"
        );
        c2.set_remote_with_history("c1", next);
        assert!(same(9).applied_at.is_some());
        assert_ne!(same(9).applied_at_us, same(5).applied_at_us);
        assert!(same(8).error.unwrap().contains("full ban"));
        // Bounded: a long burst relays the newest points only.
        for seq in 11..=1000 {
            c1.ack(&h, seq);
        }
        let burst = c1.list_local_with_history(1000, 0);
        assert_eq!(
            burst[0].history.as_ref().unwrap().acks.len(),
            RELAYED_ACK_POINTS
        );
    }
}
