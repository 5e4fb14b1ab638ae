//! The real `coordinator demo` on a block of fixed ports ([`start_demo`]), started as a
//! user would and read back through the `cluster.json` it writes.

use std::path::Path;
use std::time::{Duration, Instant};

use coordinator_cli::demo::process::{self, Child};
use serde_json::Value;

use super::host::bin_dir;

/// `coordinator demo --state-dir STATE` with `args`, on a block of fixed ports below the
/// ephemeral range (where other tests' connections live), trying another block when one is
/// taken; returns the running demo once it wrote `cluster.json`, and that file. `salt`
/// spreads tests that run at once over different blocks.
pub async fn start_demo(state: &Path, log: &Path, args: &[&str], salt: u16) -> (Child, Value) {
    let cluster_json = state.join("cluster.json");
    // A state dir used before holds the last run's: wait for this run's.
    let _ = std::fs::remove_file(&cluster_json);
    for attempt in 0..5u16 {
        let base = 10_000 + (std::process::id() as u16 % 200 + attempt * 37 + salt) % 200 * 100;
        let mut all: Vec<String> = vec!["demo".into()];
        all.extend(args.iter().map(|a| a.to_string()));
        all.extend([
            "--base-port".into(),
            base.to_string(),
            "--state-dir".into(),
            state.display().to_string(),
        ]);
        let mut child =
            process::spawn(&bin_dir().join("coordinator"), &all, log, "demo").expect("spawn demo");
        let deadline = Instant::now() + Duration::from_secs(90);
        while !cluster_json.is_file() && child.try_status().is_none() {
            assert!(Instant::now() < deadline, "no cluster.json after 90s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if cluster_json.is_file() {
            let cluster = serde_json::from_slice(&std::fs::read(&cluster_json).expect("read"))
                .expect("cluster.json is JSON");
            return (child, cluster);
        }
        eprintln!(
            "demo on base port {base} exited: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    panic!("the demo never came up; see the logs above");
}
