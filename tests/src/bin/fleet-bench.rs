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
//! for mutual TLS with a certificate per simulated edge. `--etcd` runs two coordinators
//! sharing one purge log in a real etcd (a 3-member cluster on loopback), half the
//! sessions on each and the purges sent to each in turn, so every delivery to the other
//! half went through etcd's watch.

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
    /// Each session streams varnish counters this often (0: none), as agents do.
    #[arg(long, default_value_t = 5)]
    stats_interval_s: u64,
    /// After the purges, kill -9 the coordinator, restart it, and time every session's
    /// reconnect (jittered, as agents back off).
    #[arg(long)]
    restart: bool,
    /// After the paced purges, this many seconds of a storm: `--storm-clients` clients
    /// purging as fast as they can, Magento-style (a new connection per PURGE), then the
    /// same with keep-alive connections; reports durable purges/s accepted (0: none).
    #[arg(long, default_value_t = 0)]
    storm_s: u64,
    #[arg(long, default_value_t = 16)]
    storm_clients: usize,
    /// Two coordinators on a shared etcd log instead of one on the embedded store.
    #[arg(long)]
    etcd: bool,
}

/// PURGEs answered 200 per second by `clients` clients for `secs`, each on a new
/// connection per PURGE (`keep_alive` false, as Magento does) or on one kept open.
///
/// The clients run on [`STORM_THREADS`] threads of their own, each with its own runtime,
/// as a load generator in another process would: on the simulator's runtime they would
/// queue behind the thousand simulated sessions' tasks and measure the simulator.
async fn storm(purge: std::net::SocketAddr, clients: usize, secs: u64, keep_alive: bool) -> f64 {
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let threads: Vec<_> = (0..STORM_THREADS)
        .map(|t| {
            let mine: Vec<usize> = (0..clients).filter(|k| k % STORM_THREADS == t).collect();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("storm runtime");
                rt.block_on(async move {
                    let tasks: Vec<_> = mine
                        .into_iter()
                        .map(|k| tokio::spawn(storm_client(purge, k, until, keep_alive)))
                        .collect();
                    let mut ok = 0;
                    for t in tasks {
                        ok += t.await.unwrap_or(0);
                    }
                    ok
                })
            })
        })
        .collect();
    let total: u64 = tokio::task::spawn_blocking(move || {
        threads.into_iter().map(|t| t.join().unwrap_or(0)).sum()
    })
    .await
    .unwrap_or(0);
    total as f64 / started.elapsed().as_secs_f64().max(secs as f64)
}

/// Threads the storm's clients run on.
const STORM_THREADS: usize = 2;

/// One storm client: PURGEs one after the other until `until`; returns how many got 200.
async fn storm_client(
    purge: std::net::SocketAddr,
    k: usize,
    until: Instant,
    keep_alive: bool,
) -> u64 {
    let mut ok = 0u64;
    let mut i = 0u64;
    let mut conn: Option<tokio::io::BufReader<tokio::net::TcpStream>> = None;
    while Instant::now() < until {
        i += 1;
        let pattern = tags_pattern(&[&format!("storm_{k}_{i}")]);
        if !keep_alive {
            if let Ok(r) = raw(purge, &magento_purge(&pattern)).await {
                ok += u64::from(r.status == 200);
            }
            continue;
        }
        if conn.is_none() {
            let Ok(s) = tokio::net::TcpStream::connect(purge).await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            conn = Some(tokio::io::BufReader::new(s));
        }
        let Some(c) = conn.as_mut() else { continue };
        let req =
            format!("PURGE / HTTP/1.1\r\nHost: c\r\nX-Magento-Tags-Pattern: {pattern}\r\n\r\n");
        match tests::exchange_keepalive(c, req.as_bytes()).await {
            Ok(status) => ok += u64::from(status == 200),
            Err(_) => conn = None,
        }
    }
    ok
}

/// What a simulated edge keeps across its sessions (as an agent's cursor file does).
#[derive(Debug, Default)]
struct Cursor {
    log_id: String,
    applied: u64,
    full_bans: u64,
}

/// Full-jitter backoff with the agent's constants (100 ms base, 10 s cap).
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(100)
        .saturating_mul(1u32 << attempt.min(16))
        .min(Duration::from_secs(10));
    Duration::from_secs_f64(rand::random::<f64>() * cap.as_secs_f64())
}

/// The coordinator's CPU time so far (user + system, seconds), from /proc.
fn cpu_s(pid: Option<u32>) -> f64 {
    let Some(pid) = pid else { return 0.0 };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
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

/// One simulated edge for the whole run: a session, and a jittered reconnect whenever it
/// ends (resuming from its cursor), until aborted.
fn simulate(
    c: &CoordinatorProc,
    id: usize,
    received: Received,
    cursor: Arc<Mutex<Cursor>>,
    stats_every: Option<Duration>,
) -> tokio::task::JoinHandle<()> {
    let grpc = c.grpc;
    let tls = c.agent_tls(&format!("sim-{id}"), &format!("region-{}", id % 3));
    tokio::spawn(async move {
        let mut attempt = 0u32;
        loop {
            let welcomed = session(grpc, tls.clone(), id, &received, &cursor, stats_every)
                .await
                .unwrap_or(false);
            attempt = if welcomed { 0 } else { attempt + 1 };
            tokio::time::sleep(backoff(attempt)).await;
        }
    })
}

/// One session until it ends; whether it got a Welcome (`Err`: the dial or handshake
/// failed).
async fn session(
    grpc: std::net::SocketAddr,
    tls: Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)>,
    id: usize,
    received: &Received,
    cursor: &Arc<Mutex<Cursor>>,
    stats_every: Option<Duration>,
) -> Result<bool, String> {
    let edge = format!("sim-{id}");
    let region = format!("region-{}", id % 3);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{grpc}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true);
    if let Some((ca, cert, key)) = tls {
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
    let (log_id, applied) = {
        let c = cursor.lock().unwrap_or_else(|p| p.into_inner());
        (c.log_id.clone(), c.applied)
    };
    let hello = Hello {
        edge_id: edge,
        region,
        capabilities: vec![
            proto::CAP_FULL_BAN.to_owned(),
            proto::CAP_PURGE_RANGES.to_owned(),
        ],
        report_interval_ms: 60_000,
        log_id,
        applied_seq: applied,
        ..Hello::default()
    };
    let send = |msg| AgentMessage { msg: Some(msg) };
    out.send(send(agent_message::Msg::Hello(hello)))
        .await
        .map_err(|e| e.to_string())?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| e.to_string())?;
    let mut inbound = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            tonic::codegen::http::uri::PathAndQuery::from_static("/edge.v1.Coordinator/Session"),
            sim::Codec,
        )
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let mut welcomed = false;
    let mut log_id = String::new();
    let mut stats = stats_every.map(|every| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let started = std::time::SystemTime::now();
    let mut requests = 0u64;
    loop {
        let tick = async {
            match stats.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let m = tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(m)) => m,
                _ => return Ok(welcomed),
            },
            _ = tick => {
                // Counters as an agent streams them: cumulative, a few requests more each time.
                requests += 50;
                let uptime = started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
                let sample = proto::edge::VarnishStats {
                    taken_at_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0),
                    uptime_s: uptime + 1,
                    requests,
                    hits: requests * 9 / 10,
                    misses: requests / 10,
                    objects: 1000,
                    ..Default::default()
                };
                if out.send(send(agent_message::Msg::Stats(sample))).await.is_err() {
                    return Ok(welcomed);
                }
                continue;
            }
        };
        let now = Instant::now();
        let ack = match m {
            sim::Inbound::Other(m) => match m.msg {
                Some(coordinator_message::Msg::Welcome(w)) => {
                    welcomed = true;
                    log_id = w.log_id.clone();
                    cursor.lock().unwrap_or_else(|p| p.into_inner()).log_id = w.log_id;
                    None
                }
                Some(coordinator_message::Msg::FullBan(b)) => {
                    cursor.lock().unwrap_or_else(|p| p.into_inner()).full_bans += 1;
                    Some(b.up_to_seq)
                }
                _ => None,
            },
            sim::Inbound::Purges { recorded, last } => {
                if !recorded.is_empty() {
                    let mut r = received.lock().unwrap_or_else(|p| p.into_inner());
                    r.extend(recorded.into_iter().map(|seq| (seq, now)));
                }
                last
            }
        };
        if let Some(seq) = ack {
            cursor.lock().unwrap_or_else(|p| p.into_inner()).applied = seq;
            let ack = PurgeAck {
                applied_seq: seq,
                log_id: log_id.clone(),
            };
            if out.send(send(agent_message::Msg::Ack(ack))).await.is_err() {
                return Ok(welcomed);
            }
        }
    }
}

/// The simulator's side of the wire. A real fleet decodes every entry on its own
/// machines; here a thousand sessions share the coordinator's two cores, so the
/// simulator only walks a batch's wire format for the sequence numbers (the last one to
/// ack, the first [`RECORDED`] to time) without building the entries. Everything else is
/// decoded by prost as an agent does.
mod sim {
    use bytes::{Buf, Bytes};
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    use prost::Message;
    use proto::edge::{AgentMessage, CoordinatorMessage};
    use tonic::codec::{DecodeBuf, EncodeBuf};
    use tonic::Status;

    /// A message from the coordinator, as the simulator needs it.
    pub enum Inbound {
        /// A purge batch: the sequences to time, and the last one to ack.
        Purges {
            recorded: Vec<u64>,
            last: Option<u64>,
        },
        Other(CoordinatorMessage),
    }

    #[derive(Debug, Default, Clone, Copy)]
    pub struct Codec;

    impl tonic::codec::Codec for Codec {
        type Encode = AgentMessage;
        type Decode = Inbound;
        type Encoder = Codec;
        type Decoder = Codec;
        fn encoder(&mut self) -> Codec {
            Codec
        }
        fn decoder(&mut self) -> Codec {
            Codec
        }
    }

    impl tonic::codec::Encoder for Codec {
        type Item = AgentMessage;
        type Error = Status;
        fn encode(&mut self, item: AgentMessage, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            item.encode(buf)
                .map_err(|e| Status::internal(e.to_string()))
        }
    }

    impl tonic::codec::Decoder for Codec {
        type Item = Inbound;
        type Error = Status;
        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Inbound>, Status> {
            let bytes = buf.copy_to_bytes(buf.remaining());
            let bad = |e: prost::DecodeError| Status::internal(e.to_string());
            match purges(bytes.clone()).map_err(bad)? {
                Some(p) => Ok(Some(p)),
                None => Ok(Some(Inbound::Other(
                    CoordinatorMessage::decode(bytes).map_err(bad)?,
                ))),
            }
        }
    }

    /// `CoordinatorMessage.purges` (field 2) → the sequences its entries stand for (`seq`,
    /// field 1 of each `PurgeBatch.entries`, field 1, from `first_seq`, field 9, for a
    /// range entry); `None` for any other message.
    fn purges(mut msg: Bytes) -> Result<Option<Inbound>, prost::DecodeError> {
        let (tag, wire) = decode_key(&mut msg)?;
        if tag != 2 || wire != WireType::LengthDelimited {
            return Ok(None);
        }
        let len = decode_varint(&mut msg)? as usize;
        let mut batch = msg.split_to(len.min(msg.len()));
        let (mut recorded, mut last) = (Vec::new(), None);
        while batch.has_remaining() {
            let (tag, wire) = decode_key(&mut batch)?;
            if tag != 1 || wire != WireType::LengthDelimited {
                skip_field(wire, tag, &mut batch, DecodeContext::default())?;
                continue;
            }
            let len = decode_varint(&mut batch)? as usize;
            let mut entry = batch.split_to(len.min(batch.len()));
            let (mut seq, mut first) = (None, None);
            while entry.has_remaining() {
                let (tag, wire) = decode_key(&mut entry)?;
                match (tag, wire) {
                    (1, WireType::Varint) => seq = Some(decode_varint(&mut entry)?),
                    (9, WireType::Varint) => first = Some(decode_varint(&mut entry)?),
                    _ => skip_field(wire, tag, &mut entry, DecodeContext::default())?,
                }
            }
            let Some(seq) = seq else { continue };
            // A range entry stands for first_seq..=seq.
            let first = first.filter(|f| *f != 0 && *f < seq).unwrap_or(seq);
            recorded.extend(first..=seq.min(super::RECORDED));
            last = Some(seq);
        }
        Ok(Some(Inbound::Purges { recorded, last }))
    }
}

/// Waits until the coordinator counts `n` connected edges (at most 120 s after `since`).
async fn wait_connected(c: &CoordinatorProc, n: usize, since: Instant) {
    while c
        .edges()
        .await
        .iter()
        .filter(|e| e["connected"] == true)
        .count()
        < n
    {
        assert!(
            since.elapsed() < Duration::from_secs(120),
            "only {} of {n} sessions connected",
            c.edges()
                .await
                .iter()
                .filter(|e| e["connected"] == true)
                .count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    assert!(
        !(args.etcd && args.tls),
        "--etcd runs plaintext gRPC (one PKI per coordinator)"
    );
    for &n in &args.sessions {
        let dir = tests::temp_dir();
        let etcd = if args.etcd {
            Some(tests::EtcdCluster::start(&dir.path().join("etcd"), 3).await)
        } else {
            None
        };
        let mut cs = Vec::new();
        for id in if args.etcd {
            &["c1", "c2"][..]
        } else {
            &["c1"][..]
        } {
            let extra = match &etcd {
                Some(e) => format!(
                    "[store]\nbackend = \"etcd\"\nendpoints = {}\nid = \"{id}\"\n",
                    e.endpoints_toml()
                ),
                None => String::new(),
            };
            cs.push(
                CoordinatorProc::start(
                    &dir.path().join(id),
                    &CoordinatorOpts {
                        insecure: !args.tls,
                        extra,
                        ..CoordinatorOpts::default()
                    },
                )
                .await,
            );
        }
        let received: Vec<Received> = (0..n).map(|_| Received::default()).collect();
        let stats_every =
            (args.stats_interval_s > 0).then(|| Duration::from_secs(args.stats_interval_s));
        let connecting = Instant::now();
        let cursors: Vec<Arc<Mutex<Cursor>>> = (0..n).map(|_| Arc::default()).collect();
        let tasks: Vec<_> = received
            .iter()
            .zip(&cursors)
            .enumerate()
            .map(|(i, (r, cur))| {
                simulate(&cs[i % cs.len()], i, r.clone(), cur.clone(), stats_every)
            })
            .collect();
        // Every coordinator shows the whole fleet (the others' edges through their API).
        for c in &cs {
            wait_connected(c, n, connecting).await;
        }
        let c = &cs[0];
        let connect_s = connecting.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_connected = rss_kib(c.child.pid());
        let cpu_before = cpu_s(c.child.pid());
        let purging = Instant::now();
        let mut answer_ms = Vec::new();
        let mut sent = Vec::new();
        for i in 0..args.purges {
            let pattern = tags_pattern(&[&format!("cat_p_{i}")]);
            let t = Instant::now();
            let r = raw(cs[i % cs.len()].purge, &magento_purge(&pattern))
                .await
                .expect("purge");
            answer_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(r.status, 200, "{}", r.body);
            let seq = r.json()["seq"].as_u64().expect("seq");
            sent.push((seq, t));
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let cpu_share = (cpu_s(c.child.pid()) - cpu_before) / purging.elapsed().as_secs_f64();
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
        println!(
            "{n} sessions (connected in {connect_s:.1} s){}:",
            if args.etcd {
                ", 2 coordinators on etcd, figures for c1"
            } else {
                ""
            }
        );
        println!(
            "  coordinator CPU during the purges: {:.0}% of one core",
            cpu_share * 100.0
        );
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
        if args.storm_s > 0 {
            for keep_alive in [false, true] {
                let (cpu, own) = (cpu_s(c.child.pid()), cpu_s(Some(std::process::id())));
                let t = Instant::now();
                let rate = storm(c.purge, args.storm_clients, args.storm_s, keep_alive).await;
                let secs = t.elapsed().as_secs_f64();
                let share = (cpu_s(c.child.pid()) - cpu) / secs;
                let own = (cpu_s(Some(std::process::id())) - own) / secs;
                println!(
                    "  storm, {} clients, {}: {rate:.0} durable purges/s accepted with {n} sessions (coordinator {:.0}% of a core, {:.0} µs per purge; clients and simulator {:.0}%)",
                    args.storm_clients,
                    if keep_alive { "keep-alive" } else { "a new connection per PURGE" },
                    share * 100.0,
                    share * 1e6 / rate.max(1.0),
                    own * 100.0
                );
            }
            // Let the sessions drain the storm before anything else is measured.
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        if args.restart && n > 0 {
            let c = &mut cs[0];
            c.kill9_and_restart().await;
            let restarted = Instant::now();
            wait_connected(c, n, restarted).await;
            println!(
                "  kill -9 and restart: all {n} reconnected {:.1} s after the restart",
                restarted.elapsed().as_secs_f64()
            );
            // The first full ban is a new edge's; another one would be a needless flush.
            let needless = cursors
                .iter()
                .filter(|c| c.lock().unwrap_or_else(|p| p.into_inner()).full_bans > 1)
                .count();
            println!("  sessions given a full ban on reconnect: {needless} (resumed from their cursor: {})", n - needless);
            let rss_restarted = rss_kib(c.child.pid());
            println!(
                "  coordinator RSS after the reconnect: {} MiB",
                rss_restarted / 1024
            );
            for t in tasks {
                t.abort();
            }
        } else {
            for t in tasks {
                t.abort();
            }
        }
    }
}
