//! The coordinator: Magento's purge target and the hub every edge agent dials.
//!
//! Flow of a purge: [`purge::listener`] reads Magento's request ([`purge::wire`]), turns
//! its headers into operations ([`purge::pattern`]), appends them to the durable
//! [`purge::log`] and answers once they are on disk. [`session`] streams the log to every
//! connected agent, and [`edges`] records what each has applied. [`api`] exposes it as
//! JSON and Prometheus metrics ([`metrics`]). [`server`] opens the [`state`] and serves it.
//!
//! Flow of a config bundle: the API takes a pushed [`bundle::Bundle`], checks it renders
//! for every region ([`bundle::vars`], [`bundle::waf`]), stores it ([`bundle::store`]),
//! and [`rollout`] decides per edge which version to send over the same agent sessions.
//!
//! Modules form layers (ARCHITECTURE.md; `scripts/module-graph.py` checks them in CI):
//! a module imports only modules below it, never one above, and no two import each other.

pub mod accept;
pub mod api;
pub mod audit;
pub mod backup;
pub mod bundle;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod edges;
pub mod etcd_kv;
pub mod fanout;
#[doc(hidden)]
pub mod fuzzing;
pub mod geo;
pub mod http_front;
pub mod http_head;
pub mod leader;
pub mod maintenance;
pub mod metrics;
pub mod monitor;
pub mod pki;
pub mod purge;
pub mod rollout;
pub mod schema;
pub mod secret;
pub mod server;
pub mod session;
pub mod snapshot;
pub mod state;
pub mod store_health;
pub mod tls;
pub mod tokens;
pub mod traffic;
pub mod warm;
