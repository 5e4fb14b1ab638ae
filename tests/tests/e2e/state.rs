//! The stored state across versions and backups, on the real binaries: a state dir or
//! etcd prefix marked with a newer schema is refused with one line and a non-zero exit,
//! one from before the marker is migrated on start (one log line per store) with its
//! data intact, and a backup restored into a new state dir gives an agent that applied
//! purges past the backup's head a real full ban on its varnishd, while one at the head
//! resumes without one and later purges reach both.

use std::path::Path;
use std::time::Duration;

use coordinator::schema::CURRENT;
use redb::{Database, TableDefinition};
use tests::{
    assert_eventually, bin_dir, get, purge_tags, temp_dir, Cluster, CoordinatorOpts,
    CoordinatorProc, EtcdCluster,
};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const FILES: [&str; 3] = ["purges.redb", "config.redb", "warm.redb"];

/// Sets (or, with `None`, removes) a stopped coordinator's schema marker in `path`.
fn set_marker(path: &Path, value: Option<&str>) {
    let db = Database::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let txn = db.begin_write().expect("write");
    {
        let mut meta = txn.open_table(META).expect("meta");
        match value {
            Some(v) => meta.insert("schema", v.as_bytes()).map(|_| ()),
            None => meta.remove("schema").map(|_| ()),
        }
        .expect("marker written");
    }
    txn.commit().expect("commit");
}

fn marker(path: &Path) -> Option<String> {
    let db = Database::open(path).expect("open");
    let read = db.begin_read().expect("read");
    let meta = read.open_table(META).expect("meta");
    let v = meta.get("schema").expect("get");
    v.map(|v| String::from_utf8_lossy(v.value()).into_owned())
}

/// A log's text without terminal colour escapes.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn migrated_lines(c: &CoordinatorProc) -> Vec<String> {
    let log = std::fs::read_to_string(c.child.log_path()).unwrap_or_default();
    plain(&log)
        .lines()
        .filter(|l| l.contains("state schema migrated"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_marked_newer_is_refused_with_one_line_naming_the_file_and_both_versions() {
    let dir = temp_dir();
    let mut c = CoordinatorProc::start(dir.path(), &CoordinatorOpts::default()).await;
    let seq = purge_tags(c.purge, &["kept"]).await;
    c.child.stop(Duration::from_secs(10)).await;
    let file = c.state.join("purges.redb");
    assert_eq!(
        marker(&file),
        Some(CURRENT.to_string()),
        "marked on first open"
    );
    set_marker(&file, Some("99"));
    let err = c.try_restart().await.expect_err("a newer state is refused");
    let line = format!(
        "coordinator: {}: state schema version 99 is newer than this coordinator's {CURRENT}",
        file.display()
    );
    assert!(err.contains(&line), "{err}");
    assert!(err.contains("exit status: 1"), "{err}");
    assert_eq!(marker(&file).as_deref(), Some("99"), "left as it was");
    // Put back, it starts on the same data.
    set_marker(&file, Some(&CURRENT.to_string()));
    c.restart().await;
    assert_eq!(c.head().await, seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_from_before_the_marker_is_migrated_on_start_with_its_data() {
    let dir = temp_dir();
    let mut c = CoordinatorProc::start(dir.path(), &CoordinatorOpts::default()).await;
    let mut seq = 0;
    for t in ["a", "b", "c"] {
        seq = purge_tags(c.purge, &[t]).await;
    }
    assert!(
        migrated_lines(&c).is_empty(),
        "a fresh state is not 'migrated'"
    );
    c.child.stop(Duration::from_secs(10)).await;
    // What every coordinator before the marker wrote: the same files without it.
    for f in FILES {
        set_marker(&c.state.join(f), None);
    }
    c.restart().await;
    let lines = migrated_lines(&c);
    assert_eq!(lines.len(), FILES.len(), "one line per store: {lines:?}");
    for f in FILES {
        let line = lines
            .iter()
            .find(|l| l.contains(f))
            .unwrap_or_else(|| panic!("no line for {f}: {lines:?}"));
        assert!(
            line.contains("from=1") && line.contains(&format!("to={CURRENT}")),
            "{line}"
        );
    }
    assert_eq!(c.head().await, seq, "the log is intact");
    let p = c.call("GET", &format!("/api/v1/purges/{seq}"), None).await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert!(p.body.contains("\"c\""), "{}", p.body);
    c.child.stop(Duration::from_secs(10)).await;
    for f in FILES {
        assert_eq!(marker(&c.state.join(f)), Some(CURRENT.to_string()), "{f}");
    }
    c.restart().await;
    assert_eq!(migrated_lines(&c).len(), FILES.len(), "migrated once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_prefix_from_before_the_marker_is_migrated_and_one_marked_newer_refused() {
    let dir = temp_dir();
    let etcd_cluster = EtcdCluster::start(&dir.path().join("etcd"), 1).await;
    let opts = CoordinatorOpts {
        insecure: true,
        extra: format!(
            "[store]\nbackend = \"etcd\"\nendpoints = {}\nprefix = \"/state-test/\"\nlease_ttl_s = 2\n",
            etcd_cluster.endpoints_toml()
        ),
        ..Default::default()
    };
    let mut c = CoordinatorProc::start(&dir.path().join("c1"), &opts).await;
    let seq = purge_tags(c.purge, &["on_etcd"]).await;
    // etcd's state is etcd's to back up.
    let file = dir.path().join("etcd.backup");
    let (code, out, err) = c.cli(&["backup", &file.display().to_string()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("409") && err.contains("etcdctl snapshot save"),
        "{err}"
    );
    assert!(!file.exists() && !dir.path().join("etcd.backup.partial").exists());
    c.child.stop(Duration::from_secs(10)).await;
    let etcd = etcd::Etcd::connect(&etcd_cluster.endpoints).expect("connect");
    let key = b"/state-test/schema".to_vec();
    let read = |etcd: etcd::Etcd, key: Vec<u8>| async move {
        let r = etcd
            .range(etcd::etcdserverpb::RangeRequest {
                key,
                ..Default::default()
            })
            .await
            .expect("range");
        r.kvs
            .first()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
    };
    assert_eq!(
        read(etcd.clone(), key.clone()).await,
        Some(CURRENT.to_string())
    );
    // Before the marker: the same keys without it.
    etcd.delete_range(etcd::etcdserverpb::DeleteRangeRequest {
        key: key.clone(),
        ..Default::default()
    })
    .await
    .expect("delete");
    c.restart().await;
    let lines = migrated_lines(&c);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("/state-test/") && lines[0].contains("from=1"),
        "{lines:?}"
    );
    assert_eq!(c.head().await, seq, "the shared log is intact");
    assert_eq!(
        read(etcd.clone(), key.clone()).await,
        Some(CURRENT.to_string())
    );
    c.child.stop(Duration::from_secs(10)).await;
    // A newer coordinator's cluster.
    etcd.txn(etcd::etcdserverpb::TxnRequest {
        success: vec![etcd::op::put(&key, b"99")],
        ..Default::default()
    })
    .await
    .expect("put");
    let err = c
        .try_restart()
        .await
        .expect_err("a newer cluster state is refused");
    let line = format!(
        "coordinator: etcd prefix \"/state-test/\": state schema version 99 is newer than this coordinator's {CURRENT}"
    );
    assert!(err.contains(&line), "{err}");
    assert!(err.contains("exit status: 1"), "{err}");
    assert_eq!(
        read(etcd, key).await.as_deref(),
        Some("99"),
        "left as it was"
    );
}

/// `coordinator ARGS` with no API (restore works offline): (exit code, stdout, stderr).
fn offline(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(bin_dir().join("coordinator"))
        .args(args)
        .output()
        .expect("run the coordinator CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn full_bans(log: &Path) -> usize {
    let text = plain(&std::fs::read_to_string(log).unwrap_or_default());
    text.matches("coordinator asked for a full ban").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_full_bans_agents_past_its_head_and_the_others_resume() {
    let mut c = Cluster::start(2, "ban", CoordinatorOpts::default()).await;
    let (version, _) = c
        .coordinator
        .push_and_wait(&coordinator_cli::demo::sample_bundle(), false)
        .await;
    // A page no purge names: only a full ban removes it.
    for v in &c.varnish {
        get(v.http, "/untagged/keep").await;
        assert_eq!(get(v.http, "/untagged/keep").await.cache(), "HIT");
    }
    let mut head = 0;
    for i in 0..5 {
        head = purge_tags(c.coordinator.purge, &[&format!("before_{i}")]).await;
    }
    c.wait_applied(head).await;

    let backup = c.dir.path().join("state.backup");
    let backup_s = backup.display().to_string();
    let (code, out, err) = c.coordinator.cli(&["backup", &backup_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("up to seq {head}")), "{out}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&backup)
            .expect("backup written")
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "the backup holds secrets: {mode:o}");

    // Region 1's agent stays at the backup's head; region 0's applies purges past it.
    c.agents[1].kill9().await;
    let mut past = 0;
    for i in 0..5 {
        past = purge_tags(c.coordinator.purge, &[&format!("after_{i}")]).await;
    }
    assert_eventually!(
        20,
        c.coordinator
            .edges()
            .await
            .iter()
            .any(|e| e["id"] == "edge-0" && e["applied_seq"].as_u64() == Some(past)),
        "edge-0 did not apply {past}"
    );

    // The coordinator's state is lost; restore the backup into a new dir.
    c.coordinator.child.stop(Duration::from_secs(10)).await;
    let restored = c.dir.path().join("restored");
    let restored_s = restored.display().to_string();
    let (code, out, err) = offline(&["restore", &backup_s, "--state-dir", &restored_s]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("past seq {head} get a full ban")),
        "{out}"
    );
    let (code, _, err) = offline(&["restore", &backup_s, "--state-dir", &restored_s]);
    assert_eq!(code, 1);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );

    let bans_before = [
        full_bans(c.agents[0].child.log_path()),
        full_bans(c.agents[1].child.log_path()),
    ];
    let varnish_bans = c.varnish[1].counter("MAIN.bans_added");
    c.coordinator.state = restored;
    c.coordinator.restart().await;
    assert_eq!(
        c.coordinator.head().await,
        head,
        "the restored log ends at the backup"
    );
    let versions = c
        .coordinator
        .call("GET", "/api/v1/config/versions", None)
        .await;
    assert!(
        versions.body.contains(&version),
        "the bundle is back: {}",
        versions.body
    );
    c.agents[1].restart();
    c.wait_applied(head).await;

    // Edge 0 counted sequences the restored log will hand out again: a full ban.
    assert_eventually!(
        20,
        full_bans(c.agents[0].child.log_path()) == bans_before[0] + 1,
        "edge-0 got no full ban"
    );
    let log0 = plain(&std::fs::read_to_string(c.agents[0].child.log_path()).unwrap_or_default());
    assert!(
        log0.contains("past the head of the backup"),
        "edge-0's reason"
    );
    assert_eq!(
        get(c.varnish[0].http, "/untagged/keep").await.cache(),
        "MISS"
    );

    // Later purges reach both; edge 1 resumed without a full ban.
    let later = purge_tags(c.coordinator.purge, &["later"]).await;
    assert_eq!(later, head + 1, "new purges follow the restored head");
    c.wait_applied(later).await;
    assert_eq!(full_bans(c.agents[1].child.log_path()), bans_before[1]);
    assert_eq!(
        get(c.varnish[1].http, "/untagged/keep").await.cache(),
        "HIT"
    );
    assert_eq!(
        c.varnish[1].counter("MAIN.bans_added"),
        varnish_bans + 1,
        "edge-1 applied just the later purge"
    );
}
