//! The agent's purge cursor on local disk: which log, and how far it has been applied.
//!
//! Written after varnish applied a batch and before the ack is sent, atomically (temp
//! file, fsync, rename, fsync of the directory), so after any crash the cursor is at or
//! behind what varnish has: the coordinator may resend a purge, never skip one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `(log_id, applied_seq)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub log_id: String,
    pub applied_seq: u64,
}

/// The file that holds the cursor.
#[derive(Debug, Clone)]
pub struct CursorFile {
    path: PathBuf,
}

impl CursorFile {
    /// Creates the state directory if needed (owner-only permissions).
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(CursorFile {
            path: state_dir.join("cursor.json"),
        })
    }

    /// The stored cursor; a missing or unreadable file means "nothing applied".
    pub fn load(&self) -> Cursor {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %self.path.display(), error = %e, "unreadable cursor; starting over (full ban)");
                Cursor::default()
            }),
            Err(_) => Cursor::default(),
        }
    }

    /// Durably replaces the stored cursor.
    pub fn store(&self, cursor: &Cursor) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(cursor).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let f = CursorFile::open(dir.path()).unwrap();
        assert_eq!(f.load(), Cursor::default());
        let c = Cursor {
            log_id: "abc".into(),
            applied_seq: 42,
        };
        f.store(&c).unwrap();
        assert_eq!(f.load(), c);
        std::fs::write(dir.path().join("cursor.json"), b"\x00garbage").unwrap();
        assert_eq!(f.load(), Cursor::default());
    }
}
