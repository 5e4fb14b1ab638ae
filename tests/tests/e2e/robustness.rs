//! Bad input gets a clear answer and loses nothing; the listener stays healthy.

use tests::{get_json, magento_purge, purge_tags, raw, temp_dir, CoordinatorOpts, CoordinatorProc};

/// A coordinator in `dir` serving plaintext gRPC (for raw sessions and agents).
async fn plaintext(dir: &std::path::Path) -> CoordinatorProc {
    CoordinatorProc::start(
        dir,
        &CoordinatorOpts {
            insecure: true,
            ..CoordinatorOpts::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_answers_and_never_a_flush() {
    let dir = temp_dir();
    let c = CoordinatorProc::start(dir.path(), &CoordinatorOpts::default()).await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "empty pattern",
            b"PURGE / HTTP/1.1\r\nX-Magento-Tags-Pattern: \r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        ("invalid regex", magento_purge("((^|,)cat_p_1(,|$)"), 400),
        (
            "no header",
            b"PURGE /some/path HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "wrong method",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            405,
        ),
        (
            "garbage",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n".to_vec(),
            400,
        ),
        ("not http", b"HELLO\r\n\r\n".to_vec(), 400),
        (
            "oversized headers",
            format!(
                "PURGE / HTTP/1.1\r\nX-Pool: {}\r\n\r\n",
                "a".repeat(200 * 1024)
            )
            .into_bytes(),
            431,
        ),
    ];
    for (name, bytes, status) in &cases {
        let r = raw(c.purge, bytes)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.status, *status, "{name}: {}", r.body);
        if *status == 400 {
            let reason = r.json()["error"].as_str().unwrap_or_default().to_owned();
            assert!(!reason.is_empty(), "{name}: a 400 carries a reason");
        }
    }
    assert_eq!(c.head().await, 0, "nothing may be logged from bad input");

    // A 64 KiB header line of real tags is accepted.
    // (2,850 tags: a 64.4 KB line, inside the 73,728-byte head limit, which holds to the byte.)
    let tags: Vec<String> = (0..2850).map(|i| format!("cat_p_{i}")).collect();
    let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    let pattern = tests::tags_pattern(&refs);
    assert!(pattern.len() >= 64 * 1000, "{}", pattern.len());
    let r = raw(c.purge, &magento_purge(&pattern)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let p = get_json(c.api, "/api/v1/purges/1").await.expect("purge 1");
    assert_eq!(p["op"]["tags"].as_array().map(Vec::len), Some(2850));

    // Still healthy.
    assert_eq!(purge_tags(c.purge, &["cat_p_1"]).await, 2);
    let metrics = tests::get(c.api, "/metrics").await.body;
    assert!(
        metrics.contains("coordinator_purge_requests_total{result=\"bad_request\"} 6"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_outside_the_allow_list_get_405() {
    let dir = temp_dir();
    let c = CoordinatorProc::start(
        dir.path(),
        &CoordinatorOpts {
            allow: vec!["10.0.0.0/8".into()],
            ..Default::default()
        },
    )
    .await;
    let r = raw(c.purge, &magento_purge(&tests::tags_pattern(&["cat_p_1"])))
        .await
        .unwrap();
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]
        .as_str()
        .unwrap_or_default()
        .contains("not allowed"));
    assert_eq!(c.head().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_protocol_violations_on_grpc_are_refused_and_harmless() {
    use proto::edge::{agent_message, AgentMessage, Hello, PurgeAck};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = temp_dir();
    let c = plaintext(dir.path()).await;

    // Raw garbage on the gRPC port: the connection is dropped.
    let mut s = tokio::net::TcpStream::connect(c.grpc).await.unwrap();
    s.write_all(b"\x00\xffnot http2 at all\r\n\r\n\x16\x03\x01garbage")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf)).await;

    let session = |msgs: Vec<AgentMessage>| async move {
        let mut client = proto::CoordinatorClient::connect(format!("http://{}", c.grpc))
            .await
            .unwrap();
        let stream = tokio_stream::iter(msgs);
        match client.session(stream).await {
            Ok(r) => {
                let mut inbound = r.into_inner();
                inbound.message().await.map(|_| ())
            }
            Err(status) => Err(status),
        }
    };
    // An ack before Hello.
    let ack = AgentMessage {
        msg: Some(agent_message::Msg::Ack(PurgeAck {
            applied_seq: 5,
            log_id: String::new(),
        })),
    };
    let err = session(vec![ack]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    // An identity that could break labels or paths.
    let hello = |id: &str| AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            edge_id: id.into(),
            region: "r".into(),
            ..Default::default()
        })),
    };
    let err = session(vec![hello("bad id\"}\n")]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    // A message with no payload (what an unknown future kind decodes to) is ignored.
    session(vec![hello("good-1"), AgentMessage { msg: None }])
        .await
        .expect("valid session");

    // Still serving purges.
    assert_eq!(purge_tags(c.purge, &["cat_p_1"]).await, 1);
    let edges = get_json(c.api, "/api/v1/edges").await.unwrap();
    assert_eq!(
        edges.as_array().map(Vec::len),
        Some(1),
        "only the valid edge registered: {edges}"
    );

    // An ack beyond the log head (a buggy or hostile agent) is refused: the session is
    // dropped and the purge status does not lie.
    let lie = AgentMessage {
        msg: Some(agent_message::Msg::Ack(PurgeAck {
            applied_seq: 16_500,
            log_id: String::new(),
        })),
    };
    let _ = session(vec![hello("liar-1"), lie]).await;
    let mut liar;
    tests::assert_eventually!(
        10,
        {
            let edges = get_json(c.api, "/api/v1/edges").await.unwrap_or_default();
            liar = edges
                .as_array()
                .and_then(|a| a.iter().find(|e| e["id"] == "liar-1").cloned())
                .unwrap_or_default();
            liar["refused_acks"] == 1
        },
        "the lie was not refused: {liar}"
    );
    assert_eq!(liar["applied_seq"], 0, "{liar}");
    assert_eq!(liar["connected"], false, "{liar}");
    let p = get_json(c.api, "/api/v1/purges/1").await.unwrap();
    assert_eq!(
        p["edges"]["liar-1"]["applied_at"],
        serde_json::Value::Null,
        "{p}"
    );
}

/// A tmpfs of a given size, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(path).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "this test mounts a small tmpfs to fill the disk: it needs root (CI runs as root)"
        );
        SmallDisk(path.to_owned())
    }

    fn grow(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount failed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_loses_nothing_acknowledged() {
    let dir = temp_dir();
    let disk = SmallDisk::mount(&dir.path().join("state"), "3m");
    let mut c = CoordinatorProc::start(dir.path(), &CoordinatorOpts::default()).await;
    let tags: Vec<String> = (0..400).map(|i| format!("cat_p_{i}")).collect();
    let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    let request = magento_purge(&tests::tags_pattern(&refs));
    let mut acked = Vec::new();
    let mut refused = None;
    for _ in 0..5000 {
        let r = raw(c.purge, &request).await.unwrap();
        match r.status {
            200 => acked.push(r.json()["seq"].as_u64().unwrap()),
            503 => {
                refused = Some(r);
                break;
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    let refused = refused.expect("the disk never filled up");
    assert!(
        refused.json()["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{}",
        refused.body
    );
    assert!(acked.len() > 10, "only {} purges fit", acked.len());
    // Still answering (not hung, not crashed) while the disk is full.
    let again = raw(c.purge, &request).await.unwrap();
    assert!(
        again.status == 503 || again.status == 200,
        "{}",
        again.status
    );
    if again.status == 200 {
        acked.push(again.json()["seq"].as_u64().unwrap());
    }

    // Space comes back: appends succeed again without a restart...
    disk.grow("64m");
    let mut recovered = false;
    for _ in 0..50 {
        let r = raw(c.purge, &request).await.unwrap();
        if r.status == 200 {
            acked.push(r.json()["seq"].as_u64().unwrap());
            recovered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recovered, "the log did not recover once space was back");
    // ...and after a crash every acknowledged purge is there.
    c.kill9_and_restart().await;
    for seq in &acked {
        assert!(
            get_json(c.api, &format!("/api/v1/purges/{seq}"))
                .await
                .is_some(),
            "acknowledged purge {seq} lost"
        );
    }
    let next = tests::purge_tags(c.purge, &["cat_p_1"]).await;
    assert!(next > *acked.iter().max().unwrap());
}

/// Out of file descriptors (here a hard limit of 64, as a too-small `LimitNOFILE` would
/// give at a thousand edges): the coordinator says so at start, keeps serving what it
/// holds, logs and counts the refused connections, and takes new ones once some close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_is_logged_counted_and_survived() {
    let dir = temp_dir();
    let mut c = plaintext(&dir.path().join("coordinator")).await;
    c.child.kill9().await;
    let log = dir.path().join("limited.log");
    let args: Vec<String> = [
        "--nofile=64:64",
        "--",
        &tests::bin_dir().join("coordinator").display().to_string(),
        "serve",
        "--config",
        &c.config.display().to_string(),
        "--state-dir",
        &c.state.display().to_string(),
        "--insecure",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut limited = coordinator_cli::demo::process::spawn(
        std::path::Path::new("prlimit"),
        &args,
        &log,
        "coordinator",
    )
    .expect("prlimit (util-linux)");
    tests::assert_eventually!(
        20,
        get_json(c.api, "/healthz").await.is_some(),
        "not serving"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("file descriptor limit is low"), "{text}");

    // 100 connections to the gRPC port, held open: past the limit, accept fails. They
    // come from ten addresses, ten each, under the per-source cap on connections that
    // have not yet spoken (which would close them at once, before the limit is reached).
    let mut held = Vec::new();
    for i in 0..100u8 {
        let from = std::net::Ipv4Addr::new(127, 0, 0, 2 + i % 10);
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            continue;
        };
        if socket.bind((from, 0).into()).is_err() {
            continue;
        }
        if let Ok(s) = socket.connect(c.grpc).await {
            held.push(s);
        }
    }
    tests::assert_eventually!(
        15,
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("accept failing"),
        "no log line for the refused connections"
    );
    // Once they close, the coordinator serves again and the count is there.
    drop(held);
    tests::assert_eventually!(
        20,
        get_json(c.api, "/healthz").await.is_some(),
        "did not recover"
    );
    let metrics = c.call("GET", "/metrics", None).await.body;
    let refused: u64 = metrics
        .lines()
        .find(|l| l.starts_with("coordinator_accept_errors_total{listener=\"grpc\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(refused > 0, "accept errors not counted:\n{metrics}");
    assert_eq!(
        purge_tags(c.purge, &["after_emfile"]).await,
        1,
        "purges still work"
    );
    limited.kill9().await;
}

/// A session's messages, after `hello` (`log_id` resumed from the start, `caps`).
async fn open_session(
    c: &CoordinatorProc,
    edge: &str,
    log_id: &str,
    caps: &[&str],
) -> tonic::Streaming<proto::edge::CoordinatorMessage> {
    use proto::edge::{agent_message, AgentMessage, Hello};
    let mut client = proto::CoordinatorClient::connect(format!("http://{}", c.grpc))
        .await
        .expect("connect");
    let hello = AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            edge_id: edge.into(),
            region: "r".into(),
            log_id: log_id.into(),
            capabilities: caps.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })),
    };
    // The stream stays open after the Hello, so our side never ends the session.
    let out =
        tokio_stream::StreamExt::chain(tokio_stream::iter(vec![hello]), tokio_stream::pending());
    client.session(out).await.expect("session").into_inner()
}

/// The next message of `inbound` that `pick` takes.
async fn next_of<T>(
    inbound: &mut tonic::Streaming<proto::edge::CoordinatorMessage>,
    pick: impl Fn(proto::edge::coordinator_message::Msg) -> Option<T>,
) -> T {
    loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), inbound.message())
            .await
            .expect("a message within 10 s")
            .expect("stream")
            .expect("a message");
        if let Some(t) = m.msg.and_then(&pick) {
            return t;
        }
    }
}

/// The first batch a session gets with `caps`, resuming `log_id` from the start: each
/// entry as `(first, seq)`.
async fn first_batch(
    c: &CoordinatorProc,
    edge: &str,
    log_id: &str,
    caps: &[&str],
) -> Vec<(u64, u64)> {
    use proto::edge::coordinator_message::Msg;
    let mut inbound = open_session(c, edge, log_id, caps).await;
    next_of(&mut inbound, |m| match m {
        Msg::Purges(b) => Some(b.entries.iter().map(|e| (e.first(), e.seq)).collect()),
        _ => None,
    })
    .await
}

/// An agent that announces `purge_ranges` gets each run of tag purges as one entry; an
/// older agent gets one entry per purge, as it always did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_entries_go_only_to_agents_that_announce_them() {
    use proto::edge::coordinator_message::Msg;
    let dir = temp_dir();
    let c = plaintext(dir.path()).await;
    for i in 0..5 {
        purge_tags(c.purge, &[&format!("a{i}")]).await;
    }
    let regex = raw(
        c.purge,
        b"PURGE / HTTP/1.1\r\nX-Pool: ^blue$\r\nHost: x\r\n\r\n",
    )
    .await
    .expect("purge");
    assert_eq!(regex.status, 200);
    purge_tags(c.purge, &["b1"]).await;
    assert_eq!(purge_tags(c.purge, &["b2"]).await, 8);
    let mut probe = open_session(&c, "probe-1", "", &[proto::CAP_FULL_BAN]).await;
    let log_id = next_of(&mut probe, |m| match m {
        Msg::Welcome(w) => Some(w.log_id),
        _ => None,
    })
    .await;
    let old = first_batch(&c, "old-1", &log_id, &[proto::CAP_FULL_BAN]).await;
    assert_eq!(old, (1..=8).map(|s| (s, s)).collect::<Vec<_>>());
    let new = first_batch(
        &c,
        "new-1",
        &log_id,
        &[proto::CAP_FULL_BAN, proto::CAP_PURGE_RANGES],
    )
    .await;
    assert_eq!(new, vec![(1, 5), (6, 6), (7, 8)]);
}

/// Runs `bin` with `args`; (exit code, stderr).
fn run(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(tests::bin_dir().join(bin))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `bin` with stdout and stderr pipes whose reading ends are closed at once (`| head`
/// after it exited); waits at most `wait` for it to end (`None`: still running, then
/// stopped with SIGTERM and its status returned as the second value).
async fn run_into_closed_pipe(
    bin: &str,
    args: &[String],
    wait: std::time::Duration,
) -> (Option<std::process::ExitStatus>, std::process::ExitStatus) {
    use std::process::Stdio;
    let mut child = std::process::Command::new(tests::bin_dir().join(bin))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"));
    drop(child.stdout.take());
    drop(child.stderr.take());
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait") {
            return (Some(status), status);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    (None, child.wait().expect("wait"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_config_is_one_line_and_exit_2_and_a_closed_pipe_is_quiet() {
    use coordinator_cli::demo::configs;
    let dir = temp_dir();
    let mut c = CoordinatorProc::start(dir.path(), &CoordinatorOpts::default()).await;
    let pki = c.pki.clone().expect("mutual TLS by default");

    // The edge agent: an unknown key, a missing [tls] for an https:// coordinator, an
    // unreadable certificate: each one line naming the file, and 2.
    let secret = dir.path().join("varnish-secret");
    std::fs::write(&secret, "s3cret\n").expect("secret");
    coordinator::pki::issue(&pki, "edge-1", "region-0", 30).expect("issue");
    let agent = configs::agent(
        "edge-1",
        "region-0",
        &[c.grpc],
        Some(configs::agent_tls(&pki, "edge-1")),
        dir.path().join("agent-state"),
        &configs::VarnishFiles {
            http: "127.0.0.1:1".parse().expect("addr"),
            admin: "127.0.0.1:2".parse().expect("addr"),
            secret_file: secret.clone(),
            instance: dir.path().to_owned(),
        },
        configs::purge_mode("ban").expect("mode"),
    );
    let good = toml::to_string_pretty(&agent).expect("agent toml");
    assert!(good.contains("[tls]"), "{good}");
    let without_tls = {
        let start = good.find("[tls]").expect("[tls]");
        let end = good[start + 1..]
            .find("\n[")
            .map_or(good.len(), |i| start + 2 + i);
        format!("{}{}", &good[..start], &good[end..])
    };
    let cert = dir.path().join("pki").join("edge-1.pem");
    for (name, text, want) in [
        ("unknown key", format!("typo_key = 1\n{good}"), "typo_key"),
        ("no [tls]", without_tls, "[tls]"),
        (
            "no certificate",
            good.replace(&cert.display().to_string(), "/nonexistent/edge-1.pem"),
            "/nonexistent/edge-1.pem",
        ),
    ] {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, &text).expect("agent config");
        let (code, stderr) = run("edge-agent", &["--config", path.to_str().expect("path")]);
        assert_eq!(code, Some(2), "{name}: {stderr}");
        let line = stderr.trim();
        assert!(
            !line.contains('\n') && line.contains("agent.toml") && line.contains(want),
            "{name}: {stderr}"
        );
    }

    // The coordinator: a CIDR with host bits set (anywhere CIDRs are read), an unreadable
    // certificate: one line, 2.
    c.child.kill9().await;
    let config = std::fs::read_to_string(&c.config).expect("coordinator config");
    let cert_path = pki.join("coordinator.pem").display().to_string();
    let mut cases = vec![(
        "unreadable certificate",
        config.replace(&cert_path, "/nonexistent/coordinator.pem"),
        "/nonexistent/coordinator.pem".to_owned(),
    )];
    for key in ["allow", "trusted_proxies"] {
        // The key replaced (or added) at the top of [purge].
        let bad = format!("{key} = [\"10.0.0.1/8\"]");
        let kept: Vec<&str> = config
            .lines()
            .filter(|l| !l.starts_with(&format!("{key} = ")))
            .collect();
        let text = kept
            .join("\n")
            .replacen("[purge]\n", &format!("[purge]\n{bad}\n"), 1);
        cases.push((
            key,
            text,
            format!("purge.{key}[0]: \"10.0.0.1/8\": host bits are set: it means 10.0.0.0/8"),
        ));
    }
    for (name, text, want) in &cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).expect("config");
        let state = dir.path().join("bad-state").display().to_string();
        let (code, stderr) = run(
            "coordinator",
            &[
                "serve",
                "--config",
                path.to_str().expect("path"),
                "--state-dir",
                &state,
            ],
        );
        assert_eq!(code, Some(2), "{name}: {stderr}");
        let last = stderr.trim().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("coordinator: ") && last.contains(want.as_str()),
            "{name}: {stderr}"
        );
    }

    // A closed pipe: a printing subcommand stops quietly (141, as SIGPIPE would), a
    // daemon logging into it keeps serving and stops cleanly on SIGTERM; never a panic.
    let fresh = dir.path().join("pki-fresh").display().to_string();
    let (ended, status) = run_into_closed_pipe(
        "coordinator",
        &["pki".into(), "init".into(), "--dir".into(), fresh],
        std::time::Duration::from_secs(10),
    )
    .await;
    assert!(ended.is_some(), "pki init did not end");
    assert_eq!(
        status.code(),
        Some(141),
        "pki init into a closed pipe: {status}"
    );
    let serve: Vec<String> = [
        "serve",
        "--config",
        c.config.to_str().expect("path"),
        "--state-dir",
        c.state.to_str().expect("path"),
    ]
    .map(str::to_owned)
    .to_vec();
    let (ended, status) =
        run_into_closed_pipe("coordinator", &serve, std::time::Duration::from_secs(3)).await;
    assert_eq!(ended, None, "serve ended with a closed log pipe: {status}");
    assert_eq!(status.code(), Some(0), "serve after SIGTERM: {status}");

    // A bare 401 says where the token comes from.
    c.restart().await;
    let (code, stderr) = run(
        "coordinator",
        &["config", "rollback", "--api", &format!("http://{}", c.api)],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("401") && stderr.contains("--token-file"),
        "{stderr}"
    );
}
