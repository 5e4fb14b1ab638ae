//! Who the edges are and how far each has applied the purge log.
//!
//! [`EdgeRegistry`] is the coordinator's in-memory view of every edge that has connected
//! since it started: identity, connection state, applied sequence, and a bounded history
//! of *ack points* `(applied_seq, time)`. Acks are cumulative, so the time an edge applied
//! purge `S` is the time of its first ack point at or beyond `S`; that answers
//! `GET /api/v1/purges/{seq}` without storing anything per purge per edge.
//!
//! Entries are `DashMap` values; no guard is ever held across an `.await`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics::{collector, counter, edge_labels, gauge, DescriptorEncoder, Label, Registry};
use crate::purge::log::PurgeLog;

/// Ack points remembered per edge (16 bytes each: 16 KiB per edge, never more).
const ACK_POINTS: usize = 1024;

/// When an edge applied what: `(seq, unix µs)` ack points, oldest first, in a fixed
/// budget. When full, every other point of the older half is dropped before the new one
/// goes in (the oldest point always stays), so recent acks keep their precision, old ones
/// a coarser one (an answer
/// for an old sequence is the first remaining point at or after it: never earlier than
/// the truth), and the buffer never grows past [`ACK_POINTS`] (no doubling).
#[derive(Debug, Default)]
struct AckHistory {
    points: VecDeque<(u64, u64)>,
}

impl AckHistory {
    fn push(&mut self, seq: u64, at_us: u64) {
        self.thin();
        self.points.push_back((seq, at_us));
    }

    /// Makes room for one more point (see the type's docs).
    fn thin(&mut self) {
        if self.points.len() >= ACK_POINTS {
            let half = self.points.len() / 2;
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i > half || i % 2 == 1
            });
        }
    }

    /// Takes in points another coordinator relayed: each sequence once, in order (a
    /// point already known is kept as it is).
    fn merge(&mut self, points: &[(u64, u64)]) {
        for &(seq, at_us) in points {
            if self.points.back().is_none_or(|(s, _)| *s < seq) {
                self.push(seq, at_us);
                continue;
            }
            let i = self.points.partition_point(|(s, _)| *s < seq);
            if self.points.get(i).is_some_and(|(s, _)| *s == seq) {
                continue;
            }
            self.thin();
            let i = self.points.partition_point(|(s, _)| *s < seq);
            self.points.insert(i, (seq, at_us));
        }
    }

    /// The first point at or after `seq`, if one is known.
    fn covering(&self, seq: u64) -> Option<(u64, u64)> {
        let i = self.points.partition_point(|(s, _)| *s < seq);
        self.points.get(i).copied()
    }

    /// The newest points taken at or after `since_us`, at most `max`, oldest first.
    fn recent(&self, since_us: u64, max: usize) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .points
            .iter()
            .rev()
            .take_while(|(_, t)| *t >= since_us)
            .take(max)
            .copied()
            .collect();
        out.reverse();
        out
    }

    /// The first point at or after `seq` (the oldest known when history was thinned).
    #[cfg(test)]
    fn applied_at(&self, seq: u64) -> Option<u64> {
        let i = self.points.partition_point(|(s, _)| *s < seq);
        self.points.get(i).or(self.points.front()).map(|(_, t)| *t)
    }

    fn clear(&mut self) {
        self.points.clear();
    }
}
/// Purges an edge could only apply as a full ban, remembered per edge.
const FAILURES_KEPT: usize = 256;

/// Purges varnish refused for good on one edge: the agent banned everything instead, so
/// the promise made to Magento holds, and says so here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurgeFailure {
    pub first_seq: u64,
    pub last_seq: u64,
    pub error: String,
    pub at: String,
}

/// One edge as the registry knows it.
#[derive(Debug)]
struct Edge {
    region: String,
    connected: bool,
    session: u64,
    cancel: CancellationToken,
    applied_seq: u64,
    acks: AckHistory,
    last_seen: SystemTime,
    last_error: Option<(u64, String)>,
    failures: VecDeque<PurgeFailure>,
    full_bans: u64,
    refused_acks: u64,
    /// What the agent last said about varnishd's admin port (None: reachable).
    varnish_error: Option<String>,
    varnish_version: String,
    purge_mode: String,
    agent_version: String,
    applied_total: u64,
    sessions: u64,
    cert_not_after: Option<u64>,
}

/// What the API shows for one edge.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeView {
    pub id: String,
    pub region: String,
    pub connected: bool,
    pub applied_seq: u64,
    pub lag: u64,
    pub config_version: Option<String>,
    pub last_seen: String,
    pub purge_mode: String,
    pub varnish_version: String,
    pub agent_version: String,
    pub last_error: Option<String>,
    /// True while the agent reports that it cannot apply the next purge (it retries).
    pub purge_failing: bool,
    /// Purges varnish refused that this edge applied as a full ban instead.
    pub full_bans: u64,
    /// The agent cannot talk to its varnishd's admin port (last report).
    pub varnish_error: Option<String>,
    /// Seconds the oldest purge this edge has not applied has waited (null: none).
    pub lag_s: Option<f64>,
    /// Acks refused because they claimed more than the log holds (each dropped a session).
    pub refused_acks: u64,
    pub applied_total: u64,
    /// Sessions this edge opened since the coordinator started.
    pub sessions: u64,
    /// Expiry of the client certificate it presented (Unix seconds; null without TLS).
    pub cert_not_after: Option<u64>,
    /// The coordinator holding this edge's session, when it is another one of the
    /// cluster (absent: this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
}

impl EdgeView {
    /// A connected edge with nothing behind and nothing wrong (for tests and benches that
    /// feed views to health and routing decisions).
    pub fn new(id: &str, region: &str) -> Self {
        EdgeView {
            id: id.to_owned(),
            region: region.to_owned(),
            connected: true,
            applied_seq: 0,
            lag: 0,
            config_version: None,
            last_seen: String::new(),
            purge_mode: "ban".into(),
            varnish_version: String::new(),
            agent_version: String::new(),
            last_error: None,
            purge_failing: false,
            full_bans: 0,
            varnish_error: None,
            lag_s: None,
            refused_acks: 0,
            applied_total: 0,
            sessions: 1,
            cert_not_after: None,
            coordinator: None,
        }
    }
}

/// Per-edge state of one purge, as `GET /api/v1/purges/{seq}` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurgeProgress {
    pub applied_at: Option<String>,
    /// The same instant in microseconds since the Unix epoch.
    pub applied_at_us: Option<u64>,
    pub error: Option<String>,
}

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
struct Relayed {
    acks: AckHistory,
    failures: VecDeque<PurgeFailure>,
    failing: Option<(u64, String)>,
}

/// Details an agent gives in its Hello.
#[derive(Debug, Clone)]
pub struct EdgeHello {
    pub id: String,
    pub region: String,
    pub varnish_version: String,
    pub purge_mode: String,
    pub agent_version: String,
    /// notAfter of the verified client certificate (Unix seconds), with mTLS.
    pub cert_not_after: Option<u64>,
}

/// The registry of edges; share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct EdgeRegistry {
    edges: DashMap<String, Edge>,
    sessions: std::sync::atomic::AtomicU64,
    /// Edges other coordinators of the cluster hold sessions for, as each last told us
    /// (see `cluster`): peer id → when, and its edges.
    remote:
        std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, Vec<EdgeView>)>>,
    /// Per edge, the acks and failures the others relayed (see [`EdgeHistory`]).
    relayed: std::sync::Mutex<std::collections::HashMap<String, Relayed>>,
    /// Per peer, the newest ack time it relayed (its clock): where to ask from next.
    relayed_until: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

/// How long another coordinator's list of edges stays in ours without a refresh.
pub const REMOTE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// A connected session's claim on its edge entry.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub edge_id: String,
    pub session: u64,
    pub cancel: CancellationToken,
}

impl EdgeRegistry {
    /// Marks the edge connected under a new session, cancelling any older session of the
    /// same edge (an agent that reconnected before its old stream timed out).
    pub fn connect(
        &self,
        hello: EdgeHello,
        applied_seq: u64,
        parent: &CancellationToken,
    ) -> SessionHandle {
        let session = self
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let cancel = parent.child_token();
        let now = SystemTime::now();
        let old = {
            let mut entry = self.edges.entry(hello.id.clone()).or_insert_with(|| Edge {
                region: hello.region.clone(),
                connected: false,
                session: 0,
                cancel: CancellationToken::new(),
                applied_seq,
                acks: AckHistory::default(),
                last_seen: now,
                last_error: None,
                failures: VecDeque::new(),
                full_bans: 0,
                refused_acks: 0,
                varnish_error: None,
                varnish_version: String::new(),
                purge_mode: String::new(),
                agent_version: String::new(),
                applied_total: 0,
                sessions: 0,
                cert_not_after: None,
            });
            let e = entry.value_mut();
            let old = std::mem::replace(&mut e.cancel, cancel.clone());
            e.region = hello.region;
            e.connected = true;
            e.session = session;
            e.last_seen = now;
            e.varnish_version = hello.varnish_version;
            e.purge_mode = hello.purge_mode;
            e.agent_version = hello.agent_version;
            e.cert_not_after = hello.cert_not_after;
            e.sessions += 1;
            if applied_seq != e.applied_seq {
                // A different cursor (state lost, other log): history no longer applies.
                e.acks.clear();
                e.applied_seq = applied_seq;
            }
            old
        };
        old.cancel();
        SessionHandle {
            edge_id: hello.id,
            session,
            cancel,
        }
    }

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
        let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        remote
            .values()
            .filter(|(at, _)| at.elapsed() < REMOTE_TTL)
            .flat_map(|(_, edges)| edges.iter())
            .find(|e| e.id == edge_id && e.connected)
            .map(|e| e.applied_seq)
            .or(local.map(|(_, seq)| seq))
    }

    /// Marks the edge disconnected if `handle` is still its current session.
    pub fn disconnect(&self, handle: &SessionHandle) {
        if let Some(mut e) = self.edges.get_mut(&handle.edge_id) {
            if e.session == handle.session {
                e.connected = false;
                e.last_seen = SystemTime::now();
            }
        }
    }

    /// Records that the edge applied everything up to `seq`.
    pub fn ack(&self, handle: &SessionHandle, seq: u64) {
        let now = SystemTime::now();
        if let Some(mut e) = self.edges.get_mut(&handle.edge_id) {
            e.last_seen = now;
            if seq > e.applied_seq {
                e.applied_total += seq - e.applied_seq;
                e.applied_seq = seq;
                e.acks.push(seq, unix_us(now));
                if e.last_error.as_ref().is_some_and(|(s, _)| *s <= seq) {
                    e.last_error = None;
                }
            }
        }
    }

    /// Records a failure the agent reported: one it retries (`full_ban` false), or
    /// purges `seq..=last_seq` that varnish refused for good and the agent applied as a
    /// full ban (the ack follows).
    pub fn error(
        &self,
        handle: &SessionHandle,
        seq: u64,
        last_seq: u64,
        error: String,
        full_ban: bool,
    ) {
        let now = SystemTime::now();
        if let Some(mut e) = self.edges.get_mut(&handle.edge_id) {
            e.last_seen = now;
            if full_ban {
                e.full_bans += 1;
                e.failures.push_back(PurgeFailure {
                    first_seq: seq,
                    last_seq: last_seq.max(seq),
                    error,
                    at: fmt_time(now),
                });
                while e.failures.len() > FAILURES_KEPT {
                    e.failures.pop_front();
                }
            } else {
                e.last_error = Some((seq, error));
            }
        }
    }

    /// Counts an ack that was refused (beyond the head, or for another log).
    pub fn refused_ack(&self, handle: &SessionHandle) {
        if let Some(mut e) = self.edges.get_mut(&handle.edge_id) {
            e.refused_acks += 1;
        }
    }

    /// What the agent reports about its varnishd's admin port.
    pub fn varnish_status(&self, handle: &SessionHandle, admin_error: &str) {
        if let Some(mut e) = self.edges.get_mut(&handle.edge_id) {
            e.last_seen = SystemTime::now();
            e.varnish_error = (!admin_error.is_empty()).then(|| admin_error.to_owned());
        }
    }

    /// Refreshes `last_seen`.
    pub fn seen(&self, handle: &SessionHandle) {
        if let Some(mut e) = self.edges.get_mut(&handle.edge_id) {
            e.last_seen = SystemTime::now();
        }
    }

    /// Whether this coordinator holds `edge_id`'s session now.
    pub fn is_connected_here(&self, edge_id: &str) -> bool {
        self.edges.get(edge_id).is_some_and(|e| e.connected)
    }

    /// Replaces what coordinator `peer` holds (its own sessions only).
    pub fn set_remote(&self, peer: &str, edges: Vec<EdgeView>) {
        let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        remote.insert(peer.to_owned(), (std::time::Instant::now(), edges));
    }

    /// [`Self::set_remote`] with each edge's relayed history, which is merged into what
    /// `progress` answers from.
    pub fn set_remote_with_history(&self, peer: &str, edges: Vec<LocalEdge>) {
        let mut views = Vec::with_capacity(edges.len());
        {
            let mut relayed = self.relayed.lock().unwrap_or_else(|p| p.into_inner());
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
                let mut until = self.relayed_until.lock().unwrap_or_else(|p| p.into_inner());
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
            .lock()
            .unwrap_or_else(|p| p.into_inner())
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

    /// Every edge of the cluster, sorted by id, with lag computed against `head`: this
    /// coordinator's own, and those other coordinators reported. A coordinator that has
    /// not reported for [`REMOTE_TTL`] (it died, or is cut off) leaves its edges shown
    /// disconnected, as a dead local session does: a region whose agents were all on it
    /// reads `agent_lost`, not `no_agents`. An edge both know (it moved) is shown where
    /// it is connected.
    pub fn list(&self, head: u64) -> Vec<EdgeView> {
        let mut out = self.list_local(head);
        let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
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
                match out.iter_mut().find(|o| o.id == e.id) {
                    Some(o) if !o.connected && e.connected => *o = e,
                    Some(_) => {}
                    None => out.push(e),
                }
            }
        }
        drop(remote);
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The edges whose sessions this coordinator holds (or held), sorted by id.
    pub fn list_local(&self, head: u64) -> Vec<EdgeView> {
        let mut out: Vec<EdgeView> = self
            .edges
            .iter()
            .map(|kv| {
                let e = kv.value();
                EdgeView {
                    id: kv.key().clone(),
                    region: e.region.clone(),
                    connected: e.connected,
                    applied_seq: e.applied_seq,
                    lag: head.saturating_sub(e.applied_seq),
                    config_version: None,
                    last_seen: fmt_time(e.last_seen),
                    purge_mode: e.purge_mode.clone(),
                    varnish_version: e.varnish_version.clone(),
                    agent_version: e.agent_version.clone(),
                    last_error: e.last_error.as_ref().map(|(_, m)| m.clone()),
                    purge_failing: e.connected && e.last_error.is_some(),
                    full_bans: e.full_bans,
                    varnish_error: e.varnish_error.clone().filter(|_| e.connected),
                    lag_s: None,
                    refused_acks: e.refused_acks,
                    applied_total: e.applied_total,
                    sessions: e.sessions,
                    cert_not_after: e.cert_not_after,
                    coordinator: None,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// [`Self::list`] with each lagging edge's `lag_s`: how long the oldest purge it has
    /// not applied has waited.
    pub fn list_with_lag(&self, log: &PurgeLog) -> Vec<EdgeView> {
        with_lag(self.list(log.head()), log)
    }

    /// [`Self::list_local`] with each lagging edge's `lag_s`.
    pub fn list_local_with_lag(&self, log: &PurgeLog) -> Vec<EdgeView> {
        with_lag(self.list_local(log.head()), log)
    }

    /// Where purge `seq` stands on every edge of the cluster ([`Self::list`]): when it
    /// applied it (the first ack point covering `seq`, from this coordinator's sessions
    /// and what the others relayed alike; if history was thinned, the oldest known),
    /// and the error if it could not.
    pub fn progress(&self, seq: u64) -> Vec<(String, PurgeProgress)> {
        let views = self.list(0);
        let relayed = self.relayed.lock().unwrap_or_else(|p| p.into_inner());
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
                        local.and_then(|e| e.acks.points.front().copied()),
                        remote.and_then(|r| r.acks.points.front().copied()),
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

    /// The number of edges currently connected.
    pub fn connected(&self) -> usize {
        self.edges.iter().filter(|kv| kv.value().connected).count()
    }
}

impl EdgeRegistry {
    /// Registers the per-edge families, read from the registry at scrape time;
    /// `with_certs` adds the client certificates' expiry (mutual TLS only).
    pub fn register_metrics(
        self: &Arc<Self>,
        log: &PurgeLog,
        with_certs: bool,
        registry: &mut Registry,
    ) {
        let source = (self.clone(), log.clone(), with_certs);
        registry.register_collector(collector(source, encode_edges));
    }
}

/// Sets `lag_s` on each lagging edge of `list`: how long the oldest purge it has not
/// applied has waited.
fn with_lag(mut list: Vec<EdgeView>, log: &PurgeLog) -> Vec<EdgeView> {
    let now = crate::clock::now_us();
    for e in list.iter_mut().filter(|e| e.lag > 0) {
        e.lag_s = log
            .received_at_us(e.applied_seq + 1)
            .map(|t| now.saturating_sub(t) as f64 / 1e6);
    }
    list
}

type EdgeSource = (Arc<EdgeRegistry>, PurgeLog, bool);

/// The per-edge families, for the edges whose sessions this coordinator holds (or held
/// last): in a cluster each edge is exported by one coordinator, so sums over the
/// coordinators count it once.
fn encode_edges(source: &EdgeSource, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let (edges, log, with_certs) = source;
    let list = edges.list_local_with_lag(log);
    fn labels(v: &EdgeView) -> [(&'static str, Label<'_>); 2] {
        edge_labels(&v.region, &v.id)
    }
    type PerEdge = fn(&EdgeView) -> u64;
    let counters: [(&str, &str, PerEdge); 3] = [
        (
            "coordinator_purges_applied_total",
            "Purge log entries applied, per edge (since coordinator start).",
            |v| v.applied_total,
        ),
        (
            "coordinator_edge_purge_full_bans_total",
            "Purges varnish refused for good that the edge applied as a full ban instead.",
            |v| v.full_bans,
        ),
        (
            "coordinator_edge_acks_refused_total",
            "Acks beyond the log head (or for another log) refused; each dropped the session.",
            |v| v.refused_acks,
        ),
    ];
    for (name, help, value) in counters {
        counter(e, name, help, list.iter().map(|v| (labels(v), value(v))))?;
    }
    let gauges: [(&str, &str, PerEdge); 4] = [
        (
            "coordinator_edge_purge_lag_entries",
            "Purge log entries not yet applied, per edge.",
            |v| v.lag,
        ),
        (
            "coordinator_edge_applied_seq",
            "Highest purge sequence applied, per edge.",
            |v| v.applied_seq,
        ),
        (
            "coordinator_edge_connected",
            "Whether the edge's session is up (1) or not (0).",
            |v| u64::from(v.connected),
        ),
        (
            "coordinator_edge_purge_failing",
            "1 while the edge reports that it cannot apply its next purge (it retries).",
            |v| u64::from(v.purge_failing),
        ),
    ];
    for (name, help, value) in gauges {
        gauge(e, name, help, list.iter().map(|v| (labels(v), value(v))))?;
    }
    gauge(
        e,
        "coordinator_edge_purge_lag_seconds",
        "How long the oldest purge an edge has not applied has waited (0: none).",
        list.iter().map(|v| (labels(v), v.lag_s.unwrap_or(0.0))),
    )?;
    if *with_certs {
        gauge(
            e,
            "coordinator_edge_cert_expiry_timestamp_seconds",
            "When the client certificate an edge presented expires (Unix time).",
            list.iter()
                .filter_map(|v| v.cert_not_after.map(|t| (labels(v), t))),
        )?;
    }
    Ok(())
}

/// RFC 3339 with microseconds, UTC.
fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(id: &str) -> EdgeHello {
        EdgeHello {
            id: id.into(),
            region: "eu".into(),
            varnish_version: String::new(),
            purge_mode: "ban".into(),
            agent_version: String::new(),
            cert_not_after: None,
        }
    }

    #[test]
    fn a_silent_coordinators_edges_read_disconnected_and_a_moved_edge_where_it_is() {
        let reg = EdgeRegistry::default();
        let mut moved = EdgeView::new("eu-2", "eu");
        moved.applied_seq = 7;
        reg.set_remote("c2", vec![EdgeView::new("eu-1", "eu"), moved]);
        assert!(reg.list(10).iter().all(|e| e.connected));
        assert_eq!(reg.applied_seq("eu-2"), Some(7));
        // c2 falls silent; eu-2's agent comes here.
        reg.remote.lock().unwrap().get_mut("c2").unwrap().0 -= REMOTE_TTL * 2;
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
    fn ack_history_stays_within_its_budget_and_never_answers_early() {
        let mut h = AckHistory::default();
        for seq in 1..=50_000u64 {
            h.push(seq, seq * 10);
            assert!(h.points.len() <= ACK_POINTS);
        }
        assert!(h.points.capacity() <= ACK_POINTS, "{}", h.points.capacity());
        // Recent acks are exact; old ones are answered by a later point, never an earlier.
        assert_eq!(h.applied_at(50_000), Some(500_000));
        assert_eq!(h.applied_at(49_999), Some(499_990));
        for seq in [1, 100, 10_000, 30_000] {
            let t = h.applied_at(seq).expect("a point");
            assert!(t >= seq * 10, "{seq}: {t}");
        }
        let seqs: Vec<u64> = h.points.iter().map(|p| p.0).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "ordered");
        assert_eq!(seqs[0], 1, "old history thinned, the oldest point kept");
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

    #[test]
    fn reconnect_cancels_old_session_and_old_disconnect_is_ignored() {
        let reg = EdgeRegistry::default();
        let root = CancellationToken::new();
        let old = reg.connect(hello("a"), 0, &root);
        let new = reg.connect(hello("a"), 0, &root);
        assert!(old.cancel.is_cancelled());
        reg.disconnect(&old);
        assert!(reg.list(0)[0].connected);
        reg.disconnect(&new);
        assert!(!reg.list(0)[0].connected);
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

    #[test]
    fn merged_points_stay_ordered_once_each_and_within_the_budget() {
        let mut h = AckHistory::default();
        h.merge(&[(5, 50), (9, 90)]);
        h.merge(&[(7, 70), (9, 99), (12, 120)]);
        let seqs: Vec<(u64, u64)> = h.points.iter().copied().collect();
        assert_eq!(seqs, [(5, 50), (7, 70), (9, 90), (12, 120)]);
        let many: Vec<(u64, u64)> = (100..3000).map(|s| (s, s * 10)).collect();
        h.merge(&many);
        assert!(h.points.len() <= ACK_POINTS);
        assert_eq!(h.covering(2999), Some((2999, 29_990)));
    }
}
