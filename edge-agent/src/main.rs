//! `edge-agent --config edge-agent.toml [--insecure]`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use edge_agent::config::AgentConfig;
use tokio_util::sync::CancellationToken;

/// Runs beside a regional varnishd and applies what the coordinator sends.
#[derive(Debug, Parser)]
#[command(version = env!("BUILD_VERSION"), about)]
struct Args {
    /// Path to edge-agent.toml.
    #[arg(long)]
    config: PathBuf,
    /// Allow a plaintext http:// coordinator (no TLS).
    #[arg(long)]
    insecure: bool,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

// One thread is plenty: the agent waits on the network and on varnishd.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = match AgentConfig::load(&args.config).and_then(|c| c.check_files().map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge-agent: {e}");
            return ExitCode::from(2);
        }
    };
    daemon::logging::init(args.log_format == "json");
    config.warn_expiring_certs();
    let shutdown = CancellationToken::new();
    tokio::spawn(daemon::signal::stop_on_signal(shutdown.clone()));
    // A config the agent cannot use (a missing [tls], unreadable certificates) is a bad
    // config like an unknown key: 2. Anything else that stops it: 1.
    match edge_agent::run(config, args.insecure, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ edge_agent::session::AgentError::Config(_)) => {
            eprintln!("edge-agent: {}: {e}", args.config.display());
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("edge-agent: {e}");
            ExitCode::from(1)
        }
    }
}
