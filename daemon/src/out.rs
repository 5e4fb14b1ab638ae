//! What the programs print on stdout, through [`say!`](crate::say) and
//! [`show!`](crate::show) instead of `println!`/`print!`.
//!
//! `println!` panics when stdout is a pipe whose reader has gone (`coordinator config
//! list | head -1`): exit 101 and a panic message for what is an ordinary end. Rust
//! ignores SIGPIPE (so that a closed socket is an error, not a death) and the crates
//! forbid the unsafe call that would restore it, so the closed pipe is handled here: the
//! CLI's printing subcommands stop quietly with status [`CLOSED_PIPE_EXIT`], as a
//! program killed by SIGPIPE does (`128 + 13`). A daemon keeps running: its stdout is a
//! courtesy ([`Closed::Ignore`]), its logs go through `tracing` ([`crate::logging`]).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// The exit status when stdout closed under the program (what a shell shows for a
/// program SIGPIPE killed).
pub const CLOSED_PIPE_EXIT: i32 = 141;

/// What to do when stdout cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Exit quietly with [`CLOSED_PIPE_EXIT`] (the CLI's printing subcommands, the default).
    Exit,
    /// Drop the output and carry on (a daemon that prints a how-to on start).
    Ignore,
}

static IGNORE: AtomicBool = AtomicBool::new(false);

/// Sets what a failed write to stdout does, for the whole process.
pub fn on_closed(what: Closed) {
    IGNORE.store(what == Closed::Ignore, Ordering::Relaxed);
}

/// Writes `args` (and a newline when `newline`) to stdout; on a closed pipe (or any
/// write error), exits quietly or carries on as [`on_closed`] said.
pub fn write(args: std::fmt::Arguments<'_>, newline: bool) {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    if written.is_err() && !IGNORE.load(Ordering::Relaxed) {
        std::process::exit(CLOSED_PIPE_EXIT);
    }
}

/// `println!` that never panics: see [`crate::out`].
#[macro_export]
macro_rules! say {
    () => { $crate::out::write(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::out::write(format_args!($($arg)*), true) };
}

/// `print!` that never panics: see [`crate::out`].
#[macro_export]
macro_rules! show {
    ($($arg:tt)*) => { $crate::out::write(format_args!($($arg)*), false) };
}
