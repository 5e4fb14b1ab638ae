//! The build script of every binary crate (`build = "../build/git_commit.rs"`): tells the
//! crate which commit it is built from, so `--version` can say it.
//!
//! Sets `GIT_COMMIT` (12 hex digits, or `unknown`) and `BUILD_VERSION`
//! (`0.1.0 (commit 1a2b3c4d5e6f)`, what clap prints after the program's name). The commit is
//! `$GIT_COMMIT` when set (a build from a tarball, which has no `.git`), else
//! `git rev-parse --short=12 HEAD`, else `unknown`. The script reruns when `$GIT_COMMIT`
//! or the checkout's HEAD (or the branch it points to) changes, so the version never
//! names an older commit than the one built; a worktree's `.git` is a file, so the paths
//! come from git itself.

// A build script runs git itself; the daemons' rule (programs start only through
// edge_agent::command or the demo) is about what they do at run time.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_owned())
}

fn watch(path: &Path) -> bool {
    let exists = path.exists();
    if exists {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    exists
}

/// HEAD, and the ref it points to: its loose file, or else `packed-refs` and the folder
/// the loose file will appear in.
fn watch_head() {
    let (Some(git_dir), Some(common)) = (
        git(&["rev-parse", "--path-format=absolute", "--git-dir"]),
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
    ) else {
        return;
    };
    watch(&PathBuf::from(&git_dir).join("HEAD"));
    if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
        let loose = PathBuf::from(&common).join(&head_ref);
        if !watch(&loose) {
            watch(&PathBuf::from(&common).join("packed-refs"));
            if let Some(parent) = loose.parent() {
                watch(parent);
            }
        }
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    let from_env = std::env::var("GIT_COMMIT")
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty());
    let commit = match from_env {
        Some(c) => c,
        None => {
            watch_head();
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo:rustc-env=GIT_COMMIT={commit}");
    println!("cargo:rustc-env=BUILD_VERSION={version} (commit {commit})");
}
