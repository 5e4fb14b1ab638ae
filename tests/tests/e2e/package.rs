//! The Debian packages, as an operator installs them: `scripts/package.sh` builds
//! `varnish-coordinator` and `varnish-edge-agent`, `dpkg -i` installs both on this
//! machine, and every file lands with its owner and mode (the config directories, which
//! will hold keys and the API token, readable by no other user), the installed units pass
//! `systemd-analyze verify`, the binaries name the commit they were built from, and the
//! installed config templates load through the real config loaders. `dpkg --purge`
//! then leaves no file, directory, user or group behind.
//!
//! The shipped templates (`deploy/config/`) are also checked on their own: they load,
//! hold no `/tmp` path or loopback listener where production needs a reachable one, and
//! agree with the varnishd drop-in on the ports the agent talks to.
//!
//! The install test touches only the packages' own paths and users, none of which any
//! other test uses (they run the binaries in `target/debug`), and refuses to run over a
//! real installation. It needs root (dpkg), as CI runs the suite.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use coordinator::config::CoordinatorConfig;
use edge_agent::config::AgentConfig;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program}: {e} (scripts/install-deps.sh installs it)")
        })
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ports of varnishd's `-a`, `-T` and the `-S` file in the drop-in.
fn drop_in() -> (Vec<u16>, u16, PathBuf) {
    let text = std::fs::read_to_string(repo().join("deploy/systemd/varnish-edge.conf"))
        .expect("the varnishd drop-in");
    let words: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split_whitespace())
        .collect();
    let port = |addr: &str| -> u16 {
        let addr = addr.split(',').next().unwrap_or_default();
        addr.rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {addr:?}"))
    };
    let after = |flag: &str| -> Vec<&str> {
        words
            .windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1])
            .collect()
    };
    let listen = after("-a").into_iter().map(port).collect();
    let admin = port(after("-T").first().expect("-T in the drop-in"));
    let secret = PathBuf::from(after("-S").first().expect("-S in the drop-in"));
    (listen, admin, secret)
}

#[test]
fn shipped_config_templates_load_and_fit_production() {
    let coordinator_toml = repo().join("deploy/config/coordinator.toml");
    let agent_toml = repo().join("deploy/config/edge-agent.toml");
    for path in [&coordinator_toml, &agent_toml] {
        let text = std::fs::read_to_string(path).expect("template");
        assert!(!text.contains("/tmp"), "{} names /tmp", path.display());
        assert!(
            text.contains("CHANGE"),
            "{} marks no key to change",
            path.display()
        );
    }
    let c = CoordinatorConfig::load(&coordinator_toml)
        .unwrap_or_else(|e| panic!("{}: {e}", coordinator_toml.display()));
    for (what, addr) in [
        ("purge", c.purge.listen),
        ("grpc", c.grpc.listen),
        ("api", c.api.listen),
    ] {
        assert!(
            !addr.ip().is_loopback(),
            "[{what}] listen {addr} is loopback: Magento, agents and Prometheus could not reach it"
        );
    }
    assert!(c.grpc.tls.is_some(), "the template runs gRPC without TLS");
    assert_eq!(
        c.api.token_file.as_deref(),
        Some(Path::new("/etc/coordinator/api-token"))
    );
    let a =
        AgentConfig::load(&agent_toml).unwrap_or_else(|e| panic!("{}: {e}", agent_toml.display()));
    assert!(a.tls.is_some(), "the agent template dials without TLS");
    assert!(a.coordinator.https());
    assert_eq!(a.state_dir, Path::new("/var/lib/edge-agent"));
    let (listen, admin, secret) = drop_in();
    assert!(
        listen.contains(&a.varnish.http.port()),
        "[varnish] http {} is none of varnishd's -a ports {listen:?}",
        a.varnish.http
    );
    assert_eq!(a.varnish.admin.port(), admin, "[varnish] admin vs -T");
    assert_eq!(a.varnish.secret_file, secret, "[varnish] secret_file vs -S");
    // The loader refuses what it should, so the loads above can fail.
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("edge-agent.toml");
    let text = std::fs::read_to_string(&agent_toml).expect("template");
    std::fs::write(&bad, format!("{text}\nno_such_key = 1\n")).expect("write");
    assert!(AgentConfig::load(&bad).is_err(), "an unknown key loaded");
}

/// `user:group mode` of a path, or `None` when it does not exist.
fn stat(path: &str) -> Option<String> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    let name = |db: &str, id: u32| {
        let out = run("getent", &[db, &id.to_string()]);
        String::from_utf8_lossy(&out.stdout)
            .split(':')
            .next()
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| id.to_string())
    };
    Some(format!(
        "{}:{} {:o}",
        name("passwd", meta.uid()),
        name("group", meta.gid()),
        meta.mode() & 0o7777
    ))
}

fn exists(db: &str, name: &str) -> bool {
    run("getent", &[db, name]).status.success()
}

const PACKAGES: [&str; 2] = ["varnish-coordinator", "varnish-edge-agent"];

/// Purges both packages when the test ends, passed or not.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").arg("--purge").args(PACKAGES).output();
    }
}

/// What the binaries should name: the build script's rule.
fn expected_commit() -> String {
    if let Some(c) = std::env::var("GIT_COMMIT")
        .ok()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
    {
        return c;
    }
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => "unknown".to_owned(),
    }
}

#[test]
fn the_packages_install_verify_and_purge_without_a_trace() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test installs and purges Debian packages: run the e2e tests as root (CI does)"
    );
    for p in PACKAGES {
        let status = run("dpkg-query", &["-W", "-f", "${Status}", p]);
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(
            !text.contains("installed") || text.contains("not-installed"),
            "{p} is installed on this machine ({text}): this test would purge it"
        );
    }
    for path in [
        "/etc/coordinator",
        "/etc/edge-agent",
        "/var/lib/coordinator",
        "/var/lib/edge-agent",
    ] {
        assert!(
            !Path::new(path).exists(),
            "{path} exists: a manual install on this machine? this test would purge it"
        );
    }
    assert!(
        exists("group", "varnish"),
        "no group varnish: Debian's varnish package makes it (scripts/install-deps.sh)"
    );

    // The debug build: bin_dir builds the workspace's binaries, so the script's own
    // cargo build finds nothing to do.
    let target = tests::bin_dir().parent().expect("target dir");
    let started = Instant::now();
    let out = Command::new(repo().join("scripts/package.sh"))
        .args(["--profile", "debug"])
        .env("CARGO_TARGET_DIR", target)
        .output()
        .expect("scripts/package.sh");
    assert!(
        out.status.success(),
        "scripts/package.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let debs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.ends_with(".deb"))
        .map(str::to_owned)
        .collect();
    assert_eq!(debs.len(), 2, "package.sh names two packages: {debs:?}");
    let packaged = started.elapsed();

    let _purge = Purge;
    let mut args = vec!["-i"];
    args.extend(debs.iter().map(String::as_str));
    let install = ok("dpkg", &args);
    assert!(
        install.contains("not started"),
        "postinst says the service is not started:\n{install}"
    );

    // Files, owners, modes.
    let want = [
        ("/usr/bin/coordinator", "root:root 755"),
        ("/usr/bin/warmer", "root:root 755"),
        ("/usr/bin/edge-agent", "root:root 755"),
        ("/lib/systemd/system/coordinator.service", "root:root 644"),
        ("/lib/systemd/system/edge-agent.service", "root:root 644"),
        ("/etc/coordinator", "root:coordinator 750"),
        ("/etc/coordinator/coordinator.toml", "root:coordinator 640"),
        ("/etc/edge-agent", "root:varnish 750"),
        ("/etc/edge-agent/edge-agent.toml", "root:varnish 640"),
        ("/var/lib/coordinator", "coordinator:coordinator 700"),
        ("/var/lib/edge-agent", "edge-agent:varnish 710"),
        (
            "/usr/share/varnish-coordinator/vcl/main.vcl",
            "root:root 644",
        ),
        (
            "/usr/share/varnish-coordinator/vcl/waf.toml",
            "root:root 644",
        ),
        (
            "/usr/share/varnish-coordinator/grafana/varnish-coordinator.json",
            "root:root 644",
        ),
        (
            "/usr/share/varnish-coordinator/prometheus/alerts.yml",
            "root:root 644",
        ),
        (
            "/usr/share/doc/varnish-edge-agent/examples/varnish-edge.conf",
            "root:root 644",
        ),
    ];
    for (path, expected) in want {
        assert_eq!(stat(path).as_deref(), Some(expected), "{path}");
    }
    for p in PACKAGES {
        for doc in [
            "copyright",
            "README.md",
            "SECURITY.md",
            "CHANGELOG.md",
            "production.md",
        ] {
            let path = format!("/usr/share/doc/{p}/{doc}");
            assert_eq!(stat(&path).as_deref(), Some("root:root 644"), "{path}");
        }
    }
    assert_eq!(
        std::fs::read(repo().join("edge-agent/vcl/main.vcl")).expect("bundle"),
        std::fs::read("/usr/share/varnish-coordinator/vcl/main.vcl").expect("shipped bundle"),
        "the shipped bundle is the project's"
    );
    // Users: system users without a login; the agent's primary group is varnish.
    for user in ["coordinator", "edge-agent"] {
        let passwd = ok("getent", &["passwd", user]);
        let tail = format!(":/var/lib/{user}:/usr/sbin/nologin");
        assert!(passwd.trim_end().ends_with(&tail), "{passwd}");
    }
    assert_eq!(ok("id", &["-gn", "edge-agent"]).trim(), "varnish");
    // Conffiles and dependencies as dpkg recorded them.
    let conffiles = ok(
        "dpkg-query",
        &[
            "-W",
            "-f",
            "${Conffiles}\n",
            "varnish-coordinator",
            "varnish-edge-agent",
        ],
    );
    for f in [
        "/etc/coordinator/coordinator.toml",
        "/etc/edge-agent/edge-agent.toml",
    ] {
        assert!(conffiles.contains(f), "{f} is not a conffile: {conffiles}");
    }
    let depends = ok(
        "dpkg-query",
        &[
            "-W",
            "-f",
            "${Depends}|${Recommends}\n",
            "varnish-edge-agent",
        ],
    );
    for dep in ["libc6", "adduser", "varnish (>= 7.1)", "varnish-modules"] {
        assert!(
            depends.contains(dep),
            "varnish-edge-agent lacks {dep}: {depends}"
        );
    }
    assert!(ok(
        "dpkg-query",
        &["-W", "-f", "${Depends}", "varnish-coordinator"]
    )
    .contains("libc6"));
    // Not enabled by the install.
    for unit in ["coordinator.service", "edge-agent.service"] {
        let wants = format!("/etc/systemd/system/multi-user.target.wants/{unit}");
        assert!(
            !Path::new(&wants).exists(),
            "{unit} was enabled by the install"
        );
    }

    // The installed units verify, pointing at the installed binaries.
    let verify = run(
        "systemd-analyze",
        &[
            "verify",
            "/lib/systemd/system/coordinator.service",
            "/lib/systemd/system/edge-agent.service",
        ],
    );
    let text = String::from_utf8_lossy(&verify.stdout).into_owned()
        + &String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && text.trim().is_empty(),
        "systemd-analyze verify on the installed units:\n{text}"
    );

    // --version names the program, the version and the commit.
    let version = env!("CARGO_PKG_VERSION");
    let commit = expected_commit();
    for bin in ["coordinator", "edge-agent", "warmer"] {
        let out = ok(&format!("/usr/bin/{bin}"), &["--version"]);
        assert_eq!(out.trim(), format!("{bin} {version} (commit {commit})"));
    }

    // The installed templates load through the real loaders.
    CoordinatorConfig::load(Path::new("/etc/coordinator/coordinator.toml"))
        .unwrap_or_else(|e| panic!("the installed coordinator.toml: {e}"));
    AgentConfig::load(Path::new("/etc/edge-agent/edge-agent.toml"))
        .unwrap_or_else(|e| panic!("the installed edge-agent.toml: {e}"));

    // An upgrade (here: the same packages again) keeps an edited conffile, its owner
    // and mode.
    let conf = "/etc/coordinator/coordinator.toml";
    let edited = std::fs::read_to_string(conf).expect("conffile") + "# edited by the operator\n";
    std::fs::write(conf, &edited).expect("edit the conffile");
    let mut args = vec!["-i"];
    args.extend(debs.iter().map(String::as_str));
    ok("dpkg", &args);
    assert_eq!(std::fs::read_to_string(conf).expect("conffile"), edited);
    assert_eq!(stat(conf).as_deref(), Some("root:coordinator 640"));

    // Remove: the programs go, the config, the state and the users stay (for a
    // reinstall); purge then takes the rest.
    let mut args = vec!["-r"];
    args.extend(PACKAGES);
    ok("dpkg", &args);
    for path in [
        "/usr/bin/coordinator",
        "/usr/bin/edge-agent",
        "/lib/systemd/system/coordinator.service",
    ] {
        assert!(stat(path).is_none(), "{path} is left after dpkg -r");
    }
    assert!(stat(conf).is_some() && stat("/var/lib/edge-agent").is_some());
    assert!(exists("passwd", "coordinator") && exists("passwd", "edge-agent"));

    // Purge: nothing left.
    let mut args = vec!["--purge"];
    args.extend(PACKAGES);
    ok("dpkg", &args);
    for (path, _) in want {
        assert!(stat(path).is_none(), "{path} is left after purge");
    }
    for p in PACKAGES {
        let path = format!("/usr/share/doc/{p}");
        assert!(stat(&path).is_none(), "{path} is left after purge");
    }
    assert!(stat("/usr/share/varnish-coordinator").is_none());
    for user in ["coordinator", "edge-agent"] {
        assert!(!exists("passwd", user), "user {user} is left after purge");
    }
    assert!(
        !exists("group", "coordinator"),
        "group coordinator is left after purge"
    );
    assert!(
        exists("group", "varnish"),
        "purge removed varnish's own group"
    );
    eprintln!(
        "packaged in {:.1} s, installed, checked and purged in {:.1} s",
        packaged.as_secs_f64(),
        started.elapsed().as_secs_f64() - packaged.as_secs_f64()
    );
}
