//! Security: mutual TLS with edge identity (and rotation on SIGHUP), API tokens, a purge
//! listener that slowloris cannot block, X-Forwarded-For and the shared secret.

use std::path::Path;
use std::time::{Duration, Instant};

use coordinator::pki::{self, Pem};
use proto::edge::{agent_message, coordinator_message, AgentMessage, Hello};
use serde_json::json;
use tests::{
    api_call, assert_eventually, get_json, magento_purge, raw, raw_from, tags_pattern, temp_dir,
    AgentProc, Cluster, CoordinatorOpts, CoordinatorProc,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Opens a session as edge `id` in `region` and waits for Welcome. `identity`: the
/// client certificate and key (PEM) to present, if any.
async fn try_session(
    url: &str,
    ca: Option<&str>,
    identity: Option<&Pem>,
    id: &str,
    region: &str,
) -> Result<(), String> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5));
    if let Some(ca) = ca {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(p) = identity {
            tls = tls.identity(Identity::from_pem(&p.cert, &p.key));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let attempt = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        let mut client = proto::CoordinatorClient::new(channel);
        let hello = AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                edge_id: id.into(),
                region: region.into(),
                ..Default::default()
            })),
        };
        let mut inbound = client
            .session(tokio_stream::iter(vec![hello]).chain(tokio_stream::pending()))
            .await
            .map_err(|s| format!("session: {s}"))?
            .into_inner();
        match inbound.message().await {
            Ok(Some(m)) if matches!(m.msg, Some(coordinator_message::Msg::Welcome(_))) => Ok(()),
            other => Err(format!("no Welcome: {other:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .map_err(|_| "timed out".to_owned())?
}

use tokio_stream::StreamExt as _;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_checks_identity_and_rotates_on_sighup() {
    let mut cluster = Cluster::start(1, "ban", CoordinatorOpts::default()).await;
    let c = &cluster.coordinator;
    let pki_dir = c.pki.clone().expect("the cluster runs mutual TLS");
    let ca_pem = read(&pki_dir.join("ca.pem"));
    let ca = pki::load_ca(&pki_dir).expect("ca");
    let url = format!("https://{}", c.grpc);
    let (from, to) = pki::validity(1);

    // The right certificate works.
    let good = pki::agent_cert(&ca, "edge-x", "region-0", from, to).expect("cert");
    try_session(&url, Some(&ca_pem), Some(&good), "edge-x", "region-0")
        .await
        .expect("a matching certificate is accepted");
    // A certificate in use that expires within 30 days is one log line: the edge's (a
    // day) when its session opens, the agent's own at its start (the harness issues 30
    // days), and without colour escapes in a file.
    let coordinator_log = c.config.with_file_name("coordinator.log");
    let soon = "certificate expires within 30 days";
    assert_eventually!(
        5,
        read(&coordinator_log)
            .lines()
            .any(|l| l.contains(soon) && l.contains("edge edge-x in region-0")),
        "no expiry warning for edge-x: {}",
        read(&coordinator_log)
    );
    let agent_log = read(&cluster.agents[0].log);
    assert!(agent_log.contains(soon), "{agent_log}");
    for log in [read(&coordinator_log), agent_log] {
        assert!(!log.contains('\x1b'), "colour escapes in a log file: {log}");
    }
    // A certificate for edge-x claiming to be edge-y, or another region: refused.
    let err = try_session(&url, Some(&ca_pem), Some(&good), "edge-y", "region-0")
        .await
        .unwrap_err();
    assert!(
        err.contains("PermissionDenied") || err.contains("permission"),
        "{err}"
    );
    let err = try_session(&url, Some(&ca_pem), Some(&good), "edge-x", "region-9")
        .await
        .unwrap_err();
    assert!(err.contains("certificate is for edge"), "{err}");
    // No certificate, another CA, an expired certificate, plaintext: refused.
    assert!(try_session(&url, Some(&ca_pem), None, "edge-x", "region-0")
        .await
        .is_err());
    let other_ca = pki::new_ca("someone else's CA", 1).expect("ca");
    let foreign = pki::agent_cert(&other_ca, "edge-x", "region-0", from, to).expect("cert");
    assert!(
        try_session(&url, Some(&ca_pem), Some(&foreign), "edge-x", "region-0")
            .await
            .is_err()
    );
    let day = Duration::from_secs(86_400);
    let expired =
        pki::agent_cert(&ca, "edge-x", "region-0", from - 10 * day, from - day).expect("cert");
    assert!(
        try_session(&url, Some(&ca_pem), Some(&expired), "edge-x", "region-0")
            .await
            .is_err()
    );
    let plain = format!("http://{}", c.grpc);
    assert!(try_session(&plain, None, None, "edge-x", "region-0")
        .await
        .is_err());
    let tls_info = get_json(c.api, "/api/v1/tls").await.expect("tls view");
    assert!(
        tls_info["handshakes_refused"].as_u64() >= Some(3),
        "{tls_info}"
    );

    // The real agent binary with edge-a's certificate but edge-b's config is refused and
    // never shows up as an edge.
    let a = pki::agent_cert(&ca, "edge-a", "region-0", from, to).expect("cert");
    pki::write(&pki_dir, "edge-a", &a).expect("write");
    let dir = cluster.dir.path().join("impostor");
    let impostor = AgentProc::start_with(
        &dir,
        "edge-b",
        "region-0",
        &[c.grpc],
        Some((
            pki_dir.join("ca.pem"),
            pki_dir.join("edge-a.pem"),
            pki_dir.join("edge-a.key"),
        )),
        &cluster.varnish[0],
        "ban",
    );
    assert_eventually!(
        20,
        read(&impostor.log).contains("certificate is for edge"),
        "the impostor's log does not show the refusal"
    );
    assert!(c.edges().await.iter().all(|e| e["id"] != "edge-b"));

    // Rotation: a certificate from a new CA is refused until the CA file holds it too
    // and the coordinator got SIGHUP; the server certificate is re-issued at the same
    // time. The established session of edge-0 is not dropped.
    let new_ca = pki::new_ca("next year's CA", 1).expect("ca");
    let rotated = pki::agent_cert(&new_ca, "edge-r", "region-0", from, to).expect("cert");
    let both = format!("{ca_pem}{}", new_ca.cert);
    assert!(
        try_session(&url, Some(&both), Some(&rotated), "edge-r", "region-0")
            .await
            .is_err()
    );
    std::fs::write(pki_dir.join("ca.pem"), &both).expect("write CA bundle");
    pki::init(&pki_dir, &[]).expect("re-issue the coordinator certificate");
    let sessions_before = c.edges().await[0]["sessions"].as_u64();
    let pid = c.child.pid().expect("coordinator pid");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    assert_eventually!(
        10,
        try_session(&url, Some(&both), Some(&rotated), "edge-r", "region-0")
            .await
            .is_ok(),
        "the new CA is not trusted after SIGHUP"
    );
    let edge0 = c
        .edges()
        .await
        .into_iter()
        .find(|e| e["id"] == "edge-0")
        .expect("edge-0");
    assert_eq!(edge0["connected"], true);
    assert_eq!(
        edge0["sessions"].as_u64(),
        sessions_before,
        "edge-0 reconnected: {edge0}"
    );
    assert!(edge0["cert_not_after"].as_u64() > Some(0));
    let metrics = tests::get(c.api, "/metrics").await.body;
    assert!(metrics.contains("coordinator_tls_cert_expiry_timestamp_seconds{cert=\"server\"}"));
    assert!(metrics.contains(
        "coordinator_edge_cert_expiry_timestamp_seconds{region=\"region-0\",edge=\"edge-0\"}"
    ));

    // Purges still flow to edge-0 over its original session.
    let seq = tests::purge_tags(c.purge, &["cat_p_7"]).await;
    assert_eventually!(
        20,
        c.edges()
            .await
            .iter()
            .any(|e| e["id"] == "edge-0" && e["applied_seq"].as_u64() >= Some(seq)),
        "purge {seq} not applied on edge-0"
    );
    cluster.agents[0].kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_needs_the_token_for_writes_and_optionally_reads() {
    let dir = temp_dir();
    let c = CoordinatorProc::start(
        dir.path(),
        &CoordinatorOpts {
            read_requires_token: true,
            ..CoordinatorOpts::default()
        },
    )
    .await;
    for token in [None, Some("wrong-token-0123456789")] {
        let r = api_call(
            c.api,
            "POST",
            "/api/v1/purges",
            token,
            Some(&json!({"all": true})),
        )
        .await;
        assert_eq!(r.status, 401, "{r:?}");
        assert!(
            r.json()["error"].as_str().is_some(),
            "JSON reason: {}",
            r.body
        );
        let r = api_call(c.api, "GET", "/api/v1/edges", token, None).await;
        assert_eq!(r.status, 401);
        let r = api_call(c.api, "GET", "/metrics", token, None).await;
        assert_eq!(r.status, 401);
        let bundle = serde_json::to_value(coordinator_cli::demo::sample_bundle()).expect("json");
        let r = api_call(c.api, "POST", "/api/v1/config", token, Some(&bundle)).await;
        assert_eq!(r.status, 401);
    }
    // Nothing changed.
    assert_eq!(
        api_call(c.api, "GET", "/healthz", None, None).await.json()["head_seq"],
        0
    );
    let r = c.call("GET", "/api/v1/config/versions", None).await;
    assert_eq!(r.json(), json!([]));
    // The right token works.
    let r = c
        .call(
            "POST",
            "/api/v1/purges",
            Some(&json!({"tags": ["cat_p_1"]})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(c.call("GET", "/api/v1/edges", None).await.status, 200);
    // An API purge is counted with Magento's (one family, by kind); a refused one is not.
    let bad = c
        .call("POST", "/api/v1/purges", Some(&json!({"url": "no-slash"})))
        .await;
    assert_eq!(bad.status, 400, "{bad:?}");
    let metrics = c.call("GET", "/metrics", None).await.body;
    assert!(
        metrics.contains("coordinator_purges_received_total{kind=\"tags\"} 1\n")
            && metrics.contains("coordinator_purges_received_total{kind=\"url\"} 0\n"),
        "{metrics}"
    );
    // A scraper asking for OpenMetrics (Prometheus does) gets it.
    let req = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        c.token
    );
    let open = tests::raw(c.api, req.as_bytes()).await.expect("/metrics");
    assert!(
        open.body.ends_with("# EOF\n")
            && open
                .body
                .contains("# TYPE coordinator_purges_received counter\n"),
        "{}",
        open.body
    );

    // Rotation: a new token in token_file and SIGHUP; the old one stops working.
    std::fs::write(dir.path().join("token"), "rotated-token-9876543210\n").expect("token");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &c.child.pid().expect("pid").to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    assert_eventually!(
        10,
        api_call(
            c.api,
            "GET",
            "/api/v1/edges",
            Some("rotated-token-9876543210"),
            None
        )
        .await
        .status
            == 200,
        "the rotated token is not accepted"
    );
    assert_eq!(c.call("GET", "/api/v1/edges", None).await.status, 401);
}

/// Sends `head` a byte at a time, slowly, until `stop` is cancelled or the peer closes.
async fn dribble(
    addr: std::net::SocketAddr,
    from: [u8; 4],
    stop: tokio_util::sync::CancellationToken,
) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from((from, 0)))
        .expect("bind");
    let Ok(mut s) = socket.connect(addr).await else {
        return false;
    };
    let head = b"PURGE / HTTP/1.1\r\nX-Magento-Tags-Pattern: ((^|,)cat_p_1(,|$))\r\nHost: x\r\n";
    let (mut rd, mut wr) = s.split();
    let mut buf = [0u8; 256];
    for b in head.iter().cycle() {
        tokio::select! {
            _ = stop.cancelled() => return true,
            // Any answer or EOF: the server gave up on us.
            _ = rd.read(&mut buf) => return false,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        if wr.write_all(&[*b]).await.is_err() {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_does_not_delay_a_magento_purge() {
    let dir = temp_dir();
    let c = CoordinatorProc::start(
        dir.path(),
        &CoordinatorOpts {
            allow: vec!["127.0.0.1/32".into()],
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut allowed = Vec::new();
    let mut strangers = Vec::new();
    for i in 0..500 {
        let from = if i % 2 == 0 {
            [127, 0, 0, 1]
        } else {
            [127, 0, 0, 2]
        };
        let task = tokio::spawn(dribble(c.purge, from, stop.clone()));
        if i % 2 == 0 {
            allowed.push(task);
        } else {
            strangers.push(task);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Strangers were cut off after a second; allowed dribblers still hold connections.
    let t = Instant::now();
    let r = raw(c.purge, &magento_purge(&tags_pattern(&["cat_p_1"])))
        .await
        .expect("purge");
    let answered_in = t.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        answered_in < Duration::from_secs(5),
        "purge answered only after {answered_in:?} (the header timeout is 10 s)"
    );
    let r = raw_from(
        Some([127, 0, 0, 2].into()),
        c.purge,
        &magento_purge(&tags_pattern(&["cat_p_1"])),
    )
    .await
    .expect("stranger purge");
    assert_eq!(r.status, 405);
    // Every stranger's connection was closed by the server (they never stop on their own).
    let mut cut = 0;
    for s in strangers {
        if let Ok(Ok(false)) = tokio::time::timeout(Duration::from_secs(10), s).await {
            cut += 1;
        }
    }
    assert_eq!(cut, 250, "strangers whose connection the server closed");
    // The allowed dribblers were still connected (inside the 10 s head timeout).
    stop.cancel();
    let mut held = 0;
    for a in allowed {
        if a.await.expect("task") {
            held += 1;
        }
    }
    assert!(
        held > 200,
        "only {held} allowed dribblers still held a connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_only_from_trusted_proxies_and_shared_secret() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.path()).expect("dir");
    let secret = dir.path().join("purge-secret");
    std::fs::write(&secret, "s3cret-value\n").expect("secret");
    let c = CoordinatorProc::start(
        &dir.path().join("c1"),
        &CoordinatorOpts {
            allow: vec!["10.0.0.0/8".into()],
            ..CoordinatorOpts::default()
        },
    )
    .await;
    // Without trusted proxies, X-Forwarded-For is ignored: 127.0.0.1 is not allowed.
    let req = |xff: &str, secret: &str| {
        format!(
            "PURGE / HTTP/1.1\r\nHost: x\r\nX-Magento-Tags-Pattern: .*\r\n{xff}{secret}Connection: close\r\n\r\n"
        )
    };
    let r = raw(c.purge, req("X-Forwarded-For: 10.1.2.3\r\n", "").as_bytes())
        .await
        .expect("purge");
    assert_eq!(r.status, 405, "XFF from an untrusted peer must not count");
    drop(c);

    // With 127.0.0.1 as a trusted proxy and a shared secret.
    let dir2 = dir.path().join("c3");
    std::fs::create_dir_all(&dir2).expect("dir");
    let c = CoordinatorProc::start(
        &dir2,
        &CoordinatorOpts {
            allow: vec!["10.0.0.0/8".into()],
            purge_extra: format!(
                "trusted_proxies = [\"127.0.0.1/32\"]\nsecret_file = \"{}\"\n",
                secret.display()
            ),
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let ok_secret = "X-Purge-Secret: s3cret-value\r\n";
    let cases = [
        (req("X-Forwarded-For: 10.1.2.3\r\n", ok_secret), 200),
        (
            req("X-Forwarded-For: 10.9.9.9, 192.0.2.1\r\n", ok_secret),
            405,
        ), // client is 192.0.2.1
        (req("", ok_secret), 405), // the proxy itself
        (req("X-Forwarded-For: 10.1.2.3\r\n", ""), 403),
        (
            req(
                "X-Forwarded-For: 10.1.2.3\r\n",
                "X-Purge-Secret: s3cret-valuf\r\n",
            ),
            403,
        ),
    ];
    for (request, want) in cases {
        let r = raw(c.purge, request.as_bytes()).await.expect("purge");
        assert_eq!(r.status, want, "{request:?} -> {r:?}");
    }
    assert_eq!(c.head().await, 1, "only the first request was logged");
}

/// Restarts the agent with `edit` applied to its config; waits for `want` in its log.
async fn agent_logs(agent: &mut AgentProc, edit: impl Fn(&str) -> String, want: &str) {
    agent.kill9().await;
    let original = std::fs::read_to_string(&agent.config).expect("agent config");
    std::fs::write(&agent.config, edit(&original)).expect("agent config");
    let _ = std::fs::write(&agent.log, "");
    agent.restart();
    assert_eventually!(
        15,
        read(&agent.log).contains(want),
        "the agent did not say {want:?}: {}",
        read(&agent.log)
    );
    agent.kill9().await;
    std::fs::write(&agent.config, original).expect("agent config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_says_why_it_cannot_connect() {
    let mut cluster = Cluster::start(1, "ban", CoordinatorOpts::default()).await;
    let grpc = cluster.coordinator.grpc.to_string();
    let nothing = format!("127.0.0.1:{}", tests::free_port());
    let agent = &mut cluster.agents[0];
    // Nothing listens there.
    agent_logs(
        agent,
        |c| c.replace(&grpc, &nothing),
        "cannot connect to the coordinator: connection refused",
    )
    .await;
    // A certificate from another CA: the coordinator refuses it during the handshake.
    let dir = temp_dir();
    let other_ca = pki::new_ca("someone else's CA", 1).expect("ca");
    let (from, to) = pki::validity(1);
    let foreign = pki::agent_cert(&other_ca, "edge-0", "region-0", from, to).expect("cert");
    pki::write(dir.path(), "foreign", &foreign).expect("write");
    let cert = agent.config.clone();
    let text = std::fs::read_to_string(&cert).expect("config");
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .map(str::to_owned)
            .expect("tls key")
    };
    let (cert_line, key_line) = (line("cert"), line("key"));
    let foreign_dir = dir.path().display().to_string();
    agent_logs(
        agent,
        |c| {
            c.replace(&cert_line, &format!("cert = \"{foreign_dir}/foreign.pem\""))
                .replace(&key_line, &format!("key = \"{foreign_dir}/foreign.key\""))
        },
        "certificate not accepted by the coordinator",
    )
    .await;
}
