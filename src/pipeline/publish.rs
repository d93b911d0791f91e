//! The publish stage: takes the sink's results on its own thread and publishes narinfos
//! in durable waves, in an order that keeps Nix's closure invariant even though uploads
//! finish out of order; it settles every job, one [`Settled`] each, as soon as its
//! narinfo is durable (or it failed).
//!
//! A narinfo is written only when (1) its NAR is committed and (2) every reference it
//! waits for ([`NewJob::waits_for`]: those the caller did not find in the cache itself) is
//! *known*: published durably by this publisher. A path that fails fails every path that
//! waits for it, transitively. A wave hands every ready narinfo to
//! [`BinaryCache::publish_narinfos`], which makes their NARs durable before it names them,
//! merges them with what the cache holds, and returns once they are durable.
//!
//! A wave starts as soon as anything is ready: a path that finishes while the pipeline is
//! otherwise idle is published at once, and results that arrive during a wave make up the
//! next one, so waves grow with the load instead of waiting on a timer.
//!
//! On a cache that writes narinfos concurrently, a narinfo is also ready once each
//! reference is known or being written: its wave is handed off as soon as the last
//! reference's write is sent ([`BinaryCache::publish_narinfos_after`]), reads what the
//! cache holds (the merge's read) while those writes are on their way, and writes only
//! once every one of them has landed durably (a failed one discards the read and the path
//! waits, or fails, as any other). A level of a closure then costs one round trip, and
//! what is merged was read no earlier than a round trip before the write, as before.
//!
//! The [`Book`] is what the publisher remembers, and it never outgrows the jobs in flight:
//! a job is in it from submission until settled, and a known (or failed) path only while
//! a job of it or a job waiting for it is unsettled. A reference the caller vouches for
//! (found in the cache before the job was submitted) is not remembered at all.
use super::gc_gate::{Gate, Reading};
use super::outcome::{Failure, Outcome, PathResult, Progress, Retry};
use super::sink::SinkResult;
use super::stage::{Job, JobId, Stop};
use crate::cache::gc_marker::{Epoch, WAVE_FRESH};
use crate::cache::{BinaryCache, CacheError, Merged};
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use crate::store::PathInfo;
use crossbeam_channel::{Receiver, Sender};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// A path to upload, as it is submitted to the pipeline.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub info: PathInfo,
    /// The references whose narinfos must be published by this pipeline before this one:
    /// every reference but the path itself and those the caller found in the cache.
    pub waits_for: Vec<StorePath>,
    /// The caller's look at the cache the job was planned from.
    pub look: Look,
    /// References served from elsewhere (an upstream cache), never looked for in this
    /// one, so not checked again after a gc either.
    pub elsewhere: Vec<StorePath>,
}

/// The look at the cache jobs are planned from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Look {
    /// Its gc epoch: when a gc has run since, what a job relies on in the cache is
    /// checked again before its narinfo is written.
    pub epoch: Epoch,
    /// When the caller's reading of the gc marker that gave `epoch` was sent, if the
    /// caller read it: the publisher takes the newest of these as its own reading while
    /// it is fresh ([`super::gc_gate::GcWait::fresh`]), so a run's first wave does not
    /// read the marker again.
    pub read_at: Option<std::time::Instant>,
}

impl From<Epoch> for Look {
    fn from(epoch: Epoch) -> Self {
        Look {
            epoch,
            read_at: None,
        }
    }
}

impl NewJob {
    /// A job for `info`, planned from `look` at the cache, that waits for each of its
    /// references `pending` says this pipeline will publish (the others are in the cache
    /// already).
    pub fn waiting_for(info: PathInfo, look: Look, pending: impl Fn(&StorePath) -> bool) -> Self {
        let waits_for = info
            .references
            .iter()
            .filter(|r| pending(r))
            .cloned()
            .collect();
        NewJob {
            info,
            waits_for,
            look,
            elsewhere: Vec::new(),
        }
    }
}

/// What the pipeline decided for one job.
#[derive(Debug, Clone)]
pub struct Settled {
    pub path: StorePath,
    pub result: PathResult,
}

/// What a failed wave does: stop the whole run (a one-shot push returns the error), or
/// fail the wave's paths with the cache's error and go on (a long-lived pipeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPublishError {
    Halt,
    FailPaths,
}

/// Most results taken into one wave: bounds a wave's memory and its time holding the
/// cache's publishing lock; the rest go into the next wave at once.
const WAVE_MAX: usize = 512;

/// Waves in flight at once on a cache that writes narinfos concurrently
/// ([`BinaryCache::narinfos_in_flight`] above 1): each is a thread blocked on the cache's
/// round trips, and a closure is published level by level (a narinfo waits for its
/// references' waves), so a level whose references have landed starts at once instead
/// of waiting for the waves before it. Their narinfos together stay within
/// `narinfos_in_flight`; the hand-off queues to these threads and back hold at most this
/// many waves. Measured with `scripts/bench-latency` (1,000 small paths of 11 levels,
/// answers held back 30 ms): with 8, every thread was often holding a wave of a few
/// narinfos for its two round trips while hundreds of NARs were committed and their
/// narinfos waited for a thread (230 NARs committed, 73 narinfos read at 300 ms); with 32
/// the narinfos keep up with the NARs, and the push ends 100–150 ms after its last NAR.
/// A thread waiting holds a stack and no upload memory.
const WAVES_IN_FLIGHT: usize = 32;

/// Messages from the publishing threads: two a wave at most ([`WaveMsg::Writing`], then
/// [`WaveMsg::Done`]), so the queue back holds this many per wave in flight.
const MSGS_PER_WAVE: usize = 2;

/// Names a wave handed to a publishing thread.
type WaveId = u64;

/// A wave handed to a publishing thread.
struct WaveJob {
    id: WaveId,
    ready: Vec<Waiting>,
    deadline: std::time::Instant,
    /// Says whether the wave may write, once the waves writing its references have
    /// landed; `None`: its references are durable already.
    go: Option<Receiver<bool>>,
}

/// What a publishing thread tells the publisher.
enum WaveMsg {
    /// The wave waits for nothing more: its writes are being sent.
    Writing(WaveId),
    Done(WaveDone),
}

/// A wave back from a publishing thread: what the cache made of each narinfo, or `None`
/// when it wrote nothing because a reference did not land.
struct WaveDone {
    id: WaveId,
    ready: Vec<Waiting>,
    merged: Result<Option<Vec<crate::cache::Published>>, CacheError>,
}

/// A publishing thread's side of [`crate::cache::WaveGate`]: waits for the publisher's
/// word, and tells it when the wave's writes go.
struct ThreadGate<'a> {
    id: WaveId,
    go: Option<&'a Receiver<bool>>,
    done: &'a Sender<WaveMsg>,
}

impl crate::cache::WaveGate for ThreadGate<'_> {
    fn wait(&self) -> bool {
        // The publisher gone (it halted) drops its sender: nothing is written.
        self.go.is_none_or(|go| go.recv().unwrap_or(false))
    }
    fn writing(&self) {
        let _ = self.done.send(WaveMsg::Writing(self.id));
    }
}

/// A wave in flight, as the publisher follows it.
struct Flight {
    /// Its narinfos' jobs and paths.
    jobs: Vec<(JobId, StorePath)>,
    /// The waves writing its references that have not landed yet.
    after: HashSet<WaveId>,
    /// Where the word to write goes once `after` is empty.
    go: Option<Sender<bool>>,
}

/// A submitted job the publisher has not settled yet.
#[derive(Debug)]
struct Entry {
    path: StorePath,
    waits_for: Vec<StorePath>,
    /// [`Look::epoch`] of the job, moved on once what the job relies on was checked again.
    epoch: Epoch,
    elsewhere: Vec<StorePath>,
}

/// Where a reference stands for the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefState {
    Known,
    Failed(Retry),
    /// A job of it is unsettled: wait.
    Coming,
    /// Neither known nor coming: published and forgotten meanwhile, or never submitted.
    Unknown,
}

/// The publisher's memory, shared with the submitting side (a submission registers its
/// jobs here before any of them can finish).
#[derive(Debug, Default)]
pub struct Book {
    next_id: JobId,
    jobs: HashMap<JobId, Entry>,
    /// Unsettled jobs by path.
    unsettled: HashMap<StorePath, usize>,
    /// Unsettled jobs waiting for each path.
    interest: HashMap<StorePath, usize>,
    known: HashSet<StorePath>,
    failed: HashMap<StorePath, Retry>,
    /// The newest reading of the gc marker a submission was planned from
    /// ([`Look::read_at`]).
    reading: Option<Reading>,
}

impl Book {
    /// Registers `jobs` and returns those to send: a path that has an unsettled job
    /// already is not submitted twice (that job's result covers it).
    pub fn register(&mut self, jobs: Vec<NewJob>) -> Vec<Arc<Job>> {
        self.register_after(jobs, &mut HashMap::new())
    }

    /// A number for a job sent before it is registered (ahead of the look that plans it).
    pub fn take_id(&mut self) -> JobId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// [`Book::register`], where the jobs of `ahead` (by path) were sent already: each
    /// of them that `jobs` names is registered as it is and taken out of `ahead`, and
    /// not returned (it is on its way). Returns the jobs still to send.
    pub fn register_after(
        &mut self,
        jobs: Vec<NewJob>,
        ahead: &mut HashMap<StorePath, Arc<Job>>,
    ) -> Vec<Arc<Job>> {
        let mut out = Vec::with_capacity(jobs.len());
        for NewJob {
            info,
            waits_for,
            look: Look { epoch, read_at },
            elsewhere,
        } in jobs
        {
            if let Some(at) = read_at
                && self.reading.is_none_or(|r| r.at < at)
            {
                self.reading = Some(Reading { epoch, at });
            }
            if self.unsettled.contains_key(&info.path) {
                continue;
            }
            let sent = ahead.remove(&info.path);
            let id = sent.as_ref().map_or_else(|| self.take_id(), |j| j.id);
            let waits_for: Vec<StorePath> =
                waits_for.into_iter().filter(|r| *r != info.path).collect();
            for r in &waits_for {
                *self.interest.entry(r.clone()).or_default() += 1;
            }
            *self.unsettled.entry(info.path.clone()).or_default() += 1;
            self.jobs.insert(
                id,
                Entry {
                    path: info.path.clone(),
                    waits_for,
                    epoch,
                    elsewhere,
                },
            );
            if sent.is_none() {
                out.push(Job::new(id, info));
            }
        }
        out
    }

    /// Jobs submitted and not settled yet.
    pub fn unsettled(&self) -> usize {
        self.jobs.len()
    }

    fn state(&self, r: &StorePath) -> RefState {
        if self.known.contains(r) {
            RefState::Known
        } else if let Some(retry) = self.failed.get(r) {
            RefState::Failed(*retry)
        } else if self.unsettled.contains_key(r) {
            RefState::Coming
        } else {
            RefState::Unknown
        }
    }

    /// Forgets `path` once no unsettled job is of it or waits for it.
    fn forget_if_unneeded(&mut self, path: &StorePath) {
        if !self.unsettled.contains_key(path) && !self.interest.contains_key(path) {
            self.known.remove(path);
            self.failed.remove(path);
        }
    }

    fn settle(&mut self, id: JobId) {
        let Some(entry) = self.jobs.remove(&id) else {
            return;
        };
        for r in &entry.waits_for {
            if let Some(n) = self.interest.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    self.interest.remove(r);
                    self.forget_if_unneeded(r);
                }
            }
        }
        if let Some(n) = self.unsettled.get_mut(&entry.path) {
            *n -= 1;
            if *n == 0 {
                self.unsettled.remove(&entry.path);
            }
        }
        self.forget_if_unneeded(&entry.path);
    }

    /// (known, failed, interest) sizes, for tests.
    #[cfg(test)]
    pub fn remembered(&self) -> (usize, usize, usize) {
        (self.known.len(), self.failed.len(), self.interest.len())
    }
}

/// A narinfo whose NAR is committed, waiting for its references.
#[derive(Debug)]
struct Waiting {
    id: JobId,
    narinfo: NarInfo,
    file_size: u64,
    /// The sink found the NAR in the cache and did not write it again.
    nar_reused: bool,
    /// Its wave failed as a whole: published in a wave of its own, so the failure ends up
    /// on the path that causes it.
    alone: bool,
}

/// The publish stage of one pipeline.
pub struct PublishStage<'a> {
    pub cache: &'a dyn BinaryCache,
    pub store_dir: &'a str,
    pub progress: &'a dyn Progress,
    pub stop: Stop,
    pub book: &'a Mutex<Book>,
    pub on_error: OnPublishError,
    /// How a running gc of the cache is waited for before a wave.
    pub gc_wait: super::gc_gate::GcWait,
}

impl std::fmt::Debug for PublishStage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishStage").finish_non_exhaustive()
    }
}

/// The publisher's own state while it runs.
struct Run<'s, 'a> {
    stage: &'s PublishStage<'a>,
    out: Sender<Settled>,
    pending: Vec<Waiting>,
    /// A NAR was committed since the last wave that renamed the committed NARs: a sync
    /// is owed before the pipeline goes idle or ends.
    dirty: bool,
    /// The publisher's reading of the gc marker over time.
    gate: Gate,
    /// The last reading that found no gc running.
    reading: Option<Reading>,
    /// Where waves go to the publishing threads, and come back from them; `None`: each
    /// wave is published on this thread before the next (a local directory).
    waves: Option<(Sender<WaveJob>, Receiver<WaveMsg>)>,
    /// Waves handed off and not back yet, and their narinfos.
    waves_out: usize,
    narinfos_out: usize,
    /// Every wave handed off and not back yet.
    flights: HashMap<WaveId, Flight>,
    /// Paths whose narinfo a wave in flight is writing, by wave.
    writing: HashMap<StorePath, WaveId>,
    next_wave: WaveId,
}

impl<'a> PublishStage<'a> {
    fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the sink's results until they end (every stage has drained), publishing a
    /// wave whenever anything is ready. Every job submitted is settled into `out` (after a
    /// cancel, those not finished as [`Failure::Cancelled`]).
    ///
    /// # Errors
    /// With [`OnPublishError::Halt`], the first cache error (the run is halted). A
    /// long-lived pipeline ([`OnPublishError::FailPaths`]) never stops on one: a failed
    /// wave fails its paths, a failed sync is logged, and every job still settles.
    pub fn run(
        &self,
        results: Receiver<SinkResult>,
        out: Sender<Settled>,
    ) -> Result<(), CacheError> {
        if self.cache.narinfos_in_flight() <= 1 {
            return self.run_with(results, out, None);
        }
        // See WAVES_IN_FLIGHT: never more waves handed off than this, so neither queue
        // ever holds more (each wave sends back at most MSGS_PER_WAVE messages).
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<WaveJob>(WAVES_IN_FLIGHT);
        let (done_tx, done_rx) =
            crossbeam_channel::bounded::<WaveMsg>(WAVES_IN_FLIGHT * MSGS_PER_WAVE);
        std::thread::scope(|s| {
            for _ in 0..WAVES_IN_FLIGHT {
                let (jobs, done) = (jobs_rx.clone(), done_tx.clone());
                s.spawn(move || {
                    for job in jobs {
                        let narinfos = job.ready.iter().map(|w| w.narinfo.clone()).collect();
                        let gate = ThreadGate {
                            id: job.id,
                            go: job.go.as_ref(),
                            done: &done,
                        };
                        let merged = self.cache.publish_narinfos_after(
                            self.store_dir,
                            narinfos,
                            job.deadline,
                            &gate,
                        );
                        let _ = done.send(WaveMsg::Done(WaveDone {
                            id: job.id,
                            ready: job.ready,
                            merged,
                        }));
                    }
                });
            }
            drop((jobs_rx, done_tx));
            // The threads end once the job queue closes (when `run_with` returns).
            self.run_with(results, out, Some((jobs_tx, done_rx)))
        })
    }

    /// [`PublishStage::run`], handing waves to publishing threads through `waves`, or
    /// publishing each on this thread.
    fn run_with(
        &self,
        results: Receiver<SinkResult>,
        out: Sender<Settled>,
        waves: Option<(Sender<WaveJob>, Receiver<WaveMsg>)>,
    ) -> Result<(), CacheError> {
        let never = crossbeam_channel::never();
        let mut run = Run {
            stage: self,
            out,
            pending: Vec::new(),
            dirty: false,
            gate: Gate::new(self.gc_wait),
            reading: None,
            waves,
            waves_out: 0,
            narinfos_out: 0,
            flights: HashMap::new(),
            writing: HashMap::new(),
            next_wave: 0,
        };
        loop {
            let landed = run.waves.as_ref().map_or(&never, |(_, done)| done).clone();
            crossbeam_channel::select! {
                recv(results) -> r => {
                    let Ok(first) = r else { break };
                    let mut batch = vec![first];
                    while batch.len() < WAVE_MAX {
                        match results.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    if self.stop.is_stopped() {
                        // Drained and dropped: nothing more is published once stopped.
                        continue;
                    }
                    for r in batch {
                        run.absorb(r);
                    }
                },
                recv(landed) -> d => match d {
                    Ok(WaveMsg::Writing(id)) => run.writing(id),
                    Ok(WaveMsg::Done(d)) => run.land(d)?,
                    // Every publishing thread is gone (none ends while the queue is
                    // open, unless it panicked): waves go on on this thread.
                    Err(_) => run.waves = None,
                },
            }
            if self.stop.is_stopped() {
                continue;
            }
            run.waves()?;
            if run.dirty
                && run.pending.is_empty()
                && run.waves_out == 0
                && results.is_empty()
                && !self.stop.is_stopped()
            {
                // Idle, with no narinfo on its way (whose wave would name every committed
                // NAR): NARs committed without a narinfo of their own (a reference failed,
                // or the cache kept its narinfo) get their final names now. No job waits
                // on this sync, so a long-lived pipeline only logs its failure (and syncs
                // again when next idle); a one-shot push halts, since its end is owed one.
                match self.cache.sync() {
                    Ok(()) => run.dirty = false,
                    Err(e) if self.on_error == OnPublishError::Halt => {
                        self.stop.halt();
                        return Err(e);
                    }
                    Err(e) => tracing::warn!("{}: {e}", self.cache.url()),
                }
            }
        }
        run.finish()
    }
}

impl Run<'_, '_> {
    fn emit(&self, decided: Vec<(JobId, StorePath, Outcome)>) {
        let stage = self.stage;
        {
            let mut book = stage.book();
            for (id, path, outcome) in &decided {
                match outcome {
                    Outcome::Uploaded { .. } | Outcome::AlreadyPresent => {
                        book.known.insert(path.clone());
                    }
                    Outcome::Failed(f) => {
                        book.failed.insert(path.clone(), f.retry());
                    }
                }
                book.settle(*id);
            }
        }
        for (_, path, outcome) in decided {
            let result = PathResult {
                path: path.to_absolute(stage.store_dir),
                outcome,
            };
            stage.progress.finished(&result);
            // A caller that stopped listening still lets the pipeline drain.
            let _ = self.out.send(Settled { path, result });
        }
    }

    fn absorb(&mut self, r: SinkResult) {
        match r.outcome {
            Ok((narinfo, file_size)) => {
                self.dirty = true;
                self.pending.push(Waiting {
                    id: r.job.id,
                    narinfo: *narinfo,
                    file_size,
                    nar_reused: r.nar_reused,
                    alone: false,
                });
            }
            Err(why) => {
                let path = r.job.info.path.clone();
                self.emit(vec![(r.job.id, path, Outcome::Failed(why))]);
            }
        }
    }

    /// Waves until nothing more is ready.
    fn waves(&mut self) -> Result<(), CacheError> {
        while !self.pending.is_empty() && !self.stage.stop.is_stopped() {
            if !self.wave()? {
                break;
            }
        }
        Ok(())
    }

    /// One wave: fails what waits for a failed path, publishes every pending narinfo
    /// whose references are all known or being written (those wait in their wave for the
    /// writes to land). Returns whether it decided anything.
    fn wave(&mut self) -> Result<bool, CacheError> {
        let stage = self.stage;
        let mut decided = Vec::new();
        let mut ready = Vec::new();
        let mut soon = Vec::new();
        let mut unknown: Vec<StorePath> = Vec::new();
        {
            let book = stage.book();
            let mut keep = Vec::new();
            for w in std::mem::take(&mut self.pending) {
                let waits = book
                    .jobs
                    .get(&w.id)
                    .map(|e| e.waits_for.as_slice())
                    .unwrap_or_default();
                let states: Vec<(&StorePath, RefState)> =
                    waits.iter().map(|r| (r, book.state(r))).collect();
                let being_written = |r: &StorePath, s: RefState| {
                    s == RefState::Coming && self.writing.contains_key(r)
                };
                if let Some((bad, retry)) = states.iter().find_map(|(r, s)| match s {
                    RefState::Failed(retry) => Some((*r, *retry)),
                    _ => None,
                }) {
                    let why = Failure::ReferenceFailed {
                        reference: bad.to_absolute(stage.store_dir),
                        retry,
                    };
                    decided.push((w.id, w.narinfo.store_path, Outcome::Failed(why)));
                } else if states.iter().all(|(_, s)| *s == RefState::Known) {
                    ready.push(w);
                } else if states
                    .iter()
                    .all(|(r, s)| *s == RefState::Known || being_written(r, *s))
                {
                    soon.push(w);
                } else {
                    unknown.extend(
                        states
                            .iter()
                            .filter(|(_, s)| *s == RefState::Unknown)
                            .map(|(r, _)| (*r).clone()),
                    );
                    keep.push(w);
                }
            }
            self.pending = keep;
        }
        // What the waves in flight leave room for; the rest waits for them to land.
        // Those ready now go first, apart from those that wait for writes in flight, so
        // that no wave waits for more than its own narinfos need.
        let room = self.room();
        if ready.len() > room {
            self.pending.extend(ready.split_off(room));
        }
        let room = room - ready.len();
        if soon.len() > room {
            self.pending.extend(soon.split_off(room));
        }
        let progressed =
            !decided.is_empty() || !ready.is_empty() || !soon.is_empty() || !unknown.is_empty();
        // Failures first: they cascade to their waiters in the next wave.
        self.emit(decided);
        if !unknown.is_empty() {
            self.look_up(unknown)?;
        }
        if !ready.is_empty() {
            self.publish_cleared(ready)?;
        }
        if !soon.is_empty() {
            self.publish_cleared(soon)?;
        }
        Ok(progressed)
    }

    /// Publishes `ready` in slices the cache writes at once
    /// ([`BinaryCache::narinfos_in_flight`]; all of it for a local directory, whose wave
    /// is a rename each), each started within half of [`WAVE_FRESH`] of a reading of the
    /// gc marker that found no gc running ([`Run::clear`]), so its writes start within
    /// [`WAVE_FRESH`] of it.
    fn publish_cleared(&mut self, mut ready: Vec<Waiting>) -> Result<(), CacheError> {
        let slice = match self.stage.cache.narinfos_in_flight() {
            0 | 1 => WAVE_MAX,
            n => n,
        };
        while !ready.is_empty() {
            if !self.clear(&mut ready)? {
                // Stopped while a gc ran: left for `finish` to settle.
                self.pending.append(&mut ready);
                return Ok(());
            }
            // One whose wave failed as a whole goes in a wave of its own.
            let cut = match ready.iter().position(|w| w.alone) {
                Some(0) => 1,
                Some(i) => i.min(slice),
                None => slice.min(ready.len()),
            };
            let rest = ready.split_off(cut.min(ready.len()));
            let now = std::mem::replace(&mut ready, rest);
            if now.is_empty() {
                continue;
            }
            if self.waves.is_some() && self.waves_out >= WAVES_IN_FLIGHT {
                // No thread free: the rest waits for a wave to land.
                self.pending.append(&mut ready);
                self.pending.extend(now);
                return Ok(());
            }
            self.publish(now)?;
        }
        Ok(())
    }

    /// Narinfos the next wave may take: all of a wave on this thread; with publishing
    /// threads, what the waves in flight leave of the cache's narinfos in flight (none
    /// while every thread has a wave).
    fn room(&self) -> usize {
        if self.waves.is_none() {
            return usize::MAX;
        }
        if self.waves_out >= WAVES_IN_FLIGHT {
            return 0;
        }
        self.stage
            .cache
            .narinfos_in_flight()
            .saturating_sub(self.narinfos_out)
    }

    /// A wave's writes are being sent: what waits for its paths may be handed off.
    fn writing(&mut self, id: WaveId) {
        if let Some(f) = self.flights.get(&id) {
            for (_, p) in &f.jobs {
                self.writing.insert(p.clone(), id);
            }
        }
    }

    /// Takes in a wave back from a publishing thread, then tells each wave that waited
    /// only for it (and others landed before) whether it may write: only if every
    /// reference it waits for is now known (durable).
    fn land(&mut self, done: WaveDone) -> Result<(), CacheError> {
        self.waves_out -= 1;
        self.narinfos_out -= done.ready.len();
        if let Some(f) = self.flights.remove(&done.id) {
            for (_, p) in &f.jobs {
                if self.writing.get(p) == Some(&done.id) {
                    self.writing.remove(p);
                }
            }
        }
        let landed = match done.merged {
            // A reference did not land: nothing was written, and the paths wait again
            // (or fail with their reference, in the next wave).
            Ok(None) => {
                self.pending.extend(done.ready);
                Ok(())
            }
            Ok(Some(merged)) => self.settle_wave(done.ready, Ok(merged)),
            Err(e) => self.settle_wave(done.ready, Err(e)),
        };
        self.release(done.id);
        landed
    }

    /// Tells the waves that waited for wave `id` (and no other still in flight) whether
    /// they may write.
    fn release(&mut self, id: WaveId) {
        let stage = self.stage;
        let mut free = Vec::new();
        for (wid, f) in &mut self.flights {
            if f.after.remove(&id) && f.after.is_empty() {
                free.push(*wid);
            }
        }
        for wid in free {
            let Some(f) = self.flights.get_mut(&wid) else {
                continue;
            };
            let go = !stage.stop.is_stopped() && {
                let book = stage.book();
                f.jobs.iter().all(|(job, _)| {
                    book.jobs.get(job).is_none_or(|e| {
                        e.waits_for.iter().all(|r| book.state(r) == RefState::Known)
                    })
                })
            };
            if let Some(tx) = f.go.take() {
                let _ = tx.send(go);
            }
        }
    }

    /// Makes sure the publisher holds a fresh reading of the gc marker that found no gc
    /// running (its own, or the one a submission was planned from; reading it again, and
    /// waiting while a gc runs, when the last one is older than
    /// [`super::gc_gate::GcWait::fresh`]), and that every job of `ready` was planned or checked
    /// in that reading's epoch: the others are checked again ([`Run::recheck`]), and
    /// those whose reference or NAR a gc removed are settled failed and leave `ready`.
    /// False when the run stopped while waiting.
    fn clear(&mut self, ready: &mut Vec<Waiting>) -> Result<bool, CacheError> {
        let stage = self.stage;
        loop {
            // A submission planned from a newer reading than the publisher's own: the
            // publisher takes it as its own.
            if let Some(theirs) = stage.book().reading
                && self.reading.is_none_or(|mine| mine.at < theirs.at)
            {
                self.reading = Some(theirs);
            }
            let reading = match self.reading {
                Some(r) if r.at.elapsed() < stage.gc_wait.fresh => r,
                _ => {
                    let stopped = || stage.stop.is_stopped();
                    match self.gate.settle(stage.cache, &stopped, stage.progress) {
                        Ok(Some(r)) => {
                            self.reading = Some(r);
                            r
                        }
                        Ok(None) => return Ok(false),
                        Err(e) => {
                            self.fail_cache(std::mem::take(ready), e)?;
                            return Ok(true);
                        }
                    }
                }
            };
            let older: Vec<bool> = {
                let book = stage.book();
                ready
                    .iter()
                    .map(|w| {
                        book.jobs
                            .get(&w.id)
                            .is_some_and(|e| e.epoch != reading.epoch)
                    })
                    .collect()
            };
            if !older.contains(&true) {
                return Ok(true);
            }
            let (check, keep): (Vec<_>, Vec<_>) = std::mem::take(ready)
                .into_iter()
                .zip(older)
                .partition(|(_, older)| *older);
            *ready = keep.into_iter().map(|(w, _)| w).collect();
            let passed =
                self.recheck(check.into_iter().map(|(w, _)| w).collect(), reading.epoch)?;
            ready.extend(passed);
            ready.sort_by_key(|w| w.id);
            // The check took time: the reading may have to be renewed.
        }
    }

    /// Jobs planned before a gc that has run since (`epoch` is the reading's now): checks
    /// that every reference's narinfo (but those served from elsewhere) and the NAR each
    /// found in the cache instead of writing are still there. Returns those that pass,
    /// now in `epoch`; the others are settled failed ([`Failure::RemovedByGc`]).
    fn recheck(&mut self, jobs: Vec<Waiting>, epoch: Epoch) -> Result<Vec<Waiting>, CacheError> {
        let stage = self.stage;
        let mut refs: Vec<StorePath> = Vec::new();
        {
            let book = stage.book();
            for w in &jobs {
                let elsewhere = book
                    .jobs
                    .get(&w.id)
                    .map(|e| e.elsewhere.as_slice())
                    .unwrap_or_default();
                // A reference a wave in flight is writing is not looked for: this one
                // writes only once that write has landed, durably, after the gc.
                refs.extend(
                    w.narinfo
                        .references
                        .iter()
                        .filter(|r| {
                            **r != w.narinfo.store_path
                                && !elsewhere.contains(r)
                                && !self.writing.contains_key(*r)
                        })
                        .cloned(),
                );
            }
        }
        refs.sort();
        refs.dedup();
        tracing::info!(
            "{}: a gc ran since {} paths were planned: checking that the {} narinfos they refer to are still there",
            stage.cache.url(),
            jobs.len(),
            refs.len()
        );
        let present = match stage.cache.has_narinfos(&refs) {
            Ok(p) => p,
            Err(e) => {
                self.fail_cache(jobs, e)?;
                return Ok(Vec::new());
            }
        };
        let gone: HashSet<&StorePath> = refs
            .iter()
            .zip(present)
            .filter(|(_, there)| !there)
            .map(|(r, _)| r)
            .collect();
        let mut passed = Vec::with_capacity(jobs.len());
        let mut decided = Vec::new();
        let mut jobs = jobs.into_iter();
        while let Some(w) = jobs.next() {
            let mut missing = w
                .narinfo
                .references
                .iter()
                .find(|r| gone.contains(r))
                .map(|r| {
                    format!(
                        "the narinfo {} of its reference {}",
                        crate::cache::narinfo_key(r),
                        r.to_absolute(stage.store_dir)
                    )
                });
            if missing.is_none() && w.nar_reused {
                match stage.cache.object_size(&w.narinfo.url) {
                    Ok(size) if size == Some(w.file_size) => {}
                    Ok(_) => missing = Some(format!("its NAR {}", w.narinfo.url)),
                    Err(e) => {
                        let mut rest: Vec<Waiting> = vec![w];
                        rest.extend(jobs);
                        self.emit(decided);
                        self.fail_cache(rest, e)?;
                        return Ok(passed);
                    }
                }
            }
            match missing {
                Some(object) => {
                    tracing::warn!(
                        "{}: {}: {object} was removed by a gc: not published",
                        stage.cache.url(),
                        w.narinfo.store_path.to_absolute(stage.store_dir)
                    );
                    let why = Failure::RemovedByGc { object };
                    decided.push((w.id, w.narinfo.store_path, Outcome::Failed(why)));
                }
                None => passed.push(w),
            }
        }
        {
            let mut book = stage.book();
            for w in &passed {
                if let Some(e) = book.jobs.get_mut(&w.id) {
                    e.epoch = epoch;
                }
            }
        }
        self.emit(decided);
        Ok(passed)
    }

    /// A cache error kept `jobs` from being published: the run halts
    /// ([`OnPublishError::Halt`]), or they fail with it.
    fn fail_cache(&mut self, jobs: Vec<Waiting>, e: CacheError) -> Result<(), CacheError> {
        let stage = self.stage;
        if stage.on_error == OnPublishError::Halt {
            stage.stop.halt();
            return Err(e);
        }
        tracing::warn!("{}: {e}", stage.cache.url());
        let why = Failure::from_cache(&e);
        let decided = jobs
            .into_iter()
            .map(|w| (w.id, w.narinfo.store_path, Outcome::Failed(why.clone())))
            .collect();
        self.emit(decided);
        Ok(())
    }

    /// Publishes `ready` (narinfos whose references are all known) and settles them: on
    /// this thread, or handed to a publishing thread (settled when it lands).
    fn publish(&mut self, ready: Vec<Waiting>) -> Result<(), CacheError> {
        let stage = self.stage;
        // No write starts later than gc's protocol allows after the reading `clear` took.
        let read = self.reading.map_or_else(std::time::Instant::now, |r| r.at);
        let deadline = read + WAVE_FRESH;
        if let Some((jobs, _)) = &self.waves {
            let n = ready.len();
            let id = self.next_wave;
            self.next_wave += 1;
            // The waves writing a reference of this one: it writes once they have landed.
            let after: HashSet<WaveId> = {
                let book = stage.book();
                ready
                    .iter()
                    .filter_map(|w| book.jobs.get(&w.id))
                    .flat_map(|e| e.waits_for.iter())
                    .filter_map(|r| self.writing.get(r).copied())
                    .collect()
            };
            // One word, sent once: whether to write.
            let (go, go_rx) = match after.is_empty() {
                true => (None, None),
                false => {
                    let (tx, rx) = crossbeam_channel::bounded(1);
                    (Some(tx), Some(rx))
                }
            };
            let flight = Flight {
                jobs: ready
                    .iter()
                    .map(|w| (w.id, w.narinfo.store_path.clone()))
                    .collect(),
                after,
                go,
            };
            let job = WaveJob {
                id,
                ready,
                deadline,
                go: go_rx,
            };
            if jobs.send(job).is_ok() {
                self.waves_out += 1;
                self.narinfos_out += n;
                self.flights.insert(id, flight);
            }
            return Ok(());
        }
        // Everything ready in one wave is independent of the rest of the wave (its
        // references are known already), so the cache may write the wave concurrently.
        let narinfos: Vec<NarInfo> = ready.iter().map(|w| w.narinfo.clone()).collect();
        let merged = stage
            .cache
            .publish_narinfos_by(stage.store_dir, narinfos, deadline);
        self.settle_wave(ready, merged)
    }

    /// Settles the paths of a wave by what the cache made of them.
    fn settle_wave(
        &mut self,
        ready: Vec<Waiting>,
        merged: Result<Vec<crate::cache::Published>, CacheError>,
    ) -> Result<(), CacheError> {
        let stage = self.stage;
        match merged {
            Ok(merged) => {
                if merged.iter().any(|m| matches!(m, Ok(Merged::Written))) {
                    self.dirty = false;
                }
                let decided = ready
                    .into_iter()
                    .zip(merged)
                    .map(|(w, m)| {
                        let outcome = match m {
                            Ok(Merged::Written) => Outcome::Uploaded {
                                nar_size: w.narinfo.nar_size,
                                file_size: w.file_size,
                            },
                            Ok(Merged::Kept) => Outcome::AlreadyPresent,
                            // Its NAR is not in place (a failed write or sync lost it):
                            // this path alone fails, and goes up again on a retry.
                            Err(e) => {
                                tracing::warn!("{}: {e}", stage.cache.url());
                                Outcome::Failed(Failure::from_cache(&e))
                            }
                        };
                        (w.id, w.narinfo.store_path, outcome)
                    })
                    .collect();
                self.emit(decided);
            }
            Err(e) if stage.on_error == OnPublishError::Halt => {
                stage.stop.halt();
                return Err(e);
            }
            Err(e) if ready.len() == 1 => {
                tracing::warn!("{}: {e}", stage.cache.url());
                let w = ready.into_iter().next().expect("one");
                let why = Failure::from_cache(&e);
                self.emit(vec![(w.id, w.narinfo.store_path, Outcome::Failed(why))]);
            }
            Err(e) => {
                // One path's narinfo may be what the cache refuses: each is tried alone,
                // so the failure ends up on the path that causes it.
                tracing::info!(
                    "{}: publishing {} narinfos together failed ({e}); publishing each alone",
                    stage.cache.url(),
                    ready.len()
                );
                if self.waves.is_some() {
                    // Each in a wave of its own, as threads come free.
                    self.pending
                        .extend(ready.into_iter().map(|w| Waiting { alone: true, ..w }));
                } else {
                    for w in ready {
                        self.publish(vec![w])?;
                    }
                }
            }
        }
        Ok(())
    }

    /// References waited for that are neither known nor coming: a path published and
    /// forgotten between the caller's look at the cache and its submission. The cache
    /// says whether it is there; one that is not fails its waiters (a retry may pass).
    fn look_up(&mut self, mut unknown: Vec<StorePath>) -> Result<(), CacheError> {
        let stage = self.stage;
        unknown.sort();
        unknown.dedup();
        let present = match stage.cache.has_narinfos(&unknown) {
            Ok(p) => p,
            Err(e) if stage.on_error == OnPublishError::Halt => {
                stage.stop.halt();
                return Err(e);
            }
            Err(e) => {
                tracing::warn!("{}: {e}", stage.cache.url());
                vec![false; unknown.len()]
            }
        };
        let mut book = stage.book();
        for (r, there) in unknown.into_iter().zip(present) {
            if there {
                // Remembered while a waiter is unsettled (its interest keeps it).
                book.known.insert(r);
            } else {
                book.failed.insert(r, Retry::Transient);
            }
        }
        Ok(())
    }

    /// Every result is in: publishes what can be, and settles every job still open
    /// (cancelled, or waiting for references that never became durable).
    fn finish(mut self) -> Result<(), CacheError> {
        let stage = self.stage;
        loop {
            if !stage.stop.is_stopped() {
                self.waves()?;
            }
            if self.waves_out == 0 {
                break;
            }
            let done = match &self.waves {
                Some((_, done)) => done.recv(),
                None => break,
            };
            match done {
                Ok(WaveMsg::Writing(id)) => self.writing(id),
                Ok(WaveMsg::Done(d)) => self.land(d)?,
                Err(_) => break,
            }
        }
        let cancelled = stage.stop.is_cancelled();
        let open: Vec<(JobId, StorePath)> = {
            let book = stage.book();
            let mut open: Vec<(JobId, StorePath)> = book
                .jobs
                .iter()
                .map(|(id, e)| (*id, e.path.clone()))
                .collect();
            open.sort_by_key(|(id, _)| *id);
            open
        };
        let decided = open
            .into_iter()
            .map(|(id, path)| {
                let why = if cancelled {
                    Failure::Cancelled
                } else {
                    Failure::ReferencesNotDurable
                };
                (id, path, Outcome::Failed(why))
            })
            .collect();
        self.pending.clear();
        self.emit(decided);
        if self.dirty || cancelled {
            match stage.cache.sync() {
                Ok(()) => {}
                // Every job is settled: a NAR this sync loses had no narinfo to name.
                Err(e) if stage.on_error == OnPublishError::FailPaths => {
                    tracing::warn!("{}: {e}", stage.cache.url());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
