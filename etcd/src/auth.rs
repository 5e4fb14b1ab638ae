//! etcd's user/password authentication: [`Credentials`] are exchanged for a token
//! (`Auth.Authenticate`), and [`Token`], an interceptor on every client [`crate::Etcd`]
//! hands out, sends it as the `token` metadata etcd expects.
//!
//! etcd's tokens expire (`--auth-token-ttl`, 5 minutes by default, and JWT tokens by
//! their own TTL), so a handle with credentials asks for a new one every
//! [`REFRESH_EVERY`] ([`crate::Etcd::keep_authenticated`]), and [`crate::Etcd::retry`]
//! asks again and calls once more when etcd answers that the token is invalid. The
//! password is never logged, and `Debug` does not print it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;

/// How often a fresh token is asked for; well inside etcd's default 5-minute TTL.
pub const REFRESH_EVERY: Duration = Duration::from_secs(60);

/// A user name and password for etcd's authentication.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The credentials and the token they last got.
#[derive(Debug)]
pub(crate) struct Auth {
    pub(crate) credentials: Credentials,
    token: RwLock<Option<MetadataValue<Ascii>>>,
}

impl Auth {
    pub(crate) fn new(credentials: Credentials) -> Self {
        Auth {
            credentials,
            token: RwLock::new(None),
        }
    }

    /// Keeps `token` for every request from now on; false (and nothing kept) for a
    /// token that cannot go in metadata (not visible ASCII).
    // A leaf lock held for a clone: its wait is never long (the client does not
    // depend on `daemon`, whose `locked()` the workspace otherwise uses).
    #[allow(clippy::disallowed_methods)]
    pub(crate) fn set(&self, token: &str) -> bool {
        let Ok(value) = MetadataValue::try_from(token) else {
            return false;
        };
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = Some(value);
        true
    }

    #[allow(clippy::disallowed_methods)]
    fn get(&self) -> Option<MetadataValue<Ascii>> {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Adds the current token, if there is one, to each request.
#[derive(Debug, Clone, Default)]
pub struct Token(pub(crate) Option<Arc<Auth>>);

impl Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = self.0.as_ref().and_then(|a| a.get()) {
            req.metadata_mut().insert("token", token);
        }
        Ok(req)
    }
}

/// Whether `status` is etcd saying the request's token is missing, expired or revoked.
pub fn is_token_error(status: &tonic::Status) -> bool {
    let m = status.message();
    status.code() == tonic::Code::Unauthenticated
        || m.contains("invalid auth token")
        || m.contains("user name is empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_never_printed() {
        let c = Credentials {
            user: "coordinator".into(),
            password: "s3cret".into(),
        };
        let shown = format!("{c:?} {:?}", Auth::new(c.clone()));
        assert!(shown.contains("coordinator"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn the_token_goes_on_every_request_once_there_is_one() {
        let auth = Arc::new(Auth::new(Credentials {
            user: "u".into(),
            password: "p".into(),
        }));
        let mut t = Token(Some(auth.clone()));
        let req = t
            .call(tonic::Request::new(()))
            .expect("no token yet is fine");
        assert!(req.metadata().get("token").is_none());
        assert!(auth.set("abc.123"));
        let req = t.call(tonic::Request::new(())).expect("token");
        assert_eq!(
            req.metadata().get("token").map(|v| v.to_str().ok()),
            Some(Some("abc.123"))
        );
        assert!(!auth.set("caf\u{e9}\n"));
    }

    #[test]
    fn token_errors_are_recognised() {
        assert!(is_token_error(&tonic::Status::unauthenticated(
            "etcdserver: invalid auth token"
        )));
        assert!(is_token_error(&tonic::Status::invalid_argument(
            "etcdserver: user name is empty"
        )));
        assert!(!is_token_error(&tonic::Status::unavailable(
            "connection refused"
        )));
    }
}
