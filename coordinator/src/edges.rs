//! Who the edges are and how far each has applied the purge log.
//!
//! [`EdgeRegistry`] is the coordinator's in-memory view of every edge that has connected
//! since it started: identity, connection state, applied sequence, and a bounded history
//! of *ack points* `(applied_seq, time)`. Acks are cumulative, so the time an edge applied
//! purge `S` is the time of its first ack point at or beyond `S`; that answers
//! `GET /api/v1/purges/{seq}` without storing anything per purge per edge.
//!
//! One live session per edge id, told apart by agent *process*: each agent draws a random
//! instance id at start and sends it in its Hello (`Hello.instance`; the registry keeps
//! and shows only its [`instance_fingerprint`], so reading the API does not let anyone
//! claim to be that process). [`EdgeRegistry::try_connect`] takes a Hello for an edge id
//! whose current session, here or on another coordinator (as its last edge list said),
//! is:
//!
//! * from the **same instance**: a reconnect after a blip, or a move to another
//!   coordinator. It is taken at once; here the old session ends at once, on a peer the
//!   holder of the older session ends it when its next poll shows it the newer one
//!   ([`EdgeRegistry::set_remote`]; newer: the higher `dial`, the agent's session count),
//!   so both never stay live and the newer one is never ended;
//! * from **another instance** while live (heard within two of its agent's report
//!   intervals, [`replace_after`]; the session layer drops it after three,
//!   `session::silence_limit`): refused whatever the addresses (a copied config on the
//!   same host or behind one NAT address is refused too), with the live one's address and
//!   start in the reason, counted per edge ([`RefusedSessions`]);
//! * from another instance and silent past `replace_after`: replaced (the genuine agent
//!   restarting behind its own half-open session after a kill -9 or a reboot gets in once
//!   the old one has missed two heartbeats).
//!
//! An agent that sends no instance (an older version), or a session from one, falls back
//! to the address rule: the same IP address is the same agent. Two sessions of different
//! instances accepted on two coordinators at once (within one peer poll) are settled
//! when the coordinators next read each other's edges: the one that started later ends.
//!
//! Entries are `DashMap` values; no guard is ever held across an `.await`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

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
    /// The current (or last) session: where it comes from, since when, when the agent
    /// was last heard on it, after how much silence another agent process may take the
    /// id over, whether the agent can be handed to another coordinator, and why it was
    /// ended.
    peer: Option<SocketAddr>,
    since: SystemTime,
    heard: Instant,
    replace_after: Duration,
    movable: bool,
    /// The agent process's [`instance_fingerprint`] (None: an agent that sends none) and
    /// which of its sessions this is (0: unknown).
    instance: Option<String>,
    dial: u64,
    ended: Arc<OnceLock<SessionEnded>>,
}

/// Why the coordinator ended a session (the session layer tells the agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnded {
    /// This coordinator cannot reach the store and hands its agents to another one.
    Handoff(String),
    /// Another session for the edge id, live from another agent process, started earlier.
    Duplicate(String),
}

/// Where a session comes from, beside its Hello (see [`EdgeRegistry::try_connect`]).
#[derive(Debug, Clone, Default)]
pub struct SessionOrigin {
    /// The agent's address as this coordinator sees it (`None`: unknown; without an
    /// instance such a session replaces any other, as before addresses were compared).
    pub peer: Option<SocketAddr>,
    /// Silence after which another agent process's session may replace this one
    /// ([`replace_after`]).
    pub replace_after: Duration,
    /// The agent lists several coordinators, so it can be handed to another one.
    pub movable: bool,
    /// The [`instance_fingerprint`] of the Hello's `instance` (None: the agent sent none,
    /// and the address tells agents apart).
    pub instance: Option<String>,
    /// The Hello's `dial`: which session of that instance this is (0: unknown).
    pub dial: u64,
}

/// What the registry keeps and shows of an agent's instance id: the first 16 hex digits
/// of its SHA-256 (None for an empty one). Peers compare these; reading them does not
/// tell the id itself, so it cannot be claimed by another process.
pub fn instance_fingerprint(instance: &str) -> Option<String> {
    use sha2::{Digest, Sha256};
    if instance.is_empty() {
        return None;
    }
    let mut hex = hex::encode(Sha256::digest(instance.as_bytes()));
    hex.truncate(16);
    Some(hex)
}

/// The silence after which a session counts as half-dead, so that a session from another
/// host may take its edge id: two report intervals (the agent heartbeats every one), at
/// least 2 s; 20 s for agents that do not say their interval.
pub fn replace_after(report_interval_ms: u32) -> Duration {
    match report_interval_ms {
        0 => Duration::from_secs(20),
        ms => Duration::from_millis(u64::from(ms) * 2).max(Duration::from_secs(2)),
    }
}

/// A remote view counts as live for this much longer than its `replace_after_ms`: it is
/// up to one peer poll (1 s) old.
const REMOTE_SLACK_MS: u64 = 1000;

/// Sessions refused for one edge id because another one was live (in `/api/v1/edges`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusedSessions {
    pub count: u64,
    /// The refused agent's address.
    pub last_addr: String,
    pub last_at: String,
    pub reason: String,
}

/// Edge ids whose refusals are kept (each one has a live session; never more).
const REFUSED_IDS: usize = 4096;

/// One edge id's refusals by one coordinator, in its self record: every coordinator
/// shows the refusals any of them made, also for an edge another one holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EdgeRefusals {
    pub edge: String,
    #[serde(flatten)]
    pub refused: RefusedSessions,
}

/// Most refused edge ids one coordinator's self record carries (the latest).
pub const REFUSALS_SHARED: usize = 64;

/// A session refused because its edge id is live elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

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
    /// The agent process's [`instance_fingerprint`] (absent: an agent that sends none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_instance: Option<String>,
    /// Which session of that instance this is (1, 2, ...; absent: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_dial: Option<u64>,
    /// Sessions refused for this edge id because this one was live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_sessions: Option<RefusedSessions>,
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
    /// Peers whose lease is gone from an etcd this coordinator read (gone for real, not
    /// merely silent): see [`EdgeRegistry::keep_peers`].
    gone: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Sessions refused per edge id (at most [`REFUSED_IDS`] ids).
    refused: DashMap<String, RefusedSessions>,
    /// The refusals each peer made, from its self record: peer id → its list.
    remote_refused: std::sync::Mutex<std::collections::HashMap<String, Vec<EdgeRefusals>>>,
    refused_duplicate: AtomicU64,
    refused_handoff: AtomicU64,
    handed_off: AtomicU64,
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
    /// Set before `cancel` when the coordinator ends the session for a reason the agent
    /// should hear.
    pub ended: Arc<OnceLock<SessionEnded>>,
}

/// Whether two addresses are the same host (an unknown one matches any).
fn same_host(a: Option<SocketAddr>, b: Option<SocketAddr>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.ip().to_canonical() == b.ip().to_canonical(),
        _ => true,
    }
}

/// Whether two sessions are from the same agent process: the same instance when both
/// sent one, else (an older agent) the same host.
fn same_process(
    a: (Option<&str>, Option<SocketAddr>),
    b: (Option<&str>, Option<SocketAddr>),
) -> bool {
    match (a.0, b.0) {
        (Some(x), Some(y)) => x == y,
        _ => same_host(a.1, b.1),
    }
}

/// Whether session `a` of an instance is newer than its session `b`: the higher dial
/// when both are known, else the later start.
fn newer(a: (u64, SystemTime), b: (u64, SystemTime)) -> bool {
    if a.0 > 0 && b.0 > 0 {
        a.0 > b.0
    } else {
        a.1 > b.1
    }
}

/// A live session an incoming one collides with.
struct Live {
    addr: Option<SocketAddr>,
    since: SystemTime,
    silent: Duration,
    replace_after: Duration,
    /// The coordinator holding it (None: this one).
    on: Option<String>,
}

impl Live {
    fn reason(&self, id: &str) -> String {
        let on = match &self.on {
            Some(c) => format!(" on coordinator {c}"),
            None => String::new(),
        };
        let addr = self
            .addr
            .map_or_else(|| "an unknown address".to_owned(), |a| a.to_string());
        format!(
            "edge id {id} already has a live session from {addr} since {}{on} (another agent process, last heard {:.1} s ago); is this agent's config a copy? each agent needs its own id (a session silent for {} s is replaced)",
            humantime::format_rfc3339_seconds(self.since),
            self.silent.as_secs_f64(),
            self.replace_after.as_secs_f64(),
        )
    }
}

/// The live session a remote view describes, `age` after the peer answered, if it is
/// from another agent process than `from` (instance, address) and still counts as live.
fn remote_live(
    v: &EdgeView,
    from: (Option<&str>, Option<SocketAddr>),
    age: Duration,
    on: &str,
) -> Option<Live> {
    if !v.connected {
        return None;
    }
    // A view that names neither (an older peer's) matches anything: no refusal, as before.
    let addr: Option<SocketAddr> = v
        .session
        .session_addr
        .as_deref()
        .and_then(|a| a.parse().ok());
    if same_process((v.session.session_instance.as_deref(), addr), from) {
        return None;
    }
    let silent_ms = v.session.silent_ms?.saturating_add(age.as_millis() as u64);
    let replace_after_ms = v.session.replace_after_ms?;
    if silent_ms >= replace_after_ms.saturating_add(REMOTE_SLACK_MS) {
        return None;
    }
    let since = humantime::parse_rfc3339(v.session.session_since.as_deref()?).ok()?;
    Some(Live {
        addr,
        since,
        silent: Duration::from_millis(silent_ms),
        replace_after: Duration::from_millis(replace_after_ms),
        on: Some(on.to_owned()),
    })
}

impl EdgeRegistry {
    /// A session from nowhere in particular (tests): [`Self::try_connect`] with an
    /// origin that is never refused, cancelling any older session of the same edge.
    #[cfg(test)]
    pub fn connect(
        &self,
        hello: EdgeHello,
        applied_seq: u64,
        parent: &CancellationToken,
    ) -> SessionHandle {
        self.try_connect(hello, SessionOrigin::default(), applied_seq, parent)
            .expect("a session without address or instance is never refused")
    }

    /// Marks the edge connected under a new session from `origin`, cancelling any older
    /// session of the same agent process (it reconnected before its old stream timed
    /// out); refused when the edge id has a session live from another agent process,
    /// here or on another coordinator (see the module docs): the refusal is counted on
    /// the edge and nothing else of it changes.
    pub fn try_connect(
        &self,
        hello: EdgeHello,
        origin: SessionOrigin,
        applied_seq: u64,
        parent: &CancellationToken,
    ) -> Result<SessionHandle, Refused> {
        let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        let live = remote
            .iter()
            .filter(|(_, (at, _))| at.elapsed() < REMOTE_TTL)
            .find_map(|(peer, (at, edges))| {
                edges.iter().filter(|e| e.id == hello.id).find_map(|e| {
                    let from = (origin.instance.as_deref(), origin.peer);
                    remote_live(e, from, at.elapsed(), peer)
                })
            });
        drop(remote);
        if let Some(live) = live {
            return Err(self.refuse(&hello.id, origin.peer, live));
        }
        let session = self
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let cancel = parent.child_token();
        let now = SystemTime::now();
        let ended = Arc::new(OnceLock::new());
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
                peer: None,
                since: now,
                heard: Instant::now(),
                replace_after: Duration::ZERO,
                movable: false,
                instance: None,
                dial: 0,
                ended: Arc::default(),
            });
            let e = entry.value_mut();
            let current = (e.instance.as_deref(), e.peer);
            let incoming = (origin.instance.as_deref(), origin.peer);
            if e.connected && !same_process(current, incoming) {
                let silent = e.heard.elapsed();
                if silent < e.replace_after {
                    let live = Live {
                        addr: e.peer,
                        since: e.since,
                        silent,
                        replace_after: e.replace_after,
                        on: None,
                    };
                    // `refused` is another map: no lock order to keep.
                    return Err(self.refuse(&hello.id, origin.peer, live));
                }
                tracing::info!(edge = %hello.id, old = ?e.peer, new = ?origin.peer,
                    silent_s = silent.as_secs_f64(),
                    "a session from another agent process replaces a silent one");
            }
            e.ended = ended.clone();
            e.instance = origin.instance;
            e.dial = origin.dial;
            e.peer = origin.peer;
            e.since = now;
            e.heard = Instant::now();
            e.replace_after = origin.replace_after;
            e.movable = origin.movable;
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
        Ok(SessionHandle {
            edge_id: hello.id,
            session,
            cancel,
            ended,
        })
    }

    /// Counts a refused session on its edge id and says why.
    fn refuse(&self, id: &str, from: Option<SocketAddr>, live: Live) -> Refused {
        let reason = live.reason(id);
        self.refused_duplicate.fetch_add(1, Relaxed);
        self.note_refusal(id, from, &reason);
        Refused(reason)
    }

    fn note_refusal(&self, id: &str, from: Option<SocketAddr>, reason: &str) {
        let last_addr = from
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let last_at = fmt_time(SystemTime::now());
        if let Some(mut r) = self.refused.get_mut(id) {
            r.count += 1;
            r.last_addr = last_addr;
            r.last_at = last_at;
            r.reason = reason.to_owned();
            return;
        }
        if self.refused.len() < REFUSED_IDS {
            self.refused.insert(
                id.to_owned(),
                RefusedSessions {
                    count: 1,
                    last_addr,
                    last_at,
                    reason: reason.to_owned(),
                },
            );
        }
    }

    /// The latest refusals this coordinator made, for its self record (at most
    /// [`REFUSALS_SHARED`] edge ids).
    pub fn local_refusals(&self) -> Vec<EdgeRefusals> {
        let mut out: Vec<EdgeRefusals> = self
            .refused
            .iter()
            .map(|kv| EdgeRefusals {
                edge: kv.key().clone(),
                refused: kv.value().clone(),
            })
            .collect();
        out.sort_by(|a, b| b.refused.last_at.cmp(&a.refused.last_at));
        out.truncate(REFUSALS_SHARED);
        out
    }

    /// Replaces the refusals coordinator `peer` made (from its self record).
    pub fn set_remote_refusals(&self, peer: &str, mut list: Vec<EdgeRefusals>) {
        list.truncate(REFUSALS_SHARED);
        let mut remote = self
            .remote_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if list.is_empty() {
            remote.remove(peer);
        } else {
            remote.insert(peer.to_owned(), list);
        }
    }

    /// Adds to `e` the refusals of its id that peers other than `holder` made (the
    /// holder's are in its row already).
    fn add_peer_refusals(
        remote: &std::collections::HashMap<String, Vec<EdgeRefusals>>,
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

    /// Counts a session refused because this coordinator hands its agents off.
    pub fn refused_for_handoff(&self) {
        self.refused_handoff.fetch_add(1, Relaxed);
    }

    /// Ends every session whose agent lists another coordinator, telling it `reason`;
    /// returns how many. Agents that list only this coordinator stay.
    pub fn hand_off(&self, reason: &str) -> usize {
        let mut ended = 0;
        for e in self.edges.iter() {
            if e.connected && e.movable && !e.cancel.is_cancelled() {
                let _ = e.ended.set(SessionEnded::Handoff(reason.to_owned()));
                e.cancel.cancel();
                ended += 1;
            }
        }
        self.handed_off.fetch_add(ended as u64, Relaxed);
        ended
    }

    /// Ends each local session that `peer`'s edges show is over: one whose agent process
    /// has a newer session there (it moved), and one that collides with a live session
    /// there from another process and started later (two coordinators accepted one id
    /// within a poll). A half-dead one beside a newer one there is left to the session
    /// layer's silence limit (ending it here could race the peer's own decision).
    fn settle_duplicates(&self, peer: &str, edges: &[EdgeView]) {
        for v in edges {
            let Some(e) = self.edges.get(&v.id) else {
                continue;
            };
            if !e.connected || e.cancel.is_cancelled() {
                continue;
            }
            let theirs_since = v
                .session
                .session_since
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339(t).ok());
            let same_instance = e
                .instance
                .as_deref()
                .is_some_and(|i| v.session.session_instance.as_deref() == Some(i));
            if same_instance && v.connected {
                let theirs = (v.session.session_dial.unwrap_or(0), theirs_since);
                let moved = match theirs {
                    (dial, Some(since)) => newer((dial, since), (e.dial, e.since)),
                    (dial, None) => dial > 0 && e.dial > 0 && dial > e.dial,
                };
                if moved {
                    let from = e.peer;
                    e.cancel.cancel();
                    drop(e);
                    tracing::info!(edge = %v.id, peer, from = ?from,
                        "ending an older session: its agent process has a newer one on another coordinator");
                }
                continue;
            }
            let from = (e.instance.as_deref(), e.peer);
            let Some(live) = remote_live(v, from, Duration::ZERO, peer) else {
                continue;
            };
            let key = |since: SystemTime, instance: Option<&str>, addr: Option<SocketAddr>| {
                (
                    since,
                    instance.map(str::to_owned),
                    addr.map(|a| a.to_string()),
                )
            };
            let mine = key(e.since, e.instance.as_deref(), e.peer);
            let theirs = key(live.since, v.session.session_instance.as_deref(), live.addr);
            if mine <= theirs {
                continue;
            }
            let from = e.peer;
            let Refused(reason) = self.refuse(&v.id, from, live);
            let _ = e.ended.set(SessionEnded::Duplicate(reason));
            e.cancel.cancel();
            drop(e);
            tracing::warn!(edge = %v.id, peer, from = ?from, "ending a session: the edge id is live on another coordinator from another agent process");
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

    /// Replaces what coordinator `peer` holds (its own sessions only).
    pub fn set_remote(&self, peer: &str, edges: Vec<EdgeView>) {
        self.settle_duplicates(peer, &edges);
        let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        remote.insert(peer.to_owned(), (std::time::Instant::now(), edges));
        drop(remote);
        self.gone
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer);
    }

    /// Tells which coordinators etcd lists now (read from an etcd that answered): a peer
    /// that reported edges and is not listed is gone for real (its lease expired), one
    /// listed again is back.
    pub fn keep_peers(&self, listed: &[String]) {
        let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        let mut gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
        gone.clear();
        gone.extend(remote.keys().filter(|p| !listed.contains(p)).cloned());
    }

    /// The peers out of sight: they have not reported for [`REMOTE_TTL`], and etcd has
    /// not said they are gone (it may be unreadable, or their lease still holds). Their
    /// edges' state is not known (the monitor reads their regions `unknown`).
    pub fn unseen_peers(&self) -> Vec<String> {
        let remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        let gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
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
        let refused = self
            .remote_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !refused.is_empty() {
            for e in out.iter_mut() {
                let holder = e.coordinator.clone();
                Self::add_peer_refusals(&refused, e, holder.as_deref());
            }
        }
        drop(refused);
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
                    session: SessionInfo {
                        session_addr: e.peer.map(|a| a.to_string()),
                        session_since: Some(fmt_time(e.since)),
                        silent_ms: e.connected.then(|| e.heard.elapsed().as_millis() as u64),
                        replace_after_ms: Some(e.replace_after.as_millis() as u64),
                        session_instance: e.instance.clone(),
                        session_dial: (e.dial > 0).then_some(e.dial),
                        refused_sessions: self.refused.get(kv.key()).map(|r| r.clone()),
                    },
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

/// Two coordinators' refusals of one edge id: counts summed, the latest one's details.
fn merge_refusals(a: &RefusedSessions, b: &RefusedSessions) -> RefusedSessions {
    let latest = if a.last_at >= b.last_at { a } else { b };
    RefusedSessions {
        count: a.count + b.count,
        ..latest.clone()
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
    counter(
        e,
        "coordinator_sessions_refused_total",
        "Agent sessions refused: duplicate_edge_id (the id is live from another agent process), handoff (this coordinator cannot reach its store).",
        [
            (
                [("reason", Label(proto::REFUSAL_DUPLICATE))],
                edges.refused_duplicate.load(Relaxed),
            ),
            (
                [("reason", Label(proto::REFUSAL_HANDOFF))],
                edges.refused_handoff.load(Relaxed),
            ),
        ],
    )?;
    crate::metrics::counter_value(
        e,
        "coordinator_sessions_handed_off_total",
        "Agent sessions this coordinator ended to hand the agents to another one (it could not reach its store).",
        edges.handed_off.load(Relaxed),
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

    fn from(addr: &str, replace_after_ms: u64, movable: bool) -> SessionOrigin {
        SessionOrigin {
            peer: Some(addr.parse().unwrap()),
            replace_after: Duration::from_millis(replace_after_ms),
            movable,
            instance: None,
            dial: 0,
        }
    }

    /// A session of agent process `instance` (its `dial`th) from `addr`, heartbeating
    /// every 20 ms (replaced after 40 ms of silence).
    fn of(instance: &str, dial: u64, addr: &str) -> SessionOrigin {
        SessionOrigin {
            instance: instance_fingerprint(instance),
            dial,
            ..from(addr, 40, true)
        }
    }

    #[test]
    fn another_process_on_the_same_address_is_refused_and_the_same_one_replaces_at_once() {
        let reg = EdgeRegistry::default();
        let root = CancellationToken::new();
        let genuine = reg
            .try_connect(hello("a"), of("p1", 1, "10.0.0.1:4000"), 5, &root)
            .unwrap();
        reg.ack(&genuine, 7);
        // A copied config on the same host (or behind one NAT address): another process.
        let refused = reg
            .try_connect(hello("a"), of("p2", 1, "10.0.0.1:4001"), 0, &root)
            .unwrap_err();
        assert!(
            refused
                .0
                .contains("already has a live session from 10.0.0.1:4000")
                && refused.0.contains("another agent process"),
            "{}",
            refused.0
        );
        assert!(!genuine.cancel.is_cancelled());
        let v = reg.list(10)[0].clone();
        assert_eq!(
            (v.applied_seq, v.sessions),
            (7, 1),
            "genuine edge untouched"
        );
        assert_eq!(v.session.refused_sessions.map(|r| r.count), Some(1));
        let shown = v.session.session_instance.expect("instance shown");
        assert_eq!(Some(shown.clone()), instance_fingerprint("p1"));
        assert!(
            !shown.contains("p1") && shown.len() == 16,
            "a fingerprint: {shown}"
        );
        // The same process again (a blip; even from a new address): replaces at once.
        let again = reg
            .try_connect(hello("a"), of("p1", 2, "10.0.0.9:4002"), 7, &root)
            .unwrap();
        assert!(genuine.cancel.is_cancelled() && !again.cancel.is_cancelled());
        assert_eq!(reg.list(10)[0].session.session_dial, Some(2));
    }

    #[test]
    fn another_process_gets_in_once_the_live_session_is_silent_for_its_replace_after() {
        let reg = EdgeRegistry::default();
        let root = CancellationToken::new();
        let old = reg
            .try_connect(hello("a"), of("p1", 1, "10.0.0.1:4000"), 3, &root)
            .unwrap();
        std::thread::sleep(Duration::from_millis(25));
        reg.seen(&old);
        assert!(reg
            .try_connect(hello("a"), of("p2", 1, "10.0.0.1:4001"), 3, &root)
            .is_err());
        std::thread::sleep(Duration::from_millis(60));
        let restarted = reg
            .try_connect(hello("a"), of("p2", 1, "10.0.0.1:4001"), 3, &root)
            .expect("the restart behind a half-dead session gets in");
        assert!(old.cancel.is_cancelled() && !restarted.cancel.is_cancelled());
        assert_eq!(reg.list(10)[0].applied_seq, 3, "cursor kept");
    }

    #[test]
    fn an_agent_without_an_instance_falls_back_to_the_address() {
        let reg = EdgeRegistry::default();
        let root = CancellationToken::new();
        let old = reg
            .try_connect(hello("a"), from("10.0.0.1:4000", 60_000, false), 0, &root)
            .unwrap();
        // The same address (an older agent reconnecting): replaces at once.
        let same = reg
            .try_connect(hello("a"), from("10.0.0.1:4001", 60_000, false), 0, &root)
            .unwrap();
        assert!(old.cancel.is_cancelled());
        // An upgraded agent on that host (it sends an instance now): the same host.
        let upgraded = reg
            .try_connect(hello("a"), of("p1", 1, "10.0.0.1:4002"), 0, &root)
            .unwrap();
        assert!(same.cancel.is_cancelled());
        // Another address without an instance: refused while the session is live.
        assert!(reg
            .try_connect(hello("a"), from("10.0.0.2:4000", 60_000, false), 0, &root)
            .is_err());
        assert!(!upgraded.cancel.is_cancelled());
    }

    /// What `to` reads from `from` at its next peer poll (`edges?scope=local`, as JSON).
    fn poll(to: &EdgeRegistry, from: &EdgeRegistry, name: &str) {
        let json = serde_json::to_vec(&from.list_local_with_history(10, 0)).unwrap();
        to.set_remote_with_history(name, serde_json::from_slice(&json).unwrap());
    }

    #[test]
    fn a_move_to_another_coordinator_ends_the_older_session_there_and_never_the_newer() {
        let (c1, c2) = (EdgeRegistry::default(), EdgeRegistry::default());
        let root = CancellationToken::new();
        let on_c1 = c1
            .try_connect(hello("a"), of("p1", 1, "10.0.0.1:4000"), 0, &root)
            .unwrap();
        poll(&c2, &c1, "c1");
        // Another process, same address, on another coordinator: refused there.
        let refused = c2
            .try_connect(hello("a"), of("p2", 1, "10.0.0.1:4001"), 0, &root)
            .unwrap_err();
        assert!(refused.0.contains("on coordinator c1"), "{}", refused.0);
        // The same process moves to c2 (its c1 session half-open): taken at once.
        let on_c2 = c2
            .try_connect(hello("a"), of("p1", 2, "10.0.0.1:4100"), 0, &root)
            .unwrap();
        // c2 sees the older one still on c1: keeps its newer one.
        poll(&c2, &c1, "c1");
        assert!(
            !on_c2.cancel.is_cancelled(),
            "the newer session is never ended"
        );
        // c1 sees the newer one on c2: ends its older one, no duplicate counted.
        poll(&c1, &c2, "c2");
        assert!(on_c1.cancel.is_cancelled());
        assert_eq!(on_c1.ended.get(), None);
        c1.disconnect(&on_c1);
        poll(&c2, &c1, "c1");
        assert!(!on_c2.cancel.is_cancelled());
        let (a, b) = (c1.list(0), c2.list(0));
        assert_eq!(a[0].coordinator.as_deref(), Some("c2"), "{a:?}");
        assert_eq!(b[0].coordinator, None, "one answer: on c2");
        assert_eq!(c2.refused_duplicate.load(Relaxed), 1);
        assert_eq!(c1.refused_duplicate.load(Relaxed), 0);
    }

    #[test]
    fn two_processes_accepted_at_once_on_two_coordinators_settle_to_the_earlier_one() {
        let (c1, c2) = (EdgeRegistry::default(), EdgeRegistry::default());
        let root = CancellationToken::new();
        let first = c1
            .try_connect(hello("a"), of("p1", 1, "10.0.0.1:4000"), 0, &root)
            .unwrap();
        std::thread::sleep(Duration::from_millis(2));
        // Within one poll: c2 does not know c1's session yet.
        let second = c2
            .try_connect(hello("a"), of("p2", 1, "10.0.0.1:4001"), 0, &root)
            .unwrap();
        poll(&c1, &c2, "c2");
        poll(&c2, &c1, "c1");
        assert!(!first.cancel.is_cancelled(), "the earlier one stays");
        assert!(second.cancel.is_cancelled(), "the later one ends");
        assert!(matches!(
            second.ended.get(),
            Some(SessionEnded::Duplicate(r)) if r.contains("another agent process")
        ));
    }

    #[test]
    fn a_second_host_is_refused_while_the_session_is_live_and_the_genuine_edge_is_untouched() {
        let reg = EdgeRegistry::default();
        let root = CancellationToken::new();
        let genuine = reg
            .try_connect(hello("a"), from("10.0.0.1:4000", 60_000, false), 5, &root)
            .unwrap();
        reg.ack(&genuine, 7);
        let refused = reg
            .try_connect(hello("a"), from("10.0.0.2:5000", 60_000, false), 0, &root)
            .unwrap_err();
        assert!(
            refused
                .0
                .contains("edge id a already has a live session from 10.0.0.1:4000 since"),
            "{}",
            refused.0
        );
        assert!(!genuine.cancel.is_cancelled(), "the live session stays");
        let v = reg.list(10)[0].clone();
        assert_eq!((v.applied_seq, v.sessions), (7, 1), "cursor untouched");
        assert!(
            reg.progress(6)[0].1.applied_at.is_some(),
            "ack history kept"
        );
        let r = v.session.refused_sessions.expect("refusals shown");
        assert_eq!((r.count, r.last_addr.as_str()), (1, "10.0.0.2:5000"));
        assert_eq!(v.session.session_addr.as_deref(), Some("10.0.0.1:4000"));
        // The same host (a reconnect after a blip: a new port) replaces it at once.
        let again = reg
            .try_connect(hello("a"), from("10.0.0.1:4001", 60_000, false), 7, &root)
            .unwrap();
        assert!(genuine.cancel.is_cancelled());
        assert!(!again.cancel.is_cancelled());
    }

    #[test]
    fn a_session_silent_for_its_replace_after_gives_way_to_another_host() {
        let reg = EdgeRegistry::default();
        let root = CancellationToken::new();
        let old = reg
            .try_connect(hello("a"), from("10.0.0.1:4000", 40, false), 3, &root)
            .unwrap();
        assert!(reg
            .try_connect(hello("a"), from("10.0.0.2:4000", 40, false), 3, &root)
            .is_err());
        std::thread::sleep(Duration::from_millis(60));
        let new = reg
            .try_connect(hello("a"), from("10.0.0.2:4000", 40, false), 3, &root)
            .expect("a half-dead session is replaced");
        assert!(old.cancel.is_cancelled() && !new.cancel.is_cancelled());
        // Heard in time, a session stays live.
        std::thread::sleep(Duration::from_millis(30));
        reg.seen(&new);
        std::thread::sleep(Duration::from_millis(20));
        assert!(reg
            .try_connect(hello("a"), from("10.0.0.3:4000", 40, false), 3, &root)
            .is_err());
    }

    #[test]
    fn a_session_live_on_another_coordinator_is_respected_and_a_later_twin_ends() {
        let reg = EdgeRegistry::default();
        let root = CancellationToken::new();
        let mut theirs = EdgeView::new("a", "eu");
        theirs.session = SessionInfo {
            session_addr: Some("10.0.0.1:4000".into()),
            session_since: Some(fmt_time(SystemTime::now() - Duration::from_secs(60))),
            silent_ms: Some(300),
            replace_after_ms: Some(2000),
            ..SessionInfo::default()
        };
        reg.set_remote("c2", vec![theirs.clone()]);
        let refused = reg
            .try_connect(hello("a"), from("10.0.0.2:4000", 2000, false), 0, &root)
            .unwrap_err();
        assert!(refused.0.contains("on coordinator c2"), "{}", refused.0);
        // The same host moving here is no twin.
        let moved = reg
            .try_connect(hello("a"), from("10.0.0.1:4100", 2000, false), 0, &root)
            .unwrap();
        reg.disconnect(&moved);
        // Silent there for longer than it allows: this host may take over.
        let mut silent = theirs.clone();
        silent.session.silent_ms = Some(3500);
        reg.set_remote("c2", vec![silent]);
        let taken = reg
            .try_connect(hello("a"), from("10.0.0.2:4000", 2000, false), 0, &root)
            .unwrap();
        // Accepted in the same poll interval as a live older twin there: this one ends.
        reg.set_remote("c2", vec![theirs]);
        assert!(taken.cancel.is_cancelled());
        assert!(matches!(
            taken.ended.get(),
            Some(SessionEnded::Duplicate(_))
        ));
    }

    #[test]
    fn a_hand_off_ends_only_the_sessions_of_agents_that_list_another_coordinator() {
        let reg = EdgeRegistry::default();
        let root = CancellationToken::new();
        let movable = reg
            .try_connect(hello("a"), from("10.0.0.1:1", 2000, true), 0, &root)
            .unwrap();
        let stays = reg
            .try_connect(hello("b"), from("10.0.0.2:1", 2000, false), 0, &root)
            .unwrap();
        assert_eq!(reg.hand_off("cut off"), 1);
        assert!(movable.cancel.is_cancelled());
        assert_eq!(
            movable.ended.get(),
            Some(&SessionEnded::Handoff("cut off".into()))
        );
        assert!(!stays.cancel.is_cancelled());
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
    fn a_silent_peer_is_out_of_sight_until_etcd_says_it_is_gone() {
        let reg = EdgeRegistry::default();
        reg.set_remote("c2", vec![EdgeView::new("eu-1", "eu")]);
        reg.set_remote("c3", vec![EdgeView::new("us-1", "us")]);
        reg.keep_peers(&["c1".into(), "c2".into(), "c3".into()]);
        assert!(reg.unseen_peers().is_empty(), "both report");
        for (_, (at, _)) in reg.remote.lock().unwrap().iter_mut() {
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
