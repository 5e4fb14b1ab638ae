//! Config files: TOML into an explicit serde struct (`deny_unknown_fields` on every
//! section), then the struct's own [`Validate::validate`] for what serde cannot check.
//!
//! Every failure is one [`ConfigError`] whose message is one line naming the file, and
//! for a value serde refused its line, column, key path and the value itself
//! (`coordinator.toml:7:9: purge.allow[1]: "10.0.0.0/33": invalid IP address syntax`);
//! the binaries print it and exit with status 2.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Mutual TLS between coordinator and agents, as both configs spell it (the
/// coordinator's `[grpc.tls]`, the agent's `[tls]`): the cluster CA that signs the other
/// side's certificate, and this side's own certificate and key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A configuration that cannot be used, with one clear line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}: {message}", path.display(), at.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        /// Line and column (from 1) where the parser stopped.
        at: Option<(usize, usize)>,
        message: String,
    },
    /// What a section's `validate()` refused (the message names the key).
    #[error("invalid config: {0}")]
    Invalid(String),
    /// [`ConfigError::Invalid`] in a file [`load`] read.
    #[error("{}: {message}", path.display())]
    InvalidIn { path: PathBuf, message: String },
}

impl ConfigError {
    /// An invalid value, described in one line (`section.key …`).
    pub fn invalid(message: impl Into<String>) -> Self {
        ConfigError::Invalid(message.into())
    }
}

/// What serde cannot check: ranges, names, and how sections refer to each other.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Reads, parses and validates a TOML file.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let config = parse::<T>(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        at: e.at,
        message: e.message,
    })?;
    config.validate().map_err(|e| match e {
        ConfigError::Invalid(message) => ConfigError::InvalidIn {
            path: path.to_owned(),
            message,
        },
        other => other,
    })?;
    Ok(config)
}

/// Where and why TOML text could not be read into the struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// Line and column (from 1) where the parser stopped.
    pub at: Option<(usize, usize)>,
    /// `KEY: VALUE: what is wrong`, with what is known of the key and value.
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some((line, column)) = self.at {
            write!(f, "{line}:{column}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Parses TOML text: on failure, where serde stopped, the key path holding the bad value
/// (`purge.allow[1]`), the value as written, and serde's reason.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, ParseError> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let reason = inner.message().trim().to_owned();
        // An unknown key names itself; its path would say it twice.
        let about_key = reason.starts_with("unknown field");
        let mut message = String::new();
        if key != "." && !about_key {
            message.push_str(&format!("{key}: "));
        }
        let span = inner.span();
        if let Some(value) = span.as_ref().and_then(|s| text.get(s.clone())) {
            let value = value.trim();
            // A scalar as written, not a whole table or array.
            let scalar =
                !value.is_empty() && value.len() <= 200 && !value.contains(['\n', '=', '[', '{']);
            if scalar && !about_key {
                message.push_str(&format!("{value}: "));
            }
        }
        message.push_str(&reason);
        let at = span.map(|s| {
            let before = &text[..s.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            (line, column)
        });
        ParseError { at, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        port: u16,
    }

    impl Validate for Sample {
        fn validate(&self) -> Result<(), ConfigError> {
            if self.port == 0 {
                return Err(ConfigError::invalid("port must be positive"));
            }
            Ok(())
        }
    }

    #[test]
    fn load_reads_parses_and_validates() {
        let dir = std::env::temp_dir().join(format!("daemon-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("c.toml");
        for (text, want) in [
            ("port = 80", None),
            ("port = 0", Some("c.toml: port must be positive")),
            ("prot = 80", Some("c.toml:1:1: unknown field `prot`")),
            (
                "port = \"x\"",
                Some("c.toml:1:8: port: \"x\": invalid type: string"),
            ),
            (
                "\n\nport = 70000",
                Some("c.toml:3:8: port: 70000: invalid value"),
            ),
        ] {
            std::fs::write(&file, text).expect("write");
            match (load::<Sample>(&file), want) {
                (Ok(s), None) => assert_eq!(s.port, 80),
                (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{e}"),
                (r, w) => panic!("{text}: {r:?}, wanted {w:?}"),
            }
        }
        let missing = load::<Sample>(&dir.join("nope.toml")).expect_err("missing");
        assert!(missing.to_string().starts_with("cannot read "), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
