//! `narflow-hook`: the post-build-hook as its own small program, for nix.conf's
//! `post-build-hook = /path/to/narflow-hook` (Nix runs the hook without arguments).
//!
//! The same hand-off as `narflow hook`, without the main binary's start-up (its size and
//! argument parser): it links only the std-only hand-off code. Settings come from the
//! config file (`socket`, `state-dir`, `[hook] timeout`), then `NARFLOW_SOCKET`,
//! `NARFLOW_STATE_DIR` and `NARFLOW_HOOK_TIMEOUT`, then `--socket`, `--state-dir` and
//! `--timeout`; the file is `--config FILE`, `NARFLOW_CONFIG` or
//! `/etc/narflow/narflow.toml`. It exits 0 whatever happens: a failing hook stops Nix's
//! build loop, so a config file it cannot use is reported and left out.
use narflow::handoff::hook;

fn main() {
    match hook::settings_from(std::env::args_os().skip(1)) {
        Ok((s, warnings)) => {
            for w in warnings {
                eprintln!("narflow hook: {w}");
            }
            hook::run(&s.socket, &s.state_dir, s.timeout, s.verbose)
        }
        Err(why) => eprintln!("narflow hook: {why}; bad command line, nothing queued"),
    }
}
