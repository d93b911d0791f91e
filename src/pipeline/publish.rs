//! Publishing narinfos in durable waves, in an order that keeps Nix's closure invariant
//! even though uploads finish out of order.
//!
//! A narinfo is written only when (1) its NAR is durable and (2) the narinfos of all its
//! references are durable, or were in the cache before the run. A wave is: `sync` (makes
//! every committed NAR and every narinfo written so far durable) → write each pending
//! narinfo whose references are durable. One `sync` per wave, never one per file.
use crate::cache::{BinaryCache, CacheError};
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use std::collections::{HashMap, HashSet};

/// A path's final state as the publisher decides it.
#[derive(Debug)]
pub enum Published {
    /// Its narinfo is written (durable after the next wave or [`Publisher::finish`]).
    Written(Box<NarInfo>),
    /// Not published because a reference failed.
    Failed(StorePath, super::Failure),
}

pub struct Publisher<'a> {
    cache: &'a dyn BinaryCache,
    store_dir: String,
    /// Every path this run uploads; a reference outside it was in the cache already.
    in_run: HashSet<StorePath>,
    durable: HashSet<StorePath>,
    /// Written since the last sync.
    written: Vec<StorePath>,
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
    pub fn new(cache: &'a dyn BinaryCache, store_dir: &str, in_run: HashSet<StorePath>) -> Self {
        Publisher {
            cache,
            store_dir: store_dir.to_owned(),
            in_run,
            durable: HashSet::new(),
            written: Vec::new(),
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

    /// One wave: sync, then write every pending narinfo whose references are durable.
    /// Returns what it decided (written, or failed because of a reference).
    ///
    /// # Errors
    /// The first cache error. Narinfos already written stay: they are complete and their
    /// references are durable.
    pub fn wave(&mut self) -> Result<Vec<Published>, CacheError> {
        self.cache.sync()?;
        self.durable.extend(self.written.drain(..));
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
                let why = super::Failure {
                    message: format!(
                        "not published: its reference {} failed",
                        bad.to_absolute(&self.store_dir)
                    ),
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
                n.references.iter().all(|r| {
                    *r == n.store_path || self.durable.contains(r) || !self.in_run.contains(r)
                })
            });
        self.pending = waiting;
        // Everything ready in one wave is independent of the rest of the wave (its
        // references are durable already), so the cache may write the wave concurrently.
        let texts: Vec<(StorePath, String)> = ready
            .iter()
            .map(|n| (n.store_path.clone(), n.render(&self.store_dir)))
            .collect();
        self.cache.put_narinfos(&texts)?;
        for narinfo in ready {
            self.written.push(narinfo.store_path.clone());
            decided.push(Published::Written(Box::new(narinfo)));
        }
        Ok(decided)
    }

    /// Publishes everything still pending (every upload of the run has finished) and makes
    /// it durable.
    ///
    /// # Errors
    /// The first cache error.
    pub fn finish(mut self) -> Result<Vec<Published>, CacheError> {
        let mut decided = Vec::new();
        while !self.pending.is_empty() {
            let wave = self.wave()?;
            if wave.is_empty() {
                // Only references to paths that never finished get here: a reference
                // cycle (impossible in a valid store) or a path the run lost.
                for n in std::mem::take(&mut self.pending) {
                    let why = super::Failure::transient(
                        "not published: its references never became durable",
                    );
                    decided.push(Published::Failed(n.store_path, why));
                }
            }
            decided.extend(wave);
        }
        self.cache.sync()?;
        Ok(decided)
    }
}
