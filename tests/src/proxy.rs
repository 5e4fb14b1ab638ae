//! A TCP proxy that can be cut ([`Proxy`]): a partition, not a crash. While cut it
//! forwards nothing in either direction and closes nothing; healed, it forwards again,
//! what was held included. Optionally dials from another loopback address.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A TCP proxy on loopback that can be *cut*: it stops forwarding in both directions
/// without closing anything (a partition, not a crash), and forwards again when healed.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
    target: Arc<std::sync::Mutex<SocketAddr>>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        Self::start_from(target, None).await
    }

    /// A proxy whose connections to `target` come from `source` (e.g. 127.0.0.2: on
    /// loopback, another host as the target sees it); `None`: the system's choice.
    pub async fn start_from(target: SocketAddr, source: Option<std::net::IpAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(tokio::sync::watch::channel(false).0);
        let target = Arc::new(std::sync::Mutex::new(target));
        let stop = CancellationToken::new();
        let (c, s, t) = (cut.clone(), stop.clone(), target.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = s.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((down, _)) = accepted else { continue };
                let (c, s) = (c.clone(), s.clone());
                let target = *t.lock().unwrap_or_else(|p| p.into_inner());
                tokio::spawn(async move {
                    let Ok(up) = connect_from(target, source).await else {
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::select! {
                        _ = s.cancelled() => {}
                        _ = pump(dr, uw, c.subscribe()) => {}
                        _ = pump(ur, dw, c.subscribe()) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            cut,
            target,
            stop,
        }
    }

    /// Forwards new connections to `target` from now on (for a proxy started before the
    /// address it fronts was known).
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = target;
    }

    /// Whether the proxy is cut now.
    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }

    /// Stop forwarding (connections stay open; new ones are accepted and held).
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A connection to `target` from `source` (any port), or from the system's choice.
async fn connect_from(
    target: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect(target).await;
    };
    let socket = match ip {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(target).await
}

/// Copies `from` to `to`, holding everything (EOF included) while cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while *cut.borrow_and_update() {
            if cut.changed().await.is_err() {
                return;
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => r.unwrap_or(0),
            _ = cut.changed() => continue,
        };
        // Data read just as the cut began waits for the heal, like a queue in a dead link.
        while *cut.borrow_and_update() {
            if cut.changed().await.is_err() {
                return;
            }
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
