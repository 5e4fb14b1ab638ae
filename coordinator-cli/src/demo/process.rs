//! The one place the coordinator starts other programs: `varnishd` and `edge-agent`
//! for the demo (and the tests, which reuse it). Children are killed when dropped;
//! [`Child::stop`] asks politely first (SIGTERM), then kills after a bound.

// The one module allowed to start programs (clippy.toml disallows it elsewhere).
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

/// Errors starting a child.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {program}: {source} (is it installed? `scripts/install-deps.sh` installs varnish)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{program} exited during start-up ({status}); see {log}")]
    Exited {
        program: String,
        status: String,
        log: String,
    },
    #[error("{program} did not become ready within {secs}s; see {log}")]
    NotReady {
        program: String,
        secs: u64,
        log: String,
    },
}

/// A running child process.
#[derive(Debug)]
pub struct Child {
    inner: tokio::process::Child,
    name: String,
    log: PathBuf,
}

impl Child {
    pub fn pid(&self) -> Option<u32> {
        self.inner.id()
    }

    /// Where its stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.inner.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            if tokio::time::timeout(grace, self.inner.wait()).await.is_ok() {
                return;
            }
            tracing::warn!(child = %self.name, "did not stop in time; killing");
        }
        let _ = self.inner.kill().await;
    }

    /// SIGKILL right away (for crash tests).
    pub async fn kill9(&mut self) {
        let _ = self.inner.kill().await;
    }

    /// SIGSTOP: the process freezes with its sockets open, like a peer behind a stalled
    /// network path (for partition tests).
    pub fn suspend(&self) {
        if let Some(pid) = self.inner.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGSTOP);
        }
    }

    /// SIGCONT after [`Child::suspend`].
    pub fn resume(&self) {
        if let Some(pid) = self.inner.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
        }
    }

    /// `Some(status)` if it has exited.
    pub fn try_status(&mut self) -> Option<String> {
        self.inner.try_wait().ok().flatten().map(|s| s.to_string())
    }
}

/// Starts `program args...` with output appended to `log`.
pub fn spawn(
    program: &Path,
    args: &[String],
    log: &Path,
    name: &str,
) -> Result<Child, ProcessError> {
    spawn_with_env(program, args, &[], log, name)
}

/// [`spawn`] with `env` added to the inherited environment (the tests run an older or
/// newer protocol version this way: `proto::version::ENV`).
pub fn spawn_with_env(
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
    name: &str,
) -> Result<Child, ProcessError> {
    let io = |what: &str, source| ProcessError::Io {
        what: format!("{what} {}", log.display()),
        source,
    };
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| io("cannot open log", e))?;
    let err = out.try_clone().map_err(|e| io("cannot open log", e))?;
    let inner = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            program: program.display().to_string(),
            source,
        })?;
    Ok(Child {
        inner,
        name: name.to_owned(),
        log: log.to_owned(),
    })
}

/// Where a sibling binary of the running one is (`target/debug/edge-agent` next to
/// `target/debug/coordinator`), falling back to `$PATH`.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let dir = exe.parent()?;
            [dir.join(name), dir.parent()?.join(name)]
                .into_iter()
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

/// How to run one varnishd.
#[derive(Debug, Clone)]
pub struct VarnishSpec {
    /// `-n` working directory.
    pub workdir: PathBuf,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub secret_file: PathBuf,
    pub vcl_file: PathBuf,
    pub storage_mb: u32,
    /// A second HTTP listen address (the demo's per-region address that DNS answers).
    pub also_listen: Option<SocketAddr>,
}

impl VarnishSpec {
    /// varnishd arguments: foreground, no jail (works as root and as a user), small pools.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "-F",
            "-j",
            "none",
            "-n",
            &self.workdir.display().to_string(),
            "-a",
            &self.http.to_string(),
            "-T",
            &self.admin.to_string(),
            "-S",
            &self.secret_file.display().to_string(),
            "-f",
            &self.vcl_file.display().to_string(),
            "-s",
            &format!("malloc,{}m", self.storage_mb),
            "-p",
            "thread_pools=1",
            "-p",
            "thread_pool_min=10",
            "-p",
            "thread_pool_max=500",
            "-p",
            "ban_lurker_sleep=0.01",
            "-p",
            "vsl_space=4M",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(addr) = self.also_listen {
            args.extend(["-a".to_owned(), addr.to_string()]);
        }
        args
    }
}

/// Writes a random admin secret readable only by the owner.
pub fn write_secret(path: &Path) -> Result<(), ProcessError> {
    write_private(
        path,
        (hex::encode(rand::random::<[u8; 32]>()) + "\n").as_bytes(),
    )
}

/// Writes `contents` to a file only its owner can read or write (mode 0600 from the
/// moment it exists; an existing file is narrowed to 0600 before it is rewritten).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), ProcessError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| ProcessError::Io {
        what: format!("cannot write {}", path.display()),
        source,
    };
    if path.exists() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(contents).map_err(io)
}

/// Starts varnishd and waits until it answers HTTP on its listen address.
pub async fn start_varnishd(spec: &VarnishSpec, log: &Path) -> Result<Child, ProcessError> {
    let mut child = spawn(Path::new("varnishd"), &spec.args(), log, "varnishd")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_status() {
            return Err(ProcessError::Exited {
                program: "varnishd".into(),
                status,
                log: log.display().to_string(),
            });
        }
        if http_answers(spec.http).await {
            return Ok(child);
        }
        if Instant::now() > deadline {
            return Err(ProcessError::NotReady {
                program: "varnishd".into(),
                secs: 60,
                log: log.display().to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// True when something at `addr` answers an HTTP request with a status line.
pub async fn http_answers(addr: SocketAddr) -> bool {
    let probe = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /__ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf.starts_with(b"HTTP/1."))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_even_when_they_existed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("api-token");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private(&path, b"new").expect("write_private");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        let fresh = dir.path().join("cluster.json");
        write_private(&fresh, b"{}").expect("write_private");
        let mode = std::fs::metadata(&fresh)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
