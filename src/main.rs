//! The `narflow` command: parse the command line, set up logging, run, map the outcome to
//! an exit code (0 all ok, 1 some paths failed, 2 usage or configuration error).
//!
//! `narflow hook` exits 0 whatever happens, even on a bad command line, because a failing
//! hook stops Nix's build loop. (The `narflow-hook` binary is the same hook, smaller.)
use clap::{CommandFactory, FromArgMatches};
use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let hook = args.get(1).is_some_and(|a| a == "hook");
    // The matches are kept: they say whether each setting came from a flag or from the
    // environment (`narflow config` shows it).
    let parsed = cli::Cli::command()
        .try_get_matches_from(&args)
        .and_then(|m| cli::Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) if hook && e.use_stderr() => {
            eprintln!("narflow hook: {e}");
            eprintln!("narflow hook: bad command line; nothing queued");
            return ExitCode::SUCCESS;
        }
        Err(e) => e.exit(),
    };
    // The hook logs nothing through tracing: it starts fast and writes its few lines itself.
    if !matches!(cli.command, cli::Command::Hook(_)) {
        init_logging(&cli);
    }
    match cli::run(cli, &matches) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("narflow: {:#}", e.error);
            ExitCode::from(e.code)
        }
    }
}

fn init_logging(cli: &cli::Cli) {
    // The daemon's log is its record of what it uploaded: info by default.
    let quiet = if matches!(cli.command, cli::Command::Daemon(_)) {
        "info"
    } else {
        "warn"
    };
    // Other crates' logs (the S3 SDK's warnings: a credential source that failed, a
    // region it could not find) only with -v: narflow says what went wrong in its own
    // line, and those dumps would bury it.
    let default = match cli.verbose {
        0 => format!("error,narflow={quiet}"),
        1 => "warn,narflow=info".to_owned(),
        _ => "debug".to_owned(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NARFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}
