//! `coordinator`: parses the command line and runs the subcommand ([`coordinator_cli::run`]).

use std::process::ExitCode;

use clap::Parser;
use coordinator_cli::args::Cli;

fn main() -> ExitCode {
    coordinator_cli::run::main(Cli::parse())
}
