//! A client for varnishd's admin CLI (`-T`), spoken directly instead of via `varnishadm`.
//!
//! The protocol: every response is a 13-byte header `SSS LLLLLLLL\n` (status, body length),
//! the body, and a newline. On connect varnishd sends `107` with a 32-byte challenge; we
//! answer `auth <sha256(challenge \n secret challenge \n)>` and get `200` with the banner.
//! Commands are one line; arguments are double-quoted with `\\` and `\"` escaped
//! ([`quote`]), and anything with a control character is refused before it is sent.
//!
//! Quoting, as varnishd 7.1 reads it (checked against a real one): the manager splits
//! the line into arguments (`VAV_Parse`: inside `"..."` a backslash escapes the next
//! character, `\NNN` and `\xHH` are bytes) and, for a command the cache process runs
//! (`ban`), hands each argument on re-escaped (`"`, `\` and bytes outside printable
//! ASCII as escapes) but *unquoted*. So every byte survives both parsers except a
//! space: the cache process splits the argument there, and `ban req.url == "/a && b"`
//! would arrive as another ban. [`quote`] refuses spaces (the coordinator refuses URLs
//! with one; a tag regex writes a space as `\x20`).

use std::net::SocketAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// CLI status codes (`include/vcli.h`).
pub const CLIS_OK: u16 = 200;
const CLIS_AUTH: u16 = 107;
/// Refuse to buffer responses larger than this.
const MAX_BODY: usize = 4 << 20;

/// Errors talking to varnishd.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot connect to varnish admin at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("varnish admin I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("varnish admin timed out")]
    Timeout,
    #[error("varnish admin protocol error: {0}")]
    Protocol(String),
    #[error("varnish admin authentication failed (check secret_file)")]
    Auth,
    #[error("varnish refused `{command}`: {status} {message}")]
    Refused {
        command: String,
        status: u16,
        message: String,
    },
    #[error("refusing to send an argument with a control character or a space (varnishd's CLI splits it)")]
    BadArgument,
}

/// An authenticated admin connection.
#[derive(Debug)]
pub struct AdminClient {
    stream: BufReader<TcpStream>,
    timeout: Duration,
    banner: String,
}

impl AdminClient {
    /// Connects and authenticates with the secret file's exact bytes.
    pub async fn connect(
        addr: SocketAddr,
        secret: &[u8],
        timeout: Duration,
    ) -> Result<Self, AdminError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| AdminError::Timeout)?
            .map_err(|source| AdminError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let mut client = AdminClient {
            stream: BufReader::new(stream),
            timeout,
            banner: String::new(),
        };
        let (status, body) = client.read_response().await?;
        let (status, body) = if status == CLIS_AUTH {
            let challenge = body
                .lines()
                .next()
                .filter(|c| c.len() == 32)
                .ok_or_else(|| AdminError::Protocol("bad auth challenge".into()))?
                .to_owned();
            client
                .send_line(&format!("auth {}", auth_response(&challenge, secret)))
                .await?;
            let (status, body) = client.read_response().await?;
            if status != CLIS_OK {
                return Err(AdminError::Auth);
            }
            (status, body)
        } else {
            (status, body)
        };
        if status != CLIS_OK {
            return Err(AdminError::Protocol(format!(
                "unexpected greeting status {status}"
            )));
        }
        client.banner = body;
        Ok(client)
    }

    /// The banner varnishd sent after authentication.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// The `varnish-X.Y.Z` version named in the banner, if any.
    pub fn version(&self) -> Option<String> {
        self.banner
            .split_whitespace()
            .find(|w| w.starts_with("varnish-"))
            .map(|w| w.trim_start_matches("varnish-").to_owned())
    }

    /// Runs one command with a longer timeout (a `vcl.load` compiles with a C compiler).
    pub async fn command_slow(
        &mut self,
        line: &str,
        timeout: Duration,
    ) -> Result<String, AdminError> {
        let normal = std::mem::replace(&mut self.timeout, timeout);
        let result = self.command(line).await;
        self.timeout = normal;
        result
    }

    /// Runs one command line; a non-200 status is an error carrying varnish's message.
    pub async fn command(&mut self, line: &str) -> Result<String, AdminError> {
        if line.chars().any(char::is_control) {
            return Err(AdminError::BadArgument);
        }
        self.send_line(line).await?;
        let (status, body) = self.read_response().await?;
        if status != CLIS_OK {
            return Err(AdminError::Refused {
                command: line.chars().take(200).collect(),
                status,
                message: body.trim().to_owned(),
            });
        }
        Ok(body)
    }

    async fn send_line(&mut self, line: &str) -> Result<(), AdminError> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        tokio::time::timeout(self.timeout, self.stream.get_mut().write_all(&buf))
            .await
            .map_err(|_| AdminError::Timeout)??;
        Ok(())
    }

    async fn read_response(&mut self) -> Result<(u16, String), AdminError> {
        tokio::time::timeout(self.timeout, async {
            let mut header = [0u8; 13];
            self.stream.read_exact(&mut header).await?;
            let (status, len) = parse_header(&header)?;
            if len > MAX_BODY {
                return Err(AdminError::Protocol(format!(
                    "response of {len} bytes is too large"
                )));
            }
            let mut body = vec![0u8; len + 1];
            self.stream.read_exact(&mut body).await?;
            body.pop();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        })
        .await
        .map_err(|_| AdminError::Timeout)?
    }
}

fn parse_header(header: &[u8; 13]) -> Result<(u16, usize), AdminError> {
    let text =
        std::str::from_utf8(header).map_err(|_| AdminError::Protocol("non-text header".into()))?;
    let bad = || AdminError::Protocol(format!("bad response header {text:?}"));
    if !text.ends_with('\n') {
        return Err(bad());
    }
    let mut parts = text.split_whitespace();
    let status = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let len = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok((status, len))
}

/// `sha256(challenge + "\n" + secret + challenge + "\n")` in lowercase hex.
pub fn auth_response(challenge: &str, secret: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(challenge.as_bytes());
    h.update(b"\n");
    h.update(secret);
    h.update(challenge.as_bytes());
    h.update(b"\n");
    hex::encode(h.finalize())
}

/// Quotes one CLI argument: `"..."` with backslashes and quotes escaped. An argument
/// with a control character or a space cannot be passed on intact and is refused.
pub fn quote(arg: &str) -> Result<String, AdminError> {
    if arg.chars().any(|c| c.is_control() || c == ' ') {
        return Err(AdminError::BadArgument);
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('"');
    for c in arg.chars() {
        if c == '\\' || c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_parsing() {
        assert_eq!(parse_header(b"200 5       \n").unwrap(), (200, 5));
        assert!(parse_header(b"xx0 5       \n").is_err());
        assert!(parse_header(b"200 5        ").is_err());
    }

    #[test]
    fn quoting_escapes_and_refuses_newlines() {
        assert_eq!(quote(r#"a"b\c"#).unwrap(), r#""a\"b\\c""#);
        assert_eq!(quote("/é?x=%22").unwrap(), "\"/é?x=%22\"");
        assert!(quote("a\nb").is_err());
        assert!(
            quote("/a && obj.status != 0").is_err(),
            "a space splits the argument"
        );
    }

    #[test]
    fn auth_matches_varnish_definition() {
        // Computed independently: printf 'abc\nsecretabc\n' | sha256sum
        assert_eq!(
            auth_response("abc", b"secret"),
            "3201ef34f65750099501255a4b11658e03443134c126ce5078c560468ba5f42d"
        );
    }
}
