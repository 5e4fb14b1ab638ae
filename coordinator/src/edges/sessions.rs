//! The sessions this coordinator holds: one [`Edge`] entry per edge id that connected
//! here, claimed by the current session's [`SessionHandle`], and what the session layer
//! records on it (acks, errors, varnish status, heartbeats, the end of a session).
//!
//! An older session's handle never marks the newer session disconnected or heard
//! (`disconnect`, `seen` check the session number); an ack that does not advance the
//! cursor adds no ack point.
//! Who may take an entry is decided in [`super::admission`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::acks::AckHistory;
use super::view::{fmt_time, with_lag, EdgeView, PurgeFailure, SessionInfo};
use super::EdgeRegistry;
use crate::purge::log::PurgeLog;

/// Purges an edge could only apply as a full ban, remembered per edge.
pub(super) const FAILURES_KEPT: usize = 256;

/// One edge as the registry knows it.
#[derive(Debug)]
pub(super) struct Edge {
    pub(super) region: String,
    pub(super) connected: bool,
    pub(super) session: u64,
    pub(super) cancel: CancellationToken,
    pub(super) applied_seq: u64,
    pub(super) acks: AckHistory,
    pub(super) last_seen: SystemTime,
    pub(super) last_error: Option<(u64, String)>,
    pub(super) failures: VecDeque<PurgeFailure>,
    pub(super) full_bans: u64,
    pub(super) refused_acks: u64,
    /// What the agent last said about varnishd's admin port (None: reachable).
    pub(super) varnish_error: Option<String>,
    pub(super) varnish_version: String,
    pub(super) purge_mode: String,
    pub(super) agent_version: String,
    pub(super) applied_total: u64,
    pub(super) sessions: u64,
    pub(super) cert_not_after: Option<u64>,
    /// The current (or last) session: where it comes from, since when, when the agent
    /// was last heard on it, after how much silence another agent process may take the
    /// id over, whether the agent can be handed to another coordinator, and why it was
    /// ended.
    pub(super) peer: Option<SocketAddr>,
    pub(super) since: SystemTime,
    pub(super) heard: Instant,
    pub(super) replace_after: Duration,
    pub(super) movable: bool,
    /// The agent process's [`instance_fingerprint`](super::instance_fingerprint) (None:
    /// an agent that sends none) and which of its sessions this is (0: unknown).
    pub(super) instance: Option<String>,
    pub(super) dial: u64,
    /// The protocol version the agent said (0: unknown), and why its last session was
    /// refused for it (None: it was not, or a later one was accepted).
    pub(super) protocol: u32,
    pub(super) refused_protocol: Option<String>,
    pub(super) ended: Arc<OnceLock<SessionEnded>>,
}

impl Edge {
    /// A new entry, not connected yet, at cursor `applied_seq`.
    pub(super) fn new(region: String, applied_seq: u64, now: SystemTime) -> Self {
        Edge {
            region,
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
            peer: None,
            since: now,
            heard: Instant::now(),
            replace_after: Duration::ZERO,
            movable: false,
            instance: None,
            dial: 0,
            protocol: 0,
            refused_protocol: None,
            ended: Arc::default(),
        }
    }
}

/// Why the coordinator ended a session (the session layer tells the agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnded {
    /// This coordinator cannot reach the store and hands its agents to another one.
    Handoff(String),
    /// Another session for the edge id, live from another agent process, started earlier.
    Duplicate(String),
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

/// A connected session's claim on its edge entry.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub edge_id: String,
    pub session: u64,
    pub cancel: CancellationToken,
    /// Set before `cancel` when the coordinator ends the session for a reason the agent
    /// should hear.
    pub ended: Arc<OnceLock<SessionEnded>>,
}

impl EdgeRegistry {
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

    /// The agent was heard on its session: refreshes `last_seen`.
    pub fn seen(&self, handle: &SessionHandle) {
        if let Some(mut e) = self.edges.get_mut(&handle.edge_id) {
            if e.session == handle.session {
                e.last_seen = SystemTime::now();
                e.heard = Instant::now();
            }
        }
    }

    /// Whether this coordinator holds `edge_id`'s session now.
    pub fn is_connected_here(&self, edge_id: &str) -> bool {
        self.edges.get(edge_id).is_some_and(|e| e.connected)
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
                    session: SessionInfo {
                        session_addr: e.peer.map(|a| a.to_string()),
                        session_since: Some(fmt_time(e.since)),
                        silent_ms: e.connected.then(|| e.heard.elapsed().as_millis() as u64),
                        replace_after_ms: Some(e.replace_after.as_millis() as u64),
                        session_instance: e.instance.clone(),
                        session_dial: (e.dial > 0).then_some(e.dial),
                        refused_sessions: self.refused.get(kv.key()).map(|r| r.clone()),
                        protocol: (e.protocol > 0).then_some(e.protocol),
                        refused: e.refused_protocol.clone(),
                    },
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// [`Self::list_local`] with each lagging edge's `lag_s`.
    pub fn list_local_with_lag(&self, log: &PurgeLog) -> Vec<EdgeView> {
        with_lag(self.list_local(log.head()), log)
    }

    /// The number of edges currently connected.
    pub fn connected(&self) -> usize {
        self.edges.iter().filter(|kv| kv.value().connected).count()
    }
}

/// Microseconds since the Unix epoch (0 before it).
fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::super::fixtures::hello;
    use super::super::EdgeRegistry;

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
}
