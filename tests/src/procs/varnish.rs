//! One real varnishd ([`VarnishNode`]) booted with the project's VCL rendered for a
//! backend (or with any VCL given, [`VarnishNode::start_with_vcl`]: Debian's or Magento's
//! own): its ports, admin CLI, `varnishstat` counters, SIGKILL and restart on the same
//! ports (an empty cache, the boot VCL).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coordinator_cli::demo::process::{self, Child, VarnishSpec};

use super::host::{free_port, lo};
use super::WARM_TOKEN;

/// Panics unless varnishd (with xkey) is installed.
pub fn require_varnish() {
    super::host::require_program("varnishd", "-V", "varnish and varnish-modules");
}

/// One varnishd with the project's VCL.
pub struct VarnishNode {
    pub workdir: PathBuf,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub secret: PathBuf,
    /// The boot VCL (`main.vcl` of the sample bundle rendered for this node).
    pub boot_vcl: PathBuf,
    pub child: Child,
    spec: VarnishSpec,
    log: PathBuf,
}

impl VarnishNode {
    pub async fn start(dir: &Path, backend: SocketAddr) -> Self {
        Self::start_with(dir, backend, coordinator::config::MAGENTO_STALE_S).await
    }

    /// [`Self::start`] with the boot VCL serving a stale copy for `max_stale_s` while the
    /// backend is healthy (what `[purge] refresh_max_stale_s` renders in refresh mode).
    pub async fn start_with(dir: &Path, backend: SocketAddr, max_stale_s: u64) -> Self {
        require_varnish();
        std::fs::create_dir_all(dir).expect("varnish dir");
        let vcl = coordinator_cli::demo::write_boot_vcl(
            &dir.join("boot-vcl"),
            "boot",
            backend,
            WARM_TOKEN,
            max_stale_s,
        )
        .expect("boot vcl");
        Self::boot(dir, vcl).await
    }

    /// A varnishd booted with `vcl` (the text of a whole VCL, its backend already
    /// filled in) instead of the project's.
    pub async fn start_with_vcl(dir: &Path, vcl: &str) -> Self {
        require_varnish();
        let vcl_dir = dir.join("boot-vcl");
        std::fs::create_dir_all(&vcl_dir).expect("boot vcl dir");
        let path = vcl_dir.join("boot.vcl");
        std::fs::write(&path, vcl).expect("boot vcl");
        Self::boot(dir, path).await
    }

    async fn boot(dir: &Path, vcl: PathBuf) -> Self {
        let secret = dir.join("secret");
        process::write_secret(&secret).expect("secret");
        let mut last_err = None;
        for _ in 0..3 {
            let spec = VarnishSpec {
                also_listen: None,
                workdir: dir.join("varnish"),
                http: lo(free_port()),
                admin: lo(free_port()),
                secret_file: secret.clone(),
                vcl_file: vcl.clone(),
                storage_mb: 32,
            };
            let log = dir.join("varnishd.log");
            match process::start_varnishd(&spec, &log).await {
                Ok(child) => {
                    return VarnishNode {
                        workdir: spec.workdir.clone(),
                        http: spec.http,
                        admin: spec.admin,
                        secret,
                        boot_vcl: vcl,
                        child,
                        spec,
                        log,
                    };
                }
                Err(e) => last_err = Some(e),
            }
        }
        panic!("varnishd did not start: {last_err:?}");
    }

    /// SIGKILL varnishd and start it again on the same ports: it comes back with its
    /// boot VCL and an empty cache.
    pub async fn kill9_and_restart(&mut self) {
        self.kill9().await;
        self.restart().await;
    }

    /// SIGKILL varnishd (manager and cache process) and wait until it no longer answers.
    pub async fn kill9(&mut self) {
        self.child.kill9().await;
        // The killed manager's cache process may serve and hold the ports for a moment.
        let deadline = Instant::now() + Duration::from_secs(15);
        while process::http_answers(self.http).await && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts a killed varnishd again on the same ports.
    pub async fn restart(&mut self) {
        let mut last = None;
        for _ in 0..40 {
            match process::start_varnishd(&self.spec, &self.log).await {
                Ok(child) => {
                    self.child = child;
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("varnishd did not restart: {last:?}");
    }

    /// The name of the active VCL (`vcl.list`).
    pub async fn active_vcl(&self) -> String {
        let list = self.admin("vcl.list").await;
        list.lines()
            .find(|l| l.starts_with("active"))
            .and_then(|l| l.split_whitespace().nth(4))
            .unwrap_or_default()
            .to_owned()
    }

    /// One counter from `varnishstat -1` (e.g. `MAIN.bans_added`).
    pub fn counter(&self, name: &str) -> u64 {
        let out = std::process::Command::new("varnishstat")
            .arg("-n")
            .arg(&self.workdir)
            .args(["-1", "-f", name])
            .output()
            .expect("varnishstat");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no counter {name} in varnishstat output: {text}"))
    }

    /// Runs an admin CLI command (through the agent's own protocol client).
    pub async fn admin(&self, command: &str) -> String {
        let secret = std::fs::read(&self.secret).expect("secret");
        let mut c = edge_agent::varnish::admin::AdminClient::connect(
            self.admin,
            &secret,
            Duration::from_secs(5),
        )
        .await
        .expect("admin connect");
        c.command(command).await.expect("admin command")
    }
}
