//! List-then-watch: a key range as it is now, then every change to it, in order, for as
//! long as the caller listens.
//!
//! [`ListWatch`] lists the range (in pages, every page read at the first page's
//! revision, so the listing is one consistent snapshot), then watches it from that
//! revision + 1, so no change between the listing and the watch is missed and none is
//! seen twice. When the watch breaks (a member lost, the stream closed) or etcd cancels
//! it (the revision it needs was compacted away), it lists again and watches again,
//! after a backoff (100 ms doubling to 2 s, back to 100 ms once an update got through).
//! Nothing here gives up: etcd being down is waited out.
//!
//! What the caller receives ([`Update`]) is a listing, page by page (`first` opens one,
//! `last` closes it), then watch responses, each in revision order; after a re-list a
//! new listing opens again. A caller that keeps a copy of the range starts it afresh on
//! `first`; one that wants the latest value of a key just takes each in turn. For an
//! append-only log whose keys grow with each write ([`ListWatch::resume_after_last_key`]),
//! a re-list starts after the last key delivered instead of at the range's start, so a
//! long log is not listed again from its beginning.
//!
//! Cancellation is dropping the [`Watching`]: the task behind it notices at once (even
//! while it waits on etcd or sleeps its backoff) and ends.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::etcdserverpb::{watch_request, RangeRequest, WatchCreateRequest, WatchRequest};
use crate::mvccpb::{Event, KeyValue};
use crate::Etcd;

/// The first retry waits this long; each failure in a row doubles it up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Keys per listing page unless [`ListWatch::page`] says otherwise.
pub const PAGE: i64 = 1000;

/// What a [`Watching`] delivers, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// One page of a listing of the range at `revision`, in key order. `first` opens a
    /// listing (the first one, or a re-list after a broken or compacted watch); `last`
    /// closes it, and [`Update::Events`] from `revision + 1` follow.
    Listed {
        revision: i64,
        kvs: Vec<KeyValue>,
        first: bool,
        last: bool,
    },
    /// One watch response's changes (puts and deletes), in revision order; `revision`
    /// is etcd's at that response.
    Events { revision: i64, events: Vec<Event> },
}

/// Why one attempt ended (it is retried; the caller sees it only in the logs).
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("etcd: {0}")]
    Status(#[from] tonic::Status),
    #[error("watch stream closed")]
    Closed,
    #[error("watch cancelled by etcd (compacted at revision {0})")]
    Cancelled(i64),
}

/// A list-then-watch of a key range, to [`spawn`](Self::spawn).
#[derive(Debug, Clone)]
pub struct ListWatch {
    etcd: Etcd,
    key: Vec<u8>,
    range_end: Vec<u8>,
    page: i64,
    after_last_key: bool,
    start_revision: Option<i64>,
    name: &'static str,
}

impl ListWatch {
    /// The single key `key`.
    pub fn key(etcd: &Etcd, key: Vec<u8>) -> Self {
        Self::range(etcd, key, Vec::new())
    }

    /// Every key starting with `prefix`.
    pub fn prefix(etcd: &Etcd, prefix: Vec<u8>) -> Self {
        let end = crate::prefix_end(&prefix);
        Self::range(etcd, prefix, end)
    }

    /// Keys from `key` up to (not including) `range_end` (empty: `key` alone).
    pub fn range(etcd: &Etcd, key: Vec<u8>, range_end: Vec<u8>) -> Self {
        ListWatch {
            etcd: etcd.clone(),
            key,
            range_end,
            page: PAGE,
            after_last_key: false,
            start_revision: None,
            name: "etcd watch",
        }
    }

    /// Names the watch in the logs.
    pub fn named(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// Keys per listing page (at least 1).
    pub fn page(mut self, keys: i64) -> Self {
        self.page = keys.max(1);
        self
    }

    /// The range is an append-only log whose keys grow with every write: a re-list
    /// starts just after the last key delivered (by a listing or an event).
    pub fn resume_after_last_key(mut self) -> Self {
        self.after_last_key = true;
        self
    }

    /// Skips the first listing and watches from `revision` (a test's way to start on a
    /// compacted revision; a caller that already read the range at `revision - 1`).
    pub fn start_at(mut self, revision: i64) -> Self {
        self.start_revision = Some(revision);
        self
    }

    /// Starts listing and watching in a task; drop the [`Watching`] to stop it.
    pub fn spawn(self) -> Watching {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(self.run(tx));
        Watching { rx }
    }

    async fn run(mut self, tx: mpsc::Sender<Update>) {
        let mut backoff = MIN_BACKOFF;
        let mut start_rev = self.start_revision.take();
        while !tx.is_closed() {
            let mut progressed = false;
            let outcome = tokio::select! {
                _ = tx.closed() => return,
                r = self.once(start_rev.take(), &tx, &mut progressed) => r,
            };
            let Err(why) = outcome else {
                return; // the receiver is gone
            };
            if progressed {
                backoff = MIN_BACKOFF;
            }
            if backoff == MIN_BACKOFF {
                tracing::warn!(watch = self.name, error = %why, "etcd watch ended; listing again");
            } else {
                tracing::debug!(watch = self.name, error = %why, ?backoff, "etcd watch ended again");
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One listing (unless a start revision is given) and one watch. `Ok` only when the
    /// receiver is gone; `progressed` says whether anything was delivered.
    async fn once(
        &mut self,
        start_rev: Option<i64>,
        tx: &mpsc::Sender<Update>,
        progressed: &mut bool,
    ) -> Result<(), Broken> {
        let watch_from = match start_rev {
            Some(r) => r,
            None => match self.list(tx, progressed).await? {
                Some(revision) => revision + 1,
                None => return Ok(()),
            },
        };
        let (req_tx, req_rx) = mpsc::channel(1);
        let _ = req_tx
            .send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(
                    WatchCreateRequest {
                        key: self.key.clone(),
                        range_end: self.range_end.clone(),
                        start_revision: watch_from,
                        ..Default::default()
                    },
                )),
            })
            .await;
        // `req_tx` stays alive with the stream: dropping it would close the watch.
        let mut stream = self
            .etcd
            .watch()
            .watch(tokio_stream::wrappers::ReceiverStream::new(req_rx))
            .await?
            .into_inner();
        loop {
            let Some(resp) = stream.message().await? else {
                return Err(Broken::Closed);
            };
            if resp.compact_revision > 0 || resp.canceled {
                return Err(Broken::Cancelled(resp.compact_revision));
            }
            if resp.events.is_empty() {
                continue; // the watch's creation, or a progress notice
            }
            if self.after_last_key {
                // A put of a later key moves the resume point; a delete (retention
                // trimming the log's start) does not.
                let put = crate::mvccpb::event::EventType::Put as i32;
                let newest = resp
                    .events
                    .iter()
                    .filter(|e| e.r#type == put)
                    .filter_map(|e| e.kv.as_ref())
                    .map(|kv| after(&kv.key))
                    .max();
                if let Some(k) = newest.filter(|k| *k > self.key) {
                    self.key = k;
                }
            }
            let revision = resp.header.map_or(0, |h| h.revision);
            let update = Update::Events {
                revision,
                events: resp.events,
            };
            if tx.send(update).await.is_err() {
                return Ok(());
            }
            *progressed = true;
        }
    }

    /// Lists the range page by page at one revision; `None` when the receiver is gone.
    async fn list(
        &mut self,
        tx: &mpsc::Sender<Update>,
        progressed: &mut bool,
    ) -> Result<Option<i64>, Broken> {
        let mut from = self.key.clone();
        let mut revision = 0;
        let mut first = true;
        loop {
            let resp = self
                .etcd
                .range(RangeRequest {
                    key: from.clone(),
                    range_end: self.range_end.clone(),
                    limit: self.page,
                    revision,
                    ..Default::default()
                })
                .await?;
            if first {
                revision = resp.header.as_ref().map_or(0, |h| h.revision);
            }
            let last = !resp.more || self.range_end.is_empty();
            if let Some(kv) = resp.kvs.last() {
                from = after(&kv.key);
                if self.after_last_key {
                    self.key = from.clone();
                }
            }
            let update = Update::Listed {
                revision,
                kvs: resp.kvs,
                first,
                last,
            };
            if tx.send(update).await.is_err() {
                return Ok(None);
            }
            *progressed = true;
            first = false;
            if last {
                return Ok(Some(revision));
            }
        }
    }
}

/// The first key after `key` (a page or a re-list resumes there).
fn after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

/// A running [`ListWatch`]; dropping it stops the watch.
#[derive(Debug)]
pub struct Watching {
    rx: mpsc::Receiver<Update>,
}

impl Watching {
    /// The next update; waits while etcd is unreachable (the task retries meanwhile).
    pub async fn next(&mut self) -> Option<Update> {
        self.rx.recv().await
    }

    /// The next update if one is ready now.
    pub fn try_next(&mut self) -> Option<Update> {
        self.rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_next_key_sorts_right_after() {
        let next = super::after(b"log/e/00000041");
        assert!(next.as_slice() > b"log/e/00000041".as_slice());
        assert!(next.as_slice() < b"log/e/00000042".as_slice());
    }
}
