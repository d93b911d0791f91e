//! One [`Settings`] type for every command, layered once: defaults < the config file
//! (`/etc/narflow/narflow.toml`, `--config FILE` or `NARFLOW_CONFIG`) < `NARFLOW_*`
//! environment variables < flags. It turns the merged result into the library's own
//! option types ([`PushOptions`], [`S3Tuning`], the daemon's paths) and remembers where
//! each value came from, for `narflow config`. It never opens a cache, reads the store or
//! talks to the daemon; the only files it reads are the config file and signing keys.
//!
//! The file is TOML; its keys are the long flag names (`to`, `key-file`, `memory`, ...),
//! and keys of one part are in that part's table (`[daemon]`, `[s3]`, `[hook]`). The
//! top-level `socket` and `state-dir` and `[hook] timeout` are also read by the std-only
//! hook, so those three names are fixed.
//!
//! Store-URL parameters (`compression=`, `compression-level=`, `secret-key=`,
//! `concurrency=`, `retries=`, `read-timeout=`) sit between the defaults and the file:
//! a setting given by flag, environment or file wins over the URL's.
use crate::cache::url::CacheUrl;
use crate::cache::{CacheError, S3Tuning};
use crate::format::compression::{Compression, CompressionSettings};
use crate::format::signing::SigningKey;
use crate::pipeline::PushOptions;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// The config file's default path and its environment variable: the hook's, so that every
/// command and the hook read the same file.
pub use crate::handoff::config::{CONFIG_ENV, DEFAULT_CONFIG};
/// How long a daemon shutdown may take when not configured.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// Every setting, as the flag layer (clap, with `NARFLOW_*` fallbacks) and as the file
/// layer (serde). `None` means "this layer does not say"; [`Merged`] picks, per key, the
/// highest layer that does, and [`Merged::resolve`] fills in the URL and the defaults.
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// Destination cache, in Nix's store-URL syntax (file:///DIR, s3://BUCKET?...).
    #[arg(long, env = "NARFLOW_TO", value_name = "URL")]
    pub to: Option<String>,
    /// Secret key file (Nix format) to sign narinfos with; repeatable.
    #[arg(
        long = "key-file",
        env = "NARFLOW_KEY_FILE",
        value_delimiter = ',',
        value_name = "FILE"
    )]
    pub key_file: Option<Vec<PathBuf>>,
    /// NAR compression: zstd, xz or none [default: zstd, or the URL's compression=].
    #[arg(long, env = "NARFLOW_COMPRESSION", value_parser = Compression::parse)]
    #[serde(default, deserialize_with = "de_compression")]
    pub compression: Option<Compression>,
    /// Compression level [default: zstd 3, xz 6, or the URL's compression-level=].
    #[arg(long, env = "NARFLOW_LEVEL", value_name = "N")]
    pub level: Option<i32>,
    /// Compression threads [default: one per core].
    #[arg(long, env = "NARFLOW_JOBS", value_name = "N")]
    pub jobs: Option<usize>,
    /// Memory budget for NAR data in flight, e.g. 64M, 1G (K, M, G: powers of 1024)
    /// [default: 128M].
    #[arg(long, env = "NARFLOW_MEMORY", value_name = "SIZE")]
    pub memory: Option<Size>,
    /// Chunk size: each chunk is compressed as an independent frame [default: 4M].
    #[arg(long, env = "NARFLOW_CHUNK_SIZE", value_name = "SIZE", hide = true)]
    pub chunk_size: Option<Size>,
    /// Allow uploading without a signing key.
    #[arg(long, env = "NARFLOW_UNSIGNED", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new(),
          value_name = "BOOL")]
    pub unsigned: Option<bool>,
    /// Use a secret key file that group or others can access (refused by default, as ssh
    /// refuses such a private key).
    #[arg(long, env = "NARFLOW_ALLOW_INSECURE_KEY_FILE", num_args = 0..=1,
          require_equals = true, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new(), value_name = "BOOL")]
    pub allow_insecure_key_file: Option<bool>,
    /// The daemon's Unix socket [default: /run/narflow/daemon.sock].
    #[arg(long, env = "NARFLOW_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The daemon's state directory (queue, the hook's spool) [default: /var/lib/narflow].
    #[arg(long, env = "NARFLOW_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Cap the upload bandwidth at this many bytes per second, e.g. 50M (K, M, G: powers
    /// of 1024) [default: no cap].
    #[arg(long, env = "NARFLOW_MAX_RATE", value_name = "BYTES_PER_S")]
    pub max_rate: Option<Size>,
    /// Upload each uploaded path's build log (from /nix/var/log/nix/drvs) as
    /// log/<drv name>, so `nix log --store URL PATH` finds it.
    #[arg(long, env = "NARFLOW_UPLOAD_LOGS", num_args = 0..=1, require_equals = true,
          default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new(),
          value_name = "BOOL")]
    pub upload_logs: Option<bool>,
    #[command(flatten, next_help_heading = "Daemon")]
    #[serde(default)]
    pub daemon: DaemonSettings,
    #[command(flatten, next_help_heading = "S3")]
    #[serde(default)]
    pub s3: S3Settings,
    #[command(flatten)]
    #[serde(default)]
    pub hook: HookSettings,
}

/// `[daemon]`: settings only `narflow daemon` uses.
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DaemonSettings {
    /// Let this group (name or number) use the daemon's socket too.
    #[arg(long, env = "NARFLOW_SOCKET_GROUP", value_name = "GROUP")]
    #[serde(default, deserialize_with = "de_name_or_number")]
    pub socket_group: Option<String>,
    /// Seconds a shutdown may take: the batch in flight gets half of it to finish, then
    /// is cancelled (what is unfinished stays queued) [default: 60].
    #[arg(long, env = "NARFLOW_SHUTDOWN_TIMEOUT", value_name = "SECONDS")]
    pub shutdown_timeout: Option<Seconds>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, env = "NARFLOW_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Follow the Nix database and queue each path that becomes valid: `built` (paths
    /// built on this machine) or `all` (every new path) [default: off; bare: built].
    #[arg(long, env = "NARFLOW_WATCH_STORE", num_args = 0..=1, require_equals = true,
          default_missing_value = "built", value_name = "built|all")]
    pub watch_store: Option<WatchStore>,
}

/// Which new valid paths `narflow daemon --watch-store` queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchStore {
    /// Paths Nix built on this machine (`ultimate = 1` in its database).
    Built,
    /// Every path that becomes valid (built, substituted, added, copied in).
    All,
}

impl WatchStore {
    /// The value as written: `built` or `all`.
    pub fn as_str(self) -> &'static str {
        match self {
            WatchStore::Built => "built",
            WatchStore::All => "all",
        }
    }
}

/// `[s3]`: how an S3 cache talks to its server (ignored by `file://` caches).
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct S3Settings {
    /// Requests in flight at once over all uploads [default: 32, or the URL's concurrency=].
    #[arg(
        id = "s3_concurrency",
        long = "s3-concurrency",
        env = "NARFLOW_S3_CONCURRENCY",
        value_name = "N"
    )]
    pub concurrency: Option<usize>,
    /// Retries of a request that failed transiently [default: 6, or the URL's retries=].
    #[arg(
        id = "s3_retries",
        long = "s3-retries",
        env = "NARFLOW_S3_RETRIES",
        value_name = "N"
    )]
    pub retries: Option<u32>,
    /// Seconds to wait for a connection [default: 5].
    #[arg(
        id = "s3_connect_timeout",
        long = "s3-connect-timeout",
        env = "NARFLOW_S3_CONNECT_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub connect_timeout: Option<Seconds>,
    /// Seconds a response may be silent [default: 30, or the URL's read-timeout=].
    #[arg(
        id = "s3_read_timeout",
        long = "s3-read-timeout",
        env = "NARFLOW_S3_READ_TIMEOUT",
        value_name = "SECONDS"
    )]
    pub read_timeout: Option<Seconds>,
    /// Smallest multipart part, at least 5M [default: 8M; larger NARs get larger parts].
    #[arg(
        id = "s3_part_size",
        long = "s3-part-size",
        env = "NARFLOW_S3_PART_SIZE",
        value_name = "SIZE"
    )]
    pub part_size: Option<Size>,
}

/// `[hook]`: the post-build-hook's settings, shown by `narflow config` (the hook reads
/// them itself, with no argument parser).
#[derive(Debug, Clone, Default, PartialEq, clap::Args, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HookSettings {
    /// Seconds the hook waits for the daemon before spooling [default: 2].
    #[arg(
        id = "hook_timeout",
        long = "hook-timeout",
        env = "NARFLOW_HOOK_TIMEOUT",
        value_name = "SECONDS",
        hide = true
    )]
    pub timeout: Option<Seconds>,
}

/// Each file key (`table.key` inside a table) and the id of its clap argument. Every
/// field of [`Settings`] is here once (a unit test checks both ways).
pub const KEYS: &[(&str, &str)] = &[
    ("to", "to"),
    ("key-file", "key_file"),
    ("compression", "compression"),
    ("level", "level"),
    ("jobs", "jobs"),
    ("memory", "memory"),
    ("chunk-size", "chunk_size"),
    ("unsigned", "unsigned"),
    ("allow-insecure-key-file", "allow_insecure_key_file"),
    ("socket", "socket"),
    ("state-dir", "state_dir"),
    ("max-rate", "max_rate"),
    ("upload-logs", "upload_logs"),
    ("daemon.socket-group", "socket_group"),
    ("daemon.shutdown-timeout", "shutdown_timeout"),
    ("daemon.metrics-listen", "metrics_listen"),
    ("daemon.watch-store", "watch_store"),
    ("s3.concurrency", "s3_concurrency"),
    ("s3.retries", "s3_retries"),
    ("s3.connect-timeout", "s3_connect_timeout"),
    ("s3.read-timeout", "s3_read_timeout"),
    ("s3.part-size", "s3_part_size"),
    ("hook.timeout", "hook_timeout"),
];

/// The file's tables.
const TABLES: &[&str] = &["daemon", "s3", "hook"];

/// A size in bytes: a number, or one with K, M, G, T (powers of 1024; KB, KiB, MB, MiB
/// ... are read as powers of 1024 too), e.g. `64M`, `1G`, `1.5G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_size(s).map(Size)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size: a number of bytes, or a string such as \"64M\" or \"1G\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("{v} is not a size: it is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Size, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses a size: bytes, or a number with K, M, G or T, all powers of 1024 (so `64M` is
/// 64 MiB; `MB` and `MiB` are read the same way).
///
/// # Errors
/// A message naming the text and the form expected.
pub fn parse_size(s: &str) -> Result<u64, String> {
    const BINARY: parse_size::Config = parse_size::Config::new().with_binary();
    BINARY.parse_size(s.trim()).map_err(|e| {
        format!("{s:?} is not a size ({e}): give bytes, or K, M, G (powers of 1024), e.g. 64M")
    })
}

/// A size for people: `64 MiB`, `1.5 GiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// A duration given in seconds (`30`, `2.5`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seconds(pub Duration);

impl FromStr for Seconds {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.trim()
            .parse::<f64>()
            .ok()
            .and_then(|f| Duration::try_from_secs_f64(f).ok())
            .map(Seconds)
            .ok_or_else(|| format!("{s:?} is not a number of seconds (e.g. 30 or 2.5)"))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of seconds, 0 or more")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Seconds, E> {
                Duration::try_from_secs_f64(v)
                    .map(Seconds)
                    .map_err(|_| E::custom(format!("{v} is not a number of seconds, 0 or more")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Seconds, E> {
                u64::try_from(v)
                    .map(|s| Seconds(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("{v} is not a number of seconds, 0 or more")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Seconds, E> {
                Ok(Seconds(Duration::from_secs(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Seconds, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

fn de_compression<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Compression>, D::Error> {
    let s = String::deserialize(d)?;
    Compression::parse(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// A group, as a name (`"nixbld"`) or a number (`30000` or `"30000"`).
fn de_name_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a group name or number")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_owned()))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
    }
    d.deserialize_any(V)
}

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

/// A parsed config file: its settings, and the line of each key it sets.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub settings: Settings,
    lines: BTreeMap<&'static str, usize>,
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl ConfigFile {
    /// Reads the config file at `path`. A missing file is `Ok(None)` when `required` is
    /// false (the default file), an error otherwise (a file the user named).
    ///
    /// # Errors
    /// [`SettingsError`] naming the file (and line and key, for what is in it).
    pub fn load(path: &Path, required: bool) -> Result<Option<ConfigFile>, SettingsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => ConfigFile::parse(path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
            Err(error) => Err(SettingsError::Read {
                path: path.to_owned(),
                error,
            }),
        }
    }

    /// Parses config file text (`path` is for messages and sources).
    ///
    /// # Errors
    /// [`SettingsError::Syntax`], [`SettingsError::UnknownKey`] or
    /// [`SettingsError::BadValue`], each with its line.
    pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, SettingsError> {
        let syntax = |e: toml::de::Error| SettingsError::Syntax {
            path: path.to_owned(),
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            message: e.message().to_owned(),
        };
        let doc = toml::de::DeTable::parse(text).map_err(syntax)?;
        // Every key with its line and the byte range of its value, for sources and for
        // naming the key of a bad value.
        let mut found: Vec<(&'static str, usize, std::ops::Range<usize>)> = Vec::new();
        let unknown = |key: String, at: usize, table: Option<&str>| {
            let known: Vec<String> = KEYS
                .iter()
                .filter_map(|(k, _)| match (table, k.split_once('.')) {
                    (None, None) => Some((*k).to_owned()),
                    (Some(t), Some((kt, name))) if t == kt => Some(name.to_owned()),
                    _ => None,
                })
                .chain(
                    table
                        .is_none()
                        .then(|| TABLES.iter().map(|t| format!("[{t}]")))
                        .into_iter()
                        .flatten(),
                )
                .collect();
            SettingsError::UnknownKey {
                path: path.to_owned(),
                line: line_of(text, at),
                key,
                known: known.join(", "),
            }
        };
        for (k, v) in doc.get_ref() {
            let name = k.get_ref().as_ref();
            if TABLES.contains(&name) {
                let Some(table) = v.get_ref().as_table() else {
                    return Err(SettingsError::BadValue {
                        path: path.to_owned(),
                        line: line_of(text, k.span().start),
                        key: name.to_owned(),
                        message: format!(
                            "expected a table ([{name}]), found a {}",
                            v.get_ref().type_str()
                        ),
                    });
                };
                for (k2, v2) in table {
                    let full = format!("{name}.{}", k2.get_ref());
                    let Some((key, _)) = KEYS.iter().find(|(key, _)| *key == full) else {
                        return Err(unknown(full, k2.span().start, Some(name)));
                    };
                    found.push((key, line_of(text, k2.span().start), v2.span()));
                }
            } else {
                let Some((key, _)) = KEYS
                    .iter()
                    .find(|(key, _)| *key == name && !key.contains('.'))
                else {
                    return Err(unknown(name.to_owned(), k.span().start, None));
                };
                found.push((key, line_of(text, k.span().start), v.span()));
            }
        }
        let settings: Settings = toml::from_str(text).map_err(|e| {
            let at = e.span().map_or(0, |s| s.start);
            // The key whose value holds the error, else the last key before it.
            let hit = found
                .iter()
                .find(|(_, _, span)| span.contains(&at))
                .or_else(|| {
                    found
                        .iter()
                        .rfind(|(_, line, _)| *line <= line_of(text, at))
                });
            match hit {
                Some((key, line, _)) => SettingsError::BadValue {
                    path: path.to_owned(),
                    line: *line,
                    key: (*key).to_owned(),
                    message: e.message().to_owned(),
                },
                None => syntax(e),
            }
        })?;
        Ok(ConfigFile {
            path: path.to_owned(),
            settings,
            lines: found.into_iter().map(|(k, line, _)| (k, line)).collect(),
        })
    }

    /// The line that sets `key`, if the file sets it.
    pub fn line(&self, key: &str) -> Option<usize> {
        self.lines.get(key).copied()
    }
}

/// Which config file a run uses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigChoice {
    pub path: PathBuf,
    /// `flag:--config`, `env:NARFLOW_CONFIG` or `default`.
    pub source: Source,
}

impl ConfigChoice {
    /// `--config` (given as `flag`, with clap's view of where it came from) or the
    /// default file.
    pub fn new(flag: Option<PathBuf>, from_env: bool) -> ConfigChoice {
        match flag {
            Some(path) if from_env => ConfigChoice {
                path,
                source: Source::Env(CONFIG_ENV.into()),
            },
            Some(path) => ConfigChoice {
                path,
                source: Source::Flag("--config".into()),
            },
            None => ConfigChoice {
                path: PathBuf::from(DEFAULT_CONFIG),
                source: Source::Default,
            },
        }
    }

    /// Reads the chosen file: the default one may be missing, a named one may not.
    ///
    /// # Errors
    /// See [`ConfigFile::load`].
    pub fn load(&self) -> Result<Option<ConfigFile>, SettingsError> {
        ConfigFile::load(&self.path, self.source != Source::Default)
    }
}

/// The merged settings of one run: each key's value from the highest layer that gives
/// it, and where it came from.
#[derive(Debug, Clone)]
pub struct Merged {
    pub settings: Settings,
    pub config: Option<ConfigChoice>,
    /// Whether the config file existed.
    pub config_read: bool,
    sources: BTreeMap<&'static str, Source>,
}

impl Settings {
    /// Each value of `self`, else `lower`'s.
    #[must_use]
    pub fn or(self, lower: Settings) -> Settings {
        Settings {
            to: self.to.or(lower.to),
            key_file: self.key_file.or(lower.key_file),
            compression: self.compression.or(lower.compression),
            level: self.level.or(lower.level),
            jobs: self.jobs.or(lower.jobs),
            memory: self.memory.or(lower.memory),
            chunk_size: self.chunk_size.or(lower.chunk_size),
            unsigned: self.unsigned.or(lower.unsigned),
            allow_insecure_key_file: self
                .allow_insecure_key_file
                .or(lower.allow_insecure_key_file),
            socket: self.socket.or(lower.socket),
            state_dir: self.state_dir.or(lower.state_dir),
            max_rate: self.max_rate.or(lower.max_rate),
            upload_logs: self.upload_logs.or(lower.upload_logs),
            daemon: DaemonSettings {
                socket_group: self.daemon.socket_group.or(lower.daemon.socket_group),
                shutdown_timeout: self
                    .daemon
                    .shutdown_timeout
                    .or(lower.daemon.shutdown_timeout),
                metrics_listen: self.daemon.metrics_listen.or(lower.daemon.metrics_listen),
                watch_store: self.daemon.watch_store.or(lower.daemon.watch_store),
            },
            s3: S3Settings {
                concurrency: self.s3.concurrency.or(lower.s3.concurrency),
                retries: self.s3.retries.or(lower.s3.retries),
                connect_timeout: self.s3.connect_timeout.or(lower.s3.connect_timeout),
                read_timeout: self.s3.read_timeout.or(lower.s3.read_timeout),
                part_size: self.s3.part_size.or(lower.s3.part_size),
            },
            hook: HookSettings {
                timeout: self.hook.timeout.or(lower.hook.timeout),
            },
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

impl Merged {
    /// Merges the flag layer (`flags`, with `origin` saying for each clap argument id
    /// whether it came from a flag or the environment) over `file`.
    pub fn new(
        flags: Settings,
        origin: impl Fn(&str) -> Option<Source>,
        config: Option<ConfigChoice>,
        file: Option<ConfigFile>,
    ) -> Merged {
        let mut sources = BTreeMap::new();
        for (key, id) in KEYS {
            let from_file = file.as_ref().and_then(|f| {
                f.line(key).map(|line| Source::File {
                    path: f.path.clone(),
                    line,
                })
            });
            if let Some(s) = origin(id).or(from_file) {
                sources.insert(*key, s);
            }
        }
        let config_read = file.is_some();
        let settings = match file {
            Some(f) => flags.or(f.settings),
            None => flags,
        };
        Merged {
            settings,
            config,
            config_read,
            sources,
        }
    }

    /// Where `key` (a [`KEYS`] name) came from, before the URL and the defaults.
    fn given(&self, key: &str) -> Option<Source> {
        self.sources.get(key).cloned()
    }

    /// The settings with the URL's parameters and the defaults filled in.
    ///
    /// # Errors
    /// [`SettingsError`] naming the bad URL, URL parameter or setting and its source.
    pub fn resolve(&self) -> Result<Resolved, SettingsError> {
        let s = &self.settings;
        let url =
            s.to.as_deref()
                .map(CacheUrl::parse)
                .transpose()
                .map_err(|e| SettingsError::Invalid {
                    key: "to",
                    from: self.given("to").unwrap_or(Source::Default),
                    message: e.to_string(),
                })?;
        let param = |k: &str| url.as_ref().and_then(|u| u.param(k));
        // The source of `key`: a layer that gives it, else the URL parameter `url_param`
        // when the URL has it, else the default.
        let source_of = |key: &'static str, url_param: Option<&'static str>| {
            self.given(key)
                .or_else(|| url_param.filter(|p| param(p).is_some()).map(Source::Url))
                .unwrap_or(Source::Default)
        };
        let mut sources: BTreeMap<&'static str, Source> = BTreeMap::new();
        for (key, url_param) in [
            ("to", None),
            ("compression", Some("compression")),
            ("level", Some("compression-level")),
            ("key-file", Some("secret-key")),
            ("s3.concurrency", Some("concurrency")),
            ("s3.retries", Some("retries")),
            ("s3.read-timeout", Some("read-timeout")),
        ] {
            sources.insert(key, source_of(key, url_param));
        }
        for (key, _) in KEYS {
            if !sources.contains_key(key) {
                sources.insert(key, source_of(key, None));
            }
        }

        let kind = match (s.compression, param("compression")) {
            (Some(c), _) => c,
            (None, Some(c)) => Compression::parse(c).map_err(|message| SettingsError::Invalid {
                key: "compression",
                from: Source::Url("compression"),
                message,
            })?,
            (None, None) => Compression::Zstd,
        };
        let level = match (s.level, param("compression-level")) {
            (Some(l), _) => Some(l),
            (None, Some(l)) => Some(l.parse().map_err(|_| SettingsError::Invalid {
                key: "level",
                from: Source::Url("compression-level"),
                message: format!("{l:?} is not a whole number"),
            })?),
            (None, None) => None,
        };
        let compression =
            CompressionSettings::new(kind, level).map_err(|message| SettingsError::Invalid {
                key: "level",
                from: sources["level"].clone(),
                message,
            })?;

        let mut key_files = s.key_file.clone().unwrap_or_default();
        if let Some(k) = param("secret-key") {
            key_files.push(PathBuf::from(k));
        }
        let jobs = s
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1);
        let memory = s.memory.map_or(crate::pipeline::DEFAULT_MEMORY, |m| m.0);
        // One chunk is one compressed frame: below 64 KiB frames cost ratio, above
        // 256 MiB one chunk would be most of any sensible budget.
        let chunk_size = s
            .chunk_size
            .map_or(crate::pipeline::DEFAULT_CHUNK_SIZE, |c| {
                usize::try_from(c.0)
                    .unwrap_or(usize::MAX)
                    .clamp(64 << 10, 256 << 20)
            });
        if memory < chunk_size as u64 {
            return Err(SettingsError::Invalid {
                key: "memory",
                from: sources["memory"].clone(),
                message: format!(
                    "{} is less than one chunk ({})",
                    format_size(memory),
                    format_size(chunk_size as u64)
                ),
            });
        }

        let mut s3 = match &url {
            Some(u) => S3Tuning::from_url(u)?,
            None => S3Tuning::default(),
        };
        if let Some(c) = s.s3.concurrency {
            s3.concurrency = c;
        }
        if let Some(r) = s.s3.retries {
            s3.retries = r;
        }
        if let Some(t) = s.s3.connect_timeout {
            s3.connect_timeout = t.0;
        }
        if let Some(t) = s.s3.read_timeout {
            s3.read_timeout = t.0;
        }
        if let Some(p) = s.s3.part_size {
            s3.min_part_size = p.0;
        }
        if let Err(message) = s3.check() {
            let key = if message.starts_with("concurrency") {
                "s3.concurrency"
            } else {
                "s3.part-size"
            };
            return Err(SettingsError::Invalid {
                key,
                from: sources[key].clone(),
                message,
            });
        }
        Ok(Resolved {
            nar_listing: url.as_ref().is_some_and(CacheUrl::write_nar_listing),
            url,
            compression,
            key_files,
            unsigned: s.unsigned.unwrap_or(false),
            allow_insecure_key_file: s.allow_insecure_key_file.unwrap_or(false),
            jobs,
            memory,
            chunk_size,
            socket: s
                .socket
                .clone()
                .unwrap_or_else(|| crate::handoff::hook::DEFAULT_SOCKET.into()),
            state_dir: s
                .state_dir
                .clone()
                .unwrap_or_else(|| crate::handoff::hook::DEFAULT_STATE_DIR.into()),
            socket_group: s.daemon.socket_group.clone(),
            shutdown_timeout: s
                .daemon
                .shutdown_timeout
                .map_or(DEFAULT_SHUTDOWN_TIMEOUT, |t| t.0),
            metrics_listen: s.daemon.metrics_listen,
            watch_store: s.daemon.watch_store,
            max_rate: s.max_rate.map(|r| r.0),
            upload_logs: s.upload_logs.unwrap_or(false),
            s3,
            hook_timeout: s
                .hook
                .timeout
                .map_or(crate::handoff::hook::DEFAULT_TIMEOUT, |t| t.0),
            sources,
        })
    }
}

/// Every setting's effective value (URL parameters and defaults filled in), and its
/// source.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The destination (`to`), when one is set.
    pub url: Option<CacheUrl>,
    pub compression: CompressionSettings,
    /// `key-file`'s, then the URL's `secret-key=`.
    pub key_files: Vec<PathBuf>,
    pub unsigned: bool,
    pub allow_insecure_key_file: bool,
    pub jobs: usize,
    pub memory: u64,
    pub chunk_size: usize,
    /// The URL's `write-nar-listing=`.
    pub nar_listing: bool,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub socket_group: Option<String>,
    pub shutdown_timeout: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub watch_store: Option<WatchStore>,
    /// Upload bandwidth cap, bytes per second.
    pub max_rate: Option<u64>,
    pub upload_logs: bool,
    pub s3: S3Tuning,
    pub hook_timeout: Duration,
    sources: BTreeMap<&'static str, Source>,
}

/// One line of `narflow config`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Entry {
    /// The file key (`memory`, `daemon.socket-group`).
    pub key: &'static str,
    /// The effective value (`null` when unset).
    pub value: serde_json::Value,
    /// Where it came from: `default`, `file:PATH:LINE`, `env:VAR`, `flag:--x`, `url:x=`.
    pub source: String,
}

impl Resolved {
    /// The destination cache.
    ///
    /// # Errors
    /// [`SettingsError::NoDestination`] when no layer sets `to`.
    pub fn cache_url(&self) -> Result<&CacheUrl, SettingsError> {
        self.url.as_ref().ok_or(SettingsError::NoDestination)
    }

    /// Where `key` came from.
    pub fn source(&self, key: &str) -> Source {
        self.sources.get(key).cloned().unwrap_or(Source::Default)
    }

    /// The pipeline's options, signing with every key file (each checked as
    /// [`load_key`] does).
    ///
    /// # Errors
    /// [`SettingsError::KeyFile`] for a key that cannot be used, and
    /// [`SettingsError::NoKey`] when there is none and `unsigned` is not set.
    pub fn push_options(&self) -> Result<PushOptions, SettingsError> {
        let keys = self
            .key_files
            .iter()
            .map(|f| load_key(f, self.allow_insecure_key_file))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() && !self.unsigned {
            return Err(SettingsError::NoKey);
        }
        Ok(self.push_options_with_keys(keys))
    }

    /// The pipeline's options with the given signing keys (and none of the key files).
    pub fn push_options_with_keys(&self, keys: Vec<SigningKey>) -> PushOptions {
        let mut opts = PushOptions::new(self.compression, keys);
        opts.jobs = self.jobs;
        opts.memory = self.memory;
        opts.chunk_size = self.chunk_size;
        opts.nar_listing = self.nar_listing;
        opts.max_rate = self.max_rate;
        opts.upload_logs = self.upload_logs;
        opts
    }

    /// Every key with its effective value and source, in [`KEYS`] order. Nothing among
    /// the settings is secret: key files are paths (their contents are never shown), and
    /// credentials are not settings (they come from the AWS chain). Userinfo in the URL
    /// (`user:password@`), which narflow does not use, is shown as `***@` all the same.
    pub fn entries(&self) -> Vec<Entry> {
        use serde_json::{Value, json};
        let secs = |d: Duration| json!(d.as_secs_f64());
        KEYS.iter()
            .map(|(key, _)| {
                let value = match *key {
                    "to" => self
                        .url
                        .as_ref()
                        .map_or(Value::Null, |u| json!(redact_userinfo(&u.original))),
                    "key-file" => json!(self.key_files),
                    "compression" => json!(self.compression.kind.nix_name()),
                    "level" => json!(self.compression.level),
                    "jobs" => json!(self.jobs),
                    "memory" => json!(self.memory),
                    "chunk-size" => json!(self.chunk_size),
                    "unsigned" => json!(self.unsigned),
                    "allow-insecure-key-file" => json!(self.allow_insecure_key_file),
                    "socket" => json!(self.socket),
                    "state-dir" => json!(self.state_dir),
                    "daemon.socket-group" => json!(self.socket_group),
                    "daemon.shutdown-timeout" => secs(self.shutdown_timeout),
                    "daemon.metrics-listen" => json!(self.metrics_listen.map(|a| a.to_string())),
                    "daemon.watch-store" => json!(self.watch_store.map(WatchStore::as_str)),
                    "max-rate" => json!(self.max_rate),
                    "upload-logs" => json!(self.upload_logs),
                    "s3.concurrency" => json!(self.s3.concurrency),
                    "s3.retries" => json!(self.s3.retries),
                    "s3.connect-timeout" => secs(self.s3.connect_timeout),
                    "s3.read-timeout" => secs(self.s3.read_timeout),
                    "s3.part-size" => json!(self.s3.min_part_size),
                    "hook.timeout" => secs(self.hook_timeout),
                    other => unreachable!("no value for key {other}"),
                };
                let mut source = self.source(key).to_string();
                let url_key = self
                    .url
                    .as_ref()
                    .is_some_and(|u| u.param("secret-key").is_some());
                if *key == "key-file" && url_key && !source.starts_with("url:") {
                    // Both give keys: the setting's, then the URL's.
                    source.push_str(" + url:secret-key=");
                }
                Entry { key, value, source }
            })
            .collect()
    }
}

/// Keys whose values are byte counts (shown as sizes to people).
pub const SIZE_KEYS: &[&str] = &["memory", "chunk-size", "max-rate", "s3.part-size"];

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
