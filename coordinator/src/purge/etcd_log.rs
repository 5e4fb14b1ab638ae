//! The purge log in etcd, for several coordinators sharing one log: the backend behind
//! [`super::log::PurgeLog`] with `[store] backend = "etcd"`.
//!
//! Layout under the configured prefix:
//!
//! - `log/id`: the log's identity (agents' cursors name it), created once;
//! - `log/head`: the newest sequence, 8 bytes big-endian;
//! - `log/e/<seq, 20 digits>`: each entry as the protobuf [`PurgeEntry`] agents receive.
//!
//! **Why sequences stay dense and ordered for every reader.** An append is one etcd
//! transaction: *if* `log/head` still holds the head this writer last saw, put the new
//! entries at the next sequences and the new head; otherwise nothing is written, the
//! writer reads the new head and tries again with later sequences. etcd serialises
//! transactions (one raft log), so of two coordinators that saw the same head exactly one
//! commits; the other's entries land after it. Entries and head change in the same
//! revision, so a reader that follows the entry prefix with a watch from a revision sees
//! every sequence exactly once and in order, and a gap can only mean compaction (then it
//! re-reads the range). A transaction etcd answered is committed on a quorum: that is
//! when a purge may be answered 200. A transaction whose answer was lost (a member died
//! after committing it) is tried again after the new head: those purges are then logged
//! twice, which is harmless (a ban or an xkey purge applied twice removes nothing more),
//! and their appender is answered with the second sequence.
//!
//! [`start`] runs two tasks per coordinator: a **writer** that takes every append
//! queued while the previous transaction ran and commits them together (group commit),
//! and a **follower** that watches the entries every coordinator commits and feeds the
//! local tail and head the agents' sessions stream from. Retention runs on the leader
//! only: it deletes the oldest entries by count and age, and every coordinator notices
//! the new first entry within seconds.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd::etcdserverpb::{
    watch_request, DeleteRangeRequest, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
    WatchCreateRequest, WatchRequest,
};
use etcd::{op, Etcd};
use prost::Message;
use proto::edge::PurgeEntry;
use tokio::sync::{mpsc, watch};

use super::log::{
    AppendReq, LogError, NewPurge, Retention, Shared, MAX_BATCH_REQUESTS, QUEUE_DEPTH,
};
use crate::clock::now_us;

/// How many of the newest entries a coordinator loads into its tail at start (older
/// ones are read from etcd when a lagging agent asks).
const START_TAIL: u64 = 4096;
/// How long one attempt at an append transaction may take. A proposal etcd accepted
/// just before its raft leader died waits for etcd's own request timeout (about 6 s);
/// trying again sooner goes to the new leader (a first attempt that commits after all
/// makes the repeat fail its compare, so it is appended again after it: twice, harmless).
const TXN_ATTEMPT: Duration = Duration::from_millis(1500);
/// How long an append may take in all before its purges are answered 503.
const APPEND_DEADLINE: Duration = Duration::from_secs(8);
/// How long an append keeps trying while every member refuses the connection.
const REFUSED_DEADLINE: Duration = Duration::from_secs(2);

/// Most entries written by one transaction (etcd's default request limit is 1.5 MiB and
/// 128 operations per txn; each entry is a put).
pub const MAX_TXN_ENTRIES: usize = 120;

/// One appender's purges, received at one instant.
#[derive(Debug, Clone)]
pub struct Append {
    pub received_at_us: u64,
    pub purges: Vec<NewPurge>,
}

/// A handle on the shared log; cheap to clone.
#[derive(Debug, Clone)]
pub struct EtcdLog {
    etcd: Etcd,
    prefix: Vec<u8>,
    log_id: String,
}

fn unavailable(e: tonic::Status) -> LogError {
    LogError::Storage(format!("etcd: {}", e.message()))
}

impl EtcdLog {
    /// Opens the log under `prefix`, creating its id the first time.
    pub async fn open(etcd: Etcd, prefix: &str) -> Result<EtcdLog, LogError> {
        let prefix = prefix.as_bytes().to_vec();
        let id_key = [prefix.as_slice(), b"log/id"].concat();
        let fresh = hex::encode(rand::random::<[u8; 16]>());
        let log_id = etcd
            .get_or_create(&id_key, fresh.as_bytes())
            .await
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .map_err(unavailable)?;
        Ok(EtcdLog {
            etcd,
            prefix,
            log_id,
        })
    }

    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    fn key(&self, suffix: &[u8]) -> Vec<u8> {
        [self.prefix.as_slice(), suffix].concat()
    }

    fn entry_key(&self, seq: u64) -> Vec<u8> {
        self.key(format!("log/e/{seq:020}").as_bytes())
    }

    /// The newest committed sequence (0 for an empty log).
    pub async fn head(&self) -> Result<u64, LogError> {
        let req = RangeRequest {
            key: self.key(b"log/head"),
            ..Default::default()
        };
        match range(&self.etcd, req).await?.kvs.first() {
            Some(kv) => decode_head(&kv.value),
            None => Ok(0),
        }
    }

    /// Appends the batch as consecutive entries in one transaction per
    /// [`MAX_TXN_ENTRIES`] (retrying on a moved head) and returns each appender's last
    /// sequence, in order, and the entries committed. `Ok` means committed in etcd;
    /// `Err` means nothing of the failed chunk was (and no later chunk was tried).
    pub async fn append(
        &self,
        batch: &[Append],
        mut head: u64,
    ) -> Result<(Vec<u64>, Vec<PurgeEntry>), LogError> {
        let head_key = self.key(b"log/head");
        let mut entries: Vec<(usize, u64, &NewPurge)> = Vec::new();
        for (i, a) in batch.iter().enumerate() {
            for p in &a.purges {
                entries.push((i, a.received_at_us, p));
            }
        }
        let mut last = vec![0u64; batch.len()];
        let mut committed = Vec::with_capacity(entries.len());
        let deadline = tokio::time::Instant::now() + APPEND_DEADLINE;
        for chunk in entries.chunks(MAX_TXN_ENTRIES) {
            loop {
                let mut ops = Vec::with_capacity(chunk.len() + 1);
                let mut built = Vec::with_capacity(chunk.len());
                let mut buf = Vec::with_capacity(256);
                for (k, (_, at, p)) in chunk.iter().enumerate() {
                    let seq = head + 1 + k as u64;
                    let entry = PurgeEntry {
                        seq,
                        received_at_us: *at,
                        op: Some(p.op.clone()),
                        soft: p.soft,
                        first_seq: 0,
                    };
                    buf.clear();
                    entry
                        .encode(&mut buf)
                        .map_err(|e| LogError::Storage(e.to_string()))?;
                    ops.push(op::put(&self.entry_key(seq), &buf));
                    built.push(entry);
                }
                let new_head = head + chunk.len() as u64;
                ops.push(op::put(&head_key, &new_head.to_be_bytes()));
                // An empty log has no head key yet.
                let guard = if head == 0 {
                    op::created_at(&head_key, 0)
                } else {
                    op::value_is(&head_key, &head.to_be_bytes())
                };
                // On a moved head the failure branch reads it: the retry needs no
                // separate round trip to learn where to go.
                let req = TxnRequest {
                    compare: vec![guard],
                    success: ops,
                    failure: vec![op::get(&head_key)],
                };
                let resp = self.txn_within_deadline(req, deadline).await?;
                if resp.succeeded {
                    for (k, (i, _, _)) in chunk.iter().enumerate() {
                        last[*i] = head + 1 + k as u64;
                    }
                    head = new_head;
                    committed.extend(built);
                    break;
                }
                // Another coordinator appended first: go after it (within the deadline).
                if tokio::time::Instant::now() >= deadline {
                    return Err(LogError::Storage("etcd: append timed out".into()));
                }
                head = match op::got(resp) {
                    Some(value) => decode_head(&value)?,
                    None => self.head().await?,
                };
            }
        }
        Ok((last, committed))
    }

    /// One append transaction, tried again after [`TXN_ATTEMPT`] without an answer,
    /// until `deadline`.
    async fn txn_within_deadline(
        &self,
        req: TxnRequest,
        deadline: tokio::time::Instant,
    ) -> Result<TxnResponse, LogError> {
        // Every member refusing (etcd down, not electing) is answered sooner.
        let refused_deadline = (tokio::time::Instant::now() + REFUSED_DEADLINE).min(deadline);
        loop {
            let attempt = (tokio::time::Instant::now() + TXN_ATTEMPT).min(deadline);
            match tokio::time::timeout_at(attempt, txn(&self.etcd, req.clone())).await {
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(e))
                    if tokio::time::Instant::now() + Duration::from_millis(200)
                        >= refused_deadline =>
                {
                    return Err(e)
                }
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(_) if attempt >= deadline => {
                    return Err(LogError::Storage("etcd: append timed out".into()))
                }
                Err(_) => {
                    tracing::debug!("etcd append attempt unanswered; trying again");
                }
            }
        }
    }

    /// Up to `max` entries from `from` on, in order.
    pub async fn read_from(&self, from: u64, max: usize) -> Result<Vec<PurgeEntry>, LogError> {
        Ok(self.list(from, max).await?.0)
    }
}

impl EtcdLog {
    /// Every entry from `from` on, in order and exactly once, as they are committed by
    /// any coordinator: the existing ones listed, then a watch from the listing's
    /// revision. A watch that etcd cancels (compaction, a member lost) is re-created from
    /// a fresh listing at the next expected sequence; an entry that is gone by then
    /// (retention) shows as a jump in `seq`, which the reader treats as it treats a
    /// trimmed log. The stream ends when the receiver is dropped.
    pub fn follow(&self, from: u64) -> mpsc::Receiver<PurgeEntry> {
        self.follow_at(from, None)
    }

    /// [`Self::follow`], with the first watch started at `revision` instead of after a
    /// listing (to exercise the compacted-watch path).
    #[doc(hidden)]
    pub fn follow_at(&self, from: u64, revision: Option<i64>) -> mpsc::Receiver<PurgeEntry> {
        let (tx, rx) = mpsc::channel(1024);
        let log = self.clone();
        tokio::spawn(async move {
            let mut next = from.max(1);
            let mut start_rev = revision;
            let mut backoff = Duration::from_millis(100);
            while !tx.is_closed() {
                let before = next;
                match log.follow_once(&mut next, start_rev.take(), &tx).await {
                    Ok(()) => return,
                    Err(e) => {
                        if next > before {
                            backoff = Duration::from_millis(100);
                        }
                        if backoff <= Duration::from_millis(100) {
                            tracing::warn!(error = %e, next, "purge log watch ended; re-listing");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
        rx
    }

    /// Lists from `next` (unless a start revision is given), then watches. `Ok` only
    /// when the receiver is gone.
    async fn follow_once(
        &self,
        next: &mut u64,
        start_rev: Option<i64>,
        tx: &mpsc::Sender<PurgeEntry>,
    ) -> Result<(), LogError> {
        let watch_from = match start_rev {
            Some(r) => r,
            None => {
                let revision = loop {
                    let (entries, revision) = self.list(*next, 1000).await?;
                    let full = entries.len() == 1000;
                    for e in entries {
                        *next = e.seq + 1;
                        if tx.send(e).await.is_err() {
                            return Ok(());
                        }
                    }
                    if !full {
                        break revision;
                    }
                };
                revision + 1
            }
        };
        let prefix = self.key(b"log/e/");
        let (req_tx, req_rx) = mpsc::channel(1);
        let _ = req_tx
            .send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(
                    WatchCreateRequest {
                        key: self.entry_key(*next),
                        range_end: etcd::prefix_end(&prefix),
                        start_revision: watch_from,
                        ..Default::default()
                    },
                )),
            })
            .await;
        let mut stream = self
            .etcd
            .watch()
            .watch(tokio_stream::wrappers::ReceiverStream::new(req_rx))
            .await
            .map_err(unavailable)?
            .into_inner();
        loop {
            let resp = tokio::select! {
                _ = tx.closed() => return Ok(()),
                r = stream.message() => r.map_err(unavailable)?,
            };
            let Some(resp) = resp else {
                return Err(LogError::Storage("etcd: watch stream closed".into()));
            };
            if resp.compact_revision > 0 || resp.canceled {
                return Err(LogError::Storage(format!(
                    "etcd: watch cancelled (compacted at revision {})",
                    resp.compact_revision
                )));
            }
            for ev in resp.events {
                let Some(kv) = ev.kv.filter(|kv| !kv.value.is_empty()) else {
                    continue; // a delete (retention)
                };
                let entry = PurgeEntry::decode(kv.value.as_slice())
                    .map_err(|e| LogError::Storage(format!("corrupt entry in etcd: {e}")))?;
                if entry.seq < *next {
                    continue; // already delivered by the listing
                }
                *next = entry.seq + 1;
                if tx.send(entry).await.is_err() {
                    return Ok(());
                }
            }
        }
    }

    /// The oldest stored sequence (`None` for an empty log).
    pub async fn first(&self) -> Result<Option<u64>, LogError> {
        let prefix = self.key(b"log/e/");
        let req = RangeRequest {
            key: prefix.clone(),
            range_end: etcd::prefix_end(&prefix),
            limit: 1,
            keys_only: true,
            ..Default::default()
        };
        let resp = range(&self.etcd, req).await?;
        Ok(resp.kvs.first().and_then(|kv| {
            std::str::from_utf8(kv.key.get(prefix.len()..)?)
                .ok()?
                .parse()
                .ok()
        }))
    }

    /// Deletes every entry before `keep_from`.
    pub async fn delete_before(&self, keep_from: u64) -> Result<(), LogError> {
        let req = DeleteRangeRequest {
            key: self.key(b"log/e/"),
            range_end: self.entry_key(keep_from),
            ..Default::default()
        };
        self.etcd.delete_range(req).await.map_err(unavailable)?;
        Ok(())
    }

    /// The first sequence retention keeps: beyond the count, or older than the age.
    async fn keep_from(&self, head: u64, retention: Retention) -> Result<Option<u64>, LogError> {
        let Some(first) = self.first().await? else {
            return Ok(None);
        };
        let mut keep = first.max((head + 1).saturating_sub(retention.max_entries));
        let cutoff = now_us().saturating_sub(retention.max_age.as_micros() as u64);
        // Age: walk forward while the oldest entries are too old (bounded per pass).
        for _ in 0..10 {
            let (entries, _) = self.list(keep, 1000).await?;
            let full = entries.len() == 1000;
            match entries.iter().find(|e| e.received_at_us >= cutoff) {
                Some(e) => {
                    keep = e.seq;
                    break;
                }
                None => keep = entries.last().map(|e| e.seq + 1).unwrap_or(keep),
            }
            if !full {
                break;
            }
        }
        Ok((keep > first).then_some(keep))
    }

    /// Up to `max` entries from `from`, and the revision they were read at.
    async fn list(&self, from: u64, max: usize) -> Result<(Vec<PurgeEntry>, i64), LogError> {
        let (key, end) = (
            self.entry_key(from.max(1)),
            etcd::prefix_end(&self.key(b"log/e/")),
        );
        let req = RangeRequest {
            key,
            range_end: end,
            limit: max as i64,
            ..Default::default()
        };
        let resp = range(&self.etcd, req).await?;
        let revision = resp.header.map(|h| h.revision).unwrap_or(0);
        let entries = resp
            .kvs
            .iter()
            .map(|kv| {
                PurgeEntry::decode(kv.value.as_slice())
                    .map_err(|e| LogError::Storage(format!("corrupt entry in etcd: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((entries, revision))
    }
}

/// The log head's value: a big-endian u64. Anything else is refused, not read as 0 (an
/// append would then retry against a head that never matches).
fn decode_head(value: &[u8]) -> Result<u64, LogError> {
    <[u8; 8]>::try_from(value)
        .map(u64::from_be_bytes)
        .map_err(|_| LogError::Storage("etcd: the purge log's head key is not 8 bytes".into()))
}

/// A range read (see [`Etcd::range`]).
async fn range(etcd: &Etcd, req: RangeRequest) -> Result<RangeResponse, LogError> {
    etcd.range(req).await.map_err(unavailable)
}

/// A transaction (see [`Etcd::txn`]; every txn here is guarded by a compare that a
/// committed first attempt falsifies).
async fn txn(etcd: &Etcd, req: TxnRequest) -> Result<TxnResponse, LogError> {
    etcd.txn(req).await.map_err(unavailable)
}

/// Starts the writer and the follower of `log`, with the tail loaded; returns what the
/// [`super::log::PurgeLog`] handle reads and where it queues appends.
pub(super) async fn start(
    log: EtcdLog,
    retention: Retention,
    trim: watch::Receiver<bool>,
) -> Result<(Arc<Shared>, mpsc::Sender<AppendReq>), LogError> {
    let head = log.head().await?;
    let first = log.first().await?.unwrap_or(head + 1);
    let from = first.max((head + 1).saturating_sub(START_TAIL));
    let mut tail = VecDeque::new();
    let mut next = from;
    while next <= head {
        let batch = log.read_from(next, 1000).await?;
        let Some(last) = batch.last().map(|e| e.seq) else {
            break;
        };
        for e in batch.into_iter().filter(|e| e.seq <= head) {
            if tail
                .back()
                .is_some_and(|b: &Arc<PurgeEntry>| b.seq + 1 != e.seq)
            {
                tail.clear();
            }
            tail.push_back(Arc::new(e));
        }
        next = last + 1;
    }
    let first = tail
        .front()
        .map(|e| e.seq)
        .unwrap_or(head + 1)
        .min(first.max(1));
    let shared = Shared::new(head, first, tail);
    let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
    tokio::spawn(write_loop(log.clone(), shared.clone(), rx));
    tokio::spawn(follow_loop(log.clone(), shared.clone(), head + 1));
    tokio::spawn(retention_loop(log, shared.clone(), retention, trim));
    Ok((shared, queue))
}

/// Group commit: every append queued while the previous transaction ran goes into the
/// next one. Ends when every [`super::log::PurgeLog`] handle is dropped.
async fn write_loop(log: EtcdLog, shared: Arc<Shared>, mut rx: mpsc::Receiver<AppendReq>) {
    let mut written = 0u64;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_REQUESTS {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        let appends: Vec<Append> = batch
            .iter_mut()
            .map(|r| Append {
                received_at_us: r.received_at_us,
                purges: std::mem::take(&mut r.purges),
            })
            .collect();
        let guess = written.max(shared.durable.load(Ordering::Acquire));
        match log.append(&appends, guess).await {
            Ok((lasts, committed)) => {
                written = lasts.iter().copied().max().unwrap_or(written).max(written);
                for (req, last) in batch.into_iter().zip(lasts) {
                    let _ = req.reply.send(Ok(last));
                }
                // This coordinator's sessions need not wait for the watch to bring back
                // what it just wrote, if nothing from elsewhere comes before it (else the
                // watch delivers it all, in order).
                if shared.extend_next(committed.into_iter().map(Arc::new)) {
                    shared.publish();
                }
            }
            Err(e) => {
                let purges: usize = appends.iter().map(|a| a.purges.len()).sum();
                tracing::error!(error = %e, purges, "purge log commit in etcd failed; answered 503");
                for req in batch {
                    let _ = req.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Feeds the tail and the head from etcd's watch, for as long as the log is open.
async fn follow_loop(log: EtcdLog, shared: Arc<Shared>, from: u64) {
    let mut rx = log.follow(from);
    let weak = Arc::downgrade(&shared);
    drop(shared);
    while let Some(e) = rx.recv().await {
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let mut batch = vec![Arc::new(e)];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(e) => batch.push(Arc::new(e)),
                Err(_) => break,
            }
        }
        shared.extend(batch);
        shared.publish();
    }
}

/// Every few seconds: learn the first stored entry (another coordinator may have
/// trimmed), and, on the leader, apply retention.
async fn retention_loop(
    log: EtcdLog,
    shared: Arc<Shared>,
    retention: Retention,
    trim: watch::Receiver<bool>,
) {
    let weak = Arc::downgrade(&shared);
    drop(shared);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let head = shared.durable.load(Ordering::Acquire);
        if *trim.borrow() {
            match log.keep_from(head, retention).await {
                Ok(Some(keep)) => match log.delete_before(keep).await {
                    Ok(()) => tracing::debug!(first = keep, head, "purge log pruned in etcd"),
                    Err(e) => tracing::warn!(error = %e, "purge log retention pass failed"),
                },
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "purge log retention pass skipped"),
            }
        }
        if let Ok(first) = log.first().await {
            shared.trim(first.unwrap_or(head + 1));
        }
    }
}
