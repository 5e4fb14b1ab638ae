//! Shoppers' requests from varnish's own log: the region's most requested pages (a warm
//! job's source), how each request was served (time, 5xx, hit or miss) and where its
//! client is ([`crate::clients`]).
//!
//! `varnishncsa -c` (through [`crate::command::lines`], killed with the session) prints
//! one line per client request as varnish received it, whatever the VCL does to it
//! later: `METHOD STATUS MICROS HANDLING MARK HOST+URL XFF` (tab-separated; `HANDLING` is
//! `hit`, `miss`, `pass`, `synth` or `pipe`, `MARK` the request's `X-Edge-Agent`). Its
//! query leaves out the project's tools (`User-Agent: varnish-coordinator`, or a warm
//! signature) unless they carry the mark. Each line is then one of ([`Logged::source`]):
//!
//! * the agent's own request (its [`crate::mark`]): its verdict goes to
//!   [`Synthetic`], which subtracts nothing here but tells the coordinator what the
//!   agent's own traffic was;
//! * another mark (another agent's request, relayed by a satellite): ignored;
//! * a shopper's: it goes to [`Served`] (time, 5xx, hit or miss) and the
//!   [`ClientCounter`]; a GET answered below 400 is also counted by [`TopCounter`] in
//!   bounded memory: when it holds twice its capacity it keeps only the top half (a
//!   lossy "space-saving" count: exact for URLs that stay popular, approximate at the
//!   tail).
//!
//! Every interval the top entries go up as [`TopUrls`]; the coordinator merges them per
//! region.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::edge::{agent_message, AgentMessage, TopUrls, UrlCount};
use tokio::sync::mpsc;

use crate::clients::ClientCounter;
use crate::command;
use crate::mark::Mark;
use crate::served::Served;
use crate::synthetic::Synthetic;

/// `varnishncsa -F`: method, status, time to serve (µs), how varnish handled it, the
/// agent's mark, host and URL, and `X-Forwarded-For` last (it may hold spaces),
/// separated by tabs.
pub const FORMAT: &str =
    "%m\t%s\t%D\t%{Varnish:handling}x\t%{X-Edge-Agent}i\t%{Host}i%U%q\t%{X-Forwarded-For}i";
/// `varnishncsa -q`: every request but the project's tools' (a standalone warmer, a
/// satellite's fetches through its shield), unless marked. A query matches the header
/// as the client sent it even when the VCL unsets it.
pub const QUERY: &str = "ReqHeader:X-Edge-Agent or not (ReqHeader:X-Warm-Sig or ReqHeader:User-Agent eq \"varnish-coordinator\")";

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged<'a> {
    pub method: &'a str,
    pub status: u16,
    pub micros: u64,
    /// `hit`, `miss`, `pass`, `synth` or `pipe` (`-` if varnish logged none).
    pub handling: &'a str,
    pub hit: bool,
    /// `X-Edge-Agent` (`-` when absent).
    pub mark: &'a str,
    pub url: &'a str,
    /// `X-Forwarded-For` (`-` when absent).
    pub forwarded: &'a str,
}

/// Whose request a logged line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Shopper,
    /// This agent's own (its mark).
    Own,
    /// Someone else's mark: not a shopper's, not this agent's.
    Marked,
}

/// Parses one [`FORMAT`] line (`None` for anything else).
pub fn parse_line(line: &str) -> Option<Logged<'_>> {
    let mut parts = line.trim_end_matches(['\r', '\n']).splitn(7, '\t');
    let method = parts.next()?;
    let status = parts.next()?.parse().ok()?;
    let micros = parts.next()?.parse().ok()?;
    let handling = parts.next()?;
    Some(Logged {
        method,
        status,
        micros,
        handling,
        hit: handling == "hit",
        mark: parts.next()?.trim(),
        url: parts.next().unwrap_or(""),
        forwarded: parts.next().unwrap_or("-").trim(),
    })
}

impl Logged<'_> {
    /// Whose request this is, for an agent whose mark is `mark`.
    pub fn source(&self, mark: &Mark) -> Source {
        if self.mark == "-" || self.mark.is_empty() {
            Source::Shopper
        } else if mark.is_own(self.mark) {
            Source::Own
        } else {
            Source::Marked
        }
    }
}

/// What the log reader reports, and how often.
#[derive(Debug, Clone)]
pub struct Reports {
    /// Most requested URLs to report (0: none).
    pub top_urls: usize,
    pub top_every: Duration,
    /// Client networks to report (0: none).
    pub client_nets: usize,
    pub clients_every: Duration,
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

/// Reads varnishncsa's lines for `instance`: counts every shopper's request in `served`
/// and the agent's own in `synthetic`, and sends the top URLs and the client networks as
/// `reports` says.
pub async fn run(
    varnishncsa: PathBuf,
    instance: Option<PathBuf>,
    reports: Reports,
    served: Served,
    synthetic: Synthetic,
    out: mpsc::Sender<AgentMessage>,
) {
    let mark = crate::mark::own();
    let n = reports.top_urls;
    let mut counter = TopCounter::default();
    let mut clients = ClientCounter::default();
    let mut tick = tokio::time::interval(reports.top_every);
    tick.tick().await;
    let mut clients_tick = tokio::time::interval(reports.clients_every);
    clients_tick.tick().await;
    let mut lines = None;
    loop {
        if lines.is_none() {
            match start(&varnishncsa, instance.as_deref()) {
                Ok(l) => {
                    // From now on shoppers' figures and the agent's verdicts come from
                    // the log (a request made before varnishncsa attached is missed,
                    // never miscounted).
                    synthetic.set_logged(true);
                    lines = Some(l);
                }
                Err(e) => {
                    synthetic.set_logged(false);
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
                    let Some(r) = parse_line(&l) else { continue };
                    match r.source(mark) {
                        Source::Own => synthetic.record_logged(r.handling),
                        Source::Marked => {}
                        Source::Shopper => {
                            served.record(r.status, r.micros, r.handling);
                            if reports.client_nets > 0 {
                                clients.add(r.forwarded, r.hit);
                            }
                            if n > 0 && r.method == "GET" && r.status < 400 && !r.url.is_empty() {
                                counter.add(r.url);
                            }
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
            _ = clients_tick.tick() => {
                let Some(nets) = clients.take(reports.client_nets) else { continue };
                let msg = AgentMessage { msg: Some(agent_message::Msg::ClientNets(nets)) };
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
    args.extend([
        "-c".into(),
        "-F".into(),
        FORMAT.into(),
        "-q".into(),
        QUERY.into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    command::lines(varnishncsa, &args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse() {
        assert_eq!(
            parse_line("GET\t200\t532\thit\t-\tshop.test/p/1?x=2\t81.2.69.142, 127.0.0.1\n"),
            Some(Logged {
                method: "GET",
                status: 200,
                micros: 532,
                handling: "hit",
                hit: true,
                mark: "-",
                url: "shop.test/p/1?x=2",
                forwarded: "81.2.69.142, 127.0.0.1",
            })
        );
        let post = parse_line("POST\t503\t1200\tpass\t-\tshop.test/checkout\t-").expect("line");
        assert_eq!((post.status, post.hit, post.forwarded), (503, false, "-"));
        assert_eq!(post.handling, "pass");
        assert_eq!(parse_line("GET\tx\t1\thit\t-\ty\t-"), None);
        assert_eq!(parse_line("GET\t200\t1\thit"), None, "no mark field");
        assert_eq!(parse_line(""), None);
        // A synthetic answer varnish logged without a status.
        assert_eq!(parse_line("PURGE\t-\t3644\tpipe\t-\tx/\t-"), None);
    }

    #[test]
    fn own_lines_are_told_from_shoppers_by_the_mark_alone() {
        let mark = Mark::new();
        let (_, own) = mark.header(crate::mark::Kind::Probe);
        let line = |m: &str| format!("GET\t200\t90\thit\t{m}\tshop.test/health_check.php\t-");
        let source = |m: &str| parse_line(&line(m)).map(|l| l.source(&mark));
        assert_eq!(source(&own), Some(Source::Own));
        assert_eq!(source("-"), Some(Source::Shopper));
        assert_eq!(
            source(&Mark::new().header(crate::mark::Kind::Warm).1),
            Some(Source::Marked)
        );
        assert_eq!(
            source("probe"),
            Some(Source::Marked),
            "a forged mark is not own"
        );
        // Whatever the VCL answered (no cache-debug header at all), the log's handling
        // is the verdict.
        let l = parse_line("GET\t200\t90\tmiss\t-\tshop.test/\t-").expect("line");
        assert_eq!((l.handling, l.hit), ("miss", false));
    }

    #[test]
    fn the_format_and_query_read_the_mark() {
        assert!(FORMAT.contains("%{X-Edge-Agent}i") && FORMAT.contains("%{Varnish:handling}x"));
        assert_eq!(FORMAT.matches('\t').count(), 6, "seven fields");
        assert!(QUERY.starts_with("ReqHeader:X-Edge-Agent or "));
        assert_eq!(crate::mark::HEADER, "X-Edge-Agent");
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
