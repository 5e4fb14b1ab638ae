//! Just enough HTTP/1.1 to be Magento's cache host, with hard bounds.
//!
//! Magento opens a connection per request and writes `PURGE / HTTP/1.1`, two headers and
//! an empty line: no `Content-Length`, no body. We read the request head into a buffer
//! bounded by [`Limits::max_head_bytes`] (header lines of 64 KiB are fine), parse it with
//! `httparse`, and answer with a status line, `Content-Length` and a small JSON body.
//! A general-purpose server would do more and answer less precisely: here every failure
//! has its own status and a JSON reason, and nothing is ever buffered without a bound.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bounds on what one request may cost.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line plus headers.
    pub max_head_bytes: usize,
    /// A request body is read and discarded up to this size.
    pub max_body_bytes: usize,
    /// Time allowed for one request head to arrive once its first byte did.
    pub head_timeout: Duration,
    /// Time a kept-alive connection may sit idle.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 72 * 1024,
            max_body_bytes: 64 * 1024,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// A parsed request head.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub keep_alive: bool,
}

impl Request {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Why a request could not be read; each maps to one answer.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("request header section is larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("too many header fields")]
    TooManyHeaders,
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("chunked request bodies are not accepted")]
    Chunked,
    #[error("timed out reading the request")]
    Timeout,
    #[error("connection closed in the middle of a request")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// The status to answer with, or `None` when the peer is gone and nothing can be sent.
    pub fn status(&self) -> Option<u16> {
        match self {
            WireError::HeadTooLarge(_) | WireError::TooManyHeaders => Some(431),
            WireError::Malformed(_) | WireError::Chunked => Some(400),
            WireError::BodyTooLarge(_) => Some(413),
            WireError::Timeout => Some(408),
            WireError::Truncated | WireError::Io(_) => None,
        }
    }
}

const MAX_HEADERS: usize = 64;

/// Reads requests off one connection, keeping bytes that arrived early (pipelining).
#[derive(Debug)]
pub struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
    limits: Limits,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S, limits: Limits) -> Self {
        Conn {
            stream,
            buf: Vec::with_capacity(1024),
            limits,
        }
    }

    /// The next request, or `Ok(None)` when the peer closed (or idled out) between requests.
    pub async fn next_request(&mut self) -> Result<Option<Request>, WireError> {
        // Wait for the first byte under the idle timeout, then the rest under the head timeout.
        if self.buf.is_empty() {
            match tokio::time::timeout(self.limits.idle_timeout, self.fill()).await {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => return Ok(None),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
        let head_len = tokio::time::timeout(self.limits.head_timeout, self.read_head())
            .await
            .map_err(|_| WireError::Timeout)??;
        let request = parse_head(&self.buf[..head_len])?;
        self.buf.drain(..head_len);
        let body_len = content_length(&request)?;
        if body_len > self.limits.max_body_bytes {
            return Err(WireError::BodyTooLarge(self.limits.max_body_bytes));
        }
        tokio::time::timeout(self.limits.head_timeout, self.discard(body_len))
            .await
            .map_err(|_| WireError::Timeout)??;
        Ok(Some(request))
    }

    /// Writes a complete response with a JSON body.
    pub async fn respond(
        &mut self,
        status: u16,
        body: &str,
        extra_headers: &[(&str, String)],
        keep_alive: bool,
    ) -> std::io::Result<()> {
        let mut out = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            reason(status),
            body.len()
        );
        for (name, value) in extra_headers {
            out.push_str(name);
            out.push_str(": ");
            out.push_str(value);
            out.push_str("\r\n");
        }
        out.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        out.push_str(body);
        self.stream.write_all(out.as_bytes()).await?;
        self.stream.flush().await?;
        if !keep_alive {
            let _ = self.stream.shutdown().await;
        }
        Ok(())
    }

    async fn fill(&mut self) -> Result<usize, WireError> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Returns the length of the head (through the blank line) once it is buffered.
    async fn read_head(&mut self) -> Result<usize, WireError> {
        let mut scanned = 0;
        loop {
            if let Some(end) = find_head_end(&self.buf, scanned) {
                return Ok(end);
            }
            if self.buf.len() > self.limits.max_head_bytes {
                return Err(WireError::HeadTooLarge(self.limits.max_head_bytes));
            }
            // An early look at the request line turns binary garbage into a 400 quickly.
            sniff_request_line(&self.buf)?;
            scanned = self.buf.len().saturating_sub(3);
            if self.fill().await? == 0 {
                return Err(if self.buf.is_empty() {
                    WireError::Truncated
                } else {
                    WireError::Malformed("connection closed before the end of the headers".into())
                });
            }
        }
    }

    async fn discard(&mut self, mut len: usize) -> Result<(), WireError> {
        let take = len.min(self.buf.len());
        self.buf.drain(..take);
        len -= take;
        while len > 0 {
            if self.fill().await? == 0 {
                return Err(WireError::Truncated);
            }
            let take = len.min(self.buf.len());
            self.buf.drain(..take);
            len -= take;
        }
        Ok(())
    }
}

fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let from = from.min(buf.len());
    buf[from..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| from + p + 4)
        .or_else(|| {
            // Tolerate bare LF line endings, as most servers do.
            buf[from..]
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| from + p + 2)
        })
}

fn sniff_request_line(buf: &[u8]) -> Result<(), WireError> {
    let line = match buf.iter().position(|&b| b == b'\n') {
        Some(end) => &buf[..end],
        None => &buf[..buf.len().min(64)],
    };
    let bad = line
        .iter()
        .any(|&b| !(b == b'\r' || b == b'\t' || (0x20..0x7f).contains(&b)));
    if bad {
        return Err(WireError::Malformed("request line is not text".into()));
    }
    Ok(())
}

fn parse_head(head: &[u8]) -> Result<Request, WireError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(WireError::Malformed("incomplete request head".into()))
        }
        Err(httparse::Error::TooManyHeaders) => return Err(WireError::TooManyHeaders),
        Err(e) => return Err(WireError::Malformed(e.to_string())),
    }
    let method = req.method.unwrap_or_default().to_owned();
    let path = req.path.unwrap_or_default().to_owned();
    let http11 = req.version == Some(1);
    let headers: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    let connection = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .map(|(_, v)| String::from_utf8_lossy(v).to_ascii_lowercase());
    let keep_alive = match connection.as_deref() {
        Some(v) if v.contains("close") => false,
        Some(v) if v.contains("keep-alive") => true,
        _ => http11,
    };
    Ok(Request {
        method,
        path,
        headers,
        keep_alive,
    })
}

fn content_length(req: &Request) -> Result<usize, WireError> {
    if req
        .header("transfer-encoding")
        .is_some_and(|v| !v.eq_ignore_ascii_case(b"identity"))
    {
        return Err(WireError::Chunked);
    }
    match req.header("content-length") {
        None => Ok(0),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .ok_or_else(|| WireError::Malformed("invalid Content-Length".into())),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_one(input: &[u8]) -> Result<Option<Request>, WireError> {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        client.write_all(input).await.unwrap();
        drop(client);
        Conn::new(server, Limits::default()).next_request().await
    }

    #[tokio::test]
    async fn magento_exact_bytes() {
        let req = read_one(
            b"PURGE / HTTP/1.1\r\nX-Magento-Tags-Pattern: ((^|,)cat_p_1(,|$))\r\nHost: shop\r\n\r\n",
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(req.method, "PURGE");
        assert_eq!(
            req.header("x-magento-tags-pattern"),
            Some(&b"((^|,)cat_p_1(,|$))"[..])
        );
        assert!(req.keep_alive);
    }

    #[tokio::test]
    async fn header_line_of_64k_is_accepted_and_larger_refused() {
        let big = "a".repeat(64 * 1024);
        let req = format!("PURGE / HTTP/1.1\r\nX-Pool: {big}\r\n\r\n");
        assert!(read_one(req.as_bytes()).await.unwrap().is_some());
        let huge = "a".repeat(100 * 1024);
        let req = format!("PURGE / HTTP/1.1\r\nX-Pool: {huge}\r\n\r\n");
        let err = read_one(req.as_bytes()).await.unwrap_err();
        assert_eq!(err.status(), Some(431));
    }

    #[tokio::test]
    async fn garbage_is_a_400() {
        let err = read_one(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(400));
        let err = read_one(b"HELLO THERE\r\n\r\n").await.unwrap_err();
        assert_eq!(err.status(), Some(400));
    }

    #[tokio::test]
    async fn pipelined_requests_and_bodies() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client
            .write_all(b"PURGE / HTTP/1.1\r\nContent-Length: 3\r\nX-Pool: a\r\n\r\nxyzPURGE / HTTP/1.1\r\nX-Pool: b\r\n\r\n")
            .await
            .unwrap();
        drop(client);
        let mut conn = Conn::new(server, Limits::default());
        let a = conn.next_request().await.unwrap().unwrap();
        let b = conn.next_request().await.unwrap().unwrap();
        assert_eq!(a.header("x-pool"), Some(&b"a"[..]));
        assert_eq!(b.header("x-pool"), Some(&b"b"[..]));
        assert!(conn.next_request().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn chunked_is_refused() {
        let err = read_one(b"PURGE / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap_err();
        assert_eq!(err.status(), Some(400));
    }
}
