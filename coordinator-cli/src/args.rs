//! The command line: clap types only. Each subcommand is run by a function in
//! [`crate::run`]; nothing here does work.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Coordinator for geo-distributed Varnish clusters in front of Magento 2.
#[derive(Debug, Parser)]
#[command(
    name = "coordinator",
    version = env!("BUILD_VERSION"),
    about = "Coordinator for geo-distributed Varnish clusters in front of Magento 2: purges, config rollout, monitoring, warming"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator.
    Serve {
        /// coordinator.toml (every key is explained in the README, section "coordinator.toml").
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
        /// How many regions (each one varnishd + one edge-agent), 1 to 8.
        #[arg(long, default_value_t = 3)]
        regions: usize,
        /// First port: origin P, purge P+1, gRPC P+2, API P+3, region i varnish P+10+10i.
        #[arg(long, default_value_t = 7000)]
        base_port: u16,
        /// Where every generated file goes (configs, certificates, logs, cluster.json).
        #[arg(long)]
        state_dir: PathBuf,
        /// Use an existing origin instead of the sample one.
        #[arg(long)]
        origin: Option<String>,
        /// Region 0 is the shield beside the origin; the others fetch from it.
        #[arg(long)]
        tiered: bool,
        /// How agents purge: ban or xkey (default: ban, or xkey with --refresh-tags).
        #[arg(long, value_parser = ["ban", "xkey"])]
        purge_mode: Option<String>,
        /// Refresh instead of evict: a tag purge leaves the pages stale, served at once,
        /// while the coordinator re-renders them most requested first (xkey mode).
        #[arg(long)]
        refresh_tags: bool,
        /// Plaintext gRPC between coordinator and agents instead of mutual TLS.
        #[arg(long)]
        insecure: bool,
        /// Geo routing with this MaxMind database (City or Country), and the PowerDNS
        /// remote backend on P+4 (tests/data/geoip/GeoIP2-City-Test.mmdb is a small one).
        #[arg(long, value_name = "MMDB")]
        geoip: Option<PathBuf>,
    },
    /// Push, inspect and roll back config bundles (VCL + WAF) through the API.
    Config {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Per-region health, hit ratios, traffic and purge lag. Exits 0 when every region
    /// is up, 1 when one is degraded, 2 when one is down, 3 when one cannot be seen
    /// (unknown, none worse) or the API cannot be read (the Nagios convention). A
    /// drained region is shown as drained and does not count.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        /// Print the regions as JSON (what /api/v1/regions answers) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Who asked the API for what: the newest audit entries first (needs a token).
    Audit {
        #[command(flatten)]
        api: ApiArgs,
        /// How many entries, at most 1000.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only entries since this long ago (90s, 15m, 2h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Print the answer as JSON (what /api/v1/audit answers).
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
    /// Which region serves a client IP (geo routing): the region, the reason, the
    /// distance and every candidate with why it was not chosen.
    Route {
        #[command(flatten)]
        api: ApiArgs,
        /// The client's IPv4 or IPv6 address.
        ip: String,
        /// Print the answer as JSON (what /api/v1/route answers).
        #[arg(long)]
        json: bool,
    },
    /// Write a consistent copy of the running coordinator's embedded state (purge log,
    /// bundles and rollout plan, warm jobs) to FILE, through its API (needs the token).
    Backup {
        #[command(flatten)]
        api: ApiArgs,
        /// Where the backup goes (written 0600: it holds bundles and the warm token).
        file: PathBuf,
    },
    /// Make a state dir from a backup FILE, for `serve --state-dir DIR` (run it with
    /// no coordinator on DIR).
    Restore {
        /// A file `coordinator backup` wrote.
        file: PathBuf,
        /// The state dir to make (must be empty unless --force).
        #[arg(long)]
        state_dir: PathBuf,
        /// Replace the state in a non-empty DIR.
        #[arg(long)]
        force: bool,
    },
    /// Take a region out of routing and DNS for maintenance (its alerts held), or
    /// bring it back.
    Region {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: RegionCommand,
    },
    /// Alert silences: changes they match are listed but page nobody until they expire.
    Silence {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: SilenceCommand,
    },
    /// Purge through the API (the same log Magento's PURGE requests go to).
    Purge {
        #[command(flatten)]
        api: ApiArgs,
        /// Cache tags (X-Magento-Tags), e.g. cat_p_42.
        #[arg(long = "tag", conflicts_with_all = ["url", "all"])]
        tags: Vec<String>,
        /// One URL path, exactly as varnish sees it (starting with /; percent-encode spaces).
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
        /// Wait until every connected edge applied it, printing each edge's time (exit 1
        /// if some edge has not within --timeout-s).
        #[arg(long)]
        wait: bool,
        /// Longest wait with --wait, in seconds.
        #[arg(long, default_value_t = 30, requires = "wait")]
        timeout_s: u64,
    },
}

/// Where the API is and how to authenticate.
#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// The coordinator's API, e.g. http://127.0.0.1:6093.
    #[arg(
        long,
        global = true,
        env = "COORDINATOR_API",
        default_value = "http://127.0.0.1:6093"
    )]
    pub api: String,
    /// Bearer token for the write endpoints (config push/rollback, purge, warm start/cancel,
    /// config show), the audit log, and every read when the API has `read_requires_token`.
    #[arg(long, global = true, env = "COORDINATOR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the token (used when --token is not given).
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Write DIR/ca.pem, ca.key (kept if present), coordinator.pem, coordinator.key.
    Init {
        /// Directory for the files (created; keys are written 0600).
        #[arg(long)]
        dir: PathBuf,
        /// More names or IPs for the coordinator's certificate (localhost and 127.0.0.1
        /// are always in it).
        #[arg(long)]
        san: Vec<String>,
        /// Days the coordinator's certificate is valid.
        #[arg(long, default_value_t = coordinator::pki::LEAF_DAYS)]
        days: u32,
        /// Days a new CA is valid (an existing CA is kept as it is).
        #[arg(long, default_value_t = coordinator::pki::CA_DAYS)]
        ca_days: u32,
    },
    /// Write DIR/ID.pem and DIR/ID.key: an agent's certificate for edge ID in REGION.
    Issue {
        /// The edge's id (its `id` in edge-agent.toml).
        #[arg(long)]
        id: String,
        /// The edge's region (its `region` in edge-agent.toml).
        #[arg(long)]
        region: String,
        /// The directory `pki init` wrote (holds ca.pem and ca.key).
        #[arg(long)]
        dir: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = coordinator::pki::LEAF_DAYS)]
        days: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Upload a bundle directory (main.vcl, *.vcl, waf.toml) and roll it out.
    Push {
        /// The bundle directory, e.g. edge-agent/vcl.
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
        /// A version, as `config list` prints it.
        version: String,
        /// One file of it (e.g. main.vcl); default: all of them.
        file: Option<String>,
    },
    /// Unified diff between two versions.
    Diff {
        /// The older version.
        a: String,
        /// The newer version.
        b: String,
    },
    /// Roll back to VERSION, or to the version before the current one.
    Rollback {
        /// The version to go back to; default: the one before the current one.
        version: Option<String>,
        /// Follow the rollout until it is done (non-zero exit if it fails).
        #[arg(long)]
        wait: bool,
    },
    /// Desired version, rollout state and every edge's active version.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum RegionCommand {
    /// Drain NAME: routing and DNS stop sending it shoppers and its alerts are held; it
    /// is still probed, and purges and config still reach it.
    Drain {
        /// The region (as `coordinator status` lists it).
        name: String,
        /// End the drain by itself after this long: 90s, 30m, 2h, 1d (default: until
        /// undrained).
        #[arg(long = "for", value_name = "DURATION", value_parser = crate::maintenance::duration_s)]
        for_s: Option<u64>,
        /// Why (shown in the API, the dashboard and the logs).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Undrain NAME: back in routing once healthy (after the recover_s hold-down).
    Undrain {
        /// The region.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SilenceCommand {
    /// Silence the alerts of a region, of a diagnosis, or of a diagnosis in a region.
    Add {
        /// The region whose changes it matches (default: any).
        #[arg(long)]
        region: Option<String>,
        /// The diagnosis it matches, e.g. origin_down, edge_down (default: any).
        #[arg(long)]
        diagnosis: Option<String>,
        /// How long: 90s, 30m, 2h, 1d (at most 7d).
        #[arg(long = "for", value_name = "DURATION", value_parser = crate::maintenance::duration_s)]
        for_s: u64,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// The silences in force.
    List,
    /// End a silence before it expires.
    Remove {
        /// The id `silence add` or `silence list` printed.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum WarmCommand {
    /// Queue a warm job and print its id.
    Start {
        /// A sitemap or sitemap index (http:// or https://; .gz children allowed).
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
        /// A variation: 'Header: value' (several headers joined by ';;'). Repeat the flag for
        /// more variations; each URL is fetched plain and once more per variation.
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
    Status {
        /// A job id; default: the recent jobs.
        id: Option<u64>,
    },
    /// Cancel a queued or running job.
    Cancel {
        /// The job id `warm start` printed.
        id: u64,
    },
}
