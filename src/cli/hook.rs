//! `narflow hook`: the post-build-hook. Hands `$OUT_PATHS` to the daemon (or its spool)
//! and always exits 0, because a failing hook stops Nix's build loop.
//!
//! Its settings merge like `narflow-hook`'s: defaults < config file < environment <
//! flags, with the file read by the hand-off's own reader ([`narflow::handoff::config`]),
//! so both hooks read the same three keys the same way.
use narflow::handoff::config;
use narflow::handoff::hook::{self, HookSettings};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct HookArgs {
    /// The daemon's socket [default: /run/narflow/daemon.sock].
    #[arg(long, env = "NARFLOW_SOCKET")]
    pub socket: Option<PathBuf>,
    /// The daemon's state directory (where the spool is, for when the daemon is down)
    /// [default: /var/lib/narflow].
    #[arg(long, env = "NARFLOW_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Seconds to wait for the daemon before spooling [default: 2].
    #[arg(long, env = "NARFLOW_HOOK_TIMEOUT")]
    pub timeout: Option<f64>,
}

/// Runs the hook with the config file `config` (`--config` or `$NARFLOW_CONFIG`), or the
/// default one when `None`; the exit code is always 0.
pub fn run_with_config(args: HookArgs, verbose: bool, config: Option<&Path>) -> u8 {
    let (file, warnings) = config::load(config);
    for w in warnings {
        eprintln!("narflow hook: {w}");
    }
    let timeout = args.timeout.map(|t| match Duration::try_from_secs_f64(t) {
        Ok(t) => t,
        Err(_) => {
            eprintln!(
                "narflow hook: --timeout {t}: not a number of seconds; using {:?}",
                hook::DEFAULT_TIMEOUT
            );
            hook::DEFAULT_TIMEOUT
        }
    });
    let s = HookSettings::merge(args.socket, args.state_dir, timeout, file);
    hook::run(&s.socket, &s.state_dir, s.timeout, verbose);
    super::exit::OK
}
