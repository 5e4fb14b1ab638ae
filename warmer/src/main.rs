//! `warmer`: warm one varnish from a sitemap, standalone.
//!
//! `warmer --sitemap URL --via http://VARNISH --host shop.example --rate R --concurrency C
//! [--variation 'Cookie: store=de']...` — see [`warmer::cli`].

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    warmer::cli::run(warmer::cli::Args::parse()).await
}
