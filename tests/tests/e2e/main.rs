//! End-to-end tests: real varnishd, the real `coordinator` and `edge-agent` binaries,
//! the sample origin, all on 127.0.0.1. One test binary; helpers live in the `tests`
//! crate's library.

// The test harness starts real programs (varnishd, the binaries, chromium) by design.
#![allow(clippy::disallowed_methods)]

mod alert_rules;
mod chaos;
mod cluster_chaos;
mod config;
mod dashboard;
mod demo;
mod deploy;
mod drain;
mod durability;
mod etcd;
mod failover;
mod fuzz_corpus;
mod geo;
mod ha;
mod hostile;
mod monitor;
mod package;
mod purge;
mod refresh;
mod robustness;
mod security;
mod state;
mod team;
mod tidy;
mod traffic;
mod upgrade;
mod vcl_hit_ratio;
mod warm_jobs;
mod warmer;
