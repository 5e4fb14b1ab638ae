//! The shipped Prometheus alert rules and Grafana dashboard against the real tools:
//! `promtool check rules` and `promtool test rules` (deploy/prometheus/alerts_test.yml:
//! every alert fires after its window and not in its near misses), and a real Prometheus
//! scraping a running cluster with shopper traffic: every panel's and annotation's query
//! and every rule's expression is accepted, every panel has data, every rule evaluates
//! without error, nothing pages while the cluster is healthy, and a region whose varnishd
//! dies goes pending on CoordinatorRegionDown.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;
use tests::procs::{promtool, Prometheus};
use tests::{assert_eventually, get, Cluster, CoordinatorOpts};

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

const RULES: &str = include_str!("../../../deploy/prometheus/alerts.yml");
const RULE_TESTS: &str = include_str!("../../../deploy/prometheus/alerts_test.yml");
const DASHBOARD: &str = include_str!("../../../grafana/varnish-coordinator.json");

/// The alerts of alerts.yml: each one's name and its text up to the next rule.
fn alerts() -> Vec<(&'static str, &'static str)> {
    RULES
        .split("- alert: ")
        .skip(1)
        .map(|block| {
            let block = block.split("- record: ").next().unwrap_or(block);
            let name = block.lines().next().unwrap_or("").trim();
            (name, block)
        })
        .collect()
}

#[test]
fn shipped_alert_rules_pass_promtool_and_each_is_tested() {
    let dir = rules_dir();
    let (ok, out) = promtool(&dir, &["check", "rules", "alerts.yml"]);
    assert!(ok, "promtool check rules alerts.yml: {out}");
    let (ok, out) = promtool(&dir, &["test", "rules", "alerts_test.yml"]);
    assert!(ok && out.contains("SUCCESS"), "promtool test rules: {out}");
    let alerts = alerts();
    assert!(alerts.len() >= 15, "{alerts:?}");
    for (name, block) in alerts {
        for want in ["for: ", "summary: ", "description: "] {
            assert!(block.contains(want), "{name} has no {want:?}");
        }
        assert!(
            block.contains("severity: page") || block.contains("severity: ticket"),
            "{name}: severity is page or ticket"
        );
        // A firing case and a case where it does not fire (under its window at least).
        let cases = RULE_TESTS.matches(&format!("alertname: {name}\n")).count();
        assert!(
            cases >= 2,
            "{name}: {cases} promtool cases, want a firing and a near miss"
        );
    }
}

/// A Grafana expression with its template variables replaced the way Grafana would for
/// a short range over every region.
fn substitute(expr: &str) -> String {
    [
        ("$__rate_interval", "1m"),
        ("$__interval", "15s"),
        ("$__range", "5m"),
        ("${region}", ".*"),
        ("$region", ".*"),
    ]
    .iter()
    .fold(expr.to_owned(), |e, (var, value)| e.replace(var, value))
}

/// Where a query is (a panel's title, an annotation's name) and the expression.
type Queries = Vec<(String, String)>;

/// Every panel target's and annotation's query.
fn dashboard_queries() -> (Queries, Queries) {
    let d: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let panels = d["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |t| Some((title.clone(), t["expr"].as_str()?.to_owned())))
        })
        .collect();
    let annotations = d["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let name = a["name"].as_str().unwrap_or("?").to_owned();
            Some((name, a["expr"].as_str()?.to_owned()))
        })
        .collect();
    (panels, annotations)
}

fn results(answer: &Value) -> usize {
    answer["data"]["result"].as_array().map_or(0, Vec::len)
}

/// Panics at once when Prometheus refuses `expr` (a typo does not wait for a timeout).
fn accepted(what: &str, expr: &str, answer: &Value) {
    assert_eq!(
        answer["status"], "success",
        "{what}: Prometheus refused {expr}: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_run_against_a_real_prometheus_scraping_a_cluster() {
    let extra = crate::monitor::FAST_PROBES.to_owned();
    let mut cluster = Cluster::start(
        2,
        "ban",
        CoordinatorOpts {
            extra,
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let prom = Prometheus::start(
        &cluster.dir.path().join("prometheus"),
        &[cluster.coordinator.api],
        &[rules_dir().join("alerts.yml")],
    )
    .await;

    // Shoppers in both regions while Prometheus scrapes (bounded: it stops with the test
    // or after 60 s): misses, then hits; and a few 5xx in region-0.
    let stop = Arc::new(AtomicBool::new(false));
    let shoppers = {
        let stop = stop.clone();
        let edges: Vec<_> = cluster.varnish.iter().map(|v| v.http).collect();
        tokio::spawn(async move {
            for round in 0..300u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                for edge in &edges {
                    let _ = tests::raw(
                        *edge,
                        format!(
                            "GET /p/{} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n",
                            round % 7
                        )
                        .as_bytes(),
                    )
                    .await;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        })
    };
    cluster.origin.origin.set_fail_every(1);
    for i in 0..3 {
        let r = get(cluster.varnish[0].http, &format!("/broken/{i}")).await;
        assert!(r.status >= 500, "{r:?}");
    }
    cluster.origin.origin.set_fail_every(0);

    // Served time reaches Prometheus as a rate (two scrapes of a growing count).
    let mean = "sum by (region) (rate(coordinator_shopper_response_seconds_sum[1m])) / sum by (region) (rate(coordinator_shopper_response_seconds_count[1m])) > 0";
    assert_eventually!(
        30,
        results(&prom.query(mean).await) == 2,
        "no served time in both regions: {}",
        prom.query(mean).await
    );

    let (panels, annotations) = dashboard_queries();
    assert!(panels.len() >= 20, "{panels:?}");
    for (title, expr) in &panels {
        let expr = substitute(expr);
        let mut answer;
        assert_eventually!(
            20,
            {
                answer = prom.query(&expr).await;
                accepted(title, &expr, &answer);
                results(&answer) > 0
            },
            "panel {title:?} has no data: {expr}: {answer}"
        );
    }
    for (name, expr) in &annotations {
        let expr = substitute(expr);
        accepted(name, &expr, &prom.query(&expr).await);
    }
    // The served-time panel's mean is a real time in both regions (not NaN, not 0).
    let served = panels
        .iter()
        .find(|(title, _)| title.starts_with("Shoppers' served time"))
        .map(|(_, e)| substitute(e))
        .expect("a served-time panel");
    let answer = prom.query(&served).await;
    let means: Vec<f64> = answer["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["value"][1].as_str()?.parse().ok())
        .collect();
    assert!(
        means.len() == 2 && means.iter().all(|m| *m > 0.0 && *m < 5.0),
        "{answer}"
    );

    // Every rule of alerts.yml is loaded, evaluates without error and its expression is
    // accepted; the leader's region view (a join on the real labels) has both regions up.
    let expected = RULES.matches("- alert: ").count() + RULES.matches("- record: ").count();
    let rules = || async {
        let (_, body) = prom.get("/api/v1/rules").await.unwrap_or_default();
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect::<Vec<Value>>()
    };
    assert_eventually!(
        20,
        {
            let r = rules().await;
            r.len() == expected && r.iter().all(|r| r["health"] == "ok")
        },
        "rules not all loaded and evaluated ({expected} expected): {:?}",
        rules()
            .await
            .iter()
            .map(|r| (
                r["name"].clone(),
                r["health"].clone(),
                r["lastError"].clone()
            ))
            .collect::<Vec<_>>()
    );
    for rule in rules().await {
        let (name, expr) = (
            rule["name"].to_string(),
            rule["query"].as_str().unwrap_or(""),
        );
        accepted(&name, expr, &prom.query(expr).await);
    }
    let up = "region:coordinator_region_health:leader{state=\"up\"} == 1";
    assert_eventually!(
        20,
        results(&prom.query(up).await) == 2,
        "the leader's view has not both regions up: {}",
        prom.query("region:coordinator_region_health:leader").await
    );
    let firing = prom.query("ALERTS{alertstate=\"firing\"}").await;
    assert_eq!(results(&firing), 0, "a healthy cluster pages: {firing}");

    // Region 1's varnishd dies: the down rule goes pending for that region only.
    stop.store(true, Ordering::Relaxed);
    let _ = shoppers.await;
    cluster.varnish[1].child.kill9().await;
    let pending = "ALERTS{alertname=\"CoordinatorRegionDown\",alertstate=\"pending\"}";
    let mut answer;
    assert_eventually!(
        30,
        {
            answer = prom.query(pending).await;
            results(&answer) > 0
        },
        "CoordinatorRegionDown not pending: {answer}"
    );
    let regions: Vec<&str> = answer["data"]["result"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["metric"]["region"].as_str())
        .collect();
    assert_eq!(regions, ["region-1"], "{answer}");
}
