//! The stored state's schema version: which layout of keys and records a state dir's
//! redb files and a cluster's etcd prefix hold, so that a coordinator never misreads a
//! state written by another version.
//!
//! Each redb file (`purges.redb`, `config.redb`, `warm.redb`) carries it as the `schema`
//! key of its `meta` table, and a cluster as `<prefix>schema` in etcd; the value is the
//! version in ASCII digits. A state without the key was written before the marker
//! existed: that layout is version [`UNMARKED`]. On open ([`open_redb`], [`open_etcd`]):
//!
//! - a fresh state is marked [`CURRENT`];
//! - an older one is migrated, step by step up to [`CURRENT`], and marked, with one log
//!   line (`state schema migrated`, the file or prefix, `from`, `to`);
//! - a newer one (a version above [`CURRENT`], written by a newer coordinator) is
//!   refused with [`SchemaError::Newer`], one line naming the file or prefix and both
//!   versions, and nothing of it is read or written.
//!
//! Versions: 1, the layout before the marker; 2, the marker itself and `purges.redb`'s
//! optional `restored_from` (a restored backup, see `crate::backup`), which an older
//! coordinator ignores (it then full-bans every agent once). Neither step rewrites a
//! record.

use std::path::Path;

use redb::{ReadableTable, TableDefinition, TableHandle};

/// The layout this coordinator writes and reads.
pub const CURRENT: u32 = 2;
/// The layout of a state written before the marker existed.
pub const UNMARKED: u32 = 1;
/// The marker's key in a redb file's [`META`] table and under the etcd prefix.
pub const KEY: &str = "schema";
/// Every redb file's table of small named values (the marker among them).
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The key under the etcd prefix that exists once any coordinator used the prefix (the
/// purge log's id is the first record written there).
const ETCD_IN_USE: &str = "log/id";

/// Why a state cannot be used by this coordinator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("{place}: state schema version {found} is newer than this coordinator's {supported}: it was written by a newer coordinator; run that version (or restore a backup this version wrote)")]
    Newer {
        place: String,
        found: u32,
        supported: u32,
    },
    #[error("{place}: the state schema version {value:?} is not a number")]
    Unreadable { place: String, value: String },
    #[error("{place}: {message}")]
    Storage { place: String, message: String },
}

/// What opening a state does with its marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing stored yet: mark it [`CURRENT`].
    Fresh,
    /// Already [`CURRENT`].
    Current,
    /// Written by an older coordinator: migrate from this version.
    Migrate { from: u32 },
}

/// The rule: what a state marked `stored` (`None`: no marker) holding data or not means
/// for this coordinator.
pub fn decide(place: &str, stored: Option<&[u8]>, has_data: bool) -> Result<Step, SchemaError> {
    let Some(raw) = stored else {
        return Ok(if has_data {
            Step::Migrate { from: UNMARKED }
        } else {
            Step::Fresh
        });
    };
    let found = parse(place, raw)?;
    match found.cmp(&CURRENT) {
        std::cmp::Ordering::Equal => Ok(Step::Current),
        std::cmp::Ordering::Less => Ok(Step::Migrate { from: found }),
        std::cmp::Ordering::Greater => Err(SchemaError::Newer {
            place: place.to_owned(),
            found,
            supported: CURRENT,
        }),
    }
}

fn parse(place: &str, raw: &[u8]) -> Result<u32, SchemaError> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|v| *v > 0)
        .ok_or_else(|| SchemaError::Unreadable {
            place: place.to_owned(),
            value: String::from_utf8_lossy(raw).into_owned(),
        })
}

/// The marker's value for [`CURRENT`].
pub fn current_bytes() -> Vec<u8> {
    CURRENT.to_string().into_bytes()
}

fn log_step(place: &str, step: Step) {
    match step {
        Step::Migrate { from } => {
            tracing::info!(state = %place, from, to = CURRENT, "state schema migrated")
        }
        Step::Fresh => tracing::debug!(state = %place, schema = CURRENT, "state schema marked"),
        Step::Current => {}
    }
}

/// Checks, migrates and marks one redb file right after it is opened, before anything
/// else reads it, in one durable transaction.
pub fn open_redb(db: &redb::Database, path: &Path) -> Result<(), SchemaError> {
    let place = path.display().to_string();
    let fail = |e: &dyn std::fmt::Display| SchemaError::Storage {
        place: place.clone(),
        message: e.to_string(),
    };
    let txn = db.begin_write().map_err(|e| fail(&e))?;
    let has_data = txn
        .list_tables()
        .map_err(|e| fail(&e))?
        .any(|t| t.name() != META.name());
    let step = {
        let meta = txn.open_table(META).map_err(|e| fail(&e))?;
        let stored = meta.get(KEY).map_err(|e| fail(&e))?;
        decide(&place, stored.as_ref().map(|v| v.value()), has_data)?
    };
    if step == Step::Current {
        return txn.abort().map_err(|e| fail(&e));
    }
    // Version 1 to 2 rewrites no record: the marker is the whole migration.
    txn.open_table(META)
        .map_err(|e| fail(&e))?
        .insert(KEY, current_bytes().as_slice())
        .map_err(|e| fail(&e))?;
    txn.commit().map_err(|e| fail(&e))?;
    log_step(&place, step);
    Ok(())
}

/// The version a redb file is marked with ([`UNMARKED`] without a marker), refusing one
/// this coordinator cannot read; writes nothing (for a backup being restored).
pub fn read_redb(db: &redb::Database, path: &Path) -> Result<u32, SchemaError> {
    let place = path.display().to_string();
    let fail = |e: &dyn std::fmt::Display| SchemaError::Storage {
        place: place.clone(),
        message: e.to_string(),
    };
    let txn = db.begin_read().map_err(|e| fail(&e))?;
    let stored = match txn.open_table(META) {
        Ok(meta) => meta
            .get(KEY)
            .map_err(|e| fail(&e))?
            .map(|v| v.value().to_vec()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(fail(&e)),
    };
    match decide(&place, stored.as_deref(), true)? {
        Step::Current | Step::Fresh => Ok(CURRENT),
        Step::Migrate { from } => Ok(from),
    }
}

/// Checks, migrates and marks the cluster's state under `prefix` in etcd. The marker is
/// written only over the value it was read as (a transaction comparing it), so a newer
/// coordinator's marker written meanwhile is read again, never overwritten.
pub async fn open_etcd(etcd: &etcd::Etcd, prefix: &str) -> Result<(), SchemaError> {
    let place = format!("etcd prefix {prefix:?}");
    let fail = |e: tonic::Status| SchemaError::Storage {
        place: place.clone(),
        message: format!("etcd: {}", e.message()),
    };
    let key = format!("{prefix}{KEY}").into_bytes();
    let in_use = format!("{prefix}{ETCD_IN_USE}").into_bytes();
    loop {
        let stored = get(etcd, &key).await.map_err(fail)?;
        let has_data = get(etcd, &in_use).await.map_err(fail)?.is_some();
        let step = decide(&place, stored.as_deref(), has_data)?;
        if step == Step::Current {
            return Ok(());
        }
        let compare = match &stored {
            Some(v) => etcd::op::value_is(&key, v),
            None => etcd::op::created_at(&key, 0),
        };
        let req = etcd::etcdserverpb::TxnRequest {
            compare: vec![compare],
            success: vec![etcd::op::put(&key, &current_bytes())],
            failure: vec![],
        };
        if etcd.txn(req).await.map_err(fail)?.succeeded {
            log_step(&place, step);
            return Ok(());
        }
    }
}

async fn get(etcd: &etcd::Etcd, key: &[u8]) -> Result<Option<Vec<u8>>, tonic::Status> {
    let resp = etcd
        .range(etcd::etcdserverpb::RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })
        .await?;
    Ok(resp.kvs.into_iter().next().map(|kv| kv.value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_marks_fresh_migrates_older_and_refuses_newer() {
        assert_eq!(decide("f", None, false), Ok(Step::Fresh));
        assert_eq!(
            decide("f", None, true),
            Ok(Step::Migrate { from: UNMARKED })
        );
        assert_eq!(decide("f", Some(b"2"), true), Ok(Step::Current));
        assert_eq!(decide("f", Some(b"1"), true), Ok(Step::Migrate { from: 1 }));
        let newer = decide("/s/purges.redb", Some(b"9"), true).unwrap_err();
        assert_eq!(
            newer,
            SchemaError::Newer {
                place: "/s/purges.redb".into(),
                found: 9,
                supported: CURRENT
            }
        );
        let line = newer.to_string();
        assert!(
            line.starts_with(
                "/s/purges.redb: state schema version 9 is newer than this coordinator's 2"
            ),
            "{line}"
        );
        assert!(!line.contains('\n'));
        assert!(matches!(
            decide("f", Some(b"two"), true),
            Err(SchemaError::Unreadable { .. })
        ));
        assert!(matches!(
            decide("f", Some(b"0"), true),
            Err(SchemaError::Unreadable { .. })
        ));
    }

    #[test]
    fn a_redb_file_is_marked_migrated_and_a_newer_one_refused_untouched() {
        const DATA: TableDefinition<u64, &[u8]> = TableDefinition::new("data");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        let db = redb::Database::create(&path).unwrap();
        // Before the marker: data, no `schema` key.
        let txn = db.begin_write().unwrap();
        txn.open_table(DATA)
            .unwrap()
            .insert(1, b"a".as_slice())
            .unwrap();
        txn.commit().unwrap();
        assert_eq!(read_redb(&db, &path), Ok(UNMARKED));
        open_redb(&db, &path).unwrap();
        assert_eq!(read_redb(&db, &path), Ok(CURRENT));
        open_redb(&db, &path).unwrap();
        let read = db.begin_read().unwrap();
        assert_eq!(
            read.open_table(DATA)
                .unwrap()
                .get(1)
                .unwrap()
                .unwrap()
                .value(),
            b"a",
            "data intact"
        );
        drop(read);
        // A newer coordinator's file.
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(KEY, b"7".as_slice())
            .unwrap();
        txn.commit().unwrap();
        let err = open_redb(&db, &path).unwrap_err();
        assert!(matches!(err, SchemaError::Newer { found: 7, .. }), "{err}");
        assert!(read_redb(&db, &path).is_err());
        let read = db.begin_read().unwrap();
        let meta = read.open_table(META).unwrap();
        assert_eq!(
            meta.get(KEY).unwrap().unwrap().value(),
            b"7",
            "left as it was"
        );
    }
}
