//! `narflow hook`: the post-build-hook. Hands `$OUT_PATHS` to the daemon (or its spool)
//! and always exits 0, because a failing hook stops Nix's build loop.
use narflow::hook::{self, DEFAULT_SOCKET, DEFAULT_STATE_DIR};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct HookArgs {
    /// The daemon's socket.
    #[arg(long, env = "NARFLOW_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The daemon's state directory (where the spool is, for when the daemon is down).
    #[arg(long, env = "NARFLOW_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Seconds to wait for the daemon before spooling.
    #[arg(long, env = "NARFLOW_HOOK_TIMEOUT", default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout: f64,
}

const DEFAULT_TIMEOUT_SECS: f64 = hook::DEFAULT_TIMEOUT.as_secs() as f64;

/// Runs the hook; the exit code is always 0.
pub fn run(args: HookArgs, verbose: bool) -> u8 {
    let timeout = Duration::try_from_secs_f64(args.timeout).unwrap_or(hook::DEFAULT_TIMEOUT);
    hook::run(&args.socket, &args.state_dir, timeout, verbose);
    super::exit::OK
}
