//! Just enough HTTP/1.1 to be Magento's cache host, with hard bounds.
//!
//! Magento opens a connection per request and writes `PURGE / HTTP/1.1`, two headers and
//! an empty line: no `Content-Length`, no body. We read the request head with the shared
//! strict rules of [`crate::http_head`] (no bare LF, no obs-fold, no `Transfer-Encoding`,
//! one plain `Content-Length`), bounded to the byte by [`Limits::max_head_bytes`] (header
//! lines of 64 KiB are fine), and answer with a status line, `Content-Length` and a small
//! JSON body. A declared body is read and dropped (at most [`Limits::max_body_bytes`]).
//! A general-purpose server would do more and answer less precisely: here every failure
//! has its own status and a JSON reason, and nothing is ever buffered without a bound.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::http_head::{Head, ReadError, Reader};

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

/// A parsed request head: the shared strict rules' [`Head`].
pub type Request = Head;

/// Why a request could not be read; each maps to one answer.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The head broke one of [`crate::http_head`]'s rules (400, or 431 for size), or the
    /// connection timed out or closed.
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
}

impl WireError {
    /// The status to answer with, or `None` when the peer is gone and nothing can be sent.
    pub fn status(&self) -> Option<u16> {
        match self {
            WireError::Read(e) => e.status(),
            WireError::BodyTooLarge(_) => Some(413),
        }
    }
}

/// Reads requests off one connection, keeping bytes that arrived early (pipelining).
#[derive(Debug)]
pub struct Conn<S> {
    reader: Reader<S>,
    limits: Limits,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(stream: S, limits: Limits) -> Self {
        Conn {
            reader: Reader::new(stream),
            limits,
        }
    }

    /// The next request, or `Ok(None)` when the peer closed (or idled out) between requests.
    pub async fn next_request(&mut self) -> Result<Option<Request>, WireError> {
        // The first byte under the idle timeout, then the rest under the head timeout.
        let Some(request) = self
            .reader
            .next_head(
                self.limits.max_head_bytes,
                self.limits.idle_timeout,
                self.limits.head_timeout,
            )
            .await?
        else {
            return Ok(None);
        };
        let body_len = usize::try_from(request.content_length).unwrap_or(usize::MAX);
        if body_len > self.limits.max_body_bytes {
            return Err(WireError::BodyTooLarge(self.limits.max_body_bytes));
        }
        tokio::time::timeout(self.limits.head_timeout, self.reader.discard(body_len))
            .await
            .map_err(|_| ReadError::Timeout)??;
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
        self.reader.stream.write_all(out.as_bytes()).await?;
        self.reader.stream.flush().await?;
        if !keep_alive {
            let _ = self.reader.stream.shutdown().await;
        }
        Ok(())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
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

    /// Every smuggling shape seen on the purge port: refused, and nothing after it on the
    /// connection is read as a second request.
    #[tokio::test]
    async fn smuggling_shapes_are_refused_and_end_the_connection() {
        let second = "PURGE / HTTP/1.1\r\nX-Magento-Tags-Pattern: .*\r\n\r\n";
        let shapes = [
            format!("PURGE / HTTP/1.1\r\nX-Pool: a\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{second}", second.len()),
            format!("PURGE / HTTP/1.1\r\nX-Pool: a\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{second}"),
            format!("PURGE / HTTP/1.1\r\nX-Pool: a\r\nContent-Length: +3\r\n\r\nabc{second}"),
            format!("PURGE / HTTP/1.1\nX-Pool: a\n\n{second}"),
            format!("PURGE / HTTP/1.1\r\nX-Pool: a\r\n b\r\n\r\n{second}"),
            format!("PURGE / HTTP/1.1\r\nX-Pool : a\r\n\r\n{second}"),
        ];
        for shape in shapes {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            client.write_all(shape.as_bytes()).await.unwrap();
            drop(client);
            let mut conn = Conn::new(server, Limits::default());
            let err = conn.next_request().await.unwrap_err();
            assert_eq!(err.status(), Some(400), "{shape:?}: {err}");
        }
    }

    #[tokio::test]
    async fn head_limit_is_exact() {
        let limit = Limits::default().max_head_bytes;
        let build = |len: usize| {
            let fixed = "PURGE / HTTP/1.1\r\nX-Pool: \r\n\r\n".len();
            format!(
                "PURGE / HTTP/1.1\r\nX-Pool: {}\r\n\r\n",
                "a".repeat(len - fixed)
            )
        };
        assert!(read_one(build(limit).as_bytes()).await.unwrap().is_some());
        let err = read_one(build(limit + 1).as_bytes()).await.unwrap_err();
        assert_eq!(err.status(), Some(431));
    }
}
