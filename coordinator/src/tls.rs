//! Mutual TLS on the agents' gRPC port (rustls), reloadable on SIGHUP.
//!
//! [`ServerTls`] holds the current `TlsAcceptor` built from `[grpc.tls]`: the
//! coordinator's certificate chain and key, and the CA bundle client certificates must
//! chain to (a client without a certificate, with one from another CA, or an expired one
//! fails the handshake). [`ServerTls::reload`] re-reads the files and swaps the acceptor:
//! new handshakes use the new files, established sessions are untouched, and a reload
//! that fails keeps the old acceptor. The CA file may hold several CAs (rotation).
//!
//! [`incoming`] turns a bound listener into a stream of handshaken connections for
//! tonic. Every connection is taken off the socket at once; each handshake runs in its
//! own task under [`HANDSHAKE_TIMEOUT`] (3 s), admitted by [`crate::accept::Handshakes`]
//! (at most `[grpc] handshakes_per_source`, 32 by default, in progress per source
//! address, 1,024 in all; one over is closed at once), so a peer that stalls its handshake, or opens hundreds of them, delays nobody
//! else's. Refused handshakes are counted by reason
//! (`coordinator_tls_handshakes_refused_total{reason}`) and logged at most once per
//! ten seconds with the counts. Tonic keeps the verified peer certificates with the connection;
//! [`peer_identity`] reads the edge identity URI back out of them ([`crate::pki`]).

use daemon::sync::RecoverRw;
use std::io::BufReader;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::accept::{describe, Handshakes, Refusals};
use crate::metrics::{collector, counter, gauge, DescriptorEncoder, Label, Registry};
use crate::pki::EDGE_URI_PREFIX;

/// `[grpc.tls]`: certificate files for mutual TLS (shared with the agent's `[tls]`).
pub use daemon::TlsConfig;

/// A TLS handshake must finish within this (an agent's own connect timeout is 5 s).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Why a handshake was refused: it did not finish in time.
pub const REFUSED_TIMEOUT: &str = "timeout";
/// Why a handshake was refused: it failed (no or a foreign certificate, not TLS).
pub const REFUSED_HANDSHAKE: &str = "handshake_failed";

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS setup: {0}")]
    Rustls(String),
}

fn file_err(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(bytes.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in file"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    rustls_pemfile::private_key(&mut BufReader::new(bytes.as_slice()))
        .map_err(|e| file_err(path, format!("bad PEM: {e}")))?
        .ok_or_else(|| file_err(path, "no private key in file"))
}

/// Expiry of the certificates in use, for `/metrics` and the API.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CertExpiry {
    /// The coordinator's own certificate (Unix seconds).
    pub server_not_after: u64,
    /// The earliest-expiring CA in the bundle (Unix seconds).
    pub ca_not_after: u64,
    /// Unix seconds of the last successful (re)load.
    pub loaded_at: u64,
}

/// The server side: current acceptor plus what it was built from.
pub struct ServerTls {
    files: TlsConfig,
    acceptor: RwLock<TlsAcceptor>,
    expiry: RwLock<CertExpiry>,
    /// Handshakes refused (no/foreign/expired certificate, not TLS, timeout, a cap).
    pub refused: AtomicU64,
    /// The same by reason, and the rate-limited log.
    refusals: Refusals,
}

impl ServerTls {
    pub fn load(files: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let (acceptor, expiry) = build(files)?;
        Ok(Arc::new(ServerTls {
            files: files.clone(),
            acceptor: RwLock::new(acceptor),
            expiry: RwLock::new(expiry),
            refused: AtomicU64::new(0),
            refusals: Refusals::new(crate::accept::REFUSALS_LOG_INTERVAL),
        }))
    }

    /// Re-reads the files; on error the current acceptor stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (acceptor, expiry) = build(&self.files)?;
        *self.acceptor.write_locked() = acceptor;
        *self.expiry.write_locked() = expiry;
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.read_locked().clone()
    }

    pub fn expiry(&self) -> CertExpiry {
        self.expiry.read_locked().clone()
    }
}

fn build(files: &TlsConfig) -> Result<(TlsAcceptor, CertExpiry), TlsError> {
    let cas = read_certs(&files.ca)?;
    let mut roots = RootCertStore::empty();
    for ca in &cas {
        roots
            .add(ca.clone())
            .map_err(|e| file_err(&files.ca, format!("not a usable CA certificate: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let server_not_after = not_after(&chain[0]).unwrap_or(0);
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| file_err(&files.key, format!("does not match the certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let ca_not_after = cas.iter().filter_map(not_after).min().unwrap_or(0);
    // At start and at every reload (SIGHUP): a warning 30 days before either expires.
    daemon::certs::warn_if_expiring(
        "coordinator",
        &files.cert.display().to_string(),
        server_not_after,
    );
    daemon::certs::warn_if_expiring("CA", &files.ca.display().to_string(), ca_not_after);
    let expiry = CertExpiry {
        server_not_after,
        ca_not_after,
        loaded_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    Ok((TlsAcceptor::from(Arc::new(config)), expiry))
}

/// A certificate's notAfter in Unix seconds.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<u64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    u64::try_from(parsed.validity().not_after.timestamp()).ok()
}

/// The `(region, id)` an edge certificate names in its SAN URI.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Result<(String, String), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unparsable client certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("client certificate has no subjectAltName")?;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(rest) = uri.strip_prefix(EDGE_URI_PREFIX) {
                if let Some((region, id)) = rest.split_once(':') {
                    return Ok((region.to_owned(), id.to_owned()));
                }
            }
        }
    }
    Err(format!(
        "client certificate carries no {EDGE_URI_PREFIX}<region>:<id> identity"
    ))
}

/// Accepts TCP connections and yields those that complete the mutual-TLS handshake.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    per_source: usize,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let admission = Handshakes::new(per_source, crate::accept::HANDSHAKES_TOTAL);
    tokio::spawn(async move {
        while let Some((tcp, peer)) =
            crate::accept::next_unslotted(&listener, &shutdown, "grpc").await
        {
            let ticket = match admission.admit(peer.ip()) {
                Ok(t) => t,
                Err(reason) => {
                    tls.refuse(reason, peer, None);
                    continue;
                }
            };
            let acceptor = tls.acceptor();
            let (tx, tls) = (tx.clone(), tls.clone());
            tokio::spawn(async move {
                let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(ticket);
                match result {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tls.refuse(REFUSED_HANDSHAKE, peer, Some(&e)),
                    Err(_) => tls.refuse(REFUSED_TIMEOUT, peer, None),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

impl ServerTls {
    /// Counts a refused handshake; logs it when a line is due (one per interval, with
    /// the counts since the last), at debug level otherwise.
    fn refuse(&self, reason: &'static str, peer: SocketAddr, error: Option<&std::io::Error>) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let error = error.map(ToString::to_string).unwrap_or_default();
        match self.refusals.count(reason) {
            Some(counts) => tracing::warn!(%peer, reason, error, refused = %describe(&counts),
                "TLS handshakes refused (this one, and the counts since the last line)"),
            None => tracing::debug!(%peer, reason, error, "TLS handshake refused"),
        }
    }

    /// Refused handshakes by reason since the start.
    pub fn refused_by_reason(&self) -> Vec<(&'static str, u64)> {
        self.refusals.totals()
    }
}

impl ServerTls {
    /// Registers the certificate expiry and refused-handshake families.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(collector(self.clone(), encode_metrics));
    }
}

fn encode_metrics(source: &Arc<ServerTls>, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let expiry = source.expiry();
    gauge(
        e,
        "coordinator_tls_cert_expiry_timestamp_seconds",
        "When a certificate in use expires (Unix time).",
        [
            ([("cert", Label("server"))], expiry.server_not_after),
            ([("cert", Label("ca"))], expiry.ca_not_after),
        ],
    )?;
    counter(
        e,
        "coordinator_tls_handshakes_refused_total",
        "gRPC connections refused before or during the TLS handshake, by reason \
         (handshake_failed, timeout, per_source_cap, capacity).",
        source
            .refused_by_reason()
            .into_iter()
            .map(|(reason, n)| ([("reason", Label(reason))], n)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    #[test]
    fn identity_round_trips_through_a_certificate() {
        let ca = pki::new_ca("test CA", 1).unwrap();
        let (from, to) = pki::validity(1);
        let pem = pki::agent_cert(&ca, "eu-west-1", "eu-west", from, to).unwrap();
        let der = rustls_pemfile::certs(&mut pem.cert.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            peer_identity(&der).unwrap(),
            ("eu-west".to_owned(), "eu-west-1".to_owned())
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let expiry = not_after(&der).unwrap();
        assert!(expiry > now && expiry < now + 2 * 86_400);
        // A server certificate carries no edge identity.
        let server = pki::server_cert(&ca, &[], 1).unwrap();
        let der = rustls_pemfile::certs(&mut server.cert.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        assert!(peer_identity(&der).is_err());
    }

    #[test]
    fn server_config_loads_and_reload_keeps_old_on_error() {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), &[]).unwrap();
        let files = TlsConfig {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("coordinator.pem"),
            key: dir.path().join("coordinator.key"),
        };
        let tls = ServerTls::load(&files).unwrap();
        assert!(tls.expiry().server_not_after > 0 && tls.expiry().ca_not_after > 0);
        std::fs::write(&files.cert, "garbage").unwrap();
        assert!(tls.reload().is_err());
        let _still = tls.acceptor();
        assert!(ServerTls::load(&files).is_err());
    }
}
