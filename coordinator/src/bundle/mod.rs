//! Config bundles: what an operator pushes, and what each region receives.
//!
//! A [`Bundle`] is a flat set of text files: `main.vcl` (the entry point), any other
//! `.vcl` files it includes as `include "./name.vcl";`, and optionally `waf.toml`. Its
//! *version* is a hash of the exact contents ([`Bundle::version`]), so pushing the same
//! directory twice is the same version and every version is immutable.
//!
//! At rollout a bundle is [`render`]ed per region: `${name}` references are substituted
//! with the region's values ([`vars`]) and `waf.toml` is compiled into `waf.vcl`
//! ([`waf`]). [`check`] renders for every configured region at push time, so an unknown
//! variable, an invalid WAF rule or a missing include is refused before any edge sees
//! it. Whether the VCL itself compiles is varnishd's call, on the canary ([`crate::rollout`]).
//!
//! Versions are kept in the embedded store ([`store`]).

pub mod store;
pub mod vars;
pub mod waf;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use vars::Vars;

/// The entry point every bundle has.
pub const MAIN: &str = "main.vcl";
/// The WAF rules, compiled to [`WAF_VCL`].
pub const WAF_TOML: &str = "waf.toml";
/// The file `waf.toml` compiles into (a bundle cannot bring its own).
pub const WAF_VCL: &str = "waf.vcl";
/// Largest file in a bundle.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;
/// Most files in a bundle.
pub const MAX_FILES: usize = 64;
/// Largest bundle (all files together); it travels in one gRPC message.
pub const MAX_TOTAL_BYTES: usize = 2 * 1024 * 1024;

/// A problem with a bundle, pointing at a file and line where it can.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct BundleError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl BundleError {
    pub fn at(file: &str, line: usize, message: impl Into<String>) -> Self {
        BundleError {
            file: file.into(),
            line: (line > 0).then_some(line),
            message: message.into(),
        }
    }

    pub fn file(file: &str, message: impl Into<String>) -> Self {
        BundleError {
            file: file.into(),
            line: None,
            message: message.into(),
        }
    }
}

/// The files of a bundle, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub files: BTreeMap<String, String>,
}

impl Bundle {
    /// Reads a bundle directory (its regular files; subdirectories are refused).
    pub fn from_dir(dir: &Path) -> Result<Bundle, BundleError> {
        let where_ = dir.display().to_string();
        let entries =
            std::fs::read_dir(dir).map_err(|e| BundleError::file(&where_, e.to_string()))?;
        let mut files = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| BundleError::file(&where_, e.to_string()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.ends_with('~') {
                continue; // editor and VCS droppings
            }
            let path = entry.path();
            if !path.is_file() {
                return Err(BundleError::file(
                    &name,
                    "a bundle is flat: only files, no directories",
                ));
            }
            let meta = path
                .metadata()
                .map_err(|e| BundleError::file(&name, e.to_string()))?;
            if meta.len() > MAX_FILE_BYTES as u64 {
                return Err(BundleError::file(
                    &name,
                    format!("larger than {MAX_FILE_BYTES} bytes"),
                ));
            }
            let text = std::fs::read_to_string(&path).map_err(|e| {
                BundleError::file(&name, format!("not readable as UTF-8 text: {e}"))
            })?;
            files.insert(name, text);
        }
        let bundle = Bundle { files };
        bundle.validate()?;
        Ok(bundle)
    }

    /// Checks names and sizes (not contents).
    pub fn validate(&self) -> Result<(), BundleError> {
        if !self.files.contains_key(MAIN) {
            return Err(BundleError::file(
                MAIN,
                "missing: every bundle needs main.vcl",
            ));
        }
        if self.files.len() > MAX_FILES {
            return Err(BundleError::file(
                MAIN,
                format!("more than {MAX_FILES} files"),
            ));
        }
        let total: usize = self.files.values().map(String::len).sum();
        if total > MAX_TOTAL_BYTES {
            return Err(BundleError::file(
                MAIN,
                format!("the bundle is larger than {MAX_TOTAL_BYTES} bytes"),
            ));
        }
        for (name, text) in &self.files {
            let ok_name = name.len() <= 100
                && !name.starts_with('.')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                && (name.ends_with(".vcl") || name == WAF_TOML);
            if !ok_name {
                return Err(BundleError::file(
                    name,
                    "bundle files are *.vcl or waf.toml, named [A-Za-z0-9._-]",
                ));
            }
            if name == WAF_VCL && self.files.contains_key(WAF_TOML) {
                return Err(BundleError::file(
                    name,
                    "waf.vcl is generated from waf.toml; remove one",
                ));
            }
            if text.len() > MAX_FILE_BYTES {
                return Err(BundleError::file(
                    name,
                    format!("larger than {MAX_FILE_BYTES} bytes"),
                ));
            }
            if text.contains('\0') {
                return Err(BundleError::file(name, "contains a NUL byte"));
            }
        }
        Ok(())
    }

    /// The content hash naming this version: 16 hex digits of SHA-256 over every
    /// file's name and content, length-prefixed so no two bundles collide by shifting.
    pub fn version(&self) -> String {
        let mut h = Sha256::new();
        for (name, text) in &self.files {
            h.update((name.len() as u64).to_be_bytes());
            h.update(name.as_bytes());
            h.update((text.len() as u64).to_be_bytes());
            h.update(text.as_bytes());
        }
        hex::encode(&h.finalize()[..8])
    }
}

/// The files one region receives: variables substituted, `waf.toml` compiled.
pub fn render(bundle: &Bundle, vars: &Vars) -> Result<BTreeMap<String, String>, BundleError> {
    let mut out = BTreeMap::new();
    for (name, text) in &bundle.files {
        if name == WAF_TOML {
            out.insert(WAF_VCL.to_owned(), waf::compile(text)?);
        } else {
            let rendered = vars::substitute(text, vars, name)?;
            check_no_secret_in_comments(name, &rendered, vars)?;
            out.insert(name.clone(), rendered);
        }
    }
    check_includes(&out)?;
    Ok(out)
}

/// A secret (`${warm_token}`) belongs in code, never in a comment: a comment is copied
/// into every listing of the VCL (`vcl.show`) and read by whoever reads the file.
fn check_no_secret_in_comments(name: &str, rendered: &str, vars: &Vars) -> Result<(), BundleError> {
    for (var, value) in vars.secrets() {
        if let Some((line, _)) = proto::vcl::comments(rendered)
            .into_iter()
            .find(|(_, c)| c.contains(value))
        {
            return Err(BundleError::at(
                name,
                line,
                format!("${{{var}}} is a secret: use it in code, not in a comment (write $${{{var}}} to name it)"),
            ));
        }
    }
    Ok(())
}

/// Renders for every region (and for the built-ins alone when none is configured).
pub fn check(bundle: &Bundle, regions: &BTreeMap<String, Vars>) -> Result<(), BundleError> {
    bundle.validate()?;
    if regions.is_empty() {
        render(bundle, &Vars::for_region("default", &BTreeMap::new()))?;
    }
    for vars in regions.values() {
        render(bundle, vars)?;
    }
    Ok(())
}

/// Every `include` of a bundle file must name a file of the bundle as `./name`
/// (varnishd resolves anything else outside it: absolute paths, `..`, bare names in its
/// `vcl_path`), no VMOD is imported from a path, nothing reads the edge's files
/// ([`proto::vcl::scan`], the check the agent repeats), and `waf.vcl` must be included
/// when it exists.
fn check_includes(files: &BTreeMap<String, String>) -> Result<(), BundleError> {
    let mut included = std::collections::BTreeSet::new();
    let in_bundle = |n: &str| files.contains_key(n);
    for (name, text) in files.iter().filter(|(n, _)| n.ends_with(".vcl")) {
        let found = proto::vcl::scan(name, text, &in_bundle)
            .map_err(|r| BundleError::at(&r.file, r.line, r.message))?;
        included.extend(found);
    }
    if files.contains_key(WAF_VCL) && !included.contains(WAF_VCL) {
        return Err(BundleError::file(
            MAIN,
            "waf.toml is in the bundle but no file has include \"./waf.vcl\"; put it before vcl_recv",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(files: &[(&str, &str)]) -> Bundle {
        Bundle {
            files: files
                .iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect(),
        }
    }

    #[test]
    fn version_is_a_content_hash() {
        let a = bundle(&[("main.vcl", "vcl 4.1;")]);
        let b = bundle(&[("main.vcl", "vcl 4.1; ")]);
        assert_eq!(a.version(), a.clone().version());
        assert_ne!(a.version(), b.version());
        assert_eq!(a.version().len(), 16);
        // Moving bytes between name and content changes the hash.
        let c = bundle(&[("main.vcl", "ab"), ("x.vcl", "")]);
        let d = bundle(&[("main.vcl", "a"), ("bx.vcl", "")]);
        assert_ne!(c.version(), d.version());
    }

    #[test]
    fn names_and_layout_are_checked() {
        assert!(bundle(&[("x.vcl", "")]).validate().is_err());
        assert!(bundle(&[("main.vcl", ""), ("../x.vcl", "")])
            .validate()
            .is_err());
        assert!(bundle(&[("main.vcl", ""), ("notes.txt", "")])
            .validate()
            .is_err());
        assert!(
            bundle(&[("main.vcl", ""), ("waf.vcl", ""), ("waf.toml", "")])
                .validate()
                .is_err()
        );
    }

    #[test]
    fn render_checks_includes_and_waf() {
        let vars = Vars::for_region("eu", &BTreeMap::new());
        let ok = bundle(&[
            (
                "main.vcl",
                "vcl 4.1;\ninclude \"./waf.vcl\";\ninclude \"./extra.vcl\";\n# ${region}",
            ),
            ("extra.vcl", ""),
            ("waf.toml", "[[block]]\nprefix = \"/downloader\"\n"),
        ]);
        let out = render(&ok, &vars).unwrap();
        assert!(out["main.vcl"].ends_with("# eu"));
        assert!(out["waf.vcl"].contains("sub vcl_recv"));
        assert!(!out.contains_key("waf.toml"));

        let bare = bundle(&[("main.vcl", "include \"extra.vcl\";"), ("extra.vcl", "")]);
        let err = render(&bare, &vars).unwrap_err().to_string();
        assert!(
            err.starts_with("main.vcl:1:") && err.contains("./name"),
            "{err}"
        );
        // Out of the bundle, in every spelling varnishd would follow.
        for (text, line) in [
            ("vcl 4.1;\ninclude \"../../../etc/passwd\";", 2),
            ("include \"/etc/passwd\";", 1),
            ("include\n  # a comment\n  \"/etc/passwd\";", 3),
            ("include \"./extra.vcl/../../etc/passwd\";", 1),
            ("import std from \"/tmp/x.so\";", 1),
            (
                "sub vcl_deliver { set resp.http.x = std.fileread(\"/etc/passwd\"); }",
                1,
            ),
        ] {
            let b = bundle(&[("main.vcl", text), ("extra.vcl", "")]);
            let err = check(&b, &BTreeMap::new()).unwrap_err();
            assert_eq!(
                (err.file.as_str(), err.line),
                ("main.vcl", Some(line)),
                "{text}: {err}"
            );
        }
        let in_extra = bundle(&[
            ("main.vcl", "include \"./extra.vcl\";"),
            ("extra.vcl", "\n\ninclude \"/etc/shadow\";"),
        ]);
        assert!(render(&in_extra, &vars)
            .unwrap_err()
            .to_string()
            .starts_with("extra.vcl:3:"));
        let missing = bundle(&[("main.vcl", "\n include \"./nope.vcl\";")]);
        assert!(render(&missing, &vars)
            .unwrap_err()
            .to_string()
            .starts_with("main.vcl:2:"));
        let not_included = bundle(&[("main.vcl", "vcl 4.1;"), ("waf.toml", "")]);
        assert!(render(&not_included, &vars).is_err());
    }

    #[test]
    fn a_secret_in_a_comment_is_refused() {
        let vars = Vars::for_region("eu", &BTreeMap::new()).with_warm_token("s3cr3t-t0ken-value");
        let code = bundle(&[(
            "main.vcl",
            "# the token: $${warm_token}\nif (req.http.X-Warm-Token == \"${warm_token}\") {}",
        )]);
        let out = render(&code, &vars).unwrap();
        assert!(out["main.vcl"].contains("\"s3cr3t-t0ken-value\""));
        for text in [
            "# ${warm_token}",
            "x;\n// ${warm_token}",
            "\n\n/* a\n${warm_token} */",
        ] {
            let b = bundle(&[("main.vcl", text)]);
            let err = render(&b, &vars).unwrap_err();
            assert_eq!(
                err.line,
                Some(text.matches('\n').count().min(2) + 1),
                "{text:?}: {err}"
            );
            assert!(!err.to_string().contains("s3cr3t"), "{err}");
        }
    }

    #[test]
    fn check_renders_every_region() {
        let mut regions = BTreeMap::new();
        let mut with = BTreeMap::new();
        with.insert("backend_host".to_owned(), "a".to_owned());
        regions.insert("eu".to_owned(), Vars::for_region("eu", &with));
        regions.insert("us".to_owned(), Vars::for_region("us", &BTreeMap::new()));
        let b = bundle(&[("main.vcl", "${backend_host}")]);
        let err = check(&b, &regions).unwrap_err().to_string();
        assert!(err.contains("\"us\""), "{err}");
    }
}
