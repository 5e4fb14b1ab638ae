//! Turning Magento's purge headers into a [`PurgeOp`].
//!
//! Magento wraps every tag as `((^|,)TAG(,|$))` and joins the wrapped tags with `|`
//! (`Magento\CacheInvalidate\Model\PurgeCache`). We parse that canonical form into a
//! tag set, because a set can be merged with other sets, deduplicated and sent to xkey;
//! anything else is kept as an *opaque* regex and validated before it is acknowledged,
//! so a pattern varnishd would reject never gets a `200`.
//!
//! The one dangerous input is the empty pattern Magento sends in a corner case: it is an
//! error here, never "purge everything". Only the literal `.*` means a full flush.

use std::collections::BTreeSet;

use proto::edge::{purge_entry::Op, All, TagSet, UrlPurge};

/// How deeply a regex may nest (groups, repetitions of repetitions). Real patterns use a
/// handful; the bound keeps parsing a hostile one from exhausting the stack (a fuzzer
/// found `a*****…` overflowing a debug build at the `regex` crate's default of 250).
pub const REGEX_NEST_LIMIT: u32 = 64;

/// A sanity bound on one pattern; the listener's header limit (`purge.max_header_bytes`) is the real one.
pub const MAX_PATTERN_BYTES: usize = 1024 * 1024;

/// Longest tag accepted. Magento's are a few dozen bytes (`cat_p_123`); one of kilobytes
/// cannot be sent to xkey or fit the agents' ban chunks, so it is refused up front.
pub const MAX_TAG_BYTES: usize = 1024;

/// What one purge asks the edges to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeOp {
    /// Objects whose `X-Magento-Tags` contains any of these tags.
    Tags(BTreeSet<String>),
    /// Objects whose `X-Magento-Tags` matches this regex.
    TagsRegex(String),
    /// Objects whose `X-Pool` matches this regex.
    PoolRegex(String),
    /// Everything.
    All,
}

impl PurgeOp {
    /// The wire form stored in the log and sent to agents.
    pub fn into_proto(self) -> Op {
        match self {
            PurgeOp::Tags(tags) => Op::Tags(TagSet {
                tags: tags.into_iter().collect(),
            }),
            PurgeOp::TagsRegex(re) => Op::TagsRegex(re),
            PurgeOp::PoolRegex(re) => Op::PoolRegex(re),
            PurgeOp::All => Op::All(All {}),
        }
    }

    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PurgeOp::Tags(_) => "tags",
            PurgeOp::TagsRegex(_) => "regex",
            PurgeOp::PoolRegex(_) => "pool",
            PurgeOp::All => "all",
        }
    }
}

/// Why a pattern cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("{header} is empty; refusing to treat it as a full flush")]
    Empty { header: &'static str },
    #[error("{header} is longer than {MAX_PATTERN_BYTES} bytes")]
    TooLong { header: &'static str },
    #[error("{header} contains a control character")]
    ControlChar { header: &'static str },
    #[error("{header} is not valid UTF-8")]
    NotUtf8 { header: &'static str },
    #[error("{header} holds a tag of {len} bytes; at most {MAX_TAG_BYTES} are accepted")]
    TagTooLong { header: &'static str, len: usize },
    #[error("{header} is not a regex varnish (PCRE2) can use: {reason}")]
    InvalidRegex {
        header: &'static str,
        reason: String,
    },
}

/// Parses an `X-Magento-Tags-Pattern` value.
pub fn parse_tags_pattern(raw: &[u8]) -> Result<PurgeOp, PatternError> {
    const H: &str = "X-Magento-Tags-Pattern";
    let value = clean(raw, H)?;
    if value == ".*" {
        return Ok(PurgeOp::All);
    }
    if let Some(tags) = parse_canonical(value) {
        if let Some(long) = tags.iter().find(|t| t.len() > MAX_TAG_BYTES) {
            return Err(PatternError::TagTooLong {
                header: H,
                len: long.len(),
            });
        }
        return Ok(PurgeOp::Tags(tags));
    }
    validate_regex(value, H)?;
    Ok(PurgeOp::TagsRegex(value.to_owned()))
}

/// Longest URL path an API purge may name.
pub const MAX_URL_BYTES: usize = 8192;

/// A purge asked for through the API (`POST /api/v1/purges`, `coordinator purge`):
/// exactly one of `tags`, `url` (with an optional `host`) and `all`, checked by the same
/// rules as Magento's headers. Returns the operation and its kind for the metrics.
pub fn api_op(
    tags: Vec<String>,
    url: Option<String>,
    host: Option<String>,
    all: bool,
) -> Result<(Op, &'static str), String> {
    let chosen = usize::from(!tags.is_empty()) + usize::from(url.is_some()) + usize::from(all);
    if chosen != 1 {
        return Err("give exactly one of tags, url, all".into());
    }
    if all {
        return Ok((Op::All(All {}), "all"));
    }
    if let Some(path) = url {
        if !path.starts_with('/')
            || path.chars().any(char::is_control)
            || path.len() > MAX_URL_BYTES
        {
            return Err(format!(
                "url must be a path starting with /, at most {MAX_URL_BYTES} bytes"
            ));
        }
        let host = host.unwrap_or_default();
        if host.chars().any(|c| c.is_control() || c == ' ') {
            return Err("host must be a host name".into());
        }
        return Ok((Op::Url(UrlPurge { path, host }), "url"));
    }
    tags.iter().try_for_each(|t| validate_tag(t))?;
    Ok((Op::Tags(TagSet { tags }), "tags"))
}

/// Checks one tag given by name (the API's tag purges): what Magento could send in its
/// canonical pattern, and no longer than [`MAX_TAG_BYTES`].
pub fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty()
        || tag
            .chars()
            .any(|c| c.is_control() || c == ',' || c.is_whitespace())
    {
        return Err("tags must be non-empty without commas, spaces or control characters".into());
    }
    if tag.len() > MAX_TAG_BYTES {
        return Err(format!(
            "a tag of {} bytes; at most {MAX_TAG_BYTES} are accepted",
            tag.len()
        ));
    }
    Ok(())
}

/// Parses an `X-Pool` value (always a regex).
pub fn parse_pool(raw: &[u8]) -> Result<PurgeOp, PatternError> {
    const H: &str = "X-Pool";
    let value = clean(raw, H)?;
    validate_regex(value, H)?;
    Ok(PurgeOp::PoolRegex(value.to_owned()))
}

fn clean<'a>(raw: &'a [u8], header: &'static str) -> Result<&'a str, PatternError> {
    if raw.len() > MAX_PATTERN_BYTES {
        return Err(PatternError::TooLong { header });
    }
    let value = std::str::from_utf8(raw)
        .map_err(|_| PatternError::NotUtf8 { header })?
        .trim_matches([' ', '\t']);
    if value.is_empty() {
        return Err(PatternError::Empty { header });
    }
    if value.chars().any(char::is_control) {
        return Err(PatternError::ControlChar { header });
    }
    Ok(value)
}

/// Checks that varnishd will accept the regex, with the engine varnishd uses: PCRE2,
/// default options, its default compiled-size limit (a Magento-style alternation of about
/// 30 KB is "too large" for it, and a ban varnishd refuses is one no edge can ever apply).
/// Lookarounds and backreferences PCRE2 takes are fine; syntax only another engine knows
/// is refused here, with PCRE2's own reason.
pub fn validate_regex(value: &str, header: &'static str) -> Result<(), PatternError> {
    pcre2::bytes::RegexBuilder::new()
        .build(value)
        .map(|_| ())
        .map_err(|e| PatternError::InvalidRegex {
            header,
            reason: e.to_string(),
        })
}

const PREFIX: &str = "((^|,)";
const SUFFIX: &str = "(,|$))";

/// `((^|,)a(,|$))|((^|,)b(,|$))` -> {a, b}; `None` when the value is not exactly that
/// shape with plain tags (no regex metacharacters), so it must be treated as a regex.
fn parse_canonical(mut rest: &str) -> Option<BTreeSet<String>> {
    let mut tags = BTreeSet::new();
    loop {
        rest = rest.strip_prefix(PREFIX)?;
        let end = rest.find(SUFFIX)?;
        let tag = &rest[..end];
        if tag.is_empty() || !tag.bytes().all(is_plain_tag_byte) {
            return None;
        }
        tags.insert(tag.to_owned());
        rest = &rest[end + SUFFIX.len()..];
        if rest.is_empty() {
            return Some(tags);
        }
        rest = rest.strip_prefix('|')?;
    }
}

/// Bytes that mean themselves in a regex and cannot break the canonical frame.
fn is_plain_tag_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'/' | b'@' | b'=' | b'%' | b'!')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> PurgeOp {
        PurgeOp::Tags(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn canonical_magento_pattern_becomes_tag_set() {
        let op = parse_tags_pattern(b"((^|,)cat_p_42(,|$))|((^|,)cat_c_p_7(,|$))").unwrap();
        assert_eq!(op, tags(&["cat_p_42", "cat_c_p_7"]));
        assert_eq!(
            parse_tags_pattern(b"((^|,)cat_p(,|$))").unwrap(),
            tags(&["cat_p"])
        );
    }

    #[test]
    fn full_flush_only_for_dot_star() {
        assert_eq!(parse_tags_pattern(b".*").unwrap(), PurgeOp::All);
        assert_eq!(parse_tags_pattern(b"  .* ").unwrap(), PurgeOp::All);
        assert_eq!(
            parse_tags_pattern(b"^.*$").unwrap(),
            PurgeOp::TagsRegex("^.*$".into())
        );
    }

    #[test]
    fn deeply_nested_regexes_are_refused_not_a_stack_overflow() {
        // Found by the waf_compile fuzzer: 150 stacked repetitions overflowed the stack
        // of a debug build under the regex crate's default nest limit.
        let pattern = format!("a{}", "*".repeat(200));
        assert!(matches!(
            parse_tags_pattern(pattern.as_bytes()),
            Err(PatternError::InvalidRegex { .. })
        ));
        // PCRE2 (varnish's engine) takes 100 nested groups and refuses past its limit.
        let groups = |n| format!("{}a{}", "(".repeat(n), ")".repeat(n));
        assert!(parse_tags_pattern(groups(100).as_bytes()).is_ok());
        assert!(parse_tags_pattern(groups(300).as_bytes()).is_err());
        assert!(parse_tags_pattern(b"((^|,)cat_p_1(,|$))|cat_(c|p)_[0-9]+").is_ok());
    }

    #[test]
    fn empty_pattern_is_an_error_not_a_flush() {
        for raw in [&b""[..], b"   ", b"\t"] {
            assert!(matches!(
                parse_tags_pattern(raw),
                Err(PatternError::Empty { .. })
            ));
        }
    }

    #[test]
    fn non_canonical_patterns_stay_opaque_regexes() {
        for raw in [
            "cat_p_1",
            "((^|,)cat.p(,|$))",
            "((^|,)a(,|$))|",
            "((^|,)a(,|$))x",
            "((^|,)(,|$))",
        ] {
            assert_eq!(
                parse_tags_pattern(raw.as_bytes()).unwrap(),
                PurgeOp::TagsRegex(raw.into()),
                "{raw}"
            );
        }
    }

    #[test]
    fn invalid_regex_is_refused_with_reason() {
        let err = parse_tags_pattern(b"((^|,)cat_p_1(,|$)").unwrap_err();
        assert!(matches!(err, PatternError::InvalidRegex { .. }), "{err}");
        assert!(err.to_string().contains("PCRE2"), "{err}");
        assert!(parse_pool(b"[a-").is_err());
    }

    #[test]
    fn what_varnish_cannot_compile_is_refused_up_front() {
        // A Magento-style alternation of 40 KB with a non-tag tail: PCRE2's default
        // compiled-size limit refuses it, as every varnishd would.
        let mut raw = String::new();
        let mut n = 0;
        while raw.len() < 40_000 {
            raw.push_str(&format!("((^|,)cat_p_{n}(,|$))|"));
            n += 1;
        }
        raw.push_str("cat_.*");
        let err = parse_tags_pattern(raw.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        // The same alternation at 8 KB compiles.
        let small: String = raw[raw.len() - 8000..].to_owned();
        let small = &small[small.find("((").unwrap()..];
        assert!(parse_tags_pattern(small.as_bytes()).is_ok());
        // One 60 KB tag: a canonical pattern, refused for its size.
        let big = format!("((^|,){}(,|$))", "x".repeat(60_000));
        assert!(matches!(
            parse_tags_pattern(big.as_bytes()),
            Err(PatternError::TagTooLong { len: 60_000, .. })
        ));
        // PCRE2 and Rust's regex disagree both ways; PCRE2 (varnish's engine) decides.
        assert!(parse_tags_pattern(b"(?u:cat)_p").is_err(), "Rust-only flag");
        assert!(
            parse_tags_pattern(b"(cat)_\\1|(?=x)y").is_ok(),
            "PCRE2-only syntax"
        );
        assert!(parse_pool(b"(?<=a)b").is_ok());
    }

    #[test]
    fn control_chars_and_bad_utf8_are_refused() {
        assert!(matches!(
            parse_tags_pattern(b"a\nb"),
            Err(PatternError::ControlChar { .. })
        ));
        assert!(matches!(
            parse_tags_pattern(b"\xff\xfe"),
            Err(PatternError::NotUtf8 { .. })
        ));
    }

    #[test]
    fn big_magento_chunk_parses() {
        let mut raw = String::new();
        let mut n = 0;
        while raw.len() < 7600 {
            if n > 0 {
                raw.push('|');
            }
            raw.push_str(&format!("((^|,)cat_p_{n}(,|$))"));
            n += 1;
        }
        match parse_tags_pattern(raw.as_bytes()).unwrap() {
            PurgeOp::Tags(t) => assert_eq!(t.len(), n),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn api_purges_follow_the_header_rules() {
        let ok = |r: Result<(Op, &'static str), String>| r.map(|(_, kind)| kind);
        assert_eq!(
            ok(api_op(vec!["cat_p_1".into()], None, None, false)),
            Ok("tags")
        );
        assert_eq!(
            ok(api_op(vec![], Some("/a".into()), None, false)),
            Ok("url")
        );
        assert_eq!(ok(api_op(vec![], None, None, true)), Ok("all"));
        for bad in [
            api_op(vec![], None, None, false),
            api_op(vec!["a".into()], None, None, true),
            api_op(vec![], Some("no-slash".into()), None, false),
            api_op(vec![], Some("/a".into()), Some("h st".into()), false),
            api_op(vec!["x".repeat(MAX_TAG_BYTES + 1)], None, None, false),
        ] {
            assert!(bad.is_err(), "{bad:?}");
        }
    }
}
