//! The Magento-facing side: wire format, pattern parsing, the listener, and the durable
//! log they append to (its fan-out to the edges is `crate::fanout`).

pub mod config;
pub mod counters;
pub mod listener;
pub mod log;
pub mod pattern;
pub mod wire;
