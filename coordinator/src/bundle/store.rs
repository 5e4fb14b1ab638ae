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

use crate::clock::now_ms;
use std::path::Path;

use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::Bundle;

const VERSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("versions");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const PLAN_KEY: &str = "plan";

/// Storage failures (a full disk among them).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("config store: {0}")]
    Storage(String),
    #[error("config store holds a corrupt record: {0}")]
    Corrupt(String),
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
pub struct ConfigStore {
    backend: Backend,
}

enum Backend {
    Redb(Database),
    Etcd(EtcdStore),
}

struct EtcdStore {
    kv: crate::etcd_kv::EtcdKv,
    cache: std::sync::Mutex<std::collections::HashMap<String, StoredVersion>>,
}

impl std::fmt::Debug for ConfigStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.backend {
            Backend::Redb(_) => "ConfigStore(redb)",
            Backend::Etcd(_) => "ConfigStore(etcd)",
        })
    }
}

impl ConfigStore {
    /// The cluster's store in etcd (plan writes fenced on the leader key).
    pub fn etcd(kv: crate::etcd_kv::EtcdKv) -> Self {
        ConfigStore {
            backend: Backend::Etcd(EtcdStore {
                kv,
                cache: Default::default(),
            }),
        }
    }

    /// The etcd key of the plan, for followers that watch it (`None`: embedded).
    pub fn plan_key(&self) -> Option<(etcd::Etcd, Vec<u8>)> {
        match &self.backend {
            Backend::Etcd(e) => Some((e.kv.etcd().clone(), e.kv.key("config/plan"))),
            Backend::Redb(_) => None,
        }
    }

    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        // Bundles hold `waf.toml`, which may hold basic-auth passwords: owner only.
        let path = dir.join("config.redb");
        daemon::files::file_with_mode(&path, daemon::files::PRIVATE_FILE)
            .map_err(|e| StoreError::Storage(format!("{}: {e}", path.display())))?;
        let db = Database::create(&path).map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(VERSIONS).map_err(storage)?;
            txn.open_table(META).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(ConfigStore {
            backend: Backend::Redb(db),
        })
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
            Backend::Redb(db) => db,
            Backend::Etcd(e) => {
                let stored =
                    e.kv.get_or_create(&format!("config/versions/{version}"), &bytes)
                        .map_err(storage)?;
                if let Ok(record) = serde_json::from_slice::<StoredVersion>(&stored) {
                    e.cache
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(version.clone(), record);
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
            Backend::Redb(db) => db,
            Backend::Etcd(e) => {
                let cached = e
                    .cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(version)
                    .cloned();
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
                e.cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(version.to_owned(), stored.clone());
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
            Backend::Redb(db) => {
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
    pub fn load_plan<T: for<'de> Deserialize<'de>>(&self) -> Result<Option<T>, StoreError> {
        let db = match &self.backend {
            Backend::Redb(db) => db,
            Backend::Etcd(e) => {
                let Some(v) = e.kv.get("config/plan").map_err(storage)? else {
                    return Ok(None);
                };
                return serde_json::from_slice(&v)
                    .map(Some)
                    .map_err(|err| StoreError::Corrupt(format!("rollout plan: {err}")));
            }
        };
        let read = db.begin_read().map_err(storage)?;
        let t = read.open_table(META).map_err(storage)?;
        let Some(v) = t.get(PLAN_KEY).map_err(storage)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("rollout plan: {e}")))
    }

    pub fn save_plan<T: Serialize>(&self, plan: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(plan).map_err(storage)?;
        let db = match &self.backend {
            Backend::Redb(db) => db,
            Backend::Etcd(e) => {
                return e
                    .kv
                    .put_fenced(&[("config/plan".to_owned(), bytes)])
                    .map_err(storage)
            }
        };
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate);
        {
            let mut t = txn.open_table(META).map_err(storage)?;
            t.insert(PLAN_KEY, bytes.as_slice()).map_err(storage)?;
        }
        txn.commit().map_err(storage)
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
            let s = ConfigStore::open(dir.path()).unwrap();
            let (v, new) = s.put(&b).unwrap();
            assert!(new);
            assert!(!s.put(&b).unwrap().1);
            s.save_plan(&vec![v.clone()]).unwrap();
            v
        };
        let s = ConfigStore::open(dir.path()).unwrap();
        assert_eq!(s.get(&v).unwrap().unwrap().bundle, b);
        assert_eq!(s.list().unwrap().len(), 1);
        assert_eq!(s.load_plan::<Vec<String>>().unwrap(), Some(vec![v]));
        assert!(s.get("nope").unwrap().is_none());
    }
}
