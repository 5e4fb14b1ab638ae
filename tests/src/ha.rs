//! A cluster of coordinators on a real 3-member etcd, with real varnishd and agents, for
//! the tests of what a cluster does on a bad day.
//!
//! [`HaCluster::start`] starts etcd, the origin, `coordinators` coordinators (`c1`, `c2`,
//! …) and one varnishd + agent per region (`edge-i` in `region-i`). Each coordinator
//! reaches etcd through [`Proxy`]s of its own (one per etcd member) and is reached by its
//! peers through one more (`store.advertise_api` names it), so a test can cut one
//! coordinator off from etcd only ([`HaCluster::cut_etcd`]) or from its peers only
//! ([`HaCluster::cut_peers`]) without closing a socket, as a real partition does. The
//! tests themselves talk to each coordinator directly (`c[i].api`, `c[i].purge`).
//!
//! Placement ([`Placement`]): each agent on one coordinator of its own
//! (`edge-i` on `c[i % n]` only), or every agent listing every coordinator (it starts at
//! a random one and fails over).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::assert_eventually;
use crate::cluster::regions;
use crate::http::get_json;
use crate::magento::OriginServer;
use crate::procs::{
    require_varnish, temp_dir, AgentProc, CoordinatorOpts, CoordinatorProc, EtcdCluster,
    VarnishNode,
};
use crate::proxy::Proxy;

/// Which coordinators each agent lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// `edge-i` lists only `c[i % n]`: a known coordinator holds each session.
    Spread,
    /// Every agent lists every coordinator (`coordinator = [c1, c2, c3]`).
    All,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct HaOpts {
    pub coordinators: usize,
    pub regions: usize,
    pub placement: Placement,
    /// More TOML for every coordinator (e.g. `[monitoring]`, `[alerts]`, `[[checks]]`);
    /// `{origin}` is replaced by the origin's address.
    pub extra: String,
    /// More keys for every coordinator's `[store]` table.
    pub store_extra: String,
    /// More keys for every coordinator's `[warm]` table.
    pub warm_extra: String,
    /// Agents' purge mode (`ban` or `xkey`).
    pub mode: &'static str,
    /// More keys for region i's `[[regions]]` table (`lat`, `lon` for `[geo]`), by index.
    pub region_keys: Vec<String>,
    /// More environment for every coordinator and agent (e.g. `protocol_env`: the
    /// cluster starts as an older build).
    pub env: Vec<(String, String)>,
}

impl Default for HaOpts {
    fn default() -> Self {
        HaOpts {
            coordinators: 3,
            regions: 3,
            placement: Placement::Spread,
            extra: String::new(),
            store_extra: String::new(),
            warm_extra: String::new(),
            mode: "ban",
            region_keys: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// The running cluster (everything stops when it drops).
pub struct HaCluster {
    pub dir: tempfile::TempDir,
    pub etcd: EtcdCluster,
    pub origin: OriginServer,
    /// `c[0]` is `c1`, and so on.
    pub c: Vec<CoordinatorProc>,
    pub varnish: Vec<VarnishNode>,
    pub agents: Vec<AgentProc>,
    /// Per coordinator: its proxies to each etcd member.
    pub etcd_links: Vec<Vec<Proxy>>,
    /// Per coordinator: the proxy its peers reach its API through.
    pub peer_links: Vec<Proxy>,
}

impl HaCluster {
    /// Starts everything and waits until every coordinator shows every edge connected.
    pub async fn start(opts: HaOpts) -> HaCluster {
        require_varnish();
        let dir = temp_dir();
        let etcd = EtcdCluster::start(&dir.path().join("etcd"), 3).await;
        let origin = OriginServer::start().await;
        let mut c = Vec::new();
        let mut etcd_links = Vec::new();
        let mut peer_links = Vec::new();
        for i in 0..opts.coordinators {
            let id = format!("c{}", i + 1);
            let mut links = Vec::new();
            for e in &etcd.endpoints {
                let addr: SocketAddr = e
                    .trim_start_matches("http://")
                    .parse()
                    .expect("etcd endpoint address");
                links.push(Proxy::start(addr).await);
            }
            let endpoints: Vec<String> = links
                .iter()
                .map(|p| format!("\"http://{}\"", p.addr))
                .collect();
            // Started before the coordinator's API port is known; pointed at it below.
            let peer = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 1))).await;
            let co = CoordinatorOpts {
                insecure: true,
                regions: regions(opts.regions, origin.addr),
                region_keys: opts.region_keys.clone(),
                extra: format!(
                    "{}\n[store]\nbackend = \"etcd\"\nendpoints = [{}]\nprefix = \"/vc-test/\"\nid = \"{id}\"\nlease_ttl_s = 2\nadvertise_api = \"http://{}\"\n{}\n",
                    opts.extra.replace("{origin}", &origin.addr.to_string()),
                    endpoints.join(", "),
                    peer.addr,
                    opts.store_extra,
                ),
                warm_extra: opts.warm_extra.clone(),
                env: opts.env.clone(),
                ..CoordinatorOpts::default()
            };
            let proc = CoordinatorProc::start(&dir.path().join(&id), &co).await;
            peer.retarget(proc.api);
            c.push(proc);
            etcd_links.push(links);
            peer_links.push(peer);
        }
        let mut varnish = Vec::new();
        let mut agents = Vec::new();
        for i in 0..opts.regions {
            let v = VarnishNode::start(&dir.path().join(format!("v{i}")), origin.addr).await;
            let grpc: Vec<SocketAddr> = match opts.placement {
                Placement::Spread => vec![c[i % c.len()].grpc],
                Placement::All => c.iter().map(|c| c.grpc).collect(),
            };
            agents.push(AgentProc::start_with(
                &dir.path().join(format!("a{i}")),
                &format!("edge-{i}"),
                &format!("region-{i}"),
                &grpc,
                None,
                &v,
                crate::procs::AgentOpts {
                    env: opts.env.clone(),
                    ..crate::procs::AgentOpts::from(opts.mode)
                },
            ));
            varnish.push(v);
        }
        let ha = HaCluster {
            dir,
            etcd,
            origin,
            c,
            varnish,
            agents,
            etcd_links,
            peer_links,
        };
        for co in &ha.c {
            assert_eventually!(
                40,
                co.applied_everywhere(0, opts.regions).await,
                "{} does not show all {} edges: {:?}",
                co.api,
                opts.regions,
                co.edges().await
            );
        }
        ha
    }

    /// Coordinator `i` can no longer reach any etcd member (its connections stay open
    /// and silent); its peers still reach it and it them.
    pub fn cut_etcd(&self, i: usize) {
        self.etcd_links[i].iter().for_each(Proxy::cut);
    }

    pub fn heal_etcd(&self, i: usize) {
        self.etcd_links[i].iter().for_each(Proxy::heal);
    }

    /// The other coordinators can no longer reach coordinator `i`'s API (it still
    /// reaches etcd).
    pub fn cut_peers(&self, i: usize) {
        self.peer_links[i].cut();
    }

    pub fn heal_peers(&self, i: usize) {
        self.peer_links[i].heal();
    }

    /// `GET /api/v1/cluster` of coordinator `i` (null if it does not answer).
    pub async fn view(&self, i: usize) -> Value {
        cluster_view(&self.c[i]).await
    }

    /// Index of the coordinator that leads, once every live one names the same leader
    /// and exactly one says it leads (within `secs`).
    pub async fn leader(&self, secs: u64) -> usize {
        let mut leader: usize;
        assert_eventually!(
            secs,
            {
                let mut views = Vec::new();
                for co in &self.c {
                    views.push(cluster_view(co).await);
                }
                let live: Vec<&Value> = views.iter().filter(|v| !v.is_null()).collect();
                let leads: Vec<usize> = (0..views.len())
                    .filter(|i| views[*i]["role"] == "leader")
                    .collect();
                leader = leads.first().copied().unwrap_or(0);
                leads.len() == 1
                    && !live.is_empty()
                    && live.iter().all(|v| v["leader"] == live[0]["leader"])
                    && !live[0]["leader"].is_null()
            },
            "no single agreed leader"
        );
        leader
    }

    /// Kills etcd members `which` (SIGKILL); `restart_etcd` brings them back.
    pub async fn kill_etcd(&mut self, which: &[usize]) {
        for i in which {
            self.etcd.kill9(*i).await;
        }
    }

    pub async fn restart_etcd(&mut self, which: &[usize]) {
        for i in which {
            self.etcd.restart(*i);
        }
        // Wait until the restarted members answer health with a leader again.
        for i in which {
            let addr: SocketAddr = self.etcd.endpoints[*i]
                .trim_start_matches("http://")
                .parse()
                .expect("etcd endpoint address");
            assert_eventually!(
                30,
                get_json(addr, "/health")
                    .await
                    .is_some_and(|h| h["health"] == "true"),
                "etcd member {i} not healthy after restart"
            );
        }
    }

    /// Waits (up to `secs`) until every coordinator shows every region `up`.
    pub async fn wait_all_up(&self, secs: u64) {
        for c in &self.c {
            assert_eventually!(
                secs,
                all_up(c, self.agents.len()).await,
                "regions not up on {}: {}",
                c.api,
                get_json(c.api, "/api/v1/regions")
                    .await
                    .unwrap_or(Value::Null)
            );
        }
    }

    /// A short pause for things that must *not* happen to have had their chance.
    pub async fn settle(secs: f64) {
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    }

    /// A sample of coordinator `i`'s `/metrics` with no labels (`None` if it does not
    /// answer or has no such line).
    pub async fn metric(&self, i: usize, name: &str) -> Option<f64> {
        metric(&self.c[i], name).await
    }

    /// Every entry of the shared purge log, read from etcd directly (in order).
    pub async fn shared_log(&self) -> Vec<proto::edge::PurgeEntry> {
        let etcd = etcd::Etcd::connect(&self.etcd.endpoints).expect("connect to etcd");
        let log = coordinator::purge::log::etcd::EtcdLog::open(etcd, "/vc-test/")
            .await
            .expect("open the shared log");
        let mut out: Vec<proto::edge::PurgeEntry> = Vec::new();
        loop {
            let next = out.last().map_or(1, |e| e.seq + 1);
            let batch = log
                .read_from(next, 1000)
                .await
                .expect("read the shared log");
            if batch.is_empty() {
                return out;
            }
            out.extend(batch);
        }
    }

    /// The directory everything runs in (logs: `c1/`, `a0/`, `etcd/`).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// `GET /api/v1/cluster` (null if the coordinator does not answer).
pub async fn cluster_view(c: &CoordinatorProc) -> Value {
    get_json(c.api, "/api/v1/cluster")
        .await
        .unwrap_or(Value::Null)
}

/// A sample with no labels from `c`'s `/metrics` (`None` if absent or no answer).
pub async fn metric(c: &CoordinatorProc, name: &str) -> Option<f64> {
    let req = b"GET /metrics HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n";
    let r = tokio::time::timeout(Duration::from_secs(2), crate::raw(c.api, req))
        .await
        .ok()?
        .ok()?;
    r.body.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// `coordinator_sessions_refused_total{reason}` on `c` (0 if absent).
pub async fn sessions_refused(c: &CoordinatorProc, reason: &str) -> u64 {
    let name = format!("coordinator_sessions_refused_total{{reason=\"{reason}\"}}");
    metric(c, &name).await.unwrap_or(0.0) as u64
}

/// The edges `c` holds connected sessions for itself (`/api/v1/edges?scope=local`).
pub async fn local_edges(c: &CoordinatorProc) -> Vec<String> {
    get_json(c.api, "/api/v1/edges?scope=local")
        .await
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|e| e["connected"] == true)
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect()
}

/// Whether `c` lists `regions` regions, each `up`.
pub async fn all_up(c: &CoordinatorProc, regions: usize) -> bool {
    get_json(c.api, "/api/v1/regions")
        .await
        .and_then(|v| v.as_array().cloned())
        .is_some_and(|r| r.len() == regions && r.iter().all(|r| r["health"] == "up"))
}
