//! Coalescing: turning a run of purge log entries into as few varnish operations as fit.
//!
//! While an edge is behind, it receives many entries at once. Applying them one by one
//! would add one ban per entry to varnish's ban list (each one checked on every lookup of
//! an older object). Instead [`plan`] merges them: all tag sets into one alternation
//! (chunked to stay under [`MAX_EXPR_BYTES`]), identical regexes once, and a single
//! "ban everything" that subsumes the rest when any entry asked for a full flush.
//! Applying the merged operations at one instant purges a superset of what applying the
//! entries in order would have, so the result is never staler.

use std::collections::BTreeSet;

use proto::edge::{purge_entry::Op, PurgeEntry};

use crate::config::PurgeMode;

/// Bound on one xkey header (Magento's own chunk size, under varnishd's 8 KiB header limit).
pub const MAX_EXPR_BYTES: usize = 7680;
/// Default bound on one ban's tag alternation ([`tags_regex`]; see
/// [`crate::config::DEFAULT_MAX_BAN_BYTES`]).
pub const MAX_BAN_EXPR_BYTES: usize = crate::config::DEFAULT_MAX_BAN_BYTES;

/// One thing to do to varnish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VarnishOp {
    /// `ban obj.status != 0`: everything.
    BanAll,
    /// `ban obj.http.X-Magento-Tags ~ <regex>`: a regex Magento sent.
    BanTags(String),
    /// `ban obj.http.X-Magento-Tags ~ (^|,)(tag|...)(,|$)` ([`tags_regex`]): tags, so a
    /// ban varnish refuses (too large for its PCRE2) can be split instead of flushed.
    BanTagList(Vec<String>),
    /// `ban obj.http.X-Pool ~ <regex>`.
    BanPool(String),
    /// `ban req.url == <path> [&& req.http.host == <host>]`.
    BanUrl { path: String, host: String },
    /// `PURGE` with `X-Xkey-Purge: <space-separated tags>` to the local varnish.
    Xkey { tags: Vec<String>, soft: bool },
}

/// The operations that apply `entries`, in a safe order, with at most `ban_bytes` of
/// tag alternation per ban ([`MAX_BAN_EXPR_BYTES`] by default).
pub fn plan(entries: &[PurgeEntry], mode: PurgeMode, ban_bytes: usize) -> Vec<VarnishOp> {
    if entries.iter().any(|e| matches!(e.op, Some(Op::All(_)))) {
        return vec![VarnishOp::BanAll];
    }
    let mut hard = BTreeSet::new();
    let mut soft = BTreeSet::new();
    let mut ops = Vec::new();
    for e in entries {
        match &e.op {
            Some(Op::Tags(set)) => {
                let target = if e.soft && mode == PurgeMode::Xkey {
                    &mut soft
                } else {
                    &mut hard
                };
                target.extend(set.tags.iter().filter(|t| !t.is_empty()).cloned());
            }
            Some(Op::TagsRegex(re)) => push_unique(&mut ops, VarnishOp::BanTags(re.clone())),
            Some(Op::PoolRegex(re)) => push_unique(&mut ops, VarnishOp::BanPool(re.clone())),
            Some(Op::Url(u)) => push_unique(
                &mut ops,
                VarnishOp::BanUrl {
                    path: u.path.clone(),
                    host: u.host.clone(),
                },
            ),
            Some(Op::All(_)) | None => {}
        }
    }
    soft.retain(|t| !hard.contains(t));
    // xkey takes a space-separated list: a tag with whitespace or a control character
    // (never from Magento, but the stream is input) is purged by a ban instead.
    let (odd, hard): (BTreeSet<String>, BTreeSet<String>) = if mode == PurgeMode::Xkey {
        hard.into_iter().partition(|t| !xkey_safe(t))
    } else {
        (BTreeSet::new(), hard)
    };
    let soft: BTreeSet<String> = soft.into_iter().filter(|t| xkey_safe(t)).collect();
    for chunk in chunk_tags(&odd, |t| escaped_len(t) + 1, ban_bytes) {
        ops.push(VarnishOp::BanTagList(chunk));
    }
    match mode {
        PurgeMode::Ban => {
            for chunk in chunk_tags(&hard, |t| escaped_len(t) + 1, ban_bytes) {
                ops.push(VarnishOp::BanTagList(chunk));
            }
        }
        PurgeMode::Xkey => {
            for (set, is_soft) in [(&hard, false), (&soft, true)] {
                for chunk in chunk_tags(set, |t| t.len() + 1, MAX_EXPR_BYTES) {
                    ops.push(VarnishOp::Xkey {
                        tags: chunk,
                        soft: is_soft,
                    });
                }
            }
        }
    }
    ops
}

/// Longest tag sent to xkey: varnishd refuses a request header past its limits, and the
/// coordinator accepts none longer; a longer one (an older log) goes to a ban instead.
const MAX_XKEY_TAG: usize = 1024;

fn xkey_safe(tag: &str) -> bool {
    tag.len() <= MAX_XKEY_TAG && !tag.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn push_unique(ops: &mut Vec<VarnishOp>, op: VarnishOp) {
    if !ops.contains(&op) {
        ops.push(op);
    }
}

fn chunk_tags(
    tags: &BTreeSet<String>,
    cost: impl Fn(&str) -> usize,
    bound: usize,
) -> Vec<Vec<String>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for t in tags {
        let c = cost(t);
        if !current.is_empty() && size + c > bound {
            chunks.push(std::mem::take(&mut current));
            size = 0;
        }
        size += c;
        current.push(t.clone());
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// `tags` as one regex over the `X-Magento-Tags` header: any of them as a whole
/// comma-separated item, `(^|,)(a|b|c)(,|$)`, which is what Magento's own
/// `((^|,)a(,|$))|((^|,)b(,|$))|...` matches, in half the bytes.
pub fn tags_regex(tags: &[String]) -> String {
    let mut out =
        String::with_capacity(tags.iter().map(|t| escaped_len(t) + 1).sum::<usize>() + 14);
    out.push_str("(^|,)(");
    for (i, t) in tags.iter().enumerate() {
        if i > 0 {
            out.push('|');
        }
        for c in t.chars() {
            if c == ' ' {
                // A space would split the ban's argument in varnishd's CLI.
                out.push_str("\\x20");
                continue;
            }
            if needs_escape(c) {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out.push_str(")(,|$)");
    out
}

/// Regex metacharacters (any ASCII punctuation but `_`) are escaped with a backslash.
fn needs_escape(c: char) -> bool {
    c.is_ascii_punctuation() && c != '_'
}

/// A tag's length in a [`tags_regex`], escapes included.
fn escaped_len(tag: &str) -> usize {
    tag.len()
        + tag
            .chars()
            .map(|c| match c {
                ' ' => 3,
                c if needs_escape(c) => 1,
                _ => 0,
            })
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::edge::{All, TagSet};

    fn tags(seq: u64, t: &[&str], soft: bool) -> PurgeEntry {
        PurgeEntry {
            seq,
            received_at_us: 0,
            op: Some(Op::Tags(TagSet {
                tags: t.iter().map(|s| s.to_string()).collect(),
            })),
            soft,
            first_seq: 0,
        }
    }

    #[test]
    fn tag_sets_merge_into_one_ban() {
        let ops = plan(
            &[tags(1, &["a", "b"], false), tags(2, &["b", "c"], false)],
            PurgeMode::Ban,
            MAX_BAN_EXPR_BYTES,
        );
        assert_eq!(
            ops,
            vec![VarnishOp::BanTagList(vec![
                "a".into(),
                "b".into(),
                "c".into()
            ])]
        );
    }

    #[test]
    fn full_flush_subsumes_everything() {
        let all = PurgeEntry {
            seq: 2,
            received_at_us: 0,
            op: Some(Op::All(All {})),
            soft: false,
            first_seq: 0,
        };
        assert_eq!(
            plan(
                &[tags(1, &["a"], false), all],
                PurgeMode::Xkey,
                MAX_BAN_EXPR_BYTES
            ),
            vec![VarnishOp::BanAll]
        );
    }

    #[test]
    fn regexes_deduplicate_and_keep_order() {
        let re = |seq, r: &str| PurgeEntry {
            seq,
            received_at_us: 0,
            op: Some(Op::TagsRegex(r.into())),
            soft: false,
            first_seq: 0,
        };
        let ops = plan(
            &[re(1, "x"), re(2, "y"), re(3, "x")],
            PurgeMode::Ban,
            MAX_BAN_EXPR_BYTES,
        );
        assert_eq!(
            ops,
            vec![
                VarnishOp::BanTags("x".into()),
                VarnishOp::BanTags("y".into())
            ]
        );
    }

    #[test]
    fn big_sets_are_chunked_under_the_limit() {
        let many: Vec<String> = (0..5000).map(|i| format!("cat_p_{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let ops = plan(&[tags(1, &refs, false)], PurgeMode::Ban, MAX_BAN_EXPR_BYTES);
        assert!(ops.len() > 1);
        let mut seen = 0;
        for op in &ops {
            let VarnishOp::BanTagList(tags) = op else {
                panic!()
            };
            let p = tags_regex(tags);
            assert!(p.len() <= MAX_BAN_EXPR_BYTES + 14, "{}", p.len());
            seen += tags.len();
        }
        assert_eq!(seen, 5000);
    }

    #[test]
    fn xkey_soft_and_hard_split_hard_wins() {
        let ops = plan(
            &[tags(1, &["a", "b"], true), tags(2, &["b"], false)],
            PurgeMode::Xkey,
            MAX_BAN_EXPR_BYTES,
        );
        assert_eq!(
            ops,
            vec![
                VarnishOp::Xkey {
                    tags: vec!["b".into()],
                    soft: false
                },
                VarnishOp::Xkey {
                    tags: vec!["a".into()],
                    soft: true
                },
            ]
        );
    }

    #[test]
    fn tags_are_escaped() {
        let re = |t: &[&str]| tags_regex(&t.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(re(&["a.b"]), r"(^|,)(a\.b)(,|$)");
        assert_eq!(re(&["cat_p_1", "x|y"]), r"(^|,)(cat_p_1|x\|y)(,|$)");
        // A space (an old log's tag) is written so varnishd's CLI cannot split it.
        assert_eq!(re(&["a b"]), r"(^|,)(a\x20b)(,|$)");
        assert!(crate::varnish::admin::quote(&re(&["a b"])).is_ok());
        assert_eq!(escaped_len("a b.c"), re(&["a b.c"]).len() - 12);
    }
}
