//! What a bundle's VCL may reach outside itself: the rule both ends check.
//!
//! varnishd's compiler opens every file an `include` names (absolute paths, `..`, bare
//! names looked up in its `vcl_path`) and loads any shared object `import VMOD from
//! "path"` names, and a compile error quotes what it read. So a bundle may only include
//! its own files, as `./name` (flat names), and import VMODs by name only. The
//! coordinator checks this at push time (naming file and line), the agent again before it
//! writes anything.
//!
//! [`scan`] tokenises the way varnishd's lexer (`vcc_token.c`) does, so nothing hides an
//! `include` from it or makes it see one varnishd would not: `#` and `//` comments to the
//! end of the line, `/* */` comments (not nested), `"..."` strings (one line), `{"..."}`
//! and `"""..."""` long strings; an `include` and its string may be on different lines
//! with comments between them. Anything it cannot tokenise (an unterminated string or
//! comment) is refused, since varnishd would refuse it too. Also refused: inline C
//! (`C{ }C`, off in varnishd by default), `include +glob`, `std.fileread` /
//! `std.blobread`, which read any file on the edge into the VCL, and varnishd's test
//! VMODs `vtc` and `debug` (`vtc.panic()` crashes the child).

use std::fmt;

/// Why a VCL file is refused: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub file: String,
    /// 1-based.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

impl std::error::Error for Refusal {}

/// varnishd's test VMODs: `vtc.panic()`, `debug.*` crash or stall a varnishd at will.
pub const TEST_VMODS: [&str; 2] = ["vtc", "debug"];

/// Functions that read a file of the edge's disk at load or request time.
pub const FILE_READERS: [&str; 2] = ["std.fileread", "std.blobread"];

#[derive(Debug, PartialEq)]
enum Tok<'a> {
    Ident(&'a str),
    Str(&'a str),
    Punct(u8),
}

/// The bundle files `text` (the file `name`) includes, in order; or why it may not be
/// loaded. `in_bundle` says whether a flat name is a file of the bundle.
pub fn scan(
    name: &str,
    text: &str,
    in_bundle: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>, Refusal> {
    let refuse = |line: usize, message: String| Refusal {
        file: name.to_owned(),
        line,
        message,
    };
    let (tokens, _) = tokenise(text).map_err(|(line, m)| refuse(line, m))?;
    let mut included = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let (tok, line) = &tokens[i];
        match tok {
            Tok::Ident("include") => match tokens.get(i + 1) {
                Some((Tok::Str(target), at)) => {
                    match target.strip_prefix("./") {
                        Some(local) if !local.contains('/') && in_bundle(local) => {
                            included.push(local.to_owned());
                        }
                        _ => {
                            return Err(refuse(
                                *at,
                                format!(
                                    "include {target:?} is refused: an include may name only a file of this bundle, as \"./name\""
                                ),
                            ))
                        }
                    }
                    i += 1;
                }
                _ => {
                    return Err(refuse(
                        *line,
                        "include must be followed by a string naming a file of this bundle, as \"./name\"".into(),
                    ))
                }
            },
            Tok::Ident("import") => {
                if let Some((Tok::Ident(vmod), at)) = tokens.get(i + 1) {
                    if TEST_VMODS.contains(vmod) {
                        return Err(refuse(
                            *at,
                            format!("import {vmod} is refused: a test VMOD (it can crash or stall varnishd)"),
                        ));
                    }
                }
                if let (Some((Tok::Ident(vmod), _)), Some((Tok::Ident("from"), at))) =
                    (tokens.get(i + 1), tokens.get(i + 2))
                {
                    return Err(refuse(
                        *at,
                        format!("import {vmod} from \"...\" is refused: it loads a shared object from any path; write import {vmod};"),
                    ));
                }
            }
            Tok::Ident(f) if FILE_READERS.contains(f) => {
                return Err(refuse(
                    *line,
                    format!("{f} is refused: it reads a file of the edge's disk, outside the bundle"),
                ));
            }
            _ => {}
        }
        i += 1;
    }
    Ok(included)
}

/// The comments of `text` (each with its first line), as varnishd reads them; empty
/// when `text` does not tokenise (then [`scan`] refuses it anyway).
pub fn comments(text: &str) -> Vec<(usize, &str)> {
    tokenise(text).map(|(_, c)| c).unwrap_or_default()
}

type Tokens<'a> = (Vec<(Tok<'a>, usize)>, Vec<(usize, &'a str)>);

/// varnishd's tokens, each with its (first) line, and the comments; `Err((line, why))`.
fn tokenise(text: &str) -> Result<Tokens<'_>, (usize, String)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut comments = Vec::new();
    let mut line = 1;
    let mut i = 0;
    // The end (exclusive) of `close` searched from `from`, counting newlines.
    let find = |from: usize, close: &[u8], line: &mut usize| -> Option<usize> {
        let mut j = from;
        while j + close.len() <= b.len() {
            if b[j..].starts_with(close) {
                return Some(j);
            }
            if b[j] == b'\n' {
                *line += 1;
            }
            j += 1;
        }
        None
    };
    while i < b.len() {
        let c = b[i];
        let rest = &b[i..];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'#' || rest.starts_with(b"//") {
            let start = i;
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            comments.push((line, &text[start..i]));
        } else if rest.starts_with(b"/*") {
            let start = line;
            let end = find(i + 2, b"*/", &mut line)
                .ok_or((start, "unterminated /* comment".to_owned()))?;
            comments.push((start, &text[i..end + 2]));
            i = end + 2;
        } else if rest.starts_with(b"{\"") {
            let start = line;
            let end = find(i + 2, b"\"}", &mut line)
                .ok_or((start, "unterminated {\" string".to_owned()))?;
            out.push((Tok::Str(&text[i + 2..end]), start));
            i = end + 2;
        } else if rest.starts_with(b"\"\"\"") {
            let start = line;
            let end = find(i + 3, b"\"\"\"", &mut line)
                .ok_or((start, "unterminated \"\"\" string".to_owned()))?;
            out.push((Tok::Str(&text[i + 3..end]), start));
            i = end + 3;
        } else if c == b'"' {
            let end = b[i + 1..]
                .iter()
                .position(|&x| x == b'"' || x == b'\n')
                .map(|p| i + 1 + p)
                .filter(|&e| b[e] == b'"')
                .ok_or((
                    line,
                    "unterminated string (a \"...\" string ends on its line)".to_owned(),
                ))?;
            out.push((Tok::Str(&text[i + 1..end]), line));
            i = end + 1;
        } else if rest.starts_with(b"C{") {
            return Err((line, "inline C (C{ }C) is refused".to_owned()));
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len()
                && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'.' | b'-'))
            {
                i += 1;
            }
            out.push((Tok::Ident(&text[start..i]), line));
        } else {
            out.push((Tok::Punct(c), line));
            i += 1;
        }
    }
    Ok((out, comments))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Vec<String>, String> {
        scan("main.vcl", text, &|n| matches!(n, "waf.vcl" | "extra.vcl")).map_err(|r| r.to_string())
    }

    #[test]
    fn bundle_files_as_dot_slash_pass() {
        let ok = "vcl 4.1;\ninclude \"./waf.vcl\";\n  include \"./extra.vcl\" ;\nimport std;\nsub vcl_recv { set req.http.include = \"include /etc/passwd\"; }";
        assert_eq!(check(ok).unwrap(), ["waf.vcl", "extra.vcl"]);
        // In comments and strings, an include is text, as it is to varnishd.
        let quiet = "# include \"/etc/passwd\";\n// include \"/etc/passwd\";\n/* include\n\"/etc/passwd\"; */\nset req.http.x = {\"include \"/etc/passwd\";\"};\nset req.http.y = \"\"\"include \"/etc\"\"\";";
        assert_eq!(check(quiet).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn anything_else_is_refused_with_its_line() {
        for (text, line) in [
            ("include \"../../../etc/passwd\";", 1),
            ("\ninclude \"/etc/passwd\";", 2),
            ("include \"extra.vcl\";", 1),
            ("include \"./nope.vcl\";", 1),
            ("include \"./sub/extra.vcl\";", 1),
            ("include \"./../extra.vcl\";", 1),
            ("include\n\n  \"/etc/passwd\";", 3),
            ("include /* hidden */ \"/etc/passwd\";", 1),
            ("include # x\n\"/etc/passwd\";", 2),
            ("include {\"/etc/passwd\"};", 1),
            ("include +glob \"./*.vcl\";", 1),
            ("sub x { include; }", 1),
            ("\nimport std from \"/tmp/evil.so\";", 2),
            ("import vtc;", 1),
            ("import\ndebug;", 2),
            ("set resp.http.x = std.fileread(\"/etc/passwd\");", 1),
            ("set resp.http.x = std.blobread(\"/etc/passwd\");", 1),
            ("C{ system(\"id\"); }C", 1),
            ("/* never closed\ninclude \"/etc/passwd\";", 1),
            ("set req.http.x = \"open\ninclude \"/etc/passwd\";", 1),
        ] {
            let err = check(text).expect_err(text);
            assert!(
                err.starts_with(&format!("main.vcl:{line}: ")),
                "{text:?}: {err}"
            );
        }
    }

    #[test]
    fn comments_are_found_where_varnishd_sees_them() {
        let text = "a # one\n\"#not\" // two\n/* three\n */ x";
        assert_eq!(
            comments(text),
            vec![(1, "# one"), (2, "// two"), (3, "/* three\n */")]
        );
    }

    #[test]
    fn a_comment_opener_inside_a_string_hides_nothing() {
        // varnishd reads `"/*"` as a string, so the include after it is real.
        let err = check("set req.http.x = \"/*\";\ninclude \"/etc/passwd\";\n# */").unwrap_err();
        assert!(err.starts_with("main.vcl:2:"), "{err}");
        let err = check("set req.http.x = \"#\"; include \"/etc/passwd\";").unwrap_err();
        assert!(err.starts_with("main.vcl:1:"), "{err}");
    }
}
