//! One function per subcommand. Each returns the process exit status: 0 on success,
//! 1 when the work failed, 2 for a bad config or bad arguments (one line on stderr),
//! and `status`'s own 0/1/2/3.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use coordinator::config::CoordinatorConfig;
use coordinator::server;
use tokio_util::sync::CancellationToken;

use crate::args::{
    ApiArgs, Cli, Command, ConfigCommand, PkiCommand, RegionCommand, SilenceCommand, WarmCommand,
};
use crate::cli::{self, ApiClient};
use crate::demo;

/// Runs the parsed command line to its exit status.
pub fn main(args: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("coordinator: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json_logs = args.log_format == "json";
    runtime.block_on(async move {
        match args.command {
            Command::Serve {
                config,
                state_dir,
                insecure,
            } => serve(&config, &state_dir, insecure, json_logs).await,
            Command::Demo {
                regions,
                base_port,
                state_dir,
                origin,
                tiered,
                purge_mode,
                refresh_tags,
                insecure,
                geoip,
            } => {
                let args = demo::DemoArgs {
                    regions,
                    base_port,
                    state_dir,
                    origin,
                    tiered,
                    purge_mode,
                    refresh_tags,
                    insecure,
                    geoip,
                };
                run_demo(args, json_logs).await
            }
            Command::Pki { command } => pki(command),
            Command::Config { api, command } => match client(&api) {
                Ok(c) => config(&c, command).await,
                Err(code) => code,
            },
            Command::Audit {
                api,
                limit,
                since,
                json,
            } => match client(&api) {
                Ok(c) => exit(cli::audit(&c, limit, since.as_deref(), json).await),
                Err(code) => code,
            },
            Command::Warm { api, command } => match client(&api) {
                Ok(c) => warm(&c, command).await,
                Err(code) => code,
            },
            Command::Status { api, json } => match client(&api) {
                Ok(c) => status(&c, json).await,
                Err(code) => code,
            },
            Command::Backup { api, file } => match client(&api) {
                Ok(c) => exit(cli::backup(&c, &file).await),
                Err(code) => code,
            },
            Command::Restore {
                file,
                state_dir,
                force,
            } => exit(cli::restore(&file, &state_dir, force)),
            Command::Region { api, command } => match client(&api) {
                Ok(c) => exit(match command {
                    RegionCommand::Drain {
                        name,
                        for_s,
                        reason,
                    } => crate::maintenance::drain(&c, &name, for_s, reason).await,
                    RegionCommand::Undrain { name } => crate::maintenance::undrain(&c, &name).await,
                }),
                Err(code) => code,
            },
            Command::Silence { api, command } => match client(&api) {
                Ok(c) => exit(match command {
                    SilenceCommand::Add {
                        region,
                        diagnosis,
                        for_s,
                        reason,
                    } => {
                        let request = coordinator::api::views::SilenceRequest {
                            region,
                            diagnosis,
                            for_s,
                            reason,
                        };
                        crate::maintenance::silence_add(&c, &request).await
                    }
                    SilenceCommand::List => crate::maintenance::silence_list(&c).await,
                    SilenceCommand::Remove { id } => {
                        crate::maintenance::silence_remove(&c, &id).await
                    }
                }),
                Err(code) => code,
            },
            Command::Route { api, ip, json } => match client(&api) {
                Ok(c) => exit(cli::route(&c, &ip, json).await),
                Err(code) => code,
            },
            Command::Purge {
                api,
                tags,
                url,
                host,
                all,
                soft,
                wait,
                timeout_s,
            } => match client(&api) {
                Ok(c) => {
                    let wait = wait.then(|| std::time::Duration::from_secs(timeout_s));
                    purge(&c, tags, url, host, all, soft, wait).await
                }
                Err(code) => code,
            },
        }
    })
}

/// `coordinator serve`: load and validate the config (exit 2 on a bad one), bind, serve
/// until SIGTERM/SIGINT.
pub async fn serve(config: &Path, state_dir: &Path, insecure: bool, json_logs: bool) -> ExitCode {
    let config = match daemon::load::<CoordinatorConfig>(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("coordinator: {e}");
            return ExitCode::from(2);
        }
    };
    daemon::logging::init(json_logs);
    daemon::out::on_closed(daemon::out::Closed::Ignore);
    // One descriptor per agent connection: use all the hard limit allows.
    match daemon::limits::raise_nofile() {
        Ok(l) if l.soft < 4096 => tracing::warn!(nofile = l.soft, hard = l.hard,
            "file descriptor limit is low: about one per edge agent is needed; raise LimitNOFILE (or ulimit -Hn)"),
        Ok(l) => tracing::info!(nofile = l.soft, "file descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read the file descriptor limit"),
    }
    // Refused before the state is opened (in a cluster: before the election is joined).
    if let Err(e) = server::preflight(&config, insecure) {
        eprintln!("coordinator: {e}");
        return ExitCode::from(2);
    }
    let listeners = match server::Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => return exit(Err(e)),
    };
    // A GeoIP database or certificate files that cannot be read are configuration
    // errors too: one line, 2.
    let state = match server::open(&config, state_dir).await {
        Ok(s) => s,
        Err(
            e @ server::ServeError::Open(
                coordinator::state::OpenError::Geo(_) | coordinator::state::OpenError::Tls(_),
            ),
        ) => {
            eprintln!("coordinator: {e}");
            return ExitCode::from(2);
        }
        Err(e) => return exit(Err(e)),
    };
    let shutdown = stop_on_signal();
    exit(server::run(config, state, listeners, insecure, shutdown).await)
}

/// `coordinator demo`: the whole local cluster until SIGTERM/SIGINT.
pub async fn run_demo(args: demo::DemoArgs, json_logs: bool) -> ExitCode {
    daemon::logging::init(json_logs);
    // Its children outlive a closed stdout until it stops them: it carries on.
    daemon::out::on_closed(daemon::out::Closed::Ignore);
    let shutdown = stop_on_signal();
    exit(demo::run(args, shutdown).await)
}

/// `coordinator pki init|issue`: prints each certificate written (or kept) and when it
/// expires.
pub fn pki(command: PkiCommand) -> ExitCode {
    let result = match command {
        PkiCommand::Init {
            dir,
            san,
            days,
            ca_days,
        } => coordinator::pki::init_for(&dir, &san, ca_days, days).map(|minted| {
            for m in &minted {
                daemon::say!("{m}");
            }
            daemon::say!(
                "keys (0600): {0}/ca.key, {0}/coordinator.key",
                dir.display()
            );
        }),
        PkiCommand::Issue {
            id,
            region,
            dir,
            days,
        } => coordinator::pki::issue(&dir, &id, &region, days).map(|m| {
            daemon::say!("{m}");
            daemon::say!("key (0600): {}/{id}.key", dir.display());
        }),
    };
    exit(result)
}

/// `coordinator config …`.
pub async fn config(client: &ApiClient, command: ConfigCommand) -> ExitCode {
    let result = match command {
        ConfigCommand::Push {
            dir,
            no_canary,
            wait,
            force,
        } => cli::config_push(client, &dir, !no_canary, wait, force).await,
        ConfigCommand::List => cli::config_list(client).await,
        ConfigCommand::Show { version, file } => {
            cli::config_show(client, &version, file.as_deref()).await
        }
        ConfigCommand::Diff { a, b } => cli::config_diff(client, &a, &b).await,
        ConfigCommand::Rollback { version, wait } => {
            cli::config_rollback(client, version, wait).await
        }
        ConfigCommand::Status => cli::config_status(client).await,
    };
    exit(result)
}

/// `coordinator warm …`.
pub async fn warm(client: &ApiClient, command: WarmCommand) -> ExitCode {
    let result = match command {
        WarmCommand::Start {
            sitemap,
            urls_file,
            top,
            regions,
            rate,
            concurrency,
            variation,
            host,
            flat,
            refresh,
            rewarm,
            wait,
        } => {
            let urls = match read_urls(urls_file) {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("coordinator: --urls-file: {e}");
                    return ExitCode::from(2);
                }
            };
            let spec = coordinator::warm::job::JobSpec {
                sitemap,
                urls,
                top,
                regions: Some(regions.split(',').map(|r| r.trim().to_owned()).collect()),
                rate,
                concurrency,
                variations: (!variation.is_empty()).then_some(variation),
                host,
                tiered: flat.then_some(false),
                refresh,
                only_stale: false,
                rewarm: rewarm.then_some(true),
            };
            cli::warm_start(client, &spec, wait).await
        }
        WarmCommand::Status { id } => cli::warm_status(client, id).await,
        WarmCommand::Cancel { id } => cli::warm_cancel(client, id).await,
    };
    exit(result)
}

/// One absolute URL per line; blank lines and `#` comments skipped.
fn read_urls(file: Option<PathBuf>) -> std::io::Result<Vec<String>> {
    let text = file.map(std::fs::read_to_string).transpose()?;
    Ok(text
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// `coordinator status`: 0 every region up, 1 one degraded, 2 one down, 3 one unknown
/// (none worse) or the API unreadable.
pub async fn status(client: &ApiClient, json: bool) -> ExitCode {
    match cli::status(client, json).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("coordinator: {e:#}");
            ExitCode::from(3)
        }
    }
}

/// `coordinator purge --tag …|--url …|--all [--wait]`.
pub async fn purge(
    client: &ApiClient,
    tags: Vec<String>,
    url: Option<String>,
    host: Option<String>,
    all: bool,
    soft: bool,
    wait: Option<std::time::Duration>,
) -> ExitCode {
    let body = if all {
        coordinator::api::views::PurgeBody::all(soft)
    } else if let Some(url) = url {
        coordinator::api::views::PurgeBody::url(url, host, soft)
    } else if !tags.is_empty() {
        coordinator::api::views::PurgeBody::tags(tags, soft)
    } else {
        eprintln!("coordinator: give --tag, --url or --all");
        return ExitCode::from(2);
    };
    exit(cli::purge(client, &body, wait).await)
}

fn client(api: &ApiArgs) -> Result<ApiClient, ExitCode> {
    ApiClient::new(&api.api, api.token.clone(), api.token_file.as_deref()).map_err(|e| {
        eprintln!("coordinator: {e}");
        ExitCode::from(2)
    })
}

/// 0, or 1 with the error and each of its sources on one line (`outer: cause: ...`).
fn exit<E: std::error::Error>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let causes = std::iter::successors(e.source(), |s| s.source());
            let line = causes.fold(e.to_string(), |line, s| format!("{line}: {s}"));
            eprintln!("coordinator: {line}");
            ExitCode::FAILURE
        }
    }
}

/// A token cancelled on SIGINT or SIGTERM.
fn stop_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    tokio::spawn(daemon::signal::stop_on_signal(token.clone()));
    token
}
