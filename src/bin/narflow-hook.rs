//! `narflow-hook`: the post-build-hook as its own small program, for nix.conf's
//! `post-build-hook = /path/to/narflow-hook` (Nix runs the hook without arguments).
//!
//! The same hand-off as `narflow hook`, without the main binary's start-up (its size and
//! argument parser): it links only the std-only hook code. Settings come from
//! `NARFLOW_SOCKET`, `NARFLOW_STATE_DIR` and `NARFLOW_HOOK_TIMEOUT`, or `--socket`,
//! `--state-dir` and `--timeout`. It exits 0 whatever happens: a failing hook stops Nix's
//! build loop.
use narflow::hook;

fn main() {
    match hook::settings_from(std::env::args_os().skip(1)) {
        Ok((socket, state_dir, timeout, verbose)) => {
            hook::run(&socket, &state_dir, timeout, verbose)
        }
        Err(why) => eprintln!("narflow hook: {why}; bad command line, nothing queued"),
    }
}
