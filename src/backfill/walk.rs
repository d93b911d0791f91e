//! The backfill's walks: the store in registration order (`--all`, `--since`), or the
//! closures of named paths, cut into windows with the cursor each window moves to.
//!
//! Owns what goes into each window and in what order. It never decides what a window
//! skips or uploads ([`super::window`]'s) and never takes settled paths itself.

use super::available::{Key, Known};
use super::run::{Position, Run};
use super::state;
use super::{BackfillError, Selection};
use crate::format::store_path::StorePath;
use crate::pipeline::outcome::{Failure, Outcome, PathResult};
use crate::store::{PathInfo, StoreError};

fn is_drv(path: &StorePath) -> bool {
    path.name().ends_with(".drv")
}

/// A digest of a group's closure in walk order: 16 hex digits of SHA-256 over its base
/// names.
fn closure_digest(closure: &[PathInfo]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for i in closure {
        h.update(i.path.base_name().as_bytes());
        h.update(b"\n");
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Run<'_> {
    /// Walks the selection from `cursor`, submitting window after window.
    pub(super) fn walk(&mut self, cursor: &Position) -> Result<(), BackfillError> {
        let opts = self.opts;
        match &opts.selection {
            Selection::Store { since } => self.walk_store(cursor.cursor, since.unwrap_or(i64::MIN)),
            Selection::Paths(named) => self.walk_named(named, cursor),
        }
    }

    /// `--all` and `--since`: the store in registration order from `cursor`.
    fn walk_store(&mut self, cursor: i64, since: i64) -> Result<(), BackfillError> {
        let derivations = self.opts.derivations;
        let (paths, bytes) = self.store.count_after(cursor, since, derivations)?;
        self.progress.total(paths, bytes);
        self.decide_listing(paths)?;
        let mut scan = cursor;
        if since > i64::MIN {
            // Straight to the first path registered since then (nothing before it is
            // selected), or to the end.
            let first = self.store.first_id_since(since)?;
            let start = first.map_or(i64::MAX, |id| id - 1);
            scan = scan.max(start.min(self.store.last_valid_id()?));
        }
        // The store as it is now: paths registered while the walk runs are the next run's
        // (or the daemon's watcher's), so a busy machine cannot keep a backfill going.
        let end = self.store.last_valid_id()?;
        while scan < end && !self.halted {
            let mut rows = self.store.valid_after(scan, self.opts.window.max(1))?;
            rows.retain(|r| r.id <= end);
            let Some(last) = rows.last().map(|r| r.id) else {
                break;
            };
            // The window's ids are known from its rows; its references' are looked up.
            self.ids.clear();
            let selected: Vec<StorePath> = rows
                .into_iter()
                .filter(|r| r.registration_time >= since && (derivations || !is_drv(&r.path)))
                .map(|r| {
                    self.ids.insert(r.path.clone(), Some(r.id));
                    r.path
                })
                .collect();
            // A window with nothing selected moves the cursor without an fsync.
            let save = !selected.is_empty();
            let infos = self.infos_of_valid(selected)?;
            self.process_window(infos, true, Some(Position::at(last)), save)?;
            scan = last;
            self.summary.windows += 1;
        }
        Ok(())
    }

    /// `PATH...`: the closures of `window` named paths at a time, from the `cursor`-th,
    /// past the windows of that group's closure done already (`within` it).
    ///
    /// A group's closure is cut into windows before anything is left out of them (what
    /// this run counted already, what the cache is known to have), so the same closure
    /// gives the same windows on every run and the cursor passes them one by one, as it
    /// passes the store's. A resumed count of windows is used only for the very closure
    /// it was counted in (its digest is in the state); any other walks the group whole.
    fn walk_named(&mut self, named: &[StorePath], cursor: &Position) -> Result<(), BackfillError> {
        let window = self.opts.window.max(1);
        let start = usize::try_from(cursor.cursor).unwrap_or(0).min(named.len());
        let mut resumed_within = cursor.within.clone();
        let mut group_start = start;
        self.decide_listing((named.len() - start) as u64)?;
        let (mut total, mut total_bytes) = (0, 0);
        for chunk in named[start..].chunks(window) {
            if self.halted {
                break;
            }
            let group_end = group_start + chunk.len();
            let (valid, invalid) = crate::store::lookup::split_valid(self.store, chunk)?;
            // A named path that is not valid pins the cursor before the group.
            let ok = invalid.is_empty();
            for (path, _) in invalid {
                let why = Failure::NotValid { path: path.clone() };
                self.fail(PathResult {
                    path,
                    outcome: Outcome::Failed(why),
                });
            }
            let mut closure = self.store.closure(&valid)?;
            // A .drv a selected path refers to is pulled back in by the window check.
            closure.retain(|i| self.opts.derivations || !is_drv(&i.path));
            let digest = closure_digest(&closure);
            self.ids.clear();
            self.resolve(closure.iter().map(|i| &i.path))?;
            let done_before = match resumed_within.take() {
                Some(w) if w.closure == digest => usize::try_from(w.windows).unwrap_or(usize::MAX),
                Some(_) => {
                    tracing::info!(
                        "the closure of named paths {group_start}.. is not the one the \
                         backfill state counted windows of: it is walked whole"
                    );
                    0
                }
                None => 0,
            };
            // Topological order across the closure: each window's references are in an
            // earlier window, or available.
            let mut windows: Vec<Vec<PathInfo>> = closure
                .chunks(window)
                .skip(done_before)
                .map(<[_]>::to_vec)
                .collect();
            drop(closure);
            // What this run settled already (or has in flight, or failed) is not counted
            // again; what the cache had is counted once, as present.
            let (mut known, mut again) = (0, 0);
            for w in &mut windows {
                total += w.len() as u64;
                total_bytes += w.iter().map(|i| i.nar_size).sum::<u64>();
                let (available, in_flight, failed, ids) = (
                    &mut self.available,
                    &self.in_flight,
                    &self.failed,
                    &self.ids,
                );
                w.retain(|i| {
                    if in_flight.contains_key(&i.path) || failed.contains(&i.path) {
                        again += 1;
                        return false;
                    }
                    let key = Key::of(&i.path, ids.get(&i.path).copied().flatten());
                    match available.get(&i.path, key) {
                        None => true,
                        Some(Known::Counted) => {
                            again += 1;
                            false
                        }
                        Some(Known::InCache) => {
                            known += 1;
                            available.count(key);
                            false
                        }
                    }
                });
            }
            total -= again;
            self.progress.total(total, total_bytes);
            self.summary.present += known;
            self.progress.advanced(known);
            let n = windows.len();
            if n == 0 {
                let cursor = Position::at(group_end as i64);
                self.process_window(Vec::new(), ok, Some(cursor), true)?;
            }
            for (i, w) in windows.into_iter().enumerate() {
                let cursor = if i + 1 == n {
                    Position::at(group_end as i64)
                } else {
                    Position {
                        cursor: group_start as i64,
                        within: Some(state::Within {
                            windows: (done_before + i + 1) as u64,
                            closure: digest.clone(),
                        }),
                    }
                };
                // A window left with nothing to do moves the cursor without an fsync.
                let save = i + 1 == n || !w.is_empty();
                self.process_window(w, ok, Some(cursor), save)?;
                self.summary.windows += 1;
            }
            group_start = group_end;
        }
        Ok(())
    }

    /// Path infos of `paths`, leaving out those that became invalid (garbage-collected)
    /// since they were listed.
    fn infos_of_valid(&self, mut paths: Vec<StorePath>) -> Result<Vec<PathInfo>, StoreError> {
        loop {
            match self.store.path_infos(&paths) {
                Ok(infos) => return Ok(infos),
                Err(StoreError::NotValid(full)) => {
                    let before = paths.len();
                    paths.retain(|p| p.to_absolute(&self.store_dir) != full);
                    if paths.len() == before {
                        return Err(StoreError::NotValid(full));
                    }
                    tracing::debug!("{full} is no longer valid; left out");
                }
                Err(e) => return Err(e),
            }
        }
    }
}
