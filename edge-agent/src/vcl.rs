//! Config on the edge: load pushed bundles into varnishd without risk, report what runs.
//!
//! [`run`] is a task of its own with its own admin connection, so a VCL compile (seconds
//! with a C compiler) never delays a purge. For each [`ApplyConfig`] it:
//!
//! 1. checks the bundle ([`validate`]: flat file names, and [`proto::vcl::scan`]: no
//!    `include` of a file outside the bundle, no VMOD imported from a path), then writes
//!    the files to `state_dir/vcl/<name>/` (directories 0750, files 0640, group
//!    `varnish`: readable by varnishd's compiler, by nobody else, since the rendered VCL
//!    holds the warm token; writable only by the agent);
//! 2. `vcl.load <name> <dir>/main.vcl` — varnishd compiles it; a compile error is
//!    reported with the bundle's file names and nothing changes;
//! 3. records a hash of `vcl.show -v <name>` (before switching, so an agent killed right
//!    after the switch still knows it), then `vcl.use <name>`, so later reports can
//!    prove the active VCL is the one loaded;
//! 4. discards coordinator VCLs beyond `keep` (never the active one), keeping the
//!    previous ones loaded for an instant rollback.
//!
//! Every `report_every`, and right after an apply, it sends a [`ConfigStatus`]: the active
//! VCL's name and, if that VCL is one it loaded *and* its source is unchanged, its bundle
//! version. Anything else (a boot VCL, a hand `vcl.load`) reports an empty version: drift.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::edge::{agent_message, AgentMessage, ApplyConfig, ConfigResult, ConfigStatus};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::VarnishConfig;
use crate::varnish::admin::{quote, AdminError};
use crate::varnish::{ApplyError, Varnish};

/// Prefix of every VCL name the agent loads: `cfg_<version>_<unix ms>`.
pub const PREFIX: &str = "cfg_";
/// Longest wait for `vcl.load` (varnishd's own `cli_timeout` is 60 s by default).
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// The hash of a loaded VCL's source, next to its files.
const SOURCE_HASH: &str = ".source-sha256";

/// One VCL as `vcl.list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub active: bool,
}

/// Parses `vcl.list` output (`active  auto  warm  0  name`, labels add `-> target`).
pub fn parse_list(text: &str) -> Vec<Listed> {
    text.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let name = cols.get(4)?;
            Some(Listed {
                name: (*name).to_owned(),
                active: cols.first() == Some(&"active"),
            })
        })
        .collect()
}

/// The bundle version a VCL name carries, if the agent named it.
pub fn version_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(PREFIX)?;
    let (version, stamp) = rest.rsplit_once('_')?;
    (!version.is_empty() && stamp.bytes().all(|b| b.is_ascii_digit())).then_some(version)
}

fn stamp_of(name: &str) -> u64 {
    name.rsplit_once('_')
        .and_then(|(_, s)| s.parse().ok())
        .unwrap_or(0)
}

/// Which coordinator VCLs to discard so that at most `keep` remain, the active one
/// always among them, newest kept first.
pub fn to_discard(list: &[Listed], keep: usize) -> Vec<String> {
    let mut ours: Vec<&Listed> = list
        .iter()
        .filter(|l| version_of(&l.name).is_some())
        .collect();
    ours.sort_by_key(|l| std::cmp::Reverse(stamp_of(&l.name)));
    let mut kept = usize::from(ours.iter().any(|l| l.active));
    let mut out = Vec::new();
    for l in ours {
        if l.active {
            continue;
        }
        if kept < keep.max(1) {
            kept += 1;
        } else {
            out.push(l.name.clone());
        }
    }
    out
}

/// Whether a file name from the coordinator is safe to write into the bundle dir.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a bundle before anything is written: an alphanumeric version, a `main.vcl`,
/// flat file names only.
pub fn validate(apply: &ApplyConfig) -> Result<(), String> {
    let bad = |m: &str| Err(format!("refusing bundle {}: {m}", apply.version));
    if apply.version.is_empty()
        || apply.version.len() > 64
        || !apply.version.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return bad("version must be 1-64 alphanumeric characters");
    }
    if !apply.files.contains_key("main.vcl") {
        return bad("no main.vcl");
    }
    if let Some(f) = apply.files.keys().find(|f| !safe_name(f)) {
        return bad(&format!("unsafe file name {f:?}"));
    }
    // The coordinator checked this at push; checked again here so that no VCL naming a
    // file outside the bundle reaches varnishd's compiler (which would read it, and quote
    // it in its error).
    let in_bundle = |n: &str| apply.files.contains_key(n);
    for (name, content) in apply.files.iter().filter(|(n, _)| n.ends_with(".vcl")) {
        let Ok(text) = std::str::from_utf8(content) else {
            return bad(&format!("{name} is not UTF-8 text"));
        };
        proto::vcl::scan(name, text, &in_bundle)
            .map_err(|r| format!("refusing bundle {}: {r}", apply.version))?;
    }
    Ok(())
}

/// Replaces the agent's directory in varnishd's messages by bundle-relative names.
fn relative(message: &str, dir: &Path) -> String {
    let prefix = format!("{}/", dir.display());
    message.replace(&prefix, "")
}

/// varnishd's words of an error without the source lines it quotes (the line after each
/// `('file' Line N Pos M)` and its `---#` marker): a quoted line may hold the warm token,
/// and the log is read by more people than the bundle. The coordinator gets it whole.
fn for_log(message: &str) -> String {
    let mut out = Vec::new();
    let mut quoted_next = false;
    for line in message.lines() {
        let t = line.trim();
        let marker = !t.is_empty() && t.bytes().all(|b| b == b'-' || b == b'#');
        if quoted_next || marker {
            quoted_next = false;
            continue;
        }
        quoted_next = t.contains(" Line ") && t.contains(" Pos ") && t.ends_with(')');
        if !t.is_empty() {
            out.push(t);
        }
    }
    out.join(" ")
}

/// The worker's state.
struct Worker {
    varnish: Varnish,
    dir: PathBuf,
    /// Health probe of the last applied plan: (path, host).
    probe: Option<(String, String)>,
    /// Its requests go through varnish: counted as the agent's own.
    synthetic: crate::synthetic::Synthetic,
    /// Source hashes of the VCLs this process loaded or found on disk.
    hashes: HashMap<String, String>,
}

/// Applies bundles from `rx` and reports status through `out` until `rx` closes.
pub async fn run(
    varnish: VarnishConfig,
    state_dir: &Path,
    mut rx: mpsc::Receiver<ApplyConfig>,
    out: mpsc::Sender<AgentMessage>,
    report_every: Duration,
    synthetic: crate::synthetic::Synthetic,
) {
    let mut w = Worker {
        synthetic,
        varnish: Varnish::new(varnish),
        dir: state_dir.join("vcl"),
        probe: None,
        hashes: HashMap::new(),
    };
    let mut every = tokio::time::interval(report_every);
    loop {
        tokio::select! {
            apply = rx.recv() => {
                let Some(apply) = apply else { return };
                let result = w.apply(apply).await;
                if send(&out, agent_message::Msg::ConfigResult(result)).await.is_err() {
                    return;
                }
                every.reset_immediately();
            }
            _ = every.tick() => {
                let status = w.status().await;
                if send(&out, agent_message::Msg::ConfigStatus(status)).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn send(out: &mpsc::Sender<AgentMessage>, msg: agent_message::Msg) -> Result<(), ()> {
    out.send(AgentMessage { msg: Some(msg) })
        .await
        .map_err(|_| ())
}

impl Worker {
    async fn apply(&mut self, apply: ApplyConfig) -> ConfigResult {
        let version = apply.version.clone();
        let started = std::time::Instant::now();
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let name = format!("{PREFIX}{version}_{stamp}");
        let outcome = self.load_and_use(&name, apply).await;
        match &outcome {
            Ok(()) => {
                tracing::info!(version = %version, vcl = %name, ms = started.elapsed().as_millis() as u64, "config active")
            }
            Err(e) => {
                tracing::warn!(version = %version, error = %for_log(e), "config not applied; varnish keeps its active VCL")
            }
        }
        ConfigResult {
            ok: outcome.is_ok(),
            error: outcome.err().unwrap_or_default(),
            vcl_name: name,
            version,
        }
    }

    async fn load_and_use(&mut self, name: &str, apply: ApplyConfig) -> Result<(), String> {
        validate(&apply)?;
        let dir = self.dir.join(name);
        write_files(&dir, &apply.files)
            .map_err(|e| format!("cannot write {}: {e}", dir.display()))?;
        let main = dir.join("main.vcl");
        let load = format!(
            "vcl.load {} {}",
            name,
            quote(&main.display().to_string()).map_err(|e| e.to_string())?
        );
        if let Err(e) = self.varnish.command(&load, Some(LOAD_TIMEOUT)).await {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(relative(&message(e), &dir));
        }
        // The proof of what is loaded is on disk before the switch: an agent killed right
        // after `vcl.use` still recognises the VCL when it comes back (no reload).
        if let Ok(source) = self
            .varnish
            .command(&format!("vcl.show -v {name}"), None)
            .await
        {
            let hash = hex::encode(Sha256::digest(source.as_bytes()));
            let _ = daemon::files::write_with_mode(
                &dir.join(SOURCE_HASH),
                hash.as_bytes(),
                daemon::files::SHARED_FILE,
            );
            self.hashes.insert(name.to_owned(), hash);
        }
        if let Err(e) = self.varnish.command(&format!("vcl.use {name}"), None).await {
            let _ = self
                .varnish
                .command(&format!("vcl.discard {name}"), None)
                .await;
            let _ = std::fs::remove_dir_all(&dir);
            self.hashes.remove(name);
            return Err(format!("vcl.use failed: {}", message(e)));
        }
        self.probe = (!apply.health_path.is_empty())
            .then(|| (apply.health_path.clone(), apply.health_host.clone()));
        self.discard_old(apply.keep as usize).await;
        Ok(())
    }

    /// Discards coordinator VCLs beyond `keep` and removes their files.
    async fn discard_old(&mut self, keep: usize) {
        let Ok(text) = self.varnish.command("vcl.list", None).await else {
            return;
        };
        let list = parse_list(&text);
        for name in to_discard(&list, keep) {
            match self
                .varnish
                .command(&format!("vcl.discard {name}"), None)
                .await
            {
                Ok(_) => {
                    let _ = std::fs::remove_dir_all(self.dir.join(&name));
                    self.hashes.remove(&name);
                }
                // Still in use by requests in flight (or a label); try next time.
                Err(e) => tracing::debug!(vcl = %name, error = %e, "vcl.discard refused"),
            }
        }
        // Files of VCLs varnishd no longer has (an earlier varnishd, a failed load).
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let n = entry.file_name().to_string_lossy().into_owned();
                if version_of(&n).is_some() && !list.iter().any(|l| l.name == n) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }

    async fn status(&mut self) -> ConfigStatus {
        let mut status = ConfigStatus::default();
        match self.active().await {
            Ok((name, version)) => {
                status.active_vcl = name;
                status.active_version = version;
            }
            Err(e) => status.admin_error = e.to_string(),
        }
        if let Some((path, host)) = &self.probe {
            match self.varnish.probe(path, host).await {
                Ok((code, cache)) => {
                    self.synthetic.record(&cache.to_ascii_uppercase());
                    status.health_status = u32::from(code);
                }
                Err(e) => {
                    self.synthetic.record_failed();
                    status.health_error = e.to_string();
                }
            }
        }
        status
    }

    /// The active VCL's name and, when verified, its bundle version.
    async fn active(&mut self) -> Result<(String, String), ApplyError> {
        let list = parse_list(&self.varnish.command("vcl.list", None).await?);
        let Some(active) = list.into_iter().find(|l| l.active) else {
            return Ok((String::new(), String::new()));
        };
        let Some(version) = version_of(&active.name).map(str::to_owned) else {
            return Ok((active.name, String::new()));
        };
        let expected = match self.hashes.get(&active.name) {
            Some(h) => h.clone(),
            None => std::fs::read_to_string(self.dir.join(&active.name).join(SOURCE_HASH))
                .unwrap_or_default(),
        };
        let source = self
            .varnish
            .command(&format!("vcl.show -v {}", active.name), None)
            .await?;
        let actual = hex::encode(Sha256::digest(source.as_bytes()));
        if !expected.is_empty() && actual == expected {
            self.hashes.insert(active.name.clone(), expected);
            Ok((active.name, version))
        } else {
            Ok((active.name, String::new()))
        }
    }
}

fn message(e: ApplyError) -> String {
    match e {
        ApplyError::Admin(AdminError::Refused { message, .. }) => message,
        other => other.to_string(),
    }
}

/// Writes a bundle for varnishd's compiler and nobody else: directories 0750 and files
/// 0640, group `varnish` ([`daemon::files`]); the rendered VCL holds the warm token.
fn write_files(
    dir: &Path,
    files: &std::collections::HashMap<String, Vec<u8>>,
) -> std::io::Result<()> {
    use daemon::files::{dir_with_mode, share_with, SHARED_DIR, SHARED_FILE};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let gid = daemon::files::varnish_gid();
    if let Some(parent) = dir.parent() {
        dir_with_mode(parent, SHARED_DIR)?;
        share_with(parent, gid);
    }
    let _ = std::fs::remove_dir_all(dir);
    dir_with_mode(dir, SHARED_DIR)?;
    share_with(dir, gid);
    for (name, content) in files {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(SHARED_FILE)
            .open(&path)?;
        share_with(&path, gid);
        f.write_all(content)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = "available   auto    cold        0    boot\n\
                        available   auto    warm        0    cfg_aa_100\n\
                        active      auto    warm        0    cfg_bb_200\n\
                        available   auto    warm        0    cfg_cc_300\n\
                        available   auto    warm        0    cfg_dd_50\n";

    #[test]
    fn list_parsing_and_versions() {
        let l = parse_list(LIST);
        assert_eq!(l.len(), 5);
        assert!(l[2].active && l[2].name == "cfg_bb_200");
        assert_eq!(version_of("cfg_bb_200"), Some("bb"));
        assert_eq!(version_of("boot"), None);
        assert_eq!(version_of("cfg_x"), None);
        assert_eq!(version_of("cfg_x_1a"), None);
    }

    #[test]
    fn discard_keeps_active_and_newest() {
        let l = parse_list(LIST);
        // keep 2: active bb + newest other (cc); aa and dd go, boot is not ours.
        let mut d = to_discard(&l, 2);
        d.sort();
        assert_eq!(d, vec!["cfg_aa_100", "cfg_dd_50"]);
        assert_eq!(to_discard(&l, 1).len(), 3);
        assert!(to_discard(&l, 10).is_empty());
    }

    #[test]
    fn a_bundle_including_a_file_outside_it_is_refused() {
        let apply = |main: &str| ApplyConfig {
            version: "abc123".into(),
            files: [
                ("main.vcl".to_owned(), main.as_bytes().to_vec()),
                ("waf.vcl".to_owned(), Vec::new()),
            ]
            .into_iter()
            .collect(),
            ..ApplyConfig::default()
        };
        assert!(validate(&apply("vcl 4.1;\ninclude \"./waf.vcl\";")).is_ok());
        let err = validate(&apply("vcl 4.1;\ninclude\n\"../../../etc/passwd\";")).unwrap_err();
        assert!(err.contains("main.vcl:3:"), "{err}");
        assert!(validate(&apply("import std from \"/tmp/x.so\";")).is_err());
    }

    #[test]
    fn the_log_line_of_a_compile_error_quotes_no_source() {
        let full = "Message from VCC-compiler:\nExpected ')' got '{'\n('main.vcl' Line 3 Pos 45)\nif (req.http.X-Warm-Token == \"s3cr3t\" {\n--------------------------------------------#\n\nAt: ('main.vcl' Line 9 Pos 1) -- (Pos 4)\nset x = s3cr3t;\n###-\nRunning VCC-compiler failed, exited with 2\nVCL compilation failed";
        let line = for_log(full);
        assert!(!line.contains("s3cr3t") && !line.contains('\n'), "{line}");
        assert!(
            line.contains("('main.vcl' Line 3 Pos 45)") && line.contains("Expected ')'"),
            "{line}"
        );
        assert_eq!(
            for_log("cannot write /x: denied"),
            "cannot write /x: denied"
        );
    }

    #[test]
    fn file_names_and_messages() {
        assert!(safe_name("main.vcl") && safe_name("waf.vcl"));
        assert!(!safe_name("../x.vcl") && !safe_name("a/b.vcl") && !safe_name(".hidden"));
        let dir = Path::new("/var/lib/edge-agent/vcl/cfg_ab_1");
        assert_eq!(
            relative(
                "('/var/lib/edge-agent/vcl/cfg_ab_1/main.vcl' Line 3 Pos 1)",
                dir
            ),
            "('main.vcl' Line 3 Pos 1)"
        );
    }
}
