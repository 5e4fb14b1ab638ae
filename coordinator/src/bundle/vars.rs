//! Per-region values in a bundle: `${name}` is replaced by the region's value.
//!
//! Syntax, in every `.vcl` file of a bundle:
//!
//! * `${name}` — the value of `name` from the region's `[regions.vars]` in
//!   coordinator.toml; `name` is `[A-Za-z_][A-Za-z0-9_]*`. `${region}` is always the
//!   region's name, `${warm_token}` the secret the coordinator's warm requests are signed
//!   with (`warmer::sign`: the VCL checks `X-Warm-Sig`, then shows cache tags and honours
//!   refreshes), `${warm_tier_token}` what a satellite sends its shield to see tags, and
//!   `${max_stale_s}` how long a stale copy may be served while the backend is healthy
//!   (`[purge] refresh_max_stale_s` in refresh mode, Magento's 300 otherwise).
//! * `$${` — a literal `${` (nothing is substituted).
//!
//! A `${` that does not form a valid reference, or a name some region does not define,
//! is an error at push time with the file and line, never a surprise on an edge.

use std::collections::BTreeMap;

use super::BundleError;

/// The values one region substitutes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vars {
    region: String,
    values: BTreeMap<String, String>,
}

impl Vars {
    /// The region's own values plus the built-in `region`.
    pub fn for_region(region: &str, values: &BTreeMap<String, String>) -> Self {
        let mut values = values.clone();
        values.insert("region".into(), region.into());
        Vars {
            region: region.into(),
            values,
        }
    }

    /// Adds the built-ins `warm_token` and `warm_tier_token`.
    pub fn with_warm_token(mut self, token: &str) -> Self {
        self.values.insert("warm_token".into(), token.into());
        self.values
            .insert("warm_tier_token".into(), warmer::sign::tier_token(token));
        self
    }

    /// Adds the built-in `max_stale_s` (seconds).
    pub fn with_max_stale(mut self, secs: u64) -> Self {
        self.values.insert("max_stale_s".into(), secs.to_string());
        self
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// The values that are secrets (the warm token), which a rendered file may hold
    /// only in code, never in a comment.
    pub fn secrets(&self) -> impl Iterator<Item = (&str, &str)> {
        SECRET_VARS.iter().filter_map(|name| {
            self.values
                .get(*name)
                .filter(|v| !v.is_empty())
                .map(|v| (*name, v.as_str()))
        })
    }
}

impl Vars {
    /// `text` with every secret value written back as the variable that holds it
    /// (`${warm_token}`): varnishd quotes the source line of a compile error, and that
    /// line may hold the token; the error is stored, shown and logged.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (name, value) in self.secrets() {
            out = out.replace(value, &format!("${{{name}}}"));
        }
        out
    }
}

/// Variables whose values are secrets (those a region does not have are skipped).
pub const SECRET_VARS: [&str; 2] = ["warm_token", "warm_tier_token"];

/// Whether `name` is a valid variable name.
pub fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Substitutes every reference in `text` (from bundle file `file`).
pub fn substitute(text: &str, vars: &Vars, file: &str) -> Result<String, BundleError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let line_of = |rest: &str| text[..text.len() - rest.len()].matches('\n').count() + 1;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let Some(end) = after.find('}').filter(|&e| is_name(&after[..e])) else {
                return Err(BundleError::at(
                    file,
                    line_of(tail),
                    "`${` must start a `${name}` reference (write `$${` for a literal `${`)",
                ));
            };
            let name = &after[..end];
            let Some(value) = vars.values.get(name) else {
                return Err(BundleError::at(
                    file,
                    line_of(tail),
                    format!(
                        "unknown variable ${{{name}}} for region {:?} (define it in its [regions.vars])",
                        vars.region
                    ),
                ));
            };
            out.push_str(value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        let mut v = BTreeMap::new();
        v.insert("backend_host".to_owned(), "10.0.0.5".to_owned());
        Vars::for_region("eu-west", &v)
    }

    #[test]
    fn substitutes_values_and_builtins() {
        let out = substitute(
            "a ${backend_host} b ${region} $x $${literal} $",
            &vars(),
            "main.vcl",
        )
        .unwrap();
        assert_eq!(out, "a 10.0.0.5 b eu-west $x ${literal} $");
    }

    #[test]
    fn unknown_variable_names_file_and_line() {
        let err = substitute("vcl 4.1;\n\n .host = \"${nope}\";", &vars(), "main.vcl")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("main.vcl:3:"), "{err}");
        assert!(err.contains("${nope}") && err.contains("eu-west"), "{err}");
    }

    #[test]
    fn redact_writes_secrets_back_as_their_names() {
        let v = vars().with_warm_token("t0k3n");
        let tier = warmer::sign::tier_token("t0k3n");
        let text = format!("== \"t0k3n\" and {tier} and t0k");
        assert_eq!(
            v.redact(&text),
            "== \"${warm_token}\" and ${warm_tier_token} and t0k"
        );
        assert_eq!(vars().redact("t0k3n"), "t0k3n");
    }

    #[test]
    fn malformed_reference_is_an_error() {
        assert!(substitute("${", &vars(), "x.vcl").is_err());
        assert!(substitute("${9x}", &vars(), "x.vcl").is_err());
        assert!(substitute("${a b}", &vars(), "x.vcl").is_err());
    }
}
