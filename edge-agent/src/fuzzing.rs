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
                    if let Ok(line) = ban_command(op) {
                        assert!(
                            !line.chars().any(char::is_control),
                            "control char in {line:?}"
                        );
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
    }
}
