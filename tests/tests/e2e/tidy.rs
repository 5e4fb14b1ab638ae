//! ARCHITECTURE.md names only what exists: every backticked path and every backticked Rust
//! name in it is looked up in the repository, so a renamed file, type or test fails here
//! instead of leaving the map wrong. Reads files only; starts no process.
//!
//! The rule, for each inline code span of ARCHITECTURE.md (fenced blocks are skipped; a
//! span must not break across lines):
//!
//! - **Skipped**: a span holding a space, `<`, `{`, `"`, `=`, `*`, `?`, `$`, `[` or `,`
//!   (commands, config lines, JSON, placeholders, globs), or starting with `/`, `-` or
//!   `.` (HTTP routes, flags, relative includes).
//! - **A path**: a span whose first `/`-separated segment is a top-level entry of the
//!   repository (`coordinator/src/...`, `tests/...`, `scripts/...`) must exist from the
//!   root. A span ending in `.rs`, `.md`, `.toml`, `.proto`, `.py`, `.sh`, `.vcl` or
//!   `.html` is a file: it must exist from the root or be the tail of a file's path
//!   (`monitor/ledger.rs`, `edge.proto`). Other spans with a `/` are not paths (etcd keys
//!   such as `log/head`) and are skipped.
//! - **A Rust name**: a span with `::`, a CamelCase identifier (`PurgeLog`), a name ending
//!   in `()` or `!` (`now_ms()`, `assert_eventually!`). Each segment of `a::b::C` must be
//!   defined in the Rust sources (or, for a type, in a `.proto` file as a message, enum or
//!   service): a lower-case segment as a crate, module (`mod x`, `x.rs`, a folder of `.rs`
//!   files) or, when last, a `fn` (tests are `fn`s); a CamelCase one as a `struct`,
//!   `enum`, `trait`, `type` or `union`, or after a type as its variant; an
//!   UPPER_CASE one as a `const` or `static`; `name!` as a `macro_rules!`.
//! - Anything else (a lower-case word such as a config key, `leading`, `seq`; an
//!   UPPER_CASE word such as `PURGE` or `SIGHUP`; a file name with another extension such
//!   as `purges.redb`) is prose and not checked.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
}

const FILE_EXTENSIONS: &[&str] = &[
    ".rs", ".md", ".toml", ".proto", ".py", ".sh", ".vcl", ".html",
];

/// What the repository defines, gathered once.
#[derive(Default)]
struct Index {
    /// Every file's path from the root, `/`-separated.
    files: Vec<String>,
    /// Every directory's path from the root.
    dirs: HashSet<String>,
    /// Crates, `mod` names, `.rs` file stems and folders holding `.rs` files.
    modules: HashSet<String>,
    functions: HashSet<String>,
    types: HashSet<String>,
    consts: HashSet<String>,
    macros: HashSet<String>,
    /// Lines that start with a CamelCase identifier: enum variants (over-approximated).
    variants: HashSet<String>,
}

impl Index {
    fn build(root: &Path) -> Index {
        let mut index = Index::default();
        index.walk(root, root);
        index
    }

    fn walk(&mut self, root: &Path, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = relative(root, &path);
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if name == ".git" || name == "target" || rel == "fuzz/corpus" {
                    continue;
                }
                self.dirs.insert(rel);
                self.walk(root, &path);
                continue;
            }
            if let Some(stem) = name.strip_suffix(".rs") {
                self.modules.insert(stem.to_string());
                if let Some(parent) = path.parent().and_then(|p| p.file_name()) {
                    self.modules
                        .insert(parent.to_string_lossy().replace('-', "_"));
                }
                if let Ok(text) = std::fs::read_to_string(&path) {
                    self.read_rust(&text);
                }
            } else if name.ends_with(".proto") {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    self.read_proto(&text);
                }
            } else if name == "Cargo.toml" {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    for line in text.lines() {
                        if let Some(value) = line.trim().strip_prefix("name = ") {
                            self.modules
                                .insert(value.trim_matches('"').replace('-', "_"));
                        }
                    }
                }
            }
            self.files.push(rel);
        }
    }

    fn read_rust(&mut self, text: &str) {
        for line in text.lines() {
            let words = identifiers(line);
            for pair in words.windows(2) {
                let (keyword, name) = (pair[0], pair[1].to_string());
                match keyword {
                    "fn" => self.functions.insert(name),
                    "mod" => self.modules.insert(name),
                    "struct" | "enum" | "trait" | "type" | "union" => self.types.insert(name),
                    "const" | "static" => self.consts.insert(name),
                    "macro_rules" => self.macros.insert(name),
                    _ => false,
                };
            }
            let trimmed = line.trim_start();
            if let Some(first) = identifiers(trimmed).first() {
                if trimmed.starts_with(first) && is_camel(first) {
                    self.variants.insert(first.to_string());
                }
            }
        }
    }

    fn read_proto(&mut self, text: &str) {
        for line in text.lines() {
            let words = identifiers(line);
            if let [keyword, name, ..] = words.as_slice() {
                if matches!(*keyword, "message" | "enum" | "service") {
                    self.types.insert(name.to_string());
                }
            }
        }
    }

    fn path_exists(&self, span: &str) -> bool {
        let span = span.trim_end_matches('/');
        if self.dirs.contains(span) || self.files.iter().any(|f| f == span) {
            return true;
        }
        let tail = format!("/{span}");
        FILE_EXTENSIONS.iter().any(|ext| span.ends_with(ext))
            && self.files.iter().any(|f| f.ends_with(&tail))
    }

    /// Why a Rust name is not found, or `None` when every segment is.
    fn name_missing(&self, span: &str) -> Option<String> {
        if let Some(name) = span.strip_suffix('!') {
            return (!self.macros.contains(name)).then(|| format!("no macro_rules! {name}"));
        }
        let span = span.strip_suffix("()").unwrap_or(span);
        let segments: Vec<&str> = span.split("::").collect();
        let mut after_type = false;
        for (i, segment) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            let found = if is_screaming(segment) {
                self.consts.contains(*segment)
            } else if is_camel(segment) {
                self.types.contains(*segment) || (after_type && self.variants.contains(*segment))
            } else if last {
                self.functions.contains(*segment) || self.modules.contains(*segment)
            } else {
                self.modules.contains(*segment)
            };
            if !found {
                return Some(format!("no definition of `{segment}`"));
            }
            after_type = is_camel(segment);
        }
        None
    }
}

fn relative(root: &Path, path: &Path) -> String {
    let rel: PathBuf = path.strip_prefix(root).unwrap_or(path).to_path_buf();
    rel.to_string_lossy().replace('\\', "/")
}

fn identifiers(line: &str) -> Vec<&str> {
    line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| {
            w.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        })
        .collect()
}

fn is_identifier(word: &str) -> bool {
    !word.is_empty()
        && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && word
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
}

/// `PurgeLog`, `Hello`: starts upper-case and holds a lower-case letter.
fn is_camel(word: &str) -> bool {
    word.starts_with(|c: char| c.is_ascii_uppercase())
        && word.chars().any(|c| c.is_ascii_lowercase())
}

/// `IN_FLIGHT`, `GRACE`.
fn is_screaming(word: &str) -> bool {
    word.starts_with(|c: char| c.is_ascii_uppercase())
        && !word.chars().any(|c| c.is_ascii_lowercase())
}

/// What one code span asks to be checked.
#[derive(Debug, PartialEq)]
enum Check {
    Path,
    Name,
    Prose,
}

fn classify(span: &str) -> Check {
    let skipped = |c: char| " <{\"=*?$[,".contains(c);
    if span.is_empty() || span.contains(skipped) || span.starts_with(['/', '-', '.']) {
        return Check::Prose;
    }
    if span.contains('/') || FILE_EXTENSIONS.iter().any(|ext| span.ends_with(ext)) {
        let first = span.split('/').next().unwrap_or_default();
        let top_level = span.contains('/') && repo().join(first).exists();
        return if top_level || FILE_EXTENSIONS.iter().any(|ext| span.ends_with(ext)) {
            Check::Path
        } else {
            Check::Prose
        };
    }
    let bare = span.trim_end_matches("()").trim_end_matches('!');
    let rust_path = bare.split("::").all(is_identifier);
    if !rust_path {
        return Check::Prose;
    }
    if span.contains("::") || span.ends_with("()") || span.ends_with('!') || is_camel(span) {
        Check::Name
    } else {
        Check::Prose
    }
}

/// Every inline code span outside fenced blocks, with its line number; `Err` for a span
/// that breaks across lines.
fn code_spans(text: &str) -> Result<Vec<(usize, String)>, String> {
    let mut spans = Vec::new();
    let mut fenced = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let pieces: Vec<&str> = line.split('`').collect();
        if pieces.len().is_multiple_of(2) {
            return Err(format!(
                "ARCHITECTURE.md:{}: a code span breaks across lines",
                n + 1
            ));
        }
        for piece in pieces.iter().skip(1).step_by(2) {
            spans.push((n + 1, piece.to_string()));
        }
    }
    Ok(spans)
}

/// Each problem as `ARCHITECTURE.md:LINE: `span`: why`.
fn problems(text: &str, index: &Index) -> Vec<String> {
    let spans = match code_spans(text) {
        Ok(spans) => spans,
        Err(e) => return vec![e],
    };
    let mut out = Vec::new();
    for (line, span) in spans {
        match classify(&span) {
            Check::Path if !index.path_exists(&span) => {
                out.push(format!(
                    "ARCHITECTURE.md:{line}: `{span}`: no such file or folder"
                ));
            }
            Check::Name => {
                if let Some(why) = index.name_missing(&span) {
                    out.push(format!("ARCHITECTURE.md:{line}: `{span}`: {why}"));
                }
            }
            _ => {}
        }
    }
    out
}

#[test]
fn architecture_names_only_what_exists() {
    let text = std::fs::read_to_string(repo().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let index = Index::build(repo());
    let problems = problems(&text, &index);
    assert!(
        problems.is_empty(),
        "ARCHITECTURE.md names what the repository does not have:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_rule_sorts_spans_and_catches_a_wrong_name() {
    for (span, check) in [
        ("coordinator/src/purge/", Check::Path),
        ("monitor/ledger.rs", Check::Path),
        ("log/head", Check::Prose),
        ("PurgeLog", Check::Name),
        ("Monitor::run", Check::Name),
        ("assert_eventually!", Check::Name),
        ("purge_lag_s", Check::Prose),
        ("[store] backend = \"etcd\"", Check::Prose),
        ("/api/v1/route", Check::Prose),
        ("--insecure", Check::Prose),
        ("SIGHUP", Check::Prose),
    ] {
        assert_eq!(classify(span), check, "{span}");
    }
    let index = Index::build(repo());
    let text = "`PurgeLog` and `tests/src/` and `Coordinator`\n\
                `NoSuchType`, `coordinator/src/nowhere.rs`, `PurgeLog::no_such_fn`, `no_such!`\n";
    let found = problems(text, &index);
    assert_eq!(found.len(), 4, "{found:#?}");
    assert!(
        found.iter().all(|p| p.starts_with("ARCHITECTURE.md:2:")),
        "{found:#?}"
    );
}
