//! The sink stage: puts each job's compressed chunks back in order, computes FileHash,
//! streams them into the cache, and on the last chunk checks the NAR against the store,
//! commits the upload and builds the signed narinfo.
//!
//! Chunks of many jobs arrive interleaved and out of order; each job's are buffered until
//! their turn. The buffer is bounded by the memory budget, since every buffered chunk
//! still holds its permit.
use super::PushOptions;
use super::lanes::LaneReceiver;
use super::outcome::{Failure, FailureKind, Progress};
use super::stage::{Chunk, NarEnd};
use super::stage::{Job, JobId, Running, Stop};
use super::stats::{StageClock, StageStats};
use crate::cache::resume::NarIdentity;
use crate::cache::{BinaryCache, NarUpload};
use crate::format::hash::HashingWriter;
use crate::format::narinfo::NarInfo;
use crossbeam_channel::{Receiver, Sender};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::Arc;
use std::thread::Scope;

/// What the sink reports for one job.
#[derive(Debug)]
pub struct SinkResult {
    pub job: Arc<Job>,
    /// The narinfo to publish and the compressed size, or why the job failed.
    pub outcome: Result<(Box<NarInfo>, u64), Failure>,
    /// The NAR was in the cache already (its FileHash names it) and was not written again.
    pub nar_reused: bool,
}

impl SinkResult {
    /// The result of `job` from what [`SinkStage::finish`] made of it: the narinfo, its
    /// compressed size and whether the NAR was found in the cache, or the failure.
    fn of(job: Arc<Job>, finished: Result<(Box<NarInfo>, u64, bool), Failure>) -> Self {
        match finished {
            Ok((narinfo, file_size, nar_reused)) => SinkResult {
                job,
                outcome: Ok((narinfo, file_size)),
                nar_reused,
            },
            Err(why) => SinkResult {
                job,
                outcome: Err(why),
                nar_reused: false,
            },
        }
    }
}

/// A job whose last chunk is written, on its way to a finisher.
pub type Handoff = (Arc<Job>, JobState, NarEnd);

/// A job the sink has seen chunks of.
pub struct JobState {
    next_seq: u32,
    waiting: BTreeMap<u32, Chunk>,
    /// `None` once the job has failed: its remaining chunks are only drained.
    upload: Option<HashingWriter<Box<dyn NarUpload>>>,
    error: Option<Failure>,
}

pub struct SinkStage<'a> {
    pub cache: &'a dyn BinaryCache,
    pub store_dir: &'a str,
    pub opts: &'a PushOptions,
    pub progress: &'a dyn Progress,
    /// Threads committing finished uploads (1: commit inline).
    pub finishers: usize,
    /// Where written chunk buffers go back to.
    pub buffers: super::buffers::BufferPool,
    pub stop: Stop,
}

impl std::fmt::Debug for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobState")
            .field("next_seq", &self.next_seq)
            .field("waiting", &self.waiting.len())
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SinkStage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkStage").finish_non_exhaustive()
    }
}

impl<'env> SinkStage<'env> {
    /// Starts the assembler and, with more than one finisher, the finisher threads: jobs
    /// whose last chunk has been written are committed there, so a remote cache's
    /// per-request latency overlaps with assembling the next jobs. `handoff` is the queue
    /// between them. The stage ends once `chunks` closes and every job taken is reported
    /// (or dropped, aborting its upload, once the run stopped).
    pub fn spawn<'scope>(
        &'scope self,
        s: &'scope Scope<'scope, 'env>,
        chunks: LaneReceiver,
        (handoff_tx, handoff_rx): (Sender<Handoff>, Receiver<Handoff>),
        results: Sender<SinkResult>,
    ) -> Running<'scope> {
        if self.finishers <= 1 {
            let t = s.spawn(move || {
                self.assemble(chunks, &results, |job, state, end| {
                    if !self.admit(&job) {
                        return true;
                    }
                    let outcome = self.finish(&job, state, end);
                    results.send(SinkResult::of(job, outcome)).is_ok()
                })
                .into_stats("sink")
            });
            return Running::new("sink", vec![t]);
        }
        let mut threads = Vec::with_capacity(self.finishers + 1);
        for _ in 0..self.finishers {
            let (rx, results) = (handoff_rx.clone(), results.clone());
            // Finishers mostly wait on the cache; their time is counted by the cache's
            // own request statistics, not as the sink's work.
            threads.push(s.spawn(move || {
                for (job, state, end) in rx {
                    if self.stop.is_stopped() || !self.admit(&job) {
                        continue; // dropping the state aborts its upload
                    }
                    let outcome = self.finish(&job, state, end);
                    let result = SinkResult::of(job, outcome);
                    // The publisher is gone (it failed, and halted the run): the
                    // hand-offs queued behind still go, each dropped here, so the
                    // memory their uploads hold is freed. Stopping at once would
                    // leave them in the queue, and an assembler waiting for that
                    // memory (S3's) would wait forever.
                    let _ = results.send(result);
                }
                StageStats::default()
            }));
        }
        drop(handoff_rx);
        threads.push(s.spawn(move || {
            self.assemble(chunks, &results, move |job, state, end| {
                handoff_tx.send((job, state, end)).is_ok()
            })
            .into_stats("sink")
        }));
        Running::new("sink", threads)
    }

    /// Puts chunks in order and writes them; hands each completed job to `done`, which
    /// returns false when the run is being torn down. A job the cache fails is reported
    /// into `results` at once and aborted: no stage works on it any more.
    fn assemble(
        &self,
        chunks: LaneReceiver,
        results: &Sender<SinkResult>,
        mut done: impl FnMut(Arc<Job>, JobState, NarEnd) -> bool,
    ) -> StageClock {
        let mut clock = StageClock::start();
        // Only the jobs whose chunks are arriving: an entry goes with its job's last chunk
        // or its failure.
        let mut jobs: HashMap<JobId, JobState> = HashMap::new();
        while let Some(chunk) = clock.wait(|| chunks.recv()) {
            if self.stop.is_stopped() {
                // Unfinished uploads are aborted (dropped) and their buffered chunks
                // freed at once, so no stage upstream waits on the budget; the rest of
                // the input is drained and dropped.
                jobs.clear();
                continue;
            }
            debug_assert!(
                chunk.data.capacity() as u64 <= chunk.permit.bytes(),
                "a chunk's buffer ({} bytes) beyond its permit ({} bytes)",
                chunk.data.capacity(),
                chunk.permit.bytes()
            );
            let job = chunk.job.clone();
            if self.stop.is_job_stopped(&job) {
                // Failed and reported already, or sent ahead and dropped by the look.
                jobs.remove(&job.id);
                continue;
            }
            // A job sent ahead goes into its upload before the look's verdict only as the
            // one whole chunk it was sent for, which the upload holds until its commit. A
            // NAR that turns out larger (the path changed since the store recorded it)
            // waits for the verdict first.
            let whole = chunk.seq == 0 && chunk.end.is_some() && chunk.nar_len <= job.info.nar_size;
            if job.sent_ahead() && !whole && !clock.wait(|| job.await_verdict()) {
                jobs.remove(&job.id);
                continue;
            }
            let state = jobs.entry(job.id).or_insert_with(|| self.begin(&job));
            state.waiting.insert(chunk.seq, chunk);
            let mut finished = None;
            while let Some(chunk) = state.waiting.remove(&state.next_seq) {
                state.next_seq += 1;
                clock.add_bytes(chunk.data.len() as u64, chunk.data.len() as u64);
                // A job sent ahead counts once it is kept ([`SinkStage::admit`]).
                if !job.sent_ahead() {
                    self.progress.nar_bytes(chunk.nar_len);
                }
                if let (Some(upload), None) = (state.upload.as_mut(), &state.error)
                    && let Err(e) = upload.write_all(&chunk.data)
                {
                    state.error = Some(write_failure(&e));
                }
                self.buffers.give(chunk.data);
                if let Some(end) = chunk.end {
                    finished = Some(end);
                    break;
                }
            }
            if let Some(why) = state.error.take() {
                // Dropping the state aborts the upload and frees the chunks waiting.
                jobs.remove(&job.id);
                // A job sent ahead of the look is reported only if the look keeps it.
                if !clock.wait(|| self.admit(&job)) {
                    continue;
                }
                self.stop.abort(&job);
                let result = SinkResult::of(job, Err(why));
                if clock.wait(|| results.send(result)).is_err() {
                    break;
                }
                continue;
            }
            if let Some(end) = finished {
                let mut state = jobs.remove(&job.id).expect("present");
                // Its buffers are now released by whoever commits or drops it, not by this
                // thread: uploads begun after it wait for them rather than overrun.
                if let Some(upload) = state.upload.as_mut() {
                    upload.get_mut().written();
                }
                if !clock.wait(|| done(job, state, end)) {
                    break;
                }
            }
        }
        clock
    }

    /// Whether `job` goes on to its commit: a job sent ahead of the look at the cache
    /// waits here for the look's verdict (nothing of it has reached the cache yet), and
    /// its NAR bytes count as progress only once it is kept. Dropping a job not kept
    /// drops its upload.
    fn admit(&self, job: &Job) -> bool {
        let kept = job.await_verdict();
        if kept && job.sent_ahead() {
            self.progress.nar_bytes(job.info.nar_size);
        }
        kept
    }

    fn begin(&self, job: &Job) -> JobState {
        let identity = NarIdentity {
            store_path: job.info.path.to_absolute(self.store_dir),
            nar_hash: job.info.nar_hash.to_string(),
            compression: self.opts.compression_identity(),
        };
        let (upload, error) = match self.cache.begin_nar_resumable(job.info.nar_size, &identity) {
            Ok(u) => (Some(HashingWriter::new(u)), None),
            Err(e) => (None, Some(Failure::from_cache(&e))),
        };
        JobState {
            next_seq: 0,
            waiting: BTreeMap::new(),
            upload,
            error,
        }
    }

    /// Checks, commits and signs a job whose last chunk has been written: its narinfo,
    /// compressed size, and whether its NAR was in the cache already (and not written).
    /// Dropping the upload on any failure aborts it.
    fn finish(
        &self,
        job: &Job,
        state: JobState,
        end: NarEnd,
    ) -> Result<(Box<NarInfo>, u64, bool), Failure> {
        let info = &job.info;
        let full = info.path.to_absolute(self.store_dir);
        let (nar_hash, nar_size, listing) = match end {
            // Reading the store path failed: an I/O error, or the path changed under us.
            NarEnd::Failed(message) => return Err(Failure::Read { message }),
            NarEnd::Walked { .. } => {
                return Err(Failure::permanent(
                    FailureKind::Other,
                    format!("{full}: internal error: NAR ended without a NarHash"),
                ));
            }
            NarEnd::Complete {
                nar_hash,
                nar_size,
                listing,
            } => (nar_hash, nar_size, listing),
        };
        debug_assert!(
            state.error.is_none(),
            "a failed job is reported when it fails"
        );
        // Once stopped, the stages before may have dropped chunks of this job: nothing of
        // it is committed (a stop is never undone).
        if self.stop.is_stopped() {
            return Err(Failure::Cancelled);
        }
        if nar_hash != info.nar_hash || nar_size != info.nar_size {
            return Err(Failure::Corrupt {
                path: full,
                expected_hash: info.nar_hash,
                expected_size: info.nar_size,
                actual_hash: nar_hash,
                actual_size: nar_size,
            });
        }
        let (upload, file_hash, file_size) =
            state.upload.expect("no error means an upload").finish();
        let url = format!(
            "nar/{}{}",
            file_hash.to_nix32(),
            self.opts.compression.kind.extension()
        );
        // The same FileHash names this very file: an object there of its size is left, one
        // of another size (cut short by a crash) is replaced. Where sending it costs one
        // request, as looking would, it is sent without looking.
        let there = if upload.resend_is_cheap() {
            None
        } else {
            self.cache
                .object_size(&url)
                .map_err(|e| Failure::from_cache(&e))?
        };
        let reused = there == Some(file_size);
        if !reused {
            upload.commit(&url).map_err(|e| Failure::from_cache(&e))?;
        }
        // The listing (built as the NAR was written) goes up before the narinfo that
        // announces the path.
        if let Some(listing) = listing {
            crate::cache::put_nar_listing(self.cache, &info.path, &listing)
                .map_err(|e| Failure::from_cache(&e))?;
        }
        let mut narinfo = NarInfo {
            store_path: info.path.clone(),
            url,
            compression: self.opts.compression.kind.nix_name().to_owned(),
            file_hash: Some(file_hash),
            file_size: Some(file_size),
            nar_hash,
            nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            sigs: info.sigs.clone(),
            ca: info.ca.clone(),
        };
        for key in &self.opts.keys {
            narinfo.sign(key, self.store_dir);
        }
        Ok((Box::new(narinfo), file_size, reused))
    }
}

/// Why writing a NAR's bytes failed. A remote cache sends parts from inside `write` and
/// returns its [`crate::cache::CacheError`] wrapped in the `io::Error`: that error keeps
/// its class (access denied is permanent for a large NAR as for a small one, which fails
/// in `commit`). Any other error is the cache's file system's, classed by the one rule
/// ([`crate::cache::io_is_transient`]): a full disk is transient here as for a narinfo.
fn write_failure(e: &std::io::Error) -> Failure {
    let transient = match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<crate::cache::CacheError>())
    {
        Some(c) => c.is_transient(),
        None => crate::cache::io_is_transient(e),
    };
    Failure::Cache {
        context: "writing the NAR: ",
        message: e.to_string(),
        transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheError;

    /// An upload that reports its drop (its memory freed).
    struct Counted(std::sync::mpsc::Sender<()>);
    impl Write for Counted {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl NarUpload for Counted {
        fn written(&mut self) {}
        fn commit(self: Box<Self>, _: &str) -> Result<(), CacheError> {
            Ok(())
        }
    }
    impl Drop for Counted {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    /// With the publisher gone (a failed wave halted the run), the finishers still take
    /// every hand-off queued and drop it, freeing what its upload holds, while the
    /// assembler may still be running (it may be waiting for that memory).
    #[test]
    fn finishers_drop_every_queued_upload_once_the_publisher_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let cache = crate::cache::file::FileCache::open(dir.path(), "file:///t").unwrap();
        let opts = PushOptions::new(Default::default(), vec![]);
        let sink = SinkStage {
            cache: &cache,
            store_dir: "/nix/store",
            opts: &opts,
            progress: &super::super::outcome::NoProgress,
            finishers: 2,
            buffers: super::super::buffers::BufferPool::new(1, 1 << 20),
            stop: super::super::stage::Stop::new(Default::default()),
        };
        let (dropped_tx, dropped) = std::sync::mpsc::channel();
        let (handoff_tx, handoff_rx) = crossbeam_channel::bounded(8);
        let (results_tx, results_rx) = crossbeam_channel::bounded(1);
        drop(results_rx);
        let (chunks_tx, chunks_rx) = super::super::lanes::bounded(1);
        for i in 0..5u64 {
            let upload: Box<dyn NarUpload> = Box::new(Counted(dropped_tx.clone()));
            let state = JobState {
                next_seq: 1,
                waiting: BTreeMap::new(),
                upload: Some(HashingWriter::new(upload)),
                error: None,
            };
            let end = NarEnd::Failed("read error".into());
            handoff_tx
                .send((super::super::stage::Job::for_test(i), state, end))
                .unwrap();
        }
        std::thread::scope(|s| {
            // The hand-off queue stays open (as while the assembler runs).
            let running = sink.spawn(s, chunks_rx, (handoff_tx.clone(), handoff_rx), results_tx);
            for i in 0..5 {
                dropped
                    .recv_timeout(std::time::Duration::from_secs(30))
                    .unwrap_or_else(|_| panic!("upload {i} of 5 still held in the queue"));
            }
            drop((handoff_tx, chunks_tx));
            running.finish();
        });
    }

    #[test]
    fn a_cache_error_inside_a_write_error_keeps_its_retry_class() {
        let denied = std::io::Error::other(CacheError::Config("access denied to bucket".into()));
        let f = write_failure(&denied);
        assert_eq!(f.retry(), super::super::outcome::Retry::Permanent, "{f}");
        assert_eq!(f.to_string(), "writing the NAR: access denied to bucket");
        let reset = std::io::Error::other(CacheError::Remote {
            cache: "s3://b".into(),
            key: "k".into(),
            message: "connection reset".into(),
            transient: true,
        });
        assert!(write_failure(&reset).is_transient());
        let disk = std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left");
        assert!(write_failure(&disk).is_transient());
        // The cache's own file system, by the one rule: what needs a person is permanent.
        let denied = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        assert_eq!(
            write_failure(&denied).retry(),
            super::super::outcome::Retry::Permanent
        );
    }
}
