//! What each coordinator says about the cluster and its regions on a bad day: the
//! cluster view (`/api/v1/cluster`, `/metrics`, the dashboard's panel) never contradicts
//! itself and names a new leader as soon as it wins; and a coordinator that cannot see a
//! region (etcd gone, a peer silent) reads it `unknown` with the reason, never `down`,
//! and pages nobody. The one page etcd's outage earns is the cluster's own "etcd
//! unreachable" / "etcd back", once each.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tests::ha::{HaCluster, HaOpts, Placement};
use tests::{assert_eventually, chromium, get_json};

/// Probes every 300 ms, alerts to the receiver at `hook` grouped for 1.5 s.
fn monitored(hook: SocketAddr) -> HaOpts {
    HaOpts {
        placement: Placement::Spread,
        extra: format!(
            "[monitoring]\norigin = \"{{origin}}\"\nfailures_to_down = 3\nsuccesses_to_up = 2\nvarnish_restart_s = 0\n\
             [[checks]]\nname = \"health\"\npath = \"/health_check.php\"\ninterval_ms = 300\ntimeout_ms = 1000\nslow_ms = 5000\n\
             [alerts]\nwebhooks = [\"http://{hook}/hook\"]\ngroup_ms = 1500\n"
        ),
        ..HaOpts::default()
    }
}

async fn json(api: SocketAddr, path: &str) -> Option<Value> {
    tokio::time::timeout(Duration::from_secs(3), get_json(api, path))
        .await
        .ok()
        .flatten()
}

/// `(region, health, diagnosis)` as coordinator `api` shows them (empty if it does not
/// answer).
async fn regions(api: SocketAddr) -> Vec<(String, String, String)> {
    let r = json(api, "/api/v1/regions").await.unwrap_or(Value::Null);
    r.as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or("").to_owned();
            (s("name"), s("health"), s("diagnosis"))
        })
        .collect()
}

/// Samples every coordinator's regions and cluster view every ~100 ms until stopped, and
/// keeps what must never be: a region `down` or `agent_lost`, an `unknown` without a
/// reason of blindness, a role that contradicts the leader named.
struct Watch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
    unknown: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn start(apis: Vec<SocketAddr>, regions_too: bool) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let unknown = Arc::new(Mutex::new(Vec::new()));
        let (s, v, u) = (stop.clone(), seen.clone(), unknown.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                for (i, api) in apis.iter().enumerate() {
                    if let Some(c) = json(*api, "/api/v1/cluster").await {
                        let (role, leader, id) = (&c["role"], &c["leader"], &c["id"]);
                        let wrong = (role == "follower" && leader == id)
                            || (role == "leader" && leader != id);
                        if wrong {
                            v.lock()
                                .expect("lock")
                                .push(format!("c{}: contradiction {c}", i + 1));
                        }
                    }
                    if !regions_too {
                        continue;
                    }
                    for (name, health, why) in regions(*api).await {
                        if health == "down" || why == "agent_lost" {
                            v.lock()
                                .expect("lock")
                                .push(format!("c{}: {name} {health} ({why})", i + 1));
                        }
                        if health == "unknown" {
                            if why != "store_unavailable" && why != "peer_silent" {
                                v.lock().expect("lock").push(format!(
                                    "c{}: {name} unknown without a reason: {why:?}",
                                    i + 1
                                ));
                            }
                            u.lock()
                                .expect("lock")
                                .push(format!("c{}:{name}:{why}", i + 1));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Watch {
            stop,
            seen,
            unknown,
            task,
        }
    }

    /// Stops sampling; the violations seen, and every `unknown` sample.
    async fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let seen = self.seen.lock().expect("lock").clone();
        let unknown = self.unknown.lock().expect("lock").clone();
        (seen, unknown)
    }
}

fn apis(ha: &HaCluster) -> Vec<SocketAddr> {
    ha.c.iter().map(|c| c.api).collect()
}

/// The region pages the receiver got (alerts with changes), and the cluster alerts by
/// event.
fn pages(got: &Arc<Mutex<Vec<Value>>>) -> (Vec<Value>, Vec<String>) {
    let got = got.lock().expect("lock");
    let regions = got
        .iter()
        .filter(|a| a["alerts"].as_array().is_some_and(|c| !c.is_empty()))
        .cloned()
        .collect();
    let cluster = got
        .iter()
        .filter_map(|a| a["cluster"]["event"].as_str().map(str::to_owned))
        .collect();
    (regions, cluster)
}

/// A `# TYPE`-less sample line of `/metrics`.
fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics(api: SocketAddr) -> String {
    tokio::time::timeout(Duration::from_secs(3), tests::get(api, "/metrics"))
        .await
        .map(|r| r.body)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_view_names_one_leader_and_the_new_one_as_soon_as_it_wins() {
    let mut ha = HaCluster::start(HaOpts::default()).await;
    let leader = ha.leader(30).await;
    // Every coordinator lists the three, with the fields, and hears its peers.
    for i in 0..3 {
        assert_eventually!(
            10,
            {
                let v = ha.view(i).await;
                let members = v["members"].as_array().cloned().unwrap_or_default();
                v["store_reachable"] == true
                    && v["spool_depth"] == 0
                    && members.len() == 3
                    && members.iter().all(|m| {
                        let me = m["id"] == v["id"];
                        m["api"].as_str().is_some_and(|a| a.starts_with("http://"))
                            && m["store_reachable"] == true
                            && m["spool_depth"] == 0
                            && (m["role"] == "leader") == (m["id"] == v["leader"])
                            && (me == m["last_heard_ms_ago"].is_null())
                            && (me || m["last_heard_ms_ago"].as_u64().is_some_and(|ms| ms < 3000))
                    })
            },
            "c{}'s members: {}",
            i + 1,
            ha.view(i).await
        );
    }
    let names = ["c1", "c2", "c3"];
    for (i, c) in ha.c.iter().enumerate() {
        let named = format!("coordinator_cluster_leader{{id=\"{}\"}}", names[leader]);
        let is_leader = if i == leader { 1.0 } else { 0.0 };
        // Eventually: one slow peer answer may leave the leader unnamed for a second.
        assert_eventually!(
            10,
            {
                let m = metrics(c.api).await;
                metric(&m, "coordinator_cluster_is_leader") == Some(is_leader)
                    && metric(&m, &named) == Some(1.0)
                    && metric(&m, "coordinator_cluster_store_reachable") == Some(1.0)
                    && metric(&m, "coordinator_cluster_members") == Some(3.0)
                    && m.contains("coordinator_cluster_member_last_heard_seconds{member=")
            },
            "c{}'s cluster metrics: {}",
            i + 1,
            metrics(c.api).await
        );
    }

    // Kill -9 the leader; sample every coordinator's view through the whole episode.
    let watch = Watch::start(apis(&ha), false);
    ha.c[leader].child.kill9().await;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let dead = names[leader];
    let t0 = std::time::Instant::now();
    let mut new_leader: Option<String> = None;
    let mut named_at = None;
    let mut last_named_dead = None;
    // Until both survivors name the same new leader: leader null or the new one; never a
    // contradiction (the watch) — and after that, never the dead one.
    while t0.elapsed() < Duration::from_secs(20) {
        let mut views = Vec::new();
        for i in &survivors {
            views.push(ha.view(*i).await);
        }
        if views.iter().any(|v| v["leader"] == dead) {
            last_named_dead = Some(t0.elapsed());
        }
        let leads: Vec<&Value> = views.iter().filter(|v| v["role"] == "leader").collect();
        if let [l] = leads.as_slice() {
            let id = l["id"].as_str().unwrap_or("").to_owned();
            if views.iter().all(|v| v["leader"] == id.as_str()) {
                new_leader = Some(id);
                named_at = Some(t0.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_leader = new_leader.expect("the survivors agree on a new leader within 20 s");
    let named_at = named_at.unwrap_or_default();
    assert_ne!(new_leader, dead);
    // From then on, nobody names the dead leader (its lease may still be alive in etcd,
    // but it answers nobody).
    for _ in 0..30 {
        for i in &survivors {
            let v = ha.view(*i).await;
            assert_ne!(v["leader"], dead, "c{} names the dead leader: {v}", i + 1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in &survivors {
        let named = format!("coordinator_cluster_leader{{id=\"{new_leader}\"}}");
        assert_eventually!(
            10,
            metric(&metrics(ha.c[*i].api).await, &named) == Some(1.0),
            "{named}: {}",
            metrics(ha.c[*i].api).await
        );
        let v = ha.view(*i).await;
        let gone = v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["id"] == dead)
            .cloned();
        // The dead one's lease expired: gone from the list, or shown never answering.
        assert!(
            gone.as_ref().is_none_or(|m| m["role"].is_null()),
            "the dead coordinator still shown with a role: {v}"
        );
    }
    let (seen, _) = watch.finish().await;
    assert!(seen.is_empty(), "contradictions: {seen:#?}");
    eprintln!(
        "figure: survivors named the new leader {new_leader} {:.1} s after the leader's kill -9 (lease_ttl_s = 2); the dead one last named {}",
        named_at.as_secs_f64(),
        last_named_dead.map_or("never".into(), |t| format!("{:.1} s after", t.as_secs_f64()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_down_changes_nothing_for_users() {
    let (hook, got) = crate::monitor::receiver().await;
    let mut ha = HaCluster::start(monitored(hook)).await;
    ha.wait_all_up(20).await;
    let watch = Watch::start(apis(&ha), true);
    ha.kill_etcd(&[2]).await;
    HaCluster::settle(8.0).await;
    for i in 0..3 {
        let v = ha.view(i).await;
        assert_eq!(v["store_reachable"], true, "{v}");
        assert!(
            tests::ha::all_up(&ha.c[i], 3).await,
            "{:?}",
            regions(ha.c[i].api).await
        );
    }
    // The view says which etcd member is down.
    assert_eventually!(
        10,
        ha.view(0).await["etcd"].as_array().is_some_and(|m| m
            .iter()
            .filter(|m| m["healthy"] == false)
            .count()
            == 1),
        "one etcd member unhealthy: {}",
        ha.view(0).await
    );
    let (seen, unknown) = watch.finish().await;
    assert!(seen.is_empty(), "{seen:#?}");
    assert!(unknown.is_empty(), "no region unknown: {unknown:#?}");
    let (region_pages, cluster) = pages(&got);
    assert!(region_pages.is_empty(), "{region_pages:#?}");
    assert!(cluster.is_empty(), "{cluster:?}");
    ha.restart_etcd(&[2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_losing_quorum_is_no_outage_and_pages_once_each_way() {
    let (hook, got) = crate::monitor::receiver().await;
    let mut ha = HaCluster::start(monitored(hook)).await;
    ha.wait_all_up(20).await;
    let watch = Watch::start(apis(&ha), true);
    ha.kill_etcd(&[1, 2]).await;
    // Each coordinator finds etcd gone, and says so.
    for i in 0..3 {
        assert_eventually!(
            10,
            ha.view(i).await["store_reachable"] == false,
            "c{} still calls etcd reachable: {}",
            i + 1,
            ha.view(i).await
        );
        let v = ha.view(i).await;
        assert!(
            v["etcd"]
                .as_array()
                .is_some_and(|m| m.iter().all(|m| m["healthy"] == false)),
            "c{}'s etcd members shown healthy while unreachable: {v}",
            i + 1
        );
        let h = json(ha.c[i].api, "/healthz").await.unwrap_or_default();
        assert_eq!(h["store"], "unavailable", "{h}");
        assert_ne!(h["status"], "down", "{h}");
        let m = metrics(ha.c[i].api).await;
        assert_eq!(metric(&m, "coordinator_cluster_store_reachable"), Some(0.0));
    }
    assert_eventually!(
        15,
        pages(&got).1 == ["store_unreachable"],
        "one \"etcd unreachable\" cluster alert: {:?}",
        got.lock().expect("lock")
    );
    HaCluster::settle(15.0).await;
    // Without quorum no one holds a lease: no coordinator names a leader that says it is
    // not one (the election's last word is not the truth any more).
    let mut views: Vec<serde_json::Value> = Vec::new();
    assert_eventually!(
        5,
        {
            views.clear();
            for i in 0..3 {
                views.push(ha.view(i).await);
            }
            views.iter().all(|v| match v["leader"].as_str() {
                Some(l) => views.iter().any(|o| o["id"] == l && o["role"] == "leader"),
                None => true,
            })
        },
        "a coordinator names a leader that does not lead: {views:#?}"
    );
    ha.restart_etcd(&[1, 2]).await;
    for i in 0..3 {
        assert_eventually!(
            20,
            ha.view(i).await["store_reachable"] == true,
            "c{} does not see etcd back: {}",
            i + 1,
            ha.view(i).await
        );
    }
    assert_eventually!(
        20,
        pages(&got).1 == ["store_unreachable", "store_back"],
        "one \"etcd back\" cluster alert: {:?}",
        got.lock().expect("lock")
    );
    ha.leader(30).await;
    ha.wait_all_up(20).await;
    // Long enough for a new leader's take-over and any grouped alert to go out.
    HaCluster::settle(6.0).await;
    let (seen, unknown) = watch.finish().await;
    assert!(
        seen.is_empty(),
        "a region called down while etcd was gone: {seen:#?}"
    );
    let (region_pages, cluster) = pages(&got);
    assert!(region_pages.is_empty(), "region pages: {region_pages:#?}");
    assert_eq!(cluster, ["store_unreachable", "store_back"]);
    eprintln!(
        "figure: {} unknown region samples across the coordinators during quorum loss",
        unknown.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_cut_off_from_etcd_says_so_and_no_one_calls_a_region_down() {
    let (hook, got) = crate::monitor::receiver().await;
    let ha = HaCluster::start(monitored(hook)).await;
    ha.wait_all_up(20).await;
    // Cut off the leader: the hardest case for its view of who leads.
    let cut = ha.leader(30).await;
    let watch = Watch::start(apis(&ha), true);
    ha.cut_etcd(cut);
    assert_eventually!(
        10,
        ha.view(cut).await["store_reachable"] == false,
        "the cut-off coordinator still calls etcd reachable: {}",
        ha.view(cut).await
    );
    HaCluster::settle(10.0).await;
    // It lost its lease: it does not lead, and names a real leader or none.
    let v = ha.view(cut).await;
    assert_eq!(v["role"], "follower", "{v}");
    assert_ne!(v["leader"], v["id"], "{v}");
    let others: Vec<usize> = (0..3).filter(|i| *i != cut).collect();
    let mut leaders = Vec::new();
    for i in &others {
        let o = ha.view(*i).await;
        if o["role"] == "leader" {
            leaders.push(o["id"].clone());
        }
    }
    assert!(
        v["leader"].is_null() || leaders.contains(&v["leader"]),
        "names {} while the leaders are {leaders:?}",
        v["leader"]
    );
    assert!(
        v["etcd"]
            .as_array()
            .is_some_and(|m| m.iter().all(|m| m["healthy"] == false)),
        "{v}"
    );
    // The others keep serving: they reach etcd, agree on a leader among them.
    for i in &others {
        let o = ha.view(*i).await;
        assert_eq!(o["store_reachable"], true, "{o}");
        assert_eventually!(
            5,
            tests::ha::all_up(&ha.c[*i], 3).await,
            "{:?}",
            regions(ha.c[*i].api).await
        );
        let seq = tests::purge_tags(ha.c[*i].purge, &["cat_p_9"]).await;
        assert!(seq > 0);
    }
    // And the cut-off one's own member entry says it cannot reach etcd.
    assert_eventually!(
        5,
        ha.view(others[0]).await["members"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["id"] == v["id"] && m["store_reachable"] == false),
        "peers do not show it blind to etcd: {}",
        ha.view(others[0]).await
    );
    ha.heal_etcd(cut);
    assert_eventually!(
        15,
        ha.view(cut).await["store_reachable"] == true,
        "etcd back: {}",
        ha.view(cut).await
    );
    ha.leader(30).await;
    HaCluster::settle(4.0).await;
    let (seen, _) = watch.finish().await;
    assert!(seen.is_empty(), "{seen:#?}");
    let (region_pages, cluster) = pages(&got);
    assert!(region_pages.is_empty(), "{region_pages:#?}");
    assert!(
        cluster.is_empty(),
        "one coordinator cut off is no etcd outage: {cluster:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_cut_off_from_its_peers_leaves_its_region_unknown_not_down() {
    let (hook, got) = crate::monitor::receiver().await;
    let ha = HaCluster::start(monitored(hook)).await;
    ha.wait_all_up(20).await;
    let watch = Watch::start(apis(&ha), true);
    // c2 holds edge-1 (region-1), Placement::Spread.
    ha.cut_peers(1);
    for i in [0, 2] {
        assert_eventually!(
            20,
            regions(ha.c[i].api)
                .await
                .iter()
                .any(|(n, h, d)| n == "region-1" && h == "unknown" && d == "peer_silent"),
            "c{} does not read region-1 unknown (peer_silent): {:?}",
            i + 1,
            regions(ha.c[i].api).await
        );
        let h = json(ha.c[i].api, "/healthz").await.unwrap_or_default();
        assert_eq!(
            h["status"], "unknown",
            "an unknown region is no outage, and not ok either: {h}"
        );
        assert_eq!(
            h["regions_not_up"]["region-1"]["diagnosis"], "peer_silent",
            "{h}"
        );
    }
    // c2 itself sees its region fine.
    assert!(
        tests::ha::all_up(&ha.c[1], 3).await,
        "{:?}",
        regions(ha.c[1].api).await
    );
    HaCluster::settle(5.0).await;
    ha.heal_peers(1);
    ha.wait_all_up(20).await;
    HaCluster::settle(4.0).await;
    let (seen, unknown) = watch.finish().await;
    assert!(seen.is_empty(), "{seen:#?}");
    assert!(!unknown.is_empty());
    let (region_pages, cluster) = pages(&got);
    assert!(
        region_pages.is_empty(),
        "unknown pages nobody: {region_pages:#?}"
    );
    assert!(cluster.is_empty(), "{cluster:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_cluster_panel() {
    let ha = HaCluster::start(HaOpts::default()).await;
    let leader = ha.leader(30).await;
    assert_eventually!(
        10,
        ha.view(0).await["members"]
            .as_array()
            .is_some_and(|m| m.iter().all(|m| !m["role"].is_null())),
        "c1 hears every peer: {}",
        ha.view(0).await
    );
    let url = format!("http://{}/", ha.c[0].api);
    let profile = ha.path().join("chromium");
    let out = chromium(&["--dump-dom", &url], &profile);
    let dom = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {stderr}");
    let console: Vec<&str> = stderr.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:#?}");
    let names = ["c1", "c2", "c3"];
    for id in names {
        assert!(
            dom.contains(&format!("data-member=\"{id}\"")),
            "member {id} missing:\n{dom}"
        );
    }
    let panel = dom
        .split("id=\"cluster\"")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or("");
    assert!(panel.contains("leader ★"), "the leader marked: {panel}");
    assert!(panel.matches(">reachable<").count() == 3, "{panel}");
    assert!(panel.contains("s ago"), "last heard: {panel}");
    assert!(
        dom.contains(&format!("leader {}", names[leader])) && dom.contains("spool 0"),
        "summary:\n{dom}"
    );
}
