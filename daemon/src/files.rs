//! Files that hold secrets: who may read them, set once here for every binary.
//!
//! * Private (the coordinator's stores `config.redb`, `warm.redb`, `purges.redb`, its
//!   tokens, the agent's cursor): files 0600 in directories 0700, owner only.
//! * Shared with varnishd (a rendered VCL holds the warm token): files 0640 in
//!   directories 0750, group [`VARNISH_GROUP`] when it exists. varnishd started as root
//!   with its default `-j unix` jail compiles VCL as user `varnish` (Debian's unit says
//!   `user=vcache`); both have `varnish` as their primary group, so group read is what
//!   its compiler needs. Run as root with `-j none` (the demo, the tests) it reads
//!   anything. An agent that is not root must be a member of that group to hand files
//!   to it; when the group cannot be set the files keep the owner's group (and a jailed
//!   varnishd will then say it cannot read them).

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Directory mode for private files.
pub const PRIVATE_DIR: u32 = 0o700;
/// Mode of a private file.
pub const PRIVATE_FILE: u32 = 0o600;
/// Directory mode for files varnishd's compiler reads.
pub const SHARED_DIR: u32 = 0o750;
/// Mode of a file varnishd's compiler reads.
pub const SHARED_FILE: u32 = 0o640;
/// The group varnishd's jailed users (`varnish`, `vcache`) share.
pub const VARNISH_GROUP: &str = "varnish";

/// Creates `dir` (and its parents) if needed and sets it to `mode`.
pub fn dir_with_mode(dir: &Path, mode: u32) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Creates `path` empty with `mode` if it does not exist, else narrows it to `mode` (an
/// older, wider file is fixed): call before another library (redb) opens it.
pub fn file_with_mode(path: &Path, mode: u32) -> io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        }
        Err(e) => Err(e),
    }
}

/// Writes `contents` to a new or truncated file that has `mode` from the moment it
/// exists (an existing file is narrowed first).
pub fn write_with_mode(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    if path.exists() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents)
}

/// Replaces `path` with `contents` durably: written to `PATH.tmp` (with `mode` from the
/// moment it exists), fsynced, renamed over `path`, and the directory fsynced, so a
/// crash leaves the old file or the new one, never part of either.
pub fn replace_durably(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The gid of [`VARNISH_GROUP`], if the system has it.
pub fn varnish_gid() -> Option<u32> {
    nix::unistd::Group::from_name(VARNISH_GROUP)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Gives `path` to group `gid` (if any); a refusal (not root, not a member) leaves the
/// owner's group, which is reported as `false`.
pub fn share_with(path: &Path, gid: Option<u32>) -> bool {
    match gid {
        Some(gid) => std::os::unix::fs::chown(path, None, Some(gid)).is_ok(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn modes_are_set_from_creation_and_narrowed_when_older() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        dir_with_mode(&d, PRIVATE_DIR).unwrap();
        assert_eq!(mode(&d), 0o700);
        let f = d.join("x.redb");
        file_with_mode(&f, PRIVATE_FILE).unwrap();
        assert_eq!(mode(&f), 0o600);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&f, "keep").unwrap();
        file_with_mode(&f, PRIVATE_FILE).unwrap();
        assert_eq!(
            (mode(&f), std::fs::read_to_string(&f).unwrap().as_str()),
            (0o600, "keep")
        );
        let v = d.join("main.vcl");
        write_with_mode(&v, b"vcl 4.1;", SHARED_FILE).unwrap();
        assert_eq!(mode(&v), 0o640);
        // Our own group is always ours to give.
        let own = std::fs::metadata(&v).unwrap().gid();
        assert!(share_with(&v, Some(own)));
        assert!(!share_with(&v, None));
    }
}
