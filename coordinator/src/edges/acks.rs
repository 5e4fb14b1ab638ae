//! When an edge applied what: a bounded history of *ack points* `(applied_seq, unix µs)`.
//!
//! Acks are cumulative, so the time an edge applied purge `S` is the time of its first
//! ack point at or beyond `S` ([`AckHistory::covering`]); that answers
//! `GET /api/v1/purges/{seq}` without storing anything per purge per edge. The history
//! never grows past [`ACK_POINTS`] and never answers earlier than the truth.

use std::collections::VecDeque;

/// Ack points remembered per edge (16 bytes each: 16 KiB per edge, never more).
const ACK_POINTS: usize = 1024;

/// When an edge applied what: `(seq, unix µs)` ack points, oldest first, in a fixed
/// budget. When full, every other point of the older half is dropped before the new one
/// goes in (the oldest point always stays), so recent acks keep their precision, old ones
/// a coarser one (an answer
/// for an old sequence is the first remaining point at or after it: never earlier than
/// the truth), and the buffer never grows past [`ACK_POINTS`] (no doubling).
#[derive(Debug, Default)]
pub(super) struct AckHistory {
    points: VecDeque<(u64, u64)>,
}

impl AckHistory {
    pub(super) fn push(&mut self, seq: u64, at_us: u64) {
        self.thin();
        self.points.push_back((seq, at_us));
    }

    /// Makes room for one more point (see the type's docs).
    fn thin(&mut self) {
        if self.points.len() >= ACK_POINTS {
            let half = self.points.len() / 2;
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i > half || i % 2 == 1
            });
        }
    }

    /// Takes in points another coordinator relayed: each sequence once, in order (a
    /// point already known is kept as it is).
    pub(super) fn merge(&mut self, points: &[(u64, u64)]) {
        for &(seq, at_us) in points {
            if self.points.back().is_none_or(|(s, _)| *s < seq) {
                self.push(seq, at_us);
                continue;
            }
            let i = self.points.partition_point(|(s, _)| *s < seq);
            if self.points.get(i).is_some_and(|(s, _)| *s == seq) {
                continue;
            }
            self.thin();
            let i = self.points.partition_point(|(s, _)| *s < seq);
            self.points.insert(i, (seq, at_us));
        }
    }

    /// The first point at or after `seq`, if one is known.
    pub(super) fn covering(&self, seq: u64) -> Option<(u64, u64)> {
        let i = self.points.partition_point(|(s, _)| *s < seq);
        self.points.get(i).copied()
    }

    /// The oldest point known (the answer for a sequence older than the thinned history).
    pub(super) fn oldest(&self) -> Option<(u64, u64)> {
        self.points.front().copied()
    }

    /// The newest points taken at or after `since_us`, at most `max`, oldest first.
    pub(super) fn recent(&self, since_us: u64, max: usize) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = self
            .points
            .iter()
            .rev()
            .take_while(|(_, t)| *t >= since_us)
            .take(max)
            .copied()
            .collect();
        out.reverse();
        out
    }

    pub(super) fn clear(&mut self) {
        self.points.clear();
    }
}

#[cfg(test)]
impl AckHistory {
    /// The first point at or after `seq` (the oldest known when history was thinned).
    fn applied_at(&self, seq: u64) -> Option<u64> {
        let i = self.points.partition_point(|(s, _)| *s < seq);
        self.points.get(i).or(self.points.front()).map(|(_, t)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_history_stays_within_its_budget_and_never_answers_early() {
        let mut h = AckHistory::default();
        for seq in 1..=50_000u64 {
            h.push(seq, seq * 10);
            assert!(h.points.len() <= ACK_POINTS);
        }
        assert!(h.points.capacity() <= ACK_POINTS, "{}", h.points.capacity());
        // Recent acks are exact; old ones are answered by a later point, never an earlier.
        assert_eq!(h.applied_at(50_000), Some(500_000));
        assert_eq!(h.applied_at(49_999), Some(499_990));
        for seq in [1, 100, 10_000, 30_000] {
            let t = h.applied_at(seq).expect("a point");
            assert!(t >= seq * 10, "{seq}: {t}");
        }
        let seqs: Vec<u64> = h.points.iter().map(|p| p.0).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "ordered");
        assert_eq!(seqs[0], 1, "old history thinned, the oldest point kept");
    }

    #[test]
    fn merged_points_stay_ordered_once_each_and_within_the_budget() {
        let mut h = AckHistory::default();
        h.merge(&[(5, 50), (9, 90)]);
        h.merge(&[(7, 70), (9, 99), (12, 120)]);
        let seqs: Vec<(u64, u64)> = h.points.iter().copied().collect();
        assert_eq!(seqs, [(5, 50), (7, 70), (9, 90), (12, 120)]);
        let many: Vec<(u64, u64)> = (100..3000).map(|s| (s, s * 10)).collect();
        h.merge(&many);
        assert!(h.points.len() <= ACK_POINTS);
        assert_eq!(h.covering(2999), Some((2999, 29_990)));
    }
}
