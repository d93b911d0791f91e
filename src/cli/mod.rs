//! Command-line definitions (clap derive) and the glue from arguments to the library.
//! One file per command. Nothing here does work the library could do.

pub mod bench;
pub mod daemon;
pub mod hook;
pub mod progress;
pub mod push;
pub mod status;

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
    /// Run the upload daemon: queue paths from `narflow hook` durably and upload them.
    Daemon(daemon::DaemonArgs),
    /// Post-build-hook: hand $OUT_PATHS to the daemon (or its spool); always exits 0.
    Hook(hook::HookArgs),
    /// Show the daemon's queue: pending, in flight, done, failing with the last error.
    Status(status::StatusArgs),
    /// Measure the pipeline on synthetic store paths; compare with a saved baseline.
    Bench(bench::BenchArgs),
}

/// Runs the parsed command; returns the exit code.
pub fn run(cli: Cli) -> Result<u8, CliError> {
    match cli.command {
        Command::Push(args) => push::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Daemon(args) => daemon::run(args),
        Command::Hook(args) => Ok(hook::run(args, cli.verbose > 0)),
        Command::Status(args) => status::run(args),
    }
}

/// Applies `--jobs`, `--memory` and `--chunk-size` (as given to push or bench) to `opts`.
///
/// # Errors
/// A message when the budget cannot hold one chunk.
pub fn apply_pipeline_args(
    opts: &mut narflow::pipeline::PushOptions,
    jobs: Option<usize>,
    memory: Option<u64>,
    chunk_size: Option<u64>,
) -> Result<(), String> {
    if let Some(j) = jobs {
        opts.jobs = j.max(1);
    }
    if let Some(m) = memory {
        opts.memory = m;
    }
    if let Some(c) = chunk_size {
        // One chunk is one compressed frame: below 64 KiB frames cost ratio, above
        // 256 MiB one chunk would be most of any sensible budget.
        opts.chunk_size = usize::try_from(c)
            .unwrap_or(usize::MAX)
            .clamp(64 << 10, 256 << 20);
    }
    if opts.memory < opts.chunk_size as u64 {
        return Err(format!(
            "--memory {} is less than one chunk ({} bytes)",
            opts.memory, opts.chunk_size
        ));
    }
    Ok(())
}

/// Parses a size: bytes, or a number with K, M, G (powers of 1024; `MiB`, `MB` also read
/// as powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 64M, 1G)"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("64M"), Ok(64 << 20));
        assert_eq!(super::parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert!(
            super::parse_size("12X")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(super::parse_size("M").is_err());
    }
}
