//! `fleet-bench`: Magento's PURGE answer and the fan-out with a big fleet on one
//! coordinator. The real `coordinator` binary; the edges are an in-process simulator that
//! speaks the real protocol over real sockets (one HTTP/2 connection per edge): Hello,
//! then an ack for every batch the moment it arrives.
//!
//! ```sh
//! cargo run --release -p tests --bin fleet-bench -- --sessions 0,100,1000
//! ```
//!
//! For each fleet size: the latency of Magento-style PURGEs (a new connection each, one
//! after the other), and the delivery delay from sending a PURGE to each session
//! receiving its entry, with the share of deliveries later than 30 ms (Nagle's 40 ms
//! shows there). Plaintext gRPC by default (where `TCP_NODELAY` matters most); `--tls`
//! for mutual TLS with a certificate per simulated edge.

// The test harness starts real programs (varnishd, the binaries, chromium) by design.
#![allow(clippy::disallowed_methods)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use proto::edge::{agent_message, coordinator_message, AgentMessage, Hello, PurgeAck};
use tests::{magento_purge, raw, tags_pattern, CoordinatorOpts, CoordinatorProc};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, Parser)]
struct Args {
    /// Fleet sizes to measure, one coordinator each.
    #[arg(long, default_value = "0,100,1000", value_delimiter = ',')]
    sessions: Vec<usize>,
    /// Sequential purges per fleet size.
    #[arg(long, default_value_t = 400)]
    purges: usize,
    /// Pause between purges.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Mutual TLS (a certificate per simulated edge) instead of plaintext.
    #[arg(long)]
    tls: bool,
}

/// Deliveries recorded per session (the first ones; a long run only counts memory).
const RECORDED: u64 = 2_000;

/// The coordinator's resident memory (KiB), from /proc.
fn rss_kib(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// When each session received each sequence.
type Received = Arc<Mutex<Vec<(u64, Instant)>>>;

async fn simulate(
    c: &CoordinatorProc,
    id: usize,
    received: Received,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let edge = format!("sim-{id}");
    let region = format!("region-{}", id % 3);
    let scheme = if c.pki.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", c.grpc))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true);
    if let Some((ca, cert, key)) = c.agent_tls(&edge, &region) {
        let read = |p| std::fs::read(p).map_err(|e| e.to_string());
        endpoint = endpoint
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read(ca)?))
                    .identity(Identity::from_pem(read(cert)?, read(key)?)),
            )
            .map_err(|e| e.to_string())?;
    }
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let (out, rx) = mpsc::channel(64);
    let hello = Hello {
        edge_id: edge,
        region,
        capabilities: vec![proto::CAP_FULL_BAN.to_owned()],
        report_interval_ms: 60_000,
        ..Hello::default()
    };
    let send = |msg| AgentMessage { msg: Some(msg) };
    out.send(send(agent_message::Msg::Hello(hello)))
        .await
        .map_err(|e| e.to_string())?;
    let mut inbound = proto::CoordinatorClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    Ok(tokio::spawn(async move {
        let mut log_id = String::new();
        while let Ok(Some(m)) = inbound.message().await {
            let now = Instant::now();
            let ack = match m.msg {
                Some(coordinator_message::Msg::Welcome(w)) => {
                    log_id = w.log_id;
                    None
                }
                Some(coordinator_message::Msg::FullBan(b)) => Some(b.up_to_seq),
                Some(coordinator_message::Msg::Purges(batch)) => {
                    let mut r = received.lock().unwrap_or_else(|p| p.into_inner());
                    r.extend(
                        batch
                            .entries
                            .iter()
                            .filter(|e| e.seq <= RECORDED)
                            .map(|e| (e.seq, now)),
                    );
                    batch.entries.last().map(|e| e.seq)
                }
                _ => None,
            };
            if let Some(seq) = ack {
                let ack = PurgeAck {
                    applied_seq: seq,
                    log_id: log_id.clone(),
                };
                if out.send(send(agent_message::Msg::Ack(ack))).await.is_err() {
                    return;
                }
            }
        }
    }))
}

fn summary(name: &str, ms: Vec<f64>) {
    println!("  {}", tests::percentiles_line(name, ms));
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    println!(
        "fleet-bench: {} purges per size, {} ms apart, {} gRPC",
        args.purges,
        args.interval_ms,
        if args.tls { "mutual TLS" } else { "plaintext" }
    );
    for &n in &args.sessions {
        let dir = tests::temp_dir();
        let c = CoordinatorProc::start(
            &dir.path().join("coordinator"),
            &CoordinatorOpts {
                insecure: !args.tls,
                ..CoordinatorOpts::default()
            },
        )
        .await;
        let received: Vec<Received> = (0..n).map(|_| Received::default()).collect();
        let mut tasks = Vec::new();
        let connecting = Instant::now();
        for (i, r) in received.iter().enumerate() {
            match simulate(&c, i, r.clone()).await {
                Ok(t) => tasks.push(t),
                Err(e) => panic!("session {i}: {e}"),
            }
        }
        while c
            .edges()
            .await
            .iter()
            .filter(|e| e["connected"] == true)
            .count()
            < n
        {
            assert!(
                connecting.elapsed() < Duration::from_secs(120),
                "sessions did not connect"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_connected = rss_kib(c.child.pid());
        let mut answer_ms = Vec::new();
        let mut sent = Vec::new();
        for i in 0..args.purges {
            let pattern = tags_pattern(&[&format!("cat_p_{i}")]);
            let t = Instant::now();
            let r = raw(c.purge, &magento_purge(&pattern)).await.expect("purge");
            answer_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(r.status, 200, "{}", r.body);
            let seq = r.json()["seq"].as_u64().expect("seq");
            sent.push((seq, t));
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sent_at: std::collections::HashMap<u64, Instant> = sent.into_iter().collect();
        let mut delivery_ms = Vec::new();
        for r in &received {
            for (seq, at) in r.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                if let Some(t) = sent_at.get(seq) {
                    delivery_ms.push(at.saturating_duration_since(*t).as_secs_f64() * 1000.0);
                }
            }
        }
        let expected = n * args.purges.min(RECORDED as usize);
        let late = delivery_ms.iter().filter(|d| **d > 30.0).count();
        let rss_after = rss_kib(c.child.pid());
        println!("{n} sessions:");
        println!(
            "  coordinator RSS: {} MiB connected, {} MiB after {} purges ({} KiB per session)",
            rss_connected / 1024,
            rss_after / 1024,
            args.purges,
            if n > 0 { rss_after / n as u64 } else { 0 }
        );
        summary("Magento PURGE answered", answer_ms);
        if n > 0 {
            println!(
                "  deliveries {} of {expected}; later than 30 ms: {late} ({:.2}%)",
                delivery_ms.len(),
                100.0 * late as f64 / delivery_ms.len().max(1) as f64
            );
            summary("PURGE sent -> entry at a session", delivery_ms);
        }
        for t in tasks {
            t.abort();
        }
    }
}
