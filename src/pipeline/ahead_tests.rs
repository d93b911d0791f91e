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

/// A local directory posing as a remote cache: it commits several NARs at once, lets NARs
/// be compressed during its look,
/// and its look (the listing of narinfos) answers only once `want` NAR uploads have begun
/// (or [`PATIENCE`] ran out), noting what had been committed by then. `fail_look` makes
/// the look fail instead, once those uploads have begun.
#[derive(Debug)]
struct Listed {
    inner: FileCache,
    want: usize,
    fail_look: bool,
    begun: Mutex<usize>,
    began: Condvar,
    commits: Arc<AtomicUsize>,
    /// Uploads begun and commits done when the look answered.
    at_look: Mutex<Option<(usize, usize)>>,
}

impl Listed {
    fn new(dir: &std::path::Path, want: usize, fail_look: bool) -> Self {
        Listed {
            inner: FileCache::open(dir, "file:///listed").unwrap(),
            want,
            fail_look,
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
        if self.fail_look {
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
    let cache = Listed::new(cache_dir.path(), 4, false);
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
    let cache = Listed::new(cache_dir.path(), 3, true);
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
