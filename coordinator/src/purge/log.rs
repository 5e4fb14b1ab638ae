//! The durable purge log: every acknowledged purge, in order, on disk.
//!
//! Entries live in one redb file (`purges.redb` under `--state-dir`), keyed by a dense
//! sequence number and stored as the protobuf [`PurgeEntry`] the agents receive, so there
//! is one encoding from disk to wire. A single writer thread owns all writes and does
//! *group commit*: it takes every append that queued up while the previous fsync ran and
//! commits them in one transaction, so a burst of thousands of purges costs a few fsyncs,
//! not thousands. [`PurgeLog::append`] resolves only after the commit is durable; a
//! failed commit (a full disk) resolves with an error and assigns no sequence number.
//!
//! Readers never touch the writer: the newest entries sit in an in-memory tail
//! ([`PurgeLog::read_from`] serves from it and falls back to the file for old cursors),
//! and the head sequence is published on a `watch` channel that fan-out sessions await.
//!
//! After a failed commit (a full disk) redb refuses further use of the open file, so the
//! writer closes and reopens it ([`SharedDb`]): once space is back, appends succeed again
//! without a restart.
//!
//! Retention deletes the oldest entries beyond a count or an age. An agent whose cursor
//! falls behind the oldest retained entry gets a full ban instead (see `fanout`).
//!
//! With `[store] backend = "etcd"` the same handle fronts the cluster's shared log
//! ([`super::etcd_log`]): appends are committed in etcd by a writer task (group commit
//! again), and a follower task feeds the tail and the head from etcd's watch, so every
//! coordinator's sessions stream the entries every coordinator accepted, in one order.
//! An append etcd does not commit in time is fsynced to the local spool
//! ([`super::spool`]) instead and resolves as [`Appended::Spooled`]; a drain task
//! appends the spool to the shared log once etcd takes writes ([`PurgeLog::spool_depth`]
//! says how many wait).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::clock::now_us;

use prost::Message;
use proto::edge::{purge_entry::Op, PurgeEntry};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{oneshot, watch};

const PURGES: TableDefinition<u64, &[u8]> = TableDefinition::new("purges");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

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
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(LogError::Storage(
                "purge log is reopening after an I/O error".into(),
            )),
        }
    }

    /// Drops the handle (releasing the file lock) and opens the file again.
    fn reopen(&self) {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
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

/// A purge to append: the operation and whether it is soft.
#[derive(Debug, Clone)]
pub struct NewPurge {
    pub op: Op,
    pub soft: bool,
}

pub(super) struct AppendReq {
    pub(super) purges: Vec<NewPurge>,
    pub(super) received_at_us: u64,
    pub(super) reply: oneshot::Sender<Result<Appended, LogError>>,
}

/// Where appends go and where old entries are read from.
enum Backend {
    /// `purges.redb`, written by the writer thread.
    Embedded {
        db: Arc<SharedDb>,
        queue: std_mpsc::SyncSender<AppendReq>,
    },
    /// The cluster's log in etcd, written by the etcd writer task.
    Etcd {
        log: super::etcd_log::EtcdLog,
        queue: tokio::sync::mpsc::Sender<AppendReq>,
    },
}

/// What readers see, whichever backend fills it: the head, the oldest stored sequence
/// and the newest entries.
pub(super) struct Shared {
    pub(super) head_tx: watch::Sender<u64>,
    /// The newest durable sequence, set before the appenders are answered (the watch
    /// only wakes the sessions, after them).
    pub(super) durable: AtomicU64,
    /// Oldest sequence still stored (head + 1 when the log is empty).
    pub(super) first: AtomicU64,
    /// The newest entries, consecutive.
    pub(super) tail: Mutex<Tail>,
    /// The last batches encoded for sessions, keyed `(from, last, ranges)`: sessions at
    /// the same cursor (a fleet in sync) share one.
    wire_batches: Mutex<VecDeque<WireKeyed>>,
}

/// The newest entries, each also encoded once as it appears in a `PurgeBatch`.
pub(super) struct Tail {
    entries: VecDeque<Arc<PurgeEntry>>,
    wire: VecDeque<prost::bytes::Bytes>,
}

impl Tail {
    fn new(entries: VecDeque<Arc<PurgeEntry>>) -> Tail {
        let wire = entries
            .iter()
            .map(|e| proto::codec::encode_entry(e).into())
            .collect();
        Tail { entries, wire }
    }

    fn push_back(&mut self, e: Arc<PurgeEntry>) {
        self.wire.push_back(proto::codec::encode_entry(&e).into());
        self.entries.push_back(e);
    }

    fn pop_front(&mut self) {
        self.entries.pop_front();
        self.wire.pop_front();
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.wire.clear();
    }
}

impl Shared {
    pub(super) fn new(head: u64, first: u64, tail: VecDeque<Arc<PurgeEntry>>) -> Arc<Shared> {
        Arc::new(Shared {
            head_tx: watch::channel(head).0,
            durable: AtomicU64::new(head),
            first: AtomicU64::new(first),
            tail: Mutex::new(Tail::new(tail)),
            wire_batches: Mutex::new(VecDeque::with_capacity(WIRE_BATCHES)),
        })
    }

    /// Appends consecutive entries to the tail (dropping the oldest beyond its size) and
    /// moves the durable head; the sessions are woken by [`Self::publish`]. Entries the
    /// tail already holds are skipped (in a cluster, the writer's own entries come back
    /// through the watch).
    pub(super) fn extend(&self, entries: impl IntoIterator<Item = Arc<PurgeEntry>>) {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let mut last = None;
        for e in entries {
            match tail.entries.back().map(|b| b.seq) {
                Some(back) if e.seq <= back => continue,
                Some(back) if back + 1 != e.seq => {
                    // A gap (entries trimmed before this reader saw them): the tail only
                    // ever holds consecutive entries.
                    tail.clear();
                    self.first.fetch_max(e.seq, Ordering::AcqRel);
                }
                _ => {}
            }
            last = Some(e.seq);
            tail.push_back(e);
        }
        self.settle(tail, last);
    }

    /// [`Self::extend`] with the leading entries that follow the tail's newest entry
    /// (or the durable head of an empty tail) exactly, up to the first that does not;
    /// whether any did.
    pub(super) fn extend_next(&self, entries: impl IntoIterator<Item = Arc<PurgeEntry>>) -> bool {
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let mut expected = match tail.entries.back() {
            Some(b) => b.seq + 1,
            None => self.durable.load(Ordering::Acquire) + 1,
        };
        let before = expected;
        for e in entries {
            if e.seq != expected {
                break;
            }
            expected += 1;
            tail.push_back(e);
        }
        let added = expected != before;
        self.settle(tail, added.then(|| expected - 1));
        added
    }

    /// After entries up to `last` went into the tail: bounds it, releases it, and moves
    /// the durable head on.
    fn settle(&self, mut tail: std::sync::MutexGuard<'_, Tail>, last: Option<u64>) {
        while tail.entries.len() > TAIL_ENTRIES {
            tail.pop_front();
        }
        drop(tail);
        if let Some(seq) = last {
            self.durable.fetch_max(seq, Ordering::AcqRel);
        }
    }

    /// Wakes the sessions with the durable head.
    pub(super) fn publish(&self) {
        self.head_tx
            .send_replace(self.durable.load(Ordering::Acquire));
    }

    /// Forgets entries before `first` (retention).
    pub(super) fn trim(&self, first: u64) {
        self.first.fetch_max(first, Ordering::AcqRel);
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        while tail.entries.front().is_some_and(|e| e.seq < first) {
            tail.pop_front();
        }
    }
}

/// Handle to the log; cheap to clone.
#[derive(Clone)]
pub struct PurgeLog {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Backend,
    log_id: String,
    shared: Arc<Shared>,
    /// The local spool's figures (etcd only).
    spool: Option<Arc<SpoolStats>>,
}

pub(super) const TAIL_ENTRIES: usize = 65_536;
pub(super) const MAX_BATCH_REQUESTS: usize = 4096;
pub(super) const QUEUE_DEPTH: usize = 65_536;
/// Encoded batches kept for sharing: the fleet's cursor, and a few stragglers'.
const WIRE_BATCHES: usize = 8;

/// An encoded batch and its `(from, last, ranges)`.
type WireKeyed = ((u64, u64, bool), prost::bytes::Bytes);

impl PurgeLog {
    /// Opens (or creates) the log in `dir` and starts its writer thread. The thread stops
    /// when every handle is dropped.
    pub fn open(dir: &Path, retention: Retention) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::Storage(e.to_string()))?;
        let path = dir.join("purges.redb");
        daemon::files::file_with_mode(&path, daemon::files::PRIVATE_FILE)
            .map_err(|e| LogError::Storage(format!("{}: {e}", path.display())))?;
        let db = Database::create(&path).map_err(storage)?;
        let (log_id, head, first) = init_meta(&db)?;
        let shared = Shared::new(head, first, load_tail(&db, head)?);
        let db = Arc::new(SharedDb {
            path,
            db: RwLock::new(Some(db)),
        });
        let (queue, rx) = std_mpsc::sync_channel(QUEUE_DEPTH);
        let writer = Writer {
            db: db.clone(),
            head,
            shared: shared.clone(),
            retention,
            last_prune: Instant::now() - Duration::from_secs(3600),
        };
        std::thread::Builder::new()
            .name("purge-log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| LogError::Storage(e.to_string()))?;
        Ok(PurgeLog {
            inner: Arc::new(Inner {
                backend: Backend::Embedded { db, queue },
                log_id,
                shared,
                spool: None,
            }),
        })
    }

    /// Opens the cluster's log in etcd under `prefix` and starts its writer and follower
    /// tasks (they stop when every handle is dropped). `trim` says when this coordinator
    /// is the one that applies retention (the leader). Appends etcd does not commit
    /// within `spool.after` go to the local spool and are drained into the log later.
    pub async fn open_etcd(
        etcd: etcd::Etcd,
        prefix: &str,
        retention: Retention,
        trim: watch::Receiver<bool>,
        spool: SpoolOpts,
    ) -> Result<Self, LogError> {
        let log = super::etcd_log::EtcdLog::open(etcd, prefix).await?;
        let stats = Arc::new(SpoolStats::default());
        let (shared, queue) =
            super::etcd_log::start(log.clone(), retention, trim, spool, stats.clone()).await?;
        Ok(PurgeLog {
            inner: Arc::new(Inner {
                log_id: log.log_id().to_owned(),
                backend: Backend::Etcd { log, queue },
                shared,
                spool: Some(stats),
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
            Backend::Embedded { queue, .. } => queue.try_send(req).map_err(|e| match e {
                std_mpsc::TrySendError::Full(_) => LogError::Overloaded,
                std_mpsc::TrySendError::Disconnected(_) => LogError::Closed,
            })?,
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

    /// Newest durable sequence (0 when nothing was ever logged).
    pub fn head(&self) -> u64 {
        self.inner.shared.durable.load(Ordering::Acquire)
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
        self.inner.shared.first.load(Ordering::Acquire)
    }

    /// A receiver that changes whenever the head moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.shared.head_tx.subscribe()
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
            Backend::Embedded { .. } => Ok(Vec::new()),
        }
    }

    /// [`Self::read_from`] without waiting: from the tail, else from the embedded file;
    /// `None` when only etcd has the entries.
    fn read_local(&self, from: u64, max: usize) -> Option<Result<Vec<Arc<PurgeEntry>>, LogError>> {
        {
            let tail = self
                .inner
                .shared
                .tail
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(front) = tail.entries.front() {
                if front.seq <= from {
                    let skip = (from - front.seq) as usize;
                    return Some(Ok(tail
                        .entries
                        .iter()
                        .skip(skip)
                        .take(max)
                        .cloned()
                        .collect()));
                }
            }
        }
        let Backend::Embedded { db, .. } = &self.inner.backend else {
            return None;
        };
        Some(db.with(|db| {
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
        }))
    }

    /// The entries `from..=up_to` (at most `max` of them), already encoded for a
    /// `PurgeBatch` (`PurgeBatch::encoded`), with runs of tag purges as range entries if
    /// `ranges` (`super::ranges`), and the last sequence among them: `None` unless the
    /// tail holds `from`. Sessions asking for the same range share one buffer.
    pub fn read_encoded(
        &self,
        from: u64,
        up_to: u64,
        max: usize,
        ranges: bool,
    ) -> Option<(u64, prost::bytes::Bytes)> {
        let shared = &self.inner.shared;
        let want = up_to
            .min(self.head())
            .min(from.saturating_add(max.max(1) as u64 - 1));
        if want < from {
            return None;
        }
        let key = (from, want, ranges);
        {
            let cached = shared
                .wire_batches
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some((_, bytes)) = cached.iter().find(|(k, _)| *k == key) {
                return Some((want, bytes.clone()));
            }
        }
        let tail = shared.tail.lock().unwrap_or_else(|p| p.into_inner());
        let front = tail.entries.front()?.seq;
        let back = tail.entries.back()?.seq;
        if from < front || want > back {
            return None;
        }
        let skip = (from - front) as usize;
        let n = (want - from + 1) as usize;
        let entries = tail.entries.iter().skip(skip).take(n).map(|e| &**e);
        let wire = tail.wire.iter().skip(skip).take(n);
        let bytes =
            prost::bytes::Bytes::from(super::ranges::encode_batch(entries.zip(wire), ranges));
        drop(tail);
        let mut cached = shared
            .wire_batches
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if cached.len() == WIRE_BATCHES {
            cached.pop_front();
        }
        cached.push_back((key, bytes.clone()));
        Some((want, bytes))
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

fn init_meta(db: &Database) -> Result<(String, u64, u64), LogError> {
    let mut txn = db.begin_write().map_err(storage)?;
    txn.set_durability(Durability::Immediate);
    let (log_id, head, first) = {
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
        let stored_head = meta
            .get("head")
            .map_err(storage)?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let last = purges.last().map_err(storage)?.map(|(k, _)| k.value());
        let head = stored_head.max(last.unwrap_or(0));
        let first = purges
            .first()
            .map_err(storage)?
            .map(|(k, _)| k.value())
            .unwrap_or(head + 1);
        (log_id, head, first)
    };
    txn.commit().map_err(storage)?;
    Ok((log_id, head, first))
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
    shared: Arc<Shared>,
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
                self.shared.extend(entries.into_iter().map(Arc::new));
                // Answer the appenders before waking the sessions: with a thousand edges
                // the wake-ups are a thousand tasks, and Magento must not queue behind
                // them (the purge listener never waits on an edge).
                for (req, last) in batch.into_iter().zip(last_seqs) {
                    let _ = req.reply.send(Ok(Appended::Logged(last)));
                }
                self.shared.publish();
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
        if self.shared.first.load(Ordering::Acquire) > head {
            // The log was empty: its first entry is the first one just written.
            if let Some(e) = entries.first() {
                self.shared.first.store(e.seq, Ordering::Release);
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
        let first = self.shared.first.load(Ordering::Acquire);
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
        self.shared.trim(keep_from);
        tracing::debug!(first = keep_from, head = self.head, "purge log pruned");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::edge::TagSet;

    fn entry(seq: u64) -> Arc<PurgeEntry> {
        Arc::new(PurgeEntry {
            seq,
            op: Some(Op::Tags(TagSet {
                tags: vec![format!("t{seq}")],
            })),
            ..Default::default()
        })
    }

    fn tail_seqs(shared: &Shared) -> Vec<u64> {
        let tail = shared.tail.lock().unwrap();
        tail.entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn the_tail_takes_a_writers_own_entries_only_where_they_follow() {
        let shared = Shared::new(10, 9, [9, 10].into_iter().map(entry).collect());
        // The writer's entries 11-12 follow: taken.
        assert!(shared.extend_next((11..=12).map(entry)));
        assert_eq!(shared.durable.load(Ordering::Acquire), 12);
        // The watch brings them back with 13 from another coordinator: 13 only.
        shared.extend((11..=13).map(entry));
        assert_eq!(tail_seqs(&shared), vec![9, 10, 11, 12, 13]);
        // Entries after a gap (15 while 14 is not yet here) wait for the watch.
        assert!(!shared.extend_next((15..=16).map(entry)));
        assert_eq!(shared.durable.load(Ordering::Acquire), 13);
        // Two chunks with another coordinator's entries between them: the first only.
        assert!(shared.extend_next([14, 15, 30].into_iter().map(entry)));
        assert_eq!(tail_seqs(&shared), vec![9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(shared.durable.load(Ordering::Acquire), 15);
    }

    fn tag(t: &str) -> NewPurge {
        NewPurge {
            op: Op::Tags(TagSet {
                tags: vec![t.into()],
            }),
            soft: false,
        }
    }

    fn forever() -> Retention {
        Retention {
            max_entries: u64::MAX,
            max_age: Duration::from_secs(u32::MAX as u64),
        }
    }

    #[tokio::test]
    async fn appends_are_dense_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = PurgeLog::open(dir.path(), forever()).unwrap();
        let id = log.log_id().to_owned();
        assert_eq!(log.append(vec![tag("a")]).await.unwrap(), 1);
        assert_eq!(
            log.append_outcome(vec![tag("b"), tag("c")]).await.unwrap(),
            Appended::Logged(3)
        );
        let many: Vec<_> = (0..100)
            .map(|i| log.append(vec![tag(&format!("t{i}"))]))
            .collect();
        for f in many {
            f.await.unwrap();
        }
        assert_eq!(log.head(), 103);
        drop(log);
        // The writer thread releases the file once it sees the queue closed.
        let mut reopened = PurgeLog::open(dir.path(), forever());
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            reopened = PurgeLog::open(dir.path(), forever());
        }
        let log = reopened.unwrap();
        assert_eq!(log.log_id(), id);
        assert_eq!(log.head(), 103);
        let all = log.read_from(1, 1000).await.unwrap();
        assert_eq!(all.len(), 103);
        assert!(all.iter().enumerate().all(|(i, e)| e.seq == i as u64 + 1));
    }

    #[tokio::test]
    async fn encoded_batches_decode_to_the_entries_and_are_shared() {
        use proto::codec::WireEncode;
        use proto::edge::{coordinator_message, CoordinatorMessage, PurgeBatch};
        let dir = tempfile::tempdir().unwrap();
        let log = PurgeLog::open(dir.path(), forever()).unwrap();
        for i in 0..10 {
            log.append(vec![tag(&format!("t{i}"))]).await.unwrap();
        }
        let (last, bytes) = log.read_encoded(3, u64::MAX, 4, false).unwrap();
        assert_eq!(last, 6);
        let msg = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Purges(PurgeBatch {
                entries: vec![],
                encoded: bytes.clone(),
            })),
        };
        let mut wire = Vec::new();
        msg.encode_wire(&mut wire);
        let Some(coordinator_message::Msg::Purges(batch)) =
            CoordinatorMessage::decode(wire.as_slice()).unwrap().msg
        else {
            panic!("not a batch");
        };
        let want: Vec<PurgeEntry> = log
            .read_from(3, 4)
            .await
            .unwrap()
            .iter()
            .map(|e| (**e).clone())
            .collect();
        assert_eq!(batch.entries, want);
        // A second session at the same cursor gets the same buffer, not a copy.
        let (_, again) = log.read_encoded(3, 6, 100, false).unwrap();
        assert_eq!(again.as_ptr(), bytes.as_ptr());
        // To the head: everything after the cursor; past the head: nothing.
        assert_eq!(
            log.read_encoded(8, u64::MAX, 100, false).map(|(l, _)| l),
            Some(10)
        );
        assert!(log.read_encoded(11, u64::MAX, 100, false).is_none());
        // Up to a given sequence, as a session in a storm asks (the head at its tick).
        assert_eq!(log.read_encoded(2, 5, 100, false).map(|(l, _)| l), Some(5));
        assert!(log.read_encoded(6, 5, 100, false).is_none());
        // As one range entry, for an agent that takes them; shared too.
        let (last, ranged) = log.read_encoded(3, 6, 100, true).unwrap();
        assert_eq!(last, 6);
        let batch = PurgeBatch::decode(ranged.as_ref()).unwrap();
        assert_eq!(batch.entries.len(), 1);
        assert_eq!((batch.entries[0].first(), batch.entries[0].seq), (3, 6));
        let (_, again) = log.read_encoded(3, 6, 100, true).unwrap();
        assert_eq!(again.as_ptr(), ranged.as_ptr());
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
            log.append(vec![tag(&format!("t{i}"))]).await.unwrap();
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
