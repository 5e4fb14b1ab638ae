//! Bounded accepting, shared by the purge listener and the gRPC mutual-TLS front.
//!
//! A connection is taken off the socket only once one of a fixed number of slots is free,
//! so at most that many are being served (or handshaken) and the rest wait in the
//! kernel's backlog; the slot travels with the connection and frees itself on drop. A
//! failing `accept` (out of file descriptors, say) backs off briefly instead of spinning,
//! is counted per listener ([`errors`], process-wide: `coordinator_accept_errors_total`)
//! and logged at most every ten seconds with the count since the last line.
//!
//! Listeners that must tell sources apart before they spend a slot on them take
//! connections with [`next_unslotted`] (the same back-off and counting, no slot) and
//! decide per peer: the purge listener answers strangers at once and keeps its slots for
//! allowed sources; the gRPC port admits each handshake through [`Handshakes`], a cap on
//! handshakes in progress per source address and in total, so a flood from one address
//! is refused at once instead of queueing everyone else behind it. [`Refusals`] counts
//! refused connections by reason and logs them at most once per interval, with the
//! counts, so a flood cannot flood the log.

use daemon::sync::Recover;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// The next connection (with `TCP_NODELAY` set) and its slot; `None` on shutdown.
pub async fn next(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    shutdown: &CancellationToken,
    what: &'static str,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = tokio::select! {
        _ = shutdown.cancelled() => return None,
        p = slots.clone().acquire_owned() => p.ok()?,
    };
    let (stream, peer) = next_unslotted(listener, shutdown, what).await?;
    Some((stream, peer, permit))
}

/// The next connection (with `TCP_NODELAY` set) without waiting for a slot; `None` on
/// shutdown. Failing accepts back off and are counted as in [`next`].
pub async fn next_unslotted(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    what: &'static str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return Some((stream, peer));
            }
            Err(e) => {
                if let Some(since_last) = count_error(what) {
                    tracing::warn!(error = %e, listener = what, failures = since_last,
                        "accept failing (out of file descriptors? raise LimitNOFILE)");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One listener's failed accepts.
struct Failures {
    listener: &'static str,
    total: u64,
    since_logged: u64,
    logged_at: Option<Instant>,
}

static ERRORS: Mutex<Vec<Failures>> = Mutex::new(Vec::new());

/// Counts one failure; returns how many to report when a log line is due.
fn count_error(what: &'static str) -> Option<u64> {
    let mut all = ERRORS.locked();
    let i = match all.iter().position(|e| e.listener == what) {
        Some(i) => i,
        None => {
            all.push(Failures {
                listener: what,
                total: 0,
                since_logged: 0,
                logged_at: None,
            });
            all.len() - 1
        }
    };
    let entry = &mut all[i];
    entry.total += 1;
    entry.since_logged += 1;
    if entry
        .logged_at
        .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
    {
        return None;
    }
    entry.logged_at = Some(Instant::now());
    Some(std::mem::take(&mut entry.since_logged))
}

/// Failed accepts per listener since the process started.
pub fn errors() -> Vec<(&'static str, u64)> {
    let all = ERRORS.locked();
    all.iter().map(|e| (e.listener, e.total)).collect()
}

/// How long a plaintext gRPC client may take to send its first bytes (the HTTP/2
/// preface, which a client sends at once) before the connection is dropped.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections from one source address (an IPv6 /64) still being handshaken, at most
/// (`[grpc] handshakes_per_source`'s default).
pub const HANDSHAKES_PER_SOURCE: usize = 32;
/// Connections being handshaken at once, at most, from everyone.
pub const HANDSHAKES_TOTAL: usize = 1024;
/// Refused connections are logged at most once per this, with the counts.
pub const REFUSALS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Accepts plaintext connections into a stream (tonic's incoming) through
/// [`next_unslotted`], so they are counted and backed off like every other listener's.
/// Each connection waits in a task of its own, admitted by [`Handshakes`], until its first
/// bytes arrive (at most [`PREFACE_TIMEOUT`]): a client that connects and says nothing
/// holds no slot anyone else needs and delays nobody.
pub fn incoming(
    listener: TcpListener,
    per_source: usize,
    shutdown: CancellationToken,
    what: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<Result<TcpStream, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let admission = Handshakes::new(per_source, HANDSHAKES_TOTAL);
    let refusals = Arc::new(Refusals::new(REFUSALS_LOG_INTERVAL));
    tokio::spawn(async move {
        while let Some((tcp, peer)) = next_unslotted(&listener, &shutdown, what).await {
            let ticket = match admission.admit(peer.ip()) {
                Ok(t) => t,
                Err(reason) => {
                    refused(&refusals, reason, peer, what);
                    continue;
                }
            };
            let (tx, refusals) = (tx.clone(), refusals.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                let result = tokio::time::timeout(PREFACE_TIMEOUT, tcp.peek(&mut first)).await;
                drop(ticket);
                match result {
                    Ok(Ok(n)) if n > 0 => {
                        let _ = tx.send(Ok(tcp)).await;
                    }
                    Ok(_) => {} // closed or failed before saying anything
                    Err(_) => refused(&refusals, "timeout", peer, what),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn refused(refusals: &Refusals, reason: &'static str, peer: SocketAddr, what: &'static str) {
    if let Some(counts) = refusals.count(reason) {
        tracing::warn!(%peer, listener = what, reason, refused = %describe(&counts),
            "connections refused before their first request (counts since the last line)");
    }
}

/// Refused connections by reason: every one counted, logged at most once per interval.
#[derive(Debug)]
pub struct Refusals {
    interval: Duration,
    state: Mutex<RefusalState>,
}

#[derive(Debug, Default)]
struct RefusalState {
    total: BTreeMap<&'static str, u64>,
    since_logged: BTreeMap<&'static str, u64>,
    logged_at: Option<Instant>,
}

impl Refusals {
    pub fn new(interval: Duration) -> Self {
        Refusals {
            interval,
            state: Mutex::new(RefusalState::default()),
        }
    }

    /// Counts one refusal; when a log line is due (the first, then at most one per
    /// interval), the counts by reason since the last line.
    pub fn count(&self, reason: &'static str) -> Option<Vec<(&'static str, u64)>> {
        let mut s = self.state.locked();
        *s.total.entry(reason).or_default() += 1;
        *s.since_logged.entry(reason).or_default() += 1;
        if s.logged_at.is_some_and(|t| t.elapsed() < self.interval) {
            return None;
        }
        s.logged_at = Some(Instant::now());
        Some(std::mem::take(&mut s.since_logged).into_iter().collect())
    }

    /// Refusals by reason since the start.
    pub fn totals(&self) -> Vec<(&'static str, u64)> {
        let s = self.state.locked();
        s.total.iter().map(|(r, n)| (*r, *n)).collect()
    }
}

/// `reason=count` pairs for a log line.
pub fn describe(counts: &[(&'static str, u64)]) -> String {
    counts
        .iter()
        .map(|(r, n)| format!("{r}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Admission of connections still being handshaken: at most `per_source` from one
/// source (an IPv4 address, an IPv6 /64) and `total` from everyone. A connection over
/// either cap is refused at once (never queued), so one source's flood cannot delay
/// another source's handshake.
#[derive(Debug)]
pub struct Handshakes {
    per_source: usize,
    total: usize,
    state: Mutex<HandshakeState>,
}

#[derive(Debug, Default)]
struct HandshakeState {
    by_source: HashMap<IpAddr, usize>,
    total: usize,
}

/// One admitted handshake; its place is freed on drop.
#[derive(Debug)]
pub struct Ticket {
    owner: Arc<Handshakes>,
    source: IpAddr,
}

/// Why [`Handshakes::admit`] refused (a metric label).
pub const REFUSED_PER_SOURCE: &str = "per_source_cap";
/// Why [`Handshakes::admit`] refused (a metric label).
pub const REFUSED_CAPACITY: &str = "capacity";

impl Handshakes {
    pub fn new(per_source: usize, total: usize) -> Arc<Self> {
        Arc::new(Handshakes {
            per_source: per_source.max(1),
            total: total.max(1),
            state: Mutex::new(HandshakeState::default()),
        })
    }

    /// A place for one more handshake from `ip`, or the reason there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, &'static str> {
        let source = source_key(ip);
        let mut s = self.state.locked();
        if s.total >= self.total {
            return Err(REFUSED_CAPACITY);
        }
        let n = s.by_source.entry(source).or_default();
        if *n >= self.per_source {
            return Err(REFUSED_PER_SOURCE);
        }
        *n += 1;
        s.total += 1;
        Ok(Ticket {
            owner: self.clone(),
            source,
        })
    }

    /// Handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.state.locked().total
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.owner.state.locked();
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.by_source.remove(&self.source);
            }
        }
    }
}

/// The unit a per-source cap counts: an IPv4 address (a mapped one too) or an IPv6 /64,
/// since one host can have a whole /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_capped_per_source_and_in_total() {
        let h = Handshakes::new(2, 3);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t1 = h.admit(a).unwrap();
        let _t2 = h.admit(a).unwrap();
        assert_eq!(h.admit(a).unwrap_err(), REFUSED_PER_SOURCE);
        // The mapped form of the same address is the same source.
        assert_eq!(
            h.admit("::ffff:192.0.2.1".parse().unwrap()).unwrap_err(),
            REFUSED_PER_SOURCE
        );
        let _t3 = h.admit(b).unwrap();
        assert_eq!(h.admit(b).unwrap_err(), REFUSED_CAPACITY);
        drop(t1);
        assert_eq!(h.in_progress(), 2);
        let _t4 = h.admit(a).unwrap();
        // One IPv6 /64 is one source.
        let h = Handshakes::new(1, 10);
        let _v6 = h.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert!(h.admit("2001:db8::ffff:2".parse().unwrap()).is_err());
        assert!(h.admit("2001:db8:0:1::1".parse().unwrap()).is_ok());
    }

    #[tokio::test]
    async fn silent_plaintext_clients_delay_nobody() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let mut stream = incoming(
            listener,
            HANDSHAKES_PER_SOURCE,
            shutdown.clone(),
            "test-grpc",
        );
        // More silent connections from one source than its cap, and a few over it.
        let mut silent = Vec::new();
        for _ in 0..HANDSHAKES_PER_SOURCE + 8 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            silent.push(socket.connect(addr).await.unwrap());
        }
        let started = Instant::now();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let got = tokio::time::timeout(
            Duration::from_secs(1),
            tokio_stream::StreamExt::next(&mut stream),
        )
        .await
        .expect("the talking client is handed over at once");
        let handed = got.unwrap().unwrap();
        assert_eq!(handed.peer_addr().unwrap(), client.local_addr().unwrap());
        assert!(started.elapsed() < Duration::from_secs(1));
        shutdown.cancel();
    }

    #[test]
    fn refusals_are_counted_always_and_logged_once_per_interval() {
        let r = Refusals::new(Duration::from_secs(3600));
        assert_eq!(r.count("timeout"), Some(vec![("timeout", 1)]));
        for _ in 0..1000 {
            assert_eq!(r.count("timeout"), None);
            assert_eq!(r.count(REFUSED_PER_SOURCE), None);
        }
        assert_eq!(
            r.totals(),
            vec![("per_source_cap", 1000), ("timeout", 1001)]
        );
        let r = Refusals::new(Duration::ZERO);
        r.count("a");
        assert_eq!(
            r.count("a"),
            Some(vec![("a", 1)]),
            "counts since the last line"
        );
        assert_eq!(describe(&[("a", 2), ("b", 3)]), "a=2 b=3");
    }
    #[test]
    fn errors_are_counted_and_logged_sparingly() {
        assert_eq!(super::count_error("test-a"), Some(1), "the first is logged");
        assert_eq!(super::count_error("test-a"), None);
        assert_eq!(super::count_error("test-a"), None);
        assert_eq!(super::count_error("test-b"), Some(1));
        let all = super::errors();
        assert!(
            all.contains(&("test-a", 3)) && all.contains(&("test-b", 1)),
            "{all:?}"
        );
    }
}
