//! The encoded-batch cache: the last few purge batches encoded for sessions, keyed by
//! the range they hold, so that sessions at the same cursor share one buffer.
//!
//! A fleet in sync asks the log for the same entries (every session at the head, and in
//! a storm on the pacer's shared ticks, up to the same head). [`Batches::read`] encodes
//! such a batch once, from the per-entry encodings the log's tail keeps
//! (`PurgeLog::with_tail_range`), with runs of tag purges merged for agents that take
//! range entries (`super::ranges`); every session then writes the same bytes
//! (`PurgeBatch::encoded`, written as-is by `proto::codec`).

use daemon::sync::Recover;
use std::collections::VecDeque;
use std::sync::Mutex;

use prost::bytes::Bytes;

use super::ranges::encode_batch;
use crate::purge::log::PurgeLog;

/// Encoded batches kept for sharing: the fleet's cursor, and a few stragglers'.
const KEPT: usize = 8;

/// An encoded batch and its `(from, last, ranges)`.
type Keyed = ((u64, u64, bool), Bytes);

/// The last [`KEPT`] batches encoded for sessions.
#[derive(Debug)]
pub struct Batches {
    cached: Mutex<VecDeque<Keyed>>,
}

impl Default for Batches {
    fn default() -> Self {
        Batches {
            cached: Mutex::new(VecDeque::with_capacity(KEPT)),
        }
    }
}

impl Batches {
    /// `log`'s entries `from..=up_to` (at most `max` of them), already encoded for a
    /// `PurgeBatch` (`PurgeBatch::encoded`), with runs of tag purges as range entries if
    /// `ranges`, and the last sequence among them: `None` unless the log's tail holds
    /// `from`. Sessions asking for the same range share one buffer.
    pub fn read(
        &self,
        log: &PurgeLog,
        from: u64,
        up_to: u64,
        max: usize,
        ranges: bool,
    ) -> Option<(u64, Bytes)> {
        let want = up_to
            .min(log.head())
            .min(from.saturating_add(max.max(1) as u64 - 1));
        if want < from {
            return None;
        }
        let key = (from, want, ranges);
        {
            let cached = self.cached.locked();
            if let Some((_, bytes)) = cached.iter().find(|(k, _)| *k == key) {
                return Some((want, bytes.clone()));
            }
        }
        let bytes =
            Bytes::from(log.with_tail_range(from, want, |entries| encode_batch(entries, ranges))?);
        let mut cached = self.cached.locked();
        if cached.len() == KEPT {
            cached.pop_front();
        }
        cached.push_back((key, bytes.clone()));
        Some((want, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::purge::log::{NewPurge, Retention};
    use prost::Message;
    use proto::edge::PurgeEntry;

    #[tokio::test]
    async fn encoded_batches_decode_to_the_entries_and_are_shared() {
        use proto::codec::WireEncode;
        use proto::edge::{coordinator_message, CoordinatorMessage, PurgeBatch};
        let dir = tempfile::tempdir().unwrap();
        let log = PurgeLog::open(dir.path(), Retention::forever()).unwrap();
        let batches = Batches::default();
        for i in 0..10 {
            log.append(vec![NewPurge::tag(&format!("t{i}"))])
                .await
                .unwrap();
        }
        let (last, bytes) = batches.read(&log, 3, u64::MAX, 4, false).unwrap();
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
        let (_, again) = batches.read(&log, 3, 6, 100, false).unwrap();
        assert_eq!(again.as_ptr(), bytes.as_ptr());
        // To the head: everything after the cursor; past the head: nothing.
        assert_eq!(
            batches.read(&log, 8, u64::MAX, 100, false).map(|(l, _)| l),
            Some(10)
        );
        assert!(batches.read(&log, 11, u64::MAX, 100, false).is_none());
        // Up to a given sequence, as a session in a storm asks (the head at its tick).
        assert_eq!(
            batches.read(&log, 2, 5, 100, false).map(|(l, _)| l),
            Some(5)
        );
        assert!(batches.read(&log, 6, 5, 100, false).is_none());
        // As one range entry, for an agent that takes them; shared too.
        let (last, ranged) = batches.read(&log, 3, 6, 100, true).unwrap();
        assert_eq!(last, 6);
        let batch = PurgeBatch::decode(ranged.as_ref()).unwrap();
        assert_eq!(batch.entries.len(), 1);
        assert_eq!((batch.entries[0].first(), batch.entries[0].seq), (3, 6));
        let (_, again) = batches.read(&log, 3, 6, 100, true).unwrap();
        assert_eq!(again.as_ptr(), ranged.as_ptr());
    }
}
