//! When the certificates in use expire, and the warning 30 days before.
//!
//! Both daemons call [`warn_if_expiring`] when they load a certificate (the coordinator
//! at start and on SIGHUP, and, at most once a day each ([`warn_daily`]), for the agents'
//! client certificates when their sessions open; the agent at start): a certificate that expires within [`WARN_DAYS`] is one
//! `warn` line naming it, the file and the date, an expired one an `error`. The
//! coordinator's `/metrics` carries every expiry as a timestamp
//! (`coordinator_tls_cert_expiry_timestamp_seconds`,
//! `coordinator_edge_cert_expiry_timestamp_seconds`) and the dashboard shows the ones
//! that are close.

use std::time::{SystemTime, UNIX_EPOCH};

/// How long before its expiry a certificate in use is warned about.
pub const WARN_DAYS: u64 = 30;

/// The notAfter (Unix seconds) of the first certificate in PEM text.
pub fn pem_not_after(pem: &[u8]) -> Option<u64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok()
}

/// Now, in Unix seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What to say about a certificate that expires at `not_after` (Unix seconds), `now`
/// being now: nothing when more than [`WARN_DAYS`] are left.
pub fn expiry_warning(not_after: u64, now: u64) -> Option<Expiring> {
    if not_after == 0 {
        return None; // unknown
    }
    if not_after <= now {
        return Some(Expiring::Expired);
    }
    let left = not_after - now;
    (left <= WARN_DAYS * 86_400).then_some(Expiring::InDays(left / 86_400))
}

/// A certificate close to or past its expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiring {
    InDays(u64),
    Expired,
}

/// Logs one line when the certificate `what` (in `file`) expires within [`WARN_DAYS`]
/// (`warn`) or has expired (`error`); returns what it said.
pub fn warn_if_expiring(what: &str, file: &str, not_after: u64) -> Option<Expiring> {
    let expiring = expiry_warning(not_after, now())?;
    let date = utc_date(not_after);
    match expiring {
        Expiring::InDays(days) => {
            tracing::warn!(certificate = what, file, not_after, expires = %date, days_left = days,
            "certificate expires within {WARN_DAYS} days: issue a new one (coordinator pki issue/init --days) and reload")
        }
        Expiring::Expired => tracing::error!(certificate = what, file, not_after, expired = %date,
            "certificate has expired: TLS peers refuse it; issue a new one and reload"),
    }
    Some(expiring)
}

/// [`warn_if_expiring`] at most once a day per `key` (an agent's certificate, seen at
/// every session: a fleet reconnecting says each edge's once, not once per dial).
pub fn warn_daily(key: &str, what: &str, file: &str, not_after: u64) -> Option<Expiring> {
    use crate::sync::Recover;
    static LAST: std::sync::Mutex<Option<std::collections::HashMap<String, u64>>> =
        std::sync::Mutex::new(None);
    expiry_warning(not_after, now())?;
    {
        let mut last = LAST.locked();
        let seen = last.get_or_insert_with(Default::default);
        if seen.get(key).is_some_and(|t| now() < t + 86_400) {
            return None;
        }
        seen.insert(key.to_owned(), now());
    }
    warn_if_expiring(what, file, not_after)
}

/// `YYYY-MM-DD HH:MM UTC` for Unix seconds.
pub fn utc_date(unix: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix).unwrap_or(i64::MAX)) {
        Ok(t) => format!("{} {:02}:{:02} UTC", t.date(), t.hour(), t.minute()),
        Err(_) => format!("{unix} (Unix time)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_days_before_expiry_is_a_warning() {
        let now = 1_800_000_000;
        assert_eq!(expiry_warning(now + 31 * 86_400, now), None);
        assert_eq!(expiry_warning(now + 30 * 86_400 + 1, now), None);
        assert_eq!(
            expiry_warning(now + 30 * 86_400, now),
            Some(Expiring::InDays(30))
        );
        assert_eq!(
            expiry_warning(now + 29 * 86_400 + 5, now),
            Some(Expiring::InDays(29))
        );
        assert_eq!(expiry_warning(now + 10, now), Some(Expiring::InDays(0)));
        assert_eq!(expiry_warning(now, now), Some(Expiring::Expired));
        assert_eq!(expiry_warning(0, now), None);
    }

    #[test]
    fn an_edge_is_warned_about_once_a_day() {
        let soon = now() + 86_400;
        assert!(warn_daily("test-edge", "edge", "f", soon).is_some());
        assert!(warn_daily("test-edge", "edge", "f", soon).is_none());
        assert!(warn_daily("other-edge", "edge", "f", soon).is_some());
        assert!(warn_daily("far-edge", "edge", "f", now() + 90 * 86_400).is_none());
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_date(1_796_601_600 + 3_723), "2026-12-07 01:02 UTC");
    }
}
