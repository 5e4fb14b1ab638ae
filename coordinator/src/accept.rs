//! Bounded accepting, shared by the purge listener and the gRPC mutual-TLS front.
//!
//! A connection is taken off the socket only once one of a fixed number of slots is free,
//! so at most that many are being served (or handshaken) and the rest wait in the
//! kernel's backlog; the slot travels with the connection and frees itself on drop. A
//! failing `accept` (out of file descriptors, say) backs off briefly instead of spinning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
                tracing::warn!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
