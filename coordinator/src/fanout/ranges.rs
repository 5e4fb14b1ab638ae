//! Range entries: a run of consecutive tag purges sent to an edge as one entry.
//!
//! In a purge storm an edge receives thousands of entries per batch, and its agent bans
//! them as one expression anyway (`edge_agent::plan`). Sending them one by one costs
//! bytes on every session (sequence, timestamp and framing are about half of a
//! one-tag entry), and every copy the coordinator and the kernel make scales with the
//! bytes. So a batch for an agent that announces [`proto::CAP_PURGE_RANGES`] has each
//! run of two or more consecutive tag purges with the same `soft` replaced by one entry:
//! `first_seq..=seq`, the union of their tags (each once), and the oldest `received_at_us`.
//! Applying the union at once purges exactly what applying the run in order would have.
//! Regex, URL and full purges are never merged, so what the agent reports about one
//! (a regex varnish refuses) still names that purge's sequence.

use std::collections::HashSet;

use prost::bytes::Bytes;
use proto::edge::{purge_entry::Op, PurgeEntry, TagSet};

/// The wire bytes of a batch of consecutive `entries` (each with its encoding as a
/// `PurgeBatch` entry), with runs of tag purges merged when `ranges` is set.
pub fn encode_batch<'a, 'b>(
    entries: impl Iterator<Item = (&'a PurgeEntry, &'b Bytes)>,
    ranges: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    // The current run of mergeable entries, each with its own encoding.
    let mut run: Vec<(&PurgeEntry, &Bytes)> = Vec::new();
    for (entry, wire) in entries {
        let mergeable = ranges && matches!(entry.op, Some(Op::Tags(_)));
        if !(mergeable && run.last().is_some_and(|(prev, _)| prev.soft == entry.soft)) {
            flush(&mut out, &run);
            run.clear();
        }
        if mergeable {
            run.push((entry, wire));
        } else {
            out.extend_from_slice(wire);
        }
    }
    flush(&mut out, &run);
    out
}

/// Writes a run: its one entry's own bytes, or the merged entry.
fn flush(out: &mut Vec<u8>, run: &[(&PurgeEntry, &Bytes)]) {
    match run {
        [] => {}
        [(_, wire)] => out.extend_from_slice(wire),
        _ => out.extend(proto::codec::encode_entry(&merge(run))),
    }
}

/// The one entry that stands for `run` (two or more consecutive tag purges).
fn merge(run: &[(&PurgeEntry, &Bytes)]) -> PurgeEntry {
    let mut seen = HashSet::new();
    let mut tags = Vec::new();
    for (e, _) in run {
        if let Some(Op::Tags(set)) = &e.op {
            for t in &set.tags {
                if seen.insert(t.as_str()) {
                    tags.push(t.clone());
                }
            }
        }
    }
    let (first, last) = (run[0].0, run[run.len() - 1].0);
    PurgeEntry {
        seq: last.seq,
        first_seq: first.seq,
        received_at_us: run.iter().map(|(e, _)| e.received_at_us).min().unwrap_or(0),
        op: Some(Op::Tags(TagSet { tags })),
        soft: first.soft,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use proto::edge::{All, PurgeBatch};

    fn entry(seq: u64, op: Op, soft: bool) -> PurgeEntry {
        PurgeEntry {
            seq,
            received_at_us: 1_000 + seq,
            op: Some(op),
            soft,
            first_seq: 0,
        }
    }

    fn tags(seq: u64, t: &[&str]) -> PurgeEntry {
        let tags = t.iter().map(|s| s.to_string()).collect();
        entry(seq, Op::Tags(TagSet { tags }), false)
    }

    fn batch(entries: &[PurgeEntry], ranges: bool) -> Vec<PurgeEntry> {
        let wire: Vec<Bytes> = entries
            .iter()
            .map(|e| proto::codec::encode_entry(e).into())
            .collect();
        let bytes = encode_batch(entries.iter().zip(wire.iter()), ranges);
        PurgeBatch::decode(bytes.as_slice()).unwrap().entries
    }

    #[test]
    fn without_ranges_the_batch_is_the_entries() {
        let entries = vec![tags(1, &["a"]), tags(2, &["b"]), tags(3, &["c"])];
        assert_eq!(batch(&entries, false), entries);
    }

    #[test]
    fn a_run_of_tag_purges_becomes_one_entry_with_their_union() {
        let entries = vec![tags(4, &["a", "b"]), tags(5, &["b"]), tags(6, &["c"])];
        let got = batch(&entries, true);
        assert_eq!(got.len(), 1);
        let e = &got[0];
        assert_eq!((e.first_seq, e.seq, e.first()), (4, 6, 4));
        assert_eq!(e.received_at_us, 1_004, "the oldest purge's time");
        assert_eq!(
            e.op,
            Some(Op::Tags(TagSet {
                tags: vec!["a".into(), "b".into(), "c".into()]
            }))
        );
    }

    #[test]
    fn other_purges_and_a_change_of_soft_break_the_run() {
        let soft = |seq, t: &str| {
            entry(
                seq,
                Op::Tags(TagSet {
                    tags: vec![t.into()],
                }),
                true,
            )
        };
        let entries = vec![
            tags(1, &["a"]),
            tags(2, &["b"]),
            entry(3, Op::TagsRegex("^x".into()), false),
            tags(4, &["c"]),
            soft(5, "d"),
            soft(6, "e"),
            entry(7, Op::All(All {}), false),
            tags(8, &["f"]),
        ];
        let got: Vec<(u64, u64)> = batch(&entries, true)
            .iter()
            .map(|e| (e.first(), e.seq))
            .collect();
        assert_eq!(got, vec![(1, 2), (3, 3), (4, 4), (5, 6), (7, 7), (8, 8)]);
        let merged = batch(&entries, true);
        assert!(merged[3].soft, "a soft run stays soft");
        // Lone entries are sent as they were encoded.
        assert_eq!(merged[1], entries[2]);
        assert_eq!(merged[2], entries[3]);
        assert_eq!(merged[5], entries[7]);
    }
}
