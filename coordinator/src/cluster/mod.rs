//! The coordinators of one cluster, as this one sees them: who it is, who leads, who
//! else is there, and the edges the others hold.
//!
//! With the embedded store a coordinator is a cluster of one and always its leader. With
//! `[store] backend = "etcd"` ([`config::StoreConfig`]) [`Cluster::open_etcd`] checks
//! the prefix's schema version ([`crate::schema`]: a newer state is refused), then joins the
//! election ([`crate::leader`]) with a membership record, `members/<id>` = [`Member`],
//! kept under the same lease, so the record disappears with a dead coordinator.
//! [`Cluster::run`] then, every second, lists the members and asks each other one for
//! its self record (`GET /api/v1/cluster?scope=local`, a [`MemberStatus`]: its role,
//! whether it reaches etcd, its spool) and the edges whose sessions it holds
//! (`GET /api/v1/edges?scope=local`; a coordinator blind to etcd hands its agents to a
//! peer whose self record says it reaches etcd, see `session::handoff`), which the
//! [`EdgeRegistry`] shows beside its own: every coordinator's API shows every edge, and
//! nothing about an edge is written to etcd (no heartbeats there; at a thousand edges
//! that would be the store's whole load). It asks for their edges' config state too
//! (`GET /api/v1/config?scope=local`): the leader moves rollouts on the whole fleet's. Every few seconds it also asks each etcd
//! member for its status, for `/api/v1/cluster`. And it reads each other
//! one's agents' probe results, counter samples, popular URLs and client networks
//! (`relay`), so every coordinator's region health, hit ratios, alerts, per-country
//! figures and popular URLs cover the whole fleet. The peers' edges carry their recent
//! ack points (`edges::EdgeHistory`), so every coordinator answers a purge's status for
//! every edge alike. Blind to etcd it keeps
//! asking the members it last listed. A peer whose lease is gone from an etcd it can read
//! and that no longer answers is gone for real ([`EdgeRegistry::keep_peers`]); one that
//! still answers stays a member (cut off from etcd, its agents are still there); one
//! that merely stops answering is out of sight (the monitor reads its regions
//! `unknown`, not `down`).
//!
//! **One truth about who leads** ([`Cluster::role`]): `role` is `leader` only while this
//! coordinator holds its lease, and then `leader` is its own id; a follower names the
//! leader the election names, except itself (a lease it lost) and a peer whose last self
//! record did not come (killed, or cut off: not known to lead any more) or says it does
//! not lead (its lease lapsed while etcd had no quorum); then `leader` is null. The observe stream names a new leader the moment its campaign wins.
//! `/api/v1/cluster`, `/healthz` and the metrics all read it from here.
//!
//! The cluster's alert about etcd itself ("unreachable", "back", once each for the
//! whole cluster) is decided here from the self records: `store_alert`.
//!
//! [`Cluster::leading`] is the leader's flag for singleton work: a receiver that is `true`
//! while this coordinator leads (always, embedded).

pub mod config;
mod peers;
pub mod relay;
pub mod store_alert;
pub mod warm_relay;

use daemon::sync::Recover;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use etcd::etcdserverpb::RangeRequest;
use etcd::Etcd;
use proto::edge::RelayBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::edges::EdgeRegistry;
use crate::leader::{self, Leadership};
use crate::metrics::{collector, counter_value, gauge, gauge_value, Label, Registry};
use crate::monitor::Monitor;
use crate::purge::log::PurgeLog;
use crate::rollout::Rollouts;
use crate::store_health::StoreHealth;
use crate::traffic::Traffic;
use crate::warm::Warm;
use config::StoreConfig;
use relay::Relay;
use warm_relay::WarmRelay;

pub use peers::PeerError;

/// Why [`Cluster::read_from_leader`] has no answer.
#[derive(Debug, thiserror::Error)]
pub enum LeaderReadError {
    #[error("no other coordinator leads")]
    NoOtherLeader,
    #[error("leader {0} is not among the members")]
    NotAMember(String),
    #[error(transparent)]
    Peer(#[from] PeerError),
}

/// Why the cluster could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("store.tls: cannot read {path}: {source}")]
    TlsFile {
        path: String,
        source: std::io::Error,
    },
    #[error("store.password_file: cannot read {path}: {source}")]
    PasswordFile {
        path: String,
        source: std::io::Error,
    },
    #[error("etcd refused user {user:?}: {message}")]
    Auth { user: String, message: String },
    #[error(transparent)]
    Etcd(#[from] etcd::EtcdError),
    /// The prefix holds a newer coordinator's state (or an unreadable marker).
    #[error(transparent)]
    Schema(#[from] crate::schema::SchemaError),
}

/// How long listing the members may take before etcd counts as unreachable.
const LIST_TIMEOUT: Duration = Duration::from_millis(1500);

/// A coordinator's membership record in etcd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub id: String,
    /// Where its API answers.
    pub api: String,
    pub started_at_ms: u64,
}

/// One etcd member's health, in `/api/v1/cluster`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdMemberView {
    pub endpoint: String,
    pub healthy: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `leader` or `follower`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    Follower,
}

/// A coordinator as it sees itself: `GET /api/v1/cluster?scope=local`, what each
/// coordinator asks its peers for every second.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: String,
    pub api: String,
    pub role: Role,
    pub leader: Option<String>,
    /// Whether it reaches etcd (null: not asked yet).
    pub store_reachable: Option<bool>,
    /// Purges answered 200 that wait in its local spool for the shared log.
    pub spool_depth: u64,
    /// It holds the cluster's "etcd unreachable" alert as sent (`store_alert`).
    #[serde(default)]
    pub store_alert: bool,
    /// The fencing revision of the newest term it knows: its word on its role is fresher
    /// than an election it had not seen yet.
    #[serde(default)]
    pub fencing: Option<i64>,
    /// The latest sessions it refused for a live edge id elsewhere, so every coordinator's
    /// `/api/v1/edges` shows them (filled by the API from its `EdgeRegistry`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<crate::edges::EdgeRefusals>,
}

/// One coordinator of the cluster in `/api/v1/cluster`'s `members`. A peer's `role`,
/// `store_reachable` and `spool_depth` are what its last self record said, null when
/// it was not heard from within a few seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberView {
    pub id: String,
    /// Its API's address (`store.advertise_api`).
    pub api: String,
    pub started_at_ms: u64,
    pub role: Option<Role>,
    /// Since its last self record came (null: this coordinator itself, or never heard).
    pub last_heard_ms_ago: Option<u64>,
    pub store_reachable: Option<bool>,
    pub spool_depth: Option<u64>,
}

/// `GET /api/v1/cluster`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterView {
    pub role: Role,
    /// The leader's id (null while none is known); never contradicts `role`.
    pub leader: Option<String>,
    pub id: String,
    /// `embedded` or `etcd`.
    pub store: config::Backend,
    /// Whether this coordinator reaches its store now (null: not asked yet).
    pub store_reachable: Option<bool>,
    /// Why not, while it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    /// Purges this coordinator holds in its local spool for the shared log.
    pub spool_depth: u64,
    /// The leader key's revision (etcd): the fencing token of the current term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing: Option<i64>,
    /// Every coordinator (this one included), as the last member list and the peers'
    /// self records say; kept while etcd cannot be read.
    pub members: Vec<MemberView>,
    /// Each etcd member's health (absent with the embedded store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<Vec<EtcdMemberView>>,
}

/// This coordinator's view of its cluster; share it behind an `Arc`.
pub struct Cluster {
    me: Member,
    backend: config::Backend,
    etcd: Option<Etcd>,
    prefix: String,
    leadership: watch::Receiver<Leadership>,
    leading: watch::Receiver<bool>,
    members: Mutex<Vec<Member>>,
    /// What each peer's self record said, and when it last came.
    peers: Mutex<HashMap<String, PeerSight>>,
    /// etcd's members' status as last asked, and when (ms since the epoch).
    etcd_health: Mutex<Option<(u64, Vec<EtcdMemberView>)>>,
    /// The purge log, for its spool depth (set once at start).
    log: OnceLock<PurgeLog>,
    /// The cluster's alert about etcd (`store_alert`).
    store_alert: Mutex<store_alert::StoreAlert>,
    /// This coordinator's agents' reports, for the others to read.
    relay: Relay,
    /// Reports read from the peers, and how many dropped out of their buffers unread.
    relayed: std::sync::atomic::AtomicU64,
    relay_missed: std::sync::atomic::AtomicU64,
    /// Warm work for the agents on followers (see `warm_relay`).
    warm_relay: WarmRelay,
    /// The last warm pull from the leader failed (said once until it works again).
    warm_pull_failing: std::sync::atomic::AtomicBool,
    /// Whether etcd answers, as every caller found (see `store_health`).
    store: StoreHealth,
    /// Ends the campaign (resigning) when the coordinator stops.
    stop: CancellationToken,
    /// For reads from the peers' APIs.
    client: peers::PeerClient,
}

/// One peer as the self-record polls found it.
#[derive(Debug, Default)]
struct PeerSight {
    /// When its self record last came.
    heard: Option<Instant>,
    /// Whether the last ask for it was answered.
    answering: bool,
    status: Option<MemberStatus>,
}

/// What [`Cluster::run`] fills in from the peers' answers.
pub struct PeerViews {
    pub edges: Arc<EdgeRegistry>,
    pub rollouts: Arc<Rollouts>,
    pub monitor: Arc<Monitor>,
    pub traffic: Arc<Traffic>,
    pub warm: Arc<Warm>,
    /// Shoppers' networks by country (with `[geo]`).
    pub geo: Option<Arc<crate::geo::Geo>>,
}

impl Cluster {
    /// A cluster of one: this coordinator, always the leader.
    pub fn embedded(id: String, api: String) -> Arc<Cluster> {
        let me = Member {
            id: id.clone(),
            api,
            started_at_ms: now_ms(),
        };
        let leadership = Leadership {
            me: true,
            leader: Some(id),
            fencing: None,
            key: None,
        };
        Arc::new(Cluster {
            members: Mutex::new(vec![me.clone()]),
            me,
            backend: config::Backend::Embedded,
            etcd: None,
            prefix: String::new(),
            leadership: watch::channel(leadership).1,
            leading: watch::channel(true).1,
            peers: Mutex::default(),
            etcd_health: Mutex::new(None),
            log: OnceLock::new(),
            store_alert: Mutex::default(),
            relay: Relay::new(false),
            relayed: Default::default(),
            relay_missed: Default::default(),
            warm_relay: WarmRelay::default(),
            warm_pull_failing: Default::default(),
            store: StoreHealth::embedded(),
            stop: CancellationToken::new(),
            client: peers::client(),
        })
    }

    /// Connects to etcd (authenticating with `store.user` when set) and joins the
    /// election as `id` (see the module docs).
    pub async fn open_etcd(
        config: &StoreConfig,
        id: String,
        api: String,
    ) -> Result<(Arc<Cluster>, Etcd), ClusterError> {
        let tls = match &config.tls {
            Some(t) => {
                let read = |p: &std::path::Path| {
                    std::fs::read(p).map_err(|source| ClusterError::TlsFile {
                        path: p.display().to_string(),
                        source,
                    })
                };
                let mut tls = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(read(&t.ca)?));
                if let (Some(c), Some(k)) = (&t.cert, &t.key) {
                    tls = tls.identity(tonic::transport::Identity::from_pem(read(c)?, read(k)?));
                }
                Some(tls)
            }
            None => None,
        };
        let mut etcd = Etcd::connect_with(&config.endpoints, tls)?;
        let stop = CancellationToken::new();
        if let (Some(user), Some(file)) = (&config.user, &config.password_file) {
            let password =
                std::fs::read_to_string(file).map_err(|source| ClusterError::PasswordFile {
                    path: file.display().to_string(),
                    source,
                })?;
            let password = password.lines().next().unwrap_or_default().to_owned();
            etcd = etcd.with_credentials(etcd::Credentials {
                user: user.clone(),
                password,
            });
            etcd.authenticate().await.map_err(|s| ClusterError::Auth {
                user: user.clone(),
                message: s.message().to_owned(),
            })?;
            let (refresh, stopped) = (etcd.clone(), stop.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = stopped.cancelled() => {}
                    _ = refresh.keep_authenticated() => {}
                }
            });
        }
        // The prefix's schema, before the election is joined: a coordinator older than the
        // state there takes no part in the cluster.
        if let Err(e) = crate::schema::open_etcd(&etcd, &config.prefix).await {
            stop.cancel();
            return Err(e.into());
        }
        let me = Member {
            id: id.clone(),
            api,
            started_at_ms: now_ms(),
        };
        let member_key = format!("{}members/{id}", config.prefix).into_bytes();
        let member_value = serde_json::to_vec(&me).unwrap_or_default();
        let leadership = leader::campaign_with_member(
            etcd.clone(),
            &format!("{}leader", config.prefix),
            &id,
            Duration::from_secs(config.lease_ttl_s),
            Some((member_key, member_value)),
            stop.clone(),
        );
        let (leading_tx, leading) = watch::channel(false);
        let mut follow = leadership.clone();
        tokio::spawn(async move {
            loop {
                let me = follow.borrow_and_update().me;
                leading_tx.send_if_modified(|d| std::mem::replace(d, me) != me);
                if follow.changed().await.is_err() {
                    return;
                }
            }
        });
        let cluster = Arc::new(Cluster {
            members: Mutex::new(vec![me.clone()]),
            me,
            backend: config::Backend::Etcd,
            etcd: Some(etcd.clone()),
            prefix: config.prefix.clone(),
            leadership,
            leading,
            peers: Mutex::default(),
            etcd_health: Mutex::new(None),
            log: OnceLock::new(),
            store_alert: Mutex::default(),
            relay: Relay::new(true),
            relayed: Default::default(),
            relay_missed: Default::default(),
            warm_relay: WarmRelay::default(),
            warm_pull_failing: Default::default(),
            store: StoreHealth::new(),
            stop,
            client: peers::client(),
        });
        Ok((cluster, etcd))
    }

    pub fn id(&self) -> &str {
        &self.me.id
    }

    /// A `GET` of `path` on the leader's API (a follower serving what only the leader
    /// holds live, such as its warm jobs' rates); an error if this coordinator leads, no
    /// leader is known, or it does not answer 200 within a second or so.
    pub async fn read_from_leader(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> Result<axum::body::Bytes, LeaderReadError> {
        let (role, leader) = self.role();
        let leader = match (role, leader) {
            (Role::Follower, Some(l)) if l != self.me.id => l,
            _ => return Err(LeaderReadError::NoOtherLeader),
        };
        let api = self
            .members
            .locked()
            .iter()
            .find(|m| m.id == leader)
            .map(|m| m.api.clone())
            .ok_or_else(|| LeaderReadError::NotAMember(leader.clone()))?;
        Ok(peers::get_bytes(&self.client, &format!("{api}{path}"), token).await?)
    }

    /// Whether this coordinator has peers to share with (`[store] backend = "etcd"`).
    pub fn is_clustered(&self) -> bool {
        matches!(self.backend, config::Backend::Etcd)
    }

    /// Whether the shared store answers (always, embedded): one handle for every part
    /// that talks to etcd to report into and read.
    pub fn store_health(&self) -> &StoreHealth {
        &self.store
    }

    /// A peer that said, within [`crate::edges::REMOTE_TTL`], that it reaches the store
    /// (the first by id).
    pub fn peer_reaching_store(&self) -> Option<String> {
        let peers = self.peers.locked();
        let mut reaching: Vec<&String> = peers
            .iter()
            .filter(|(_, p)| {
                p.heard
                    .is_some_and(|h| h.elapsed() < crate::edges::REMOTE_TTL)
                    && p.status.as_ref().and_then(|s| s.store_reachable) == Some(true)
            })
            .map(|(id, _)| id)
            .collect();
        reaching.sort();
        reaching.first().map(|id| (*id).clone())
    }

    /// This coordinator's agents' reports for the peers (see `relay`).
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// Warm work for the followers' agents (see `warm_relay`).
    pub fn warm_relay(&self) -> &WarmRelay {
        &self.warm_relay
    }

    /// Registers the relay's counters (reports read from the peers, and those that
    /// dropped out of a peer's buffer before they were read).
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(collector(self.clone(), |c, e| {
            use std::sync::atomic::Ordering::Relaxed;
            counter_value(
                e,
                "coordinator_cluster_reports_relayed_total",
                "Probe results and counter samples read from the other coordinators' agents.",
                c.relayed.load(Relaxed),
            )?;
            counter_value(
                e,
                "coordinator_cluster_reports_missed_total",
                "Reports that dropped out of another coordinator's buffer before they were read.",
                c.relay_missed.load(Relaxed),
            )?;
            let view = c.view();
            gauge_value(
                e,
                "coordinator_cluster_is_leader",
                "1 while this coordinator leads the cluster.",
                u64::from(view.role == Role::Leader),
            )?;
            gauge(
                e,
                "coordinator_cluster_leader",
                "1 for the coordinator this one names as leader (no sample while none is known).",
                view.leader
                    .iter()
                    .map(|l| ([("id", Label(l.as_str()))], 1u64)),
            )?;
            if let Some(r) = view.store_reachable {
                gauge_value(
                    e,
                    "coordinator_cluster_store_reachable",
                    "1 while this coordinator reaches its store (etcd), 0 while it does not (absent before the first answer).",
                    u64::from(r),
                )?;
            }
            gauge_value(
                e,
                "coordinator_cluster_members",
                "Coordinators of the cluster this one knows (itself included).",
                view.members.len() as u64,
            )?;
            gauge(
                e,
                "coordinator_cluster_member_last_heard_seconds",
                "Since each other coordinator's self record last came.",
                view.members.iter().filter_map(|m| {
                    let ago = m.last_heard_ms_ago? as f64 / 1000.0;
                    Some(([("member", Label(m.id.as_str()))], ago))
                }),
            )
        }));
    }

    /// The purge log whose spool depth the view reports (set once at start).
    pub fn set_log(&self, log: PurgeLog) {
        let _ = self.log.set(log);
    }

    fn spool_depth(&self) -> u64 {
        self.log.get().map(PurgeLog::spool_depth).unwrap_or(0)
    }

    /// Who leads, as it changes (fenced writes read [`Leadership::fence`]).
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    /// `true` while this coordinator leads (singleton duties run only then).
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    pub fn leads(&self) -> bool {
        *self.leading.borrow()
    }

    /// This coordinator's role and the leader's id, never contradicting each other (see
    /// the module docs): `leader` only with its own id, a follower never names itself nor
    /// a leader whose last self record did not come (null then).
    pub fn role(&self) -> (Role, Option<String>) {
        let l = self.leadership.borrow().clone();
        if l.me {
            return (Role::Leader, Some(self.me.id.clone()));
        }
        let leader = l
            .leader
            .filter(|id| *id != self.me.id)
            .filter(|id| self.confirms_lead(id, l.fencing));
        (Role::Follower, leader)
    }

    /// Whether peer `id` may be named leader of the term at `fencing`: it answered its
    /// last self-record ask and, if that record knew this term, did not say it is a
    /// follower (yes when not asked yet). The election's last word outlives a lease that
    /// etcd without quorum cannot renew: the peer's own word is fresher. A record from
    /// before the term (the peer had not won yet) does not count against it.
    fn confirms_lead(&self, id: &str, fencing: Option<i64>) -> bool {
        self.peers.locked().get(id).is_none_or(|p| {
            p.answering
                && p.status.as_ref().is_none_or(|s| {
                    s.role == Role::Leader || s.fencing.is_none() || s.fencing < fencing
                })
        })
    }

    /// This coordinator as it sees itself (what its peers ask for).
    pub fn status(&self) -> MemberStatus {
        let (role, leader) = self.role();
        MemberStatus {
            id: self.me.id.clone(),
            api: self.me.api.clone(),
            role,
            leader,
            store_reachable: self.store.reachable(),
            spool_depth: self.spool_depth(),
            store_alert: self.store_alert.locked().sent(),
            fencing: self.leadership.borrow().fencing,
            refused: Vec::new(),
        }
    }

    pub fn view(&self) -> ClusterView {
        let (role, leader) = self.role();
        let reach = self.store.get();
        let spool_depth = self.spool_depth();
        let peers = self.peers.locked();
        let members = self
            .members
            .locked()
            .iter()
            .map(|m| {
                if m.id == self.me.id {
                    return MemberView {
                        id: m.id.clone(),
                        api: m.api.clone(),
                        started_at_ms: m.started_at_ms,
                        role: Some(role),
                        last_heard_ms_ago: None,
                        store_reachable: reach.reachable,
                        spool_depth: Some(spool_depth),
                    };
                }
                let sight = peers.get(&m.id);
                let heard = sight.and_then(|p| p.heard);
                let fresh = sight
                    .filter(|_| heard.is_some_and(|h| h.elapsed() < store_alert::IN_SIGHT))
                    .and_then(|p| p.status.as_ref());
                MemberView {
                    id: m.id.clone(),
                    api: m.api.clone(),
                    started_at_ms: m.started_at_ms,
                    role: fresh.map(|s| s.role),
                    last_heard_ms_ago: heard.map(|h| h.elapsed().as_millis() as u64),
                    store_reachable: fresh.and_then(|s| s.store_reachable),
                    spool_depth: fresh.map(|s| s.spool_depth),
                }
            })
            .collect();
        drop(peers);
        // A status taken before this coordinator lost etcd is not shown as healthy.
        let etcd = self.etcd_health.locked().clone().map(|(at_ms, mut list)| {
            if reach.reachable == Some(false) && at_ms <= reach.since_ms {
                for m in list.iter_mut().filter(|m| m.healthy) {
                    m.healthy = false;
                    m.error = Some(format!(
                        "not reachable from this coordinator: {}",
                        reach.error.as_deref().unwrap_or("no answer")
                    ));
                }
            }
            list
        });
        ClusterView {
            fencing: self
                .leadership
                .borrow()
                .fencing
                .filter(|_| leader.is_some()),
            role,
            leader,
            id: self.me.id.clone(),
            store: self.backend,
            store_reachable: reach.reachable,
            store_error: reach.error,
            spool_depth,
            members,
            etcd,
        }
    }

    /// Asks etcd's members for their status every few seconds (each may take a second
    /// to not answer), for the view.
    async fn follow_etcd_health(self: Arc<Self>, etcd: Etcd, shutdown: CancellationToken) {
        loop {
            let health: Vec<EtcdMemberView> = etcd
                .member_status(Duration::from_secs(1))
                .await
                .into_iter()
                .map(|m| EtcdMemberView {
                    endpoint: m.endpoint,
                    healthy: m.healthy,
                    version: m.version,
                    error: m.error,
                })
                .collect();
            if health.iter().any(|m| m.healthy) {
                self.store.succeeded();
            } else {
                self.store
                    .failed("no etcd member answers with a raft leader");
            }
            *self.etcd_health.locked() = Some((now_ms(), health));
            // Sooner while the store is unreachable: its return shows within a second or two.
            let pause = if self.store.reachable() == Some(false) {
                1
            } else {
                3
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(pause)) => {}
            }
        }
    }

    /// The coordinators in sight (this one, and the peers heard from within
    /// `store_alert::IN_SIGHT`) for the store alert.
    fn in_sight(&self) -> Vec<store_alert::Seen> {
        let mine = self.status();
        let mut out = vec![store_alert::Seen {
            id: mine.id,
            store_reachable: mine.store_reachable,
            alert: mine.store_alert,
        }];
        let peers = self.peers.locked();
        for (id, p) in peers.iter() {
            let recent = p.heard.is_some_and(|h| h.elapsed() < store_alert::IN_SIGHT);
            if let Some(s) = p.status.as_ref().filter(|_| recent) {
                out.push(store_alert::Seen {
                    id: id.clone(),
                    store_reachable: s.store_reachable,
                    alert: s.store_alert,
                });
            }
        }
        out
    }

    /// One round of the store alert: sends it when this coordinator is the one to.
    fn store_alert_round(&self, monitor: &Arc<Monitor>) {
        let sight = self.in_sight();
        let event = self
            .store_alert
            .locked()
            .step(&self.me.id, &sight, Instant::now());
        let Some(event) = event else { return };
        let mut ids: Vec<String> = sight.iter().map(|s| s.id.clone()).collect();
        ids.sort();
        let blind: Vec<&str> = sight
            .iter()
            .filter(|s| s.store_reachable == Some(false))
            .map(|s| s.id.as_str())
            .collect();
        let text = match event {
            store_alert::Event::StoreUnreachable => format!(
                "🔴 etcd unreachable from {} of {} coordinators ({}): purges are spooled on each coordinator, regions no coordinator can see read unknown",
                blind.len(),
                ids.len(),
                blind.join(", ")
            ),
            store_alert::Event::StoreBack => format!(
                "🟢 etcd reachable again ({} of {} coordinators reach it)",
                ids.len() - blind.len(),
                ids.len()
            ),
        };
        let coordinators: Vec<serde_json::Value> = sight
            .iter()
            .map(|s| serde_json::json!({"id": s.id, "store_reachable": s.store_reachable}))
            .collect();
        tracing::warn!(event = event.as_str(), %text, "cluster alert");
        let monitor = monitor.clone();
        tokio::spawn(async move {
            monitor
                .send_cluster_alert(event.as_str(), &text, coordinators)
                .await;
        });
    }

    /// Follows the members, their edges, their agents' reports and etcd's health until
    /// `shutdown`; then resigns the leadership, so a successor need not wait for the
    /// lease.
    pub async fn run(
        self: Arc<Self>,
        views: PeerViews,
        tokens: crate::tokens::Tokens,
        shutdown: CancellationToken,
    ) {
        let Some(etcd) = self.etcd.clone() else {
            return;
        };
        let views = Arc::new(views);
        let client = self.client.clone();
        tokio::spawn(
            self.clone()
                .follow_etcd_health(etcd.clone(), shutdown.clone()),
        );
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Per peer: its relay instance and the next report to read.
        let mut cursors: HashMap<String, (u64, u64)> = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            // The peers are asked (the members last listed: blind to etcd, still asked)
            // while etcd is asked for the members: a silent etcd delays nothing.
            let known = self.members.locked().clone();
            let bearer = tokens.peer_secret();
            let leader = self.role().1;
            let warm_pull = known
                .iter()
                .find(|m| !self.leads() && Some(&m.id) == leader.as_ref() && m.id != self.me.id)
                .map(|m| {
                    let (me, client, views, bearer, api) = (
                        self.clone(),
                        client.clone(),
                        views.clone(),
                        bearer.clone(),
                        m.api.clone(),
                    );
                    tokio::spawn(async move {
                        me.pull_warm(&client, &api, &views, bearer.as_deref()).await;
                    })
                });
            let asks: Vec<_> = known
                .into_iter()
                .filter(|m| m.id != self.me.id)
                .map(|m| {
                    let cursor = cursors.get(&m.id).copied().unwrap_or_default();
                    let (me, client, views, bearer) =
                        (self.clone(), client.clone(), views.clone(), bearer.clone());
                    tokio::spawn(async move {
                        let cursor = me.ask(&client, &m, &views, bearer.as_deref(), cursor).await;
                        (m.id, cursor)
                    })
                })
                .collect();
            match tokio::time::timeout(LIST_TIMEOUT, self.list_members(&etcd)).await {
                Ok(Ok(mut list)) => {
                    self.store.succeeded();
                    // Its own record is back with its next lease; it is a member now. A
                    // peer whose lease lapsed while it still answers (cut off from etcd,
                    // not from us) is still there, and so are its agents.
                    let answering: Vec<Member> = {
                        let peers = self.peers.locked();
                        self.members
                            .locked()
                            .iter()
                            .filter(|m| {
                                m.id == self.me.id || peers.get(&m.id).is_some_and(|p| p.answering)
                            })
                            .cloned()
                            .collect()
                    };
                    for m in answering {
                        if !list.iter().any(|l| l.id == m.id) {
                            list.push(m);
                        }
                    }
                    list.sort_by(|a, b| a.id.cmp(&b.id));
                    let ids: Vec<String> = list.iter().map(|m| m.id.clone()).collect();
                    // A peer whose lease is gone from an etcd this coordinator reads, and
                    // that no longer answers, is gone for real (not merely out of sight).
                    views.edges.keep_peers(&ids);
                    self.peers.locked().retain(|id, _| ids.contains(id));
                    *self.members.locked() = list;
                }
                Ok(Err(e)) => self
                    .store
                    .failed(&format!("listing members: {}", e.message())),
                Err(_) => self.store.failed("listing members: no answer"),
            }
            for ask in asks {
                if let Ok((id, cursor)) = ask.await {
                    cursors.insert(id, cursor);
                }
            }
            if let Some(pull) = warm_pull {
                let _ = pull.await;
            }
            let ids: Vec<String> = self.members.locked().iter().map(|m| m.id.clone()).collect();
            cursors.retain(|id, _| ids.contains(id));
            self.warm_relay.expire(self.leads(), &ids, &views.warm);
            self.store_alert_round(&views.monitor);
        }
        self.stop.cancel();
        // The campaign resigns and revokes its lease as it ends (its tasks drop their
        // senders then): wait for that, briefly, so a successor need not wait the TTL.
        let mut l = self.leadership.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while l.changed().await.is_ok() {}
        })
        .await;
    }

    /// One round with peer `m`: its self record, its edges, their config state and its agents' reports
    /// from `cursor` on; returns where to read its reports next time.
    async fn ask(
        &self,
        client: &peers::PeerClient,
        m: &Member,
        views: &PeerViews,
        bearer: Option<&str>,
        cursor: (u64, u64),
    ) -> (u64, u64) {
        let status = peers::status(client, &m.api, bearer).await;
        let answered = status.is_ok();
        {
            let mut all = self.peers.locked();
            let sight = all.entry(m.id.clone()).or_default();
            sight.answering = answered;
            match status {
                Ok(mut s) => {
                    sight.heard = Some(Instant::now());
                    views
                        .edges
                        .set_remote_refusals(&m.id, std::mem::take(&mut s.refused));
                    sight.status = Some(s);
                }
                Err(e) => tracing::debug!(peer = %m.id, error = %e, "peer's self record not read"),
            }
        }
        if !answered {
            // Silent: its other answers would only time out too (the round waits for them).
            return cursor;
        }
        let since = views.edges.acks_since(&m.id);
        match peers::edges(client, &m.api, bearer, since).await {
            Ok(list) => views.edges.set_remote_with_history(&m.id, list),
            Err(e) => tracing::debug!(peer = %m.id, error = %e, "peer's edges not read"),
        }
        match peers::config(client, &m.api, bearer).await {
            Ok(view) => views.rollouts.set_remote(&m.id, view.edges),
            Err(e) => tracing::debug!(peer = %m.id, error = %e, "peer's config state not read"),
        }
        match peers::reports(client, &m.api, bearer, cursor).await {
            Ok(batch) => self.take(&m.id, views, batch),
            Err(e) => {
                tracing::debug!(peer = %m.id, error = %e, "peer's agent reports not read");
                cursor
            }
        }
    }

    /// A follower's warm pull: its sessions and acks to the leader at `api`, the work
    /// for them back (`warm_relay`).
    async fn pull_warm(
        &self,
        client: &peers::PeerClient,
        api: &str,
        views: &PeerViews,
        bearer: Option<&str>,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let pull = self.warm_relay.pull(&self.me.id, &views.warm);
        match peers::warm(client, api, bearer, &pull).await {
            Ok(batch) => {
                if self.warm_pull_failing.swap(false, Relaxed) {
                    tracing::info!(
                        leader = api,
                        "warm work reaches this coordinator's agents again"
                    );
                }
                self.warm_relay.accept(batch, &views.warm);
            }
            // 409: it does not lead (any more); the election names the next one soon.
            Err(e) if e.answered(hyper::StatusCode::CONFLICT) => {
                tracing::debug!(peer = api, error = %e, "asked for warm work: not the leader now")
            }
            // Said once per failure spell: a refused token would repeat every second.
            Err(e) if !self.warm_pull_failing.swap(true, Relaxed) => {
                let hint = (e.answered(hyper::StatusCode::UNAUTHORIZED)
                    || e.answered(hyper::StatusCode::FORBIDDEN))
                .then_some("the same [api] token_file on every coordinator?");
                tracing::warn!(
                    leader = api, error = %e, hint,
                    "cannot ask the leader for warm work: this coordinator's agents get no warm shards"
                )
            }
            Err(_) => {}
        }
    }

    /// Records a peer's agents' reports as if this coordinator's own agents had sent
    /// them, except for an edge whose session is here now (its own reports count).
    fn take(&self, peer: &str, views: &PeerViews, batch: RelayBatch) -> (u64, u64) {
        use proto::edge::agent_message::Msg;
        use std::sync::atomic::Ordering::Relaxed;
        self.relayed.fetch_add(batch.reports.len() as u64, Relaxed);
        if batch.missed > 0 {
            self.relay_missed.fetch_add(batch.missed, Relaxed);
            tracing::warn!(
                peer,
                missed = batch.missed,
                "peer's agent reports dropped out of its buffer before they were read"
            );
        }
        for r in batch.reports {
            if views.edges.is_connected_here(&r.edge_id) {
                continue;
            }
            match r.report.and_then(|m| m.msg) {
                Some(Msg::Probe(p)) => views.monitor.record_relayed(&r.region, p),
                Some(Msg::Stats(s)) => views.traffic.record_relayed(&r.edge_id, &r.region, s),
                Some(Msg::WarmProgress(p)) => {
                    // Only from the follower whose session stands in (`warm_relay`).
                    if let Some(vid) = self.warm_relay.vid_of(&r.edge_id, peer) {
                        views.warm.on_progress(&r.edge_id, vid, p);
                    }
                }
                Some(Msg::TopUrls(top)) => views.warm.on_top(&r.edge_id, &r.region, top),
                Some(Msg::ClientNets(nets)) => {
                    if let Some(geo) = &views.geo {
                        geo.record_clients(&r.region, &crate::geo::client_nets(&nets));
                    }
                }
                _ => {}
            }
        }
        (batch.instance, batch.next)
    }

    async fn list_members(&self, etcd: &Etcd) -> Result<Vec<Member>, tonic::Status> {
        let prefix = format!("{}members/", self.prefix).into_bytes();
        let req = RangeRequest {
            range_end: etcd::prefix_end(&prefix),
            key: prefix,
            ..Default::default()
        };
        let resp = etcd.range(req).await?;
        let mut list: Vec<Member> = resp
            .kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(list)
    }
}
