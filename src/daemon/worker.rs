//! The upload worker: one thread that drains the hook's spool into the queue, takes the
//! due paths in batches, pushes each batch (closures, skipping what the cache has) with
//! [`crate::pipeline::push`], and records per path what happened.
use super::queue::{self, Outcomes};
use super::{BatchSummary, Shared, spool};
use crate::cache::BinaryCache;
use crate::format::store_path::StorePath;
use crate::pipeline::{self, Outcome, PathResult, Progress, PushOptions};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often the spool is checked while the daemon runs (a hook spools when the daemon is
/// busy or restarting, so it must not wait for the next start).
const SPOOL_CHECK: Duration = Duration::from_secs(1);
/// How often finished rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// The wait after the queue itself failed (e.g. a full disk), before trying again.
const QUEUE_ERROR_WAIT: Duration = Duration::from_secs(5);

/// What the queue has for the worker.
enum Work {
    /// Paths due now.
    Batch(Vec<String>),
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
    let mut last_spool_check: Option<Instant> = None;
    let mut last_prune: Option<Instant> = None;
    while !shared.stopping.load(Ordering::SeqCst) {
        if last_spool_check.is_none_or(|t| t.elapsed() >= SPOOL_CHECK) {
            drain_spool(shared);
            last_spool_check = Some(Instant::now());
        }
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
                Ok(d) if d.is_empty() => q.next_due().map(Work::IdleUntil),
                r => r.map(Work::Batch),
            }
        };
        let due = match work {
            Ok(Work::Batch(d)) => d,
            Ok(Work::IdleUntil(next)) => {
                // Sleep until the next retry is due, new work arrives, or the spool needs
                // a look.
                let until_next = next.map_or(SPOOL_CHECK, |t| {
                    Duration::from_millis((t - now).max(1) as u64)
                });
                let _ = bell.recv_timeout(until_next.min(SPOOL_CHECK));
                continue;
            }
            Err(e) => {
                tracing::error!("{e}");
                let _ = bell.recv_timeout(QUEUE_ERROR_WAIT);
                continue;
            }
        };
        shared.in_flight.store(due.len(), Ordering::SeqCst);
        let outcomes = attempt(shared, cache, opts, &due);
        let recorded = shared.lock_queue().record(&outcomes, queue::now_ms());
        shared.in_flight.store(0, Ordering::SeqCst);
        match recorded {
            Ok(()) => shared
                .stats
                .last_recorded_ms
                .store(queue::now_ms(), Ordering::SeqCst),
            Err(e) => {
                // The paths stay pending; they are attempted again (and found in the cache).
                tracing::error!("cannot record upload results: {e}");
                std::thread::sleep(QUEUE_ERROR_WAIT);
            }
        }
    }
}

/// Queues what the hook spooled. The spool file is removed only after everything in it is
/// committed to the queue.
pub(super) fn drain_spool(shared: &Shared) {
    loop {
        let taken = match spool::take(&shared.state_dir) {
            Ok(Some(t)) => t,
            Ok(None) => return,
            Err(e) => {
                tracing::error!("spool in {}: {e}", shared.state_dir.display());
                return;
            }
        };
        if taken.skipped_bytes > 0 {
            tracing::warn!(
                "spool: skipped {} bytes that were not complete request lines",
                taken.skipped_bytes
            );
        }
        let mut queued = 0;
        for line in &taken.lines {
            match super::protocol::Request::parse(line) {
                Ok(super::protocol::Request::Enqueue { drv, paths }) => {
                    match shared.enqueue(drv.as_deref(), &paths) {
                        super::protocol::EnqueueReply::Ok {
                            queued: n,
                            rejected,
                        } => {
                            queued += n;
                            for (token, why) in rejected {
                                tracing::warn!(
                                    "spool: not queued: {}",
                                    super::protocol::rejection(&token, &why)
                                );
                            }
                        }
                        super::protocol::EnqueueReply::Err(why) => {
                            // Keep the spool for the next check.
                            tracing::error!("spool: cannot queue: {why}");
                            return;
                        }
                    }
                }
                Ok(other) => tracing::warn!("spool: ignored {other:?}"),
                Err(why) => tracing::warn!(
                    "spool: ignored a bad line ({why}): {:?}",
                    super::protocol::truncate(line, 200)
                ),
            }
        }
        tracing::info!("spool: queued {queued} paths the hook spooled");
        if let Err(e) = taken.done() {
            tracing::warn!("spool: cannot remove the drained spool (it will be read again): {e}");
            return;
        }
    }
}

/// Pushes one batch; says per path what happened.
fn attempt(
    shared: &Shared,
    cache: &dyn BinaryCache,
    opts: &PushOptions,
    due: &[String],
) -> Outcomes {
    let started = Instant::now();
    let store = &shared.store;
    let mut out = Outcomes::default();
    let mut paths = Vec::with_capacity(due.len());
    for d in due {
        match StorePath::from_absolute_path(d, shared.store_dir()) {
            Ok(p) => paths.push(p),
            Err(e) => out.dropped.push((d.clone(), e.to_string())),
        }
    }
    let all_retry = |out: &mut Outcomes, paths: &[StorePath], why: String| {
        tracing::warn!("{} paths: {why}; retrying later", paths.len());
        for p in paths {
            out.retry
                .push((p.to_absolute(shared.store_dir()), why.clone()));
        }
    };
    let progress = DaemonProgress { shared };
    let report = match pipeline::push(store, cache, &paths, opts, &progress) {
        Ok(r) => r,
        Err(e) => {
            // Nothing went up (e.g. the cache is unreachable). Paths that left the store
            // meanwhile are dropped rather than retried forever.
            let valid = match pipeline::split_valid(store, &paths) {
                Ok((valid, invalid)) => {
                    for (path, _) in invalid {
                        drop_collected(&mut out, path);
                    }
                    valid
                }
                Err(_) => paths,
            };
            all_retry(&mut out, &valid, format!("{e:#}"));
            return out;
        }
    };
    let not_valid: HashSet<&str> = report.not_valid.iter().map(String::as_str).collect();
    for path in &report.not_valid {
        drop_collected(&mut out, path.clone());
    }
    let by_path: HashMap<&str, &Outcome> = report
        .results
        .iter()
        .map(|r| (r.path.as_str(), &r.outcome))
        .collect();
    for p in &paths {
        let full = p.to_absolute(shared.store_dir());
        if not_valid.contains(full.as_str()) {
            continue;
        }
        match by_path.get(full.as_str()) {
            Some(Outcome::Uploaded { .. } | Outcome::AlreadyPresent) => out.done.push(full),
            Some(Outcome::Failed(why)) => {
                tracing::warn!("{full}: {why}; retrying later");
                out.retry.push((full, why.message.clone()));
            }
            None => out.retry.push((full, "no result from the upload".into())),
        }
    }
    let summary = BatchSummary {
        at: Instant::now(),
        paths: due.len(),
        uploaded: report.count(|o| matches!(o, Outcome::Uploaded { .. })),
        present: report.count(|o| matches!(o, Outcome::AlreadyPresent)),
        failed: report.failed().count() - report.not_valid.len(),
        dropped: out.dropped.len(),
        nar_bytes: report.nar_bytes,
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
    out
}

/// Records that `path` left the store before it could be uploaded.
fn drop_collected(out: &mut Outcomes, path: String) {
    tracing::warn!("{path} is no longer in the store (garbage-collected?); dropped");
    out.dropped.push((
        path,
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
