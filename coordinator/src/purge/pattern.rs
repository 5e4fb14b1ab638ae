//! Turning Magento's purge headers into a [`PurgeOp`] whose cost on varnish is known.
//!
//! Magento wraps every tag as `((^|,)TAG(,|$))` and joins the wrapped tags with `|`
//! (`Magento\CacheInvalidate\Model\PurgeCache`), and sends `.*` for a full flush. We
//! parse that canonical form into a tag set: the edges build their bans from the tags
//! (`(^|,)(a|b|...)(,|$)`, every tag escaped), so every ban they run is one whose cost we
//! know, and a set can be merged, deduplicated and sent to xkey. An `X-Pool` that is a
//! plain name (optionally `^...$` anchored) is kept as it is: a literal costs one pass.
//!
//! Anything else is an *opaque* regex, and an opaque regex can crash varnish: a ban that
//! hits PCRE2's `pcre2_match_limit` (10,000) while a lookup evaluates it makes varnishd
//! 7.1 panic (`ban_evaluate`), so one bad PURGE fanned out to the fleet empties every
//! region's cache at once (`^([a-z0-9_,]+)+,$` against an ordinary tag header does it).
//! By default ([`Policy::allow_regex`] false, `[purge] allow_regex`) an opaque regex is
//! refused with the reason. With the option on, each one must compile in PCRE2 (as every
//! varnishd must) and is then trial-matched ([`trial_match`]) under varnish's own limits,
//! interpreted (`pcre2_match_limit` 10,000 and `pcre2_depth_limit` 20) and JIT-compiled
//! (the match limit; varnishd JIT-compiles bans by default and JIT ignores the depth
//! limit), against worst-case subjects: a long `X-Magento-Tags` header and strings built
//! from the pattern's own characters. A regex that hits a limit on any of them is refused.
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
    #[error("{header} is {expected}; other regexes are refused because a costly one crashes varnishd ([purge] allow_regex = false)")]
    Opaque {
        header: &'static str,
        expected: &'static str,
    },
    #[error(
        "{header} starts with a (*...) option, which could lift varnish's PCRE2 limits; refused"
    )]
    StartOption { header: &'static str },
    #[error("{header} exceeds varnish's PCRE2 limits (pcre2_match_limit {VARNISH_MATCH_LIMIT}, pcre2_depth_limit {VARNISH_DEPTH_LIMIT}) on {subject} ({reason}); a ban that does crashes varnishd, so it is refused")]
    TooCostly {
        header: &'static str,
        subject: &'static str,
        reason: String,
    },
}

/// What the listener accepts beyond Magento's own patterns (`[purge] allow_regex`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Accept opaque regexes (each one trial-matched under varnish's limits first).
    pub allow_regex: bool,
}

/// varnishd's default `pcre2_match_limit` (7.x), the bound a ban's match may not reach.
pub const VARNISH_MATCH_LIMIT: u32 = 10_000;
/// varnishd's default `pcre2_depth_limit` (7.x; ignored when varnishd JIT-compiles).
pub const VARNISH_DEPTH_LIMIT: u32 = 20;
/// The longest `X-Magento-Tags` header a trial matches against: a backend response
/// header over varnishd's `http_resp_hdr_len` (8 KiB) never reaches the cache.
pub const TRIAL_HEADER_BYTES: usize = 8 * 1024;

const TAGS_EXPECTED: &str = "neither Magento's tag pattern ((^|,)TAG(,|$))|... nor .*";
const POOL_EXPECTED: &str =
    "not a plain pool name (letters, digits and _-.:/@=%!, optionally ^...$ anchored)";

/// Parses an `X-Magento-Tags-Pattern` value.
pub fn parse_tags_pattern(raw: &[u8], policy: Policy) -> Result<PurgeOp, PatternError> {
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
    if !policy.allow_regex {
        return Err(PatternError::Opaque {
            header: H,
            expected: TAGS_EXPECTED,
        });
    }
    validate_regex(value, H)?;
    trial_match(value, H)?;
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
        // A space cannot reach varnish: its CLI hands each argument on to the cache
        // process unquoted, so a space splits it (and no request line holds one anyway).
        if !path.starts_with('/')
            || path.chars().any(|c| c.is_control() || c == ' ')
            || path.len() > MAX_URL_BYTES
        {
            return Err(format!(
                "url must be a path starting with /, at most {MAX_URL_BYTES} bytes, without spaces (percent-encode them: %20) or control characters"
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

/// Parses an `X-Pool` value: a plain pool name (a literal regex, optionally `^`/`$`
/// anchored) always; any other regex only under [`Policy::allow_regex`], trial-matched.
pub fn parse_pool(raw: &[u8], policy: Policy) -> Result<PurgeOp, PatternError> {
    const H: &str = "X-Pool";
    let value = clean(raw, H)?;
    if !is_plain_pool(value) {
        if !policy.allow_regex {
            return Err(PatternError::Opaque {
                header: H,
                expected: POOL_EXPECTED,
            });
        }
        validate_regex(value, H)?;
        trial_match(value, H)?;
    }
    Ok(PurgeOp::PoolRegex(value.to_owned()))
}

/// `blue`, `^blue$`, `static-v2.1`: no quantifier, group, class or alternation, so the
/// regex is a fixed sequence of single-byte tests, linear in the subject.
pub fn is_plain_pool(value: &str) -> bool {
    let inner = value.strip_prefix('^').unwrap_or(value);
    let inner = inner.strip_suffix('$').unwrap_or(inner);
    !inner.is_empty()
        && inner.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'-' | b'.' | b':' | b'/' | b'@' | b'=' | b'%' | b'!' | b','
                )
        })
}

/// Matches `value` (a regex PCRE2 compiles) against worst-case subjects under
/// varnishd's limits, both as varnishd's interpreter runs it (match and depth limit)
/// and JIT-compiled (match limit), and refuses it when any match hits a limit.
/// The subjects: a long `X-Magento-Tags` header of [`TRIAL_HEADER_BYTES`] (with and
/// without a trailing comma), a short one, and for every literal byte of the pattern a
/// run of it, then all of them cycled, each followed by a byte the pattern lacks (the
/// shape that makes nested repetitions backtrack) and the pattern's literals.
pub fn trial_match(value: &str, header: &'static str) -> Result<(), PatternError> {
    if value.starts_with("(*") {
        return Err(PatternError::StartOption { header });
    }
    let limited =
        format!("(*LIMIT_MATCH={VARNISH_MATCH_LIMIT})(*LIMIT_DEPTH={VARNISH_DEPTH_LIMIT}){value}");
    let invalid = |e: pcre2::Error| PatternError::InvalidRegex {
        header,
        reason: e.to_string(),
    };
    let interpreted = pcre2::bytes::RegexBuilder::new()
        .build(&limited)
        .map_err(invalid)?;
    let jit = pcre2::bytes::RegexBuilder::new()
        .jit_if_available(true)
        .build(&format!("(*LIMIT_MATCH={VARNISH_MATCH_LIMIT}){value}"))
        .map_err(invalid)?;
    for (subject, bytes) in trial_subjects(value) {
        for re in [&interpreted, &jit] {
            if let Err(e) = re.is_match(&bytes) {
                return Err(PatternError::TooCostly {
                    header,
                    subject,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// The subjects [`trial_match`] runs, each with what it is.
fn trial_subjects(pattern: &str) -> Vec<(&'static str, Vec<u8>)> {
    let mut long = String::with_capacity(TRIAL_HEADER_BYTES);
    let mut i = 1000;
    loop {
        let item = format!("cat_p_{i},cat_c_{},", i % 97);
        if long.len() + item.len() > TRIAL_HEADER_BYTES {
            break;
        }
        long.push_str(&item);
        i += 1;
    }
    let with_comma = long.clone().into_bytes();
    long.pop();
    let mut literals: Vec<u8> = pattern
        .bytes()
        .filter(|b| b.is_ascii_alphanumeric() || b"_,-.:/@=%!;#~ ".contains(b))
        .collect();
    literals.sort_unstable();
    literals.dedup();
    let stop = [b'!', b'~', b'#', b';', b'"']
        .into_iter()
        .find(|b| !pattern.as_bytes().contains(b))
        .unwrap_or(b'"');
    let mut subjects = vec![
        ("a long X-Magento-Tags header", long.into_bytes()),
        ("a long X-Magento-Tags header ending in a comma", with_comma),
        (
            "a short X-Magento-Tags header",
            b"cat_p_1234,cat_c_56,cat_c_p_7,cms_b_footer".to_vec(),
        ),
    ];
    // After the stop byte, every literal once: PCRE2 skips a subject that lacks a byte
    // the pattern requires, so the run must fail late, with the rest still to come.
    for b in &literals {
        let mut run = vec![*b; 40];
        run.push(stop);
        run.extend_from_slice(&literals);
        subjects.push(("a run of one of the pattern's characters", run));
    }
    if !literals.is_empty() {
        let mut mix: Vec<u8> = literals.iter().copied().cycle().take(64).collect();
        mix.push(stop);
        subjects.push(("the pattern's characters repeated", mix));
    }
    subjects
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

/// Bytes that cannot break the canonical frame and mean themselves in a regex, or (`.`)
/// mean themselves in a tag: a tag `a.b` is purged as exactly that tag.
fn is_plain_tag_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'_' | b'-' | b'.' | b':' | b'/' | b'@' | b'=' | b'%' | b'!'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: Policy = Policy { allow_regex: false };
    const OPEN: Policy = Policy { allow_regex: true };

    fn tags(list: &[&str]) -> PurgeOp {
        PurgeOp::Tags(list.iter().map(|s| s.to_string()).collect())
    }

    /// An `X-Magento-Tags-Pattern` with opaque regexes allowed.
    fn open(raw: &[u8]) -> Result<PurgeOp, PatternError> {
        parse_tags_pattern(raw, OPEN)
    }

    #[test]
    fn canonical_magento_pattern_becomes_tag_set() {
        for policy in [STRICT, OPEN] {
            let op =
                parse_tags_pattern(b"((^|,)cat_p_42(,|$))|((^|,)cat_c_p_7(,|$))", policy).unwrap();
            assert_eq!(op, tags(&["cat_p_42", "cat_c_p_7"]));
            assert_eq!(
                parse_tags_pattern(b"((^|,)cat_p(,|$))", policy).unwrap(),
                tags(&["cat_p"])
            );
            // A dot in a tag is that tag, not "any byte".
            assert_eq!(
                parse_tags_pattern(b"((^|,)cms_b_footer.links(,|$))", policy).unwrap(),
                tags(&["cms_b_footer.links"])
            );
        }
    }

    #[test]
    fn full_flush_only_for_dot_star() {
        assert_eq!(parse_tags_pattern(b".*", STRICT).unwrap(), PurgeOp::All);
        assert_eq!(parse_tags_pattern(b"  .* ", STRICT).unwrap(), PurgeOp::All);
        assert_eq!(open(b"^.*$").unwrap(), PurgeOp::TagsRegex("^.*$".into()));
        assert!(matches!(
            parse_tags_pattern(b"^.*$", STRICT),
            Err(PatternError::Opaque { .. })
        ));
    }

    #[test]
    fn opaque_regexes_are_refused_by_default_with_the_reason() {
        for raw in [
            "cat_p_1",
            "^([a-z0-9_,]+)+,$",
            "((^|,)cat_p_1(,|$))|cat_(c|p)_[0-9]+",
            "((^|,)a(,|$))|",
        ] {
            let err = parse_tags_pattern(raw.as_bytes(), STRICT).unwrap_err();
            assert!(matches!(err, PatternError::Opaque { .. }), "{raw}: {err}");
            let text = err.to_string();
            assert!(
                text.contains("((^|,)TAG(,|$))") && text.contains("allow_regex"),
                "{text}"
            );
        }
        for raw in ["^(a+)+$", "blue|green", "[a-z]+", "a*"] {
            let err = parse_pool(raw.as_bytes(), STRICT).unwrap_err();
            assert!(matches!(err, PatternError::Opaque { .. }), "{raw}: {err}");
        }
    }

    #[test]
    fn plain_pool_names_are_accepted_by_default() {
        for raw in [
            "blue",
            "^blue$",
            "^static-v2.1",
            "pool_7$",
            "a:b/c@d=e%f!g,h",
        ] {
            assert_eq!(
                parse_pool(raw.as_bytes(), STRICT).unwrap(),
                PurgeOp::PoolRegex(raw.into()),
                "{raw}"
            );
        }
        for raw in ["^$", "^", "$", "a b", "a+", "(a)", "a|b", "[a]", "a\\d"] {
            assert!(!is_plain_pool(raw), "{raw}");
        }
    }

    #[test]
    fn backtracking_regexes_are_refused_by_the_trial_match() {
        // The two that crashed varnishd 7.1 on every edge.
        let err = open(b"^([a-z0-9_,]+)+,$").unwrap_err();
        assert!(matches!(err, PatternError::TooCostly { .. }), "{err}");
        assert!(err.to_string().contains("pcre2_match_limit 10000"), "{err}");
        let err = parse_pool(b"^(a+)+$", OPEN).unwrap_err();
        assert!(matches!(err, PatternError::TooCostly { .. }), "{err}");
        for raw in [
            "(a|aa)*$",
            "(x+x+)+y",
            "^(([a-z])+.)+[A-Z]([a-z])+$",
            "(.*a){12}",
        ] {
            assert!(
                matches!(open(raw.as_bytes()), Err(PatternError::TooCostly { .. })),
                "{raw}"
            );
        }
        // A start-of-pattern option could raise the limits the trial ran under.
        assert!(matches!(
            open(b"(*LIMIT_MATCH=100000000)cat"),
            Err(PatternError::StartOption { .. })
        ));
    }

    #[test]
    fn harmless_regexes_pass_the_trial_match() {
        for raw in [
            "cat_p_100(7|8)(,|$)",
            "^cat_p_[0-9]+$",
            "((^|,)cat_p_3(?=,|$))",
            "(^|,)cat_(c|p)_[0-9]+(,|$)",
            "((^|,)cat_p_1(,|$))|cat_(c|p)_[0-9]+",
            ".*x.*y.*z",
        ] {
            assert_eq!(
                open(raw.as_bytes()).unwrap(),
                PurgeOp::TagsRegex(raw.into()),
                "{raw}"
            );
        }
        assert_eq!(
            parse_pool(b"^(blue|green)$", OPEN).unwrap(),
            PurgeOp::PoolRegex("^(blue|green)$".into())
        );
    }

    #[test]
    fn deeply_nested_regexes_are_refused_not_a_stack_overflow() {
        // Found by the waf_compile fuzzer: 150 stacked repetitions overflowed the stack
        // of a debug build under the regex crate's default nest limit.
        let pattern = format!("a{}", "*".repeat(200));
        assert!(matches!(
            open(pattern.as_bytes()),
            Err(PatternError::InvalidRegex { .. })
        ));
        // PCRE2 (varnish's engine) compiles 100 nested groups and refuses past its limit.
        let groups = |n| format!("{}a{}", "(".repeat(n), ")".repeat(n));
        assert!(validate_regex(&groups(100), "X").is_ok());
        assert!(matches!(
            open(groups(300).as_bytes()),
            Err(PatternError::InvalidRegex { .. })
        ));
    }

    #[test]
    fn empty_pattern_is_an_error_not_a_flush() {
        for raw in [&b""[..], b"   ", b"\t"] {
            assert!(matches!(open(raw), Err(PatternError::Empty { .. })));
            assert!(matches!(
                parse_pool(raw, OPEN),
                Err(PatternError::Empty { .. })
            ));
        }
    }

    #[test]
    fn non_canonical_patterns_stay_opaque_regexes() {
        for raw in [
            "cat_p_1",
            "((^|,)cat+p(,|$))",
            "((^|,)a(,|$))|",
            "((^|,)a(,|$))x",
            "((^|,)(,|$))",
        ] {
            assert_eq!(
                open(raw.as_bytes()).unwrap(),
                PurgeOp::TagsRegex(raw.into()),
                "{raw}"
            );
        }
    }

    #[test]
    fn invalid_regex_is_refused_with_reason() {
        let err = open(b"((^|,)cat_p_1(,|$)").unwrap_err();
        assert!(matches!(err, PatternError::InvalidRegex { .. }), "{err}");
        assert!(err.to_string().contains("PCRE2"), "{err}");
        assert!(parse_pool(b"[a-", OPEN).is_err());
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
        let err = open(raw.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        // The same alternation at 8 KB compiles.
        let small: String = raw[raw.len() - 8000..].to_owned();
        let small = &small[small.find("((").unwrap()..];
        assert!(validate_regex(small, "X").is_ok());
        // One 60 KB tag: a canonical pattern, refused for its size.
        let big = format!("((^|,){}(,|$))", "x".repeat(60_000));
        assert!(matches!(
            parse_tags_pattern(big.as_bytes(), STRICT),
            Err(PatternError::TagTooLong { len: 60_000, .. })
        ));
        // PCRE2 and Rust's regex disagree both ways; PCRE2 (varnish's engine) decides.
        assert!(open(b"(?u:cat)_p").is_err(), "Rust-only flag");
        assert!(open(b"(cat)_\\1|(?=x)y").is_ok(), "PCRE2-only syntax");
        assert!(parse_pool(b"(?<=a)b", OPEN).is_ok());
    }

    #[test]
    fn control_chars_and_bad_utf8_are_refused() {
        assert!(matches!(
            open(b"a\nb"),
            Err(PatternError::ControlChar { .. })
        ));
        assert!(matches!(
            open(b"\xff\xfe"),
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
        match parse_tags_pattern(raw.as_bytes(), STRICT).unwrap() {
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
        assert_eq!(
            ok(api_op(
                vec![],
                Some("/a\"b\\c%22é?x=\"1\"".into()),
                None,
                false
            )),
            Ok("url")
        );
        assert_eq!(ok(api_op(vec![], None, None, true)), Ok("all"));
        for bad in [
            api_op(vec![], None, None, false),
            api_op(vec!["a".into()], None, None, true),
            api_op(vec![], Some("no-slash".into()), None, false),
            api_op(vec![], Some("/a b".into()), None, false),
            api_op(vec![], Some("/a".into()), Some("h st".into()), false),
            api_op(vec!["x".repeat(MAX_TAG_BYTES + 1)], None, None, false),
        ] {
            assert!(bad.is_err(), "{bad:?}");
        }
    }
}
