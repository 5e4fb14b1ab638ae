//! Leader election on etcd, for the duties only one coordinator may run (purge-log
//! retention; see ARCHITECTURE.md for what else is meant to move here).
//!
//! [`campaign`] runs etcd's election service: a lease of `ttl` kept alive from here, a
//! campaign on the election name that returns once this coordinator holds the oldest key
//! under it, and an observer that follows who leads. It publishes a [`Leadership`] on a
//! `watch` channel: whether this coordinator leads, who does, and the **fencing token**,
//! the creation revision of the leader's key. A singleton write is made conditional on
//! that revision (a txn comparing the leader key's create revision), so a deposed leader
//! that has not noticed yet (a pause, a partition) cannot write: its key is gone. When
//! the lease cannot be renewed (etcd unreachable past the TTL, a long pause), this side
//! stops calling itself leader *before* the lease can expire on the server, then
//! campaigns again.

use std::time::{Duration, Instant};

use etcd::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest, PutRequest,
};
use etcd::v3electionpb::{CampaignRequest, LeaderKey, LeaderRequest, ResignRequest};
use etcd::Etcd;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Who leads, as this coordinator knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leadership {
    /// This coordinator holds the leadership now.
    pub me: bool,
    /// The leader's id (its election value), when one is known.
    pub leader: Option<String>,
    /// The leader key's creation revision: the fencing token for singleton writes.
    pub fencing: Option<i64>,
    /// This coordinator's leader key while it leads (what a fenced write compares).
    pub key: Option<Vec<u8>>,
}

impl Leadership {
    /// The guard a singleton write carries: "my leader key still exists with the
    /// revision it was created at". `None` unless this coordinator leads.
    pub fn fence(&self) -> Option<etcd::etcdserverpb::Compare> {
        let key = self.key.as_ref().filter(|_| self.me)?;
        Some(etcd::op::created_at(key, self.fencing?))
    }
}

/// Campaigns for `name` as `id` until `shutdown`, re-campaigning whenever leadership is
/// lost; the receiver follows every change.
pub fn campaign(
    etcd: Etcd,
    name: &str,
    id: &str,
    ttl: Duration,
    shutdown: CancellationToken,
) -> watch::Receiver<Leadership> {
    campaign_with_member(etcd, name, id, ttl, None, shutdown)
}

/// [`campaign`], also putting `member` (key, value) under each term's lease: the
/// coordinator's membership record lives exactly as long as its lease.
pub fn campaign_with_member(
    etcd: Etcd,
    name: &str,
    id: &str,
    ttl: Duration,
    member: Option<(Vec<u8>, Vec<u8>)>,
    shutdown: CancellationToken,
) -> watch::Receiver<Leadership> {
    let (tx, rx) = watch::channel(Leadership::default());
    let (name, id) = (name.as_bytes().to_vec(), id.to_owned());
    tokio::spawn(observe(
        etcd.clone(),
        name.clone(),
        tx.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(async move {
        let ttl_s = ttl.as_secs().max(2) as i64;
        while !shutdown.is_cancelled() {
            if let Err(e) = hold(&etcd, &name, &id, ttl_s, member.as_ref(), &tx, &shutdown).await {
                tracing::warn!(error = %e, "leader election: retrying");
            }
            tx.send_modify(|l| l.me = false);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    });
    rx
}

/// One term: lease, campaign, keep the lease alive until it is lost or `shutdown`.
async fn hold(
    etcd: &Etcd,
    name: &[u8],
    id: &str,
    ttl_s: i64,
    member: Option<&(Vec<u8>, Vec<u8>)>,
    tx: &watch::Sender<Leadership>,
    shutdown: &CancellationToken,
) -> Result<(), tonic::Status> {
    let lease = etcd
        .lease()
        .lease_grant(LeaseGrantRequest { ttl: ttl_s, id: 0 })
        .await?
        .into_inner()
        .id;
    if let Some((key, value)) = member {
        etcd.kv()
            .put(PutRequest {
                key: key.clone(),
                value: value.clone(),
                lease,
                ..Default::default()
            })
            .await?;
    }
    // Keep-alives every third of the TTL; `renewed` is when the last one was answered.
    let (ka_tx, ka_rx) = tokio::sync::mpsc::channel(4);
    // etcd answers a stream's headers with its first message: send one before waiting.
    let _ = ka_tx.send(LeaseKeepAliveRequest { id: lease }).await;
    let mut answers = etcd
        .lease()
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(ka_rx))
        .await?
        .into_inner();
    let every = Duration::from_millis((ttl_s as u64 * 1000) / 3);
    let mut renewed = Instant::now();
    // A campaign waits until this coordinator is the oldest candidate: on a channel
    // without the client's request timeout (etcd resigns a candidate whose campaign call
    // is cut short, deleting its key).
    let mut election = etcd.election_waiting();
    let campaign = election.campaign(CampaignRequest {
        name: name.to_vec(),
        lease,
        value: id.as_bytes().to_vec(),
    });
    tokio::pin!(campaign);
    let mut key: Option<LeaderKey> = None;
    let mut tick = tokio::time::interval(every);
    let lost = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break false,
            r = &mut campaign, if key.is_none() => {
                let leader = r?.into_inner().leader;
                let fencing = leader.as_ref().map(|l| l.rev);
                let leader_key = leader.as_ref().map(|l| l.key.clone());
                key = leader;
                tx.send_modify(|l| {
                    l.me = true;
                    l.leader = Some(id.to_owned());
                    l.fencing = fencing;
                    l.key = leader_key;
                });
                tracing::info!(fencing = ?fencing, "leader: this coordinator leads");
            }
            _ = tick.tick() => {
                if ka_tx.send(LeaseKeepAliveRequest { id: lease }).await.is_err() {
                    break true;
                }
                // Step down before the server can expire the lease: a deposed leader
                // must not act on a term it no longer holds.
                if renewed.elapsed() > Duration::from_millis((ttl_s as u64 * 1000) * 2 / 3) {
                    break true;
                }
            }
            a = answers.message() => match a {
                Ok(Some(r)) if r.ttl > 0 => renewed = Instant::now(),
                _ => break true,
            },
        }
    };
    if key.is_some() && lost {
        tracing::warn!("leader: lease not renewed in time; stepping down");
    }
    tx.send_modify(|l| {
        // Its own lease lost, it no longer knows who leads (the observer names the next).
        // It keeps the term's fencing revision: the newest term it knows, which tells its
        // peers its word "follower" is about that term (`Cluster::role`).
        if l.me {
            l.leader = None;
        }
        l.me = false;
        l.key = None;
    });
    // Best effort: resign and revoke so a successor need not wait for the TTL.
    if let Some(leader) = key {
        let _ = etcd
            .election()
            .resign(ResignRequest {
                leader: Some(leader),
            })
            .await;
    }
    let _ = etcd
        .lease()
        .lease_revoke(LeaseRevokeRequest { id: lease })
        .await;
    Ok(())
}

/// Follows who leads (for every coordinator, leader or not).
async fn observe(
    etcd: Etcd,
    name: Vec<u8>,
    tx: watch::Sender<Leadership>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let stream = etcd
            .election()
            .observe(LeaderRequest { name: name.clone() })
            .await;
        if let Ok(stream) = stream {
            let mut stream = stream.into_inner();
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = stream.message() => n,
                };
                let Ok(Some(resp)) = next else { break };
                if let Some(kv) = resp.kv {
                    let leader = String::from_utf8_lossy(&kv.value).into_owned();
                    tx.send_modify(|l| {
                        l.fencing = Some(kv.create_revision);
                        l.leader = Some(leader);
                    });
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
