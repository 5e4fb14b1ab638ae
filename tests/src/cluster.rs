//! The everyday test cluster ([`Cluster`]): the sample origin, one coordinator and, per
//! region `region-i`, one varnishd and agent `edge-i`, started and waited on until every
//! agent is connected; optionally tiered behind region-0 as the shield.

use std::net::SocketAddr;

use coordinator::config::RegionConfig;

use crate::assert_eventually;
use crate::magento::OriginServer;
use crate::procs::{
    require_varnish, temp_dir, AgentOpts, AgentProc, CoordinatorOpts, CoordinatorProc, VarnishNode,
};

/// Regions `region-0..n`, each fetching from `backend` (the bundle's backend vars).
pub fn regions(n: usize, backend: SocketAddr) -> Vec<RegionConfig> {
    (0..n)
        .map(|i| region(&format!("region-{i}"), backend))
        .collect()
}

/// Region `name` fetching from `backend`, with no position and no addresses.
pub fn region(name: &str, backend: SocketAddr) -> RegionConfig {
    RegionConfig {
        name: name.to_owned(),
        lat: None,
        lon: None,
        addresses: Vec::new(),
        vars: coordinator_cli::demo::backend_vars(backend),
    }
}

/// Origin + coordinator + one varnishd and agent per region.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub origin: OriginServer,
    pub coordinator: CoordinatorProc,
    pub varnish: Vec<VarnishNode>,
    pub agents: Vec<AgentProc>,
}

impl Cluster {
    /// `regions` regions, their agents started with `agent` (a purge mode or [`AgentOpts`]).
    pub async fn start(regions: usize, agent: impl Into<AgentOpts>, opts: CoordinatorOpts) -> Self {
        Self::start_as(regions, agent, opts, false).await
    }

    /// With `tiered`, region-0 is the shield: it fetches from the origin, every other
    /// region's varnish fetches from region-0's varnish, and `[warm] shield` names it.
    pub async fn start_as(
        regions: usize,
        agent: impl Into<AgentOpts>,
        opts: CoordinatorOpts,
        tiered: bool,
    ) -> Self {
        Self::start_booted(regions, agent.into(), opts, tiered, None).await
    }

    /// [`Self::start`] with every varnishd booted with `vcl(backend)` (a whole VCL's
    /// text, e.g. Debian's `default.vcl` pointed at the origin) instead of the project's.
    pub async fn start_with_vcl(
        regions: usize,
        agent: impl Into<AgentOpts>,
        opts: CoordinatorOpts,
        vcl: &dyn Fn(SocketAddr) -> String,
    ) -> Self {
        Self::start_booted(regions, agent.into(), opts, false, Some(vcl)).await
    }

    async fn start_booted(
        regions: usize,
        agent: AgentOpts,
        opts: CoordinatorOpts,
        tiered: bool,
        vcl: Option<&dyn Fn(SocketAddr) -> String>,
    ) -> Self {
        require_varnish();
        let dir = temp_dir();
        let origin = OriginServer::start().await;
        let mut opts = opts;
        // `{origin}` in the extra TOML is the sample origin's address.
        opts.extra = opts.extra.replace("{origin}", &origin.addr.to_string());
        if tiered {
            opts.warm_extra.push_str("shield = \"region-0\"\n");
        }
        // Region-0's varnish first: in tiered mode the others point at it.
        let mut varnish: Vec<VarnishNode> = Vec::new();
        for i in 0..regions {
            let backend = match varnish.first() {
                Some(shield) if tiered => shield.http,
                _ => origin.addr,
            };
            opts.regions.push(region(&format!("region-{i}"), backend));
            let vdir = dir.path().join(format!("r{i}"));
            varnish.push(match vcl {
                Some(vcl) => VarnishNode::start_with_vcl(&vdir, &vcl(backend)).await,
                None => VarnishNode::start_with(&vdir, backend, opts.max_stale_s()).await,
            });
        }
        let coordinator = CoordinatorProc::start(&dir.path().join("coordinator"), &opts).await;
        let mut agents = Vec::new();
        for (i, v) in varnish.iter().enumerate() {
            let rdir = dir.path().join(format!("r{i}"));
            agents.push(AgentProc::start(
                &rdir,
                &format!("edge-{i}"),
                &format!("region-{i}"),
                &coordinator,
                v,
                &agent,
            ));
        }
        let cluster = Cluster {
            dir,
            origin,
            coordinator,
            varnish,
            agents,
        };
        assert_eventually!(
            30,
            cluster.coordinator.applied_everywhere(0, regions).await,
            "agents did not connect"
        );
        cluster
    }

    /// Waits until every edge applied `seq`.
    pub async fn wait_applied(&self, seq: u64) {
        let n = self.agents.len();
        assert_eventually!(
            30,
            self.coordinator.applied_everywhere(seq, n).await,
            "seq {seq} not applied on all {n} edges: {:?}",
            self.coordinator.edges().await
        );
    }
}
