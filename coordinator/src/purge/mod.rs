//! The Magento-facing side: wire format, pattern parsing, the durable log, the listener,
//! and the pace at which the log fans out to the edges.

pub mod config;
pub mod counters;
pub mod etcd_log;
pub mod listener;
pub mod log;
pub mod pacer;
pub mod pattern;
pub mod ranges;
pub mod spool;
pub mod wire;
