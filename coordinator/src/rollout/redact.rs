//! What a reader without the API token sees of an error.
//!
//! A compile error from varnishd quotes the source it read, and a bundle that got a file
//! from outside itself compiled (an escaped `include`) would show that file's contents.
//! So `GET /api/v1/config` and the dashboard show [`public_error`]: where the error is
//! (`file:line`) and the compiler's first message line, with every `'quoted'` token elided
//! and at most [`MAX_PUBLIC_CHARS`] characters. The full text goes only to token holders
//! (`GET /api/v1/config?detail=full`, which the CLI asks for).

use super::BundleView;

/// The longest error a reader without the token sees.
pub const MAX_PUBLIC_CHARS: usize = 200;

const VCC: &str = "Message from VCC-compiler:";

/// `full` reduced to a location and one bounded message line that quotes nothing.
pub fn public_error(full: &str) -> String {
    let mut lines = full.lines();
    let first = lines.next().unwrap_or_default();
    let text = match first.split_once(VCC) {
        Some((prefix, after)) => {
            let reason = std::iter::once(after)
                .chain(lines)
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('(') && !l.starts_with("At:"))
                .unwrap_or("compile error");
            match location(full) {
                Some(at) => format!("{prefix}{at}: {}", elide(reason)),
                None => format!("{prefix}{}", elide(reason)),
            }
        }
        None => elide(first),
    };
    bounded(&text)
}

/// The first `('FILE' Line N` varnishd names, as `FILE:N`.
fn location(full: &str) -> Option<String> {
    let start = full.find("('")? + 2;
    let rest = &full[start..];
    let (file, rest) = rest.split_once("' Line ")?;
    let line: String = rest.chars().take_while(char::is_ascii_digit).collect();
    (!line.is_empty() && !file.contains('\n')).then(|| format!("{}:{line}", file.trim()))
}

/// Every `'...'` on the line replaced by `'…'` (varnishd quotes source tokens so).
fn elide(line: &str) -> String {
    let mut out = String::new();
    let mut parts = line.split('\'');
    if let Some(head) = parts.next() {
        out.push_str(head);
    }
    let rest: Vec<&str> = parts.collect();
    // Pairs of quotes enclose tokens; an unpaired last quote drops what follows it.
    let mut i = 0;
    while i + 1 < rest.len() {
        out.push_str("'…'");
        out.push_str(rest[i + 1]);
        i += 2;
    }
    if i < rest.len() {
        out.push_str("'…");
    }
    out
}

fn bounded(text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match clean.char_indices().nth(MAX_PUBLIC_CHARS) {
        Some((cut, _)) => format!("{}…", &clean[..cut]),
        None => clean,
    }
}

impl BundleView {
    /// The view for a reader without the token: every error through [`public_error`].
    pub fn redacted(mut self) -> Self {
        let redact = |e: &mut Option<String>| {
            if let Some(text) = e.as_mut() {
                *text = public_error(text);
            }
        };
        if let Some(r) = self.rollout.as_mut() {
            redact(&mut r.error);
        }
        for r in &mut self.past_rollouts {
            redact(&mut r.error);
        }
        for e in &mut self.edges {
            redact(&mut e.error);
        }
        redact(&mut self.waiting);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What varnishd 7.1 answers for `include "../../../etc/passwd";` (the agent has
    /// already made paths bundle-relative).
    const ESCAPED: &str = "Message from VCC-compiler:\nBLOB must have n*4 base64 characters\n('/etc/varnish/../../../etc/passwd' Line 1 Pos 5)\nroot:x:0:0:root:/root:/bin/bash\n----###------------------------\n\n('main.vcl' Line 3 Pos 9)\ninclude \"../../../etc/passwd\";\n--------##############################-\n\nRunning VCC-compiler failed, exited with 2\nVCL compilation failed";

    #[test]
    fn a_compile_error_keeps_its_place_and_loses_the_source() {
        let full = format!("rejected on the canary: edge e1 (eu): {ESCAPED}");
        let public = public_error(&full);
        assert_eq!(
            public,
            "rejected on the canary: edge e1 (eu): /etc/varnish/../../../etc/passwd:1: BLOB must have n*4 base64 characters"
        );
        let symbol = "Message from VCC-compiler:\nSymbol not found: 'root:x:0:0:secret'\nAt: ('main.vcl' Line 3 Pos 33) -- (Pos 40)\nsub vcl_recv { set req.http.x = root:x:0:0:secret; }\n";
        assert_eq!(public_error(symbol), "main.vcl:3: Symbol not found: '…'");
        for p in [public, public_error(symbol)] {
            assert!(!p.contains("root:x") && !p.contains('\n'), "{p}");
        }
    }

    #[test]
    fn other_errors_keep_their_first_line_bounded() {
        assert_eq!(
            public_error("refusing bundle ab: main.vcl:2: include \"/etc/passwd\" is refused"),
            "refusing bundle ab: main.vcl:2: include \"/etc/passwd\" is refused"
        );
        assert_eq!(public_error("first\nsecond"), "first");
        assert_eq!(public_error("it's 'x' and 'y"), "it'…'x'…'y");
        assert_eq!(public_error("a 'b"), "a '…");
        let long = "x".repeat(1000);
        assert_eq!(public_error(&long).chars().count(), MAX_PUBLIC_CHARS + 1);
        assert_eq!(public_error(""), "");
    }
}
