//! A real PowerDNS ([`Pdns`]) serving what the coordinator's DNS remote backend answers,
//! every cache off, and `dig` to ask it ([`dig`], [`dig_full`]).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use coordinator_cli::demo::process::{self, Child};

use super::host::{free_port, lo};

/// Panics unless PowerDNS with its remote backend and dig are installed.
pub fn require_pdns() {
    let ok = |program: &str, arg: &str| {
        std::process::Command::new(program)
            .arg(arg)
            .output()
            .map(|o| o.status.success() || !o.stdout.is_empty() || !o.stderr.is_empty())
            .unwrap_or(false)
    };
    let backend = [
        "/usr/lib/x86_64-linux-gnu/pdns",
        "/usr/lib/aarch64-linux-gnu/pdns",
        "/usr/lib/pdns",
    ]
    .iter()
    .any(|d| Path::new(d).join("libremotebackend.so").exists());
    assert!(
        ok("pdns_server", "--version") && backend && ok("dig", "-v"),
        "PowerDNS is not installed: these tests need Debian's pdns-server, pdns-backend-remote and bind9-dnsutils (run scripts/test.sh, which installs them)"
    );
}

/// A real `pdns_server` on a free loopback port, serving what the remote backend at
/// `backend` (`http://ADDR/dns`) answers, with every cache off and EDNS client subnet on.
pub struct Pdns {
    pub addr: SocketAddr,
    pub child: Child,
}

impl Pdns {
    pub async fn start(dir: &Path, backend: SocketAddr) -> Self {
        require_pdns();
        std::fs::create_dir_all(dir).expect("pdns dir");
        let mut last = String::new();
        for _ in 0..3 {
            let addr = lo(free_port());
            let conf = format!(
                "launch=remote\nremote-connection-string=http:url=http://{backend}/dns,timeout=2000\n\
                 local-address=127.0.0.1\nlocal-port={}\nsocket-dir={}\nsecurity-poll-suffix=\n\
                 edns-subnet-processing=yes\ncache-ttl=0\nquery-cache-ttl=0\nnegquery-cache-ttl=0\n\
                 zone-cache-refresh-interval=0\ndisable-syslog=yes\nloglevel=4\n",
                addr.port(),
                dir.display()
            );
            std::fs::write(dir.join("pdns.conf"), conf).expect("pdns.conf");
            let args = vec![
                format!("--config-dir={}", dir.display()),
                "--daemon=no".into(),
                "--guardian=no".into(),
            ];
            let log = dir.join("pdns.log");
            let mut child = process::spawn(Path::new("pdns_server"), &args, &log, "pdns_server")
                .expect("spawn pdns_server");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Some(status) = child.try_status() {
                    last = format!(
                        "pdns_server exited ({status}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                // Any answer at all (dig exits 0) means it is serving.
                if !dig_full(
                    addr,
                    &["+tries=1", "+time=1", "version.bind", "TXT", "CH"],
                    None,
                )
                .await
                .is_empty()
                {
                    return Pdns { addr, child };
                }
                if Instant::now() > deadline {
                    last = format!(
                        "pdns_server did not answer: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    child.kill9().await;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("{last}");
    }
}

/// `dig @addr NAME TYPE +short [+subnet=S]`: the answer lines (empty on any failure).
pub async fn dig(addr: SocketAddr, name: &str, qtype: &str, subnet: Option<&str>) -> Vec<String> {
    let mut args = vec![name, qtype, "+short", "+tries=1", "+time=2"];
    let subnet_arg = subnet.map(|s| format!("+subnet={s}"));
    if let Some(s) = &subnet_arg {
        args.push(s);
    }
    dig_full(addr, &args, None).await
}

/// `dig @addr ARGS...` output lines (empty on any failure); `port` overrides addr's.
pub async fn dig_full(addr: SocketAddr, args: &[&str], port: Option<u16>) -> Vec<String> {
    let mut cmd = tokio::process::Command::new("dig");
    cmd.arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(port.unwrap_or(addr.port()).to_string())
        .args(args)
        .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(10), cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.trim().is_empty())
            .collect(),
        _ => Vec::new(),
    }
}
