//! The machine the tests run on: the freshly built workspace binaries, free loopback
//! ports, temp dirs varnishd's workers can enter, and the pids of running programs.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Panics unless `program` runs and answers `flag` (`--version`, `-V`) with success:
/// a test that needs it fails loudly, naming the Debian `packages` that provide it.
pub fn require_program(program: &str, flag: &str, packages: &str) {
    let ok = std::process::Command::new(program)
        .arg(flag)
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{program} is not installed: these tests need Debian's {packages} (run scripts/test.sh, which installs them)"
    );
}

/// The `target/<profile>` directory holding the workspace binaries, (re)built once per
/// test process so a test never runs a stale binary (`cargo test -p tests` alone does not
/// rebuild other packages' binaries).
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        // target/debug/deps/e2e-hash -> target/debug
        let dir = exe
            .parent()
            .and_then(|d| {
                if d.ends_with("deps") {
                    d.parent()
                } else {
                    Some(d)
                }
            })
            .expect("binary directory")
            .to_owned();
        {
            let release = dir.ends_with("release");
            let mut cmd = std::process::Command::new(env!("CARGO"));
            cmd.args(["build", "--workspace", "--bins"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("cargo build");
            assert!(status.success(), "building the binaries failed");
        }
        dir
    })
}

/// A port that was free a moment ago (for varnishd, which binds its own sockets).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub(crate) fn lo(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A temp dir others (varnishd's workers) can traverse.
pub fn temp_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("e2e-")
        .tempdir()
        .expect("tempdir");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
    }
    dir
}

/// Pids of running programs named `name` whose command line contains `needle`.
pub fn pids_of(name: &str, needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|d| {
            let pid: u32 = d.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(d.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let prog = args.first()?.rsplit('/').next()?.to_owned();
            (prog == name && args.iter().any(|a| a.contains(needle))).then_some(pid)
        })
        .collect()
}
