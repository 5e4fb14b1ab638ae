//! Who may hold an edge id: session admission, duplicate refusal and hand-off.
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
//! when the coordinators next read each other's edges ([`EdgeRegistry::settle_duplicates`]):
//! the one that started later ends. A refusal changes nothing of the live edge but its
//! refusal count.

use daemon::sync::Recover;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::sessions::{Edge, EdgeHello, SessionEnded, SessionHandle};
use super::view::{fmt_time, EdgeRefusals, EdgeView, RefusedSessions};
use super::{EdgeRegistry, REMOTE_TTL};

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
    /// The protocol version the agent speaks (`proto::version::of_wire` of its Hello's;
    /// 0: unknown).
    pub protocol: u32,
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

/// Edge ids whose refusals are kept (each one has a live session; never more).
const REFUSED_IDS: usize = 4096;

/// Most refused edge ids one coordinator's self record carries (the latest).
pub const REFUSALS_SHARED: usize = 64;

/// A session refused because its edge id is live elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

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
        let remote = self.remote.locked();
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
            let mut entry = self
                .edges
                .entry(hello.id.clone())
                .or_insert_with(|| Edge::new(hello.region.clone(), applied_seq, now));
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
            e.protocol = origin.protocol;
            e.refused_protocol = None;
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
        let mut remote = self.remote_refused.locked();
        if list.is_empty() {
            remote.remove(peer);
        } else {
            remote.insert(peer.to_owned(), list);
        }
    }

    /// Records a session refused because the agent's protocol version is outside this
    /// coordinator's window: counted, and shown on the edge (`refused`, `protocol`; an
    /// edge not known yet is listed, disconnected, so the refused agent is visible). A
    /// live session of the edge id (another process) is left as it is.
    pub fn refused_for_protocol(
        &self,
        hello: EdgeHello,
        origin: &SessionOrigin,
        applied_seq: u64,
        reason: String,
    ) {
        self.refused_protocol.fetch_add(1, Relaxed);
        let now = SystemTime::now();
        let mut entry = self
            .edges
            .entry(hello.id)
            .or_insert_with(|| Edge::new(hello.region.clone(), applied_seq, now));
        let e = entry.value_mut();
        e.refused_protocol = Some(reason);
        if !e.connected {
            e.region = hello.region;
            e.protocol = origin.protocol;
            e.agent_version = hello.agent_version;
            e.varnish_version = hello.varnish_version;
            e.purge_mode = hello.purge_mode;
            e.peer = origin.peer;
            e.instance = origin.instance.clone();
            e.last_seen = now;
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
    pub(super) fn settle_duplicates(&self, peer: &str, edges: &[EdgeView]) {
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
}

#[cfg(test)]
impl EdgeRegistry {
    /// A session from nowhere in particular (tests): [`Self::try_connect`] with an
    /// origin that is never refused, cancelling any older session of the same edge.
    pub fn connect(
        &self,
        hello: EdgeHello,
        applied_seq: u64,
        parent: &CancellationToken,
    ) -> SessionHandle {
        self.try_connect(hello, SessionOrigin::default(), applied_seq, parent)
            .expect("a session without address or instance is never refused")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::{Duration, SystemTime};

    use tokio_util::sync::CancellationToken;

    use super::super::fixtures::{from, hello, of, poll};
    use super::super::view::{fmt_time, EdgeView, SessionInfo};
    use super::super::EdgeRegistry;
    use super::*;

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
    fn a_protocol_refusal_shows_the_agent_and_leaves_a_live_session_alone() {
        let reg = EdgeRegistry::default();
        let root = CancellationToken::new();
        let origin = SessionOrigin {
            protocol: 5,
            ..from("10.0.0.1:4000", 2000, false)
        };
        // Never seen before: listed, disconnected, with why.
        reg.refused_for_protocol(
            hello("a"),
            &origin,
            4,
            "protocol 5, this coordinator speaks 1..=3".into(),
        );
        let v = reg.list(10)[0].clone();
        assert_eq!(
            (v.connected, v.applied_seq, v.region.as_str()),
            (false, 4, "eu")
        );
        assert_eq!(v.session.protocol, Some(5));
        assert_eq!(
            v.session.refused.as_deref(),
            Some("protocol 5, this coordinator speaks 1..=3")
        );
        assert_eq!(reg.refused_protocol.load(Relaxed), 1);
        // Accepted later (one side upgraded): the refusal is gone.
        let ok = SessionOrigin {
            protocol: 2,
            ..origin.clone()
        };
        let live = reg.try_connect(hello("a"), ok, 4, &root).unwrap();
        let v = reg.list(10)[0].clone();
        assert_eq!(
            (v.connected, v.session.protocol, v.session.refused),
            (true, Some(2), None)
        );
        // Another process refused for its version while one is live: the live one stays.
        reg.refused_for_protocol(hello("a"), &origin, 0, "protocol 5".into());
        let v = reg.list(10)[0].clone();
        assert!(v.connected && !live.cancel.is_cancelled());
        assert_eq!((v.applied_seq, v.session.protocol), (4, Some(2)));
        assert_eq!(reg.refused_protocol.load(Relaxed), 2);
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
}
