//! Pushing store paths to a binary cache: a staged pipeline over bounded channels.
//!
//! ```text
//! plan ─► Feeder ─jobs─► walk (2 threads) ─chunks─► hash ─► compress (rayon, --jobs) ─chunks─► sink ─results─► publish ─settled─► caller
//!         topo order     NAR, fixed-size   NarHash  one zstd frame / xz stream,         reorder,          narinfo waves
//!         skip present   chunks                     small paths first                   FileHash, upload  (closure order)
//! ```
//!
//! [`stream`] runs these stages for as long as its caller feeds them: they stay up
//! between jobs, and each job comes out as a [`Settled`] as soon as its narinfo is
//! durable. [`upload_after`] (and so [`upload`] and [`push`]) is one submission to a
//! pipeline that ends with it; the daemon keeps one fed.
//!
//! Each stage (`walk.rs`, `compress.rs`, `sink.rs`, `publish.rs`) owns its threads and
//! statistics and is started with its input and output channels; [`stage::Running::finish`]
//! waits for it to drain and returns its [`StageStats`]. One [`stage::Stop`] is checked by
//! every stage: a cancel or a failed publish stops them all mid-NAR, and a job the cache
//! fails is dropped by every stage at once.
//!
//! This file is the one place that wires the stages and sets every capacity. Memory is
//! bounded by [`PushOptions::memory`]: each chunk of NAR data holds a permit of that budget
//! from the moment the walker starts filling it until the sink has written it, so peak
//! memory does not depend on NAR size. CPU work runs on the walker threads and the rayon
//! pool; the publisher (a thread of its own) only writes narinfos and syncs.
//!
//! Invariants, in the order a path goes through them:
//! 1. its NAR is read once: NAR → NarHash → chunks → compressed frames → FileHash → cache;
//! 2. a NarHash or NarSize that differs from the store's refuses the path (corrupt store),
//!    and the upload is aborted, so nothing is published for it;
//! 3. its narinfo is written only after its NAR is durable, and only once every reference
//!    has been seen: in the cache by the plan's one look, or published durably by this run;
//!    a path refused or failed fails every path that refers to it, transitively;
//! 4. a narinfo the cache has already is merged, never blindly replaced
//!    ([`crate::cache::merge_narinfo`]): its signatures stay, and ours are added to it.

pub mod budget;
pub mod buffers;
pub mod compress;
pub mod lanes;
pub mod publish;
pub mod sink;
pub mod stage;
pub mod stats;
pub mod walk;

pub use publish::{NewJob, OnPublishError, Settled};

use crate::cache::BinaryCache;
use crate::format::hash::Sha256;
use crate::format::signing::SigningKey;
use crate::format::store_path::StorePath;
use crate::store::{LocalStore, PathInfo, StoreError};
use compress::CompressionSettings;
use stats::StageStats;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The budget's default and overhead, and the default chunk size: the memory budget's
/// ([`crate::memory`]), which splits `--memory` for every user.
pub use crate::memory::{DEFAULT_CHUNK_SIZE, DEFAULT_MEMORY, MEMORY_OVERHEAD};

/// Walker threads: two, so one can read files while the other waits on the disk or on a
/// permit; more would only add memory, since one walker outruns two compressors.
const WALKERS: usize = 2;

/// Jobs queued ahead of the walkers: a job is one path's info, and a short queue keeps the
/// plan order (references first) close to the upload order.
const JOB_QUEUE: usize = 2 * WALKERS;

/// Chunks queued between the walkers and the hash stage (in each of its two lanes, see
/// [`lanes`]), and between it and the compress dispatcher. Memory is bounded by the
/// budget, not by this; it only decouples stages.
const CHUNK_QUEUE: usize = 8;

/// Compressed chunks queued for the sink, in each of its two lanes. Bounded by the budget
/// too; a full lane only pauses a compressor until the sink catches up.
const COMPRESSED_QUEUE: usize = 64;

/// Finished jobs queued for the publisher: small messages; the bound only matters while the
/// publisher syncs, and then it pauses the sink rather than growing.
const RESULT_QUEUE: usize = 1024;

/// Settled paths queued for the caller: small messages; a caller that falls behind
/// (recording results durably) pauses the publisher rather than letting them pile up.
const SETTLED_QUEUE: usize = 1024;

/// What to push and how.
#[derive(Debug)]
pub struct PushOptions {
    pub compression: CompressionSettings,
    /// Our signatures are added to the ones the store has. Empty means unsigned (the CLI
    /// only allows that with `--unsigned`).
    pub keys: Vec<SigningKey>,
    /// Push the closure of the requested paths (default), or only the paths themselves
    /// (their references must then already be in the cache).
    pub closure: bool,
    /// Compression threads (the rayon pool's size).
    pub jobs: usize,
    /// Memory budget for NAR data in flight, in bytes.
    pub memory: u64,
    /// Chunk size in bytes (one compressed frame each).
    pub chunk_size: usize,
    /// Set to stop the push early (the daemon's shutdown).
    pub cancel: Cancel,
    /// Write each uploaded path's `<hash part>.ls` listing before its narinfo (the URL's
    /// `write-nar-listing=1`).
    pub nar_listing: bool,
    /// Upload bandwidth cap in bytes per second (`--max-rate`), enforced by the cache.
    pub max_rate: Option<u64>,
    /// Upload each published path's build log as `log/<drv name>` (`--upload-logs`).
    pub upload_logs: bool,
}

impl PushOptions {
    /// Defaults: closure, one compression thread per core ([`crate::memory::default_jobs`]),
    /// [`DEFAULT_MEMORY`], [`DEFAULT_CHUNK_SIZE`].
    pub fn new(compression: CompressionSettings, keys: Vec<SigningKey>) -> Self {
        PushOptions {
            compression,
            keys,
            closure: true,
            jobs: crate::memory::default_jobs(),
            memory: DEFAULT_MEMORY,
            chunk_size: DEFAULT_CHUNK_SIZE,
            cancel: Cancel::new(),
            nar_listing: false,
            max_rate: None,
            upload_logs: false,
        }
    }
    /// What the cache's constructor is given: its share of the memory budget
    /// ([`crate::memory::Budget::cache_share`]) and `s3`, the S3 tuning.
    pub fn cache_options(&self, s3: crate::cache::S3Tuning) -> crate::cache::OpenOptions {
        crate::cache::OpenOptions {
            upload_memory: crate::memory::Budget::cache_share(self.memory),
            max_rate: self.max_rate,
            s3,
        }
    }
}

/// What happened to one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Uploaded {
        nar_size: u64,
        file_size: u64,
    },
    /// Its narinfo was in the cache already.
    AlreadyPresent,
    Failed(Failure),
}

/// Whether retrying a failed path can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The same attempt may succeed later: a network error, a timeout, a cache that is
    /// busy, an upload cancelled by a shutdown.
    Transient,
    /// Retrying as it is cannot help until someone acts: a corrupt store path, access
    /// denied, a missing bucket, a path that is not in the store.
    Permanent,
}

/// What kind of thing went wrong with one path (a stable label for metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    /// The path could not be read from the store, or is not (or no longer) valid there.
    Store,
    /// The store's copy does not match its registration (NarHash, NarSize).
    Corrupt,
    /// The cache refused or failed a request.
    Cache,
    /// A path it references failed or is missing from the cache.
    Reference,
    /// The push was cancelled (a shutdown) before the path was finished.
    Cancelled,
    /// Anything else (an upload that returned no result).
    Other,
}

impl FailureKind {
    /// The label: `store`, `corrupt`, `cache`, `reference`, `cancelled`, `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Store => "store",
            FailureKind::Corrupt => "corrupt",
            FailureKind::Cache => "cache",
            FailureKind::Reference => "reference",
            FailureKind::Cancelled => "cancelled",
            FailureKind::Other => "other",
        }
    }
}

/// Why one path failed: what went wrong, with the values involved, and whether retrying
/// can help ([`Failure::retry`]). The `Display` text is the message users see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The path is not valid in the store (never built, or garbage-collected).
    #[error("{path} is not a valid path in the Nix store")]
    NotValid { path: String },
    /// Reading the path from the store failed (an I/O error, or it changed under us).
    #[error("{message}")]
    Read { message: String },
    /// The store's copy does not match its registration in the Nix database.
    #[error(
        "{path} is corrupt: its contents hash to {actual_hash} ({actual_size} bytes) but the \
         Nix database records {expected_hash} ({expected_size} bytes); not uploaded (repair \
         it with `nix-store --repair-path {path}`)"
    )]
    Corrupt {
        path: String,
        expected_hash: Sha256,
        expected_size: u64,
        actual_hash: Sha256,
        actual_size: u64,
    },
    /// The cache refused or failed a request: its error's text and retry class (a
    /// [`crate::cache::CacheError`] is not `Clone`). `context` says what was being done
    /// (`"writing the NAR: "`, or empty).
    #[error("{context}{message}")]
    Cache {
        context: &'static str,
        message: String,
        transient: bool,
    },
    /// A reference failed in this run; the path inherits its retry class.
    #[error("not published: its reference {reference} failed")]
    ReferenceFailed { reference: String, retry: Retry },
    /// A reference is neither in this run nor in the cache.
    #[error("its reference {reference} is not in the cache (push without --no-closure)")]
    ReferenceMissing { reference: String },
    /// Its references never became durable (a path the run lost).
    #[error("not published: its references never became durable")]
    ReferencesNotDurable,
    /// The push was cancelled (a shutdown) before the path was finished.
    #[error("{}", CANCELLED)]
    Cancelled,
    /// Anything else, described by its message, kind and retry class.
    #[error("{message}")]
    Other {
        message: String,
        kind: FailureKind,
        retry: Retry,
    },
}

impl Failure {
    /// A failure described only by a message, that may pass on a retry.
    pub fn transient(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure::Other {
            message: message.into(),
            kind,
            retry: Retry::Transient,
        }
    }
    /// A failure described only by a message, that needs someone to act.
    pub fn permanent(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure::Other {
            message: message.into(),
            kind,
            retry: Retry::Permanent,
        }
    }
    /// A cache error, classed by [`crate::cache::CacheError::is_transient`].
    pub fn from_cache(e: &crate::cache::CacheError) -> Self {
        Failure::Cache {
            context: "",
            message: e.to_string(),
            transient: e.is_transient(),
        }
    }
    /// What each path of a push that stopped with `e` failed of.
    pub fn from_push(e: &PushError) -> Self {
        Failure::Other {
            message: format!("{e:#}"),
            kind: e.kind(),
            retry: if e.is_transient() {
                Retry::Transient
            } else {
                Retry::Permanent
            },
        }
    }
    pub fn is_transient(&self) -> bool {
        self.retry() == Retry::Transient
    }
    /// Whether retrying can help.
    pub fn retry(&self) -> Retry {
        match self {
            // The path changed or vanished under us, or the disk hiccuped: the next look
            // may find it readable (a path that is gone for good is dropped by its caller).
            Failure::Read { .. } | Failure::Cancelled | Failure::ReferencesNotDurable => {
                Retry::Transient
            }
            Failure::NotValid { .. }
            | Failure::Corrupt { .. }
            | Failure::ReferenceMissing { .. } => Retry::Permanent,
            Failure::Cache { transient, .. } => {
                if *transient {
                    Retry::Transient
                } else {
                    Retry::Permanent
                }
            }
            Failure::ReferenceFailed { retry, .. } | Failure::Other { retry, .. } => *retry,
        }
    }
    /// The kind, for metrics and logs.
    pub fn kind(&self) -> FailureKind {
        match self {
            Failure::NotValid { .. } | Failure::Read { .. } => FailureKind::Store,
            Failure::Corrupt { .. } => FailureKind::Corrupt,
            Failure::Cache { .. } => FailureKind::Cache,
            Failure::ReferenceFailed { .. }
            | Failure::ReferenceMissing { .. }
            | Failure::ReferencesNotDurable => FailureKind::Reference,
            Failure::Cancelled => FailureKind::Cancelled,
            Failure::Other { kind, .. } => *kind,
        }
    }
}

/// Asks a running push to stop: stages stop early, unfinished uploads are aborted, nothing
/// more is published, and the paths not finished are reported as transient failures.
/// Clones share one flag.
#[derive(Debug, Clone, Default)]
pub struct Cancel(std::sync::Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The message of a path that a cancelled push did not finish.
pub const CANCELLED: &str = "not finished: the upload was cancelled (shutdown)";

#[derive(Debug, Clone)]
pub struct PathResult {
    /// The full path as the user would name it.
    pub path: String,
    pub outcome: Outcome,
}

/// The result of a push: one entry per path considered, in processing order.
#[derive(Debug, Default)]
pub struct PushReport {
    pub results: Vec<PathResult>,
    pub nar_bytes: u64,
    pub file_bytes: u64,
    pub elapsed: Duration,
    /// Per-stage statistics of the upload phase (empty when nothing was uploaded).
    pub stages: Vec<StageStats>,
    /// Paths asked for that are not valid in the store (never built, or garbage-collected);
    /// each is also in `results` as failed.
    pub not_valid: Vec<String>,
}

impl PushReport {
    pub fn failed(&self) -> impl Iterator<Item = &PathResult> {
        self.results
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
    }
    pub fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|r| f(&r.outcome)).count()
    }
}

/// Receives progress from a push. Called from the pushing thread.
pub trait Progress: Send + Sync {
    /// The plan: how many paths will be uploaded and their total NAR size.
    fn planned(&self, _paths: usize, _nar_bytes: u64) {}
    /// NAR bytes written to the cache (called often; keep it cheap).
    fn nar_bytes(&self, _bytes: u64) {}
    /// A path finished (uploaded, skipped or failed).
    fn finished(&self, _result: &PathResult) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// Errors that stop a whole push (per-path failures are in [`PushReport`] instead).
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PushError {
    /// What kind of failure this is for each path of the push.
    pub fn kind(&self) -> FailureKind {
        match self {
            PushError::Cache(_) => FailureKind::Cache,
            PushError::Store(_) => FailureKind::Store,
        }
    }
    /// True when the same push may succeed later (the cache or store was unreachable or
    /// busy); false when someone must act first (bad credentials, missing bucket, wrong
    /// StoreDir, a corrupt store database).
    pub fn is_transient(&self) -> bool {
        match self {
            PushError::Cache(e) => e.is_transient(),
            PushError::Store(e) => e.is_transient(),
        }
    }
}

/// Resolves a command-line argument to the store path it names: a store path, a path
/// inside one (`/nix/store/...-hello/bin/hello`), or a symlink to one (`./result`).
///
/// # Errors
/// A message naming the argument: missing, or outside the store.
pub fn resolve_argument(arg: &str, store_dir: &str) -> Result<StorePath, String> {
    let direct = StorePath::from_absolute_path_prefix(arg, store_dir);
    let path = match direct {
        Ok(p) => p,
        Err(_) => {
            let real = std::fs::canonicalize(arg).map_err(|e| format!("{arg}: {e}"))?;
            let real = real
                .to_str()
                .ok_or_else(|| format!("{arg}: not a UTF-8 path"))?;
            StorePath::from_absolute_path_prefix(real, store_dir)
                .map_err(|e| format!("{arg}: {e}"))?
        }
    };
    check_exists(&path, store_dir)?;
    Ok(path)
}

/// Checks that `path` exists in `store_dir` (without following a symlink).
///
/// # Errors
/// A message naming the full path: missing, or why it cannot be looked at.
pub fn check_exists(path: &StorePath, store_dir: &str) -> Result<(), String> {
    let full = path.to_absolute(store_dir);
    match std::fs::symlink_metadata(&full) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{full}: no such store path"))
        }
        Err(e) => Err(format!("{full}: {e}")),
    }
}

/// Pushes `paths` (and, with `opts.closure`, everything they reference) to `cache`.
///
/// # Errors
/// [`PushError`] when the run cannot go on at all (cache unusable, store unreadable);
/// a path that fails is reported in the [`PushReport`] and the rest go on.
pub fn push(
    store: &LocalStore,
    cache: &dyn BinaryCache,
    paths: &[StorePath],
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<PushReport, PushError> {
    let started = Instant::now();
    let store_dir = store.store_dir().to_owned();
    let mut report = PushReport::default();
    let record = |report: &mut PushReport, path: String, outcome: Outcome| {
        let r = PathResult { path, outcome };
        progress.finished(&r);
        report.results.push(r);
    };

    cache.ensure_cache_info(&store_dir)?;
    let plan = plan(store, cache, paths, opts)?;
    for path in plan.not_valid {
        report.not_valid.push(path.clone());
        let why = Failure::NotValid { path: path.clone() };
        record(&mut report, path, Outcome::Failed(why));
    }
    for p in &plan.present {
        record(
            &mut report,
            p.to_absolute(&store_dir),
            Outcome::AlreadyPresent,
        );
    }
    let uploaded = upload_after(cache, &store_dir, &plan.todo, &plan.seen, opts, progress)?;
    report.results.extend(uploaded.results);
    report.nar_bytes = uploaded.nar_bytes;
    report.file_bytes = uploaded.file_bytes;
    report.stages = uploaded.stages;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// What a push of some paths has to do, from one look at the store and one at the cache.
#[derive(Debug, Default)]
pub struct Plan {
    /// Paths asked for that are not valid in the store (full paths).
    pub not_valid: Vec<String>,
    /// Paths whose narinfo the cache has (now with our signatures), in plan order.
    pub present: Vec<StorePath>,
    /// What to upload, references first.
    pub todo: Vec<PathInfo>,
    /// The paths found in the cache: the references `todo` may name besides its own.
    pub seen: HashSet<StorePath>,
}

/// Plans pushing `paths` (and, with `opts.closure`, everything they reference): their
/// closure in topological order, what the cache has already (adding our signatures where
/// missing; a damaged narinfo is uploaded again), and what is left to upload.
///
/// # Errors
/// [`PushError`] when the store or the cache cannot be read.
pub fn plan(
    store: &LocalStore,
    cache: &dyn BinaryCache,
    paths: &[StorePath],
    opts: &PushOptions,
) -> Result<Plan, PushError> {
    let store_dir = store.store_dir().to_owned();
    let (valid, invalid) = split_valid(store, paths)?;
    let infos = if opts.closure {
        store.closure(&valid)?
    } else {
        crate::store::closure::topo_sort(store.path_infos(&valid)?)
    };

    // One look at the cache for the run's paths and, with --no-closure, the references
    // outside them: what it finds is what the publisher may refer to.
    let in_plan: HashSet<&StorePath> = infos.iter().map(|i| &i.path).collect();
    let mut asked: Vec<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
    let outside: std::collections::BTreeSet<&StorePath> = infos
        .iter()
        .flat_map(|i| i.references.iter())
        .filter(|r| !in_plan.contains(r))
        .collect();
    asked.extend(outside.into_iter().cloned());
    let mut seen: HashSet<StorePath> = asked
        .iter()
        .cloned()
        .zip(cache.has_narinfos(&asked)?)
        .filter(|(_, p)| *p)
        .map(|(p, _)| p)
        .collect();
    let present: Vec<&PathInfo> = infos.iter().filter(|i| seen.contains(&i.path)).collect();
    let damaged = add_our_signatures(cache, &store_dir, &present, opts)?;
    for p in &damaged {
        seen.remove(p);
    }
    let mut plan = Plan {
        not_valid: invalid.into_iter().map(|(p, _)| p).collect(),
        ..Plan::default()
    };
    for info in infos {
        if seen.contains(&info.path) {
            plan.present.push(info.path);
        } else {
            plan.todo.push(info);
        }
    }
    plan.seen = seen;
    Ok(plan)
}

/// The jobs that upload `todo` (references first) given `seen`, the paths found in the
/// cache, and the paths of `todo` refused before any upload (a reference neither in
/// `todo` nor seen, or refused itself), with why, by index into `todo`.
pub fn jobs_for(
    todo: &[PathInfo],
    seen: &HashSet<StorePath>,
    store_dir: &str,
) -> (Vec<NewJob>, Vec<(usize, Failure)>) {
    let refused = refuse_unreachable(todo, seen, store_dir);
    let mut skip = vec![false; todo.len()];
    for (i, _) in &refused {
        skip[*i] = true;
    }
    let in_run: HashSet<&StorePath> = todo.iter().map(|i| &i.path).collect();
    let jobs = todo
        .iter()
        .zip(&skip)
        .filter(|(_, skip)| !**skip)
        // A reference in the run is waited for; the others are seen (the refusal took
        // out every path with a reference that is neither).
        .map(|(info, _)| NewJob::waiting_for(info.clone(), |r| in_run.contains(r)))
        .collect();
    (jobs, refused)
}

/// Gives the narinfos the cache already has for `present` the signatures of our keys
/// they lack (merged under the cache's rule, so the signatures there stay). A narinfo for
/// another NAR of the path is left alone: our keys vouch only for the NAR in our store.
/// Returns the paths whose narinfo turned out damaged (it does not parse, or its NAR is
/// missing or short): they are uploaded again.
///
/// # Errors
/// [`PushError::Cache`] when the cache cannot be read or written.
fn add_our_signatures(
    cache: &dyn BinaryCache,
    store_dir: &str,
    present: &[&PathInfo],
    opts: &PushOptions,
) -> Result<Vec<StorePath>, PushError> {
    if opts.keys.is_empty() || present.is_empty() {
        return Ok(Vec::new());
    }
    let paths: Vec<StorePath> = present.iter().map(|i| i.path.clone()).collect();
    let ours: Vec<_> = opts.keys.iter().map(|k| k.verifying_key()).collect();
    let mut damaged = Vec::new();
    let mut resign = Vec::new();
    for (info, text) in present.iter().zip(cache.get_narinfos(&paths)?) {
        let old = text
            .as_deref()
            .and_then(|t| crate::format::narinfo::NarInfo::parse(t, store_dir).ok())
            .filter(|o| o.store_path == info.path);
        let Some(mut old) = old else {
            damaged.push(info.path.clone());
            continue;
        };
        let same_nar = (old.nar_hash, old.nar_size, &old.references)
            == (info.nar_hash, info.nar_size, &info.references);
        let signed = ours
            .iter()
            .all(|k| old.valid_signatures(store_dir, std::slice::from_ref(k)) > 0);
        if !same_nar || signed {
            continue;
        }
        if !crate::cache::nar_intact(cache, &old)? {
            damaged.push(info.path.clone());
            continue;
        }
        for key in &opts.keys {
            old.sign(key, store_dir);
        }
        resign.push(old);
    }
    let paths: Vec<StorePath> = resign.iter().map(|n| n.store_path.clone()).collect();
    let mut signed = 0;
    for (path, r) in paths
        .into_iter()
        .zip(cache.publish_narinfos(store_dir, resign)?)
    {
        match r {
            Ok(_) => signed += 1,
            // Its NAR went missing meanwhile: uploaded again, like any damaged one.
            Err(e) => {
                tracing::warn!("{}: {e}", cache.url());
                damaged.push(path);
            }
        }
    }
    if signed > 0 {
        tracing::info!("added our signatures to {signed} narinfos already in the cache");
    }
    Ok(damaged)
}

/// [`upload_after`] for a run whose every reference is in `infos`.
///
/// # Errors
/// As [`upload_after`].
pub fn upload(
    cache: &dyn BinaryCache,
    store_dir: &str,
    infos: &[PathInfo],
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<PushReport, PushError> {
    upload_after(cache, store_dir, infos, &HashSet::new(), opts, progress)
}

/// Uploads planned paths (in an order where references come first) and publishes their
/// narinfos. The store is not consulted: `infos` are trusted for NarHash, NarSize and
/// references. `narflow bench` calls this directly with synthetic store paths.
///
/// `seen` are the paths found in the cache: a reference must be one of them or in
/// `infos`. A path with a reference that is neither, or that refers to a path refused or
/// failed, is not uploaded or published (refusals propagate to every referrer).
///
/// This is one submission to a [`stream`] pipeline that ends with it.
///
/// # Errors
/// [`PushError::Cache`] when publishing fails; per-path failures are in the report.
pub fn upload_after(
    cache: &dyn BinaryCache,
    store_dir: &str,
    infos: &[PathInfo],
    seen: &HashSet<StorePath>,
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<PushReport, PushError> {
    let started = Instant::now();
    let mut report = PushReport::default();
    progress.planned(infos.len(), infos.iter().map(|i| i.nar_size).sum());
    if infos.is_empty() {
        return Ok(report);
    }
    let (jobs, refused) = jobs_for(infos, seen, store_dir);
    for (i, why) in refused {
        let r = PathResult {
            path: infos[i].path.to_absolute(store_dir),
            outcome: Outcome::Failed(why),
        };
        progress.finished(&r);
        report.results.push(r);
    }
    let (_, stages) = stream(
        cache,
        store_dir,
        opts,
        progress,
        OnPublishError::Halt,
        |feeder, settled| {
            std::thread::scope(|s| {
                s.spawn(move || feeder.submit(jobs));
                for done in settled {
                    if let Outcome::Uploaded {
                        nar_size,
                        file_size,
                    } = done.result.outcome
                    {
                        report.nar_bytes += nar_size;
                        report.file_bytes += file_size;
                    }
                    report.results.push(done.result);
                }
            });
        },
    )?;
    report.stages = stages;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The submitting side of a [`stream`] pipeline. Dropping it (every clone) closes the
/// pipeline's input: the stages finish the jobs in flight and end.
#[derive(Debug, Clone)]
pub struct Feeder<'p> {
    book: &'p std::sync::Mutex<publish::Book>,
    jobs: crossbeam_channel::Sender<std::sync::Arc<stage::Job>>,
    stop: stage::Stop,
}

impl Feeder<'_> {
    /// Submits `jobs`, in an order where each comes after the jobs it waits for (earlier
    /// submissions count). All are registered with the publisher first, then sent in one
    /// by one; this blocks while the pipeline is full. A path with a job unsettled already
    /// is not submitted again: that job's [`Settled`] covers it. Returns how many jobs went
    /// in; after a stop the rest are settled as cancelled.
    pub fn submit(&self, jobs: Vec<NewJob>) -> usize {
        let jobs = self
            .book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register(jobs);
        let mut sent = 0;
        for job in jobs {
            if self.stop.is_stopped() || self.jobs.send(job).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    }

    /// What the publisher remembers: (known, failed, waited-for) paths.
    #[cfg(test)]
    fn remembered(&self) -> (usize, usize, usize) {
        self.book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remembered()
    }

    /// Jobs submitted and not yet settled.
    pub fn unsettled(&self) -> usize {
        self.book
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unsettled()
    }
}

/// Runs a long-lived pipeline for as long as `body` runs: `body` (on the calling thread)
/// submits jobs through its [`Feeder`] and takes each job's [`Settled`] from the receiver
/// as soon as that job's narinfo is durable (or it failed). The stages stay up between
/// jobs, so a path submitted while a large NAR uploads goes in at once, within the memory
/// budget. Once `body` has returned (and so dropped the feeder), the stages finish what is
/// in flight and end; their statistics are returned with `body`'s result.
///
/// # Errors
/// [`PushError::Cache`] when the capacities or threads cannot be set up, and with
/// [`OnPublishError::Halt`] when publishing fails (the run is stopped).
pub fn stream<R>(
    cache: &dyn BinaryCache,
    store_dir: &str,
    opts: &PushOptions,
    progress: &dyn Progress,
    on_error: OnPublishError,
    body: impl FnOnce(Feeder<'_>, crossbeam_channel::Receiver<Settled>) -> R,
) -> Result<(R, Vec<StageStats>), PushError> {
    let config = |e: String| PushError::Cache(crate::cache::CacheError::Config(e));
    let caps = Capacities::new(opts, cache.upload_concurrency())
        .map_err(|e| config(format!("--memory {e}")))?;
    let stop = stage::Stop::new(opts.cancel.clone());
    let budget = budget::ByteBudget::new(caps.chunk_memory);
    let buffers = buffers::BufferPool::new(caps.free_buffers, opts.chunk_size);
    let compress = compress::CompressStage::new(
        caps.compress_jobs,
        opts.compression,
        buffers.clone(),
        stop.clone(),
    )
    .map_err(|e| config(format!("starting threads: {e}")))?;
    let walk = walk::WalkStage {
        store_dir,
        chunk_size: opts.chunk_size,
        budget,
        pool: buffers.clone(),
        stop: stop.clone(),
        nar_listing: opts.nar_listing,
        walkers: caps.walkers,
    };
    let sink = sink::SinkStage {
        cache,
        store_dir,
        opts,
        progress,
        finishers: caps.finishers,
        buffers,
        stop: stop.clone(),
    };
    let book = std::sync::Mutex::new(publish::Book::default());
    let publish = publish::PublishStage {
        cache,
        store_dir,
        progress,
        stop: stop.clone(),
        book: &book,
        on_error,
    };

    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(caps.job_queue);
    let (chunk_tx, chunk_rx) = lanes::bounded(caps.chunk_queue);
    let (hashed_tx, hashed_rx) = crossbeam_channel::bounded(caps.chunk_queue);
    let (comp_tx, comp_rx) = lanes::bounded(caps.compressed_queue);
    let handoff = crossbeam_channel::bounded(caps.finishers);
    let (res_tx, res_rx) = crossbeam_channel::bounded(caps.result_queue);
    let (settled_tx, settled_rx) = crossbeam_channel::bounded(caps.settled_queue);

    let (out, stages, published) = std::thread::scope(|s| {
        let walking = walk.spawn(s, jobs_rx, chunk_tx);
        let hashing = walk::spawn_hash(s, &walk.stop, chunk_rx, hashed_tx);
        let compressing = compress.spawn(s, hashed_rx, comp_tx);
        let sinking = sink.spawn(s, comp_rx, handoff, res_tx);
        let publishing = s.spawn(|| publish.run(res_rx, settled_tx));
        let feeder = Feeder {
            book: &book,
            jobs: jobs_tx,
            stop: stop.clone(),
        };
        let out = body(feeder, settled_rx);
        // The input is closed (the feeder went with `body`): each stage drains in turn,
        // upstream first, and the publisher settles what is left.
        let stages = vec![
            walking.finish(),
            hashing.finish(),
            compressing.finish(),
            sinking.finish(),
        ];
        let published = publishing
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (out, stages, published)
    });
    published?;
    Ok((out, stages))
}

/// Every capacity of one run, derived in one place from the options. The `--memory`
/// budget's shares come from [`crate::memory::Budget::split`]: the cache's half, one
/// compression output buffer per compressing thread, and the chunk budget (NAR chunks held
/// from the walker to the sink, each charged the whole buffer it holds,
/// [`buffers::BufferPool::charge`]).
///
/// Every queue between stages is bounded by its length here, and the bytes in it by the
/// chunk budget, so peak memory is the budget plus [`MEMORY_OVERHEAD`], whatever the NAR
/// sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacities {
    /// Bytes of NAR data in flight between the walkers and the sink (the chunk budget).
    pub chunk_memory: u64,
    /// Free chunk buffers kept for reuse.
    pub free_buffers: usize,
    /// Compression threads.
    pub compress_jobs: usize,
    /// Walker threads.
    pub walkers: usize,
    /// Threads committing finished uploads (and the hand-off queue to them).
    pub finishers: usize,
    /// Jobs queued ahead of the walkers.
    pub job_queue: usize,
    /// Chunks queued walker → hash and hash → compress.
    pub chunk_queue: usize,
    /// Compressed chunks queued for the sink.
    pub compressed_queue: usize,
    /// Finished jobs queued for the publisher.
    pub result_queue: usize,
    /// Settled paths queued for the caller.
    pub settled_queue: usize,
}

impl Capacities {
    /// The capacities for `opts`, with a cache that hides its latency with
    /// `cache_concurrency` requests at once.
    ///
    /// # Errors
    /// [`crate::memory::TooSmall`] when the budget cannot hold one chunk and one
    /// compression output beside the cache's share (settings refuse such a budget first).
    pub fn new(
        opts: &PushOptions,
        cache_concurrency: usize,
    ) -> Result<Self, crate::memory::TooSmall> {
        let budget = crate::memory::Budget::new(
            opts.memory,
            opts.chunk_size,
            &crate::memory::CacheNeed::default(),
        )?;
        let split = budget.split(opts.jobs);
        let (chunk_memory, compress_jobs) = (split.chunks, split.compress_jobs);
        let out = split.output_buffer;
        Ok(Capacities {
            chunk_memory,
            // As many pooled chunks as the budget admits (each is charged a whole pooled
            // buffer), plus one output buffer per compressing thread: every pooled buffer
            // alive at once, so none is freed mid-run.
            free_buffers: (chunk_memory / out) as usize + compress_jobs,
            compress_jobs,
            walkers: WALKERS,
            // As many uploads committing at once as the cache says hide its per-request
            // latency (1 for a local directory, where a commit is a rename); each holds
            // only its upload's buffers, which the cache's share bounds.
            finishers: cache_concurrency.max(1),
            job_queue: JOB_QUEUE,
            chunk_queue: CHUNK_QUEUE,
            compressed_queue: COMPRESSED_QUEUE,
            result_queue: RESULT_QUEUE,
            settled_queue: SETTLED_QUEUE,
        })
    }
}

/// The paths of `infos` that cannot be published, with why: a reference neither in
/// `infos` nor `seen` in the cache, or a reference refused itself (transitively).
fn refuse_unreachable(
    infos: &[PathInfo],
    seen: &HashSet<StorePath>,
    store_dir: &str,
) -> Vec<(usize, Failure)> {
    let index: HashMap<&StorePath, usize> = infos
        .iter()
        .enumerate()
        .map(|(i, p)| (&p.path, i))
        .collect();
    let mut refused: HashMap<usize, Failure> = HashMap::new();
    // Until nothing changes, so the order of `infos` does not matter.
    loop {
        let before = refused.len();
        for (i, info) in infos.iter().enumerate() {
            if refused.contains_key(&i) {
                continue;
            }
            let why = info
                .references
                .iter()
                .filter(|r| **r != info.path)
                .find_map(|r| match index.get(r) {
                    Some(j) => refused.get(j).map(|f| Failure::ReferenceFailed {
                        reference: r.to_absolute(store_dir),
                        retry: f.retry(),
                    }),
                    None if seen.contains(r) => None,
                    None => Some(Failure::ReferenceMissing {
                        reference: r.to_absolute(store_dir),
                    }),
                });
            if let Some(why) = why {
                refused.insert(i, why);
            }
        }
        if refused.len() == before {
            break;
        }
    }
    let mut out: Vec<(usize, Failure)> = refused.into_iter().collect();
    out.sort_by_key(|(i, _)| *i);
    out
}

/// Paths valid in the store, and (full path, reason) for those that are not.
pub type ValidSplit = (Vec<StorePath>, Vec<(String, String)>);

/// Splits `paths` into those valid in the store (sorted, each once) and those that are
/// not (full path, reason): never built, or garbage-collected since.
///
/// # Errors
/// [`StoreError`] when the store cannot be read at all.
pub fn split_valid(store: &LocalStore, paths: &[StorePath]) -> Result<ValidSplit, StoreError> {
    let mut valid: Vec<StorePath> = paths.to_vec();
    valid.sort();
    valid.dedup();
    let mut invalid = Vec::new();
    loop {
        match store.path_infos(&valid) {
            Ok(_) => return Ok((valid, invalid)),
            Err(StoreError::NotValid(full)) => {
                let before = valid.len();
                valid.retain(|p| p.to_absolute(store.store_dir()) != full);
                if valid.len() == before {
                    return Err(StoreError::NotValid(full));
                }
                invalid.push((
                    full.clone(),
                    format!("{full} is not a valid path in the Nix store"),
                ));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod faults;
#[cfg(test)]
mod tests;
