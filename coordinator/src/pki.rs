//! A small PKI for the cluster: one CA, the coordinator's server certificate, one client
//! certificate per edge agent (`coordinator pki init` / `coordinator pki issue`).
//!
//! An agent's identity is a URI in its certificate's subject alternative names:
//! `urn:varnish-coordinator:edge:<region>:<id>` ([`edge_uri`]). The coordinator reads it
//! back from the verified peer certificate ([`crate::tls::peer_identity`]) and refuses a
//! Hello that claims anything else. Keys are ECDSA P-256, written 0600; certificates
//! 0644. Every certificate written is returned as a [`Minted`] with its expiry, which
//! the CLI prints (`--days` sets it; none may outlive its CA). Nothing here is on a
//! request path: it runs from the CLI, the demo and tests.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

/// Prefix of an edge identity URI.
pub const EDGE_URI_PREFIX: &str = "urn:varnish-coordinator:edge:";

/// Default lifetimes.
pub const CA_DAYS: u32 = 3650;
pub const LEAF_DAYS: u32 = 397;

/// What can go wrong minting certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

/// The identity URI for an edge.
pub fn edge_uri(region: &str, id: &str) -> String {
    format!("{EDGE_URI_PREFIX}{region}:{id}")
}

/// A certificate and its key, as PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// Validity window: from an hour ago (clock skew) for `days`.
pub fn validity(days: u32) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (
        now - Duration::from_secs(3600),
        now + Duration::from_secs(u64::from(days) * 86_400),
    )
}

/// A new self-signed CA.
pub fn new_ca(name: &str, days: u32) -> Result<Pem, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity(days);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The CA as an issuer (its certificate re-derived from the PEM and its key).
fn issuer(ca: &Pem) -> Result<(Certificate, KeyPair), PkiError> {
    let key = KeyPair::from_pem(&ca.key)?;
    let params = CertificateParams::from_ca_cert_pem(&ca.cert)?;
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

/// The coordinator's server certificate: always `localhost` and `127.0.0.1`, plus `sans`
/// (IP addresses or DNS names).
pub fn server_cert(ca: &Pem, sans: &[String], days: u32) -> Result<Pem, PkiError> {
    let mut names = vec![SanType::DnsName("localhost".try_into()?)];
    names.push(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
    names.push(SanType::IpAddress(
        "::1".parse().map_err(|_| PkiError::Invalid("::1".into()))?,
    ));
    for san in sans {
        match san.parse::<IpAddr>() {
            Ok(ip) => names.push(SanType::IpAddress(ip)),
            Err(_) => {
                let dns = !san.is_empty()
                    && san.len() <= 253
                    && san
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*'));
                let bad = || {
                    PkiError::Invalid(format!(
                        "--san {san:?} is neither an IP address nor a DNS name"
                    ))
                };
                if !dns {
                    return Err(bad());
                }
                names.push(SanType::DnsName(
                    san.as_str().try_into().map_err(|_| bad())?,
                ));
            }
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = names;
    params
        .distinguished_name
        .push(DnType::CommonName, "varnish-coordinator");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    (params.not_before, params.not_after) = validity(days);
    sign(ca, params)
}

/// An edge agent's client certificate carrying its identity.
pub fn agent_cert(
    ca: &Pem,
    id: &str,
    region: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<Pem, PkiError> {
    let ok = |v: &str| {
        !v.is_empty()
            && v.len() <= 128
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    if !ok(id) || !ok(region) {
        return Err(PkiError::Invalid(
            "--id and --region must be 1-128 characters of [A-Za-z0-9._-]".into(),
        ));
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![SanType::URI(edge_uri(region, id).as_str().try_into()?)];
    params.distinguished_name.push(DnType::CommonName, id);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, region);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before;
    params.not_after = not_after;
    sign(ca, params)
}

fn sign(ca: &Pem, params: CertificateParams) -> Result<Pem, PkiError> {
    let (ca_cert, ca_key) = issuer(ca)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `pem` as `DIR/NAME.pem` (0644) and `DIR/NAME.key` (0600), never following an
/// existing key file's permissions.
pub fn write(dir: &Path, name: &str, pem: &Pem) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PkiError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key_path = dir.join(format!("{name}.key"));
    let _ = std::fs::remove_file(&key_path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io(&key_path))?;
    f.write_all(pem.key.as_bytes()).map_err(io(&key_path))?;
    let cert_path = dir.join(format!("{name}.pem"));
    std::fs::write(&cert_path, &pem.cert).map_err(io(&cert_path))?;
    Ok(())
}

/// The CA in `dir` (`ca.pem`, `ca.key`).
pub fn load_ca(dir: &Path) -> Result<Pem, PkiError> {
    Ok(Pem {
        cert: read(&dir.join("ca.pem"))?,
        key: read(&dir.join("ca.key"))?,
    })
}

/// A certificate `pki` wrote (or kept), and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    pub path: PathBuf,
    /// `CA`, `coordinator`, `edge ID in REGION`.
    pub what: String,
    /// Unix seconds.
    pub not_after: u64,
    /// An existing CA that `init` kept.
    pub kept: bool,
}

impl std::fmt::Display for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let days = self.not_after.saturating_sub(daemon::certs::now()) / 86_400;
        write!(
            f,
            "{} ({}{}): expires {} (in {days} days)",
            self.path.display(),
            self.what,
            if self.kept { ", kept" } else { "" },
            daemon::certs::utc_date(self.not_after)
        )
    }
}

fn minted(dir: &Path, name: &str, what: String, pem: &Pem, kept: bool) -> Minted {
    Minted {
        path: dir.join(format!("{name}.pem")),
        what,
        not_after: daemon::certs::pem_not_after(pem.cert.as_bytes()).unwrap_or(0),
        kept,
    }
}

fn check_days(flag: &str, days: u32) -> Result<(), PkiError> {
    if (1..=36_500).contains(&days) {
        Ok(())
    } else {
        Err(PkiError::Invalid(format!(
            "{flag} {days}: give 1 to 36500 days"
        )))
    }
}

/// `pki init`: a CA (kept if `ca.pem`/`ca.key` exist) and a fresh coordinator
/// certificate, with the default lifetimes ([`CA_DAYS`], [`LEAF_DAYS`]).
pub fn init(dir: &Path, sans: &[String]) -> Result<Vec<Minted>, PkiError> {
    init_for(dir, sans, CA_DAYS, LEAF_DAYS)
}

/// [`init`] with a new CA valid `ca_days` and the coordinator's certificate `days`
/// (`pki init --ca-days --days`). A certificate cannot outlive the CA that signs it:
/// asking for that is refused.
pub fn init_for(
    dir: &Path,
    sans: &[String],
    ca_days: u32,
    days: u32,
) -> Result<Vec<Minted>, PkiError> {
    check_days("--ca-days", ca_days)?;
    check_days("--days", days)?;
    let mut out = Vec::new();
    let ca = if dir.join("ca.pem").is_file() && dir.join("ca.key").is_file() {
        let ca = load_ca(dir)?;
        out.push(minted(dir, "ca", "CA".into(), &ca, true));
        ca
    } else {
        let ca = new_ca("varnish-coordinator cluster CA", ca_days)?;
        write(dir, "ca", &ca)?;
        out.push(minted(dir, "ca", "CA".into(), &ca, false));
        ca
    };
    outlives_ca(&out[0], days)?;
    let cert = server_cert(&ca, sans, days)?;
    write(dir, "coordinator", &cert)?;
    out.push(minted(
        dir,
        "coordinator",
        "coordinator".into(),
        &cert,
        false,
    ));
    Ok(out)
}

/// Refuses a certificate of `days` that would expire after the CA that signs it.
fn outlives_ca(ca: &Minted, days: u32) -> Result<(), PkiError> {
    let until = daemon::certs::now() + u64::from(days) * 86_400;
    if ca.not_after != 0 && until > ca.not_after {
        return Err(PkiError::Invalid(format!(
            "--days {days} outlives the CA, which expires {}: give fewer days, or a new CA (pki init on an empty directory, --ca-days)",
            daemon::certs::utc_date(ca.not_after)
        )));
    }
    Ok(())
}

/// `pki issue`: `DIR/ID.pem` and `DIR/ID.key` for an agent, valid `days`.
pub fn issue(dir: &Path, id: &str, region: &str, days: u32) -> Result<Minted, PkiError> {
    check_days("--days", days)?;
    let ca = load_ca(dir)?;
    if matches!(id, "ca" | "coordinator") {
        return Err(PkiError::Invalid(format!(
            "--id {id:?} would overwrite the {id} files"
        )));
    }
    outlives_ca(&minted(dir, "ca", "CA".into(), &ca, true), days)?;
    let (from, to) = validity(days);
    let cert = agent_cert(&ca, id, region, from, to)?;
    write(dir, id, &cert)?;
    Ok(minted(
        dir,
        id,
        format!("edge {id} in {region}"),
        &cert,
        false,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_issue_write_files_with_tight_key_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        init(
            dir.path(),
            &["coordinator.internal".into(), "10.0.0.1".into()],
        )
        .unwrap();
        issue(dir.path(), "eu-west-1", "eu-west", 30).unwrap();
        for f in [
            "ca.pem",
            "ca.key",
            "coordinator.pem",
            "coordinator.key",
            "eu-west-1.pem",
            "eu-west-1.key",
        ] {
            assert!(dir.path().join(f).is_file(), "{f}");
        }
        let mode = std::fs::metadata(dir.path().join("eu-west-1.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Re-running init keeps the CA.
        let ca = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        init(dir.path(), &[]).unwrap();
        assert_eq!(
            ca,
            std::fs::read_to_string(dir.path().join("ca.pem")).unwrap()
        );
        // Each certificate says when it expires; --days sets it.
        let minted = init_for(dir.path(), &[], 100, 40).unwrap();
        let now = daemon::certs::now();
        assert!(minted[0].kept && minted[0].what == "CA");
        let coordinator = &minted[1];
        assert!(coordinator.path.ends_with("coordinator.pem"));
        let left = coordinator.not_after - now;
        assert!((39 * 86_400..=40 * 86_400).contains(&left), "{left}");
        let line = coordinator.to_string();
        assert!(
            line.contains("coordinator.pem (coordinator): expires 20")
                && (line.contains("(in 40 days)") || line.contains("(in 39 days)")),
            "{line}"
        );
        let edge = issue(dir.path(), "eu-west-2", "eu-west", 7).unwrap();
        assert!(
            edge.to_string()
                .contains("(edge eu-west-2 in eu-west): expires"),
            "{edge}"
        );
        assert!((6 * 86_400..=7 * 86_400).contains(&(edge.not_after - now)));
        assert!(issue(dir.path(), "eu-west-3", "eu-west", 0).is_err());
        let err = issue(dir.path(), "eu-west-3", "eu-west", 36_000).unwrap_err();
        assert!(err.to_string().contains("outlives the CA"), "{err}");
        assert!(issue(dir.path(), "bad id", "eu", 1).is_err());
        assert!(issue(dir.path(), "ca", "eu", 1).is_err());
        assert!(init(dir.path(), &["not a name!".into()]).is_err());
    }
}
