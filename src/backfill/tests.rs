//! The window logic and the cursor, on a store of real files registered in a Nix-schema
//! database whose order each test controls, backfilled into a local directory cache.
use super::*;
use crate::cache::file::FileCache;
use crate::format::compression::{Compression, CompressionSettings};
use crate::store::db::testdb::{Row, TestDb};

struct TestStore {
    _dir: tempfile::TempDir,
    store_dir: String,
    db: TestDb,
}

impl TestStore {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = dir.path().join("store");
        std::fs::create_dir(&store_dir).unwrap();
        TestStore {
            store_dir: store_dir.to_str().unwrap().to_owned(),
            _dir: dir,
            db: TestDb::new(true),
        }
    }

    /// A path for `seed` (its hash part derived from the seed), not registered yet.
    fn path(&self, seed: &str) -> StorePath {
        use sha2::Digest;
        let d = sha2::Sha256::digest(seed.as_bytes());
        let hash = crate::format::nix32::encode(&d[..20]);
        StorePath::from_base_name(&format!("{hash}-{seed}")).unwrap()
    }

    fn full(&self, p: &StorePath) -> String {
        p.to_absolute(&self.store_dir)
    }

    /// Writes `p`'s tree and registers it (the next id) referencing `refs`, which must be
    /// registered already (references registered later are added with [`Self::add_ref`]).
    fn add(&self, p: &StorePath, refs: &[&StorePath]) {
        let full = self.full(p);
        let body: Vec<String> = refs.iter().map(|r| self.full(r)).collect();
        std::fs::write(&full, format!("{} {}", p.name(), body.join(" "))).unwrap();
        let (hash, size) = crate::nar_fs::hash_path(std::path::Path::new(&full)).unwrap();
        let hash = format!("sha256:{}", hash.to_base16());
        let refs: Vec<&str> = body.iter().map(String::as_str).collect();
        self.db.add(&Row {
            path: &full,
            hash: &hash,
            nar_size: Some(size as i64),
            refs: &refs,
            ..Row::default()
        });
    }

    /// Records that `referrer` refers to `reference` (both registered).
    fn add_ref(&self, referrer: &StorePath, reference: &StorePath) {
        self.db
            .conn
            .execute(
                "INSERT INTO Refs (referrer, reference) SELECT a.id, b.id \
                 FROM ValidPaths a, ValidPaths b WHERE a.path = ?1 AND b.path = ?2",
                [self.full(referrer), self.full(reference)],
            )
            .unwrap();
    }

    fn set(&self, p: &StorePath, column: &str, value: &dyn rusqlite::ToSql) {
        self.db
            .conn
            .execute(
                &format!("UPDATE ValidPaths SET {column} = ?1 WHERE path = ?2"),
                rusqlite::params![value, self.full(p)],
            )
            .unwrap();
    }

    fn id(&self, p: &StorePath) -> i64 {
        self.db
            .conn
            .query_row(
                "SELECT id FROM ValidPaths WHERE path = ?1",
                [self.full(p)],
                |r| r.get(0),
            )
            .unwrap()
    }

    fn local(&self) -> LocalStore {
        LocalStore::open(&self.store_dir, &self.db.path)
    }
}

struct Cache {
    dir: tempfile::TempDir,
    cache: FileCache,
}

impl Cache {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let cache = FileCache::open(dir.path(), &url).unwrap();
        Cache { dir, cache }
    }
    fn has(&self, p: &StorePath) -> bool {
        self.dir
            .path()
            .join(format!("{}.narinfo", p.hash_part()))
            .exists()
    }
}

fn push_options() -> PushOptions {
    let mut o = PushOptions::new(
        CompressionSettings::new(Compression::None, None).unwrap(),
        Vec::new(),
    );
    o.jobs = 1;
    o
}

fn options(window: usize, state: Option<PathBuf>) -> BackfillOptions {
    BackfillOptions {
        selection: Selection::Store { since: None },
        derivations: false,
        skip_signed_by: Vec::new(),
        skip_upstream: Vec::new(),
        dry_run: false,
        window,
        state_file: state,
    }
}

fn run(
    store: &TestStore,
    cache: &Cache,
    upstreams: &[&dyn BinaryCache],
    opts: &BackfillOptions,
) -> Summary {
    backfill(
        &store.local(),
        &cache.cache,
        upstreams,
        &push_options(),
        opts,
        &NoProgress,
    )
    .unwrap()
}

/// Paths the summary counts: each path once, in one of its outcomes.
fn counted(sum: &Summary) -> u64 {
    sum.uploaded + sum.present + sum.skipped_signed_by + sum.skipped_upstream + sum.failed
}

#[test]
fn a_reference_registered_after_its_referrer_is_pulled_into_the_referrers_window() {
    let s = TestStore::new();
    let (a, b, c, d) = (s.path("a"), s.path("b"), s.path("c"), s.path("d"));
    s.add(&a, &[]);
    // c refers to d, registered after it (as one `--register-validity` batch can).
    s.add(&c, &[&a]);
    s.add(&b, &[&a]);
    s.add(&d, &[&a]);
    s.add_ref(&c, &d);
    assert!(s.id(&c) < s.id(&d));
    let cache = Cache::new();
    let state = cache.dir.path().join("state.json");
    let sum = run(&s, &cache, &[], &options(2, Some(state.clone())));
    for p in [&a, &b, &c, &d] {
        assert!(cache.has(p), "{p:?}");
    }
    assert_eq!(sum.failed, 0, "{:?}", sum.failures);
    assert_eq!(sum.pulled_in, 1, "d came in with c's window");
    assert_eq!(sum.uploaded, 4);
    // The walk reaches d later and finds it uploaded by this run already: counted as
    // uploaded, not again as present.
    assert_eq!(sum.present, 0);
    assert_eq!(counted(&sum), 4);
    assert_eq!(sum.cursor, s.id(&d));
    assert_eq!(
        state::load(&state, cache.cache.url())
            .unwrap()
            .unwrap()
            .cursor,
        s.id(&d)
    );
}

/// A path an earlier window pulled in is counted once, whatever became of it, when the
/// walk reaches it in its own window: skipped (signed by an upstream key), or failed.
#[test]
fn a_path_pulled_into_an_earlier_window_is_counted_once() {
    let s = TestStore::new();
    let [a, b, c, d, x, y] = ["a", "b", "c", "d", "x", "y"].map(|n| s.path(n));
    // Windows of two: [a, c] with d pulled in, [x, y], [b, d]. The third is planned only
    // once the first has settled, so d has settled by then.
    s.add(&a, &[]);
    s.add(&c, &[&a]);
    s.add(&x, &[]);
    s.add(&y, &[]);
    s.add(&b, &[&a]);
    s.add(&d, &[&a]);
    s.add_ref(&c, &d);
    s.set(&d, "sigs", &format!("upstream-1:{}", "A".repeat(86) + "=="));
    let cache = Cache::new();
    let mut opts = options(2, None);
    opts.skip_signed_by = vec!["upstream-1".into()];
    let sum = run(&s, &cache, &[], &opts);
    assert_eq!(sum.pulled_in, 1, "d came in with c's window");
    assert_eq!(
        (sum.uploaded, sum.present, sum.skipped_signed_by, sum.failed),
        (5, 0, 1, 0),
        "{:?}",
        sum.failures
    );
    assert!(!cache.has(&d));

    // d's tree no longer matches its NarHash: it fails, and c, which refers to it, is
    // refused.
    std::fs::write(s.full(&d), "changed").unwrap();
    let cache = Cache::new();
    let sum = run(&s, &cache, &[], &options(2, None));
    assert_eq!(
        (sum.uploaded, sum.present, sum.failed),
        (4, 0, 2),
        "{:?}",
        sum.failures
    );
    assert_eq!(counted(&sum), 6);
    assert!(cache.has(&a) && cache.has(&b) && !cache.has(&c) && !cache.has(&d));
}

#[test]
fn without_the_pull_in_the_referrer_would_be_refused() {
    // The same store, with a window of one path and d registered last: c's window alone
    // cannot satisfy the pipeline's closure check unless d comes with it.
    let s = TestStore::new();
    let (c, d) = (s.path("c"), s.path("d"));
    s.add(&c, &[]);
    s.add(&d, &[]);
    s.add_ref(&c, &d);
    let cache = Cache::new();
    let sum = run(&s, &cache, &[], &options(1, None));
    assert_eq!((sum.uploaded, sum.failed, sum.pulled_in), (2, 0, 1));
    assert!(cache.has(&c) && cache.has(&d));
}

#[test]
fn a_rerun_resumes_from_the_cursor_and_checks_only_what_is_past_it() {
    let s = TestStore::new();
    let paths: Vec<StorePath> = (0..7).map(|i| s.path(&format!("p{i}"))).collect();
    s.add(&paths[0], &[]);
    for i in 1..7 {
        s.add(&paths[i], &[&paths[i - 1]]);
    }
    let cache = Cache::new();
    let state = cache.dir.path().join("state.json");
    let opts = options(3, Some(state.clone()));
    // As if a run was killed after its first window was durable.
    state::save(
        &state,
        &state::State::new(cache.cache.url(), &opts.fingerprint(), s.id(&paths[2])),
    )
    .unwrap();
    let sum = run(&s, &cache, &[], &opts);
    assert_eq!(sum.resumed_from, Some(s.id(&paths[2])));
    // p3's reference p2 is not in the cache (the state said it was: here it lies), so it
    // is pulled in: a reference is always checked, the cursor only saves re-walking.
    assert_eq!(sum.uploaded, 7);
    assert_eq!(sum.present, 0);
    let again = run(&s, &cache, &[], &opts);
    assert_eq!((again.uploaded, again.present, again.windows), (0, 0, 0));
    assert_eq!(again.cursor, s.id(&paths[6]));
    // Another selection does not resume from this cursor.
    let mut drvs = opts.clone();
    drvs.derivations = true;
    let fresh = run(&s, &cache, &[], &drvs);
    assert_eq!(fresh.resumed_from, None);
    assert_eq!((fresh.uploaded, fresh.present), (0, 7));
}

#[test]
fn a_failed_path_pins_the_cursor_and_later_windows_still_go_up() {
    let s = TestStore::new();
    let (a, bad, c, d, e) = (
        s.path("a"),
        s.path("bad"),
        s.path("c"),
        s.path("d"),
        s.path("e"),
    );
    s.add(&a, &[]);
    s.add(&bad, &[]);
    s.add(&c, &[&bad]);
    s.add(&d, &[]);
    s.add(&e, &[]);
    // The store's NarHash no longer matches the tree: the pipeline refuses the path.
    std::fs::write(s.full(&bad), "changed").unwrap();
    let cache = Cache::new();
    let state = cache.dir.path().join("state.json");
    let sum = run(&s, &cache, &[], &options(2, Some(state.clone())));
    assert!(cache.has(&a) && cache.has(&d) && cache.has(&e));
    assert!(!cache.has(&bad) && !cache.has(&c));
    // bad failed; c, its referrer in the next window, is refused rather than pulling it
    // in again.
    assert_eq!((sum.uploaded, sum.failed), (3, 2), "{:?}", sum.failures);
    assert_eq!(sum.cursor, 0, "the first window holds the failed path");
    assert_eq!(state::load(&state, cache.cache.url()).unwrap(), None);
}

#[test]
fn skipped_paths_count_as_available_for_their_referrers() {
    let s = TestStore::new();
    let (signed, served, top) = (s.path("signed"), s.path("served"), s.path("top"));
    s.add(&signed, &[]);
    s.add(&served, &[]);
    s.add(&top, &[&signed, &served]);
    let sig = format!("upstream-1:{}", "A".repeat(86) + "==");
    s.set(&signed, "sigs", &sig);
    let upstream = Cache::new();
    let mut only_served = options(10, None);
    only_served.selection = Selection::Paths(vec![served.clone()]);
    assert_eq!(run(&s, &upstream, &[], &only_served).uploaded, 1);
    let cache = Cache::new();
    let mut opts = options(10, None);
    opts.skip_signed_by = vec!["upstream-1".into()];
    let sum = run(&s, &cache, &[&upstream.cache], &opts);
    assert_eq!(
        (sum.uploaded, sum.skipped_signed_by, sum.skipped_upstream),
        (1, 1, 1)
    );
    assert!(cache.has(&top) && !cache.has(&signed) && !cache.has(&served));
}

#[test]
fn a_dry_run_counts_what_would_go_up_and_writes_nothing() {
    let s = TestStore::new();
    let (a, b) = (s.path("a"), s.path("b"));
    s.add(&a, &[]);
    s.add(&b, &[&a]);
    let cache = Cache::new();
    let state = cache.dir.path().join("state.json");
    let mut opts = options(1, Some(state.clone()));
    opts.dry_run = true;
    let sum = run(&s, &cache, &[], &opts);
    let sizes: u64 = s
        .local()
        .path_infos(&[a.clone(), b.clone()])
        .unwrap()
        .iter()
        .map(|i| i.nar_size)
        .sum();
    assert_eq!((sum.uploaded, sum.bytes.nar), (2, sizes));
    assert!(!cache.has(&a) && !cache.has(&b) && !state.exists());
    assert!(!cache.dir.path().join("nix-cache-info").exists());
}

#[test]
fn derivations_and_old_paths_go_up_only_when_selected_or_referred_to() {
    let s = TestStore::new();
    let (old, drv, lone_drv, out) = (
        s.path("old"),
        s.path("x.drv"),
        s.path("y.drv"),
        s.path("out"),
    );
    s.add(&old, &[]);
    s.add(&drv, &[]);
    s.add(&lone_drv, &[]);
    // An output that refers to a derivation and to a path older than --since.
    s.add(&out, &[&drv, &old]);
    for p in [&old, &drv, &lone_drv] {
        s.set(p, "registrationTime", &1_000);
    }
    s.set(&out, "registrationTime", &2_000);
    let cache = Cache::new();
    let mut opts = options(1, None);
    opts.selection = Selection::Store { since: Some(1_500) };
    let sum = run(&s, &cache, &[], &opts);
    assert_eq!((sum.uploaded, sum.pulled_in), (3, 2));
    assert_eq!(
        sum.windows, 1,
        "the walk starts at the first path registered since"
    );
    assert!(cache.has(&out) && cache.has(&drv) && cache.has(&old));
    assert!(!cache.has(&lone_drv));

    let cache = Cache::new();
    let mut opts = options(10, None);
    opts.derivations = true;
    let sum = run(&s, &cache, &[], &opts);
    assert_eq!(sum.uploaded, 4);
    assert!(cache.has(&lone_drv));
    let cache = Cache::new();
    let sum = run(&s, &cache, &[], &options(10, None));
    assert_eq!(sum.uploaded, 3);
    assert!(!cache.has(&lone_drv) && cache.has(&drv));
}

#[test]
fn named_paths_backfill_their_closures_and_resume_by_position() {
    let s = TestStore::new();
    let (a, b, c, other) = (s.path("a"), s.path("b"), s.path("c"), s.path("other"));
    s.add(&a, &[]);
    s.add(&b, &[&a]);
    s.add(&c, &[]);
    s.add(&other, &[]);
    let cache = Cache::new();
    let state = cache.dir.path().join("state.json");
    let mut opts = options(1, Some(state.clone()));
    opts.selection = Selection::Paths(vec![b.clone(), c.clone()]);
    let sum = run(&s, &cache, &[], &opts);
    assert_eq!(sum.uploaded, 3);
    assert!(cache.has(&a) && cache.has(&b) && cache.has(&c) && !cache.has(&other));
    assert_eq!(
        state::load(&state, cache.cache.url())
            .unwrap()
            .unwrap()
            .cursor,
        2
    );
    let again = run(&s, &cache, &[], &opts);
    assert_eq!((again.uploaded, again.present, again.windows), (0, 0, 0));
    // Without the state, each path of the closures is checked once: a is in both.
    let mut both = options(1, None);
    both.selection = Selection::Paths(vec![b.clone(), a.clone(), c.clone()]);
    let fresh = Cache::new();
    let first = run(&s, &fresh, &[], &both);
    assert_eq!((first.uploaded, first.present), (3, 0));
    let second = run(&s, &fresh, &[], &both);
    assert_eq!((second.uploaded, second.present), (0, 3));
}

#[test]
fn a_large_backfill_lists_the_cache_instead_of_asking_per_path() {
    let s = TestStore::new();
    let n = LIST_ABOVE as usize + 1;
    let paths: Vec<StorePath> = (0..n).map(|i| s.path(&format!("n{i}"))).collect();
    for p in &paths {
        s.add(p, &[]);
    }
    let cache = Cache::new();
    let first = run(&s, &cache, &[], &options(DEFAULT_WINDOW, None));
    assert!(first.listed);
    assert_eq!(first.uploaded, n as u64);
    // The rerun knows every path from the listing alone.
    let again = run(&s, &cache, &[], &options(DEFAULT_WINDOW, None));
    assert!(again.listed);
    assert_eq!((again.uploaded, again.present), (0, n as u64));
}

/// Registers one more path (tree and row, through a connection of its own) the first
/// time the backfill reports progress: a store that grows while the walk runs.
struct GrowsDuringTheWalk {
    db: std::path::PathBuf,
    full: String,
    done: std::sync::atomic::AtomicBool,
}

impl BackfillProgress for GrowsDuringTheWalk {
    fn advanced(&self, _paths: u64) {
        if self.done.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        std::fs::write(&self.full, "late").unwrap();
        let (hash, size) = crate::nar_fs::hash_path(std::path::Path::new(&self.full)).unwrap();
        let hash = format!("sha256:{}", hash.to_base16());
        let conn = rusqlite::Connection::open(&self.db).unwrap();
        crate::store::db::testdb::add(
            &conn,
            &Row {
                path: &self.full,
                hash: &hash,
                nar_size: Some(size as i64),
                ..Row::default()
            },
        );
    }
}

#[test]
fn the_walk_ends_where_the_store_ended_when_it_started() {
    let s = TestStore::new();
    let (a, b, c) = (s.path("a"), s.path("b"), s.path("c"));
    s.add(&a, &[]);
    s.add(&b, &[&a]);
    s.add(&c, &[&a]);
    let late = s.path("late");
    let progress = GrowsDuringTheWalk {
        db: s.db.path.clone(),
        full: s.full(&late),
        done: Default::default(),
    };
    let cache = Cache::new();
    let sum = backfill(
        &s.local(),
        &cache.cache,
        &[],
        &push_options(),
        &options(1, None),
        &progress,
    )
    .unwrap();
    assert!(progress.done.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(sum.uploaded, 3, "{:?}", sum.failures);
    assert!(
        !cache.has(&late),
        "a path registered during the walk is the next run's"
    );
    assert_eq!(sum.cursor, s.id(&c));
}

/// A directory cache whose commit of any NAR of [`Held::LARGE`] bytes or more waits until
/// the test lets it go (or drops its end of the gate).
#[derive(Debug)]
struct Held {
    inner: FileCache,
    gate: crossbeam_channel::Receiver<()>,
}

impl Held {
    const LARGE: u64 = 1 << 20;

    /// A cache in a new directory (and its URL) whose large NAR commits wait for a send
    /// on the returned sender.
    fn in_new_dir() -> (
        tempfile::TempDir,
        String,
        crossbeam_channel::Sender<()>,
        Held,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let (release, gate) = crossbeam_channel::bounded(0);
        let inner = FileCache::open(dir.path(), &url).unwrap();
        (dir, url, release, Held { inner, gate })
    }

    /// Makes `large`'s contents [`Held::LARGE`] bytes, registered with their NarHash.
    fn make_large(s: &TestStore, large: &StorePath) {
        std::fs::write(s.full(large), vec![b'x'; Held::LARGE as usize]).unwrap();
        let (hash, size) = crate::nar_fs::hash_path(std::path::Path::new(&s.full(large))).unwrap();
        s.set(large, "hash", &format!("sha256:{}", hash.to_base16()));
        s.set(large, "narSize", &(size as i64));
    }
}

struct HeldUpload(
    Box<dyn crate::cache::NarUpload>,
    crossbeam_channel::Receiver<()>,
);

impl std::io::Write for HeldUpload {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl crate::cache::NarUpload for HeldUpload {
    fn written(&mut self) {
        self.0.written();
    }
    fn commit(self: Box<Self>, key: &str) -> Result<(), CacheError> {
        // Returns once the test sends or drops its end: a failing test cannot hang here.
        let _ = self.1.recv();
        self.0.commit(key)
    }
}

impl BinaryCache for Held {
    fn url(&self) -> &str {
        self.inner.url()
    }
    // Uploads of other paths commit while the held one waits.
    fn upload_concurrency(&self) -> usize {
        4
    }
    fn ensure_cache_info(&self, store_dir: &str) -> Result<(), CacheError> {
        self.inner.ensure_cache_info(store_dir)
    }
    fn has_narinfo(&self, path: &StorePath) -> Result<bool, CacheError> {
        self.inner.has_narinfo(path)
    }
    fn has_object(&self, key: &str) -> Result<bool, CacheError> {
        self.inner.has_object(key)
    }
    fn object_size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        self.inner.object_size(key)
    }
    fn get_narinfo(&self, path: &StorePath) -> Result<Option<String>, CacheError> {
        self.inner.get_narinfo(path)
    }
    fn get_text(&self, key: &str) -> Result<Option<String>, CacheError> {
        self.inner.get_text(key)
    }
    fn begin_nar(&self, nar_size: u64) -> Result<Box<dyn crate::cache::NarUpload>, CacheError> {
        let u = self.inner.begin_nar(nar_size)?;
        if nar_size < Self::LARGE {
            return Ok(u);
        }
        Ok(Box::new(HeldUpload(u, self.gate.clone())))
    }
    fn put_narinfo(&self, path: &StorePath, text: &str) -> Result<(), CacheError> {
        self.inner.put_narinfo(path, text)
    }
    fn put_narinfos(&self, n: &[(StorePath, String)]) -> Result<(), CacheError> {
        self.inner.put_narinfos(n)
    }
    fn publish_narinfos(
        &self,
        store_dir: &str,
        narinfos: Vec<crate::format::narinfo::NarInfo>,
    ) -> Result<Vec<crate::cache::Published>, CacheError> {
        self.inner.publish_narinfos(store_dir, narinfos)
    }
    fn sync(&self) -> Result<(), CacheError> {
        self.inner.sync()
    }
}

/// Sends the full path of each path the pipeline finishes (its narinfo durable, or failed),
/// and a count each time the backfill has taken settled paths in (its cursor moved, and
/// was saved, if it could).
struct Finished(
    crossbeam_channel::Sender<String>,
    crossbeam_channel::Sender<u64>,
);

impl Finished {
    /// The progress, the finished paths and the paths taken in; room for `n` of each, so
    /// the pipeline never waits on the test.
    fn new(
        n: usize,
    ) -> (
        Self,
        crossbeam_channel::Receiver<String>,
        crossbeam_channel::Receiver<u64>,
    ) {
        let (tx, finished) = crossbeam_channel::bounded(n);
        let (taken_tx, taken) = crossbeam_channel::bounded(n);
        (Finished(tx, taken_tx), finished, taken)
    }
}

impl BackfillProgress for Finished {
    fn finished(&self, result: &PathResult) {
        self.0.send(result.path.clone()).unwrap();
    }
    fn advanced(&self, paths: u64) {
        self.1.send(paths).unwrap();
    }
}

/// Waits until the backfill has taken `n` settled paths in.
fn taken_in(taken: &crossbeam_channel::Receiver<u64>, n: u64) {
    let mut seen = 0;
    while seen < n {
        seen += taken
            .recv_timeout(Duration::from_secs(60))
            .expect("the backfill takes settled paths in");
    }
    assert_eq!(seen, n, "taken in one path at a time");
}

#[test]
fn the_next_window_goes_up_while_the_last_path_of_one_is_held_and_the_cursor_waits() {
    let s = TestStore::new();
    let (a, large, c, d) = (s.path("a"), s.path("large"), s.path("c"), s.path("d"));
    s.add(&a, &[]);
    s.add(&large, &[]);
    // Window 1 ends with a path whose NAR commit the cache holds back.
    Held::make_large(&s, &large);
    // Window 2: c refers to the held path (in flight when c is planned), d to nothing.
    s.add(&c, &[&large]);
    s.add(&d, &[]);
    let (dir, url, release, cache) = Held::in_new_dir();
    let has = |p: &StorePath| {
        dir.path()
            .join(format!("{}.narinfo", p.hash_part()))
            .exists()
    };
    let state = dir.path().join("state.json");
    let opts = options(2, Some(state.clone()));
    // One message a path of the four, so the pipeline never waits on the test.
    let (progress, finished, taken) = Finished::new(4);
    let store = s.local();
    let sum = std::thread::scope(|scope| {
        let run = scope.spawn(|| backfill(&store, &cache, &[], &push_options(), &opts, &progress));
        let wait = || {
            finished
                .recv_timeout(Duration::from_secs(60))
                .expect("a path goes up while the held one waits")
        };
        // a, then d from window 2: window 2 was submitted while window 1 still uploads.
        let mut early = [wait(), wait()];
        early.sort();
        let mut expected = [s.full(&a), s.full(&d)];
        expected.sort();
        assert_eq!(early, expected);
        assert!(!has(&large) && !has(&c), "c waits for its held reference");
        // The walk has taken a and d in: had it passed the cursor over window 1, the state
        // file would say so now.
        taken_in(&taken, 2);
        assert_eq!(
            state::load(&state, &url).unwrap(),
            None,
            "the cursor does not pass window 1 while its last path is held"
        );
        drop(release);
        assert_eq!(
            [wait(), wait()],
            [s.full(&large), s.full(&c)],
            "the reference before its referrer"
        );
        run.join().unwrap().unwrap()
    });
    assert_eq!(
        (sum.uploaded, sum.present, sum.failed, sum.pulled_in),
        (4, 0, 0, 0),
        "{:?}",
        sum.failures
    );
    assert_eq!(sum.windows, 2);
    assert_eq!(sum.cursor, s.id(&d));
    assert_eq!(state::load(&state, &url).unwrap().unwrap().cursor, s.id(&d));
}

/// Named paths: the cursor passes each window of a group's closure as it settles, not
/// only the group's last, so a kill costs at most the windows in flight. Here the one
/// named path's closure is a chain of four paths, two windows; the second window's first
/// path is held, and the state file shows the cursor past the first window meanwhile. A
/// rerun from that state walks only the second window, unless the closure it counted is
/// not the one it finds.
#[test]
fn named_paths_move_the_cursor_window_by_window_within_a_group() {
    let s = TestStore::new();
    let [p1, p2, large, top] = ["p1", "p2", "large", "top"].map(|n| s.path(n));
    s.add(&p1, &[]);
    s.add(&p2, &[&p1]);
    s.add(&large, &[&p2]);
    s.add(&top, &[&large]);
    Held::make_large(&s, &large);
    let (dir, url, release, cache) = Held::in_new_dir();
    let state = dir.path().join("state.json");
    let mut opts = options(2, Some(state.clone()));
    opts.selection = Selection::Paths(vec![top.clone()]);
    let (progress, finished, taken) = Finished::new(4);
    let store = s.local();
    let (sum, mid) = std::thread::scope(|scope| {
        let run = scope.spawn(|| backfill(&store, &cache, &[], &push_options(), &opts, &progress));
        let wait = || {
            finished
                .recv_timeout(Duration::from_secs(60))
                .expect("window 1 goes up while window 2 is held")
        };
        assert_eq!([wait(), wait()], [s.full(&p1), s.full(&p2)]);
        // Window 1 has settled and the walk has taken it in: the cursor has passed it.
        taken_in(&taken, 2);
        let mid = state::load(&state, &url)
            .unwrap()
            .expect("the cursor passes window 1 while window 2 of the group is held");
        drop(release);
        (run.join().unwrap().unwrap(), mid)
    });
    assert_eq!(
        mid.cursor, 0,
        "not past the named path: its closure is not done"
    );
    assert_eq!(mid.within.as_ref().map(|w| w.windows), Some(1));
    assert_eq!((sum.uploaded, sum.windows, sum.cursor), (4, 2, 1));
    let end = state::load(&state, &url).unwrap().unwrap();
    assert_eq!((end.cursor, end.within), (1, None));

    // As if killed there: window 2's narinfos never written, the state at window 1.
    let forget = |p: &StorePath| {
        std::fs::remove_file(dir.path().join(format!("{}.narinfo", p.hash_part()))).unwrap();
    };
    forget(&large);
    forget(&top);
    state::save(&state, &mid).unwrap();
    let again = backfill(&store, &cache, &[], &push_options(), &opts, &NoProgress).unwrap();
    assert_eq!(again.resumed_from, Some(0));
    assert_eq!(
        (again.windows, again.uploaded, again.present),
        (1, 2, 0),
        "window 1 is not walked again"
    );
    assert_eq!(again.cursor, 1);

    // A count of windows of another closure is not trusted: the group is walked whole.
    let mut other = mid.clone();
    other.within.as_mut().unwrap().closure = "0000000000000000".into();
    state::save(&state, &other).unwrap();
    let whole = backfill(&store, &cache, &[], &push_options(), &opts, &NoProgress).unwrap();
    assert_eq!((whole.windows, whole.uploaded, whole.present), (2, 0, 4));
}
