//! `coordinator`: thin entry point. Parses arguments, loads and validates the config,
//! initialises tracing and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use coordinator::cli::{self, ApiClient};
use coordinator::config::CoordinatorConfig;
use coordinator::{demo, server, telemetry};
use tokio_util::sync::CancellationToken;

/// Coordinator for geo-distributed Varnish clusters in front of Magento 2.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator.
    Serve {
        #[arg(long)]
        config: PathBuf,
        /// Where the purge log and other state live.
        #[arg(long)]
        state_dir: PathBuf,
        /// Allow plaintext gRPC when [grpc.tls] is not configured (agents are then not
        /// authenticated).
        #[arg(long)]
        insecure: bool,
    },
    /// Mint the cluster's certificates (CA, coordinator, agents) for mutual TLS.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Run a local demo cluster: origin, N x (varnishd + edge-agent), coordinator.
    Demo {
        #[arg(long, default_value_t = 3)]
        regions: usize,
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        #[arg(long)]
        state_dir: PathBuf,
        /// Use an existing origin instead of the sample one.
        #[arg(long)]
        origin: Option<String>,
        /// Region 0 is the shield beside the origin; the others fetch from it.
        #[arg(long)]
        tiered: bool,
        /// How agents purge: ban or xkey.
        #[arg(long, default_value = "ban", value_parser = ["ban", "xkey"])]
        purge_mode: String,
        /// Plaintext gRPC between coordinator and agents instead of mutual TLS.
        #[arg(long)]
        insecure: bool,
    },
    /// Push, inspect and roll back config bundles (VCL + WAF) through the API.
    Config {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Per-region health, hit ratios, traffic and purge lag. Exits 0 when every region
    /// is up, 1 when one is degraded, 2 when one is down, 3 when the API cannot be read
    /// (the Nagios convention).
    Status {
        #[command(flatten)]
        api: ApiArgs,
        /// Print the regions as JSON (what /api/v1/regions answers) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Warm every region's cache: start, follow and cancel warm jobs.
    Warm {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: WarmCommand,
    },
    /// Purge through the API (the same log Magento's PURGE requests go to).
    Purge {
        #[command(flatten)]
        api: ApiArgs,
        /// Cache tags (X-Magento-Tags), e.g. cat_p_42.
        #[arg(long = "tag", conflicts_with_all = ["url", "all"])]
        tags: Vec<String>,
        /// One URL path.
        #[arg(long)]
        url: Option<String>,
        /// Only on this Host (with --url).
        #[arg(long, requires = "url")]
        host: Option<String>,
        /// Everything.
        #[arg(long)]
        all: bool,
        /// Keep stale copies for grace (xkey mode).
        #[arg(long)]
        soft: bool,
    },
}

/// Where the API is and how to authenticate.
#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// The coordinator's API, e.g. http://127.0.0.1:6093.
    #[arg(
        long,
        global = true,
        env = "COORDINATOR_API",
        default_value = "http://127.0.0.1:6093"
    )]
    api: String,
    /// Bearer token for write endpoints.
    #[arg(long, global = true, env = "COORDINATOR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the token (used when --token is not given).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Write DIR/ca.pem, ca.key (kept if present), coordinator.pem, coordinator.key.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// More names or IPs for the coordinator's certificate (localhost and 127.0.0.1
        /// are always in it).
        #[arg(long)]
        san: Vec<String>,
    },
    /// Write DIR/ID.pem and DIR/ID.key: an agent's certificate for edge ID in REGION.
    Issue {
        #[arg(long)]
        id: String,
        #[arg(long)]
        region: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = coordinator::pki::LEAF_DAYS)]
        days: u32,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Upload a bundle directory (main.vcl, *.vcl, waf.toml) and roll it out.
    Push {
        dir: PathBuf,
        /// Go to every region at once instead of the canary region first.
        #[arg(long)]
        no_canary: bool,
        /// Follow the rollout until it is done (non-zero exit if it fails).
        #[arg(long)]
        wait: bool,
        /// Supersede a rollout still in progress (without it such a push is refused).
        #[arg(long)]
        force: bool,
    },
    /// List stored versions.
    List,
    /// Print a version's files (or one of them).
    Show {
        version: String,
        file: Option<String>,
    },
    /// Unified diff between two versions.
    Diff { a: String, b: String },
    /// Roll back to VERSION, or to the version before the current one.
    Rollback {
        version: Option<String>,
        #[arg(long)]
        wait: bool,
    },
    /// Desired version, rollout state and every edge's active version.
    Status,
}

#[derive(Debug, Subcommand)]
enum WarmCommand {
    /// Queue a warm job and print its id.
    Start {
        /// A sitemap or sitemap index (http://; .gz children allowed).
        #[arg(long)]
        sitemap: Option<String>,
        /// A file with one absolute URL per line.
        #[arg(long)]
        urls_file: Option<PathBuf>,
        /// The N most requested URLs of each target region.
        #[arg(long)]
        top: Option<usize>,
        /// Comma-separated regions, or `all`.
        #[arg(long, default_value = "all")]
        regions: String,
        /// Origin budget for this job, requests per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Concurrent fetches per edge.
        #[arg(long)]
        concurrency: Option<u32>,
        /// 'Header: value' (several joined by ';;'); each URL is also fetched once per variation.
        #[arg(long)]
        variation: Vec<String>,
        /// Host header for every request.
        #[arg(long)]
        host: Option<String>,
        /// Warm every region from the origin, even with a shield configured.
        #[arg(long)]
        flat: bool,
        /// Force a miss on every URL (refresh pages in place).
        #[arg(long)]
        refresh: bool,
        /// Learn the pages' tags so a purge of them re-warms them.
        #[arg(long)]
        rewarm: bool,
        /// Show a progress bar until the job ends (non-zero exit unless it is done).
        #[arg(long)]
        wait: bool,
    },
    /// One job in detail, or the recent jobs.
    Status { id: Option<u64> },
    /// Cancel a queued or running job.
    Cancel { id: u64 },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("coordinator: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve {
                config,
                state_dir,
                insecure,
            } => {
                let config = match CoordinatorConfig::load(&config) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("coordinator: {e}");
                        return ExitCode::from(2);
                    }
                };
                telemetry::init(cli.log_format == "json");
                let shutdown = stop_on_signal();
                let result = async {
                    let listeners = server::Listeners::bind(&config).await?;
                    let handles = server::open(&config, &state_dir)?;
                    server::run(config, handles, listeners, insecure, shutdown).await?;
                    Ok::<(), anyhow::Error>(())
                };
                exit(result.await)
            }
            Command::Demo {
                regions,
                base_port,
                state_dir,
                origin,
                tiered,
                purge_mode,
                insecure,
            } => {
                telemetry::init(cli.log_format == "json");
                let shutdown = stop_on_signal();
                let args = demo::DemoArgs {
                    regions,
                    base_port,
                    state_dir,
                    origin,
                    tiered,
                    purge_mode,
                    insecure,
                };
                exit(demo::run(args, shutdown).await.map_err(anyhow::Error::from))
            }
            Command::Pki { command } => {
                let result = match command {
                    PkiCommand::Init { dir, san } => coordinator::pki::init(&dir, &san).map(|()| {
                        println!("wrote {0}/ca.pem, {0}/ca.key, {0}/coordinator.pem, {0}/coordinator.key", dir.display());
                    }),
                    PkiCommand::Issue { id, region, dir, days } => {
                        coordinator::pki::issue(&dir, &id, &region, days).map(|()| {
                            println!("wrote {0}/{id}.pem and {0}/{id}.key (edge {id} in {region})", dir.display());
                        })
                    }
                };
                exit(result.map_err(anyhow::Error::from))
            }
            Command::Config { api, command } => {
                let client = match client(&api) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                let result = match command {
                    ConfigCommand::Push {
                        dir,
                        no_canary,
                        wait,
                        force,
                    } => cli::config_push(&client, &dir, !no_canary, wait, force).await,
                    ConfigCommand::List => cli::config_list(&client).await,
                    ConfigCommand::Show { version, file } => {
                        cli::config_show(&client, &version, file.as_deref()).await
                    }
                    ConfigCommand::Diff { a, b } => cli::config_diff(&client, &a, &b).await,
                    ConfigCommand::Rollback { version, wait } => {
                        cli::config_rollback(&client, version, wait).await
                    }
                    ConfigCommand::Status => cli::config_status(&client).await,
                };
                exit(result.map_err(anyhow::Error::from))
            }
            Command::Warm { api, command } => {
                let client = match client(&api) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
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
                        let urls = match urls_file.map(std::fs::read_to_string).transpose() {
                            Ok(text) => text
                                .unwrap_or_default()
                                .lines()
                                .map(str::trim)
                                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                                .map(str::to_owned)
                                .collect(),
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
                            rewarm: rewarm.then_some(true),
                        };
                        cli::warm_start(&client, &spec, wait).await
                    }
                    WarmCommand::Status { id } => cli::warm_status(&client, id).await,
                    WarmCommand::Cancel { id } => cli::warm_cancel(&client, id).await,
                };
                exit(result.map_err(anyhow::Error::from))
            }
            Command::Status { api, json } => {
                let client = match client(&api) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                match cli::status(&client, json).await {
                    Ok(code) => ExitCode::from(code),
                    Err(e) => {
                        eprintln!("coordinator: {e:#}");
                        ExitCode::from(3)
                    }
                }
            }
            Command::Purge {
                api,
                tags,
                url,
                host,
                all,
                soft,
            } => {
                let client = match client(&api) {
                    Ok(c) => c,
                    Err(code) => return code,
                };
                let body = if all {
                    serde_json::json!({ "all": true, "soft": soft })
                } else if let Some(url) = url {
                    serde_json::json!({ "url": url, "host": host, "soft": soft })
                } else if !tags.is_empty() {
                    serde_json::json!({ "tags": tags, "soft": soft })
                } else {
                    eprintln!("coordinator: give --tag, --url or --all");
                    return ExitCode::from(2);
                };
                exit(cli::purge(&client, body).await.map_err(anyhow::Error::from))
            }
        }
    })
}

fn client(api: &ApiArgs) -> Result<ApiClient, ExitCode> {
    ApiClient::new(&api.api, api.token.clone(), api.token_file.as_deref()).map_err(|e| {
        eprintln!("coordinator: {e}");
        ExitCode::from(2)
    })
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A token cancelled on SIGINT or SIGTERM.
fn stop_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received; stopping");
        t.cancel();
    });
    token
}
