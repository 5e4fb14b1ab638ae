//! What the API shows of an edge: [`EdgeView`] with its [`SessionInfo`] and
//! [`RefusedSessions`], a purge's [`PurgeProgress`] on one edge, the [`PurgeFailure`]s it
//! applied as full bans, and the pure helpers that shape them (lag in seconds, two
//! coordinators' refusals summed, times in RFC 3339).
//!
//! Plain data: these types know no registry, no lock and no peer; the files that own the
//! state fill them in.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::purge::log::PurgeLog;

/// Purges varnish refused for good on one edge: the agent banned everything instead, so
/// the promise made to Magento holds, and says so here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PurgeFailure {
    pub first_seq: u64,
    pub last_seq: u64,
    pub error: String,
    pub at: String,
}

/// Sessions refused for one edge id because another one was live (in `/api/v1/edges`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusedSessions {
    pub count: u64,
    /// The refused agent's address.
    pub last_addr: String,
    pub last_at: String,
    pub reason: String,
}

/// One edge id's refusals by one coordinator, in its self record: every coordinator
/// shows the refusals any of them made, also for an edge another one holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EdgeRefusals {
    pub edge: String,
    #[serde(flatten)]
    pub refused: RefusedSessions,
}

/// The session behind an edge view (in `/api/v1/edges`; peers read it to refuse a second
/// session for an id live on another coordinator).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    /// The agent's address, as the coordinator holding the session sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_addr: Option<String>,
    /// When the session started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_since: Option<String>,
    /// Milliseconds since the agent was last heard on it (connected edges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silent_ms: Option<u64>,
    /// The silence after which a session from another agent process replaces it (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_after_ms: Option<u64>,
    /// The agent process's [`instance_fingerprint`](super::instance_fingerprint) (absent:
    /// an agent that sends none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_instance: Option<String>,
    /// Which session of that instance this is (1, 2, ...; absent: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_dial: Option<u64>,
    /// Sessions refused for this edge id because this one was live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_sessions: Option<RefusedSessions>,
    /// The protocol version the agent speaks (1: one that does not say; absent: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u32>,
    /// Why this agent's last session was refused for its protocol version, naming both
    /// (`protocol 5, this coordinator speaks 1..=3`); absent once one is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
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
    #[serde(flatten)]
    pub session: SessionInfo,
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
            session: SessionInfo::default(),
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

/// Two coordinators' refusals of one edge id: counts summed, the latest one's details.
pub(super) fn merge_refusals(a: &RefusedSessions, b: &RefusedSessions) -> RefusedSessions {
    let latest = if a.last_at >= b.last_at { a } else { b };
    RefusedSessions {
        count: a.count + b.count,
        ..latest.clone()
    }
}

/// Sets `lag_s` on each lagging edge of `list`: how long the oldest purge it has not
/// applied has waited.
pub(super) fn with_lag(mut list: Vec<EdgeView>, log: &PurgeLog) -> Vec<EdgeView> {
    let now = crate::clock::now_us();
    for e in list.iter_mut().filter(|e| e.lag > 0) {
        e.lag_s = log
            .received_at_us(e.applied_seq + 1)
            .map(|t| now.saturating_sub(t) as f64 / 1e6);
    }
    list
}

/// RFC 3339 with microseconds, UTC.
pub fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}
