//! The local purge spool: where a coordinator on etcd keeps the purges it answered 200
//! while etcd could not commit them, until they are appended to the shared log.
//!
//! One append-only file, `purge-spool.log` under `--state-dir`, of records
//! `[payload length: u32 LE][first 8 bytes of SHA-256(payload)][payload]`. The payload is
//! the protobuf [`PurgeEntry`] agents receive, with `seq` holding the **spool id**: a
//! number this coordinator assigns, one per purge, strictly increasing for the life of
//! the file (never reused). A record whose `op` is empty is a *marker*: it only carries
//! the last id used, so ids keep increasing after the file is compacted.
//!
//! Each [`Spool::write`] writes every record of one group commit with one `write` and
//! one `fdatasync` before it returns: a purge is answered only once its record is on
//! disk. A write or sync that fails truncates the file back to where it was and is an
//! error (answered 503): nothing half-written is ever counted. A record cut short by a
//! crash (kill -9 or power loss during the write) was never acknowledged: [`Spool::open`]
//! reads records until the first one that is short or fails its checksum, truncates the
//! file there and logs what it dropped.
//!
//! The drain (`etcd`) appends pending entries to the shared log in id order and
//! records the highest drained id in etcd in the same transaction; [`Spool::drained`]
//! then forgets them here. On open, [`Spool::skip_drained`] with the id read from etcd
//! skips what a drain cut short by a crash had already committed, so each entry reaches
//! the shared log exactly once. Once everything is drained (or drained records take most
//! of the file) the file is rewritten with a marker and what is still pending
//! (write a temporary file, fsync, rename, fsync the directory).
//!
//! The file is bounded by `[store] spool_max_bytes`: an append that would pass it is
//! refused ([`SpoolError::Full`]), never written in part.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use prost::Message;
use proto::edge::PurgeEntry;
use sha2::{Digest, Sha256};

use super::NewPurge;

/// The spool's file name under the state dir.
pub const FILE_NAME: &str = "purge-spool.log";
/// Bytes before each payload: its length and its checksum.
const HEADER: usize = 12;
/// No record is larger (a purge's pattern is at most a few hundred KiB).
const MAX_RECORD: usize = 16 << 20;
/// Drained bytes beyond which the file is compacted even with entries still pending.
const COMPACT_AFTER: u64 = 4 << 20;

/// Errors from the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("purge spool {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("purge spool is full ({len} bytes, spool_max_bytes = {max}); etcd cannot take purges and the local spool cannot either")]
    Full { len: u64, max: u64 },
}

/// The spool file and the entries in it not yet drained.
pub struct Spool {
    path: PathBuf,
    file: File,
    /// Valid bytes in the file.
    len: u64,
    max_bytes: u64,
    /// The next id to assign.
    next_id: u64,
    /// Entries not yet drained, in id order, with their record's size.
    pending: VecDeque<(PurgeEntry, u64)>,
    /// Bytes of records already drained (compaction frees them).
    drained_bytes: u64,
}

fn checksum(payload: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(payload);
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

fn record(entry: &PurgeEntry, out: &mut Vec<u8>) {
    let payload = entry.encode_to_vec();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(&payload));
    out.extend_from_slice(&payload);
}

/// Every whole, intact record at the start of `bytes`, and how many bytes they take.
fn parse(bytes: &[u8]) -> (Vec<(PurgeEntry, u64)>, u64) {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(head) = bytes.get(at..at + HEADER) {
        let mut len4 = [0u8; 4];
        len4.copy_from_slice(&head[..4]);
        let len = u32::from_le_bytes(len4) as usize;
        if len > MAX_RECORD {
            break;
        }
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if checksum(payload) != head[4..12] {
            break;
        }
        let Ok(entry) = PurgeEntry::decode(payload) else {
            break;
        };
        let size = (HEADER + len) as u64;
        out.push((entry, size));
        at += HEADER + len;
    }
    (out, at as u64)
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, dropping a torn last record.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let path = dir.join(FILE_NAME);
        let io = |source| SpoolError::Io {
            path: path.display().to_string(),
            source,
        };
        // Private like the rest of the state (an older, wider file is narrowed).
        daemon::files::file_with_mode(&path, daemon::files::PRIVATE_FILE).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let (records, valid) = parse(&bytes);
        if valid < bytes.len() as u64 {
            tracing::warn!(path = %path.display(), dropped_bytes = bytes.len() as u64 - valid,
                "purge spool ends in a torn record (never acknowledged); dropped");
            file.set_len(valid).map_err(io)?;
            file.sync_data().map_err(io)?;
        }
        let mut spool = Spool {
            path,
            file,
            len: valid,
            max_bytes,
            next_id: 1,
            pending: VecDeque::new(),
            drained_bytes: 0,
        };
        for (entry, size) in records {
            spool.next_id = spool.next_id.max(entry.seq.saturating_add(1));
            if entry.op.is_some() {
                spool.pending.push_back((entry, size));
            } else {
                spool.drained_bytes += size;
            }
        }
        Ok(spool)
    }

    fn io(&self, source: std::io::Error) -> SpoolError {
        SpoolError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// Forgets entries up to `drained` (the highest id the shared log holds, read at
    /// start); later ids are assigned after it.
    /// How many were skipped.
    pub fn skip_drained(&mut self, drained: u64) -> u64 {
        self.next_id = self.next_id.max(drained.saturating_add(1));
        let mut skipped = 0;
        while self.pending.front().is_some_and(|(e, _)| e.seq <= drained) {
            if let Some((_, size)) = self.pending.pop_front() {
                self.drained_bytes += size;
                skipped += 1;
            }
        }
        skipped
    }

    /// Takes the next `n` ids (for purges tried on etcd first: if that attempt times
    /// out they are spooled under the same ids, see `etcd`). Ids are never reused; a
    /// reservation never written leaves a gap, which is harmless.
    pub fn reserve(&mut self, n: u64) -> u64 {
        let first = self.next_id;
        self.next_id += n;
        first
    }

    /// One group commit's entries, one per purge, per appender (when it was received,
    /// its purges), under fresh ids; each appender's last id.
    pub fn entries(&mut self, batch: &[(u64, &[NewPurge])]) -> (Vec<PurgeEntry>, Vec<u64>) {
        let n: usize = batch.iter().map(|(_, p)| p.len()).sum();
        let mut id = self.reserve(n as u64);
        let mut entries = Vec::with_capacity(n);
        let mut lasts = Vec::with_capacity(batch.len());
        for (received_at_us, purges) in batch {
            for p in purges.iter() {
                entries.push(PurgeEntry {
                    seq: id,
                    received_at_us: *received_at_us,
                    op: Some(p.op.clone()),
                    soft: p.soft,
                    first_seq: 0,
                });
                id += 1;
            }
            lasts.push(id - 1);
        }
        (entries, lasts)
    }

    /// Writes one group commit (per appender: when it was received, its purges) and
    /// syncs it; returns each appender's last spool id. Nothing is kept on an error.
    pub fn append(&mut self, batch: &[(u64, &[NewPurge])]) -> Result<Vec<u64>, SpoolError> {
        let (entries, lasts) = self.entries(batch);
        self.write(entries)?;
        Ok(lasts)
    }

    /// Writes entries built by [`Self::entries`] (ids increasing) and syncs them.
    pub fn write(&mut self, entries: Vec<PurgeEntry>) -> Result<(), SpoolError> {
        let mut buf = Vec::with_capacity(256 * entries.len());
        let mut sized = Vec::with_capacity(entries.len());
        for entry in entries {
            let before = buf.len();
            record(&entry, &mut buf);
            sized.push((entry, (buf.len() - before) as u64));
        }
        if self.len + buf.len() as u64 > self.max_bytes {
            return Err(SpoolError::Full {
                len: self.len,
                max: self.max_bytes,
            });
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Back to the last good record, so a later append does not follow garbage.
            let _ = self.file.set_len(self.len);
            let _ = self.file.sync_data();
            return Err(self.io(e));
        }
        self.len += buf.len() as u64;
        self.pending.extend(sized);
        Ok(())
    }

    /// Up to `max` pending entries, oldest first (`seq` is the spool id).
    pub fn pending(&self, max: usize) -> Vec<PurgeEntry> {
        self.pending
            .iter()
            .take(max)
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// Entries waiting for the shared log.
    pub fn depth(&self) -> u64 {
        self.pending.len() as u64
    }

    /// The file's size in bytes.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The entries up to `upto` are in the shared log: forgets them, and compacts the
    /// file when that frees most of it. How many were forgotten.
    pub fn drained(&mut self, upto: u64) -> Result<u64, SpoolError> {
        let before = self.pending.len();
        while self.pending.front().is_some_and(|(e, _)| e.seq <= upto) {
            if let Some((_, size)) = self.pending.pop_front() {
                self.drained_bytes += size;
            }
        }
        let gone = (before - self.pending.len()) as u64;
        let pending_bytes = self.len - self.drained_bytes.min(self.len);
        if gone > 0
            && (self.pending.is_empty()
                || (self.drained_bytes > COMPACT_AFTER && self.drained_bytes > pending_bytes))
        {
            self.compact()?;
        }
        Ok(gone)
    }

    /// Rewrites the file as a marker (the last id) and the pending records.
    fn compact(&mut self) -> Result<(), SpoolError> {
        let tmp = self.path.with_extension("log.tmp");
        let mut buf = Vec::new();
        record(
            &PurgeEntry {
                seq: self.next_id - 1,
                ..Default::default()
            },
            &mut buf,
        );
        let marker = buf.len() as u64;
        for (e, _) in &self.pending {
            record(e, &mut buf);
        }
        let io = |e| self.io(e);
        daemon::files::file_with_mode(&tmp, daemon::files::PRIVATE_FILE).map_err(io)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(daemon::files::PRIVATE_FILE)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&buf).and_then(|()| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        self.file = file;
        self.len = buf.len() as u64;
        self.drained_bytes = marker;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::edge::{purge_entry::Op, TagSet};

    fn ids(s: &Spool) -> Vec<u64> {
        s.pending(usize::MAX).iter().map(|e| e.seq).collect()
    }

    #[test]
    fn ids_are_dense_per_group_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let (a, b) = (
            [NewPurge::tag("a")],
            [NewPurge::tag("b"), NewPurge::tag("c")],
        );
        assert_eq!(s.append(&[(1, &a), (2, &b)]).unwrap(), vec![1, 3]);
        assert_eq!(s.append(&[(3, &a)]).unwrap(), vec![4]);
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&s), vec![1, 2, 3, 4]);
        let e = s.pending(3);
        assert_eq!(e[2].received_at_us, 2);
        assert_eq!(
            e[2].op,
            Some(Op::Tags(TagSet {
                tags: vec!["c".into()]
            }))
        );
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_the_next_append_follows_the_good_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&[(1, &[NewPurge::tag("a")]), (1, &[NewPurge::tag("b")])])
            .unwrap();
        let good = s.file_len();
        drop(s);
        let path = dir.path().join(FILE_NAME);
        // A third record cut short, as a kill -9 during its write leaves it.
        let mut torn = Vec::new();
        record(
            &PurgeEntry {
                seq: 3,
                op: Some(NewPurge::tag("c").op),
                ..Default::default()
            },
            &mut torn,
        );
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&torn[..torn.len() - 3]).unwrap();
        drop(f);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&s), vec![1, 2]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
        assert_eq!(s.append(&[(2, &[NewPurge::tag("d")])]).unwrap(), vec![3]);
        drop(s);
        // A whole record whose bytes changed fails its checksum: dropped too.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&s), vec![1, 2]);
    }

    #[test]
    fn drained_entries_are_forgotten_and_ids_never_come_back_after_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.append(&[(
            1,
            &[NewPurge::tag("a"), NewPurge::tag("b"), NewPurge::tag("c")],
        )])
        .unwrap();
        assert_eq!(s.drained(2).unwrap(), 2);
        assert_eq!(ids(&s), vec![3]);
        drop(s);
        // Reopened: the drained ones are still in the file until the etcd mark skips them.
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(ids(&s), vec![1, 2, 3]);
        assert_eq!(s.skip_drained(2), 2);
        assert_eq!(ids(&s), vec![3]);
        assert_eq!(s.drained(3).unwrap(), 1);
        assert!(s.is_empty());
        // Compacted to a marker: the next id still follows the last one.
        let small = s.file_len();
        assert!(small < 64, "{small}");
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(s.is_empty());
        assert_eq!(s.append(&[(1, &[NewPurge::tag("d")])]).unwrap(), vec![4]);
        // A spool wiped while etcd remembers id 10: ids go on after it.
        drop(s);
        std::fs::remove_file(dir.path().join(FILE_NAME)).unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.skip_drained(10);
        assert_eq!(s.append(&[(1, &[NewPurge::tag("e")])]).unwrap(), vec![11]);
    }

    #[test]
    fn the_size_bound_refuses_a_whole_group_and_keeps_what_was_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 200).unwrap();
        let mut ok = 0;
        let err = loop {
            match s.append(&[(1, &[NewPurge::tag("cat_p_12345")])]) {
                Ok(_) => ok += 1,
                Err(e) => break e,
            }
        };
        assert!(ok > 2, "{ok}");
        assert!(matches!(err, SpoolError::Full { max: 200, .. }), "{err}");
        assert!(err.to_string().contains("spool_max_bytes"));
        assert!(s.file_len() <= 200);
        drop(s);
        let s = Spool::open(dir.path(), 200).unwrap();
        assert_eq!(s.depth(), ok);
    }
}
