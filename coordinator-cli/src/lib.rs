//! The `coordinator` program around the server library: the command line ([`args`]),
//! one function per subcommand ([`run`]), the ops commands that talk to a running
//! coordinator's JSON API ([`cli`]) and the local demo cluster ([`demo`]).
//!
//! The server library (`coordinator`) spawns no programs; everything here that starts
//! varnishd, edge agents or the sample origin lives in [`demo`], which the end-to-end
//! tests reuse.

pub mod args;
pub mod cli;
pub mod demo;
pub mod maintenance;
pub mod run;
