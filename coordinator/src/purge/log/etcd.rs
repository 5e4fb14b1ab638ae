//! The purge log in etcd, for several coordinators sharing one log: the backend behind
//! [`super::PurgeLog`] with `[store] backend = "etcd"`.
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
//! after committing it) is tried again after the new head: with [`EtcdLog::append`]
//! those purges are then logged twice, which is harmless (a ban or an xkey purge applied
//! twice removes nothing more). The coordinator's writer also guards on its spool mark
//! (below): its retry finds the mark moved and appends nothing again.
//!
//! [`start`] runs three tasks per coordinator: a **writer** that takes every append
//! queued while the previous transaction ran and commits them together (group commit),
//! a **follower** that watches the entries every coordinator commits and feeds the
//! local tail and head the agents' sessions stream from, and a **drain** (below).
//! Retention runs on the leader only: it deletes the oldest entries by count and age,
//! and every coordinator notices the new first entry within seconds.
//!
//! **When etcd does not commit.** The writer gives etcd `[store] spool_after_ms` (1 s by
//! default) per group commit; past it, or at once when [`StoreHealth`] already says etcd
//! is unreachable, the purges are written and fsynced to the local spool
//! ([`super::spool`]) and answered as spooled. Once anything is spooled, every later
//! append is spooled too until the spool is empty, so this coordinator's purges reach
//! the log in the order it received them. The drain appends the spool's entries in id
//! order, [`MAX_TXN_ENTRIES`] per transaction, each guarded on `log/head` *and* on
//! `log/spool/<coordinator id>` (the highest spool id already drained) and moving both:
//! a drain cut short by a kill -9 or a lost answer leaves the mark where the log is, so
//! each spooled entry is appended exactly once. The writer's own transactions carry
//! spool ids and move the mark the same way, so a direct append that timed out (and was
//! spooled) but that etcd commits later after all is not appended again by the drain.
//! The writer and the drain report every outcome into [`StoreHealth`].

use daemon::sync::Recover;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd::etcdserverpb::{
    DeleteRangeRequest, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use etcd::{op, Etcd};
use prost::Message;
use proto::edge::PurgeEntry;
use tokio::sync::{mpsc, watch, Notify};

use super::spool::Spool;
use super::tail::Tail;
use super::{
    AppendReq, Appended, LogError, NewPurge, Retention, SpoolOpts, SpoolStats, MAX_BATCH_REQUESTS,
    QUEUE_DEPTH,
};
use crate::clock::now_us;
use crate::store_health::StoreHealth;

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
/// How long one drain transaction may take before it is tried again.
const DRAIN_ATTEMPT: Duration = Duration::from_secs(2);

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
            // No id follows u64::MAX: every later spooled purge would count as drained.
            Some(kv) => decode_head(&kv.value).and_then(|m| {
                match m {
                u64::MAX => Err(LogError::Storage(
                    "etcd: this coordinator's spool mark is u64::MAX (not written by a coordinator)"
                        .into(),
                )),
                m => Ok(m),
            }
            }),
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

    /// The key holding the highest spool id of `coordinator` already in the log.
    pub fn spool_mark_key(&self, coordinator: &str) -> Vec<u8> {
        self.key(format!("log/spool/{coordinator}").as_bytes())
    }

    /// The highest spool id already drained under `mark_key` (0: none).
    pub async fn spool_mark(&self, mark_key: &[u8]) -> Result<u64, LogError> {
        let req = RangeRequest {
            key: mark_key.to_vec(),
            ..Default::default()
        };
        match range(&self.etcd, req).await?.kvs.first() {
            Some(kv) => decode_head(&kv.value),
            None => Ok(0),
        }
    }

    /// Appends spooled `entries` (their `seq` is the spool id, increasing) after the
    /// head in one transaction that also moves the spool mark from `drained` to the last
    /// id, guarded on both; a moved head is followed until `deadline`. A mark already
    /// past `drained` (an earlier attempt committed, its answer lost; or a drain before
    /// a restart) appends nothing and says where it stands.
    pub async fn drain(
        &self,
        mark_key: &[u8],
        entries: &[PurgeEntry],
        mut head: u64,
        drained: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Drained, LogError> {
        let Some(last_id) = entries.last().map(|e| e.seq) else {
            return Ok(Drained::AlreadyIn(drained));
        };
        let head_key = self.key(b"log/head");
        loop {
            let txn = drain_txn(
                &head_key,
                mark_key,
                |s| self.entry_key(s),
                entries,
                head,
                drained,
            )?;
            let resp = self.txn_within_deadline(txn.req, deadline).await?;
            if resp.succeeded {
                return Ok(Drained::Committed {
                    upto: last_id,
                    entries: txn.built,
                });
            }
            let (new_head, mark) = (branch_value(&resp, 0), branch_value(&resp, 1));
            let mark = mark.as_deref().map(decode_head).transpose()?.unwrap_or(0);
            if mark > drained {
                return Ok(Drained::AlreadyIn(mark));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LogError::Storage("etcd: drain timed out".into()));
            }
            head = new_head
                .as_deref()
                .map(decode_head)
                .transpose()?
                .unwrap_or(0);
        }
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
        self.list(from, max).await
    }
}

impl EtcdLog {
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
            let entries = self.list(keep, 1000).await?;
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

    /// Up to `max` entries from `from`.
    async fn list(&self, from: u64, max: usize) -> Result<Vec<PurgeEntry>, LogError> {
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
        resp.kvs
            .iter()
            .map(|kv| {
                PurgeEntry::decode(kv.value.as_slice())
                    .map_err(|e| LogError::Storage(format!("corrupt entry in etcd: {e}")))
            })
            .collect()
    }
}

/// What a drain transaction did.
#[derive(Debug, Clone, PartialEq)]
pub enum Drained {
    /// These entries, with their new sequences, are in the log; the mark is `upto`.
    Committed { upto: u64, entries: Vec<PurgeEntry> },
    /// Nothing appended: the log already holds every spool id up to this one.
    AlreadyIn(u64),
}

/// A drain transaction and the entries it writes.
struct DrainTxn {
    req: TxnRequest,
    built: Vec<PurgeEntry>,
}

/// "`key` holds this big-endian number", or "does not exist" for 0.
fn guard_u64(key: &[u8], value: u64) -> etcd::etcdserverpb::Compare {
    if value == 0 {
        op::created_at(key, 0)
    } else {
        op::value_is(key, &value.to_be_bytes())
    }
}

/// The drain transaction for spooled `entries` after `head`, with the spool mark at
/// `drained`: *if* both still hold, put the entries at `head + 1 ..`, the new head and
/// the new mark (the last spool id); else read both.
fn drain_txn(
    head_key: &[u8],
    mark_key: &[u8],
    entry_key: impl Fn(u64) -> Vec<u8>,
    entries: &[PurgeEntry],
    head: u64,
    drained: u64,
) -> Result<DrainTxn, LogError> {
    let mut ops = Vec::with_capacity(entries.len() + 2);
    let mut built = Vec::with_capacity(entries.len());
    let mut buf = Vec::with_capacity(256);
    for (k, spooled) in entries.iter().enumerate() {
        let entry = PurgeEntry {
            seq: head + 1 + k as u64,
            first_seq: 0,
            ..spooled.clone()
        };
        buf.clear();
        entry
            .encode(&mut buf)
            .map_err(|e| LogError::Storage(e.to_string()))?;
        ops.push(op::put(&entry_key(entry.seq), &buf));
        built.push(entry);
    }
    let last_id = entries.last().map_or(drained, |e| e.seq);
    ops.push(op::put(
        head_key,
        &(head + entries.len() as u64).to_be_bytes(),
    ));
    ops.push(op::put(mark_key, &last_id.to_be_bytes()));
    Ok(DrainTxn {
        req: TxnRequest {
            compare: vec![guard_u64(head_key, head), guard_u64(mark_key, drained)],
            success: ops,
            failure: vec![op::get(head_key), op::get(mark_key)],
        },
        built,
    })
}

/// The value the `i`th read of the branch a transaction took found.
fn branch_value(resp: &TxnResponse, i: usize) -> Option<Vec<u8>> {
    use etcd::etcdserverpb::response_op::Response;
    match resp.responses.get(i)?.response.as_ref()? {
        Response::ResponseRange(r) => r.kvs.first().map(|kv| kv.value.clone()),
        _ => None,
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
/// [`super::PurgeLog`] handle reads and where it queues appends.
pub(super) async fn start(
    log: EtcdLog,
    retention: Retention,
    trim: watch::Receiver<bool>,
    spool: SpoolOpts,
    stats: Arc<SpoolStats>,
) -> Result<(Arc<Tail>, mpsc::Sender<AppendReq>), LogError> {
    let mark_key = log.spool_mark_key(&spool.coordinator_id);
    let drained = log.spool_mark(&mark_key).await?;
    let mut file =
        Spool::open(&spool.dir, spool.max_bytes).map_err(|e| LogError::Spool(e.to_string()))?;
    file.skip_drained(drained);
    if !file.is_empty() {
        tracing::warn!(
            entries = file.depth(),
            drained,
            "purges spooled before this start wait for the shared log; draining"
        );
    }
    stats.depth.store(file.depth(), Ordering::Release);
    let side = Arc::new(SpoolSide {
        spool: std::sync::Mutex::new(file),
        stats,
        health: spool.health,
        after: spool.after,
        mark_key,
        mark: drained.into(),
        wake: Notify::new(),
    });
    let head = log.head().await?;
    let first = log.first().await?.unwrap_or(head + 1);
    let from = first.max((head + 1).saturating_sub(START_TAIL));
    let mut entries = VecDeque::new();
    let mut next = from;
    while next <= head {
        let batch = log.read_from(next, 1000).await?;
        let Some(last) = batch.last().map(|e| e.seq) else {
            break;
        };
        for e in batch.into_iter().filter(|e| e.seq <= head) {
            if entries
                .back()
                .is_some_and(|b: &Arc<PurgeEntry>| b.seq + 1 != e.seq)
            {
                entries.clear();
            }
            entries.push_back(Arc::new(e));
        }
        next = last + 1;
    }
    let first = entries
        .front()
        .map(|e| e.seq)
        .unwrap_or(head + 1)
        .min(first.max(1));
    let tail = Tail::new(head, first, entries);
    let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
    tokio::spawn(write_loop(log.clone(), tail.clone(), rx, side.clone()));
    tokio::spawn(drain_loop(log.clone(), tail.clone(), side));
    tokio::spawn(follow_loop(log.clone(), tail.clone(), head + 1));
    tokio::spawn(retention_loop(log, tail.clone(), retention, trim));
    Ok((tail, queue))
}

/// What the writer and the drain share: the spool and how to reach it.
struct SpoolSide {
    /// Locked only inside `spawn_blocking` (a write holds it through its fsync).
    spool: std::sync::Mutex<Spool>,
    stats: Arc<SpoolStats>,
    health: StoreHealth,
    after: Duration,
    mark_key: Vec<u8>,
    /// The highest spool id the log holds, as this coordinator last learnt (what its next
    /// transaction compares `log/spool/<id>` with).
    mark: std::sync::atomic::AtomicU64,
    /// Wakes the drain when something is spooled.
    wake: Notify,
}

impl SpoolSide {
    /// Runs `f` on the spool on a blocking thread (file I/O and fsync).
    async fn with<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Spool) -> T + Send + 'static,
    ) -> Result<T, LogError> {
        let side = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut spool = side.spool.locked();
            let out = f(&mut spool);
            side.stats.depth.store(spool.depth(), Ordering::Release);
            out
        })
        .await
        .map_err(|e| LogError::Spool(format!("purge spool: {e}")))
    }
}

/// Group commit: every append queued while the previous transaction ran goes into the
/// next one, or into the spool (see the module docs). Ends when every
/// [`super::PurgeLog`] handle is dropped.
async fn write_loop(
    log: EtcdLog,
    tail: Arc<Tail>,
    mut rx: mpsc::Receiver<AppendReq>,
    side: Arc<SpoolSide>,
) {
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
        let purges: usize = appends.iter().map(|a| a.purges.len()).sum();
        // Spool ids first, even for purges etcd commits at once: a transaction that times
        // out may still commit later (a member without quorum kept the proposal), and the
        // mark it moves then tells the drain that these ids are in already.
        let built = side
            .with(move |spool| {
                let groups: Vec<(u64, &[NewPurge])> = appends
                    .iter()
                    .map(|a| (a.received_at_us, a.purges.as_slice()))
                    .collect();
                spool.entries(&groups)
            })
            .await;
        let (entries, ids) = match built {
            Ok(built) => built,
            Err(e) => {
                for req in batch {
                    let _ = req.reply.send(Err(e.clone()));
                }
                continue;
            }
        };
        let spooling = side.stats.depth.load(Ordering::Acquire) > 0;
        let known_down = side.health.reachable() == Some(false);
        if !spooling && !known_down {
            let guess = written.max(tail.head());
            let deadline = tokio::time::Instant::now() + side.after;
            match direct(&log, &side, &entries, guess, deadline).await {
                Ok(committed) => {
                    side.health.succeeded();
                    let first_id = entries.first().map_or(0, |e| e.seq);
                    let seq_of = |id: u64| {
                        committed
                            .get((id - first_id) as usize)
                            .map_or(0, |e: &PurgeEntry| e.seq)
                    };
                    written = committed.last().map_or(written, |e| e.seq).max(written);
                    for (req, id) in batch.into_iter().zip(ids) {
                        let _ = req.reply.send(Ok(Appended::Logged(seq_of(id))));
                    }
                    // This coordinator's sessions need not wait for the watch to bring
                    // back what it just wrote, if nothing from elsewhere comes before it
                    // (else the watch delivers it all, in order).
                    if tail.extend_next(committed.into_iter().map(Arc::new)) {
                        tail.publish();
                    }
                    continue;
                }
                Err(e) => {
                    side.health.failed(&e.to_string());
                    tracing::warn!(error = %e, purges, after_ms = side.after.as_millis() as u64,
                        "etcd did not commit the purges in time; spooling them locally until it does");
                }
            }
        } else if !spooling {
            tracing::warn!(
                purges,
                "etcd is unreachable; spooling purges locally until it answers"
            );
        }
        let spooled = side.with(move |spool| spool.write(entries)).await;
        match spooled {
            Ok(Ok(())) => {
                side.stats
                    .spooled
                    .fetch_add(purges as u64, Ordering::Relaxed);
                side.wake.notify_one();
                for (req, id) in batch.into_iter().zip(ids) {
                    let _ = req.reply.send(Ok(Appended::Spooled(id)));
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, purges, "purges neither committed in etcd nor spooled; answered 503");
                let e = LogError::Spool(e.to_string());
                for req in batch {
                    let _ = req.reply.send(Err(e.clone()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, purges, "purge spool writer failed; answered 503");
                for req in batch {
                    let _ = req.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Commits fresh `entries` (spool ids in `seq`) straight to the log, as the drain does
/// (guarded on the head and the mark, moving both), [`MAX_TXN_ENTRIES`] per
/// transaction, until `deadline`; the entries as logged. On an error some chunks may be
/// in: the mark says which, and the drain skips them.
async fn direct(
    log: &EtcdLog,
    side: &SpoolSide,
    entries: &[PurgeEntry],
    mut head: u64,
    deadline: tokio::time::Instant,
) -> Result<Vec<PurgeEntry>, LogError> {
    let mut committed = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(MAX_TXN_ENTRIES) {
        let mark = side.mark.load(Ordering::Acquire);
        match log
            .drain(&side.mark_key, chunk, head, mark, deadline)
            .await?
        {
            Drained::Committed { upto, entries } => {
                side.mark.fetch_max(upto, Ordering::AcqRel);
                head = entries.last().map_or(head, |e| e.seq);
                committed.extend(entries);
            }
            Drained::AlreadyIn(m) => {
                side.mark.fetch_max(m, Ordering::AcqRel);
                return Err(LogError::Storage(
                    "etcd: this coordinator's spool mark moved; spooling to sort it out".into(),
                ));
            }
        }
    }
    Ok(committed)
}

/// Appends the spool to the shared log whenever it holds entries and etcd takes
/// writes, in order and exactly once (see [`EtcdLog::drain`]).
async fn drain_loop(log: EtcdLog, tail: Arc<Tail>, side: Arc<SpoolSide>) {
    let weak = Arc::downgrade(&tail);
    drop(tail);
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    loop {
        if side.stats.depth.load(Ordering::Acquire) == 0 {
            tokio::select! {
                _ = side.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if weak.strong_count() == 0 {
                return;
            }
            continue;
        }
        let Some(tail) = weak.upgrade() else {
            return;
        };
        let drained = side.mark.load(Ordering::Acquire);
        // What the mark covers is in already (a late commit, a chunk of a direct append).
        let chunk = match side
            .with(move |s| (s.skip_drained(drained), s.pending(MAX_TXN_ENTRIES)))
            .await
        {
            Ok((skipped, chunk)) => {
                // In the log already, by the attempt that preceded the spool.
                side.stats.drained.fetch_add(skipped, Ordering::Relaxed);
                if chunk.is_empty() {
                    continue;
                }
                chunk
            }
            Err(e) => {
                tracing::error!(error = %e, "purge spool unreadable");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Received, for the log's readers, when it reaches the shared log: an edge's purge
        // lag (and its region's health) measures the edge, not etcd's outage.
        let now = now_us();
        let chunk: Vec<PurgeEntry> = chunk
            .into_iter()
            .map(|e| PurgeEntry {
                received_at_us: e.received_at_us.max(now),
                ..e
            })
            .collect();
        let head = tail.head();
        let deadline = tokio::time::Instant::now() + DRAIN_ATTEMPT;
        let outcome = log
            .drain(&side.mark_key, &chunk, head, drained, deadline)
            .await;
        let upto = match outcome {
            Ok(Drained::Committed { upto, entries }) => {
                side.stats
                    .drained
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                if tail.extend_next(entries.into_iter().map(Arc::new)) {
                    tail.publish();
                }
                upto
            }
            Ok(Drained::AlreadyIn(upto)) => upto,
            Err(e) => {
                side.health.failed(&e.to_string());
                if !failing {
                    tracing::info!(error = %e, depth = side.stats.depth.load(Ordering::Acquire),
                        "purge spool waits for etcd");
                    failing = true;
                }
                drop(tail);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        side.health.succeeded();
        failing = false;
        backoff = Duration::from_millis(100);
        // The mark first: the writer goes straight to etcd again once the depth is 0.
        side.mark.fetch_max(upto, Ordering::AcqRel);
        match side.with(move |s| s.drained(upto)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "purge spool not compacted (drained entries stay in the file until the next pass)")
            }
            Err(e) => tracing::warn!(error = %e, "purge spool not updated"),
        }
        if side.stats.depth.load(Ordering::Acquire) == 0 {
            tracing::info!(mark = upto, "purge spool drained into the shared log");
        }
    }
}

// Following the log: the entries every coordinator commits, from a listing and then
// etcd's watch (`EtcdLog::follow`), fed into this coordinator's tail (`follow_loop`).

impl EtcdLog {
    /// Every entry from `from` on, in order and exactly once, as they are committed by
    /// any coordinator: an [`etcd::ListWatch`] of the entry keys from `from` (the
    /// existing ones listed, then watched from the listing's revision; listed again
    /// from the next expected key when etcd cancels the watch or a member is lost). An
    /// entry that is gone by then (retention), or one that cannot be decoded, shows as a
    /// jump in `seq`, which the reader treats as it treats a trimmed log (a full ban),
    /// never as a silent gap. The stream ends when the receiver is dropped.
    pub fn follow(&self, from: u64) -> mpsc::Receiver<PurgeEntry> {
        self.follow_at(from, None)
    }

    /// [`Self::follow`], with the first watch started at `revision` instead of after a
    /// listing (to exercise the compacted-watch path).
    #[doc(hidden)]
    pub fn follow_at(&self, from: u64, revision: Option<i64>) -> mpsc::Receiver<PurgeEntry> {
        let (tx, rx) = mpsc::channel(1024);
        let first = from.max(1);
        let prefix = self.key(b"log/e/");
        let mut lw =
            etcd::ListWatch::range(&self.etcd, self.entry_key(first), etcd::prefix_end(&prefix))
                .named("purge log")
                .resume_after_last_key();
        if let Some(r) = revision {
            lw = lw.start_at(r);
        }
        tokio::spawn(async move {
            let mut watching = lw.spawn();
            let mut next = first;
            loop {
                let kvs = tokio::select! {
                    _ = tx.closed() => return,
                    u = watching.next() => match u {
                        Some(etcd::Update::Listed { kvs, .. }) => kvs,
                        Some(etcd::Update::Events { events, .. }) => events
                            .into_iter()
                            .filter_map(|ev| ev.kv)
                            .filter(|kv| !kv.value.is_empty()) // a delete (retention)
                            .collect(),
                        None => return,
                    },
                };
                for kv in kvs {
                    let entry = match PurgeEntry::decode(kv.value.as_slice()) {
                        Ok(entry) => entry,
                        Err(e) => {
                            tracing::error!(key = %String::from_utf8_lossy(&kv.key), error = %e, "corrupt purge log entry in etcd; skipped (readers see a gap)");
                            continue;
                        }
                    };
                    if entry.seq < next {
                        continue; // delivered already (a re-list overlapping the watch)
                    }
                    next = entry.seq + 1;
                    if tx.send(entry).await.is_err() {
                        return;
                    }
                }
            }
        });
        rx
    }
}

/// Feeds the tail and the head from etcd's watch, for as long as the log is open.
async fn follow_loop(log: EtcdLog, tail: Arc<Tail>, from: u64) {
    let mut rx = log.follow(from);
    let weak = Arc::downgrade(&tail);
    drop(tail);
    while let Some(e) = rx.recv().await {
        let Some(tail) = weak.upgrade() else {
            return;
        };
        let mut batch = vec![Arc::new(e)];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(e) => batch.push(Arc::new(e)),
                Err(_) => break,
            }
        }
        tail.extend(batch);
        tail.publish();
    }
}

/// Every few seconds: learn the first stored entry (another coordinator may have
/// trimmed), and, on the leader, apply retention.
async fn retention_loop(
    log: EtcdLog,
    tail: Arc<Tail>,
    retention: Retention,
    trim: watch::Receiver<bool>,
) {
    let weak = Arc::downgrade(&tail);
    drop(tail);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(tail) = weak.upgrade() else {
            return;
        };
        let head = tail.head();
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
            tail.trim(first.unwrap_or(head + 1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd::etcdserverpb::{
        compare, request_op, response_op, Compare, RangeResponse, RequestOp, ResponseOp,
    };
    use proto::edge::{purge_entry::Op, TagSet};
    use std::collections::BTreeMap;

    /// A store that evaluates the transactions as etcd does (the compares used here).
    #[derive(Default)]
    struct Kv(BTreeMap<Vec<u8>, Vec<u8>>);

    impl Kv {
        fn holds(&self, c: &Compare) -> bool {
            let got = self.0.get(&c.key);
            match (c.target, &c.target_union) {
                (t, Some(compare::TargetUnion::CreateRevision(0)))
                    if t == compare::CompareTarget::Create as i32 =>
                {
                    got.is_none()
                }
                (_, Some(compare::TargetUnion::Value(v))) => got == Some(v),
                _ => unreachable!("compare not used here"),
            }
        }

        fn txn(&mut self, req: &TxnRequest) -> TxnResponse {
            let succeeded = req.compare.iter().all(|c| self.holds(c));
            let ops = if succeeded {
                &req.success
            } else {
                &req.failure
            };
            let responses = ops.iter().map(|o| self.apply(o)).collect();
            TxnResponse {
                succeeded,
                responses,
                ..Default::default()
            }
        }

        fn apply(&mut self, o: &RequestOp) -> ResponseOp {
            match o.request.as_ref().unwrap() {
                request_op::Request::RequestPut(p) => {
                    self.0.insert(p.key.clone(), p.value.clone());
                    ResponseOp::default()
                }
                request_op::Request::RequestRange(r) => {
                    let kvs = self
                        .0
                        .get(&r.key)
                        .map(|v| etcd::mvccpb::KeyValue {
                            key: r.key.clone(),
                            value: v.clone(),
                            ..Default::default()
                        })
                        .into_iter()
                        .collect();
                    ResponseOp {
                        response: Some(response_op::Response::ResponseRange(RangeResponse {
                            kvs,
                            ..Default::default()
                        })),
                    }
                }
                _ => unreachable!(),
            }
        }

        fn u64(&self, key: &[u8]) -> u64 {
            self.0.get(key).map_or(0, |v| decode_head(v).unwrap())
        }

        /// The spool ids the log holds, in sequence order (the entries' tags).
        fn logged(&self) -> Vec<String> {
            self.0
                .iter()
                .filter(|(k, _)| k.starts_with(b"e/"))
                .map(
                    |(_, v)| match PurgeEntry::decode(v.as_slice()).unwrap().op {
                        Some(Op::Tags(t)) => t.tags[0].clone(),
                        _ => unreachable!(),
                    },
                )
                .collect()
        }
    }

    fn spooled(ids: std::ops::RangeInclusive<u64>) -> Vec<PurgeEntry> {
        ids.map(|id| PurgeEntry {
            seq: id,
            received_at_us: 7,
            op: Some(Op::Tags(TagSet {
                tags: vec![format!("s{id}")],
            })),
            ..Default::default()
        })
        .collect()
    }

    fn ek(seq: u64) -> Vec<u8> {
        format!("e/{seq:020}").into_bytes()
    }

    /// One drain step as `EtcdLog::drain` takes it, against the in-memory store.
    fn step(kv: &mut Kv, entries: &[PurgeEntry], head: u64, drained: u64) -> TxnResponse {
        let t = drain_txn(b"head", b"mark", ek, entries, head, drained).unwrap();
        kv.txn(&t.req)
    }

    #[test]
    fn a_drain_appends_after_the_head_and_moves_the_mark_in_the_same_txn() {
        let mut kv = Kv::default();
        // Another coordinator's entry 1 is there already.
        kv.0.insert(b"head".to_vec(), 1u64.to_be_bytes().to_vec());
        let t = drain_txn(b"head", b"mark", ek, &spooled(1..=3), 1, 0).unwrap();
        assert_eq!(
            t.built.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert!(t.built.iter().all(|e| e.received_at_us == 7));
        assert!(kv.txn(&t.req).succeeded);
        assert_eq!((kv.u64(b"head"), kv.u64(b"mark")), (4, 3));
        assert_eq!(kv.logged(), vec!["s1", "s2", "s3"]);
    }

    #[test]
    fn a_drain_whose_answer_was_lost_or_cut_short_by_a_crash_appends_nothing_twice() {
        let mut kv = Kv::default();
        // First chunk commits; its answer is lost, so the drainer still thinks 0.
        assert!(step(&mut kv, &spooled(1..=2), 0, 0).succeeded);
        // The retry (same head guess, same mark) fails and reads the mark: already in.
        let r = step(&mut kv, &spooled(1..=2), 0, 0);
        assert!(!r.succeeded);
        let mark = decode_head(&branch_value(&r, 1).unwrap()).unwrap();
        assert_eq!(mark, 2);
        // After a restart the spool skips up to the mark and drains the rest, even
        // with a stale head guess: the failed compare reads the real head.
        let r = step(&mut kv, &spooled(3..=4), 0, 2);
        assert!(!r.succeeded);
        let head = decode_head(&branch_value(&r, 0).unwrap()).unwrap();
        assert_eq!(head, 2);
        assert!(step(&mut kv, &spooled(3..=4), head, 2).succeeded);
        // Another coordinator appends between two chunks: the next chunk goes after it.
        kv.0.insert(
            ek(5),
            PurgeEntry {
                seq: 5,
                op: Some(Op::Tags(TagSet {
                    tags: vec!["other".into()],
                })),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        kv.0.insert(b"head".to_vec(), 5u64.to_be_bytes().to_vec());
        let r = step(&mut kv, &spooled(5..=5), 4, 4);
        assert!(!r.succeeded);
        assert_eq!(branch_value(&r, 1), Some(4u64.to_be_bytes().to_vec()));
        assert!(step(&mut kv, &spooled(5..=5), 5, 4).succeeded);
        assert_eq!(kv.logged(), vec!["s1", "s2", "s3", "s4", "other", "s5"]);
        assert_eq!((kv.u64(b"head"), kv.u64(b"mark")), (6, 5));
    }
}
