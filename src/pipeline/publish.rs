//! Publishing narinfos in durable waves.
//!
//! A narinfo is written only when its NAR is durable and the narinfos of its references
//! are durable (or were in the cache before). Each wave is: `sync` (makes NARs and the
//! previous wave durable) → write every pending narinfo whose references are published →
//! repeat until nothing is pending. One `sync` per closure level, never one per file.
use crate::cache::{BinaryCache, CacheError};
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use std::collections::HashSet;

pub struct Publisher<'a> {
    cache: &'a dyn BinaryCache,
    store_dir: String,
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
    pub fn new(cache: &'a dyn BinaryCache, store_dir: &str) -> Self {
        Publisher {
            cache,
            store_dir: store_dir.to_owned(),
            pending: Vec::new(),
        }
    }

    /// Queues a narinfo whose NAR has been uploaded (not necessarily synced yet).
    /// Caller obligation: each of its references is published, pending, or in the cache.
    pub fn add(&mut self, narinfo: NarInfo) {
        self.pending.push(narinfo);
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Publishes everything pending, wave by wave.
    ///
    /// # Errors
    /// The first cache error; narinfos already written stay (they are complete and their
    /// references are durable).
    pub fn publish_all(&mut self) -> Result<(), CacheError> {
        while !self.pending.is_empty() {
            self.cache.sync()?;
            let in_flight: HashSet<StorePath> =
                self.pending.iter().map(|n| n.store_path.clone()).collect();
            let (ready, waiting): (Vec<NarInfo>, Vec<NarInfo>) = std::mem::take(&mut self.pending)
                .into_iter()
                .partition(|n| {
                    n.references
                        .iter()
                        .all(|r| *r == n.store_path || !in_flight.contains(r))
                });
            if ready.is_empty() {
                // Only a reference cycle (impossible in a valid store) gets here.
                let cycle: Vec<String> = waiting
                    .iter()
                    .map(|n| n.store_path.to_absolute(&self.store_dir))
                    .collect();
                return Err(CacheError::Config(format!(
                    "reference cycle among {}",
                    cycle.join(", ")
                )));
            }
            for narinfo in &ready {
                self.cache
                    .put_narinfo(&narinfo.store_path, &narinfo.render(&self.store_dir))?;
            }
            self.pending = waiting;
        }
        self.cache.sync()
    }
}
