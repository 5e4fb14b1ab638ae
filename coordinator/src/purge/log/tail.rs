//! The in-memory tail: what the log's readers see, whichever backend fills it.
//!
//! [`Tail`] holds the durable head (published on a `watch` channel the fan-out sessions
//! await), the oldest stored sequence, and the newest [`TAIL_ENTRIES`] entries, each
//! also encoded once as it appears in a `PurgeBatch`. The embedded writer thread and the
//! etcd tasks (writer, drain, follower, retention) move it on; readers never wait on a
//! backend for what it holds. It only ever holds consecutive entries: a gap (entries
//! trimmed before this reader saw them) empties it and moves `first` on.

use daemon::sync::Recover;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prost::bytes::Bytes;
use proto::edge::PurgeEntry;
use tokio::sync::watch;

/// The newest entries the tail keeps.
pub(super) const TAIL_ENTRIES: usize = 65_536;

/// The head, the oldest stored sequence and the newest entries.
pub(super) struct Tail {
    head_tx: watch::Sender<u64>,
    /// The newest durable sequence, set before the appenders are answered (the watch
    /// only wakes the sessions, after them).
    pub(super) durable: AtomicU64,
    /// Oldest sequence still stored (head + 1 when the log is empty).
    pub(super) first: AtomicU64,
    /// The newest entries, consecutive.
    entries: Mutex<Entries>,
}

/// The newest entries, each also encoded once as it appears in a `PurgeBatch`.
struct Entries {
    entries: VecDeque<Arc<PurgeEntry>>,
    wire: VecDeque<Bytes>,
}

impl Entries {
    fn new(entries: VecDeque<Arc<PurgeEntry>>) -> Entries {
        let wire = entries
            .iter()
            .map(|e| proto::codec::encode_entry(e).into())
            .collect();
        Entries { entries, wire }
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

impl Tail {
    pub(super) fn new(head: u64, first: u64, tail: VecDeque<Arc<PurgeEntry>>) -> Arc<Tail> {
        Arc::new(Tail {
            head_tx: watch::channel(head).0,
            durable: AtomicU64::new(head),
            first: AtomicU64::new(first),
            entries: Mutex::new(Entries::new(tail)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.locked()
    }

    /// The newest durable sequence.
    pub(super) fn head(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// The oldest sequence still stored.
    pub(super) fn first(&self) -> u64 {
        self.first.load(Ordering::Acquire)
    }

    /// A receiver that changes whenever the head is published.
    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.head_tx.subscribe()
    }

    /// Appends consecutive entries to the tail (dropping the oldest beyond its size) and
    /// moves the durable head; the sessions are woken by [`Self::publish`]. Entries the
    /// tail already holds are skipped (in a cluster, the writer's own entries come back
    /// through the watch).
    pub(super) fn extend(&self, entries: impl IntoIterator<Item = Arc<PurgeEntry>>) {
        let mut tail = self.lock();
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
        let mut tail = self.lock();
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
    fn settle(&self, mut tail: MutexGuard<'_, Entries>, last: Option<u64>) {
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
        let mut tail = self.lock();
        while tail.entries.front().is_some_and(|e| e.seq < first) {
            tail.pop_front();
        }
    }

    /// Up to `max` consecutive entries from `from` on, if the tail holds `from` (or
    /// anything before it).
    pub(super) fn read(&self, from: u64, max: usize) -> Option<Vec<Arc<PurgeEntry>>> {
        let tail = self.lock();
        let front = tail.entries.front()?;
        if front.seq > from {
            return None;
        }
        let skip = (from - front.seq) as usize;
        Some(tail.entries.iter().skip(skip).take(max).cloned().collect())
    }

    /// `f` over the entries `from..=last`, each with its encoding as a `PurgeBatch`
    /// entry, under the tail's lock; `None` unless the tail holds them all.
    pub(super) fn with_range<T>(
        &self,
        from: u64,
        last: u64,
        f: impl FnOnce(&mut dyn Iterator<Item = (&PurgeEntry, &Bytes)>) -> T,
    ) -> Option<T> {
        let tail = self.lock();
        let front = tail.entries.front()?.seq;
        let back = tail.entries.back()?.seq;
        if from < front || last > back || last < from {
            return None;
        }
        let skip = (from - front) as usize;
        let n = (last - from + 1) as usize;
        let entries = tail.entries.iter().skip(skip).take(n).map(|e| &**e);
        let wire = tail.wire.iter().skip(skip).take(n);
        Some(f(&mut entries.zip(wire)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::edge::{purge_entry::Op, TagSet};

    fn entry(seq: u64) -> Arc<PurgeEntry> {
        Arc::new(PurgeEntry {
            seq,
            op: Some(Op::Tags(TagSet {
                tags: vec![format!("t{seq}")],
            })),
            ..Default::default()
        })
    }

    fn tail_seqs(tail: &Tail) -> Vec<u64> {
        tail.lock().entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn the_tail_takes_a_writers_own_entries_only_where_they_follow() {
        let tail = Tail::new(10, 9, [9, 10].into_iter().map(entry).collect());
        // The writer's entries 11-12 follow: taken.
        assert!(tail.extend_next((11..=12).map(entry)));
        assert_eq!(tail.head(), 12);
        // The watch brings them back with 13 from another coordinator: 13 only.
        tail.extend((11..=13).map(entry));
        assert_eq!(tail_seqs(&tail), vec![9, 10, 11, 12, 13]);
        // Entries after a gap (15 while 14 is not yet here) wait for the watch.
        assert!(!tail.extend_next((15..=16).map(entry)));
        assert_eq!(tail.head(), 13);
        // Two chunks with another coordinator's entries between them: the first only.
        assert!(tail.extend_next([14, 15, 30].into_iter().map(entry)));
        assert_eq!(tail_seqs(&tail), vec![9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(tail.head(), 15);
    }
}
