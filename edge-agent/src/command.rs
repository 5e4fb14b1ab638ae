//! The one place the agent runs other programs (`varnishstat`, and `varnishncsa` for the
//! popular URLs).
//!
//! Every [`run`] has a timeout, its child is killed if the future is dropped
//! (`kill_on_drop`), and its output is bounded. A long-running child ([`lines`]) is killed
//! when its reader is dropped, and its lines are bounded. Everything that talks to varnishd's admin
//! port does so in-process ([`crate::varnish::admin`]), not through `varnishadm`.

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
fn spawn(
    program: &Path,
    args: &[&str],
    stderr: Stdio,
) -> Result<tokio::process::Child, CommandError> {
    tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CommandError::Spawn {
            program: program.display().to_string(),
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
    let mut child = spawn(program, args, Stdio::piped())?;
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

/// A long-running child whose stdout is read line by line; dropping it kills the child.
#[derive(Debug)]
pub struct Lines {
    program: String,
    _child: tokio::process::Child,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
    buf: Vec<u8>,
}

/// Starts `program args...` for [`Lines::next`]; stderr is discarded.
pub fn lines(program: &Path, args: &[&str]) -> Result<Lines, CommandError> {
    let name = program.display().to_string();
    let mut child = spawn(program, args, Stdio::null())?;
    let stdout = child.stdout.take().ok_or_else(|| CommandError::Io {
        program: name.clone(),
        source: std::io::Error::other("no stdout"),
    })?;
    Ok(Lines {
        program: name,
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
}
