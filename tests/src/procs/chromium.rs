//! Debian's headless chromium ([`chromium`]), for the tests that load the dashboard as a
//! browser does.

/// Runs Debian's headless chromium with the flags this machine needs (no sandbox as root,
/// no background networking) and `args`; panics when chromium is missing.
pub fn chromium(args: &[&str], profile: &std::path::Path) -> std::process::Output {
    super::host::require_program("chromium", "--version", "chromium");
    std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=8000",
            "--window-size=1280,2000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium")
}
