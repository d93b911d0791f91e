//! Merging the layers and resolving the result: [`Merged`] holds each key's value from the
//! highest layer that gives it (flags and variables over the file) and where it came from;
//! [`Merged::resolve`] fills in the store URL's parameters and the defaults, checks the
//! values together (the memory budget against the chunk size and the cache's need, the S3
//! tuning) and gives the library's option types. It reads no file but signing keys.
use super::table::{KEYS, Settings, defaults};
use super::values::{JournalFile, WatchStore};
use super::{ConfigChoice, ConfigFile, SettingsError, Source, load_key};
use crate::cache::url::CacheUrl;
use crate::cache::{S3Tuning, TuningError};
use crate::format::compression::{Compression, CompressionSettings};
use crate::format::signing::SigningKey;
use crate::memory::Budget;
use crate::pipeline::PushOptions;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// The value a layer gives, else the declared default (for settings declared with one).
fn or_default<T: Clone>(given: &Option<T>, default: &Option<T>) -> T {
    given
        .clone()
        .or_else(|| default.clone())
        .expect("a setting read with its default is declared with one")
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
        for key in KEYS.iter() {
            let from_file = file.as_ref().and_then(|f| {
                f.line(key.name).map(|line| Source::File {
                    path: f.path.clone(),
                    line,
                })
            });
            if let Some(s) = origin(key.id).or(from_file) {
                sources.insert(key.name, s);
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
    /// [`SettingsError`] naming the bad URL, URL parameter or setting and its source; a
    /// memory budget too small for the chunk size and the cache is one, naming the least
    /// that works.
    pub fn resolve(&self) -> Result<Resolved, SettingsError> {
        let s = &self.settings;
        let p = &s.pipeline;
        let d = defaults();
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
        // Each key's source: a layer that gives it, else its URL parameter when the URL
        // has it, else the default.
        let sources: BTreeMap<&'static str, Source> = KEYS
            .iter()
            .map(|key| {
                let from_url = key
                    .default
                    .url_param()
                    .filter(|p| param(p).is_some())
                    .map(Source::Url);
                let source = self.given(key.name).or(from_url).unwrap_or(Source::Default);
                (key.name, source)
            })
            .collect();
        let invalid = |key: &'static str, message: String| SettingsError::Invalid {
            key,
            from: sources[key].clone(),
            message,
        };

        let kind = match (p.compression, param("compression")) {
            (Some(c), _) => c,
            (None, Some(c)) => {
                Compression::parse(c).map_err(|message| invalid("compression", message))?
            }
            (None, None) => or_default(&None, &d.pipeline.compression),
        };
        let level = match (p.level, param("compression-level")) {
            (Some(l), _) => Some(l),
            (None, Some(l)) => Some(
                l.parse()
                    .map_err(|_| invalid("level", format!("{l:?} is not a whole number")))?,
            ),
            (None, None) => None,
        };
        let compression =
            CompressionSettings::new(kind, level).map_err(|message| invalid("level", message))?;

        let mut key_files = s.key_file.clone().unwrap_or_default();
        if let Some(k) = param("secret-key") {
            key_files.push(PathBuf::from(k));
        }
        let jobs = p.jobs.unwrap_or_else(crate::memory::default_jobs).max(1);

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
        s3.check().map_err(|e| {
            let key = match e {
                TuningError::Concurrency => "s3.concurrency",
                TuningError::PartSize(_) => "s3.part-size",
            };
            invalid(key, e.to_string())
        })?;

        // The one check of the budget, before anything is opened: the least that holds a
        // chunk beside what the cache needs of its half.
        let memory = or_default(&p.memory, &d.pipeline.memory).0;
        let chunk_size =
            crate::memory::chunk_size(or_default(&p.chunk_size, &d.pipeline.chunk_size).0);
        let need = url
            .as_ref()
            .map(|u| crate::cache::memory_need(u, &s3))
            .unwrap_or_default();
        Budget::new(memory, chunk_size, &need).map_err(|e| invalid("memory", e.to_string()))?;
        // A part size given is kept, never shrunk: the budget must take parts that large
        // (the default part size shrinks to what the budget takes instead).
        let s3_url = url
            .as_ref()
            .is_some_and(|u| matches!(u.location, crate::cache::url::CacheLocation::S3 { .. }));
        if let (Some(part), true) = (s.s3.part_size, s3_url) {
            let least = S3Tuning::memory_for_part(part.0);
            if memory < least {
                return Err(invalid(
                    "s3.part-size",
                    format!(
                        "parts of {} need --memory {}M or more; raise --memory or lower \
                         s3.part-size",
                        crate::memory::Human(part.0),
                        least.div_ceil(1 << 20)
                    ),
                ));
            }
        }

        let gc_batch_size = or_default(&s.gc.batch_size, &d.gc.batch_size);
        if !(2..=crate::cache::MAX_DELETE).contains(&gc_batch_size) {
            return Err(invalid(
                "gc.batch-size",
                format!(
                    "{gc_batch_size} keys: give 2 to {}",
                    crate::cache::MAX_DELETE
                ),
            ));
        }

        Ok(Resolved {
            nar_listing: url.as_ref().is_some_and(CacheUrl::write_nar_listing),
            url,
            compression,
            key_files,
            unsigned: or_default(&s.unsigned, &d.unsigned),
            allow_insecure_key_file: or_default(
                &s.allow_insecure_key_file,
                &d.allow_insecure_key_file,
            ),
            trusted_keys: s.trusted_key.clone().unwrap_or_default(),
            jobs,
            memory,
            chunk_size,
            socket: or_default(&s.socket, &d.socket),
            state_dir: or_default(&s.state_dir, &d.state_dir),
            socket_group: s.daemon.socket_group.clone(),
            shutdown_timeout: or_default(&s.daemon.shutdown_timeout, &d.daemon.shutdown_timeout).0,
            metrics_listen: s.daemon.metrics_listen,
            watch_store: s.daemon.watch_store,
            max_rate: s.max_rate.map(|r| r.0),
            upload_logs: or_default(&s.upload_logs, &d.upload_logs),
            upload_journal: s.upload_journal.clone(),
            resume_max_age: or_default(&s.resume_max_age, &d.resume_max_age).0,
            s3,
            hook_timeout: or_default(&s.hook.timeout, &d.hook.timeout).0,
            gc_grace: or_default(&s.gc.grace, &d.gc.grace).0,
            gc_settle: or_default(&s.gc.settle, &d.gc.settle).0,
            gc_batch_size,
            sources,
        })
    }
}

/// The upload journal's file name, in the directory push or backfill keeps it.
pub const JOURNAL_FILE: &str = "uploads.sqlite";

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
    /// `trusted-key`'s public keys, as given (parsed by the command that uses them).
    pub trusted_keys: Vec<String>,
    pub jobs: usize,
    /// The memory budget, checked against the chunk size and the cache's need.
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
    /// `upload-journal` as given; `None`: the command's default place.
    pub upload_journal: Option<JournalFile>,
    /// Recorded unfinished uploads older than this are aborted, not resumed.
    pub resume_max_age: Duration,
    pub s3: S3Tuning,
    pub hook_timeout: Duration,
    /// gc: nothing younger is deleted.
    pub gc_grace: Duration,
    /// gc: the wait between its marker and its listing.
    pub gc_settle: Duration,
    /// gc: keys per deletion request.
    pub gc_batch_size: usize,
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

    /// The upload journal of `narflow push`: `upload-journal`, else
    /// `$XDG_STATE_HOME/narflow/uploads.sqlite` (`~/.local/state/narflow/uploads.sqlite`
    /// when that is unset or not absolute); `None` when it is off, or no home is known.
    pub fn push_journal(&self) -> Option<PathBuf> {
        match &self.upload_journal {
            Some(JournalFile::Off) => None,
            Some(JournalFile::File(f)) => Some(f.clone()),
            None => {
                let var = |v| std::env::var_os(v).map(PathBuf::from);
                let state = var("XDG_STATE_HOME")
                    .filter(|p| p.is_absolute())
                    .or_else(|| {
                        var("HOME")
                            .filter(|p| p.is_absolute())
                            .map(|h| h.join(".local/state"))
                    })?;
                Some(state.join("narflow").join(JOURNAL_FILE))
            }
        }
    }

    /// The upload journal of `narflow backfill`, whose resume state is `state_file`:
    /// `upload-journal`, else [`JOURNAL_FILE`] beside the state file; `None` when off.
    pub fn backfill_journal(&self, state_file: &Path) -> Option<PathBuf> {
        match &self.upload_journal {
            Some(JournalFile::Off) => None,
            Some(JournalFile::File(f)) => Some(f.clone()),
            None => Some(
                state_file
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(JOURNAL_FILE),
            ),
        }
    }

    /// Every key with its effective value and source, in [`KEYS`] order. Nothing among
    /// the settings is secret: key files are paths (their contents are never shown), and
    /// credentials are not settings (they come from the AWS chain). Userinfo in the URL
    /// (`user:password@`), which narflow does not use, is shown as `***@` all the same.
    pub fn entries(&self) -> Vec<Entry> {
        let url_key = self
            .url
            .as_ref()
            .is_some_and(|u| u.param("secret-key").is_some());
        KEYS.iter()
            .map(|key| {
                let mut source = self.source(key.name).to_string();
                if key.name == "key-file" && url_key && !source.starts_with("url:") {
                    // Both give keys: the setting's, then the URL's.
                    source.push_str(" + url:secret-key=");
                }
                Entry {
                    key: key.name,
                    value: (key.show)(self),
                    source,
                }
            })
            .collect()
    }
}
