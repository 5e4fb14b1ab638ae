//! The one HTTP/1.1 client of the warming engine and the edge agents, on hyper: every
//! request is made on a fresh connection and timed, the way a shopper's first visit is.
//!
//! * [`get`] and [`request`] talk to a socket address the caller names — the local
//!   varnish, for warm fetches, probes and the agent's xkey PURGE — with the shop's `Host`
//!   and any extra headers (a variation's cookie, the warm token).
//! * [`get_url`] fetches an absolute `http://` or `https://` URL (sitemaps): it resolves
//!   the host and, for https, verifies the server against the [`TlsRoots`] given
//!   (the system's trust store by default, `SSL_CERT_FILE` honoured).
//!
//! hyper reads the response: chunked and `Content-Length` bodies, headers split where
//! HTTP says. A body is read up to [`MAX_BODY`]; the rest is dropped with the connection.
//! The time to first byte is the time until the response head has arrived.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Most of a body read (the rest is dropped with the connection).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("refusing a request with control characters")]
    BadRequest,
    #[error("{0:?}: only http:// and https:// URLs can be fetched")]
    Scheme(String),
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("connect {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS with {host}: {reason}")]
    Tls { host: String, reason: String },
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// What one request returned.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    pub status: u16,
    /// The status line's reason phrase (varnish's `synth` text, e.g. `Invalidated 3`).
    pub reason: String,
    pub ttfb: Duration,
    pub total: Duration,
    /// `HIT` / `MISS` / ... from `X-Magento-Cache-Debug` or `X-Cache`; empty if absent.
    pub cache: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The certificate authorities https fetches trust.
#[derive(Clone)]
pub struct TlsRoots(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for TlsRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsRoots")
    }
}

impl TlsRoots {
    /// The system's trust store (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set), loaded once.
    pub fn system() -> TlsRoots {
        static SYSTEM: OnceLock<TlsRoots> = OnceLock::new();
        SYSTEM
            .get_or_init(|| {
                let mut roots = rustls::RootCertStore::empty();
                let found = rustls_native_certs::load_native_certs();
                for e in &found.errors {
                    tracing::warn!(error = %e, "reading a system CA certificate failed");
                }
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    tracing::warn!("no system CA certificates found; https fetches will fail");
                }
                TlsRoots::from_store(roots)
            })
            .clone()
    }

    /// Only the CA certificates in `pem` (a private CA, tests).
    pub fn from_pem(pem: &[u8]) -> Result<TlsRoots, FetchError> {
        let bad = |reason: String| FetchError::Tls {
            host: "-".into(),
            reason,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.map_err(|e| bad(format!("bad CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("bad CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(bad("no CA certificate in the PEM".into()));
        }
        Ok(TlsRoots::from_store(roots))
    }

    fn from_store(roots: rustls::RootCertStore) -> TlsRoots {
        // The workspace builds rustls with ring alone: that is the provider used.
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsRoots(Arc::new(config))
    }
}

/// GETs `path` from `addr` with `Host: host` and `extra` headers, within `timeout`.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    host: &str,
    extra: &[(String, String)],
    timeout: Duration,
) -> Result<Fetched, FetchError> {
    request("GET", addr, path, host, extra, timeout).await
}

/// One `method` request for `path` to `addr` on a fresh plaintext connection.
pub async fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    host: &str,
    extra: &[(String, String)],
    timeout: Duration,
) -> Result<Fetched, FetchError> {
    let req = build(method, path, host, extra)?;
    let started = Instant::now();
    let work = async {
        let stream = connect(addr).await?;
        exchange(stream, req, started).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

/// GETs an absolute `http://` or `https://` URL (its own host and port), verifying an
/// https server against `roots`.
pub async fn get_url(
    url: &str,
    timeout: Duration,
    roots: &TlsRoots,
) -> Result<Fetched, FetchError> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(FetchError::Scheme(url.to_owned()));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = split_authority(authority, if tls { 443 } else { 80 });
    let req = build("GET", path, authority, &[])?;
    let started = Instant::now();
    let work = async {
        let addr = resolve(host, port).await?;
        let stream = connect(addr).await?;
        if !tls {
            return exchange(stream, req, started).await;
        }
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
            FetchError::Tls {
                host: host.to_owned(),
                reason: e.to_string(),
            }
        })?;
        let stream = tokio_rustls::TlsConnector::from(roots.0.clone())
            .connect(name, stream)
            .await
            .map_err(|e| FetchError::Tls {
                host: host.to_owned(),
                reason: e.to_string(),
            })?;
        exchange(stream, req, started).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

/// `host[:port]` (IPv6 in brackets) into the host and the port.
fn split_authority(authority: &str, default_port: u16) -> (&str, u16) {
    if let Some(v6) = authority.strip_prefix('[') {
        if let Some((h, rest)) = v6.split_once(']') {
            let port = rest.strip_prefix(':').and_then(|p| p.parse().ok());
            return (h, port.unwrap_or(default_port));
        }
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => match p.parse() {
            Ok(port) => (h, port),
            Err(_) => (authority, default_port),
        },
        None => (authority, default_port),
    }
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, FetchError> {
    let fail = |reason: String| FetchError::Resolve {
        host: host.to_owned(),
        reason,
    };
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("no address".into()))
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, FetchError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| FetchError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

fn build(
    method: &str,
    path: &str,
    host: &str,
    extra: &[(String, String)],
) -> Result<hyper::Request<Empty<Bytes>>, FetchError> {
    let bad = |s: &str| s.chars().any(|c| c.is_control());
    if bad(path)
        || path.contains(' ')
        || bad(host)
        || extra
            .iter()
            .any(|(n, v)| bad(n) || bad(v) || n.contains(':'))
    {
        return Err(FetchError::BadRequest);
    }
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "varnish-coordinator")
        .header(hyper::header::CONNECTION, "close");
    for (n, v) in extra {
        req = req.header(n.as_str(), v.as_str());
    }
    req.body(Empty::new()).map_err(|_| FetchError::BadRequest)
}

/// Sends `req` on `io` and reads the answer (the body up to [`MAX_BODY`]).
async fn exchange<S>(
    io: S,
    req: hyper::Request<Empty<Bytes>>,
    started: Instant,
) -> Result<Fetched, FetchError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    // The connection is driven beside the request and dropped with it.
    let driver = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let response = sender.send_request(req).await?;
    let ttfb = started.elapsed();
    let status = response.status();
    let reason = response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .or_else(|| status.canonical_reason().map(str::to_owned))
        .unwrap_or_default();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).trim().to_owned(),
            )
        })
        .collect();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while bytes.len() < MAX_BODY {
        match body.frame().await {
            None => break,
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    let room = MAX_BODY - bytes.len();
                    bytes.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
        }
    }
    drop(driver);
    let mut fetched = Fetched {
        status: status.as_u16(),
        reason,
        ttfb,
        total: started.elapsed(),
        cache: String::new(),
        headers,
        body: bytes,
    };
    fetched.cache = fetched
        .header("x-magento-cache-debug")
        .or_else(|| fetched.header("x-cache"))
        .unwrap_or("")
        .chars()
        .take(32)
        .collect();
    Ok(fetched)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The path and query of an absolute URL (`/` when it has none).
pub fn path_of(url: &str) -> &str {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    rest.find('/').map(|i| &rest[i..]).unwrap_or("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(path_of("https://a.example/p/1?x=2"), "/p/1?x=2");
        assert_eq!(path_of("http://a.example"), "/");
    }

    #[test]
    fn authorities() {
        assert_eq!(split_authority("shop.test", 80), ("shop.test", 80));
        assert_eq!(split_authority("shop.test:8443", 443), ("shop.test", 8443));
        assert_eq!(split_authority("[::1]:81", 80), ("::1", 81));
        assert_eq!(split_authority("[::1]", 443), ("::1", 443));
    }
}
