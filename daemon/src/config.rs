//! Config files: TOML into an explicit serde struct (`deny_unknown_fields` on every
//! section), then the struct's own [`Validate::validate`] for what serde cannot check.
//!
//! Every failure is one [`ConfigError`] whose message is one line naming the file or the
//! key, which the binaries print before exiting with status 2.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration that cannot be used, with one clear line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
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
    let config = parse::<T>(&text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })?;
    config.validate()?;
    Ok(config)
}

/// Parses TOML text; the error is serde's message with the byte offset it points at.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| {
        e.message().to_owned()
            + &e.span()
                .map(|s| format!(" (at byte {})", s.start))
                .unwrap_or_default()
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
            ("port = 0", Some("invalid config: port must be positive")),
            ("prot = 80", Some("unknown field `prot`")),
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
