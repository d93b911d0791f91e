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
//! plus what a window pulls in), and one set of 20-byte hash parts of the paths known to
//! be available (the cache's listing when it was listed, plus what this run uploaded or
//! skipped): about 40 bytes per path, 4 MiB for 100,000.

pub mod state;

use crate::cache::{BinaryCache, CacheError};
use crate::format::store_path::StorePath;
use crate::pipeline::outcome::{Failure, Outcome, PathResult, UploadedBytes};
use crate::pipeline::publish::{NewJob, Settled};
use crate::pipeline::{self, PushOptions};
use crate::store::{LocalStore, PathInfo, StoreError};
use crossbeam_channel::{Receiver, Sender};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
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

/// Failures kept with their cause for the summary; beyond these only the count grows.
const FAILURES_KEPT: usize = 100;

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
    let mut run = Run {
        store,
        cache,
        upstreams,
        push,
        opts,
        progress,
        store_dir: store.store_dir().to_owned(),
        available: HashMap::new(),
        listed: false,
        upstream_sets: upstreams.iter().map(|_| None).collect(),
        failed: HashSet::new(),
        in_flight: HashMap::new(),
        marks: VecDeque::new(),
        lane: None,
        next_seq: 0,
        halted: false,
        pinned: false,
        cursor: Position::default(),
        saved: Position::default(),
        summary: Summary {
            dry_run: opts.dry_run,
            ..Summary::default()
        },
    };
    let fingerprint = opts.fingerprint();
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

fn is_drv(path: &StorePath) -> bool {
    path.name().ends_with(".drv")
}

/// A digest of a group's closure in walk order: 16 hex digits of SHA-256 over its base
/// names.
fn closure_digest(closure: &[PathInfo]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for i in closure {
        h.update(i.path.base_name().as_bytes());
        h.update(b"\n");
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Run<'a> {
    store: &'a LocalStore,
    cache: &'a dyn BinaryCache,
    upstreams: &'a [&'a dyn BinaryCache],
    push: &'a PushOptions,
    opts: &'a BackfillOptions,
    progress: &'a dyn BackfillProgress,
    store_dir: String,
    /// Hash parts of paths known to be in the cache or skipped (so available to their
    /// referrers): the cache's listing when `listed`, and whatever this run found. True
    /// for a path this run settled (counted already in the summary).
    available: HashMap<[u8; 20], bool>,
    /// `available` holds the cache's listing: a path not in it is not in the cache.
    listed: bool,
    /// Each upstream's listing, when it was listed.
    upstream_sets: Vec<Option<HashSet<[u8; 20]>>>,
    /// Paths that failed in this run: their referrers are refused rather than pulling
    /// them in again in every window.
    failed: HashSet<StorePath>,
    /// Paths submitted to the pipeline and not settled yet, with the window (its number,
    /// [`Mark::seq`]) they belong to. They count as available to later windows, whose
    /// jobs wait for them.
    in_flight: HashMap<StorePath, u64>,
    /// The windows not yet passed by the cursor, oldest first: those in flight, and
    /// settled ones behind an unsettled one.
    marks: VecDeque<Mark>,
    /// The pipeline's two ends; `None` in a dry run.
    lane: Option<Lane>,
    /// The next window's [`Mark::seq`].
    next_seq: u64,
    /// The pipeline ended early (a publish failed and halted it): the walk stops, and
    /// [`pipeline::stream`] returns the error.
    halted: bool,
    /// A window with a failed path has been passed: the cursor stays where it was.
    pinned: bool,
    /// Where the cursor is (everything below it durable or skipped), and where the state
    /// file last put it.
    cursor: Position,
    saved: Position,
    summary: Summary,
}

/// Where the cursor is: [`state::State::cursor`], and for named paths how far into the
/// group that starts there ([`state::State::within`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Position {
    cursor: i64,
    within: Option<state::Within>,
}

impl Position {
    fn at(cursor: i64) -> Self {
        Position {
            cursor,
            within: None,
        }
    }
}

/// The backfill's ends of the long-lived pipeline.
struct Lane {
    /// Windows' jobs to the submitting thread; dropped to close the pipeline's input.
    tx: Sender<Vec<NewJob>>,
    settled: Receiver<Settled>,
}

/// One window on its way: what has to settle before the cursor may pass it.
#[derive(Debug)]
struct Mark {
    seq: u64,
    /// Jobs of it submitted and not settled yet.
    outstanding: usize,
    /// No path of it failed (so far).
    ok: bool,
    /// Where the cursor goes once this window and all before it are settled, and whether
    /// that is worth an fsync.
    cursor: Option<Position>,
    save: bool,
    /// The window had paths: `--upload-logs` reports on it.
    logs: bool,
    /// Its uploaded paths, for `--upload-logs` once it has settled.
    uploaded: Vec<StorePath>,
}

/// Forwards the pipeline's progress to the backfill's (the pipeline plans nothing itself:
/// the backfill's totals come from the walk).
struct WindowProgress<'a>(&'a dyn BackfillProgress);

impl pipeline::outcome::Progress for WindowProgress<'_> {
    fn nar_bytes(&self, bytes: u64) {
        self.0.nar_bytes(bytes);
    }
    fn finished(&self, result: &PathResult) {
        self.0.finished(result);
    }
}

impl Run<'_> {
    /// Lists the cache and the upstreams when `to_check` paths make it worth it.
    fn decide_listing(&mut self, to_check: u64) -> Result<(), BackfillError> {
        if to_check <= LIST_ABOVE {
            return Ok(());
        }
        if let Some(set) = self.cache.list_narinfos()? {
            tracing::info!("{}: {} narinfos listed", self.cache.url(), set.0.len());
            self.available.extend(set.0.into_iter().map(|k| (k, false)));
            self.listed = true;
            self.summary.listed = true;
        }
        for (u, slot) in self.upstreams.iter().zip(&mut self.upstream_sets) {
            *slot = u
                .list_narinfos()
                .map_err(|source| BackfillError::Upstream {
                    url: u.url().to_owned(),
                    source,
                })?
                .map(|s| s.0);
        }
        Ok(())
    }

    fn save(&self, cursor: &Position) -> Result<(), BackfillError> {
        if let (Some(path), false) = (&self.opts.state_file, self.opts.dry_run) {
            let s = state::State::new(self.cache.url(), &self.opts.fingerprint(), cursor.cursor)
                .within(cursor.within.clone());
            state::save(path, &s)?;
        }
        Ok(())
    }

    /// Walks the selection from `cursor`, submitting window after window.
    fn walk(&mut self, cursor: &Position) -> Result<(), BackfillError> {
        let opts = self.opts;
        match &opts.selection {
            Selection::Store { since } => self.walk_store(cursor.cursor, since.unwrap_or(i64::MIN)),
            Selection::Paths(named) => self.walk_named(named, cursor),
        }
    }

    /// `--all` and `--since`: the store in registration order from `cursor`.
    fn walk_store(&mut self, cursor: i64, since: i64) -> Result<(), BackfillError> {
        let derivations = self.opts.derivations;
        let (paths, bytes) = self.store.count_after(cursor, since, derivations)?;
        self.progress.total(paths, bytes);
        self.decide_listing(paths)?;
        let mut scan = cursor;
        if since > i64::MIN {
            // Straight to the first path registered since then (nothing before it is
            // selected), or to the end.
            let first = self.store.first_id_since(since)?;
            let start = first.map_or(i64::MAX, |id| id - 1);
            scan = scan.max(start.min(self.store.last_valid_id()?));
        }
        // The store as it is now: paths registered while the walk runs are the next run's
        // (or the daemon's watcher's), so a busy machine cannot keep a backfill going.
        let end = self.store.last_valid_id()?;
        while scan < end && !self.halted {
            let mut rows = self.store.valid_after(scan, self.opts.window.max(1))?;
            rows.retain(|r| r.id <= end);
            let Some(last) = rows.last().map(|r| r.id) else {
                break;
            };
            let selected: Vec<StorePath> = rows
                .into_iter()
                .filter(|r| r.registration_time >= since && (derivations || !is_drv(&r.path)))
                .map(|r| r.path)
                .collect();
            // A window with nothing selected moves the cursor without an fsync.
            let save = !selected.is_empty();
            let infos = self.infos_of_valid(selected)?;
            self.process_window(infos, true, Some(Position::at(last)), save)?;
            scan = last;
            self.summary.windows += 1;
        }
        Ok(())
    }

    /// `PATH...`: the closures of `window` named paths at a time, from the `cursor`-th,
    /// past the windows of that group's closure done already (`within` it).
    ///
    /// A group's closure is cut into windows before anything is left out of them (what
    /// this run counted already, what the cache is known to have), so the same closure
    /// gives the same windows on every run and the cursor passes them one by one, as it
    /// passes the store's. A resumed count of windows is used only for the very closure
    /// it was counted in (its digest is in the state); any other walks the group whole.
    fn walk_named(&mut self, named: &[StorePath], cursor: &Position) -> Result<(), BackfillError> {
        let window = self.opts.window.max(1);
        let start = usize::try_from(cursor.cursor).unwrap_or(0).min(named.len());
        let mut resumed_within = cursor.within.clone();
        let mut group_start = start;
        self.decide_listing((named.len() - start) as u64)?;
        let (mut total, mut total_bytes) = (0, 0);
        for chunk in named[start..].chunks(window) {
            if self.halted {
                break;
            }
            let group_end = group_start + chunk.len();
            let (valid, invalid) = crate::store::lookup::split_valid(self.store, chunk)?;
            // A named path that is not valid pins the cursor before the group.
            let ok = invalid.is_empty();
            for (path, _) in invalid {
                let why = Failure::NotValid { path: path.clone() };
                self.fail(PathResult {
                    path,
                    outcome: Outcome::Failed(why),
                });
            }
            let mut closure = self.store.closure(&valid)?;
            // A .drv a selected path refers to is pulled back in by the window check.
            closure.retain(|i| self.opts.derivations || !is_drv(&i.path));
            let digest = closure_digest(&closure);
            let done_before = match resumed_within.take() {
                Some(w) if w.closure == digest => usize::try_from(w.windows).unwrap_or(usize::MAX),
                Some(_) => {
                    tracing::info!(
                        "the closure of named paths {group_start}.. is not the one the \
                         backfill state counted windows of: it is walked whole"
                    );
                    0
                }
                None => 0,
            };
            // Topological order across the closure: each window's references are in an
            // earlier window, or available.
            let mut windows: Vec<Vec<PathInfo>> = closure
                .chunks(window)
                .skip(done_before)
                .map(<[_]>::to_vec)
                .collect();
            drop(closure);
            // What this run settled already (or has in flight, or failed) is not counted
            // again; what the cache had is counted once, as present.
            let (mut known, mut again) = (0, 0);
            for w in &mut windows {
                total += w.len() as u64;
                total_bytes += w.iter().map(|i| i.nar_size).sum::<u64>();
                let (available, in_flight, failed) =
                    (&mut self.available, &self.in_flight, &self.failed);
                w.retain(|i| {
                    if in_flight.contains_key(&i.path) || failed.contains(&i.path) {
                        again += 1;
                        return false;
                    }
                    match available.get_mut(&hash_key(&i.path)) {
                        None => true,
                        Some(settled) => {
                            if *settled {
                                again += 1;
                            } else {
                                known += 1;
                                *settled = true;
                            }
                            false
                        }
                    }
                });
            }
            total -= again;
            self.progress.total(total, total_bytes);
            self.summary.present += known;
            self.progress.advanced(known);
            let n = windows.len();
            if n == 0 {
                let cursor = Position::at(group_end as i64);
                self.process_window(Vec::new(), ok, Some(cursor), true)?;
            }
            for (i, w) in windows.into_iter().enumerate() {
                let cursor = if i + 1 == n {
                    Position::at(group_end as i64)
                } else {
                    Position {
                        cursor: group_start as i64,
                        within: Some(state::Within {
                            windows: (done_before + i + 1) as u64,
                            closure: digest.clone(),
                        }),
                    }
                };
                // A window left with nothing to do moves the cursor without an fsync.
                let save = i + 1 == n || !w.is_empty();
                self.process_window(w, ok, Some(cursor), save)?;
                self.summary.windows += 1;
            }
            group_start = group_end;
        }
        Ok(())
    }

    /// Closes the pipeline's input and takes every settled path until the windows in
    /// flight are settled (or the pipeline ended), then records where the cursor got to.
    fn drain(&mut self) -> Result<(), BackfillError> {
        let mut first_error = None;
        if let Some(Lane { tx, settled }) = self.lane.take() {
            drop(tx);
            while !self.marks.is_empty() {
                let Ok(done) = settled.recv() else {
                    break;
                };
                if let Err(e) = self.absorb(done) {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        if self.cursor != self.saved {
            self.save(&self.cursor)?;
            self.saved = self.cursor.clone();
        }
        self.summary.cursor = self.cursor.cursor;
        Ok(())
    }

    /// Takes settled paths until at most `windows` windows are ahead of the cursor.
    fn settle_until(&mut self, windows: usize) -> Result<(), BackfillError> {
        while self.marks.len() > windows {
            let Some(lane) = &self.lane else {
                // A dry run settles every window as it is planned.
                debug_assert!(false, "a window unsettled in a dry run");
                break;
            };
            match lane.settled.recv() {
                Ok(done) => self.absorb(done)?,
                Err(_) => {
                    self.halted = true;
                    break;
                }
            }
        }
        Ok(())
    }

    /// Takes the paths settled already, without waiting.
    fn settle_ready(&mut self) -> Result<(), BackfillError> {
        while let Some(done) = self.lane.as_ref().and_then(|l| l.settled.try_recv().ok()) {
            self.absorb(done)?;
        }
        Ok(())
    }

    /// Sends `jobs` to the submitting thread, taking settled paths while it is busy (the
    /// pipeline must not wait on us while we wait on it).
    fn send(&mut self, jobs: Vec<NewJob>) -> Result<(), BackfillError> {
        let Some(lane) = &self.lane else {
            return Ok(());
        };
        let (tx, settled) = (lane.tx.clone(), lane.settled.clone());
        loop {
            let mut sel = crossbeam_channel::Select::new();
            let send = sel.send(&tx);
            let recv = sel.recv(&settled);
            let op = sel.select();
            if op.index() == send {
                if op.send(&tx, jobs).is_err() {
                    // The submitter is gone only if the pipeline stopped.
                    self.halted = true;
                }
                return Ok(());
            }
            debug_assert_eq!(op.index(), recv);
            match op.recv(&settled) {
                Ok(done) => self.absorb(done)?,
                Err(_) => {
                    self.halted = true;
                    return Ok(());
                }
            }
        }
    }

    /// Records one settled path: in the summary, as available or failed, and against its
    /// window; passes the cursor over every window settled in order.
    fn absorb(&mut self, done: Settled) -> Result<(), BackfillError> {
        let Some(seq) = self.in_flight.remove(&done.path) else {
            debug_assert!(false, "{:?} settled but was not in flight", done.path);
            return Ok(());
        };
        let front = self.marks.front().map_or(seq, |m| m.seq);
        let mark = &mut self.marks[(seq - front) as usize];
        debug_assert_eq!(mark.seq, seq);
        mark.outstanding -= 1;
        match done.result.outcome {
            Outcome::Uploaded { .. } => {
                self.summary.uploaded += 1;
                self.summary.bytes.add(&done.result.outcome);
                self.available.insert(hash_key(&done.path), true);
                if self.push.upload_logs {
                    mark.uploaded.push(done.path);
                }
            }
            Outcome::AlreadyPresent => {
                self.summary.present += 1;
                self.available.insert(hash_key(&done.path), true);
            }
            Outcome::Failed(_) => {
                mark.ok = false;
                self.summary.failed += 1;
                self.failed.insert(done.path);
                if self.summary.failures.len() < FAILURES_KEPT {
                    self.summary.failures.push(done.result);
                }
            }
        }
        self.pass_settled()?;
        // After the cursor: a path counts as settled once the walk has taken it in.
        self.progress.advanced(1);
        Ok(())
    }

    /// Passes the cursor over the windows at the front that have settled: uploads their
    /// logs (their narinfos are durable) and saves the cursor unless a failure pinned it.
    fn pass_settled(&mut self) -> Result<(), BackfillError> {
        while self.marks.front().is_some_and(|m| m.outstanding == 0) {
            let m = self.marks.pop_front().expect("a front window");
            if self.push.upload_logs && !self.opts.dry_run && m.logs {
                // A log never fails a path.
                let r = if m.uploaded.is_empty() {
                    crate::logs::LogReport::default()
                } else {
                    crate::logs::upload_build_logs(self.cache, self.store, &m.uploaded)
                };
                let total = self.summary.logs.get_or_insert_with(Default::default);
                total.uploaded += r.uploaded;
                total.missing += r.missing;
                total.failed += r.failed;
            }
            // A failed path pins the cursor below its window; later windows still go up
            // (a rerun finds them present) and their referrers of it are refused.
            self.pinned |= !m.ok;
            if let (false, Some(cursor)) = (self.pinned, m.cursor) {
                if m.save {
                    self.save(&cursor)?;
                    self.saved = cursor.clone();
                }
                self.cursor = cursor;
            }
        }
        Ok(())
    }

    /// Path infos of `paths`, leaving out those that became invalid (garbage-collected)
    /// since they were listed.
    fn infos_of_valid(&self, mut paths: Vec<StorePath>) -> Result<Vec<PathInfo>, StoreError> {
        loop {
            match self.store.path_infos(&paths) {
                Ok(infos) => return Ok(infos),
                Err(StoreError::NotValid(full)) => {
                    let before = paths.len();
                    paths.retain(|p| p.to_absolute(&self.store_dir) != full);
                    if paths.len() == before {
                        return Err(StoreError::NotValid(full));
                    }
                    tracing::debug!("{full} is no longer valid; left out");
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn fail(&mut self, r: PathResult) {
        self.summary.failed += 1;
        self.progress.advanced(1);
        self.progress.finished(&r);
        if let Ok(p) = StorePath::from_absolute_path(&r.path, &self.store_dir) {
            self.failed.insert(p);
        }
        if self.summary.failures.len() < FAILURES_KEPT {
            self.summary.failures.push(r);
        }
    }

    /// Plans one window and submits it: pulls in what its references need, skips, finds
    /// what is present, sends the rest to the pipeline. `ok`: nothing outside the window
    /// failed that pins the cursor here; `cursor`: where the cursor goes once the window
    /// (and every one before it) has settled, with an fsync if `save`.
    fn process_window(
        &mut self,
        mut window: Vec<PathInfo>,
        ok: bool,
        cursor: Option<Position>,
        save: bool,
    ) -> Result<(), BackfillError> {
        // At most two windows in flight: this one is planned once the one two before it
        // has settled, and with what has settled since taken in.
        self.settle_until(1)?;
        self.settle_ready()?;
        if self.halted {
            return Ok(());
        }
        // What this run has counted already is not counted again: a path an earlier
        // window pulled in, reached here in registration order (or met again in another
        // group's closure), whether it is in flight, settled (uploaded, present or
        // skipped) or failed. A failure pinned the cursor already; referrers of a failed
        // path are refused below.
        window.retain(|i| {
            !(self.in_flight.contains_key(&i.path)
                || self.failed.contains(&i.path)
                || self.available.get(&hash_key(&i.path)) == Some(&true))
        });
        let mut mark = Mark {
            seq: self.next_seq,
            outstanding: 0,
            ok,
            cursor,
            save,
            logs: !window.is_empty(),
            uploaded: Vec::new(),
        };
        self.next_seq += 1;
        if window.is_empty() {
            self.marks.push_back(mark);
            return self.pass_settled();
        }
        let pulled = self.pull_in_references(&mut window)?;
        self.summary.pulled_in += pulled;

        // Skips: signed by an upstream key, then served by an upstream cache.
        let mut rest = Vec::with_capacity(window.len());
        for info in window {
            let signed = info
                .sigs
                .iter()
                .any(|s| self.opts.skip_signed_by.contains(&s.key_name));
            if signed {
                self.skip(&info.path, SkipReason::SignedBy);
            } else {
                rest.push(info);
            }
        }
        let served = self.served_upstream(&rest)?;
        let mut candidates = Vec::with_capacity(rest.len());
        for (info, served) in rest.into_iter().zip(served) {
            if served {
                self.skip(&info.path, SkipReason::Upstream);
            } else {
                candidates.push(info);
            }
        }

        // What the cache is known to have (listed, or asked about by an earlier window's
        // pull-in) and this run has not counted yet.
        let (mut present, unknown): (Vec<PathInfo>, Vec<PathInfo>) = candidates
            .into_iter()
            .partition(|i| self.available.contains_key(&hash_key(&i.path)));
        let mut todo = Vec::with_capacity(unknown.len());
        if self.listed || unknown.is_empty() {
            todo = unknown;
        } else {
            let paths: Vec<StorePath> = unknown.iter().map(|i| i.path.clone()).collect();
            for (info, has) in unknown.into_iter().zip(self.cache.has_narinfos(&paths)?) {
                if has {
                    present.push(info);
                } else {
                    todo.push(info);
                }
            }
        }
        for info in &present {
            self.available.insert(hash_key(&info.path), true);
        }
        self.summary.present += present.len() as u64;
        self.progress.advanced(present.len() as u64);
        drop(present);

        let todo = crate::store::closure::topo_sort(todo);
        if self.opts.dry_run {
            self.summary.uploaded += todo.len() as u64;
            self.summary.bytes.nar += todo.iter().map(|i| i.nar_size).sum::<u64>();
            self.progress.advanced(todo.len() as u64);
            self.available
                .extend(todo.iter().map(|i| (hash_key(&i.path), true)));
            self.marks.push_back(mark);
            return self.pass_settled();
        }
        // A reference in flight is as good as seen: the job waits for it, and is refused
        // by the publisher if it fails.
        let in_todo: HashSet<&StorePath> = todo.iter().map(|i| &i.path).collect();
        let seen: HashSet<StorePath> = todo
            .iter()
            .flat_map(|i| &i.references)
            .filter(|r| {
                !in_todo.contains(r)
                    && (self.available.contains_key(&hash_key(r))
                        || self.in_flight.contains_key(*r))
            })
            .cloned()
            .collect();
        drop(in_todo);
        let (mut jobs, refused) = pipeline::plan::jobs_for(&todo, &seen, &self.store_dir);
        drop(seen);
        for (i, why) in refused {
            mark.ok = false;
            self.fail(PathResult {
                path: todo[i].path.to_absolute(&self.store_dir),
                outcome: Outcome::Failed(why),
            });
        }
        drop(todo);
        for job in &mut jobs {
            let earlier = job
                .info
                .references
                .iter()
                .filter(|r| **r != job.info.path && self.in_flight.contains_key(*r));
            job.waits_for.extend(earlier.cloned());
        }
        mark.outstanding = jobs.len();
        for job in &jobs {
            self.in_flight.insert(job.info.path.clone(), mark.seq);
        }
        self.marks.push_back(mark);
        if !jobs.is_empty() {
            self.send(jobs)?;
        }
        self.pass_settled()
    }

    fn skip(&mut self, path: &StorePath, why: SkipReason) {
        match why {
            SkipReason::SignedBy => self.summary.skipped_signed_by += 1,
            SkipReason::Upstream => self.summary.skipped_upstream += 1,
        }
        tracing::debug!("skipped {} ({why:?})", path.to_absolute(&self.store_dir));
        self.available.insert(hash_key(path), true);
        self.progress.advanced(1);
    }

    /// Adds to `window` the closure of each reference that is neither in it nor
    /// available (nor in flight): registered later than its referrer, or not selected.
    /// Returns how many paths came in.
    fn pull_in_references(&mut self, window: &mut Vec<PathInfo>) -> Result<u64, BackfillError> {
        let mut in_window: HashSet<StorePath> = window.iter().map(|i| i.path.clone()).collect();
        let outside: BTreeSet<&StorePath> = window
            .iter()
            .flat_map(|i| &i.references)
            .filter(|r| {
                !in_window.contains(*r)
                    && !self.available.contains_key(&hash_key(r))
                    && !self.in_flight.contains_key(*r)
                    && !self.failed.contains(*r)
            })
            .collect();
        if outside.is_empty() {
            return Ok(0);
        }
        let outside: Vec<StorePath> = outside.into_iter().cloned().collect();
        let mut missing = Vec::new();
        for (p, has) in outside.iter().zip(self.cache.has_narinfos(&outside)?) {
            if has {
                self.available.insert(hash_key(p), false);
            } else {
                missing.push(p.clone());
            }
        }
        if missing.is_empty() {
            return Ok(0);
        }
        let mut pulled = 0;
        for info in self.store.closure(&missing)? {
            let key = hash_key(&info.path);
            if self.available.contains_key(&key)
                || self.in_flight.contains_key(&info.path)
                || self.failed.contains(&info.path)
                || !in_window.insert(info.path.clone())
            {
                continue;
            }
            pulled += 1;
            window.push(info);
        }
        tracing::debug!(
            "{} references outside the window are not in the cache: {pulled} paths pulled in",
            missing.len()
        );
        Ok(pulled)
    }

    /// For each of `infos`, whether an upstream serves its narinfo.
    fn served_upstream(&self, infos: &[PathInfo]) -> Result<Vec<bool>, BackfillError> {
        let mut served = vec![false; infos.len()];
        for (u, set) in self.upstreams.iter().zip(&self.upstream_sets) {
            match set {
                Some(set) => {
                    for (s, i) in served.iter_mut().zip(infos) {
                        *s |= set.contains(&hash_key(&i.path));
                    }
                }
                None => {
                    let ask: Vec<usize> = (0..infos.len()).filter(|&j| !served[j]).collect();
                    let paths: Vec<StorePath> =
                        ask.iter().map(|&j| infos[j].path.clone()).collect();
                    if paths.is_empty() {
                        continue;
                    }
                    let has = u
                        .has_narinfos(&paths)
                        .map_err(|source| BackfillError::Upstream {
                            url: u.url().to_owned(),
                            source,
                        })?;
                    for (j, h) in ask.into_iter().zip(has) {
                        served[j] |= h;
                    }
                }
            }
        }
        Ok(served)
    }
}

#[cfg(test)]
mod tests;
