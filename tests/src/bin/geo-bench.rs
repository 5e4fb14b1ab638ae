//! `geo-bench`: geo routing decisions per second and their latency, three ways:
//! in-process ([`coordinator::geo::Geo::route`] on one thread: a MaxMind lookup plus the
//! decision), over `GET /api/v1/route` on loopback (the real binary, keep-alive
//! connections), and through a real PowerDNS (`pdns_server` with the remote backend,
//! caches off) with DNS queries carrying an EDNS client subnet, sent by a tiny UDP client
//! in this file (the product has no DNS client).
//!
//! ```sh
//! cargo run --release -p tests --bin geo-bench
//! cargo run --release -p tests --bin geo-bench -- --database /var/lib/GeoIP/GeoLite2-City.mmdb
//! ```
//!
//! Clients are drawn from a fixed mix: addresses the database places (London, Sweden,
//! Washington, China, Japan over IPv6) and addresses it does not (private and unknown).
//! MaxMind's test database is small (shallow tree); a real GeoLite2-City is ~70 MB and
//! its lookups walk ~2x deeper, so `--database` measures a real one when you have it.

// The test harness starts real programs (varnishd, the binaries, chromium, pdns) by design.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use coordinator::edges::EdgeView;
use coordinator::geo::{Geo, GeoConfig, RegionPoint};
use coordinator::monitor::{Health, RegionFacts, RegionHealth};
use tests::{percentiles_line, CoordinatorOpts, CoordinatorProc, Pdns};
use tokio::io::BufReader;

#[derive(Debug, Parser)]
struct Args {
    /// MaxMind database (default: MaxMind's GeoIP2-City test database in tests/data).
    #[arg(long)]
    database: Option<PathBuf>,
    /// In-process decisions.
    #[arg(long, default_value_t = 1_000_000)]
    decisions: usize,
    /// Requests per API client.
    #[arg(long, default_value_t = 5_000)]
    api_requests: usize,
    /// DNS queries per client.
    #[arg(long, default_value_t = 2_000)]
    dns_queries: usize,
    /// Concurrent API and DNS clients for the throughput figures.
    #[arg(long, default_value_t = 4)]
    clients: usize,
}

const CLIENTS: [&str; 8] = [
    "81.2.69.142",
    "89.160.20.112",
    "216.160.83.56",
    "175.16.199.1",
    "2001:218::1",
    "2a02:d3c0::7",
    "10.1.2.3",
    "1.1.1.1",
];

fn regions() -> Vec<RegionPoint> {
    [
        ("eu-west", 53.35, -6.26, "198.51.100.10"),
        ("us-east", 38.9, -77.04, "198.51.100.20"),
        ("us-west", 47.6, -122.3, "198.51.100.30"),
        ("ap-northeast", 35.68, 139.69, "198.51.100.40"),
        ("ap-southeast", 1.35, 103.82, "198.51.100.50"),
    ]
    .iter()
    .map(|(n, lat, lon, a)| RegionPoint {
        name: n.to_string(),
        lat: *lat,
        lon: *lon,
        addresses: vec![a.parse().expect("address")],
    })
    .collect()
}

fn regions_toml() -> String {
    regions()
        .iter()
        .map(|r| {
            format!(
                "\n[[regions]]\nname = \"{}\"\nlat = {}\nlon = {}\naddresses = [\"{}\"]\n",
                r.name, r.lat, r.lon, r.addresses[0]
            )
        })
        .collect()
}

fn in_process(database: &PathBuf, n: usize) {
    let config: GeoConfig = toml::from_str(&format!(
        "database = {database:?}\ndefault_region = \"eu-west\""
    ))
    .expect("geo config");
    let geo = Geo::open(config, None, regions()).expect("open database");
    // Every region healthy and in sync, as the coordinator's tick would observe.
    let health: BTreeMap<String, RegionHealth> = regions()
        .iter()
        .map(|r| {
            let h = RegionHealth {
                health: Health::Up,
                diagnosis: None,
                check: None,
                last_error: None,
            };
            (r.name.clone(), h)
        })
        .collect();
    let facts: BTreeMap<String, RegionFacts> = health
        .into_iter()
        .map(|(name, h)| {
            let edge = EdgeView::new(&format!("{name}-1"), &name);
            let facts = RegionFacts::of(h, &[&edge]);
            (name, facts)
        })
        .collect();
    geo.observe(&facts, 0.0);
    let ips: Vec<IpAddr> = CLIENTS.iter().map(|s| s.parse().expect("ip")).collect();
    // Warm up, then throughput over n decisions on this one thread.
    let mut sink = 0usize;
    for i in 0..10_000 {
        sink += geo.route(ips[i % ips.len()]).candidates.len();
    }
    let started = Instant::now();
    for i in 0..n {
        sink += geo.route(ips[i % ips.len()]).candidates.len();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "in-process decisions (1 thread)               n={n} {:.0} decisions/s",
        n as f64 / secs
    );
    let mut ms = Vec::with_capacity(100_000);
    for i in 0..100_000 {
        let t = Instant::now();
        sink += geo.route(ips[i % ips.len()]).candidates.len();
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!("{}", percentiles_line("in-process decision latency", ms));
    std::hint::black_box(sink);
}

async fn api_client(api: SocketAddr, n: usize, offset: usize) -> Vec<f64> {
    let stream = tokio::net::TcpStream::connect(api).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut reader = BufReader::new(stream);
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let path = format!("/api/v1/route?ip={}", CLIENTS[(i + offset) % CLIENTS.len()]);
        let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
        let t = Instant::now();
        let status = tests::exchange_keepalive(&mut reader, req.as_bytes())
            .await
            .expect("route request");
        assert_eq!(status, 200);
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms
}

/// A DNS query for `www.shop.test A` with an EDNS client subnet option for `client`.
fn dns_query(id: u16, client: IpAddr) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x00, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]); // no RD; 1 question, 1 additional
    for label in ["www", "shop", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]); // root, A, IN
    let (family, addr): (u16, Vec<u8>) = match client {
        IpAddr::V4(v4) => (1, v4.octets().to_vec()),
        IpAddr::V6(v6) => (2, v6.octets().to_vec()),
    };
    let prefix = (addr.len() * 8) as u8;
    let option_len = 4 + addr.len() as u16;
    // OPT RR: root name, type 41, UDP size 1232, no extended flags, rdata = ECS option.
    q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0]);
    q.extend_from_slice(&(4 + option_len).to_be_bytes());
    q.extend_from_slice(&8u16.to_be_bytes()); // option code: client subnet
    q.extend_from_slice(&option_len.to_be_bytes());
    q.extend_from_slice(&family.to_be_bytes());
    q.extend_from_slice(&[prefix, 0]);
    q.extend_from_slice(&addr);
    q
}

async fn dns_client(server: SocketAddr, n: usize, offset: usize) -> Vec<f64> {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp");
    sock.connect(server).await.expect("connect");
    let mut buf = [0u8; 1500];
    let mut ms = Vec::with_capacity(n);
    let placed: Vec<IpAddr> = CLIENTS[..6]
        .iter()
        .map(|s| s.parse().expect("ip"))
        .collect();
    for i in 0..n {
        let id = (i as u16).wrapping_add(offset as u16 * 7919);
        let query = dns_query(id, placed[(i + offset) % placed.len()]);
        let t = Instant::now();
        sock.send(&query).await.expect("send");
        loop {
            let got = tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf))
                .await
                .expect("DNS answer within 5 s")
                .expect("recv");
            // Same id, NOERROR, one answer.
            if got >= 12 && buf[..2] == id.to_be_bytes() {
                assert_eq!(buf[3] & 0x0f, 0, "rcode");
                assert_eq!(u16::from_be_bytes([buf[6], buf[7]]), 1, "one answer");
                break;
            }
        }
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms
}

async fn concurrently<F, Fut>(clients: usize, n: usize, run: F) -> (f64, Vec<f64>)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Vec<f64>> + Send + 'static,
{
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients).map(|c| tokio::spawn(run(c))).collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    ((clients * n) as f64 / started.elapsed().as_secs_f64(), all)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let database = args.database.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/geoip/GeoIP2-City-Test.mmdb")
    });
    println!("database: {}", database.display());
    in_process(&database, args.decisions);

    let dir = tests::temp_dir();
    let extra = format!(
        "[geo]\ndatabase = {database:?}\ndefault_region = \"eu-west\"\n[dns]\nlisten = \"{{dns}}\"\nzone = \"shop.test.\"\nnames = [\"www\"]\n{}",
        regions_toml()
    );
    let c = CoordinatorProc::start(
        &dir.path().join("coordinator"),
        &CoordinatorOpts {
            extra,
            insecure: true,
            ..CoordinatorOpts::default()
        },
    )
    .await;
    let api = c.api;
    // Warm up, then one client (latency) and several (throughput).
    api_client(api, 500, 0).await;
    let ms = api_client(api, args.api_requests, 0).await;
    println!(
        "{}",
        percentiles_line("GET /api/v1/route, 1 keep-alive client", ms)
    );
    let n = args.api_requests;
    let (rate, ms) = concurrently(args.clients, n, |i| api_client(api, n, i)).await;
    println!(
        "{}  {rate:.0} req/s",
        percentiles_line(&format!("GET /api/v1/route, {} clients", args.clients), ms)
    );

    let pdns = Pdns::start(&dir.path().join("pdns"), c.dns.expect("dns backend")).await;
    let server = pdns.addr;
    dns_client(server, 200, 0).await;
    let ms = dns_client(server, args.dns_queries, 0).await;
    println!(
        "{}",
        percentiles_line("pdns www A +subnet (caches off), 1 client", ms)
    );
    let n = args.dns_queries;
    let (rate, ms) = concurrently(args.clients, n, |i| dns_client(server, n, i)).await;
    println!(
        "{}  {rate:.0} queries/s",
        percentiles_line(&format!("pdns www A +subnet, {} clients", args.clients), ms)
    );
}
