//! The audit log: who asked the API for what, from where, and what came of it.
//!
//! Every write through the API (config pushes and rollbacks, warm jobs started or
//! cancelled, purges, drains, silences, backups), every read of a stored bundle, and
//! every request refused for its token becomes one [`Entry`]: when, the token's name
//! (never its secret), the source address, the action, what was asked (the request's
//! JSON body with anything that looks like a credential blanked; never a config bundle)
//! and the result (the status and the answer's JSON, or its error). The API's guard
//! forms the entries (`crate::api`); this module keeps them.
//!
//! [`Audit::record`] never waits: it logs the entry as one structured line (target
//! `audit`), keeps it in memory and wakes [`Audit::run`], which writes it to the store:
//! with the embedded store an append-only `audit.jsonl` in the state dir; in a cluster
//! the key `audit/<at_ms>-<coordinator>-<n>` in etcd, so every coordinator lists the
//! same log. While etcd does not answer, entries wait in `audit-pending.jsonl` (so a
//! restart keeps them) and go to etcd once it answers again; meanwhile
//! [`Audit::list`] answers from this coordinator's own entries and says so
//! (`partial`). The log is bounded by count and age (`[api] audit_keep`,
//! `audit_keep_days`): older entries are dropped from the file and from etcd.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use daemon::sync::Recover;
use etcd::etcdserverpb::{range_request, DeleteRangeRequest, RangeRequest};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::etcd_kv::EtcdKv;
use crate::store_health::StoreHealth;

/// One audited request as the log keeps it: [`Event`] stamped by [`Audit::record`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Unique in the cluster: `<at_ms>-<coordinator>-<n>`.
    pub id: String,
    pub at_ms: u64,
    /// The coordinator that served the request.
    pub coordinator: String,
    #[serde(flatten)]
    pub event: Event,
}

/// What the API's guard knows of a request and its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The token's name; `None` when none was sent or it was unknown.
    pub token: Option<String>,
    /// The peer's address.
    pub source: String,
    /// What kind of request: `config.push`, `purge`, `region.drain`, ...
    pub action: String,
    pub method: String,
    pub path: String,
    /// The request's JSON body, credentials blanked (`None`: no body, or a bundle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked: Option<Value>,
    pub status: u16,
    /// The answer's JSON (an error's is `{"error": ...}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

/// What [`Audit::list`] found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listed {
    /// Newest first.
    pub entries: Vec<Entry>,
    /// `true` when only this coordinator's entries could be listed (etcd did not answer).
    pub partial: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The bounds.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub keep: usize,
    pub keep_ms: u64,
}

/// Keys under the cluster's prefix.
const PREFIX: &str = "audit/";
/// How long an etcd call of the audit may take.
const CALL: Duration = Duration::from_secs(3);
/// How often old entries are dropped from etcd.
const TRIM_EVERY: Duration = Duration::from_secs(600);
/// Keys that never go into an entry's `asked`.
const SECRET_KEYS: [&str; 6] = [
    "password",
    "secret",
    "token",
    "authorization",
    "auth",
    "key",
];

/// The audit log; clone to share.
#[derive(Clone)]
pub struct Audit(Arc<Inner>);

struct Inner {
    me: String,
    bounds: Bounds,
    n: AtomicU64,
    /// This coordinator's newest entries (embedded: the whole log), oldest first.
    recent: Mutex<VecDeque<Entry>>,
    /// Entries not yet in the store.
    pending: Mutex<VecDeque<Entry>>,
    wake: tokio::sync::Notify,
    /// Embedded: the log; cluster: the pending entries.
    file: PathBuf,
    kv: Option<EtcdKv>,
    store: Option<StoreHealth>,
    /// Lines in `file` (embedded), to know when to compact it.
    lines: AtomicU64,
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {source}")]
pub struct AuditError {
    path: String,
    source: std::io::Error,
}

fn read_lines(path: &Path) -> Result<Vec<Entry>, AuditError> {
    match std::fs::read_to_string(path) {
        // A torn last line (a crash mid-append) and any broken line are skipped.
        Ok(text) => Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(AuditError {
            path: path.display().to_string(),
            source,
        }),
    }
}

impl Audit {
    /// Opens the log of coordinator `me`: the state dir's file with the embedded store,
    /// etcd (through `kv`) in a cluster, its pending entries taken up again.
    pub fn open(
        state_dir: &Path,
        me: &str,
        bounds: Bounds,
        kv: Option<EtcdKv>,
        store: Option<StoreHealth>,
    ) -> Result<Self, AuditError> {
        let file = state_dir.join(if kv.is_some() {
            "audit-pending.jsonl"
        } else {
            "audit.jsonl"
        });
        let loaded = read_lines(&file)?;
        let lines = loaded.len() as u64;
        let pending: VecDeque<Entry> = if kv.is_some() {
            loaded.iter().cloned().collect()
        } else {
            VecDeque::new()
        };
        let audit = Audit(Arc::new(Inner {
            me: me.to_owned(),
            bounds,
            n: AtomicU64::new(0),
            recent: Mutex::new(loaded.into_iter().collect()),
            pending: Mutex::new(pending),
            wake: tokio::sync::Notify::new(),
            file,
            kv,
            store,
            lines: AtomicU64::new(lines),
        }));
        audit.trim(&mut audit.0.recent.locked(), crate::clock::now_ms());
        Ok(audit)
    }

    /// Stamps `event` (id, time, this coordinator), logs it, keeps it and has
    /// [`Audit::run`] store it; never waits.
    pub fn record(&self, event: Event) {
        let at_ms = crate::clock::now_ms();
        let n = self.0.n.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            id: format!("{at_ms}-{}-{n}", self.0.me),
            at_ms,
            coordinator: self.0.me.clone(),
            event,
        };
        let e = &entry.event;
        let asked = e.asked.as_ref().map(Value::to_string);
        let result = e.result.as_ref().map(Value::to_string);
        tracing::info!(target: "audit", id = %entry.id, token = e.token.as_deref().unwrap_or("-"),
            source = %e.source, action = %e.action, method = %e.method,
            path = %e.path, status = e.status, asked = asked.as_deref().unwrap_or("-"),
            result = result.as_deref().unwrap_or("-"), "audit");
        {
            let mut pending = self.0.pending.locked();
            pending.push_back(entry.clone());
            while pending.len() > self.0.bounds.keep {
                pending.pop_front();
            }
        }
        {
            let mut recent = self.0.recent.locked();
            recent.push_back(entry);
            self.trim(&mut recent, at_ms);
        }
        self.0.wake.notify_one();
    }

    /// Drops from `recent` what is past the bounds at `now_ms`.
    fn trim(&self, recent: &mut VecDeque<Entry>, now_ms: u64) {
        let cutoff = now_ms.saturating_sub(self.0.bounds.keep_ms);
        while recent.len() > self.0.bounds.keep || recent.front().is_some_and(|e| e.at_ms < cutoff)
        {
            recent.pop_front();
        }
    }

    /// The newest `limit` entries at or after `since_ms`, newest first: in a cluster
    /// from etcd (with this coordinator's entries not stored yet), or only this
    /// coordinator's, `partial`, when etcd does not answer.
    pub async fn list(&self, limit: usize, since_ms: u64) -> Listed {
        let now = crate::clock::now_ms();
        let since_ms = since_ms.max(now.saturating_sub(self.0.bounds.keep_ms));
        let mine = |from: &VecDeque<Entry>| -> Vec<Entry> {
            from.iter()
                .rev()
                .filter(|e| e.at_ms >= since_ms)
                .take(limit)
                .cloned()
                .collect()
        };
        let Some(kv) = &self.0.kv else {
            return Listed {
                entries: mine(&self.0.recent.locked()),
                partial: false,
                error: None,
            };
        };
        let known_down = self.0.store.as_ref().and_then(StoreHealth::reachable) == Some(false);
        let stored = if known_down {
            Err("etcd is unreachable".to_owned())
        } else {
            newest(kv, limit, since_ms).await
        };
        match stored {
            Ok(mut entries) => {
                let pending = mine(&self.0.pending.locked());
                for p in pending {
                    if !entries.iter().any(|e| e.id == p.id) {
                        entries.push(p);
                    }
                }
                entries.sort_by(|a, b| (b.at_ms, &b.id).cmp(&(a.at_ms, &a.id)));
                entries.truncate(limit);
                Listed {
                    entries,
                    partial: false,
                    error: None,
                }
            }
            Err(e) => Listed {
                entries: mine(&self.0.recent.locked()),
                partial: true,
                error: Some(format!("{e}: only this coordinator's entries")),
            },
        }
    }

    /// Stores what [`Audit::record`] kept, until `shutdown` (then once more, briefly).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut trim = tokio::time::interval(TRIM_EVERY);
        trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(Duration::from_secs(2));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.0.wake.notified() => {}
                _ = retry.tick() => {}
                _ = trim.tick() => self.trim_store().await,
            }
            self.flush().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.flush()).await;
    }

    async fn flush(&self) {
        let batch: Vec<Entry> = self.0.pending.locked().iter().cloned().collect();
        if batch.is_empty() {
            return;
        }
        match &self.0.kv {
            None => {
                let me = self.clone();
                let n = batch.len();
                let written = tokio::task::spawn_blocking(move || me.append(&batch)).await;
                match written {
                    Ok(Ok(())) => {
                        let mut pending = self.0.pending.locked();
                        for _ in 0..n.min(pending.len()) {
                            pending.pop_front();
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "audit log not written; kept in memory, retrying")
                    }
                    Err(e) => tracing::warn!(error = %e, "audit writer failed"),
                }
            }
            Some(kv) => {
                // Kept on disk first, so a restart during an etcd outage loses none.
                let me = self.clone();
                let copy = batch.clone();
                let _ = tokio::task::spawn_blocking(move || me.rewrite_pending(&copy)).await;
                match put_all(kv, &batch).await {
                    Ok(()) => {
                        let stored: Vec<String> = batch.into_iter().map(|e| e.id).collect();
                        let left: Vec<Entry> = {
                            let mut pending = self.0.pending.locked();
                            pending.retain(|e| !stored.contains(&e.id));
                            pending.iter().cloned().collect()
                        };
                        let me = self.clone();
                        let _ =
                            tokio::task::spawn_blocking(move || me.rewrite_pending(&left)).await;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, waiting = batch.len(), "audit entries wait for etcd")
                    }
                }
            }
        }
    }

    /// Appends to `audit.jsonl` (embedded), compacting it once it holds far more lines
    /// than are kept.
    fn append(&self, batch: &[Entry]) -> std::io::Result<()> {
        let count = self.0.lines.load(Ordering::Relaxed) + batch.len() as u64;
        if count > (self.0.bounds.keep as u64) * 2 + 100 {
            let kept: Vec<Entry> = self.0.recent.locked().iter().cloned().collect();
            write_file(&self.0.file, &kept)?;
            self.0.lines.store(kept.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.0.file)?;
        f.write_all(&lines(batch)?)?;
        f.sync_data()?;
        self.0.lines.store(count, Ordering::Relaxed);
        Ok(())
    }

    fn rewrite_pending(&self, entries: &[Entry]) -> std::io::Result<()> {
        if entries.is_empty() {
            return match std::fs::remove_file(&self.0.file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        write_file(&self.0.file, entries)
    }

    /// Drops from etcd what is older than the age bound or past the count bound.
    async fn trim_store(&self) {
        let Some(kv) = &self.0.kv else { return };
        let now = crate::clock::now_ms();
        let first = kv.key(PREFIX);
        let cutoff = kv.key(&format!(
            "{PREFIX}{:020}",
            now.saturating_sub(self.0.bounds.keep_ms)
        ));
        let etcd = kv.etcd();
        let aged = DeleteRangeRequest {
            key: first.clone(),
            range_end: cutoff,
            ..Default::default()
        };
        if let Err(e) = with_timeout(etcd.delete_range(aged)).await {
            tracing::debug!(error = %e, "audit trim by age failed; next time");
            return;
        }
        // The keep-th newest key and everything older.
        let newest = RangeRequest {
            key: first.clone(),
            range_end: etcd::prefix_end(&first),
            limit: self.0.bounds.keep as i64 + 1,
            sort_order: range_request::SortOrder::Descend as i32,
            sort_target: range_request::SortTarget::Key as i32,
            keys_only: true,
            ..Default::default()
        };
        let Ok(resp) = with_timeout(etcd.range(newest)).await else {
            return;
        };
        if let Some(oldest_kept) = resp.kvs.get(self.0.bounds.keep) {
            let mut end = oldest_kept.key.clone();
            end.push(0);
            let over = DeleteRangeRequest {
                key: first,
                range_end: end,
                ..Default::default()
            };
            let _ = with_timeout(etcd.delete_range(over)).await;
        }
    }
}

/// `entries` as JSON lines.
fn lines(entries: &[Entry]) -> std::io::Result<Vec<u8>> {
    let mut text = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut text, e)?;
        text.push(b'\n');
    }
    Ok(text)
}

fn write_file(path: &Path, entries: &[Entry]) -> std::io::Result<()> {
    daemon::files::replace_durably(path, &lines(entries)?, 0o600)
}

fn key_of(e: &Entry) -> String {
    // The id starts with the time; the key pads it so keys sort by time.
    let rest = e.id.split_once('-').map(|(_, r)| r).unwrap_or(&e.id);
    format!("{PREFIX}{:020}-{rest}", e.at_ms)
}

async fn with_timeout<T>(
    f: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("etcd: {}", e.message())),
        Err(_) => Err("etcd: no answer".to_owned()),
    }
}

async fn put_all(kv: &EtcdKv, batch: &[Entry]) -> Result<(), String> {
    for chunk in batch.chunks(100) {
        let mut ops = Vec::new();
        for e in chunk {
            let value = serde_json::to_vec(e).map_err(|e| e.to_string())?;
            ops.push(etcd::op::put(&kv.key(&key_of(e)), &value));
        }
        let txn = etcd::etcdserverpb::TxnRequest {
            compare: vec![],
            success: ops,
            failure: vec![],
        };
        with_timeout(kv.etcd().txn(txn)).await?;
    }
    Ok(())
}

async fn newest(kv: &EtcdKv, limit: usize, since_ms: u64) -> Result<Vec<Entry>, String> {
    let first = kv.key(PREFIX);
    let req = RangeRequest {
        key: kv.key(&format!("{PREFIX}{since_ms:020}")),
        range_end: etcd::prefix_end(&first),
        limit: limit as i64,
        sort_order: range_request::SortOrder::Descend as i32,
        sort_target: range_request::SortTarget::Key as i32,
        ..Default::default()
    };
    let resp = with_timeout(kv.etcd().range(req)).await?;
    Ok(resp
        .kvs
        .into_iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect())
}

/// `body` as JSON with every value under a key that looks like a credential blanked;
/// `None` when it is empty or not JSON.
pub fn redacted(body: &[u8]) -> Option<Value> {
    if body.is_empty() {
        return None;
    }
    let mut v: Value = serde_json::from_slice(body).ok()?;
    blank(&mut v);
    Some(v)
}

fn blank(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let k = k.to_ascii_lowercase();
                if SECRET_KEYS.iter().any(|s| k.contains(s)) {
                    *v = Value::String("(redacted)".into());
                } else {
                    blank(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(blank),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str) -> Event {
        Event {
            token: Some("ops".into()),
            source: "127.0.0.1".into(),
            action: action.into(),
            method: "POST".into(),
            path: "/api/v1/purges".into(),
            asked: None,
            status: 200,
            result: None,
        }
    }

    #[tokio::test]
    async fn entries_survive_a_restart_newest_first_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let bounds = Bounds {
            keep: 10,
            keep_ms: 3_600_000,
        };
        let audit = Audit::open(dir.path(), "c1", bounds, None, None).unwrap();
        for i in 0..25 {
            audit.record(event(&format!("a{i}")));
        }
        audit.flush().await;
        let listed = audit.list(100, 0).await;
        assert_eq!(listed.entries.len(), 10);
        assert_eq!(listed.entries[0].event.action, "a24");
        assert_eq!(listed.entries[9].event.action, "a15");

        let again = Audit::open(dir.path(), "c1", bounds, None, None).unwrap();
        let listed = again.list(3, 0).await;
        let actions: Vec<_> = listed
            .entries
            .iter()
            .map(|e| e.event.action.as_str())
            .collect();
        assert_eq!(actions, ["a24", "a23", "a22"]);
        assert!(!listed.partial);
        // A torn last line (a crash mid-append) is skipped.
        let file = dir.path().join("audit.jsonl");
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str("{\"id\": \"torn");
        std::fs::write(&file, text).unwrap();
        let torn = Audit::open(dir.path(), "c1", bounds, None, None).unwrap();
        assert_eq!(torn.list(100, 0).await.entries.len(), 10);
    }

    #[tokio::test]
    async fn the_files_are_the_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bounds = Bounds {
            keep: 10,
            keep_ms: 3_600_000,
        };
        let audit = Audit::open(dir.path(), "c1", bounds, None, None).unwrap();
        audit.record(event("a"));
        audit.flush().await;
        write_file(&dir.path().join("other.jsonl"), &[]).unwrap();
        for f in ["audit.jsonl", "other.jsonl"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is {mode:o}");
        }
    }

    #[test]
    fn credentials_are_blanked_and_keys_sort_by_time() {
        let v = redacted(br#"{"sources":["sitemap"],"auth":{"password":"x"},"origin_token":"t","n":[{"secret":"s"}]}"#)
            .unwrap();
        assert_eq!(v["sources"][0], "sitemap");
        assert_eq!(v["auth"], "(redacted)");
        assert_eq!(v["origin_token"], "(redacted)");
        assert_eq!(v["n"][0]["secret"], "(redacted)");
        assert_eq!(redacted(b""), None);
        assert_eq!(redacted(b"not json"), None);
        let e = |id: &str, at_ms| Entry {
            id: id.into(),
            at_ms,
            coordinator: "c".into(),
            event: event("purge"),
        };
        assert!(key_of(&e("999-c-1", 999)) < key_of(&e("1000-c-0", 1000)));
        assert_eq!(key_of(&e("5-c-2", 5)), "audit/00000000000000000005-c-2");
    }
}
