//! Everything the agent does to its varnishd: the admin CLI client ([`admin`]) and
//! [`Varnish`], which applies planned operations: bans over the CLI, xkey purges as a
//! `PURGE` request to varnish's own HTTP port (the project's VCL turns it into
//! `xkey.purge`/`xkey.softpurge`).

pub mod admin;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::VarnishConfig;
use crate::plan::VarnishOp;
use admin::{quote, AdminClient, AdminError};

/// Errors applying an operation.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("cannot read varnish secret file {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("xkey purge via {addr} failed: {reason}")]
    Xkey { addr: SocketAddr, reason: String },
    #[error("HTTP request to varnish at {addr} failed: {reason}")]
    Http { addr: SocketAddr, reason: String },
}

impl ApplyError {
    /// Whether varnish refused the operation itself (a syntax or parameter error, such
    /// as a regex PCRE2 cannot compile): sending it again can never work. Everything else
    /// (connection, timeout, authentication, a child not running) may pass.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ApplyError::Admin(AdminError::Refused { status, .. }) if (100..200).contains(status))
            || matches!(self, ApplyError::Admin(AdminError::BadArgument))
    }
}

/// The local varnishd, with a lazily (re)connected admin session.
#[derive(Debug)]
pub struct Varnish {
    config: VarnishConfig,
    admin: Option<AdminClient>,
}

impl Varnish {
    pub fn new(config: VarnishConfig) -> Self {
        Varnish {
            config,
            admin: None,
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    /// The admin session, connecting (and reading the secret) if there is none.
    async fn admin(&mut self) -> Result<&mut AdminClient, ApplyError> {
        if self.admin.is_none() {
            let secret =
                std::fs::read(&self.config.secret_file).map_err(|source| ApplyError::Secret {
                    path: self.config.secret_file.clone(),
                    source,
                })?;
            let client = AdminClient::connect(self.config.admin, &secret, self.timeout()).await?;
            self.admin = Some(client);
        }
        self.admin
            .as_mut()
            .ok_or_else(|| ApplyError::Admin(AdminError::Protocol("no admin session".into())))
    }

    /// Connects if needed and returns varnishd's version.
    pub async fn version(&mut self) -> Result<String, ApplyError> {
        Ok(self.admin().await?.version().unwrap_or_default())
    }

    /// Runs one admin command (reconnecting first if needed); `timeout` overrides the
    /// configured one for slow commands. On error the session is dropped.
    pub async fn command(
        &mut self,
        line: &str,
        timeout: Option<Duration>,
    ) -> Result<String, ApplyError> {
        let result = match self.admin().await {
            Ok(admin) => match timeout {
                Some(t) => admin.command_slow(line, t).await,
                None => admin.command(line).await,
            }
            .map_err(ApplyError::from),
            Err(e) => Err(e),
        };
        if matches!(
            result,
            Err(ApplyError::Admin(
                AdminError::Io(_) | AdminError::Timeout | AdminError::Protocol(_)
            )) | Err(ApplyError::Secret { .. })
        ) {
            self.admin = None;
        }
        result
    }

    /// `GET path` with `Host: host` through varnish, marked as the agent's own
    /// ([`crate::mark`]); the response status and varnish's cache verdict.
    pub async fn probe(&self, path: &str, host: &str) -> Result<(u16, String), ApplyError> {
        let addr = self.config.http;
        let mark = [crate::mark::header(crate::mark::Kind::Check)];
        warmer::fetch::get(addr, path, host, &mark, self.timeout())
            .await
            .map(|f| (f.status, f.cache))
            .map_err(|e| ApplyError::Http {
                addr,
                reason: e.to_string(),
            })
    }

    /// Applies one operation. On error the admin session is dropped so the next attempt
    /// reconnects (varnishd may have restarted).
    pub async fn apply(&mut self, op: &VarnishOp) -> Result<(), ApplyError> {
        let result = match op {
            VarnishOp::Xkey { tags, soft } => self.xkey(tags, *soft).await,
            _ => match ban_command(op) {
                Ok(line) => match self.admin().await {
                    Ok(admin) => admin
                        .command(&line)
                        .await
                        .map(|_| ())
                        .map_err(ApplyError::from),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e.into()),
            },
        };
        if result.is_err() {
            self.admin = None;
        }
        result
    }

    /// `PURGE /` with `X-Xkey-Purge: TAGS` to varnish's HTTP port: the project's VCL
    /// answers `200 Invalidated N` (xkey's count) when it took it.
    async fn xkey(&self, tags: &[String], soft: bool) -> Result<(), ApplyError> {
        let addr = self.config.http;
        let fail = |reason: String| ApplyError::Xkey { addr, reason };
        let header = tags.join(" ");
        if header.chars().any(char::is_control) {
            return Err(fail("tag with a control character".into()));
        }
        let mut headers = vec![
            ("X-Xkey-Purge".to_owned(), header),
            crate::mark::header(crate::mark::Kind::Purge),
        ];
        if soft {
            headers.push(("X-Magento-Purge-Soft".to_owned(), "1".to_owned()));
        }
        let answer =
            warmer::fetch::request("PURGE", addr, "/", "localhost", &headers, self.timeout())
                .await
                .map_err(|e| fail(e.to_string()))?;
        if answer.status == 200 && answer.reason.contains("Invalidated") {
            Ok(())
        } else {
            Err(fail(format!(
                "varnish answered {} {:?}; is the project's VCL (with xkey) loaded?",
                answer.status, answer.reason
            )))
        }
    }
}

/// The CLI line for a ban operation.
pub fn ban_command(op: &VarnishOp) -> Result<String, AdminError> {
    Ok(match op {
        VarnishOp::BanAll => "ban obj.status != 0".to_owned(),
        VarnishOp::BanTags(re) => format!("ban obj.http.X-Magento-Tags ~ {}", quote(re)?),
        VarnishOp::BanTagList(tags) => format!(
            "ban obj.http.X-Magento-Tags ~ {}",
            quote(&crate::plan::tags_regex(tags))?
        ),
        VarnishOp::BanPool(re) => format!("ban obj.http.X-Pool ~ {}", quote(re)?),
        VarnishOp::BanUrl { path, host } if host.is_empty() => {
            format!("ban req.url == {}", quote(path)?)
        }
        VarnishOp::BanUrl { path, host } => format!(
            "ban req.url == {} && req.http.host == {}",
            quote(path)?,
            quote(host)?
        ),
        VarnishOp::Xkey { .. } => return Err(AdminError::Protocol("xkey is not a ban".into())),
    })
}
