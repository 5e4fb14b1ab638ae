//! Warm jobs in `warm.redb` in the state dir: one JSON record per job (spec, state), one
//! per target edge under `(job, edge)` (which shards it has done), and each shard's URLs
//! (one per line) under `(job, shard)`, so a running million-URL job is not held in
//! memory. An edge's record is rewritten when it reports a shard; job state changes are
//! durable commits, which also make every earlier progress write durable. After kill -9
//! a job resumes from its recorded shards.
//!
//! With `[store] backend = "etcd"` the same records live in etcd under `warm/jobs/<id>`,
//! `warm/edges/<id>/<edge>` and `warm/shards/<id>/<n>` ([`crate::etcd_kv`]: written by
//! the leader only, fenced), so the next leader resumes a job where the last one was.

use std::path::Path;

use redb::{Database, Durability, ReadableTable, TableDefinition};

use super::job::{EdgeWork, Job};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
/// Each target edge's part of a job, `(job, edge)`: rewritten alone when that edge reports.
const EDGES: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("edges");
const SHARDS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("shards");
/// The file's name in the state dir.
pub const FILE: &str = "warm.redb";
/// redb's page cache for this file.
const CACHE_BYTES: usize = 16 * 1024 * 1024;
/// Shards written per transaction (bounds the memory of one commit).
const SHARDS_PER_TXN: usize = 2000;

/// Storage failures (a full disk among them).
#[derive(Debug, thiserror::Error)]
pub enum WarmStoreError {
    #[error("warm store: {0}")]
    Storage(String),
    #[error("warm store holds a corrupt record: {0}")]
    Corrupt(String),
    /// The file was written by a newer coordinator (or its marker is unreadable).
    #[error(transparent)]
    Schema(#[from] crate::schema::SchemaError),
}

fn storage<E: std::fmt::Display>(e: E) -> WarmStoreError {
    WarmStoreError::Storage(e.to_string())
}

#[derive(Debug)]
pub struct WarmStore {
    db: Option<Database>,
    etcd: Option<crate::etcd_kv::EtcdKv>,
}

fn job_key(id: u64) -> String {
    format!("warm/jobs/{id:020}")
}

fn edges_key(id: u64) -> String {
    format!("warm/edges/{id:020}/")
}

fn shards_key(id: u64) -> String {
    format!("warm/shards/{id:020}/")
}

impl WarmStore {
    /// The cluster's warm records in etcd.
    pub fn etcd(kv: crate::etcd_kv::EtcdKv) -> Self {
        WarmStore {
            db: None,
            etcd: Some(kv),
        }
    }

    /// Whether the records are the cluster's (in etcd).
    pub fn is_shared(&self) -> bool {
        self.etcd.is_some()
    }

    fn db(&self) -> Result<&Database, WarmStoreError> {
        self.db
            .as_ref()
            .ok_or_else(|| WarmStoreError::Storage("no database".into()))
    }

    pub fn open(dir: &Path) -> Result<Self, WarmStoreError> {
        let path = dir.join(FILE);
        daemon::files::file_with_mode(&path, daemon::files::PRIVATE_FILE)
            .map_err(|e| WarmStoreError::Storage(format!("{}: {e}", path.display())))?;
        // Shards are read once each: a small page cache (redb's default is 1 GiB).
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(storage)?;
        crate::schema::open_redb(&db, &path)?;
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(JOBS).map_err(storage)?;
            txn.open_table(EDGES).map_err(storage)?;
            txn.open_table(SHARDS).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(WarmStore {
            db: Some(db),
            etcd: None,
        })
    }

    /// Copies every job, edge record and shard (and the schema marker), as one commit
    /// saw them, into `dest` (a backup's file). The etcd records are etcd's to snapshot.
    pub fn backup_into(&self, dest: &Database) -> Result<(), WarmStoreError> {
        if self.etcd.is_some() {
            return Err(WarmStoreError::Storage(
                "the warm jobs are in etcd: back them up with etcd's own snapshots".into(),
            ));
        }
        let read = self.db()?.begin_read().map_err(storage)?;
        let txn = dest.begin_write().map_err(storage)?;
        crate::snapshot::copy_table(&read, &txn, JOBS).map_err(storage)?;
        crate::snapshot::copy_table(&read, &txn, EDGES).map_err(storage)?;
        crate::snapshot::copy_table(&read, &txn, SHARDS).map_err(storage)?;
        crate::snapshot::copy_table(&read, &txn, crate::schema::META).map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// Every stored job with its edges, oldest first.
    pub fn jobs(&self) -> Result<Vec<Job>, WarmStoreError> {
        let corrupt = |e: serde_json::Error| WarmStoreError::Corrupt(e.to_string());
        if let Some(kv) = &self.etcd {
            let mut out = Vec::new();
            for (_, v) in kv.list("warm/jobs/").map_err(storage)? {
                let mut job: Job = serde_json::from_slice(&v).map_err(corrupt)?;
                let prefix = edges_key(job.id);
                for (k, v) in kv.list(&prefix).map_err(storage)? {
                    let work: EdgeWork = serde_json::from_slice(&v).map_err(corrupt)?;
                    job.edges.insert(k[prefix.len()..].to_owned(), work);
                }
                out.push(job);
            }
            return Ok(out);
        }
        let txn = self.db()?.begin_read().map_err(storage)?;
        let jobs = txn.open_table(JOBS).map_err(storage)?;
        let edges = txn.open_table(EDGES).map_err(storage)?;
        let mut out = Vec::new();
        for row in jobs.iter().map_err(storage)? {
            let (_, v) = row.map_err(storage)?;
            let mut job: Job = serde_json::from_slice(v.value()).map_err(corrupt)?;
            for row in edges
                .range((job.id, "")..(job.id + 1, ""))
                .map_err(storage)?
            {
                let (k, v) = row.map_err(storage)?;
                let work: EdgeWork = serde_json::from_slice(v.value()).map_err(corrupt)?;
                job.edges.insert(k.value().1.to_owned(), work);
            }
            out.push(job);
        }
        Ok(out)
    }

    /// Stores the job record (not its edges), durably.
    pub fn put_job(&self, job: &Job) -> Result<(), WarmStoreError> {
        if let Some(kv) = &self.etcd {
            let bytes = serde_json::to_vec(job).map_err(storage)?;
            return kv.put_fenced(&[(job_key(job.id), bytes)]).map_err(storage);
        }
        let txn = self.db()?.begin_write().map_err(storage)?;
        insert_job(&txn, job)?;
        txn.commit().map_err(storage)
    }

    /// Stores one edge's part of a job. Not fsynced on its own (the next durable commit
    /// carries it): losing the last moments of progress in a crash only repeats shards.
    pub fn put_edge(&self, job: u64, edge: &str, work: &EdgeWork) -> Result<(), WarmStoreError> {
        let bytes = serde_json::to_vec(work).map_err(storage)?;
        if let Some(kv) = &self.etcd {
            return kv
                .put_fenced(&[(format!("{}{edge}", edges_key(job)), bytes)])
                .map_err(storage);
        }
        let mut txn = self.db()?.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Eventual);
        txn.open_table(EDGES)
            .map_err(storage)?
            .insert((job, edge), bytes.as_slice())
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// Stores a job's URLs split into shards of `job.per_shard` (one URL per line), then
    /// its edges and record. Shards go in batches of transactions, and the record last:
    /// until it says `running` with its shard count, the shards are never read.
    pub fn put_shards(&self, job: &Job, urls: &[String]) -> Result<(), WarmStoreError> {
        let chunks: Vec<&[String]> = urls.chunks(job.per_shard.max(1)).collect();
        if let Some(kv) = &self.etcd {
            let mut puts: Vec<(String, Vec<u8>)> = chunks
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (
                        format!("{}{i:010}", shards_key(job.id)),
                        c.join("\n").into_bytes(),
                    )
                })
                .collect();
            for (edge, work) in &job.edges {
                let bytes = serde_json::to_vec(work).map_err(storage)?;
                puts.push((format!("{}{edge}", edges_key(job.id)), bytes));
            }
            // The record last: until it says `running`, the shards are never read.
            puts.push((job_key(job.id), serde_json::to_vec(job).map_err(storage)?));
            return kv.put_fenced(&puts).map_err(storage);
        }
        let mut index = 0u32;
        let db = self.db()?;
        for batch in chunks.chunks(SHARDS_PER_TXN) {
            let txn = db.begin_write().map_err(storage)?;
            {
                let mut table = txn.open_table(SHARDS).map_err(storage)?;
                for chunk in batch {
                    let text = chunk.join("\n");
                    table
                        .insert((job.id, index), text.as_bytes())
                        .map_err(storage)?;
                    index += 1;
                }
            }
            txn.commit().map_err(storage)?;
        }
        let txn = db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(EDGES).map_err(storage)?;
            for (edge, work) in &job.edges {
                let bytes = serde_json::to_vec(work).map_err(storage)?;
                table
                    .insert((job.id, edge.as_str()), bytes.as_slice())
                    .map_err(storage)?;
            }
        }
        insert_job(&txn, job)?;
        txn.commit().map_err(storage)
    }

    pub fn shard(&self, job: u64, shard: u32) -> Result<Vec<String>, WarmStoreError> {
        if let Some(kv) = &self.etcd {
            let v = kv
                .get(&format!("{}{shard:010}", shards_key(job)))
                .map_err(storage)?
                .ok_or_else(|| {
                    WarmStoreError::Corrupt(format!("job {job} has no shard {shard}"))
                })?;
            let text = String::from_utf8(v)
                .map_err(|e| WarmStoreError::Corrupt(format!("shard {job}/{shard}: {e}")))?;
            return Ok(text.lines().map(str::to_owned).collect());
        }
        let txn = self.db()?.begin_read().map_err(storage)?;
        let table = txn.open_table(SHARDS).map_err(storage)?;
        let v = table
            .get((job, shard))
            .map_err(storage)?
            .ok_or_else(|| WarmStoreError::Corrupt(format!("job {job} has no shard {shard}")))?;
        let text = std::str::from_utf8(v.value())
            .map_err(|e| WarmStoreError::Corrupt(format!("shard {job}/{shard}: {e}")))?;
        Ok(text.lines().map(str::to_owned).collect())
    }

    /// Drops a finished job's URLs (its record stays for the API), in batches of
    /// transactions so that freed pages are reused rather than the file growing.
    pub fn drop_shards(&self, job: u64) -> Result<(), WarmStoreError> {
        if let Some(kv) = &self.etcd {
            return kv.delete_fenced(&shards_key(job)).map_err(storage);
        }
        loop {
            let txn = self.db()?.begin_write().map_err(storage)?;
            let removed = {
                let mut table = txn.open_table(SHARDS).map_err(storage)?;
                let keys: Vec<(u64, u32)> = table
                    .range((job, 0)..=(job, u32::MAX))
                    .map_err(storage)?
                    .take(SHARDS_PER_TXN)
                    .map(|r| r.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()
                    .map_err(storage)?;
                for k in &keys {
                    table.remove(k).map_err(storage)?;
                }
                keys.len()
            };
            txn.commit().map_err(storage)?;
            if removed < SHARDS_PER_TXN {
                return Ok(());
            }
        }
    }
}

/// Writes the job record (its edges are skipped by serde) in `txn`.
fn insert_job(txn: &redb::WriteTransaction, job: &Job) -> Result<(), WarmStoreError> {
    let bytes = serde_json::to_vec(job).map_err(storage)?;
    txn.open_table(JOBS)
        .map_err(storage)?
        .insert(job.id, bytes.as_slice())
        .map_err(storage)?;
    Ok(())
}
