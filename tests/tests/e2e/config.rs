//! Config rollout: bundles reach every real varnishd, the WAF blocks what it says, a
//! broken VCL never leaves the canary, rollback, drift, restarts.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use coordinator::bundle::Bundle;
use serde_json::{json, Value};
use tests::{assert_eventually, assert_stays, bin_dir, get, raw_from, Cluster, CoordinatorOpts};

/// The sample bundle with these WAF rules instead of the sample ones.
fn bundle_with_waf(waf: &str) -> Bundle {
    let mut b = coordinator_cli::demo::sample_bundle();
    b.files.insert("waf.toml".into(), waf.into());
    b
}

const WAF_V1: &str = r#"
[[block]]
prefix = "/blocked"
[[rate_limit]]
prefix = "/limited"
limit = 3
period_s = 60
[[allow_only]]
prefix = "/office"
cidrs = ["127.0.0.2/32"]
"#;

fn opts(rollout: &str) -> CoordinatorOpts {
    CoordinatorOpts {
        extra: format!("[rollout]\n{rollout}\n"),
        ..CoordinatorOpts::default()
    }
}

fn edge_states(view: &Value) -> Vec<(String, String)> {
    view["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["state"].as_str().unwrap_or("").to_owned(),
                e["active_version"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

async fn get_from(ip: [u8; 4], addr: std::net::SocketAddr, path: &str) -> u16 {
    let local = IpAddr::V4(Ipv4Addr::from(ip));
    let req = format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n");
    raw_from(Some(local), addr, req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {local}: {e}"))
        .status
}

/// Runs the real `coordinator` CLI against the cluster's API.
fn cli(cluster: &Cluster, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin_dir().join("coordinator"))
        .args(args)
        .args(["--api", &format!("http://{}", cluster.coordinator.api)])
        .env("COORDINATOR_TOKEN", &cluster.coordinator.token)
        .output()
        .expect("run coordinator CLI");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_canary_waf_broken_vcl_and_rollback() {
    let cluster = Cluster::start(
        3,
        "ban",
        opts(
            "canary_region = \"region-0\"\ncanary_wait_s = 1\nhealth_path = \"/health_check.php\"",
        ),
    )
    .await;
    let boot: Vec<String> = {
        let mut v = Vec::new();
        for n in &cluster.varnish {
            v.push(n.active_vcl().await);
        }
        v
    };
    assert!(boot.iter().all(|n| n == "boot"), "{boot:?}");

    // 1. Push through the CLI (canary first), following the rollout.
    let dir = cluster.dir.path().join("bundle-v1");
    std::fs::create_dir_all(&dir).expect("bundle dir");
    for (name, text) in &bundle_with_waf(WAF_V1).files {
        std::fs::write(dir.join(name), text).expect("write bundle");
    }
    let (ok, out) = cli(
        &cluster,
        &["config", "push", dir.to_str().expect("utf-8"), "--wait"],
    );
    assert!(ok, "config push failed: {out}");
    assert!(out.contains("canary region region-0 first"), "{out}");
    let view = cluster.coordinator.config().await;
    let v1 = view["current"]
        .as_str()
        .expect("current version")
        .to_owned();
    assert_eq!(view["rollout"]["phase"], "done", "{view}");
    assert!(
        edge_states(&view)
            .iter()
            .all(|(s, a)| s == "in_sync" && *a == v1),
        "{view}"
    );
    for n in &cluster.varnish {
        let active = n.active_vcl().await;
        assert!(active.starts_with(&format!("cfg_{v1}_")), "{active}");
    }

    // 2. The WAF answers on every edge; blocked requests never reach the origin.
    for n in &cluster.varnish {
        let r = get(n.http, "/blocked/page").await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(r.header("x-waf-rule"), Some("block[0]"));
        assert_eq!(get(n.http, "/p/1").await.status, 200);
        assert_eq!(get_from([127, 0, 0, 1], n.http, "/office/x").await, 403);
        assert_eq!(get_from([127, 0, 0, 2], n.http, "/office/x").await, 200);
    }
    assert_eq!(cluster.origin.origin.renders("/blocked/page"), 0);

    // 3. Rate limit: 3 requests per IP per minute, the 4th gets 429; another IP is fine.
    let edge = cluster.varnish[1].http;
    for i in 0..3 {
        assert_ne!(
            get_from([127, 0, 0, 1], edge, "/limited").await,
            429,
            "request {i}"
        );
    }
    assert_eq!(get_from([127, 0, 0, 1], edge, "/limited").await, 429);
    assert_ne!(get_from([127, 0, 0, 3], edge, "/limited").await, 429);

    // 4. A VCL syntax error: refused on the canary, nobody switches, v1 keeps serving.
    let mut broken = bundle_with_waf(WAF_V1);
    let main = broken.files.get_mut("main.vcl").expect("main.vcl");
    *main = main.replacen("sub vcl_recv {", "sub vcl_recv {\n    this is not vcl;", 1);
    let broken_line = main
        .lines()
        .position(|l| l.contains("this is not vcl"))
        .expect("line")
        + 1;
    let (v_broken, view) = cluster.coordinator.push_and_wait(&broken, true).await;
    let rollout = &view["rollout"];
    assert_eq!(rollout["phase"], "failed", "{view}");
    let error = rollout["error"].as_str().unwrap_or("");
    assert!(
        error.contains("'main.vcl' Line") && error.contains(&format!("Line {broken_line} ")),
        "error must name main.vcl and line {broken_line}: {error}"
    );
    assert!(
        !error.contains("/vcl/cfg_"),
        "agent paths are replaced: {error}"
    );
    assert_eq!(view["desired"], v1.as_str());
    for n in &cluster.varnish {
        let active = n.active_vcl().await;
        assert!(
            active.starts_with(&format!("cfg_{v1}_")),
            "{active} after broken push"
        );
        assert_eq!(get(n.http, "/blocked/page").await.status, 403);
        assert_eq!(get(n.http, "/p/2").await.status, 200);
    }
    assert_ne!(v_broken, v1);

    // 5. A second good version everywhere, then rollback (CLI) restores v1 on all edges.
    let v2_bundle = bundle_with_waf("[[block]]\nprefix = \"/other\"\n");
    let (v2, view) = cluster.coordinator.push_and_wait(&v2_bundle, false).await;
    assert_eq!(view["rollout"]["phase"], "done", "{view}");
    for n in &cluster.varnish {
        assert_eq!(get(n.http, "/other").await.status, 403);
        assert_ne!(get(n.http, "/blocked/page2").await.status, 403);
    }
    let (ok, diff) = cli(&cluster, &["config", "diff", &v1, &v2]);
    assert!(
        ok && diff.contains("+prefix = \"/other\"") && diff.contains("-prefix = \"/blocked\""),
        "{diff}"
    );
    let (ok, out) = cli(&cluster, &["config", "rollback", "--wait"]);
    assert!(ok, "rollback failed: {out}");
    assert!(out.contains(&v1), "{out}");
    let view = cluster.coordinator.config().await;
    assert_eq!(view["current"], v1.as_str());
    for n in &cluster.varnish {
        let active = n.active_vcl().await;
        assert!(
            active.starts_with(&format!("cfg_{v1}_")),
            "{active} after rollback"
        );
        assert_eq!(get(n.http, "/blocked/page3").await.status, 403);
        assert_ne!(get(n.http, "/other").await.status, 403);
    }
    let (ok, list) = cli(&cluster, &["config", "list"]);
    assert!(
        ok && list.contains(&v1) && list.contains(&v2) && list.contains(&v_broken),
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_is_checked_before_any_edge_sees_it() {
    let cluster = Cluster::start(1, "ban", CoordinatorOpts::default()).await;
    let c = &cluster.coordinator;
    // Unknown variable, invalid WAF rule, no token: refused, nothing stored.
    let mut unknown = coordinator_cli::demo::sample_bundle();
    unknown
        .files
        .insert("extra.vcl".into(), "# ${shield_host}\n".into());
    let r = c
        .call(
            "POST",
            "/api/v1/config",
            Some(&serde_json::to_value(&unknown).expect("json")),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        r.body.contains("shield_host") && r.json()["file"] == "extra.vcl",
        "{}",
        r.body
    );
    let bad_waf = bundle_with_waf("[[block]]\npath = \"^/ok\"\n\n[[block]]\npath = \"^/(\"\n");
    let r = c
        .call(
            "POST",
            "/api/v1/config",
            Some(&serde_json::to_value(&bad_waf).expect("json")),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["file"], "waf.toml");
    assert_eq!(r.json()["line"], 4, "{}", r.body);
    let r = tests::api_call(
        c.api,
        "POST",
        "/api/v1/config",
        Some("wrong-token"),
        Some(&serde_json::to_value(coordinator_cli::demo::sample_bundle()).expect("json")),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = c
        .call("POST", "/api/v1/config", Some(&json!({"files": "x"})))
        .await;
    assert_eq!(r.status, 400);
    let versions = tests::get_json(c.api, "/api/v1/config/versions").await;
    assert_eq!(versions, Some(json!([])), "nothing stored");
    assert_eq!(cluster.varnish[0].active_vcl().await, "boot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_flagged_and_enforced_restarts_converge() {
    let mut cluster = Cluster::start(2, "ban", CoordinatorOpts::default()).await;
    let (v1, view) = cluster
        .coordinator
        .push_and_wait(&bundle_with_waf(WAF_V1), true)
        .await;
    assert_eq!(view["rollout"]["phase"], "done", "{view}");

    // A hand edit: load the boot VCL under another name and switch to it.
    let node = &cluster.varnish[0];
    let boot = node.boot_vcl.display().to_string();
    node.admin(&format!("vcl.load hand_edit {boot}")).await;
    node.admin("vcl.use hand_edit").await;
    let edge_id = "edge-0";
    let edge = |view: &Value| {
        view["edges"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["id"] == edge_id).cloned())
            .unwrap_or(Value::Null)
    };
    assert_eventually!(
        20,
        edge(&cluster.coordinator.config().await)["drift_events"].as_u64() >= Some(1),
        "drift not flagged: {}",
        cluster.coordinator.config().await
    );
    let metrics = tests::get(cluster.coordinator.api, "/metrics").await.body;
    assert!(
        metrics.contains(
            "coordinator_config_drift_events_total{region=\"region-0\",edge=\"edge-0\"} 1"
        ),
        "{metrics}"
    );
    // Enforce (the default) puts the desired version back.
    assert_eventually!(
        30,
        node.active_vcl().await.starts_with(&format!("cfg_{v1}_")),
        "drift not corrected: active {}",
        node.active_vcl().await
    );
    assert_eventually!(
        10,
        edge(&cluster.coordinator.config().await)["state"] == "in_sync",
        "edge not in sync"
    );

    // varnishd restarts with its boot VCL: the edge gets the desired version back.
    cluster.varnish[1].kill9_and_restart().await;
    assert_eventually!(
        40,
        cluster.varnish[1]
            .active_vcl()
            .await
            .starts_with(&format!("cfg_{v1}_")),
        "restarted varnishd not brought back: {}",
        cluster.varnish[1].active_vcl().await
    );
    assert_eq!(get(cluster.varnish[1].http, "/blocked/x").await.status, 403);

    // An agent restart: it proves the active VCL is the one it loaded (no reload).
    let before = cluster.varnish[1].active_vcl().await;
    cluster.agents[1].kill9().await;
    cluster.agents[1].restart();
    assert_eventually!(
        20,
        {
            let view = cluster.coordinator.config().await;
            let e = view["edges"]
                .as_array()
                .and_then(|a| a.iter().find(|e| e["id"] == "edge-1").cloned())
                .unwrap_or(Value::Null);
            e["connected"] == true && e["state"] == "in_sync"
        },
        "restarted agent not in sync: {}",
        cluster.coordinator.config().await
    );
    assert_eq!(cluster.varnish[1].active_vcl().await, before);

    // Purges still work alongside (the config worker has its own admin session).
    let seq = tests::purge_tags(cluster.coordinator.purge, &["cat_p_1"]).await;
    cluster.wait_applied(seq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_mode_only_flags_drift() {
    let cluster = Cluster::start(1, "ban", opts("drift = \"report\"")).await;
    let (v1, _) = cluster
        .coordinator
        .push_and_wait(&bundle_with_waf(WAF_V1), false)
        .await;
    let node = &cluster.varnish[0];
    node.admin(&format!("vcl.load hand_edit {}", node.boot_vcl.display()))
        .await;
    node.admin("vcl.use hand_edit").await;
    assert_eventually!(
        20,
        cluster.coordinator.config().await["edges"][0]["state"] == "drift",
        "drift not flagged: {}",
        cluster.coordinator.config().await
    );
    // For several report intervals the hand edit stays active, flagged as drift.
    assert_stays!(
        3,
        node.active_vcl().await == "hand_edit"
            && cluster.coordinator.config().await["edges"][0]["state"] == "drift",
        "report mode touched the hand edit: {} {}",
        node.active_vcl().await,
        cluster.coordinator.config().await
    );
    // Going back to the boot VCL (what a restarted varnishd runs) is restored anyway.
    node.admin("vcl.use boot").await;
    assert_eventually!(
        30,
        node.active_vcl().await.starts_with(&format!("cfg_{v1}_")),
        "boot VCL not replaced: {}",
        node.active_vcl().await
    );
}

/// Every WAF rule kind, compiled by the coordinator and by a real varnishd, answers as
/// the rule says; values with quotes, backslashes and regex metacharacters stay literal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_waf_rule_kind_on_a_real_varnishd() {
    let cluster = Cluster::start(1, "ban", CoordinatorOpts::default()).await;
    let waf = r#"
[limits]
max_url_bytes = 200
max_header_bytes = { Cookie = 100 }
[deny]
cidrs = ["127.0.0.9/32"]
[allow]
cidrs = ["127.0.0.0/8", "::1/128"]
[methods]
allow = ["GET", "HEAD", "POST"]
[[block]]
prefix = '/q"uo\te.(x)'
[[block]]
path = '^/re\"gex\d+$'
status = 410
[[block]]
path = "^/new\nline\t\"}"
[[block]]
path = '^/la/(?!open)'
status = 451
[[basic_auth]]
prefix = "/staging"
user = "staging"
password = 'p"a\ss:word'
realm = "Staging shop"
"#;
    let (_, view) = cluster
        .coordinator
        .push_and_wait(&bundle_with_waf(waf), false)
        .await;
    assert_eq!(view["rollout"]["phase"], "done", "{view}");
    let http = cluster.varnish[0].http;
    let send = |req: String, ip: [u8; 4]| async move {
        raw_from(Some(IpAddr::V4(Ipv4Addr::from(ip))), http, req.as_bytes())
            .await
            .expect("request")
    };
    let get_req = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\n{extra}Connection: close\r\n\r\n")
    };
    let one = [127, 0, 0, 1];
    assert_eq!(send(get_req("/p/1", ""), one).await.status, 200);
    assert_eq!(
        send(get_req(&format!("/p/{}", "x".repeat(200)), ""), one)
            .await
            .status,
        414
    );
    assert_eq!(
        send(
            get_req("/p/1", &format!("Cookie: {}\r\n", "c".repeat(101))),
            one
        )
        .await
        .status,
        431
    );
    assert_eq!(
        send(get_req("/p/1", "Cookie: short=1\r\n"), one)
            .await
            .status,
        200
    );
    assert_eq!(send(get_req("/p/1", ""), [127, 0, 0, 9]).await.status, 403);
    assert_eq!(
        send(
            "DELETE /p/1 HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n".into(),
            one
        )
        .await
        .status,
        405
    );
    // Literal prefix: quote, backslash and metacharacters mean themselves.
    assert_eq!(send(get_req("/q\"uo\\te.(x)/1", ""), one).await.status, 403);
    assert_ne!(send(get_req("/q\"uo\\te.xx/1", ""), one).await.status, 403);
    // Regex with an escaped quote and \d.
    assert_eq!(send(get_req("/re\"gex42", ""), one).await.status, 410);
    assert_ne!(send(get_req("/re\"gexx", ""), one).await.status, 410);
    // Look-ahead: PCRE2 (varnishd's) has it, so the WAF takes it.
    assert_eq!(send(get_req("/la/closed", ""), one).await.status, 451);
    assert_ne!(send(get_req("/la/open", ""), one).await.status, 451);
    // Basic auth.
    let denied = send(get_req("/staging/p", ""), one).await;
    assert_eq!(denied.status, 401);
    assert_eq!(
        denied.header("www-authenticate"),
        Some("Basic realm=\"Staging shop\"")
    );
    use base64::Engine as _;
    let creds = base64::engine::general_purpose::STANDARD.encode("staging:p\"a\\ss:word");
    let ok = send(
        get_req("/staging/p", &format!("Authorization: Basic {creds}\r\n")),
        one,
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let wrong = base64::engine::general_purpose::STANDARD.encode("staging:nope");
    let bad = send(
        get_req("/staging/p", &format!("Authorization: Basic {wrong}\r\n")),
        one,
    )
    .await;
    assert_eq!(bad.status, 401);
    assert_eq!(
        cluster.origin.origin.renders("/staging/p"),
        1,
        "only the authorised request reached the origin"
    );
}
