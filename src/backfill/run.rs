//! The backfill's bookkeeping of one run: the windows in flight and what has to settle
//! before the cursor passes each, the settled paths taken from the pipeline, the summary,
//! and the state file's saves.
//!
//! Owns [`Run`]'s fields and the settling side of it. It never plans a window (that is
//! `window`'s) and never walks the store (`walk`'s).

use super::available::{Available, Key};
use super::state;
use super::{BackfillError, BackfillOptions, BackfillProgress, LIST_ABOVE, Summary};
use crate::cache::{BinaryCache, NarinfoSet};
use crate::format::store_path::StorePath;
use crate::pipeline::PushOptions;
use crate::pipeline::outcome::{self, Outcome, PathResult};
use crate::pipeline::publish::{NewJob, Settled};
use crate::store::LocalStore;
use crossbeam_channel::{Receiver, Sender};
use std::collections::{HashMap, HashSet, VecDeque};

/// Failures kept with their cause for the summary; beyond these only the count grows.
const FAILURES_KEPT: usize = 100;

pub(super) struct Run<'a> {
    pub(super) store: &'a LocalStore,
    pub(super) cache: &'a dyn BinaryCache,
    pub(super) upstreams: &'a [&'a dyn BinaryCache],
    pub(super) push: &'a PushOptions,
    pub(super) opts: &'a BackfillOptions,
    pub(super) progress: &'a dyn BackfillProgress,
    pub(super) store_dir: String,
    /// [`BackfillOptions::fingerprint`], computed once (it hashes every named path).
    fingerprint: String,
    /// Paths known to be in the cache or settled by this run (so available to their
    /// referrers).
    pub(super) available: Available,
    /// `available` holds the cache's listing: a path not in it is not in the cache.
    pub(super) listed: bool,
    /// Each upstream's listing, when it was listed.
    pub(super) upstream_sets: Vec<Option<NarinfoSet>>,
    /// `ValidPaths.id`s of the paths the current window (or group) deals with: its
    /// paths, their references and what it pulls in; `None` when the store has none to
    /// give. Cleared for each window of the store and each group of named paths.
    pub(super) ids: HashMap<StorePath, Option<i64>>,
    /// Paths that failed in this run: their referrers are refused rather than pulling
    /// them in again in every window.
    pub(super) failed: HashSet<StorePath>,
    /// Paths submitted to the pipeline and not settled yet, with the window (its number,
    /// [`Mark::seq`]) they belong to and their key. They count as available to later
    /// windows, whose jobs wait for them.
    pub(super) in_flight: HashMap<StorePath, (u64, Key)>,
    /// The windows not yet passed by the cursor, oldest first: those in flight, and
    /// settled ones behind an unsettled one.
    pub(super) marks: VecDeque<Mark>,
    /// The pipeline's two ends; `None` in a dry run.
    pub(super) lane: Option<Lane>,
    /// The next window's [`Mark::seq`].
    pub(super) next_seq: u64,
    /// The pipeline ended early (a publish failed and halted it): the walk stops, and
    /// [`crate::pipeline::stream`] returns the error.
    pub(super) halted: bool,
    /// A window with a failed path has been passed: the cursor stays where it was.
    pinned: bool,
    /// The run's reading of the cache's gc marker.
    gate: crate::pipeline::gc_gate::Gate,
    /// The gc epoch of the run's first look at the cache: what it learnt of the cache
    /// (the listing, what windows found) dates from it, so every job carries it.
    epoch: Option<crate::cache::gc_marker::Epoch>,
    /// Where the cursor is (everything below it durable or skipped), and where the state
    /// file last put it.
    pub(super) cursor: Position,
    pub(super) saved: Position,
    pub(super) summary: Summary,
}

/// Where the cursor is: [`state::State::cursor`], and for named paths how far into the
/// group that starts there ([`state::State::within`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Position {
    pub(super) cursor: i64,
    pub(super) within: Option<state::Within>,
}

impl Position {
    pub(super) fn at(cursor: i64) -> Self {
        Position {
            cursor,
            within: None,
        }
    }
}

/// The backfill's ends of the long-lived pipeline.
pub(super) struct Lane {
    /// Windows' jobs to the submitting thread; dropped to close the pipeline's input.
    pub(super) tx: Sender<Vec<NewJob>>,
    pub(super) settled: Receiver<Settled>,
}

/// One window on its way: what has to settle before the cursor may pass it.
#[derive(Debug)]
pub(super) struct Mark {
    pub(super) seq: u64,
    /// Jobs of it submitted and not settled yet.
    pub(super) outstanding: usize,
    /// No path of it failed (so far).
    pub(super) ok: bool,
    /// Where the cursor goes once this window and all before it are settled, and whether
    /// that is worth an fsync.
    pub(super) cursor: Option<Position>,
    pub(super) save: bool,
    /// The window had paths: `--upload-logs` reports on it.
    pub(super) logs: bool,
    /// Its uploaded paths, for `--upload-logs` once it has settled.
    pub(super) uploaded: Vec<StorePath>,
}

/// Forwards the pipeline's progress to the backfill's (the pipeline plans nothing itself:
/// the backfill's totals come from the walk).
pub(super) struct WindowProgress<'a>(pub(super) &'a dyn BackfillProgress);

impl outcome::Progress for WindowProgress<'_> {
    fn nar_bytes(&self, bytes: u64) {
        self.0.nar_bytes(bytes);
    }
    fn finished(&self, result: &PathResult) {
        self.0.finished(result);
    }
}

impl<'a> Run<'a> {
    pub(super) fn new(
        store: &'a LocalStore,
        cache: &'a dyn BinaryCache,
        upstreams: &'a [&'a dyn BinaryCache],
        push: &'a PushOptions,
        opts: &'a BackfillOptions,
        progress: &'a dyn BackfillProgress,
        fingerprint: &str,
    ) -> Self {
        Run {
            store,
            cache,
            upstreams,
            push,
            opts,
            progress,
            store_dir: store.store_dir().to_owned(),
            fingerprint: fingerprint.to_owned(),
            available: Available::default(),
            listed: false,
            upstream_sets: upstreams.iter().map(|_| None).collect(),
            ids: HashMap::new(),
            failed: HashSet::new(),
            in_flight: HashMap::new(),
            marks: VecDeque::new(),
            lane: None,
            next_seq: 0,
            halted: false,
            pinned: false,
            gate: crate::pipeline::gc_gate::Gate::new(push.gc_wait),
            epoch: None,
            cursor: Position::default(),
            saved: Position::default(),
            summary: Summary {
                dry_run: opts.dry_run,
                ..Summary::default()
            },
        }
    }

    /// Looks up the ids of those of `paths` not looked up yet in this window, in one
    /// store query.
    pub(super) fn resolve<'p>(
        &mut self,
        paths: impl IntoIterator<Item = &'p StorePath>,
    ) -> Result<(), BackfillError> {
        let mut ask: Vec<StorePath> = Vec::new();
        for p in paths {
            if !self.ids.contains_key(p) {
                self.ids.insert(p.clone(), None);
                ask.push(p.clone());
            }
        }
        if ask.is_empty() {
            return Ok(());
        }
        if let Some(ids) = self.store.ids(&ask)? {
            for (p, id) in ask.into_iter().zip(ids) {
                self.ids.insert(p, id);
            }
        }
        Ok(())
    }

    /// `path`'s key: by the id looked up for it, else by its hash part.
    pub(super) fn key(&self, path: &StorePath) -> Key {
        Key::of(path, self.ids.get(path).copied().flatten())
    }

    /// Whether `path` is known available (in the cache, or settled by this run).
    pub(super) fn is_available(&self, path: &StorePath) -> bool {
        self.available.contains(path, self.key(path))
    }

    /// Reads the cache's gc marker before a look at the cache, waiting while a gc runs,
    /// and returns the epoch of the run's first look: what the run knows of the cache
    /// dates from then, so a job relying on it is checked again if a gc ran since.
    ///
    /// # Errors
    /// [`BackfillError::Cache`] when the marker cannot be read, or the run was cancelled
    /// while it waited.
    pub(super) fn look(&mut self) -> Result<crate::cache::gc_marker::Epoch, BackfillError> {
        let cancel = self.push.cancel.clone();
        let progress = WindowProgress(self.progress);
        let reading = self
            .gate
            .settle(self.cache, &|| cancel.is_cancelled(), &progress)?
            .ok_or_else(|| crate::cache::CacheError::Remote {
                cache: self.cache.url().to_owned(),
                key: crate::cache::gc_marker::MARKER_KEY.to_owned(),
                message: "cancelled while waiting for a running gc".into(),
                transient: true,
            })?;
        let first = *self.epoch.get_or_insert(reading.epoch);
        if first != reading.epoch {
            tracing::debug!(
                "{}: a gc ran during the backfill: jobs relying on what was found before it are checked again before they are published",
                self.cache.url()
            );
        }
        Ok(first)
    }

    /// Lists the cache and the upstreams when `to_check` paths make it worth it.
    pub(super) fn decide_listing(&mut self, to_check: u64) -> Result<(), BackfillError> {
        if to_check <= LIST_ABOVE {
            return Ok(());
        }
        self.look()?;
        if let Some(set) = self.cache.list_narinfos()? {
            tracing::info!("{}: {} narinfos listed", self.cache.url(), set.len());
            self.available.set_listing(set);
            self.listed = true;
            self.summary.listed = true;
        }
        for (u, slot) in self.upstreams.iter().zip(&mut self.upstream_sets) {
            *slot = u
                .list_narinfos()
                .map_err(|source| BackfillError::Upstream {
                    url: u.url().to_owned(),
                    source,
                })?;
        }
        Ok(())
    }

    pub(super) fn save(&self, cursor: &Position) -> Result<(), BackfillError> {
        if let (Some(path), false) = (&self.opts.state_file, self.opts.dry_run) {
            let s = state::State::new(self.cache.url(), &self.fingerprint, cursor.cursor)
                .within(cursor.within.clone());
            state::save(path, &s)?;
        }
        Ok(())
    }

    /// Closes the pipeline's input and takes every settled path until the windows in
    /// flight are settled (or the pipeline ended), then records where the cursor got to.
    pub(super) fn drain(&mut self) -> Result<(), BackfillError> {
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
    pub(super) fn settle_until(&mut self, windows: usize) -> Result<(), BackfillError> {
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
    pub(super) fn settle_ready(&mut self) -> Result<(), BackfillError> {
        while let Some(done) = self.lane.as_ref().and_then(|l| l.settled.try_recv().ok()) {
            self.absorb(done)?;
        }
        Ok(())
    }

    /// Sends `jobs` to the submitting thread, taking settled paths while it is busy (the
    /// pipeline must not wait on us while we wait on it).
    pub(super) fn send(&mut self, jobs: Vec<NewJob>) -> Result<(), BackfillError> {
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
    pub(super) fn absorb(&mut self, done: Settled) -> Result<(), BackfillError> {
        let Some((seq, key)) = self.in_flight.remove(&done.path) else {
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
                self.available.count(key);
                if self.push.upload_logs {
                    mark.uploaded.push(done.path);
                }
            }
            Outcome::AlreadyPresent => {
                self.summary.present += 1;
                self.available.count(key);
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
    pub(super) fn pass_settled(&mut self) -> Result<(), BackfillError> {
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

    pub(super) fn fail(&mut self, r: PathResult) {
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
}
