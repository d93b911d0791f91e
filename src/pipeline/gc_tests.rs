//! The writer's side of gc's protocol, on synthetic store paths and a local cache: a wave
//! waits while a gc runs, goes on once it is done or its marker is stale, and a job
//! planned before a gc publishes nothing that points at what the gc removed.
use super::gc_gate::GcWait;
use super::outcome::*;
use super::tests::{make_store, opts};
use super::*;
use crate::cache::file::FileCache;
use crate::cache::gc_marker::{Epoch, MARKER_KEY, Marker};
use crate::cache::{CacheError, Published};
use crate::format::compression::Compression;
use crate::format::narinfo::NarInfo;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

/// What runs once after a size check of one object.
type Hook = Box<dyn FnOnce() + Send>;

/// A local cache that counts its marker readings and publishing waves, and runs a hook
/// once after the first size check of one object (the sink's look for its NAR).
struct Watched {
    inner: FileCache,
    marker_reads: AtomicUsize,
    waves: AtomicUsize,
    after_size_of: Mutex<Option<(String, Hook)>>,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").finish_non_exhaustive()
    }
}

impl Watched {
    fn new(dir: &Path) -> Self {
        Watched {
            inner: FileCache::open(dir, "file:///t").unwrap(),
            marker_reads: AtomicUsize::new(0),
            waves: AtomicUsize::new(0),
            after_size_of: Mutex::new(None),
        }
    }
}

impl BinaryCache for Watched {
    forward_to!(
        inner;
        url, ensure_cache_info, has_narinfo, has_object, get_narinfo, begin_nar, put_narinfo,
        sync,
    );
    fn object_size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        let size = self.inner.object_size(key);
        let mut hook = self.after_size_of.lock().unwrap();
        if hook.as_ref().is_some_and(|(k, _)| k == key) {
            (hook.take().unwrap().1)();
        }
        size
    }
    fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
        if key == MARKER_KEY {
            self.marker_reads.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.get_text(key)
    }
    fn publish_narinfos(
        &self,
        store_dir: &str,
        narinfos: Vec<NarInfo>,
    ) -> Result<Vec<Published>, CacheError> {
        self.waves.fetch_add(1, Ordering::SeqCst);
        self.inner.publish_narinfos(store_dir, narinfos)
    }
}

fn write_marker(dir: &Path, generation: u64, running: bool, beat: u64) {
    let m = Marker {
        generation,
        running,
        beat,
    };
    std::fs::write(dir.join(MARKER_KEY), m.render()).unwrap();
}

fn narinfo_path(dir: &Path, path: &StorePath) -> std::path::PathBuf {
    dir.join(crate::cache::narinfo_key(path))
}

fn outcome_of(report: &PushReport, path: &StorePath) -> Outcome {
    let name = path.to_string();
    report
        .results
        .iter()
        .find(|r| r.path.ends_with(&name))
        .unwrap_or_else(|| panic!("no result for {name}: {:?}", report.results))
        .outcome
        .clone()
}

/// Quick waits: a test cannot wait the protocol's minute for a dead gc.
fn quick(o: &mut PushOptions, stale: Duration) {
    o.gc_wait = GcWait {
        stale,
        poll: Duration::from_millis(10),
        ..GcWait::default()
    };
}

#[test]
fn a_reference_a_gc_removed_after_the_plan_is_not_referred_to_and_a_rerun_uploads_it() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let all = make_store(store.path(), &[("dep", 100, &[]), ("app", 100, &[0])]);
    let (dep, app) = (&all[0], &all[1]);
    let cache = Watched::new(cache_dir.path());
    let o = opts(Compression::Zstd, 64 << 10, 256 << 10);
    upload(&cache, sd, std::slice::from_ref(dep), &o, &NoProgress).unwrap();
    // The plan (no gc ever) found dep in the cache; then a gc ran and deleted it.
    let planned = Epoch::default();
    let seen: HashSet<StorePath> = [dep.path.clone()].into();
    write_marker(cache_dir.path(), 7, true, 0);
    std::fs::remove_file(narinfo_path(cache_dir.path(), &dep.path)).unwrap();
    write_marker(cache_dir.path(), 7, false, 3);

    let run = std::slice::from_ref(app);
    let report = upload_after(&cache, sd, run, &seen, planned, &o, &NoProgress).unwrap();
    match outcome_of(&report, &app.path) {
        Outcome::Failed(f @ Failure::RemovedByGc { .. }) => {
            assert!(f.is_transient(), "{f}");
            let msg = f.to_string();
            assert!(
                msg.contains(&crate::cache::narinfo_key(&dep.path)) && msg.contains("gc"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(!narinfo_path(cache_dir.path(), &app.path).exists());

    // A rerun plans again (dep is not there: it goes up too) and completes.
    let reading = super::gc_gate::Gate::new(o.gc_wait)
        .settle(&cache, &|| false, &NoProgress)
        .unwrap()
        .unwrap();
    assert_ne!(reading.epoch, planned);
    let report = upload_after(
        &cache,
        sd,
        &all,
        &HashSet::new(),
        reading.epoch,
        &o,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(report.failed().count(), 0, "{:?}", report.results);
    assert!(narinfo_path(cache_dir.path(), &app.path).exists());
    assert!(narinfo_path(cache_dir.path(), &dep.path).exists());
}

#[test]
fn a_nar_found_in_the_cache_and_removed_by_a_gc_before_the_wave_is_not_named() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let all = make_store(store.path(), &[("lib", 5000, &[])]);
    let cache = Watched::new(cache_dir.path());
    let o = opts(Compression::Zstd, 64 << 10, 256 << 10);
    upload(&cache, sd, &all, &o, &NoProgress).unwrap();
    let text = std::fs::read_to_string(narinfo_path(cache_dir.path(), &all[0].path)).unwrap();
    let url = NarInfo::parse(&text, sd).unwrap().url;
    // Its narinfo went (a gc's first layer): the path goes up again, and the sink finds
    // its NAR in the cache; the gc's next layer deletes that NAR before the wave.
    std::fs::remove_file(narinfo_path(cache_dir.path(), &all[0].path)).unwrap();
    let dir = cache_dir.path().to_owned();
    let nar = dir.join(&url);
    *cache.after_size_of.lock().unwrap() = Some((
        url.clone(),
        Box::new(move || {
            write_marker(&dir, 9, true, 0);
            std::fs::remove_file(&nar).unwrap();
            write_marker(&dir, 9, false, 1);
        }),
    ));
    let report = upload_after(
        &cache,
        sd,
        &all,
        &HashSet::new(),
        Epoch::default(),
        &o,
        &NoProgress,
    )
    .unwrap();
    match outcome_of(&report, &all[0].path) {
        Outcome::Failed(f @ Failure::RemovedByGc { .. }) => {
            assert!(f.is_transient() && f.to_string().contains(&url), "{f}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!narinfo_path(cache_dir.path(), &all[0].path).exists());
    // Without a gc since the plan, the same path goes up whole.
    let report = upload_after(
        &cache,
        sd,
        &all,
        &HashSet::new(),
        super::gc_gate::Gate::new(o.gc_wait)
            .settle(&cache, &|| false, &NoProgress)
            .unwrap()
            .unwrap()
            .epoch,
        &o,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(report.failed().count(), 0, "{:?}", report.results);
    assert!(cache_dir.path().join(&url).exists());
}

/// Reports the first wait for a gc on a channel.
struct WaitSignal(Mutex<Option<std::sync::mpsc::Sender<()>>>);

impl Progress for WaitSignal {
    fn waiting_for_gc(&self) {
        if let Some(tx) = self.0.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }
}

#[test]
fn a_wave_waits_while_a_gc_runs_and_publishes_once_it_is_done() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let all = make_store(store.path(), &[("dep", 100, &[]), ("app", 100, &[0])]);
    let cache = Watched::new(cache_dir.path());
    let mut o = opts(Compression::Zstd, 64 << 10, 256 << 10);
    // Never stale within the test: only `done` lets the wave go.
    quick(&mut o, Duration::from_secs(3600));
    write_marker(cache_dir.path(), 11, true, 0);
    let (tx, waiting) = std::sync::mpsc::channel();
    let progress = WaitSignal(Mutex::new(Some(tx)));
    std::thread::scope(|s| {
        let push = s.spawn(|| upload(&cache, sd, &all, &o, &progress));
        waiting
            .recv_timeout(Duration::from_secs(60))
            .expect("the wave reports its wait for the gc");
        // The heartbeat goes on; nothing is published meanwhile.
        write_marker(cache_dir.path(), 11, true, 1);
        for info in &all {
            assert!(!narinfo_path(cache_dir.path(), &info.path).exists());
        }
        assert_eq!(cache.waves.load(Ordering::SeqCst), 0);
        write_marker(cache_dir.path(), 11, false, 2);
        let report = push.join().unwrap().unwrap();
        assert_eq!(report.failed().count(), 0, "{:?}", report.results);
    });
    for info in &all {
        assert!(narinfo_path(cache_dir.path(), &info.path).exists());
    }
}

#[test]
fn a_stale_marker_is_waited_on_only_until_it_is_stale() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let all = make_store(store.path(), &[("dep", 100, &[]), ("app", 100, &[0])]);
    let cache = Watched::new(cache_dir.path());
    let mut o = opts(Compression::Zstd, 64 << 10, 256 << 10);
    quick(&mut o, Duration::from_millis(200));
    // A gc that died: its heartbeat never changes.
    write_marker(cache_dir.path(), 12, true, 5);
    let (tx, waiting) = std::sync::mpsc::channel();
    let progress = WaitSignal(Mutex::new(Some(tx)));
    let report = upload(&cache, sd, &all, &o, &progress).unwrap();
    assert!(waiting.try_recv().is_ok(), "it waited for the gc first");
    assert_eq!(report.failed().count(), 0, "{:?}", report.results);
    for info in &all {
        assert!(narinfo_path(cache_dir.path(), &info.path).exists());
    }
}

#[test]
fn with_no_marker_a_wave_costs_at_most_one_marker_reading() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    // A chain: every path its own wave.
    let specs: Vec<(String, usize, Vec<usize>)> = (0..20)
        .map(|i| {
            (
                format!("p{i}"),
                100,
                if i == 0 { vec![] } else { vec![i - 1] },
            )
        })
        .collect();
    let specs: Vec<(&str, usize, &[usize])> = specs
        .iter()
        .map(|(n, s, r)| (n.as_str(), *s, r.as_slice()))
        .collect();
    let all = make_store(store.path(), &specs);
    let cache = Watched::new(cache_dir.path());
    let o = opts(Compression::Zstd, 64 << 10, 256 << 10);
    let report = upload(&cache, sd, &all, &o, &NoProgress).unwrap();
    assert_eq!(report.failed().count(), 0, "{:?}", report.results);
    let (reads, waves) = (
        cache.marker_reads.load(Ordering::SeqCst),
        cache.waves.load(Ordering::SeqCst),
    );
    assert!(
        waves >= 1 && reads >= 1 && reads <= waves,
        "{reads} readings for {waves} waves"
    );
}

/// A cache whose marker cannot be read.
#[derive(Debug)]
struct MarkerUnreadable(FileCache);

impl BinaryCache for MarkerUnreadable {
    forward_to!(
        0;
        url, ensure_cache_info, has_narinfo, has_object, object_size, get_narinfo, begin_nar,
        put_narinfo, sync,
    );
    fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
        if key == MARKER_KEY {
            return Err(CacheError::Remote {
                cache: "file:///t".into(),
                key: key.into(),
                message: "connection reset".into(),
                transient: true,
            });
        }
        self.0.get_text(key)
    }
}

#[test]
fn a_marker_that_cannot_be_read_fails_the_wave_transiently_in_a_long_lived_pipeline() {
    let store = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let sd = store.path().to_str().unwrap();
    let all = make_store(store.path(), &[("a", 100, &[])]);
    let cache = MarkerUnreadable(FileCache::open(cache_dir.path(), "file:///t").unwrap());
    let o = opts(Compression::Zstd, 64 << 10, 256 << 10);
    let job =
        super::publish::NewJob::waiting_for(all[0].clone(), Epoch::default().into(), |_| false);
    let (outcome, _) = stream(
        &cache,
        sd,
        &o,
        &NoProgress,
        super::publish::OnPublishError::FailPaths,
        |feeder, settled| {
            feeder.submit(vec![job]);
            drop(feeder);
            settled.recv().unwrap().result.outcome
        },
    )
    .unwrap();
    match outcome {
        Outcome::Failed(f) => assert!(
            f.is_transient() && f.to_string().contains(MARKER_KEY),
            "{f}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(!narinfo_path(cache_dir.path(), &all[0].path).exists());
    // A one-shot push stops with the error.
    let err = upload(&cache, sd, &all, &o, &NoProgress).unwrap_err();
    assert!(err.is_transient(), "{err}");
}
