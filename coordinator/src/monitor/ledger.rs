//! The alert ledger: in a cluster, no alert is lost when the leader dies while sending
//! it.
//!
//! Every coordinator evaluates region health (the same, thanks to the reports relay),
//! and only the leader sends. The leader writes each alert it forms to etcd
//! (`alerts/<at_ms>-<id>`, fenced on its leader key) before it goes to the webhooks, and
//! marks it `sent` once every webhook was tried. A coordinator that becomes the leader
//! ([`super::Monitor::run`], in `alerts`) first sends what the ledger holds unsent, under the same
//! `id`, then whatever it formed itself in the last [`TAKEOVER_WINDOW_MS`] while still a
//! follower that no ledger entry covers (the change happened as the old leader died).
//! Delivery is therefore at least once: a leader that died after a webhook took the
//! alert but before it marked it sent has it sent again, with the same `id` in the body
//! for receivers that deduplicate. The ledger keeps the newest [`KEPT`] entries, and it
//! is what `GET /api/v1/alerts` lists on every coordinator of a cluster
//! ([`super::Monitor::cluster_alerts`]): the same alerts, ids and delivery counts on each,
//! and across a failover.
//!
//! With the embedded store there is no ledger: a single coordinator has no successor.

use serde::{Deserialize, Serialize};

use super::Change;
use crate::etcd_kv::EtcdKv;

/// Why the ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// An entry could not be encoded.
    #[error("alert ledger entry: {0}")]
    Encode(#[from] serde_json::Error),
    /// etcd refused or did not answer (a write also fails once this coordinator no
    /// longer leads: the fence).
    #[error("{0}")]
    Store(String),
    /// This coordinator knows etcd unreachable: no read that could only time out.
    #[error("etcd is unreachable")]
    Unreachable,
}

/// Entries kept in etcd.
pub const KEPT: usize = 50;
/// How far back a new leader looks for changes it saw as a follower.
pub const TAKEOVER_WINDOW_MS: u64 = 60_000;
/// How far apart two coordinators may see the same change (the relay's second, the
/// evaluation tick, grouping) and still count it as one.
pub const SAME_CHANGE_MS: u64 = 10_000;

/// One alert in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub at_ms: u64,
    pub changes: Vec<Change>,
    /// Every webhook was tried (whether or not it took the alert).
    pub sent: bool,
    /// Webhooks that took it and those that did not (once `sent`).
    #[serde(default)]
    pub delivered: u32,
    #[serde(default)]
    pub failed: u32,
}

/// The cluster's alert ledger in etcd.
pub struct Ledger {
    kv: EtcdKv,
}

impl Ledger {
    pub fn new(kv: EtcdKv) -> Self {
        Ledger { kv }
    }

    fn key(e: &Entry) -> String {
        format!("alerts/{:020}-{}", e.at_ms, e.id)
    }

    /// Writes `entry` (only while this coordinator leads).
    pub fn put(&self, entry: &Entry) -> Result<(), LedgerError> {
        let value = serde_json::to_vec(entry)?;
        self.kv
            .put_fenced(&[(Self::key(entry), value)])
            .map_err(|e| LedgerError::Store(e.to_string()))
    }

    /// Every entry, oldest first (an unreadable one is skipped).
    pub fn entries(&self) -> Result<Vec<Entry>, LedgerError> {
        Ok(self
            .kv
            .list("alerts/")
            .map_err(|e| LedgerError::Store(e.to_string()))?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// Deletes all but the newest [`KEPT`] of `entries` (oldest first).
    pub fn trim(&self, entries: &[Entry]) -> Result<(), LedgerError> {
        let excess = entries.len().saturating_sub(KEPT);
        for e in &entries[..excess] {
            self.kv
                .delete_fenced(&Self::key(e))
                .map_err(|e| LedgerError::Store(e.to_string()))?;
        }
        Ok(())
    }
}

/// The changes of `own` (formed as a follower) that no ledger entry covers: none holds
/// the same region, state and diagnosis within [`SAME_CHANGE_MS`].
pub fn uncovered(own: Vec<Change>, ledger: &[Entry]) -> Vec<Change> {
    own.into_iter()
        .filter(|c| {
            !ledger.iter().flat_map(|e| &e.changes).any(|x| {
                x.region == c.region
                    && x.state == c.state
                    && x.diagnosis == c.diagnosis
                    && x.at_ms.abs_diff(c.at_ms) < SAME_CHANGE_MS
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::{Diagnosis, Health};

    fn change(region: &str, state: Health, at_ms: u64) -> Change {
        Change {
            region: region.into(),
            previous: Health::Up,
            state,
            diagnosis: (state == Health::Down).then_some(Diagnosis::EdgeDown),
            check: None,
            last_error: None,
            at_ms,
            previous_diagnosis: None,
            held: None,
            silence: None,
        }
    }

    #[test]
    fn a_new_leader_sends_only_what_the_ledger_does_not_cover() {
        let ledger = [Entry {
            id: "a".into(),
            at_ms: 100_000,
            changes: vec![change("eu", Health::Down, 99_500)],
            sent: true,
            delivered: 1,
            failed: 0,
        }];
        // Seen as a follower: eu down (the old leader sent it, a moment apart), us down
        // (it died before it formed that one), eu up, and eu down again 20 s later.
        let own = vec![
            change("eu", Health::Down, 100_200),
            change("us", Health::Down, 100_300),
            change("eu", Health::Up, 100_400),
            change("eu", Health::Down, 120_000),
        ];
        let left = uncovered(own, &ledger);
        let regions: Vec<(&str, Health, u64)> = left
            .iter()
            .map(|c| (c.region.as_str(), c.state, c.at_ms))
            .collect();
        assert_eq!(
            regions,
            [
                ("us", Health::Down, 100_300),
                ("eu", Health::Up, 100_400),
                ("eu", Health::Down, 120_000)
            ]
        );
    }
}
