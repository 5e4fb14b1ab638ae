//! `coordinator`: thin entry point. Parses arguments, loads and validates the config,
//! initialises tracing and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
        /// Plaintext gRPC between coordinator and agents.
        #[arg(long)]
        insecure: bool,
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
    },
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
                };
                exit(demo::run(args, shutdown).await.map_err(anyhow::Error::from))
            }
        }
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
