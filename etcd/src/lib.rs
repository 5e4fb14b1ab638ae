//! etcd's v3 API as generated gRPC clients, and [`Etcd`], a handle on a cluster.
//!
//! The types come from etcd's own .proto files (v3.5, `proto/`), compiled at build time by
//! protox; no system `protoc` is needed. [`Etcd::connect`] keeps one lazily connected
//! channel per member and a current one; the per-service clients ([`Etcd::kv`],
//! [`Etcd::watch`], [`Etcd::lease`], [`Etcd::election`]: etcd's server-side election
//! service, whose leader key revision is a fencing token) use the current member, and
//! [`Etcd::retry`] moves to the next member when one is unavailable. Only `Unavailable`
//! is retried; a write retried that way may have been applied once already, so writes
//! that must not repeat carry a compare guard (a txn on a revision), which a repeat
//! fails.

#[allow(clippy::all)] // generated from etcd's comments and types
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
#[allow(clippy::all)] // generated from etcd's comments and types
pub mod authpb {
    tonic::include_proto!("authpb");
}
#[allow(clippy::all)] // generated from etcd's comments and types
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
#[allow(clippy::all)] // generated from etcd's comments and types
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcdserverpb::{
    kv_client::KvClient, lease_client::LeaseClient, maintenance_client::MaintenanceClient,
    watch_client::WatchClient, StatusRequest,
};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use v3electionpb::election_client::ElectionClient;

/// Why etcd could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("no etcd endpoints configured")]
    NoEndpoints,
    #[error("etcd: {0}")]
    Status(Box<tonic::Status>),
}

impl From<tonic::Status> for EtcdError {
    fn from(s: tonic::Status) -> Self {
        EtcdError::Status(Box::new(s))
    }
}

/// A cluster handle; cheap to clone (the channels are shared).
#[derive(Debug, Clone)]
pub struct Etcd {
    members: Arc<Vec<(String, Channel)>>,
    current: Arc<AtomicUsize>,
}

impl Etcd {
    /// A channel per member of `endpoints` (`http://host:2379`); they connect lazily, so
    /// a member that is down at start is skipped, not fatal.
    pub fn connect(endpoints: &[String]) -> Result<Etcd, EtcdError> {
        Self::connect_with(endpoints, None)
    }

    /// [`Self::connect`], with TLS (`https://` endpoints: the CA that signed the
    /// members' certificates, and optionally a client certificate) when given.
    pub fn connect_with(
        endpoints: &[String],
        tls: Option<ClientTlsConfig>,
    ) -> Result<Etcd, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let mut list = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let endpoint = Endpoint::from_shared(e.clone())
                .map_err(|err| EtcdError::Endpoint {
                    endpoint: e.clone(),
                    message: err.to_string(),
                })?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(10))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
            let endpoint = match &tls {
                Some(t) => endpoint
                    .tls_config(t.clone())
                    .map_err(|err| EtcdError::Endpoint {
                        endpoint: e.clone(),
                        message: err.to_string(),
                    })?,
                None => endpoint,
            };
            list.push((e.clone(), endpoint.connect_lazy()));
        }
        Ok(Etcd {
            members: Arc::new(list),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The member in use now.
    pub fn channel(&self) -> Channel {
        let i = self.current.load(Ordering::Relaxed) % self.members.len();
        self.members[i].1.clone()
    }

    /// Runs `call` on the current member; when that member is unavailable, moves on to
    /// the next and calls again, trying each member twice at most.
    pub async fn retry<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let n = self.members.len();
        let mut last = None;
        for _ in 0..2 * n {
            let i = self.current.load(Ordering::Relaxed) % n;
            match call(self.members[i].1.clone()).await {
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    tracing::debug!(member = %self.members[i].0, error = %s.message(), "etcd member unavailable; trying the next");
                    let _ = self.current.compare_exchange(
                        i,
                        (i + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    last = Some(s);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| tonic::Status::unavailable("no etcd member")))
    }

    pub fn kv(&self) -> KvClient<Channel> {
        KvClient::new(self.channel())
    }

    pub fn watch(&self) -> WatchClient<Channel> {
        WatchClient::new(self.channel())
    }

    pub fn lease(&self) -> LeaseClient<Channel> {
        LeaseClient::new(self.channel())
    }

    pub fn election(&self) -> ElectionClient<Channel> {
        ElectionClient::new(self.channel())
    }

    /// A range read, on the next member when one is unavailable.
    pub async fn range(
        &self,
        req: etcdserverpb::RangeRequest,
    ) -> Result<etcdserverpb::RangeResponse, tonic::Status> {
        self.retry(|ch| {
            let req = req.clone();
            async move { KvClient::new(ch).range(req).await }
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// A transaction, on the next member when one is unavailable (callers guard it
    /// with a compare, so a repeat of one that did commit fails; see the crate docs).
    pub async fn txn(
        &self,
        req: etcdserverpb::TxnRequest,
    ) -> Result<etcdserverpb::TxnResponse, tonic::Status> {
        self.retry(|ch| {
            let req = req.clone();
            async move { KvClient::new(ch).txn(req).await }
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// A range delete, on the next member when one is unavailable.
    pub async fn delete_range(
        &self,
        req: etcdserverpb::DeleteRangeRequest,
    ) -> Result<etcdserverpb::DeleteRangeResponse, tonic::Status> {
        self.retry(|ch| {
            let req = req.clone();
            async move { KvClient::new(ch).delete_range(req).await }
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// The value at `key`, putting `value` there first if the key does not exist (one
    /// transaction: of two callers racing, both get the value that won).
    pub async fn get_or_create(&self, key: &[u8], value: &[u8]) -> Result<Vec<u8>, tonic::Status> {
        use etcdserverpb::{request_op, response_op, RangeRequest, RequestOp, TxnRequest};
        let req = TxnRequest {
            compare: vec![op::created_at(key, 0)],
            success: vec![op::put(key, value)],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: key.to_vec(),
                    ..Default::default()
                })),
            }],
        };
        let resp = self.txn(req).await?;
        if resp.succeeded {
            return Ok(value.to_vec());
        }
        resp.responses
            .into_iter()
            .find_map(|r| match r.response {
                Some(response_op::Response::ResponseRange(r)) => r.kvs.into_iter().next(),
                _ => None,
            })
            .map(|kv| kv.value)
            .ok_or_else(|| tonic::Status::not_found("key vanished"))
    }

    /// Each member's status, asked directly (not through the current member), within
    /// `timeout` each: `Ok` with its version and whether it sees a raft leader, or why
    /// it did not answer.
    pub async fn member_status(&self, timeout: Duration) -> Vec<MemberStatus> {
        let asks = self.members.iter().map(|(endpoint, ch)| {
            let mut client = MaintenanceClient::new(ch.clone());
            async move {
                let answer = tokio::time::timeout(timeout, client.status(StatusRequest {})).await;
                let (healthy, version, error) = match answer {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        let err = (r.leader == 0)
                            .then(|| "no raft leader".to_owned())
                            .or_else(|| r.errors.first().cloned());
                        (err.is_none(), Some(r.version), err)
                    }
                    Ok(Err(s)) => (false, None, Some(s.message().to_owned())),
                    Err(_) => (false, None, Some("no answer".to_owned())),
                };
                MemberStatus {
                    endpoint: endpoint.clone(),
                    healthy,
                    version,
                    error,
                }
            }
        });
        let mut out = Vec::with_capacity(self.members.len());
        for ask in asks {
            out.push(ask.await);
        }
        out
    }
}

/// One member's answer to a status request.
#[derive(Debug, Clone)]
pub struct MemberStatus {
    pub endpoint: String,
    pub healthy: bool,
    pub version: Option<String>,
    pub error: Option<String>,
}

/// The pieces of transactions every user here builds.
pub mod op {
    use crate::etcdserverpb::{compare, request_op, Compare, PutRequest, RequestOp};

    /// "`key` was created at revision `rev`" (0: `key` does not exist). A leader's
    /// fence is its key at the revision it was created at.
    pub fn created_at(key: &[u8], rev: i64) -> Compare {
        Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Create as i32,
            key: key.to_vec(),
            target_union: Some(compare::TargetUnion::CreateRevision(rev)),
            ..Default::default()
        }
    }

    /// "`key` holds `value`".
    pub fn value_is(key: &[u8], value: &[u8]) -> Compare {
        Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Value as i32,
            key: key.to_vec(),
            target_union: Some(compare::TargetUnion::Value(value.to_vec())),
            ..Default::default()
        }
    }

    /// Put `value` at `key`.
    pub fn put(key: &[u8], value: &[u8]) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
                ..Default::default()
            })),
        }
    }
}

/// The end of the key range that holds every key starting with `prefix` (etcd's
/// `range_end` for a prefix query).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from `prefix` on.
    vec![0]
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_ends() {
        assert_eq!(super::prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(super::prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(super::prefix_end(b"\xff"), vec![0]);
    }
}
