//! One answer from every coordinator: three coordinators on a real 3-member etcd, each
//! holding a different edge's session (`Placement::Spread`), answer every read endpoint
//! the same — a purge's status on every edge, the edges, regions, config and rollouts,
//! warm jobs and their progress, alerts, per-country figures, popular URLs and routes —
//! and the CLI reads work against a follower. Then the leader is killed -9 in the middle
//! of a rollout, a warm job and an alert whose webhook hangs: the next leader finishes
//! all three, the alert goes out once, and the survivors show the same history.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tests::ha::{HaCluster, HaOpts, Placement};
use tests::{assert_eventually, purge_tags, raw, CoordinatorProc};

const LONDON: &str = "81.2.69.142";
const CHANGCHUN: &str = "175.16.199.9";

fn test_db() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/geoip/GeoIP2-City-Test.mmdb")
}

/// Probes every 300 ms, alerts to `webhook` grouped over 1.5 s.
fn monitoring(webhook: &str) -> String {
    format!(
        "[monitoring]\norigin = \"{{origin}}\"\nfailures_to_down = 3\nsuccesses_to_up = 2\n\
         [[checks]]\nname = \"health\"\npath = \"/health_check.php\"\ninterval_ms = 300\ntimeout_ms = 1000\nslow_ms = 5000\n\
         [alerts]\nwebhooks = [\"{webhook}\"]\ngroup_ms = 1500\n"
    )
}

/// `GET path` on `c` with the token: the JSON (null unless 200).
async fn read(c: &CoordinatorProc, path: &str) -> Value {
    let r = c.call("GET", path, None).await;
    if r.status == 200 {
        r.json()
    } else {
        Value::Null
    }
}

/// `v` without the object keys in `drop`, at any depth.
fn without(mut v: Value, drop: &[&str]) -> Value {
    fn strip(v: &mut Value, drop: &[&str]) {
        match v {
            Value::Object(m) => {
                m.retain(|k, _| !drop.contains(&k.as_str()));
                m.values_mut().for_each(|x| strip(x, drop));
            }
            Value::Array(a) => a.iter_mut().for_each(|x| strip(x, drop)),
            _ => {}
        }
    }
    strip(&mut v, drop);
    v
}

/// `path` read from each coordinator in `on`, as `norm` leaves it: the one answer when
/// they all give the same non-null one, else every answer.
async fn one_answer(
    ha: &HaCluster,
    on: &[usize],
    path: &str,
    norm: &dyn Fn(Value) -> Value,
) -> Result<Value, Vec<Value>> {
    let mut answers = Vec::new();
    for &i in on {
        answers.push(norm(read(&ha.c[i], path).await));
    }
    if !answers[0].is_null() && answers.iter().all(|a| *a == answers[0]) {
        Ok(answers.swap_remove(0))
    } else {
        Err(answers)
    }
}

/// Asserts that `path` answers the same on every coordinator in `on` within 15 s (two
/// relay rounds and the evaluation ticks are far less), less the keys in `drop`;
/// returns that answer.
async fn same_on(ha: &HaCluster, on: &[usize], path: &str, drop: &[&str]) -> Value {
    same_as(ha, on, path, &|v| without(v, drop)).await
}

/// [`same_on`] for answers as `norm` leaves them.
async fn same_as(ha: &HaCluster, on: &[usize], path: &str, norm: &dyn Fn(Value) -> Value) -> Value {
    let mut last: Result<Value, Vec<Value>>;
    assert_eventually!(
        15,
        {
            last = one_answer(ha, on, path, norm).await;
            last.is_ok()
        },
        "{path} differs between coordinators {on:?}: {:#?}",
        last.as_ref().err()
    );
    last.unwrap_or_default()
}

/// Shoppers on `varnish` behind a load balancer: from London and Changchun.
async fn shoppers(varnish: std::net::SocketAddr, page: u32) {
    for (xff, n) in [(LONDON, 2), (CHANGCHUN, 3)] {
        for _ in 0..n {
            let req = format!(
                "GET /p/{page} HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: {xff}\r\nConnection: close\r\n\r\n"
            );
            let r = raw(varnish, req.as_bytes()).await.expect("shopper request");
            assert_eq!(r.status, 200);
        }
    }
}

/// Every read endpoint answers the same on c1, c2 and c3, each holding one edge.
///
/// Fields dropped before comparing, each per coordinator by nature:
/// - edges' `last_seen`: the holder's heartbeat clock, moving every second, relayed a
///   round later;
/// - regions: only the judgement is compared (`name`, `edges`, `edges_connected`,
///   `health`, `diagnosis`, `purge_lag`); the rates and ages are sliding windows each
///   coordinator computes at its own instant;
///
/// Nothing is dropped from a purge's status, the config and rollouts, the warm jobs, the
/// alerts, the countries, the popular URLs or the route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_coordinator_gives_one_answer_to_every_read() {
    let (hook, got) = crate::monitor::receiver().await;
    let geo = format!(
        "[geo]\ndatabase = \"{}\"\ndefault_region = \"region-1\"\n",
        test_db().display()
    );
    let mut ha = HaCluster::start(HaOpts {
        placement: Placement::Spread,
        extra: format!("{}{geo}", monitoring(&format!("http://{hook}/hook"))),
        warm_extra: "origin_budget_rps = 60\nshard_urls = 10\n".into(),
        region_keys: vec![
            "lat = 53.35\nlon = -6.26".into(),
            "lat = 47.6\nlon = -122.3".into(),
            "lat = 35.68\nlon = 139.69".into(),
        ],
        ..HaOpts::default()
    })
    .await;
    let all = [0, 1, 2];
    let leader = ha.leader(30).await;
    let followers: Vec<usize> = all.iter().copied().filter(|i| *i != leader).collect();
    ha.wait_all_up(20).await;

    // Purges, each to another coordinator; shoppers on every edge.
    let mut seqs = Vec::new();
    for (i, c) in ha.c.iter().enumerate() {
        seqs.push(purge_tags(c.purge, &[&format!("cat_p_{i}")]).await);
    }
    // How long until every coordinator tells every edge's applied_at for the last one.
    let sent = std::time::Instant::now();
    let last = seqs[2];
    let told = |p: &Value| {
        p["edges"].as_object().is_some_and(|e| {
            e.len() == 3 && e.values().all(|e| e["applied_at_us"].as_u64().is_some())
        })
    };
    let mut answer: Result<Value, Vec<Value>>;
    assert_eventually!(
        15,
        {
            answer = one_answer(&ha, &all, &format!("/api/v1/purges/{last}"), &|v| v).await;
            answer.as_ref().is_ok_and(told)
        },
        "purge {last} not told alike with every edge: {answer:#?}"
    );
    let took = sent.elapsed();
    eprintln!("purge {last}: every coordinator lists all 3 edges' applied_at alike {took:?} after the 200");
    assert!(took < Duration::from_secs(10), "{took:?}");
    for (i, v) in ha.varnish.iter().enumerate() {
        shoppers(v.http, i as u32 + 1).await;
    }
    // A rollout to the whole fleet at once.
    let bundle = serde_json::to_value(coordinator_cli::demo::sample_bundle()).expect("bundle");
    let r = ha.c[leader]
        .call("POST", "/api/v1/config?canary=false", Some(&bundle))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rollout = r.json()["rollout"]["id"].as_u64().expect("rollout id");
    // A warm job: every follower serves it while the leader runs it.
    let job = ha.c[leader]
        .start_warm_job(&serde_json::json!({
            "sitemap": format!("http://{}/sitemap.xml?products=59", ha.origin.addr),
            "host": "shop.test"
        }))
        .await;
    for &f in &followers {
        let r = ha.c[f]
            .call("GET", &format!("/api/v1/warm/jobs/{job}"), None)
            .await;
        assert_eq!(
            r.status,
            200,
            "follower c{} on job {job}: {}",
            f + 1,
            r.body
        );
        assert_eq!(r.json()["id"].as_u64(), Some(job), "{}", r.body);
    }
    let view = ha.c[leader].warm_finished(job, 90).await;
    assert_eq!(view["state"], "done", "{view}");
    ha.c[leader].wait_rollout(rollout).await;
    // An alert: region-2's varnishd (its agent on c3) dies.
    ha.varnish[2].kill9().await;
    assert_eventually!(
        20,
        !got.lock().map(|g| g.is_empty()).unwrap_or(true),
        "no alert"
    );
    HaCluster::settle(3.0).await;

    // A purge's status lists every edge, with the same applied_at, on every coordinator.
    for seq in &seqs {
        let p = same_on(&ha, &all, &format!("/api/v1/purges/{seq}"), &[]).await;
        let edges = p["edges"].as_object().cloned().unwrap_or_default();
        assert_eq!(edges.len(), 3, "purge {seq}: {p}");
        assert!(
            edges
                .values()
                .all(|e| e["applied_at_us"].as_u64().is_some()),
            "purge {seq}: {p}"
        );
    }
    // `last_seen` and `silent_ms` are the holder's heartbeat clock, read at each moment.
    let edges = same_on(&ha, &all, "/api/v1/edges", &["last_seen", "silent_ms"]).await;
    assert_eq!(edges.as_array().map(Vec::len), Some(3), "{edges}");
    // Regions: the judgement (the rates and ages are windows each computes at its own
    // instant).
    let judgement = |v: Value| -> Value {
        v.as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        serde_json::json!({
                            "name": r["name"], "edges": r["edges"],
                            "edges_connected": r["edges_connected"], "health": r["health"],
                            "diagnosis": r["diagnosis"], "purge_lag": r["purge_lag"],
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .map_or(Value::Null, Value::from)
    };
    let regions = same_as(&ha, &all, "/api/v1/regions", &judgement).await;
    assert_eq!(regions[2]["health"], "down", "{regions}");
    for path in [
        "/api/v1/config",
        "/api/v1/config/versions",
        "/api/v1/warm/jobs",
        &format!("/api/v1/warm/jobs/{job}"),
        "/api/v1/alerts",
        "/api/v1/warm/top?n=20",
        &format!("/api/v1/route?ip={LONDON}"),
    ] {
        same_on(&ha, &all, path, &[]).await;
    }
    for r in 0..3 {
        let countries = same_on(
            &ha,
            &all,
            &format!("/api/v1/regions/region-{r}/countries"),
            &[],
        )
        .await;
        let n: u64 = countries
            .as_array()
            .map(|c| c.iter().filter_map(|c| c["requests"].as_u64()).sum())
            .unwrap_or(0);
        assert!(n >= 5, "region-{r}'s shoppers counted: {countries}");
    }
    let alerts = same_on(&ha, &all, "/api/v1/alerts", &[]).await;
    assert!(
        alerts["alerts"].as_array().is_some_and(|a| a
            .iter()
            .any(|a| a["delivered"] == 1 && a["changes"][0]["region"] == "region-2")),
        "{alerts}"
    );
    let top = same_on(&ha, &all, "/api/v1/warm/top?n=20", &[]).await;
    assert!(
        (0..3).all(|r| top[format!("region-{r}")]
            .as_array()
            .is_some_and(|l| !l.is_empty())),
        "every region's popular URLs everywhere: {top}"
    );

    // The CLI's reads against a follower.
    let f = &ha.c[followers[0]];
    let job_s = job.to_string();
    for args in [
        vec!["warm", "status", job_s.as_str()],
        vec!["warm", "status"],
        vec!["config", "status"],
        vec!["config", "list"],
        vec!["route", LONDON],
    ] {
        let (code, out, err) = f.cli(&args);
        assert_eq!(code, 0, "coordinator {args:?} on a follower: {out}{err}");
    }
    let (_, out, err) = f.cli(&["warm", "status", &job_s]);
    assert!(out.contains("done"), "{out}{err}");
    let (code, out, err) = f.cli(&["status", "--json"]);
    assert_eq!(code, 2, "region-2 is down: {out}{err}");
    let status: Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(
        status
            .as_array()
            .map(|r| r.iter().filter(|r| r["health"] == "down").count()),
        Some(1),
        "{out}"
    );
}

/// The leader dies -9 during a canary rollout, a warm job and an alert whose webhook
/// hangs: the next leader finishes the rollout and the job and sends the alert (once,
/// the same id), and both survivors show the same rollout, job and alert history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_mid_rollout_warm_job_and_alert_leaves_one_history() {
    let (hook, arrived, answered) = crate::ha::hanging_hook().await;
    let mut ha = HaCluster::start(HaOpts {
        placement: Placement::All,
        extra: format!(
            "[rollout]\ncanary_region = \"region-0\"\ncanary_wait_s = 6\n{}",
            monitoring(&format!("http://{hook}/hook"))
        ),
        warm_extra: "origin_budget_rps = 40\nshard_urls = 10\n".into(),
        ..HaOpts::default()
    })
    .await;
    let leader = ha.leader(30).await;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    ha.wait_all_up(20).await;
    // The rollout waits in its canary stage; the job warms region-0 and region-1.
    let bundle = serde_json::to_value(coordinator_cli::demo::sample_bundle()).expect("bundle");
    let r = ha.c[leader]
        .call("POST", "/api/v1/config?canary=true", Some(&bundle))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let started = r.json();
    let version = started["version"].as_str().expect("version").to_owned();
    let rollout = started["rollout"]["id"].as_u64().expect("rollout id");
    let job = ha.c[leader]
        .start_warm_job(&serde_json::json!({
            "sitemap": format!("http://{}/sitemap.xml?products=189", ha.origin.addr),
            "regions": ["region-0", "region-1"],
            "host": "shop.test"
        }))
        .await;
    let done = |v: &Value| {
        (0..2)
            .map(|i| {
                v["regions"][format!("region-{i}")]["done"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .sum::<u64>()
    };
    assert_eventually!(
        30,
        done(&ha.c[leader].warm_job(job).await) >= 40,
        "job did not progress"
    );
    // region-2's agent dies: the leader's alert about it hangs on the way.
    ha.agents[2].kill9().await;
    let lock = |m: &Arc<Mutex<Vec<Value>>>| m.lock().map(|v| v.clone()).unwrap_or_default();
    assert_eventually!(20, !lock(&arrived).is_empty(), "no alert from the leader");
    let first = lock(&arrived)[0].clone();
    assert_eq!(first["alerts"][0]["region"], "region-2", "{first}");
    let rollout_then = ha.c[leader].config().await["rollout"]["phase"].clone();
    let job_then = done(&ha.c[leader].warm_job(job).await);
    assert_ne!(rollout_then, "done", "the rollout is still under way");
    ha.c[leader].child.kill9().await;

    // One of the survivors leads and finishes everything.
    let mut next = survivors[0];
    assert_eventually!(
        20,
        {
            let mut leads = Vec::new();
            for &i in &survivors {
                if read(&ha.c[i], "/api/v1/cluster").await["role"] == "leader" {
                    leads.push(i);
                }
            }
            next = leads.first().copied().unwrap_or(next);
            leads.len() == 1
        },
        "no new leader"
    );
    let about = |v: &Value| {
        v["alerts"].as_array().is_some_and(|l| {
            l.iter()
                .any(|a| a["region"] == "region-2" && a["state"] == "down")
        })
    };
    assert_eventually!(
        20,
        lock(&answered).iter().any(about),
        "the next leader did not send the alert the last one left: {:?}",
        lock(&arrived)
    );
    let view = ha.c[next].wait_rollout(rollout).await;
    assert_eq!(view["rollout"]["phase"], "done", "{view}");
    assert_eq!(view["current"], version.as_str(), "{view}");
    let finished = ha.c[next].warm_finished(job, 120).await;
    assert_eq!(finished["state"], "done", "{finished}");
    let total: u64 = (0..2)
        .map(|i| {
            finished["regions"][format!("region-{i}")]["total"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(done(&finished), total, "{finished}");
    eprintln!(
        "leader killed with the rollout in {rollout_then} and {job_then} of {total} fetches done"
    );
    HaCluster::settle(3.0).await;
    let sent: Vec<Value> = lock(&answered).into_iter().filter(about).collect();
    assert_eq!(sent.len(), 1, "sent once: {sent:#?}");
    assert_eq!(sent[0]["id"], first["id"], "the same alert: {sent:#?}");

    // Both survivors tell the same history.
    let jobs = same_on(&ha, &survivors, "/api/v1/warm/jobs", &[]).await;
    assert_eq!(jobs["jobs"][0]["id"].as_u64(), Some(job), "{jobs}");
    same_on(&ha, &survivors, &format!("/api/v1/warm/jobs/{job}"), &[]).await;
    let config = same_on(&ha, &survivors, "/api/v1/config", &[]).await;
    assert_eq!(config["rollout"]["id"].as_u64(), Some(rollout), "{config}");
    let alerts = same_on(&ha, &survivors, "/api/v1/alerts", &[]).await;
    let listed: Vec<&Value> = alerts["alerts"]
        .as_array()
        .map(|a| a.iter().filter(|a| a["id"] == first["id"]).collect())
        .unwrap_or_default();
    assert_eq!(listed.len(), 1, "the alert listed once: {alerts}");
    assert_eq!(listed[0]["delivered"], 1, "{alerts}");
}

/// A leader cut off from etcd in the middle of its writes (its connections stay open and
/// silent) keeps answering. The warm job and the config push made just after the cut
/// wait on an etcd call that gets no answer; they are answered 503 when it gives up
/// (bounded at 5 s), and the reads made meanwhile, more of them than the coordinator
/// has worker threads, are answered at once: a write's etcd call holds up no reader, and
/// nothing that waits stalls the runtime that has to notice the timeout (before, the
/// leader stopped answering anything, for good). Healed, the cluster has one leader
/// again and a purge reaches every edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_mid_write_keeps_answering() {
    let ha = HaCluster::start(HaOpts {
        coordinators: 2,
        regions: 2,
        ..HaOpts::default()
    })
    .await;
    let l = ha.leader(30).await;
    let (api, token) = (ha.c[l].api, ha.c[l].token.clone());
    let call = move |method: &'static str, path: &'static str, body: Option<Value>| {
        let token = token.clone();
        tokio::spawn(async move {
            let at = std::time::Instant::now();
            let r = tests::api_call(api, method, path, Some(&token), body.as_ref()).await;
            (path, r.status, r.body, at.elapsed())
        })
    };
    ha.cut_etcd(l);
    let urls: Vec<String> = (1..=20)
        .map(|p| format!("http://{}/p/{p}", ha.origin.addr))
        .collect();
    let bundle = serde_json::to_value(coordinator_cli::demo::sample_bundle()).expect("bundle");
    let writes = [
        call(
            "POST",
            "/api/v1/warm/jobs",
            Some(serde_json::json!({"urls": urls, "host": "shop.test"})),
        ),
        call("POST", "/api/v1/config", Some(bundle)),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reads: Vec<_> = [
        "/api/v1/warm/jobs",
        "/api/v1/config",
        "/api/v1/warm/jobs",
        "/api/v1/config",
        "/api/v1/warm/jobs",
        "/api/v1/edges",
    ]
    .into_iter()
    .map(|p| call("GET", p, None))
    .collect();
    for read in reads {
        let (path, status, body, took) = read.await.expect("read task");
        eprintln!("GET {path} on the cut-off leader: {status} in {took:?}");
        assert!(took < Duration::from_secs(3), "GET {path} took {took:?}");
        assert!(
            status == 200 || status == 503,
            "GET {path}: {status} {body}"
        );
    }
    for write in writes {
        let (path, status, body, took) = write.await.expect("write task");
        eprintln!("POST {path} on the cut-off leader: {status} in {took:?}: {body}");
        assert!(took < Duration::from_secs(12), "POST {path} took {took:?}");
        // Nothing was committed, so nothing may be reported done.
        assert_ne!(status, 200, "POST {path} answered 200 without etcd: {body}");
    }
    ha.heal_etcd(l);
    let leader = ha.leader(30).await;
    let seq = purge_tags(ha.c[leader].purge, &["cut_p"]).await;
    for c in &ha.c {
        assert_eventually!(
            30,
            c.applied_everywhere(seq, 2).await,
            "purge {seq} not applied everywhere as {} sees it",
            c.api
        );
    }
}
