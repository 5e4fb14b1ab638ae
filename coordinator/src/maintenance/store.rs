//! Where drains and silences are kept: `maintenance.json` in the state dir with the
//! embedded store (rewritten whole, fsynced, renamed into place: a restart finds what
//! was acknowledged), or etcd under `maintenance/drains/<region>/` and
//! `maintenance/silences/<id>` in a cluster (written by the leader only, fenced on its
//! leader key, [`crate::etcd_kv`]). Calls are blocking; the API makes them on a blocking
//! thread, and nothing on a request's path reads the store (see the facade).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::record::{Drain, Silence};
use crate::etcd_kv::{EtcdKv, KvError};

/// The file's name in the state dir.
pub const FILE: &str = "maintenance.json";
/// The file format this build writes (and the newest it reads).
const VERSION: u32 = 1;
const DRAINS: &str = "maintenance/drains/";
const SILENCES: &str = "maintenance/silences/";

/// Why the records could not be read or written. The text is what the API answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{path} was written by a newer coordinator (format {found}, this one reads up to {VERSION}); nothing was changed")]
    Newer { path: String, found: u32 },
    #[error(transparent)]
    Etcd(#[from] KvError),
    /// This coordinator knows etcd unreachable: no write that could only time out.
    #[error(
        "etcd is unreachable: drains and silences cannot be changed now (the ones in force stay)"
    )]
    Unreachable,
}

/// Every drain (by region) and silence (by id), expired ones included until dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Records {
    #[serde(default)]
    pub drains: BTreeMap<String, Drain>,
    #[serde(default)]
    pub silences: BTreeMap<String, Silence>,
}

impl Records {
    /// Without what expired by `now_ms`.
    pub fn pruned(mut self, now_ms: u64) -> Records {
        self.drains.retain(|_, d| d.live(now_ms));
        self.silences.retain(|_, s| s.live(now_ms));
        self
    }
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    #[serde(flatten)]
    records: Records,
}

/// One of the two places.
#[derive(Debug)]
pub enum Store {
    File(PathBuf),
    Etcd(EtcdKv),
}

impl Store {
    /// `maintenance.json` in `state_dir`.
    pub fn file(state_dir: &Path) -> Store {
        Store::File(state_dir.join(FILE))
    }

    /// Everything stored (an etcd record that does not parse is skipped and logged).
    pub fn load(&self) -> Result<Records, StoreError> {
        match self {
            Store::File(path) => load_file(path),
            Store::Etcd(kv) => {
                let mut out = Records::default();
                for (key, value) in kv.list("maintenance/")? {
                    if let Some(region) = key.strip_prefix(DRAINS) {
                        let region = region.trim_end_matches('/');
                        match serde_json::from_slice(&value) {
                            Ok(d) => {
                                out.drains.insert(region.to_owned(), d);
                            }
                            Err(e) => {
                                tracing::warn!(key, error = %e, "unreadable drain record in etcd; ignored")
                            }
                        }
                    } else if let Some(id) = key.strip_prefix(SILENCES) {
                        match serde_json::from_slice(&value) {
                            Ok(s) => {
                                out.silences.insert(id.to_owned(), s);
                            }
                            Err(e) => {
                                tracing::warn!(key, error = %e, "unreadable silence record in etcd; ignored")
                            }
                        }
                    }
                }
                Ok(out)
            }
        }
    }

    /// Writes the change from `old` to `new` (the file: all of `new`; etcd: the records
    /// that differ).
    pub fn save(&self, old: &Records, new: &Records) -> Result<(), StoreError> {
        match self {
            Store::File(path) => save_file(path, new),
            Store::Etcd(kv) => {
                let mut puts = Vec::new();
                for (region, d) in &new.drains {
                    if old.drains.get(region) != Some(d) {
                        puts.push((format!("{DRAINS}{region}/"), json(d)));
                    }
                }
                for (id, s) in &new.silences {
                    if old.silences.get(id) != Some(s) {
                        puts.push((format!("{SILENCES}{id}"), json(s)));
                    }
                }
                if !puts.is_empty() {
                    kv.put_fenced(&puts)?;
                }
                // A trailing `/` (drains) and fixed-length ids (silences): deleting one
                // key's prefix deletes that key only.
                for region in old.drains.keys().filter(|r| !new.drains.contains_key(*r)) {
                    kv.delete_fenced(&format!("{DRAINS}{region}/"))?;
                }
                for id in old
                    .silences
                    .keys()
                    .filter(|i| !new.silences.contains_key(*i))
                {
                    kv.delete_fenced(&format!("{SILENCES}{id}"))?;
                }
                Ok(())
            }
        }
    }
}

fn json(v: &impl Serialize) -> Vec<u8> {
    // Plain structs of strings and numbers: encoding cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn load_file(path: &Path) -> Result<Records, StoreError> {
    let err = |message: String| StoreError::File {
        path: path.display().to_string(),
        message,
    };
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Records::default()),
        Err(e) => return Err(err(e.to_string())),
    };
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let version: Version = serde_json::from_slice(&text).map_err(|e| err(e.to_string()))?;
    if version.version > VERSION {
        return Err(StoreError::Newer {
            path: path.display().to_string(),
            found: version.version,
        });
    }
    let file: FileFormat = serde_json::from_slice(&text).map_err(|e| err(e.to_string()))?;
    Ok(file.records)
}

fn save_file(path: &Path, records: &Records) -> Result<(), StoreError> {
    let err = |message: String| StoreError::File {
        path: path.display().to_string(),
        message,
    };
    let body = serde_json::to_vec_pretty(&FileFormat {
        version: VERSION,
        records: records.clone(),
    })
    .map_err(|e| err(e.to_string()))?;
    daemon::files::replace_durably(path, &body, daemon::files::PRIVATE_FILE)
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_keeps_what_was_saved_and_refuses_a_newer_format() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::file(dir.path());
        assert_eq!(store.load().expect("empty"), Records::default());
        let mut r = Records::default();
        r.drains.insert(
            "eu".into(),
            Drain {
                by: "api".into(),
                reason: Some("upgrade".into()),
                at_ms: 1,
                until_ms: Some(10),
            },
        );
        store.save(&Records::default(), &r).expect("save");
        assert_eq!(store.load().expect("load"), r);
        assert_eq!(r.clone().pruned(10).drains.len(), 0, "expired");
        std::fs::write(dir.path().join(FILE), br#"{"version": 9}"#).expect("write");
        let e = store.load().expect_err("newer");
        assert!(e.to_string().contains("newer coordinator"), "{e}");
        std::fs::write(dir.path().join(FILE), b"{").expect("write");
        let e = store.load().expect_err("corrupt");
        assert!(e.to_string().contains(FILE), "{e}");
    }
}
