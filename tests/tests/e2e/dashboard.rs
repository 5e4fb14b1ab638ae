//! The dashboard at `/`, loaded in headless Chromium (Debian's `chromium`): no console
//! errors, every region in the table. The screenshot is kept as a test artifact in
//! `target/test-artifacts/dashboard.png`.

use std::path::PathBuf;

use tests::{assert_eventually, chromium, get, Cluster, CoordinatorOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_every_region_without_console_errors() {
    let db = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/geoip/GeoIP2-City-Test.mmdb");
    let extra = format!(
        "[monitoring]\norigin = \"{{origin}}\"\n[[checks]]\nname = \"health\"\npath = \"/health_check.php\"\ninterval_ms = 300\n\
         [geo]\ndatabase = \"{}\"\ndefault_region = \"region-0\"\n",
        db.display()
    );
    // Dublin, Seattle, Tokyo.
    let region_keys = [
        "lat = 53.35\nlon = -6.26",
        "lat = 47.6\nlon = -122.3",
        "lat = 35.68\nlon = 139.69",
    ]
    .map(|k| format!("{k}\naddresses = [\"198.51.100.1\"]"))
    .to_vec();
    let cluster = Cluster::start(
        3,
        "ban",
        CoordinatorOpts {
            extra,
            read_requires_token: true,
            region_keys,
            ..CoordinatorOpts::default()
        },
    )
    .await;
    // Until every agent's varnishncsa counts shoppers (a passed request: no hit or miss).
    assert_eventually!(
        20,
        {
            for v in &cluster.varnish {
                get(v.http, "/health_check.php").await;
            }
            let r = cluster
                .coordinator
                .call("GET", "/api/v1/regions", None)
                .await
                .json();
            r.as_array().is_some_and(|a| {
                a.len() == 3 && a.iter().all(|r| r["served"]["requests"].as_u64() > Some(0))
            })
        },
        "varnishncsa never counted a shopper"
    );
    for v in &cluster.varnish {
        for i in 0..5 {
            get(v.http, &format!("/p/{i}")).await;
            get(v.http, &format!("/p/{i}")).await;
        }
    }
    // Shoppers in China (behind a load balancer) served from Dublin: a far country.
    for _ in 0..3 {
        let req = "GET /p/1 HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-For: 175.16.199.9\r\nConnection: close\r\n\r\n";
        tests::raw(cluster.varnish[0].http, req.as_bytes())
            .await
            .expect("request");
    }
    assert_eventually!(
        15,
        cluster
            .coordinator
            .call("GET", "/api/v1/regions/region-0/countries", None)
            .await
            .body
            .contains("\"CN\""),
        "no per-country traffic yet"
    );
    assert_eventually!(
        15,
        {
            let r = cluster
                .coordinator
                .call("GET", "/api/v1/regions", None)
                .await
                .json();
            r.as_array().is_some_and(|a| {
                a.len() == 3
                    && a.iter().all(|r| {
                        !r["hit_ratio"]["m1"].is_null() && r["probes"][0]["minute"].is_object()
                    })
            })
        },
        "no traffic or probe data yet"
    );
    // A rollout, so the config panel has something to show.
    let bundle = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../edge-agent/vcl");
    let (code, out, err) = cluster.coordinator.cli(&[
        "config",
        "push",
        &bundle.display().to_string(),
        "--no-canary",
        "--wait",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    // A drained region is shown drained with its health; the silences are listed.
    let c = &cluster.coordinator;
    let (code, _, err) = c.cli(&["region", "drain", "region-2", "--reason", "rack move"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = c.cli(&[
        "silence",
        "add",
        "--diagnosis",
        "origin_down",
        "--for",
        "1h",
    ]);
    assert_eq!(code, 0, "{err}");
    let silence = out
        .split(':')
        .next()
        .unwrap_or("")
        .trim_start_matches("silence ")
        .to_owned();
    let url = format!(
        "http://{}/?token={}",
        cluster.coordinator.api, cluster.coordinator.token
    );
    let profile = cluster.dir.path().join("chromium");
    let out = chromium(&["--dump-dom", &url], &profile);
    let dom = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {stderr}");
    let console: Vec<&str> = stderr.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:#?}");
    for i in 0..3 {
        assert!(
            dom.contains(&format!("data-region=\"region-{i}\"")),
            "region-{i} missing:\n{dom}"
        );
    }
    assert!(dom.contains("3 regions · updated"), "status line:\n{dom}");
    assert!(
        dom.matches("data-drained=\"true\"").count() == 1
            && dom.contains("region-2 (drained)")
            && dom.contains("drained by token_file: rack move"),
        "drained region:\n{dom}"
    );
    let silences = dom
        .split("id=\"silences\"")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or("");
    assert!(
        silences.contains(&silence) && silences.contains("origin down"),
        "silences ({silence}):\n{silences}"
    );
    assert!(dom.contains("50.0%"), "hit ratios shown:\n{dom}");
    // uPlot charts (the vendored library, no network): hit ratio, req/s, served time,
    // 5xx, probe TTFB, purge lag; each with a legend naming the regions.
    assert!(
        dom.matches("class=\"uplot").count() >= 6,
        "charts drawn:\n{dom}"
    );
    assert!(
        dom.contains("u-legend") && dom.contains("region-2"),
        "legends:\n{dom}"
    );
    // The panels hold what the API has.
    let api = &cluster.coordinator;
    let health = api.call("GET", "/healthz", None).await.json();
    let fleet = format!("fleet {}", health["status"].as_str().unwrap_or("?"));
    assert!(dom.contains(&fleet), "{fleet} missing:\n{dom}");
    for e in api.edges().await {
        let id = e["id"].as_str().unwrap_or("?");
        assert!(
            dom.contains(&format!("data-edge=\"{id}\"")),
            "edge {id} missing:\n{dom}"
        );
    }
    let config = api.call("GET", "/api/v1/config", None).await.json();
    let policy = format!(
        "drift policy {}",
        config["drift_policy"].as_str().unwrap_or("?")
    );
    assert!(dom.contains(&policy), "config panel:\n{dom}");
    let version = config["current"]
        .as_str()
        .expect("a version runs everywhere");
    assert!(
        dom.contains("#1 push") && dom.matches(version).count() >= 4,
        "rollout and per-edge versions ({version}):\n{dom}"
    );
    assert!(
        dom.matches(">in sync<").count() >= 3,
        "per-edge config state:\n{dom}"
    );
    assert!(
        dom.contains("no webhooks configured"),
        "alerts panel:\n{dom}"
    );
    // The harness issues the agents' certificates for 30 days: inside the warning.
    let certs = dom
        .split("id=\"certs\"")
        .nth(1)
        .and_then(|t| t.split("</div>").next())
        .unwrap_or("");
    assert!(
        certs.contains("certificates expiring within 30 days")
            && (0..3).all(|i| certs.contains(&format!("edge edge-{i} on "))),
        "certificates line: {certs}\n{dom}"
    );
    // Geo routing: each region's state, and China flagged as served from afar.
    for i in 0..3 {
        assert!(
            dom.contains(&format!("data-routing=\"region-{i}\"")),
            "routing panel:\n{dom}"
        );
    }
    assert!(dom.contains("GeoIP2-City built"), "database line:\n{dom}");
    let cn = dom
        .split("data-country=\"region-0:CN\"")
        .nth(1)
        .and_then(|t| t.split("</tr>").next())
        .unwrap_or("");
    assert!(
        cn.contains(">3<") && cn.contains("⚠ region-2"),
        "China row: {cn}\n{dom}"
    );
    // Shoppers' served time and the probes' TTFB in the region table (mean ± std).
    let table = dom
        .split("id=\"regions\"")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap_or("");
    assert!(
        table.matches(" ± ").count() >= 6,
        "served and probe times:\n{table}"
    );

    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifacts dir");
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(
        &[&format!("--screenshot={}", shot.display()), &url],
        &profile,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot"
    );

    // Without the token the data stays closed (the page itself is open).
    let r = get(cluster.coordinator.api, "/api/v1/regions").await;
    assert_eq!(r.status, 401);
    assert_eq!(get(cluster.coordinator.api, "/").await.status, 200);
}
