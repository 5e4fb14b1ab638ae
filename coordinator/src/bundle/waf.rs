//! The WAF compiler: `waf.toml` in, `waf.vcl` out.
//!
//! The generated file defines its own `vcl_recv` and `vcl_synth`. Varnish concatenates
//! every definition of a built-in subroutine in the order it reads them, so when
//! `main.vcl` says `include "./waf.vcl";` before its own `vcl_recv`, the WAF runs first
//! on every request and a blocked request is answered with a synthetic response: it never
//! reaches the backend.
//!
//! Rules are checked in this order: size limits (414/431), `[deny]` (403), `[allow]`
//! (403), `[methods]` (405), `[[block]]` (403), `[[allow_only]]` (403),
//! `[[basic_auth]]` (401), `[[rate_limit]]` (429, per client IP, vsthrottle). Paths are
//! matched against `req.url` (path and query): `path` is a regex, `prefix` a literal.
//!
//! Nothing from the rules reaches the VCL unchecked: regexes are validated and rewritten
//! so that no `"` (the only character that ends a VCL string) or control character
//! survives ([`vcl_regex`]); literals become escaped regexes; CIDRs, methods, header
//! names and numbers are re-printed from their parsed form; credentials become base64.
//! An invalid rule is an error naming its line in `waf.toml`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::BundleError;

const FILE: &str = "waf.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WafFile {
    #[serde(default)]
    block: Vec<Spanned<BlockRule>>,
    #[serde(default)]
    allow_only: Vec<Spanned<AllowOnlyRule>>,
    #[serde(default)]
    basic_auth: Vec<Spanned<BasicAuthRule>>,
    #[serde(default)]
    rate_limit: Vec<Spanned<RateLimitRule>>,
    deny: Option<Spanned<CidrRule>>,
    allow: Option<Spanned<CidrRule>>,
    methods: Option<Spanned<MethodsRule>>,
    limits: Option<Spanned<LimitsRule>>,
}

/// `[[block]]`: matching requests get `status` (403).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockRule {
    path: Option<String>,
    prefix: Option<String>,
    /// Only these methods (all when absent).
    methods: Option<Vec<String>>,
    status: Option<u16>,
}

/// `[[allow_only]]`: matching requests only from `cidrs`, else `status` (403).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowOnlyRule {
    path: Option<String>,
    prefix: Option<String>,
    #[serde(deserialize_with = "daemon::cidr::list")]
    cidrs: Vec<IpNet>,
    status: Option<u16>,
}

/// `[[basic_auth]]`: matching requests need these credentials, else 401.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicAuthRule {
    path: Option<String>,
    prefix: Option<String>,
    user: String,
    password: String,
    realm: Option<String>,
}

/// `[[rate_limit]]`: more than `limit` matching requests per `period_s` from one client
/// IP get `status` (429).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitRule {
    path: Option<String>,
    prefix: Option<String>,
    methods: Option<Vec<String>>,
    limit: u32,
    period_s: u32,
    status: Option<u16>,
}

/// `[deny]` (these clients get `status`) and `[allow]` (only these clients are served).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CidrRule {
    #[serde(deserialize_with = "daemon::cidr::list")]
    cidrs: Vec<IpNet>,
    status: Option<u16>,
}

/// `[methods]`: only these request methods; others get `status` (405). PURGE is left
/// to the main VCL's purge ACL.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MethodsRule {
    allow: Vec<String>,
    status: Option<u16>,
}

/// `[limits]`: `max_url_bytes` (414) and `max_header_bytes` per named header (431).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsRule {
    max_url_bytes: Option<u32>,
    #[serde(default)]
    max_header_bytes: BTreeMap<String, u32>,
}

/// Compiles `waf.toml` source into the text of `waf.vcl`.
pub fn compile(source: &str) -> Result<String, BundleError> {
    // The config loader's reader: a refused value is named with its key and as written
    // (`deny.cidrs[0]: "10.0.0.1/8": ...`).
    let waf: WafFile = daemon::config::parse(source)
        .map_err(|e| BundleError::at(FILE, e.at.map_or(0, |(line, _)| line), e.message))?;
    let mut c = Compiler {
        source,
        acls: String::new(),
        recv: String::new(),
    };
    if let Some(rule) = &waf.limits {
        c.limits(rule)?;
    }
    if let Some(rule) = &waf.deny {
        let acl = c.acl("waf_deny", &rule.get_ref().cidrs, rule)?;
        let status = c.status(rule, rule.get_ref().status, 403)?;
        c.emit(rule, "deny", &format!("client.ip ~ {acl}"), status);
    }
    if let Some(rule) = &waf.allow {
        let acl = c.acl("waf_allow", &rule.get_ref().cidrs, rule)?;
        let status = c.status(rule, rule.get_ref().status, 403)?;
        c.emit(rule, "allow", &format!("client.ip !~ {acl}"), status);
    }
    if let Some(rule) = &waf.methods {
        let m = c.methods(rule, &rule.get_ref().allow)?;
        let status = c.status(rule, rule.get_ref().status, 405)?;
        c.emit(
            rule,
            "methods",
            &format!("req.method != \"PURGE\" && !({m})"),
            status,
        );
    }
    for (i, rule) in waf.block.iter().enumerate() {
        let r = rule.get_ref();
        let mut cond = c.matcher(rule, &r.path, &r.prefix)?;
        if let Some(methods) = &r.methods {
            cond = format!("{cond} && ({})", c.methods(rule, methods)?);
        }
        let status = c.status(rule, r.status, 403)?;
        c.emit(rule, &format!("block[{i}]"), &cond, status);
    }
    for (i, rule) in waf.allow_only.iter().enumerate() {
        let r = rule.get_ref();
        let cond = c.matcher(rule, &r.path, &r.prefix)?;
        let acl = c.acl(&format!("waf_allow_only_{i}"), &r.cidrs, rule)?;
        let status = c.status(rule, r.status, 403)?;
        c.emit(
            rule,
            &format!("allow_only[{i}]"),
            &format!("{cond} && client.ip !~ {acl}"),
            status,
        );
    }
    for (i, rule) in waf.basic_auth.iter().enumerate() {
        let r = rule.get_ref();
        let cond = c.matcher(rule, &r.path, &r.prefix)?;
        if r.user.is_empty() || r.user.contains(':') || r.user.chars().any(char::is_control) {
            return Err(c.err(
                rule,
                "basic_auth.user must be non-empty, without ':' or control characters",
            ));
        }
        if r.password.chars().any(char::is_control) {
            return Err(c.err(
                rule,
                "basic_auth.password must not contain control characters",
            ));
        }
        let realm = r.realm.as_deref().unwrap_or("Restricted");
        if realm.is_empty()
            || !realm
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || " ._-".contains(ch))
        {
            return Err(c.err(rule, "basic_auth.realm must be [A-Za-z0-9 ._-]"));
        }
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", r.user, r.password));
        let _ = writeln!(
            c.recv,
            "    # basic_auth[{i}] (waf.toml line {line})\n    if ({cond} && req.http.Authorization != \"Basic {token}\") {{\n        set req.http.X-Waf-Rule = \"basic_auth[{i}]\";\n        set req.http.X-Waf-Realm = {{\"\"{realm}\"\"}};\n        return (synth(401, \"Unauthorized\"));\n    }}",
            line = c.line(rule),
        );
    }
    for (i, rule) in waf.rate_limit.iter().enumerate() {
        let r = rule.get_ref();
        let mut cond = c.matcher(rule, &r.path, &r.prefix)?;
        if let Some(methods) = &r.methods {
            cond = format!("{cond} && ({})", c.methods(rule, methods)?);
        }
        if r.limit == 0 || r.period_s == 0 {
            return Err(c.err(
                rule,
                "rate_limit.limit and rate_limit.period_s must be positive",
            ));
        }
        let status = c.status(rule, r.status, 429)?;
        c.emit(
            rule,
            &format!("rate_limit[{i}]"),
            &format!(
                "{cond} && vsthrottle.is_denied(\"waf-rl{i}-\" + client.ip, {}, {}s)",
                r.limit, r.period_s
            ),
            status,
        );
    }
    Ok(format!(
        "# Generated from waf.toml by the coordinator; edit waf.toml, not this file.\n\
         import std;\nimport vsthrottle;\n\n{acls}\n\
         sub vcl_recv {{\n    unset req.http.X-Waf-Rule;\n    unset req.http.X-Waf-Realm;\n{recv}}}\n\n\
         sub vcl_synth {{\n    if (req.http.X-Waf-Rule) {{\n        set resp.http.X-Waf-Rule = req.http.X-Waf-Rule;\n    }}\n    \
         if (resp.status == 401 && req.http.X-Waf-Realm) {{\n        set resp.http.WWW-Authenticate = \"Basic realm=\" + req.http.X-Waf-Realm;\n    }}\n}}\n",
        acls = c.acls,
        recv = c.recv,
    ))
}

struct Compiler<'a> {
    source: &'a str,
    acls: String,
    recv: String,
}

impl Compiler<'_> {
    fn line<T>(&self, rule: &Spanned<T>) -> usize {
        line_at(self.source, rule.span().start)
    }

    fn err<T>(&self, rule: &Spanned<T>, message: impl Into<String>) -> BundleError {
        BundleError::at(FILE, self.line(rule), message)
    }

    fn emit<T>(&mut self, rule: &Spanned<T>, name: &str, cond: &str, status: u16) {
        let _ = writeln!(
            self.recv,
            "    # {name} (waf.toml line {line})\n    if ({cond}) {{\n        set req.http.X-Waf-Rule = \"{name}\";\n        return (synth({status}, \"{reason}\"));\n    }}",
            line = self.line(rule),
            reason = reason(status),
        );
    }

    fn status<T>(
        &self,
        rule: &Spanned<T>,
        status: Option<u16>,
        default: u16,
    ) -> Result<u16, BundleError> {
        match status {
            None => Ok(default),
            Some(s) if (400..=599).contains(&s) => Ok(s),
            Some(s) => Err(self.err(rule, format!("status {s} must be 400..=599"))),
        }
    }

    /// The `req.url` condition for a rule's `path` (regex) or `prefix` (literal).
    fn matcher<T>(
        &self,
        rule: &Spanned<T>,
        path: &Option<String>,
        prefix: &Option<String>,
    ) -> Result<String, BundleError> {
        let regex = match (path, prefix) {
            (Some(p), None) => p.clone(),
            (None, Some(p)) => {
                if !p.starts_with('/') {
                    return Err(self.err(rule, "prefix must start with /"));
                }
                format!("^{}", regex::escape(p))
            }
            _ => return Err(self.err(rule, "give exactly one of `path` (regex) or `prefix`")),
        };
        let quoted = vcl_regex(&regex).map_err(|m| self.err(rule, m))?;
        Ok(format!("req.url ~ {quoted}"))
    }

    fn methods<T>(&self, rule: &Spanned<T>, methods: &[String]) -> Result<String, BundleError> {
        if methods.is_empty() {
            return Err(self.err(rule, "methods must not be empty"));
        }
        let mut parts = Vec::new();
        for m in methods {
            if m.is_empty() || m.len() > 32 || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(self.err(rule, format!("method {m:?} must be upper-case letters")));
            }
            parts.push(format!("req.method == \"{m}\""));
        }
        Ok(parts.join(" || "))
    }

    fn acl<T>(
        &mut self,
        name: &str,
        cidrs: &[IpNet],
        rule: &Spanned<T>,
    ) -> Result<String, BundleError> {
        if cidrs.is_empty() {
            return Err(self.err(rule, "cidrs must not be empty"));
        }
        let _ = writeln!(self.acls, "acl {name} {{");
        for net in cidrs {
            let _ = writeln!(self.acls, "    \"{}\"/{};", net.network(), net.prefix_len());
        }
        let _ = writeln!(self.acls, "}}");
        Ok(name.to_owned())
    }

    fn limits(&mut self, rule: &Spanned<LimitsRule>) -> Result<(), BundleError> {
        let r = rule.get_ref();
        if let Some(max) = r.max_url_bytes {
            let n = length_bound(max)
                .ok_or_else(|| self.err(rule, "max_url_bytes must be 1..=65535"))?;
            self.emit(
                rule,
                "limits.max_url_bytes",
                &format!("req.url ~ \"^(?s).{{{n}}}\""),
                414,
            );
        }
        for (header, max) in &r.max_header_bytes {
            if header.is_empty()
                || !header
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(self.err(rule, format!("header name {header:?} must be [A-Za-z0-9-]")));
            }
            let n = length_bound(*max)
                .ok_or_else(|| self.err(rule, "max_header_bytes values must be 1..=65535"))?;
            self.emit(
                rule,
                &format!("limits.max_header_bytes.{header}"),
                &format!("req.http.{header} ~ \"^(?s).{{{n}}}\""),
                431,
            );
        }
        Ok(())
    }
}

/// A limit of `max` bytes is exceeded by a value matching `.{max+1}`; PCRE's repeat
/// count tops out at 65535.
fn length_bound(max: u32) -> Option<u32> {
    (1..65535).contains(&max).then_some(max + 1)
}

fn line_at(source: &str, offset: usize) -> usize {
    source[..offset.min(source.len())].matches('\n').count() + 1
}

fn reason(status: u16) -> &'static str {
    match status {
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        503 => "Service Unavailable",
        _ => "Blocked",
    }
}

/// A regex as a VCL string literal that means exactly the same to PCRE.
///
/// VCL strings have no escapes: a `"` ends them and a newline is not allowed. So `"`
/// and control characters (escaped or not) become PCRE `\xHH`, which PCRE reads as the
/// same character in and out of classes. Non-ASCII is refused (URLs arrive
/// percent-encoded anyway). The regex must compile in PCRE2, the library varnishd
/// compiles it with.
pub fn vcl_regex(regex: &str) -> Result<String, String> {
    if regex.is_empty() {
        return Err("regex must not be empty".into());
    }
    if !regex.is_ascii() {
        return Err("regex must be ASCII (percent-encode other characters as in the URL)".into());
    }
    // varnishd's own PCRE2 is the judge (look-ahead and back-references included), as
    // for purge patterns; a leading (*...) option could lift its limits.
    if regex.starts_with("(*") {
        return Err(
            "invalid regex: a leading (*...) option could lift varnish's PCRE2 limits; refused"
                .into(),
        );
    }
    crate::purge::pattern::validate_regex(regex, "path")
        .map_err(|e| format!("invalid regex: {}", e.to_string().replace('\n', " ")))?;
    let mut out = String::with_capacity(regex.len() + 2);
    out.push('"');
    let mut chars = regex.chars();
    while let Some(c) = chars.next() {
        let c = if c == '\\' {
            match chars.next() {
                Some(n) if n == '"' || n.is_ascii_control() => n,
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                    continue;
                }
                None => return Err("regex ends with a lone backslash".into()),
            }
        } else {
            c
        };
        if c == '"' || c.is_ascii_control() {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out.push('"');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[[block]]
path = "^/(downloader|phpmyadmin)"
[[allow_only]]
path = "^/admin"
cidrs = ["10.0.0.0/8"]
[[basic_auth]]
path = "^/"
user = "staging"
password = "s3cret"
[[rate_limit]]
path = "^/customer/account/loginPost"
limit = 5
period_s = 60
[deny]
cidrs = ["203.0.113.0/24"]
"#;

    #[test]
    fn design_sample_compiles() {
        let vcl = compile(SAMPLE).unwrap();
        assert!(
            vcl.contains("acl waf_deny {\n    \"203.0.113.0\"/24;\n}"),
            "{vcl}"
        );
        assert!(
            vcl.contains("req.url ~ \"^/(downloader|phpmyadmin)\""),
            "{vcl}"
        );
        assert!(vcl.contains("client.ip !~ waf_allow_only_0"), "{vcl}");
        assert!(vcl.contains("vsthrottle.is_denied(\"waf-rl0-\" + client.ip, 5, 60s)"));
        // base64("staging:s3cret")
        assert!(vcl.contains("Basic c3RhZ2luZzpzM2NyZXQ="), "{vcl}");
        // deny comes before block, block before rate limits.
        let deny = vcl.find("# deny").unwrap();
        let block = vcl.find("# block[0]").unwrap();
        let rl = vcl.find("# rate_limit[0]").unwrap();
        assert!(deny < block && block < rl);
    }

    #[test]
    fn errors_name_the_rule_line() {
        let bad = "[[block]]\npath = \"^/ok\"\n\n[[block]]\npath = \"^/(unclosed\"\n";
        let err = compile(bad).unwrap_err().to_string();
        assert!(err.starts_with("waf.toml:4:"), "{err}");
        assert!(err.contains("invalid regex"), "{err}");
        let unknown = "[[block]]\npaht = \"^/x\"\n";
        let err = compile(unknown).unwrap_err().to_string();
        assert!(err.starts_with("waf.toml:"), "{err}");
        assert!(err.contains("paht"), "{err}");
        assert!(compile("[[block]]\npath = \"/x\"\nprefix = \"/y\"\n").is_err());
        assert!(compile("[[rate_limit]]\nprefix = \"/x\"\nlimit = 0\nperiod_s = 1\n").is_err());
        assert!(compile("[deny]\ncidrs = [\"300.0.0.0/8\"]\n").is_err());
        assert!(compile("[methods]\nallow = [\"GET\\\"\"]\n").is_err());
        assert!(
            compile("[[basic_auth]]\nprefix = \"/\"\nuser = \"a:b\"\npassword = \"x\"\n").is_err()
        );
    }

    #[test]
    fn regexes_are_judged_by_pcre2_and_cidrs_are_quoted() {
        // Look-ahead and back-references: PCRE2 (varnishd) reads them, so they pass.
        for path in ["^/(?!admin)", "^/(a)\\\\1", "^/x(?=y)"] {
            let waf = format!("[[block]]\npath = \"{path}\"\n");
            assert!(compile(&waf).is_ok(), "{path}: {:?}", compile(&waf));
        }
        assert!(vcl_regex("(*LIMIT_MATCH=99999999)a").is_err());
        let err = compile("[deny]\ncidrs = [\"10.0.0.0/8\", \"10.0.0.300/8\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("waf.toml:2:") && err.contains("\"10.0.0.300/8\""),
            "{err}"
        );
        let err = compile("[[allow_only]]\nprefix = \"/admin\"\ncidrs = [\"10.0.0.1/8\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("it means 10.0.0.0/8"), "{err}");
    }

    #[test]
    fn regex_quoting_never_leaves_a_quote_or_newline() {
        assert_eq!(vcl_regex("^/a\"b").unwrap(), "\"^/a\\x22b\"");
        assert_eq!(vcl_regex("^/a\\\"b").unwrap(), "\"^/a\\x22b\"");
        assert_eq!(vcl_regex("[^\"]\n").unwrap(), "\"[^\\x22]\\x0a\"");
        assert_eq!(vcl_regex("\\.php$").unwrap(), "\"\\.php$\"");
        assert!(vcl_regex("caf\u{e9}").is_err());
        assert!(vcl_regex("(").is_err());
        for input in ["\"}", "\\\"}\n{\"", "a\"b\\\\\"c", "\\\n"] {
            if let Ok(out) = vcl_regex(input) {
                let inner = &out[1..out.len() - 1];
                assert!(
                    !inner.contains('"') && !inner.contains('\n'),
                    "{input:?} -> {out:?}"
                );
            }
        }
    }

    #[test]
    fn prefixes_are_literal() {
        let vcl = compile("[[block]]\nprefix = \"/a.b?(c)\"\n").unwrap();
        assert!(vcl.contains(r#"req.url ~ "^/a\.b\?\(c\)""#), "{vcl}");
    }
}
