//! The one list of settings. Each is declared once, in a `settings_group!` table below:
//! its file key, flag, variable, value name, default, one-line description, how the file
//! reads it and how `narflow config` shows it. From that one row come the clap argument
//! (the struct field, its help with the default), the file key and its reader, the merge
//! of layers ([`Settings::or`]), the defaults ([`defaults`]) and the `narflow config`
//! line; [`KEYS`] lists every row for whatever else needs them (the manual's reference).
//! Nothing here resolves a setting against another (that is [`super::Merged::resolve`]).
use super::Resolved;
use super::values::{
    JournalFile, Seconds, Size, Span, WatchStore, de_compression, de_name_or_number,
};
use crate::format::compression::Compression;
use serde_json::{Value, json};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

/// A setting's default, as the manual and `--help` say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// A value, written as its flag takes it.
    Value(&'static str),
    /// No value of its own (unset, or depending on the machine or another setting): words.
    Words(&'static str),
    /// The store URL's parameter (its name) when the URL has it, else a value.
    Url(&'static str, &'static str),
    /// The store URL's parameter when the URL has it, else words.
    UrlWords(&'static str, &'static str),
    /// None, but the store URL's parameter adds one.
    UrlAdds(&'static str),
}

impl Fallback {
    /// The default value, written as the flag takes it, when there is one.
    pub fn value(self) -> Option<&'static str> {
        match self {
            Fallback::Value(v) | Fallback::Url(_, v) => Some(v),
            _ => None,
        }
    }

    /// The store-URL parameter that fills the setting in below every layer.
    pub fn url_param(self) -> Option<&'static str> {
        match self {
            Fallback::Url(p, _) | Fallback::UrlWords(p, _) | Fallback::UrlAdds(p) => Some(p),
            _ => None,
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Fallback::Value(v) | Fallback::Words(v) => f.write_str(v),
            Fallback::Url(p, v) | Fallback::UrlWords(p, v) => write!(f, "{v}, or the URL's {p}="),
            Fallback::UrlAdds(p) => write!(f, "none; the URL's {p}= adds one"),
        }
    }
}

/// One row of the list: everything said about a setting.
#[derive(Clone, Copy)]
pub struct Key {
    /// The file key (`memory`; `table.key` inside a table: `s3.part-size`).
    pub name: &'static str,
    /// The flag, without its dashes (`memory`, `s3-part-size`).
    pub flag: &'static str,
    /// The clap argument's id.
    pub id: &'static str,
    /// The environment variable (`NARFLOW_MEMORY`).
    pub env: &'static str,
    /// The value's placeholder in `--help` (`SIZE`).
    pub value_name: &'static str,
    pub default: Fallback,
    /// One line: what it sets.
    pub help: &'static str,
    /// Left out of `--help` (still read).
    pub hidden: bool,
    /// Its value in `narflow config` (JSON: sizes in bytes, durations in seconds).
    pub show: fn(&Resolved) -> Value,
    type_id: fn() -> std::any::TypeId,
}

impl Key {
    /// Whether the value is a byte count (shown as a size to people too).
    pub fn is_size(&self) -> bool {
        (self.type_id)() == std::any::TypeId::of::<Size>()
    }

    /// What its value is, in words for the manual (`size`, `duration`, `boolean`, ...).
    pub fn kind(&self) -> &'static str {
        use std::any::TypeId;
        let t = (self.type_id)();
        let kinds: [(TypeId, &'static str); 14] = [
            (
                TypeId::of::<Size>(),
                "size (bytes, or K, M, G, T: powers of 1024)",
            ),
            (TypeId::of::<Seconds>(), "seconds (`30`, `2.5`)"),
            (
                TypeId::of::<Span>(),
                "duration (`30m`, `24h`, `7d`; a bare number is seconds)",
            ),
            (
                TypeId::of::<bool>(),
                "boolean (`true`/`false`, `1`/`0`, `yes`/`no`)",
            ),
            (TypeId::of::<usize>(), "integer"),
            (TypeId::of::<u32>(), "integer"),
            (TypeId::of::<i32>(), "integer"),
            (TypeId::of::<String>(), "string"),
            (TypeId::of::<PathBuf>(), "path"),
            (
                TypeId::of::<Vec<PathBuf>>(),
                "list of paths (flag repeatable or `A,B`)",
            ),
            (
                TypeId::of::<Vec<String>>(),
                "list (flag repeatable or `A,B`)",
            ),
            (TypeId::of::<Compression>(), "`zstd`, `xz` or `none`"),
            (TypeId::of::<WatchStore>(), "`built` or `all`"),
            (TypeId::of::<SocketAddr>(), "address (`host:port`)"),
        ];
        if t == TypeId::of::<JournalFile>() {
            return "path, or `off`";
        }
        kinds
            .iter()
            .find(|(id, _)| *id == t)
            .map_or("other", |(_, kind)| kind)
    }

    /// The table of the config file it sits in (`s3`), if any.
    pub fn table(&self) -> Option<&'static str> {
        self.name.split_once('.').map(|(t, _)| t)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.debug_struct("Key")
            .field("name", &self.name)
            .field("flag", &self.flag)
            .field("env", &self.env)
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

/// `--help`'s line: the description and the default.
fn help_text(help: &str, default: Fallback) -> String {
    format!("{help} [default: {default}]")
}

/// A value in the config file, as the TOML parser found it.
pub(super) type FileValue<'a> = toml::Spanned<toml::de::DeValue<'a>>;

/// Reads a file value the way `T` deserializes.
fn de_value<'de, T: serde::Deserialize<'de>>(
    d: toml::de::ValueDeserializer<'de>,
) -> Result<T, toml::de::Error> {
    T::deserialize(d)
}

/// The first of two expressions given, else the second.
macro_rules! first_or {
    ($a:expr; $b:expr) => {
        $a
    };
    (; $b:expr) => {
        $b
    };
}

/// A struct of settings (a clap `Args`), the rows of its settings, and the code every
/// row needs, from one table. Groups named after `flatten` are nested in it (for clap
/// too), and their rows follow its own.
macro_rules! settings_group {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $field:ident : $ty:ty {
                    key: $key:literal,
                    flag: $flag:literal,
                    $(id: $id:literal,)?
                    env: $env:literal,
                    value: $value_name:literal,
                    default: $default:expr,
                    help: $help:literal,
                    $(hidden: $hidden:literal,)?
                    $(arg: [$($arg:tt)*],)?
                    $(read: $read:expr,)?
                    show: $show:expr $(,)?
                }
            ),* $(,)?
        }
        $(flatten {
            $($(#[$gmeta:meta])* $group:ident : $gty:ty),* $(,)?
        })?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, clap::Args)]
        pub struct $name {
            $(
                #[doc = $help]
                #[arg(
                    id = first_or!($($id)?; stringify!($field)),
                    long = $flag,
                    env = $env,
                    value_name = $value_name,
                    help = help_text($help, $default),
                    hide = first_or!($($hidden)?; false)
                    $(, $($arg)*)?
                )]
                pub $field: Option<$ty>,
            )*
            $($(
                $(#[$gmeta])*
                pub $group: $gty,
            )*)?
        }

        impl $name {
            /// This group's own rows.
            const ROWS: &'static [Key] = &[$(
                Key {
                    name: $key,
                    flag: $flag,
                    id: first_or!($($id)?; stringify!($field)),
                    env: $env,
                    value_name: $value_name,
                    default: $default,
                    help: $help,
                    hidden: first_or!($($hidden)?; false),
                    show: $show,
                    type_id: std::any::TypeId::of::<$ty>,
                },
            )*];

            /// Its rows, then those of the groups nested in it.
            fn rows_into(out: &mut Vec<&'static Key>) {
                out.extend(Self::ROWS);
                $($(<$gty>::rows_into(out);)*)?
            }

            /// Each value of `self`, else `lower`'s.
            #[must_use]
            pub fn or(self, lower: Self) -> Self {
                $name {
                    $($field: self.$field.or(lower.$field),)*
                    $($($group: self.$group.or(lower.$group),)*)?
                }
            }

            /// Sets the setting whose file key is `key` from the file's `value`; `None`
            /// when no setting here has that key.
            pub(super) fn read_file_value(
                &mut self,
                key: &str,
                value: &FileValue<'_>,
            ) -> Option<Result<(), String>> {
                $(
                    if key == $key {
                        let d = toml::de::ValueDeserializer::from(value.clone());
                        return Some(
                            first_or!($($read)?; de_value::<$ty>)(d)
                                .map(|v| self.$field = Some(v))
                                .map_err(|e| e.message().to_owned()),
                        );
                    }
                )*
                $($(
                    if let Some(r) = self.$group.read_file_value(key, value) {
                        return Some(r);
                    }
                )*)?
                None
            }
        }
    };
}

settings_group! {
    /// Every setting, as the flag layer (clap, with `NARFLOW_*` fallbacks) and as the
    /// file layer. `None` means "this layer does not say"; [`super::Merged`] picks, per
    /// key, the highest layer that does, and [`super::Merged::resolve`] fills in the URL's
    /// parameters and the defaults.
    pub struct Settings {
        to: String {
            key: "to",
            flag: "to",
            env: "NARFLOW_TO",
            value: "URL",
            default: Fallback::Words("none (push, daemon, verify and gc need one)"),
            help: "The cache, in Nix's store-URL syntax (file:///DIR, s3://BUCKET?...); \
                   --cache is the same flag",
            arg: [visible_alias = "cache"],
            show: |r| {
                r.url
                    .as_ref()
                    .map_or(Value::Null, |u| json!(super::redact_userinfo(&u.original)))
            },
        },
        key_file: Vec<PathBuf> {
            key: "key-file",
            flag: "key-file",
            env: "NARFLOW_KEY_FILE",
            value: "FILE",
            default: Fallback::UrlAdds("secret-key"),
            help: "Secret key file (Nix format) to sign narinfos with; repeatable",
            arg: [value_delimiter = ','],
            show: |r| json!(r.key_files),
        },
        unsigned: bool {
            key: "unsigned",
            flag: "unsigned",
            env: "NARFLOW_UNSIGNED",
            value: "BOOL",
            default: Fallback::Value("false"),
            help: "Allow uploading without a signing key",
            // A switch: its optional value is attached with `=` only (`--unsigned=false`
            // over a file's `true`), since the next word is the next argument (a path).
            arg: [num_args = 0..=1, require_equals = true, default_missing_value = "true",
                  value_parser = clap::builder::BoolishValueParser::new()],
            show: |r| json!(r.unsigned),
        },
        allow_insecure_key_file: bool {
            key: "allow-insecure-key-file",
            flag: "allow-insecure-key-file",
            env: "NARFLOW_ALLOW_INSECURE_KEY_FILE",
            value: "BOOL",
            default: Fallback::Value("false"),
            help: "Use a secret key file that group or others can access (refused otherwise, \
                   as ssh refuses such a private key)",
            arg: [num_args = 0..=1, require_equals = true, default_missing_value = "true",
                  value_parser = clap::builder::BoolishValueParser::new()],
            show: |r| json!(r.allow_insecure_key_file),
        },
        trusted_key: Vec<String> {
            key: "trusted-key",
            flag: "trusted-key",
            env: "NARFLOW_TRUSTED_KEY",
            value: "NAME:KEY",
            default: Fallback::Words("the public halves of the key files"),
            help: "Public key (Nix format) whose signatures `narflow verify` trusts; repeatable",
            arg: [value_delimiter = ','],
            show: |r| json!(r.trusted_keys),
        },
        socket: PathBuf {
            key: "socket",
            flag: "socket",
            env: "NARFLOW_SOCKET",
            value: "PATH",
            default: Fallback::Value("/run/narflow/daemon.sock"),
            help: "The daemon's Unix socket",
            show: |r| json!(r.socket),
        },
        state_dir: PathBuf {
            key: "state-dir",
            flag: "state-dir",
            env: "NARFLOW_STATE_DIR",
            value: "DIR",
            default: Fallback::Value("/var/lib/narflow"),
            help: "The daemon's state directory (queue, the hook's spool)",
            show: |r| json!(r.state_dir),
        },
        max_rate: Size {
            key: "max-rate",
            flag: "max-rate",
            env: "NARFLOW_MAX_RATE",
            value: "BYTES_PER_S",
            default: Fallback::Words("no cap"),
            help: "Cap the upload bandwidth at this many bytes per second, e.g. 50M (K, M, G: \
                   powers of 1024)",
            show: |r| json!(r.max_rate),
        },
        upload_logs: bool {
            key: "upload-logs",
            flag: "upload-logs",
            env: "NARFLOW_UPLOAD_LOGS",
            value: "BOOL",
            default: Fallback::Value("false"),
            help: "Upload each uploaded path's build log (from /nix/var/log/nix/drvs) as \
                   log/<drv name>, so `nix log --store URL PATH` finds it",
            arg: [num_args = 0..=1, require_equals = true, default_missing_value = "true",
                  value_parser = clap::builder::BoolishValueParser::new()],
            show: |r| json!(r.upload_logs),
        },
        upload_journal: JournalFile {
            key: "upload-journal",
            flag: "upload-journal",
            env: "NARFLOW_UPLOAD_JOURNAL",
            value: "FILE|off",
            default: Fallback::Words(
                "push: $XDG_STATE_HOME/narflow/uploads.sqlite (else ~/.local/state/narflow/); \
                 backfill: uploads.sqlite beside its state file; the daemon: its queue"
            ),
            help: "Where push and backfill record unfinished multipart uploads to S3, so a \
                   later run resumes them; off: no resume (the daemon takes only off)",
            show: |r| json!(r.upload_journal.as_ref().map(ToString::to_string)),
        },
        resume_max_age: Span {
            key: "resume-max-age",
            flag: "resume-max-age",
            env: "NARFLOW_RESUME_MAX_AGE",
            value: "DURATION",
            default: Fallback::Value("7d"),
            help: "A recorded unfinished upload older than this is aborted, not resumed \
                   (e.g. 7d, 12h)",
            show: |r| secs(r.resume_max_age),
        },
    }
    flatten {
        #[command(flatten)]
        pipeline: PipelineSettings,
        #[command(flatten, next_help_heading = "Daemon")]
        daemon: DaemonSettings,
        #[command(flatten, next_help_heading = "S3")]
        s3: S3Settings,
        #[command(flatten)]
        hook: HookSettings,
        #[command(flatten, next_help_heading = "gc")]
        gc: GcSettings,
    }
}

settings_group! {
    /// How NAR data goes through the pipeline: compression, threads, the memory budget.
    /// Shared by every command that pushes, and by `narflow bench`.
    pub struct PipelineSettings {
        compression: Compression {
            key: "compression",
            flag: "compression",
            env: "NARFLOW_COMPRESSION",
            value: "zstd|xz|none",
            default: Fallback::Url("compression", "zstd"),
            help: "NAR compression: zstd, xz or none",
            arg: [value_parser = Compression::parse],
            read: de_compression,
            show: |r| json!(r.compression.kind.nix_name()),
        },
        level: i32 {
            key: "level",
            flag: "level",
            env: "NARFLOW_LEVEL",
            value: "N",
            default: Fallback::UrlWords("compression-level", "zstd 3, xz 6"),
            help: "Compression level",
            show: |r| json!(r.compression.level),
        },
        jobs: usize {
            key: "jobs",
            flag: "jobs",
            env: "NARFLOW_JOBS",
            value: "N",
            default: Fallback::Words("one per core"),
            help: "Compression threads",
            show: |r| json!(r.jobs),
        },
        memory: Size {
            key: "memory",
            flag: "memory",
            env: "NARFLOW_MEMORY",
            value: "SIZE",
            default: Fallback::Value("128M"),
            help: "Memory budget for NAR data in flight, the cache's upload buffers included, \
                   e.g. 64M, 1G (K, M, G: powers of 1024)",
            show: |r| json!(r.memory),
        },
        chunk_size: Size {
            key: "chunk-size",
            flag: "chunk-size",
            env: "NARFLOW_CHUNK_SIZE",
            value: "SIZE",
            default: Fallback::Value("4M"),
            help: "Chunk size (64K to 256M): each chunk is compressed as an independent frame",
            hidden: true,
            show: |r| json!(r.chunk_size),
        },
    }
}

settings_group! {
    /// `[daemon]`: settings only `narflow daemon` uses.
    pub struct DaemonSettings {
        socket_group: String {
            key: "daemon.socket-group",
            flag: "socket-group",
            env: "NARFLOW_SOCKET_GROUP",
            value: "GROUP",
            default: Fallback::Words("none (socket 0600)"),
            help: "Let this group (name or number) use the daemon's socket too",
            read: de_name_or_number,
            show: |r| json!(r.socket_group),
        },
        shutdown_timeout: Seconds {
            key: "daemon.shutdown-timeout",
            flag: "shutdown-timeout",
            env: "NARFLOW_SHUTDOWN_TIMEOUT",
            value: "SECONDS",
            default: Fallback::Value("60"),
            help: "Seconds a shutdown may take: the batch in flight gets half of it to finish, \
                   then is cancelled (what is unfinished stays queued)",
            show: |r| secs(r.shutdown_timeout),
        },
        metrics_listen: SocketAddr {
            key: "daemon.metrics-listen",
            flag: "metrics-listen",
            env: "NARFLOW_METRICS_LISTEN",
            value: "ADDR",
            default: Fallback::Words("none"),
            help: "Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464)",
            show: |r| json!(r.metrics_listen.map(|a| a.to_string())),
        },
        watch_store: WatchStore {
            key: "daemon.watch-store",
            flag: "watch-store",
            env: "NARFLOW_WATCH_STORE",
            value: "built|all",
            default: Fallback::Words("off; bare: built"),
            help: "Follow the Nix database and queue each path that becomes valid: `built` \
                   (paths built on this machine) or `all` (every new path)",
            // The mode may be the next word (`--watch-store all`), as the usage line
            // shows: the daemon takes no positional argument it could be mistaken for.
            arg: [num_args = 0..=1, default_missing_value = "built"],
            show: |r| json!(r.watch_store.map(WatchStore::as_str)),
        },
    }
}

settings_group! {
    /// `[s3]`: how an S3 cache talks to its server (ignored by `file://` caches).
    pub struct S3Settings {
        concurrency: usize {
            key: "s3.concurrency",
            flag: "s3-concurrency",
            id: "s3_concurrency",
            env: "NARFLOW_S3_CONCURRENCY",
            value: "N",
            default: Fallback::Url("concurrency", "32"),
            help: "Requests in flight at once over all uploads",
            show: |r| json!(r.s3.concurrency),
        },
        retries: u32 {
            key: "s3.retries",
            flag: "s3-retries",
            id: "s3_retries",
            env: "NARFLOW_S3_RETRIES",
            value: "N",
            default: Fallback::Url("retries", "6"),
            help: "Retries of a request that failed transiently",
            show: |r| json!(r.s3.retries),
        },
        connect_timeout: Seconds {
            key: "s3.connect-timeout",
            flag: "s3-connect-timeout",
            id: "s3_connect_timeout",
            env: "NARFLOW_S3_CONNECT_TIMEOUT",
            value: "SECONDS",
            default: Fallback::Value("5"),
            help: "Seconds to wait for a connection",
            show: |r| secs(r.s3.connect_timeout),
        },
        read_timeout: Seconds {
            key: "s3.read-timeout",
            flag: "s3-read-timeout",
            id: "s3_read_timeout",
            env: "NARFLOW_S3_READ_TIMEOUT",
            value: "SECONDS",
            default: Fallback::Url("read-timeout", "30"),
            help: "Seconds a response may be silent",
            show: |r| secs(r.s3.read_timeout),
        },
        part_size: Size {
            key: "s3.part-size",
            flag: "s3-part-size",
            id: "s3_part_size",
            env: "NARFLOW_S3_PART_SIZE",
            value: "SIZE",
            default: Fallback::Value("8M"),
            help: "Multipart part size, at least 5M; one given needs --memory 8 times it, the \
                   default shrinks to fit a smaller --memory (5M at least); NARs over 76 GiB \
                   get larger parts",
            show: |r| json!(r.s3.min_part_size),
        },
    }
}

settings_group! {
    /// `[hook]`: the post-build-hook's settings, shown by `narflow config` (the hook
    /// reads them itself, with no argument parser).
    pub struct HookSettings {
        timeout: Seconds {
            key: "hook.timeout",
            flag: "hook-timeout",
            id: "hook_timeout",
            env: "NARFLOW_HOOK_TIMEOUT",
            value: "SECONDS",
            default: Fallback::Value("2"),
            help: "Seconds the hook waits for the daemon before spooling",
            hidden: true,
            show: |r| secs(r.hook_timeout),
        },
    }
}

settings_group! {
    /// `[gc]`: how `narflow gc` sweeps.
    pub struct GcSettings {
        grace: Span {
            key: "gc.grace",
            flag: "grace",
            env: "NARFLOW_GC_GRACE",
            value: "DURATION",
            default: Fallback::Value("24h"),
            help: "gc deletes nothing modified this recently (e.g. 24h, 30m, 7d, 0), and \
                   keeps every narinfo that young with its closure",
            show: |r| secs(r.gc_grace),
        },
        settle: Span {
            key: "gc.settle",
            flag: "gc-settle",
            env: "NARFLOW_GC_SETTLE",
            value: "DURATION",
            default: Fallback::Value("2m"),
            help: "How long gc waits between announcing itself and listing the cache, so \
                   that what writers published before they saw it is listed (shorter is \
                   unsafe beside writers)",
            show: |r| secs(r.gc_settle),
        },
        batch_size: usize {
            key: "gc.batch-size",
            flag: "gc-batch-size",
            id: "gc_batch_size",
            env: "NARFLOW_GC_BATCH_SIZE",
            value: "N",
            default: Fallback::Value("1000"),
            help: "Keys gc deletes in one request (2 to 1000)",
            hidden: true,
            show: |r| json!(r.gc_batch_size),
        },
    }
}

/// A duration as `narflow config` shows it: seconds.
fn secs(d: Duration) -> Value {
    json!(d.as_secs_f64())
}

/// Every setting's row, in `narflow config`'s order.
pub static KEYS: LazyLock<Vec<&'static Key>> = LazyLock::new(|| {
    let mut rows = Vec::new();
    Settings::rows_into(&mut rows);
    rows
});

/// The config file's tables (`daemon`, `s3`, `hook`).
pub fn tables() -> Vec<&'static str> {
    let mut tables: Vec<&'static str> = Vec::new();
    for t in KEYS.iter().filter_map(|k| k.table()) {
        if !tables.contains(&t) {
            tables.push(t);
        }
    }
    tables
}

/// Every default that is a value, read by the flags' own parsers: what a run uses for a
/// setting no layer (nor the URL) gives.
pub fn defaults() -> &'static Settings {
    static DEFAULTS: LazyLock<Settings> = LazyLock::new(|| {
        use clap::{Args, FromArgMatches};
        let cmd = Settings::augment_args(clap::Command::new("defaults").no_binary_name(true))
            .mut_args(|a| a.env(None::<&'static str>));
        let argv: Vec<String> = KEYS
            .iter()
            .filter_map(|k| k.default.value().map(|v| format!("--{}={v}", k.flag)))
            .collect();
        let matches = cmd
            .try_get_matches_from(&argv)
            .unwrap_or_else(|e| panic!("a declared default does not parse: {e}"));
        Settings::from_arg_matches(&matches)
            .unwrap_or_else(|e| panic!("a declared default does not parse: {e}"))
    });
    &DEFAULTS
}
