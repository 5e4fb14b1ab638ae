//! The two maintenance records and their rules, pure: a region's [`Drain`] (taken out of
//! routing, its alerts held) and an alert [`Silence`] (changes it matches are not paged),
//! what a request for one may ask ([`DrainRequest`], [`SilenceRequest`], checked by
//! `check`), and when each is in force ([`Drain::live`], [`Silence::matches`]).
//!
//! Nothing here reads a clock or a store: the caller passes `now_ms`, so an expiry is
//! a comparison and each rule a unit test. A record past its `until_ms` is simply not
//! in force; the store drops it later.

use serde::{Deserialize, Serialize};

/// Longest silence: a week (a silence is for a known incident, not a way of life).
pub const MAX_SILENCE_S: u64 = 7 * 86_400;
/// Longest drain given an expiry (one without `for_s` lasts until undrained).
pub const MAX_DRAIN_S: u64 = 30 * 86_400;
/// Longest `reason`, in characters.
pub const MAX_REASON: usize = 500;
/// Most silences in force at once.
pub const MAX_SILENCES: usize = 100;

/// A drained region: who drained it, why, since and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// The caller's token name.
    pub by: String,
    pub reason: Option<String>,
    pub at_ms: u64,
    /// `None`: until undrained.
    pub until_ms: Option<u64>,
}

impl Drain {
    /// In force at `now_ms`.
    pub fn live(&self, now_ms: u64) -> bool {
        self.until_ms.is_none_or(|u| now_ms < u)
    }
}

/// An alert silence: changes of `region` (any, when unset) with `diagnosis` (any, when
/// unset) are not paged until `until_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    pub region: Option<String>,
    /// A diagnosis name as the API says it (`origin_down`, `edge_down`, ...).
    pub diagnosis: Option<String>,
    pub reason: Option<String>,
    pub by: String,
    pub at_ms: u64,
    pub until_ms: u64,
}

impl Silence {
    /// In force at `now_ms`.
    pub fn live(&self, now_ms: u64) -> bool {
        now_ms < self.until_ms
    }

    /// Whether a change of `region` to `diagnosis` (from `previous`, the diagnosis it
    /// had before: a recovery from a silenced diagnosis is part of the same incident)
    /// is silenced at `now_ms`.
    pub fn matches(
        &self,
        region: &str,
        diagnosis: Option<&str>,
        previous: Option<&str>,
        now_ms: u64,
    ) -> bool {
        self.live(now_ms)
            && self.region.as_deref().is_none_or(|r| r == region)
            && self
                .diagnosis
                .as_deref()
                .is_none_or(|d| diagnosis == Some(d) || previous == Some(d))
    }
}

/// `POST /api/v1/regions/{name}/drain`'s optional body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds until the drain ends by itself (default: until undrained).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_s: Option<u64>,
}

impl DrainRequest {
    /// The drain this asks for, made by `by` at `now_ms`, or why not (one line).
    pub fn check(self, by: &str, now_ms: u64) -> Result<Drain, String> {
        let until_ms = match self.for_s {
            None => None,
            Some(0) => return Err("for_s must be at least 1 second".into()),
            Some(s) if s > MAX_DRAIN_S => {
                return Err(format!(
                    "for_s {s} is more than {MAX_DRAIN_S} (30 days); leave it out to drain until undrained"
                ))
            }
            Some(s) => Some(now_ms + s * 1000),
        };
        Ok(Drain {
            by: by.to_owned(),
            reason: reason(self.reason)?,
            at_ms: now_ms,
            until_ms,
        })
    }
}

/// `POST /api/v1/silences`'s body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilenceRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<String>,
    /// Seconds the silence lasts (required, at most [`MAX_SILENCE_S`]).
    pub for_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl SilenceRequest {
    /// The silence this asks for (with a fresh id), made by `by` at `now_ms`, or why not.
    /// The caller has checked that the region and the diagnosis exist.
    pub fn check(self, by: &str, now_ms: u64) -> Result<Silence, String> {
        if self.region.is_none() && self.diagnosis.is_none() {
            return Err("a silence needs a region, a diagnosis or both".into());
        }
        if self.for_s == 0 || self.for_s > MAX_SILENCE_S {
            return Err(format!(
                "for_s must be between 1 and {MAX_SILENCE_S} (7 days), not {}",
                self.for_s
            ));
        }
        Ok(Silence {
            id: format!("{:012x}", rand::random::<u64>() >> 16),
            region: self.region,
            diagnosis: self.diagnosis,
            reason: reason(self.reason)?,
            by: by.to_owned(),
            at_ms: now_ms,
            until_ms: now_ms + self.for_s * 1000,
        })
    }
}

/// A reason as given (trimmed; empty is none), or why it is refused.
fn reason(r: Option<String>) -> Result<Option<String>, String> {
    let Some(r) = r.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    if r.chars().count() > MAX_REASON {
        return Err(format!("reason is longer than {MAX_REASON} characters"));
    }
    if r.chars().any(char::is_control) {
        return Err("reason must be one line of text (no control characters)".into());
    }
    Ok(Some(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_lasts_until_its_expiry_or_for_ever() {
        let d = DrainRequest {
            reason: Some("  kernel upgrade ".into()),
            for_s: Some(60),
        }
        .check("ops", 1_000)
        .expect("valid");
        assert_eq!(d.reason.as_deref(), Some("kernel upgrade"));
        assert_eq!(d.until_ms, Some(61_000));
        assert!(d.live(1_000) && d.live(60_999));
        assert!(!d.live(61_000), "ends by itself at its expiry");
        let forever = DrainRequest::default().check("api", 5).expect("valid");
        assert_eq!((forever.reason.as_deref(), forever.until_ms), (None, None));
        assert!(forever.live(u64::MAX));
        for bad in [Some(0), Some(MAX_DRAIN_S + 1)] {
            let e = DrainRequest {
                reason: None,
                for_s: bad,
            }
            .check("api", 0)
            .expect_err("out of bounds");
            assert!(e.contains("for_s"), "{e}");
        }
        let e = DrainRequest {
            reason: Some("a\nb".into()),
            for_s: None,
        }
        .check("api", 0)
        .expect_err("two lines");
        assert!(e.contains("one line"), "{e}");
    }

    #[test]
    fn a_silence_matches_its_region_and_diagnosis_until_it_expires() {
        let silence = |region: Option<&str>, diagnosis: Option<&str>| {
            SilenceRequest {
                region: region.map(Into::into),
                diagnosis: diagnosis.map(Into::into),
                for_s: 10,
                reason: None,
            }
            .check("ops", 0)
            .expect("valid")
        };
        let eu = silence(Some("eu"), None);
        assert!(eu.matches("eu", Some("edge_down"), None, 0));
        assert!(
            eu.matches("eu", None, Some("edge_down"), 9_999),
            "recovery too"
        );
        assert!(!eu.matches("us", Some("edge_down"), None, 0));
        assert!(
            !eu.matches("eu", Some("edge_down"), None, 10_000),
            "expired"
        );
        let origin = silence(None, Some("origin_down"));
        assert!(origin.matches("us", Some("origin_down"), None, 1));
        assert!(
            origin.matches("us", None, Some("origin_down"), 1),
            "its recovery is the same incident"
        );
        assert!(!origin.matches("us", Some("edge_down"), None, 1));
        let both = silence(Some("eu"), Some("slow"));
        assert!(both.matches("eu", Some("slow"), None, 1));
        assert!(!both.matches("us", Some("slow"), None, 1));
        assert!(!both.matches("eu", Some("edge_down"), Some("up"), 1));
        assert_ne!(eu.id, origin.id, "fresh ids");

        let req = |region: Option<&str>, for_s| SilenceRequest {
            region: region.map(Into::into),
            diagnosis: None,
            for_s,
            reason: None,
        };
        let e = req(None, 10).check("a", 0).expect_err("nothing to match");
        assert!(e.contains("region, a diagnosis"), "{e}");
        for for_s in [0, MAX_SILENCE_S + 1] {
            let e = req(Some("eu"), for_s).check("a", 0).expect_err("bounds");
            assert!(e.contains("7 days"), "{e}");
        }
        assert!(req(Some("eu"), MAX_SILENCE_S).check("a", 0).is_ok());
    }
}
