//! One timed HTTP/1.1 GET on a fresh connection, the way the warmer (and later the
//! agents' warm shards) hit a varnish: connect to `addr`, send `path` with the shop's
//! `Host` and any extra headers (a variation's cookie), time the first byte and the end,
//! read at most [`MAX_BODY`] of the body, report varnish's cache verdict.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most of a body read (the rest is dropped with the connection).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// What one GET returned.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    pub status: u16,
    pub ttfb: Duration,
    pub total: Duration,
    /// `HIT` / `MISS` / ... from `X-Magento-Cache-Debug` or `X-Cache`; empty if absent.
    pub cache: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// GETs `path` from `addr` with `Host: host` and `extra` headers, within `timeout`.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    host: &str,
    extra: &[(String, String)],
    timeout: Duration,
) -> Result<Fetched, String> {
    let bad = |s: &str| s.chars().any(|c| c.is_control());
    if bad(path)
        || path.contains(' ')
        || bad(host)
        || extra
            .iter()
            .any(|(n, v)| bad(n) || bad(v) || n.contains(':'))
    {
        return Err("refusing a request with control characters".into());
    }
    let started = Instant::now();
    let work = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = s.set_nodelay(true);
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: varnish-coordinator\r\n");
        for (n, v) in extra {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("Connection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::with_capacity(16 * 1024);
        let mut chunk = [0u8; 16 * 1024];
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed without an answer".to_owned());
        }
        let ttfb = started.elapsed();
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() < MAX_BODY {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, String>((ttfb, buf))
    };
    let (ttfb, buf) = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("timed out after {timeout:?}"))??;
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no complete response head")?;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP answer: {:?}",
                head.lines().next().unwrap_or("")
            )
        })?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut fetched = Fetched {
        status,
        ttfb,
        total: started.elapsed(),
        cache: String::new(),
        headers,
        body: buf[head_end + 4..].to_vec(),
    };
    fetched.cache = fetched
        .header("x-magento-cache-debug")
        .or_else(|| fetched.header("x-cache"))
        .unwrap_or("")
        .chars()
        .take(32)
        .collect();
    Ok(fetched)
}

/// `http://host[:port]/path?q` -> (host header, socket address, path).
pub async fn split_url(url: &str) -> Result<(String, SocketAddr, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs can be fetched directly"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hostport = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addr = tokio::net::lookup_host(&hostport)
        .await
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {authority}"))?;
    Ok((authority.to_owned(), addr, path.to_owned()))
}

/// The path and query of an absolute URL (`/` when it has none).
pub fn path_of(url: &str) -> &str {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    rest.find('/').map(|i| &rest[i..]).unwrap_or("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(path_of("https://a.example/p/1?x=2"), "/p/1?x=2");
        assert_eq!(path_of("http://a.example"), "/");
    }
}
