//! Warm jobs in `warm.redb` in the state dir: one JSON record per job (its spec, state
//! and which shards each edge has done) and each shard's URLs under `(job, shard)`, so a
//! million-URL job is never held in memory. The record is rewritten whenever a shard is
//! reported, in a durable transaction: after kill -9 the job resumes from its last
//! recorded shard.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use super::job::Job;

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
const SHARDS: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("shards");

/// Storage failures (a full disk among them).
#[derive(Debug, thiserror::Error)]
pub enum WarmStoreError {
    #[error("warm store: {0}")]
    Storage(String),
    #[error("warm store holds a corrupt record: {0}")]
    Corrupt(String),
}

fn storage<E: std::fmt::Display>(e: E) -> WarmStoreError {
    WarmStoreError::Storage(e.to_string())
}

#[derive(Debug)]
pub struct WarmStore {
    db: Database,
}

impl WarmStore {
    pub fn open(dir: &Path) -> Result<Self, WarmStoreError> {
        let db = Database::create(dir.join("warm.redb")).map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(JOBS).map_err(storage)?;
            txn.open_table(SHARDS).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(WarmStore { db })
    }

    /// Every stored job, oldest first.
    pub fn jobs(&self) -> Result<Vec<Job>, WarmStoreError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(JOBS).map_err(storage)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(storage)? {
            let (_, v) = row.map_err(storage)?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| WarmStoreError::Corrupt(e.to_string()))?,
            );
        }
        Ok(out)
    }

    pub fn put_job(&self, job: &Job) -> Result<(), WarmStoreError> {
        let bytes = serde_json::to_vec(job).map_err(storage)?;
        let txn = self.db.begin_write().map_err(storage)?;
        txn.open_table(JOBS)
            .map_err(storage)?
            .insert(job.id, bytes.as_slice())
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// Stores a job's URLs split into shards of `per_shard`, and the job, in one
    /// transaction; returns the number of shards.
    pub fn put_shards(
        &self,
        job: &Job,
        urls: &[String],
        per_shard: usize,
    ) -> Result<u32, WarmStoreError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let mut n = 0u32;
        {
            let mut table = txn.open_table(SHARDS).map_err(storage)?;
            for (i, chunk) in urls.chunks(per_shard.max(1)).enumerate() {
                let bytes = serde_json::to_vec(chunk).map_err(storage)?;
                let i = u32::try_from(i).map_err(storage)?;
                table
                    .insert((job.id, i), bytes.as_slice())
                    .map_err(storage)?;
                n = i + 1;
            }
            let bytes = serde_json::to_vec(job).map_err(storage)?;
            txn.open_table(JOBS)
                .map_err(storage)?
                .insert(job.id, bytes.as_slice())
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(n)
    }

    pub fn shard(&self, job: u64, shard: u32) -> Result<Vec<String>, WarmStoreError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(SHARDS).map_err(storage)?;
        let v = table
            .get((job, shard))
            .map_err(storage)?
            .ok_or_else(|| WarmStoreError::Corrupt(format!("job {job} has no shard {shard}")))?;
        serde_json::from_slice(v.value()).map_err(|e| WarmStoreError::Corrupt(e.to_string()))
    }

    /// Drops a finished job's URLs (its record stays for the API).
    pub fn drop_shards(&self, job: u64) -> Result<(), WarmStoreError> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(SHARDS).map_err(storage)?;
            table
                .retain_in((job, 0)..=(job, u32::MAX), |_, _| false)
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }
}
