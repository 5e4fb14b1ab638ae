//! What an operator installs: the systemd units in `deploy/systemd/` pass
//! `systemd-analyze verify` (syntax, every key known, the executables exist) and stay
//! hardened (`systemd-analyze security` exposure at most 3.0 of 10), and every option of
//! every `coordinator` subcommand says what it is for in `--help`.

use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
}

fn systemd_analyze(args: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze is missing: scripts/install-deps.sh installs Debian's systemd");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn systemd_units_verify_and_are_hardened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bins = tests::bin_dir();
    for (unit, bin) in [
        ("coordinator.service", "coordinator"),
        ("edge-agent.service", "edge-agent"),
    ] {
        let text =
            std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).expect("unit file");
        let installed = format!("/usr/bin/{bin}");
        assert!(text.contains(&installed), "{unit} runs {installed}");
        for key in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "StateDirectory=",
            "Restart=always",
            "ExecReload=",
            "User=",
        ] {
            assert!(text.contains(key), "{unit} lacks {key}");
        }
        // The same unit, pointing at the binary this checkout built.
        let local = dir.path().join(unit);
        let exe = bins.join(bin);
        std::fs::write(&local, text.replace(&installed, &exe.display().to_string()))
            .expect("write unit");
        let path = local.display().to_string();
        let (ok, out) = systemd_analyze(&["verify", &path]);
        assert!(
            ok && out.trim().is_empty(),
            "systemd-analyze verify {unit}:\n{out}"
        );
        let (ok, out) = systemd_analyze(&["security", "--offline=yes", "--threshold=30", &path]);
        assert!(ok, "{unit} is exposed above 3.0:\n{out}");
    }
    // The varnishd drop-in, over a stand-in for Debian's varnish.service.
    let base = dir.path().join("varnish.service");
    std::fs::write(
        &base,
        "[Unit]\nDescription=Varnish\n[Service]\nExecStart=/usr/sbin/varnishd -F\n",
    )
    .expect("base unit");
    let dropins = dir.path().join("varnish.service.d");
    std::fs::create_dir_all(&dropins).expect("drop-in dir");
    std::fs::copy(
        repo().join("deploy/systemd/varnish-edge.conf"),
        dropins.join("coordinator.conf"),
    )
    .expect("drop-in");
    let (ok, out) = systemd_analyze(&["verify", &base.display().to_string()]);
    assert!(ok && out.trim().is_empty(), "the varnish drop-in:\n{out}");
    // A unit with a typo is caught, so the check above can fail.
    let bad = dir.path().join("bad.service");
    std::fs::write(&bad, "[Service]\nExecStart=/bin/true\nRestart=allways\n").expect("write");
    let (ok, out) = systemd_analyze(&["verify", &bad.display().to_string()]);
    assert!(!(ok && out.trim().is_empty()), "a bad unit passed: {out}");
}

/// Every argument of every subcommand, recursively: `(command path, argument)` for those
/// whose help is empty.
fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if matches!(id, "help" | "version") {
            continue;
        }
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        if help.trim().is_empty() {
            out.push(format!("{path} {id}"));
        }
    }
    for sub in cmd.get_subcommands() {
        if sub
            .get_about()
            .is_none_or(|a| a.to_string().trim().is_empty())
        {
            out.push(format!("{path} {} (no about)", sub.get_name()));
        }
        undocumented(sub, &format!("{path} {}", sub.get_name()), out);
    }
}

#[test]
fn every_cli_option_has_a_description() {
    use clap::CommandFactory;
    let mut missing = Vec::new();
    undocumented(
        &coordinator_cli::args::Cli::command(),
        "coordinator",
        &mut missing,
    );
    assert!(missing.is_empty(), "no --help text for: {missing:?}");
    // The walk finds an undocumented option, so the check above can fail.
    let mut found = Vec::new();
    let probe = clap::Command::new("x").about("x").subcommand(
        clap::Command::new("y")
            .about("y")
            .arg(clap::Arg::new("bare").long("bare")),
    );
    undocumented(&probe, "x", &mut found);
    assert_eq!(found, vec!["x y bare".to_owned()]);
    // And the real binary prints it.
    let out = Command::new(tests::bin_dir().join("coordinator"))
        .args(["purge", "--help"])
        .output()
        .expect("coordinator purge --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--token"), "{text}");
}

/// The boot VCL docs/production.md has varnishd start with: the bundle an agent rendered
/// for its region (main.vcl with its ./waf.vcl beside it) compiles in Debian's varnishd,
/// with its vmods, from the drop-in's `-f` path layout.
#[test]
fn the_guides_boot_vcl_compiles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dropin =
        std::fs::read_to_string(repo().join("deploy/systemd/varnish-edge.conf")).expect("drop-in");
    assert!(dropin.contains("-f /etc/varnish/boot/main.vcl"), "{dropin}");
    let backend: std::net::SocketAddr = "10.0.1.5:8080".parse().expect("addr");
    let main = coordinator_cli::demo::write_boot_vcl(
        &dir.path().join("boot"),
        "eu-west",
        backend,
        "0123456789abcdef",
        300,
    )
    .expect("render the bundle");
    let out = Command::new("varnishd")
        .args(["-C", "-n"])
        .arg(dir.path().join("work"))
        .arg("-f")
        .arg(&main)
        .output()
        .expect("varnishd is missing: scripts/install-deps.sh installs it");
    assert!(
        out.status.success(),
        "varnishd -C: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
