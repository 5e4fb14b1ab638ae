//! Every pushed bundle version, and the rollout plan, in `config.redb` in the state dir.
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
#[derive(Debug)]
pub struct ConfigStore {
    db: Database,
}

impl ConfigStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = Database::create(dir.join("config.redb")).map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(VERSIONS).map_err(storage)?;
            txn.open_table(META).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(ConfigStore { db })
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
        let mut txn = self.db.begin_write().map_err(storage)?;
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
        let read = self.db.begin_read().map_err(storage)?;
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
        let read = self.db.begin_read().map_err(storage)?;
        let t = read.open_table(VERSIONS).map_err(storage)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(storage)? {
            let (_, v) = item.map_err(storage)?;
            let s: StoredVersion = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
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
        let read = self.db.begin_read().map_err(storage)?;
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
        let mut txn = self.db.begin_write().map_err(storage)?;
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
