//! Tracing setup: human-readable or JSON lines on stderr, filtered by `RUST_LOG`
//! (default `info`). Events carry structured fields; the format only changes how they
//! are printed.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `json` selects one JSON object per line. A second
/// call (tests starting several servers in one process) keeps the first.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
