//! Pushing store paths to a binary cache: a staged pipeline over bounded channels. This
//! file wires the stages and sets every capacity; the stages' work is in their files,
//! planning in [`plan`], what a push reports in [`outcome`].
//!
//! ```text
//! plan ─► Feeder ─jobs─► walk (2 threads) ─chunks─► hash ─► compress (rayon, --jobs) ─chunks─► sink ─results─► publish ─settled─► caller
//!         topo order     NAR, fixed-size   NarHash  one zstd frame / xz stream,         reorder,          narinfo waves
//!         skip present   chunks                     small paths first                   FileHash, upload  (closure order)
//! ```
//!
//! [`stream`] keeps the stages up for as long as its caller feeds them, settling each job
//! as soon as its narinfo is durable; [`upload_after`] (and so [`upload`] and [`push`]) is
//! one submission to a pipeline that ends with it; [`push`] starts the stages while it
//! still looks at the cache, sending small paths in [`ahead`] of the plan, which wait at
//! the sink for its verdict. One [`stage::Stop`] stops every stage.
//! Memory is bounded by [`PushOptions::memory`] (see [`Capacities`]), never by NAR size.
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

pub mod ahead;
pub mod budget;
pub mod buffers;
pub mod compress;
pub mod gc_gate;
pub mod lanes;
pub mod outcome;
pub mod plan;
pub mod publish;
pub mod resume;
pub mod sink;
pub mod stage;
pub mod stats;
pub mod walk;

use crate::cache::gc_marker::Epoch;
use crate::cache::{BinaryCache, CacheError};
use crate::format::compression::CompressionSettings;
use crate::format::signing::SigningKey;
use crate::format::store_path::StorePath;
use crate::store::{LocalStore, PathInfo};
use outcome::{Failure, Outcome, PathResult, Progress, PushError, PushReport};
use publish::{NewJob, OnPublishError, Settled};
use stats::StageStats;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The budget's default and overhead, and the default chunk size: the memory budget's
/// ([`crate::memory`]), which splits `--memory` for every user.
use crate::memory::{DEFAULT_CHUNK_SIZE, DEFAULT_MEMORY};

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
    /// How a running gc of the cache is waited for: never a setting (the protocol's
    /// timing); only tests shorten it.
    pub gc_wait: gc_gate::GcWait,
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
            gc_wait: gc_gate::GcWait::default(),
        }
    }
    /// The settings that decide a NAR's compressed bytes (codec, level, chunk size), as
    /// one string: two runs with the same NAR and the same string produce the same frames,
    /// so an upload one of them left unfinished can be resumed by the other.
    pub fn compression_identity(&self) -> String {
        format!(
            "{}-{}/chunk={}",
            self.compression.kind.nix_name(),
            self.compression.level,
            self.chunk_size
        )
    }
    /// What the cache's constructor is given: its share of the memory budget
    /// ([`crate::memory::Budget::cache_share`]) and `s3`, the S3 tuning.
    pub fn cache_options(&self, s3: crate::cache::S3Tuning) -> crate::cache::OpenOptions {
        crate::cache::OpenOptions {
            upload_memory: crate::memory::Budget::cache_share(self.memory),
            max_rate: self.max_rate,
            s3,
            journal: None,
            signers: self.keys.iter().map(SigningKey::verifying_key).collect(),
        }
    }
}

/// [`plan::look_before_writes`] while `nix-cache-info` is checked (and created if missing)
/// on another thread, so that its round trip overlaps the look's; the look writes nothing
/// before the check has passed. The check's error comes first (it tells an unreachable
/// or misconfigured cache).
///
/// # Errors
/// [`PushError`] from either.
fn look_beside_cache_info(
    cache: &dyn BinaryCache,
    store_dir: &str,
    side: plan::StoreSide,
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<plan::Plan, PushError> {
    std::thread::scope(|s| {
        let joined = |h: std::thread::ScopedJoinHandle<'_, Result<(), CacheError>>| {
            h.join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
                .map_err(PushError::from)
        };
        let mut check = Some(s.spawn(|| cache.ensure_cache_info(store_dir)));
        let planned = plan::look_before_writes(cache, store_dir, side, opts, progress, &mut || {
            check.take().map_or(Ok(()), joined)
        });
        if let Some(h) = check {
            joined(h)?;
        }
        planned
    })
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

    let side = plan::store_side(store, paths, opts)?;
    // Sent ahead of the look: its small paths, in plan order.
    let ahead: Vec<PathInfo> = side
        .infos
        .iter()
        .filter(|i| {
            i.nar_size <= opts.chunk_size as u64 && cache.compresses_during_look(i.nar_size)
        })
        .take(AHEAD_MAX)
        .cloned()
        .collect();
    let (planned, stages) = stream(
        cache,
        &store_dir,
        opts,
        progress,
        OnPublishError::Halt,
        |feeder, settled| {
            let sending = feeder.ahead();
            let rest = std::thread::scope(|s| {
                let sender = s.spawn(|| sending.send(&ahead));
                let _abandon = sending.abandon_on_drop();
                let planned =
                    look_beside_cache_info(cache, &store_dir, side, opts, progress).map(|plan| {
                        for path in &plan.not_valid {
                            report.not_valid.push(path.clone());
                            let why = Failure::NotValid { path: path.clone() };
                            record(&mut report, path.clone(), Outcome::Failed(why));
                        }
                        for p in &plan.present {
                            let path = p.to_absolute(&store_dir);
                            record(&mut report, path, Outcome::AlreadyPresent);
                        }
                        let (todo, seen, look) = (&plan.todo, &plan.seen, plan.look());
                        planned_jobs(todo, seen, &store_dir, look, progress, &mut report)
                    });
                // Decided either way (nothing is kept when the look failed), so the
                // sender, which may wait on the pipeline, ends.
                let (jobs, failed) = match planned {
                    Ok(jobs) => (jobs, None),
                    Err(e) => (Vec::new(), Some(e)),
                };
                let rest = sending.decide(jobs);
                sender
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                failed.map_or(Ok(rest), Err)
            });
            drop(sending);
            let rest = rest?;
            std::thread::scope(|s| {
                s.spawn(move || feeder.send(rest));
                for done in settled {
                    report.bytes.add(&done.result.outcome);
                    report.results.push(done.result);
                }
            });
            Ok::<(), PushError>(())
        },
    )?;
    planned?;
    report.stages = stages;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Paths sent ahead of the look at most: more than the pipeline holds before its first
/// commit waits for the look (its queues, walkers, compressors and finishers hold a few
/// hundred small jobs), so the limit only bounds the copy of their infos.
const AHEAD_MAX: usize = 512;
// The push waits for its sender of paths ahead before it takes what settles: only jobs
// sent ahead can settle meanwhile, and the settled queue must hold them all.
const _: () = assert!(AHEAD_MAX < SETTLED_QUEUE);

/// The jobs that upload `todo` (see [`plan::jobs_for`]), with their total reported to
/// `progress` as planned; the paths refused before any upload go into `report`.
fn planned_jobs(
    todo: &[PathInfo],
    seen: &HashSet<StorePath>,
    store_dir: &str,
    look: impl Into<publish::Look>,
    progress: &dyn Progress,
    report: &mut PushReport,
) -> Vec<NewJob> {
    progress.planned(todo.len(), todo.iter().map(|i| i.nar_size).sum());
    let (jobs, refused) = plan::jobs_for(todo, seen, store_dir, look);
    for (i, why) in refused {
        let r = PathResult {
            path: todo[i].path.to_absolute(store_dir),
            outcome: Outcome::Failed(why),
        };
        progress.finished(&r);
        report.results.push(r);
    }
    jobs
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
    upload_after(
        cache,
        store_dir,
        infos,
        &HashSet::new(),
        Epoch::default(),
        opts,
        progress,
    )
}

/// Uploads planned paths (in an order where references come first) and publishes their
/// narinfos. The store is not consulted: `infos` are trusted for NarHash, NarSize and
/// references. `narflow bench` calls this directly with synthetic store paths.
///
/// `seen` are the paths found in the cache (by `look`, in its gc epoch): a reference
/// must be one of them or in `infos`. A path with a reference that is neither, or that
/// refers to a path refused or failed, is not uploaded or published (refusals propagate
/// to every referrer).
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
    look: impl Into<publish::Look>,
    opts: &PushOptions,
    progress: &dyn Progress,
) -> Result<PushReport, PushError> {
    let started = Instant::now();
    let mut report = PushReport::default();
    let jobs = planned_jobs(infos, seen, store_dir, look, progress, &mut report);
    if infos.is_empty() {
        return Ok(report);
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
                    report.bytes.add(&done.result.outcome);
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

impl<'p> Feeder<'p> {
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
        self.send(jobs)
    }

    /// Sends in jobs registered already ([`ahead::Ahead::decide`]'s), in order; blocks
    /// while the pipeline is full. Returns how many went in.
    pub fn send(&self, jobs: Vec<std::sync::Arc<stage::Job>>) -> usize {
        let mut sent = 0;
        for job in jobs {
            if self.stop.is_stopped() || self.jobs.send(job).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    }

    /// A way to send jobs ahead of the look at the cache that plans them
    /// ([`ahead`]).
    pub fn ahead(&self) -> ahead::Ahead<'p> {
        ahead::Ahead::new(self.book, self.jobs.clone(), self.stop.clone())
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
        gc_wait: opts.gc_wait,
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

// First: the stand-in caches of the test modules after it use its `forward_to!`.
#[cfg(test)]
#[macro_use]
mod tests;
#[cfg(test)]
mod ahead_tests;
#[cfg(test)]
mod faults;
#[cfg(test)]
mod gc_tests;
