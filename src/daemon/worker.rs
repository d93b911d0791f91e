//! The upload worker: one thread that takes the due paths in batches, pushes each batch
//! (closures, skipping what the cache has) with [`crate::pipeline::push`], and records per
//! path what happened; and the orphan sweep.
//!
//! One bad path never holds others back: a batch that fails as a whole is split in
//! halves and each half tried again, down to single paths, unless the cache itself is
//! unusable (then every path gets the cache's error). Each failure keeps its retry class:
//! transient ones back off, permanent ones are shown as needing attention.
use super::Shared;
use super::queue::{self, Due, Outcomes};
use super::status::BatchSummary;
use crate::cache::BinaryCache;
use crate::format::store_path::StorePath;
use crate::pipeline::{self, Failure, Outcome, PathResult, Progress, PushOptions};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often finished rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How often orphaned uploads are swept (and once at start).
pub(super) const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// The wait after the queue itself failed (e.g. a full disk), before trying again.
const QUEUE_ERROR_WAIT: Duration = Duration::from_secs(5);

/// What the queue has for the worker.
enum Work {
    /// Paths due now.
    Batch(Vec<Due>),
    /// Nothing due now; the earliest pending path is due then (Unix ms), if any.
    IdleUntil(Option<i64>),
}

pub(super) fn run(
    shared: &Shared,
    cache: &dyn BinaryCache,
    opts: &PushOptions,
    batch: usize,
    bell: &crossbeam_channel::Receiver<()>,
) {
    let mut last_prune: Option<Instant> = None;
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
        // The next due time is only looked up when nothing is due now.
        let work = {
            let q = shared.lock_queue();
            match q.due(now, batch) {
                Ok(d) if d.is_empty() => q.next_due(now).map(Work::IdleUntil),
                r => r.map(Work::Batch),
            }
        };
        let due = match work {
            Ok(Work::Batch(d)) => d,
            Ok(Work::IdleUntil(next)) => {
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
        };
        shared.in_flight.store(due.len(), Ordering::SeqCst);
        let (outcomes, uploaded) = attempt(shared, cache, opts, &due);
        shared.metrics.failed(&outcomes);
        let now = queue::now_ms();
        let recorded = shared.lock_queue().record(&outcomes, now);
        shared.in_flight.store(0, Ordering::SeqCst);
        match recorded {
            Ok(()) => {
                for d in &outcomes.done {
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
        // After the results are recorded: a build log never holds a path back.
        if opts.upload_logs && !uploaded.is_empty() {
            let l = crate::logs::upload_build_logs(cache, &shared.store, &uploaded);
            tracing::info!(
                "build logs: {} uploaded, {} not kept by Nix, {} failed",
                l.uploaded,
                l.missing,
                l.failed
            );
        }
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

/// Counts of one batch, summed over its split parts.
#[derive(Default)]
struct Tally {
    uploaded: usize,
    present: usize,
    failed: usize,
    nar_bytes: u64,
    /// Set once the cache itself failed: the rest of the batch is not tried.
    cache_down: Option<Failure>,
    /// Paths uploaded (closures included), for `--upload-logs`.
    uploaded_paths: Vec<StorePath>,
}

/// Pushes one batch; says per path what happened, and which paths went up.
fn attempt(
    shared: &Shared,
    cache: &dyn BinaryCache,
    opts: &PushOptions,
    due: &[Due],
) -> (Outcomes, Vec<StorePath>) {
    let started = Instant::now();
    let mut out = Outcomes::default();
    let mut items = Vec::with_capacity(due.len());
    for d in due {
        match StorePath::from_absolute_path(&d.path, shared.store_dir()) {
            Ok(p) => items.push((p, d.clone())),
            Err(e) => out.dropped.push((d.clone(), e.to_string())),
        }
    }
    let mut tally = Tally::default();
    push_isolating(shared, cache, opts, &items, &mut out, &mut tally);
    let summary = BatchSummary {
        at: Instant::now(),
        paths: due.len(),
        uploaded: tally.uploaded,
        present: tally.present,
        failed: tally.failed,
        dropped: out.dropped.len(),
        nar_bytes: tally.nar_bytes,
        seconds: started.elapsed().as_secs_f64(),
    };
    tracing::info!(
        "batch of {} paths: {} uploaded ({:.1} MiB NAR), {} already in the cache, {} failed, {} dropped, {:.2} s",
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
    (out, tally.uploaded_paths)
}

/// Pushes `items`; when the push fails as a whole, tries each half again, down to single
/// paths, so that the failure ends up on the path that causes it.
fn push_isolating(
    shared: &Shared,
    cache: &dyn BinaryCache,
    opts: &PushOptions,
    items: &[(StorePath, Due)],
    out: &mut Outcomes,
    tally: &mut Tally,
) {
    if items.is_empty() || opts.cancel.is_cancelled() {
        // Cancelled (shutdown): no outcome, so the paths stay pending as they were.
        return;
    }
    if let Some(f) = &tally.cache_down {
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
        tally.failed += items.len();
        return;
    }
    let paths: Vec<StorePath> = items.iter().map(|(p, _)| p.clone()).collect();
    let progress = DaemonProgress { shared };
    let e = match pipeline::push(&shared.store, cache, &paths, opts, &progress) {
        Ok(report) => return classify(shared, opts, items, &report, out, tally),
        Err(e) => e,
    };
    if opts.cancel.is_cancelled() {
        return;
    }
    let failure = Failure::from_push(&e);
    // Paths that left the store meanwhile are dropped rather than retried forever.
    let mut items = items.to_vec();
    if let Ok((_, invalid)) = pipeline::split_valid(&shared.store, &paths)
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
        return push_isolating(shared, cache, opts, &items, out, tally);
    }
    // Is it the cache, or something about these paths? A cache that cannot even be
    // checked fails every path the same way: splitting would only repeat that.
    if let Err(c) = cache.ensure_cache_info(shared.store_dir()) {
        tracing::warn!("{}: {c}; {} paths wait for it", cache.url(), items.len());
        tally.cache_down = Some(Failure::from_cache(&c));
        return push_isolating(shared, cache, opts, &items, out, tally);
    }
    if items.len() > 1 {
        tracing::info!(
            "{} paths failed together ({e:#}); trying them in halves to find the cause",
            items.len()
        );
        let (a, b) = items.split_at(items.len() / 2);
        push_isolating(shared, cache, opts, a, out, tally);
        push_isolating(shared, cache, opts, b, out, tally);
        return;
    }
    tally.failed += 1;
    fail(out, items[0].1.clone(), failure);
}

/// Files the per-path results of a push that ran.
fn classify(
    shared: &Shared,
    opts: &PushOptions,
    items: &[(StorePath, Due)],
    report: &pipeline::PushReport,
    out: &mut Outcomes,
    tally: &mut Tally,
) {
    tally.nar_bytes += report.nar_bytes;
    if opts.upload_logs {
        let uploaded = crate::logs::uploaded_paths(report, shared.store_dir());
        tally.uploaded_paths.extend(uploaded);
    }
    shared.metrics.ran(report.file_bytes, &report.stages);
    let by_path: HashMap<&str, &Outcome> = report
        .results
        .iter()
        .map(|r| (r.path.as_str(), &r.outcome))
        .collect();
    for (p, due) in items {
        let full = p.to_absolute(shared.store_dir());
        if report.not_valid.contains(&full) {
            drop_collected(out, due.clone());
            continue;
        }
        match by_path.get(full.as_str()) {
            Some(Outcome::Uploaded { .. }) => {
                tally.uploaded += 1;
                out.done.push(due.clone());
            }
            Some(Outcome::AlreadyPresent) => {
                tally.present += 1;
                out.done.push(due.clone());
            }
            // Not a failed attempt: the shutdown stopped it. It stays as it was.
            Some(Outcome::Failed(f)) if opts.cancel.is_cancelled() && f.is_transient() => {}
            Some(Outcome::Failed(f)) => {
                tally.failed += 1;
                fail(out, due.clone(), f.clone());
            }
            None if opts.cancel.is_cancelled() => {}
            None => {
                tally.failed += 1;
                fail(
                    out,
                    due.clone(),
                    Failure::transient(pipeline::FailureKind::Other, "no result from the upload"),
                );
            }
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
