//! Maintenance end to end: draining a region (routing over JSON and a real PowerDNS
//! stop sending it shoppers, its health is still the truth, its alerts are held, purges
//! and config still reach it, and it comes back only healthy), and alert silences (a
//! known incident pages once). Real varnishd, agents, coordinators, etcd and webhooks.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::ha::{HaCluster, HaOpts};
use tests::{
    api_call, assert_eventually, assert_stays, get_json, magento_purge, raw, regions, temp_dir,
    Cluster, CoordinatorOpts, CoordinatorProc, Pdns,
};

use crate::geo::{dns_a, geo_toml, region_keys, route, test_db, why_not, LONDON, MILTON_WA};

/// Probes every 300 ms, down after 2 failures, up after 2 successes; geo routing with a
/// 3 s hold-down and the DNS backend; alerts to `hook`, if any.
fn monitored(hook: Option<SocketAddr>) -> String {
    let alerts = hook
        .map(|h| format!("[alerts]\nwebhooks = [\"http://{h}/hook\"]\ngroup_ms = 1000\n"))
        .unwrap_or_default();
    format!(
        "[monitoring]\norigin = \"{{origin}}\"\nfailures_to_down = 2\nsuccesses_to_up = 2\nvarnish_restart_s = 0\n\
         [[checks]]\nname = \"health\"\npath = \"/health_check.php\"\ninterval_ms = 300\ntimeout_ms = 1000\nslow_ms = 5000\n\
         {alerts}{}",
        geo_toml(&test_db("GeoIP2-City-Test"), "")
    )
}

fn opts(hook: Option<SocketAddr>) -> CoordinatorOpts {
    CoordinatorOpts {
        extra: monitored(hook),
        region_keys: region_keys(),
        ..CoordinatorOpts::default()
    }
}

/// Region `name`'s row of `GET /api/v1/regions` (null if absent or no answer).
async fn row(api: SocketAddr, name: &str) -> Value {
    tokio::time::timeout(Duration::from_secs(3), get_json(api, "/api/v1/regions"))
        .await
        .ok()
        .flatten()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or(Value::Null)
}

/// The changes for `region` the webhooks received, in order.
fn pages(got: &Arc<Mutex<Vec<Value>>>, region: &str) -> Vec<Value> {
    got.lock()
        .expect("lock")
        .iter()
        .flat_map(|a| a["alerts"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["region"] == region)
        .collect()
}

/// The changes for `region` in `GET /api/v1/alerts`, newest first.
async fn listed(c: &CoordinatorProc, region: &str) -> Vec<Value> {
    get_json(c.api, "/api/v1/alerts").await.unwrap_or_default()["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|a| a["changes"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["region"] == region)
        .collect()
}

/// Asserts that `POST path` with `body` is a 400 whose error says `says`.
async fn refused_400(c: &CoordinatorProc, path: &str, body: &Value, says: &str) {
    let r = c.call("POST", path, Some(body)).await;
    assert_eq!(r.status, 400, "{body}: {}", r.body);
    let error = r.json()["error"].as_str().unwrap_or("").to_owned();
    assert!(error.contains(says), "{body}: {error}");
}

/// Asserts each `(family, region, value)` sample of `c`'s `/metrics`.
async fn assert_samples(c: &CoordinatorProc, want: &[(&str, &str, f64)]) {
    let metrics = c.call("GET", "/metrics", None).await.body;
    for (family, region, value) in want {
        let name = format!("{family}{{region=\"{region}\"}}");
        assert_eq!(sample(&metrics, &name), Some(*value), "{name}");
    }
}

fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok())?
    })
}

/// The id `silence add` printed (`silence ID: ...`).
fn silence_id(out: &str) -> String {
    out.trim()
        .strip_prefix("silence ")
        .and_then(|s| s.split(':').next())
        .unwrap_or_else(|| panic!("no silence id in {out:?}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_region_gets_no_shopper_over_json_or_dns_and_still_gets_purges_and_config() {
    let cluster = Cluster::start(3, "ban", opts(None)).await;
    let c = &cluster.coordinator;
    assert_eventually!(
        20,
        route(c, LONDON).await.region == "region-0"
            && route(c, LONDON).await.candidates.iter().all(|c| c.eligible),
        "London not on region-0 with every region eligible: {:?}",
        route(c, LONDON).await
    );
    let pdns = Pdns::start(
        &cluster.dir.path().join("pdns"),
        c.dns.expect("dns backend"),
    )
    .await;
    assert_eq!(
        dns_a(pdns.addr, Some("81.2.69.142/32")).await,
        ["198.51.100.10"]
    );

    // Bad requests are refused, one clear line each, and drain nothing.
    let nowhere = c.call("POST", "/api/v1/regions/nowhere/drain", None).await;
    assert_eq!(nowhere.status, 404, "{}", nowhere.body);
    assert!(nowhere.body.contains("nowhere"), "{}", nowhere.body);
    for (body, says) in [
        (json!({"for_s": "soon"}), "for_s"),
        (json!({"reason": "x", "until": 5}), "until"),
        (json!({"for_s": 0}), "at least 1 second"),
    ] {
        refused_400(c, "/api/v1/regions/region-0/drain", &body, says).await;
    }
    let anonymous = api_call(c.api, "POST", "/api/v1/regions/region-0/drain", None, None).await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.body);
    assert_eq!(row(c.api, "region-0").await["drained"], false);

    // Drained: routing and DNS send London elsewhere, the candidate says why.
    let (code, out, err) = c.cli(&["region", "drain", "region-0", "--reason", "kernel upgrade"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with("region-0 drained by token_file until undrained (kernel upgrade)"),
        "{out}"
    );
    assert_eventually!(
        3,
        why_not(&route(c, LONDON).await, "region-0").contains(&"drained".to_owned()),
        "region-0 not drained in routing: {:?}",
        route(c, LONDON).await
    );
    let away = route(c, LONDON).await;
    assert_eq!(away.region, "region-1", "{away:?}");
    assert_eq!(why_not(&away, "region-0"), ["drained"]);
    assert_eventually!(
        5,
        dns_a(pdns.addr, Some("81.2.69.142/32")).await == ["198.51.100.20"],
        "DNS still answers region-0: {:?}",
        dns_a(pdns.addr, Some("81.2.69.142/32")).await
    );
    let geo = get_json(c.api, "/api/v1/geo").await.unwrap_or_default();
    assert_eq!(geo["regions"][0]["eligible"], false, "{geo}");
    // Its health is still the truth, with who drained it and why.
    let r0 = row(c.api, "region-0").await;
    assert_eq!(
        (&r0["health"], &r0["drained"]),
        (&json!("up"), &json!(true)),
        "{r0}"
    );
    assert_eq!(r0["drain"]["by"], "token_file");
    assert_eq!(r0["drain"]["reason"], "kernel upgrade");
    assert!(r0["drain"]["at_ms"].as_u64().is_some() && r0["drain"]["until_ms"].is_null());
    assert_eq!(row(c.api, "region-1").await["drain"], Value::Null);
    assert_samples(
        c,
        &[
            ("coordinator_region_drained", "region-0", 1.0),
            ("coordinator_region_drained", "region-1", 0.0),
            ("coordinator_geo_region_eligible", "region-0", 0.0),
        ],
    )
    .await;
    let (code, out, _) = c.cli(&["status"]);
    assert_eq!(code, 0, "a drained region does not count: {out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("region-0"))
        .unwrap_or("");
    assert!(line.contains("up") && line.contains("drained"), "{out}");
    assert!(
        out.contains("region-0: drained by token_file: kernel upgrade"),
        "{out}"
    );

    // Purges and config still reach it.
    let r = raw(c.purge, &magento_purge("((^|,)cat_p_1(,|$))"))
        .await
        .expect("purge");
    assert_eq!(r.status, 200, "{}", r.body);
    let seq = r.json()["seq"].as_u64().expect("seq");
    cluster.wait_applied(seq).await;
    assert!(c.edge("edge-0").await["applied_seq"].as_u64() >= Some(seq));
    let mut bundle = coordinator_cli::demo::sample_bundle();
    bundle.files.insert(
        "waf.toml".into(),
        "[[block]]\nprefix = \"/drained\"\n".into(),
    );
    let (version, view) = c.push_and_wait(&bundle, false).await;
    assert_eq!(view["rollout"]["phase"], "done", "{view}");
    let edge0 = view["edges"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["id"] == "edge-0").cloned())
        .unwrap_or_default();
    assert_eq!(edge0["active_version"], version.as_str(), "{view}");

    // Undrained: back after the hold-down (it is healthy), over JSON and DNS.
    let (code, out, err) = c.cli(&["region", "undrain", "region-0"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("region-0 undrained (drained by token_file since "),
        "{out}"
    );
    assert_eq!(route(c, LONDON).await.region, "region-1", "held down first");
    assert_eventually!(
        10,
        route(c, LONDON).await.region == "region-0",
        "region-0 never got London back: {:?}",
        route(c, LONDON).await
    );
    assert_eventually!(
        5,
        dns_a(pdns.addr, Some("81.2.69.142/32")).await == ["198.51.100.10"],
        "DNS does not answer region-0 again"
    );
    assert_eq!(row(c.api, "region-0").await["drained"], false);
    let (code, out, _) = c.cli(&["region", "undrain", "region-0"]);
    assert_eq!((code, out.trim()), (0, "region-0 was not drained"));
    drop(pdns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_varnishd_killed_while_drained_is_down_truthfully_pages_nobody_and_returns_only_healthy()
{
    let (hook, got) = crate::monitor::receiver().await;
    let mut cluster = Cluster::start(2, "ban", opts(Some(hook))).await;
    let api = cluster.coordinator.api;
    for r in ["region-0", "region-1"] {
        assert_eventually!(20, row(api, r).await["health"] == "up", "{r} not up");
    }
    assert_eventually!(
        10,
        route(&cluster.coordinator, MILTON_WA).await.region == "region-1",
        "Milton not on region-1"
    );
    let drain = |reason: &str| {
        let (c, body) = (&cluster.coordinator, json!({"reason": reason}));
        async move {
            let r = c
                .call("POST", "/api/v1/regions/region-1/drain", Some(&body))
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
        }
    };
    drain("varnish upgrade").await;
    let elsewhere = || async {
        let v = route(&cluster.coordinator, MILTON_WA).await;
        v.region != "region-1"
    };
    assert_eventually!(3, elsewhere().await, "region-1 still routed");

    // Its varnishd dies: the region says down, the change is listed held, nobody is paged.
    cluster.varnish[1].kill9().await;
    assert_eventually!(
        15,
        row(api, "region-1").await["health"] == "down",
        "region-1 not down: {}",
        row(api, "region-1").await
    );
    let r1 = row(api, "region-1").await;
    assert_eq!(
        (&r1["drained"], &r1["diagnosis"]),
        (&json!(true), &json!("edge_down"))
    );
    assert_eventually!(
        10,
        listed(&cluster.coordinator, "region-1")
            .await
            .iter()
            .any(|c| c["state"] == "down" && c["held"] == "drained"),
        "no held change listed: {:?}",
        listed(&cluster.coordinator, "region-1").await
    );
    let v = route(&cluster.coordinator, MILTON_WA).await;
    assert_ne!(v.region, "region-1");
    assert_eq!(why_not(&v, "region-1"), ["drained", "down"], "{v:?}");
    cluster.varnish[1].restart().await;
    assert_eventually!(
        20,
        row(api, "region-1").await["health"] == "up",
        "region-1 not up"
    );
    // Routing observes twice a second: healthy now, still drained.
    assert_eventually!(
        2,
        why_not(&route(&cluster.coordinator, MILTON_WA).await, "region-1") == ["drained"],
        "region-1 not just drained: {:?}",
        route(&cluster.coordinator, MILTON_WA).await
    );
    assert!(elsewhere().await, "healthy but still drained");

    // Undrained healthy: back once the hold-down passed, and still nobody paged (it is
    // as the webhooks last heard).
    let r = cluster
        .coordinator
        .call("DELETE", "/api/v1/regions/region-1/drain", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["drain"]["reason"], "varnish upgrade");
    assert_eventually!(
        10,
        route(&cluster.coordinator, MILTON_WA).await.region == "region-1",
        "region-1 not back"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        pages(&got, "region-1").is_empty(),
        "{:?}",
        pages(&got, "region-1")
    );

    // Drained, killed, undrained while still down: told once that it is down, and no
    // shopper until it is healthy again.
    drain("second try").await;
    assert_eventually!(3, elsewhere().await, "region-1 still routed");
    cluster.varnish[1].kill9().await;
    assert_eventually!(
        15,
        row(api, "region-1").await["health"] == "down",
        "not down"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(pages(&got, "region-1").is_empty(), "held while drained");
    let r = cluster
        .coordinator
        .call("DELETE", "/api/v1/regions/region-1/drain", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eventually!(
        10,
        pages(&got, "region-1").len() == 1,
        "no page on undrain while down: {:?}",
        got.lock().expect("lock")
    );
    let page = &pages(&got, "region-1")[0];
    assert_eq!(
        (&page["previous"], &page["state"]),
        (&json!("up"), &json!("down")),
        "{page}"
    );
    assert_stays!(2, elsewhere().await, "a down region got shoppers back");
    assert_eventually!(
        2,
        why_not(&route(&cluster.coordinator, MILTON_WA).await, "region-1") == ["down"],
        "region-1 not just down"
    );
    cluster.varnish[1].restart().await;
    assert_eventually!(
        25,
        route(&cluster.coordinator, MILTON_WA).await.region == "region-1",
        "region-1 not back once healthy"
    );
    assert_eventually!(10, pages(&got, "region-1").len() == 2, "recovery not paged");
    assert_eq!(pages(&got, "region-1")[1]["state"], "up");
    assert!(pages(&got, "region-0").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_for_a_while_survives_a_restart_and_ends_by_itself() {
    let dir = temp_dir();
    let backend: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    // An operator's admin token and a dashboard's read-only one.
    let (ops, reader) = (
        "ops-secret-0123456789abcdef",
        "dash-secret-0123456789abcdef",
    );
    let mut tokens = String::new();
    for (name, secret, scopes) in [("ops", ops, "\"admin\""), ("dashboard", reader, "\"read\"")] {
        let file = dir.path().join(name);
        std::fs::write(&file, secret).expect("token file");
        tokens.push_str(&format!(
            "[[api.tokens]]\nname = \"{name}\"\nfile = \"{}\"\nscopes = [{scopes}]\n",
            file.display()
        ));
    }
    let mut c = CoordinatorProc::start(
        &dir.path().join("coordinator"),
        &CoordinatorOpts {
            insecure: true,
            regions: regions(2, backend),
            extra: tokens,
            ..CoordinatorOpts::default()
        },
    )
    .await;
    // Draining takes the admin scope, and records who drained.
    let drain_1 = "/api/v1/regions/region-1/drain";
    let r = api_call(c.api, "POST", drain_1, Some(reader), None).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("admin"), "{}", r.body);
    for path in ["/api/v1/silences", "/api/v1/silences/0123456789ab"] {
        let method = if path.ends_with("silences") {
            "POST"
        } else {
            "DELETE"
        };
        let r = api_call(
            c.api,
            method,
            path,
            Some(reader),
            Some(&json!({"region": "region-1", "for_s": 60})),
        )
        .await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
    }
    let r = api_call(c.api, "POST", drain_1, Some(ops), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["drain"]["by"], "ops");
    let audit = api_call(c.api, "GET", "/api/v1/audit", Some(reader), None)
        .await
        .json();
    assert!(
        audit["entries"].as_array().is_some_and(|e| e
            .iter()
            .any(|e| e["action"] == "region.drain" && e["token"] == "ops" && e["status"] == 200)),
        "{audit}"
    );
    let (code, _, err) = c.cli(&["region", "drain", "region-0", "--for", "2x"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a duration"), "{err}");
    let (code, out, err) = c.cli(&[
        "region", "drain", "region-0", "--for", "8s", "--reason", "patch",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("region-0 drained by token_file until 20") && out.contains("(patch)"),
        "{out}"
    );
    let (code, out, err) = c.cli(&["silence", "add", "--region", "region-1", "--for", "1h"]);
    assert_eq!(code, 0, "{err}");
    let id = silence_id(&out);
    let before = row(c.api, "region-0").await["drain"].clone();
    let until = before["until_ms"].as_u64().expect("an expiry");

    // Both drains and the silence survive a kill -9.
    c.kill9_and_restart().await;
    assert_eq!(row(c.api, "region-0").await["drain"], before);
    assert_eq!(row(c.api, "region-1").await["drained"], true);
    let (_, out, _) = c.cli(&["silence", "list"]);
    assert!(out.contains(&id), "{out}");

    // The timed one ends by itself; the other stays.
    assert_eventually!(
        15,
        row(c.api, "region-0").await["drained"] == false,
        "region-0 still drained: {}",
        row(c.api, "region-0").await
    );
    let late = coordinator::clock::now_ms().saturating_sub(until);
    eprintln!("figure: a drain ended {late} ms after its until_ms, as seen by a poll every 50 ms");
    assert_samples(
        &c,
        &[
            ("coordinator_region_drained", "region-0", 0.0),
            ("coordinator_region_drained", "region-1", 1.0),
            ("coordinator_region_silenced", "region-1", 1.0),
        ],
    )
    .await;
    c.stop().await;
    c.restart().await;
    assert_eq!(
        row(c.api, "region-0").await["drained"],
        false,
        "not brought back"
    );
    assert_eq!(row(c.api, "region-1").await["drained"], true);
    let (code, out, err) = c.cli(&["silence", "remove", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("removed silence {id}: region region-1")),
        "{out}"
    );
    let (code, _, err) = c.cli(&["silence", "remove", &id]);
    assert_eq!(code, 1, "a silence removed twice");
    assert!(err.contains("404"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_incident_pages_once_under_a_silence_and_the_next_change_after_it_pages() {
    let (hook, got) = crate::monitor::receiver().await;
    let mut cluster = Cluster::start(2, "ban", opts(Some(hook))).await;
    let api = cluster.coordinator.api;
    for r in ["region-0", "region-1"] {
        assert_eventually!(20, row(api, r).await["health"] == "up", "{r} not up");
    }
    let health_is =
        |want: &'static str| async move { row(api, "region-1").await["health"] == want };

    // The incident pages once.
    cluster.varnish[1].kill9().await;
    assert_eventually!(15, pages(&got, "region-1").len() == 1, "down not paged");
    assert_eq!(pages(&got, "region-1")[0]["state"], "down");

    // Bad silences are refused.
    for (body, says) in [
        (json!({"for_s": 60}), "region, a diagnosis"),
        (json!({"region": "region-1", "for_s": 700_000}), "7 days"),
        (json!({"region": "region-1"}), "for_s"),
        (
            json!({"diagnosis": "nope", "for_s": 60}),
            "unknown diagnosis",
        ),
        (json!({"region": "nowhere", "for_s": 60}), "nowhere"),
    ] {
        refused_400(&cluster.coordinator, "/api/v1/silences", &body, says).await;
    }
    let (code, out, err) = cluster.coordinator.cli(&[
        "silence",
        "add",
        "--region",
        "region-1",
        "--for",
        "1h",
        "--reason",
        "known: disk swap",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    let id = silence_id(&out);
    assert!(
        out.contains("region region-1, diagnosis any, by token_file, until "),
        "{out}"
    );
    let (_, list, _) = cluster.coordinator.cli(&["silence", "list"]);
    assert!(
        list.contains(&id) && list.contains("(known: disk swap)"),
        "{list}"
    );

    // Flaps under the silence: listed with it, paged to nobody.
    for (restart, want) in [(true, "up"), (false, "down"), (true, "up")] {
        if restart {
            cluster.varnish[1].restart().await;
        } else {
            cluster.varnish[1].kill9().await;
        }
        assert_eventually!(20, health_is(want).await, "region-1 not {want}");
        assert_eventually!(
            10,
            listed(&cluster.coordinator, "region-1")
                .await
                .first()
                .is_some_and(|c| c["state"] == want
                    && c["held"] == "silenced"
                    && c["silence"] == id.as_str()),
            "no silenced {want} listed: {:?}",
            listed(&cluster.coordinator, "region-1").await
        );
    }
    assert_eq!(
        pages(&got, "region-1").len(),
        1,
        "{:?}",
        pages(&got, "region-1")
    );
    assert_samples(
        &cluster.coordinator,
        &[
            ("coordinator_region_silenced", "region-1", 1.0),
            ("coordinator_region_silenced", "region-0", 0.0),
        ],
    )
    .await;

    // Removed: the next change pages.
    let (code, _, err) = cluster.coordinator.cli(&["silence", "remove", &id]);
    assert_eq!(code, 0, "{err}");
    cluster.varnish[1].kill9().await;
    assert_eventually!(
        15,
        pages(&got, "region-1").len() == 2,
        "down after removal not paged"
    );
    assert_eq!(pages(&got, "region-1")[1]["state"], "down");

    // A silence of the diagnosis covers the recovery from it; once it expired, the next
    // change pages.
    let (code, out, err) =
        cluster
            .coordinator
            .cli(&["silence", "add", "--diagnosis", "edge_down", "--for", "4s"]);
    assert_eq!(code, 0, "{err}");
    let id = silence_id(&out);
    cluster.varnish[1].restart().await;
    assert_eventually!(20, health_is("up").await, "region-1 not up");
    assert_eventually!(
        10,
        listed(&cluster.coordinator, "region-1")
            .await
            .first()
            .is_some_and(|c| c["state"] == "up" && c["silence"] == id.as_str()),
        "the recovery was not silenced"
    );
    assert_eventually!(
        10,
        get_json(api, "/api/v1/silences").await.unwrap_or_default()["silences"] == json!([]),
        "the silence did not expire"
    );
    cluster.varnish[1].kill9().await;
    assert_eventually!(
        15,
        pages(&got, "region-1").len() == 3,
        "down after expiry not paged"
    );
    assert!(pages(&got, "region-0").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_made_on_the_leader_holds_on_every_coordinator_and_through_a_quorum_loss() {
    let mut ha = HaCluster::start(HaOpts {
        coordinators: 2,
        regions: 2,
        extra: monitored(None),
        region_keys: region_keys(),
        ..HaOpts::default()
    })
    .await;
    ha.wait_all_up(20).await;
    let leader = ha.leader(30).await;
    let follower = 1 - leader;
    for c in &ha.c {
        assert_eventually!(
            10,
            route(c, LONDON).await.region == "region-0",
            "London not on region-0 at {}",
            c.api
        );
    }

    // A follower refuses the write, naming the leader.
    let r = ha.c[follower]
        .call("POST", "/api/v1/regions/region-0/drain", None)
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let leader_id = format!("c{}", leader + 1);
    assert!(r.body.contains(&leader_id), "{}", r.body);
    assert_eq!(row(ha.c[follower].api, "region-0").await["drained"], false);

    // Made on the leader, seen on the follower within seconds.
    let (code, _, err) =
        ha.c[leader].cli(&["region", "drain", "region-0", "--reason", "rack move"]);
    assert_eq!(code, 0, "{err}");
    let started = Instant::now();
    assert_eventually!(
        4,
        row(ha.c[follower].api, "region-0").await["drain"]["reason"] == "rack move"
            && why_not(&route(&ha.c[follower], LONDON).await, "region-0")
                .contains(&"drained".to_owned()),
        "the follower does not see the drain"
    );
    eprintln!(
        "figure: the follower routed by the leader's drain {} ms after it was acknowledged",
        started.elapsed().as_millis()
    );
    let r = ha.c[leader]
        .call(
            "POST",
            "/api/v1/silences",
            Some(&json!({"region": "region-1", "for_s": 600})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["id"].as_str().expect("silence id").to_owned();
    let silenced = |api: SocketAddr| {
        let id = id.clone();
        async move {
            get_json(api, "/api/v1/silences").await.unwrap_or_default()["silences"][0]["id"]
                == id.as_str()
        }
    };
    assert_eventually!(
        3,
        silenced(ha.c[follower].api).await,
        "the follower does not list the silence"
    );

    // etcd loses its quorum: the drain stays in force everywhere, and routing answers
    // without waiting on etcd.
    ha.kill_etcd(&[1, 2]).await;
    for i in 0..2 {
        assert_eventually!(
            10,
            ha.view(i).await["store_reachable"] == false,
            "c{} still calls etcd reachable",
            i + 1
        );
    }
    let mut slowest = Duration::ZERO;
    assert_stays!(
        5,
        {
            let mut ok = true;
            for c in &ha.c {
                let t = Instant::now();
                let v = route(c, LONDON).await;
                slowest = slowest.max(t.elapsed());
                ok &= v.region != "region-0"
                    && why_not(&v, "region-0").contains(&"drained".to_owned());
                ok &= row(c.api, "region-0").await["drained"] == true;
            }
            ok && slowest < Duration::from_secs(1)
        },
        "a drain lost or routing slow without quorum (slowest {slowest:?})"
    );
    eprintln!(
        "figure: slowest routing answer without quorum {} ms",
        slowest.as_millis()
    );
    for c in &ha.c {
        assert!(silenced(c.api).await, "{} lost the silence", c.api);
    }
    // A write cannot be stored: refused at once, nothing changes.
    for c in &ha.c {
        let t = Instant::now();
        let r = c
            .call("DELETE", "/api/v1/regions/region-0/drain", None)
            .await;
        assert!(
            r.status == 503 || r.status == 409,
            "{}: {}",
            r.status,
            r.body
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the refusal took {:?}",
            t.elapsed()
        );
    }

    // Quorum back: undrained on the leader, seen everywhere.
    ha.restart_etcd(&[1, 2]).await;
    let leader = ha.leader(30).await;
    assert_eventually!(
        10,
        ha.c[leader]
            .call("DELETE", "/api/v1/regions/region-0/drain", None)
            .await
            .status
            == 200,
        "the leader does not take the undrain"
    );
    for c in &ha.c {
        assert_eventually!(
            5,
            row(c.api, "region-0").await["drained"] == false,
            "{} still shows region-0 drained",
            c.api
        );
    }
}
