//! One strict rule set for HTTP/1.1 request heads, shared by every listener that speaks
//! HTTP: the purge port ([`crate::purge::wire`]) and the API front ([`crate::http_front`]).
//!
//! Two servers that read the same bytes differently are how requests get smuggled: a
//! proxy sees one request, we see two. So anything with more than one reading is refused
//! here instead of being interpreted:
//!
//! * every line ends in CRLF: a bare LF or a bare CR is a 400;
//! * no obs-fold (a header line starting with a space or tab), no whitespace between a
//!   field name and its colon, no control character in a value;
//! * `Content-Length` at most once, digits only (no sign, no leading zero, no list);
//! * no `Transfer-Encoding` at all: neither listener needs one, and refusing it ends the
//!   `identity` + `chunked` games;
//! * `Host` at most once; [`Head::single`] lets a caller refuse duplicates of its own
//!   headers (the purge port's `X-Magento-Tags-Pattern`, the API's `Authorization`);
//! * the head (request line through the blank line) is at most the limit, to the byte:
//!   431 beyond it, and too many fields is 431 too.
//!
//! [`Reader`] buffers one connection's bytes (keeping what arrived early, for keep-alive
//! and pipelining), finds the end of the head without ever scanning past the limit, and
//! reads bodies of a length decided before the first body byte is read.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Most header fields in one head.
pub const MAX_HEADERS: usize = 100;

/// A request head that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The request target as sent (`/path?query`).
    pub path: String,
    /// `true` for HTTP/1.1, `false` for HTTP/1.0.
    pub http11: bool,
    /// Every field in order, names as sent, values without surrounding whitespace.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The connection may carry another request after this one.
    pub keep_alive: bool,
    /// The body's length (0 without `Content-Length`).
    pub content_length: u64,
}

/// Why a head was refused; [`HeadError::status`] is the answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request header section is larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("header {0} appears more than once")]
    Duplicate(String),
    #[error("Transfer-Encoding is not accepted here; send a Content-Length")]
    TransferEncoding,
    #[error("invalid Content-Length: digits only, no sign or leading zero")]
    BadContentLength,
}

impl HeadError {
    /// 431 for size, 400 for everything else.
    pub fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge(_) | HeadError::TooManyHeaders(_) => 431,
            _ => 400,
        }
    }

    fn malformed(m: &str) -> Self {
        HeadError::Malformed(m.to_owned())
    }
}

impl Head {
    /// The first field with this name (case-insensitive). Prefer [`Head::single`] for a
    /// field whose duplicates would be read differently by someone else.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Every field with this name, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The field if present at most once; a duplicate is an error.
    pub fn single(&self, name: &str) -> Result<Option<&[u8]>, HeadError> {
        let mut found = None;
        for (n, v) in &self.headers {
            if n.eq_ignore_ascii_case(name) {
                if found.is_some() {
                    return Err(HeadError::Duplicate(name.to_owned()));
                }
                found = Some(v.as_slice());
            }
        }
        Ok(found)
    }

    /// Every line of a list-valued field joined with `,` in order (RFC 9110 5.3), as one
    /// value: how `X-Forwarded-For` must be read.
    pub fn joined(&self, name: &str) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for v in self.all(name) {
            match &mut out {
                None => out = Some(v.to_vec()),
                Some(o) => {
                    o.push(b',');
                    o.extend_from_slice(v);
                }
            }
        }
        out
    }

    /// The client sent `Expect: 100-continue` and waits for a go-ahead before its body.
    pub fn expects_continue(&self) -> bool {
        self.all("expect")
            .any(|v| v.eq_ignore_ascii_case(b"100-continue"))
    }
}

/// The length of the head at the start of `buf` (through the blank line), once it is
/// all there. Looks at no more than `max` bytes: a head longer than `max` is
/// [`HeadError::TooLarge`] as soon as `max` bytes without its end have arrived, so the
/// limit holds to the byte. A bare LF or CR anywhere in it is refused at once.
pub fn find_end(buf: &[u8], max: usize) -> Result<Option<usize>, HeadError> {
    find_end_from(buf, 0, max)
}

/// [`find_end`] resuming a scan: the first `scanned` bytes were looked at before (by a
/// call on a shorter `buf`), so a head that trickles in a byte at a time costs linear
/// time, not quadratic.
pub fn find_end_from(buf: &[u8], scanned: usize, max: usize) -> Result<Option<usize>, HeadError> {
    let window = &buf[..buf.len().min(max)];
    // A CR at the old end had no next byte yet, and the blank line may straddle it.
    let from = scanned.saturating_sub(3).min(window.len());
    for (i, &b) in window.iter().enumerate().skip(from) {
        match b {
            b'\n' if i == 0 || window[i - 1] != b'\r' => {
                return Err(HeadError::malformed(
                    "bare LF line ending (lines end in CRLF)",
                ))
            }
            b'\n' if i >= 3 && &window[i - 3..=i] == b"\r\n\r\n" => return Ok(Some(i + 1)),
            b'\r' if window.get(i + 1).is_some_and(|&n| n != b'\n') => {
                return Err(HeadError::malformed("bare CR in the request head"))
            }
            _ => {}
        }
    }
    if buf.len() >= max {
        return Err(HeadError::TooLarge(max));
    }
    Ok(None)
}

/// RFC 9110 `tchar`: what a method or a field name may hold.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses a complete head (as [`find_end`] delimited it: CRLF lines, a blank line last).
pub fn parse(head: &[u8]) -> Result<Head, HeadError> {
    let body = head
        .strip_suffix(b"\r\n\r\n")
        .ok_or_else(|| HeadError::malformed("the head does not end with an empty line"))?;
    let mut lines = body.split(|&b| b == b'\n').map(|l| {
        // `find_end` guarantees every LF follows a CR; the last line has lost its CRLF.
        l.strip_suffix(b"\r").unwrap_or(l)
    });
    let request_line = lines.next().unwrap_or_default();
    let (method, path, http11) = request_line_parts(request_line)?;
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() == MAX_HEADERS {
            return Err(HeadError::TooManyHeaders(MAX_HEADERS));
        }
        headers.push(field(line)?);
    }
    let mut head = Head {
        method,
        path,
        http11,
        headers,
        keep_alive: false,
        content_length: 0,
    };
    if head.header("transfer-encoding").is_some() {
        return Err(HeadError::TransferEncoding);
    }
    head.single("host")?;
    if let Some(v) = head.single("content-length")? {
        head.content_length = content_length(v)?;
    }
    head.keep_alive = keep_alive(&head);
    Ok(head)
}

fn request_line_parts(line: &[u8]) -> Result<(String, String, bool), HeadError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::malformed(
            "the request line must be METHOD SP TARGET SP HTTP/1.x",
        ));
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(HeadError::malformed("invalid method"));
    }
    if target.is_empty() || !target.iter().all(|&b| (0x21..0x7f).contains(&b)) {
        return Err(HeadError::malformed("invalid request target"));
    }
    let http11 = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        _ => return Err(HeadError::malformed("only HTTP/1.0 and HTTP/1.1")),
    };
    // Both are ASCII by the checks above.
    Ok((
        String::from_utf8_lossy(method).into_owned(),
        String::from_utf8_lossy(target).into_owned(),
        http11,
    ))
}

fn field(line: &[u8]) -> Result<(String, Vec<u8>), HeadError> {
    if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return Err(HeadError::malformed(
            "obs-fold (a header line continued on the next line)",
        ));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| HeadError::malformed("header line without a colon"))?;
    let name = &line[..colon];
    if name.last().is_some_and(|&b| b == b' ' || b == b'\t') {
        return Err(HeadError::malformed(
            "whitespace between a header name and its colon",
        ));
    }
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(HeadError::malformed("invalid header name"));
    }
    let value = line[colon + 1..].trim_ascii();
    if value.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
        return Err(HeadError::malformed("control character in a header value"));
    }
    Ok((String::from_utf8_lossy(name).into_owned(), value.to_vec()))
}

fn content_length(v: &[u8]) -> Result<u64, HeadError> {
    let digits_only = !v.is_empty() && v.iter().all(u8::is_ascii_digit);
    let padded = v.len() > 1 && v[0] == b'0';
    if !digits_only || padded || v.len() > 18 {
        return Err(HeadError::BadContentLength);
    }
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(HeadError::BadContentLength)
}

fn keep_alive(head: &Head) -> bool {
    let mut close = false;
    let mut keep = false;
    for v in head.all("connection") {
        for token in v.split(|&b| b == b',') {
            let token = token.trim_ascii();
            close |= token.eq_ignore_ascii_case(b"close");
            keep |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    !close && (head.http11 || keep)
}

/// Why reading from a connection stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("timed out reading the request")]
    Timeout,
    #[error("connection closed in the middle of a request")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ReadError {
    /// The status to answer with, or `None` when the peer is gone.
    pub fn status(&self) -> Option<u16> {
        match self {
            ReadError::Head(e) => Some(e.status()),
            ReadError::Timeout => Some(408),
            ReadError::Truncated | ReadError::Io(_) => None,
        }
    }
}

/// One connection's read side: a buffer that keeps bytes beyond the current request.
#[derive(Debug)]
pub struct Reader<S> {
    pub stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + Unpin> Reader<S> {
    pub fn new(stream: S) -> Self {
        Reader {
            stream,
            buf: Vec::with_capacity(1024),
        }
    }

    /// Bytes already read and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next head, or `Ok(None)` when the peer closed (or stayed silent for `idle`)
    /// before sending a byte of it. Once a byte arrived the whole head must follow within
    /// `head_timeout`.
    pub async fn next_head(
        &mut self,
        max_head_bytes: usize,
        idle: Duration,
        head_timeout: Duration,
    ) -> Result<Option<Head>, ReadError> {
        if self.buf.is_empty() {
            match tokio::time::timeout(idle, self.fill()).await {
                Err(_) | Ok(Ok(0)) => return Ok(None),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
            }
        }
        let len = tokio::time::timeout(head_timeout, self.read_head(max_head_bytes))
            .await
            .map_err(|_| ReadError::Timeout)??;
        let head = parse(&self.buf[..len]);
        self.buf.drain(..len);
        Ok(Some(head?))
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    async fn read_head(&mut self, max: usize) -> Result<usize, ReadError> {
        let mut scanned = 0;
        loop {
            if let Some(end) = find_end_from(&self.buf, scanned, max)? {
                return Ok(end);
            }
            scanned = self.buf.len();
            // An early look at the request line turns binary garbage into a 400 quickly.
            sniff_request_line(&self.buf)?;
            if self.fill().await? == 0 {
                return Err(if self.buf.is_empty() {
                    ReadError::Truncated
                } else {
                    HeadError::malformed("connection closed before the end of the headers").into()
                });
            }
        }
    }

    /// Reads exactly `len` body bytes (the caller decided `len` is acceptable).
    pub async fn body(&mut self, len: usize) -> Result<Vec<u8>, ReadError> {
        while self.buf.len() < len {
            if self.fill().await? == 0 {
                return Err(ReadError::Truncated);
            }
        }
        Ok(self.buf.drain(..len).collect())
    }

    /// Reads and drops `len` body bytes, holding at most one chunk of them.
    pub async fn discard(&mut self, mut len: usize) -> Result<(), ReadError> {
        loop {
            let take = len.min(self.buf.len());
            self.buf.drain(..take);
            len -= take;
            if len == 0 {
                return Ok(());
            }
            if self.fill().await? == 0 {
                return Err(ReadError::Truncated);
            }
        }
    }
}

fn sniff_request_line(buf: &[u8]) -> Result<(), HeadError> {
    let line = match buf.iter().position(|&b| b == b'\n') {
        Some(end) => &buf[..end],
        None => &buf[..buf.len().min(64)],
    };
    if line
        .iter()
        .any(|&b| !(b == b'\r' || (0x20..0x7f).contains(&b)))
    {
        return Err(HeadError::malformed("request line is not text"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGENTO: &[u8] =
        b"PURGE / HTTP/1.1\r\nX-Magento-Tags-Pattern: ((^|,)cat_p_1(,|$))\r\nHost: shop\r\n\r\n";

    fn head(bytes: &[u8]) -> Result<Head, HeadError> {
        match find_end(bytes, 72 * 1024)? {
            Some(n) if n == bytes.len() => parse(bytes),
            other => panic!("head end {other:?} of {}", bytes.len()),
        }
    }

    fn refused(bytes: &[u8]) -> HeadError {
        match find_end(bytes, 72 * 1024) {
            Err(e) => e,
            Ok(Some(n)) => parse(&bytes[..n]).expect_err("should be refused"),
            Ok(None) => panic!("incomplete"),
        }
    }

    #[test]
    fn magento_exact_bytes_pass() {
        let h = head(MAGENTO).unwrap();
        assert_eq!(h.method, "PURGE");
        assert_eq!(h.path, "/");
        assert!(h.keep_alive && h.http11);
        assert_eq!(h.content_length, 0);
        assert_eq!(
            h.single("x-magento-tags-pattern").unwrap(),
            Some(&b"((^|,)cat_p_1(,|$))"[..])
        );
    }

    #[test]
    fn long_header_lines_pass() {
        let value = "((^|,)cat_p_1(,|$))|".repeat(1000);
        let req = format!("PURGE / HTTP/1.1\r\nX-Magento-Tags-Pattern: {value}\r\nHost: s\r\n\r\n");
        assert!(req.len() > 16 * 1024);
        assert_eq!(head(req.as_bytes()).unwrap().headers[0].1, value.as_bytes());
    }

    #[test]
    fn content_length_must_be_single_and_plain_digits() {
        let with = |cl: &str| format!("POST / HTTP/1.1\r\nHost: a\r\n{cl}\r\n\r\n");
        assert_eq!(
            head(with("Content-Length: 12").as_bytes())
                .unwrap()
                .content_length,
            12
        );
        assert_eq!(
            head(with("Content-Length: 0").as_bytes())
                .unwrap()
                .content_length,
            0
        );
        for bad in [
            "+3",
            "-3",
            "03",
            "3 3",
            "3,3",
            "0x3",
            "",
            "1234567890123456789",
        ] {
            let req = with(&format!("Content-Length: {bad}"));
            assert_eq!(
                refused(req.as_bytes()),
                HeadError::BadContentLength,
                "{bad:?}"
            );
        }
        let two = with("Content-Length: 3\r\nContent-Length: 30");
        assert_eq!(
            refused(two.as_bytes()),
            HeadError::Duplicate("content-length".into())
        );
        let same = with("Content-Length: 3\r\ncontent-length: 3");
        assert_eq!(refused(same.as_bytes()).status(), 400);
    }

    #[test]
    fn transfer_encoding_is_refused_whatever_it_says() {
        for te in [
            "chunked",
            "identity",
            "identity\r\nTransfer-Encoding: chunked",
            "gzip, chunked",
        ] {
            let req = format!("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {te}\r\n\r\n");
            assert_eq!(refused(req.as_bytes()), HeadError::TransferEncoding, "{te}");
        }
    }

    #[test]
    fn bare_lf_and_bare_cr_are_refused() {
        let e = refused(b"PURGE / HTTP/1.1\nX-Pool: a\n\n");
        assert!(
            matches!(e, HeadError::Malformed(ref m) if m.contains("bare LF")),
            "{e}"
        );
        let e = refused(b"PURGE / HTTP/1.1\r\nX-Pool: a\n\r\n");
        assert!(
            matches!(e, HeadError::Malformed(ref m) if m.contains("bare LF")),
            "{e}"
        );
        let e = refused(b"PURGE / HTTP/1.1\r\nX-Pool: a\rX-Other: b\r\n\r\n");
        assert!(
            matches!(e, HeadError::Malformed(ref m) if m.contains("bare CR")),
            "{e}"
        );
        // Refused as soon as it is seen, without waiting for the rest.
        assert!(find_end(b"PURGE / HTTP/1.1\nX-Po", 1024).is_err());
    }

    #[test]
    fn obs_fold_whitespace_before_colon_and_controls_are_refused() {
        let e = refused(b"PURGE / HTTP/1.1\r\nX-Pool: a\r\n b\r\n\r\n");
        assert!(e.to_string().contains("obs-fold"), "{e}");
        let e = refused(b"PURGE / HTTP/1.1\r\nX-Pool: a\r\n\tb\r\n\r\n");
        assert!(e.to_string().contains("obs-fold"), "{e}");
        let e = refused(b"PURGE / HTTP/1.1\r\nX-Pool : a\r\n\r\n");
        assert!(e.to_string().contains("whitespace between"), "{e}");
        let e = refused(b"PURGE / HTTP/1.1\r\nX-Pool\t: a\r\n\r\n");
        assert!(e.to_string().contains("whitespace between"), "{e}");
        let e = refused(b"PURGE / HTTP/1.1\r\nX-Pool: a\x00b\r\n\r\n");
        assert!(e.to_string().contains("control character"), "{e}");
        let e = refused(b"PURGE / HTTP/1.1\r\nX Pool: a\r\n\r\n");
        assert!(e.to_string().contains("header name"), "{e}");
        let e = refused(b"PURGE / HTTP/1.1\r\nno colon here\r\n\r\n");
        assert!(e.to_string().contains("colon"), "{e}");
        // A tab inside a value is fine, as are bytes above 0x7f.
        assert!(head(b"GET / HTTP/1.1\r\nX-A: a\tb \xc3\xa9\r\n\r\n").is_ok());
    }

    #[test]
    fn request_line_is_strict() {
        for bad in [
            &b"PURGE  / HTTP/1.1\r\n\r\n"[..],
            b"PURGE / HTTP/1.1 x\r\n\r\n",
            b"PURGE / HTTP/2.0\r\n\r\n",
            b"PURGE /\r\n\r\n",
            b"P(RGE / HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert_eq!(
                refused(bad).status(),
                400,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let h = head(b"GET /a?b=c HTTP/1.0\r\n\r\n").unwrap();
        assert!(!h.http11 && !h.keep_alive);
        let h = head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert!(h.keep_alive);
        let h = head(b"GET / HTTP/1.1\r\nConnection: TE, close\r\n\r\n").unwrap();
        assert!(!h.keep_alive);
    }

    #[test]
    fn head_limit_holds_to_the_byte() {
        let limit = 73_728;
        let build = |len: usize| {
            let fixed = "PURGE / HTTP/1.1\r\nX-Pool: \r\n\r\n".len();
            format!(
                "PURGE / HTTP/1.1\r\nX-Pool: {}\r\n\r\n",
                "a".repeat(len - fixed)
            )
        };
        let exact = build(limit);
        assert_eq!(exact.len(), limit);
        assert_eq!(find_end(exact.as_bytes(), limit), Ok(Some(limit)));
        let over = build(limit + 1);
        assert_eq!(
            find_end(over.as_bytes(), limit),
            Err(HeadError::TooLarge(limit))
        );
        assert_eq!(HeadError::TooLarge(limit).status(), 431);
        // Not yet at the limit and no end: wait for more.
        assert_eq!(find_end(&over.as_bytes()[..limit - 1], limit), Ok(None));
        // A head arriving a byte at a time is found, and refused, the same way.
        let mut scanned = 0;
        let mut found = None;
        for n in 1..=exact.len() {
            found = find_end_from(&exact.as_bytes()[..n], scanned, limit).unwrap();
            scanned = n;
        }
        assert_eq!(found, Some(limit));
        let bad = b"GET / HTTP/1.1\r\nA: b\r\rC: d\r\n\r\n";
        let mut result = Ok(None);
        for n in 1..=bad.len() {
            result = find_end_from(&bad[..n], n - 1, limit);
            if result.is_err() {
                break;
            }
        }
        assert!(
            result.is_err(),
            "a bare CR split across reads is still seen"
        );
    }

    #[test]
    fn too_many_fields_is_431() {
        let mut req = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            req.push_str(&format!("X-{i}: v\r\n"));
        }
        req.push_str("\r\n");
        assert_eq!(refused(req.as_bytes()).status(), 431);
    }

    #[test]
    fn duplicates_and_joined_lists() {
        let h = head(
            b"PURGE / HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1\r\nX-Pool: a\r\nx-forwarded-for: 2.2.2.2, 3.3.3.3\r\nX-Pool: b\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            h.joined("X-Forwarded-For").unwrap(),
            b"1.1.1.1,2.2.2.2, 3.3.3.3"
        );
        assert_eq!(
            h.single("x-pool"),
            Err(HeadError::Duplicate("x-pool".into()))
        );
        assert_eq!(h.joined("absent"), None);
        assert_eq!(
            refused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            HeadError::Duplicate("host".into())
        );
    }

    #[tokio::test]
    async fn reader_keeps_pipelined_bytes_and_reads_bodies() {
        let input: &[u8] =
            b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyzGET /b HTTP/1.1\r\n\r\n";
        let mut r = Reader::new(input);
        let t = Duration::from_secs(1);
        let a = r.next_head(1024, t, t).await.unwrap().unwrap();
        assert_eq!(a.content_length, 3);
        assert_eq!(r.body(3).await.unwrap(), b"xyz");
        let b = r.next_head(1024, t, t).await.unwrap().unwrap();
        assert_eq!(b.path, "/b");
        assert!(r.next_head(1024, t, t).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn reader_times_out_a_slow_head() {
        let (mut client, server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\nX-A")
            .await
            .unwrap();
        let mut r = Reader::new(server);
        let t = Duration::from_millis(50);
        let e = r.next_head(1024, t, t).await.unwrap_err();
        assert_eq!(e.status(), Some(408));
        drop(client);
    }
}
