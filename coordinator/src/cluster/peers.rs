//! Asking another coordinator of the cluster for its self record (role, whether it
//! reaches etcd, its spool), the edges it holds, their config state and its agents'
//! reports (`relay`): a `GET` on its API each, bounded by a short
//! timeout (a peer that does not answer is simply not shown after
//! [`crate::edges::REMOTE_TTL`]).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};

use prost::Message;
use proto::edge::{RelayBatch, WarmPull, WarmRelayBatch};

use crate::edges::LocalEdge;
use crate::rollout::BundleView;

/// Why a peer's answer was not read. The text is what the logs show.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The request could not be built (a malformed peer address).
    #[error("{0}")]
    Request(#[from] hyper::http::Error),
    /// No answer, or not all of it, in time.
    #[error("timed out")]
    Timeout,
    /// The connection failed.
    #[error("{0}")]
    Transport(#[from] hyper_util::client::legacy::Error),
    /// It answered, but not 2xx.
    #[error("answered {0}")]
    Status(hyper::StatusCode),
    /// The answer's body broke off or passed [`MAX_ANSWER`].
    #[error("{0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    /// The answer was not the JSON asked for.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// The answer was not the protobuf asked for.
    #[error("{0}")]
    Decode(#[from] prost::DecodeError),
}

impl PeerError {
    /// Whether the peer answered with HTTP status `code`.
    pub fn answered(&self, code: hyper::StatusCode) -> bool {
        matches!(self, PeerError::Status(s) if *s == code)
    }
}

pub(super) type PeerClient = Client<HttpConnector, Full<axum::body::Bytes>>;

/// Largest answer read from a peer (a thousand edges are about 600 KB of JSON).
const MAX_ANSWER: usize = 16 * 1024 * 1024;

pub(super) fn client() -> PeerClient {
    Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// The coordinator at `api` as it sees itself (`GET /api/v1/cluster?scope=local`).
pub(super) async fn status(
    client: &PeerClient,
    api: &str,
    token: Option<&str>,
) -> Result<super::MemberStatus, PeerError> {
    get(client, &format!("{api}/api/v1/cluster?scope=local"), token).await
}

/// The edges whose sessions the coordinator at `api` holds, with their ack points from
/// `acks_since_us` on (`edges::EdgeHistory`).
pub(super) async fn edges(
    client: &PeerClient,
    api: &str,
    token: Option<&str>,
    acks_since_us: u64,
) -> Result<Vec<LocalEdge>, PeerError> {
    let url = format!("{api}/api/v1/edges?scope=local&acks_since_us={acks_since_us}");
    match get(client, &url, token).await {
        // A coordinator of an older release (mid-upgrade) knows no `acks_since_us`: its
        // edges without their history, rather than none.
        Err(e) if e.answered(hyper::StatusCode::BAD_REQUEST) => {
            get(client, &format!("{api}/api/v1/edges?scope=local"), token).await
        }
        answer => answer,
    }
}

/// The config state of the edges the coordinator at `api` holds.
pub(super) async fn config(
    client: &PeerClient,
    api: &str,
    token: Option<&str>,
) -> Result<BundleView, PeerError> {
    // With the token, the errors in full: the leader's rollout keeps what failed.
    let detail = if token.is_some() { "&detail=full" } else { "" };
    get(
        client,
        &format!("{api}/api/v1/config?scope=local{detail}"),
        token,
    )
    .await
}

/// The reports of the agents the coordinator at `api` holds, from `(instance, since)` on
/// (`relay::Relay::read`).
pub(super) async fn reports(
    client: &PeerClient,
    api: &str,
    token: Option<&str>,
    (instance, since): (u64, u64),
) -> Result<RelayBatch, PeerError> {
    let url = format!("{api}/api/v1/cluster/reports?instance={instance}&since={since}");
    let body = get_bytes(client, &url, token).await?;
    Ok(RelayBatch::decode(body)?)
}

/// The leader's answer to a follower's warm pull (`warm_relay`).
pub(super) async fn warm(
    client: &PeerClient,
    api: &str,
    token: Option<&str>,
    pull: &WarmPull,
) -> Result<WarmRelayBatch, PeerError> {
    let url = format!("{api}/api/v1/cluster/warm");
    let body = fetch(client, "POST", &url, token, pull.encode_to_vec()).await?;
    Ok(WarmRelayBatch::decode(body)?)
}

async fn get<T: serde::de::DeserializeOwned>(
    client: &PeerClient,
    url: &str,
    token: Option<&str>,
) -> Result<T, PeerError> {
    let body = get_bytes(client, url, token).await?;
    Ok(serde_json::from_slice(&body)?)
}

pub(super) async fn get_bytes(
    client: &PeerClient,
    url: &str,
    token: Option<&str>,
) -> Result<axum::body::Bytes, PeerError> {
    fetch(client, "GET", url, token, Vec::new()).await
}

async fn fetch(
    client: &PeerClient,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<axum::body::Bytes, PeerError> {
    let mut req = hyper::Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(axum::body::Bytes::from(body)))?;
    let resp = tokio::time::timeout(Duration::from_millis(800), client.request(req))
        .await
        .map_err(|_| PeerError::Timeout)??;
    if !resp.status().is_success() {
        return Err(PeerError::Status(resp.status()));
    }
    let body = tokio::time::timeout(
        Duration::from_secs(2),
        http_body_util::Limited::new(resp.into_body(), MAX_ANSWER).collect(),
    )
    .await
    .map_err(|_| PeerError::Timeout)?
    .map_err(PeerError::Body)?
    .to_bytes();
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::PeerError;
    use hyper::StatusCode;

    #[test]
    fn a_status_is_matched_on_its_code_and_reads_as_before() {
        let e = PeerError::Status(StatusCode::CONFLICT);
        assert_eq!(e.to_string(), "answered 409 Conflict");
        assert!(e.answered(StatusCode::CONFLICT));
        assert!(!e.answered(StatusCode::BAD_REQUEST));
        assert!(!PeerError::Timeout.answered(StatusCode::CONFLICT));
        assert_eq!(PeerError::Timeout.to_string(), "timed out");
    }
}
