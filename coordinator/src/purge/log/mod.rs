//! The durable purge log: every acknowledged purge, in order, durable before it is
//! answered.
//!
//! [`PurgeLog`] is the one handle the purge listener, the API and the sessions use,
//! whichever backend holds the entries ([`Backend`], picked by `[store] backend`):
//!
//! - [`redb`]: the embedded log, one redb file under `--state-dir` written by a writer
//!   thread with group commit;
//! - [`etcd`]: the cluster's shared log in etcd, written by a writer task (group commit
//!   again) and followed through etcd's watch, so every coordinator's sessions stream the
//!   entries every coordinator accepted, in one order. An append etcd does not commit in
//!   time is fsynced to the local [`spool`] instead and resolves as
//!   [`Appended::Spooled`]; a drain task appends the spool to the shared log once etcd
//!   takes writes ([`PurgeLog::spool_depth`] says how many wait).
//!
//! [`PurgeLog::append`] resolves only after the purges are durable (committed, or
//! spooled); a failed commit (a full disk) resolves with an error and assigns no
//! sequence number. Readers never touch a writer: the newest entries sit in the
//! in-memory [`tail`] ([`PurgeLog::read_from`] serves from it and falls back to the
//! backend for old cursors), and the head is published on a `watch` channel that the
//! fan-out sessions await.
//!
//! Retention deletes the oldest entries beyond a count or an age. An agent whose cursor
//! falls behind the oldest retained entry gets a full ban instead (see `fanout`).
//!
//! This file holds what every backend shares: the handle, the append request and its
//! answer, the errors and the limits. The backends import them from here; this file
//! picks a backend and imports nothing back.

pub mod etcd;
mod redb;
pub mod spool;
mod tail;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::bytes::Bytes;
use proto::edge::{purge_entry::Op, PurgeEntry};
use tokio::sync::{oneshot, watch};

use crate::clock::now_us;
use tail::Tail;

pub use self::redb::{rebase, Restored, FILE};

/// Appends the writer (either backend) takes into one group commit at most.
const MAX_BATCH_REQUESTS: usize = 4096;
/// Appends queued for the writer before [`PurgeLog::append`] answers
/// [`LogError::Overloaded`].
const QUEUE_DEPTH: usize = 65_536;

/// How long the log keeps entries.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_entries: u64,
    pub max_age: Duration,
}

/// Errors from the purge log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("purge log storage error: {0}")]
    Storage(String),
    #[error("purge log is overloaded (write queue full)")]
    Overloaded,
    #[error("purge log writer has stopped")]
    Closed,
    /// etcd did not commit and the local spool could not take the purge either.
    #[error("{0}")]
    Spool(String),
    /// The file was written by a newer coordinator (or its marker is unreadable).
    #[error(transparent)]
    Schema(#[from] crate::schema::SchemaError),
}

/// Where an acknowledged purge is: in the log at a sequence, or in this coordinator's
/// local spool (etcd did not commit in time) under a spool id, on its way to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Logged(u64),
    Spooled(u64),
}

impl Appended {
    /// The last sequence, or 0 for a spooled purge (sequences start at 1).
    pub fn seq(&self) -> u64 {
        match self {
            Appended::Logged(seq) => *seq,
            Appended::Spooled(_) => 0,
        }
    }
}

/// The spool's figures, read without waiting on it (depth, and counts since start).
#[derive(Debug, Default)]
pub struct SpoolStats {
    pub depth: AtomicU64,
    pub spooled: AtomicU64,
    pub drained: AtomicU64,
}

/// Where and how a coordinator on etcd spools (see `spool`).
#[derive(Debug, Clone)]
pub struct SpoolOpts {
    /// The state dir (the spool file goes in it).
    pub dir: PathBuf,
    /// This coordinator's id in the cluster (its drain mark in etcd is named after it).
    pub coordinator_id: String,
    /// How long an append may wait for etcd before it is spooled.
    pub after: Duration,
    /// The spool file's size bound.
    pub max_bytes: u64,
    /// Whether etcd answers: read to spool at once, and reported into.
    pub health: crate::store_health::StoreHealth,
}

/// A purge to append: the operation and whether it is soft.
#[derive(Debug, Clone)]
pub struct NewPurge {
    pub op: Op,
    pub soft: bool,
}

/// Unit tests' fixtures for the log and what reads it (the fan-out).
#[cfg(test)]
impl NewPurge {
    /// A hard purge of one tag.
    pub fn tag(t: &str) -> NewPurge {
        NewPurge {
            op: Op::Tags(proto::edge::TagSet {
                tags: vec![t.into()],
            }),
            soft: false,
        }
    }
}

#[cfg(test)]
impl Retention {
    /// Keeps everything.
    pub fn forever() -> Retention {
        Retention {
            max_entries: u64::MAX,
            max_age: Duration::from_secs(u32::MAX as u64),
        }
    }
}

/// One appender's purges on their way to a backend's writer, and where to answer.
struct AppendReq {
    purges: Vec<NewPurge>,
    received_at_us: u64,
    reply: oneshot::Sender<Result<Appended, LogError>>,
}

/// Where appends go and where old entries are read from.
enum Backend {
    /// `purges.redb`, written by the writer thread.
    Embedded(redb::Embedded),
    /// The cluster's log in etcd, written by the etcd writer task.
    Etcd {
        log: etcd::EtcdLog,
        queue: tokio::sync::mpsc::Sender<AppendReq>,
    },
}

/// Handle to the log; cheap to clone.
#[derive(Clone)]
pub struct PurgeLog {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    log_id: String,
    tail: Arc<Tail>,
    /// The local spool's figures (etcd only).
    spool: Option<Arc<SpoolStats>>,
    /// The log a restored backup came from (embedded only).
    restored_from: Option<Restored>,
}

impl PurgeLog {
    /// Opens (or creates) the log in `dir` and starts its writer thread. The thread stops
    /// when every handle is dropped.
    pub fn open(dir: &Path, retention: Retention) -> Result<Self, LogError> {
        let opened = redb::Embedded::open(dir, retention)?;
        Ok(PurgeLog {
            inner: Arc::new(Inner {
                backend: Backend::Embedded(opened.backend),
                log_id: opened.log_id,
                tail: opened.tail,
                spool: None,
                restored_from: opened.restored_from,
            }),
        })
    }

    /// Opens the cluster's log in etcd under `prefix` and starts its writer and follower
    /// tasks (they stop when every handle is dropped). `trim` says when this coordinator
    /// is the one that applies retention (the leader). Appends etcd does not commit
    /// within `spool.after` go to the local spool and are drained into the log later.
    pub async fn open_etcd(
        etcd: ::etcd::Etcd,
        prefix: &str,
        retention: Retention,
        trim: watch::Receiver<bool>,
        spool: SpoolOpts,
    ) -> Result<Self, LogError> {
        let log = etcd::EtcdLog::open(etcd, prefix).await?;
        let stats = Arc::new(SpoolStats::default());
        let (tail, queue) = etcd::start(log.clone(), retention, trim, spool, stats.clone()).await?;
        Ok(PurgeLog {
            inner: Arc::new(Inner {
                log_id: log.log_id().to_owned(),
                backend: Backend::Etcd { log, queue },
                tail,
                spool: Some(stats),
                restored_from: None,
            }),
        })
    }

    /// Purges answered 200 that wait in this coordinator's local spool for the shared
    /// log (always 0 with the embedded log, whose every append is the log itself).
    pub fn spool_depth(&self) -> u64 {
        self.inner
            .spool
            .as_ref()
            .map_or(0, |s| s.depth.load(Ordering::Acquire))
    }

    /// Purges spooled and drained into the shared log since start (0, 0 embedded).
    pub fn spool_counts(&self) -> (u64, u64) {
        self.inner.spool.as_ref().map_or((0, 0), |s| {
            (
                s.spooled.load(Ordering::Relaxed),
                s.drained.load(Ordering::Relaxed),
            )
        })
    }

    /// Appends purges as consecutive entries and resolves with the last sequence once
    /// they are durable on disk (0 for purges spooled: see [`Self::append_outcome`]).
    pub async fn append(&self, purges: Vec<NewPurge>) -> Result<u64, LogError> {
        self.append_outcome(purges).await.map(|a| a.seq())
    }

    /// Appends purges and resolves once they are durable: in the log (the last
    /// sequence), or, on etcd, in the local spool when etcd did not commit in time.
    pub async fn append_outcome(&self, purges: Vec<NewPurge>) -> Result<Appended, LogError> {
        let (reply, rx) = oneshot::channel();
        let req = AppendReq {
            purges,
            received_at_us: now_us(),
            reply,
        };
        match &self.inner.backend {
            Backend::Embedded(embedded) => embedded.send(req)?,
            Backend::Etcd { queue, .. } => queue.try_send(req).map_err(|e| match e {
                tokio::sync::mpsc::error::TrySendError::Full(_) => LogError::Overloaded,
                tokio::sync::mpsc::error::TrySendError::Closed(_) => LogError::Closed,
            })?,
        }
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Identity of this log: a cursor is meaningful only against the same log.
    pub fn log_id(&self) -> &str {
        &self.inner.log_id
    }

    /// The log this one was restored from (`coordinator restore`), if it was.
    pub fn restored_from(&self) -> Option<&Restored> {
        self.inner.restored_from.as_ref()
    }

    /// Copies the embedded log, as one commit saw it, into `dest` (a backup's file);
    /// returns its id and head at that commit. The etcd log is etcd's to snapshot.
    pub fn backup_into(&self, dest: &::redb::Database) -> Result<(String, u64), LogError> {
        match &self.inner.backend {
            Backend::Embedded(embedded) => embedded.copy_into(dest),
            Backend::Etcd { .. } => Err(LogError::Storage(
                "the purge log is in etcd: back it up with etcd's own snapshots (etcdctl snapshot save)".into(),
            )),
        }
    }

    /// Newest durable sequence (0 when nothing was ever logged).
    pub fn head(&self) -> u64 {
        self.inner.tail.head()
    }

    /// When purge `seq` was received (microseconds since the epoch), if it is stored
    /// locally (the tail, or the embedded file).
    pub fn received_at_us(&self, seq: u64) -> Option<u64> {
        if seq == 0 || seq > self.head() {
            return None;
        }
        self.read_local(seq, 1)?
            .ok()?
            .first()
            .filter(|e| e.seq == seq)
            .map(|e| e.received_at_us)
    }

    /// Oldest sequence still stored; `head + 1` when everything was pruned.
    pub fn first(&self) -> u64 {
        self.inner.tail.first()
    }

    /// A receiver that changes whenever the head moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.tail.subscribe()
    }

    /// Whether the log is the cluster's shared one in etcd.
    pub fn is_shared(&self) -> bool {
        matches!(self.inner.backend, Backend::Etcd { .. })
    }

    /// Up to `max` consecutive entries starting at `from` (fewer at the head).
    pub async fn read_from(&self, from: u64, max: usize) -> Result<Vec<Arc<PurgeEntry>>, LogError> {
        if let Some(local) = self.read_local(from, max) {
            return local;
        }
        match &self.inner.backend {
            Backend::Etcd { log, .. } => Ok(log
                .read_from(from, max)
                .await?
                .into_iter()
                .map(Arc::new)
                .collect()),
            Backend::Embedded(_) => Ok(Vec::new()),
        }
    }

    /// [`Self::read_from`] without waiting: from the tail, else from the embedded file;
    /// `None` when only etcd has the entries.
    fn read_local(&self, from: u64, max: usize) -> Option<Result<Vec<Arc<PurgeEntry>>, LogError>> {
        if let Some(local) = self.inner.tail.read(from, max) {
            return Some(Ok(local));
        }
        let Backend::Embedded(embedded) = &self.inner.backend else {
            return None;
        };
        Some(embedded.read_from(from, max))
    }

    /// `f` over the tail's entries `from..=last`, each with its encoding as a
    /// `PurgeBatch` entry (what `fanout` builds encoded batches from), under the tail's
    /// lock: keep `f` short. `None` unless the tail holds them all.
    pub fn with_tail_range<T>(
        &self,
        from: u64,
        last: u64,
        f: impl FnOnce(&mut dyn Iterator<Item = (&PurgeEntry, &Bytes)>) -> T,
    ) -> Option<T> {
        self.inner.tail.with_range(from, last, f)
    }

    /// One entry, if it is still retained.
    pub async fn get(&self, seq: u64) -> Result<Option<Arc<PurgeEntry>>, LogError> {
        Ok(self
            .read_from(seq, 1)
            .await?
            .into_iter()
            .next()
            .filter(|e| e.seq == seq))
    }
}
