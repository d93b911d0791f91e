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
use super::config::{self, HookFileSettings};
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

/// The hook's settings, merged once: defaults < config file < environment < flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSettings {
    /// The daemon's socket (`socket`, `$NARFLOW_SOCKET`, `--socket`).
    pub socket: PathBuf,
    /// The daemon's state directory, where the spool is (`state-dir`,
    /// `$NARFLOW_STATE_DIR`, `--state-dir`).
    pub state_dir: PathBuf,
    /// How long to wait for the daemon (`[hook] timeout`, `$NARFLOW_HOOK_TIMEOUT`,
    /// `--timeout`, in seconds).
    pub timeout: Duration,
    /// `-v`: say what happened even when all went well.
    pub verbose: bool,
}

impl HookSettings {
    /// The settings from `given` (flags or environment, whichever won) over the config
    /// file's `file` over the defaults.
    pub fn merge(
        socket: Option<PathBuf>,
        state_dir: Option<PathBuf>,
        timeout: Option<Duration>,
        file: HookFileSettings,
    ) -> HookSettings {
        HookSettings {
            socket: socket
                .or(file.socket)
                .unwrap_or_else(|| DEFAULT_SOCKET.into()),
            state_dir: state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            timeout: timeout.or(file.timeout).unwrap_or(DEFAULT_TIMEOUT),
            verbose: false,
        }
    }
}

/// Settings from a command line of `--config FILE`, `--socket PATH`, `--state-dir DIR`,
/// `--timeout SECONDS` and `-v`, the environment (`NARFLOW_CONFIG`, `NARFLOW_SOCKET`,
/// `NARFLOW_STATE_DIR`, `NARFLOW_HOOK_TIMEOUT`) and the config file (see
/// [`config::load`]); flags win, then the environment, then the file. For the
/// `narflow-hook` binary, which has no argument parser to keep its start-up minimal.
/// The second value is the warnings about the config file: a file the hook cannot use
/// is left out, never an error.
///
/// # Errors
/// A message naming the bad argument or variable.
pub fn settings_from(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Result<(HookSettings, Vec<String>), String> {
    settings_with_env(args, |k| std::env::var_os(k))
}

/// [`settings_from`] with the environment read through `env`.
///
/// # Errors
/// As [`settings_from`].
pub fn settings_with_env(
    args: impl IntoIterator<Item = std::ffi::OsString>,
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(HookSettings, Vec<String>), String> {
    let env = |k: &str| env(k).filter(|v| !v.is_empty());
    let secs = |name: &str, s: &std::ffi::OsStr| {
        s.to_str()
            .and_then(|s| s.parse::<f64>().ok())
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or_else(|| format!("{name}: not a number of seconds: {}", s.to_string_lossy()))
    };
    let (mut config, mut socket, mut state, mut timeout) = (None, None, None, None);
    let mut verbose = false;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        // `--flag=value` is `--flag value`, as for `narflow hook`.
        let (a, mut attached) = match a.to_str().and_then(|s| s.split_once('=')) {
            Some((flag, v)) if flag.starts_with("--") => (
                std::ffi::OsString::from(flag),
                Some(std::ffi::OsString::from(v)),
            ),
            _ => (a, None),
        };
        let mut value = |name: &str| {
            attached
                .take()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.to_str() {
            Some("--config") => config = Some(PathBuf::from(value("--config")?)),
            Some("--socket") => socket = Some(value("--socket")?.into()),
            Some("--state-dir") => state = Some(value("--state-dir")?.into()),
            Some("--timeout") => timeout = Some(secs("--timeout", &value("--timeout")?)?),
            Some("-v" | "--verbose") => verbose = true,
            _ => return Err(format!("unknown argument {}", a.to_string_lossy())),
        }
        if attached.is_some() {
            return Err(format!("{} takes no value", a.to_string_lossy()));
        }
    }
    let socket = socket.or_else(|| env("NARFLOW_SOCKET").map(PathBuf::from));
    let state = state.or_else(|| env("NARFLOW_STATE_DIR").map(PathBuf::from));
    let timeout = match (timeout, env("NARFLOW_HOOK_TIMEOUT")) {
        (Some(t), _) => Some(t),
        (None, Some(t)) => Some(secs("NARFLOW_HOOK_TIMEOUT", &t)?),
        (None, None) => None,
    };
    let config = config.or_else(|| env(config::CONFIG_ENV).map(PathBuf::from));
    let (file, warnings) = config::load(config.as_deref());
    let mut settings = HookSettings::merge(socket, state, timeout, file);
    settings.verbose = verbose;
    Ok((settings, warnings))
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

    fn args(v: &[&str]) -> Vec<std::ffi::OsString> {
        v.iter().map(std::ffi::OsString::from).collect()
    }

    /// Each option takes its value as the next word or after `=`, alike.
    #[test]
    fn each_option_takes_its_value_after_an_equals_sign_too() {
        let no_env = |_: &str| None;
        let parse = |v: &[&str]| {
            let (s, _) = settings_with_env(args(v), no_env).unwrap();
            (s.socket, s.state_dir, s.timeout, s.verbose)
        };
        let separate = parse(&["--socket", "/s", "--state-dir", "/d", "--timeout", "0.5"]);
        let joined = parse(&["--socket=/s", "--state-dir=/d", "--timeout=0.5"]);
        assert_eq!(separate, joined);
        assert_eq!(separate.0, std::path::PathBuf::from("/s"));
        let e = settings_with_env(args(&["--verbose=yes"]), no_env).unwrap_err();
        assert!(e.contains("--verbose takes no value"), "{e}");
    }

    #[test]
    fn settings_flags_and_errors() {
        let no_env = |_: &str| None;
        let (s, _) = settings_with_env(
            args(&[
                "--socket",
                "/s",
                "--state-dir",
                "/d",
                "--timeout",
                "0.5",
                "-v",
                "--config",
                "/proc/none/narflow.toml",
            ]),
            no_env,
        )
        .unwrap();
        assert_eq!((s.socket, s.state_dir), ("/s".into(), "/d".into()));
        assert_eq!((s.timeout, s.verbose), (Duration::from_millis(500), true));
        let err = |v: &[&str]| settings_with_env(args(v), no_env).unwrap_err();
        assert!(err(&["--socket"]).contains("needs a value"));
        assert!(err(&["--timeout", "soon"]).contains("soon"));
        assert!(err(&["--frobnicate"]).contains("--frobnicate"));
        let bad_env = |k: &str| (k == "NARFLOW_HOOK_TIMEOUT").then(|| "later".into());
        let e = settings_with_env(args(&[]), bad_env).unwrap_err();
        assert!(
            e.contains("NARFLOW_HOOK_TIMEOUT") && e.contains("later"),
            "{e}"
        );
    }

    #[test]
    fn the_config_file_is_under_the_environment_and_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("narflow.toml");
        std::fs::write(
            &file,
            "socket = \"/f/sock\"\nstate-dir = \"/f/state\"\n[hook]\ntimeout = 0.5\n",
        )
        .unwrap();
        let config = file.to_str().unwrap().to_owned();
        let env = |k: &str| match k {
            "NARFLOW_CONFIG" => Some(config.clone().into()),
            "NARFLOW_STATE_DIR" => Some("/e/state".into()),
            "NARFLOW_HOOK_TIMEOUT" => Some("0.7".into()),
            _ => None,
        };
        let (s, w) = settings_with_env(args(&["--timeout", "0.9"]), env).unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.socket, PathBuf::from("/f/sock"), "file over default");
        assert_eq!(s.state_dir, PathBuf::from("/e/state"), "env over file");
        assert_eq!(s.timeout, Duration::from_millis(900), "flag over env");
        let (s, _) = settings_with_env(args(&[]), env).unwrap();
        assert_eq!(s.timeout, Duration::from_millis(700), "env over file");
        // --config wins over $NARFLOW_CONFIG.
        let other = dir.path().join("other.toml");
        std::fs::write(&other, "socket = \"/o/sock\"\n").unwrap();
        let (s, _) = settings_with_env(args(&["--config", other.to_str().unwrap()]), env).unwrap();
        assert_eq!(s.socket, PathBuf::from("/o/sock"));
        assert_eq!(s.timeout, Duration::from_millis(700));
    }

    #[test]
    fn a_config_file_the_hook_cannot_use_leaves_defaults_and_still_hands_off() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("narflow.toml");
        std::fs::write(&file, "socket = [\n").unwrap();
        let state = dir.path().join("state");
        let env = |k: &str| match k {
            "NARFLOW_CONFIG" => Some(file.clone().into()),
            "NARFLOW_STATE_DIR" => Some(state.clone().into()),
            _ => None,
        };
        let (s, w) = settings_with_env(args(&["--timeout", "0.1"]), env).unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("narflow.toml:") && w[0].contains("ignored"),
            "{w:?}"
        );
        assert_eq!(s.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(s.state_dir, state);
        let sock = dir.path().join("none.sock");
        let h = hand_off(&sock, &s.state_dir, "/nix/store/a-x", None, s.timeout);
        assert!(matches!(h, Handoff::Spooled { paths: 1, .. }), "{h:?}");
    }
}
