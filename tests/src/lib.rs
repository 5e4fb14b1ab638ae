//! Shared helpers for the end-to-end tests and the benchmarks: real `varnishd`, etcd and
//! PowerDNS, the real `coordinator` and `edge-agent` binaries, the sample origin, and a
//! tiny HTTP client. Nothing here fakes a component; a test never skips.
//!
//! One concept per module: [`procs`] starts the real programs (one file each), [`cluster`]
//! puts a coordinator, varnishds and agents together and [`ha`] several coordinators on
//! etcd, [`proxy`] is the TCP proxy that partitions them, [`http`] the raw client,
//! [`magento`] the origin and Magento's purge, [`bench`] the benchmarks' figures, and
//! [`assert`] the polling assertions (`assert_eventually!`, `assert_stays!`). This facade
//! re-exports what the tests use, so `use tests::{Cluster, get, ...}` reads flat.

// The test harness starts real programs (varnishd, the binaries, chromium) by design.
#![allow(clippy::disallowed_methods)]

pub mod assert;
pub mod bench;
pub mod cluster;
pub mod ha;
pub mod http;
pub mod magento;
pub mod procs;
pub mod proxy;

pub use bench::{percentile, percentiles_line};
pub use cluster::{region, regions, Cluster};
pub use http::{api_call, exchange_keepalive, get, get_json, raw, raw_from, Resp};
pub use magento::{magento_purge, purge_tags, tags_pattern, OriginServer};
pub use procs::protocol_env;
pub use procs::{
    bin_dir, chromium, dig, dig_full, free_port, pids_of, require_etcd, require_pdns,
    require_varnish, start_demo, temp_dir, AgentOpts, AgentProc, CoordinatorOpts, CoordinatorProc,
    EtcdCluster, Pdns, VarnishNode, WARM_TOKEN,
};
pub use proxy::Proxy;
