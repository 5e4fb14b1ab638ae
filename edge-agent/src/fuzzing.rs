//! Entry point for the agent-side fuzz target (`fuzz/`) and the corpus replay test.
//!
//! [`coordinator_message`] decodes arbitrary bytes as a `CoordinatorMessage`, plans the
//! purges in both modes and renders every varnish command, and validates config bundles.
//! Properties: every tag of the input is covered by a ban regex that matches it (ban
//! mode) or by an xkey op (xkey mode); no admin command carries a control character;
//! xkey tags never contain whitespace; an `ApplyConfig` with an unsafe file name is
//! refused.

use prost::Message;
use proto::edge::{coordinator_message, purge_entry::Op, CoordinatorMessage};

use crate::config::PurgeMode;
use crate::plan::{plan, VarnishOp};
use crate::varnish::ban_command;

/// A protobuf `CoordinatorMessage` as it arrives on the session.
pub fn coordinator_message(data: &[u8]) {
    let Ok(msg) = CoordinatorMessage::decode(data) else {
        return;
    };
    match msg.msg {
        Some(coordinator_message::Msg::Purges(batch)) => {
            let entries = &batch.entries[..batch.entries.len().min(256)];
            let all = entries.iter().any(|e| matches!(e.op, Some(Op::All(_))));
            let tags: Vec<&String> = entries
                .iter()
                .filter_map(|e| match &e.op {
                    Some(Op::Tags(t)) => Some(t.tags.iter().filter(|t| !t.is_empty())),
                    _ => None,
                })
                .flatten()
                .collect();
            for mode in [PurgeMode::Ban, PurgeMode::Xkey] {
                let ops = plan(entries, mode, crate::plan::MAX_BAN_EXPR_BYTES);
                if all {
                    assert_eq!(ops, vec![VarnishOp::BanAll]);
                    continue;
                }
                for op in &ops {
                    match ban_command(op) {
                        Ok(line) => {
                            assert!(
                                !line.chars().any(char::is_control),
                                "control char in {line:?}"
                            );
                            assert!(!space_in_quotes(&line), "space in an argument: {line:?}");
                        }
                        // A tag set is always expressible (spaces are written \x20).
                        Err(e) => assert!(
                            !matches!(op, VarnishOp::BanTagList(l)
                                if l.iter().all(|t| !t.chars().any(char::is_control))),
                            "{op:?}: {e}"
                        ),
                    }
                    if let VarnishOp::Xkey { tags, .. } = op {
                        assert!(tags.iter().all(|t| !t.chars().any(char::is_whitespace)));
                    }
                }
                for tag in tags.iter().take(32) {
                    let covered = ops.iter().any(|op| match op {
                        VarnishOp::Xkey { tags, .. } => tags.contains(tag),
                        VarnishOp::BanTagList(list) => {
                            regex::RegexBuilder::new(&crate::plan::tags_regex(list))
                                .nest_limit(64)
                                .build()
                                .map(|r| r.is_match(&format!("a,{tag},b")) && r.is_match(tag))
                                .unwrap_or(false)
                        }
                        VarnishOp::BanTags(re) => regex::RegexBuilder::new(re)
                            .nest_limit(64)
                            .build()
                            .map(|r| r.is_match(&format!("a,{tag},b")) && r.is_match(tag))
                            .unwrap_or(false),
                        _ => false,
                    });
                    assert!(covered, "tag {tag:?} is not purged by {ops:?}");
                }
            }
        }
        Some(coordinator_message::Msg::ApplyConfig(apply)) => {
            let verdict = crate::vcl::validate(&apply);
            if apply
                .files
                .keys()
                .any(|f| f.contains('/') || f.starts_with('.'))
            {
                assert!(
                    verdict.is_err(),
                    "unsafe file name accepted: {:?}",
                    apply.files.keys()
                );
            }
        }
        _ => {}
    }
}

/// Whether a quoted argument of a CLI line holds a space: varnishd's manager hands
/// arguments on to the cache process unquoted, where a space splits them.
fn space_in_quotes(line: &str) -> bool {
    let (mut quoted, mut escaped) = (false, false);
    for c in line.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ' ' if quoted => return true,
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::edge::{PurgeBatch, PurgeEntry, TagSet};

    #[test]
    fn tags_with_spaces_are_banned_not_split_in_xkey_mode() {
        let msg = CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Purges(PurgeBatch {
                entries: vec![PurgeEntry {
                    seq: 1,
                    op: Some(Op::Tags(TagSet {
                        tags: vec!["cat_p_1".into(), "a b".into()],
                    })),
                    ..Default::default()
                }],
                encoded: Default::default(),
            })),
        };
        coordinator_message(&msg.encode_to_vec());
        assert!(space_in_quotes(r#"ban req.url == "/a b""#));
        assert!(
            space_in_quotes(r#"ban req.url == "/a\" \\b""#),
            "an escaped quote does not end the argument"
        );
        assert!(!space_in_quotes(r#"ban obj.http.X ~ "(^|,)(a\x20b)(,|$)""#));
    }
}
