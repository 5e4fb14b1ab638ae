//! How the agent tells its own requests from shoppers' in varnish's log, whatever the VCL.
//!
//! Every request the agent sends through its varnish (edge probes, the config health
//! check, warm fetches, xkey purges) carries [`HEADER`]: `X-Edge-Agent: KIND:SECRET`, the
//! kind of request and a secret drawn when the agent process starts ([`Mark`], held in
//! memory only, never logged). varnishncsa logs the *client* request as varnish received
//! it (`-c`), before any VCL could strip it, so [`crate::top`] reads the header back from
//! every log line and sorts the line into shoppers', the agent's own, or neither:
//! response headers such as `X-Magento-Cache-Debug` exist only under some VCLs, this
//! header under all of them.
//!
//! The secret makes sure nobody else's request is counted as the agent's own (those are
//! what the coordinator subtracts from varnish's counters). A request carrying the header
//! with any other value is not a shopper's either (another agent's, relayed through a
//! shield): a client that sends it hides only its own request from the figures, which
//! the project's tooling `User-Agent` always allowed.

use std::sync::OnceLock;

/// The request header that marks the agent's own requests.
pub const HEADER: &str = "X-Edge-Agent";

/// What an own request is for (the header's first part; the log reader ignores it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An edge probe of a `[[checks]]` entry.
    Probe,
    /// The config worker's health check after a VCL change.
    Check,
    /// A warm shard's fetch (warming, refreshing, learning tags).
    Warm,
    /// An xkey `PURGE`.
    Purge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Probe => "probe",
            Kind::Check => "check",
            Kind::Warm => "warm",
            Kind::Purge => "purge",
        }
    }
}

/// One agent process's mark: the secret its requests carry.
pub struct Mark {
    secret: String,
}

impl std::fmt::Debug for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mark(<secret>)")
    }
}

impl Default for Mark {
    fn default() -> Self {
        Self::new()
    }
}

impl Mark {
    /// A mark with a fresh random secret (128 bits).
    pub fn new() -> Self {
        Mark {
            secret: hex::encode(rand::random::<[u8; 16]>()),
        }
    }

    /// The header a request of `kind` carries.
    pub fn header(&self, kind: Kind) -> (String, String) {
        (
            HEADER.to_owned(),
            format!("{}:{}", kind.as_str(), self.secret),
        )
    }

    /// Whether `value` (the header's value as varnish logged it) is this mark's.
    pub fn is_own(&self, value: &str) -> bool {
        value
            .trim()
            .rsplit_once(':')
            .is_some_and(|(_, secret)| secret == self.secret)
    }
}

/// This process's mark.
pub fn own() -> &'static Mark {
    static OWN: OnceLock<Mark> = OnceLock::new();
    OWN.get_or_init(Mark::new)
}

/// The header for a request of `kind` from this process.
pub fn header(kind: Kind) -> (String, String) {
    own().header(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_processs_secret_is_own() {
        let (a, b) = (Mark::new(), Mark::new());
        let (name, value) = a.header(Kind::Warm);
        assert_eq!(name, HEADER);
        assert!(value.starts_with("warm:"));
        assert!(a.is_own(&value));
        assert!(a.is_own(&a.header(Kind::Probe).1));
        assert!(!b.is_own(&value), "another agent's mark");
        for forged in [
            "-",
            "",
            "probe",
            "probe:",
            "warm:00",
            &value.replace(':', ""),
        ] {
            assert!(!a.is_own(forged), "{forged:?}");
        }
        assert!(
            !format!("{a:?}").contains(&value[5..]),
            "Debug shows no secret"
        );
        assert!(own().is_own(&header(Kind::Purge).1));
    }
}
