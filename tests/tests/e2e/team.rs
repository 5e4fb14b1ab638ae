//! Running it as a team: named tokens with scopes, and the audit log of who asked the
//! API for what, on one coordinator (across a kill -9) and in a cluster (the same log on
//! every coordinator, and etcd without quorum).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::ha::{HaCluster, HaOpts};
use tests::procs::bin_dir;
use tests::{api_call, assert_eventually, temp_dir, CoordinatorOpts, CoordinatorProc};

const DEPLOY: &str = "deploy-secret-0123456789";
const DASHBOARD: &str = "dashboard-secret-0123456789";
const PURGER: &str = "purger-secret-0123456789";
const WAF_PASSWORD: &str = "staging-pass-0123456789";

/// Three token files in `dir` and the `[[api.tokens]]` naming them.
fn team_tokens(dir: &Path) -> String {
    std::fs::create_dir_all(dir).expect("dir");
    let mut toml = String::new();
    for (name, secret, scopes) in [
        ("deploy-pipeline", DEPLOY, r#"["config", "warm"]"#),
        ("wall-dashboard", DASHBOARD, r#"["read"]"#),
        ("magento-ops", PURGER, r#"["purge"]"#),
    ] {
        let file = dir.join(name);
        std::fs::write(&file, format!("{secret}\n")).expect("token file");
        toml.push_str(&format!(
            "[[api.tokens]]\nname = \"{name}\"\nfile = \"{}\"\nscopes = {scopes}\n",
            file.display()
        ));
    }
    toml
}

async fn audit(api: std::net::SocketAddr, query: &str) -> Value {
    let r = api_call(
        api,
        "GET",
        &format!("/api/v1/audit{query}"),
        Some(DASHBOARD),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn actions(listed: &Value) -> Vec<(String, String, u64)> {
    listed["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default().to_owned(),
                e["token"].as_str().unwrap_or("-").to_owned(),
                e["status"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// The real CLI with a token file (or none): (exit code, stdout, stderr).
fn cli(
    api: std::net::SocketAddr,
    token_file: Option<&Path>,
    args: &[&str],
) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(bin_dir().join("coordinator"));
    cmd.args(args).args(["--api", &format!("http://{api}")]);
    if let Some(f) = token_file {
        cmd.arg("--token-file").arg(f);
    }
    cmd.env_remove("COORDINATOR_TOKEN");
    let out = cmd.output().expect("run the coordinator CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn scoped_tokens_do_what_their_scopes_say_and_every_attempt_is_audited_across_a_kill_9() {
    let dir = temp_dir();
    let tokens_dir = dir.path().join("tokens");
    let mut c = CoordinatorProc::start(
        &dir.path().join("c"),
        &CoordinatorOpts {
            extra: team_tokens(&tokens_dir),
            regions: tests::regions(1, std::net::SocketAddr::from(([127, 0, 0, 1], 9))),
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let mut sample = coordinator_cli::demo::sample_bundle();
    let waf = sample.files.entry("waf.toml".into()).or_default();
    waf.push_str(&format!(
        "\n[[basic_auth]]\nprefix = \"/staging\"\nuser = \"staging\"\npassword = \"{WAF_PASSWORD}\"\n"
    ));
    let bundle = serde_json::to_value(sample).expect("json");

    // The pipeline pushes config and starts warm jobs; it may not purge.
    let r = api_call(c.api, "POST", "/api/v1/config", Some(DEPLOY), Some(&bundle)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let version = r.json()["version"].as_str().expect("version").to_owned();
    let r = api_call(
        c.api,
        "POST",
        "/api/v1/purges",
        Some(DEPLOY),
        Some(&json!({"tags": ["cat_p_1"]})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        r.json()["error"],
        "token \"deploy-pipeline\" lacks the \"purge\" scope this needs"
    );
    // The dashboard's token reads, and only reads.
    for (method, path, body) in [
        ("POST", "/api/v1/purges", json!({"all": true})),
        ("POST", "/api/v1/config/rollback", json!({})),
        ("POST", "/api/v1/warm/jobs", json!({"urls": ["/"]})),
        ("POST", "/api/v1/backup", json!({})),
    ] {
        let r = api_call(c.api, method, path, Some(DASHBOARD), Some(&body)).await;
        assert_eq!(r.status, 403, "{path}: {}", r.body);
        assert!(r.body.contains("wall-dashboard"), "{}", r.body);
    }
    let r = api_call(
        c.api,
        "GET",
        &format!("/api/v1/config/versions/{version}"),
        Some(DASHBOARD),
        None,
    )
    .await;
    assert_eq!(
        r.status, 403,
        "a stored bundle may hold credentials: {}",
        r.body
    );
    // The pipeline may read it back; the audit keeps that it did, not what it read.
    let r = api_call(
        c.api,
        "GET",
        &format!("/api/v1/config/versions/{version}"),
        Some(DEPLOY),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains(WAF_PASSWORD), "the bundle as pushed");
    // Purges through the API need `purge`; the legacy token_file still has every scope.
    let r = api_call(
        c.api,
        "POST",
        "/api/v1/purges",
        Some(PURGER),
        Some(&json!({"tags": ["cat_p_2"]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seq = r.json()["seq"].as_u64().expect("seq");
    assert_eq!(
        c.call(
            "POST",
            "/api/v1/purges",
            Some(&json!({"tags": ["cat_p_3"]}))
        )
        .await
        .status,
        200
    );
    // No token, an unknown one: 401.
    for token in [None, Some("guess-0123456789")] {
        let r = api_call(
            c.api,
            "POST",
            "/api/v1/purges",
            token,
            Some(&json!({"all": true})),
        )
        .await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    // The audit log is not for anyone who reaches the port.
    assert_eq!(
        api_call(c.api, "GET", "/api/v1/audit", None, None)
            .await
            .status,
        401
    );

    // The CLI says which scope is missing, and where a token comes from.
    let (code, _, err) = cli(
        c.api,
        Some(&tokens_dir.join("deploy-pipeline")),
        &["purge", "--tag", "x"],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("lacks the \"purge\" scope") && err.contains("[[api.tokens]]"),
        "{err}"
    );
    let (code, _, err) = cli(c.api, None, &["purge", "--tag", "x"]);
    assert_ne!(code, 0);
    assert!(err.contains("401") && err.contains("--token-file"), "{err}");

    // Every attempt is in the log, newest first, with the token's name and never a secret.
    let listed = audit(c.api, "?limit=50").await;
    let got = actions(&listed);
    let expected: Vec<(String, String, u64)> = [
        ("purge", "-", 401), // the CLI without a token
        ("purge", "deploy-pipeline", 403),
        ("purge", "-", 401),
        ("purge", "-", 401),
        ("purge", "token_file", 200),
        ("purge", "magento-ops", 200),
        ("config.read", "deploy-pipeline", 200),
        ("config.read", "wall-dashboard", 403),
        ("backup", "wall-dashboard", 403),
        ("warm.start", "wall-dashboard", 403),
        ("config.rollback", "wall-dashboard", 403),
        ("purge", "wall-dashboard", 403),
        ("purge", "deploy-pipeline", 403),
        ("config.push", "deploy-pipeline", 200),
    ]
    .iter()
    .map(|(a, t, s)| (a.to_string(), t.to_string(), *s))
    .collect();
    // The unauthenticated read of the log is audited too (a read refused).
    let without_reads: Vec<_> = got
        .iter()
        .filter(|(a, _, _)| a != "read")
        .cloned()
        .collect();
    assert_eq!(without_reads, expected, "{listed:#}");
    assert!(
        got.iter().any(|(a, _, s)| a == "read" && *s == 401),
        "{got:?}"
    );
    let entries = listed["entries"].as_array().expect("entries");
    let push = entries
        .iter()
        .find(|e| e["action"] == "config.push")
        .expect("push");
    assert_eq!(push["result"]["version"], version.as_str(), "{push}");
    assert!(
        push.get("asked").is_none(),
        "a bundle is never kept: {push}"
    );
    assert_eq!(push["source"], "127.0.0.1");
    let purge = entries
        .iter()
        .find(|e| e["token"] == "magento-ops")
        .expect("purge");
    assert_eq!(purge["asked"]["tags"], json!(["cat_p_2"]));
    assert_eq!(purge["result"]["seq"], seq);
    let text = listed.to_string();
    let log = std::fs::read_to_string(c.child.log_path()).expect("log");
    for secret in [DEPLOY, DASHBOARD, PURGER, WAF_PASSWORD, c.token.as_str()] {
        assert!(
            !text.contains(secret) && !log.contains(secret),
            "a secret leaked"
        );
    }
    assert!(
        log.lines().any(|l| l.contains("audit")
            && l.contains("deploy-pipeline")
            && l.contains("config.push")),
        "one structured log line per entry"
    );
    // limit and since.
    assert_eq!(actions(&audit(c.api, "?limit=2").await).len(), 2);
    let future = crate_now_ms() + 60_000;
    assert_eq!(
        actions(&audit(c.api, &format!("?since={future}")).await).len(),
        0
    );
    assert!(actions(&audit(c.api, "?since=10m").await).len() >= expected.len());
    let r = api_call(
        c.api,
        "GET",
        "/api/v1/audit?since=yesterday",
        Some(DASHBOARD),
        None,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    // `coordinator audit` prints it.
    let (code, out, err) = cli(
        c.api,
        Some(&tokens_dir.join("wall-dashboard")),
        &["audit", "--limit", "5"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("TOKEN") && out.contains("deploy-pipeline") && out.contains("lacks the"),
        "{out}"
    );

    // A kill -9 keeps the log.
    let before = audit(c.api, "?limit=1000").await["entries"]
        .as_array()
        .map(Vec::len);
    let file = c.state.join("audit.jsonl");
    assert_eventually!(
        10,
        std::fs::read_to_string(&file).is_ok_and(|t| Some(t.lines().count()) >= before),
        "the audit file does not hold the {before:?} entries"
    );
    c.kill9_and_restart().await;
    let after = audit(c.api, "?limit=1000").await;
    assert!(
        after["entries"].as_array().map(Vec::len) >= before,
        "{after:#}"
    );
    assert!(actions(&after).contains(&("config.push".into(), "deploy-pipeline".into(), 200)));

    // A rotated token file is read on SIGHUP: the old secret stops working.
    std::fs::write(
        tokens_dir.join("magento-ops"),
        "rotated-purger-0123456789\n",
    )
    .expect("rotate");
    let pid = c.child.pid().expect("pid").to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    assert_eventually!(
        10,
        api_call(
            c.api,
            "POST",
            "/api/v1/purges",
            Some("rotated-purger-0123456789"),
            Some(&json!({"tags": ["r"]}))
        )
        .await
        .status
            == 200,
        "the rotated token is not accepted"
    );
    let r = api_call(
        c.api,
        "POST",
        "/api/v1/purges",
        Some(PURGER),
        Some(&json!({"tags": ["r"]})),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);

    // An empty token file is named as such by the CLI, not sent.
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").expect("file");
    let (code, _, err) = cli(c.api, Some(&empty), &["audit"]);
    assert_ne!(code, 0);
    assert!(err.contains("is empty"), "{err}");

    // The pipeline's `config push --wait` before any agent connected says so and exits,
    // rather than waiting for ever.
    let bundle_dir = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle_dir).expect("dir");
    for (name, text) in coordinator_cli::demo::sample_bundle().files {
        let text = if name == "main.vcl" {
            format!("{text}\n# pipeline build 2\n")
        } else {
            text
        };
        std::fs::write(bundle_dir.join(name), text).expect("bundle file");
    }
    let bundle_arg = bundle_dir.display().to_string();
    let waited = Instant::now();
    let (code, out, err) = cli(
        c.api,
        Some(&tokens_dir.join("deploy-pipeline")),
        &["config", "push", &bundle_arg, "--force", "--wait"],
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("no edge is connected") && err.contains("goes to each edge as it connects"),
        "{out}{err}"
    );
    eprintln!(
        "config push --wait with no edge gave up after {:?}",
        waited.elapsed()
    );
}

fn crate_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_file_that_is_empty_or_missing_is_refused_at_start_in_one_line() {
    let dir = temp_dir();
    std::fs::write(dir.path().join("empty"), "\n").expect("file");
    for (file, says) in [
        ("empty", "is empty"),
        ("missing", "cannot read the token file"),
    ] {
        let config = dir.path().join(format!("{file}.toml"));
        let toml = format!(
            "[purge]\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.0/8\"]\n[grpc]\nlisten = \"127.0.0.1:0\"\n[api]\nlisten = \"127.0.0.1:0\"\n[[api.tokens]]\nname = \"ci\"\nfile = \"{}\"\nscopes = [\"warm\"]\n",
            dir.path().join(file).display()
        );
        std::fs::write(&config, toml).expect("config");
        let out = std::process::Command::new(bin_dir().join("coordinator"))
            .args(["serve", "--insecure", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.path().join(format!("state-{file}")))
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with the {file} token file");
        assert!(err.contains(says) && err.contains("\"ci\""), "{err}");
        assert!(err.trim().lines().count() <= 2, "one clear line: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_coordinator_shows_the_same_audit_log_and_etcd_without_quorum_delays_no_request() {
    let dir = temp_dir();
    let mut ha = HaCluster::start(HaOpts {
        coordinators: 2,
        regions: 1,
        extra: team_tokens(&dir.path().join("tokens")),
        ..HaOpts::default()
    })
    .await;
    let leader = ha.leader(20).await;
    let follower = 1 - leader;
    let bundle = serde_json::to_value(coordinator_cli::demo::sample_bundle()).expect("json");
    let r = api_call(
        ha.c[leader].api,
        "POST",
        "/api/v1/config",
        Some(DEPLOY),
        Some(&bundle),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A write on the follower is refused (409, the leader's) and recorded there.
    let r = api_call(
        ha.c[follower].api,
        "POST",
        "/api/v1/config",
        Some(DEPLOY),
        Some(&bundle),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let r = api_call(
        ha.c[follower].api,
        "POST",
        "/api/v1/purges",
        Some(DASHBOARD),
        Some(&json!({"all": true})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let ids = |v: &Value| -> Vec<String> {
        v["entries"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eventually!(
        15,
        {
            let (a, b) = (audit(ha.c[0].api, "").await, audit(ha.c[1].api, "").await);
            ids(&a).len() == 3 && ids(&a) == ids(&b)
        },
        "the coordinators do not show the same 3 entries: {:#} vs {:#}",
        audit(ha.c[0].api, "").await,
        audit(ha.c[1].api, "").await
    );
    let both = audit(ha.c[follower].api, "").await;
    assert_eq!(
        actions(&both),
        [
            ("purge".to_owned(), "wall-dashboard".to_owned(), 403),
            ("config.push".to_owned(), "deploy-pipeline".to_owned(), 409),
            ("config.push".to_owned(), "deploy-pipeline".to_owned(), 200),
        ]
    );

    // etcd without quorum: a request is answered without waiting on etcd, its entry is
    // kept, the log says it is partial, and once etcd is back every coordinator has it.
    ha.kill_etcd(&[0, 1]).await;
    let t = Instant::now();
    let r = api_call(
        ha.c[follower].api,
        "POST",
        "/api/v1/purges",
        Some(DEPLOY),
        Some(&json!({"all": true})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a refusal waited {:?} on etcd",
        t.elapsed()
    );
    assert_eventually!(
        20,
        {
            let v = audit(ha.c[follower].api, "").await;
            v["partial"] == true
                && actions(&v)
                    .first()
                    .is_some_and(|(a, t, s)| a == "purge" && t == "deploy-pipeline" && *s == 403)
        },
        "the follower does not list its own entry as partial: {:#}",
        audit(ha.c[follower].api, "").await
    );
    ha.restart_etcd(&[0, 1]).await;
    assert_eventually!(
        40,
        {
            let (a, b) = (audit(ha.c[0].api, "").await, audit(ha.c[1].api, "").await);
            a["partial"] == false && ids(&a).len() == 4 && ids(&a) == ids(&b)
        },
        "the entry made without quorum is not on both: {:#} vs {:#}",
        audit(ha.c[0].api, "").await,
        audit(ha.c[1].api, "").await
    );
}
