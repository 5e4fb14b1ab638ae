//! Maintenance: drained regions and alert silences, the same on every coordinator.
//!
//! A **drain** takes a region out of routing and DNS (`geo` adds `drained` to its
//! `why_not`) and holds its alerts (`monitor::alerts` sends none of its changes, and
//! tells the webhooks once on undrain if the region is not as they last heard), while
//! it is still probed and judged, and purges and config still reach it. A **silence**
//! keeps the changes it matches (a region, a diagnosis, or both) from the webhooks until
//! it expires; they are still listed, marked. Both may expire by themselves
//! ([`record`]).
//!
//! [`Maintenance`] keeps the records in memory as one immutable snapshot: routing, DNS,
//! the monitor and every read endpoint read only that, so no request waits on the
//! store. Writes go to the [`store`] first (the state dir, or etcd in a cluster where
//! only the leader writes) and into the snapshot once stored. In a cluster
//! [`Maintenance::run`] reads etcd once a second and replaces the snapshot with what
//! it holds; a read that fails (etcd without quorum, cut off) keeps the last known
//! records in force, and a read that started before a local write does not undo it.

pub mod record;
pub mod store;

use daemon::sync::{IoMutex, RecoverRw};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::DescriptorEncoder;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::metrics::{collector, gauge, Label, Registry};
use crate::store_health::StoreHealth;
pub use record::{Drain, DrainRequest, Silence, SilenceRequest, MAX_SILENCES};
pub use store::{Records, StoreError};

/// How often a coordinator of a cluster reads the records from etcd.
pub const POLL: Duration = Duration::from_secs(1);

/// Drains and silences; share behind an `Arc`.
pub struct Maintenance {
    store: store::Store,
    /// `[[regions]]`, for the metrics (a drained region beyond them is listed too).
    regions: Vec<String>,
    records: RwLock<Arc<Records>>,
    /// Serializes writes (each is read, change, store, swap).
    writes: IoMutex<()>,
    /// Bumped by every local write: a poll that started before one is dropped.
    generation: AtomicU64,
    /// etcd's reachability (a cluster only).
    store_health: Option<StoreHealth>,
}

impl std::fmt::Debug for Maintenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maintenance")
            .field("store", &self.store)
            .finish()
    }
}

impl Maintenance {
    /// The records in `state_dir` (a file that cannot be read is an error).
    pub fn open(state_dir: &Path, regions: Vec<String>) -> Result<Arc<Self>, StoreError> {
        let store = store::Store::file(state_dir);
        let records = store.load()?.pruned(now_ms());
        Ok(Self::with(store, records, regions, None))
    }

    /// The cluster's records in etcd: read once now if etcd answers (else empty until
    /// the first successful poll).
    pub fn etcd(
        kv: crate::etcd_kv::EtcdKv,
        regions: Vec<String>,
        health: StoreHealth,
    ) -> Arc<Self> {
        let store = store::Store::Etcd(kv);
        let records = store.load().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "drains and silences not read from etcd yet; reading again every second");
            Records::default()
        });
        Self::with(store, records, regions, Some(health))
    }

    fn with(
        store: store::Store,
        records: Records,
        regions: Vec<String>,
        store_health: Option<StoreHealth>,
    ) -> Arc<Self> {
        Arc::new(Maintenance {
            store,
            regions,
            records: RwLock::new(Arc::new(records)),
            writes: IoMutex::new(()),
            generation: AtomicU64::new(0),
            store_health,
        })
    }

    fn snapshot(&self) -> Arc<Records> {
        self.records.read_locked().clone()
    }

    /// `region`'s drain in force at `now_ms`.
    pub fn drain_of(&self, region: &str, now_ms: u64) -> Option<Drain> {
        self.snapshot()
            .drains
            .get(region)
            .filter(|d| d.live(now_ms))
            .cloned()
    }

    /// Whether `region` is drained now.
    pub fn drained(&self, region: &str) -> bool {
        self.drain_of(region, now_ms()).is_some()
    }

    /// The silences in force at `now_ms`, oldest first.
    pub fn silences(&self, now_ms: u64) -> Vec<Silence> {
        let mut out: Vec<Silence> = self
            .snapshot()
            .silences
            .values()
            .filter(|s| s.live(now_ms))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.at_ms.cmp(&b.at_ms).then(a.id.cmp(&b.id)));
        out
    }

    /// The id of a silence in force now that matches a change of `region` to
    /// `diagnosis` (from `previous`).
    pub fn silence_for(
        &self,
        region: &str,
        diagnosis: Option<&str>,
        previous: Option<&str>,
    ) -> Option<String> {
        let now = now_ms();
        self.silences(now)
            .into_iter()
            .find(|s| s.matches(region, diagnosis, previous, now))
            .map(|s| s.id)
    }

    /// Drains `region` (replacing a drain in force). Blocking: it writes the store.
    pub fn drain(&self, region: &str, drain: Drain) -> Result<(), StoreError> {
        self.apply(|r| {
            r.drains.insert(region.to_owned(), drain);
        })
    }

    /// Ends `region`'s drain; the drain that was in force, if any. Blocking.
    pub fn undrain(&self, region: &str) -> Result<Option<Drain>, StoreError> {
        let now = now_ms();
        self.apply(|r| r.drains.remove(region).filter(|d| d.live(now)))
    }

    /// Adds a silence (refused past [`MAX_SILENCES`] in force). Blocking.
    pub fn silence(&self, silence: Silence) -> Result<Result<(), String>, StoreError> {
        self.change(|r| {
            if r.silences.len() >= MAX_SILENCES {
                return Err(format!(
                    "{MAX_SILENCES} silences are in force already: remove one first"
                ));
            }
            r.silences.insert(silence.id.clone(), silence);
            Ok(())
        })
    }

    /// Removes silence `id`; it, if it was in force. Blocking.
    pub fn unsilence(&self, id: &str) -> Result<Option<Silence>, StoreError> {
        let now = now_ms();
        self.apply(|r| r.silences.remove(id).filter(|s| s.live(now)))
    }

    /// [`Self::change`] with an edit that cannot refuse.
    fn apply<T>(&self, edit: impl FnOnce(&mut Records) -> T) -> Result<T, StoreError> {
        match self.change(|r| Ok::<T, std::convert::Infallible>(edit(r)))? {
            Ok(t) => Ok(t),
            Err(never) => match never {},
        }
    }

    /// Applies `edit` to the records (expired ones dropped first), stores the result and
    /// makes it the snapshot. An `Err` from `edit` stores nothing.
    fn change<T, E>(
        &self,
        edit: impl FnOnce(&mut Records) -> Result<T, E>,
    ) -> Result<Result<T, E>, StoreError> {
        if self.store_health.as_ref().and_then(StoreHealth::reachable) == Some(false) {
            return Err(StoreError::Unreachable);
        }
        let _one_at_a_time = self.writes.lock();
        let old = self.snapshot();
        let mut new = (*old).clone().pruned(now_ms());
        let answer = match edit(&mut new) {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        // The file holds `new` whole; etcd gets the records that differ from `old`
        // (expired ones it still holds are deleted too).
        self.store.save(&old, &new)?;
        self.generation.fetch_add(1, Ordering::SeqCst);
        *self.records.write_locked() = Arc::new(new);
        Ok(Ok(answer))
    }

    /// In a cluster: reads the records from etcd every [`POLL`], until `shutdown`; the
    /// leader also deletes the expired ones. With the state dir: nothing to follow.
    pub async fn run(
        self: Arc<Self>,
        leading: tokio::sync::watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) {
        if !matches!(self.store, store::Store::Etcd(_)) {
            return;
        }
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let generation = self.generation.load(Ordering::SeqCst);
            let me = self.clone();
            // The swap waits on a write in flight (which holds `writes` across its etcd
            // call): on the blocking thread, with the read, never on the runtime's.
            let read = tokio::task::spawn_blocking(move || {
                let records = me.store.load()?;
                let expired = records.clone().pruned(now_ms()) != records;
                let _one_at_a_time = me.writes.lock();
                if me.generation.load(Ordering::SeqCst) == generation {
                    *me.records.write_locked() = Arc::new(records);
                }
                Ok::<_, store::StoreError>(expired)
            })
            .await;
            match read {
                Ok(Ok(expired)) => {
                    if expired && *leading.borrow() {
                        let me = self.clone();
                        let _ = tokio::task::spawn_blocking(move || me.apply(|_| ())).await;
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "drains and silences not read from etcd; the last known stay in force")
                }
                Err(e) => tracing::warn!(error = %e, "maintenance poll task failed"),
            }
        }
    }

    pub fn register_metrics(self: &Arc<Self>, registry: &mut Registry) {
        registry.register_collector(collector(self.clone(), encode_metrics));
    }
}

fn encode_metrics(m: &Arc<Maintenance>, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let now = now_ms();
    let records = m.snapshot();
    let silences = m.silences(now);
    let regions: BTreeSet<&str> = m
        .regions
        .iter()
        .map(String::as_str)
        .chain(records.drains.keys().map(String::as_str))
        .collect();
    gauge(
        e,
        "coordinator_region_drained",
        "1 while the region is drained: out of routing and DNS, its alerts held.",
        regions.iter().map(|r| {
            (
                [("region", Label(r))],
                u64::from(records.drains.get(*r).is_some_and(|d| d.live(now))),
            )
        }),
    )?;
    gauge(
        e,
        "coordinator_region_silenced",
        "1 while a silence naming the region is in force (its matching changes page nobody).",
        regions.iter().map(|r| {
            (
                [("region", Label(r))],
                u64::from(silences.iter().any(|s| s.region.as_deref() == Some(*r))),
            )
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_and_silences_survive_a_reopen_and_expire_by_themselves() {
        let dir = tempfile::tempdir().expect("tmp");
        let m = Maintenance::open(dir.path(), vec!["eu".into(), "us".into()]).expect("open");
        assert!(!m.drained("eu"));
        let now = now_ms();
        let d = DrainRequest {
            reason: Some("kernel".into()),
            for_s: None,
        }
        .check("api", now)
        .expect("valid");
        m.drain("eu", d.clone()).expect("drain");
        let short = DrainRequest {
            reason: None,
            for_s: Some(1),
        }
        .check("api", now - 2_000)
        .expect("valid");
        m.drain("us", short).expect("drain");
        assert!(m.drained("eu") && !m.drained("us"), "us's drain is over");
        let s = SilenceRequest {
            region: Some("us".into()),
            diagnosis: None,
            for_s: 60,
            reason: None,
        }
        .check("api", now)
        .expect("valid");
        m.silence(s.clone()).expect("store").expect("room");
        assert_eq!(
            m.silence_for("us", Some("edge_down"), None),
            Some(s.id.clone())
        );
        assert_eq!(m.silence_for("eu", Some("edge_down"), None), None);

        let again = Maintenance::open(dir.path(), vec![]).expect("reopen");
        assert_eq!(again.drain_of("eu", now_ms()), Some(d));
        assert!(!again.drained("us"));
        assert_eq!(again.silences(now_ms()).len(), 1);
        assert_eq!(again.unsilence(&s.id).expect("store"), Some(s));
        assert_eq!(again.unsilence("nope").expect("store"), None);
        assert!(again.undrain("eu").expect("store").is_some());
        assert_eq!(
            again.undrain("eu").expect("store"),
            None,
            "not drained any more"
        );
        let third = Maintenance::open(dir.path(), vec![]).expect("reopen");
        assert!(!third.drained("eu") && third.silences(now_ms()).is_empty());
    }
}
