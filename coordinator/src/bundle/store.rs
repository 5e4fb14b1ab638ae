//! Every pushed bundle version, and the rollout plan, in `config.redb` in the state dir,
//! or in etcd with `[store] backend = "etcd"` (`config/versions/<v>` and `config/plan`
//! under the prefix), shared by the cluster.
//!
//! With etcd the methods stay synchronous ([`crate::etcd_kv`]: blocking, bounded, every
//! write fenced on the leader key, so a coordinator that is not, or no longer, the leader
//! cannot overwrite the plan). Versions, immutable, are cached once read.
//!
//! Versions are immutable and never deleted (they are small and a rollback may want any
//! of them). The rollout plan ([`crate::rollout::Plan`]) is one JSON value rewritten on
//! each phase change, so a coordinator restart resumes a rollout where it was. Every
//! write is a durable redb transaction: a push that answered 200 survives kill -9.
//!
//! [`BundleStore::plan_changes`] delivers the stored plan, then every plan written,
//! whichever the backend: the embedded one publishes its own writes, the etcd one
//! follows the plan key with [`etcd::ListWatch`] (so a follower takes the leader's plan
//! without anyone above this module talking to etcd).

use crate::clock::now_ms;
use daemon::sync::Recover;
use std::path::Path;
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::Bundle;

const VERSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("versions");
use crate::schema::META;
/// The file's name in the state dir.
pub const FILE: &str = "config.redb";
const PLAN_KEY: &str = "plan";
/// The plan's key under the etcd prefix.
const PLAN_ETCD_KEY: &str = "config/plan";

/// Storage failures (a full disk among them).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("config store: {0}")]
    Storage(String),
    #[error("config store holds a corrupt record: {0}")]
    Corrupt(String),
    /// The file was written by a newer coordinator (or its marker is unreadable).
    #[error(transparent)]
    Schema(#[from] crate::schema::SchemaError),
}

fn storage<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Storage(e.to_string())
}

/// One stored version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredVersion {
    pub version: String,
    pub created_at_ms: u64,
    pub bundle: Bundle,
}

/// A version as listed (without contents).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    pub created_at_ms: u64,
    pub files: Vec<String>,
    pub bytes: usize,
}

/// The store; cheap to share behind an `Arc`.
pub struct BundleStore {
    backend: Backend,
}

enum Backend {
    /// The database, and each plan written to it (for [`BundleStore::plan_changes`]).
    Redb(Database, watch::Sender<Option<Arc<[u8]>>>),
    Etcd(EtcdStore),
}

struct EtcdStore {
    kv: crate::etcd_kv::EtcdKv,
    cache: std::sync::Mutex<std::collections::HashMap<String, StoredVersion>>,
}

impl std::fmt::Debug for BundleStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.backend {
            Backend::Redb(..) => "BundleStore(redb)",
            Backend::Etcd(_) => "BundleStore(etcd)",
        })
    }
}

impl BundleStore {
    /// The cluster's store in etcd (plan writes fenced on the leader key).
    pub fn etcd(kv: crate::etcd_kv::EtcdKv) -> Self {
        BundleStore {
            backend: Backend::Etcd(EtcdStore {
                kv,
                cache: Default::default(),
            }),
        }
    }

    /// The stored plan, then every plan written (by this coordinator with the embedded
    /// store; by any coordinator of the cluster with etcd, listed again after a broken
    /// or compacted watch). A value that does not decode as `T` is skipped with a
    /// warning. With etcd it must be called inside the runtime (it spawns the watch).
    pub fn plan_changes<T: DeserializeOwned>(&self) -> PlanChanges<T> {
        let feed = match &self.backend {
            Backend::Redb(_, written) => {
                let mut rx = written.subscribe();
                rx.mark_changed(); // the plan stored now comes first
                Feed::Redb {
                    stored: self.load_plan_bytes().ok().flatten(),
                    rx,
                }
            }
            Backend::Etcd(e) => Feed::Etcd(
                etcd::ListWatch::key(e.kv.etcd(), e.kv.key(PLAN_ETCD_KEY))
                    .named("rollout plan")
                    .spawn(),
            ),
        };
        PlanChanges {
            feed,
            _plan: std::marker::PhantomData,
        }
    }

    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // Bundles hold `waf.toml`, which may hold basic-auth passwords: owner only.
        let path = dir.join(FILE);
        daemon::files::file_with_mode(&path, daemon::files::PRIVATE_FILE)
            .map_err(|e| StoreError::Storage(format!("{}: {e}", path.display())))?;
        let db = Database::create(&path).map_err(storage)?;
        crate::schema::open_redb(&db, &path)?;
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(VERSIONS).map_err(storage)?;
            txn.open_table(META).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(BundleStore {
            backend: Backend::Redb(db, watch::Sender::new(None)),
        })
    }

    /// Copies every version and the plan, as one commit saw them, into `dest` (a
    /// backup's file). The etcd store is etcd's to snapshot.
    pub fn backup_into(&self, dest: &Database) -> Result<(), StoreError> {
        let Backend::Redb(db, _) = &self.backend else {
            return Err(StoreError::Storage(
                "the bundles are in etcd: back them up with etcd's own snapshots".into(),
            ));
        };
        let read = db.begin_read().map_err(storage)?;
        let txn = dest.begin_write().map_err(storage)?;
        crate::snapshot::copy_table(&read, &txn, VERSIONS).map_err(storage)?;
        crate::snapshot::copy_table(&read, &txn, META).map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// Stores a bundle; returns its version and whether it was new.
    pub fn put(&self, bundle: &Bundle) -> Result<(String, bool), StoreError> {
        let version = bundle.version();
        if self.get(&version)?.is_some() {
            return Ok((version, false));
        }
        let record = StoredVersion {
            version: version.clone(),
            created_at_ms: now_ms(),
            bundle: bundle.clone(),
        };
        let bytes = serde_json::to_vec(&record).map_err(storage)?;
        let db = match &self.backend {
            Backend::Redb(db, _) => db,
            Backend::Etcd(e) => {
                let stored =
                    e.kv.get_or_create(&format!("config/versions/{version}"), &bytes)
                        .map_err(storage)?;
                if let Ok(record) = serde_json::from_slice::<StoredVersion>(&stored) {
                    e.cache.locked().insert(version.clone(), record);
                }
                return Ok((version, stored == bytes));
            }
        };
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate);
        {
            let mut t = txn.open_table(VERSIONS).map_err(storage)?;
            t.insert(version.as_str(), bytes.as_slice())
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok((version, true))
    }

    pub fn get(&self, version: &str) -> Result<Option<StoredVersion>, StoreError> {
        let db = match &self.backend {
            Backend::Redb(db, _) => db,
            Backend::Etcd(e) => {
                let cached = e.cache.locked().get(version).cloned();
                if cached.is_some() {
                    return Ok(cached);
                }
                let Some(v) =
                    e.kv.get(&format!("config/versions/{version}"))
                        .map_err(storage)?
                else {
                    return Ok(None);
                };
                let stored: StoredVersion = serde_json::from_slice(&v)
                    .map_err(|err| StoreError::Corrupt(format!("version {version}: {err}")))?;
                e.cache.locked().insert(version.to_owned(), stored.clone());
                return Ok(Some(stored));
            }
        };
        let read = db.begin_read().map_err(storage)?;
        let t = read.open_table(VERSIONS).map_err(storage)?;
        let Some(v) = t.get(version).map_err(storage)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("version {version}: {e}")))
    }

    /// Every version, oldest first.
    pub fn list(&self) -> Result<Vec<VersionInfo>, StoreError> {
        let records: Vec<Vec<u8>> = match &self.backend {
            Backend::Etcd(e) => {
                e.kv.list("config/versions/")
                    .map_err(storage)?
                    .into_iter()
                    .map(|(_, v)| v)
                    .collect()
            }
            Backend::Redb(db, _) => {
                let read = db.begin_read().map_err(storage)?;
                let t = read.open_table(VERSIONS).map_err(storage)?;
                let mut all = Vec::new();
                for item in t.iter().map_err(storage)? {
                    all.push(item.map_err(storage)?.1.value().to_vec());
                }
                all
            }
        };
        let mut out = Vec::new();
        for v in records {
            let s: StoredVersion =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push(VersionInfo {
                version: s.version,
                created_at_ms: s.created_at_ms,
                files: s.bundle.files.keys().cloned().collect(),
                bytes: s.bundle.files.values().map(String::len).sum(),
            });
        }
        out.sort_by(|a, b| (a.created_at_ms, &a.version).cmp(&(b.created_at_ms, &b.version)));
        Ok(out)
    }

    /// The stored plan, if any (as JSON the rollout module defines).
    pub fn load_plan<T: DeserializeOwned>(&self) -> Result<Option<T>, StoreError> {
        let Some(bytes) = self.load_plan_bytes()? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("rollout plan: {e}")))
    }

    fn load_plan_bytes(&self) -> Result<Option<Arc<[u8]>>, StoreError> {
        let db = match &self.backend {
            Backend::Redb(db, _) => db,
            Backend::Etcd(e) => {
                let v = e.kv.get(PLAN_ETCD_KEY).map_err(storage)?;
                return Ok(v.map(Arc::from));
            }
        };
        let read = db.begin_read().map_err(storage)?;
        let t = read.open_table(META).map_err(storage)?;
        let v = t.get(PLAN_KEY).map_err(storage)?;
        Ok(v.map(|v| Arc::from(v.value())))
    }

    pub fn save_plan<T: Serialize>(&self, plan: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(plan).map_err(storage)?;
        let db = match &self.backend {
            Backend::Redb(db, _) => db,
            Backend::Etcd(e) => {
                return e
                    .kv
                    .put_fenced(&[(PLAN_ETCD_KEY.to_owned(), bytes)])
                    .map_err(storage)
            }
        };
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate);
        {
            let mut t = txn.open_table(META).map_err(storage)?;
            t.insert(PLAN_KEY, bytes.as_slice()).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        if let Backend::Redb(_, written) = &self.backend {
            written.send_replace(Some(Arc::from(bytes)));
        }
        Ok(())
    }
}

/// The plans a [`BundleStore`] delivers ([`BundleStore::plan_changes`]), oldest first.
pub struct PlanChanges<T> {
    feed: Feed,
    _plan: std::marker::PhantomData<fn() -> T>,
}

enum Feed {
    /// The plan stored when subscribed, then each one written since.
    Redb {
        stored: Option<Arc<[u8]>>,
        rx: watch::Receiver<Option<Arc<[u8]>>>,
    },
    Etcd(etcd::Watching),
}

impl<T: DeserializeOwned> PlanChanges<T> {
    /// The next plan; `None` once the store is gone. Waits while there is none (and,
    /// with etcd, while etcd is unreachable).
    pub async fn next(&mut self) -> Option<T> {
        loop {
            let Some(bytes) = self.next_bytes().await? else {
                continue;
            };
            match serde_json::from_slice(&bytes) {
                Ok(plan) => return Some(plan),
                Err(e) => {
                    tracing::warn!(error = %e, "stored rollout plan does not decode; skipped")
                }
            }
        }
    }

    /// The next value written to the plan key (`Some(None)`: an update without one).
    async fn next_bytes(&mut self) -> Option<Option<Arc<[u8]>>> {
        match &mut self.feed {
            Feed::Redb { stored, rx } => {
                rx.changed().await.ok()?;
                let written = rx.borrow_and_update().clone();
                Some(written.or_else(|| stored.take()))
            }
            Feed::Etcd(watching) => Some(match watching.next().await? {
                etcd::Update::Listed { kvs, .. } => {
                    kvs.into_iter().next_back().map(|kv| kv.value.into())
                }
                etcd::Update::Events { events, .. } => {
                    let put = etcd::mvccpb::event::EventType::Put as i32;
                    events
                        .into_iter()
                        .filter(|e| e.r#type == put)
                        .filter_map(|e| e.kv)
                        .next_back()
                        .map(|kv| kv.value.into())
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_plan_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = std::collections::BTreeMap::new();
        files.insert("main.vcl".to_owned(), "vcl 4.1;".to_owned());
        let b = Bundle { files };
        let v = {
            let s = BundleStore::open(dir.path()).unwrap();
            let (v, new) = s.put(&b).unwrap();
            assert!(new);
            assert!(!s.put(&b).unwrap().1);
            s.save_plan(&vec![v.clone()]).unwrap();
            v
        };
        let s = BundleStore::open(dir.path()).unwrap();
        assert_eq!(s.get(&v).unwrap().unwrap().bundle, b);
        assert_eq!(s.list().unwrap().len(), 1);
        assert_eq!(s.load_plan::<Vec<String>>().unwrap(), Some(vec![v]));
        assert!(s.get("nope").unwrap().is_none());
    }

    #[tokio::test]
    async fn plan_changes_give_the_stored_plan_then_each_one_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = BundleStore::open(dir.path()).unwrap();
        let mut none = s.plan_changes::<Vec<String>>();
        s.save_plan(&vec!["a".to_owned()]).unwrap();
        assert_eq!(none.next().await, Some(vec!["a".to_owned()]));
        let mut plans = s.plan_changes::<Vec<String>>();
        assert_eq!(
            plans.next().await,
            Some(vec!["a".to_owned()]),
            "the stored one"
        );
        s.save_plan(&vec!["b".to_owned()]).unwrap();
        assert_eq!(plans.next().await, Some(vec!["b".to_owned()]));
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(50), plans.next());
        assert!(quiet.await.is_err(), "nothing more until the next write");
    }
}
