//! Hostile HTTP against the real coordinator binary over real sockets: request smuggling
//! shapes on the purge port and the API, `X-Forwarded-For` lines behind a trusted proxy,
//! unauthenticated bodies, slowloris and the connection cap on the API.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tests::{
    magento_purge, raw, raw_from, tags_pattern, temp_dir, CoordinatorOpts, CoordinatorProc,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn coordinator(dir: &std::path::Path, opts: CoordinatorOpts) -> CoordinatorProc {
    CoordinatorProc::start(
        dir,
        &CoordinatorOpts {
            insecure: true,
            ..opts
        },
    )
    .await
}

/// A tag purge whose head is exactly `len` bytes (padded with a header of its own).
fn purge_head_of(len: usize) -> Vec<u8> {
    let start =
        "PURGE / HTTP/1.1\r\nHost: c\r\nX-Magento-Tags-Pattern: ((^|,)cat_p_9(,|$))\r\nX-Pad: ";
    let end = "\r\n\r\n";
    format!("{start}{}{end}", "a".repeat(len - start.len() - end.len())).into_bytes()
}

/// The answer's status, or 0 when the connection ended without one.
async fn status_of(addr: SocketAddr, request: &[u8]) -> u16 {
    raw(addr, request).await.map(|r| r.status).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_port_refuses_every_smuggling_shape() {
    let dir = temp_dir();
    let c = coordinator(dir.path(), CoordinatorOpts::default()).await;
    let tag = "X-Magento-Tags-Pattern: ((^|,)cat_p_1(,|$))\r\n";
    // What a smuggler hopes runs as a second request: a full flush.
    let second = "PURGE / HTTP/1.1\r\nHost: c\r\nX-Magento-Tags-Pattern: .*\r\n\r\n";
    let shapes: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "two different Content-Length",
            format!("PURGE / HTTP/1.1\r\nHost: c\r\n{tag}Content-Length: 0\r\nContent-Length: {}\r\n\r\n{second}", second.len()).into_bytes(),
            400,
        ),
        (
            "the same Content-Length twice",
            format!("PURGE / HTTP/1.1\r\nHost: c\r\n{tag}Content-Length: 0\r\nContent-Length: 0\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "Transfer-Encoding identity + chunked",
            format!("PURGE / HTTP/1.1\r\nHost: c\r\n{tag}Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{second}").into_bytes(),
            400,
        ),
        (
            "Content-Length: +3",
            format!("PURGE / HTTP/1.1\r\nHost: c\r\n{tag}Content-Length: +3\r\n\r\nabc{second}").into_bytes(),
            400,
        ),
        (
            "Content-Length: 03",
            format!("PURGE / HTTP/1.1\r\nHost: c\r\n{tag}Content-Length: 03\r\n\r\nabc").into_bytes(),
            400,
        ),
        (
            "bare LF",
            b"PURGE / HTTP/1.1\nHost: c\nX-Magento-Tags-Pattern: ((^|,)cat_p_1(,|$))\n\n".to_vec(),
            400,
        ),
        (
            "obs-fold",
            format!("PURGE / HTTP/1.1\r\nHost: c\r\n{tag} |((^|,)cat_p_2(,|$))\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "whitespace before the colon",
            b"PURGE / HTTP/1.1\r\nHost: c\r\nX-Magento-Tags-Pattern : ((^|,)cat_p_1(,|$))\r\n\r\n".to_vec(),
            400,
        ),
        (
            "duplicate X-Magento-Tags-Pattern",
            format!("PURGE / HTTP/1.1\r\nHost: c\r\n{tag}X-Magento-Tags-Pattern: .*\r\n\r\n").into_bytes(),
            400,
        ),
        (
            "duplicate X-Pool",
            b"PURGE / HTTP/1.1\r\nHost: c\r\nX-Pool: a\r\nX-Pool: .*\r\n\r\n".to_vec(),
            400,
        ),
        ("a head one byte over 73,728", purge_head_of(73_729), 431),
    ];
    let mut failures = Vec::new();
    for (what, bytes, want) in &shapes {
        let t = Instant::now();
        let got = status_of(c.purge, bytes).await;
        eprintln!("{what}: {got} in {:?}", t.elapsed());
        if got != *want {
            failures.push(format!("{what}: {got} (want {want})"));
        }
    }
    // Nothing of it reached the log: neither a first nor a smuggled second purge.
    let head = c.head().await;
    assert!(
        failures.is_empty() && head == 0,
        "accepted on the purge port: {failures:?}; log head {head}"
    );

    // Magento's exact bytes still work, with a header line over 8 KiB, and a head of
    // exactly the limit passes.
    let tags: Vec<String> = (0..400).map(|i| format!("cat_p_{i}")).collect();
    let refs: Vec<&str> = tags.iter().map(String::as_str).collect();
    let pattern = tags_pattern(&refs);
    assert!(pattern.len() > 8 * 1024);
    let r = raw(c.purge, &magento_purge(&pattern)).await.expect("purge");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("x-purge-seq"),
        Some("1"),
        "nothing before it was logged"
    );
    assert_eq!(status_of(c.purge, &purge_head_of(73_728)).await, 200);
    assert_eq!(c.head().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_refuses_every_smuggling_shape() {
    let dir = temp_dir();
    let c = coordinator(dir.path(), CoordinatorOpts::default()).await;
    let auth = format!("Authorization: Bearer {}\r\n", c.token);
    let body = r#"{"tags":["cat_p_1"]}"#;
    let second = format!(
        "POST /api/v1/purges HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let post = |headers: &str, rest: &str| {
        format!("POST /api/v1/purges HTTP/1.1\r\nHost: a\r\n{auth}{headers}\r\n{rest}").into_bytes()
    };
    let big_head = |len: usize| {
        let fixed =
            "GET /healthz HTTP/1.1\r\nHost: a\r\nX-Pad: \r\nConnection: close\r\n\r\n".len();
        format!(
            "GET /healthz HTTP/1.1\r\nHost: a\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(len - fixed)
        )
        .into_bytes()
    };
    let shapes: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "two different Content-Length",
            post(
                &format!("Content-Length: {}\r\nContent-Length: 0\r\n", body.len()),
                &format!("{body}{second}"),
            ),
            400,
        ),
        (
            "Transfer-Encoding identity + chunked",
            post(
                "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
                &format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()),
            ),
            400,
        ),
        (
            "Content-Length: +20",
            post(&format!("Content-Length: +{}\r\n", body.len()), body),
            400,
        ),
        (
            "bare LF",
            format!(
                "POST /api/v1/purges HTTP/1.1\nHost: a\n{}\nContent-Length: {}\n\n{body}",
                auth.trim_end(),
                body.len()
            )
            .into_bytes(),
            400,
        ),
        (
            "obs-fold",
            post(
                &format!("Content-Length: {}\r\nX-A: b\r\n c\r\n", body.len()),
                body,
            ),
            400,
        ),
        (
            "whitespace before the colon",
            post(&format!("Content-Length : {}\r\n", body.len()), body),
            400,
        ),
        (
            "two Authorization headers",
            post(
                &format!(
                    "Authorization: Bearer wrong\r\nContent-Length: {}\r\n",
                    body.len()
                ),
                body,
            ),
            400,
        ),
        ("a head one byte over 64 KiB", big_head(64 * 1024 + 1), 431),
    ];
    let mut failures = Vec::new();
    for (what, bytes, want) in &shapes {
        let got = status_of(c.api, bytes).await;
        if got != *want {
            failures.push(format!("{what}: {got} (want {want})"));
        }
    }
    let head = c.head().await;
    assert!(
        failures.is_empty() && head == 0,
        "accepted on the API: {failures:?}; log head {head}"
    );
    // A head of exactly the limit passes, and a plain purge is logged as the first.
    assert_eq!(status_of(c.api, &big_head(64 * 1024)).await, 200);
    let r = c
        .call(
            "POST",
            "/api/v1/purges",
            Some(&serde_json::json!({"tags": ["cat_p_1"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["seq"], 1, "nothing before it was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_lines_are_joined_behind_a_trusted_proxy() {
    let dir = temp_dir();
    // The proxy (127.0.0.2) may purge itself, so a fallback to its address would pass.
    let c = coordinator(
        dir.path(),
        CoordinatorOpts {
            allow: vec!["127.0.0.1/32".into(), "127.0.0.2/32".into()],
            purge_extra: "trusted_proxies = [\"127.0.0.2/32\"]\n".into(),
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let proxy: IpAddr = "127.0.0.2".parse().expect("ip");
    let purge = |xff_lines: &[&str]| {
        let lines: String = xff_lines
            .iter()
            .map(|l| format!("X-Forwarded-For: {l}\r\n"))
            .collect();
        format!(
            "PURGE / HTTP/1.1\r\nHost: c\r\nX-Magento-Tags-Pattern: ((^|,)cat_p_1(,|$))\r\n{lines}Connection: close\r\n\r\n"
        )
        .into_bytes()
    };
    let cases: [(&[&str], u16, &str); 5] = [
        // The client wrote the first line; the proxy appended the real client's address.
        (
            &["127.0.0.1", "192.0.2.9"],
            405,
            "a client-sent first line is believed",
        ),
        (
            &["192.0.2.9", "127.0.0.1"],
            200,
            "the proxy's own line is not the one read",
        ),
        (
            &["127.0.0.1", "192.0.2.9, 127.0.0.2"],
            405,
            "trusted hops are not skipped",
        ),
        (
            &["127.0.0.1", "not-an-ip"],
            400,
            "a malformed hop from the proxy is accepted",
        ),
        (
            &["127.0.0.1, bogus"],
            400,
            "a malformed hop falls back to the proxy's address",
        ),
    ];
    let mut failures = Vec::new();
    for (lines, want, what) in cases {
        let r = raw_from(Some(proxy), c.purge, &purge(lines))
            .await
            .expect("purge");
        if r.status != want {
            failures.push(format!("{lines:?}: {} ({what})", r.status));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        c.head().await,
        1,
        "only the allowed client's purge was logged"
    );
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_bodies_are_never_read() {
    let dir = temp_dir();
    let c = coordinator(dir.path(), CoordinatorOpts::default()).await;
    let pid = c.child.pid().expect("coordinator pid");
    let before = rss_mib(pid);
    const SIZE: usize = 8 * 1024 * 1024;
    let peak = std::sync::Arc::new(std::sync::Mutex::new(before));
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while !sampling.is_cancelled() {
                let now = rss_mib(pid);
                {
                    let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                    *p = p.max(now);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let api = c.api;
    let senders: Vec<_> = (0..40)
        .map(|i| {
            tokio::spawn(async move {
                let path = ["/api/v1/config", "/api/v1/purges", "/api/v1/warm/jobs"][i % 3];
                let mut s = TcpStream::connect(api).await.expect("connect");
                let head = format!(
                    "POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {SIZE}\r\n\r\n"
                );
                let _ = s.write_all(head.as_bytes()).await;
                let chunk = vec![b' '; 64 * 1024];
                let mut sent = 0;
                while sent < SIZE {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
                let mut answer = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer))
                    .await;
                String::from_utf8_lossy(&answer).into_owned()
            })
        })
        .collect();
    let mut answers = Vec::new();
    for s in senders {
        answers.push(s.await.expect("sender"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    sampling.cancel();
    let _ = sampler.await;
    let peak = *peak.lock().unwrap_or_else(|e| e.into_inner());
    let growth = peak - before;
    eprintln!(
        "40 unauthenticated 8 MiB bodies: coordinator RSS {before:.1} MiB -> peak {peak:.1} MiB (+{growth:.1} MiB)"
    );
    assert!(
        growth < 100.0,
        "RSS grew by {growth:.1} MiB ({before:.1} -> {peak:.1})"
    );
    let refused = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 401"))
        .count();
    eprintln!("{refused} of 40 read their 401 before the connection was reset");
    // The refusal comes from the head alone: a declared body never sent is not awaited.
    let mut s = TcpStream::connect(c.api).await.expect("connect");
    s.write_all(
        format!("POST /api/v1/config HTTP/1.1\r\nHost: a\r\nContent-Length: {SIZE}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("answered before the body")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // A token holder's bodies are bounded per route, from Content-Length alone.
    for (method, path, len) in [
        ("POST", "/api/v1/purges", 64 * 1024 + 1),
        ("POST", "/api/v1/warm/jobs", 64 * 1024 + 1),
        ("POST", "/api/v1/config", SIZE + 1),
        ("GET", "/api/v1/regions", 1),
    ] {
        let mut s = TcpStream::connect(c.api).await.expect("connect");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {}\r\nContent-Length: {len}\r\n\r\n",
            c.token
        );
        s.write_all(head.as_bytes()).await.expect("write");
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("answered before the body")
            .expect("read");
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "{method} {path} {len}: {answer}"
        );
    }
    let metrics = tests::get(c.api, "/metrics").await.body;
    let refused = |status: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "coordinator_http_requests_refused_total{{listener=\"api\",status=\"{status}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(refused("401") >= 41 && refused("413") >= 4, "{metrics}");
    assert_eq!(c.head().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_on_the_api_is_closed_and_does_not_lock_out_operators() {
    let dir = temp_dir();
    let c = coordinator(dir.path(), CoordinatorOpts::default()).await;
    let api = c.api;
    let started = Instant::now();
    // 200 connections each dribbling a header line every second, never ending the head.
    let dribblers: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(api).await else {
                    return None;
                };
                let t = Instant::now();
                if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
                    .await
                    .is_err()
                {
                    return Some(t.elapsed());
                }
                let mut buf = [0u8; 512];
                loop {
                    // Closed (EOF, reset, or a 408 answer) is what we wait for.
                    match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                        Ok(_) => return Some(t.elapsed()),
                        Err(_) if t.elapsed() > Duration::from_secs(40) => return None,
                        Err(_) => {}
                    }
                    if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                        return Some(t.elapsed());
                    }
                }
            })
        })
        .collect();
    // Meanwhile an operator's request is answered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    let r = raw(
        api,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("healthz during slowloris");
    assert_eq!(r.status, 200);
    let healthz_ms = t.elapsed().as_millis();
    let mut closed = Vec::new();
    let mut open = 0;
    for d in dribblers {
        match d.await.expect("dribbler") {
            Some(t) => closed.push(t),
            None => open += 1,
        }
    }
    let slowest = closed.iter().max().copied().unwrap_or_default();
    eprintln!(
        "slowloris: {} of 200 connections closed, the slowest after {:.1} s; /healthz answered in {healthz_ms} ms meanwhile (test {:.1} s)",
        closed.len(),
        slowest.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        open, 0,
        "{open} slowloris connections still open after 40 s"
    );
    assert!(
        slowest < Duration::from_secs(30),
        "a partial head held a connection for {slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_at_most_max_connections() {
    let dir = temp_dir();
    let c = coordinator(
        dir.path(),
        CoordinatorOpts {
            api_extra: "max_connections = 8\n".into(),
            ..CoordinatorOpts::default()
        },
    )
    .await;
    // Eight kept-alive connections hold every slot.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(c.api).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answered")
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut ninth = TcpStream::connect(c.api).await.expect("connect");
    ninth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 4096];
    let early = tokio::time::timeout(Duration::from_secs(2), ninth.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a ninth connection was served beyond max_connections = 8: {early:?}"
    );
    // One slot freed: the waiting connection is served.
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(5), ninth.read(&mut buf))
        .await
        .expect("served once a slot is free")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}
