//! Synthetic monitoring end to end: probes from every region through real varnishd and
//! straight to the origin, region health, and alerts to a webhook (once per change, one
//! grouped alert when the origin fails everywhere).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use serde_json::Value;
use tests::{assert_eventually, Cluster, CoordinatorOpts};

/// A webhook receiver recording every alert body.
pub(crate) async fn receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let store = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |axum::Json(v): axum::Json<Value>| {
            let store = store.clone();
            async move {
                store.lock().expect("lock").push(v);
                "ok"
            }
        }),
    );
    (serve_hook(app).await, got)
}

/// Serves a webhook receiver's `app` on a fresh loopback port.
pub(crate) async fn serve_hook(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Probes every 300 ms, a region down after 3 failures and up after 2 successes
/// (`{origin}`: the sample origin); varnish restarts not held against it.
pub(crate) const FAST_PROBES: &str = "[monitoring]\norigin = \"{origin}\"\nfailures_to_down = 3\nsuccesses_to_up = 2\nvarnish_restart_s = 0\n\
     [[checks]]\nname = \"health\"\npath = \"/health_check.php\"\ninterval_ms = 300\ntimeout_ms = 1000\nslow_ms = 5000\n";

async fn health(cluster: &Cluster) -> Vec<(String, String, String)> {
    let r = cluster
        .coordinator
        .call("GET", "/api/v1/regions", None)
        .await
        .json();
    r.as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_owned(),
                r["health"].as_str().unwrap_or("").to_owned(),
                r["diagnosis"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn alerts(got: &Arc<Mutex<Vec<Value>>>) -> Vec<Value> {
    got.lock().expect("lock").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_down_alerts_once_and_origin_down_is_one_grouped_alert() {
    let (hook, got) = receiver().await;
    // varnish_restart_s = 0: the restart below is about probes, not the lost cache
    // (hostile::patterns covers `varnish_restarted`).
    let extra =
        format!("{FAST_PROBES}[alerts]\nwebhooks = [\"http://{hook}/hook\"]\ngroup_ms = 1500\n");
    let mut cluster = Cluster::start(
        3,
        "ban",
        CoordinatorOpts {
            extra,
            ..CoordinatorOpts::default()
        },
    )
    .await;
    assert_eventually!(
        20,
        health(&cluster)
            .await
            .iter()
            .filter(|(_, h, _)| h == "up")
            .count()
            == 3,
        "regions not up: {:?}",
        health(&cluster).await
    );
    // A region with connected agents reads up before its first probe result arrives
    // (slow under load): wait for the probes themselves.
    let regions = || async {
        cluster
            .coordinator
            .call("GET", "/api/v1/regions", None)
            .await
            .json()
    };
    assert_eventually!(
        10,
        regions().await[0]["probes"][0]["minute"]["mean_ms"].as_f64() > Some(0.0),
        "no probe minute yet: {}",
        regions().await
    );
    let r = regions().await;
    let probe = &r[0]["probes"][0];
    assert_eq!(probe["check"], "health");
    assert!(probe["minute"]["mean_ms"].as_f64() > Some(0.0), "{probe}");
    assert_eq!(alerts(&got).len(), 0, "coming up is not news");

    // Region 1's varnishd stops: that region goes down (its edge, not the origin).
    cluster.varnish[1].child.kill9().await;
    assert_eventually!(
        15,
        health(&cluster)
            .await
            .contains(&("region-1".into(), "down".into(), "edge_down".into())),
        "region-1 not down: {:?}",
        health(&cluster).await
    );
    let h = health(&cluster).await;
    assert!(
        h.iter()
            .filter(|(n, _, _)| n != "region-1")
            .all(|(_, s, _)| s == "up"),
        "{h:?}"
    );
    assert_eventually!(10, alerts(&got).len() == 1, "no alert: {:?}", alerts(&got));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a = alerts(&got);
    assert_eq!(a.len(), 1, "exactly one alert: {a:?}");
    assert_eq!(a[0]["alerts"][0]["region"], "region-1", "{a:#?}");
    assert_eq!(a[0]["alerts"][0]["state"], "down");
    assert!(a[0]["text"].as_str().unwrap_or("").contains("region-1"));

    // It comes back: one recovery alert.
    cluster.varnish[1].kill9_and_restart().await;
    assert_eventually!(
        20,
        health(&cluster).await.iter().all(|(_, s, _)| s == "up"),
        "region-1 did not recover: {:?}",
        health(&cluster).await
    );
    assert_eventually!(
        10,
        alerts(&got).len() == 2,
        "no recovery alert: {:?}",
        alerts(&got)
    );
    assert_eq!(alerts(&got)[1]["alerts"][0]["state"], "up");

    // The origin stops: every region fails, and ops get one grouped alert.
    cluster.origin.stop();
    assert_eventually!(
        20,
        health(&cluster)
            .await
            .iter()
            .all(|(_, s, d)| s == "down" && d == "origin_down_everywhere"),
        "not origin down everywhere: {:?}",
        health(&cluster).await
    );
    assert_eventually!(
        10,
        alerts(&got).len() == 3,
        "no origin alert: {:?}",
        alerts(&got)
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let a = alerts(&got);
    assert_eq!(a.len(), 3, "one grouped alert, not one per region: {a:#?}");
    assert_eq!(a[2]["grouped"], true);
    assert_eq!(a[2]["alerts"].as_array().map(Vec::len), Some(3));
    assert!(
        a[2]["text"]
            .as_str()
            .unwrap_or("")
            .starts_with("🔴 origin down everywhere"),
        "{}",
        a[2]["text"]
    );

    let metrics = tests::get(cluster.coordinator.api, "/metrics").await.body;
    assert!(metrics.contains("coordinator_probe_duration_seconds_bucket{region=\"region-0\",check=\"health\",target=\"edge\",le=\"+Inf\"}"));
    assert!(
        metrics.contains("coordinator_alerts_total{result=\"sent\"} 3"),
        "{metrics}"
    );

    // Every series the shipped Grafana dashboard queries is exported.
    let dashboard = include_str!("../../../grafana/varnish-coordinator.json");
    let mut names: Vec<&str> = dashboard
        .match_indices("coordinator_")
        .map(|(i, _)| {
            let rest = &dashboard[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() > 10, "{names:?}");
    for name in names {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "the dashboard queries {name}, which /metrics does not export"
        );
    }
}
