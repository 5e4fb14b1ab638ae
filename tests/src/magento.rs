//! Magento's side of the contract: the sample origin ([`OriginServer`], in this process)
//! and the tag purge exactly as Magento 2.4 sends it ([`magento_purge`], [`tags_pattern`],
//! [`purge_tags`]).

use std::net::SocketAddr;
use std::sync::Arc;

use coordinator_cli::demo::origin::{self, Origin};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::raw;

/// The sample origin, in this process.
pub struct OriginServer {
    pub addr: SocketAddr,
    pub origin: Arc<Origin>,
    stop: CancellationToken,
}

impl OriginServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let origin = Arc::new(Origin::default());
        let stop = CancellationToken::new();
        tokio::spawn(origin::serve(listener, origin.clone(), stop.clone()));
        OriginServer { addr, origin, stop }
    }

    /// Stops serving: new connections are refused (an origin outage).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for OriginServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Exactly the bytes Magento 2.4 writes for a tag purge (no Content-Length, Host without
/// port, two headers in this order).
pub fn magento_purge(pattern: &str) -> Vec<u8> {
    format!("PURGE / HTTP/1.1\r\nX-Magento-Tags-Pattern: {pattern}\r\nHost: coordinator.internal\r\n\r\n").into_bytes()
}

/// Magento's canonical pattern for these tags.
pub fn tags_pattern(tags: &[&str]) -> String {
    tags.iter()
        .map(|t| format!("((^|,){t}(,|$))"))
        .collect::<Vec<_>>()
        .join("|")
}

/// Sends a Magento purge and returns the acknowledged sequence.
pub async fn purge_tags(purge: SocketAddr, tags: &[&str]) -> u64 {
    let r = raw(purge, &magento_purge(&tags_pattern(tags)))
        .await
        .expect("purge");
    assert_eq!(r.status, 200, "purge answered {}: {}", r.status, r.body);
    r.json()["seq"].as_u64().expect("seq in purge answer")
}
