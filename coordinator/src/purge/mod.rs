//! The Magento-facing side: wire format, pattern parsing, the durable log, the listener.

pub mod config;
pub mod counters;
pub mod etcd_log;
pub mod listener;
pub mod log;
pub mod pattern;
pub mod wire;
