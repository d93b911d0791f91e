//! Planning one window of a backfill: what it pulls in (references neither in it nor
//! available), what it skips (signed by an upstream key, served by an upstream cache),
//! what the cache has, and the jobs it sends to the pipeline, references first.
//!
//! Owns those decisions for one window at a time. It never moves the cursor (settling
//! does, [`super::run`]) and never reads more of the store than the window's closure.

use super::run::{Mark, Position, Run};
use super::{BackfillError, SkipReason};
use crate::format::store_path::StorePath;
use crate::pipeline;
use crate::pipeline::outcome::{Outcome, PathResult};
use crate::store::PathInfo;
use std::collections::{BTreeSet, HashSet};

impl Run<'_> {
    /// Plans one window and submits it: pulls in what its references need, skips, finds
    /// what is present, sends the rest to the pipeline. `ok`: nothing outside the window
    /// failed that pins the cursor here; `cursor`: where the cursor goes once the window
    /// (and every one before it) has settled, with an fsync if `save`.
    pub(super) fn process_window(
        &mut self,
        mut window: Vec<PathInfo>,
        ok: bool,
        cursor: Option<Position>,
        save: bool,
    ) -> Result<(), BackfillError> {
        // At most two windows in flight: this one is planned once the one two before it
        // has settled, and with what has settled since taken in.
        self.settle_until(1)?;
        self.settle_ready()?;
        if self.halted {
            return Ok(());
        }
        // What this run has counted already is not counted again: a path an earlier
        // window pulled in, reached here in registration order (or met again in another
        // group's closure), whether it is in flight, settled (uploaded, present or
        // skipped) or failed. A failure pinned the cursor already; referrers of a failed
        // path are refused below.
        self.resolve(
            window
                .iter()
                .flat_map(|i| std::iter::once(&i.path).chain(&i.references)),
        )?;
        window.retain(|i| {
            !(self.in_flight.contains_key(&i.path)
                || self.failed.contains(&i.path)
                || self.available.counted(&i.path, self.key(&i.path)))
        });
        let mut mark = Mark {
            seq: self.next_seq,
            outstanding: 0,
            ok,
            cursor,
            save,
            logs: !window.is_empty(),
            uploaded: Vec::new(),
        };
        self.next_seq += 1;
        if window.is_empty() {
            self.marks.push_back(mark);
            return self.pass_settled();
        }
        // The window's look at the cache (its questions, and what earlier ones found)
        // waits while a gc runs.
        let epoch = self.look()?;
        let pulled = self.pull_in_references(&mut window)?;
        self.summary.pulled_in += pulled;

        // Skips: signed by an upstream key, then served by an upstream cache.
        let mut rest = Vec::with_capacity(window.len());
        for info in window {
            let signed = info
                .sigs
                .iter()
                .any(|s| self.opts.skip_signed_by.contains(&s.key_name));
            if signed {
                self.skip(&info.path, SkipReason::SignedBy);
            } else {
                rest.push(info);
            }
        }
        let served = self.served_upstream(&rest)?;
        let mut candidates = Vec::with_capacity(rest.len());
        for (info, served) in rest.into_iter().zip(served) {
            if served {
                self.skip(&info.path, SkipReason::Upstream);
            } else {
                candidates.push(info);
            }
        }

        // What the cache is known to have (listed, or asked about by an earlier window's
        // pull-in) and this run has not counted yet.
        let (mut present, unknown): (Vec<PathInfo>, Vec<PathInfo>) = candidates
            .into_iter()
            .partition(|i| self.is_available(&i.path));
        let mut todo = Vec::with_capacity(unknown.len());
        if self.listed || unknown.is_empty() {
            todo = unknown;
        } else {
            let paths: Vec<StorePath> = unknown.iter().map(|i| i.path.clone()).collect();
            for (info, has) in unknown.into_iter().zip(self.cache.has_narinfos(&paths)?) {
                if has {
                    present.push(info);
                } else {
                    todo.push(info);
                }
            }
        }
        for info in &present {
            self.available.count(self.key(&info.path));
        }
        self.summary.present += present.len() as u64;
        self.progress.advanced(present.len() as u64);
        drop(present);

        let todo = crate::store::closure::topo_sort(todo);
        if self.opts.dry_run {
            self.summary.uploaded += todo.len() as u64;
            self.summary.bytes.nar += todo.iter().map(|i| i.nar_size).sum::<u64>();
            self.progress.advanced(todo.len() as u64);
            for i in &todo {
                self.available.count(self.key(&i.path));
            }
            self.marks.push_back(mark);
            return self.pass_settled();
        }
        // A reference in flight is as good as seen: the job waits for it, and is refused
        // by the publisher if it fails.
        let in_todo: HashSet<&StorePath> = todo.iter().map(|i| &i.path).collect();
        let seen: HashSet<StorePath> = todo
            .iter()
            .flat_map(|i| &i.references)
            .filter(|r| {
                !in_todo.contains(r) && (self.is_available(r) || self.in_flight.contains_key(*r))
            })
            .cloned()
            .collect();
        drop(in_todo);
        let (mut jobs, refused) = pipeline::plan::jobs_for(&todo, &seen, &self.store_dir, epoch);
        drop(seen);
        for (i, why) in refused {
            mark.ok = false;
            self.fail(PathResult {
                path: todo[i].path.to_absolute(&self.store_dir),
                outcome: Outcome::Failed(why),
            });
        }
        drop(todo);
        for job in &mut jobs {
            let earlier = job
                .info
                .references
                .iter()
                .filter(|r| **r != job.info.path && self.in_flight.contains_key(*r));
            job.waits_for.extend(earlier.cloned());
            let skipped = job
                .info
                .references
                .iter()
                .filter(|r| **r != job.info.path && self.available.skipped(self.key(r)));
            job.elsewhere.extend(skipped.cloned());
        }
        mark.outstanding = jobs.len();
        for job in &jobs {
            let key = self.key(&job.info.path);
            self.in_flight
                .insert(job.info.path.clone(), (mark.seq, key));
        }
        self.marks.push_back(mark);
        if !jobs.is_empty() {
            self.send(jobs)?;
        }
        self.pass_settled()
    }

    fn skip(&mut self, path: &StorePath, why: SkipReason) {
        match why {
            SkipReason::SignedBy => self.summary.skipped_signed_by += 1,
            SkipReason::Upstream => self.summary.skipped_upstream += 1,
        }
        tracing::debug!("skipped {} ({why:?})", path.to_absolute(&self.store_dir));
        self.available.skip(self.key(path));
        self.progress.advanced(1);
    }

    /// Adds to `window` the closure of each reference that is neither in it nor
    /// available (nor in flight): registered later than its referrer, or not selected.
    /// Returns how many paths came in.
    fn pull_in_references(&mut self, window: &mut Vec<PathInfo>) -> Result<u64, BackfillError> {
        let mut in_window: HashSet<StorePath> = window.iter().map(|i| i.path.clone()).collect();
        let outside: BTreeSet<&StorePath> = window
            .iter()
            .flat_map(|i| &i.references)
            .filter(|r| {
                !in_window.contains(*r)
                    && !self.is_available(r)
                    && !self.in_flight.contains_key(*r)
                    && !self.failed.contains(*r)
            })
            .collect();
        if outside.is_empty() {
            return Ok(0);
        }
        let outside: Vec<StorePath> = outside.into_iter().cloned().collect();
        let mut missing = Vec::new();
        for (p, has) in outside.iter().zip(self.cache.has_narinfos(&outside)?) {
            if has {
                self.available.found_in_cache(self.key(p));
            } else {
                missing.push(p.clone());
            }
        }
        if missing.is_empty() {
            return Ok(0);
        }
        let mut pulled = 0;
        let closure = self.store.closure(&missing)?;
        self.resolve(closure.iter().map(|i| &i.path))?;
        for info in closure {
            if self.is_available(&info.path)
                || self.in_flight.contains_key(&info.path)
                || self.failed.contains(&info.path)
                || !in_window.insert(info.path.clone())
            {
                continue;
            }
            pulled += 1;
            window.push(info);
        }
        tracing::debug!(
            "{} references outside the window are not in the cache: {pulled} paths pulled in",
            missing.len()
        );
        Ok(pulled)
    }

    /// For each of `infos`, whether an upstream serves its narinfo.
    fn served_upstream(&self, infos: &[PathInfo]) -> Result<Vec<bool>, BackfillError> {
        let mut served = vec![false; infos.len()];
        for (u, set) in self.upstreams.iter().zip(&self.upstream_sets) {
            match set {
                Some(set) => {
                    for (s, i) in served.iter_mut().zip(infos) {
                        *s |= set.contains(&i.path);
                    }
                }
                None => {
                    let ask: Vec<usize> = (0..infos.len()).filter(|&j| !served[j]).collect();
                    let paths: Vec<StorePath> =
                        ask.iter().map(|&j| infos[j].path.clone()).collect();
                    if paths.is_empty() {
                        continue;
                    }
                    let has = u
                        .has_narinfos(&paths)
                        .map_err(|source| BackfillError::Upstream {
                            url: u.url().to_owned(),
                            source,
                        })?;
                    for (j, h) in ask.into_iter().zip(has) {
                        served[j] |= h;
                    }
                }
            }
        }
        Ok(served)
    }
}
