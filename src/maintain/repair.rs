//! `narflow verify --repair`: what verify found, mended from the local store through the
//! normal push pipeline (NarHash checked against the store, signed as push signs), and,
//! with `--delete-unrepairable`, what the store cannot mend removed referrers first.
//!
//! The planner ([`plan`], [`deletion_batches`]) is pure: it decides what goes up again,
//! which damaged NARs are removed so that their path's upload replaces them, and in which
//! order narinfos are deleted. It never makes the closure invariant worse: a narinfo is
//! deleted only together with, or after, every narinfo that refers to it, and a NAR only
//! when no remaining narinfo names it. [`repair`] carries the plan out and verifies again.
use super::index::{HashPart, parse_hash_part};
use super::verify::{self, Kind, Problem, Summary, VerifyOptions, VerifyProgress};
use crate::cache::{BinaryCache, CacheError, NarinfoSet, narinfo_hash};
use crate::format::narinfo::NarInfo;
use crate::format::nix32;
use crate::format::store_path::StorePath;
use crate::pipeline::outcome::{Outcome, Progress, PushError};
use crate::pipeline::{self, PushOptions};
use crate::store::LocalStore;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// A narinfo verify found something wrong with, gathered for the planner.
#[derive(Debug, Clone, Default)]
pub struct Damaged {
    pub kinds: BTreeSet<Kind>,
    /// The narinfo, when it parses.
    pub narinfo: Option<NarInfo>,
    /// Its references that have no narinfo in the cache.
    pub missing_refs: Vec<StorePath>,
}

/// What cannot be mended from the local store, and what would have to happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrepairable {
    /// The object (a narinfo key, a `.ls` key, or a store path asked about).
    pub object: String,
    pub what: String,
    /// Its narinfo is deleted (with its referrers) under `--delete-unrepairable`.
    pub doomed: Option<HashPart>,
}

/// What to do, decided from verify's problems and the local store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Damaged NARs of paths that go up again: removed first, since an upload leaves an
    /// object of the right size where it finds one.
    pub delete_nars: Vec<String>,
    /// Paths with no narinfo (missing references, paths asked about): pushed with their
    /// closure, what the cache has skipped.
    pub push_closure: Vec<StorePath>,
    /// Paths whose narinfo, NAR or signatures are damaged: uploaded again.
    pub reupload: Vec<StorePath>,
    /// Paths whose `.ls` is damaged: uploaded again with their listing.
    pub relist: Vec<StorePath>,
    pub unrepairable: Vec<Unrepairable>,
    /// Damaged `.ls` of paths not in the store: removed under `--delete-unrepairable`
    /// (a listing is optional; nothing refers to it).
    pub delete_listings: Vec<String>,
    /// Leftovers or unfinished uploads were found: sweep them (by age).
    pub sweep: bool,
}

fn nar_kind(k: Kind) -> bool {
    matches!(
        k,
        Kind::NarMissing
            | Kind::NarSize
            | Kind::FileHash
            | Kind::Undecodable
            | Kind::NarSizeMismatch
            | Kind::NarHash
    )
}

/// Decides what to mend and how. `damaged`: the narinfos with problems, by hash part;
/// `listings`: the hash parts whose `.ls` is damaged; `asked`: paths asked about that have
/// no narinfo; `valid`: the paths of those found in the local store, by hash part.
#[must_use]
pub fn plan(
    damaged: &BTreeMap<HashPart, Damaged>,
    listings: &BTreeSet<HashPart>,
    asked: &[StorePath],
    valid: &HashMap<HashPart, StorePath>,
    sweep: bool,
    store_dir: &str,
) -> Plan {
    let mut p = Plan {
        sweep,
        ..Plan::default()
    };
    let mut closure: BTreeSet<StorePath> = BTreeSet::new();
    let key = |h: &HashPart| format!("{}.narinfo", nix32::encode(h));
    let not_here = |path: Option<&StorePath>| match path {
        Some(path) => format!("{} is not in the local store", path.to_absolute(store_dir)),
        None => "no path of its hash part is in the local store".to_owned(),
    };
    for (h, d) in damaged {
        let named = d.narinfo.as_ref().map(|n| &n.store_path);
        let local = valid.get(h);
        let mut doom = Vec::new();
        for r in &d.missing_refs {
            match valid.get(&NarinfoSet::key(r)) {
                Some(path) => {
                    closure.insert(path.clone());
                }
                None => doom.push(format!(
                    "its reference {} is in neither the cache nor the local store",
                    r.to_absolute(store_dir)
                )),
            }
        }
        let nar = d.kinds.iter().copied().find(|k| nar_kind(*k));
        let narinfo = d.kinds.iter().copied().find(|k| {
            matches!(
                k,
                Kind::Unparsable | Kind::WrongStorePath | Kind::BadSignature | Kind::Untrusted
            )
        });
        if let Some(kind) = nar.or(narinfo) {
            match local {
                Some(path) if doom.is_empty() => {
                    p.reupload.push(path.clone());
                    if let (Some(k), Some(n)) = (nar, &d.narinfo)
                        && k != Kind::NarMissing
                    {
                        p.delete_nars.push(n.url.clone());
                    }
                }
                Some(_) => {}
                None => doom.push(format!(
                    "{kind}: {}: build or substitute it here and repair again",
                    not_here(named)
                )),
            }
        }
        if !doom.is_empty() {
            p.unrepairable.push(Unrepairable {
                object: key(h),
                what: format!(
                    "{}; or delete it and every narinfo that refers to it (--delete-unrepairable)",
                    doom.join("; ")
                ),
                doomed: Some(*h),
            });
        }
    }
    for h in listings {
        let ls = format!("{}.ls", nix32::encode(h));
        match valid.get(h) {
            Some(path) => p.relist.push(path.clone()),
            None => {
                p.unrepairable.push(Unrepairable {
                    object: ls.clone(),
                    what: format!(
                        "{}: upload it again from a store that has it, or delete the listing (--delete-unrepairable)",
                        not_here(damaged.get(h).and_then(|d| d.narinfo.as_ref()).map(|n| &n.store_path))
                    ),
                    doomed: None,
                });
                p.delete_listings.push(ls);
            }
        }
    }
    for a in asked {
        match valid.get(&NarinfoSet::key(a)) {
            Some(path) => {
                closure.insert(path.clone());
            }
            None => p.unrepairable.push(Unrepairable {
                object: a.to_absolute(store_dir),
                what: "not in the local store either: build or substitute it here and repair again"
                    .into(),
                doomed: None,
            }),
        }
    }
    p.push_closure = closure.into_iter().collect();
    p.reupload.sort();
    p.reupload.dedup();
    p.delete_nars.sort();
    p.delete_nars.dedup();
    p
}

/// A narinfo of the cache as deletion sees it.
#[derive(Debug, Clone, Default)]
pub struct Node {
    /// The hash parts it refers to (itself left out or not).
    pub refs: Vec<HashPart>,
    /// The NAR it names.
    pub nar: Option<String>,
    /// The cache has its `.ls`.
    pub listing: bool,
}

/// What deleting `doomed` takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deletion {
    /// Every narinfo that goes: `doomed` and every narinfo that reaches one of them
    /// through References.
    pub narinfos: BTreeSet<HashPart>,
    /// Keys to delete, batch after batch: narinfos (with their `.ls`) referrers first —
    /// a batch holds narinfos none of which is referred to by a narinfo still there after
    /// it, except members of one cycle, which go together — then the NARs no remaining
    /// narinfo names.
    pub batches: Vec<Vec<String>>,
}

/// Plans the deletion of the narinfos `doomed` in the cache `graph` (every narinfo of
/// the cache, by hash part).
#[must_use]
pub fn deletion_batches(graph: &BTreeMap<HashPart, Node>, doomed: &BTreeSet<HashPart>) -> Deletion {
    // Who refers to whom, backwards.
    let mut referrers: HashMap<HashPart, Vec<HashPart>> = HashMap::new();
    for (h, n) in graph {
        for r in n.refs.iter().filter(|r| *r != h) {
            referrers.entry(*r).or_default().push(*h);
        }
    }
    let mut gone: BTreeSet<HashPart> = BTreeSet::new();
    let mut todo: Vec<HashPart> = doomed.iter().copied().collect();
    while let Some(h) = todo.pop() {
        if gone.insert(h) {
            todo.extend(referrers.get(&h).into_iter().flatten().copied());
        }
    }
    let mut batches = Vec::new();
    let mut left: BTreeSet<HashPart> = gone.clone();
    while !left.is_empty() {
        // Those no narinfo still there refers to.
        let mut ready: Vec<HashPart> = left
            .iter()
            .copied()
            .filter(|h| {
                referrers
                    .get(h)
                    .into_iter()
                    .flatten()
                    .all(|r| !left.contains(r))
            })
            .collect();
        if ready.is_empty() {
            // Only cycles are left (a damaged cache may have them): they go together.
            ready = left.iter().copied().collect();
        }
        let mut batch = Vec::new();
        for h in &ready {
            left.remove(h);
            batch.push(format!("{}.narinfo", nix32::encode(h)));
            if graph.get(h).is_some_and(|n| n.listing) {
                batch.push(format!("{}.ls", nix32::encode(h)));
            }
        }
        batches.push(batch);
    }
    let kept: HashSet<&str> = graph
        .iter()
        .filter(|(h, _)| !gone.contains(*h))
        .filter_map(|(_, n)| n.nar.as_deref())
        .collect();
    let nars: BTreeSet<String> = gone
        .iter()
        .filter_map(|h| graph.get(h)?.nar.clone())
        .filter(|nar| !kept.contains(nar.as_str()))
        .collect();
    if !nars.is_empty() {
        batches.push(nars.into_iter().collect());
    }
    Deletion {
        narinfos: gone,
        batches,
    }
}

/// How to repair.
#[derive(Debug, Clone)]
pub struct RepairOptions {
    pub verify: VerifyOptions,
    /// Delete what the store cannot mend (with every narinfo that refers to it).
    pub delete_unrepairable: bool,
    /// Leftovers and unfinished uploads younger than this are left alone (a running
    /// upload owns them).
    pub grace: std::time::Duration,
}

/// What a repair did, and what is still wrong.
#[derive(Debug, Default)]
pub struct RepairReport {
    /// The first verification.
    pub before: Summary,
    pub plan: Plan,
    /// Paths uploaded again, and paths whose upload failed (with why).
    pub uploaded: Vec<String>,
    pub failed: Vec<(String, String)>,
    /// Keys deleted under `--delete-unrepairable` (narinfos, their `.ls` and NARs), and the
    /// damaged NARs removed before their path went up again.
    pub deleted: Vec<String>,
    /// Leftovers and unfinished uploads removed.
    pub swept: u64,
    /// The verification after the repair, and its problems.
    pub after: Summary,
    pub left: Vec<Problem>,
}

/// Why a repair stopped.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A gc of the cache is running (repair deletes and writes: one at a time).
    #[error(transparent)]
    Gc(#[from] super::gc::GcError),
    #[error(transparent)]
    Push(#[from] PushError),
}

/// The store paths in `store_dir` whose hash part is one of `hashes` (a narinfo that does
/// not parse names its path only by its key).
fn find_by_hash_part(store_dir: &str, hashes: &BTreeSet<HashPart>) -> Vec<StorePath> {
    if hashes.is_empty() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(store_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let h = parse_hash_part(name.get(..32)?)?;
            if !hashes.contains(&h) {
                return None;
            }
            StorePath::from_base_name(&name).ok()
        })
        .collect()
}

/// Verifies `cache` as `opts.verify` says (each problem handed to `report`), mends what
/// the local `store` can mend by uploading with `push` (its keys sign; its `closure` and
/// `nar_listing` are set for each upload and restored), deletes what it
/// cannot under `opts.delete_unrepairable`, sweeps leftovers older than `opts.grace`, and
/// verifies again.
///
/// # Errors
/// [`RepairError`] when the cache or the store cannot be used at all; a path that fails to
/// go up is in [`RepairReport::failed`].
pub fn repair(
    cache: &dyn BinaryCache,
    store: &LocalStore,
    push: &mut PushOptions,
    opts: &RepairOptions,
    progress: &dyn VerifyProgress,
    uploads: &dyn Progress,
    report: &mut dyn FnMut(Problem),
) -> Result<RepairReport, RepairError> {
    // Repair deletes and writes as gc does: never while a gc runs.
    super::gc::wait_for_other_gc(cache)?;
    let store_dir = opts.verify.store_dir.as_str();
    let mut problems = Vec::new();
    let before = verify::verify_with(cache, &opts.verify, progress, &mut |p| {
        report(p.clone());
        problems.push(p);
    })?;

    // Gather the problems by narinfo.
    let mut damaged: BTreeMap<HashPart, Damaged> = BTreeMap::new();
    let mut listings = BTreeSet::new();
    let mut asked = Vec::new();
    let mut sweep = false;
    for p in &problems {
        match p.kind {
            Kind::Leftover | Kind::UnfinishedUpload => sweep = true,
            Kind::OrphanNar => {}
            Kind::MissingNarinfo => {
                if let Ok(path) = StorePath::from_absolute_path(&p.object, store_dir) {
                    asked.push(path);
                }
            }
            Kind::UnparsableListing | Kind::ListingMismatch => {
                if let Some(h) = p.object.strip_suffix(".ls").and_then(parse_hash_part) {
                    listings.insert(h);
                }
            }
            kind => {
                if let Some(h) = narinfo_hash(p.object.as_bytes()) {
                    damaged.entry(h).or_default().kinds.insert(kind);
                }
            }
        }
    }
    let keys: Vec<String> = damaged
        .keys()
        .map(|h| format!("{}.narinfo", nix32::encode(h)))
        .collect();
    for ((h, d), text) in damaged.iter_mut().zip(cache.get_texts(&keys)?) {
        d.narinfo = text
            .and_then(|t| NarInfo::parse(&t, store_dir).ok())
            .filter(|n| NarinfoSet::key(&n.store_path) == *h);
        if d.kinds.contains(&Kind::MissingReference)
            && let Some(n) = &d.narinfo
        {
            let refs: Vec<StorePath> = n
                .references
                .iter()
                .filter(|r| **r != n.store_path)
                .cloned()
                .collect();
            for (r, there) in refs.iter().zip(cache.has_narinfos(&refs)?) {
                if !there {
                    d.missing_refs.push(r.clone());
                }
            }
        }
    }

    // Which of the paths concerned the local store has.
    let mut candidates: Vec<StorePath> = asked.clone();
    let mut unnamed = BTreeSet::new();
    for (h, d) in &damaged {
        candidates.extend(d.missing_refs.iter().cloned());
        match &d.narinfo {
            Some(n) => candidates.push(n.store_path.clone()),
            None => {
                unnamed.insert(*h);
            }
        }
    }
    // A damaged listing's path is named by its narinfo (which may have nothing wrong).
    let mut listed = Vec::new();
    for h in &listings {
        match damaged.get(h).and_then(|d| d.narinfo.as_ref()) {
            Some(n) => candidates.push(n.store_path.clone()),
            None => listed.push(*h),
        }
    }
    let keys: Vec<String> = listed
        .iter()
        .map(|h| format!("{}.narinfo", nix32::encode(h)))
        .collect();
    for (h, text) in listed.iter().zip(cache.get_texts(&keys)?) {
        match text.and_then(|t| NarInfo::parse(&t, store_dir).ok()) {
            Some(n) if NarinfoSet::key(&n.store_path) == *h => candidates.push(n.store_path),
            _ => {
                unnamed.insert(*h);
            }
        }
    }
    candidates.extend(find_by_hash_part(store_dir, &unnamed));
    let (valid_paths, _) = crate::store::lookup::split_valid(store, &candidates)
        .map_err(|e| RepairError::Push(PushError::Store(e)))?;
    let valid: HashMap<HashPart, StorePath> = valid_paths
        .into_iter()
        .map(|p| (NarinfoSet::key(&p), p))
        .collect();

    let plan = plan(&damaged, &listings, &asked, &valid, sweep, store_dir);
    let mut out = RepairReport {
        before,
        ..RepairReport::default()
    };

    // Damaged NARs go first, so that their path's upload puts the NAR back.
    delete(cache, &plan.delete_nars)?;
    out.deleted.extend(plan.delete_nars.iter().cloned());

    let record = |out: &mut RepairReport, r: pipeline::outcome::PushReport| {
        for r in r.results {
            match r.outcome {
                Outcome::Uploaded { .. } => out.uploaded.push(r.path),
                Outcome::AlreadyPresent => {}
                Outcome::Failed(why) => out.failed.push((r.path, why.to_string())),
            }
        }
    };
    if !plan.push_closure.is_empty() {
        let closure = std::mem::replace(&mut push.closure, true);
        let pushed = pipeline::push(store, cache, &plan.push_closure, push, uploads);
        push.closure = closure;
        record(&mut out, pushed?);
    }
    let nar_listing = push.nar_listing;
    for (paths, listing) in [(&plan.reupload, nar_listing), (&plan.relist, true)] {
        if paths.is_empty() {
            continue;
        }
        let infos =
            crate::store::closure::topo_sort(store.path_infos(paths).map_err(PushError::Store)?);
        let in_run: HashSet<&StorePath> = infos.iter().map(|i| &i.path).collect();
        let outside: Vec<StorePath> = infos
            .iter()
            .flat_map(|i| i.references.iter())
            .filter(|r| !in_run.contains(r))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        // The look at the cache the upload relies on waits while a gc runs, and gives
        // the jobs its epoch.
        let epoch = pipeline::gc_gate::Gate::new(push.gc_wait)
            .settle(cache, &|| push.cancel.is_cancelled(), uploads)?
            .ok_or_else(|| CacheError::Remote {
                cache: cache.url().to_owned(),
                key: crate::cache::gc_marker::MARKER_KEY.to_owned(),
                message: "cancelled while waiting for a running gc".into(),
                transient: true,
            })?
            .epoch;
        let seen: HashSet<StorePath> = outside
            .iter()
            .cloned()
            .zip(cache.has_narinfos(&outside)?)
            .filter_map(|(p, there)| there.then_some(p))
            .collect();
        push.nar_listing = listing;
        let uploaded =
            pipeline::upload_after(cache, store_dir, &infos, &seen, epoch, push, uploads);
        push.nar_listing = nar_listing;
        record(&mut out, uploaded?);
    }

    if opts.delete_unrepairable {
        let doomed: BTreeSet<HashPart> =
            plan.unrepairable.iter().filter_map(|u| u.doomed).collect();
        if !doomed.is_empty() {
            let graph = read_graph(cache, store_dir)?;
            for batch in deletion_batches(&graph, &doomed).batches {
                delete(cache, &batch)?;
                out.deleted.extend(batch);
            }
        }
        delete(cache, &plan.delete_listings)?;
        out.deleted.extend(plan.delete_listings.iter().cloned());
    }
    if plan.sweep {
        out.swept = cache.sweep_orphans(opts.grace)?;
    }
    out.plan = plan;

    let mut left = Vec::new();
    out.after = verify::verify_with(cache, &opts.verify, progress, &mut |p| left.push(p))?;
    out.left = left;
    Ok(out)
}

/// Every narinfo of `cache`: its references, NAR and whether it has a `.ls`. One that
/// does not parse is there without either.
fn read_graph(
    cache: &dyn BinaryCache,
    store_dir: &str,
) -> Result<BTreeMap<HashPart, Node>, CacheError> {
    let mut hashes = Vec::new();
    let mut listed = BTreeSet::new();
    cache.list_objects(&mut |o| {
        if let Some(h) = narinfo_hash(o.key.as_bytes()) {
            hashes.push(h);
        } else if let Some(h) = o.key.strip_suffix(".ls").and_then(parse_hash_part) {
            listed.insert(h);
        }
    })?;
    let mut graph = BTreeMap::new();
    for batch in hashes.chunks(verify::BATCH) {
        let keys: Vec<String> = batch
            .iter()
            .map(|h| format!("{}.narinfo", nix32::encode(h)))
            .collect();
        for (h, text) in batch.iter().zip(cache.get_texts(&keys)?) {
            let n = text.and_then(|t| NarInfo::parse(&t, store_dir).ok());
            graph.insert(
                *h,
                Node {
                    refs: n
                        .as_ref()
                        .map(|n| n.references.iter().map(NarinfoSet::key).collect())
                        .unwrap_or_default(),
                    nar: n.map(|n| n.url),
                    listing: listed.contains(h),
                },
            );
        }
    }
    Ok(graph)
}

#[cfg(test)]
mod tests;

/// Deletes `keys`; the first key that did not go is the error.
fn delete(cache: &dyn BinaryCache, keys: &[String]) -> Result<(), CacheError> {
    match cache.delete_objects(keys)?.into_iter().next() {
        None => Ok(()),
        Some((_, e)) => Err(e),
    }
}
