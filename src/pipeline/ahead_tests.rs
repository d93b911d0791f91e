//! Sending small paths ahead of the look at the cache: they are walked and compressed while
//! the look is in flight, nothing of them reaches the cache before it ends, and those it
//! finds in the cache are dropped, uncommitted and uncounted.
use super::outcome::*;
use super::tests::make_store;
use super::*;
use crate::cache::file::FileCache;
use crate::cache::{CacheError, NarUpload};
use crate::format::compression::{Compression, CompressionSettings};
use crate::store::db::testdb::{Row, TestDb};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex};

use std::time::Duration;

/// How long a look waits for the NARs it expects to be begun meanwhile: far beyond what a
/// few small paths take, so only a push that does not send them ahead runs into it.
const PATIENCE: Duration = Duration::from_secs(20);

/// How the look of a [`Listed`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ends {
    Answers,
    Fails,
    Panics,
}

/// A local directory posing as a remote cache: it commits several NARs at once, lets NARs
/// be compressed during its look, and its look (the listing of narinfos) answers only once
/// `want` NAR uploads have begun (or [`PATIENCE`] ran out), noting what had been committed
/// by then; or, by `ends`, fails or panics then instead. The begin of an upload of a NAR
/// of a size in `refused` fails (and counts as begun).
#[derive(Debug)]
struct Listed {
    inner: FileCache,
    want: usize,
    ends: Ends,
    refused: Vec<u64>,
    begun: Mutex<usize>,
    began: Condvar,
    commits: Arc<AtomicUsize>,
    /// Uploads begun and commits done when the look answered.
    at_look: Mutex<Option<(usize, usize)>>,
}

impl Listed {
    fn new(dir: &std::path::Path, want: usize, ends: Ends) -> Self {
        Listed {
            inner: FileCache::open(dir, "file:///listed").unwrap(),
            want,
            ends,
            refused: Vec::new(),
            begun: Mutex::new(0),
            began: Condvar::new(),
            commits: Arc::default(),
            at_look: Mutex::new(None),
        }
    }
}

/// An upload that counts its commit.
struct Counted {
    inner: Box<dyn NarUpload>,
    commits: Arc<AtomicUsize>,
}

impl std::io::Write for Counted {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.inner.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl NarUpload for Counted {
    fn written(&mut self) {
        self.inner.written();
    }
    fn commit(self: Box<Self>, key: &str) -> Result<(), CacheError> {
        self.inner.commit(key)?;
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl BinaryCache for Listed {
    forward_to!(
        inner;
        url, ensure_cache_info, has_narinfo, has_object, object_size, get_narinfo, get_text,
        put_narinfo, sync,
    );
    fn has_narinfos(&self, paths: &[StorePath]) -> Result<Vec<bool>, CacheError> {
        let begun = self.begun.lock().unwrap();
        let (begun, _) = self
            .began
            .wait_timeout_while(begun, PATIENCE, |n| *n < self.want)
            .unwrap();
        *self.at_look.lock().unwrap() = Some((*begun, self.commits.load(Ordering::SeqCst)));
        drop(begun);
        assert!(self.ends != Ends::Panics, "the look panicked");
        if self.ends == Ends::Fails {
            return Err(CacheError::Remote {
                cache: self.url().into(),
                key: "".into(),
                message: "listing refused".into(),
                transient: true,
            });
        }
        paths.iter().map(|p| self.inner.has_narinfo(p)).collect()
    }
    fn begin_nar(&self, nar_size: u64) -> Result<Box<dyn NarUpload>, CacheError> {
        let inner = self.inner.begin_nar(nar_size)?;
        *self.begun.lock().unwrap() += 1;
        self.began.notify_all();
        if self.refused.contains(&nar_size) {
            return Err(CacheError::Remote {
                cache: self.url().into(),
                key: "nar".into(),
                message: "upload refused".into(),
                transient: true,
            });
        }
        Ok(Box::new(Counted {
            inner,
            commits: self.commits.clone(),
        }))
    }
    fn compresses_during_look(&self, _nar_size: u64) -> bool {
        true
    }
    /// Commits on threads of their own, as a remote cache does (a single one would commit
    /// inline, and hold the sink at the first NAR until the look answers).
    fn upload_concurrency(&self) -> usize {
        8
    }
}

/// Counts the NAR bytes reported as written.
#[derive(Default)]
struct Bytes(AtomicU64);

impl Progress for Bytes {
    fn nar_bytes(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::SeqCst);
    }
}

/// A store of six small paths: `a ← b ← c` (each refers to the one before), `d`, `e`, `f`;
/// registered in a database as Nix would.
struct Store {
    dir: tempfile::TempDir,
    _db: TestDb,
    local: LocalStore,
    infos: Vec<PathInfo>,
}

fn six_paths() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let infos = make_store(
        dir.path(),
        &[
            ("a", 3_000, &[]),
            ("b", 4_000, &[0]),
            ("c", 5_000, &[1]),
            ("d", 6_000, &[]),
            ("e", 7_000, &[]),
            ("f", 8_000, &[]),
        ],
    );
    let sd = dir.path().to_str().unwrap();
    let db = TestDb::new(true);
    for info in &infos {
        let refs: Vec<String> = info.references.iter().map(|r| r.to_absolute(sd)).collect();
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        db.add(&Row {
            path: &info.path.to_absolute(sd),
            hash: &format!("sha256:{}", info.nar_hash.to_base16()),
            nar_size: Some(info.nar_size as i64),
            refs: &refs,
            ..Row::default()
        });
    }
    let local = LocalStore::open(sd, &db.path);
    Store {
        dir,
        _db: db,
        local,
        infos,
    }
}

fn unsigned() -> PushOptions {
    PushOptions::new(
        CompressionSettings::new(Compression::Zstd, None).unwrap(),
        vec![],
    )
}

/// With `a` and `d` in the cache already, a push of all six compresses while its look is
/// in flight (it answers only once four NARs have reached the sink), commits nothing before
/// the look has answered, then uploads exactly the four the cache lacks; the NAR bytes it
/// reports are theirs alone.
#[test]
fn small_paths_are_compressed_during_the_look_and_those_it_finds_are_dropped() {
    let store = six_paths();
    let sd = store.dir.path().to_str().unwrap().to_owned();
    let cache_dir = tempfile::tempdir().unwrap();
    let [a, b, c, d, e, f] = [0, 1, 2, 3, 4, 5].map(|i| store.infos[i].path.clone());
    {
        let plain = FileCache::open(cache_dir.path(), "file:///plain").unwrap();
        let first = [a.clone(), d.clone()];
        push(&store.local, &plain, &first, &unsigned(), &NoProgress).unwrap();
    }
    let cache = Listed::new(cache_dir.path(), 4, Ends::Answers);
    let bytes = Bytes::default();
    let all = [c.clone(), d.clone(), e.clone(), f.clone()];
    let report = push(&store.local, &cache, &all, &unsigned(), &bytes).unwrap();

    let (begun, committed) = cache.at_look.lock().unwrap().expect("the push looked");
    assert!(begun >= 4, "{begun} NARs reached the sink during the look");
    assert_eq!(committed, 0, "a NAR was committed before the look answered");
    assert_eq!(cache.commits.load(Ordering::SeqCst), 4);
    let outcome = |p: &StorePath| {
        let full = p.to_absolute(&sd);
        let r = report.results.iter().find(|r| r.path == full);
        r.map(|r| r.outcome.clone()).expect("a result")
    };
    for p in [&a, &d] {
        assert!(matches!(outcome(p), Outcome::AlreadyPresent), "{p}");
    }
    let todo = [&b, &c, &e, &f];
    for p in todo {
        assert!(matches!(outcome(p), Outcome::Uploaded { .. }), "{p}");
        assert!(cache.inner.has_narinfo(p).unwrap(), "{p} published");
    }
    assert_eq!(report.results.len(), 6);
    let sizes: u64 = store.infos[1..]
        .iter()
        .filter(|i| i.path != d)
        .map(|i| i.nar_size)
        .sum();
    assert_eq!(bytes.0.load(Ordering::SeqCst), sizes);
    assert_eq!(report.bytes.nar, sizes);
}

/// A look that fails once NARs have been compressed ahead of it fails the push with its
/// error: nothing is committed or published, and nothing waits forever.
#[test]
fn a_look_that_fails_drops_what_was_sent_ahead_and_publishes_nothing() {
    let store = six_paths();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Listed::new(cache_dir.path(), 3, Ends::Fails);
    let paths: Vec<StorePath> = store.infos.iter().map(|i| i.path.clone()).collect();
    let err = push(&store.local, &cache, &paths, &unsigned(), &NoProgress).unwrap_err();
    assert!(err.to_string().contains("listing refused"), "{err}");
    let (begun, _) = cache.at_look.lock().unwrap().expect("the push looked");
    assert!(begun >= 3, "{begun} NARs reached the sink during the look");
    assert_eq!(cache.commits.load(Ordering::SeqCst), 0);
    for p in &paths {
        assert!(!cache.inner.has_narinfo(p).unwrap(), "{p} published");
    }
}

/// An upload that fails in the sink before the look has answered (it waits there for the
/// verdict): for a path the look finds in the cache, the failure is dropped with the path,
/// unreported; for a path to upload, it is reported once the look keeps the path, failed
/// transiently, and nothing is published for it.
#[test]
fn a_failure_of_a_path_sent_ahead_is_reported_only_if_the_look_keeps_the_path() {
    let store = six_paths();
    let sd = store.dir.path().to_str().unwrap().to_owned();
    let cache_dir = tempfile::tempdir().unwrap();
    let (a, e) = (&store.infos[0], &store.infos[4]);
    {
        let plain = FileCache::open(cache_dir.path(), "file:///plain").unwrap();
        push(
            &store.local,
            &plain,
            std::slice::from_ref(&a.path),
            &unsigned(),
            &NoProgress,
        )
        .unwrap();
    }
    for (info, present) in [(a, true), (e, false)] {
        let mut cache = Listed::new(cache_dir.path(), 1, Ends::Answers);
        cache.refused = vec![info.nar_size];
        let path = std::slice::from_ref(&info.path);
        let report = push(&store.local, &cache, path, &unsigned(), &NoProgress).unwrap();
        let at_look = cache.at_look.lock().unwrap().expect("the push looked");
        assert_eq!(
            at_look,
            (1, 0),
            "its upload began (and failed) during the look"
        );
        assert_eq!(report.results.len(), 1, "{:?}", report.results);
        assert_eq!(report.results[0].path, info.path.to_absolute(&sd));
        match &report.results[0].outcome {
            Outcome::AlreadyPresent if present => {}
            Outcome::Failed(why) if !present => assert!(why.is_transient(), "{why}"),
            o => panic!("{}: {o:?}", info.path),
        }
        assert_eq!(cache.inner.has_narinfo(&info.path).unwrap(), present);
        assert_eq!(cache.commits.load(Ordering::SeqCst), 0);
    }
}

/// A look that panics while the pipeline is full of paths sent ahead (80 NARs of 1 MiB:
/// more than its finishers and queues hold, so the sender is stopped on it) still opens
/// the gate: the stages drain and the panic reaches the caller, nothing waits forever.
#[test]
fn a_look_that_panics_with_the_pipeline_full_passes_the_panic_on() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..80).map(|i| format!("p{i}")).collect();
    let specs: Vec<(&str, usize, &[usize])> = names
        .iter()
        .map(|n| (n.as_str(), 1 << 20, &[][..]))
        .collect();
    let infos = make_store(dir.path(), &specs);
    let sd = dir.path().to_str().unwrap().to_owned();
    let db = TestDb::new(true);
    for info in &infos {
        db.add(&Row {
            path: &info.path.to_absolute(&sd),
            hash: &format!("sha256:{}", info.nar_hash.to_base16()),
            nar_size: Some(info.nar_size as i64),
            ..Row::default()
        });
    }
    let local = LocalStore::open(&sd, &db.path);
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Listed::new(cache_dir.path(), 8, Ends::Panics);
    let paths: Vec<StorePath> = infos.iter().map(|i| i.path.clone()).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let pushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            push(&local, &cache, &paths, &unsigned(), &NoProgress).is_ok()
        }));
        let _ = tx.send((pushed.is_err(), cache.commits.load(Ordering::SeqCst)));
        drop((db, dir, cache_dir));
    });
    let (panicked, commits) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the push still runs a minute after its look panicked");
    assert!(panicked, "the look's panic reaches the caller");
    assert_eq!(commits, 0);
}

/// A cache that counts the NAR uploads begun, for a sink on its own.
#[derive(Debug)]
struct Begins {
    inner: FileCache,
    begun: AtomicUsize,
}

impl BinaryCache for Begins {
    forward_to!(
        inner;
        url, ensure_cache_info, has_narinfo, has_object, object_size, get_narinfo, get_text,
        put_narinfo, sync,
    );
    fn begin_nar(&self, nar_size: u64) -> Result<Box<dyn NarUpload>, CacheError> {
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.inner.begin_nar(nar_size)
    }
}

/// A path sent ahead as one small chunk whose NAR turns out larger (it changed since the
/// store recorded it) is not begun at the cache before the look's verdict: the sink waits
/// at the gate first. Kept, it then fails as the changed path it is.
#[test]
fn a_nar_sent_ahead_that_outgrew_its_recorded_size_waits_for_the_verdict() {
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = Begins {
        inner: FileCache::open(cache_dir.path(), "file:///t").unwrap(),
        begun: AtomicUsize::new(0),
    };
    let opts = unsigned();
    let budget = budget::ByteBudget::new(1 << 20);
    let sink = sink::SinkStage {
        cache: &cache,
        store_dir: "/nix/store",
        opts: &opts,
        progress: &NoProgress,
        finishers: 1,
        buffers: buffers::BufferPool::new(1, 1 << 16),
        stop: stage::Stop::new(Cancel::new()),
    };
    let gate = Arc::new(stage::Gate::default());
    let mut info = stage::Job::for_test(1).info.clone();
    info.nar_size = 10;
    let job = stage::Job::ahead(1, info, gate.clone());
    let chunk = |seq: u32, end: Option<stage::NarEnd>| stage::Chunk {
        job: job.clone(),
        seq,
        data: vec![seq as u8; 1000],
        nar_len: 1000,
        permit: budget.acquire(1000),
        end,
    };
    let (chunks_tx, chunks_rx) = lanes::bounded(4);
    let (results_tx, results_rx) = crossbeam_channel::bounded(4);
    std::thread::scope(|s| {
        let running = sink.spawn(s, chunks_rx, crossbeam_channel::bounded(1), results_tx);
        chunks_tx.send(chunk(0, None)).unwrap();
        assert!(
            gate.has_waiters(1, PATIENCE),
            "the sink went on with a chunk beyond what was sent ahead before the verdict"
        );
        assert_eq!(cache.begun.load(Ordering::SeqCst), 0);
        gate.open();
        let end = stage::NarEnd::Complete {
            nar_hash: crate::format::hash::Sha256([1; 32]),
            nar_size: 2000,
            listing: None,
        };
        chunks_tx.send(chunk(1, Some(end))).unwrap();
        let result = results_rx.recv_timeout(PATIENCE).expect("a result");
        assert!(
            matches!(
                result.outcome,
                Err(Failure::Corrupt {
                    actual_size: 2000,
                    ..
                })
            ),
            "{:?}",
            result.outcome
        );
        assert_eq!(cache.begun.load(Ordering::SeqCst), 1);
        drop(chunks_tx);
        running.finish();
    });
}
