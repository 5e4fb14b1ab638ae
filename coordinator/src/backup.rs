//! `coordinator backup` and `coordinator restore`: a consistent copy of the embedded
//! state, taken while the coordinator runs, and a state dir made from it.
//!
//! The redb files are held open by the running coordinator, so a backup goes through
//! it ([`take`], behind the API's `POST /api/v1/backup`): each store copies itself into
//! a fresh file inside one read transaction (one commit of that store; writes go on
//! meanwhile), in a private scratch dir under `--state-dir` that is gone before the
//! first byte is sent. The backup file is one line `coordinator-backup 1`, one line
//! of JSON ([`Header`]: schema version, the log's id and head, each file's name, size
//! and SHA-256), then the files' bytes in that order: `purges.redb` (the log, its head
//! and id), `config.redb` (bundle versions, the rollout plan), `warm.redb` (warm jobs,
//! their edges and shards; schedules are config and re-read from coordinator.toml)
//! and `warm.token` when the coordinator generated it.
//!
//! [`restore`] checks everything before it writes anything a coordinator would read:
//! the format, the schema version (a newer one is refused, [`crate::schema`]), every
//! size and hash, nothing after the last file. It then gives the restored log a new id
//! that records the old id and head ([`crate::purge::log::rebase`]): the restored
//! coordinator logs new purges from `head + 1`, sequences some agents may already
//! have applied from the old log, so `crate::fanout::resume_point` resumes an agent of
//! the old log at or below that head and full-bans one past it.
//!
//! The etcd backend is out of scope: its state is etcd's, and etcd's snapshots
//! (`etcdctl snapshot save`) back it up.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

use axum::body::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::schema::{SchemaError, CURRENT};
use crate::state::Coordinator;

/// The first line of every backup file.
pub const MAGIC: &str = "coordinator-backup 1";
/// Longest header line accepted.
const MAX_HEADER: u64 = 1024 * 1024;
/// The warm token a coordinator generated into its state dir (`crate::state::warm_token`).
const WARM_TOKEN: &str = "warm.token";
/// Every file a backup may hold, in order (the ones that may be absent last).
const FILES: [&str; 4] = [
    crate::purge::log::FILE,
    crate::bundle::store::FILE,
    crate::warm::store::FILE,
    WARM_TOKEN,
];

/// Why a backup or a restore failed; each is one line naming the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("the coordinator's state is in etcd ([store] backend = \"etcd\"): back it up with etcd's own snapshots (etcdctl snapshot save); coordinator backup covers the embedded store")]
    Etcd,
    #[error("{file}: not a usable backup: {reason}")]
    Corrupt { file: String, reason: String },
    #[error(transparent)]
    Schema(#[from] SchemaError),
    #[error("{dir}: not empty: restore into an empty directory, or add --force to replace the state there")]
    NotEmpty { dir: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("copying the state: {0}")]
    Store(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The backup file's second line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The state's schema version ([`crate::schema::CURRENT`] of the coordinator that
    /// wrote it).
    pub schema: u32,
    pub created_at_ms: u64,
    pub coordinator_version: String,
    /// The purge log's id and head in the copy.
    pub log_id: String,
    pub head: u64,
    pub files: Vec<FileEntry>,
}

/// One file in a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// A backup taken, ready to send: the header and the copies (already unlinked).
pub struct Snapshot {
    pub header: Header,
    files: Vec<File>,
}

/// The scratch dir, removed when dropped (whatever failed).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes the scratch dirs of backups a killed coordinator left behind (at start, before
/// any backup can be in flight). Best effort: what cannot be removed is logged.
pub fn sweep_leftovers(state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return; // a fresh state dir
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(".backup-") {
            let path = entry.path();
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), "removed a backup's leftover scratch dir")
                }
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "cannot remove a backup's leftover scratch dir")
                }
            }
        }
    }
}

/// Copies the running coordinator's embedded state (blocking: call it off the runtime).
pub fn take(state: &Coordinator) -> Result<Snapshot, BackupError> {
    if state.warm.store().is_shared() {
        return Err(BackupError::Etcd);
    }
    let dir = state.state_dir.join(format!(
        ".backup-{}",
        hex::encode(rand::random::<[u8; 8]>())
    ));
    daemon::files::dir_with_mode(&dir, daemon::files::PRIVATE_DIR).map_err(io(&dir))?;
    let scratch = Scratch(dir);
    let store = |e: &dyn std::fmt::Display| BackupError::Store(e.to_string());
    let fresh = |name: &str| {
        let path = scratch.0.join(name);
        redb::Database::create(&path).map_err(|e| store(&e))
    };
    let (log_id, head) = state
        .log
        .backup_into(&fresh(FILES[0])?)
        .map_err(|e| store(&e))?;
    state
        .rollouts
        .store()
        .backup_into(&fresh(FILES[1])?)
        .map_err(|e| store(&e))?;
    state
        .warm
        .store()
        .backup_into(&fresh(FILES[2])?)
        .map_err(|e| store(&e))?;
    let token = state.state_dir.join(WARM_TOKEN);
    let mut names = FILES[..3].to_vec();
    match std::fs::copy(&token, scratch.0.join(WARM_TOKEN)) {
        Ok(_) => names.push(WARM_TOKEN),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&token)(e)),
    }
    let mut files = Vec::new();
    let mut entries = Vec::new();
    for name in names {
        let path = scratch.0.join(name);
        let mut f = File::open(&path).map_err(io(&path))?;
        let (bytes, sha256) = digest(&mut f).map_err(io(&path))?;
        f.rewind().map_err(io(&path))?;
        files.push(f);
        entries.push(FileEntry {
            name: name.to_owned(),
            bytes,
            sha256,
        });
    }
    drop(scratch); // the open handles keep the copies readable
    Ok(Snapshot {
        header: Header {
            schema: CURRENT,
            created_at_ms: crate::clock::now_ms(),
            coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
            log_id,
            head,
            files: entries,
        },
        files,
    })
}

fn digest(r: &mut impl Read) -> std::io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let got = r.read(&mut buf)?;
        if got == 0 {
            return Ok((n, hex::encode(h.finalize())));
        }
        h.update(&buf[..got]);
        n += got as u64;
    }
}

impl Snapshot {
    /// The file's first two lines.
    pub fn head_bytes(&self) -> Vec<u8> {
        let mut out = format!("{MAGIC}\n").into_bytes();
        // A plain struct of strings and numbers always serializes.
        out.extend(serde_json::to_vec(&self.header).unwrap_or_default());
        out.push(b'\n');
        out
    }

    /// The whole backup file's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.head_bytes().len() as u64 + self.header.files.iter().map(|f| f.bytes).sum::<u64>()
    }

    /// The whole backup file as a stream of chunks (read from the copies as sent).
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
        use futures_util::StreamExt;
        let head =
            futures_util::stream::once(std::future::ready(Ok(Bytes::from(self.head_bytes()))));
        let files = futures_util::stream::iter(self.files).flat_map(|f| {
            futures_util::stream::unfold(Some(tokio::fs::File::from_std(f)), |f| async move {
                use tokio::io::AsyncReadExt;
                let mut f = f?;
                let mut buf = vec![0u8; 64 * 1024];
                match f.read(&mut buf).await {
                    Ok(0) => None,
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(Bytes::from(buf)), Some(f)))
                    }
                    Err(e) => Some((Err(e), None)),
                }
            })
        });
        head.chain(files)
    }
}

/// Reads and checks a backup file's header, then each of its files, handing each one's
/// bytes to `sink` (by name) before checking its hash. Nothing may follow the last file.
fn read_backup(
    file: &Path,
    mut sink: impl FnMut(&str, &mut dyn Read) -> Result<(), BackupError>,
) -> Result<Header, BackupError> {
    let name = file.display().to_string();
    let corrupt = |reason: String| BackupError::Corrupt {
        file: name.clone(),
        reason,
    };
    let f = File::open(file).map_err(io(file))?;
    let mut r = BufReader::new(f);
    let mut line = Vec::new();
    (&mut r)
        .take(MAX_HEADER)
        .read_until(b'\n', &mut line)
        .map_err(io(file))?;
    if line != format!("{MAGIC}\n").as_bytes() {
        return Err(corrupt(format!(
            "it does not start with {MAGIC:?} (not a file coordinator backup wrote)"
        )));
    }
    line.clear();
    (&mut r)
        .take(MAX_HEADER)
        .read_until(b'\n', &mut line)
        .map_err(io(file))?;
    let header: Header = serde_json::from_slice(&line)
        .map_err(|e| corrupt(format!("its header does not read: {e}")))?;
    if header.schema > CURRENT {
        return Err(SchemaError::Newer {
            place: name.clone(),
            found: header.schema,
            supported: CURRENT,
        }
        .into());
    }
    let mut seen = Vec::new();
    for entry in &header.files {
        if !FILES.contains(&entry.name.as_str()) || seen.contains(&entry.name) {
            return Err(corrupt(format!("unexpected file {:?} in it", entry.name)));
        }
        seen.push(entry.name.clone());
        let mut hashing = Hashing {
            inner: (&mut r).take(entry.bytes),
            hash: Sha256::new(),
            bytes: 0,
        };
        sink(&entry.name, &mut hashing)?;
        std::io::copy(&mut hashing, &mut std::io::sink()).map_err(io(file))?;
        if hashing.bytes != entry.bytes {
            return Err(corrupt(format!(
                "truncated: {} has {} of its {} bytes",
                entry.name, hashing.bytes, entry.bytes
            )));
        }
        if hex::encode(hashing.hash.finalize()) != entry.sha256 {
            return Err(corrupt(format!(
                "{} does not match its SHA-256",
                entry.name
            )));
        }
    }
    for required in &FILES[..3] {
        if !seen.iter().any(|s| s == required) {
            return Err(corrupt(format!("{required} is missing")));
        }
    }
    let mut rest = [0u8; 1];
    if r.read(&mut rest).map_err(io(file))? != 0 {
        return Err(corrupt("bytes after the last file".into()));
    }
    Ok(header)
}

/// A reader that hashes and counts what passes.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Checks a backup file end to end without writing anything.
pub fn verify(file: &Path) -> Result<Header, BackupError> {
    read_backup(file, |_, _| Ok(()))
}

/// What [`restore`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub header: Header,
    /// The restored log's new id (it records the backed-up one and its head).
    pub new_log_id: String,
}

/// Makes `dir` a state dir from the backup `file`. `dir` must be empty (or absent)
/// unless `force`; nothing in it changes unless the whole backup checks out.
pub fn restore(file: &Path, dir: &Path, force: bool) -> Result<RestoreReport, BackupError> {
    let occupied = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(io(dir)(e)),
    };
    if occupied && !force {
        return Err(BackupError::NotEmpty {
            dir: dir.display().to_string(),
        });
    }
    daemon::files::dir_with_mode(dir, daemon::files::PRIVATE_DIR).map_err(io(dir))?;
    let staged = |name: &str| dir.join(format!(".{name}.restoring"));
    let mut written = Vec::new();
    let result = (|| {
        let header = read_backup(file, |name, bytes| {
            let path = staged(name);
            written.push(path.clone());
            let mut out = daemon::files::file_with_mode(&path, daemon::files::PRIVATE_FILE)
                .and_then(|_| File::create(&path))
                .map_err(io(&path))?;
            std::io::copy(bytes, &mut out).map_err(io(&path))?;
            out.sync_all().map_err(io(&path))
        })?;
        for name in &FILES[..3] {
            let path = staged(name);
            let db = redb::Database::open(&path).map_err(|e| BackupError::Corrupt {
                file: file.display().to_string(),
                reason: format!("{name}: {e}"),
            })?;
            // The file's own marker, named as the user knows it.
            crate::schema::read_redb(&db, &dir.join(name))?;
        }
        let (_, new_log_id) = crate::purge::log::rebase(&staged(FILES[0]))
            .map_err(|e| BackupError::Store(e.to_string()))?;
        for entry in &header.files {
            let to = dir.join(&entry.name);
            std::fs::rename(staged(&entry.name), &to).map_err(io(&to))?;
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(RestoreReport { header, new_log_id })
    })();
    if result.is_err() {
        for path in written {
            let _ = std::fs::remove_file(path);
        }
    }
    result
}

/// Writes `bytes` to `path` (private), for the CLI saving a backup it receives.
pub fn create_private(path: &Path) -> Result<File, BackupError> {
    daemon::files::file_with_mode(path, daemon::files::PRIVATE_FILE).map_err(io(path))?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(io(path))?;
    Ok(f)
}

/// Flushes and syncs a file written with [`create_private`].
pub fn finish(mut f: File, path: &Path) -> Result<(), BackupError> {
    f.flush().and_then(|_| f.sync_all()).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_backups_scratch_dir_is_swept_at_start_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let left = dir.path().join(".backup-0011223344556677");
        std::fs::create_dir(&left).unwrap();
        std::fs::write(left.join("purges.redb"), b"half a copy").unwrap();
        std::fs::write(dir.path().join("purges.redb"), b"the log").unwrap();
        sweep_leftovers(dir.path());
        assert!(!left.exists());
        assert_eq!(
            std::fs::read(dir.path().join("purges.redb")).unwrap(),
            b"the log"
        );
        sweep_leftovers(&dir.path().join("missing")); // a fresh state dir: nothing to do
    }

    fn write(dir: &Path, header: &Header, files: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join("b.backup");
        let mut out = format!("{MAGIC}\n").into_bytes();
        out.extend(serde_json::to_vec(header).unwrap());
        out.push(b'\n');
        for (_, b) in files {
            out.extend_from_slice(b);
        }
        std::fs::write(&path, out).unwrap();
        path
    }

    fn entry(name: &str, bytes: &[u8]) -> FileEntry {
        FileEntry {
            name: name.into(),
            bytes: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
        }
    }

    fn header(files: Vec<FileEntry>, schema: u32) -> Header {
        Header {
            schema,
            created_at_ms: 1,
            coordinator_version: "0".into(),
            log_id: "L".into(),
            head: 0,
            files,
        }
    }

    #[test]
    fn corrupt_truncated_newer_and_strange_files_are_refused_with_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let all = |b: &[u8]| {
            vec![
                entry("purges.redb", b),
                entry("config.redb", b),
                entry("warm.redb", b),
            ]
        };
        let ok = write(dir.path(), &header(all(b"ab"), CURRENT), &[("", b"ababab")]);
        assert!(verify(&ok).is_ok());
        let flipped = write(dir.path(), &header(all(b"ab"), CURRENT), &[("", b"ababax")]);
        let e = verify(&flipped).unwrap_err().to_string();
        assert!(e.contains("warm.redb does not match its SHA-256"), "{e}");
        let short = write(dir.path(), &header(all(b"ab"), CURRENT), &[("", b"abab")]);
        let e = verify(&short).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let long = write(
            dir.path(),
            &header(all(b"ab"), CURRENT),
            &[("", b"abababX")],
        );
        assert!(verify(&long)
            .unwrap_err()
            .to_string()
            .contains("after the last file"));
        let newer = write(
            dir.path(),
            &header(all(b"ab"), CURRENT + 1),
            &[("", b"ababab")],
        );
        let e = verify(&newer).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "schema version {} is newer than this coordinator's {CURRENT}",
                CURRENT + 1
            )),
            "{e}"
        );
        let mut evil = all(b"ab");
        evil[0].name = "../x".into();
        let evil = write(dir.path(), &header(evil, CURRENT), &[("", b"ababab")]);
        assert!(verify(&evil)
            .unwrap_err()
            .to_string()
            .contains("unexpected file"));
        std::fs::write(dir.path().join("junk"), b"hello\n").unwrap();
        let e = verify(&dir.path().join("junk")).unwrap_err().to_string();
        assert!(e.contains("not a file coordinator backup wrote"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn a_restore_refuses_a_non_empty_dir_and_changes_nothing_on_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"x").unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, b"nope\n").unwrap();
        assert!(matches!(
            restore(&junk, &target, false),
            Err(BackupError::NotEmpty { .. })
        ));
        assert!(matches!(
            restore(&junk, &target, true),
            Err(BackupError::Corrupt { .. })
        ));
        let left: Vec<_> = std::fs::read_dir(&target).unwrap().collect();
        assert_eq!(left.len(), 1, "only what was there");
    }
}
