//! The upload worker: feeds one long-lived pipeline ([`crate::pipeline::stream`]) with
//! the due paths as they arrive, and records per path what happened as soon as the
//! pipeline settles it; while nothing uploads (at start, after each stretch of work) it
//! ends the recorded unfinished uploads no run will resume; and the orphan sweep.
//!
//! Two threads share the work while there is any. The feeder takes due paths from the
//! queue, plans them (closures, skipping what the cache has, as `narflow push` does) and
//! submits them; it never waits for earlier paths to finish, so a small path handed off
//! while a large NAR uploads goes in at once. The recorder takes each settled path and
//! marks it in the queue: done once it and its closure are published, or failed with its
//! class (transient ones back off, permanent ones are shown as needing attention). One
//! path's failure never holds back another. The pipeline lives for a stretch of work and
//! ends when nothing is in flight or due (its statistics then go to the metrics); the next
//! hand-off starts a new one.
//!
//! A plan that fails as a whole is split in halves and each half planned again, down to
//! single paths, unless the cache itself is unusable (then every path gets the cache's
//! error).
use super::Shared;
use super::queue::{self, Due, Outcomes};
use super::status::BatchSummary;
use crate::cache::BinaryCache;
use crate::format::store_path::StorePath;
use crate::pipeline::outcome::{Failure, Outcome, PathResult, Progress, UploadedBytes};
use crate::pipeline::publish::{OnPublishError, Settled};
use crate::pipeline::{self, Feeder, PushOptions};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often finished rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How often orphaned uploads are swept (and once at start).
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// The wait after the queue itself failed (e.g. a full disk), before trying again.
const QUEUE_ERROR_WAIT: Duration = Duration::from_secs(5);
/// Longest the feeder waits before looking at the queue again while paths are in flight:
/// a retry that falls due meanwhile is taken within this (a hand-off rings at once).
const BUSY_LOOK: Duration = Duration::from_secs(1);

pub(super) fn run(
    shared: &Shared,
    cache: &dyn BinaryCache,
    opts: &PushOptions,
    batch: usize,
    bell: &crossbeam_channel::Receiver<()>,
) {
    let mut last_prune: Option<Instant> = None;
    let progress = DaemonProgress { shared };
    end_records(shared, cache, "start");
    while !shared.stopping.load(Ordering::SeqCst) {
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            match shared.lock_queue().prune(queue::now_ms()) {
                Ok(0) => {}
                Ok(n) => tracing::info!("pruned {n} finished paths from the queue"),
                Err(e) => tracing::warn!("{e}"),
            }
            last_prune = Some(Instant::now());
        }
        let now = queue::now_ms();
        let next = {
            let q = shared.lock_queue();
            match q.due(now, 1) {
                Ok(d) if d.is_empty() => q.next_due(now).map(Some),
                r => r.map(|_| None),
            }
        };
        match next {
            Ok(None) => {}
            Ok(Some(next)) => {
                // Sleep (on the monotonic clock) until the next retry is due or new work
                // arrives; at most a minute, so a clock step is noticed.
                let until_next = next.map_or(Duration::from_secs(60), |t| {
                    Duration::from_millis((t - now).clamp(1, 60_000) as u64)
                });
                let _ = bell.recv_timeout(until_next);
                continue;
            }
            Err(e) => {
                tracing::error!("{e}");
                let _ = bell.recv_timeout(QUEUE_ERROR_WAIT);
                continue;
            }
        }
        // Something is due: a pipeline runs until nothing is in flight or due.
        let started = Instant::now();
        let work = Work::default();
        let ran = pipeline::stream(
            cache,
            shared.store_dir(),
            opts,
            &progress,
            OnPublishError::FailPaths,
            |feeder, settled| {
                std::thread::scope(|s| {
                    let recorder = s.spawn(|| record_settled(shared, cache, opts, &work, settled));
                    feed(shared, cache, opts, batch, bell, &feeder, &work);
                    drop(feeder);
                    recorder
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p));
                });
            },
        );
        let tally = work.tally.into_inner().unwrap_or_else(|p| p.into_inner());
        let failed_to_start = match ran {
            Ok(((), stages)) => {
                shared.metrics.ran(tally.bytes.file, &stages);
                false
            }
            Err(e) => {
                tracing::error!("cannot start the upload pipeline: {e}");
                true
            }
        };
        summarise(shared, &tally, started);
        // Nothing is uploading now: no record this pass ends can be one being written.
        end_records(shared, cache, "after the batch");
        shared.in_flight.store(0, Ordering::SeqCst);
        if failed_to_start {
            let _ = bell.recv_timeout(QUEUE_ERROR_WAIT);
        }
    }
}

/// What the feeder and the recorder of one pipeline share.
#[derive(Default)]
struct Work {
    /// The queued paths submitted and not yet recorded, by full path.
    flight: Mutex<HashMap<String, Due>>,
    tally: Mutex<Tally>,
}

impl Work {
    fn flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, Due>> {
        self.flight.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts of one pipeline's stretch of work.
#[derive(Default)]
struct Tally {
    paths: usize,
    uploaded: usize,
    present: usize,
    failed: usize,
    dropped: usize,
    bytes: UploadedBytes,
}

/// Takes due paths and submits them until nothing is due or in flight, or the daemon
/// stops.
fn feed(
    shared: &Shared,
    cache: &dyn BinaryCache,
    opts: &PushOptions,
    batch: usize,
    bell: &crossbeam_channel::Receiver<()>,
    feeder: &Feeder<'_>,
    work: &Work,
) {
    while !shared.stopping.load(Ordering::SeqCst) && !opts.cancel.is_cancelled() {
        let now = queue::now_ms();
        // Paths in flight are still pending in the queue: ask for that many more.
        let flying: HashSet<String> = work.flight().keys().cloned().collect();
        let due = shared.lock_queue().due(now, batch + flying.len());
        let due: Vec<Due> = match due {
            Ok(d) => d
                .into_iter()
                .filter(|d| !flying.contains(&d.path))
                .take(batch)
                .collect(),
            Err(e) => {
                tracing::error!("{e}");
                let _ = bell.recv_timeout(QUEUE_ERROR_WAIT);
                continue;
            }
        };
        if due.is_empty() {
            if flying.is_empty() && feeder.unsettled() == 0 {
                return;
            }
            let _ = bell.recv_timeout(BUSY_LOOK);
            continue;
        }
        submit(shared, cache, opts, &due, feeder, work);
    }
}

/// Plans `due` and submits what is left to upload; records at once what needs no upload
/// (in the cache already, gone from the store, refused).
fn submit(
    shared: &Shared,
    cache: &dyn BinaryCache,
    opts: &PushOptions,
    due: &[Due],
    feeder: &Feeder<'_>,
    work: &Work,
) {
    let mut out = Outcomes::default();
    let mut items = Vec::with_capacity(due.len());
    for d in due {
        match StorePath::from_absolute_path(&d.path, shared.store_dir()) {
            Ok(p) => items.push((p, d.clone())),
            Err(e) => out.dropped.push((d.clone(), e.to_string())),
        }
    }
    work.tally().paths += due.len();
    // In flight from the plan on: `narflow status` counts a path being planned too.
    {
        let mut flight = work.flight();
        for (p, d) in &items {
            flight.insert(p.to_absolute(shared.store_dir()), d.clone());
        }
        show_in_flight(shared, &flight);
    }
    let mut cache_down = None;
    plan_isolating(
        shared,
        cache,
        opts,
        &items,
        feeder,
        work,
        &mut out,
        &mut cache_down,
    );
    record(shared, work, &out);
    // What was decided without an upload is out of flight once recorded.
    let mut flight = work.flight();
    for d in out
        .done
        .iter()
        .chain(out.dropped.iter().map(|(d, _)| d))
        .chain(
            out.retry
                .iter()
                .chain(&out.attention)
                .chain(&out.cache_refused)
                .map(|(d, _)| d),
        )
    {
        flight.remove(&d.path);
    }
    show_in_flight(shared, &flight);
}

/// Sets the in-flight count of `narflow status`. It drops to 0 only when the pipeline
/// has ended (see [`run`]): a path's result is recorded a moment before the pipeline's
/// statistics reach the metrics, and a status saying "idle" promises both.
fn show_in_flight(shared: &Shared, flight: &HashMap<String, Due>) {
    if !flight.is_empty() {
        shared.in_flight.store(flight.len(), Ordering::SeqCst);
    }
}

/// Plans and submits `items`; when planning fails as a whole, tries each half again, down
/// to single paths, so that the failure ends up on the path that causes it.
#[allow(clippy::too_many_arguments)]
fn plan_isolating(
    shared: &Shared,
    cache: &dyn BinaryCache,
    opts: &PushOptions,
    items: &[(StorePath, Due)],
    feeder: &Feeder<'_>,
    work: &Work,
    out: &mut Outcomes,
    cache_down: &mut Option<Failure>,
) {
    if items.is_empty() || opts.cancel.is_cancelled() {
        // Cancelled (shutdown): no outcome, so the paths stay pending as they were.
        return;
    }
    if let Some(f) = cache_down {
        for (_, d) in items {
            if f.is_transient() {
                fail(out, d.clone(), f.clone());
            } else {
                out.cache_refused.push((d.clone(), failed(f)));
            }
        }
        if !f.is_transient() {
            tracing::error!(
                "{} paths wait for the cache, which needs attention: {f}",
                items.len()
            );
        }
        return;
    }
    let paths: Vec<StorePath> = items.iter().map(|(p, _)| p.clone()).collect();
    let planned = cache
        .ensure_cache_info(shared.store_dir())
        .map_err(pipeline::outcome::PushError::from)
        .and_then(|()| pipeline::plan::plan(&shared.store, cache, &paths, opts));
    let e = match planned {
        Ok(plan) => return submit_plan(shared, plan, items, feeder, work, out),
        Err(e) => e,
    };
    if opts.cancel.is_cancelled() {
        return;
    }
    let failure = Failure::from_push(&e);
    // Paths that left the store meanwhile are dropped rather than retried forever.
    let mut items = items.to_vec();
    if let Ok((_, invalid)) = crate::store::lookup::split_valid(&shared.store, &paths)
        && !invalid.is_empty()
    {
        let gone: HashSet<String> = invalid.into_iter().map(|(p, _)| p).collect();
        items.retain(|(p, d)| {
            let collected = gone.contains(&p.to_absolute(shared.store_dir()));
            if collected {
                drop_collected(out, d.clone());
            }
            !collected
        });
        return plan_isolating(shared, cache, opts, &items, feeder, work, out, cache_down);
    }
    // Is it the cache, or something about these paths? A cache that cannot even be
    // checked fails every path the same way: splitting would only repeat that.
    if let Err(c) = cache.ensure_cache_info(shared.store_dir()) {
        tracing::warn!("{}: {c}; {} paths wait for it", cache.url(), items.len());
        *cache_down = Some(Failure::from_cache(&c));
        return plan_isolating(shared, cache, opts, &items, feeder, work, out, cache_down);
    }
    if items.len() > 1 {
        tracing::info!(
            "{} paths failed together ({e:#}); trying them in halves to find the cause",
            items.len()
        );
        let (a, b) = items.split_at(items.len() / 2);
        plan_isolating(shared, cache, opts, a, feeder, work, out, cache_down);
        plan_isolating(shared, cache, opts, b, feeder, work, out, cache_down);
        return;
    }
    fail(out, items[0].1.clone(), failure);
}

/// Files what a plan decided without an upload, marks the rest in flight and submits
/// their jobs.
fn submit_plan(
    shared: &Shared,
    plan: pipeline::plan::Plan,
    items: &[(StorePath, Due)],
    feeder: &Feeder<'_>,
    work: &Work,
    out: &mut Outcomes,
) {
    let store_dir = shared.store_dir();
    let present: HashSet<&StorePath> = plan.present.iter().collect();
    let (jobs, refused) = pipeline::plan::jobs_for(&plan.todo, &plan.seen, store_dir, plan.look());
    let refused: HashMap<&StorePath, &Failure> = refused
        .iter()
        .map(|(i, why)| (&plan.todo[*i].path, why))
        .collect();
    {
        let flight = work.flight();
        for (p, due) in items {
            let full = p.to_absolute(store_dir);
            if plan.not_valid.contains(&full) {
                drop_collected(out, due.clone());
            } else if present.contains(p) {
                work.tally().present += 1;
                out.done.push(due.clone());
            } else if let Some(why) = refused.get(p) {
                fail(out, due.clone(), (*why).clone());
            } else {
                // Still in flight (since `submit`): its job's result settles it.
                debug_assert!(flight.contains_key(&full));
            }
        }
    }
    feeder.submit(jobs);
}

/// Takes the pipeline's settled paths and records those that were queued, as soon as
/// they come (what arrives together is recorded in one transaction).
fn record_settled(
    shared: &Shared,
    cache: &dyn BinaryCache,
    opts: &PushOptions,
    work: &Work,
    settled: crossbeam_channel::Receiver<Settled>,
) {
    while let Ok(first) = settled.recv() {
        let mut batch = vec![first];
        batch.extend(settled.try_iter());
        let mut out = Outcomes::default();
        let mut recorded = Vec::new();
        {
            let flight = work.flight();
            let mut tally = work.tally();
            for s in &batch {
                tally.bytes.add(&s.result.outcome);
                let Some(due) = flight.get(&s.result.path) else {
                    continue; // a path of some closure, not one queued
                };
                recorded.push(s.result.path.clone());
                classify(opts, due, &s.result.outcome, &mut out, &mut tally);
            }
        }
        record(shared, work, &out);
        // Out of flight only once recorded, so the feeder never takes a path again whose
        // result is on its way to the queue.
        let mut flight = work.flight();
        for p in recorded {
            flight.remove(&p);
        }
        show_in_flight(shared, &flight);
        drop(flight);
        // The feeder looks again: the pipeline may be done.
        let _ = shared.bell.try_send(());
        // After the results are recorded: a build log never holds a path back.
        if opts.upload_logs {
            upload_logs(shared, cache, &batch);
        }
    }
}

/// Uploads the build logs of the paths of `settled` that went up (closures included).
fn upload_logs(shared: &Shared, cache: &dyn BinaryCache, settled: &[Settled]) {
    let uploaded =
        crate::logs::uploaded_paths(settled.iter().map(|s| &s.result), shared.store_dir());
    if uploaded.is_empty() {
        return;
    }
    let l = crate::logs::upload_build_logs(cache, &shared.store, &uploaded);
    tracing::info!(
        "build logs: {} uploaded, {} not kept by Nix, {} failed",
        l.uploaded,
        l.missing,
        l.failed
    );
}

/// Files one settled queued path.
fn classify(opts: &PushOptions, due: &Due, outcome: &Outcome, out: &mut Outcomes, t: &mut Tally) {
    match outcome {
        Outcome::Uploaded { .. } => {
            t.uploaded += 1;
            out.done.push(due.clone());
        }
        Outcome::AlreadyPresent => {
            t.present += 1;
            out.done.push(due.clone());
        }
        // Not a failed attempt: the shutdown stopped it. It stays as it was.
        Outcome::Failed(f) if opts.cancel.is_cancelled() && f.is_transient() => {}
        // Counted as failed when recorded.
        Outcome::Failed(f) => fail(out, due.clone(), f.clone()),
    }
}

/// Commits outcomes to the queue.
fn record(shared: &Shared, work: &Work, out: &Outcomes) {
    if out.done.is_empty()
        && out.retry.is_empty()
        && out.attention.is_empty()
        && out.cache_refused.is_empty()
        && out.dropped.is_empty()
    {
        return;
    }
    {
        let mut t = work.tally();
        t.failed += out.retry.len() + out.attention.len() + out.cache_refused.len();
        t.dropped += out.dropped.len();
    }
    shared.metrics.failed(out);
    let now = queue::now_ms();
    // Its own statement: the queue is unlocked before any wait below.
    let recorded = shared.lock_queue().record(out, now);
    match recorded {
        Ok(()) => {
            for d in &out.done {
                shared.metrics.published(d.queued, now);
            }
            shared.stats.last_recorded_ms.store(now, Ordering::SeqCst);
        }
        Err(e) => {
            // The paths stay pending; they are attempted again (and found in the cache).
            tracing::error!("cannot record upload results: {e}");
            std::thread::sleep(QUEUE_ERROR_WAIT);
        }
    }
}

/// Logs one pipeline's stretch of work and keeps it for `narflow status`.
fn summarise(shared: &Shared, t: &Tally, started: Instant) {
    let summary = BatchSummary {
        at: Instant::now(),
        paths: t.paths,
        uploaded: t.uploaded,
        present: t.present,
        failed: t.failed,
        dropped: t.dropped,
        nar_bytes: t.bytes.nar,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        "{} paths: {} uploaded ({:.1} MiB NAR), {} already in the cache, {} failed, {} dropped, {:.2} s",
        summary.paths,
        summary.uploaded,
        summary.nar_bytes as f64 / 1048576.0,
        summary.present,
        summary.failed,
        summary.dropped,
        summary.seconds
    );
    *shared
        .stats
        .last_batch
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(summary);
}

/// Ends the recorded unfinished uploads that no run will resume (`when`: at start, after
/// a batch): those of paths the queue has done or dropped, and of paths it does not have
/// that are in the cache, gone from the store, or older than `--resume-max-age`. A path
/// still pending keeps its record. Called only while nothing uploads.
fn end_records(shared: &Shared, cache: &dyn BinaryCache, when: &str) {
    use crate::pipeline::resume::{self, PathState};
    let Some((journal, max_age)) = &shared.records else {
        return;
    };
    let state = |path: &str| match shared.lock_queue().state_of(path) {
        Ok(Some("pending")) => PathState::Queued,
        Ok(Some("done")) => PathState::Done,
        Ok(Some(_)) => PathState::Dropped,
        Ok(None) => PathState::Unknown,
        Err(e) => {
            // Unknown to us now: kept, as a queued path's is, until a later pass.
            tracing::warn!("{e}");
            PathState::Queued
        }
    };
    match resume::end_records(journal.as_ref(), cache, &shared.store, *max_age, &state) {
        Ok(e) if !e.ended.is_empty() || e.failed > 0 => tracing::info!(
            "recorded uploads ({when}): {} ended, {} kept, {} could not be ended",
            e.ended.len(),
            e.kept,
            e.failed
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("recorded uploads ({when}): {e}"),
    }
}

/// Sweeps the cache's orphaned uploads older than `grace` now and every `every`, until
/// `stop` is dropped. Off the request path and off the upload worker: a listing of a
/// large bucket may take a while.
pub(super) fn sweep_orphans(
    cache: &dyn BinaryCache,
    grace: Duration,
    every: Duration,
    stop: &crossbeam_channel::Receiver<()>,
) {
    loop {
        match cache.sweep_orphans(grace) {
            Ok(0) => tracing::debug!("orphan sweep: nothing older than {grace:?} to remove"),
            Ok(n) => tracing::info!(
                "orphan sweep: removed {n} leftovers of interrupted uploads (older than {grace:?})"
            ),
            Err(e) => tracing::warn!("orphan sweep: {e}"),
        }
        if !matches!(
            stop.recv_timeout(every),
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
        ) {
            return;
        }
    }
}

/// Files a failure by its retry class.
fn fail(out: &mut Outcomes, due: Due, f: Failure) {
    if f.is_transient() {
        tracing::warn!("{}: {f}; retrying later", due.path);
        out.retry.push((due, failed(&f)));
    } else {
        tracing::error!(
            "{}: {f}; needs attention (retried in {:?})",
            due.path,
            queue::ATTENTION_RETRY
        );
        out.attention.push((due, failed(&f)));
    }
}

/// A failure as the queue records it: its kind's label and its message.
fn failed(f: &Failure) -> queue::Failed {
    queue::Failed {
        kind: f.kind().as_str(),
        message: f.to_string(),
    }
}

/// Records that a path left the store before it could be uploaded.
fn drop_collected(out: &mut Outcomes, due: Due) {
    tracing::warn!(
        "{} is no longer in the store (garbage-collected?); dropped",
        due.path
    );
    out.dropped.push((
        due,
        "no longer a valid store path (garbage-collected before it was uploaded)".into(),
    ));
}

/// Feeds the status counters.
struct DaemonProgress<'a> {
    shared: &'a Shared,
}

impl Progress for DaemonProgress<'_> {
    fn nar_bytes(&self, bytes: u64) {
        self.shared.stats.add(0, bytes);
    }
    fn finished(&self, result: &PathResult) {
        match &result.outcome {
            Outcome::Uploaded { .. } => self.shared.stats.add(1, 0),
            Outcome::Failed(why) => tracing::debug!("{}: {why}", result.path),
            Outcome::AlreadyPresent => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::resume::UploadJournal;
    use crate::daemon::queue::Queue;
    use crate::pipeline::resume::tests::{Cache, MemoryJournal, now, path, record};
    use std::sync::Arc;

    /// At start and after a batch the daemon ends the records of paths its queue has done
    /// or dropped, and keeps that of a path still pending, however old.
    #[test]
    fn records_of_done_and_dropped_paths_end_and_a_pending_paths_stays() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let [pending, done, dropped] = ["pending", "done", "dropped"].map(path);
        let mut queue = Queue::open(&state).unwrap();
        let t = queue::now_ms();
        queue
            .enqueue(&[pending.clone(), done.clone(), dropped.clone()], None, t)
            .unwrap();
        let due = queue.due(t, 10).unwrap();
        let of = |p: &str| due.iter().find(|d| d.path == p).unwrap().clone();
        let out = Outcomes {
            done: vec![of(&done)],
            dropped: vec![(of(&dropped), "collected".into())],
            ..Default::default()
        };
        queue.record(&out, t).unwrap();
        let journal = Arc::new(MemoryJournal::default());
        for (p, id, age) in [
            (&pending, "u1", 30 * 86_400),
            (&done, "u2", 0),
            (&dropped, "u3", 0),
        ] {
            journal.started(&record(p, id, now() - age)).unwrap();
        }
        let (bell, _) = crossbeam_channel::bounded(1);
        let shared = Shared {
            queue: Mutex::new(queue),
            store: crate::store::LocalStore::open("/nix/store", &state.join("no-db")),
            state_dir: state.clone(),
            bell,
            stopping: Default::default(),
            in_flight: Default::default(),
            stats: Default::default(),
            metrics: Default::default(),
            started: Instant::now(),
            watch: None,
            cache: std::sync::Weak::<crate::cache::null::NullCache>::new(),
            records: Some((journal.clone(), Duration::from_secs(7 * 86_400))),
        };
        let cache = Cache {
            journal: &journal,
            present: Vec::new(),
        };
        end_records(&shared, &cache, "test");
        let left: Vec<String> = journal
            .all("file:///c")
            .unwrap()
            .into_iter()
            .map(|r| r.identity.store_path)
            .collect();
        assert_eq!(left, [pending]);
    }
}
