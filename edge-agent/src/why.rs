//! Why a connection to the coordinator failed, in words an operator can act on.
//!
//! tonic reports every failure to connect as `transport error`; the cause is further down
//! the error's source chain (an `io::Error`, often wrapping a rustls error). [`describe`]
//! walks the chain and names what it finds: `connection refused`, `TLS handshake failed:
//! …`, `certificate not accepted by the coordinator`, or the whole chain when it is none
//! of those.

use std::error::Error;
use std::io::ErrorKind;

/// The cause at the bottom of `err`'s chain.
pub fn describe(err: &(dyn Error + 'static)) -> String {
    let mut chain: Vec<String> = Vec::new();
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return tls_words(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // io::Error's own source() skips the error it wraps; look inside.
            if let Some(tls) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return tls_words(tls);
            }
            match io.kind() {
                ErrorKind::ConnectionRefused => {
                    return "connection refused (is the coordinator running, and is this its gRPC port?)"
                        .into()
                }
                ErrorKind::TimedOut => return "connection timed out".into(),
                ErrorKind::ConnectionReset => return "connection reset by the coordinator".into(),
                _ => {}
            }
        }
        let text = e.to_string();
        if chain.last() != Some(&text) {
            chain.push(text);
        }
        current = e.source();
    }
    let text = chain.join(": ");
    // h2 keeps the I/O error it failed on out of the source chain; rustls' words for
    // the alert are still in its message.
    if let Some(i) = text.find("received fatal alert: ") {
        let alert = text[i + "received fatal alert: ".len()..]
            .split(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or("");
        if CERT_ALERTS.contains(&alert) {
            return cert_refused(alert);
        }
        return format!("TLS handshake failed: the coordinator sent {alert}");
    }
    if let Some(i) = text.find("invalid peer certificate: ") {
        return untrusted(&text[i + "invalid peer certificate: ".len()..]);
    }
    text
}

/// The alerts a TLS server sends when it refuses the client's certificate.
const CERT_ALERTS: [&str; 7] = [
    "BadCertificate",
    "UnknownCA",
    "CertificateRequired",
    "CertificateUnknown",
    "CertificateExpired",
    "CertificateRevoked",
    "AccessDenied",
];

fn cert_refused(alert: &str) -> String {
    format!(
        "certificate not accepted by the coordinator ({alert}): is tls.cert issued by the cluster CA for this edge?"
    )
}

fn untrusted(why: &str) -> String {
    format!(
        "TLS handshake failed: the coordinator's certificate is not trusted ({why}); is tls.ca the cluster CA?"
    )
}

fn tls_words(e: &rustls::Error) -> String {
    match e {
        rustls::Error::AlertReceived(alert)
            if CERT_ALERTS.contains(&format!("{alert:?}").as_str()) =>
        {
            cert_refused(&format!("{alert:?}"))
        }
        rustls::Error::InvalidCertificate(why) => untrusted(&format!("{why:?}")),
        other => format!("TLS handshake failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrap(&'static str, Box<dyn Error + Send + Sync>);
    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl Error for Wrap {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(self.1.as_ref())
        }
    }

    #[test]
    fn the_cause_is_named() {
        let refused = Wrap(
            "transport error",
            Box::new(std::io::Error::from(ErrorKind::ConnectionRefused)),
        );
        assert!(describe(&refused).starts_with("connection refused"));
        let untrusted = Wrap(
            "transport error",
            Box::new(std::io::Error::new(
                ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            )),
        );
        let text = describe(&untrusted);
        assert!(
            text.starts_with("TLS handshake failed") && text.contains("UnknownIssuer"),
            "{text}"
        );
        let refused_cert = Wrap(
            "transport error",
            Box::new(rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA,
            )),
        );
        assert!(describe(&refused_cert).starts_with("certificate not accepted"));
        // As h2 reports it: the alert only in the message.
        let h2 = Wrap(
            "transport error",
            Box::new(std::io::Error::other(
                "connection error: received fatal alert: UnknownCA",
            )),
        );
        let text = describe(&h2);
        assert!(
            text.starts_with("certificate not accepted by the coordinator (UnknownCA)"),
            "{text}"
        );
        let other = Wrap(
            "transport error",
            Box::new(std::io::Error::other("h2 went away")),
        );
        assert_eq!(describe(&other), "transport error: h2 went away");
    }
}
