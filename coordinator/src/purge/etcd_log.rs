//! The purge log in etcd, for several coordinators sharing one log (issue 15; not yet
//! wired into `serve`, which runs the embedded [`super::log::PurgeLog`]).
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
//! when a purge may be answered 200. A retried transaction whose first attempt did
//! commit fails its compare (the head moved), so a retry never writes an entry twice.

use std::time::Duration;

use etcd::etcdserverpb::{
    compare, kv_client::KvClient, request_op, watch_request, Compare, PutRequest, RangeRequest,
    RangeResponse, RequestOp, TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest,
};
use etcd::Etcd;
use prost::Message;
use proto::edge::PurgeEntry;
use tokio::sync::mpsc;

use super::log::{LogError, NewPurge};

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
        // Create the id only if absent (create_revision == 0), else read the stored one.
        let create = TxnRequest {
            compare: vec![absent(&id_key)],
            success: vec![put(&id_key, fresh.as_bytes())],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: id_key.clone(),
                    ..Default::default()
                })),
            }],
        };
        let resp = txn(&etcd, create).await?;
        let log_id = if resp.succeeded {
            fresh
        } else {
            resp.responses
                .into_iter()
                .find_map(|r| match r.response {
                    Some(etcd::etcdserverpb::response_op::Response::ResponseRange(r)) => {
                        r.kvs.into_iter().next()
                    }
                    _ => None,
                })
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                .ok_or_else(|| LogError::Storage("etcd: log id vanished".into()))?
        };
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
        Ok(range(&self.etcd, req)
            .await?
            .kvs
            .first()
            .and_then(|kv| <[u8; 8]>::try_from(kv.value.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Appends the batch as consecutive entries in one transaction per
    /// [`MAX_TXN_ENTRIES`] (retrying on a moved head) and returns each appender's last
    /// sequence, in order. `Ok` means committed in etcd; `Err` means nothing of the
    /// failed chunk was (and no later chunk was tried).
    pub async fn append(&self, batch: &[Append], mut head: u64) -> Result<Vec<u64>, LogError> {
        let head_key = self.key(b"log/head");
        let mut entries: Vec<(usize, u64, &NewPurge)> = Vec::new();
        for (i, a) in batch.iter().enumerate() {
            for p in &a.purges {
                entries.push((i, a.received_at_us, p));
            }
        }
        let mut last = vec![0u64; batch.len()];
        for chunk in entries.chunks(MAX_TXN_ENTRIES) {
            loop {
                let mut ops = Vec::with_capacity(chunk.len() + 1);
                let mut buf = Vec::with_capacity(256);
                for (k, (_, at, p)) in chunk.iter().enumerate() {
                    let seq = head + 1 + k as u64;
                    let entry = PurgeEntry {
                        seq,
                        received_at_us: *at,
                        op: Some(p.op.clone()),
                        soft: p.soft,
                    };
                    buf.clear();
                    entry
                        .encode(&mut buf)
                        .map_err(|e| LogError::Storage(e.to_string()))?;
                    ops.push(put(&self.entry_key(seq), &buf));
                }
                let new_head = head + chunk.len() as u64;
                ops.push(put(&head_key, &new_head.to_be_bytes()));
                let guard = if head == 0 {
                    absent(&head_key)
                } else {
                    Compare {
                        result: compare::CompareResult::Equal as i32,
                        target: compare::CompareTarget::Value as i32,
                        key: head_key.clone(),
                        target_union: Some(compare::TargetUnion::Value(
                            head.to_be_bytes().to_vec(),
                        )),
                        ..Default::default()
                    }
                };
                let req = TxnRequest {
                    compare: vec![guard],
                    success: ops,
                    failure: vec![],
                };
                let resp = tokio::time::timeout(Duration::from_secs(10), txn(&self.etcd, req))
                    .await
                    .map_err(|_| LogError::Storage("etcd: append timed out".into()))??;
                if resp.succeeded {
                    for (k, (i, _, _)) in chunk.iter().enumerate() {
                        last[*i] = head + 1 + k as u64;
                    }
                    head = new_head;
                    break;
                }
                // Another coordinator appended first: go after it.
                head = self.head().await?;
            }
        }
        Ok(last)
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
            while !tx.is_closed() {
                match log.follow_once(&mut next, start_rev.take(), &tx).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, next, "purge log watch ended; re-listing");
                        tokio::time::sleep(Duration::from_millis(200)).await;
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

/// A range read, moving to another member when one is unavailable.
async fn range(etcd: &Etcd, req: RangeRequest) -> Result<RangeResponse, LogError> {
    Ok(etcd
        .retry(|ch| {
            let req = req.clone();
            async move { KvClient::new(ch).range(req).await }
        })
        .await
        .map_err(unavailable)?
        .into_inner())
}

/// A transaction, moving to another member when one is unavailable (safe to repeat:
/// every txn here is guarded by a compare that a committed first attempt falsifies).
async fn txn(etcd: &Etcd, req: TxnRequest) -> Result<TxnResponse, LogError> {
    Ok(etcd
        .retry(|ch| {
            let req = req.clone();
            async move { KvClient::new(ch).txn(req).await }
        })
        .await
        .map_err(unavailable)?
        .into_inner())
}

/// "`key` does not exist" (its create revision is 0).
fn absent(key: &[u8]) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(0)),
        ..Default::default()
    }
}

fn put(key: &[u8], value: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            ..Default::default()
        })),
    }
}
