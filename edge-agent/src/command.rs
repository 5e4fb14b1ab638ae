//! The one place the agent runs other programs (`varnishstat`, and `varnishncsa` for the
//! popular URLs).
//!
//! Every [`run`] has a timeout, its child is killed if the future is dropped
//! (`kill_on_drop`), and its output is bounded. A long-running child ([`lines`]) runs
//! under a small `sh` watchdog that stops it when its reader is dropped *or the agent
//! dies* (its stdin pipe closes), and its lines are bounded. Everything that talks to varnishd's admin
//! port does so in-process ([`crate::varnish::admin`]), not through `varnishadm`.

// The one module allowed to start programs (clippy.toml disallows it elsewhere).
#![allow(clippy::disallowed_methods)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// Largest output read from a command.
const MAX_OUTPUT: u64 = 4 * 1024 * 1024;

/// Why a command gave nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} timed out after {0:?}", .timeout)]
    Timeout { program: String, timeout: Duration },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("reading {program}'s output: {source}")]
    Io {
        program: String,
        source: std::io::Error,
    },
}

/// Starts `program args...` with stdout piped, no stdin, killed when dropped.
/// Starts `program args...` with stdout piped. `watched`: stdin is a pipe held by the
/// caller (the [`WATCHDOG`]'s) and the child is not killed on drop; else no stdin, killed
/// when dropped. Errors name `name`.
fn spawn(
    name: &str,
    program: &Path,
    args: &[&str],
    stderr: Stdio,
    watched: bool,
) -> Result<tokio::process::Child, CommandError> {
    tokio::process::Command::new(program)
        .args(args)
        .stdin(if watched {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(!watched)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            program: name.to_owned(),
            source,
        })
}

/// Runs `program args...` and returns its stdout (at most 4 MiB).
pub async fn run(
    program: &Path,
    args: &[&str],
    timeout: Duration,
) -> Result<Vec<u8>, CommandError> {
    let name = program.display().to_string();
    let mut child = spawn(&name, program, args, Stdio::piped(), false)?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let work = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        if let Some(s) = stdout.as_mut() {
            s.take(MAX_OUTPUT).read_to_end(&mut out).await?;
        }
        if let Some(s) = stderr.as_mut() {
            s.take(64 * 1024).read_to_end(&mut err).await?;
        }
        let status = child.wait().await?;
        Ok::<_, std::io::Error>((status, out, err))
    };
    let (status, out, err) = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| CommandError::Timeout {
            program: name.clone(),
            timeout,
        })?
        .map_err(|source| CommandError::Io {
            program: name.clone(),
            source,
        })?;
    if !status.success() {
        return Err(CommandError::Failed {
            program: name,
            status: status.to_string(),
            stderr: String::from_utf8_lossy(&err)
                .trim()
                .chars()
                .take(500)
                .collect(),
        });
    }
    Ok(out)
}

/// Longest line kept from a long-running child (longer ones are skipped).
const MAX_LINE: usize = 64 * 1024;

/// A long-running child whose stdout is read line by line; dropping it stops the child.
#[derive(Debug)]
pub struct Lines {
    program: String,
    // Field order matters: the watchdog's stdin closes first, so it stops the child.
    _watchdog_stdin: Option<tokio::process::ChildStdin>,
    _child: tokio::process::Child,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
    buf: Vec<u8>,
}

/// The watchdog around a long-running child: `sh` starts the program in the background,
/// gives up its own copy of the output pipe, and waits for its stdin (a pipe only this
/// agent holds) to close, then stops the program. The agent closes it when it drops
/// [`Lines`]; the kernel closes it when the agent dies, however it dies (even SIGKILL,
/// which no handler sees), so a child never outlives its agent, traffic or none.
const WATCHDOG: &str =
    r#""$0" "$@" & child=$!; exec >/dev/null; read _ignored; kill "$child" 2>/dev/null"#;

/// Starts `program args...` for [`Lines::next`] under the [`WATCHDOG`]; stderr is
/// discarded.
pub fn lines(program: &Path, args: &[&str]) -> Result<Lines, CommandError> {
    let name = program.display().to_string();
    let program_arg = program.to_string_lossy();
    let mut sh_args = vec!["-c", WATCHDOG, program_arg.as_ref()];
    sh_args.extend_from_slice(args);
    // Not killed on drop: SIGKILL would stop the shell before it stops the child. Closing
    // its stdin makes it stop the child and exit; tokio reaps it.
    let mut child = spawn(&name, Path::new("/bin/sh"), &sh_args, Stdio::null(), true)?;
    let stdout = child.stdout.take().ok_or_else(|| CommandError::Io {
        program: name.clone(),
        source: std::io::Error::other("no stdout"),
    })?;
    Ok(Lines {
        program: name,
        _watchdog_stdin: child.stdin.take(),
        _child: child,
        stdout: tokio::io::BufReader::new(stdout),
        buf: Vec::new(),
    })
}

impl Lines {
    /// The next line (without its newline), or `None` when the child closed its output.
    pub async fn next(&mut self) -> Result<Option<String>, CommandError> {
        use tokio::io::AsyncBufReadExt;
        loop {
            self.buf.clear();
            let n = (&mut self.stdout)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut self.buf)
                .await
                .map_err(|source| CommandError::Io {
                    program: self.program.clone(),
                    source,
                })?;
            if n == 0 {
                return Ok(None);
            }
            if self.buf.last() != Some(&b'\n') {
                // Too long: skip to its end, a bounded chunk at a time.
                loop {
                    self.buf.clear();
                    let n = (&mut self.stdout)
                        .take(MAX_LINE as u64)
                        .read_until(b'\n', &mut self.buf)
                        .await
                        .unwrap_or(0);
                    if n == 0 || self.buf.last() == Some(&b'\n') {
                        break;
                    }
                }
                continue;
            }
            self.buf.pop();
            return Ok(Some(String::from_utf8_lossy(&self.buf).into_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_failure_and_timeout() {
        let out = run(Path::new("echo"), &["hi"], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(out, b"hi\n");
        assert!(matches!(
            run(Path::new("false"), &[], Duration::from_secs(5)).await,
            Err(CommandError::Failed { .. })
        ));
        assert!(matches!(
            run(Path::new("sleep"), &["5"], Duration::from_millis(100)).await,
            Err(CommandError::Timeout { .. })
        ));
        assert!(matches!(
            run(Path::new("/nonexistent/x"), &[], Duration::from_secs(1)).await,
            Err(CommandError::Spawn { .. })
        ));
    }

    #[tokio::test]
    async fn lines_of_a_long_running_child() {
        let mut l = lines(Path::new("printf"), &["a\\nb\\n"]).unwrap();
        assert_eq!(l.next().await.unwrap().as_deref(), Some("a"));
        assert_eq!(l.next().await.unwrap().as_deref(), Some("b"));
        assert_eq!(l.next().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_long_running_child_stops_when_its_reader_is_dropped() {
        let marker = format!("{}", std::process::id() as u64 * 1000 + 7);
        let l = lines(Path::new("sleep"), &[&marker]).unwrap();
        let running = || {
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|d| std::fs::read(d.path().join("cmdline")).ok())
                .any(|c| c.starts_with(b"sleep\0") && c.ends_with(format!("{marker}\0").as_bytes()))
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(running());
        drop(l);
        let mut gone = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !running() {
                gone = true;
                break;
            }
        }
        assert!(gone, "the child outlived its reader");
    }
}
