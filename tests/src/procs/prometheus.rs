//! A real Prometheus (Debian's `prometheus` package) scraping test targets every second,
//! with rule files loaded ([`Prometheus`]), and `promtool` ([`promtool`]): what the
//! shipped alert rules and the Grafana dashboard's queries are checked against.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use coordinator_cli::demo::process::{self, Child};
use serde_json::Value;

use super::host::{free_port, lo};
use crate::http::raw;

/// Panics unless `program` (`prometheus` or `promtool`) is installed.
pub fn require_prometheus(program: &str) {
    super::host::require_program(program, "--version", "prometheus package");
}

/// Runs `promtool args...` in `dir`: its exit status and output (stdout then stderr).
pub fn promtool(dir: &Path, args: &[&str]) -> (bool, String) {
    require_prometheus("promtool");
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// One Prometheus on a loopback port, its TSDB in `dir`; killed on drop.
pub struct Prometheus {
    pub addr: SocketAddr,
    pub child: Child,
}

impl Prometheus {
    /// Scrapes `targets` (`host:port`, `/metrics`) as job `coordinator` every second and
    /// evaluates `rule_files` every second.
    pub async fn start(dir: &Path, targets: &[SocketAddr], rule_files: &[PathBuf]) -> Self {
        require_prometheus("prometheus");
        std::fs::create_dir_all(dir).expect("prometheus dir");
        let quoted = |items: Vec<String>| {
            items
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\n\
             scrape_configs:\n  - job_name: coordinator\n    static_configs:\n      - targets: [{}]\n",
            quoted(rule_files.iter().map(|p| p.display().to_string()).collect()),
            quoted(targets.iter().map(ToString::to_string).collect()),
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let addr = lo(free_port());
        let args: Vec<String> = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
            "--log.level=warn".into(),
        ];
        let child = process::spawn(
            Path::new("prometheus"),
            &args,
            &dir.join("prometheus.log"),
            "prometheus",
        )
        .expect("spawn prometheus");
        let p = Prometheus { addr, child };
        crate::assert_eventually!(
            20,
            p.get("/-/ready")
                .await
                .is_some_and(|(status, _)| status == 200),
            "prometheus not ready; log in {}",
            dir.join("prometheus.log").display()
        );
        p
    }

    /// `GET path` as HTTP/1.0 (so no chunked body): the status and body, `None` when
    /// the connection fails.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        let r = raw(self.addr, request.as_bytes()).await.ok()?;
        Some((r.status, r.body))
    }

    /// `/api/v1/query` of `expr` at the current time: the whole answer (`status`,
    /// `data.result`, or `errorType` and `error`).
    pub async fn query(&self, expr: &str) -> Value {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        match self.get(&path).await {
            Some((_, body)) => serde_json::from_str(&body).unwrap_or(Value::String(body)),
            None => Value::Null,
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn percent_encoding_keeps_only_unreserved_characters() {
        assert_eq!(
            super::percent_encode("rate(x{a=\"b c\"}[5m]) / 2"),
            "rate%28x%7Ba%3D%22b%20c%22%7D%5B5m%5D%29%20%2F%202"
        );
    }
}
