//! README's first command: `coordinator demo` brings up a working cluster, writes
//! cluster.json, and stops every child on SIGTERM.

use std::time::Duration;

use tests::{assert_eventually, bin_dir, get, purge_tags, start_demo, temp_dir};

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_a_cluster_that_purges_everywhere_and_stops_cleanly() {
    tests::require_varnish();
    let dir = temp_dir();
    let state = dir.path().join("demo");
    let log = dir.path().join("demo.log");
    let geoip = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/geoip/GeoIP2-City-Test.mmdb")
        .display()
        .to_string();
    let (mut demo, cluster) = start_demo(
        &state,
        &log,
        &["--regions", "2", "--tiered", "--geoip", &geoip],
        0,
    )
    .await;
    assert!(cluster["api_token"].as_str().is_some_and(|t| t.len() >= 32));
    assert!(
        std::path::Path::new(cluster["bundle_dir"].as_str().unwrap())
            .join("main.vcl")
            .is_file()
    );
    let regions = cluster["regions"].as_array().unwrap().clone();
    assert_eq!(regions.len(), 2);
    let varnish: Vec<std::net::SocketAddr> = regions
        .iter()
        .map(|r| r["varnish_http"].as_str().unwrap().parse().unwrap())
        .collect();
    for r in &regions {
        assert!(std::path::Path::new(r["agent_config"].as_str().unwrap()).is_file());
    }

    for v in &varnish {
        get(*v, "/p/42").await;
        assert_eq!(get(*v, "/p/42").await.cache(), "HIT");
    }
    let purge: std::net::SocketAddr = cluster["purge"].as_str().unwrap().parse().unwrap();
    let api: std::net::SocketAddr = cluster["api"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let seq = purge_tags(purge, &["cat_p_42"]).await;
    assert_eventually!(
        20,
        {
            let p = tests::get_json(api, &format!("/api/v1/purges/{seq}")).await;
            p.and_then(|p| p["edges"].as_object().cloned())
                .is_some_and(|e| e.len() == 2 && e.values().all(|x| x["applied_at"].is_string()))
        },
        "purge not applied in both regions"
    );
    for v in &varnish {
        assert_eq!(get(*v, "/p/42").await.cache(), "MISS");
    }

    // --geoip (README's geo how-to): routing over JSON, and the DNS backend on P+4
    // answering a real pdns with each region's own address, where its varnish listens.
    let dns: std::net::SocketAddr = cluster["dns"].as_str().expect("dns").parse().unwrap();
    assert_eq!(dns.port(), api.port() + 1);
    let out = std::process::Command::new(bin_dir().join("coordinator"))
        .args(["route", "81.2.69.142", "--api", &format!("http://{api}")])
        .output()
        .expect("coordinator route");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("eu-west (nearest)"), "{text}");
    let pdns = tests::Pdns::start(&dir.path().join("pdns"), dns).await;
    for (client, region_addr, i) in [
        ("81.2.69.142/32", "127.0.1.1", 0),
        ("216.160.83.56/32", "127.0.1.2", 1),
    ] {
        let answer = tests::dig(pdns.addr, "www.shop.test", "A", Some(client)).await;
        assert_eq!(answer, vec![region_addr.to_owned()], "{client}");
        let at = std::net::SocketAddr::new(region_addr.parse().unwrap(), varnish[i].port());
        assert_eq!(get(at, "/p/42").await.status, 200, "varnish serves at {at}");
    }
    drop(pdns);

    // The sample bundle was rolled out before cluster.json was written: every edge runs
    // it, and its WAF blocks the installer path in every region.
    let version = cluster["config_version"]
        .as_str()
        .expect("config_version")
        .to_owned();
    let edges = tests::get_json(api, "/api/v1/edges").await.expect("edges");
    for e in edges.as_array().unwrap() {
        assert_eq!(e["config_version"], version.as_str(), "{e}");
        // The demo's agents authenticate with certificates from its own PKI.
        assert!(e["cert_not_after"].as_u64().is_some(), "{e}");
    }
    assert_eq!(cluster["grpc_tls"], true);
    for v in &varnish {
        assert_eq!(get(*v, "/downloader/").await.status, 403);
    }
    // README's how-to: edit waf.toml in the bundle dir and push it with the CLI.
    let bundle_dir = std::path::Path::new(cluster["bundle_dir"].as_str().unwrap()).to_owned();
    let waf = bundle_dir.join("waf.toml");
    let text = std::fs::read_to_string(&waf).unwrap();
    std::fs::write(
        &waf,
        format!(
            "{text}
[[block]]
prefix = \"/secret\"
"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin_dir().join("coordinator"))
        .args([
            "config",
            "push",
            bundle_dir.to_str().unwrap(),
            "--no-canary",
            "--wait",
        ])
        .args(["--api", cluster["api"].as_str().unwrap()])
        .args(["--token", cluster["api_token"].as_str().unwrap()])
        .output()
        .expect("config push");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for v in &varnish {
        assert_eq!(get(*v, "/secret").await.status, 403);
    }
    let pushed = tests::get_json(api, "/api/v1/config")
        .await
        .expect("config")["current"]
        .as_str()
        .expect("a current version")
        .to_owned();
    assert_ne!(pushed, version);
    // `--wait` says what is done: the version and the edges running it.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("done: version {pushed} on 2 of 2 edge(s)")),
        "{said}"
    );

    // The how-to's warm job, tiered: region 0 is the shield, so the origin renders each
    // page once for both regions.
    let origin = cluster["origin"].as_str().unwrap().to_owned();
    assert_eq!(cluster["tiered"], true);
    let out = std::process::Command::new(bin_dir().join("coordinator"))
        .args([
            "warm",
            "start",
            "--sitemap",
            &format!("{origin}/sitemap.xml"),
            "--wait",
        ])
        .args(["--api", cluster["api"].as_str().unwrap()])
        .args(["--token", cluster["api_token"].as_str().unwrap()])
        .output()
        .expect("warm start");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("tiered") && text.contains("111/111"),
        "{text}"
    );
    let origin_addr: std::net::SocketAddr = origin.trim_start_matches("http://").parse().unwrap();
    for path in ["/p/77", "/c/9"] {
        for v in &varnish {
            let r = get(*v, path).await;
            assert_eq!(
                r.header("X-Magento-Cache-Debug"),
                Some("HIT"),
                "{path} on {v}"
            );
        }
        let renders = tests::get_json(origin_addr, &format!("/__origin/renders?url={path}"))
            .await
            .expect("renders");
        assert_eq!(renders["renders"], 1, "{path}: {renders}");
    }

    // The dashboard, as a newcomer opens it: every demo region, no console errors.
    let out = tests::chromium(
        &["--dump-dom", cluster["api"].as_str().unwrap()],
        &dir.path().join("chromium"),
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    let console: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_owned)
        .collect();
    assert!(console.is_empty(), "console messages: {console:#?}");
    for r in &regions {
        let name = r["name"].as_str().unwrap();
        assert!(
            dom.contains(&format!("data-region=\"{name}\"")),
            "{name} missing:\n{dom}"
        );
    }
    assert!(
        dom.contains("Warm jobs") && dom.contains("111 / 111"),
        "warm job missing:\n{dom}"
    );

    let pids: Vec<u64> = regions
        .iter()
        .flat_map(|r| {
            [
                r["agent_pid"].as_u64().unwrap(),
                r["varnish_pid"].as_u64().unwrap(),
            ]
        })
        .collect();
    demo.stop(Duration::from_secs(30)).await;
    assert_eventually!(
        10,
        pids.iter().all(|p| !alive(*p)),
        "children left running: {pids:?}"
    );
    // Its log is a file: no colour escapes.
    let text = std::fs::read_to_string(&log).expect("demo log");
    assert!(
        !text.contains('\x1b'),
        "colour escapes in {}",
        log.display()
    );

    // Started again on the same state dir, the demo keeps what its user edited and
    // pushed, and says so, instead of pushing the sample over it.
    let log = dir.path().join("demo-again.log");
    let (mut demo, cluster) = start_demo(
        &state,
        &log,
        &["--regions", "2", "--tiered", "--geoip", &geoip],
        0,
    )
    .await;
    assert_eq!(cluster["config_version"], pushed.as_str(), "{cluster}");
    assert!(std::fs::read_to_string(&waf).unwrap().contains("/secret"));
    for r in cluster["regions"].as_array().unwrap() {
        let v: std::net::SocketAddr = r["varnish_http"].as_str().unwrap().parse().unwrap();
        assert_eq!(get(v, "/secret").await.status, 403, "{v}");
    }
    let said = std::fs::read_to_string(&log).expect("demo log");
    assert!(
        said.contains(&format!("keeping version {pushed}"))
            && said.contains("keeping the bundle in"),
        "{said}"
    );
    demo.stop(Duration::from_secs(30)).await;
}

#[test]
fn the_demo_refuses_refresh_mode_with_bans_and_says_why() {
    let dir = temp_dir();
    let out = std::process::Command::new(bin_dir().join("coordinator"))
        .args([
            "demo",
            "--refresh-tags",
            "--purge-mode",
            "ban",
            "--state-dir",
        ])
        .arg(dir.path().join("demo"))
        .output()
        .expect("run coordinator demo");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--refresh-tags needs --purge-mode xkey") && err.lines().count() == 1,
        "one line naming the reason: {err}"
    );
    assert!(
        !dir.path().join("demo").exists(),
        "nothing is started or written"
    );
}
