//! Bounded accepting, shared by the purge listener and the gRPC mutual-TLS front.
//!
//! A connection is taken off the socket only once one of a fixed number of slots is free,
//! so at most that many are being served (or handshaken) and the rest wait in the
//! kernel's backlog; the slot travels with the connection and frees itself on drop. A
//! failing `accept` (out of file descriptors, say) backs off briefly instead of spinning,
//! is counted per listener ([`errors`], process-wide: `coordinator_accept_errors_total`)
//! and logged at most every ten seconds with the count since the last line.

use std::net::SocketAddr;
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
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return Some((stream, peer, permit));
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
    let mut all = ERRORS.lock().unwrap_or_else(|p| p.into_inner());
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
    let all = ERRORS.lock().unwrap_or_else(|p| p.into_inner());
    all.iter().map(|e| (e.listener, e.total)).collect()
}

/// Accepts plaintext connections into a stream (tonic's incoming) through [`next`], so
/// they are counted and backed off like every other listener's.
pub fn incoming(
    listener: TcpListener,
    shutdown: CancellationToken,
    what: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<Result<TcpStream, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // No handshake to bound: a slot is held only until the connection is handed over.
    let slots = Arc::new(Semaphore::new(64));
    tokio::spawn(async move {
        while let Some((tcp, _peer, permit)) = next(&listener, &slots, &shutdown, what).await {
            let sent = tx.send(Ok(tcp)).await;
            drop(permit);
            if sent.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
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
