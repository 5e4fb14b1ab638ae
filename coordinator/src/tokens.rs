//! Who may call the API: named bearer tokens, each with its scopes.
//!
//! A team gives each caller its own token: the deploy pipeline one that may push config
//! and start warm jobs, the wall dashboard one that may only read, each operator one
//! that may do anything. `[[api.tokens]]` names each (`name`, shown in the audit log and
//! the logs, never the secret), the file holding its secret (re-read on SIGHUP, so a
//! token is rotated without a restart) and its [`Scope`]s. The older `[api] token_file`
//! is one more token, named [`LEGACY_NAME`], with every scope.
//!
//! [`Tokens::check`] turns an `Authorization` header and the scope a route needs into
//! the [`Caller`] or a [`Refusal`]: no token or one nobody holds is `401`, a known token
//! outside its scope `403` naming the scope it lacks. Every secret is compared in
//! constant time, and every one of them on each request, so the time taken does not tell
//! which token a guess came close to. A token file that is empty is refused at load: an
//! empty secret would match a request that sends none.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use daemon::sync::RecoverRw;
use serde::{Deserialize, Serialize};

/// The name `[api] token_file`'s token goes by.
pub const LEGACY_NAME: &str = "token_file";

/// What a token may do. Every scope may read; `admin` may do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read endpoints (under `read_requires_token`) and the audit log.
    Read,
    /// Purges through the API (`coordinator purge`).
    Purge,
    /// Start and cancel warm jobs.
    Warm,
    /// Push and roll back config, and read stored bundles (they may hold credentials).
    Config,
    /// Everything, including drains, silences, backups and the coordinators' own calls.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Purge => "purge",
            Scope::Warm => "warm",
            Scope::Config => "config",
            Scope::Admin => "admin",
        }
    }
}

/// One `[[api.tokens]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in the audit log and the logs: `[A-Za-z0-9_.-]`, 1 to 64 characters.
    pub name: String,
    /// The file holding the secret (surrounding whitespace ignored).
    pub file: PathBuf,
    pub scopes: Vec<Scope>,
}

/// Checks `[[api.tokens]]` beside `[api] token_file`: names well formed and unique
/// (also against [`LEGACY_NAME`] when the legacy file is set), each with a scope.
pub fn validate(tokens: &[TokenConfig], legacy: Option<&Path>) -> Result<(), String> {
    let mut names: Vec<&str> = legacy.map(|_| LEGACY_NAME).into_iter().collect();
    for t in tokens {
        let ok = (1..=64).contains(&t.name.len())
            && t.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !ok {
            return Err(format!(
                "api.tokens: name {:?} must be 1 to 64 of [A-Za-z0-9_.-]",
                t.name
            ));
        }
        if names.contains(&t.name.as_str()) {
            return Err(format!(
                "api.tokens: name {:?} is given twice{}",
                t.name,
                if t.name == LEGACY_NAME {
                    " (it is the name of [api] token_file's token)"
                } else {
                    ""
                }
            ));
        }
        names.push(&t.name);
        if t.scopes.is_empty() {
            return Err(format!(
                "api.tokens {:?}: scopes is empty (give some of read, purge, warm, config, admin)",
                t.name
            ));
        }
    }
    Ok(())
}

/// Why a token could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the token file of {name:?} ({path}): {source}")]
    Read {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error("the token file of {name:?} ({path}) is empty")]
    Empty { name: String, path: String },
    /// Two tokens with one secret: a caller could not be told apart, and one of them
    /// would get the other's scopes.
    #[error("tokens {first:?} and {second:?} have the same secret: give each its own")]
    Shared { first: String, second: String },
}

/// The first two tokens sharing a secret, if any.
fn shared(loaded: &[Loaded]) -> Option<TokenError> {
    for (i, a) in loaded.iter().enumerate() {
        if let Some(b) = loaded[i + 1..].iter().find(|b| b.secret == a.secret) {
            return Some(TokenError::Shared {
                first: a.name.to_string(),
                second: b.name.to_string(),
            });
        }
    }
    None
}

/// Who called: the token's name and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: Arc<str>,
    pub scopes: Vec<Scope>,
}

impl Caller {
    pub fn may(&self, scope: Scope) -> bool {
        scope == Scope::Read || self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }
}

/// Why a request was refused; [`Refusal::status`] is the answer's status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No token is configured: the endpoint cannot be used at all.
    #[error("write API disabled: no [api] token_file or [[api.tokens]] configured")]
    NoTokens,
    #[error("missing bearer token (send Authorization: Bearer <token>)")]
    Missing,
    #[error("unknown bearer token")]
    Unknown,
    #[error("token {name:?} lacks the {scope:?} scope this needs", scope = scope.as_str())]
    Lacks { name: Arc<str>, scope: Scope },
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Missing | Refusal::Unknown => 401,
            Refusal::NoTokens | Refusal::Lacks { .. } => 403,
        }
    }

    /// The token's name, when it was known but lacked the scope.
    pub fn name(&self) -> Option<&str> {
        match self {
            Refusal::Lacks { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// A loaded token.
#[derive(Clone)]
struct Loaded {
    name: Arc<str>,
    file: PathBuf,
    scopes: Vec<Scope>,
    secret: Arc<str>,
}

/// Every token the API accepts; replaced file by file on [`Tokens::reload`].
#[derive(Clone, Default)]
pub struct Tokens {
    loaded: Arc<RwLock<Vec<Loaded>>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<Arc<str>> = self
            .loaded
            .read_locked()
            .iter()
            .map(|t| t.name.clone())
            .collect();
        f.debug_struct("Tokens").field("names", &names).finish()
    }
}

fn read_secret(name: &str, file: &Path) -> Result<Arc<str>, TokenError> {
    let text = std::fs::read_to_string(file).map_err(|source| TokenError::Read {
        name: name.to_owned(),
        path: file.display().to_string(),
        source,
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(TokenError::Empty {
            name: name.to_owned(),
            path: file.display().to_string(),
        });
    }
    Ok(Arc::from(secret))
}

impl Tokens {
    /// Reads every token's file: `[api] token_file` (as [`LEGACY_NAME`], every scope),
    /// then `[[api.tokens]]`. Any file that cannot be read, or is empty, is an error.
    pub fn load(legacy: Option<&Path>, tokens: &[TokenConfig]) -> Result<Self, TokenError> {
        let mut loaded = Vec::new();
        if let Some(file) = legacy {
            loaded.push(Loaded {
                name: Arc::from(LEGACY_NAME),
                file: file.to_owned(),
                scopes: vec![Scope::Admin],
                secret: read_secret(LEGACY_NAME, file)?,
            });
        }
        for t in tokens {
            loaded.push(Loaded {
                name: Arc::from(t.name.as_str()),
                file: t.file.clone(),
                scopes: t.scopes.clone(),
                secret: read_secret(&t.name, &t.file)?,
            });
        }
        if let Some(e) = shared(&loaded) {
            return Err(e);
        }
        Ok(Tokens {
            loaded: Arc::new(RwLock::new(loaded)),
        })
    }

    /// Re-reads every token's file; one that fails keeps its previous secret. The
    /// names reloaded, and the errors of the others. A reload that would give two
    /// tokens one secret changes nothing.
    pub fn reload(&self) -> (Vec<Arc<str>>, Vec<TokenError>) {
        let mut current = self.loaded.read_locked().clone();
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for t in &mut current {
            match read_secret(&t.name, &t.file) {
                Ok(secret) => {
                    t.secret = secret;
                    ok.push(t.name.clone());
                }
                Err(e) => failed.push(e),
            }
        }
        if let Some(e) = shared(&current) {
            return (Vec::new(), vec![e]);
        }
        *self.loaded.write_locked() = current;
        (ok, failed)
    }

    /// Whether any token is configured.
    pub fn any(&self) -> bool {
        !self.loaded.read_locked().is_empty()
    }

    /// The caller an `Authorization` value names, if any (`Ok(None)`: none was sent).
    pub fn identify(&self, authorization: Option<&[u8]>) -> Result<Option<Caller>, Refusal> {
        let Some(value) = authorization else {
            return Ok(None);
        };
        let given = value.strip_prefix(b"Bearer ").unwrap_or(value).trim_ascii();
        if given.is_empty() {
            return Ok(None);
        }
        // Every secret compared, whichever matches: the time does not tell which.
        let mut found = None;
        for t in self.loaded.read_locked().iter() {
            if crate::secret::constant_time_eq(given, t.secret.as_bytes()) && found.is_none() {
                found = Some(Caller {
                    name: t.name.clone(),
                    scopes: t.scopes.clone(),
                });
            }
        }
        found.map(Some).ok_or(Refusal::Unknown)
    }

    /// The caller, if it may do what needs `scope`.
    pub fn check(&self, authorization: Option<&[u8]>, scope: Scope) -> Result<Caller, Refusal> {
        if !self.any() {
            return Err(Refusal::NoTokens);
        }
        let caller = self.identify(authorization)?.ok_or(Refusal::Missing)?;
        if caller.may(scope) {
            Ok(caller)
        } else {
            Err(Refusal::Lacks {
                name: caller.name,
                scope,
            })
        }
    }

    /// The secret this coordinator sends to its peers (their reads under
    /// `read_requires_token` and the warm relay, an `admin` call): `[api] token_file`'s,
    /// else the first `admin` token's.
    pub fn peer_secret(&self) -> Option<Arc<str>> {
        let loaded = self.loaded.read_locked();
        loaded
            .iter()
            .find(|t| t.scopes.contains(&Scope::Admin))
            .map(|t| t.secret.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(dir: &Path) -> Tokens {
        std::fs::write(dir.join("deploy"), "s3cret-deploy\n").unwrap();
        std::fs::write(dir.join("dash"), "s3cret-dash").unwrap();
        Tokens::load(
            None,
            &[
                TokenConfig {
                    name: "deploy-pipeline".into(),
                    file: dir.join("deploy"),
                    scopes: vec![Scope::Config, Scope::Warm],
                },
                TokenConfig {
                    name: "dashboard".into(),
                    file: dir.join("dash"),
                    scopes: vec![Scope::Read],
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn scopes_decide_and_refusals_name_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path());
        let deploy = Some(&b"Bearer s3cret-deploy"[..]);
        assert_eq!(
            &*t.check(deploy, Scope::Config).unwrap().name,
            "deploy-pipeline"
        );
        assert!(t.check(deploy, Scope::Read).is_ok(), "every scope may read");
        let lacks = t.check(deploy, Scope::Purge).unwrap_err();
        assert_eq!(lacks.status(), 403);
        assert_eq!(
            lacks.to_string(),
            "token \"deploy-pipeline\" lacks the \"purge\" scope this needs"
        );
        let dash = Some(&b"Bearer s3cret-dash"[..]);
        assert!(t.check(dash, Scope::Read).is_ok());
        assert_eq!(t.check(dash, Scope::Warm).unwrap_err().status(), 403);
        assert_eq!(t.check(None, Scope::Read), Err(Refusal::Missing));
        assert_eq!(
            t.check(Some(b"Bearer "), Scope::Read),
            Err(Refusal::Missing)
        );
        assert_eq!(
            t.check(Some(b"Bearer nope"), Scope::Read),
            Err(Refusal::Unknown)
        );
        assert_eq!(Refusal::Unknown.status(), 401);
        assert_eq!(
            Tokens::default().check(deploy, Scope::Read),
            Err(Refusal::NoTokens)
        );
    }

    #[test]
    fn the_legacy_file_is_every_scope_and_the_peers_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "legacy").unwrap();
        let t = Tokens::load(Some(&dir.path().join("t")), &[]).unwrap();
        let c = t.check(Some(b"Bearer legacy"), Scope::Admin).unwrap();
        assert_eq!(&*c.name, LEGACY_NAME);
        assert!(c.may(Scope::Purge) && c.may(Scope::Config));
        assert_eq!(t.peer_secret().as_deref(), Some("legacy"));
        assert_eq!(tokens(dir.path()).peer_secret(), None, "no admin token");
    }

    #[test]
    fn empty_files_are_refused_and_a_failed_reload_keeps_the_old_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("e"), " \n").unwrap();
        let err = Tokens::load(Some(&dir.path().join("e")), &[]).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");

        let t = tokens(dir.path());
        std::fs::write(dir.path().join("deploy"), "rotated").unwrap();
        std::fs::remove_file(dir.path().join("dash")).unwrap();
        let (ok, failed) = t.reload();
        assert_eq!(ok.len(), 1);
        assert_eq!(failed.len(), 1);
        assert!(t.check(Some(b"Bearer rotated"), Scope::Warm).is_ok());
        assert_eq!(
            t.check(Some(b"Bearer s3cret-deploy"), Scope::Warm),
            Err(Refusal::Unknown)
        );
        assert!(
            t.check(Some(b"Bearer s3cret-dash"), Scope::Read).is_ok(),
            "kept"
        );
    }

    #[test]
    fn names_are_checked() {
        let t = |name: &str, scopes: Vec<Scope>| TokenConfig {
            name: name.into(),
            file: "/f".into(),
            scopes,
        };
        assert!(validate(&[t("ci", vec![Scope::Warm])], None).is_ok());
        assert!(validate(&[t("a b", vec![Scope::Warm])], None).is_err());
        assert!(validate(&[t("ci", vec![])], None)
            .unwrap_err()
            .contains("scopes is empty"));
        assert!(validate(
            &[t("ci", vec![Scope::Read]), t("ci", vec![Scope::Read])],
            None
        )
        .is_err());
        let e = validate(&[t(LEGACY_NAME, vec![Scope::Read])], Some(Path::new("/t"))).unwrap_err();
        assert!(e.contains("token_file"), "{e}");
    }
}
