//! The front of an axum app (the JSON API, the DNS backend): our own accept loop and
//! request reader, so that nothing an unauthenticated client sends costs more than a
//! bounded head for a bounded time.
//!
//! `axum::serve` would read any body a route accepts before a handler could look at the
//! token, and has no header timeout, idle timeout or connection cap. Here instead:
//!
//! 1. connections are taken through [`crate::accept::next`]: at most
//!    [`FrontLimits::max_connections`] at once, the rest wait in the kernel's backlog;
//! 2. every request head on a connection, the first and each kept-alive one, is read
//!    with [`crate::http_head`]'s strict rules, bounded to [`FrontLimits::max_head_bytes`];
//!    a fresh connection must deliver its first head within `header_timeout`, a kept-alive
//!    one may sit idle for `idle_timeout`, then its next head gets `header_timeout` from
//!    its first byte;
//! 3. the [`Gate`] sees the head alone: it refuses (an answer, e.g. 401 without the
//!    token) or names the largest body this request may have, so a body is never read
//!    for a request that is refused, and never beyond its route's limit (413, decided from
//!    `Content-Length`). `Expect: 100-continue` is answered only after that;
//! 4. the body is read within `body_timeout`, then the request goes to the app as an
//!    `http::Request` and its answer is written back with a `Content-Length` (a streamed
//!    answer, a backup, declares it and is sent as it comes).
//!
//! Refusals are counted by listener and status ([`refused`]:
//! `coordinator_http_requests_refused_total`) and logged at debug level only, so a
//! flood of them cannot flood the log.
//!
//! A refused request that declared a body ends the connection (the unread body must not
//! be taken for the next request); so does every error. Shutdown stops accepting and
//! closes idle connections; a request in flight is answered first.

use daemon::sync::Recover;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{self, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use http_body_util::BodyExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::http_head::{Head, ReadError, Reader};

/// Largest request head on the API and DNS listeners (browsers' heads are a few KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Bounds on what one connection may cost.
#[derive(Debug, Clone, Copy)]
pub struct FrontLimits {
    /// Connections served at once; more wait in the backlog.
    pub max_connections: usize,
    /// Request line plus headers, to the byte (431 beyond).
    pub max_head_bytes: usize,
    /// A fresh connection's first head, and any head once its first byte arrived.
    pub header_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Reading a body, and writing an answer.
    pub body_timeout: Duration,
}

/// Decides from a head alone: `Ok(max body bytes)` to go on, or the answer refusing it.
/// It also sees the peer's address (the audit log records refusals with it).
pub type Gate = Arc<dyn Fn(&Head, SocketAddr) -> Result<usize, Box<Response>> + Send + Sync>;

/// The peer's address, in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Requests refused by the front, by listener and status, since the process started.
static REFUSED: Mutex<Vec<(&'static str, u16, u64)>> = Mutex::new(Vec::new());

fn count_refused(listener: &'static str, status: u16) {
    let mut all = REFUSED.locked();
    match all
        .iter_mut()
        .find(|(l, s, _)| *l == listener && *s == status)
    {
        Some(entry) => entry.2 += 1,
        None => all.push((listener, status, 1)),
    }
}

/// `(listener, status, count)` of every refusal so far
/// (`coordinator_http_requests_refused_total`).
pub fn refused() -> Vec<(&'static str, u16, u64)> {
    REFUSED.locked().clone()
}

/// Serves `app` on `listener` until `shutdown`; then waits for connections in flight.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    gate: Gate,
    limits: FrontLimits,
    shutdown: CancellationToken,
    what: &'static str,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    while let Some((stream, peer, permit)) =
        crate::accept::next(&listener, &slots, &shutdown, what).await
    {
        let (app, gate, shutdown) = (app.clone(), gate.clone(), shutdown.clone());
        tokio::spawn(async move {
            serve_conn(stream, peer, app, &gate, &limits, &shutdown, what).await;
            drop(permit);
        });
    }
    // Every slot back: every connection closed (idle ones close on shutdown at once).
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    gate: &Gate,
    limits: &FrontLimits,
    shutdown: &CancellationToken,
    what: &'static str,
) {
    let mut reader = Reader::new(stream);
    let mut first = true;
    loop {
        let idle = if first {
            limits.header_timeout
        } else {
            limits.idle_timeout
        };
        // Shutdown closes a connection waiting for its next request, not one sending it.
        let between_requests = reader.buffered() == 0;
        let next = reader.next_head(limits.max_head_bytes, idle, limits.header_timeout);
        let head = tokio::select! {
            _ = shutdown.cancelled(), if between_requests => return,
            r = async {
                if first {
                    // The whole first head within the header timeout, counted from accept.
                    tokio::time::timeout(limits.header_timeout, next)
                        .await
                        .unwrap_or(Err(ReadError::Timeout))
                } else {
                    next.await
                }
            } => r,
        };
        first = false;
        let head = match head {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "unusable HTTP request");
                if let Some(status) = e.status() {
                    count_refused(what, status);
                    let answer = error_answer(status, &e.to_string());
                    let _ = write(&mut reader.stream, answer, false, false, limits).await;
                }
                return;
            }
        };
        let is_head = head.method == "HEAD";
        let body_len = usize::try_from(head.content_length).unwrap_or(usize::MAX);
        let max_body = match gate(&head, peer) {
            Ok(max) => max,
            Err(answer) => {
                // The body stays unread, so it must not be taken for the next request.
                let answer = *answer;
                count_refused(what, answer.status().as_u16());
                let keep = head.keep_alive && body_len == 0 && !shutdown.is_cancelled();
                tracing::debug!(peer = %peer, status = answer.status().as_u16(),
                    path = %head.path, "request refused from its head");
                if write(&mut reader.stream, answer, keep, is_head, limits)
                    .await
                    .is_err()
                    || !keep
                {
                    return;
                }
                continue;
            }
        };
        if body_len > max_body {
            count_refused(what, 413);
            let answer = error_answer(
                413,
                &format!(
                    "a {} {} body is at most {max_body} bytes",
                    head.method,
                    route_of(&head.path)
                ),
            );
            let _ = write(&mut reader.stream, answer, false, is_head, limits).await;
            return;
        }
        if body_len > 0 && head.expects_continue() && reader.buffered() < body_len {
            let sent = tokio::time::timeout(
                limits.body_timeout,
                reader.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n"),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                return;
            }
        }
        let body = match tokio::time::timeout(limits.body_timeout, reader.body(body_len)).await {
            Ok(Ok(b)) => b,
            Ok(Err(_)) => return,
            Err(_) => {
                count_refused(what, 408);
                let answer = error_answer(408, "timed out reading the request body");
                let _ = write(&mut reader.stream, answer, false, is_head, limits).await;
                return;
            }
        };
        let keep = head.keep_alive;
        let request = match to_request(head, body, peer) {
            Ok(r) => r,
            Err(reason) => {
                count_refused(what, 400);
                let answer = error_answer(400, &reason);
                let _ = write(&mut reader.stream, answer, false, is_head, limits).await;
                return;
            }
        };
        let answer = match app.clone().oneshot(request).await {
            Ok(a) => a,
            Err(never) => match never {},
        };
        let keep = keep && !shutdown.is_cancelled();
        if write(&mut reader.stream, answer, keep, is_head, limits)
            .await
            .is_err()
            || !keep
        {
            return;
        }
    }
}

/// The path without its query, for messages.
fn route_of(target: &str) -> &str {
    target.split('?').next().unwrap_or(target)
}

/// `{"error": "..."}`, the shape of every error the API answers.
pub fn error_answer(status: u16, reason: &str) -> Response {
    let body = serde_json::json!({ "error": reason }).to_string();
    let mut answer = Response::new(Body::from(body));
    *answer.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    answer.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    answer
}

fn to_request(head: Head, body: Vec<u8>, peer: SocketAddr) -> Result<http::Request<Body>, String> {
    let method = http::Method::from_bytes(head.method.as_bytes())
        .map_err(|_| "invalid method".to_owned())?;
    let uri: http::Uri = head
        .path
        .parse()
        .map_err(|_| "invalid request target".to_owned())?;
    let mut builder = http::Request::builder()
        .method(method)
        .uri(uri)
        .version(if head.http11 {
            http::Version::HTTP_11
        } else {
            http::Version::HTTP_10
        });
    for (name, value) in &head.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| format!("invalid value for header {name}"))?;
        builder = builder.header(name, value);
    }
    builder
        .extension(Peer(peer))
        .body(Body::from(body))
        .map_err(|e| e.to_string())
}

/// Writes `answer` whole (its body collected, then sent with a `Content-Length`), or, for
/// a streamed body whose length the app declared (`Content-Length`, a backup), frame by
/// frame as it comes, each write within `body_timeout`.
async fn write<S: AsyncWrite + Unpin>(
    stream: &mut S,
    answer: Response,
    keep_alive: bool,
    is_head: bool,
    limits: &FrontLimits,
) -> std::io::Result<()> {
    let (parts, body) = answer.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let exact = axum::body::HttpBody::size_hint(&body).exact();
    if let Some(len) = declared.filter(|_| exact.is_none() && !is_head) {
        return write_streamed(stream, &parts, body, len, keep_alive, limits).await;
    }
    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            tracing::warn!(error = %e, "answer body failed");
            return Err(std::io::Error::other("answer body failed"));
        }
    };
    let status = parts.status;
    let bodiless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let mut out = head_bytes(&parts, (!bodiless).then_some(body.len() as u64), keep_alive);
    out.reserve(body.len());
    if !is_head && !bodiless {
        out.extend_from_slice(&body);
    }
    let sent = tokio::time::timeout(limits.body_timeout, async {
        stream.write_all(&out).await?;
        stream.flush().await?;
        if !keep_alive {
            let _ = stream.shutdown().await;
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    match sent {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// The status line and headers of an answer (ours for length and connection).
fn head_bytes(parts: &http::response::Parts, len: Option<u64>, keep_alive: bool) -> Vec<u8> {
    let status = parts.status;
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in &parts.headers {
        if matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection" | "keep-alive"
        ) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(len) = len {
        out.extend_from_slice(format!("content-length: {len}\r\n").as_bytes());
    }
    out.extend_from_slice(if keep_alive {
        b"connection: keep-alive\r\n\r\n"
    } else {
        b"connection: close\r\n\r\n"
    });
    out
}

/// Sends a body of a declared length as its frames come; a body that fails or does not
/// add up to `len` ends the connection (the client sees a short answer, never a wrong one).
async fn write_streamed<S: AsyncWrite + Unpin>(
    stream: &mut S,
    parts: &http::response::Parts,
    mut body: Body,
    len: u64,
    keep_alive: bool,
    limits: &FrontLimits,
) -> std::io::Result<()> {
    let timed = |r: Result<std::io::Result<()>, tokio::time::error::Elapsed>| match r {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut)),
    };
    let head = head_bytes(parts, Some(len), keep_alive);
    timed(tokio::time::timeout(limits.body_timeout, stream.write_all(&head)).await)?;
    let mut sent = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            tracing::warn!(error = %e, "answer body failed");
            std::io::Error::other("answer body failed")
        })?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        sent += data.len() as u64;
        if sent > len {
            return Err(std::io::Error::other("answer body longer than declared"));
        }
        timed(tokio::time::timeout(limits.body_timeout, stream.write_all(data)).await)?;
    }
    if sent != len {
        return Err(std::io::Error::other("answer body shorter than declared"));
    }
    timed(
        tokio::time::timeout(limits.body_timeout, async {
            stream.flush().await?;
            if !keep_alive {
                let _ = stream.shutdown().await;
            }
            Ok(())
        })
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use tokio::io::AsyncReadExt;

    fn limits() -> FrontLimits {
        FrontLimits {
            max_connections: 4,
            max_head_bytes: 8 * 1024,
            header_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(600),
            body_timeout: Duration::from_millis(300),
        }
    }

    /// A test app: `POST /echo` answers its body; the gate wants `X-Token: t` on POSTs
    /// and allows them 16 bytes.
    async fn start() -> (SocketAddr, CancellationToken) {
        let app = Router::new()
            .route("/echo", post(|body: String| async move { body }))
            .route("/hi", get(|| async { "hi" }))
            .route("/stream", get(|| async { streamed(6, &["abc", "def"]) }))
            .route("/short", get(|| async { streamed(10, &["abc"]) }));
        let gate: Gate = Arc::new(|head: &Head, _| {
            if head.method == "GET" || head.method == "HEAD" {
                return Ok(0);
            }
            match head.single("x-token") {
                Ok(Some(v)) if v == b"t" => Ok(16),
                _ => Err(Box::new(error_answer(401, "token"))),
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            app,
            gate,
            limits(),
            shutdown.clone(),
            "test",
        ));
        (addr, shutdown)
    }

    /// An answer declaring `len` bytes whose chunks come 200 ms apart (together longer
    /// than the test's `body_timeout`).
    fn streamed(len: u64, chunks: &[&'static str]) -> Response {
        let chunks = chunks.to_vec();
        let body = futures_util::stream::unfold(chunks.into_iter(), |mut rest| async move {
            let next = rest.next()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            Some((Ok::<_, std::io::Error>(axum::body::Bytes::from(next)), rest))
        });
        let mut answer = Response::new(Body::from_stream(body));
        answer
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
        answer
    }

    #[tokio::test]
    async fn a_streamed_answer_goes_out_as_it_comes_and_a_short_one_ends_the_connection() {
        let (addr, _s) = start().await;
        let out = exchange(addr, b"GET /stream HTTP/1.1\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("content-length: 6\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nabcdef"), "{out}");
        let out = exchange(addr, b"GET /short HTTP/1.1\r\n\r\nGET /hi HTTP/1.1\r\n\r\n").await;
        assert!(out.contains("content-length: 10\r\n"), "{out}");
        assert!(
            out.ends_with("\r\n\r\nabc"),
            "cut short, nothing after: {out}"
        );
    }

    /// Writes `input`, then reads until the server closes (or 2 s pass).
    async fn exchange(addr: SocketAddr, input: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(input).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn keep_alive_requests_each_pass_the_gate() {
        let (addr, _s) = start().await;
        let out = exchange(
            addr,
            b"POST /echo HTTP/1.1\r\nX-Token: t\r\nContent-Length: 2\r\n\r\nokPOST /echo HTTP/1.1\r\nContent-Length: 0\r\n\r\nGET /hi HTTP/1.1\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("\r\n\r\nok"), "{out}");
        // The second has no token: refused; no body was declared, so the third is served.
        assert!(out.contains("HTTP/1.1 401 Unauthorized\r\n"), "{out}");
        assert!(out.ends_with("hi"), "{out}");
    }

    #[tokio::test]
    async fn a_refused_body_is_never_read_and_ends_the_connection() {
        let (addr, _s) = start().await;
        let out = exchange(
            addr,
            b"POST /echo HTTP/1.1\r\nContent-Length: 20\r\n\r\nGET /hi HTTP/1.1\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
        assert!(
            !out.contains("hi"),
            "the body was taken for a request: {out}"
        );
        let out = exchange(
            addr,
            b"POST /echo HTTP/1.1\r\nX-Token: t\r\nContent-Length: 17\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
        let out = exchange(addr, b"GET /hi HTTP/1.1\r\nContent-Length: 1\r\n\r\nx").await;
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    }

    #[tokio::test]
    async fn continue_only_after_the_gate() {
        let (addr, _s) = start().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nX-Token: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"ok").await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let out = exchange(
            addr,
            b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    }

    #[tokio::test]
    async fn strict_rules_apply_to_every_head() {
        let (addr, _s) = start().await;
        for bad in [
            &b"GET /hi HTTP/1.1\nHost: a\n\n"[..],
            b"POST /echo HTTP/1.1\r\nX-Token: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"POST /echo HTTP/1.1\r\nX-Token: t\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            // The second, kept-alive head is held to the same rules.
            b"GET /hi HTTP/1.1\r\n\r\nGET /hi HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n",
        ] {
            let out = exchange(addr, bad).await;
            assert!(out.contains("HTTP/1.1 400"), "{}: {out}", String::from_utf8_lossy(bad));
        }
        let big = format!("GET /hi HTTP/1.1\r\nX-A: {}\r\n\r\n", "a".repeat(8 * 1024));
        assert!(exchange(addr, big.as_bytes())
            .await
            .starts_with("HTTP/1.1 431"));
    }

    #[tokio::test]
    async fn slow_heads_and_idle_connections_are_closed() {
        let (addr, _s) = start().await;
        let t = std::time::Instant::now();
        let out = exchange(addr, b"GET /hi HTTP/1.1\r\nX-A: b").await;
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        assert!(t.elapsed() < Duration::from_secs(1));
        // Silent from the start: closed after the header timeout, without an answer.
        let t = std::time::Instant::now();
        assert_eq!(exchange(addr, b"").await, "");
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait() {
        let (addr, _s) = start().await;
        let mut held = Vec::new();
        for _ in 0..limits().max_connections {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /hi HTTP/1.1\r\n\r\n").await.unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).await.unwrap();
            held.push(s);
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        extra
            .write_all(b"GET /hi HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let early = tokio::time::timeout(Duration::from_millis(200), extra.read(&mut buf)).await;
        assert!(early.is_err(), "served beyond the cap");
        drop(held);
        let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
}
