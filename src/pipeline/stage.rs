//! What every stage of the pipeline shares: the [`Job`] and the [`Chunk`]s of it that flow
//! between stages; [`Running`], the handle of a stage whose threads are at work, with the
//! explicit [`Running::finish`] that waits for them to drain their input and returns the
//! stage's statistics; and [`Stop`], the one flag every stage checks so that an error or a
//! cancel stops all of them early, mid-NAR.
//!
//! A stage never decides its own capacities: `pipeline/mod.rs` creates every channel and
//! hands each stage its receiver and sender.
use super::Cancel;
use super::budget::Permit;
use super::stats::StageStats;
use crate::format::hash::Sha256;
use crate::format::nar::listing::NarListing;
use crate::store::PathInfo;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::ScopedJoinHandle;

/// A job's number: given in order of submission, never reused within a pipeline.
pub type JobId = u64;

/// One path on its way through the pipeline. Every chunk of it carries the job, so no
/// stage keeps a table of jobs: the job (and its stop flag) lives exactly as long as some
/// stage still holds a piece of it.
#[derive(Debug)]
pub struct Job {
    pub id: JobId,
    pub info: PathInfo,
    /// Set once the sink has failed the job, or the look at the cache found a job sent
    /// ahead of it unneeded: no stage spends another byte on it.
    aborted: AtomicBool,
    /// For a job sent ahead of the look at the cache: opened once the
    /// look has decided whether the job goes on (aborted if not).
    ahead: Option<Arc<Gate>>,
}

impl Job {
    pub fn new(id: JobId, info: PathInfo) -> Arc<Job> {
        Arc::new(Job {
            id,
            info,
            aborted: AtomicBool::new(false),
            ahead: None,
        })
    }

    /// A job sent ahead of the look at the cache: its stages may work on it, but nothing
    /// of it reaches the cache or the publisher before `gate` opens.
    pub fn ahead(id: JobId, info: PathInfo, gate: Arc<Gate>) -> Arc<Job> {
        Arc::new(Job {
            id,
            info,
            aborted: AtomicBool::new(false),
            ahead: Some(gate),
        })
    }

    /// Whether the job was sent ahead of the look at the cache.
    pub fn sent_ahead(&self) -> bool {
        self.ahead.is_some()
    }

    /// Waits, for a job sent ahead of the look, until the look has decided; then true when
    /// the job goes on (not aborted). A job not sent ahead goes on at once.
    pub fn await_verdict(&self) -> bool {
        match &self.ahead {
            None => true,
            Some(gate) => {
                gate.wait();
                !self.aborted.load(Ordering::Relaxed)
            }
        }
    }

    /// A job for stage tests that never read the store: path `<id, 32 digits>-test`, an
    /// empty NAR, no references.
    #[cfg(test)]
    pub fn for_test(id: JobId) -> Arc<Job> {
        let name = format!("{id:032}-test");
        let path =
            crate::format::store_path::StorePath::from_base_name(&name).expect("digits are nix32");
        Job::new(
            id,
            PathInfo {
                path,
                nar_hash: crate::format::hash::Sha256([0; 32]),
                nar_size: 0,
                references: vec![],
                deriver: None,
                sigs: vec![],
                ca: None,
            },
        )
    }
}

/// Opens once the look at the cache has decided on every job sent ahead of it (see
/// `pipeline::ahead`); until then those jobs are worked on but never committed.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    open: bool,
    /// Threads waiting at the gate (for tests to see a stage stopped at it).
    waiting: usize,
}

impl Gate {
    /// Waits until the gate opens. Whoever sends jobs with a gate opens it once
    /// it has decided on them, on every path (a push's look opens it when it fails too).
    pub fn wait(&self) {
        let mut state = lock(&self.state);
        state.waiting += 1;
        self.changed.notify_all();
        while !state.open {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.waiting -= 1;
    }
    pub(super) fn open(&self) {
        lock(&self.state).open = true;
        self.changed.notify_all();
    }
    /// Waits up to `timeout` until `n` threads wait at the gate; whether they do.
    #[cfg(test)]
    pub(super) fn has_waiters(&self, n: usize, timeout: std::time::Duration) -> bool {
        let state = lock(&self.state);
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.waiting < n)
            .unwrap_or_else(|p| p.into_inner());
        state.waiting >= n
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a job's NAR stream ended; carried by its last chunk.
#[derive(Debug)]
pub enum NarEnd {
    /// Set by the walker: every chunk of the NAR has been sent. The hash stage turns it
    /// into [`NarEnd::Complete`].
    Walked {
        nar_size: u64,
        listing: Option<Box<NarListing>>,
    },
    Complete {
        nar_hash: Sha256,
        nar_size: u64,
        /// The NAR's listing, built as it was written, when the push writes listings
        /// (boxed: it rides on a chunk, which stays small).
        listing: Option<Box<NarListing>>,
    },
    /// Walking failed (unreadable file, path vanished): the job must be aborted.
    Failed(String),
}

/// A piece of one job's NAR (or, after compression, of its compressed file).
#[derive(Debug)]
pub struct Chunk {
    /// The job this chunk is a piece of.
    pub job: Arc<Job>,
    /// Position in the job's stream, from 0.
    pub seq: u32,
    pub data: Vec<u8>,
    /// NAR bytes this chunk stands for (equal to `data.len()` before compression).
    pub nar_len: u64,
    pub permit: Permit,
    /// Set on the job's last chunk only.
    pub end: Option<NarEnd>,
}

/// Why a run stops early: the caller's cancel (a shutdown), or the run's own halt (the
/// publisher failed: nothing more can be published, so nothing more is worth reading,
/// hashing, compressing or uploading).
///
/// It also stops single jobs: once the sink has failed a job (the cache refused its
/// upload), no stage spends another byte of work on it.
#[derive(Debug, Clone)]
pub struct Stop {
    cancel: Cancel,
    halt: Cancel,
}

impl Stop {
    /// A stop that follows `cancel` and the run's own halt.
    pub fn new(cancel: Cancel) -> Self {
        Stop {
            cancel,
            halt: Cancel::new(),
        }
    }
    /// Stops work on `job` (its failure is reported already).
    pub fn abort(&self, job: &Job) {
        job.aborted.store(true, Ordering::Relaxed);
    }
    /// True once the run stopped or `job` was aborted: its chunks are dropped.
    pub fn is_job_stopped(&self, job: &Job) -> bool {
        job.aborted.load(Ordering::Relaxed) || self.is_stopped()
    }
    /// Stops every stage (the run failed).
    pub fn halt(&self) {
        self.halt.cancel();
    }
    /// True once the run was cancelled or halted: stages drop what they hold and drain.
    pub fn is_stopped(&self) -> bool {
        self.cancel.is_cancelled() || self.halt.is_cancelled()
    }
    /// True when the caller cancelled (as opposed to a halt after an error).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// A stage at work: its threads, each returning its share of the statistics.
#[must_use = "a stage must be finished: that is where its threads are joined"]
#[derive(Debug)]
pub struct Running<'scope> {
    name: &'static str,
    threads: Vec<ScopedJoinHandle<'scope, StageStats>>,
}

impl<'scope> Running<'scope> {
    pub fn new(name: &'static str, threads: Vec<ScopedJoinHandle<'scope, StageStats>>) -> Self {
        Running { name, threads }
    }

    /// Waits until the stage has drained its input (its upstream has closed it, or the run
    /// stopped) and returns its statistics, summed over its threads.
    ///
    /// # Panics
    /// When one of its threads panicked (a bug): the panic goes on to the caller.
    pub fn finish(self) -> StageStats {
        let mut total = StageStats {
            name: self.name,
            ..Default::default()
        };
        for t in self.threads {
            let s = t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            total.threads += s.threads;
            total.busy += s.busy;
            total.bytes_in += s.bytes_in;
            total.bytes_out += s.bytes_out;
        }
        total
    }
}
