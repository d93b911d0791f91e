//! The publish stage: takes the sink's results on the calling thread and publishes
//! narinfos in durable waves, in an order that keeps Nix's closure invariant even though
//! uploads finish out of order; it settles every path of the run in the report.
//!
//! A narinfo is written only when (1) its NAR is committed and (2) every reference is one
//! the publisher has *seen*: found in the cache by the plan, or published (and made
//! durable) by this publisher itself. A path that fails, or is refused before the upload,
//! fails every path that refers to it, transitively. A wave hands every ready narinfo to
//! [`BinaryCache::publish_narinfos`], which makes their NARs durable before it names them,
//! merges them with what the cache holds, and returns once they are durable.
use super::sink::SinkResult;
use super::stage::Stop;
use super::{Failure, Outcome, PathResult, Progress, PushReport};
use crate::cache::{BinaryCache, CacheError, Merged};
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use crate::store::PathInfo;
use crossbeam_channel::Receiver;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// When a wave is due: this many narinfos waiting (each wave costs one `sync`), or a
/// finished path waiting this long while uploads go on.
#[derive(Debug, Clone, Copy)]
pub struct WavePolicy {
    pub batch: usize,
    pub interval: Duration,
}

/// The publish stage of one run.
pub struct PublishStage<'a> {
    publisher: Publisher<'a>,
    cache: &'a dyn BinaryCache,
    infos: &'a [PathInfo],
    store_dir: &'a str,
    progress: &'a dyn Progress,
    stop: Stop,
    policy: WavePolicy,
    file_sizes: HashMap<StorePath, u64>,
    error: Option<CacheError>,
}

impl std::fmt::Debug for PublishStage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishStage")
            .field("publisher", &self.publisher)
            .finish_non_exhaustive()
    }
}

impl<'a> PublishStage<'a> {
    /// `seen`: the paths the plan found in the cache; `refused`: the jobs refused before
    /// the upload (their referrers fail with them).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cache: &'a dyn BinaryCache,
        infos: &'a [PathInfo],
        store_dir: &'a str,
        seen: HashSet<StorePath>,
        refused: &[(usize, Failure)],
        progress: &'a dyn Progress,
        stop: Stop,
        policy: WavePolicy,
    ) -> Self {
        let mut publisher = Publisher::new(cache, store_dir, seen);
        for (i, why) in refused {
            publisher.fail(infos[*i].path.clone(), why.retry());
        }
        PublishStage {
            publisher,
            cache,
            infos,
            store_dir,
            progress,
            stop,
            policy,
            file_sizes: HashMap::new(),
            error: None,
        }
    }

    fn record(&self, report: &mut PushReport, path: &StorePath, outcome: Outcome) {
        let r = PathResult {
            path: path.to_absolute(self.store_dir),
            outcome,
        };
        self.progress.finished(&r);
        report.results.push(r);
    }

    fn settle(&self, report: &mut PushReport, decided: Vec<Published>) {
        for d in decided {
            match d {
                Published::Written(n) => {
                    let file_size = self
                        .file_sizes
                        .get(&n.store_path)
                        .copied()
                        .unwrap_or_default();
                    report.nar_bytes += n.nar_size;
                    report.file_bytes += file_size;
                    let outcome = Outcome::Uploaded {
                        nar_size: n.nar_size,
                        file_size,
                    };
                    self.record(report, &n.store_path, outcome);
                }
                Published::Present(p) => self.record(report, &p, Outcome::AlreadyPresent),
                Published::Failed(p, why) => self.record(report, &p, Outcome::Failed(why)),
            }
        }
    }

    /// Takes the sink's results until they end or the run stops, publishing a wave
    /// whenever one is due. A cache error halts the run (every stage stops early) and is
    /// returned by [`PublishStage::finish`].
    pub fn run(&mut self, results: Receiver<SinkResult>, report: &mut PushReport) {
        let mut last_wave = Instant::now();
        for r in results.iter() {
            let path = &self.infos[r.job].path;
            match r.outcome {
                Ok((narinfo, file_size)) => {
                    self.file_sizes.insert(path.clone(), file_size);
                    self.publisher.add(*narinfo);
                }
                Err(why) => {
                    self.publisher.fail(path.clone(), why.retry());
                    self.record(report, path, Outcome::Failed(why));
                }
            }
            if self.stop.is_stopped() {
                break;
            }
            let pending = self.publisher.pending();
            let due = pending >= self.policy.batch
                || (pending > 0 && last_wave.elapsed() >= self.policy.interval);
            if due {
                match self.publisher.wave() {
                    Ok(decided) => self.settle(report, decided),
                    Err(e) => {
                        self.stop.halt();
                        self.error = Some(e);
                        break;
                    }
                }
                last_wave = Instant::now();
            }
        }
    }

    /// Once every upload stage has finished: publishes what is still pending, or, after a
    /// cancel, reports every path not settled as unfinished (what was written stays: each
    /// narinfo's NAR and references were durable).
    ///
    /// # Errors
    /// The cache error that halted the run, or one from the last waves or sync.
    pub fn finish(mut self, report: &mut PushReport) -> Result<(), CacheError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.stop.is_cancelled() {
            let settled: HashSet<String> = report.results.iter().map(|r| r.path.clone()).collect();
            for info in self.infos {
                if !settled.contains(&info.path.to_absolute(self.store_dir)) {
                    let why = Failure::Cancelled;
                    self.record(report, &info.path, Outcome::Failed(why));
                }
            }
            return self.cache.sync();
        }
        let decided = self.publisher.finish()?;
        self.settle(report, decided);
        Ok(())
    }
}

/// A path's final state as the publisher decides it.
#[derive(Debug)]
pub enum Published {
    /// Its narinfo is written and durable.
    Written(Box<NarInfo>),
    /// The cache's narinfo for it stays (it had our signatures, or it is for another NAR
    /// of the path whose NAR is intact).
    Present(StorePath),
    /// Not published because a reference failed.
    Failed(StorePath, super::Failure),
}

pub struct Publisher<'a> {
    cache: &'a dyn BinaryCache,
    store_dir: String,
    /// References that may be named: found in the cache by the plan, or published here.
    seen: HashSet<StorePath>,
    /// Failed paths and whether retrying them can help (their referrers inherit it).
    failed: HashMap<StorePath, super::Retry>,
    pending: Vec<NarInfo>,
}

impl std::fmt::Debug for Publisher<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<'a> Publisher<'a> {
    /// `seen`: the paths the plan found in the cache.
    pub fn new(cache: &'a dyn BinaryCache, store_dir: &str, seen: HashSet<StorePath>) -> Self {
        Publisher {
            cache,
            store_dir: store_dir.to_owned(),
            seen,
            failed: HashMap::new(),
            pending: Vec::new(),
        }
    }

    /// Queues the narinfo of a path whose NAR is committed (not necessarily durable).
    pub fn add(&mut self, narinfo: NarInfo) {
        self.pending.push(narinfo);
    }

    /// Records that a path of the run failed: paths referring to it will fail too.
    pub fn fail(&mut self, path: StorePath, retry: super::Retry) {
        self.failed.insert(path, retry);
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// One wave: publish every pending narinfo whose references are all seen. Returns
    /// what it decided (written, kept, or failed because of a reference).
    ///
    /// # Errors
    /// The first cache error. Narinfos already written stay: their NARs and references
    /// are durable.
    pub fn wave(&mut self) -> Result<Vec<Published>, CacheError> {
        let mut decided = Vec::new();
        // Failures cascade to every pending path that refers to a failed one.
        loop {
            let before = decided.len();
            let (doomed, keep): (Vec<NarInfo>, Vec<NarInfo>) = std::mem::take(&mut self.pending)
                .into_iter()
                .partition(|n| n.references.iter().any(|r| self.failed.contains_key(r)));
            self.pending = keep;
            for n in doomed {
                let (bad, retry) = n
                    .references
                    .iter()
                    .find_map(|r| self.failed.get(r).map(|c| (r, *c)))
                    .expect("partitioned on it");
                let why = super::Failure::ReferenceFailed {
                    reference: bad.to_absolute(&self.store_dir),
                    retry,
                };
                self.failed.insert(n.store_path.clone(), retry);
                decided.push(Published::Failed(n.store_path, why));
            }
            if decided.len() == before {
                break;
            }
        }
        let (ready, waiting): (Vec<NarInfo>, Vec<NarInfo>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|n| {
                n.references
                    .iter()
                    .all(|r| *r == n.store_path || self.seen.contains(r))
            });
        self.pending = waiting;
        if ready.is_empty() {
            return Ok(decided);
        }
        // Everything ready in one wave is independent of the rest of the wave (its
        // references are seen already), so the cache may write the wave concurrently.
        let merged = self
            .cache
            .publish_narinfos(&self.store_dir, ready.clone())?;
        for (narinfo, m) in ready.into_iter().zip(merged) {
            self.seen.insert(narinfo.store_path.clone());
            decided.push(match m {
                Merged::Written => Published::Written(Box::new(narinfo)),
                Merged::Kept => Published::Present(narinfo.store_path),
            });
        }
        Ok(decided)
    }

    /// Publishes everything still pending (every upload of the run has finished) and makes
    /// every committed NAR durable.
    ///
    /// # Errors
    /// The first cache error.
    pub fn finish(&mut self) -> Result<Vec<Published>, CacheError> {
        let mut decided = Vec::new();
        // Every upload was committed before this is called, so a narinfo written now went
        // through `put_narinfos`, which publishes every NAR committed before it
        // ([`crate::cache::NarUpload::commit`]): the closing sync would only wait on the
        // disk again for nothing.
        let mut wrote = false;
        while !self.pending.is_empty() {
            let wave = self.wave()?;
            wrote |= wave.iter().any(|d| matches!(d, Published::Written(_)));
            if wave.is_empty() {
                // Only references to paths that never finished get here: a reference
                // cycle (impossible in a valid store) or a path the run lost.
                for n in std::mem::take(&mut self.pending) {
                    let why = super::Failure::ReferencesNotDurable;
                    decided.push(Published::Failed(n.store_path, why));
                }
            }
            decided.extend(wave);
        }
        if !wrote {
            self.cache.sync()?;
        }
        Ok(decided)
    }
}
