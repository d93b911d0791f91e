//! gc's mark and sweep over a [`CacheIndex`]: which narinfos a root keeps (with their
//! closures through References), and the deletion batches in the one order that keeps
//! every visible state of the cache closed: unreachable narinfos referrers first (a
//! narinfo only once no remaining narinfo refers to it), each with its `.ls`; then the
//! NARs no remaining narinfo names; then the logs no remaining narinfo's deriver names.
//! Nothing younger than the grace period is deleted, and a narinfo younger than it is a
//! root. Pure: it never touches a cache.

use super::index::{CacheIndex, HashPart, Stat, listing_key, narinfo_key};
use fixedbitset::FixedBitSet;

/// Most keys a batch holds: what one S3 DeleteObjects request takes.
pub const MAX_BATCH: usize = crate::cache::MAX_DELETE;

/// Why a narinfo is a root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RootReason {
    /// `--keep-closure-of`.
    Closure,
    /// A path listed in `--keep-file`.
    File,
    /// Modified within `--keep-newer-than`.
    NewerThan,
    /// Modified within `--grace`: a writer may have just published it.
    Grace,
}

/// What gc keeps: named paths and a modification-time cutoff.
#[derive(Debug, Clone, Default)]
pub struct Roots {
    /// Paths whose closures are kept, with why (`--keep-closure-of`, `--keep-file`).
    pub paths: Vec<(HashPart, RootReason)>,
    /// `--keep-newer-than`: narinfos modified at or after this time (seconds since the
    /// epoch, the cache's clock) are roots.
    pub newer_than: Option<i64>,
}

/// The clock and limits of one plan.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Now on the cache's clock (seconds since the epoch): object ages are measured from
    /// it, never from the local clock.
    pub now: i64,
    /// Objects modified less than this many seconds before `now` (or after it) are never
    /// deleted.
    pub grace: u64,
    /// Keys per batch, at most [`MAX_BATCH`] (S3's DeleteObjects limit).
    pub batch_size: usize,
}

impl GcOptions {
    fn young(&self, stat: Stat) -> bool {
        i128::from(self.now) - i128::from(stat.mtime) < i128::from(self.grace)
    }
}

/// Which objects a batch holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Narinfos (with their `.ls`) no remaining narinfo refers to; `layer` counts from 0,
    /// and a layer's batches go only after every batch of the layer before.
    Narinfos { layer: u32 },
    /// NARs no remaining narinfo names.
    Nars,
    /// Logs no remaining narinfo's deriver names.
    Logs,
}

/// Keys that may be deleted together, in any order, once every earlier batch is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub phase: Phase,
    pub keys: Vec<String>,
}

/// Objects and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub objects: u64,
    pub bytes: u64,
}

impl Count {
    fn add(&mut self, stat: Stat) {
        self.objects += 1;
        self.bytes += stat.size;
    }
}

/// What a plan deletes (or keeps), by kind of object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub narinfos: Count,
    pub listings: Count,
    pub nars: Count,
    pub logs: Count,
}

/// A root, as the plan found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Root {
    pub hash: HashPart,
    pub why: RootReason,
    /// Whether the cache has its narinfo (a named path it lacks keeps nothing).
    pub present: bool,
}

/// What gc does to a cache.
#[derive(Debug, Clone, Default)]
pub struct GcPlan {
    /// Every root: the named paths, then the narinfos kept by age, by hash part.
    pub roots: Vec<Root>,
    /// The deletion batches, in the order they must go.
    pub batches: Vec<Batch>,
    pub deleted: Totals,
    pub kept: Totals,
    /// Unreachable narinfos left because they refer to each other in a circle (a
    /// damaged cache: no order deletes them and keeps every state closed).
    pub circular: Vec<HashPart>,
}

/// Plans a gc of `index`: marks what `roots`, and every narinfo younger than the grace or
/// newer than `roots.newer_than`, keep through References; sweeps the rest in batches.
///
/// # Panics
/// When `opts.batch_size` is not in `2..=MAX_BATCH` (a narinfo and its `.ls` go in one
/// batch).
#[must_use]
pub fn plan(index: &CacheIndex, roots: &Roots, opts: &GcOptions) -> GcPlan {
    assert!(
        (2..=MAX_BATCH).contains(&opts.batch_size),
        "batch size {} outside 2..={MAX_BATCH}",
        opts.batch_size
    );
    let n = index.len();
    let mut plan = GcPlan::default();

    // Mark.
    let mut kept = FixedBitSet::with_capacity(n);
    let mut stack: Vec<usize> = Vec::new();
    for &(hash, why) in &roots.paths {
        let at = index.find(&hash);
        plan.roots.push(Root {
            hash,
            why,
            present: at.is_some(),
        });
        stack.extend(at);
    }
    for (i, e) in index.entries.iter().enumerate() {
        let why = if opts.young(e.stat) {
            RootReason::Grace
        } else if roots.newer_than.is_some_and(|t| e.stat.mtime >= t) {
            RootReason::NewerThan
        } else {
            continue;
        };
        plan.roots.push(Root {
            hash: *index.hash(i),
            why,
            present: true,
        });
        stack.push(i);
    }
    while let Some(i) = stack.pop() {
        if kept.put(i) {
            continue;
        }
        stack.extend(index.references(i).filter(|&j| !kept.contains(j)));
    }

    // Referrers first: how many unreachable narinfos refer to each unreachable one (a
    // kept narinfo never refers to an unreachable one: the kept set is closed).
    let mut referrers = vec![0u32; n];
    for i in kept.zeroes() {
        for j in index.references(i).filter(|&j| !kept.contains(j)) {
            referrers[j] += 1;
        }
    }
    let mut layer: Vec<usize> = kept.zeroes().filter(|&i| referrers[i] == 0).collect();
    let mut deleted = FixedBitSet::with_capacity(n);
    let mut depth = 0u32;
    while !layer.is_empty() {
        let mut batch = Vec::new();
        let mut next = Vec::new();
        for &i in &layer {
            let e = &index.entries[i];
            let listing = e.listing.filter(|s| !opts.young(*s));
            let weight = 1 + usize::from(listing.is_some());
            if batch.len() + weight > opts.batch_size {
                plan.batches.push(Batch {
                    phase: Phase::Narinfos { layer: depth },
                    keys: std::mem::take(&mut batch),
                });
            }
            batch.push(narinfo_key(index.hash(i)));
            plan.deleted.narinfos.add(e.stat);
            if let Some(s) = listing {
                batch.push(listing_key(index.hash(i)));
                plan.deleted.listings.add(s);
            }
            deleted.insert(i);
            for j in index.references(i).filter(|&j| !kept.contains(j)) {
                referrers[j] -= 1;
                if referrers[j] == 0 {
                    next.push(j);
                }
            }
        }
        plan.batches.push(Batch {
            phase: Phase::Narinfos { layer: depth },
            keys: batch,
        });
        layer = next;
        depth += 1;
    }
    plan.circular = kept
        .zeroes()
        .filter(|&i| !deleted.contains(i))
        .map(|i| *index.hash(i))
        .collect();

    // What the remaining narinfos name stays; old NARs and logs nothing names go.
    let mut nar_named = FixedBitSet::with_capacity(index.nars.len());
    let mut log_named = FixedBitSet::with_capacity(index.logs.len());
    let mut deleted_log = FixedBitSet::with_capacity(index.logs.len());
    for (i, e) in index.entries.iter().enumerate() {
        if deleted.contains(i) {
            deleted_log.extend(e.log());
            continue;
        }
        plan.kept.narinfos.add(e.stat);
        if let Some(s) = e.listing {
            plan.kept.listings.add(s);
        }
        nar_named.extend(e.nar());
        log_named.extend(e.log());
    }
    let nars = index
        .nars
        .iter()
        .enumerate()
        .map(|(i, o)| (o, nar_named.contains(i)));
    sweep(&mut plan, Phase::Nars, nars, opts, |t| &mut t.nars);
    // A log goes only with a narinfo of its derivation: logs of derivations whose outputs
    // were never pushed are not gc's to judge.
    let logs = index
        .logs
        .iter()
        .enumerate()
        .map(|(i, o)| (o, log_named.contains(i) || !deleted_log.contains(i)));
    sweep(&mut plan, Phase::Logs, logs, opts, |t| &mut t.logs);
    plan
}

/// Adds batches of `phase` for the objects not `named` and older than the grace.
fn sweep<'a>(
    plan: &mut GcPlan,
    phase: Phase,
    objects: impl Iterator<Item = (&'a super::index::Named, bool)>,
    opts: &GcOptions,
    total: impl Fn(&mut Totals) -> &mut Count,
) {
    let mut keys = Vec::new();
    for (o, named) in objects {
        if named || opts.young(o.stat) {
            total(&mut plan.kept).add(o.stat);
            continue;
        }
        total(&mut plan.deleted).add(o.stat);
        keys.push(o.key.to_string());
        if keys.len() == opts.batch_size {
            plan.batches.push(Batch {
                phase,
                keys: std::mem::take(&mut keys),
            });
        }
    }
    if !keys.is_empty() {
        plan.batches.push(Batch { phase, keys });
    }
}
