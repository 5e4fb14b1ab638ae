//! etcd's v3 API as generated gRPC clients, and [`Etcd`], a handle on a cluster.
//!
//! The types come from etcd's own .proto files (v3.5, `proto/`), compiled at build time by
//! protox; no system `protoc` is needed. [`Etcd::connect`] keeps one lazily connected
//! channel per member and a current one; the per-service clients ([`Etcd::kv`],
//! [`Etcd::watch`], [`Etcd::lease`], [`Etcd::election`]: etcd's server-side election
//! service, whose leader key revision is a fencing token) use the current member, and
//! [`Etcd::retry`] moves to the next member when one is unavailable. Only a member
//! that is down (`Unavailable`, or `Cancelled` when it dropped the connection mid-call)
//! is retried; a write retried that way may have been applied once already, so writes
//! that must not repeat carry a compare guard (a txn on a revision), which a repeat
//! fails. With [`Etcd::with_credentials`], every request carries etcd's auth token
//! ([`auth`]). [`ListWatch`] follows a key range: a listing, then a watch from the
//! listing's revision, listed again when the watch breaks or is compacted ([`watch`]).

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

pub mod auth;
pub mod watch;

pub use auth::Credentials;
pub use watch::{ListWatch, Update, Watching};

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use auth::{Auth, Token};
use etcdserverpb::{
    auth_client::AuthClient, kv_client::KvClient, lease_client::LeaseClient,
    maintenance_client::MaintenanceClient, watch_client::WatchClient, AuthenticateRequest,
    StatusRequest,
};
use tonic::service::interceptor::InterceptedService;
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

/// A member's channel with the auth token added to each request (when there is one).
pub type Service = InterceptedService<Channel, Token>;

/// A cluster handle; cheap to clone (the channels are shared).
#[derive(Debug, Clone)]
pub struct Etcd {
    members: Arc<Vec<(String, Channel)>>,
    /// Per member, a channel without the request timeout, for calls that wait by design
    /// (an election campaign waits until it wins).
    waiting: Arc<Vec<Channel>>,
    current: Arc<AtomicUsize>,
    auth: Option<Arc<Auth>>,
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
        let mut waiting = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let endpoint = Endpoint::from_shared(e.clone())
                .map_err(|err| EtcdError::Endpoint {
                    endpoint: e.clone(),
                    message: err.to_string(),
                })?
                .connect_timeout(Duration::from_secs(2))
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
            waiting.push(endpoint.connect_lazy());
            let bounded = endpoint.timeout(Duration::from_secs(10));
            list.push((e.clone(), bounded.connect_lazy()));
        }
        Ok(Etcd {
            members: Arc::new(list),
            waiting: Arc::new(waiting),
            current: Arc::new(AtomicUsize::new(0)),
            auth: None,
        })
    }

    /// The same handle, authenticating as `credentials` (call [`Self::authenticate`]
    /// before the first request, and keep [`Self::keep_authenticated`] running).
    pub fn with_credentials(mut self, credentials: Credentials) -> Etcd {
        self.auth = Some(Arc::new(Auth::new(credentials)));
        self
    }

    /// Exchanges the credentials for a token, asking each member in turn until one
    /// answers; without credentials, nothing to do. A wrong user or password is an
    /// error at once (`InvalidArgument` from etcd), not retried.
    pub async fn authenticate(&self) -> Result<(), tonic::Status> {
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        let req = AuthenticateRequest {
            name: auth.credentials.user.clone(),
            password: auth.credentials.password.clone(),
        };
        let n = self.members.len();
        let mut last = None;
        for k in 0..n {
            let i = (self.current.load(Ordering::Relaxed) + k) % n;
            match AuthClient::new(self.members[i].1.clone())
                .authenticate(req.clone())
                .await
            {
                Ok(r) if auth.set(&r.get_ref().token) => return Ok(()),
                Ok(_) => {
                    return Err(tonic::Status::internal(
                        "etcd sent a token that is not ASCII",
                    ))
                }
                Err(s) if member_down(&s) => last = Some(s),
                Err(s) => return Err(s),
            }
        }
        Err(last.unwrap_or_else(|| tonic::Status::unavailable("no etcd member")))
    }

    /// From [`Self::authenticate`] on, asks for a fresh token every
    /// [`auth::REFRESH_EVERY`], forever (spawn it, and abort it when done); a failed
    /// attempt is tried again after 2 s.
    pub async fn keep_authenticated(self) {
        if self.auth.is_none() {
            return std::future::pending().await;
        }
        let mut wait = auth::REFRESH_EVERY;
        loop {
            tokio::time::sleep(wait).await;
            wait = match self.authenticate().await {
                Ok(()) => auth::REFRESH_EVERY,
                Err(s) => {
                    tracing::warn!(error = %s.message(), "etcd authentication failed; trying again");
                    Duration::from_secs(2)
                }
            };
        }
    }

    /// The member in use now, with the auth token on every request.
    pub fn channel(&self) -> Service {
        let i = self.current.load(Ordering::Relaxed) % self.members.len();
        self.service(i)
    }

    fn service(&self, i: usize) -> Service {
        InterceptedService::new(self.members[i].1.clone(), Token(self.auth.clone()))
    }

    /// Runs `call` on the current member; when that member is unavailable, moves on to
    /// the next and calls again, trying each member twice at most. When etcd says the
    /// token is invalid (it expired), authenticates again and calls once more.
    pub async fn retry<T, F, Fut>(&self, mut call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Service) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let n = self.members.len();
        let mut last = None;
        let mut reauthenticated = false;
        for _ in 0..2 * n {
            let i = self.current.load(Ordering::Relaxed) % n;
            match call(self.service(i)).await {
                Err(s) if self.auth.is_some() && !reauthenticated && auth::is_token_error(&s) => {
                    tracing::debug!(error = %s.message(), "etcd token refused; authenticating again");
                    reauthenticated = true;
                    self.authenticate().await?;
                    last = Some(s);
                }
                Err(s) if member_down(&s) => {
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

    pub fn kv(&self) -> KvClient<Service> {
        KvClient::new(self.channel())
    }

    pub fn watch(&self) -> WatchClient<Service> {
        WatchClient::new(self.channel())
    }

    pub fn lease(&self) -> LeaseClient<Service> {
        LeaseClient::new(self.channel())
    }

    pub fn election(&self) -> ElectionClient<Service> {
        ElectionClient::new(self.channel())
    }

    /// [`Self::election`] on a channel without the request timeout, for `campaign`,
    /// which waits until this candidate leads: cut short, etcd resigns the candidate
    /// (deleting its key) and it goes to the back of the queue.
    pub fn election_waiting(&self) -> ElectionClient<Service> {
        let i = self.current.load(Ordering::Relaxed) % self.waiting.len();
        ElectionClient::new(InterceptedService::new(
            self.waiting[i].clone(),
            Token(self.auth.clone()),
        ))
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
        let req = etcdserverpb::TxnRequest {
            compare: vec![op::created_at(key, 0)],
            success: vec![op::put(key, value)],
            failure: vec![op::get(key)],
        };
        let resp = self.txn(req).await?;
        if resp.succeeded {
            return Ok(value.to_vec());
        }
        op::got(resp).ok_or_else(|| tonic::Status::not_found("key vanished"))
    }

    /// Each member's status, asked directly (not through the current member), within
    /// `timeout` each: `Ok` with its version and whether it sees a raft leader, or why
    /// it did not answer.
    pub async fn member_status(&self, timeout: Duration) -> Vec<MemberStatus> {
        let asks = self.members.iter().enumerate().map(|(i, (endpoint, _))| {
            let mut client = MaintenanceClient::new(self.service(i));
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

/// Whether `status` says the member could not be reached or dropped the connection
/// mid-call (a member killed during a request gives `Cancelled`, "connection closed"),
/// rather than answering.
fn member_down(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled
    )
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
    use crate::etcdserverpb::{
        compare, request_op, response_op, Compare, PutRequest, RangeRequest, RequestOp, TxnResponse,
    };

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

    /// Read `key` (a transaction's branch: see [`got`]).
    pub fn get(key: &[u8]) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: key.to_vec(),
                ..Default::default()
            })),
        }
    }

    /// The value the first [`get`] of the branch a transaction took read (`None` if
    /// the key did not exist or the branch read nothing).
    pub fn got(resp: TxnResponse) -> Option<Vec<u8>> {
        resp.responses
            .into_iter()
            .find_map(|r| match r.response {
                Some(response_op::Response::ResponseRange(r)) => Some(r.kvs),
                _ => None,
            })?
            .into_iter()
            .next()
            .map(|kv| kv.value)
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
    fn a_dropped_connection_counts_as_a_member_down() {
        assert!(super::member_down(&tonic::Status::unavailable("refused")));
        assert!(super::member_down(&tonic::Status::cancelled(
            "connection closed"
        )));
        assert!(!super::member_down(&tonic::Status::invalid_argument(
            "bad key"
        )));
        assert!(!super::member_down(&tonic::Status::failed_precondition(
            "compacted"
        )));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(super::prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(super::prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(super::prefix_end(b"\xff"), vec![0]);
    }
}
