//! A real etcd cluster on loopback ([`EtcdCluster`]): `n` members, each with its own data
//! dir, serving once every member reports a leader; members can be SIGKILLed and started
//! again on their data, and authentication turned on as an operator would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use coordinator_cli::demo::process::{self, Child};

use super::host::{free_port, lo};
use crate::http::get_json;

/// Panics unless etcd (Debian's etcd-server) is installed.
pub fn require_etcd() {
    super::host::require_program("etcd", "--version", "etcd-server");
}

/// A real etcd cluster of `n` members on loopback, each with its own data dir.
pub struct EtcdCluster {
    /// Client URLs (`http://127.0.0.1:P`), one per member.
    pub endpoints: Vec<String>,
    pub members: Vec<Child>,
    /// Each member's command line and log, to start it again after a kill.
    commands: Vec<(Vec<String>, PathBuf)>,
}

impl EtcdCluster {
    pub async fn start(dir: &Path, n: usize) -> Self {
        Self::start_with(dir, n, &[]).await
    }

    /// [`Self::start`] with more flags for every member (e.g. `--auth-token-ttl=2`).
    ///
    /// The ports come from [`free_port`], which closes its probe socket: another test's
    /// outgoing connection can take one before etcd binds it, and that member exits with
    /// "address already in use". A member that exits, or a cluster not serving in 20 s,
    /// is started again on fresh ports and empty data dirs, up to three times.
    pub async fn start_with(dir: &Path, n: usize, flags: &[&str]) -> Self {
        require_etcd();
        std::fs::create_dir_all(dir).expect("etcd dir");
        let mut why = String::new();
        for attempt in 1..=3 {
            let mut cluster = Self::spawn(dir, n, flags);
            match cluster.wait_serving(Duration::from_secs(20)).await {
                Ok(()) => return cluster,
                Err(e) => {
                    eprintln!("etcd attempt {attempt}: {e}; trying fresh ports");
                    why = e;
                    for m in &mut cluster.members {
                        m.kill9().await;
                    }
                    for i in 0..n {
                        let _ = std::fs::remove_dir_all(dir.join(format!("m{i}")));
                    }
                }
            }
        }
        panic!(
            "etcd did not serve after 3 attempts: {why}; logs in {}",
            dir.display()
        );
    }

    fn spawn(dir: &Path, n: usize, flags: &[&str]) -> Self {
        let client: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let peer: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let initial: Vec<String> = (0..n)
            .map(|i| format!("m{i}=http://127.0.0.1:{}", peer[i]))
            .collect();
        let mut members = Vec::new();
        let mut commands = Vec::new();
        for i in 0..n {
            let data = dir.join(format!("m{i}"));
            let mut args: Vec<String> = [
                format!("--name=m{i}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls=http://127.0.0.1:{}", client[i]),
                format!("--advertise-client-urls=http://127.0.0.1:{}", client[i]),
                format!("--listen-peer-urls=http://127.0.0.1:{}", peer[i]),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{}", peer[i]),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=test".into(),
                "--heartbeat-interval=50".into(),
                "--election-timeout=500".into(),
                "--log-level=warn".into(),
                "--logger=zap".into(),
            ]
            .into();
            args.extend(flags.iter().map(|f| f.to_string()));
            let log = dir.join(format!("m{i}.log"));
            members
                .push(process::spawn(Path::new("etcd"), &args, &log, "etcd").expect("spawn etcd"));
            commands.push((args, log));
        }
        let endpoints: Vec<String> = client
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        EtcdCluster {
            endpoints,
            members,
            commands,
        }
    }

    /// Serving once every member answers /health with a leader; an error naming the
    /// member that exited or is not healthy by `within`.
    async fn wait_serving(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        for i in 0..self.members.len() {
            let url = self.endpoints[i].clone();
            let port: u16 = url
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("endpoint port");
            loop {
                if let Some(status) = self.members[i].try_status() {
                    return Err(format!("member {url} exited ({status})"));
                }
                let up = get_json(lo(port), "/health")
                    .await
                    .is_some_and(|h| h["health"] == "true");
                if up {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!("member {url} not healthy after {within:?}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

impl EtcdCluster {
    /// SIGKILL member `i`.
    pub async fn kill9(&mut self, i: usize) {
        self.members[i].kill9().await;
    }

    /// Starts killed member `i` again on its data dir.
    pub fn restart(&mut self, i: usize) {
        let (args, log) = &self.commands[i];
        self.members[i] = process::spawn(Path::new("etcd"), args, log, "etcd").expect("spawn etcd");
    }

    /// Turns on etcd's authentication: a `root` user (password `root_password`), and
    /// `user` (password `password`) with a role that may read and write the keys under
    /// `prefix` only, as an operator would set up a coordinator's account.
    pub async fn enable_auth(&self, root_password: &str, user: &str, password: &str, prefix: &str) {
        use etcd::authpb::{permission::Type, Permission};
        use etcd::etcdserverpb::{auth_client::AuthClient, *};
        let etcd = etcd::Etcd::connect(&self.endpoints).expect("connect");
        let mut auth = AuthClient::new(etcd.channel());
        for (name, pw) in [("root", root_password), (user, password)] {
            auth.user_add(AuthUserAddRequest {
                name: name.into(),
                password: pw.into(),
                ..Default::default()
            })
            .await
            .expect("user add");
        }
        for role in ["root", user] {
            auth.role_add(AuthRoleAddRequest { name: role.into() })
                .await
                .expect("role add");
        }
        auth.role_grant_permission(AuthRoleGrantPermissionRequest {
            name: user.into(),
            perm: Some(Permission {
                perm_type: Type::Readwrite as i32,
                key: prefix.as_bytes().to_vec(),
                range_end: etcd::prefix_end(prefix.as_bytes()),
            }),
        })
        .await
        .expect("grant the prefix");
        for (name, role) in [("root", "root"), (user, user)] {
            auth.user_grant_role(AuthUserGrantRoleRequest {
                user: name.into(),
                role: role.into(),
            })
            .await
            .expect("grant role");
        }
        auth.auth_enable(AuthEnableRequest {})
            .await
            .expect("auth enable");
    }

    /// `endpoints` as a TOML array.
    pub fn endpoints_toml(&self) -> String {
        let quoted: Vec<String> = self.endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }
}
