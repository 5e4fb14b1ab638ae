//! What the `coordinator` and the `edge-agent` binaries share, written once: reading a
//! TOML config file into its serde struct and validating it ([`config`], CIDRs by
//! [`cidr`]), the tracing subscriber ([`logging`]), stdout that survives a closed pipe
//! ([`out`]), the signals that stop or reload a daemon ([`signal`]), locks that outlive
//! a panic ([`sync`]) and the warning before a certificate expires ([`certs`]).
//!
//! Nothing here knows about purges, varnish or gRPC; both binaries' `main.rs` stay thin
//! by calling these.

pub mod certs;
pub mod cidr;
pub mod config;
pub mod files;
pub mod limits;
pub mod logging;
pub mod out;
pub mod signal;
pub mod sync;

pub use config::{load, ConfigError, TlsConfig, Validate};
