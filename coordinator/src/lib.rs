//! The coordinator: Magento's purge target and the hub every edge agent dials.
//!
//! Flow of a purge: [`purge::listener`] reads Magento's request ([`purge::wire`]), turns
//! its headers into operations ([`purge::pattern`]), appends them to the durable
//! [`purge::log`] and answers once they are on disk. [`fanout`] streams the log to every
//! connected agent and tracks what each has applied ([`fanout::edges`]). [`api`] exposes
//! it as JSON and Prometheus metrics ([`metrics`]). [`server`] wires these together;
//! [`demo`] starts a whole local cluster around them.
//!
//! Flow of a config bundle: the API takes a pushed [`bundle::Bundle`], checks it renders
//! for every region ([`bundle::vars`], [`bundle::waf`]), stores it ([`bundle::store`]),
//! and [`rollout`] decides per edge which version to send over the same agent sessions.

pub mod accept;
pub mod api;
pub mod bundle;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod fanout;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod monitor;
pub mod pki;
pub mod purge;
pub mod rollout;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod traffic;
pub mod warm;
