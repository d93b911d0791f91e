//! `narflow hook`: the post-build-hook client. It hands `$OUT_PATHS` to the daemon and
//! returns; when the daemon cannot take them it spools them durably for the daemon to
//! drain later.
//!
//! No runtime (std and plain system calls only), no store or cache access, no work
//! beyond the hand-off. Connecting, sending and waiting for the daemon take at most
//! `--timeout` together, and the spool's lock is waited for at most
//! [`spool::LOCK_WAIT`], so a stuck daemon never holds up a build. It never fails the
//! build: every outcome, including losing the paths, is a value the caller reports on
//! stderr before exiting 0.
use super::protocol::{EnqueueReply, MAX_REQUEST, Request, exchange, rejection};
use super::spool;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The daemon's socket when none is given (systemd's `RuntimeDirectory=narflow`).
pub const DEFAULT_SOCKET: &str = "/run/narflow/daemon.sock";
/// The daemon's state directory when none is given (systemd's `StateDirectory=narflow`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/narflow";
/// How long the hook waits for the daemon before spooling. The build loop waits for the
/// hook; a healthy daemon answers in about a millisecond, so a daemon that has not
/// answered in 2 s is stuck, and the spool is the faster way out.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the hook did with its paths.
#[derive(Debug, PartialEq, Eq)]
pub enum Handoff {
    /// Neither `$OUT_PATHS` nor `$DRV_PATH` named anything: nothing to do.
    Nothing,
    /// The daemon queued `queued` paths durably; it refused `rejected` (token, why).
    Queued {
        queued: usize,
        rejected: Vec<(String, String)>,
    },
    /// The daemon was not reachable (`why`); the request is in the spool file `file`.
    Spooled {
        paths: usize,
        why: String,
        file: PathBuf,
    },
    /// Neither the daemon nor the spool could take the paths.
    Lost { paths: usize, why: String },
}

impl Handoff {
    /// What the hook tells the build log (stderr), one line each. Quiet on success unless
    /// `verbose`.
    pub fn messages(&self, verbose: bool) -> Vec<String> {
        match self {
            Handoff::Nothing if verbose => {
                vec!["narflow hook: $OUT_PATHS and $DRV_PATH are empty; nothing to upload".into()]
            }
            Handoff::Nothing => Vec::new(),
            Handoff::Queued { queued, rejected } => {
                let mut lines: Vec<String> = rejected
                    .iter()
                    .map(|(token, why)| {
                        format!("narflow hook: not queued: {}", rejection(token, why))
                    })
                    .collect();
                if verbose {
                    lines.push(format!("narflow hook: queued {queued} paths"));
                }
                lines
            }
            Handoff::Spooled { paths, why, file } => vec![format!(
                "narflow hook: {why}; spooled {paths} paths to {} for the daemon",
                file.display()
            )],
            Handoff::Lost { paths, why } => {
                vec![format!(
                    "narflow hook: {paths} paths NOT queued for upload: {why}"
                )]
            }
        }
    }
}

/// The whole hook: hands `$OUT_PATHS` and `$DRV_PATH` to the daemon (or the spool) and
/// writes what happened to stderr, which Nix puts in the build log. Never fails.
pub fn run(socket: &Path, state_dir: &Path, timeout: Duration, verbose: bool) {
    let out_paths = std::env::var("OUT_PATHS").unwrap_or_default();
    let drv = std::env::var("DRV_PATH").ok();
    let handoff = hand_off(socket, state_dir, &out_paths, drv.as_deref(), timeout);
    for line in handoff.messages(verbose) {
        eprintln!("{line}");
    }
}

/// Settings from the environment (`NARFLOW_SOCKET`, `NARFLOW_STATE_DIR`,
/// `NARFLOW_HOOK_TIMEOUT` in seconds) and a command line of `--socket PATH`,
/// `--state-dir DIR`, `--timeout SECONDS` and `-v`; flags win. For the `narflow-hook`
/// binary, which has no argument parser to keep its start-up minimal.
///
/// # Errors
/// A message naming the bad argument.
pub fn settings_from(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Result<(PathBuf, PathBuf, Duration, bool), String> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let mut socket =
        env("NARFLOW_SOCKET").map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from);
    let mut state =
        env("NARFLOW_STATE_DIR").map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from);
    let secs = |s: &std::ffi::OsStr| {
        s.to_str()
            .and_then(|s| s.parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| {
                format!(
                    "--timeout: not a number of seconds: {}",
                    s.to_string_lossy()
                )
            })
    };
    let mut timeout = match env("NARFLOW_HOOK_TIMEOUT") {
        Some(t) => secs(&t)?,
        None => DEFAULT_TIMEOUT,
    };
    let mut verbose = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.to_str() {
            Some("--socket") => socket = value("--socket")?.into(),
            Some("--state-dir") => state = value("--state-dir")?.into(),
            Some("--timeout") => timeout = secs(&value("--timeout")?)?,
            Some("-v" | "--verbose") => verbose = true,
            _ => return Err(format!("unknown argument {}", a.to_string_lossy())),
        }
    }
    Ok((socket, state, timeout, verbose))
}

/// Hands `out_paths` (space-separated, as in `$OUT_PATHS`) and `drv` (`$DRV_PATH`) to the
/// daemon at `socket`, or to the spool in `state_dir`.
pub fn hand_off(
    socket: &Path,
    state_dir: &Path,
    out_paths: &str,
    drv: Option<&str>,
    timeout: Duration,
) -> Handoff {
    let paths: Vec<String> = out_paths
        .split_ascii_whitespace()
        .map(str::to_owned)
        .collect();
    // Nix 2.8.0 sets only $DRV_PATH ($OUT_PATHS is empty): the daemon then looks up the
    // derivation's outputs.
    let drv = drv.filter(|d| !d.trim().is_empty());
    if paths.is_empty() && drv.is_none() {
        return Handoff::Nothing;
    }
    let n = paths.len().max(1);
    let request = Request::Enqueue {
        drv: drv.map(str::to_owned),
        paths,
    };
    let line = request.to_line();
    let why = if line.len() > MAX_REQUEST {
        format!("{n} paths is more than one request can carry")
    } else {
        let reply = exchange(socket, &line, timeout)
            .and_then(|r| EnqueueReply::parse(&r).map_err(std::io::Error::other));
        match reply {
            Ok(EnqueueReply::Ok { queued, rejected }) => {
                return Handoff::Queued { queued, rejected };
            }
            Ok(EnqueueReply::Err(why)) => {
                format!("the daemon at {} refused: {why}", socket.display())
            }
            Err(e) => format!("cannot reach the daemon at {}: {e}", socket.display()),
        }
    };
    match spool::append(state_dir, &line, spool::LOCK_WAIT) {
        Ok(file) => Handoff::Spooled {
            paths: n,
            why,
            file,
        },
        Err(e) => Handoff::Lost {
            paths: n,
            why: format!(
                "{why}; and cannot spool to {}: {e}",
                state_dir.join(spool::SPOOL).display()
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_daemon_means_the_request_line_is_spooled() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("none.sock");
        let t = Duration::from_millis(100);
        assert_eq!(
            hand_off(&sock, dir.path(), " \n", None, t),
            Handoff::Nothing
        );
        match hand_off(&sock, dir.path(), "/nix/store/a-x /nix/store/b-y", None, t) {
            Handoff::Spooled { paths: 2, why, .. } => assert!(why.contains("none.sock"), "{why}"),
            other => panic!("{other:?}"),
        }
        // Nix 2.8.0: no $OUT_PATHS, only $DRV_PATH.
        match hand_off(&sock, dir.path(), "", Some("/nix/store/c-z.drv"), t) {
            Handoff::Spooled { paths: 1, .. } => {}
            other => panic!("{other:?}"),
        }
        let spool = spool::take(dir.path()).unwrap().unwrap();
        assert_eq!(
            spool.lines,
            [
                "ENQUEUE - /nix/store/a-x /nix/store/b-y\n",
                "ENQUEUE /nix/store/c-z.drv\n"
            ]
        );
        let lost = hand_off(&sock, Path::new("/proc/none"), "/nix/store/a-x", None, t);
        assert!(matches!(lost, Handoff::Lost { paths: 1, .. }), "{lost:?}");
        assert!(lost.messages(false)[0].contains("NOT queued"));
    }

    #[test]
    fn settings_flags_and_errors() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let (sock, state, timeout, verbose) = settings_from(args(&[
            "--socket",
            "/s",
            "--state-dir",
            "/d",
            "--timeout",
            "0.5",
            "-v",
        ]))
        .unwrap();
        assert_eq!((sock, state), (PathBuf::from("/s"), PathBuf::from("/d")));
        assert_eq!((timeout, verbose), (Duration::from_millis(500), true));
        assert!(
            settings_from(args(&["--socket"]))
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            settings_from(args(&["--timeout", "soon"]))
                .unwrap_err()
                .contains("soon")
        );
        assert!(
            settings_from(args(&["--frobnicate"]))
                .unwrap_err()
                .contains("--frobnicate")
        );
    }
}
