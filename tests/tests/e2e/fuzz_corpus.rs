//! Replays every committed fuzz corpus and regression input through the same harnesses
//! the fuzz targets use (`fuzz/`), so a fixed crash stays fixed without running a fuzzer.

use std::path::Path;

type Harness = fn(&[u8]);

const TARGETS: [(&str, Harness); 7] = [
    ("purge_request", coordinator::fuzzing::purge_request),
    ("purge_pattern", coordinator::fuzzing::purge_pattern),
    ("http_head", coordinator::fuzzing::http_head),
    ("waf_compile", coordinator::fuzzing::waf),
    ("agent_message", coordinator::fuzzing::agent_message),
    (
        "coordinator_message",
        edge_agent::fuzzing::coordinator_message,
    ),
    ("sitemap", warmer::fuzzing::sitemap),
];

#[test]
fn fuzz_corpora_and_regressions_replay_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut replayed = 0;
    for (target, harness) in TARGETS {
        let mut inputs = 0;
        for kind in ["corpus", "regressions"] {
            let dir = root.join(kind).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !path.is_file() || path.file_name().is_some_and(|n| n == ".keep") {
                    continue;
                }
                let data = std::fs::read(&path).expect("read input");
                if std::env::var_os("FUZZ_REPLAY_VERBOSE").is_some() {
                    eprintln!("{target}: {}", path.display());
                }
                if std::panic::catch_unwind(|| harness(&data)).is_err() {
                    panic!("{target}: {} breaks the harness", path.display());
                }
                inputs += 1;
            }
        }
        assert!(inputs > 0, "no committed inputs for fuzz target {target}");
        replayed += inputs;
    }
    eprintln!("replayed {replayed} fuzz inputs");
}
