//! The `narflow` command: parse the command line, set up logging, run, map the outcome to
//! an exit code (0 all ok, 1 some paths failed, 2 usage or configuration error).
use clap::Parser;
use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let default = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("NARFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    match cli::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("narflow: {:#}", e.error);
            ExitCode::from(e.code)
        }
    }
}
