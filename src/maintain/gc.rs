//! One run of `narflow gc`: announce it with the marker object ([`MARKER_KEY`]) and keep it
//! beating, wait the settle period, list the cache and read its narinfos into a
//! [`CacheIndex`], plan ([`plan`]), and delete the batches in order, each only while the
//! marker is fresh; then mark the run `done`. The README's "What may run beside gc" is the
//! protocol this file keeps. It deletes only what the plan says, in the plan's order, and
//! stops at the first batch that does not go whole (a later batch may rely on it).
use super::gc_plan::{Batch, GcOptions, GcPlan, RootReason, Roots, plan};
use super::index::{CacheIndex, HashPart, IndexBuilder, Stat, parse_hash_part};
use crate::cache::gc_marker::{DELETE_DEADLINE, HEARTBEAT, MARKER_KEY, Marker, STALE};
use crate::cache::{BinaryCache, CacheError, NarinfoSet, ObjectInfo, narinfo_hash, read_gc_marker};
use crate::format::narinfo::NarInfo;
use crate::format::nix32;
use rayon::prelude::*;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

/// How often a gc that found another's running marker reads it again, to see whether it
/// beats (a live gc: refused) or not (a dead one, taken over after [`STALE`]).
const POLL: Duration = Duration::from_secs(1);

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct GcConfig {
    /// The store directory narinfos name paths in, when the cache's `nix-cache-info`
    /// does not say.
    pub store_dir: String,
    /// The named roots (`--keep-closure-of`, `--keep-file`), each with why.
    pub roots: Vec<(HashPart, RootReason)>,
    /// `--keep-newer-than`: narinfos modified within it are roots.
    pub keep_newer_than: Option<Duration>,
    /// Nothing modified within it is deleted.
    pub grace: Duration,
    /// The wait between the marker and the listing.
    pub settle: Duration,
    /// Keys per deletion request, 2 to [`crate::cache::MAX_DELETE`].
    pub batch_size: usize,
    /// Plan and report, write nothing (not even the marker): ages are then measured on
    /// the local clock, the cache's being unknown without a write.
    pub dry_run: bool,
}

/// Why a run did not start, or stopped before planning.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Another gc's marker is there and beating.
    #[error(
        "another gc is running on {cache} (its marker {MARKER_KEY} has generation {generation:016x} and is beating); try again once it is done"
    )]
    Running { cache: String, generation: u64 },
    /// This gc's marker is no longer its own to trust: another gc wrote over it (two
    /// started at once), or its heartbeat lapsed.
    #[error("{cache}: the gc stops: {why}")]
    Lost { cache: String, why: String },
    /// Named roots the cache has no narinfo for.
    #[error("{cache}: no narinfo in the cache for {}", .paths.join(", "))]
    MissingRoots { cache: String, paths: Vec<String> },
    /// The listing did not show the marker just written, so the cache's clock is unknown.
    #[error(
        "{cache}: the listing does not show the marker {MARKER_KEY} just written, so ages cannot be measured on the cache's clock"
    )]
    NoClock { cache: String },
}

impl GcError {
    /// Whether nothing was deleted because the run was refused (exit 2), as opposed to a
    /// cache that failed under it.
    pub fn is_refusal(&self) -> bool {
        match self {
            GcError::Cache(e) => matches!(e, CacheError::Config(_) | CacheError::Unreachable(_)),
            GcError::Running { .. }
            | GcError::Lost { .. }
            | GcError::MissingRoots { .. }
            | GcError::NoClock { .. } => true,
        }
    }
}

/// What a run found, planned and did.
#[derive(Debug, Default)]
pub struct GcOutcome {
    /// The marker generation of the run (none for a dry run).
    pub generation: Option<u64>,
    /// Now, on the clock ages were measured on (seconds since the epoch).
    pub now: i64,
    /// Narinfos listed and read.
    pub narinfos: u64,
    /// Narinfos that do not parse (no references or NAR known): kept only when a root
    /// reaches them.
    pub unparsable: Vec<String>,
    pub plan: GcPlan,
    /// Objects deleted, by kind: narinfos, `.ls`, NARs, logs.
    pub deleted: Deleted,
    /// Keys that could not be deleted, with why (the sweep stopped at their batch).
    pub failed: Vec<(String, CacheError)>,
    /// Why the sweep stopped before its end, if it did.
    pub stopped: Option<String>,
}

impl GcOutcome {
    /// Whether the run left something it should have done: a failed or skipped batch, or
    /// narinfos in a circle.
    pub fn has_problems(&self) -> bool {
        !self.failed.is_empty() || self.stopped.is_some() || !self.plan.circular.is_empty()
    }
}

/// Objects deleted, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub narinfos: u64,
    pub listings: u64,
    pub nars: u64,
    pub logs: u64,
}

impl Deleted {
    fn add(&mut self, key: &str) {
        if key.starts_with("nar/") {
            self.nars += 1;
        } else if key.starts_with("log/") {
            self.logs += 1;
        } else if key.ends_with(".ls") {
            self.listings += 1;
        } else {
            self.narinfos += 1;
        }
    }
}

/// What a caller hears while a run goes on.
pub trait GcObserver {
    /// The plan is made; nothing is deleted yet.
    fn planned(&mut self, _plan: &GcPlan) {}
    /// A batch was deleted whole (the next may follow).
    fn deleted(&mut self, _batch: &Batch) {}
}

impl GcObserver for () {}

/// The marker's heartbeat, shared by the run and its heartbeat thread.
#[derive(Debug)]
struct Beat {
    state: Mutex<BeatState>,
    changed: Condvar,
}

#[derive(Debug)]
struct BeatState {
    /// When the last successful rewrite of the marker started.
    last: Instant,
    beat: u64,
    /// Another generation took the marker: why.
    lost: Option<String>,
    stop: bool,
}

impl Beat {
    fn lock(&self) -> MutexGuard<'_, BeatState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Runs gc on `cache` as `cfg` says, telling `observer` what it planned and deleted.
///
/// # Errors
/// [`GcError`] when the run is refused (another gc runs, a named root is missing) or the
/// cache cannot be listed or read; nothing was deleted then.
pub fn run(
    cache: &dyn BinaryCache,
    cfg: &GcConfig,
    observer: &mut dyn GcObserver,
) -> Result<GcOutcome, GcError> {
    if cfg.dry_run {
        let now = unix_secs(SystemTime::now());
        let (mut out, _) = survey(cache, cfg, Some(now))?;
        observer.planned(&out.plan);
        out.now = now;
        return Ok(out);
    }
    wait_for_other_gc(cache)?;
    let generation = fastrand::u64(..);
    let write = |beat: u64, running: bool| {
        let m = Marker {
            generation,
            running,
            beat,
        };
        cache.put_object(MARKER_KEY, m.render().as_bytes(), "text/plain")
    };
    let started = Instant::now();
    write(0, true)?;
    check_ours(cache, generation)?;
    let beat = Beat {
        state: Mutex::new(BeatState {
            last: started,
            beat: 0,
            lost: None,
            stop: false,
        }),
        changed: Condvar::new(),
    };
    std::thread::scope(|scope| {
        let beating = scope.spawn(|| heartbeat(cache, generation, &beat, PACE));
        let result = sweep_run(cache, cfg, generation, &beat, observer);
        beat.lock().stop = true;
        beat.changed.notify_all();
        if beating.join().is_err() {
            tracing::error!("{}: the gc marker's heartbeat thread panicked", cache.url());
        }
        let last = beat.lock().beat;
        // Done, unless another gc holds the marker now (it is then that one's).
        if check_ours(cache, generation).is_ok()
            && let Err(e) = write(last + 1, false)
        {
            tracing::warn!(
                "{}: could not mark the gc done ({e}); writers take it for dead after {} s",
                cache.url(),
                STALE.as_secs()
            );
        }
        result
    })
}

/// Waits while another gc's marker says `running` and has not yet been seen unchanged
/// for [`STALE`] (a gc that died).
///
/// # Errors
/// [`GcError::Running`] as soon as the marker is seen to beat.
pub(crate) fn wait_for_other_gc(cache: &dyn BinaryCache) -> Result<(), GcError> {
    let first = read_gc_marker(cache)?;
    match first {
        None | Some(Some(Marker { running: false, .. })) => return Ok(()),
        _ => {}
    }
    let since = Instant::now();
    tracing::info!(
        "{}: a gc marker says running; waiting up to {} s to see whether it beats",
        cache.url(),
        STALE.as_secs()
    );
    while since.elapsed() < STALE {
        std::thread::sleep(POLL);
        let now = read_gc_marker(cache)?;
        match now {
            None | Some(Some(Marker { running: false, .. })) => return Ok(()),
            Some(Some(m)) if now != first => {
                return Err(GcError::Running {
                    cache: cache.url().to_owned(),
                    generation: m.generation,
                });
            }
            _ => {}
        }
    }
    tracing::warn!(
        "{}: the gc marker has not changed for {} s: that gc died; taking over",
        cache.url(),
        STALE.as_secs()
    );
    Ok(())
}

/// Reads the marker back.
///
/// # Errors
/// [`GcError::Lost`] when it is not this run's.
fn check_ours(cache: &dyn BinaryCache, generation: u64) -> Result<(), GcError> {
    match read_gc_marker(cache)? {
        Some(Some(m)) if m.generation == generation => Ok(()),
        other => Err(GcError::Lost {
            cache: cache.url().to_owned(),
            why: taken(other),
        }),
    }
}

/// Why the marker is not this gc's any more.
fn taken(r: crate::cache::gc_marker::Reading) -> String {
    format!(
        "another gc started at the same time ({})",
        describe_marker(r)
    )
}

fn describe_marker(r: crate::cache::gc_marker::Reading) -> String {
    match r {
        None => "the marker is gone".to_owned(),
        Some(None) => "the marker does not parse".to_owned(),
        Some(Some(m)) => format!("the marker has generation {:016x}", m.generation),
    }
}

/// How often the heartbeat beats, and the longest lapse between two successful beats
/// after which this gc may have been taken for dead.
#[derive(Debug, Clone, Copy)]
struct Pace {
    every: Duration,
    lapse: Duration,
}

/// The marker's rules: a beat every [`HEARTBEAT`]; a lapse past [`DELETE_DEADLINE`] (from
/// the start of one successful rewrite to the end of the next) leaves less than
/// [`STALE`] minus that before a writer that saw the older beat takes this gc for dead.
const PACE: Pace = Pace {
    every: HEARTBEAT,
    lapse: DELETE_DEADLINE,
};

/// The heartbeat thread: every [`Pace::every`] (sooner after a failed write), reads the
/// marker back and rewrites it with the next beat; stops when told, or at once when the
/// marker is another generation's. A rewrite that ends more than [`Pace::lapse`] after
/// the start of the last successful one (failed writes, a stopped process) ends the
/// heartbeat as lost: a writer may have taken this gc for dead and trusted what it saw
/// since, so this gc must not delete any more under the same generation.
fn heartbeat(cache: &dyn BinaryCache, generation: u64, beat: &Beat, pace: Pace) {
    let mut wait = pace.every;
    loop {
        let next = {
            let s = beat.lock();
            let (s, _) = beat
                .changed
                .wait_timeout_while(s, wait, |s| !s.stop)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if s.stop {
                return;
            }
            s.beat + 1
        };
        match read_gc_marker(cache) {
            Ok(Some(Some(m))) if m.generation == generation => {}
            Ok(other) => {
                beat.lock().lost = Some(taken(other));
                beat.changed.notify_all();
                return;
            }
            Err(e) => {
                tracing::warn!("{}: reading the gc marker back: {e}", cache.url());
                wait = pace.every / 4;
                continue;
            }
        }
        let started = Instant::now();
        let m = Marker {
            generation,
            running: true,
            beat: next,
        };
        match cache.put_object(MARKER_KEY, m.render().as_bytes(), "text/plain") {
            Ok(()) => {
                let mut s = beat.lock();
                let gap = s.last.elapsed();
                if gap > pace.lapse {
                    s.lost = Some(format!(
                        "its heartbeat lapsed for {} s, so a writer may have taken it for dead",
                        gap.as_secs()
                    ));
                    beat.changed.notify_all();
                    return;
                }
                s.last = started;
                s.beat = next;
                beat.changed.notify_all();
                wait = pace.every;
            }
            Err(e) => {
                tracing::warn!("{}: rewriting the gc marker: {e}", cache.url());
                wait = pace.every / 4;
            }
        }
    }
}

/// The run after the marker is written: settle, survey, sweep.
fn sweep_run(
    cache: &dyn BinaryCache,
    cfg: &GcConfig,
    generation: u64,
    beat: &Beat,
    observer: &mut dyn GcObserver,
) -> Result<GcOutcome, GcError> {
    {
        let deadline = Instant::now() + cfg.settle;
        let mut s = beat.lock();
        while s.lost.is_none() && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            s = beat
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        if let Some(why) = s.lost.clone() {
            return Err(GcError::Lost {
                cache: cache.url().to_owned(),
                why,
            });
        }
    }
    let (mut out, now) = survey(cache, cfg, None)?;
    out.generation = Some(generation);
    out.now = now;
    observer.planned(&out.plan);
    let batches = std::mem::take(&mut out.plan.batches);
    for batch in &batches {
        if let Err(why) = fresh(beat) {
            out.stopped = Some(why);
            break;
        }
        match cache.delete_objects(&batch.keys) {
            Ok(failed) if failed.is_empty() => {
                batch.keys.iter().for_each(|k| out.deleted.add(k));
                observer.deleted(batch);
            }
            Ok(failed) => {
                batch
                    .keys
                    .iter()
                    .filter(|k| !failed.iter().any(|(f, _)| f == *k))
                    .for_each(|k| out.deleted.add(k));
                out.stopped = Some(format!(
                    "{} of {} keys of a batch could not be deleted; what later batches hold stays",
                    failed.len(),
                    batch.keys.len()
                ));
                out.failed = failed;
                break;
            }
            Err(e) => {
                out.stopped = Some(format!(
                    "a batch of {} keys (from {}) failed: {e}",
                    batch.keys.len(),
                    batch.keys[0]
                ));
                break;
            }
        }
    }
    out.plan.batches = batches;
    Ok(out)
}

/// Waits until the marker's last heartbeat is within [`DELETE_DEADLINE`], so a batch
/// goes only while no writer can take this gc for dead.
///
/// # Errors
/// Why not: another gc took the marker, or it could not be rewritten for [`STALE`].
fn fresh(beat: &Beat) -> Result<(), String> {
    let since = Instant::now();
    let mut s = beat.lock();
    loop {
        if let Some(why) = &s.lost {
            return Err(why.clone());
        }
        if s.last.elapsed() < DELETE_DEADLINE {
            return Ok(());
        }
        if since.elapsed() >= STALE {
            return Err(format!(
                "the marker could not be rewritten for {} s",
                s.last.elapsed().as_secs()
            ));
        }
        s = beat
            .changed
            .wait_timeout(s, POLL)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// An object's listing entry as a [`Stat`]; one without a modification time is taken as
/// modified now and later (never old enough to delete).
fn stat(o: &ObjectInfo<'_>) -> Stat {
    Stat {
        size: o.size,
        mtime: o.modified.map_or(i64::MAX, unix_secs),
    }
}

/// Lists the cache, reads every narinfo, and plans. `now` is the clock to measure ages
/// on; `None`: the marker's modification time in the listing. Returns the outcome so far
/// and the `now` used.
fn survey(
    cache: &dyn BinaryCache,
    cfg: &GcConfig,
    now: Option<i64>,
) -> Result<(GcOutcome, i64), GcError> {
    let mut builder = IndexBuilder::default();
    let mut narinfos: Vec<(HashPart, Stat)> = Vec::new();
    let mut marker = None;
    let listed = cache.list_objects(&mut |o| {
        let key = o.key;
        if key == MARKER_KEY {
            marker = Some(stat(&o).mtime);
        } else if let Some(h) = narinfo_hash(key.as_bytes()) {
            narinfos.push((h, stat(&o)));
        } else if super::verify::is_leftover(key) {
            // An upload's own: the orphan sweep's, not gc's.
        } else if key.starts_with("nar/") {
            builder.nar(key, stat(&o));
        } else if let Some(drv) = key.strip_prefix("log/") {
            builder.log(drv, stat(&o));
        } else if let Some(h) = key.strip_suffix(".ls").and_then(parse_hash_part) {
            builder.listing(h, stat(&o));
        }
    })?;
    if !listed {
        return Err(CacheError::Config(format!(
            "{}: this cache cannot be listed, so it cannot be collected",
            cache.url()
        ))
        .into());
    }
    let now = match now.or(marker) {
        Some(n) => n,
        None => {
            return Err(GcError::NoClock {
                cache: cache.url().to_owned(),
            });
        }
    };
    narinfos.shrink_to_fit();
    // Narinfos name paths of the cache's own store directory.
    let store_dir = cache
        .get_text("nix-cache-info")?
        .and_then(|t| crate::format::cache_info::CacheInfo::parse(&t).ok())
        .map_or_else(|| cfg.store_dir.clone(), |i| i.store_dir);

    let mut out = GcOutcome::default();
    for chunk in narinfos.chunks(super::verify::BATCH) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|(h, _)| format!("{}.narinfo", nix32::encode(h)))
            .collect();
        let texts = cache.get_texts(&keys)?;
        let parsed: Vec<Option<Result<Parsed, ()>>> = texts
            .par_iter()
            .map(|t| t.as_deref().map(|t| parse(t, &store_dir)))
            .collect();
        drop(texts);
        for (((h, st), key), p) in chunk.iter().zip(keys).zip(parsed) {
            match p {
                // Removed since the listing.
                None => {}
                Some(Ok(p)) => {
                    out.narinfos += 1;
                    builder.narinfo(*h, *st, &p.url, &p.references, p.deriver.as_deref());
                }
                Some(Err(())) => {
                    out.narinfos += 1;
                    builder.narinfo(*h, *st, "", &[], None);
                    out.unparsable.push(key);
                }
            }
        }
    }
    drop(narinfos);
    let index: CacheIndex = builder.build();

    let missing: Vec<String> = cfg
        .roots
        .iter()
        .filter(|(h, why)| *why == RootReason::Closure && index.find(h).is_none())
        .map(|(h, _)| nix32::encode(h))
        .collect();
    if !missing.is_empty() {
        return Err(GcError::MissingRoots {
            cache: cache.url().to_owned(),
            paths: missing,
        });
    }
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let roots = Roots {
        paths: cfg.roots.clone(),
        newer_than: cfg.keep_newer_than.map(|d| now.saturating_sub(secs(d))),
    };
    let opts = GcOptions {
        now,
        grace: cfg.grace.as_secs(),
        batch_size: cfg.batch_size,
    };
    out.plan = plan(&index, &roots, &opts);
    Ok((out, now))
}

/// What gc needs of a narinfo.
struct Parsed {
    url: String,
    references: Vec<HashPart>,
    deriver: Option<String>,
}

fn parse(text: &str, store_dir: &str) -> Result<Parsed, ()> {
    let n = NarInfo::parse(text, store_dir).map_err(drop)?;
    Ok(Parsed {
        references: n.references.iter().map(NarinfoSet::key).collect(),
        deriver: n.deriver.as_ref().map(|d| d.base_name().to_owned()),
        url: n.url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::fault::{Errno, Fail, FaultPlan};
    use crate::cache::file::{FileCache, FsOp};
    use crate::format::hash::Sha256;
    use crate::format::store_path::StorePath;
    use std::sync::Arc;

    const SD: &str = "/nix/store";

    fn hash(i: usize) -> String {
        format!("{i:0>32}")
    }

    /// Writes path `i` (its NAR and narinfo, referring to `refs`) straight into `dir`.
    fn write_path(dir: &std::path::Path, i: usize, refs: &[usize]) {
        let nar = format!("the NAR of {i}").into_bytes();
        let n = NarInfo {
            store_path: StorePath::from_base_name(&format!("{}-p{i}", hash(i))).unwrap(),
            url: format!("nar/{}.nar", hash(i)),
            compression: "none".into(),
            file_hash: Some(Sha256::digest(&nar)),
            file_size: Some(nar.len() as u64),
            nar_hash: Sha256::digest(&nar),
            nar_size: nar.len() as u64,
            references: refs
                .iter()
                .map(|r| StorePath::from_base_name(&format!("{}-p{r}", hash(*r))).unwrap())
                .collect(),
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        std::fs::create_dir_all(dir.join("nar")).unwrap();
        std::fs::write(dir.join(&n.url), &nar).unwrap();
        std::fs::write(dir.join(format!("{}.narinfo", hash(i))), n.render(SD)).unwrap();
    }

    fn is_removal_of_p1(op: FsOp<'_>) -> bool {
        matches!(op, FsOp::Remove(p) if p.ends_with("00000000000000000000000000000001.narinfo"))
    }

    /// p2 → p1 → p0, nothing kept: the removal of p1's narinfo fails (a full disk). p2's
    /// narinfo went in the batch before; nothing after p1's batch goes (p0's narinfo and
    /// every NAR), so no narinfo is left without what it needs; the failure is named.
    #[test]
    fn a_batch_that_does_not_go_whole_stops_the_sweep_and_the_cache_stays_closed() {
        let dir = tempfile::tempdir().unwrap();
        write_path(dir.path(), 0, &[]);
        write_path(dir.path(), 1, &[0]);
        write_path(dir.path(), 2, &[1]);
        let plan = Arc::new(FaultPlan::new(
            dir.path(),
            SD,
            Fail::Matching {
                matches: is_removal_of_p1,
                times: 1,
            },
            Errno::NoSpace,
        ));
        let cache = FileCache::open_with_hook(dir.path(), "file:///t", Some(plan.clone())).unwrap();
        let cfg = GcConfig {
            store_dir: SD.into(),
            roots: Vec::new(),
            keep_newer_than: None,
            grace: Duration::ZERO,
            settle: Duration::ZERO,
            batch_size: 2,
            dry_run: false,
        };
        let out = run(&cache, &cfg, &mut ()).unwrap();
        assert_eq!(plan.fired().len(), 1);
        let failed: Vec<&str> = out.failed.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(failed, [format!("{}.narinfo", hash(1))]);
        assert!(out.failed[0].1.is_transient(), "{}", out.failed[0].1);
        assert!(out.stopped.is_some() && out.has_problems());
        assert_eq!(
            out.deleted,
            Deleted {
                narinfos: 1,
                ..Deleted::default()
            }
        );
        let there = |k: String| dir.path().join(k).exists();
        assert!(!there(format!("{}.narinfo", hash(2))));
        for i in [0, 1] {
            assert!(there(format!("{}.narinfo", hash(i))), "p{i}");
        }
        for i in [0, 1, 2] {
            assert!(there(format!("nar/{}.nar", hash(i))), "the NAR of p{i}");
        }
        let marker = std::fs::read_to_string(dir.path().join(MARKER_KEY)).unwrap();
        assert!(marker.contains("state done"), "{marker}");

        // Run again (the disk has room now), it finishes the work.
        let out = run(&cache, &cfg, &mut ()).unwrap();
        assert!(!out.has_problems(), "{out:?}");
        assert_eq!(
            out.deleted,
            Deleted {
                narinfos: 2,
                nars: 3,
                ..Deleted::default()
            }
        );
    }

    fn beat_state() -> Beat {
        Beat {
            state: Mutex::new(BeatState {
                last: Instant::now(),
                beat: 0,
                lost: None,
                stop: false,
            }),
            changed: Condvar::new(),
        }
    }

    /// Runs the heartbeat at `pace` until it ends on its own (lost) or `enough` beats went;
    /// what it left.
    fn beat_until(cache: &FileCache, pace: Pace, enough: u64) -> (Option<String>, u64) {
        let generation = 7;
        let m = Marker {
            generation,
            running: true,
            beat: 0,
        };
        let dir = cache.url().trim_start_matches("file://");
        std::fs::write(std::path::Path::new(dir).join(MARKER_KEY), m.render()).unwrap();
        let beat = beat_state();
        std::thread::scope(|scope| {
            let beating = scope.spawn(|| heartbeat(cache, generation, &beat, pace));
            {
                let mut s = beat.lock();
                while s.lost.is_none() && s.beat < enough {
                    s = beat.changed.wait(s).unwrap();
                }
                s.stop = true;
            }
            beat.changed.notify_all();
            beating.join().unwrap();
        });
        let s = beat.lock();
        (s.lost.clone(), s.beat)
    }

    /// A rewrite of the marker that comes later than the lapse allows after the last
    /// successful one ends the heartbeat as lost, and `fresh` then refuses every batch;
    /// within it, failed rewrites are only retried.
    #[test]
    fn a_heartbeat_that_lapsed_stops_the_deletions() {
        fn is_marker_rename(op: FsOp<'_>) -> bool {
            matches!(op, FsOp::Rename { to, .. } if to.ends_with(MARKER_KEY))
        }
        let dir = tempfile::tempdir().unwrap();
        let failing = || {
            let plan = Arc::new(FaultPlan::new(
                dir.path(),
                SD,
                Fail::Matching {
                    matches: is_marker_rename,
                    times: 3,
                },
                Errno::Io,
            ));
            let url = format!("file://{}", dir.path().display());
            let cache = FileCache::open_with_hook(dir.path(), &url, Some(plan.clone())).unwrap();
            (plan, cache)
        };
        // Three failed rewrites within the lapse: retried, and the beats go on.
        let (plan, cache) = failing();
        let generous = Pace {
            every: Duration::from_millis(4),
            lapse: Duration::from_secs(3600),
        };
        assert_eq!(beat_until(&cache, generous, 3), (None, 3));
        assert_eq!(plan.fired().len(), 3);
        // No lapse allowed: the first rewrite after the failed ones is too late.
        let (plan, cache) = failing();
        let strict = Pace {
            every: Duration::from_millis(4),
            lapse: Duration::ZERO,
        };
        let (lost, beats) = beat_until(&cache, strict, 5);
        assert_eq!(plan.fired().len(), 3);
        assert_eq!(beats, 0, "no beat counts after a lapse");
        let why = lost.expect("a lapsed heartbeat is lost");
        assert!(why.contains("lapsed"), "{why}");
        let beat = beat_state();
        beat.lock().lost = Some(why);
        assert!(fresh(&beat).unwrap_err().contains("lapsed"));
    }
}
