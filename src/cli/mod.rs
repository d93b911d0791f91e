//! Command-line definitions (clap derive) and the glue from arguments to the library.
//! One file per command. Nothing here does work the library could do.

pub mod push;

use clap::{Parser, Subcommand};

/// Exit codes (documented in the README).
pub mod exit {
    /// Every path succeeded.
    pub const OK: u8 = 0;
    /// Some paths failed; each was reported.
    pub const SOME_FAILED: u8 = 1;
    /// Usage or configuration error; nothing was done.
    pub const USAGE: u8 = 2;
}

/// An error that stops a command, with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub error: anyhow::Error,
}

impl CliError {
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        CliError {
            code: exit::USAGE,
            error: error.into(),
        }
    }
    pub fn failed(error: impl Into<anyhow::Error>) -> Self {
        CliError {
            code: exit::SOME_FAILED,
            error: error.into(),
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "narflow",
    version,
    about = "Upload Nix store paths to binary caches, fast and with bounded memory"
)]
pub struct Cli {
    /// More log output (-v: each path; -vv: debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload store paths (and their closure) to a binary cache.
    Push(push::PushArgs),
}

/// Runs the parsed command; returns the exit code.
pub fn run(cli: Cli) -> Result<u8, CliError> {
    match cli.command {
        Command::Push(args) => push::run(args),
    }
}
