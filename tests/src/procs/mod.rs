//! The real programs a test starts, one file each: [`etcd`], [`pdns`] (PowerDNS and
//! `dig`), [`varnish`], [`coordinator`] and [`agent`] (the workspace's binaries, their
//! configs built from the real config structs), the [`demo`], headless [`chromium`] and
//! [`prometheus`] (with `promtool`);
//! [`host`] is the machine they share (the built binaries, free ports, temp dirs, pids).
//!
//! Nothing here fakes a component: a program that is missing panics with the package to
//! install (`scripts/test.sh` installs them all); a test never skips.

pub mod agent;
pub mod chromium;
pub mod coordinator;
pub mod demo;
pub mod etcd;
pub mod host;
pub mod pdns;
pub mod prometheus;
pub mod varnish;

pub use agent::{AgentOpts, AgentProc};
pub use chromium::chromium;
pub use coordinator::{CoordinatorOpts, CoordinatorProc};
pub use demo::start_demo;
pub use etcd::{require_etcd, EtcdCluster};
pub use host::{bin_dir, free_port, pids_of, temp_dir};
pub use pdns::{dig, dig_full, require_pdns, Pdns};
pub use prometheus::{promtool, require_prometheus, Prometheus};
pub use varnish::{require_varnish, VarnishNode};

/// The environment that makes one of the workspace's binaries speak protocol `version`
/// (`proto::version::ENV`, a test knob): today's binaries as an older or a newer peer.
pub fn protocol_env(version: u32) -> Vec<(String, String)> {
    vec![(proto::version::ENV.to_owned(), version.to_string())]
}

/// The warm secret every test cluster shares (varnishd's boot VCL checks it, the
/// coordinator's `[warm] token_file` holds it).
pub const WARM_TOKEN: &str = "test-warm-token-0123456789abcdef";
