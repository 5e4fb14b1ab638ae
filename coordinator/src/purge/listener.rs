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
//! Hardening: a connection from outside the allow-list (and not from a trusted proxy)
//! gets one second to send its head, then 405 and close, so strangers cannot hold
//! connection slots (slowloris). Behind a proxy, `X-Forwarded-For` is believed only when
//! the peer is in `trusted_proxies`: all its lines joined, the client is the rightmost
//! untrusted hop, and a malformed hop a trusted proxy wrote is a 400 ([`client_ip`]). An
//! optional shared secret header is checked in constant time after the allow-list. The
//! request heads follow [`crate::http_head`]'s strict rules; a purge header given twice
//! is a 400 ([`parse`]), a secret header given twice counts as a wrong secret (403).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::counters::PurgeCounters;
use super::log::{NewPurge, PurgeLog};
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
}

/// How long a source outside the allow-list may take to send its head.
const STRANGER_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

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
    while let Some((stream, peer, permit)) =
        crate::accept::next(&listener, &slots, &shutdown, "purge").await
    {
        let (config, log, metrics, shutdown) = (
            config.clone(),
            log.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            serve_conn(stream, peer, &config, &log, &metrics, &shutdown).await;
            drop(permit);
        });
    }
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    config: &ListenerConfig,
    log: &PurgeLog,
    metrics: &PurgeCounters,
    shutdown: &CancellationToken,
) {
    let via_proxy = is_allowed(&config.trusted_proxies, peer.ip());
    let peer_allowed = is_allowed(&config.allow, peer.ip());
    let mut limits = config.limits;
    if !peer_allowed && !via_proxy {
        limits.head_timeout = limits.head_timeout.min(STRANGER_HEAD_TIMEOUT);
        limits.idle_timeout = limits.idle_timeout.min(STRANGER_HEAD_TIMEOUT);
    }
    let mut conn = Conn::new(stream, limits);
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
            handle(&request, config.patterns, log, metrics).await
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

async fn handle(
    request: &Request,
    patterns: pattern::Policy,
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
    let ops = match parse(request, patterns) {
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
            op: op.into_proto(),
            soft,
        })
        .collect();
    match log.append(purges).await {
        Ok(seq) => {
            metrics.request("accepted");
            for kind in &kinds {
                metrics.logged(kind);
            }
            tracing::debug!(seq, kinds = ?kinds, soft, "purge logged");
            (
                200,
                format!("{{\"seq\":{seq}}}"),
                vec![("X-Purge-Seq", seq.to_string())],
            )
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
