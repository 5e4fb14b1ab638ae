//! The purge listener: Magento's only `http-cache-hosts` target.
//!
//! Each connection is read with [`wire::Conn`]; each request is checked against the CIDR
//! allow-list, parsed into [`PurgeOp`]s and appended to the [`PurgeLog`]. Magento gets
//! `200 {"seq": N}` only once the entry is durable, `400` with a reason for input it
//! cannot use, `405` for a source outside the allow-list, `503` when the log cannot
//! write (a full disk): never a `200` for something that is not on disk.
//!
//! The listener never waits on an edge; its latency is the log's group-commit latency.
//!
//! Hardening: a connection from outside the allow-list (and not from a trusted proxy) is
//! answered 405 the moment it is accepted, before anything is read, and closed; it never
//! takes one of the `max_connections` slots, which only allowed sources and trusted
//! proxies use, so strangers cannot slow an allowed client (slowloris, a connection
//! flood). Refusing a stranger is bounded too ([`STRANGER_SLOTS`] at once, each at most
//! [`STRANGER_LINGER`]; beyond that the socket is dropped unanswered) and logged at most
//! once per ten seconds with the count. An allowed connection waits for a slot when all
//! are busy (as many as `max_connections` may wait; more get 503). Behind a proxy,
//! `X-Forwarded-For` is believed only when the peer is in `trusted_proxies`: all its lines
//! joined, the client is the rightmost untrusted hop, and a malformed hop a trusted proxy
//! wrote is a 400 ([`client_ip`]). An optional shared secret header is checked in constant
//! time after the allow-list. The request heads follow [`crate::http_head`]'s strict
//! rules; a purge header given twice is a 400 ([`parse`]), a secret header given twice
//! counts as a wrong secret (403).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::counters::PurgeCounters;
use super::log::{Appended, NewPurge, PurgeLog};
use super::pattern::{self, PurgeOp};
use super::wire::{Conn, Limits, Request};

/// What the listener needs besides its socket.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub allow: Vec<IpNet>,
    pub limits: Limits,
    pub max_connections: usize,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// `(header name, value)` every purge must carry, if configured.
    pub secret: Option<(String, String)>,
    /// Which patterns beyond Magento's own are accepted (`[purge] allow_regex`).
    pub patterns: pattern::Policy,
    /// Tag purges are logged soft, to be refreshed (`[purge] refresh_tags`).
    pub refresh_tags: bool,
}

/// Strangers being answered at once, at most; more are dropped unanswered.
pub const STRANGER_SLOTS: usize = 256;
/// How long answering a stranger may take, writing the 405 and reading (discarding)
/// what it sent so the close does not reset the answer away.
pub const STRANGER_LINGER: Duration = Duration::from_millis(250);

/// The answer a stranger gets without being read.
const STRANGER_405: &[u8] = b"HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\nContent-Length: 47\r\nConnection: close\r\n\r\n{\"error\":\"this source is not allowed to purge\"}";

/// [`run`] on a thread and runtime of its own: the agents' sessions (a thousand tasks
/// woken by every commit) never stand in the queue ahead of Magento's purges; the kernel
/// shares the CPU between this thread and the main runtime's workers. Resolves when the
/// listener has stopped.
pub fn run_dedicated(
    listener: TcpListener,
    config: ListenerConfig,
    log: PurgeLog,
    metrics: PurgeCounters,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let listener = listener.into_std()?;
    let (done_tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("purge-listener".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            match runtime {
                Ok(rt) => rt.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => run(l, config, log, metrics, shutdown).await,
                        Err(e) => tracing::error!(error = %e, "purge listener cannot start"),
                    }
                }),
                Err(e) => tracing::error!(error = %e, "purge listener runtime cannot start"),
            }
            let _ = done_tx.send(());
        })?;
    Ok(done)
}

/// Accepts connections until `shutdown`, then lets in-flight requests finish.
pub async fn run(
    listener: TcpListener,
    config: ListenerConfig,
    log: PurgeLog,
    metrics: PurgeCounters,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let waiting = Arc::new(Semaphore::new(config.max_connections));
    let strangers = Arc::new(Semaphore::new(STRANGER_SLOTS));
    let refusals = crate::accept::Refusals::new(crate::accept::REFUSALS_LOG_INTERVAL);
    while let Some((stream, peer)) =
        crate::accept::next_unslotted(&listener, &shutdown, "purge").await
    {
        let trusted =
            is_allowed(&config.allow, peer.ip()) || is_allowed(&config.trusted_proxies, peer.ip());
        if !trusted {
            metrics.request("forbidden");
            let answering = strangers.clone().try_acquire_owned();
            let reason = if answering.is_ok() {
                "stranger"
            } else {
                "stranger_dropped"
            };
            if let Some(counts) = refusals.count(reason) {
                tracing::warn!(peer = %peer, refused = %crate::accept::describe(&counts),
                    "purge connections from sources outside the allow-list refused (counts since the last line)");
            }
            if let Ok(permit) = answering {
                tokio::spawn(refuse_stranger(stream, permit));
            }
            continue;
        }
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => Slot::Now(slot),
            Err(_) => match waiting.clone().try_acquire_owned() {
                Ok(place) => Slot::Wait(slots.clone(), place),
                Err(_) => {
                    metrics.request("unavailable");
                    if let Some(counts) = refusals.count("busy") {
                        tracing::warn!(peer = %peer, refused = %crate::accept::describe(&counts),
                            "purge listener busy: every connection slot and waiting place taken");
                    }
                    tokio::spawn(refuse_busy(stream));
                    continue;
                }
            },
        };
        let (config, log, metrics, shutdown) = (
            config.clone(),
            log.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let permit = match slot {
                Slot::Now(p) => p,
                Slot::Wait(slots, place) => {
                    let p = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        p = slots.acquire_owned() => p,
                    };
                    drop(place);
                    match p {
                        Ok(p) => p,
                        Err(_) => return,
                    }
                }
            };
            serve_conn(stream, peer, &config, &log, &metrics, &shutdown).await;
            drop(permit);
        });
    }
}

/// An allowed connection's slot: free now, or a place in the queue for one.
enum Slot {
    Now(OwnedSemaphorePermit),
    Wait(Arc<Semaphore>, OwnedSemaphorePermit),
}

/// Writes the 405 without reading the request, then discards what the stranger sent for
/// a moment (so closing does not reset the answer away) and closes; at most
/// [`STRANGER_LINGER`] in all.
async fn refuse_stranger(mut stream: TcpStream, permit: OwnedSemaphorePermit) {
    let _ = tokio::time::timeout(STRANGER_LINGER, async {
        stream.write_all(STRANGER_405).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
    drop(permit);
}

/// 503 for an allowed source when every slot and waiting place is taken.
async fn refuse_busy(mut stream: TcpStream) {
    let body = error_body("too many connections; try again");
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(STRANGER_LINGER, stream.write_all(answer.as_bytes())).await;
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    config: &ListenerConfig,
    log: &PurgeLog,
    metrics: &PurgeCounters,
    shutdown: &CancellationToken,
) {
    // Only allowed peers and trusted proxies get here ([`run`] answers the others).
    let mut conn = Conn::new(stream, config.limits);
    loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = conn.next_request() => r,
        };
        let request = match request {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                metrics.request("bad_request");
                tracing::info!(peer = %peer, error = %e, "unusable purge request");
                if let Some(status) = e.status() {
                    let _ = conn
                        .respond(status, &error_body(&e.to_string()), &[], false)
                        .await;
                }
                return;
            }
        };
        let client = match client_ip(&request, peer.ip(), &config.trusted_proxies) {
            Ok(ip) => ip,
            Err(reason) => {
                metrics.request("bad_request");
                tracing::info!(peer = %peer, error = %reason, "unusable X-Forwarded-For");
                let _ = conn.respond(400, &error_body(&reason), &[], false).await;
                return;
            }
        };
        let allowed = is_allowed(&config.allow, client);
        let (status, body, headers) = if !allowed {
            metrics.request("forbidden");
            tracing::warn!(peer = %peer, client = %client, "purge from a source outside the allow-list");
            (
                405,
                error_body(&format!("source {client} is not allowed to purge")),
                vec![],
            )
        } else if !secret_ok(config.secret.as_ref(), &request) {
            metrics.request("forbidden");
            tracing::warn!(peer = %peer, client = %client, "purge without the right shared secret");
            (
                403,
                error_body("missing or wrong purge secret header"),
                vec![],
            )
        } else {
            handle(&request, config, log, metrics).await
        };
        let keep_alive = request.keep_alive && allowed && status != 405 && status != 403;
        if conn
            .respond(status, &body, &headers, keep_alive)
            .await
            .is_err()
            || !keep_alive
        {
            return;
        }
    }
}

/// Whether `op` is logged soft: Magento asked (`X-Magento-Purge-Soft`), or refresh mode
/// keeps a tag purge's pages, stale, for the refresh; a full flush, a pool and an opaque
/// regex stay hard there.
fn logged_soft(op: &PurgeOp, asked: bool, refresh_tags: bool) -> bool {
    asked || (refresh_tags && matches!(op, PurgeOp::Tags(_)))
}

async fn handle(
    request: &Request,
    config: &ListenerConfig,
    log: &PurgeLog,
    metrics: &PurgeCounters,
) -> (u16, String, Vec<(&'static str, String)>) {
    if !request.method.eq_ignore_ascii_case("PURGE") {
        metrics.request("bad_method");
        return (
            405,
            error_body("only PURGE is accepted here"),
            vec![("Allow", "PURGE".to_owned())],
        );
    }
    let ops = match parse(request, config.patterns) {
        Ok(ops) => ops,
        Err(reason) => {
            metrics.request("bad_request");
            tracing::info!(error = %reason, "purge refused");
            return (400, error_body(&reason), vec![]);
        }
    };
    let soft = request
        .header("x-magento-purge-soft")
        .is_some_and(|v| matches!(v.trim_ascii(), b"1" | b"true" | b"yes"));
    let kinds: Vec<&'static str> = ops.iter().map(PurgeOp::kind).collect();
    let purges = ops
        .into_iter()
        .map(|op| NewPurge {
            soft: logged_soft(&op, soft, config.refresh_tags),
            op: op.into_proto(),
        })
        .collect();
    match log.append_outcome(purges).await {
        Ok(appended) => {
            metrics.request("accepted");
            for kind in &kinds {
                metrics.logged(kind);
            }
            match appended {
                Appended::Logged(seq) => {
                    tracing::debug!(seq, kinds = ?kinds, soft, "purge logged");
                    (
                        200,
                        format!("{{\"seq\":{seq}}}"),
                        vec![("X-Purge-Seq", seq.to_string())],
                    )
                }
                Appended::Spooled(id) => {
                    tracing::debug!(spool_id = id, kinds = ?kinds, soft, "purge spooled");
                    (
                        200,
                        format!("{{\"seq\":0,\"spooled\":true,\"spool_id\":{id}}}"),
                        vec![("X-Purge-Spooled", "1".to_owned())],
                    )
                }
            }
        }
        Err(e) => {
            metrics.request("unavailable");
            tracing::error!(error = %e, "purge not logged");
            (
                503,
                error_body(&e.to_string()),
                vec![("Retry-After", "1".to_owned())],
            )
        }
    }
}

/// The operations a PURGE asks for: one per header present, like Magento's stock VCL;
/// `patterns` says whether opaque regexes are taken ([`pattern`]). A header that appears
/// twice is refused: which copy counts would be a guess.
pub fn parse(request: &Request, patterns: pattern::Policy) -> Result<Vec<PurgeOp>, String> {
    let single = |name| request.single(name).map_err(|e| e.to_string());
    let tags = single("x-magento-tags-pattern")?;
    let pool = single("x-pool")?;
    single("x-magento-purge-soft")?;
    if tags.is_none() && pool.is_none() {
        return Err("X-Magento-Tags-Pattern or X-Pool header required (single-URL purges go through the API)".into());
    }
    let mut ops = Vec::new();
    if let Some(raw) = tags {
        ops.push(pattern::parse_tags_pattern(raw, patterns).map_err(|e| e.to_string())?);
    }
    if let Some(raw) = pool {
        ops.push(pattern::parse_pool(raw, patterns).map_err(|e| e.to_string())?);
    }
    Ok(ops)
}

/// Who sent the request. The peer itself, unless it is a trusted proxy: then every
/// `X-Forwarded-For` line, joined in order, is walked from the right, skipping trusted
/// proxies, and the first hop that is not one is the client (all trusted: the leftmost).
/// Hops left of it were written by the client and are never looked at; a hop that a
/// trusted proxy wrote and that is not a plain IP address is an error (a 400), never a
/// reason to fall back to the proxy's own address.
pub fn client_ip(request: &Request, peer: IpAddr, trusted: &[IpNet]) -> Result<IpAddr, String> {
    if !is_allowed(trusted, peer) {
        return Ok(peer);
    }
    let Some(joined) = request.joined("x-forwarded-for") else {
        return Ok(peer);
    };
    let text = std::str::from_utf8(&joined)
        .map_err(|_| "X-Forwarded-For from a trusted proxy is not ASCII".to_owned())?;
    let mut last = peer;
    for hop in text.rsplit(',') {
        let hop = hop.trim_matches([' ', '\t']);
        let ip: IpAddr = hop.parse().map_err(|_| {
            format!("X-Forwarded-For from a trusted proxy holds {hop:?}, not an IP address")
        })?;
        last = ip;
        if !is_allowed(trusted, ip) {
            return Ok(ip);
        }
    }
    Ok(last)
}

fn secret_ok(secret: Option<&(String, String)>, request: &Request) -> bool {
    let Some((name, expected)) = secret else {
        return true;
    };
    // Two copies of the secret header are no secret: refused like a wrong one.
    let given = request.single(name).ok().flatten().unwrap_or_default();
    crate::secret::constant_time_eq(given, expected.as_bytes())
}

fn is_allowed(allow: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    allow.iter().any(|net| net.contains(&ip))
}

/// `{"error": "..."}` with proper JSON escaping.
pub fn error_body(reason: &str) -> String {
    serde_json::json!({ "error": reason }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_mode_logs_tag_purges_soft_and_keeps_flushes_and_pools_hard() {
        let tags = PurgeOp::Tags(["cat_p_1".to_owned()].into());
        let pool = PurgeOp::PoolRegex("p".into());
        assert!(!logged_soft(&tags, false, false));
        assert!(logged_soft(&tags, true, false));
        assert!(logged_soft(&tags, false, true));
        assert!(!logged_soft(&PurgeOp::All, false, true));
        assert!(!logged_soft(&pool, false, true));
        assert!(!logged_soft(&PurgeOp::TagsRegex("^x".into()), false, true));
        assert!(
            logged_soft(&PurgeOp::All, true, true),
            "Magento's own soft purge stays soft"
        );
    }

    #[test]
    fn the_strangers_answer_is_a_complete_response() {
        let text = std::str::from_utf8(STRANGER_405).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 405 "));
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }

    #[tokio::test]
    async fn a_stranger_is_answered_before_it_sends_anything_and_takes_no_slot() {
        let dir = tempfile::tempdir().unwrap();
        let log = PurgeLog::open(
            dir.path(),
            crate::purge::log::Retention {
                max_entries: 1000,
                max_age: Duration::from_secs(3600),
            },
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ListenerConfig {
            allow: vec!["127.0.0.1/32".parse().unwrap()],
            limits: Limits::default(),
            max_connections: 1,
            trusted_proxies: vec![],
            secret: None,
            patterns: Default::default(),
            refresh_tags: false,
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(run(
            listener,
            config,
            log,
            PurgeCounters::default(),
            shutdown.clone(),
        ));
        // An allowed client holds the only slot, silent.
        let _holder = TcpStream::connect(addr).await.unwrap();
        let mut strangers = Vec::new();
        for _ in 0..20 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            strangers.push(socket.connect(addr).await.unwrap());
        }
        for mut s in strangers {
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_millis(900), s.read_to_end(&mut answer))
                .await
                .expect("answered and closed within the second")
                .unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 405 "), "{answer:?}");
        }
        shutdown.cancel();
    }

    #[test]
    fn allow_list_handles_mapped_v6() {
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert!(is_allowed(&allow, "127.0.0.1".parse().unwrap()));
        assert!(is_allowed(&allow, "::ffff:127.0.0.5".parse().unwrap()));
        assert!(!is_allowed(&allow, "10.1.1.1".parse().unwrap()));
    }

    fn head(extra: &str) -> Request {
        let raw = format!("PURGE / HTTP/1.1\r\nHost: c\r\n{extra}\r\n");
        crate::http_head::parse(raw.as_bytes()).unwrap()
    }

    #[test]
    fn forwarded_for_is_read_right_to_left_past_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let ip = |s: &str| Ok(s.parse::<IpAddr>().unwrap());
        let xff = |v: &str| head(&format!("X-Forwarded-For: {v}\r\n"));
        // Client-supplied hops on the left are not believed.
        assert_eq!(
            client_ip(&xff("1.2.3.4, 192.0.2.7, 10.0.0.2"), proxy, &trusted),
            ip("192.0.2.7")
        );
        assert_eq!(
            client_ip(&xff("192.0.2.7"), proxy, &trusted),
            ip("192.0.2.7")
        );
        assert_eq!(
            client_ip(&xff("10.0.0.3, 10.0.0.2"), proxy, &trusted),
            ip("10.0.0.3")
        );
        // Garbage the client wrote, left of the real client, does not matter...
        assert_eq!(
            client_ip(&xff("garbage, 192.0.2.7"), proxy, &trusted),
            ip("192.0.2.7")
        );
        // ...but a malformed hop a trusted proxy wrote is an error, not the proxy's address.
        assert!(client_ip(&xff("garbage, 10.0.0.2"), proxy, &trusted).is_err());
        assert!(client_ip(&xff("192.0.2.7:5555"), proxy, &trusted).is_err());
        assert!(client_ip(&xff("192.0.2.7,"), proxy, &trusted).is_err());
        // No header: the proxy itself; a peer that is no proxy is never overridden.
        assert_eq!(client_ip(&head(""), proxy, &trusted), Ok(proxy));
        let outsider: IpAddr = "192.0.2.99".parse().unwrap();
        assert_eq!(
            client_ip(&xff("127.0.0.1"), outsider, &trusted),
            Ok(outsider)
        );
    }

    #[test]
    fn forwarded_for_lines_are_joined_in_order() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        // The client sent the first line itself; the proxy appended the second.
        let req = head("X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-For: 192.0.2.7\r\n");
        assert_eq!(
            client_ip(&req, proxy, &trusted),
            Ok("192.0.2.7".parse().unwrap())
        );
        let req = head("X-Forwarded-For: 192.0.2.7, 10.0.0.9\r\nX-Forwarded-For: 10.0.0.3\r\n");
        assert_eq!(
            client_ip(&req, proxy, &trusted),
            Ok("192.0.2.7".parse().unwrap())
        );
        let req = head("X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-For: nonsense\r\n");
        assert!(client_ip(&req, proxy, &trusted).is_err());
    }

    #[test]
    fn duplicate_purge_headers_are_refused() {
        let parse = |r| parse(&r, pattern::Policy::default());
        let err = parse(head(
            "X-Magento-Tags-Pattern: ((^|,)a(,|$))\r\nX-Magento-Tags-Pattern: .*\r\n",
        ))
        .unwrap_err();
        assert!(err.contains("more than once"), "{err}");
        assert!(parse(head("X-Pool: a\r\nX-Pool: b\r\n")).is_err());
        assert!(parse(head(
            "X-Pool: a\r\nX-Magento-Purge-Soft: 1\r\nX-Magento-Purge-Soft: 0\r\n"
        ))
        .is_err());
        assert!(parse(head("X-Pool: a\r\n")).is_ok());
    }
}
