//! The embedded backend: the purge log in one redb file (`purges.redb` under
//! `--state-dir`), written by a single writer thread.
//!
//! Entries are keyed by a dense sequence number and stored as the protobuf
//! [`PurgeEntry`] the agents receive, so there is one encoding from disk to wire. The
//! writer thread owns all writes and does *group commit*: it takes every append that
//! queued up while the previous fsync ran and commits them in one transaction, so a
//! burst of thousands of purges costs a few fsyncs, not thousands. An append is
//! answered only after its commit is durable; a failed commit (a full disk) is answered
//! with an error and assigns no sequence number.
//!
//! After a failed commit redb refuses further use of the open file, so the writer
//! closes and reopens it ([`SharedDb`]): once space is back, appends succeed again
//! without a restart. Retention deletes the oldest entries beyond a count or an age, at
//! most once a second.
//!
//! The `meta` table holds the log's id, its head, the schema marker ([`crate::schema`])
//! and, in a log made by `coordinator restore`, `restored_from`: the id and head of the
//! log the backup was taken from ([`Restored`]), so that agents that counted from that
//! log resume or get a full ban by the rule in `crate::fanout::resume_point`.

use daemon::sync::RecoverRw;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc, RwLock};
use std::time::{Duration, Instant};

use prost::Message;
use proto::edge::PurgeEntry;
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::tail::{Tail, TAIL_ENTRIES};
use super::{AppendReq, Appended, LogError, Retention, MAX_BATCH_REQUESTS, QUEUE_DEPTH};
use crate::clock::now_us;

const PURGES: TableDefinition<u64, &[u8]> = TableDefinition::new("purges");
use crate::schema::META;
/// The file's name in the state dir.
pub const FILE: &str = "purges.redb";
const RESTORED_FROM: &str = "restored_from";

/// Where a restored log came from: the backed-up log's id and its head at the backup.
/// Sequences up to `head` are the same purges in both logs; none after it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub log_id: String,
    pub head: u64,
}

impl Restored {
    fn encode(&self) -> String {
        format!("{}:{}", self.log_id, self.head)
    }

    fn decode(raw: &[u8]) -> Option<Restored> {
        let (id, head) = std::str::from_utf8(raw).ok()?.split_once(':')?;
        Some(Restored {
            log_id: id.to_owned(),
            head: head.parse().ok()?,
        })
    }
}

impl From<redb::Error> for LogError {
    fn from(e: redb::Error) -> Self {
        LogError::Storage(e.to_string())
    }
}

fn storage<E: Into<redb::Error>>(e: E) -> LogError {
    LogError::from(e.into())
}

/// The database file, closed and reopened by the writer after an I/O error. Readers and
/// the writer take the read lock for one synchronous operation; only a reopen takes the
/// write lock. Never held across an `.await`.
struct SharedDb {
    path: PathBuf,
    db: RwLock<Option<Database>>,
}

impl SharedDb {
    fn with<T>(&self, f: impl FnOnce(&Database) -> Result<T, LogError>) -> Result<T, LogError> {
        let guard = self.db.read_locked();
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(LogError::Storage(
                "purge log is reopening after an I/O error".into(),
            )),
        }
    }

    /// Drops the handle (releasing the file lock) and opens the file again.
    fn reopen(&self) {
        let mut guard = self.db.write_locked();
        *guard = None;
        // A file made anew is private like the first one.
        let _ = daemon::files::file_with_mode(&self.path, daemon::files::PRIVATE_FILE);
        match Database::create(&self.path) {
            Ok(db) => {
                *guard = Some(db);
                tracing::info!(path = %self.path.display(), "purge log reopened");
            }
            Err(e) => tracing::warn!(error = %e, "purge log cannot be reopened yet"),
        }
    }
}

/// The open file and the writer thread's queue.
pub(super) struct Embedded {
    db: Arc<SharedDb>,
    queue: std_mpsc::SyncSender<AppendReq>,
}

/// What [`Embedded::open`] found in the file.
pub(super) struct Opened {
    pub(super) backend: Embedded,
    pub(super) log_id: String,
    pub(super) tail: Arc<Tail>,
    pub(super) restored_from: Option<Restored>,
}

impl Embedded {
    /// Opens (or creates) `purges.redb` in `dir`, loads the tail and starts the writer
    /// thread. The thread stops when the queue's sender is dropped.
    pub(super) fn open(dir: &Path, retention: Retention) -> Result<Opened, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::Storage(e.to_string()))?;
        let path = dir.join(FILE);
        daemon::files::file_with_mode(&path, daemon::files::PRIVATE_FILE)
            .map_err(|e| LogError::Storage(format!("{}: {e}", path.display())))?;
        let db = Database::create(&path).map_err(storage)?;
        crate::schema::open_redb(&db, &path)?;
        let (log_id, head, first, restored_from) = init_meta(&db)?;
        let tail = Tail::new(head, first, load_tail(&db, head)?);
        let db = Arc::new(SharedDb {
            path,
            db: RwLock::new(Some(db)),
        });
        let (queue, rx) = std_mpsc::sync_channel(QUEUE_DEPTH);
        let writer = Writer {
            db: db.clone(),
            head,
            tail: tail.clone(),
            retention,
            last_prune: Instant::now() - Duration::from_secs(3600),
        };
        std::thread::Builder::new()
            .name("purge-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| LogError::Storage(e.to_string()))?;
        Ok(Opened {
            backend: Embedded { db, queue },
            log_id,
            tail,
            restored_from,
        })
    }

    /// Queues an append for the writer, without waiting.
    pub(super) fn send(&self, req: AppendReq) -> Result<(), LogError> {
        self.queue.try_send(req).map_err(|e| match e {
            std_mpsc::TrySendError::Full(_) => LogError::Overloaded,
            std_mpsc::TrySendError::Disconnected(_) => LogError::Closed,
        })
    }

    /// Up to `max` entries from `from` on, read from the file.
    pub(super) fn read_from(
        &self,
        from: u64,
        max: usize,
    ) -> Result<Vec<Arc<PurgeEntry>>, LogError> {
        self.db.with(|db| {
            let read = db.begin_read().map_err(storage)?;
            let table = read.open_table(PURGES).map_err(storage)?;
            let mut out = Vec::new();
            for item in table.range(from..).map_err(storage)? {
                let (_, value) = item.map_err(storage)?;
                let entry = PurgeEntry::decode(value.value())
                    .map_err(|e| LogError::Storage(format!("corrupt entry: {e}")))?;
                out.push(Arc::new(entry));
                if out.len() >= max {
                    break;
                }
            }
            Ok(out)
        })
    }

    /// Copies the log, as one commit saw it, into `dest` (a backup's new file); returns
    /// the log's id and head in that commit.
    pub(super) fn copy_into(&self, dest: &Database) -> Result<(String, u64), LogError> {
        self.db.with(|db| {
            let read = db.begin_read().map_err(storage)?;
            let (id, head) = {
                let meta = read.open_table(META).map_err(storage)?;
                let id = meta
                    .get("log_id")
                    .map_err(storage)?
                    .map(|v| String::from_utf8_lossy(v.value()).into_owned())
                    .unwrap_or_default();
                (id, stored_head(&meta)?)
            };
            let mut txn = dest.begin_write().map_err(storage)?;
            txn.set_durability(Durability::Immediate);
            let copy_failed = |e: crate::snapshot::CopyError| LogError::Storage(e.to_string());
            crate::snapshot::copy_table(&read, &txn, PURGES).map_err(copy_failed)?;
            crate::snapshot::copy_table(&read, &txn, META).map_err(copy_failed)?;
            txn.commit().map_err(storage)?;
            Ok((id, head))
        })
    }
}

fn stored_head(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<u64, LogError> {
    Ok(meta
        .get("head")
        .map_err(storage)?
        .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

/// Makes the log in `path` (a restored backup, not open elsewhere) a new log: a fresh
/// id, and `restored_from` = the id and head it had. Its entries stay as they are.
pub fn rebase(path: &Path) -> Result<(Restored, String), LogError> {
    let db = Database::open(path).map_err(storage)?;
    let mut txn = db.begin_write().map_err(storage)?;
    txn.set_durability(Durability::Immediate);
    let fresh = hex::encode(rand::random::<[u8; 16]>());
    let from = {
        let mut meta = txn.open_table(META).map_err(storage)?;
        let old = meta
            .get("log_id")
            .map_err(storage)?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned())
            .unwrap_or_default();
        let purges = txn.open_table(PURGES).map_err(storage)?;
        let last = purges.last().map_err(storage)?.map(|(k, _)| k.value());
        let head = stored_head(&meta)?.max(last.unwrap_or(0));
        let from = Restored { log_id: old, head };
        meta.insert("log_id", fresh.as_bytes()).map_err(storage)?;
        meta.insert("head", head.to_be_bytes().as_slice())
            .map_err(storage)?;
        meta.insert(RESTORED_FROM, from.encode().as_bytes())
            .map_err(storage)?;
        from
    };
    txn.commit().map_err(storage)?;
    Ok((from, fresh))
}

type Meta = (String, u64, u64, Option<Restored>);

fn init_meta(db: &Database) -> Result<Meta, LogError> {
    let mut txn = db.begin_write().map_err(storage)?;
    txn.set_durability(Durability::Immediate);
    let (log_id, head, first, restored_from) = {
        let mut meta = txn.open_table(META).map_err(storage)?;
        let purges = txn.open_table(PURGES).map_err(storage)?;
        let existing = meta
            .get("log_id")
            .map_err(storage)?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned());
        let log_id = match existing {
            Some(id) => id,
            None => {
                let id = hex::encode(rand::random::<[u8; 16]>());
                meta.insert("log_id", id.as_bytes()).map_err(storage)?;
                id
            }
        };
        let stored_head = stored_head(&meta)?;
        let restored_from = meta
            .get(RESTORED_FROM)
            .map_err(storage)?
            .and_then(|v| Restored::decode(v.value()));
        let last = purges.last().map_err(storage)?.map(|(k, _)| k.value());
        let head = stored_head.max(last.unwrap_or(0));
        let first = purges
            .first()
            .map_err(storage)?
            .map(|(k, _)| k.value())
            .unwrap_or(head + 1);
        (log_id, head, first, restored_from)
    };
    txn.commit().map_err(storage)?;
    Ok((log_id, head, first, restored_from))
}

fn load_tail(db: &Database, head: u64) -> Result<VecDeque<Arc<PurgeEntry>>, LogError> {
    let from = head.saturating_sub(TAIL_ENTRIES as u64 - 1).max(1);
    let read = db.begin_read().map_err(storage)?;
    let table = read.open_table(PURGES).map_err(storage)?;
    let mut tail = VecDeque::new();
    for item in table.range(from..).map_err(storage)? {
        let (_, value) = item.map_err(storage)?;
        if let Ok(entry) = PurgeEntry::decode(value.value()) {
            tail.push_back(Arc::new(entry));
        }
    }
    Ok(tail)
}

struct Writer {
    db: Arc<SharedDb>,
    head: u64,
    tail: Arc<Tail>,
    retention: Retention,
    last_prune: Instant,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<AppendReq>) {
        loop {
            let first = match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(req) => req,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    self.maybe_prune();
                    continue;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_REQUESTS {
                match rx.try_recv() {
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            self.commit(batch);
            self.maybe_prune();
        }
    }

    fn commit(&mut self, batch: Vec<AppendReq>) {
        let mut entries = Vec::new();
        let mut last_seqs = Vec::with_capacity(batch.len());
        let mut seq = self.head;
        for req in &batch {
            for p in &req.purges {
                seq += 1;
                entries.push(PurgeEntry {
                    seq,
                    received_at_us: req.received_at_us,
                    op: Some(p.op.clone()),
                    soft: p.soft,
                    first_seq: 0,
                });
            }
            last_seqs.push(seq);
        }
        match self.write(&entries, seq) {
            Ok(()) => {
                self.head = seq;
                self.tail.extend(entries.into_iter().map(Arc::new));
                // Answer the appenders before waking the sessions: with a thousand edges
                // the wake-ups are a thousand tasks, and Magento must not queue behind
                // them (the purge listener never waits on an edge).
                for (req, last) in batch.into_iter().zip(last_seqs) {
                    let _ = req.reply.send(Ok(Appended::Logged(last)));
                }
                self.tail.publish();
            }
            Err(e) => {
                tracing::error!(error = %e, purges = entries.len(), "purge log commit failed; nothing acknowledged");
                for req in batch {
                    let _ = req.reply.send(Err(e.clone()));
                }
                self.db.reopen();
            }
        }
    }

    fn write(&self, entries: &[PurgeEntry], head: u64) -> Result<(), LogError> {
        self.db.with(|db| Self::write_txn(db, entries, head))?;
        if self.tail.first.load(Ordering::Acquire) > head {
            // The log was empty: its first entry is the first one just written.
            if let Some(e) = entries.first() {
                self.tail.first.store(e.seq, Ordering::Release);
            }
        }
        Ok(())
    }

    fn write_txn(db: &Database, entries: &[PurgeEntry], head: u64) -> Result<(), LogError> {
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate);
        {
            let mut table = txn.open_table(PURGES).map_err(storage)?;
            let mut buf = Vec::with_capacity(256);
            for e in entries {
                buf.clear();
                e.encode(&mut buf)
                    .map_err(|e| LogError::Storage(e.to_string()))?;
                table.insert(e.seq, buf.as_slice()).map_err(storage)?;
            }
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert("head", head.to_be_bytes().as_slice())
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }

    /// Deletes entries beyond the retention count or age, at most once a second.
    fn maybe_prune(&mut self) {
        if self.last_prune.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_prune = Instant::now();
        if let Err(e) = self.prune() {
            tracing::warn!(error = %e, "purge log retention pass failed");
        }
    }

    fn prune(&mut self) -> Result<(), LogError> {
        let db = self.db.clone();
        db.with(|db| self.prune_in(db))
    }

    fn prune_in(&mut self, db: &Database) -> Result<(), LogError> {
        let first = self.tail.first.load(Ordering::Acquire);
        let by_count = (self.head + 1).saturating_sub(self.retention.max_entries);
        let cutoff_us = now_us().saturating_sub(self.retention.max_age.as_micros() as u64);
        let mut keep_from = first.max(by_count);
        // Age: walk forward from the oldest entry while it is too old (bounded per pass).
        {
            let read = db.begin_read().map_err(storage)?;
            let table = read.open_table(PURGES).map_err(storage)?;
            for item in table.range(keep_from..).map_err(storage)?.take(100_000) {
                let (k, v) = item.map_err(storage)?;
                let old = PurgeEntry::decode(v.value())
                    .map(|e| e.received_at_us < cutoff_us)
                    .unwrap_or(false);
                if !old {
                    break;
                }
                keep_from = k.value() + 1;
            }
            if table.len().map_err(storage)? == 0 {
                return Ok(());
            }
        }
        if keep_from <= first {
            return Ok(());
        }
        let mut txn = db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate);
        {
            let mut table = txn.open_table(PURGES).map_err(storage)?;
            table
                .retain_in(..keep_from, |_, _| false)
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        self.tail.trim(keep_from);
        tracing::debug!(first = keep_from, head = self.head, "purge log pruned");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{NewPurge, PurgeLog};
    use super::*;

    #[tokio::test]
    async fn appends_are_dense_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = PurgeLog::open(dir.path(), Retention::forever()).unwrap();
        let id = log.log_id().to_owned();
        assert_eq!(log.append(vec![NewPurge::tag("a")]).await.unwrap(), 1);
        assert_eq!(
            log.append_outcome(vec![NewPurge::tag("b"), NewPurge::tag("c")])
                .await
                .unwrap(),
            Appended::Logged(3)
        );
        let many: Vec<_> = (0..100)
            .map(|i| log.append(vec![NewPurge::tag(&format!("t{i}"))]))
            .collect();
        for f in many {
            f.await.unwrap();
        }
        assert_eq!(log.head(), 103);
        drop(log);
        // The writer thread releases the file once it sees the queue closed.
        let mut reopened = PurgeLog::open(dir.path(), Retention::forever());
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            reopened = PurgeLog::open(dir.path(), Retention::forever());
        }
        let log = reopened.unwrap();
        assert_eq!(log.log_id(), id);
        assert_eq!(log.head(), 103);
        let all = log.read_from(1, 1000).await.unwrap();
        assert_eq!(all.len(), 103);
        assert!(all.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1));
    }

    #[tokio::test]
    async fn a_rebased_log_keeps_its_entries_under_a_new_id_that_records_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let old = {
            let log = PurgeLog::open(dir.path(), Retention::forever()).unwrap();
            for t in ["a", "b", "c"] {
                log.append(vec![NewPurge::tag(t)]).await.unwrap();
            }
            assert_eq!(log.restored_from(), None);
            log.log_id().to_owned()
        };
        let path = dir.path().join(FILE);
        let mut rebased = rebase(&path);
        for _ in 0..100 {
            if rebased.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20)); // the writer lets go
            rebased = rebase(&path);
        }
        let (from, fresh) = rebased.unwrap();
        assert_eq!(
            from,
            Restored {
                log_id: old.clone(),
                head: 3
            }
        );
        let log = PurgeLog::open(dir.path(), Retention::forever()).unwrap();
        assert_eq!(log.log_id(), fresh);
        assert_ne!(fresh, old);
        assert_eq!(log.restored_from(), Some(&from));
        assert_eq!(log.head(), 3);
        assert_eq!(log.read_from(1, 10).await.unwrap().len(), 3);
        assert_eq!(log.append(vec![NewPurge::tag("d")]).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn retention_by_count_moves_first() {
        let dir = tempfile::tempdir().unwrap();
        let log = PurgeLog::open(
            dir.path(),
            Retention {
                max_entries: 5,
                max_age: Duration::from_secs(3600),
            },
        )
        .unwrap();
        for i in 0..20 {
            log.append(vec![NewPurge::tag(&format!("t{i}"))])
                .await
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while log.first() != 16 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(log.first(), 16);
        assert_eq!(
            log.read_from(1, 100).await.unwrap().first().map(|e| e.seq),
            Some(16)
        );
    }
}
