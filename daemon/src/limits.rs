//! Process limits a server needs: one file descriptor per connection (every edge agent
//! holds one to the coordinator), so the soft `RLIMIT_NOFILE` is raised to the hard one at
//! start. Debian's default soft limit of 1,024 would otherwise cap a coordinator at about
//! a thousand edges, with the rest retrying forever.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// The descriptor limits after [`raise_nofile`]: `soft` is what the process may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFile {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft descriptor limit to the hard limit; returns the limits in force (the
/// old ones if the raise was refused).
pub fn raise_nofile() -> std::io::Result<NoFile> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    // An unlimited hard limit still stops at the kernel's fs.nr_open.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let target = hard.min(nr_open);
    if soft < target && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        return Ok(NoFile { soft: target, hard });
    }
    Ok(NoFile { soft, hard })
}

#[cfg(test)]
mod tests {
    #[test]
    fn soft_reaches_hard() {
        let limits = super::raise_nofile().expect("getrlimit");
        assert!(
            limits.soft == limits.hard || limits.soft >= 1 << 20,
            "{limits:?}"
        );
        let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .expect("getrlimit");
        assert_eq!(soft, limits.soft);
    }
}
