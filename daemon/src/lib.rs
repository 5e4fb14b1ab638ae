//! What the `coordinator` and the `edge-agent` binaries share, written once: reading a
//! TOML config file into its serde struct and validating it ([`config`]), the tracing
//! subscriber ([`logging`]), the signals that stop or reload a daemon ([`signal`]) and
//! locks that outlive a panic ([`sync`]).
//!
//! Nothing here knows about purges, varnish or gRPC; both binaries' `main.rs` stay thin
//! by calling these.

pub mod config;
pub mod files;
pub mod limits;
pub mod logging;
pub mod signal;
pub mod sync;

pub use config::{load, ConfigError, TlsConfig, Validate};
