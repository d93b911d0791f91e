//! Fault injection into a `file://` cache under the whole pipeline, in the spirit of
//! SQLite's I/O-error tests: for every k over a representative run, the k-th file
//! operation (create, write, sync, rename, read, stat, list) fails with `ENOSPC` or `EIO`.
//!
//! The run: eleven paths, one of them a slow reference two others wait for, a large NAR
//! in flight, paths whose narinfo is already in the cache under another key (ours is
//! merged in), and one the cache has for another NAR (its narinfo is kept, the NAR the
//! run commits is named by the sync of an idle pipeline). Each k is run in push's mode (a
//! failed wave halts) and in the daemon's (failed paths fail, the pipeline goes on). After each: at every narinfo rename the
//! invariant held against the durability model ([`FaultPlan`]); every job settled (a run
//! that does not end within a minute is a wedge); every path reported published is
//! there, whole; every failure is transient (a full or failing disk heals); and once the
//! fault clears, a second push (or the same daemon pipeline, resubmitting what failed)
//! brings every path to the cache, our signature beside the other key's.
use super::outcome::*;
use super::publish::*;
use super::tests::{decompress, make_store, opts};
use super::*;
use crate::cache::fault::{Errno, Fail, FaultPlan};
use crate::cache::file::{FileCache, FsOp};
use crate::format::compression::Compression;
use crate::format::narinfo::NarInfo;
use crate::format::signing::SigningKey;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Longer than any of these runs takes (well under a second): past it, a run is wedged.
const WEDGED: Duration = Duration::from_secs(60);

/// The paths of the run: (name, size, references).
const PATHS: &[(&str, usize, &[usize])] = &[
    ("slow-reference", 768 << 10, &[]),
    ("large", 1536 << 10, &[]),
    ("a", 10, &[]),
    ("b", 2_000, &[]),
    ("c", 300, &[2]),
    ("d", 40_000, &[2, 3]),
    ("waits-for-slow", 100, &[0]),
    ("waits-for-slow-too", 5_000, &[0, 2]),
    ("present", 1_000, &[2]),
    ("top", 50, &[6, 7, 8, 1]),
    ("kept", 3_000, &[]),
];
/// Paths the cache has before the run, signed by another key only.
const PRESENT: &[usize] = &[2, 8];
/// A path the cache has before the run for another NAR (uncompressed), signed by our key:
/// its narinfo is kept, and the NAR the run commits for it is named by an idle sync.
const KEPT: usize = 10;

struct Setup {
    _store: tempfile::TempDir,
    sd: String,
    infos: Vec<PathInfo>,
    opts: PushOptions,
    other: SigningKey,
}

/// The key that signed what the cache had before the run.
fn other_key() -> SigningKey {
    SigningKey::from_seed("other-1", [9; 32])
}

fn setup() -> Setup {
    let store = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap().to_owned();
    let infos = make_store(store.path(), PATHS);
    Setup {
        _store: store,
        sd,
        infos,
        opts: opts(Compression::Zstd, 64 << 10, 4 << 20),
        other: other_key(),
    }
}

impl Setup {
    /// A cache directory holding [`PRESENT`], signed by the other key, and a cache on it
    /// whose file operations go through a [`FaultPlan`].
    fn cache(&self, fail: Fail, errno: Errno) -> (tempfile::TempDir, FileCache, Arc<FaultPlan>) {
        // On tmpfs where there is one: the durability model, not the disk, is checked.
        let dir = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let plain = FileCache::open(dir.path(), "file:///c").unwrap();
        let mut o = opts(Compression::Zstd, 64 << 10, 4 << 20);
        o.keys = vec![other_key()];
        let present: Vec<PathInfo> = PRESENT.iter().map(|&i| self.infos[i].clone()).collect();
        let r = upload(&plain, &self.sd, &present, &o, &NoProgress).unwrap();
        assert_eq!(r.failed().count(), 0);
        let none = opts(Compression::None, 64 << 10, 4 << 20);
        let kept = std::slice::from_ref(&self.infos[KEPT]);
        let r = upload(&plain, &self.sd, kept, &none, &NoProgress).unwrap();
        assert_eq!(r.failed().count(), 0);
        let plan = Arc::new(FaultPlan::new(dir.path(), &self.sd, fail, errno));
        let cache = FileCache::open_with_hook(dir.path(), "file:///c", Some(plan.clone())).unwrap();
        (dir, cache, plan)
    }

    /// Jobs for the paths `which` takes, each waiting for the references `in_cache` says
    /// the cache lacks.
    fn jobs(
        &self,
        which: impl Fn(usize) -> bool,
        in_cache: impl Fn(&StorePath) -> bool,
    ) -> Vec<NewJob> {
        self.infos
            .iter()
            .enumerate()
            .filter(|(i, _)| which(*i))
            .map(|(_, info)| {
                NewJob::waiting_for(info.clone(), Default::default(), |r| !in_cache(r))
            })
            .collect()
    }

    /// Every narinfo in `dir` is whole: it parses, its NAR is there with its FileSize and
    /// FileHash and decompresses to its NarHash, and each reference has a narinfo.
    fn check_visible(&self, dir: &Path, k: usize) {
        for e in std::fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if !name.ends_with(".narinfo") || name.starts_with('.') {
                continue;
            }
            let text = std::fs::read_to_string(dir.join(&name)).unwrap();
            let n =
                NarInfo::parse(&text, &self.sd).unwrap_or_else(|e| panic!("k={k}: {name}: {e}"));
            let nar = std::fs::read(dir.join(&n.url))
                .unwrap_or_else(|e| panic!("k={k}: {name}: its NAR {}: {e}", n.url));
            assert_eq!(
                (nar.len() as u64, crate::format::hash::Sha256::digest(&nar)),
                (n.file_size.unwrap(), n.file_hash.unwrap()),
                "k={k}: {name}"
            );
            assert_eq!(
                crate::format::hash::Sha256::digest(&decompress(
                    if n.compression == "none" {
                        Compression::None
                    } else {
                        Compression::Zstd
                    },
                    &nar
                )),
                n.nar_hash,
                "k={k}: {name}"
            );
            for r in &n.references {
                assert!(
                    dir.join(crate::cache::narinfo_key(r)).exists(),
                    "k={k}: {name}: its reference {r} has no narinfo"
                );
            }
        }
    }

    /// Every path is in the cache, signed by our key, and the present ones by the other
    /// key too.
    fn check_complete(&self, dir: &Path, k: usize) {
        let ours = self.opts.keys[0].verifying_key();
        let other = self.other.verifying_key();
        for (i, info) in self.infos.iter().enumerate() {
            let text = std::fs::read_to_string(dir.join(crate::cache::narinfo_key(&info.path)))
                .unwrap_or_else(|e| panic!("k={k}: {} never reached the cache: {e}", info.path));
            let n = NarInfo::parse(&text, &self.sd).unwrap();
            assert_eq!(
                n.valid_signatures(&self.sd, std::slice::from_ref(&ours)),
                1,
                "k={k}: {}",
                info.path
            );
            if PRESENT.contains(&i) {
                assert_eq!(
                    n.valid_signatures(&self.sd, std::slice::from_ref(&other)),
                    1,
                    "k={k}: {}: the other key's signature was dropped",
                    info.path
                );
            }
        }
    }
}

/// Runs `f` on a thread of its own and returns its result, or fails the test when it has
/// not ended within [`WEDGED`].
fn bounded<T: Send + 'static>(k: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(WEDGED) {
        Ok(t) => t,
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
            panic!("k={k}: the run did not end: wedged")
        }
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => panic!("k={k}: the run panicked"),
    }
}

/// Whether `dir` holds a narinfo for `path` (read past the fault plan).
fn has_narinfo(dir: &Path, path: &StorePath) -> bool {
    dir.join(crate::cache::narinfo_key(path)).exists()
}

/// Checks what one path's outcome says against the cache: published means its narinfo is
/// there; a failure must be transient, since a full or failing disk heals.
fn check_outcome(dir: &Path, k: usize, path: &StorePath, outcome: &Outcome, fired: &[String]) {
    match outcome {
        Outcome::Uploaded { .. } | Outcome::AlreadyPresent => assert!(
            has_narinfo(dir, path),
            "k={k}: {path} reported published but absent ({fired:?})"
        ),
        Outcome::Failed(f) => assert!(
            f.is_transient(),
            "k={k}: {path} failed permanently of a transient fault: {f} ({fired:?})"
        ),
    }
}

/// One run in push's mode: `upload` with the k-th operation failing, then again healed.
/// Returns (faults fired, operations of the first run).
fn push_once(s: &Arc<Setup>, k: usize, errno: Errno) -> (usize, usize) {
    let (dir, cache, plan) = s.cache(Fail::Nth(k), errno);
    let cache = Arc::new(cache);
    let first = {
        let (s, cache) = (s.clone(), cache.clone());
        bounded(k, move || {
            upload(&*cache, &s.sd, &s.infos, &s.opts, &NoProgress)
        })
    };
    let (fired, ops) = (plan.fired(), plan.ops());
    match &first {
        Ok(report) => {
            for r in &report.results {
                let path = StorePath::from_absolute_path(&r.path, &s.sd).unwrap();
                check_outcome(dir.path(), k, &path, &r.outcome, &fired);
            }
        }
        Err(e) => assert!(e.is_transient(), "k={k}: {e:#} ({fired:?})"),
    }
    assert_eq!(plan.violations(), Vec::<String>::new(), "k={k} ({fired:?})");
    s.check_visible(dir.path(), k);
    plan.heal();
    let again = {
        let (s, cache) = (s.clone(), cache.clone());
        bounded(k, move || {
            upload(&*cache, &s.sd, &s.infos, &s.opts, &NoProgress)
        })
    }
    .unwrap_or_else(|e| panic!("k={k}: healed, the push still failed: {e:#}"));
    assert_eq!(again.failed().count(), 0, "k={k}: {:?}", again.results);
    assert_eq!(plan.violations(), Vec::<String>::new(), "k={k} ({fired:?})");
    s.check_visible(dir.path(), k);
    s.check_complete(dir.path(), k);
    (fired.len(), ops)
}

/// One run in the daemon's mode: one long-lived pipeline takes every path with the k-th
/// operation failing, settles each, and, healed, takes the failed ones again. Returns
/// (faults fired, operations before healing).
fn daemon_once(s: &Arc<Setup>, k: usize, errno: Errno) -> (usize, usize) {
    let (dir, cache, plan) = s.cache(Fail::Nth(k), errno);
    let cache = Arc::new(cache);
    let (fired, ops) = {
        let (s, cache, plan) = (s.clone(), cache.clone(), plan.clone());
        let root = dir.path().to_owned();
        bounded(k, move || {
            let body = |feeder: Feeder<'_>, settled: crossbeam_channel::Receiver<Settled>| {
                let present = |p: &StorePath| {
                    PRESENT
                        .iter()
                        .chain([&KEPT])
                        .any(|&i| s.infos[i].path == *p)
                };
                // The kept path alone first: its NAR is committed, its narinfo kept, and
                // the pipeline, idle, syncs to name the NAR (unless a fault came first).
                let mut sent = feeder.submit(s.jobs(|i| i == KEPT, present));
                let mut failed = Vec::new();
                let done = settled
                    .recv_timeout(WEDGED)
                    .unwrap_or_else(|_| panic!("k={k}: the kept path never settled"));
                check_outcome(&root, k, &done.path, &done.result.outcome, &plan.fired());
                if matches!(done.result.outcome, Outcome::Failed(_)) {
                    failed.push(done.path);
                }
                assert!(
                    plan.wait_sync_or_fault(WEDGED),
                    "k={k}: idle, nothing synced"
                );
                sent += feeder.submit(s.jobs(|i| i != KEPT, present));
                assert_eq!(sent, s.infos.len());
                for _ in 1..sent {
                    let done = settled.recv_timeout(WEDGED).unwrap_or_else(|_| {
                        panic!("k={k}: a job never settled ({:?})", plan.fired())
                    });
                    check_outcome(&root, k, &done.path, &done.result.outcome, &plan.fired());
                    if matches!(done.result.outcome, Outcome::Failed(_)) {
                        failed.push(done.path);
                    }
                }
                let seen = (plan.fired(), plan.ops());
                plan.heal();
                // As the daemon retries: what failed, planned against the cache.
                let has = |p: &StorePath| has_narinfo(&root, p);
                let sent = feeder.submit(s.jobs(|i| failed.contains(&s.infos[i].path), has));
                for _ in 0..sent {
                    let done = settled
                        .recv_timeout(WEDGED)
                        .unwrap_or_else(|_| panic!("k={k}: a retried job never settled"));
                    assert!(
                        !matches!(done.result.outcome, Outcome::Failed(_)),
                        "k={k}: healed, {} still failed: {:?} ({:?})",
                        done.path,
                        done.result.outcome,
                        seen.0
                    );
                }
                seen
            };
            let (seen, _) = stream(
                &*cache,
                &s.sd,
                &s.opts,
                &NoProgress,
                OnPublishError::FailPaths,
                body,
            )
            .unwrap_or_else(|e| panic!("k={k}: the daemon's pipeline ended with {e:#}"));
            seen
        })
    };
    assert_eq!(plan.violations(), Vec::<String>::new(), "k={k} ({fired:?})");
    s.check_visible(dir.path(), k);
    s.check_complete(dir.path(), k);
    (fired.len(), ops)
}

/// Runs `once` for every k over the operations of a clean run (and a few past them: runs
/// differ a little in order and count), `ENOSPC` and `EIO` in turn, and checks that
/// nearly every k found an operation to fail.
fn every_k(once: fn(&Arc<Setup>, usize, Errno) -> (usize, usize)) {
    let s = Arc::new(setup());
    let (none, ops) = once(&s, usize::MAX, Errno::NoSpace);
    assert_eq!(none, 0);
    assert!(ops > 50, "a representative run: {ops} file operations");
    eprintln!("{ops} file operations in a clean run");
    let mut fired = 0;
    let errnos = [Errno::NoSpace, Errno::Io];
    for k in 0..ops + 5 {
        fired += once(&s, k, errnos[k % 2]).0;
    }
    assert!(
        fired >= ops * 9 / 10,
        "{fired} faults fired over {ops} operations"
    );
}

#[test]
fn every_file_operation_failing_in_a_push_leaves_the_cache_whole_and_a_rerun_completes_it() {
    every_k(push_once);
}

#[test]
fn every_file_operation_failing_under_the_daemon_settles_every_job_and_retries_complete_it() {
    every_k(daemon_once);
}

fn is_sync(op: FsOp<'_>) -> bool {
    matches!(op, FsOp::SyncData(_) | FsOp::SyncFs(_))
}

#[test]
fn a_failed_idle_sync_never_stops_the_daemons_pipeline() {
    // The cache holds a narinfo of `present` for another NAR (uncompressed): ours is
    // committed, the cache's narinfo kept, and the sync that names our NAR while the
    // pipeline is idle fails. The next path must still go up.
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let plain = FileCache::open(dir.path(), "file:///c").unwrap();
    let (present, next) = (&s.infos[2], &s.infos[3]);
    let none = opts(Compression::None, 64 << 10, 4 << 20);
    upload(
        &plain,
        &s.sd,
        std::slice::from_ref(present),
        &none,
        &NoProgress,
    )
    .unwrap();
    let plan = Arc::new(FaultPlan::new(
        dir.path(),
        &s.sd,
        Fail::Matching {
            matches: is_sync,
            times: 1,
        },
        Errno::Io,
    ));
    let cache = FileCache::open_with_hook(dir.path(), "file:///c", Some(plan.clone())).unwrap();
    let job = |info: &PathInfo| NewJob::waiting_for(info.clone(), Default::default(), |_| false);
    let ((), _) = stream(
        &cache,
        &s.sd,
        &s.opts,
        &NoProgress,
        OnPublishError::FailPaths,
        |feeder, settled| {
            feeder.submit(vec![job(present)]);
            let done = settled.recv_timeout(WEDGED).unwrap();
            assert!(
                matches!(done.result.outcome, Outcome::AlreadyPresent),
                "{done:?}"
            );
            assert!(plan.wait_fired(1, WEDGED), "the idle sync never ran");
            feeder.submit(vec![job(next)]);
            let done = settled
                .recv_timeout(Duration::from_secs(30))
                .expect("a path handed in after a failed idle sync never settled");
            assert!(
                matches!(done.result.outcome, Outcome::Uploaded { .. }),
                "{done:?}"
            );
        },
    )
    .unwrap();
    assert!(cache.has_narinfo(&next.path).unwrap());
}
