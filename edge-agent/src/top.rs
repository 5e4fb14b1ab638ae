//! Shoppers' requests from varnish's own log: the region's most requested pages (a warm
//! job's source) and how each request was served (time, 5xx).
//!
//! `varnishncsa` (through [`crate::command::lines`], killed with the session) prints one
//! line per client request that is not the agent's own: warm fetches carry
//! `X-Warm-Token`, and every request the agent sends has `User-Agent:
//! varnish-coordinator`. Each line is `METHOD STATUS MICROS HOST+URL`: every request
//! goes to [`Served`] (time, 5xx); a GET answered below 400 is also counted by
//! [`TopCounter`] in bounded memory: when it holds twice its capacity it keeps only the
//! top half (a lossy "space-saving" count: exact for URLs that stay popular, approximate
//! at the tail). Every interval the top entries go up as [`TopUrls`]; the coordinator
//! merges them per region.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::edge::{agent_message, AgentMessage, TopUrls, UrlCount};
use tokio::sync::mpsc;

use crate::command;
use crate::served::Served;

/// `varnishncsa -F`: method, status, time to serve (µs), host and URL.
const FORMAT: &str = "%m %s %D %{Host}i%U%q";
/// `varnishncsa -q`: everything but the agent's own requests.
const QUERY: &str =
    "not ReqHeader:X-Warm-Token and not ReqHeader:User-Agent eq \"varnish-coordinator\"";

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged<'a> {
    pub method: &'a str,
    pub status: u16,
    pub micros: u64,
    pub url: &'a str,
}

/// Parses one [`FORMAT`] line (`None` for anything else).
pub fn parse_line(line: &str) -> Option<Logged<'_>> {
    let mut parts = line.trim().splitn(4, ' ');
    Some(Logged {
        method: parts.next()?,
        status: parts.next()?.parse().ok()?,
        micros: parts.next()?.parse().ok()?,
        url: parts.next().unwrap_or(""),
    })
}

/// Distinct URLs counted before pruning to the top half.
const CAPACITY: usize = 4096;
/// Longest URL counted.
const MAX_URL: usize = 2048;

/// A bounded most-frequent counter.
#[derive(Debug, Default)]
pub struct TopCounter {
    counts: HashMap<String, u64>,
}

impl TopCounter {
    pub fn add(&mut self, url: &str) {
        if url.len() > MAX_URL {
            return;
        }
        if let Some(c) = self.counts.get_mut(url) {
            *c += 1;
            return;
        }
        if self.counts.len() >= 2 * CAPACITY {
            let mut all: Vec<(String, u64)> = self.counts.drain().collect();
            all.sort_unstable_by_key(|e| std::cmp::Reverse(e.1));
            all.truncate(CAPACITY);
            self.counts.extend(all);
        }
        self.counts.insert(url.to_owned(), 1);
    }

    /// The `n` most counted, most first (ties by URL, for a stable order).
    pub fn top(&self, n: usize) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> =
            self.counts.iter().map(|(u, c)| (u.clone(), *c)).collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

/// Reads varnishncsa's lines for `instance`: counts every request in `served`, and sends
/// the top `n` URLs every `every` (none when `n` is 0).
pub async fn run(
    varnishncsa: PathBuf,
    instance: Option<PathBuf>,
    n: usize,
    every: Duration,
    served: Served,
    out: mpsc::Sender<AgentMessage>,
) {
    let mut counter = TopCounter::default();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut lines = None;
    loop {
        if lines.is_none() {
            match start(&varnishncsa, instance.as_deref()) {
                Ok(l) => lines = Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "popular URLs unavailable; retrying in 30 s");
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    continue;
                }
            }
        }
        let Some(reader) = lines.as_mut() else {
            continue;
        };
        tokio::select! {
            line = reader.next() => match line {
                Ok(Some(l)) => {
                    if let Some(r) = parse_line(&l) {
                        served.record(r.status, r.micros);
                        if n > 0 && r.method == "GET" && r.status < 400 && !r.url.is_empty() {
                            counter.add(r.url);
                        }
                    }
                }
                Ok(None) | Err(_) => {
                    tracing::warn!("varnishncsa ended; restarting it");
                    lines = None;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            _ = tick.tick() => {
                let urls: Vec<UrlCount> = counter
                    .top(n)
                    .into_iter()
                    .map(|(url, count)| UrlCount { url, count })
                    .collect();
                if urls.is_empty() {
                    continue;
                }
                let msg = AgentMessage { msg: Some(agent_message::Msg::TopUrls(TopUrls { urls })) };
                if out.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn start(
    varnishncsa: &Path,
    instance: Option<&Path>,
) -> Result<command::Lines, command::CommandError> {
    let mut args: Vec<String> = Vec::new();
    if let Some(i) = instance {
        args.push("-n".into());
        args.push(i.display().to_string());
    }
    args.extend(["-F".into(), FORMAT.into(), "-q".into(), QUERY.into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    command::lines(varnishncsa, &args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse() {
        assert_eq!(
            parse_line("GET 200 532 shop.test/p/1?x=2\n"),
            Some(Logged {
                method: "GET",
                status: 200,
                micros: 532,
                url: "shop.test/p/1?x=2"
            })
        );
        assert_eq!(
            parse_line("POST 503 1200 shop.test/checkout").map(|l| l.status),
            Some(503)
        );
        assert_eq!(parse_line("GET x 1 y"), None);
        assert_eq!(parse_line(""), None);
    }

    #[test]
    fn keeps_the_popular_ones_in_bounded_memory() {
        let mut c = TopCounter::default();
        for i in 0..50_000 {
            c.add(&format!("shop/p/{i}"));
            if i % 10 == 0 {
                c.add("shop/");
            }
            if i % 20 == 0 {
                c.add("shop/c/1");
            }
        }
        assert!(c.counts.len() <= 2 * CAPACITY);
        let top = c.top(2);
        assert_eq!(top[0], ("shop/".to_owned(), 5000));
        assert_eq!(top[1].0, "shop/c/1");
        assert_eq!(top[1].1, 2500);
    }
}
