//! `narflow backfill`: uploading a whole store (or the closures of named paths) to a cache
//! in bounded windows, resumably.
//!
//! Owns the walk and its bookkeeping: which paths go into each window, what is skipped
//! (already in the cache, signed by an upstream key, served by an upstream cache), the
//! check that every reference of a window is available, and the cursor in the state file
//! ([`state`]). Uploading is the pipeline's: one [`pipeline::stream`] runs for the whole
//! backfill, and this module never walks NARs or writes cache objects itself.
//!
//! Overlap: window N+1 is planned and submitted while window N uploads, so the pipeline
//! does not drain after each window. A path submitted and not yet settled is *in flight*:
//! it counts as available to the next window's pull-in and reference check, and its
//! referrers wait for it ([`pipeline::publish::NewJob::waits_for`]; if it fails, the publisher
//! refuses them). At most two windows are in flight (the one uploading and the one being
//! submitted): a window is planned only once the window two before it has settled. The
//! cursor passes a window only once it and every earlier window have settled.
//!
//! Order: Nix assigns `ValidPaths.id` as it registers paths and a path cannot be valid
//! before its references, so id order is nearly topological. The exceptions
//! (`nix-store --register-validity` registers one batch in store-path order, so a
//! referrer may get a lower id than its reference) and references left out of the
//! selection (a `.drv` without `--derivations`, a path older than `--since`) are found
//! per window: a reference that is neither in the window nor available (in the cache,
//! uploaded or skipped earlier in this run) has its closure pulled into the window, and
//! the walk later finds those paths present. Nothing sorts the whole store.
//!
//! Memory: two windows of path infos and in-flight paths at a time (`window` paths each,
//! plus what a window pulls in), the ids of one window's paths and references (or of one
//! group's closure), one bit per `ValidPaths.id` for what this run settled or found in
//! the cache, and the cache's listing when it was listed (20 bytes a narinfo): nothing
//! else grows with the store ([`available`]).
//!
//! - [`walk`]: the store's or the named paths' windows, and the cursor each moves to;
//! - [`window`]: one window's pull-in, skips, presence check and jobs;
//! - [`run`]: the windows in flight, settled paths, the summary and the state's saves;
//! - [`available`]: what is known available to referrers;
//! - [`state`]: the state file.

pub mod available;
mod run;
pub mod state;
mod walk;
mod window;

use crate::cache::{BinaryCache, CacheError};
use crate::format::store_path::StorePath;
use crate::pipeline::outcome::{PathResult, UploadedBytes};
use crate::pipeline::publish::NewJob;
use crate::pipeline::{self, PushOptions};
use crate::store::{LocalStore, StoreError};
use run::{Lane, Position, Run, WindowProgress};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Paths per window: large enough that a window's one store read, its cache lookups and
/// its publish waves (512 narinfos each) are amortised, small enough that its path infos
/// and results stay around a megabyte and a kill costs at most one window of re-checks.
pub const DEFAULT_WINDOW: usize = 2000;

/// Above this many paths to check, the cache (and each upstream) is listed once instead
/// of asked per path: a listing costs one request per 1,000 narinfos of the whole cache,
/// asking costs one request per path, and below one window the listing of a large cache
/// would cost more than the questions it saves.
pub const LIST_ABOVE: u64 = DEFAULT_WINDOW as u64;

/// What to backfill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every valid path, or those registered at or after `since` (seconds since the epoch,
    /// UTC), walked in registration order.
    Store { since: Option<i64> },
    /// The closures of these paths, taken `window` named paths at a time.
    Paths(Vec<StorePath>),
}

/// How to backfill, beyond the pipeline's [`PushOptions`].
#[derive(Debug, Clone)]
pub struct BackfillOptions {
    pub selection: Selection,
    /// Upload `.drv` files too (otherwise only those a selected path refers to).
    pub derivations: bool,
    /// Key names (`cache.nixos.org-1`): a path whose store signatures include one of them
    /// is skipped (it came from that cache).
    pub skip_signed_by: Vec<String>,
    /// The URLs of the upstream caches given (for the state's fingerprint; the caches
    /// themselves are passed to [`backfill`]).
    pub skip_upstream: Vec<String>,
    /// Count what would go up; upload nothing and write no state.
    pub dry_run: bool,
    /// Paths per window ([`DEFAULT_WINDOW`]).
    pub window: usize,
    /// The state file; `None`: start from the beginning and record nothing.
    pub state_file: Option<PathBuf>,
}

impl BackfillOptions {
    /// What the cursor depends on: the selection and every rule that decides what counts
    /// as done. A state file made under another fingerprint is not resumed from.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut signed: Vec<&str> = self.skip_signed_by.iter().map(String::as_str).collect();
        signed.sort_unstable();
        let mut upstream: Vec<&str> = self.skip_upstream.iter().map(String::as_str).collect();
        upstream.sort_unstable();
        let what = match &self.selection {
            Selection::Store { since: None } => "all".to_owned(),
            Selection::Store { since: Some(t) } => format!("since {t}"),
            Selection::Paths(paths) => {
                let mut h = sha2::Sha256::new();
                for p in paths {
                    h.update(p.base_name().as_bytes());
                    h.update(b"\n");
                }
                let d = h.finalize();
                let hex: String = d[..8].iter().map(|b| format!("{b:02x}")).collect();
                format!("{} paths {hex}", paths.len())
            }
        };
        format!(
            "{what}; derivations {}; skip-signed-by [{}]; skip-upstream [{}]",
            self.derivations,
            signed.join(" "),
            upstream.join(" ")
        )
    }
}

/// Why a path was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Its store signatures include a `--skip-signed-by` key.
    SignedBy,
    /// An upstream cache (`--skip-upstream`) serves its narinfo.
    Upstream,
}

/// Receives a backfill's progress. Called from the backfilling thread and the pipeline's.
pub trait BackfillProgress: Send + Sync {
    /// Paths (and their NAR bytes) the backfill expects to consider; called again when a
    /// walk over named paths learns of more.
    fn total(&self, _paths: u64, _nar_bytes: u64) {}
    /// `paths` more were settled (uploaded, present, skipped or failed) and taken in by
    /// the backfilling thread: the cursor has moved past them if it can (called from it).
    fn advanced(&self, _paths: u64) {}
    /// NAR bytes written to the cache.
    fn nar_bytes(&self, _bytes: u64) {}
    /// A path the pipeline finished (uploaded or failed).
    fn finished(&self, _result: &PathResult) {}
}

/// A [`BackfillProgress`] that ignores everything.
#[derive(Debug)]
pub struct NoProgress;
impl BackfillProgress for NoProgress {}

/// What a backfill did (or, dry, would do).
#[derive(Debug, Default)]
pub struct Summary {
    pub dry_run: bool,
    /// Uploaded (dry: would be uploaded).
    pub uploaded: u64,
    pub present: u64,
    pub skipped_signed_by: u64,
    pub skipped_upstream: u64,
    /// Paths that failed (each reported through [`BackfillProgress::finished`]).
    pub failed: u64,
    /// The first failures, with their cause.
    pub failures: Vec<PathResult>,
    /// Bytes uploaded (dry: the NAR bytes that would be).
    pub bytes: UploadedBytes,
    /// Paths a window pulled in because a reference of it was not available.
    pub pulled_in: u64,
    pub windows: u64,
    /// The cursor the run started from (from the state file), and where it ended.
    pub resumed_from: Option<i64>,
    pub cursor: i64,
    /// Whether the cache was listed (rather than asked per path).
    pub listed: bool,
    /// Build logs of the uploaded paths, with `--upload-logs`.
    pub logs: Option<crate::logs::LogReport>,
    pub elapsed: Duration,
}

/// Errors that stop a backfill (a path that fails is counted in [`Summary`] instead).
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("upstream cache {url}: {source}")]
    Upstream { url: String, source: CacheError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Push(#[from] pipeline::outcome::PushError),
}

/// Backfills `cache` from `store` as `opts` say, uploading with `push`; `upstreams` are the
/// `--skip-upstream` caches, opened read-only.
///
/// # Errors
/// [`BackfillError`] when the run cannot go on (the cache, an upstream, the store or the
/// state file is unusable); the cursor then stays where the last durable window left it.
pub fn backfill(
    store: &LocalStore,
    cache: &dyn BinaryCache,
    upstreams: &[&dyn BinaryCache],
    push: &PushOptions,
    opts: &BackfillOptions,
    progress: &dyn BackfillProgress,
) -> Result<Summary, BackfillError> {
    let started = Instant::now();
    if !opts.dry_run {
        cache.ensure_cache_info(store.store_dir())?;
    }
    let fingerprint = opts.fingerprint();
    let mut run = Run::new(store, cache, upstreams, push, opts, progress, &fingerprint);
    let resumed = match &opts.state_file {
        Some(path) => match state::load(path, cache.url())? {
            Some(s) if s.selection == fingerprint => Some(Position {
                cursor: s.cursor,
                within: s.within,
            }),
            Some(s) => {
                tracing::warn!(
                    "backfill state {} was for another selection ({}); starting over",
                    path.display(),
                    s.selection
                );
                None
            }
            None => None,
        },
        None => None,
    };
    run.summary.resumed_from = resumed.as_ref().map(|p| p.cursor);
    let cursor = resumed.unwrap_or_default();
    (run.cursor, run.saved) = (cursor.clone(), cursor.clone());
    if opts.dry_run {
        run.walk(&cursor)?;
        run.drain()?;
    } else {
        let window_progress = WindowProgress(progress);
        let (walked, _stages) = pipeline::stream(
            cache,
            store.store_dir(),
            push,
            &window_progress,
            pipeline::publish::OnPublishError::Halt,
            |feeder, settled| {
                std::thread::scope(|s| {
                    // One window waiting for the submitter: the walk sends a window only
                    // once the one two before it has settled, so this never holds more
                    // than the two windows that may be in flight.
                    let (tx, rx) = crossbeam_channel::bounded::<Vec<NewJob>>(1);
                    // Submitting blocks while the pipeline is full; on a thread of its own,
                    // the walk meanwhile plans the next window and takes settled paths.
                    s.spawn(move || {
                        for jobs in rx {
                            feeder.submit(jobs);
                        }
                    });
                    run.lane = Some(Lane { tx, settled });
                    let walked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run.walk(&cursor)
                    }));
                    let walked = walked.unwrap_or_else(|p| {
                        // Closing both ends lets the submitter and the pipeline end, so
                        // the scope can join them and the panic goes on.
                        run.lane = None;
                        std::panic::resume_unwind(p)
                    });
                    let drained = run.drain();
                    walked.and(drained)
                })
            },
        )?;
        walked?;
    }
    run.summary.elapsed = started.elapsed();
    Ok(run.summary)
}

/// The 20 bytes a store path's hash part stands for: the key of every availability set.
pub fn hash_key(path: &StorePath) -> [u8; 20] {
    crate::cache::NarinfoSet::key(path)
}

#[cfg(test)]
mod tests;
