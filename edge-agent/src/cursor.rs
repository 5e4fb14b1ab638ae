//! The agent's purge cursor on local disk: which log, and how far it has been applied.
//!
//! Stored after varnish applied a batch and before the ack is sent, so after a crash of
//! the agent the cursor is at or behind what varnish has: the coordinator may resend a
//! purge, never skip one.
//!
//! The file is one fixed-size record (`log_id:seq:checksum`, padded to [`RECORD`] bytes)
//! overwritten in place with a single positional write: no create, no rename, no fsync.
//! Creating and renaming a file costs about half a millisecond of CPU on these machines,
//! a positional write two microseconds, and the agent stores its cursor after every batch.
//! Safety does not depend on durability: a lost update leaves the cursor behind (a resend,
//! harmless), and a torn or unreadable record fails its checksum and reads as "nothing
//! applied" (a full ban: a cold cache, never a stale one). A power loss that could tear it
//! also empties varnishd's memory cache.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Size of the on-disk record.
pub const RECORD: usize = 128;

/// `(log_id, applied_seq)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    pub log_id: String,
    pub applied_seq: u64,
}

impl Cursor {
    fn encode(&self) -> std::io::Result<[u8; RECORD]> {
        let body = format!("{}:{}", self.log_id, self.applied_seq);
        let line = format!("{body}:{}", checksum(&body));
        if line.len() >= RECORD
            || self.log_id.contains(':')
            || self.log_id.chars().any(char::is_control)
        {
            return Err(std::io::Error::other(
                "log_id unsuitable for the cursor record",
            ));
        }
        let mut out = [b' '; RECORD];
        out[..line.len()].copy_from_slice(line.as_bytes());
        out[RECORD - 1] = b'\n';
        Ok(out)
    }

    fn decode(raw: &[u8]) -> Option<Cursor> {
        let text = std::str::from_utf8(raw).ok()?.trim_end();
        let (body, sum) = text.rsplit_once(':')?;
        if checksum(body) != sum {
            return None;
        }
        let (log_id, seq) = body.split_once(':')?;
        Some(Cursor {
            log_id: log_id.to_owned(),
            applied_seq: seq.parse().ok()?,
        })
    }
}

fn checksum(body: &str) -> String {
    hex::encode(&Sha256::digest(body.as_bytes())[..8])
}

/// The open cursor file.
#[derive(Debug)]
pub struct CursorFile {
    path: PathBuf,
    file: File,
}

impl CursorFile {
    /// Opens (creating) `state_dir/cursor` with owner-only permissions. The state dir is
    /// 0710, group `varnish` ([`daemon::files`]): nobody else can list or write it, and
    /// only varnishd's VCL compiler (users `varnish`/`vcache`, group `varnish`) can pass
    /// through it to the bundle files under `vcl/`.
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        daemon::files::dir_with_mode(state_dir, 0o710)?;
        daemon::files::share_with(state_dir, daemon::files::varnish_gid());
        let path = state_dir.join("cursor");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)?;
        Ok(CursorFile { path, file })
    }

    /// The stored cursor; a missing, empty or corrupt record means "nothing applied".
    pub fn load(&self) -> Cursor {
        let mut raw = [0u8; RECORD];
        match self.file.read_exact_at(&mut raw, 0) {
            Ok(()) => Cursor::decode(&raw).unwrap_or_else(|| {
                tracing::warn!(path = %self.path.display(), "corrupt cursor record; starting over (full ban)");
                Cursor::default()
            }),
            Err(_) => Cursor::default(),
        }
    }

    /// Overwrites the record in place.
    pub fn store(&self, cursor: &Cursor) -> std::io::Result<()> {
        self.file.write_all_at(&cursor.encode()?, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let f = CursorFile::open(dir.path()).unwrap();
        assert_eq!(f.load(), Cursor::default());
        let c = Cursor {
            log_id: "abc".into(),
            applied_seq: 42,
        };
        f.store(&c).unwrap();
        assert_eq!(CursorFile::open(dir.path()).unwrap().load(), c);
        f.store(&Cursor {
            log_id: "abc".into(),
            applied_seq: 7,
        })
        .unwrap();
        assert_eq!(
            f.load().applied_seq,
            7,
            "a shorter record replaces a longer one"
        );
        // Flip one digit: the checksum catches it.
        let mut raw = std::fs::read(dir.path().join("cursor")).unwrap();
        raw[4] = b'9';
        std::fs::write(dir.path().join("cursor"), &raw).unwrap();
        assert_eq!(f.load(), Cursor::default());
        assert!(f
            .store(&Cursor {
                log_id: "a:b".into(),
                applied_seq: 1
            })
            .is_err());
    }
}
