//! The edge agent: runs beside one varnishd and keeps it in step with the coordinator.
//!
//! [`session`] holds the long-lived gRPC stream (dial out, Hello with the cursor, apply,
//! ack, redial with backoff). [`plan`] coalesces purge entries into few varnish
//! operations; [`varnish`] applies them (admin CLI protocol spoken directly, xkey over
//! HTTP). [`cursor`] keeps the applied sequence on disk. [`vcl`] loads pushed config
//! bundles in a task of its own and reports what varnishd runs. [`stats`] streams
//! varnishstat counters; [`command`] is the only place another program is run; [`mark`]
//! marks the agent's own requests so [`top`] tells them from shoppers' in varnish's log.
//! [`config`] is the TOML file.

pub mod clients;
pub mod command;
pub mod config;
pub mod cursor;
#[doc(hidden)]
pub mod fuzzing;
pub mod mark;
pub mod plan;
pub mod probe;
pub mod served;
pub mod session;
pub mod stats;
pub mod synthetic;
pub mod top;
pub mod varnish;
pub mod vcl;
pub mod warm;
pub mod why;

pub use session::run;
