//! One [`Settings`] type for every command, layered once: defaults < the config file
//! (`/etc/narflow/narflow.toml`, `--config FILE` or `NARFLOW_CONFIG`) < `NARFLOW_*`
//! environment variables < flags. It turns the merged result into the library's own
//! option types ([`crate::pipeline::PushOptions`], [`crate::cache::S3Tuning`], the
//! daemon's paths) and remembers where each value came from, for `narflow config`. It
//! never opens a cache, reads the store or talks to the daemon; the only files it reads
//! are the config file and signing keys.
//!
//! `table` declares every setting once ([`KEYS`]); `values` reads their value types;
//! `file` reads the config file; `resolve` merges the layers and fills in the rest;
//! `reference` writes the manual's configuration reference from [`KEYS`].
//!
//! The file is TOML; its keys are the long flag names (`to`, `key-file`, `memory`, ...),
//! and keys of one part are in that part's table (`[daemon]`, `[s3]`, `[hook]`, `[gc]`). The
//! top-level `socket` and `state-dir` and `[hook] timeout` are also read by the std-only
//! hook, so those three names are fixed.
//!
//! Store-URL parameters (`compression=`, `compression-level=`, `secret-key=`,
//! `concurrency=`, `retries=`, `read-timeout=`) sit between the defaults and the file:
//! a setting given by flag, environment or file wins over the URL's.
use crate::cache::CacheError;
use crate::format::signing::SigningKey;
use std::fmt;
use std::path::{Path, PathBuf};

mod file;
mod reference;
mod resolve;
mod table;
mod values;

pub use file::{ConfigChoice, ConfigFile};
pub use reference::{REFERENCE_PAGE, REGENERATE, reference_markdown};
pub use resolve::{Entry, JOURNAL_FILE, Merged, Resolved};
pub use table::{
    DaemonSettings, Fallback, GcSettings, HookSettings, KEYS, Key, PipelineSettings, S3Settings,
    Settings, defaults,
};
pub use values::{JournalFile, Seconds, Size, Span, WatchStore, format_size, parse_size};

/// Why settings cannot be used. Each names the input (file and line, flag, variable, URL
/// or key file) and what is wrong with it. None is transient.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}:{line}: unknown key `{key}` (known here: {known})", path.display())]
    UnknownKey {
        path: PathBuf,
        line: usize,
        key: String,
        known: String,
    },
    #[error("{}:{line}: {key}: {message}", path.display())]
    BadValue {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
    /// A value that parsed but cannot be used (from any layer).
    #[error("{key} (from {from}): {message}")]
    Invalid {
        key: &'static str,
        from: Source,
        message: String,
    },
    #[error("no destination cache: pass --to URL (or set NARFLOW_TO, or `to` in the config file)")]
    NoDestination,
    #[error(
        "no signing key: pass --key-file FILE (or the URL's secret-key=FILE), or --unsigned to upload unsigned narinfos"
    )]
    NoKey,
    #[error("{0}")]
    KeyFile(String),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File {
        path: PathBuf,
        line: usize,
    },
    Env(String),
    Flag(String),
    /// A store-URL parameter (its name).
    Url(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File { path, line } => write!(f, "file:{}:{line}", path.display()),
            Source::Env(var) => write!(f, "env:{var}"),
            Source::Flag(flag) => write!(f, "flag:{flag}"),
            Source::Url(param) => write!(f, "url:{param}="),
        }
    }
}

/// Where clap found an argument's value, as a [`Source`] (`None`: not given, or clap's
/// own default).
pub fn clap_source(matches: &clap::ArgMatches, id: &str, cmd: &clap::Command) -> Option<Source> {
    use clap::parser::ValueSource;
    let arg = cmd.get_arguments().find(|a| a.get_id() == id)?;
    match matches
        .try_contains_id(id)
        .ok()?
        .then(|| matches.value_source(id))??
    {
        ValueSource::CommandLine => Some(Source::Flag(match arg.get_long() {
            Some(l) => format!("--{l}"),
            None => id.to_owned(),
        })),
        ValueSource::EnvVariable => Some(Source::Env(
            arg.get_env()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default(),
        )),
        _ => None,
    }
}

/// `scheme://user:pass@rest` as `scheme://***@rest`.
fn redact_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://***{}", &rest[at..]),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

/// Loads a Nix secret key file. Like ssh with a private key, it refuses a file that group
/// or others can access (any of the mode bits 0o077), unless `allow_insecure`: such a key
/// may already be known to others, and every narinfo signed with it would be suspect.
/// The key text is wiped from memory once parsed.
///
/// # Errors
/// [`SettingsError::KeyFile`] naming the file and what is wrong.
pub fn load_key(path: &Path, allow_insecure: bool) -> Result<SigningKey, SettingsError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let cannot_read = |e: std::io::Error| {
        SettingsError::KeyFile(format!("cannot read key file {}: {e}", path.display()))
    };
    let mut file = std::fs::File::open(path).map_err(cannot_read)?;
    // The mode of what was opened (a symlink's target), not of a path looked up again.
    let meta = file.metadata().map_err(cannot_read)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 && !allow_insecure {
        return Err(SettingsError::KeyFile(format!(
            "key file {path} has mode {mode:04o}: group or others can access this secret key; \
             make it private with `chmod 600 {path}` (or pass --allow-insecure-key-file to use \
             it anyway)",
            path = path.display()
        )));
    }
    // Sized up front so the text is not copied by a growing buffer (copies would not be
    // wiped); key files are about 100 bytes.
    let capacity = usize::try_from(meta.len()).unwrap_or(0).saturating_add(1);
    let mut text = zeroize::Zeroizing::new(String::with_capacity(capacity.min(1 << 16)));
    file.read_to_string(&mut text).map_err(cannot_read)?;
    SigningKey::parse(&text)
        .map_err(|e| SettingsError::KeyFile(format!("key file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests;
