//! A tiny raw HTTP/1.1 client: the tests write exact bytes (Magento's purges, hostile
//! requests) and read one response ([`raw`], [`Resp`]); [`get`], [`get_json`] and
//! [`api_call`] are the common requests, [`exchange_keepalive`] a bench's kept-alive one.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn cache(&self) -> &str {
        self.header("x-magento-cache-debug").unwrap_or("")
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// Writes `request` on a new connection and reads one response (by Content-Length, or
/// to EOF).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<Resp> {
    raw_from(None, addr, request).await
}

/// Like [`raw`], from a chosen local address (any 127.x.y.z works on loopback).
pub async fn raw_from(
    local: Option<std::net::IpAddr>,
    addr: SocketAddr,
    request: &[u8],
) -> std::io::Result<Resp> {
    let mut s = match local {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    s.write_all(request).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(resp) = parse_response(&buf) {
            return Ok(resp);
        }
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response timeout"))??;
        if n == 0 {
            return parse_response_eof(&buf).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no complete response")
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

type Head = (usize, u16, Vec<(String, String)>);

fn parse_head(buf: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Some((
            n,
            r.code.unwrap_or(0),
            r.headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
        )),
        _ => None,
    }
}

fn parse_response(buf: &[u8]) -> Option<Resp> {
    let (n, status, headers) = parse_head(buf)?;
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))?
        .1
        .trim()
        .parse()
        .ok()?;
    if buf.len() < n + len {
        return None;
    }
    Some(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&buf[n..n + len]).into_owned(),
    })
}

fn parse_response_eof(buf: &[u8]) -> Option<Resp> {
    let (n, status, headers) = parse_head(buf)?;
    Some(Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&buf[n..]).into_owned(),
    })
}

/// `GET path` with `Connection: close`.
pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}"))
}

/// `GET path` and the JSON body, or `None` on any failure.
pub async fn get_json(addr: SocketAddr, path: &str) -> Option<Value> {
    let r = raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    (r.status == 200).then(|| r.json())
}

/// An API request (JSON body, optional bearer token) with `Connection: close`.
pub async fn api_call(
    api: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let body = body.map(Value::to_string).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw(api, request.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// One request on a kept-alive HTTP/1.1 connection: writes `request`, reads the status
/// line, the headers and a `Content-Length` body; returns the status (for benches).
pub async fn exchange_keepalive(
    conn: &mut tokio::io::BufReader<TcpStream>,
    request: &[u8],
) -> std::io::Result<u16> {
    use tokio::io::AsyncBufReadExt;
    conn.get_mut().write_all(request).await?;
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut length = 0usize;
    loop {
        line.clear();
        conn.read_line(&mut line).await?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body).await?;
    Ok(status)
}
