//! Who the edges are and how far each has applied the purge log.
//!
//! [`EdgeRegistry`] is the coordinator's in-memory view of every edge that has connected
//! since it started: identity, connection state, applied sequence, and a bounded history
//! of *ack points* `(applied_seq, time)`, beside what the other coordinators of the
//! cluster said of the edges they hold. One concept per file, lowest first:
//!
//! * `acks.rs`: the per-edge ack history; the time an edge applied purge `S` is its first
//!   ack point at or beyond `S`, so `GET /api/v1/purges/{seq}` needs nothing stored per
//!   purge per edge;
//! * `view.rs`: what the API shows ([`EdgeView`], [`PurgeProgress`], ...), plain data;
//! * `sessions.rs`: the sessions this coordinator holds and what they record (ack, error,
//!   seen, disconnect);
//! * `admission.rs`: who may hold an edge id: one live session per edge id, told apart by
//!   agent process ([`EdgeRegistry::try_connect`]), duplicate refusal, hand-off;
//! * `relayed.rs`: the peers' edge lists and relayed ack history;
//! * `merged.rs`: the cluster's edges as one list, with lag, and a purge's progress;
//! * `metrics.rs`: the per-edge metric families.
//!
//! The state is the fields of [`EdgeRegistry`], here; each file adds the methods of its
//! concept. Entries are `DashMap` values and the peers' views sit behind plain mutexes;
//! no guard is ever held across an `.await`, and no two of them are taken in opposite
//! orders (`remote` before `gone`; `refused` and `edges` are other maps).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;

mod acks;
mod admission;
mod merged;
mod metrics;
mod relayed;
mod sessions;
mod view;

pub use admission::{instance_fingerprint, replace_after, Refused, SessionOrigin, REFUSALS_SHARED};
pub use relayed::{EdgeHistory, LocalEdge, RELAYED_ACK_POINTS, RELAYED_FAILURES};
pub use sessions::{EdgeHello, SessionEnded, SessionHandle};
pub use view::{
    fmt_time, EdgeRefusals, EdgeView, PurgeFailure, PurgeProgress, RefusedSessions, SessionInfo,
};

/// The registry of edges; share it behind an `Arc`.
#[derive(Debug, Default)]
pub struct EdgeRegistry {
    /// The sessions this coordinator holds or held, per edge id ([`sessions`]).
    edges: DashMap<String, sessions::Edge>,
    sessions: AtomicU64,
    /// Edges other coordinators of the cluster hold sessions for, as each last told us
    /// (see `cluster`): peer id → when, and its edges.
    remote: Mutex<HashMap<String, (Instant, Vec<EdgeView>)>>,
    /// Peers whose lease is gone from an etcd this coordinator read (gone for real, not
    /// merely silent): see [`EdgeRegistry::keep_peers`].
    gone: Mutex<HashSet<String>>,
    /// Sessions refused per edge id (at most `admission::REFUSED_IDS` ids).
    refused: DashMap<String, RefusedSessions>,
    /// The refusals each peer made, from its self record: peer id → its list.
    remote_refused: Mutex<HashMap<String, Vec<EdgeRefusals>>>,
    refused_duplicate: AtomicU64,
    refused_handoff: AtomicU64,
    refused_protocol: AtomicU64,
    handed_off: AtomicU64,
    /// Per edge, the acks and failures the others relayed (see [`EdgeHistory`]).
    relayed: Mutex<HashMap<String, relayed::Relayed>>,
    /// Per peer, the newest ack time it relayed (its clock): where to ask from next.
    relayed_until: Mutex<HashMap<String, u64>>,
}

/// How long another coordinator's list of edges stays in ours without a refresh.
pub const REMOTE_TTL: Duration = Duration::from_secs(5);

/// Hellos, origins and peer polls the files' tests share.
#[cfg(test)]
mod fixtures {
    use super::{instance_fingerprint, EdgeHello, EdgeRegistry, SessionOrigin};
    use std::time::Duration;

    pub(super) fn hello(id: &str) -> EdgeHello {
        EdgeHello {
            id: id.into(),
            region: "eu".into(),
            varnish_version: String::new(),
            purge_mode: "ban".into(),
            agent_version: String::new(),
            cert_not_after: None,
        }
    }

    pub(super) fn from(addr: &str, replace_after_ms: u64, movable: bool) -> SessionOrigin {
        SessionOrigin {
            peer: Some(addr.parse().unwrap()),
            replace_after: Duration::from_millis(replace_after_ms),
            movable,
            instance: None,
            dial: 0,
            protocol: 0,
        }
    }

    /// A session of agent process `instance` (its `dial`th) from `addr`, heartbeating
    /// every 20 ms (replaced after 40 ms of silence).
    pub(super) fn of(instance: &str, dial: u64, addr: &str) -> SessionOrigin {
        SessionOrigin {
            instance: instance_fingerprint(instance),
            dial,
            ..from(addr, 40, true)
        }
    }

    /// What `to` reads from `from` at its next peer poll (`edges?scope=local`, as JSON).
    pub(super) fn poll(to: &EdgeRegistry, from: &EdgeRegistry, name: &str) {
        let json = serde_json::to_vec(&from.list_local_with_history(10, 0)).unwrap();
        to.set_remote_with_history(name, serde_json::from_slice(&json).unwrap());
    }
}
