//! Tracing setup: human-readable or JSON lines on stderr, filtered by `RUST_LOG`
//! (default `info`). Events carry structured fields; the format only changes how they
//! are printed.
//!
//! Colour only when stderr is a terminal and `NO_COLOR` is unset or empty
//! ([`colour`]): a log file, journald or a pipe gets plain text. A log sink that went
//! away (a closed pipe) costs the daemon its log lines, never its life: write errors are
//! dropped, not reported on stderr (which would panic on that same closed pipe).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `json` selects one JSON object per line. A second
/// call (tests starting several servers in one process) keeps the first.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let no_color = std::env::var_os("NO_COLOR");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour(std::io::stderr().is_terminal(), no_color.as_deref()))
        .log_internal_errors(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Whether to print colour escapes: on a terminal, unless `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
pub fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new(""))));
    }
}
